"""cynorm's public functions and layers take torch's arguments in torch's order: a torch
user who passes them positionally gets the same meaning. Checked against
torch.nn.functional and torch.nn by inspection (names, order, defaults) and by calling
both with the same positional arguments.

Deliberate differences, each checked here:
- the input is called `x` (torch: `input`); the cynorm.torch bridge keeps `input`;
- batch_norm's running_mean and running_var default to None (torch requires them as
  arguments, None allowed): with training=True they may be left out;
- cynorm's extras are keyword-only, after torch's parameters: out, return_stats, stats,
  the fused epilogues (activation on the channel ops, residual and residual_out on the
  row ops) and channel_axis (the channel ops' layout); the layers' activation and
  channel_axis are keyword-only too;
- the layers take `dtype` where torch's modules take (device, dtype).
"""
import inspect

import numpy as np
import pytest

import cynorm
from cynorm import nn

torch = pytest.importorskip("torch")
F = torch.nn.functional

OPS = ["group_norm", "instance_norm", "batch_norm", "layer_norm", "rms_norm"]
EXTRAS = {"out", "return_stats", "stats", "activation", "residual", "residual_out",
          "channel_axis"}
# cynorm.nn's keyword-only extras beyond torch's
LAYER_EXTRAS = {("activation", None), ("channel_axis", 1)}
# parameters that torch requires and cynorm lets default (see the module docstring)
OPTIONAL_IN_CYNORM = {("batch_norm", "running_mean"), ("batch_norm", "running_var")}


def _positional(fn):
    return [p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("op", OPS)
def test_functional_positional_parameters_are_torchs(op):
    ours = _positional(getattr(cynorm, op))
    theirs = _positional(getattr(F, op))
    assert [p.name for p in ours] == ["x"] + [p.name for p in theirs[1:]]
    assert theirs[0].name == "input"
    for p, t in zip(ours[1:], theirs[1:]):
        if t.default is inspect.Parameter.empty:
            assert p.default is inspect.Parameter.empty or (op, p.name) in OPTIONAL_IN_CYNORM
        else:
            assert p.default == t.default, (op, p.name)
    rest = [p for p in inspect.signature(getattr(cynorm, op)).parameters.values()
            if p not in ours]
    assert all(p.kind == p.KEYWORD_ONLY for p in rest)
    assert {p.name for p in rest} <= EXTRAS


@pytest.mark.parametrize("op", OPS)
def test_torch_bridge_signatures_are_torchs(op):
    import cynorm.torch as ct
    ours = list(inspect.signature(getattr(ct, op)).parameters.values())
    theirs = list(inspect.signature(getattr(F, op)).parameters.values())
    assert [(p.name, p.default) for p in ours[:len(theirs)]] == \
        [(p.name, p.default) for p in theirs]
    # then the fused epilogue, keyword-only, off by default
    extra = {"layer_norm": "residual", "rms_norm": "residual"}.get(op, "activation")
    assert [(p.name, p.kind, p.default) for p in ours[len(theirs):]] == \
        [(extra, inspect.Parameter.KEYWORD_ONLY, None)]


def _args(rng, op):
    """Distinct positional arguments in torch's order, every one of them given (so that
    a swap of any two changes the result), as NumPy arrays and as tensors."""
    C = 4
    x = rng.standard_normal((3, C, 5)) * 2 + 1
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    if op == "group_norm":
        args = [x, 2, w, b, 1e-3]
    elif op == "instance_norm":
        args = [x, rm, rv, w, b, False, 0.3, 1e-3]
    elif op == "batch_norm":
        args = [x, rm, rv, w, b, False, 0.3, 1e-3]
    elif op == "layer_norm":
        x = rng.standard_normal((3, 4, 5)) + 1
        args = [x, [4, 5], rng.uniform(0.5, 1.5, (4, 5)), rng.standard_normal((4, 5)), 1e-3]
    else:
        x = rng.standard_normal((3, 4, 5)) + 1
        args = [x, [4, 5], rng.uniform(0.5, 1.5, (4, 5)), 1e-3]
    targs = [torch.tensor(a) if isinstance(a, np.ndarray) else a for a in args]
    return args, targs


@pytest.mark.parametrize("op, training", [
    ("group_norm", None), ("layer_norm", None), ("rms_norm", None),
    ("instance_norm", True), ("instance_norm", False),
    ("batch_norm", True), ("batch_norm", False),
])
def test_functional_positional_call_means_what_it_means_in_torch(op, training):
    rng = np.random.default_rng(7)
    args, targs = _args(rng, op)
    if training is not None:
        args[5] = targs[5] = training
    y = getattr(cynorm, op)(*args)
    ty = getattr(F, op)(*targs)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-10, atol=1e-10)
    if training is not None:  # the running statistics, updated alike (or not at all)
        np.testing.assert_allclose(args[1], targs[1].numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(args[2], targs[2].numpy(), rtol=1e-12, atol=1e-12)


LAYERS = [
    (nn.GroupNorm, torch.nn.GroupNorm),
    (nn.InstanceNorm, torch.nn.InstanceNorm1d),
    (nn.InstanceNorm, torch.nn.InstanceNorm2d),
    (nn.BatchNorm, torch.nn.BatchNorm1d),
    (nn.LayerNorm, torch.nn.LayerNorm),
    (nn.RMSNorm, torch.nn.RMSNorm),
]


@pytest.mark.parametrize("ours, theirs", LAYERS, ids=lambda c: c.__name__)
def test_layer_constructor_parameters_are_torchs(ours, theirs):
    """Everything before torch's (device, dtype) in torch's order with torch's defaults;
    then cynorm's dtype; the same keyword-only parameters (bias) with the same defaults."""
    def split(cls):
        ps = list(inspect.signature(cls).parameters.values())
        return ([p for p in ps if p.kind == p.POSITIONAL_OR_KEYWORD],
                [(p.name, p.default) for p in ps if p.kind == p.KEYWORD_ONLY])

    mine, mine_kw = split(ours)
    torchs, torchs_kw = split(theirs)
    cut = [p.name for p in torchs].index("device")
    assert [(p.name, p.default) for p in mine[:-1]] == \
        [(p.name, p.default) for p in torchs[:cut]]
    assert mine[-1].name == "dtype" and [p.name for p in torchs[cut:]] == ["device", "dtype"]
    assert [kw for kw in mine_kw if kw not in LAYER_EXTRAS] == torchs_kw
