"""`python -m cynorm`: a self-check, and `python -m cynorm bench`: the benchmark.

The benchmark follows DESIGN.md, "Performance method": cynorm, PyTorch (CPU, when
importable) and a plain NumPy reference run side by side, in one process, on the same
arrays; the results are reported as ratios and as achieved GB/s against the copy
bandwidth measured in the same run at the same thread count.

Layout of this module: the suites (data), the three implementations of each op
(cynorm, torch, NumPy), one timing helper, the measurement loop, one table printer,
then the self-check and the command line.
"""
import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import namedtuple

import numpy as np

OPS = ("group_norm", "instance_norm", "batch_norm", "layer_norm", "rms_norm")
ROW_OPS = ("layer_norm", "rms_norm")  # normalized_shape = the last dim
PASSES = ("fwd", "fwd+bwd")
EPS = 1e-5  # rms_norm uses eps=None, i.e. np.finfo(dtype).eps, on every side

# ---- the suites -------------------------------------------------------------------------

# groups is num_groups for group_norm and None for every other op.
Case = namedtuple("Case", "op shape groups")


def _cases(op, shapes, groups=None):
    return [Case(op, s, groups) for s in shapes]


_ROW_SHAPES = [(4096, 768), (512, 4096), (64, 1024), (1, 2**24)]
FULL_SUITE = (
    _cases("group_norm", [(8, 256, 56, 56), (2, 320, 64, 64), (1, 512, 128, 128),
                          (16, 256, 128, 128), (1, 64, 32, 32)], 32)
    + [Case("group_norm", (1, 32, 8, 8), 8)]
    + _cases("instance_norm", [(8, 64, 128, 128), (1, 64, 256, 256)])
    + _cases("batch_norm", [(32, 64, 56, 56), (8, 256, 28, 28), (64, 128, 7, 7)])
    + _cases("layer_norm", _ROW_SHAPES)
    + _cases("rms_norm", _ROW_SHAPES)
)

_QUICK_ROWS = [(64, 1024), (4096, 768)]
QUICK_SUITE = (
    [Case("group_norm", (1, 32, 8, 8), 8)]
    + _cases("group_norm", [(4, 128, 32, 32), (2, 320, 64, 64)], 32)
    + _cases("instance_norm", [(4, 64, 64, 64)])
    + _cases("batch_norm", [(64, 128, 7, 7), (8, 64, 56, 56)])
    + _cases("layer_norm", _QUICK_ROWS)
    + _cases("rms_norm", _QUICK_ROWS)
)

# --tiny (hidden; for the tests): very small shapes, a small copy-bandwidth array.
TINY_SUITE = (
    [Case("group_norm", (2, 8, 4, 4), 2)]
    + _cases("instance_norm", [(2, 4, 5, 5)])
    + _cases("batch_norm", [(4, 3, 5)])
    + _cases("layer_norm", [(8, 16)])
    + _cases("rms_norm", [(8, 16)])
)
TINY_COPY_BYTES = 8 << 20

# Per-call overhead: microseconds for one tiny call.
TINY_CALL = Case("group_norm", (1, 32, 8, 8), 8)


def case_label(case):
    shape = "(" + ",".join(str(d) for d in case.shape) + ")"
    return shape + (f" G={case.groups}" if case.groups is not None else "")


def _param_shape(case):
    return case.shape[-1:] if case.op in ROW_OPS else case.shape[1:2]


# ---- the three implementations of each op ----------------------------------------------

class Missing(Exception):
    """An op that this build of cynorm (or torch) does not provide yet."""


def cynorm_op(cn, case):
    """(forward, backward) for one case, with a uniform signature:
    forward(x, w, b, **kw) -> what the op returns (kw: out=, return_stats=);
    backward(dy, x, stats, w, **kw) -> the gradients (stats: what return_stats gave
    after y)."""
    f = getattr(cn, case.op, None)
    fb = getattr(cn, case.op + "_backward", None)
    if f is None or fb is None:
        raise Missing(f"cynorm.{case.op if f is None else case.op + '_backward'} "
                      "is not available in this build")
    op = case.op
    if op == "group_norm":
        G = case.groups
        return (lambda x, w, b, **kw: f(x, G, w, b, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, G, w, **kw))
    if op == "instance_norm":
        return (lambda x, w, b, **kw: f(x, w, b, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, w, **kw))
    if op == "batch_norm":  # training mode, running statistics updated as users do
        C = case.shape[1]
        rm, rv = np.zeros(C), np.ones(C)
        return (lambda x, w, b, **kw: f(x, rm, rv, w, b, training=True, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, w, training=True, **kw))
    K = case.shape[-1]
    if op == "layer_norm":
        return (lambda x, w, b, **kw: f(x, K, w, b, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, K, w, **kw))
    return (lambda x, w, b, **kw: f(x, K, w, **kw),  # rms_norm: no bias
            lambda dy, x, st, w, **kw: fb(dy, x, *st, K, w, **kw))


def torch_op(torch, case, dtype):
    """forward(x, w, b) on tensors, as torch.nn.functional computes the op."""
    F = torch.nn.functional
    op = case.op
    if op == "group_norm":
        return lambda x, w, b: F.group_norm(x, case.groups, w, b, EPS)
    if op == "instance_norm":
        return lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS)
    if op == "batch_norm":
        C = case.shape[1]
        tdtype = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
        rm, rv = torch.zeros(C, dtype=tdtype), torch.ones(C, dtype=tdtype)
        return lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True, eps=EPS)
    K = (case.shape[-1],)
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, K, w, b, EPS)
    if not hasattr(F, "rms_norm"):
        raise Missing(f"torch {torch.__version__} has no rms_norm")
    return lambda x, w, b: F.rms_norm(x, K, w, eps=None)


def _numpy_geometry(case, shape):
    """How the op sees x: (stats view, stats axes, affine view, weight view shape,
    affine-reduction axes, whether the mean is subtracted)."""
    if case.op in ROW_OPS:
        K = shape[-1]
        return (-1, K), (1,), (-1, K), (1, K), (0,), case.op == "layer_norm"
    N, C = shape[:2]
    G = case.groups if case.op == "group_norm" else C
    axes = (0, 2) if case.op == "batch_norm" else (2,)
    return (N, G, -1), axes, (N, C, -1), (1, C, 1), (0, 2), True


def numpy_forward(case, x, w, b, eps=None):
    """Plain NumPy, in x's dtype: y and what the backward needs (xhat, rstd).
    eps=None: the op's default (rms_norm: np.finfo(x.dtype).eps)."""
    vs, ax, va, wv, _, centred = _numpy_geometry(case, x.shape)
    if eps is None:
        eps = np.finfo(x.dtype).eps if case.op == "rms_norm" else EPS
    xs = x.reshape(vs)
    xc = xs - xs.mean(axis=ax, keepdims=True) if centred else xs
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=ax, keepdims=True) + eps)
    xhat = (xc * rstd).reshape(va)
    y = xhat * w.reshape(wv)
    if b is not None:
        y += b.reshape(wv)
    return y.reshape(x.shape), (xhat, rstd)


def numpy_backward(case, dy, saved, w):
    """dx, dweight, dbias (no dbias for rms_norm), from numpy_forward's saved values:
    dx = rstd * (g - mean_S(g) - xhat * mean_S(g * xhat)), g = dy * weight."""
    xhat, rstd = saved
    vs, ax, va, wv, pax, centred = _numpy_geometry(case, dy.shape)
    dya = dy.reshape(va)
    dw = (dya * xhat).sum(axis=pax).reshape(w.shape)
    g = (dya * w.reshape(wv)).reshape(vs)
    xh = xhat.reshape(vs)
    inner = g - xh * (g * xh).mean(axis=ax, keepdims=True)
    if centred:
        inner -= g.mean(axis=ax, keepdims=True)
    dx = (rstd * inner).reshape(dy.shape)
    if case.op == "rms_norm":
        return dx, dw
    return dx, dw, dya.sum(axis=pax).reshape(w.shape)


def make_arrays(case, dtype, rng):
    """x (with an offset mean), dy, weight, bias (None for rms_norm)."""
    x = rng.standard_normal(case.shape, dtype=dtype)
    x *= 2.0
    x += 0.5
    dy = rng.standard_normal(case.shape, dtype=dtype)
    pshape = _param_shape(case)
    w = (1.0 + 0.1 * rng.standard_normal(pshape)).astype(dtype)
    b = None if case.op == "rms_norm" else (0.1 * rng.standard_normal(pshape)).astype(dtype)
    return x, dy, w, b


# ---- timing ----------------------------------------------------------------------------

def _clock(fn, loops):
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return time.perf_counter() - t0


# GNU OpenMP workers spin-wait for many milliseconds after a parallel region before they
# sleep; torch bundles its own runtime, so right after a torch call its workers would
# compete for the cores with cynorm's (and the other way round).
WARM_SECONDS = 0.05


def _warm(fn):
    """Call fn for WARM_SECONDS (at least once): the other library's workers fall asleep
    and this one's are awake."""
    end = time.perf_counter() + WARM_SECONDS
    fn()
    while time.perf_counter() < end:
        fn()


def time_calls(fns, repeats, min_sample=2e-3, budget=10.0, rounds=3):
    """Median seconds per call of each function in the dict `fns`.

    Calls too short to time alone are looped so that one sample lasts about
    `min_sample`. The functions take turns in `rounds` rounds, each taking its share of
    the `repeats` samples back to back after a warm-up (_warm), so that the noise of a
    shared machine hits all of them alike while neither library's OpenMP workers, still
    spinning after its own calls, steal the cores from the other's samples. A function
    so slow that `repeats` samples would take over `budget` seconds gets fewer (>= 3).
    """
    loops, counts = {}, {}
    for name, fn in fns.items():
        t = _clock(fn, 1)
        if t < min_sample:
            t = _clock(fn, 1)  # the first call also paid for page faults
        loops[name] = max(1, min(100_000, int(min_sample / max(t, 1e-8))))
        counts[name] = min(repeats, max(3, int(budget / max(t, 1e-8))))
    samples = {name: [] for name in fns}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name, fn in fns.items():
                share = -(-counts[name] // rounds)  # ceil
                todo = min(share, counts[name] - len(samples[name]))
                if todo <= 0:
                    continue
                _warm(fn)
                for _ in range(todo):
                    samples[name].append(_clock(fn, loops[name]) / loops[name])
    finally:
        if was_enabled:
            gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


class thread_count:
    """Context: n OpenMP threads for cynorm (threadpoolctl) and for torch."""

    def __init__(self, n, torch=None):
        self.n, self.torch = n, torch

    def __enter__(self):
        from threadpoolctl import threadpool_limits
        self.limits = threadpool_limits(self.n, user_api="openmp")
        if self.torch is not None:
            self.torch_before = self.torch.get_num_threads()
            self.torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.torch is not None:
            self.torch.set_num_threads(self.torch_before)
        self.limits.restore_original_limits()


# ---- machine facts: cache, memory, copy bandwidth --------------------------------------

def _parse_size(text):
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def llc_bytes():
    """Size of the level-3 cache as sysfs reports it for cpu0 (None if unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if entry.startswith("index"):
                with open(os.path.join(base, entry, "level")) as f:
                    if f.read().strip() != "3":
                        continue
                with open(os.path.join(base, entry, "size")) as f:
                    return _parse_size(f.read())
    except (OSError, ValueError):
        pass
    return None


def available_memory():
    """MemAvailable from /proc/meminfo in bytes (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def copy_array_bytes():
    """Bytes of each copy-bandwidth array: max(4 * LLC, 256 MiB), capped at 1 GiB and so
    that the two arrays together take at most 1/4 of the available memory."""
    llc = llc_bytes() or (32 << 20)
    nbytes = min(max(4 * llc, 256 << 20), 1 << 30)
    avail = available_memory()
    if avail is not None:
        nbytes = min(nbytes, avail // 8)
    return nbytes


def copy_bandwidth(thread_counts, nbytes, repeats):
    """GB/s of cynorm's parallel_copy (1 read + 1 write of each byte) per thread count."""
    from cynorm._kernels.runtime import parallel_copy
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    result = {}
    for n in thread_counts:
        with thread_count(n):
            t = time_calls({"copy": lambda: parallel_copy(src, dst)}, max(3, repeats))
        result[n] = 2 * nbytes / t["copy"] / 1e9
    return result


# ---- the measurement loop --------------------------------------------------------------

def bytes_moved(case, itemsize, pass_):
    """Bytes that must cross the memory bus: forward reads x and writes y (2 arrays);
    backward reads dy and x and writes dx (3 more)."""
    n = math.prod(case.shape) * itemsize
    return n * (2 if pass_ == "fwd" else 5)


def _impls(case, cn, torch, x, dy, w, b):
    """{pass: {column: zero-argument callable}} for one case on the given arrays."""
    fwd, bwd = cynorm_op(cn, case)
    y_buf, dx_buf = np.empty_like(x), np.empty_like(x)

    def cy_fwd_bwd():
        y, *stats = fwd(x, w, b, return_stats=True)
        bwd(dy, x, stats, w)

    def cy_fwd_bwd_out():
        y, *stats = fwd(x, w, b, return_stats=True, out=y_buf)
        bwd(dy, x, stats, w, out=dx_buf)

    impls = {
        "fwd": {"cynorm": lambda: fwd(x, w, b),
                "cynorm_out": lambda: fwd(x, w, b, out=y_buf)},
        "fwd+bwd": {"cynorm": cy_fwd_bwd, "cynorm_out": cy_fwd_bwd_out},
    }
    if torch is not None:
        try:
            tf = torch_op(torch, case, x.dtype)
        except Missing:
            tf = None
        if tf is not None:
            t = {k: None if a is None else torch.from_numpy(a) for k, a in
                 (("x", x), ("dy", dy), ("w", w), ("b", b))}
            # leaves sharing memory with x, w, b for the autograd pass
            leaves = [a.detach().requires_grad_() for a in (t["x"], t["w"], t["b"])
                      if a is not None]
            xg, wg, bg = (leaves + [None])[:3]

            def torch_fwd_bwd():
                for leaf in leaves:
                    leaf.grad = None
                tf(xg, wg, bg).backward(t["dy"])

            impls["fwd"]["torch"] = lambda: tf(t["x"], t["w"], t["b"])
            impls["fwd+bwd"]["torch"] = torch_fwd_bwd
    impls["fwd"]["numpy"] = lambda: numpy_forward(case, x, w, b)
    impls["fwd+bwd"]["numpy"] = lambda: numpy_backward(
        case, dy, numpy_forward(case, x, w, b)[1], w)
    return impls


def bench_case(case, dtype, thread_counts, repeats, cn, torch, copy_bw, rng,
               progress=None):
    """One row per (thread count, pass) for one case and dtype. NumPy is single-threaded
    and is timed once, at the first thread count, and reported on every row."""
    x, dy, w, b = make_arrays(case, dtype, rng)
    impls = _impls(case, cn, torch, x, dy, w, b)
    rows, numpy_s = [], {}
    for i, n in enumerate(thread_counts):
        if i == 1:
            for fns in impls.values():
                fns.pop("numpy", None)
        with thread_count(n, torch):
            for pass_ in PASSES:
                if progress:
                    progress.step(f"{case.op} {case_label(case)} {np.dtype(dtype).name} "
                                  f"t={n} {pass_}")
                t = time_calls(impls[pass_], repeats)
                if i == 0:
                    numpy_s[pass_] = t.get("numpy")
                nbytes = bytes_moved(case, np.dtype(dtype).itemsize, pass_)
                gbps = nbytes / t["cynorm"] / 1e9
                rows.append({
                    "op": case.op, "shape": list(case.shape), "groups": case.groups,
                    "dtype": np.dtype(dtype).name, "threads": n, "pass": pass_,
                    "bytes": nbytes,
                    "cynorm_s": t["cynorm"], "cynorm_out_s": t["cynorm_out"],
                    "torch_s": t.get("torch"), "numpy_s": numpy_s[pass_],
                    "torch_over_cynorm": (t["torch"] / t["cynorm"]
                                          if "torch" in t else None),
                    "gbps": gbps,
                    "pct_copy": 100.0 * gbps / copy_bw[n] if n in copy_bw else None,
                })
    return rows


def bandwidth_cases(nbytes):
    """One float32 case per op whose x is nbytes (the copy arrays' size, far larger than
    the last-level cache)."""
    elems = nbytes // 4
    nchw = (max(1, elems // (256 * 64 * 64)), 256, 64, 64)
    rows = (max(1, elems // 1024), 1024)
    return [Case("group_norm", nchw, 32), Case("instance_norm", nchw, None),
            Case("batch_norm", nchw, None), Case("layer_norm", rows, None),
            Case("rms_norm", rows, None)]


def bench_bandwidth(cases, thread_counts, repeats, cn, copy_bw, rng):
    """cynorm alone with out=, forward and backward (given the forward's statistics) on
    arrays far larger than the cache: achieved GB/s and % of the copy bandwidth."""
    rows = []
    for case in cases:
        x, dy, w, b = make_arrays(case, np.float32, rng)
        fwd, bwd = cynorm_op(cn, case)
        y = np.empty_like(x)
        _, *stats = fwd(x, w, b, return_stats=True, out=y)
        fns = {"fwd": lambda: fwd(x, w, b, out=y),
               "bwd": lambda: bwd(dy, x, stats, w, out=y)}
        for n in thread_counts:
            with thread_count(n):
                t = time_calls(fns, max(3, repeats))
            for pass_, arrays in (("fwd", 2), ("bwd", 3)):
                gbps = arrays * x.nbytes / t[pass_] / 1e9
                rows.append({"op": case.op, "shape": list(case.shape),
                             "groups": case.groups, "dtype": "float32", "threads": n,
                             "pass": pass_, "cynorm_out_s": t[pass_], "gbps": gbps,
                             "pct_copy": 100.0 * gbps / copy_bw[n]})
        del x, dy, y, stats
    return rows


# ---- output: one table printer, progress, summary, JSON, plot ---------------------------

def print_table(rows, columns, file=None):
    """Print dict rows as an aligned text table. columns: (header, key or function of
    the row, format spec); a None value prints as '-'."""
    file = file or sys.stdout
    cells = []
    for row in rows:
        line = []
        for _, key, spec in columns:
            v = key(row) if callable(key) else row.get(key)
            line.append("-" if v is None else format(v, spec))
        cells.append(line)
    heads = [h for h, _, _ in columns]
    widths = [max([len(h)] + [len(line[j]) for line in cells]) for j, h in enumerate(heads)]
    left = [spec == "" for _, _, spec in columns]  # text columns align left

    def fmt(line):
        return "  ".join(c.ljust(wd) if lf else c.rjust(wd)
                         for c, wd, lf in zip(line, widths, left)).rstrip()

    print(fmt(heads), file=file)
    print("  ".join("-" * wd for wd in widths), file=file)
    for line in cells:
        print(fmt(line), file=file)


def _ms(key):
    return lambda r: None if r[key] is None else r[key] * 1e3



def _us(key):
    return lambda r: None if r[key] is None else r[key] * 1e6


MAIN_COLUMNS = [
    ("op", "op", ""),
    ("shape", lambda r: case_label(Case(r["op"], tuple(r["shape"]), r["groups"])), ""),
    ("dtype", "dtype", ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("cynorm ms", _ms("cynorm_s"), ".3f"),
    ("out= ms", _ms("cynorm_out_s"), ".3f"),
    ("torch ms", _ms("torch_s"), ".3f"),
    ("numpy ms", _ms("numpy_s"), ".3f"),
    ("torch/cy", "torch_over_cynorm", ".2f"),
    ("GB/s", "gbps", ".1f"),
    ("% copy", "pct_copy", ".0f"),
]

TINY_COLUMNS = [
    ("op", "op", ""),
    ("shape", lambda r: case_label(Case(r["op"], tuple(r["shape"]), r["groups"])), ""),
    ("dtype", "dtype", ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("cynorm us", _us("cynorm_s"), ".1f"),
    ("out= us", _us("cynorm_out_s"), ".1f"),
    ("torch us", _us("torch_s"), ".1f"),
    ("torch/cy", "torch_over_cynorm", ".2f"),
]


BANDWIDTH_COLUMNS = [
    ("op", "op", ""),
    ("shape", lambda r: case_label(Case(r["op"], tuple(r["shape"]), r["groups"])), ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("out= ms", _ms("cynorm_out_s"), ".1f"),
    ("GB/s", "gbps", ".1f"),
    ("% copy", "pct_copy", ".0f"),
]


def geomean_summary(rows, thread_counts):
    """Per op and pass: geometric mean of torch/cynorm at each thread count."""
    out = []
    for op in OPS:
        for pass_ in PASSES:
            line = {"op": op, "pass": pass_}
            for n in thread_counts:
                r = [row["torch_over_cynorm"] for row in rows
                     if row["op"] == op and row["pass"] == pass_ and row["threads"] == n
                     and row["torch_over_cynorm"]]
                line[n] = math.exp(sum(map(math.log, r)) / len(r)) if r else None
            if any(line[n] is not None for n in thread_counts):
                out.append(line)
    return out


class Progress:
    """A one-line text progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total, width=30):
        self.total, self.width, self.done = total, width, 0
        self.enabled = total > 0 and sys.stderr.isatty()

    def step(self, label):
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}")
        sys.stderr.flush()
        self.done += 1

    def close(self):
        if self.enabled:
            sys.stderr.write("\r" + " " * (self.width + 80) + "\r")
            sys.stderr.flush()


def write_plot(path, rows, copy_bw):
    """Roofline-style PNG: achieved GB/s of each case against the bytes it moves, with the
    copy bandwidth of each thread count as a horizontal line. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(PASSES), figsize=(13, 5), sharey=True, squeeze=False)
    threads = sorted({r["threads"] for r in rows})
    colors = {n: f"C{i}" for i, n in enumerate(threads)}
    markers = dict(zip(OPS, "osD^v"))
    for ax, pass_ in zip(axes[0], PASSES):
        for n in threads:
            for op in OPS:
                sel = [r for r in rows if r["pass"] == pass_ and r["threads"] == n
                       and r["op"] == op]
                if not sel:
                    continue
                ax.scatter([r["bytes"] for r in sel], [r["gbps"] for r in sel],
                           color=colors[n], marker=markers[op],
                           label=f"{op}, {n} thr", alpha=0.8)
            if n in copy_bw:
                ax.axhline(copy_bw[n], color=colors[n], linestyle="--", linewidth=1)
                ax.annotate(f"copy, {n} thr: {copy_bw[n]:.1f} GB/s",
                            xy=(0.01, copy_bw[n]), xycoords=("axes fraction", "data"),
                            va="bottom", fontsize=8, color=colors[n])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes moved per call")
        ax.set_title(f"cynorm, {pass_}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("achieved GB/s")
    axes[0][-1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _write_json(path, doc):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


# ---- the benchmark command ---------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def all_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_threads(text):
    out = []
    for item in text.split(","):
        item = item.strip()
        n = all_threads() if item == "all" else int(item)
        if n < 1:
            raise ValueError(f"thread counts must be >= 1, got {n}")
        if n not in out:
            out.append(n)
    return out


Config = namedtuple("Config",
                    "suite_name cases ops dtypes threads repeats copy_bytes bandwidth")


def bench_config(args):
    """The run the options ask for; ValueError on a bad option."""
    suite_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    suite = {"tiny": TINY_SUITE, "quick": QUICK_SUITE, "full": FULL_SUITE}[suite_name]
    ops = list(OPS) if args.ops is None else [o.strip() for o in args.ops.split(",")]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"--ops: unknown op(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(OPS)}")
    dtypes = args.dtypes or ("float32,float64" if suite_name == "full" else "float32")
    dtypes = [d.strip() for d in dtypes.split(",")]
    if not set(dtypes) <= {"float32", "float64"}:
        raise ValueError("--dtypes: float32 and/or float64")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    try:
        threads = parse_threads(args.threads)
    except ValueError as e:
        raise ValueError(f"--threads: {e}") from None
    return Config(suite_name, [c for c in suite if c.op in ops], ops, dtypes, threads,
                  args.repeats or (7 if suite_name == "full" else 3),
                  TINY_COPY_BYTES if args.tiny else copy_array_bytes(), args.bandwidth)


def _meta(cn, torch, cfg):
    from cynorm._kernels.runtime import openmp_enabled
    return {
        "cynorm": cn.__version__, "numpy": np.__version__,
        "torch": torch.__version__ if torch else None, "openmp": openmp_enabled(),
        "python": platform.python_version(), "cpu": _cpu_name(), "cores": all_threads(),
        "llc_bytes": llc_bytes(), "copy_array_bytes": cfg.copy_bytes,
        "suite": cfg.suite_name, "threads": cfg.threads, "dtypes": cfg.dtypes,
        "repeats": cfg.repeats, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_report(rows, tiny_rows, summary, threads):
    print_table(rows, MAIN_COLUMNS)
    print("\nnumpy: plain NumPy in the input dtype, single-threaded, timed once per case. "
          "out= : cynorm writing into preallocated outputs.\nGB/s: bytes that must move "
          "(fwd: read x, write y; bwd: read dy and x, write dx) / cynorm time; "
          "% copy: of the copy bandwidth at the same thread count.")
    if summary:
        print("\ngeometric mean of torch/cynorm (> 1: cynorm is faster)")
        print_table(summary, [("op", "op", ""), ("pass", "pass", "")]
                    + [(f"{n} thr", n, ".2f") for n in threads])
    if tiny_rows:
        print(f"\nper-call overhead: {TINY_CALL.op} {case_label(TINY_CALL)} float32, "
              "microseconds per call")
        print_table(tiny_rows, TINY_COLUMNS)


def run_bench(cfg, json_path=None, plot_path=None):
    import cynorm as cn

    torch = _import_torch()
    skipped = []
    for op in cfg.ops:
        try:
            cynorm_op(cn, Case(op, (2, 2, 2), 1))
        except Missing as e:
            skipped.append(f"{op}: skipped, {e}")
    runnable = [op for op in cfg.ops if not any(s.startswith(op + ":") for s in skipped)]
    cases = [c for c in cfg.cases if c.op in runnable]

    meta = _meta(cn, torch, cfg)
    print(f"cynorm {meta['cynorm']}  numpy {meta['numpy']}  "
          f"torch {meta['torch'] or '(not installed)'}  "
          f"OpenMP {'on' if meta['openmp'] else 'off'}")
    print(f"CPU: {meta['cpu']}, {meta['cores']} usable cores; L3 "
          f"{(meta['llc_bytes'] or 0) >> 20} MiB; threads {cfg.threads}; "
          f"median of {cfg.repeats} repeats")
    for s in skipped:
        print("note: " + s)
    if torch is None:
        print("note: torch is not importable; torch columns are empty")

    copy_bw = copy_bandwidth(cfg.threads, cfg.copy_bytes, cfg.repeats)
    print(f"copy bandwidth (parallel_copy, 2 x {cfg.copy_bytes >> 20} MiB): "
          + ", ".join(f"{n} thr {bw:.1f} GB/s" for n, bw in copy_bw.items()) + "\n")

    rng = np.random.default_rng(0)
    avail = available_memory()
    progress = Progress(len(cases) * len(cfg.dtypes) * len(cfg.threads) * len(PASSES))
    rows = []
    for case in cases:
        for dtype in cfg.dtypes:
            need = 16 * math.prod(case.shape) * np.dtype(dtype).itemsize
            if avail is not None and need > avail:
                skipped.append(f"{case.op} {case_label(case)} {dtype}: skipped, needs "
                               f"~{need >> 20} MiB, {avail >> 20} MiB available")
                continue
            rows += bench_case(case, dtype, cfg.threads, cfg.repeats, cn, torch, copy_bw,
                               rng, progress)
    progress.close()
    tiny_rows = []
    if TINY_CALL.op in runnable and cfg.suite_name != "tiny":
        tiny_rows = bench_case(TINY_CALL, "float32", cfg.threads, max(cfg.repeats, 5),
                               cn, torch, copy_bw, rng)

    bw_rows = []
    if cfg.suite_name == "full" or cfg.bandwidth:
        bw_cases = [c for c in bandwidth_cases(cfg.copy_bytes) if c.op in runnable]
        bw_rows = bench_bandwidth(bw_cases, cfg.threads, cfg.repeats, cn, copy_bw, rng)

    summary = geomean_summary(rows, cfg.threads)
    print_report(rows, tiny_rows, summary, cfg.threads)
    if bw_rows:
        print(f"\nfloat32 arrays of {cfg.copy_bytes >> 20} MiB (as the copy's), out=: GB/s "
              "moved (fwd: x, y; bwd: dy, x, dx) and % of the copy bandwidth")
        print_table(bw_rows, BANDWIDTH_COLUMNS)
    for s in skipped:
        print("note: " + s)
    if json_path:
        _write_json(json_path, {
            "meta": meta,
            "copy_bandwidth_gbps": {str(n): bw for n, bw in copy_bw.items()},
            "results": rows,
            "tiny_call": tiny_rows,
            "bandwidth": bw_rows,
            "summary_geomean_torch_over_cynorm": [
                {k if isinstance(k, str) else f"{k}_threads": v for k, v in s.items()}
                for s in summary],
            "skipped": skipped,
        })
        print(f"\nwrote {json_path}")
    if plot_path:
        if write_plot(plot_path, rows, copy_bw):
            print(f"wrote {plot_path}")
        else:
            print("note: matplotlib is not importable; no plot written "
                  "(pip install matplotlib)")
    return 0


# ---- the self-check ----------------------------------------------------------------------

SELF_CHECK = [
    Case("group_norm", (2, 6, 5, 4), 3),
    Case("instance_norm", (2, 3, 7), None),
    Case("batch_norm", (4, 3, 5), None),
    Case("layer_norm", (6, 33), None),
    Case("rms_norm", (6, 33), None),
]
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}  # relative to max(1, max |reference|)


def check_case(cn, case, dtype, rng):
    """Max abs error of cynorm's forward and backward against a float64 NumPy reference
    computed from the same (dtype-rounded) inputs, and whether it is within tolerance."""
    x, dy, w, b = make_arrays(case, dtype, rng)
    fwd, bwd = cynorm_op(cn, case)
    y, *stats = fwd(x, w, b, return_stats=True)
    got = (y,) + tuple(bwd(dy, x, stats, w))
    f64 = [None if a is None else a.astype(np.float64) for a in (x, dy, w, b)]
    eps = np.finfo(dtype).eps if case.op == "rms_norm" else EPS
    ref_y, saved = numpy_forward(case, f64[0], f64[2], f64[3], eps)
    want = (ref_y,) + numpy_backward(case, f64[1], saved, f64[2])
    err, ok = 0.0, True
    for g, r in zip(got, want):
        e = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        err = max(err, e)
        ok &= g.shape == r.shape and g.dtype == x.dtype and \
            e <= TOLERANCE[dtype] * max(1.0, float(np.max(np.abs(r))))
    return err, bool(ok)


def run_self_check():
    import cynorm as cn
    from cynorm._kernels.runtime import openmp_enabled

    print(f"cynorm {cn.__version__}, numpy {np.__version__}, Python "
          f"{platform.python_version()}")
    omp = "enabled" if openmp_enabled() else "NOT enabled (single-threaded build)"
    print(f"OpenMP: {omp}; threads: {cn.get_num_threads()}")
    available = [op for op in OPS if hasattr(cn, op) and hasattr(cn, op + "_backward")]
    print("ops: " + ", ".join(available))
    print("\nforward + backward against a float64 NumPy reference:")
    rng = np.random.default_rng(1234)
    rows, failed = [], False
    for case in SELF_CHECK:
        if case.op not in available:
            rows.append({"op": case.op, "shape": case_label(case), "dtype": "-",
                         "err": None, "result": "SKIP (not in this build)"})
            continue
        for dtype in ("float32", "float64"):
            try:
                err, ok = check_case(cn, case, dtype, rng)
                result = "PASS" if ok else "FAIL"
            except Exception as e:  # a crash is a failure to report, not to hide
                err, ok, result = None, False, f"FAIL ({type(e).__name__}: {e})"
            failed |= not ok
            rows.append({"op": case.op, "shape": case_label(case), "dtype": dtype,
                         "err": err, "result": result})
    print_table(rows, [("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                       ("max abs err", "err", ".2e"), ("result", "result", "")])
    print("\n" + ("FAIL: some checks failed" if failed else "all checks PASS"))
    return 1 if failed else 0


# ---- command line ------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cynorm",
        description="Without a command: a quick self-check of every op against a NumPy "
                    "reference (exit code 1 on failure).")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("check", help="the self-check (the default)")
    b = sub.add_parser(
        "bench", help="benchmark cynorm against PyTorch (CPU) and NumPy",
        description="Time every op, forward and forward+backward, for cynorm, PyTorch "
                    "(CPU, if importable) and NumPy on the same arrays; report medians, "
                    "torch/cynorm ratios and GB/s against the copy bandwidth.")
    b.add_argument("--quick", action="store_true",
                   help="a reduced suite (float32, 3 repeats), about a minute on 2 cores")
    b.add_argument("--ops", help=f"comma list of ops (default: all of {','.join(OPS)})")
    b.add_argument("--threads", default="1,all",
                   help="comma list of thread counts; 'all' = usable cores (default 1,all)")
    b.add_argument("--dtypes", help="comma list (default float32,float64; "
                                    "--quick: float32)")
    b.add_argument("--repeats", type=int, help="timed repeats per case, median reported "
                                               "(default 7; --quick: 3)")
    b.add_argument("--json", metavar="PATH", help="write all raw medians as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    b.add_argument("--bandwidth", action="store_true",
                   help="also time forward and backward with out= on arrays far larger "
                        "than the cache (always on in the full suite)")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            cfg = bench_config(args)
        except ValueError as e:
            b.error(str(e))
        return run_bench(cfg, args.json, args.plot)
    return run_self_check()
