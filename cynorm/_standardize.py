"""standardize: y = (x - mean_S) / sqrt(var_S + eps) over any set of axes.

The reduced axes are mapped onto the kernel families without transposing x. Size-1 axes
are dropped and adjacent axes of the same kind (kept K / reduced R) merged, so x becomes
an alternation of K and R blocks:

    [R], [K, R]    rows (the row family: each row is a set)
    [R, K]         columns (BatchNorm's column path: leading axes reduced)
    [R, K, R]      channels (BatchNorm's (N, C, HW))
    [K, R, K]      batched columns (the columns family: LayerNorm2d over C of NCHW)
    [K]            sets of one element (rows of length 1)

Anything with more alternations (e.g. [R, K, R, K]) is copied once into a contiguous
layout with the kept axes first, normalised there as rows, and copied back.

weight and bias that vary only over the axes a family applies them along (per channel
for the column and channel families, over the normalized axes for rows and batched
columns) are fused into the kernel; any other broadcastable shape is applied after it
with NumPy, in place on y.
"""
import operator

import numpy as np

from cynorm._api import _store, _to_f32
from cynorm._kernels import channel, columns, row
from cynorm._validate import (
    as_input, check_eps, check_real, is_bfloat16, is_lowp, param_dtype, prepare_out,
    widen_bfloat16,
)

_TWO_PASS = 0


def _axes(axis, ndim):
    """axis (None, an int or a tuple of ints, negative allowed) as a sorted tuple."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        items = tuple(axis)
    else:
        items = (axis,)
    out = []
    for a in items:
        if isinstance(a, (bool, np.bool_)):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
        try:
            i = operator.index(a)
        except TypeError:
            raise TypeError("axis must be None, an int or a tuple of ints, got "
                            f"{axis!r}") from None
        if not -ndim <= i < ndim:
            raise ValueError(f"axis {i} is out of range for x with {ndim} dimensions")
        out.append(i % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis contains a repeated axis: {axis!r}")
    return tuple(sorted(out))


def _blocks(shape, reduced):
    """[(kind, size)]: size-1 axes dropped, adjacent axes of one kind merged."""
    blocks = []
    for d, n in enumerate(shape):
        if n == 1:
            continue
        kind = "R" if d in reduced else "K"
        if blocks and blocks[-1][0] == kind:
            blocks[-1][1] *= n
        else:
            blocks.append([kind, n])
    return "".join(k for k, _ in blocks), [n for _, n in blocks]


def _param(p, name, x):
    """weight/bias: None, or a float array broadcastable to x's shape (then returned
    with the x axes it varies over)."""
    if p is None:
        return None, ()
    if type(p) is not np.ndarray:
        try:
            p = np.asarray(p)
        except Exception as e:
            raise TypeError(f"{name} must be an array of floats: {e}") from None
    if is_bfloat16(p.dtype):
        p = widen_bfloat16(p)  # exactly
    elif p.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {p.dtype}")
    if p.ndim > x.ndim:
        raise ValueError(f"{name} of shape {p.shape} does not broadcast to x's shape "
                         f"{x.shape}")
    aligned = (1,) * (x.ndim - p.ndim) + p.shape
    for a, n in zip(aligned, x.shape):
        if a != 1 and a != n:
            raise ValueError(f"{name} of shape {p.shape} does not broadcast to x's "
                             f"shape {x.shape}")
    varying = tuple(d for d, a in enumerate(aligned) if a != 1)
    return p.reshape(aligned), varying


def _fused(p, along, x):
    """p (aligned to x's dims), which varies only over `along`, as the contiguous 1-D
    array over those axes (in their order) of the kernels' parameter dtype for x."""
    if p is None:
        return None
    full = np.broadcast_to(p, x.shape)
    index = tuple(slice(None) if d in along else 0 for d in range(x.ndim))
    return np.ascontiguousarray(full[index], dtype=param_dtype(x.dtype)).reshape(-1)


def standardize(x, axis=None, *, weight=None, bias=None, eps=0.0, ddof=0, out=None,
                return_stats=False):
    """Standardize x over `axis`: y = (x - mean) / sqrt(var + eps) * weight + bias.

    The statistics are taken over the axes in `axis` (an int, a tuple of ints, negative
    allowed; None: all axes), separately for every index of the other ("kept") axes:
    var = sum((x - mean)**2) / (n - ddof) with n the number of reduced elements, eps
    added inside the square root. With eps=0 (the default) this is
    scipy.stats.zscore(x, axis=axis, ddof=ddof) for a single axis, and it covers every
    normalisation set of the GroupNorm paper: batch_norm (training) is
    axis=(0, 2, 3, ...), layer_norm over the last k dims is axis=(-k, ..., -1),
    instance_norm is axis=(2, 3, ...), group_norm with G groups is axis=(2, 3, ...) of
    x.reshape(N, G, -1), and ConvNeXt's LayerNorm2d over C of NCHW is axis=1.

    x: float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16) array, any shape
    (statistics in float64 either way, two-pass and corrected, for 16-bit x from float32
    deviations, within 2e-5 of the float64 values; the output has x's dtype and shape;
    16-bit x is computed in float32 on the exactly widened values and rounded once,
    within 1 ulp of x's dtype). NaN in a set gives NaN for that
    set (scipy's default, nan_policy='propagate'). n - ddof <= 0: NaN, as scipy.
    weight, bias: optional arrays broadcastable to x's shape, e.g. per channel as
    BatchNorm's ((C, 1, 1) for NCHW with axis=(0, 2, 3)), or elementwise over the
    normalized axes as LayerNorm's; LayerNorm2d's weight is (C, 1, 1) with axis=1.
    eps: >= 0, added to the variance. ddof: a real number, "delta degrees of freedom".
    out: C-contiguous array of x's shape and dtype to write y into; out=x is allowed.
    return_stats: also return mean and std, float64 arrays over the kept axes in their
    order (as NumPy's reductions with keepdims=False), std = sqrt(var + eps), the value
    x - mean was divided by (np.std(x, axis, ddof=ddof) when eps = 0).

    Returns y, or (y, mean, std).
    """
    x = as_input(x, "x", min_ndim=0)
    reduced = _axes(axis, x.ndim)
    eps = check_eps(eps)
    ddof = check_real(ddof, "ddof")
    if ddof != ddof or ddof in (float("inf"), float("-inf")):
        raise ValueError(f"ddof must be a finite number, got {ddof!r}")
    w, w_axes = _param(weight, "weight", x)
    b, b_axes = _param(bias, "bias", x)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, b), may_alias=(x,))
    kept = tuple(d for d in range(x.ndim) if d not in reduced)
    stats_shape = tuple(x.shape[d] for d in kept)
    mean = np.empty(stats_shape)
    rstd = np.empty(stats_shape)
    if x.size == 0:
        mean.fill(np.nan)
        rstd.fill(np.nan)
    else:
        _run(x, y, reduced, kept, w, w_axes, b, b_axes, mean, rstd, eps, ddof)
    if return_stats:
        with np.errstate(divide="ignore"):
            return y, mean, np.divide(1.0, rstd, out=rstd)
    return y


def _run(x, y, reduced, kept, w, w_axes, b, b_axes, mean, rstd, eps, ddof):
    """Normalise x (no empty axis) into y with the family its block pattern maps to."""
    pattern, sizes = _blocks(x.shape, reduced)
    if pattern == "K":
        pattern, sizes = "KR", sizes + [1]
    elif pattern == "":
        pattern, sizes = "R", [1]
    # the axes along which each family applies weight and bias itself
    along = set(kept) if pattern in ("RK", "RKR") else set(reduced)
    fuse = set(w_axes) <= along and set(b_axes) <= along
    if is_lowp(x.dtype) and (not fuse or pattern == "KRK"):
        # 16-bit data where the kernel reads float32/float64 only (columns.pyx's
        # batched columns) or where weight and bias are applied after the kernel:
        # normalised as an exact float32 copy, the result rounded once to x's dtype
        y32 = _to_f32(x)
        _run(y32, y32, reduced, kept, w, w_axes, b, b_axes, mean, rstd, eps, ddof)
        _store(y32, y)
        return
    fw = _fused(w, along, x) if fuse else None
    fb = _fused(b, along, x) if fuse else None
    m, r = mean.reshape(-1), rstd.reshape(-1)
    if pattern in ("R", "KR"):
        K = sizes[-1]
        row.forward(x, y, fw, fb, m, r, x.size // K, K, eps, _TWO_PASS, 0, ddof)
    elif pattern in ("RK", "RKR"):
        N, C = sizes[0], sizes[1]
        HW = sizes[2] if pattern == "RKR" else 1
        channel.forward(x, y, fw, fb, m, r, None, N, C, HW, eps, _TWO_PASS, 1, ddof)
    elif pattern == "KRK":
        B, M, J = sizes
        columns.forward(x, y, fw, fb, m, r, B, M, J, eps, ddof, _TWO_PASS)
    else:
        # more alternations: one copy with the kept axes first, rows there, copy back
        perm = kept + reduced
        xt = np.ascontiguousarray(x.transpose(perm))
        K = x.size // max(m.size, 1)
        row.forward(xt, xt, fw, fb, m, r, m.size, K, eps, _TWO_PASS, 0, ddof)
        np.copyto(y.transpose(perm), xt)
    if not fuse:
        if w is not None:
            np.multiply(y, w, out=y, casting="unsafe")
        if b is not None:
            np.add(y, b, out=y, casting="unsafe")
