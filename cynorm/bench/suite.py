"""The benchmark's suites: the cases (op, shape, groups) and the arrays each runs on."""
from collections import namedtuple

OPS = ("group_norm", "instance_norm", "batch_norm", "layer_norm", "rms_norm")
ROW_OPS = ("layer_norm", "rms_norm")  # normalized_shape = the last dim
PASSES = ("fwd", "fwd+bwd")
EPS = 1e-5  # rms_norm uses eps=None, i.e. np.finfo(dtype).eps, on every side

# ---- the suites -------------------------------------------------------------------------

# groups is num_groups for group_norm and None for every other op.
Case = namedtuple("Case", "op shape groups")


def _cases(op, shapes, groups=None):
    return [Case(op, s, groups) for s in shapes]


_ROW_SHAPES = [(4096, 768), (512, 4096), (64, 1024), (1, 2**24)]
FULL_SUITE = (
    _cases("group_norm", [(8, 256, 56, 56), (2, 320, 64, 64), (1, 512, 128, 128),
                          (16, 256, 128, 128), (1, 64, 32, 32)], 32)
    + [Case("group_norm", (1, 32, 8, 8), 8)]
    + _cases("instance_norm", [(8, 64, 128, 128), (1, 64, 256, 256)])
    + _cases("batch_norm", [(32, 64, 56, 56), (8, 256, 28, 28), (64, 128, 7, 7)])
    + _cases("layer_norm", _ROW_SHAPES)
    + _cases("rms_norm", _ROW_SHAPES)
)

_QUICK_ROWS = [(64, 1024), (4096, 768)]
QUICK_SUITE = (
    [Case("group_norm", (1, 32, 8, 8), 8)]
    + _cases("group_norm", [(4, 128, 32, 32), (2, 320, 64, 64)], 32)
    + _cases("instance_norm", [(4, 64, 64, 64)])
    + _cases("batch_norm", [(64, 128, 7, 7), (8, 64, 56, 56)])
    + _cases("layer_norm", _QUICK_ROWS)
    + _cases("rms_norm", _QUICK_ROWS)
)

# --tiny (hidden; for the tests): very small shapes, a small copy-bandwidth array.
TINY_SUITE = (
    [Case("group_norm", (2, 8, 4, 4), 2)]
    + _cases("instance_norm", [(2, 4, 5, 5)])
    + _cases("batch_norm", [(4, 3, 5)])
    + _cases("layer_norm", [(8, 16)])
    + _cases("rms_norm", [(8, 16)])
)
TINY_COPY_BYTES = 8 << 20

# Per-call overhead: microseconds for one tiny call.
TINY_CALL = Case("group_norm", (1, 32, 8, 8), 8)


def case_label(case):
    shape = "(" + ",".join(str(d) for d in case.shape) + ")"
    return shape + (f" G={case.groups}" if case.groups is not None else "")


def _param_shape(case):
    return case.shape[-1:] if case.op in ROW_OPS else case.shape[1:2]


def make_arrays(case, dtype, rng):
    """x (with an offset mean), dy, weight, bias (None for rms_norm)."""
    x = rng.standard_normal(case.shape, dtype=dtype)
    x *= 2.0
    x += 0.5
    dy = rng.standard_normal(case.shape, dtype=dtype)
    pshape = _param_shape(case)
    w = (1.0 + 0.1 * rng.standard_normal(pshape)).astype(dtype)
    b = None if case.op == "rms_norm" else (0.1 * rng.standard_normal(pshape)).astype(dtype)
    return x, dy, w, b

