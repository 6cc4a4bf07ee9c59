# Inline helpers shared by the kernel families (slab, channel, row, batched columns): how a
# normalisation set is cut into fixed pieces, the moments of a piece and of a set, the
# moments of column tiles and their pairwise merge, and the affine applies.
#
# Determinism: a set's statistics are always the left fold, in piece order, of per-piece
# results, and pieces depend only on the array's shape (never on the thread count). A
# kernel may hand whole sets or single pieces to threads; the bits are the same.
#
# Vectorisation without -ffast-math: the reductions (in _lanes.h) keep 16 independent
# float64 accumulators in explicit SIMD vectors, combined in a fixed tree at the end.
# Their result does not depend on the instruction set or on the data's alignment.
#
# Storage dtypes: the data (x, y, dy, dx, residual) are of the fused type `storage`
# (float64, float32, float16, bfloat16); the parameters (weight, bias and their
# gradients) of the fused type `floating`: float64 for float64 data, float32 for every
# other storage (the callers convert them). 16-bit data are computed in float32 lanes:
# the loops widen them in registers (_lanes.h's storage loaders; a few helpers widen a
# block of STAGE values into a float32 buffer on the stack, _lowp.h, exact), run the
# float32 arithmetic and narrow the results (round to nearest even, once). So a 16-bit
# apply or backward is the float32 one on the widened data, rounded once. The moments
# of 16-bit data form the deviations and their squares in float32 and sum a few in
# float32 before the float64 lanes (cn_sq16 in _lanes.h; piece_moments bounds the
# error), so they are within a few float32 ulps of the float32 data's, not bitwise
# those. The bits depend on nothing but the shape, as for the other dtypes. Only
# float32 parameters are ever paired with 16-bit or float32 data, float64 ones with
# float64 data; the other pairings are compiled (fused types are a product) but never
# called.

cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.float cimport DBL_MAX
from libc.math cimport NAN, sqrt

# Elements per piece: 4096 float64 = 32 KiB, so a piece's second pass hits L1.
cdef enum:
    CHUNK = 4096
    # column reductions (col_tile_moments): rows per tile, so that per-block partials
    # are 1/16 of a float32 input, and columns per tile: 64 x 1024 float32 = 256 KiB
    # stays in L2
    COL_ROWS = 64
    COL_WIDTH = 1024
    # an elementwise float32 output of at least this many bytes (the whole call's) is
    # stored past the caches (non-temporal stores: no read of each destination line
    # before it is written); out of cache it would be evicted before it is read again
    # anyway (32 MiB, a common last-level cache)
    STREAM_BYTES = 32 << 20
    STREAM_RUN_BYTES = 2048

ctypedef struct SetLayout:
    Py_ssize_t n_runs          # contiguous runs in one set
    Py_ssize_t run_len         # elements per run
    Py_ssize_t run_stride      # elements between the starts of consecutive runs
    Py_ssize_t pieces_per_run  # > 1 when a run is longer than CHUNK
    Py_ssize_t runs_per_piece  # > 1 when short runs are grouped into one piece
    Py_ssize_t n_pieces        # pieces in one set
    Py_ssize_t size            # elements in one set
    double var_div             # the variance is m2 / var_div: size (biased, the
                               # default), or size - ddof (set_ddof)


cdef inline SetLayout make_layout(Py_ssize_t n_runs, Py_ssize_t run_len,
                                  Py_ssize_t run_stride) noexcept nogil:
    cdef SetLayout L
    if n_runs > 1 and run_stride == run_len:
        # adjacent runs are one run
        run_len = n_runs * run_len
        n_runs = 1
    L.n_runs = n_runs
    L.run_len = run_len
    L.run_stride = run_stride
    L.size = n_runs * run_len
    L.var_div = <double>L.size
    if L.size == 0:
        L.pieces_per_run = 1
        L.runs_per_piece = 1
        L.n_pieces = 0
    elif run_len >= CHUNK:
        L.pieces_per_run = (run_len + CHUNK - 1) // CHUNK
        L.runs_per_piece = 1
        L.n_pieces = n_runs * L.pieces_per_run
    else:
        L.pieces_per_run = 1
        L.runs_per_piece = CHUNK // run_len
        L.n_pieces = (n_runs + L.runs_per_piece - 1) // L.runs_per_piece
    return L


cdef inline double var_divisor(Py_ssize_t size, double ddof) noexcept nogil:
    """The variance's divisor with ddof "delta degrees of freedom": size - ddof, or NaN
    when that is <= 0 (no variance: scipy.stats' convention, so the results are NaN)."""
    cdef double d = <double>size - ddof
    return d if d > 0 else NAN


cdef inline void set_ddof(SetLayout* L, double ddof) noexcept nogil:
    L.var_div = var_divisor(L.size, ddof)


cdef inline void piece_bounds(const SetLayout* L, Py_ssize_t p, Py_ssize_t* run0,
                              Py_ssize_t* nruns, Py_ssize_t* e0,
                              Py_ssize_t* elen) noexcept nogil:
    """Piece p of a set: runs [run0, run0 + nruns), elements [e0, e0 + elen) of each."""
    cdef Py_ssize_t k
    if L.pieces_per_run > 1:
        run0[0] = p // L.pieces_per_run
        k = p - run0[0] * L.pieces_per_run
        nruns[0] = 1
        e0[0] = k * CHUNK
        elen[0] = L.run_len - e0[0]
        if elen[0] > CHUNK:
            elen[0] = CHUNK
    else:
        run0[0] = p * L.runs_per_piece
        nruns[0] = L.n_runs - run0[0]
        if nruns[0] > L.runs_per_piece:
            nruns[0] = L.runs_per_piece
        e0[0] = 0
        elen[0] = L.run_len


# ---- 16-bit storage (_lowp.h) ------------------------------------------------------

cdef extern from "_lowp.h":
    ctypedef struct cn_f16:
        unsigned short bits
    ctypedef struct cn_bf16:
        unsigned short bits
    float cn_f16_to_float(cn_f16 h) noexcept nogil
    float cn_bf16_to_float(cn_bf16 h) noexcept nogil
    cn_f16 cn_float_to_f16(float f) noexcept nogil
    cn_bf16 cn_float_to_bf16(float f) noexcept nogil
    void cn_f16_widen(const cn_f16* x, float* y, Py_ssize_t n) noexcept nogil
    void cn_bf16_widen(const cn_bf16* x, float* y, Py_ssize_t n) noexcept nogil
    void cn_f16_narrow(const float* x, cn_f16* y, Py_ssize_t n) noexcept nogil
    void cn_bf16_narrow(const float* x, cn_bf16* y, Py_ssize_t n) noexcept nogil

ctypedef fused storage:
    float
    double
    cn_f16
    cn_bf16

cdef enum:
    # values per staging block of 16-bit data: 4 KiB of float32, in L1
    STAGE = 1024
    # storage_kind codes, which the kernels' entry points dispatch on
    KIND_F64 = 0
    KIND_F32 = 1
    KIND_F16 = 2
    KIND_BF16 = 3


cdef inline int storage_kind(cnp.ndarray a) noexcept:
    """The storage of a validated data array: float16 is NumPy's own ('f', 2 bytes);
    any other 2-byte dtype reaching a kernel is bfloat16 (cynorm._validate lets no other
    through), recognised without importing ml_dtypes."""
    cdef Py_ssize_t n = cnp.PyArray_ITEMSIZE(a)
    if n == 8:
        return KIND_F64
    if n == 4:
        return KIND_F32
    return KIND_F16 if a.dtype.kind == "f" else KIND_BF16


cdef inline void widen(const storage* x, float* buf, Py_ssize_t n) noexcept nogil:
    """buf[0:n] = x[0:n] as float32 (16-bit storage only; exact)."""
    if storage is cn_f16:
        cn_f16_widen(x, buf, n)
    elif storage is cn_bf16:
        cn_bf16_widen(x, buf, n)


cdef inline void narrow(const float* buf, storage* y, Py_ssize_t n) noexcept nogil:
    """y[0:n] = buf[0:n] rounded to nearest even (16-bit storage only)."""
    if storage is cn_f16:
        cn_f16_narrow(buf, y, n)
    elif storage is cn_bf16:
        cn_bf16_narrow(buf, y, n)


cdef inline double ld(const storage* x, Py_ssize_t i) noexcept nogil:
    """x[i] as a number, for the few scalar reads (float64 exactly as stored)."""
    if storage is cn_f16:
        return cn_f16_to_float(x[i])
    elif storage is cn_bf16:
        return cn_bf16_to_float(x[i])
    else:
        return x[i]


# ---- reductions over one contiguous run (_lanes.h: explicit float64 lanes) -----------

cdef extern from "_lanes.h":
    Py_ssize_t cn_affine_nt_f32(const float* x, float* y, Py_ssize_t n, float mh, float ml,
                                float rf, float wf, float t) noexcept nogil
    Py_ssize_t cn_grad_nt_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                              float mh, float ml, float rf, float wf, float gf,
                              float kf) noexcept nogil
    Py_ssize_t cn_row_apply_nt_f32(const float* x, float* y, const float* w, const float* b,
                                   Py_ssize_t n, float mh, float ml, float rs,
                                   int rms) noexcept nogil
    void cn_stream_fence() noexcept nogil
    double cn_sum_f32(const float* x, Py_ssize_t n) noexcept nogil
    double cn_sum_f64(const double* x, Py_ssize_t n) noexcept nogil
    double cn_sqdev_f32(const float* x, Py_ssize_t n, double m, double* sdev,
                        const float* pf) noexcept nogil
    double cn_sqdev_f64(const double* x, Py_ssize_t n, double m, double* sdev,
                        const double* pf) noexcept nogil
    double cn_sumsq_f32(const float* x, Py_ssize_t n, const float* pf) noexcept nogil
    double cn_sumsq_f64(const double* x, Py_ssize_t n, const double* pf) noexcept nogil
    void cn_grad_sums_f32(const float* dy, const float* x, const float* w, Py_ssize_t n,
                          double m, double* sdy, double* sdyx) noexcept nogil
    void cn_grad_sums_f64(const double* dy, const double* x, const double* w,
                          Py_ssize_t n, double m, double* sdy, double* sdyx) noexcept nogil
    void cn_tree_merge_cols(double* pm, double* pq, Py_ssize_t stride, Py_ssize_t n_blocks,
                            Py_ssize_t block_rows, Py_ssize_t n_rows,
                            Py_ssize_t n) noexcept nogil
    void cn_col_moments_f32(const float* x, Py_ssize_t D, Py_ssize_t nrows, Py_ssize_t n,
                            const double* k, double* pm, double* pq,
                            Py_ssize_t pf_rows) noexcept nogil
    void cn_col_moments_f64(const double* x, Py_ssize_t D, Py_ssize_t nrows,
                            Py_ssize_t n, const double* k, double* pm,
                            double* pq, Py_ssize_t pf_rows) noexcept nogil
    void cn_col_moments_f16(const cn_f16* x, Py_ssize_t D, Py_ssize_t nrows,
                            Py_ssize_t n, const double* k, double* pm,
                            double* pq, Py_ssize_t pf_rows) noexcept nogil
    void cn_col_moments_bf16(const cn_bf16* x, Py_ssize_t D, Py_ssize_t nrows,
                             Py_ssize_t n, const double* k, double* pm,
                             double* pq, Py_ssize_t pf_rows) noexcept nogil
    void cn_col_grad_sums_f32(const float* dy, const float* x, Py_ssize_t D,
                              Py_ssize_t nrows, Py_ssize_t n, const double* m, double* sg,
                              double* sgx, int rows) noexcept nogil
    void cn_col_grad_sums_f64(const double* dy, const double* x, Py_ssize_t D,
                              Py_ssize_t nrows, Py_ssize_t n, const double* m, double* sg,
                              double* sgx, int rows) noexcept nogil
    void cn_col_grad_sums_f16(const cn_f16* dy, const cn_f16* x, Py_ssize_t D,
                              Py_ssize_t nrows, Py_ssize_t n, const double* m, double* sg,
                              double* sgx, int rows) noexcept nogil
    void cn_col_grad_sums_bf16(const cn_bf16* dy, const cn_bf16* x, Py_ssize_t D,
                               Py_ssize_t nrows, Py_ssize_t n, const double* m,
                               double* sg, double* sgx, int rows) noexcept nogil
    # the column gradient sums of 16-bit x with a float32 g (dy * act'(a)) in dy's place
    void cn_col_grad_rows_g32_f16(const float* g, const cn_f16* x, Py_ssize_t D,
                                  Py_ssize_t nrows, Py_ssize_t n, const double* m,
                                  double* sg, double* sgx) noexcept nogil
    void cn_col_grad_rows_g32_bf16(const float* g, const cn_bf16* x, Py_ssize_t D,
                                   Py_ssize_t nrows, Py_ssize_t n, const double* m,
                                   double* sg, double* sgx) noexcept nogil
    # 16-bit storage: the same loops, widening in registers (the storage loaders)
    double cn_sum_f16(const cn_f16* x, Py_ssize_t n) noexcept nogil
    double cn_sum_bf16(const cn_bf16* x, Py_ssize_t n) noexcept nogil
    double cn_sqdev_f16(const cn_f16* x, Py_ssize_t n, double m, double* sdev,
                        const cn_f16* pf) noexcept nogil
    double cn_sqdev_bf16(const cn_bf16* x, Py_ssize_t n, double m, double* sdev,
                         const cn_bf16* pf) noexcept nogil
    double cn_sumsq_f16(const cn_f16* x, Py_ssize_t n, const cn_f16* pf) noexcept nogil
    double cn_sumsq_bf16(const cn_bf16* x, Py_ssize_t n, const cn_bf16* pf) noexcept nogil
    void cn_grad_sums_f16(const cn_f16* dy, const cn_f16* x, const float* w, Py_ssize_t n,
                          double m, double* sdy, double* sdyx) noexcept nogil
    void cn_grad_sums_bf16(const cn_bf16* dy, const cn_bf16* x, const float* w,
                           Py_ssize_t n, double m, double* sdy, double* sdyx) noexcept nogil
    void cn_affine_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, float mh, float ml,
                       float rf, float wf, float t) noexcept nogil
    void cn_affine_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, float mh, float ml,
                        float rf, float wf, float t) noexcept nogil
    void cn_cl_affine_f16(const cn_f16* x, cn_f16* y, Py_ssize_t n, const float* mh,
                          const float* ml, const float* rf, const float* wf,
                          const float* bf) noexcept nogil
    void cn_cl_affine_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t n, const float* mh,
                           const float* ml, const float* rf, const float* wf,
                           const float* bf) noexcept nogil
    void cn_grad_f16(const cn_f16* dy, const cn_f16* x, cn_f16* dx, Py_ssize_t n,
                     float mh, float ml, float rf, float wf, float gf,
                     float kf) noexcept nogil
    void cn_grad_bf16(const cn_bf16* dy, const cn_bf16* x, cn_bf16* dx, Py_ssize_t n,
                      float mh, float ml, float rf, float wf, float gf,
                      float kf) noexcept nogil
    void cn_row_apply_f16(const cn_f16* x, cn_f16* y, const float* w, const float* b,
                          Py_ssize_t n, float mh, float ml, float rf, int rms) noexcept nogil
    void cn_row_apply_bf16(const cn_bf16* x, cn_bf16* y, const float* w, const float* b,
                           Py_ssize_t n, float mh, float ml, float rf,
                           int rms) noexcept nogil


# the column loops of _cl_tiles.h: the one-pass shifted sums of a row block and the
# float32 apply of row blocks with per-column constants (the channels-last family,
# BatchNorm's column path) or per-channel constants over runs of HW columns (BatchNorm's
# column path)
cdef extern from "_cl_tiles.h":
    void cn_cl_shift_sums_f32(const float* x, Py_ssize_t D, Py_ssize_t nrows, Py_ssize_t n,
                              const double* c, double* d, double* q,
                              Py_ssize_t pf_rows) noexcept nogil
    void cn_cl_shift_sums_f64(const double* x, Py_ssize_t D, Py_ssize_t nrows,
                              Py_ssize_t n, const double* c, double* d, double* q,
                              Py_ssize_t pf_rows) noexcept nogil
    void cn_cl_shift_sums_f16(const cn_f16* x, Py_ssize_t D, Py_ssize_t nrows,
                              Py_ssize_t n, const double* c, double* d, double* q,
                              Py_ssize_t pf_rows) noexcept nogil
    void cn_cl_shift_sums_bf16(const cn_bf16* x, Py_ssize_t D, Py_ssize_t nrows,
                               Py_ssize_t n, const double* c, double* d, double* q,
                               Py_ssize_t pf_rows) noexcept nogil
    void cn_cl_apply_f32(const float* x, float* y, Py_ssize_t D, Py_ssize_t nrows,
                         Py_ssize_t n, const float* mh, const float* ml, const float* rf,
                         const float* wf, const float* bf) noexcept nogil
    void cn_cl_apply_f16(const cn_f16* x, cn_f16* y, Py_ssize_t D, Py_ssize_t nrows,
                         Py_ssize_t n, const float* mh, const float* ml, const float* rf,
                         const float* wf, const float* bf) noexcept nogil
    void cn_cl_apply_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t D, Py_ssize_t nrows,
                          Py_ssize_t n, const float* mh, const float* ml, const float* rf,
                          const float* wf, const float* bf) noexcept nogil
    void cn_ch_apply_f32(const float* x, float* y, Py_ssize_t D, Py_ssize_t nrows,
                         Py_ssize_t nch, Py_ssize_t HW, const float* mh, const float* ml,
                         const float* rf, const float* wf, const float* bf) noexcept nogil
    void cn_ch_apply_f16(const cn_f16* x, cn_f16* y, Py_ssize_t D, Py_ssize_t nrows,
                         Py_ssize_t nch, Py_ssize_t HW, const float* mh, const float* ml,
                         const float* rf, const float* wf, const float* bf) noexcept nogil
    void cn_ch_apply_bf16(const cn_bf16* x, cn_bf16* y, Py_ssize_t D, Py_ssize_t nrows,
                          Py_ssize_t nch, Py_ssize_t HW, const float* mh, const float* ml,
                          const float* rf, const float* wf, const float* bf) noexcept nogil


cdef inline double lane_sum(const storage* x, Py_ssize_t n) noexcept nogil:
    """sum(x); for float32 (and 16-bit) data accurate enough for a first pass (see
    _lanes.h)."""
    if storage is float:
        return cn_sum_f32(x, n)
    elif storage is double:
        return cn_sum_f64(x, n)
    elif storage is cn_f16:
        return cn_sum_f16(x, n)
    else:
        return cn_sum_bf16(x, n)


cdef inline double lane_sqdev(const storage* x, Py_ssize_t n, double m, double* sdev,
                              const storage* pf) noexcept nogil:
    """sum((x - m)**2), and sdev += sum(x - m); with m = 0, the sum of squares.

    This second pass works on data already in L1, so it also prefetches the n elements
    at pf (the next piece, which the next first pass will read) to overlap that memory
    traffic with this arithmetic; pf = NULL prefetches x itself, a no-op."""
    if pf == NULL:
        pf = x
    if storage is float:
        return cn_sqdev_f32(x, n, m, sdev, pf)
    elif storage is double:
        return cn_sqdev_f64(x, n, m, sdev, pf)
    elif storage is cn_f16:
        return cn_sqdev_f16(x, n, m, sdev, pf)
    else:
        return cn_sqdev_bf16(x, n, m, sdev, pf)


cdef inline double lane_sumsq(const storage* x, Py_ssize_t n,
                              const storage* pf) noexcept nogil:
    """sum(x**2): lane_sqdev with m = 0 (the same bits), prefetching pf likewise."""
    if pf == NULL:
        pf = x
    if storage is float:
        return cn_sumsq_f32(x, n, pf)
    elif storage is double:
        return cn_sumsq_f64(x, n, pf)
    elif storage is cn_f16:
        return cn_sumsq_f16(x, n, pf)
    else:
        return cn_sumsq_bf16(x, n, pf)


cdef inline void welford_update(const storage* x, Py_ssize_t n, double* cnt, double* mean,
                              double* m2) noexcept nogil:
    """Welford's update, element by element, continuing the running (cnt, mean, m2)."""
    cdef double c = cnt[0], m = mean[0], q = m2[0], d, v
    cdef Py_ssize_t i
    for i in range(n):
        v = ld(x, i)
        c += 1.0
        d = v - m
        m += d / c
        q += d * (v - m)
    cnt[0] = c
    mean[0] = m
    m2[0] = q


cdef inline void lane_grad_sums(const storage* dy, const storage* x, const floating* w,
                                Py_ssize_t n, double m, double* sdy,
                                double* sdyx) noexcept nogil:
    """With g = dy * w (w = NULL: g = dy): sdy += sum(g); sdyx += sum(g * (x - m))."""
    if storage is float:
        cn_grad_sums_f32(dy, x, <const float*>w, n, m, sdy, sdyx)
    elif storage is double:
        cn_grad_sums_f64(dy, x, <const double*>w, n, m, sdy, sdyx)
    elif storage is cn_f16:
        cn_grad_sums_f16(dy, x, <const float*>w, n, m, sdy, sdyx)
    else:
        cn_grad_sums_bf16(dy, x, <const float*>w, n, m, sdy, sdyx)


# ---- statistics of pieces and sets ---------------------------------------------------

cdef inline void chan_merge(double* cnt, double* mean, double* m2, double cb, double mb,
                            double qb) noexcept nogil:
    """Fold the moments (cb, mb, qb) of a piece into the running (cnt, mean, m2)."""
    cdef double ca = cnt[0], n, d
    if cb == 0:
        return
    if ca == 0:
        cnt[0] = cb
        mean[0] = mb
        m2[0] = qb
        return
    n = ca + cb
    d = mb - mean[0]
    mean[0] = mean[0] + d * (cb / n)
    m2[0] = m2[0] + qb + d * d * (ca * cb / n)
    cnt[0] = n


cdef inline void tree_merge(double* pm, double* pq, Py_ssize_t stride,
                            Py_ssize_t n_blocks, Py_ssize_t block_rows, Py_ssize_t n_rows,
                            double* mean, double* m2) noexcept nogil:
    """The moments of n_rows rows from those of their n_blocks blocks of block_rows
    rows, the last holding the rest (fewer or more than block_rows): block q's mean
    and m2 at pm[q * stride], pq[q * stride], merged pairwise (a fixed tree: block
    q + step into block q for step = 1, 2, 4, ...), in place. Rounding grows with the
    tree's depth, not with the number of blocks as in a left fold: thousands of blocks
    keep the mean of offset data to a few ulps. "Rows" may be elements: BatchNorm's
    column path passes blocks of COL_ROWS * HW elements."""
    cdef Py_ssize_t step = 1, q
    cdef double ca
    while step < n_blocks:
        q = 0
        while q + step < n_blocks:
            ca = <double>(step * block_rows)
            # blocks [q + step, q + 2 * step): the group with the last block ends at
            # n_rows
            chan_merge(&ca, &pm[q * stride], &pq[q * stride],
                       <double>((n_rows if q + 2 * step >= n_blocks
                                 else (q + 2 * step) * block_rows)
                                - (q + step) * block_rows),
                       pm[(q + step) * stride], pq[(q + step) * stride])
            q += 2 * step
        step *= 2
    mean[0] = pm[0]
    m2[0] = pq[0]


# Columns per work item of a vectorised tree merge: 4 cache lines of each block's row.
cdef enum:
    MERGE_COLS = 32


cdef inline void tree_merge_cols(double* pm, double* pq, Py_ssize_t stride,
                                 Py_ssize_t n_blocks, Py_ssize_t block_rows,
                                 Py_ssize_t n_rows, Py_ssize_t n) noexcept nogil:
    """tree_merge of the n adjacent columns pm[j], pq[j] (block q at pm[q * stride + j]),
    in place, the results in pm[j], pq[j]: the same bits as tree_merge per column,
    CN_DW columns to a vector (cn_tree_merge_cols in _lanes.h)."""
    cn_tree_merge_cols(pm, pq, stride, n_blocks, block_rows, n_rows, n)


# The one-pass statistics of a piece (piece_moments): with k = the mean of the piece's
# first SHIFT_HEAD values (rounded to float32 unless the data are float64), the float64
# lanes sum e = x - k and e^2 in the same pass (cn_sqdev, the deviations pass of the
# two-pass algorithm, with k for the mean); then mean = k + S / n and m2 = Q - S^2 / n.
# This saves the two-pass algorithm's first pass, and is as exact where the shift is
# near the mean: with S^2 / n <= SHIFT_SPREAD / (SHIFT_SPREAD + 1) Q (that is
# (mean - k)^2 <= SHIFT_SPREAD var, k within 8 standard deviations of the mean), with
# e, e^2 and each float64 lane's n / 16 additions rounding (e = x - k is exact for
# float32 data but for exponents 29 apart), g = (n / 16 + 8) 2^-53 bounds the relative
# error of Q and g sqrt(n Q) the error of S, so |m2 error| <= g (2 sqrt(64 * 65) + 65) m2
# < 200 g m2 (6e-12 relative for a full piece) and |mean error| <= g sqrt(Q / n)
# < 9 g sqrt(m2 / n). A mean of 16 values, not one value, keeps outliers among them
# inside the limit: the mean of any 16 of n values lies within sqrt(n / 16 - 1) spreads
# of the mean (Samuelson's inequality: 16 for n = 4096, within the limit for n <= 1040),
# so only a cluster of first values far from the rest of a long piece, or k rounded to
# float32 on near-constant data, goes past it. Those, constant data (Q = 0), squares
# that overflow or may have lost digits below the normal range (Q < n 2^-1000, float64
# data), NaN and Inf take the two-pass algorithm.
# 16-bit data: e and e^2 are float32 (cn_sq16), so Q is within g = 10 2^-24 of the
# exact sum (relative) and S within 8 2^-24 sqrt(n Q); the limit is SHIFT_SPREAD_16
# (k within 4 standard deviations): |m2 error| <= g (2 sqrt(16 * 17) + 17) m2 < 51 g m2
# (3e-5, rstd to 1.5e-5; about 6e-7 and 3e-7 where k is near the mean, the usual case)
# and |mean error| <= 8 2^-24 sqrt(Q / n) <= 2e-6 sqrt(m2 / n): far below the storage's
# rounding of the output (2^-8 bfloat16, 2^-11 float16 relative), so the output stays
# within 1 ulp. A constant piece (Q = 0: cn_sq16 redoes Q < n 2^-100 in float64, where
# Q = 0 means every e = 0) is exact. Past the limit the shifted pass's mean k + S / n
# (within 2e-6 sqrt(Q / n) of the mean) is the first pass: one more corrected pass.
cdef enum:
    SHIFT_SPREAD = 64
    SHIFT_SPREAD_16 = 16
    SHIFT_HEAD = 16


cdef inline void piece_moments(const storage* xs, const SetLayout* L, Py_ssize_t p,
                               int welford, int centered, const storage* pf,
                               double* cnt, double* mean, double* m2) noexcept nogil:
    """Moments of piece p of the set starting at xs.

    One pass of shifted sums where it is as exact (see SHIFT_SPREAD), else two-pass (a
    mean, then the deviations from it while the piece is in L1, corrected); or Welford.
    centered = 0 gives mean 0 and m2 = sum of squares (RMSNorm).
    pf: the next piece's data, prefetched during the deviations pass (single-run
    pieces).
    16-bit data: float32 deviations summed a few at a time in float32 (cn_sq16)."""
    cdef Py_ssize_t run0, nruns, e0, elen, r, i
    cdef double s = 0, q = 0, m = 0, c = 0, d
    piece_bounds(L, p, &run0, &nruns, &e0, &elen)
    if welford and centered:
        for r in range(nruns):
            welford_update(xs + (run0 + r) * L.run_stride + e0, elen, &c, &m, &q)
        cnt[0] = c
        mean[0] = m
        m2[0] = q
        return
    c = <double>(nruns * elen)
    if centered:
        # one pass: the shifted sums of x - k (k: the mean of the piece's first
        # SHIFT_HEAD values), kept where they give the moments to float64 accuracy (see
        # SHIFT_SPREAD); else the two passes below
        r = elen if elen < SHIFT_HEAD else SHIFT_HEAD
        for i in range(r):
            m += ld(xs, run0 * L.run_stride + e0 + i)
        m = m / r
        if storage is float or storage is cn_f16 or storage is cn_bf16:
            m = <float>m  # x - k exact in float64
        for r in range(nruns):
            q += lane_sqdev(xs + (run0 + r) * L.run_stride + e0, elen, m, &s,
                            pf if nruns == 1 else NULL)
        d = s * s / c
        if storage is cn_f16 or storage is cn_bf16:
            # float32 deviations (cn_sq16): the tighter spread SHIFT_SPREAD_16
            if q <= DBL_MAX and (q == 0 or (q >= c * 9.332636185032189e-302
                                            and (SHIFT_SPREAD_16 + 1) * d
                                            <= SHIFT_SPREAD_16 * q)):
                # q == 0: every x equals k (the float64 lanes' redo found no nonzero
                # deviation), the two-pass result too
                cnt[0] = c
                mean[0] = m + s / c
                m2[0] = q - d
                return
        elif (q <= DBL_MAX and q >= c * 9.332636185032189e-302
                and (SHIFT_SPREAD + 1) * d <= SHIFT_SPREAD * q):
            cnt[0] = c
            mean[0] = m + s / c
            m2[0] = q - d
            return
        if (storage is cn_f16 or storage is cn_bf16) and q <= DBL_MAX and s - s == 0:
            # the shifted pass's mean (k + S / n, within sqrt(Q / n) 2^-20 of the mean)
            # is the first pass: one more pass, not two
            m = m + s / c
        else:
            q = 0
            s = 0
            for r in range(nruns):
                s += lane_sum(xs + (run0 + r) * L.run_stride + e0, elen)
            m = s / c
        q = 0
        if storage is cn_f16 or storage is cn_bf16:
            m = <float>m  # cn_sq16's float32 lanes take a float32 mean
    s = 0
    for r in range(nruns):
        if centered:
            q += lane_sqdev(xs + (run0 + r) * L.run_stride + e0, elen, m, &s,
                            pf if nruns == 1 else NULL)
        else:
            q += lane_sumsq(xs + (run0 + r) * L.run_stride + e0, elen,
                            pf if nruns == 1 else NULL)
    if centered:
        # corrected two-pass (Chan, Golub & LeVeque): the deviations' sum s recovers
        # the error of the first pass's mean (constant data gives var exactly 0)
        m += s / c
        q -= s * s / c
        if q < 0:
            q = 0
    cnt[0] = c
    mean[0] = m
    m2[0] = q


cdef inline void set_moments(const storage* xs, const SetLayout* L, int welford,
                             int centered, const storage* next_set, double* mean,
                             double* m2) noexcept nogil:
    """Moments of the whole set: the fold of its pieces' moments, in piece order.
    Each single-run piece prefetches the next piece's start meanwhile: the next chunk
    of the same run, or the next run, which may lie far away (BatchNorm's runs are C * HW
    apart, where the hardware prefetchers cannot follow); the last piece prefetches
    next_set, the set this thread handles next, or nothing (NULL)."""
    cdef double c = 0, m = 0, q = 0, pc, pm, pq
    cdef Py_ssize_t p, run0, nruns, e0, elen
    cdef const storage* pf
    for p in range(L.n_pieces):
        pf = next_set
        if p + 1 < L.n_pieces:
            piece_bounds(L, p + 1, &run0, &nruns, &e0, &elen)
            pf = xs + run0 * L.run_stride + e0
        piece_moments(xs, L, p, welford, centered, pf, &pc, &pm, &pq)
        if centered:
            chan_merge(&c, &m, &q, pc, pm, pq)
        else:
            q += pq
    mean[0] = m
    m2[0] = q


cdef inline void fold_moments(const double* parts, Py_ssize_t n_pieces, int centered,
                              double* mean, double* m2) noexcept nogil:
    """set_moments over precomputed piece moments parts[3 * p : 3 * p + 3]."""
    cdef double c = 0, m = 0, q = 0
    cdef Py_ssize_t p
    for p in range(n_pieces):
        if centered:
            chan_merge(&c, &m, &q, parts[3 * p], parts[3 * p + 1], parts[3 * p + 2])
        else:
            q += parts[3 * p + 2]
    mean[0] = m
    m2[0] = q


# ---- column reductions ------------------------------------------------------------

cdef inline void col_tile_moments(const storage* x, Py_ssize_t D, Py_ssize_t r0,
                                  Py_ssize_t r1, Py_ssize_t j0, Py_ssize_t j1, int welford,
                                  const double* shift, double* pm, double* pq,
                                  Py_ssize_t pf_rows) noexcept nogil:
    """Per-column mean and m2 of x - shift[j], rows [r0, r1), columns [j0, j1) of the
    row-major matrix x with D columns, into pm[j], pq[j]: corrected two-pass
    (cn_col_moments in _lanes.h: columns in register-resident vector lanes) or Welford.
    shift[j] is a value near column j's (the caller adds it back to the merged mean):
    block means of shifted data round relative to the spread, not to the offset. Each
    column's arithmetic is independent of the tile's width, so its bits are too. 16-bit
    data: the float32 arithmetic on the widened values (staged row blocks), the same
    bits as float32 data holding them. pf_rows: rows after r1 (the caller's next block)
    to prefetch during the second pass. Shared by BatchNorm's column path, the
    channels-last family and the batched columns of standardize."""
    cdef double d, v, k
    cdef Py_ssize_t r, j, n = j1 - j0
    cdef const storage* xr
    if not welford:
        if storage is float:
            cn_col_moments_f32(x + r0 * D + j0, D, r1 - r0, n, shift + j0, pm + j0,
                               pq + j0, pf_rows)
        elif storage is double:
            cn_col_moments_f64(x + r0 * D + j0, D, r1 - r0, n, shift + j0, pm + j0,
                               pq + j0, pf_rows)
        elif storage is cn_f16:
            cn_col_moments_f16(x + r0 * D + j0, D, r1 - r0, n, shift + j0, pm + j0,
                               pq + j0, pf_rows)
        else:
            cn_col_moments_bf16(x + r0 * D + j0, D, r1 - r0, n, shift + j0, pm + j0,
                                pq + j0, pf_rows)
        return
    for j in range(n):
        pm[j0 + j] = 0
        pq[j0 + j] = 0
    k = 0
    for r in range(r0, r1):
        xr = x + r * D + j0
        k = k + 1
        for j in range(n):
            v = ld(xr, j) - shift[j0 + j]
            d = v - pm[j0 + j]
            pm[j0 + j] += d / k
            pq[j0 + j] += d * (v - pm[j0 + j])


cdef inline void col_grad_sums(const storage* dy, const storage* x, Py_ssize_t D,
                               Py_ssize_t nrows, Py_ssize_t n, const double* m, double* sg,
                               double* sgx, int rows) noexcept nogil:
    """Per column j of the nrows x n tile at dy, x (row stride D): sg[j] += sum(dy),
    sgx[j] += sum(dy * (x - m[j])), each column row by row in order in float64
    (cn_col_grad_sums in _lanes.h: register-resident lanes; 16-bit data staged and
    widened, the same bits as float32 data holding the widened values). rows: walk each
    row whole with the sums in L1 instead (long rows streamed from memory; _lanes.h)."""
    if storage is float:
        cn_col_grad_sums_f32(dy, x, D, nrows, n, m, sg, sgx, rows)
    elif storage is double:
        cn_col_grad_sums_f64(dy, x, D, nrows, n, m, sg, sgx, rows)
    elif storage is cn_f16:
        cn_col_grad_sums_f16(dy, x, D, nrows, n, m, sg, sgx, rows)
    else:
        cn_col_grad_sums_bf16(dy, x, D, nrows, n, m, sg, sgx, rows)


cdef inline void fold_param_grads(const double* sdy, const double* sdyx,
                                  const double* rstd, double* acc, floating* dw,
                                  floating* db, Py_ssize_t N, Py_ssize_t C, Py_ssize_t G,
                                  int last, int nt) noexcept nogil:
    """dweight and dbias of a group normalisation (slab and channels-last families):
    the per-(n, c) sums sdy[n * C + c], sdyx[n * C + c] (dy and dy * (x - mean)) of
    samples [0, N) reduced over n in order, sdyx scaled by its group's rstd, continuing
    the previous chunks' sums in acc[c] (dweight) and acc[C + c] (dbias): the same
    additions as over the whole batch at once. last: written to dw, db."""
    cdef Py_ssize_t c, n, cpg = C // G
    cdef double a_w, a_b
    for c in prange(C, nogil=True, num_threads=nt, schedule="static"):
        a_w = acc[c]
        a_b = acc[C + c]
        for n in range(N):
            a_b = a_b + sdy[n * C + c]
            a_w = a_w + sdyx[n * C + c] * rstd[n * G + c // cpg]
        acc[c] = a_w
        acc[C + c] = a_b
        if last:
            dw[c] = <floating>a_w
            db[c] = <floating>a_b


cdef inline double inv_std(double m2, double var_div, double eps) noexcept nogil:
    # variance m2 / var_div (biased: var_div = the set's size), eps inside the square root
    return 1.0 / sqrt(m2 / var_div + eps)


cdef inline void set_stats(const storage* xs, const SetLayout* L, int welford,
                           int centered, double eps, const storage* next_set,
                           double* mean, double* rstd, double* var) noexcept nogil:
    """mean, rstd (and, when var is not NULL, the biased variance) of one set."""
    cdef double m2
    set_moments(xs, L, welford, centered, next_set, mean, &m2)
    if var != NULL:
        var[0] = m2 / L.var_div
    rstd[0] = inv_std(m2, L.var_div, eps)


cdef inline void split_set_stats(const storage* x, const SetLayout* L, Py_ssize_t n_sets,
                                 Py_ssize_t set_stride, double* parts, int welford,
                                 int centered, double eps, double* mean, double* rstd,
                                 double* var, int nt) noexcept nogil:
    """set_stats for every set s (at x + s * set_stride), with the pieces shared out
    among the threads; parts holds 3 doubles per piece. Same bits as set_stats."""
    cdef Py_ssize_t P = L.n_pieces, k, s
    for k in prange(n_sets * P, nogil=True, num_threads=nt, schedule="static"):
        piece_moments(x + (k // P) * set_stride, L, k % P, welford, centered, NULL,
                      &parts[3 * k], &parts[3 * k + 1], &parts[3 * k + 2])
    for s in prange(n_sets, nogil=True, num_threads=nt, schedule="static"):
        fold_moments(parts + 3 * s * P, P, centered, &mean[s], &rstd[s])
        if var != NULL:
            var[s] = rstd[s] / L.var_div
        rstd[s] = inv_std(rstd[s], L.var_div, eps)


ctypedef struct ActSums:
    # The gradient sums of a backward with an activation on 16-bit data, where
    # g = dy * act'(a) is not stored: the sums are of g, recomputed per run in float32
    # (act_grad_sums), a = (x - mean) * rstd * weight + shift the pre-activation of the
    # forward (affine_act). Indexed by set; a NULL context: the sums of dy
    # (lane_grad_sums).
    int act                # activation code (nonzero)
    const double* rstd     # per set
    const void* weight     # per set, of the kernel's parameter type (floating); NULL: 1
    const void* shift      # per set, likewise; NULL: 0


cdef inline void piece_grad_sums(const storage* dy, const storage* x, const floating* w,
                                 const SetLayout* L, Py_ssize_t p, double mean,
                                 const ActSums* actx, Py_ssize_t s, double* sdy,
                                 double* sdyx) noexcept nogil:
    """lane_grad_sums over piece p of the set at dy, x. An elementwise w (row family)
    is indexed like the set's single run. actx not NULL (16-bit data): act_grad_sums
    with set s's activation context instead (w unused), chosen per run."""
    cdef Py_ssize_t run0, nruns, e0, elen, r, off
    cdef double wc = 1.0, bc = 0.0
    piece_bounds(L, p, &run0, &nruns, &e0, &elen)
    sdy[0] = 0
    sdyx[0] = 0
    if (storage is cn_f16 or storage is cn_bf16) and actx != NULL:
        if actx.weight != NULL:
            wc = (<const floating*>actx.weight)[s]
        if actx.shift != NULL:
            bc = (<const floating*>actx.shift)[s]
        for r in range(nruns):
            off = (run0 + r) * L.run_stride + e0
            act_grad_sums(dy + off, x + off, elen, mean, actx.rstd[s], wc, bc, actx.act,
                          sdy, sdyx)
        return
    for r in range(nruns):
        off = (run0 + r) * L.run_stride + e0
        lane_grad_sums(dy + off, x + off, <const floating*>NULL if w == NULL else w + off,
                       elen, mean,
                       sdy, sdyx)


cdef inline void set_grad_sums(const storage* dy, const storage* x, const floating* w,
                               const SetLayout* L, double mean, const ActSums* actx,
                               Py_ssize_t s, double* sdy, double* sdyx) noexcept nogil:
    """The fold, in piece order, of piece_grad_sums over one set (actx, s: as there)."""
    cdef double a, b
    cdef Py_ssize_t p
    sdy[0] = 0
    sdyx[0] = 0
    for p in range(L.n_pieces):
        piece_grad_sums(dy, x, w, L, p, mean, actx, s, &a, &b)
        sdy[0] += a
        sdyx[0] += b


cdef inline void split_grad_sums(const storage* dy, const storage* x, const floating* w,
                                 const SetLayout* L, Py_ssize_t n_sets,
                                 Py_ssize_t set_stride, const double* mean,
                                 const ActSums* actx, double* parts, double* sdy,
                                 double* sdyx, int nt) noexcept nogil:
    """set_grad_sums for every set, pieces shared out among the threads (2 doubles of
    parts per piece; mean NULL: every mean 0; actx: as in piece_grad_sums, indexed by
    set). Same bits as set_grad_sums."""
    cdef Py_ssize_t P = L.n_pieces, k, s, p
    for k in prange(n_sets * P, nogil=True, num_threads=nt, schedule="static"):
        s = k // P
        piece_grad_sums(dy + s * set_stride, x + s * set_stride, w, L, k - s * P,
                        0.0 if mean == NULL else mean[s], actx, s,
                        &parts[2 * k], &parts[2 * k + 1])
    for s in prange(n_sets, nogil=True, num_threads=nt, schedule="static"):
        sdy[s] = 0
        sdyx[s] = 0
        for p in range(P):
            sdy[s] = sdy[s] + parts[2 * (s * P + p)]
            sdyx[s] = sdyx[s] + parts[2 * (s * P + p) + 1]


# ---- affine applies ------------------------------------------------------------------
# float64 data: computed in float64. float32 data: in float32 SIMD (twice the lanes, no
# conversions), with the mean split into hi + lo float32 parts so that x - mean keeps
# its digits when the mean is large against the spread; xhat = (x - mean) * rstd is
# formed first and then multiplied by the weight (never rstd * weight rounded to
# float32, which under- or overflows for extreme data or weights). Each of the few
# roundings is relative, so the result is within a few float32 ulps of the exact value.
# A set whose rstd is far from 1 (spread below 2**-100, i.e. subnormal or nearly
# subnormal data, or above 2**100, i.e. data near the float32 limit) has its xhat formed
# in float64 instead (f32_xhat_ok): there rstd may leave the float32 range and
# x - mean may need digits below the subnormal grid. That keeps "any finite magnitude"
# for every op, at float64 speed for such sets only.

cdef inline bint f32_xhat_ok(double rstd) noexcept nogil:
    """Whether float32 arithmetic forms xhat = ((x - mh) - ml) * <float>rstd to float32
    precision for a set with this rstd (False for NaN and Inf: float64 gives the IEEE
    result)."""
    return 7.888609052210118e-31 <= rstd <= 1.2676506002282294e30  # 2**-100, 2**100


cdef inline void split_mean(double mean, float* mh, float* ml) noexcept nogil:
    """mean as mh + ml, two float32: (x - mh) - ml is x - mean to float32 precision."""
    mh[0] = <float>mean
    ml[0] = <float>(mean - <double>mh[0])


cdef inline Py_ssize_t aligned_head(const void* p, Py_ssize_t n,
                                    Py_ssize_t itemsize) noexcept nogil:
    """Elements before p + i is 64-byte aligned (at most n). Elementwise loops run this
    head on its own so that their vector stores do not split cache lines (NumPy's
    buffers are only 16-byte aligned); reductions never do, so their bits stay
    independent of alignment."""
    cdef Py_ssize_t h = ((-<Py_ssize_t>p) & 63) // itemsize
    return h if h < n else n


cdef inline void _affine_span(const floating* x, floating* y, Py_ssize_t i0, Py_ssize_t i1,
                              double mean, double rstd, double weight,
                              double shift) noexcept nogil:
    cdef Py_ssize_t i
    cdef float mh, ml, rf, wf, t
    if floating is float:
        wf = <float>weight
        t = <float>shift
        if f32_xhat_ok(rstd):
            split_mean(mean, &mh, &ml)
            rf = <float>rstd
            for i in range(i0, i1):
                y[i] = (((x[i] - mh) - ml) * rf) * wf + t
        else:
            for i in range(i0, i1):
                y[i] = <float>((x[i] - mean) * rstd) * wf + t
    else:
        _affine_span_f64(x, y, i0, i1, mean, rstd, weight, shift)


cdef inline void _affine_span_f64(const floating* x, floating* y, Py_ssize_t i0,
                                  Py_ssize_t i1, double mean, double rstd, double weight,
                                  double shift) noexcept nogil:
    """The float64 formula: y = ((x - mean) * rstd) * weight + shift in float64, rounded
    once to y's type (float64 data; float32 data in affine_wide)."""
    cdef Py_ssize_t i
    for i in range(i0, i1):
        y[i] = <floating>(((x[i] - mean) * rstd) * weight + shift)


cdef inline bint stream_out(Py_ssize_t n, Py_ssize_t run, Py_ssize_t itemsize) noexcept nogil:
    """Whether a call's elementwise output of n items, written in contiguous runs of run
    items each, is stored past the caches: n * itemsize >= STREAM_BYTES, and runs of at
    least STREAM_RUN_BYTES (short runs would leave partial lines to the non-temporal
    stores and pay a fence each). float32 paths only use it."""
    return n * itemsize >= STREAM_BYTES and run * itemsize >= STREAM_RUN_BYTES


cdef inline bint same_line_offset(const void* a, const void* b) noexcept nogil:
    """Whether a and b lie at the same offset within a 64-byte line. The streaming loops
    store y from its first aligned vector on and read their inputs at the same element
    index: only inputs at y's offset are then read in whole aligned lines too. Measured
    (Zen 4, 1 thread, InstanceNorm (8, 64, 128, 128)): x 16 or 48 bytes off y's offset
    made the streamed apply 1.3-1.7x slower than ordinary stores, where x at y's offset
    made it 1.3x faster; such pairs keep the ordinary stores."""
    return ((<size_t>a - <size_t>b) & 63) == 0


cdef inline void affine_const(const storage* x, storage* y, Py_ssize_t n, double mean,
                              double rstd, double weight, double shift,
                              bint stream) noexcept nogil:
    """y = (x - mean) * rstd * weight + shift. y may be x. stream (stream_out): float32
    y's whole aligned vectors stored past the caches, the same values."""
    cdef Py_ssize_t h
    cdef float mh, ml
    if storage is float or storage is double:
        h = aligned_head(y, n, sizeof(storage))
        _affine_span(x, y, 0, h, mean, rstd, weight, shift)
        if storage is float:
            if stream and same_line_offset(x, y) and f32_xhat_ok(rstd):
                split_mean(mean, &mh, &ml)
                h += cn_affine_nt_f32(x + h, y + h, n - h, mh, ml, <float>rstd,
                                      <float>weight, <float>shift)
                cn_stream_fence()
        _affine_span(x, y, h, n, mean, rstd, weight, shift)
    else:
        affine_act(x, y, n, mean, rstd, weight, shift, 0, 0)


cdef inline void affine_wide(const storage* x, storage* y, Py_ssize_t n, double mean,
                             double rstd, double weight, double shift) noexcept nogil:
    """affine_const computed in float64 for every storage, rounded once to float32 (the
    channel kernel's column path, BatchNorm with short runs, applies so): float32 data
    to within half an ulp. 16-bit data are widened block by block, computed so, and
    rounded from that float32 value to the storage (the column path takes them as float32
    copies). y may be x."""
    cdef float buf[STAGE]
    cdef Py_ssize_t i = 0, e
    if storage is float or storage is double:
        _affine_span_f64(x, y, 0, n, mean, rstd, weight, shift)
    else:
        while i < n:
            e = i + STAGE if i + STAGE < n else n
            widen(x + i, buf, e - i)
            _affine_span_f64(<const float*>buf, buf, 0, e - i, mean, rstd, weight, shift)
            narrow(buf, y + i, e - i)
            i = e


cdef inline void _affine_elementwise_span(const floating* x, floating* y,
                                          const floating* w, const floating* b,
                                          Py_ssize_t k0, Py_ssize_t k1, double mean,
                                          double rstd) noexcept nogil:
    """y = (x - mean) * rstd * w + b over [k0, k1) (w, b: NULL for none); float32 data in
    float32 with a hi/lo mean, or xhat in float64 where f32_xhat_ok says no, as
    affine_const."""
    cdef Py_ssize_t k
    cdef float mh, ml, rs, v
    if floating is float and f32_xhat_ok(rstd):
        split_mean(mean, &mh, &ml)
        rs = <float>rstd
        if mean == 0 and b == NULL:
            # RMSNorm: x - 0 is x, so the same bits without the two subtractions
            if w != NULL:
                for k in range(k0, k1):
                    y[k] = x[k] * rs * w[k]
            else:
                for k in range(k0, k1):
                    y[k] = x[k] * rs
        elif w != NULL and b != NULL:
            for k in range(k0, k1):
                y[k] = ((x[k] - mh) - ml) * rs * w[k] + b[k]
        elif w != NULL:
            for k in range(k0, k1):
                y[k] = ((x[k] - mh) - ml) * rs * w[k]
        elif b != NULL:
            for k in range(k0, k1):
                y[k] = ((x[k] - mh) - ml) * rs + b[k]
        else:
            for k in range(k0, k1):
                y[k] = ((x[k] - mh) - ml) * rs
    elif floating is float:
        for k in range(k0, k1):
            v = <float>((x[k] - mean) * rstd)
            if w != NULL:
                v = v * w[k]
            if b != NULL:
                v = v + b[k]
            y[k] = v
    else:
        if w != NULL and b != NULL:
            for k in range(k0, k1):
                y[k] = (x[k] - mean) * rstd * w[k] + b[k]
        elif w != NULL:
            for k in range(k0, k1):
                y[k] = (x[k] - mean) * rstd * w[k]
        elif b != NULL:
            for k in range(k0, k1):
                y[k] = (x[k] - mean) * rstd + b[k]
        else:
            for k in range(k0, k1):
                y[k] = (x[k] - mean) * rstd


cdef inline void affine_elementwise(const storage* x, storage* y, const floating* w,
                                    const floating* b, Py_ssize_t n, double mean,
                                    double rstd, bint stream) noexcept nogil:
    """y = (x - mean) * rstd * w + b with elementwise w, b (n values each, NULL for
    none): the row family's apply (LayerNorm, RMSNorm). The casts of w and b are no-ops
    in the pairings that run. 16-bit data: on the widened block in float32, rounded once.
    y may be x. stream: as affine_const's."""
    cdef float buf[STAGE]
    cdef const float* wi = NULL
    cdef const float* bi = NULL
    cdef Py_ssize_t h, i = 0, e
    cdef float mh, ml
    if storage is float or storage is double:
        h = aligned_head(y, n, sizeof(storage))
        _affine_elementwise_span(x, y, <const storage*>w, <const storage*>b, 0, h, mean,
                                 rstd)
        if storage is float:
            if stream and same_line_offset(x, y) and f32_xhat_ok(rstd):
                split_mean(mean, &mh, &ml)
                h += cn_row_apply_nt_f32(x + h, y + h, <const float*>w + h if w != NULL
                                         else NULL, <const float*>b + h if b != NULL
                                         else NULL, n - h, mh, ml, <float>rstd,
                                         mean == 0 and b == NULL)
                cn_stream_fence()
        _affine_elementwise_span(x, y, <const storage*>w, <const storage*>b, h, n, mean,
                                 rstd)
    elif f32_xhat_ok(rstd):
        # _affine_elementwise_span's float32 arithmetic on the values widened in registers
        split_mean(mean, &mh, &ml)
        if storage is cn_f16:
            cn_row_apply_f16(x, y, <const float*>w, <const float*>b, n, mh, ml,
                             <float>rstd, mean == 0 and b == NULL)
        else:
            cn_row_apply_bf16(x, y, <const float*>w, <const float*>b, n, mh, ml,
                              <float>rstd, mean == 0 and b == NULL)
    else:
        while i < n:
            e = i + STAGE if i + STAGE < n else n
            widen(x + i, buf, e - i)
            if w != NULL:
                wi = <const float*>w + i
            if b != NULL:
                bi = <const float*>b + i
            _affine_elementwise_span(<const float*>buf, buf, wi, bi, 0, e - i, mean, rstd)
            narrow(buf, y + i, e - i)
            i = e


cdef inline void _grad_span(const floating* dy, const floating* x, floating* dx,
                            Py_ssize_t i0, Py_ssize_t i1, double weight, double mg,
                            double mgx, double mean, double rstd) noexcept nogil:
    cdef Py_ssize_t i
    cdef float mh, ml, rf, wf, gf, kf
    if floating is float and f32_xhat_ok(rstd):
        split_mean(mean, &mh, &ml)
        rf = <float>rstd
        wf = <float>weight
        gf = <float>mg
        kf = <float>mgx
        for i in range(i0, i1):
            dx[i] = ((wf * dy[i] - gf) - (((x[i] - mh) - ml) * rf) * kf) * rf
    else:
        _grad_span_f64(dy, x, dx, i0, i1, weight, mg, mgx, mean, rstd)


cdef inline void _grad_span_f64(const floating* dy, const floating* x, floating* dx,
                                Py_ssize_t i0, Py_ssize_t i1, double weight, double mg,
                                double mgx, double mean, double rstd) noexcept nogil:
    """grad_const's formula in float64, rounded once to dx's type."""
    cdef Py_ssize_t i
    for i in range(i0, i1):
        dx[i] = <floating>(rstd * ((weight * dy[i] - mg) - ((x[i] - mean) * rstd) * mgx))


cdef inline void grad_const(const storage* dy, const storage* x, storage* dx,
                            Py_ssize_t n, double weight, double mg, double mgx,
                            double mean, double rstd, bint stream) noexcept nogil:
    """dx = rstd * ((weight * dy - mg) - xhat * mgx) with xhat = (x - mean) * rstd, where
    mg = mean(g) and mgx = mean(g * xhat) over the set, g = weight * dy; dx may be dy or
    x. rstd is factored out, so g - mean(g) cancels before it is scaled: a constant set
    (xhat = 0) gets dx = rstd * (g - mean(g)) with no error of rstd's size (a set of one
    element: exactly 0), and nothing leaves the float range for data near its limits.

    No software prefetch of the data the caller reads next: the slab backward, which
    prefetched its next slab into L1 (or L2) during this pass, measured 1.2-1.4x slower
    out of cache with it than leaving that slab to the hardware prefetchers.
    16-bit data: dx in float32 on the values widened in registers, rounded once.
    stream: as affine_const's."""
    cdef float bdy[STAGE]
    cdef float bx[STAGE]
    cdef Py_ssize_t i = 0, e
    cdef float mh, ml
    if storage is float or storage is double:
        i = aligned_head(dx, n, sizeof(storage))
        _grad_span(dy, x, dx, 0, i, weight, mg, mgx, mean, rstd)
        if storage is float:
            if (stream and same_line_offset(x, dx) and same_line_offset(dy, dx)
                    and f32_xhat_ok(rstd)):
                split_mean(mean, &mh, &ml)
                i += cn_grad_nt_f32(dy + i, x + i, dx + i, n - i, mh, ml, <float>rstd,
                                    <float>weight, <float>mg, <float>mgx)
                cn_stream_fence()
        _grad_span(dy, x, dx, i, n, weight, mg, mgx, mean, rstd)
    elif f32_xhat_ok(rstd):
        split_mean(mean, &mh, &ml)
        if storage is cn_f16:
            cn_grad_f16(dy, x, dx, n, mh, ml, <float>rstd, <float>weight, <float>mg,
                        <float>mgx)
        else:
            cn_grad_bf16(dy, x, dx, n, mh, ml, <float>rstd, <float>weight, <float>mg,
                         <float>mgx)
    else:
        while i < n:
            e = i + STAGE if i + STAGE < n else n
            widen(dy + i, bdy, e - i)
            widen(x + i, bx, e - i)
            _grad_span(<const float*>bdy, <const float*>bx, bdy, 0, e - i, weight, mg, mgx,
                       mean, rstd)
            narrow(bdy, dx + i, e - i)
            i = e


cdef inline void grad_wide(const storage* dy, const storage* x, storage* dx, Py_ssize_t n,
                           double weight, double mg, double mgx, double mean,
                           double rstd) noexcept nogil:
    """grad_const computed in float64 for every storage, rounded once to float32 (the
    channel kernel's column path computes so), then 16-bit data from that float32 value
    to the storage, as affine_wide. dx may be dy or x."""
    cdef float bdy[STAGE]
    cdef float bx[STAGE]
    cdef Py_ssize_t i = 0, e
    if storage is float or storage is double:
        _grad_span_f64(dy, x, dx, 0, n, weight, mg, mgx, mean, rstd)
    else:
        while i < n:
            e = i + STAGE if i + STAGE < n else n
            widen(dy + i, bdy, e - i)
            widen(x + i, bx, e - i)
            _grad_span_f64(<const float*>bdy, <const float*>bx, bdy, 0, e - i, weight, mg,
                           mgx, mean, rstd)
            narrow(bdy, dx + i, e - i)
            i = e


# ---- the activation epilogue (_activations.h) ------------------------------------------
# act: 0 none, 1 silu, 2 gelu, 3 gelu_tanh, 4 relu. float32 (the usual case): the affine
# and the activation run in one pass in C, x read once, the affine operation for
# operation as _affine_span's float32 path. Otherwise (float64, or a set whose xhat needs
# float64, see f32_xhat_ok) the activation is applied to the affine's output block by
# block while the block is in L1. The backward recomputes the pre-activation with the
# forward's own affine (the same bits) and multiplies dy by the derivative there, so
# nothing beyond mean and rstd is saved.

cdef extern from "_activations.h":
    void cn_act_f32(const float* a, float* y, Py_ssize_t n, int act) noexcept nogil
    void cn_act_f64(const double* a, double* y, Py_ssize_t n, int act) noexcept nogil
    void cn_act_grad_f32(const float* a, const float* dy, float* g, Py_ssize_t n,
                         int act) noexcept nogil
    void cn_act_grad_f64(const double* a, const double* dy, double* g, Py_ssize_t n,
                         int act) noexcept nogil
    void cn_affine_act_f32(const float* a, float* y, Py_ssize_t n, float mh, float ml,
                           float rf, float wf, float t, int act) noexcept nogil
    void cn_affine_act_grad_f32(const float* a, const float* dy, float* g, Py_ssize_t n,
                                float mh, float ml, float rf, float wf, float t,
                                int act) noexcept nogil
    void cn_affine_act_f16(const cn_f16* a, cn_f16* y, Py_ssize_t n, float mh, float ml,
                           float rf, float wf, float t, int act) noexcept nogil
    void cn_affine_act_bf16(const cn_bf16* a, cn_bf16* y, Py_ssize_t n, float mh,
                            float ml, float rf, float wf, float t, int act) noexcept nogil
    void cn_act_grad_sums_f16(const cn_f16* x, const cn_f16* dy, Py_ssize_t n, float mh,
                              float ml, float rf, float wf, float t, int act, double m,
                              double* sdy, double* sdyx) noexcept nogil
    void cn_act_grad_sums_bf16(const cn_bf16* x, const cn_bf16* dy, Py_ssize_t n,
                               float mh, float ml, float rf, float wf, float t, int act,
                               double m, double* sdy, double* sdyx) noexcept nogil
    void cn_act_grad_dx_f16(const cn_f16* x, const cn_f16* dy, cn_f16* dx, Py_ssize_t n,
                            float mh, float ml, float rf, float wf, float t, int act,
                            float gf, float kf) noexcept nogil
    void cn_act_grad_dx_bf16(const cn_bf16* x, const cn_bf16* dy, cn_bf16* dx,
                             Py_ssize_t n, float mh, float ml, float rf, float wf, float t,
                             int act, float gf, float kf) noexcept nogil

cdef enum:
    # elements per activation block: 2 KiB of float32, in L1 between affine and activation
    ACT_BLOCK = 512


cdef inline void act_run(floating* y, Py_ssize_t n, int act) noexcept nogil:
    """y = act(y) in place (act 0: nothing)."""
    if floating is float:
        cn_act_f32(y, y, n, act)
    else:
        cn_act_f64(y, y, n, act)


cdef inline void affine_act(const storage* x, storage* y, Py_ssize_t n, double mean,
                            double rstd, double weight, double shift, int act,
                            bint stream) noexcept nogil:
    """y = act((x - mean) * rstd * weight + shift): affine_const, then the activation on
    each block while it is in L1. y may be x. 16-bit data: both in float32 on the values
    widened in registers, then rounded once. stream: as affine_const's, without an
    activation only (with one, float32: computing each block into L1 and streaming it
    to y measured 0.89x at 1 thread out of cache, the activation's arithmetic
    dominating)."""
    cdef float buf[STAGE]
    cdef Py_ssize_t i = 0, e
    cdef float mh, ml
    if storage is float or storage is double:
        if act == 0:
            affine_const(x, y, n, mean, rstd, weight, shift, stream)
            return
        if storage is float:
            if f32_xhat_ok(rstd):
                # the affine and the activation in one pass, x read once
                split_mean(mean, &mh, &ml)
                cn_affine_act_f32(x, y, n, mh, ml, <float>rstd, <float>weight,
                                  <float>shift, act)
                return
        while i < n:
            e = i + ACT_BLOCK if i + ACT_BLOCK < n else n
            affine_const(x + i, y + i, e - i, mean, rstd, weight, shift, 0)
            act_run(y + i, e - i, act)
            i = e
    else:
        if f32_xhat_ok(rstd):
            # the float32 affine (and activation) on the values widened in registers,
            # rounded once
            split_mean(mean, &mh, &ml)
            if storage is cn_f16:
                if act == 0:
                    cn_affine_f16(x, y, n, mh, ml, <float>rstd, <float>weight,
                                  <float>shift)
                else:
                    cn_affine_act_f16(x, y, n, mh, ml, <float>rstd, <float>weight,
                                      <float>shift, act)
            else:
                if act == 0:
                    cn_affine_bf16(x, y, n, mh, ml, <float>rstd, <float>weight,
                                   <float>shift)
                else:
                    cn_affine_act_bf16(x, y, n, mh, ml, <float>rstd, <float>weight,
                                       <float>shift, act)
            return
        while i < n:
            e = i + STAGE if i + STAGE < n else n
            widen(x + i, buf, e - i)
            _affine_span(<const float*>buf, buf, 0, e - i, mean, rstd, weight, shift)
            if act:
                cn_act_f32(buf, buf, e - i, act)
            narrow(buf, y + i, e - i)
            i = e


cdef inline void act_grad_const(const storage* dy, const storage* x, storage* g,
                                Py_ssize_t n, double mean, double rstd, double weight,
                                double shift, int act) noexcept nogil:
    """g = dy * act'(a), a = (x - mean) * rstd * weight + shift recomputed exactly as
    affine_act computed it in the forward. g may be dy (not x). 16-bit data: g would be
    rounded to the storage type, so the 16-bit backwards keep g in float32 instead
    (act_grad_sums and act_grad_dx over long runs, a float32 g buffer read beside the
    16-bit x on the column and channels-last paths)."""
    cdef float a[ACT_BLOCK]
    cdef float bd[ACT_BLOCK]
    cdef double a64[ACT_BLOCK]
    cdef Py_ssize_t i = 0, e
    cdef float mh, ml
    if storage is float:
        if f32_xhat_ok(rstd):
            split_mean(mean, &mh, &ml)
            cn_affine_act_grad_f32(x, dy, g, n, mh, ml, <float>rstd, <float>weight,
                                   <float>shift, act)
            return
    while i < n:
        e = i + ACT_BLOCK if i + ACT_BLOCK < n else n
        if storage is float:
            affine_const(x + i, a, e - i, mean, rstd, weight, shift, 0)
            cn_act_grad_f32(a, dy + i, g + i, e - i, act)
        elif storage is double:
            affine_const(x + i, a64, e - i, mean, rstd, weight, shift, 0)
            cn_act_grad_f64(a64, dy + i, g + i, e - i, act)
        else:
            widen(x + i, a, e - i)
            _affine_span(<const float*>a, a, 0, e - i, mean, rstd, weight, shift)
            widen(dy + i, bd, e - i)
            cn_act_grad_f32(a, bd, bd, e - i, act)
            narrow(bd, g + i, e - i)
        i = e


cdef inline void* data(object a):
    """The data pointer of a C-contiguous ndarray, or NULL for None (an absent weight)."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void act_grad_sums(const storage* dy, const storage* x, Py_ssize_t n,
                               double mean, double rstd, double weight, double shift,
                               int act, double* sdy, double* sdyx) noexcept nogil:
    """16-bit data: with g = dy * act'(a) (a = affine_act's pre-activation) kept in
    float32, sdy += sum(g) and sdyx += sum(g * (x - mean)): lane_grad_sums over the run
    of g that the float32 path forms, g recomputed in L1-sized stages in registers
    (cn_act_grad_sums_*), never stored."""
    cdef float a[ACT_BLOCK]
    cdef float bd[ACT_BLOCK]
    cdef float mh, ml
    cdef Py_ssize_t i = 0, e
    if storage is cn_f16 or storage is cn_bf16:
        if f32_xhat_ok(rstd):
            split_mean(mean, &mh, &ml)
            if storage is cn_f16:
                cn_act_grad_sums_f16(x, dy, n, mh, ml, <float>rstd, <float>weight,
                                     <float>shift, act, mean, sdy, sdyx)
            else:
                cn_act_grad_sums_bf16(x, dy, n, mh, ml, <float>rstd, <float>weight,
                                      <float>shift, act, mean, sdy, sdyx)
            return
        while i < n:  # xhat in float64 (f32_xhat_ok): staged, block by block
            e = i + ACT_BLOCK if i + ACT_BLOCK < n else n
            widen(x + i, a, e - i)
            _affine_span(<const float*>a, a, 0, e - i, mean, rstd, weight, shift)
            widen(dy + i, bd, e - i)
            cn_act_grad_f32(a, bd, bd, e - i, act)
            widen(x + i, a, e - i)
            cn_grad_sums_f32(bd, a, NULL, e - i, mean, sdy, sdyx)
            i = e


cdef inline void act_grad_dx(const storage* dy, const storage* x, storage* dx,
                             Py_ssize_t n, double weight, double mg, double mgx,
                             double mean, double rstd, double shift,
                             int act) noexcept nogil:
    """16-bit data: grad_const on g = dy * act'(a) in float32, g recomputed as in
    act_grad_sums; dx rounded once. dx may be dy or x."""
    cdef float a[ACT_BLOCK]
    cdef float bd[ACT_BLOCK]
    cdef float mh, ml
    cdef Py_ssize_t i = 0, e
    if storage is cn_f16 or storage is cn_bf16:
        if f32_xhat_ok(rstd):
            split_mean(mean, &mh, &ml)
            if storage is cn_f16:
                cn_act_grad_dx_f16(x, dy, dx, n, mh, ml, <float>rstd, <float>weight,
                                   <float>shift, act, <float>mg, <float>mgx)
            else:
                cn_act_grad_dx_bf16(x, dy, dx, n, mh, ml, <float>rstd, <float>weight,
                                    <float>shift, act, <float>mg, <float>mgx)
            return
        while i < n:
            e = i + ACT_BLOCK if i + ACT_BLOCK < n else n
            widen(x + i, a, e - i)
            _affine_span(<const float*>a, a, 0, e - i, mean, rstd, weight, shift)
            widen(dy + i, bd, e - i)
            cn_act_grad_f32(a, bd, bd, e - i, act)
            widen(x + i, a, e - i)
            _grad_span(<const float*>bd, <const float*>a, bd, 0, e - i, weight, mg, mgx, mean,
                       rstd)
            narrow(bd, dx + i, e - i)
            i = e
