"""cynorm.standardize: scipy.stats.zscore semantics, every normalisation set of the
GroupNorm paper against the named ops, a plain float64 NumPy reference over any axes
(every block pattern the kernels map), ddof, eps, weight/bias broadcasting, out=, NaN,
empty arrays and bad arguments."""
import warnings

import numpy as np
import pytest

import cynorm

scipy_stats = pytest.importorskip("scipy.stats")


def data(shape, dtype, seed=0, loc=100.0):
    """Offset data (mean `loc`): a large mean against the spread is where a one-pass or
    a float32 computation loses digits."""
    rng = np.random.default_rng(seed)
    return (loc + rng.standard_normal(shape)).astype(dtype)


def reference(x, axis, weight=None, bias=None, eps=0.0, ddof=0):
    """Plain float64 NumPy: (y, mean, std) with std = sqrt(var + eps)."""
    x = np.asarray(x, dtype=np.float64)
    axis = tuple(range(x.ndim)) if axis is None else axis
    mean = x.mean(axis=axis, keepdims=True)
    n = x.size // max(mean.size, 1) if x.size else 0
    m2 = ((x - mean) ** 2).sum(axis=axis, keepdims=True)
    var = m2 / (n - ddof) if n - ddof > 0 else np.full_like(m2, np.nan)
    std = np.sqrt(var + eps)
    y = (x - mean) / std
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y, np.squeeze(mean, axis=axis), np.squeeze(std, axis=axis)


def tol(dtype):
    # float32 output: a few ulps of values of order 1-5; float64: far below 1e-12
    return dict(rtol=0, atol=2e-6) if dtype == np.float32 else dict(rtol=0, atol=1e-12)


# ---- scipy.stats.zscore ----------------------------------------------------------------

@pytest.mark.parametrize("ddof", [0, 1, 2])
@pytest.mark.parametrize("shape,axis", [
    ((200, 7), 0), ((200, 7), 1), ((200, 7), -1), ((5, 300, 6), 1), ((5, 6, 300), 0),
    ((4, 5, 6, 70), 2), ((4, 5, 6, 70), -4), ((1000,), 0), ((3, 4, 5), None),
])
def test_standardize_equals_scipy_zscore_for_one_axis(dtype, shape, axis, ddof):
    x = data(shape, dtype, loc=3.0)
    z = scipy_stats.zscore(x.astype(np.float64), axis=axis, ddof=ddof)
    y = cynorm.standardize(x, axis, ddof=ddof)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, z, **tol(dtype))


@pytest.mark.parametrize("ddof", [3, 4, 7.5])
def test_n_minus_ddof_at_most_zero_gives_nan_as_scipy(ddof):
    x = np.array([[1.0, 2.0, 4.0], [3.0, 3.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = scipy_stats.zscore(x, axis=1, ddof=ddof)
    y, mean, std = cynorm.standardize(x, 1, ddof=ddof, return_stats=True)
    assert np.isnan(z).all()
    assert np.isnan(y).all() and np.isnan(std).all()
    np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-15)


def test_fractional_and_negative_ddof_divide_by_n_minus_ddof():
    x = data((40, 9), np.float64, loc=0.0)
    for ddof in (0.5, -1):
        y, _, std = cynorm.standardize(x, 0, ddof=ddof, return_stats=True)
        ry, _, rstd = reference(x, 0, ddof=ddof)
        np.testing.assert_allclose(std, rstd, rtol=1e-14)
        np.testing.assert_allclose(y, ry, atol=1e-13)


def test_nan_propagates_to_its_set_only_as_scipy():
    x = data((6, 50), np.float64, loc=0.0)
    x[2, 17] = np.nan
    for axis in (0, 1):
        z = scipy_stats.zscore(x, axis=axis)
        y = cynorm.standardize(x, axis)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(z))
        np.testing.assert_allclose(y[~np.isnan(z)], z[~np.isnan(z)], atol=1e-12)


def test_constant_set_gives_nan_as_scipy_and_eps_makes_it_zero():
    x = np.ones((4, 30)) * 7.0
    x[1] = np.arange(30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's note on the constant rows
        z = scipy_stats.zscore(x, axis=1)
    y = cynorm.standardize(x, 1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(z))
    np.testing.assert_array_equal(cynorm.standardize(x, 1, eps=1e-5)[0], 0.0)


# ---- every S_i of the GroupNorm paper, against the named ops -------------------------

NCHW = (4, 6, 9, 11)


def test_covers_batch_norm_training(dtype):
    x = data(NCHW, dtype)
    w, b = data(6, dtype, 1, 1.0), data(6, dtype, 2, 0.0)
    yb, mb, rb = cynorm.batch_norm(x, weight=w, bias=b, training=True, eps=0.0,
                                   return_stats=True)
    y, m, s = cynorm.standardize(x, (0, 2, 3), weight=w[:, None, None],
                                 bias=b[:, None, None], return_stats=True)
    np.testing.assert_allclose(y, yb, **tol(dtype))
    np.testing.assert_allclose(m, mb, rtol=1e-15)
    np.testing.assert_allclose(1 / s, rb, rtol=1e-14)


def test_covers_layer_norm_over_trailing_dims(dtype):
    x = data((5, 7, 8, 9), dtype)
    w, b = data((8, 9), dtype, 1, 1.0), data((8, 9), dtype, 2, 0.0)
    yl, ml, rl = cynorm.layer_norm(x, (8, 9), w, b, eps=1e-5, return_stats=True)
    y, m, s = cynorm.standardize(x, (-2, -1), weight=w, bias=b, eps=1e-5,
                                 return_stats=True)
    np.testing.assert_allclose(y, yl, **tol(dtype))
    np.testing.assert_allclose(m, ml, rtol=1e-15)
    np.testing.assert_allclose(1 / s, rl, rtol=1e-14)


def test_covers_instance_norm(dtype):
    x = data(NCHW, dtype)
    w, b = data(6, dtype, 1, 1.0), data(6, dtype, 2, 0.0)
    yi, mi, ri = cynorm.instance_norm(x, weight=w, bias=b, eps=1e-5,
                                      return_stats=True)
    y, m, s = cynorm.standardize(x, (2, 3), weight=w[:, None, None],
                                 bias=b[:, None, None], eps=1e-5, return_stats=True)
    np.testing.assert_allclose(y, yi, **tol(dtype))
    np.testing.assert_allclose(m, mi, rtol=1e-15)
    np.testing.assert_allclose(1 / s, ri, rtol=1e-14)


@pytest.mark.parametrize("G", [1, 2, 3])
def test_covers_group_norm_and_paper_layer_norm(dtype, G):
    x = data(NCHW, dtype)
    N, C = NCHW[:2]
    w, b = data(C, dtype, 1, 1.0), data(C, dtype, 2, 0.0)
    yg, mg, rg = cynorm.group_norm(x, G, w, b, eps=1e-5, return_stats=True)
    xg = x.reshape(N, G, C // G, -1)
    y, m, s = cynorm.standardize(xg, (2, 3), weight=w.reshape(G, C // G, 1),
                                 bias=b.reshape(G, C // G, 1), eps=1e-5,
                                 return_stats=True)
    np.testing.assert_allclose(y.reshape(x.shape), yg, **tol(dtype))
    np.testing.assert_allclose(m, mg, rtol=1e-15)
    np.testing.assert_allclose(1 / s, rg, rtol=1e-14)


def test_covers_layer_norm_2d_over_channels_of_nchw(dtype):
    """ConvNeXt/SAM's LayerNorm2d: layer_norm over C at every pixel (what torch users
    write as permute + layer_norm + permute), weight and bias (C, 1, 1)."""
    x = data((3, 40, 9, 13), dtype)
    w, b = data(40, dtype, 1, 1.0), data(40, dtype, 2, 0.0)
    yl, ml, rl = cynorm.layer_norm(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), 40, w,
                                   b, eps=1e-6, return_stats=True)
    y, m, s = cynorm.standardize(x, 1, weight=w[:, None, None], bias=b[:, None, None],
                                 eps=1e-6, return_stats=True)
    np.testing.assert_allclose(y, yl.transpose(0, 3, 1, 2), **tol(dtype))
    np.testing.assert_allclose(m, ml, rtol=1e-15)
    np.testing.assert_allclose(1 / s, rl, rtol=1e-14)


# ---- the float64 reference over any axes (every block pattern) -----------------------

AXES_CASES = [
    ((30, 50), 1),                  # [K, R] rows
    ((50, 30), 0),                  # [R, K] columns
    ((3000, 9), 0),                 # columns, several row blocks
    ((4, 6, 70), (0, 2)),           # [R, K, R] channels, long runs
    ((4, 6, 7), (0, 2)),            # channels, short runs (column path)
    ((2, 130, 70), 1),              # [K, R, K] batched columns, several row blocks
    ((3, 40, 2100), 1),             # batched columns, several tiles
    ((2, 3, 5, 7), (1, 2)),         # batched columns, merged axes on both sides
    ((3, 4, 5, 6), (0, 2)),         # [R, K, R, K]: the transposed copy
    ((3, 4, 5, 6), (1, 3)),         # [K, R, K, R]
    ((2, 3, 4, 5, 6), (0, 2, 4)),   # [R, K, R, K, R]
    ((4, 1, 6, 1), (1, 3)),         # only size-1 axes reduced: sets of one element
    ((4, 1, 6), (0, 1)),            # size-1 axis between reduced and kept
    ((1, 7, 1), None),              # everything
    ((5,), ()),                     # nothing reduced
]


@pytest.mark.parametrize("shape,axis", AXES_CASES)
def test_matches_float64_reference_over_any_axes(dtype, shape, axis):
    x = data(shape, dtype)
    y, m, s = cynorm.standardize(x, axis, eps=1e-3, ddof=1, return_stats=True)
    ry, rm, rs = reference(x, axis, eps=1e-3, ddof=1)
    assert m.shape == rm.shape and s.shape == rs.shape
    if np.isnan(ry).any():  # sets of one element with ddof=1
        assert np.isnan(y).all() and np.isnan(ry).all()
        return
    np.testing.assert_allclose(y, ry, **tol(dtype))
    np.testing.assert_allclose(m, rm, rtol=1e-14)
    np.testing.assert_allclose(s, rs, rtol=1e-13)


@pytest.mark.parametrize("shape,axis", [((3000, 300), 0), ((4, 200, 3000), 1)])
def test_large_offset_float32_is_accurate(shape, axis):
    x = data(shape, np.float32, loc=1e4)
    y = cynorm.standardize(x, axis)
    ry, _, _ = reference(x, axis)
    np.testing.assert_allclose(y, ry, rtol=0, atol=5e-3)  # x itself is rounded to 1e-3
    z32 = scipy_stats.zscore(x, axis=axis)
    assert np.abs(y - ry).max() <= np.abs(z32 - ry).max()


def test_zero_dimensional_x_is_one_set_of_one_element():
    y, m, s = cynorm.standardize(np.array(3.0), return_stats=True, eps=1.0)
    assert y.shape == () and m.shape == () and y == 0.0 and m == 3.0 and s == 1.0


def test_empty_arrays_give_empty_output_and_nan_statistics():
    y, m, s = cynorm.standardize(np.zeros((0, 4)), 0, return_stats=True)
    assert y.shape == (0, 4) and m.shape == (4,) and np.isnan(m).all() and np.isnan(s).all()
    y, m, s = cynorm.standardize(np.zeros((0, 4)), 1, return_stats=True)
    assert y.shape == (0, 4) and m.shape == (0,) and s.shape == (0,)


# ---- weight and bias -------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis,wshape", [
    ((6, 8, 10), (0, 2), (8, 1)),      # per channel, fused (channel family)
    ((6, 8, 10), 2, (10,)),            # elementwise over the normalized axis (rows)
    ((6, 8, 10), 1, (8, 1)),           # LayerNorm2d's (C, 1, 1): batched columns
    ((60, 8), 0, (8,)),                # per column
    ((6, 8, 10), (0, 2), (6, 1, 10)),  # over the normalized axes: applied after
    ((6, 8, 10), 2, (6, 8, 10)),       # elementwise over all of x: applied after
    ((6, 8, 10), 1, (10,)),            # over a kept axis of batched columns
    ((3, 4, 5, 6), (0, 2), (4, 1, 1)), # per channel on the transposed path
    ((3, 4, 5, 6), (0, 2), (5, 1)),    # over a normalized axis on the transposed path
    ((6, 8, 10), 2, ()),               # a scalar
])
def test_weight_and_bias_broadcast_to_x(dtype, shape, axis, wshape):
    x = data(shape, dtype)
    w = data(wshape, np.float64, 1, 1.0)
    b = data(wshape, np.float64, 2, 0.0)
    y = cynorm.standardize(x, axis, weight=w, bias=b, eps=1e-5)
    ry, _, _ = reference(x, axis, w, b, eps=1e-5)
    np.testing.assert_allclose(y, ry, **({"atol": 2e-5} if dtype == np.float32
                                         else {"atol": 1e-12}))
    yw = cynorm.standardize(x, axis, weight=w, eps=1e-5)
    np.testing.assert_allclose(yw, reference(x, axis, w, eps=1e-5)[0],
                               **({"atol": 2e-5} if dtype == np.float32
                                  else {"atol": 1e-12}))


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_weight_or_bias_that_does_not_broadcast_names_itself(name):
    x = np.zeros((4, 5, 6))
    for bad in (np.ones(4), np.ones((2, 5, 1)), np.ones((1, 4, 5, 6))):
        with pytest.raises(ValueError, match=name):
            cynorm.standardize(x, 1, **{name: bad})
    with pytest.raises(TypeError, match=name):
        cynorm.standardize(x, 1, **{name: np.array(["a"] * 6)})


# ---- out= ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((50, 30), 0), ((30, 50), 1), ((2, 70, 66), 1),
                                        ((3, 4, 5, 6), (0, 2)), ((4, 6, 70), (0, 2))])
def test_out_x_standardizes_in_place(dtype, shape, axis):
    x = data(shape, dtype)
    expected = cynorm.standardize(x, axis, weight=np.ones(shape[-1]))
    got = cynorm.standardize(x, axis, weight=np.ones(shape[-1]), out=x)
    assert got is x
    np.testing.assert_array_equal(x, expected)


def test_out_preallocated_and_bad_out():
    x = data((20, 30), np.float32)
    out = np.empty_like(x)
    assert cynorm.standardize(x, 0, out=out) is out
    np.testing.assert_array_equal(out, cynorm.standardize(x, 0))
    with pytest.raises(TypeError, match="out"):
        cynorm.standardize(x, 0, out=np.empty((20, 30)))
    with pytest.raises(ValueError, match="out"):
        cynorm.standardize(x, 0, out=np.empty((30, 20), np.float32))
    with pytest.raises(ValueError, match="out"):
        cynorm.standardize(x, 0, out=x[:, ::-1])


# ---- bad arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("axis", [2, -3, (0, 2), (5,)])
def test_axis_out_of_range_names_axis(axis):
    with pytest.raises(ValueError, match="axis"):
        cynorm.standardize(np.zeros((3, 4)), axis)


@pytest.mark.parametrize("axis", [(0, 0), (1, -1), [0, 1, 0]])
def test_repeated_axis_names_axis(axis):
    with pytest.raises(ValueError, match="axis.*repeated"):
        cynorm.standardize(np.zeros((3, 4)), axis)


@pytest.mark.parametrize("axis", [1.0, "0", True, (0, 1.5), (None,), np.float64(1)])
def test_axis_of_wrong_type_names_axis(axis):
    with pytest.raises(TypeError, match="axis"):
        cynorm.standardize(np.zeros((3, 4)), axis)


def test_numpy_integer_axes_are_accepted():
    x = data((5, 6), np.float64)
    np.testing.assert_array_equal(cynorm.standardize(x, np.int64(1)),
                                  cynorm.standardize(x, (1,)))


@pytest.mark.parametrize("kw,exc", [
    ({"eps": -1.0}, ValueError), ({"eps": float("nan")}, ValueError),
    ({"eps": "1"}, TypeError), ({"ddof": "1"}, TypeError),
    ({"ddof": float("nan")}, ValueError), ({"ddof": True}, TypeError),
])
def test_bad_eps_and_ddof_name_themselves(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        cynorm.standardize(np.zeros((3, 4)), 0, **kw)


def test_bad_x_names_x():
    with pytest.raises(TypeError, match="x"):
        cynorm.standardize(np.zeros((3, 4), dtype=np.int64), 0)
    with pytest.raises(TypeError, match="x"):
        cynorm.standardize([[1.0], [1.0, 2.0]], 0)


@pytest.mark.parametrize("shape,axis", [((300000, 3), 0), ((1, 512, 512, 3), (0, 1, 2)),
                                        ((2, 20000, 50), 1)])
def test_float64_mean_of_many_row_blocks_stays_within_a_few_ulps(shape, axis):
    """Thousands of 64-row blocks merged pairwise: on data with mean 1e4 (ulp 1.8e-12)
    the z-scores stay within a few ulps of the mean's precision of the exact values
    (a left fold of the blocks drifted to 1.6e-11 .. 2.6e-10 here)."""
    x = 1e4 + np.random.default_rng(0).standard_normal(shape)
    xl = x.astype(np.longdouble)
    d = xl - xl.mean(axis=axis, keepdims=True)
    exact = d / np.sqrt((d * d).mean(axis=axis, keepdims=True))
    err = float(np.max(np.abs(cynorm.standardize(x, axis) - exact)))
    assert err < 8e-12


def test_random_shapes_and_axes_match_the_reference():
    """Seeded random shapes (sizes 1..9 and a few long axes) and axis sets: every block
    pattern, size-1 axes anywhere, with and without a per-channel weight."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        ndim = int(rng.integers(1, 6))
        shape = tuple(int(rng.choice([1, 2, 3, 5, 9, 70])) for _ in range(ndim))
        k = int(rng.integers(0, ndim + 1))
        axis = tuple(int(a) for a in rng.choice(ndim, size=k, replace=False))
        axis = tuple(a - ndim if rng.random() < 0.5 else a for a in axis)
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        x = data(shape, dtype, seed=int(rng.integers(1 << 30)))
        w = data(shape[-1:], np.float64, 3, 1.0) if rng.random() < 0.5 else None
        y, m, s = cynorm.standardize(x, axis, weight=w, eps=0.5, return_stats=True)
        ry, rm, rs = reference(x, axis, w, eps=0.5)
        np.testing.assert_allclose(y, ry, **tol(dtype), err_msg=f"{shape} {axis}")
        np.testing.assert_allclose(m, rm, rtol=1e-14, err_msg=f"{shape} {axis}")
        np.testing.assert_allclose(s, rs, rtol=1e-13, err_msg=f"{shape} {axis}")


# ---- float16 and bfloat16 ----------------------------------------------------------------

from lowp_reference import LOWP, assert_within_one_ulp, wide  # noqa: E402
from test_determinism import across_threads  # noqa: E402


def lowp_data(shape, dt, seed=0, loc=1.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dt)


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,axis", [c for c in AXES_CASES if c[0] != (3000, 9)]
                         + [((3000, 9), 0), ((2, 5, 4100), (0, 2)), ((3, 9000), 1)])
def test_16bit_within_one_ulp_of_the_float64_reference_with_float64_statistics(
        dt, shape, axis):
    x = lowp_data(shape, dt)
    y, m, s = cynorm.standardize(x, axis, eps=1e-3, ddof=1, return_stats=True)
    ry, rm, rs = reference(wide(x), axis, eps=1e-3, ddof=1)
    assert y.dtype == dt and m.dtype == s.dtype == np.float64
    assert m.shape == rm.shape and s.shape == rs.shape
    assert_within_one_ulp(y, ry)
    if not np.isnan(rs).any():
        # float32 deviations over runs of 256 or more values (README "16-bit storage"):
        # the mean within 1e-5 standard deviations, the std within 2e-5
        assert np.all(np.abs(m - rm) <= 1e-5 * rs + 1e-14 * np.abs(rm)), "mean"
        np.testing.assert_allclose(s, rs, rtol=2e-5)


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,axis,wshape", [
    ((6, 8, 100), (0, 2), (8, 1)),     # per channel, fused, long runs
    ((6, 8, 10), (0, 2), (8, 1)),      # per channel, short runs (float32 copy)
    ((6, 8, 10), 2, (10,)),            # elementwise over the rows, fused
    ((6, 8, 10), 1, (8, 1)),           # batched columns (float32 copy)
    ((60, 8), 0, (8,)),                # per column (float32 copy)
    ((6, 8, 10), 2, (6, 8, 10)),       # applied after the kernel
    ((3, 4, 5, 6), (0, 2), (4, 1, 1)), # the transposed path
])
@pytest.mark.parametrize("pdt", ["same", np.float32, np.float64])
def test_16bit_weight_and_bias_within_one_ulp(dt, shape, axis, wshape, pdt):
    x = lowp_data(shape, dt, 3)
    pd = dt if pdt == "same" else np.dtype(pdt)
    w = lowp_data(wshape, pd, 4, 1.0, 0.5)
    b = lowp_data(wshape, pd, 5, 0.0, 0.5)
    y = cynorm.standardize(x, axis, weight=w, bias=b, eps=1e-5)
    ry, _, _ = reference(wide(x), axis, wide(w), wide(b), eps=1e-5)
    xhat = reference(wide(x), axis, eps=1e-5)[0]
    # y is xhat * w + b: where it cancels to near 0, a few float32 ulps of the terms
    assert y.dtype == dt
    assert_within_one_ulp(y, ry, terms=np.abs(xhat * wide(w)) + np.abs(wide(b)))


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,axis", [((2, 20000), 1), ((3000, 40), 0),
                                        ((4, 8, 4097), (0, 2)), ((3, 4, 5, 6), (0, 2))])
def test_16bit_bitwise_identical_across_thread_counts(dt, shape, axis):
    x = lowp_data(shape, dt, 6)
    w = lowp_data(shape[-1], np.float32, 7, 1.0, 0.5)
    across_threads(lambda: cynorm.standardize(x, axis, weight=w, return_stats=True))


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,axis", [((50, 30), 0), ((30, 50), 1), ((4, 6, 70), (0, 2))])
def test_16bit_out_x_standardizes_in_place(dt, shape, axis):
    x = lowp_data(shape, dt, 8)
    expected = cynorm.standardize(x, axis)
    assert cynorm.standardize(x, axis, out=x) is x
    assert np.array_equal(x.view(np.uint16), expected.view(np.uint16))


def test_16bit_nan_propagates_to_its_set_only():
    x = lowp_data((5, 40), np.float16, 9)
    x[2, 3] = np.nan
    y = cynorm.standardize(x, 1)
    assert np.isnan(y[2]).all() and not np.isnan(np.delete(y, 2, 0)).any()


def test_unsupported_dtypes_name_x_and_the_dtypes_taken():
    for bad in (np.int16, np.uint16, np.complex64, np.int64):
        with pytest.raises(TypeError, match="x must be a float32, float64, float16 or "
                                            "bfloat16 array"):
            cynorm.standardize(np.zeros((3, 4), dtype=bad), 0)
    with pytest.raises(TypeError, match="weight must be a floating-point array"):
        cynorm.standardize(np.zeros((3, 4), np.float16), 0, weight=np.ones(4, np.int16))
    with pytest.raises(TypeError, match="out must have dtype float16"):
        cynorm.standardize(np.zeros((3, 4), np.float16), 0, out=np.empty((3, 4)))
