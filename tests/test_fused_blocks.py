"""Fused blocks in use: cynorm.nn layers with activation= and residual=, a UNet ResNet
block and a pre-norm transformer layer built with cynorm.nn against torch's equivalents
(forward and backward), and the torch side: fused autograd Functions (gradcheck) and
convert(module)."""
import copy

import numpy as np
import pytest

import cynorm
import cynorm.nn as cnn
import reference as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional
ct = pytest.importorskip("cynorm.torch")


def data(shape, dtype=np.float64, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def torch_op(fn, *arrays):
    """fn (torch tensors -> tensor) on NumPy arrays: (output, vjp), vjp(dout) giving the
    gradients with respect to the arrays. The non-normalization parts of the blocks."""
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)

    def vjp(dout):
        grads = torch.autograd.grad(out, ts, torch.tensor(dout))
        return [g.numpy() for g in grads]

    return out.detach().numpy(), vjp


# ---- cynorm.nn ---------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("make", [
    lambda act: (cnn.GroupNorm(2, 4, activation=act, dtype=np.float64),
                 lambda x, w, b: ref.group_norm(x, 2, w, b)[0]),
    lambda act: (cnn.InstanceNorm(4, affine=True, activation=act, dtype=np.float64),
                 lambda x, w, b: ref.instance_norm(x, w, b)[0]),
    lambda act: (cnn.BatchNorm(4, activation=act, dtype=np.float64),
                 lambda x, w, b: ref.batch_norm(x, None, None, w, b, training=True)[0]),
], ids=["GroupNorm", "InstanceNorm", "BatchNorm"])
def test_nn_layer_with_activation_forward_and_backward(make, act):
    layer, norm_ref = make(act)
    layer.weight[...] = data(4, seed=1) + 1
    layer.bias[...] = data(4, seed=2)
    x, dy = data((3, 4, 5, 6), seed=3), data((3, 4, 5, 6), seed=4)
    y = layer(x)
    np.testing.assert_allclose(y, ref.activation(act, norm_ref(x, layer.weight, layer.bias)),
                               rtol=1e-11, atol=1e-12)
    dx = layer.backward(dy)
    # finite differences of sum(y * dy) along a random direction of x, and of the weight
    v = data(x.shape, seed=5)
    h = 1e-6
    f = lambda xx: float(np.sum(layer.forward(xx) * dy))  # noqa: E731
    num = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert abs(num - float(np.sum(dx * v))) < 1e-6 * max(1.0, abs(num))
    assert "activation" in repr(layer)


def test_nn_layer_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        cnn.GroupNorm(2, 4, activation="swish")
    with pytest.raises(ValueError, match="activation"):
        cnn.BatchNorm(4, activation=1)


@pytest.mark.parametrize("layer_cls", [cnn.LayerNorm, cnn.RMSNorm])
def test_nn_row_layer_residual_forward_and_backward(layer_cls):
    K = 16
    layer = layer_cls(K, dtype=np.float64)
    layer.weight[...] = data(K, seed=1) + 1
    x, r = data((3, 5, K), seed=2), data((3, 5, K), seed=3)
    dy, dh_direct = data((3, 5, K), seed=4), data((3, 5, K), seed=5)
    y, h = layer(x, residual=r)
    np.testing.assert_array_equal(h, x + r)
    np.testing.assert_array_equal(y, layer(x + r))
    layer(x, residual=r)
    g = layer.backward(dy, dh_direct)   # gradient w.r.t. h, i.e. of x and of r
    # finite differences of sum(y * dy) + sum(h * dh_direct) along a direction of x
    v = data(x.shape, seed=6)
    eps = 1e-6

    def f(xx):
        yy, hh = layer.forward(xx, residual=r)
        return float(np.sum(yy * dy) + np.sum(hh * dh_direct))

    num = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert abs(num - float(np.sum(g * v))) < 1e-6 * max(1.0, abs(num))
    assert set(layer.grads) >= {"weight"}


# ---- a UNet ResNet block -------------------------------------------------------------------

def _conv(x, w):
    return F.conv2d(x, w, padding=1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unet_resnet_block_matches_torch_forward_and_backward(dtype):
    """out = x + conv2(silu(gn2(conv1(silu(gn1(x)))))), cynorm.nn for the fused
    GroupNorm+SiLU, torch for the convolutions; against the same block in torch."""
    C, G = 8, 4
    x = data((2, C, 10, 10), dtype, 0)
    w1, w2 = data((C, C, 3, 3), dtype, 1, 0.2), data((C, C, 3, 3), dtype, 2, 0.2)
    gn1 = cnn.GroupNorm(G, C, activation="silu", dtype=dtype)
    gn2 = cnn.GroupNorm(G, C, activation="silu", dtype=dtype)
    for k, layer in enumerate((gn1, gn2)):
        layer.weight[...] = data(C, dtype, 10 + k) + 1
        layer.bias[...] = data(C, dtype, 20 + k)
    dout = data(x.shape, dtype, 3)

    a = gn1(x)
    b, vjp1 = torch_op(_conv, a, w1)
    c = gn2(b)
    d, vjp2 = torch_op(_conv, c, w2)
    out = x + d
    dc, dw2 = vjp2(dout)
    db_, dw1 = vjp1(gn2.backward(dc))
    dx = dout + gn1.backward(db_)

    xt = torch.tensor(x, requires_grad=True)
    w1t, w2t = torch.tensor(w1, requires_grad=True), torch.tensor(w2, requires_grad=True)
    tg1, tg2 = torch.nn.GroupNorm(G, C).to(xt.dtype), torch.nn.GroupNorm(G, C).to(xt.dtype)
    with torch.no_grad():
        for tl, cl in ((tg1, gn1), (tg2, gn2)):
            tl.weight.copy_(torch.tensor(cl.weight))
            tl.bias.copy_(torch.tensor(cl.bias))
    out_t = xt + _conv(F.silu(tg2(_conv(F.silu(tg1(xt)), w1t))), w2t)
    out_t.backward(torch.tensor(dout))
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(out, out_t.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(dw1, w1t.grad.numpy(), **tol)
    np.testing.assert_allclose(dw2, w2t.grad.numpy(), **tol)
    for tl, cl in ((tg1, gn1), (tg2, gn2)):
        np.testing.assert_allclose(cl.grads["weight"], tl.weight.grad.numpy(), **tol)
        np.testing.assert_allclose(cl.grads["bias"], tl.bias.grad.numpy(), **tol)


# ---- a pre-norm transformer layer ------------------------------------------------------------

def _attention(y, wq, wk, wv, wo):
    q, k, v = y @ wq, y @ wk, y @ wv
    att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (att @ v) @ wo


def _mlp(y, w1, w2):
    return F.gelu(y @ w1) @ w2


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_prenorm_transformer_layer_matches_torch_forward_and_backward(norm):
    """h = x + attn(norm1(x)); out = h + mlp(norm2(h)), with norm2's residual add fused:
    y2, h = norm2(attn_out, residual=x)."""
    T, D = 7, 16
    x = data((2, T, D), seed=0)
    ws = [data((D, D), seed=s, scale=0.3) for s in range(1, 5)]
    m1, m2 = data((D, 4 * D), seed=5, scale=0.3), data((4 * D, D), seed=6, scale=0.3)
    n1, n2 = (getattr(cnn, norm)(D, dtype=np.float64) for _ in range(2))
    for k, layer in enumerate((n1, n2)):
        layer.weight[...] = data(D, seed=10 + k) + 1
        if layer.bias is not None:
            layer.bias[...] = data(D, seed=20 + k)
    dout = data(x.shape, seed=7)

    y1 = n1(x)
    a, vjp_att = torch_op(_attention, y1, *ws)
    y2, h = n2(a, residual=x)
    m, vjp_mlp = torch_op(_mlp, y2, m1, m2)
    out = h + m
    dy2, dm1, dm2 = vjp_mlp(dout)
    dh = n2.backward(dy2, dout)          # reaches both a and x
    dy1, *dws = vjp_att(dh)
    dx = dh + n1.backward(dy1)

    xt = torch.tensor(x, requires_grad=True)
    wts = [torch.tensor(w, requires_grad=True) for w in ws]
    m1t, m2t = torch.tensor(m1, requires_grad=True), torch.tensor(m2, requires_grad=True)
    cls = getattr(torch.nn, norm)
    t1, t2 = cls(D).double(), cls(D).double()
    with torch.no_grad():
        for tl, cl in ((t1, n1), (t2, n2)):
            tl.weight.copy_(torch.tensor(cl.weight))
            if cl.bias is not None:
                tl.bias.copy_(torch.tensor(cl.bias))
    if norm == "RMSNorm":
        t1.eps = t2.eps = float(np.finfo(np.float64).eps)
    ht = xt + _attention(t1(xt), *wts)
    out_t = ht + _mlp(t2(ht), m1t, m2t)
    out_t.backward(torch.tensor(dout))
    tol = dict(rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out, out_t.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    for g, wt in zip(dws + [dm1, dm2], wts + [m1t, m2t]):
        np.testing.assert_allclose(g, wt.grad.numpy(), **tol)
    for tl, cl in ((t1, n1), (t2, n2)):
        np.testing.assert_allclose(cl.grads["weight"], tl.weight.grad.numpy(), **tol)


# ---- torch: fused Functions and convert ---------------------------------------------------------

@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_torch_fused_functions_pass_gradcheck(act):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ct.group_norm(a[0], 3, a[1], a[2],
                                                             activation=act), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ct.batch_norm(a[0], None, None, a[1], a[2],
                                                             True, activation=act),
                                    (x, w, b))
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ct.batch_norm(a[0], rm, rv, a[1], a[2],
                                                             False, activation=act),
                                    (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ct.instance_norm(a[0], None, None, a[1],
                                                                a[2], activation=act),
                                    (x, w, b))


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_torch_residual_functions_pass_gradcheck(fn):
    torch.manual_seed(1)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(x, r, w):
        y, h = getattr(ct, fn)(x, 5, w, residual=r)
        return y * 1.5 + h.sin()   # h is used downstream too

    assert torch.autograd.gradcheck(f, (x, r, w))


def test_torch_fused_module_matches_torch_composite():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 6, 6)
    m = ct.GroupNorm(4, 8, activation="silu")
    t = torch.nn.GroupNorm(4, 8)
    torch.testing.assert_close(m(x), F.silu(t(x)), rtol=1e-5, atol=1e-5)
    ln = ct.LayerNorm(6)
    r = torch.randn(2, 8, 6, 6)
    y, h = ln(x, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, torch.nn.LayerNorm(6)(x + r), rtol=1e-5, atol=1e-5)


def _model():
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
        nn.Sequential(nn.BatchNorm2d(8), nn.GELU(approximate="tanh")),
        nn.InstanceNorm2d(8, affine=True), nn.ReLU(), nn.GroupNorm(2, 8),
        nn.Flatten(2), nn.LayerNorm(16), nn.GELU(), nn.RMSNorm(16))


def test_convert_replaces_norms_fuses_activations_and_keeps_parameters():
    torch.manual_seed(3)
    model = _model()
    for p in model.parameters():
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    original = copy.deepcopy(model)
    params_before = {k: v for k, v in model.named_parameters()}
    keys_before = list(model.state_dict())
    converted = ct.convert(model)
    assert converted is model
    assert keys_before == list(model.state_dict())
    for k, v in model.named_parameters():
        assert v is params_before[k]          # the same Parameter objects
    assert isinstance(model[1], ct.GroupNorm) and model[1].activation == "silu"
    assert isinstance(model[2], torch.nn.Identity)
    assert isinstance(model[3][0], ct.BatchNorm2d) and model[3][0].activation == "gelu_tanh"
    assert isinstance(model[4], ct.InstanceNorm2d) and model[4].activation == "relu"
    assert isinstance(model[6], ct.GroupNorm) and model[6].activation is None
    assert isinstance(model[8], ct.LayerNorm) and isinstance(model[9], torch.nn.GELU)
    assert isinstance(model[10], ct.RMSNorm)
    x = torch.randn(2, 3, 4, 4)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = original(x1), model(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-4)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(original[3][0].running_mean, model[3][0].running_mean)
    model.eval()
    original.eval()
    torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-4)


def test_convert_returns_a_new_module_for_a_bare_norm():
    bn = torch.nn.BatchNorm1d(5).eval()
    new = ct.convert(bn)
    assert isinstance(new, ct.BatchNorm1d) and not new.training
    assert new.weight is bn.weight and new.running_var is bn.running_var


def test_nn_backward_uses_the_forwards_bias_after_an_in_place_update():
    layer = cnn.GroupNorm(2, 4, activation="silu", dtype=np.float64)
    layer.bias[...] = data(4, seed=1)
    x, dy = data((2, 4, 3, 3), seed=2), data((2, 4, 3, 3), seed=3)
    y, m, r = cynorm.group_norm(x, 2, layer.weight, layer.bias, return_stats=True,
                                activation="silu")
    want = cynorm.group_norm_backward(dy, x, m, r, 2, layer.weight, bias=layer.bias,
                                      activation="silu")[0]
    layer(x)
    layer.bias[...] -= 0.5     # an optimizer step between forward and backward
    np.testing.assert_array_equal(layer.backward(dy), want)
