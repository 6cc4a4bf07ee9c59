"""Optional comparison columns: ONNX Runtime, OpenVINO and JAX (jit), each used only when
importable (never a dependency of cynorm).

One place builds every anchor's callable, for the main suite (cynorm.bench.measure) and
for the fused blocks (cynorm.bench.fused):

  onnxruntime  an ONNX graph of the library's own normalization op (LayerNormalization,
               opset 17; SimplifiedLayerNormalization for RMSNorm; GroupNormalization,
               opset 21, or the InstanceNormalization graph exporters write where that
               is missing; InstanceNormalization; BatchNormalization in training mode),
               built with the `onnx` package; inference only.
  openvino     the same ops from OpenVINO's own opsets (GroupNormalization, MVN, the
               RMSNorm pattern its CPU plugin fuses, Swish), compiled for the CPU with an
               f32 inference precision hint; inference only.
  jax          the jax.numpy formulas under jax.jit, on arrays already on the device,
               waited for with block_until_ready; forward, and forward+backward through
               jax.vjp (dx, dweight, dbias, as cynorm's backward returns).

Each anchor allocates its output, as its users get it. Before an anchor is timed its
result is checked against the float64 reference (cynorm.bench.reference) at a tolerance
that fits the storage dtype, so a wrong graph cannot make a flattering ratio: an anchor
that fails the check, or cannot run a case (an op or dtype it lacks), leaves its cell
empty with a note saying why.

Threads: ONNX Runtime and OpenVINO take the thread count when a session or compiled
model is made, so one is made per thread count. XLA sizes its CPU thread pool once, at
import: JAX is therefore timed only at the thread count it was started with (all usable
cores, or 1 when XLA_FLAGS limits it; see `jax_threads`).
"""
import importlib
import os

import numpy as np

from cynorm.bench.reference import numpy_backward, numpy_forward
from cynorm.bench.suite import EPS, ROW_OPS

# (column key, importable module, label in tables)
ANCHORS = (("ort", "onnxruntime", "ORT"), ("ov", "openvino", "OpenVINO"),
           ("jax", "jax", "JAX"))
LABELS = {key: label for key, _, label in ANCHORS}
FUSED_EPS = 1e-6  # the fused bench's rms_norm eps (cynorm.bench.fused uses the same)


class AnchorUnavailable(Exception):
    """This anchor cannot run this case (missing op, dtype, or a failed check)."""


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def available(wanted=None):
    """{key: version} of the anchors importable here (onnxruntime also needs onnx to
    build its graphs). wanted: an iterable of keys to consider (default all)."""
    out = {}
    for key, module, _ in ANCHORS:
        if wanted is not None and key not in wanted:
            continue
        v = _version(module)
        if v is None:
            continue
        if key == "ort":
            onnx_v = _version("onnx")
            if onnx_v is None:
                continue
            v = f"{v} (onnx {onnx_v})"
        if key == "jax":
            v = f"{v} (jaxlib {_version('jaxlib')}, {jax_threads()} threads)"
        out[key] = v
    return out


def jax_threads():
    """The thread count XLA's CPU pool runs with in this process: 1 when XLA_FLAGS
    turns Eigen's multi-threading off (as `limit_jax_threads` does), else all usable
    cores."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_multi_thread_eigen=false" in flags:
        return 1
    from cynorm.bench.machine import all_threads
    return all_threads()


def limit_jax_threads():
    """Before JAX is imported: run XLA's CPU work on one thread (for a 1-thread run)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_multi_thread_eigen=false" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()


# ---- the check against the float64 reference ---------------------------------------

def tolerance(dtype):
    """(rtol, atol) for an anchor's result against the float64 reference, on values of
    order 1 (normalized outputs): float32 arithmetic, whatever its accumulation, stays
    well inside 1e-3; a wrong graph (eps, axis, affine, statistics) is far outside."""
    return (1e-3, 1e-3) if np.dtype(dtype) == np.float32 else (1e-9, 1e-9)


def check_close(name, got, want, dtype):
    """AnchorUnavailable unless got matches want (float64) to the dtype's tolerance."""
    got = np.asarray(got)
    if got.shape != want.shape:
        raise AnchorUnavailable(f"{name}: shape {got.shape}, expected {want.shape}")
    rtol, atol = tolerance(dtype)
    err = np.abs(got.astype(np.float64) - want)
    bad = ~(err <= atol + rtol * np.abs(want))
    if bad.any():
        raise AnchorUnavailable(f"{name} differs from the float64 reference (max abs "
                                f"error {np.nanmax(err):.2e}; {_tolerance_text(dtype)}), "
                                "not timed")


def _tolerance_text(dtype):
    rtol, atol = tolerance(dtype)
    return f"tolerance {atol:g} + {rtol:g}|ref| for {np.dtype(dtype).name}"


def reference(case, x, w, b, dy=None):
    """The float64 forward (and, with dy, backward) the anchors are checked against."""
    f64 = [None if a is None else np.asarray(a, np.float64) for a in (x, w, b, dy)]
    eps = np.finfo(x.dtype).eps if case.op == "rms_norm" else EPS
    y, saved = numpy_forward(case, f64[0], f64[1], f64[2], eps=eps)
    if dy is None:
        return y
    return y, numpy_backward(case, f64[3], saved, f64[1])


def _eps(case, dtype):
    return float(np.finfo(dtype).eps) if case.op == "rms_norm" else EPS


# ---- ONNX Runtime -------------------------------------------------------------------

def _onnx_model(nodes, inputs, outputs, initializers, opset, ms_domain=False):
    from onnx import helper
    graph = helper.make_graph(nodes, "cynorm_anchor", inputs, outputs, initializers)
    imports = [helper.make_opsetid("", opset)]
    if ms_domain:
        imports.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = min(model.ir_version, 10)
    return model.SerializeToString()


def _ort_case_models(case, x, w, b):
    """[(description, serialized model)] to try in order for one suite case: input
    "x", output "y"; weight and bias are initializers."""
    from onnx import TensorProto, helper, numpy_helper
    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    vin = helper.make_tensor_value_info("x", elem, list(x.shape))
    vout = helper.make_tensor_value_info("y", elem, list(x.shape))
    init = [numpy_helper.from_array(w, "w")]
    if b is not None:
        init.append(numpy_helper.from_array(b, "b"))
    eps = _eps(case, x.dtype)
    op, C = case.op, x.shape[1] if x.ndim > 1 else 1
    if op == "layer_norm":
        n = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1,
                             epsilon=eps)
        return [("LayerNormalization-17", _onnx_model([n], [vin], [vout], init, 17))]
    if op == "rms_norm":
        models = []
        n = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1,
                             epsilon=eps)
        models.append(("SimplifiedLayerNormalization",
                       _onnx_model([n], [vin], [vout], init, 17)))
        n = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=eps)
        models.append(("RMSNormalization-23", _onnx_model([n], [vin], [vout], init, 23)))
        return models
    if op == "instance_norm":
        n = helper.make_node("InstanceNormalization", ["x", "w", "b"], ["y"], epsilon=eps)
        return [("InstanceNormalization", _onnx_model([n], [vin], [vout], init, 17))]
    if op == "batch_norm":
        init += [numpy_helper.from_array(np.zeros(C, x.dtype), "rm"),
                 numpy_helper.from_array(np.ones(C, x.dtype), "rv")]
        n = helper.make_node("BatchNormalization", ["x", "w", "b", "rm", "rv"],
                             ["y", "rm_out", "rv_out"], epsilon=eps, momentum=0.9,
                             training_mode=1)
        outs = [vout] + [helper.make_tensor_value_info(s, elem, [C])
                         for s in ("rm_out", "rv_out")]
        return [("BatchNormalization-15 training",
                 _onnx_model([n], [vin], outs, init, 15))]
    # group_norm
    G = case.groups
    models = []
    n = helper.make_node("GroupNormalization", ["x", "w", "b"], ["y"], epsilon=eps,
                         num_groups=G)
    models.append(("GroupNormalization-21", _onnx_model([n], [vin], [vout], init, 21)))
    # the graph exporters write: InstanceNormalization over (N, G, -1), then the affine
    ones, zeros = np.ones(G, x.dtype), np.zeros(G, x.dtype)
    bshape = [C] + [1] * (x.ndim - 2)
    init2 = [numpy_helper.from_array(w.reshape(bshape), "w"),
             numpy_helper.from_array(b.reshape(bshape), "b"),
             numpy_helper.from_array(ones, "ones"), numpy_helper.from_array(zeros, "zeros"),
             numpy_helper.from_array(np.array([0, G, -1], np.int64), "gshape"),
             numpy_helper.from_array(np.array(x.shape, np.int64), "xshape")]
    nodes = [helper.make_node("Reshape", ["x", "gshape"], ["xg"]),
             helper.make_node("InstanceNormalization", ["xg", "ones", "zeros"], ["ng"],
                              epsilon=eps),
             helper.make_node("Reshape", ["ng", "xshape"], ["n"]),
             helper.make_node("Mul", ["n", "w"], ["nw"]),
             helper.make_node("Add", ["nw", "b"], ["y"])]
    models.append(("InstanceNormalization graph",
                   _onnx_model(nodes, [vin], [vout], init2, 17)))
    return models


def _ort_session(model, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _first_that_works(candidates, build, check):
    """The first candidate whose built callable runs and passes check: (fn, desc)."""
    why = []
    for desc, model in candidates:
        try:
            fn = build(model)
            check(fn)
        except AnchorUnavailable as e:
            why.append(f"{desc}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - an op or dtype the library lacks
            why.append(f"{desc}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        return fn, desc
    raise AnchorUnavailable("; ".join(why))


# ---- OpenVINO -----------------------------------------------------------------------

def _ov_ops():
    import openvino as ov
    return ov, ov.opset13


def _ov_rms(ops, h, w, eps, axis=-1):
    """The RMSNorm pattern OpenVINO's CPU plugin fuses into its RMS kernel:
    x * 1 / sqrt(mean(x^2) + eps) * w."""
    dtype = h.get_element_type().to_dtype()
    c = (lambda v: ops.constant(np.array(v, dtype)))  # noqa: E731
    ms = ops.reduce_mean(ops.power(h, c(2.0)), ops.constant(np.array([axis], np.int64)),
                         keep_dims=True)
    rs = ops.divide(c(1.0), ops.sqrt(ops.add(ms, c(eps))))
    return ops.multiply(ops.multiply(h, rs), ops.constant(w))


def _ov_affine(ops, n, w, b, ndim):
    shape = [w.shape[0]] + [1] * (ndim - 2) if ndim > 2 else [w.shape[0]]
    n = ops.multiply(n, ops.constant(w.reshape(shape)))
    return n if b is None else ops.add(n, ops.constant(b.reshape(shape)))


def _ov_case_model(case, x, w, b):
    ov, ops = _ov_ops()
    p = ops.parameter(list(x.shape), ov.Type.f32 if x.dtype == np.float32 else ov.Type.f64,
                      name="x")
    eps = _eps(case, x.dtype)
    op = case.op
    axes = lambda a: ops.constant(np.array(a, np.int64))  # noqa: E731
    if op == "group_norm":
        y = ops.group_normalization(p, ops.constant(w), ops.constant(b), case.groups, eps)
    elif op == "rms_norm":
        y = _ov_rms(ops, p, w, eps)
    elif op == "layer_norm":
        n = ops.mvn(p, axes([x.ndim - 1]), True, eps, "inside_sqrt")
        y = _ov_affine(ops, n, w, b, 2)
    else:  # instance_norm: the spatial axes; batch_norm (training): N and the spatial
        red = list(range(2, x.ndim)) if op == "instance_norm" else \
            [0] + list(range(2, x.ndim))
        y = _ov_affine(ops, ops.mvn(p, axes(red), True, eps, "inside_sqrt"), w, b, x.ndim)
    return ov.Model([y], [p], "cynorm_anchor")


def _ov_compile(model, threads):
    ov, _ = _ov_ops()
    core = ov.Core()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": threads,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    return req


def _ov_call(req, arrays):
    """One inference on the given input arrays; the outputs allocated as returned."""
    def fn():
        res = req.infer(arrays, share_inputs=True, share_outputs=False)
        return tuple(res.values())
    return fn


# ---- JAX ----------------------------------------------------------------------------

def _jax():
    import jax
    jax.config.update("jax_enable_x64", True)
    return jax, jax.numpy


def _jax_norm(jnp, case, eps, groups=None):
    """The op as jax.numpy formulas on x, w, b (statistics in x's dtype, as jnp does)."""
    op = case.op

    def f(x, w, b):
        if op in ROW_OPS:
            if op == "rms_norm":
                n = x * _rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
                return n * w
            m = jnp.mean(x, axis=-1, keepdims=True)
            v = jnp.mean(jnp.square(x - m), axis=-1, keepdims=True)
            return (x - m) * _rsqrt(v + eps) * w + b
        N, C = x.shape[:2]
        bshape = (1, C) + (1,) * (x.ndim - 2)
        if op == "batch_norm":
            red = (0,) + tuple(range(2, x.ndim))
            m = jnp.mean(x, axis=red, keepdims=True)
            v = jnp.mean(jnp.square(x - m), axis=red, keepdims=True)
            n = (x - m) * _rsqrt(v + eps)
        else:
            G = groups if op == "group_norm" else C
            xs = x.reshape(N, G, -1)
            m = jnp.mean(xs, axis=-1, keepdims=True)
            v = jnp.mean(jnp.square(xs - m), axis=-1, keepdims=True)
            n = ((xs - m) * _rsqrt(v + eps)).reshape(x.shape)
        return n * w.reshape(bshape) + b.reshape(bshape)
    return f


def _rsqrt(v):
    import jax
    return jax.lax.rsqrt(v)


def _jax_case_calls(case, x, w, b, dy):
    """(forward, forward+backward) jitted on device arrays, each returning its
    result(s) after block_until_ready."""
    jax, jnp = _jax()
    eps = _eps(case, x.dtype)
    f = _jax_norm(jnp, case, eps, case.groups)
    bb = np.zeros_like(w) if b is None else b  # rms_norm: a zero bias, not differentiated
    args = [jax.device_put(a) for a in (x, w, bb, dy)]
    fwd = jax.jit(f)

    if case.op == "rms_norm":
        def fb(x, w, b, dy):
            y, vjp = jax.vjp(lambda x, w: f(x, w, b), x, w)
            return vjp(dy)
    else:
        def fb(x, w, b, dy):
            y, vjp = jax.vjp(f, x, w, b)
            return vjp(dy)
    fb = jax.jit(fb)
    return (lambda: fwd(*args[:3]).block_until_ready(),
            lambda: jax.block_until_ready(fb(*args)))


# ---- the suite's anchors ------------------------------------------------------------

class CaseAnchors:
    """The anchors' callables for one suite case on the given arrays, checked once
    against the float64 reference. calls(n) -> {pass: {key: fn}} for n threads; notes:
    why an anchor has no cell for this case."""

    def __init__(self, case, x, dy, w, b, keys):
        self.case, self.x, self.dy, self.w, self.b = case, x, dy, w, b
        self.keys = list(keys)
        self.notes = []
        self._models, self._jax = {}, None
        self.graphs = {}  # the ONNX graph ORT ran, when it had several to try
        self._ref = None

    def _note(self, key, e):
        msg = f"{LABELS[key]} {self.case.op} {self.x.dtype}: {e}"
        if msg not in self.notes:
            self.notes.append(msg)
        self.keys = [k for k in self.keys if k != key]

    def ref(self):
        if self._ref is None:
            self._ref = reference(self.case, self.x, self.w, self.b, self.dy)
        return self._ref

    def _fwd_check(self):
        want = self.ref()[0]
        return lambda fn: check_close("the result", fn()[0], want, self.x.dtype)

    def calls(self, threads):
        out = {"fwd": {}, "fwd+bwd": {}}
        for key in list(self.keys):
            try:
                if key == "ort":
                    out["fwd"][key] = self._ort(threads)
                elif key == "ov":
                    out["fwd"][key] = self._ov(threads)
                elif key == "jax" and threads == jax_threads():
                    out["fwd"][key], out["fwd+bwd"][key] = self._jax_calls()
            except AnchorUnavailable as e:
                self._note(key, e)
        return out

    def _ort(self, threads):
        case, x = self.case, self.x
        if "ort" not in self._models:
            self._models["ort"] = _ort_case_models(case, x, self.w, self.b)
        feed = {"x": x}

        def build(model):
            sess = _ort_session(model, threads)
            return lambda: sess.run(None, feed)

        fn, desc = _first_that_works(self._models["ort"], build,
                                     self._fwd_check())
        self._models["ort"] = [(d, m) for d, m in self._models["ort"] if d == desc]
        self.graphs["ort"] = desc
        return fn

    def _ov(self, threads):
        if "ov" not in self._models:
            try:
                self._models["ov"] = _ov_case_model(self.case, self.x, self.w, self.b)
            except Exception as e:  # noqa: BLE001
                raise AnchorUnavailable(f"{type(e).__name__}: {e}") from None
        arrays = {0: self.x}
        fn, _ = _first_that_works(
            [("opset13", self._models["ov"])],
            lambda m: _ov_call(_ov_compile(m, threads), arrays), self._fwd_check())
        return fn

    def _jax_calls(self):
        if self._jax is None:
            try:
                fwd, fb = _jax_case_calls(self.case, self.x, self.w, self.b, self.dy)
            except Exception as e:  # noqa: BLE001
                raise AnchorUnavailable(f"{type(e).__name__}: {e}") from None
            y_ref, grads_ref = self.ref()
            check_close("the result", fwd(), y_ref, self.x.dtype)
            got = fb()
            for g, want, what in zip(got, grads_ref, ("dx", "dweight", "dbias")):
                check_close(f"the backward's {what}", g, want, self.x.dtype)
            self._jax = (fwd, fb)
        return self._jax


# ---- the fused blocks' anchors ------------------------------------------------------

def fused_reference(block, x, w, b, r=None, groups=32):
    """float64 result of a fused block: GroupNorm then SiLU, or (norm(x + r), x + r)."""
    from cynorm.bench.suite import Case
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    if block == "gn_silu":
        y, _ = numpy_forward(Case("group_norm", x.shape, groups), f64(x), f64(w), f64(b))
        return (y / (1.0 + np.exp(-y)),)
    h = f64(x) + f64(r)
    op = "rms_norm" if block == "add_rms_norm" else "layer_norm"
    y, _ = numpy_forward(Case(op, x.shape, None), h, f64(w), f64(b),
                         eps=FUSED_EPS if op == "rms_norm" else EPS)
    return (y, h)


def _ov_fused_model(block, x, w, b, groups):
    ov, ops = _ov_ops()
    p = ops.parameter(list(x.shape), ov.Type.f32, name="x")
    if block == "gn_silu":
        y = ops.swish(ops.group_normalization(p, ops.constant(w), ops.constant(b),
                                              groups, EPS))
        return ov.Model([y], [p], "gn_silu"), 1
    q = ops.parameter(list(x.shape), ov.Type.f32, name="r")
    h = ops.add(p, q)
    if block == "add_rms_norm":
        y = _ov_rms(ops, h, w, FUSED_EPS)
    else:
        y = _ov_affine(ops, ops.mvn(h, ops.constant(np.array([x.ndim - 1], np.int64)),
                                    True, EPS, "inside_sqrt"), w, b, 2)
    return ov.Model([y, h], [p, q], block), 2


def _jax_fused(block, groups):
    jax, jnp = _jax()
    if block == "gn_silu":
        from cynorm.bench.suite import Case
        gn = _jax_norm(jnp, Case("group_norm", None, groups), EPS, groups)
        return lambda x, w, b: jax.nn.silu(gn(x, w, b))
    op = "rms_norm" if block == "add_rms_norm" else "layer_norm"
    from cynorm.bench.suite import Case
    norm = _jax_norm(jnp, Case(op, None, None), FUSED_EPS if op == "rms_norm" else EPS)

    def f(x, r, w, b):
        h = x + r
        return norm(h, w, b), h
    return f


def fused_anchor_calls(block, threads, keys, x, w, b, r=None, dy=None, groups=32):
    """{name: fn} for the fused block's anchors at this thread count (names
    "<key>_fwd", and "jax_fb" for JAX's forward+backward), each checked against the
    float64 composite first; and the notes for the anchors left out."""
    calls, notes = {}, []
    want = fused_reference(block, x, w, b, r, groups)
    bb = np.zeros_like(w) if b is None else b

    def check(name, got):
        for g, wv in zip(got, want):
            check_close(name, g, wv, x.dtype)

    for key in keys:
        try:
            if key == "ov":
                model, n_in = _ov_fused_model(block, x, w, bb, groups)
                fn = _ov_call(_ov_compile(model, threads),
                              {0: x} if n_in == 1 else {0: x, 1: r})
                check("the result", fn())
                calls["ov_fwd"] = fn
            elif key == "jax" and threads == jax_threads():
                jax, _ = _jax()
                f = _jax_fused(block, groups)
                args = [jax.device_put(a) for a in
                        ((x, w, bb) if block == "gn_silu" else (x, r, w, bb))]
                ff = jax.jit(f)
                fwd = lambda: jax.block_until_ready(ff(*args))  # noqa: E731
                got = fwd()
                check("the result", got if isinstance(got, tuple) else (got,))
                calls["jax_fwd"] = fwd
                if dy is not None:
                    dyd = jax.device_put(dy)
                    if block == "gn_silu":
                        fbf = jax.jit(lambda x, w, b, d: jax.vjp(f, x, w, b)[1](d))
                        calls["jax_fb"] = (lambda: jax.block_until_ready(
                            fbf(*args, dyd)))
                    else:
                        # the cotangent of y; h flows on to the next block
                        rms = block == "add_rms_norm"

                        def fb_row(x, r, w, b, d):
                            if rms:
                                g = lambda x, r, w: f(x, r, w, b)[0]  # noqa: E731
                                return jax.vjp(g, x, r, w)[1](d)
                            g = lambda x, r, w, b: f(x, r, w, b)[0]  # noqa: E731
                            return jax.vjp(g, x, r, w, b)[1](d)
                        fbr = jax.jit(fb_row)
                        calls["jax_fb"] = (lambda: jax.block_until_ready(
                            fbr(*args, dyd)))
        except AnchorUnavailable as e:
            notes.append(f"{LABELS[key]} {block}: {e}")
        except Exception as e:  # noqa: BLE001 - an op the library lacks
            notes.append(f"{LABELS[key]} {block}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}")
    return calls, notes
