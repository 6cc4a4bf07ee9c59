"""float16 and bfloat16 storage: every op, forward and backward, within 1 ulp of the
storage dtype of an independent float64 reference on the widened data; the fused
activation and residual; NaN, Inf and overflow on store; mixed parameter dtypes; the
same bits for every thread count; torch as an oracle; and clear errors.

The promise (README, "Accuracy"): a 16-bit result is the float32 computation on the
widened data rounded once to the storage dtype, with statistics from float32 deviations
(mean within 1e-5 standard deviations, rstd within 2e-5 of the float64 values), so it is
at most 1 ulp of the storage dtype from the exact (float64) value, except where the
result is a difference of much larger terms (y = xhat * weight + bias near 0, dx near
0); there the error is bounded by a few float32 ulps of those terms instead.
"""
import numpy as np
import pytest

import cynorm
from peak_memory import extra_memory
import reference as ref
from lowp_reference import (
    BF16, F16, assert_within_one_ulp, bits_position, grid_position, wide,
)
from test_determinism import across_threads

ml_dtypes = pytest.importorskip("ml_dtypes")
LOWP = [F16, BF16]
ACTS = [None, "silu", "gelu", "gelu_tanh", "relu"]

def data(shape, dt, seed=0, loc=0.3, scale=1.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dt)


def assert_16bit_stats_bound(m, r, mean, rstd):
    """The README's bound on 16-bit statistics (float32 deviations, see "16-bit
    storage"): mean within 1e-5 standard deviations (and 1e-12 of itself) of the float64
    mean, rstd within 2e-5 of the float64 rstd, relative."""
    m, r = np.ravel(m), np.ravel(r)
    mean, rstd = np.ravel(mean), np.ravel(rstd)
    assert np.all(np.abs(m - mean) <= 1e-5 / rstd + 1e-12 * np.abs(mean)), "mean"
    np.testing.assert_allclose(r, rstd, rtol=2e-5, atol=0)


# ---- the helpers themselves --------------------------------------------------------------

def test_ulp_helper_counts_grid_steps():
    for dt in LOWP:
        v = np.array([1.0, -1.0, 0.0, 3.5, 1e-6, -2.0 ** -20], dtype=np.float64)
        y = v.astype(dt)
        assert np.array_equal(bits_position(y), grid_position(wide(y), dt))
        up = np.nextafter(y.astype(dt), np.asarray(np.inf, dtype=dt))
        assert np.array_equal(bits_position(up) - bits_position(y), np.ones(v.size))
    with pytest.raises(AssertionError, match="beyond 1 ulp"):
        y = np.array([1.0], dtype=F16)
        assert_within_one_ulp(y, np.array([1.0 + 2.5 * 2.0 ** -10]))


def test_conversions_are_exact_and_round_to_nearest_even():
    from cynorm._kernels import row
    for dt in LOWP:
        bits = np.arange(65536, dtype=np.uint16)
        h = bits.view(dt)
        w = np.empty(h.shape, dtype=np.float32)
        row.convert(h, w)
        nan = np.isnan(wide(h))
        assert np.array_equal(w[~nan], h[~nan].astype(np.float32))
        assert np.isnan(w[nan]).all()
        # every float32 halfway case, its neighbours, and overflow to Inf
        f = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
        f *= np.float32(2.0) ** np.random.default_rng(2).integers(-30, 30, f.size)
        f = np.concatenate([f, [np.inf, -np.inf, 3.0e38, 65519.0, 65520.0, -7e4,
                                2.0 ** -25, 3 * 2.0 ** -26]]).astype(np.float32)
        back = np.empty(f.shape, dtype=dt)
        row.convert(f, back)
        with np.errstate(over="ignore"):
            expect = f.astype(np.float64).astype(dt) if dt == F16 else f.astype(dt)
        assert np.array_equal(back.view(np.uint16), expect.view(np.uint16))
        q = np.empty(2, dtype=dt)
        row.convert(np.array([np.nan, -np.nan], dtype=np.float32), q)
        assert np.isnan(wide(q)).all()


# ---- forward, every op, every dtype, with and without activation ------------------------

def _gn_ref(x, G, w, b, act, eps=1e-5):
    y, mean, rstd = ref.group_norm(wide(x), G, wide(w), wide(b), eps)
    terms = np.abs((y - wide(b).reshape(1, -1, *([1] * (x.ndim - 2))))) + np.abs(
        wide(b).reshape(1, -1, *([1] * (x.ndim - 2))))
    return ref.activation(act, y), mean, rstd, terms


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,G", [((2, 8, 5, 7), 4), ((1, 4, 96, 96), 1),
                                      ((3, 6, 33), 6)])
def test_group_norm_forward_within_one_ulp(dt, shape, G, act):
    x = data(shape, dt, 0, loc=2.0, scale=3.0)
    w, b = data(shape[1], np.float32, 1, 1.0), data(shape[1], np.float32, 2)
    y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, activation=act)
    assert y.dtype == dt and m.dtype == r.dtype == np.float64
    e, mean, rstd, terms = _gn_ref(x, G, w, b, act)
    assert_16bit_stats_bound(m, r, mean, rstd)
    assert_within_one_ulp(y, e, terms=terms if act in (None, "relu") else terms + 1.0)


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_instance_norm_forward_within_one_ulp(dt, act):
    x = data((2, 5, 17, 19), dt, 3)
    w, b = data(5, dt, 1, 1.0), data(5, dt, 2)
    y, m, r = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True, activation=act)
    e, mean, rstd, terms = _gn_ref(x, 5, w, b, act)
    assert_within_one_ulp(y, e, terms=terms + (act is not None))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(4, 6, 10, 10), (64, 3), (5, 4, 7)])
def test_batch_norm_forward_within_one_ulp(dt, shape, training):
    # (64, 3) and (5, 4, 7): runs shorter than 64 (the column path)
    x = data(shape, dt, 4, loc=-1.0, scale=2.0)
    C = shape[1]
    w, b = data(C, np.float32, 1, 1.0), data(C, np.float32, 2)
    rm, rv = data(C, np.float32, 5), np.abs(data(C, np.float32, 6)) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, m, r = cynorm.batch_norm(x, rm, rv, w, b, training=training, return_stats=True)
    assert y.dtype == dt
    e, mean, rstd, nrm, nrv = ref.batch_norm(wide(x), rm0, rv0, w, b, training=training)
    np.testing.assert_allclose(m, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r, rstd, rtol=1e-12)
    if training:
        np.testing.assert_allclose(rm, nrm, rtol=1e-6)
        np.testing.assert_allclose(rv, nrv, rtol=1e-6)
    bb = wide(b).reshape(1, C, *([1] * (len(shape) - 2)))
    assert_within_one_ulp(y, e, terms=np.abs(e - bb) + np.abs(bb))


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,ns", [((64, 300), 300), ((2, 3, 5000), 5000),
                                       ((3, 8, 24), (8, 24))])
def test_layer_norm_forward_within_one_ulp(dt, shape, ns):
    x = data(shape, dt, 7, loc=5.0, scale=2.0)
    nst = (ns,) if isinstance(ns, int) else ns
    w, b = data(nst, dt, 1, 1.0), data(nst, dt, 2)
    y, m, r = cynorm.layer_norm(x, ns, w, b, return_stats=True)
    e, mean, rstd = ref.layer_norm(wide(x), ns, wide(w), wide(b))
    assert_16bit_stats_bound(m, r, mean, rstd)
    assert_within_one_ulp(y, e, terms=np.abs(e - wide(b)) + np.abs(wide(b)))


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,ns", [((64, 300), 300), ((2, 9000), 9000)])
def test_rms_norm_forward_within_one_ulp(dt, shape, ns):
    x = data(shape, dt, 8, scale=4.0)
    w = data(ns, dt, 1, 1.0)
    y, r = cynorm.rms_norm(x, ns, w, eps=1e-6, return_stats=True)
    e, rstd = ref.rms_norm(wide(x), ns, wide(w), eps=1e-6)
    np.testing.assert_allclose(r, rstd, rtol=2e-6)  # float32 squares, 8 to a partial
    assert_within_one_ulp(y, e)


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_rms_norm_default_eps_is_the_storage_epsilon(dt):
    x = np.zeros((2, 8), dtype=dt)
    _, r = cynorm.rms_norm(x, 8, return_stats=True)
    eps = {F16: 2.0 ** -10, BF16: 2.0 ** -7}[dt]
    np.testing.assert_allclose(r, 1.0 / np.sqrt(eps), rtol=1e-15)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_residual_sum_is_rounded_once_and_normalised(dt, op):
    x, res = data((16, 520), dt, 9, scale=3.0), data((16, 520), dt, 10)
    w = data(520, dt, 1, 1.0)
    if op == "layer_norm":
        y, h = cynorm.layer_norm(x, 520, w, residual=res)
    else:
        y, h = cynorm.rms_norm(x, 520, w, eps=1e-6, residual=res)
    assert h.dtype == y.dtype == dt
    hsum = wide(x) + wide(res)
    assert_within_one_ulp(h, hsum)  # the float32 sum rounded to the storage dtype
    if op == "layer_norm":
        e = ref.layer_norm(wide(h), 520, wide(w))[0]
    else:
        e = ref.rms_norm(wide(h), 520, wide(w), eps=1e-6)[0]
    assert_within_one_ulp(y, e)


# ---- backward ---------------------------------------------------------------------------

def _dx_terms(dy, xhat, rstd, w, shape):
    g = np.abs(wide(dy) * w)
    return rstd * (g + np.max(g) + np.abs(xhat) * np.max(g))


@pytest.mark.parametrize("act", [None, "silu", "relu"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,G", [((2, 8, 9, 10), 4), ((1, 4, 80, 80), 1),
                                      ((3, 4, 2, 3), 4)])
def test_group_norm_backward_within_one_ulp(dt, shape, G, act):
    x, dy = data(shape, dt, 11, loc=1.0), data(shape, dt, 12)
    C = shape[1]
    w, b = data(C, np.float32, 1, 1.0), data(C, np.float32, 2)
    _, mean, rstd = ref.group_norm(wide(x), G, w, b)
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, G, w, bias=b,
                                            activation=act)
    assert dx.dtype == dt and dw.dtype == db.dtype == np.float32
    # the reference: dy through the activation's derivative at the float64 pre-activation
    a = ref.group_norm(wide(x), G, w, b)[0]
    g = wide(dy) * ref.activation_grad(act, a)
    edx, edw, edb = ref.group_norm_backward(g, wide(x), mean, rstd, G, w)
    M = x.size // (shape[0] * G)
    rs = np.repeat(rstd, C // G, axis=1).reshape(shape[0], C, *([1] * (len(shape) - 2)))
    scale = rs * np.max(np.abs(g)) * np.max(np.abs(w)) * 4
    assert_within_one_ulp(dx, edx, terms=scale + 0 * edx, what="dx")
    # float32 dweight/dbias: float32 products summed in float64, rounded to float32
    axes = (0,) + tuple(range(2, len(shape)))
    xhat = (a - b.reshape(1, C, *([1] * (len(shape) - 2)))) / w.reshape(
        1, C, *([1] * (len(shape) - 2)))
    np.testing.assert_allclose(dw, edw, rtol=2e-7,
                               atol=1e-6 * np.abs(g * xhat).sum(axis=axes).max())
    np.testing.assert_allclose(db, edb, rtol=2e-7, atol=1e-6 * np.abs(g).sum(axis=axes).max())
    assert M > 0


@pytest.mark.parametrize("wdt", [None, "same", np.float32], ids=str)
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,ns", [((64, 300), 300), ((3, 5000), 5000)])
def test_layer_norm_backward_within_one_ulp(dt, shape, ns, wdt):
    x, dy = data(shape, dt, 13, loc=2.0), data(shape, dt, 14)
    w = None if wdt is None else data(ns, dt if wdt == "same" else wdt, 1, 1.0)
    _, mean, rstd = ref.layer_norm(wide(x), ns)
    dx, dw, db = cynorm.layer_norm_backward(dy, x, mean, rstd, ns, w)
    assert dx.dtype == dt
    assert dw.dtype == db.dtype == (dt if wdt in (None, "same") else np.float32)
    wf = np.ones(ns) if w is None else wide(w)
    edx, edw, edb = ref.layer_norm_backward(wide(dy), wide(x), mean, rstd, ns, wf)
    scale = rstd[:, None] * np.max(np.abs(wide(dy) * wf)) * 4
    assert_within_one_ulp(dx, edx, terms=scale + 0 * edx, what="dx")
    xhat = (wide(x) - mean[:, None]) * rstd[:, None]
    if dw.dtype == np.float32:
        np.testing.assert_allclose(dw, edw, rtol=2e-7,
                                   atol=1e-6 * np.abs(wide(dy) * xhat).sum(0).max())
    else:
        assert_within_one_ulp(dw, edw, terms=np.abs(wide(dy) * xhat).sum(0), what="dw")
        assert_within_one_ulp(db, edb, terms=np.abs(wide(dy)).sum(0), what="db")


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,ns", [((64, 300), 300), ((2, 9000), 9000)])
def test_rms_norm_backward_within_one_ulp(dt, shape, ns):
    x, dy = data(shape, dt, 15, scale=3.0), data(shape, dt, 16)
    w = data(ns, dt, 1, 1.0)
    _, rstd = ref.rms_norm(wide(x), ns, wide(w), eps=1e-6)
    dx, dw = cynorm.rms_norm_backward(dy, x, rstd, ns, w)
    assert dx.dtype == dw.dtype == dt
    edx, edw = ref.rms_norm_backward(wide(dy), wide(x), rstd, ns, wide(w))
    scale = rstd[:, None] * np.max(np.abs(wide(dy) * wide(w))) * 4
    assert_within_one_ulp(dx, edx, terms=scale + 0 * edx, what="dx")
    assert_within_one_ulp(dw, edw, terms=np.abs(wide(dy) * wide(x) * rstd[:, None]).sum(0),
                          what="dw")


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(4, 6, 10, 10), (64, 3)])
def test_batch_norm_backward_within_one_ulp(dt, shape, training, act):
    x, dy = data(shape, dt, 17, loc=0.5), data(shape, dt, 18)
    C = shape[1]
    w, b = data(C, dt, 1, 1.0), data(C, dt, 2)
    rm, rv = data(C, np.float64, 5), np.abs(data(C, np.float64, 6)) + 0.5
    a, mean, rstd, _, _ = ref.batch_norm(wide(x), rm, rv, wide(w), wide(b),
                                         training=training)
    dx, dw, db = cynorm.batch_norm_backward(dy, x, mean, rstd, w, training=training,
                                            bias=b, activation=act)
    assert dx.dtype == dw.dtype == db.dtype == dt
    g = wide(dy) * ref.activation_grad(act, a)
    edx, edw, edb = ref.batch_norm_backward(g, wide(x), mean, rstd, wide(w), training)
    shp = (1, C) + (1,) * (len(shape) - 2)
    scale = rstd.reshape(shp) * np.max(np.abs(g)) * np.max(np.abs(wide(w))) * 4
    assert_within_one_ulp(dx, edx, terms=scale + 0 * edx, what="dx")
    axes = (0,) + tuple(range(2, len(shape)))
    xhat = (wide(x) - mean.reshape(shp)) * rstd.reshape(shp)
    assert_within_one_ulp(dw, edw, terms=np.abs(g * xhat).sum(axis=axes), what="dw")
    assert_within_one_ulp(db, edb, terms=np.abs(g).sum(axis=axes), what="db")


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_instance_norm_backward_within_one_ulp(dt):
    x, dy = data((2, 3, 12, 12), dt, 19), data((2, 3, 12, 12), dt, 20)
    w = data(3, dt, 1, 1.0)
    _, mean, rstd = ref.instance_norm(wide(x))
    dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, w)
    edx, edw, edb = ref.instance_norm_backward(wide(dy), wide(x), mean, rstd, wide(w))
    scale = np.repeat(rstd, 1, axis=1)[:, :, None, None] * np.max(np.abs(wide(dy))) * 4
    assert_within_one_ulp(dx, edx, terms=scale + 0 * edx, what="dx")
    assert dw.dtype == db.dtype == dt


# ---- special values -----------------------------------------------------------------------

@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_nan_and_inf_stay_in_their_sets(dt):
    x = data((2, 4, 6, 6), dt, 21)
    x[0, 0, 1, 1] = np.nan
    x[1, 3, 0, 0] = np.inf
    y = cynorm.group_norm(x, 2)
    yw = wide(y)
    assert np.isnan(yw[0, :2]).all() and np.isnan(yw[1, 2:]).all()
    assert np.isfinite(yw[0, 2:]).all() and np.isfinite(yw[1, :2]).all()
    r = data((3, 40), dt, 22)
    r[1, 5] = -np.inf
    yr = wide(cynorm.layer_norm(r, 40))
    assert np.isnan(yr[1]).all() and np.isfinite(yr[[0, 2]]).all()


def test_float32_results_beyond_float16_overflow_to_inf_on_store():
    x = data((2, 4, 8, 8), F16, 23)
    w = np.array([1e5, -1e5, 1.0, 3e4], dtype=np.float32)
    y = cynorm.group_norm(x, 2, w)
    e = ref.group_norm(wide(x), 2, w)[0]
    assert_within_one_ulp(y, np.where(np.abs(e) >= 65520.0, np.copysign(np.inf, e), e))
    yw = wide(y)
    assert np.isinf(yw[:, 0]).any() and np.isinf(yw[:, 1]).any()
    assert np.isfinite(yw[:, 2]).all()
    # bfloat16 shares float32's range: the same weights stay finite
    assert np.isfinite(wide(cynorm.group_norm(x.astype(BF16), 2, w))).all()


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_subnormal_and_huge_data_keep_their_digits(dt):
    tiny = np.float64(2.0 ** -20 if dt == F16 else 2.0 ** -120)
    big = np.float64(4e3 if dt == F16 else 1e37)
    for s in (tiny, big):
        x = (data((4, 64), np.float64, 24) * s).astype(dt)
        assert np.isfinite(wide(x)).all() and np.ptp(wide(x), axis=1).min() > 0
        y = cynorm.layer_norm(x, 64)
        assert_within_one_ulp(y, ref.layer_norm(wide(x), 64)[0], terms=None)


# ---- mixed parameter dtypes ----------------------------------------------------------------

@pytest.mark.parametrize("pdt", [np.float32, np.float64, F16, BF16], ids=str)
@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_mixed_parameter_dtypes_are_accepted(dt, pdt):
    x, dy = data((2, 6, 9, 9), dt, 25), data((2, 6, 9, 9), dt, 26)
    w, b = data(6, pdt, 1, 1.0), data(6, pdt, 2)
    y, m, r = cynorm.group_norm(x, 3, w, b, return_stats=True)
    # float64 parameters are used in float32 (the compute precision of 16-bit data)
    wf, bf = wide(w.astype(np.float32)), wide(b.astype(np.float32))
    e = ref.group_norm(wide(x), 3, wf, bf)[0]
    assert_within_one_ulp(y, e, terms=np.abs(e - bf.reshape(1, 6, 1, 1)) + np.abs(bf.reshape(1, 6, 1, 1)))
    dx, dw, db = cynorm.group_norm_backward(dy, x, m, r, 3, w)
    assert dx.dtype == dt and dw.dtype == db.dtype == np.dtype(pdt)


# ---- determinism ----------------------------------------------------------------------------

@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,G", [((1, 4, 128, 128), 1), ((8, 32, 16, 16), 8),
                                      ((2, 6, 4097), 6)])
def test_group_norm_bitwise_identical_across_thread_counts(dt, shape, G):
    x, dy = data(shape, dt), data(shape, dt, 3)
    w, b = data(shape[1], dt, 1, 1.0), data(shape[1], dt, 2)

    def run():
        y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, activation="silu")
        return (y, m, r) + cynorm.group_norm_backward(dy, x, m, r, G, w)
    across_threads(run)


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(2, 20000), (200, 768), (70, 33)])
def test_row_ops_bitwise_identical_across_thread_counts(dt, shape):
    x, dy, res = data(shape, dt), data(shape, dt, 3), data(shape, dt, 4)
    K = shape[-1]
    w, b = data(K, dt, 1, 1.0), data(K, dt, 2)

    def run():
        y, h, m, r = cynorm.layer_norm(x, K, w, b, return_stats=True, residual=res)
        y2, r2 = cynorm.rms_norm(x, K, w, return_stats=True)
        return ((y, h, m, r, y2, r2) + cynorm.layer_norm_backward(dy, h, m, r, K, w)
                + cynorm.rms_norm_backward(dy, x, r2, K, w))
    across_threads(run)


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(8, 3, 40, 40), (256, 16)])
def test_batch_norm_bitwise_identical_across_thread_counts(dt, shape):
    x, dy = data(shape, dt), data(shape, dt, 3)
    C = shape[1]
    w, b = data(C, dt, 1, 1.0), data(C, dt, 2)

    def run():
        y, m, r = cynorm.batch_norm(x, None, None, w, b, training=True, return_stats=True)
        return (y, m, r) + cynorm.batch_norm_backward(dy, x, m, r, w)
    across_threads(run)


# ---- torch as an oracle ---------------------------------------------------------------------

def _torch_lowp(torch, dt):
    return torch.bfloat16 if dt == BF16 else torch.float16


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_group_and_layer_norm_match_torch_within_two_ulps(dt):
    torch = pytest.importorskip("torch")
    tdt = _torch_lowp(torch, dt)
    x, dy = data((2, 8, 6, 6), dt, 27), data((2, 8, 6, 6), dt, 28)
    w, b = data(8, dt, 1, 1.0), data(8, dt, 2)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(tdt)

    def back(tt):
        return tt.detach().contiguous().view(torch.int16).numpy().view(dt)

    tx = t(x).clone().requires_grad_(True)
    tw, tb = t(w).clone().requires_grad_(True), t(b).clone().requires_grad_(True)
    try:
        ty = torch.nn.functional.group_norm(tx, 4, tw, tb, 1e-5)
        ty.backward(t(dy))
    except RuntimeError as e:  # a dtype torch's CPU kernels lack
        pytest.skip(f"torch: {e}")
    y, m, r = cynorm.group_norm(x, 4, w, b, return_stats=True)
    dx, dw, db = cynorm.group_norm_backward(dy, x, m, r, 4, w)
    for mine, theirs in ((y, ty), (dx, tx.grad)):
        dist = np.abs(bits_position(mine) - bits_position(back(theirs)))
        scale = np.max(np.abs(wide(mine)))
        close = np.abs(wide(mine) - wide(back(theirs))) <= 2.0 ** -7 * scale
        assert ((dist <= 2) | close).all(), dist.max()
    # LayerNorm over the trailing dims
    xr = data((16, 64), dt, 29)
    wr, br = data(64, dt, 1, 1.0), data(64, dt, 2)
    ty = torch.nn.functional.layer_norm(t(xr), (64,), t(wr), t(br), 1e-5)
    y = cynorm.layer_norm(xr, 64, wr, br)
    dist = np.abs(bits_position(y) - bits_position(back(ty)))
    close = np.abs(wide(y) - wide(back(ty))) <= 2.0 ** -7 * np.max(np.abs(wide(y)))
    assert ((dist <= 2) | close).all(), dist.max()


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_out_of_another_dtype_is_a_type_error_naming_out(dt):
    x = data((2, 4, 3, 3), dt)
    with pytest.raises(TypeError, match="out must have dtype"):
        cynorm.group_norm(x, 2, out=np.empty(x.shape, dtype=np.float32))
    other = BF16 if dt == F16 else F16
    with pytest.raises(TypeError, match="out must have dtype"):
        cynorm.layer_norm(x, (3,), out=np.empty(x.shape, dtype=other))
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        cynorm.rms_norm_backward(np.zeros(x.shape, np.float32), x, np.ones((2, 4, 3)), 3)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        cynorm.rms_norm(x, 3, residual=np.zeros(x.shape, dtype=other))


def test_other_dtypes_are_type_errors_naming_x():
    for bad in (np.int16, np.uint16, np.complex64):
        with pytest.raises(TypeError, match="x must be a float32, float64, float16 or "
                                            "bfloat16 array"):
            cynorm.group_norm(np.zeros((2, 4, 3), dtype=bad), 2)
    with pytest.raises(TypeError, match="weight must be a floating-point array"):
        cynorm.layer_norm(np.zeros((2, 4), F16), 4, np.zeros(4, dtype=np.int16))


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_in_place_out_is_allowed(dt):
    x = data((3, 4, 70), dt, 30)
    expect = cynorm.group_norm(x, 2)
    y = cynorm.group_norm(x, 2, out=x)
    assert y is x and np.array_equal(x.view(np.uint16), expect.view(np.uint16))


# ---- layers -------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_layers_take_16bit_parameters_with_float32_running_stats(dt):
    from cynorm import nn
    bn = nn.BatchNorm(4, dtype=dt)
    assert bn.weight.dtype == bn.bias.dtype == dt
    assert bn.running_mean.dtype == bn.running_var.dtype == np.float32
    x, dy = data((6, 4, 9, 9), dt, 31), data((6, 4, 9, 9), dt, 32)
    y = bn(x)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    e, m, r = cynorm.batch_norm(x, rm, rv, bn.weight, bn.bias, training=True,
                                return_stats=True)
    assert y.dtype == dt and np.array_equal(y.view(np.uint16), e.view(np.uint16))
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    dx = bn.backward(dy)
    edx, edw, edb = cynorm.batch_norm_backward(dy, x, m, r, bn.weight)
    assert dx.dtype == dt and np.array_equal(dx.view(np.uint16), edx.view(np.uint16))
    assert bn.grads["weight"].dtype == bn.grads["bias"].dtype == dt
    # the state round-trips with its dtypes
    other = nn.BatchNorm(4, dtype=dt)
    other.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert other.state_dict()[k].dtype == v.dtype
        assert np.array_equal(wide(other.state_dict()[k]), wide(v))
    for layer, shape in ((nn.GroupNorm(2, 4, dtype=dt, activation="silu"), (2, 4, 5, 5)),
                         (nn.InstanceNorm(4, affine=True, track_running_stats=True,
                                          dtype=dt), (2, 4, 7)),
                         (nn.LayerNorm(16, dtype=dt), (3, 16)),
                         (nn.RMSNorm(16, dtype=dt), (3, 16))):
        xx = data(shape, dt, 33)
        yy = layer(xx)
        assert yy.dtype == dt
        assert layer.backward(data(shape, dt, 34)).dtype == dt
        assert all(g.dtype == dt for g in layer.grads.values())


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 100), (2, 3, 5)])
def test_instance_norm_with_running_stats_within_one_ulp(dt, shape):
    # use_input_stats=False normalises per channel with the running statistics: the
    # channel kernels (runs of 100: in 16 bits; runs of 5: through float32 copies)
    x, dy = data(shape, dt, 35), data(shape, dt, 36)
    w, b = data(3, dt, 1, 1.0), data(3, dt, 2)
    rm, rv = data(3, np.float32, 5), np.abs(data(3, np.float32, 6)) + 0.5
    y, m, r = cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False,
                                   return_stats=True)
    e = ref.batch_norm(wide(x), rm, rv, wide(w), wide(b), training=False)[0]
    bb = wide(b).reshape(1, 3, 1)
    assert_within_one_ulp(y, e, terms=np.abs(e - bb) + np.abs(bb))
    dx, dw, db = cynorm.instance_norm_backward(dy, x, m, r, w, use_input_stats=False)
    edx = ref.batch_norm_backward(wide(dy), wide(x), m, r, wide(w), False)[0]
    assert_within_one_ulp(dx, edx, what="dx")
    assert dx.dtype == dw.dtype == db.dtype == dt


# ---- 16-bit storage with channels-last x (channel_axis=-1) --------------------------------

@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("op", ["group_norm", "instance_norm", "batch_norm"])
def test_channels_last_storage_forward_and_backward_within_one_ulp(dt, op, act):
    """A 16-bit channels-last x (N, H, W, C): y, dx within 1 ulp of the float64
    reference on the transposed (NCHW) data, y and dx in x's dtype, in x's layout."""
    N, H, W, C, G = 2, 5, 7, 8, 4
    xl = data((N, H, W, C), dt, 3, loc=2.0, scale=3.0)
    dyl = data((N, H, W, C), dt, 4)
    w, b = data(C, np.float32, 5, 1.0), data(C, np.float32, 6)
    xc = np.moveaxis(wide(xl), -1, 1)
    dyc = np.moveaxis(wide(dyl), -1, 1)
    if op == "group_norm":
        y, m, r = cynorm.group_norm(xl, G, w, b, return_stats=True, activation=act,
                                    channel_axis=-1)
        dx, dw, db = cynorm.group_norm_backward(dyl, xl, m, r, G, w, bias=b,
                                                activation=act, channel_axis=-1)
        groups = G
    elif op == "instance_norm":
        y, m, r = cynorm.instance_norm(xl, weight=w, bias=b, return_stats=True,
                                       activation=act, channel_axis=-1)
        dx, dw, db = cynorm.instance_norm_backward(dyl, xl, m, r, w, bias=b,
                                                   activation=act, channel_axis=-1)
        groups = C
    else:
        y, m, r = cynorm.batch_norm(xl, None, None, w, b, training=True,
                                    return_stats=True, activation=act, channel_axis=-1)
        dx, dw, db = cynorm.batch_norm_backward(dyl, xl, m, r, w, bias=b,
                                                activation=act, channel_axis=-1)
    assert y.dtype == dx.dtype == dt and y.shape == dx.shape == xl.shape
    if op == "batch_norm":
        ey, mean, rstd = ref.batch_norm(xc, None, None, wide(w), wide(b), training=True)[:3]
    else:
        ey, mean, rstd = ref.group_norm(xc, groups, wide(w), wide(b), 1e-5)
    np.testing.assert_allclose(m, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r, rstd, rtol=1e-12)
    bb = wide(b).reshape(1, -1, 1, 1)
    terms = np.abs(ey - bb) + np.abs(bb) + (0.0 if act is None else 1.0)
    assert_within_one_ulp(y, np.moveaxis(ref.activation(act, ey), 1, -1),
                          terms=np.moveaxis(terms, 1, -1))
    # dx: dy through the activation's derivative at the float64 pre-activation, then the
    # plain backward, all in float64 on the transposed (NCHW) data
    g = dyc * ref.activation_grad(act, ey)
    if op == "batch_norm":
        edx = ref.batch_norm_backward(g, xc, mean, rstd, wide(w), training=True)[0]
        rs = rstd.reshape(1, C, 1, 1)
    else:
        edx = ref.group_norm_backward(g, xc, mean, rstd, groups, wide(w))[0]
        rs = np.repeat(rstd, C // groups, axis=1).reshape(N, C, 1, 1)
    scale = rs * np.max(np.abs(g)) * np.max(np.abs(w)) * 4 + 0 * edx
    assert_within_one_ulp(dx, np.moveaxis(edx, 1, -1), terms=np.moveaxis(scale, 1, -1),
                          what="dx")


def round_once(a32, dt):
    """float32 results rounded to nearest even to dt (float32 -> float64 is exact, so
    NumPy's float64 -> float16 cast is one rounding of the float32 value)."""
    a32 = np.asarray(a32, dtype=np.float32)
    return a32.astype(np.float64).astype(dt) if dt == F16 else a32.astype(dt)


def _equal_bits(a, e, what):
    """a and e (16-bit) hold the same bits, NaN in the same places (any payload)."""
    assert a.dtype == e.dtype and a.shape == e.shape, what
    nan = np.isnan(wide(a))
    assert np.array_equal(nan, np.isnan(wide(e))), f"{what}: NaN positions differ"
    bad = (np.ascontiguousarray(a).view(np.uint16)
           != np.ascontiguousarray(e).view(np.uint16)) & ~nan
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} values differ from the "
                           "float32 result rounded once")


# shapes with sets shorter than, equal to and longer than a piece, odd tails
_EQUIV_GN = [((2, 8, 5, 7), 4), ((1, 4, 96, 96), 1), ((3, 6, 33), 6), ((2, 64, 37, 41), 32)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,G", _EQUIV_GN)
def test_group_norm_16bit_is_the_float32_computation_rounded_once(dt, shape, G, act):
    """The README's promise: statistics within the 16-bit bound of the float64 ones; the
    apply (without an activation) bit for bit the float32 apply on the widened data with
    those statistics, rounded once; the backward, given the statistics, bit for bit the
    float32 backward rounded once, its dweight/dbias the float32 ones."""
    x = data(shape, dt, 21, loc=2.0, scale=3.0)
    w, b = data(shape[1], np.float32, 22, 1.0), data(shape[1], np.float32, 23)
    x32 = x.astype(np.float32)
    y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, activation=act)
    _, mean, rstd = ref.group_norm(wide(x), G, None, None, 1e-5)
    assert_16bit_stats_bound(m, r, mean, rstd)
    if act is None:
        y32 = cynorm.apply_stats(x32, m, r, w, b, "group", num_groups=G)
        _equal_bits(y, round_once(y32, dt), "y")
    dy = data(shape, dt, 24)
    dx, dw, db = cynorm.group_norm_backward(dy, x, m, r, G, w, bias=b, activation=act)
    dx32, dw32, db32 = cynorm.group_norm_backward(dy.astype(np.float32), x32, m, r, G, w,
                                                  bias=b, activation=act)
    # with an activation too: dy * act'(a) stays in float32, as on float32 data
    _equal_bits(dx, round_once(dx32, dt), "dx")
    assert np.array_equal(dw, dw32) and np.array_equal(db, db32)
    for target in ("dy", "x"):  # in place: the same bits
        d2, x2 = dy.copy(), x.copy()
        out = d2 if target == "dy" else x2
        got = cynorm.group_norm_backward(d2, x2, m, r, G, w, bias=b, activation=act,
                                         out=out)[0]
        assert got is out and np.array_equal(got.view(np.uint16), dx.view(np.uint16))


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(64, 300), (3, 5000), (4, 768), (5, 17)])
@pytest.mark.parametrize("op", ["layer", "rms"])
def test_row_ops_16bit_are_the_float32_computation_rounded_once(dt, shape, op):
    x = data(shape, dt, 25, loc=2.0)
    dy = data(shape, dt, 26)
    K = shape[-1]
    w, b = data(K, np.float32, 27, 1.0), data(K, np.float32, 28)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    if op == "layer":
        y, m, r = cynorm.layer_norm(x, K, w, b, return_stats=True)
        _, mean, rstd = ref.layer_norm(wide(x), K, eps=1e-5)
        assert_16bit_stats_bound(m, r, mean, rstd)
        y32 = cynorm.apply_stats(x32, m, r, w, b, "layer", normalized_ndim=1)
        dx, dw, db = cynorm.layer_norm_backward(dy, x, m, r, K, w)
        dx32, dw32, db32 = cynorm.layer_norm_backward(dy32, x32, m, r, K, w)
        assert np.array_equal(db, db32)
    else:
        y, r = cynorm.rms_norm(x, K, w, eps=1e-6, return_stats=True)
        rstd = 1 / np.sqrt(np.mean(wide(x) ** 2, axis=-1) + 1e-6)
        np.testing.assert_allclose(r, rstd, rtol=2e-6, atol=0)
        y32 = cynorm.apply_stats(x32, None, r, w, None, "rms", normalized_ndim=1)
        dx, dw = cynorm.rms_norm_backward(dy, x, r, K, w)
        dx32, dw32 = cynorm.rms_norm_backward(dy32, x32, r, K, w)
    _equal_bits(y, round_once(y32, dt), "y")
    _equal_bits(dx, round_once(dx32, dt), "dx")
    assert np.array_equal(dw, dw32)


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("case", ["offset", "far_head", "outliers", "steps"])
def test_16bit_statistics_within_their_bound_of_float64(dt, case):
    """The statistics pass's float32 deviations (sets of several pieces and pieces of
    several float32 blocks): a large mean, a first block far from the rest (the shift
    is a poor guess; the second pass takes over), outliers, near-constant runs; for
    GroupNorm, LayerNorm and RMSNorm, within the README's bound of the float64 values."""
    rng = np.random.default_rng(47)
    n, M = 6, 9000
    if case == "offset":
        x = 3e3 + 2.0 * rng.standard_normal((n, M)) if dt == BF16 else \
            300 + 0.5 * rng.standard_normal((n, M))
    elif case == "far_head":
        x = rng.standard_normal((n, M))
        x[:, :300] += 6.0
    elif case == "outliers":
        x = rng.standard_normal((n, M))
        x[:, rng.integers(0, M, 40)] = 900.0
    else:
        x = np.repeat(rng.integers(-3, 4, (n, M // 500)), 500, axis=1) * 0.25 + 1.0
    x = x.astype(dt)
    xw = wide(x)
    _, m, r = cynorm.group_norm(x.reshape(n, 4, 50, 45), 2, return_stats=True)
    _, mean, rstd = ref.group_norm(xw.reshape(n, 4, 50, 45), 2, None, None, 1e-5)
    assert_16bit_stats_bound(m, r, mean, rstd)
    _, m, r = cynorm.layer_norm(x, M, return_stats=True)
    _, mean, rstd = ref.layer_norm(xw, M, eps=1e-5)
    assert_16bit_stats_bound(m, r, mean, rstd)
    _, r = cynorm.rms_norm(x, M, eps=1e-6, return_stats=True)
    np.testing.assert_allclose(r, 1 / np.sqrt(np.mean(xw ** 2, axis=-1) + 1e-6),
                               rtol=2e-6, atol=0)


@pytest.mark.parametrize("op", ["group", "layer"])
def test_bfloat16_store_rounds_subnormal_nan_and_huge_results_as_float32_rounded_once(op):
    """The bfloat16 forward applies' store (AVX-512 BF16 where the CPU has it, which
    flushes subnormal inputs: those vectors take the integer rounding) gives the bits of
    the float32 apply rounded once, for subnormal results (a weight near the float32
    normal limit), NaN, Inf and results beyond the bfloat16 range, at every offset of
    the output (unaligned heads, whole pairs of vectors, tails)."""
    rng = np.random.default_rng(49)
    C, HW = 8, 100
    x = (0.5 + rng.standard_normal((3, C, HW))).astype(BF16)
    x[1, 2, 7] = np.nan
    x[2, 5, 50] = np.inf
    if op == "group":
        w = np.full(C, 3e-38, np.float32)
        w[0], w[3] = 1.0, 3e38  # ordinary results, and results past the bfloat16 range
        b = np.zeros(C, np.float32)
        b[4] = 1e-39  # subnormal bias
    else:
        w = np.full(C * HW, 3e-38, np.float32)
        w[:HW], w[3 * HW:4 * HW] = 1.0, 3e38
        b = np.zeros(C * HW, np.float32)
        b[4 * HW:5 * HW] = 1e-39
        x = x.reshape(3, C * HW)
    for start in (0, 1, 5, 17):  # the output's offset from a 64-byte boundary, x2 bytes
        buf = np.empty(x.size + 40, BF16)
        out = buf[start:start + x.size].reshape(x.shape)
        if op == "group":
            y, m, r = cynorm.group_norm(x, 2, w, b, out=out, return_stats=True)
            y32 = cynorm.apply_stats(x.astype(np.float32), m, r, w, b, "group",
                                     num_groups=2)
        else:
            y, m, r = cynorm.layer_norm(x, C * HW, w, b, out=out, return_stats=True)
            y32 = cynorm.apply_stats(x.astype(np.float32), m, r, w, b, "layer",
                                     normalized_ndim=1)
        e = round_once(y32, BF16)
        assert (np.abs(wide(e)) < 2.0 ** -126).sum() > 100  # subnormal results indeed
        _equal_bits(y, e, f"y at offset {start}")


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_statistics_of_tiny_huge_and_constant_long_sets(dt):
    """Sets long enough for the float32 deviations, whose squares would underflow
    (bfloat16 near 2**-120: eps=0 makes a lost variance visible) or overflow (bfloat16
    near 1e37) in float32, and constant sets (variance exactly 0)."""
    tiny = 2.0 ** -20 if dt == F16 else 2.0 ** -120
    big = 4e3 if dt == F16 else 1e37
    rng = np.random.default_rng(48)
    for s in (tiny, big):
        x = (rng.standard_normal((3, 2048)) * s).astype(dt)
        for eps in (0.0, 1e-5):
            y, m, r = cynorm.layer_norm(x, 2048, eps=eps, return_stats=True)
            ey, mean, rstd = ref.layer_norm(wide(x), 2048, eps=eps)
            assert_16bit_stats_bound(m, r, mean, rstd)
            assert_within_one_ulp(y, ey, terms=None)
            _, r = cynorm.rms_norm(x, 2048, eps=eps, return_stats=True)
            np.testing.assert_allclose(
                r, 1 / np.sqrt(np.mean(wide(x) ** 2, axis=-1) + eps), rtol=2e-6, atol=0)
    c = np.full((2, 4, 32, 32), 1.5, dt)
    y, m, r = cynorm.group_norm(c, 2, eps=0.25, return_stats=True)
    assert np.array_equal(m, np.full((2, 2), 1.5)) and np.array_equal(r, np.full((2, 2), 2.0))
    assert not wide(y).any()


# ---- channels-last and BatchNorm's short runs read 16-bit data in place -------------------
# The channels-last kernel and BatchNorm's column path (runs shorter than 64) take 16-bit
# data directly: their moments read staged, widened row blocks; the gradient sums, the
# apply and dx widen in registers (or run on widened row pieces), in the float32 data's
# arithmetic, rounded once on store. So a 16-bit result is bitwise the float32 result on
# the widened data, rounded once (the promise the 1-ulp bound rests on), with no x-sized
# float32 copy (with an activation, the channels-last backward and BatchNorm's column
# path keep g = dy * act'(a) in one float32 buffer; BatchNorm's long runs recompute it).

def _groups_of(C):
    """The test's GroupNorm groups for C channels: 4 channels each, or 2 groups."""
    return C // 4 if C % 4 == 0 else (2 if C % 2 == 0 else 1)


def _run_op(op, x, dy, w, b, act, axis):
    """(y, mean, rstd, dx, dw, db) of op on x (channels on `axis`)."""
    if op == "group_norm":
        G = _groups_of(x.shape[axis])
        y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, activation=act,
                                    channel_axis=axis)
        return (y, m, r) + cynorm.group_norm_backward(dy, x, m, r, G, w, bias=b,
                                                      activation=act, channel_axis=axis)
    if op == "instance_norm":
        y, m, r = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True,
                                       activation=act, channel_axis=axis)
        return (y, m, r) + cynorm.instance_norm_backward(dy, x, m, r, w, bias=b,
                                                         activation=act, channel_axis=axis)
    y, m, r = cynorm.batch_norm(x, None, None, w, b, training=True, return_stats=True,
                                activation=act, channel_axis=axis)
    return (y, m, r) + cynorm.batch_norm_backward(dy, x, m, r, w, bias=b,
                                                  activation=act, channel_axis=axis)


# channels-last: fused work items, the split schedule (one sample, few wide groups, many
# row blocks), rows wider than a coefficient tile (512 channels), odd channel counts
# (rows of whole vectors and a scalar tail on every instruction set: 37, 21);
# NCHW BatchNorm with runs shorter than 64: one row block, several (N >= 128), HW = 1
_INPLACE_CASES = [
    ("group_norm", (2, 5, 7, 8), -1), ("group_norm", (1, 48, 40, 16), -1),
    ("group_norm", (2, 9, 3, 1032), -1), ("instance_norm", (3, 11, 13, 7), -1),
    ("group_norm", (2, 5, 3, 37), -1), ("instance_norm", (2, 3, 5, 21), -1),
    ("batch_norm", (2, 9, 10, 12), -1), ("batch_norm", (64, 3), 1),
    ("batch_norm", (5, 4, 7), 1), ("batch_norm", (300, 5, 6), 1),
    ("batch_norm", (200, 37), 1),
]


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("op,shape,axis", _INPLACE_CASES, ids=str)
def test_16bit_channels_last_and_short_runs_are_the_float32_result_rounded_once(
        dt, op, shape, axis, act):
    x = data(shape, dt, 31, loc=1.5, scale=2.0)
    dy = data(shape, dt, 32)
    C = shape[axis]
    w, b = data(C, np.float32, 33, 1.0), data(C, np.float32, 34)
    got = _run_op(op, x, dy, w, b, act, axis)
    ref32 = _run_op(op, x.astype(np.float32), dy.astype(np.float32), w, b, act, axis)
    _equal_bits(got[0], round_once(ref32[0], dt), "y")
    for k, name in ((1, "mean"), (2, "rstd")):
        assert np.array_equal(got[k], ref32[k]), name
    # with an activation too: g = dy * act'(a) keeps its float32 digits
    _equal_bits(got[3], round_once(ref32[3], dt), "dx")
    # float32 parameters: dweight and dbias are the float32 data's
    assert np.array_equal(got[4], ref32[4]) and np.array_equal(got[5], ref32[5])


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("op,shape,axis", [c for c in _INPLACE_CASES if c[1] != (5, 4, 7)],
                         ids=str)
def test_16bit_channels_last_and_short_runs_within_one_ulp(dt, op, shape, axis):
    """y and dx within 1 ulp of the float64 reference on the widened data (or a few
    float32 ulps of the terms they are a difference of)."""
    x = data(shape, dt, 35, loc=-2.0, scale=3.0)
    dy = data(shape, dt, 36)
    C = shape[axis]
    w, b = data(C, np.float32, 37, 1.0), data(C, np.float32, 38)
    y, m, r, dx, dw, db = _run_op(op, x, dy, w, b, None, axis)
    xc, dyc = wide(x), wide(dy)
    if axis == -1:
        xc, dyc = np.moveaxis(xc, -1, 1), np.moveaxis(dyc, -1, 1)
    N = shape[0]
    spatial = (1,) * (xc.ndim - 2)
    if op == "batch_norm":
        ey, mean, rstd = ref.batch_norm(xc, None, None, wide(w), wide(b), training=True)[:3]
        edx = ref.batch_norm_backward(dyc, xc, mean, rstd, wide(w), True)[0]
        rs = rstd.reshape((1, C) + spatial)
    else:
        G = C if op == "instance_norm" else _groups_of(C)
        ey, mean, rstd = ref.group_norm(xc, G, wide(w), wide(b), 1e-5)
        edx = ref.group_norm_backward(dyc, xc, mean, rstd, G, wide(w))[0]
        rs = np.repeat(rstd, C // G, axis=1).reshape((N, C) + spatial)
    np.testing.assert_allclose(m.ravel(), np.ravel(mean), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.ravel(), np.ravel(rstd), rtol=1e-12)
    bb = wide(b).reshape((1, C) + spatial)
    back = (lambda a: np.moveaxis(a, 1, -1)) if axis == -1 else (lambda a: a)
    assert_within_one_ulp(y, back(ey), terms=back(np.abs(ey - bb) + np.abs(bb)))
    scale = rs * np.max(np.abs(dyc)) * np.max(np.abs(w)) * 4 + 0 * edx
    assert_within_one_ulp(dx, back(edx), terms=back(scale), what="dx")


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
def test_16bit_channels_last_is_bitwise_the_nchw_result_when_sums_are_exact(dt, op):
    """Small integers (and power-of-two set sizes) make every sum exact in any order:
    then the statistics agree to the bit, and y and dx (the same arithmetic per element
    as the NCHW kernels) are bitwise those of NCHW on the transposed array."""
    rng = np.random.default_rng(41)
    N, H, W, C = 2, 8, 4, 16
    x = rng.integers(-8, 9, (N, H, W, C)).astype(dt)
    dy = rng.integers(-4, 5, (N, H, W, C)).astype(dt)
    w = rng.integers(1, 4, C).astype(np.float32)
    b = rng.integers(-2, 3, C).astype(np.float32)
    last = _run_op(op, x, dy, w, b, None, -1)
    nchw = _run_op(op, np.ascontiguousarray(np.moveaxis(x, -1, 1)),
                   np.ascontiguousarray(np.moveaxis(dy, -1, 1)), w, b, None, 1)
    _equal_bits(last[0], np.ascontiguousarray(np.moveaxis(nchw[0], 1, -1)), "y")
    _equal_bits(last[3], np.ascontiguousarray(np.moveaxis(nchw[3], 1, -1)), "dx")
    for k in (1, 2, 4, 5):
        assert np.array_equal(last[k], nchw[k]), k


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("op,shape,axis", [
    ("group_norm", (1, 96, 96, 16), -1), ("group_norm", (8, 16, 16, 64), -1),
    ("group_norm", (1, 40, 40, 1030), -1), ("batch_norm", (20, 30, 40), -1),
    ("batch_norm", (300, 5, 6), 1)], ids=str)
def test_16bit_channels_last_and_short_runs_bitwise_identical_across_thread_counts(
        dt, op, shape, axis):
    x, dy = data(shape, dt, 43), data(shape, dt, 44)
    C = shape[axis]
    w, b = data(C, np.float32, 45, 1.0), data(C, np.float32, 46)
    across_threads(lambda: _run_op(op, x, dy, w, b, "silu", axis)[:3]
                   + _run_op(op, x, dy, w, b, None, axis))


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("op,shape,axis", [("group_norm", (4, 32, 32, 64), -1),
                                           ("batch_norm", (4, 32, 32, 64), -1),
                                           ("batch_norm", (4096, 12, 5), 1)], ids=str)
def test_16bit_channels_last_and_short_runs_make_no_float32_copy(dt, op, shape, axis):
    """Beyond the outputs, at most 1/8 of the input's bytes of workspace: no float32
    copy of x or dy (each would be twice the input)."""
    x, dy = data(shape, dt, 47), data(shape, dt, 48)
    C = shape[axis]
    w = np.ones(C, np.float32)
    limit = x.nbytes // 8 + 64 * 1024

    if op == "group_norm":
        e, (y, m, r) = extra_memory(lambda: cynorm.group_norm(x, 8, w, w, return_stats=True,
                                                              channel_axis=axis))
        assert e <= limit, ("forward", e, x.nbytes)
        e, _ = extra_memory(lambda: cynorm.group_norm_backward(dy, x, m, r, 8, w,
                                                               channel_axis=axis))
    else:
        e, (y, m, r) = extra_memory(lambda: cynorm.batch_norm(x, None, None, w, w, True,
                                                              return_stats=True,
                                                              channel_axis=axis))
        assert e <= limit, ("forward", e, x.nbytes)
        e, _ = extra_memory(lambda: cynorm.batch_norm_backward(dy, x, m, r, w,
                                                               channel_axis=axis))
    assert e <= limit, ("backward", e, x.nbytes)


@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_channels_last_backward_with_activation_makes_no_float32_copy_of_x_or_dy(
        dt, act):
    """With an activation, g = dy * act'(a) keeps its float32 digits in one float32
    buffer of x's shape (twice the input's bytes); dy, x and dx are read and written in
    place: no float32 copy of them (each another twice the input)."""
    shape = (4, 32, 32, 64)
    x, dy = data(shape, dt, 49), data(shape, dt, 50)
    w = np.ones(shape[-1], np.float32)
    _, m, r = cynorm.group_norm(x, 8, w, w, return_stats=True, activation=act,
                                channel_axis=-1)
    e, _ = extra_memory(lambda: cynorm.group_norm_backward(dy, x, m, r, 8, w, bias=w,
                                                           activation=act,
                                                           channel_axis=-1))
    assert e <= 2 * x.nbytes + x.nbytes // 8 + 64 * 1024, (e, x.nbytes)


@pytest.mark.parametrize("shape, axis, g_bytes", [((4, 16, 32, 32), 1, 0),
                                                   ((4096, 64), 1, 2),
                                                   ((4096, 12, 5), 1, 2),
                                                   ((4, 32, 32, 64), -1, 2)], ids=str)
@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_batch_norm_backward_with_activation_makes_no_float32_copy_of_x_or_dy(
        dt, act, shape, axis, g_bytes):
    """With an activation, g = dy * act'(a) keeps its float32 digits: long runs
    recompute it in float32 where it is needed (no buffer), short runs and channels-last
    data keep it in one float32 buffer of x's shape (twice the input's bytes); dy, x and
    dx are read and written in place: no float32 copy of them (each another twice the
    input)."""
    x, dy = data(shape, dt, 51), data(shape, dt, 52)
    w = np.ones(shape[axis], np.float32)
    _, m, r = cynorm.batch_norm(x, None, None, w, w, True, return_stats=True,
                                activation=act, channel_axis=axis)
    e, _ = extra_memory(lambda: cynorm.batch_norm_backward(dy, x, m, r, w, bias=w,
                                                           activation=act,
                                                           channel_axis=axis))
    assert e <= g_bytes * x.nbytes + x.nbytes // 8 + 64 * 1024, (e, x.nbytes)


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_channels_last_bad_inputs_name_the_argument(dt):
    x = data((2, 4, 5, 8), dt)
    with pytest.raises(ValueError, match="weight"):
        cynorm.group_norm(x, 2, np.ones(4, np.float32), channel_axis=-1)
    with pytest.raises(ValueError, match="bias"):
        cynorm.batch_norm(x, None, None, None, np.ones(5, np.float32), True,
                          channel_axis=-1)
    with pytest.raises(ValueError, match="channel_axis"):
        cynorm.instance_norm(x, channel_axis=2)
    _, m, r = cynorm.group_norm(x, 2, return_stats=True, channel_axis=-1)
    with pytest.raises(TypeError, match="dy"):
        cynorm.group_norm_backward(x.astype(np.float32), x, m, r, 2, channel_axis=-1)
    with pytest.raises(ValueError, match="mean"):
        cynorm.group_norm_backward(x, x, m[:, :1], r, 2, channel_axis=-1)
