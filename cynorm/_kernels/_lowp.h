/* 16-bit storage: float16 (IEEE binary16, NumPy's float16) and bfloat16 (the upper half
 * of a float32: ml_dtypes.bfloat16). The kernels compute on such data in float32 lanes:
 * these helpers widen blocks of 16-bit values to float32 (exact) and narrow float32
 * results back, rounding to nearest even, once.
 *
 * Every path gives the same bits: float16 uses F16C's vcvtph2ps / vcvtps2ph where the
 * instruction set has them (x86-64-v3 and v4), and exact integer bit manipulation
 * otherwise (the baseline), written to match F16C bit for bit, NaN payloads included;
 * bfloat16 uses integer bit manipulation (AVX-512 BF16 is not part of x86-64-v4; the
 * forward applies of _lanes.h use its vcvtneps2bf16 where the CPU has it, with the
 * same bits). Scalar tails use the same rules as the vector bodies.
 *
 *   float16 -> float32: exact; NaN stays NaN with its payload, a signalling NaN quieted.
 *   float32 -> float16: round to nearest even; beyond the largest finite float16 (65504,
 *                       from 65520 on) to +-Inf; subnormal results rounded on the
 *                       subnormal grid; NaN -> quiet NaN keeping the payload's top bits.
 *   bfloat16 -> float32: exact (a 16-bit shift).
 *   float32 -> bfloat16: round to nearest even (overflow to +-Inf by the carry);
 *                       NaN -> quiet NaN keeping the payload's top bits.
 */
#ifndef CYNORM_LOWP_H
#define CYNORM_LOWP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* distinct C types, so that Cython's fused types tell them apart and no arithmetic on
   the raw bits compiles by mistake */
typedef struct { uint16_t bits; } cn_f16;
typedef struct { uint16_t bits; } cn_bf16;

typedef float cn_lp_v8f __attribute__((vector_size(32)));
typedef uint32_t cn_lp_v8u __attribute__((vector_size(32)));
typedef int32_t cn_lp_v8i __attribute__((vector_size(32)));
typedef uint16_t cn_lp_v8h __attribute__((vector_size(16)));

static inline float cn_lp_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t cn_lp_u32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* ---- scalar ----------------------------------------------------------------------- */

static inline float cn_bf16_to_float(cn_bf16 h) {
    return cn_lp_f32((uint32_t)h.bits << 16);
}

static inline cn_bf16 cn_float_to_bf16(float f) {
    uint32_t u = cn_lp_u32(f);
    cn_bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u)
        r.bits = (uint16_t)((u >> 16) | 0x40u);
    else
        r.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return r;
}

static inline float cn_f16_to_float(cn_f16 h) {
#if defined(__F16C__)
    return _cvtsh_ss(h.bits);
#else
    uint32_t em = h.bits & 0x7fffu, s = (uint32_t)(h.bits & 0x8000u) << 16, u;
    if (em >= 0x7c00u)  /* Inf, NaN (quieted) */
        u = 0x7f800000u | (em << 13) | (em > 0x7c00u ? 0x400000u : 0u);
    else  /* normal or subnormal: the bits as a float32, rescaled by 2**112 (exact) */
        u = cn_lp_u32(cn_lp_f32(em << 13) * 0x1p112f);
    return cn_lp_f32(u | s);
#endif
}

static inline cn_f16 cn_float_to_f16(float f) {
    cn_f16 r;
#if defined(__F16C__)
    r.bits = (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t u = cn_lp_u32(f), s = u & 0x80000000u, o;
    u ^= s;
    if (u >= 0x47800000u)  /* >= 2**16: Inf from overflow, or Inf, or NaN (quieted) */
        o = u > 0x7f800000u ? (0x7e00u | ((u >> 13) & 0x3ffu)) : 0x7c00u;
    else if (u < 0x38800000u)  /* below 2**-14: the subnormal grid, by a float32 add
                                  of 0.5 whose ulp is 2**-24 (round to nearest even) */
        o = cn_lp_u32(cn_lp_f32(u) + 0.5f) - 0x3f000000u;
    else  /* normal: rebias, round to nearest even on the 13 dropped bits */
        o = (u - 0x38000000u + 0xfffu + ((u >> 13) & 1u)) >> 13;
    r.bits = (uint16_t)(o | (s >> 16));
#endif
    return r;
}

/* ---- 8 lanes ---------------------------------------------------------------------- */

/* 8 16-bit values zero-extended to 32-bit lanes, and back (v < 2**16 in every lane):
   one vpmovzxwd / vpmovdw where the level has them (GCC's generic lowering takes a few
   shuffles more); the same bits everywhere */
static inline cn_lp_v8u cn_lp_load8(const void* p) {
#if defined(__AVX2__)
    return (cn_lp_v8u)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
#else
    cn_lp_v8h h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, cn_lp_v8u);
#endif
}

static inline void cn_lp_store8(void* p, cn_lp_v8u v) {
#if defined(__AVX512VL__)
    _mm_storeu_si128((__m128i*)p, _mm256_cvtepi32_epi16((__m256i)v));
#elif defined(__AVX2__)
    /* packus per 128-bit half, then the two low quadwords together */
    __m256i q = _mm256_packus_epi32((__m256i)v, (__m256i)v);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(q, 0x08)));
#else
    cn_lp_v8h h = __builtin_convertvector(v, cn_lp_v8h);
    memcpy(p, &h, sizeof h);
#endif
}

static inline cn_lp_v8f cn_bf16_to_float8(const cn_bf16* p) {
    return (cn_lp_v8f)(cn_lp_load8(p) << 16);
}

static inline void cn_float8_to_bf16(cn_bf16* p, cn_lp_v8f f) {
    cn_lp_v8u u = (cn_lp_v8u)f;
    cn_lp_v8u nan = (cn_lp_v8u)((u & 0x7fffffffu) > 0x7f800000u);
    cn_lp_v8u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    cn_lp_store8(p, (r & ~nan) | (((u >> 16) | 0x40u) & nan));
}

static inline cn_lp_v8f cn_f16_to_float8(const cn_f16* p) {
#if defined(__F16C__)
    __m128i h;
    memcpy(&h, p, sizeof h);
    return (cn_lp_v8f)_mm256_cvtph_ps(h);
#else
    cn_lp_v8u h = cn_lp_load8(p);
    cn_lp_v8u em = h & 0x7fffu, s = (h & 0x8000u) << 16;
    cn_lp_v8u fin = (cn_lp_v8u)((cn_lp_v8f)(em << 13) * 0x1p112f);
    cn_lp_v8u special = (cn_lp_v8u)(em >= 0x7c00u);
    cn_lp_v8u quiet = (cn_lp_v8u)(em > 0x7c00u) & 0x400000u;
    cn_lp_v8u inf = 0x7f800000u | (em << 13) | quiet;
    return (cn_lp_v8f)(((fin & ~special) | (inf & special)) | s);
#endif
}

static inline void cn_float8_to_f16(cn_f16* p, cn_lp_v8f f) {
#if defined(__F16C__)
    __m128i h = _mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT);
    memcpy(p, &h, sizeof h);
#else
    cn_lp_v8u u = (cn_lp_v8u)f, s = u & 0x80000000u;
    u ^= s;
    cn_lp_v8u big = (cn_lp_v8u)(u >= 0x47800000u);
    cn_lp_v8u small = (cn_lp_v8u)(u < 0x38800000u);
    cn_lp_v8u nan = (cn_lp_v8u)(u > 0x7f800000u);
    cn_lp_v8u a = (0x7c00u & ~nan) | ((0x7e00u | ((u >> 13) & 0x3ffu)) & nan);
    cn_lp_v8u b = (cn_lp_v8u)((cn_lp_v8f)u + 0.5f) - 0x3f000000u;
    cn_lp_v8u c = (u - 0x38000000u + 0xfffu + ((u >> 13) & 1u)) >> 13;
    cn_lp_v8u o = (a & big) | (b & small) | (c & ~(big | small));
    cn_lp_store8(p, o | (s >> 16));
#endif
}

/* ---- runs: y[0:n] = widen(x[0:n]) and y[0:n] = narrow(x[0:n]) --------------------- */

#define CN_LP_RUNS(T, NAME)                                                             \
    static inline void cn_##NAME##_widen(const T* x, float* y, ptrdiff_t n) {           \
        ptrdiff_t i = 0;                                                                \
        for (; i + 8 <= n; i += 8) {                                                    \
            cn_lp_v8f v = cn_##NAME##_to_float8(x + i);                                 \
            memcpy(y + i, &v, sizeof v);                                                \
        }                                                                               \
        for (; i < n; i++) y[i] = cn_##NAME##_to_float(x[i]);                           \
    }                                                                                   \
    static inline void cn_##NAME##_narrow(const float* x, T* y, ptrdiff_t n) {          \
        ptrdiff_t i = 0;                                                                \
        for (; i + 8 <= n; i += 8) {                                                    \
            cn_lp_v8f v;                                                                \
            memcpy(&v, x + i, sizeof v);                                                \
            cn_float8_to_##NAME(y + i, v);                                              \
        }                                                                               \
        for (; i < n; i++) y[i] = cn_float_to_##NAME(x[i]);                             \
    }

CN_LP_RUNS(cn_f16, f16)
CN_LP_RUNS(cn_bf16, bf16)

#endif
