"""`python -m cynorm` (and `python -m cynorm check`): every op, forward and backward, in
float32 and float64, against a float64 NumPy reference; exit code 1 on any failure."""
import platform

import numpy as np

from cynorm.bench.impls import cynorm_op
from cynorm.bench.reference import numpy_backward, numpy_forward
from cynorm.bench.report import print_table
from cynorm.bench.suite import EPS, OPS, Case, case_label, make_arrays

SELF_CHECK = [
    Case("group_norm", (2, 6, 5, 4), 3),
    Case("instance_norm", (2, 3, 7), None),
    Case("batch_norm", (4, 3, 5), None),
    Case("layer_norm", (6, 33), None),
    Case("rms_norm", (6, 33), None),
]
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}  # relative to max(1, max |reference|)


def check_case(cn, case, dtype, rng):
    """Max abs error of cynorm's forward and backward against a float64 NumPy reference
    computed from the same (dtype-rounded) inputs, and whether it is within tolerance."""
    x, dy, w, b = make_arrays(case, dtype, rng)
    fwd, bwd = cynorm_op(cn, case)
    y, *stats = fwd(x, w, b, return_stats=True)
    got = (y,) + tuple(bwd(dy, x, stats, w))
    f64 = [None if a is None else a.astype(np.float64) for a in (x, dy, w, b)]
    eps = np.finfo(dtype).eps if case.op == "rms_norm" else EPS
    ref_y, saved = numpy_forward(case, f64[0], f64[2], f64[3], eps)
    want = (ref_y,) + numpy_backward(case, f64[1], saved, f64[2])
    err, ok = 0.0, True
    for g, r in zip(got, want):
        e = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        err = max(err, e)
        ok &= g.shape == r.shape and g.dtype == x.dtype and \
            e <= TOLERANCE[dtype] * max(1.0, float(np.max(np.abs(r))))
    return err, bool(ok)


def run_self_check():
    import cynorm as cn
    from cynorm._kernels.runtime import openmp_enabled

    print(f"cynorm {cn.__version__}, numpy {np.__version__}, Python "
          f"{platform.python_version()}")
    omp = "enabled" if openmp_enabled() else "NOT enabled (single-threaded build)"
    print(f"OpenMP: {omp}; threads: {cn.get_num_threads()}")
    kernels = cn.show_config("dicts")["kernels"]
    print(f"kernels: {kernels['level']} ({kernels['compiler flags']}), {kernels['reason']}")
    available = [op for op in OPS if hasattr(cn, op) and hasattr(cn, op + "_backward")]
    print("ops: " + ", ".join(available))
    print("\nforward + backward against a float64 NumPy reference:")
    rng = np.random.default_rng(1234)
    rows, failed = [], False
    for case in SELF_CHECK:
        if case.op not in available:
            rows.append({"op": case.op, "shape": case_label(case), "dtype": "-",
                         "err": None, "result": "SKIP (not in this build)"})
            continue
        for dtype in ("float32", "float64"):
            try:
                err, ok = check_case(cn, case, dtype, rng)
                result = "PASS" if ok else "FAIL"
            except Exception as e:  # a crash is a failure to report, not to hide
                err, ok, result = None, False, f"FAIL ({type(e).__name__}: {e})"
            failed |= not ok
            rows.append({"op": case.op, "shape": case_label(case), "dtype": dtype,
                         "err": err, "result": result})
    print_table(rows, [("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                       ("max abs err", "err", ".2e"), ("result", "result", "")])
    print("\n" + ("FAIL: some checks failed" if failed else "all checks PASS"))
    return 1 if failed else 0

