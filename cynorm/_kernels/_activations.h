/* The activation epilogue: silu, gelu (erf form), gelu_tanh (torch's approximate="tanh")
 * and relu, and their derivatives, over contiguous runs of float32 or float64.
 *
 * Written, like _lanes.h, with GCC/Clang vector extensions on vectors of the level's
 * native width (cn_vd: CN_DW float64 lanes, cn_vf: CN_FW float32 lanes), only
 * +, -, *, /, comparisons and bit operations, every step the same IEEE operation in
 * every lane, no libm call. With -ffp-contract=off (setup.py) the bits are the same on
 * SSE2, AVX2 and AVX-512 and do not depend on a value's position in the array (the
 * tail of a run is padded to a full vector and computed the same way).
 *
 * float32 data: silu runs in float32 lanes (below: within 2 ulp of the correctly
 * rounded value); gelu and gelu_tanh are widened to float64, computed there with
 * polynomials of float32-grade accuracy (relative error below 1e-8 before the final
 * rounding) and rounded once on the store: within 1 ulp. Both over the whole float32
 * range (tests/test_activations.py sweeps it). float64 data use full-precision polynomials (a few ulp; in the far negative
 * tails, where the result is tiny, gelu and gelu_tanh lose up to ~1e-13 relative through
 * the rounding of their argument, x / sqrt(2) or 2u, as any float64 formula does).
 *
 * exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a Taylor polynomial for e^r,
 * and the scaling by 2^n in two factors so that underflow to subnormals rounds once.
 * erfc: W. J. Cody's rational Chebyshev approximations (Math. Comp. 23, 1969, as in
 * netlib's specfun CALERF), three intervals, one division.
 *
 * Special values: silu(-inf) = gelu(-inf) = gelu_tanh(-inf) = -0, act(+inf) = +inf,
 * NaN propagates through every function and derivative; the derivatives at -inf are 0
 * and at +inf 1 (their limits).
 */
#ifndef CYNORM_ACTIVATIONS_H
#define CYNORM_ACTIVATIONS_H

#include "_lanes.h"

enum { CN_ACT_NONE = 0, CN_ACT_SILU = 1, CN_ACT_GELU = 2, CN_ACT_GELU_TANH = 3,
       CN_ACT_RELU = 4 };

/* the vector helpers must inline: called, they could pass their vectors in memory */
#if defined(__GNUC__) || defined(__clang__)
#define CN_VINLINE static inline __attribute__((always_inline))
#else
#define CN_VINLINE static inline
#endif

#define CN_SPLAT(c) ((cn_vd){CN_DLANES(c)})
#define CN_ISPLAT(c) ((cn_vl){CN_DLANES(c)})

/* m ? a : b, lane by lane (m: all ones or all zeros per lane, as comparisons give) */
CN_VINLINE cn_vd cn_sel(cn_vl m, cn_vd a, cn_vd b) {
    return (cn_vd)(((cn_vl)a & m) | ((cn_vl)b & ~m));
}

CN_VINLINE cn_vd cn_fabs(cn_vd v) {
    return (cn_vd)((cn_vl)v & CN_ISPLAT(0x7fffffffffffffffLL));
}

/* ---- exp ----------------------------------------------------------------------------
 * full = 0: Taylor degree 7 (relative error < 4e-9: float32 results), full = 1: degree
 * 13 (< 1e-17: float64 results). A constant argument, so each caller compiles one. */
CN_VINLINE cn_vd cn_exp(cn_vd v, int full) {
    const cn_vd magic = CN_SPLAT(6755399441055744.0); /* 1.5 * 2^52: round to integer */
    cn_vd vc, kf, n, r, p;
    cn_vl ni, n1, n2;
    /* clamp so that 2^n stays in two normal factors; NaN passes (comparisons false) */
    vc = cn_sel(v < CN_SPLAT(-746.0), CN_SPLAT(-746.0), v);
    vc = cn_sel(vc > CN_SPLAT(710.0), CN_SPLAT(710.0), vc);
    kf = vc * CN_SPLAT(1.4426950408889634) + magic;
    n = kf - magic;
    ni = (cn_vl)kf - (cn_vl)magic;
    /* ln2 split: the high part has 32 significant bits, so n * hi is exact */
    r = (vc - n * CN_SPLAT(6.93147180369123816490e-01)) - n * CN_SPLAT(1.90821492927058770002e-10);
    if (full) {
        p = CN_SPLAT(1.0 / 6227020800.0);
        p = p * r + CN_SPLAT(1.0 / 479001600.0);
        p = p * r + CN_SPLAT(1.0 / 39916800.0);
        p = p * r + CN_SPLAT(1.0 / 3628800.0);
        p = p * r + CN_SPLAT(1.0 / 362880.0);
        p = p * r + CN_SPLAT(1.0 / 40320.0);
        p = p * r + CN_SPLAT(1.0 / 5040.0);
    } else {
        p = CN_SPLAT(1.0 / 5040.0);
    }
    p = p * r + CN_SPLAT(1.0 / 720.0);
    p = p * r + CN_SPLAT(1.0 / 120.0);
    p = p * r + CN_SPLAT(1.0 / 24.0);
    p = p * r + CN_SPLAT(1.0 / 6.0);
    p = p * r + CN_SPLAT(0.5);
    p = p * r + CN_SPLAT(1.0);
    p = p * r + CN_SPLAT(1.0);
    n1 = ni >> 1;
    n2 = ni - n1;
    return (p * (cn_vd)((n1 + 1023) << 52)) * (cn_vd)((n2 + 1023) << 52);
}

/* exp(-y * y) for y >= 0; full: with y split as in Cody's CALERF so that the rounding
 * of y * y does not cost accuracy (y = k / 16 + d, k / 16 squared exactly) */
CN_VINLINE cn_vd cn_exp_negsq(cn_vd y, int full) {
    const cn_vd magic = CN_SPLAT(6755399441055744.0);
    cn_vd yh, del;
    cn_vl small = y < CN_SPLAT(1e6);
    if (!full)
        return cn_exp(-(y * y), 0);
    yh = cn_sel(small, ((y * CN_SPLAT(16.0) + magic) - magic) * CN_SPLAT(0.0625), y);
    del = cn_sel(small, (y - yh) * (y + yh), CN_ZERO);
    return cn_exp(-(yh * yh), 1) * cn_exp(-del, 1);
}

/* ---- erfc ---------------------------------------------------------------------------
 * erfc(z) for any z; ez = exp(-z * z) (from cn_exp_negsq(|z|)), shared with the gelu
 * derivative's density. Each interval's rational function is carried as a numerator and
 * a denominator, the interval of each lane picks its pair, and one division ends it
 * (divisions are the slow part). The third interval's polynomials in s = 1 / z^2 are
 * multiplied through by z^10 (with |z| capped at 30, where erfc is 0 in float64 anyway),
 * so that no 1 / z^2 is formed either. */
CN_VINLINE cn_vd cn_erfc(cn_vd z, cn_vd ez) {
    cn_vd y = cn_fabs(z), t, n, d, num, den, yc, tc, res;
    cn_vl in_a = y <= CN_SPLAT(0.46875), in_c = y > CN_SPLAT(4.0);
    /* first interval: erf(y) = y NA(y^2) / DA(y^2), erfc = (DA - y NA) / DA */
    t = y * y;
    n = CN_SPLAT(1.85777706184603153e-1) * t;
    d = t;
    n = (n + CN_SPLAT(3.16112374387056560e00)) * t;
    d = (d + CN_SPLAT(2.36012909523441209e01)) * t;
    n = (n + CN_SPLAT(1.13864154151050156e02)) * t;
    d = (d + CN_SPLAT(2.44024637934444173e02)) * t;
    n = (n + CN_SPLAT(3.77485237685302021e02)) * t;
    d = (d + CN_SPLAT(1.28261652607737228e03)) * t;
    n = n + CN_SPLAT(3.20937758913846947e03);
    d = d + CN_SPLAT(2.84423683343917062e03);
    num = d - y * n;
    den = d;
    /* second interval: erfc(y) = exp(-y^2) NB(y) / DB(y) */
    n = CN_SPLAT(2.15311535474403846e-8) * y;
    d = y;
    n = (n + CN_SPLAT(5.64188496988670089e-1)) * y;
    d = (d + CN_SPLAT(1.57449261107098347e01)) * y;
    n = (n + CN_SPLAT(8.88314979438837594e00)) * y;
    d = (d + CN_SPLAT(1.17693950891312499e02)) * y;
    n = (n + CN_SPLAT(6.61191906371416295e01)) * y;
    d = (d + CN_SPLAT(5.37181101862009858e02)) * y;
    n = (n + CN_SPLAT(2.98635138197400131e02)) * y;
    d = (d + CN_SPLAT(1.62138957456669019e03)) * y;
    n = (n + CN_SPLAT(8.81952221241769090e02)) * y;
    d = (d + CN_SPLAT(3.29079923573345963e03)) * y;
    n = (n + CN_SPLAT(1.71204761263407058e03)) * y;
    d = (d + CN_SPLAT(4.36261909014324716e03)) * y;
    n = (n + CN_SPLAT(2.05107837782607147e03)) * y;
    d = (d + CN_SPLAT(3.43936767414372164e03)) * y;
    n = n + CN_SPLAT(1.23033935479799725e03);
    d = d + CN_SPLAT(1.23033935480374942e03);
    num = cn_sel(in_a, num, ez * n);
    den = cn_sel(in_a, den, d);
    /* third interval: erfc(y) = exp(-y^2) (1/sqrt(pi) - s P(s) / Q(s)) / y, s = 1 / y^2;
     * with tc = y^2 and N = tc^5 P(1 / tc), D = tc^5 Q(1 / tc):
     * erfc(y) = exp(-y^2) (tc D / sqrt(pi) - N) / (y tc D) */
    yc = cn_sel(y < CN_SPLAT(30.0), y, CN_SPLAT(30.0));
    tc = yc * yc;
    n = CN_SPLAT(6.58749161529837803e-4) * tc;
    d = CN_SPLAT(2.33520497626869185e-3) * tc;
    n = (n + CN_SPLAT(1.60837851487422766e-2)) * tc;
    d = (d + CN_SPLAT(6.05183413124413191e-2)) * tc;
    n = (n + CN_SPLAT(1.25781726111229246e-1)) * tc;
    d = (d + CN_SPLAT(5.27905102951428412e-1)) * tc;
    n = (n + CN_SPLAT(3.60344899949804439e-1)) * tc;
    d = (d + CN_SPLAT(1.87295284992346047e00)) * tc;
    n = (n + CN_SPLAT(3.05326634961232344e-1)) * tc;
    d = (d + CN_SPLAT(2.56852019228982242e00)) * tc;
    n = n + CN_SPLAT(1.63153871373020978e-2);
    d = d + CN_SPLAT(1.0);
    num = cn_sel(in_c, ez * (tc * d * CN_SPLAT(0.56418958354775628695) - n), num);
    den = cn_sel(in_c, y * (tc * d), den);
    res = num / den;
    /* NaN: y itself; erfc(+-inf) = 0 or 2 (ez = 0, den = inf) */
    res = cn_sel(y == y, res, y);
    return cn_sel(z < CN_ZERO, CN_SPLAT(2.0) - res, res);
}

/* ---- the activations and their derivatives on float64 lanes ------------------------- */

#define CN_NEG_INF (-__builtin_inf())
#define CN_INV_SQRT2 0.70710678118654752440
#define CN_INV_SQRT_2PI 0.39894228040143267794
#define CN_GT_K 1.5957691216057307593   /* 2 * sqrt(2 / pi) */
#define CN_GT_A 0.044715

/* sigmoid pieces of v: t = exp(-|v|), p = 1 / (1 + t); sigmoid(v) = p (v >= 0) or t p */
CN_VINLINE void cn_sigmoid_parts(cn_vd v, int full, cn_vd* t, cn_vd* p) {
    *t = cn_exp(-cn_fabs(v), full);
    *p = CN_SPLAT(1.0) / (CN_SPLAT(1.0) + *t);
}

CN_VINLINE cn_vd cn_silu8(cn_vd x, int full) {
    cn_vd t, p, y;
    cn_sigmoid_parts(x, full, &t, &p);
    y = x * cn_sel(x >= CN_ZERO, p, t * p);
    return cn_sel(x == CN_SPLAT(CN_NEG_INF), CN_SPLAT(-0.0), y);
}

CN_VINLINE cn_vd cn_silu_grad8(cn_vd x, int full) {
    cn_vd t, p, q, s, sc, d;
    cn_vl pos = x >= CN_ZERO;
    cn_sigmoid_parts(x, full, &t, &p);
    q = t * p;
    s = cn_sel(pos, p, q);     /* sigmoid(x) */
    sc = cn_sel(pos, q, p);    /* 1 - sigmoid(x) */
    d = s * (CN_SPLAT(1.0) + x * sc);
    return cn_sel(cn_fabs(x) == CN_SPLAT(__builtin_inf()),
                  cn_sel(pos, CN_SPLAT(1.0), CN_ZERO), d);
}

CN_VINLINE cn_vd cn_gelu8(cn_vd x, int full) {
    cn_vd z = x * CN_SPLAT(-CN_INV_SQRT2);
    cn_vd y = CN_SPLAT(0.5) * x * cn_erfc(z, cn_exp_negsq(cn_fabs(z), full));
    return cn_sel(x == CN_SPLAT(CN_NEG_INF), CN_SPLAT(-0.0), y);
}

CN_VINLINE cn_vd cn_gelu_grad8(cn_vd x, int full) {
    cn_vd z = x * CN_SPLAT(-CN_INV_SQRT2);
    cn_vd ez = cn_exp_negsq(cn_fabs(z), full);
    cn_vd d = CN_SPLAT(0.5) * cn_erfc(z, ez) + x * (ez * CN_SPLAT(CN_INV_SQRT_2PI));
    return cn_sel(cn_fabs(x) == CN_SPLAT(__builtin_inf()),
                  cn_sel(x > CN_ZERO, CN_SPLAT(1.0), CN_ZERO), d);
}

/* gelu_tanh(x) = x / 2 (1 + tanh(u)) = x sigmoid(2u), 2u = K (x + A x^3) */
CN_VINLINE cn_vd cn_gelu_tanh8(cn_vd x, int full) {
    cn_vd u2 = CN_SPLAT(CN_GT_K) * (x + CN_SPLAT(CN_GT_A) * (x * x * x));
    cn_vd t, p, y;
    cn_sigmoid_parts(u2, full, &t, &p);
    y = x * cn_sel(u2 >= CN_ZERO, p, t * p);
    return cn_sel(x == CN_SPLAT(CN_NEG_INF), CN_SPLAT(-0.0), y);
}

CN_VINLINE cn_vd cn_gelu_tanh_grad8(cn_vd x, int full) {
    cn_vd u2 = CN_SPLAT(CN_GT_K) * (x + CN_SPLAT(CN_GT_A) * (x * x * x));
    cn_vd du2 = CN_SPLAT(CN_GT_K) * (CN_SPLAT(1.0) + CN_SPLAT(3.0 * CN_GT_A) * (x * x));
    cn_vd t, p, s, sps, d;
    cn_sigmoid_parts(u2, full, &t, &p);
    s = cn_sel(u2 >= CN_ZERO, p, t * p);
    sps = t * p * p;           /* sigmoid(2u) (1 - sigmoid(2u)) */
    d = s + cn_sel(t == CN_ZERO, CN_ZERO, x * sps * du2);
    return cn_sel(x != x, x, d);
}

CN_VINLINE cn_vd cn_relu8(cn_vd x, int full) {
    (void)full;
    return cn_sel((x > CN_ZERO) | (x != x), x, CN_ZERO);
}

CN_VINLINE cn_vd cn_relu_grad8(cn_vd x, int full) {
    (void)full;
    return cn_sel(x != x, x, cn_sel(x > CN_ZERO, CN_SPLAT(1.0), CN_ZERO));
}

/* ---- silu in float32 lanes ------------------------------------------------------------
 * The epilogue of the common case (GroupNorm + SiLU on float32) at twice the lanes and
 * without conversions: silu(x) = x / (1 + E), E = exp(-x) = 2^n (1 + p) with 1 + p
 * never rounded. With k = max(n, 0), 1 + E = 2^k d, d = 2^-k + 2^(n-k) (1 + p), every
 * term of d in range for any x (2^-k and 2^(n-k) are 1 or below), and
 * silu(x) = (x / d) 2^-k, the scaling last (exact, or the one rounding of a subnormal
 * result). Three roundings (d, the quotient, p's last add) and p's truncation (< 1e-8):
 * within 2 ulp of the correctly rounded result (the sweep in tests/test_activations.py
 * measures 1 ulp). Also exact: silu(x) = x for x > 87, -0 for x < -120. */

#define CN_FSPLAT(c) ((cn_vf){CN_FLANES(c)})
#define CN_IZERO ((cn_vi){0})

CN_VINLINE cn_vf cn_self(cn_vi m, cn_vf a, cn_vf b) {
    return (cn_vf)(((cn_vi)a & m) | ((cn_vi)b & ~m));
}

/* 2^j for integer lanes j in [-126, 127] */
CN_VINLINE cn_vf cn_pow2f(cn_vi j) {
    return (cn_vf)((j + 127) << 23);
}

/* the pieces of 1 + exp(-x) = 2^k d: d, u = 2^(n-k), p, and the halves k1 + k2 = k of
 * the final scaling (each 2^-k1, 2^-k2 normal) */
CN_VINLINE void cn_silu_parts16(cn_vf x, cn_vf* d, cn_vf* u, cn_vf* p,
                                   cn_vi* k1, cn_vi* k2) {
    const cn_vf magic = CN_FSPLAT(12582912.0f); /* 1.5 * 2^23: round to integer */
    cn_vf a = -x, kf, nf, r, q;
    cn_vi n, k, kc;
    a = cn_self(a < CN_FSPLAT(-87.0f), CN_FSPLAT(-87.0f), a);
    a = cn_self(a > CN_FSPLAT(120.0f), CN_FSPLAT(120.0f), a);
    kf = a * CN_FSPLAT(1.44269504f) + magic;
    nf = kf - magic;
    n = (cn_vi)kf - (cn_vi)magic;
    /* ln2 = 0.693359375 (9 bits: nf * hi exact) - 2.12194440e-4 */
    r = (a - nf * CN_FSPLAT(0.693359375f)) - nf * CN_FSPLAT(-2.12194440e-4f);
    q = CN_FSPLAT(1.0f / 5040.0f);
    q = q * r + CN_FSPLAT(1.0f / 720.0f);
    q = q * r + CN_FSPLAT(1.0f / 120.0f);
    q = q * r + CN_FSPLAT(1.0f / 24.0f);
    q = q * r + CN_FSPLAT(1.0f / 6.0f);
    q = q * r + CN_FSPLAT(0.5f);
    *p = r + (r * r) * q;                     /* e^r - 1 */
    k = n & (n > CN_IZERO);                   /* max(n, 0) */
    *u = cn_pow2f(n - k);
    kc = k - ((k - 126) & (k > 126));         /* min(k, 126): 2^-k matters only when small */
    *d = (cn_pow2f(-kc) + *u) + *u * *p;
    *k1 = k >> 1;
    *k2 = k - *k1;
}

CN_VINLINE cn_vf cn_silu16(cn_vf x) {
    cn_vf d, u, p, y;
    cn_vi k1, k2;
    cn_silu_parts16(x, &d, &u, &p, &k1, &k2);
    y = ((x / d) * cn_pow2f(-k1)) * cn_pow2f(-k2);
    return cn_self(x < CN_FSPLAT(-120.0f), CN_FSPLAT(-0.0f), y);
}

/* silu'(x) = s (1 + x (1 - s)), s = sigmoid(x) = 2^-k / d, 1 - s = u (1 + p) / d;
 * within a few float32 roundings of the size of the terms, s (1 + |x| (1 - s)) */
CN_VINLINE cn_vf cn_silu_grad16(cn_vf x) {
    cn_vf d, u, p, inv, g;
    cn_vi k1, k2;
    cn_silu_parts16(x, &d, &u, &p, &k1, &k2);
    inv = CN_FSPLAT(1.0f) / d;
    /* scaled by 2^-k last, so that a subnormal result is rounded once */
    g = inv * (CN_FSPLAT(1.0f) + x * ((u + u * p) * inv));
    g = (g * cn_pow2f(-k1)) * cn_pow2f(-k2);
    g = cn_self(x > CN_FSPLAT(87.0f), CN_FSPLAT(1.0f), g);
    return cn_self(x < CN_FSPLAT(-120.0f), CN_FSPLAT(0.0f), g);
}

/* ---- runs ----------------------------------------------------------------------------
 * One loop per function, chosen by a switch before the loop. The tail (less than a
 * vector) goes through the same vector code, padded with zeros. */

#define CN_ACT_RUN_F32(F)                                                              \
    for (; i + CN_DW <= n; i += CN_DW)                                                 \
        cn_store_f32(y + i, F(cn_load_f32(a + i), 0));                                 \
    if (i < n) {                                                                       \
        float buf[CN_DW] = {0};                                                        \
        memcpy(buf, a + i, (size_t)(n - i) * sizeof(float));                           \
        cn_store_f32(buf, F(cn_load_f32(buf), 0));                                     \
        memcpy(y + i, buf, (size_t)(n - i) * sizeof(float));                           \
    }

#define CN_ACT_RUN_F64(F)                                                              \
    for (; i + CN_DW <= n; i += CN_DW) {                                               \
        cn_vd v = F(cn_load_f64(a + i), 1);                                            \
        memcpy(y + i, &v, sizeof v);                                                   \
    }                                                                                  \
    if (i < n) {                                                                       \
        double buf[CN_DW] = {0};                                                       \
        cn_vd v;                                                                       \
        memcpy(buf, a + i, (size_t)(n - i) * sizeof(double));                          \
        v = F(cn_load_f64(buf), 1);                                                    \
        memcpy(y + i, &v, (size_t)(n - i) * sizeof(double));                           \
    }

/* g = dy * act'(a), the product in float64, rounded once */
#define CN_GRAD_RUN_F32(F)                                                             \
    for (; i + CN_DW <= n; i += CN_DW)                                                 \
        cn_store_f32(g + i, cn_load_f32(dy + i) * F(cn_load_f32(a + i), 0));           \
    if (i < n) {                                                                       \
        float ba[CN_DW] = {0}, bd[CN_DW] = {0};                                        \
        memcpy(ba, a + i, (size_t)(n - i) * sizeof(float));                            \
        memcpy(bd, dy + i, (size_t)(n - i) * sizeof(float));                           \
        cn_store_f32(ba, cn_load_f32(bd) * F(cn_load_f32(ba), 0));                     \
        memcpy(g + i, ba, (size_t)(n - i) * sizeof(float));                            \
    }

#define CN_GRAD_RUN_F64(F)                                                             \
    for (; i + CN_DW <= n; i += CN_DW) {                                               \
        cn_vd v = cn_load_f64(dy + i) * F(cn_load_f64(a + i), 1);                      \
        memcpy(g + i, &v, sizeof v);                                                   \
    }                                                                                  \
    if (i < n) {                                                                       \
        double ba[CN_DW] = {0}, bd[CN_DW] = {0};                                       \
        cn_vd v;                                                                       \
        memcpy(ba, a + i, (size_t)(n - i) * sizeof(double));                           \
        memcpy(bd, dy + i, (size_t)(n - i) * sizeof(double));                          \
        v = cn_load_f64(bd) * F(cn_load_f64(ba), 1);                                   \
        memcpy(g + i, &v, (size_t)(n - i) * sizeof(double));                           \
    }

#define CN_ACT16_RUN(F)                                                                \
    for (; i + CN_FW <= n; i += CN_FW) {                                               \
        cn_vf v;                                                                       \
        memcpy(&v, a + i, sizeof v);                                                   \
        v = F(v);                                                                      \
        memcpy(y + i, &v, sizeof v);                                                   \
    }                                                                                  \
    if (i < n) {                                                                       \
        cn_vf v = CN_FSPLAT(0.0f);                                                     \
        memcpy(&v, a + i, (size_t)(n - i) * sizeof(float));                            \
        v = F(v);                                                                      \
        memcpy(y + i, &v, (size_t)(n - i) * sizeof(float));                            \
    }

#define CN_GRAD16_RUN(F)                                                               \
    for (; i + CN_FW <= n; i += CN_FW) {                                               \
        cn_vf v, w;                                                                    \
        memcpy(&v, a + i, sizeof v);                                                   \
        memcpy(&w, dy + i, sizeof w);                                                  \
        v = w * F(v);                                                                  \
        memcpy(g + i, &v, sizeof v);                                                   \
    }                                                                                  \
    if (i < n) {                                                                       \
        cn_vf v = CN_FSPLAT(0.0f), w = CN_FSPLAT(0.0f);                                \
        memcpy(&v, a + i, (size_t)(n - i) * sizeof(float));                            \
        memcpy(&w, dy + i, (size_t)(n - i) * sizeof(float));                           \
        v = w * F(v);                                                                  \
        memcpy(g + i, &v, (size_t)(n - i) * sizeof(float));                            \
    }

#define CN_ACT_SWITCH(RUN, GRAD)                                                       \
    switch (act) {                                                                     \
    case CN_ACT_SILU: RUN(cn_silu##GRAD##8) break;                                     \
    case CN_ACT_GELU: RUN(cn_gelu##GRAD##8) break;                                     \
    case CN_ACT_GELU_TANH: RUN(cn_gelu_tanh##GRAD##8) break;                           \
    case CN_ACT_RELU: RUN(cn_relu##GRAD##8) break;                                     \
    default: break;                                                                    \
    }

/* y = act(a) over n elements; y may be a. act = CN_ACT_NONE: nothing (y untouched). */
static inline void cn_act_f32(const float* a, float* y, ptrdiff_t n, int act) {
    ptrdiff_t i = 0;
    if (act == CN_ACT_SILU) {
        CN_ACT16_RUN(cn_silu16)
        return;
    }
    CN_ACT_SWITCH(CN_ACT_RUN_F32, )
}

static inline void cn_act_f64(const double* a, double* y, ptrdiff_t n, int act) {
    ptrdiff_t i = 0;
    CN_ACT_SWITCH(CN_ACT_RUN_F64, )
}

/* g = dy * act'(a) over n elements; g may be a or dy. act = CN_ACT_NONE: g = dy. */
static inline void cn_act_grad_f32(const float* a, const float* dy, float* g, ptrdiff_t n,
                                   int act) {
    ptrdiff_t i = 0;
    if (act == CN_ACT_NONE) {
        if (g != dy) memmove(g, dy, (size_t)n * sizeof(float));
        return;
    }
    if (act == CN_ACT_SILU) {
        CN_GRAD16_RUN(cn_silu_grad16)
        return;
    }
    CN_ACT_SWITCH(CN_GRAD_RUN_F32, _grad)
}

static inline void cn_act_grad_f64(const double* a, const double* dy, double* g,
                                   ptrdiff_t n, int act) {
    ptrdiff_t i = 0;
    if (act == CN_ACT_NONE) {
        if (g != dy) memmove(g, dy, (size_t)n * sizeof(double));
        return;
    }
    CN_ACT_SWITCH(CN_GRAD_RUN_F64, _grad)
}

#endif
