"""Thread scaling: cynorm and torch at 1, 2, 4, 8, 16 ... threads on one machine, float32,
side by side in one process. Meant for a machine with many cores (the issue's
"thread scaling beyond 2 cores"); on 2 cores it runs with --threads 1,2.

    python benchmarks/bench_scaling.py [--threads 1,2,4,8,16] [--json PATH]
                                       [--sections copy,ooc,suite] [--ops OPS]
                                       [--budget SECONDS] [--mib MIB]

Sections, in this order (each thread count inside each case, so that a case's scaling is
measured on the same arrays):
  copy   the copy bandwidth (cynorm's parallel_copy, 1 read + 1 write per byte) per thread
         count: the yardstick of the GB/s columns;
  ooc    out of cache: one case per op whose x is as large as the copy arrays (1 GiB
         unless the machine has little memory), cynorm into out= (forward; backward given
         the forward's statistics; forward+backward), cynorm allocating forward (its
         output cache reuses the block), torch allocating (torch has no out=) forward and
         forward+backward through autograd; GB/s and % of the copy bandwidth at that
         thread count;
  suite  the benchmark suite's shapes (python -m cynorm bench, float32), cynorm
         allocating and into out=, torch, forward and forward+backward.
Timing is cynorm.bench's: medians of interleaved rounds after a warm-up. --budget stops
starting new cases once that many seconds have passed since the start (the JSON written
so far is kept; it is rewritten after every case), so that a run on a lent machine ends
inside its lease.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import cynorm
from cynorm.bench.impls import _impls, cynorm_op
from cynorm.bench.machine import (_cpu_name, all_threads, copy_array_bytes, copy_bandwidth,
                                  llc_bytes)
from cynorm.bench.measure import bandwidth_cases, bench_case
from cynorm.bench.report import print_table
from cynorm.bench.suite import FULL_SUITE, case_label, make_arrays
from cynorm.bench.timing import thread_count, time_calls


def _ratio(a, b):
    return a / b if a and b else None


def bench_ooc(case, threads, copy_bw, cn, torch, rng, repeats):
    """Rows (one per thread count and pass) for one out-of-cache case."""
    x, dy, w, b = make_arrays(case, np.float32, rng)
    impls = _impls(case, cn, torch, x, dy, w, b)
    fwd, bwd = cynorm_op(cn, case)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    _, *stats = fwd(x, w, b, return_stats=True, out=y)
    fns = {
        "fwd": {k: v for k, v in impls["fwd"].items() if k != "numpy"},
        "bwd": {"cynorm_out": lambda: bwd(dy, x, stats, w, out=dx)},
        "fwd+bwd": {k: v for k, v in impls["fwd+bwd"].items()
                    if k in ("cynorm_out", "torch")},
    }
    rows = []
    for n in threads:
        with thread_count(n, torch):
            for pass_, calls in fns.items():
                t = time_calls(calls, repeats)
                arrays = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[pass_]
                gbps = arrays * x.nbytes / t["cynorm_out"] / 1e9
                rows.append({
                    "op": case.op, "shape": list(case.shape), "groups": case.groups,
                    "threads": n, "pass": pass_, "bytes": arrays * x.nbytes,
                    "cynorm_out_s": t["cynorm_out"], "cynorm_s": t.get("cynorm"),
                    "torch_s": t.get("torch"),
                    "torch_over_cynorm_out": _ratio(t.get("torch"), t["cynorm_out"]),
                    "gbps": gbps, "pct_copy": 100.0 * gbps / copy_bw[n],
                    "speedup_vs_1": None,
                })
                first = next(r for r in rows if r["pass"] == pass_)
                rows[-1]["speedup_vs_1"] = first["cynorm_out_s"] / t["cynorm_out"]
                if first["torch_s"] and t.get("torch"):
                    rows[-1]["torch_speedup_vs_1"] = first["torch_s"] / t["torch"]
    return rows


OOC_COLUMNS = [
    ("op", "op", ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("out= ms", lambda r: r["cynorm_out_s"] * 1e3, ".1f"),
    ("alloc ms", lambda r: r["cynorm_s"] and r["cynorm_s"] * 1e3, ".1f"),
    ("torch ms", lambda r: r["torch_s"] and r["torch_s"] * 1e3, ".1f"),
    ("torch/out=", "torch_over_cynorm_out", ".2f"),
    ("GB/s", "gbps", ".1f"),
    ("% copy", "pct_copy", ".0f"),
    ("x vs 1thr", "speedup_vs_1", ".2f"),
    ("torch x", lambda r: r.get("torch_speedup_vs_1"), ".2f"),
]

SUITE_COLUMNS = [
    ("op", "op", ""),
    ("shape", lambda r: case_label_row(r), ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("cynorm ms", lambda r: r["cynorm_s"] * 1e3, ".3f"),
    ("out= ms", lambda r: r["cynorm_out_s"] * 1e3, ".3f"),
    ("torch ms", lambda r: r["torch_s"] and r["torch_s"] * 1e3, ".3f"),
    ("torch/cy", "torch_over_cynorm", ".2f"),
    ("% copy", "pct_copy", ".0f"),
    ("note", lambda r: r.get("unstable") or "", ""),
]


def case_label_row(r):
    from cynorm.bench.suite import Case
    return case_label(Case(r["op"], tuple(r["shape"]), r["groups"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=None,
                   help="comma list (default 1,2,4,8,16 up to the usable cores)")
    p.add_argument("--sections", default="copy,ooc,suite")
    p.add_argument("--ops", default=None,
                   help="comma list of ops for the ooc section (default: all five)")
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=int, default=5, help="suite repeats (ooc: 3)")
    p.add_argument("--mib", type=int, default=None,
                   help="MiB of each copy and out-of-cache array (default: as the bench)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new case is started")
    args = p.parse_args(argv)
    start = time.perf_counter()
    cores = all_threads()
    threads = ([int(t) for t in args.threads.split(",")] if args.threads else
               [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores])
    if cores not in threads and not args.threads:
        threads.append(cores)
    sections = args.sections.split(",")
    try:
        import torch
    except ImportError:
        torch = None
    load = os.getloadavg()
    meta = {"cpu": _cpu_name(), "cores": cores, "llc_bytes": llc_bytes(),
            "machine": platform.machine(), "python": platform.python_version(),
            "cynorm": cynorm.__version__, "numpy": np.__version__,
            "torch": torch.__version__ if torch else None,
            "kernels": cynorm.show_config("dicts")["kernels"],
            "threads": threads, "loadavg_before": load}
    k = meta["kernels"]
    print(f"kernels {k['level']} ({k['compiler flags']})")
    print(f"CPU {meta['cpu']}, {cores} usable cores, L3 {(meta['llc_bytes'] or 0) >> 20} MiB;"
          f" cynorm {meta['cynorm']}, numpy {meta['numpy']}, torch {meta['torch']};"
          f" load {load[0]:.2f}; threads {threads}", flush=True)
    result = {"meta": meta, "copy_bandwidth_gbps": {}, "ooc": [], "suite": [],
              "skipped": []}

    def save():
        if args.json:
            result["meta"]["seconds"] = time.perf_counter() - start
            result["meta"]["loadavg_after"] = os.getloadavg()
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    def over_budget(what):
        if args.budget is not None and time.perf_counter() - start > args.budget:
            result["skipped"].append(what)
            print(f"budget spent: {what} skipped", flush=True)
            return True
        return False

    nbytes = args.mib << 20 if args.mib else copy_array_bytes()
    copy_bw = copy_bandwidth(threads, nbytes, 5)
    result["copy_bandwidth_gbps"] = {str(n): v for n, v in copy_bw.items()}
    print(f"copy bandwidth (2 x {nbytes >> 20} MiB): "
          + ", ".join(f"{n} thr {v:.1f} GB/s" for n, v in copy_bw.items()), flush=True)
    save()
    rng = np.random.default_rng(0)
    if "ooc" in sections:
        ops = args.ops.split(",") if args.ops else None
        for case in bandwidth_cases(nbytes):
            if ops is not None and case.op not in ops:
                continue
            if over_budget(f"ooc {case.op}"):
                continue
            rows = bench_ooc(case, threads, copy_bw, cynorm, torch, rng, 3)
            result["ooc"] += rows
            print(f"\n{case.op} {case_label(case)}, float32, {nbytes >> 20} MiB per array",
                  flush=True)
            print_table(rows, OOC_COLUMNS)
            sys.stdout.flush()
            save()
    if "suite" in sections:
        for case in FULL_SUITE:
            if over_budget(f"suite {case.op} {case_label(case)}"):
                continue
            rows = bench_case(case, np.float32, threads, args.repeats, cynorm, torch,
                              copy_bw, rng, with_numpy=False)
            result["suite"] += rows
            print(f"\n{case.op} {case_label(case)}", flush=True)
            print_table(rows, SUITE_COLUMNS)
            sys.stdout.flush()
            save()
    save()
    print(f"\ndone in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
