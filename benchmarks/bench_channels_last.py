"""Channels-last (channel_axis=-1) against NCHW, cynorm and torch side by side.

For each case, float32 (or --dtype): cynorm on NCHW x, cynorm on channels-last x (N, *spatial, C)
(read in place), torch (CPU) on the NCHW tensor and on the same data in torch's
channels_last memory format; forward alone and forward + backward (cynorm: the forward
with its statistics, then the backward; torch: autograd, weight and bias with
requires_grad). Median times, then the ratios the targets are stated in: cynorm
channels-last over cynorm NCHW (target <= 1.15) and torch channels_last over cynorm
channels-last (target >= 1.3).

    PYTHONPATH=. python benchmarks/bench_channels_last.py [--threads 1,2] [--repeats 7]
        [--quick] [--cpu-time] [--dtype float32|bfloat16|float16] [--json PATH]

--quick: the first case only and fewer samples, for a sanity run. A full run takes a
couple of minutes.
"""
import argparse
import os
import sys
import time

import numpy as np

import cynorm
from cynorm.bench.cli import parse_threads
from cynorm.bench.report import _write_json, print_table
from cynorm.bench.timing import thread_count, time_calls

# (op, NCHW shape, groups)
CASES = [
    ("group_norm", (8, 256, 56, 56), 32),
    ("group_norm", (1, 512, 128, 128), 32),
    ("group_norm", (2, 320, 64, 64), 32),
    ("instance_norm", (8, 64, 128, 128), None),
    ("batch_norm", (32, 64, 56, 56), None),
]


def _cynorm_calls(op, x, G, w, b, dy, axis):
    if op == "group_norm":
        def fwd():
            return cynorm.group_norm(x, G, w, b, channel_axis=axis)

        def both():
            _, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, channel_axis=axis)
            return cynorm.group_norm_backward(dy, x, m, r, G, w, channel_axis=axis)
    elif op == "instance_norm":
        def fwd():
            return cynorm.instance_norm(x, weight=w, bias=b, channel_axis=axis)

        def both():
            _, m, r = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True,
                                           channel_axis=axis)
            return cynorm.instance_norm_backward(dy, x, m, r, w, channel_axis=axis)
    else:
        def fwd():
            return cynorm.batch_norm(x, None, None, w, b, True, channel_axis=axis)

        def both():
            _, m, r = cynorm.batch_norm(x, None, None, w, b, True, return_stats=True,
                                        channel_axis=axis)
            return cynorm.batch_norm_backward(dy, x, m, r, w, channel_axis=axis)
    return fwd, both


def _torch_calls(torch, op, xt, G, w, b, dyt):
    F = torch.nn.functional
    wt = torch.from_numpy(w).to(xt.dtype).requires_grad_(True)
    bt = torch.from_numpy(b).to(xt.dtype).requires_grad_(True)

    def run(x, wt, bt):
        if op == "group_norm":
            return F.group_norm(x, G, wt, bt, 1e-5)
        if op == "instance_norm":
            return F.instance_norm(x, weight=wt, bias=bt)
        return F.batch_norm(x, None, None, wt, bt, True)

    def fwd():
        with torch.no_grad():
            return run(xt, wt, bt)

    xg = xt.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)

    def both():
        xg.grad = wt.grad = bt.grad = None
        y = run(xg, wt, bt)
        y.backward(dyt)
        return xg.grad

    return fwd, both


def min_cpu_seconds(fns, repeats):
    """Per function, the least CPU time (process_time) of one call over `repeats`
    rounds, the functions interleaved within each round (so that a change of load
    falls on all of them alike): with one thread, what a loaded machine disturbs
    least."""
    out = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            out[name] = min(out[name], time.process_time() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="x and dy's dtype (bfloat16: ml_dtypes); weight and bias float32 "
                        "for cynorm, x's dtype for torch")
    p.add_argument("--json")
    p.add_argument("--cpu-time", action="store_true",
                   help="with 1 thread, the least CPU time per call instead of the "
                        "median wall time (for a loaded machine)")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    if args.dtype == "bfloat16":
        import ml_dtypes
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(args.dtype)
    cases = CASES[:1] if args.quick else CASES
    repeats = 3 if args.quick else args.repeats
    print(f"load: {os.getloadavg()[0]:.2f} (1 min average), cpus: {os.cpu_count()}, "
          f"dtype: {args.dtype}")
    rows = []
    rng = np.random.default_rng(0)
    for n in parse_threads(args.threads):
        for op, shape, G in cases:
            C = shape[1]
            x = (0.5 + rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w = rng.uniform(0.5, 1.5, C).astype(np.float32)
            b = rng.standard_normal(C).astype(np.float32)
            x_last = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            dy_last = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
            fns = {}
            fns["nchw"], fns["nchw+bwd"] = _cynorm_calls(op, x, G, w, b, dy, 1)
            fns["last"], fns["last+bwd"] = _cynorm_calls(op, x_last, G, w, b, dy_last, -1)
            if torch is not None:
                tdt = getattr(torch, args.dtype)
                xt = torch.from_numpy(x.astype(np.float32)).to(tdt)
                xcl = xt.contiguous(memory_format=torch.channels_last)
                dyt = torch.from_numpy(dy.astype(np.float32)).to(tdt)
                dycl = dyt.contiguous(memory_format=torch.channels_last)
                fns["torch"], fns["torch+bwd"] = _torch_calls(torch, op, xt, G, w, b, dyt)
                fns["torch_cl"], fns["torch_cl+bwd"] = _torch_calls(torch, op, xcl, G, w,
                                                                    b, dycl)
            with thread_count(n, torch):
                if args.cpu_time and n == 1:
                    t = min_cpu_seconds(fns, repeats)
                else:
                    t = time_calls(fns, repeats)
            for kind in ("", "+bwd"):
                row = {"threads": n, "op": op, "shape": "x".join(map(str, shape)),
                       "pass": "fwd" if not kind else "fwd+bwd",
                       "nchw_ms": 1e3 * t["nchw" + kind], "last_ms": 1e3 * t["last" + kind],
                       "torch_ms": 1e3 * t["torch" + kind] if torch else None,
                       "torch_cl_ms": 1e3 * t["torch_cl" + kind] if torch else None}
                row["last/nchw"] = row["last_ms"] / row["nchw_ms"]
                row["torch_cl/last"] = (row["torch_cl_ms"] / row["last_ms"]
                                        if torch else None)
                rows.append(row)
    print_table(rows, [("thr", "threads", "d"), ("op", "op", "s"), ("shape", "shape", "s"),
                       ("pass", "pass", "s"), ("cynorm NCHW ms", "nchw_ms", ".3f"),
                       ("cynorm last ms", "last_ms", ".3f"),
                       ("torch NCHW ms", "torch_ms", ".3f"),
                       ("torch channels_last ms", "torch_cl_ms", ".3f"),
                       ("last/NCHW", "last/nchw", ".2f"),
                       ("torch_cl/last", "torch_cl/last", ".2f")])
    if args.cpu_time:
        print("\n1 thread: least CPU time per call; more threads: median wall time.")
    print("\nlast/NCHW: cynorm channels-last time over cynorm NCHW time (target <= 1.15); "
          "torch_cl/last: torch channels_last time over cynorm channels-last time "
          "(target >= 1.3).")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        _write_json(args.json, {"rows": rows, "load": os.getloadavg()[0]})


if __name__ == "__main__":
    sys.exit(main())
