# Type stubs of the compiled row-family kernels (LayerNorm, RMSNorm). The callers in
# cynorm._api validate every argument: C-contiguous arrays of one float dtype.
import numpy as np
from numpy.typing import NDArray

def forward(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None,
            bias: np.ndarray | None, mean: NDArray[np.float64], rstd: NDArray[np.float64],
            R: int, K: int, eps: float, welford: int, rms: int,
            ddof: float = 0.0, residual: np.ndarray | None = None,
            h: np.ndarray | None = None) -> None: ...
def backward(dy: np.ndarray, x: np.ndarray, dx: np.ndarray, weight: np.ndarray | None,
             dweight: np.ndarray, dbias: np.ndarray | None,
             mean: NDArray[np.float64] | None, rstd: NDArray[np.float64], R: int, K: int,
             rms: int) -> None: ...
def convert(src: np.ndarray, dst: np.ndarray) -> None: ...
