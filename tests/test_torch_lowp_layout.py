"""cynorm.torch with float16/bfloat16 tensors and channels_last memory format: values
and gradients against torch.nn's modules run in float64 on the same (widened) data,
channels_last handed to the channels-last kernels as the tensor's own memory (no copy)
and returned channels_last, float64 gradcheck, torch.compile, and bad dtypes."""
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")

import cynorm  # noqa: E402
import cynorm.torch as ct  # noqa: E402

LOWP = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ULP1 = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # ulp of 1.0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_()
    return module


# name: (cynorm.torch class, torch.nn class, args, kwargs, input shape, whether
# channels_last runs the channels-last kernels)
MODULES = {
    "group": (ct.GroupNorm, torch.nn.GroupNorm, (2, 6), {}, (3, 6, 4, 5), True),
    "group3d": (ct.GroupNorm, torch.nn.GroupNorm, (3, 6), {}, (2, 6, 3, 2, 4), True),
    "instance2d": (ct.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,), {"affine": True},
                   (2, 4, 5, 3), True),
    "instance3d": (ct.InstanceNorm3d, torch.nn.InstanceNorm3d, (3,), {"affine": True},
                   (2, 3, 2, 3, 4), True),
    "batch2d": (ct.BatchNorm2d, torch.nn.BatchNorm2d, (4,), {}, (3, 4, 3, 5), True),
    "batch3d": (ct.BatchNorm3d, torch.nn.BatchNorm3d, (3,), {}, (2, 3, 2, 3, 4), True),
    "layer": (ct.LayerNorm, torch.nn.LayerNorm, (8,), {}, (4, 5, 8), False),
    "rms": (ct.RMSNorm, torch.nn.RMSNorm, (8,), {}, (4, 5, 8), False),
}


def _fmt(shape):
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


def _within(got, ref, dtype, scale_abs):
    """|got - ref| within 2 ulps of the storage dtype of ref, plus scale_abs (values
    that are differences of larger terms)."""
    got = got.double()
    tol = 2 * ULP1.get(dtype, 1e-6) * ref.abs() + scale_abs
    bad = (got - ref).abs() > tol
    assert not bad.any(), (got[bad][:5], ref[bad][:5])


@pytest.mark.parametrize("name, layout", [
    (n, lay) for n in sorted(MODULES) for lay in ("contiguous", "channels_last")
    if lay == "contiguous" or MODULES[n][5]])
@pytest.mark.parametrize("dtype", sorted(LOWP))
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
def test_lowp_modules_match_torch_float64(name, dtype, param_dtype, layout):
    """A float16/bfloat16 input (parameters float32, torch's mixed precision, or of the
    input's dtype) gives an output of the input's dtype within 2 of its ulps of torch's
    float64 module on the same values; the input's gradient is of its dtype, the
    parameters' of theirs, the running statistics stay float32 and follow torch's."""
    ours_cls, theirs_cls, args, kwargs, shape, _ = MODULES[name]
    dt = LOWP[dtype]
    pdt = torch.float32 if param_dtype == "float32" else dt
    ref = _randomize(theirs_cls(*args, **kwargs).double())
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(pdt)
    for bname, buf in ours.named_buffers():  # running statistics stay float32
        if buf.is_floating_point():
            setattr(ours, bname, buf.float())
    if name == "rms":  # eps=None: the machine epsilon of the input's dtype, as in torch
        ref.eps = torch.finfo(dt).eps
    with torch.no_grad():  # parameters as stored, widened, for the reference
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            q.copy_(p.double())
    x = (torch.randn(shape) * 2 + 0.5).to(dt)
    if layout == "channels_last":
        x = x.contiguous(memory_format=_fmt(shape))
    dy = torch.randn(shape).to(dt)
    xa = x.clone().requires_grad_()
    y = ours(xa)
    y.backward(dy)
    xr = x.double().requires_grad_()
    yr = ref(xr)
    yr.backward(dy.double())

    assert y.dtype == dt and xa.grad.dtype == dt
    _within(y, yr.detach(), dt, 1e-4)
    _within(xa.grad, xr.grad, dt, 1e-3 * xr.grad.abs().max().item())
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == pdt, n
        _within(p.grad, q.grad, pdt, 1e-3 * q.grad.abs().max().item())
    for (n, b), (_, c) in zip(ours.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():
            assert b.dtype == torch.float32, n
            torch.testing.assert_close(b.double(), c, rtol=1e-5, atol=1e-6)
    if layout == "channels_last":
        fmt = _fmt(shape)
        assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
        assert xa.grad.is_contiguous(memory_format=fmt)
    with torch.no_grad():  # the inference route gives the same values
        assert torch.equal(ours(x), y.detach())


@pytest.mark.parametrize("dtype", sorted(LOWP))
def test_lowp_torch_module_in_16_bits_agrees(dtype):
    """torch's own 16-bit GroupNorm, LayerNorm and BatchNorm (computed in float32 and
    rounded) agree with cynorm.torch's output within 2 ulps of the storage dtype."""
    dt = LOWP[dtype]
    for theirs, ours, shape in ((torch.nn.GroupNorm(4, 8), ct.GroupNorm(4, 8), (2, 8, 6, 5)),
                                (torch.nn.LayerNorm(16), ct.LayerNorm(16), (6, 16)),
                                (torch.nn.BatchNorm2d(8), ct.BatchNorm2d(8), (2, 8, 4, 3))):
        _randomize(theirs)
        ours.load_state_dict(theirs.state_dict())
        theirs, ours = theirs.to(dt), ours.to(dt)
        x = torch.randn(shape).to(dt)
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        assert a.dtype == b.dtype == dt
        _within(a, b.double(), dt, 2 * ULP1[dt])


def _spy(monkeypatch, fname):
    """Record the data addresses and channel_axis that cynorm.<fname> (and its backward)
    receive and return."""
    seen = {}
    fwd, bwd = getattr(cynorm, fname), getattr(cynorm, fname + "_backward")

    def addr(a):
        return a.__array_interface__["data"][0]

    def spy_fwd(x, *args, **kwargs):
        seen["x"], seen["axis"] = addr(x), kwargs.get("channel_axis")
        out = fwd(x, *args, **kwargs)
        seen["y"] = addr(out[0])
        return out

    def spy_bwd(dy, x, *args, **kwargs):
        seen["dy"], seen["saved_x"] = addr(dy), addr(x)
        seen["axis_bwd"] = kwargs.get("channel_axis")
        out = bwd(dy, x, *args, **kwargs)
        seen["dx"] = addr(out[0])
        return out

    monkeypatch.setattr(cynorm, fname, spy_fwd)
    monkeypatch.setattr(cynorm, fname + "_backward", spy_bwd)
    return seen


@pytest.mark.parametrize("fname, make, shape", [
    ("group_norm", lambda: ct.GroupNorm(2, 4, activation="silu"), (2, 4, 3, 5)),
    ("group_norm", lambda: ct.GroupNorm(2, 4), (2, 4, 3, 2, 5)),
    ("instance_norm", lambda: ct.InstanceNorm2d(4, affine=True), (2, 4, 3, 5)),
    ("instance_norm", lambda: ct.InstanceNorm3d(4, affine=True, activation="relu"),
     (2, 4, 3, 2, 2)),
    ("batch_norm", lambda: ct.BatchNorm2d(4, activation="gelu"), (3, 4, 3, 5)),
    ("batch_norm", lambda: ct.BatchNorm3d(4), (2, 4, 3, 2, 2)),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_channels_last_runs_in_place(monkeypatch, fname, make, shape, dtype):
    """A channels_last input reaches the channels-last kernel (channel_axis=-1) as the
    tensor's own memory, the output is the kernel's array viewed channels_last, and the
    backward takes a channels_last dy and returns dx the same way; on the inference and
    the autograd routes."""
    dt = getattr(torch, dtype)
    fmt = _fmt(shape)
    seen = _spy(monkeypatch, fname)
    m = make().to(dt)
    if fname != "group_norm":
        for bname, buf in m.named_buffers():
            if buf.is_floating_point():
                setattr(m, bname, buf.float())
    x = torch.randn(shape).to(dt).contiguous(memory_format=fmt)
    with torch.no_grad():
        y = m(x)
    assert seen["x"] == x.data_ptr() and seen["axis"] == -1
    assert y.data_ptr() == seen["y"] and y.is_contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_()
    y = m(xg)
    assert seen["x"] == xg.data_ptr() and y.data_ptr() == seen["y"]
    assert y.is_contiguous(memory_format=fmt)
    dy = torch.randn(shape).to(dt).contiguous(memory_format=fmt)
    y.backward(dy)
    assert seen["dy"] == dy.data_ptr() and seen["saved_x"] == xg.data_ptr()
    assert seen["axis_bwd"] == -1
    assert xg.grad.data_ptr() == seen["dx"] and xg.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fname", ["group_norm", "instance_norm", "batch_norm"])
def test_contiguous_dy_of_a_channels_last_forward(fname):
    """A contiguous dy for a channels_last forward gives the gradients of the
    contiguous forward."""
    shape = (2, 4, 3, 5)
    make = {"group_norm": lambda: ct.GroupNorm(2, 4),
            "instance_norm": lambda: ct.InstanceNorm2d(4, affine=True),
            "batch_norm": lambda: ct.BatchNorm2d(4)}[fname]
    m = _randomize(make().double())
    x = torch.randn(shape, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    grads = []
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        xa = xin.clone().requires_grad_()
        m.zero_grad()
        m(xa).backward(dy)
        grads.append((xa.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn, args", [
    (ct.group_norm, lambda w, b: (2, w, b, 1e-5)),
    (lambda x, *a, **k: ct.instance_norm(x, None, None, *a, **k),
     lambda w, b: (w, b, True, 0.1, 1e-5)),
    (lambda x, *a, **k: ct.batch_norm(x, None, None, *a, **k),
     lambda w, b: (w, b, True, 0.1, 1e-5)),
])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 2), (2, 4, 2, 2, 3)])
def test_channels_last_gradcheck(fn, args, activation, shape):
    """float64 gradcheck of the channels-last route (input, weight and bias)."""
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=_fmt(shape))
    x.requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        assert x.is_contiguous(memory_format=_fmt(shape))
        return fn(x, *args(w, b), activation=activation)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_compile_channels_last_and_lowp(dtype):
    """torch.compile (aot_eager, fullgraph) of a channels_last 16-bit model gives the
    eager outputs and gradients, and the same memory format."""
    dt = getattr(torch, dtype)

    def model(nn):
        return torch.nn.Sequential(nn.GroupNorm(2, 4, activation="silu"),
                                   nn.BatchNorm2d(4), nn.InstanceNorm2d(4, affine=True))

    eager = _randomize(model(ct)).to(dt)
    for mod in eager.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_floating_point():
                setattr(mod, bname, buf.float())
    comp = model(ct).to(dt)
    comp.load_state_dict(eager.state_dict())
    for mod in comp.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_floating_point():
                setattr(mod, bname, buf.float())
    x = torch.randn(2, 4, 5, 3).to(dt).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 4, 5, 3).to(dt).contiguous(memory_format=torch.channels_last)
    outs = []
    for m in (eager, torch.compile(comp, backend="aot_eager", fullgraph=True)):
        xa = x.clone().requires_grad_()
        y = m(xa)
        y.backward(dy)
        outs.append((y, xa.grad))
    comp_params = dict(comp.named_parameters())
    (ye, ge), (yc, gc) = outs
    assert yc.dtype == dt and gc.dtype == dt
    assert yc.is_contiguous(memory_format=torch.channels_last)
    assert gc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    torch.testing.assert_close(gc, ge, rtol=2 * ULP1.get(dt, 1e-6), atol=1e-3)
    for n, p in eager.named_parameters():
        q = comp_params[n]
        assert q.grad.dtype == p.dtype
        torch.testing.assert_close(q.grad.float(), p.grad.float(), rtol=1e-2, atol=1e-2)
    for (n, b), (_, c) in zip(eager.named_buffers(), comp.named_buffers()):
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("argname, call", [
    ("input", lambda: ct.group_norm(torch.ones(2, 4, 3, dtype=torch.int32), 2)),
    ("input", lambda: ct.layer_norm(torch.ones(2, 4, dtype=torch.complex64), (4,))),
    ("weight", lambda: ct.group_norm(torch.ones(2, 4, 3), 2,
                                     torch.ones(4, dtype=torch.int64))),
    ("bias", lambda: ct.batch_norm(torch.ones(2, 4, 3), None, None, None,
                                   torch.ones(4, dtype=torch.bool), True)),
    ("running_mean", lambda: ct.batch_norm(torch.ones(2, 4, 3).bfloat16(),
                                           torch.zeros(4, dtype=torch.int64),
                                           torch.ones(4), training=True)),
])
def test_bad_dtypes_name_the_argument(argname, call):
    with pytest.raises(TypeError, match=argname):
        call()


def test_bfloat16_without_ml_dtypes_says_how_to_install(monkeypatch):
    """Without ml_dtypes a bfloat16 tensor is a TypeError naming the argument and the
    package to install."""
    monkeypatch.setattr(ct, "_BF16_NP", [])
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes fails
    x = torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match="input.*pip install ml-dtypes"):
        ct.group_norm(x.bfloat16(), 2)
    with pytest.raises(TypeError, match="weight.*pip install ml-dtypes"):
        ct.group_norm(x, 2, torch.ones(4, dtype=torch.bfloat16))


def test_channels_last_double_backward():
    """gradgradcheck (float64) of a channels_last GroupNorm with an activation, and of
    BatchNorm in training."""
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: ct.group_norm(x, 2, w, b, activation="gelu"), (x, w, b))
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: ct.batch_norm(x, None, None, w, b, True), (x, w, b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_negative_views_are_read_as_their_values(dtype, fmt):
    """A negative view (torch._neg_view) is normalised as the values it shows."""
    x = torch.randn(2, 4, 3, 5).to(getattr(torch, dtype))
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    neg = torch._neg_view(x)
    assert neg.is_neg()
    with torch.no_grad():
        got = ct.group_norm(neg, 2)
        want = ct.group_norm(-x, 2)
    assert torch.equal(got, want)
    assert not torch.equal(got, ct.group_norm(x, 2))
