"""float16 and bfloat16 storage against cynorm's own float32 and torch's 16-bit kernels,
side by side in one run: GroupNorm(32) on (8, 256, 56, 56) and (1, 512, 128, 128),
LayerNorm and RMSNorm on (4096, 768), forward and forward + backward, at 1 and 2
threads.

    python benchmarks/bench_lowp.py [--threads 1 2] [--reps 15] [--json out.json]

Reported per case: the best of `reps` calls (seconds), and the ratios cynorm-16-bit /
cynorm-float32 and torch-16-bit / cynorm-16-bit (above 1: cynorm is faster). torch
receives its own tensors of the same bits (no copies inside the timing). Takes a few
minutes; on a shared machine, read the ratios, not the absolute times.
"""
import argparse
import json
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
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}


def best(fn, reps):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def to_torch(a, name):
    if name == "float32":
        return torch.from_numpy(a)
    tdt = torch.bfloat16 if name == "bfloat16" else torch.float16
    return torch.from_numpy(a.view(np.int16)).view(tdt)


def cases():
    rng = np.random.default_rng(0)
    for shape in ((8, 256, 56, 56), (1, 512, 128, 128)):
        C = shape[1]
        x = rng.standard_normal(shape).astype(np.float32)
        yield f"GroupNorm(32) {shape}", "gn", x, rng.standard_normal(C).astype(np.float32)
    x = rng.standard_normal((4096, 768)).astype(np.float32)
    w = rng.standard_normal(768).astype(np.float32)
    yield "LayerNorm (4096, 768)", "ln", x, w
    yield "RMSNorm (4096, 768)", "rms", x, w


def cynorm_fns(kind, x, w, dy):
    if kind == "gn":
        _, m, r = cynorm.group_norm(x, 32, w, w, return_stats=True)
        return (lambda: cynorm.group_norm(x, 32, w, w),
                lambda: cynorm.group_norm_backward(dy, x, m, r, 32, w))
    if kind == "ln":
        _, m, r = cynorm.layer_norm(x, 768, w, w, return_stats=True)
        return (lambda: cynorm.layer_norm(x, 768, w, w),
                lambda: cynorm.layer_norm_backward(dy, x, m, r, 768, w))
    _, r = cynorm.rms_norm(x, 768, w, eps=1e-6, return_stats=True)
    return (lambda: cynorm.rms_norm(x, 768, w, eps=1e-6),
            lambda: cynorm.rms_norm_backward(dy, x, r, 768, w))


def torch_fns(kind, x, w, dy):
    F = torch.nn.functional
    tx = x.clone().requires_grad_(True)
    tw = w.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            if kind == "gn":
                return F.group_norm(x, 32, w, w, 1e-5)
            if kind == "ln":
                return F.layer_norm(x, (768,), w, w, 1e-5)
            return F.rms_norm(x, (768,), w, 1e-6)

    def fwd_bwd():
        tx.grad = tw.grad = None
        if kind == "gn":
            y = F.group_norm(tx, 32, tw, tw, 1e-5)
        elif kind == "ln":
            y = F.layer_norm(tx, (768,), tw, tw, 1e-5)
        else:
            y = F.rms_norm(tx, (768,), tw, 1e-6)
        y.backward(dy)
    return fwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}")
    results = []
    for label, kind, x32, w32 in cases():
        dy32 = np.random.default_rng(1).standard_normal(x32.shape).astype(np.float32)
        for nt in args.threads:
            row = {"case": label, "threads": nt}
            with threadpool_limits(nt):
                if torch is not None:
                    torch.set_num_threads(nt)
                for name, dt in DTYPES.items():
                    x, w, dy = x32.astype(dt), w32.astype(dt), dy32.astype(dt)
                    f, b = cynorm_fns(kind, x, w, dy)
                    row[f"cynorm {name} fwd"] = best(f, args.reps)
                    # forward + backward, as a training step runs them
                    row[f"cynorm {name} fwd+bwd"] = row[f"cynorm {name} fwd"] + best(
                        b, args.reps)
                    if torch is not None:
                        tf, tb = torch_fns(kind, to_torch(x, name), to_torch(w, name),
                                           to_torch(dy, name))
                        row[f"torch {name} fwd"] = best(tf, args.reps)
                        row[f"torch {name} fwd+bwd"] = best(tb, args.reps)
            results.append(row)
            for step in ("fwd", "fwd+bwd"):
                f32 = row[f"cynorm float32 {step}"]
                parts = [f"{label:32s} {nt}T {step:8s} cynorm f32 {f32 * 1e3:7.2f} ms"]
                for name in ("bfloat16", "float16"):
                    c = row[f"cynorm {name} {step}"]
                    s = f"| {name} {c * 1e3:7.2f} ms ({f32 / c:4.2f}x f32"
                    if torch is not None:
                        s += f", torch {row[f'torch {name} {step}'] * 1e3:7.2f} ms = " \
                             f"{row[f'torch {name} {step}'] / c:4.2f}x"
                    parts.append(s + ")")
                print(" ".join(parts), flush=True)
    print(f"load average: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
