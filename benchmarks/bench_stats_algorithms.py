"""Two-pass against Welford statistics, side by side: stats="two_pass" (the default) and
stats="welford" for group_norm and layer_norm, forward only (the backward does not
depend on how the statistics were computed).

For each case it reports the median forward time of each algorithm at each thread count,
and the max abs error of y against a float64 NumPy reference on the same input, which
has a large mean (--offset) to show how each algorithm copes with cancellation.

    PYTHONPATH=. python benchmarks/bench_stats_algorithms.py [--quick] [--threads 1,all]
        [--dtypes float32,float64] [--repeats 7] [--offset 1000] [--json PATH]
"""
import argparse
import sys

import numpy as np

import cynorm
from cynorm.bench.cli import parse_threads
from cynorm.bench.impls import cynorm_op
from cynorm.bench.reference import numpy_forward
from cynorm.bench.report import _write_json, print_table
from cynorm.bench.suite import Case, case_label
from cynorm.bench.timing import thread_count, time_calls

SUITE = [
    Case("group_norm", (8, 256, 56, 56), 32),
    Case("group_norm", (1, 512, 128, 128), 32),
    Case("group_norm", (1, 32, 8, 8), 8),
    Case("layer_norm", (4096, 768), None),
    Case("layer_norm", (64, 1024), None),
    Case("layer_norm", (1, 2**24), None),
]
QUICK_SUITE = [
    Case("group_norm", (4, 128, 32, 32), 32),
    Case("layer_norm", (4096, 768), None),
    Case("layer_norm", (64, 1024), None),
]
ALGORITHMS = ("two_pass", "welford")


def bench(case, dtype, threads, repeats, offset, rng):
    x = (offset + rng.standard_normal(case.shape)).astype(dtype)
    pshape = case.shape[-1:] if case.op == "layer_norm" else case.shape[1:2]
    w = (1.0 + 0.1 * rng.standard_normal(pshape)).astype(dtype)
    b = (0.1 * rng.standard_normal(pshape)).astype(dtype)
    fwd, _ = cynorm_op(cynorm, case)
    ref, _ = numpy_forward(case, x.astype(np.float64), w.astype(np.float64),
                           b.astype(np.float64))
    row_err = {a: float(np.max(np.abs(fwd(x, w, b, stats=a) - ref))) for a in ALGORITHMS}
    rows = []
    for n in threads:
        with thread_count(n):
            t = time_calls({a: (lambda a=a: fwd(x, w, b, stats=a)) for a in ALGORITHMS},
                           repeats)
        rows.append({"op": case.op, "shape": list(case.shape), "groups": case.groups,
                     "label": case_label(case), "dtype": dtype, "threads": n,
                     "two_pass_s": t["two_pass"], "welford_s": t["welford"],
                     "welford_over_two_pass": t["welford"] / t["two_pass"],
                     "two_pass_err": row_err["two_pass"],
                     "welford_err": row_err["welford"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a reduced suite, float32")
    p.add_argument("--threads", default="1,all")
    p.add_argument("--dtypes", help="default float32,float64 (--quick: float32)")
    p.add_argument("--repeats", type=int, help="default 7 (--quick: 3)")
    p.add_argument("--offset", type=float, default=1000.0,
                   help="mean of the input, to stress cancellation (default 1000)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    suite = QUICK_SUITE if args.quick else SUITE
    dtypes = (args.dtypes or ("float32" if args.quick else "float32,float64")).split(",")
    repeats = args.repeats or (3 if args.quick else 7)
    threads = parse_threads(args.threads)

    rng = np.random.default_rng(0)
    rows = []
    for case in suite:
        for dtype in dtypes:
            rows += bench(case, dtype, threads, repeats, args.offset, rng)
    print(f"cynorm {cynorm.__version__}: stats='two_pass' vs stats='welford', forward, "
          f"input mean {args.offset:g}, std 1; median of {repeats}")
    print_table(rows, [
        ("op", "op", ""), ("shape", "label", ""), ("dtype", "dtype", ""),
        ("thr", "threads", "d"),
        ("two_pass ms", lambda r: r["two_pass_s"] * 1e3, ".3f"),
        ("welford ms", lambda r: r["welford_s"] * 1e3, ".3f"),
        ("welford/two_pass", "welford_over_two_pass", ".2f"),
        ("two_pass err", "two_pass_err", ".2e"),
        ("welford err", "welford_err", ".2e"),
    ])
    if args.json:
        _write_json(args.json, {"offset": args.offset, "repeats": repeats, "results": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
