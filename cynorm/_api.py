"""cynorm's public functions: validate, normalise dtype and layout, allocate or check
`out`, and call one kernel. No loop over data runs in Python.

Semantics follow torch.nn.functional: biased variance, eps inside the square root.
Statistics are returned as float64 `mean` and `rstd` = 1 / sqrt(var + eps).

Storage dtypes: x may be float64, float32, float16 or bfloat16 (ml_dtypes.bfloat16,
recognised without importing ml_dtypes). Outputs have x's dtype; parameters are taken in
float32 for every dtype but float64 (converted here); 16-bit data are computed in
float32 lanes inside the kernels and rounded once on store.
"""
import operator

import numpy as np

from cynorm import _pool
from cynorm._kernels import channel, channels_last, row, slab
from cynorm._validate import (
    as_input, as_param, as_running, as_stats, check_activation, check_channel_axis,
    check_eps, check_flag, check_int, check_momentum, check_stats, is_lowp, param_dtype,
    prepare_out, same_shape,
)

# numpy.finfo(...).eps of the 16-bit storages (rms_norm's default eps, as torch's)
_LOWP_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def _layout(x, channel_axis, name="x"):
    """x with its channel axis: (x, N, C, HW, last), last True for channels-last x of
    shape (N, *spatial, C) (HW the product of the spatial dims), False for (N, C,
    *spatial)."""
    x = as_input(x, name, min_ndim=2)
    last = check_channel_axis(channel_axis, x.ndim) == -1
    shape = x.shape
    hw = 1
    for d in (shape[1:-1] if last else shape[2:]):
        hw *= d
    return x, shape[0], shape[-1] if last else shape[1], hw, last


def _stats_pair(shape):
    """Two float64 arrays of `shape` (mean, rstd) in one allocation ([0, ...] keeps a 0-d
    view an array)."""
    both = np.empty((2,) + shape)
    return both[0, ...], both[1, ...]


def _like(a, name, x):
    """An array that must match x in shape and dtype (dy)."""
    a = as_input(a, name)
    same_shape(a, name, x.shape)
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    return a


def _params(weight, bias, shape, x):
    """weight and bias checked and converted to the kernels' parameter dtype for x."""
    pd = param_dtype(x.dtype)
    return as_param(weight, "weight", shape, pd), as_param(bias, "bias", shape, pd)


def _to_f32(a):
    """A float32 copy of 16-bit data (exact), by the kernels' own conversion."""
    wide = _pool.empty(a.shape, np.float32, a.size * 4)
    row.convert(a, wide)
    return wide


def _store(src, dst):
    """dst[...] = src (float32), rounded to dst's dtype: 16-bit storages by the kernels'
    conversion (round to nearest even), any other dtype by NumPy."""
    if is_lowp(dst.dtype) and dst.flags.c_contiguous:
        row.convert(np.ascontiguousarray(src, dtype=np.float32), dst)
    elif is_lowp(dst.dtype):
        tmp = np.empty(dst.shape, dtype=dst.dtype)
        row.convert(np.ascontiguousarray(src, dtype=np.float32), tmp)
        dst[...] = tmp
    else:
        dst[...] = src
    return dst


def _param_grads(grads, weight, x):
    """dweight (and dbias), computed in the parameter dtype for x, in the dtype they are
    returned in: x's for float32/float64 data (the parameters are cast to it); for 16-bit
    data, the weight's dtype when weight is a float (or bfloat16) array, else x's."""
    if not is_lowp(x.dtype):
        return grads
    dt = x.dtype
    wdt = getattr(weight, "dtype", None)
    if isinstance(wdt, np.dtype) and (wdt.kind == "f" or is_lowp(wdt)):
        dt = wdt
    if dt == np.float32:
        return grads
    return tuple(None if g is None else _store(g, np.empty(g.shape, dtype=dt))
                 for g in grads)


def _update_running(r, momentum, stat):
    """r = (1 - momentum) * r + momentum * stat in place (stat float64); a 16-bit buffer
    is widened first, so that only the stored result is rounded."""
    if is_lowp(r.dtype):
        r[...] = ((1.0 - momentum) * r.astype(np.float64) + momentum * stat).astype(r.dtype)
    else:
        r[...] = (1.0 - momentum) * r + momentum * stat


def _grad_buffer(act, dx, x):
    """Where a backward with an activation forms dy * act'(a): dx's own buffer, unless dx
    is x (whose values the kernel still reads), then a scratch array."""
    if not act:
        return None
    return _pool.empty_like(x) if dx is x else dx


# two float64 statistics per (sample, group): more than this many pairs cannot even be
# addressed
_MAX_STAT_PAIRS = np.iinfo(np.intp).max // 16


def _groups(num_groups, N, C):
    G = check_int(num_groups, "num_groups", 1)
    if C % G:
        raise ValueError(f"num_groups ({G}) must divide the number of channels ({C})")
    if C == 0 and N * G > _MAX_STAT_PAIRS:
        # every G divides C = 0 (as in torch), but the (N, G) statistics must exist
        raise ValueError(f"num_groups ({G}) is too large: the statistics of shape "
                         f"(N, num_groups) = ({N}, {G}) cannot be allocated")
    return G


# ---- slab family: GroupNorm, InstanceNorm ---------------------------------------------

def _slab_forward(x, G, weight, bias, eps, out, return_stats, stats, running=(),
                  activation=None, channel_axis=1):
    x, N, C, HW, last = _layout(x, channel_axis)
    G = _groups(G, N, C) if G is not None else C
    welford = check_stats(stats)
    act = check_activation(activation)
    eps = check_eps(eps)
    w, b = _params(weight, bias, (C,), x)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, b) + running, may_alias=(x,))
    mean, rstd = _stats_pair((N, G))
    if last:
        channels_last.forward(x, y, w, b, mean, rstd, N, HW, C, G, eps, welford, act)
    else:
        slab.forward(x, y, w, b, mean, rstd, N, C, HW, G, eps, welford, act)
    if return_stats:
        return y, mean, rstd
    return y


def _slab_backward(dy, x, mean, rstd, G, weight, out, bias=None, activation=None,
                   channel_axis=1):
    x, N, C, HW, last = _layout(x, channel_axis)
    dy = _like(dy, "dy", x)
    G = _groups(G, N, C) if G is not None else C
    act = check_activation(activation)
    mean = as_stats(mean, "mean", (N, G))
    rstd = as_stats(rstd, "rstd", (N, G))
    w, b = _params(weight, bias, (C,), x)
    dx = prepare_out(out, "out", x.shape, x.dtype, (dy, x, w, b, mean, rstd),
                     may_alias=(dy, x))
    dw = np.empty(C, dtype=param_dtype(x.dtype))
    db = np.empty(C, dtype=param_dtype(x.dtype))
    kernel = channels_last.backward if last else slab.backward
    dims = (N, HW, C) if last else (N, C, HW)
    if is_lowp(x.dtype) and last and act:
        # the activation's gradient dy * act'(a) keeps float32 digits: the slab kernel
        # forms it in float32 a block at a time, the channels-last kernel in a float32
        # buffer of x's shape (dy, x and dx are read and written in place)
        kernel(dy, x, dx, w, dw, db, mean, rstd, *dims, G, act, b,
               _pool.empty(x.shape, np.float32, x.size * 4))
    else:
        kernel(dy, x, dx, w, dw, db, mean, rstd, *dims, G, act, b,
               None if is_lowp(x.dtype) else _grad_buffer(act, dx, x))
    dw, db = _param_grads((dw, db), weight, x)
    return dx, dw, db


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False, stats="two_pass", activation=None, channel_axis=1):
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
    activation: None, "silu", "gelu" (erf form), "gelu_tanh" (torch's approximate="tanh")
    or "relu": y = activation(normalised x * weight + bias), fused into the same pass
    (x read once, y written once). float32 results are within 1 ulp of the activation
    of the float32 affine output; the backward takes the same `activation` and `bias`.
    channel_axis: 1 (default) for x of shape (N, C, *spatial), or -1 for channels-last
    x of shape (N, *spatial, C) (Keras' GroupNormalization(axis=-1), Flax's GroupNorm,
    torch's channels_last memory format), read in place: the same groups, statistics
    ((N, num_groups)) and results, y of x's shape.

    Returns y, or (y, mean, rstd).
    """
    if num_groups is None:
        raise TypeError("num_groups must be an int, got NoneType")
    return _slab_forward(x, num_groups, weight, bias, eps, out, return_stats, stats,
                         activation=activation, channel_axis=channel_axis)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, out=None,
                        bias=None, activation=None, channel_axis=1):
    """Gradients of group_norm: returns (dx, dweight, dbias).

    dy, x: arrays of the forward's shape and dtype; mean, rstd: the forward's statistics
    (N, num_groups); weight: the forward's weight or None (then dweight is the gradient
    of an implicit weight of ones). dweight and dbias have shape (C,) and x's dtype.
    out: C-contiguous array to write dx into; out=dy or out=x is allowed.
    activation, bias: the forward's; with an activation, dy is the gradient of the
    activated output, and the activation's derivative is recomputed from x, mean, rstd,
    weight and bias (nothing else is saved).
    channel_axis: the forward's (1, or -1 for channels-last x of shape (N, *spatial, C)).
    """
    if num_groups is None:
        raise TypeError("num_groups must be an int, got NoneType")
    return _slab_backward(dy, x, mean, rstd, num_groups, weight, out, bias, activation,
                          channel_axis)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, out=None,
                  return_stats=False, stats="two_pass", activation=None, channel_axis=1):
    """Instance normalisation, as torch.nn.functional.instance_norm (same arguments in
    the same order): each (sample, channel) of x (N, C, *spatial) is normalised over its
    spatial elements.

    use_input_stats=True (default): each (sample, channel) uses its own mean and biased
    variance. running_mean and running_var, when given ((C,) float arrays, both or
    neither), are updated in place as torch does: r = (1 - momentum) * r + momentum * s,
    where s is the mean over the batch of the per-instance means, and of the
    per-instance unbiased variances for running_var. That needs more than one spatial
    element (ValueError otherwise); an empty batch (N = 0 or no spatial elements)
    leaves them unchanged (torch writes NaN for N = 0). Without running statistics, one
    spatial element gives y = bias, as group_norm does (torch raises).
    use_input_stats=False: every sample is normalised per channel with running_mean and
    running_var (both required), which are not changed; momentum is then ignored (any
    value is accepted, as torch does). use_input_stats is a bool (or the int 0 or 1).
    weight, bias: optional (C,) arrays, cast to x's dtype. out, stats: as in group_norm.
    return_stats: also return mean and rstd (float64), those used to normalise: (N, C)
    with input statistics, (C,) with running statistics; instance_norm_backward takes
    them with the same use_input_stats. activation: as in group_norm, with either kind
    of statistics. channel_axis: 1, or -1 for channels-last x (N, *spatial, C), as in
    group_norm.

    Returns y, or (y, mean, rstd).
    """
    x, N, C, HW, last = _layout(x, channel_axis)
    use_input_stats = check_flag(use_input_stats, "use_input_stats", allow_int=True)
    check_activation(activation)
    eps = check_eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    rm = as_running(running_mean, "running_mean", C, use_input_stats)
    rv = as_running(running_var, "running_var", C, use_input_stats)
    if not use_input_stats:
        if rm is None:
            raise ValueError("running_mean and running_var are required when "
                             "use_input_stats=False")
        y, mean, rstd = _running_stats_forward(x, N * HW if last else N, C,
                                               1 if last else HW, rm, rv, weight, bias,
                                               eps, out, stats, return_stats, activation)
    else:
        momentum = check_momentum(momentum)
        if rm is None:
            return _slab_forward(x, None, weight, bias, eps, out, return_stats, stats,
                                 activation=activation, channel_axis=channel_axis)
        if HW == 1:
            raise ValueError("instance_norm: updating running_var needs more than 1 "
                             f"spatial element per channel, got x of shape {x.shape}")
        y, mean, rstd = _slab_forward(x, None, weight, bias, eps, out, True, stats,
                                      running=(rm, rv), activation=activation,
                                      channel_axis=channel_axis)
        if N > 0 and HW > 0:
            # the per-instance variance back from rstd = 1 / sqrt(var + eps), in float64
            var = np.maximum(1.0 / (rstd * rstd) - eps, 0.0) * (HW / (HW - 1))
            _update_running(rm, momentum, mean.mean(axis=0))
            _update_running(rv, momentum, var.mean(axis=0))
    if return_stats:
        return y, mean, rstd
    return y


def instance_norm_backward(dy, x, mean, rstd, weight=None, use_input_stats=True, *,
                           out=None, bias=None, activation=None, channel_axis=1):
    """Gradients of instance_norm: returns (dx, dweight, dbias), dweight/dbias of shape
    (C,) and x's dtype.

    mean, rstd: the statistics instance_norm returned with the same use_input_stats:
    (N, C) per-instance statistics (functions of x), or with use_input_stats=False the
    (C,) running statistics, constants (then dx = dy * weight * rstd, as
    batch_norm_backward with training=False). weight, out, bias, activation: as in
    group_norm_backward. channel_axis: the forward's.
    """
    if check_flag(use_input_stats, "use_input_stats", allow_int=True):
        return _slab_backward(dy, x, mean, rstd, None, weight, out, bias, activation,
                              channel_axis)
    return _channel_backward(dy, x, mean, rstd, weight, False, out, bias, activation,
                             channel_axis)


# ---- channel family: BatchNorm ----------------------------------------------------------

def _running_stats_forward(x, N, C, HW, rm, rv, weight, bias, eps, out, stats,
                           return_stats, activation=None):
    """Every channel normalised with given statistics (BatchNorm in eval mode, and
    InstanceNorm with running statistics): y, and with return_stats the mean and rstd
    of shape (C,) (else None, None)."""
    welford = check_stats(stats)
    act = check_activation(activation)
    eps = check_eps(eps)
    w, b = _params(weight, bias, (C,), x)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, b, rm, rv), may_alias=(x,))
    if not return_stats:
        if N * HW:  # the kernel forms rstd from running_var: no (C,) temporaries
            channel.forward(x, y, w, b, np.ascontiguousarray(rm, dtype=np.float64),
                            None, np.ascontiguousarray(rv, dtype=np.float64), N, C, HW,
                            eps, welford, 0, act=act)
        return y, None, None
    mean = np.array(rm, dtype=np.float64)
    rstd = 1.0 / np.sqrt(np.asarray(rv, dtype=np.float64) + eps)
    channel.forward(x, y, w, b, mean, rstd, None, N, C, HW, eps, welford, 0, act=act)
    return y, mean, rstd


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, out=None, return_stats=False,
               stats="two_pass", activation=None, channel_axis=1):
    """Batch normalisation, as torch.nn.functional.batch_norm (same arguments in the
    same order).

    x: float32 or float64 array (N, C, *spatial), any number of spatial dims (also
    none). Each channel is normalised over its N * spatial values.
    training=True: uses the batch's mean and biased variance; running_mean and
    running_var, when given ((C,) float arrays), are updated in place:
    r = (1 - momentum) * r + momentum * batch_stat, with the unbiased variance for
    running_var. One value per channel (N * spatial == 1) raises ValueError.
    training=False: normalises with running_mean and running_var (both required);
    momentum is ignored (any value is accepted, as torch does).
    training is a bool (or the int 0 or 1).
    weight, bias: optional (C,) arrays. out: as in group_norm (out=x allowed).
    return_stats: also return mean and rstd (C,) float64, those used to normalise, which
    batch_norm_backward takes (with the same `training`).
    activation: as in group_norm, in training and eval mode.
    channel_axis: 1, or -1 for channels-last x (N, *spatial, C), as in group_norm: each
    channel is then a column of the (N * spatial, C) matrix, read in place.

    Returns y, or (y, mean, rstd).
    """
    x, N, C, HW, last = _layout(x, channel_axis)
    if last:  # channel c's values: column c of the (N * HW, C) matrix
        N, HW = N * HW, 1
    training = check_flag(training, "training", allow_int=True)
    act = check_activation(activation)
    rm = as_running(running_mean, "running_mean", C, training)
    rv = as_running(running_var, "running_var", C, training)
    if not training:
        if rm is None or rv is None:
            raise ValueError("running_mean and running_var are required when "
                             "training=False")
        y, mean, rstd = _running_stats_forward(x, N, C, HW, rm, rv, weight, bias, eps,
                                               out, stats, return_stats, activation)
        if return_stats:
            return y, mean, rstd
        return y
    welford = check_stats(stats)
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    w, b = _params(weight, bias, (C,), x)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, b, rm, rv), may_alias=(x,))
    count = N * HW
    if count == 0 and not return_stats:
        return y  # an empty batch: nothing to normalise, running statistics unchanged
    if count == 1:
        raise ValueError("batch_norm: expected more than 1 value per channel when "
                         f"training, got input of shape {x.shape}")
    mean = np.empty(C)
    rstd = np.empty(C)
    var = np.empty(C) if rv is not None else None  # only the update needs it
    if last and channels_last.BN_FORWARD_MIN_C <= C <= channels_last.BN_MAX_C:
        # channels-last: the channels-last family's kernel, one sample of N * spatial
        # rows with one channel per group (its schedules read each row whole, all C
        # channels at once); other widths the column path (see channels_last.pyx)
        channels_last.forward(x, y, w, b, mean, rstd, 1, N, C, C, eps, welford, act, var)
    else:
        channel.forward(x, y, w, b, mean, rstd, var, N, C, HW, eps, welford, 1, act=act)
    if count > 1:
        if rm is not None:
            _update_running(rm, momentum, mean)
        if rv is not None:
            _update_running(rv, momentum, var * (count / (count - 1)))
    if return_stats:
        return y, mean, rstd
    return y


def _channel_backward(dy, x, mean, rstd, weight, training, out, bias=None,
                      activation=None, channel_axis=1):
    x, N, C, HW, last = _layout(x, channel_axis)
    if last:
        N, HW = N * HW, 1
    dy = _like(dy, "dy", x)
    act = check_activation(activation)
    mean = as_stats(mean, "mean", (C,))
    rstd = as_stats(rstd, "rstd", (C,))
    w, b = _params(weight, bias, (C,), x)
    dx = prepare_out(out, "out", x.shape, x.dtype, (dy, x, w, b, mean, rstd),
                     may_alias=(dy, x))
    dw = np.empty(C, dtype=param_dtype(x.dtype))
    db = np.empty(C, dtype=param_dtype(x.dtype))
    if last and training and C <= channels_last.BN_MAX_C:
        # as the forward: the channels-last family's kernel, one sample, G = C (with an
        # activation, 16-bit data keep g = dy * act'(a) in a float32 buffer of x's shape)
        channels_last.backward(
            dy, x, dx, w, dw, db, mean, rstd, 1, N, C, C, act, b,
            _pool.empty(x.shape, np.float32, x.size * 4) if is_lowp(x.dtype) and act
            else None if is_lowp(x.dtype) else _grad_buffer(act, dx, x))
    elif is_lowp(x.dtype) and act:
        # the activation's gradient dy * act'(a) keeps float32 digits: the long-run path
        # recomputes it in float32 where it is needed, the column path (short runs) keeps
        # it in a float32 buffer of x's shape (dy, x and dx are read and written in place)
        channel.backward(dy, x, dx, w, dw, db, mean, rstd, N, C, HW, int(training), act, b,
                         _pool.empty(x.shape, np.float32, x.size * 4)
                         if HW < channel.SHORT_RUN else None)
    else:
        channel.backward(dy, x, dx, w, dw, db, mean, rstd, N, C, HW, int(training), act,
                         b, _grad_buffer(act, dx, x))
    dw, db = _param_grads((dw, db), weight, x)
    return dx, dw, db


def batch_norm_backward(dy, x, mean, rstd, weight=None, training=True, *, out=None,
                        bias=None, activation=None, channel_axis=1):
    """Gradients of batch_norm: returns (dx, dweight, dbias), dweight/dbias of shape (C,).

    mean, rstd: the (C,) statistics batch_norm returned. training=True: they are the
    batch's, functions of x; training=False: constants (the running statistics), so
    dx = dy * weight * rstd. out: as in group_norm_backward. activation, bias: the
    forward's, as in group_norm_backward. channel_axis: the forward's.
    """
    training = check_flag(training, "training", allow_int=True)
    return _channel_backward(dy, x, mean, rstd, weight, training, out, bias, activation,
                             channel_axis)


# ---- row family: LayerNorm, RMSNorm -------------------------------------------------------

def _rows(x, normalized_shape):
    """x as (R, K) rows over its trailing `normalized_shape` dims."""
    if isinstance(normalized_shape, (tuple, list)):
        try:
            ns = tuple(operator.index(d) for d in normalized_shape)
        except TypeError:
            raise TypeError("normalized_shape must be an int or a tuple of ints, got "
                            f"{normalized_shape!r}") from None
    else:
        try:
            ns = (operator.index(normalized_shape),)
        except TypeError:
            raise TypeError("normalized_shape must be an int or a tuple of ints, got "
                            f"{type(normalized_shape).__name__}") from None
    if not ns:
        raise ValueError("normalized_shape must name at least one dimension")
    x = as_input(x, "x", min_ndim=len(ns))
    if x.shape[x.ndim - len(ns):] != ns:
        raise ValueError(f"normalized_shape {ns} must match the trailing dimensions of x, "
                         f"got x of shape {x.shape}")
    lead = x.shape[:x.ndim - len(ns)]
    K = 1
    for d in ns:
        K *= d
    R = 1
    for d in lead:
        R *= d
    return x, ns, lead, R, K


def _residual(x, residual, residual_out, out):
    """(residual, h): the residual checked against x, and the array h = x + residual goes
    to (residual_out, which may be x or residual, or a new one)."""
    if residual is None:
        if residual_out is not None:
            raise ValueError("residual_out is given without residual")
        return None, None
    res = _like(residual, "residual", x)
    h = prepare_out(residual_out, "residual_out", x.shape, x.dtype, (x, res),
                    may_alias=(x, res))
    if out is not None and isinstance(out, np.ndarray) and np.may_share_memory(out, h):
        raise ValueError("out and residual_out must be different arrays (the next block "
                         "needs both y and h)")
    return res, h



def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False, stats="two_pass", residual=None, residual_out=None):
    """Layer normalisation over trailing dims, as torch.nn.functional.layer_norm.

    Each row of x over its trailing `normalized_shape` dims (an int or a tuple) is
    normalised with its own mean and biased variance, then multiplied by weight and
    shifted by bias elementwise (optional arrays of shape normalized_shape). This is the
    transformer LayerNorm; the GroupNorm paper's LayerNorm, with a per-channel affine
    over (C, *spatial), is group_norm(x, 1).
    out, stats: as in group_norm. return_stats: also mean and rstd, float64 of shape
    x.shape[:x.ndim - len(normalized_shape)].
    residual: an array of x's shape and dtype: the pre-norm transformer's residual add,
    fused. h = x + residual is normalised, and returned too (the next block needs it):
    the result is (y, h), or (y, h, mean, rstd). residual_out: where h goes (out= for
    h); out and residual_out may each be x or residual (in place), but not the same array.
    The backward is layer_norm_backward applied to h (pass h as x); its dx is the
    gradient with respect to h, which flows unchanged to both x and residual.

    Returns y, or (y, mean, rstd); with residual (y, h) or (y, h, mean, rstd).
    """
    x, ns, lead, R, K = _rows(x, normalized_shape)
    welford = check_stats(stats)
    eps = check_eps(eps)
    w, b = _params(weight, bias, ns, x)
    res, h = _residual(x, residual, residual_out, out)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, b, res), may_alias=(x, res))
    mean, rstd = _stats_pair(lead)
    row.forward(x, y, w, b, mean, rstd, R, K, eps, welford, 0, residual=res, h=h)
    if res is not None:
        return (y, h, mean, rstd) if return_stats else (y, h)
    if return_stats:
        return y, mean, rstd
    return y


def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight=None, *, out=None):
    """Gradients of layer_norm: returns (dx, dweight, dbias), dweight/dbias of shape
    normalized_shape and x's dtype. out: as in group_norm_backward."""
    x, ns, lead, R, K = _rows(x, normalized_shape)
    dy = _like(dy, "dy", x)
    mean = as_stats(mean, "mean", lead)
    rstd = as_stats(rstd, "rstd", lead)
    w, _ = _params(weight, None, ns, x)
    dx = prepare_out(out, "out", x.shape, x.dtype, (dy, x, w, mean, rstd),
                     may_alias=(dy, x))
    dw = np.empty(ns, dtype=param_dtype(x.dtype))
    db = np.empty(ns, dtype=param_dtype(x.dtype))
    row.backward(dy, x, dx, w, dw, db, mean, rstd, R, K, 0)
    dw, db = _param_grads((dw, db), weight, x)
    return dx, dw, db


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, return_stats=False,
             residual=None, residual_out=None):
    """Root-mean-square normalisation, as torch.nn.functional.rms_norm:
    y = x / sqrt(mean(x**2) + eps) * weight over the trailing `normalized_shape` dims.

    weight: optional array of shape normalized_shape. eps=None means
    numpy.finfo(x.dtype).eps. return_stats: also rstd = 1 / sqrt(mean(x**2) + eps),
    float64 of shape x.shape[:x.ndim - len(normalized_shape)].
    residual, residual_out: the fused residual add, as in layer_norm: returns (y, h) or
    (y, h, rstd); the backward is rms_norm_backward applied to h.

    Returns y, or (y, rstd); with residual (y, h) or (y, h, rstd).
    """
    x, ns, lead, R, K = _rows(x, normalized_shape)
    if eps is None:
        eps = _LOWP_EPS[x.dtype.name] if is_lowp(x.dtype) else float(np.finfo(x.dtype).eps)
    else:
        eps = check_eps(eps)
    w, _ = _params(weight, None, ns, x)
    res, h = _residual(x, residual, residual_out, out)
    y = prepare_out(out, "out", x.shape, x.dtype, (x, w, res), may_alias=(x, res))
    mean, rstd = _stats_pair(lead)
    row.forward(x, y, w, None, mean, rstd, R, K, eps, 0, 1, residual=res, h=h)
    if res is not None:
        return (y, h, rstd) if return_stats else (y, h)
    if return_stats:
        return y, rstd
    return y


def rms_norm_backward(dy, x, rstd, normalized_shape, weight=None, *, out=None):
    """Gradients of rms_norm: returns (dx, dweight), dweight of shape normalized_shape."""
    x, ns, lead, R, K = _rows(x, normalized_shape)
    dy = _like(dy, "dy", x)
    rstd = as_stats(rstd, "rstd", lead)
    w, _ = _params(weight, None, ns, x)
    dx = prepare_out(out, "out", x.shape, x.dtype, (dy, x, w, rstd), may_alias=(dy, x))
    dw = np.empty(ns, dtype=param_dtype(x.dtype))
    row.backward(dy, x, dx, w, dw, None, None, rstd, R, K, 1)
    dw, = _param_grads((dw,), weight, x)
    return dx, dw

