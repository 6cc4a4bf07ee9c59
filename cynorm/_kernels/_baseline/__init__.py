"""The kernels compiled for the baseline instruction-set level (x86-64-v2 on x86-64)."""
