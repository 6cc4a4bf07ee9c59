# Type stubs of the compiled scale-out kernels (partial statistics, merge, applies with
# given statistics). The callers in cynorm._stats_api validate every argument.
import numpy as np
from numpy.typing import NDArray

def moments(x: np.ndarray, out: NDArray[np.float64], A: int, K: int, B: int,
            bounds: NDArray[np.intp], per_sample: int, centered: int,
            welford: int) -> None: ...
def merge(parts: NDArray[np.float64], out: NDArray[np.float64], P: int, S: int) -> None: ...
def apply(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None,
          bias: np.ndarray | None, mean: NDArray[np.float64], rstd: NDArray[np.float64],
          A: int, K: int, B: int, gidx: NDArray[np.intp], G: int, per_sample: int,
          elementwise: int, wide: int) -> None: ...
def grad_sums(dy: np.ndarray, x: np.ndarray, mean: NDArray[np.float64],
              out: NDArray[np.float64], A: int, K: int, B: int) -> None: ...
def grad_apply(dy: np.ndarray, x: np.ndarray, dx: np.ndarray, weight: np.ndarray | None,
               mean: NDArray[np.float64], rstd: NDArray[np.float64],
               sums: NDArray[np.float64], count: float, A: int, K: int, B: int,
               wide: int) -> None: ...
