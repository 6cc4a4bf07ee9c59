"""Stateful normalization layers on NumPy arrays, built only on cynorm's public API.

Each layer holds its parameters (float32 by default: weight ones, bias zeros), running
statistics where it has any, and a train/eval mode::

    layer = GroupNorm(4, 16)
    y = layer(x)              # forward; saves what the backward needs
    dx = layer.backward(dy)   # gradient w.r.t. x; parameter gradients in layer.grads
    for name, p in layer.parameters().items():
        p -= lr * layer.grads[name]          # parameters() returns the live arrays

`state_dict()` / `load_state_dict()` use PyTorch's keys (weight, bias, running_mean,
running_var, num_batches_tracked), so the state of a torch normalization layer,
exported with `{k: v.numpy() for k, v in module.state_dict().items()}`, loads unchanged
(torch tensors are accepted too).

The forward keeps a reference to x until the backward: do not modify x in place in
between. It also keeps a copy of the weight it used, so that the backward computes the
gradients of that forward even when the parameters were updated in place in between
(an optimizer step before the backward). One backward per forward.

Fused blocks: GroupNorm, InstanceNorm and BatchNorm take `activation="silu"` (or
"gelu", "gelu_tanh", "relu"), applied in the same pass; LayerNorm and RMSNorm take a
residual, `y, h = layer(x, residual=r)` with h = x + r normalised into y, and
`layer.backward(dy, dh)` returns the gradient with respect to h (that of x and of r).

Arguments are checked by the same helpers as the functional API's (cynorm._validate):
errors are TypeError/ValueError naming the argument (x for the input).
"""
from collections.abc import Mapping
import numbers

import numpy as np

import cynorm
from cynorm._validate import (
    as_input, as_state_entry, check_activation, check_eps, check_flag, check_int, is_lowp,
    check_momentum,
)

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]


def _act_repr(activation):
    return "" if activation is None else f", activation={activation!r}"


_DTYPES = "float32, float64, float16 or bfloat16"


def _param_dtype(dtype):
    """The parameters' dtype: float32, float64, float16 or bfloat16 (ml_dtypes')."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be {_DTYPES}, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)) and not is_lowp(dt):
        raise TypeError(f"dtype must be {_DTYPES}, got {dt}")
    return dt


def _stats_dtype(dtype):
    """Running statistics of 16-bit layers are kept in float32, as torch's mixed
    precision does; those of the other layers in the parameters' dtype."""
    return np.dtype(np.float32) if is_lowp(dtype) else dtype


def _normalized_shape(v):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        shape = (v,)
    else:
        try:
            shape = tuple(v)
        except TypeError:
            raise TypeError("normalized_shape must be an int or a tuple of ints, got "
                            f"{type(v).__name__}") from None
        if len(shape) == 0:
            raise ValueError("normalized_shape must have at least one dimension")
    return tuple(check_int(d, "normalized_shape", 1) for d in shape)


class _Norm:
    """The machinery shared by every layer: parameters, gradients, buffers, modes, state."""

    def __init__(self, dtype):
        self.dtype = _param_dtype(dtype)
        self.training = True
        self.grads = {}
        self._params = {}    # name -> array; updated in place by load_state_dict
        self._buffers = {}   # name -> array
        self._saved = None   # what the backward needs, set by the forward

    # ---- modes ---------------------------------------------------------------------
    def train(self, mode=True):
        self.training = check_flag(mode, "mode")
        return self

    def eval(self):
        return self.train(False)

    # ---- parameters and state --------------------------------------------------------
    def parameters(self):
        """name -> parameter array (the live arrays: updating them updates the layer)."""
        return dict(self._params)

    @property
    def weight(self):
        return self._params.get("weight")

    @property
    def bias(self):
        return self._params.get("bias")

    def _state_keys(self):
        return list(self._params) + list(self._buffers)

    def state_dict(self):
        """Copies of the parameters and buffers, under PyTorch's keys."""
        out = {k: v.copy() for k, v in self._params.items()}
        out.update((k, v.copy()) for k, v in self._buffers.items())
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy values into the parameters and buffers (their dtypes are kept).

        Atomic: every entry is checked before any is copied, and a failed load changes
        nothing. Values may be NumPy arrays (ml_dtypes' bfloat16 too), scalars or torch
        tensors (bfloat16 too, converted exactly) of exactly the target's shape; a finite
        value that would overflow the target's dtype is rejected; num_batches_tracked
        must be an integer (or an integer-valued float) in [0, 2**62]. Errors name the
        key.
        strict: missing or unexpected keys raise KeyError; with strict=False they are
        ignored.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping of names to arrays, got "
                            f"{type(state_dict).__name__}")
        strict = check_flag(strict, "strict")
        keys = self._state_keys()
        if strict:
            missing = [k for k in keys if k not in state_dict]
            unexpected = [k for k in state_dict if k not in keys]
            if missing or unexpected:
                raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys "
                               f"{missing}, unexpected keys {unexpected}")
        values = {}
        for k in keys:
            if k in state_dict:
                target = self._params.get(k, self._buffers.get(k))
                values[k] = as_state_entry(state_dict[k], k, target)
        for k, v in values.items():   # all checked first: a failed load changes nothing
            target = self._params.get(k, self._buffers.get(k))
            target[...] = v

    # ---- forward / backward ------------------------------------------------------------
    def __call__(self, x):
        return self.forward(x)

    def _saved_for_backward(self):
        """The forward's saved values; _finish_backward() releases them once the backward succeeded
        (so that a rejected dy, e.g. of the wrong shape, can be retried)."""
        saved = self._saved
        if saved is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a preceding forward "
                "(or twice after one forward): call the layer on an input first")
        return saved

    def _save(self, *values):
        """Keep what the backward needs, with a copy of the weight this forward used."""
        w = self._params.get("weight")
        self._saved = values + (None if w is None else w.copy(),)

    def _finish_backward(self, **grads):
        self._saved = None
        self.grads = {k: np.asarray(g, dtype=self._params[k].dtype)
                      for k, g in grads.items() if k in self._params}

    def _new_params(self, shape, weight, bias):
        if weight:
            self._params["weight"] = np.ones(shape, dtype=self.dtype)
        if bias:
            self._params["bias"] = np.zeros(shape, dtype=self.dtype)

    def _bias_repr(self):
        return ", bias=False" if self.weight is not None and self.bias is None else ""

    def _check_channels(self, x, num_channels):
        x = as_input(x, "x")
        last = self.channel_axis == -1
        if x.ndim < 2:
            raise ValueError(f"{type(self).__name__}: x must be "
                             f"{'(N, *spatial, C)' if last else '(N, C, *spatial)'}, "
                             f"got shape {x.shape}")
        c = x.shape[-1 if last else 1]
        if c != num_channels:
            raise ValueError(f"{type(self).__name__}: x has {c} channels "
                             f"({'last dim' if last else 'dim 1'}), expected {num_channels}")
        return x

    def _set_channel_axis(self, channel_axis):
        """1 (x of shape (N, C, *spatial)) or -1 (channels last: (N, *spatial, C))."""
        if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(
                channel_axis, numbers.Integral):
            raise TypeError(f"channel_axis must be an int, got {type(channel_axis).__name__}")
        if channel_axis not in (1, -1):
            raise ValueError(f"channel_axis must be 1 (x of shape (N, C, *spatial)) or -1 "
                             f"(x of shape (N, *spatial, C)), got {channel_axis!r}")
        self.channel_axis = int(channel_axis)

    def _axis_repr(self):
        return ", channel_axis=-1" if self.channel_axis == -1 else ""


class _Activated:
    """The activation epilogue of GroupNorm, InstanceNorm and BatchNorm."""

    def _set_activation(self, activation):
        check_activation(activation)
        self.activation = activation

    def _bias_for_backward(self):
        """A copy of the bias when the backward recomputes the activation's input."""
        b = self._params.get("bias")
        return None if self.activation is None or b is None else b.copy()


class _RunningStats:
    """Running statistics buffers (BatchNorm, InstanceNorm), under torch's names."""

    def _init_channel_layer(self, num_features, eps, momentum, affine,
                            track_running_stats, dtype, bias, activation, channel_axis=1):
        """The constructor BatchNorm and InstanceNorm share (torch's arguments, checked)."""
        super().__init__(dtype)  # the next class in the layer's MRO: _Norm
        self._set_activation(activation)
        self._set_channel_axis(channel_axis)
        self.num_features = check_int(num_features, "num_features", 1)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum, allow_none=True)
        self.affine = check_flag(affine, "affine")
        self.track_running_stats = check_flag(track_running_stats, "track_running_stats")
        self._new_params((self.num_features,), self.affine,
                         self.affine and check_flag(bias, "bias"))
        if self.track_running_stats:
            self._new_running_stats(self.num_features)

    def _new_running_stats(self, num_features):
        self._buffers["running_mean"] = np.zeros(num_features, dtype=_stats_dtype(self.dtype))
        self._buffers["running_var"] = np.ones(num_features, dtype=_stats_dtype(self.dtype))
        self._buffers["num_batches_tracked"] = np.zeros((), dtype=np.int64)

    @property
    def running_mean(self):
        return self._buffers.get("running_mean")

    @property
    def running_var(self):
        return self._buffers.get("running_var")

    @property
    def num_batches_tracked(self):
        n = self._buffers.get("num_batches_tracked")
        return None if n is None else int(n)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self._buffers["num_batches_tracked"][...] = 0


class GroupNorm(_Activated, _Norm):
    """Group normalisation over x of shape (N, C, *spatial), as torch.nn.GroupNorm
    (bias=False: a weight and no bias, as torch's keyword). activation: None, "silu",
    "gelu", "gelu_tanh" or "relu", fused into the same pass. channel_axis=-1: x of
    shape (N, *spatial, C) (channels last, as Keras' GroupNormalization(axis=-1) and
    Flax's GroupNorm), read in place; dx has x's layout."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32,
                 *, bias=True, activation=None, channel_axis=1):
        super().__init__(dtype)
        self._set_activation(activation)
        self._set_channel_axis(channel_axis)
        self.num_groups = check_int(num_groups, "num_groups", 1)
        self.num_channels = check_int(num_channels, "num_channels", 1)
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups ({self.num_groups}) must divide num_channels "
                             f"({self.num_channels})")
        self.eps = check_eps(eps)
        self.affine = check_flag(affine, "affine")
        self._new_params((self.num_channels,), self.affine,
                         self.affine and check_flag(bias, "bias"))

    def forward(self, x):
        x = self._check_channels(x, self.num_channels)
        y, mean, rstd = cynorm.group_norm(x, self.num_groups, self.weight, self.bias,
                                          self.eps, return_stats=True,
                                          activation=self.activation,
                                          channel_axis=self.channel_axis)
        self._save(x, mean, rstd, self._bias_for_backward())
        return y

    def backward(self, dy):
        x, mean, rstd, bias, weight = self._saved_for_backward()
        dx, dw, db = cynorm.group_norm_backward(dy, x, mean, rstd, self.num_groups,
                                                weight, bias=bias,
                                                activation=self.activation,
                                                channel_axis=self.channel_axis)
        self._finish_backward(weight=dw, bias=db)
        return dx

    def __repr__(self):
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine}{self._bias_repr()}{_act_repr(self.activation)}"
                f"{self._axis_repr()})")


class InstanceNorm(_Activated, _RunningStats, _Norm):
    """Instance normalisation over x of shape (N, C, *spatial): each (sample, channel)
    normalised over its spatial elements, as torch.nn.InstanceNorm1d/2d/3d (same
    constructor arguments in the same order, then dtype).

    Training, or track_running_stats=False: per-instance statistics, which need more
    than one spatial element (ValueError otherwise). With track_running_stats the running
    mean and (unbiased) variance, averaged over the batch, are updated with `momentum`
    (momentum=None means no update, as torch does), and eval normalises with them;
    num_batches_tracked is kept for torch's state_dict but, as in torch, not counted.
    bias=False: a weight and no bias, as torch's keyword. activation, channel_axis: as
    in GroupNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, dtype=np.float32, *, bias=True,
                 activation=None, channel_axis=1):
        self._init_channel_layer(num_features, eps, momentum, affine, track_running_stats,
                                 dtype, bias, activation, channel_axis)

    def forward(self, x):
        x = self._check_channels(x, self.num_features)
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats and x.size and x.size // (x.shape[0] * self.num_features) == 1:
            # each output would be just the bias; torch rejects this too
            raise ValueError("InstanceNorm: expected more than 1 spatial element per "
                             f"channel, got shape {x.shape}")
        running = ((self.running_mean, self.running_var) if self.track_running_stats
                   else (None, None))
        momentum = 0.0 if self.momentum is None or not self.training else self.momentum
        y, mean, rstd = cynorm.instance_norm(
            x, *running, self.weight, self.bias, use_input_stats=use_input_stats,
            momentum=momentum, eps=self.eps, return_stats=True,
            activation=self.activation, channel_axis=self.channel_axis)
        self._save(x, mean, rstd, use_input_stats, self._bias_for_backward())
        return y

    def backward(self, dy):
        x, mean, rstd, use_input_stats, bias, weight = self._saved_for_backward()
        dx, dw, db = cynorm.instance_norm_backward(dy, x, mean, rstd, weight,
                                                   use_input_stats=use_input_stats,
                                                   bias=bias, activation=self.activation,
                                                   channel_axis=self.channel_axis)
        self._finish_backward(weight=dw, bias=db)
        return dx

    def __repr__(self):
        return (f"InstanceNorm({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{self._bias_repr()}"
                f"{_act_repr(self.activation)}{self._axis_repr()})")


class BatchNorm(_Activated, _RunningStats, _Norm):
    """Batch normalisation over x of shape (N, C, *spatial) (also (N, C)), as
    torch.nn.BatchNorm1d/2d/3d.

    Training: batch statistics; with track_running_stats the running mean and (unbiased)
    variance are updated with `momentum`, or as a cumulative moving average when
    momentum is None, and num_batches_tracked counts the batches. Eval: the running
    statistics, or batch statistics when track_running_stats is False. bias=False: a
    weight and no bias, as torch's keyword. activation, channel_axis: as in GroupNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, *, bias=True,
                 activation=None, channel_axis=1):
        self._init_channel_layer(num_features, eps, momentum, affine, track_running_stats,
                                 dtype, bias, activation, channel_axis)

    def forward(self, x):
        x = self._check_channels(x, self.num_features)
        use_batch_stats = self.training or not self.track_running_stats
        momentum = 0.0
        running_mean = running_var = None
        if self.track_running_stats:
            running_mean, running_var = self.running_mean, self.running_var
            if self.training:
                n = int(self._buffers["num_batches_tracked"]) + 1
                momentum = 1.0 / n if self.momentum is None else self.momentum
        y, mean, rstd = cynorm.batch_norm(x, running_mean, running_var, self.weight,
                                          self.bias, training=use_batch_stats,
                                          momentum=momentum, eps=self.eps,
                                          return_stats=True, activation=self.activation,
                                          channel_axis=self.channel_axis)
        if self.track_running_stats and self.training:
            # counted after the call succeeded, so that a rejected batch is not counted
            self._buffers["num_batches_tracked"] += 1
        self._save(x, mean, rstd, use_batch_stats, self._bias_for_backward())
        return y

    def backward(self, dy):
        x, mean, rstd, use_batch_stats, bias, weight = self._saved_for_backward()
        dx, dw, db = cynorm.batch_norm_backward(dy, x, mean, rstd, weight,
                                                training=use_batch_stats, bias=bias,
                                                activation=self.activation,
                                                channel_axis=self.channel_axis)
        self._finish_backward(weight=dw, bias=db)
        return dx

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}"
                f"{self._bias_repr()}{_act_repr(self.activation)}{self._axis_repr()})")


class _RowNorm(_Norm):
    """Shared by LayerNorm and RMSNorm: statistics over the trailing normalized_shape, and
    the fused residual add: layer(x, residual=r) returns (y, h), h = x + r."""

    def __call__(self, x, residual=None):
        return self.forward(x, residual=residual)

    def _finish_residual_backward(self, dx, dh):
        """The gradient with respect to h: through y (dx) plus what reached h directly."""
        if dh is None:
            return dx
        dh = np.asarray(dh)
        if dh.shape != dx.shape:
            raise ValueError(f"dh must have the shape of h {dx.shape}, got {dh.shape}")
        return dx + dh

    def _check_trailing(self, x):
        x = as_input(x, "x")
        k = len(self.normalized_shape)
        if x.ndim < k or x.shape[x.ndim - k:] != self.normalized_shape:
            raise ValueError(f"{type(self).__name__}: x's trailing dimensions must be "
                             f"{self.normalized_shape}, got shape {x.shape}")
        return x


class LayerNorm(_RowNorm):
    """Layer normalisation over the trailing `normalized_shape` dimensions of x, with an
    elementwise affine, as torch.nn.LayerNorm."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = check_eps(eps)
        self.elementwise_affine = check_flag(elementwise_affine, "elementwise_affine")
        has_bias = check_flag(bias, "bias")
        self._new_params(self.normalized_shape, self.elementwise_affine,
                         self.elementwise_affine and has_bias)

    def forward(self, x, residual=None):
        """y, or with a residual (y, h): h = x + residual, y = LayerNorm(h)."""
        x = self._check_trailing(x)
        if residual is not None:
            y, h, mean, rstd = cynorm.layer_norm(x, self.normalized_shape, self.weight,
                                                 self.bias, self.eps, return_stats=True,
                                                 residual=residual)
            self._save(h, mean, rstd)
            return y, h
        y, mean, rstd = cynorm.layer_norm(x, self.normalized_shape, self.weight,
                                          self.bias, self.eps, return_stats=True)
        self._save(x, mean, rstd)
        return y

    def backward(self, dy, dh=None):
        """dx; after a residual forward, the gradient with respect to h (which is that of
        x and of residual), dh being the gradient reaching h other than through y."""
        x, mean, rstd, weight = self._saved_for_backward()
        dx, dw, db = cynorm.layer_norm_backward(dy, x, mean, rstd, self.normalized_shape,
                                                weight)
        dx = self._finish_residual_backward(dx, dh)
        self._finish_backward(weight=dw, bias=db)
        return dx

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None})")


class RMSNorm(_RowNorm):
    """Root-mean-square normalisation over the trailing `normalized_shape` dimensions of
    x, with an elementwise weight, as torch.nn.RMSNorm. eps=None means the machine
    epsilon of x's dtype."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True,
                 dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = check_eps(eps, allow_none=True)
        self.elementwise_affine = check_flag(elementwise_affine, "elementwise_affine")
        self._new_params(self.normalized_shape, self.elementwise_affine, False)

    def forward(self, x, residual=None):
        """y, or with a residual (y, h): h = x + residual, y = RMSNorm(h)."""
        x = self._check_trailing(x)
        if residual is not None:
            y, h, rstd = cynorm.rms_norm(x, self.normalized_shape, self.weight, self.eps,
                                         return_stats=True, residual=residual)
            self._save(h, rstd)
            return y, h
        y, rstd = cynorm.rms_norm(x, self.normalized_shape, self.weight, self.eps,
                                  return_stats=True)
        self._save(x, rstd)
        return y

    def backward(self, dy, dh=None):
        """dx; after a residual forward, the gradient with respect to h (see LayerNorm)."""
        x, rstd, weight = self._saved_for_backward()
        dx, dw = cynorm.rms_norm_backward(dy, x, rstd, self.normalized_shape, weight)
        dx = self._finish_residual_backward(dx, dh)
        self._finish_backward(weight=dw)
        return dx

    def __repr__(self):
        return (f"RMSNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine})")
