"""The kernels of a single-target build (CYNORM_ARCH=native or another -march value)."""
