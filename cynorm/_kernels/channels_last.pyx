"""Channels-last family: GroupNorm and InstanceNorm (G = C) of x of shape (N, *spatial, C),
and BatchNorm in training for the widths BN_FORWARD_MIN_C..BN_MAX_C (one sample of
N * spatial rows, G = C; forward's var: the biased variance for the running statistics).

x is viewed as (N, HW, C): sample n is an (HW, C) row-major matrix, and the (n, g) set
is HW row pieces of the group's C / G contiguous channels, C apart. These are column
reductions (as BatchNorm's column path and the batched columns of standardize), so the
loops run along the rows, vectorised across the contiguous channels; no transpose.

Statistics: one pass, as the slab family's piece_moments: per channel, the float64
sums of e = x - k and e * e (k: the mean of the channel's first SHIFT_HEAD values),
each block of COL_ROWS rows summed from 0 (cn_cl_shift_sums in _cl_tiles.h: channels in
register-tiled vector lanes) and the blocks' sums added in block order; then mean =
k + S / HW, m2 = Q - S^2 / HW per channel, kept where that is as exact as the two-pass
algorithm (k within 8 standard deviations of the mean; no overflow, NaN or Inf, not
constant). A group with a channel that fails the test takes the two-pass algorithm:
per-channel moments of each block (col_tile_moments: channels in vector lanes, of x
minus the channel's first value), merged per channel pairwise (tree_merge_cols), as does
stats="welford" with Welford's blocks. The group's channels are then merged in channel
order (Chan's formula, exact up to rounding). One pass reads the data once at the float64
arithmetic's speed; the two passes took about 1.5x its time (one thread, float32: the
first pass's reads from memory, then the second's arithmetic on the block in L2).
Backward: per-channel sums of dy and dy * (x - mean) over each block, the blocks added
in order, folded per group as the slab family does. The apply and dx
run row by row with per-channel coefficients and the slab family's arithmetic per
element (the same constants give the same bits); only the order of the sums differs
from NCHW.

Work items are (sample, tile of whole groups, up to CL_WIDTH channels): the statistics,
then the apply while the tile's rows are still in L2 or L3 (fused). Tiles are whole rows
where possible: narrow tiles read strided row pieces, which the caches and prefetchers
serve worse than whole rows. Measured (one thread, float32): tiles of 40 channels of a
256-channel row sized to stay in L2 were slower than whole rows; with C loops that keep
the apply's constants in registers across a band's rows (_cl_tiles.h), bands of 16 to
128 channels over all rows of (8, 3136, 256) took 1.3-1.6x whole rows' time, the apply
most (a power-of-two row stride puts a band's rows in a fraction of L2's sets, so the
band does not stay there), and the two 256-channel halves of (1, 16384, 512), which fit
in L3 where its whole rows do not, 2.1x. So a sample's rows are read from memory by
the statistics and again (from L3 when the sample fits there) by the apply
(benchmarks/results/channels_last*.txt). With several threads, a batch that the
threads do not divide evenly, fewer than 4 items per thread (or pieces under 256
channels), and at least 4 row blocks, the row blocks are shared out among the threads instead and the apply is a pass
of its own: the blocks' sums (each thread a contiguous run of blocks), their fold per
channel (pieces of FOLD_COLS contiguous channels, block by block), the groups, then the
apply over nt equal spans of the N * HW rows (the constants formed once per span and
sample). Each column's arithmetic is the same in both
schedules and for every tile width: the bits depend only on the shape.

Storage dtypes (see _common.pxd): x, y, dy, dx of any storage (float64, float32,
float16, bfloat16), parameters float32 for all but float64 data. 16-bit data are read
in place: the one-pass sums and the apply widen (and narrow) in registers (_cl_tiles.h;
staged float32 row pieces with an activation, or where a set needs the float64 xhat),
the two-pass column moments staged row blocks, the backward's column sums and dx in
registers (_lanes.h: cn_cl_grad_T, the one dx loop of float32 and 16-bit data; staged
row pieces where a set needs the float64 xhat; with an activation, g = dy * act'(a) is
kept in a float32 buffer, formed on widened row pieces), with the
float32 data's arithmetic, rounded once on store; so a 16-bit
result is bitwise the float32 result on the widened data, rounded once.

The callers in cynorm._api validate everything; these functions trust their arguments:
C-contiguous arrays of one storage dtype, statistics float64 of shape (N, G).
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange, threadid

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    COL_ROWS, col_tile_moments, col_grad_sums, fold_param_grads, tree_merge_cols,
    MERGE_COLS, chan_merge,
    inv_std, f32_xhat_ok, split_mean, act_run, data, storage, storage_kind, widen, narrow,
    ld, cn_f16, cn_bf16, KIND_F64, KIND_F32, KIND_F16,
)
from cynorm._kernels._common cimport cn_cl_affine_f16, cn_cl_affine_bf16
from cynorm._kernels._common cimport cn_cl_apply_f32, cn_cl_apply_f16, cn_cl_apply_bf16
from cynorm._kernels._common cimport (
    cn_cl_shift_sums_f32, cn_cl_shift_sums_f64, cn_cl_shift_sums_f16, cn_cl_shift_sums_bf16,
)
from cynorm._kernels._common cimport cn_act_f32, cn_act_grad_f32, cn_act_grad_f64
from cynorm._kernels._common cimport cn_col_grad_rows_g32_f16, cn_col_grad_rows_g32_bf16
from cynorm._kernels._common cimport SHIFT_SPREAD, SHIFT_HEAD
from libc.float cimport DBL_MAX

cdef extern from "_cl_tiles.h":
    void cn_cl_grad_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                        const float* mh, const float* ml, const float* rf, const float* wf,
                        const float* gf, const float* kf) noexcept nogil
    void cn_cl_grad_f16(const cn_f16* dy, const cn_f16* x, cn_f16* dx, Py_ssize_t n,
                        const float* mh, const float* ml, const float* rf, const float* wf,
                        const float* gf, const float* kf) noexcept nogil
    void cn_cl_grad_bf16(const cn_bf16* dy, const cn_bf16* x, cn_bf16* dx, Py_ssize_t n,
                         const float* mh, const float* ml, const float* rf,
                         const float* wf, const float* gf, const float* kf) noexcept nogil
    void cn_cl_grad_g32_f16(const float* g, const cn_f16* x, cn_f16* dx, Py_ssize_t n,
                            const float* mh, const float* ml, const float* rf,
                            const float* wf, const float* gf, const float* kf) noexcept nogil
    void cn_cl_grad_g32_bf16(const float* g, const cn_bf16* x, cn_bf16* dx, Py_ssize_t n,
                             const float* mh, const float* ml, const float* rf,
                             const float* wf, const float* gf,
                             const float* kf) noexcept nogil

import numpy as np

from cynorm._kernels import INHERITED_OPENMP_POOL

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)

cdef enum:
    # channels per coefficient sub-tile (the per-channel constants live on the stack)
    CL_WIDTH = 512
    # channels per work item of the split schedule's fold of the block sums (two cache
    # lines of float64 per block; 64 channels still make 4 items)
    FOLD_COLS = 16

# BatchNorm channels-last in training (cynorm._api) runs this family's kernels, one
# sample of N * spatial rows with G = C, where they beat the channel family's column
# path: C up to CL_WIDTH (whole rows in one tile), the forward from 32 channels on.
# Measured (one thread, about 4M values, float32 and bfloat16): forward 0.4-0.8x the
# column path's time for C = 32-512, but 1.4-2.6x for C = 4-20 (a row-at-a-time apply
# and one-pass sums over rows a vector wide or less); backward 0.45-0.75x for C = 4-512;
# C = 640 (tiles of part of a row) 1.4-1.6x forward and backward.
BN_FORWARD_MIN_C = 32
BN_MAX_C = CL_WIDTH


# ---- per-channel coefficients and the row loops ------------------------------------

ctypedef struct AffineCoefs:
    # channels [c0, c0 + n) of one sample: y = ((x - m) * r) * w + b (float64 data),
    # the slab family's float32 form from mh, ml, rf, wf, bf where ok (f32_xhat_ok);
    # act: the activation (the backward's recomputation)
    int all_ok
    int act
    double m[CL_WIDTH]
    double r[CL_WIDTH]
    double w[CL_WIDTH]
    double b[CL_WIDTH]
    float mh[CL_WIDTH]
    float ml[CL_WIDTH]
    float rf[CL_WIDTH]
    float wf[CL_WIDTH]
    float bf[CL_WIDTH]
    unsigned char ok[CL_WIDTH]


cdef inline void _affine_coefs(AffineCoefs* k, const double* mean, const double* rstd,
                               const floating* w, const floating* b, Py_ssize_t c0,
                               Py_ssize_t c1, Py_ssize_t cpg) noexcept nogil:
    """The constants of channels [c0, c1) of one sample (mean, rstd: its G groups')."""
    cdef Py_ssize_t c, j, s
    k.all_ok = 1
    for c in range(c0, c1):
        j = c - c0
        s = c // cpg
        k.m[j] = mean[s]
        k.r[j] = rstd[s]
        k.w[j] = 1.0 if w == NULL else w[c]
        k.b[j] = 0.0 if b == NULL else b[c]
        # the float32 form (float32 and 16-bit data; unused for float64 data)
        split_mean(mean[s], &k.mh[j], &k.ml[j])
        k.rf[j] = <float>rstd[s]
        k.wf[j] = <float>k.w[j]
        k.bf[j] = <float>k.b[j]
        k.ok[j] = f32_xhat_ok(rstd[s])
        if not k.ok[j]:
            k.all_ok = 0


cdef inline void _affine_row(const floating* x, floating* y, Py_ssize_t n,
                             const AffineCoefs* k) noexcept nogil:
    """y = ((x - mean) * rstd) * weight + bias over n channels of one row, element by
    element as the slab family's affine (_affine_span in _common.pxd). y may be x.
    float32: the float32 form (16-bit data run it on their widened values)."""
    cdef Py_ssize_t j
    cdef const float* mh = k.mh
    cdef const float* ml = k.ml
    cdef const float* rf = k.rf
    cdef const float* wf = k.wf
    cdef const float* bf = k.bf
    cdef const double* m = k.m
    cdef const double* r = k.r
    cdef const double* wd = k.w
    cdef const double* bd = k.b
    if floating is float:
        if k.all_ok:
            for j in range(n):
                y[j] = (((x[j] - mh[j]) - ml[j]) * rf[j]) * wf[j] + bf[j]
        else:
            for j in range(n):
                if k.ok[j]:
                    y[j] = (((x[j] - mh[j]) - ml[j]) * rf[j]) * wf[j] + bf[j]
                else:
                    y[j] = <float>((x[j] - m[j]) * r[j]) * wf[j] + bf[j]
    else:
        for j in range(n):
            y[j] = ((x[j] - m[j]) * r[j]) * wd[j] + bd[j]


cdef inline void _affine_act_row(const storage* x, storage* y, Py_ssize_t n,
                                 const AffineCoefs* k, int act) noexcept nogil:
    """_affine_row, then the activation act, over n (at most CL_WIDTH) channels of one
    row. 16-bit data: both on the widened row piece in float32, rounded once on store
    (as the slab family's affine_act)."""
    cdef float buf[CL_WIDTH]
    if storage is float or storage is double:
        _affine_row(x, y, n, k)
        if act:
            act_run(y, n, act)
    elif k.all_ok and not act:
        # widened and narrowed in registers: the same operations, no staged copy
        if storage is cn_f16:
            cn_cl_affine_f16(x, y, n, k.mh, k.ml, k.rf, k.wf, k.bf)
        else:
            cn_cl_affine_bf16(x, y, n, k.mh, k.ml, k.rf, k.wf, k.bf)
    else:
        widen(x, buf, n)
        _affine_row(<const float*>buf, buf, n, k)
        if act:
            cn_act_f32(buf, buf, n, act)
        narrow(buf, y, n)


cdef inline void _apply_rows(const storage* x, storage* y, Py_ssize_t C, Py_ssize_t nrows,
                             Py_ssize_t n, const AffineCoefs* k) noexcept nogil:
    """_affine_row's float32 form (every channel ok) over nrows rows of n channels."""
    if storage is float:
        cn_cl_apply_f32(x, y, C, nrows, n, k.mh, k.ml, k.rf, k.wf, k.bf)
    elif storage is cn_f16:
        cn_cl_apply_f16(x, y, C, nrows, n, k.mh, k.ml, k.rf, k.wf, k.bf)
    elif storage is cn_bf16:
        cn_cl_apply_bf16(x, y, C, nrows, n, k.mh, k.ml, k.rf, k.wf, k.bf)


cdef void _apply(const storage* x, storage* y, const floating* w, const floating* b,
                 const double* mean, const double* rstd, Py_ssize_t HW, Py_ssize_t C,
                 Py_ssize_t cpg, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                 Py_ssize_t c1, int act) noexcept nogil:
    """Rows [r0, r1), channels [c0, c1) of one sample (x, y at the sample; mean, rstd
    its groups'): the affine, then the activation act on each row's piece."""
    cdef AffineCoefs k
    cdef Py_ssize_t s0, s1, r
    cdef bint tiled
    s0 = c0
    while s0 < c1:
        s1 = min(s0 + CL_WIDTH, c1)
        _affine_coefs(&k, mean, rstd, w, b, s0, s1, cpg)
        tiled = k.all_ok and not act
        if storage is double:
            tiled = False
        if tiled:
            # the float32 form with the constants in registers across rows (_cl_tiles.h)
            _apply_rows(x + r0 * C + s0, y + r0 * C + s0, C, r1 - r0, s1 - s0, &k)
        else:
            for r in range(r0, r1):
                _affine_act_row(x + r * C + s0, y + r * C + s0, s1 - s0, &k, act)
        s0 = s1


# ---- statistics ------------------------------------------------------------------------

cdef inline void _block_moments(const storage* xs, const double* shift, double* pm,
                                double* pq, Py_ssize_t HW, Py_ssize_t C, Py_ssize_t blk,
                                Py_ssize_t c0, Py_ssize_t c1, int welford) noexcept nogil:
    """Moments of rows [blk * COL_ROWS, ...) of channels [c0, c1) of one sample xs,
    shifted by shift[c], into pm[c], pq[c]."""
    cdef Py_ssize_t r0 = blk * COL_ROWS, r1 = min(r0 + COL_ROWS, HW)
    # the next block's rows prefetched during this one's second pass
    col_tile_moments(xs, C, r0, r1, c0, c1, welford, shift, pm, pq, min(COL_ROWS, HW - r1))


cdef inline void _channel_merge(double* pm, double* pq, Py_ssize_t stride, Py_ssize_t nb,
                                Py_ssize_t HW, const double* shift,
                                Py_ssize_t n) noexcept nogil:
    """n adjacent channels' nb block moments (block q at pm[q * stride + j]) merged
    pairwise into pm[j], pq[j] (tree_merge_cols: the same bits as tree_merge per channel,
    a vector of channels at a time); the means made absolute."""
    cdef Py_ssize_t j
    tree_merge_cols(pm, pq, stride, nb, COL_ROWS, HW, n)
    for j in range(n):
        pm[j] += shift[j]


cdef inline double* _at(double* p, Py_ssize_t i) noexcept nogil:
    """p + i, or NULL for an absent output p."""
    return NULL if p == NULL else p + i


cdef inline void _group_stats(const double* cm, const double* cq, Py_ssize_t cpg,
                              Py_ssize_t HW, double eps, double* mean, double* rstd,
                              double* var) noexcept nogil:
    """One group's mean and rstd (and, var not NULL, its biased variance m2 / count)
    from its channels' moments cm[j], cq[j] (HW values each), merged in channel
    order."""
    cdef double cnt = 0, m = 0, q = 0
    cdef Py_ssize_t j
    for j in range(cpg):
        chan_merge(&cnt, &m, &q, <double>HW, cm[j], cq[j])
    mean[0] = m
    rstd[0] = inv_std(q, <double>(cpg * HW), eps)
    if var != NULL:
        var[0] = q / <double>(cpg * HW)


cdef inline double _shift(const storage* xs, Py_ssize_t HW, Py_ssize_t C,
                          Py_ssize_t c) noexcept nogil:
    """The one-pass shift of column c of one sample: the mean of its first SHIFT_HEAD
    values (all when fewer), rounded to float32 unless the data are float64 (then x - k
    is exact in float64), as the slab family's piece_moments takes it."""
    cdef Py_ssize_t h = HW if HW < SHIFT_HEAD else SHIFT_HEAD, r
    cdef double m = 0
    for r in range(h):
        m += ld(xs, r * C + c)
    m = m / h
    if storage is not double:
        m = <float>m
    return m


cdef inline void _shift_sums(const storage* xs, Py_ssize_t HW, Py_ssize_t C,
                             Py_ssize_t blk, Py_ssize_t c0, Py_ssize_t c1, const double* k,
                             double* d, double* q) noexcept nogil:
    """Block blk's one-pass sums of channels [c0, c1) of one sample xs: d[j] = sum(e),
    q[j] = sum(e * e), e = x - k[j] (j = c - c0), each column from 0, row by row."""
    cdef Py_ssize_t r0 = blk * COL_ROWS, r1 = min(r0 + COL_ROWS, HW), j, n = c1 - c0
    cdef Py_ssize_t pf = min(COL_ROWS, HW - r1)
    for j in range(n):
        d[j] = 0
        q[j] = 0
    if storage is float:
        cn_cl_shift_sums_f32(xs + r0 * C + c0, C, r1 - r0, n, k, d, q, pf)
    elif storage is double:
        cn_cl_shift_sums_f64(xs + r0 * C + c0, C, r1 - r0, n, k, d, q, pf)
    elif storage is cn_f16:
        cn_cl_shift_sums_f16(xs + r0 * C + c0, C, r1 - r0, n, k, d, q, pf)
    else:
        cn_cl_shift_sums_bf16(xs + r0 * C + c0, C, r1 - r0, n, k, d, q, pf)


cdef inline void _one_pass_moments(double k, double s, double q, Py_ssize_t HW,
                                   double* cm, double* cq) noexcept nogil:
    """A channel's mean cm and m2 cq from its shifted sums s, q (all HW values), where
    the one pass is as exact as the two-pass algorithm (the slab family's test,
    piece_moments: k within 8 standard deviations of the mean, no overflow, no squares
    lost below the normal range, not constant); else cq = -1, for the two-pass
    algorithm (m2 is never negative otherwise)."""
    cdef double c = <double>HW, dd = s * s / c
    if q <= DBL_MAX and q >= c * 9.332636185032189e-302 and (
            (SHIFT_SPREAD + 1) * dd <= SHIFT_SPREAD * q):
        cm[0] = k + s / c
        cq[0] = q - dd
    else:
        cm[0] = 0
        cq[0] = -1


cdef void _two_pass_channels(const storage* xs, double* sh, double* pm, double* pq,
                             Py_ssize_t stride, Py_ssize_t HW, Py_ssize_t C,
                             Py_ssize_t c0, Py_ssize_t c1, double* cm,
                             double* cq) noexcept nogil:
    """The two-pass moments of channels [c0, c1) of one sample (per-block corrected
    two-pass, merged pairwise: col_tile_moments, tree_merge_cols) into cm[j], cq[j];
    sh[j], pm[q * stride + j], pq[...]: workspace for j < c1 - c0 and nb blocks q."""
    cdef Py_ssize_t j, blk, nb = (HW + COL_ROWS - 1) // COL_ROWS
    for j in range(c1 - c0):
        sh[j] = ld(xs, c0 + j)
    for blk in range(nb):
        _block_moments(xs, sh - c0, pm + blk * stride - c0, pq + blk * stride - c0, HW, C,
                       blk, c0, c1, 0)
    _channel_merge(pm, pq, stride, nb, HW, sh, c1 - c0)
    for j in range(c1 - c0):
        cm[j] = pm[j]
        cq[j] = pq[j]


cdef void _one_pass_item(const storage* xs, double* buf, Py_ssize_t HW, Py_ssize_t C,
                         Py_ssize_t G, Py_ssize_t g0, Py_ssize_t g1, Py_ssize_t wmax,
                         double eps, double* mean, double* rstd,
                         double* var) noexcept nogil:
    """Groups [g0, g1) of one sample xs (mean, rstd, var: the sample's): the one-pass
    statistics per channel, the two-pass algorithm for a group where one of its
    channels fails the one pass's test. buf: (3 + 2 * max(nb, 2)) * wmax doubles."""
    cdef Py_ssize_t cpg = C // G, c0 = g0 * cpg, c1 = g1 * cpg, n = c1 - c0, j, blk, g
    cdef Py_ssize_t nb = (HW + COL_ROWS - 1) // COL_ROWS
    cdef double* cm = buf
    cdef double* cq = buf + wmax
    cdef double* ws = buf + 2 * wmax
    cdef double* k = ws
    cdef double* S = ws + wmax
    cdef double* Q = ws + 2 * wmax
    cdef double* ps = ws + 3 * wmax
    cdef double* pq = ws + 4 * wmax
    cdef bint ok
    for j in range(n):
        k[j] = _shift(xs, HW, C, c0 + j)
        S[j] = 0
        Q[j] = 0
    for blk in range(nb):
        _shift_sums(xs, HW, C, blk, c0, c1, k, ps, pq)
        for j in range(n):
            S[j] = S[j] + ps[j]
            Q[j] = Q[j] + pq[j]
    for j in range(n):
        _one_pass_moments(k[j], S[j], Q[j], HW, &cm[j], &cq[j])
    for g in range(g0, g1):
        ok = True
        for j in range((g - g0) * cpg, (g - g0 + 1) * cpg):
            if cq[j] < 0:
                ok = False
        if not ok:
            _two_pass_channels(xs, ws, ws + wmax, ws + wmax + nb * wmax, wmax, HW, C,
                               g * cpg, (g + 1) * cpg, cm + (g - g0) * cpg,
                               cq + (g - g0) * cpg)
        _group_stats(cm + (g - g0) * cpg, cq + (g - g0) * cpg, cpg, HW, eps, &mean[g],
                     &rstd[g], _at(var, g))


cdef void _split_group(const storage* xs, double* sh, double* pm, double* pq, double* cm,
                       double* cq, Py_ssize_t HW, Py_ssize_t C, Py_ssize_t g,
                       Py_ssize_t cpg, double eps, double* mean, double* rstd,
                       double* var) noexcept nogil:
    """The split schedule's statistics of group g of one sample xs from its channels'
    one-pass sums cm[c], cq[c] (the blocks' sums added in block order, _fold_blocks;
    sh[c] the shifts): the one pass's test, the two-pass algorithm where a channel
    fails it (in the group's block slots, block q of channel c at pm[q * C + c],
    pq[...], free by then), the group's mean and rstd; cm[c], cq[c] become the
    channels' moments."""
    cdef Py_ssize_t c0 = g * cpg, c
    cdef bint ok = True
    for c in range(c0, c0 + cpg):
        _one_pass_moments(sh[c], cm[c], cq[c], HW, &cm[c], &cq[c])
        if cq[c] < 0:
            ok = False
    if not ok:
        _two_pass_channels(xs, sh + c0, pm + c0, pq + c0, C, HW, C, c0, c0 + cpg, cm + c0,
                           cq + c0)
    _group_stats(cm + c0, cq + c0, cpg, HW, eps, mean, rstd, var)


cdef void _fused_item(const storage* x, storage* y, const floating* w,
                      const floating* b, double* mean, double* rstd, double* var,
                      double* buf, Py_ssize_t HW, Py_ssize_t C, Py_ssize_t G, Py_ssize_t n,
                      Py_ssize_t g0, Py_ssize_t g1, Py_ssize_t nb, Py_ssize_t wmax,
                      double eps, int welford, int act) noexcept nogil:
    """Sample n, groups [g0, g1): statistics, then the apply while the rows are in L2.
    buf: this thread's (1 + 2 * nb) * wmax doubles."""
    cdef Py_ssize_t cpg = C // G, c0 = g0 * cpg, c1 = g1 * cpg, j, blk, g
    cdef const storage* xs = x + n * HW * C
    cdef double* sh = buf
    cdef double* pm = buf + wmax
    cdef double* pq = pm + nb * wmax
    if not welford:
        _one_pass_item(xs, buf, HW, C, G, g0, g1, wmax, eps, mean + n * G, rstd + n * G,
                       _at(var, n * G))
        if y != NULL:
            _apply(xs, y + n * HW * C, w, b, mean + n * G, rstd + n * G, HW, C, cpg, 0,
                   HW, c0, c1, act)
        return
    for j in range(c1 - c0):
        sh[j] = ld(xs, c0 + j)
    for blk in range(nb):
        _block_moments(xs, sh - c0, pm + blk * wmax - c0, pq + blk * wmax - c0, HW, C,
                       blk, c0, c1, welford)
    _channel_merge(pm, pq, wmax, nb, HW, sh, c1 - c0)
    for g in range(g0, g1):
        _group_stats(pm + (g - g0) * cpg, pq + (g - g0) * cpg, cpg, HW, eps,
                     &mean[n * G + g], &rstd[n * G + g], _at(var, n * G + g))
    if y != NULL:
        _apply(xs, y + n * HW * C, w, b, mean + n * G, rstd + n * G, HW, C, cpg, 0, HW,
               c0, c1, act)


cdef void _forward(const storage* x, storage* y, const floating* w, const floating* b,
                   double* mean, double* rstd, double* var, double* buf, Py_ssize_t N,
                   Py_ssize_t HW,
                   Py_ssize_t C, Py_ssize_t G, Py_ssize_t gpt, bint fused, double eps,
                   int welford, int act, int nt) noexcept nogil:
    """fused: work items (sample, gpt groups), buf per thread (_work_size); else the
    split schedule, buf (3 + 2 * nb) * N * C doubles."""
    cdef Py_ssize_t cpg = C // G, nb = (HW + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t n_tiles = (G + gpt - 1) // gpt, wmax = gpt * cpg
    cdef Py_ssize_t nct = (C + CL_WIDTH - 1) // CL_WIDTH, nfc
    cdef Py_ssize_t t, n, g0, blk, j0, i, r0, r1
    cdef double* sh = buf
    cdef double* pm = buf + N * C
    cdef double* pq = pm + N * nb * C
    cdef double* cm = pq + N * nb * C
    cdef double* cq = cm + N * C
    if fused:
        for t in prange(N * n_tiles, nogil=True, num_threads=nt, schedule="static"):
            g0 = (t % n_tiles) * gpt
            _fused_item(x, y, w, b, mean, rstd, var,
                        buf + threadid() * (3 + 2 * max(nb, 2)) * wmax, HW, C, G,
                        t // n_tiles, g0, min(g0 + gpt, G), nb, wmax, eps, welford, act)
        return
    if not welford:
        # split, one pass: each block's shifted sums (from 0), folded per channel in
        # block order as a fused item folds them (_fold_blocks: pieces of FOLD_COLS
        # channels), then per group (_split_group) the two-pass algorithm where the one
        # pass's test fails: the fused items' bits. Each parallel region ends in a
        # barrier
        for i in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
            sh[i] = _shift(x + (i // C) * HW * C, HW, C, i % C)
        for t in prange(N * nb * nct, nogil=True, num_threads=nt, schedule="static"):
            n = t // (nb * nct)
            blk = (t // nct) % nb
            j0 = (t % nct) * CL_WIDTH
            _shift_sums(x + n * HW * C, HW, C, blk, j0, min(j0 + CL_WIDTH, C),
                        sh + n * C + j0, pm + (n * nb + blk) * C + j0,
                        pq + (n * nb + blk) * C + j0)
        nfc = (C + FOLD_COLS - 1) // FOLD_COLS
        for t in prange(N * nfc, nogil=True, num_threads=nt, schedule="static"):
            _fold_blocks(pm + (t // nfc) * nb * C, pq + (t // nfc) * nb * C, C, nb,
                         (t % nfc) * FOLD_COLS, min((t % nfc + 1) * FOLD_COLS, C),
                         cm + (t // nfc) * C, cq + (t // nfc) * C)
        for i in prange(N * G, nogil=True, num_threads=nt, schedule="static"):
            _split_group(x + (i // G) * HW * C, sh + (i // G) * C, pm + (i // G) * nb * C,
                         pq + (i // G) * nb * C, cm + (i // G) * C, cq + (i // G) * C, HW,
                         C, i % G, C // G, eps, &mean[i], &rstd[i], _at(var, i))
    else:
        _split_two_pass(x, sh, pm, pq, N, HW, C, G, eps, mean, rstd, var, nt)
    if y == NULL:
        return
    # the apply: the batch's N * HW rows in nt equal spans, one per thread, each span's
    # constants computed once per sample it meets (not once per few rows)
    for t in prange(nt, nogil=True, num_threads=nt, schedule="static"):
        r0 = t * (N * HW) // nt
        r1 = (t + 1) * (N * HW) // nt
        while r0 < r1:
            n = r0 // HW
            j0 = min(r1, (n + 1) * HW)
            _apply(x + n * HW * C, y + n * HW * C, w, b, mean + n * G, rstd + n * G, HW,
                   C, cpg, r0 - n * HW, j0 - n * HW, 0, C, act)
            r0 = j0


cdef void _split_two_pass(const storage* x, double* sh, double* pm, double* pq,
                          Py_ssize_t N, Py_ssize_t HW, Py_ssize_t C, Py_ssize_t G,
                          double eps, double* mean, double* rstd, double* var,
                          int nt) noexcept nogil:
    """The split schedule's Welford statistics: row blocks of every sample shared out,
    block-major within a sample, merged pairwise per channel, then per group."""
    cdef Py_ssize_t cpg = C // G, nb = (HW + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t nct = (C + CL_WIDTH - 1) // CL_WIDTH, nmc, t, n, blk, j0, i
    for i in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
        sh[i] = ld(x, (i // C) * HW * C + i % C)
    for t in prange(N * nb * nct, nogil=True, num_threads=nt, schedule="static"):
        n = t // (nb * nct)
        blk = (t // nct) % nb
        j0 = (t % nct) * CL_WIDTH
        _block_moments(x + n * HW * C, sh + n * C, pm + (n * nb + blk) * C,
                       pq + (n * nb + blk) * C, HW, C, blk, j0, min(j0 + CL_WIDTH, C), 1)
    nmc = (C + MERGE_COLS - 1) // MERGE_COLS
    for t in prange(N * nmc, nogil=True, num_threads=nt, schedule="static"):
        n = t // nmc
        j0 = (t % nmc) * MERGE_COLS
        _channel_merge(pm + n * nb * C + j0, pq + n * nb * C + j0, C, nb, HW,
                       sh + n * C + j0, min(MERGE_COLS, C - j0))
    for i in prange(N * G, nogil=True, num_threads=nt, schedule="static"):
        _group_stats(pm + (i // G) * nb * C + (i % G) * cpg,
                     pq + (i // G) * nb * C + (i % G) * cpg, cpg, HW, eps, &mean[i],
                     &rstd[i], _at(var, i))


cdef Py_ssize_t _groups_per_tile(Py_ssize_t N, Py_ssize_t C, Py_ssize_t G,
                                 int nt) noexcept nogil:
    """Groups per fused work item: whole rows of up to CL_WIDTH channels (at least one
    group), fewer when that gives several threads 4 items each, unless the samples
    divide evenly among the threads (then every thread has the same work already)."""
    cdef Py_ssize_t cpg = C // G, need, gpt
    gpt = CL_WIDTH // cpg
    if gpt > G:
        gpt = G
    if gpt < 1:
        gpt = 1
    need = (4 * nt + N - 1) // N  # tiles per sample for 4 items per thread
    if nt > 1 and N % nt != 0 and (G + gpt - 1) // gpt < need:
        gpt = G // need
    return gpt if gpt > 1 else 1


cdef inline bint _fuse(Py_ssize_t N, Py_ssize_t HW, Py_ssize_t C, Py_ssize_t G,
                       Py_ssize_t gpt, int nt) noexcept nogil:
    """Whether the fused items are the schedule: one thread, or the samples divide
    evenly among the threads (each thread whole samples, the same work, one parallel
    region), or 4 items per thread, each reading row pieces of at least 256 channels (or
    whole rows); else the split schedule, when there are at least 4 row blocks to share
    out (its per-block moments then stay within 1/16 of a float32 input)."""
    cdef Py_ssize_t width = gpt * (C // G)
    if (HW + COL_ROWS - 1) // COL_ROWS < 4:
        return True
    return nt == 1 or N % nt == 0 or (N * ((G + gpt - 1) // gpt) >= 4 * nt and
                                      width >= min(C, 256))


def forward(cnp.ndarray x, cnp.ndarray y, object weight, object bias, cnp.ndarray mean,
            cnp.ndarray rstd, Py_ssize_t N, Py_ssize_t HW, Py_ssize_t C, Py_ssize_t G,
            double eps, int welford, int act=0, object var=None):
    """Normalise x (N, HW, C) over G groups of channels into y (None: the statistics
    alone); write mean and rstd (N * G float64), and var (N * G float64, the biased
    variance; BatchNorm's running statistics) when given. act: the activation applied
    to the affine's output (codes as in slab.forward)."""
    if N * G == 0:
        return
    if HW * C == 0:  # empty sets: the statistics of no values, as the slab family's
        mean.fill(0.0)
        rstd.fill(np.nan)
        if var is not None:
            var.fill(np.nan)
        return
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef Py_ssize_t nb = (HW + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t gpt = _groups_per_tile(N, C, G, nt)
    cdef bint fused = _fuse(N, HW, C, G, gpt, nt)
    cdef Py_ssize_t size = nt * (3 + 2 * max(nb, 2)) * gpt * (C // G) if fused else (
        (3 + 2 * nb) * N * C)
    cdef cnp.ndarray work = np.empty(size, dtype=np.float64)
    cdef double* buf = <double*>data(work)
    cdef void* px = data(x)
    cdef void* py = data(y)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef double* pv = <double*>data(var)
    cdef int kind = storage_kind(x)
    with nogil:
        if kind == KIND_F32:
            _forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, pv, buf, N,
                     HW, C, G, gpt, fused, eps, welford, act, nt)
        elif kind == KIND_F64:
            _forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, pv, buf,
                     N, HW, C, G, gpt, fused, eps, welford, act, nt)
        elif kind == KIND_F16:
            _forward(<cn_f16*>px, <cn_f16*>py, <float*>pw, <float*>pb, pm, pr, pv, buf,
                     N, HW, C, G, gpt, fused, eps, welford, act, nt)
        else:
            _forward(<cn_bf16*>px, <cn_bf16*>py, <float*>pw, <float*>pb, pm, pr, pv, buf,
                     N, HW, C, G, gpt, fused, eps, welford, act, nt)


# ---- backward --------------------------------------------------------------------------

ctypedef union floating_a_buf:
    # a row piece's pre-activation, float32 (float32 and 16-bit data) or float64
    float f[CL_WIDTH]
    double d[CL_WIDTH]


ctypedef struct GradCoefs:
    # channels [c0, c0 + n) of one sample: dx = r * ((w * dy - g) - ((x - m) * r) * k)
    # (float64 data), the slab family's float32 form (grad_const) where ok
    int all_ok
    double m[CL_WIDTH]
    double r[CL_WIDTH]
    double w[CL_WIDTH]
    double g[CL_WIDTH]
    double k[CL_WIDTH]
    float mh[CL_WIDTH]
    float ml[CL_WIDTH]
    float rf[CL_WIDTH]
    float wf[CL_WIDTH]
    float gf[CL_WIDTH]
    float kf[CL_WIDTH]
    unsigned char ok[CL_WIDTH]


cdef inline void _grad_coefs(GradCoefs* k, const double* mean, const double* rstd,
                             const double* gc, const floating* w, Py_ssize_t c0,
                             Py_ssize_t c1, Py_ssize_t cpg) noexcept nogil:
    """dx's constants of channels [c0, c1) of one sample; gc[2 s], gc[2 s + 1]: group
    s's mean(g) and mean(g * xhat)."""
    cdef Py_ssize_t c, j, s
    k.all_ok = 1
    for c in range(c0, c1):
        j = c - c0
        s = c // cpg
        k.m[j] = mean[s]
        k.r[j] = rstd[s]
        k.w[j] = 1.0 if w == NULL else w[c]
        k.g[j] = gc[2 * s]
        k.k[j] = gc[2 * s + 1]
        # the float32 form (float32 and 16-bit data; unused for float64 data)
        k.ok[j] = f32_xhat_ok(rstd[s])
        if not k.ok[j]:
            k.all_ok = 0
        split_mean(mean[s], &k.mh[j], &k.ml[j])
        k.rf[j] = <float>rstd[s]
        k.wf[j] = <float>k.w[j]
        k.gf[j] = <float>k.g[j]
        k.kf[j] = <float>k.k[j]


cdef inline void _grad_row(const floating* dy, const floating* x, floating* dx,
                           Py_ssize_t n, const GradCoefs* k) noexcept nogil:
    """dx over n channels of one row, element by element as grad_const (_common.pxd):
    float32, the float32 form where a channel is ok, else the float64 one (a piece whose
    channels are all ok takes cn_cl_grad_T instead: _grad_row_s)."""
    cdef Py_ssize_t j
    cdef const float* mh = k.mh
    cdef const float* ml = k.ml
    cdef const float* rf = k.rf
    cdef const float* wf = k.wf
    cdef const float* gf = k.gf
    cdef const float* kf = k.kf
    cdef const double* m = k.m
    cdef const double* r = k.r
    cdef const double* wd = k.w
    cdef const double* g = k.g
    cdef const double* kd = k.k
    if floating is float:
        for j in range(n):
            if k.ok[j]:
                dx[j] = (((wf[j] * dy[j] - gf[j]) - (((x[j] - mh[j]) - ml[j]) * rf[j]) * kf[j])
                         * rf[j])
            else:
                dx[j] = <float>(r[j] * ((wd[j] * dy[j] - g[j]) - ((x[j] - m[j]) * r[j]) * kd[j]))
    else:
        for j in range(n):
            dx[j] = r[j] * ((wd[j] * dy[j] - g[j]) - ((x[j] - m[j]) * r[j]) * kd[j])


cdef inline void _grad_row_s(const storage* dy, const float* g32, const storage* x,
                             storage* dx, Py_ssize_t n, const GradCoefs* k) noexcept nogil:
    """_grad_row over n (at most CL_WIDTH) channels. Every channel ok (float32 and
    16-bit data): the float32 form, 16-bit data widened and narrowed in registers
    (cn_cl_grad_T, one loop for every storage); else 16-bit data in float32 on the
    widened row pieces, rounded once on store (as the slab family's grad_const).
    g32 (16-bit data, not NULL): the float32 g of a backward with an activation, read
    in dy's place."""
    cdef float bdy[CL_WIDTH]
    cdef float bx[CL_WIDTH]
    if storage is double:
        _grad_row(dy, x, dx, n, k)
    elif (storage is cn_f16 or storage is cn_bf16) and g32 != NULL:
        if k.all_ok:
            if storage is cn_f16:
                cn_cl_grad_g32_f16(g32, x, dx, n, k.mh, k.ml, k.rf, k.wf, k.gf, k.kf)
            else:
                cn_cl_grad_g32_bf16(g32, x, dx, n, k.mh, k.ml, k.rf, k.wf, k.gf, k.kf)
        else:
            widen(x, bx, n)
            _grad_row(g32, <const float*>bx, bdy, n, k)
            narrow(bdy, dx, n)
    elif k.all_ok:
        if storage is float:
            cn_cl_grad_f32(dy, x, dx, n, k.mh, k.ml, k.rf, k.wf, k.gf, k.kf)
        elif storage is cn_f16:
            cn_cl_grad_f16(dy, x, dx, n, k.mh, k.ml, k.rf, k.wf, k.gf, k.kf)
        else:
            cn_cl_grad_bf16(dy, x, dx, n, k.mh, k.ml, k.rf, k.wf, k.gf, k.kf)
    elif storage is float:
        _grad_row(dy, x, dx, n, k)
    else:
        widen(dy, bdy, n)
        widen(x, bx, n)
        _grad_row(<const float*>bdy, <const float*>bx, bdy, n, k)
        narrow(bdy, dx, n)


cdef inline void _act_grad_row(const storage* dy, const storage* x, void* g,
                               Py_ssize_t n, const AffineCoefs* kk) noexcept nogil:
    """g = dy * act'(a) over n (at most CL_WIDTH) channels of one row, a the forward's
    pre-activation recomputed with its arithmetic (_affine_act_row). g: double for
    float64 data, else float (16-bit data: computed in float32 on the widened row
    pieces and kept in float32, as on float32 data)."""
    cdef floating_a_buf a
    cdef float bd[CL_WIDTH]
    if storage is float:
        _affine_row(x, a.f, n, kk)
        cn_act_grad_f32(a.f, dy, <float*>g, n, kk.act)
    elif storage is double:
        _affine_row(x, a.d, n, kk)
        cn_act_grad_f64(a.d, dy, <double*>g, n, kk.act)
    else:
        widen(x, a.f, n)
        _affine_row(<const float*>a.f, a.f, n, kk)
        widen(dy, bd, n)
        cn_act_grad_f32(a.f, bd, <float*>g, n, kk.act)


cdef void _block_grad_sums(const storage* dy, const storage* x, void* g,
                           const floating* w, const floating* b, const double* mean,
                           const double* rstd, Py_ssize_t HW, Py_ssize_t C,
                           Py_ssize_t cpg, Py_ssize_t blk, Py_ssize_t c0, Py_ssize_t c1,
                           int act, double* ps, double* psx) noexcept nogil:
    """Rows [blk * COL_ROWS, ...) of channels [c0, c1) (at most CL_WIDTH) of one sample:
    ps[j] = sum(dy), psx[j] = sum(dy * (x - mean)) of channel c0 + j, each column row by
    row in order (col_grad_sums). act != 0: first g = dy * act'(a) row by row (a the
    forward's pre-activation, recomputed with its arithmetic), which takes dy's place
    (g: double for float64 data, else float, as _act_grad_row)."""
    cdef double mc[CL_WIDTH]
    cdef AffineCoefs kk
    cdef Py_ssize_t j, r, n = c1 - c0, r0 = blk * COL_ROWS, r1 = min(r0 + COL_ROWS, HW)
    cdef const storage* src = dy
    cdef Py_ssize_t gsz = sizeof(double) if storage is double else sizeof(float)
    if act:
        _affine_coefs(&kk, mean, rstd, w, b, c0, c1, cpg)
        kk.act = act
        for r in range(r0, r1):
            _act_grad_row(dy + r * C + c0, x + r * C + c0,
                          <char*>g + (r * C + c0) * gsz, n, &kk)
        if storage is float or storage is double:
            src = <const storage*>g
    for j in range(n):
        mc[j] = mean[(c0 + j) // cpg]
        ps[j] = 0
        psx[j] = 0
    if storage is cn_f16:
        if act:
            cn_col_grad_rows_g32_f16(<const float*>g + r0 * C + c0, x + r0 * C + c0, C,
                                     r1 - r0, n, mc, ps, psx)
            return
    elif storage is cn_bf16:
        if act:
            cn_col_grad_rows_g32_bf16(<const float*>g + r0 * C + c0, x + r0 * C + c0, C,
                                      r1 - r0, n, mc, ps, psx)
            return
    col_grad_sums(src + r0 * C + c0, x + r0 * C + c0, C, r1 - r0, n, mc, ps, psx, 1)


cdef inline void _group_grad(const double* sdy, const double* sdyx, const floating* w,
                             const double* rstd, Py_ssize_t g, Py_ssize_t cpg,
                             Py_ssize_t HW, double* gc) noexcept nogil:
    """Group g's mean(g) and mean(g * xhat) from its channels' sums, as the slab
    family's _run_grad folds them."""
    cdef double A = 0, B = 0, wj, M = <double>(cpg * HW), rs = rstd[g]
    cdef Py_ssize_t j
    for j in range(cpg):
        wj = 1.0 if w == NULL else w[g * cpg + j]
        A += wj * sdy[g * cpg + j]
        B += wj * sdyx[g * cpg + j]
    gc[2 * g] = A / M
    gc[2 * g + 1] = rs * B / M


cdef void _grad_rows(const storage* dy, const float* g32, const storage* x, storage* dx,
                     const floating* w, const double* mean, const double* rstd,
                     const double* gc, Py_ssize_t C, Py_ssize_t cpg, Py_ssize_t r0,
                     Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """dx over rows [r0, r1), channels [c0, c1) of one sample (g32: as _grad_row_s)."""
    cdef GradCoefs k
    cdef Py_ssize_t s0 = c0, s1, r
    while s0 < c1:
        s1 = min(s0 + CL_WIDTH, c1)
        _grad_coefs(&k, mean, rstd, gc, w, s0, s1, cpg)
        for r in range(r0, r1):
            _grad_row_s(dy + r * C + s0, g32 + r * C + s0 if g32 != NULL else NULL,
                        x + r * C + s0, dx + r * C + s0, s1 - s0, &k)
        s0 = s1


cdef inline Py_ssize_t _g_size(const storage* x) noexcept nogil:
    """The size of an element of the backward's g = dy * act'(a): float64 for float64
    data, float32 for all others (16-bit data keep g's float32 digits)."""
    return sizeof(double) if storage is double else sizeof(float)


cdef inline const storage* _dx_dy(const storage* dy, void* g, Py_ssize_t o,
                                  int act) noexcept nogil:
    """What dx reads in dy's place from element o on: g with an activation (float32
    and float64 data), else dy (16-bit data with an activation: _dx_g32)."""
    if act and (storage is float or storage is double):
        return <const storage*>g + o
    return dy + o


cdef inline const float* _dx_g32(const storage* x, void* g, Py_ssize_t o,
                                 int act) noexcept nogil:
    """16-bit data with an activation: the float32 g from element o on; else NULL."""
    if act and (storage is cn_f16 or storage is cn_bf16):
        return <const float*>g + o
    return NULL


cdef void _bwd_fused_item(const storage* dy, const storage* x, storage* dx,
                          const floating* w, const floating* b, void* g,
                          const double* mean, const double* rstd, double* sdy,
                          double* sdyx, double* gc, Py_ssize_t HW, Py_ssize_t C,
                          Py_ssize_t G, Py_ssize_t n, Py_ssize_t g0, Py_ssize_t g1,
                          Py_ssize_t nb, int act) noexcept nogil:
    """Sample n, groups [g0, g1): the sums, then dx while the rows are in L2."""
    cdef double ps[CL_WIDTH]
    cdef double psx[CL_WIDTH]
    cdef Py_ssize_t cpg = C // G, c0 = g0 * cpg, c1 = g1 * cpg, s0, s1, blk, j, gg
    cdef Py_ssize_t o = n * HW * C
    s0 = c0
    while s0 < c1:
        s1 = min(s0 + CL_WIDTH, c1)
        for j in range(s0, s1):
            sdy[n * C + j] = 0
            sdyx[n * C + j] = 0
        for blk in range(nb):
            _block_grad_sums(dy + o, x + o, <char*>g + o * _g_size(x) if act else NULL,
                             w, b, mean + n * G,
                             rstd + n * G, HW, C, cpg, blk, s0, s1, act, ps, psx)
            for j in range(s0, s1):
                sdy[n * C + j] = sdy[n * C + j] + ps[j - s0]
                sdyx[n * C + j] = sdyx[n * C + j] + psx[j - s0]
        s0 = s1
    for gg in range(g0, g1):
        _group_grad(sdy + n * C, sdyx + n * C, w, rstd + n * G, gg, cpg, HW, gc + 2 * n * G)
    _grad_rows(_dx_dy(dy, g, o, act), _dx_g32(x, g, o, act), x + o, dx + o, w, mean + n * G,
               rstd + n * G, gc + 2 * n * G, C, cpg, 0, HW, c0, c1)


cdef inline void _fold_blocks(const double* ps, const double* psx, Py_ssize_t C,
                             Py_ssize_t nb, Py_ssize_t c0, Py_ssize_t c1, double* s,
                             double* sx) noexcept nogil:
    """s[c] = the sum of ps[q * C + c] over the nb blocks q in order (sx of psx), for
    channels [c0, c1): block by block, the channels side by side."""
    cdef Py_ssize_t q, c
    for c in range(c0, c1):
        s[c] = 0
        sx[c] = 0
    for q in range(nb):
        for c in range(c0, c1):
            s[c] = s[c] + ps[q * C + c]
            sx[c] = sx[c] + psx[q * C + c]


cdef void _backward(const storage* dy, const storage* x, storage* dx,
                    const floating* w, const floating* b, void* g, floating* dw,
                    floating* db, const double* mean, const double* rstd, double* sdy,
                    double* sdyx, double* gc, double* part, double* acc, Py_ssize_t N,
                    Py_ssize_t HW, Py_ssize_t C, Py_ssize_t G, Py_ssize_t gpt,
                    int last, int act, int nt) noexcept nogil:
    """Samples [0, N) (a chunk of the batch): dx, and the dweight/dbias sums continued
    in acc[c], acc[C + c], written to dw/db when last. part NULL: fused items of gpt
    groups; else the split schedule, part 2 * N * nb * C doubles."""
    cdef Py_ssize_t cpg = C // G, nb = (HW + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t n_tiles = (G + gpt - 1) // gpt, nct = (C + CL_WIDTH - 1) // CL_WIDTH
    cdef Py_ssize_t t, n, g0, blk, j0, i, r0, r1, nfc
    cdef double* ps = part
    cdef double* psx = part + N * nb * C if part != NULL else NULL
    cdef Py_ssize_t gsz = _g_size(x)
    if part == NULL:
        for t in prange(N * n_tiles, nogil=True, num_threads=nt, schedule="static"):
            g0 = (t % n_tiles) * gpt
            _bwd_fused_item(dy, x, dx, w, b, g, mean, rstd, sdy, sdyx, gc, HW, C, G,
                            t // n_tiles, g0, min(g0 + gpt, G), nb, act)
    else:
        for t in prange(N * nb * nct, nogil=True, num_threads=nt, schedule="static"):
            n = t // (nb * nct)
            blk = (t // nct) % nb
            j0 = (t % nct) * CL_WIDTH
            _block_grad_sums(dy + n * HW * C, x + n * HW * C,
                             <char*>g + n * HW * C * gsz if act else NULL, w, b,
                             mean + n * G,
                             rstd + n * G, HW, C, cpg, blk, j0, min(j0 + CL_WIDTH, C), act,
                             ps + (n * nb + blk) * C + j0, psx + (n * nb + blk) * C + j0)
        # each channel's block sums added in block order, block by block over pieces of
        # FOLD_COLS contiguous channels (a channel's blocks are C apart)
        nfc = (C + FOLD_COLS - 1) // FOLD_COLS
        for t in prange(N * nfc, nogil=True, num_threads=nt, schedule="static"):
            _fold_blocks(ps + (t // nfc) * nb * C, psx + (t // nfc) * nb * C, C, nb,
                         (t % nfc) * FOLD_COLS, min((t % nfc + 1) * FOLD_COLS, C),
                         sdy + (t // nfc) * C, sdyx + (t // nfc) * C)
        for i in prange(N * G, nogil=True, num_threads=nt, schedule="static"):
            _group_grad(sdy + (i // G) * C, sdyx + (i // G) * C, w, rstd + (i // G) * G,
                        i % G, cpg, HW, gc + 2 * (i // G) * G)
        # dx: the N * HW rows in nt equal spans, one per thread (as the forward's apply)
        for t in prange(nt, nogil=True, num_threads=nt, schedule="static"):
            r0 = t * (N * HW) // nt
            r1 = (t + 1) * (N * HW) // nt
            while r0 < r1:
                n = r0 // HW
                j0 = min(r1, (n + 1) * HW)
                _grad_rows(_dx_dy(dy, g, n * HW * C, act), _dx_g32(x, g, n * HW * C, act),
                           x + n * HW * C, dx + n * HW * C, w, mean + n * G,
                           rstd + n * G, gc + 2 * n * G, C, cpg, r0 - n * HW, j0 - n * HW,
                           0, C)
                r0 = j0
    # dweight and dbias: the per-(n, c) sums over n in order, continuing the previous
    # chunks' (the slab family's fold)
    fold_param_grads(sdy, sdyx, rstd, acc, dw, db, N, C, G, last, nt)


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
             cnp.ndarray dweight, cnp.ndarray dbias, cnp.ndarray mean, cnp.ndarray rstd,
             Py_ssize_t N, Py_ssize_t HW, Py_ssize_t C, Py_ssize_t G, int act=0,
             object bias=None, object gbuf=None):
    """dx, dweight, dbias of the channels-last group normalisation (see DESIGN.md,
    "Backward"); act, bias, gbuf as in slab.backward, except that for 16-bit data gbuf
    is float32 (g = dy * act'(a) keeps its float32 digits; dy, x, dx stay 16-bit).

    Up to four float64 sums per (n, c): when a sample is under 512 bytes, the batch is
    done in chunks of samples whose sums take at most 1/16 of the input; the split
    schedule's per-block sums (4 blocks or more) another 1/16 at most."""
    if N * HW == 0 or C == 0:  # no elements: parameter gradients are empty sums
        dweight.fill(0)
        dbias.fill(0)
        return
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x), nb = (HW + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t nc = N, n0, n1, gpt
    if HW * isz < 512:
        nc = max(1, (N * HW * isz) // 512)
    gpt = _groups_per_tile(nc, C, G, nt)
    cdef bint fused = _fuse(nc, HW, C, G, gpt, nt)
    cdef cnp.ndarray work = np.empty(2 * nc * C + 2 * nc * G, dtype=np.float64)
    cdef cnp.ndarray blocks = None if fused else np.empty(2 * nc * nb * C, dtype=np.float64)
    cdef cnp.ndarray accs = np.zeros(2 * C, dtype=np.float64)
    cdef double* sdy = <double*>data(work)
    cdef double* sdyx = sdy + nc * C
    cdef double* gc = sdyx + nc * C
    cdef double* part = <double*>data(blocks)
    cdef double* acc = <double*>data(accs)
    cdef char* pdy = <char*>data(dy)
    cdef char* px = <char*>data(x)
    cdef char* pdx = <char*>data(dx)
    cdef void* pw = data(weight)
    cdef void* pdw = data(dweight)
    cdef void* pdb = data(dbias)
    cdef void* pb = data(bias)
    cdef char* pg = <char*>data(gbuf) if act else NULL
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef Py_ssize_t step = HW * C * isz
    # g: float64 for float64 data, float32 for all others (16-bit data included)
    cdef Py_ssize_t gstep = HW * C * (cnp.PyArray_ITEMSIZE(<cnp.ndarray>gbuf) if act else 0)
    cdef int kind = storage_kind(x)
    with nogil:
        n0 = 0
        while n0 < N:
            n1 = min(n0 + nc, N)
            if kind == KIND_F32:
                _backward(<float*>(pdy + n0 * step), <float*>(px + n0 * step),
                          <float*>(pdx + n0 * step), <float*>pw, <float*>pb,
                          <void*>(pg + n0 * gstep if act else NULL), <float*>pdw,
                          <float*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, gc, part, acc,
                          n1 - n0, HW, C, G, gpt, n1 == N, act, nt)
            elif kind == KIND_F64:
                _backward(<double*>(pdy + n0 * step), <double*>(px + n0 * step),
                          <double*>(pdx + n0 * step), <double*>pw, <double*>pb,
                          <void*>(pg + n0 * gstep if act else NULL), <double*>pdw,
                          <double*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, gc, part, acc,
                          n1 - n0, HW, C, G, gpt, n1 == N, act, nt)
            elif kind == KIND_F16:
                _backward(<cn_f16*>(pdy + n0 * step), <cn_f16*>(px + n0 * step),
                          <cn_f16*>(pdx + n0 * step), <float*>pw, <float*>pb,
                          <void*>(pg + n0 * gstep if act else NULL), <float*>pdw,
                          <float*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, gc, part, acc,
                          n1 - n0, HW, C, G, gpt, n1 == N, act, nt)
            else:
                _backward(<cn_bf16*>(pdy + n0 * step), <cn_bf16*>(px + n0 * step),
                          <cn_bf16*>(pdx + n0 * step), <float*>pw, <float*>pb,
                          <void*>(pg + n0 * gstep if act else NULL), <float*>pdw,
                          <float*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, gc, part, acc,
                          n1 - n0, HW, C, G, gpt, n1 == N, act, nt)
            n0 = n1
