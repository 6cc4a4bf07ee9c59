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
 * float32 data: silu and relu run in float32 lanes (silu: within 2 ulp of the
 * correctly rounded value, checked on every float32); gelu and gelu_tanh are widened to
 * float64, computed there with approximations of float32-grade accuracy (relative error
 * below 1e-8 before the final rounding; gelu: a rational function of |x| times
 * exp(-x^2 / 2), its derivative Cody's erfc) and rounded once on the store: within 1
 * ulp. All over the whole float32 range (tests/test_activations.py sweeps it). The
 * kernels' float32 affine runs in the same pass (cn_affine_act_f32), so x is read once.
 * float64 data use full-precision polynomials (a few ulp; in the far negative tails,
 * where the result is tiny, gelu and gelu_tanh lose up to ~1e-13 relative through the
 * rounding of their argument, x / sqrt(2) or 2u, as any float64 formula does).
 *
 * exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a polynomial for e^r (Taylor
 * in float64 lanes, a fitted one in float32 lanes), and the scaling by 2^n in two
 * factors where underflow to subnormals must round once.
 * erfc: W. J. Cody's rational Chebyshev approximations (Math. Comp. 23, 1969, as in
 * netlib's specfun CALERF), three intervals, one division.
 *
 * Special values: silu(-inf) = gelu(-inf) = gelu_tanh(-inf) = -0, act(+inf) = +inf,
 * NaN propagates through every function and derivative (a NaN input's own NaN, the same
 * bits on every instruction set); the derivatives at -inf are 0
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

/* a half vector (cn_vh: CN_DW float32 lanes) widened to CN_DW float64 lanes, and back
 * (round to nearest): one conversion instruction each (cn_load_f32 / cn_store_f32) */
CN_VINLINE cn_vd cn_widen_h(cn_vh v) {
    float b[CN_DW];
    memcpy(b, &v, sizeof b);
    return cn_load_f32(b);
}

CN_VINLINE cn_vh cn_narrow_h(cn_vd u) {
    float b[CN_DW];
    cn_vh v;
    cn_store_f32(b, u);
    memcpy(&v, b, sizeof v);
    return v;
}

/* m ? a : b, lane by lane (m: all ones or all zeros per lane, as comparisons give) */
CN_VINLINE cn_vd cn_sel(cn_vl m, cn_vd a, cn_vd b) {
    return (cn_vd)(((cn_vl)a & m) | ((cn_vl)b & ~m));
}

CN_VINLINE cn_vd cn_fabs(cn_vd v) {
    return (cn_vd)((cn_vl)v & CN_ISPLAT(0x7fffffffffffffffLL));
}

/* v clamped to [lo, hi] lane by lane (NaN passes: its comparisons are false) */
CN_VINLINE cn_vd cn_clamp(cn_vd v, double lo, double hi) {
    v = cn_sel(v < CN_SPLAT(lo), CN_SPLAT(lo), v);
    return cn_sel(v > CN_SPLAT(hi), CN_SPLAT(hi), v);
}

/* whether any lane of a comparison's result is set */
CN_VINLINE int cn_any(cn_vl m) {
    unsigned long long w[sizeof(cn_vl) / 8], acc = 0;
    size_t j;
    memcpy(w, &m, sizeof w);
    for (j = 0; j < sizeof(cn_vl) / 8; j++) acc |= w[j];
    return acc != 0;
}

/* the limits at the infinities, which the formulas reach only as inf - inf or 0 * inf:
 * act(-inf) = -0 (y elsewhere) and act'(-inf) = 0, act'(+inf) = 1 (d elsewhere) */
CN_VINLINE cn_vd cn_at_neg_inf(cn_vd x, cn_vd y) {
    return cn_sel(x == CN_SPLAT(-__builtin_inf()), CN_SPLAT(-0.0), y);
}

CN_VINLINE cn_vd cn_grad_at_inf(cn_vd x, cn_vd d) {
    return cn_sel(cn_fabs(x) == CN_SPLAT(__builtin_inf()),
                  cn_sel(x > CN_ZERO, CN_SPLAT(1.0), CN_ZERO), d);
}

/* ---- exp ----------------------------------------------------------------------------
 * full = 0: Taylor degree 7 (relative error < 4e-9: float32 results), full = 1: degree
 * 13 (< 1e-17: float64 results). A constant argument, so each caller compiles one. */
CN_VINLINE cn_vd cn_exp(cn_vd v, int full) {
    const cn_vd magic = CN_SPLAT(6755399441055744.0); /* 1.5 * 2^52: round to integer */
    cn_vd vc, kf, n, r, p;
    cn_vl ni, n1, n2;
    /* clamp so that 2^n stays in two normal factors; NaN passes (comparisons false) */
    vc = cn_clamp(v, -746.0, 710.0);
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
 * so that no 1 / z^2 is formed either. An interval no lane of the vector is in is
 * skipped (the other lanes' values do not depend on it). */
CN_VINLINE cn_vd cn_erfc(cn_vd z, cn_vd ez) {
    cn_vd y = cn_fabs(z), t, n, d, num = CN_ZERO, den = CN_ZERO, yc, tc, res;
    cn_vl in_a = y <= CN_SPLAT(0.46875), in_c = y > CN_SPLAT(4.0);
    /* first interval: erf(y) = y NA(y^2) / DA(y^2), erfc = (DA - y NA) / DA */
    if (cn_any(in_a)) {
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
    }
    /* second interval: erfc(y) = exp(-y^2) NB(y) / DB(y) (and NaN) */
    if (cn_any(~(in_a | in_c))) {
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
    }
    /* third interval: erfc(y) = exp(-y^2) (1/sqrt(pi) - s P(s) / Q(s)) / y, s = 1 / y^2;
     * with tc = y^2 and N = tc^5 P(1 / tc), D = tc^5 Q(1 / tc):
     * erfc(y) = exp(-y^2) (tc D / sqrt(pi) - N) / (y tc D) */
    if (cn_any(in_c)) {
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
    }
    res = num / den;
    /* NaN: y itself; erfc(+-inf) = 0 or 2 (ez = 0, den = inf) */
    res = cn_sel(y == y, res, y);
    return cn_sel(z < CN_ZERO, CN_SPLAT(2.0) - res, res);
}

/* ---- the activations and their derivatives on float64 lanes ------------------------- */

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
    return cn_at_neg_inf(x, y);
}

CN_VINLINE cn_vd cn_silu_grad8(cn_vd x, int full) {
    cn_vd t, p, q, s, sc, d;
    cn_vl pos = x >= CN_ZERO;
    cn_sigmoid_parts(x, full, &t, &p);
    q = t * p;
    s = cn_sel(pos, p, q);     /* sigmoid(x) */
    sc = cn_sel(pos, q, p);    /* 1 - sigmoid(x) */
    d = s * (CN_SPLAT(1.0) + x * sc);
    return cn_grad_at_inf(x, d);
}

/* The normal distribution function for float32 data (full = 0), in float64 lanes:
 * Phi(x) = Phi(-t) or 1 - Phi(-t), t = |x|, with Phi(-t) = exp(-t^2 / 2) R(t) and
 * R(t) = erfcx(t / sqrt(2)) / 2 = P(t) / Q(t) (degrees 6 and 7, a weighted least-squares
 * fit iterated towards minimax on [0, 16]: relative error below 1.4e-9). x comes from a
 * float32, so t^2 / 2 is exact: no rounding of the argument of exp to amplify (the
 * reason float64 data take Cody's erfc instead). Beyond t = 16 the result is below the
 * float32 range and R(16) stands in. With exp's 4e-9 the value before the final
 * rounding to float32 is within 6e-9 relative: gelu within 1 ulp. */
CN_VINLINE cn_vd cn_phi_f32(cn_vd x) {
    cn_vd t = cn_fabs(x), tc = cn_sel(t < CN_SPLAT(16.0), t, CN_SPLAT(16.0)), n, d, q;
    n = CN_SPLAT(1.932397601795365e-06) * tc;
    d = CN_SPLAT(4.842918685435591e-06) * tc;
    n = (n + CN_SPLAT(-9.959629391976482e-05)) * tc;
    d = (d + CN_SPLAT(-0.0002495842810776981)) * tc;
    n = (n + CN_SPLAT(0.0021425825825464604)) * tc;
    d = (d + CN_SPLAT(0.005373291891079799)) * tc;
    n = (n + CN_SPLAT(0.029155705823689395)) * tc;
    d = (d + CN_SPLAT(0.07287583340523476)) * tc;
    n = (n + CN_SPLAT(0.15103019027451245)) * tc;
    d = (d + CN_SPLAT(0.38338692885918324)) * tc;
    n = (n + CN_SPLAT(0.3953834737554378)) * tc;
    d = (d + CN_SPLAT(1.0696196011012427)) * tc;
    n = n + CN_SPLAT(0.5000000006977866);
    d = (d + CN_SPLAT(1.5886516175012197)) * tc;
    d = d + CN_SPLAT(1.0);
    q = cn_exp((t * t) * CN_SPLAT(-0.5), 0) * (n / d);   /* Phi(-t) */
    return cn_sel(x >= CN_ZERO, CN_SPLAT(1.0) - q, q);
}

CN_VINLINE cn_vd cn_gelu8(cn_vd x, int full) {
    cn_vd y;
    if (full) {
        cn_vd z = x * CN_SPLAT(-CN_INV_SQRT2);
        y = CN_SPLAT(0.5) * x * cn_erfc(z, cn_exp_negsq(cn_fabs(z), full));
    } else {
        y = x * cn_phi_f32(x);
    }
    return cn_at_neg_inf(x, y);
}

/* gelu'(x) = Phi(x) + x phi(x) crosses zero near x = -0.75, where the two terms cancel:
 * there only an erfc accurate far beyond float32 (Cody's) keeps the result within
 * 2 ulp, so the derivative takes it for every dtype. */
CN_VINLINE cn_vd cn_gelu_grad8(cn_vd x, int full) {
    cn_vd z = x * CN_SPLAT(-CN_INV_SQRT2);
    cn_vd ez = cn_exp_negsq(cn_fabs(z), full);
    cn_vd d = CN_SPLAT(0.5) * cn_erfc(z, ez) + x * (ez * CN_SPLAT(CN_INV_SQRT_2PI));
    return cn_grad_at_inf(x, d);
}

/* gelu_tanh(x) = x / 2 (1 + tanh(u)) = x sigmoid(2u), 2u = K (x + A x^3) */
CN_VINLINE cn_vd cn_gelu_tanh8(cn_vd x, int full) {
    cn_vd u2 = CN_SPLAT(CN_GT_K) * (x + CN_SPLAT(CN_GT_A) * (x * x * x));
    cn_vd t, p, y;
    cn_sigmoid_parts(u2, full, &t, &p);
    y = x * cn_sel(u2 >= CN_ZERO, p, t * p);
    return cn_at_neg_inf(x, y);
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
 * without conversions: silu(x) = x / (1 + E), E = exp(-x) = 2^n (1 + p), |r| <= ln2 / 2
 * and p = e^r - 1 never added to 1 on its own.
 *
 * The core (x >= -87, NaN and +inf included; nearly every vector of real data): with
 * u = 2^n (n <= 126, normal), d = (1 + u) + u p and silu(x) = x / d, every value normal.
 * The tails (x < -87, where E overflows and the result goes subnormal, then to -0): with
 * k = max(n, 0), 1 + E = 2^k d', d' = 2^-k + 2^(n-k) (1 + p), every term of d' in range
 * for any x (2^-k and 2^(n-k) are 1 or below), and silu(x) = (x / d') 2^-k, the scaling
 * last (exact, or the one rounding of a subnormal result). In the core both are the
 * same roundings up to exact powers of 2. A vector takes the tail formula only when one
 * of its lanes is in the tails, and then only for those lanes: a lane's bits never
 * depend on its neighbours. Three roundings (d, the quotient, p's last add) and p's
 * truncation (< 1e-8): within 2 ulp of the correctly rounded result (the sweep in
 * tests/test_activations.py measures 1 ulp). Also exact: silu(x) = x for x > 87, -0 for
 * x < -120. */

#define CN_FSPLAT(c) ((cn_vf){CN_FLANES(c)})
#define CN_IZERO ((cn_vi){0})
#define CN_SILU_CORE_LO (-87.0f)

CN_VINLINE cn_vf cn_self(cn_vi m, cn_vf a, cn_vf b) {
    return (cn_vf)(((cn_vi)a & m) | ((cn_vi)b & ~m));
}

/* v clamped to [lo, hi] lane by lane (NaN passes: its comparisons are false) */
CN_VINLINE cn_vf cn_clampf(cn_vf v, float lo, float hi) {
    v = cn_self(v < CN_FSPLAT(lo), CN_FSPLAT(lo), v);
    return cn_self(v > CN_FSPLAT(hi), CN_FSPLAT(hi), v);
}

/* whether any lane of x is below lo (NaN is not) */
CN_VINLINE int cn_any_below(cn_vf x, float lo) {
#if defined(__AVX512F__)
    if (sizeof(cn_vf) == sizeof(__m512)) {  /* one compare into a mask register */
        __m512 v;
        memcpy(&v, &x, sizeof x);
        return _mm512_cmp_ps_mask(v, _mm512_set1_ps(lo), _CMP_LT_OQ) != 0;
    }
#endif
    {
        cn_vi m = x < CN_FSPLAT(lo);
        unsigned long long w[sizeof(cn_vi) / 8], acc = 0;
        size_t j;
        memcpy(w, &m, sizeof w);
        for (j = 0; j < sizeof(cn_vi) / 8; j++) acc |= w[j];
        return acc != 0;
    }
}

/* 2^j for integer lanes j in [-126, 127] */
CN_VINLINE cn_vf cn_pow2f(cn_vi j) {
    return (cn_vf)((j + 127) << 23);
}

/* exp(-x) = 2^n (1 + p) for x in [-120, 120]: -x = n ln2 + r, |r| <= ln2 / 2 (and a
 * rounding), p = e^r - 1 = r + r^2 q(r), q of degree 4 fitted to (e^r - 1 - r) / r^2
 * (weighted minimax; with its coefficients rounded to float32, 1 + p is within 4.3e-9
 * relative of e^r before the float32 roundings). Written in s = -r = (x + n hi) + n lo
 * so that -x is never formed: every step is the negation of the one in r (rounding is
 * symmetric), p = s^2 Q(s) - s with Q(s) = q(-s), the same bits. */
CN_VINLINE cn_vf cn_expm1_neg16(cn_vf x, cn_vi* n) {
    const cn_vf magic = CN_FSPLAT(12582912.0f); /* 1.5 * 2^23: round to integer */
    cn_vf kf = x * CN_FSPLAT(-1.44269504f) + magic, nf = kf - magic, s, q;
    *n = (cn_vi)kf - (cn_vi)magic;
    /* ln2 = 0.693359375 (9 bits: nf * hi exact) - 2.12194440e-4 */
    s = (x + nf * CN_FSPLAT(0.693359375f)) + nf * CN_FSPLAT(-2.12194440e-4f);
    q = CN_FSPLAT(1.38142065e-3f);
    q = q * s - CN_FSPLAT(8.36882554e-3f);
    q = q * s + CN_FSPLAT(4.16684002e-2f);
    q = q * s - CN_FSPLAT(1.66665196e-1f);
    q = q * s + CN_FSPLAT(4.99999940e-1f);
    return (s * s) * q - s;
}

/* the core: d = 1 + exp(-x) and e = exp(-x), for x >= -87 (and x = NaN, +inf) */
CN_VINLINE cn_vf cn_silu_core16(cn_vf x, cn_vf* e) {
    cn_vi n;
    cn_vf p, u;
    x = cn_self(x < CN_FSPLAT(87.0f), x, CN_FSPLAT(87.0f));  /* NaN: 87 (y = NaN still) */
    p = cn_expm1_neg16(x, &n);
    u = cn_pow2f(n);
    *e = u + u * p;
    return (CN_FSPLAT(1.0f) + u) + u * p;
}

/* the tails: the pieces of 1 + exp(-x) = 2^k d: d, u = 2^(n-k), p, and the halves
 * k1 + k2 = k of the final scaling (each 2^-k1, 2^-k2 normal); any x */
CN_VINLINE void cn_silu_tail_parts16(cn_vf x, cn_vf* d, cn_vf* u, cn_vf* p,
                                     cn_vi* k1, cn_vi* k2) {
    cn_vi n, k, kc;
    *p = cn_expm1_neg16(cn_clampf(x, -120.0f, 87.0f), &n);
    k = n & (n > CN_IZERO);                   /* max(n, 0) */
    *u = cn_pow2f(n - k);
    kc = k - ((k - 126) & (k > 126));         /* min(k, 126): 2^-k matters only when small */
    *d = (cn_pow2f(-kc) + *u) + *u * *p;
    *k1 = k >> 1;
    *k2 = k - *k1;
}

CN_VINLINE cn_vf cn_silu_tails16(cn_vf x) {
    cn_vf d, u, p, y;
    cn_vi k1, k2;
    cn_silu_tail_parts16(x, &d, &u, &p, &k1, &k2);
    y = ((x / d) * cn_pow2f(-k1)) * cn_pow2f(-k2);
    return cn_self(x < CN_FSPLAT(-120.0f), CN_FSPLAT(-0.0f), y);
}

CN_VINLINE cn_vf cn_silu16(cn_vf x) {
    cn_vf e, y = x / cn_silu_core16(x, &e);
    if (cn_any_below(x, CN_SILU_CORE_LO))
        y = cn_self(x < CN_FSPLAT(CN_SILU_CORE_LO), cn_silu_tails16(x), y);
    return y;
}

/* silu of two vectors, each lane as cn_silu16: their long dependency chains interleave
 * (about 7% faster on AVX-512) */
CN_VINLINE void cn_silu16x2(cn_vf* v, cn_vf* w) {
    cn_vf e, x1 = *v, x2 = *w;
    cn_vf y1 = x1 / cn_silu_core16(x1, &e), y2 = x2 / cn_silu_core16(x2, &e);
    if (cn_any_below(x1, CN_SILU_CORE_LO) | cn_any_below(x2, CN_SILU_CORE_LO)) {
        y1 = cn_silu16(x1);
        y2 = cn_silu16(x2);
    }
    *v = y1;
    *w = y2;
}

/* silu'(x) = s (1 + x (1 - s)), s = sigmoid(x) = 1 / d, 1 - s = e / d (core; tails:
 * s = 2^-k / d, 1 - s = u (1 + p) / d, scaled by 2^-k last so that a subnormal result is
 * rounded once); within a few float32 roundings of the size of the terms,
 * s (1 + |x| (1 - s)) */
CN_VINLINE cn_vf cn_silu_grad_tails16(cn_vf x) {
    cn_vf d, u, p, inv, g;
    cn_vi k1, k2;
    cn_silu_tail_parts16(x, &d, &u, &p, &k1, &k2);
    inv = CN_FSPLAT(1.0f) / d;
    g = inv * (CN_FSPLAT(1.0f) + x * ((u + u * p) * inv));
    g = (g * cn_pow2f(-k1)) * cn_pow2f(-k2);
    g = cn_self(x > CN_FSPLAT(87.0f), CN_FSPLAT(1.0f), g);
    return cn_self(x < CN_FSPLAT(-120.0f), CN_FSPLAT(0.0f), g);
}

CN_VINLINE cn_vf cn_silu_grad16(cn_vf x) {
    cn_vf e, inv = CN_FSPLAT(1.0f) / cn_silu_core16(x, &e), g;
    g = inv * (CN_FSPLAT(1.0f) + x * (e * inv));
    g = cn_self(x > CN_FSPLAT(87.0f), CN_FSPLAT(1.0f), g);
    if (cn_any_below(x, CN_SILU_CORE_LO))
        g = cn_self(x < CN_FSPLAT(CN_SILU_CORE_LO), cn_silu_grad_tails16(x), g);
    return g;
}

/* relu on float32 lanes: exact, so the same bits as through float64 */
CN_VINLINE cn_vf cn_relu16(cn_vf x) {
    return cn_self((x > CN_FSPLAT(0.0f)) | (x != x), x, CN_FSPLAT(0.0f));
}

CN_VINLINE cn_vf cn_relu_grad16(cn_vf x) {
    cn_vf one = CN_FSPLAT(1.0f), zero = CN_FSPLAT(0.0f);
    return cn_self(x != x, x, cn_self(x > zero, one, zero));
}

/* ---- runs ----------------------------------------------------------------------------
 * Elements [i, e) in chunks of W lanes; the last partial chunk is padded with zeros and
 * computed the same way (a lane's bits never depend on its position). BODY sees the
 * chunk at i with m valid elements (m == W, a constant, in the loop). */

#define CN_PLOAD(v, src, m)                                                            \
    do {                                                                               \
        memset(&(v), 0, sizeof(v));                                                    \
        memcpy(&(v), (src), (size_t)(m) * sizeof(*(src)));                             \
    } while (0)

#define CN_PSTORE(dst, v, m) memcpy((dst), &(v), (size_t)(m) * sizeof(*(dst)))

/* the same for float32 lanes of any storage (_lanes.h's loaders): m (<= the lanes)
 * elements widened into a cn_vf (CN_FW lanes) or a cn_vh (CN_DW lanes), the rest 0;
 * and the first m lanes narrowed and stored. A full chunk (m a constant equal to the
 * lanes) is one load or store in registers. */
CN_VINLINE cn_vf cn_ploadf_f32(const float* p, ptrdiff_t m) {
    cn_vf v;
    CN_PLOAD(v, p, m);
    return v;
}

CN_VINLINE cn_vh cn_ploadh_f32(const float* p, ptrdiff_t m) {
    cn_vh v;
    CN_PLOAD(v, p, m);
    return v;
}

CN_VINLINE void cn_pstoref_f32(float* p, cn_vf v, ptrdiff_t m) { CN_PSTORE(p, v, m); }
CN_VINLINE void cn_pstoreh_f32(float* p, cn_vh v, ptrdiff_t m) { CN_PSTORE(p, v, m); }

#define CN_LOWP_PADDED(T, NAME)                                                        \
    CN_VINLINE cn_vf cn_ploadf_##NAME(const T* p, ptrdiff_t m) {                       \
        T b[CN_FW];                                                                    \
        if (m == CN_FW) return cn_loadf_##NAME(p);                                     \
        memset(b, 0, sizeof b);                                                        \
        memcpy(b, p, (size_t)m * sizeof(T));                                           \
        return cn_loadf_##NAME(b);                                                     \
    }                                                                                  \
    CN_VINLINE cn_vh cn_ploadh_##NAME(const T* p, ptrdiff_t m) {                       \
        T b[CN_DW];                                                                    \
        if (m < CN_DW) {                                                               \
            memset(b, 0, sizeof b);                                                    \
            memcpy(b, p, (size_t)m * sizeof(T));                                       \
            p = b;                                                                     \
        }                                                                              \
        return cn_narrow_h(cn_load_##NAME(p)); /* exact */                             \
    }                                                                                  \
    CN_VINLINE void cn_pstoref_##NAME(T* p, cn_vf v, ptrdiff_t m) {                    \
        T b[CN_FW];                                                                    \
        if (m == CN_FW) {                                                              \
            cn_storef_##NAME(p, v);                                                    \
            return;                                                                    \
        }                                                                              \
        cn_storef_##NAME(b, v);                                                        \
        memcpy(p, b, (size_t)m * sizeof(T));                                           \
    }                                                                                  \
    CN_VINLINE void cn_pstoreh_##NAME(T* p, cn_vh v, ptrdiff_t m) {                    \
        T b[CN_FW];                                                                    \
        cn_vf f = {0};                                                                 \
        memcpy(&f, &v, sizeof v);                                                      \
        cn_storef_##NAME(b, f);                                                        \
        memcpy(p, b, (size_t)m * sizeof(T));                                           \
    }

CN_LOWP_PADDED(cn_f16, f16)
CN_LOWP_PADDED(cn_bf16, bf16)

#define CN_PADDED_(OP, p)                                                              \
    _Generic((p), const float*: cn_##OP##_f32, float*: cn_##OP##_f32,                  \
             const cn_f16*: cn_##OP##_f16, cn_f16*: cn_##OP##_f16,                     \
             const cn_bf16*: cn_##OP##_bf16, cn_bf16*: cn_##OP##_bf16)
#define CN_PLOADF(p, m) CN_PADDED_(ploadf, p)((p), (m))
#define CN_PLOADH(p, m) CN_PADDED_(ploadh, p)((p), (m))
#define CN_PSTOREF(p, v, m) CN_PADDED_(pstoref, p)((p), (v), (m))
#define CN_PSTOREH(p, v, m) CN_PADDED_(pstoreh, p)((p), (v), (m))

#define CN_CHUNKS(W, BODY)                                                             \
    for (; i + (W) <= e; i += (W)) {                                                   \
        const ptrdiff_t m = (W);                                                       \
        BODY                                                                           \
    }                                                                                  \
    if (i < e) {                                                                       \
        const ptrdiff_t m = e - i;                                                     \
        BODY                                                                           \
        i = e;                                                                         \
    }

/* the forward's float32 affine, operation for operation as _common.pxd's _affine_span */
#define CN_AFFINE(v) (((((v) - mh) - ml) * rf) * wf + t)

/* y = act(v) (v = a, or v = affine(a) when aff): silu and relu in float32 lanes, the
 * others in float64 lanes rounded once on the store. Where v is NaN the result is
 * v's own NaN: an operation on two NaNs returns the one the compiler happened to put
 * first, which differs between instruction sets (silu16 and relu16 never meet two) */
#define CN_ACT16_BODY(F)                                                               \
    { cn_vf v = CN_PLOADF(a + i, m); if (aff) v = CN_AFFINE(v);                      \
      v = F(v); CN_PSTOREF(y + i, v, m); }
#define CN_SILU32_BODY(F)                                                              \
    { cn_vf v, w = CN_FSPLAT(0.0f); const ptrdiff_t m1 = m < CN_FW ? m : CN_FW, m2 = m - m1; \
      v = CN_PLOADF(a + i, m1); if (m2 > 0) w = CN_PLOADF(a + i + CN_FW, m2);            \
      if (aff) { v = CN_AFFINE(v); w = CN_AFFINE(w); }                                 \
      F(&v, &w); CN_PSTOREF(y + i, v, m1); if (m2 > 0) CN_PSTOREF(y + i + CN_FW, w, m2); }
#define CN_ACT8_BODY(F)                                                                \
    { cn_vh v = CN_PLOADH(a + i, m); cn_vd u; if (aff) v = CN_AFFINE(v);             \
      u = cn_widen_h(v); u = cn_sel(u != u, u, F(u, 0));                               \
      v = cn_narrow_h(u); CN_PSTOREH(y + i, v, m); }
/* g = dy * act'(v); the others: the product in float64, rounded once */
#define CN_GRAD16_BODY(F)                                                              \
    { cn_vf v = CN_PLOADF(a + i, m), w = CN_PLOADF(dy + i, m);                        \
      if (aff) v = CN_AFFINE(v); v = cn_self(v != v, v, w * F(v));                     \
      CN_PSTOREF(g + i, v, m); }
#define CN_GRAD8_BODY(F)                                                               \
    { cn_vh v = CN_PLOADH(a + i, m), w = CN_PLOADH(dy + i, m); cn_vd u;               \
      if (aff) v = CN_AFFINE(v);                                                       \
      u = cn_widen_h(v); u = cn_sel(u != u, u, cn_widen_h(w) * F(u, 0));               \
      v = cn_narrow_h(u); CN_PSTOREH(g + i, v, m); }
#define CN_ACT64_BODY(F)                                                               \
    { cn_vd v; CN_PLOAD(v, a + i, m); v = cn_sel(v != v, v, F(v, 1));                 \
      CN_PSTORE(y + i, v, m); }
#define CN_GRAD64_BODY(F)                                                              \
    { cn_vd v, w; CN_PLOAD(v, a + i, m); CN_PLOAD(w, dy + i, m);                      \
      v = cn_sel(v != v, v, w * F(v, 1)); CN_PSTORE(g + i, v, m); }

/* elements before p + i is 64-byte aligned (at most n): run on their own, so that the
 * vector stores do not split cache lines */
static inline ptrdiff_t cn_aligned_head(const void* p, ptrdiff_t n, ptrdiff_t size) {
    ptrdiff_t h = (ptrdiff_t)((-(size_t)p) & 63) / size;
    return h < n ? h : n;
}

/* the two spans (the unaligned head, the rest) with one chunk loop per function, the
 * function chosen by a switch before the loops */
#define CN_SPANS(OUT, BS, WS, B16, W16, B8, SILU, GELU, GELU_TANH, RELU)            \
    ptrdiff_t i = 0, e = cn_aligned_head(OUT, n, sizeof(*(OUT))), pass;                \
    for (pass = 0; pass < 2; pass++, e = n) {                                          \
        switch (act) {                                                                 \
        case CN_ACT_SILU: CN_CHUNKS(WS, BS(SILU)) break;                               \
        case CN_ACT_GELU: CN_CHUNKS(CN_DW, B8(GELU)) break;                                \
        case CN_ACT_GELU_TANH: CN_CHUNKS(CN_DW, B8(GELU_TANH)) break;                      \
        case CN_ACT_RELU: CN_CHUNKS(W16, B16(RELU)) break;                             \
        default: i = e; break;                                                         \
        }                                                                              \
    }

/* the loops over float32 lanes, once per storage: a and y (forward), a, dy and g
 * (backward) of the types TA, TY / TA, TD, TG */
#define CN_ACT_IMPL_DEF(TA, TY, NAME)                                                  \
    CN_VINLINE void cn_act_##NAME##_impl(const TA* a, TY* y, ptrdiff_t n, int act,     \
                                         int aff, float mh, float ml, float rf,        \
                                         float wf, float t) {                          \
        CN_SPANS(y, CN_SILU32_BODY, 2 * CN_FW, CN_ACT16_BODY, CN_FW, CN_ACT8_BODY,     \
                 cn_silu16x2, cn_gelu8, cn_gelu_tanh8, cn_relu16)                      \
    }
#define CN_ACT_GRAD_IMPL_DEF(TA, TD, TG, NAME)                                         \
    CN_VINLINE void cn_act_grad_##NAME##_impl(const TA* a, const TD* dy, TG* g,        \
                                              ptrdiff_t n, int act, int aff, float mh, \
                                              float ml, float rf, float wf, float t) { \
        if (act == CN_ACT_NONE) {                                                      \
            if (sizeof(TD) == sizeof(TG)) {                                            \
                if ((const void*)g != (const void*)dy)                                 \
                    memmove(g, dy, (size_t)n * sizeof(TG));                            \
            } else {                                                                   \
                for (ptrdiff_t k = 0; k < n; k++) g[k] = CN_LD1(dy[k]);                \
            }                                                                          \
            return;                                                                    \
        }                                                                              \
        {                                                                              \
            CN_SPANS(g, CN_GRAD16_BODY, CN_FW, CN_GRAD16_BODY, CN_FW, CN_GRAD8_BODY,   \
                     cn_silu_grad16, cn_gelu_grad8, cn_gelu_tanh_grad8, cn_relu_grad16) \
        }                                                                              \
    }

CN_ACT_IMPL_DEF(float, float, f32)
CN_ACT_IMPL_DEF(cn_f16, cn_f16, f16)
CN_ACT_IMPL_DEF(cn_bf16, cn_bf16, bf16)
CN_ACT_GRAD_IMPL_DEF(float, float, float, f32)
/* 16-bit x and dy, g kept in float32 (the backward's sums and dx read it) */
CN_ACT_GRAD_IMPL_DEF(cn_f16, cn_f16, float, f16)
CN_ACT_GRAD_IMPL_DEF(cn_bf16, cn_bf16, float, bf16)

/* y = act(a) over n elements; y may be a. act = CN_ACT_NONE: nothing (y untouched). */
static inline void cn_act_f32(const float* a, float* y, ptrdiff_t n, int act) {
    cn_act_f32_impl(a, y, n, act, 0, 0, 0, 0, 0, 0);
}

/* y = act(((a - mh) - ml) * rf * wf + t): the float32 affine and the activation in one
 * pass, a read once; the affine's bits are those of affine_const (_common.pxd). y may
 * be a. */
static inline void cn_affine_act_f32(const float* a, float* y, ptrdiff_t n, float mh,
                                     float ml, float rf, float wf, float t, int act) {
    cn_act_f32_impl(a, y, n, act, 1, mh, ml, rf, wf, t);
}

static inline void cn_act_f64(const double* a, double* y, ptrdiff_t n, int act) {
    CN_SPANS(y, CN_ACT64_BODY, CN_DW, CN_ACT64_BODY, CN_DW, CN_ACT64_BODY, cn_silu8, cn_gelu8,
             cn_gelu_tanh8, cn_relu8)
}

/* g = dy * act'(a) over n elements; g may be a or dy. act = CN_ACT_NONE: g = dy. */
static inline void cn_act_grad_f32(const float* a, const float* dy, float* g, ptrdiff_t n,
                                   int act) {
    cn_act_grad_f32_impl(a, dy, g, n, act, 0, 0, 0, 0, 0, 0);
}

/* g = dy * act'(((a - mh) - ml) * rf * wf + t), the pre-activation recomputed with the
 * forward's own affine (the same bits); g may be dy (not a). */
static inline void cn_affine_act_grad_f32(const float* a, const float* dy, float* g,
                                          ptrdiff_t n, float mh, float ml, float rf,
                                          float wf, float t, int act) {
    cn_act_grad_f32_impl(a, dy, g, n, act, 1, mh, ml, rf, wf, t);
}

static inline void cn_act_grad_f64(const double* a, const double* dy, double* g,
                                   ptrdiff_t n, int act) {
    if (act == CN_ACT_NONE) {
        if (g != dy) memmove(g, dy, (size_t)n * sizeof(double));
        return;
    }
    {
        CN_SPANS(g, CN_GRAD64_BODY, CN_DW, CN_GRAD64_BODY, CN_DW, CN_GRAD64_BODY, cn_silu_grad8,
                 cn_gelu_grad8, cn_gelu_tanh_grad8, cn_relu_grad8)
    }
}

/* ---- 16-bit storage ------------------------------------------------------------------
 * The same loops on float16/bfloat16 data, widened in registers (exact) and rounded
 * once on the store: the float32 path's bits on the widened values.
 * cn_affine_act_T:       y = act(affine(x)), as cn_affine_act_f32.
 * cn_act_grad_sums_T:    with g = dy * act'(affine(x)) in float32 (never rounded to 16
 *                        bits), *sdy += sum(g), *sdyx += sum(g * (x - m)): the lanes
 *                        and order of cn_grad_sums_f32 over the whole run of g.
 * cn_act_grad_dx_T:      dx = ((wf * g - gf) - (((x - mh) - ml) * rf) * kf) * rf with g
 *                        recomputed likewise (dx may be x or dy).
 * g is formed CN_ACT_STAGE values at a time into an L1 buffer, so the backward keeps
 * no float32 copy of dy; it is computed twice (sums, then dx), which costs less than
 * writing and reading it back. */

#define CN_ACT_STAGE 512 /* a multiple of 16: the lanes continue across stages */

#define CN_LOWP_ACT_DEFS(T, NAME)                                                      \
    static inline void cn_affine_act_##NAME(const T* a, T* y, ptrdiff_t n, float mh,  \
                                            float ml, float rf, float wf, float t,    \
                                            int act) {                                \
        cn_act_##NAME##_impl(a, y, n, act, 1, mh, ml, rf, wf, t);                      \
    }                                                                                  \
    static inline void cn_act_grad_sums_##NAME(const T* x, const T* dy, ptrdiff_t n,   \
                                               float mh, float ml, float rf, float wf, \
                                               float t, int act, double m, double* sdy, \
                                               double* sdyx) {                         \
        float gb[CN_ACT_STAGE];                                                        \
        CN_LANES(a);                                                                   \
        CN_LANES(b);                                                                   \
        cn_vd g;                                                                       \
        double at = 0, bt = 0, gt;                                                     \
        for (ptrdiff_t i0 = 0; i0 < n; i0 += CN_ACT_STAGE) {                           \
            ptrdiff_t e = n - i0 < CN_ACT_STAGE ? n - i0 : CN_ACT_STAGE, i = 0;        \
            const T* xs = x + i0;                                                      \
            cn_act_grad_##NAME##_impl(xs, dy + i0, gb, e, act, 1, mh, ml, rf, wf, t);  \
            for (; i + 16 <= e; i += 16) {                                             \
                CN_EACH(j) {                                                           \
                    g = cn_load_f32(gb + i + CN_DW * j);                               \
                    a[j] += g;                                                         \
                    b[j] += g * (CN_LD(xs + i + CN_DW * j) - m);                       \
                }                                                                      \
            }                                                                          \
            for (; i < e; i++) { gt = gb[i]; at += gt; bt += gt * (CN_LD1(xs[i]) - m); } \
        }                                                                              \
        *sdy += cn_total(a) + at;                                                      \
        *sdyx += cn_total(b) + bt;                                                     \
    }                                                                                  \
    static inline void cn_act_grad_dx_##NAME(const T* x, const T* dy, T* dx,           \
                                             ptrdiff_t n, float mh, float ml, float rf, \
                                             float wf, float t, int act, float gf,     \
                                             float kf) {                               \
        float gb[CN_ACT_STAGE];                                                        \
        for (ptrdiff_t i0 = 0; i0 < n; i0 += CN_ACT_STAGE) {                           \
            ptrdiff_t e = n - i0 < CN_ACT_STAGE ? n - i0 : CN_ACT_STAGE, i = 0;        \
            const T* xs = x + i0;                                                      \
            T* ds = dx + i0;                                                           \
            cn_act_grad_##NAME##_impl(xs, dy + i0, gb, e, act, 1, mh, ml, rf, wf, t);  \
            for (; i + CN_FW <= e; i += CN_FW)                                         \
                CN_STF(ds + i, ((wf * cn_loadf(gb + i) - gf) -                         \
                                (((CN_LDF(xs + i) - mh) - ml) * rf) * kf) * rf);       \
            for (; i < e; i++)                                                         \
                CN_ST1(ds + i, ((wf * gb[i] - gf) -                                    \
                                (((CN_LD1(xs[i]) - mh) - ml) * rf) * kf) * rf);        \
        }                                                                              \
    }

CN_LOWP_ACT_DEFS(cn_f16, f16)
CN_LOWP_ACT_DEFS(cn_bf16, bf16)

#endif
