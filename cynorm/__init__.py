"""cynorm: normalization layers for NumPy on the CPU, as Cython/OpenMP kernels.

Forward and backward of GroupNorm, InstanceNorm, LayerNorm, BatchNorm and RMSNorm on
float32/float64 arrays (and float16/bfloat16 storage), and standardize (z-scores over any axes) for NumPy pipelines;
bitwise reproducible for any thread count.
"""
from cynorm._api import (
    batch_norm,
    batch_norm_backward,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from cynorm._kernels.runtime import get_num_threads
from cynorm._pool import output_cache_info, set_output_cache
from cynorm._standardize import standardize
from cynorm._stats_api import (
    PartialStats,
    apply_stats,
    batch_norm_backward_apply,
    batch_norm_backward_reduce,
    merge_stats,
    partial_stats,
)

__version__ = "0.1.0"

from cynorm._config import show_config  # noqa: E402  (reads __version__)

__all__ = [
    "PartialStats",
    "apply_stats",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_backward_apply",
    "batch_norm_backward_reduce",
    "get_num_threads",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "merge_stats",
    "output_cache_info",
    "partial_stats",
    "rms_norm",
    "rms_norm_backward",
    "set_output_cache",
    "show_config",
    "standardize",
]
