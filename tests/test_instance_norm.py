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
