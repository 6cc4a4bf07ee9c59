"""The activation epilogue's functions (cynorm/_kernels/_activations.h) on their own:
accuracy over a dense sweep of the float32 range against float64 formulas, special
values, and the same bits wherever a value sits in an array."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cynorm
import cynorm._kernels as kernels
from cynorm._kernels import runtime
from reference import activation as act_ref, activation_grad as grad_ref

CODES = {"silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}


def _ordinal(a):
    """float32 values as integers in the order of the floats (ulp distance = difference)."""
    i = a.view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def _float32_sweep():
    """Every 997th float32 bit pattern (4.3 million finite values of either sign, from
    subnormals to the largest) plus a fine grid over the range where the functions bend
    and exp under- or overflows."""
    bits = np.arange(0, 2 ** 32, 997, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    return np.concatenate([x, np.linspace(-120, 40, 400_001, dtype=np.float32)])


SWEEP = _float32_sweep()


def _apply(name, x):
    y = np.empty_like(x)
    runtime.activation(x, y, CODES[name])
    return y


def _apply_grad(name, x, dy):
    g = np.empty_like(x)
    runtime.activation_grad(x, dy, g, CODES[name])
    return g


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_float32_activation_within_2_ulp_of_correctly_rounded_over_whole_range(name):
    y = _apply(name, SWEEP)
    with np.errstate(over="ignore"):
        want = act_ref(name, SWEEP).astype(np.float32)  # correctly rounded
    ulps = np.abs(_ordinal(y) - _ordinal(want))
    worst = int(np.argmax(ulps))
    assert ulps.max() <= 2, (name, SWEEP[worst], y[worst], want[worst])


def test_float32_relu_is_exact():
    assert np.array_equal(_apply("relu", SWEEP), np.maximum(SWEEP, 0).astype(np.float32))


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "relu"])
def test_float32_activation_derivative_within_2_ulp(name):
    dy = np.ones_like(SWEEP)
    g = _apply_grad(name, SWEEP, dy)
    with np.errstate(over="ignore", invalid="ignore"):
        want = grad_ref(name, SWEEP)
    ok = np.isfinite(want)
    assert ok.mean() > 0.99
    ulps = np.abs(_ordinal(g[ok]) - _ordinal(want[ok].astype(np.float32)))
    assert ulps.max() <= 2, name


def test_float32_silu_derivative_within_8_roundings_of_its_terms():
    # silu' = s (1 + x (1 - s)) crosses zero near x = -1.28, where no relative bound
    # holds: the error is bounded by float32 roundings of the terms' size instead
    g = _apply_grad("silu", SWEEP, np.ones_like(SWEEP))
    x = SWEEP.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = grad_ref("silu", x)
        s = 1.0 / (1.0 + np.exp(-x))
        terms = s * (1.0 + np.abs(x) * (1.0 - s))
    ok = np.isfinite(want)
    err = np.abs(g[ok] - want[ok]) / (terms[ok] * 2.0 ** -24 + 2.0 ** -149)
    assert err.max() <= 8


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activation_grad_multiplies_dy(name):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1001) * 4
    dy = rng.standard_normal(1001)
    g = _apply_grad(name, x, dy)
    np.testing.assert_allclose(g, dy * grad_ref(name, x), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "relu"])
def test_float64_activation_matches_float64_formula(name):
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(20000) * 6, np.linspace(-30, 30, 20001),
                        [0.0, 1e-300, -1e-300, 1e300, -1e300, 700.0, -700.0]])
    y = _apply(name, x)
    want = act_ref(name, x)
    # the far negative tails of gelu and gelu_tanh go through the rounding of their
    # argument (x / sqrt(2), 2u), in the reference as in the kernel: ~1e-13 there
    np.testing.assert_allclose(y, want, rtol=4e-15 if name in ("silu", "relu") else 1e-12,
                               atol=1e-300)
    g = _apply_grad(name, x, np.ones_like(x))
    with np.errstate(invalid="ignore"):
        gw = grad_ref(name, x)
    ok = np.isfinite(gw)
    np.testing.assert_allclose(g[ok], gw[ok], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_special_values(name, dtype):
    x = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, -1e30, 1e30], dtype=dtype)
    y = _apply(name, x)
    assert y[0] == 0 and np.signbit(y[0])          # act(-inf) = -0
    assert y[1] == np.inf
    assert np.isnan(y[2])
    assert y[3] == 0 and y[4] == 0
    assert y[5] == 0 and np.signbit(y[5])
    assert y[6] == dtype(1e30)
    g = _apply_grad(name, x, np.ones_like(x))
    assert g[0] == 0 and g[1] == 1 and np.isnan(g[2]) and g[3] == 0.5
    assert g[5] == 0 and g[6] == 1


def test_relu_special_values():
    x = np.array([-np.inf, np.inf, np.nan, -0.0, -1.0], dtype=np.float32)
    y = _apply("relu", x)
    assert y[0] == 0 and y[1] == np.inf and np.isnan(y[2]) and y[3] == 0 and y[4] == 0
    g = _apply_grad("relu", x, np.full_like(x, 2.0))
    assert g[0] == 0 and g[1] == 2 and np.isnan(g[2]) and g[3] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "relu"])
def test_same_bits_at_every_offset_and_in_place(name, dtype):
    # the vector body and the padded tail compute each lane the same way
    x = (np.random.default_rng(5).standard_normal(203) * 5).astype(dtype)
    full = _apply(name, x)
    for off in range(1, 9):
        part = _apply(name, np.ascontiguousarray(x[off:]))
        assert np.array_equal(part.view(np.uint8), full[off:].view(np.uint8))
    y = x.copy()
    runtime.activation(y, y, CODES[name])
    assert np.array_equal(y.view(np.uint8), full.view(np.uint8))


@pytest.mark.parametrize("grad", [False, True])
def test_float32_silu_value_does_not_depend_on_its_neighbours_being_in_the_tails(grad):
    # a vector of 16 lanes with a lane below -87 (where exp(-x) overflows float32) takes
    # the tail formula for that lane only: every other lane keeps its bits
    rng = np.random.default_rng(7)
    core = rng.uniform(-87, 100, 4096).astype(np.float32)
    core[:8] = [-87.0, -86.99, 87.0, 87.01, 0.0, -0.0, np.inf, np.nan]
    tails = np.array([-87.01, -100.0, -104.5, -121.0, -1e30, -np.inf], np.float32)
    mixed = core.copy()
    at = np.arange(3, mixed.size, 16)          # one tail value in every vector
    mixed[at] = np.resize(tails, at.size)

    def f(x):
        if grad:
            return _apply_grad("silu", x, np.ones_like(x))
        return _apply("silu", x)

    got, alone = f(mixed), f(core)
    keep = np.ones(mixed.size, bool)
    keep[at] = False
    assert np.array_equal(got[keep].view(np.uint32), alone[keep].view(np.uint32))
    tail_alone = f(np.ascontiguousarray(mixed[at]))   # vectors of tail values only
    assert np.array_equal(got[at].view(np.uint32), tail_alone.view(np.uint32))
    x = mixed[at].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = (grad_ref if grad else act_ref)("silu", x).astype(np.float32)
    want[x == -np.inf] = 0.0 if grad else -0.0
    assert np.all(np.abs(_ordinal(got[at]) - _ordinal(want)) <= 2)


def test_hook_rejects_bad_arrays():
    x = np.zeros(8, np.float32)
    with pytest.raises(ValueError):
        runtime.activation(x, np.zeros(8, np.float64), 1)
    with pytest.raises(ValueError):
        runtime.activation(x, np.zeros(7, np.float32), 1)
    with pytest.raises(ValueError):
        runtime.activation(x, x.copy(), 9)


# Every function and derivative over a sweep with tails, NaN and Inf mixed into the
# vectors, and the fused GroupNorm forward and backward, under one forced level.
LEVEL_WORKER = r"""
import sys
import numpy as np
import cynorm
from cynorm._kernels import runtime
rng = np.random.default_rng(11)
res = {}
x32 = np.concatenate([np.arange(0, 2 ** 32, 65537, dtype=np.uint64).astype(np.uint32)
                      .view(np.float32), np.linspace(-130, 40, 20001, dtype=np.float32)])
rng.shuffle(x32)
for dt in (np.float32, np.float64):
    x = x32.astype(dt)
    dy = rng.standard_normal(x.size).astype(dt)
    for code in (1, 2, 3, 4):
        y = np.empty_like(x)
        runtime.activation(x, y, code)
        g = np.empty_like(x)
        runtime.activation_grad(x, dy, g, code)
        res[f"act {code} {dt.__name__}"] = y
        res[f"grad {code} {dt.__name__}"] = g
    xs = (rng.standard_normal((2, 64, 9, 11)) * 3).astype(dt)
    dys = rng.standard_normal(xs.shape).astype(dt)
    w, b = rng.standard_normal(64).astype(dt), rng.standard_normal(64).astype(dt)
    for act in ("silu", "gelu", "gelu_tanh", "relu"):
        y, m, r = cynorm.group_norm(xs, 8, w, b, activation=act, return_stats=True)
        dx, dw, db = cynorm.group_norm_backward(dys, xs, m, r, 8, w, bias=b, activation=act)
        for i, a in enumerate((y, dx, dw, db)):
            res[f"gn {act} {dt.__name__} {i}"] = a
np.savez(sys.argv[1], **res)
"""


def test_every_instruction_set_level_gives_the_same_activation_bits(tmp_path):
    runnable = [lv for lv in kernels.BUILT_LEVELS if lv in kernels.CPU_LEVELS]
    if len(runnable) < 2:
        pytest.skip(f"only {runnable} of the built levels run here: nothing to compare")
    root = os.path.dirname(os.path.dirname(cynorm.__file__))
    out = {}
    for level in runnable:
        env = dict(os.environ, CYNORM_ISA=level, OMP_NUM_THREADS="2")
        proc = subprocess.run([sys.executable, "-c", LEVEL_WORKER, str(tmp_path / level)],
                              env=env, cwd=root, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        out[level] = np.load(tmp_path / f"{level}.npz")
    base = out[runnable[0]]
    assert len(base.files) == 2 * (8 + 16)
    for level in runnable[1:]:
        for name in base.files:
            assert base[name].tobytes() == out[level][name].tobytes(), (name, level)
