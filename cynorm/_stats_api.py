"""Mergeable statistics: the public steps with which a normalisation set spread over
chunks, processes or machines is normalised (DESIGN.md, "Scale-out").

1. `partial_stats(x, sets)`: each worker's (count, mean, m2) per set, float64;
2. `merge_stats(parts)`: the partials of all workers folded in the given order with
   Chan's formula (same partition and order, same bits);
3. `apply_stats(x, mean, rstd, weight, bias, sets)`: each worker normalises its own data;
4. backward (per-channel sets, BatchNorm): `batch_norm_backward_reduce` gives each
   worker's sum(dy) and sum(dy * (x - mean)), which add over workers, and
   `batch_norm_backward_apply` turns the global sums into dx.

torch's CUDA building blocks for the same steps are torch.batch_norm_stats,
torch.batch_norm_gather_stats_with_counts, torch.batch_norm_elemt,
torch.batch_norm_backward_reduce and torch.batch_norm_backward_elemt.
Every function runs one kernel of cynorm._kernels.partial (threads, float64
accumulation); nothing here loops over data in Python.
"""
from typing import NamedTuple

import numpy as np

from cynorm._kernels import channel, partial
from cynorm._validate import (
    as_input, as_param, as_stats, check_count, check_eps, check_int, check_sets,
    check_stats, param_dtype, prepare_out, same_shape,
)

_F64 = np.dtype(np.float64)
# batch_norm's channel kernel applies in float64 below this run length (its column path)
SHORT_RUN = channel.SHORT_RUN


class PartialStats(NamedTuple):
    """Moments of every set of a part of the data, float64 arrays of the sets' shape:
    count (elements), mean, and m2 = sum((x - mean)**2) (for RMSNorm sets: mean 0 and
    m2 = sum(x**2)). Partials of disjoint parts of the same sets merge exactly
    (merge_stats)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def var(self, unbiased=False):
        """The variance, biased (m2 / count, what normalises) or unbiased
        (m2 / (count - 1), what running statistics track)."""
        return self.m2 / (self.count - 1 if unbiased else self.count)

    def rstd(self, eps=1e-5):
        """1 / sqrt(m2 / count + eps), with which apply_stats normalises."""
        eps = check_eps(eps)
        return 1.0 / np.sqrt(self.m2 / self.count + eps)

    def stacked(self):
        """The three arrays as one float64 array (3, *shape): what a collective sends."""
        return np.stack([self.count, self.mean, self.m2])


def _layout(x, sets, num_groups, normalized_ndim, stats_name="x"):
    """x as (A, K, B) with its group bounds: (x, A, K, B, bounds, per_sample, set shape,
    affine shape (per channel or elementwise), elementwise)."""
    kind = check_sets(sets)
    if kind in ("layer", "rms"):
        if normalized_ndim is None:
            raise TypeError(f"sets={sets!r} needs normalized_ndim (the number of "
                            "trailing dimensions a row spans)")
        nd = check_int(normalized_ndim, "normalized_ndim", 1)
        x = as_input(x, stats_name, min_ndim=nd)
        lead, tail = x.shape[:x.ndim - nd], x.shape[x.ndim - nd:]
        A = int(np.prod(lead, dtype=np.int64))
        B = int(np.prod(tail, dtype=np.int64))
        return x, A, 1, B, np.array([0, 1], dtype=np.intp), 1, lead, tail, True
    if normalized_ndim is not None:
        raise TypeError(f"normalized_ndim applies to sets='layer' or 'rms', not {sets!r}")
    x = as_input(x, stats_name, min_ndim=2)
    N, C = x.shape[0], x.shape[1]
    B = int(np.prod(x.shape[2:], dtype=np.int64))
    if kind == "group":
        if num_groups is None:
            raise TypeError("sets='group' needs num_groups")
        G = check_int(num_groups, "num_groups", 1)
        if C % G:
            raise ValueError(f"num_groups ({G}) must divide the number of channels ({C})")
        bounds = np.arange(G + 1, dtype=np.intp) * (C // G)
        return x, N, C, B, bounds, 1, (N, G), (C,), False
    if num_groups is not None:
        raise TypeError(f"num_groups applies to sets='group', not {sets!r}")
    bounds = np.arange(C + 1, dtype=np.intp)
    if kind == "instance":
        return x, N, C, B, bounds, 1, (N, C), (C,), False
    return x, N, C, B, bounds, 0, (C,), (C,), False


def partial_stats(x, sets="batch", *, num_groups=None, normalized_ndim=None,
                  stats="two_pass"):
    """Moments (count, mean, m2) of every normalisation set of x, as a PartialStats of
    float64 arrays. x: float32, float64, float16 or bfloat16 array (16-bit values are
    widened exactly; the moments are accumulated in float64 as for float32, from float32
    deviations summed a few at a time in float32 for 16-bit data with "two_pass": within
    2e-5 of the float64 moments, see the README's "16-bit storage"; "welford" keeps
    float64 deviations); sets:

    - "batch": x (N, C, *spatial), one set per channel, shape (C,) (batch_norm);
    - "group": x (N, C, *spatial), sets (N, num_groups) (group_norm);
    - "instance": x (N, C, *spatial), sets (N, C) (instance_norm);
    - "layer": rows over the trailing `normalized_ndim` dims, sets x.shape[:-nd]
      (layer_norm);
    - "rms": as "layer", with mean 0 and m2 = sum(x**2) (rms_norm).

    x may be any part of the data (a rank's batch, a Dask chunk); partials of disjoint
    parts of the same sets combine with merge_stats. stats: "two_pass" or "welford".
    When x holds whole sets, the result is bitwise what the op computes in memory.
    """
    x, A, K, B, bounds, per_sample, shape, _, _ = _layout(x, sets, num_groups,
                                                          normalized_ndim)
    welford = check_stats(stats)
    out = np.empty((3,) + tuple(shape))
    partial.moments(x, out, A, K, B, bounds, per_sample, int(sets != "rms"), welford)
    return PartialStats(out[0], out[1], out[2])


def merge_stats(parts):
    """Merge partial moments of disjoint parts of the same sets, folded in the given
    order with Chan's formula: the same parts in the same order give the same bits.

    parts: a sequence of PartialStats (or of (count, mean, m2) triples) of one shape, or
    a float64 array (P, 3, *shape) of P stacked partials (PartialStats.stacked()).
    Returns a PartialStats.
    """
    if isinstance(parts, np.ndarray):
        arr = parts
    else:
        try:
            parts = list(parts)
        except TypeError:
            raise TypeError("parts must be a sequence of PartialStats or an array "
                            f"(P, 3, ...), got {type(parts).__name__}") from None
        if not parts:
            raise ValueError("parts must hold at least one partial")
        try:
            arr = np.stack([np.stack([np.asarray(a, dtype=_F64) for a in p])
                            for p in parts])
        except (ValueError, TypeError) as e:
            raise ValueError(f"parts must be (count, mean, m2) triples of arrays of one "
                             f"shape: {e}") from None
    arr = as_stats(arr, "parts", arr.shape)
    if arr.ndim < 2 or arr.shape[1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"parts must have shape (P >= 1, 3, ...), got {arr.shape}")
    shape = arr.shape[2:]
    S = int(np.prod(shape, dtype=np.int64))
    out = np.empty((3,) + shape)
    partial.merge(arr, out, arr.shape[0], S)
    return PartialStats(out[0], out[1], out[2])


def apply_stats(x, mean, rstd, weight=None, bias=None, sets="batch", *, num_groups=None,
                normalized_ndim=None, out=None, float64_affine=None):
    """y = (x - mean) * rstd * weight + bias with given statistics of every set of x
    (as torch.batch_norm_elemt, for any op's sets; see partial_stats for `sets`).

    mean, rstd: float64 arrays of the sets' shape (for "rms", mean is ignored: pass
    None). weight, bias: (C,) per channel for "batch", "group", "instance"; elementwise
    over the trailing dims for "layer" and "rms" (no bias for "rms"), taken in float32
    for every x but float64 (a float16 or bfloat16 weight exactly). out: as in
    group_norm (out=x allowed). y has x's dtype: float16 and bfloat16 x are computed in
    float32 on the widened values and rounded once to x's dtype.
    float64_affine (sets "batch", "group", "instance"): compute the affine of float32
    data in float64, rounded once, rather than in float32 (within a few ulps; 16-bit
    data: rounded to float32, then to x's dtype); None or False: in float32, as every
    op's forward does (batch_norm's short runs included). Returns y.
    """
    x, A, K, B, bounds, per_sample, shape, pshape, elementwise = _layout(
        x, sets, num_groups, normalized_ndim)
    if sets == "rms":
        if mean is not None:
            raise TypeError("sets='rms' normalises without a mean: pass mean=None")
        if bias is not None:
            raise TypeError("sets='rms' has no bias")
        mean = np.zeros(shape)
    mean = as_stats(mean, "mean", tuple(shape))
    rstd = as_stats(rstd, "rstd", tuple(shape))
    pd = param_dtype(x.dtype)
    w = as_param(weight, "weight", tuple(pshape), pd)
    b = as_param(bias, "bias", tuple(pshape), pd)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, b, mean, rstd), may_alias=(x,))
    G = len(bounds) - 1
    gidx = np.repeat(np.arange(G, dtype=np.intp), np.diff(bounds))
    partial.apply(x, y, w, b, mean, rstd, A, K, B, gidx, G, per_sample, int(elementwise),
                  int(bool(float64_affine)))
    return y


def batch_norm_backward_reduce(dy, x, mean):
    """This part's per-channel gradient sums of batch normalisation, float64 (C,):
    (sum_dy, sum_dy_xmu) = (sum(dy), sum(dy * (x - mean))) over (N, *spatial), with the
    global mean (as torch.batch_norm_backward_reduce). Sums of disjoint parts add; this
    part's dbias is sum_dy and its dweight sum_dy_xmu * rstd."""
    x, A, K, B, *_ = _layout(x, "batch", None, None)
    dy = as_input(dy, "dy")
    same_shape(dy, "dy", x.shape)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    mean = as_stats(mean, "mean", (K,))
    sums = np.empty((2, K))
    partial.grad_sums(dy, x, mean, sums, A, K, B)
    return sums[0], sums[1]


def batch_norm_backward_apply(dy, x, mean, rstd, sum_dy, sum_dy_xmu, count, weight=None,
                              *, out=None, float64_affine=None):
    """dx of batch normalisation (training) for this part of the batch, from the global
    statistics (mean, rstd) and the global gradient sums of all parts (sum_dy,
    sum_dy_xmu, each the total over parts of batch_norm_backward_reduce) over `count`
    elements per channel (as torch.batch_norm_backward_elemt):
    dx = w * rstd * (dy - sum_dy / count - (x - mean) * rstd**2 * sum_dy_xmu / count).
    out: as in batch_norm_backward (out=dy or out=x allowed). float64_affine: as in
    apply_stats (None: float32 data in float64 exactly when the runs are shorter than
    64 elements, as batch_norm_backward). Returns dx."""
    x, A, K, B, *_ = _layout(x, "batch", None, None)
    dy = as_input(dy, "dy")
    same_shape(dy, "dy", x.shape)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    mean = as_stats(mean, "mean", (K,))
    rstd = as_stats(rstd, "rstd", (K,))
    sums = np.stack([as_stats(sum_dy, "sum_dy", (K,)),
                     as_stats(sum_dy_xmu, "sum_dy_xmu", (K,))])
    count = check_count(count)
    w = as_param(weight, "weight", (K,), param_dtype(x.dtype))
    dx = prepare_out(out, "out", x.shape, x.dtype, (dy, x, w, mean, rstd),
                     may_alias=(dy, x))
    if float64_affine is None:
        float64_affine = B < SHORT_RUN
    partial.grad_apply(dy, x, dx, w, mean, rstd, sums, count, A, K, B,
                       int(bool(float64_affine)))
    return dx
