# Type stubs of cynorm's public functions (cynorm/_api.py, compiled by Cython).
#
# Arrays: x is float32, float64 or float16 (anything array-like is converted; bfloat16
# arrays of ml_dtypes, which has no dtype stubs, match the overloads taking any array);
# y and dx have x's dtype, mean and rstd are float64. `return_stats=True` adds the
# statistics to the result.
from typing import Any, Literal, Optional, Sequence, SupportsIndex, Tuple, TypeVar, Union, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

_F = TypeVar("_F", np.float32, np.float64, np.float16)
_Floats = NDArray[np.floating[Any]]
_Stat = NDArray[np.float64]

# package-internal helpers shared with standardize, StandardScaler and cynorm.dask
_LOWP_EPS: dict[str, float]
def _to_f32(a: NDArray[Any]) -> NDArray[np.float32]: ...
def _store(src: NDArray[Any], dst: NDArray[Any]) -> None: ...
Stats = Literal["two_pass", "welford"]
Activation = Optional[Literal["silu", "gelu", "gelu_tanh", "relu"]]
# 1: x of shape (N, C, *spatial); -1: channels last, (N, *spatial, C)
ChannelAxis = int
ShapeLike = Union[SupportsIndex, Sequence[SupportsIndex]]


@overload
def group_norm(
    x: NDArray[_F], num_groups: SupportsIndex, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[False] = ...,
    stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> NDArray[_F]: ...
@overload
def group_norm(
    x: NDArray[_F], num_groups: SupportsIndex, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[True], stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[NDArray[_F], _Stat, _Stat]: ...
@overload
def group_norm(
    x: ArrayLike, num_groups: SupportsIndex, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: Literal[False] = ..., stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> _Floats: ...
@overload
def group_norm(
    x: ArrayLike, num_groups: SupportsIndex, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: Literal[True], stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[_Floats, _Stat, _Stat]: ...
@overload
def group_norm(
    x: ArrayLike, num_groups: SupportsIndex, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: bool = ..., stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Union[_Floats, Tuple[_Floats, _Stat, _Stat]]: ...

@overload
def instance_norm(
    x: NDArray[_F], running_mean: Optional[_Floats] = ...,
    running_var: Optional[_Floats] = ..., weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., use_input_stats: bool = ..., momentum: float = ...,
    eps: float = ..., *, out: Optional[NDArray[_F]] = ...,
    return_stats: Literal[False] = ..., stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> NDArray[_F]: ...
@overload
def instance_norm(
    x: NDArray[_F], running_mean: Optional[_Floats] = ...,
    running_var: Optional[_Floats] = ..., weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., use_input_stats: bool = ..., momentum: float = ...,
    eps: float = ..., *, out: Optional[NDArray[_F]] = ..., return_stats: Literal[True],
    stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[NDArray[_F], _Stat, _Stat]: ...
@overload
def instance_norm(
    x: ArrayLike, running_mean: Optional[_Floats] = ...,
    running_var: Optional[_Floats] = ..., weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., use_input_stats: bool = ..., momentum: float = ...,
    eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: Literal[False] = ..., stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> _Floats: ...
@overload
def instance_norm(
    x: ArrayLike, running_mean: Optional[_Floats] = ...,
    running_var: Optional[_Floats] = ..., weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., use_input_stats: bool = ..., momentum: float = ...,
    eps: float = ..., *, out: Optional[_Floats] = ..., return_stats: Literal[True],
    stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[_Floats, _Stat, _Stat]: ...
@overload
def instance_norm(
    x: ArrayLike, running_mean: Optional[_Floats] = ...,
    running_var: Optional[_Floats] = ..., weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., use_input_stats: bool = ..., momentum: float = ...,
    eps: float = ..., *, out: Optional[_Floats] = ..., return_stats: bool = ...,
    stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Union[_Floats, Tuple[_Floats, _Stat, _Stat]]: ...

@overload
def batch_norm(
    x: NDArray[_F], running_mean: Optional[NDArray[np.floating[Any]]] = ...,
    running_var: Optional[NDArray[np.floating[Any]]] = ...,
    weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
    training: bool = ..., momentum: Optional[float] = ..., eps: float = ..., *,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[False] = ...,
    stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> NDArray[_F]: ...
@overload
def batch_norm(
    x: NDArray[_F], running_mean: Optional[NDArray[np.floating[Any]]] = ...,
    running_var: Optional[NDArray[np.floating[Any]]] = ...,
    weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
    training: bool = ..., momentum: Optional[float] = ..., eps: float = ..., *,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[True], stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[NDArray[_F], _Stat, _Stat]: ...
@overload
def batch_norm(
    x: ArrayLike, running_mean: Optional[NDArray[np.floating[Any]]] = ...,
    running_var: Optional[NDArray[np.floating[Any]]] = ...,
    weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
    training: bool = ..., momentum: Optional[float] = ..., eps: float = ..., *,
    out: Optional[_Floats] = ..., return_stats: Literal[False] = ..., stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> _Floats: ...
@overload
def batch_norm(
    x: ArrayLike, running_mean: Optional[NDArray[np.floating[Any]]] = ...,
    running_var: Optional[NDArray[np.floating[Any]]] = ...,
    weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
    training: bool = ..., momentum: Optional[float] = ..., eps: float = ..., *,
    out: Optional[_Floats] = ..., return_stats: Literal[True], stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[_Floats, _Stat, _Stat]: ...
@overload
def batch_norm(
    x: ArrayLike, running_mean: Optional[NDArray[np.floating[Any]]] = ...,
    running_var: Optional[NDArray[np.floating[Any]]] = ...,
    weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
    training: bool = ..., momentum: Optional[float] = ..., eps: float = ..., *,
    out: Optional[_Floats] = ..., return_stats: bool = ..., stats: Stats = ..., activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Union[_Floats, Tuple[_Floats, _Stat, _Stat]]: ...

@overload
def layer_norm(
    x: NDArray[_F], normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[False] = ...,
    stats: Stats = ..., residual: None = ...,
    residual_out: None = ...
) -> NDArray[_F]: ...
@overload
def layer_norm(
    x: NDArray[_F], normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[True], stats: Stats = ..., residual: None = ...,
    residual_out: None = ...
) -> Tuple[NDArray[_F], _Stat, _Stat]: ...
@overload
def layer_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: Literal[False] = ..., stats: Stats = ..., residual: None = ...,
    residual_out: None = ...
) -> _Floats: ...
@overload
def layer_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: Literal[True], stats: Stats = ..., residual: None = ...,
    residual_out: None = ...
) -> Tuple[_Floats, _Stat, _Stat]: ...
@overload
def layer_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: bool = ..., stats: Stats = ..., residual: None = ...,
    residual_out: None = ...
) -> Union[_Floats, Tuple[_Floats, _Stat, _Stat]]: ...

@overload
def layer_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., *, out: Optional[_Floats] = ...,
    return_stats: bool = ..., stats: Stats = ..., residual: ArrayLike,
    residual_out: Optional[_Floats] = ...
) -> Union[Tuple[_Floats, _Floats], Tuple[_Floats, _Floats, _Stat, _Stat]]: ...

@overload
def rms_norm(
    x: NDArray[_F], normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    eps: Optional[float] = ..., *, out: Optional[NDArray[_F]] = ...,
    return_stats: Literal[False] = ..., residual: None = ...,
    residual_out: None = ...
) -> NDArray[_F]: ...
@overload
def rms_norm(
    x: NDArray[_F], normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    eps: Optional[float] = ..., *, out: Optional[NDArray[_F]] = ...,
    return_stats: Literal[True], residual: None = ...,
    residual_out: None = ...
) -> Tuple[NDArray[_F], _Stat]: ...
@overload
def rms_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    eps: Optional[float] = ..., *, out: Optional[_Floats] = ...,
    return_stats: Literal[False] = ..., residual: None = ...,
    residual_out: None = ...
) -> _Floats: ...
@overload
def rms_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    eps: Optional[float] = ..., *, out: Optional[_Floats] = ...,
    return_stats: Literal[True], residual: None = ...,
    residual_out: None = ...
) -> Tuple[_Floats, _Stat]: ...
@overload
def rms_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    eps: Optional[float] = ..., *, out: Optional[_Floats] = ...,
    return_stats: bool = ..., residual: None = ...,
    residual_out: None = ...
) -> Union[_Floats, Tuple[_Floats, _Stat]]: ...

@overload
def rms_norm(
    x: ArrayLike, normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ...,
    eps: Optional[float] = ..., *, out: Optional[_Floats] = ...,
    return_stats: bool = ..., residual: ArrayLike, residual_out: Optional[_Floats] = ...
) -> Union[Tuple[_Floats, _Floats], Tuple[_Floats, _Floats, _Stat]]: ...

# backward: (dx, dweight, dbias), or (dx, dweight) for rms_norm; dweight/dbias have x's dtype
@overload
def group_norm_backward(
    dy: NDArray[_F], x: NDArray[_F], mean: ArrayLike, rstd: ArrayLike,
    num_groups: SupportsIndex, weight: Optional[ArrayLike] = ..., *,
    out: Optional[NDArray[_F]] = ..., bias: Optional[ArrayLike] = ...,
    activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def group_norm_backward(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike,
    num_groups: SupportsIndex, weight: Optional[ArrayLike] = ..., *,
    out: Optional[_Floats] = ..., bias: Optional[ArrayLike] = ...,
    activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[_Floats, _Floats, _Floats]: ...
@overload
def instance_norm_backward(
    dy: NDArray[_F], x: NDArray[_F], mean: ArrayLike, rstd: ArrayLike,
    weight: Optional[ArrayLike] = ..., use_input_stats: bool = ..., *,
    out: Optional[NDArray[_F]] = ..., bias: Optional[ArrayLike] = ...,
    activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def instance_norm_backward(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike,
    weight: Optional[ArrayLike] = ..., use_input_stats: bool = ..., *,
    out: Optional[_Floats] = ..., bias: Optional[ArrayLike] = ...,
    activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[_Floats, _Floats, _Floats]: ...
@overload
def batch_norm_backward(
    dy: NDArray[_F], x: NDArray[_F], mean: ArrayLike, rstd: ArrayLike,
    weight: Optional[ArrayLike] = ..., training: bool = ..., *,
    out: Optional[NDArray[_F]] = ..., bias: Optional[ArrayLike] = ...,
    activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def batch_norm_backward(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike,
    weight: Optional[ArrayLike] = ..., training: bool = ..., *,
    out: Optional[_Floats] = ..., bias: Optional[ArrayLike] = ...,
    activation: Activation = ...,
    channel_axis: ChannelAxis = ...
) -> Tuple[_Floats, _Floats, _Floats]: ...
@overload
def layer_norm_backward(
    dy: NDArray[_F], x: NDArray[_F], mean: ArrayLike, rstd: ArrayLike,
    normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ..., *,
    out: Optional[NDArray[_F]] = ...
) -> Tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def layer_norm_backward(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike,
    normalized_shape: ShapeLike, weight: Optional[ArrayLike] = ..., *,
    out: Optional[_Floats] = ...
) -> Tuple[_Floats, _Floats, _Floats]: ...
@overload
def rms_norm_backward(
    dy: NDArray[_F], x: NDArray[_F], rstd: ArrayLike, normalized_shape: ShapeLike,
    weight: Optional[ArrayLike] = ..., *, out: Optional[NDArray[_F]] = ...
) -> Tuple[NDArray[_F], NDArray[_F]]: ...
@overload
def rms_norm_backward(
    dy: ArrayLike, x: ArrayLike, rstd: ArrayLike, normalized_shape: ShapeLike,
    weight: Optional[ArrayLike] = ..., *, out: Optional[_Floats] = ...
) -> Tuple[_Floats, _Floats]: ...
