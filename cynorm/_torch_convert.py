"""Fused blocks for PyTorch: normalization + activation and residual add + normalization
as autograd Functions and modules, and `convert(module)`, which swaps a model's torch
normalization layers for cynorm's and fuses a norm directly followed by an activation.

Imports torch. cynorm.torch re-exports the public names (`convert`, the modules with
their `activation=` option and the `residual=` argument of LayerNorm/RMSNorm, and the
functional forms); this module only depends on torch and cynorm's NumPy API.

Tensors must live on the CPU and be float32 or float64, as in cynorm.torch. The
backwards are once-differentiable.
"""
import math
import numbers

import torch
from torch.autograd.function import once_differentiable

import cynorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm",
    "FusedBatchNormFunction", "FusedGroupNormFunction", "FusedInstanceNormFunction",
    "ResidualLayerNormFunction", "ResidualRMSNormFunction",
    "batch_norm", "convert", "group_norm", "instance_norm", "layer_norm", "rms_norm",
]

_FLOATS = (torch.float32, torch.float64)
_ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh", "relu")


def _activation(v):
    if not (v is None or isinstance(v, str)) or v not in _ACTIVATIONS:
        raise ValueError("activation must be None, 'silu', 'gelu', 'gelu_tanh' or 'relu', "
                         f"got {v!r}")
    return v


def _array(t, name):
    """(tensor, ndarray): a detached, contiguous CPU tensor and its NumPy view, sharing
    memory (only a non-contiguous tensor is copied); None gives (None, None)."""
    if t is None:
        return None, None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    t = t.detach().resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t, t.numpy()


def _running(t, name):
    if t is None:
        return None
    if isinstance(t, torch.Tensor) and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return _array(t, name)[1]


def _grad(a, like, needed):
    if not needed or like is None:
        return None
    g = torch.from_numpy(a)
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _shape(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


# ---- autograd Functions ------------------------------------------------------------------

class FusedGroupNormFunction(torch.autograd.Function):
    """apply(input, num_groups, weight, bias, eps, activation): activation(group_norm)."""

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps, activation):
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        y, mean, rstd = cynorm.group_norm(x, num_groups, w, b, eps, return_stats=True,
                                          activation=activation)
        ctx.save_for_backward(xt, weight, bias)
        ctx.stats = (mean, rstd)
        ctx.num_groups = num_groups
        ctx.activation = activation
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight, bias = ctx.saved_tensors
        mean, rstd = ctx.stats
        dx, dw, db = cynorm.group_norm_backward(
            _array(dy, "grad_output")[1], xt.numpy(), mean, rstd, ctx.num_groups,
            _array(weight, "weight")[1], bias=_array(bias, "bias")[1],
            activation=ctx.activation)
        need = ctx.needs_input_grad
        return (_grad(dx, xt, need[0]), None, _grad(dw, weight, need[2]),
                _grad(db, bias, need[3]), None, None)


class FusedInstanceNormFunction(torch.autograd.Function):
    """apply(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
    eps, activation): activation(instance_norm), as torch.nn.functional.instance_norm
    followed by the activation (running buffers updated in place with input
    statistics; without them, the running statistics normalise every instance)."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, use_input_stats,
                momentum, eps, activation):
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        rm = _running(running_mean, "running_mean")
        rv = _running(running_var, "running_var")
        if use_input_stats:
            if x.ndim >= 2 and math.prod(x.shape[2:]) <= 1:
                raise ValueError("Expected more than 1 spatial element when training, "
                                 f"got input size {tuple(x.shape)}")
            y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, eps=eps,
                                                 return_stats=True, activation=activation)
            if (rm is not None or rv is not None) and x.shape[0] > 0:
                m = float(momentum)
                if rm is not None:
                    rm[...] = (1.0 - m) * rm + m * mean.mean(axis=0)
                if rv is not None:
                    n = math.prod(x.shape[2:])
                    var = (1.0 / (rstd * rstd) - eps).clip(min=0.0) * (n / (n - 1))
                    rv[...] = (1.0 - m) * rv + m * var.mean(axis=0)
        else:
            if rm is None or rv is None:
                raise ValueError("running_mean and running_var are required when "
                                 "use_input_stats is False")
            y, mean, rstd = cynorm.batch_norm(x, rm, rv, w, b, training=False, eps=eps,
                                              return_stats=True, activation=activation)
        ctx.save_for_backward(xt, weight, bias)
        ctx.stats = (mean, rstd)
        ctx.use_input_stats = bool(use_input_stats)
        ctx.activation = activation
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight, bias = ctx.saved_tensors
        mean, rstd = ctx.stats
        dyn = _array(dy, "grad_output")[1]
        w = _array(weight, "weight")[1]
        b = _array(bias, "bias")[1]
        if ctx.use_input_stats:
            dx, dw, db = cynorm.instance_norm_backward(dyn, xt.numpy(), mean, rstd,
                                                       weight=w, bias=b,
                                                       activation=ctx.activation)
        else:
            dx, dw, db = cynorm.batch_norm_backward(dyn, xt.numpy(), mean, rstd, w,
                                                    training=False, bias=b,
                                                    activation=ctx.activation)
        need = ctx.needs_input_grad
        return (_grad(dx, xt, need[0]), None, None, _grad(dw, weight, need[3]),
                _grad(db, bias, need[4]), None, None, None, None)


class FusedBatchNormFunction(torch.autograd.Function):
    """apply(input, running_mean, running_var, weight, bias, training, momentum, eps,
    activation): activation(batch_norm)."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, training, momentum,
                eps, activation):
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        y, mean, rstd = cynorm.batch_norm(
            x, _running(running_mean, "running_mean"), _running(running_var, "running_var"),
            w, b, training=bool(training), momentum=momentum, eps=eps, return_stats=True,
            activation=activation)
        ctx.save_for_backward(xt, weight, bias)
        ctx.stats = (mean, rstd)
        ctx.training = bool(training)
        ctx.activation = activation
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight, bias = ctx.saved_tensors
        mean, rstd = ctx.stats
        dx, dw, db = cynorm.batch_norm_backward(
            _array(dy, "grad_output")[1], xt.numpy(), mean, rstd,
            _array(weight, "weight")[1], training=ctx.training,
            bias=_array(bias, "bias")[1], activation=ctx.activation)
        need = ctx.needs_input_grad
        return (_grad(dx, xt, need[0]), None, None, _grad(dw, weight, need[3]),
                _grad(db, bias, need[4]), None, None, None, None)


def _residual_grads(ctx, dxh, dh):
    """The gradient with respect to h (through y, plus what reached h directly) is that
    of input and of residual alike."""
    g = torch.from_numpy(dxh)
    if dh is not None:
        g = g + dh
    need = ctx.needs_input_grad
    return (g if need[0] else None), (g.clone() if need[1] else None)


class ResidualLayerNormFunction(torch.autograd.Function):
    """apply(input, residual, normalized_shape, weight, bias, eps) -> (y, h):
    h = input + residual, y = layer_norm(h)."""

    @staticmethod
    def forward(ctx, input, residual, normalized_shape, weight, bias, eps):
        _, x = _array(input, "input")
        _, r = _array(residual, "residual")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        shape = _shape(normalized_shape)
        y, h, mean, rstd = cynorm.layer_norm(x, shape, w, b, eps, return_stats=True,
                                             residual=r)
        ctx.save_for_backward(weight, bias)
        ctx.h = h
        ctx.stats = (mean, rstd)
        ctx.normalized_shape = shape
        return torch.from_numpy(y), torch.from_numpy(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh):
        weight, bias = ctx.saved_tensors
        mean, rstd = ctx.stats
        dxh, dw, db = cynorm.layer_norm_backward(
            _array(dy, "grad_output")[1], ctx.h, mean, rstd, ctx.normalized_shape,
            _array(weight, "weight")[1])
        gx, gr = _residual_grads(ctx, dxh, dh)
        need = ctx.needs_input_grad
        return gx, gr, None, _grad(dw, weight, need[3]), _grad(db, bias, need[4]), None


class ResidualRMSNormFunction(torch.autograd.Function):
    """apply(input, residual, normalized_shape, weight, eps) -> (y, h):
    h = input + residual, y = rms_norm(h)."""

    @staticmethod
    def forward(ctx, input, residual, normalized_shape, weight, eps):
        _, x = _array(input, "input")
        _, r = _array(residual, "residual")
        _, w = _array(weight, "weight")
        shape = _shape(normalized_shape)
        y, h, rstd = cynorm.rms_norm(x, shape, w, eps, return_stats=True, residual=r)
        ctx.save_for_backward(weight)
        ctx.h = h
        ctx.rstd = rstd
        ctx.normalized_shape = shape
        return torch.from_numpy(y), torch.from_numpy(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh):
        (weight,) = ctx.saved_tensors
        dxh, dw = cynorm.rms_norm_backward(
            _array(dy, "grad_output")[1], ctx.h, ctx.rstd, ctx.normalized_shape,
            _array(weight, "weight")[1])
        gx, gr = _residual_grads(ctx, dxh, dh)
        need = ctx.needs_input_grad
        return gx, gr, None, _grad(dw, weight, need[3]), None


# ---- functional forms: torch.nn.functional's signatures plus the fused options ---------------

def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    return FusedGroupNormFunction.apply(input, num_groups, weight, bias, eps,
                                        _activation(activation))


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, activation=None):
    return FusedInstanceNormFunction.apply(input, running_mean, running_var, weight, bias,
                                           use_input_stats, momentum, eps,
                                           _activation(activation))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None):
    return FusedBatchNormFunction.apply(input, running_mean, running_var, weight, bias,
                                        training, momentum, eps, _activation(activation))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    """y = layer_norm(input), or with a residual (y, h): h = input + residual, y its
    layer_norm; gradients reach both input and residual."""
    if residual is None:
        from cynorm.torch import layer_norm as plain
        return plain(input, normalized_shape, weight, bias, eps)
    return ResidualLayerNormFunction.apply(input, residual, normalized_shape, weight, bias,
                                           eps)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, residual=None):
    """y = rms_norm(input), or with a residual (y, h) as in layer_norm."""
    if residual is None:
        from cynorm.torch import rms_norm as plain
        return plain(input, normalized_shape, weight, eps)
    return ResidualRMSNormFunction.apply(input, residual, normalized_shape, weight, eps)


# ---- modules: torch's classes with a cynorm forward and the fused options ----------------

def _act_repr(module, base):
    a = getattr(module, "activation", None)
    return base if a is None else f"{base}, activation={a!r}"


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by cynorm; activation=None|"silu"|"gelu"|"gelu_tanh"|
    "relu" is applied in the same pass."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None,
                 dtype=None, activation=None):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.activation = _activation(activation)

    def forward(self, input):
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (N, {self.num_channels}, *), got "
                             f"{tuple(input.shape)}")
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                          activation=self.activation)

    def extra_repr(self):
        return _act_repr(self, super().extra_repr())


class _BatchNorm:
    """forward of torch.nn.modules.batchnorm._BatchNorm, computed by cynorm, with the
    activation epilogue."""

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _activation(activation)

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        keep_buffers = not self.training or self.track_running_stats
        return batch_norm(input,
                          self.running_mean if keep_buffers else None,
                          self.running_var if keep_buffers else None,
                          self.weight, self.bias, use_batch_stats, factor, self.eps,
                          activation=self.activation)

    def extra_repr(self):
        return _act_repr(self, super().extra_repr())


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by cynorm (activation= as in GroupNorm)."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by cynorm (activation= as in GroupNorm)."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by cynorm (activation= as in GroupNorm)."""


class _InstanceNorm:
    """forward of torch.nn.modules.instancenorm._InstanceNorm, computed by cynorm
    (unbatched input accepted, as torch does), with the activation epilogue."""

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _activation(activation)

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
        y = instance_norm(input, self.running_mean, self.running_var, self.weight,
                          self.bias, self.training or not self.track_running_stats,
                          self.momentum if self.momentum is not None else 0.0, self.eps,
                          activation=self.activation)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self):
        return _act_repr(self, super().extra_repr())


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by cynorm (activation= as in GroupNorm)."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by cynorm (activation= as in GroupNorm)."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by cynorm (activation= as in GroupNorm)."""


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by cynorm; module(x, residual=r) returns (y, h),
    h = x + r, y = LayerNorm(h), the add fused into the normalization's pass."""

    def forward(self, input, residual=None):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by cynorm; module(x, residual=r) returns (y, h) as in
    LayerNorm."""

    def forward(self, input, residual=None):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        residual=residual)


# ---- convert -----------------------------------------------------------------------------

_FUSABLE = (GroupNorm, _BatchNorm, _InstanceNorm)


def _replacement(m):
    """cynorm's module for a torch normalization module m (None for anything else)."""
    nn = torch.nn
    kind = type(m)
    if kind is nn.GroupNorm:
        return GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine)
    for ours, theirs in ((BatchNorm1d, nn.BatchNorm1d), (BatchNorm2d, nn.BatchNorm2d),
                         (BatchNorm3d, nn.BatchNorm3d)):
        if kind is theirs:
            return ours(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    for ours, theirs in ((InstanceNorm1d, nn.InstanceNorm1d),
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
    """The activation name for a module that can be fused into a norm, else None."""
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
    over parameters, buffers and train/eval mode (like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm); inside an nn.Sequential, a
    GroupNorm, InstanceNorm or BatchNorm directly followed by nn.SiLU, nn.GELU or nn.ReLU
    takes the activation as its fused epilogue and the activation becomes nn.Identity
    (so indices and state_dict keys stay). Returns the converted module (a new object
    when `module` itself is a normalization layer)."""
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
            if (name is not None and isinstance(norm, _FUSABLE)
                    and norm.activation is None):
                norm.activation = name
                module._modules[second] = torch.nn.Identity()
    return module
