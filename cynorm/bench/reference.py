"""Plain NumPy forward and backward of every op, in the input dtype: the benchmark's NumPy
column and the self-check's float64 reference."""
import numpy as np

from cynorm.bench.suite import EPS, ROW_OPS


def _numpy_geometry(case, shape):
    """How the op sees x: (stats view, stats axes, affine view, weight view shape,
    affine-reduction axes, whether the mean is subtracted)."""
    if case.op in ROW_OPS:
        K = shape[-1]
        return (-1, K), (1,), (-1, K), (1, K), (0,), case.op == "layer_norm"
    N, C = shape[:2]
    G = case.groups if case.op == "group_norm" else C
    axes = (0, 2) if case.op == "batch_norm" else (2,)
    return (N, G, -1), axes, (N, C, -1), (1, C, 1), (0, 2), True


def numpy_forward(case, x, w, b, eps=None):
    """Plain NumPy, in x's dtype: y and what the backward needs (xhat, rstd).
    eps=None: the op's default (rms_norm: np.finfo(x.dtype).eps)."""
    vs, ax, va, wv, _, centred = _numpy_geometry(case, x.shape)
    if eps is None:
        eps = np.finfo(x.dtype).eps if case.op == "rms_norm" else EPS
    xs = x.reshape(vs)
    xc = xs - xs.mean(axis=ax, keepdims=True) if centred else xs
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=ax, keepdims=True) + eps)
    xhat = (xc * rstd).reshape(va)
    y = xhat * w.reshape(wv)
    if b is not None:
        y += b.reshape(wv)
    return y.reshape(x.shape), (xhat, rstd)


def numpy_backward(case, dy, saved, w):
    """dx, dweight, dbias (no dbias for rms_norm), from numpy_forward's saved values:
    dx = rstd * (g - mean_S(g) - xhat * mean_S(g * xhat)), g = dy * weight."""
    xhat, rstd = saved
    vs, ax, va, wv, pax, centred = _numpy_geometry(case, dy.shape)
    dya = dy.reshape(va)
    dw = (dya * xhat).sum(axis=pax).reshape(w.shape)
    g = (dya * w.reshape(wv)).reshape(vs)
    xh = xhat.reshape(vs)
    inner = g - xh * (g * xh).mean(axis=ax, keepdims=True)
    if centred:
        inner -= g.mean(axis=ax, keepdims=True)
    dx = (rstd * inner).reshape(dy.shape)
    if case.op == "rms_norm":
        return dx, dw
    return dx, dw, dya.sum(axis=pax).reshape(w.shape)

