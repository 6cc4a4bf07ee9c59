# Type stub of cynorm.standardize (cynorm/_standardize.py). x is float32, float64 or
# float16 (anything array-like is converted; bfloat16 arrays of ml_dtypes, which has no
# dtype stubs, match the overloads taking any array); y has x's dtype; with
# return_stats=True, mean and std over the kept axes are float64.
from typing import Any, Literal, Optional, SupportsIndex, Sequence, Tuple, TypeVar, Union, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

_F = TypeVar("_F", np.float32, np.float64, np.float16)
_Floats = NDArray[np.floating[Any]]
_Stat = NDArray[np.float64]
Axis = Union[None, SupportsIndex, Sequence[SupportsIndex]]


@overload
def standardize(
    x: NDArray[_F], axis: Axis = ..., *, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., ddof: float = ...,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[False] = ...
) -> NDArray[_F]: ...
@overload
def standardize(
    x: NDArray[_F], axis: Axis = ..., *, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., ddof: float = ...,
    out: Optional[NDArray[_F]] = ..., return_stats: Literal[True]
) -> Tuple[NDArray[_F], _Stat, _Stat]: ...
@overload
def standardize(
    x: ArrayLike, axis: Axis = ..., *, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., ddof: float = ...,
    out: Optional[_Floats] = ..., return_stats: Literal[False] = ...
) -> _Floats: ...
@overload
def standardize(
    x: ArrayLike, axis: Axis = ..., *, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., eps: float = ..., ddof: float = ...,
    out: Optional[_Floats] = ..., return_stats: Literal[True]
) -> Tuple[_Floats, _Stat, _Stat]: ...
