# Type stubs of cynorm.nn (the layers). Arrays: the layer's dtype (float32 by default)
# for parameters and buffers; forward/backward keep the input's dtype.
from typing import (
    Any, Dict, Literal, Mapping, Optional, Sequence, SupportsIndex, Tuple, Union, overload,
)

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

_Floats = NDArray[np.floating[Any]]
_Activation = Optional[Literal["silu", "gelu", "gelu_tanh", "relu"]]
_ChannelAxis = Literal[1, -1]

class _Norm:
    dtype: np.dtype[Any]
    training: bool
    grads: Dict[str, _Floats]
    def train(self, mode: bool = ...) -> "_Norm": ...
    def eval(self) -> "_Norm": ...
    def parameters(self) -> Dict[str, _Floats]: ...
    @property
    def weight(self) -> Optional[_Floats]: ...
    @property
    def bias(self) -> Optional[_Floats]: ...
    def state_dict(self) -> Dict[str, NDArray[Any]]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = ...) -> None: ...
    def __call__(self, x: ArrayLike) -> _Floats: ...
    def forward(self, x: ArrayLike) -> _Floats: ...
    def backward(self, dy: ArrayLike) -> _Floats: ...

class _RunningStats:
    @property
    def running_mean(self) -> Optional[_Floats]: ...
    @property
    def running_var(self) -> Optional[_Floats]: ...
    @property
    def num_batches_tracked(self) -> Optional[int]: ...
    def reset_running_stats(self) -> None: ...

class GroupNorm(_Norm):
    activation: Optional[str]
    channel_axis: int
    num_groups: int
    num_channels: int
    eps: float
    affine: bool
    def __init__(self, num_groups: SupportsIndex, num_channels: SupportsIndex,
                 eps: float = ..., affine: bool = ..., dtype: DTypeLike = ..., *,
                 bias: bool = ..., activation: _Activation = ...,
                 channel_axis: _ChannelAxis = ...) -> None: ...

class InstanceNorm(_RunningStats, _Norm):
    activation: Optional[str]
    channel_axis: int
    num_features: int
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool
    def __init__(self, num_features: SupportsIndex, eps: float = ...,
                 momentum: Optional[float] = ..., affine: bool = ...,
                 track_running_stats: bool = ..., dtype: DTypeLike = ..., *,
                 bias: bool = ..., activation: _Activation = ...,
                 channel_axis: _ChannelAxis = ...) -> None: ...

class BatchNorm(_RunningStats, _Norm):
    activation: Optional[str]
    channel_axis: int
    num_features: int
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool
    def __init__(self, num_features: SupportsIndex, eps: float = ...,
                 momentum: Optional[float] = ..., affine: bool = ...,
                 track_running_stats: bool = ..., dtype: DTypeLike = ..., *,
                 bias: bool = ..., activation: _Activation = ...,
                 channel_axis: _ChannelAxis = ...) -> None: ...

class _RowNorm(_Norm):
    normalized_shape: Tuple[int, ...]
    elementwise_affine: bool
    @overload
    def __call__(self, x: ArrayLike, residual: None = ...) -> _Floats: ...
    @overload
    def __call__(self, x: ArrayLike, residual: ArrayLike) -> Tuple[_Floats, _Floats]: ...
    @overload
    def forward(self, x: ArrayLike, residual: None = ...) -> _Floats: ...
    @overload
    def forward(self, x: ArrayLike, residual: ArrayLike) -> Tuple[_Floats, _Floats]: ...
    def backward(self, dy: ArrayLike, dh: Optional[ArrayLike] = ...) -> _Floats: ...

class LayerNorm(_RowNorm):
    eps: float
    def __init__(self, normalized_shape: Union[SupportsIndex, Sequence[SupportsIndex]],
                 eps: float = ..., elementwise_affine: bool = ..., bias: bool = ...,
                 dtype: DTypeLike = ...) -> None: ...

class RMSNorm(_RowNorm):
    eps: Optional[float]
    def __init__(self, normalized_shape: Union[SupportsIndex, Sequence[SupportsIndex]],
                 eps: Optional[float] = ..., elementwise_affine: bool = ...,
                 dtype: DTypeLike = ...) -> None: ...
