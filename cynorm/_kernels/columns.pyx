"""Batched-column family: statistics over an interior axis (LayerNorm2d over C of NCHW).

x is viewed as (B, M, J); the set (b, j) is the M values x[b, :, j], J apart: for each
b, a reduction over the rows of an (M, J) row-major matrix, one result per column. This
is also the set shape of channels-last layouts (x of shape (N, *spatial, C): BatchNorm's
set is a column of the (N * HW, C) matrix, B = 1). The loops run along rows, vectorised
across the contiguous columns (col_tile_moments in _common.pxd, shared with BatchNorm's
column path): no gathers, no transposes.

A work item is a tile: batch b, columns [j0, j0 + width), all M rows. Its statistics are
COL_ROWS-row blocks of per-column moments of x - x[b, 0, j] (the shift keeps the block
means small, so merging them loses nothing to the data's offset) merged pairwise in a
fixed tree (tree_merge_cols); the width
is chosen so that the tile (M rows) stays in L2 for the apply that follows, so x is read
from DRAM once. When even a narrow tile would not fit (large M), or there are fewer than
4 tiles per thread, the (block, tile) moments are shared out among the threads instead,
and the apply runs row by row (x is read twice). Each column's arithmetic is the same in
both schedules and for every width: the bits depend only on the shape.

weight and bias, when given, are per reduced index m (LayerNorm2d's (C, 1, 1)):
y[b, m, j] = (x[b, m, j] - mean[b, j]) * rstd[b, j] * weight[m] + bias[m].

The callers in cynorm._standardize validate everything; these functions trust their
arguments.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    COL_ROWS, COL_WIDTH, col_tile_moments, tree_merge_cols, inv_std, var_divisor, data,
)

import numpy as np

from cynorm._kernels import INHERITED_OPENMP_POOL

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)

cdef enum:
    # bytes of one tile (M rows of its columns) that should stay in L2 between its
    # statistics and its apply
    TILE_BYTES = 512 * 1024
    # narrowest tile: 64 columns keep the vector loops long enough
    MIN_WIDTH = 64


cdef Py_ssize_t tile_width(Py_ssize_t M, Py_ssize_t J, Py_ssize_t itemsize) noexcept nogil:
    """Columns per tile, a function of the shape alone."""
    cdef Py_ssize_t w = TILE_BYTES // (M * itemsize if M > 0 else 1)
    w = (w // MIN_WIDTH) * MIN_WIDTH
    if w < MIN_WIDTH:
        w = MIN_WIDTH
    if w > COL_WIDTH:
        w = COL_WIDTH
    return w


cdef inline void _tile_block(const floating* x, double* part, const double* shift,
                             Py_ssize_t B, Py_ssize_t M, Py_ssize_t J, Py_ssize_t b,
                             Py_ssize_t blk, Py_ssize_t j0, Py_ssize_t j1,
                             int welford) noexcept nogil:
    """Moments of rows [blk * COL_ROWS, ...) of batch b, columns [j0, j1), shifted by
    shift[b * J + j], into part: means at part[(b * n_blocks + blk) * J + j], m2
    B * n_blocks * J further on."""
    cdef Py_ssize_t n_blocks = (M + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t r0 = blk * COL_ROWS
    cdef double* pm = part + (b * n_blocks + blk) * J
    col_tile_moments(x + (b * M + r0) * J, J, 0, min(COL_ROWS, M - r0), j0, j1, welford,
                     shift + b * J, pm, pm + B * n_blocks * J,
                     max(0, min(COL_ROWS, M - r0 - COL_ROWS)))


cdef inline void _tile_shift(const floating* x, double* shift, Py_ssize_t M, Py_ssize_t J,
                             Py_ssize_t b, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """shift[b * J + j] = x[b, 0, j]: each set's first value."""
    cdef Py_ssize_t j
    for j in range(j0, j1):
        shift[b * J + j] = x[b * M * J + j]


cdef inline void _tile_merge(double* part, const double* shift, double* mean,
                             double* rstd, Py_ssize_t B, Py_ssize_t M, Py_ssize_t J,
                             Py_ssize_t b, Py_ssize_t j0, Py_ssize_t j1, double div,
                             double eps) noexcept nogil:
    """mean[b * J + j], rstd[b * J + j] for j in [j0, j1): the blocks' moments merged
    pairwise (tree_merge_cols, all the tile's columns at once; overwrites their part
    entries)."""
    cdef Py_ssize_t n_blocks = (M + COL_ROWS - 1) // COL_ROWS, j
    cdef double* pm = part + b * n_blocks * J
    cdef double* pq = pm + B * n_blocks * J
    tree_merge_cols(pm + j0, pq + j0, J, n_blocks, COL_ROWS, M, j1 - j0)
    for j in range(j0, j1):
        mean[b * J + j] = pm[j] + shift[b * J + j]
        rstd[b * J + j] = inv_std(pq[j], div, eps)


cdef inline void _apply_row(const floating* x, floating* y, const double* cm,
                            const double* cr, Py_ssize_t n, const floating* w,
                            const floating* bias, Py_ssize_t m) noexcept nogil:
    """One row (reduced index m) over n columns: y = (x - cm) * cr [* w[m] + bias[m]],
    in float64 (float32 data is widened: x - mean keeps its digits)."""
    cdef Py_ssize_t j
    cdef double wm = 1.0 if w == NULL else w[m]
    cdef double bm = 0.0 if bias == NULL else bias[m]
    if w == NULL and bias == NULL:
        for j in range(n):
            y[j] = <floating>((x[j] - cm[j]) * cr[j])
    else:
        for j in range(n):
            y[j] = <floating>((x[j] - cm[j]) * cr[j] * wm + bm)


cdef void _forward(const floating* x, floating* y, const floating* w, const floating* b,
                   double* mean, double* rstd, double* part, double* shift,
                   Py_ssize_t B, Py_ssize_t M,
                   Py_ssize_t J, double eps, double ddof, int welford,
                   int nt) noexcept nogil:
    cdef Py_ssize_t width = tile_width(M, J, sizeof(floating))
    cdef Py_ssize_t n_tiles = (J + width - 1) // width
    cdef Py_ssize_t n_blocks = (M + COL_ROWS - 1) // COL_ROWS
    cdef double div = var_divisor(M, ddof)
    cdef Py_ssize_t t, bb, j0, j1, q, r
    # fused when a tile of MIN_WIDTH columns fits in TILE_BYTES and there are enough
    # tiles for the threads (either schedule gives the same bits)
    if M * MIN_WIDTH * <Py_ssize_t>sizeof(floating) <= TILE_BYTES and B * n_tiles >= 4 * nt:
        # fused: a tile's statistics, then its apply while its rows are in L2
        for t in prange(B * n_tiles, nogil=True, num_threads=nt, schedule="static"):
            bb = t // n_tiles
            j0 = (t % n_tiles) * width
            j1 = min(j0 + width, J)
            _tile_shift(x, shift, M, J, bb, j0, j1)
            for q in range(n_blocks):
                _tile_block(x, part, shift, B, M, J, bb, q, j0, j1, welford)
            _tile_merge(part, shift, mean, rstd, B, M, J, bb, j0, j1, div, eps)
            for r in range(M):
                _apply_row(x + (bb * M + r) * J + j0, y + (bb * M + r) * J + j0,
                           mean + bb * J + j0, rstd + bb * J + j0, j1 - j0, w, b, r)
        return
    width = COL_WIDTH
    n_tiles = (J + width - 1) // width
    for t in prange(B * n_tiles, nogil=True, num_threads=nt, schedule="static"):
        bb = t // n_tiles
        j0 = (t % n_tiles) * width
        _tile_shift(x, shift, M, J, bb, j0, min(j0 + width, J))
    for t in prange(B * n_blocks * n_tiles, nogil=True, num_threads=nt, schedule="static"):
        bb = t // (n_blocks * n_tiles)
        q = (t // n_tiles) % n_blocks
        j0 = (t % n_tiles) * width
        _tile_block(x, part, shift, B, M, J, bb, q, j0, min(j0 + width, J), welford)
    for t in prange(B * n_tiles, nogil=True, num_threads=nt, schedule="static"):
        bb = t // n_tiles
        j0 = (t % n_tiles) * width
        _tile_merge(part, shift, mean, rstd, B, M, J, bb, j0, min(j0 + width, J), div,
                    eps)
    for r in prange(B * M, nogil=True, num_threads=nt, schedule="static"):
        bb = r // M
        _apply_row(x + r * J, y + r * J, mean + bb * J, rstd + bb * J, J, w, b, r - bb * M)


def forward(cnp.ndarray x, cnp.ndarray y, object weight, object bias, cnp.ndarray mean,
            cnp.ndarray rstd, Py_ssize_t B, Py_ssize_t M, Py_ssize_t J, double eps,
            double ddof, int welford):
    """Normalise x (B, M, J) over its middle axis into y; mean and rstd are (B, J)
    float64, rstd = 1 / sqrt(m2 / max(M - ddof, 0) + eps). weight, bias: (M,) or None.
    Needs B * M * J > 0."""
    cdef int nt = cynorm_threads_for(B * M * J)
    cdef Py_ssize_t n_blocks = (M + COL_ROWS - 1) // COL_ROWS
    cdef cnp.ndarray work = np.empty((2 * n_blocks + 1) * B * J, dtype=np.float64)
    cdef double* part = <double*>data(work)
    cdef double* shift = part + 2 * n_blocks * B * J
    cdef void* px = data(x)
    cdef void* py = data(y)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef bint single = cnp.PyArray_ITEMSIZE(x) == 4
    with nogil:
        if single:
            _forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, part, shift,
                     B, M, J, eps, ddof, welford, nt)
        else:
            _forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, part,
                     shift, B, M, J, eps, ddof, welford, nt)
