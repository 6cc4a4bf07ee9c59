"""Channel family: BatchNorm.

x is viewed as (N, C, HW); channel c's set is the N runs x[n, c, :], HW elements each,
C * HW apart. Work items are the channels: a channel's statistics and its apply (or,
backward, its gradient sums and dx) are fused, so its runs are read from DRAM once. With
fewer than 4 channels per thread the channels are split into fixed pieces (short runs
grouped, long runs cut) whose partial results merge in a fixed order: the same bits.

Short runs (HW < SHORT_RUN, e.g. BatchNorm over (N, C) features) would make a channel a
strided gather. Then x is read as an (N, D = C * HW) matrix instead, in tiles of whole
channels (at most COL_WIDTH columns) by blocks of rows (COL_ROWS to 2 * COL_ROWS - 1
rows; all N rows when N < 2 * COL_ROWS): each tile computes per-column sums with
contiguous, vectorised loops and adds them per channel in column order: the one-pass
sums of x minus the channel's first value and their squares (cn_cl_shift_sums, as the
channels-last family), kept where they are as exact as two passes, else (and for
Welford or a given shift) per-column moments (col_tile_moments, shared with the batched
columns of standardize; of x minus the channel's first value, or the shift, so that
block means keep the spread's digits on offset data) merged per channel; or the
gradient sums. The per-block moments merge per channel pairwise (tree_merge_cols), the
gradient sums in block order; the apply runs row by row in float32 SIMD with
per-channel constants (cn_ch_apply, runs of 16 or more) or per-column ones (cn_cl_apply),
the slab family's float32 form (float64 data, and channels beyond f32_xhat_ok, in
float64). Scratch: two float64 per channel and row block beyond the first, at most
1/16 of a float32 input; with a single row block the moments go straight into the
outputs and the backward handles each tile's dx while it is in cache, with no scratch
at all.

Storage dtypes (see _common.pxd): both paths take every storage, parameters float32
for all but float64 data. 16-bit data are computed in float32 lanes (the long-run path)
or with the float32 data's arithmetic (the column path: its one-pass sums, gradient sums
and apply widen in registers, its two-pass moments read staged, widened row blocks, and
its dx, and the apply with an activation, run on widened row pieces), rounded once on
store: a 16-bit result is the float32 result on the widened data, rounded to the
storage.

The callers in cynorm._api validate everything; these functions trust their arguments.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    SetLayout, make_layout, set_stats, split_set_stats, set_grad_sums, split_grad_sums,
    affine_act, act_grad_const, act_run, grad_const, inv_std, data,
    set_ddof, var_divisor, COL_ROWS, COL_WIDTH, col_tile_moments, tree_merge_cols,
    MERGE_COLS, storage, storage_kind, cn_f16, cn_bf16, KIND_F64, KIND_F32, KIND_F16,
    col_grad_sums, widen, narrow, ld, act_grad_dx, ActSums, f32_xhat_ok, split_mean,
    stream_out,
)
from cynorm._kernels._common cimport cn_cl_apply_f32, cn_cl_apply_f16, cn_cl_apply_bf16
from cynorm._kernels._common cimport cn_ch_apply_f32, cn_ch_apply_f16, cn_ch_apply_bf16
from cynorm._kernels._common cimport (
    cn_cl_shift_sums_f32, cn_cl_shift_sums_f64, cn_cl_shift_sums_f16, cn_cl_shift_sums_bf16,
    SHIFT_SPREAD,
)
from libc.float cimport DBL_MAX
from cynorm._kernels._common cimport cn_act_f32, cn_act_grad_f32, cn_act_grad_f64
from cynorm._kernels._common cimport cn_col_grad_rows_g32_f16, cn_col_grad_rows_g32_bf16

import numpy as np

from cynorm._kernels import INHERITED_OPENMP_POOL

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)

# The column path's blocks are COL_ROWS rows (the last takes the rest: per-channel
# partials of 16 bytes per block are at most 1/16 of a float32 input) and its tiles at
# most COL_WIDTH columns (64 x 1024 float32 = 256 KiB stays in L2), from _common.pxd.
cdef enum:
    SHORT_RUN_ = 64   # runs shorter than this take the column path
    APPLY_ROWS = 16   # least rows per work item of the apply (its constants formed once)

# the column path's threshold, for cynorm._api and cynorm._stats_api (one definition)
SHORT_RUN = SHORT_RUN_


# ---- column path (short runs) ----------------------------------------------------------

cdef inline Py_ssize_t _col_blocks(Py_ssize_t N) noexcept nogil:
    return N // COL_ROWS if N >= COL_ROWS else 1


cdef inline void _merge_columns(const double* cm, const double* cq, Py_ssize_t HW,
                                double cnt, double* m, double* q) noexcept nogil:
    """One channel's mean m and m2 q from the moments cm[h], cq[h] of its HW columns of
    cnt values each: m = the mean of the column means, q = their m2s + cnt * sum((column
    mean - m)**2) (the equal-count merge, exact up to rounding: one division per
    channel, not HW of chan_merge's), both sums in column order."""
    cdef double s = 0, q_ = 0, d2 = 0, d, m_
    cdef Py_ssize_t h
    for h in range(HW):
        s = s + cm[h]
    m_ = s / HW
    for h in range(HW):
        q_ = q_ + cq[h]
        d = cm[h] - m_
        d2 = d2 + d * d
    m[0] = m_
    q[0] = q_ + cnt * d2


cdef inline void _col_shift_sums(const storage* x, Py_ssize_t D, Py_ssize_t nrows,
                                 Py_ssize_t n, const double* k, double* d, double* q,
                                 Py_ssize_t pf_rows) noexcept nogil:
    """d[j] = sum(e), q[j] = sum(e * e), e = x - k[j], over nrows rows of the n columns
    at x (cn_cl_shift_sums: each column row by row in order, in float64)."""
    cdef Py_ssize_t j
    for j in range(n):
        d[j] = 0
        q[j] = 0
    if storage is float:
        cn_cl_shift_sums_f32(x, D, nrows, n, k, d, q, pf_rows)
    elif storage is double:
        cn_cl_shift_sums_f64(x, D, nrows, n, k, d, q, pf_rows)
    elif storage is cn_f16:
        cn_cl_shift_sums_f16(x, D, nrows, n, k, d, q, pf_rows)
    else:
        cn_cl_shift_sums_bf16(x, D, nrows, n, k, d, q, pf_rows)


cdef void _col_tile_moments(const storage* x, Py_ssize_t D, Py_ssize_t HW,
                            Py_ssize_t N, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                            Py_ssize_t c1, int welford, const double* shift, double* pm,
                            double* pq) noexcept nogil:
    """Per-channel mean and m2 of rows [r0, r1) of channels [c0, c1) of x - k[c] into
    pm[c], pq[c], k[c] = shift[c] (shift not NULL) or the channel's first value x[c * HW]
    (pm is relative to k); the same columns of the rows that follow, up to N, prefetched
    meanwhile.

    One pass where it is as exact as two (shift NULL, not Welford): the float64 sums of
    e = x - k and e * e per column (_col_shift_sums; e exact for float32 and 16-bit data,
    k being one of their values), added per channel in column order, mean = S / M and
    m2 = Q - S^2 / M (M = (r1 - r0) * HW), kept under the slab family's test
    (piece_moments: k within 8 standard deviations of the mean, no overflow, no squares
    lost below the normal range, not constant; NaN and Inf fail it). A channel that
    fails it, and every channel otherwise, takes the corrected two-pass algorithm (or
    Welford's) per column (col_tile_moments), its HW columns then merged
    (_merge_columns). The one pass reads the tile once at the float64 arithmetic's
    speed; the two passes took about 1.5x its time (64 rows of 7 x 7 maps, float32, in
    cache). Each channel's arithmetic depends only on its own values: the same bits
    whatever the tile, and a NaN leaves the other channels' bits alone."""
    cdef double cm[COL_WIDTH]
    cdef double cq[COL_WIDTH]
    cdef double ks[COL_WIDTH]
    cdef double cnt = <double>(r1 - r0), M = cnt * HW, iM = 1.0 / M, S, Q, dd
    cdef Py_ssize_t j, c, h, n = (c1 - c0) * HW, pf = min(COL_ROWS, N - r1)
    for j in range(n):
        c = c0 + j // HW
        ks[j] = ld(x, c * HW) if shift == NULL else shift[c]
    if welford or shift != NULL:
        col_tile_moments(x + c0 * HW, D, r0, r1, 0, n, welford, ks, cm, cq, pf)
        for c in range(c0, c1):
            _merge_columns(cm + (c - c0) * HW, cq + (c - c0) * HW, HW, cnt, &pm[c], &pq[c])
        return
    _col_shift_sums(x + r0 * D + c0 * HW, D, r1 - r0, n, ks, cm, cq, pf)
    for c in range(c0, c1):
        j = (c - c0) * HW
        S = 0
        Q = 0
        for h in range(HW):
            S = S + cm[j + h]
            Q = Q + cq[j + h]
        # times 1 / M, not divided by M (one division a tile, not two a channel: with
        # one value per column, 256 features of 64-row blocks, the divisions took a
        # fifth of the pass); each product rounds once more, far below the test's margin
        dd = S * S * iM
        if (Q <= DBL_MAX and Q >= M * 9.332636185032189e-302
                and (SHIFT_SPREAD + 1) * dd <= SHIFT_SPREAD * Q):
            pm[c] = S * iM
            pq[c] = Q - dd
        else:
            col_tile_moments(x + c0 * HW, D, r0, r1, j, j + HW, 0, ks, cm, cq, 0)
            _merge_columns(cm + j, cq + j, HW, cnt, &pm[c], &pq[c])


# Runs of at least CH_RUN columns take the apply's constants per channel (cn_ch_apply),
# shorter ones per column (cn_cl_apply): the same operations on the same constants, so
# the choice never changes a bit.
cdef enum:
    CH_RUN = 16

ctypedef struct ColCoefs:
    # the float32 apply's constants of one tile (the slab family's float32 form,
    # affine_const): the split mean mh + ml, rf = <float>rstd, wf, bf; per channel
    # (HW >= CH_RUN) or per column (channel c's HW columns hold c's); ok[c - c0]:
    # channel c's rstd passes f32_xhat_ok (else its constants are unused)
    float mh[COL_WIDTH]
    float ml[COL_WIDTH]
    float rf[COL_WIDTH]
    float wf[COL_WIDTH]
    float bf[COL_WIDTH]
    unsigned char ok[COL_WIDTH]


cdef inline void _col_coefs(ColCoefs* k, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t HW,
                            const double* mean, const double* rs, const floating* w,
                            const floating* b) noexcept nogil:
    """k's constants of channels [c0, c1): per channel in plain loops (which vectorise:
    a tile of 1024 features takes them per work item), then, for runs shorter than
    CH_RUN, spread over each channel's columns (from the last channel back, in place)."""
    cdef Py_ssize_t c, h, n = c1 - c0, rep = 1 if HW >= CH_RUN else HW
    cdef const double* m = mean + c0
    cdef const double* r = rs + c0
    for c in range(n):
        k.ok[c] = f32_xhat_ok(r[c])
        k.mh[c] = <float>m[c]
        k.rf[c] = <float>r[c]
    for c in range(n):
        k.ml[c] = <float>(m[c] - <double>k.mh[c])
    if w == NULL:
        for c in range(n):
            k.wf[c] = 1
    else:
        for c in range(n):
            k.wf[c] = <float>w[c0 + c]
    if b == NULL:
        for c in range(n):
            k.bf[c] = 0
    else:
        for c in range(n):
            k.bf[c] = <float>b[c0 + c]
    if rep > 1:
        c = n - 1
        while c >= 0:
            for h in range(rep - 1, -1, -1):
                k.mh[c * rep + h] = k.mh[c]
                k.ml[c * rep + h] = k.ml[c]
                k.rf[c * rep + h] = k.rf[c]
                k.wf[c * rep + h] = k.wf[c]
                k.bf[c * rep + h] = k.bf[c]
            c = c - 1


cdef inline void _col_apply_f32(const storage* x, storage* y, Py_ssize_t D,
                                Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t HW,
                                const ColCoefs* k, Py_ssize_t j) noexcept nogil:
    """The float32 apply of nrows rows (row stride D) of nch channels with k's
    constants from channel j of the tile on (float32 and 16-bit storage)."""
    if HW >= CH_RUN:
        if storage is float:
            cn_ch_apply_f32(x, y, D, nrows, nch, HW, k.mh + j, k.ml + j, k.rf + j,
                            k.wf + j, k.bf + j)
        elif storage is cn_f16:
            cn_ch_apply_f16(x, y, D, nrows, nch, HW, k.mh + j, k.ml + j, k.rf + j,
                            k.wf + j, k.bf + j)
        elif storage is cn_bf16:
            cn_ch_apply_bf16(x, y, D, nrows, nch, HW, k.mh + j, k.ml + j, k.rf + j,
                             k.wf + j, k.bf + j)
    else:
        j = j * HW
        if storage is float:
            cn_cl_apply_f32(x, y, D, nrows, nch * HW, k.mh + j, k.ml + j, k.rf + j,
                            k.wf + j, k.bf + j)
        elif storage is cn_f16:
            cn_cl_apply_f16(x, y, D, nrows, nch * HW, k.mh + j, k.ml + j, k.rf + j,
                            k.wf + j, k.bf + j)
        elif storage is cn_bf16:
            cn_cl_apply_bf16(x, y, D, nrows, nch * HW, k.mh + j, k.ml + j, k.rf + j,
                             k.wf + j, k.bf + j)


cdef void _col_apply(const storage* x, storage* y, Py_ssize_t D, Py_ssize_t r0,
                     Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t HW,
                     const double* mean, const double* rstd, const double* var,
                     double eps, const floating* w, const floating* b,
                     int act) noexcept nogil:
    """Rows [r0, r1), channels [c0, c1): y = ((x - mean) * rstd) * w + b, then the
    activation act on each row's segment. float32 and 16-bit data: the slab family's
    float32 form (affine_const: the split mean, xhat before the weight) in SIMD lanes
    (_col_apply_f32; 16-bit data widened and narrowed in registers, or, with an
    activation, on the widened row piece, rounded once); float64 data, and channels
    beyond f32_xhat_ok, in float64 (_col_affine_row). rstd NULL (eval mode, no (C,)
    array for it): 1 / sqrt(var + eps), formed once per channel here."""
    cdef double rsl[COL_WIDTH]
    cdef float buf[COL_WIDTH]
    cdef ColCoefs k
    cdef const double* rs = rstd
    cdef Py_ssize_t c, e, r, o, n
    if rstd == NULL:
        for c in range(c0, c1):
            rsl[c - c0] = 1.0 / sqrt(var[c] + eps)
        rs = rsl - c0
    if storage is double:
        for r in range(r0, r1):
            _col_affine_act_row(x + r * D, y + r * D, c0, c1, HW, mean, rs, w, b, act)
    else:
        _col_coefs(&k, c0, c1, HW, mean, rs, w, b)
        # runs of channels [c, e) alike in k.ok, each in its own arithmetic
        c = c0
        while c < c1:
            e = c + 1
            while e < c1 and k.ok[e - c0] == k.ok[c - c0]:
                e = e + 1
            o = c * HW
            n = (e - c) * HW
            if not k.ok[c - c0]:
                for r in range(r0, r1):
                    _col_affine_act_row(x + r * D, y + r * D, c, e, HW, mean, rs, w, b,
                                        act)
            elif not act:
                _col_apply_f32(x + r0 * D + o, y + r0 * D + o, D, r1 - r0, e - c, HW, &k,
                               c - c0)
            else:
                for r in range(r0, r1):
                    if storage is float:
                        _col_apply_f32(x + r * D + o, y + r * D + o, D, 1, e - c, HW, &k,
                                       c - c0)
                        act_run(y + r * D + o, n, act)
                    else:
                        widen(x + r * D + o, buf, n)
                        _col_apply_f32(<const float*>buf, buf, n, 1, e - c, HW, &k,
                                       c - c0)
                        cn_act_f32(buf, buf, n, act)
                        narrow(buf, y + r * D + o, n)
            c = e


cdef inline void _col_affine_act_row(const storage* xr, storage* yr, Py_ssize_t c0,
                                     Py_ssize_t c1, Py_ssize_t HW, const double* mean,
                                     const double* rs, const floating* w,
                                     const floating* b, int act) noexcept nogil:
    """_col_affine_row, then the activation act, over channels [c0, c1) (at most
    COL_WIDTH columns) of one row. 16-bit data: the float32 data's arithmetic on the
    widened row piece, rounded once to the storage on store."""
    cdef float buf[COL_WIDTH]
    cdef Py_ssize_t o = c0 * HW, n = (c1 - c0) * HW
    if storage is float or storage is double:
        _col_affine_row(xr, yr, c0, c1, HW, mean, rs, w, b)
        if act:
            act_run(yr + o, n, act)
    else:
        widen(xr + o, buf, n)
        _col_affine_row(<const float*>buf - o, buf - o, c0, c1, HW, mean, rs, w, b)
        if act:
            cn_act_f32(buf, buf, n, act)
        narrow(buf, yr + o, n)


cdef inline void _col_affine_row(const storage* xr, storage* yr, Py_ssize_t c0,
                                 Py_ssize_t c1, Py_ssize_t HW, const double* mean,
                                 const double* rs, const floating* w,
                                 const floating* b) noexcept nogil:
    """Channels [c0, c1) of one row: yr = ((xr - mean) * rs) * w + b, in float64
    (float32 and float64 data; _col_affine_act_row widens 16-bit data first)."""
    cdef Py_ssize_t c, h
    cdef double m, rc, wc, bc
    if storage is float or storage is double:
        if HW == 1:
            for c in range(c0, c1):
                yr[c] = <storage>(((xr[c] - mean[c]) * rs[c]) *
                                  (1.0 if w == NULL else w[c]) +
                                  (0.0 if b == NULL else b[c]))
            return
        for c in range(c0, c1):
            m = mean[c]
            rc = rs[c]
            wc = 1.0 if w == NULL else w[c]
            bc = 0.0 if b == NULL else b[c]
            for h in range(c * HW, (c + 1) * HW):
                yr[h] = <storage>(((xr[h] - m) * rc) * wc + bc)


cdef void _col_act_grad(const storage* dy, const storage* x, void* g, Py_ssize_t D,
                        Py_ssize_t r, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t HW,
                        const double* mean, const double* rstd, const floating* w,
                        const floating* b, int act) noexcept nogil:
    """Row r, channels [c0, c1) (at most COL_WIDTH columns): g = dy * act'(a), a the
    forward's pre-activation, recomputed in float64 (_col_affine_row: within a few float32
    ulps of the forward's float32 form, as the derivative needs). g (of x's shape):
    storage for float32 and float64 data, where it may be dy; float32 for 16-bit data,
    computed in float32 on the widened row pieces and kept in float32."""
    cdef float af[COL_WIDTH]
    cdef double ad[COL_WIDTH]
    cdef float bd[COL_WIDTH]
    cdef Py_ssize_t o = r * D + c0 * HW, n = (c1 - c0) * HW
    if storage is float:
        _col_affine_row(x + r * D, af - c0 * HW, c0, c1, HW, mean, rstd, w, b)
        cn_act_grad_f32(af, dy + o, <float*>g + o, n, act)
    elif storage is double:
        _col_affine_row(x + r * D, ad - c0 * HW, c0, c1, HW, mean, rstd, w, b)
        cn_act_grad_f64(ad, dy + o, <double*>g + o, n, act)
    else:
        widen(x + o, af, n)
        _col_affine_row(<const float*>af - c0 * HW, af - c0 * HW, c0, c1, HW, mean, rstd,
                        w, b)
        widen(dy + o, bd, n)
        cn_act_grad_f32(af, bd, <float*>g + o, n, act)


cdef void _col_forward(const storage* x, storage* y, const floating* w,
                       const floating* b, double* mean, double* rstd, double* var,
                       double* part, const double* shift, Py_ssize_t N, Py_ssize_t C,
                       Py_ssize_t HW, double eps, double ddof, int welford, int training,
                       int act, int nt) noexcept nogil:
    """Forward on the column path; part: 2 * n_blocks * C doubles when n_blocks > 1
    (one block: the moments go to mean and var, or rstd when var is NULL). Eval mode
    with rstd NULL: var is the running variance, rstd formed per channel. y NULL: the
    statistics only. shift (C doubles) not NULL: the statistics of x - shift[c], mean
    relative to it; NULL: shifted by each channel's first value, which mean adds back.
    The variance is m2 / (N * HW - ddof), NaN when that is <= 0."""
    cdef Py_ssize_t D = C * HW, nb = _col_blocks(N), cpt = COL_WIDTH // HW
    cdef Py_ssize_t n_tiles = (C + cpt - 1) // cpt, t, c, c0, r0, blk, ar
    cdef double* pm = mean if nb == 1 else part
    cdef double* pq = (var if var != NULL else rstd) if nb == 1 else part + nb * C
    cdef double div = var_divisor(N * HW, ddof), m, m2
    if training:
        # tiles block-major: block blk = t // n_tiles has rows [blk * COL_ROWS, ...),
        # the last block to N
        for t in prange(nb * n_tiles, nogil=True, num_threads=nt, schedule="static"):
            blk = t // n_tiles
            c0 = (t % n_tiles) * cpt
            r0 = blk * COL_ROWS
            _col_tile_moments(x, D, HW, N, r0, N if blk == nb - 1 else r0 + COL_ROWS,
                              c0, min(c0 + cpt, C), welford, shift, pm + blk * C,
                              pq + blk * C)
        if nb > 1:
            # the blocks pairwise, in place in block 0's slots (block q holds
            # COL_ROWS * HW elements, the last the rest), MERGE_COLS channels at once
            for t in prange((C + MERGE_COLS - 1) // MERGE_COLS, nogil=True,
                            num_threads=nt, schedule="static"):
                c0 = t * MERGE_COLS
                tree_merge_cols(pm + c0, pq + c0, C, nb, COL_ROWS * HW, N * HW,
                                min(MERGE_COLS, C - c0))
        for c in prange(C, nogil=True, num_threads=nt, schedule="static"):
            m = pm[c]
            m2 = pq[c]
            mean[c] = m if shift != NULL else ld(x, c * HW) + m
            if var != NULL:
                var[c] = m2 / div
            rstd[c] = inv_std(m2, div, eps)
    if y == NULL:
        return
    # the apply: work items of ar rows by one tile; at least APPLY_ROWS rows, more
    # (about 8 items per thread) where N is large, so that forming a tile's per-column
    # constants stays a small part of an item (each element's arithmetic is the same
    # whatever the items: the same bits for every thread count)
    ar = max(<Py_ssize_t>APPLY_ROWS, N // (8 * nt))
    for t in prange(((N + ar - 1) // ar) * n_tiles, nogil=True,
                    num_threads=nt, schedule="static"):
        c0 = (t % n_tiles) * cpt
        r0 = (t // n_tiles) * ar
        _col_apply(x, y, D, r0, min(r0 + ar, N), c0, min(c0 + cpt, C), HW, mean,
                   rstd, var, eps, w, b, act)


cdef void _col_tile_grad_sums(const storage* dy, const float* g32, const storage* x,
                              const double* mean, Py_ssize_t D, Py_ssize_t HW,
                              Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                              double* ps, double* psx) noexcept nogil:
    """Per-channel sum(dy) and sum(dy * (x - mean)) over rows [r0, r1) of channels
    [c0, c1) into ps[c], psx[c]: per column (col_grad_sums), then each channel's
    columns in order. g32 (16-bit data, not NULL): the float32 g of a backward with an
    activation, read in dy's place (cn_col_grad_rows_g32_T: each column row by row in
    order, the same sums as float32 data holding the widened x)."""
    cdef double cs[COL_WIDTH]
    cdef double csx[COL_WIDTH]
    cdef double mc[COL_WIDTH]
    cdef double a, bb
    cdef Py_ssize_t j, c, h, j0 = c0 * HW, n = (c1 - c0) * HW
    for j in range(n):
        cs[j] = 0
        csx[j] = 0
        mc[j] = mean[c0 + j // HW]
    if storage is cn_f16 and g32 != NULL:
        cn_col_grad_rows_g32_f16(g32 + r0 * D + j0, x + r0 * D + j0, D, r1 - r0, n, mc, cs,
                                 csx)
    elif storage is cn_bf16 and g32 != NULL:
        cn_col_grad_rows_g32_bf16(g32 + r0 * D + j0, x + r0 * D + j0, D, r1 - r0, n, mc, cs,
                                  csx)
    else:
        col_grad_sums(dy + r0 * D + j0, x + r0 * D + j0, D, r1 - r0, n, mc, cs, csx, 0)
    for c in range(c0, c1):
        a = 0
        bb = 0
        for h in range(HW):
            a += cs[(c - c0) * HW + h]
            bb += csx[(c - c0) * HW + h]
        ps[c] = a
        psx[c] = bb


cdef inline void _col_coeffs(double sdy, double sdyx, double rs, double wc, double M,
                             int training, double* mg, double* mgx) noexcept nogil:
    """dx = rstd * ((w * dy - mg) - xhat * mgx) (see grad_const); eval: mg = mgx = 0.
    mean(dy) first, so that a constant g gives mg == g exactly."""
    mg[0] = wc * (sdy / M) if training else 0.0
    mgx[0] = wc * (rs * sdyx / M) if training else 0.0


cdef void _col_grad(const storage* dy, const storage* x, storage* dx, Py_ssize_t c0,
                    Py_ssize_t c1, Py_ssize_t HW, const double* mean, const double* rstd,
                    const floating* w, const double* mg, const double* mgx) noexcept nogil:
    """Channels [c0, c1) of one row, in float64; mg, mgx indexed by channel (float32 and
    float64 data; _col_grad_s widens 16-bit data first)."""
    cdef Py_ssize_t c, h
    cdef double m, rs, wc, g0, k
    if storage is float or storage is double:
        if HW == 1:
            for c in range(c0, c1):
                rs = rstd[c]
                dx[c] = <storage>(rs * (((1.0 if w == NULL else w[c]) * dy[c] - mg[c])
                                        - ((x[c] - mean[c]) * rs) * mgx[c]))
            return
        for c in range(c0, c1):
            m = mean[c]
            rs = rstd[c]
            wc = 1.0 if w == NULL else w[c]
            g0 = mg[c]
            k = mgx[c]
            for h in range(c * HW, (c + 1) * HW):
                dx[h] = <storage>(rs * ((wc * dy[h] - g0) - ((x[h] - m) * rs) * k))


cdef inline void _col_grad_s(const storage* dy, const float* g32, const storage* x,
                             storage* dx, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t HW,
                             const double* mean, const double* rstd, const floating* w,
                             const double* mg, const double* mgx) noexcept nogil:
    """_col_grad over channels [c0, c1) (at most COL_WIDTH columns) of one row; 16-bit
    data: the float32 data's arithmetic on the widened row pieces, rounded once (g32,
    not NULL: the row's float32 g of a backward with an activation, read in dy's
    place)."""
    cdef float bdy[COL_WIDTH]
    cdef float bx[COL_WIDTH]
    cdef Py_ssize_t o = c0 * HW, n = (c1 - c0) * HW
    if storage is float or storage is double:
        _col_grad(dy, x, dx, c0, c1, HW, mean, rstd, w, mg, mgx)
    elif g32 != NULL:
        widen(x + o, bx, n)
        _col_grad(g32, <const float*>bx - o, bdy - o, c0, c1, HW, mean, rstd, w, mg, mgx)
        narrow(bdy, dx + o, n)
    else:
        widen(dy + o, bdy, n)
        widen(x + o, bx, n)
        _col_grad(<const float*>bdy - o, <const float*>bx - o, bdy - o, c0, c1, HW, mean,
                  rstd, w, mg, mgx)
        narrow(bdy, dx + o, n)


cdef void _col_tile_backward(const storage* dy, const float* g32, const storage* x,
                             storage* dx,
                             const floating* w, floating* dw, floating* db,
                             const double* mean, const double* rstd, Py_ssize_t N,
                             Py_ssize_t C, Py_ssize_t HW, Py_ssize_t c0, Py_ssize_t c1,
                             int training) noexcept nogil:
    """One row block (all N rows) of channels [c0, c1): the sums, dweight and dbias,
    then dx while the tile is in cache. Coefficients on the stack, offset by c0. g32:
    as _col_grad_s."""
    cdef double ps[COL_WIDTH]
    cdef double psx[COL_WIDTH]
    cdef Py_ssize_t D = C * HW, c, r
    cdef double M = <double>(N * HW), sdy, sdyx
    _col_tile_grad_sums(dy, g32, x, mean, D, HW, 0, N, c0, c1, ps - c0, psx - c0)
    for c in range(c0, c1):
        sdy = ps[c - c0]
        sdyx = psx[c - c0]
        dw[c] = <floating>(sdyx * rstd[c])
        db[c] = <floating>sdy
        _col_coeffs(sdy, sdyx, rstd[c], 1.0 if w == NULL else w[c], M, training,
                    &ps[c - c0], &psx[c - c0])
    for r in range(N):
        _col_grad_s(dy + r * D, g32 + r * D if g32 != NULL else NULL, x + r * D, dx + r * D,
                    c0, c1, HW, mean, rstd, w, ps - c0, psx - c0)


cdef void _col_backward(const storage* dy, const storage* x, storage* dx,
                        const floating* w, const floating* b, void* g, floating* dw,
                        floating* db, const double* mean, const double* rstd,
                        double* part, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
                        int training, int act, int nt) noexcept nogil:
    """Backward on the column path; part: 2 * n_blocks * C doubles when n_blocks > 1.
    act != 0: first g = dy * act'(a) row by row, which then takes dy's place (16-bit
    data: g in float32, read beside the 16-bit x as g32)."""
    cdef const float* g32 = NULL
    cdef Py_ssize_t D = C * HW, nb = _col_blocks(N), cpt = COL_WIDTH // HW
    cdef Py_ssize_t n_tiles = (C + cpt - 1) // cpt, t, c, q, c0, r0, blk
    cdef double* ps = part
    cdef double* psx = part + nb * C
    cdef double sdy, sdyx, M = <double>(N * HW)
    if act:
        for t in prange(N * n_tiles, nogil=True, num_threads=nt, schedule="static"):
            c0 = (t % n_tiles) * cpt
            _col_act_grad(dy, x, g, D, t // n_tiles, c0, min(c0 + cpt, C), HW, mean, rstd,
                          w, b, act)
        if storage is float or storage is double:
            dy = <const storage*>g
        else:
            g32 = <const float*>g
    if nb == 1:
        for t in prange(n_tiles, nogil=True, num_threads=nt, schedule="static"):
            c0 = t * cpt
            _col_tile_backward(dy, g32, x, dx, w, dw, db, mean, rstd, N, C, HW, c0,
                               min(c0 + cpt, C), training)
        return
    for t in prange(nb * n_tiles, nogil=True, num_threads=nt, schedule="static"):
        blk = t // n_tiles
        c0 = (t % n_tiles) * cpt
        r0 = blk * COL_ROWS
        _col_tile_grad_sums(dy, g32, x, mean, D, HW, r0,
                            N if blk == nb - 1 else r0 + COL_ROWS,
                            c0, min(c0 + cpt, C), ps + blk * C, psx + blk * C)
    # per channel: the blocks' sums in order, then its coefficients in block 0's slots
    for c in prange(C, nogil=True, num_threads=nt, schedule="static"):
        sdy = 0
        sdyx = 0
        for q in range(nb):
            sdy = sdy + ps[q * C + c]
            sdyx = sdyx + psx[q * C + c]
        dw[c] = <floating>(sdyx * rstd[c])
        db[c] = <floating>sdy
        _col_coeffs(sdy, sdyx, rstd[c], 1.0 if w == NULL else w[c], M, training, &ps[c],
                    &psx[c])
    for t in prange(N * n_tiles, nogil=True, num_threads=nt, schedule="static"):
        c0 = (t % n_tiles) * cpt
        _col_grad_s(dy + (t // n_tiles) * D,
                    g32 + (t // n_tiles) * D if g32 != NULL else NULL, x + (t // n_tiles) * D,
                    dx + (t // n_tiles) * D, c0, min(c0 + cpt, C), HW, mean, rstd, w, ps,
                    psx)


cdef inline void _apply_channel(const storage* x, storage* y, const floating* w,
                                const floating* b, const double* mean,
                                const double* rstd, Py_ssize_t n0, Py_ssize_t n1,
                                Py_ssize_t c, Py_ssize_t C, Py_ssize_t HW,
                                int act, bint stream) noexcept nogil:
    """Normalise runs x[n, c, :] for n in [n0, n1), then the activation act. stream:
    y stored past the caches (stream_out)."""
    cdef double wc = 1.0 if w == NULL else w[c]
    cdef double shift = 0.0 if b == NULL else b[c]
    cdef Py_ssize_t n
    for n in range(n0, n1):
        affine_act(x + (n * C + c) * HW, y + (n * C + c) * HW, HW, mean[c], rstd[c], wc,
                   shift, act, stream)


cdef void _forward(const storage* x, storage* y, const floating* w, const floating* b,
                   double* mean, double* rstd, double* var, double* parts, Py_ssize_t N,
                   Py_ssize_t C, Py_ssize_t HW, double eps, double ddof, int welford,
                   int training, int act, int nt) noexcept nogil:
    """y = NULL: the statistics only."""
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef Py_ssize_t c, r
    cdef bint stream = stream_out(N * C * HW, HW, sizeof(storage))
    set_ddof(&L, ddof)
    if training and parts == NULL:
        for c in prange(C, nogil=True, num_threads=nt, schedule="dynamic"):
            set_stats(x + c * HW, &L, welford, 1, eps, NULL, &mean[c], &rstd[c],
                      NULL if var == NULL else &var[c])
            if y != NULL:
                _apply_channel(x, y, w, b, mean, rstd, 0, N, c, C, HW, act, stream)
        return
    if training:
        split_set_stats(x, &L, C, HW, parts, welford, 1, eps, mean, rstd, var, nt)
    if y == NULL:
        return
    # statistics known: every (n, c) run is independent
    for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
        _apply_channel(x, y, w, b, mean, rstd, r // C, r // C + 1, r % C, C, HW, act,
                       stream)


def forward(cnp.ndarray x, object y, object weight, object bias, cnp.ndarray mean,
            object rstd, object var, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
            double eps, int welford, int training, double ddof=0.0, object shift=None,
            int act=0):
    """Normalise x (N, C, HW) per channel into y. training: compute mean, rstd and (var
    not None) the var (C float64; m2 / (N * HW - ddof), NaN if that is <= 0; biased with
    ddof 0) from x; else apply the given mean and rstd, or, rstd None, rstd = 1 /
    sqrt(var + eps) from the given (running) var. y None (training only): the statistics
    alone. shift ((C,) float64, column path only: HW < SHORT_RUN): statistics of
    x - shift, mean relative to it. act: the activation applied to the affine's output
    (codes as in slab.forward)."""
    if training and N * HW == 0:  # an empty batch: nothing to read (statistics as torch)
        mean.fill(0)
        rstd.fill(np.nan)
        if var is not None:
            var.fill(np.nan)
    if N * C * HW == 0:
        return
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef bint columns = HW < SHORT_RUN_
    cdef cnp.ndarray work = None
    cdef double* parts = NULL
    if shift is not None and not columns:
        raise ValueError("channel.forward: shift needs the column path")
    cdef double* psh = <double*>data(shift)
    if rstd is None and not columns:  # long runs: C is at most 1/64 of the input
        rstd = 1.0 / np.sqrt(var + eps)
    if columns and _col_blocks(N) > 1 and training:
        work = np.empty(2 * _col_blocks(N) * C, dtype=np.float64)
        parts = <double*>data(work)
    elif not columns and training and C < 4 * nt and L.n_pieces > 1:
        work = np.empty(3 * C * L.n_pieces, dtype=np.float64)
        parts = <double*>data(work)
    cdef void* px = data(x)
    cdef void* py = data(y)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef double* pv = <double*>data(var)
    cdef int kind = storage_kind(x)
    cdef bint single = kind == KIND_F32
    with nogil:
        if columns and kind == KIND_F16:
            _col_forward(<cn_f16*>px, <cn_f16*>py, <float*>pw, <float*>pb, pm, pr, pv,
                         parts, psh, N, C, HW, eps, ddof, welford, training, act, nt)
        elif columns and kind != KIND_F32 and kind != KIND_F64:
            _col_forward(<cn_bf16*>px, <cn_bf16*>py, <float*>pw, <float*>pb, pm, pr, pv,
                         parts, psh, N, C, HW, eps, ddof, welford, training, act, nt)
        elif kind == KIND_F16:
            _forward(<cn_f16*>px, <cn_f16*>py, <float*>pw, <float*>pb, pm, pr, pv, parts,
                     N, C, HW, eps, ddof, welford, training, act, nt)
        elif kind != KIND_F32 and kind != KIND_F64:
            _forward(<cn_bf16*>px, <cn_bf16*>py, <float*>pw, <float*>pb, pm, pr, pv,
                     parts, N, C, HW, eps, ddof, welford, training, act, nt)
        elif columns and single:
            _col_forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, pv,
                         parts, psh, N, C, HW, eps, ddof, welford, training, act, nt)
        elif columns:
            _col_forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, pv,
                         parts, psh, N, C, HW, eps, ddof, welford, training, act, nt)
        elif single:
            _forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, pv, parts,
                     N, C, HW, eps, ddof, welford, training, act, nt)
        else:
            _forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, pv,
                     parts, N, C, HW, eps, ddof, welford, training, act, nt)


# ---- backward -------------------------------------------------------------------------

cdef inline void _grad_channel(const storage* dy, const storage* x, storage* dx,
                               const floating* w, const floating* b, const double* mean,
                               const double* rstd, const double* sdy, const double* sdyx,
                               Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t c, Py_ssize_t N,
                               Py_ssize_t C, Py_ssize_t HW, int training,
                               int act) noexcept nogil:
    """dx over runs [n0, n1) of channel c. Training: dx = rstd * (g - mean(g) - xhat *
    mean(g * xhat)), g = w_c * dy; eval (constant statistics): dx = w_c * rstd * dy.
    act != 0 (16-bit data only: the others pass g as dy): dy * act'(a) in dy's place,
    recomputed in float32 and kept there (act_grad_dx)."""
    cdef double rs = rstd[c], wc = 1.0 if w == NULL else w[c]
    cdef double shift = 0.0 if b == NULL else b[c]
    cdef double M = <double>(N * HW), mg = 0, mgx = 0
    cdef Py_ssize_t n, o
    # a dx far larger than the caches is stored past them (no read before the write)
    cdef bint stream = stream_out(N * C * HW, HW, sizeof(storage))
    if training:
        mg = wc * sdy[c] / M
        mgx = wc * (rs * sdyx[c] / M)
    for n in range(n0, n1):
        o = (n * C + c) * HW
        if (storage is cn_f16 or storage is cn_bf16) and act:
            act_grad_dx(dy + o, x + o, dx + o, HW, wc, mg, mgx, mean[c], rs, shift, act)
        else:
            grad_const(dy + o, x + o, dx + o, HW, wc, mg, mgx, mean[c], rs, stream)


cdef inline void _act_grad_channel(const storage* dy, const storage* x, storage* g,
                                   const floating* w, const floating* b,
                                   const double* mean, const double* rstd, Py_ssize_t n0,
                                   Py_ssize_t n1, Py_ssize_t c, Py_ssize_t C,
                                   Py_ssize_t HW, int act) noexcept nogil:
    """g = dy * act'(a) over runs [n0, n1) of channel c, a the forward's pre-activation."""
    cdef double wc = 1.0 if w == NULL else w[c]
    cdef double shift = 0.0 if b == NULL else b[c]
    cdef Py_ssize_t n, o
    for n in range(n0, n1):
        o = (n * C + c) * HW
        act_grad_const(dy + o, x + o, g + o, HW, mean[c], rstd[c], wc, shift, act)


cdef void _backward(const storage* dy, const storage* x, storage* dx,
                    const floating* w, const floating* b, storage* g, floating* dw,
                    floating* db, const double* mean, const double* rstd, double* sdy,
                    double* sdyx, double* parts, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
                    int training, int act, int nt) noexcept nogil:
    """act != 0: g = dy * act'(a) is formed into g (per channel, or in a pass of its
    own when channels are split) and takes dy's place. 16-bit data: g is not stored (g
    NULL) but recomputed in float32 by the sums and by dx (act_grad_sums, act_grad_dx),
    the same bits as float32 data holding the widened dy and x, dx rounded once."""
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef Py_ssize_t c, r
    cdef bint lowp_act = (storage is cn_f16 or storage is cn_bf16) and act != 0
    cdef const storage* gd = <const storage*>g if act and not lowp_act else dy
    cdef ActSums actx
    cdef const ActSums* pact = NULL
    if lowp_act:  # the sums recompute g per run in float32 (act_grad_sums)
        actx.act = act
        actx.rstd = rstd
        actx.weight = w
        actx.shift = b
        pact = &actx
    if parts == NULL:
        for c in prange(C, nogil=True, num_threads=nt, schedule="dynamic"):
            if act and not lowp_act:
                _act_grad_channel(dy, x, g, w, b, mean, rstd, 0, N, c, C, HW, act)
            set_grad_sums(gd + c * HW, x + c * HW, <const floating*>NULL, &L, mean[c],
                          pact, c, &sdy[c], &sdyx[c])
            _grad_channel(gd, x, dx, w, b, mean, rstd, sdy, sdyx, 0, N, c, N, C, HW,
                          training, act if lowp_act else 0)
    else:
        if act and not lowp_act:
            for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
                _act_grad_channel(dy, x, g, w, b, mean, rstd, r // C, r // C + 1, r % C,
                                  C, HW, act)
        split_grad_sums(gd, x, <const floating*>NULL, &L, C, HW, mean, pact, parts, sdy,
                        sdyx, nt)
        for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
            _grad_channel(gd, x, dx, w, b, mean, rstd, sdy, sdyx, r // C, r // C + 1,
                          r % C, N, C, HW, training, act if lowp_act else 0)
    for c in range(C):
        dw[c] = <floating>(sdyx[c] * rstd[c])
        db[c] = <floating>sdy[c]


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
             cnp.ndarray dweight, cnp.ndarray dbias, cnp.ndarray mean, cnp.ndarray rstd,
             Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, int training, int act=0,
             object bias=None, object gbuf=None):
    """dx, dweight, dbias of batch normalisation with the given per-channel statistics.
    act != 0: of act(normalisation), with the forward's bias; gbuf: an array of x's shape
    for dy * act'(a), dx itself unless dx is x. 16-bit data: gbuf is float32 on the
    column path (HW < SHORT_RUN; g keeps its float32 digits) and unused (None) on the
    long-run path, which recomputes g in float32 where it is needed."""
    if N * HW == 0:  # no elements: parameter gradients are empty sums
        dweight.fill(0)
        dbias.fill(0)
        return
    if C == 0:
        return
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef bint columns = HW < SHORT_RUN_
    cdef cnp.ndarray sums = None, work = None
    cdef double* parts = NULL
    cdef double* sdy = NULL
    cdef double* sdyx = NULL
    if columns:
        if _col_blocks(N) > 1:
            work = np.empty(2 * _col_blocks(N) * C, dtype=np.float64)
            parts = <double*>data(work)
    else:
        sums = np.empty(2 * C, dtype=np.float64)
        sdy = <double*>data(sums)
        sdyx = sdy + C
        if C < 4 * nt and L.n_pieces > 1:
            work = np.empty(2 * C * L.n_pieces, dtype=np.float64)
            parts = <double*>data(work)
    cdef void* pdy = data(dy)
    cdef void* px = data(x)
    cdef void* pdx = data(dx)
    cdef void* pw = data(weight)
    cdef void* pdw = data(dweight)
    cdef void* pdb = data(dbias)
    cdef void* pb = data(bias)
    cdef void* pg = data(gbuf) if act else NULL
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef int kind = storage_kind(x)
    cdef bint single = kind == KIND_F32
    with nogil:
        if columns and kind == KIND_F16:
            _col_backward(<cn_f16*>pdy, <cn_f16*>px, <cn_f16*>pdx, <float*>pw, <float*>pb,
                          pg, <float*>pdw, <float*>pdb, pm, pr, parts, N, C, HW,
                          training, act, nt)
        elif columns and kind != KIND_F32 and kind != KIND_F64:
            _col_backward(<cn_bf16*>pdy, <cn_bf16*>px, <cn_bf16*>pdx, <float*>pw,
                          <float*>pb, pg, <float*>pdw, <float*>pdb, pm, pr, parts,
                          N, C, HW, training, act, nt)
        elif kind == KIND_F16:
            _backward(<cn_f16*>pdy, <cn_f16*>px, <cn_f16*>pdx, <float*>pw, <float*>pb,
                      <cn_f16*>pg, <float*>pdw, <float*>pdb, pm, pr, sdy, sdyx, parts, N,
                      C, HW, training, act, nt)
        elif kind != KIND_F32 and kind != KIND_F64:
            _backward(<cn_bf16*>pdy, <cn_bf16*>px, <cn_bf16*>pdx, <float*>pw,
                      <float*>pb, <cn_bf16*>pg, <float*>pdw, <float*>pdb, pm, pr, sdy,
                      sdyx, parts, N, C, HW, training, act, nt)
        elif columns and single:
            _col_backward(<float*>pdy, <float*>px, <float*>pdx, <float*>pw, <float*>pb,
                          <float*>pg, <float*>pdw, <float*>pdb, pm, pr, parts, N, C, HW,
                          training, act, nt)
        elif columns:
            _col_backward(<double*>pdy, <double*>px, <double*>pdx, <double*>pw,
                          <double*>pb, <double*>pg, <double*>pdw, <double*>pdb, pm, pr,
                          parts, N, C, HW, training, act, nt)
        elif single:
            _backward(<float*>pdy, <float*>px, <float*>pdx, <float*>pw, <float*>pb,
                      <float*>pg, <float*>pdw, <float*>pdb, pm, pr, sdy, sdyx, parts, N,
                      C, HW, training, act, nt)
        else:
            _backward(<double*>pdy, <double*>px, <double*>pdx, <double*>pw, <double*>pb,
                      <double*>pg, <double*>pdw, <double*>pdb, pm, pr, sdy, sdyx, parts,
                      N, C, HW, training, act, nt)
