/* A decode step's transformer layers in one call (fused_step.py): GPTBigCode's and StarCoder2's
 * LayerNorm, fused QKV (rotated, where the model's positions are rotary), attention over the static
 * cache and MLP, each linear by panels.c and the attention by attend.c: the same kernels, each output
 * rounded to the dtype where the model's layers round it (only the LayerNorm's moments are summed
 * otherwise: in double, two passes, in 16 lanes where the kernels' path has AVX2 or AVX-512).
 *
 * Why: at batch 1 a layer is four weight streams and ~20 small ops between them. Run from Python,
 * those ops and the step's few others cost 0.7 ms a step in the bench-size model's 8 layers
 * (interpreter, dispatch, allocation), more with their caches just evicted by the weights
 * (RESULTS.md, "Layers in one call").
 *
 * A layer is four phases: 0, LayerNorm, QKV and K/V into the cache; 1, the attention; 2, the
 * attention's c_proj; 3, LayerNorm, c_fc with its activation and the MLP's c_proj. At world size 1 a
 * call runs any range of phases, each c_proj with its bias and added into the residual. Between
 * ranks the sum of the c_proj partials is the caller's (an all-reduce), so a call ends at a c_proj,
 * writes it without bias to `partial`, and the next call first adds what came back, then its bias,
 * into the residual: as Linear.row_parallel and Block do. Where the decode attention was measured
 * faster with SDPA, or attend.c does not take the heads, the caller runs it between phases 0 and 2
 * (the queries and the attention's output in `scratch`, where phase 1 reads and writes them).
 * Elements are rounded to the dtype where the model's ops round them (each op's output).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

void panels_f32(const float *w, const float *x, const float *b, float *y, long n, long k, long m, int act);
void panels_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, long n, long k, long m,
                 int act);
int panels_width(void);
int attend_f32(const float *q, long q_b, const float *k, const float *v, long kv_b, long kv_h, const uint8_t *mask,
               long mask_b, float *out, long b_len, long kv_len, long g_len, long s_len, long d_len, float scale);
int attend_bf16(const uint16_t *q, long q_b, const uint16_t *k, const uint16_t *v, long kv_b, long kv_h,
                const uint8_t *mask, long mask_b, uint16_t *out, long b_len, long kv_len, long g_len, long s_len,
                long d_len, float scale, int dot);
void rotary_f32(float *x, long b, long t, long h, long d, long sb, long st, long sh, const float *cos,
                const float *sin);
void rotary_bf16(uint16_t *x, long b, long t, long h, long d, long sb, long st, long sh, const uint16_t *cos,
                 const uint16_t *sin, int wide);

/* A layer's tensors, in this order (fused_step.py's _layer_tensors); a bias may be NULL. */
enum { LN1_W, LN1_B, QKV_W, QKV_B, K_CACHE, V_CACHE, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, FC2_W, FC2_B, SLOTS };
/* dims[]: the step's shape (fused_step.py's DIMS). */
enum { LAYERS, BATCH, EMBD, HEADS, KV_HEADS, HEAD_DIM, INNER, KV_B, KV_H, ACT, DOT, BF16, DIMS };

static inline float get(const void *p, long i, int bf16) {
    if (!bf16)
        return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void put(void *p, long i, float v, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    /* to nearest even, NaN kept quiet: simd.h's round_bf16, one element */
    ((uint16_t *)p)[i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                                        : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* v as the dtype holds it (bf16: rounded to nearest even). */
static inline float rounded(float v, int bf16) {
    if (!bf16)
        return v;
    uint16_t held;
    put(&held, 0, v, 1);
    return get(&held, 0, 1);
}

/* torch's CPU layer_norm: the moments, then (x * rstd + -mean * rstd) * w + b in fp32, rounded once. */
static void layer_norm(const void *x, const void *w, const void *b, void *y, long rows, long n, float eps, int bf16) {
    for (long r = 0; r < rows; r++) {
        double sum = 0, squares = 0;
        for (long i = 0; i < n; i++)
            sum += get(x, r * n + i, bf16);
        double mean = sum / n;
        for (long i = 0; i < n; i++) {
            double d = get(x, r * n + i, bf16) - mean;
            squares += d * d;
        }
        float rstd = 1.0f / sqrtf((float)(squares / n) + eps), shift = -(float)mean * rstd;
        for (long i = 0; i < n; i++) {
            float v = (get(x, r * n + i, bf16) * rstd + shift) * get(w, i, bf16);
            put(y, r * n + i, b ? v + get(b, i, bf16) : v, bf16);
        }
    }
}

/* x += (add + bias): the bias rounded in with the sum first, as `out + bias` then `x + out`. */
static void residual(void *x, const void *add, const void *bias, long rows, long n, int bf16) {
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < n; i++) {
            float a = get(add, r * n + i, bf16);
            if (bias)
                a = rounded(a + get(bias, i, bf16), bf16);
            put(x, r * n + i, get(x, r * n + i, bf16) + a, bf16);
        }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "simd.h"
#include "simd_avx2.h"

/* The sum of 8 double lanes held as two halves (lanes 0-3, 4-7): the halves, then their halves, then the
 * two; one order for both vector forms below (GCC's _mm512_reduce_add_pd's), so both give the same bits. */
__attribute__((target("avx"))) INLINE double sum8(__m256d lo, __m256d hi) {
    __m256d quarters = _mm256_add_pd(hi, lo);
    __m128d pair = _mm_add_pd(_mm256_extractf128_pd(quarters, 1), _mm256_castpd256_pd128(quarters));
    return _mm_cvtsd_f64(pair) + _mm_cvtsd_f64(_mm_unpackhi_pd(pair, pair));
}

/* 16 elements of p from i, in fp32. */
AVX512 INLINE __m512 get16(const void *p, long i, int bf16) {
    if (!bf16)
        return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AVX512 INLINE void put16(void *p, long i, __m512 v, int bf16) {
    if (!bf16)
        _mm512_storeu_ps((float *)p + i, v);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(round_bf16(v)));
}

/* v as the dtype holds it (bf16: rounded to nearest even). */
AVX512 INLINE __m512 rounded16(__m512 v, int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(round_bf16(v), 16)) : v;
}

/* layer_norm's and residual's elements, 16 at a time (n % 16 == 0): the same operations on each element, the
 * moments summed in double in 16 lanes (another order again). At batch 16 the scalar forms took 3.5-4.1% of a
 * rank's bf16 decode step (LayerNorm) and most of the body's 4.5-4.7% (RESULTS.md, "LayerNorm and the residual
 * in vectors"). AVX-512's forms here, AVX2's below; which runs follows the kernels' path (panels_width), so
 * a path narrowed to AVX2 stands in for an AVX2 CPU here too. The scalar forms are the portable build's
 * (a width of heads x head_dim is a multiple of 16). */
AVX512 static void layer_norm16(const void *x, const void *w, const void *b, void *y, long rows, long n, float eps,
                                int bf16) {
    for (long r = 0; r < rows; r++) {
        __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();  /* elements 0-7 of 16, 8-15 */
        for (long i = 0; i < n; i += 16) {
            __m512 v = get16(x, r * n + i, bf16);
            low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
            high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
        }
        __m512d both = _mm512_add_pd(low, high);
        double mean = sum8(_mm512_castpd512_pd256(both), _mm512_extractf64x4_pd(both, 1)) / n;
        __m512d centre = _mm512_set1_pd(mean);
        low = high = _mm512_setzero_pd();
        for (long i = 0; i < n; i += 16) {
            __m512 v = get16(x, r * n + i, bf16);
            __m512d dl = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), centre);
            __m512d dh = _mm512_sub_pd(
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))), centre);
            low = _mm512_add_pd(low, _mm512_mul_pd(dl, dl));
            high = _mm512_add_pd(high, _mm512_mul_pd(dh, dh));
        }
        both = _mm512_add_pd(low, high);
        double squares = sum8(_mm512_castpd512_pd256(both), _mm512_extractf64x4_pd(both, 1));
        float rstd = 1.0f / sqrtf((float)(squares / n) + eps), shift = -(float)mean * rstd;
        __m512 scale = _mm512_set1_ps(rstd), offset = _mm512_set1_ps(shift);
        for (long i = 0; i < n; i += 16) {
            __m512 v = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(get16(x, r * n + i, bf16), scale), offset),
                                     get16(w, i, bf16));
            put16(y, r * n + i, b ? _mm512_add_ps(v, get16(b, i, bf16)) : v, bf16);
        }
    }
}

AVX512 static void residual16(void *x, const void *add, const void *bias, long rows, long n, int bf16) {
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < n; i += 16) {
            __m512 a = get16(add, r * n + i, bf16);
            if (bias)
                a = rounded16(_mm512_add_ps(a, get16(bias, i, bf16)), bf16);
            put16(x, r * n + i, _mm512_add_ps(get16(x, r * n + i, bf16), a), bf16);
        }
}

AVX2 INLINE __m256 get8(const void *p, long i, int bf16) {
    return bf16 ? widen8_bf16((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}

AVX2 INLINE void put8(void *p, long i, __m256 v, int bf16) {
    if (!bf16)
        _mm256_storeu_ps((float *)p + i, v);
    else
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), round8_bf16(v));
}

AVX2 INLINE __m256 rounded8(__m256 v, int bf16) {
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(round8_bf16(v)), 16)) : v;
}

AVX2 INLINE __m256d low4(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
AVX2 INLINE __m256d high4(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

/* layer_norm16 in AVX2's 8 lanes: 16 elements a step, its 16 double lanes as four vectors (elements 0-3,
 * 4-7 | 8-11, 12-15 of each 16), summed and reduced in its order: its bits. */
AVX2 static void layer_norm16_avx2(const void *x, const void *w, const void *b, void *y, long rows, long n,
                                   float eps, int bf16) {
    for (long r = 0; r < rows; r++) {
        __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
        for (long i = 0; i < n; i += 16) {
            __m256 v = get8(x, r * n + i, bf16), u = get8(x, r * n + i + 8, bf16);
            s0 = _mm256_add_pd(s0, low4(v)), s1 = _mm256_add_pd(s1, high4(v));
            s2 = _mm256_add_pd(s2, low4(u)), s3 = _mm256_add_pd(s3, high4(u));
        }
        double mean = sum8(_mm256_add_pd(s0, s2), _mm256_add_pd(s1, s3)) / n;
        __m256d centre = _mm256_set1_pd(mean);
        s0 = s1 = s2 = s3 = _mm256_setzero_pd();
        for (long i = 0; i < n; i += 16) {
            __m256 v = get8(x, r * n + i, bf16), u = get8(x, r * n + i + 8, bf16);
            __m256d d0 = _mm256_sub_pd(low4(v), centre), d1 = _mm256_sub_pd(high4(v), centre);
            __m256d d2 = _mm256_sub_pd(low4(u), centre), d3 = _mm256_sub_pd(high4(u), centre);
            s0 = _mm256_add_pd(s0, _mm256_mul_pd(d0, d0)), s1 = _mm256_add_pd(s1, _mm256_mul_pd(d1, d1));
            s2 = _mm256_add_pd(s2, _mm256_mul_pd(d2, d2)), s3 = _mm256_add_pd(s3, _mm256_mul_pd(d3, d3));
        }
        double squares = sum8(_mm256_add_pd(s0, s2), _mm256_add_pd(s1, s3));
        float rstd = 1.0f / sqrtf((float)(squares / n) + eps), shift = -(float)mean * rstd;
        __m256 scale = _mm256_set1_ps(rstd), offset = _mm256_set1_ps(shift);
        for (long i = 0; i < n; i += 8) {
            __m256 v = _mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(get8(x, r * n + i, bf16), scale), offset),
                                     get8(w, i, bf16));
            put8(y, r * n + i, b ? _mm256_add_ps(v, get8(b, i, bf16)) : v, bf16);
        }
    }
}

AVX2 static void residual16_avx2(void *x, const void *add, const void *bias, long rows, long n, int bf16) {
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < n; i += 8) {
            __m256 a = get8(add, r * n + i, bf16);
            if (bias)
                a = rounded8(_mm256_add_ps(a, get8(bias, i, bf16)), bf16);
            put8(x, r * n + i, _mm256_add_ps(get8(x, r * n + i, bf16), a), bf16);
        }
}
#else
#define layer_norm16 layer_norm
#define residual16 residual
#define layer_norm16_avx2 layer_norm
#define residual16_avx2 residual
#endif

/* The vector forms for rows of n: 2 AVX-512's, 1 AVX2's, 0 the scalar ones (panels_width: the kernels'
 * path, which holds no wider vectors than the CPU runs; 0 in the portable build). */
static int width(long n) {
    return n % 16 ? 0 : panels_width();
}

/* Rotary positions on q and k in place, by rotary.c (torch's bits): rows of [q's heads | k's heads | v],
 * one token each; cos, sin: [B][D], this step's position per row. */
static void rotate(void *qkv, const void *cos, const void *sin, long rows, long row_len, long heads, long d_len,
                   int bf16) {
    if (bf16)
        rotary_bf16(qkv, rows, 1, heads, d_len, row_len, 0, d_len, cos, sin, panels_width());  /* (the path's) */
    else
        rotary_f32(qkv, rows, 1, heads, d_len, row_len, 0, d_len, cos, sin);
}

static void linear(const void *w, const void *x, const void *b, void *y, long n, long k, long m, int act, int bf16) {
    if (bf16)
        panels_bf16(w, x, b, y, n, k, m, act);
    else
        panels_f32(w, x, b, y, n, k, m, act);
}

/* Phases [from, to) of the layers (4 per layer) for the token at cache slot `pos`, on the residual
 * `x` [B, E] in place; `cos` and `sin` ([B, D], the rows' positions) rotate q and k, or are NULL.
 * `incoming` (or NULL): the last c_proj summed over the ranks, added with `incoming_bias` (or NULL)
 * first. `partial` NULL: world size 1, each c_proj into the residual; else the range holds one c_proj,
 * its last phase, which goes there without its bias. `scratch`: B * (2E + QKV + HD + INNER) elements:
 * the normalised rows, q/k/v, the attention's output, a c_proj's output, the MLP's hidden rows.
 * Returns 0, -1 where attend.c could not allocate, -2 for a range it does not run. */
int fused_step(void *const *layers, long from, long to, void *x, const void *incoming, const void *incoming_bias,
               void *partial, void *scratch, const long *dims, long pos, float eps, float scale, const void *cos,
               const void *sin) {
    const long B = dims[BATCH], E = dims[EMBD], H = dims[HEADS], KV = dims[KV_HEADS], D = dims[HEAD_DIM];
    const long QKV = (H + 2 * KV) * D, bf16 = dims[BF16], size = bf16 ? 2 : 4;
    if (from < 0 || to < from || to > 4 * dims[LAYERS] || (partial && (to == from || (to - 1) % 4 < 2)) ||
        (cos && (!sin || D % 2)))
        return -2;
    for (long p = from; partial && p < to - 1; p++)  /* between ranks: one c_proj, the range's last phase */
        if (p % 4 >= 2)
            return -2;
    char *h = scratch, *qkv = h + B * E * size, *att = qkv + B * QKV * size, *o = att + B * H * D * size;
    char *f = o + B * E * size;
    const int wide = width(E);
    void (*norm)(const void *, const void *, const void *, void *, long, long, float, int) =
        wide == 2 ? layer_norm16 : wide == 1 ? layer_norm16_avx2 : layer_norm;
    void (*add)(void *, const void *, const void *, long, long, int) =
        wide == 2 ? residual16 : wide == 1 ? residual16_avx2 : residual;
    if (incoming)
        add(x, incoming, incoming_bias, B, E, bf16);
    for (long p = from; p < to; p++) {
        void *const *L = layers + (p / 4) * SLOTS;
        void *out = partial ? partial : o;
        switch (p % 4) {
        case 0:
            norm(x, L[LN1_W], L[LN1_B], h, B, E, eps, bf16);
            linear(L[QKV_W], h, L[QKV_B], qkv, QKV, E, B, 0, bf16);
            if (cos)  /* q's heads and k's, side by side in a row */
                rotate(qkv, cos, sin, B, QKV, H + KV, D, bf16);
            for (long b = 0; b < B; b++)  /* this token's keys and values into slot `pos` */
                for (long j = 0; j < KV; j++) {
                    long slot = (b * dims[KV_B] + j * dims[KV_H] + pos * D) * size;
                    memcpy((char *)L[K_CACHE] + slot, qkv + (b * QKV + (H + j) * D) * size, D * size);
                    memcpy((char *)L[V_CACHE] + slot, qkv + (b * QKV + (H + KV + j) * D) * size, D * size);
                }
            continue;
        case 1: {
            int failed = bf16 ? attend_bf16((const uint16_t *)qkv, QKV, L[K_CACHE], L[V_CACHE], dims[KV_B],
                                            dims[KV_H], NULL, 0, (uint16_t *)att, B, KV, H / KV, pos + 1, D, scale,
                                            (int)dims[DOT])
                              : attend_f32((const float *)qkv, QKV, L[K_CACHE], L[V_CACHE], dims[KV_B], dims[KV_H],
                                           NULL, 0, (float *)att, B, KV, H / KV, pos + 1, D, scale);
            if (failed)
                return -1;
            continue;
        }
        case 2:
            linear(L[PROJ_W], att, partial ? NULL : L[PROJ_B], out, E, H * D, B, 0, bf16);
            break;
        default:
            norm(x, L[LN2_W], L[LN2_B], h, B, E, eps, bf16);
            linear(L[FC_W], h, L[FC_B], f, dims[INNER], E, B, (int)dims[ACT], bf16);
            linear(L[FC2_W], f, partial ? NULL : L[FC2_B], out, E, dims[INNER], B, 0, bf16);
        }
        if (!partial)
            add(x, o, NULL, B, E, bf16);
    }
    return 0;
}
