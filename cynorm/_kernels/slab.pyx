"""Slab family: GroupNorm, InstanceNorm (G = C), the GN paper's LayerNorm (G = 1).

x is viewed as (N * G, M) with M = (C / G) * HW: each (n, g) set is one contiguous slab.
Work items are the slabs; a slab's statistics and its affine apply (or, backward, its
gradient sums and dx) are fused, so the slab is read from DRAM once. With fewer slabs
than 4 per thread the kernel splits them: forward into fixed pieces, backward into
(n, c) runs. Both ways compute the same bits (see _common.pxd).

The callers in cynorm._api validate everything; these functions trust their arguments:
C-contiguous data arrays of one storage dtype (float64, float32, float16, bfloat16),
parameters float64 for float64 data and float32 otherwise, statistics float64 of shape
(N, G).
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    SetLayout, make_layout, piece_bounds, set_stats, split_set_stats, affine_act,
    act_grad_const, act_grad_sums, act_grad_dx, lane_grad_sums, grad_const, data, storage,
    storage_kind, cn_f16, cn_bf16, KIND_F64, KIND_F32, KIND_F16, fold_param_grads,
    stream_out,
)

import numpy as np

from cynorm._kernels import INHERITED_OPENMP_POOL

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)


cdef inline void _apply_range(const storage* xs, storage* ys, Py_ssize_t start,
                              Py_ssize_t end, Py_ssize_t HW, Py_ssize_t c_first,
                              double mean, double rstd, const floating* w,
                              const floating* b, int act, bint stream) noexcept nogil:
    """Normalise elements [start, end) of one slab; channel c_first + i // HW owns i.
    act: the activation epilogue (0: none). stream: y stored past the caches
    (stream_out)."""
    cdef Py_ssize_t i = start, j, stop
    cdef double wc, shift
    while i < end:
        j = i // HW
        stop = (j + 1) * HW
        if stop > end:
            stop = end
        wc = 1.0 if w == NULL else w[c_first + j]
        shift = 0.0 if b == NULL else b[c_first + j]
        affine_act(xs + i, ys + i, stop - i, mean, rstd, wc, shift, act, stream)
        i = stop


cdef inline void _split_apply(const storage* x, storage* y, const floating* w,
                              const floating* b, const double* mean, const double* rstd,
                              const SetLayout* L, Py_ssize_t k, Py_ssize_t C,
                              Py_ssize_t HW, Py_ssize_t G, int act,
                              bint stream) noexcept nogil:
    """Apply over piece k (of all N * G * n_pieces) of the split forward."""
    cdef Py_ssize_t cpg = C // G, s = k // L.n_pieces, run0, nruns, e0, elen
    piece_bounds(L, k - s * L.n_pieces, &run0, &nruns, &e0, &elen)
    _apply_range(x + s * L.size, y + s * L.size, e0, e0 + elen, HW, (s % G) * cpg,
                 mean[s], rstd[s], w, b, act, stream)


cdef void _forward(const storage* x, storage* y, const floating* w, const floating* b,
                   double* mean, double* rstd, double* parts, Py_ssize_t N, Py_ssize_t C,
                   Py_ssize_t HW, Py_ssize_t G, double eps, int welford, int act,
                   int nt) noexcept nogil:
    cdef Py_ssize_t cpg = C // G, M = cpg * HW, n_sets = N * G
    cdef SetLayout L = make_layout(1, M, M)
    cdef Py_ssize_t P = L.n_pieces, s, k
    # a y far larger than the caches is stored past them (no read before the write)
    cdef bint stream = stream_out(N * C * HW, HW, sizeof(storage))
    if parts == NULL:
        for s in prange(n_sets, nogil=True, num_threads=nt, schedule="static"):
            set_stats(x + s * M, &L, welford, 1, eps,
                      x + (s + 1) * M if s + 1 < n_sets else NULL, &mean[s], &rstd[s], NULL)
            _apply_range(x + s * M, y + s * M, 0, M, HW, (s % G) * cpg, mean[s],
                         rstd[s], w, b, act, stream)
        return
    split_set_stats(x, &L, n_sets, M, parts, welford, 1, eps, mean, rstd, NULL, nt)
    for k in prange(n_sets * P, nogil=True, num_threads=nt, schedule="static"):
        _split_apply(x, y, w, b, mean, rstd, &L, k, C, HW, G, act, stream)


def forward(cnp.ndarray x, cnp.ndarray y, object weight, object bias, cnp.ndarray mean,
            cnp.ndarray rstd, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, Py_ssize_t G,
            double eps, int welford, int act=0):
    """Normalise x (N, C, HW) over G groups into y; write mean and rstd (N * G float64).
    act: the activation applied to the affine's output (0 none, 1 silu, 2 gelu,
    3 gelu_tanh, 4 relu)."""
    if G == 0:  # no channels: nothing to normalise
        return
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef SetLayout L = make_layout(1, (C // G) * HW, (C // G) * HW)
    cdef cnp.ndarray work = None
    cdef double* parts = NULL
    if N * G < 4 * nt and L.n_pieces > 1:
        work = np.empty(3 * N * G * L.n_pieces, dtype=np.float64)
        parts = <double*>data(work)
    cdef void* px = data(x)
    cdef void* py = data(y)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef double* pm = <double*>data(mean)
    cdef double* pr = <double*>data(rstd)
    cdef int kind = storage_kind(x)
    with nogil:
        if kind == KIND_F32:
            _forward(<float*>px, <float*>py, <float*>pw, <float*>pb, pm, pr, parts,
                     N, C, HW, G, eps, welford, act, nt)
        elif kind == KIND_F64:
            _forward(<double*>px, <double*>py, <double*>pw, <double*>pb, pm, pr, parts,
                     N, C, HW, G, eps, welford, act, nt)
        elif kind == KIND_F16:
            _forward(<cn_f16*>px, <cn_f16*>py, <float*>pw, <float*>pb, pm, pr, parts,
                     N, C, HW, G, eps, welford, act, nt)
        else:
            _forward(<cn_bf16*>px, <cn_bf16*>py, <float*>pw, <float*>pb, pm, pr, parts,
                     N, C, HW, G, eps, welford, act, nt)


# ---- backward -------------------------------------------------------------------------

cdef inline void _run_sums(const storage* dy, const storage* x, const double* mean,
                           double* sdy, double* sdyx, Py_ssize_t r, Py_ssize_t C,
                           Py_ssize_t HW, Py_ssize_t G, const floating* w,
                           const floating* b, const double* rstd, int act) noexcept nogil:
    """sum(dy) and sum(dy * (x - mean)) over run r = n * C + c. act != 0 (16-bit data
    only): of g = dy * act'(a) instead, formed in float32 on the way."""
    cdef Py_ssize_t c = r % C, s = (r // C) * G + c // (C // G)
    sdy[r] = 0
    sdyx[r] = 0
    if act:
        act_grad_sums(dy + r * HW, x + r * HW, HW, mean[s], rstd[s],
                      1.0 if w == NULL else w[c], 0.0 if b == NULL else b[c], act,
                      &sdy[r], &sdyx[r])
        return
    lane_grad_sums(dy + r * HW, x + r * HW, <const float*>NULL, HW, mean[s], &sdy[r],
                   &sdyx[r])


cdef inline void _run_grad(const storage* dy, const storage* x, storage* dx,
                           const floating* w, const double* mean, const double* rstd,
                           const double* sdy, const double* sdyx, Py_ssize_t r,
                           Py_ssize_t C, Py_ssize_t HW, Py_ssize_t G,
                           const floating* b, int act, bint stream) noexcept nogil:
    """dx over run r = n * C + c, from its slab's folded sums (stream: dx stored past
    the caches, stream_out):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w_c * dy.
    act != 0 (16-bit data only): dy * act'(a) in dy's place, formed in float32."""
    cdef Py_ssize_t cpg = C // G, n = r // C, c = r % C, g = c // cpg
    cdef Py_ssize_t s = n * G + g, j, q
    cdef double A = 0, B = 0, wj, rs = rstd[s], M = <double>(cpg * HW)
    for j in range(cpg):
        q = n * C + g * cpg + j
        wj = 1.0 if w == NULL else w[g * cpg + j]
        A += wj * sdy[q]
        B += wj * sdyx[q]
    # mean(g) = A / M, mean(g * xhat) = rs * B / M
    if act:
        act_grad_dx(dy + r * HW, x + r * HW, dx + r * HW, HW, 1.0 if w == NULL else w[c],
                    A / M, rs * B / M, mean[s], rs, 0.0 if b == NULL else b[c], act)
        return
    grad_const(dy + r * HW, x + r * HW, dx + r * HW, HW, 1.0 if w == NULL else w[c],
               A / M, rs * B / M, mean[s], rs, stream)


cdef inline void _run_act_grad(const storage* dy, const storage* x, storage* g,
                               const floating* w, const floating* b, const double* mean,
                               const double* rstd, Py_ssize_t r, Py_ssize_t C,
                               Py_ssize_t HW, Py_ssize_t G, int act) noexcept nogil:
    """g = dy * act'(a) over run r = n * C + c, a the forward's pre-activation."""
    cdef Py_ssize_t c = r % C, s = (r // C) * G + c // (C // G)
    act_grad_const(dy + r * HW, x + r * HW, g + r * HW, HW, mean[s], rstd[s],
                   1.0 if w == NULL else w[c], 0.0 if b == NULL else b[c], act)


cdef void _backward(const storage* dy, const storage* x, storage* dx,
                    const floating* w, const floating* b, storage* g, floating* dw,
                    floating* db, const double* mean, const double* rstd, double* sdy,
                    double* sdyx, double* acc, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
                    Py_ssize_t G, int last, int act, bint stream, int nt) noexcept nogil:
    """Samples [0, N) (a chunk of the batch): dx, and the dweight/dbias sums continued
    in acc[c], acc[C + c] (float64), written to dw/db when last. act != 0: the gradient
    reaching the affine's output, g = dy * act'(a), is formed run by run into g (dx's
    buffer or a scratch one) and takes dy's place; 16-bit data keep it in float32
    instead, recomputed where the sums and dx read it (g unused)."""
    cdef Py_ssize_t cpg = C // G, s, r, j
    cdef int lp_act = 0  # 16-bit: the activation's gradient inside the sums and dx
    if storage is cn_f16 or storage is cn_bf16:
        lp_act = act
    cdef int st_act = act - lp_act  # other dtypes: g formed into a buffer first
    cdef const storage* gd = <const storage*>g if st_act else dy
    if N * G >= 4 * nt:
        # fused: a slab's sums, then its dx while the slab is still in cache. The next
        # slab is left to the hardware prefetchers: prefetching it into L1 during the
        # dx pass measured 1.2-1.4x slower out of cache (see grad_const)
        for s in prange(N * G, nogil=True, num_threads=nt, schedule="static"):
            r = (s // G) * C + (s % G) * cpg
            for j in range(cpg):
                if st_act:
                    _run_act_grad(dy, x, g, w, b, mean, rstd, r + j, C, HW, G, act)
                _run_sums(gd, x, mean, sdy, sdyx, r + j, C, HW, G, w, b, rstd, lp_act)
            for j in range(cpg):
                _run_grad(gd, x, dx, w, mean, rstd, sdy, sdyx, r + j, C, HW, G, b, lp_act,
                          stream)
    else:
        for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
            if st_act:
                _run_act_grad(dy, x, g, w, b, mean, rstd, r, C, HW, G, act)
            _run_sums(gd, x, mean, sdy, sdyx, r, C, HW, G, w, b, rstd, lp_act)
        for r in prange(N * C, nogil=True, num_threads=nt, schedule="static"):
            _run_grad(gd, x, dx, w, mean, rstd, sdy, sdyx, r, C, HW, G, b, lp_act, stream)
    fold_param_grads(sdy, sdyx, rstd, acc, dw, db, N, C, G, last, nt)


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
             cnp.ndarray dweight, cnp.ndarray dbias, cnp.ndarray mean, cnp.ndarray rstd,
             Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, Py_ssize_t G, int act=0,
             object bias=None, object gbuf=None):
    """dx, dweight, dbias of the slab normalisation (see DESIGN.md, "Backward").
    act != 0: of act(normalisation), with the forward's bias; gbuf: an array of x's
    shape for dy * act'(a), dx itself unless dx is x.

    Two float64 sums per (n, c) run: with short runs (under 128 bytes) the batch is
    done in chunks of samples whose sums take at most 1/16 of the input."""
    if G == 0 or N * HW == 0:  # no elements: parameter gradients are empty sums
        dweight.fill(0)
        dbias.fill(0)
        return
    cdef int nt = cynorm_threads_for(N * C * HW)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x), nc = N, n0, n1
    if HW * isz < 128:
        nc = max(1, (N * HW * isz) // 256)
    # scratch through NumPy's C API: on a tiny call, np.empty / np.zeros (a Python-level
    # call each) cost as much as the arithmetic
    cdef cnp.npy_intp n_work = 2 * nc * C, n_accs = 2 * C
    cdef cnp.ndarray work = cnp.PyArray_EMPTY(1, &n_work, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray accs = cnp.PyArray_ZEROS(1, &n_accs, cnp.NPY_FLOAT64, 0)
    cdef double* sdy = <double*>data(work)
    cdef double* sdyx = sdy + nc * C
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
    cdef Py_ssize_t step = C * HW * isz
    cdef int kind = storage_kind(x)
    # a dx far larger than the caches is stored past them (the call's whole dx)
    cdef bint stream = stream_out(N * C * HW, HW, isz)
    with nogil:
        n0 = 0
        while n0 < N:
            n1 = min(n0 + nc, N)
            if kind == KIND_F16:
                _backward(<cn_f16*>(pdy + n0 * step), <cn_f16*>(px + n0 * step),
                          <cn_f16*>(pdx + n0 * step), <float*>pw, <float*>pb,
                          <cn_f16*>(pg + n0 * step if act else NULL), <float*>pdw,
                          <float*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, acc, n1 - n0,
                          C, HW, G, n1 == N, act, stream, nt)
            elif kind != KIND_F64 and kind != KIND_F32:
                _backward(<cn_bf16*>(pdy + n0 * step), <cn_bf16*>(px + n0 * step),
                          <cn_bf16*>(pdx + n0 * step), <float*>pw, <float*>pb,
                          <cn_bf16*>(pg + n0 * step if act else NULL), <float*>pdw,
                          <float*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, acc, n1 - n0,
                          C, HW, G, n1 == N, act, stream, nt)
            elif isz == 4:
                _backward(<float*>(pdy + n0 * step), <float*>(px + n0 * step),
                          <float*>(pdx + n0 * step), <float*>pw, <float*>pb,
                          <float*>(pg + n0 * step if act else NULL), <float*>pdw,
                          <float*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, acc, n1 - n0,
                          C, HW, G, n1 == N, act, stream, nt)
            else:
                _backward(<double*>(pdy + n0 * step), <double*>(px + n0 * step),
                          <double*>(pdx + n0 * step), <double*>pw, <double*>pb,
                          <double*>(pg + n0 * step if act else NULL), <double*>pdw,
                          <double*>pdb, pm + n0 * G, pr + n0 * G, sdy, sdyx, acc, n1 - n0,
                          C, HW, G, n1 == N, act, stream, nt)
            n0 = n1
