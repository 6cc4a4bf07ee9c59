"""No temporary as large as the input: a call's peak extra memory is its outputs plus
small workspaces (per-set statistics, per-block partial sums of at most 1/8 of a float32
input). tracemalloc sees NumPy's allocations."""
import tracemalloc

import numpy as np
import pytest

import cynorm

SHAPES = {
    "group_norm": (4, 64, 32, 32),
    "instance_norm": (4, 64, 32, 32),
    "batch_norm": (8, 32, 32, 32),
    "batch_norm_features": (4096, 64),
    "layer_norm": (2048, 128),
    "layer_norm_long": (2, 131072),
    "rms_norm": (2048, 128),
}


def _calls(name, x, dy):
    C = x.shape[1]
    K = x.shape[-1]
    w = np.ones(C if name.startswith(("group", "instance", "batch")) else K, x.dtype)
    if name == "group_norm":
        _, m, r = cynorm.group_norm(x, 8, w, w, return_stats=True)
        return [lambda: cynorm.group_norm(x, 8, w, w, return_stats=True),
                lambda: cynorm.group_norm_backward(dy, x, m, r, 8, w)]
    if name == "instance_norm":
        _, m, r = cynorm.instance_norm(x, weight=w, bias=w, return_stats=True)
        return [lambda: cynorm.instance_norm(x, weight=w, bias=w, return_stats=True),
                lambda: cynorm.instance_norm_backward(dy, x, m, r, w)]
    if name.startswith("batch_norm"):
        rm, rv = np.zeros(C), np.ones(C)
        _, m, r = cynorm.batch_norm(x, rm, rv, w, w, training=True, return_stats=True)
        return [lambda: cynorm.batch_norm(x, rm, rv, w, w, training=True,
                                          return_stats=True),
                lambda: cynorm.batch_norm(x, rm, rv, w, w, training=False),
                lambda: cynorm.batch_norm_backward(dy, x, m, r, w)]
    if name.startswith("layer_norm"):
        _, m, r = cynorm.layer_norm(x, K, w, w, return_stats=True)
        return [lambda: cynorm.layer_norm(x, K, w, w, return_stats=True),
                lambda: cynorm.layer_norm_backward(dy, x, m, r, K, w)]
    _, r = cynorm.rms_norm(x, K, w, return_stats=True)
    return [lambda: cynorm.rms_norm(x, K, w, return_stats=True),
            lambda: cynorm.rms_norm_backward(dy, x, r, K, w)]


def _nbytes(result):
    if isinstance(result, tuple):
        return sum(a.nbytes for a in result)
    return result.nbytes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_peak_extra_memory_is_outputs_plus_small_workspace(name, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPES[name]).astype(dtype)
    dy = rng.standard_normal(SHAPES[name]).astype(dtype)
    for call in _calls(name, x, dy):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            result = call()
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        extra = peak - _nbytes(result)
        assert extra <= x.nbytes // 8 + 64 * 1024, (name, extra, x.nbytes)
