"""cynorm's public functions: validate, normalise dtype and layout, allocate or check
`out`, and call one kernel. No loop over data runs in Python.

Semantics follow torch.nn.functional: biased variance, eps inside the square root.
Statistics are returned as float64 `mean` and `rstd` = 1 / sqrt(var + eps).
"""
import numpy as np

from cynorm._kernels import slab
from cynorm._validate import (
    as_input, as_param, as_stats, check_eps, check_int, check_stats, prepare_out,
    same_shape,
)


def _nchw(x, name="x"):
    """x (N, C, *spatial) as (N, C, HW)."""
    x = as_input(x, name, min_ndim=2)
    shape = x.shape
    hw = 1
    for d in shape[2:]:
        hw *= d
    return x, shape[0], shape[1], hw


def _groups(num_groups, C):
    G = check_int(num_groups, "num_groups", 1)
    if C % G:
        raise ValueError(f"num_groups ({G}) must divide the number of channels ({C})")
    return G


# ---- slab family: GroupNorm, InstanceNorm ---------------------------------------------

def _slab_forward(x, G, weight, bias, eps, out, return_stats, stats):
    x, N, C, HW = _nchw(x)
    G = _groups(G, C) if G is not None else C
    welford = check_stats(stats)
    eps = check_eps(eps)
    w = as_param(weight, "weight", (C,), x.dtype)
    b = as_param(bias, "bias", (C,), x.dtype)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, b), may_alias=(x,))
    mean = np.empty((N, G))
    rstd = np.empty((N, G))
    slab.forward(x, y, w, b, mean, rstd, N, C, HW, G, eps, welford)
    if return_stats:
        return y, mean, rstd
    return y


def _slab_backward(dy, x, mean, rstd, G, weight, out):
    x, N, C, HW = _nchw(x)
    dy = as_input(dy, "dy", min_ndim=2)
    same_shape(dy, "dy", x.shape)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    G = _groups(G, C) if G is not None else C
    mean = as_stats(mean, "mean", (N, G))
    rstd = as_stats(rstd, "rstd", (N, G))
    w = as_param(weight, "weight", (C,), x.dtype)
    dx = prepare_out(out, "out", x.shape, x.dtype, (dy, x, w, mean, rstd),
                     may_alias=(dy, x))
    dw = np.empty(C, dtype=x.dtype)
    db = np.empty(C, dtype=x.dtype)
    slab.backward(dy, x, dx, w, dw, db, mean, rstd, N, C, HW, G)
    return dx, dw, db


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False, stats="two_pass"):
    """Group normalisation (Wu & He, 2018), as torch.nn.functional.group_norm.

    x: float32 or float64 array (N, C, *spatial), any number of spatial dims (also none).
    The C channels form `num_groups` groups of C // num_groups channels; each (sample,
    group) is normalised with its own mean and biased variance, then scaled by
    weight[c] and shifted by bias[c] (optional (C,) arrays, cast to x's dtype).
    num_groups=1 is the LayerNorm of the GroupNorm paper (statistics over (C, *spatial),
    per-channel affine); num_groups=C is InstanceNorm.

    out: C-contiguous array of x's shape and dtype to write y into; out=x is allowed.
    return_stats: also return mean and rstd = 1 / sqrt(var + eps), float64 (N, num_groups),
    which group_norm_backward takes.
    stats: "two_pass" (default) or "welford", the algorithm for the statistics.

    Returns y, or (y, mean, rstd).
    """
    if num_groups is None:
        raise TypeError("num_groups must be an int, got NoneType")
    return _slab_forward(x, num_groups, weight, bias, eps, out, return_stats, stats)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, out=None):
    """Gradients of group_norm: returns (dx, dweight, dbias).

    dy, x: arrays of the forward's shape and dtype; mean, rstd: the forward's statistics
    (N, num_groups); weight: the forward's weight or None (then dweight is the gradient
    of an implicit weight of ones). dweight and dbias have shape (C,) and x's dtype.
    out: C-contiguous array to write dx into; out=dy or out=x is allowed.
    """
    if num_groups is None:
        raise TypeError("num_groups must be an int, got NoneType")
    return _slab_backward(dy, x, mean, rstd, num_groups, weight, out)


def instance_norm(x, weight=None, bias=None, eps=1e-5, *, out=None, return_stats=False,
                  stats="two_pass"):
    """Instance normalisation, as torch.nn.functional.instance_norm with batch statistics:
    each (sample, channel) of x (N, C, *spatial) is normalised over its spatial elements.
    Same arguments as group_norm; mean and rstd have shape (N, C).

    Returns y, or (y, mean, rstd).
    """
    return _slab_forward(x, None, weight, bias, eps, out, return_stats, stats)


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, out=None):
    """Gradients of instance_norm: returns (dx, dweight, dbias); see group_norm_backward."""
    return _slab_backward(dy, x, mean, rstd, None, weight, out)
