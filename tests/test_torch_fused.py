"""cynorm.torch's fused epilogues (activation= on GroupNorm/InstanceNorm/BatchNorm,
residual= on LayerNorm/RMSNorm) on each of the bridge's routes: the inference route
(no autograd Function, no grad_fn), the autograd Function (torch's composite as the
oracle, gradcheck and gradgradcheck in float64) and torch.compile (eager, aot_eager and
inductor agree)."""
import pytest

torch = pytest.importorskip("torch")

import cynorm.torch as ct  # noqa: E402

F = torch.nn.functional
ACTS = ["silu", "gelu", "gelu_tanh", "relu"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)


def torch_act(name, y):
    """torch's own activation modules, the composite a user writes today."""
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name](y)


def _randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_()
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return module


# (cynorm.torch class, torch.nn class, constructor args, kwargs, input shape, train)
PER_CHANNEL = {
    "group": (ct.GroupNorm, torch.nn.GroupNorm, (2, 6), {}, (3, 6, 4, 3), True),
    "instance2d": (ct.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,), {"affine": True},
                   (2, 4, 3, 5), True),
    "instance1d_tracked_eval": (ct.InstanceNorm1d, torch.nn.InstanceNorm1d, (3,),
                                {"affine": True, "track_running_stats": True}, (2, 3, 7),
                                False),
    "batch2d_train": (ct.BatchNorm2d, torch.nn.BatchNorm2d, (4,), {}, (3, 4, 3, 2), True),
    "batch1d_eval": (ct.BatchNorm1d, torch.nn.BatchNorm1d, (5,), {}, (6, 5), False),
    "batch3d_train": (ct.BatchNorm3d, torch.nn.BatchNorm3d, (2,), {}, (2, 2, 3, 2, 2),
                      True),
}


def _pair(name, act, dtype=torch.float64):
    ours_cls, theirs_cls, args, kwargs, shape, train = PER_CHANNEL[name]
    theirs = _randomize(theirs_cls(*args, dtype=dtype, **kwargs)).train(train)
    ours = ours_cls(*args, dtype=dtype, activation=act, **kwargs).train(train)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("name", sorted(PER_CHANNEL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_module_activation_matches_torch_composite_forward_and_backward(name, act, dtype):
    ours, theirs, shape = _pair(name, act, dtype)
    assert ours.activation == act and f"activation={act!r}" in repr(ours)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    dy = torch.randn(shape, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), torch_act(act, theirs(xb))
    ya.backward(dy)
    yb.backward(dy)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                           atol=1e-5)
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (k, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=k, **tol)
    for (k, ba), (_, bb) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(ba, bb, msg=k, **tol)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("name", sorted(PER_CHANNEL))
def test_inference_route_with_activation_skips_autograd(monkeypatch, name, mode, act):
    ours, theirs, shape = _pair(name, act)
    if mode == "frozen":
        ours.requires_grad_(False)

    def refuse(*args, **kwargs):
        raise AssertionError("an autograd Function ran on the inference route")
    monkeypatch.setattr(ct._ModuleFunction, "apply", refuse)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "frozen": torch.enable_grad}[mode]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    with context():
        ya = ours(x)
    with torch.no_grad():
        yb = torch_act(act, theirs(x))
    assert ya.grad_fn is None and not ya.requires_grad
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTS)
def test_functional_activation_matches_torch_composite(act):
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    w, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    pairs = [
        (ct.group_norm(x, 3, w, b, activation=act), F.group_norm(x, 3, w, b)),
        (ct.instance_norm(x, None, None, w, b, activation=act),
         F.instance_norm(x, None, None, w, b)),
        (ct.batch_norm(x, rm, rv, w, b, False, activation=act),
         F.batch_norm(x, rm, rv, w, b, False)),
        (ct.batch_norm(x, None, None, w, b, True, activation=act),
         F.batch_norm(x, None, None, w, b, True)),
    ]
    for ours, plain in pairs:
        torch.testing.assert_close(ours, torch_act(act, plain), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTS)
def test_activation_functions_pass_gradgradcheck(act):
    """create_graph=True with an activation: the backward is built from torch
    operations (the composite, activation included), so second derivatives are exact."""
    x = (torch.randn(2, 6, 4, dtype=torch.float64) * 2 + 0.3).requires_grad_()
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64).requires_grad_()
    rm = torch.linspace(-1, 1, 6, dtype=torch.float64)
    rv = torch.linspace(0.5, 2, 6, dtype=torch.float64)
    for fn in (lambda x, w, b: ct.group_norm(x, 3, w, b, activation=act),
               lambda x, w, b: ct.instance_norm(x, None, None, w, b, activation=act),
               lambda x, w, b: ct.batch_norm(x, None, None, w, b, True, activation=act),
               lambda x, w, b: ct.batch_norm(x, rm, rv, w, b, False, activation=act)):
        assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_gradient_penalty_with_activation_matches_torch(act):
    ours, theirs, shape = _pair("group", act)
    v = torch.randn(shape, dtype=torch.float64)
    grads = []
    for m in (ours, lambda t: torch_act(act, theirs(t))):
        x = (torch.randn(shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(5)) * 2).requires_grad_()
        (g,) = torch.autograd.grad((m(x) * v).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(g.square().sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-8)


def test_activation_is_checked_everywhere():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="activation"):
        ct.GroupNorm(2, 4, activation="swish")
    with pytest.raises(ValueError, match="activation"):
        ct.BatchNorm1d(4, activation=1)
    with pytest.raises(ValueError, match="activation"):
        ct.group_norm(x, 2, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        ct.batch_norm(x, None, None, training=True, activation="Silu")
    m = ct.InstanceNorm1d(4)
    m.activation = "elu"  # an attribute set after construction is checked at the call
    with pytest.raises(ValueError, match="activation"):
        m(x)
    with pytest.raises(TypeError):  # keyword-only: the positional slots are torch's
        ct.GroupNorm(2, 4, 1e-5, True, None, None, "silu")


# ---- residual ------------------------------------------------------------------------------

ROW = {
    "layer": (ct.LayerNorm, torch.nn.LayerNorm, ((3, 4),), {}, (2, 5, 3, 4)),
    "layer_no_bias": (ct.LayerNorm, torch.nn.LayerNorm, (6,), {"bias": False}, (4, 6)),
    "rms": (ct.RMSNorm, torch.nn.RMSNorm, (5,), {"eps": 1e-3}, (3, 2, 5)),
}


def _row_pair(name, dtype=torch.float64):
    ours_cls, theirs_cls, args, kwargs, shape = ROW[name]
    theirs = _randomize(theirs_cls(*args, dtype=dtype, **kwargs))
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


@pytest.mark.parametrize("name", sorted(ROW))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_module_residual_matches_torch_forward_and_backward(name, dtype):
    """layer(x, residual=r) = (norm(x + r), x + r); gradients through y and h reach x,
    r and the parameters as torch's autograd of the composite."""
    ours, theirs, shape = _row_pair(name, dtype)
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    dy, dh = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    ya, ha = ours(xa, residual=ra)
    hb = xb + rb
    yb = theirs(hb)
    torch.autograd.backward([ya, ha], [dy, dh])
    torch.autograd.backward([yb, hb], [dy, dh])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                           atol=1e-5)
    torch.testing.assert_close(ha, hb, rtol=0, atol=0)
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ra.grad, rb.grad, **tol)
    assert xa.grad.data_ptr() != ra.grad.data_ptr()  # two gradients, not one aliased
    for (k, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=k, **tol)


@pytest.mark.parametrize("name", sorted(ROW))
def test_residual_gradient_reaches_only_what_requires_it(name):
    ours, theirs, shape = _row_pair(name)
    x = torch.randn(shape, dtype=torch.float64)
    r = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y, h = ours(x, residual=r)
    (y.sum() + h.sum()).backward()
    rb = r.detach().clone().requires_grad_()
    hb = x + rb
    (theirs(hb).sum() + hb.sum()).backward()
    torch.testing.assert_close(r.grad, rb.grad, rtol=1e-10, atol=1e-10)
    assert x.grad is None


@pytest.mark.parametrize("name", sorted(ROW))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_inference_route_with_residual_skips_autograd(monkeypatch, name, mode):
    ours, theirs, shape = _row_pair(name)
    if mode == "frozen":
        ours.requires_grad_(False)

    def refuse(*args, **kwargs):
        raise AssertionError("an autograd Function ran on the inference route")
    monkeypatch.setattr(ct._ModuleFunction, "apply", refuse)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "frozen": torch.enable_grad}[mode]
    x, r = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    with context():
        y, h = ours(x, residual=r)
    assert y.grad_fn is None and h.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(h, x + r, rtol=0, atol=0)
        torch.testing.assert_close(y, theirs(x + r), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_residual_functions_pass_gradgradcheck(fn):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()

    def f(x, r, w):
        y, h = getattr(ct, fn)(x, 5, w, residual=r)
        return y * 1.5 + h.sin()

    assert torch.autograd.gradcheck(f, (x, r, w))
    assert torch.autograd.gradgradcheck(f, (x, r, w), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_residual_is_checked():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="residual"):
        ct.layer_norm(x, (5,), residual=torch.randn(3, 4))
    with pytest.raises(TypeError, match="residual"):
        ct.rms_norm(x, (5,), residual=x.numpy())
    with pytest.raises(TypeError, match="residual"):
        ct.LayerNorm(5)(x, residual=torch.randn(3, 5, dtype=torch.float64))


# ---- torch.compile -------------------------------------------------------------------------

class _Block(torch.nn.Module):
    def __init__(self, norms):
        super().__init__()
        self.gn = norms.GroupNorm(2, 6, activation="silu")
        self.bn = norms.BatchNorm2d(6, activation="gelu_tanh")
        self.inorm = norms.InstanceNorm2d(6, affine=True, activation="relu")
        self.ln = norms.LayerNorm(5)
        self.rms = norms.RMSNorm(5)

    def forward(self, x):
        a = self.inorm(self.bn(self.gn(x)))
        y, h = self.ln(a, residual=x)
        z, h2 = self.rms(y, residual=h)
        return z * h2


def _run(model, x, dy):
    out = []
    model.train()
    for step in range(2):
        xs = (x + step).requires_grad_()
        y = model(xs)
        out += [y.detach(), *torch.autograd.grad(y, [xs, *model.parameters()], dy)]
    model.eval()
    with torch.no_grad():
        out.append(model(x))
    return out + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_options_under_torch_compile_give_eager_results(backend):
    torch._dynamo.reset()
    reference = _Block(ct).double()
    _randomize(reference.gn), _randomize(reference.bn), _randomize(reference.ln)
    compiled = _Block(ct).double()
    compiled.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    dy = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    want = _run(reference, x, dy)
    got = _run(torch.compile(compiled, backend=backend, fullgraph=True), x, dy)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"result {i}")


def test_fused_options_under_torch_compile_are_one_operator_each():
    """Each fused norm is one cynorm operator (activation and residual add included)."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _Block(ct).double().eval()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(
            torch.randn(2, 6, 4, 5, dtype=torch.float64))
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.cynorm.norm_forward) == 5
    assert not any(t in (F.silu, F.gelu, F.relu, torch.relu) for t in targets)


# ---- convert -------------------------------------------------------------------------------

def _model():
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
        nn.BatchNorm2d(8), nn.GELU(), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
        nn.Flatten(2), nn.LayerNorm(16), nn.GELU(approximate="tanh"), nn.RMSNorm(16))


def test_convert_keeps_state_dict_and_runs_the_lean_route(monkeypatch):
    torch.manual_seed(7)
    model = _model()
    for p in model.parameters():
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    reference = _model()
    reference.load_state_dict(model.state_dict())
    converted = ct.convert(model)
    assert isinstance(converted[1], ct.GroupNorm) and converted[1].activation == "silu"
    assert isinstance(converted[3], ct.BatchNorm2d) and converted[3].activation == "gelu"
    assert isinstance(converted[5], ct.InstanceNorm2d) and converted[5].activation == "relu"
    assert all(isinstance(converted[i], torch.nn.Identity) for i in (2, 4, 6))
    # a LayerNorm has no activation epilogue: the GELU after it stays
    assert isinstance(converted[8], ct.LayerNorm) and isinstance(converted[9], torch.nn.GELU)
    assert isinstance(converted[10], ct.RMSNorm)
    # the torch model's state_dict loads into the converted one, and back
    assert list(converted.state_dict()) == list(reference.state_dict())
    converted.load_state_dict(reference.state_dict())
    reference.load_state_dict(converted.state_dict())
    converted.eval()
    reference.eval()
    x = torch.randn(2, 3, 4, 4)

    def refuse(*args, **kwargs):
        raise AssertionError("an autograd Function ran on the inference route")
    monkeypatch.setattr(ct._ModuleFunction, "apply", refuse)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-4, atol=1e-4)


def test_convert_leaves_cynorm_modules_and_fuses_them():
    seq = torch.nn.Sequential(ct.GroupNorm(2, 4), torch.nn.SiLU())
    out = ct.convert(seq)
    assert out is seq and type(seq[0]) is ct.GroupNorm and seq[0].activation == "silu"
    # an already fused norm keeps its activation; the next activation stays a module
    seq2 = torch.nn.Sequential(ct.GroupNorm(2, 4, activation="relu"), torch.nn.SiLU())
    ct.convert(seq2)
    assert seq2[0].activation == "relu" and isinstance(seq2[1], torch.nn.SiLU)


def test_residual_inputs_changed_in_place_refuse_only_a_double_backward():
    """The first-order backward needs only h (as torch's x + r then LayerNorm); a double
    backward rebuilds h from input and residual, so a change in place is an error there,
    never a wrong answer."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    a, c = x * 1.0, r * 1.0
    y, h = ct.layer_norm(a, (5,), residual=c)
    a.add_(1.0)
    (gx,) = torch.autograd.grad(y.sum() + h.sum(), x, retain_graph=True)
    xb = x.detach().clone().requires_grad_()
    hb = xb + r.detach()
    (want,) = torch.autograd.grad(F.layer_norm(hb, (5,)).sum() + hb.sum(), xb)
    torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad((y * y).sum(), x, create_graph=True)
