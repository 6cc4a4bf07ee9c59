"""Property-based fuzzing of cynorm's whole public API.

The promise: every call either returns what a plain float64 NumPy reference computes
(within a tolerance set by the dtype and by how well-conditioned the answer is), or raises
TypeError/ValueError with a message naming the offending argument. No other exception,
no crash, no silent wrong answer, for random shapes (zero-size and size-1 dims, sets larger
than the kernels' 4096-element pieces), groups, dtypes, memory layouts (Fortran order,
negative strides, stepped slices, zero-stride broadcast views, read-only, byte-swapped,
unaligned, nested lists), `out` (fresh, aliasing an input, or bad) and bad arguments.

The references (plain float64 NumPy) and the comparison live in tests/hardening_reference.py.

The number of examples per op comes from the hypothesis profile (tests/conftest.py:
CYNORM_HYPOTHESIS_PROFILE=ci, the default, derandomized; =fuzz, long and randomized);
CYNORM_FUZZ_EXAMPLES overrides it for this file.
"""
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cynorm  # noqa: E402
from hardening_reference import (  # noqa: E402
    TOL, as_shape, assert_close, chan_view, check_backward, check_running_stats,
    forward_scale, prod, ref_batch_norm, ref_batch_norm_backward, ref_group_norm,
    ref_group_norm_backward, ref_layer_norm, ref_layer_norm_backward,
)

threadpoolctl = pytest.importorskip("threadpoolctl")

# Everything not set here (derandomize, database, print_blob) comes from the loaded profile.
MAX_EXAMPLES = int(os.environ.get("CYNORM_FUZZ_EXAMPLES", settings.default.max_examples))
FUZZ = settings(parent=settings.default, max_examples=MAX_EXAMPLES, deadline=None,
                suppress_health_check=list(HealthCheck))

# Elements per normalisation set above which the kernels cut a set into pieces.
CHUNK = 4096
# Cap on the elements of one fuzzed x, to keep the suite fast; BIG_SIZE for the shapes
# drawn to exercise the split (piece) kernels and, above 65536 elements, the threads.
MAX_SIZE = 30000
BIG_SIZE = 200000


# ==== inputs in every memory layout ======================================================

LAYOUTS = ["c", "c", "c", "f", "neg", "step", "readonly", "bswap", "unaligned", "bcast",
           "list", "subclass"]


def _values(rng, shape, mode, dtype=np.float64):
    """Logical float64 values of an input: normal with an offset, integers (many ties),
    a constant, wide magnitudes, or extreme magnitudes for the dtype."""
    if mode == "extreme":
        big = 1e30 if np.dtype(dtype) == np.float32 else 1e150
        center = big ** float(rng.choice([1.0, -1.0]))  # 1e30 or 1e-30 (1e150, 1e-150)
        return center * (1 + 0.1 * rng.standard_normal(shape))
    if mode == "normal":
        scale = 10.0 ** rng.integers(-3, 4)
        return rng.standard_normal(shape) * scale + rng.integers(-3, 4) * scale
    if mode == "ints":
        return rng.integers(-3, 4, size=shape).astype(np.float64)
    if mode == "const":
        return np.full(shape, 1.5)
    # "wide": every element its own magnitude
    return rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 5, size=shape)


def make_input(rng, shape, dtype, layout, mode="normal"):
    """(logical values as the dtype, the object to pass) for an input of `shape`."""
    dtype = np.dtype(dtype)
    vals = _values(rng, shape, mode, dtype)
    if layout == "bcast" and len(shape) and shape[0] > 1:
        vals = np.broadcast_to(vals[:1], shape)
        a = vals.astype(dtype)
        logical = np.array(a)
        return logical, np.broadcast_to(a[:1], shape)  # zero stride along axis 0
    a = np.ascontiguousarray(vals, dtype=dtype)
    logical = a.copy()
    if layout == "f":
        return logical, np.asfortranarray(a)
    if layout == "neg" and a.ndim:
        ax = int(rng.integers(a.ndim))
        return logical, np.flip(np.flip(a, ax).copy(), ax)
    if layout == "step" and a.ndim:
        ax = int(rng.integers(a.ndim))
        big_shape = list(a.shape)
        big_shape[ax] *= 3
        big = np.full(big_shape, np.nan, dtype=dtype)
        sl = [slice(None)] * a.ndim
        sl[ax] = slice(1, None, 3)
        big[tuple(sl)] = a
        return logical, big[tuple(sl)]
    if layout == "readonly":
        a.setflags(write=False)
        return logical, a
    if layout == "bswap":
        return logical, a.astype(dtype.newbyteorder(">" if dtype.byteorder != ">" else "<"))
    if layout == "unaligned":
        buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
        u = np.frombuffer(buf.data, dtype=dtype, count=a.size, offset=1).reshape(a.shape)
        u[...] = a
        return logical, u
    if layout == "list" and dtype == np.float64 and 0 not in a.shape:
        # (a nested list of an empty array loses its shape)
        return logical, a.tolist()
    if layout == "subclass":
        return logical, a.view(_Sub)
    return logical, a


class _Sub(np.ndarray):
    """An ndarray subclass: cynorm should treat it as a plain array."""


def passed_dtype(obj, dtype):
    return np.dtype(np.float64) if isinstance(obj, list) else np.dtype(dtype)


# ==== bad arguments =======================================================================

def _bad_array(rng, shape, kind):
    """A bad value for an array argument; returns (value, expected exception types)."""
    if kind == "int":
        return np.ones(shape, dtype=np.int32), (TypeError,)
    if kind == "i16":  # 2-byte but not a float: never taken for float16/bfloat16
        return np.ones(shape, dtype=np.int16), (TypeError,)
    if kind == "complex":
        return np.ones(shape, dtype=np.complex128), (TypeError,)
    if kind == "object":
        return np.full(shape, None, dtype=object), (TypeError,)
    if kind == "bool":
        return np.ones(shape, dtype=bool), (TypeError,)
    if kind == "str":
        return "not an array", (TypeError,)
    if kind == "none":
        return None, (TypeError,)
    if kind == "ragged":
        return [[1.0, 2.0], [3.0]], (TypeError, ValueError)
    if kind == "extra_dim":
        return np.ones(tuple(shape) + (2,)), (ValueError,)
    if kind == "short":
        s = list(shape) or [1]
        s[-1] = s[-1] + 1
        return np.ones(s[1:] if len(s) > 1 and rng.random() < 0.5 else s), (ValueError,)
    raise AssertionError(kind)


ARRAY_BAD = ["int", "i16", "complex", "object", "bool", "str", "none", "ragged",
             "extra_dim", "short"]
# optional parameters: None is valid; float16 is a float and is cast (valid)
PARAM_BAD = ["int", "complex", "object", "bool", "str", "extra_dim", "short", "ragged"]
EPS_BAD = [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
           (None, TypeError), (1j, TypeError), ([1e-5, 1e-5], TypeError),
           (object(), TypeError), ("not a number", TypeError), ("1e-5", TypeError)]
STATS_BAD = [("two-pass", ValueError), ("", ValueError), (None, ValueError),
             (1, ValueError), ([], ValueError)]


def bad_out(rng, shape, dtype, inputs):
    """A bad out=; returns (value, expected types), or (("overlap", input, out), types)
    for an input to pass in place of one of `inputs` and an out partially overlapping it."""
    kinds = ["list", "shape", "dtype", "noncontig", "readonly", "overlap"]
    kind = kinds[int(rng.integers(len(kinds)))]
    size = prod(shape)
    if kind == "list":
        return np.zeros(shape).tolist(), (TypeError,)
    if kind == "shape":
        return np.zeros((size + 1,), dtype=dtype), (ValueError,)
    if kind == "dtype":
        other = np.float32 if np.dtype(dtype) == np.float64 else np.float64
        return np.zeros(shape, dtype=other), (TypeError,)
    if kind == "noncontig" and size > 1 and len(shape) >= 1:
        big = np.zeros(tuple(shape[:-1]) + (shape[-1] * 2,), dtype=dtype)
        return big[..., ::2], (ValueError,)
    if kind == "readonly":
        o = np.zeros(shape, dtype=dtype)
        o.setflags(write=False)
        return o, (ValueError,)
    if kind == "overlap" and size >= 2:
        # an input and out on the same memory, shifted by one element: a partial overlap
        flat = np.zeros(size + 1, dtype=dtype)
        return ("overlap", flat[:-1].reshape(shape), flat[1:].reshape(shape)), (ValueError,)
    return np.zeros((size + 2,), dtype=dtype), (ValueError,)


def expect_error(call, types, names):
    """call() must raise one of `types` whose message names one of `names`."""
    event("bad argument")
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    err = info.value
    assert isinstance(err, types), f"expected {[t.__name__ for t in types]}, got {err!r}"
    msg = str(err)
    assert any(n in msg for n in names), f"message does not name {names}: {msg!r}"


def run_call(fn, args, kwargs):
    """Call fn; any exception but TypeError/ValueError is a failure in itself."""
    event("valid call" + (", out= given" if kwargs.get("out") is not None else ""))
    try:
        return fn(*args, **kwargs), None
    except (TypeError, ValueError) as e:
        return None, e


# ==== shape strategies ====================================================================

SPATIAL = [0, 1, 1, 2, 3, 5, 7, 16, 33, 100, 1100, 4097]


def _cap(shape):
    return prod(shape) <= MAX_SIZE


@st.composite
def nc_shapes(draw):
    """(N, C, *spatial) with at most MAX_SIZE elements; dims 0 and 1 included."""
    if draw(st.integers(0, 3)) == 0:
        # sets larger than a piece, fewer than 4 per thread: the split kernels
        N = draw(st.sampled_from([1, 2, 3]))
        C = draw(st.sampled_from([1, 2, 3, 4]))
        sp = draw(st.sampled_from([(1100, 3), (4097,), (2, 2049), (8191,), (70, 70),
                                   (16385,), (130, 257)]))
        shape = (N, C) + sp
        if prod(shape) <= BIG_SIZE:
            return shape
    while True:
        N = draw(st.sampled_from([0, 1, 1, 2, 3, 4, 9]))
        sp = tuple(draw(st.lists(st.sampled_from(SPATIAL), min_size=0, max_size=3)))
        C = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12]))
        if draw(st.integers(0, 30)) == 0:
            C = 0
        shape = (N, C) + sp
        if _cap(shape):
            return shape


@st.composite
def row_shapes(draw):
    """(lead..., trailing...) and the normalized_shape (int or tuple)."""
    if draw(st.integers(0, 4)) == 0:
        # long rows, or many rows: the split kernels and the threads
        lead = draw(st.sampled_from([(1,), (2,), (3,), (2, 3), (40,), (300,)]))
        trail = draw(st.sampled_from([(4097,), (16385,), (3000,), (70, 70), (512,)]))
        shape = lead + trail
        if prod(shape) <= BIG_SIZE:
            return shape, (trail[0] if len(trail) == 1 else trail)
    while True:
        lead = tuple(draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 5, 33, 70]),
                                   min_size=0, max_size=2)))
        trail = tuple(draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 8, 17, 100, 4097,
                                                     5000]), min_size=1, max_size=2)))
        if draw(st.integers(0, 10)) and 0 in trail:
            continue  # empty rows, but rarely
        shape = lead + trail
        if _cap(shape):
            as_int = len(trail) == 1 and draw(st.booleans())
            ns = trail[0] if as_int else (list(trail) if draw(st.booleans()) else trail)
            return shape, ns


# ==== common draws ========================================================================

def draw_common(data, rng):
    dtype = np.dtype(data.draw(st.sampled_from([np.float32, np.float64]), label="dtype"))
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    mode = data.draw(st.sampled_from(["normal", "normal", "ints", "const", "wide",
                                      "extreme"]), label="mode")
    threads = data.draw(st.sampled_from([None, 1, 3]), label="threads")
    return dtype, layout, mode, threads


def draw_param(data, rng, shape, dtype, label):
    """An optional affine parameter: None, or an array in a random dtype and layout;
    returns (logical values as x's dtype or None, the object to pass)."""
    choice = data.draw(st.sampled_from(["none", "same", "other", "f16"]), label=label)
    if choice == "none":
        return None, None
    pdt = {"same": dtype, "other": np.float64 if dtype == np.float32 else np.float32,
           "f16": np.float16}[choice]
    layout = data.draw(st.sampled_from(["c", "neg", "step", "readonly", "bcast", "list",
                                        "unaligned"]), label=label + "_layout")
    logical, obj = make_input(rng, shape, pdt, layout)
    if isinstance(obj, list):
        logical = logical.astype(np.float64)
    return logical.astype(dtype), obj


def with_threads(threads, fn):
    if threads is None:
        return fn()
    with threadpoolctl.threadpool_limits(threads, user_api="openmp"):
        return fn()


def maybe_out(data, rng, shape, dtype, x_obj, aliases):
    """out=: None, a fresh array, or (when possible) one of `aliases` (the input objects
    that may be written in place). Returns (out object or None, name of the alias)."""
    choice = data.draw(st.sampled_from(["none", "none", "fresh", "alias"]), label="out")
    if choice == "fresh":
        return np.full(shape, np.nan, dtype=dtype), None
    if choice == "alias":
        for name, a in aliases:
            if (type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous
                    and a.flags.writeable and a.flags.aligned and a.shape == tuple(shape)):
                return a, name
    return None, None


# ==== the properties, one per op ===========================================================

def _check_fwd_outputs(res, return_stats, n_stats, out_obj, shape, dtype):
    if return_stats:
        assert isinstance(res, tuple) and len(res) == 1 + n_stats
        y = res[0]
    else:
        assert isinstance(res, np.ndarray), type(res)
        y = res
    assert type(y) is np.ndarray or out_obj is not None
    assert y.shape == tuple(shape) and y.dtype == dtype, (y.shape, y.dtype)
    if out_obj is not None:
        assert y is out_obj, "the result must be the out= array"
    return y


def _slab_case(data, op):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype, layout, mode, threads = draw_common(data, rng)
    shape = data.draw(nc_shapes(), label="shape")
    N, C = shape[:2]
    if op == "group_norm":
        divisors = [g for g in range(1, max(C, 1) + 1) if C % g == 0] if C else [1, 2, 3]
        G = data.draw(st.sampled_from(divisors), label="G")
    else:
        G = C
    if G and (C // G) * prod(shape[2:]) > CHUNK:
        event("sets cut into pieces")
    x_log, x_obj = make_input(rng, shape, dtype, layout, mode)
    dtype = passed_dtype(x_obj, dtype)
    x_log = x_log.astype(dtype)
    w_log, w_obj = draw_param(data, rng, (C,), dtype, "weight")
    b_log, b_obj = draw_param(data, rng, (C,), dtype, "bias")
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 1.0, np.float32(1e-4), 1]), label="eps")
    stats = data.draw(st.sampled_from(["two_pass", "welford"]), label="stats")
    return rng, dtype, layout, threads, shape, G, x_log, x_obj, w_log, w_obj, b_log, \
        b_obj, float(eps), eps, stats


@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
@FUZZ
@given(data=st.data())
def test_fuzz_slab_forward_matches_reference_or_raises(op, data):
    (rng, dtype, layout, threads, shape, G, x_log, x_obj, w_log, w_obj, b_log, b_obj, eps,
     eps_obj, stats) = _slab_case(data, op)
    N, C = shape[:2]
    return_stats = data.draw(st.booleans(), label="return_stats")
    fn = getattr(cynorm, op)
    pre = (x_obj, G) if op == "group_norm" else (x_obj,)
    kwargs = dict(weight=w_obj, bias=b_obj, eps=eps_obj, return_stats=return_stats,
                  stats=stats)
    bad = data.draw(st.sampled_from(["none"] * 4 + ["x", "weight", "bias", "eps", "stats",
                                                     "out", "G"]), label="bad")
    if bad == "G" and op == "instance_norm":
        bad = "none"
    if bad != "none":
        args = list(pre)
        if bad == "x":
            kind = data.draw(st.sampled_from(ARRAY_BAD + ["1d"]), label="kind")
            if kind == "1d":
                val, types = np.ones(4, dtype=dtype), (ValueError,)
            elif kind in ("extra_dim", "short"):
                return  # another valid shape, or one that only changes C
            else:
                val, types = _bad_array(rng, shape, kind)
            args[0] = val
            names = ["x"]
        elif bad == "G":
            val, types = data.draw(st.sampled_from(
                [(0, ValueError), (-1, ValueError), (2.0, TypeError), ("2", TypeError),
                 (None, TypeError), (max(C, 1) + 1, ValueError) if C else (0, ValueError),
                 (np.float64(1.0), TypeError), ([1], TypeError)]), label="G_bad")
            args[1] = val
            names = ["num_groups"]
        elif bad in ("weight", "bias"):
            kind = data.draw(st.sampled_from(PARAM_BAD), label="kind")
            val, types = _bad_array(rng, (C,), kind)
            kwargs[bad] = val
            names = [bad]
        elif bad == "eps":
            val, t = data.draw(st.sampled_from(EPS_BAD), label="eps_bad")
            kwargs["eps"], types, names = val, (t,), ["eps"]
        elif bad == "stats":
            val, t = data.draw(st.sampled_from(STATS_BAD), label="stats_bad")
            kwargs["stats"], types, names = val, (t,), ["stats"]
        else:
            val, types = bad_out(rng, shape, dtype, [x_obj, w_obj, b_obj])
            names = ["out"]
            if isinstance(val, tuple):  # partial overlap of x and out
                _, xa, oa = val
                xa[...] = x_log
                args[0], val = xa, oa
            kwargs["out"] = val
        expect_error(lambda: with_threads(threads, lambda: fn(*args, **kwargs)), types,
                     names)
        return

    out_obj, alias = maybe_out(data, rng, shape, dtype, x_obj, [("x", x_obj)])
    if out_obj is not None:
        kwargs["out"] = out_obj
    res, err = run_call(lambda *a, **k: with_threads(threads, lambda: fn(*a, **k)),
                        pre, kwargs)
    assert err is None, f"valid call raised {err!r}"
    y = _check_fwd_outputs(res, return_stats, 2, out_obj, shape, dtype)
    y_ref, m_ref, r_ref = ref_group_norm(x_log, G, w_log, b_log, eps)
    HW = prod(shape[2:])
    tol = TOL[dtype]
    cpg = C // G if G else 0
    ch_set = (np.arange(C) // cpg) if cpg else np.zeros(C, dtype=int)
    mb = m_ref[:, ch_set].reshape((N, C) + (1,) * (len(shape) - 2))
    rb = r_ref[:, ch_set].reshape(mb.shape)
    wb = (np.ones(C) if w_log is None else w_log.astype(np.float64)).reshape(
        (1, C) + (1,) * (len(shape) - 2))
    bb = (np.zeros(C) if b_log is None else b_log.astype(np.float64)).reshape(wb.shape)
    assert_close(f"{op} y", y, y_ref, forward_scale(x_log.astype(np.float64), mb, rb, wb,
                                                    bb), tol)
    if return_stats:
        _, mean, rstd = res
        assert mean.dtype == rstd.dtype == np.float64
        assert mean.shape == rstd.shape == (N, G)
        if cpg * HW == 0:  # empty sets: mean 0, rstd NaN (as torch)
            assert (mean == 0).all() and np.isnan(rstd).all(), (mean, rstd)
        nonempty = np.broadcast_to(np.asarray(cpg * HW > 0), (N, G))
        xmax = np.abs(x_log.astype(np.float64)).reshape(N, G, -1).max(axis=2) \
            if x_log.size else np.zeros((N, G))
        assert_close(f"{op} mean", mean[nonempty], m_ref[nonempty],
                     (xmax + 1e-300)[nonempty], tol)
        assert_close(f"{op} rstd", rstd[nonempty], r_ref[nonempty],
                     r_ref[nonempty] * (1 + m_ref[nonempty] ** 2 * r_ref[nonempty] ** 2),
                     tol)


@pytest.mark.parametrize("op", ["group_norm_backward", "instance_norm_backward"])
@FUZZ
@given(data=st.data())
def test_fuzz_slab_backward_matches_reference_or_raises(op, data):
    (rng, dtype, layout, threads, shape, G, x_log, x_obj, w_log, w_obj, _, _, eps, _,
     _) = _slab_case(data, op.replace("_backward", ""))
    N, C = shape[:2]
    dy_layout = data.draw(st.sampled_from(LAYOUTS), label="dy_layout")
    dy_log, dy_obj = make_input(rng, shape, dtype, dy_layout)
    if passed_dtype(dy_obj, dtype) != dtype:
        dy_obj = np.asarray(dy_obj, dtype=dtype)
    dy_log = dy_log.astype(dtype)
    _, m_ref, r_ref = ref_group_norm(x_log, G, eps=eps)
    # statistics as float64 from the reference, sometimes in another float dtype/layout
    st_kind = data.draw(st.sampled_from(["f64", "f64", "f32", "fortran", "list"]),
                        label="stats_kind")
    mean_obj, rstd_obj = m_ref, r_ref
    if st_kind == "f32" and dtype == np.float32:  # (float64 stats may not fit float32)
        mean_obj, rstd_obj = m_ref.astype(np.float32), r_ref.astype(np.float32)
    elif st_kind == "fortran":
        mean_obj, rstd_obj = np.asfortranarray(m_ref), np.asfortranarray(r_ref)
    elif st_kind == "list" and m_ref.size:
        mean_obj, rstd_obj = m_ref.tolist(), r_ref.tolist()
    m_use = np.asarray(mean_obj, dtype=np.float64)
    r_use = np.asarray(rstd_obj, dtype=np.float64)
    fn = getattr(cynorm, op)

    def args_for(dy, x, mean, rstd, G_):
        return (dy, x, mean, rstd, G_) if op == "group_norm_backward" else (dy, x, mean, rstd)

    kwargs = dict(weight=w_obj)
    bad = data.draw(st.sampled_from(["none"] * 4 + ["dy", "x", "mean", "rstd", "weight",
                                                     "out", "G", "dy_dtype"]), label="bad")
    if bad == "G" and op == "instance_norm_backward":
        bad = "none"
    if bad != "none":
        a = dict(dy=dy_obj, x=x_obj, mean=mean_obj, rstd=rstd_obj, G=G)
        if bad in ("dy", "x"):
            kind = data.draw(st.sampled_from(ARRAY_BAD), label="kind")
            if bad == "x" and kind in ("extra_dim", "short"):
                # a different x shape: then dy or the statistics do not match
                val, types = _bad_array(rng, shape, kind)
                names = ["x", "dy", "mean", "rstd", "num_groups", "weight"]
            else:
                val, types = _bad_array(rng, shape, kind)
                names = [bad]
            a[bad] = val
        elif bad == "dy_dtype":
            a["dy"] = np.zeros(shape, np.float64 if dtype == np.float32 else np.float32)
            types, names = (TypeError,), ["dy"]
        elif bad in ("mean", "rstd"):
            kind = data.draw(st.sampled_from(["int", "complex", "object", "str", "none",
                                              "extra_dim", "short", "ragged"]),
                             label="kind")
            val, types = _bad_array(rng, (N, G), kind)
            if kind == "none":
                types = (TypeError,)
            a[bad] = val
            names = [bad]
        elif bad == "weight":
            kind = data.draw(st.sampled_from(PARAM_BAD), label="kind")
            val, types = _bad_array(rng, (C,), kind)
            kwargs["weight"] = val
            names = ["weight"]
        elif bad == "G":
            val, types = data.draw(st.sampled_from(
                [(0, ValueError), (-2, ValueError), (1.5, TypeError), (None, TypeError),
                 ("1", TypeError)]), label="G_bad")
            a["G"] = val
            names = ["num_groups"]
        else:
            val, types = bad_out(rng, shape, dtype, [dy_obj, x_obj])
            names = ["out"]
            if isinstance(val, tuple):
                _, da, oa = val
                da[...] = dy_log
                a["dy"], val = da, oa
            kwargs["out"] = val
        args = args_for(a["dy"], a["x"], a["mean"], a["rstd"], a["G"])
        expect_error(lambda: with_threads(threads, lambda: fn(*args, **kwargs)), types,
                     names)
        return

    out_obj, alias = maybe_out(data, rng, shape, dtype, None, [("dy", dy_obj), ("x", x_obj)])
    if out_obj is not None:
        kwargs["out"] = out_obj
    res, err = run_call(lambda *a, **k: with_threads(threads, lambda: fn(*a, **k)),
                        args_for(dy_obj, x_obj, mean_obj, rstd_obj, G), kwargs)
    assert err is None, f"valid call raised {err!r}"
    dx, dw, db = res
    if out_obj is not None:
        assert dx is out_obj
    assert dx.shape == tuple(shape) and dx.dtype == dtype
    assert dw.shape == db.shape == (C,) and dw.dtype == db.dtype == dtype
    dx_ref, dw_ref, db_ref = ref_group_norm_backward(dy_log, x_log, m_use, r_use, G, w_log)
    check_backward(op, dtype, shape, dy_log, x_log, w_log, m_use, r_use,
                   (dx, dw, db), (dx_ref, dw_ref, db_ref), G=G)


# ---- BatchNorm ----------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_batch_norm_matches_reference_or_raises(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype, layout, mode, threads = draw_common(data, rng)
    shape = data.draw(nc_shapes(), label="shape")
    N, C = shape[:2]
    n = N * prod(shape[2:])
    if n > CHUNK:
        event("channels cut into pieces")
    training = data.draw(st.booleans(), label="training")
    x_log, x_obj = make_input(rng, shape, dtype, layout, mode)
    dtype = passed_dtype(x_obj, dtype)
    x_log = x_log.astype(dtype)
    w_log, w_obj = draw_param(data, rng, (C,), dtype, "weight")
    b_log, b_obj = draw_param(data, rng, (C,), dtype, "bias")
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 1.0]), label="eps")
    momentum = data.draw(st.sampled_from([0.1, 0.0, 1.0, 0.5]), label="momentum")
    stats = data.draw(st.sampled_from(["two_pass", "welford"]), label="stats")
    return_stats = data.draw(st.booleans(), label="return_stats")
    rdt = data.draw(st.sampled_from([np.float64, np.float32]), label="running_dtype")
    has_running = (not training) or data.draw(st.booleans(), label="has_running")
    rm = rv = None
    if has_running:
        rm = rng.standard_normal(C).astype(rdt)
        rv = (rng.random(C) + 0.5).astype(rdt)
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    kwargs = dict(running_mean=rm, running_var=rv, weight=w_obj, bias=b_obj,
                  training=training, momentum=momentum, eps=eps, return_stats=return_stats,
                  stats=stats)
    bad = data.draw(st.sampled_from(["none"] * 4 + ["x", "running_mean", "running_var",
                                                     "weight", "eps", "momentum", "out",
                                                     "stats", "one_value"]), label="bad")
    if bad != "none":
        args = [x_obj]
        if bad == "x":
            kind = data.draw(st.sampled_from(ARRAY_BAD + ["1d"]), label="kind")
            if kind in ("extra_dim", "short"):
                return
            val, types = ((np.ones(3, dtype), (ValueError,)) if kind == "1d"
                          else _bad_array(rng, shape, kind))
            args[0], names = val, ["x"]
        elif bad in ("running_mean", "running_var"):
            kind = data.draw(st.sampled_from(["list", "int", "shape", "readonly", "missing",
                                              "str"]), label="kind")
            names = [bad, "running_mean and running_var"]
            if kind == "list":
                val, types = [0.0] * C, (TypeError,)
            elif kind == "int":
                val, types = np.zeros(C, dtype=np.int64), (TypeError,)
            elif kind == "shape":
                val, types = np.zeros(C + 1), (ValueError,)
            elif kind == "str":
                val, types = "running", (TypeError,)
            elif kind == "readonly" and training:
                val = np.zeros(C)
                val.setflags(write=False)
                types = (ValueError,)
            else:  # missing: only an error in eval mode
                if training:
                    return
                val, types = None, (ValueError,)
            kwargs[bad] = val
        elif bad == "weight":
            kind = data.draw(st.sampled_from(PARAM_BAD), label="kind")
            val, types = _bad_array(rng, (C,), kind)
            kwargs["weight"], names = val, ["weight"]
        elif bad == "eps":
            val, t = data.draw(st.sampled_from(EPS_BAD), label="eps_bad")
            kwargs["eps"], types, names = val, (t,), ["eps"]
        elif bad == "momentum":
            if not training:  # momentum is ignored then, any value accepted (as torch)
                return
            val, t = data.draw(st.sampled_from(
                [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                 (None, TypeError), ("fast", TypeError), (1j, TypeError),
                 ("0.1", TypeError)]), label="mom_bad")
            kwargs["momentum"], types, names = val, (t,), ["momentum"]
        elif bad == "stats":
            val, t = data.draw(st.sampled_from(STATS_BAD), label="stats_bad")
            kwargs["stats"], types, names = val, (t,), ["stats"]
        elif bad == "one_value":
            if not training:
                return
            args[0] = np.ones((1, max(C, 1)) + (1,) * (len(shape) - 2), dtype)
            kwargs.update(running_mean=None, running_var=None, weight=None, bias=None)
            types, names = (ValueError,), ["value per channel"]
        else:
            val, types = bad_out(rng, shape, dtype, [x_obj, w_obj, b_obj])
            names = ["out"]
            if isinstance(val, tuple):
                _, xa, oa = val
                xa[...] = x_log
                args[0], val = xa, oa
            kwargs["out"] = val
        expect_error(lambda: with_threads(threads, lambda: cynorm.batch_norm(*args,
                                                                             **kwargs)),
                     types, names)
        return

    if training and n == 1:
        expect_error(lambda: cynorm.batch_norm(x_obj, **kwargs), (ValueError,),
                     ["value per channel"])
        return
    out_obj, alias = maybe_out(data, rng, shape, dtype, x_obj, [("x", x_obj)])
    if out_obj is not None:
        kwargs["out"] = out_obj
    res, err = run_call(lambda *a, **k: with_threads(threads,
                                                     lambda: cynorm.batch_norm(*a, **k)),
                        (x_obj,), kwargs)
    assert err is None, f"valid call raised {err!r}"
    y = _check_fwd_outputs(res, return_stats, 2, out_obj, shape, dtype)
    y_ref, m_ref, r_ref, rm_ref, rv_ref = ref_batch_norm(
        x_log, rm0, rv0, w_log, b_log, training, momentum, eps)
    tol = TOL[dtype]
    sh = (1, C) + (1,) * (len(shape) - 2)
    wb = (np.ones(C) if w_log is None else w_log.astype(np.float64)).reshape(sh)
    bb = (np.zeros(C) if b_log is None else b_log.astype(np.float64)).reshape(sh)
    assert_close("batch_norm y", y, y_ref,
                 forward_scale(x_log.astype(np.float64), m_ref.reshape(sh),
                               r_ref.reshape(sh), wb, bb), tol)
    if return_stats:
        _, mean, rstd = res
        assert mean.shape == rstd.shape == (C,)
        assert mean.dtype == rstd.dtype == np.float64
        if training and n == 0:  # empty sets: mean 0, rstd NaN (as torch)
            assert (mean == 0).all() and np.isnan(rstd).all(), (mean, rstd)
        if n or not training:
            xmax = np.abs(chan_view(x_log.astype(np.float64))).max(axis=1) if n else 1.0
            assert_close("batch_norm mean", mean, m_ref, xmax + np.abs(m_ref) + 1e-300, tol)
            assert_close("batch_norm rstd", rstd, r_ref,
                         r_ref * (1 + m_ref ** 2 * r_ref ** 2), tol)
    if training and has_running and n > 1:
        check_running_stats(rm, rv, rm_ref, rv_ref, x_log, rm0, rv0)
    elif has_running:
        assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0), \
            "running statistics changed without a training step"


@FUZZ
@given(data=st.data())
def test_fuzz_batch_norm_backward_matches_reference_or_raises(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype, layout, mode, threads = draw_common(data, rng)
    shape = data.draw(nc_shapes(), label="shape")
    N, C = shape[:2]
    training = data.draw(st.booleans(), label="training")
    x_log, x_obj = make_input(rng, shape, dtype, layout, mode)
    dtype = passed_dtype(x_obj, dtype)
    x_log = x_log.astype(dtype)
    dy_log, dy_obj = make_input(rng, shape, dtype,
                                data.draw(st.sampled_from(LAYOUTS), label="dy_layout"))
    if passed_dtype(dy_obj, dtype) != dtype:
        dy_obj = np.asarray(dy_obj, dtype=dtype)
    dy_log = dy_log.astype(dtype)
    w_log, w_obj = draw_param(data, rng, (C,), dtype, "weight")
    if training:
        _, m_ref, r_ref, _, _ = ref_batch_norm(x_log, training=True, eps=1e-5)
    else:
        m_ref = rng.standard_normal(C)
        r_ref = rng.random(C) + 0.5
    kwargs = dict(weight=w_obj, training=training)
    bad = data.draw(st.sampled_from(["none"] * 4 + ["dy", "x", "mean", "rstd", "weight",
                                                     "out"]), label="bad")
    if bad != "none":
        a = dict(dy=dy_obj, x=x_obj, mean=m_ref, rstd=r_ref)
        if bad in ("dy", "x"):
            kind = data.draw(st.sampled_from(ARRAY_BAD), label="kind")
            val, types = _bad_array(rng, shape, kind)
            names = [bad] if kind not in ("extra_dim", "short") else \
                ["x", "dy", "mean", "rstd", "weight"]
            a[bad] = val
        elif bad in ("mean", "rstd"):
            kind = data.draw(st.sampled_from(["int", "complex", "str", "extra_dim", "short"]),
                             label="kind")
            a[bad], types = _bad_array(rng, (C,), kind)
            names = [bad]
        elif bad == "weight":
            kind = data.draw(st.sampled_from(PARAM_BAD), label="kind")
            kwargs["weight"], types = _bad_array(rng, (C,), kind)
            names = ["weight"]
        else:
            val, types = bad_out(rng, shape, dtype, [dy_obj, x_obj])
            names = ["out"]
            if isinstance(val, tuple):
                _, xa, oa = val
                xa[...] = x_log
                a["x"], val = xa, oa
            kwargs["out"] = val
        expect_error(lambda: with_threads(threads, lambda: cynorm.batch_norm_backward(
            a["dy"], a["x"], a["mean"], a["rstd"], **kwargs)), types, names)
        return
    out_obj, alias = maybe_out(data, rng, shape, dtype, None, [("dy", dy_obj), ("x", x_obj)])
    if out_obj is not None:
        kwargs["out"] = out_obj
    res, err = run_call(lambda *a, **k: with_threads(
        threads, lambda: cynorm.batch_norm_backward(*a, **k)),
        (dy_obj, x_obj, m_ref, r_ref), kwargs)
    assert err is None, f"valid call raised {err!r}"
    dx, dw, db = res
    if out_obj is not None:
        assert dx is out_obj
    assert dx.shape == tuple(shape) and dx.dtype == dtype
    assert dw.shape == db.shape == (C,) and dw.dtype == db.dtype == dtype
    ref = ref_batch_norm_backward(dy_log, x_log, m_ref, r_ref, w_log, training)
    check_backward("batch_norm_backward", dtype, shape, dy_log, x_log, w_log, m_ref, r_ref,
                   (dx, dw, db), ref, family="channel", training=training)


# ---- LayerNorm, RMSNorm ---------------------------------------------------------------------

def _row_case(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype, layout, mode, threads = draw_common(data, rng)
    shape, ns = data.draw(row_shapes(), label="shape")
    if prod(as_shape(ns)) > CHUNK:
        event("rows cut into pieces")
    x_log, x_obj = make_input(rng, shape, dtype, layout, mode)
    dtype = passed_dtype(x_obj, dtype)
    x_log = x_log.astype(dtype)
    nst = as_shape(ns)
    w_log, w_obj = draw_param(data, rng, nst, dtype, "weight")
    b_log, b_obj = draw_param(data, rng, nst, dtype, "bias")
    return rng, dtype, threads, shape, ns, nst, x_log, x_obj, w_log, w_obj, b_log, b_obj


NS_BAD = [((), ValueError), (2.5, TypeError), ("a", TypeError), (None, TypeError),
          ((1.0,), TypeError), ([None], TypeError), (-1, ValueError), (object(), TypeError)]


def _bad_ns(data, shape):
    val, t = data.draw(st.sampled_from(NS_BAD + [("mismatch", ValueError),
                                                 ("too_long", ValueError)]), label="ns_bad")
    if val == "mismatch":
        val = (shape[-1] + 1,)
    elif val == "too_long":
        val = (2,) * (len(shape) + 1)
    return val, (t,), ["normalized_shape", "x"]


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@FUZZ
@given(data=st.data())
def test_fuzz_row_forward_matches_reference_or_raises(op, data):
    rng, dtype, threads, shape, ns, nst, x_log, x_obj, w_log, w_obj, b_log, b_obj = \
        _row_case(data)
    rms = op == "rms_norm"
    fn = getattr(cynorm, op)
    return_stats = data.draw(st.booleans(), label="return_stats")
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 1.0] + ([None] if rms else [])),
                    label="eps")
    kwargs = dict(weight=w_obj, eps=eps, return_stats=return_stats)
    if rms:
        b_log = None
    else:
        kwargs["bias"] = b_obj
        kwargs["stats"] = data.draw(st.sampled_from(["two_pass", "welford"]), label="stats")
    bad = data.draw(st.sampled_from(["none"] * 4 + ["x", "ns", "weight", "eps", "out"]
                                    + ([] if rms else ["bias", "stats"])), label="bad")
    if bad != "none":
        args = [x_obj, ns]
        if bad == "x":
            kind = data.draw(st.sampled_from(ARRAY_BAD), label="kind")
            if kind in ("extra_dim", "short"):
                return
            args[0], types = _bad_array(rng, shape, kind)
            names = ["x"]
        elif bad == "ns":
            args[1], types, names = _bad_ns(data, shape)
        elif bad in ("weight", "bias"):
            kind = data.draw(st.sampled_from(PARAM_BAD), label="kind")
            kwargs[bad], types = _bad_array(rng, nst, kind)
            names = [bad]
        elif bad == "eps":
            val, t = data.draw(st.sampled_from([e for e in EPS_BAD if e[0] is not None]),
                               label="eps_bad")
            kwargs["eps"], types, names = val, (t,), ["eps"]
        elif bad == "stats":
            val, t = data.draw(st.sampled_from(STATS_BAD), label="stats_bad")
            kwargs["stats"], types, names = val, (t,), ["stats"]
        else:
            val, types = bad_out(rng, shape, dtype, [x_obj, w_obj, b_obj])
            names = ["out"]
            if isinstance(val, tuple):
                _, xa, oa = val
                xa[...] = x_log
                args[0], val = xa, oa
            kwargs["out"] = val
        expect_error(lambda: with_threads(threads, lambda: fn(*args, **kwargs)), types,
                     names)
        return
    out_obj, alias = maybe_out(data, rng, shape, dtype, x_obj, [("x", x_obj)])
    if out_obj is not None:
        kwargs["out"] = out_obj
    res, err = run_call(lambda *a, **k: with_threads(threads, lambda: fn(*a, **k)),
                        (x_obj, ns), kwargs)
    assert err is None, f"valid call raised {err!r}"
    y = _check_fwd_outputs(res, return_stats, 1 if rms else 2, out_obj, shape, dtype)
    eps_v = float(np.finfo(dtype).eps) if eps is None else eps
    y_ref, m_ref, r_ref = ref_layer_norm(x_log, nst, w_log, b_log, eps_v, rms=rms)
    tol = TOL[dtype]
    lead = shape[:len(shape) - len(nst)]
    K = prod(nst)
    R = prod(lead)
    mb = m_ref.reshape(R, 1)
    rb = r_ref.reshape(R, 1)
    wb = (np.ones(K) if w_log is None else w_log.astype(np.float64).reshape(K))[None, :]
    bb = (np.zeros(K) if b_log is None else b_log.astype(np.float64).reshape(K))[None, :]
    scale = forward_scale(x_log.astype(np.float64).reshape(R, K), mb, rb, wb, bb)
    assert_close(f"{op} y", y, y_ref, scale.reshape(shape), tol)
    if return_stats:
        stats = res[1:]
        for s in stats:
            assert s.shape == lead and s.dtype == np.float64, (s.shape, s.dtype)
        if K == 0:  # empty rows: mean 0, rstd NaN (as torch)
            assert rms or (stats[0] == 0).all(), stats
            assert np.isnan(stats[-1]).all(), stats
        if K:
            xmax = np.abs(x_log.astype(np.float64)).reshape(R, K).max(axis=1).reshape(lead) \
                if R else np.zeros(lead)
            if not rms:
                assert_close(f"{op} mean", stats[0], m_ref, xmax + 1e-300, tol)
            assert_close(f"{op} rstd", stats[-1], r_ref,
                         r_ref * (1 + m_ref ** 2 * r_ref ** 2), tol)


@pytest.mark.parametrize("op", ["layer_norm_backward", "rms_norm_backward"])
@FUZZ
@given(data=st.data())
def test_fuzz_row_backward_matches_reference_or_raises(op, data):
    rng, dtype, threads, shape, ns, nst, x_log, x_obj, w_log, w_obj, _, _ = _row_case(data)
    rms = op == "rms_norm_backward"
    fn = getattr(cynorm, op)
    dy_log, dy_obj = make_input(rng, shape, dtype,
                                data.draw(st.sampled_from(LAYOUTS), label="dy_layout"))
    if passed_dtype(dy_obj, dtype) != dtype:
        dy_obj = np.asarray(dy_obj, dtype=dtype)
    dy_log = dy_log.astype(dtype)
    _, m_ref, r_ref = ref_layer_norm(x_log, nst, eps=1e-5, rms=rms)
    K = prod(nst)
    if K == 0:
        m_ref, r_ref = np.zeros_like(m_ref), np.ones_like(r_ref)
    lead = shape[:len(shape) - len(nst)]
    kwargs = dict(weight=w_obj)

    def call_args(dy, x, mean, rstd, ns_):
        return (dy, x, rstd, ns_) if rms else (dy, x, mean, rstd, ns_)

    bad = data.draw(st.sampled_from(["none"] * 4 + ["dy", "x", "rstd", "ns", "weight", "out"]
                                    + ([] if rms else ["mean"])), label="bad")
    if bad != "none":
        a = dict(dy=dy_obj, x=x_obj, mean=m_ref, rstd=r_ref, ns=ns)
        if bad in ("dy", "x"):
            kind = data.draw(st.sampled_from(ARRAY_BAD), label="kind")
            a[bad], types = _bad_array(rng, shape, kind)
            names = [bad] if kind not in ("extra_dim", "short") else \
                ["x", "dy", "mean", "rstd", "weight", "normalized_shape"]
        elif bad in ("mean", "rstd"):
            kind = data.draw(st.sampled_from(["int", "complex", "str", "extra_dim", "short"]),
                             label="kind")
            a[bad], types = _bad_array(rng, lead, kind)
            names = [bad]
            if kind == "short" and not lead:
                names = [bad]
        elif bad == "ns":
            a["ns"], types, names = _bad_ns(data, shape)
            names = names + ["mean", "rstd", "weight"]
        elif bad == "weight":
            kind = data.draw(st.sampled_from(PARAM_BAD), label="kind")
            kwargs["weight"], types = _bad_array(rng, nst, kind)
            names = ["weight"]
        else:
            val, types = bad_out(rng, shape, dtype, [dy_obj, x_obj])
            names = ["out"]
            if isinstance(val, tuple):
                _, xa, oa = val
                xa[...] = x_log
                a["x"], val = xa, oa
            kwargs["out"] = val
        args = call_args(a["dy"], a["x"], a["mean"], a["rstd"], a["ns"])
        expect_error(lambda: with_threads(threads, lambda: fn(*args, **kwargs)), types,
                     names)
        return
    out_obj, alias = maybe_out(data, rng, shape, dtype, None, [("dy", dy_obj), ("x", x_obj)])
    if out_obj is not None:
        kwargs["out"] = out_obj
    res, err = run_call(lambda *a, **k: with_threads(threads, lambda: fn(*a, **k)),
                        call_args(dy_obj, x_obj, m_ref, r_ref, ns), kwargs)
    assert err is None, f"valid call raised {err!r}"
    if rms:
        assert len(res) == 2
        dx, dw = res
        db = None
    else:
        dx, dw, db = res
        assert db.shape == nst and db.dtype == dtype
    if out_obj is not None:
        assert dx is out_obj
    assert dx.shape == tuple(shape) and dx.dtype == dtype
    assert dw.shape == nst and dw.dtype == dtype
    dx_ref, dw_ref, db_ref = ref_layer_norm_backward(dy_log, x_log, m_ref, r_ref, nst, w_log,
                                                     rms=rms)
    check_backward(op, dtype, shape, dy_log, x_log, w_log,
                   np.zeros(lead) if rms else m_ref, r_ref, (dx, dw, db),
                   (dx_ref, dw_ref, None if rms else db_ref), family="row", ns=nst)


def test_get_num_threads_is_a_positive_int():
    n = cynorm.get_num_threads()
    assert isinstance(n, int) and n >= 1
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cynorm.get_num_threads() == 1
