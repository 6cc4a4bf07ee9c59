"""Plain float64 references of every op and the tolerance comparison, for the hardening
tests (tests/test_hardening_*.py). They need only NumPy: the fuzz tests draw the inputs,
the fixed cases in tests/test_hardening_extremes.py use them directly.

The references are deliberately plain: the definitions, in float64, set by set.
"""
import numpy as np

# ==== plain float64 references ============================================================

def _f64(a):
    return np.array(a, dtype=np.float64)


def prod(shape):
    p = 1
    for d in shape:
        p *= int(d)
    return p


def _set_stats(xs, eps, centered=True):
    """mean, biased variance and rstd of each row of xs (S, M), in float64.
    An empty set (M == 0) has mean 0 and variance NaN, as torch reports."""
    S, M = xs.shape
    if M == 0:
        return np.zeros(S), np.full(S, np.nan), np.full(S, np.nan)
    if centered:
        mean = xs.sum(axis=1) / M
    else:
        mean = np.zeros(S)
    var = ((xs - mean[:, None]) ** 2).sum(axis=1) / M
    with np.errstate(divide="ignore", invalid="ignore"):
        rstd = 1.0 / np.sqrt(var + eps)
    return mean, var, rstd


def ref_group_norm(x, G, w=None, b=None, eps=1e-5):
    """GroupNorm: returns y (float64), mean, rstd (N, G)."""
    x = _f64(x)
    N, C = x.shape[:2]
    HW = prod(x.shape[2:])
    M = (C // G) * HW if G else 0
    xs = x.reshape(N * G, M)
    mean, var, rstd = _set_stats(xs, eps)
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = ((xs - mean[:, None]) * rstd[:, None]).reshape(N, C, HW)
        y = xhat * (1.0 if w is None else _f64(w)[None, :, None])
        y = y + (0.0 if b is None else _f64(b)[None, :, None])
    return y.reshape(x.shape), mean.reshape(N, G), rstd.reshape(N, G)


def ref_group_norm_backward(dy, x, mean, rstd, G, w=None):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per set, g = dy * w;
    dweight = sum(dy * xhat), dbias = sum(dy) over (n, spatial)."""
    x, dy = _f64(x), _f64(dy)
    N, C = x.shape[:2]
    HW = prod(x.shape[2:])
    cpg = C // G if G else 0
    M = cpg * HW
    wv = np.ones(C) if w is None else _f64(w)
    m = _f64(mean).reshape(N, G, 1)
    r = _f64(rstd).reshape(N, G, 1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        xs = x.reshape(N, G, M)
        xhat = (xs - m) * r
        g = (dy.reshape(N, C, HW) * wv[None, :, None]).reshape(N, G, M)
        if M:
            mg = g.sum(axis=2, keepdims=True) / M
            mgx = (g * xhat).sum(axis=2, keepdims=True) / M
        else:
            mg = mgx = np.zeros((N, G, 1))
        dx = r * (g - mg - xhat * mgx)
        dyc = dy.reshape(N, C, HW)
        xhc = xhat.reshape(N, C, HW)
        dw = (dyc * xhc).sum(axis=(0, 2))
        db = dyc.sum(axis=(0, 2))
    return dx.reshape(x.shape), dw, db


def chan_view(x):
    """(N, C, *spatial) as (C, N * spatial)."""
    N, C = x.shape[:2]
    HW = prod(x.shape[2:])
    return x.reshape(N, C, HW).transpose(1, 0, 2).reshape(C, N * HW)


def ref_batch_norm(x, running_mean=None, running_var=None, w=None, b=None, training=False,
                   momentum=0.1, eps=1e-5):
    """Returns y, mean, rstd (C,), new running_mean, new running_var (float64 or None)."""
    x = _f64(x)
    N, C = x.shape[:2]
    HW = prod(x.shape[2:])
    new_rm = new_rv = None
    if training:
        mean, var, rstd = _set_stats(chan_view(x), eps)
        n = N * HW
        if running_mean is not None:
            new_rm = (1 - momentum) * _f64(running_mean) + momentum * mean
        if running_var is not None and n > 1:
            new_rv = (1 - momentum) * _f64(running_var) + momentum * var * n / (n - 1)
        elif running_var is not None:
            new_rv = _f64(running_var)
        if n <= 1 and running_mean is not None:
            new_rm = _f64(running_mean)
    else:
        mean = _f64(running_mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            rstd = 1.0 / np.sqrt(_f64(running_var) + eps)
    shape = (1, C, 1)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (x.reshape(N, C, HW) - mean.reshape(shape)) * rstd.reshape(shape)
        if w is not None:
            y = y * _f64(w).reshape(shape)
        if b is not None:
            y = y + _f64(b).reshape(shape)
    return y.reshape(x.shape), mean, rstd, new_rm, new_rv


def ref_batch_norm_backward(dy, x, mean, rstd, w=None, training=True):
    x, dy = _f64(x), _f64(dy)
    N, C = x.shape[:2]
    HW = prod(x.shape[2:])
    n = N * HW
    wv = np.ones(C) if w is None else _f64(w)
    xs, dys = chan_view(x), chan_view(dy)
    m = _f64(mean)[:, None]
    r = _f64(rstd)[:, None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        xhat = (xs - m) * r
        g = dys * wv[:, None]
        if training and n:
            dxs = r * (g - g.sum(1, keepdims=True) / n
                       - xhat * (g * xhat).sum(1, keepdims=True) / n)
        else:
            dxs = r * g
        dw = (dys * xhat).sum(axis=1)
        db = dys.sum(axis=1)
    dx = dxs.reshape(C, N, HW).transpose(1, 0, 2).reshape(x.shape)
    return dx, dw, db


def as_shape(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def ref_layer_norm(x, normalized_shape, w=None, b=None, eps=1e-5, rms=False):
    """Transformer LayerNorm (rms=False) or RMSNorm (rms=True) over trailing dims.
    Returns y, mean, rstd (stats of shape x.shape[:-len(ns)])."""
    x = _f64(x)
    ns = as_shape(normalized_shape)
    lead = x.shape[:x.ndim - len(ns)]
    K = prod(ns)
    xs = x.reshape(prod(lead), K)
    mean, var, rstd = _set_stats(xs, eps, centered=not rms)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (xs - mean[:, None]) * rstd[:, None]
        if w is not None:
            y = y * _f64(w).reshape(1, K)
        if b is not None:
            y = y + _f64(b).reshape(1, K)
    return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)


def ref_layer_norm_backward(dy, x, mean, rstd, normalized_shape, w=None, rms=False):
    x, dy = _f64(x), _f64(dy)
    ns = as_shape(normalized_shape)
    K = prod(ns)
    R = prod(x.shape[:x.ndim - len(ns)])
    xs, dys = x.reshape(R, K), dy.reshape(R, K)
    m = np.zeros((R, 1)) if rms else _f64(mean).reshape(R, 1)
    r = _f64(rstd).reshape(R, 1)
    wv = np.ones(K) if w is None else _f64(w).reshape(K)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        xhat = (xs - m) * r
        g = dys * wv[None, :]
        if K:
            mg = 0.0 if rms else g.sum(1, keepdims=True) / K
            mgx = (g * xhat).sum(1, keepdims=True) / K
        else:
            mg = mgx = 0.0
        dx = r * (g - mg - xhat * mgx)
        dw = (dys * xhat).sum(axis=0).reshape(ns)
        db = dys.sum(axis=0).reshape(ns)
    return dx.reshape(x.shape), dw, db


# ==== comparison ==========================================================================

TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


def assert_close(name, got, ref, scale, tol):
    """got holds, elementwise, a value within tol * scale of the float64 reference (scale:
    how large the answer's rounding can legitimately be) rounded to got's dtype, as the
    result is stored in that dtype: +-inf where that value overflows the dtype (as torch
    stores it, e.g. a float32 running_var of float32 data near 1e30), never inf where it
    does not; NaN where the reference is NaN; equal infinities."""
    got = np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, reference {ref.shape}"
    stored = got.dtype if got.dtype.kind == "f" else np.dtype(np.float64)
    g = got.astype(np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), ref.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        d = tol * scale
        # rounding is monotonic: the allowed values, stored, lie in [lo, hi]
        lo = (ref - d).astype(stored).astype(np.float64)
        hi = (ref + d).astype(stored).astype(np.float64)
        ok = (g == ref) | (np.isnan(g) & np.isnan(ref)) | ((lo <= g) & (g <= hi))
    if not ok.all():
        bad = np.argwhere(~ok)[:5]
        detail = ", ".join(f"{tuple(i)}: got {g[tuple(i)]!r} ref {ref[tuple(i)]!r} "
                           f"(allowed {d[tuple(i)]:.3g}: [{lo[tuple(i)]!r}, {hi[tuple(i)]!r}] "
                           f"in {stored})" for i in bad)
        raise AssertionError(f"{name}: {int((~ok).sum())} of {ok.size} elements off: {detail}")


def check_running_stats(rm, rv, rm_ref, rv_ref, x_log, rm0, rv0):
    """running_mean, running_var after a training batch_norm step on x_log (more than one
    value per channel) from rm0, rv0, against ref_batch_norm's float64 update rm_ref,
    rv_ref rounded to the buffers' dtype (assert_close): a float32 buffer holds inf where
    the update overflows float32, as torch's does."""
    x64 = chan_view(np.asarray(x_log, dtype=np.float64))
    n = x64.shape[1]
    tol = max(TOL[np.dtype(x_log.dtype)], TOL[rm.dtype], TOL[rv.dtype])
    sc = np.abs(x64).max(axis=1) + np.abs(rm0)
    assert_close("running_mean", rm, rm_ref, sc, tol)
    assert_close("running_var", rv, rv_ref, sc ** 2 * n / (n - 1) + np.abs(rv0), tol)


def forward_scale(x64, mean_b, rstd_b, w_b, b_b):
    """Per-element scale of y = (x - mean) * rstd * w + b: the size of its terms, plus the
    rounding of the mean amplified by rstd."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = (np.abs(x64 - mean_b) + np.abs(mean_b) + 1e-300) * rstd_b
        s = s * np.abs(w_b) + np.abs(b_b) + 1.0
    return np.where(np.isfinite(s), s, np.inf)


def check_backward(op, dtype, shape, dy_log, x_log, w_log, m_use, r_use, got, ref, G=None,
                   family="slab", ns=None, training=True):
    """Compare a backward with scales from the size of the terms of its sums."""
    tol = TOL[dtype]
    dx, dw, db = got
    dx_ref, dw_ref, db_ref = ref
    x64, dy64 = x_log.astype(np.float64), dy_log.astype(np.float64)
    if family == "slab":
        N, C = shape[:2]
        HW = prod(shape[2:])
        cpg = C // G if G else 0
        M = cpg * HW
        wv = np.ones(C) if w_log is None else w_log.astype(np.float64)
        r = r_use.reshape(N, G, 1)
        m = m_use.reshape(N, G, 1)
        with np.errstate(all="ignore"):
            xh = np.abs(x64.reshape(N, G, M) - m) * r + np.abs(m) * r
            g = np.abs(dy64.reshape(N, C, HW) * wv[None, :, None]).reshape(N, G, M)
            sg = g.max(axis=2, keepdims=True) if M else np.zeros((N, G, 1))
            sx = xh.max(axis=2, keepdims=True) if M else np.zeros((N, G, 1))
            dx_scale = (r * (g + sg + xh * sg * sx) + 1e-300).reshape(shape)
            dyxh = np.abs(dy64.reshape(N, C, HW)) * xh.reshape(N, C, HW)
            dw_scale = dyxh.sum(axis=(0, 2))
            db_scale = np.abs(dy64.reshape(N, C, HW)).sum(axis=(0, 2))
    elif family == "channel":
        N, C = shape[:2]
        HW = prod(shape[2:])
        wv = np.ones(C) if w_log is None else w_log.astype(np.float64)
        xs, dys = chan_view(x64), chan_view(dy64)
        r, m = r_use[:, None], m_use[:, None]
        with np.errstate(all="ignore"):
            xh = np.abs(xs - m) * r + np.abs(m) * r
            g = np.abs(dys * wv[:, None])
            sg = g.max(axis=1, keepdims=True) if xs.shape[1] else np.zeros((C, 1))
            sx = xh.max(axis=1, keepdims=True) if xs.shape[1] else np.zeros((C, 1))
            dxs = r * (g + sg + xh * sg * sx) + 1e-300
            dx_scale = dxs.reshape(C, N, HW).transpose(1, 0, 2).reshape(shape)
            dw_scale = (np.abs(dys) * xh).sum(axis=1)
            db_scale = np.abs(dys).sum(axis=1)
    else:
        K = prod(ns)
        R = prod(shape[:len(shape) - len(ns)])
        wv = np.ones(K) if w_log is None else w_log.astype(np.float64).reshape(K)
        xs, dys = x64.reshape(R, K), dy64.reshape(R, K)
        r, m = r_use.reshape(R, 1), m_use.reshape(R, 1)
        with np.errstate(all="ignore"):
            xh = np.abs(xs - m) * r + np.abs(m) * r
            g = np.abs(dys * wv[None, :])
            sg = g.max(axis=1, keepdims=True) if K else np.zeros((R, 1))
            sx = xh.max(axis=1, keepdims=True) if K else np.zeros((R, 1))
            dx_scale = (r * (g + sg + xh * sg * sx) + 1e-300).reshape(shape)
            dw_scale = (np.abs(dys) * xh).sum(axis=0).reshape(dw.shape)
            db_scale = np.abs(dys).sum(axis=0).reshape(dw.shape)
    dx_scale = np.where(np.isfinite(dx_scale), dx_scale, np.inf)
    assert_close(f"{op} dx", dx, dx_ref, dx_scale + 1.0, tol)
    assert_close(f"{op} dweight", dw, dw_ref,
                 np.where(np.isfinite(dw_scale), dw_scale, np.inf) + 1.0, tol)
    if db is not None:
        assert_close(f"{op} dbias", db, db_ref, db_scale + 1.0, tol)
