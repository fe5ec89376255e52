/* Single-sweep CPU row step (the RowStep contract of qadapter_kernels/chunked.py), plain C11.
 *
 * Per row, one sweep over memory in blocks of BLOCK elements: read z and q once, keep online
 * (max, sum) for z and for c = (q + alpha_0 z) / alpha~, write e = exp(c - block max) into the
 * output and remember each block's max; then a second pass over that row (still in L2) scales
 * each block by exp(block max - row max) / sum. Rows run in parallel with OpenMP.
 *
 * The two exps per element bound the step (a core does not reach memory speed on exps). The
 * portable exp is a branch-free polynomial so that gcc -O3 vectorises the inner loops without
 * -ffast-math, which would break the -inf logits of masked vocabulary entries. Where the compiler
 * targets AVX-512 (-march=native on such a CPU) the block loops are written with its intrinsics:
 * exp(x - m) = 2^(x log2 e - m log2 e), one FMA, then a minimax polynomial of 2^f and scalef for 2^k,
 * with a polynomial one degree shorter for bfloat16, whose results need 8 bits, not 24; and
 * bfloat16 rows are widened 32 at a time without shuffles (block_exps_bf16). On a 2-core Zen 4
 * that is about 1.35x the portable loop in float32 and 1.5x in bfloat16. Both versions are tested
 * against the eager step.
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

/* One block of a row: c = (q + alpha_0 z) / alpha~ written to eb as exp(c - max c), and the
 * block's max and sum of exp(x - max) for z and for c. z and q are float32 or (bf16 = 1) bfloat16
 * rows. eb may alias q (p aliases q): each element is read before it is written. An all -inf block
 * shifts by 0: its exps are 0, never NaN. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

/* 2^x of 16 floats x <= 0 (-inf and NaN lanes give 0): x = k + f, |f| <= 1/2, a minimax polynomial
 * of 2^f, and AVX-512's scalef applies 2^k (subnormals and underflow to 0 included). Degree 5 errs
 * by 2.4e-7 (2 ulp) for float32 results; degree 4 by 2.7e-6, far below bfloat16's 3.9e-3 ulp, and
 * one FMA shorter: the step is bound by these exps. */
static inline __m512 exp2_16(__m512 x, const int bf16) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-151.0f));  /* a NaN x gives the second operand */
    const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, k);
    __m512 y;
    if (bf16) {
        y = _mm512_set1_ps(9.5701016527e-03f);
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5917862104e-02f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4024744850e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9312181452e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.9999926143e-01f));
    } else {
        y = _mm512_set1_ps(1.3276471737e-03f);
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6755415401e-03f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5507132761e-02f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022119720e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314696706e-01f));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000000717e+00f));
    }
    return _mm512_scalef_ps(y, k);
}

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

/* exp(x - h) = 2^(x log2 e - h log2 e): the shift folds into one FMA. An all -inf block shifts by 0. */
static const float LOG2E = 1.44269504088896341f;
static inline __m512 log2_shift(float h) { return _mm512_set1_ps(h == -INFINITY ? 0.0f : h * LOG2E); }

static inline void block_exps_f32(const float *zr, const float *qr, float *eb, int64_t n, float alpha_0,
                                  float inv_at, float *mz_out, float *mc_out, float *sz_out, float *sc_out) {
    const __m512 a0 = _mm512_set1_ps(alpha_0), ia = _mm512_set1_ps(inv_at), ninf = _mm512_set1_ps(-INFINITY);
    __m512 mz = ninf, mc = ninf;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes(n - i);
        const __m512 z = _mm512_mask_loadu_ps(ninf, m, zr + i);
        const __m512 c = _mm512_mul_ps(_mm512_fmadd_ps(a0, z, _mm512_mask_loadu_ps(ninf, m, qr + i)), ia);
        _mm512_mask_storeu_ps(eb + i, m, c);
        mz = _mm512_max_ps(mz, z);
        mc = _mm512_mask_max_ps(mc, m, mc, c);  /* a masked lane of c may be NaN (-inf + inf) */
    }
    const float hz = _mm512_reduce_max_ps(mz), hc = _mm512_reduce_max_ps(mc);
    const __m512 l2e = _mm512_set1_ps(LOG2E), shz = log2_shift(hz), shc = log2_shift(hc);
    __m512 sz = _mm512_setzero_ps(), sc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes(n - i);
        const __m512 ec = exp2_16(_mm512_fmsub_ps(_mm512_mask_loadu_ps(ninf, m, eb + i), l2e, shc), 0);
        _mm512_mask_storeu_ps(eb + i, m, ec);
        sc = _mm512_add_ps(sc, ec);
        sz = _mm512_add_ps(sz, exp2_16(_mm512_fmsub_ps(_mm512_mask_loadu_ps(ninf, m, zr + i), l2e, shz), 0));
    }
    *mz_out = hz, *mc_out = hc, *sz_out = _mm512_reduce_add_ps(sz), *sc_out = _mm512_reduce_add_ps(sc);
}

/* bfloat16 rows 32 elements at a time, without shuffles: one 512-bit load holds 32 bfloat16, and
 * shifting each 32-bit lane left by 16 gives the even elements as float32, clearing its low half the
 * odd ones. eb keeps that order: per group of `left` <= 32 elements its ceil(left/2) even elements,
 * then its odd ones; scale_block puts them back in order as it writes p. Masked lanes read -inf. */
static inline void split32(const uint16_t *row, int64_t i, int64_t left, __m512 *even, __m512 *odd) {
    const __mmask32 m = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
    const __m512i x = _mm512_mask_loadu_epi16(_mm512_set1_epi16((short)0xff80), m, row + i);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline int64_t evens(int64_t left) { return left >= 32 ? 16 : (left + 1) / 2; }
static inline int64_t odds(int64_t left) { return left >= 32 ? 16 : left / 2; }

static inline void block_exps_bf16(const uint16_t *zr, const uint16_t *qr, float *eb, int64_t n, float alpha_0,
                                    float inv_at, float *mz_out, float *mc_out, float *sz_out, float *sc_out) {
    const __m512 a0 = _mm512_set1_ps(alpha_0), ia = _mm512_set1_ps(inv_at), ninf = _mm512_set1_ps(-INFINITY);
    __m512 mz = ninf, mc = ninf, ze, zo, qe, qo;
    for (int64_t i = 0; i < n; i += 32) {
        const int64_t left = n - i, h = evens(left);
        const __mmask16 me = lanes(h), mo = lanes(odds(left));
        split32(zr, i, left, &ze, &zo);
        split32(qr, i, left, &qe, &qo);
        const __m512 ce = _mm512_mul_ps(_mm512_fmadd_ps(a0, ze, qe), ia), co = _mm512_mul_ps(_mm512_fmadd_ps(a0, zo, qo), ia);
        _mm512_mask_storeu_ps(eb + i, me, ce);
        _mm512_mask_storeu_ps(eb + i + h, mo, co);
        mz = _mm512_max_ps(mz, _mm512_max_ps(ze, zo));
        mc = _mm512_mask_max_ps(_mm512_mask_max_ps(mc, me, mc, ce), mo, mc, co);  /* masked c: -inf + inf */
    }
    const float hz = _mm512_reduce_max_ps(mz), hc = _mm512_reduce_max_ps(mc);
    const __m512 l2e = _mm512_set1_ps(LOG2E), shz = log2_shift(hz), shc = log2_shift(hc);
    __m512 sz = _mm512_setzero_ps(), sc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
        const int64_t left = n - i, h = evens(left);
        const __mmask16 me = lanes(h), mo = lanes(odds(left));
        const __m512 ee = exp2_16(_mm512_fmsub_ps(_mm512_mask_loadu_ps(ninf, me, eb + i), l2e, shc), 1);
        const __m512 eo = exp2_16(_mm512_fmsub_ps(_mm512_mask_loadu_ps(ninf, mo, eb + i + h), l2e, shc), 1);
        _mm512_mask_storeu_ps(eb + i, me, ee);
        _mm512_mask_storeu_ps(eb + i + h, mo, eo);
        sc = _mm512_add_ps(sc, _mm512_add_ps(ee, eo));
        split32(zr, i, left, &ze, &zo);
        sz = _mm512_add_ps(sz, _mm512_add_ps(exp2_16(_mm512_fmsub_ps(ze, l2e, shz), 1),
                                             exp2_16(_mm512_fmsub_ps(zo, l2e, shz), 1)));
    }
    *mz_out = hz, *mc_out = hc, *sz_out = _mm512_reduce_add_ps(sz), *sc_out = _mm512_reduce_add_ps(sc);
}

static inline void block_exps(const void *zr, const void *qr, float *eb, int64_t n, float alpha_0, float inv_at,
                              const int bf16, float *mz_out, float *mc_out, float *sz_out, float *sc_out) {
    if (bf16)
        block_exps_bf16(zr, qr, eb, n, alpha_0, inv_at, mz_out, mc_out, sz_out, sc_out);
    else
        block_exps_f32(zr, qr, eb, n, alpha_0, inv_at, mz_out, mc_out, sz_out, sc_out);
}

/* Rounds float32 lanes to bfloat16, nearest even (p is finite), in the high half of each lane. */
static inline __m512i round_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
}

/* p = e * scale for one block, float32 in place or (pb) bfloat16; split: eb is in block_exps_bf16's
 * order, put back in element order here. */
static inline void scale_block(float *eb, uint16_t *pb, int64_t n, float scale, const int split) {
    const __m512 s = _mm512_set1_ps(scale);
    if (!split) {
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = lanes(n - i);
            const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, eb + i), s);
            if (pb)
                _mm256_mask_storeu_epi16(pb + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16(x), 16)));
            else
                _mm512_mask_storeu_ps(eb + i, m, x);
        }
        return;
    }
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t i = 0; i < n; i += 32) {
        const int64_t left = n - i, h = evens(left);
        const __m512 e = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(h), eb + i), s);
        const __m512 o = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(odds(left)), eb + i + h), s);
        if (pb) {
            const __mmask32 m = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
            const __m512i both = _mm512_or_si512(_mm512_srli_epi32(round_bf16(e), 16),
                                                 _mm512_and_si512(round_bf16(o), _mm512_set1_epi32((int)0xffff0000u)));
            _mm512_mask_storeu_epi16(pb + i, m, both);
        } else {
            _mm512_mask_storeu_ps(eb + i, lanes(left), _mm512_permutex2var_ps(e, lo, o));
            if (left > 16) _mm512_mask_storeu_ps(eb + i + 16, lanes(left - 16), _mm512_permutex2var_ps(e, hi, o));
        }
    }
}
#else
static inline void block_exps(const void *zraw, const void *qraw, float *eb, int64_t n, float alpha_0,
                              float inv_at, const int bf16, float *mz_out, float *mc_out, float *sz_out,
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

static inline void scale_block(float *eb, uint16_t *pb, int64_t n, float scale, const int split) {
    (void)split;  /* block_exps writes eb in element order here */
    if (pb)
        for (int64_t i = 0; i < n; i++) pb[i] = f_to_bf16(eb[i] * scale);
    else
        for (int64_t i = 0; i < n; i++) eb[i] *= scale;
}
#endif

/* Adds a block's (max m, sum s of exp(x - m)) to a running (M, S). */
static inline void merge(float *M, double *S, float m, double s) {
    if (m <= *M) {
        if (s > 0) *S += s * exp((double)m - *M);
    } else {
        *S = *S * exp((double)*M - m) + s;  /* exp(-inf) = 0 for the first finite block */
        *M = m;
    }
}

/* z, q: [rows, V] float32 (in_bf16 = 0) or bfloat16; p: [rows, V] float32 (p_bf16 = 0) or
 * bfloat16, may alias q (q is read before any of its row is written). */
int qak_cpu_row_step(const void *z, const void *q, const int64_t *targets, void *p,
                     int in_bf16, int p_bf16, int64_t rows, int64_t V, float alpha_tilde,
                     float alpha_0, float *q_taken, float *value, int threads) {
    const int64_t nblocks = (V + BLOCK - 1) / BLOCK;
    const float inv_at = 1.0f / alpha_tilde;
    const int64_t grain = 1 + 16384 / (V > 0 ? V : 1);  /* dynamic: a busy core gets fewer rows */
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
#endif
    {
        /* Per thread: block maxima, and (bf16 p, bf16 inputs) a float32 row and input blocks. */
        float *bmax = malloc(sizeof(float) * (size_t)nblocks);
        float *row = p_bf16 ? malloc(sizeof(float) * (size_t)V) : NULL;
        if (!bmax || (p_bf16 && !row)) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, grain)
#endif
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            const int64_t base = r * V, t = targets[r];
            /* The target first: p may alias q. Out-of-range targets give NaN, not a crash. */
            q_taken[r] = (t < 0 || t >= V) ? NAN
                         : in_bf16 ? bf16_to_f(((const uint16_t *)q)[base + t]) : ((const float *)q)[base + t];
            float *e = p_bf16 ? row : (float *)p + base;
            float Mz = -INFINITY, Mc = -INFINITY;
            double Sz = 0.0, Sc = 0.0;
            for (int64_t b = 0; b < nblocks; b++) {
                const int64_t off = b * BLOCK, n = V - off < BLOCK ? V - off : BLOCK;
                float *eb = e + off;
                float mz, mc, sz, sc;
                if (in_bf16)
                    block_exps((const uint16_t *)z + base + off, (const uint16_t *)q + base + off, eb, n, alpha_0,
                               inv_at, 1, &mz, &mc, &sz, &sc);
                else
                    block_exps((const float *)z + base + off, (const float *)q + base + off, eb, n, alpha_0,
                               inv_at, 0, &mz, &mc, &sz, &sc);
                bmax[b] = mc;
                merge(&Mz, &Sz, mz, sz);
                merge(&Mc, &Sc, mc, sc);
            }
            const double lse_c = Mc + log(Sc), lse_z = Mz + log(Sz);
            value[r] = (float)(alpha_tilde * lse_c - alpha_0 * lse_z);
            /* Second pass, over the row just written: exp(block max - row max) / sum. */
            for (int64_t b = 0; b < nblocks; b++) {
                const int64_t off = b * BLOCK, n = V - off < BLOCK ? V - off : BLOCK;
                const float scale = bmax[b] == -INFINITY ? 0.0f : (float)(exp((double)bmax[b] - Mc) / Sc);
                scale_block(e + off, p_bf16 ? (uint16_t *)p + base + off : NULL, n, scale, in_bf16);
            }
        }
        free(bmax);
        free(row);
    }
    return failed ? -1 : 0;
}
