"""Channel family: BatchNorm.

x is viewed as (N, C, HW); channel c's set is the N runs x[n, c, :], HW elements each,
C * HW apart. Work items are the channels: a channel's statistics and its apply (or,
backward, its gradient sums and dx) are fused, so its runs are read from DRAM once. With
fewer than 4 channels per thread the channels are split into fixed pieces (short runs
grouped, long runs cut) whose partial results merge in a fixed order: the same bits.

Short runs (HW < SHORT_RUN, e.g. BatchNorm over (N, C) features) would make a channel a
strided gather. Then x is read as an (N, D = C * HW) matrix instead: tiles of
COL_ROWS rows by COL_WIDTH columns compute per-column partial moments (or gradient sums)
with contiguous, vectorised loops; the partials merge per channel over blocks and
columns in a fixed order; the apply runs row by row with per-column coefficients.

The callers in cynorm._api validate everything; these functions trust their arguments.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    SetLayout, make_layout, set_stats, split_set_stats, set_grad_sums, split_grad_sums,
    affine_act, act_grad_const, act_run, grad_const, chan_merge, inv_std, ACT_BLOCK, data,
)
from cynorm._kernels._common cimport cn_act_grad_f32, cn_act_grad_f64

import numpy as np

from cynorm._kernels import INHERITED_OPENMP_POOL

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)

cdef enum:
    SHORT_RUN = 64    # runs shorter than this take the column path
    COL_ROWS = 64     # rows per column tile: partials are 1/16 of a float32 input
    COL_WIDTH = 1024  # columns per tile: 64 x 1024 float32 = 256 KiB stays in L2


# ---- column path (short runs) ----------------------------------------------------------

cdef void _col_tile_moments(const floating* x, Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1,
                            Py_ssize_t j0, Py_ssize_t j1, int welford, double* pm,
                            double* pq) noexcept nogil:
    """Per-column mean and m2 of rows [r0, r1) of columns [j0, j1) into pm[j], pq[j]:
    corrected two-pass or Welford, columns side by side (elementwise, vectorised)."""
    cdef double sd[COL_WIDTH]
    cdef double cnt = <double>(r1 - r0), d, v, k
    cdef Py_ssize_t r, j, n = j1 - j0
    cdef const floating* xr
    for j in range(n):
        pm[j0 + j] = 0
        pq[j0 + j] = 0
        sd[j] = 0
    if welford:
        k = 0
        for r in range(r0, r1):
            xr = x + r * D + j0
            k = k + 1
            for j in range(n):
                v = xr[j]
                d = v - pm[j0 + j]
                pm[j0 + j] += d / k
                pq[j0 + j] += d * (v - pm[j0 + j])
        return
    for r in range(r0, r1):
        xr = x + r * D + j0
        for j in range(n):
            pm[j0 + j] += xr[j]
    for j in range(n):
        pm[j0 + j] = pm[j0 + j] / cnt
    for r in range(r0, r1):
        xr = x + r * D + j0
        for j in range(n):
            d = xr[j] - pm[j0 + j]
            sd[j] += d
            pq[j0 + j] += d * d
    for j in range(n):
        pm[j0 + j] += sd[j] / cnt
        pq[j0 + j] = max(pq[j0 + j] - sd[j] * sd[j] / cnt, 0.0)


cdef void _col_tile_grad_sums(const floating* dy, const floating* x, const double* colm,
                              Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t j0,
                              Py_ssize_t j1, double* ps, double* psx) noexcept nogil:
    """Per-column sum(dy) and sum(dy * (x - mean)) over rows [r0, r1)."""
    cdef Py_ssize_t r, j, n = j1 - j0
    cdef const floating* dyr
    cdef const floating* xr
    for j in range(n):
        ps[j0 + j] = 0
        psx[j0 + j] = 0
    for r in range(r0, r1):
        dyr = dy + r * D + j0
        xr = x + r * D + j0
        for j in range(n):
            ps[j0 + j] += dyr[j]
            psx[j0 + j] += dyr[j] * (xr[j] - colm[j0 + j])


cdef void _col_affine_row(const floating* x, floating* y, const double* colm,
                          const double* cola, const double* colc,
                          Py_ssize_t D) noexcept nogil:
    """One row: y = (x - colm) * cola + colc."""
    cdef Py_ssize_t j
    for j in range(D):
        y[j] = <floating>((x[j] - colm[j]) * cola[j] + colc[j])


cdef void _col_act_grad_row(const floating* dy, const floating* x, floating* g,
                            const double* colm, const double* cola, const double* colc,
                            Py_ssize_t D, int act) noexcept nogil:
    """One row: g = dy * act'(a), a = (x - colm) * cola + colc rounded as
    _col_affine_row rounds it (the forward's pre-activation). g may be dy."""
    cdef floating a[ACT_BLOCK]
    cdef Py_ssize_t i = 0, e
    while i < D:
        e = i + ACT_BLOCK if i + ACT_BLOCK < D else D
        _col_affine_row(x + i, a, colm + i, cola + i, colc + i, e - i)
        if floating is float:
            cn_act_grad_f32(a, dy + i, g + i, e - i, act)
        else:
            cn_act_grad_f64(a, dy + i, g + i, e - i, act)
        i = e


cdef void _col_grad_row(const floating* dy, const floating* x, floating* dx,
                        const double* colm, const double* cola, const double* colb,
                        const double* colc, Py_ssize_t D) noexcept nogil:
    """One row: dx = cola * dy - colb * (x - colm) - colc."""
    cdef Py_ssize_t j
    for j in range(D):
        dx[j] = <floating>(cola[j] * dy[j] - colb[j] * (x[j] - colm[j]) - colc[j])


cdef void _col_forward(const floating* x, floating* y, const floating* w,
                       const floating* b, double* mean, double* rstd, double* var,
                       double* part, double* cols, Py_ssize_t N, Py_ssize_t C,
                       Py_ssize_t HW, double eps, int welford, int training, int act,
                       int nt) noexcept nogil:
    """Forward on the column path; part: 2 * n_blocks * D doubles, cols: 3 * D."""
    cdef Py_ssize_t D = C * HW, n_blocks = (N + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t n_pieces = (D + COL_WIDTH - 1) // COL_WIDTH, t, blk, j0, c, q, h, j, r
    cdef double* pm = part
    cdef double* pq = part + n_blocks * D
    cdef double cnt, m, m2
    if training:
        for t in prange(n_blocks * n_pieces, nogil=True, num_threads=nt, schedule="static"):
            blk = t // n_pieces
            j0 = (t % n_pieces) * COL_WIDTH
            _col_tile_moments(x + blk * COL_ROWS * D, D, 0,
                              min(COL_ROWS, N - blk * COL_ROWS), j0,
                              min(j0 + COL_WIDTH, D), welford, pm + blk * D, pq + blk * D)
        for c in prange(C, nogil=True, num_threads=nt, schedule="static"):
            cnt = 0
            m = 0
            m2 = 0
            for q in range(n_blocks):
                for h in range(HW):
                    chan_merge(&cnt, &m, &m2, <double>min(COL_ROWS, N - q * COL_ROWS),
                               pm[q * D + c * HW + h], pq[q * D + c * HW + h])
            mean[c] = m
            var[c] = m2 / <double>(N * HW)
            rstd[c] = inv_std(m2, N * HW, eps)
    for j in range(D):
        c = j // HW
        cols[j] = mean[c]
        cols[D + j] = rstd[c] if w == NULL else rstd[c] * w[c]
        cols[2 * D + j] = 0.0 if b == NULL else b[c]
    for r in prange(N, nogil=True, num_threads=nt, schedule="static"):
        _col_affine_row(x + r * D, y + r * D, cols, cols + D, cols + 2 * D, D)
        act_run(y + r * D, D, act)


cdef void _col_backward(const floating* dy, const floating* x, floating* dx,
                        const floating* w, const floating* b, floating* g, floating* dw,
                        floating* db, const double* mean, const double* rstd, double* part,
                        double* cols, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
                        int training, int act, int nt) noexcept nogil:
    """Backward on the column path; part: 2 * n_blocks * D doubles, cols: 6 * D.
    act != 0: first g = dy * act'(a) row by row (a recomputed with the forward's
    per-column coefficients), which then takes dy's place."""
    cdef Py_ssize_t D = C * HW, n_blocks = (N + COL_ROWS - 1) // COL_ROWS
    cdef Py_ssize_t n_pieces = (D + COL_WIDTH - 1) // COL_WIDTH, t, blk, j0, c, q, h, j, r
    cdef double* ps = part
    cdef double* psx = part + n_blocks * D
    cdef double sdy, sdyx, rs, wc, M = <double>(N * HW)
    for j in range(D):
        cols[j] = mean[j // HW]
    if act:
        for j in range(D):
            c = j // HW
            cols[4 * D + j] = rstd[c] if w == NULL else rstd[c] * w[c]
            cols[5 * D + j] = 0.0 if b == NULL else b[c]
        for r in prange(N, nogil=True, num_threads=nt, schedule="static"):
            _col_act_grad_row(dy + r * D, x + r * D, g + r * D, cols, cols + 4 * D,
                              cols + 5 * D, D, act)
        dy = g
    for t in prange(n_blocks * n_pieces, nogil=True, num_threads=nt, schedule="static"):
        blk = t // n_pieces
        j0 = (t % n_pieces) * COL_WIDTH
        _col_tile_grad_sums(dy + blk * COL_ROWS * D, x + blk * COL_ROWS * D, cols, D, 0,
                            min(COL_ROWS, N - blk * COL_ROWS), j0, min(j0 + COL_WIDTH, D),
                            ps + blk * D, psx + blk * D)
    for c in range(C):
        sdy = 0
        sdyx = 0
        for q in range(n_blocks):
            for h in range(HW):
                sdy += ps[q * D + c * HW + h]
                sdyx += psx[q * D + c * HW + h]
        rs = rstd[c]
        wc = 1.0 if w == NULL else w[c]
        dw[c] = <floating>(sdyx * rs)
        db[c] = <floating>sdy
        for h in range(HW):
            cols[D + c * HW + h] = wc * rs
            # ordered so that no intermediate leaves the float64 range
            cols[2 * D + c * HW + h] = wc * (rs * (rs * (rs * sdyx / M))) if training else 0.0
            cols[3 * D + c * HW + h] = wc * rs * sdy / M if training else 0.0
    for r in prange(N, nogil=True, num_threads=nt, schedule="static"):
        _col_grad_row(dy + r * D, x + r * D, dx + r * D, cols, cols + D, cols + 2 * D,
                      cols + 3 * D, D)


cdef inline void _apply_channel(const floating* x, floating* y, const floating* w,
                                const floating* b, const double* mean,
                                const double* rstd, Py_ssize_t n0, Py_ssize_t n1,
                                Py_ssize_t c, Py_ssize_t C, Py_ssize_t HW,
                                int act) noexcept nogil:
    """Normalise runs x[n, c, :] for n in [n0, n1), then the activation act."""
    cdef double wc = 1.0 if w == NULL else w[c]
    cdef double shift = 0.0 if b == NULL else b[c]
    cdef Py_ssize_t n
    for n in range(n0, n1):
        affine_act(x + (n * C + c) * HW, y + (n * C + c) * HW, HW, mean[c], rstd[c], wc,
                   shift, act)


cdef void _forward(const floating* x, floating* y, const floating* w, const floating* b,
                   double* mean, double* rstd, double* var, double* parts, Py_ssize_t N,
                   Py_ssize_t C, Py_ssize_t HW, double eps, int welford, int training,
                   int act, int nt) noexcept nogil:
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef Py_ssize_t c, r
    if training and parts == NULL:
        for c in prange(C, nogil=True, num_threads=nt, schedule="dynamic"):
            set_stats(x + c * HW, &L, welford, 1, eps, NULL, &mean[c], &rstd[c], &var[c])
            _apply_channel(x, y, w, b, mean, rstd, 0, N, c, C, HW, act)
        return
    if training:
        split_set_stats(x, &L, C, HW, parts, welford, 1, eps, mean, rstd, var, nt)
    # statistics known: every (n, c) run is independent
    for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
        _apply_channel(x, y, w, b, mean, rstd, r // C, r // C + 1, r % C, C, HW, act)


def forward(cnp.ndarray x, cnp.ndarray y, object weight, object bias, cnp.ndarray mean,
            cnp.ndarray rstd, cnp.ndarray var, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
            double eps, int welford, int training, int act=0):
    """Normalise x (N, C, HW) per channel into y. training: compute mean, rstd and the
    biased var (C float64) from x; else apply the given mean and rstd. act: the
    activation applied to the affine's output (codes as in slab.forward)."""
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef bint columns = HW < SHORT_RUN
    cdef cnp.ndarray work = None, colwork = None
    cdef double* parts = NULL
    cdef double* cols = NULL
    if columns:
        work = np.empty(2 * ((N + COL_ROWS - 1) // COL_ROWS) * C * HW, dtype=np.float64)
        colwork = np.empty(3 * C * HW, dtype=np.float64)
        parts = <double*>data(work)
        cols = <double*>data(colwork)
    elif training and C < 4 * nt and L.n_pieces > 1:
        work = np.empty(3 * C * L.n_pieces, dtype=np.float64)
        parts = <double*>data(work)
    cdef void* px = data(x)
    cdef void* py = data(y)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef double* pv = <double*>data(var)
    cdef bint single = cnp.PyArray_ITEMSIZE(x) == 4
    with nogil:
        if columns and single:
            _col_forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, pv,
                         parts, cols, N, C, HW, eps, welford, training, act, nt)
        elif columns:
            _col_forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, pv,
                         parts, cols, N, C, HW, eps, welford, training, act, nt)
        elif single:
            _forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, pv, parts,
                     N, C, HW, eps, welford, training, act, nt)
        else:
            _forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, pv,
                     parts, N, C, HW, eps, welford, training, act, nt)


# ---- backward -------------------------------------------------------------------------

cdef inline void _grad_channel(const floating* dy, const floating* x, floating* dx,
                               const floating* w, const double* mean, const double* rstd,
                               const double* sdy, const double* sdyx, Py_ssize_t n0,
                               Py_ssize_t n1, Py_ssize_t c, Py_ssize_t N, Py_ssize_t C,
                               Py_ssize_t HW, int training) noexcept nogil:
    """dx over runs [n0, n1) of channel c. Training: dx = rstd * (g - mean(g) - xhat *
    mean(g * xhat)), g = w_c * dy; eval (constant statistics): dx = w_c * rstd * dy."""
    cdef double rs = rstd[c], wc = 1.0 if w == NULL else w[c]
    cdef double M = <double>(N * HW), mg = 0, mgx = 0
    cdef Py_ssize_t n
    if training:
        mg = wc * sdy[c] / M
        mgx = wc * (rs * sdyx[c] / M)
    for n in range(n0, n1):
        grad_const(dy + (n * C + c) * HW, x + (n * C + c) * HW, dx + (n * C + c) * HW,
                   HW, wc, mg, mgx, mean[c], rs, NULL, NULL)


cdef inline void _act_grad_channel(const floating* dy, const floating* x, floating* g,
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


cdef void _backward(const floating* dy, const floating* x, floating* dx,
                    const floating* w, const floating* b, floating* g, floating* dw,
                    floating* db, const double* mean, const double* rstd, double* sdy,
                    double* sdyx, double* parts, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
                    int training, int act, int nt) noexcept nogil:
    """act != 0: g = dy * act'(a) is formed into g (per channel, or in a pass of its
    own when channels are split) and takes dy's place."""
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef Py_ssize_t c, r
    cdef const floating* gd = <const floating*>g if act else dy
    if parts == NULL:
        for c in prange(C, nogil=True, num_threads=nt, schedule="dynamic"):
            if act:
                _act_grad_channel(dy, x, g, w, b, mean, rstd, 0, N, c, C, HW, act)
            set_grad_sums(gd + c * HW, x + c * HW, <const floating*>NULL, &L, mean[c],
                          &sdy[c], &sdyx[c])
            _grad_channel(gd, x, dx, w, mean, rstd, sdy, sdyx, 0, N, c, N, C, HW,
                          training)
    else:
        if act:
            for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
                _act_grad_channel(dy, x, g, w, b, mean, rstd, r // C, r // C + 1, r % C, C,
                                  HW, act)
        split_grad_sums(gd, x, <const floating*>NULL, &L, C, HW, mean, parts, sdy, sdyx,
                        nt)
        for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
            _grad_channel(gd, x, dx, w, mean, rstd, sdy, sdyx, r // C, r // C + 1, r % C,
                          N, C, HW, training)
    for c in range(C):
        dw[c] = <floating>(sdyx[c] * rstd[c])
        db[c] = <floating>sdy[c]


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
             cnp.ndarray dweight, cnp.ndarray dbias, cnp.ndarray mean, cnp.ndarray rstd,
             Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, int training, int act=0,
             object bias=None, object gbuf=None):
    """dx, dweight, dbias of batch normalisation with the given per-channel statistics.
    act != 0: of act(normalisation), with the forward's bias; gbuf: an array of x's shape
    for dy * act'(a), dx itself unless dx is x."""
    if N * HW == 0:  # no elements: parameter gradients are empty sums
        dweight.fill(0)
        dbias.fill(0)
        return
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef bint columns = HW < SHORT_RUN
    cdef cnp.ndarray sums = np.empty(2 * C, dtype=np.float64)
    cdef cnp.ndarray work = None, colwork = None
    cdef double* parts = NULL
    cdef double* cols = NULL
    if columns:
        work = np.empty(2 * ((N + COL_ROWS - 1) // COL_ROWS) * C * HW, dtype=np.float64)
        colwork = np.empty(6 * C * HW, dtype=np.float64)
        parts = <double*>data(work)
        cols = <double*>data(colwork)
    elif C < 4 * nt and L.n_pieces > 1:
        work = np.empty(2 * C * L.n_pieces, dtype=np.float64)
        parts = <double*>data(work)
    cdef double* sdy = <double*>data(sums)
    cdef double* sdyx = sdy + C
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
    cdef bint single = cnp.PyArray_ITEMSIZE(x) == 4
    with nogil:
        if columns and single:
            _col_backward(<float*>pdy, <float*>px, <float*>pdx, <float*>pw, <float*>pb,
                          <float*>pg, <float*>pdw, <float*>pdb, pm, pr, parts, cols, N, C,
                          HW, training, act, nt)
        elif columns:
            _col_backward(<double*>pdy, <double*>px, <double*>pdx, <double*>pw,
                          <double*>pb, <double*>pg, <double*>pdw, <double*>pdb, pm, pr,
                          parts, cols, N, C, HW, training, act, nt)
        elif single:
            _backward(<float*>pdy, <float*>px, <float*>pdx, <float*>pw, <float*>pb,
                      <float*>pg, <float*>pdw, <float*>pdb, pm, pr, sdy, sdyx, parts, N,
                      C, HW, training, act, nt)
        else:
            _backward(<double*>pdy, <double*>px, <double*>pdx, <double*>pw, <double*>pb,
                      <double*>pg, <double*>pdw, <double*>pdb, pm, pr, sdy, sdyx, parts,
                      N, C, HW, training, act, nt)
