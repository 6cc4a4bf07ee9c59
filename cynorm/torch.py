"""Optional PyTorch bridge: cynorm's kernels as torch.autograd.Functions and nn.Modules.

Importing this module imports torch (`import cynorm` alone never does). It offers

- functions with torch.nn.functional's signatures, differentiable through autograd:
  `group_norm`, `instance_norm`, `batch_norm`, `layer_norm`, `rms_norm`;
- drop-in modules, subclasses of the torch modules of the same name (same constructor
  arguments, parameters, buffers and state_dict keys) whose forward runs cynorm:
  `GroupNorm`, `InstanceNorm1d/2d/3d`, `BatchNorm1d/2d/3d`, `LayerNorm`, `RMSNorm`.

Tensors must live on the CPU and be float32 or float64. Contiguous tensors are handed to
the kernels without a copy (`tensor.numpy()` shares memory), and outputs are NumPy
arrays wrapped by `torch.from_numpy` (no copy either); a non-contiguous input is made
contiguous first. Running statistics are updated in place, as torch does. The backward
is once-differentiable: double backward raises.
"""
import math
import numbers

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("cynorm.torch needs PyTorch: pip install 'cynorm[torch]' "
                      f"(or pip install torch) ({e})") from e
from torch.autograd.function import once_differentiable

import cynorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction",
    "GroupNorm", "GroupNormFunction",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "InstanceNormFunction",
    "LayerNorm", "LayerNormFunction",
    "RMSNorm", "RMSNormFunction",
    "batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm",
]

_FLOATS = (torch.float32, torch.float64)


def _array(t, name):
    """(tensor, ndarray): a detached, contiguous CPU tensor and its NumPy view, sharing
    memory. Only a non-contiguous tensor is copied. None gives (None, None)."""
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
    """A running-statistics buffer as a NumPy view that the kernel updates in place."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor) and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return _array(t, name)[1]


def _grad(a, like, needed):
    """A NumPy gradient as a tensor of `like`'s dtype, or None when not needed."""
    if not needed or like is None:
        return None
    g = torch.from_numpy(a)
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _shape(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


# ---- autograd Functions ----------------------------------------------------------------

class GroupNormFunction(torch.autograd.Function):
    """apply(input, num_groups, weight, bias, eps)"""

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps):
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        y, mean, rstd = cynorm.group_norm(x, num_groups, w, b, eps, return_stats=True)
        ctx.save_for_backward(xt, weight)
        ctx.stats = (mean, rstd)
        ctx.num_groups = num_groups
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight = ctx.saved_tensors
        mean, rstd = ctx.stats
        dx, dw, db = cynorm.group_norm_backward(
            _array(dy, "grad_output")[1], xt.numpy(), mean, rstd, ctx.num_groups,
            _array(weight, "weight")[1])
        need = ctx.needs_input_grad
        return (_grad(dx, xt, need[0]), None, _grad(dw, weight, need[2]),
                _grad(db, weight, need[3]), None)


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
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        rm = _running(running_mean, "running_mean")
        rv = _running(running_var, "running_var")
        if use_input_stats:
            if x.ndim >= 2 and math.prod(x.shape[2:]) <= 1:
                raise ValueError("Expected more than 1 spatial element when training, "
                                 f"got input size {tuple(x.shape)}")
            y, mean, rstd = cynorm.instance_norm(x, w, b, eps, return_stats=True)
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
                                              return_stats=True)
        ctx.save_for_backward(xt, weight)
        ctx.stats = (mean, rstd)
        ctx.use_input_stats = bool(use_input_stats)
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight = ctx.saved_tensors
        mean, rstd = ctx.stats
        dyn = _array(dy, "grad_output")[1]
        w = _array(weight, "weight")[1]
        if ctx.use_input_stats:
            dx, dw, db = cynorm.instance_norm_backward(dyn, xt.numpy(), mean, rstd, w)
        else:
            dx, dw, db = cynorm.batch_norm_backward(dyn, xt.numpy(), mean, rstd, w,
                                                    training=False)
        need = ctx.needs_input_grad
        return (_grad(dx, xt, need[0]), None, None, _grad(dw, weight, need[3]),
                _grad(db, weight, need[4]), None, None, None)


class BatchNormFunction(torch.autograd.Function):
    """apply(input, running_mean, running_var, weight, bias, training, momentum, eps), as
    torch.nn.functional.batch_norm (running buffers updated in place when training)."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, training, momentum,
                eps):
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        y, mean, rstd = cynorm.batch_norm(
            x, _running(running_mean, "running_mean"), _running(running_var, "running_var"),
            w, b, training=bool(training), momentum=momentum, eps=eps, return_stats=True)
        ctx.save_for_backward(xt, weight)
        ctx.stats = (mean, rstd)
        ctx.training = bool(training)
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight = ctx.saved_tensors
        mean, rstd = ctx.stats
        dx, dw, db = cynorm.batch_norm_backward(
            _array(dy, "grad_output")[1], xt.numpy(), mean, rstd,
            _array(weight, "weight")[1], training=ctx.training)
        need = ctx.needs_input_grad
        return (_grad(dx, xt, need[0]), None, None, _grad(dw, weight, need[3]),
                _grad(db, weight, need[4]), None, None, None)


class LayerNormFunction(torch.autograd.Function):
    """apply(input, normalized_shape, weight, bias, eps)"""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, bias, eps):
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        _, b = _array(bias, "bias")
        shape = _shape(normalized_shape)
        y, mean, rstd = cynorm.layer_norm(x, shape, w, b, eps, return_stats=True)
        ctx.save_for_backward(xt, weight)
        ctx.stats = (mean, rstd)
        ctx.normalized_shape = shape
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight = ctx.saved_tensors
        mean, rstd = ctx.stats
        dx, dw, db = cynorm.layer_norm_backward(
            _array(dy, "grad_output")[1], xt.numpy(), mean, rstd, ctx.normalized_shape,
            _array(weight, "weight")[1])
        need = ctx.needs_input_grad
        return (_grad(dx, xt, need[0]), None, _grad(dw, weight, need[2]),
                _grad(db, weight, need[3]), None)


class RMSNormFunction(torch.autograd.Function):
    """apply(input, normalized_shape, weight, eps); eps=None: machine epsilon of the
    input's dtype, as torch.nn.functional.rms_norm."""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, eps):
        xt, x = _array(input, "input")
        _, w = _array(weight, "weight")
        shape = _shape(normalized_shape)
        y, rstd = cynorm.rms_norm(x, shape, w, eps, return_stats=True)
        ctx.save_for_backward(xt, weight)
        ctx.rstd = rstd
        ctx.normalized_shape = shape
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xt, weight = ctx.saved_tensors
        dx, dw = cynorm.rms_norm_backward(
            _array(dy, "grad_output")[1], xt.numpy(), ctx.rstd, ctx.normalized_shape,
            _array(weight, "weight")[1])
        need = ctx.needs_input_grad
        return _grad(dx, xt, need[0]), None, _grad(dw, weight, need[2]), None


# ---- functional API, with torch.nn.functional's signatures -----------------------------

def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return GroupNormFunction.apply(input, num_groups, weight, bias, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    return InstanceNormFunction.apply(input, running_mean, running_var, weight, bias,
                                      use_input_stats, momentum, eps)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    return BatchNormFunction.apply(input, running_mean, running_var, weight, bias,
                                   training, momentum, eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return LayerNormFunction.apply(input, normalized_shape, weight, bias, eps)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    return RMSNormFunction.apply(input, normalized_shape, weight, eps)


# ---- modules: torch's own classes with a cynorm forward --------------------------------

class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by cynorm."""

    def forward(self, input):
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (N, {self.num_channels}, *), got "
                             f"{tuple(input.shape)}")
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _BatchNorm:
    """forward of torch.nn.modules.batchnorm._BatchNorm, computed by cynorm."""

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
                          self.weight, self.bias, use_batch_stats, factor, self.eps)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by cynorm."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by cynorm."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by cynorm."""


class _InstanceNorm:
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
        y = instance_norm(input, self.running_mean, self.running_var, self.weight,
                          self.bias, self.training or not self.track_running_stats,
                          self.momentum if self.momentum is not None else 0.0, self.eps)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by cynorm."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by cynorm."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by cynorm."""


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by cynorm."""

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by cynorm."""

    def forward(self, input):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


from cynorm._torch_sync import SyncBatchNorm  # noqa: E402
