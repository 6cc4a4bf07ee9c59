"""The scale-out building blocks: partial_stats, merge_stats, apply_stats,
batch_norm_backward_reduce / batch_norm_backward_apply, against plain float64 NumPy."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cynorm


def data(shape, dtype, seed=0, loc=1.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def ref_sets(x, sets, num_groups=None, nd=None):
    """x (float64) as (sets..., elements of a set): the plain definition of each op's
    sets."""
    x = np.asarray(x, dtype=np.float64)
    if sets == "batch":
        return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    if sets == "group":
        return x.reshape(x.shape[0], num_groups, -1)
    if sets == "instance":
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.reshape(x.shape[:x.ndim - nd] + (-1,))


def ref_moments(x, sets, num_groups=None, nd=None):
    s = ref_sets(x, sets, num_groups, nd)
    count = np.full(s.shape[:-1], float(s.shape[-1]))
    if sets == "rms":
        return count, np.zeros(s.shape[:-1]), (s * s).sum(-1)
    mean = s.mean(-1)
    return count, mean, ((s - mean[..., None]) ** 2).sum(-1)


CASES = [
    ((4, 6, 5, 7), "batch", {}),
    ((3, 5, 300), "batch", {}),          # runs longer than... short and many
    ((2, 3, 5000), "batch", {}),         # runs cut into pieces
    ((4, 6, 5, 7), "group", {"num_groups": 3}),
    ((2, 4, 3000), "group", {"num_groups": 1}),
    ((4, 6, 5, 7), "instance", {}),
    ((4, 6, 5, 7), "layer", {"normalized_ndim": 2}),
    ((3, 9000), "layer", {"normalized_ndim": 1}),
    ((4, 6, 5, 7), "rms", {"normalized_ndim": 1}),
]


def _kw_ref(kw):
    return kw.get("num_groups"), kw.get("normalized_ndim")


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("shape,sets,kw", CASES)
def test_partial_stats_are_the_count_mean_and_m2_of_every_set(dtype, shape, sets, kw,
                                                             stats):
    x = data(shape, dtype)
    p = cynorm.partial_stats(x, sets, stats=stats, **kw)
    count, mean, m2 = ref_moments(x, sets, *_kw_ref(kw))
    assert all(a.dtype == np.float64 for a in p)
    np.testing.assert_array_equal(p.count, count)
    np.testing.assert_allclose(p.mean, mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(p.m2, m2, rtol=1e-12)


@pytest.mark.parametrize("shape,sets,kw", CASES)
def test_merged_partials_of_a_split_equal_the_whole(shape, sets, kw):
    x = data(shape, np.float64, seed=1)
    axis = 0 if sets == "batch" else x.ndim - 1  # an axis inside the sets
    cuts = np.array_split(np.arange(x.shape[axis]), 3)
    parts = [cynorm.partial_stats(np.take(x, c, axis=axis), sets, **kw) for c in cuts]
    merged = cynorm.merge_stats(parts)
    count, mean, m2 = ref_moments(x, sets, *_kw_ref(kw))
    np.testing.assert_array_equal(merged.count, count)
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(merged.m2, m2, rtol=1e-12)
    # the same from the stacked array form
    stacked = cynorm.merge_stats(np.stack([p.stacked() for p in parts]))
    for a, b in zip(stacked, merged):
        assert np.array_equal(a, b)


def test_merge_stats_is_chans_formula_in_the_given_order():
    rng = np.random.default_rng(2)
    chunks = [rng.standard_normal(n) * 3 + 10 for n in (5, 1, 17, 0, 8)]
    parts = [(np.array([len(c)], float), np.array([c.mean() if len(c) else 0.0]),
              np.array([((c - c.mean()) ** 2).sum() if len(c) else 0.0])) for c in chunks]
    merged = cynorm.merge_stats(parts)
    # the fold written out: n = na + nb, d = mb - ma, mean += d * nb / n, ...
    n, m, q = 0.0, 0.0, 0.0
    for c, mb, qb in ((p[0][0], p[1][0], p[2][0]) for p in parts):
        if c == 0:
            continue
        if n == 0:
            n, m, q = c, mb, qb
            continue
        t = n + c
        d = mb - m
        m = m + d * (c / t)
        q = q + qb + d * d * (n * c / t)
        n = t
    assert merged.count[0] == n and merged.mean[0] == m and merged.m2[0] == q
    whole = np.concatenate(chunks)
    np.testing.assert_allclose(merged.mean[0], whole.mean(), rtol=1e-14)
    np.testing.assert_allclose(merged.m2[0], ((whole - whole.mean()) ** 2).sum(),
                               rtol=1e-13)


def test_partial_stats_of_empty_parts_merge_as_nothing():
    x = data((4, 3, 10), np.float64)
    empty = cynorm.partial_stats(x[:0])
    assert np.array_equal(empty.count, np.zeros(3))
    merged = cynorm.merge_stats([empty, cynorm.partial_stats(x), empty])
    whole = cynorm.partial_stats(x)
    for a, b in zip(merged, whole):
        assert np.array_equal(a, b)


def test_partial_stats_var_and_rstd():
    x = data((5, 3, 4), np.float64)
    p = cynorm.partial_stats(x)
    s = ref_sets(x, "batch")
    np.testing.assert_allclose(p.var(), s.var(-1), rtol=1e-13)
    np.testing.assert_allclose(p.var(unbiased=True), s.var(-1, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(p.rstd(1e-3), 1 / np.sqrt(s.var(-1) + 1e-3), rtol=1e-13)


@pytest.mark.parametrize("shape,sets,kw", CASES)
def test_apply_stats_normalises_with_the_given_statistics(dtype, shape, sets, kw):
    x = data(shape, dtype, seed=3)
    nd = kw.get("normalized_ndim")
    sshape = ref_sets(x, sets, *_kw_ref(kw)).shape[:-1]
    rng = np.random.default_rng(4)
    mean = rng.standard_normal(sshape) + 1.5
    rstd = rng.uniform(0.2, 2.0, sshape)
    pshape = x.shape[x.ndim - nd:] if nd else (x.shape[1],)
    w = (1 + 0.5 * rng.standard_normal(pshape)).astype(dtype)
    b = (0.5 * rng.standard_normal(pshape)).astype(dtype) if sets != "rms" else None
    y = cynorm.apply_stats(x, None if sets == "rms" else mean, rstd, w, b, sets, **kw)
    # reference: broadcast the per-set statistics over x
    x64 = x.astype(np.float64)
    if sets == "batch":
        bc = (1, -1) + (1,) * (x.ndim - 2)
        m, r = mean.reshape(bc), rstd.reshape(bc)
    elif sets == "group":
        G = kw["num_groups"]
        m = np.repeat(mean, x.shape[1] // G, 1).reshape(x.shape[:2] + (1,) * (x.ndim - 2))
        r = np.repeat(rstd, x.shape[1] // G, 1).reshape(m.shape)
    elif sets == "instance":
        m, r = (a.reshape(x.shape[:2] + (1,) * (x.ndim - 2)) for a in (mean, rstd))
    else:
        m = 0.0 if sets == "rms" else mean.reshape(sshape + (1,) * nd)
        r = rstd.reshape(sshape + (1,) * nd)
    if nd:
        wb = w.astype(np.float64)
        bb = 0.0 if b is None else b.astype(np.float64)
    else:
        bc = (1, -1) + (1,) * (x.ndim - 2)
        wb, bb = w.astype(np.float64).reshape(bc), b.astype(np.float64).reshape(bc)
    expected = (x64 - m) * r * wb + bb
    assert y.dtype == x.dtype and y.shape == x.shape
    if dtype == np.float64:
        np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)
    else:
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 4, 5, 7), (3, 2, 5000), (8, 3)])
def test_batch_norm_backward_blocks_split_over_parts_equal_the_whole_batch(dtype, shape):
    """Gradient sums of the parts add up to the batch's; dx of each part from the
    global sums is the batch's dx (plain NumPy formulas in float64)."""
    x = data(shape, dtype, seed=5)
    dy = data(shape, dtype, seed=6, loc=0.0, scale=1.0)
    C = shape[1]
    w = data(C, dtype, seed=7, loc=1.0, scale=0.3)
    s = ref_sets(x, "batch")
    mean, rstd = s.mean(-1), 1 / np.sqrt(s.var(-1) + 1e-5)
    parts = np.array_split(np.arange(shape[0]), 3)
    sums = [cynorm.batch_norm_backward_reduce(dy[p], x[p], mean) for p in parts]
    sum_dy = sum(a for a, _ in sums)
    sum_dy_xmu = sum(b for _, b in sums)
    g = ref_sets(dy, "batch")
    xmu = s - mean[:, None]
    np.testing.assert_allclose(sum_dy, g.sum(-1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sum_dy_xmu, (g * xmu).sum(-1), rtol=1e-9, atol=1e-9)
    M = s.shape[1]
    dx = np.concatenate([cynorm.batch_norm_backward_apply(dy[p], x[p], mean, rstd, sum_dy,
                                                          sum_dy_xmu, M, w)
                         for p in parts])
    xhat = xmu * rstd[:, None]
    ref = (w.astype(np.float64) * rstd)[:, None] * (
        g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    ref = np.moveaxis(ref.reshape((C, shape[0]) + shape[2:]), 0, 1)
    assert dx.dtype == dtype
    tol = 1e-11 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(dx, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,sets,kw", CASES)
def test_building_blocks_bitwise_identical_across_thread_counts(shape, sets, kw):
    x = data(shape, np.float32, seed=8)
    out = []
    for n in (1, 2, 3):
        with threadpool_limits(n, user_api="openmp"):
            p = cynorm.partial_stats(x, sets, **kw)
            m = cynorm.merge_stats([p, p])
            y = cynorm.apply_stats(x, None if sets == "rms" else m.mean, m.rstd(), None,
                                   None, sets, **kw)
            res = [*p, *m, y]
            if sets == "batch":
                res += [*cynorm.batch_norm_backward_reduce(y, x, m.mean)]
            out.append(res)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert np.array_equal(a, b)


def test_whole_sets_give_the_ops_own_statistics_bitwise():
    """A part holding whole sets: the moments are those the op computes in memory."""
    x = data((3, 4, 70, 9), np.float32)
    p = cynorm.partial_stats(x, "batch")
    _, mean, rstd = cynorm.batch_norm(x, training=True, return_stats=True)
    assert np.array_equal(p.mean, mean) and np.array_equal(p.rstd(), rstd)
    p = cynorm.partial_stats(x, "group", num_groups=2)
    _, mean, rstd = cynorm.group_norm(x, 2, return_stats=True)
    assert np.array_equal(p.mean, mean) and np.array_equal(p.rstd(), rstd)
    p = cynorm.partial_stats(x, "layer", normalized_ndim=2)
    _, mean, rstd = cynorm.layer_norm(x, (70, 9), return_stats=True)
    assert np.array_equal(p.mean, mean) and np.array_equal(p.rstd(), rstd)


# ---- bad input --------------------------------------------------------------------------

def test_building_blocks_reject_bad_arguments_by_name():
    x = data((2, 3, 4), np.float64)
    with pytest.raises(ValueError, match="sets must be one of"):
        cynorm.partial_stats(x, "batchnorm")
    with pytest.raises(TypeError, match="num_groups"):
        cynorm.partial_stats(x, "group")
    with pytest.raises(ValueError, match="num_groups"):
        cynorm.partial_stats(x, "group", num_groups=2)
    with pytest.raises(TypeError, match="normalized_ndim"):
        cynorm.partial_stats(x, "layer")
    with pytest.raises(TypeError, match="normalized_ndim"):
        cynorm.partial_stats(x, "batch", normalized_ndim=1)
    with pytest.raises(ValueError, match="normalized_ndim"):
        cynorm.partial_stats(x, "rms", normalized_ndim=0)
    with pytest.raises(TypeError, match="x must be a float32, float64, float16 or "
                                        "bfloat16 array, got dtype int32"):
        cynorm.partial_stats(x.astype(np.int32))
    with pytest.raises(TypeError, match="x must be a float32, float64, float16 or "
                                        "bfloat16 array, got dtype complex64"):
        cynorm.apply_stats(x.astype(np.complex64), np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="dy must be a float32, float64, float16 or "
                                        "bfloat16 array, got dtype int16"):
        cynorm.batch_norm_backward_reduce(x.astype(np.int16), x, np.zeros(3))
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        cynorm.batch_norm_backward_apply(x.astype(np.float16), x, np.zeros(3), np.ones(3),
                                         np.zeros(3), np.zeros(3), 8)
    with pytest.raises(ValueError, match="stats"):
        cynorm.partial_stats(x, stats="three_pass")
    with pytest.raises(ValueError, match="parts must hold at least one"):
        cynorm.merge_stats([])
    with pytest.raises(ValueError, match="parts must have shape"):
        cynorm.merge_stats(np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="parts must be"):
        cynorm.merge_stats([cynorm.partial_stats(x), cynorm.partial_stats(x[:, :2])])
    with pytest.raises(TypeError, match="parts must be a sequence"):
        cynorm.merge_stats(3)
    mean, rstd = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="mean must have shape"):
        cynorm.apply_stats(x, np.zeros(2), rstd)
    with pytest.raises(ValueError, match="weight must have shape"):
        cynorm.apply_stats(x, mean, rstd, np.ones(4))
    with pytest.raises(TypeError, match="mean=None"):
        cynorm.apply_stats(x, mean[:2], rstd[:2], sets="rms", normalized_ndim=1)
    with pytest.raises(ValueError, match="out"):
        cynorm.apply_stats(x, mean, rstd, out=np.empty((2, 3)))
    with pytest.raises(ValueError, match="dy must have the shape"):
        cynorm.batch_norm_backward_reduce(x[:1], x, mean)
    with pytest.raises(TypeError, match="dy must have the dtype"):
        cynorm.batch_norm_backward_reduce(x.astype(np.float32), x, mean)
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="count"):
            cynorm.batch_norm_backward_apply(x, x, mean, rstd, mean, mean, bad)
    with pytest.raises(TypeError, match="count"):
        cynorm.batch_norm_backward_apply(x, x, mean, rstd, mean, mean, "8")
    with pytest.raises(ValueError, match="sum_dy_xmu must have shape"):
        cynorm.batch_norm_backward_apply(x, x, mean, rstd, mean, mean[:2], 8)


# ---- float16 and bfloat16 ----------------------------------------------------------------

from lowp_reference import LOWP, assert_within_one_ulp, wide  # noqa: E402


def _broadcast_stats(x, sets, kw, mean, rstd):
    """The per-set statistics broadcast over x (float64)."""
    nd = kw.get("normalized_ndim")
    if sets == "batch":
        bc = (1, -1) + (1,) * (x.ndim - 2)
        return mean.reshape(bc), rstd.reshape(bc)
    if sets == "group":
        G = kw["num_groups"]
        shp = x.shape[:2] + (1,) * (x.ndim - 2)
        return (np.repeat(mean, x.shape[1] // G, 1).reshape(shp),
                np.repeat(rstd, x.shape[1] // G, 1).reshape(shp))
    if sets == "instance":
        shp = x.shape[:2] + (1,) * (x.ndim - 2)
        return mean.reshape(shp), rstd.reshape(shp)
    sshape = x.shape[:x.ndim - nd]
    return (0.0 if sets == "rms" else mean.reshape(sshape + (1,) * nd),
            rstd.reshape(sshape + (1,) * nd))


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,sets,kw", CASES)
def test_16bit_partial_stats_within_their_bound_of_the_float64_moments(dt, shape, sets,
                                                                       kw, stats):
    """Welford: to float64 accuracy. Two-pass (float32 deviations over runs of 256 or
    more values, README "16-bit storage"): the mean within 1e-5 standard deviations,
    m2 within 4e-5 (relative)."""
    x = data(shape, dt)
    p = cynorm.partial_stats(x, sets, stats=stats, **kw)
    count, mean, m2 = ref_moments(wide(x), sets, *_kw_ref(kw))
    assert all(a.dtype == np.float64 for a in p)
    np.testing.assert_array_equal(p.count, count)
    if stats == "welford":
        np.testing.assert_allclose(p.mean, mean, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(p.m2, m2, rtol=1e-12)
    else:
        sd = np.sqrt(m2 / count)
        assert np.all(np.abs(p.mean - mean) <= 1e-5 * sd + 1e-13 * np.abs(mean)), "mean"
        np.testing.assert_allclose(p.m2, m2, rtol=4e-5)


@pytest.mark.parametrize("float64_affine", [None, True])
@pytest.mark.parametrize("pdt", ["same", np.float32])
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,sets,kw", CASES)
def test_16bit_apply_stats_within_one_ulp(dt, pdt, shape, sets, kw, float64_affine):
    if float64_affine and sets in ("layer", "rms"):
        return  # elementwise parameters: float64_affine does not apply
    x = data(shape, dt, seed=3)
    nd = kw.get("normalized_ndim")
    sshape = ref_sets(x, sets, *_kw_ref(kw)).shape[:-1]
    rng = np.random.default_rng(4)
    mean = rng.standard_normal(sshape) + 1.5
    rstd = rng.uniform(0.2, 2.0, sshape)
    pshape = x.shape[x.ndim - nd:] if nd else (x.shape[1],)
    pd = dt if pdt == "same" else np.dtype(pdt)
    w = (1 + 0.5 * rng.standard_normal(pshape)).astype(pd)
    b = (0.5 * rng.standard_normal(pshape)).astype(pd) if sets != "rms" else None
    y = cynorm.apply_stats(x, None if sets == "rms" else mean, rstd, w, b, sets,
                           float64_affine=float64_affine, **kw)
    m, r = _broadcast_stats(x, sets, kw, mean, rstd)
    if nd:
        wb, bb = wide(w), 0.0 if b is None else wide(b)
    else:
        bc = (1, -1) + (1,) * (x.ndim - 2)
        wb, bb = wide(w).reshape(bc), wide(b).reshape(bc)
    xhat = (wide(x) - m) * r
    assert y.dtype == dt and y.shape == x.shape
    # y = xhat * w + b: near 0 a few float32 ulps of the terms
    assert_within_one_ulp(y, xhat * wb + bb, terms=np.abs(xhat * wb) + np.abs(bb))


@pytest.mark.parametrize("wdt", [None, "same", np.float32], ids=str)
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(6, 4, 5, 7), (3, 2, 5000), (8, 3)])
def test_16bit_batch_norm_backward_blocks_split_over_parts_within_one_ulp(dt, shape, wdt):
    x = data(shape, dt, seed=5)
    dy = data(shape, dt, seed=6, loc=0.0, scale=1.0)
    C = shape[1]
    w = None if wdt is None else data(C, dt if wdt == "same" else wdt, 7, 1.0, 0.3)
    wf = np.ones(C) if w is None else wide(w)
    s = ref_sets(wide(x), "batch")
    mean, rstd = s.mean(-1), 1 / np.sqrt(s.var(-1) + 1e-5)
    parts = np.array_split(np.arange(shape[0]), 3)
    sums = [cynorm.batch_norm_backward_reduce(dy[p], x[p], mean) for p in parts]
    sum_dy = sum(a for a, _ in sums)
    sum_dy_xmu = sum(b for _, b in sums)
    g = ref_sets(wide(dy), "batch")
    xmu = s - mean[:, None]
    # float64 sums of exactly widened values
    np.testing.assert_allclose(sum_dy, g.sum(-1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum_dy_xmu, (g * xmu).sum(-1), rtol=1e-12, atol=1e-12)
    M = s.shape[1]
    xhat = xmu * rstd[:, None]
    ref = (wf * rstd)[:, None] * (
        g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    ref = np.moveaxis(ref.reshape((C, shape[0]) + shape[2:]), 0, 1)
    # dx is a difference of terms of the size of rstd * w * max|dy| (and times |xhat|)
    gmax = np.abs(g).max(-1, keepdims=True)
    terms = ((wf * rstd)[:, None] * (np.abs(g) + gmax + np.abs(xhat) * gmax))
    terms = np.moveaxis(terms.reshape((C, shape[0]) + shape[2:]), 0, 1)
    for f64 in (None, True, False):
        dx = np.concatenate([cynorm.batch_norm_backward_apply(
            dy[p], x[p], mean, rstd, sum_dy, sum_dy_xmu, M, w, float64_affine=f64)
            for p in parts])
        assert dx.dtype == dt
        assert_within_one_ulp(dx, ref, terms=terms, what=f"dx (float64_affine={f64})")


@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("shape,sets,kw", CASES)
def test_16bit_building_blocks_bitwise_identical_across_thread_counts(dt, shape, sets, kw):
    x = data(shape, dt, seed=8)
    out = []
    for n in (1, 2, 3):
        with threadpool_limits(n, user_api="openmp"):
            p = cynorm.partial_stats(x, sets, **kw)
            m = cynorm.merge_stats([p, p])
            y = cynorm.apply_stats(x, None if sets == "rms" else m.mean, m.rstd(), None,
                                   None, sets, **kw)
            res = [*p, *m, y.view(np.uint16)]
            if sets == "batch":
                sums = cynorm.batch_norm_backward_reduce(y, x, m.mean)
                res += [*sums, cynorm.batch_norm_backward_apply(
                    y, x, m.mean, m.rstd(), *sums, x.size // x.shape[1]).view(np.uint16)]
            out.append(res)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_whole_sets_give_the_ops_own_statistics_and_output_bitwise(dt):
    """A part holding whole sets: the moments are those the op computes in memory, and
    applying the op's statistics gives the op's own output."""
    def same(a, b):
        return np.array_equal(a.view(np.uint16), b.view(np.uint16))

    x = data((3, 4, 70, 9), dt)
    w, b = data(4, np.float32, 1, 1.0, 0.5), data(4, np.float32, 2, 0.0, 0.5)
    p = cynorm.partial_stats(x, "batch")
    y, mean, rstd = cynorm.batch_norm(x, weight=w, bias=b, training=True,
                                      return_stats=True)
    assert np.array_equal(p.mean, mean) and np.array_equal(p.rstd(), rstd)
    assert same(cynorm.apply_stats(x, mean, rstd, w, b), y)
    p = cynorm.partial_stats(x, "group", num_groups=2)
    y, mean, rstd = cynorm.group_norm(x, 2, w, b, return_stats=True)
    assert np.array_equal(p.mean, mean) and np.array_equal(p.rstd(), rstd)
    assert same(cynorm.apply_stats(x, mean, rstd, w, b, "group", num_groups=2), y)
    lw = data((70, 9), np.float32, 3, 1.0, 0.5)
    p = cynorm.partial_stats(x, "layer", normalized_ndim=2)
    y, mean, rstd = cynorm.layer_norm(x, (70, 9), lw, return_stats=True)
    assert np.array_equal(p.mean, mean) and np.array_equal(p.rstd(), rstd)
    assert same(cynorm.apply_stats(x, mean, rstd, lw, None, "layer", normalized_ndim=2),
                y)
    # short runs: batch_norm's column path, its float32 affine from the op's statistics
    xs = data((40, 6, 3), dt)
    y, mean, rstd = cynorm.batch_norm(xs, weight=w[:1].repeat(6), training=True,
                                      return_stats=True)
    assert same(cynorm.apply_stats(xs, mean, rstd, w[:1].repeat(6)), y)
