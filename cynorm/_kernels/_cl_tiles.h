/* The channels-last forward's column loops (channels_last.pyx), written once over the
 * storage type T with the storage loaders of _lanes.h (CN_LD, CN_LDF, CN_STF, CN_LD1):
 *
 *   cn_cl_shift_sums_T  the one-pass statistics of a row block: per column j, the sums
 *                       of e = x - k[j] and e * e in float64, row by row in order
 *   cn_cl_apply_T       the float32 apply y = (((x - mh) - ml) * rf) * wf + bf with
 *                       per-column constants (the slab family's float32 form)
 *   cn_ch_apply_T       the same with per-channel constants over runs of HW columns
 *                       (BatchNorm's column path)
 *
 * The sums keep register tiles of CN_CT vectors of columns over groups of CN_CR rows
 * (CN_COL_TILES of _lanes.h: the tile's sums in registers across the group's rows, the
 * group's rows walked whole, CN_CR contiguous streams). The apply walks one row at a
 * time, tiles of CN_AT vectors across it: measured (8 x 3136 rows of 256 float32
 * channels, one thread), walking groups of 2 to 64 rows a tile at a time, to keep the
 * constants in registers across rows, took 1.7-2.2x the time of whole rows (the
 * interleaved stores of several rows stream worse than one row's; the constants are L1
 * hits either way). Each column is computed alone, so its bits depend neither on the
 * tile width, nor on the row grouping, nor on the instruction set. */
#ifndef CYNORM_CL_TILES_H
#define CYNORM_CL_TILES_H

#include "_lanes.h"

/* ---- one-pass shifted sums of a row block -------------------------------------------
 * Rows [0, nrows) of columns [0, n) (row stride D): d[j] += sum(e), q[j] += sum(e * e),
 * e = x - c[j] in float64, each column row by row in order (CN_COL_DEV_BODY and
 * CN_COL_DEV_SCALAR of _lanes.h). During each group of CN_CR rows the same rows of the following pf_rows
 * rows (the caller's next block) are prefetched into L2, so that the next block does
 * not wait for memory: the data are read from memory once, by this pass. */
#define CN_CL_SHIFT_SUMS_DEF(T_, NAME)                                                  \
    static inline void cn_cl_dev_rows_##NAME(const T_* x, ptrdiff_t D, ptrdiff_t nrows, \
                                             ptrdiff_t n, const double* c, double* d,   \
                                             double* q) {                               \
        typedef T_ T;                                                                   \
        CN_COL_TILES(CN_COL_DEV_BODY(T, CN_LD), CN_COL_DEV_SCALAR(T))                    \
    }                                                                                   \
    static inline void cn_cl_shift_sums_##NAME(const T_* x, ptrdiff_t D,               \
                                               ptrdiff_t nrows, ptrdiff_t n,            \
                                               const double* c, double* d, double* q,   \
                                               ptrdiff_t pf_rows) {                     \
        ptrdiff_t g0, g1, rp, b;                                                        \
        for (g0 = 0; g0 < nrows; g0 = g1) {                                             \
            g1 = g0 + CN_CR < nrows ? g0 + CN_CR : nrows;                               \
            for (rp = nrows + g0; rp < nrows + g1 && rp < nrows + pf_rows; rp++)        \
                for (b = 0; b < n * (ptrdiff_t)sizeof(T_); b += 64)                     \
                    CN_PREFETCH_L2((const char*)(x + rp * D) + b);                      \
            cn_cl_dev_rows_##NAME(x + g0 * D, D, g1 - g0, n, c, d, q);                  \
        }                                                                               \
    }

CN_CL_SHIFT_SUMS_DEF(float, f32)
CN_CL_SHIFT_SUMS_DEF(double, f64)
CN_CL_SHIFT_SUMS_DEF(cn_f16, f16)
CN_CL_SHIFT_SUMS_DEF(cn_bf16, bf16)

/* ---- the apply of a row block, float32 lanes ----------------------------------------
 * Rows [0, nrows) of columns [0, n) (row stride D; y may be x):
 * y = (((x - mh[j]) - ml[j]) * rf[j]) * wf[j] + bf[j], operation for operation the
 * slab family's float32 apply (so the same constants give the same bits); 16-bit data
 * widened and narrowed in registers. The last n % CN_FW columns of each row run as one
 * zero-padded chunk (CN_PART_IN, as cn_cl_affine). Tiles of CN_AT vectors: 5 * CN_AT
 * constants and CN_AT data vectors fit AVX-512's 32 registers, or AVX's and SSE's 16. */
#if defined(__AVX512F__)
#define CN_AT 4
#else
#define CN_AT 2
#endif

#define CN_CL_APPLY_TILE(W)                                                             \
    {                                                                                   \
        cn_vf kh[W], kl[W], kr[W], kw[W], kb[W];                                        \
        for (v = 0; v < (W); v++) {                                                     \
            kh[v] = cn_loadf(mh + j + CN_FW * v);                                       \
            kl[v] = cn_loadf(ml + j + CN_FW * v);                                       \
            kr[v] = cn_loadf(rf + j + CN_FW * v);                                       \
            kw[v] = cn_loadf(wf + j + CN_FW * v);                                       \
            kb[v] = cn_loadf(bf + j + CN_FW * v);                                       \
        }                                                                               \
        for (r = r0; r < r1; r++)                                                       \
            for (v = 0; v < (W); v++) {                                                 \
                ptrdiff_t o = r * D + j + CN_FW * v;                                    \
                CN_STF(y + o, (((CN_LDF(x + o) - kh[v]) - kl[v]) * kr[v]) * kw[v]       \
                                  + kb[v]);                                             \
            }                                                                           \
    }

#define CN_CL_APPLY_DEF(T_, NAME)                                                       \
    static inline void cn_cl_apply_##NAME(const T_* x, T_* y, ptrdiff_t D,             \
                                          ptrdiff_t nrows, ptrdiff_t n,                 \
                                          const float* mh, const float* ml,             \
                                          const float* rf, const float* wf,             \
                                          const float* bf) {                            \
        typedef T_ TT;                                                                  \
        ptrdiff_t r0, r1, r, j, v;                                                      \
        const ptrdiff_t nvec = n - n % CN_FW;                                           \
        for (r0 = 0; r0 < nrows; r0 = r1) {                                             \
            r1 = r0 + 1; /* one row at a time (see the top of this file) */             \
            for (j = 0; j + CN_AT * CN_FW <= nvec; j += CN_AT * CN_FW)                  \
                CN_CL_APPLY_TILE(CN_AT)                                                 \
            for (; j < nvec; j += CN_FW) CN_CL_APPLY_TILE(1)                            \
            if (j < n)                                                                  \
                for (r = r0; r < r1; r++) {                                             \
                    const TT* xr = x + r * D;                                           \
                    TT* yr = y + r * D;                                                 \
                    const ptrdiff_t m = n - j;                                          \
                    CN_PART_IN(TT, xp, xr, j, m);                                       \
                    CN_PART_IN(float, mhp, mh, j, m);                                   \
                    CN_PART_IN(float, mlp, ml, j, m);                                   \
                    CN_PART_IN(float, rfp, rf, j, m);                                   \
                    CN_PART_IN(float, wfp, wf, j, m);                                   \
                    CN_PART_IN(float, bfp, bf, j, m);                                   \
                    CN_PART_OUT(TT, yp, yr, j, m);                                      \
                    CN_STF(yp, (((CN_LDF(xp) - cn_loadf(mhp)) - cn_loadf(mlp))          \
                                * cn_loadf(rfp)) * cn_loadf(wfp) + cn_loadf(bfp));      \
                    CN_PART_DONE(TT, yp, yr, j, m);                                     \
                }                                                                       \
        }                                                                               \
    }

CN_CL_APPLY_DEF(float, f32)
CN_CL_APPLY_DEF(cn_f16, f16)
CN_CL_APPLY_DEF(cn_bf16, bf16)

/* ---- the same apply with per-channel constants (BatchNorm's column path) ----------
 * Rows [0, nrows) (row stride D) of nch channels of HW >= CN_FW contiguous columns
 * each, channel c's constants mh[c], ml[c], rf[c], wf[c], bf[c] broadcast across its columns: operation
 * for operation cn_cl_apply's (the same constants give the same bits), without reloading
 * five constant vectors for every data vector, which made runs of 16 or more columns
 * (7 x 7 maps) bound by the loads. HW >= CN_FW: a run's last HW % CN_FW columns are
 * computed as part of its last CN_FW columns, a vector loaded before any of the run is
 * stored (so y may be x) and stored after it, over the values the loop stored there:
 * the same values, as every lane's arithmetic is the same (a zero-padded chunk per run,
 * CN_PART_IN, cost more than the run's vectors). */
#define CN_CH_APPLY_DEF(T_, NAME)                                                       \
    static inline void cn_ch_apply_##NAME(const T_* x, T_* y, ptrdiff_t D,             \
                                          ptrdiff_t nrows, ptrdiff_t nch, ptrdiff_t HW, \
                                          const float* mh, const float* ml,             \
                                          const float* rf, const float* wf,             \
                                          const float* bf) {                            \
        ptrdiff_t r, c, i;                                                              \
        const ptrdiff_t last = HW - CN_FW;                                              \
        for (r = 0; r < nrows; r++)                                                     \
            for (c = 0; c < nch; c++) {                                                 \
                const T_* xr = x + r * D + c * HW;                                      \
                T_* yr = y + r * D + c * HW;                                            \
                const cn_vf kh = {CN_FLANES(mh[c])}, kl = {CN_FLANES(ml[c])};           \
                const cn_vf kr = {CN_FLANES(rf[c])}, kw = {CN_FLANES(wf[c])};           \
                const cn_vf kb = {CN_FLANES(bf[c])};                                    \
                const cn_vf t = (((CN_LDF(xr + last) - kh) - kl) * kr) * kw + kb;       \
                for (i = 0; i + CN_FW <= HW; i += CN_FW)                                \
                    CN_STF(yr + i, (((CN_LDF(xr + i) - kh) - kl) * kr) * kw + kb);      \
                if (i < HW) CN_STF(yr + last, t);                                       \
            }                                                                           \
    }

CN_CH_APPLY_DEF(float, f32)
CN_CH_APPLY_DEF(cn_f16, f16)
CN_CH_APPLY_DEF(cn_bf16, bf16)

#endif
