"""Argument checks shared by every op: the one source of truth for dtypes, shapes,
layouts and `out=`. Each failure is a TypeError or ValueError that names the argument.

Kept lean: the common case (a C-contiguous float32/float64 ndarray) costs a few
attribute reads, so that a tiny call stays in the microseconds.
"""
import numbers
import operator

import numpy as np

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_STATS = {"two_pass": 0, "welford": 1}
# the activation epilogue's kernel codes
ACTIVATIONS = {None: 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}
_INF = float("inf")


def _dtype_error(name, dtype):
    if dtype == np.float16:
        return TypeError(f"{name}: float16 is not supported yet; convert to float32")
    return TypeError(f"{name} must be a float32 or float64 array, got dtype {dtype}")


def as_input(a, name, min_ndim=1):
    """a as a C-contiguous float32/float64 ndarray (copied only when needed)."""
    if type(a) is not np.ndarray:
        if not isinstance(a, np.ndarray):
            a = _asarray(a, name)
        elif type(a) is not np.ndarray:
            a = np.asarray(a)  # subclasses (np.matrix, masked arrays) as plain arrays
    dt = a.dtype
    if dt is not _F32 and dt is not _F64 and dt != _F32 and dt != _F64:
        if dt.kind == "f" and dt.itemsize in (4, 8):
            a = a.astype(dt.newbyteorder("="))  # non-native byte order
        else:
            raise _dtype_error(name, dt)
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
    """An optional parameter (weight, bias) of exactly `shape`, cast to `dtype`."""
    if p is None:
        return None
    if type(p) is not np.ndarray:
        p = _asarray(p, name)
    if p.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {p.dtype}")
    if p.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {p.shape}")
    return _contiguous(p, dtype)


def as_stats(s, name, shape):
    """Saved statistics (mean, rstd) for a backward: float64, exactly `shape`."""
    if type(s) is not np.ndarray:
        s = _asarray(s, name)
    if s.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {s.dtype}")
    if s.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {s.shape}")
    return _contiguous(s, _F64)


def same_shape(a, name, shape):
    if a.shape != shape:
        raise ValueError(f"{name} must have the shape of x {shape}, got {a.shape}")


def check_real(v, name):
    """A real number (Python or NumPy scalar), not a bool or a string."""
    if type(v) is float:
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    return float(v)


def check_eps(eps, name="eps"):
    e = check_real(eps, name)
    if not 0.0 <= e < _INF:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return e


def check_int(v, name, low):
    if type(v) is int and v >= low:
        return v
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if i < low:
        raise ValueError(f"{name} must be >= {low}, got {i}")
    return i


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
    if out is None:
        x = inputs[0]
        if x.shape == shape and x.dtype == dtype:
            return np.empty_like(x)  # the common case, and the quicker call
        return np.empty(shape, dtype=dtype)
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
