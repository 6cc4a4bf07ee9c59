"""Plain float64 NumPy references for every cynorm op, forward and backward.

Written from the textbook definitions (torch.nn.functional semantics: biased variance,
eps inside the square root), independent of cynorm's kernels. Every function takes
arrays of any float dtype, computes in float64 and returns float64.

Backward formulas, for one normalisation set S with M elements, xhat = (x - mu) * rstd
and g = dy * gamma:

    dx     = rstd * (g - mean_S(g) - xhat * mean_S(g * xhat))
    dgamma = sum of dy * xhat over everything that shares gamma
    dbeta  = sum of dy over everything that shares beta

RMSNorm: xhat = x * rstd and there is no mean term.
"""
import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _norm_shape(normalized_shape):
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


# ---- GroupNorm / InstanceNorm (InstanceNorm is GroupNorm with G = C) ------------------

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Returns (y, mean, rstd); mean and rstd of shape (N, G)."""
    x = _f64(x)
    N, C = x.shape[:2]
    G = num_groups
    M = (C // G) * int(np.prod(x.shape[2:], dtype=np.int64))
    xg = x.reshape(N, G, M)  # each (n, g) row: channels of group g, all spatial
    mean = xg.mean(axis=2)
    var = ((xg - mean[:, :, None]) ** 2).mean(axis=2)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = ((xg - mean[:, :, None]) * rstd[:, :, None]).reshape(x.shape)
    y = _affine_channels(xhat, weight, bias)
    return y, mean, rstd


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _affine_channels(xhat, weight, bias):
    y = xhat
    if weight is not None:
        y = y * _f64(weight).reshape(_channel_shape(xhat))
    if bias is not None:
        y = y + _f64(bias).reshape(_channel_shape(xhat))
    return y


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None):
    """Returns (dx, dweight, dbias) given the forward statistics mean, rstd (N, G)."""
    dy, x, mean, rstd = _f64(dy), _f64(x), _f64(mean), _f64(rstd)
    N, C = x.shape[:2]
    G = num_groups
    M = (C // G) * int(np.prod(x.shape[2:], dtype=np.int64))
    gamma = np.ones(C) if weight is None else _f64(weight)
    xhat = ((x.reshape(N, G, M) - mean[:, :, None]) * rstd[:, :, None]).reshape(x.shape)
    g = dy * gamma.reshape(_channel_shape(x))
    gs = g.reshape(N, G, M)
    xs = xhat.reshape(N, G, M)
    mean_g = gs.mean(axis=2, keepdims=True)
    mean_gx = (gs * xs).mean(axis=2, keepdims=True)
    dx = (rstd[:, :, None] * (gs - mean_g - xs * mean_gx)).reshape(x.shape)
    axes = (0,) + tuple(range(2, x.ndim))
    dweight = (dy * xhat).sum(axis=axes)
    dbias = dy.sum(axis=axes)
    return dx, dweight, dbias


def instance_norm(x, weight=None, bias=None, eps=1e-5):
    return group_norm(x, np.shape(x)[1], weight, bias, eps)


def instance_norm_backward(dy, x, mean, rstd, weight=None):
    return group_norm_backward(dy, x, mean, rstd, np.shape(x)[1], weight)


# ---- BatchNorm -------------------------------------------------------------------------

def _per_channel(x):
    """x (N, C, *spatial) as (C, N * spatial): row c holds channel c's set."""
    C = x.shape[1]
    return np.moveaxis(x, 1, 0).reshape(C, -1)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5):
    """Returns (y, mean, rstd, new_running_mean, new_running_var).

    training: batch statistics (biased variance for y), running stats updated as
    r = (1 - momentum) * r + momentum * batch_stat with the unbiased variance.
    eval: mean = running_mean, rstd = 1 / sqrt(running_var + eps). The returned running
    stats are new arrays (None when not given); the inputs are not modified."""
    x = _f64(x)
    rm, rv = _f64(running_mean), _f64(running_var)
    if training:
        xc = _per_channel(x)
        count = xc.shape[1]
        mean = xc.mean(axis=1)
        var = ((xc - mean[:, None]) ** 2).mean(axis=1)
        var_unbiased = ((xc - mean[:, None]) ** 2).sum(axis=1) / (count - 1)
        new_rm = None if rm is None else (1 - momentum) * rm + momentum * mean
        new_rv = None if rv is None else (1 - momentum) * rv + momentum * var_unbiased
    else:
        mean, var = rm.copy(), rv.copy()
        new_rm, new_rv = rm, rv
    rstd = 1.0 / np.sqrt(var + eps)
    shape = _channel_shape(x)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    y = _affine_channels(xhat, weight, bias)
    return y, mean, rstd, new_rm, new_rv


def batch_norm_backward(dy, x, mean, rstd, weight=None, training=True):
    """Returns (dx, dweight, dbias). Eval: mean/rstd are constants, dx = dy*gamma*rstd."""
    dy, x, mean, rstd = _f64(dy), _f64(x), _f64(mean), _f64(rstd)
    C = x.shape[1]
    shape = _channel_shape(x)
    gamma = np.ones(C) if weight is None else _f64(weight)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    g = dy * gamma.reshape(shape)
    axes = (0,) + tuple(range(2, x.ndim))
    if training:
        mean_g = g.mean(axis=axes, keepdims=True)
        mean_gx = (g * xhat).mean(axis=axes, keepdims=True)
        dx = rstd.reshape(shape) * (g - mean_g - xhat * mean_gx)
    else:
        dx = g * rstd.reshape(shape)
    dweight = (dy * xhat).sum(axis=axes)
    dbias = dy.sum(axis=axes)
    return dx, dweight, dbias


# ---- LayerNorm (transformer style) and RMSNorm ----------------------------------------

def _rows(x, normalized_shape):
    ns = _norm_shape(normalized_shape)
    lead = x.shape[:x.ndim - len(ns)]
    assert x.shape[x.ndim - len(ns):] == ns
    R = int(np.prod(lead, dtype=np.int64))
    K = int(np.prod(ns, dtype=np.int64))
    return x.reshape(R, K), lead, ns


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Returns (y, mean, rstd); mean and rstd of shape x.shape[:-len(normalized_shape)]."""
    x = _f64(x)
    xr, lead, ns = _rows(x, normalized_shape)
    mean = xr.mean(axis=1)
    var = ((xr - mean[:, None]) ** 2).mean(axis=1)
    rstd = 1.0 / np.sqrt(var + eps)
    y = (xr - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * _f64(weight).reshape(1, -1)
    if bias is not None:
        y = y + _f64(bias).reshape(1, -1)
    return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)


def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight=None):
    """Returns (dx, dweight, dbias); dweight and dbias of shape normalized_shape."""
    dy, x = _f64(dy), _f64(x)
    xr, lead, ns = _rows(x, normalized_shape)
    dyr = dy.reshape(xr.shape)
    mean = _f64(mean).reshape(-1, 1)
    rstd = _f64(rstd).reshape(-1, 1)
    K = xr.shape[1]
    gamma = np.ones(K) if weight is None else _f64(weight).reshape(-1)
    xhat = (xr - mean) * rstd
    g = dyr * gamma[None, :]
    dx = rstd * (g - g.mean(axis=1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=1, keepdims=True))
    dweight = (dyr * xhat).sum(axis=0).reshape(ns)
    dbias = dyr.sum(axis=0).reshape(ns)
    return dx.reshape(x.shape), dweight, dbias


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """Returns (y, rstd), rstd = 1 / sqrt(mean(x**2) + eps) over each row.
    eps=None means the machine epsilon of x's own dtype."""
    if eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    x = _f64(x)
    xr, lead, ns = _rows(x, normalized_shape)
    rstd = 1.0 / np.sqrt((xr ** 2).mean(axis=1) + eps)
    y = xr * rstd[:, None]
    if weight is not None:
        y = y * _f64(weight).reshape(1, -1)
    return y.reshape(x.shape), rstd.reshape(lead)


def rms_norm_backward(dy, x, rstd, normalized_shape, weight=None):
    """Returns (dx, dweight)."""
    dy, x = _f64(dy), _f64(x)
    xr, lead, ns = _rows(x, normalized_shape)
    dyr = dy.reshape(xr.shape)
    rstd = _f64(rstd).reshape(-1, 1)
    K = xr.shape[1]
    gamma = np.ones(K) if weight is None else _f64(weight).reshape(-1)
    xhat = xr * rstd
    g = dyr * gamma[None, :]
    dx = rstd * (g - xhat * (g * xhat).mean(axis=1, keepdims=True))
    dweight = (dyr * xhat).sum(axis=0).reshape(ns)
    return dx.reshape(x.shape), dweight


# ---- finite differences ----------------------------------------------------------------

def numerical_grads(fn, arrays, dy, h=1e-6):
    """Central-difference gradients of the scalar loss sum(fn(*arrays) * dy).

    fn: a function of float64 arrays returning one float64 array of dy's shape.
    arrays: the float64 inputs to differentiate; None entries are passed through and
    get None as their gradient. Returns one gradient array per entry of `arrays`."""
    arrays = [None if a is None else np.array(a, dtype=np.float64) for a in arrays]
    dy = np.asarray(dy, dtype=np.float64)

    def loss():
        return float(np.sum(np.asarray(fn(*arrays), dtype=np.float64) * dy))

    grads = []
    for a in arrays:
        if a is None:
            grads.append(None)
            continue
        grad = np.zeros_like(a)
        flat, gflat = a.reshape(-1), grad.reshape(-1)
        for i in range(flat.size):
            keep = flat[i]
            flat[i] = keep + h
            up = loss()
            flat[i] = keep - h
            down = loss()
            flat[i] = keep
            gflat[i] = (up - down) / (2 * h)
        grads.append(grad)
    return grads


# ---- comparison tolerances -------------------------------------------------------------

# (rtol, atol) by x's dtype; atol is scaled by max(1, max |expected|), so that sums over
# many elements (dweight, dbias) are judged relative to their size.
FORWARD_TOL = {np.dtype(np.float32): (1e-5, 1e-5), np.dtype(np.float64): (1e-12, 1e-12)}
BACKWARD_TOL = {np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float64): (1e-10, 1e-11)}


def assert_close(actual, expected, dtype, kind="forward", scale=0.0):
    """actual (a cynorm result) against expected (a float64 reference).

    scale: the size of the terms the result is a difference of, when that exceeds the
    result itself (see dx_scale); the absolute tolerance grows with it."""
    table = FORWARD_TOL if kind == "forward" else BACKWARD_TOL
    rtol, atol = table[np.dtype(dtype)]
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(scale), float(np.max(np.abs(finite))) if finite.size else 1.0)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol,
                               atol=atol * scale)


def dx_scale(dy, rstd, weight=None):
    """The size of the terms dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) is a
    difference of: max |rstd| * max |dy * gamma|. A set with (almost) no variance has a
    large rstd and a dx near 0 that is a cancellation of large terms, so rounding to the
    data type is relative to this, not to dx itself."""
    rstd = np.asarray(rstd, dtype=np.float64)
    g = np.max(np.abs(np.asarray(dy, dtype=np.float64)), initial=0.0)
    if weight is not None:
        g *= max(1.0, float(np.max(np.abs(np.asarray(weight, dtype=np.float64)), initial=0.0)))
    return float(np.max(np.abs(rstd), initial=0.0)) * g


# ---- activations (the fused epilogue), in float64 --------------------------------------

_K_TANH = np.sqrt(2.0 / np.pi)


def _sigmoid(v):
    e = np.exp(-np.abs(v))
    return np.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def activation(name, x):
    """silu, gelu (erf form), gelu_tanh (torch's approximate="tanh") or relu of x, in
    float64, written so that no tail cancels or overflows; name None: x itself."""
    from scipy.special import erfc

    x = _f64(x)
    if name is None:
        return x
    with np.errstate(all="ignore"):
        if name == "silu":
            y = x * _sigmoid(x)
        elif name == "gelu":
            y = 0.5 * x * erfc(-x / np.sqrt(2.0))
        elif name == "gelu_tanh":
            # 0.5 x (1 + tanh(u)) = x sigmoid(2u)
            y = x * _sigmoid(2.0 * _K_TANH * (x + 0.044715 * x ** 3))
        elif name == "relu":
            y = np.where(x > 0, x, 0.0)
        else:
            raise ValueError(name)
        return np.where(np.isneginf(x), -0.0, y)


def activation_grad(name, x):
    """The derivative of activation(name, .) at x, float64."""
    from scipy.special import erfc

    x = _f64(x)
    if name is None:
        return np.ones_like(x)
    with np.errstate(all="ignore"):
        if name == "silu":
            s = _sigmoid(x)
            return s * (1.0 + x * (1.0 - s))
        if name == "gelu":
            return (0.5 * erfc(-x / np.sqrt(2.0))
                    + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi))
        if name == "gelu_tanh":
            s = _sigmoid(2.0 * _K_TANH * (x + 0.044715 * x ** 3))
            return s + x * s * (1.0 - s) * 2.0 * _K_TANH * (1.0 + 3 * 0.044715 * x * x)
        if name == "relu":
            return np.where(x > 0, 1.0, 0.0)
        raise ValueError(name)


# ---- test data layout ------------------------------------------------------------------

def at_offset(a, offset):
    """A copy of a whose data start offset bytes past a 64-byte boundary (for the kernels'
    aligned and unaligned paths)."""
    buf = np.empty(a.nbytes + 128, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out
