"""layer_norm / layer_norm_backward (transformer / torch style): each row over the
trailing normalized_shape dims, elementwise affine."""
import numpy as np
import pytest

import cynorm
import reference as ref
from reference import assert_close

# (x shape, normalized_shape)
CASES = [
    ((5, 8), 8),
    ((3, 4, 6), 6),
    ((3, 4, 6), (4, 6)),
    ((2, 3, 4, 5), (5,)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((7, 1), 1),
    ((4, 13), [13]),
    ((1, 3000), 3000),
    ((2, 3, 4097), 4097),  # a row just over a chunk
    ((4100, 6), 6),  # backward: accumulation blocks of several 32-row sub-blocks
    ((40, 1030), 1030),  # backward: two column tiles, two row blocks
    ((6,), 6),  # one row, stats of shape ()
]
IDS = [f"{'x'.join(map(str, s))}-ns{ns}" for s, ns in CASES]


def ns_tuple(ns):
    return (ns,) if isinstance(ns, int) else tuple(ns)


def make(rng, shape, ns, dtype, affine=True, loc=0.0, scale=1.0):
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    nst = ns_tuple(ns)
    w = rng.uniform(0.5, 1.5, nst).astype(dtype) if affine else None
    b = rng.standard_normal(nst).astype(dtype) if affine else None
    return x, w, b


def lead(shape, ns):
    return shape[:len(shape) - len(ns_tuple(ns))]


@pytest.mark.parametrize("shape,ns", CASES, ids=IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_forward_matches_reference(rng, dtype, shape, ns, affine):
    x, w, b = make(rng, shape, ns, dtype, affine, loc=0.5, scale=2.0)
    y, mean, rstd = cynorm.layer_norm(x, ns, w, b, eps=1e-4, return_stats=True)
    y_ref, mean_ref, rstd_ref = ref.layer_norm(x, ns, w, b, eps=1e-4)
    assert y.dtype == dtype and y.shape == shape
    assert mean.dtype == np.float64 and rstd.dtype == np.float64
    assert mean.shape == lead(shape, ns) and rstd.shape == lead(shape, ns)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


def test_layer_norm_normalized_shape_int_tuple_list_agree(rng, dtype):
    x, w, b = make(rng, (3, 5, 7), 7, dtype)
    y_int = cynorm.layer_norm(x, 7, w, b)
    for ns in [(7,), [7], np.int64(7)]:
        np.testing.assert_array_equal(cynorm.layer_norm(x, ns, w, b), y_int)


def test_layer_norm_weight_is_elementwise(rng, dtype):
    # a weight that differs along every normalized dim: a per-row or broadcast-wrong
    # affine cannot pass
    x, w, b = make(rng, (4, 3, 5), (3, 5), dtype)
    w = np.arange(1, 16, dtype=dtype).reshape(3, 5) / 8
    b = -np.arange(15, dtype=dtype).reshape(3, 5) / 4
    y = cynorm.layer_norm(x, (3, 5), w, b)
    assert_close(y, ref.layer_norm(x, (3, 5), w, b)[0], dtype)
    assert_close(cynorm.layer_norm(x, (3, 5), w), ref.layer_norm(x, (3, 5), w)[0], dtype)
    assert_close(cynorm.layer_norm(x, (3, 5), None, b),
                 ref.layer_norm(x, (3, 5), None, b)[0], dtype)


def test_layer_norm_weight_none_equals_ones(rng, dtype):
    x, _, _ = make(rng, (4, 9), 9, dtype)
    y = cynorm.layer_norm(x, 9)
    y1 = cynorm.layer_norm(x, 9, np.ones(9, dtype), np.zeros(9, dtype))
    assert_close(y, y1.astype(np.float64), dtype)
    assert_close(y, ref.layer_norm(x, 9)[0], dtype)


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
@pytest.mark.parametrize("shape,ns", [((3, 4, 6), (4, 6)), ((2, 20000), 20000),
                                      ((300, 7), 7)])
def test_layer_norm_stats_algorithms_match_reference(rng, dtype, stats, shape, ns):
    x, w, b = make(rng, shape, ns, dtype, loc=4.0, scale=3.0)
    y, mean, rstd = cynorm.layer_norm(x, ns, w, b, return_stats=True, stats=stats)
    y_ref, mean_ref, rstd_ref = ref.layer_norm(x, ns, w, b)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


def test_layer_norm_empty_leading_dims(dtype):
    x = np.zeros((0, 3, 5), dtype=dtype)
    y, mean, rstd = cynorm.layer_norm(x, 5, return_stats=True)
    assert y.shape == x.shape and mean.shape == (0, 3) and rstd.shape == (0, 3)
    for _ in range(4):  # recycle small heap blocks holding garbage: the sums over no
        junk = np.full(5, 1e30, dtype=dtype)  # rows must be written as zeros, not left
        del junk                              # uninitialised
    dx, dw, db = cynorm.layer_norm_backward(x, x, mean, rstd, 5)
    assert dx.shape == x.shape and dw.shape == (5,) and db.shape == (5,)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_layer_norm_large_mean_float32_keeps_precision(rng):
    for shape, ns in [((16, 256), 256), ((2, 20000), 20000), ((4, 8, 8), (8, 8))]:
        x, w, b = make(rng, shape, ns, np.float32, loc=1e4, scale=1.0)
        y_ref = ref.layer_norm(x, ns, w, b)[0]
        for stats in ("two_pass", "welford"):
            y = cynorm.layer_norm(x, ns, w, b, stats=stats)
            np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)


def test_layer_norm_out_and_in_place(rng, dtype):
    x, w, b = make(rng, (4, 3, 10), 10, dtype)
    y = cynorm.layer_norm(x, 10, w, b)
    out = np.full_like(x, np.nan)
    assert cynorm.layer_norm(x, 10, w, b, out=out) is out
    np.testing.assert_array_equal(out, y)
    xi = x.copy()
    assert cynorm.layer_norm(xi, 10, w, b, out=xi) is xi
    np.testing.assert_array_equal(xi, y)


@pytest.mark.parametrize("which", ["dy", "x"])
def test_layer_norm_backward_out_in_place(rng, dtype, which):
    x, w, b = make(rng, (4, 3, 10), (3, 10), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, mean, rstd = cynorm.layer_norm(x, (3, 10), w, b, return_stats=True)
    expected = cynorm.layer_norm_backward(dy, x, mean, rstd, (3, 10), w)
    dy2, x2 = dy.copy(), x.copy()
    target = dy2 if which == "dy" else x2
    r = cynorm.layer_norm_backward(dy2, x2, mean, rstd, (3, 10), w, out=target)
    assert r[0] is target
    for a, e in zip(r, expected):
        np.testing.assert_array_equal(a, e)


def test_layer_norm_non_contiguous_matches_contiguous(rng, dtype):
    x, w, b = make(rng, (5, 4, 6), (4, 6), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mean, rstd = cynorm.layer_norm(x, (4, 6), w, b, return_stats=True)
    grads = cynorm.layer_norm_backward(dy, x, mean, rstd, (4, 6), w)
    wf = np.asfortranarray(w)  # a non-contiguous elementwise weight
    assert not wf.flags.c_contiguous
    for xv, dyv in [(np.asfortranarray(x), np.asfortranarray(dy)),
                    (np.repeat(x, 2, axis=2)[..., ::2], np.repeat(dy, 2, axis=0)[::2])]:
        assert not xv.flags.c_contiguous and not dyv.flags.c_contiguous
        y2, mean2, rstd2 = cynorm.layer_norm(xv, (4, 6), wf, b, return_stats=True)
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(mean2, mean)
        for a, e in zip(cynorm.layer_norm_backward(dyv, xv, mean2, rstd2, (4, 6), wf),
                        grads):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_layer_norm_non_finite_stays_in_its_row(rng, dtype, bad):
    x, w, b = make(rng, (5, 9), 9, dtype)
    x[3, 4] = bad
    y = cynorm.layer_norm(x, 9, w, b)
    assert np.isnan(y[3]).all()
    ok = [0, 1, 2, 4]
    assert np.isfinite(y[ok]).all()
    assert_close(y[ok], ref.layer_norm(x[ok], 9, w, b)[0], dtype)


@pytest.mark.parametrize("shape,ns", CASES, ids=IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_backward_matches_reference(rng, dtype, shape, ns, affine):
    x, w, b = make(rng, shape, ns, dtype, affine)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, rstd = ref.layer_norm(x, ns, w, b)
    dx, dw, db = cynorm.layer_norm_backward(dy, x, mean, rstd, ns, w)
    dx_ref, dw_ref, db_ref = ref.layer_norm_backward(dy, x, mean, rstd, ns, w)
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    assert dw.shape == ns_tuple(ns) and db.shape == ns_tuple(ns)
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")
    assert_close(db, db_ref, dtype, "backward")


@pytest.mark.parametrize("shape,ns", [((3, 5), 5), ((2, 3, 4), (3, 4)), ((2, 2, 3), 3),
                                      ((4,), 4)])
def test_layer_norm_gradients_match_finite_differences(rng, shape, ns):
    x, w, b = make(rng, shape, ns, np.float64)
    dy = rng.standard_normal(shape)
    num = ref.numerical_grads(lambda x_, w_, b_: cynorm.layer_norm(x_, ns, w_, b_),
                              [x, w, b], dy)
    _, mean, rstd = cynorm.layer_norm(x, ns, w, b, return_stats=True)
    for a, e in zip(cynorm.layer_norm_backward(dy, x, mean, rstd, ns, w), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_layer_norm_reference_backward_matches_finite_differences(rng):
    x, w, b = make(rng, (2, 3, 4), (3, 4), np.float64)
    dy = rng.standard_normal(x.shape)
    num = ref.numerical_grads(lambda x_, w_, b_: ref.layer_norm(x_, (3, 4), w_, b_)[0],
                              [x, w, b], dy)
    _, mean, rstd = ref.layer_norm(x, (3, 4), w, b)
    for a, e in zip(ref.layer_norm_backward(dy, x, mean, rstd, (3, 4), w), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,ns", [((8, 16), 16), ((2, 5, 12), (12,)),
                                      ((2, 3, 4, 5), (4, 5)), ((3, 5000), 5000)])
def test_layer_norm_matches_torch_forward_and_backward(rng, dtype, shape, ns):
    torch = pytest.importorskip("torch")
    x, w, b = make(rng, shape, ns, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.layer_norm(tx, ns_tuple(ns), tw, tb, eps=1e-5)
    ty.backward(torch.tensor(dy))
    y, mean, rstd = cynorm.layer_norm(x, ns, w, b, eps=1e-5, return_stats=True)
    dx, dw, db = cynorm.layer_norm_backward(dy, x, mean, rstd, ns, w)
    tol = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}[dtype]
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
    for a, t in [(dx, tx.grad), (dw, tw.grad), (db, tb.grad)]:
        t = t.numpy()
        np.testing.assert_allclose(a, t, rtol=tol, atol=tol * max(1, np.abs(t).max()))


@pytest.mark.parametrize("stats", ["two_pass", "welford"])
def test_layer_norm_constant_rows_give_bias(dtype, stats):
    x = np.full((3, 7000), 0.1, dtype=dtype)
    x[1] = -1e4
    b = np.linspace(-1, 1, 7000).astype(dtype)
    y, mean, rstd = cynorm.layer_norm(x, 7000, None, b, eps=1e-5, return_stats=True,
                                      stats=stats)
    assert_close(y, ref.layer_norm(x, 7000, None, b, eps=1e-5)[0], dtype)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(1e-5), rtol=1e-6)


# the row backward's vector body starts where dx's rows are aligned (offsets 4 and 16:
# a head taken column by column; NumPy's large arrays start 16 bytes into a page), and
# a float32 dx of 32 MiB or more is stored past the caches
@pytest.mark.parametrize("shape,dtype", [((300, 768), np.float32), ((140, 2048), np.float32),
                                         ((8192, 1024), np.float32)],
                         ids=["in-cache", "two-column-tiles", "32MiB"])
@pytest.mark.parametrize("offset", [0, 4, 16])
def test_layer_norm_backward_matches_reference_at_any_alignment(rng, shape, dtype, offset):
    K = shape[1]
    x, w, b = make(rng, shape, K, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x, dy = ref.at_offset(x, offset), ref.at_offset(dy, offset)
    out = ref.at_offset(np.zeros(shape, dtype), offset)
    _, mean, rstd = ref.layer_norm(x, K, w, b)
    dx, dw, db = cynorm.layer_norm_backward(dy, x, mean, rstd, K, w, out=out)
    assert dx is out
    dx_ref, dw_ref, db_ref = ref.layer_norm_backward(dy, x, mean, rstd, K, w)
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")
    assert_close(db, db_ref, dtype, "backward")
