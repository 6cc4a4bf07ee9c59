"""Concurrency: many Python threads calling cynorm at once.

The promise: 8 Python threads, each calling every op (forward and backward) on its own
arrays for a bounded number of iterations, get bitwise the results of the same calls made
serially, and never deadlock. Each call releases the GIL and may start its own OpenMP team
(arrays here are above the size at which cynorm goes parallel), so the threads really run
the kernels concurrently.
"""
import threading

import numpy as np
import pytest

import cynorm

N_THREADS = 8
ITERATIONS = 10
JOIN_TIMEOUT_S = 120.0


def _inputs(seed, dtype):
    """One thread's arrays. Sizes: above cynorm's parallel threshold (65536 elements),
    with a mix of many small sets (fused kernels) and few large ones (split kernels)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) * 3 + 1).astype(dtype)  # noqa: E731
    return {
        "x4": f(4, 8, 48, 48),       # group/instance/batch norm, 73728 elements
        "x_few": f(1, 2, 40000),     # few large sets: the split paths
        "x_rows": f(96, 768),        # layer/rms norm, many rows
        "x_long": f(2, 40000),       # two long rows: the split row path
        "dy4": f(4, 8, 48, 48),
        "dy_few": f(1, 2, 40000),
        "dy_rows": f(96, 768),
        "dy_long": f(2, 40000),
        "w8": f(8), "b8": f(8), "w2": f(2), "b2": f(2),
        "w768": f(768), "b768": f(768), "w40k": f(40000), "b40k": f(40000),
        "rm8": rng.standard_normal(8), "rv8": rng.random(8) + 0.5,
    }


def _run_all(a):
    """Every public op, forward and backward, on the arrays of one thread; returns a flat
    list of result arrays in a fixed order."""
    out = []
    for x, dy, w, b, G in [(a["x4"], a["dy4"], a["w8"], a["b8"], 4),
                           (a["x_few"], a["dy_few"], a["w2"], a["b2"], 1)]:
        y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True)
        out += [y, m, r, *cynorm.group_norm_backward(dy, x, m, r, G, w)]
        y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, stats="welford")
        out += [y, m, r]
        y, m, r = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
        out += [y, m, r, *cynorm.instance_norm_backward(dy, x, m, r, w)]
    x, dy = a["x4"], a["dy4"]
    rm, rv = a["rm8"].copy(), a["rv8"].copy()
    y, m, r = cynorm.batch_norm(x, rm, rv, a["w8"], a["b8"], training=True,
                                return_stats=True)
    out += [y, m, r, rm, rv, *cynorm.batch_norm_backward(dy, x, m, r, a["w8"])]
    y, m, r = cynorm.batch_norm(x, a["rm8"], a["rv8"], a["w8"], a["b8"], return_stats=True)
    out += [y, *cynorm.batch_norm_backward(dy, x, m, r, a["w8"], training=False)]
    x2, dy2 = a["x_few"].reshape(2, 40000), a["dy_few"].reshape(2, 40000)
    y, m, r = cynorm.batch_norm(x2, training=True, return_stats=True)
    out += [y, m, r, *cynorm.batch_norm_backward(dy2, x2, m, r)]
    for x, dy, w, b, K in [(a["x_rows"], a["dy_rows"], a["w768"], a["b768"], 768),
                           (a["x_long"], a["dy_long"], a["w40k"], a["b40k"], 40000)]:
        y, m, r = cynorm.layer_norm(x, K, w, b, return_stats=True)
        out += [y, m, r, *cynorm.layer_norm_backward(dy, x, m, r, K, w)]
        y, r = cynorm.rms_norm(x, K, w, return_stats=True)
        out += [y, r, *cynorm.rms_norm_backward(dy, x, r, K, w)]
        # in place: out=x on a private copy
        xc = x.copy()
        cynorm.layer_norm(xc, K, w, b, out=xc)
        out.append(xc)
    return out


def _run_threads(target, n):
    """Start n threads on target(i), release them together, join with a timeout.
    Returns the errors raised in the threads; fails when one is still alive (deadlock)."""
    barrier = threading.Barrier(n)
    errors = []

    def body(i):
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            target(i)
        except BaseException as e:  # reported in the main thread
            errors.append((i, e))

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {JOIN_TIMEOUT_S} s (deadlock?): {alive}"
    return errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_concurrent_threads_give_bitwise_serial_results(dtype):
    inputs = [_inputs(1000 + i, dtype) for i in range(N_THREADS)]
    serial = [_run_all(a) for a in inputs]
    mismatches = []

    def work(i):
        for it in range(ITERATIONS):
            got = _run_all(inputs[i])
            for k, (g, s) in enumerate(zip(got, serial[i])):
                if not np.array_equal(g, s, equal_nan=True):
                    mismatches.append((i, it, k))

    errors = _run_threads(work, N_THREADS)
    assert not errors, f"exceptions in threads: {errors[:3]}"
    assert not mismatches, f"results differ from the serial ones (thread, iteration, " \
                           f"result index): {mismatches[:10]}"


def test_concurrent_threads_sharing_read_only_inputs():
    """All threads read the same (read-only) arrays and write their own outputs."""
    a = _inputs(7, np.float32)
    for v in a.values():
        v.setflags(write=False)
    x, dy, w, b = a["x4"], a["dy4"], a["w8"], a["b8"]
    y0, m0, r0 = cynorm.group_norm(x, 2, w, b, return_stats=True)
    g0 = cynorm.group_norm_backward(dy, x, m0, r0, 2, w)
    l0 = cynorm.layer_norm(a["x_rows"], 768, a["w768"], a["b768"])
    bad = []

    def work(i):
        out = np.empty_like(x)
        for _ in range(ITERATIONS * 2):
            y = cynorm.group_norm(x, 2, w, b, out=out)
            g = cynorm.group_norm_backward(dy, x, m0, r0, 2, w)
            ln = cynorm.layer_norm(a["x_rows"], 768, a["w768"], a["b768"])
            if not (np.array_equal(y, y0) and all(np.array_equal(p, q) for p, q in zip(g, g0))
                    and np.array_equal(ln, l0)):
                bad.append(i)

    errors = _run_threads(work, N_THREADS)
    assert not errors, f"exceptions in threads: {errors[:3]}"
    assert not bad, f"threads {sorted(set(bad))} got results differing from the serial ones"


def test_concurrent_threads_with_errors_and_valid_calls():
    """Threads that raise (bad arguments) interleaved with threads that compute: errors
    stay in their thread, the others' results are unaffected, nothing hangs."""
    a = _inputs(11, np.float64)
    ref = cynorm.instance_norm(a["x4"], weight=a["w8"], bias=a["b8"])
    bad = []

    def work(i):
        for _ in range(ITERATIONS * 4):
            if i % 2:
                for call in (lambda: cynorm.group_norm(a["x4"], 3),
                             lambda: cynorm.layer_norm(a["x_rows"], 5),
                             lambda: cynorm.batch_norm(a["x4"]),
                             lambda: cynorm.instance_norm(a["x4"].astype(np.int32))):
                    try:
                        call()
                        bad.append((i, "no error"))
                    except (TypeError, ValueError):
                        pass
            else:
                y = cynorm.instance_norm(a["x4"], weight=a["w8"], bias=a["b8"])
                if not np.array_equal(y, ref):
                    bad.append((i, "result"))

    errors = _run_threads(work, N_THREADS)
    assert not errors, f"unexpected exceptions in threads: {errors[:3]}"
    assert not bad, bad[:5]
