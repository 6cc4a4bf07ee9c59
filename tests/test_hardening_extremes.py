"""Extreme values and degenerate shapes.

Promises: float32 data near 1e30 and 1e-30 and float64 data near 1e150 (and 1e-150)
normalise to finite, correct results (statistics are accumulated in float64); a constant
set gives y = bias exactly (variance exactly 0); a set of one element likewise; NaN and
Inf in a set make exactly that set's outputs NaN and leave every other set bitwise
unchanged (they never crash or hang); empty sets and empty batches give defined results
(statistics mean 0 / rstd NaN, as torch, and parameter gradients 0) and never crash.

The behaviour observed here is written up in scripts/README.md, "Extreme values".
"""
import os
import select
import signal

import numpy as np
import pytest

import cynorm
from hardening_reference import (
    TOL, assert_close, check_backward, check_running_stats, ref_batch_norm,
    ref_batch_norm_backward, ref_group_norm, ref_group_norm_backward, ref_layer_norm,
    ref_layer_norm_backward,
)

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _data(rng, shape, dtype, center, rel_spread=0.1):
    """Values center * (1 + rel_spread * normal): magnitude |center|, spread relative."""
    return (center * (1 + rel_spread * rng.standard_normal(shape))).astype(dtype)


def _all_forward_backward(x, dy, eps):
    """(name, got, reference) for every op, forward and backward, on x (N, C, H, W)."""
    x64 = x.astype(np.float64)
    dtype = x.dtype
    N, C = x.shape[:2]
    rng = np.random.default_rng(3)
    w = (1 + rng.random(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    out = []
    for G in (1, 2, C):
        y, m, r = cynorm.group_norm(x, G, w, b, eps=eps, return_stats=True)
        y_ref, m_ref, r_ref = ref_group_norm(x64, G, w, b, eps)
        out += [(f"group_norm G={G} y", y, y_ref), (f"group_norm G={G} mean", m, m_ref),
                (f"group_norm G={G} rstd", r, r_ref)]
        g = cynorm.group_norm_backward(dy, x, m_ref, r_ref, G, w)
        g_ref = ref_group_norm_backward(dy, x64, m_ref, r_ref, G, w)
        out += [(f"group_norm_backward G={G} {k}", a, e)
                for k, a, e in zip(("dx", "dw", "db"), g, g_ref)]
    y, m, r = cynorm.batch_norm(x, weight=w, bias=b, training=True, eps=eps,
                                return_stats=True)
    y_ref, m_ref, r_ref, _, _ = ref_batch_norm(x64, None, None, w, b, True, 0.1, eps)
    out += [("batch_norm y", y, y_ref), ("batch_norm rstd", r, r_ref)]
    g = cynorm.batch_norm_backward(dy, x, m_ref, r_ref, w)
    out += [(f"batch_norm_backward {k}", a, e) for k, a, e in
            zip(("dx", "dw", "db"), g, ref_batch_norm_backward(dy, x64, m_ref, r_ref, w))]
    ns = x.shape[2:]
    wl = (1 + rng.random(ns)).astype(dtype)
    bl = rng.standard_normal(ns).astype(dtype)
    for rms in (False, True):
        name = "rms_norm" if rms else "layer_norm"
        if rms:
            y, r = cynorm.rms_norm(x, ns, wl, eps=eps, return_stats=True)
            y_ref, _, r_ref = ref_layer_norm(x64, ns, wl, None, eps, rms=True)
            g = cynorm.rms_norm_backward(dy, x, r_ref, ns, wl)
            m_ref = np.zeros_like(r_ref)
        else:
            y, m, r = cynorm.layer_norm(x, ns, wl, bl, eps=eps, return_stats=True)
            y_ref, m_ref, r_ref = ref_layer_norm(x64, ns, wl, bl, eps)
            g = cynorm.layer_norm_backward(dy, x, m_ref, r_ref, ns, wl)
        g_ref = ref_layer_norm_backward(dy, x64, m_ref, r_ref, ns, wl, rms=rms)
        out += [(f"{name} y", y, y_ref), (f"{name} rstd", r, r_ref)]
        out += [(f"{name}_backward {k}", a, e) for k, a, e in zip(("dx", "dw", "db"), g, g_ref)]
    return out


@pytest.mark.parametrize("dtype,center", [(F32, 1e30), (F32, -1e30), (F32, 1e-30),
                                          (F32, 1e38), (F64, 1e150), (F64, -1e150),
                                          (F64, 1e-150)],
                         ids=["f32-1e30", "f32-neg1e30", "f32-1e-30", "f32-1e38",
                              "f64-1e150", "f64-neg1e150", "f64-1e-150"])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (2, 4, 2, 700)], ids=["small", "long"])
def test_extreme_magnitudes_give_finite_correct_results(dtype, center, eps, shape):
    """Small sets, and sets of over a thousand elements (the vectorised reductions' main
    loops; float32 partial sums there must not overflow near the float32 limit)."""
    rng = np.random.default_rng(0)
    x = _data(rng, shape, dtype, center)
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert np.isfinite(x).all()
    failures = []
    for name, got, ref in _all_forward_backward(x, dy, eps):
        got = np.asarray(got)
        ref = np.asarray(ref, dtype=np.float64)
        # relative to the largest reference value of the output: these are O(1) after
        # normalisation (or O(x / sqrt(eps)) for tiny data with eps > 0)
        scale = np.abs(ref).max() + 1e-300 if ref.size else 1.0
        if not np.isfinite(got).all():
            failures.append(f"{name}: {int((~np.isfinite(got)).sum())} non-finite values")
            continue
        try:
            assert_close(name, got, ref, scale, 50 * TOL[np.dtype(dtype)])
        except AssertionError as e:
            failures.append(str(e).split(": (")[0][:300])
    assert not failures, f"|x| ~ {center:g}, eps={eps}:\n" + "\n".join(failures)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("const", [0.0, 0.1, -3.7, 1e30, 1e-30, 12345.678, 3e38])
def test_constant_sets_give_exactly_bias(dtype, stats, const):
    """Variance 0: y = bias exactly, for every op with a bias; sets large enough to be
    cut into pieces (and split among threads) as well as small ones."""
    for shape in [(2, 4, 3, 5), (1, 2, 50000)]:
        x = np.full(shape, const, dtype=dtype)
        C = shape[1]
        w = np.linspace(0.5, 2.0, C).astype(dtype)
        b = np.linspace(-1.0, 1.0, C).astype(dtype)
        bb = np.broadcast_to(b.reshape((1, C) + (1,) * (len(shape) - 2)), shape)
        for G in (1, C):
            y = cynorm.group_norm(x, G, w, b, stats=stats)
            assert np.array_equal(y, bb), (shape, G, np.abs(y - bb).max())
        y = cynorm.instance_norm(x, weight=w, bias=b, stats=stats)
        assert np.array_equal(y, bb)
        y = cynorm.batch_norm(x, weight=w, bias=b, training=True, stats=stats)
        assert np.array_equal(y, bb)
        K = shape[-1]
        bl = np.linspace(-1.0, 1.0, K).astype(dtype)
        y = cynorm.layer_norm(x, K, np.ones(K, dtype), bl, stats=stats)
        assert np.array_equal(y, np.broadcast_to(bl, shape))
        # backward of a constant set: xhat = 0, so dx = rstd * (g - mean(g)), finite
        dy = np.random.default_rng(1).standard_normal(shape).astype(dtype)
        y, m, r = cynorm.group_norm(x, 1, w, b, return_stats=True, stats=stats)
        assert (np.asarray(m) == np.float64(dtype.type(const))).all()
        dx, dw, db = cynorm.group_norm_backward(dy, x, m, r, 1, w)
        dx_ref, dw_ref, db_ref = ref_group_norm_backward(dy, x, m, r, 1, w)
        assert np.isfinite(dx).all()
        assert_close("constant-set dx", dx, dx_ref, np.abs(dx_ref).max() + 1, TOL[dtype])
        assert np.array_equal(dw, np.zeros(C, dtype))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_sets_of_one_element(dtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 4, 1)) * 1e3).astype(dtype)
    w = (1 + rng.random(4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    bb = np.broadcast_to(b[None, :, None], x.shape)
    # InstanceNorm over one spatial element; GroupNorm with one channel per group
    assert np.array_equal(cynorm.instance_norm(x, weight=w, bias=b), bb)
    assert np.array_equal(cynorm.group_norm(x, 4, w, b, stats="welford"), bb)
    y, m, r = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
    assert np.array_equal(m, x[:, :, 0].astype(np.float64))
    assert np.allclose(r, 1 / np.sqrt(1e-5))
    dx, dw, db = cynorm.instance_norm_backward(np.ones_like(x), x, m, r, w)
    assert np.array_equal(dx, np.zeros_like(x)) and np.array_equal(dw, np.zeros(4, dtype))
    # LayerNorm over one element: y = bias; RMSNorm over one element: x / sqrt(x^2 + eps)
    x2 = x.reshape(12, 1)
    assert np.array_equal(cynorm.layer_norm(x2, 1, w[:1], b[:1]), np.broadcast_to(b[:1], x2.shape))
    y_ref = ref_layer_norm(x2, 1, w[:1], None, 1e-6, rms=True)[0]
    assert_close("rms_norm K=1", cynorm.rms_norm(x2, 1, w[:1], eps=1e-6), y_ref, 1.0, TOL[dtype])
    # BatchNorm: one value per channel cannot be normalised in training (torch raises too)
    with pytest.raises(ValueError):
        cynorm.batch_norm(x[:1], training=True)
    # ... but is fine in eval mode
    y = cynorm.batch_norm(x[:1], np.zeros(4), np.ones(4), w, b)
    y_ref = ref_batch_norm(x[:1], np.zeros(4), np.ones(4), w, b)[0]
    assert_close("batch_norm eval one value", y, y_ref, np.abs(y_ref) + 1, TOL[dtype])


def test_constant_set_with_zero_eps_is_nan_not_a_crash():
    """var = 0 and eps = 0: 0 * (1 / 0) is NaN (torch gives NaN too)."""
    x = np.full((2, 2, 8), 3.0)
    y, m, r = cynorm.group_norm(x, 1, eps=0.0, return_stats=True)
    assert np.isinf(r).all() and np.isnan(y).all()
    y = cynorm.layer_norm(x, 8, eps=0.0)
    assert np.isnan(y).all()


# ---- NaN and Inf: exactly their own set is poisoned ---------------------------------------

BAD_VALUES = [np.nan, np.inf, -np.inf]


def _poison(x, index, value):
    xp = x.copy()
    xp[index] = value
    return xp


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (1, 4, 20000)], ids=["small", "split"])
def test_nonfinite_input_poisons_exactly_its_own_set(value, stats, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    N, C = shape[:2]
    idx = (N - 1, 1) + tuple(d // 2 for d in shape[2:])  # in group 0 of G=2 and channel 1
    xp = _poison(x, idx, value)
    w, b = np.full(C, 2.0, np.float32), np.full(C, 0.5, np.float32)
    # GroupNorm, G=2: set (N-1, 0) is channels 0..1 of the last sample
    y0, m0, r0 = cynorm.group_norm(x, 2, w, b, stats=stats, return_stats=True)
    y1, m1, r1 = cynorm.group_norm(xp, 2, w, b, stats=stats, return_stats=True)
    assert np.isnan(y1[N - 1, :2]).all() and np.isnan(m1[N - 1, 0]) and np.isnan(r1[N - 1, 0])
    keep = np.ones(y0.shape, bool)
    keep[N - 1, :2] = False
    assert np.array_equal(y1[keep], y0[keep])
    assert np.array_equal(m1[:, 1], m0[:, 1]) and np.array_equal(m1[:N - 1], m0[:N - 1])
    # InstanceNorm: only (N-1, 1)
    y0 = cynorm.instance_norm(x, weight=w, bias=b, stats=stats)
    y1 = cynorm.instance_norm(xp, weight=w, bias=b, stats=stats)
    keep = np.ones(y0.shape, bool)
    keep[N - 1, 1] = False
    assert np.isnan(y1[N - 1, 1]).all() and np.array_equal(y1[keep], y0[keep])
    # BatchNorm training: channel 1 everywhere
    y0 = cynorm.batch_norm(x, training=True, stats=stats)
    y1 = cynorm.batch_norm(xp, training=True, stats=stats)
    assert np.isnan(y1[:, 1]).all()
    assert np.array_equal(np.delete(y1, 1, axis=1), np.delete(y0, 1, axis=1))
    # BatchNorm eval: statistics are constants, only the element itself
    rm, rv = np.zeros(C), np.ones(C)
    y0 = cynorm.batch_norm(x, rm, rv)
    y1 = cynorm.batch_norm(xp, rm, rv)
    expect = np.float32(value) / np.float32(np.sqrt(1 + 1e-5))
    assert np.array_equal(y1[idx], expect, equal_nan=True)
    keep = np.ones(y0.shape, bool)
    keep[idx] = False
    assert np.array_equal(y1[keep], y0[keep])
    # LayerNorm / RMSNorm over the trailing dims: only the poisoned row
    ns = shape[2:]
    lead_idx = idx[:2]
    for op in ("layer_norm", "rms_norm"):
        kw = {"stats": stats} if op == "layer_norm" else {}
        y0 = getattr(cynorm, op)(x, ns, **kw)
        y1 = getattr(cynorm, op)(xp, ns, **kw)
        row = y1[lead_idx]
        if op == "rms_norm" and np.isinf(value):
            # sum of squares inf -> rstd 0: finite elements become 0, the inf one NaN
            assert np.isnan(row[idx[2:]]) and (np.delete(row.ravel(), np.ravel_multi_index(
                idx[2:], ns)) == 0).all()
        else:
            assert np.isnan(row).all(), op
        keep = np.ones(shape[:2], bool)
        keep[lead_idx] = False
        assert np.array_equal(y1[keep], y0[keep]), op


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_poisons_exactly_its_own_set(value):
    rng = np.random.default_rng(5)
    shape = (3, 4, 30, 7)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    N, C = shape[:2]
    idx = (1, 3, 2, 2)
    dyp = _poison(dy, idx, value)
    w = rng.standard_normal(C)
    _, m, r = cynorm.group_norm(x, 2, w, return_stats=True)
    dx0, dw0, db0 = cynorm.group_norm_backward(dy, x, m, r, 2, w)
    dx1, dw1, db1 = cynorm.group_norm_backward(dyp, x, m, r, 2, w)
    # set (1, group 1) = channels 2, 3 of sample 1 (NaN, or +-Inf where inf - inf does
    # not arise)
    assert not np.isfinite(dx1[1, 2:]).any()
    keep = np.ones(shape, bool)
    keep[1, 2:] = False
    assert np.array_equal(dx1[keep], dx0[keep])
    assert not np.isfinite(dw1[3]) and not np.isfinite(db1[3])
    assert np.array_equal(dw1[:2], dw0[:2]) and np.array_equal(db1[:3], db0[:3])
    # BatchNorm: channel 3
    _, m, r = cynorm.batch_norm(x, training=True, return_stats=True)
    dx0, dw0, db0 = cynorm.batch_norm_backward(dy, x, m, r, w)
    dx1, dw1, db1 = cynorm.batch_norm_backward(dyp, x, m, r, w)
    assert not np.isfinite(dx1[:, 3]).any()
    assert np.array_equal(dx1[:, :3], dx0[:, :3]) and np.array_equal(dw1[:3], dw0[:3])
    # LayerNorm over (30, 7): row (1, 3); dweight sums over rows, so it is poisoned
    # only in the column of the bad element
    _, m, r = cynorm.layer_norm(x, (30, 7), return_stats=True)
    dx0, dw0, db0 = cynorm.layer_norm_backward(dy, x, m, r, (30, 7))
    dx1, dw1, db1 = cynorm.layer_norm_backward(dyp, x, m, r, (30, 7))
    assert not np.isfinite(dx1[1, 3]).any()
    keep = np.ones((N, C), bool)
    keep[1, 3] = False
    assert np.array_equal(dx1[keep], dx0[keep])
    col = np.ones((30, 7), bool)
    col[2, 2] = False
    assert not np.isfinite(dw1[2, 2]) and np.array_equal(dw1[col], dw0[col])


def test_float64_overflowing_variance_does_not_crash():
    """|x - mean| beyond ~1e154: the float64 sum of squares overflows. The result is not
    a normalised array (documented in scripts/README.md); it must still come back
    without a crash and without Inf in y."""
    x = np.array([[1e200, 3e200, -2e200, 5e199]])
    for call in (lambda: cynorm.layer_norm(x, 4), lambda: cynorm.rms_norm(x, 4),
                 lambda: cynorm.group_norm(x.reshape(1, 1, 4), 1),
                 lambda: cynorm.batch_norm(x.reshape(4, 1), training=True)):
        y = call()
        assert y.shape[-1] in (1, 4)
        assert not np.isinf(y).any()


# ---- results beyond the range of their dtype: stored as inf, as torch stores them ---------

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("dtype,center,shape", [(F32, 1e30, (1, 1, 1100, 3)),
                                                (F32, -1e30, (2, 3, 40)),
                                                (F64, 1e150, (2, 3, 40))],
                         ids=["f32-1e30", "f32-neg1e30", "f64-1e150"])
def test_float32_running_buffers_hold_the_update_rounded_to_float32(dtype, center, shape):
    """The running statistics are updated in float64 and stored in the buffer's dtype: a
    float32 running_var of data near 1e30 (a variance near 1e57) holds inf, as torch's
    does; so does a float32 running_mean of float64 data near 1e150. The first case is a
    failure the fuzz test found, when its reference was not rounded to the buffer."""
    rng = np.random.default_rng(16)
    x = _data(rng, shape, dtype, center)
    C = shape[1]
    rm0 = rng.standard_normal(C).astype(np.float32)
    rv0 = (rng.random(C) + 0.5).astype(np.float32)
    rm, rv = rm0.copy(), rv0.copy()
    with np.errstate(over="ignore"):
        y = cynorm.batch_norm(x, rm, rv, training=True, momentum=0.1)
    _, _, _, rm_ref, rv_ref = ref_batch_norm(x, rm0, rv0, training=True, momentum=0.1)
    assert (rv_ref > F32_MAX).all() and (rv == np.inf).all(), (rv_ref, rv)
    assert np.array_equal(np.abs(rm_ref) > F32_MAX, np.isinf(rm)), (rm_ref, rm)
    check_running_stats(rm, rv, rm_ref, rv_ref, x, rm0, rv0)
    assert np.isfinite(y).all()


def test_float32_running_var_overflow_matches_torch():
    torch = pytest.importorskip("torch")
    x = _data(np.random.default_rng(16), (1, 1, 1100, 3), F32, 1e30)
    rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
    with np.errstate(over="ignore"):
        cynorm.batch_norm(x, rm, rv, training=True, momentum=0.1)
    trm, trv = torch.zeros(1), torch.ones(1)
    torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True,
                                   momentum=0.1)
    assert np.isinf(trv.numpy()).all() and np.array_equal(rv, trv.numpy())
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-6)


def test_float32_dweight_beyond_float32_range_is_inf():
    """Eval-mode batch_norm_backward of float32 data near 1e30 with given statistics:
    dweight = sum(dy * xhat) near 4e38, over float32's limit, comes back as inf (the
    float64 sum rounded to float32); dx and dbias stay finite and correct."""
    rng = np.random.default_rng(1)
    shape = (3, 1, 130, 257)
    x = _data(rng, shape, F32, 1e30)
    dy = (1e3 * (rng.standard_normal(shape) + 3)).astype(F32)
    mean, rstd = np.array([0.3]), np.array([1.4])
    got = cynorm.batch_norm_backward(dy, x, mean, rstd, training=False)
    ref = ref_batch_norm_backward(dy, x, mean, rstd, None, training=False)
    assert ref[1][0] > F32_MAX and got[1][0] == np.inf, (ref[1], got[1])
    assert np.isfinite(got[0]).all() and np.isfinite(got[2]).all()
    check_backward("batch_norm_backward", F32, shape, dy, x, None, mean, rstd, got, ref,
                   family="channel", training=False)


# ---- empty shapes -----------------------------------------------------------------------

def _in_child(fn, timeout=60):
    """Run fn() in a forked child: returns 'ok', 'error: ...' (TypeError/ValueError),
    'exception: ...' (anything else), or 'signal N' when the child crashed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            try:
                fn()
                msg = "ok"
            except (TypeError, ValueError) as e:
                msg = f"error: {e}"
            except BaseException as e:
                msg = f"exception: {e!r}"
            os.write(w, msg.encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    ready, _, _ = select.select([r], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    data = os.read(r, 4096) if ready else b""
    os.close(r)
    _, st = os.waitpid(pid, 0)
    if os.WIFSIGNALED(st):
        return f"signal {os.WTERMSIG(st)}"
    if not ready:
        return "timeout"
    if os.WEXITSTATUS(st) != 0 and not data:
        return f"exit status {os.WEXITSTATUS(st)}"
    return data.decode()


EMPTY_CALLS = {
    "instance_norm C=0": lambda: cynorm.instance_norm(np.zeros((2, 0, 3), np.float32)),
    "instance_norm C=0 no spatial": lambda: cynorm.instance_norm(np.zeros((2, 0))),
    "instance_norm_backward C=0": lambda: cynorm.instance_norm_backward(
        np.zeros((2, 0, 3)), np.zeros((2, 0, 3)), np.zeros((2, 0)), np.zeros((2, 0))),
    "group_norm C=0": lambda: cynorm.group_norm(np.zeros((2, 0, 3)), 1),
    "group_norm N=0": lambda: cynorm.group_norm(np.zeros((0, 4, 3)), 2),
    "group_norm HW=0": lambda: cynorm.group_norm(np.zeros((2, 4, 0)), 2),
    "batch_norm N=0": lambda: cynorm.batch_norm(np.zeros((0, 3, 2)), training=True),
    "batch_norm C=0": lambda: cynorm.batch_norm(np.zeros((2, 0, 2)), training=True),
    "layer_norm K=0": lambda: cynorm.layer_norm(np.zeros((3, 0)), 0),
    "layer_norm R=0": lambda: cynorm.layer_norm(np.zeros((0, 3)), 3),
    "rms_norm K=0": lambda: cynorm.rms_norm(np.zeros((3, 0)), 0),
    "layer_norm_backward R=0": lambda: cynorm.layer_norm_backward(
        np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0), 3),
}


@pytest.mark.parametrize("name", list(EMPTY_CALLS))
def test_empty_shapes_do_not_crash(name):
    """Zero-size dimensions give empty results (or a clear ValueError), never a crash.
    Each call runs in a forked child so that a crash fails only this test."""
    res = _in_child(EMPTY_CALLS[name])
    assert res == "ok" or res.startswith("error: "), f"{name}: {res}"


def _poison_allocator(dtype):
    """Leave freed memory full of 7s, so that an output that is never written shows."""
    for n in (0, 1, 2, 3, 5, 8, 16, 64):
        a = np.full(n, 7.0, dtype=dtype)
        del a


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_empty_rows_give_mean_zero_and_rstd_nan(op):
    """Rows of zero elements: mean 0 and rstd NaN, as group_norm on empty groups and
    torch.native_layer_norm give (not uninitialised memory)."""
    x = np.zeros((3, 0))
    _poison_allocator(np.float64)
    res = getattr(cynorm, op)(x, 0, return_stats=True)
    rstd = res[-1]
    assert rstd.shape == (3,)
    assert np.isnan(rstd).all(), f"{op}: rstd of empty rows is {rstd}, expected NaN"
    if op == "layer_norm":
        assert (res[1] == 0).all(), f"mean of empty rows is {res[1]}, expected 0"
    # the slab family's empty groups, for comparison
    _, m, r = cynorm.group_norm(np.zeros((3, 2, 0)), 1, return_stats=True)
    assert (m == 0).all() and np.isnan(r).all()


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("op", ["layer_norm_backward", "rms_norm_backward"])
def test_backward_with_no_rows_gives_zero_parameter_gradients(op, dtype):
    """x of shape (0, K): dweight and dbias are sums over no rows, i.e. 0."""
    K = 5
    x = np.zeros((0, K), dtype)
    _poison_allocator(dtype)
    if op == "layer_norm_backward":
        dx, dw, db = cynorm.layer_norm_backward(x, x, np.zeros(0), np.zeros(0), K)
        assert np.array_equal(db, np.zeros(K, dtype)), f"dbias {db}"
    else:
        dx, dw = cynorm.rms_norm_backward(x, x, np.zeros(0), K)
    assert dx.shape == (0, K)
    assert np.array_equal(dw, np.zeros(K, dtype)), f"{op}: dweight over no rows is {dw}"


@pytest.mark.parametrize("case", ["batch_norm N=0", "group_norm HW=0"])
def test_backward_on_empty_sets_gives_zero_parameter_gradients(case):
    """dweight = sum over (n, spatial) of dy * xhat is 0 over no elements, even though
    the forward's rstd of an empty set is NaN (torch's batch_norm gives 0 too)."""
    if case == "batch_norm N=0":
        x = np.zeros((0, 3, 2))
        _, m, r = cynorm.batch_norm(x, training=True, return_stats=True)
        dx, dw, db = cynorm.batch_norm_backward(x, x, m, r)
    else:
        x = np.zeros((2, 3, 0))
        _, m, r = cynorm.group_norm(x, 3, return_stats=True)
        dx, dw, db = cynorm.group_norm_backward(x, x, m, r, 3)
    assert dx.shape == x.shape
    assert np.array_equal(db, np.zeros(3))
    assert np.array_equal(dw, np.zeros(3)), f"{case}: dweight {dw}, expected zeros"


# ---- argument validation corner cases -----------------------------------------------------

@pytest.mark.parametrize("arg", ["weight", "bias", "mean", "rstd"])
def test_ragged_parameter_error_names_the_argument(arg):
    """A ragged nested list for a parameter or statistic: a TypeError/ValueError whose
    message names the argument (as for x), not NumPy's internal message."""
    x = np.ones((2, 2, 3))
    ragged = [[1.0], [2.0, 3.0]]
    if arg in ("weight", "bias"):
        call = lambda: cynorm.group_norm(x, 1, **{arg: ragged})  # noqa: E731
    else:
        st = {"mean": np.zeros((2, 1)), "rstd": np.ones((2, 1))}
        st[arg] = ragged
        call = lambda: cynorm.group_norm_backward(x, x, st["mean"], st["rstd"], 1)  # noqa: E731
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert arg in str(info.value), f"message does not name {arg}: {info.value}"


@pytest.mark.parametrize("case", ["eps", "momentum"])
def test_string_numbers_are_rejected(case):
    """eps="1e-5" or momentum="0.1" is a bad argument (TypeError, as torch raises), not
    silently parsed by float()."""
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    with pytest.raises(TypeError, match=case):
        if case == "eps":
            cynorm.group_norm(x, 1, eps="1e-5")
        else:
            cynorm.batch_norm(x, training=True, momentum="0.1")


def _unaligned(a):
    """A C-contiguous, writeable copy of a whose data pointer is not aligned to its
    item size (e.g. from a packed binary buffer)."""
    buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
    u = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.c_contiguous and u.flags.writeable
    return u


@pytest.mark.parametrize("dtype", [F32, F64])
def test_unaligned_arrays_give_correct_results(dtype):
    """Misaligned (but contiguous) inputs and out=: correct results, or for out= a
    ValueError naming it. Passing a misaligned pointer to the kernels is undefined
    behaviour in C: the sanitizer build (scripts/sanitize.sh) reports it."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 3000)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.standard_normal(4).astype(dtype)
    y_ref, m_ref, r_ref = ref_group_norm(x, 2, w, None, 1e-5)
    tol = TOL[dtype]
    y = cynorm.group_norm(_unaligned(x), 2, _unaligned(w))
    assert_close("group_norm unaligned x", y, y_ref, np.abs(y_ref) + 1, tol)
    dx = cynorm.group_norm_backward(_unaligned(dy), _unaligned(x), _unaligned(m_ref),
                                    _unaligned(r_ref), 2, w)[0]
    dx_ref = ref_group_norm_backward(dy, x, m_ref, r_ref, 2, w)[0]
    assert_close("group_norm_backward unaligned", dx, dx_ref, np.abs(dx_ref) + 1, tol)
    y = cynorm.layer_norm(_unaligned(x), 3000)
    assert_close("layer_norm unaligned", y, ref_layer_norm(x, 3000)[0], 10.0, tol)
    y = cynorm.batch_norm(_unaligned(x), training=True)
    assert_close("batch_norm unaligned", y, ref_batch_norm(x, training=True)[0], 10.0, tol)
    out = _unaligned(np.zeros_like(x))
    try:
        y = cynorm.rms_norm(x, 3000, out=out)
    except ValueError as e:
        assert "out" in str(e)
    else:
        assert_close("rms_norm unaligned out", y,
                     ref_layer_norm(x, 3000, rms=True, eps=float(np.finfo(dtype).eps))[0],
                     10.0, tol)
