"""Optional PyTorch bridge: cynorm's kernels as torch functions, autograd Functions and
nn.Modules.

Importing this module imports torch (`import cynorm` alone never does). It offers

- functions with torch.nn.functional's signatures, differentiable through autograd:
  `group_norm`, `instance_norm`, `batch_norm`, `layer_norm`, `rms_norm`;
- drop-in modules, subclasses of the torch modules of the same name (same constructor
  arguments, parameters, buffers and state_dict keys) whose forward runs cynorm:
  `GroupNorm`, `InstanceNorm1d/2d/3d`, `BatchNorm1d/2d/3d`, `LayerNorm`, `RMSNorm`.

Tensors must live on the CPU and be float32 or float64. Three routes, one set of kernels:

- **Inference** (no input or parameter requires grad, or grad mode is off, or
  `torch.inference_mode()`): the kernel is called directly, without an autograd
  Function; arguments are checked once, contiguous tensors are handed over without a
  copy (`tensor.numpy()` shares memory) and the output is the kernel's array wrapped by
  `torch.from_numpy` (no copy). The output has no grad_fn.
- **Training**: a `torch.autograd.Function` (`GroupNormFunction`, ...) whose backward
  runs cynorm's backward kernels. Double backward (`create_graph=True`, e.g. a gradient
  penalty) is supported: when a graph of the backward is requested, the backward is
  computed with torch operations from the same formulas, which autograd can
  differentiate again.
- **torch.compile**: while compiling, the functions call the custom operators
  `torch.ops.cynorm.norm_forward` / `norm_backward` (registered with `torch.library`, with
  an autograd formula and a fake implementation), so the graph holds each norm as one
  opaque operator, without graph breaks.

A non-contiguous input is made contiguous first. The output's memory format follows
torch's: GroupNorm, BatchNorm and RMSNorm give a channels_last output for a
channels_last input, InstanceNorm and LayerNorm a contiguous one. Running statistics are
updated in place, as torch does.
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

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction",
    "GroupNorm", "GroupNormFunction",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "InstanceNormFunction",
    "LayerNorm", "LayerNormFunction",
    "RMSNorm", "RMSNormFunction",
    "batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm",
]

_F32, _F64 = torch.float32, torch.float64
_Tensor = torch.Tensor
# ops whose torch implementation keeps a channels_last input's layout in its output
_KEEPS_FORMAT = ("group", "batch", "rms")

# An op call is described by one tuple, p = (kind, num_groups, normalized_shape, flag,
# momentum, eps): kind is "group", "instance", "batch", "layer" or "rms"; flag is
# use_input_stats (instance) or training (batch).


# ---- argument checks (once per call) ---------------------------------------------------

def _input(t, name="input"):
    """(ndarray, memory format): t's values as a C-contiguous NumPy array sharing t's
    memory when t is contiguous, and t's channels_last format (or None)."""
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    dt = t.dtype
    if dt is not _F32 and dt is not _F64:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    fmt = None
    if not t.is_contiguous():
        fmt = _format(t)
        t = t.contiguous()
    if t.requires_grad:
        t = t.detach()
    try:
        return t.numpy(), fmt
    except RuntimeError:  # a negative view (torch._neg_view): its values, resolved
        return t.resolve_neg().numpy(), fmt


def _format(t):
    dim = t.dim()
    if dim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if dim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


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


def _needs_grad(input, weight, bias):
    """Whether autograd must record this call."""
    if not torch.is_grad_enabled():
        return False
    return (getattr(input, "requires_grad", False)
            or getattr(weight, "requires_grad", False)
            or getattr(bias, "requires_grad", False))


# ---- the kernels, on NumPy arrays ------------------------------------------------------

def _kernel_forward(p, x, w, b, rm, rv):
    """(y, mean, rstd) from cynorm's forward; mean is None for rms."""
    kind, groups, shape, flag, momentum, eps = p
    if kind == "group":
        return cynorm.group_norm(x, num_groups=groups, weight=w, bias=b, eps=eps,
                                 return_stats=True)
    if kind == "batch":
        return cynorm.batch_norm(x, running_mean=rm, running_var=rv, weight=w, bias=b,
                                 training=flag, momentum=momentum, eps=eps,
                                 return_stats=True)
    if kind == "layer":
        return cynorm.layer_norm(x, normalized_shape=shape, weight=w, bias=b, eps=eps,
                                 return_stats=True)
    if kind == "rms":
        y, rstd = cynorm.rms_norm(x, normalized_shape=shape, weight=w, eps=eps,
                                  return_stats=True)
        return y, None, rstd
    # instance: cynorm.instance_norm has torch's semantics, running statistics included
    if flag and x.ndim >= 2 and math.prod(x.shape[2:]) == 1:
        raise ValueError("Expected more than 1 spatial element when training, "
                         f"got input size {tuple(x.shape)}")
    return cynorm.instance_norm(x, running_mean=rm, running_var=rv, weight=w, bias=b,
                                use_input_stats=flag, momentum=momentum, eps=eps,
                                return_stats=True)


def _kernel_backward(p, dy, x, w, mean, rstd):
    """(dx, dweight, dbias) from cynorm's backward; dbias is None for rms."""
    kind, groups, shape, flag, momentum, eps = p
    if kind == "group":
        return cynorm.group_norm_backward(dy, x, mean, rstd, num_groups=groups, weight=w)
    if kind == "layer":
        return cynorm.layer_norm_backward(dy, x, mean, rstd, normalized_shape=shape,
                                          weight=w)
    if kind == "rms":
        dx, dw = cynorm.rms_norm_backward(dy, x, rstd, normalized_shape=shape, weight=w)
        return dx, dw, None
    if kind == "instance":
        return cynorm.instance_norm_backward(dy, x, mean, rstd, weight=w,
                                             use_input_stats=flag)
    return cynorm.batch_norm_backward(dy, x, mean, rstd, weight=w, training=flag)


def _output(y, fmt, kind):
    t = torch.from_numpy(y)
    if fmt is not None and kind in _KEEPS_FORMAT:
        return t.contiguous(memory_format=fmt)
    return t


def _lean(p, input, weight, bias, running_mean, running_var):
    """The inference route: no autograd record; the kernel's output array becomes the
    output tensor (torch.from_numpy: about 0.6 us, where a torch.empty whose NumPy view the
    kernel fills through out= costs about 2.5 us, measured on a (1, 32, 8, 8) call)."""
    x, fmt = _input(input)
    y = _kernel_forward(p, x, _param(weight, "weight"), _param(bias, "bias"),
                        _running(running_mean, "running_mean"),
                        _running(running_var, "running_var"))[0]
    return _output(y, fmt, p[0])


def _module_view(views, name, t):
    """A module tensor's NumPy view, kept between calls in the module's `views` dict.
    Reused only while the module holds the same tensor object on the same memory with
    the same shape and dtype (`.data =`, `.to()`, `load_state_dict` and in-place updates
    are all seen); a non-contiguous tensor is not kept (its view is a copy)."""
    if t is None:
        return None
    c = views.get(name)
    if (c is not None and c[0] is t and c[1] == t.data_ptr() and c[2] == t.shape
            and c[3] is t.dtype):
        return c[4]
    a = _running(t, name) if name[0] == "r" else _param(t, name)
    ptr = t.data_ptr()
    if a.__array_interface__["data"][0] == ptr:
        views[name] = (t, ptr, t.shape, t.dtype, a)
    return a


def _module_call(module, p, input, weight, bias, running_mean, running_var):
    """A module's eager call: the inference route, or _ModuleFunction when autograd must
    record it. The parameters' and buffers' NumPy views come from a cache kept on the
    module (a Parameter's detach().numpy() costs about 1.5 us, the cache's checks
    0.3 us)."""
    try:
        views = module._cynorm_views
    except AttributeError:
        views = module.__dict__["_cynorm_views"] = {}
    if _needs_grad(input, weight, bias):
        return _ModuleFunction.apply(p, views, input, weight, bias, running_mean,
                                     running_var)
    x, fmt = _input(input)
    y = _kernel_forward(p, x, _module_view(views, "weight", weight),
                        _module_view(views, "bias", bias),
                        _module_view(views, "running_mean", running_mean),
                        _module_view(views, "running_var", running_var))[0]
    return _output(y, fmt, p[0])


class _ViewCache:
    """Keeps _module_call's cache out of pickles and deep copies."""

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_cynorm_views", None)
        return state


# ---- the same maths in torch operations (differentiable twice) -------------------------

def _composite(p, x, w, b, mean, rstd):
    """y from x, w, b in torch operations, for a backward that must itself be
    differentiable. mean and rstd (float64, NumPy or torch) are used only where the
    statistics are constants (batch norm in eval, instance norm with running stats)."""
    kind, groups, shape, flag, momentum, eps = p
    per_channel = kind in ("group", "instance", "batch")
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
    return y


def _composite_grads(p, dy, x, w, b, mean, rstd, need):
    """Gradients for (x, w, b) as a differentiable graph of torch operations."""
    inputs = [t for t, n in zip((x, w, b), need) if n and t is not None]
    with torch.enable_grad():
        y = _composite(p, x, w, b, mean, rstd)
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if n and t is not None else None
                 for t, n in zip((x, w, b), need))


# ---- autograd Functions ----------------------------------------------------------------

def _grad(a, like, needed):
    """A NumPy gradient as a tensor of `like`'s dtype, or None when not needed."""
    if not needed or like is None or a is None:
        return None
    g = torch.from_numpy(a)
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _function_forward(ctx, p, input, weight, bias, running_mean, running_var, views=None):
    """The autograd route's forward; views: a module's cache of NumPy views, or None."""
    x, fmt = _input(input)
    if views is None:
        w, b = _param(weight, "weight"), _param(bias, "bias")
        rm = _running(running_mean, "running_mean")
        rv = _running(running_var, "running_var")
    else:
        w, b = _module_view(views, "weight", weight), _module_view(views, "bias", bias)
        rm = _module_view(views, "running_mean", running_mean)
        rv = _module_view(views, "running_var", running_var)
    y, mean, rstd = _kernel_forward(p, x, w, b, rm, rv)
    # the tensors themselves are saved (torch then detects an in-place change before the
    # backward, and a double backward differentiates through them); x and w are the
    # kernel's views of the same memory
    ctx.save_for_backward(input, weight, bias)
    ctx.x, ctx.w = x, w
    ctx.stats = (mean, rstd)
    ctx.p = p
    return _output(y, fmt, p[0])


def _function_backward(ctx, dy, need):
    """Gradients of (input, weight, bias); need: which of them are wanted."""
    input, weight, bias = ctx.saved_tensors
    mean, rstd = ctx.stats
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        return _composite_grads(ctx.p, dy, input, weight, bias, mean, rstd, need)
    dx, dw, db = _kernel_backward(ctx.p, _input(dy, "grad_output")[0], ctx.x, ctx.w,
                                  mean, rstd)
    return _grad(dx, input, need[0]), _grad(dw, weight, need[1]), _grad(db, weight, need[2])


class _ModuleFunction(torch.autograd.Function):
    """The modules' autograd route: apply(p, views, input, weight, bias, running_mean,
    running_var), the parameters' NumPy views taken from the module's cache."""

    @staticmethod
    def forward(ctx, p, views, input, weight, bias, running_mean, running_var):
        return _function_forward(ctx, p, input, weight, bias, running_mean, running_var,
                                 views)

    @staticmethod
    def backward(ctx, dy):
        n = ctx.needs_input_grad
        dx, dw, db = _function_backward(ctx, dy, (n[2], n[3], n[4]))
        return None, None, dx, dw, db, None, None


class GroupNormFunction(torch.autograd.Function):
    """apply(input, num_groups, weight, bias, eps)"""

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps):
        return _function_forward(ctx, ("group", num_groups, None, True, 0.0, eps),
                                 input, weight, bias, None, None)

    @staticmethod
    def backward(ctx, dy):
        n = ctx.needs_input_grad
        dx, dw, db = _function_backward(ctx, dy, (n[0], n[2], n[3]))
        return dx, None, dw, db, None


class InstanceNormFunction(torch.autograd.Function):
    """apply(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
    eps), as torch.nn.functional.instance_norm.

    With input statistics, given running buffers are updated in place with the mean over
    the batch of each instance's mean and unbiased variance (what torch does). Without
    (eval with tracked statistics), every instance is normalised with the running
    statistics, which is batch_norm in eval mode."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, use_input_stats,
                momentum, eps):
        p = ("instance", 0, None, bool(use_input_stats), momentum, eps)
        return _function_forward(ctx, p, input, weight, bias, running_mean, running_var)

    @staticmethod
    def backward(ctx, dy):
        n = ctx.needs_input_grad
        dx, dw, db = _function_backward(ctx, dy, (n[0], n[3], n[4]))
        return dx, None, None, dw, db, None, None, None


class BatchNormFunction(torch.autograd.Function):
    """apply(input, running_mean, running_var, weight, bias, training, momentum, eps), as
    torch.nn.functional.batch_norm (running buffers updated in place when training)."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, training, momentum,
                eps):
        p = ("batch", 0, None, bool(training), momentum, eps)
        return _function_forward(ctx, p, input, weight, bias, running_mean, running_var)

    @staticmethod
    def backward(ctx, dy):
        n = ctx.needs_input_grad
        dx, dw, db = _function_backward(ctx, dy, (n[0], n[3], n[4]))
        return dx, None, None, dw, db, None, None, None


class LayerNormFunction(torch.autograd.Function):
    """apply(input, normalized_shape, weight, bias, eps)"""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, bias, eps):
        p = ("layer", 0, _shape(normalized_shape), True, 0.0, eps)
        return _function_forward(ctx, p, input, weight, bias, None, None)

    @staticmethod
    def backward(ctx, dy):
        n = ctx.needs_input_grad
        dx, dw, db = _function_backward(ctx, dy, (n[0], n[2], n[3]))
        return dx, None, dw, db, None


class RMSNormFunction(torch.autograd.Function):
    """apply(input, normalized_shape, weight, eps); eps=None: machine epsilon of the
    input's dtype, as torch.nn.functional.rms_norm."""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, eps):
        p = ("rms", 0, _shape(normalized_shape), True, 0.0, eps)
        return _function_forward(ctx, p, input, weight, None, None, None)

    @staticmethod
    def backward(ctx, dy):
        n = ctx.needs_input_grad
        dx, dw, _ = _function_backward(ctx, dy, (n[0], n[2], False))
        return dx, None, dw, None


# ---- custom operators for torch.compile ------------------------------------------------
# Eager calls do not use them: a torch.library custom operator costs about 10 us more per
# call than the route above (measured on a (1, 32, 8, 8) GroupNorm). Under torch.compile
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
                running_var: Optional[torch.Tensor], num_groups: int,
                normalized_shape: List[int], flag: bool, momentum: float,
                eps: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = (kind, num_groups, tuple(normalized_shape), flag, momentum, eps)
    x = _input(input)[0]
    y, mean, rstd = _kernel_forward(p, x, _param(weight, "weight"), _param(bias, "bias"),
                                    _running(running_mean, "running_mean"),
                                    _running(running_var, "running_var"))
    if mean is None:
        mean = np.empty(0)
    return torch.from_numpy(y), torch.from_numpy(mean), torch.from_numpy(rstd)


@_op_forward.register_fake
def _op_forward_fake(kind, input, weight, bias, running_mean, running_var, num_groups,
                     normalized_shape, flag, momentum, eps):
    stats = _stats_shape(kind, input.shape, num_groups, normalized_shape, flag)
    return (input.new_empty(input.shape),
            input.new_empty((0,) if kind == "rms" else stats, dtype=_F64),
            input.new_empty(stats, dtype=_F64))


@torch.library.custom_op("cynorm::norm_backward", mutates_args=())
def _op_backward(kind: str, grad_output: torch.Tensor, input: torch.Tensor,
                 weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                 num_groups: int, normalized_shape: List[int], flag: bool,
                 eps: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = (kind, num_groups, tuple(normalized_shape), flag, 0.0, eps)
    dx, dw, db = _kernel_backward(p, _input(grad_output, "grad_output")[0],
                                  _input(input)[0], _param(weight, "weight"),
                                  mean.numpy(), rstd.numpy())
    if db is None:
        db = np.empty(0, dtype=dx.dtype)
    return torch.from_numpy(dx), torch.from_numpy(dw), torch.from_numpy(db)


@_op_backward.register_fake
def _op_backward_fake(kind, grad_output, input, weight, mean, rstd, num_groups,
                      normalized_shape, flag, eps):
    pshape = _param_shape(kind, input.shape, normalized_shape)
    return (input.new_empty(input.shape), input.new_empty(pshape),
            input.new_empty((0,) if kind == "rms" else pshape))


def _op_setup_context(ctx, inputs, output):
    (kind, input, weight, bias, _, _, num_groups, normalized_shape, flag, momentum,
     eps) = inputs
    ctx.save_for_backward(input, weight, bias, output[1], output[2])
    ctx.p = (kind, num_groups, tuple(normalized_shape), flag, momentum, eps)


def _op_autograd(ctx, dy, _dmean, _drstd):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = (n[1], n[2], n[3])
    p = ctx.p
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (dy, input, weight, bias)):
        dx, dw, db = _composite_grads(p, dy, input, weight, bias, mean, rstd, need)
    else:
        dx, dw, db = torch.ops.cynorm.norm_backward(p[0], dy, input, weight, mean, rstd,
                                                    p[1], list(p[2]), p[3], p[5])
        dx = dx if need[0] else None
        dw = dw.to(weight.dtype) if need[1] else None
        db = db.to(bias.dtype) if need[2] else None
    return None, dx, dw, db, None, None, None, None, None, None, None


_op_forward.register_autograd(_op_autograd, setup_context=_op_setup_context)


def _compiled(p, input, weight, bias, running_mean, running_var):
    kind, groups, shape, flag, momentum, eps = p
    fmt = _format(input) if kind in _KEEPS_FORMAT else None
    # an operator with an autograd formula must not mutate its inputs: the running
    # statistics are updated next to it, in torch operations the compiler traces
    update = flag and kind in ("batch", "instance") and (running_mean is not None
                                                         or running_var is not None)
    y, mean, rstd = torch.ops.cynorm.norm_forward(
        kind, input, weight, bias, None if update else running_mean,
        None if update else running_var, int(groups), list(shape or ()), bool(flag),
        float(momentum), eps)
    if update:
        _update_running(kind, input.shape, mean.detach(), rstd.detach(), running_mean,
                        running_var, float(momentum), eps)
    return y if fmt is None else y.contiguous(memory_format=fmt)


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

def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    if torch.compiler.is_compiling():
        return _compiled(("group", num_groups, None, True, 0.0, eps),
                         input, weight, bias, None, None)
    if _needs_grad(input, weight, bias):
        return GroupNormFunction.apply(input, num_groups, weight, bias, eps)
    return _lean(("group", num_groups, None, True, 0.0, eps), input, weight, bias,
                 None, None)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    p = ("instance", 0, None, bool(use_input_stats), momentum, eps)
    if torch.compiler.is_compiling():
        return _compiled(p, input, weight, bias, running_mean, running_var)
    if _needs_grad(input, weight, bias):
        return InstanceNormFunction.apply(input, running_mean, running_var, weight, bias,
                                          use_input_stats, momentum, eps)
    return _lean(p, input, weight, bias, running_mean, running_var)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    p = ("batch", 0, None, bool(training), momentum, eps)
    if torch.compiler.is_compiling():
        return _compiled(p, input, weight, bias, running_mean, running_var)
    if _needs_grad(input, weight, bias):
        return BatchNormFunction.apply(input, running_mean, running_var, weight, bias,
                                       training, momentum, eps)
    return _lean(p, input, weight, bias, running_mean, running_var)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    p = ("layer", 0, _shape(normalized_shape), True, 0.0, eps)
    if torch.compiler.is_compiling():
        return _compiled(p, input, weight, bias, None, None)
    if _needs_grad(input, weight, bias):
        return LayerNormFunction.apply(input, p[2], weight, bias, eps)
    return _lean(p, input, weight, bias, None, None)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    p = ("rms", 0, _shape(normalized_shape), True, 0.0, eps)
    if torch.compiler.is_compiling():
        return _compiled(p, input, weight, None, None, None)
    if _needs_grad(input, weight, None):
        return RMSNormFunction.apply(input, p[2], weight, eps)
    return _lean(p, input, weight, None, None, None)


# ---- modules: torch's own classes with a cynorm forward --------------------------------

class GroupNorm(_ViewCache, torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by cynorm."""

    def forward(self, input):
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (N, {self.num_channels}, *), got "
                             f"{tuple(input.shape)}")
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        if torch.compiler.is_compiling():
            return group_norm(input, self.num_groups, weight, bias, self.eps)
        return _module_call(self, ("group", self.num_groups, None, True, 0.0, self.eps),
                            input, weight, bias, None, None)


class _BatchNorm(_ViewCache):
    """forward of torch.nn.modules.batchnorm._BatchNorm, computed by cynorm; the flags
    torch lets users change after construction (track_running_stats, momentum=None for a
    cumulative average, weight/bias set to None) behave as in torch."""

    def forward(self, input):
        self._check_input_dim(input)
        training = self.training
        factor = 0.0 if self.momentum is None else self.momentum
        if training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        running_mean = self._buffers["running_mean"]
        running_var = self._buffers["running_var"]
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        if torch.compiler.is_compiling():
            return batch_norm(input, running_mean, running_var, weight, bias,
                              use_batch_stats, factor, self.eps)
        return _module_call(self, ("batch", 0, None, use_batch_stats, factor, self.eps),
                            input, weight, bias, running_mean, running_var)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by cynorm."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by cynorm."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by cynorm."""


class _InstanceNorm(_ViewCache):
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
        if torch.compiler.is_compiling():
            y = instance_norm(input, running_mean, running_var, weight, bias,
                              use_input_stats, momentum, self.eps)
        else:
            p = ("instance", 0, None, use_input_stats, momentum, self.eps)
            y = _module_call(self, p, input, weight, bias, running_mean, running_var)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by cynorm."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by cynorm."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by cynorm."""


class LayerNorm(_ViewCache, torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by cynorm."""

    def forward(self, input):
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        if torch.compiler.is_compiling():
            return layer_norm(input, self.normalized_shape, weight, bias, self.eps)
        return _module_call(self, ("layer", 0, _shape(self.normalized_shape), True, 0.0,
                                   self.eps), input, weight, bias, None, None)


class RMSNorm(_ViewCache, torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by cynorm."""

    def forward(self, input):
        weight = self._parameters["weight"]
        if torch.compiler.is_compiling():
            return rms_norm(input, self.normalized_shape, weight, self.eps)
        return _module_call(self, ("rms", 0, _shape(self.normalized_shape), True, 0.0,
                                   self.eps), input, weight, None, None, None)
