"""cynorm.torch: autograd Functions and drop-in nn.Modules on cynorm's kernels, checked
against torch.autograd.gradcheck and against torch.nn's own modules (forward, backward,
running buffers, a few training steps of a small network), plus the no-copy promise."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cynorm  # noqa: E402
import cynorm.torch as ct  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _randomize(module):
    """Non-trivial affine parameters (torch initialises ones and zeros)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_()
    return module


def _pair(ours_cls, theirs_cls, *args, dtype=torch.float64, **kwargs):
    theirs = _randomize(theirs_cls(*args, dtype=dtype, **kwargs))
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# (cynorm.torch class, torch.nn class, constructor args, constructor kwargs, input shape)
MODULES = {
    "group": (ct.GroupNorm, torch.nn.GroupNorm, (2, 6), {}, (3, 6, 4, 3)),
    "group_no_affine": (ct.GroupNorm, torch.nn.GroupNorm, (3, 6), {"affine": False}, (2, 6, 5)),
    "instance2d": (ct.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,), {}, (3, 4, 3, 5)),
    "instance2d_affine": (ct.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,),
                          {"affine": True}, (2, 4, 4, 3)),
    "instance2d_tracked": (ct.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,),
                           {"affine": True, "track_running_stats": True}, (3, 4, 3, 3)),
    "instance2d_unbatched": (ct.InstanceNorm2d, torch.nn.InstanceNorm2d, (3,),
                             {"affine": True}, (3, 4, 5)),
    "instance1d": (ct.InstanceNorm1d, torch.nn.InstanceNorm1d, (3,), {"eps": 1e-3}, (2, 3, 7)),
    "batch2d": (ct.BatchNorm2d, torch.nn.BatchNorm2d, (4,), {}, (3, 4, 3, 2)),
    "batch2d_cma": (ct.BatchNorm2d, torch.nn.BatchNorm2d, (4,), {"momentum": None},
                    (3, 4, 2, 2)),
    "batch2d_untracked": (ct.BatchNorm2d, torch.nn.BatchNorm2d, (3,),
                          {"track_running_stats": False}, (4, 3, 2, 2)),
    "batch1d": (ct.BatchNorm1d, torch.nn.BatchNorm1d, (5,), {"momentum": 0.3}, (6, 5)),
    "batch3d": (ct.BatchNorm3d, torch.nn.BatchNorm3d, (2,), {"affine": False},
                (2, 2, 3, 2, 2)),
    "layer": (ct.LayerNorm, torch.nn.LayerNorm, ((3, 4),), {}, (2, 5, 3, 4)),
    "layer_no_bias": (ct.LayerNorm, torch.nn.LayerNorm, (6,), {"bias": False}, (4, 6)),
    "layer_no_affine": (ct.LayerNorm, torch.nn.LayerNorm, (6,),
                        {"elementwise_affine": False}, (3, 6)),
    "rms": (ct.RMSNorm, torch.nn.RMSNorm, ((2, 5),), {}, (3, 2, 5)),
    "rms_eps": (ct.RMSNorm, torch.nn.RMSNorm, (7,), {"eps": 1e-2}, (4, 7)),
}


def _close(a, b, dtype, **kw):
    t = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    t.update(kw)
    torch.testing.assert_close(a, b, **t)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_module_matches_torch_through_train_and_eval(name, dtype):
    ours_cls, theirs_cls, args, kwargs, shape = MODULES[name]
    ours, theirs = _pair(ours_cls, theirs_cls, *args, dtype=dtype, **kwargs)
    assert isinstance(ours, theirs_cls)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for step, training in enumerate([True, True, False]):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape, dtype=dtype) * (1 + step) + step
        dy = torch.randn(shape, dtype=dtype)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ours.zero_grad()
        theirs.zero_grad()
        ya, yb = ours(xa), theirs(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert ya.dtype == dtype and ya.shape == yb.shape
        _close(ya, yb, dtype)
        _close(xa.grad, xb.grad, dtype)
        for (k, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
            _close(pa.grad, pb.grad, dtype, msg=k)
        # running statistics and num_batches_tracked update exactly like torch's
        for (k, ba), (_, bb) in zip(ours.named_buffers(), theirs.named_buffers()):
            _close(ba, bb, dtype, msg=k)


GRADCHECK = {  # name: (module, input shape, modes)
    "group": (lambda: ct.GroupNorm(2, 4), (2, 4, 3, 2), [True]),
    "instance2d": (lambda: ct.InstanceNorm2d(3, affine=True), (2, 3, 3, 2), [True]),
    "instance2d_running": (lambda: ct.InstanceNorm2d(3, affine=True, track_running_stats=True),
                           (2, 3, 2, 3), [True, False]),
    "batch2d": (lambda: ct.BatchNorm2d(3), (3, 3, 2, 2), [True, False]),
    "batch1d_no_affine": (lambda: ct.BatchNorm1d(4, affine=False), (5, 4), [True]),
    "layer": (lambda: ct.LayerNorm((2, 3)), (3, 2, 3), [True]),
    "layer_no_bias": (lambda: ct.LayerNorm(4, bias=False), (3, 4), [True]),
    "rms": (lambda: ct.RMSNorm((2, 3)), (3, 2, 3), [True]),
    "rms_no_weight": (lambda: ct.RMSNorm(5, eps=1e-3, elementwise_affine=False), (3, 5), [True]),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck_float64(name):
    factory, shape, modes = GRADCHECK[name]
    module = _randomize(factory().double())
    params = [p for _, p in module.named_parameters()]
    names = [n for n, _ in module.named_parameters()]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()

    for training in modes:
        module.train(training)
        if not training:  # use non-trivial running statistics
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)

        def f(x, *ps):
            return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("fn, args", [
    (lambda x, w, b: ct.group_norm(x, 3, w, b, 1e-3), (2, 6, 4)),
    (lambda x, w, b: ct.instance_norm(x, None, None, w, b, True, 0.1, 1e-4), (2, 6, 3)),
    (lambda x, w, b: ct.batch_norm(x, None, None, w, b, True, 0.1, 1e-4), (4, 6, 2)),
    (lambda x, w, b: ct.layer_norm(x.reshape(2, 4, 6), (6,), w, b), (2, 6, 4)),
    (lambda x, w, b: ct.rms_norm(x.reshape(4, 2, 6), (6,), w), (2, 6, 4)),
])
def test_functional_gradcheck_with_non_contiguous_input(fn, args):
    """The functional forms take torch.nn.functional's arguments; a transposed
    (non-contiguous) input is made contiguous and still differentiates correctly."""
    N, C, L = args
    x = torch.randn(N, L, C, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert not x.is_contiguous()
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


# ---- a small network trained with torch's layers and with cynorm's --------------------

def _network(norms, dtype):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1),
        norms.GroupNorm(2, 6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, 3, padding=1),
        norms.BatchNorm2d(6), torch.nn.ReLU(),
        norms.InstanceNorm2d(6, affine=True, track_running_stats=True),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 6 * 6, 16),
        norms.LayerNorm(16), torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        norms.RMSNorm(16),
        torch.nn.Linear(16, 4),
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_training_gives_torchs_losses(dtype):
    theirs = _network(torch.nn, dtype)
    _randomize(theirs)
    ours = _network(ct, dtype)
    ours.load_state_dict(theirs.state_dict())
    assert sum(isinstance(m, (ct.GroupNorm, ct.BatchNorm2d, ct.InstanceNorm2d, ct.LayerNorm,
                              ct.RMSNorm)) for m in ours.modules()) == 5
    x = torch.randn(8, 1, 6, 6, dtype=dtype)
    target = torch.randint(0, 4, (8,))
    losses = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[key] = []
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
        model.eval()
        losses[key].append(torch.nn.functional.cross_entropy(model(x), target).item())
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(losses["ours"], losses["theirs"], rtol=rtol)
    assert losses["ours"][4] < losses["ours"][0]  # it did learn something
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        _close(a, b, dtype, rtol=1e-8 if dtype == torch.float64 else 1e-3,
               atol=1e-8 if dtype == torch.float64 else 1e-4, msg=k)


# ---- no copies --------------------------------------------------------------------------

def _address(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("owner, names, module, shape", [
    # the autograd route calls the kernels from the compiled glue where it can (the
    # checked entries' work), the public functions otherwise (instance norm's running
    # statistics)
    ("glue", ("_slab_forward", "_slab_backward"), lambda: ct.GroupNorm(2, 4), (2, 4, 3)),
    ("glue", ("_slab_forward", "_slab_backward"),
     lambda: ct.InstanceNorm1d(4, affine=True), (2, 4, 3)),
    ("glue", ("_channel_forward", "_channel_backward"), lambda: ct.BatchNorm1d(4), (3, 4, 2)),
    ("cynorm", ("instance_norm", "instance_norm_backward"),
     lambda: ct.InstanceNorm1d(4, affine=True, track_running_stats=True), (3, 4, 2)),
    ("glue", ("_row_forward", "_row_backward"), lambda: ct.LayerNorm(4), (3, 4)),
    ("glue", ("_row_forward", "_row_backward"), lambda: ct.RMSNorm(4), (3, 4)),
])
def test_kernels_see_the_tensors_memory(monkeypatch, owner, names, module, shape):
    """The forward hands cynorm the input's and the parameters' own memory, and the
    output tensor is the array cynorm wrote (and likewise for the backward)."""
    from cynorm import _torch_glue
    seen = {}
    where = _torch_glue if owner == "glue" else cynorm
    forward, backward = (getattr(where, n) for n in names)
    kernel = owner == "glue"  # a kernel entry point: the output is an argument

    def spy_forward(x, *args, **kwargs):
        seen["x"] = _address(x)
        seen["params"] = [_address(a) for a in (*args, *kwargs.values())
                          if isinstance(a, np.ndarray)]
        out = forward(x, *args, **kwargs)
        seen["y"] = _address(args[0] if kernel else out[0])
        return out

    def spy_backward(dy, x, *args, **kwargs):
        seen["dy"], seen["saved_x"] = _address(dy), _address(x)
        out = backward(dy, x, *args, **kwargs)
        seen["dx"] = _address(args[0] if kernel else out[0])
        return out

    monkeypatch.setattr(where, names[0], spy_forward)
    monkeypatch.setattr(where, names[1], spy_backward)
    m = module().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = m(x)
    dy = torch.randn(shape, dtype=torch.float64)
    y.backward(dy)
    assert seen["x"] == x.data_ptr() == seen["saved_x"]
    assert y.data_ptr() == seen["y"]
    assert seen["dy"] == dy.data_ptr()
    assert x.grad.data_ptr() == seen["dx"]
    # the running buffers of a training batch norm are updated after the kernel, in
    # place (test_running_buffers_are_updated_in_place)
    tensors = [m.weight] + [b for b in (getattr(m, "running_mean", None),
                                        getattr(m, "running_var", None))
                            if b is not None and not kernel]
    for t in tensors:
        assert t.data_ptr() in seen["params"]


def test_running_buffers_are_updated_in_place():
    bn = ct.BatchNorm2d(3)
    rm, rv = bn.running_mean, bn.running_var
    ptrs = (rm.data_ptr(), rv.data_ptr())
    x = torch.randn(4, 3, 2, 2) * 3 + 2
    bn(x)
    assert bn.running_mean is rm and (rm.data_ptr(), rv.data_ptr()) == ptrs
    flat = x.transpose(0, 1).reshape(3, -1)
    _close(rm, 0.1 * flat.mean(1), torch.float32)
    _close(rv, 0.9 + 0.1 * flat.var(1, unbiased=True), torch.float32)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("kwargs", [{}, {"affine": True}, {"track_running_stats": True}])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 6, 0), (6, 0)], ids=["batched", "unbatched"])
def test_instance_norm_on_an_empty_input_is_empty_as_in_torch(kwargs, training, shape):
    ours = ct.InstanceNorm1d(6, **kwargs).train(training)
    theirs = torch.nn.InstanceNorm1d(6, **kwargs).train(training)
    x = torch.zeros(shape, requires_grad=True)
    y = ours(x)
    assert y.shape == theirs(torch.zeros(shape)).shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    for name, buf in ours.named_buffers():
        torch.testing.assert_close(buf, dict(theirs.named_buffers())[name], msg=name)


# ---- misuse -----------------------------------------------------------------------------

def test_rejects_non_cpu_and_non_float_tensors():
    m = ct.LayerNorm(4)
    with pytest.raises(ValueError, match="CPU"):
        m(torch.empty(2, 4, device="meta"))
    with pytest.raises(TypeError, match="input must be float32, float64, float16 or"):
        ct.layer_norm(torch.ones(2, 4, dtype=torch.int64), (4,))
    with pytest.raises(TypeError, match="input must be float32, float64, float16 or"):
        m(torch.ones(2, 4, dtype=torch.complex64))


def test_modules_check_input_like_torch():
    with pytest.raises(ValueError, match="4D"):
        ct.BatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError):
        ct.GroupNorm(2, 4)(torch.randn(2, 6, 3))
    with pytest.raises(ValueError):
        ct.InstanceNorm2d(3, affine=True)(torch.randn(2, 5, 2, 2))
    with pytest.raises(ValueError, match="more than 1"):  # one value per channel
        ct.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 spatial"):
        ct.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1))
    # the same conditions torch rejects
    with pytest.raises(ValueError):
        torch.nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError):
        torch.nn.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1))


def test_normalized_shape_must_hold_ints():
    """torch raises TypeError for a float or a string normalized_shape; so does the bridge,
    naming the argument (int('6') and int(6.9) would silently give a shape)."""
    x = torch.randn(2, 6)
    for bad in [(6.9,), 6.9, "6", ("6",), (6, None)]:
        for fn in (ct.layer_norm, ct.rms_norm):
            with pytest.raises(TypeError, match="normalized_shape"):
                fn(x, bad)
            with pytest.raises(TypeError, match="normalized_shape"):
                fn(x.clone().requires_grad_(), bad)
    with pytest.raises(TypeError):
        torch.nn.functional.layer_norm(x, (6.9,))
    # what torch accepts, the bridge accepts: an int, a tuple, a list, a torch.Size
    for good in [6, (6,), [6], torch.Size([6]), np.int64(6)]:
        _close(ct.layer_norm(x, good), torch.nn.functional.layer_norm(x, (6,)), x.dtype)


# ---- the inference route ------------------------------------------------------------------

_FUNCTIONS = (ct._ModuleFunction, ct.GroupNormFunction, ct.InstanceNormFunction,
              ct.BatchNormFunction, ct.LayerNormFunction, ct.RMSNormFunction)


def _forbid_autograd_functions(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an autograd Function ran on the inference route")
    for f in _FUNCTIONS:
        monkeypatch.setattr(f, "apply", refuse)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_inference_route_skips_autograd(monkeypatch, name, mode):
    """Under no_grad, inference_mode, or with nothing requiring grad, no autograd Function
    runs and the output has no grad_fn; the values are torch's, in train and eval mode
    (running buffers included)."""
    ours_cls, theirs_cls, args, kwargs, shape = MODULES[name]
    ours, theirs = _pair(ours_cls, theirs_cls, *args, **kwargs)
    if mode == "frozen":
        ours.requires_grad_(False)
    _forbid_autograd_functions(monkeypatch)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "frozen": torch.enable_grad}[mode]
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        with context():
            ya = ours(x)
        with torch.no_grad():
            yb = theirs(x)
        assert ya.grad_fn is None and not ya.requires_grad
        _close(ya, yb, torch.float64)
        for (k, ba), (_, bb) in zip(ours.named_buffers(), theirs.named_buffers()):
            _close(ba, bb, torch.float64, msg=k)


@pytest.mark.parametrize("name, grad_of", [(n, "input") for n in sorted(MODULES)] + [
    (n, "params") for n in sorted(MODULES)
    if MODULES[n][3].get("affine", MODULES[n][1] is not torch.nn.InstanceNorm2d
                         and MODULES[n][1] is not torch.nn.InstanceNorm1d)
    and MODULES[n][3].get("elementwise_affine", True)])
def test_gradients_flow_when_an_input_requires_grad(name, grad_of):
    """With only the input requiring grad (frozen parameters), or only the parameters,
    the output has a grad_fn and the gradients are torch's."""
    ours_cls, theirs_cls, args, kwargs, shape = MODULES[name]
    ours, theirs = _pair(ours_cls, theirs_cls, *args, **kwargs)
    params = list(ours.parameters())
    assert params or grad_of == "input"
    if grad_of == "input":
        ours.requires_grad_(False)
        theirs.requires_grad_(False)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=grad_of == "input")
    dy = torch.randn(shape, dtype=torch.float64)
    ya = ours(x)
    assert ya.grad_fn is not None
    wanted_a = [x] if grad_of == "input" else params
    wanted_b = [x] if grad_of == "input" else list(theirs.parameters())
    ga = torch.autograd.grad(ya, wanted_a, dy)
    gb = torch.autograd.grad(theirs(x), wanted_b, dy)
    for a, b in zip(ga, gb):
        _close(a, b, torch.float64)


def test_inference_output_is_the_kernels_array(monkeypatch):
    """The inference route hands the kernel the input's memory and returns the kernel's
    own output array as the tensor (no copy on either side), calling the kernel from the
    compiled glue (no second round of checks)."""
    from cynorm import _torch_glue
    seen = {}
    forward = _torch_glue._slab_forward

    def spy(x, y, *args):
        seen["x"], seen["y"] = _address(x), _address(y)
        return forward(x, y, *args)

    monkeypatch.setattr(_torch_glue, "_slab_forward", spy)
    x = torch.randn(2, 4, 3)
    with torch.no_grad():
        y = ct.GroupNorm(2, 4)(x)
    assert seen["x"] == x.data_ptr() and seen["y"] == y.data_ptr()


# ---- double backward ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradgradcheck_float64(name):
    """Second derivatives (create_graph=True) are exact: gradgradcheck in float64 through
    the input and every parameter, in each mode."""
    factory, shape, modes = GRADCHECK[name]
    module = _randomize(factory().double())
    params = [p for _, p in module.named_parameters()]
    names = [n for n, _ in module.named_parameters()]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    for training in modes:
        module.train(training)
        if not training:
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)

        def f(x, *ps):
            return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradgradcheck(f, (x, *params), eps=1e-6, atol=1e-6,
                                            rtol=1e-5)


_RM = torch.linspace(-1, 1, 6, dtype=torch.float64)
_RV = torch.linspace(0.5, 2, 6, dtype=torch.float64)


@pytest.mark.parametrize("fn, args", [
    (lambda x, w, b: ct.group_norm(x, 3, w, b, 1e-3), (2, 6, 4)),
    (lambda x, w, b: ct.instance_norm(x, None, None, w, b, True, 0.1, 1e-4), (2, 6, 3)),
    (lambda x, w, b: ct.instance_norm(x, _RM, _RV, w, b, False, 0.1, 1e-4), (2, 6, 3)),
    (lambda x, w, b: ct.batch_norm(x, None, None, w, b, True, 0.1, 1e-4), (4, 6, 2)),
    (lambda x, w, b: ct.batch_norm(x, _RM, _RV, w, b, False, 0.1, 1e-4), (4, 6, 2)),
    (lambda x, w, b: ct.layer_norm(x.reshape(2, 4, 6), (6,), w, b), (2, 6, 4)),
    (lambda x, w, b: ct.rms_norm(x.reshape(4, 2, 6), (6,), w), (2, 6, 4)),
])
def test_functional_gradgradcheck(fn, args):
    N, C, L = args
    x = torch.randn(N, L, C, dtype=torch.float64).transpose(1, 2).requires_grad_()
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_gradient_penalty_matches_torch(name):
    """A WGAN-GP style step: the gradient of ||d out / d x||^2 with respect to the input
    and the parameters is torch's."""
    ours_cls, theirs_cls, args, kwargs, shape = MODULES[name]
    ours, theirs = _pair(ours_cls, theirs_cls, *args, **kwargs)
    v = torch.randn(shape, dtype=torch.float64)
    grads = []
    for m in (ours, theirs):
        x = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
             * 2 + 1).requires_grad_()
        (g,) = torch.autograd.grad((m(x) * v).sum(), x, create_graph=True)
        penalty = (g.square().sum() - 1.0) ** 2
        grads.append(torch.autograd.grad(penalty, [x, *m.parameters()], allow_unused=True))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or torch.all(a == 0)
        else:
            _close(a, b, torch.float64, rtol=1e-8, atol=1e-8)


# ---- memory format ------------------------------------------------------------------------

@pytest.mark.parametrize("make, shape", [
    (lambda nn: nn.GroupNorm(2, 4), (2, 4, 3, 5)),
    (lambda nn: nn.BatchNorm2d(4), (2, 4, 3, 5)),
    (lambda nn: nn.BatchNorm3d(4), (2, 4, 3, 2, 5)),
    (lambda nn: nn.GroupNorm(2, 4), (2, 4, 3, 2, 5)),
    (lambda nn: nn.InstanceNorm2d(4, affine=True), (2, 4, 3, 5)),
    (lambda nn: nn.LayerNorm(5), (2, 4, 3, 5)),
    (lambda nn: nn.RMSNorm(5), (2, 4, 3, 5)),
])
@pytest.mark.parametrize("route", ["inference", "autograd"])
def test_output_memory_format_follows_torch(make, shape, route):
    """A channels_last input gives a channels_last output for GroupNorm, BatchNorm and
    RMSNorm (as torch) and InstanceNorm (whose channels-last kernel writes that layout;
    torch's is contiguous), a contiguous one for LayerNorm (as torch), with torch's
    values, on both routes."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    theirs = _randomize(make(torch.nn).double())
    ours = make(ct).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
    with torch.no_grad():
        yb = theirs(x)
    with torch.enable_grad() if route == "autograd" else torch.no_grad():
        ya = ours(x.clone().requires_grad_(route == "autograd"))
    if isinstance(theirs, torch.nn.InstanceNorm2d):
        assert ya.is_contiguous(memory_format=fmt)
    else:
        assert ya.stride() == yb.stride()
        assert ya.is_contiguous(memory_format=fmt) == yb.is_contiguous(memory_format=fmt)
    _close(ya, yb, torch.float64)
    if isinstance(theirs, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
        assert ya.is_contiguous(memory_format=fmt)


# ---- flags torch lets users change after construction -------------------------------------

def _toggle_track(m):
    m.track_running_stats = False


def _toggle_cma(m):
    m.momentum = None


def _toggle_no_affine(m):
    m.weight = None
    m.bias = None


def _toggle_all(m):
    _toggle_track(m)
    _toggle_cma(m)
    _toggle_no_affine(m)


@pytest.mark.parametrize("cls, theirs_cls, shape", [
    (ct.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    (ct.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 3)),
    (ct.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 2)),
])
@pytest.mark.parametrize("toggle", [_toggle_track, _toggle_cma, _toggle_no_affine, _toggle_all],
                         ids=["track_running_stats_off", "momentum_none", "weight_none",
                              "all"])
@pytest.mark.parametrize("route", ["autograd", "inference"])
def test_batch_norm_flags_changed_after_construction_behave_like_torch(cls, theirs_cls, shape,
                                                                      toggle, route):
    """track_running_stats set to False after construction (buffers kept: training leaves
    running_mean, running_var and num_batches_tracked untouched, eval still uses them),
    momentum=None (cumulative moving average), weight and bias set to None: y, the
    gradients and every buffer match torch through training steps and eval."""
    ours, theirs = _pair(cls, theirs_cls, 3)
    for m in (ours, theirs):
        with torch.no_grad():
            m.running_mean.copy_(torch.linspace(-1, 1, 3))
            m.running_var.copy_(torch.linspace(0.5, 2, 3))
            m.num_batches_tracked.fill_(3)
        toggle(m)
    before = {k: b.clone() for k, b in theirs.named_buffers()}
    for step, training in enumerate([True, True, True, False]):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape, dtype=torch.float64) * (1 + step) + step
        dy = torch.randn(shape, dtype=torch.float64)
        if route == "autograd":
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            ya.backward(dy)
            yb.backward(dy)
            _close(xa.grad, xb.grad, torch.float64)
        else:
            with torch.no_grad():
                ya, yb = ours(x), theirs(x)
        _close(ya, yb, torch.float64)
        for k, b in theirs.named_buffers():
            _close(dict(ours.named_buffers())[k], b, torch.float64, msg=k)
    if toggle in (_toggle_track, _toggle_all):  # torch left the buffers untouched
        for k, b in theirs.named_buffers():
            assert torch.equal(b, before[k]), k
    else:
        assert int(theirs.num_batches_tracked) == 6


# ---- torch.compile --------------------------------------------------------------------------

def _norm_stack(norms):
    return torch.nn.Sequential(
        norms.GroupNorm(2, 6), torch.nn.ReLU(), norms.BatchNorm2d(6),
        norms.InstanceNorm2d(6, affine=True, track_running_stats=True),
        norms.LayerNorm(5), norms.RMSNorm(5)).double()


def _run_stack(model, x, dy):
    """Two training steps (output, input and parameter gradients), then eval under no_grad;
    returns every result and the buffers."""
    results = []
    model.train()
    for step in range(2):
        xs = (x + step).requires_grad_()
        y = model(xs)
        grads = torch.autograd.grad(y, [xs, *model.parameters()], dy)
        results += [y.detach(), *grads]
    model.eval()
    with torch.no_grad():
        results.append(model(x))
    return results + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_gives_eager_results(backend):
    """torch.compile (fullgraph: no graph break) with aot_eager and with inductor gives the
    eager results: outputs, gradients, running buffers, train and eval."""
    torch._dynamo.reset()
    reference = _randomize(_norm_stack(ct))
    compiled_model = _norm_stack(ct)
    compiled_model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    dy = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    want = _run_stack(reference, x, dy)
    got = _run_stack(torch.compile(compiled_model, backend=backend, fullgraph=True), x, dy)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        _close(a, b, torch.float64, rtol=1e-9, atol=1e-9, msg=f"result {i}")


def test_torch_compile_graph_holds_cynorm_operators():
    """Under torch.compile each norm is one cynorm operator in a single graph, and the
    compiled backward runs cynorm's backward operator (not the torch formulas kept for
    double backward)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    torch._dynamo.reset()
    graphs, joint = [], []

    def record(gm, example_inputs):
        graphs.append(gm)

        def keep(g, _):
            joint.append(g)
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    model = _norm_stack(ct)
    compiled = torch.compile(model, backend=record, fullgraph=True)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    _close(y, model(x), torch.float64)
    y.sum().backward()
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.cynorm.norm_forward) == 5
    forward, backward = ([n.target for n in g.graph.nodes if n.op == "call_function"]
                         for g in joint)
    assert forward.count(torch.ops.cynorm.norm_forward.default) == 5
    assert backward.count(torch.ops.cynorm.norm_backward.default) == 5


def test_view_cache_sees_a_parameter_reshaped_in_place():
    """`.data =` a view at the same address but of another shape is not served from the
    module's cached NumPy view: the shape check runs and names the argument."""
    m = cynorm.torch.GroupNorm(4, 8)
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        m(x)
        m.weight.data = m.weight.data[:4]
        with pytest.raises(ValueError, match="weight"):
            m(x)


# ---- the compiled per-call glue (cynorm/_torch_glue.pyx) -----------------------------------

@pytest.mark.parametrize("name", sorted(MODULES))
def test_inference_of_an_input_that_requires_grad_under_no_grad_is_torchs(name):
    """Under no_grad an input that requires grad is normalised like any other, on the
    first call and on the next ones (the parameters' views then come from the module's
    cache), and the output has no grad_fn."""
    ours_cls, theirs_cls, args, kwargs, shape = MODULES[name]
    ours, theirs = _pair(ours_cls, theirs_cls, *args, **kwargs)
    ours.eval()
    theirs.eval()
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    with torch.no_grad():
        first, second, want = ours(x), ours(x), theirs(x)
    for y in (first, second):
        assert y.grad_fn is None and not y.requires_grad
        _close(y, want, torch.float64)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("make, attr, value, match", [
    (lambda: ct.GroupNorm(2, 6), "num_groups", 4, "num_groups"),
    (lambda: ct.GroupNorm(2, 6), "activation", "bogus", "activation"),
    (lambda: ct.GroupNorm(2, 6), "eps", -1.0, "eps"),
    (lambda: ct.LayerNorm(6), "eps", -1.0, "eps"),
    (lambda: ct.RMSNorm(6), "eps", float("nan"), "eps"),
    (lambda: ct.BatchNorm1d(6).eval(), "activation", 3, "activation"),
])
def test_module_attributes_changed_after_construction_are_checked(make, attr, value,
                                                                  match, grad):
    """A module attribute set to a bad value after construction is caught on the call
    (the compiled fast path hands such calls to the checking route), with or without
    autograd recording the call."""
    m = make()
    setattr(m, attr, value)
    x = torch.randn(4, 6, requires_grad=grad)
    with pytest.raises(ValueError, match=match):
        m(x)


def test_batch_norm_in_eval_checks_the_input_dims_like_torch():
    with pytest.raises(ValueError, match="expected 4D input"):
        ct.BatchNorm2d(6).eval()(torch.randn(2, 6))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        ct.BatchNorm1d(6).eval()(torch.randn(2, 6, 3, 3))


@pytest.mark.parametrize("make, shape", [(lambda: ct.GroupNorm(2, 4), (2, 4, 3)),
                                         (lambda: ct.LayerNorm(4), (3, 4)),
                                         (lambda: ct.BatchNorm1d(4), (3, 4))])
def test_input_changed_in_place_before_the_backward_is_an_error(make, shape):
    """The backward runs on the input's memory, so torch's check that a saved tensor was
    not changed in place since the forward must still run (on the first call and on the
    next ones, which use the module's cached views)."""
    m = make()
    x = torch.randn(shape, requires_grad=True)
    for _ in range(2):
        h = x * 1.0
        y = m(h)
        h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(torch.ones_like(y))


def test_glue_wraps_a_tensors_memory_and_declines_what_it_cannot():
    """array_of: a writable C-contiguous array on the tensor's own memory for contiguous
    float32/float64 CPU tensors (requiring grad or not), None for everything the general
    route must handle."""
    from cynorm._torch_glue import array_of
    for dtype, np_dtype in ((torch.float32, np.float32), (torch.float64, np.float64)):
        x = torch.randn(3, 4, dtype=dtype)
        for t in (x, x.clone().requires_grad_()):
            a = array_of(t)
            assert _address(a) == t.data_ptr()
            assert a.shape == (3, 4) and a.dtype == np_dtype
            assert a.flags.c_contiguous and a.flags.writeable
            np.testing.assert_array_equal(a, t.detach().numpy())
    x = torch.randn(3, 4)
    array_of(x)[1, 2] = 7.0
    assert x[1, 2] == 7.0
    for t in (x.t(), torch._neg_view(x), x.half(), x.to(torch.bfloat16), x.long(),
              torch.nn.Parameter(x), x.numpy(), None):
        assert array_of(t) is None
    assert array_of(torch.empty(0, 3)).shape == (0, 3)
    deep = torch.randn([1] * 17 + [2])
    np.testing.assert_array_equal(array_of(deep), deep.numpy())
    a = array_of(torch.arange(4.0, dtype=torch.float64))  # the array keeps the memory
    import gc
    gc.collect()
    np.testing.assert_array_equal(a, [0.0, 1.0, 2.0, 3.0])
