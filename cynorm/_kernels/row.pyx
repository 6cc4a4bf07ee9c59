"""Row family: LayerNorm over trailing dims (as in transformers / torch) and RMSNorm.

x is viewed as (R, K); each row is a set and weight/bias run elementwise over K. Work
items are the rows (forward) or blocks of ROWS_PER_BLOCK rows (backward); a row's
statistics and its apply or gradient are fused so it is read from DRAM once. With fewer
than 4 work items per thread, rows are cut into fixed pieces of CHUNK elements shared out
among the threads and merged in a fixed order: the same bits for any thread count.

dweight/dbias: each accumulation block (at most MAX_BLOCKS of them) sums its rows, in
row order, into float64 column sums; the blocks are then added in block order. Blocks
and tiles depend only on the shape, never on the thread count.

rms = 1 (RMSNorm): no mean is subtracted, rstd = 1 / sqrt(mean(x**2) + eps).
Storage dtypes (see _common.pxd): data of the fused type `storage`, parameters of
`floating` (float32 for every storage but float64). 16-bit rows are computed block by
block on float32 copies in L1, with the float32 path's arithmetic, and rounded once.
The callers in cynorm._api validate everything; these functions trust their arguments.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    CHUNK, SetLayout, make_layout, piece_bounds, set_stats, split_set_stats, set_ddof,
    split_grad_sums, f32_xhat_ok, split_mean, data,
    storage, storage_kind, widen, narrow, cn_f16, cn_bf16, STAGE, KIND_F64, KIND_F32,
    KIND_F16, affine_elementwise, stream_out, STREAM_BYTES,
)

import numpy as np

from cynorm._kernels import INHERITED_OPENMP_POOL

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)

cdef extern from "_lanes.h":
    void cn_row_tile_f32(const float* dy, const float* x, float* dx, const float* w,
                         Py_ssize_t K, Py_ssize_t nrows, Py_ssize_t n, const float* coef,
                         double* acc_w, double* acc_b, int stream) noexcept nogil
    void cn_row_tile_f16(const cn_f16* dy, const cn_f16* x, cn_f16* dx, const float* w,
                         Py_ssize_t K, Py_ssize_t nrows, Py_ssize_t n, const float* coef,
                         double* acc_w, double* acc_b, int stream) noexcept nogil
    void cn_row_tile_bf16(const cn_bf16* dy, const cn_bf16* x, cn_bf16* dx, const float* w,
                          Py_ssize_t K, Py_ssize_t nrows, Py_ssize_t n, const float* coef,
                          double* acc_w, double* acc_b, int stream) noexcept nogil
    void cn_grad_sums_ab_f32(const float* dy, const float* x, const double* w, Py_ssize_t n,
                             double m, double* sdy, double* sdyx,
                             double* acc_b, Py_ssize_t ahead) noexcept nogil
    void cn_grad_sums_ab_f64(const double* dy, const double* x, const double* w,
                             Py_ssize_t n, double m, double* sdy, double* sdyx,
                             double* acc_b, Py_ssize_t ahead) noexcept nogil
    void cn_grad_sums_ab_f16(const cn_f16* dy, const cn_f16* x, const double* w,
                             Py_ssize_t n, double m, double* sdy, double* sdyx,
                             double* acc_b, Py_ssize_t ahead) noexcept nogil
    void cn_grad_sums_ab_bf16(const cn_bf16* dy, const cn_bf16* x, const double* w,
                              Py_ssize_t n, double m, double* sdy, double* sdyx,
                              double* acc_b, Py_ssize_t ahead) noexcept nogil
    void cn_add_f16(const cn_f16* a, const cn_f16* b, cn_f16* h, Py_ssize_t n) noexcept nogil
    void cn_add_bf16(const cn_bf16* a, const cn_bf16* b, cn_bf16* h,
                     Py_ssize_t n) noexcept nogil

# Rows per backward sub-block: its dy and x (32 rows of up to 4096 float32 each, 1 MiB)
# stay in L2 between the sums and the dx pass.
cdef enum:
    ROWS_PER_BLOCK = 32
    # columns per backward tile: its float64 column sums (2 x 8 KiB) stay in L1
    TILE_COLS = 1024
    # accumulation blocks of dweight/dbias: enough work items for 16 threads, and
    # (MAX_BLOCKS, K) float64 partials far smaller than the input
    MAX_BLOCKS = 64
    # how far ahead the backward's row sums pass prefetches into L2, in bytes of a
    # row, rounded up to whole rows (out of cache, rows of 4 KiB: 4 rows ahead gave
    # more than 1 or 2)
    PREFETCH_BYTES = 16384


cdef inline void _apply_piece(const storage* x, storage* y, const floating* w,
                              const floating* b, const double* mean, const double* rstd,
                              const SetLayout* L, Py_ssize_t k, bint stream) noexcept nogil:
    """Apply over piece k (of all R * n_pieces) of the split forward."""
    cdef Py_ssize_t r = k // L.n_pieces, run0, nruns, e0, elen
    piece_bounds(L, k - r * L.n_pieces, &run0, &nruns, &e0, &elen)
    affine_elementwise(x + r * L.size + e0, y + r * L.size + e0,
                       <const floating*>NULL if w == NULL else w + e0,
                       <const floating*>NULL if b == NULL else b + e0, elen, mean[r],
                       rstd[r], stream)


cdef inline void _add_span(const storage* a, const storage* b, storage* h,
                           Py_ssize_t n) noexcept nogil:
    """h = a + b elementwise; h may be a or b. 16-bit data: added in float32 (widened in
    registers), rounded once."""
    cdef Py_ssize_t k
    if storage is float or storage is double:
        for k in range(n):
            h[k] = a[k] + b[k]
    elif storage is cn_f16:
        cn_add_f16(a, b, h, n)
    else:
        cn_add_bf16(a, b, h, n)


cdef void _forward(const storage* x, storage* y, const floating* w, const floating* b,
                   double* mean, double* rstd, double* parts, Py_ssize_t R, Py_ssize_t K,
                   double eps, double ddof, int welford, int rms, const storage* res,
                   storage* h, int nt) noexcept nogil:
    """res != NULL: the residual prologue, h = x + res (written to h, which may be x or
    res), then h is normalised; a row's sum is formed just before its statistics, so it
    is read from cache."""
    cdef SetLayout L = make_layout(1, K, K)
    cdef Py_ssize_t r, k, e0
    # a y far larger than the caches is stored past them (no read before the write)
    cdef bint stream = stream_out(R * K, K, sizeof(storage))
    set_ddof(&L, ddof)
    if res != NULL:
        if parts == NULL:
            for r in prange(R, nogil=True, num_threads=nt, schedule="static"):
                _add_span(x + r * K, res + r * K, h + r * K, K)
                set_stats(h + r * K, &L, welford, not rms, eps,
                          x + (r + 1) * K if r + 1 < R else NULL, &mean[r], &rstd[r], NULL)
                affine_elementwise(h + r * K, y + r * K, w, b, K, mean[r], rstd[r], stream)
            return
        for k in prange(R * L.n_pieces, nogil=True, num_threads=nt, schedule="static"):
            e0 = k * CHUNK
            _add_span(x + e0, res + e0, h + e0, min(CHUNK, R * K - e0))
        x = h
    if parts == NULL:
        for r in prange(R, nogil=True, num_threads=nt, schedule="static"):
            set_stats(x + r * K, &L, welford, not rms, eps,
                      x + (r + 1) * K if r + 1 < R else NULL, &mean[r], &rstd[r], NULL)
            affine_elementwise(x + r * K, y + r * K, w, b, K, mean[r], rstd[r], stream)
        return
    split_set_stats(x, &L, R, K, parts, welford, not rms, eps, mean, rstd, NULL, nt)
    for k in prange(R * L.n_pieces, nogil=True, num_threads=nt, schedule="static"):
        _apply_piece(x, y, w, b, mean, rstd, &L, k, stream)


def forward(cnp.ndarray x, cnp.ndarray y, object weight, object bias, cnp.ndarray mean,
            cnp.ndarray rstd, Py_ssize_t R, Py_ssize_t K, double eps, int welford,
            int rms, double ddof=0.0, object residual=None, object h=None):
    """Normalise each row of x (R, K) into y; write mean (0 for RMSNorm) and rstd
    (of the variance m2 / max(K - ddof, 0), biased for ddof = 0). residual, h: normalise
    h = x + residual instead, writing h (h may be x or residual; y must be neither h nor,
    unless it is x or residual itself, overlap them)."""
    cdef int nt = cynorm_threads_for(R * K)
    cdef SetLayout L = make_layout(1, K, K)
    cdef cnp.ndarray work = None
    cdef double* parts = NULL
    if R < 4 * nt and L.n_pieces > 1:
        work = np.empty(3 * R * L.n_pieces, dtype=np.float64)
        parts = <double*>data(work)
    cdef void* px = data(x)
    cdef void* py = data(y)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef void* pres = data(residual)
    cdef void* ph = data(h)
    cdef int kind = storage_kind(x)
    with nogil:
        if kind == KIND_F32:
            _forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, parts,
                     R, K, eps, ddof, welford, rms, <float*>pres, <float*>ph, nt)
        elif kind == KIND_F16:
            _forward(<cn_f16*>px, <cn_f16*>py, <float*>pw, <float*>pb, pm, pr, parts,
                     R, K, eps, ddof, welford, rms, <cn_f16*>pres, <cn_f16*>ph, nt)
        elif kind != KIND_F64:
            _forward(<cn_bf16*>px, <cn_bf16*>py, <float*>pw, <float*>pb, pm, pr, parts,
                     R, K, eps, ddof, welford, rms, <cn_bf16*>pres, <cn_bf16*>ph, nt)
        else:
            _forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, parts,
                     R, K, eps, ddof, welford, rms, <double*>pres, <double*>ph, nt)


# ---- backward -------------------------------------------------------------------------

cdef inline void _row_coeffs(const double* sdy, const double* sdyx, const double* rstd,
                             Py_ssize_t r, Py_ssize_t K, int rms, double* mg,
                             double* mgx) noexcept nogil:
    """dx = rstd * ((w * dy - mg) - xhat * mgx) for row r (see grad_const), from
    g = w * dy: mg = mean(g) = sum(g) / K (0 for RMSNorm),
    mgx = mean(g * xhat) = rstd * sum(g * (x - mean)) / K."""
    mg[0] = 0.0 if rms else sdy[r] / <double>K
    mgx[0] = rstd[r] * sdyx[r] / <double>K


cdef inline void _tile_row(const floating* dy, const floating* x, floating* dx,
                           const floating* w, Py_ssize_t n, double mean, double rstd,
                           double mg, double mgx, double* acc_w,
                           double* acc_b) noexcept nogil:
    """One row of a tile in float64: dx = rstd * ((w * dy - mg) - xhat * mgx), and per
    column acc_w += dy * xhat, acc_b += dy (acc_b NULL: not this). float32 data take
    cn_row_tile_f32 (_lanes.h) instead, except rows whose xhat float32 cannot form
    (f32_xhat_ok)."""
    cdef Py_ssize_t k
    cdef double xd
    if acc_b != NULL:
        for k in range(n):
            acc_b[k] += dy[k]
    if w == NULL:
        for k in range(n):
            xd = (x[k] - mean) * rstd
            acc_w[k] += dy[k] * xd
            dx[k] = <floating>(rstd * ((dy[k] - mg) - xd * mgx))
    else:
        for k in range(n):
            xd = (x[k] - mean) * rstd
            acc_w[k] += dy[k] * xd
            dx[k] = <floating>(rstd * ((<double>dy[k] * w[k] - mg) - xd * mgx))


cdef inline double _mean_at(const double* mean, Py_ssize_t r) noexcept nogil:
    """Row r's mean in the backward; mean NULL: RMSNorm, 0."""
    return 0.0 if mean == NULL else mean[r]


cdef inline Py_ssize_t acc_subs(Py_ssize_t R) noexcept nogil:
    """Sub-blocks per accumulation block of dweight/dbias: at most MAX_BLOCKS blocks.
    Sub-blocks are ROWS_PER_BLOCK rows, the last taking the rest (up to
    2 * ROWS_PER_BLOCK - 1 rows), so there are at most R / ROWS_PER_BLOCK blocks and
    their (n_blocks, K) float64 column sums stay within 1/8 of a float32 input.
    Functions of R alone."""
    cdef Py_ssize_t sub = R // ROWS_PER_BLOCK if R >= ROWS_PER_BLOCK else 1
    return (sub + MAX_BLOCKS - 1) // MAX_BLOCKS


cdef inline Py_ssize_t b_offset(Py_ssize_t n_blocks, Py_ssize_t K) noexcept nogil:
    """Where dbias's block partials start in part (dweight's at 0): after dweight's
    n_blocks * K, padded so that the two lie 2 KiB apart modulo 4 KiB. Equal offsets
    modulo 4 KiB (n_blocks * K a multiple of 512, the common case) make every load of
    acc_b[k] wait on the store to acc_w[k] just before it (4K aliasing)."""
    cdef Py_ssize_t n = n_blocks * K
    return n + (256 - n % 512 + 512) % 512


cdef inline Py_ssize_t acc_blocks(Py_ssize_t R) noexcept nogil:
    cdef Py_ssize_t sub = R // ROWS_PER_BLOCK if R >= ROWS_PER_BLOCK else 1
    cdef Py_ssize_t per = acc_subs(R)
    return (sub + per - 1) // per


cdef void _tile(const storage* dy, const storage* x, storage* dx, const floating* w,
                const double* mean, const double* rstd, const double* sdy,
                const double* sdyx, Py_ssize_t K, Py_ssize_t r0, Py_ssize_t r1,
                Py_ssize_t k0, Py_ssize_t kn, int rms, double* acc_w,
                double* acc_b, int stream) noexcept nogil:
    """Rows [r0, r1) (a sub-block), columns [k0, k0 + kn): write dx, and add
    dy * xhat and dy to the column sums acc_w[0:kn], acc_b[0:kn] (acc_b NULL: not dy),
    row by row. 16-bit data: the float32 path's arithmetic on the values widened in
    registers, dx rounded once. stream: dx stored past the caches where the tile can
    (cn_row_tile_T in _lanes.h)."""
    cdef float coef[10 * ROWS_PER_BLOCK]
    cdef float bdy[TILE_COLS]
    cdef float bx[TILE_COLS]
    cdef const float* wf = NULL
    cdef Py_ssize_t r, j, ra
    cdef double mg, mgx
    if w != NULL:
        wf = <const float*>w + k0
    if storage is float or storage is cn_f16 or storage is cn_bf16:
        # runs of rows whose xhat float32 can form: float32 coefficients per row (the
        # mean as hi + lo), then the vector tile (16-bit data widened in registers);
        # other rows in float64
        r = r0
        while r < r1:
            ra = r
            while r < r1 and f32_xhat_ok(rstd[r]):
                _row_coeffs(sdy, sdyx, rstd, r, K, rms, &mg, &mgx)
                j = 5 * (r - ra)
                split_mean(_mean_at(mean, r), &coef[j], &coef[j + 1])
                coef[j + 2] = <float>rstd[r]
                coef[j + 3] = <float>mg
                coef[j + 4] = <float>mgx
                r += 1
            if r > ra:
                if storage is float:
                    cn_row_tile_f32(dy + ra * K + k0, x + ra * K + k0, dx + ra * K + k0,
                                    wf, K, r - ra, kn, coef, acc_w, acc_b, stream)
                elif storage is cn_f16:
                    cn_row_tile_f16(dy + ra * K + k0, x + ra * K + k0, dx + ra * K + k0,
                                    wf, K, r - ra, kn, coef, acc_w, acc_b, stream)
                else:
                    cn_row_tile_bf16(dy + ra * K + k0, x + ra * K + k0, dx + ra * K + k0,
                                     wf, K, r - ra, kn, coef, acc_w, acc_b, stream)
            if r < r1:
                _row_coeffs(sdy, sdyx, rstd, r, K, rms, &mg, &mgx)
                if storage is float:
                    _tile_row(dy + r * K + k0, x + r * K + k0, dx + r * K + k0,
                              wf, kn, _mean_at(mean, r), rstd[r], mg, mgx, acc_w, acc_b)
                else:
                    # 16-bit: the row widened to float32, the float64 xhat, rounded once
                    widen(dy + r * K + k0, bdy, kn)
                    widen(x + r * K + k0, bx, kn)
                    _tile_row(<const float*>bdy, <const float*>bx, bdy, wf, kn,
                              _mean_at(mean, r), rstd[r], mg, mgx, acc_w, acc_b)
                    narrow(bdy, dx + r * K + k0, kn)
                r += 1
    else:
        for r in range(r0, r1):
            _row_coeffs(sdy, sdyx, rstd, r, K, rms, &mg, &mgx)
            _tile_row(dy + r * K + k0, x + r * K + k0, dx + r * K + k0,
                      <const storage*>NULL if w == NULL else <const storage*>w + k0, kn,
                      _mean_at(mean, r),
                      rstd[r], mg, mgx, acc_w, acc_b)


cdef inline void _grad_sums_ab(const storage* dy, const storage* x, const double* w,
                               Py_ssize_t n, double m, double* sdy, double* sdyx,
                               double* acc_b, Py_ssize_t ahead) noexcept nogil:
    if storage is float:
        cn_grad_sums_ab_f32(dy, x, w, n, m, sdy, sdyx, acc_b, ahead)
    elif storage is double:
        cn_grad_sums_ab_f64(dy, x, w, n, m, sdy, sdyx, acc_b, ahead)
    elif storage is cn_f16:
        cn_grad_sums_ab_f16(dy, x, w, n, m, sdy, sdyx, acc_b, ahead)
    else:
        cn_grad_sums_ab_bf16(dy, x, w, n, m, sdy, sdyx, acc_b, ahead)


cdef inline void _row_grad_sums(const storage* dy, const storage* x, const double* wd,
                                const SetLayout* L, double mean, double* sdy,
                                double* sdyx, double* acc_b,
                                Py_ssize_t ahead) noexcept nogil:
    """set_grad_sums (_common.pxd) of one row, the same pieces and lanes folded in the
    same order (the same bits), with the weight given widened to float64 (wd; NULL:
    none) and, acc_b not NULL, the row's dy added to the column sums acc_b[0:K];
    ahead > 0: the row ahead elements further on prefetched into L2 as this one is
    read."""
    cdef double a, b
    cdef Py_ssize_t p, q, run0, nruns, e0, elen, off
    sdy[0] = 0
    sdyx[0] = 0
    for p in range(L.n_pieces):
        piece_bounds(L, p, &run0, &nruns, &e0, &elen)
        a = 0
        b = 0
        for q in range(nruns):
            off = (run0 + q) * L.run_stride + e0
            _grad_sums_ab(dy + off, x + off, <const double*>NULL if wd == NULL else wd + off,
                          elen, mean, &a, &b, <double*>NULL if acc_b == NULL else acc_b + off,
                          ahead)
        sdy[0] += a
        sdyx[0] += b


cdef void _block_tiles(const storage* dy, const storage* x, storage* dx,
                       const floating* w, const double* wd, floating* dw, floating* db,
                       const double* mean, const double* rstd, double* sdy, double* sdyx,
                       double* part, Py_ssize_t R, Py_ssize_t K, Py_ssize_t blk,
                       Py_ssize_t j0, Py_ssize_t j1, int sums, int rms,
                       int stream) noexcept nogil:
    """Accumulation block blk, column tiles [j0, j1), sub-block by sub-block (sums = 1:
    first each sub-block's row sums, so that its rows are still in L2 for the tiles).
    Column sums go to part[blk] (several blocks) or, via
    the stack, straight to dw/db (one block: R < 2 * ROWS_PER_BLOCK, a single
    sub-block); db NULL (RMSNorm): no dy column sums. Fused (sums = 1): the sub-block's
    row sums live on the stack; else sdy, sdyx hold every row's. Fused with several
    blocks, the row sums pass also adds each row's dy to the block's dy column sums
    (where dy is already widened to float64), in row order as the tiles would, when
    K <= TILE_COLS. The row sums pass prefetches the rows PREFETCH_BYTES on into L2.
    wd: w widened to float64 (NULL: no w), for the row sums. stream: dx stored past the
    caches (_tile)."""
    cdef SetLayout L = make_layout(1, K, K)
    # dweight's and dbias's column sums of one block, 2 KiB apart modulo 4 KiB (b_offset)
    cdef double stack_wb[2 * TILE_COLS + 256]
    cdef double ssdy[2 * ROWS_PER_BLOCK]
    cdef double ssdyx[2 * ROWS_PER_BLOCK]
    cdef Py_ssize_t per = acc_subs(R) * ROWS_PER_BLOCK, n_blocks = acc_blocks(R)
    cdef Py_ssize_t ra = blk * per, rb = R if blk == n_blocks - 1 else ra + per
    cdef Py_ssize_t s0, s1, r, j, k, k0, kn
    cdef double* aw
    cdef double* ab
    cdef double* psdy = sdy
    cdef double* psdyx = sdyx
    cdef double* sab = NULL  # the dy column sums the row sums pass adds to
    cdef Py_ssize_t boff = b_offset(n_blocks, K)
    cdef int tile_b = db != NULL  # the tiles add dy to the dy column sums
    # rows ahead that the row sums pass prefetches
    cdef Py_ssize_t row_bytes = K * sizeof(storage)
    cdef Py_ssize_t ahead = (PREFETCH_BYTES + row_bytes - 1) // row_bytes if K > 0 else 0
    if n_blocks > 1:
        for k in range(j0 * TILE_COLS, min(j1 * TILE_COLS, K)):
            part[blk * K + k] = 0
            if db != NULL:
                part[boff + blk * K + k] = 0
        if sums and db != NULL and K <= TILE_COLS:
            # (a longer row's dy column sums would not stay in L1 next to the rows)
            sab = part + boff + blk * K
            tile_b = 0
    s0 = ra
    while s0 < rb:
        # the last sub-block takes the rest of the rows
        s1 = R if R - s0 < 2 * ROWS_PER_BLOCK else s0 + ROWS_PER_BLOCK
        if sums:
            psdy = ssdy - s0  # indexed by row
            psdyx = ssdyx - s0
            for r in range(s0, s1):
                _row_grad_sums(dy + r * K, x + r * K, wd, &L, _mean_at(mean, r),
                               &psdy[r], &psdyx[r], sab, ahead * K if r + ahead < R else 0)
        for j in range(j0, j1):
            k0 = j * TILE_COLS
            kn = min(TILE_COLS, K - k0)
            if n_blocks > 1:
                aw = part + blk * K + k0
                ab = part + boff + blk * K + k0
            else:
                aw = stack_wb
                ab = stack_wb + TILE_COLS + 256
                if s0 == ra:
                    for k in range(kn):
                        aw[k] = 0
                        ab[k] = 0
            _tile(dy, x, dx, w, mean, rstd, psdy, psdyx, K, s0, s1, k0, kn, rms, aw,
                  ab if tile_b else NULL, stream)
            if n_blocks == 1 and s1 == rb:
                for k in range(kn):
                    dw[k0 + k] = <floating>aw[k]
                    if db != NULL:
                        db[k0 + k] = <floating>ab[k]
        s0 = s1


cdef void _fold_blocks(const double* pw, const double* pb, floating* dw, floating* db,
                       Py_ssize_t n_blocks, Py_ssize_t K, Py_ssize_t k0,
                       Py_ssize_t kn) noexcept nogil:
    """dw[k] = sum over q of pw[q * K + k] (db likewise from pb; db NULL: none) for
    k in [k0, k0 + kn), q in order."""
    cdef double aw[TILE_COLS]
    cdef double ab[TILE_COLS]
    cdef Py_ssize_t q, k
    for k in range(kn):
        aw[k] = 0
        ab[k] = 0
    for q in range(n_blocks):
        for k in range(kn):
            aw[k] = aw[k] + pw[q * K + k0 + k]
        if db != NULL:
            for k in range(kn):
                ab[k] = ab[k] + pb[q * K + k0 + k]
    for k in range(kn):
        dw[k0 + k] = <floating>aw[k]
        if db != NULL:
            db[k0 + k] = <floating>ab[k]


cdef void _backward(const storage* dy, const storage* x, storage* dx,
                    const floating* w, double* wd, floating* dw, floating* db,
                    const double* mean, const double* rstd, double* sdy, double* sdyx,
                    double* parts, double* part, Py_ssize_t R, Py_ssize_t K, int rms,
                    int nt) noexcept nogil:
    """wd: K float64 for w widened (exactly) once here for the fused row sums (parts
    NULL), else NULL; float64 parameters: w itself."""
    cdef SetLayout L = make_layout(1, K, K)
    # a dx far larger than the caches is stored past them (no write-allocate)
    cdef int stream = R * K * <Py_ssize_t>sizeof(storage) >= STREAM_BYTES
    cdef Py_ssize_t n_blocks = acc_blocks(R)
    cdef Py_ssize_t n_cols = (K + TILE_COLS - 1) // TILE_COLS
    cdef Py_ssize_t blk, t
    if floating is double:
        wd = <double*>w
    elif wd != NULL:
        for t in range(K):
            wd[t] = w[t]
    if parts == NULL:
        # fused: each sub-block's row sums, then its tiles while the rows are in L2
        for blk in prange(n_blocks, nogil=True, num_threads=nt, schedule="static"):
            _block_tiles(dy, x, dx, w, wd, dw, db, mean, rstd, sdy, sdyx, part, R, K,
                         blk, 0, n_cols, 1, rms, stream)
    else:
        split_grad_sums(dy, x, w, &L, R, K, mean, NULL, parts, sdy, sdyx, nt)
        for t in prange(n_blocks * n_cols, nogil=True, num_threads=nt, schedule="static"):
            _block_tiles(dy, x, dx, w, wd, dw, db, mean, rstd, sdy, sdyx, part, R, K,
                         t // n_cols, t % n_cols, t % n_cols + 1, 0, rms, stream)
    if n_blocks > 1:
        # the blocks' partials added in block order, column by column (each column's
        # sum in the order of a loop over q), TILE_COLS columns at a time so that the
        # partial rows are read contiguously and the sums vectorise
        for t in prange(n_cols, nogil=True, num_threads=nt, schedule="static"):
            _fold_blocks(part, part + b_offset(n_blocks, K), dw, db, n_blocks, K,
                         t * TILE_COLS, min(TILE_COLS, K - t * TILE_COLS))


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
             cnp.ndarray dweight, object dbias, object mean, cnp.ndarray rstd,
             Py_ssize_t R, Py_ssize_t K, int rms):
    """dx, dweight and (LayerNorm) dbias of the row normalisation (mean None: 0)."""
    if R == 0:  # no rows: the gradients of weight and bias are sums over nothing
        dweight.fill(0)
        if dbias is not None:
            dbias.fill(0)
        return
    cdef int nt = cynorm_threads_for(R * K)
    cdef SetLayout L = make_layout(1, K, K)
    cdef Py_ssize_t n_blocks = acc_blocks(R)
    cdef int kind = storage_kind(x)
    cdef cnp.ndarray sums = None, work = None, colsums = None
    cdef double* parts = NULL
    cdef double* part = NULL
    cdef double* sdy = NULL
    cdef double* sdyx = NULL
    cdef cnp.ndarray wide = None
    cdef double* wd = NULL
    if n_blocks < 4 * nt and L.n_pieces > 1:
        # rows cut into pieces (K > CHUNK): per-row sums, far smaller than the rows
        work = np.empty(2 * R * L.n_pieces, dtype=np.float64)
        parts = <double*>data(work)
        sums = np.empty(2 * R, dtype=np.float64)
        sdy = <double*>data(sums)
        sdyx = sdy + R
    elif weight is not None and kind != KIND_F64:
        # fused: the row sums take w widened (K float64: at most 32 KiB, K <= CHUNK,
        # or 1/32 of x, n_blocks >= 4)
        wide = np.empty(K, dtype=np.float64)
        wd = <double*>data(wide)
    if n_blocks > 1:
        colsums = np.empty(b_offset(n_blocks, K) + n_blocks * K, dtype=np.float64)
        part = <double*>data(colsums)
    cdef void* pdy = data(dy)
    cdef void* px = data(x)
    cdef void* pdx = data(dx)
    cdef void* pw = data(weight)
    cdef void* pdw = data(dweight)
    cdef void* pdb = data(dbias)
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    with nogil:
        if kind == KIND_F32:
            _backward(<float*>pdy, <float*>px, <float*>pdx, <float*>pw, wd, <float*>pdw,
                      <float*>pdb, pm, pr, sdy, sdyx, parts, part, R, K, rms, nt)
        elif kind == KIND_F16:
            _backward(<cn_f16*>pdy, <cn_f16*>px, <cn_f16*>pdx, <float*>pw, wd, <float*>pdw,
                      <float*>pdb, pm, pr, sdy, sdyx, parts, part, R, K, rms, nt)
        elif kind != KIND_F64:
            _backward(<cn_bf16*>pdy, <cn_bf16*>px, <cn_bf16*>pdx, <float*>pw, wd,
                      <float*>pdw, <float*>pdb, pm, pr, sdy, sdyx, parts, part, R, K,
                      rms, nt)
        else:
            _backward(<double*>pdy, <double*>px, <double*>pdx, <double*>pw, NULL,
                      <double*>pdw, <double*>pdb, pm, pr, sdy, sdyx, parts, part, R, K,
                      rms, nt)


def convert(cnp.ndarray src, cnp.ndarray dst):
    """dst = src between float32 and a 16-bit storage (float16 or bfloat16), in either
    direction, with the kernels' own conversions (exact widening; rounding to nearest
    even): C-contiguous arrays of the same size, checked by the caller."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src), i
    cdef int ks = storage_kind(src), kd = storage_kind(dst)
    cdef int nt = cynorm_threads_for(n)
    cdef void* ps = data(src)
    cdef void* pd = data(dst)
    with nogil:
        for i in prange(0, n, CHUNK, num_threads=nt, schedule="static"):
            if ks == KIND_F16:
                widen(<cn_f16*>ps + i, <float*>pd + i, min(CHUNK, n - i))
            elif ks != KIND_F32:
                widen(<cn_bf16*>ps + i, <float*>pd + i, min(CHUNK, n - i))
            elif kd == KIND_F16:
                narrow(<float*>ps + i, <cn_f16*>pd + i, min(CHUNK, n - i))
            else:
                narrow(<float*>ps + i, <cn_bf16*>pd + i, min(CHUNK, n - i))
