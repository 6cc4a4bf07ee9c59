"""cynorm.torch's per-call shortcuts (cynorm/_torch_glue.pyx): the NumPy views of a
module's parameters and buffers kept between calls must follow every change of those
tensors, the compiled checked route must give torch's results and keep the general
route's errors, and a training batch norm's running statistics (updated by the glue's
own loop) must be those of the NumPy API and of the formula."""
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cynorm  # noqa: E402
import cynorm.torch as ct  # noqa: E402

# (cynorm.torch module, torch.nn twin, input shape); eval mode unless said
CASES = {
    "group": (lambda: ct.GroupNorm(2, 6), lambda: torch.nn.GroupNorm(2, 6), (3, 6, 4)),
    "layer": (lambda: ct.LayerNorm(6), lambda: torch.nn.LayerNorm(6), (3, 6)),
    "rms": (lambda: ct.RMSNorm(6), lambda: torch.nn.RMSNorm(6), (3, 6)),
    "batch_eval": (lambda: ct.BatchNorm1d(6), lambda: torch.nn.BatchNorm1d(6), (4, 6)),
    "instance": (lambda: ct.InstanceNorm1d(6, affine=True),
                 lambda: torch.nn.InstanceNorm1d(6, affine=True), (2, 6, 5)),
    "sync_single": (lambda: ct.SyncBatchNorm(6), lambda: torch.nn.BatchNorm1d(6), (4, 6)),
}


def _twins(name, dtype=torch.float32):
    make_ours, make_theirs, shape = CASES[name]
    theirs = make_theirs().to(dtype).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
        for b in (getattr(theirs, "running_mean", None), getattr(theirs, "running_var", None)):
            if b is not None:
                b.uniform_(0.5, 1.5)
    ours = make_ours().to(dtype).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


def _same_result(ours, theirs, x, grad):
    """ours(x) equals theirs(x), and with grad the input's and parameters' gradients too."""
    if not grad:
        with torch.no_grad():
            y, want = ours(x), theirs(x)
        assert y.grad_fn is None
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        return
    dy = torch.randn(x.shape, dtype=x.dtype)
    got = torch.autograd.grad(ours(xg := x.clone().requires_grad_()), [xg, *ours.parameters()],
                              dy)
    want = torch.autograd.grad(theirs(xt := x.clone().requires_grad_()),
                               [xt, *theirs.parameters()], dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _both(ours, theirs, fn):
    with torch.no_grad():
        fn(ours)
        fn(theirs)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_views_follow_every_change_of_the_parameters(name, grad):
    """Between calls (the second one served from the module's cache), a parameter or
    buffer changed in place, a parameter replaced by another Parameter, `.data =` new
    memory, load_state_dict, and the module moved to another dtype are all seen."""
    torch.manual_seed(0)
    ours, theirs, shape = _twins(name)
    x = torch.randn(shape) * 2 + 0.5
    _same_result(ours, theirs, x, grad)
    _same_result(ours, theirs, x, grad)  # from the cache

    _both(ours, theirs, lambda m: m.weight.mul_(1.7))  # in place (an optimizer step)
    _same_result(ours, theirs, x, grad)

    if getattr(theirs, "running_var", None) is not None:
        _both(ours, theirs, lambda m: m.running_var.add_(0.3))
        _same_result(ours, theirs, x, grad)

    new_w = torch.rand(ours.weight.shape) + 0.5
    ours.weight = torch.nn.Parameter(new_w.clone())  # replaced
    theirs.weight = torch.nn.Parameter(new_w.clone())
    _same_result(ours, theirs, x, grad)

    new_w = torch.rand(ours.weight.shape) + 0.5
    ours.weight.data = new_w.clone()  # new memory under the same Parameter
    theirs.weight.data = new_w.clone()
    _same_result(ours, theirs, x, grad)

    state = {k: v + 0.25 if v.is_floating_point() else v
             for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    _same_result(ours, theirs, x, grad)

    ours.double()  # another dtype: the float32 views must not be used
    theirs.double()
    _same_result(ours, theirs, x.double(), grad)
    ours.float()
    theirs.float()
    _same_result(ours, theirs, x, grad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_non_contiguous_input_gives_torchs_result(name):
    """A non-contiguous input (declined by the compiled route) is normalised as torch
    does, before and after a call that filled the cache."""
    ours, theirs, shape = _twins(name)
    base = torch.randn(shape[::-1])
    x = base.permute(*range(len(shape) - 1, -1, -1))
    assert not x.is_contiguous()
    _same_result(ours, theirs, x.contiguous(), False)
    _same_result(ours, theirs, x, False)
    _same_result(ours, theirs, x, True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_inputs_keep_their_errors_after_the_cache_is_filled(name):
    """An integer input is a TypeError naming the input, and a float32 input to a
    float64 module is the float64 module's result (the parameters converted), on the
    compiled route's first call and on the next ones."""
    ours, theirs, shape = _twins(name)
    x = torch.randn(shape)
    with torch.no_grad():
        ours(x)
        ours(x)
        with pytest.raises(TypeError, match="input"):
            ours(torch.ones(shape, dtype=torch.int64))
    ours.double()
    theirs.double()
    with torch.no_grad():
        y = ours(x)
        want = theirs(x.double())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)


def _reference_running(buffer, momentum, batch, unbiased):
    """torch's running update in float64: (1 - momentum) * r + momentum * statistic."""
    r = buffer.astype(np.float64)
    axes = (0,) + tuple(range(2, batch.ndim))
    stat = batch.var(axis=axes, ddof=1) if unbiased else batch.mean(axis=axes)
    return (1.0 - momentum) * r + momentum * stat


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("momentum", [0.1, 0.35, None])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
def test_training_batch_norm_running_statistics(dtype, momentum, grad):
    """Each training step updates running_mean and running_var in place to
    (1 - m) * r + m * (batch mean, unbiased batch variance) (m: momentum, or 1 / steps
    for momentum=None), the values NumPy's cynorm.batch_norm gives, bit for bit, and
    counts the batch once in num_batches_tracked."""
    torch.manual_seed(1)
    m = ct.BatchNorm2d(5, momentum=momentum).to(dtype).train()
    rm_ptr, rv_ptr = m.running_mean.data_ptr(), m.running_var.data_ptr()
    api_rm = m.running_mean.numpy().copy()
    api_rv = m.running_var.numpy().copy()
    np_dtype = api_rm.dtype
    for step in range(1, 4):
        x = torch.randn(3, 5, 2, 4, dtype=dtype) * step + step
        factor = 1.0 / step if momentum is None else momentum
        want_rm = _reference_running(m.running_mean.numpy(), factor, x.numpy().astype(np.float64),
                                     False)
        want_rv = _reference_running(m.running_var.numpy(), factor, x.numpy().astype(np.float64),
                                     True)
        if grad:
            m(x.clone().requires_grad_()).sum().backward()
        else:
            with torch.no_grad():
                m(x)
        cynorm.batch_norm(x.numpy(), api_rm, api_rv, None, None, True, factor, 1e-5)
        assert m.running_mean.data_ptr() == rm_ptr and m.running_var.data_ptr() == rv_ptr
        assert int(m.num_batches_tracked) == step  # counted once per batch
        assert m.running_mean.numpy().dtype == np_dtype
        np.testing.assert_array_equal(m.running_mean.numpy(), api_rm)
        np.testing.assert_array_equal(m.running_var.numpy(), api_rv)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(m.running_mean.numpy(), want_rm, rtol=tol, atol=tol)
        np.testing.assert_allclose(m.running_var.numpy(), want_rv, rtol=tol, atol=tol)


def test_running_statistics_of_another_float_dtype_are_updated_as_the_api_does():
    """A float16 running buffer next to float32 data (not the compiled loop's case) is
    updated as cynorm.batch_norm updates it."""
    m = ct.BatchNorm1d(4).train()
    m.running_mean = m.running_mean.half()
    m.running_var = m.running_var.half()
    api_rm, api_rv = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
    x = torch.randn(6, 4) * 3 + 1
    with torch.no_grad():
        m(x)
    cynorm.batch_norm(x.numpy(), api_rm, api_rv, None, None, True, 0.1, 1e-5)
    np.testing.assert_array_equal(m.running_mean.numpy(), api_rm)
    np.testing.assert_array_equal(m.running_var.numpy(), api_rv)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_view_cache_stays_out_of_pickles_and_copies(name):
    """A module that filled its cache pickles and deep-copies without it, and the copy
    computes with its own parameters."""
    ours, theirs, shape = _twins(name)
    x = torch.randn(shape)
    with torch.no_grad():
        ours(x)
    assert "_cynorm_views" in ours.__dict__
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert "_cynorm_views" not in clone.__dict__
        with torch.no_grad():
            clone.weight.mul_(2.0)
            theirs_copy = copy.deepcopy(theirs)
            theirs_copy.weight.mul_(2.0)
        _same_result(clone, theirs_copy, x, False)
    _same_result(ours, theirs, x, False)  # the original untouched


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_large_outputs_of_the_glue_come_from_the_output_cache(grad):
    """The compiled route allocates as the NumPy API's checked entries do: an output
    (and an input gradient) of 16 MiB and more from the output cache, a small one not;
    values are torch's."""
    from cynorm import _pool

    def taken():
        info = cynorm.output_cache_info()
        return info["hits"] + info["maps"]

    previous = cynorm.set_output_cache(1 << 30)
    try:
        big, small = (2, 8, 512, 520), (2, 8, 4, 4)
        assert np.prod(big) * 4 >= _pool.MIN_BYTES > np.prod(small) * 4
        ours, theirs = ct.GroupNorm(4, 8), torch.nn.GroupNorm(4, 8)
        for shape in (small, small, big, big):
            x = torch.randn(shape)
            before = taken()
            if grad:
                xg = x.clone().requires_grad_()
                y = ours(xg)
                y.backward(torch.ones_like(y))
                xt = x.clone().requires_grad_()
                theirs(xt).backward(torch.ones_like(y))
                torch.testing.assert_close(xg.grad, xt.grad, rtol=1e-4, atol=1e-4)
            else:
                with torch.no_grad():
                    y = ours(x)
            # y (and dx) from the cache for the large shape only
            assert taken() - before == (0 if shape == small else 2 if grad else 1)
            with torch.no_grad():
                torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
    finally:
        cynorm.set_output_cache(previous)


# ---- the compiled training route ---------------------------------------------------------
# A module's training call whose views are cached runs in _torch_glue.function_forward /
# function_backward (the autograd Function's forward and backward), keeping the input and
# parameters as attributes with their versions instead of save_for_backward.

TRAIN_CASES = {  # (cynorm.torch module, torch.nn twin, input shape), train mode
    "group": (lambda: ct.GroupNorm(2, 6), lambda: torch.nn.GroupNorm(2, 6), (3, 6, 4)),
    "group_tiny": (lambda: ct.GroupNorm(32, 32), lambda: torch.nn.GroupNorm(32, 32),
                   (1, 32, 8, 8)),
    "layer": (lambda: ct.LayerNorm(6), lambda: torch.nn.LayerNorm(6), (3, 6)),
    "layer_2d": (lambda: ct.LayerNorm((3, 4)), lambda: torch.nn.LayerNorm((3, 4)),
                 (2, 5, 3, 4)),
    "rms": (lambda: ct.RMSNorm(6), lambda: torch.nn.RMSNorm(6), (3, 6)),
    "batch": (lambda: ct.BatchNorm1d(6), lambda: torch.nn.BatchNorm1d(6), (4, 6)),
    "batch_2d": (lambda: ct.BatchNorm2d(3), lambda: torch.nn.BatchNorm2d(3), (2, 3, 2, 3)),
}


def _train_twins(name, dtype):
    make_ours, make_theirs, shape = TRAIN_CASES[name]
    theirs = make_theirs().to(dtype).train()
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = make_ours().to(dtype).train()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


def _compiled_route(y):
    """Whether the autograd node of y was recorded by the compiled training route."""
    return y.grad_fn.state[1] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name, wanted", [
    (name, wanted) for name in sorted(TRAIN_CASES)
    for wanted in ("input", "weight", "bias", "all", "params")
    if not (name == "rms" and wanted == "bias")])  # RMSNorm has no bias
def test_compiled_training_route_gives_torchs_gradients(name, wanted, dtype):
    """Whatever subset of input, weight and bias requires grad, the compiled route (a
    module's calls after the first) gives torch's output and torch's gradients for
    exactly that subset (None for the rest), and the same running statistics."""
    ours, theirs, shape = _train_twins(name, dtype)
    names = {"all": ("input", "weight", "bias"), "params": ("weight", "bias")}.get(
        wanted, (wanted,))
    for m in (ours, theirs):
        for pname, p in m.named_parameters():
            p.requires_grad_(pname in names)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):  # the first call fills the view cache; the next ones use it
        x = torch.randn(shape, dtype=dtype, generator=gen) * 2 + 0.5
        dy = torch.randn(shape, dtype=dtype, generator=gen)
        results = []
        for m in (ours, theirs):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_("input" in names)
            y = m(xi)
            y.backward(dy)
            results.append((y, xi.grad, m.weight.grad, getattr(m, "bias", None)))
        (ya, ga, wa, ba), (yb, gb, wb, bb) = results
        if step:
            assert _compiled_route(ya)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9,
                                                                            atol=1e-9)
        torch.testing.assert_close(ya, yb, **tol)
        for a, b in ((ga, gb), (wa, wb)):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b, **tol)
        if ba is not None:
            assert (ba.grad is None) == (bb.grad is None)
            if bb.grad is not None:
                torch.testing.assert_close(ba.grad, bb.grad, **tol)
        if hasattr(theirs, "running_mean"):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
            torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("changed", ["input", "weight"])
@pytest.mark.parametrize("name", ["group", "layer", "batch"])
def test_compiled_training_route_refuses_a_backward_after_an_in_place_change(name, changed):
    """The backward reads the forward's input and weight: one of them changed in place
    between the forward and the backward (an optimizer step too early) is torch's
    RuntimeError, as it is for torch's own module, not a gradient of the new values."""
    shape = TRAIN_CASES[name][2]
    for m in _train_twins(name, torch.float32)[:2]:
        m(torch.randn(shape))  # fills the view cache
        x = torch.randn(shape, requires_grad=True)
        h = x * 1.0
        y = m(h)
        if isinstance(m, (ct.GroupNorm, ct.LayerNorm, ct.BatchNorm1d)):
            assert _compiled_route(y)
        with torch.no_grad():
            {"input": h, "weight": m.weight}[changed].add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(torch.ones_like(y))


@pytest.mark.parametrize("make, shape", [
    (lambda: ct.GroupNorm(2, 6, activation="silu"), (3, 6, 4)),
    (lambda: ct.BatchNorm1d(6, activation="gelu"), (4, 6)),
])
def test_compiled_training_route_with_an_activation_refuses_a_changed_bias(make, shape):
    """With a fused activation the backward reads the bias too (the activation's
    input): a bias changed in place before the backward is the same RuntimeError."""
    m = make().train()
    m(torch.randn(shape))
    y = m(torch.randn(shape, requires_grad=True))
    assert _compiled_route(y)
    with torch.no_grad():
        m.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones_like(y))


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_compiled_training_route_is_differentiable_twice(name):
    """create_graph=True through the compiled route (a gradient penalty on a module's
    later calls): the second-order gradients are torch's."""
    ours, theirs, shape = _train_twins(name, torch.float64)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 1
    v = torch.randn(shape, dtype=torch.float64, generator=gen)
    grads = []
    for m in (ours, theirs):
        m(x0.clone().requires_grad_())  # fills the view cache
        x = x0.clone().requires_grad_()
        y = m(x)
        if m is ours:
            assert _compiled_route(y)
        (g,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
        penalty = (g.square().sum() - 1.0) ** 2
        grads.append(torch.autograd.grad(penalty, [x, *m.parameters()], allow_unused=True))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or torch.all(a == 0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["group", "layer", "batch"])
def test_compiled_training_route_keeps_torchs_backward_twice_error(name):
    """Nothing goes through save_for_backward on the compiled route, yet a second
    backward through a freed graph is torch's RuntimeError, as for torch's module; with
    retain_graph=True the second backward adds the same gradients again."""
    shape = TRAIN_CASES[name][2]
    for m in _train_twins(name, torch.float64)[:2]:
        m(torch.randn(shape, dtype=torch.float64))  # fills the view cache
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = m(x)
        if isinstance(m, (ct.GroupNorm, ct.LayerNorm, ct.BatchNorm1d)):
            assert _compiled_route(y)
        dy = torch.randn(shape, dtype=torch.float64)
        y.backward(dy)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.backward(dy)
        x.grad = None
        y = m(x)
        y.backward(dy, retain_graph=True)
        once = x.grad.clone()
        y.backward(dy)
        torch.testing.assert_close(x.grad, 2 * once, rtol=1e-12, atol=1e-12)
