"""cynorm.torch.SyncBatchNorm: batch normalisation over the global batch of a
torch.distributed process group, on CPU tensors, with any backend (gloo, mpi).

torch.nn.SyncBatchNorm refuses CPU tensors. This module keeps its constructor,
parameters, buffers and state_dict keys and runs the scale-out steps of cynorm
(DESIGN.md, "Scale-out"):

forward: each rank computes its per-channel partial moments (count, mean, m2; C float64
    each), all ranks all_gather them and merge them in rank order, so every rank gets
    bitwise the same global statistics; each rank normalises its own batch with them.
backward: each rank computes sum(dy) and sum(dy * (x - mean)) per channel, all ranks
    all_gather them and add them in rank order, and each rank computes its dx from the
    global sums. As in torch.nn.SyncBatchNorm, the weight and bias gradients are this
    rank's contributions (DistributedDataParallel's gradient all-reduce combines them).

Both collectives move 3 * C and 2 * C numbers per rank; all_gather rather than
all_reduce because the order of an all_reduce's additions is up to the backend.

Tensors: float32, float64, float16 or bfloat16, handed to the kernels as cynorm.torch
does (a contiguous tensor's own memory, bfloat16 as ml_dtypes.bfloat16, no copy); the
statistics and gradient sums exchanged are float64 for every dtype; outputs have the
input's dtype, parameter gradients their parameter's.
"""
import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

import cynorm
from cynorm import _api

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction"]


def _bridge():
    """cynorm.torch's tensor <-> array conversions (imported here, not at the top:
    cynorm.torch imports this module at its end)."""
    from cynorm import torch as bridge
    return bridge


def _gather(a, group, world_size):
    """The float64 arrays `a` of every rank of the group, stacked in rank order."""
    mine = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine, group=group)
    return np.stack([p.numpy() for p in parts])


def _update_running(buf, stat, momentum):
    """buf = (1 - momentum) * buf + momentum * stat, in place, as cynorm.batch_norm."""
    if buf is None:
        return
    _api._update_running(_bridge()._running(buf, "running buffer"), momentum, stat)


class SyncBatchNormFunction(torch.autograd.Function):
    """apply(input, weight, bias, running_mean, running_var, eps, momentum,
    process_group, world_size): training-mode batch normalisation with the statistics
    of the group's global batch."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum,
                process_group, world_size):
        bridge = _bridge()
        x = bridge._input(input, "input")[0]
        w = bridge._param(weight, "weight")
        b = bridge._param(bias, "bias")
        local = cynorm.partial_stats(x, "batch")
        merged = cynorm.merge_stats(_gather(local.stacked(), process_group, world_size))
        count = float(merged.count[0]) if merged.count.size else 0.0
        if count <= 1:
            raise ValueError("SyncBatchNorm: expected more than 1 value per channel in "
                             f"the global batch, got {count:g} (input of shape "
                             f"{tuple(x.shape)} on this rank)")
        mean = merged.mean
        rstd = merged.rstd(eps)
        _update_running(running_mean, mean, momentum)
        _update_running(running_var, merged.var(unbiased=True), momentum)
        y = cynorm.apply_stats(x, mean, rstd, w, b)
        # input itself (autograd then sees later in-place changes), or the contiguous
        # copy x is
        ctx.save_for_backward(input if input.is_contiguous() else bridge._from_numpy(x),
                              weight)
        ctx.stats = (mean, rstd, count)
        ctx.group = (process_group, world_size)
        return bridge._from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        bridge = _bridge()
        xt, weight = ctx.saved_tensors
        mean, rstd, count = ctx.stats
        group, world_size = ctx.group
        x = bridge._input(xt, "input")[0]
        dyn = bridge._input(dy, "grad_output")[0]
        if dyn.dtype != x.dtype:
            dyn = dyn.astype(x.dtype)
        sum_dy, sum_dy_xmu = cynorm.batch_norm_backward_reduce(dyn, x, mean)
        need = ctx.needs_input_grad
        dx = None
        if need[0]:
            sums = _gather(np.stack([sum_dy, sum_dy_xmu]), group, world_size)
            total = sums[0].copy()
            for s in sums[1:]:  # rank order: the same bits on every rank
                total += s
            dx = bridge._from_numpy(cynorm.batch_norm_backward_apply(
                dyn, x, mean, rstd, total[0], total[1], count,
                bridge._param(weight, "weight")))
        dw = db = None
        if weight is not None and need[1]:
            dw = torch.from_numpy(sum_dy_xmu * rstd).to(weight.dtype)
        if weight is not None and need[2]:
            db = torch.from_numpy(sum_dy).to(weight.dtype)
        return dx, dw, db, None, None, None, None, None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm computed by cynorm, for CPU tensors and any
    torch.distributed backend (same constructor, parameters, buffers and state_dict).
    A sibling of torch.nn.SyncBatchNorm rather than a subclass: DistributedDataParallel
    refuses torch's class (and its subclasses) in a CPU module.

    In training mode inside an initialised process group of more than one rank, each
    channel is normalised with the mean and variance of the group's global batch, and
    the running statistics are updated with the global unbiased variance (bitwise the
    same on every rank). Outside a process group, with one rank, or in eval mode, it is
    cynorm.torch.BatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None,
                 *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    def __getstate__(self):  # cynorm.torch's view cache stays out of pickles and copies
        state = super().__getstate__().copy()
        state.pop("_cynorm_views", None)
        return state

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None
                                        and self.running_var is None)
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        group, world_size = None, 1
        if (bn_training and self.training and dist.is_available()
                and dist.is_initialized()):
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size <= 1:  # cynorm.torch.BatchNorm's route (module cache included)
            bridge = _bridge()
            if torch.compiler.is_compiling():
                return bridge.batch_norm(input, running_mean, running_var, self.weight,
                                         self.bias, bn_training, factor, self.eps)
            return bridge._module_call(self, ("batch", 0, None, bool(bn_training), factor,
                                              self.eps, None),
                                       input, self.weight, self.bias, running_mean,
                                       running_var)
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if buf is not None and not buf.is_contiguous():
                raise ValueError(f"{name} must be contiguous (it is updated in place)")
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                           running_var, self.eps, factor, group,
                                           world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """module with every BatchNorm*d layer (torch's or cynorm's) replaced by a
        cynorm SyncBatchNorm sharing its parameters and buffers, as
        torch.nn.SyncBatchNorm.convert_sync_batchnorm."""
        out = module
        if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                and not isinstance(module, cls)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group,
                      bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
