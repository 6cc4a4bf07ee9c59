"""BatchNorm forward, training and eval, side by side with ONNX Runtime and torch.

float32, each library allocating its output; interleaved rounds in one process, the
minimum per library; ratio = other's time / cynorm's (above 1: cynorm is faster). Also
the 1-thread CPU time of cynorm (time.process_time), which the machine's load does not
inflate as much as wall time.

    PYTHONPATH=$PWD python benchmarks/bench_bn_anchors.py [--rounds 30] [--threads 1 2]
        [--old TREE]

ONNX Runtime (BatchNormalization-15, training_mode=1 for training) and torch are each
used only when importable. --old TREE: another built cynorm tree (e.g. main) timed in the
same rounds (benchmarks/_ab_trees.py), its time and old/new beside the anchors.
"""
import argparse
import time

import os
import sys

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _ab_trees  # noqa: E402

SHAPES = [(64, 128, 7, 7), (32, 64, 56, 56), (8, 256, 28, 28), (256, 512), (4096, 256)]


def _ort(x, w, b, training, threads):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    C = x.shape[1]
    elem = TensorProto.FLOAT
    vin = helper.make_tensor_value_info("x", elem, list(x.shape))
    vout = helper.make_tensor_value_info("y", elem, list(x.shape))
    init = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.zeros(C, np.float32), "rm"),
            numpy_helper.from_array(np.ones(C, np.float32), "rv")]
    outs = [vout]
    if training:
        n = helper.make_node("BatchNormalization", ["x", "w", "b", "rm", "rv"],
                             ["y", "rm_out", "rv_out"], epsilon=1e-5, momentum=0.9,
                             training_mode=1)
        outs += [helper.make_tensor_value_info(s, elem, [C]) for s in ("rm_out", "rv_out")]
    else:
        n = helper.make_node("BatchNormalization", ["x", "w", "b", "rm", "rv"], ["y"],
                             epsilon=1e-5)
    g = helper.make_graph([n], "bn", [vin], outs, init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = min(m.ir_version, 10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: s.run(["y"], {"x": x})


def _torch(x, w, b, training):
    try:
        import torch
    except ImportError:
        return None
    tx = torch.from_numpy(x)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])

    def run():
        with torch.no_grad():
            torch.nn.functional.batch_norm(tx, rm, rv, tw, tb, training, 0.1, 1e-5)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--old", default=None)
    a = ap.parse_args()
    old = _ab_trees.load(a.old).batch_norm if a.old else None
    new = _ab_trees.load(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"cynorm from {os.path.dirname(new.__file__)}"
          + (f"; old from {a.old}" if a.old else ""))
    new = new.batch_norm
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"load {open('/proc/loadavg').read().split()[:3]}")
    for nt in a.threads:
        if torch is not None:
            torch.set_num_threads(nt)
        for training in (True, False):
            for shape in SHAPES:
                x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
                C = shape[1]
                w = rng.standard_normal(C).astype(np.float32)
                b = rng.standard_normal(C).astype(np.float32)
                rm = np.zeros(C, np.float32)
                rv = np.ones(C, np.float32)

                def cy(f=new):
                    f(x, rm, rv, w, b, training=training)
                fns = {"cynorm": cy, "old": (lambda: cy(old)) if old else None,
                       "ort": _ort(x, w, b, training, nt),
                       "torch": _torch(x, w, b, training)}
                fns = {k: f for k, f in fns.items() if f is not None}
                best = {k: np.inf for k in fns}
                cpu = {k: np.inf for k in fns}
                reps = max(1, int(2e7 // x.size))
                with threadpool_limits(nt, user_api="openmp"):
                    for f in fns.values():
                        f()
                    for _ in range(a.rounds):
                        for k, f in fns.items():
                            t0, c0 = time.perf_counter(), time.process_time()
                            for _ in range(reps):
                                f()
                            t = (time.perf_counter() - t0) / reps
                            if nt == 1:
                                cpu[k] = min(cpu[k], (time.process_time() - c0) / reps)
                            best[k] = min(best[k], t)
                line = (f"{nt}t {'train' if training else 'eval '} {str(shape):18s} "
                        f"cynorm {best['cynorm'] * 1e3:7.3f} ms")
                if nt == 1:
                    line += f" (cpu {cpu['cynorm'] * 1e3:7.3f})"
                if "old" in best:
                    line += f" | old {best['old'] * 1e3:7.3f} ms"
                    if nt == 1:
                        line += f" (cpu {cpu['old'] * 1e3:7.3f})"
                    line += f" old/new {best['old'] / best['cynorm']:5.2f}"
                for k in ("ort", "torch"):
                    if k in best:
                        line += (f" | {k} {best[k] * 1e3:7.3f} ms "
                                 f"ratio {best[k] / best['cynorm']:5.2f}")
                print(line, flush=True)
    print(f"load {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
