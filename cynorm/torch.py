"""Optional PyTorch bridge: cynorm's kernels as torch functions, autograd Functions and
nn.Modules.

Importing this module imports torch (`import cynorm` alone never does). It offers

- functions with torch.nn.functional's signatures, differentiable through autograd:
  `group_norm`, `instance_norm`, `batch_norm`, `layer_norm`, `rms_norm`, plus the fused
  epilogues as keyword-only options: `activation=` (None, "silu", "gelu", "gelu_tanh",
  "relu") on group_norm, instance_norm and batch_norm, `residual=` on layer_norm and
  rms_norm (returns (y, h), h = input + residual, y = norm(h));
- drop-in modules, subclasses of the torch modules of the same name (same constructor
  arguments, parameters, buffers and state_dict keys) whose forward runs cynorm:
  `GroupNorm`, `InstanceNorm1d/2d/3d`, `BatchNorm1d/2d/3d` (keyword-only `activation=`),
  `LayerNorm`, `RMSNorm` (`layer(x, residual=r)` returns (y, h));
- `convert(module)`: a model's torch.nn norms replaced by these, a norm directly
  followed by nn.SiLU / nn.GELU / nn.ReLU in an nn.Sequential fused with it.

Tensors must live on the CPU and be float32, float64, float16 or bfloat16 (a bfloat16
tensor's memory is handed over as ml_dtypes.bfloat16, so it needs ml_dtypes); outputs have
the input's dtype, parameter gradients their parameter's. Three routes, one set of
kernels:

- **Inference** (no input or parameter requires grad, or grad mode is off, or
  `torch.inference_mode()`): the kernel is called directly, without an autograd
  Function; the bridge checks the arguments once and calls the kernels as the NumPy
  API's checked entry points do (no second check), contiguous tensors are handed over
  without a copy (an array on the tensor's memory) and the output is the kernel's array
  wrapped by `torch.from_numpy` (no copy). The output has no grad_fn. The common module
  calls (float32/float64, contiguous, no residual) of every module run in
  cynorm._torch_glue, compiled (outputs allocated through NumPy's C API, the kernels
  called directly, the modules' parameter views cached); anything else takes the Python
  route below, which checks and raises.
- **Training**: one `torch.autograd.Function` (`_ModuleFunction`; `GroupNormFunction`
  and the other named Functions are thin wrappers of it) whose backward runs cynorm's
  backward kernels. Its forward and backward are compiled (cynorm._torch_glue's
  function_forward / function_backward): a module's common call runs there, keeping the
  input and parameters as attributes with their versions (checked before the backward,
  as save_for_backward would), and hands everything else to _forward_general /
  _backward_general. Double backward (`create_graph=True`, e.g. a gradient penalty) is
  supported: when a graph of the backward is requested, the backward is computed with
  torch operations from the same formulas (activation and residual included), which
  autograd can differentiate again.
- **torch.compile**: while compiling, the functions call the custom operators
  `torch.ops.cynorm.norm_forward` / `norm_backward` (registered with `torch.library`, with
  an autograd formula and a fake implementation), so the graph holds each norm as one
  opaque operator, without graph breaks.

Layout: a channels_last / channels_last_3d input of GroupNorm, InstanceNorm or BatchNorm
runs the channels-last kernels on its own memory (the (N, *spatial, C) view) and gives a
channels_last output (and input gradient), decided once per call in _input. Any other
non-contiguous input is made contiguous first; RMSNorm's output is then channels_last
again for a channels_last input (as torch's), LayerNorm's contiguous. Running statistics
are updated in place, as torch does.
"""
import math
import operator
from typing import List, Optional, Tuple

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("cynorm.torch needs PyTorch: pip install 'cynorm[torch]' "
                      f"(or pip install torch) ({e})") from e
import numpy as np

import cynorm
from cynorm import _api
from cynorm import _torch_glue as _glue
from cynorm._validate import ACTIVATIONS as _ACT_CODES

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction",
    "GroupNorm", "GroupNormFunction",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "InstanceNormFunction",
    "LayerNorm", "LayerNormFunction",
    "RMSNorm", "RMSNormFunction", "SyncBatchNorm",
    "batch_norm", "convert", "group_norm", "instance_norm", "layer_norm", "rms_norm",
]

_F32, _F64 = torch.float32, torch.float64
_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_torch_from_numpy = torch.from_numpy
_F16, _BF16 = torch.float16, torch.bfloat16
_I16 = torch.int16
# ops whose torch implementation keeps a channels_last input's layout in its output
_KEEPS_FORMAT = ("group", "batch", "rms")
_PER_CHANNEL = ("group", "instance", "batch")

# An op call is described by one tuple, p = (kind, num_groups, normalized_shape, flag,
# momentum, eps, activation): kind is "group", "instance", "batch", "layer" or "rms";
# flag is use_input_stats (instance) or training (batch); activation is None or the
# name of the fused activation (per-channel kinds only).


# ---- argument checks (once per call) ---------------------------------------------------

def _activation(v):
    """activation checked: None, "silu", "gelu", "gelu_tanh" or "relu"."""
    if v is None or (type(v) is str and v in _ACT_CODES):
        return v
    raise ValueError("activation must be None, 'silu', 'gelu', 'gelu_tanh' or 'relu', "
                     f"got {v!r}")


def _input(t, name="input", kind=None, layout=None):
    """(ndarray, memory format): t's values as a C-contiguous NumPy array sharing t's
    memory when t is contiguous, and t's channels_last format (or None).

    The layout decision of a call: for a per-channel kind (GroupNorm, InstanceNorm,
    BatchNorm) a channels_last / channels_last_3d input is handed over as its own memory,
    the C-contiguous (N, *spatial, C) view (the kernels then run with channel_axis=-1),
    and the returned format says so (see _is_last). layout: force that layout (a
    gradient must have its forward input's), None: t's own."""
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    dt = t.dtype
    if dt is not _F32 and dt is not _F64 and dt is not _F16 and dt is not _BF16:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {dt}")
    if t.requires_grad:
        t = t.detach()
    if layout is None:
        if t.is_contiguous():
            return _numpy(t, name), None
        fmt = _format(t)
    else:
        fmt = layout
    if fmt is not None and kind in _PER_CHANNEL:  # the (N, *spatial, C) view, no copy
        return _numpy(t.contiguous(memory_format=fmt).permute(_TO_LAST[fmt]), name), fmt
    return _numpy(t.contiguous(), name), fmt


def _numpy(t, name):
    """A tensor's NumPy view (same memory); a bfloat16 tensor's storage viewed as
    ml_dtypes.bfloat16; a negative view (torch._neg_view) as its resolved values."""
    if t.dtype is not _BF16:
        try:
            return t.numpy()
        except RuntimeError:
            return t.resolve_neg().numpy()
    if t.is_neg():
        t = t.resolve_neg()
    bf16 = _bfloat16()
    if bf16 is None:
        raise TypeError(f"{name}: bfloat16 tensors need the ml_dtypes package "
                        "(pip install ml-dtypes)")
    return t.view(_I16).numpy().view(bf16)


_BF16_NP = []


def _bfloat16():
    """ml_dtypes.bfloat16, or None when ml_dtypes is not installed (imported once, at the
    first bfloat16 tensor)."""
    if not _BF16_NP:
        try:
            import ml_dtypes
            _BF16_NP.append(ml_dtypes.bfloat16)
        except ImportError:
            return None
    return _BF16_NP[0]


def _from_numpy(a):
    """A NumPy array as a tensor of the same memory (bfloat16 arrays included)."""
    if a.dtype.kind != "V":
        return _torch_from_numpy(a)
    return _torch_from_numpy(a.view(np.int16)).view(_BF16)


def _format(t):
    """t's channels_last / channels_last_3d memory format, or None (contiguous tensors,
    whose layout is ambiguous, included)."""
    if t.is_contiguous():
        return None
    dim = t.dim()
    if dim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if dim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


# permutations from (N, C, *spatial) to the (N, *spatial, C) view and back
_TO_LAST = {torch.channels_last: (0, 2, 3, 1), torch.channels_last_3d: (0, 2, 3, 4, 1)}
_FROM_LAST = {torch.channels_last: (0, 3, 1, 2), torch.channels_last_3d: (0, 4, 1, 2, 3)}


def _is_last(kind, fmt):
    """Whether a call of this kind with _input's format runs the channels-last kernels."""
    return fmt is not None and kind in _PER_CHANNEL


def _param(t, name):
    return None if t is None else _input(t, name)[0]


def _running(t, name):
    """A running-statistics buffer as a NumPy view that the kernel updates in place."""
    if t is None:
        return None
    if isinstance(t, _Tensor) and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return _input(t, name)[0]


def _shape(normalized_shape):
    """normalized_shape as a tuple of ints; floats, strings and the like raise TypeError,
    as in torch."""
    if isinstance(normalized_shape, (tuple, list)):
        try:
            return tuple(operator.index(d) for d in normalized_shape)
        except TypeError:
            raise TypeError("normalized_shape must be an int or a tuple of ints, got "
                            f"{normalized_shape!r}") from None
    try:
        return (operator.index(normalized_shape),)
    except TypeError:
        raise TypeError("normalized_shape must be an int or a tuple of ints, got "
                        f"{type(normalized_shape).__name__}") from None


def _needs_grad(input, weight, bias, residual=None):
    """Whether autograd must record this call."""
    if not _grad_enabled():
        return False
    return (getattr(input, "requires_grad", False)
            or getattr(weight, "requires_grad", False)
            or getattr(bias, "requires_grad", False)
            or getattr(residual, "requires_grad", False))


# ---- the kernels, on NumPy arrays ------------------------------------------------------

def _kernel_forward(p, x, w, b, rm, rv, r=None, fmt=None):
    """(y, h, mean, rstd) from cynorm's forward (the public API's checks included); h is
    None without a residual, mean None for rms. fmt: _input's format of x."""
    kind, groups, shape, flag, momentum, eps, act = p
    ca = -1 if _is_last(kind, fmt) else 1
    h = None
    if kind == "group":
        y, mean, rstd = cynorm.group_norm(x, groups, w, b, eps, return_stats=True,
                                          activation=act, channel_axis=ca)
    elif kind == "batch":
        y, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, flag, momentum, eps,
                                          return_stats=True, activation=act,
                                          channel_axis=ca)
    elif kind == "layer":
        if r is None:
            y, mean, rstd = cynorm.layer_norm(x, shape, w, b, eps, return_stats=True)
        else:
            y, h, mean, rstd = cynorm.layer_norm(x, shape, w, b, eps, return_stats=True,
                                                 residual=r)
    elif kind == "rms":
        mean = None
        if r is None:
            y, rstd = cynorm.rms_norm(x, shape, w, eps, return_stats=True)
        else:
            y, h, rstd = cynorm.rms_norm(x, shape, w, eps, return_stats=True, residual=r)
    else:  # instance: cynorm.instance_norm has torch's semantics, running stats included
        spatial = x.shape[1:-1] if ca == -1 else x.shape[2:]
        if flag and x.ndim >= 2 and math.prod(spatial) == 1:
            size = x.shape[:1] + x.shape[-1:] + spatial if ca == -1 else x.shape
            raise ValueError("Expected more than 1 spatial element when training, "
                             f"got input size {tuple(size)}")
        y, mean, rstd = cynorm.instance_norm(x, rm, rv, w, b, flag, momentum, eps,
                                             return_stats=True, activation=act,
                                             channel_axis=ca)
    return y, h, mean, rstd


def _kernel_backward(p, dy, x, w, b, mean, rstd, fmt=None):
    """(dx, dweight, dbias) from cynorm's backward; dbias is None for rms. x is h for a
    residual call; b (the forward's bias) is needed only with an activation; fmt: the
    forward's format of x (dy in the same layout)."""
    kind, groups, shape, flag, momentum, eps, act = p
    ca = -1 if _is_last(kind, fmt) else 1
    if act is None:
        b = None
    if kind == "group":
        return cynorm.group_norm_backward(dy, x, mean, rstd, groups, w, bias=b,
                                          activation=act, channel_axis=ca)
    if kind == "layer":
        return cynorm.layer_norm_backward(dy, x, mean, rstd, shape, w)
    if kind == "rms":
        dx, dw = cynorm.rms_norm_backward(dy, x, rstd, shape, w)
        return dx, dw, None
    if kind == "instance":
        return cynorm.instance_norm_backward(dy, x, mean, rstd, w, flag, bias=b,
                                             activation=act, channel_axis=ca)
    return cynorm.batch_norm_backward(dy, x, mean, rstd, w, flag, bias=b, activation=act,
                                      channel_axis=ca)


def _checked_forward(p, x, w, b, rm, rv, r, need_stats, fmt=None):
    """(y, h, mean, rstd) from the NumPy API's checked entries, or None when the call
    must go through the public functions' checks (see _torch_glue.checked_forward). The
    checked entries take float32/float64 data in (N, C, *spatial) layout: 16-bit and
    channels-last calls (fmt) go through the public functions."""
    if _is_last(p[0], fmt):
        return None
    return _glue.checked_forward(p, x, w, b, rm, rv, r, need_stats)


_checked_backward = _glue.checked_backward


def _lean_checked(p, x, w, b, rm, rv, r, fmt=None):
    """The inference output (y, or (y, h) with a residual) from the checked entries, or
    None (see _checked_forward)."""
    res = _checked_forward(p, x, w, b, rm, rv, r, False, fmt)
    if res is None:
        return None
    return res[0] if r is None else (res[0], res[1])


def _lean_arrays(p, x, w, b, rm, rv, r, fmt=None):
    """y (or (y, h) with a residual) of an inference call, as NumPy arrays."""
    y = _lean_checked(p, x, w, b, rm, rv, r, fmt)
    if y is None:
        y, h, _, _ = _kernel_forward(p, x, w, b, rm, rv, r, fmt)
        if r is not None:
            return y, h
    return y


def _output(y, fmt, kind):
    """The output tensor of the kernel's y (fmt: _input's format of x): a channels-last
    y, (N, *spatial, C), becomes the channels_last tensor of its memory."""
    t = _from_numpy(y)
    if fmt is None:
        return t
    if kind in _PER_CHANNEL:
        return t.permute(_FROM_LAST[fmt])
    if kind in _KEEPS_FORMAT:
        return t.contiguous(memory_format=fmt)
    return t


def _lean_output(y, fmt, kind, residual):
    if residual is None:
        return _output(y, fmt, kind)
    return _output(y[0], fmt, kind), _from_numpy(y[1])


def _lean(p, input, weight, bias, running_mean, running_var, residual=None):
    """The functions' inference route: no autograd record; the kernel's output array
    becomes the output tensor (torch.from_numpy: about 0.6 us, where a torch.empty whose
    NumPy view the kernel fills through out= costs about 2.5 us, measured on a
    (1, 32, 8, 8) call)."""
    x, fmt = _input(input, "input", p[0])
    r = None if residual is None else _input(residual, "residual")[0]
    y = _lean_arrays(p, x, _param(weight, "weight"), _param(bias, "bias"),
                     _running(running_mean, "running_mean"),
                     _running(running_var, "running_var"), r, fmt)
    return _lean_output(y, fmt, p[0], residual)


def _module_views(module, weight, bias, running_mean, running_var):
    """The NumPy views of a module's parameters and buffers, kept between calls on the
    module (a Parameter's detach().numpy() costs about 1 us). Reused only while the
    module holds the same tensor objects on the same memory with the same shape and dtype
    (`.data =`, `.to()`, `load_state_dict` and in-place updates are all seen; each view
    holds its tensor's memory alive; see _torch_glue.cached_views); not kept when a
    tensor is non-contiguous (its view is a copy)."""
    arrays = _glue.cached_views(module, weight, bias, running_mean, running_var)
    if arrays is not None:
        return arrays
    tensors = (weight, bias, running_mean, running_var)
    arrays = (_param(weight, "weight"), _param(bias, "bias"),
              _running(running_mean, "running_mean"), _running(running_var, "running_var"))
    keys = tuple(None if t is None else (t.data_ptr(), t.shape, t.dtype) for t in tensors)
    if all(a is None or a.__array_interface__["data"][0] == k[0]
           for a, k in zip(arrays, keys)):
        module.__dict__["_cynorm_views"] = tensors + (keys, arrays)
    return arrays


def _module_call(module, p, input, weight, bias, running_mean, running_var,
                 residual=None):
    """A module's eager call: the inference route, or _ModuleFunction when autograd must
    record it. The parameters' and buffers' NumPy views come from the module's cache;
    the common inference call runs in _torch_glue.lean_module."""
    if residual is None:
        y = _glue.lean_module(module, p, input, weight, bias, running_mean, running_var)
        if y is not None:
            return y
    if _grad_enabled() and (getattr(input, "requires_grad", False)
                            or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)
                            or getattr(residual, "requires_grad", False)):
        return _record(p, module, input, weight, bias, running_mean, running_var,
                       residual)
    x, fmt = _input(input, "input", p[0])
    w, b, rm, rv = _module_views(module, weight, bias, running_mean, running_var)
    r = None if residual is None else _input(residual, "residual")[0]
    return _lean_output(_lean_arrays(p, x, w, b, rm, rv, r, fmt), fmt, p[0], residual)


class _ViewCache:
    """Keeps _module_call's cache out of pickles and deep copies."""

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_cynorm_views", None)
        return state


# ---- the same maths in torch operations (differentiable twice) -------------------------

def _torch_activation(act, y):
    if act == "silu":
        return torch.nn.functional.silu(y)
    if act == "gelu":
        return torch.nn.functional.gelu(y)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if act == "relu":
        return torch.nn.functional.relu(y)
    return y


def _composite(p, x, w, b, mean, rstd):
    """y from x, w, b in torch operations, for a backward that must itself be
    differentiable (x is h for a residual call). mean and rstd (float64, NumPy or torch)
    are used only where the statistics are constants (batch norm in eval, instance norm
    with running stats)."""
    kind, groups, shape, flag, momentum, eps, act = p
    per_channel = kind in _PER_CHANNEL
    if kind == "group" or (kind == "instance" and flag):
        N, C = x.shape[0], x.shape[1]
        G = groups if kind == "group" else C
        xr = x.reshape(N, G, (C // G) * math.prod(x.shape[2:]))
        var, mu = torch.var_mean(xr, dim=-1, correction=0, keepdim=True)
        y = ((xr - mu) * torch.rsqrt(var + eps)).reshape(x.shape)
    elif kind == "batch" and flag:
        dims = [0] + list(range(2, x.dim()))
        var, mu = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + eps)
    elif per_channel:  # constant statistics
        view = (1, -1) + (1,) * (x.dim() - 2)
        mu = torch.as_tensor(mean).to(x.dtype).view(view)
        r = torch.as_tensor(rstd).to(x.dtype).view(view)
        y = (x - mu) * r
    else:
        dims = list(range(x.dim() - len(shape), x.dim()))
        if kind == "layer":
            var, mu = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
            y = (x - mu) * torch.rsqrt(var + eps)
        else:
            e = torch.finfo(x.dtype).eps if eps is None else eps
            y = x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + e)
    if per_channel:
        view = (1, -1) + (1,) * (x.dim() - 2)
        if w is not None:
            y = y * w.view(view)
        if b is not None:
            y = y + b.view(view)
    else:
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
    return _torch_activation(act, y)


def _composite_grads(p, dy, x, w, b, mean, rstd, need):
    """Gradients for (x, w, b) as a differentiable graph of torch operations."""
    inputs = [t for t, n in zip((x, w, b), need) if n and t is not None]
    with torch.enable_grad():
        y = _composite(p, x, w, b, mean, rstd)
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if n and t is not None else None
                 for t, n in zip((x, w, b), need))


# ---- the autograd Function -------------------------------------------------------------

def _grad(a, like, needed, fmt=None, kind=None):
    """A NumPy gradient as a tensor of `like`'s dtype, or None when not needed; fmt and
    kind: dx of a channels-last call (see _output)."""
    if not needed or like is None or a is None:
        return None
    g = _from_numpy(a) if fmt is None else _output(a, fmt, kind)
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _grad_output(dy, kind, fmt):
    """(ndarray, format) of the gradient of a forward whose x had _input's format fmt:
    dy in x's layout (made so when it is not: a channels-last forward takes a
    channels_last dy without a copy)."""
    if _is_last(kind, fmt):
        return _input(dy, "grad_output", kind, fmt)
    return _input(dy, "grad_output")[0], None


def _forward_general(ctx, p, module, input, weight, bias, running_mean, running_var,
                     residual):
    """_ModuleFunction's forward for every call _torch_glue.function_forward leaves to
    it (functions, residuals, 16-bit or channels-last data, a module's first call)."""
    x = _glue.array_of(input)
    fmt = None
    if x is None:
        x, fmt = _input(input, "input", p[0])
    if module is None:
        w, b = _param(weight, "weight"), _param(bias, "bias")
        rm = _running(running_mean, "running_mean")
        rv = _running(running_var, "running_var")
    else:
        w, b, rm, rv = _module_views(module, weight, bias, running_mean, running_var)
    r = None if residual is None else _input(residual, "residual")[0]
    res = _checked_forward(p, x, w, b, rm, rv, r, True, fmt)
    y, h, mean, rstd = (_kernel_forward(p, x, w, b, rm, rv, r, fmt) if res is None
                        else res)
    out = _output(y, fmt, p[0])
    if h is None:
        # the tensors themselves are saved (torch then detects an in-place change
        # before the backward, and a double backward differentiates through them); x
        # and w are the kernel's views of the same memory. Everything else the
        # backward needs goes in one attribute.
        ctx.save_for_backward(input, weight, bias)
        ctx.state = (p, res is not None, mean, rstd, x, w, b, False, fmt)
        return out
    # a residual call: the backward needs h (an output, saved as such), not input
    # or residual
    ht = _from_numpy(h)
    ctx.save_for_backward(ht, weight, bias)
    ctx.state = (p, res is not None, mean, rstd, h, w, b, True, fmt)
    # a double backward rebuilds h = input + residual in torch operations (autograd
    # cannot differentiate through the saved h, an output of this very node); the
    # versions tell whether they were changed in place since
    ctx.inputs = (input, residual, input._version, residual._version)
    return out, ht


def _backward_general(ctx, dy, dh=None):
    """_ModuleFunction's backward for every call _torch_glue.function_backward leaves
    to it (a backward autograd must differentiate, create_graph=True, included).
    Returns one gradient per forward argument, the last (function_forward's prep)
    always None."""
    n = ctx.needs_input_grad
    state = ctx.state
    if state[1] == 2:  # function_forward's state: the tensors kept (and checked) there
        x_t, weight, bias = state[9:12]
    else:
        x_t, weight, bias = ctx.saved_tensors
    p, checked, mean, rstd, x, w, b, residual, fmt = state[:9]
    need = (n[2] or (residual and n[7]), n[3], n[4])
    if _grad_enabled():  # create_graph=True: a backward autograd can differentiate
        if residual:
            x_t = _residual_sum(*ctx.inputs)
        dx, dw, db = _composite_grads(p, dy, x_t, weight, bias, mean, rstd, need)
    else:
        dyn = _glue.array_of(dy) if checked else None
        if dyn is not None and (dyn.dtype is not x.dtype or dyn.shape != x.shape):
            dyn = None
        if dyn is None:
            dyn, fmt = _grad_output(dy, p[0], fmt)
        grads = _checked_backward(p, dyn, x, w, b, mean, rstd) if checked else None
        if grads is not None:  # every gradient has its tensor's dtype already
            dx, dw, db = grads
            dx = _from_numpy(dx) if need[0] else None
            dw = _from_numpy(dw) if need[1] and weight is not None else None
            db = _from_numpy(db) if need[2] and db is not None else None
        else:
            dx, dw, db = _kernel_backward(p, dyn, x, w, b, mean, rstd, fmt)
            dx = _grad(dx, x_t, need[0], fmt, p[0])
            dw = _grad(dw, weight, need[1])
            db = _grad(db, bias, need[2])
    if not residual:
        return None, None, dx, dw, db, None, None, None, None
    # the gradient of h (through y, plus what reached h directly) is that of input
    # and of residual alike
    if dx is not None and dh is not None:
        dx = dx + dh
    gr = (dx.clone() if n[2] else dx) if n[7] else None
    return None, None, dx if n[2] else None, dw, db, None, None, gr, None


class _ModuleFunction(torch.autograd.Function):
    """The autograd route of every function and module: apply(p, module, input, weight,
    bias, running_mean, running_var, residual); module: the module whose cached NumPy
    views to use, or None. Returns y, or (y, h) with a residual.

    forward and backward are compiled (_torch_glue.function_forward / _backward): a
    module's common training call runs there, with no Python frame of its own (on a
    tiny call, each Python-level call costs more inside a training step than it does
    timed alone); they hand everything else to _forward_general / _backward_general."""

    forward = staticmethod(_glue.function_forward)
    backward = staticmethod(_glue.function_backward)


def _residual_sum(input, residual, input_version, residual_version):
    """h = input + residual as a graph of torch operations, for a double backward."""
    if input._version != input_version or residual._version != residual_version:
        raise RuntimeError("cynorm.torch: input or residual of a residual norm was "
                           "modified in place after the forward; its double backward "
                           "(create_graph=True) needs their values")
    with torch.enable_grad():
        return input + residual


_glue.set_function(_ModuleFunction, _forward_general, _backward_general)
# _ModuleFunction.apply(p, module, input, weight, bias, running_mean, running_var,
# residual), without the Python wrapper of Function.apply (see _torch_glue.record)
_record = _glue.record


def _apply(p, input, weight, bias, running_mean, running_var, residual=None):
    return _record(p, None, input, weight, bias, running_mean, running_var, residual)


class GroupNormFunction(_ModuleFunction):
    """apply(input, num_groups, weight, bias, eps, activation=None): the autograd route
    of group_norm."""

    @classmethod
    def apply(cls, input, num_groups, weight, bias, eps, activation=None):
        p = ("group", num_groups, None, True, 0.0, eps, _activation(activation))
        return super().apply(p, None, input, weight, bias, None, None, None)


class InstanceNormFunction(_ModuleFunction):
    """apply(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
    eps, activation=None), as torch.nn.functional.instance_norm.

    With input statistics, given running buffers are updated in place with the mean over
    the batch of each instance's mean and unbiased variance (what torch does). Without
    (eval with tracked statistics), every instance is normalised with the running
    statistics, which is batch_norm in eval mode."""

    @classmethod
    def apply(cls, input, running_mean, running_var, weight, bias, use_input_stats,
              momentum, eps, activation=None):
        p = ("instance", 0, None, bool(use_input_stats), momentum, eps,
             _activation(activation))
        return super().apply(p, None, input, weight, bias, running_mean, running_var,
                             None)


class BatchNormFunction(_ModuleFunction):
    """apply(input, running_mean, running_var, weight, bias, training, momentum, eps,
    activation=None), as torch.nn.functional.batch_norm (running buffers updated in place
    when training)."""

    @classmethod
    def apply(cls, input, running_mean, running_var, weight, bias, training, momentum, eps,
              activation=None):
        p = ("batch", 0, None, bool(training), momentum, eps, _activation(activation))
        return super().apply(p, None, input, weight, bias, running_mean, running_var,
                             None)


class LayerNormFunction(_ModuleFunction):
    """apply(input, normalized_shape, weight, bias, eps, residual=None): y, or (y, h)
    with a residual."""

    @classmethod
    def apply(cls, input, normalized_shape, weight, bias, eps, residual=None):
        p = ("layer", 0, _shape(normalized_shape), True, 0.0, eps, None)
        return super().apply(p, None, input, weight, bias, None, None, residual)


class RMSNormFunction(_ModuleFunction):
    """apply(input, normalized_shape, weight, eps, residual=None); eps=None: machine
    epsilon of the input's dtype, as torch.nn.functional.rms_norm."""

    @classmethod
    def apply(cls, input, normalized_shape, weight, eps, residual=None):
        p = ("rms", 0, _shape(normalized_shape), True, 0.0, eps, None)
        return super().apply(p, None, input, weight, None, None, None, residual)


# ---- custom operators for torch.compile ------------------------------------------------
# Eager calls do not use them: through a torch.library custom operator a (1, 32, 8, 8)
# GroupNorm costs about 35 us per inference call and 240 us per training step, against
# 8 and 54 us through the routes above (one thread, minimum of 1000 samples; the
# dispatcher's Python kernel and autograd formula cost far more than a Function). Under torch.compile
# they make each norm one opaque node of the graph (no graph break), with a fake
# implementation for shape propagation and an autograd formula.

def _stats_shape(kind, shape, num_groups, normalized_shape, flag):
    if kind == "group":
        return (shape[0], num_groups)
    if kind == "instance" and flag:
        return (shape[0], shape[1])
    if kind in ("batch", "instance"):
        return (shape[1],)
    return tuple(shape[:len(shape) - len(normalized_shape)])


def _param_shape(kind, shape, normalized_shape):
    return tuple(normalized_shape) if kind in ("layer", "rms") else (shape[1],)


@torch.library.custom_op("cynorm::norm_forward", mutates_args=())
def _op_forward(kind: str, input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                num_groups: int, normalized_shape: List[int], flag: bool, momentum: float,
                eps: Optional[float], activation: Optional[str]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd); h is empty without a residual, mean for rms."""
    p = (kind, num_groups, tuple(normalized_shape), flag, momentum, eps, activation)
    x, fmt = _input(input, "input", kind)
    y, h, mean, rstd = _kernel_forward(
        p, x, _param(weight, "weight"), _param(bias, "bias"),
        _running(running_mean, "running_mean"), _running(running_var, "running_var"),
        None if residual is None else _input(residual, "residual")[0], fmt)
    if mean is None:
        mean = np.empty(0)
    if h is None:
        h = np.empty(0, dtype=y.dtype)
    y = _output(y, fmt if _is_last(kind, fmt) else None, kind)
    return y, _from_numpy(h), _from_numpy(mean), _from_numpy(rstd)


def _fake_like(kind, input):
    """The fake output of x's shape with the layout the real operator gives it."""
    fmt = _format(input) if kind in _PER_CHANNEL else None
    if fmt is None:
        return input.new_empty(input.shape)
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=fmt)


@_op_forward.register_fake
def _op_forward_fake(kind, input, weight, bias, running_mean, running_var, residual,
                     num_groups, normalized_shape, flag, momentum, eps, activation):
    stats = _stats_shape(kind, input.shape, num_groups, normalized_shape, flag)
    return (_fake_like(kind, input),
            input.new_empty((0,) if residual is None else input.shape),
            input.new_empty((0,) if kind == "rms" else stats, dtype=_F64),
            input.new_empty(stats, dtype=_F64))


@torch.library.custom_op("cynorm::norm_backward", mutates_args=())
def _op_backward(kind: str, grad_output: torch.Tensor, input: torch.Tensor,
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                 normalized_shape: List[int], flag: bool, eps: Optional[float],
                 activation: Optional[str]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = (kind, num_groups, tuple(normalized_shape), flag, 0.0, eps, activation)
    x, fmt = _input(input, "input", kind)
    dy, fmt = _grad_output(grad_output, kind, fmt)
    dx, dw, db = _kernel_backward(p, dy, x, _param(weight, "weight"),
                                  _param(bias, "bias"), mean.numpy(), rstd.numpy(), fmt)
    pdt = input.dtype if weight is None else weight.dtype
    dw = _from_numpy(dw).to(pdt)
    db = input.new_empty(0, dtype=pdt) if db is None else _from_numpy(db).to(pdt)
    return _output(dx, fmt, kind), dw, db


@_op_backward.register_fake
def _op_backward_fake(kind, grad_output, input, weight, bias, mean, rstd, num_groups,
                      normalized_shape, flag, eps, activation):
    pshape = _param_shape(kind, input.shape, normalized_shape)
    pdt = input.dtype if weight is None else weight.dtype
    return (_fake_like(kind, input), input.new_empty(pshape, dtype=pdt),
            input.new_empty((0,) if kind == "rms" else pshape, dtype=pdt))


def _op_setup_context(ctx, inputs, output):
    (kind, input, weight, bias, _, _, residual, num_groups, normalized_shape, flag,
     momentum, eps, activation) = inputs
    # the normalised tensor: h = input + residual (an output) or the input
    ctx.save_for_backward(input if residual is None else output[1], weight, bias,
                          output[2], output[3], input, residual)
    ctx.residual = residual is not None
    ctx.p = (kind, num_groups, tuple(normalized_shape), flag, momentum, eps, activation)


def _op_autograd(ctx, dy, dh, _dmean, _drstd):
    x, weight, bias, mean, rstd, input, residual = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = (n[1] or n[6], n[2], n[3])
    p = ctx.p
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (dy, x, weight, bias)):
        if ctx.residual:  # h rebuilt in torch operations (see _ModuleFunction.forward)
            with torch.enable_grad():
                x = input + residual
        dx, dw, db = _composite_grads(p, dy, x, weight, bias, mean, rstd, need)
    else:
        dx, dw, db = torch.ops.cynorm.norm_backward(p[0], dy, x, weight, bias, mean, rstd,
                                                    p[1], list(p[2]), p[3], p[5], p[6])
        dx = dx if need[0] else None
        dw = dw.to(weight.dtype) if need[1] else None
        db = db.to(bias.dtype) if need[2] else None
    gr = None
    if ctx.residual:
        if dx is not None and dh is not None:
            dx = dx + dh
        gr = (dx.clone() if n[1] else dx) if n[6] else None
        dx = dx if n[1] else None
    return None, dx, dw, db, None, None, gr, None, None, None, None, None, None


_op_forward.register_autograd(_op_autograd, setup_context=_op_setup_context)


def _compiled(p, input, weight, bias, running_mean, running_var, residual=None):
    kind, groups, shape, flag, momentum, eps, act = p
    fmt = _format(input) if kind in _KEEPS_FORMAT else None
    # an operator with an autograd formula must not mutate its inputs: the running
    # statistics are updated next to it, in torch operations the compiler traces
    update = flag and kind in ("batch", "instance") and (running_mean is not None
                                                         or running_var is not None)
    y, h, mean, rstd = torch.ops.cynorm.norm_forward(
        kind, input, weight, bias, None if update else running_mean,
        None if update else running_var, residual, int(groups), list(shape or ()),
        bool(flag), float(momentum), eps, act)
    if update:
        _update_running(kind, input.shape, mean.detach(), rstd.detach(), running_mean,
                        running_var, float(momentum), eps)
    y = y if fmt is None else y.contiguous(memory_format=fmt)
    return y if residual is None else (y, h)


def _update_running(kind, shape, mean, rstd, running_mean, running_var, momentum, eps):
    """torch's running-statistics update from the float64 statistics of a training
    forward: r = (1 - momentum) * r + momentum * stat, unbiased variance; for instance
    norm the batch's mean of the per-instance statistics."""
    n = math.prod(shape[2:]) * (shape[0] if kind == "batch" else 1)
    if n <= 1 or shape[0] == 0:
        return
    with torch.no_grad():
        var = (1.0 / (rstd * rstd) - eps).clamp(min=0.0) * (n / (n - 1))
        if kind == "instance":
            mean, var = mean.mean(dim=0), var.mean(dim=0)
        for r, stat in ((running_mean, mean), (running_var, var)):
            if r is not None:
                r.copy_((1.0 - momentum) * r.to(_F64) + momentum * stat)


# ---- functional API, with torch.nn.functional's signatures -----------------------------

def _call(p, input, weight, bias, running_mean, running_var, residual=None):
    if _is_compiling():
        return _compiled(p, input, weight, bias, running_mean, running_var, residual)
    if _needs_grad(input, weight, bias, residual):
        return _apply(p, input, weight, bias, running_mean, running_var, residual)
    return _lean(p, input, weight, bias, running_mean, running_var, residual)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    """torch.nn.functional.group_norm on cynorm; activation: None, "silu", "gelu",
    "gelu_tanh" or "relu", applied in the same pass (F.silu(F.group_norm(...)) etc.)."""
    return _call(("group", num_groups, None, True, 0.0, eps, _activation(activation)),
                 input, weight, bias, None, None)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, activation=None):
    """torch.nn.functional.instance_norm on cynorm; activation as in group_norm."""
    p = ("instance", 0, None, bool(use_input_stats), momentum, eps, _activation(activation))
    return _call(p, input, weight, bias, running_mean, running_var)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None):
    """torch.nn.functional.batch_norm on cynorm; activation as in group_norm."""
    p = ("batch", 0, None, bool(training), momentum, eps, _activation(activation))
    return _call(p, input, weight, bias, running_mean, running_var)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *,
               residual=None):
    """torch.nn.functional.layer_norm on cynorm. residual (a tensor of input's shape and
    dtype): returns (y, h), h = input + residual and y its layer_norm, the add fused
    into the same pass; gradients of h reach both input and residual."""
    p = ("layer", 0, _shape(normalized_shape), True, 0.0, eps, None)
    return _call(p, input, weight, bias, None, None, residual)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, residual=None):
    """torch.nn.functional.rms_norm on cynorm; residual as in layer_norm."""
    p = ("rms", 0, _shape(normalized_shape), True, 0.0, eps, None)
    return _call(p, input, weight, None, None, None, residual)


# ---- modules: torch's own classes with a cynorm forward --------------------------------

class _Activated(_ViewCache):
    """The activation epilogue of the per-channel modules: `activation` (keyword-only in
    the constructor, an attribute that convert() and users may set), shown in repr."""

    activation = None  # modules unpickled from before the option existed

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _activation(activation)

    def extra_repr(self):
        base = super().extra_repr()
        a = self.activation
        return base if a is None else f"{base}, activation={a!r}"


class GroupNorm(_Activated, torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by cynorm; activation=None|"silu"|"gelu"|"gelu_tanh"|
    "relu" (keyword-only) is applied in the same pass."""

    def forward(self, input):
        if not _is_compiling():
            y = _glue.group_module(self, input)
            if y is not None:  # done (the common cases)
                return y
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (N, {self.num_channels}, *), got "
                             f"{tuple(input.shape)}")
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        p = ("group", self.num_groups, None, True, 0.0, self.eps,
             _activation(self.activation))
        if _is_compiling():
            return _compiled(p, input, weight, bias, None, None)
        return _module_call(self, p, input, weight, bias, None, None)


class _BatchNorm(_Activated):
    """forward of torch.nn.modules.batchnorm._BatchNorm, computed by cynorm; the flags
    torch lets users change after construction (track_running_stats, momentum=None for a
    cumulative average, weight/bias set to None) behave as in torch."""

    _cynorm_dims = ()  # the input dims _check_input_dim accepts (set by each subclass)

    def forward(self, input):
        if not _is_compiling():
            y = _glue.batch_module(self, input)
            if y is not None:  # done (the common calls, eval and training)
                return y
        self._check_input_dim(input)
        training = self.training
        factor = 0.0 if self.momentum is None else self.momentum
        if training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        params = self._parameters
        p = ("batch", 0, None, use_batch_stats, factor, self.eps,
             _activation(self.activation))
        if _is_compiling():
            return _compiled(p, input, params["weight"], params["bias"], running_mean,
                             running_var)
        return _module_call(self, p, input, params["weight"], params["bias"],
                            running_mean, running_var)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by cynorm (activation= as in GroupNorm)."""

    _cynorm_dims = (2, 3)  # what _check_input_dim accepts


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by cynorm (activation= as in GroupNorm)."""

    _cynorm_dims = (4,)


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by cynorm (activation= as in GroupNorm)."""

    _cynorm_dims = (5,)


class _InstanceNorm(_Activated):
    """forward of torch.nn.modules.instancenorm._InstanceNorm, computed by cynorm
    (unbatched input accepted, as torch does)."""

    def forward(self, input):
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features and self.affine:
            raise ValueError(f"expected input's size at dim={feature_dim} to match "
                             f"num_features ({self.num_features}), but got: "
                             f"{input.size(feature_dim)}.")
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        use_input_stats = self.training or not self.track_running_stats
        momentum = self.momentum if self.momentum is not None else 0.0
        running_mean = self._buffers["running_mean"]
        running_var = self._buffers["running_var"]
        p = ("instance", 0, None, use_input_stats, momentum, self.eps,
             _activation(self.activation))
        if _is_compiling():
            y = _compiled(p, input, weight, bias, running_mean, running_var)
        else:
            y = _module_call(self, p, input, weight, bias, running_mean, running_var)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by cynorm (activation= as in GroupNorm)."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by cynorm (activation= as in GroupNorm)."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by cynorm (activation= as in GroupNorm)."""


class LayerNorm(_ViewCache, torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by cynorm; module(x, residual=r) returns (y, h),
    h = x + r, y = LayerNorm(h), the add fused into the normalization's pass."""

    def forward(self, input, residual=None):
        if residual is None and not _is_compiling():
            y = _glue.row_module(self, input, "layer")
            if y is not None:  # done (the common cases)
                return y
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        ns = self.normalized_shape
        p = ("layer", 0, ns if type(ns) is tuple else _shape(ns), True, 0.0, self.eps, None)
        if _is_compiling():
            return _compiled(p, input, weight, bias, None, None, residual)
        return _module_call(self, p, input, weight, bias, None, None, residual)


class RMSNorm(_ViewCache, torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by cynorm; module(x, residual=r) returns (y, h) as in
    LayerNorm."""

    def forward(self, input, residual=None):
        if residual is None and not _is_compiling():
            y = _glue.row_module(self, input, "rms")
            if y is not None:  # done (the common cases)
                return y
        weight = self._parameters["weight"]
        ns = self.normalized_shape
        p = ("rms", 0, ns if type(ns) is tuple else _shape(ns), True, 0.0, self.eps, None)
        if _is_compiling():
            return _compiled(p, input, weight, None, None, None, residual)
        return _module_call(self, p, input, weight, None, None, None, residual)


# ---- convert -------------------------------------------------------------------------------

def _replacement(m):
    """cynorm's module for a torch.nn normalization module m (None for anything else,
    cynorm's own modules and torch's subclasses included)."""
    nn = torch.nn
    kind = type(m)
    if kind is nn.GroupNorm:
        return GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine)
    for ours, theirs in ((BatchNorm1d, nn.BatchNorm1d), (BatchNorm2d, nn.BatchNorm2d),
                         (BatchNorm3d, nn.BatchNorm3d), (InstanceNorm1d, nn.InstanceNorm1d),
                         (InstanceNorm2d, nn.InstanceNorm2d),
                         (InstanceNorm3d, nn.InstanceNorm3d)):
        if kind is theirs:
            return ours(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if kind is nn.LayerNorm:
        return LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine,
                         bias=m.bias is not None)
    if kind is nn.RMSNorm:
        return RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine)
    return None


def _carry_over(new, old):
    """new takes old's parameters and buffers (the same tensor objects, so that an
    optimizer holding them keeps working) and its train/eval mode."""
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    new.train(old.training)
    return new


def _activation_of(m):
    """The activation name of a module that can be fused into a norm, else None."""
    nn = torch.nn
    kind = type(m)
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return None


def convert(module):
    """Replace, in place, every torch.nn GroupNorm, InstanceNorm1d/2d/3d,
    BatchNorm1d/2d/3d, LayerNorm and RMSNorm in the tree by cynorm's module, carrying
    over parameters, buffers (the same tensor objects) and train/eval mode (like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm). Inside an nn.Sequential, a
    GroupNorm, InstanceNorm or BatchNorm directly followed by nn.SiLU, nn.GELU
    (approximate "none" or "tanh") or nn.ReLU takes the activation as its fused epilogue
    and the activation module becomes nn.Identity, so indices and state_dict keys stay
    valid. Returns the converted module (a new object when `module` itself is a
    normalization layer)."""
    new = _replacement(module)
    if new is not None:
        return _carry_over(new, module)
    for name, child in module.named_children():
        converted = convert(child)
        if converted is not child:
            setattr(module, name, converted)
    if isinstance(module, torch.nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            norm, act = module._modules[first], module._modules[second]
            name = _activation_of(act)
            if (name is not None and isinstance(norm, _Activated)
                    and norm.activation is None):
                norm.activation = name
                module._modules[second] = torch.nn.Identity()
    return module


from cynorm._torch_sync import SyncBatchNorm  # noqa: E402
