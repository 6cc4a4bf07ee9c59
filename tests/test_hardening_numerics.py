"""float32 numerics at the edges: constant sets in the backward, extreme magnitudes.

Promises:
- A constant set (variance 0, so rstd = 1 / sqrt(eps), xhat = 0) has the exact gradient
  dx = rstd * (g - mean(g)): in float32 as in float64, a set of one element gets dx = 0
  exactly, and a constant set with a constant g = weight * dy gets dx = 0 exactly, in
  every op with a mean (GroupNorm, InstanceNorm, BatchNorm, LayerNorm). A near-constant
  set (variance far below eps) carries no error of the size of rstd * g, the terms that
  cancel.
- float32 data of any finite magnitude: near the float32 maximum with a small weight,
  with a spread of 1e-30 and eps = 0 and a large weight, subnormal with eps = 0: the
  output is within a few float32 ulps of the float64 reference computed from the same
  float32 values, and finite wherever that reference is.
References: tests/reference.py (plain float64 NumPy).
"""
import numpy as np
import pytest

import cynorm
import reference as ref

F32 = np.float32
EPS32 = float(np.finfo(np.float32).eps)


def _backward_cases(x, dy, w, eps=1e-5):
    """(name, dx, dx_ref, rstd broadcast to x) for every op with a mean; the backward
    gets the float64 reference statistics, so the backward alone is tested."""
    N, C = x.shape[:2]
    out = []
    for G in sorted({1, 2 if C % 2 == 0 else 1, C}):
        _, m, r = ref.group_norm(x, G, eps=eps)
        dx = cynorm.group_norm_backward(dy, x, m, r, G, w)[0]
        dx_ref = ref.group_norm_backward(dy, x, m, r, G, w)[0]
        rb = np.repeat(r, C // G, axis=1).reshape((N, C) + (1,) * (x.ndim - 2))
        out.append((f"group_norm G={G}", dx, dx_ref, np.broadcast_to(rb, x.shape)))
    _, m, r = ref.instance_norm(x, eps=eps)
    out.append(("instance_norm", cynorm.instance_norm_backward(dy, x, m, r, w)[0],
                ref.instance_norm_backward(dy, x, m, r, w)[0],
                np.broadcast_to(r.reshape((N, C) + (1,) * (x.ndim - 2)), x.shape)))
    if N * int(np.prod(x.shape[2:])) > 1:
        _, m, r, _, _ = ref.batch_norm(x, training=True, eps=eps)
        out.append(("batch_norm", cynorm.batch_norm_backward(dy, x, m, r, w)[0],
                    ref.batch_norm_backward(dy, x, m, r, w)[0],
                    np.broadcast_to(r.reshape((1, C) + (1,) * (x.ndim - 2)), x.shape)))
    K = x.shape[-1]
    wl = np.full(K, w[0], x.dtype)
    _, m, r = ref.layer_norm(x, K, eps=eps)
    out.append(("layer_norm", cynorm.layer_norm_backward(dy, x, m, r, K, wl)[0],
                ref.layer_norm_backward(dy, x, m, r, K, wl)[0],
                np.broadcast_to(r[..., None], x.shape)))
    return out


# shapes: sets of one element; small sets; sets long enough to be cut into pieces and
# shared among threads; BatchNorm's column path (short runs) and channel path
SHAPES = [(3, 4, 1), (2, 4, 3, 5), (2, 4, 2, 700), (1, 2, 50000), (300, 6), (5, 3, 70)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_over_one_element_has_zero_gradient(dtype):
    """PyTorch's OpInfo sample: a set of one element has xhat = 0 and g = mean(g), so
    dx = 0 exactly, whatever dy and weight are."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1)).astype(dtype)
    dy = rng.standard_normal((5, 1)).astype(dtype)
    w = rng.standard_normal(1).astype(dtype)
    for weight in (None, w):
        _, m, r = cynorm.layer_norm(x, 1, weight, return_stats=True)
        dx = cynorm.layer_norm_backward(dy, x, m, r, 1, weight)[0]
        assert np.array_equal(dx, np.zeros_like(x)), np.abs(dx).max()
    xi = rng.standard_normal((3, 4, 1)).astype(dtype)
    _, m, r = cynorm.instance_norm(xi, return_stats=True)
    dx = cynorm.instance_norm_backward(rng.standard_normal(xi.shape).astype(dtype), xi, m,
                                       r, rng.standard_normal(4).astype(dtype))[0]
    assert np.array_equal(dx, np.zeros_like(xi)), np.abs(dx).max()


@pytest.mark.parametrize("const", [0.0, 0.1, -3.7, 12345.678, 1e30, 3e38])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_constant_set_with_constant_gradient_has_zero_dx_in_float32(shape, const):
    """x constant and g = weight * dy constant within each set: dx = rstd * (g - mean(g))
    = 0 exactly, although rstd * g (about 316 * g) is large."""
    x = np.full(shape, const, F32)
    rng = np.random.default_rng(5)
    for _ in range(4):  # a few values of dy and weight (any value must give exactly 0)
        dy = np.full(shape, rng.standard_normal(), F32)
        w = np.full(shape[1], 1 + rng.random(), F32)
        for name, dx, dx_ref, _ in _backward_cases(x, dy, w):
            # the float64 reference agrees, up to its own rounding of mean(g)
            assert np.abs(dx_ref).max() < 1e-9, name
            assert np.array_equal(dx, np.zeros_like(x)), (name, np.abs(dx).max())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_constant_set_gradient_matches_reference_in_float32(shape):
    """x constant, dy random: dx = rstd * (g - mean(g)) to float32 rounding of g."""
    rng = np.random.default_rng(1)
    x = np.full(shape, 2.5, F32)
    dy = rng.standard_normal(shape).astype(F32)
    w = (1 + rng.random(shape[1])).astype(F32)
    for name, dx, dx_ref, rb in _backward_cases(x, dy, w):
        wb = w.reshape((1, -1) + (1,) * (x.ndim - 2)) if "layer" not in name else w[0]
        bound = 4 * EPS32 * (np.abs(dx_ref) + rb * np.abs(dy * wb))
        assert (np.abs(dx - dx_ref) <= bound).all(), (name, np.abs(dx - dx_ref).max())


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_near_constant_set_gradient_has_no_error_of_the_cancelled_terms(shape):
    """Variance about 1e-14, far below eps: rstd is about 1 / sqrt(eps). With g constant
    the exact dx is (nearly) 0; float32 rounding of rstd * g (about 5e-3 * 6e-8 here)
    must not appear in it."""
    rng = np.random.default_rng(2)
    base = np.float32(0.75)
    x = base + np.spacing(base) * rng.integers(-2, 3, size=shape).astype(F32)
    for _ in range(4):
        dy = np.full(shape, rng.standard_normal(), F32)
        w = np.full(shape[1], 1 + rng.random(), F32)
        g = abs(float(dy.flat[0]) * float(w[0]))
        for name, dx, dx_ref, rb in _backward_cases(x, dy, w):
            bound = 4 * EPS32 * np.abs(dx_ref) + 1e-9 * rb * g
            assert (np.abs(dx - dx_ref) <= bound).all(), (name,
                                                          np.abs(dx - dx_ref).max())


# ---- extreme magnitudes: within a few ulps of the float64 reference ----------------------

ULPS = 4


def _forward_cases(x, w, eps):
    """(name, y, y_ref) for every op, forward, float32 x; no bias (so that the ulp
    comparison is of xhat * w alone)."""
    N, C = x.shape[:2]
    out = []
    for G in sorted({1, 2 if C % 2 == 0 else 1, C}):
        out.append((f"group_norm G={G}", cynorm.group_norm(x, G, w, eps=eps),
                    ref.group_norm(x, G, w, eps=eps)[0]))
    out.append(("instance_norm", cynorm.instance_norm(x, weight=w, eps=eps),
                 ref.instance_norm(x, w, eps=eps)[0]))
    out.append(("batch_norm", cynorm.batch_norm(x, weight=w, training=True, eps=eps),
                 ref.batch_norm(x, weight=w, training=True, eps=eps)[0]))
    _, m, r, _, _ = ref.batch_norm(x, training=True, eps=eps)
    rv = 1.0 / r**2 - eps  # eval mode with the batch's own statistics
    out.append(("batch_norm eval", cynorm.batch_norm(x, m, rv, w, eps=eps),
                 ref.batch_norm(x, m, rv, w, eps=eps)[0]))
    K = x.shape[-1]
    wl = np.resize(w, K).astype(F32)
    out.append(("layer_norm", cynorm.layer_norm(x, K, wl, eps=eps),
                 ref.layer_norm(x, K, wl, eps=eps)[0]))
    out.append(("rms_norm", cynorm.rms_norm(x, K, wl, eps=eps),
                 ref.rms_norm(x, K, wl, eps=eps)[0]))
    return out


def _extreme_data(kind, shape, rng):
    n = rng.standard_normal(shape)
    if kind == "near_max":  # spread 10% around 2e38, nothing above the float32 maximum
        return (2e38 * (1 + 0.1 * np.tanh(n))).astype(F32), 1e-4, 1e-5
    if kind == "tiny_spread":  # spread 1e-30 around 0, eps = 0, a large weight
        return (1e-30 * n).astype(F32), 1e9, 0.0
    if kind == "subnormal":  # subnormal float32 values, eps = 0
        return (1e-41 * n).astype(F32), 1.0, 0.0
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["near_max", "tiny_spread", "subnormal"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (2, 4, 2, 700), (300, 6), (1, 2, 50000)],
                         ids=str)
def test_float32_extremes_are_within_a_few_ulps(kind, shape):
    rng = np.random.default_rng(3)
    x, wscale, eps = _extreme_data(kind, shape, rng)
    assert np.isfinite(x).all()
    w = (wscale * (1 + rng.random(shape[1]))).astype(F32)
    failures = []
    for name, y, y_ref in _forward_cases(x, w, eps):
        # sets of one element with eps = 0 are 0 / 0 in the reference too: NaN there
        fin = np.isfinite(y_ref)
        if not np.array_equal(np.isfinite(y), fin):
            failures.append(f"{name}: {int((np.isfinite(y) != fin).sum())} values finite "
                            f"where the reference is not, or the reverse")
            continue
        exact = y_ref[fin].astype(F32)  # the reference, rounded once to float32
        ulp = np.spacing(np.abs(exact)).astype(np.float64)
        err = np.abs(y[fin].astype(np.float64) - y_ref[fin]) / ulp
        if err.size and err.max() > ULPS:
            failures.append(f"{name}: max error {err.max():.3g} ulp")
    assert not failures, f"{kind}:\n" + "\n".join(failures)


@pytest.mark.parametrize("kind", ["near_max", "tiny_spread"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (300, 6), (1, 2, 50000)], ids=str)
def test_float32_extremes_backward_is_finite_and_close(kind, shape):
    """dx relative to its largest reference value (dx is a difference of terms of that
    size), weight about 1 so that dx itself is a float32 number (rstd * g is about 1e30
    for the tiny spread; subnormal data with eps = 0 give dx beyond float32)."""
    rng = np.random.default_rng(4)
    x, _, eps = _extreme_data(kind, shape, rng)
    dy = rng.standard_normal(shape).astype(F32)
    w = (1 + rng.random(shape[1])).astype(F32)
    for name, dx, dx_ref, _ in _backward_cases(x, dy, w, eps):
        if eps == 0 and x.ndim == 2 and name in ("group_norm G=6", "instance_norm"):
            continue  # sets of one element with eps = 0: 0 / 0 in the reference too
        scale = np.abs(dx_ref).max()
        assert np.isfinite(scale), name
        assert np.isfinite(dx).all(), name
        assert np.abs(dx - dx_ref).max() <= 1e-5 * scale, (name, np.abs(dx - dx_ref).max(),
                                                          scale)
