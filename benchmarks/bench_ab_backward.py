"""A/B of the row backward (layer_norm_backward, rms_norm_backward): two cynorm trees
(e.g. main and a branch) loaded in one process, timed against torch's
native_layer_norm_backward in interleaved rounds (min over rounds), 1 thread, CPU time;
also checks that both trees give bitwise the same dx, dweight, dbias.

    python benchmarks/bench_ab_backward.py OLD_TREE NEW_TREE [rounds] [shapes]

shapes: comma-separated RxK float32 shapes, e.g. 4096x768,16384x1024 (default
4096x768,2048x1024,512x4096,64x1024); 16384x1024 is 64 MiB per array, far larger than
the cache.
"""

import os
import sys
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from _ab_trees import load

old_tree, new_tree = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 15
shapes = [tuple(int(n) for n in s.split("x")) for s in
          (sys.argv[4] if len(sys.argv) > 4 else "4096x768,2048x1024,512x4096,64x1024")
          .split(",")]
torch.set_num_threads(1)


A = load(old_tree)
B = load(new_tree)


def timeit(f, reps):
    t = time.process_time()
    for _ in range(reps):
        f()
    return (time.process_time() - t) / reps


rng = np.random.default_rng(0)
print(f"rounds={rounds} 1 thread, CPU time; load={os.getloadavg()[0]:.2f}")
print(f"{'case':20s} {'old ms':>8s} {'new ms':>8s} old/new {'torch':>8s} torch/old torch/new"
      "  bitwise")
with threadpool_limits(1):
    for shape in shapes:
        K = shape[1]
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        w, b = rng.random(K).astype(np.float32), rng.random(K).astype(np.float32)
        out = np.empty_like(x)
        _, mean, rstd = A.layer_norm(x, K, w, b, return_stats=True)
        _, rstd2 = A.rms_norm(x, K, w, return_stats=True)
        tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, dy, w, b))
        _, tmean, trstd = torch.ops.aten.native_layer_norm(tx, [K], tw, tb, 1e-5)
        ln_torch = (lambda: torch.ops.aten.native_layer_norm_backward(
            tdy, tx, [K], tmean, trstd, tw, tb, [True, True, True]))
        for name, call, ft in [
                ("LayerNorm", lambda m, o: m.layer_norm_backward(dy, x, mean, rstd, K, w, out=o),
                 ln_torch),
                ("RMSNorm", lambda m, o: m.rms_norm_backward(dy, x, rstd2, K, w, out=o), None)]:
            same = all(np.array_equal(p, q) for p, q in zip(call(A, None), call(B, None)))
            fa, fb = (lambda: call(A, out)), (lambda: call(B, out))
            reps = max(2, int(0.02 / max(timeit(fb, 2), 1e-6)))
            ta, tb_, tt = [], [], []
            for _ in range(rounds):
                ta.append(timeit(fa, reps))
                tb_.append(timeit(fb, reps))
                if ft is not None:
                    tt.append(timeit(ft, reps))
            a, b_ = min(ta), min(tb_)
            t = (f" {min(tt)*1e3:8.3f} {min(tt)/a:9.2f} {min(tt)/b_:9.2f}" if tt
                 else f" {'-':>8s} {'-':>9s} {'-':>9s}")
            print(f"{name + ' ' + str(shape):20s} {a*1e3:8.3f} {b_*1e3:8.3f} {a/b_:7.2f}{t}"
                  f"  {same}", flush=True)
print(f"load={os.getloadavg()[0]:.2f}")
