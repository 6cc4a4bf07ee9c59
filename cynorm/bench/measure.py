"""The measurement loop: each case at each thread count and pass, and the out-of-cache
bandwidth cases."""
import math

import numpy as np

from cynorm.bench.anchors import CaseAnchors
from cynorm.bench.impls import _impls, cynorm_op
from cynorm.bench.suite import PASSES, Case, case_label, make_arrays
from cynorm.bench.timing import thread_count, time_calls


def bytes_moved(case, itemsize, pass_):
    """Bytes that must cross the memory bus: forward reads x and writes y (2 arrays);
    backward reads dy and x and writes dx (3 more)."""
    n = math.prod(case.shape) * itemsize
    return n * (2 if pass_ == "fwd" else 5)


# A measurement is reported as unstable, and kept out of the ratios and the summary,
# when the medians of its timing rounds differ by more than this factor, or when a case
# on several threads takes more than MAX_SLOWDOWN times its 1-thread time (the machine
# was busy: more threads never make a kernel that much slower).
UNSTABLE_SPREAD = 2.0
MAX_SLOWDOWN = 5.0


def _instability(spreads, row, first):
    """Why this row's times cannot be trusted, or None. first: the row of the same case
    and pass at the first thread count (None for the first)."""
    why = [f"{lib} rounds {s:.1f}x apart" for lib, s in sorted(spreads.items())
           if lib in ("cynorm", "torch") and s > UNSTABLE_SPREAD]
    if first is not None and first["threads"] == 1:
        for lib in ("cynorm", "torch"):
            t, t1 = row.get(f"{lib}_s"), first.get(f"{lib}_s")
            if t and t1 and t > MAX_SLOWDOWN * t1:
                why.append(f"{lib} {row['threads']} threads {t / t1:.0f}x slower than 1")
    return "unstable: " + ", ".join(why) if why else None


def anchor_fields(t, anchor_keys, graphs=None):
    """The row's anchor cells from the timings t (seconds by column key): `<key>_s` and
    `<key>_over_cynorm` (None where the anchor has no time for this row)."""
    out = {}
    for key in anchor_keys:
        s = t.get(key)
        out[f"{key}_s"] = s
        out[f"{key}_over_cynorm"] = s / t["cynorm"] if s and t.get("cynorm") else None
        if graphs and key in graphs:
            out[f"{key}_graph"] = graphs[key]
    return out


def bench_case(case, dtype, thread_counts, repeats, cn, torch, copy_bw, rng,
               progress=None, anchors=(), notes=None, with_numpy=True):
    """One row per (thread count, pass) for one case and dtype. NumPy is single-threaded
    and is timed once, at the first thread count, and reported on every row.
    anchors: the keys of the optional anchors to time beside (cynorm.bench.anchors),
    each checked against the float64 reference first; notes: a list that receives why
    an anchor has no cell; with_numpy=False leaves NumPy out."""
    x, dy, w, b = make_arrays(case, dtype, rng)
    impls = _impls(case, cn, torch, x, dy, w, b)
    if not with_numpy:
        for fns in impls.values():
            fns.pop("numpy", None)
    extra = CaseAnchors(case, x, dy, w, b, anchors) if anchors else None
    rows, numpy_s = [], {}
    for i, n in enumerate(thread_counts):
        if i == 1:
            for fns in impls.values():
                fns.pop("numpy", None)
        with thread_count(n, torch):
            anchor_calls = extra.calls(n) if extra else {}
            for pass_ in PASSES:
                if progress:
                    progress.step(f"{case.op} {case_label(case)} {np.dtype(dtype).name} "
                                  f"t={n} {pass_}")
                spreads = {}
                t = time_calls({**impls[pass_], **anchor_calls.get(pass_, {})}, repeats,
                               spreads=spreads)
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
                    "spread": spreads,
                    **anchor_fields(t, anchors, extra.graphs if extra else None),
                })
                first = next((r for r in rows if r["pass"] == pass_), None)
                row = rows[-1]
                row["unstable"] = _instability(spreads, row,
                                               first if first is not row else None)
    if extra is not None and notes is not None:
        notes += [m for m in extra.notes if m not in notes]
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

