/* The reductions under every kernel: sums over one contiguous run in float64 lanes.
 *
 * Written with GCC/Clang vector extensions so that the lanes are explicit: each
 * function keeps 16 float64 accumulators per quantity (lane k sums the elements i with
 * i % 16 == k) and combines them in a fixed tree (cn_total), and a scalar tail in its
 * own accumulator. The 16 lanes are held as CN_NV vectors of the level's native width,
 * CN_DW float64 lanes each: 2 x 512 bits with AVX-512, 4 x 256 with AVX, 8 x 128
 * otherwise, so that they stay in registers on every level (a vector wider than the
 * registers is split by the compiler through the stack). The arithmetic per lane and
 * the tree are the same on each, so the bits depend neither on the instruction set nor
 * on the data's alignment. (Plain C loops with several accumulator arrays vectorise
 * badly: GCC splits them into a mix of vector and scalar code.) The loops over the CN_NV
 * vectors have a constant trip count; -O3 unrolls them and keeps the vectors in
 * registers.
 *
 * No -ffast-math and no FMA contraction (setup.py): NaN and Inf propagate.
 */
#ifndef CYNORM_LANES_H
#define CYNORM_LANES_H

#include <stddef.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include "_lowp.h"

/* the native vector width in bytes */
#if defined(__AVX512F__)
#define CN_VB 64
#elif defined(__AVX__)
#define CN_VB 32
#else
#define CN_VB 16
#endif
#define CN_DW (CN_VB / 8)  /* float64 lanes per vector: 8, 4 or 2 */
#define CN_FW (CN_VB / 4)  /* float32 lanes per vector: 16, 8 or 4 */
#define CN_NV (16 / CN_DW) /* vectors per 16 float64 lanes: 2, 4 or 8 */

typedef double cn_vd __attribute__((vector_size(CN_VB)));
typedef long long cn_vl __attribute__((vector_size(CN_VB)));
typedef float cn_vf __attribute__((vector_size(CN_VB)));
typedef int cn_vi __attribute__((vector_size(CN_VB)));
typedef float cn_vh __attribute__((vector_size(CN_VB / 2))); /* CN_DW float32 lanes */

/* initialiser lists with c in every lane of a cn_vd / cn_vl (CN_DLANES) or of a
 * cn_vf / cn_vi (CN_FLANES) */
#define CN_L2_(c) c, c
#define CN_L4_(c) CN_L2_(c), CN_L2_(c)
#define CN_L8_(c) CN_L4_(c), CN_L4_(c)
#define CN_L16_(c) CN_L8_(c), CN_L8_(c)
#if CN_DW == 8
#define CN_DLANES(c) CN_L8_(c)
#define CN_FLANES(c) CN_L16_(c)
#elif CN_DW == 4
#define CN_DLANES(c) CN_L4_(c)
#define CN_FLANES(c) CN_L8_(c)
#else
#define CN_DLANES(c) CN_L2_(c)
#define CN_FLANES(c) CN_L4_(c)
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CN_PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)
#define CN_PREFETCH_L2(p) __builtin_prefetch((const void*)(p), 0, 1)
#else
#define CN_PREFETCH(p) ((void)(p))
#define CN_PREFETCH_L2(p) ((void)(p))
#endif

/* float32 <-> float64: CN_DW lanes loaded and widened (cn_load_f32), the low or high
 * half of a cn_vf widened (cn_widen_lo/hi), CN_DW lanes narrowed and stored
 * (cn_store_f32). One conversion instruction each: GCC lowers __builtin_convertvector
 * to slower shuffle sequences. */
#if defined(__AVX512F__)
static inline cn_vd cn_load_f32(const float* p) {
    return (cn_vd)_mm512_cvtps_pd(_mm256_loadu_ps(p));
}
static inline cn_vd cn_widen_lo(cn_vf v) {
    return (cn_vd)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)v));
}
static inline cn_vd cn_widen_hi(cn_vf v) {
    return (cn_vd)_mm512_cvtps_pd(
        _mm256_castpd_ps(_mm512_extractf64x4_pd((__m512d)v, 1)));
}
static inline void cn_store_f32(float* p, cn_vd v) {
    _mm256_storeu_ps(p, _mm512_cvtpd_ps((__m512d)v));
}
#elif defined(__AVX__)
static inline cn_vd cn_load_f32(const float* p) {
    return (cn_vd)_mm256_cvtps_pd(_mm_loadu_ps(p));
}
static inline cn_vd cn_widen_lo(cn_vf v) {
    return (cn_vd)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v));
}
static inline cn_vd cn_widen_hi(cn_vf v) {
    return (cn_vd)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1));
}
static inline void cn_store_f32(float* p, cn_vd v) {
    _mm_storeu_ps(p, _mm256_cvtpd_ps((__m256d)v));
}
#elif defined(__SSE2__)
static inline cn_vd cn_load_f32(const float* p) {
    return (cn_vd)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)p)));
}
static inline cn_vd cn_widen_lo(cn_vf v) {
    return (cn_vd)_mm_cvtps_pd((__m128)v);
}
static inline cn_vd cn_widen_hi(cn_vf v) {
    return (cn_vd)_mm_cvtps_pd(_mm_movehl_ps((__m128)v, (__m128)v));
}
static inline void cn_store_f32(float* p, cn_vd v) {
    _mm_storel_epi64((__m128i*)p, _mm_castps_si128(_mm_cvtpd_ps((__m128d)v)));
}
#else
static inline cn_vd cn_load_f32(const float* p) {
    cn_vh h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, cn_vd);
}
static inline cn_vd cn_widen_lo(cn_vf v) {
    cn_vh h;
    memcpy(&h, &v, sizeof h);
    return __builtin_convertvector(h, cn_vd);
}
static inline cn_vd cn_widen_hi(cn_vf v) {
    cn_vh h;
    memcpy(&h, (const char*)&v + sizeof h, sizeof h);
    return __builtin_convertvector(h, cn_vd);
}
static inline void cn_store_f32(float* p, cn_vd v) {
    cn_vh h = __builtin_convertvector(v, cn_vh);
    memcpy(p, &h, sizeof h);
}
#endif

/* the half hi (0: low, 1: high) of v, widened */
static inline cn_vd cn_widen_half(cn_vf v, int hi) {
    return hi ? cn_widen_hi(v) : cn_widen_lo(v);
}

static inline cn_vf cn_loadf(const float* p) {
    cn_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void cn_storef(float* p, cn_vf v) {
    memcpy(p, &v, sizeof v);
}

static inline cn_vd cn_load_f64(const double* p) {
    cn_vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void cn_store_f64(double* p, cn_vd v) {
    memcpy(p, &v, sizeof v);
}

/* ---- storage loaders ---------------------------------------------------------------
 * The loops below are written once over a storage type T (float, double, cn_f16,
 * cn_bf16: _lowp.h) and reach the data only through these steps, which widen in
 * registers on load and narrow (round to nearest even) in registers on store:
 *   CN_LD(p)      CN_DW values at p as float64 lanes (cn_vd)
 *   CN_LDF(p)     CN_FW values at p as float32 lanes (cn_vf; not for double)
 *   CN_STF(p, v)  the CN_FW float32 lanes of v stored at p
 *   CN_LD1(e)     one element e as a number (float; double for double)
 *   CN_ST1(p, f)  the float f stored at p
 * chosen at compile time by the pointer's type (_Generic). Widening is exact, so a loop
 * on 16-bit data does, operation for operation, what it does on float32 data holding the
 * same values: the same bits, rounded once on a 16-bit store. float16 uses F16C's
 * vcvtph2ps / vcvtps2ph where the level has them (v3, v4), the integer bit manipulation
 * of _lowp.h elsewhere (the same bits); bfloat16 is a 16-bit shift on load and the
 * integer rounding of _lowp.h on store (vcvtneps2bf16 in the forward applies where the
 * CPU has AVX-512 BF16: cn_storef_bf16_hw, the same bits). */

typedef unsigned int cn_vu __attribute__((vector_size(CN_VB)));
typedef unsigned short cn_vw __attribute__((vector_size(CN_VB / 2))); /* CN_FW 16-bit */

/* CN_FW 16-bit values zero-extended to 32-bit lanes, and back (v < 2**16 per lane) */
static inline cn_vu cn_w_load(const void* p) {
#if defined(__AVX512F__)
    return (cn_vu)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__AVX2__)
    return (cn_vu)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
#elif defined(__SSE4_1__)
    return (cn_vu)_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)p));
#else
    cn_vw h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, cn_vu);
#endif
}

/* CN_DW 16-bit values zero-extended into the low CN_DW 32-bit lanes (the others 0) */
static inline cn_vu cn_w_load_lo(const void* p) {
#if defined(__AVX512F__)
    return (cn_vu)_mm512_castsi256_si512(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    return (cn_vu)_mm256_zextsi128_si256(
        _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)p)));
#elif defined(__SSE4_1__)
    int b;
    memcpy(&b, p, sizeof b);
    return (cn_vu)_mm_cvtepu16_epi32(_mm_cvtsi32_si128(b));
#else
    unsigned short b[CN_FW] = {0};
    cn_vw h;
    memcpy(b, p, CN_DW * sizeof(unsigned short));
    memcpy(&h, b, sizeof h);
    return __builtin_convertvector(h, cn_vu);
#endif
}

static inline void cn_w_store(void* p, cn_vu v) {
#if defined(__AVX512F__)
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16((__m512i)v));
#elif defined(__AVX2__)
    __m256i q = _mm256_packus_epi32((__m256i)v, (__m256i)v);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(q, 0x08)));
#elif defined(__SSE4_1__)
    _mm_storel_epi64((__m128i*)p, _mm_packus_epi32((__m128i)v, (__m128i)v));
#else
    cn_vw h = __builtin_convertvector(v, cn_vw);
    memcpy(p, &h, sizeof h);
#endif
}

/* the bit manipulations of _lowp.h, on lanes of any width: bfloat16 -> float32 is a
 * shift; float32 -> bfloat16 rounds to nearest even (NaN: quiet, the payload's top
 * bits); float16 <-> float32 as F16C does it, NaN payloads included */
#define CN_BF16_WIDEN_BITS(VF, h) ((VF)((h) << 16))
#define CN_BF16_NARROW_BITS(VU, f, out)                                                \
    do {                                                                               \
        VU u_ = (VU)(f);                                                               \
        VU nan_ = (VU)((u_ & 0x7fffffffu) > 0x7f800000u);                              \
        VU r_ = (u_ + 0x7fffu + ((u_ >> 16) & 1u)) >> 16;                              \
        (out) = (r_ & ~nan_) | (((u_ >> 16) | 0x40u) & nan_);                          \
    } while (0)
#define CN_F16_WIDEN_BITS(VU, VF, h, out)                                              \
    do {                                                                               \
        VU em_ = (h) & 0x7fffu, s_ = ((h) & 0x8000u) << 16;                            \
        VU fin_ = (VU)((VF)(em_ << 13) * 0x1p112f);                                    \
        VU special_ = (VU)(em_ >= 0x7c00u);                                            \
        VU quiet_ = (VU)(em_ > 0x7c00u) & 0x400000u;                                   \
        VU inf_ = 0x7f800000u | (em_ << 13) | quiet_;                                  \
        (out) = (VF)(((fin_ & ~special_) | (inf_ & special_)) | s_);                   \
    } while (0)
#define CN_F16_NARROW_BITS(VU, VF, f, out)                                             \
    do {                                                                               \
        VU u_ = (VU)(f), s_ = u_ & 0x80000000u;                                        \
        u_ ^= s_;                                                                      \
        VU big_ = (VU)(u_ >= 0x47800000u);                                             \
        VU small_ = (VU)(u_ < 0x38800000u);                                            \
        VU nan_ = (VU)(u_ > 0x7f800000u);                                              \
        VU a_ = (0x7c00u & ~nan_) | ((0x7e00u | ((u_ >> 13) & 0x3ffu)) & nan_);         \
        VU b_ = (VU)((VF)u_ + 0.5f) - 0x3f000000u;                                     \
        VU c_ = (u_ - 0x38000000u + 0xfffu + ((u_ >> 13) & 1u)) >> 13;                 \
        (out) = ((a_ & big_) | (b_ & small_) | (c_ & ~(big_ | small_))) | (s_ >> 16);  \
    } while (0)

static inline cn_vf cn_loadf_bf16(const cn_bf16* p) {
#if defined(__AVX512BW__)
    /* each value into the high half of its 32-bit lane, the low half zeroed: one
       vpermw (a vpmovzxwd and a shift otherwise) */
    const __m512i idx = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0,
                                         8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0,
                                         0, 0);
    return (cn_vf)_mm512_maskz_permutexvar_epi16(
        0xAAAAAAAAu, idx, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p)));
#else
    return CN_BF16_WIDEN_BITS(cn_vf, cn_w_load(p));
#endif
}

static inline void cn_storef_bf16(cn_bf16* p, cn_vf v) {
#if defined(__AVX512F__)
    /* the same rounding with the NaN lanes found by one unordered compare into a mask
       register (NaN exactly where (u & 0x7fffffff) > 0x7f800000) */
    __m512i u = (__m512i)v, t = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                 _mm512_and_si512(t, _mm512_set1_epi32(1)));
    __mmask16 nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(_mm512_srli_epi32(r, 16), nan, t, _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
#else
    cn_vu o;
    CN_BF16_NARROW_BITS(cn_vu, v, o);
    cn_w_store(p, o);
#endif
}

static inline cn_vd cn_load_bf16(const cn_bf16* p) {
    return cn_widen_lo(CN_BF16_WIDEN_BITS(cn_vf, cn_w_load_lo(p)));
}

static inline cn_vf cn_loadf_f16(const cn_f16* p) {
#if defined(__F16C__) && defined(__AVX512F__)
    return (cn_vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__F16C__) && defined(__AVX__)
    return (cn_vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
    cn_vf f;
    CN_F16_WIDEN_BITS(cn_vu, cn_vf, cn_w_load(p), f);
    return f;
#endif
}

static inline void cn_storef_f16(cn_f16* p, cn_vf v) {
#if defined(__F16C__) && defined(__AVX512F__)
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__) && defined(__AVX__)
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
    cn_vu o;
    CN_F16_NARROW_BITS(cn_vu, cn_vf, v, o);
    cn_w_store(p, o);
#endif
}

static inline cn_vd cn_load_f16(const cn_f16* p) {
#if defined(__F16C__) && defined(__AVX512F__)
    return (cn_vd)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__F16C__) && defined(__AVX__)
    return (cn_vd)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)p)));
#else
    cn_vf f;
    CN_F16_WIDEN_BITS(cn_vu, cn_vf, cn_w_load_lo(p), f);
    return cn_widen_lo(f);
#endif
}

static inline float cn_ld1_f32(float v) { return v; }
static inline double cn_ld1_f64(double v) { return v; }
static inline void cn_st1_f32(float* p, float v) { *p = v; }
static inline void cn_st1_f16(cn_f16* p, float v) { *p = cn_float_to_f16(v); }
static inline void cn_st1_bf16(cn_bf16* p, float v) { *p = cn_float_to_bf16(v); }

#define CN_LD(p)                                                                        \
    _Generic((p), const float*: cn_load_f32, float*: cn_load_f32,                       \
             const double*: cn_load_f64, double*: cn_load_f64,                          \
             const cn_f16*: cn_load_f16, cn_f16*: cn_load_f16,                          \
             const cn_bf16*: cn_load_bf16, cn_bf16*: cn_load_bf16)(p)
#define CN_LDF(p)                                                                       \
    _Generic((p), const float*: cn_loadf, float*: cn_loadf,                             \
             const cn_f16*: cn_loadf_f16, cn_f16*: cn_loadf_f16,                        \
             const cn_bf16*: cn_loadf_bf16, cn_bf16*: cn_loadf_bf16)(p)
#define CN_STF(p, v)                                                                    \
    _Generic((p), float*: cn_storef, cn_f16*: cn_storef_f16,                            \
             cn_bf16*: cn_storef_bf16)((p), (v))
#define CN_LD1(e)                                                                       \
    _Generic((e), float: cn_ld1_f32, double: cn_ld1_f64, cn_f16: cn_f16_to_float,       \
             cn_bf16: cn_bf16_to_float)(e)
#define CN_ST1(p, f)                                                                    \
    _Generic((p), float*: cn_st1_f32, cn_f16*: cn_st1_f16, cn_bf16*: cn_st1_bf16)((p), (f))

#define CN_ZERO ((cn_vd){0})

/* the 16 lanes l[0..CN_NV) combined, always in this order: lane k + lane k + 8, then
 * 8 -> 4 -> 2 -> 1 the same way (lane k + lane k + half) */
static inline double cn_total(const cn_vd* l) {
    cn_vd v[CN_NV];
    double s[CN_DW];
    int h, k;
    for (k = 0; k < CN_NV; k++) v[k] = l[k];
    for (h = CN_NV / 2; h >= 1; h /= 2)
        for (k = 0; k < h; k++) v[k] = v[k] + v[k + h];
    for (k = 0; k < CN_DW; k++) s[k] = v[0][k];
    for (h = CN_DW / 2; h >= 1; h /= 2)
        for (k = 0; k < h; k++) s[k] = s[k] + s[k + h];
    return s[0];
}

/* 16 lanes, all zero */
#define CN_LANES(a)                                                                     \
    cn_vd a[CN_NV];                                                                     \
    for (int a##_j = 0; a##_j < CN_NV; a##_j++) a[a##_j] = CN_ZERO

/* for each of the CN_NV vectors j of 16 lanes (element offset CN_DW * j) */
#define CN_EACH(j) for (int j = 0; j < CN_NV; j++)

/* ---- sum(x) ------------------------------------------------------------------------ */

/* sum(x[i:n]) of float32 (or 16-bit) data, each value widened to float64 first,
 * continuing the lanes a */
#define CN_SUM_WIDE_BODY                                                                \
    double tail = 0;                                                                    \
    for (; i + 16 <= n; i += 16)                                                        \
        CN_EACH(j) a[j] += CN_LD(x + i + CN_DW * j);                                    \
    for (; i < n; i++) tail += CN_LD1(x[i]);                                            \
    return cn_total(a) + tail;

/* float32: the first pass of the two-pass moments only needs a mean close enough for
 * the corrected second pass, so runs of 8 steps are summed in float32 (32 float lanes,
 * error at most 8 float32 ulps of their magnitude) and those partials in float64:
 * float lanes k and k + 16 go to float64 lane k. */
#define CN_SUM32_BODY(WIDE)                                                             \
    double r;                                                                           \
    CN_LANES(a);                                                                        \
    ptrdiff_t i = 0;                                                                    \
    while (i + 256 <= n) {                                                              \
        cn_vf p[CN_NV]; /* 32 float32 lanes */                                          \
        CN_EACH(v) p[v] = CN_LDF(x + i + CN_FW * v);                                    \
        for (int t = 1; t < 8; t++)                                                     \
            CN_EACH(v) p[v] += CN_LDF(x + i + 32 * t + CN_FW * v);                      \
        CN_EACH(j) a[j] += cn_widen_half(p[j / 2], j % 2) +                             \
                           cn_widen_half(p[j / 2 + CN_NV / 2], j % 2);                  \
        i += 256;                                                                       \
    }                                                                                   \
    r = WIDE(x, n, i, a);                                                               \
    /* a float32 partial overflows for data near the float32 limit: widen everything    \
       then (also taken, to the same NaN or Inf, when the data hold NaN or Inf) */      \
    if (r - r == 0) return r;                                                           \
    CN_EACH(j) a[j] = CN_ZERO;                                                          \
    return WIDE(x, n, 0, a);

#define CN_SUM32_DEFS(T, NAME)                                                          \
    static inline double cn_sum_##NAME##_wide(const T* x, ptrdiff_t n, ptrdiff_t i,     \
                                              cn_vd* a) {                               \
        CN_SUM_WIDE_BODY                                                                \
    }                                                                                   \
    static inline double cn_sum_##NAME(const T* x, ptrdiff_t n) {                       \
        CN_SUM32_BODY(cn_sum_##NAME##_wide)                                             \
    }

CN_SUM32_DEFS(float, f32)
CN_SUM32_DEFS(cn_f16, f16)
CN_SUM32_DEFS(cn_bf16, bf16)

static inline double cn_sum_f64(const double* x, ptrdiff_t n) {
    CN_LANES(a);
    double tail = 0;
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        CN_EACH(j) a[j] += cn_load_f64(x + i + CN_DW * j);
    for (; i < n; i++) tail += x[i];
    return cn_total(a) + tail;
}

/* ---- sum((x - m)^2) and sum(x - m) ------------------------------------------------
 * The second pass runs on data already in L1; it prefetches the same number of
 * elements at pf (the next piece) meanwhile. pf may be x itself (a no-op). */

#define CN_SQDEV_BODY(LOAD, STEP_PREFETCH)                                              \
    CN_LANES(q);                                                                        \
    CN_LANES(s);                                                                        \
    cn_vd d;                                                                            \
    double qt = 0, st = 0, e;                                                           \
    ptrdiff_t i = 0;                                                                    \
    for (; i + 16 <= n; i += 16) {                                                      \
        STEP_PREFETCH;                                                                  \
        CN_EACH(j) {                                                                    \
            d = LOAD(x + i + CN_DW * j) - m; s[j] += d; q[j] += d * d;                  \
        }                                                                               \
    }                                                                                   \
    for (; i < n; i++) { e = CN_LD1(x[i]) - m; st += e; qt += e * e; }                  \
    *sdev += cn_total(s) + st;                                                          \
    return cn_total(q) + qt;

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
    CN_LANES(q);                                                                        \
    cn_vd d;                                                                            \
    double qt = 0, e;                                                                   \
    ptrdiff_t i = 0;                                                                    \
    for (; i + 16 <= n; i += 16) {                                                      \
        STEP_PREFETCH;                                                                  \
        CN_EACH(j) { d = LOAD(x + i + CN_DW * j); q[j] += d * d; }                      \
    }                                                                                   \
    for (; i < n; i++) { e = CN_LD1(x[i]); qt += e * e; }                               \
    return cn_total(q) + qt;

static inline double cn_sumsq_f32(const float* x, ptrdiff_t n, const float* pf) {
    CN_SUMSQ_BODY(cn_load_f32, CN_PREFETCH(pf + i))
}

static inline double cn_sumsq_f64(const double* x, ptrdiff_t n, const double* pf) {
    CN_SUMSQ_BODY(cn_load_f64, CN_PREFETCH(pf + i); CN_PREFETCH(pf + i + 8))
}

/* ---- sum((x - m)^2) and sum(x - m) of 16-bit data: float32 partials --------------
 * e = x - m and e^2 are formed in float32 lanes and summed in float32 over 8 steps of
 * 32 values (32 float32 lanes, each summing 8 terms), those partials in the float64
 * lanes (float lanes k and k + 16 to float64 lane k, as CN_SUM32_BODY): the per-element
 * cost of the float32 data's first pass, not a float64 widening per element. The lane
 * of an element and the order of every addition depend only on its index, so the bits
 * are the same on every instruction set. m must be a float32 value (piece_moments'
 * shift is; another m takes the float64 lanes throughout).
 * Error: x is 16-bit and m float32, so e = x - m rounds at most once (relative 2^-24;
 * it is exact when x and m are within a factor 2 (Sterbenz), the usual case for a shift
 * near the data), e^2 once more, and each float32 lane's 7 additions of nonnegative
 * terms add at most 7 2^-24 of their sum: the sum of squares Q is within 10 2^-24
 * (6e-7) of the exact sum of the squares of the exact deviations, relative, and the sum
 * of deviations S within 8 2^-24 sum|e| <= 8 2^-24 sqrt(n Q) (Cauchy-Schwarz): a few
 * float32 ulps of the variance, against 2^-8 (bfloat16) and 2^-11 (float16) for the
 * storage's rounding of the result (piece_moments bounds what the shift adds). Where
 * float32 cannot hold the squares -- a partial overflows (bfloat16 data beyond about
 * 1e19), or Q < n 2^-100 so that squares below the normal range (|e| < 2^-63) could
 * have lost digits -- and for NaN and Inf, the whole run is redone in the float64
 * lanes (the previous arithmetic: e and e^2 in float64). CENTRED = 0: S is not formed
 * and e = x (RMSNorm's sum of squares). A prefetch of pf every 32 values (64 bytes)
 * covers the next piece's lines. */
#define CN_SQ16_DEFS(T, NAME)                                                           \
    static inline double cn_sq16_##NAME##_wide(const T* x, ptrdiff_t n, ptrdiff_t i,    \
                                               double m, cn_vd* q, cn_vd* s,            \
                                               double* sdev, const T* pf,               \
                                               const int CENTRED) {                     \
        cn_vd d;                                                                        \
        double qt = 0, st = 0, e;                                                       \
        for (; i + 16 <= n; i += 16) {                                                  \
            if (!(i & 16)) CN_PREFETCH(pf + i);                                         \
            CN_EACH(j) {                                                                \
                d = CN_LD(x + i + CN_DW * j);                                           \
                if (CENTRED) { d = d - m; s[j] += d; }                                  \
                q[j] += d * d;                                                          \
            }                                                                           \
        }                                                                               \
        for (; i < n; i++) {                                                            \
            e = CN_LD1(x[i]);                                                           \
            if (CENTRED) { e = e - m; st += e; }                                        \
            qt += e * e;                                                                \
        }                                                                               \
        if (CENTRED) *sdev = cn_total(s) + st;                                          \
        return cn_total(q) + qt;                                                        \
    }                                                                                   \
    static inline __attribute__((always_inline)) double cn_sq16_##NAME(                \
            const T* x, ptrdiff_t n, double m, double* sdev, const T* pf,               \
            const int CENTRED) {                                                        \
        CN_LANES(q);                                                                    \
        CN_LANES(s);                                                                    \
        const float k = (float)m;                                                       \
        double r, sd = 0;                                                               \
        ptrdiff_t i = 0;                                                                \
        if ((double)k == m) {                                                           \
            for (; i + 256 <= n; i += 256) {                                            \
                cn_vf pq[CN_NV], ps[CN_NV], d;                                          \
                CN_PREFETCH(pf + i);                                                    \
                CN_EACH(v) {                                                            \
                    d = CN_LDF(x + i + CN_FW * v);                                      \
                    if (CENTRED) { d = d - k; ps[v] = d; }                              \
                    pq[v] = d * d;                                                      \
                }                                                                       \
                for (int t = 1; t < 8; t++) {                                           \
                    CN_PREFETCH(pf + i + 32 * t);                                       \
                    CN_EACH(v) {                                                        \
                        d = CN_LDF(x + i + 32 * t + CN_FW * v);                         \
                        if (CENTRED) { d = d - k; ps[v] += d; }                         \
                        pq[v] += d * d;                                                 \
                    }                                                                   \
                }                                                                       \
                CN_EACH(j) {                                                            \
                    q[j] += cn_widen_half(pq[j / 2], j % 2) +                           \
                            cn_widen_half(pq[j / 2 + CN_NV / 2], j % 2);                \
                    if (CENTRED)                                                        \
                        s[j] += cn_widen_half(ps[j / 2], j % 2) +                       \
                                cn_widen_half(ps[j / 2 + CN_NV / 2], j % 2);            \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        r = cn_sq16_##NAME##_wide(x, n, i, m, q, s, &sd, pf, CENTRED);                  \
        if (i > 0 && !(r - r == 0 && r >= (double)n * 0x1p-100)) {                      \
            CN_EACH(j) { q[j] = CN_ZERO; s[j] = CN_ZERO; }                              \
            r = cn_sq16_##NAME##_wide(x, n, 0, m, q, s, &sd, x, CENTRED);               \
        }                                                                               \
        if (CENTRED) *sdev += sd;                                                       \
        return r;                                                                       \
    }                                                                                   \
    static inline double cn_sqdev_##NAME(const T* x, ptrdiff_t n, double m,             \
                                         double* sdev, const T* pf) {                   \
        return cn_sq16_##NAME(x, n, m, sdev, pf, 1);                                    \
    }                                                                                   \
    static inline double cn_sumsq_##NAME(const T* x, ptrdiff_t n, const T* pf) {        \
        return cn_sq16_##NAME(x, n, 0.0, NULL, pf, 0);                                  \
    }

CN_SQ16_DEFS(cn_f16, f16)
CN_SQ16_DEFS(cn_bf16, bf16)

/* ---- gradient sums: g = dy * w (w may be NULL: g = dy) ----------------------------
 * *sdy += sum(g), *sdyx += sum(g * (x - m)) */

#define CN_GRAD_BODY(LOAD)                                                              \
    CN_LANES(a);                                                                        \
    CN_LANES(b);                                                                        \
    cn_vd g;                                                                            \
    double at = 0, bt = 0, gt;                                                          \
    ptrdiff_t i = 0;                                                                    \
    if (w == NULL) {                                                                    \
        for (; i + 16 <= n; i += 16) {                                                  \
            CN_EACH(j) {                                                                \
                g = LOAD(dy + i + CN_DW * j);                                           \
                a[j] += g;                                                              \
                b[j] += g * (LOAD(x + i + CN_DW * j) - m);                              \
            }                                                                           \
        }                                                                               \
        for (; i < n; i++) {                                                            \
            gt = CN_LD1(dy[i]); at += gt; bt += gt * (CN_LD1(x[i]) - m);                \
        }                                                                               \
    } else {                                                                            \
        for (; i + 16 <= n; i += 16) {                                                  \
            CN_EACH(j) {                                                                \
                g = LOAD(dy + i + CN_DW * j) * LOAD(w + i + CN_DW * j);                 \
                a[j] += g;                                                              \
                b[j] += g * (LOAD(x + i + CN_DW * j) - m);                              \
            }                                                                           \
        }                                                                               \
        for (; i < n; i++) {                                                            \
            gt = (double)CN_LD1(dy[i]) * w[i]; at += gt; bt += gt * (CN_LD1(x[i]) - m); \
        }                                                                               \
    }                                                                                   \
    *sdy += cn_total(a) + at;                                                           \
    *sdyx += cn_total(b) + bt;

static inline void cn_grad_sums_f32(const float* dy, const float* x, const float* w,
                                    ptrdiff_t n, double m, double* sdy, double* sdyx) {
    CN_GRAD_BODY(cn_load_f32)
}

static inline void cn_grad_sums_f64(const double* dy, const double* x, const double* w,
                                    ptrdiff_t n, double m, double* sdy, double* sdyx) {
    CN_GRAD_BODY(cn_load_f64)
}

static inline void cn_grad_sums_f16(const cn_f16* dy, const cn_f16* x, const float* w,
                                    ptrdiff_t n, double m, double* sdy, double* sdyx) {
    CN_GRAD_BODY(CN_LD)
}

static inline void cn_grad_sums_bf16(const cn_bf16* dy, const cn_bf16* x, const float* w,
                                     ptrdiff_t n, double m, double* sdy, double* sdyx) {
    CN_GRAD_BODY(CN_LD)
}

/* the row backward's sums pass: CN_GRAD_BODY (the same lanes, the same bits) with
 *  - w given as float64 (the float32 weight widened once per call, exactly: the same
 *    products, one conversion of three fewer per element; w may be NULL);
 *  - acc_b not NULL: the dy column sums acc_b[i] += dy[i] of the row, in float64 from
 *    the dy already widened here (what the tile would add, in the same row order: the
 *    same bits; a conversion and an extract per CN_DW elements fewer in the tile);
 *  - ahead > 0: the elements ahead further on (a later row) prefetched into L2, line by
 *    line as the row is read. A row's reads from memory otherwise restart the hardware
 *    prefetcher at every 4 KiB page, and the loads in flight are what the out-of-order
 *    window holds. */
#define CN_GRAD_AB_LOOP(LOAD, AB)                                                       \
    for (; i + 16 <= n; i += 16) {                                                      \
        if (ahead > 0 && (sizeof(*dy) > 2 || !(i & 16))) {                              \
            CN_PREFETCH_L2(dy + i + ahead);                                             \
            CN_PREFETCH_L2(x + i + ahead);                                              \
            if (sizeof(*dy) == 8) {                                                     \
                CN_PREFETCH_L2(dy + i + 8 + ahead);                                     \
                CN_PREFETCH_L2(x + i + 8 + ahead);                                      \
            }                                                                           \
        }                                                                               \
        CN_EACH(j) {                                                                    \
            e = LOAD(dy + i + CN_DW * j);                                               \
            if (AB)                                                                     \
                cn_store_f64(acc_b + i + CN_DW * j,                                     \
                             cn_load_f64(acc_b + i + CN_DW * j) + e);                   \
            g = w == NULL ? e : e * cn_load_f64(w + i + CN_DW * j);                     \
            a[j] += g;                                                                  \
            b[j] += g * (LOAD(x + i + CN_DW * j) - m);                                  \
        }                                                                               \
    }

#define CN_GRAD_AB_BODY(LOAD)                                                           \
    CN_LANES(a);                                                                        \
    CN_LANES(b);                                                                        \
    cn_vd g, e;                                                                         \
    double at = 0, bt = 0, gt;                                                          \
    ptrdiff_t i = 0;                                                                    \
    if (acc_b != NULL) {                                                                \
        CN_GRAD_AB_LOOP(LOAD, 1)                                                        \
    } else {                                                                            \
        CN_GRAD_AB_LOOP(LOAD, 0)                                                        \
    }                                                                                   \
    for (; i < n; i++) {                                                                \
        gt = CN_LD1(dy[i]);                                                             \
        if (acc_b != NULL) acc_b[i] += gt;                                              \
        if (w != NULL) gt *= w[i];                                                      \
        at += gt;                                                                       \
        bt += gt * (CN_LD1(x[i]) - m);                                                  \
    }                                                                                   \
    *sdy += cn_total(a) + at;                                                           \
    *sdyx += cn_total(b) + bt;

#define CN_GRAD_AB_DEF(TT, NAME, LOAD)                                                  \
    static inline void cn_grad_sums_ab_##NAME(const TT* dy, const TT* x, const double* w, \
                                              ptrdiff_t n, double m, double* sdy,       \
                                              double* sdyx, double* acc_b,              \
                                              ptrdiff_t ahead) {                        \
        CN_GRAD_AB_BODY(LOAD)                                                           \
    }

CN_GRAD_AB_DEF(float, f32, cn_load_f32)
CN_GRAD_AB_DEF(double, f64, cn_load_f64)
CN_GRAD_AB_DEF(cn_f16, f16, CN_LD)
CN_GRAD_AB_DEF(cn_bf16, bf16, CN_LD)

/* non-temporal stores of a whole float32 vector to an address aligned to it
 * (CN_STREAMF; CN_CAN_STREAM(p): whether p's type has them, float32 only), and the
 * fence that orders them before whatever follows */
static inline void cn_streamf(float* p, cn_vf v) {
#if defined(__AVX512F__)
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    _mm256_stream_ps(p, (__m256)v);
#elif defined(__SSE2__)
    _mm_stream_ps(p, (__m128)v);
#else
    memcpy(p, &v, sizeof v);
#endif
}
static inline void cn_streamf_none(void* p, cn_vf v) {
    (void)p;
    (void)v;
}
static inline void cn_stream_fence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}
#define CN_CAN_STREAM(p) _Generic((p), float*: 1, default: 0)
#define CN_STREAMF(p, v)                                                                \
    _Generic((p), float*: cn_streamf, default: cn_streamf_none)((p), (v))

/* ---- elementwise float32 outputs stored past the caches ----------------------------
 * The vector body of an elementwise loop over y[0, n) with y aligned to a whole vector
 * (_common.pxd's aligned_head runs the head before it): each whole vector V (a cn_vf
 * expression of the element index i) stored with a non-temporal store; returns the
 * elements done (n rounded down to whole vectors), the caller runs the tail with its
 * scalar loop and ends with cn_stream_fence. V is the caller's scalar formula operation
 * for operation (every lane computed alone, -ffp-contract=off), so the bits are those
 * of the ordinary loop; only the store differs. */
#define CN_STREAM_SPAN(y, n, V)                                                         \
    {                                                                                   \
        ptrdiff_t i = 0;                                                                \
        for (; i + CN_FW <= (n); i += CN_FW) cn_streamf((y) + i, (V));                  \
        return i;                                                                       \
    }

/* y = (((x - mh) - ml) * rf) * wf + t: _common.pxd's _affine_span, float32 path */
static inline ptrdiff_t cn_affine_nt_f32(const float* x, float* y, ptrdiff_t n, float mh,
                                         float ml, float rf, float wf, float t) {
    CN_STREAM_SPAN(y, n, (((cn_loadf(x + i) - mh) - ml) * rf) * wf + t)
}

/* dx = ((wf * dy - gf) - (((x - mh) - ml) * rf) * kf) * rf: _grad_span, float32 path */
static inline ptrdiff_t cn_grad_nt_f32(const float* dy, const float* x, float* dx,
                                       ptrdiff_t n, float mh, float ml, float rf, float wf,
                                       float gf, float kf) {
    CN_STREAM_SPAN(dx, n,
                   ((wf * cn_loadf(dy + i) - gf)
                    - (((cn_loadf(x + i) - mh) - ml) * rf) * kf) * rf)
}

/* y = ((x - mh) - ml) * rs * w + b with elementwise w, b (NULL: none); rms (mean 0, no
 * b): x * rs * w. _affine_elementwise_span's float32 path, variant for variant */
static inline ptrdiff_t cn_row_apply_nt_f32(const float* x, float* y, const float* w,
                                            const float* b, ptrdiff_t n, float mh,
                                            float ml, float rs, int rms) {
    if (rms) {
        if (w != NULL) CN_STREAM_SPAN(y, n, (cn_loadf(x + i) * rs) * cn_loadf(w + i))
        CN_STREAM_SPAN(y, n, cn_loadf(x + i) * rs)
    }
    if (w != NULL && b != NULL)
        CN_STREAM_SPAN(y, n,
                       (((cn_loadf(x + i) - mh) - ml) * rs) * cn_loadf(w + i)
                           + cn_loadf(b + i))
    if (w != NULL)
        CN_STREAM_SPAN(y, n, (((cn_loadf(x + i) - mh) - ml) * rs) * cn_loadf(w + i))
    if (b != NULL)
        CN_STREAM_SPAN(y, n, (((cn_loadf(x + i) - mh) - ml) * rs) + cn_loadf(b + i))
    CN_STREAM_SPAN(y, n, ((cn_loadf(x + i) - mh) - ml) * rs)
}

/* ---- a tile of the row-family backward, float32 ------------------------------------
 * Rows [0, nrows) of a block (row r at offset r * K), columns [0, n):
 *   xhat = ((x - mh) - ml) * rs,  dx = (((dy * w) - mg) - xhat * mgx) * rs   (float32)
 *   acc_w[k] += dy * xhat,  acc_b[k] += dy                                  (float64)
 * with the row coefficients coef[5 r ...] = mh, ml, rs, mg, mgx: the mean as hi + lo,
 * mg = mean(dy * w), mgx = mean(dy * w * xhat) (w may be NULL). rstd is factored out of
 * dx so that g - mean(g) cancels before it is scaled (a constant row gets dx exact).
 * acc_b NULL: no dy column sums (RMSNorm has no bias; the fused LayerNorm backward adds
 * them in its row sums pass, cn_grad_sums_ab_T, where dy is already widened).
 * Rows in groups of CN_TILE_ROWS: a group's column sums stay in registers from one row
 * to the next, loaded and stored once per group (not per row), so the column sums
 * (n <= 1024: 16 KiB, in L1) cost a quarter of the loads and stores and the dx stores
 * no longer queue behind them; each column still adds its rows one by one in row order,
 * so the group size does not change a bit. The group's dx is stored after all its loads:
 * with rows of 4 KiB (K = 1024 float32) a store to row q at k would otherwise share its
 * address modulo 4 KiB with the loads of row q + 1 at k, which then wait on it.
 * Every column is computed alone, so the vector width does not change a bit. */
#define CN_TILE_ROWS 4

/* column k of the group's rows, one element at a time (the head and the tail) */
#define CN_ROW_TILE_COL(P, AB, k)                                                       \
    for (int q = 0; q < (P); q++) {                                                     \
        const float* c = coef + 5 * (r + q);                                            \
        float d = CN_LD1(dy[(r + q) * K + (k)]);                                        \
        float h = ((CN_LD1(x[(r + q) * K + (k)]) - c[0]) - c[1]) * c[2];                \
        acc_w[k] += d * h;                                                              \
        if (AB) acc_b[k] += d;                                                          \
        CN_ST1(dx + (r + q) * K + (k),                                                  \
               (((d * (w != NULL ? w[k] : 1.0f)) - c[3]) - h * c[4]) * c[2]);           \
    }

#define CN_ROW_TILE_GROUP(P, AB, NT)                                                    \
    {                                                                                   \
        ptrdiff_t k = 0;                                                                \
        for (; k < head; k++) CN_ROW_TILE_COL(P, AB, k)                                 \
        for (; k + CN_FW <= n; k += CN_FW) {                                            \
            cn_vd aw0 = cn_load_f64(acc_w + k), aw1 = cn_load_f64(acc_w + k + CN_DW);   \
            cn_vd ab0 = CN_ZERO, ab1 = CN_ZERO;                                         \
            if (AB) {                                                                   \
                ab0 = cn_load_f64(acc_b + k);                                           \
                ab1 = cn_load_f64(acc_b + k + CN_DW);                                   \
            }                                                                           \
            cn_vf wk = w != NULL ? cn_loadf(w + k) : ones, o[P];                        \
            for (int q = 0; q < (P); q++) {                                             \
                const float* c = coef + 5 * (r + q);                                    \
                cn_vf d = CN_LDF(dy + (r + q) * K + k);                                 \
                cn_vf h = ((CN_LDF(x + (r + q) * K + k) - c[0]) - c[1]) * c[2];         \
                cn_vf dh = d * h;                                                       \
                aw0 = aw0 + cn_widen_lo(dh);                                            \
                aw1 = aw1 + cn_widen_hi(dh);                                            \
                if (AB) {                                                               \
                    ab0 = ab0 + cn_widen_lo(d);                                         \
                    ab1 = ab1 + cn_widen_hi(d);                                         \
                }                                                                       \
                o[q] = (((d * wk) - c[3]) - h * c[4]) * c[2];                           \
            }                                                                           \
            if (NT)                                                                     \
                for (int q = 0; q < (P); q++) CN_STREAMF(dx + (r + q) * K + k, o[q]);   \
            else                                                                        \
                for (int q = 0; q < (P); q++) CN_STF(dx + (r + q) * K + k, o[q]);       \
            cn_store_f64(acc_w + k, aw0);                                               \
            cn_store_f64(acc_w + k + CN_DW, aw1);                                       \
            if (AB) {                                                                   \
                cn_store_f64(acc_b + k, ab0);                                           \
                cn_store_f64(acc_b + k + CN_DW, ab1);                                   \
            }                                                                           \
        }                                                                               \
        for (; k < n; k++) CN_ROW_TILE_COL(P, AB, k)                                    \
    }

/* the groups, with or without the dy column sums, with or without streaming stores (a
 * constant AB and NT per copy of the loop) */
#define CN_ROW_TILE_ROWS(AB, NT)                                                        \
    for (; r + CN_TILE_ROWS <= nrows; r += CN_TILE_ROWS)                                \
        CN_ROW_TILE_GROUP(CN_TILE_ROWS, AB, NT)                                         \
    for (; r < nrows; r++) CN_ROW_TILE_GROUP(1, AB, NT)

/* head: the columns before the vector stores to dx reach whole vectors' alignment (64
 * bytes for float32 with AVX-512), taken one by one, when every row has the same
 * alignment (row length a multiple of a vector's bytes; else none). NumPy's large
 * arrays start 16 bytes into a page, so that otherwise every vector load and store of
 * the rows crosses a cache line; out of cache that cost 18 % of the time. */
#define CN_ROW_TILE_BODY                                                                \
    static const cn_vf ones = {CN_FLANES(1)};                                           \
    ptrdiff_t r = 0, head = 0;                                                          \
    int aligned = (K * (ptrdiff_t)sizeof(*dx)) % (CN_FW * (ptrdiff_t)sizeof(*dx)) == 0; \
    if (aligned) {                                                                      \
        head = (ptrdiff_t)((-(size_t)dx) & (size_t)(CN_FW * sizeof(*dx) - 1))           \
               / (ptrdiff_t)sizeof(*dx);                                                \
        if (head > n) head = n;                                                         \
    }                                                                                   \
    if (stream && aligned && CN_CAN_STREAM(dx)) {                                       \
        if (acc_b != NULL) {                                                            \
            CN_ROW_TILE_ROWS(1, 1)                                                      \
        } else {                                                                        \
            CN_ROW_TILE_ROWS(0, 1)                                                      \
        }                                                                               \
        cn_stream_fence();                                                              \
    } else if (acc_b != NULL) {                                                         \
        CN_ROW_TILE_ROWS(1, 0)                                                          \
    } else {                                                                            \
        CN_ROW_TILE_ROWS(0, 0)                                                          \
    }

/* stream: dx's vector stores bypass the caches (non-temporal) where they can (float32
 * rows whose vector body is aligned), for a dx far larger than the caches: it is then
 * written without first being read (no write-allocate), a quarter of the backward's
 * memory traffic fewer. The values stored are the same. */
#define CN_ROW_TILE_DEF(TT, NAME)                                                       \
    static inline void cn_row_tile_##NAME(const TT* dy, const TT* x, TT* dx,            \
                                          const float* w, ptrdiff_t K, ptrdiff_t nrows, \
                                          ptrdiff_t n, const float* coef, double* acc_w, \
                                          double* acc_b, int stream) {                  \
        CN_ROW_TILE_BODY                                                                \
    }

CN_ROW_TILE_DEF(float, f32)
CN_ROW_TILE_DEF(cn_f16, f16)
CN_ROW_TILE_DEF(cn_bf16, bf16)

/* ---- elementwise spans of 16-bit (or float32) data in float32 lanes ------------------
 * The float32 applies of _common.pxd and row.pyx, operation for operation, with the
 * storage steps above: an unaligned head (so that the vector stores do not split cache
 * lines), the vector body, the tail; every element is computed alone, so its bits
 * depend neither on its position nor on the vector width.
 *   cn_add_T:      h = a + b                                       (the residual prologue)
 *   cn_affine_T:   y = (((x - mh) - ml) * rf) * wf + t                     (slab apply)
 *   cn_grad_T:     dx = ((wf * dy - gf) - (((x - mh) - ml) * rf) * kf) * rf
 *   cn_row_apply_T: y = ((x - mh) - ml) * rf [* w[k]] [+ b[k]]; rms (mh = ml = 0, no b):
 *                   x * rf [* w[k]]                                        (row apply) */

/* elements before p + h is aligned to a whole vector store (CN_FW elements of size
 * bytes: 32 bytes for 16-bit data with AVX-512), so that no store splits a cache line;
 * fewer than CN_FW, and at most n */
static inline ptrdiff_t cn_head_chunk(const void* p, ptrdiff_t n, ptrdiff_t size) {
    ptrdiff_t h = (ptrdiff_t)((-(size_t)p) & (size_t)(CN_FW * size - 1)) / size;
    return h < n ? h : n;
}

/* elements [0, n) of a span in chunks of CN_FW: CHUNK(k, m) computes the chunk at k
 * with m valid elements. The unaligned head and the tail are single partial chunks, run
 * on zero-padded copies (PART), so that no element takes a scalar conversion. */
#define CN_SPAN_LOOP(OUT, CHUNK)                                                        \
    ptrdiff_t i = 0, head_ = cn_head_chunk(OUT, n, sizeof(*(OUT)));                     \
    if (head_ > 0) { CHUNK(0, head_); i = head_; }                                      \
    for (; i + CN_FW <= n; i += CN_FW) { CHUNK(i, CN_FW); }                             \
    if (i < n) { CHUNK(i, n - i); }

/* m < CN_FW elements of size bytes from src into a CN_FW-element buffer dst, the rest
 * zeroed (cn_part_in), and the first m of such a buffer to dst (cn_part_out): one
 * masked load or store with AVX-512 (which never touches the masked-off bytes), in
 * place of a variable-length copy */
static inline void cn_part_in(void* dst, const void* src, ptrdiff_t m, size_t size) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (size == 2) {
        _mm256_storeu_si256((__m256i*)dst,
                            _mm256_maskz_loadu_epi16((__mmask16)((1u << m) - 1u), src));
        return;
    }
    if (size == 4) {
        _mm512_storeu_si512(dst, _mm512_maskz_loadu_epi32((__mmask16)((1u << m) - 1u), src));
        return;
    }
#endif
    memset(dst, 0, CN_FW * size);
    memcpy(dst, src, (size_t)m * size);
}
static inline void cn_part_out(void* dst, const void* src, ptrdiff_t m, size_t size) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (size == 2) {
        _mm256_mask_storeu_epi16(dst, (__mmask16)((1u << m) - 1u),
                                 _mm256_loadu_si256((const __m256i*)src));
        return;
    }
    if (size == 4) {
        _mm512_mask_storeu_epi32(dst, (__mmask16)((1u << m) - 1u), _mm512_loadu_si512(src));
        return;
    }
#endif
    memcpy(dst, src, (size_t)m * size);
}

/* the m elements at p + k into a zeroed CN_FW buffer b (the whole chunk in place when
 * m is CN_FW), and the buffer's pointer */
#define CN_PART_IN(T, b, p, k, m)                                                       \
    T b##_[CN_FW];                                                                      \
    const T* b = (p) + (k);                                                             \
    if ((m) < CN_FW) {                                                                  \
        cn_part_in(b##_, b, (m), sizeof(T));                                            \
        b = b##_;                                                                       \
    }
#define CN_PART_OUT(T, b, p, k, m)                                                      \
    T b##_[CN_FW];                                                                      \
    T* b = (m) < CN_FW ? b##_ : (p) + (k)
#define CN_PART_DONE(T, b, p, k, m)                                                     \
    if ((m) < CN_FW) cn_part_out((p) + (k), b##_, (m), sizeof(T))

#define CN_AFFINE_CHUNK_ST(k, m, STF)                                                   \
    {                                                                                   \
        CN_PART_IN(TT, xp, x, k, m);                                                    \
        CN_PART_OUT(TT, yp, y, k, m);                                                   \
        STF(yp, (((CN_LDF(xp) - mh) - ml) * rf) * wf + t);                              \
        CN_PART_DONE(TT, yp, y, k, m);                                                  \
    }
#define CN_AFFINE_CHUNK(k, m) CN_AFFINE_CHUNK_ST(k, m, CN_STF)
#define CN_GRAD_CHUNK(k, m)                                                             \
    {                                                                                   \
        CN_PART_IN(TT, dp, dy, k, m);                                                   \
        CN_PART_IN(TT, xp, x, k, m);                                                    \
        CN_PART_OUT(TT, op, dx, k, m);                                                  \
        CN_STF(op, ((wf * CN_LDF(dp) - gf) - (((CN_LDF(xp) - mh) - ml) * rf) * kf) * rf); \
        CN_PART_DONE(TT, op, dx, k, m);                                                 \
    }
/* the row apply: xh = ((x - mh) - ml) * rf, or x * rf (rms), then * w, + b where given
 * (w, b: NULL for none; the branches are hoisted out of the loop by the caller's
 * constant arguments) */
#define CN_ROW_CHUNK_ST(k, m, STF)                                                      \
    {                                                                                   \
        CN_PART_IN(TT, xp, x, k, m);                                                    \
        CN_PART_OUT(TT, yp, y, k, m);                                                   \
        cn_vf v = CN_LDF(xp);                                                           \
        v = RMS ? v * rf : ((v - mh) - ml) * rf;                                        \
        if (W) { CN_PART_IN(float, wp, w, k, m); v = v * cn_loadf(wp); }                \
        if (B) { CN_PART_IN(float, bp, b, k, m); v = v + cn_loadf(bp); }                \
        STF(yp, v);                                                                     \
        CN_PART_DONE(TT, yp, y, k, m);                                                  \
    }
#define CN_ROW_CHUNK(k, m) CN_ROW_CHUNK_ST(k, m, CN_STF)

#define CN_ADD_CHUNK(k, m)                                                              \
    {                                                                                   \
        CN_PART_IN(TT, ap, a, k, m);                                                    \
        CN_PART_IN(TT, bp, b, k, m);                                                    \
        CN_PART_OUT(TT, hp, h, k, m);                                                   \
        CN_STF(hp, CN_LDF(ap) + CN_LDF(bp));                                            \
        CN_PART_DONE(TT, hp, h, k, m);                                                  \
    }

#define CN_SPAN_DEFS(T_, NAME, AFFINE_HW, ROW_HW)                                        \
    static inline void cn_add_##NAME(const T_* a, const T_* b, T_* h, ptrdiff_t n) {    \
        typedef T_ TT;                                                                  \
        CN_SPAN_LOOP(h, CN_ADD_CHUNK)                                                   \
    }                                                                                   \
    static inline void cn_affine_##NAME(const T_* x, T_* y, ptrdiff_t n, float mh,      \
                                        float ml, float rf, float wf, float t) {        \
        typedef T_ TT;                                                                  \
        AFFINE_HW                                                                       \
        CN_SPAN_LOOP(y, CN_AFFINE_CHUNK)                                                \
    }                                                                                   \
    static inline void cn_grad_##NAME(const T_* dy, const T_* x, T_* dx, ptrdiff_t n,   \
                                      float mh, float ml, float rf, float wf, float gf, \
                                      float kf) {                                       \
        typedef T_ TT;                                                                  \
        CN_SPAN_LOOP(dx, CN_GRAD_CHUNK)                                                 \
    }                                                                                   \
    static inline __attribute__((always_inline)) void cn_row_apply_##NAME##_(           \
            const T_* x, T_* y, const float* w, const float* b, ptrdiff_t n, float mh,  \
            float ml, float rf, const int RMS, const int W, const int B) {              \
        typedef T_ TT;                                                                  \
        CN_SPAN_LOOP(y, CN_ROW_CHUNK)                                                   \
    }                                                                                   \
    static inline void cn_row_apply_##NAME(const T_* x, T_* y, const float* w,          \
                                           const float* b, ptrdiff_t n, float mh,       \
                                           float ml, float rf, int rms) {               \
        /* one loop per combination, the choice made once per row (rms: no b) */       \
        ROW_HW                                                                          \
        if (rms && w != NULL)                                                           \
            cn_row_apply_##NAME##_(x, y, w, b, n, mh, ml, rf, 1, 1, 0);                 \
        else if (rms)                                                                   \
            cn_row_apply_##NAME##_(x, y, w, b, n, mh, ml, rf, 1, 0, 0);                 \
        else if (w != NULL && b != NULL)                                                \
            cn_row_apply_##NAME##_(x, y, w, b, n, mh, ml, rf, 0, 1, 1);                 \
        else if (w != NULL)                                                             \
            cn_row_apply_##NAME##_(x, y, w, b, n, mh, ml, rf, 0, 1, 0);                 \
        else if (b != NULL)                                                             \
            cn_row_apply_##NAME##_(x, y, w, b, n, mh, ml, rf, 0, 0, 1);                 \
        else                                                                            \
            cn_row_apply_##NAME##_(x, y, w, b, n, mh, ml, rf, 0, 0, 0);                 \
    }

/* The forward applies of bfloat16 data (cn_affine_bf16, cn_row_apply_bf16) store with
 * AVX-512 BF16's vcvtne2ps2bf16 / vcvtneps2bf16 where the CPU has it (checked at run
 * time: the extension is not part of x86-64-v4; GCC/Clang only): one instruction for
 * two vectors, in place of the integer rounding's five per vector and the narrowing
 * shuffle. It rounds to nearest even and quiets NaN exactly as the integer rounding
 * does, but treats subnormal inputs as zero: vectors holding one (vfpclassps) take the
 * integer rounding instead, so the bits are those of every other path (checked over all
 * 2^32 float32 inputs). */
#if defined(__AVX512BW__) && defined(__GNUC__) && !defined(__INTEL_COMPILER) &&        \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) ||                    \
     (defined(__clang__) && __clang_major__ >= 9))
#define CN_BF16_HW 1
#define CN_BF16_TARGET __attribute__((target("avx512bf16")))
CN_BF16_TARGET static inline void cn_storef_bf16_hw(cn_bf16* p, cn_vf v) {
    if (_mm512_fpclass_ps_mask((__m512)v, 0x20)) { /* 0x20: subnormal */
        cn_storef_bf16(p, v);
        return;
    }
    _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh((__m512)v));
}
static inline int cn_has_bf16_hw(void) {
    return __builtin_cpu_supports("avx512bf16"); /* a load of libgcc's cpuid record */
}
/* two vectors at p (32 values, one 64-byte store of vcvtne2ps2bf16), a holding the
 * first 16 */
CN_BF16_TARGET static inline void cn_storef2_bf16_hw(cn_bf16* p, cn_vf a, cn_vf b) {
    if (_mm512_fpclass_ps_mask((__m512)a, 0x20) | _mm512_fpclass_ps_mask((__m512)b, 0x20)) {
        cn_storef_bf16(p, a);
        cn_storef_bf16(p + CN_FW, b);
        return;
    }
    _mm512_storeu_si512((void*)p, (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a));
}
/* elements [0, n) of a bfloat16 span: single chunks (CHUNK(k, m), as CN_SPAN_LOOP's) up
 * to the first 64-byte boundary of OUT and after the last whole pair, pairs of whole
 * vectors (PAIR(k): 32 values at k, one aligned 64-byte store) between */
#define CN_SPAN_LOOP_PAIRS(OUT, CHUNK, PAIR)                                            \
    ptrdiff_t i = 0, m_, head_ = (ptrdiff_t)((-(size_t)(OUT)) & 63) / 2;                \
    if (head_ > n) head_ = n;                                                           \
    while (i < head_) {                                                                 \
        m_ = head_ - i < CN_FW ? head_ - i : CN_FW;                                     \
        CHUNK(i, m_);                                                                   \
        i += m_;                                                                        \
    }                                                                                   \
    for (; i + 2 * CN_FW <= n; i += 2 * CN_FW) { PAIR(i); }                             \
    while (i < n) {                                                                     \
        m_ = n - i < CN_FW ? n - i : CN_FW;                                             \
        CHUNK(i, m_);                                                                   \
        i += m_;                                                                        \
    }
/* the row apply's arithmetic on one vector at column k (CN_ROW_CHUNK's) */
static inline __attribute__((always_inline)) cn_vf cn_row_v_(
        cn_vf v, const float* w, const float* b, ptrdiff_t k, float mh, float ml, float rf,
        const int RMS, const int W, const int B) {
    v = RMS ? v * rf : ((v - mh) - ml) * rf;
    if (W) v = v * cn_loadf(w + k);
    if (B) v = v + cn_loadf(b + k);
    return v;
}
#define CN_AFFINE_CHUNK_HW(k, m) CN_AFFINE_CHUNK_ST(k, m, cn_storef_bf16_hw)
#define CN_ROW_CHUNK_HW(k, m) CN_ROW_CHUNK_ST(k, m, cn_storef_bf16_hw)
#define CN_AFFINE_V_(v) (((((v) - mh) - ml) * rf) * wf + t)
#define CN_AFFINE_PAIR_HW(k)                                                            \
    cn_storef2_bf16_hw(y + (k), CN_AFFINE_V_(CN_LDF(x + (k))),                          \
                       CN_AFFINE_V_(CN_LDF(x + (k) + CN_FW)))
#define CN_ROW_PAIR_HW(k)                                                               \
    cn_storef2_bf16_hw(                                                                 \
        y + (k), cn_row_v_(CN_LDF(x + (k)), w, b, (k), mh, ml, rf, RMS, W, B),          \
        cn_row_v_(CN_LDF(x + (k) + CN_FW), w, b, (k) + CN_FW, mh, ml, rf, RMS, W, B))
CN_BF16_TARGET static inline void cn_affine_bf16_hw(const cn_bf16* x, cn_bf16* y,
                                                   ptrdiff_t n, float mh, float ml,
                                                   float rf, float wf, float t) {
    typedef cn_bf16 TT;
    CN_SPAN_LOOP_PAIRS(y, CN_AFFINE_CHUNK_HW, CN_AFFINE_PAIR_HW)
}
CN_BF16_TARGET static inline __attribute__((always_inline)) void cn_row_apply_bf16_hw_(
        const cn_bf16* x, cn_bf16* y, const float* w, const float* b, ptrdiff_t n,
        float mh, float ml, float rf, const int RMS, const int W, const int B) {
    typedef cn_bf16 TT;
    CN_SPAN_LOOP_PAIRS(y, CN_ROW_CHUNK_HW, CN_ROW_PAIR_HW)
}
CN_BF16_TARGET static inline void cn_row_apply_bf16_hw(const cn_bf16* x, cn_bf16* y,
                                                      const float* w, const float* b,
                                                      ptrdiff_t n, float mh, float ml,
                                                      float rf, int rms) {
    if (rms && w != NULL)
        cn_row_apply_bf16_hw_(x, y, w, b, n, mh, ml, rf, 1, 1, 0);
    else if (rms)
        cn_row_apply_bf16_hw_(x, y, w, b, n, mh, ml, rf, 1, 0, 0);
    else if (w != NULL && b != NULL)
        cn_row_apply_bf16_hw_(x, y, w, b, n, mh, ml, rf, 0, 1, 1);
    else if (w != NULL)
        cn_row_apply_bf16_hw_(x, y, w, b, n, mh, ml, rf, 0, 1, 0);
    else if (b != NULL)
        cn_row_apply_bf16_hw_(x, y, w, b, n, mh, ml, rf, 0, 0, 1);
    else
        cn_row_apply_bf16_hw_(x, y, w, b, n, mh, ml, rf, 0, 0, 0);
}
#define CN_BF16_HW_OR(call) if (cn_has_bf16_hw()) { call; return; }
#else
#define CN_BF16_HW_OR(call)
#endif

CN_SPAN_DEFS(cn_f16, f16, , )
CN_SPAN_DEFS(cn_bf16, bf16,
             CN_BF16_HW_OR(cn_affine_bf16_hw(x, y, n, mh, ml, rf, wf, t)),
             CN_BF16_HW_OR(cn_row_apply_bf16_hw(x, y, w, b, n, mh, ml, rf, rms)))

/* the channels-last apply of one row piece (channels_last.pyx's _affine_row, float32
 * form): y[k] = (((x[k] - mh[k]) - ml[k]) * rf[k]) * wf[k] + bf[k], per-channel
 * constants; 16-bit data widened and narrowed in registers (no staged float32 copy) */
#define CN_CL_AFFINE_CHUNK(k, m)                                                        \
    {                                                                                   \
        CN_PART_IN(TT, xp, x, k, m);                                                    \
        CN_PART_IN(float, mhp, mh, k, m);                                               \
        CN_PART_IN(float, mlp, ml, k, m);                                               \
        CN_PART_IN(float, rfp, rf, k, m);                                               \
        CN_PART_IN(float, wfp, wf, k, m);                                               \
        CN_PART_IN(float, bfp, bf, k, m);                                               \
        CN_PART_OUT(TT, yp, y, k, m);                                                   \
        CN_STF(yp, (((CN_LDF(xp) - cn_loadf(mhp)) - cn_loadf(mlp)) * cn_loadf(rfp))     \
                       * cn_loadf(wfp) + cn_loadf(bfp));                                \
        CN_PART_DONE(TT, yp, y, k, m);                                                  \
    }
#define CN_CL_AFFINE_DEF(T_, NAME)                                                      \
    static inline void cn_cl_affine_##NAME(const T_* x, T_* y, ptrdiff_t n,            \
                                           const float* mh, const float* ml,            \
                                           const float* rf, const float* wf,            \
                                           const float* bf) {                           \
        typedef T_ TT;                                                                  \
        ptrdiff_t i;                                                                    \
        /* no aligned head: a row piece's head would copy six arrays' partial chunks */ \
        for (i = 0; i + CN_FW <= n; i += CN_FW) { CN_CL_AFFINE_CHUNK(i, CN_FW); }       \
        if (i < n) { CN_CL_AFFINE_CHUNK(i, n - i); }                                    \
    }
CN_CL_AFFINE_DEF(cn_f16, f16)
CN_CL_AFFINE_DEF(cn_bf16, bf16)

/* the channels-last dx of one row piece (channels_last.pyx's _grad_row, float32 form):
 * dx[k] = ((wf[k] * dy[k] - gf[k]) - (((x[k] - mh[k]) - ml[k]) * rf[k]) * kf[k]) * rf[k],
 * per-channel constants, the slab family's grad_const (cn_grad_T) operation for
 * operation; written once for every storage below float64: 16-bit dy and x widened and
 * dx narrowed in registers (no staged float32 copy). The last n % CN_FW channels are
 * scalar (CN_LD1, CN_ST1: the same operations, so the same bits as a vector lane).
 * dy may be float32 with 16-bit x and dx (cn_cl_grad_g32_T: the float32 g of a backward
 * with an activation). dx may be dy or x: each element is read before it is written. */
#define CN_CL_GRAD_EXPR(LD, LDK, dyp, xp, j)                                            \
    ((LDK(wf + (j)) * LD(dyp) - LDK(gf + (j)))                                          \
     - (((LD(xp) - LDK(mh + (j))) - LDK(ml + (j))) * LDK(rf + (j))) * LDK(kf + (j)))    \
        * LDK(rf + (j))
#define CN_CL_DEREF1(p) CN_LD1(*(p))
#define CN_CL_DEREF(p) (*(p))
#define CN_CL_GRAD_DEF(TD_, T_, NAME)                                                   \
    static inline void cn_cl_grad_##NAME(const TD_* dy, const T_* x, T_* dx, ptrdiff_t n, \
                                         const float* mh, const float* ml,              \
                                         const float* rf, const float* wf,              \
                                         const float* gf, const float* kf) {            \
        ptrdiff_t i;                                                                    \
        /* no aligned head, as cn_cl_affine: a row piece is at most CL_WIDTH channels */ \
        for (i = 0; i + CN_FW <= n; i += CN_FW)                                         \
            CN_STF(dx + i, CN_CL_GRAD_EXPR(CN_LDF, cn_loadf, dy + i, x + i, i));         \
        for (; i < n; i++)                                                              \
            CN_ST1(dx + i, CN_CL_GRAD_EXPR(CN_CL_DEREF1, CN_CL_DEREF, dy + i, x + i, i)); \
    }
CN_CL_GRAD_DEF(float, float, f32)
CN_CL_GRAD_DEF(cn_f16, cn_f16, f16)
CN_CL_GRAD_DEF(cn_bf16, cn_bf16, bf16)
/* dy: float32 g = dy * act'(a) of a backward with an activation (kept in float32) */
CN_CL_GRAD_DEF(float, cn_f16, g32_f16)
CN_CL_GRAD_DEF(float, cn_bf16, g32_bf16)

/* ---- column reductions: per-column sums down the rows of a tile --------------------
 * Rows [0, nrows) of a row-major tile (row stride D), columns [0, n). Each column is
 * summed alone, row by row in order, in float64; so a column's bits are those of the
 * plain scalar loop (which takes the last n % CN_DW columns), whatever the tile width,
 * the row blocking or the instruction set.
 *
 * Register tiles: CN_CT vectors of CN_DW columns (32 columns with AVX-512, 8 with AVX
 * or SSE) are summed over a block of CN_CR rows in registers, loaded from and stored to
 * the caller's float64 partials once per block, not once per row: the loads of the data
 * are then the only memory traffic of the loop. The rows of a block are walked whole
 * (every tile of row r, then of row r + 1, ... inside a block of CN_CR rows), so the
 * accesses stay CN_CR contiguous streams, which the prefetchers follow and which land
 * in distinct cache sets even when D is a power of two. The accumulators, constants and
 * temporaries of a tile take at most 4 * CN_CT + 2 vector registers: 18 of AVX-512's
 * 32, 10 of AVX's or SSE's 16, so nothing spills (checked with objdump). */

#if defined(__AVX512F__)
#define CN_CT 4
#else
#define CN_CT 2
#endif
#define CN_CR 8

/* for each register tile [j, j + w * CN_DW) of the first n - n % CN_DW columns, w =
 * CN_CT, then single vectors (w = 1) for the rest; then the scalar columns */
#define CN_COL_TILES(VBODY, SBODY)                                                              \
    ptrdiff_t r0, r1, r, j, v;                                                          \
    const ptrdiff_t nvec = n - n % CN_DW;                                               \
    for (r0 = 0; r0 < nrows; r0 = r1) {                                                 \
        r1 = r0 + CN_CR < nrows ? r0 + CN_CR : nrows;                                   \
        for (j = 0; j + CN_CT * CN_DW <= nvec; j += CN_CT * CN_DW) {                    \
            enum { W = CN_CT };                                                         \
            VBODY                                                                       \
        }                                                                               \
        for (; j < nvec; j += CN_DW) {                                                  \
            enum { W = 1 };                                                             \
            VBODY                                                                       \
        }                                                                               \
        for (; j < n; j++)                                                              \
            SBODY                                                                       \
    }

/* s[j] += sum over the rows of (x - k[j]) */
#define CN_COL_SUM_BODY(T, LOAD)                                                        \
    {                                                                                   \
        cn_vd a[W], kv[W];                                                              \
        for (v = 0; v < W; v++) {                                                       \
            a[v] = cn_load_f64(s + j + CN_DW * v);                                      \
            kv[v] = cn_load_f64(k + j + CN_DW * v);                                     \
        }                                                                               \
        for (r = r0; r < r1; r++)                                                       \
            for (v = 0; v < W; v++) a[v] += LOAD(x + r * D + j + CN_DW * v) - kv[v];    \
        for (v = 0; v < W; v++) cn_store_f64(s + j + CN_DW * v, a[v]);                  \
    }
#define CN_COL_SUM_SCALAR(T)                                                            \
    {                                                                                   \
        double a = s[j];                                                                \
        for (r = r0; r < r1; r++) a += CN_LD1(x[r * D + j]) - k[j];                     \
        s[j] = a;                                                                       \
    }

/* e = x - c[j]: d[j] += e, q[j] += e * e */
#define CN_COL_DEV_BODY(T, LOAD)                                                        \
    {                                                                                   \
        cn_vd dv[W], qv[W], cv[W], e;                                                   \
        for (v = 0; v < W; v++) {                                                       \
            dv[v] = cn_load_f64(d + j + CN_DW * v);                                     \
            qv[v] = cn_load_f64(q + j + CN_DW * v);                                     \
            cv[v] = cn_load_f64(c + j + CN_DW * v);                                     \
        }                                                                               \
        for (r = r0; r < r1; r++)                                                       \
            for (v = 0; v < W; v++) {                                                   \
                e = LOAD(x + r * D + j + CN_DW * v) - cv[v];                            \
                dv[v] += e;                                                             \
                qv[v] += e * e;                                                         \
            }                                                                           \
        for (v = 0; v < W; v++) {                                                       \
            cn_store_f64(d + j + CN_DW * v, dv[v]);                                     \
            cn_store_f64(q + j + CN_DW * v, qv[v]);                                     \
        }                                                                               \
    }
#define CN_COL_DEV_SCALAR(T)                                                            \
    {                                                                                   \
        double dj = d[j], qj = q[j], e;                                                 \
        for (r = r0; r < r1; r++) {                                                     \
            e = CN_LD1(x[r * D + j]) - c[j];                                            \
            dj += e;                                                                    \
            qj += e * e;                                                                \
        }                                                                               \
        d[j] = dj;                                                                      \
        q[j] = qj;                                                                      \
    }

/* The same sums walking the rows whole (cn_col_grad_sums_rows), two contiguous streams,
 * with the per-column float64 sums in L1 (loaded and stored per row): for the
 * channels-last backward (long rows of up to 512 channels, dy and x from memory once),
 * where the register tiles' 2 * CN_CR interleaved row streams measured 1.5x slower.
 * BatchNorm's column path (short rows) keeps the register tiles: there the sums' store
 * and reload every row measured 2x slower. Either way each column is summed row by row
 * in order: the same bits. */
/* g = dy: sg[j] += g, sgx[j] += g * (x - m[j]), register tiles (cn_col_grad_sums) */
#define CN_COL_GRAD_BODY(T, LOAD)                                                       \
    {                                                                                   \
        cn_vd av[W], bv[W], mv[W], g;                                                   \
        for (v = 0; v < W; v++) {                                                       \
            av[v] = cn_load_f64(sg + j + CN_DW * v);                                    \
            bv[v] = cn_load_f64(sgx + j + CN_DW * v);                                   \
            mv[v] = cn_load_f64(m + j + CN_DW * v);                                     \
        }                                                                               \
        for (r = r0; r < r1; r++)                                                       \
            for (v = 0; v < W; v++) {                                                   \
                g = LOAD(dy + r * D + j + CN_DW * v);                                   \
                av[v] += g;                                                             \
                bv[v] += g * (LOAD(x + r * D + j + CN_DW * v) - mv[v]);                 \
            }                                                                           \
        for (v = 0; v < W; v++) {                                                       \
            cn_store_f64(sg + j + CN_DW * v, av[v]);                                    \
            cn_store_f64(sgx + j + CN_DW * v, bv[v]);                                   \
        }                                                                               \
    }
#define CN_COL_GRAD_SCALAR(T)                                                           \
    {                                                                                   \
        double aj = sg[j], bj = sgx[j], g;                                              \
        for (r = r0; r < r1; r++) {                                                     \
            g = CN_LD1(dy[r * D + j]);                                                  \
            aj += g;                                                                    \
            bj += g * (CN_LD1(x[r * D + j]) - m[j]);                                    \
        }                                                                               \
        sg[j] = aj;                                                                     \
        sgx[j] = bj;                                                                    \
    }

/* (dy and x may be of different storage types: each loaded by its own CN_LD) */
#define CN_COL_GRAD_ROWS                                                                \
    ptrdiff_t r, j;                                                                     \
    for (r = 0; r < nrows; r++) {                                                       \
        const __typeof__(*dy)* dyr = dy + r * D;                                        \
        const __typeof__(*x)* xr = x + r * D;                                           \
        for (j = 0; j + CN_DW <= n; j += CN_DW) {                                       \
            cn_vd g = CN_LD(dyr + j);                                                   \
            cn_store_f64(sg + j, cn_load_f64(sg + j) + g);                              \
            cn_store_f64(sgx + j, cn_load_f64(sgx + j) +                                \
                                      g * (CN_LD(xr + j) - cn_load_f64(m + j)));        \
        }                                                                               \
        for (; j < n; j++) {                                                            \
            double g = CN_LD1(dyr[j]);                                                  \
            sg[j] += g;                                                                 \
            sgx[j] += g * (CN_LD1(xr[j]) - m[j]);                                       \
        }                                                                               \
    }

#define CN_COL_FUNCS(T, SFX, LOAD)                                                      \
    static inline void cn_col_sum_##SFX(const T* x, ptrdiff_t D, ptrdiff_t nrows,       \
                                        ptrdiff_t n, const double* k, double* s) {      \
        CN_COL_TILES(CN_COL_SUM_BODY(T, LOAD), CN_COL_SUM_SCALAR(T))                                                 \
    }                                                                                   \
    static inline void cn_col_dev_##SFX(const T* x, ptrdiff_t D, ptrdiff_t nrows,       \
                                        ptrdiff_t n, const double* c, double* d,        \
                                        double* q) {                                    \
        CN_COL_TILES(CN_COL_DEV_BODY(T, LOAD), CN_COL_DEV_SCALAR(T))                                                 \
    }                                                                                   \
    static inline void cn_col_grad_sums_##SFX(const T* dy, const T* x, ptrdiff_t D,     \
                                              ptrdiff_t nrows, ptrdiff_t n,             \
                                              const double* m, double* sg,              \
                                              double* sgx, int rows) {                  \
        if (rows) {                                                                     \
            CN_COL_GRAD_ROWS                                                            \
        } else {                                                                        \
            CN_COL_TILES(CN_COL_GRAD_BODY(T, LOAD), CN_COL_GRAD_SCALAR(T))              \
        }                                                                               \
    }

CN_COL_FUNCS(float, f32, cn_load_f32)
CN_COL_FUNCS(double, f64, cn_load_f64)

/* ---- the first pass of float32 columns --------------------------------------------
 * s[j] += sum over the rows of (x - k[j]) for float32 data, summed as cn_sum_f32 sums a
 * run: the rows in groups of CN_CR (counted from row 0) summed per column in float32
 * (x - (float)k[j], added in order), each group's partial widened and added in float64.
 * A first pass only needs a mean close enough for the corrected second pass, and this
 * spares the float64 widening of every value (a group's partial errs by at most CN_CR
 * float32 ulps of its magnitude). A float32 partial overflows for data near the float32
 * limit (and NaN or Inf make the sum NaN or Inf): the caller redoes such a column wide
 * (cn_col_moments). Each column is summed alone, so its bits depend neither on the
 * tile's width nor on the instruction set. n <= CN_COL_CHUNK. */

#define CN_COL_CHUNK 256

#define CN_COL_SUM8_TILE(W, LOADF)                                                      \
    {                                                                                   \
        cn_vf p[W], kv[W];                                                              \
        for (v = 0; v < W; v++) {                                                       \
            p[v] = (cn_vf){0};                                                          \
            kv[v] = cn_loadf(kf + j + CN_FW * v);                                       \
        }                                                                               \
        for (r = r0; r < r1; r++)                                                       \
            for (v = 0; v < W; v++) p[v] += LOADF(x + r * D + j + CN_FW * v) - kv[v];   \
        for (v = 0; v < W; v++) {                                                       \
            double* sv = s + j + CN_FW * v;                                             \
            cn_store_f64(sv, cn_load_f64(sv) + cn_widen_lo(p[v]));                      \
            cn_store_f64(sv + CN_DW, cn_load_f64(sv + CN_DW) + cn_widen_hi(p[v]));      \
        }                                                                               \
    }

#define CN_COL_SUM8_FUNC(T, SFX, LOADF)                                                 \
    static inline void cn_col_sum8_##SFX(const T* x, ptrdiff_t D, ptrdiff_t nrows,      \
                                         ptrdiff_t n, const double* k, double* s) {     \
        float kf[CN_COL_CHUNK];                                                         \
        ptrdiff_t r0, r1, r, j, v;                                                      \
        const ptrdiff_t nvec = n - n % CN_FW;                                           \
        for (j = 0; j < n; j++) kf[j] = (float)k[j];                                    \
        for (r0 = 0; r0 < nrows; r0 = r1) {                                             \
            r1 = r0 + CN_CR < nrows ? r0 + CN_CR : nrows;                               \
            for (j = 0; j + CN_CT * CN_FW <= nvec; j += CN_CT * CN_FW)                  \
                CN_COL_SUM8_TILE(CN_CT, LOADF)                                          \
            for (; j < nvec; j += CN_FW) CN_COL_SUM8_TILE(1, LOADF)                     \
            for (; j < n; j++) {                                                        \
                float p = 0;                                                            \
                for (r = r0; r < r1; r++) p += CN_LD1(x[r * D + j]) - kf[j];            \
                s[j] += (double)p;                                                      \
            }                                                                           \
        }                                                                               \
    }

CN_COL_SUM8_FUNC(float, f32, cn_loadf)

/* ---- per-column moments of a tile ---------------------------------------------------
 * For each column j, the corrected two-pass mean pm[j] and m2 pq[j] of its nrows values
 * x - k[j], in float64. The shift k[j] (the caller's: a value of the column) makes the
 * block means that the caller merges small, so that their rounding is relative to the
 * data's spread, not to its offset (a column 1e6 +- 1 keeps its variance's digits).
 * Chunks of CN_COL_CHUNK columns (the deviations' sums on the stack): the first pass
 * (cn_col_sum) over the chunk's rows, the mean, then the second (cn_col_dev) while the
 * chunk is in L2. m2 < 0 from rounding becomes 0; NaN stays NaN. */

/* the first pass's mean m = s / cnt of x - k as an absolute centre c = k + m (in cm),
 * from which the second pass takes the deviations x - c (one subtraction a value) */
#define CN_COL_CENTRE                                                                   \
    for (j = 0; j < nn; j++) cm[j] = k[j0 + j] + pm[j0 + j] / cnt;

/* corrected two-pass: the mean (relative to k) c - k + mean(x - c), m2 = sum((x - c)^2)
 * - sum(x - c)^2 / cnt. c - k is exact when c and k are within a factor 2 of each
 * other (offset data), else it rounds relative to the mean itself. */
#define CN_COL_FINISH                                                                   \
    for (j = 0; j < nn; j++) {                                                          \
        double qj = pq[j0 + j] - dd[j] * dd[j] / cnt;                                   \
        pm[j0 + j] = (cm[j] - k[j0 + j]) + dd[j] / cnt;                                 \
        pq[j0 + j] = qj < 0 ? 0 : qj;                                                   \
    }

/* The second pass runs on data already in L2: meanwhile the rows [nrows, nrows +
 * pf_rows) that follow (the caller's next block) are prefetched, the chunk's columns of
 * as many of them as rows [r0, r0 + nr) of this block, so that their first pass does not
 * wait for memory (as cn_sqdev prefetches the next piece). Into L2 (a block is larger
 * than L1): measured a little faster than into L1, whose fill buffers such bursts
 * overrun. */
#define CN_COL_PREFETCH_NEXT(src)                                                       \
    for (ptrdiff_t rp = nrows + r0; rp < nrows + r0 + nr && rp < nrows + pf_rows; rp++) \
        for (ptrdiff_t b = 0; b < nn * (ptrdiff_t)sizeof(*src); b += 64)                \
            CN_PREFETCH_L2((const char*)(src + rp * D + j0) + b)

/* the first pass of float32 data (cn_col_sum8_f32) made wide where it overflowed: each
 * such column of the chunk summed again value by value in float64 (VALUE(i): element i
 * as a double) */
#define CN_COL_REDO_WIDE(VALUE)                                                         \
    for (j = 0; j < nn; j++) {                                                          \
        if (pm[j0 + j] - pm[j0 + j] == 0) continue;                                     \
        double a = 0;                                                                   \
        for (ptrdiff_t r = 0; r < nrows; r++) a += VALUE(r * D + j0 + j) - k[j0 + j];   \
        pm[j0 + j] = a;                                                                 \
    }

#define CN_COL_MOMENTS_BODY(SFX, SUM, REDO)                                             \
    const double cnt = (double)nrows;                                                   \
    double dd[CN_COL_CHUNK], cm[CN_COL_CHUNK];                                          \
    ptrdiff_t j0, j, nn, r0, nr;                                                        \
    for (j0 = 0; j0 < n; j0 += CN_COL_CHUNK) {                                          \
        nn = n - j0 < CN_COL_CHUNK ? n - j0 : CN_COL_CHUNK;                             \
        for (j = 0; j < nn; j++) pm[j0 + j] = pq[j0 + j] = dd[j] = 0;                   \
        SUM(x + j0, D, nrows, nn, k + j0, pm + j0);                                     \
        REDO                                                                            \
        CN_COL_CENTRE                                                                   \
        for (r0 = 0; r0 < nrows; r0 += nr) {                                            \
            nr = nrows - r0 < CN_CR ? nrows - r0 : CN_CR;                               \
            CN_COL_PREFETCH_NEXT(x);                                                    \
            cn_col_dev_##SFX(x + r0 * D + j0, D, nr, nn, cm, dd, pq + j0);              \
        }                                                                               \
        CN_COL_FINISH                                                                   \
    }

#define CN_COL_X(i) ((double)x[i])

static inline void cn_col_moments_f32(const float* x, ptrdiff_t D, ptrdiff_t nrows,
                                      ptrdiff_t n, const double* k, double* pm,
                                      double* pq, ptrdiff_t pf_rows) {
    CN_COL_MOMENTS_BODY(f32, cn_col_sum8_f32, CN_COL_REDO_WIDE(CN_COL_X))
}

static inline void cn_col_moments_f64(const double* x, ptrdiff_t D, ptrdiff_t nrows,
                                      ptrdiff_t n, const double* k, double* pm,
                                      double* pq, ptrdiff_t pf_rows) {
    CN_COL_MOMENTS_BODY(f64, cn_col_sum_f64, )
}

/* ---- 16-bit storage ------------------------------------------------------------------
 * The column sums and gradient sums: the same bodies instantiated with the 16-bit loads
 * (cn_load_f16/bf16, CN_LD1: exact widening in registers, no staged float32 copy); each
 * column is summed row by row in the same order, so the results are bitwise those of
 * float32 data holding the widened values.
 *
 * The moments: CN_COL_STAGE rows of a chunk are widened (_lowp.h, exact) into a float32
 * buffer on the stack, which the float32 functions read (same bits likewise). The
 * moments read in place (CN_COL_DEV_BODY with cn_load_f16/bf16, CN_COL_SUM8_TILE with
 * cn_loadf_f16/bf16) give the same bits too, but were not measured clearly faster. */

#define CN_COL_STAGE 16 /* a multiple of CN_CR: the float32 groups of the first pass
                           are those of float32 data */
#define CN_COL_LP_f16(i) ((double)cn_f16_to_float(x[i]))
#define CN_COL_LP_bf16(i) ((double)cn_bf16_to_float(x[i]))

/* rows [r0, r0 + nr) of columns [j0, j0 + nn) of x (row stride D) into buf (row stride
 * nn), widened */
#define CN_COL_WIDEN_ROWS(WIDEN, src, buf)                                              \
    for (ptrdiff_t rr = 0; rr < nr; rr++) WIDEN(src + (r0 + rr) * D + j0, buf + rr * nn, nn)

#define CN_COL_LP_FUNCS(T, SFX, WIDEN)                                                  \
    CN_COL_FUNCS(T, SFX, cn_load_##SFX)                                                 \
    static inline void cn_col_moments_##SFX(const T* x, ptrdiff_t D, ptrdiff_t nrows,   \
                                            ptrdiff_t n, const double* k, double* pm,   \
                                            double* pq, ptrdiff_t pf_rows) {            \
        const double cnt = (double)nrows;                                               \
        double dd[CN_COL_CHUNK], cm[CN_COL_CHUNK];                                      \
        float buf[CN_COL_STAGE * CN_COL_CHUNK];                                         \
        ptrdiff_t j0, j, nn, r0, nr;                                                    \
        for (j0 = 0; j0 < n; j0 += CN_COL_CHUNK) {                                      \
            nn = n - j0 < CN_COL_CHUNK ? n - j0 : CN_COL_CHUNK;                         \
            for (j = 0; j < nn; j++) pm[j0 + j] = pq[j0 + j] = dd[j] = 0;               \
            for (r0 = 0; r0 < nrows; r0 += nr) {                                        \
                nr = nrows - r0 < CN_COL_STAGE ? nrows - r0 : CN_COL_STAGE;             \
                CN_COL_WIDEN_ROWS(WIDEN, x, buf);                                       \
                cn_col_sum8_f32(buf, nn, nr, nn, k + j0, pm + j0);                      \
            }                                                                           \
            CN_COL_REDO_WIDE(CN_COL_LP_##SFX)                                           \
            CN_COL_CENTRE                                                               \
            for (r0 = 0; r0 < nrows; r0 += nr) {                                        \
                nr = nrows - r0 < CN_COL_STAGE ? nrows - r0 : CN_COL_STAGE;             \
                CN_COL_PREFETCH_NEXT(x);                                                \
                CN_COL_WIDEN_ROWS(WIDEN, x, buf);                                       \
                cn_col_dev_f32(buf, nn, nr, nn, cm, dd, pq + j0);                       \
            }                                                                           \
            CN_COL_FINISH                                                               \
        }                                                                               \
    }

CN_COL_LP_FUNCS(cn_f16, f16, cn_f16_widen)
CN_COL_LP_FUNCS(cn_bf16, bf16, cn_bf16_widen)

/* the row-walking gradient sums of float32 g (the backward's dy * act'(a), kept in
 * float32) with 16-bit x: the same sums as float32 data holding the widened x */
#define CN_COL_GRAD_ROWS_G32_DEF(T, SFX)                                                \
    static inline void cn_col_grad_rows_g32_##SFX(const float* dy, const T* x,          \
                                                  ptrdiff_t D, ptrdiff_t nrows,         \
                                                  ptrdiff_t n, const double* m,         \
                                                  double* sg, double* sgx) {            \
        CN_COL_GRAD_ROWS                                                                \
    }
CN_COL_GRAD_ROWS_G32_DEF(cn_f16, f16)
CN_COL_GRAD_ROWS_G32_DEF(cn_bf16, bf16)

/* ---- pairwise block merge of n adjacent columns --------------------------------------
 * tree_merge (_common.pxd) for the n adjacent columns pm[j], pq[j] (block q of column j
 * at pm[q * stride + j]): the same tree, and per column the same operations in the same
 * order as its chan_merge, so the same bits. The counts of a merge are the same for
 * every column, so its two factors are formed once, and CN_DW columns share each vector
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
            for (; j + CN_DW <= n; j += CN_DW) {
                cn_vd ma = cn_load_f64(am + j), d = cn_load_f64(bm + j) - ma;
                cn_vd qa = (cn_load_f64(aq + j) + cn_load_f64(bq + j)) + (d * d) * fq;
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
