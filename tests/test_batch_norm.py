"""batch_norm / batch_norm_backward (torch.nn.functional.batch_norm semantics): batch
statistics and in-place running-stat updates in training, running stats in eval."""
import numpy as np
import pytest

import cynorm
import reference as ref
from reference import assert_close

SHAPES = [(8, 3), (4, 5, 7), (3, 4, 5, 6), (2, 3, 3, 4, 5), (5, 1, 3), (4, 6, 1, 1),
          (1, 3, 5), (3, 7, 9, 11), (2, 2, 64, 64)]

STAT_TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


def make(rng, shape, dtype, affine=True, loc=0.0, scale=1.0):
    C = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    return x, w, b


def running(rng, C, dtype):
    return (rng.standard_normal(C).astype(dtype),
            rng.uniform(0.5, 2.0, C).astype(dtype))


# ---- training forward ------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_training_matches_reference(rng, dtype, shape, affine):
    x, w, b = make(rng, shape, dtype, affine, loc=0.7, scale=1.3)
    rm, rv = running(rng, shape[1], dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2,
                                      eps=1e-4, return_stats=True)
    y_ref, mean_ref, rstd_ref, rm_ref, rv_ref = ref.batch_norm(
        x, rm0, rv0, w, b, training=True, momentum=0.2, eps=1e-4)
    assert y.dtype == dtype and y.shape == shape
    assert mean.dtype == np.float64 and mean.shape == (shape[1],)
    assert rstd.dtype == np.float64 and rstd.shape == (shape[1],)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)
    # running stats updated in place, in their own dtype, unbiased variance
    assert rm.dtype == dtype and rv.dtype == dtype
    np.testing.assert_allclose(rm, rm_ref, rtol=STAT_TOL[dtype], atol=STAT_TOL[dtype])
    np.testing.assert_allclose(rv, rv_ref, rtol=STAT_TOL[dtype], atol=STAT_TOL[dtype])


def test_batch_norm_training_without_running_stats(rng, dtype):
    x, w, b = make(rng, (4, 3, 5), dtype)
    y, mean, rstd = cynorm.batch_norm(x, None, None, w, b, training=True, return_stats=True)
    y_ref, mean_ref, rstd_ref, _, _ = ref.batch_norm(x, None, None, w, b, training=True)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


def test_batch_norm_float64_running_stats_with_float32_x(rng):
    x, w, b = make(rng, (6, 4, 3, 3), np.float32)
    rm, rv = running(rng, 4, np.float64)
    rm0, rv0 = rm.copy(), rv.copy()
    y = cynorm.batch_norm(x, rm, rv, w, b, training=True)
    y_ref, _, _, rm_ref, rv_ref = ref.batch_norm(x, rm0, rv0, w, b, training=True)
    assert y.dtype == np.float32 and rm.dtype == np.float64
    assert_close(y, y_ref, np.float32)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-12)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.5])
def test_batch_norm_momentum_extremes(rng, momentum):
    x, w, b = make(rng, (5, 3, 4), np.float64)
    rm, rv = running(rng, 3, np.float64)
    rm0, rv0 = rm.copy(), rv.copy()
    cynorm.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum)
    _, _, _, rm_ref, rv_ref = ref.batch_norm(x, rm0, rv0, w, b, training=True,
                                             momentum=momentum)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-12, atol=1e-14)
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
    if momentum == 1.0:
        xc = np.moveaxis(x, 1, 0).reshape(3, -1)
        np.testing.assert_allclose(rv, xc.var(axis=1, ddof=1), rtol=1e-12)


def test_batch_norm_running_stats_over_several_steps_match_reference(rng, dtype):
    C = 5
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm_ref, rv_ref = np.zeros(C), np.ones(C)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    for step in range(6):
        x = (step + rng.standard_normal((4, C, 3, 2)) * (1 + step)).astype(dtype)
        y = cynorm.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
        y_ref, _, _, rm_ref, rv_ref = ref.batch_norm(x, rm_ref, rv_ref, w, b,
                                                     training=True, momentum=0.3)
        assert_close(y, y_ref, dtype)
    tol = 10 * STAT_TOL[dtype]
    np.testing.assert_allclose(rm, rm_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, rv_ref, rtol=tol, atol=tol)
    # and eval with the accumulated statistics
    x = rng.standard_normal((3, C, 4)).astype(dtype)
    y = cynorm.batch_norm(x, rm, rv, w, b, training=False)
    assert_close(y, ref.batch_norm(x, rm, rv, w, b, training=False)[0], dtype)


def test_batch_norm_running_stats_over_several_steps_match_torch(rng, dtype):
    torch = pytest.importorskip("torch")
    C = 4
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    tol = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-11}[dtype]
    for step in range(5):
        x = (2.0 * step + rng.standard_normal((3, C, 5, 4))).astype(dtype)
        y = cynorm.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        ty = torch.nn.functional.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w),
                                            torch.tensor(b), training=True, momentum=0.1,
                                            eps=1e-5)
        np.testing.assert_allclose(y, ty.numpy(), rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=tol, atol=tol)
    x = rng.standard_normal((2, C, 3)).astype(dtype)
    y = cynorm.batch_norm(x, rm, rv, w, b, training=False)
    ty = torch.nn.functional.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w),
                                        torch.tensor(b), training=False)
    np.testing.assert_allclose(y, ty.numpy(), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 2, 64, 64), (64, 3)])
def test_batch_norm_stats_algorithms_match_reference(rng, dtype, stats, shape):
    x, w, b = make(rng, shape, dtype, loc=-3.0, scale=2.0)
    y, mean, rstd = cynorm.batch_norm(x, None, None, w, b, training=True, stats=stats,
                                      return_stats=True)
    y_ref, mean_ref, rstd_ref, _, _ = ref.batch_norm(x, None, None, w, b, training=True)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


@pytest.mark.parametrize("shape", [(1, 3), (1, 4, 1), (1, 2, 1, 1), (1, 2, 1, 1, 1)])
def test_batch_norm_training_with_one_value_per_channel_raises(dtype, shape):
    x = np.ones(shape, dtype=dtype)
    with pytest.raises(ValueError):
        cynorm.batch_norm(x, training=True)
    # eval mode is fine with a single value
    C = shape[1]
    y = cynorm.batch_norm(x, np.zeros(C, dtype), np.ones(C, dtype), training=False,
                          eps=0.0)
    np.testing.assert_array_equal(y, x)


def test_batch_norm_large_mean_float32_keeps_precision(rng):
    for shape in [(8, 3, 16, 16), (2, 2, 64, 64), (256, 4)]:
        x, w, b = make(rng, shape, np.float32, loc=1e4, scale=1.0)
        y_ref = ref.batch_norm(x, None, None, w, b, training=True)[0]
        for stats in ("two_pass", "welford"):
            y = cynorm.batch_norm(x, None, None, w, b, training=True, stats=stats)
            np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)


# ---- eval forward ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_eval_matches_reference(rng, dtype, shape):
    x, w, b = make(rng, shape, dtype)
    rm, rv = running(rng, shape[1], dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3,
                                      return_stats=True)
    y_ref, mean_ref, rstd_ref, _, _ = ref.batch_norm(x, rm0, rv0, w, b, training=False,
                                                     eps=1e-3)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-7 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-7 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(rm, rm0)  # eval never touches the running stats
    np.testing.assert_array_equal(rv, rv0)


def test_batch_norm_default_is_eval(rng):
    x, w, b = make(rng, (4, 3, 5), np.float64)
    rm, rv = running(rng, 3, np.float64)
    y = cynorm.batch_norm(x, rm, rv, w, b)
    assert_close(y, ref.batch_norm(x, rm, rv, w, b, training=False)[0], np.float64)


def test_batch_norm_empty_batch_eval(dtype):
    x = np.zeros((0, 3, 4), dtype=dtype)
    y, mean, rstd = cynorm.batch_norm(x, np.zeros(3, dtype), np.ones(3, dtype),
                                      training=False, return_stats=True)
    assert y.shape == x.shape and mean.shape == (3,) and rstd.shape == (3,)
    junk = np.full(3, 1e30, dtype=dtype)  # recycled heap block: sums over an empty
    del junk                              # batch must be written as zeros
    dx, dw, db = cynorm.batch_norm_backward(x, x, mean, rstd, training=False)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(3))
    np.testing.assert_array_equal(db, np.zeros(3))


def test_batch_norm_empty_batch_training_leaves_running_stats(dtype):
    # as torch: nothing to average, so the running statistics stay as they were
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y = cynorm.batch_norm(np.zeros((0, 3, 2), dtype), rm, rv, training=True)
    assert y.shape == (0, 3, 2)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_batch_norm_weight_none(rng, dtype):
    x, _, _ = make(rng, (4, 3, 5), dtype)
    y = cynorm.batch_norm(x, training=True)
    assert_close(y, ref.batch_norm(x, training=True)[0], dtype)
    y1 = cynorm.batch_norm(x, None, None, np.ones(3, dtype), np.zeros(3, dtype),
                           training=True)
    assert_close(y, y1.astype(np.float64), dtype)


# ---- out=, layouts, NaN ----------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_out_and_in_place(rng, dtype, training):
    x, w, b = make(rng, (4, 3, 5, 2), dtype)
    rm, rv = running(rng, 3, dtype)
    y = cynorm.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)
    out = np.full_like(x, np.nan)
    assert cynorm.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training,
                             out=out) is out
    np.testing.assert_array_equal(out, y)
    xi = x.copy()
    rmi, rvi = rm.copy(), rv.copy()
    assert cynorm.batch_norm(xi, rmi, rvi, w, b, training=training, out=xi) is xi
    np.testing.assert_array_equal(xi, y)
    if training:  # running stats come from x before it was overwritten
        rm2, rv2 = rm.copy(), rv.copy()
        cynorm.batch_norm(x, rm2, rv2, w, b, training=True)
        np.testing.assert_array_equal(rmi, rm2)
        np.testing.assert_array_equal(rvi, rv2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["dy", "x"])
def test_batch_norm_backward_out_in_place(rng, dtype, training, which):
    x, w, b = make(rng, (4, 3, 5, 2), dtype)
    rm, rv = running(rng, 3, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, training=training,
                                      return_stats=True)
    expected = cynorm.batch_norm_backward(dy, x, mean, rstd, w, training=training)
    dy2, x2 = dy.copy(), x.copy()
    target = dy2 if which == "dy" else x2
    r = cynorm.batch_norm_backward(dy2, x2, mean, rstd, w, training=training, out=target)
    assert r[0] is target
    for a, e in zip(r, expected):
        np.testing.assert_array_equal(a, e)


def test_batch_norm_non_contiguous_matches_contiguous(rng, dtype):
    x, w, b = make(rng, (4, 3, 5, 6), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mean, rstd = cynorm.batch_norm(x, None, None, w, b, training=True,
                                      return_stats=True)
    grads = cynorm.batch_norm_backward(dy, x, mean, rstd, w)
    for xv, dyv in [(np.asfortranarray(x), np.asfortranarray(dy)),
                    (np.repeat(x, 2, axis=3)[..., ::2], np.repeat(dy, 2, axis=0)[::2])]:
        assert not xv.flags.c_contiguous and not dyv.flags.c_contiguous
        y2, mean2, rstd2 = cynorm.batch_norm(xv, None, None, w, b, training=True,
                                             return_stats=True)
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(mean2, mean)
        np.testing.assert_array_equal(rstd2, rstd)
        for a, e in zip(cynorm.batch_norm_backward(dyv, xv, mean2, rstd2, w), grads):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_batch_norm_non_finite_stays_in_its_channel(rng, dtype, bad):
    x, w, b = make(rng, (4, 3, 5), dtype)
    x[2, 1, 3] = bad
    rm, rv = running(rng, 3, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y = cynorm.batch_norm(x, rm, rv, w, b, training=True)
    assert np.isnan(y[:, 1]).all()
    ok = [0, 2]
    assert np.isfinite(y[:, ok]).all()
    y_ref, _, _, rm_ref, rv_ref = ref.batch_norm(x[:, ok], rm0[ok], rv0[ok], w[ok], b[ok],
                                                 training=True)
    assert_close(y[:, ok], y_ref, dtype)
    assert not np.isfinite(rm[1]) or not np.isfinite(rv[1])
    np.testing.assert_allclose(rm[ok], rm_ref, rtol=STAT_TOL[dtype], atol=STAT_TOL[dtype])


# ---- backward --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_backward_matches_reference(rng, dtype, shape, training, affine):
    x, w, b = make(rng, shape, dtype, affine)
    rm, rv = running(rng, shape[1], np.float64)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, rstd, _, _ = ref.batch_norm(x, rm, rv, w, b, training=training)
    dx, dw, db = cynorm.batch_norm_backward(dy, x, mean, rstd, w, training=training)
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy, x, mean, rstd, w, training)
    assert dx.dtype == dtype and dw.shape == (shape[1],) and db.shape == (shape[1],)
    assert dw.dtype == dtype and db.dtype == dtype
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")
    assert_close(db, db_ref, dtype, "backward")


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4), (2, 3, 2, 2), (2, 2, 1, 2, 2)])
def test_batch_norm_training_gradients_match_finite_differences(rng, shape):
    x, w, b = make(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    num = ref.numerical_grads(
        lambda x_, w_, b_: cynorm.batch_norm(x_, None, None, w_, b_, training=True),
        [x, w, b], dy)
    _, mean, rstd = cynorm.batch_norm(x, None, None, w, b, training=True,
                                      return_stats=True)
    for a, e in zip(cynorm.batch_norm_backward(dy, x, mean, rstd, w, training=True), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2)])
def test_batch_norm_eval_gradients_match_finite_differences(rng, shape):
    x, w, b = make(rng, shape, np.float64)
    rm, rv = running(rng, shape[1], np.float64)
    dy = rng.standard_normal(shape)
    num = ref.numerical_grads(
        lambda x_, w_, b_: cynorm.batch_norm(x_, rm, rv, w_, b_, training=False),
        [x, w, b], dy)
    _, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, training=False, return_stats=True)
    for a, e in zip(cynorm.batch_norm_backward(dy, x, mean, rstd, w, training=False), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_reference_backward_matches_finite_differences(rng, training):
    x, w, b = make(rng, (3, 2, 4), np.float64)
    rm, rv = running(rng, 2, np.float64)
    dy = rng.standard_normal(x.shape)
    num = ref.numerical_grads(
        lambda x_, w_, b_: ref.batch_norm(x_, rm, rv, w_, b_, training=training)[0],
        [x, w, b], dy)
    _, mean, rstd, _, _ = ref.batch_norm(x, rm, rv, w, b, training=training)
    for a, e in zip(ref.batch_norm_backward(dy, x, mean, rstd, w, training), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 4), (4, 3, 10), (3, 4, 6, 5), (2, 3, 2, 3, 4),
                                   (2, 2, 32, 32)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_matches_torch_forward_and_backward(rng, dtype, shape, training):
    torch = pytest.importorskip("torch")
    x, w, b = make(rng, shape, dtype)
    rm, rv = running(rng, shape[1], dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=training,
                                        momentum=0.1, eps=1e-5)
    ty.backward(torch.tensor(dy))
    y, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1,
                                      eps=1e-5, return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(dy, x, mean, rstd, w, training=training)
    tol = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}[dtype]
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=tol, atol=tol)
    for a, t in [(dx, tx.grad), (dw, tw.grad), (db, tb.grad)]:
        t = t.numpy()
        np.testing.assert_allclose(a, t, rtol=tol, atol=tol * max(1, np.abs(t).max()))


@pytest.mark.parametrize("shape", [(64, 6, 7, 7), (200, 5, 3, 3), (300, 7)],
                         ids=["7x7", "3x3_blocks", "features"])
def test_short_run_statistics_are_float64_accurate_on_offset_data(rng, dtype, shape):
    """Short runs (the column path's one-pass sums about each channel's first value,
    with the two-pass algorithm where that would not be as exact): offset data, a
    channel whose first value is an outlier, a near-constant channel, a constant one;
    the statistics to float64 accuracy, y close to the float64 reference."""
    x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    x.reshape(shape[0], shape[1], -1)[0, 0, 0] = 1e4 + 3e3   # an outlier first value
    x[:, 1] = (1e4 + 1e-2 * rng.standard_normal(x[:, 1].shape)).astype(dtype)
    x[:, 2] = -7.25                                          # constant
    x[:, 3] += 300                                           # another offset
    y, mean, rstd = cynorm.batch_norm(x, training=True, return_stats=True, eps=1e-5)
    xs = np.moveaxis(x.astype(np.float64), 1, 0).reshape(shape[1], -1)
    mean_ref = xs.mean(axis=1)
    var_ref = ((xs - mean_ref[:, None]) ** 2).mean(axis=1)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-13)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(var_ref + 1e-5), rtol=1e-10)
    yd = (x.astype(np.float64) - mean_ref.reshape((1, -1) + (1,) * (x.ndim - 2))) \
        / np.sqrt(var_ref + 1e-5).reshape((1, -1) + (1,) * (x.ndim - 2))
    tol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, yd, rtol=tol, atol=tol * np.abs(yd).max())
