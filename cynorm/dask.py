"""cynorm on Dask arrays: normalisation of arrays chunked along any axes, also arrays
larger than memory, as lazy Dask computations.

Importing this module imports dask (`import cynorm` alone never does; install it with
`pip install 'cynorm[dask]'`). Each function takes a `dask.array.Array` of float32,
float64, float16 or bfloat16 (ml_dtypes.bfloat16) and returns lazy Dask arrays of its
dtype (statistics float64), computed in three steps (DESIGN.md, "Scale-out"):

1. per chunk, the partial moments (count, mean, m2) of the sets it touches
   (cynorm.partial_stats);
2. a tree reduction of the partials, in chunk order, with Chan's formula
   (cynorm.merge_stats; at most SPLIT_EVERY partials per merge);
3. a blockwise apply with the merged statistics (cynorm.apply_stats).

The graph depends only on the array's shape and chunks, so the result is bitwise the
same on every run and with every scheduler (threads, processes, synchronous,
distributed). It equals cynorm on the whole array in memory to float64 rounding of the
statistics (a different merge tree), and bitwise that result for BatchNorm, InstanceNorm,
LayerNorm and RMSNorm when a chunk holds whole sets. Only the statistics (a few float64
per set) travel between workers.

Every op takes `reread=False`. The apply needs the statistics of all the chunks a set
spans, so by default Dask holds those chunks of x in memory from the statistics pass
to the apply. reread=True reads (or computes) x's chunks a second time for the apply
instead (dask.graph_manipulation.clone): what an array larger than the cluster's memory
needs when its sets span it (BatchNorm's do). GroupNorm, InstanceNorm, LayerNorm and
RMSNorm sets lie inside a chunk when x is chunked along the batch (leading) axes only;
then no chunk waits for others and reread is not needed.
"""

import numpy as np

try:
    import dask.array as da
    from dask.graph_manipulation import clone
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("cynorm.dask needs dask: pip install 'cynorm[dask]' "
                      f"(or pip install 'dask[array]') ({e})") from e

import cynorm
from cynorm._api import _LOWP_EPS, _store
from cynorm._stats_api import SHORT_RUN
from cynorm._validate import (as_param, check_eps, check_flag, check_int, check_real,
                              check_stats, dtype_error, is_bfloat16, is_lowp, param_dtype)

__all__ = ["SPLIT_EVERY", "batch_norm", "batch_norm_backward", "group_norm",
           "instance_norm", "layer_norm", "rms_norm"]

# fan-in of the tree reduction of partial statistics: a merge reads at most this many
SPLIT_EVERY = 8

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---- validation ------------------------------------------------------------------------

def _dask_input(x, name, min_ndim):
    if not isinstance(x, da.Array):
        raise TypeError(f"{name} must be a dask.array.Array, got {type(x).__name__} "
                        "(for NumPy arrays use cynorm's own functions)")
    dt = x.dtype
    if not (dt in (np.float32, np.float64) or is_lowp(dt)):
        raise dtype_error(name, dt)
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape "
                         f"{x.shape}")
    if any(np.isnan(c) for cs in x.chunks for c in cs):
        raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes() "
                         "first")
    return x


def _param(p, name, shape, dtype, chunks):
    """An optional parameter as a dask array of `shape` and `dtype` (the kernels'
    parameter dtype, or float64 for statistics), chunked like x's axes."""
    if p is None:
        return None
    if isinstance(p, da.Array):
        if p.dtype.kind != "f" and not is_bfloat16(p.dtype):
            raise TypeError(f"{name} must be a floating-point array, got dtype {p.dtype}")
        if p.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {p.shape}")
        return p.astype(dtype).rechunk(chunks)
    a = as_param(p, name, shape, dtype)
    return da.from_array(a, chunks=chunks)


def _ind(n, start=0):
    return _LETTERS[start:start + n]


# ---- step 1 and 2: partial statistics, tree-merged -------------------------------------

def _block_partials(block, sets, kept, **kw):
    """A chunk's partial moments as (3, *shape) with size 1 on the reduced axes."""
    p = cynorm.partial_stats(block, sets, **kw).stacked()
    shape = [block.shape[a] if a in kept else 1 for a in range(block.ndim)]
    return p.reshape([3] + shape)


def _merge_blocks(parts, axis, keepdims, **_):
    """Merge partials concatenated along the reduced axes, in C order of those axes."""
    moved = np.moveaxis(parts, [a for a in axis], list(range(len(axis))))
    lead = moved.shape[:len(axis)]
    rest = moved.shape[len(axis):]
    P = int(np.prod(lead, dtype=np.int64))
    merged = cynorm.merge_stats(np.ascontiguousarray(moved).reshape((P,) + rest))
    out = merged.stacked()
    if keepdims:
        out = np.expand_dims(out, tuple(axis))
    return out


def _identity(a, axis, keepdims, **_):
    return a


def _merged_stats(x, sets, kept, **kw):
    """(3, *[x.shape[a] for a in kept]) dask array of the sets' merged moments."""
    chunks = ((3,),) + tuple(x.chunks[a] if a in kept else (1,) * x.numblocks[a]
                             for a in range(x.ndim))
    parts = da.map_blocks(_block_partials, x, sets=sets, kept=tuple(kept), **kw,
                          new_axis=0, chunks=chunks, dtype=np.float64,
                          meta=np.empty((0,) * (x.ndim + 1)))
    reduced = tuple(a + 1 for a in range(x.ndim) if a not in kept)
    if not reduced:
        return parts
    return da.reduction(parts, _identity, _merge_blocks, combine=_merge_blocks,
                        axis=reduced, keepdims=False, dtype=np.float64,
                        split_every=SPLIT_EVERY, concatenate=True,
                        meta=np.empty((0,) * (x.ndim + 1 - len(reduced))))


def _mean_rstd(s, eps):
    """(2, ...) mean and rstd from merged (3, ...) moments."""
    p = cynorm.PartialStats(s[0], s[1], s[2])
    return np.stack([p.mean, p.rstd(eps)])


# ---- step 3: blockwise apply -----------------------------------------------------------

def _apply_block(xb, stats, w, b, sets, **kw):
    mean = None if sets == "rms" else stats[0]
    return cynorm.apply_stats(xb, mean, stats[1], w, b, sets, **kw)


def _float64_affine(x):
    """batch_norm_backward's choice in memory, from the whole array's run length (not a
    chunk's): dx of float32 and 16-bit data is computed in float64 for short runs (the
    forward's apply is float32 for every run length)."""
    return x.dtype != np.float64 and int(np.prod(x.shape[2:])) < SHORT_RUN


def _apply(x, stats, sind, w, b, pind, sets, reread=False, **kw):
    """y blockwise from (2, ...) statistics indexed `sind` on x's axes and parameters
    indexed `pind`. reread: from an independent copy of x's graph."""
    if reread:
        x = clone(x)
    xind = _ind(x.ndim)
    args = [x, xind, stats, "Z" + sind]
    args += [w, pind] if w is not None else [None, None]
    args += [b, pind] if b is not None else [None, None]
    return da.blockwise(_apply_block, xind, *args, dtype=x.dtype, concatenate=True,
                        meta=np.empty((0,) * x.ndim, dtype=x.dtype), sets=sets, **kw)


def _result(y, stats, return_stats):
    if return_stats:
        return y, stats[0], stats[1]
    return y


# ---- the ops ---------------------------------------------------------------------------

def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, return_stats=False,
               stats="two_pass", reread=False):
    """cynorm.batch_norm on a Dask array x (N, C, *spatial) chunked along any axes.

    training=True: each channel is normalised with the batch's statistics (merged over
    every chunk). Running statistics cannot be updated in place by a lazy computation:
    pass none, and update yours from the returned statistics when you need them.
    training=False: normalised with running_mean and running_var ((C,) arrays).
    weight, bias: optional (C,) arrays (NumPy or Dask). return_stats: also the lazy
    (C,) float64 mean and rstd (what batch_norm_backward takes). reread: see the
    module's docstring.

    Returns a lazy y (x's shape, dtype and chunks), or (y, mean, rstd).
    """
    x = _dask_input(x, "x", 2)
    C = x.shape[1]
    eps = check_eps(eps)
    check_real(momentum, "momentum")
    cchunks = (x.chunks[1],)
    w = _param(weight, "weight", (C,), param_dtype(x.dtype), cchunks)
    b = _param(bias, "bias", (C,), param_dtype(x.dtype), cchunks)
    if training:
        if running_mean is not None or running_var is not None:
            raise ValueError("cynorm.dask.batch_norm cannot update running statistics "
                             "in place when training; pass running_mean=None and "
                             "running_var=None and update them from return_stats=True")
        if x.size and x.size // C <= 1:
            raise ValueError("batch_norm: expected more than 1 value per channel when "
                             f"training, got input of shape {x.shape}")
        merged = _merged_stats(x, "batch", (1,), stats=stats)
        st = merged.map_blocks(_mean_rstd, eps, chunks=((2,),) + cchunks,
                               dtype=np.float64)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when "
                             "training=False")
        check_stats(stats)
        rm = _param(running_mean, "running_mean", (C,), np.float64, cchunks)
        rv = _param(running_var, "running_var", (C,), np.float64, cchunks)
        st = da.stack([rm, 1.0 / da.sqrt(rv + eps)]).rechunk(((2,),) + cchunks)
    y = _apply(x, st, "b", w, b, "b", "batch", reread and training)
    return _result(y, st, return_stats)


def _slab(x, G, weight, bias, eps, return_stats, stats, reread):
    C = x.shape[1]
    eps = check_eps(eps)
    cchunks = (x.chunks[1],)
    w = _param(weight, "weight", (C,), param_dtype(x.dtype), cchunks)
    b = _param(bias, "bias", (C,), param_dtype(x.dtype), cchunks)
    # per (sample, channel) moments over all spatial chunks ...
    merged = _merged_stats(x, "instance", (0, 1), stats=stats)
    if G == C:
        st = merged.map_blocks(_mean_rstd, eps, chunks=((2,),) + x.chunks[:2],
                               dtype=np.float64)
        y = _apply(x, st, "ab", w, b, "b", "instance", reread)
        return _result(y, st, return_stats)
    # ... merged over each group's channels, in channel order (all channels of a sample
    # block in one task: a few float64 per (sample, channel))
    whole = merged.rechunk({2: C})
    groups = whole.map_blocks(_group_stats, G, eps, chunks=((2,), x.chunks[0], (G,)),
                              dtype=np.float64)
    per_channel = groups.map_blocks(_repeat_channels, C // G,
                                    chunks=((2,), x.chunks[0], (C,)), dtype=np.float64)
    y = _apply(x, per_channel.rechunk({2: x.chunks[1]}), "ab", w, b, "b", "instance",
               reread)
    return _result(y, groups, return_stats)


def _group_stats(s, G, eps):
    """(3, n, C) per-channel moments -> (2, n, G) mean, rstd per group."""
    _, n, C = s.shape
    parts = np.moveaxis(s.reshape(3, n, G, C // G), 3, 0)
    return _mean_rstd(cynorm.merge_stats(np.ascontiguousarray(parts)).stacked(), eps)


def _repeat_channels(s, cpg):
    return np.repeat(s, cpg, axis=2)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, return_stats=False,
               stats="two_pass", reread=False):
    """cynorm.group_norm on a Dask array x (N, C, *spatial) chunked along any axes
    (channel chunks need not align with the groups). Returns a lazy y, or (y, mean,
    rstd) with (N, num_groups) float64 statistics."""
    x = _dask_input(x, "x", 2)
    if num_groups is None:
        raise TypeError("num_groups must be an int, got NoneType")
    G = check_int(num_groups, "num_groups", 1)
    if x.shape[1] % G:
        raise ValueError(f"num_groups ({G}) must divide the number of channels "
                         f"({x.shape[1]})")
    return _slab(x, G, weight, bias, eps, return_stats, stats, reread)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, return_stats=False,
                  stats="two_pass", reread=False):
    """cynorm.instance_norm on a Dask array x (N, C, *spatial) chunked along any axes,
    with the same argument order (torch's). Per-instance statistics only: running
    statistics cannot be read or updated lazily, so running_mean and running_var must
    be None and use_input_stats True (momentum is then unused). Returns a lazy y, or
    (y, mean, rstd) with (N, C) float64 statistics."""
    if running_mean is not None or running_var is not None:
        raise ValueError("cynorm.dask.instance_norm takes no running statistics "
                         "(running_mean and running_var must be None)")
    if not check_flag(use_input_stats, "use_input_stats", allow_int=True):
        raise ValueError("cynorm.dask.instance_norm needs use_input_stats=True")
    x = _dask_input(x, "x", 2)
    return _slab(x, x.shape[1], weight, bias, eps, return_stats, stats, reread)


def _normalized(x, normalized_shape):
    if isinstance(normalized_shape, (tuple, list)):
        ns = tuple(check_int(d, "normalized_shape", 0) for d in normalized_shape)
    else:
        ns = (check_int(normalized_shape, "normalized_shape", 0),)
    if not ns:
        raise ValueError("normalized_shape must name at least one dimension")
    x = _dask_input(x, "x", len(ns))
    if x.shape[x.ndim - len(ns):] != ns:
        raise ValueError(f"normalized_shape {ns} must match the trailing dimensions of x, "
                         f"got x of shape {x.shape}")
    return x, ns


def _rows(x, ns, weight, bias, eps, return_stats, stats, sets, reread):
    nd = len(ns)
    lead = x.ndim - nd
    tchunks = x.chunks[lead:]
    w = _param(weight, "weight", ns, param_dtype(x.dtype), tchunks)
    b = (_param(bias, "bias", ns, param_dtype(x.dtype), tchunks) if sets == "layer"
         else None)
    merged = _merged_stats(x, sets, tuple(range(lead)), normalized_ndim=nd, stats=stats)
    st = merged.map_blocks(_mean_rstd, eps, chunks=((2,),) + x.chunks[:lead],
                           dtype=np.float64)
    y = _apply(x, st, _ind(lead), w, b, _ind(nd, lead), sets, reread,
               normalized_ndim=nd)
    if return_stats and sets == "rms":
        return y, st[1]
    return _result(y, st, return_stats)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *,
               return_stats=False, stats="two_pass", reread=False):
    """cynorm.layer_norm on a Dask array chunked along any axes (also the normalised
    ones). Returns a lazy y, or (y, mean, rstd) of the leading dims' shape."""
    x, ns = _normalized(x, normalized_shape)
    eps = check_eps(eps)
    return _rows(x, ns, weight, bias, eps, return_stats, stats, "layer", reread)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, return_stats=False,
             reread=False):
    """cynorm.rms_norm on a Dask array chunked along any axes (eps=None: the machine
    epsilon of x's dtype). Returns a lazy y, or (y, rstd)."""
    x, ns = _normalized(x, normalized_shape)
    if eps is None:
        eps = (_LOWP_EPS[x.dtype.name] if is_lowp(x.dtype)
               else float(np.finfo(x.dtype).eps))
    else:
        eps = check_eps(eps)
    return _rows(x, ns, weight, None, eps, return_stats, "two_pass", "rms", reread)


# ---- backward --------------------------------------------------------------------------

def _block_grad_sums(dyb, xb, stats, ndim):
    s = np.stack(cynorm.batch_norm_backward_reduce(dyb, xb, stats[0]))
    return s.reshape([2, 1, s.shape[1]] + [1] * (ndim - 2))


def _add_blocks(parts, axis, keepdims, **_):
    """Sum partial sums concatenated along the reduced axes, in C order of those axes."""
    moved = np.moveaxis(parts, [a for a in axis], list(range(len(axis))))
    flat = moved.reshape((-1,) + moved.shape[len(axis):])
    out = flat[0].copy()
    for p in flat[1:]:
        out += p
    if keepdims:
        out = np.expand_dims(out, tuple(axis))
    return out


def _grad_block(dyb, xb, stats, sums, w, count, training, float64_affine):
    if not training:
        sums = np.zeros_like(sums)  # constant statistics: dx = dy * weight * rstd
    return cynorm.batch_norm_backward_apply(dyb, xb, stats[0], stats[1], sums[0],
                                            sums[1], count, w,
                                            float64_affine=float64_affine)


def _param_grads(sums, rstd, dtype):
    """dweight and dbias from the global sums, rounded to `dtype` (a 16-bit dtype from
    float32, as cynorm.batch_norm_backward computes them)."""
    g = np.stack([sums[1] * rstd, sums[0]])
    if is_lowp(np.dtype(dtype)):
        return _store(g.astype(np.float32), np.empty(g.shape, dtype=dtype))
    return g.astype(dtype)


def _grad_dtype(weight, dtype):
    """The dtype of dweight and dbias, as cynorm.batch_norm_backward's: x's, except for
    16-bit x with a float (or bfloat16) weight array, the weight's."""
    wdt = getattr(weight, "dtype", None)
    if (is_lowp(dtype) and isinstance(wdt, np.dtype)
            and (wdt.kind == "f" or is_bfloat16(wdt))):
        return wdt
    return dtype


def batch_norm_backward(dy, x, mean, rstd, weight=None, training=True):
    """Gradients of cynorm.dask.batch_norm: returns lazy (dx, dweight, dbias).

    dy, x: Dask arrays of one shape, dtype and chunking; mean, rstd: the (C,) statistics
    batch_norm returned (Dask or NumPy). training=True: they are the batch's, functions
    of x; training=False: constants, dx = dy * weight * rstd. The per-channel sums
    sum(dy) and sum(dy * (x - mean)) are reduced over the chunks like the statistics.
    """
    x = _dask_input(x, "x", 2)
    dy = _dask_input(dy, "dy", 2)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    dy = dy.rechunk(x.chunks)
    C = x.shape[1]
    cchunks = (x.chunks[1],)
    st = da.stack([_param(mean, "mean", (C,), np.float64, cchunks),
                   _param(rstd, "rstd", (C,), np.float64, cchunks)])
    w = _param(weight, "weight", (C,), param_dtype(x.dtype), cchunks)
    xind = _ind(x.ndim)
    parts = da.blockwise(_block_grad_sums, "Y" + xind, dy, xind, x, xind, st, "Zb",
                         ndim=x.ndim, dtype=np.float64, concatenate=True,
                         new_axes={"Y": 2},
                         adjust_chunks={_LETTERS[a]: 1 for a in range(x.ndim) if a != 1},
                         meta=np.empty((0,) * (x.ndim + 1)))
    reduced = tuple(a + 1 for a in range(x.ndim) if a != 1)
    sums = da.reduction(parts, _identity, _add_blocks, combine=_add_blocks, axis=reduced,
                        keepdims=False, dtype=np.float64, split_every=SPLIT_EVERY,
                        concatenate=True, meta=np.empty((0, 0)))
    count = float(x.size // C) if C else 1.0
    args = [dy, xind, x, xind, st, "Zb", sums, "Zb"]
    args += [w, "b"] if w is not None else [None, None]
    dx = da.blockwise(_grad_block, xind, *args, dtype=x.dtype, concatenate=True,
                      meta=np.empty((0,) * x.ndim, dtype=x.dtype), count=count,
                      training=bool(training), float64_affine=_float64_affine(x))
    pdt = _grad_dtype(weight, x.dtype)
    pg = da.map_blocks(_param_grads, sums, st[1], pdt, chunks=((2,),) + cchunks,
                       dtype=pdt, meta=np.empty((0, 0), dtype=pdt))
    return dx, pg[0], pg[1]
