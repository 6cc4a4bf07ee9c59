"""No leaks: 10,000 calls of each op, and of each error path, leave resident memory flat.

Arrays are sized so that leaking any one array per call (the output, a statistic, a
work buffer, a converted copy of an input) would grow resident memory by well over the
bound: every array a call allocates is at least 4 KiB, so 10,000 leaked ones are 40 MB.
Free heap memory is returned to the OS before measuring (malloc_trim), so memory freed
by earlier tests cannot hide a leak. A second, finer check counts the Python objects and
NumPy buffers still allocated (tracemalloc) after the calls, in two windows (a leak grows
in both): under 1 MB per 10,000 calls, i.e. no more than ~100 bytes per call.
Skipped under the sanitizer build (ASan's quarantine holds freed memory on purpose).
"""
import ctypes
import ctypes.util
import gc
import os
import tracemalloc

import numpy as np
import pytest

import cynorm

CALLS = 10_000
WARMUP = 1_000
BOUND_MB = 20.0          # resident memory
TRACED_BOUND_MB = 1.0    # Python objects and NumPy buffers (tracemalloc)

pytestmark = pytest.mark.skipif(os.environ.get("CYNORM_SANITIZED") == "1",
                                reason="RSS is meaningless under AddressSanitizer")


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    pytest.skip("no VmRSS in /proc/self/status")


def _release_free_heap():
    """Give free heap memory back to the OS (glibc), so that memory freed by earlier
    tests cannot absorb a leak: after this, a leak needs fresh resident pages."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _growth_mb(call):
    """(RSS growth, tracemalloc growth) in MB over CALLS calls, after a warmup."""
    for _ in range(WARMUP):
        call()
    _release_free_heap()
    before = _rss_mb()
    for _ in range(CALLS):
        call()
    _release_free_heap()
    rss = _rss_mb() - before
    # traced: two windows of CALLS // 2 calls; a leak grows in both, a cache that fills
    # up once (NumPy and CPython have a few) in at most one
    tracemalloc.start()
    try:
        for _ in range(WARMUP):
            call()
        growth = []
        for _ in range(2):
            gc.collect()
            t0 = tracemalloc.get_traced_memory()[0]
            for _ in range(CALLS // 2):
                call()
            gc.collect()
            growth.append((tracemalloc.get_traced_memory()[0] - t0) / 2**20)
        traced = 2 * min(growth)
    finally:
        tracemalloc.stop()
    return rss, traced


rng = np.random.default_rng(0)
# slab / channel: (N, C, HW) with N * G and C * ... statistics of 512 doubles (4 KiB)
X = rng.standard_normal((64, 8, 4))          # 16 KiB; group/instance stats (64, G)
DY = rng.standard_normal(X.shape)
W8 = rng.standard_normal(8)
XB = rng.standard_normal((4, 512))           # batch norm: 512 channels, 4 KiB stats
DYB = rng.standard_normal(XB.shape)
W512 = rng.standard_normal(512)
XR = rng.standard_normal((512, 8))           # rows: 512 rows, 4 KiB stats
DYR = rng.standard_normal(XR.shape)
W_R = rng.standard_normal(8)
_, M8, R8 = cynorm.group_norm(X, 8, return_stats=True)
_, MI, RI = cynorm.instance_norm(X, return_stats=True)
_, MB, RB = cynorm.batch_norm(XB, training=True, return_stats=True)
_, ML, RL = cynorm.layer_norm(XR, 8, return_stats=True)
_, RR = cynorm.rms_norm(XR, 8, return_stats=True)
RM, RV = np.zeros(512), np.ones(512)
X_F = np.asfortranarray(X)                   # converted (copied) on every call
X32 = X.astype(np.float32)

OPS = {
    "group_norm": lambda: cynorm.group_norm(X, 8, W8, W8, return_stats=True),
    "group_norm_fortran_welford": lambda: cynorm.group_norm(X_F, 8, stats="welford"),
    "group_norm_out_x": lambda: cynorm.group_norm(X32, 8, out=X32),
    "group_norm_backward": lambda: cynorm.group_norm_backward(DY, X, M8, R8, 8, W8),
    "instance_norm": lambda: cynorm.instance_norm(X, weight=W8, bias=W8, return_stats=True),
    "instance_norm_backward": lambda: cynorm.instance_norm_backward(DY, X, MI, RI, W8),
    "batch_norm_train": lambda: cynorm.batch_norm(XB, RM, RV, W512, W512, training=True,
                                                  return_stats=True),
    "batch_norm_eval": lambda: cynorm.batch_norm(XB, RM, RV, W512, return_stats=True),
    "batch_norm_backward": lambda: cynorm.batch_norm_backward(DYB, XB, MB, RB, W512),
    "layer_norm": lambda: cynorm.layer_norm(XR, 8, W_R, W_R, return_stats=True),
    "layer_norm_backward": lambda: cynorm.layer_norm_backward(DYR, XR, ML, RL, 8, W_R),
    "rms_norm": lambda: cynorm.rms_norm(XR, 8, W_R, return_stats=True),
    "rms_norm_backward": lambda: cynorm.rms_norm_backward(DYR, XR, RR, 8, W_R),
    "get_num_threads": cynorm.get_num_threads,
}


def _raises(call):
    def run():
        try:
            call()
        except (TypeError, ValueError):
            return
        raise AssertionError("expected TypeError or ValueError")
    return run


_RO = np.zeros(512)
_RO.setflags(write=False)
_OVERLAP = np.zeros(X.size + 1)

ERRORS = {
    "num_groups_not_dividing": lambda: cynorm.group_norm(X_F, 3),
    "x_int16": lambda: cynorm.group_norm(X.astype(np.int16), 8),
    "x_int_list": lambda: cynorm.layer_norm([[1, 2], [3, 4]], 2),
    "weight_shape": lambda: cynorm.group_norm(X, 8, np.ones(7)),
    "eps_negative": lambda: cynorm.instance_norm(X_F, eps=-1.0),
    "stats_name": lambda: cynorm.group_norm(X, 8, stats="nope"),
    "out_dtype": lambda: cynorm.group_norm(X, 8, out=X32),
    "out_partial_overlap": lambda: cynorm.group_norm(
        _OVERLAP[:-1].reshape(X.shape), 8, out=_OVERLAP[1:].reshape(X.shape)),
    "dy_dtype": lambda: cynorm.group_norm_backward(X32, X, M8, R8, 8),
    "mean_shape": lambda: cynorm.instance_norm_backward(DY, X, M8[:, :4], RI),
    "running_read_only": lambda: cynorm.batch_norm(XB, _RO, RV, training=True),
    "running_missing_eval": lambda: cynorm.batch_norm(XB),
    "one_value_per_channel": lambda: cynorm.batch_norm(XB[:1], training=True),
    "normalized_shape_mismatch": lambda: cynorm.layer_norm(XR, 9),
    "rms_weight_dtype": lambda: cynorm.rms_norm(XR, 8, np.ones(8, np.int64)),
    "backward_normalized_shape": lambda: cynorm.rms_norm_backward(DYR, XR, RR, (3,)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_calls_do_not_grow_resident_memory(name):
    rss, traced = _growth_mb(OPS[name])
    assert rss < BOUND_MB, f"{name}: RSS grew {rss:.1f} MB over {CALLS} calls"
    assert traced < TRACED_BOUND_MB, f"{name}: {traced:.2f} MB of Python/NumPy " \
                                     f"allocations kept over {CALLS} calls"


@pytest.mark.parametrize("name", list(ERRORS))
def test_error_paths_do_not_grow_resident_memory(name):
    rss, traced = _growth_mb(_raises(ERRORS[name]))
    assert rss < BOUND_MB, f"{name}: RSS grew {rss:.1f} MB over {CALLS} failing calls"
    assert traced < TRACED_BOUND_MB, f"{name}: {traced:.2f} MB of Python/NumPy " \
                                     f"allocations kept over {CALLS} failing calls"
