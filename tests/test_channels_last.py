"""channel_axis=-1: GroupNorm, InstanceNorm and BatchNorm (with and without a fused
activation) of channels-last x of shape (N, *spatial, C), the layout of Keras'
GroupNormalization(axis=-1) and Flax's GroupNorm, forward and backward.

Checked against a plain float64 NumPy reference of the channels-last definition (the
backward's reference transposes to tests/reference.py's NCHW functions), and against
cynorm's own NCHW result on the transposed array: float32 within 1 ulp (the apply uses
the NCHW kernels' arithmetic per element; only the statistics' summation order differs),
float64 within a few ulps of the size of the terms each result is formed from (a
different summation order moves the float64 mean by an ulp, which moves y by
ulp(mean) * rstd * weight). Also: bitwise identity across thread counts, in-place and
non-contiguous inputs, empty dims, no x-sized temporaries, argument errors, the layers.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cynorm
from peak_memory import extra_memory
from cynorm import nn
import reference as ref
from reference import assert_close

ACTS = [None, "silu", "gelu", "gelu_tanh", "relu"]
EPS64 = np.finfo(np.float64).eps


def data(shape, dtype, seed=0, loc=0.3, scale=1.5):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def first(a):
    """A channels-last array as (N, C, *spatial) (a contiguous copy)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1))


def last(a):
    """An (N, C, *spatial) array as (N, *spatial, C)."""
    return np.moveaxis(np.asarray(a), 1, -1)


# ---- the channels-last definition, in float64 (Keras / Flax GroupNorm) ---------------------

def ref_group_norm_last(x, G, w, b, eps=1e-5):
    """(y, mean, rstd): each sample's (spatial, C // G channels) of group g normalised."""
    x = np.asarray(x, np.float64)
    N, C = x.shape[0], x.shape[-1]
    hw = int(np.prod(x.shape[1:-1], dtype=np.int64))
    xs = x.reshape(N, hw, G, C // G)
    mean = xs.mean(axis=(1, 3))
    var = ((xs - mean[:, None, :, None]) ** 2).mean(axis=(1, 3))
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = ((xs - mean[:, None, :, None]) * rstd[:, None, :, None]).reshape(x.shape)
    return xhat * np.asarray(w, np.float64) + np.asarray(b, np.float64), mean, rstd


def ref_batch_norm_last(x, w, b, eps=1e-5):
    """(y, mean, rstd): each channel (the last axis) over all other axes."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes) + eps)
    return (x - mean) * rstd * np.asarray(w, np.float64) + np.asarray(b, np.float64), \
        mean, rstd


# ---- the ops: forward (y, mean, rstd), backward (dx, dw, db), references -------------------

def _fwd(op, x, G, w, b, act, axis):
    if op == "group_norm":
        return cynorm.group_norm(x, G, w, b, return_stats=True, activation=act,
                                 channel_axis=axis)
    if op == "instance_norm":
        return cynorm.instance_norm(x, weight=w, bias=b, return_stats=True, activation=act,
                                    channel_axis=axis)
    return cynorm.batch_norm(x, None, None, w, b, training=True, return_stats=True,
                             activation=act, channel_axis=axis)


def _bwd(op, dy, x, m, r, G, w, b, act, axis):
    if op == "group_norm":
        return cynorm.group_norm_backward(dy, x, m, r, G, w, bias=b, activation=act,
                                          channel_axis=axis)
    if op == "instance_norm":
        return cynorm.instance_norm_backward(dy, x, m, r, w, bias=b, activation=act,
                                             channel_axis=axis)
    return cynorm.batch_norm_backward(dy, x, m, r, w, True, bias=b, activation=act,
                                      channel_axis=axis)


def _groups(op, C, G):
    return C if op == "instance_norm" else G


# (op, channels-last shape, G): C/G = 1, odd C, 1D/2D/3D spatial, N = 1, many row blocks
# (the split schedule: few samples and groups), groups wider than a coefficient tile
CASES = [
    ("group_norm", (2, 5, 7, 6), 3),
    ("group_norm", (3, 9, 5), 5),           # 1D spatial, C/G = 1, odd C
    ("group_norm", (2, 3, 4, 5, 12), 4),    # 3D spatial
    ("group_norm", (1, 96, 96, 16), 4),     # N = 1, 144 row blocks
    ("group_norm", (2, 40, 40, 32), 8),
    ("group_norm", (1, 70, 3, 7), 7),
    ("group_norm", (4, 1, 1, 6), 2),        # one spatial element
    ("group_norm", (1, 20, 20, 1200), 2),   # 600 channels per group
    ("group_norm", (1, 130, 33), 3),        # a last, partial row block
    ("instance_norm", (2, 6, 7, 5), None),
    ("instance_norm", (1, 64, 64, 3), None),
    ("instance_norm", (3, 11, 13), None),
    ("instance_norm", (1, 30, 1030), None),
    ("batch_norm", (5, 9, 9, 4), None),
    ("batch_norm", (40, 3, 6), None),
    ("batch_norm", (2, 70, 70, 3), None),
    ("batch_norm", (200, 3, 5), None),
]
IDS = [f"{op}-{'x'.join(map(str, s))}-{g}" for op, s, g in CASES]
# every activation on the small cases, two on the others (runtime)
SMALL = {0, 1, 2, 9, 11, 13, 14}
ACT_CASES = [(c, a) for i, c in enumerate(CASES) for a in ACTS
             if i in SMALL or a in (None, "silu")]
ACT_IDS = [f"{IDS[CASES.index(c)]}-{a}" for c, a in ACT_CASES]


def _inputs(shape, dtype):
    C = shape[-1]
    return (data(shape, dtype, 0), data(C, dtype, 1, 1.0, 0.5), data(C, dtype, 2, 0.1),
            data(shape, dtype, 3, 0.0, 1.0))


@pytest.mark.parametrize("case,act", ACT_CASES, ids=ACT_IDS)
def test_channels_last_matches_float64_reference(case, act, dtype):
    op, shape, G = case
    x, w, b, dy = _inputs(shape, dtype)
    C = shape[-1]
    G = _groups(op, C, G)
    y, m, r = _fwd(op, x, G, w, b, act, -1)
    if op == "batch_norm":
        y0, m0, r0 = ref_batch_norm_last(x, w, b)
    else:
        y0, m0, r0 = ref_group_norm_last(x, G, w, b)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert m.shape == m0.shape and r.shape == r0.shape  # (N, G) or (C,), as NCHW
    assert_close(y, ref.activation(act, y0), dtype)
    assert_close(m, m0, np.float64)
    assert_close(r, r0, dtype)
    dx, dw, db = _bwd(op, dy, x, m, r, G, w, b, act, -1)
    # the reference backward: dy through the activation's derivative, transposed to
    # NCHW for tests/reference.py, the result transposed back
    dya = first(dy * ref.activation_grad(act, y0))
    if op == "batch_norm":
        dxe, dwe, dbe = ref.batch_norm_backward(dya, first(x), m0, r0, w, True)
    else:
        dxe, dwe, dbe = ref.group_norm_backward(dya, first(x), m0, r0, G, w)
    assert dx.shape == x.shape and dw.shape == (C,) and db.shape == (C,)
    assert_close(dx, last(dxe), dtype, "backward", ref.dx_scale(dy, r0, w))
    assert_close(dw, dwe, dtype, "backward", float(np.abs(dy).sum()))
    assert_close(db, dbe, dtype, "backward", float(np.abs(dy).sum()))


def _ulps32(a, b):
    """Elementwise distance in float32 ulps."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    big = np.maximum(np.abs(a), np.abs(b))
    return np.abs(a.astype(np.float64) - b) / np.spacing(big).astype(np.float64)


def _scale_ulps(a, b, scale):
    """Distance in ulps (of a's dtype) of `scale`, the size of the terms a result is
    formed from."""
    eps = np.finfo(np.asarray(a).dtype).eps
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / (eps * scale)


@pytest.mark.parametrize("case,act", ACT_CASES, ids=ACT_IDS)
def test_channels_last_matches_nchw_on_the_transposed_array(case, act, dtype):
    op, shape, G = case
    x, w, b, dy = _inputs(shape, dtype)
    C = shape[-1]
    G = _groups(op, C, G)
    y, m, r = _fwd(op, x, G, w, b, act, -1)
    yt, mt, rt = _fwd(op, first(x), G, w, b, act, 1)
    dx, dw, db = _bwd(op, dy, x, m, r, G, w, b, act, -1)
    dxt, dwt, dbt = _bwd(op, first(dy), first(x), mt, rt, G, w, b, act, 1)
    np.testing.assert_allclose(m, mt, rtol=4 * EPS64, atol=4 * EPS64 * np.abs(x).max())
    np.testing.assert_allclose(r, rt, rtol=8 * EPS64)
    y, dx = first(y), first(dx)
    if dtype == np.float32 and op != "batch_norm":
        # the slab kernels' float32 apply per element, from float32 constants that are
        # the same unless a statistic's float64 value (summed in another order) rounds
        # to float32 differently: y, dweight, dbias within 1 ulp; dx too, except where
        # it is a difference of much larger terms (dx near 0), where a constant's ulp
        # moves it by a few float32 ulps of those terms
        for a, e in ((y, yt), (dw, dwt), (db, dbt)):
            assert _ulps32(a, e).max() <= 1
        sh = (1, C) + (1,) * (x.ndim - 2)
        per_channel = (x.shape[0], C) + (1,) * (x.ndim - 2)
        r_e = np.repeat(rt, C // G, axis=1).reshape(per_channel)
        g = np.abs(first(dy)) * np.abs(w).reshape(sh)
        xhat = np.abs((first(x) - np.repeat(mt, C // G, axis=1).reshape(per_channel))
                      * r_e)
        N = x.shape[0]
        gs, hs = g.reshape(N, G, -1), xhat.reshape(N, G, -1)
        mg = np.repeat(gs.mean(axis=2), C // G, axis=1).reshape(per_channel)
        mgx = np.repeat((gs * hs).mean(axis=2), C // G, axis=1).reshape(per_channel)
        terms = r_e * (g + mg + (xhat + 1) * mgx)
        ok = (_ulps32(dx, dxt) <= 1) | (_scale_ulps(dx, dxt, terms) <= 4)
        assert ok.all(), np.count_nonzero(~ok)
        return
    # float64 (and BatchNorm, whose channels-last form is the column path, computed in
    # float64, where NCHW with long runs computes in float32): y = act(w * (x - mean) *
    # rstd + b) moves by the statistics' rounding, ulp(mean) * rstd * |w| and
    # ulp(rstd) * |xhat * w|, dx by the rounding of the gradient sums, relative to the
    # terms summed; both grow with the set's size M: a few ulps, log2(M) at most.
    # Scales from the float64 reference.
    sh = (1, C) + (1,) * (x.ndim - 2)
    if op == "batch_norm":
        _, m0, r0 = ref_batch_norm_last(x, w, b)
        m_e, r_e = m0.reshape(sh), r0.reshape(sh)
    else:
        _, m0, r0 = ref_group_norm_last(x, G, w, b)
        per_channel = (x.shape[0], C) + (1,) * (x.ndim - 2)
        m_e = np.repeat(m0, C // G, axis=1).reshape(per_channel)
        r_e = np.repeat(r0, C // G, axis=1).reshape(per_channel)
    xhat = np.abs((first(x) - m_e) * r_e)
    aw, ab = np.abs(w).reshape(sh), np.abs(b).reshape(sh)
    mr = np.abs(m_e) * r_e
    g = np.abs(first(dy)) * aw
    if op == "batch_norm":
        axes = (0,) + tuple(range(2, x.ndim))
        mg = g.mean(axis=axes, keepdims=True)
        mgx = (g * xhat).mean(axis=axes, keepdims=True)
    else:
        N = x.shape[0]
        gs, hs = g.reshape(N, G, -1), xhat.reshape(N, G, -1)
        mg = np.repeat(gs.mean(axis=2), C // G, axis=1).reshape(m_e.shape)
        mgx = np.repeat((gs * hs).mean(axis=2), C // G, axis=1).reshape(m_e.shape)
    # sums over M terms: rounding grows with the number of terms (log2(M) bounds the
    # pairwise parts, the lanes' sequential parts are under it for these shapes)
    M = x.size // (m.size if op != "batch_norm" else C)
    grow = max(4.0, np.log2(max(M, 2)))
    assert _scale_ulps(y, yt, aw * (xhat + mr + 1) + ab).max() <= grow
    assert _scale_ulps(dx, dxt, r_e * (g + mg + (xhat + mr + 1) * mgx)).max() <= grow
    axes_all = (0,) + tuple(range(2, x.ndim))
    assert _scale_ulps(dw, dwt, (np.abs(first(dy)) * (xhat + mr)).sum(axis=axes_all)
                         ).max() <= grow
    assert _scale_ulps(db, dbt, np.abs(first(dy)).sum(axis=axes_all)).max() <= grow


# ---- layouts: in place, non-contiguous, empty ------------------------------------------------

@pytest.mark.parametrize("op", ["group_norm", "instance_norm", "batch_norm"])
def test_non_contiguous_channels_last_input_gives_the_contiguous_result(op, dtype):
    """A channels-last view of an NCHW array (strided, as a torch channels_last tensor
    seen through NumPy the other way round) is read correctly: the same bits as its
    contiguous copy."""
    xt = data((2, 8, 9, 11), dtype)          # NCHW storage
    x = np.moveaxis(xt, 1, -1)               # (N, H, W, C) view, not contiguous
    assert not x.flags.c_contiguous
    dy = np.moveaxis(data((2, 8, 9, 11), dtype, 5), 1, -1)
    w, b = data(8, dtype, 1), data(8, dtype, 2)
    y, m, r = _fwd(op, x, 4, w, b, "silu", -1)
    yc, mc, rc = _fwd(op, np.ascontiguousarray(x), 4, w, b, "silu", -1)
    assert np.array_equal(y, yc) and np.array_equal(m, mc) and np.array_equal(r, rc)
    got = _bwd(op, dy, x, m, r, 4, w, b, "silu", -1)
    want = _bwd(op, np.ascontiguousarray(dy), np.ascontiguousarray(x), m, r, 4, w, b,
                "silu", -1)
    for a, e in zip(got, want):
        assert np.array_equal(a, e)


@pytest.mark.parametrize("op", ["group_norm", "instance_norm", "batch_norm"])
def test_channels_last_in_place_gives_the_same_result(op, dtype):
    x, w, b, dy = _inputs((2, 17, 13, 8), dtype)
    y, m, r = _fwd(op, x, 2, w, b, "gelu", -1)
    dx, dw, db = _bwd(op, dy, x, m, r, 2, w, b, "gelu", -1)
    kw = dict(return_stats=True, activation="gelu", channel_axis=-1)
    xi = x.copy()
    if op == "group_norm":
        out = cynorm.group_norm(xi, 2, w, b, out=xi, **kw)
    elif op == "instance_norm":
        out = cynorm.instance_norm(xi, weight=w, bias=b, out=xi, **kw)
    else:
        out = cynorm.batch_norm(xi, None, None, w, b, True, out=xi, **kw)
    assert out[0] is xi and np.array_equal(xi, y)
    dyi = dy.copy()
    if op == "group_norm":
        got = cynorm.group_norm_backward(dyi, x, m, r, 2, w, out=dyi, bias=b,
                                         activation="gelu", channel_axis=-1)
    elif op == "instance_norm":
        got = cynorm.instance_norm_backward(dyi, x, m, r, w, out=dyi, bias=b,
                                            activation="gelu", channel_axis=-1)
    else:
        got = cynorm.batch_norm_backward(dyi, x, m, r, w, out=dyi, bias=b,
                                         activation="gelu", channel_axis=-1)
    assert got[0] is dyi
    for a, e in zip(got, (dx, dw, db)):
        assert np.array_equal(a, e)
    # dx into x itself (the backward still needs x: a scratch buffer takes g)
    if op == "group_norm":
        xi = x.copy()
        got = cynorm.group_norm_backward(dy, xi, m, r, 2, w, out=xi, bias=b,
                                         activation="gelu", channel_axis=-1)
        assert got[0] is xi and np.array_equal(xi, dx)


@pytest.mark.parametrize("shape", [(0, 4, 5, 6), (2, 0, 5, 6), (2, 3, 0, 4), (0, 6)],
                         ids=str)
@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
def test_empty_dims_give_what_nchw_gives(op, shape, dtype):
    x = np.zeros(shape, dtype)
    C = shape[-1]
    G = 2 if op == "group_norm" else C
    w, b = np.ones(C, dtype), np.zeros(C, dtype)
    y, m, r = _fwd(op, x, G, w, b, None, -1)
    yt, mt, rt = _fwd(op, first(x), G, w, b, None, 1)
    assert y.shape == x.shape and np.array_equal(first(y), yt)
    assert np.array_equal(m, mt, equal_nan=True) and np.array_equal(r, rt, equal_nan=True)
    dx, dw, db = _bwd(op, x, x, m, r, G, w, b, None, -1)
    dxt, dwt, dbt = _bwd(op, first(x), first(x), mt, rt, G, w, b, None, 1)
    assert dx.shape == x.shape
    assert np.array_equal(dw, dwt) and np.array_equal(db, dbt)


def test_two_dim_input_is_the_same_for_either_axis(dtype):
    """(N, C): channel_axis=-1 names dim 1, so both spellings are the NCHW op."""
    x, w, b, _ = _inputs((6, 4), dtype)
    for op in ("group_norm", "batch_norm"):
        a = _fwd(op, x, 2, w, b, None, -1)
        e = _fwd(op, x, 2, w, b, None, 1)
        for u, v in zip(a, e):
            assert np.array_equal(u, v)


# ---- running statistics and eval mode ------------------------------------------------------

def test_batch_norm_channels_last_running_statistics_and_eval(dtype):
    x, w, b, dy = _inputs((4, 6, 5, 3), dtype)
    rm, rv = np.zeros(3), np.ones(3)
    y, m, r = cynorm.batch_norm(x, rm, rv, w, b, True, 0.3, return_stats=True,
                                channel_axis=-1)
    xc = x.astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(rm, 0.3 * xc.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.7 + 0.3 * xc.var(axis=0, ddof=1), rtol=1e-12)
    ye, me, re_ = cynorm.batch_norm(x, rm, rv, w, b, False, return_stats=True,
                                    channel_axis=-1)
    assert_close(ye, ((xc - rm) / np.sqrt(rv + 1e-5) * w.astype(np.float64) + b).reshape(
        x.shape), dtype)
    dx, dw, db = cynorm.batch_norm_backward(dy, x, me, re_, w, False, channel_axis=-1)
    assert_close(dx, dy.astype(np.float64) * w / np.sqrt(rv + 1e-5), dtype, "backward")
    assert_close(db, dy.astype(np.float64).reshape(-1, 3).sum(axis=0), dtype, "backward",
                 float(np.abs(dy).sum()))


def test_instance_norm_channels_last_running_statistics_and_eval(dtype):
    x, w, b, dy = _inputs((3, 5, 7, 4), dtype)
    rm, rv = np.zeros(4), np.ones(4)
    rmt, rvt = np.zeros(4), np.ones(4)
    cynorm.instance_norm(x, rm, rv, w, b, True, 0.2, channel_axis=-1)
    cynorm.instance_norm(first(x), rmt, rvt, w, b, True, 0.2)
    xs = x.astype(np.float64).reshape(3, -1, 4)
    np.testing.assert_allclose(rm, 0.2 * xs.mean(axis=1).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.8 + 0.2 * xs.var(axis=1, ddof=1).mean(axis=0),
                               rtol=1e-10)
    np.testing.assert_allclose(rm, rmt, rtol=1e-14)
    np.testing.assert_allclose(rv, rvt, rtol=1e-14)
    y, m, r = cynorm.instance_norm(x, rm, rv, w, b, False, return_stats=True,
                                   channel_axis=-1)
    assert m.shape == (4,)
    assert_close(y, (x.astype(np.float64) - rm) / np.sqrt(rv + 1e-5) * w + b, dtype)
    dx, _, _ = cynorm.instance_norm_backward(dy, x, m, r, w, False, channel_axis=-1)
    assert_close(dx, dy.astype(np.float64) * w / np.sqrt(rv + 1e-5), dtype, "backward")


def test_channels_last_backward_matches_finite_differences():
    x, w, b, dy = _inputs((2, 5, 6, 6), np.float64)

    def loss(x_, w_, b_):
        return float(np.sum(cynorm.group_norm(x_, 3, w_, b_, activation="silu",
                                              channel_axis=-1) * dy))

    _, m, r = cynorm.group_norm(x, 3, w, b, return_stats=True, activation="silu",
                                channel_axis=-1)
    grads = cynorm.group_norm_backward(dy, x, m, r, 3, w, bias=b, activation="silu",
                                       channel_axis=-1)
    h = 1e-6
    rng = np.random.default_rng(7)
    for k, (arr, grad) in enumerate(zip((x, w, b), grads)):
        for idx in rng.choice(arr.size, size=min(6, arr.size), replace=False):
            args_p = [x.copy(), w.copy(), b.copy()]
            args_m = [x.copy(), w.copy(), b.copy()]
            args_p[k].flat[idx] += h
            args_m[k].flat[idx] -= h
            num = (loss(*args_p) - loss(*args_m)) / (2 * h)
            assert abs(num - grad.flat[idx]) <= 1e-6 * max(1.0, abs(num)), (k, idx)


# ---- determinism -------------------------------------------------------------------------

# fused items, the split schedule (one sample, few groups, many row blocks), groups
# wider than a coefficient tile, and two samples: fused whole samples with 1 and 2
# threads, split with 3
DET_CASES = [((8, 16, 16, 64), 8), ((1, 96, 96, 16), 4), ((1, 200, 200, 8), 1),
             ((1, 120, 130, 1030), 2), ((2, 64, 64, 32), 8)]


@pytest.mark.parametrize("shape,G", DET_CASES, ids=str)
def test_bitwise_identical_across_thread_counts(shape, G, dtype):
    x, w, b, dy = _inputs(shape, dtype)
    results = []
    for n in (1, 2, 3):
        with threadpool_limits(n, user_api="openmp"):
            y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, activation="silu",
                                        channel_axis=-1)
            g = cynorm.group_norm_backward(dy, x, m, r, G, w, bias=b, activation="silu",
                                           channel_axis=-1)
            results.append((y, m, r) + g)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert np.array_equal(a, e)


# ---- the statistics: one pass where it is exact, two passes where not ---------------------

# (shape, G, threads): fused items (one thread; several samples), the split schedule (one
# sample, few groups, many row blocks, two and three threads), a last partial block, and
# fewer rows than the shift's head
ONE_PASS_CASES = [((3, 40, 40, 32), 8), ((1, 96, 96, 24), 3), ((1, 130, 33, 12), 4),
                  ((2, 5, 3, 40), 4)]


def _hard_statistics_input(shape, dtype):
    """x (N, *spatial, C) whose groups take each path of the statistics: channel 0's first
    16 positions lie far from its other values (the one-pass shift, their mean, is then
    far from the channel's mean: its group takes the two-pass algorithm); the last
    channel is constant (also two-pass); channel C // 2 sits at a large offset with a
    small spread (one pass, shifted by a nearby value); the other channels are
    unremarkable (one pass)."""
    N, C = shape[0], shape[-1]
    x = data(shape, np.float64, 11).reshape(N, -1, C)
    x[:, :16, 0] += 1e3
    x[:, :, -1] = 2.5
    x[:, :, C // 2] = 1e4 + 1e-2 * x[:, :, C // 2]
    return x.reshape(shape).astype(dtype)


def _extended_stats(x, G, eps=1e-5):
    """(mean, rstd) of each (sample, group), summed in extended precision (long double):
    numpy's float64 mean of data mixing an offset of 1e4 with values near 0 errs by more
    than the kernels' float64 statistics do."""
    x = np.asarray(x, np.longdouble)
    N, C = x.shape[0], x.shape[-1]
    xs = x.reshape(N, -1, G, C // G)
    mean = xs.mean(axis=(1, 3))
    var = ((xs - mean[:, None, :, None]) ** 2).mean(axis=(1, 3))
    return mean.astype(np.float64), (1 / np.sqrt(var + eps)).astype(np.float64)


@pytest.mark.parametrize("shape,G", ONE_PASS_CASES, ids=str)
def test_statistics_paths_match_float64_reference_bitwise_across_thread_counts(
        shape, G, dtype):
    x = _hard_statistics_input(shape, dtype)
    C = shape[-1]
    w, b = data(C, dtype, 1, 1.0, 0.5), data(C, dtype, 2, 0.1)
    y0, _, _ = ref_group_norm_last(x, G, w, b)
    m0, r0 = _extended_stats(x, G)
    results = []
    for n in (1, 2, 3):
        with threadpool_limits(n, user_api="openmp"):
            y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, channel_axis=-1)
        assert_close(y, y0, dtype)
        np.testing.assert_allclose(m, m0, rtol=4 * EPS64, atol=4 * EPS64 * np.abs(x).max())
        np.testing.assert_allclose(r, r0, rtol=16 * EPS64)
        results.append((y, m, r))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert np.array_equal(a, e)


@pytest.mark.parametrize("shape,G", ONE_PASS_CASES, ids=str)
def test_statistics_paths_match_nchw_within_one_float32_ulp(shape, G):
    x = _hard_statistics_input(shape, np.float32)
    C = shape[-1]
    w, b = data(C, np.float32, 1, 1.0, 0.5), data(C, np.float32, 2, 0.1)
    y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, channel_axis=-1)
    yt, mt, rt = cynorm.group_norm(first(x), G, w, b, return_stats=True)
    m0, r0 = _extended_stats(x, G)
    for mm, rr in ((m, r), (mt, rt)):
        np.testing.assert_allclose(mm, m0, rtol=4 * EPS64, atol=4 * EPS64 * np.abs(x).max())
        np.testing.assert_allclose(rr, r0, rtol=16 * EPS64)
    assert _ulps32(first(y), yt).max() <= 1


# BatchNorm channels-last in training: from 32 to 512 channels one sample of N * spatial
# rows, a channel per group (a single row block, fused; many row blocks shared out
# among the threads, split); fewer channels the column path forward, the channels-last
# kernel backward; more, the column path both ways
BN_LAST_CASES = [(4, 5, 6, 12), (3, 20, 20, 24), (2, 4, 4, 40), (8, 33, 31, 40),
                 (2, 20, 21, 520)]


@pytest.mark.parametrize("shape", BN_LAST_CASES, ids=str)
def test_batch_norm_channels_last_statistics_running_var_and_grads_bitwise_across_threads(
        shape, dtype):
    """Every statistics path (one pass; the two-pass algorithm for a channel whose first
    rows lie far from its mean and for a constant channel), the running variance (the
    unbiased batch variance) and the backward: close to float64 references, and the
    same bits with 1, 2 and 3 threads."""
    x = _hard_statistics_input(shape, dtype)
    C = shape[-1]
    w, b = data(C, dtype, 1, 1.0, 0.5), data(C, dtype, 2, 0.1)
    dy = data(shape, dtype, 3)
    m0, r0 = _extended_stats(x.reshape(1, -1, C), C)
    xc = x.astype(np.longdouble).reshape(-1, C)
    y0 = ((xc - m0[0]) * r0[0] * w.astype(np.longdouble) + b).astype(np.float64).reshape(
        shape)
    v0 = ((xc - xc.mean(axis=0)) ** 2).sum(axis=0) / (xc.shape[0] - 1)
    dxe, dwe, dbe = ref.batch_norm_backward(first(dy).astype(np.float64),
                                            first(x).astype(np.float64), m0[0], r0[0], w,
                                            True)
    results = []
    for n in (1, 2, 3):
        rm, rv = np.zeros(C), np.ones(C)
        with threadpool_limits(n, user_api="openmp"):
            y, m, r = cynorm.batch_norm(x, rm, rv, w, b, True, 1.0, return_stats=True,
                                        channel_axis=-1)
            dx, dw, db = cynorm.batch_norm_backward(dy, x, m, r, w, True, channel_axis=-1)
        assert_close(y, y0, dtype)
        np.testing.assert_allclose(m, m0[0], rtol=4 * EPS64,
                                   atol=4 * EPS64 * np.abs(x).max())
        # sets of up to 8184 values; channel 0 (its first rows 1e3 away) takes the
        # two-pass algorithm, whose blocks' moments, relative to a value 1e3 from the
        # mean, merge pairwise with differences of means rounded to ulps of 1e3:
        # measured 125 float64 ulps (NCHW's long-run path: 21)
        np.testing.assert_allclose(r, r0[0], rtol=256 * EPS64)
        np.testing.assert_allclose(rv, v0.astype(np.float64), rtol=256 * EPS64,
                                   atol=EPS64 * np.abs(x).max() ** 2)
        np.testing.assert_array_equal(rm, m)
        assert_close(dx, last(dxe), dtype, "backward", float(np.abs(dxe).max()))
        assert_close(dw, dwe, dtype, "backward", float(np.abs(dwe).max()))
        assert_close(db, dbe, dtype, "backward", float(np.abs(dbe).max()))
        results.append((y, m, r, rv, dx, dw, db))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert np.array_equal(a, e)


def test_non_finite_values_propagate_to_their_group_only(dtype):
    """NaN and Inf fail the one pass's test: their group takes the two-pass algorithm,
    whose statistics are NaN; the other groups keep their values."""
    shape, G = (2, 9, 9, 8), 4
    x = data(shape, dtype).reshape(2, -1, 8)
    x[0, 5, 1] = np.nan
    x[1, 7, 6] = np.inf
    x = x.reshape(shape)
    w, b = np.ones(8, dtype), np.zeros(8, dtype)
    y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, channel_axis=-1)
    bad = np.zeros((2, G), bool)
    bad[0, 0] = bad[1, 3] = True
    assert np.isnan(m[1, 3]) or np.isinf(m[1, 3])
    assert np.isnan(m[0, 0]) and np.isnan(r[0, 0])
    y0, m0, r0 = ref_group_norm_last(np.where(np.isfinite(x), x, 0), G, w, b)
    np.testing.assert_allclose(m[~bad], m0[~bad], rtol=4 * EPS64, atol=4 * EPS64 * 4)
    np.testing.assert_allclose(r[~bad], r0[~bad], rtol=16 * EPS64)
    yg = y.reshape(2, -1, G, 2)
    assert np.isnan(yg[0, :, 0]).all() and np.isfinite(yg[0, :, 1:]).all()
    assert np.isnan(yg[1, :, 3]).all() and np.isfinite(yg[1, :, :3]).all()


# ---- memory -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,G", [((4, 32, 32, 64), 8), ((1, 256, 256, 8), 2),
                                     ((64, 3, 5, 32), 4)], ids=str)
def test_no_transpose_copy_peak_is_outputs_plus_small_workspace(shape, G):
    """The kernels read channels-last x in place: beyond the outputs, at most 1/8 of the
    input (per-block partial moments and per-(sample, channel) sums), never an x-sized
    transposed copy."""
    x = data(shape, np.float32)
    dy = data(shape, np.float32, 3)
    w = np.ones(shape[-1], np.float32)
    limit = x.nbytes // 8 + 64 * 1024
    extra, (y, m, r) = extra_memory(lambda: cynorm.group_norm(x, G, w, w, return_stats=True,
                                                              channel_axis=-1))
    assert extra <= limit, ("forward", extra, x.nbytes)
    extra, _ = extra_memory(lambda: cynorm.group_norm_backward(dy, x, m, r, G, w,
                                                               channel_axis=-1))
    assert extra <= limit, ("backward", extra, x.nbytes)
    extra, _ = extra_memory(lambda: cynorm.batch_norm(x, None, None, w, w, True,
                                                      return_stats=True, channel_axis=-1))
    assert extra <= limit, ("batch_norm", extra, x.nbytes)


# ---- argument errors ----------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 2, 4, -2, -5])
def test_channel_axis_other_than_first_or_last_is_a_value_error(axis):
    x = np.zeros((2, 3, 4, 6), np.float32)
    calls = [lambda: cynorm.group_norm(x, 2, channel_axis=axis),
             lambda: cynorm.instance_norm(x, channel_axis=axis),
             lambda: cynorm.batch_norm(x, None, None, training=True, channel_axis=axis),
             lambda: cynorm.group_norm_backward(x, x, np.zeros((2, 2)), np.ones((2, 2)),
                                                2, channel_axis=axis),
             lambda: cynorm.batch_norm_backward(x, x, np.zeros(6), np.ones(6),
                                                channel_axis=axis)]
    for call in calls:
        with pytest.raises(ValueError, match="channel_axis"):
            call()


@pytest.mark.parametrize("axis", ["-1", 1.0, True, None, np.array([1])])
def test_channel_axis_that_is_not_an_int_is_a_type_error(axis):
    x = np.zeros((2, 3, 4, 6), np.float32)
    with pytest.raises(TypeError, match="channel_axis"):
        cynorm.group_norm(x, 2, channel_axis=axis)


def test_equivalent_spellings_of_the_last_and_first_axis_are_taken():
    x = data((2, 3, 4, 6), np.float64)
    y = cynorm.group_norm(x, 2, channel_axis=-1)
    assert np.array_equal(cynorm.group_norm(x, 2, channel_axis=3), y)
    assert np.array_equal(cynorm.group_norm(x, 2, channel_axis=np.int64(-1)), y)
    assert np.array_equal(cynorm.group_norm(x, 3, channel_axis=-3),
                          cynorm.group_norm(x, 3))


def test_parameters_are_checked_against_the_last_axis():
    x = np.zeros((2, 3, 4, 6), np.float32)
    with pytest.raises(ValueError, match="weight"):
        cynorm.group_norm(x, 2, np.ones(3, np.float32), channel_axis=-1)
    with pytest.raises(ValueError, match="num_groups"):
        cynorm.group_norm(x, 4, channel_axis=-1)
    with pytest.raises(ValueError, match="bias"):
        cynorm.batch_norm(x, None, None, None, np.ones(3), True, channel_axis=-1)
    with pytest.raises(ValueError, match="running_mean"):
        cynorm.batch_norm(x, np.zeros(3), np.ones(6), channel_axis=-1)
    with pytest.raises(ValueError, match="mean"):
        cynorm.group_norm_backward(x, x, np.zeros((2, 3)), np.ones((2, 2)), 2,
                                   channel_axis=-1)


# ---- layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["GroupNorm", "InstanceNorm", "BatchNorm"])
def test_layers_with_channel_axis_last_match_the_functions(layer, dtype):
    x, w, b, dy = _inputs((3, 7, 5, 4), dtype)
    if layer == "GroupNorm":
        mod = nn.GroupNorm(2, 4, dtype=dtype, activation="silu", channel_axis=-1)
        y0, m, r = cynorm.group_norm(x, 2, mod.weight, mod.bias, return_stats=True,
                                     activation="silu", channel_axis=-1)
        g0 = cynorm.group_norm_backward(dy, x, m, r, 2, mod.weight, bias=mod.bias,
                                        activation="silu", channel_axis=-1)
    elif layer == "InstanceNorm":
        mod = nn.InstanceNorm(4, affine=True, track_running_stats=True, dtype=dtype,
                              channel_axis=-1)
        y0, m, r = cynorm.instance_norm(x, np.zeros(4), np.ones(4), mod.weight, mod.bias,
                                        return_stats=True, channel_axis=-1)
        g0 = cynorm.instance_norm_backward(dy, x, m, r, mod.weight, channel_axis=-1)
    else:
        mod = nn.BatchNorm(4, dtype=dtype, channel_axis=-1)
        y0, m, r = cynorm.batch_norm(x, np.zeros(4), np.ones(4), mod.weight, mod.bias,
                                     True, return_stats=True, channel_axis=-1)
        g0 = cynorm.batch_norm_backward(dy, x, m, r, mod.weight, channel_axis=-1)
    y = mod(x)
    dx = mod.backward(dy)
    assert np.array_equal(y, y0) and np.array_equal(dx, g0[0])
    assert np.array_equal(mod.grads["weight"], g0[1])
    assert np.array_equal(mod.grads["bias"], g0[2])
    assert "channel_axis=-1" in repr(mod)
    if layer != "GroupNorm":
        # running statistics are per channel, the last axis
        xs = x.astype(np.float64).reshape(3, -1, 4)
        mean = xs.mean(axis=1).mean(axis=0) if layer == "InstanceNorm" else \
            xs.reshape(-1, 4).mean(axis=0)
        np.testing.assert_allclose(mod.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-7)
        mod.eval()
        assert mod(x).shape == x.shape


def test_layers_check_channels_on_the_channel_axis():
    mod = nn.GroupNorm(2, 4, channel_axis=-1)
    with pytest.raises(ValueError, match="last dim"):
        mod(np.zeros((2, 4, 3, 3), np.float32))   # NCHW with 4 channels, 3 last
    assert mod(np.zeros((2, 3, 3, 4), np.float32)).shape == (2, 3, 3, 4)
    for cls, args in ((nn.GroupNorm, (2, 4)), (nn.InstanceNorm, (4,)), (nn.BatchNorm, (4,))):
        with pytest.raises(ValueError, match="channel_axis"):
            cls(*args, channel_axis=2)
        with pytest.raises(TypeError, match="channel_axis"):
            cls(*args, channel_axis="last")
        assert cls(*args).channel_axis == 1
