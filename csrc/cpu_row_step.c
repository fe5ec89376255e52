/* Single-sweep CPU row step (the RowStep contract of qadapter_kernels/chunked.py), plain C11.
 *
 * Per row, one sweep over memory in blocks of BLOCK elements: read z and q once, keep online
 * (max, sum) for z and for c = (q + alpha_0 z) / alpha~, write e = exp(c - block max) into the
 * output and remember each block's max; then a second pass over that row (still in L2) scales
 * each block by exp(block max - row max) / sum. Rows run in parallel with OpenMP.
 *
 * The two exps per element bound the step (it reads 8 bytes per element, and a core does not
 * reach memory speed on exps). exp is a branch-free polynomial so that gcc -O3 vectorises the
 * inner loops without -ffast-math, which would break the -inf logits of masked vocabulary
 * entries; where the compiler targets AVX-512 (-march=native on such a CPU) the block loop is
 * written with its intrinsics instead, whose scalef applies 2^k in one instruction (about 1.4x
 * the whole step on a 2-core Zen 4). Both versions are tested against the eager step.
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
 * block's max and sum of exp(x - max) for z and for c. eb may alias qr (p aliases q): each
 * element is read before it is written. An all -inf block shifts by 0: its exps are 0, never NaN. */
#if defined(__AVX512F__)
#include <immintrin.h>

/* exp of 16 floats: the same reduction and polynomial as vexp, with AVX-512's scalef applying
 * 2^k (subnormals and underflow to 0 included), a third of vexp's instructions. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.3981999507e-3f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, k);
}

static inline void block_exps(const float *zr, const float *qr, float *eb, int64_t n, float alpha_0,
                              float inv_at, float *mz_out, float *mc_out, float *sz_out, float *sc_out) {
    const __m512 a0 = _mm512_set1_ps(alpha_0), ia = _mm512_set1_ps(inv_at), ninf = _mm512_set1_ps(-INFINITY);
    __m512 mz = ninf, mc = ninf;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 z = _mm512_mask_loadu_ps(ninf, m, zr + i);
        const __m512 c = _mm512_mul_ps(_mm512_fmadd_ps(a0, z, _mm512_mask_loadu_ps(ninf, m, qr + i)), ia);
        _mm512_mask_storeu_ps(eb + i, m, c);
        mz = _mm512_max_ps(mz, z);
        mc = _mm512_mask_max_ps(mc, m, mc, c);  /* a masked lane of c may be NaN (-inf + inf) */
    }
    const float hz = _mm512_reduce_max_ps(mz), hc = _mm512_reduce_max_ps(mc);
    const __m512 shz = _mm512_set1_ps(hz == -INFINITY ? 0.0f : hz), shc = _mm512_set1_ps(hc == -INFINITY ? 0.0f : hc);
    __m512 sz = _mm512_setzero_ps(), sc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 ec = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, m, eb + i), shc));
        _mm512_mask_storeu_ps(eb + i, m, ec);
        sc = _mm512_add_ps(sc, ec);
        sz = _mm512_add_ps(sz, exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, m, zr + i), shz)));
    }
    *mz_out = hz, *mc_out = hc, *sz_out = _mm512_reduce_add_ps(sz), *sc_out = _mm512_reduce_add_ps(sc);
}
#else
static inline void block_exps(const float *zr, const float *qr, float *eb, int64_t n, float alpha_0,
                              float inv_at, float *mz_out, float *mc_out, float *sz_out, float *sc_out) {
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
        float zb[BLOCK], qb[BLOCK];
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
                const float *zr, *qr;
                if (in_bf16) {
                    const uint16_t *zs = (const uint16_t *)z + base + off, *qs = (const uint16_t *)q + base + off;
                    for (int64_t i = 0; i < n; i++) { zb[i] = bf16_to_f(zs[i]); qb[i] = bf16_to_f(qs[i]); }
                    zr = zb, qr = qb;
                } else {
                    zr = (const float *)z + base + off, qr = (const float *)q + base + off;
                }
                float *eb = e + off;
                float mz, mc, sz, sc;
                block_exps(zr, qr, eb, n, alpha_0, inv_at, &mz, &mc, &sz, &sc);
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
                float *eb = e + off;
                if (p_bf16) {
                    uint16_t *pb = (uint16_t *)p + base + off;
                    for (int64_t i = 0; i < n; i++) pb[i] = f_to_bf16(eb[i] * scale);
                } else {
                    for (int64_t i = 0; i < n; i++) eb[i] *= scale;
                }
            }
        }
        free(bmax);
        free(row);
    }
    return failed ? -1 : 0;
}
