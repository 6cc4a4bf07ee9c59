# Type stubs of the compiled channels-last kernels (GroupNorm, InstanceNorm of x of shape
# (N, *spatial, C)). The callers in cynorm._api validate every argument.
import numpy as np
from numpy.typing import NDArray

BN_FORWARD_MIN_C: int
BN_MAX_C: int

def forward(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None,
            bias: np.ndarray | None, mean: NDArray[np.float64], rstd: NDArray[np.float64],
            N: int, HW: int, C: int, G: int, eps: float, welford: int,
            act: int = 0, var: NDArray[np.float64] | None = None) -> None: ...
def backward(dy: np.ndarray, x: np.ndarray, dx: np.ndarray, weight: np.ndarray | None,
             dweight: np.ndarray, dbias: np.ndarray, mean: NDArray[np.float64],
             rstd: NDArray[np.float64], N: int, HW: int, C: int, G: int, act: int = 0,
             bias: np.ndarray | None = None, gbuf: np.ndarray | None = None) -> None: ...
