"""A small typed program using cynorm's public API: CI type-checks it with mypy
(`mypy tests/typed_usage.py`), and tests/test_typing.py runs it. Not a test module."""
from typing import Tuple

import numpy as np
from numpy.typing import NDArray

import cynorm
import cynorm.nn


def normalise_image(x: NDArray[np.float32]) -> Tuple[NDArray[np.float32], NDArray[np.float64]]:
    y, mean, rstd = cynorm.group_norm(x, 2, return_stats=True, stats="welford")
    dx, dw, db = cynorm.group_norm_backward(np.ones_like(y), x, mean, rstd, 2)
    assert dx.dtype == np.float32 and dw.shape == db.shape
    return y, rstd


def rows(x: NDArray[np.float64]) -> NDArray[np.float64]:
    y: NDArray[np.float64] = cynorm.layer_norm(x, x.shape[-1])
    z, rstd = cynorm.rms_norm(y, (x.shape[-1],), return_stats=True)
    dz, dw = cynorm.rms_norm_backward(z, y, rstd, x.shape[-1])
    return z + dz


def from_a_list() -> float:
    y = cynorm.batch_norm([[1.0, 2.0], [3.0, 5.0]], training=True)
    return float(y.sum())


def layers(x: NDArray[np.float32]) -> NDArray[np.floating]:
    layer = cynorm.nn.GroupNorm(2, 4).train()
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    weight = layer.weight
    if weight is not None:
        weight -= 0.1 * layer.grads["weight"]
    bn = cynorm.nn.BatchNorm(4, momentum=None)
    bn.eval()
    return dx + bn(x)


def main() -> None:
    cfg = cynorm.show_config("dicts")
    assert cfg["kernels"]["level"]
    threads: int = cynorm.get_num_threads()
    assert threads >= 1
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    y, rstd = normalise_image(x)
    assert y.shape == x.shape and rstd.shape == (2, 2)
    assert rows(np.ones((3, 5))).shape == (3, 5)
    assert np.isfinite(from_a_list())
    assert layers(x).shape == x.shape


if __name__ == "__main__":
    main()
