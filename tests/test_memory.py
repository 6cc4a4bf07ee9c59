"""No temporary as large as the input: a call's peak extra memory is its outputs plus
small workspaces (per-set statistics, per-block partial sums of at most 1/8 of a float32
input). tracemalloc sees NumPy's allocations."""

import numpy as np
import pytest

import cynorm
from peak_memory import extra_memory

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_peak_extra_memory_is_outputs_plus_small_workspace(name, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPES[name]).astype(dtype)
    dy = rng.standard_normal(SHAPES[name]).astype(dtype)
    for call in _calls(name, x, dy):
        extra, _ = extra_memory(call)
        assert extra <= x.nbytes // 8 + 64 * 1024, (name, extra, x.nbytes)


# ---- BatchNorm's column path (short runs) and empty batches ------------------------------

@pytest.mark.parametrize("shape", [(2, 4 * 10**7), (2, 10**6, 3), (65, 10**5),
                                   (130, 3000, 5), (200, 7, 63)], ids=str)
def test_batch_norm_column_path_scratch_is_within_an_eighth_of_the_input(shape):
    """Short runs (HW < 64): one row block (N < 128, e.g. a batch of 2 over 4e7
    features: 320 MB) and several; training forward with its statistics, eval forward,
    and the backward in both modes. Scratch beyond the outputs: at most 1/8 of x."""
    x = np.ones(shape, np.float32)
    x[1::2] = 2
    C = shape[1]
    limit = x.nbytes // 8 + 64 * 1024
    extra, (y, m, r) = extra_memory(lambda: cynorm.batch_norm(x, training=True,
                                                              return_stats=True))
    assert extra <= limit, ("training forward", extra, x.nbytes)
    del y
    rm, rv = np.zeros(C), np.ones(C)
    extra, y = extra_memory(lambda: cynorm.batch_norm(x, rm, rv))
    assert extra <= limit, ("eval forward", extra, x.nbytes)
    del y
    for training in (True, False):
        extra, g = extra_memory(lambda: cynorm.batch_norm_backward(x, x, m, r,
                                                                   training=training))
        assert extra <= limit, ("backward", training, extra, x.nbytes)
        del g


@pytest.mark.parametrize("shape", [(2, 4 * 10**6), (2, 10**5, 3), (130, 3000, 5),
                                   (200, 7, 63)], ids=str)
def test_standardize_on_the_column_path_scratch_is_within_an_eighth_of_the_input(shape):
    """standardize over all axes but 1 of a short-run array (BatchNorm's column path,
    with ddof and the shifted moments): beyond y, mean and rstd at most 1/8 of x, also
    for a batch of 2 over millions of columns (no per-column partials or
    coefficients)."""
    x = np.ones(shape, np.float32)
    x[1::2] = 2
    axis = (0,) + tuple(range(2, x.ndim))
    limit = x.nbytes // 8 + 64 * 1024
    for ddof in (0, 1):
        extra, (y, m, s) = extra_memory(lambda: cynorm.standardize(x, axis, ddof=ddof,
                                                                   return_stats=True))
        assert extra <= limit, (ddof, extra, x.nbytes)
        np.testing.assert_allclose(y[0], -np.sqrt(1 - ddof / (x.size // m.size)),
                                   rtol=1e-6)
        del y


@pytest.mark.parametrize("shape", [(0, 10**6, 63), (0, 10**7, 63)], ids=str)
def test_batch_norm_of_an_empty_batch_allocates_nothing(shape):
    """No elements: the call returns at once with an empty y, allocating no per-column
    scratch (10**7 channels of 63 columns would be gigabytes), and the running
    statistics are unchanged."""
    C = shape[1]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    x = np.empty(shape, np.float32)
    for training in (False, True):
        extra, y = extra_memory(lambda: cynorm.batch_norm(x, rm, rv, training=training))
        assert y.shape == shape and extra <= 64 * 1024, (training, extra)
    assert not rm.any() and (rv == 1).all()
    m, r = np.zeros(C), np.ones(C)
    extra, g = extra_memory(lambda: cynorm.batch_norm_backward(x, x, m, r))
    assert g[0].shape == shape and extra <= 64 * 1024, extra


@pytest.mark.parametrize("shape", [(40, 100000), (33, 50000), (200000, 2)], ids=str)
def test_layer_norm_backward_scratch_is_within_an_eighth_of_the_input(shape):
    """Row counts just above a multiple of 32 (a partial last sub-block of rows) and
    very short rows (per-row sums would be 4x the input): at most 1/8 of x beyond the
    outputs."""
    x = np.ones(shape, np.float32)
    x[:, ::2] = 2
    K = shape[1]
    _, m, r = cynorm.layer_norm(x, K, return_stats=True)
    for rms in (False, True):
        if rms:
            call = lambda: cynorm.rms_norm_backward(x, x, r, K, np.ones(K, np.float32))  # noqa: E731
        else:
            call = lambda: cynorm.layer_norm_backward(x, x, m, r, K)  # noqa: E731
        extra, _ = extra_memory(call)
        assert extra <= x.nbytes // 8 + 64 * 1024, (rms, extra, x.nbytes)


@pytest.mark.parametrize("shape", [(4096, 256), (1000, 64, 2), (300, 6, 3)], ids=str)
def test_group_norm_backward_with_short_runs_is_within_an_eighth_of_the_input(shape):
    """GroupNorm and InstanceNorm over (N, C) features or tiny spatial maps: two float64
    sums per (n, c) run would be 2 to 4 times a float32 input; the batch is done in
    chunks instead."""
    x = np.ones(shape, np.float32)
    x[::2] = 2
    C = shape[1]
    for G in (2, C):
        _, m, r = cynorm.group_norm(x, G, return_stats=True)
        extra, _ = extra_memory(lambda: cynorm.group_norm_backward(x, x, m, r, G))
        assert extra <= x.nbytes // 8 + 64 * 1024, (G, extra, x.nbytes)
