"""Channel family: BatchNorm.

x is viewed as (N, C, HW); channel c's set is the N runs x[n, c, :], HW elements each,
C * HW apart. Work items are the channels: a channel's statistics and its apply (or,
backward, its gradient sums and dx) are fused, so its runs are read from DRAM once. With
fewer than 4 channels per thread the channels are split into fixed pieces (short runs
grouped, long runs cut) whose partial results merge in a fixed order: the same bits.

Short runs (HW < SHORT_RUN, e.g. BatchNorm over (N, C) features) would make a channel a
strided gather. Then x is read as an (N, D = C * HW) matrix instead, in tiles of whole
channels (at most COL_WIDTH columns) by blocks of rows (COL_ROWS to 2 * COL_ROWS - 1
rows; all N rows when N < 2 * COL_ROWS): each tile computes per-column moments
(col_tile_moments, shared with the batched columns of standardize; of x minus the
channel's first value, or a given shift, so that block means keep the spread's digits on
offset data) or gradient sums with contiguous, vectorised loops and merges them per
channel in column order; the per-block moments merge per channel pairwise (tree_merge_cols),
the gradient sums in block order; the apply runs row by row with per-channel
coefficients. Scratch: two float64 per channel and row block beyond the first, at most
1/16 of a float32 input; with a single row block the moments go straight into the
outputs and the backward handles each tile's dx while it is in cache, with no scratch
at all.

Storage dtypes (see _common.pxd): both paths take every storage, parameters float32
for all but float64 data. 16-bit data are computed in float32 lanes (the long-run path)
or with the float32 data's arithmetic (the column path: its moments read staged, widened
row blocks, its gradient sums widen in registers, and its apply and dx run on widened row pieces), rounded once on store: a
16-bit result is the float32 result on the widened data, rounded to the storage.

The callers in cynorm._api validate everything; these functions trust their arguments.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    SetLayout, make_layout, set_stats, split_set_stats, set_grad_sums, split_grad_sums,
    affine_act, act_grad_const, act_run, grad_const, chan_merge, inv_std, data,
    set_ddof, var_divisor, COL_ROWS, COL_WIDTH, col_tile_moments, tree_merge_cols,
    MERGE_COLS, storage, storage_kind, cn_f16, cn_bf16, KIND_F64, KIND_F32, KIND_F16,
    col_grad_sums, widen, narrow, ld, act_grad_dx, ActSums, stream_out,
)
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
    APPLY_ROWS = 16   # rows per work item of the apply (eval: its rstd formed once)

# the column path's threshold, for cynorm._api and cynorm._stats_api (one definition)
SHORT_RUN = SHORT_RUN_


# ---- column path (short runs) ----------------------------------------------------------

cdef inline Py_ssize_t _col_blocks(Py_ssize_t N) noexcept nogil:
    return N // COL_ROWS if N >= COL_ROWS else 1


cdef void _col_tile_moments(const storage* x, Py_ssize_t D, Py_ssize_t HW,
                            Py_ssize_t N, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                            Py_ssize_t c1, int welford, const double* shift, double* pm,
                            double* pq) noexcept nogil:
    """Per-channel mean and m2 of rows [r0, r1) of channels [c0, c1) of x - k[c] into
    pm[c], pq[c], k[c] = shift[c] (shift not NULL) or the channel's first value x[c * HW]
    (pm is relative to k): per column (col_tile_moments, results on the stack; the
    same columns of the rows that follow, up to N, prefetched meanwhile), then the HW
    columns of each channel merged in order."""
    cdef double cm[COL_WIDTH]
    cdef double cq[COL_WIDTH]
    cdef double ks[COL_WIDTH]
    cdef double cnt = <double>(r1 - r0), n_, m_, q_
    cdef Py_ssize_t j, c, h, n = (c1 - c0) * HW
    for j in range(n):
        c = c0 + j // HW
        ks[j] = ld(x, c * HW) if shift == NULL else shift[c]
    col_tile_moments(x + c0 * HW, D, r0, r1, 0, n, welford, ks, cm, cq,
                     min(COL_ROWS, N - r1))
    for c in range(c0, c1):
        n_ = 0
        m_ = 0
        q_ = 0
        for h in range(HW):
            chan_merge(&n_, &m_, &q_, cnt, cm[(c - c0) * HW + h], cq[(c - c0) * HW + h])
        pm[c] = m_
        pq[c] = q_


cdef void _col_apply(const storage* x, storage* y, Py_ssize_t D, Py_ssize_t r0,
                     Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t HW,
                     const double* mean, const double* rstd, const double* var,
                     double eps, const floating* w, const floating* b,
                     int act) noexcept nogil:
    """Rows [r0, r1), channels [c0, c1): y = ((x - mean) * rstd) * w + b, in float64,
    then the activation act on each row's segment. rstd NULL (eval mode, no (C,) array
    for it): 1 / sqrt(var + eps), formed once per channel here."""
    cdef double rsl[COL_WIDTH]
    cdef const double* rs = rstd
    cdef Py_ssize_t c, r
    if rstd == NULL:
        for c in range(c0, c1):
            rsl[c - c0] = 1.0 / sqrt(var[c] + eps)
        rs = rsl - c0
    for r in range(r0, r1):
        _col_affine_act_row(x + r * D, y + r * D, c0, c1, HW, mean, rs, w, b, act)


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
    forward's pre-activation, recomputed as _col_apply computes it. g (of x's shape):
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
    cdef Py_ssize_t n_tiles = (C + cpt - 1) // cpt, t, c, c0, r0, blk
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
    # the apply: work items of APPLY_ROWS rows by one tile
    for t in prange(((N + APPLY_ROWS - 1) // APPLY_ROWS) * n_tiles, nogil=True,
                    num_threads=nt, schedule="static"):
        c0 = (t % n_tiles) * cpt
        r0 = (t // n_tiles) * APPLY_ROWS
        _col_apply(x, y, D, r0, min(r0 + APPLY_ROWS, N), c0, min(c0 + cpt, C), HW, mean,
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
    if training:
        mg = wc * sdy[c] / M
        mgx = wc * (rs * sdyx[c] / M)
    for n in range(n0, n1):
        o = (n * C + c) * HW
        if (storage is cn_f16 or storage is cn_bf16) and act:
            act_grad_dx(dy + o, x + o, dx + o, HW, wc, mg, mgx, mean[c], rs, shift, act)
        else:
            grad_const(dy + o, x + o, dx + o, HW, wc, mg, mgx, mean[c], rs, 0)


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
