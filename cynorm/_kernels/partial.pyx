"""Partial statistics, their merge, and applies with given statistics: the steps with
which a set spread over chunks, processes or machines is normalised (DESIGN.md,
"Scale-out: statistics are mergeable").

x (one chunk) is viewed as (A, K, B); its K channels fall into groups
[bounds[g], bounds[g + 1]).
- per_sample = 1: set (a, g) is the contiguous span x[a, bounds[g]:bounds[g + 1], :]
  (GroupNorm and InstanceNorm sets; LayerNorm/RMSNorm rows with K = 1);
- per_sample = 0: set g is x[:, bounds[g]:bounds[g + 1], :], A runs K * B apart
  (BatchNorm: one group per channel).
Sets are cut into the family kernels' fixed pieces (make_layout) and every piece is a
work item; a set's moments are the fold of its pieces in piece order. So a chunk holding
whole sets gets bitwise the moments its family kernel computes, for any thread count.

Moments are (count, mean, m2) per set, float64, stored as a (3, S) array; centered = 0
(RMSNorm) gives mean 0 and m2 = the sum of squares.

Storage dtypes (see _common.pxd): x, dy, y and dx of the fused type `storage` (float64,
float32, float16, bfloat16; 16-bit data widened exactly block by block in the shared
helpers, never copied whole), weight and bias float32 for every storage but float64. The callers in cynorm._stats_api
validate everything; these functions trust their arguments.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange

from cynorm._openmp cimport cynorm_init_fork_guard, cynorm_threads_for
from cynorm._kernels._common cimport (
    CHUNK, SetLayout, make_layout, piece_moments, fold_moments, chan_merge,
    split_grad_sums, affine_const, affine_wide, affine_elementwise, grad_const, grad_wide,
    data, storage, storage_kind, cn_f16, cn_bf16, KIND_F32, KIND_F16, KIND_BF16,
)

import numpy as np

from cynorm._kernels import INHERITED_OPENMP_POOL

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)


cdef inline Py_ssize_t _group_of_piece(const Py_ssize_t* poff, Py_ssize_t G,
                                       Py_ssize_t r) noexcept nogil:
    """The group g with poff[g] <= r < poff[g + 1] (poff: cumulative pieces per group;
    groups without pieces are skipped)."""
    cdef Py_ssize_t lo = 0, hi = G, mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if poff[mid] <= r:
            lo = mid
        else:
            hi = mid
    return lo


cdef void _moments(const storage* x, const SetLayout* Ls, const Py_ssize_t* goff,
                   const Py_ssize_t* poff, Py_ssize_t G, Py_ssize_t n_outer,
                   Py_ssize_t outer_stride, double* parts, double* out, int welford,
                   int centered, int nt) noexcept nogil:
    cdef Py_ssize_t T = poff[G], S = n_outer * G, k, a, r, g, s
    for k in prange(n_outer * T, nogil=True, num_threads=nt, schedule="static"):
        a = k // T
        r = k - a * T
        g = _group_of_piece(poff, G, r)
        piece_moments(x + a * outer_stride + goff[g], &Ls[g], r - poff[g], welford,
                      centered, NULL, &parts[3 * k], &parts[3 * k + 1], &parts[3 * k + 2])
    for s in prange(S, nogil=True, num_threads=nt, schedule="static"):
        a = s // G
        g = s - a * G
        fold_moments(parts + 3 * (a * T + poff[g]), poff[g + 1] - poff[g], centered,
                     &out[S + s], &out[2 * S + s])
        out[s] = <double>Ls[g].size


def moments(cnp.ndarray x, cnp.ndarray out, Py_ssize_t A, Py_ssize_t K, Py_ssize_t B,
            cnp.ndarray bounds, int per_sample, int centered, int welford):
    """(count, mean, m2) of every set of x (A, K, B) into out (3, S) float64, with
    S = A * G (per_sample) or G sets, G = len(bounds) - 1 (intp group boundaries)."""
    cdef Py_ssize_t G = bounds.shape[0] - 1, g, k0, k1
    cdef Py_ssize_t n_outer = A if per_sample else 1
    cdef const Py_ssize_t* pb = <const Py_ssize_t*>data(bounds)
    cdef cnp.ndarray layouts = np.empty(max(G, 1) * sizeof(SetLayout), dtype=np.uint8)
    cdef cnp.ndarray offsets = np.empty(2 * G + 1, dtype=np.intp)
    cdef SetLayout* Ls = <SetLayout*>data(layouts)
    cdef Py_ssize_t* goff = <Py_ssize_t*>data(offsets)
    cdef Py_ssize_t* poff = goff + G
    if G == 0:
        return
    poff[0] = 0
    for g in range(G):
        k0 = pb[g]
        k1 = pb[g + 1]
        Ls[g] = make_layout(1 if per_sample else A, (k1 - k0) * B, K * B)
        goff[g] = k0 * B
        poff[g + 1] = poff[g] + Ls[g].n_pieces
    cdef cnp.ndarray work = np.empty(max(3 * n_outer * poff[G], 1), dtype=np.float64)
    cdef double* parts = <double*>data(work)
    cdef double* po = <double*>data(out)
    cdef void* px = data(x)
    cdef int nt = cynorm_threads_for(A * K * B)
    cdef int kind = storage_kind(x)
    with nogil:
        if kind == KIND_F32:
            _moments(<const float*>px, Ls, goff, poff, G, n_outer, K * B, parts, po,
                     welford, centered, nt)
        elif kind == KIND_F16:
            _moments(<const cn_f16*>px, Ls, goff, poff, G, n_outer, K * B, parts, po,
                     welford, centered, nt)
        elif kind == KIND_BF16:
            _moments(<const cn_bf16*>px, Ls, goff, poff, G, n_outer, K * B, parts, po,
                     welford, centered, nt)
        else:
            _moments(<const double*>px, Ls, goff, poff, G, n_outer, K * B, parts, po,
                     welford, centered, nt)


def merge(cnp.ndarray parts, cnp.ndarray out, Py_ssize_t P, Py_ssize_t S):
    """Fold P partial moments parts (P, 3, S) into out (3, S), in order (Chan et al.)."""
    cdef const double* pp = <const double*>data(parts)
    cdef double* po = <double*>data(out)
    cdef Py_ssize_t s, p
    cdef double c, m, q
    cdef int nt = cynorm_threads_for(3 * P * S)
    for s in prange(S, nogil=True, num_threads=nt, schedule="static"):
        c = 0
        m = 0
        q = 0
        for p in range(P):
            chan_merge(&c, &m, &q, pp[(3 * p) * S + s], pp[(3 * p + 1) * S + s],
                       pp[(3 * p + 2) * S + s])
        po[s] = c
        po[S + s] = m
        po[2 * S + s] = q


# ---- apply with given statistics --------------------------------------------------------

cdef void _apply(const storage* x, storage* y, const floating* w, const floating* b,
                 const double* mean, const double* rstd, const Py_ssize_t* gidx,
                 Py_ssize_t A, Py_ssize_t K, Py_ssize_t B, Py_ssize_t G, int per_sample,
                 int elementwise, int wide, int nt) noexcept nogil:
    cdef Py_ssize_t spans = (B + CHUNK - 1) // CHUNK, t, r, j, e0, n, k, s, off
    for t in prange(A * K * spans, nogil=True, num_threads=nt, schedule="static"):
        r = t // spans
        j = t - r * spans
        k = r % K
        s = gidx[k] + ((r // K) * G if per_sample else 0)
        e0 = j * CHUNK
        n = B - e0 if B - e0 < CHUNK else CHUNK
        off = r * B + e0
        if elementwise:
            affine_elementwise(x + off, y + off,
                               <const floating*>NULL if w == NULL else w + k * B + e0,
                               <const floating*>NULL if b == NULL else b + k * B + e0, n,
                               mean[s], rstd[s], 0)
        elif wide:
            affine_wide(x + off, y + off, n, mean[s], rstd[s], 1.0 if w == NULL else w[k],
                        0.0 if b == NULL else b[k])
        else:
            affine_const(x + off, y + off, n, mean[s], rstd[s], 1.0 if w == NULL else w[k],
                         0.0 if b == NULL else b[k], 0)


def apply(cnp.ndarray x, cnp.ndarray y, object weight, object bias, cnp.ndarray mean,
          cnp.ndarray rstd, Py_ssize_t A, Py_ssize_t K, Py_ssize_t B, cnp.ndarray gidx,
          Py_ssize_t G, int per_sample, int elementwise, int wide):
    """y = (x - mean) * rstd * weight + bias over x (A, K, B), the statistics of channel
    k's set at gidx[k] (+ a * G per sample). weight/bias: (K,) per channel, or (K * B,)
    elementwise; None for none. wide (per channel only): computed in float64 and
    rounded once to float32 (then 16-bit data to their storage), see affine_wide."""
    cdef void* px = data(x)
    cdef void* py = data(y)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef const double* pm = <const double*>data(mean)
    cdef const double* pr = <const double*>data(rstd)
    cdef const Py_ssize_t* pg = <const Py_ssize_t*>data(gidx)
    cdef int nt = cynorm_threads_for(A * K * B)
    if B == 0:
        return
    cdef int kind = storage_kind(x)
    with nogil:
        if kind == KIND_F32:
            _apply(<const float*>px, <float*>py, <const float*>pw, <const float*>pb, pm,
                   pr, pg, A, K, B, G, per_sample, elementwise, wide, nt)
        elif kind == KIND_F16:
            _apply(<const cn_f16*>px, <cn_f16*>py, <const float*>pw, <const float*>pb, pm,
                   pr, pg, A, K, B, G, per_sample, elementwise, wide, nt)
        elif kind == KIND_BF16:
            _apply(<const cn_bf16*>px, <cn_bf16*>py, <const float*>pw, <const float*>pb,
                   pm, pr, pg, A, K, B, G, per_sample, elementwise, wide, nt)
        else:
            _apply(<const double*>px, <double*>py, <const double*>pw, <const double*>pb,
                   pm, pr, pg, A, K, B, G, per_sample, elementwise, wide, nt)


# ---- backward, per-channel sets (BatchNorm) ---------------------------------------------

def grad_sums(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray mean, cnp.ndarray out,
              Py_ssize_t A, Py_ssize_t K, Py_ssize_t B):
    """sum(dy) and sum(dy * (x - mean)) of every channel of x (A, K, B) into out (2, K),
    each the fold of its pieces in piece order (as the channel kernel)."""
    cdef SetLayout L = make_layout(A, B, K * B)
    cdef cnp.ndarray work = np.empty(max(2 * K * L.n_pieces, 1), dtype=np.float64)
    cdef double* parts = <double*>data(work)
    cdef double* po = <double*>data(out)
    cdef const double* pm = <const double*>data(mean)
    cdef void* pdy = data(dy)
    cdef void* px = data(x)
    cdef int nt = cynorm_threads_for(A * K * B)
    cdef int kind = storage_kind(x)
    with nogil:
        if kind == KIND_F32:
            split_grad_sums(<const float*>pdy, <const float*>px, <const float*>NULL, &L,
                            K, B, pm, NULL, parts, po, po + K, nt)
        elif kind == KIND_F16:
            split_grad_sums(<const cn_f16*>pdy, <const cn_f16*>px, <const float*>NULL, &L,
                            K, B, pm, NULL, parts, po, po + K, nt)
        elif kind == KIND_BF16:
            split_grad_sums(<const cn_bf16*>pdy, <const cn_bf16*>px, <const float*>NULL,
                            &L, K, B, pm, NULL, parts, po, po + K, nt)
        else:
            split_grad_sums(<const double*>pdy, <const double*>px, <const double*>NULL,
                            &L, K, B, pm, NULL, parts, po, po + K, nt)


cdef void _grad_apply(const storage* dy, const storage* x, storage* dx,
                      const floating* w, const double* mean, const double* rstd,
                      const double* sdy, const double* sdyx, double count, Py_ssize_t A,
                      Py_ssize_t K, Py_ssize_t B, int wide, int nt) noexcept nogil:
    cdef Py_ssize_t spans = (B + CHUNK - 1) // CHUNK, t, r, j, e0, n, k, off
    cdef double rs, wc
    for t in prange(A * K * spans, nogil=True, num_threads=nt, schedule="static"):
        r = t // spans
        j = t - r * spans
        k = r % K
        e0 = j * CHUNK
        n = B - e0 if B - e0 < CHUNK else CHUNK
        off = r * B + e0
        rs = rstd[k]
        wc = 1.0 if w == NULL else w[k]
        # the channel kernel's coefficients, with the global sums and count: mean(g)
        # and mean(g * xhat) over the whole set, g = w * dy (see grad_const)
        if wide:
            grad_wide(dy + off, x + off, dx + off, n, wc, wc * (sdy[k] / count),
                      wc * (rs * sdyx[k] / count), mean[k], rs)
        else:
            grad_const(dy + off, x + off, dx + off, n, wc, wc * (sdy[k] / count),
                       wc * (rs * sdyx[k] / count), mean[k], rs, 0)


def grad_apply(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, object weight,
               cnp.ndarray mean, cnp.ndarray rstd, cnp.ndarray sums, double count,
               Py_ssize_t A, Py_ssize_t K, Py_ssize_t B, int wide):
    """dx of batch normalisation over x (A, K, B) from the global per-channel sums
    (2, K) (sum(dy), sum(dy * (x - mean))) of a set of `count` elements. wide: in
    float64, see grad_wide."""
    cdef void* pdy = data(dy)
    cdef void* px = data(x)
    cdef void* pdx = data(dx)
    cdef void* pw = data(weight)
    cdef const double* pm = <const double*>data(mean)
    cdef const double* pr = <const double*>data(rstd)
    cdef const double* ps = <const double*>data(sums)
    cdef int nt = cynorm_threads_for(A * K * B)
    if B == 0:
        return
    cdef int kind = storage_kind(x)
    with nogil:
        if kind == KIND_F32:
            _grad_apply(<const float*>pdy, <const float*>px, <float*>pdx,
                        <const float*>pw, pm, pr, ps, ps + K, count, A, K, B, wide, nt)
        elif kind == KIND_F16:
            _grad_apply(<const cn_f16*>pdy, <const cn_f16*>px, <cn_f16*>pdx,
                        <const float*>pw, pm, pr, ps, ps + K, count, A, K, B, wide, nt)
        elif kind == KIND_BF16:
            _grad_apply(<const cn_bf16*>pdy, <const cn_bf16*>px, <cn_bf16*>pdx,
                        <const float*>pw, pm, pr, ps, ps + K, count, A, K, B, wide, nt)
        else:
            _grad_apply(<const double*>pdy, <const double*>px, <double*>pdx,
                        <const double*>pw, pm, pr, ps, ps + K, count, A, K, B, wide, nt)
