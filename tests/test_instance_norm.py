"""instance_norm / instance_norm_backward: each (sample, channel) normalised over its
spatial elements; against the reference, finite differences, torch, group_norm(G=C)."""
import numpy as np
import pytest

import cynorm
import reference as ref
from reference import assert_close

SHAPES = [(4, 6), (3, 5, 7), (2, 4, 6, 5), (2, 3, 3, 4, 5), (3, 4, 1, 1), (2, 3, 1),
          (1, 3, 67, 71), (5, 1, 9)]


def make(rng, shape, dtype, affine=True, loc=0.0, scale=1.0):
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    C = shape[1]
    w = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_instance_norm_forward_matches_reference(rng, dtype, shape, affine):
    x, w, b = make(rng, shape, dtype, affine, loc=1.5)
    y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, eps=1e-4, return_stats=True)
    y_ref, mean_ref, rstd_ref = ref.instance_norm(x, w, b, eps=1e-4)
    assert y.dtype == dtype and y.shape == shape
    assert mean.shape == shape[:2] and rstd.shape == shape[:2]
    assert mean.dtype == np.float64 and rstd.dtype == np.float64
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


def test_instance_norm_spatial_size_one_gives_bias(rng, dtype):
    # one element per set: x - mean = 0, so y = bias exactly and rstd = 1/sqrt(eps)
    x, w, b = make(rng, (3, 4, 1, 1), dtype)
    y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, eps=1e-2, return_stats=True)
    np.testing.assert_array_equal(y, np.broadcast_to(b.reshape(1, 4, 1, 1), y.shape))
    np.testing.assert_allclose(rstd, 10.0, rtol=1e-12)


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
def test_instance_norm_stats_algorithms_match_reference(rng, dtype, stats):
    x, w, b = make(rng, (2, 3, 50, 50), dtype, loc=-7.0, scale=3.0)
    y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True, stats=stats)
    y_ref, mean_ref, rstd_ref = ref.instance_norm(x, w, b)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (3, 5)])
def test_instance_norm_equals_group_norm_with_one_channel_per_group(rng, dtype, shape):
    x, w, b = make(rng, shape, dtype)
    y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
    y_g, mean_g, rstd_g = cynorm.group_norm(x, shape[1], w, b, return_stats=True)
    assert_close(y, y_g.astype(np.float64), dtype)
    np.testing.assert_allclose(mean, mean_g, rtol=1e-12)
    np.testing.assert_allclose(rstd, rstd_g, rtol=1e-12)


def test_instance_norm_empty_batch(dtype):
    x = np.zeros((0, 3, 4), dtype=dtype)
    y, mean, rstd = cynorm.instance_norm(x, return_stats=True)
    assert y.shape == x.shape and mean.shape == (0, 3) and rstd.shape == (0, 3)
    junk = np.full(3, 1e30, dtype=dtype)  # recycled heap block: sums over an empty
    del junk                              # batch must be written as zeros
    dx, dw, db = cynorm.instance_norm_backward(x, x, mean, rstd)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(3))
    np.testing.assert_array_equal(db, np.zeros(3))


def test_instance_norm_large_mean_float32_keeps_precision(rng):
    x, w, b = make(rng, (2, 4, 32, 32), np.float32, loc=1e4, scale=1.0)
    y_ref = ref.instance_norm(x, w, b)[0]
    for stats in ("two_pass", "welford"):
        y = cynorm.instance_norm(x, weight=w, bias=b, stats=stats)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)


def test_instance_norm_weight_none(rng, dtype):
    x, _, _ = make(rng, (2, 3, 4, 4), dtype)
    assert_close(cynorm.instance_norm(x), ref.instance_norm(x)[0], dtype)
    y1 = cynorm.instance_norm(x, weight=np.ones(3, dtype), bias=np.zeros(3, dtype))
    assert_close(cynorm.instance_norm(x), y1.astype(np.float64), dtype)


def test_instance_norm_out_and_in_place(rng, dtype):
    x, w, b = make(rng, (3, 4, 5, 6), dtype)
    y = cynorm.instance_norm(x, weight=w, bias=b)
    out = np.empty_like(x)
    assert cynorm.instance_norm(x, weight=w, bias=b, out=out) is out
    np.testing.assert_array_equal(out, y)
    xi = x.copy()
    assert cynorm.instance_norm(xi, weight=w, bias=b, out=xi) is xi
    np.testing.assert_array_equal(xi, y)


@pytest.mark.parametrize("which", ["dy", "x"])
def test_instance_norm_backward_out_in_place(rng, dtype, which):
    x, w, b = make(rng, (3, 4, 5, 6), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
    dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, w)
    dy2, x2 = dy.copy(), x.copy()
    target = dy2 if which == "dy" else x2
    r = cynorm.instance_norm_backward(dy2, x2, mean, rstd, w, out=target)
    assert r[0] is target
    for a, e in zip(r, (dx, dw, db)):
        np.testing.assert_array_equal(a, e)


def test_instance_norm_non_contiguous_matches_contiguous(rng, dtype):
    x, w, b = make(rng, (3, 4, 5, 6), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
    dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, w)
    for xv, dyv in [(np.asfortranarray(x), np.asfortranarray(dy)),
                    (np.repeat(x, 2, axis=2)[:, :, ::2], np.repeat(dy, 2, axis=3)[..., ::2])]:
        assert not xv.flags.c_contiguous and not dyv.flags.c_contiguous
        y2, mean2, rstd2 = cynorm.instance_norm(xv, weight=w, bias=b, return_stats=True)
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(mean2, mean)
        for a, e in zip(cynorm.instance_norm_backward(dyv, xv, mean2, rstd2, w),
                        (dx, dw, db)):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_instance_norm_non_finite_stays_in_its_channel(rng, dtype, bad):
    x, w, b = make(rng, (2, 3, 4, 4), dtype)
    x[0, 1, 2, 3] = bad
    y = cynorm.instance_norm(x, weight=w, bias=b)
    assert np.isnan(y[0, 1]).all()
    mask = np.ones(x.shape, dtype=bool)
    mask[0, 1] = False
    assert np.isfinite(y[mask]).all()
    clean = x.copy()
    clean[0, 1] = 0
    assert_close(y[mask], ref.instance_norm(clean, w, b)[0][mask], dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_instance_norm_backward_matches_reference(rng, dtype, shape, affine):
    x, w, b = make(rng, shape, dtype, affine)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, rstd = ref.instance_norm(x, w, b)
    dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, w)
    dx_ref, dw_ref, db_ref = ref.instance_norm_backward(dy, x, mean, rstd, w)
    assert dx.dtype == dtype and dw.shape == (shape[1],) and db.shape == (shape[1],)
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")
    assert_close(db, db_ref, dtype, "backward")


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 2, 2, 3), (3, 2, 1, 2, 2)])
def test_instance_norm_gradients_match_finite_differences(rng, shape):
    x, w, b = make(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    num = ref.numerical_grads(lambda x_, w_, b_: cynorm.instance_norm(x_, weight=w_, bias=b_),
                              [x, w, b], dy)
    _, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
    for a, e in zip(cynorm.instance_norm_backward(dy, x, mean, rstd, w), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 3, 10), (2, 4, 7, 5), (2, 3, 3, 4, 5), (1, 2, 40, 40)])
def test_instance_norm_matches_torch_forward_and_backward(rng, dtype, shape):
    torch = pytest.importorskip("torch")
    x, w, b = make(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.instance_norm(tx, weight=tw, bias=tb, use_input_stats=True,
                                           eps=1e-5)
    ty.backward(torch.tensor(dy))
    y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, eps=1e-5, return_stats=True)
    dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, w)
    tol = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}[dtype]
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
    for a, t in [(dx, tx.grad), (dw, tw.grad), (db, tb.grad)]:
        t = t.numpy()
        np.testing.assert_allclose(a, t, rtol=tol, atol=tol * max(1, np.abs(t).max()))


# ---- torch's signature: running statistics, use_input_stats, momentum ----------------------

def _instance_stats(x):
    """Per-(n, c) mean and unbiased variance over the spatial elements, float64."""
    flat = x.astype(np.float64).reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(axis=2), flat.var(axis=2, ddof=1)


def test_instance_norm_positional_order_is_torchs(rng):
    """instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
    eps): the second and third positional arguments are the running statistics, never
    the affine parameters."""
    x, w, b = make(rng, (3, 4, 6), np.float64, loc=2.0)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    y = cynorm.instance_norm(x, rm.copy(), rv.copy(), w, b, False, 0.1, 1e-3)
    expected = ((x - rm[None, :, None]) / np.sqrt(rv[None, :, None] + 1e-3)
                * w[None, :, None] + b[None, :, None])
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    # with input statistics the positional weight and bias are those of the reference
    y = cynorm.instance_norm(x, None, None, w, b, True, 0.1, 1e-3)
    np.testing.assert_allclose(y, ref.instance_norm(x, w, b, eps=1e-3)[0], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 3, 4, 5), (1, 2, 7)])
def test_instance_norm_updates_running_stats_as_torch_defines(rng, dtype, shape):
    """r = (1 - m) r + m * (batch mean of per-instance statistics), unbiased variance."""
    C = shape[1]
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    exp_m, exp_v = rm.astype(np.float64), rv.astype(np.float64)
    for step in range(3):
        x, w, b = make(rng, shape, dtype, loc=step - 1.0, scale=1.0 + step)
        y = cynorm.instance_norm(x, rm, rv, w, b, momentum=0.25, eps=1e-4)
        mean, var = _instance_stats(x)
        exp_m = 0.75 * exp_m + 0.25 * mean.mean(axis=0)
        exp_v = 0.75 * exp_v + 0.25 * var.mean(axis=0)
        tol = 1e-6 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(rm, exp_m, rtol=tol, atol=tol)
        np.testing.assert_allclose(rv, exp_v, rtol=tol, atol=tol)
        assert rm.dtype == dtype and rv.dtype == dtype
        # the output still uses the per-instance statistics
        assert_close(y, ref.instance_norm(x, w, b, eps=1e-4)[0], dtype)


def test_instance_norm_with_running_stats_normalises_every_sample_with_them(rng, dtype):
    x, w, b = make(rng, (3, 4, 2, 5), dtype, loc=1.0)
    rm = rng.standard_normal(4).astype(dtype)
    rv = rng.uniform(0.5, 2.0, 4).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    # momentum is not used here: any value is accepted, the statistics do not change
    y, mean, rstd = cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False,
                                         momentum=7.0, eps=1e-3, return_stats=True)
    c = (slice(None), None, None)
    expected = ((x.astype(np.float64) - rm.astype(np.float64)[c])
                / np.sqrt(rv.astype(np.float64)[c] + 1e-3) * w.astype(np.float64)[c]
                + b.astype(np.float64)[c])
    assert_close(y, expected, dtype)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert mean.shape == (4,) and rstd.shape == (4,)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(rv.astype(np.float64) + 1e-3), rtol=1e-14)
    # one spatial element is fine with running statistics (nothing is estimated)
    assert cynorm.instance_norm(x[:, :, :1, :1], rm, rv, use_input_stats=False).shape == \
        (3, 4, 1, 1)


def test_instance_norm_backward_with_running_stats_treats_them_as_constants(rng):
    x, w, b = make(rng, (2, 3, 4), np.float64)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    dy = rng.standard_normal(x.shape)
    y, mean, rstd = cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False,
                                         return_stats=True)
    dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats=False)
    c = (slice(None), None)
    np.testing.assert_allclose(dx, dy * (w / np.sqrt(rv + 1e-5))[c], rtol=1e-12)
    np.testing.assert_allclose(dw, (dy * (x - rm[c]) / np.sqrt(rv + 1e-5)[c]).sum(axis=(0, 2)),
                               rtol=1e-12)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-12)
    num = ref.numerical_grads(
        lambda x_, w_, b_: cynorm.instance_norm(x_, rm, rv, w_, b_, use_input_stats=False),
        [x, w, b], dy)
    for a, e in zip((dx, dw, db), num):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 3, 10), (2, 4, 7, 5), (1, 2, 6)])
def test_instance_norm_running_stats_match_torch_over_steps(rng, dtype, shape):
    """Training steps update the running statistics as torch does; then an eval step
    (use_input_stats=False) normalises with them; forward and backward match torch."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    C = shape[1]
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    tol = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}[dtype]
    for step, train in enumerate([True, True, True, False]):
        x, w, b = make(rng, shape, dtype, loc=step * 0.5, scale=1.0 + step)
        dy = rng.standard_normal(shape).astype(dtype)
        tx = torch.tensor(x, requires_grad=True)
        tw = torch.tensor(w, requires_grad=True)
        tb = torch.tensor(b, requires_grad=True)
        ty = F.instance_norm(tx, trm, trv, tw, tb, train, 0.2, 1e-4)
        ty.backward(torch.tensor(dy))
        y, mean, rstd = cynorm.instance_norm(x, rm, rv, w, b, train, 0.2, 1e-4,
                                             return_stats=True)
        dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, w, train)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(rm, trm.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(rv, trv.numpy(), rtol=tol, atol=tol)
        for a, t in [(dx, tx.grad), (dw, tw.grad), (db, tb.grad)]:
            t = t.numpy()
            np.testing.assert_allclose(a, t, rtol=tol, atol=tol * max(1, np.abs(t).max()))


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0)])
def test_instance_norm_empty_batch_leaves_running_stats_alone(shape):
    x = np.zeros(shape)
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    y = cynorm.instance_norm(x, rm, rv)
    assert y.shape == shape
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)


def test_instance_norm_running_stats_need_more_than_one_spatial_element(rng):
    x = rng.standard_normal((3, 4, 1))
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(ValueError, match="spatial"):
        cynorm.instance_norm(x, rm, rv)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
