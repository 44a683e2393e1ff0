/* panels.c's products, y[m, n] = act(x[m, k] @ w^T + b), for CPUs without AVX-512 (bf16: without
 * AVX512_BF16): AVX2 and FMA on the same panels of 16 output columns (panels.py), each panel two
 * 8-lane vectors. The same bias, activations and bf16 rounding; one thread. panels.c calls these where
 * the path the library took (rowdot_use) is narrower than its own.
 *
 * AVX2 has 16 vector registers: a block of 6 rows keeps 12 accumulators (bf16: 4 rows, 8; its widened
 * weight takes 4 registers), each a variable of its own (in an array, GCC kept them in memory from 5
 * rows on). x is copied first, in chunks of CHUNK_ROWS rows, to fp32 with each block's rows interleaved
 * step by step (bf16: each K pair's two elements side by side, widened once instead of at every
 * panel), so that a step's broadcasts read one line and the chunk stays in the caches (L2 to K ~4000) while every
 * panel passes; each panel's first block of rows asks for the next panel into L2 as it goes. A bf16
 * weight pair is widened in registers: its even element by a shift, its odd one by a mask, and summed
 * odd first, as AVX512_BF16's dot product does (each product is exact in fp32). One row runs
 * against the panels straight from x, with two sums of alternate K steps, as panels.c's ONE_ROW.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include "simd_avx2.h"

#define F32_ROWS 6     /* rows of x per block: 6 x 2 accumulators of AVX2's 16 registers */
#define BF16_ROWS 4    /* (bf16: its widened weight takes 4 registers more) */
#ifndef CHUNK_ROWS
#define CHUNK_ROWS 64  /* rows interleaved and run against every panel at a time */
#endif
#ifndef PANELS_AVX2_ALLOC
#define PANELS_AVX2_ALLOC malloc  /* (tests/test_panels.py builds it failing, to reach the fallback) */
#endif
#define ACT_GELU_TANH 1
#define ACT_RELU 2

/* e^x for |x| <= 80 (the GELU holds it there): panels.c's exp_neg (simd.h) in 8 lanes, 2^n built in
 * the exponent's bits (n within +-116: normal). */
AVX2 INLINE __m256 exp8(__m256 x) {
    static const float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 q = _mm256_set1_ps(c[0]);
    for (int i = 1; i < 6; i++)
        q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(c[i]));
    __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
    return _mm256_mul_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f))), two_n);
}

/* panels.c's activate in 8 lanes: the tanh GELU as v / (1 + e^(-2u)) (divided: AVX2's reciprocal has 12
 * bits), 0 where -2u >= 80, NaN kept; or relu. */
AVX2 INLINE __m256 activate8(__m256 v, int act) {
    if (act == ACT_RELU)
        return _mm256_max_ps(_mm256_setzero_ps(), v);  /* (NaN kept: maxps gives its second operand then) */
    if (act != ACT_GELU_TANH)
        return v;
    __m256 cubic = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v);
    __m256 minus_2u = _mm256_mul_ps(_mm256_set1_ps(-2.0f * 0.7978845608028654f), cubic);
    __m256 kept = _mm256_cmp_ps(minus_2u, _mm256_set1_ps(80.0f), _CMP_NGE_UQ);  /* < 80, or NaN */
    __m256 held = _mm256_max_ps(_mm256_min_ps(minus_2u, _mm256_set1_ps(80.0f)), _mm256_set1_ps(-80.0f));
    __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(held));
    return _mm256_and_ps(kept, _mm256_div_ps(v, d));
}

/* A pair of bf16 (32 bits: the even element low) as its two fp32 elements. */
AVX2 INLINE __m256 even8(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
AVX2 INLINE __m256 odd8(__m256i pairs) {
    return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(-65536)));
}

/* The 16 outputs of one row: bias, activation, stored (bf16: rounded once). */
AVX2 INLINE void out_f32(float *y, const float *b, __m256 lo, __m256 hi, int act) {
    if (b)
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(b)), hi = _mm256_add_ps(hi, _mm256_loadu_ps(b + 8));
    _mm256_storeu_ps(y, activate8(lo, act));
    _mm256_storeu_ps(y + 8, activate8(hi, act));
}

AVX2 INLINE void out_bf16(uint16_t *y, const uint16_t *b, __m256 lo, __m256 hi, int act) {
    if (b)
        lo = _mm256_add_ps(lo, widen8_bf16(b)), hi = _mm256_add_ps(hi, widen8_bf16(b + 8));
    _mm_storeu_si128((__m128i *)y, round8_bf16(activate8(lo, act)));
    _mm_storeu_si128((__m128i *)(y + 8), round8_bf16(activate8(hi, act)));
}

/* One block of R rows against one panel over all `steps` K steps; x interleaved ([steps][mr] fp32 units:
 * an element, or in bf16 a pair). Row r's sums in l<r> and h<r> (the panel's low and high 8 columns);
 * `next`: the next panel, a line of it asked for each step (NULL: none). */
#define F32_DECL(r) __m256 l##r = _mm256_setzero_ps(), h##r = _mm256_setzero_ps();
#define F32_STEP(r)                                                                                \
    {                                                                                              \
        __m256 xb = _mm256_broadcast_ss(x + s * mr + r);                                           \
        l##r = _mm256_fmadd_ps(lo, xb, l##r);                                                      \
        h##r = _mm256_fmadd_ps(hi, xb, h##r);                                                      \
    }
#define F32_OUT(r) out_f32(y + r * n, b, l##r, h##r, act);
#define ROWS_1(M) M(0)
#define ROWS_2(M) M(0) M(1)
#define ROWS_4(M) M(0) M(1) M(2) M(3)
#define ROWS_6(M) M(0) M(1) M(2) M(3) M(4) M(5)
#define BLOCK_F32(R)                                                                               \
    AVX2 static void block_f32_##R(const float *w, const float *x, long steps, int mr, float *y, long n,  \
                                   const float *b, int act, const char *next) {                   \
        ROWS_##R(F32_DECL)                                                                         \
        for (long s = 0; s < steps; s++) {                                                         \
            if (next)                                                                              \
                _mm_prefetch(next + s * 64, _MM_HINT_T1);                                          \
            __m256 lo = _mm256_loadu_ps(w + s * 16), hi = _mm256_loadu_ps(w + s * 16 + 8);         \
            ROWS_##R(F32_STEP)                                                                     \
        }                                                                                          \
        ROWS_##R(F32_OUT)                                                                          \
    }
#define BF16_STEP(r)                                                                               \
    {                                                                                              \
        const float *pair = x + 2 * (s * mr + r);                                                  \
        __m256 xe = _mm256_broadcast_ss(pair), xo = _mm256_broadcast_ss(pair + 1);                 \
        l##r = _mm256_fmadd_ps(lo_e, xe, _mm256_fmadd_ps(lo_o, xo, l##r));                        \
        h##r = _mm256_fmadd_ps(hi_e, xe, _mm256_fmadd_ps(hi_o, xo, h##r));                         \
    }
#define BF16_OUT(r) out_bf16(y + r * n, b, l##r, h##r, act);
#define BLOCK_BF16(R)                                                                              \
    AVX2 static void block_bf16_##R(const uint16_t *w, const float *x, long steps, int mr, uint16_t *y,  \
                                    long n, const uint16_t *b, int act, const char *next) {        \
        ROWS_##R(F32_DECL)                                                                         \
        for (long s = 0; s < steps; s++) {                                                         \
            if (next)                                                                              \
                _mm_prefetch(next + s * 64, _MM_HINT_T1);                                          \
            __m256i lo = _mm256_loadu_si256((const __m256i *)(w + s * 32));                        \
            __m256i hi = _mm256_loadu_si256((const __m256i *)(w + s * 32 + 16));                   \
            __m256 lo_e = even8(lo), lo_o = odd8(lo), hi_e = even8(hi), hi_o = odd8(hi);           \
            ROWS_##R(BF16_STEP)                                                                    \
        }                                                                                          \
        ROWS_##R(BF16_OUT)                                                                         \
    }
BLOCK_F32(6)
BLOCK_F32(4)
BLOCK_F32(2)
BLOCK_F32(1)
BLOCK_BF16(4)
BLOCK_BF16(2)
BLOCK_BF16(1)
typedef void (*f32_block)(const float *, const float *, long, int, float *, long, const float *, int, const char *);
typedef void (*bf16_block)(const uint16_t *, const float *, long, int, uint16_t *, long, const uint16_t *, int,
                           const char *);
static const f32_block f32_blocks[F32_ROWS + 1] = {[1] = block_f32_1, [2] = block_f32_2, [4] = block_f32_4,
                                                   [6] = block_f32_6};
static const bf16_block bf16_blocks[BF16_ROWS + 1] = {[1] = block_bf16_1, [2] = block_bf16_2, [4] = block_bf16_4};

/* The rows of x's next block, of `left` left: up to `most` (fp32 6, bf16 4: what AVX2's 16 registers hold). */
static inline int block_rows(long left, int most) { return left >= most ? most : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* `m` rows of x (fp32, or bf16 widened) in blocks of 6 (bf16: 4), 4, 2, 1 rows, each block's rows interleaved
 * step by step: [steps][mr] units of `unit` floats (1; bf16: 2, a K pair). bf16: k even (panels.supports). */
static void interleave(const void *x, int bf16, float *rows, long k, long m) {
    const int unit = bf16 ? 2 : 1;
    const long steps = k / unit;
    for (long r = 0; r < m;) {
        int mr = block_rows(m - r, bf16 ? BF16_ROWS : F32_ROWS);
        for (int i = 0; i < mr; i++) {
            float *to = rows + (long)i * unit;
            if (bf16) {
                const uint16_t *from = (const uint16_t *)x + (r + i) * k;
                for (long e = 0; e < k; e++) {
                    uint32_t bits = (uint32_t)from[e] << 16;
                    memcpy(to + (e / 2) * mr * 2 + (e & 1), &bits, 4);
                }
            } else {
                const float *from = (const float *)x + (r + i) * k;
                for (long s = 0; s < steps; s++)
                    to[s * mr] = from[s];
            }
        }
        rows += mr * k;
        r += mr;
    }
}

/* One row of raw x against every panel: two sums of alternate K steps, added at the end (panels.c's ONE_ROW). */
AVX2 static void row_f32(const float *w, const float *x, const float *b, float *y, long n, long k, int act) {
    for (long col = 0; col < n; col += 16, w += k * 16) {
        __m256 even[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256 odd[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        long s = 0;
        for (; s + 2 <= k; s += 2) {
            __m256 x0 = _mm256_broadcast_ss(x + s), x1 = _mm256_broadcast_ss(x + s + 1);
            even[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + s * 16), x0, even[0]);
            even[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + s * 16 + 8), x0, even[1]);
            odd[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + s * 16 + 16), x1, odd[0]);
            odd[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + s * 16 + 24), x1, odd[1]);
        }
        if (s < k) {
            __m256 x0 = _mm256_broadcast_ss(x + s);
            even[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + s * 16), x0, even[0]);
            even[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + s * 16 + 8), x0, even[1]);
        }
        out_f32(y + col, b ? b + col : NULL, _mm256_add_ps(even[0], odd[0]), _mm256_add_ps(even[1], odd[1]), act);
    }
}

/* One bf16 K pair (x's two elements at `pair`) against a step's 16 columns, summed into sum[0..1], odd first. */
AVX2 INLINE void pair_step(const uint16_t *w, const uint16_t *pair, __m256 *sum) {
    uint32_t bits;
    memcpy(&bits, pair, 4);
    __m256i xp = _mm256_set1_epi32((int)bits);
    __m256 xe = even8(xp), xo = odd8(xp);
    __m256i lo = _mm256_loadu_si256((const __m256i *)w), hi = _mm256_loadu_si256((const __m256i *)(w + 16));
    sum[0] = _mm256_fmadd_ps(even8(lo), xe, _mm256_fmadd_ps(odd8(lo), xo, sum[0]));
    sum[1] = _mm256_fmadd_ps(even8(hi), xe, _mm256_fmadd_ps(odd8(hi), xo, sum[1]));
}

AVX2 static void row_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, long n, long k,
                          int act) {
    const long steps = k / 2;
    for (long col = 0; col < n; col += 16, w += k * 16) {
        __m256 even[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256 odd[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        long s = 0;
        for (; s + 2 <= steps; s += 2) {
            pair_step(w + s * 32, x + 2 * s, even);
            pair_step(w + s * 32 + 32, x + 2 * s + 2, odd);
        }
        if (s < steps)
            pair_step(w + s * 32, x + 2 * s, even);
        out_bf16(y + col, b ? b + col : NULL, _mm256_add_ps(even[0], odd[0]), _mm256_add_ps(even[1], odd[1]), act);
    }
}

/* Every panel against the interleaved rows of one chunk, in blocks of MOST, 4, 2, 1 rows. */
#define CHUNK_RUN(kind, E, MOST)                                                                    \
    AVX2 static void chunk_##kind(const E *w, const float *rows, const E *b, E *y, long n, long k, long m, \
                                  int act) {                                                        \
        const long steps = k / (sizeof(E) == 2 ? 2 : 1);                                            \
        for (long col = 0; col < n; col += 16, w += k * 16) {                                       \
            const float *x = rows;                                                                  \
            for (long r = 0; r < m;) {                                                              \
                int mr = block_rows(m - r, MOST);                                                   \
                /* (the first block asks for the next panel, a line a step: a panel is `steps` lines) */ \
                const char *next = r == 0 && col + 16 < n ? (const char *)(w + k * 16) : NULL;      \
                kind##_blocks[mr](w, x, steps, mr, y + r * n + col, n, b ? b + col : NULL, act, next); \
                x += mr * k;                                                                        \
                r += mr;                                                                            \
            }                                                                                       \
        }                                                                                           \
    }
CHUNK_RUN(f32, float, F32_ROWS)
CHUNK_RUN(bf16, uint16_t, BF16_ROWS)

/* One row from x straight; more, CHUNK_ROWS at a time, interleaved; a row at a time where the
 * interleaved rows' memory cannot be had. */
#define ALL(kind, E, BF16)                                                                          \
    void panels_avx2_##kind(const E *w, const E *x, const E *b, E *y, long n, long k, long m, int act) { \
        long most = m < CHUNK_ROWS ? m : CHUNK_ROWS;                                                \
        float *rows = m > 1 ? PANELS_AVX2_ALLOC((size_t)most * k * sizeof(float)) : NULL;           \
        if (!rows) {                                                                                \
            for (long i = 0; i < m; i++)                                                            \
                row_##kind(w, x + i * k, b, y + i * n, n, k, act);                                  \
            return;                                                                                 \
        }                                                                                           \
        for (long r = 0; r < m; r += CHUNK_ROWS) {                                                  \
            long here = m - r < CHUNK_ROWS ? m - r : CHUNK_ROWS;                                    \
            interleave(x + r * k, BF16, rows, k, here);                                             \
            chunk_##kind(w, rows, b, y + r * n, n, k, here, act);                                   \
        }                                                                                           \
        free(rows);                                                                                 \
    }
ALL(f32, float, 0)
ALL(bf16, uint16_t, 1)

/* Whether this CPU runs these: AVX2 and FMA. */
int panels_avx2_runs(void) {
    return runs_avx2();
}
#else
void panels_avx2_f32(const float *w, const float *x, const float *b, float *y, long n, long k, long m, int act) {}
void panels_avx2_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, long n, long k, long m,
                      int act) {}
int panels_avx2_runs(void) { return 0; }
#endif
