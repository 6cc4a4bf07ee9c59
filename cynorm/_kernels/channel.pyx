"""Channel family: BatchNorm.

x is viewed as (N, C, HW); channel c's set is the N runs x[n, c, :], HW elements each,
C * HW apart. Work items are the channels: a channel's statistics and its apply (or,
backward, its gradient sums and dx) are fused, so its runs are read from DRAM once. With
fewer than 4 channels per thread the channels are split into fixed pieces (short runs
grouped, long runs cut) whose partial results merge in a fixed order: the same bits.

The callers in cynorm._api validate everything; these functions trust their arguments.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange

from cynorm._openmp cimport cynorm_register_atfork, cynorm_threads_for
from cynorm._kernels._common cimport (
    SetLayout, make_layout, set_stats, split_set_stats, set_grad_sums, split_grad_sums,
    affine_const, grad_const, data,
)

import numpy as np

cnp.import_array()
cynorm_register_atfork()


cdef inline void _apply_channel(const floating* x, floating* y, const floating* w,
                                const floating* b, const double* mean,
                                const double* rstd, Py_ssize_t n0, Py_ssize_t n1,
                                Py_ssize_t c, Py_ssize_t C, Py_ssize_t HW) noexcept nogil:
    """Normalise runs x[n, c, :] for n in [n0, n1)."""
    cdef double scale = rstd[c] if w == NULL else rstd[c] * w[c]
    cdef double shift = 0.0 if b == NULL else b[c]
    cdef Py_ssize_t n
    for n in range(n0, n1):
        affine_const(x + (n * C + c) * HW, y + (n * C + c) * HW, HW, mean[c], scale, shift)


cdef void _forward(const floating* x, floating* y, const floating* w, const floating* b,
                   double* mean, double* rstd, double* var, double* parts, Py_ssize_t N,
                   Py_ssize_t C, Py_ssize_t HW, double eps, int welford, int training,
                   int nt) noexcept nogil:
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef Py_ssize_t c, r
    if training and parts == NULL:
        for c in prange(C, nogil=True, num_threads=nt, schedule="dynamic"):
            set_stats(x + c * HW, &L, welford, 1, eps, &mean[c], &rstd[c], &var[c])
            _apply_channel(x, y, w, b, mean, rstd, 0, N, c, C, HW)
        return
    if training:
        split_set_stats(x, &L, C, HW, parts, welford, 1, eps, mean, rstd, var, nt)
    # statistics known: every (n, c) run is independent
    for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
        _apply_channel(x, y, w, b, mean, rstd, r // C, r // C + 1, r % C, C, HW)


def forward(cnp.ndarray x, cnp.ndarray y, object weight, object bias, cnp.ndarray mean,
            cnp.ndarray rstd, cnp.ndarray var, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
            double eps, int welford, int training):
    """Normalise x (N, C, HW) per channel into y. training: compute mean, rstd and the
    biased var (C float64) from x; else apply the given mean and rstd."""
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef cnp.ndarray work = None
    cdef double* parts = NULL
    if training and C < 4 * nt and L.n_pieces > 1:
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
        if single:
            _forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, pv, parts,
                     N, C, HW, eps, welford, training, nt)
        else:
            _forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, pv,
                     parts, N, C, HW, eps, welford, training, nt)


# ---- backward -------------------------------------------------------------------------

cdef inline void _grad_channel(const floating* dy, const floating* x, floating* dx,
                               const floating* w, const double* mean, const double* rstd,
                               const double* sdy, const double* sdyx, Py_ssize_t n0,
                               Py_ssize_t n1, Py_ssize_t c, Py_ssize_t N, Py_ssize_t C,
                               Py_ssize_t HW, int training) noexcept nogil:
    """dx over runs [n0, n1) of channel c. Training: dx = rstd * (g - mean(g) - xhat *
    mean(g * xhat)), g = w_c * dy; eval (constant statistics): dx = w_c * rstd * dy."""
    cdef double rs = rstd[c], wc = 1.0 if w == NULL else w[c]
    cdef double M = <double>(N * HW), b = 0, c0 = 0
    cdef Py_ssize_t n
    if training:
        b = wc * rs * rs * rs * sdyx[c] / M
        c0 = wc * rs * sdy[c] / M
    for n in range(n0, n1):
        grad_const(dy + (n * C + c) * HW, x + (n * C + c) * HW, dx + (n * C + c) * HW,
                   HW, wc * rs, mean[c], b, c0)


cdef void _backward(const floating* dy, const floating* x, floating* dx,
                    const floating* w, floating* dw, floating* db, const double* mean,
                    const double* rstd, double* sdy, double* sdyx, double* parts,
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, int training,
                    int nt) noexcept nogil:
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef Py_ssize_t c, r
    if parts == NULL:
        for c in prange(C, nogil=True, num_threads=nt, schedule="dynamic"):
            set_grad_sums(dy + c * HW, x + c * HW, <const floating*>NULL, &L, mean[c],
                          &sdy[c], &sdyx[c])
            _grad_channel(dy, x, dx, w, mean, rstd, sdy, sdyx, 0, N, c, N, C, HW,
                          training)
    else:
        split_grad_sums(dy, x, <const floating*>NULL, &L, C, HW, mean, parts, sdy, sdyx,
                        nt)
        for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
            _grad_channel(dy, x, dx, w, mean, rstd, sdy, sdyx, r // C, r // C + 1, r % C,
                          N, C, HW, training)
    for c in range(C):
        dw[c] = <floating>(sdyx[c] * rstd[c])
        db[c] = <floating>sdy[c]


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
             cnp.ndarray dweight, cnp.ndarray dbias, cnp.ndarray mean, cnp.ndarray rstd,
             Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, int training):
    """dx, dweight, dbias of batch normalisation with the given per-channel statistics."""
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef SetLayout L = make_layout(N, HW, C * HW)
    cdef cnp.ndarray sums = np.empty(2 * C, dtype=np.float64)
    cdef cnp.ndarray work = None
    cdef double* parts = NULL
    if C < 4 * nt and L.n_pieces > 1:
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
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef bint single = cnp.PyArray_ITEMSIZE(x) == 4
    with nogil:
        if single:
            _backward(<float*>pdy, <float*>px, <float*>pdx, <float*>pw, <float*>pdw,
                      <float*>pdb, pm, pr, sdy, sdyx, parts, N, C, HW, training, nt)
        else:
            _backward(<double*>pdy, <double*>px, <double*>pdx, <double*>pw, <double*>pdw,
                      <double*>pdb, pm, pr, sdy, sdyx, parts, N, C, HW, training, nt)
