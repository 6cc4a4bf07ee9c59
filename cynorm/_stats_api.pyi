# Type stubs of cynorm's scale-out steps (cynorm/_stats_api.py): partial statistics of
# any op's sets, their exact merge, the apply with given statistics, and BatchNorm's
# backward reduce/apply. x and dy are float32, float64, float16 or bfloat16 arrays;
# statistics and sums are float64; y and dx have x's dtype.
from typing import Any, Iterable, Literal, NamedTuple, Optional, SupportsIndex, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

_Floats = NDArray[np.floating[Any]]
_Stat = NDArray[np.float64]
Sets = Literal["batch", "group", "instance", "layer", "rms"]
Stats = Literal["two_pass", "welford"]


SHORT_RUN: int


class PartialStats(NamedTuple):
    count: _Stat  # type: ignore[assignment]  # the field shadows tuple.count
    mean: _Stat
    m2: _Stat

    def var(self, unbiased: bool = ...) -> _Stat: ...
    def rstd(self, eps: float = ...) -> _Stat: ...
    def stacked(self) -> _Stat: ...


def partial_stats(
    x: ArrayLike, sets: Sets = ..., *, num_groups: Optional[SupportsIndex] = ...,
    normalized_ndim: Optional[SupportsIndex] = ..., stats: Stats = ...
) -> PartialStats: ...
def merge_stats(parts: Iterable[PartialStats]) -> PartialStats: ...
def apply_stats(
    x: ArrayLike, mean: ArrayLike, rstd: ArrayLike, weight: Optional[ArrayLike] = ...,
    bias: Optional[ArrayLike] = ..., sets: Sets = ..., *,
    num_groups: Optional[SupportsIndex] = ..., normalized_ndim: Optional[SupportsIndex] = ...,
    out: Optional[_Floats] = ..., float64_affine: Optional[bool] = ...
) -> _Floats: ...
def batch_norm_backward_reduce(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike
) -> Tuple[_Stat, _Stat]: ...
def batch_norm_backward_apply(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike, sum_dy: ArrayLike,
    sum_dy_xmu: ArrayLike, count: float, weight: Optional[ArrayLike] = ..., *,
    out: Optional[_Floats] = ..., float64_affine: Optional[bool] = ...
) -> _Floats: ...
