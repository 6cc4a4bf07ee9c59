"""The slab backward (GroupNorm, InstanceNorm) against torch's
`aten.native_group_norm_backward` and against cynorm's own forward, float32, NCHW, side
by side in one process: GroupNorm(32) on (2,320,64,64), (8,256,56,56), (1,512,128,128),
(16,256,128,128) and InstanceNorm (8,64,128,128), at 1 and 2 threads.

    python benchmarks/bench_slab_backward.py [--threads 1 2] [--rounds 15] [--quick]

Per case and thread count, rounds of every variant in turn (interleaved, so that a
change of the machine's load hits all alike): cynorm's backward allocating dx
(`group_norm_backward`, as torch allocates its own), cynorm's backward into `out=`,
cynorm's forward into `out=`, torch's backward (given the same bits: x, dy, weight, and
the float32 statistics; its `.out` overload is left out, as it computes into a new
tensor and copies). Printed: the least and the 20th-percentile time per call in ms (CPU
time with 1 thread, `time.process_time`, which other processes on a shared machine
disturb least; wall time otherwise), torch/cynorm, both allocating (above 1: cynorm
faster, target >= 1), and cynorm's backward/forward, both with `out=` (target about
1.7), with the load average before and after. `--quick` leaves out (16,256,128,128) (a
0.8 GiB working set). About two minutes with the defaults on an idle machine.
"""
import argparse
import os
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import cynorm

CASES = [("GroupNorm(32)", (2, 320, 64, 64), 32), ("GroupNorm(32)", (8, 256, 56, 56), 32),
         ("GroupNorm(32)", (1, 512, 128, 128), 32),
         ("GroupNorm(32)", (16, 256, 128, 128), 32),
         ("InstanceNorm", (8, 64, 128, 128), 64)]


def variants(shape, G):
    """name -> closure, each on the same arrays."""
    rng = np.random.default_rng(0)
    N, C = shape[:2]
    HW = int(np.prod(shape[2:]))
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    if G == C:
        _, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)

        def bwd():
            cynorm.instance_norm_backward(dy, x, mean, rstd, w)

        def bwd_out():
            cynorm.instance_norm_backward(dy, x, mean, rstd, w, out=dx)

        def fwd_out():
            cynorm.instance_norm(x, weight=w, bias=b, out=y)
    else:
        _, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True)

        def bwd():
            cynorm.group_norm_backward(dy, x, mean, rstd, G, w)

        def bwd_out():
            cynorm.group_norm_backward(dy, x, mean, rstd, G, w, out=dx)

        def fwd_out():
            cynorm.group_norm(x, G, w, b, out=y)
    dx = np.empty_like(x)
    y = np.empty_like(x)
    xt, dyt, wt = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(w)
    mt = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32).reshape(-1))
    rt = torch.from_numpy(np.ascontiguousarray(rstd, dtype=np.float32).reshape(-1))

    def torch_bwd():
        torch.ops.aten.native_group_norm_backward(dyt, xt, mt, rt, wt, N, C, HW, G,
                                                  [True, True, True])
    return {"cynorm bwd": bwd, "cynorm bwd out=": bwd_out, "cynorm fwd out=": fwd_out,
            "torch bwd": torch_bwd}


def run(threads, rounds, quick):
    clock = time.process_time if threads == 1 else time.perf_counter
    torch.set_num_threads(threads)
    print(f"\n== {threads} thread(s), {'CPU' if threads == 1 else 'wall'} time, ms per call"
          " (least / 20th percentile) ==")
    print(f"{'case':<34} {'cy bwd':>15} {'cy bwd out=':>15} {'cy fwd out=':>15}"
          f" {'torch bwd':>15} {'torch/cy':>8} {'bwd/fwd':>8}")
    with threadpool_limits(threads):
        for label, shape, G in CASES:
            if quick and shape == (16, 256, 128, 128):
                continue
            fns = variants(shape, G)
            per_call = max(1, int(0.02 / max(1e-6, _once(fns["torch bwd"], clock))))
            reps = min(per_call, 7)
            times = {k: [] for k in fns}
            for _ in range(rounds):
                for k, f in fns.items():
                    for _ in range(reps):
                        t = clock()
                        f()
                        times[k].append(clock() - t)
            lo = {k: min(v) * 1e3 for k, v in times.items()}
            p20 = {k: float(np.percentile(v, 20)) * 1e3 for k, v in times.items()}
            cell = {k: f"{lo[k]:.3f}/{p20[k]:.3f}" for k in fns}
            print(f"{label + ' ' + str(shape):<34} {cell['cynorm bwd']:>15}"
                  f" {cell['cynorm bwd out=']:>15} {cell['cynorm fwd out=']:>15}"
                  f" {cell['torch bwd']:>15}"
                  f" {lo['torch bwd'] / lo['cynorm bwd']:>8.2f}"
                  f" {lo['cynorm bwd out='] / lo['cynorm fwd out=']:>8.2f}", flush=True)
            del fns


def _once(f, clock):
    f()  # warm: pages touched, caches filled
    t = clock()
    f()
    return clock() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(f"cynorm {cynorm.__version__}, torch {torch.__version__}, load average before:"
          f" {os.getloadavg()}")
    for t in a.threads:
        run(t, a.rounds, a.quick)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
