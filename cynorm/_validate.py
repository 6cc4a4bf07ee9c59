"""Argument checks shared by every op: the one source of truth for dtypes, shapes,
layouts and `out=`. Each failure is a TypeError or ValueError that names the argument.

Kept lean: the common case (a C-contiguous float32/float64 ndarray) costs a few
attribute reads, so that a tiny call stays in the microseconds.
"""
import math
import numbers
import operator

import numpy as np

from cynorm import _pool

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)
_STATS = {"two_pass": 0, "welford": 1}
# the activation epilogue's kernel codes
ACTIVATIONS = {None: 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}
_INF = float("inf")


def is_bfloat16(dt):
    """Whether dt is ml_dtypes' bfloat16, recognised without importing ml_dtypes (it
    registers its types with NumPy as kind 'V')."""
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16" and dt.names is None


def is_lowp(dt):
    """Whether dt is a 16-bit storage dtype: NumPy's float16 or bfloat16."""
    return dt == _F16 or is_bfloat16(dt)


def param_dtype(dt):
    """The dtype the kernels take parameters in for data of dtype dt: float64 for
    float64 data, float32 for float32 and the 16-bit storages."""
    return _F64 if dt == _F64 else _F32


def dtype_error(name, dtype):
    return TypeError(f"{name} must be a float32, float64, float16 or bfloat16 array, "
                     f"got dtype {dtype}")


def as_input(a, name, min_ndim=1):
    """a as a C-contiguous, native-order float32/float64/float16/bfloat16 ndarray (copied
    only when needed)."""
    if type(a) is not np.ndarray:
        if not isinstance(a, np.ndarray):
            a = _asarray(a, name)
        elif type(a) is not np.ndarray:
            a = np.asarray(a)  # subclasses (np.matrix, masked arrays) as plain arrays
    dt = a.dtype
    if dt is not _F32 and dt is not _F64 and dt != _F32 and dt != _F64:
        if dt.kind == "f" and dt.itemsize in (2, 4, 8):
            if not dt.isnative:
                a = a.astype(dt.newbyteorder("="))
        elif not is_bfloat16(dt):
            raise dtype_error(name, dt)
    if a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {a.shape}")
    return _contiguous(a)


def _contiguous(a, dtype=None):
    """a as a C-contiguous, aligned array of dtype (a itself when it already is one).
    np.ascontiguousarray keeps a misaligned buffer (np.frombuffer at an odd offset) as
    it is; the kernels need aligned elements."""
    flags = a.flags
    if (flags.c_contiguous and flags.aligned) and (dtype is None or a.dtype == dtype):
        return a
    return np.array(a, dtype=dtype, order="C", copy=True)


def _asarray(a, name):
    try:
        return np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of floats: {e}") from None


def as_param(p, name, shape, dtype):
    """An optional parameter (weight, bias) of exactly `shape`, cast to `dtype` (a
    float16 or bfloat16 parameter is widened exactly first)."""
    if p is None:
        return None
    if type(p) is not np.ndarray:
        p = _asarray(p, name)
    if p.dtype.kind != "f":
        if not is_bfloat16(p.dtype):
            raise TypeError(f"{name} must be a floating-point array, got dtype {p.dtype}")
        p = widen_bfloat16(p)
    if p.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {p.shape}")
    return _contiguous(p, dtype)


def widen_bfloat16(a):
    """A bfloat16 array as float32, exactly (its bits are a float32's upper half),
    without ml_dtypes."""
    bits = np.ascontiguousarray(a).view(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def as_stats(s, name, shape):
    """Saved statistics (mean, rstd) for a backward: float64, exactly `shape`."""
    if type(s) is not np.ndarray:
        s = _asarray(s, name)
    if s.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {s.dtype}")
    if s.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {s.shape}")
    return _contiguous(s, _F64)


def as_running(a, name, C, updated):
    """A running-statistics buffer (running_mean, running_var): None, or a float (or
    bfloat16) ndarray of shape (C,), writable when `updated` (the forward updates it in place)."""
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), "
                        f"got {type(a).__name__}")
    if a.dtype.kind != "f" and not is_bfloat16(a.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape {(C,)}, got {a.shape}")
    if updated and not a.flags.writeable:
        raise ValueError(f"{name} is read-only but training updates it in place")
    return a


def same_shape(a, name, shape):
    if a.shape != shape:
        raise ValueError(f"{name} must have the shape of x {shape}, got {a.shape}")


def check_real(v, name):
    """A real number (Python or NumPy scalar), not a bool or a string, as a float. An
    integer too large for a float (10**400) is a ValueError, not an OverflowError."""
    if type(v) is float:
        return v
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an integer too large for "
                         "a float") from None


def check_eps(eps, name="eps", allow_none=False):
    """A finite eps >= 0 as a float (None passes through when allow_none)."""
    if eps is None and allow_none:
        return None
    e = check_real(eps, name)
    if not 0.0 <= e < _INF:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return e


def check_momentum(momentum, name="momentum", allow_none=False):
    """A momentum in [0, 1] as a float (None passes through when allow_none)."""
    if momentum is None and allow_none:
        return None
    m = check_real(momentum, name)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]{' or None' if allow_none else ''}, "
                         f"got {momentum!r}")
    return m


def check_flag(v, name, allow_int=False):
    """A bool (Python or NumPy). allow_int also takes the integers 0 and 1; anything
    else, an array in particular, is a TypeError naming the argument."""
    if v is True or v is False:
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if (allow_int and isinstance(v, numbers.Integral) and not isinstance(v, np.ndarray)
            and v in (0, 1)):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {type(v).__name__}"
                    + (f" {v!r}" if isinstance(v, numbers.Integral) else ""))


def check_int(v, name, low, high=None):
    """An int >= low (and <= high when given); a bool or a float is a TypeError."""
    if type(v) is int and v >= low and (high is None or v <= high):
        return v
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if i < low:
        raise ValueError(f"{name} must be >= {low}, got {i}")
    if high is not None and i > high:
        raise ValueError(f"{name} must be <= {high}, got {i}")
    return i


def check_channel_axis(axis, ndim):
    """channel_axis of x with ndim dimensions: 1 (channels first, (N, C, *spatial)) or
    -1 (channels last, (N, *spatial, C)); an axis naming the same dimension (ndim - 1,
    or 1 - ndim) is taken too. Returns 1 or -1 (1 when both name dim 1: ndim == 2)."""
    if type(axis) is int and (axis == 1 or axis == -1) and ndim > 2:
        return axis
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"channel_axis must be an int, got {type(axis).__name__}")
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError(f"channel_axis must be an int, got {type(axis).__name__}") from None
    if -ndim <= a < 0:
        a += ndim
    if a == 1:
        return 1
    if a == ndim - 1 and a > 0:
        return -1
    raise ValueError(f"channel_axis must be 1 (x of shape (N, C, *spatial)) or -1 (x of "
                     f"shape (N, *spatial, C)), got {axis!r} for x with {ndim} dimensions")


def check_stats(stats):
    try:
        return _STATS[stats]
    except (KeyError, TypeError):
        raise ValueError(f"stats must be 'two_pass' or 'welford', got {stats!r}") from None


def check_activation(activation):
    """The kernel code of `activation` (None, "silu", "gelu", "gelu_tanh", "relu")."""
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError("activation must be None, 'silu', 'gelu', 'gelu_tanh' or 'relu', "
                         f"got {activation!r}") from None


def _same_buffer(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def prepare_out(out, name, shape, dtype, inputs, may_alias=()):
    """The output array: newly allocated, or `out` checked for shape, dtype, layout,
    writability and overlap. `out` may be exactly one of `may_alias` (in place), never
    a partial overlap with any input."""
    if out is None:  # large outputs from the output cache (cynorm/_pool.pyx)
        x = inputs[0]
        if x.shape == shape and x.dtype == dtype:
            return _pool.empty_like(x)  # the common case, and the quicker call
        return _pool.empty(shape, dtype, math.prod(shape) * np.dtype(dtype).itemsize)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.aligned):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for a in inputs:
        if a is not None and np.may_share_memory(out, a):
            if not (any(a is b for b in may_alias) and _same_buffer(out, a)):
                raise ValueError(f"{name} overlaps an input without being the same array")
    return out


# The largest step count a layer accepts: incrementing it stays far from int64 overflow,
# and it is exact in float64 (a count saved as a float loads unchanged).
MAX_COUNT = 2 ** 62


def _state_array(value, key):
    """A state_dict entry as an ndarray: NumPy arrays, scalars, nested lists, torch tensors
    (duck-typed, so that torch is never imported here; bfloat16 and the other floats
    NumPy lacks are widened to float64, exactly)."""
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        t = value.detach().cpu()
        try:
            return t.numpy()
        except TypeError:
            if t.is_floating_point():
                return t.double().numpy()
            raise TypeError(f"{key}: unsupported tensor dtype {t.dtype}") from None
    try:
        return np.asarray(value)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{key} must be an array of numbers: {e}") from None


def as_state_entry(value, key, target):
    """`value` checked and converted for loading into `target` (a layer's parameter or
    buffer): same shape, a real dtype (ml_dtypes' bfloat16 and the like included),
    finite values that stay finite in target's dtype, and for an integer target
    (num_batches_tracked) integers in [0, MAX_COUNT]. Returns an array of target's
    dtype; raises TypeError/ValueError naming `key`."""
    v = _state_array(value, key)
    if v.shape != target.shape:
        raise ValueError(f"{key} must have shape {target.shape}, got {v.shape}")
    kind = v.dtype.kind
    if kind == "V" and v.dtype.names is None:
        try:  # ml_dtypes' bfloat16, float8 and int4 types register as 'V'
            v = v.astype(np.float64)
        except (TypeError, ValueError):
            pass
        kind = v.dtype.kind
    if kind not in "fiu":
        raise TypeError(f"{key} must be a real (integer or floating-point) array, got "
                        f"dtype {v.dtype}")
    if target.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = v.astype(target.dtype)
        if kind == "f" and not np.array_equal(np.isfinite(cast), np.isfinite(v)):
            raise ValueError(f"{key} has values out of the range of {target.dtype}")
        return cast
    if kind == "f":
        if not np.isfinite(v).all():
            raise ValueError(f"{key} must be finite, got {v!r}")
        if not (v == np.floor(v)).all():
            raise ValueError(f"{key} must be integer-valued, got {v!r}")
    if not ((v >= 0) & (v <= MAX_COUNT)).all():
        raise ValueError(f"{key} must be in [0, {MAX_COUNT}], got {v!r}")
    return v.astype(target.dtype)
# ---- scale-out steps (cynorm._stats_api) ----------------------------------------------

_SETS = ("batch", "group", "instance", "layer", "rms")


def check_sets(sets):
    """Which op's normalisation sets: one of _SETS."""
    if sets not in _SETS:
        raise ValueError(f"sets must be one of {', '.join(map(repr, _SETS))}, got {sets!r}")
    return sets


def check_count(count, name="count"):
    """A number of elements per set: a finite real > 0."""
    c = check_real(count, name)
    if not 0.0 < c < _INF:
        raise ValueError(f"{name} must be a finite number > 0, got {count!r}")
    return c
