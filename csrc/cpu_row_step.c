/* Single-sweep CPU row step (the RowStep contract of qadapter_kernels/chunked.py), plain C11.
 *
 * Per row, one sweep over memory in blocks of BLOCK elements: read z and q once, keep online
 * (max, sum) for z and for c = (q + alpha_0 z) / alpha~, write e = exp(c - block max) into the
 * output and remember each block's max; then a second pass over that row (still in L2) scales
 * each block by exp(block max - row max) / sum. Rows run in parallel with OpenMP.
 *
 * The two exps per element bound the step (a core does not reach memory speed on exps). The
 * portable exp is a branch-free polynomial so that gcc -O3 vectorises the inner loops without
 * -ffast-math, which would break the -inf logits of masked vocabulary entries (-fno-trapping-math
 * is needed, and is enough, for its compares to become vector selects). Where the compiler
 * targets AVX-512 (-march=native on such a CPU) the block loops are written with its intrinsics:
 * exp(x - m) = 2^(x log2 e - m log2 e), one FMA, then a minimax polynomial of 2^f and scalef for 2^k,
 * with a polynomial one degree shorter for bfloat16, whose results need 8 bits, not 24; and
 * bfloat16 rows are widened 32 at a time without shuffles (split32); the next block's inputs
 * are prefetched while a block computes. bench.report times both versions ("compiled" and
 * "compiled, no AVX-512"), and both are tested against the eager step.
 *
 * Under a soft cap s (Gemma-2's final logit soft-capping) z and q are the raw GEMM outputs: the
 * block's first pass caps both as it reads them, s tanh(x / s) in float32, and keeps the capped z
 * and the cap's slope on q, 1 - (q_capped / s)^2, in two L1-sized block buffers; the second pass
 * reads those instead of the inputs and writes e times the slope, its sums staying those of e
 * (the block statistics are of the policy itself). The uncapped step runs the loops it ran before.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024

static inline float f_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t u_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
/* Ternaries, not fmaxf/fminf: these compile to vmaxps/vminps (fmaxf's NaN rules keep it a call). */
static inline float max_f(float a, float b) { return a > b ? a : b; }
static inline float bf16_to_f(uint16_t h) { return f_of((uint32_t)h << 16); }
static inline uint16_t f_to_bf16(float f) {  /* round to nearest even; p is finite here */
    uint32_t u = u_of(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* expf after Cephes: x = k ln2 + r, |r| <= ln2/2, a degree-6 polynomial (about 2 ulp; the row step
 * is bound by these exps, so the term that bought the last ulp is left out). Below -87 the result
 * is 0 rather than a subnormal: an exp(x - row max) that small is a probability below 1e-38, and
 * -inf (masked vocabulary entries) gives exactly 0. */
static inline float vexp(float x) {
    const int under = x < -87.0f;
    x = x < -87.0f ? -87.0f : x > 88.7f ? 88.7f : x;
    const float shifter = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + shifter;
    int32_t k = (int32_t)(u_of(t) - u_of(shifter));
    float kf = t - shifter;
    float r = x - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    float y = 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    y = y * f_of((uint32_t)(k + 127) << 23);
    return under ? 0.0f : y;
}

/* tanhf after Cephes: below |y| = 0.625 an odd polynomial (0.1 ulp), above (1 - e) / (1 + e) with
 * e = exp(-2|y|) (the exp's 2 ulp); +-inf give +-1, NaN stays NaN. Branch-free, so it vectorises.
 * With slope, 1 - tanh^2 into it: above 0.625 as 4 e / (1 + e)^2, not 1 - tanh^2, which near
 * |tanh| = 1 would keep only the few bits of tanh's rounding error it does not cancel. */
static const float TANH_POLY[5] = {-5.70498872745e-3f, 2.06390887954e-2f, -5.37397155531e-2f, 1.33314422036e-1f,
                                   -3.33332819422e-1f};
static const float TANH_SMALL = 0.625f;
static inline float vtanh(float y, float *slope) {
    const float a = y < 0.0f ? -y : y, a2 = a * a;
    const float e = vexp(-2.0f * a), inv = 1.0f / (1.0f + e);
    float r = TANH_POLY[0];
    for (int j = 1; j < 5; j++) r = r * a2 + TANH_POLY[j];
    const float small = r * a2 * a + a;
    const float t = a < TANH_SMALL ? small : (1.0f - e) * inv;
    *slope = a < TANH_SMALL ? 1.0f - small * small : 4.0f * e * inv * inv;
    return y < 0.0f ? -t : t;
}

/* One block of a row: c = (q + alpha_0 z) / alpha~ written to eb as exp(c - m_c), and for z and for
 * c the point m its exps are relative to (the block's max, or within a float rounding of it) and
 * their sum. z and q are float32 or (bf16 = 1) bfloat16 rows. eb may alias q (p aliases q): each
 * element is read before it is written. An all -inf block shifts by 0: its exps are 0, never NaN. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* 2^x of 16 floats x <= 0 (-inf gives 0: reduce takes it to 0, scalef by 2^-inf to 0, so no clamp
 * is needed): f = x - floor(x) in [0, 1) in one instruction (reduce), a minimax polynomial of 2^f, and scalef multiplies by 2^floor(x) itself
 * (subnormals and underflow to 0 included). Degree 5 errs by 1.6e-7 (about 1 ulp) for float32
 * results; degree 4 by 2.7e-6, far below bfloat16's 3.9e-3 ulp, and one FMA shorter: the step is
 * bound by these exps. */
static inline __m512 exp2_16(__m512 x, const int bf16) {
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 y;
    if (bf16) {
        y = _mm512_set1_ps(1.3534167783e-02f);
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.2011462260e-02f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4144275477e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9300383525e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000025933e+00f));
    } else {
        y = _mm512_set1_ps(1.8775766620e-03f);
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(8.9893402828e-03f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5826317720e-02f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4015361724e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9315307316e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.9999992507e-01f));
    }
    return _mm512_scalef_ps(y, x);
}

/* The loops below run whole groups with plain loads and stores and the row's last, partial group
 * with masked ones (padding lanes read -inf): `full` is a constant where a group body is inlined. */
static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }
static inline __mmask32 lanes32(int64_t left) { return left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1); }

ALWAYS_INLINE __m512 load16(const float *p, int64_t left, const int full) {
    return full ? _mm512_loadu_ps(p) : _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes(left), p);
}
ALWAYS_INLINE void store16(float *p, int64_t left, __m512 x, const int full) {
    if (full)
        _mm512_storeu_ps(p, x);
    else
        _mm512_mask_storeu_ps(p, lanes(left), x);
}

/* exp(x - h) = 2^(x k - h k), with k = log2 e for z and log2 e / alpha~ for u = q + alpha_0 z (then
 * x - h is in units of c = u / alpha~, `unit` = 1 / alpha~): the shift folds into one FMA. h k is
 * rounded to float, so the block reports the point its exps are exactly relative to, in double: the
 * rounding costs no accuracy. An all -inf block shifts by 0 and reports -inf. */
static const float LOG2E = 1.44269504088896341f;
static inline __m512 log2_shift(float h, float k, double unit, double *point) {
    const float shift = h == -INFINITY ? 0.0f : h * k;
    *point = h == -INFINITY ? -INFINITY : (double)shift / k * unit;
    return _mm512_set1_ps(shift);
}

/* Asks for the cache line `bytes` past p, where the next block's inputs are: the first pass of a block
 * waits on memory and the second computes, so fetching one block ahead during the second overlaps
 * the two (measurably faster in bfloat16). Address arithmetic, not pointer arithmetic:
 * past the last row it points outside the tensor, which a prefetch may. */
static inline void prefetch_ahead(const void *p, size_t bytes) {
    _mm_prefetch((const char *)((uintptr_t)p + bytes), _MM_HINT_T0);
}

/* The constants and running sums of a block's second pass. */
typedef struct { __m512 kz, shz, ku, shu, sz, sc; } Sweep;

static inline Sweep sweep_of(float hz, float hu, float inv_at, double *mz_out, double *mc_out) {
    const float ku = LOG2E * inv_at;
    return (Sweep){_mm512_set1_ps(LOG2E), log2_shift(hz, LOG2E, 1.0, mz_out), _mm512_set1_ps(ku),
                   log2_shift(hu, ku, inv_at, mc_out), _mm512_setzero_ps(), _mm512_setzero_ps()};
}

/* float32 rows, 16 elements per group. Pass 1: u into eb, and the maxima of z and u (max(u, m)
 * keeps m where u is NaN: 0 * -inf in a padding lane when alpha_0 = 0). */
ALWAYS_INLINE void f32_maxima(const float *zr, const float *qr, float *eb, int64_t left, const int full, __m512 a0,
                              __m512 *mz, __m512 *mu) {
    const __m512 z = load16(zr, left, full), u = _mm512_fmadd_ps(a0, z, load16(qr, left, full));
    store16(eb, left, u, full);
    *mz = _mm512_max_ps(z, *mz);
    *mu = _mm512_max_ps(u, *mu);
}

/* Pass 2: eb = exp(c - point c), and the sums of that and of exp(z - point z). */
ALWAYS_INLINE void f32_exps(const float *zr, float *eb, int64_t left, const int full, Sweep *w) {
    const __m512 ec = exp2_16(_mm512_fmsub_ps(load16(eb, left, full), w->ku, w->shu), 0);
    store16(eb, left, ec, full);
    w->sc = _mm512_add_ps(w->sc, ec);
    w->sz = _mm512_add_ps(w->sz, exp2_16(_mm512_fmsub_ps(load16(zr, left, full), w->kz, w->shz), 0));
}

/* bfloat16 rows 32 elements per group, without shuffles: one 512-bit load holds 32 bfloat16, and
 * shifting each 32-bit lane left by 16 gives the even elements as float32, clearing its low half
 * the odd ones. eb keeps that order: per group of `left` <= 32 elements its ceil(left/2) even
 * elements, then its odd ones; scale_block puts them back in order as it writes p. */
static inline int64_t evens(int64_t left) { return left >= 32 ? 16 : (left + 1) / 2; }
static inline int64_t odds(int64_t left) { return left >= 32 ? 16 : left / 2; }

ALWAYS_INLINE void split32(const uint16_t *row, int64_t left, const int full, __m512 *even, __m512 *odd) {
    const __m512i x = full ? _mm512_loadu_si512(row)
                           : _mm512_mask_loadu_epi16(_mm512_set1_epi16((short)0xff80), lanes32(left), row);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
}

ALWAYS_INLINE void bf16_maxima(const uint16_t *zr, const uint16_t *qr, float *eb, int64_t left, const int full,
                               __m512 a0, __m512 *mz, __m512 *mu) {
    __m512 ze, zo, qe, qo;
    split32(zr, left, full, &ze, &zo);
    split32(qr, left, full, &qe, &qo);
    const __m512 ue = _mm512_fmadd_ps(a0, ze, qe), uo = _mm512_fmadd_ps(a0, zo, qo);
    store16(eb, evens(left), ue, full);
    store16(eb + evens(left), odds(left), uo, full);
    *mz = _mm512_max_ps(*mz, _mm512_max_ps(ze, zo));
    *mu = _mm512_max_ps(uo, _mm512_max_ps(ue, *mu));
}

ALWAYS_INLINE void bf16_exps(const uint16_t *zr, float *eb, int64_t left, const int full, Sweep *w) {
    const int64_t h = evens(left);
    const __m512 ee = exp2_16(_mm512_fmsub_ps(load16(eb, h, full), w->ku, w->shu), 1);
    const __m512 eo = exp2_16(_mm512_fmsub_ps(load16(eb + h, odds(left), full), w->ku, w->shu), 1);
    store16(eb, h, ee, full);
    store16(eb + h, odds(left), eo, full);
    w->sc = _mm512_add_ps(w->sc, _mm512_add_ps(ee, eo));
    __m512 ze, zo;
    split32(zr, left, full, &ze, &zo);
    w->sz = _mm512_add_ps(w->sz, _mm512_add_ps(exp2_16(_mm512_fmsub_ps(ze, w->kz, w->shz), 1),
                                               exp2_16(_mm512_fmsub_ps(zo, w->kz, w->shz), 1)));
}

/* Group i of a block, its `left` elements on: a whole group takes the constant-`full` body. */
ALWAYS_INLINE void group_maxima(const void *zr, const void *qr, float *eb, int64_t i, int64_t left, const int bf16,
                                __m512 a0, __m512 *mz, __m512 *mu) {
    if (bf16) {
        const uint16_t *z = (const uint16_t *)zr + i, *q = (const uint16_t *)qr + i;
        if (left >= 32)
            bf16_maxima(z, q, eb + i, 32, 1, a0, mz, mu);
        else
            bf16_maxima(z, q, eb + i, left, 0, a0, mz, mu);
    } else {
        const float *z = (const float *)zr + i, *q = (const float *)qr + i;
        if (left >= 16)
            f32_maxima(z, q, eb + i, 16, 1, a0, mz, mu);
        else
            f32_maxima(z, q, eb + i, left, 0, a0, mz, mu);
    }
}

ALWAYS_INLINE void group_exps(const void *zr, float *eb, int64_t i, int64_t left, const int bf16, Sweep *w) {
    if (bf16) {
        if (left >= 32)
            bf16_exps((const uint16_t *)zr + i, eb + i, 32, 1, w);
        else
            bf16_exps((const uint16_t *)zr + i, eb + i, left, 0, w);
    } else {
        if (left >= 16)
            f32_exps((const float *)zr + i, eb + i, 16, 1, w);
        else
            f32_exps((const float *)zr + i, eb + i, left, 0, w);
    }
}

/* Out of line: gcc still makes one copy per dtype (bf16 is a constant at both calls), and inlined
 * into the row loop the bfloat16 step ran slower. */
static __attribute__((noinline)) void block_exps(const void *zr, const void *qr, float *eb, int64_t n, float alpha_0, float inv_at,
                              const int bf16, double *mz_out, double *mc_out, float *sz_out, float *sc_out) {
    const int64_t width = bf16 ? 32 : 16;  /* elements per group: one cache line of each input */
    const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    const __m512 a0 = _mm512_set1_ps(alpha_0);
    __m512 mz = _mm512_set1_ps(-INFINITY), mu = mz;
    for (int64_t i = 0; i < n; i += width) group_maxima(zr, qr, eb, i, n - i, bf16, a0, &mz, &mu);
    Sweep w = sweep_of(_mm512_reduce_max_ps(mz), _mm512_reduce_max_ps(mu), inv_at, mz_out, mc_out);
    for (int64_t i = 0; i < n; i += width) {
        prefetch_ahead((const char *)zr + i * size, BLOCK * size);
        prefetch_ahead((const char *)qr + i * size, BLOCK * size);
        group_exps(zr, eb, i, n - i, bf16, &w);
    }
    *sz_out = _mm512_reduce_add_ps(w.sz), *sc_out = _mm512_reduce_add_ps(w.sc);
}

/* tanh of 16 floats, as vtanh (slope included, when asked for): the polynomial below |y| = 0.625,
 * (1 - e) / (1 + e) with e = exp(-2|y|) = 2^(-2 log2(e) |y|) above (exp2_16 of degree 5), the sign
 * put back. */
ALWAYS_INLINE __m512 tanh_16(__m512 y, __m512 *slope) {
    const __m512 one = _mm512_set1_ps(1.0f), a = _mm512_abs_ps(y), a2 = _mm512_mul_ps(a, a);
    const __m512 e = exp2_16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f * LOG2E)), 0);
    const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
    __m512 r = _mm512_set1_ps(TANH_POLY[0]);
    for (int j = 1; j < 5; j++) r = _mm512_fmadd_ps(r, a2, _mm512_set1_ps(TANH_POLY[j]));
    r = _mm512_fmadd_ps(_mm512_mul_ps(r, a2), a, a);
    const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(TANH_SMALL), _CMP_LT_OQ);
    if (slope)
        *slope = _mm512_mask_blend_ps(small, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(4.0f), e), inv), inv),
                                      _mm512_fnmadd_ps(r, r, one));
    const __m512 t = _mm512_mask_blend_ps(small, _mm512_mul_ps(_mm512_sub_ps(one, e), inv), r);
    return _mm512_or_ps(t, _mm512_and_ps(y, _mm512_set1_ps(-0.0f)));
}

/* The soft cap s and its inverse. */
typedef struct { __m512 s, inv_s; } Cap;

/* s tanh(x / s); with slope, 1 - tanh^2 into it. */
ALWAYS_INLINE __m512 cap_16(__m512 x, const Cap *k, __m512 *slope) {
    return _mm512_mul_ps(tanh_16(_mm512_mul_ps(x, k->inv_s), slope), k->s);
}

/* Pass 1 of a capped group of 16 float32 (from float32 inputs, or half of a bfloat16 group): u into
 * eb, the capped z into zc, the slope into sl, and the maxima. Padding lanes (capped -inf is -s)
 * stay out of the maxima. */
ALWAYS_INLINE void capped_maxima16(__m512 zraw, __m512 qraw, float *eb, float *zc, float *sl, int64_t left,
                                   const int full, __m512 a0, const Cap *k, __m512 *mz, __m512 *mu) {
    __m512 slope;
    const __m512 z = cap_16(zraw, k, NULL), u = _mm512_fmadd_ps(a0, z, cap_16(qraw, k, &slope));
    store16(eb, left, u, full);
    store16(zc, left, z, full);
    store16(sl, left, slope, full);
    if (full) {
        *mz = _mm512_max_ps(z, *mz);
        *mu = _mm512_max_ps(u, *mu);
    } else {
        *mz = _mm512_mask_max_ps(*mz, lanes(left), z, *mz);
        *mu = _mm512_mask_max_ps(*mu, lanes(left), u, *mu);
    }
}

/* A capped group, its `left` elements on, in split32's order for bfloat16 rows (as eb's). */
ALWAYS_INLINE void capped_group(const void *zr, const void *qr, float *eb, float *zc, float *sl, int64_t left,
                                const int full, const int bf16, __m512 a0, const Cap *k, __m512 *mz, __m512 *mu) {
    if (bf16) {
        __m512 ze, zo, qe, qo;
        split32(zr, left, full, &ze, &zo);
        split32(qr, left, full, &qe, &qo);
        const int64_t h = evens(left);
        capped_maxima16(ze, qe, eb, zc, sl, h, full, a0, k, mz, mu);
        capped_maxima16(zo, qo, eb + h, zc + h, sl + h, odds(left), full, a0, k, mz, mu);
    } else {
        capped_maxima16(load16(zr, left, full), load16(qr, left, full), eb, zc, sl, left, full, a0, k, mz, mu);
    }
}

/* Pass 2 of a capped group of 16: eb = exp(c - point c) times the slope; the sums are of the exps. */
ALWAYS_INLINE void capped_exps16(float *eb, const float *zc, const float *sl, int64_t left, const int full,
                                 const int bf16, Sweep *w) {
    const __m512 ec = exp2_16(_mm512_fmsub_ps(load16(eb, left, full), w->ku, w->shu), bf16);
    store16(eb, left, _mm512_mul_ps(ec, load16(sl, left, full)), full);
    w->sc = _mm512_add_ps(w->sc, ec);
    w->sz = _mm512_add_ps(w->sz, exp2_16(_mm512_fmsub_ps(load16(zc, left, full), w->kz, w->shz), bf16));
}

/* block_exps under a soft cap: the same outputs, of the capped logits; eb holds e times the slope. */
static __attribute__((noinline)) void block_exps_capped(const void *zr, const void *qr, float *eb, int64_t n,
                                                        float alpha_0, float inv_at, float softcap, const int bf16,
                                                        double *mz_out, double *mc_out, float *sz_out, float *sc_out) {
    float zc[BLOCK], sl[BLOCK];  /* the block's capped z and slope, in eb's order */
    const int64_t width = bf16 ? 32 : 16;
    const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    const __m512 a0 = _mm512_set1_ps(alpha_0);
    const Cap k = {_mm512_set1_ps(softcap), _mm512_set1_ps(1.0f / softcap)};
    __m512 mz = _mm512_set1_ps(-INFINITY), mu = mz;
    for (int64_t i = 0; i < n; i += width) {
        const void *z = (const char *)zr + i * size, *q = (const char *)qr + i * size;
        if (n - i >= width)
            capped_group(z, q, eb + i, zc + i, sl + i, width, 1, bf16, a0, &k, &mz, &mu);
        else
            capped_group(z, q, eb + i, zc + i, sl + i, n - i, 0, bf16, a0, &k, &mz, &mu);
    }
    Sweep w = sweep_of(_mm512_reduce_max_ps(mz), _mm512_reduce_max_ps(mu), inv_at, mz_out, mc_out);
    for (int64_t i = 0; i < n; i += 16) {
        prefetch_ahead((const char *)zr + i * size, BLOCK * size);
        prefetch_ahead((const char *)qr + i * size, BLOCK * size);
        if (n - i >= 16)
            capped_exps16(eb + i, zc + i, sl + i, 16, 1, bf16, &w);
        else
            capped_exps16(eb + i, zc + i, sl + i, n - i, 0, bf16, &w);
    }
    *sz_out = _mm512_reduce_add_ps(w.sz), *sc_out = _mm512_reduce_add_ps(w.sc);
}

/* Rounds float32 lanes to bfloat16, nearest even (p is finite): the result is each lane's high half. */
static inline __m512i round_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
}

/* 32 float32 (even, odd) as bfloat16 in element order. */
static inline __m512i interleave_bf16(__m512 even, __m512 odd) {
#ifdef __AVX512BF16__
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
#else
    return _mm512_or_si512(_mm512_srli_epi32(round_bf16(even), 16),
                           _mm512_and_si512(round_bf16(odd), _mm512_set1_epi32((int)0xffff0000u)));
#endif
}

ALWAYS_INLINE void scale_group(float *eb, uint16_t *pb, int64_t left, const int full, __m512 s) {
    const int64_t h = evens(left);
    const __m512 e = _mm512_mul_ps(load16(eb, h, full), s), o = _mm512_mul_ps(load16(eb + h, odds(left), full), s);
    if (pb) {
        if (full)
            _mm512_storeu_si512(pb, interleave_bf16(e, o));
        else
            _mm512_mask_storeu_epi16(pb, lanes32(left), interleave_bf16(e, o));
        return;
    }
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    store16(eb, left, _mm512_permutex2var_ps(e, lo, o), full);
    if (left > 16) store16(eb + 16, left - 16, _mm512_permutex2var_ps(e, hi, o), full);
}

/* p = e * scale for one block, float32 in place or (pb) bfloat16; split: eb is in split32's
 * order, put back in element order here. A padding lane reads -inf * scale, never stored. */
static inline void scale_block(float *eb, uint16_t *pb, int64_t n, float scale, const int split) {
    const __m512 s = _mm512_set1_ps(scale);
    if (split) {
        for (int64_t i = 0; i < n; i += 32) {
            if (n - i >= 32)
                scale_group(eb + i, pb ? pb + i : NULL, 32, 1, s);
            else
                scale_group(eb + i, pb ? pb + i : NULL, n - i, 0, s);
        }
        return;
    }
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes(n - i);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, eb + i), s);
        if (pb)
            _mm256_mask_storeu_epi16(pb + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16(x), 16)));
        else
            _mm512_mask_storeu_ps(eb + i, m, x);
    }
}
#else
static inline void block_exps(const void *zraw, const void *qraw, float *eb, int64_t n, float alpha_0,
                              float inv_at, const int bf16, double *mz_out, double *mc_out, float *sz_out,
                              float *sc_out) {
    float zb[BLOCK], qb[BLOCK];
    const float *zr = zraw, *qr = qraw;
    if (bf16) {
        for (int64_t i = 0; i < n; i++) {
            zb[i] = bf16_to_f(((const uint16_t *)zraw)[i]);
            qb[i] = bf16_to_f(((const uint16_t *)qraw)[i]);
        }
        zr = zb, qr = qb;
    }
    float mz = -INFINITY, mc = -INFINITY;
#pragma omp simd reduction(max : mz, mc)
    for (int64_t i = 0; i < n; i++) {
        float c = (qr[i] + alpha_0 * zr[i]) * inv_at;
        eb[i] = c;
        mz = max_f(mz, zr[i]);
        mc = max_f(mc, c);
    }
    const float shz = mz == -INFINITY ? 0.0f : mz, shc = mc == -INFINITY ? 0.0f : mc;
    float sz = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : sz, sc)
    for (int64_t i = 0; i < n; i++) {
        float ec = vexp(eb[i] - shc);
        eb[i] = ec;
        sc += ec;
        sz += vexp(zr[i] - shz);
    }
    *mz_out = mz, *mc_out = mc, *sz_out = sz, *sc_out = sc;
}

static inline float input_at(const void *row, int64_t i, const int bf16) {
    return bf16 ? bf16_to_f(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* block_exps under a soft cap: z and q capped as they are read, the capped z and the slope kept in
 * block buffers; eb ends up holding e times the slope, the sums are of e. */
static inline void block_exps_capped(const void *zraw, const void *qraw, float *eb, int64_t n, float alpha_0,
                                     float inv_at, float softcap, const int bf16, double *mz_out, double *mc_out,
                                     float *sz_out, float *sc_out) {
    float zc[BLOCK], sl[BLOCK];
    const float inv_s = 1.0f / softcap;
    float mz = -INFINITY, mc = -INFINITY;
#pragma omp simd reduction(max : mz, mc)
    for (int64_t i = 0; i < n; i++) {
        float unused, slope;
        const float z = softcap * vtanh(input_at(zraw, i, bf16) * inv_s, &unused);
        const float c = (softcap * vtanh(input_at(qraw, i, bf16) * inv_s, &slope) + alpha_0 * z) * inv_at;
        zc[i] = z;
        sl[i] = slope;
        eb[i] = c;
        mz = max_f(mz, z);
        mc = max_f(mc, c);
    }
    const float shz = mz == -INFINITY ? 0.0f : mz, shc = mc == -INFINITY ? 0.0f : mc;
    float sz = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : sz, sc)
    for (int64_t i = 0; i < n; i++) {
        float ec = vexp(eb[i] - shc);
        eb[i] = ec * sl[i];
        sc += ec;
        sz += vexp(zc[i] - shz);
    }
    *mz_out = mz, *mc_out = mc, *sz_out = sz, *sc_out = sc;
}

static inline void scale_block(float *eb, uint16_t *pb, int64_t n, float scale, const int split) {
    (void)split;  /* block_exps writes eb in element order here */
    if (pb)
        for (int64_t i = 0; i < n; i++) pb[i] = f_to_bf16(eb[i] * scale);
    else
        for (int64_t i = 0; i < n; i++) eb[i] *= scale;
}
#endif

/* Adds a block's (point m, sum s of exp(x - m)) to a running (M, S); m is the block's max or within
 * a float rounding of it. A NaN sum (a NaN logit: the maxima skip it, the exps do not) is carried
 * into S whatever m is, so the row's log-sum-exp is NaN as in every other step; only an empty
 * block (s = 0, all -inf) adds nothing. */
static inline void merge(double *M, double *S, double m, double s) {
    if (m <= *M) {
        if (!(s <= 0)) *S += s * exp(m - *M);  /* exp(-inf - -inf) is NaN: S becomes NaN, as it should */
    } else {
        *S = *S * exp(*M - m) + s;  /* exp(-inf) = 0 for the first finite block */
        *M = m;
    }
}

/* The width of the blocks a row is swept in, which block_stats_out reports on. */
int qak_cpu_block_width(void) { return BLOCK; }

/* z, q: [rows, V] float32 (in_bf16 = 0) or bfloat16; p: [rows, V] float32 (p_bf16 = 0) or
 * bfloat16, may alias q (q is read before any of its row is written). Per row it writes what the
 * caller asks for (a NULL pointer: not wanted): q_taken = q[targets] (targets and q_taken together),
 * value, and lse_c = lse(c), lse_z = lse(z): a vocabulary tile's share, which the caller merges;
 * block_stats_out ([rows, ceil(V / BLOCK)]): each block's sum of p (its exps' sum times the scale
 * they get), for gradient filtering at no extra pass. softcap > 0: z and q are raw and capped as they are read (q_taken
 * too), p comes out times the cap's slope on q, and block_stats_out stays of the policy itself;
 * 0: no cap. */
int qak_cpu_row_step(const void *z, const void *q, const int64_t *targets, void *p,
                     int in_bf16, int p_bf16, int64_t rows, int64_t V, float alpha_tilde,
                     float alpha_0, float softcap, float *q_taken, float *value, float *lse_c_out, float *lse_z_out,
                     float *block_stats_out, int threads) {
    const int64_t nblocks = (V + BLOCK - 1) / BLOCK;
    const float inv_at = 1.0f / alpha_tilde;
    const int capped = softcap > 0.0f;
    const int64_t grain = 1 + 16384 / (V > 0 ? V : 1);  /* dynamic: a busy core gets fewer rows */
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
#endif
    {
        /* Per thread: block maxima and sums, and (bf16 p, bf16 inputs) a float32 row and input blocks. */
        double *bmax = malloc(sizeof(double) * (size_t)nblocks);
        float *bsum = malloc(sizeof(float) * (size_t)nblocks);
        float *row = p_bf16 ? malloc(sizeof(float) * (size_t)V) : NULL;
        if (!bmax || !bsum || (p_bf16 && !row)) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, grain)
#endif
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            const int64_t base = r * V;
            if (targets) {  /* The target first: p may alias q. Out-of-range targets give NaN, not a crash. */
                const int64_t t = targets[r];
                const float qt = (t < 0 || t >= V) ? NAN
                                 : in_bf16 ? bf16_to_f(((const uint16_t *)q)[base + t]) : ((const float *)q)[base + t];
                q_taken[r] = capped ? softcap * tanhf(qt / softcap) : qt;
            }
            float *e = p_bf16 ? row : (float *)p + base;
            double Mz = -INFINITY, Mc = -INFINITY;
            double Sz = 0.0, Sc = 0.0;
            for (int64_t b = 0; b < nblocks; b++) {
                const int64_t off = b * BLOCK, n = V - off < BLOCK ? V - off : BLOCK;
                float *eb = e + off;
                double mz, mc;
                float sz, sc;
                if (capped && in_bf16)
                    block_exps_capped((const uint16_t *)z + base + off, (const uint16_t *)q + base + off, eb, n,
                                      alpha_0, inv_at, softcap, 1, &mz, &mc, &sz, &sc);
                else if (capped)
                    block_exps_capped((const float *)z + base + off, (const float *)q + base + off, eb, n, alpha_0,
                                      inv_at, softcap, 0, &mz, &mc, &sz, &sc);
                else if (in_bf16)
                    block_exps((const uint16_t *)z + base + off, (const uint16_t *)q + base + off, eb, n, alpha_0,
                               inv_at, 1, &mz, &mc, &sz, &sc);
                else
                    block_exps((const float *)z + base + off, (const float *)q + base + off, eb, n, alpha_0,
                               inv_at, 0, &mz, &mc, &sz, &sc);
                bmax[b] = mc;
                bsum[b] = sc;
                merge(&Mz, &Sz, mz, sz);
                merge(&Mc, &Sc, mc, sc);
            }
            const double lse_c = Mc + log(Sc), lse_z = Mz + log(Sz);
            if (value) value[r] = (float)(alpha_tilde * lse_c - alpha_0 * lse_z);
            if (lse_c_out) lse_c_out[r] = (float)lse_c;
            if (lse_z_out) lse_z_out[r] = (float)lse_z;
            /* Second pass, over the row just written: exp(block max - row max) / sum. */
            for (int64_t b = 0; b < nblocks; b++) {
                const int64_t off = b * BLOCK, n = V - off < BLOCK ? V - off : BLOCK;
                const float scale = bmax[b] == -INFINITY ? 0.0f : (float)(exp(bmax[b] - Mc) / Sc);
                if (block_stats_out) block_stats_out[r * nblocks + b] = scale * bsum[b];
                scale_block(e + off, p_bf16 ? (uint16_t *)p + base + off : NULL, n, scale, in_bf16);
            }
        }
        free(bmax);
        free(bsum);
        free(row);
    }
    return failed ? -1 : 0;
}
