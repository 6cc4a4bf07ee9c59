"""Fork safety: a child forked after the parent ran cynorm on 2+ OpenMP threads.

GNU OpenMP's thread pool does not survive fork(): a child entering a parallel region that
its parent's pool served hangs. cynorm marks a forked child (pthread_atfork) and runs
single-threaded there (documented: get_num_threads() == 1 in a forked child). The promise:
the child completes its own cynorm calls, with the parent's results bit for bit, within a
timeout; and get_num_threads() reports 1 there.
"""
import multiprocessing as mp
import os
import select
import signal
import time

import numpy as np
import pytest

import cynorm

threadpoolctl = pytest.importorskip("threadpoolctl")

TIMEOUT_S = 60
PARENT_THREADS = 4

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _inputs():
    """Arrays above cynorm's parallel threshold, so that the parent's calls start the
    OpenMP team (the state a forked child inherits)."""
    rng = np.random.default_rng(5)
    return {
        "x": rng.standard_normal((4, 8, 64, 64)).astype(np.float32),
        "dy": rng.standard_normal((4, 8, 64, 64)).astype(np.float32),
        "x2": rng.standard_normal((2, 3, 70000)),
        "dy2": rng.standard_normal((2, 3, 70000)),
        "w": rng.standard_normal(8).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
        "r": rng.standard_normal((64, 2048)),
        "dr": rng.standard_normal((64, 2048)),
        "wr": rng.standard_normal(2048),
    }


def _all_ops(a):
    """Every op, forward and backward; a list of result arrays."""
    x, dy, w, b = a["x"], a["dy"], a["w"], a["b"]
    res = []
    y, m, r = cynorm.group_norm(x, 4, w, b, return_stats=True)
    res += [y, m, r, *cynorm.group_norm_backward(dy, x, m, r, 4, w)]
    y, m, r = cynorm.group_norm(a["x2"], 1, return_stats=True)
    res += [y, m, r, *cynorm.group_norm_backward(a["dy2"], a["x2"], m, r, 1)]
    y, m, r = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
    res += [y, m, r, *cynorm.instance_norm_backward(dy, x, m, r, w)]
    rm, rv = np.zeros(8), np.ones(8)
    y, m, r = cynorm.batch_norm(x, rm, rv, w, b, training=True, return_stats=True)
    res += [y, m, r, rm, rv, *cynorm.batch_norm_backward(dy, x, m, r, w)]
    y, m, r = cynorm.batch_norm(a["x2"], training=True, return_stats=True)
    res += [y, m, r, *cynorm.batch_norm_backward(a["dy2"], a["x2"], m, r)]
    y, m, r = cynorm.layer_norm(a["r"], 2048, a["wr"], return_stats=True)
    res += [y, m, r, *cynorm.layer_norm_backward(a["dr"], a["r"], m, r, 2048, a["wr"])]
    y, r = cynorm.rms_norm(a["r"], 2048, a["wr"], return_stats=True)
    res += [y, r, *cynorm.rms_norm_backward(a["dr"], a["r"], r, 2048, a["wr"])]
    return res


def _child_work(_=None):
    a = _inputs()
    return cynorm.get_num_threads(), _all_ops(a)


def _parent_results():
    """Run every op in the parent with PARENT_THREADS OpenMP threads (starting the pool)."""
    with threadpoolctl.threadpool_limits(PARENT_THREADS, user_api="openmp"):
        if cynorm.get_num_threads() < 2:
            pytest.skip("cynorm was built without OpenMP")
        res = _all_ops(_inputs())
    # once more with the default thread count, so that the pool the child inherits is
    # the one used last
    _all_ops(_inputs())
    return res


def _compare(child, parent):
    assert len(child) == len(parent)
    for k, (c, p) in enumerate(zip(child, parent)):
        assert np.array_equal(c, p), f"result {k} in the child differs from the parent's"


def test_forked_pool_worker_completes_with_parent_results():
    parent = _parent_results()
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        jobs = [pool.apply_async(_child_work) for _ in range(2)]
        try:
            got = [j.get(timeout=TIMEOUT_S) for j in jobs]
        except mp.TimeoutError:
            pool.terminate()
            pytest.fail(f"forked pool worker did not finish cynorm calls in {TIMEOUT_S} s "
                        f"(hang in the OpenMP runtime after fork?)")
    for nthreads, res in got:
        assert nthreads == 1, f"get_num_threads() in a forked child is {nthreads}, not 1"
        _compare(res, parent)


def _child_entry(conn):
    try:
        nthreads, res = _child_work()
        conn.send(("ok", nthreads, res))
    except BaseException as e:  # report anything, never hang the parent
        conn.send(("error", repr(e), None))
    finally:
        conn.close()


def test_forked_process_completes_with_parent_results():
    parent = _parent_results()
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_entry, args=(send,))
    p.start()
    send.close()
    try:
        if not recv.poll(TIMEOUT_S):
            pytest.fail(f"forked child did not finish its cynorm calls in {TIMEOUT_S} s "
                        f"(hang in the OpenMP runtime after fork?)")
        status, nthreads, res = recv.recv()
    finally:
        p.join(TIMEOUT_S)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
    assert status == "ok", f"child raised {nthreads}"
    assert p.exitcode == 0, f"child exited with {p.exitcode}"
    assert nthreads == 1
    _compare(res, parent)


def test_raw_fork_child_and_grandchild_complete():
    """os.fork() directly (no multiprocessing machinery), twice in a row: the grandchild
    of a process that ran cynorm multi-threaded also completes and gets the right bits."""
    parent = _parent_results()
    digest = [np.ascontiguousarray(r).tobytes() for r in parent]
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r_fd)
            nthreads, res = _child_work()
            ok = nthreads == 1 and [np.ascontiguousarray(r).tobytes() for r in res] == digest
            gpid = os.fork()
            if gpid == 0:  # grandchild
                n2, res2 = _child_work()
                ok2 = n2 == 1 and [np.ascontiguousarray(r).tobytes() for r in res2] == digest
                os._exit(0 if ok2 else 3)
            st = None
            for _ in range(TIMEOUT_S * 10):  # bounded wait for the grandchild
                done, st = os.waitpid(gpid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.1)
            else:
                os.kill(gpid, signal.SIGKILL)
                os.waitpid(gpid, 0)
                st = None
            ok = ok and st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
            os.write(w_fd, b"ok" if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(w_fd)
    ready, _, _ = select.select([r_fd], [], [], TIMEOUT_S)
    try:
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"forked child did not finish in {TIMEOUT_S} s")
        msg = os.read(r_fd, 16)
    finally:
        os.close(r_fd)
        _, st = os.waitpid(pid, 0)
    assert msg == b"ok", "child or grandchild got wrong results or thread count"
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
