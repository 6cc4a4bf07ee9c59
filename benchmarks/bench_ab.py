"""A/B: two cynorm trees (e.g. main and a branch) loaded in one process, timed against
torch (and ONNX Runtime's own op where onnxruntime and onnx import) in interleaved rounds
(min over rounds). With 1 thread the clock is CPU time.

    python benchmarks/bench_ab.py OLD_TREE NEW_TREE [threads] [rounds]
"""
import os
import sys
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from _ab_trees import load

old_tree, new_tree = sys.argv[1], sys.argv[2]
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 15
torch.set_num_threads(threads)
clock = time.process_time if threads == 1 else time.perf_counter


A = load(old_tree)
B = load(new_tree)

try:
    import onnxruntime  # noqa: F401
    from cynorm.bench import anchors
    from cynorm.bench.suite import Case
except ImportError:
    anchors = None


def ort_call(op, x, w, b, groups=None):
    """ONNX Runtime's op on x (the graphs of cynorm.bench.anchors), or None."""
    if anchors is None:
        return None
    case = Case(op, x.shape, groups)
    for _, model in anchors._ort_case_models(case, x, w, b):
        try:
            sess = anchors._ort_session(model, threads)
            sess.run(None, {"x": x})
            return lambda: sess.run(None, {"x": x})
        except Exception:  # noqa: BLE001 - an op this version lacks: try the next graph
            continue
    return None


def timeit(f, reps):
    t = clock()
    for _ in range(reps):
        f()
    return (clock() - t) / reps


def cases(dtype):
    rng = np.random.default_rng(0)
    for shape in [(4096, 768), (2048, 1024), (512, 4096)]:
        x = rng.standard_normal(shape).astype(dtype)
        K = shape[1]
        w, b = rng.random(K).astype(dtype), rng.random(K).astype(dtype)
        tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
        yield (f"LayerNorm {shape}", lambda m, x=x, K=K, w=w, b=b: m.layer_norm(x, K, w, b),
               lambda tx=tx, K=K, tw=tw, tb=tb: torch.nn.functional.layer_norm(tx, (K,), tw, tb, 1e-5),
               ort_call("layer_norm", x, w, b))
    for shape in [(2, 320, 64, 64), (4, 128, 64, 64), (8, 256, 56, 56)]:
        x = rng.standard_normal(shape).astype(dtype)
        C = shape[1]
        w, b = rng.random(C).astype(dtype), rng.random(C).astype(dtype)
        tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
        yield (f"GroupNorm {shape} G32", lambda m, x=x, w=w, b=b: m.group_norm(x, 32, w, b),
               lambda tx=tx, tw=tw, tb=tb: torch.nn.functional.group_norm(tx, 32, tw, tb, 1e-5),
               ort_call("group_norm", x, w, b, 32))
    x = rng.standard_normal((32, 64, 56, 56)).astype(dtype)
    w, b = rng.random(64).astype(dtype), rng.random(64).astype(dtype)
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    tdt = tx.dtype
    yield ("BatchNorm train (32,64,56,56)",
           lambda m: m.batch_norm(x, np.zeros(64, dtype), np.ones(64, dtype), w, b, training=True),
           lambda: torch.nn.functional.batch_norm(tx, torch.zeros(64, dtype=tdt),
                                                  torch.ones(64, dtype=tdt), tw, tb, training=True),
           ort_call("batch_norm", x, w, b))


print(f"threads={threads} rounds={rounds} clock={clock.__name__} load={os.getloadavg()[0]:.2f}")
print(f"{'':8s} {'case':34s} {'old ms':>8s} {'new ms':>8s} {'torch':>8s}  torch/old torch/new"
      f" {'ORT':>8s} ORT/old ORT/new")
with threadpool_limits(threads), torch.no_grad():
    for dtype in (np.float32, np.float64):
        for name, fc, ft, fo in cases(dtype):
            fa, fb = (lambda: fc(A)), (lambda: fc(B))
            fa(); fb(); ft()
            t0 = timeit(fb, 2)
            reps = max(2, int(0.02 / max(t0, 1e-6)))
            ta, tb_, tt, to = [], [], [], []
            for _ in range(rounds):
                ta.append(timeit(fa, reps))
                tb_.append(timeit(fb, reps))
                tt.append(timeit(ft, reps))
                if fo is not None:
                    to.append(timeit(fo, reps))
            a, b_, t = min(ta), min(tb_), min(tt)
            o = (f" {min(to)*1e3:8.3f} {min(to)/a:7.2f} {min(to)/b_:7.2f}" if to else "")
            print(f"{np.dtype(dtype).name:8s} {name:34s} {a*1e3:8.3f} {b_*1e3:8.3f} {t*1e3:8.3f}"
                  f"  {t/a:8.2f} {t/b_:8.2f}{o}", flush=True)
print(f"load={os.getloadavg()[0]:.2f}")
