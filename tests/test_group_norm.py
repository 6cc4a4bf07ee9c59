"""group_norm / group_norm_backward against the float64 reference, finite differences,
torch, and the API's promises (out=, layouts, weight=None, NaN propagation)."""
import numpy as np
import pytest

import cynorm
import reference as ref
from reference import assert_close

# (shape, num_groups): (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), C/G = 1,
# G = 1, spatial size 1, odd sizes.
SHAPES = [
    ((4, 6), 3),
    ((3, 6, 5), 2),
    ((2, 8, 4, 5), 4),
    ((2, 6, 3, 4, 5), 3),
    ((2, 6, 7), 6),
    ((3, 4, 5), 1),
    ((3, 8, 1, 1), 4),
    ((5, 4, 1), 2),
    ((3, 9, 7, 5), 3),
    ((1, 5, 13), 5),
    ((1, 3, 67, 71), 1),  # one set longer than several chunks, odd remainder
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-G{g}" for s, g in SHAPES]

SMALL_SHAPES = [((2, 4), 2), ((2, 4, 3), 2), ((2, 6, 2, 2), 3), ((1, 2, 2, 1, 3), 1),
                ((3, 3, 2), 3)]


def make(rng, shape, dtype, affine=True, loc=0.0, scale=1.0):
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    C = shape[1]
    w = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    return x, w, b


# ---- forward ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,G", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_group_norm_forward_matches_reference(rng, dtype, shape, G, affine):
    x, w, b = make(rng, shape, dtype, affine)
    y = cynorm.group_norm(x, G, w, b, eps=1e-5)
    y_ref, _, _ = ref.group_norm(x, G, w, b, eps=1e-5)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("shape,G", SHAPES, ids=SHAPE_IDS)
def test_group_norm_return_stats_match_reference(rng, dtype, shape, G):
    x, w, b = make(rng, shape, dtype)
    y, mean, rstd = cynorm.group_norm(x, G, w, b, eps=1e-3, return_stats=True)
    y_ref, mean_ref, rstd_ref = ref.group_norm(x, G, w, b, eps=1e-3)
    assert mean.dtype == np.float64 and rstd.dtype == np.float64
    assert mean.shape == (shape[0], G) and rstd.shape == (shape[0], G)
    assert_close(y, y_ref, dtype)
    # statistics are accumulated in float64 whatever x's dtype
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("shape,G", [((2, 6, 5, 3), 3), ((1, 4, 70, 70), 1), ((3, 5), 5)])
def test_group_norm_stats_algorithms_match_reference(rng, dtype, stats, shape, G):
    x, w, b = make(rng, shape, dtype, loc=3.0, scale=2.0)
    y, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True, stats=stats)
    y_ref, mean_ref, rstd_ref = ref.group_norm(x, G, w, b)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


def test_group_norm_eps_is_used(rng):
    # a tiny variance makes eps dominate: a wrong or ignored eps shows at once
    x = 1e-3 * rng.standard_normal((2, 4, 5))
    for eps in (0.0, 1e-5, 0.5):
        y, _, rstd = cynorm.group_norm(x, 2, eps=eps, return_stats=True)
        y_ref, _, rstd_ref = ref.group_norm(x, 2, eps=eps)
        assert_close(y, y_ref, np.float64)
        np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-12)


@pytest.mark.parametrize("shape,G", [((0, 4, 3), 2), ((0, 6), 3), ((0, 2, 2, 2), 1)])
def test_group_norm_empty_batch(dtype, shape, G):
    x = np.zeros(shape, dtype=dtype)
    y, mean, rstd = cynorm.group_norm(x, G, np.ones(shape[1], dtype), return_stats=True)
    assert y.shape == shape and y.dtype == dtype
    assert mean.shape == (0, G) and rstd.shape == (0, G)
    dy = np.zeros(shape, dtype=dtype)
    junk = np.full(shape[1], 1e30, dtype=dtype)  # recycled heap block: sums over an
    del junk                                     # empty batch must be written as zeros
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, G)
    assert dx.shape == shape and dw.shape == (shape[1],) and db.shape == (shape[1],)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_group_norm_large_mean_float32_keeps_precision(rng):
    # float32 data with mean 1e4, std 1: x - mean must not be computed after rounding
    # the mean to float32 or cancel away in a float32 E[x^2] - E[x]^2.
    for shape, G in [((4, 8, 16, 16), 4), ((2, 4, 64, 64), 1), ((3, 6, 5), 6)]:
        x, w, b = make(rng, shape, np.float32, loc=1e4, scale=1.0)
        y_ref, mean_ref, rstd_ref = ref.group_norm(x, G, w, b)
        for stats in ("two_pass", "welford"):
            y, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True, stats=stats)
            np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)
            np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
            np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-8)


def test_group_norm_weight_none_is_identity_affine(rng, dtype):
    x, _, _ = make(rng, (3, 6, 4, 3), dtype)
    C = 6
    y_none = cynorm.group_norm(x, 3)
    y_ones = cynorm.group_norm(x, 3, np.ones(C, dtype), np.zeros(C, dtype))
    assert_close(y_none, y_ones.astype(np.float64), dtype)
    assert_close(y_none, ref.group_norm(x, 3)[0], dtype)
    # weight given, bias None and the other way round
    w = np.linspace(0.5, 2.0, C).astype(dtype)
    b = np.linspace(-1.0, 1.0, C).astype(dtype)
    assert_close(cynorm.group_norm(x, 3, w), ref.group_norm(x, 3, w)[0], dtype)
    assert_close(cynorm.group_norm(x, 3, None, b), ref.group_norm(x, 3, None, b)[0], dtype)


def test_group_norm_params_cast_to_x_dtype(rng):
    x, w, b = make(rng, (2, 4, 5), np.float32)
    y = cynorm.group_norm(x, 2, w.astype(np.float64), b.astype(np.float64))
    assert y.dtype == np.float32
    assert_close(y, ref.group_norm(x, 2, w.astype(np.float32), b.astype(np.float32))[0],
                 np.float32)


def test_group_norm_does_not_modify_inputs(rng, dtype):
    x, w, b = make(rng, (2, 6, 3, 3), dtype)
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    y, mean, rstd = cynorm.group_norm(x, 3, w, b, return_stats=True)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy0 = dy.copy()
    cynorm.group_norm_backward(dy, x, mean, rstd, 3, w)
    for a, a0 in [(x, x0), (w, w0), (b, b0), (dy, dy0)]:
        np.testing.assert_array_equal(a, a0)


# ---- out= and layouts ------------------------------------------------------------------

def test_group_norm_out_gives_identical_result(rng, dtype):
    x, w, b = make(rng, (3, 8, 5, 4), dtype)
    y = cynorm.group_norm(x, 4, w, b)
    out = np.full_like(x, np.nan)
    r = cynorm.group_norm(x, 4, w, b, out=out)
    assert r is out
    np.testing.assert_array_equal(out, y)
    # with return_stats, the first result is out
    out2 = np.empty_like(x)
    r2, mean, rstd = cynorm.group_norm(x, 4, w, b, out=out2, return_stats=True)
    assert r2 is out2
    np.testing.assert_array_equal(out2, y)


@pytest.mark.parametrize("shape,G", [((3, 8, 5, 4), 4), ((1, 4, 70, 70), 1), ((2, 6), 6)])
def test_group_norm_in_place_out_x(rng, dtype, shape, G):
    x, w, b = make(rng, shape, dtype)
    y, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True)
    x_in = x.copy()
    r, mean2, rstd2 = cynorm.group_norm(x_in, G, w, b, out=x_in, return_stats=True)
    assert r is x_in
    np.testing.assert_array_equal(x_in, y)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(rstd2, rstd)


@pytest.mark.parametrize("which", ["dy", "x"])
def test_group_norm_backward_out_in_place(rng, dtype, which):
    x, w, b = make(rng, (3, 8, 5, 4), dtype)
    _, mean, rstd = cynorm.group_norm(x, 4, w, b, return_stats=True)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, 4, w)
    dy2, x2 = dy.copy(), x.copy()
    target = dy2 if which == "dy" else x2
    dx2, dw2, db2 = cynorm.group_norm_backward(dy2, x2, mean, rstd, 4, w, out=target)
    assert dx2 is target
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)
    # a separate out array
    out = np.full_like(x, np.nan)
    dx3, _, _ = cynorm.group_norm_backward(dy, x, mean, rstd, 4, w, out=out)
    assert dx3 is out
    np.testing.assert_array_equal(out, dx)


def _non_contiguous_variants(x):
    """Arrays equal to x but not C-contiguous: Fortran order, a transposed copy viewed
    back, and a strided slice of a larger array."""
    f = np.asfortranarray(x)
    perm = tuple(reversed(range(x.ndim)))
    t = np.ascontiguousarray(x.transpose(perm)).transpose(perm)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    big[..., ::2] = x
    s = big[..., ::2]
    for v in (f, t, s):
        np.testing.assert_array_equal(v, x)
    return {"fortran": f, "transposed": t, "sliced": s}


@pytest.mark.parametrize("layout", ["fortran", "transposed", "sliced"])
def test_group_norm_non_contiguous_inputs_match_contiguous(rng, dtype, layout):
    x, w, b = make(rng, (3, 6, 4, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mean, rstd = cynorm.group_norm(x, 3, w, b, return_stats=True)
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, 3, w)
    xv = _non_contiguous_variants(x)[layout]
    dyv = _non_contiguous_variants(dy)[layout]
    assert not xv.flags.c_contiguous
    wv = np.repeat(w, 2)[::2]  # a strided weight
    assert not wv.flags.c_contiguous
    y2, mean2, rstd2 = cynorm.group_norm(xv, 3, wv, b, return_stats=True)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(rstd2, rstd)
    mean_f = np.asfortranarray(mean)  # non-contiguous saved statistics too
    assert not mean_f.flags.c_contiguous
    dx2, dw2, db2 = cynorm.group_norm_backward(dyv, xv, mean_f, rstd, 3, wv)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


# ---- NaN / Inf -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("stats", ["two_pass", "welford"])
def test_group_norm_non_finite_propagates_only_to_its_group(rng, dtype, bad, stats):
    x, w, b = make(rng, (2, 6, 3, 3), dtype)
    G = 3  # 2 channels per group
    x[1, 3, 0, 2] = bad  # sample 1, group 1
    y, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True, stats=stats)
    affected = np.zeros(x.shape, dtype=bool)
    affected[1, 2:4] = True
    assert np.isnan(y[affected]).all()
    assert np.isfinite(y[~affected]).all()
    clean = x.copy()
    clean[affected] = 0  # reference on the unaffected groups only
    y_ref, mean_ref, rstd_ref = ref.group_norm(clean, G, w, b)
    assert_close(y[~affected], y_ref[~affected], dtype)
    stat_ok = np.ones((2, G), dtype=bool)
    stat_ok[1, 1] = False
    assert not np.isfinite(mean[1, 1]) or not np.isfinite(rstd[1, 1])
    np.testing.assert_allclose(mean[stat_ok], mean_ref[stat_ok], rtol=1e-10, atol=1e-12)


# ---- backward --------------------------------------------------------------------------

@pytest.mark.parametrize("shape,G", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_group_norm_backward_matches_reference(rng, dtype, shape, G, affine):
    x, w, b = make(rng, shape, dtype, affine)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, rstd = ref.group_norm(x, G, w, b)  # reference statistics for both
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, G, w)
    dx_ref, dw_ref, db_ref = ref.group_norm_backward(dy, x, mean, rstd, G, w)
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    assert dw.shape == (shape[1],) and db.shape == (shape[1],)
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")
    assert_close(db, db_ref, dtype, "backward")


@pytest.mark.parametrize("shape,G", [((3, 8, 6, 5), 4), ((1, 4, 70, 70), 1)])
def test_group_norm_forward_then_backward_matches_reference(rng, dtype, shape, G):
    x, w, b = make(rng, shape, dtype, loc=2.0, scale=3.0)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True)
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, G, w)
    _, mean_r, rstd_r = ref.group_norm(x, G, w, b)
    dx_ref, dw_ref, db_ref = ref.group_norm_backward(dy, x, mean_r, rstd_r, G, w)
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")
    assert_close(db, db_ref, dtype, "backward")


def test_group_norm_backward_weight_none_equals_ones(rng, dtype):
    x, _, _ = make(rng, (2, 6, 4), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, mean, rstd = cynorm.group_norm(x, 3, return_stats=True)
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, 3)
    dx1, dw1, db1 = cynorm.group_norm_backward(dy, x, mean, rstd, 3, np.ones(6, dtype))
    for a, e in [(dx, dx1), (dw, dw1), (db, db1)]:
        assert_close(a, e.astype(np.float64), dtype, "backward")
    dx_ref, dw_ref, db_ref = ref.group_norm_backward(dy, x, mean, rstd, 3)
    assert_close(dw, dw_ref, dtype, "backward")
    assert_close(db, db_ref, dtype, "backward")


@pytest.mark.parametrize("shape,G", SMALL_SHAPES)
def test_group_norm_gradients_match_finite_differences(rng, shape, G):
    x, w, b = make(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    eps = 1e-5
    num_dx, num_dw, num_db = ref.numerical_grads(
        lambda x_, w_, b_: cynorm.group_norm(x_, G, w_, b_, eps=eps), [x, w, b], dy)
    _, mean, rstd = cynorm.group_norm(x, G, w, b, eps=eps, return_stats=True)
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, G, w)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, num_dw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, num_db, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,G", SMALL_SHAPES[:3])
def test_group_norm_reference_backward_matches_finite_differences(rng, shape, G):
    # keeps the reference itself honest
    x, w, b = make(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    num = ref.numerical_grads(lambda x_, w_, b_: ref.group_norm(x_, G, w_, b_)[0],
                              [x, w, b], dy)
    _, mean, rstd = ref.group_norm(x, G, w, b)
    for a, e in zip(ref.group_norm_backward(dy, x, mean, rstd, G, w), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


# ---- torch as an oracle ----------------------------------------------------------------

TORCH_SHAPES = [((4, 6), 3), ((3, 8, 10), 4), ((2, 6, 7, 5), 2), ((2, 4, 3, 4, 5), 4),
                ((2, 4, 1, 1), 4), ((1, 4, 40, 40), 1)]


@pytest.mark.parametrize("shape,G", TORCH_SHAPES)
def test_group_norm_matches_torch_forward_and_backward(rng, dtype, shape, G):
    torch = pytest.importorskip("torch")
    x, w, b = make(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.group_norm(tx, G, tw, tb, eps=1e-5)
    ty.backward(torch.tensor(dy))
    y, mean, rstd = cynorm.group_norm(x, G, w, b, eps=1e-5, return_stats=True)
    dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, G, w)
    # torch itself computes in x's dtype: compare at the float32 tolerance level for
    # float32 and a little looser than the reference tolerance for float64
    tol = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}[dtype]
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
    for a, t in [(dx, tx.grad), (dw, tw.grad), (db, tb.grad)]:
        t = t.numpy()
        np.testing.assert_allclose(a, t, rtol=tol, atol=tol * max(1, np.abs(t).max()))


# ---- property test ---------------------------------------------------------------------

def test_group_norm_property_matches_reference():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(deadline=None)  # examples: the profile's (tests/conftest.py)
    @hypothesis.given(
        n=st.integers(0, 3),
        groups=st.integers(1, 4),
        per_group=st.integers(1, 4),
        spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
        dtype=st.sampled_from([np.float32, np.float64]),
        layout=st.sampled_from(["c", "fortran", "sliced"]),
        affine=st.booleans(),
        stats=st.sampled_from(["two_pass", "welford"]),
        seed=st.integers(0, 2**32 - 1),
        loc=st.sampled_from([0.0, 5.0, -100.0]),
    )
    def check(n, groups, per_group, spatial, dtype, layout, affine, stats, seed, loc):
        rng = np.random.default_rng(seed)
        shape = (n, groups * per_group, *spatial)
        x, w, b = make(rng, shape, dtype, affine, loc=loc)
        if layout == "fortran":
            x = np.asfortranarray(x)
        elif layout == "sliced":
            big = np.repeat(x, 2, axis=-1)
            x = big[..., ::2]
        y, mean, rstd = cynorm.group_norm(x, groups, w, b, return_stats=True,
                                          stats=stats)
        y_ref, mean_ref, rstd_ref = ref.group_norm(x, groups, w, b)
        assert y.dtype == np.dtype(dtype)
        assert_close(y, y_ref, dtype)
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-9)

    check()


def test_group_norm_accepts_read_only_and_byte_swapped_inputs(rng, dtype):
    x, w, b = make(rng, (2, 6, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mean, rstd = cynorm.group_norm(x, 3, w, b, return_stats=True)
    grads = cynorm.group_norm_backward(dy, x, mean, rstd, 3, w)
    ro = [a.copy() for a in (x, w, b, dy, mean, rstd)]
    for a in ro:
        a.flags.writeable = False
    xr, wr, br, dyr, mr, rr = ro
    np.testing.assert_array_equal(cynorm.group_norm(xr, 3, wr, br), y)
    for a, e in zip(cynorm.group_norm_backward(dyr, xr, mr, rr, 3, wr), grads):
        np.testing.assert_array_equal(a, e)
    swapped = dtype.newbyteorder()
    xs, ws, dys = x.astype(swapped), w.astype(swapped), dy.astype(swapped)
    y2 = cynorm.group_norm(xs, 3, ws, b)
    assert y2.dtype == dtype  # native byte order out
    np.testing.assert_array_equal(y2, y)
    for a, e in zip(cynorm.group_norm_backward(dys, xs, mean, rstd, 3, ws), grads):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
def test_group_norm_constant_input_gives_bias(dtype, stats):
    # zero variance: y = bias, rstd = 1/sqrt(eps); a cancelling variance formula would
    # give a tiny negative variance here and NaN
    x = np.full((2, 4, 33, 33), 12345.678, dtype=dtype)
    b = np.array([1.0, -2.0, 0.5, 3.0], dtype=dtype)
    y, mean, rstd = cynorm.group_norm(x, 2, np.ones(4, dtype), b, eps=1e-5,
                                      return_stats=True, stats=stats)
    y_ref, mean_ref, rstd_ref = ref.group_norm(x, 2, np.ones(4), b, eps=1e-5)
    # y - bias = (x - mean) * rstd: a float64 mean rounded by ~M * 2**-53 * |x| is
    # amplified by rstd = 316 here, hence an absolute 1e-6 rather than 1e-12
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(1e-5), rtol=1e-6)
