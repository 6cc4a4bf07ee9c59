"""Fused blocks: normalization + activation (group_norm, instance_norm, batch_norm with
activation=) and residual add + normalization (layer_norm, rms_norm with residual=),
forward and backward, against float64 NumPy composites, finite differences and torch;
bitwise identity across thread counts and in place; argument checks."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cynorm
import reference as ref
from reference import assert_close, dx_scale

ACTS = ["silu", "gelu", "gelu_tanh", "relu"]


def data(shape, dtype, seed=0, loc=0.2, scale=1.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


# ---- the ops with an activation, as (forward, backward, float64 reference) ---------------
# Each case: x's shape and a name. The forward returns (y, mean, rstd); the backward takes
# (dy, x, mean, rstd, w, b, act) and returns (dx, dw, db).

def _gn_fwd(x, w, b, act, **kw):
    return cynorm.group_norm(x, 2, w, b, return_stats=True, activation=act, **kw)


def _gn_bwd(dy, x, m, r, w, b, act, **kw):
    return cynorm.group_norm_backward(dy, x, m, r, 2, w, bias=b, activation=act, **kw)


def _gn_ref(x, w, b, act):
    y0, m, r = ref.group_norm(x, 2, w, b)
    return y0, m, r, lambda dyp: ref.group_norm_backward(dyp, x, m, r, 2, w)


def _in_fwd(x, w, b, act, **kw):
    return cynorm.instance_norm(x, weight=w, bias=b, return_stats=True, activation=act,
                                **kw)


def _in_bwd(dy, x, m, r, w, b, act, **kw):
    return cynorm.instance_norm_backward(dy, x, m, r, weight=w, bias=b, activation=act,
                                         **kw)


def _in_ref(x, w, b, act):
    y0, m, r = ref.instance_norm(x, w, b)
    return y0, m, r, lambda dyp: ref.instance_norm_backward(dyp, x, m, r, w)


def _bn_fwd(x, w, b, act, **kw):
    return cynorm.batch_norm(x, None, None, w, b, training=True, return_stats=True,
                             activation=act, **kw)


def _bn_bwd(dy, x, m, r, w, b, act, **kw):
    return cynorm.batch_norm_backward(dy, x, m, r, w, training=True, bias=b,
                                      activation=act, **kw)


def _bn_ref(x, w, b, act):
    y0, m, r, _, _ = ref.batch_norm(x, None, None, w, b, training=True)
    return y0, m, r, lambda dyp: ref.batch_norm_backward(dyp, x, m, r, w, training=True)


def _running(C):
    rm = np.linspace(-0.5, 0.5, C)
    rv = np.linspace(0.5, 2.0, C)
    return rm, rv


def _bn_eval_fwd(x, w, b, act, **kw):
    rm, rv = _running(x.shape[1])
    return cynorm.batch_norm(x, rm, rv, w, b, training=False, return_stats=True,
                             activation=act, **kw)


def _bn_eval_bwd(dy, x, m, r, w, b, act, **kw):
    return cynorm.batch_norm_backward(dy, x, m, r, w, training=False, bias=b,
                                      activation=act, **kw)


def _bn_eval_ref(x, w, b, act):
    rm, rv = _running(x.shape[1])
    y0, m, r, _, _ = ref.batch_norm(x, rm, rv, w, b, training=False)
    return y0, m, r, lambda dyp: ref.batch_norm_backward(dyp, x, m, r, w, training=False)


OPS = {
    "group_norm": (_gn_fwd, _gn_bwd, _gn_ref),
    "instance_norm": (_in_fwd, _in_bwd, _in_ref),
    "batch_norm": (_bn_fwd, _bn_bwd, _bn_ref),
    "batch_norm_eval": (_bn_eval_fwd, _bn_eval_bwd, _bn_eval_ref),
}
# shapes: small sets, sets split into pieces (one sample, long runs), and short runs
# (batch norm: the column path)
SHAPES = {
    # (40, 4, 3): runs under 128 bytes, the backward takes the batch in chunks; batch
    # norm's (300, 40) and (200, 5, 3): the column path with several row blocks
    "group_norm": [(3, 4, 5, 7), (1, 4, 80, 80), (40, 4, 3)],
    "instance_norm": [(3, 4, 5, 7), (1, 2, 90, 90), (30, 6, 2)],
    "batch_norm": [(5, 4, 9, 9), (40, 6, 3), (2, 3, 70, 70), (300, 40), (200, 5, 3)],
    "batch_norm_eval": [(5, 4, 9, 9), (40, 6, 3)],
}
CASES = [(op, shape) for op in OPS for shape in SHAPES[op]]


def _inputs(shape, dtype):
    C = shape[1]
    return (data(shape, dtype, 0, 0.3, 1.5), data(C, dtype, 1, 1.0),
            data(C, dtype, 2, 0.1), data(shape, dtype, 3, 0.0))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("op,shape", CASES)
def test_fused_forward_and_backward_match_float64_composite(op, shape, act, dtype):
    fwd, bwd, reference = OPS[op]
    x, w, b, dy = _inputs(shape, dtype)
    y, m, r = fwd(x, w, b, act)
    y0, m0, r0, ref_bwd = reference(x, w, b, act)
    assert_close(y, ref.activation(act, y0), dtype)
    dx, dw, db = bwd(dy, x, m, r, w, b, act)
    # the composite's backward: dy through the activation's derivative, then the norm's
    dxe, dwe, dbe = ref_bwd(dy * ref.activation_grad(act, y0))
    scale = dx_scale(dy, r0, w)
    assert_close(dx, dxe, dtype, "backward", scale)
    assert_close(dw, dwe, dtype, "backward", float(np.abs(dy).sum()))
    assert_close(db, dbe, dtype, "backward", float(np.abs(dy).sum()))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("op", list(OPS))
def test_fused_backward_matches_finite_differences(op, act):
    fwd, bwd, _ = OPS[op]
    shape = SHAPES[op][0]
    x, w, b, dy = _inputs(shape, np.float64)
    y, m, r = fwd(x, w, b, act)
    dx, dw, db = bwd(dy, x, m, r, w, b, act)

    def loss(x_, w_, b_):
        return float(np.sum(fwd(x_, w_, b_, act)[0] * dy))

    h = 1e-6
    rng = np.random.default_rng(7)
    for arr, grad, k in [(x, dx, 0), (w, dw, 1), (b, db, 2)]:
        for idx in rng.choice(arr.size, size=min(6, arr.size), replace=False):
            args_p = [x.copy(), w.copy(), b.copy()]
            args_m = [x.copy(), w.copy(), b.copy()]
            args_p[k].flat[idx] += h
            args_m[k].flat[idx] -= h
            num = (loss(*args_p) - loss(*args_m)) / (2 * h)
            assert abs(num - grad.flat[idx]) <= 1e-6 * max(1.0, abs(num)), (k, idx)


@pytest.mark.parametrize("act", ACTS)
def test_fused_group_norm_matches_torch_composite(act, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    fns = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
           "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
    shape = (2, 8, 12, 12)
    x, w, b, dy = _inputs(shape, dtype)
    y, m, r = cynorm.group_norm(x, 4, w, b, return_stats=True, activation=act)
    dx, dw, db = cynorm.group_norm_backward(dy, x, m, r, 4, w, bias=b, activation=act)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = fns[act](F.group_norm(xt, 4, wt, bt, 1e-5))
    yt.backward(torch.tensor(dy))
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 50)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 50)


def test_activation_none_gives_the_plain_normalization_bitwise(dtype):
    x, w, b, dy = _inputs((2, 4, 30, 30), dtype)
    y, m, r = cynorm.group_norm(x, 2, w, b, return_stats=True, activation=None)
    assert np.array_equal(y, cynorm.group_norm(x, 2, w, b))
    g1 = cynorm.group_norm_backward(dy, x, m, r, 2, w, bias=b, activation=None)
    g2 = cynorm.group_norm_backward(dy, x, m, r, 2, w)
    for a, c in zip(g1, g2):
        assert np.array_equal(a, c)


def test_fused_forward_is_the_activation_of_the_plain_normalization(dtype):
    # the epilogue is applied to exactly the bits the normalization alone produces
    from cynorm._kernels import runtime
    x, w, b, _ = _inputs((2, 6, 33, 17), dtype)
    plain = cynorm.group_norm(x, 3, w, b)
    for code, act in enumerate(ACTS, 1):
        want = np.empty_like(plain)
        runtime.activation(plain, want, code)
        assert np.array_equal(cynorm.group_norm(x, 3, w, b, activation=act), want), act


# ---- determinism and in place ----------------------------------------------------------------

def _across_threads(fn):
    results = []
    for n in (1, 2, 3):
        with threadpool_limits(n, user_api="openmp"):
            r = fn()
        results.append(r if isinstance(r, tuple) else (r,))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert np.array_equal(a, c, equal_nan=True)


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("op,shape", [("group_norm", (1, 4, 128, 128)),
                                      ("group_norm", (8, 32, 16, 16)),
                                      ("instance_norm", (2, 6, 4097)),
                                      ("batch_norm", (2, 3, 90, 90)),
                                      ("batch_norm", (64, 8, 8)),
                                      ("batch_norm", (300, 40))])
def test_fused_bitwise_identical_across_thread_counts(op, shape, act, dtype):
    fwd, bwd, _ = OPS[op]
    x, w, b, dy = _inputs(shape, dtype)

    def run():
        y, m, r = fwd(x, w, b, act)
        return (y,) + tuple(bwd(dy, x, m, r, w, b, act))

    _across_threads(run)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(2, 20000), (300, 768)])
def test_residual_bitwise_identical_across_thread_counts(fn, shape, dtype):
    x, r = data(shape, dtype, 0), data(shape, dtype, 1)
    f = getattr(cynorm, fn)
    _across_threads(lambda: f(x, shape[-1], residual=r))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("op,shape", CASES)
def test_fused_in_place_equals_out_of_place(op, shape, act, dtype):
    fwd, bwd, _ = OPS[op]
    x, w, b, dy = _inputs(shape, dtype)
    y, m, r = fwd(x, w, b, act)
    dx, dw, db = bwd(dy, x, m, r, w, b, act)
    xi = x.copy()
    yi, _, _ = fwd(xi, w, b, act, out=xi)
    assert yi is xi and np.array_equal(xi, y)
    for target in ("dy", "x"):
        dyi, xi = dy.copy(), x.copy()
        out = dyi if target == "dy" else xi
        dxi, dwi, dbi = bwd(dyi, xi, m, r, w, b, act, out=out)
        assert dxi is out
        assert np.array_equal(dxi, dx) and np.array_equal(dwi, dw) and np.array_equal(dbi, db)


# ---- residual add + LayerNorm / RMSNorm ------------------------------------------------------

def _ln(x, K, **kw):
    return cynorm.layer_norm(x, K, data(K, x.dtype, 5, 1.0), data(K, x.dtype, 6), **kw)


def _rms(x, K, **kw):
    return cynorm.rms_norm(x, K, data(K, x.dtype, 5, 1.0), **kw)


@pytest.mark.parametrize("norm", [_ln, _rms], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(4, 6, 64), (2, 20000), (1, 9000)])
def test_residual_equals_normalization_of_the_sum(norm, shape, dtype):
    K = shape[-1]
    x, r = data(shape, dtype, 0), data(shape, dtype, 1)
    y, h = norm(x, K, residual=r)
    assert np.array_equal(h, x + r)
    assert np.array_equal(y, norm(x + r, K))
    out = norm(x, K, residual=r, return_stats=True)
    assert len(out) == (4 if norm is _ln else 3)
    stats = norm(x + r, K, return_stats=True)[1:]
    for a, c in zip(out[2:], stats):
        assert np.array_equal(a, c)


def test_layer_norm_residual_matches_float64_reference_forward_and_backward(dtype):
    shape, K = (5, 3, 48), 48
    x, r, dy = data(shape, dtype, 0), data(shape, dtype, 1), data(shape, dtype, 2)
    w, b = data(K, dtype, 3, 1.0), data(K, dtype, 4)
    y, h, m, rs = cynorm.layer_norm(x, K, w, b, residual=r, return_stats=True)
    ye, me, rse = ref.layer_norm(x.astype(np.float64) + r, K, w, b)
    assert_close(y, ye, dtype)
    # the backward is layer_norm_backward applied to h; dh reaches x and residual alike
    dh, dw, db = cynorm.layer_norm_backward(dy, h, m, rs, K, w)
    dhe, dwe, dbe = ref.layer_norm_backward(dy, h, me, rse, K, w)
    assert_close(dh, dhe, dtype, "backward", dx_scale(dy, rse, w))
    assert_close(dw, dwe, dtype, "backward", float(np.abs(dy).sum()))


@pytest.mark.parametrize("norm", [_ln, _rms], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(6, 64), (2, 20000)])
def test_residual_out_and_out_may_alias_x_or_residual(norm, shape, dtype):
    K = shape[-1]
    x0, r0 = data(shape, dtype, 0), data(shape, dtype, 1)
    y_want, h_want = norm(x0, K, residual=r0)
    for out_to, h_to in [("x", None), (None, "x"), (None, "r"), ("x", "r"), ("r", "x"),
                         ("r", None)]:
        x, r = x0.copy(), r0.copy()
        pick = {"x": x, "r": r, None: None}
        y, h = norm(x, K, residual=r, out=pick[out_to], residual_out=pick[h_to])
        if out_to is not None:
            assert y is pick[out_to]
        if h_to is not None:
            assert h is pick[h_to]
        assert np.array_equal(y, y_want) and np.array_equal(h, h_want), (out_to, h_to)


def test_residual_argument_errors():
    x = np.zeros((3, 8), np.float32)
    r = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match="residual"):
        cynorm.layer_norm(x, 8, residual=np.ones((3, 7), np.float32))
    with pytest.raises(TypeError, match="residual"):
        cynorm.rms_norm(x, 8, residual=r.astype(np.float64))
    with pytest.raises(ValueError, match="residual_out"):
        cynorm.layer_norm(x, 8, residual_out=r)
    with pytest.raises(ValueError, match="out and residual_out"):
        cynorm.layer_norm(x, 8, residual=r, out=x, residual_out=x)
    with pytest.raises(ValueError, match="residual_out"):
        cynorm.rms_norm(x, 8, residual=r, residual_out=r[:, :4])
    buf = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="overlaps"):  # out partly over the residual
        cynorm.layer_norm(x, 8, residual=buf[:3], out=buf[1:])


@pytest.mark.parametrize("bad", ["tanh", "SiLU", 1, True, ("silu",)])
def test_activation_argument_errors(bad):
    x = np.zeros((2, 4, 3), np.float32)
    for call in (lambda: cynorm.group_norm(x, 2, activation=bad),
                 lambda: cynorm.instance_norm(x, activation=bad),
                 lambda: cynorm.batch_norm(x, training=True, activation=bad),
                 lambda: cynorm.group_norm_backward(x, x, np.zeros((2, 2)),
                                                    np.ones((2, 2)), 2, activation=bad),
                 lambda: cynorm.batch_norm_backward(x, x, np.zeros(4), np.ones(4),
                                                    activation=bad)):
        with pytest.raises(ValueError, match="activation"):
            call()


def test_backward_bias_is_checked():
    x = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(ValueError, match="bias"):
        cynorm.group_norm_backward(x, x, np.zeros((2, 2)), np.ones((2, 2)), 2,
                                   bias=np.zeros(3), activation="silu")


def test_fused_nan_and_inf_propagate():
    x = data((2, 4, 6, 6), np.float32)
    x[0, 0, 0, 0] = np.nan
    y = cynorm.group_norm(x, 2, activation="silu")
    assert np.isnan(y[0, :2]).all() and np.isfinite(y[0, 2:]).all() and np.isfinite(y[1]).all()
    # an infinite bias gives act(+-inf) per channel: silu(-inf) = -0, silu(inf) = inf
    b = np.array([-np.inf, np.inf, 0, 0], np.float32)
    y = cynorm.group_norm(data((2, 4, 6, 6), np.float32), 2, None, b, activation="silu")
    assert (y[:, 0] == 0).all() and np.signbit(y[:, 0]).all() and (y[:, 1] == np.inf).all()


@pytest.mark.parametrize("act", ACTS)
def test_instance_norm_with_running_statistics_and_activation(act, dtype):
    # use_input_stats=False: every sample normalised per channel with the running
    # statistics, then the activation; the backward treats them as constants
    x, w, b, dy = _inputs((3, 4, 6, 5), dtype)
    rm, rv = _running(4)
    y, m, r = cynorm.instance_norm(x, rm, rv, w, b, False, return_stats=True,
                                   activation=act)
    y0, _, r0, _, _ = ref.batch_norm(x, rm, rv, w, b, training=False)
    assert_close(y, ref.activation(act, y0), dtype)
    dx, dw, db = cynorm.instance_norm_backward(dy, x, m, r, w, use_input_stats=False,
                                               bias=b, activation=act)
    dxe, dwe, dbe = ref.batch_norm_backward(dy * ref.activation_grad(act, y0), x, m, r, w,
                                            training=False)
    assert_close(dx, dxe, dtype, "backward", dx_scale(dy, r0, w))
    assert_close(dw, dwe, dtype, "backward", float(np.abs(dy).sum()))
    assert_close(db, dbe, dtype, "backward", float(np.abs(dy).sum()))
