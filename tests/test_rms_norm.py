"""rms_norm / rms_norm_backward: y = x / sqrt(mean(x**2) + eps) * weight over the
trailing normalized_shape dims; eps=None is the machine epsilon of x's dtype."""
import numpy as np
import pytest

import cynorm
import reference as ref
from reference import assert_close

CASES = [
    ((5, 8), 8),
    ((3, 4, 6), 6),
    ((3, 4, 6), (4, 6)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((7, 1), 1),
    ((4, 13), [13]),
    ((2, 3, 4097), 4097),
    ((6,), 6),
]
IDS = [f"{'x'.join(map(str, s))}-ns{ns}" for s, ns in CASES]


def ns_tuple(ns):
    return (ns,) if isinstance(ns, int) else tuple(ns)


def make(rng, shape, ns, dtype, affine=True, loc=0.0, scale=1.0):
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    w = rng.uniform(0.5, 1.5, ns_tuple(ns)).astype(dtype) if affine else None
    return x, w


@pytest.mark.parametrize("shape,ns", CASES, ids=IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_rms_norm_forward_matches_reference(rng, dtype, shape, ns, affine):
    x, w = make(rng, shape, ns, dtype, affine, loc=0.5)
    y, rstd = cynorm.rms_norm(x, ns, w, eps=1e-5, return_stats=True)
    y_ref, rstd_ref = ref.rms_norm(x, ns, w, eps=1e-5)
    assert y.dtype == dtype and y.shape == shape
    assert rstd.dtype == np.float64
    assert rstd.shape == shape[:len(shape) - len(ns_tuple(ns))]
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)
    assert_close(cynorm.rms_norm(x, ns, w, eps=1e-5), y_ref, dtype)


def test_rms_norm_default_eps_is_machine_epsilon(rng, dtype):
    # tiny inputs make eps dominate mean(x**2): a different default shows at once
    x = (1e-6 * rng.standard_normal((4, 16))).astype(dtype)
    eps = float(np.finfo(dtype).eps)
    y, rstd = cynorm.rms_norm(x, 16, return_stats=True)
    y_ref, rstd_ref = ref.rms_norm(x, 16, eps=eps)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-9)
    assert_close(y, y_ref, dtype)
    y2 = cynorm.rms_norm(x, 16, eps=None)
    y3 = cynorm.rms_norm(x, 16, eps=eps)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(y, y3)


def test_rms_norm_eps_is_used(rng):
    x = 1e-3 * rng.standard_normal((3, 10))
    for eps in (0.0, 1e-6, 1.0):
        y, rstd = cynorm.rms_norm(x, 10, eps=eps, return_stats=True)
        y_ref, rstd_ref = ref.rms_norm(x, 10, eps=eps)
        assert_close(y, y_ref, np.float64)
        np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-12)


def test_rms_norm_does_not_subtract_the_mean(rng):
    # a constant row: LayerNorm would give 0, RMSNorm gives sign(x) * (almost) 1
    x = np.full((2, 8), 3.0)
    x[1] = -2.0
    y = cynorm.rms_norm(x, 8, eps=0.0)
    np.testing.assert_allclose(y, np.sign(x), rtol=1e-15)


def test_rms_norm_normalized_shape_int_tuple_list_agree(rng, dtype):
    x, w = make(rng, (3, 5, 7), 7, dtype)
    y = cynorm.rms_norm(x, 7, w)
    for ns in [(7,), [7], np.int64(7)]:
        np.testing.assert_array_equal(cynorm.rms_norm(x, ns, w), y)


def test_rms_norm_weight_is_elementwise(rng, dtype):
    x, _ = make(rng, (4, 3, 5), (3, 5), dtype)
    w = (np.arange(1, 16, dtype=dtype) / 8).reshape(3, 5)
    assert_close(cynorm.rms_norm(x, (3, 5), w), ref.rms_norm(x, (3, 5), w)[0], dtype)
    y_none = cynorm.rms_norm(x, (3, 5))
    assert_close(y_none, ref.rms_norm(x, (3, 5))[0], dtype)
    assert_close(y_none, cynorm.rms_norm(x, (3, 5), np.ones((3, 5), dtype)).astype(float),
                 dtype)


def test_rms_norm_empty_leading_dims(dtype):
    x = np.zeros((0, 4), dtype=dtype)
    y, rstd = cynorm.rms_norm(x, 4, return_stats=True)
    assert y.shape == (0, 4) and rstd.shape == (0,)
    junk = np.full(4, 1e30, dtype=dtype)  # recycled heap block: dweight over no rows
    del junk                              # must be written as zeros
    dx, dw = cynorm.rms_norm_backward(x, x, rstd, 4)
    assert dx.shape == (0, 4) and dw.shape == (4,)
    np.testing.assert_array_equal(dw, 0)


def test_rms_norm_large_values_float32(rng):
    # mean(x**2) of float32 data near 1e4 is accumulated in float64
    x, w = make(rng, (8, 3000), 3000, np.float32, loc=1e4, scale=1.0)
    y, rstd = cynorm.rms_norm(x, 3000, w, eps=1e-5, return_stats=True)
    y_ref, rstd_ref = ref.rms_norm(x, 3000, w, eps=1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


def test_rms_norm_out_and_in_place(rng, dtype):
    x, w = make(rng, (4, 3, 10), 10, dtype)
    y = cynorm.rms_norm(x, 10, w)
    out = np.full_like(x, np.nan)
    assert cynorm.rms_norm(x, 10, w, out=out) is out
    np.testing.assert_array_equal(out, y)
    xi = x.copy()
    assert cynorm.rms_norm(xi, 10, w, out=xi) is xi
    np.testing.assert_array_equal(xi, y)


@pytest.mark.parametrize("which", ["dy", "x"])
def test_rms_norm_backward_out_in_place(rng, dtype, which):
    x, w = make(rng, (4, 3, 10), (3, 10), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, rstd = cynorm.rms_norm(x, (3, 10), w, return_stats=True)
    expected = cynorm.rms_norm_backward(dy, x, rstd, (3, 10), w)
    dy2, x2 = dy.copy(), x.copy()
    target = dy2 if which == "dy" else x2
    r = cynorm.rms_norm_backward(dy2, x2, rstd, (3, 10), w, out=target)
    assert r[0] is target
    for a, e in zip(r, expected):
        np.testing.assert_array_equal(a, e)


def test_rms_norm_non_contiguous_matches_contiguous(rng, dtype):
    x, w = make(rng, (5, 4, 6), (4, 6), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, rstd = cynorm.rms_norm(x, (4, 6), w, return_stats=True)
    grads = cynorm.rms_norm_backward(dy, x, rstd, (4, 6), w)
    for xv, dyv in [(np.asfortranarray(x), np.asfortranarray(dy)),
                    (np.repeat(x, 2, axis=2)[..., ::2], np.repeat(dy, 2, axis=0)[::2])]:
        assert not xv.flags.c_contiguous and not dyv.flags.c_contiguous
        y2, rstd2 = cynorm.rms_norm(xv, (4, 6), np.asfortranarray(w), return_stats=True)
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(rstd2, rstd)
        for a, e in zip(cynorm.rms_norm_backward(dyv, xv, rstd2, (4, 6), w), grads):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_rms_norm_non_finite_stays_in_its_row(rng, dtype, bad):
    x, w = make(rng, (5, 9), 9, dtype)
    x[2, 7] = bad
    y = cynorm.rms_norm(x, 9, w)
    # an Inf element gives inf/inf = NaN there and x/inf = 0 elsewhere in the row
    assert not np.isfinite(y[2, 7])
    if np.isnan(bad):
        assert np.isnan(y[2]).all()
    ok = [0, 1, 3, 4]
    assert np.isfinite(y[ok]).all()
    assert_close(y[ok], ref.rms_norm(x[ok], 9, w)[0], dtype)


@pytest.mark.parametrize("shape,ns", CASES, ids=IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_rms_norm_backward_matches_reference(rng, dtype, shape, ns, affine):
    x, w = make(rng, shape, ns, dtype, affine)
    dy = rng.standard_normal(shape).astype(dtype)
    _, rstd = ref.rms_norm(x, ns, w, eps=1e-6)
    dx, dw = cynorm.rms_norm_backward(dy, x, rstd, ns, w)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x, rstd, ns, w)
    assert dx.dtype == dtype and dw.dtype == dtype and dw.shape == ns_tuple(ns)
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")


@pytest.mark.parametrize("shape,ns", [((3, 5), 5), ((2, 3, 4), (3, 4)), ((4,), 4)])
def test_rms_norm_gradients_match_finite_differences(rng, shape, ns):
    x, w = make(rng, shape, ns, np.float64)
    dy = rng.standard_normal(shape)
    num = ref.numerical_grads(lambda x_, w_: cynorm.rms_norm(x_, ns, w_, eps=1e-5),
                              [x, w], dy)
    _, rstd = cynorm.rms_norm(x, ns, w, eps=1e-5, return_stats=True)
    for a, e in zip(cynorm.rms_norm_backward(dy, x, rstd, ns, w), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_rms_norm_reference_backward_matches_finite_differences(rng):
    x, w = make(rng, (2, 3, 4), (3, 4), np.float64)
    dy = rng.standard_normal(x.shape)
    num = ref.numerical_grads(lambda x_, w_: ref.rms_norm(x_, (3, 4), w_, eps=1e-5)[0],
                              [x, w], dy)
    _, rstd = ref.rms_norm(x, (3, 4), w, eps=1e-5)
    for a, e in zip(ref.rms_norm_backward(dy, x, rstd, (3, 4), w), num):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,ns", [((8, 16), 16), ((2, 5, 12), (12,)),
                                      ((2, 3, 4, 5), (4, 5)), ((3, 5000), 5000)])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_matches_torch_forward_and_backward(rng, dtype, shape, ns, eps):
    torch = pytest.importorskip("torch")
    if not hasattr(torch.nn.functional, "rms_norm"):
        pytest.skip("this torch has no rms_norm")
    x, w = make(rng, shape, ns, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    ty = torch.nn.functional.rms_norm(tx, ns_tuple(ns), tw, eps=eps)
    ty.backward(torch.tensor(dy))
    y, rstd = cynorm.rms_norm(x, ns, w, eps=eps, return_stats=True)
    dx, dw = cynorm.rms_norm_backward(dy, x, rstd, ns, w)
    tol = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}[dtype]
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
    for a, t in [(dx, tx.grad), (dw, tw.grad)]:
        t = t.numpy()
        np.testing.assert_allclose(a, t, rtol=tol, atol=tol * max(1, np.abs(t).max()))


# the row backward's vector body starts where dx's rows are aligned (offsets 4 and 16:
# a head taken column by column), and a float32 dx of 32 MiB or more is stored past the
# caches
@pytest.mark.parametrize("shape,dtype", [((300, 768), np.float32), ((140, 2048), np.float32),
                                         ((8192, 1024), np.float32)],
                         ids=["in-cache", "two-column-tiles", "32MiB"])
@pytest.mark.parametrize("offset", [0, 4, 16])
def test_rms_norm_backward_matches_reference_at_any_alignment(rng, shape, dtype, offset):
    K = shape[1]
    x = ref.at_offset(rng.standard_normal(shape).astype(dtype), offset)
    dy = ref.at_offset(rng.standard_normal(shape).astype(dtype), offset)
    w = rng.uniform(0.5, 1.5, K).astype(dtype)
    out = ref.at_offset(np.zeros(shape, dtype), offset)
    _, rstd = ref.rms_norm(x, K, w)
    dx, dw = cynorm.rms_norm_backward(dy, x, rstd, K, w, out=out)
    assert dx is out
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x, rstd, K, w)
    assert_close(dx, dx_ref, dtype, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, dtype, "backward")
