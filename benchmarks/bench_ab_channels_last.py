"""A/B of the channels-last GroupNorm/InstanceNorm forward (or, with --backward, the
backward alone, from the forward's statistics): two cynorm trees (e.g. main and a branch)
loaded in one process, each tree's channels-last call and its NCHW call on the same data
(into a preallocated out=), timed in interleaved rounds (min over rounds; with 1 thread
the clock is CPU time), so that a loaded machine moves both trees alike.

    python benchmarks/bench_ab_channels_last.py OLD_TREE NEW_TREE [threads] [rounds]
        [--dtype=float32|bfloat16|float16] [--backward]
"""
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from _ab_trees import load

args = [a for a in sys.argv[1:] if not a.startswith("--")]
old_tree, new_tree = args[0], args[1]
threads = int(args[2]) if len(args) > 2 else 1
rounds = int(args[3]) if len(args) > 3 else 15
dtype = np.float32
if "--dtype=bfloat16" in sys.argv:
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
elif "--dtype=float16" in sys.argv:
    dtype = np.float16
backward = "--backward" in sys.argv
clock = time.process_time if threads == 1 else time.perf_counter

A = load(old_tree)
B = load(new_tree)
CASES = [("group_norm", (8, 256, 56, 56), 32), ("group_norm", (1, 512, 128, 128), 32),
         ("group_norm", (2, 320, 64, 64), 32), ("instance_norm", (8, 64, 128, 128), None)]


def call(mod, op, x, G, w, b, axis, dy):
    # into a preallocated output: a fresh one of over 32 MiB is mapped anew by every
    # call (glibc's largest mmap threshold), whose page faults would dominate the time
    out = np.empty_like(x)
    if backward:
        if op != "group_norm":
            G = x.shape[axis]  # instance norm: a group per channel
        _, m, r = mod.group_norm(x, G, w, b, return_stats=True, channel_axis=axis)
        return lambda: mod.group_norm_backward(dy, x, m, r, G, w, channel_axis=axis,
                                               out=out)
    if op == "group_norm":
        return lambda: mod.group_norm(x, G, w, b, out=out, channel_axis=axis)
    return lambda: mod.instance_norm(x, weight=w, bias=b, out=out, channel_axis=axis)


rng = np.random.default_rng(0)
print(f"{'backward' if backward else 'forward'}, threads {threads}, "
      f"{np.dtype(dtype).name}, min over {rounds} rounds, ms")
print(f"{'case':34} {'old NCHW':>9} {'old last':>9} {'new NCHW':>9} {'new last':>9} "
      f"{'old l/N':>8} {'new l/N':>8} {'new/old last':>12}")
with threadpool_limits(threads):
    for op, shape, G in CASES:
        x = (0.3 + rng.standard_normal(shape)).astype(dtype)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        dy = rng.standard_normal(shape).astype(dtype)
        dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
        C = shape[1]
        w = rng.standard_normal(C).astype(np.float32)
        b = rng.standard_normal(C).astype(np.float32)
        fs = [call(A, op, x, G, w, b, 1, dy), call(A, op, xl, G, w, b, -1, dyl),
              call(B, op, x, G, w, b, 1, dy), call(B, op, xl, G, w, b, -1, dyl)]
        reps = max(1, int(1e7 // x.size))
        best = [np.inf] * 4
        for _ in range(rounds):
            for k, f in enumerate(fs):
                f()
                t = clock()
                for _ in range(reps):
                    f()
                best[k] = min(best[k], (clock() - t) / reps * 1e3)
        print(f"{op + ' ' + str(shape):34} {best[0]:9.3f} {best[1]:9.3f} {best[2]:9.3f} "
              f"{best[3]:9.3f} {best[1] / best[0]:8.2f} {best[3] / best[2]:8.2f} "
              f"{best[3] / best[1]:12.2f}", flush=True)
