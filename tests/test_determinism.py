"""Bitwise identical results for 1, 2 and 3 OpenMP threads, for every op, forward and
backward, on shapes that take the many-sets path (more work items than threads) and the
few-sets path (sets split into chunks whose partial moments are merged in a fixed order);
and threadpoolctl's control over cynorm's OpenMP runtime."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import cynorm
import cynorm._kernels.runtime
import cynorm._kernels.slab  # noqa: F401  (loads the OpenMP runtime)

THREADS = (1, 2, 3)


def across_threads(fn):
    """fn() under 1, 2 and 3 threads; asserts every array result is bitwise equal."""
    results = {}
    for n in THREADS:
        with threadpool_limits(n, user_api="openmp"):
            assert cynorm.get_num_threads() == n
            r = fn()
        results[n] = r if isinstance(r, tuple) else (r,)
    base = results[THREADS[0]]
    for n in THREADS[1:]:
        assert len(results[n]) == len(base)
        for k, (a, b) in enumerate(zip(results[n], base)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert np.array_equal(a, b, equal_nan=True), (
                f"result {k} differs between {THREADS[0]} and {n} threads: max diff "
                f"{np.nanmax(np.abs(a.astype(float) - b.astype(float)))}")
    return base


def data(shape, dtype, seed=0, loc=0.3):
    rng = np.random.default_rng(seed)
    return (loc + rng.standard_normal(shape)).astype(dtype)


GN_CASES = [
    ((1, 4, 128, 128), 1),  # N*G = 1: one big set split into chunks
    ((2, 4, 64, 64), 1),    # N*G = 2
    ((1, 3, 67, 71), 1),    # chunks with an odd remainder
    ((8, 32, 16, 16), 8),   # many sets
    ((2, 6, 4097), 6),      # instance-norm-like sets just over a chunk
]


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("shape,G", GN_CASES)
def test_group_norm_bitwise_identical_across_thread_counts(dtype, shape, G, stats):
    x = data(shape, dtype)
    C = shape[1]
    w, b = data(C, dtype, 1, 1.0), data(C, dtype, 2)
    dy = data(shape, dtype, 3)
    y, mean, rstd = across_threads(
        lambda: cynorm.group_norm(x, G, w, b, return_stats=True, stats=stats))
    across_threads(lambda: cynorm.group_norm_backward(dy, x, mean, rstd, G, w))
    across_threads(lambda: cynorm.group_norm_backward(dy, x, mean, rstd, G))


IN_SHAPES = [(1, 2, 128, 128), (8, 32, 8, 8)]
BN_SHAPES = [(8, 2, 64, 64), (4, 64, 8, 8), (3000, 2), (2, 3, 5000)]
LN_CASES = [((2, 100000), 100000), ((300, 64), 64), ((1, 3, 4099), (3, 4099)), ((5, 3, 7), 7),
            ((5000, 40), 40)]
RMS_CASES = [((2, 100000), 100000), ((300, 64), 64), ((1, 3, 4099), (3, 4099))]


@pytest.mark.parametrize("shape", IN_SHAPES)
def test_instance_norm_bitwise_identical_across_thread_counts(dtype, shape):
    x = data(shape, dtype)
    C = shape[1]
    w, b = data(C, dtype, 1, 1.0), data(C, dtype, 2)
    dy = data(shape, dtype, 3)
    y, mean, rstd = across_threads(
        lambda: cynorm.instance_norm(x, weight=w, bias=b, return_stats=True))
    across_threads(lambda: cynorm.instance_norm_backward(dy, x, mean, rstd, w))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm_bitwise_identical_across_thread_counts(dtype, shape, training):
    x = data(shape, dtype)
    C = shape[1]
    w, b = data(C, dtype, 1, 1.0), data(C, dtype, 2)
    rm0, rv0 = data(C, dtype, 4), np.abs(data(C, dtype, 5)) + 0.5
    dy = data(shape, dtype, 3)

    def forward():
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, training=training,
                                          return_stats=True)
        return y, mean, rstd, rm, rv

    y, mean, rstd, _, _ = across_threads(forward)
    across_threads(lambda: cynorm.batch_norm_backward(dy, x, mean, rstd, w,
                                                      training=training))


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("shape,ns", LN_CASES)
def test_layer_norm_bitwise_identical_across_thread_counts(dtype, shape, ns, stats):
    x = data(shape, dtype)
    nst = (ns,) if isinstance(ns, int) else ns
    w, b = data(nst, dtype, 1, 1.0), data(nst, dtype, 2)
    dy = data(shape, dtype, 3)
    y, mean, rstd = across_threads(
        lambda: cynorm.layer_norm(x, ns, w, b, return_stats=True, stats=stats))
    across_threads(lambda: cynorm.layer_norm_backward(dy, x, mean, rstd, ns, w))


@pytest.mark.parametrize("shape,ns", RMS_CASES)
def test_rms_norm_bitwise_identical_across_thread_counts(dtype, shape, ns):
    x = data(shape, dtype)
    nst = (ns,) if isinstance(ns, int) else ns
    w = data(nst, dtype, 1, 1.0)
    dy = data(shape, dtype, 3)
    y, rstd = across_threads(lambda: cynorm.rms_norm(x, ns, w, return_stats=True))
    across_threads(lambda: cynorm.rms_norm_backward(dy, x, rstd, ns, w))


def test_repeated_calls_are_bitwise_identical():
    # same thread count, same input, same bits (no dependence on scheduling)
    x = data((1, 4, 128, 128), np.float32)
    with threadpool_limits(2, user_api="openmp"):
        first = cynorm.group_norm(x, 1, return_stats=True)
        for _ in range(3):
            again = cynorm.group_norm(x, 1, return_stats=True)
            for a, b in zip(again, first):
                assert np.array_equal(a, b)


def test_threadpoolctl_sees_cynorm_openmp_runtime():
    assert cynorm._kernels.runtime.openmp_enabled(), "cynorm was built without OpenMP"
    openmp = [i for i in threadpool_info() if i.get("user_api") == "openmp"]
    assert openmp, f"no OpenMP runtime found by threadpoolctl: {threadpool_info()}"
    # Other packages may bring their own vendored copy (scikit-learn's libgomp-<hash>);
    # what matters is that the runtime cynorm's extension links is among those
    # threadpoolctl controls.
    ldd = shutil.which("ldd")
    if sys.platform.startswith("linux") and ldd:
        ext = cynorm._kernels.slab.__file__
        lines = subprocess.run([ldd, ext], capture_output=True, text=True).stdout
        linked = [ln.split("=>")[1].split("(")[0].strip() for ln in lines.splitlines()
                  if "omp" in ln and "=>" in ln]
        assert linked, f"{ext} links no OpenMP runtime:\n{lines}"
        paths = {os.path.realpath(i["filepath"]) for i in openmp}
        assert os.path.realpath(linked[0]) in paths, (linked, paths)


def test_get_num_threads_follows_threadpool_limits():
    default = cynorm.get_num_threads()
    assert isinstance(default, int) and default >= 1
    for n in (1, 2, 3, 1):
        with threadpool_limits(n, user_api="openmp"):
            assert cynorm.get_num_threads() == n
    assert cynorm.get_num_threads() == default
