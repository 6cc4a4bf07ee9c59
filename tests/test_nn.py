"""cynorm.nn: the stateful layers agree with plain NumPy references, with cynorm's
functional API, with finite differences and (where torch is installed) with torch.nn;
their state loads from and into torch's state_dict; misuse raises clear errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cynorm
from cynorm import nn


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


# ---- plain float64 NumPy references, written from the definitions -----------------------

def _normalize(x, axes, eps):
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _per_channel(p, ndim):
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def reference_forward(layer, x):
    """The output of `layer` on x, computed in float64 from the definitions."""
    x = x.astype(np.float64)
    p = {k: v.astype(np.float64) for k, v in layer.parameters().items()}
    if isinstance(layer, (nn.GroupNorm, nn.InstanceNorm, nn.BatchNorm)):
        if isinstance(layer, nn.InstanceNorm) and not layer.training and \
                layer.track_running_stats:
            rm = _per_channel(layer.running_mean.astype(np.float64), x.ndim)
            rv = _per_channel(layer.running_var.astype(np.float64), x.ndim)
            xhat = (x - rm) / np.sqrt(rv + layer.eps)
        elif isinstance(layer, nn.BatchNorm):
            if layer.training or not layer.track_running_stats:
                xhat = _normalize(x, (0,) + tuple(range(2, x.ndim)), layer.eps)
            else:
                rm = _per_channel(layer.running_mean.astype(np.float64), x.ndim)
                rv = _per_channel(layer.running_var.astype(np.float64), x.ndim)
                xhat = (x - rm) / np.sqrt(rv + layer.eps)
        else:
            G = layer.num_groups if isinstance(layer, nn.GroupNorm) else x.shape[1]
            xhat = _normalize(x.reshape(x.shape[0], G, -1), 2, layer.eps).reshape(x.shape)
        w = _per_channel(p["weight"], x.ndim) if "weight" in p else 1.0
        b = _per_channel(p["bias"], x.ndim) if "bias" in p else 0.0
        return xhat * w + b
    axes = tuple(range(x.ndim - len(layer.normalized_shape), x.ndim))
    if isinstance(layer, nn.LayerNorm):
        xhat = _normalize(x, axes, layer.eps)
        return xhat * p.get("weight", 1.0) + p.get("bias", 0.0)
    eps = np.finfo(layer.dtype).eps if layer.eps is None else layer.eps
    return x / np.sqrt((x ** 2).mean(axis=axes, keepdims=True) + eps) * p.get("weight", 1.0)


# (layer factory taking a dtype, input shape)
LAYERS = {
    "group": (lambda dt: nn.GroupNorm(2, 4, dtype=dt), (3, 4, 5)),
    "group_2d_no_affine": (lambda dt: nn.GroupNorm(1, 6, affine=False, dtype=dt), (2, 6, 3, 2)),
    "group_no_bias": (lambda dt: nn.GroupNorm(3, 6, dtype=dt, bias=False), (2, 6, 4)),
    "instance": (lambda dt: nn.InstanceNorm(4, dtype=dt), (3, 4, 5)),
    "instance_affine": (lambda dt: nn.InstanceNorm(3, affine=True, eps=1e-3, dtype=dt),
                        (2, 3, 2, 3)),
    "instance_tracked": (lambda dt: nn.InstanceNorm(3, 1e-4, 0.3, True, True, dtype=dt),
                         (4, 3, 5)),
    "batch": (lambda dt: nn.BatchNorm(4, dtype=dt), (6, 4, 3)),
    "batch_nc": (lambda dt: nn.BatchNorm(5, momentum=None, dtype=dt), (7, 5)),
    "batch_untracked": (lambda dt: nn.BatchNorm(3, track_running_stats=False, dtype=dt),
                        (4, 3, 2, 2)),
    "batch_no_bias": (lambda dt: nn.BatchNorm(3, dtype=dt, bias=False), (5, 3, 2)),
    "layer": (lambda dt: nn.LayerNorm((4, 5), dtype=dt), (3, 4, 5)),
    "layer_no_bias": (lambda dt: nn.LayerNorm(5, bias=False, dtype=dt), (2, 3, 5)),
    "layer_no_affine": (lambda dt: nn.LayerNorm(6, elementwise_affine=False, dtype=dt),
                        (4, 6)),
    "rms": (lambda dt: nn.RMSNorm((4, 5), dtype=dt), (3, 4, 5)),
    "rms_eps": (lambda dt: nn.RMSNorm(6, eps=1e-2, dtype=dt), (5, 6)),
}


def make(name, dtype, rng):
    """A layer with random (non-trivial) parameters, and a random input."""
    factory, shape = LAYERS[name]
    layer = factory(dtype)
    for p in layer.parameters().values():
        p[...] = rng.uniform(0.5, 1.5, p.shape) if p is layer.weight else rng.normal(size=p.shape)
    x = (rng.normal(size=shape) * 2.0 + 0.5).astype(dtype)
    return layer, x


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_forward_matches_numpy_reference(name, dtype, rng):
    layer, x = make(name, dtype, rng)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, reference_forward(layer, x), **tol(dtype))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_backward_matches_finite_differences(name, rng):
    """Directional derivatives of L = sum(y * r) in float64, for x and every parameter."""
    layer, x = make(name, np.float64, rng)
    r = rng.normal(size=x.shape)
    layer(x)
    dx = layer.backward(r)
    grads = layer.grads
    assert set(grads) == set(layer.parameters())
    h = 1e-6

    def loss():
        return float((layer(x) * r).sum())

    for _ in range(2):
        v = rng.normal(size=x.shape)
        x0 = x.copy()
        x[...] = x0 + h * v
        up = loss()
        x[...] = x0 - h * v
        down = loss()
        x[...] = x0
        np.testing.assert_allclose((up - down) / (2 * h), (dx * v).sum(), rtol=1e-6, atol=1e-7)
        for pname, p in layer.parameters().items():
            u = rng.normal(size=p.shape)
            p0 = p.copy()
            p[...] = p0 + h * u
            up = loss()
            p[...] = p0 - h * u
            down = loss()
            p[...] = p0
            np.testing.assert_allclose((up - down) / (2 * h), (grads[pname] * u).sum(),
                                       rtol=1e-6, atol=1e-7, err_msg=pname)


def _functional(layer, x, dy):
    """The layer's computation through cynorm's functional API: (y, dx, grads)."""
    w, b = layer.weight, layer.bias
    if isinstance(layer, nn.GroupNorm):
        y, m, s = cynorm.group_norm(x, layer.num_groups, w, b, layer.eps, return_stats=True)
        dx, dw, db = cynorm.group_norm_backward(dy, x, m, s, layer.num_groups, w)
    elif isinstance(layer, nn.InstanceNorm):
        running = ((layer.running_mean.copy(), layer.running_var.copy())
                   if layer.track_running_stats else (None, None))
        y, m, s = cynorm.instance_norm(x, *running, w, b, True, layer.momentum or 0.0,
                                       layer.eps, return_stats=True)
        dx, dw, db = cynorm.instance_norm_backward(dy, x, m, s, w)
    elif isinstance(layer, nn.BatchNorm):
        y, m, s = cynorm.batch_norm(x, None, None, w, b, training=True, eps=layer.eps,
                                    return_stats=True)
        dx, dw, db = cynorm.batch_norm_backward(dy, x, m, s, w, training=True)
    elif isinstance(layer, nn.LayerNorm):
        ns = layer.normalized_shape
        y, m, s = cynorm.layer_norm(x, ns, w, b, layer.eps, return_stats=True)
        dx, dw, db = cynorm.layer_norm_backward(dy, x, m, s, ns, w)
    else:
        ns = layer.normalized_shape
        y, s = cynorm.rms_norm(x, ns, w, layer.eps, return_stats=True)
        dx, dw = cynorm.rms_norm_backward(dy, x, s, ns, w)
        db = None
    grads = {k: g for k, g in (("weight", dw), ("bias", db)) if k in layer.parameters()}
    return y, dx, grads


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_is_the_functional_api(name, dtype, rng):
    """Forward, backward and parameter gradients bitwise equal to the functional calls."""
    layer, x = make(name, dtype, rng)
    dy = rng.normal(size=x.shape).astype(dtype)
    y_ref, dx_ref, grads_ref = _functional(layer, x, dy)
    y = layer(x)
    dx = layer.backward(dy)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    assert set(layer.grads) == set(grads_ref)
    for k, g in layer.grads.items():
        assert g.dtype == layer.parameters()[k].dtype and g.shape == layer.parameters()[k].shape
        np.testing.assert_array_equal(g, grads_ref[k])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_parameters_are_float32_ones_and_zeros_by_default(name):
    factory, _ = LAYERS[name]
    layer = factory(np.float32)
    params = layer.parameters()
    for k, p in params.items():
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p, 1.0 if k == "weight" else 0.0)
    expected = set()
    if getattr(layer, "affine", False) or getattr(layer, "elementwise_affine", False):
        expected.add("weight")
        if not isinstance(layer, nn.RMSNorm) and "no_bias" not in name:
            expected.add("bias")
    assert set(params) == expected


def test_parameters_are_live_arrays(rng):
    layer, x = make("group", np.float64, rng)
    layer.parameters()["bias"] += 3.0
    layer.parameters()["weight"] *= 2.0
    np.testing.assert_allclose(layer(x), reference_forward(layer, x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.bias, layer.state_dict()["bias"])


def test_float64_parameters_with_float32_input(rng):
    layer = nn.LayerNorm(5, dtype=np.float64)
    layer.weight[...] = rng.uniform(0.5, 1.5, 5)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    y = layer(x)
    assert y.dtype == np.float32
    layer.backward(np.ones_like(y))
    assert layer.grads["weight"].dtype == np.float64
    np.testing.assert_allclose(y, reference_forward(layer, x), rtol=1e-5, atol=1e-5)


# ---- BatchNorm's running statistics and modes ---------------------------------------------

def test_batchnorm_running_stats_follow_momentum(rng):
    bn = nn.BatchNorm(3, momentum=0.25, dtype=np.float64)
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.normal(size=(5, 3, 4)) * 3 + 1
        bn(x)
        flat = x.transpose(1, 0, 2).reshape(3, -1)
        mean = 0.75 * mean + 0.25 * flat.mean(axis=1)
        var = 0.75 * var + 0.25 * flat.var(axis=1, ddof=1)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-12)
    assert bn.num_batches_tracked == 3


def test_batchnorm_momentum_none_is_a_cumulative_average(rng):
    bn = nn.BatchNorm(2, momentum=None, dtype=np.float64)
    batches = [rng.normal(size=(4, 2)) * (i + 1) + i for i in range(4)]
    for x in batches:
        bn(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(axis=0) for x in batches], axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(bn.running_var,
                               np.mean([x.var(axis=0, ddof=1) for x in batches], axis=0),
                               rtol=1e-12)


def test_batchnorm_eval_uses_running_stats_and_does_not_update_them(rng):
    bn = nn.BatchNorm(3, dtype=np.float64)
    bn.running_mean[...] = [1.0, -2.0, 0.5]
    bn.running_var[...] = [4.0, 0.25, 1.0]
    bn.eval()
    assert not bn.training
    x = rng.normal(size=(2, 3, 5))
    y = bn(x)
    expected = (x - bn.running_mean[None, :, None]) / np.sqrt(bn.running_var[None, :, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, [1.0, -2.0, 0.5])
    assert bn.num_batches_tracked == 0
    # the statistics are constants in eval: dx = dy * weight * rstd
    dy = rng.normal(size=x.shape)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, dy / np.sqrt(bn.running_var[None, :, None] + 1e-5), rtol=1e-12)
    # one sample is fine in eval mode
    assert bn(x[:1, :, :1]).shape == (1, 3, 1)
    bn.train()
    assert bn.training
    with pytest.raises(ValueError):
        bn(x[:1, :, :1])
    assert bn.num_batches_tracked == 0  # a rejected batch is not counted


def test_batchnorm_untracked_uses_batch_stats_in_eval(rng):
    bn = nn.BatchNorm(3, track_running_stats=False, dtype=np.float64).eval()
    assert bn.running_mean is None and set(bn.state_dict()) == {"weight", "bias"}
    x = rng.normal(size=(6, 3)) * 2 + 1
    np.testing.assert_allclose(bn(x), (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-10)


def test_train_and_eval_return_the_layer():
    layer = nn.GroupNorm(1, 2)
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False


# ---- state_dict ------------------------------------------------------------------------

def test_state_dict_round_trip_between_layers(rng):
    src, x = make("batch", np.float32, rng)
    src(x)
    state = src.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var",
                          "num_batches_tracked"}
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"] == 1
    dst = nn.BatchNorm(4)
    dst.load_state_dict(state)
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    # state_dict returns copies: changing it does not change the layer
    state["weight"][...] = 7.0
    assert not np.any(dst.weight == 7.0) and not np.any(src.weight == 7.0)
    dst.eval(), src.eval()
    np.testing.assert_array_equal(dst(x), src(x))


def test_load_state_dict_rejects_bad_state():
    layer = nn.LayerNorm(3)
    good = {"weight": np.full(3, 2.0), "bias": np.zeros(3)}
    with pytest.raises(KeyError, match="bias"):
        layer.load_state_dict({"weight": good["weight"]})
    with pytest.raises(KeyError, match="extra"):
        layer.load_state_dict(dict(good, extra=np.zeros(1)))
    with pytest.raises(ValueError, match="shape"):
        layer.load_state_dict({"weight": np.ones(4), "bias": np.zeros(3)})
    np.testing.assert_array_equal(layer.weight, 1.0)  # a failed load changes nothing
    layer.load_state_dict({"weight": good["weight"]}, strict=False)
    np.testing.assert_array_equal(layer.weight, 2.0)
    assert layer.weight.dtype == np.float32  # values are cast to the parameter's dtype


def _changed_state(layer):
    """A valid state for `layer` that differs from its current one in every entry."""
    state = layer.state_dict()
    for k, v in state.items():
        v += 3
    return state


BAD_ENTRIES = [
    # (key, value, exception, why)
    ("num_batches_tracked", np.array("abc"), TypeError, "a string"),
    ("num_batches_tracked", "7", TypeError, "a Python string"),
    ("num_batches_tracked", np.array(np.nan), ValueError, "NaN"),
    ("num_batches_tracked", np.array(np.inf), ValueError, "infinity"),
    ("num_batches_tracked", np.array(1e30), ValueError, "out of range"),
    ("num_batches_tracked", np.array(2.5), ValueError, "not an integer"),
    ("num_batches_tracked", np.array(-1), ValueError, "negative"),
    ("num_batches_tracked", np.array(2 ** 63 - 1), ValueError, "would overflow"),
    ("num_batches_tracked", np.array(True), TypeError, "a bool"),
    ("num_batches_tracked", np.zeros(1, np.int64), ValueError, "shape"),
    ("running_var", np.array(["1", "2", "3"]), TypeError, "strings"),
    ("running_var", np.full(3, 1e300), ValueError, "overflows float32"),
    ("running_mean", [[1.0, 2.0], [3.0]], TypeError, "a ragged list"),
    ("running_mean", np.ones(3, np.complex128), TypeError, "complex"),
    ("weight", np.ones(4), ValueError, "shape"),
    ("bias", np.array([b"a", b"b", b"c"]), TypeError, "bytes"),
]


@pytest.mark.parametrize("key, value, exc, why", BAD_ENTRIES,
                         ids=[f"{k}-{w}" for k, _, _, w in BAD_ENTRIES])
def test_load_state_dict_is_atomic_and_names_the_bad_key(key, value, exc, why):
    """Every entry is checked before any is copied: a bad one raises an error naming its
    key, and the layer is left exactly as it was (weight included, loaded first)."""
    layer = nn.BatchNorm(3)
    layer(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))
    before = layer.state_dict()
    state = _changed_state(layer)
    state[key] = value
    with pytest.raises(exc, match=key):
        layer.load_state_dict(state)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # the layer still works, and a good load after a bad one succeeds
    layer(np.ones((2, 3), np.float32))
    layer.load_state_dict(_changed_state(layer))


@pytest.mark.parametrize("value, expected", [
    (np.array(12.0), 12), (np.array(5, np.uint8), 5), (7, 7), (np.array(2 ** 62), 2 ** 62),
])
def test_load_state_dict_accepts_integer_valued_counts(value, expected):
    layer = nn.BatchNorm(2)
    state = dict(layer.state_dict(), num_batches_tracked=value)
    layer.load_state_dict(state)
    assert layer.num_batches_tracked == expected
    assert layer.state_dict()["num_batches_tracked"].dtype == np.int64


def test_batchnorm_cumulative_average_after_loading_a_count(rng):
    """momentum=None divides by num_batches_tracked + 1: a loaded count is used as is."""
    layer = nn.BatchNorm(2, momentum=None, dtype=np.float64)
    layer.load_state_dict(dict(layer.state_dict(), num_batches_tracked=np.array(3.0)))
    x = rng.normal(size=(5, 2))
    layer(x)
    np.testing.assert_allclose(layer.running_mean, x.mean(axis=0) / 4, rtol=1e-12)
    assert layer.num_batches_tracked == 4


def test_load_state_dict_rejects_what_is_not_a_mapping():
    with pytest.raises(TypeError, match="state_dict"):
        nn.LayerNorm(3).load_state_dict([("weight", np.ones(3))])
    with pytest.raises(TypeError, match="strict"):
        nn.LayerNorm(3).load_state_dict({}, strict="no")


def test_load_state_dict_converts_bfloat16_exactly():
    """bfloat16 values (torch tensors and ml_dtypes arrays) load converted exactly."""
    values = np.array([1.5, -0.375, 3.0e-3, 65280.0])  # representable in bfloat16
    exact = values.astype(np.float32).astype(np.float64)
    sources = []
    torch = pytest.importorskip("torch")
    sources.append(torch.tensor(values, dtype=torch.bfloat16))
    sources.append(torch.tensor(values, dtype=torch.bfloat16, requires_grad=True))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sources.append(values.astype(ml_dtypes.bfloat16))
    for src in sources:
        layer = nn.LayerNorm(4, dtype=np.float64)
        layer.load_state_dict({"weight": src, "bias": src}, strict=True)
        bf = np.asarray(torch.tensor(values, dtype=torch.bfloat16).double())
        np.testing.assert_array_equal(layer.weight, bf)
        np.testing.assert_array_equal(layer.bias, bf)
        np.testing.assert_allclose(bf, exact, rtol=4e-3)


# (layer, a bad x, exception): each error names x, as the functional API does
BAD_INPUTS = [
    (lambda: nn.GroupNorm(2, 4), [[1.0, 2.0], [3.0]], TypeError),
    (lambda: nn.InstanceNorm(4), [[[1.0, 2.0]], [[3.0]]], TypeError),
    (lambda: nn.BatchNorm(4), [[1.0, 2.0], [3.0]], TypeError),
    (lambda: nn.LayerNorm(3), [[1.0, 2.0, 3.0], [3.0]], TypeError),
    (lambda: nn.RMSNorm(3), [[1.0, 2.0, 3.0], [3.0]], TypeError),
    (lambda: nn.LayerNorm(3), np.array([["a", "b", "c"]]), TypeError),
    (lambda: nn.BatchNorm(3), np.ones((2, 3), np.complex64), TypeError),
    (lambda: nn.GroupNorm(1, 3), np.float32(1.0), ValueError),
    (lambda: nn.InstanceNorm(3), np.ones(3, np.float32), ValueError),
]


@pytest.mark.parametrize("make_layer, x, exc", BAD_INPUTS)
def test_layer_errors_name_x(make_layer, x, exc):
    with pytest.raises(exc, match=r"\bx\b"):
        make_layer()(x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_rejects_a_tensor_that_requires_grad_naming_x(name):
    torch = pytest.importorskip("torch")
    factory, shape = LAYERS[name]
    x = torch.ones(shape, requires_grad=True)
    with pytest.raises(TypeError, match=r"\bx\b"):
        factory(np.float32)(x)


@pytest.mark.parametrize("make_layer", [
    lambda: nn.GroupNorm(2, 4, eps=10 ** 400),
    lambda: nn.BatchNorm(4, eps=10 ** 400),
    lambda: nn.LayerNorm(4, eps=-10 ** 400),
    lambda: nn.BatchNorm(4, momentum=10 ** 400),
    lambda: nn.InstanceNorm(4, momentum=10 ** 400),
])
def test_layer_huge_numbers_are_value_errors(make_layer):
    with pytest.raises(ValueError, match="eps|momentum"):
        make_layer()


# ---- InstanceNorm's running statistics (torch's track_running_stats) ----------------------

def test_instancenorm_tracks_running_stats_as_torch_defines(rng):
    layer = nn.InstanceNorm(3, momentum=0.2, track_running_stats=True, dtype=np.float64)
    assert list(layer.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    mean, var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = rng.normal(size=(4, 3, 6)) * (1 + step) + step
        layer(x)
        mean = 0.8 * mean + 0.2 * x.mean(axis=2).mean(axis=0)
        var = 0.8 * var + 0.2 * x.var(axis=2, ddof=1).mean(axis=0)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-12)
    assert layer.num_batches_tracked == 0  # torch keeps it, but never counts
    # eval: every sample normalised with the running statistics, which stay unchanged
    layer.eval()
    x = rng.normal(size=(2, 3, 5))
    y = layer(x)
    np.testing.assert_allclose(
        y, (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12)
    dy = rng.normal(size=x.shape)  # constants in eval: dx = dy * rstd
    np.testing.assert_allclose(layer.backward(dy), dy / np.sqrt(var[None, :, None] + 1e-5),
                               rtol=1e-12)
    # one spatial element is fine in eval with running statistics
    assert layer(x[:, :, :1]).shape == (2, 3, 1)


def test_instancenorm_momentum_none_never_updates(rng):
    layer = nn.InstanceNorm(2, momentum=None, track_running_stats=True, dtype=np.float64)
    layer(rng.normal(size=(3, 2, 4)) + 5)
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)


@pytest.mark.parametrize("kwargs", [{}, {"affine": True}, {"track_running_stats": True}])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_instancenorm_empty_input_gives_an_empty_result(kwargs, training):
    layer = nn.InstanceNorm(6, **kwargs).train(training)
    x = np.zeros((2, 6, 0), np.float32)
    y = layer(x)
    assert y.shape == (2, 6, 0) and y.dtype == np.float32
    assert layer.backward(np.zeros_like(y)).shape == (2, 6, 0)
    if kwargs.get("track_running_stats"):
        np.testing.assert_array_equal(layer.running_mean, 0.0)
        np.testing.assert_array_equal(layer.running_var, 1.0)
    torch = pytest.importorskip("torch")
    twin = torch.nn.InstanceNorm1d(6, **kwargs).train(training)
    assert tuple(twin(torch.from_numpy(x)).shape) == y.shape


# ---- against torch.nn (optional oracle; CI installs torch) -------------------------------

def _has_bias(layer):
    """The constructor's bias flag (torch's default True when there is no affine)."""
    return layer.bias is not None or not layer.affine


def _torch_twin(torch, layer):
    """The torch.nn module that `layer` mirrors, with the same constructor arguments."""
    dt = torch.float64 if layer.dtype == np.float64 else torch.float32
    if isinstance(layer, nn.GroupNorm):
        return torch.nn.GroupNorm(layer.num_groups, layer.num_channels, layer.eps,
                                  layer.affine, dtype=dt, bias=_has_bias(layer))
    if isinstance(layer, nn.InstanceNorm):
        return torch.nn.InstanceNorm1d(layer.num_features, layer.eps, layer.momentum,
                                       layer.affine, layer.track_running_stats, dtype=dt,
                                       bias=_has_bias(layer))
    if isinstance(layer, nn.BatchNorm):
        return torch.nn.BatchNorm1d(layer.num_features, layer.eps, layer.momentum,
                                    layer.affine, layer.track_running_stats, dtype=dt,
                                    bias=_has_bias(layer))
    if isinstance(layer, nn.LayerNorm):
        return torch.nn.LayerNorm(layer.normalized_shape, layer.eps, layer.elementwise_affine,
                                  bias=layer.bias is not None or not layer.elementwise_affine,
                                  dtype=dt)
    return torch.nn.RMSNorm(layer.normalized_shape, layer.eps, layer.elementwise_affine,
                            dtype=dt)


TORCH_CASES = ["group", "group_no_bias", "instance_affine", "instance_tracked", "batch",
               "batch_nc", "batch_untracked", "batch_no_bias", "layer", "layer_no_bias",
               "rms", "rms_eps"]


@pytest.mark.parametrize("name", TORCH_CASES)
def test_layer_matches_torch_over_train_and_eval_steps(name, dtype, rng):
    torch = pytest.importorskip("torch")
    layer, x = make(name, dtype, rng)
    if isinstance(layer, (nn.InstanceNorm, nn.BatchNorm)):  # torch's *1d take (N, C, L)
        x = x.reshape(x.shape[0], x.shape[1], -1)
    twin = _torch_twin(torch, layer)
    # torch's state (random parameters), exported as NumPy, loads unchanged
    with torch.no_grad():
        for p in twin.parameters():
            p.uniform_(0.5, 1.5)
    layer.load_state_dict({k: v.numpy() for k, v in twin.state_dict().items()})
    for step, training in enumerate([True, True, False]):
        layer.train(training)
        twin.train(training)
        xs = (x * (1 + step) + step).astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        xt = torch.tensor(xs, requires_grad=True)
        twin.zero_grad()
        yt = twin(xt)
        yt.backward(torch.tensor(dy))
        y = layer(xs)
        dx = layer.backward(dy)
        t = dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(y, yt.detach().numpy(), **t)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **t)
        for k, p in twin.named_parameters():
            np.testing.assert_allclose(layer.grads[k], p.grad.numpy(), err_msg=k, **t)
    theirs = twin.state_dict()
    ours = layer.state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].shape == tuple(v.shape), k
        np.testing.assert_allclose(ours[k], v.numpy(), err_msg=k, **tol(dtype))


@pytest.mark.parametrize("name", TORCH_CASES + ["instance", "group_2d_no_affine",
                                                "layer_no_affine"])
def test_state_dict_keys_are_torchs_both_ways(name, rng):
    torch = pytest.importorskip("torch")
    layer, _ = make(name, np.float32, rng)
    twin = _torch_twin(torch, layer)
    assert list(layer.state_dict()) == list(twin.state_dict())
    if "num_batches_tracked" in layer.state_dict():
        layer._buffers["num_batches_tracked"][...] = 5
        layer.running_mean[...] = 0.25
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()},
                         strict=True)
    for k, v in twin.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), layer.state_dict()[k])
    # torch tensors themselves load too
    layer2 = LAYERS[name][0](np.float32)
    layer2.load_state_dict(twin.state_dict())
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(layer2.state_dict()[k], v)


# ---- misuse ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYERS))
def test_backward_needs_exactly_one_forward(name, rng):
    layer, x = make(name, np.float64, rng)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones_like(x))
    y = layer(x)
    with pytest.raises(ValueError):  # a rejected dy keeps the saved forward
        layer.backward(np.ones(x.shape + (2,)))
    layer.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="twice"):
        layer.backward(np.ones_like(y))


@pytest.mark.parametrize("name", [n for n in sorted(LAYERS) if n not in
                                  ("group_2d_no_affine", "layer_no_affine", "instance")])
def test_backward_uses_the_parameters_of_its_forward(name, rng):
    """Updating the parameters in place between forward and backward (an optimizer step
    taken early) does not change the gradients: they are those of the forward that ran."""
    layer, x = make(name, np.float64, rng)
    dy = rng.normal(size=x.shape)
    twin = LAYERS[name][0](np.float64)
    twin.load_state_dict(layer.state_dict())  # the same parameters and buffers
    layer(x)
    for p in layer.parameters().values():
        p *= -3.0
        p += 1.0
    dx = layer.backward(dy)
    twin(x)
    expected = twin.backward(dy)
    np.testing.assert_array_equal(dx, expected)
    for k, g in twin.grads.items():
        np.testing.assert_array_equal(layer.grads[k], g, err_msg=k)


@pytest.mark.parametrize("make_layer, exc", [
    (lambda: nn.GroupNorm(3, 4), ValueError),
    (lambda: nn.GroupNorm(0, 4), ValueError),
    (lambda: nn.GroupNorm(2.0, 4), TypeError),
    (lambda: nn.GroupNorm(2, 4, eps=-1.0), ValueError),
    (lambda: nn.GroupNorm(2, 4, eps="small"), TypeError),
    (lambda: nn.GroupNorm(2, 4, affine="yes"), TypeError),
    (lambda: nn.InstanceNorm(-1), ValueError),
    (lambda: nn.InstanceNorm(None), TypeError),
    (lambda: nn.BatchNorm(4, momentum=1.5), ValueError),
    (lambda: nn.BatchNorm(4, momentum="fast"), TypeError),
    (lambda: nn.BatchNorm(4, track_running_stats=None), TypeError),
    (lambda: nn.BatchNorm(4, eps=float("nan")), ValueError),
    (lambda: nn.LayerNorm(()), ValueError),
    (lambda: nn.LayerNorm((3, 0)), ValueError),
    (lambda: nn.LayerNorm("3"), TypeError),
    (lambda: nn.LayerNorm(3, dtype=np.int32), TypeError),
    (lambda: nn.LayerNorm(3, dtype=np.int16), TypeError),
    (lambda: nn.RMSNorm(3, eps=-1e-6), ValueError),
    (lambda: nn.RMSNorm(3.5), TypeError),
    (lambda: nn.RMSNorm(3, elementwise_affine=1), TypeError),
])
def test_bad_constructor_arguments_raise(make_layer, exc):
    with pytest.raises(exc):
        make_layer()


@pytest.mark.parametrize("layer, shape", [
    (nn.GroupNorm(2, 4), (3, 6, 2)),
    (nn.InstanceNorm(4), (3,)),
    (nn.InstanceNorm(4), (3, 4)),
    (nn.InstanceNorm(4), (3, 4, 1, 1)),
    (nn.BatchNorm(4), (3, 5)),
    (nn.LayerNorm((2, 3)), (4, 3, 2)),
    (nn.RMSNorm(3), (4, 2)),
])
def test_forward_rejects_inputs_of_the_wrong_shape(layer, shape):
    with pytest.raises(ValueError):
        layer(np.ones(shape, dtype=np.float32))


def test_forward_rejects_integer_input():
    with pytest.raises(TypeError):
        nn.LayerNorm(3)(np.ones((2, 3), dtype=np.int64))


def test_import_cynorm_does_not_import_torch():
    code = ("import sys, cynorm, cynorm.nn; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
