# Type stubs of the compiled batched-column kernels (standardize over an interior axis).
# The callers in cynorm._standardize validate every argument: C-contiguous arrays of one
# float dtype.
import numpy as np
from numpy.typing import NDArray

def forward(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None,
            bias: np.ndarray | None, mean: NDArray[np.float64], rstd: NDArray[np.float64],
            B: int, M: int, J: int, eps: float, ddof: float, welford: int) -> None: ...
