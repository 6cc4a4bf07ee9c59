/* The reductions under every kernel: sums over one contiguous run in float64 lanes.
 *
 * Written with GCC/Clang vector extensions so that the lanes are explicit: each
 * function keeps 16 float64 accumulators (two vectors of 8) per quantity and combines
 * them in a fixed tree, and a scalar tail in its own accumulator. The compiler maps the
 * 8-wide vectors onto AVX-512, AVX2 or SSE2 registers; the arithmetic per lane is the
 * same on each, so the bits depend neither on the instruction set nor on the data's
 * alignment. (Plain C loops with several accumulator arrays vectorise badly: GCC splits
 * them into a mix of vector and scalar code.)
 *
 * No -ffast-math and no FMA contraction (setup.py): NaN and Inf propagate.
 */
#ifndef CYNORM_LANES_H
#define CYNORM_LANES_H

#include <stddef.h>
#include <string.h>

typedef double cn_v8d __attribute__((vector_size(64)));
typedef float cn_v8f __attribute__((vector_size(32)));

#if defined(__GNUC__) || defined(__clang__)
#define CN_PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)
#else
#define CN_PREFETCH(p) ((void)(p))
#endif

/* float32 -> float64, 8 lanes */
#if defined(__AVX512F__)
#include <immintrin.h>
/* one vcvtps2pd: GCC lowers __builtin_convertvector to a slower shuffle sequence */
static inline cn_v8d cn_widen(cn_v8f v) {
    return (cn_v8d)_mm512_cvtps_pd((__m256)v);
}
#elif defined(__AVX__)
#include <immintrin.h>
static inline cn_v8d cn_widen(cn_v8f v) {
    union { __m256d h[2]; cn_v8d v; } u;
    union { cn_v8f v; __m128 h[2]; } f = {v};
    u.h[0] = _mm256_cvtps_pd(f.h[0]);
    u.h[1] = _mm256_cvtps_pd(f.h[1]);
    return u.v;
}
#else
static inline cn_v8d cn_widen(cn_v8f v) {
    return __builtin_convertvector(v, cn_v8d);
}
#endif

static inline cn_v8f cn_loadf(const float* p) {
    cn_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void cn_storef(float* p, cn_v8f v) {
    memcpy(p, &v, sizeof v);
}

static inline cn_v8d cn_load_f32(const float* p) {
    return cn_widen(cn_loadf(p));
}

/* prefetch [p, p + nbytes) into L1, one request per cache line */
static inline void cn_prefetch_range(const void* p, ptrdiff_t nbytes) {
    const char* c = (const char*)p;
    for (ptrdiff_t i = 0; i < nbytes; i += 64) CN_PREFETCH(c + i);
}

static inline cn_v8d cn_load_f64(const double* p) {
    cn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* lanes a + b, then 8 -> 4 -> 2 -> 1, always in this order */
static inline double cn_total(cn_v8d a, cn_v8d b) {
    cn_v8d s = a + b;
    double t0 = (s[0] + s[4]) + (s[2] + s[6]);
    double t1 = (s[1] + s[5]) + (s[3] + s[7]);
    return t0 + t1;
}

#define CN_ZERO ((cn_v8d){0, 0, 0, 0, 0, 0, 0, 0})

/* ---- sum(x) ------------------------------------------------------------------------ */

/* sum(x[i:n]) of float32 data, each value widened to float64 first, continuing the
 * lanes a, b */
static inline double cn_sum_f32_wide(const float* x, ptrdiff_t n, ptrdiff_t i, cn_v8d a,
                                     cn_v8d b) {
    double tail = 0;
    for (; i + 16 <= n; i += 16) {
        a += cn_load_f32(x + i);
        b += cn_load_f32(x + i + 8);
    }
    for (; i < n; i++) tail += x[i];
    return cn_total(a, b) + tail;
}

/* float32: the first pass of the two-pass moments only needs a mean close enough for
 * the corrected second pass, so runs of 8 steps are summed in float32 (32 float lanes,
 * error at most 8 float32 ulps of their magnitude) and those partials in float64. */
static inline double cn_sum_f32(const float* x, ptrdiff_t n) {
    double r;
    cn_v8d a = CN_ZERO, b = CN_ZERO;
    ptrdiff_t i = 0;
    while (i + 256 <= n) {
        cn_v8f p0, p1, p2, p3, v;
        memcpy(&p0, x + i, 32); memcpy(&p1, x + i + 8, 32);
        memcpy(&p2, x + i + 16, 32); memcpy(&p3, x + i + 24, 32);
        for (int t = 1; t < 8; t++) {
            const float* q = x + i + 32 * t;
            memcpy(&v, q, 32); p0 += v;
            memcpy(&v, q + 8, 32); p1 += v;
            memcpy(&v, q + 16, 32); p2 += v;
            memcpy(&v, q + 24, 32); p3 += v;
        }
        a += cn_widen(p0) + cn_widen(p2);
        b += cn_widen(p1) + cn_widen(p3);
        i += 256;
    }
    r = cn_sum_f32_wide(x, n, i, a, b);
    /* a float32 partial overflows for data near the float32 limit: widen everything
       then (also taken, to the same NaN or Inf, when the data hold NaN or Inf) */
    return (r - r == 0) ? r : cn_sum_f32_wide(x, n, 0, CN_ZERO, CN_ZERO);
}

static inline double cn_sum_f64(const double* x, ptrdiff_t n) {
    cn_v8d a = CN_ZERO, b = CN_ZERO;
    double tail = 0;
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a += cn_load_f64(x + i);
        b += cn_load_f64(x + i + 8);
    }
    for (; i < n; i++) tail += x[i];
    return cn_total(a, b) + tail;
}

/* ---- sum((x - m)^2) and sum(x - m) ------------------------------------------------
 * The second pass runs on data already in L1; it prefetches the same number of
 * elements at pf (the next piece) meanwhile. pf may be x itself (a no-op). */

#define CN_SQDEV_BODY(LOAD, STEP_PREFETCH)                                              \
    cn_v8d q0 = CN_ZERO, q1 = CN_ZERO, s0 = CN_ZERO, s1 = CN_ZERO, d;                  \
    double qt = 0, st = 0, e;                                                           \
    ptrdiff_t i = 0;                                                                    \
    for (; i + 16 <= n; i += 16) {                                                      \
        STEP_PREFETCH;                                                                  \
        d = LOAD(x + i) - m; s0 += d; q0 += d * d;                                      \
        d = LOAD(x + i + 8) - m; s1 += d; q1 += d * d;                                  \
    }                                                                                   \
    for (; i < n; i++) { e = x[i] - m; st += e; qt += e * e; }                          \
    *sdev += cn_total(s0, s1) + st;                                                     \
    return cn_total(q0, q1) + qt;

static inline double cn_sqdev_f32(const float* x, ptrdiff_t n, double m, double* sdev,
                                  const float* pf) {
    CN_SQDEV_BODY(cn_load_f32, CN_PREFETCH(pf + i))
}

static inline double cn_sqdev_f64(const double* x, ptrdiff_t n, double m, double* sdev,
                                  const double* pf) {
    CN_SQDEV_BODY(cn_load_f64, CN_PREFETCH(pf + i); CN_PREFETCH(pf + i + 8))
}

/* ---- sum(x^2): the second pass of RMSNorm's statistics (no mean) -------------------
 * The same lanes and order as cn_sqdev with m = 0 (x - 0 is x), so the same bits,
 * without the deviations' sum that only a centred set needs. */

#define CN_SUMSQ_BODY(LOAD, STEP_PREFETCH)                                              \
    cn_v8d q0 = CN_ZERO, q1 = CN_ZERO, d;                                               \
    double qt = 0, e;                                                                   \
    ptrdiff_t i = 0;                                                                    \
    for (; i + 16 <= n; i += 16) {                                                      \
        STEP_PREFETCH;                                                                  \
        d = LOAD(x + i); q0 += d * d;                                                   \
        d = LOAD(x + i + 8); q1 += d * d;                                               \
    }                                                                                   \
    for (; i < n; i++) { e = x[i]; qt += e * e; }                                       \
    return cn_total(q0, q1) + qt;

static inline double cn_sumsq_f32(const float* x, ptrdiff_t n, const float* pf) {
    CN_SUMSQ_BODY(cn_load_f32, CN_PREFETCH(pf + i))
}

static inline double cn_sumsq_f64(const double* x, ptrdiff_t n, const double* pf) {
    CN_SUMSQ_BODY(cn_load_f64, CN_PREFETCH(pf + i); CN_PREFETCH(pf + i + 8))
}

/* ---- gradient sums: g = dy * w (w may be NULL: g = dy) ----------------------------
 * *sdy += sum(g), *sdyx += sum(g * (x - m)) */

#define CN_GRAD_BODY(LOAD)                                                              \
    cn_v8d a0 = CN_ZERO, a1 = CN_ZERO, b0 = CN_ZERO, b1 = CN_ZERO, g0, g1;             \
    double at = 0, bt = 0, gt;                                                          \
    ptrdiff_t i = 0;                                                                    \
    if (w == NULL) {                                                                    \
        for (; i + 16 <= n; i += 16) {                                                  \
            g0 = LOAD(dy + i); g1 = LOAD(dy + i + 8);                                   \
            a0 += g0; a1 += g1;                                                         \
            b0 += g0 * (LOAD(x + i) - m); b1 += g1 * (LOAD(x + i + 8) - m);             \
        }                                                                               \
        for (; i < n; i++) { gt = dy[i]; at += gt; bt += gt * (x[i] - m); }             \
    } else {                                                                            \
        for (; i + 16 <= n; i += 16) {                                                  \
            g0 = LOAD(dy + i) * LOAD(w + i); g1 = LOAD(dy + i + 8) * LOAD(w + i + 8);   \
            a0 += g0; a1 += g1;                                                         \
            b0 += g0 * (LOAD(x + i) - m); b1 += g1 * (LOAD(x + i + 8) - m);             \
        }                                                                               \
        for (; i < n; i++) {                                                            \
            gt = (double)dy[i] * w[i]; at += gt; bt += gt * (x[i] - m);                 \
        }                                                                               \
    }                                                                                   \
    *sdy += cn_total(a0, a1) + at;                                                      \
    *sdyx += cn_total(b0, b1) + bt;

static inline void cn_grad_sums_f32(const float* dy, const float* x, const float* w,
                                    ptrdiff_t n, double m, double* sdy, double* sdyx) {
    CN_GRAD_BODY(cn_load_f32)
}

static inline void cn_grad_sums_f64(const double* dy, const double* x, const double* w,
                                    ptrdiff_t n, double m, double* sdy, double* sdyx) {
    CN_GRAD_BODY(cn_load_f64)
}

/* ---- a tile of the row-family backward, float32 ------------------------------------
 * Rows [0, nrows) of a block (row r at offset r * K), columns [0, n):
 *   xhat = ((x - mh) - ml) * rs,  dx = (((dy * w) - mg) - xhat * mgx) * rs   (float32)
 *   acc_w[k] += dy * xhat,  acc_b[k] += dy                                  (float64)
 * with the row coefficients coef[5 r ...] = mh, ml, rs, mg, mgx: the mean as hi + lo,
 * mg = mean(dy * w), mgx = mean(dy * w * xhat) (w may be NULL). rstd is factored out of
 * dx so that g - mean(g) cancels before it is scaled (a constant row gets dx exact).
 * Row by row, so dy, x and dx stream; the column sums (n <= 1024: 16 KiB) stay in L1. */
static inline void cn_row_tile_f32(const float* dy, const float* x, float* dx,
                                   const float* w, ptrdiff_t K, ptrdiff_t nrows,
                                   ptrdiff_t n, const float* coef, double* acc_w,
                                   double* acc_b) {
    static const cn_v8f ones = {1, 1, 1, 1, 1, 1, 1, 1};
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const float* c = coef + 5 * r;
        const float* dyr = dy + r * K;
        const float* xr = x + r * K;
        float* dxr = dx + r * K;
        ptrdiff_t k = 0;
        for (; k + 8 <= n; k += 8) {
            cn_v8f d = cn_loadf(dyr + k);
            cn_v8f h = ((cn_loadf(xr + k) - c[0]) - c[1]) * c[2];
            cn_v8f wk = w != NULL ? cn_loadf(w + k) : ones;
            cn_v8d aw = cn_load_f64(acc_w + k) + cn_widen(d * h);
            cn_v8d ab = cn_load_f64(acc_b + k) + cn_widen(d);
            memcpy(acc_w + k, &aw, sizeof aw);
            memcpy(acc_b + k, &ab, sizeof ab);
            cn_storef(dxr + k, (((d * wk) - c[3]) - h * c[4]) * c[2]);
        }
        for (; k < n; k++) {
            float d = dyr[k], h = ((xr[k] - c[0]) - c[1]) * c[2];
            acc_w[k] += d * h;
            acc_b[k] += d;
            dxr[k] = (((d * (w != NULL ? w[k] : 1.0f)) - c[3]) - h * c[4]) * c[2];
        }
    }
}

/* ---- per-column moments of a tile (column reductions) -----------------------------
 * Rows [0, nrows) of a row-major tile (row stride D), columns [0, n): for each column
 * j, the corrected two-pass mean pm[j] and m2 pq[j] of its nrows values x - k[j], in
 * float64. The shift k[j] (the caller's: a value of the column) makes the block means
 * that the caller merges small, so that their rounding is relative to the data's
 * spread, not to its offset (a column 1e6 +- 1 keeps its variance's digits).
 * Chunks of CN_COL_CHUNK columns: each pass walks the rows in order, adding a row's
 * chunk (contiguous, vector loads) to per-column float64 lanes that stay in L1. Reading
 * whole row pieces, never a narrow column strip down the rows, keeps the tile's lines
 * in distinct cache sets even when D is a power of two. Each lane is one column summed
 * row by row in order, so a column's bits are those of the plain scalar loop (used for
 * the last n % 8 columns), whatever the chunk or the instruction set. m2 < 0 from
 * rounding becomes 0; NaN stays NaN. */

#define CN_COL_CHUNK 256

typedef long long cn_v8l __attribute__((vector_size(64)));

static inline cn_v8d cn_clamp0(cn_v8d q) {
    cn_v8l neg = (cn_v8l)(q < CN_ZERO);  /* false for NaN */
    return (cn_v8d)((cn_v8l)q & ~neg);
}

static inline void cn_store_f64(double* p, cn_v8d v) {
    memcpy(p, &v, sizeof v);
}

#define CN_COL_MOMENTS_BODY(T, LOAD)                                                    \
    const double cnt = (double)nrows;                                                   \
    cn_v8d s[CN_COL_CHUNK / 8], d[CN_COL_CHUNK / 8], q[CN_COL_CHUNK / 8];               \
    cn_v8d kv[CN_COL_CHUNK / 8];                                                        \
    ptrdiff_t j0, j, r, v, nv;                                                          \
    for (j0 = 0; j0 + 8 <= n; j0 += CN_COL_CHUNK) {                                     \
        nv = (n - j0) / 8;                                                              \
        if (nv > CN_COL_CHUNK / 8) nv = CN_COL_CHUNK / 8;                               \
        for (v = 0; v < nv; v++) {                                                      \
            s[v] = d[v] = q[v] = CN_ZERO;                                               \
            kv[v] = cn_load_f64(k + j0 + 8 * v);                                        \
        }                                                                               \
        for (r = 0; r < nrows; r++) {                                                   \
            const T* xr = x + r * D + j0;                                               \
            for (v = 0; v < nv; v++) s[v] += LOAD(xr + 8 * v) - kv[v];                  \
        }                                                                               \
        for (v = 0; v < nv; v++) s[v] = s[v] / cnt;                                     \
        for (r = 0; r < nrows; r++) {                                                   \
            const T* xr = x + r * D + j0;                                               \
            for (v = 0; v < nv; v++) {                                                  \
                cn_v8d e = (LOAD(xr + 8 * v) - kv[v]) - s[v];                           \
                d[v] += e;                                                              \
                q[v] += e * e;                                                          \
            }                                                                           \
        }                                                                               \
        for (v = 0; v < nv; v++) {                                                      \
            cn_store_f64(pm + j0 + 8 * v, s[v] + d[v] / cnt);                           \
            cn_store_f64(pq + j0 + 8 * v, cn_clamp0(q[v] - d[v] * d[v] / cnt));         \
        }                                                                               \
    }                                                                                   \
    for (j = n - n % 8; j < n; j++) {                                                   \
        double sj = 0, dj = 0, qj = 0, m, e;                                            \
        for (r = 0; r < nrows; r++) sj += x[r * D + j] - k[j];                          \
        m = sj / cnt;                                                                   \
        for (r = 0; r < nrows; r++) {                                                   \
            e = (x[r * D + j] - k[j]) - m;                                              \
            dj += e;                                                                    \
            qj += e * e;                                                                \
        }                                                                               \
        pm[j] = m + dj / cnt;                                                           \
        qj = qj - dj * dj / cnt;                                                        \
        pq[j] = qj < 0 ? 0 : qj;                                                        \
    }

static inline void cn_col_moments_f32(const float* x, ptrdiff_t D, ptrdiff_t nrows,
                                      ptrdiff_t n, const double* k, double* pm,
                                      double* pq) {
    CN_COL_MOMENTS_BODY(float, cn_load_f32)
}

static inline void cn_col_moments_f64(const double* x, ptrdiff_t D, ptrdiff_t nrows,
                                      ptrdiff_t n, const double* k, double* pm,
                                      double* pq) {
    CN_COL_MOMENTS_BODY(double, cn_load_f64)
}

/* ---- pairwise block merge of n adjacent columns --------------------------------------
 * tree_merge (_common.pxd) for the n adjacent columns pm[j], pq[j] (block q of column j
 * at pm[q * stride + j]): the same tree, and per column the same operations in the same
 * order as its chan_merge, so the same bits. The counts of a merge are the same for
 * every column, so its two factors are formed once, and 8 columns share each vector
 * operation and each cache line of the blocks' partials (a column at a time walks a
 * stride-apart line per block and divides twice per merge). */
static inline void cn_tree_merge_cols(double* pm, double* pq, ptrdiff_t stride,
                                      ptrdiff_t n_blocks, ptrdiff_t block_rows,
                                      ptrdiff_t n_rows, ptrdiff_t n) {
    for (ptrdiff_t step = 1; step < n_blocks; step *= 2) {
        for (ptrdiff_t q = 0; q + step < n_blocks; q += 2 * step) {
            double ca = (double)(step * block_rows);
            double cb = (double)((q + 2 * step >= n_blocks ? n_rows
                                  : (q + 2 * step) * block_rows) - (q + step) * block_rows);
            double* am = pm + q * stride;
            double* aq = pq + q * stride;
            const double* bm = pm + (q + step) * stride;
            const double* bq = pq + (q + step) * stride;
            ptrdiff_t j = 0;
            if (cb == 0) continue;
            if (ca == 0) {
                memcpy(am, bm, n * sizeof(double));
                memcpy(aq, bq, n * sizeof(double));
                continue;
            }
            double tot = ca + cb;
            double fm = cb / tot, fq = (ca * cb) / tot;
            for (; j + 8 <= n; j += 8) {
                cn_v8d ma = cn_load_f64(am + j), d = cn_load_f64(bm + j) - ma;
                cn_v8d qa = (cn_load_f64(aq + j) + cn_load_f64(bq + j)) + (d * d) * fq;
                ma = ma + d * fm;
                memcpy(am + j, &ma, sizeof ma);
                memcpy(aq + j, &qa, sizeof qa);
            }
            for (; j < n; j++) {
                double d = bm[j] - am[j];
                am[j] = am[j] + d * fm;
                aq[j] = (aq[j] + bq[j]) + (d * d) * fq;
            }
        }
    }
}

#endif
