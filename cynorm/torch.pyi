# Type stubs of cynorm.torch, the PyTorch bridge: torch.nn.functional's signatures, and
# subclasses of the torch modules of the same name.
from typing import Any, List, Literal, Optional, Tuple, TypeVar, Union, overload

import torch
from torch import Tensor

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction",
    "GroupNorm", "GroupNormFunction",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "InstanceNormFunction",
    "LayerNorm", "LayerNormFunction",
    "RMSNorm", "RMSNormFunction", "SyncBatchNorm",
    "batch_norm", "convert", "group_norm", "instance_norm", "layer_norm", "rms_norm",
]

_Shape = Union[int, List[int], Tuple[int, ...], torch.Size]
_Activation = Optional[Literal["silu", "gelu", "gelu_tanh", "relu"]]
_M = TypeVar("_M", bound=torch.nn.Module)

class GroupNormFunction(torch.autograd.Function):
    @classmethod
    def apply(cls, input: Tensor, num_groups: int, weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float,
              activation: _Activation = ...) -> Tensor: ...
class InstanceNormFunction(torch.autograd.Function):
    @classmethod
    def apply(cls, input: Tensor, running_mean: Optional[Tensor],
              running_var: Optional[Tensor], weight: Optional[Tensor],
              bias: Optional[Tensor], use_input_stats: bool, momentum: float, eps: float,
              activation: _Activation = ...) -> Tensor: ...
class BatchNormFunction(torch.autograd.Function):
    @classmethod
    def apply(cls, input: Tensor, running_mean: Optional[Tensor],
              running_var: Optional[Tensor], weight: Optional[Tensor],
              bias: Optional[Tensor], training: bool, momentum: float, eps: float,
              activation: _Activation = ...) -> Tensor: ...
class LayerNormFunction(torch.autograd.Function):
    @classmethod
    def apply(cls, input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float,
              residual: Optional[Tensor] = ...) -> Any: ...
class RMSNormFunction(torch.autograd.Function):
    @classmethod
    def apply(cls, input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor],
              eps: Optional[float],
              residual: Optional[Tensor] = ...) -> Any: ...

def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = ...,
               bias: Optional[Tensor] = ..., eps: float = ..., *,
               activation: _Activation = ...) -> Tensor: ...
def instance_norm(input: Tensor, running_mean: Optional[Tensor] = ...,
                  running_var: Optional[Tensor] = ..., weight: Optional[Tensor] = ...,
                  bias: Optional[Tensor] = ..., use_input_stats: bool = ...,
                  momentum: float = ..., eps: float = ..., *,
                  activation: _Activation = ...) -> Tensor: ...
def batch_norm(input: Tensor, running_mean: Optional[Tensor],
               running_var: Optional[Tensor], weight: Optional[Tensor] = ...,
               bias: Optional[Tensor] = ..., training: bool = ...,
               momentum: Optional[float] = ..., eps: float = ..., *,
               activation: _Activation = ...) -> Tensor: ...
@overload
def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = ...,
               bias: Optional[Tensor] = ..., eps: float = ..., *,
               residual: None = ...) -> Tensor: ...
@overload
def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = ...,
               bias: Optional[Tensor] = ..., eps: float = ..., *,
               residual: Tensor) -> Tuple[Tensor, Tensor]: ...
@overload
def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = ...,
             eps: Optional[float] = ..., *, residual: None = ...) -> Tensor: ...
@overload
def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = ...,
             eps: Optional[float] = ..., *, residual: Tensor) -> Tuple[Tensor, Tensor]: ...
def convert(module: _M) -> Union[_M, torch.nn.Module]: ...

class GroupNorm(torch.nn.GroupNorm):
    activation: _Activation
    def __init__(self, num_groups: int, num_channels: int, eps: float = ...,
                 affine: bool = ..., device: Any = ..., dtype: Any = ..., *,
                 activation: _Activation = ...) -> None: ...
    def forward(self, input: Tensor) -> Tensor: ...

class _ChannelNormInit:
    activation: _Activation
    def __init__(self, num_features: int, eps: float = ..., momentum: Optional[float] = ...,
                 affine: bool = ..., track_running_stats: bool = ..., device: Any = ...,
                 dtype: Any = ..., *, activation: _Activation = ...) -> None: ...

class BatchNorm1d(_ChannelNormInit, torch.nn.BatchNorm1d):
    def forward(self, input: Tensor) -> Tensor: ...
class BatchNorm2d(_ChannelNormInit, torch.nn.BatchNorm2d):
    def forward(self, input: Tensor) -> Tensor: ...
class BatchNorm3d(_ChannelNormInit, torch.nn.BatchNorm3d):
    def forward(self, input: Tensor) -> Tensor: ...

class InstanceNorm1d(_ChannelNormInit, torch.nn.InstanceNorm1d):
    def forward(self, input: Tensor) -> Tensor: ...
class InstanceNorm2d(_ChannelNormInit, torch.nn.InstanceNorm2d):
    def forward(self, input: Tensor) -> Tensor: ...
class InstanceNorm3d(_ChannelNormInit, torch.nn.InstanceNorm3d):
    def forward(self, input: Tensor) -> Tensor: ...

class LayerNorm(torch.nn.LayerNorm):
    @overload
    def forward(self, input: Tensor, residual: None = ...) -> Tensor: ...
    @overload
    def forward(self, input: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]: ...

class RMSNorm(torch.nn.RMSNorm):
    @overload
    def forward(self, input: Tensor, residual: None = ...) -> Tensor: ...
    @overload
    def forward(self, input: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]: ...

class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    process_group: Any
    def __init__(self, num_features: int, eps: float = ..., momentum: Optional[float] = ...,
                 affine: bool = ..., track_running_stats: bool = ...,
                 process_group: Any = ..., device: Any = ..., dtype: Any = ..., *,
                 bias: bool = ...) -> None: ...
    def forward(self, input: Tensor) -> Tensor: ...
    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: Any = ...) -> torch.nn.Module: ...
