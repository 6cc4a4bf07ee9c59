"""float16 and bfloat16 storage against cynorm's own float32 and torch's 16-bit kernels,
side by side in one process, forward and forward + backward: the storage-dtype suite of
the 16-bit targets (GroupNorm(32) on the `python -m cynorm bench` shapes, InstanceNorm
(8, 64, 128, 128), BatchNorm (32, 64, 56, 56), LayerNorm and RMSNorm (4096, 768) and
(512, 4096)), NCHW.

    python benchmarks/bench_lowp.py [--threads 1 2] [--rounds 7] [--only gn ln ...]
                                    [--full] [--json out.json]

Timing: rounds of every variant of a case in turn (cynorm float32 / bfloat16 / float16,
torch float32 / bfloat16 / float16), interleaved so that a change of the machine's load
hits all of them alike; per variant the minimum over the rounds. With 1 thread the time
is CPU time (time.process_time), which other processes on a shared machine disturb
least; otherwise wall time. Printed per case: the times, 16-bit speed-up over cynorm's
float32 and over torch's same dtype; at the end the geometric means of those ratios
(the targets: bfloat16 >= 1.5x torch's bfloat16, float16 >= 2x torch's float16 on
GroupNorm, LayerNorm, RMSNorm), and the load average before and after. torch receives
tensors of the same bits (no copies inside the timing). --full adds (16, 256, 128, 128)
(a 1 GiB float32 working set; about a minute more). A couple of minutes by default.
"""
import argparse
import json
import math
import os
import time

import numpy as np

import cynorm

try:
    import torch
except ImportError:  # the torch columns are left out
    torch = None

import ml_dtypes
from threadpoolctl import threadpool_limits

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
STEPS = ("fwd", "fwd+bwd")


def cases(full, only):
    gn = [(8, 256, 56, 56), (2, 320, 64, 64), (1, 512, 128, 128)]
    if full:
        gn.append((16, 256, 128, 128))
    out = [("gn", s) for s in gn] + [("in", (8, 64, 128, 128)), ("bn", (32, 64, 56, 56))]
    out += [(k, s) for k in ("ln", "rms") for s in ((4096, 768), (512, 4096))]
    return [c for c in out if not only or c[0] in only]


LABEL = {"gn": "GroupNorm(32)", "in": "InstanceNorm", "bn": "BatchNorm", "ln": "LayerNorm",
         "rms": "RMSNorm"}


def cynorm_fns(kind, x, w, dy):
    """(forward, forward + backward) closures of cynorm on these arrays."""
    if kind == "gn":
        def fwd():
            return cynorm.group_norm(x, 32, w, w, return_stats=True)

        def both():
            _, m, r = fwd()
            return cynorm.group_norm_backward(dy, x, m, r, 32, w)
    elif kind == "in":
        def fwd():
            return cynorm.instance_norm(x, weight=w, bias=w, return_stats=True)

        def both():
            _, m, r = fwd()
            return cynorm.instance_norm_backward(dy, x, m, r, w)
    elif kind == "bn":
        def fwd():
            return cynorm.batch_norm(x, weight=w, bias=w, training=True, return_stats=True)

        def both():
            _, m, r = fwd()
            return cynorm.batch_norm_backward(dy, x, m, r, w)
    elif kind == "ln":
        K = x.shape[-1]

        def fwd():
            return cynorm.layer_norm(x, K, w, w, return_stats=True)

        def both():
            _, m, r = fwd()
            return cynorm.layer_norm_backward(dy, x, m, r, K, w)
    else:
        K = x.shape[-1]

        def fwd():
            return cynorm.rms_norm(x, K, w, eps=1e-6, return_stats=True)

        def both():
            _, r = fwd()
            return cynorm.rms_norm_backward(dy, x, r, K, w)
    return fwd, both


def torch_fns(kind, x, w, dy):
    F = torch.nn.functional
    tx = x.clone().requires_grad_(True)
    tw = w.clone().requires_grad_(True)

    def run(xx, ww):
        if kind == "gn":
            return F.group_norm(xx, 32, ww, ww, 1e-5)
        if kind == "in":
            return F.instance_norm(xx, weight=ww, bias=ww, eps=1e-5)
        if kind == "bn":
            return F.batch_norm(xx, None, None, ww, ww, training=True, eps=1e-5)
        if kind == "ln":
            return F.layer_norm(xx, (xx.shape[-1],), ww, ww, 1e-5)
        return F.rms_norm(xx, (xx.shape[-1],), ww, 1e-6)

    def fwd():
        with torch.no_grad():
            return run(x, w)

    def both():
        tx.grad = tw.grad = None
        run(tx, tw).backward(dy)
    return fwd, both


def to_torch(a, name):
    if name == "float32":
        return torch.from_numpy(a)
    tdt = torch.bfloat16 if name == "bfloat16" else torch.float16
    return torch.from_numpy(a.view(np.int16)).view(tdt)


def timer(nt):
    return time.process_time if nt == 1 else time.perf_counter


def once(fn, clock):
    t0 = clock()
    fn()
    return clock() - t0


def run_case(kind, shape, nt, rounds):
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal(shape).astype(np.float32)
    dy32 = rng.standard_normal(shape).astype(np.float32)
    n_par = shape[-1] if kind in ("ln", "rms") else shape[1]
    w32 = (1.0 + 0.1 * rng.standard_normal(n_par)).astype(np.float32)
    fns = {}
    for name, dt in DTYPES.items():
        x, w, dy = x32.astype(dt), w32.astype(dt), dy32.astype(dt)
        fns["cynorm " + name] = cynorm_fns(kind, x, w, dy)
        if torch is not None:
            fns["torch " + name] = torch_fns(kind, to_torch(x, name), to_torch(w, name),
                                             to_torch(dy, name))
    clock = timer(nt)
    best = {(k, s): math.inf for k in fns for s in STEPS}
    for k, (f, b) in fns.items():  # warm up: first-touch of outputs, torch's pools
        f()
        b()
    for _ in range(rounds):
        for k, (f, b) in fns.items():
            for s, fn in zip(STEPS, (f, b)):
                best[k, s] = min(best[k, s], once(fn, clock))
    return {f"{k} {s}": v for (k, s), v in best.items()}


def geomean(v):
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", "--reps", type=int, default=7)
    ap.add_argument("--only", nargs="+", choices=sorted(LABEL))
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}  (1 thread: CPU time; else wall time; "
          f"min of {args.rounds} interleaved rounds)")
    results = []
    ratios = {}
    for kind, shape in cases(args.full, args.only):
        label = f"{LABEL[kind]} {shape}"
        for nt in args.threads:
            with threadpool_limits(nt):
                if torch is not None:
                    torch.set_num_threads(nt)
                row = run_case(kind, shape, nt, args.rounds)
            row.update(case=label, threads=nt)
            results.append(row)
            for step in STEPS:
                f32 = row[f"cynorm float32 {step}"]
                parts = [f"{label:34s} {nt}T {step:7s} f32 {f32 * 1e3:7.2f} ms"]
                if torch is not None:
                    parts.append(f"(torch {row[f'torch float32 {step}'] * 1e3:7.2f})")
                for name in ("bfloat16", "float16"):
                    c = row[f"cynorm {name} {step}"]
                    s = f"| {name[:4]} {c * 1e3:7.2f} ms = {f32 / c:4.2f}x f32"
                    ratios.setdefault((nt, step, name, "f32"), []).append(f32 / c)
                    if torch is not None:
                        t = row[f"torch {name} {step}"]
                        s += f", torch {t * 1e3:7.2f} = {t / c:4.2f}x"
                        if kind in ("gn", "ln", "rms"):
                            ratios.setdefault((nt, step, name, "torch"), []).append(t / c)
                    parts.append(s)
                print(" ".join(parts), flush=True)
    print("geometric means (16-bit speed-up; above 1: cynorm 16-bit is faster)")
    for (nt, step, name, vs), v in sorted(ratios.items()):
        what = "cynorm float32, all cases" if vs == "f32" else \
            f"torch {name}, GroupNorm/LayerNorm/RMSNorm"
        print(f"  {nt}T {step:7s} {name:8s} vs {what}: {geomean(v):4.2f}x")
    print(f"load average: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
