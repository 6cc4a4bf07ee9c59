# Type stubs of the compiled channel-family kernels (BatchNorm). The callers in
# cynorm._api validate every argument: C-contiguous arrays of one float dtype.
import numpy as np
from numpy.typing import NDArray

# runs shorter than this take the column path
SHORT_RUN: int


def forward(x: np.ndarray, y: np.ndarray | None, weight: np.ndarray | None,
            bias: np.ndarray | None, mean: NDArray[np.float64],
            rstd: NDArray[np.float64] | None, var: NDArray[np.float64] | None, N: int,
            C: int, HW: int, eps: float, welford: int, training: int, ddof: float = 0.0,
            shift: NDArray[np.float64] | None = None, act: int = 0) -> None: ...
def backward(dy: np.ndarray, x: np.ndarray, dx: np.ndarray, weight: np.ndarray | None,
             dweight: np.ndarray, dbias: np.ndarray, mean: NDArray[np.float64],
             rstd: NDArray[np.float64], N: int, C: int, HW: int, training: int,
             act: int = 0, bias: np.ndarray | None = None,
             gbuf: np.ndarray | None = None) -> None: ...
