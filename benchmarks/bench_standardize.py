"""standardize and StandardScaler against the tools NumPy pipelines use, side by side.

1. z-scores: cynorm.standardize against scipy.stats.zscore, scikit-learn's
   StandardScaler().fit_transform and NumPy's (x - x.mean(axis)) / x.std(axis), float32
   and float64, on data with mean --offset (default 100) and std 1: median time of
   each, cynorm's speed-up over each, and the max abs error of each against a NumPy
   two-pass reference computed from the same input (in float64 for float32 input, in
   long double for float64 input). Cases: per column (200000, 256) and (20000, 2048),
   per row (200000, 256) (scikit-learn standardizes columns only: no entry), and an
   image stack (64, 512, 512, 3) per channel, axes (0, 1, 2) (scikit-learn: on the
   (N*H*W, 3) view).
2. Out of cache: cynorm.standardize with out= on float32 arrays the size of the
   copy-bandwidth arrays (far larger than the last-level cache), per column and per
   row: GB/s (reads x once, writes y once: 2 x nbytes) and % of the machine's copy
   bandwidth measured in the same run.
3. LayerNorm2d over C of NCHW (8, 96, 112, 112) float32, eps 1e-6, weight and bias (C,):
   cynorm.standardize(x, 1, weight=w[:, None, None], bias=b[:, None, None]) against
   torch as ConvNeXt/SAM users write it: x.permute(0, 2, 3, 1) -> F.layer_norm ->
   .permute(0, 3, 1, 2) (the result a strided view; plus .contiguous(), the NCHW array
   the next layer gets), and ConvNeXt's own channels_first formula in torch.
4. Streaming statistics: StandardScaler.partial_fit over batches of an offset float64
   array, cynorm's and scikit-learn's, against the exact (long double) mean and variance
   of the concatenation: max relative error of mean_ and var_.

    PYTHONPATH=. python benchmarks/bench_standardize.py [--quick] [--threads all]
        [--repeats 5] [--offset 100] [--json PATH]

--quick: arrays 1/8 the size, for a sanity run. A full run takes a few minutes.
"""
import argparse
import os
import sys
import time

import numpy as np

import cynorm
from cynorm.preprocessing import StandardScaler

from cynorm.bench.cli import parse_threads
from cynorm.bench.machine import copy_array_bytes, copy_bandwidth
from cynorm.bench.report import _write_json, print_table
from cynorm.bench.timing import thread_count, time_calls

# (label, shape, axis); sklearn: how StandardScaler sees it (None: not applicable)
CASES = [
    ("per-column", (200000, 256), 0, "2d"),
    ("per-column", (20000, 2048), 0, "2d"),
    ("per-row", (200000, 256), 1, None),
    ("image stack per channel", (64, 512, 512, 3), (0, 1, 2), "channels"),
]


def _optional(name):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def reference(x, axis):
    """Plain two-pass z-scores of x: float64 for float32 input, long double (x86: 64-bit
    mantissa) for float64 input, so that the reference's own rounding stays far below
    the errors measured."""
    x64 = x.astype(np.float64 if x.dtype == np.float32 else np.longdouble)
    mean = x64.mean(axis=axis, keepdims=True)
    x64 -= mean
    std = np.sqrt((x64 * x64).mean(axis=axis, keepdims=True))
    x64 /= std
    return x64


def max_err(y, ref):
    return float(np.max(np.abs(y.astype(ref.dtype) - ref)))


def zscore_impls(x, axis, sk_kind, stats, skp):
    impls = {"cynorm": lambda: cynorm.standardize(x, axis)}
    if stats is not None:
        impls["scipy"] = lambda: stats.zscore(x, axis=axis)
    if skp is not None and sk_kind == "2d":
        impls["sklearn"] = lambda: skp.StandardScaler().fit_transform(x)
    elif skp is not None and sk_kind == "channels":
        impls["sklearn"] = lambda: skp.StandardScaler().fit_transform(
            x.reshape(-1, x.shape[-1])).reshape(x.shape)
    impls["numpy"] = lambda: ((x - x.mean(axis=axis, keepdims=True))
                              / x.std(axis=axis, keepdims=True))
    return impls


def bench_zscores(cases, dtypes, threads, repeats, offset, scale, rng):
    stats, skp = _optional("scipy.stats"), _optional("sklearn.preprocessing")
    rows = []
    for label, shape, axis, sk_kind in cases:
        shape = (max(1, shape[0] // scale),) + shape[1:]
        for dtype in dtypes:
            x = (offset + rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
            ref = reference(x, axis)
            impls = zscore_impls(x, axis, sk_kind, stats, skp)
            errs = {k: max_err(f(), ref) for k, f in impls.items()}
            del ref
            with thread_count(threads):
                t = time_calls(impls, repeats, budget=5.0)
            row = {"case": label, "shape": list(shape), "axis": axis, "dtype": dtype,
                   "threads": threads}
            for k in ("cynorm", "scipy", "sklearn", "numpy"):
                row[k + "_s"] = t.get(k)
                row[k + "_err"] = errs.get(k)
                row[k + "_speedup"] = t[k] / t["cynorm"] if k in t else None
            rows.append(row)
            del x, impls
    return rows


def bench_out_of_cache(threads, repeats, scale, rng):
    nbytes = copy_array_bytes() // scale
    copy_bw = copy_bandwidth([threads], nbytes, repeats)[threads]
    rows = []
    for label, axis in (("per-column", 0), ("per-row", 1)):
        shape = (nbytes // 4 // 256, 256)
        x = (100 + rng.standard_normal(shape, dtype=np.float32))
        y = np.empty_like(x)
        with thread_count(threads):
            t = time_calls({"out": lambda: cynorm.standardize(x, axis, out=y)},
                           max(3, repeats))["out"]
        gbps = 2 * x.nbytes / t / 1e9
        rows.append({"case": label, "shape": list(shape), "threads": threads,
                     "cynorm_out_s": t, "gbps": gbps, "copy_gbps": copy_bw,
                     "pct_copy": 100 * gbps / copy_bw})
        del x, y
    return rows


def bench_layer_norm_2d(threads, repeats, scale, rng):
    torch = _optional("torch")
    shape = (max(1, 8 // min(scale, 8)), 96, 112, 112)
    C = shape[1]
    x = (100 + rng.standard_normal(shape, dtype=np.float32))
    w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    b = (0.1 * rng.standard_normal(C)).astype(np.float32)
    eps = 1e-6
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    ref = ((x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(axis=1, keepdims=True) + eps)
           * w[:, None, None] + b[:, None, None])
    del x64, mean
    impls = {"cynorm": lambda: cynorm.standardize(x, 1, weight=w[:, None, None],
                                                  bias=b[:, None, None], eps=eps)}
    if torch is not None:
        F = torch.nn.functional
        xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)

        def permute_ln():
            with torch.no_grad():
                return F.layer_norm(xt.permute(0, 2, 3, 1), (C,), wt, bt,
                                    eps).permute(0, 3, 1, 2)

        def permute_ln_contiguous():
            return permute_ln().contiguous()

        def convnext_formula():
            with torch.no_grad():
                u = xt.mean(1, keepdim=True)
                s = (xt - u).pow(2).mean(1, keepdim=True)
                return (wt[:, None, None] * ((xt - u) / torch.sqrt(s + eps))
                        + bt[:, None, None])

        impls["torch permute+layer_norm+permute"] = permute_ln
        impls["torch ... + .contiguous()"] = permute_ln_contiguous
        impls["torch ConvNeXt formula"] = convnext_formula
    errs = {k: max_err(np.asarray(f()), ref) for k, f in impls.items()}
    with thread_count(threads, torch):
        t = time_calls(impls, repeats)
    return [{"impl": k, "shape": list(shape), "threads": threads, "s": t[k],
             "vs_cynorm": t[k] / t["cynorm"], "err": errs[k]} for k in impls]


def bench_streaming(offset, rng, n=200000, p=64, batch=1000):
    X = offset + rng.standard_normal((n, p)) * rng.uniform(0.1, 10.0, p)
    Xl = X.astype(np.longdouble)
    mean = Xl.sum(axis=0) / n
    var = (((Xl - mean) ** 2).sum(axis=0) / n).astype(np.float64)
    mean = mean.astype(np.float64)
    del Xl
    rows = []
    skp = _optional("sklearn.preprocessing")
    makers = {"cynorm": StandardScaler}
    if skp is not None:
        makers["sklearn"] = skp.StandardScaler
    for name, make in makers.items():
        for mode in ("partial_fit", "fit"):
            sc = make()
            t0 = time.perf_counter()
            if mode == "fit":
                sc.fit(X)
            else:
                for k in range(0, n, batch):
                    sc.partial_fit(X[k:k + batch])
            t = time.perf_counter() - t0
            rows.append({"impl": name, "mode": mode, "n": n, "p": p, "batch": batch,
                         "offset": offset, "s": t,
                         "mean_rel_err": float(np.max(np.abs(sc.mean_ - mean)
                                                      / np.abs(mean))),
                         "var_rel_err": float(np.max(np.abs(sc.var_ - var) / var))})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="arrays 1/8 the size")
    p.add_argument("--threads", default="all", help="one thread count (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--offset", type=float, default=100.0)
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    threads = parse_threads(args.threads)[0]
    scale = 8 if args.quick else 1
    dtypes = args.dtypes.split(",")
    rng = np.random.default_rng(0)

    print(f"cynorm {cynorm.__version__}, {threads} threads, input mean {args.offset:g} "
          f"std 1, medians of {args.repeats}" + (" (--quick: 1/8 sizes)" if scale > 1
                                                  else "")
          + ", load average %.1f %.1f %.1f" % os.getloadavg())
    z = bench_zscores(CASES, dtypes, threads, args.repeats, args.offset, scale, rng)
    print("\n1. z-scores: ms, cynorm's speed-up (x), max abs error vs float64 reference")

    def ms(k):
        return lambda r: None if r[k + "_s"] is None else r[k + "_s"] * 1e3

    cols = [("case", "case", ""), ("shape", lambda r: str(tuple(r["shape"])), ""),
            ("dtype", "dtype", "")]
    for k in ("cynorm", "scipy", "sklearn", "numpy"):
        cols.append((f"{k} ms", ms(k), ".1f"))
        if k != "cynorm":
            cols.append(("x", k + "_speedup", ".1f"))
    for k in ("cynorm", "scipy", "sklearn", "numpy"):
        cols.append((f"{k} err", k + "_err", ".1e"))
    print_table(z, cols)

    oc = bench_out_of_cache(threads, args.repeats, scale, rng)
    print(f"\n2. out of cache, float32, out=: copy bandwidth {oc[0]['copy_gbps']:.1f} GB/s")
    print_table(oc, [("case", "case", ""), ("shape", lambda r: str(tuple(r["shape"])), ""),
                     ("ms", lambda r: r["cynorm_out_s"] * 1e3, ".1f"),
                     ("GB/s", "gbps", ".1f"), ("% copy", "pct_copy", ".0f")])

    ln = bench_layer_norm_2d(threads, args.repeats, scale, rng)
    print("\n3. LayerNorm2d over C of NCHW, float32")
    print_table(ln, [("impl", "impl", ""), ("shape", lambda r: str(tuple(r["shape"])), ""),
                     ("ms", lambda r: r["s"] * 1e3, ".1f"),
                     ("time / cynorm", "vs_cynorm", ".2f"), ("max err", "err", ".1e")])

    st = bench_streaming(args.offset, rng, n=200000 // scale)
    print("\n4. StandardScaler statistics vs exact (long double), float64 input, "
          "batches of 1000")
    print_table(st, [("impl", "impl", ""), ("mode", "mode", ""), ("n", "n", "d"),
                     ("p", "p", "d"), ("s", "s", ".3f"),
                     ("mean max rel err", "mean_rel_err", ".1e"),
                     ("var max rel err", "var_rel_err", ".1e")])
    if args.json:
        _write_json(args.json, {"threads": threads, "offset": args.offset,
                                "repeats": args.repeats, "zscores": z,
                                "out_of_cache": oc, "layer_norm_2d": ln,
                                "streaming": st})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
