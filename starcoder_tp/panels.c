/* Products y[m, n] = act(x[m, k] @ w^T + b) with the weight laid out in panels of 16 output columns
 * (panels.py): bf16 [N/16][K/2][16][2] (each K pair of a column side by side, as AVX512_BF16's dot
 * product takes it), fp32 [N/16][K][16]. AVX-512 (panels_avx2.c: the same on AVX2, chosen by panels_use); one
 * thread.
 *
 * A block of MR rows of x and NV panels keeps MR x NV accumulators of 16 output columns in
 * registers: per K step (a pair in bf16) it loads NV panel vectors and broadcasts each x row's
 * element(s) to them, from a copy of x with each block's rows interleaved step by step (interleave).
 * Each panel is read in order, a stream the hardware prefetcher follows, and the next block of
 * panels is asked for while the rows run against this one, so that the weight's read overlaps the
 * arithmetic (RESULTS.md, "Panels"). One row reads the panels one after the other instead
 * (ONE_ROW). The output is written a vector of 16 columns at a time, the bias added, the activation
 * applied (the MLP's first linear: one pass less over its output) and, in bf16, rounded once.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long row_ahead_bytes = 0; /* 0: ONE_ROW asks for nothing ahead (panels_row_ahead) */
static int block_asks_l2 = 0;     /* 0: blocks of rows ask for the next block into L1, 1: L2 (a branch: no cost) */

#if defined(__x86_64__) && defined(__GNUC__)
#include "simd.h"

#define MR 8  /* rows of x per block */
#define NV 3  /* panels per block: MR * NV = 24 accumulators */
#ifndef ROW_CHUNK
#define ROW_CHUNK 512  /* rows of x interleaved and run against every panel at a time (a multiple of 8) */
#endif
#ifndef CHUNK_STEPS
#define CHUNK_STEPS 1024  /* K steps per pass over a block of panels, where K is longer (SHAPES) */
#endif
/* Where the interleaved rows' and the chunk sums' memory come from: tests/test_panels.py builds
 * the library with either failing, to run the fallbacks a real call reaches only out of memory. */
#ifndef PANELS_ALLOC_ROWS
#define PANELS_ALLOC_ROWS malloc
#endif
#ifndef PANELS_ALLOC_SUMS
#define PANELS_ALLOC_SUMS malloc
#endif
#define ACT_GELU_TANH 1
#define ACT_RELU 2
#define BETA 0.7978845608028654f /* sqrt(2 / pi) */
#define KAPPA 0.044715f

/* The tanh GELU, 0.5 v (1 + tanh(u)), u = BETA (v + KAPPA v^3), as v / (1 + e^(-2u)) (the same
 * function; no cancellation in the negative tail, no division: a reciprocal and a Newton step, ~2^-28).
 * e^(-2u) is held within e^+-80 (e^80 and its reciprocal are normal floats); where -2u is 80 or more
 * (v below about -9.4, -inf included) the GELU is 0 to within 1e-33: 0. NaN stays NaN. Or relu. */
AVX512 INLINE __m512 activate(__m512 v, int act) {
    if (act == ACT_RELU)
        return _mm512_max_ps(_mm512_setzero_ps(), v);  /* (NaN kept: maxps gives its second operand then) */
    if (act != ACT_GELU_TANH)
        return v;
    __m512 minus_2u = _mm512_mul_ps(_mm512_set1_ps(-2.0f * BETA),
                                    _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(KAPPA), v), _mm512_mul_ps(v, v), v));
    __mmask16 kept = _mm512_cmp_ps_mask(minus_2u, _mm512_set1_ps(80.0f), _CMP_NGE_UQ);  /* < 80, or NaN */
    __m512 held = _mm512_max_ps(_mm512_min_ps(minus_2u, _mm512_set1_ps(80.0f)), _mm512_set1_ps(-80.0f));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_neg(held));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    return _mm512_maskz_mov_ps(kept, _mm512_mul_ps(v, r));
}

/* (BLOCK's, CHUNK's) step s: the next block's lines asked for into L1 or L2 (`l2`); its products summed. */
#define PREFETCH_STEP(s, NB_)                                                                      \
    for (int v = 0; v < NB_; v++)                                                                  \
        if (v < ahead)                                                                             \
            l2 ? _mm_prefetch((const char *)(next + v * panel) + (s) * 64, _MM_HINT_T1)            \
               : _mm_prefetch((const char *)(next + v * panel) + (s) * 64, _MM_HINT_T0)
#define MULTIPLY_STEP(LOAD_X, OP, s, MB_, NB_)                                                     \
    do {                                                                                           \
        __m512i wv[NB_];                                                                           \
        for (int v = 0; v < NB_; v++)                                                              \
            wv[v] = _mm512_loadu_si512((const char *)(w + v * panel) + (s) * 64);                  \
        for (int m = 0; m < MB_; m++) {                                                            \
            __m512i xb = LOAD_X(m, s);                                                             \
            for (int v = 0; v < NB_; v++)                                                          \
                acc[m][v] = OP(acc[m][v], wv[v], xb);                                              \
        }                                                                                          \
    } while (0)

/* (BLOCK's and CHUNK's) the K loop over `steps` steps: the next chunk's lines of every `stride`-th
 * step from `phase` on asked for (each of a block's `stride` row blocks asking for its share, so that
 * the requests run through the whole block's time: asked for all at once by the first rows, the lines
 * queued behind each other while the later rows ran with the memory idle, and 16 and 32 rows ran
 * 10-22% slower; RESULTS.md, "Panels' prefetch spread over the row blocks"), and the products summed. */
#define K_LOOP(LOAD_X, OP, MB_, NB_)                                                               \
    if (stride == 1) /* one row block: it asks for all of the next block's panels */               \
        for (long s = 0; s < steps; s++) {                                                         \
            PREFETCH_STEP(s, NB_);                                                                 \
            MULTIPLY_STEP(LOAD_X, OP, s, MB_, NB_);                                                \
        }                                                                                          \
    else                                                                                           \
        for (long s = 0, turn = 0; s < steps; s++) {                                               \
            if (turn == phase)                                                                     \
                PREFETCH_STEP(s, NB_);                                                             \
            if (++turn == stride)                                                                  \
                turn = 0;                                                                          \
            MULTIPLY_STEP(LOAD_X, OP, s, MB_, NB_);                                                \
        }

/* One block of MB_ rows and NB_ panels over the whole of K (constants: each shape compiled on its
 * own, its loops unrolled and its accumulators in registers). E: the element type; STEPS: K steps
 * (K / 2 in bf16, pairs); LOAD_X(m, s): row m's step s broadcast; OP: the multiply-add; BIAS(v): the
 * bias of panel v as fp32; STORE(m, v, s): the 16 outputs. `next`: the next block's first panel,
 * whose `ahead` panels are asked for as this block runs (0: none), as K_LOOP says. */
#define BLOCK(name, attr, E, STEPS, LOAD_X, OP, BIAS, STORE, MB_, NB_)                             \
    attr static __attribute__((noinline)) void name(const E *w, const E *x, const E *b, E *y, long n, long k, \
                                                   long col, const E *next, int ahead, int act, int phase, \
                                                   int stride) {                                   \
        __m512 acc[MB_][NB_];                                                                      \
        for (int m = 0; m < MB_; m++)                                                              \
            for (int v = 0; v < NB_; v++)                                                          \
                acc[m][v] = _mm512_setzero_ps();                                                   \
        const long panel = k * 16, steps = STEPS, mb = MB_;                                        \
        const int l2 = block_asks_l2;                                                              \
        K_LOOP(LOAD_X, OP, MB_, NB_)                                                               \
        for (int m = 0; m < MB_; m++)                                                              \
            for (int v = 0; v < NB_; v++) {                                                        \
                __m512 out = b ? _mm512_add_ps(acc[m][v], BIAS(v)) : acc[m][v];                    \
                STORE(m, v, activate(out, act));                                                   \
            }                                                                                      \
    }

/* BLOCK over a chunk of `steps` K steps (see SHAPES), its sums carried in `sums` ([MB_][NV][16]
 * fp32) from one chunk to the next: loaded, summed over the chunk, stored. BLOCK itself runs the
 * K that needs no chunks as before. */
#define CHUNK(name, attr, E, LOAD_X, OP, MB_, NB_)                                                 \
    attr static __attribute__((noinline)) void name(const E *w, const E *x, long k, const E *next, int ahead, \
                                                   int phase, int stride, long steps, float *sums) { \
        __m512 acc[MB_][NB_];                                                                      \
        for (int m = 0; m < MB_; m++)                                                              \
            for (int v = 0; v < NB_; v++)                                                          \
                acc[m][v] = _mm512_loadu_ps(sums + (m * NV + v) * 16);                            \
        const long panel = k * 16, mb = MB_;                                                       \
        const int l2 = block_asks_l2;                                                              \
        K_LOOP(LOAD_X, OP, MB_, NB_)                                                               \
        for (int m = 0; m < MB_; m++)                                                              \
            for (int v = 0; v < NB_; v++)                                                          \
                _mm512_storeu_ps(sums + (m * NV + v) * 16, acc[m][v]);                            \
    }

/* bf16: a K pair per step (64 bytes of a panel: 16 columns x 2). */
#define BF16_X(m, s) _mm512_set1_epi32((int)pair_at(x + 2 * ((s) * mb + (m))))
#define BF16_BIAS(v) _mm512_castsi512_ps(_mm512_slli_epi32(                                        \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + col + (v) * 16))), 16))
#define BF16_STORE(m, v, o) _mm256_storeu_si256((__m256i *)(y + (m) * n + col + (v) * 16),         \
                                                _mm512_cvtepi32_epi16(round_bf16(o)))
AVX512BF16 INLINE __m512 dot_bf16(__m512 a, __m512i w, __m512i x) { return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x); }
static inline uint32_t pair_at(const uint16_t *p) {
    uint32_t pair;
    memcpy(&pair, p, sizeof(pair));
    return pair;
}

/* fp32: a K element per step (64 bytes of a panel: 16 columns). */
#define F32_X(m, s) _mm512_castps_si512(_mm512_set1_ps(x[(s) * mb + (m)]))
#define F32_BIAS(v) _mm512_loadu_ps(b + col + (v) * 16)
#define F32_STORE(m, v, o) _mm512_storeu_ps(y + (m) * n + col + (v) * 16, o)
AVX512 INLINE __m512 fma_f32(__m512 a, __m512i w, __m512i x) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_castsi512_ps(x), a);
}

/* (SHAPES') the blocks of MB_ rows and 3, 2 or 1 panels, whole and in chunks. */
#define ROW_SHAPES(kind, attr, E, STEPS, X, OP, BIAS, STORE, MB_)                                  \
    BLOCK(kind##_##MB_##_3, attr, E, STEPS, X, OP, BIAS, STORE, MB_, 3)                            \
    BLOCK(kind##_##MB_##_2, attr, E, STEPS, X, OP, BIAS, STORE, MB_, 2)                            \
    BLOCK(kind##_##MB_##_1, attr, E, STEPS, X, OP, BIAS, STORE, MB_, 1)                            \
    CHUNK(kind##_chunk_##MB_##_3, attr, E, X, OP, MB_, 3)                                          \
    CHUNK(kind##_chunk_##MB_##_2, attr, E, X, OP, MB_, 2)                                          \
    CHUNK(kind##_chunk_##MB_##_1, attr, E, X, OP, MB_, 1)

/* One row of x: the panels one after the other, a single stream through the weight that the hardware
 * prefetcher follows to the end. In blocks of NV panels, which restarted NV streams every block, one
 * row took 2-12% longer in bf16 on the EPYC Zen 4 (RESULTS.md, "Start-up, one-row panels and the
 * decode glue on Zen 4"). Two sums of alternate K steps: one, two, four or eight read alike there;
 * one caps the stream at 64 bytes per dot product's latency, which a faster memory could reach.
 * With `ahead_bytes` (panels_row_ahead), each step also asks for the line that far past its own,
 * non-temporal: the weight then passes without evicting the rest of the decode step from the caches
 * (the kernel alone reads slower so, the step ran faster: RESULTS.md, "Non-temporal asks at one row").
 * The asks run past the weight's end; a prefetch does not fault (the address is formed as an integer). */
#define ROW_STEPS(ASK, LOAD_X, OP)                                                                 \
    for (; s + 2 <= steps; s += 2) {                                                               \
        ASK;                                                                                       \
        even = OP(even, _mm512_loadu_si512((const char *)w + s * 64), LOAD_X(0, s));               \
        odd = OP(odd, _mm512_loadu_si512((const char *)w + (s + 1) * 64), LOAD_X(0, s + 1));       \
    }
#define ASK_NTA                                                                                    \
    (_mm_prefetch((const char *)((uintptr_t)w + s * 64 + ahead_bytes), _MM_HINT_NTA),              \
     _mm_prefetch((const char *)((uintptr_t)w + s * 64 + ahead_bytes + 64), _MM_HINT_NTA))
#define ONE_ROW(name, attr, E, XS, LOAD_X, OP, BIAS, STORE)                                        \
    attr static void name(const E *w, const E *x, const E *b, E *y, long n, long k, int act, long ahead_bytes) { \
        const long steps = k / XS, panel = k * 16, mb = 1;                                         \
        for (long col = 0; col < n; col += 16, w += panel) {                                       \
            __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();                          \
            long s = 0;                                                                            \
            if (ahead_bytes)                                                                       \
                ROW_STEPS(ASK_NTA, LOAD_X, OP)                                                     \
            else                                                                                   \
                ROW_STEPS((void)0, LOAD_X, OP)                                                     \
            if (s < steps)                                                                         \
                even = OP(even, _mm512_loadu_si512((const char *)w + s * 64), LOAD_X(0, s));       \
            __m512 out = _mm512_add_ps(even, odd);                                                 \
            out = b ? _mm512_add_ps(out, BIAS(0)) : out;                                           \
            STORE(0, 0, activate(out, act));                                                       \
        }                                                                                          \
    }

/* The rows of x's next block, of `left` rows left: 8, 4, 2 or 1 (the blocks SHAPES compiles). */
static inline int block_rows(long left) {
    return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

/* x's rows, in the blocks _all runs them in (8, 4, 2, 1 rows), each block's rows interleaved step by
 * step ([steps][mr] units of 4 bytes: an fp32 element, a bf16 pair), so that a step's broadcasts read
 * one line: rows side by side put a block's 8 lines a row apart, which a K of 1024 fp32 lays in one set
 * of the L1 cache, with the panels' lines (64 KiB apart, a multiple of 4 KiB too). Blocks of 8 rows by
 * 16 steps go through registers, a third of the cost of one unit at a time (RESULTS.md, "Panels' rows
 * interleaved"). */
AVX512 static void interleave(const void *x, void *rows, long steps, long m) {
    const __m512i low = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    const char *from = x;
    char *to = rows;
    for (long r = 0; r < m;) {
        int mr = block_rows(m - r);
        long s = 0;
        for (; mr == 8 && s + 16 <= steps; s += 16) {
            __m512 v[8], t[8], u[8];
            for (int i = 0; i < 8; i++)
                v[i] = _mm512_loadu_ps(from + 4 * (i * steps + s));
            for (int i = 0; i < 8; i += 2) { /* per 128-bit lane l: rows i, i + 1 at steps 4l, 4l + 1 | 4l + 2, 4l + 3 */
                t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
                t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
            }
            for (int h = 0; h < 8; h += 4) /* u[h + j], lane l: rows h..h + 3 at step 4l + j */
                for (int j = 0; j < 4; j += 2) {
                    u[h + j] = _mm512_shuffle_ps(t[h + j / 2], t[h + 2 + j / 2], 0x44);
                    u[h + j + 1] = _mm512_shuffle_ps(t[h + j / 2], t[h + 2 + j / 2], 0xEE);
                }
            for (int j = 0; j < 4; j++) /* step 4l + j's 8 rows: lane l of u[j], then of u[4 + j] */
                for (int half = 0; half < 2; half++) {
                    __m512d both = _mm512_castps_pd(_mm512_permutex2var_ps(u[j], half ? high : low, u[4 + j]));
                    _mm256_storeu_pd((double *)(to + 32 * (s + 8 * half + j)), _mm512_castpd512_pd256(both));
                    _mm256_storeu_pd((double *)(to + 32 * (s + 8 * half + 4 + j)), _mm512_extractf64x4_pd(both, 1));
                }
        }
        for (; s < steps; s++)
            for (int i = 0; i < mr; i++)
                memcpy(to + 4 * (s * mr + i), from + 4 * (i * steps + s), 4);
        from += 4 * mr * steps, to += 4 * mr * steps;
        r += mr;
    }
}

/* XS: elements of x per K step (a step is 64 bytes of a panel, 16 * XS elements). */
#define SHAPES(kind, attr, E, XS, X, OP, BIAS, STORE)                                              \
    ONE_ROW(kind##_row, attr, E, XS, X, OP, BIAS, STORE)                                           \
    ROW_SHAPES(kind, attr, E, k / XS, X, OP, BIAS, STORE, 8)                                       \
    ROW_SHAPES(kind, attr, E, k / XS, X, OP, BIAS, STORE, 4)                                       \
    ROW_SHAPES(kind, attr, E, k / XS, X, OP, BIAS, STORE, 2)                                       \
    ROW_SHAPES(kind, attr, E, k / XS, X, OP, BIAS, STORE, 1)                                       \
    typedef void (*kind##_fn)(const E *, const E *, const E *, E *, long, long, long, const E *, int, int, int, int); \
    static const kind##_fn kind##_shapes[4][NV] = {{kind##_8_1, kind##_8_2, kind##_8_3},           \
                                                   {kind##_4_1, kind##_4_2, kind##_4_3},           \
                                                   {kind##_2_1, kind##_2_2, kind##_2_3},           \
                                                   {kind##_1_1, kind##_1_2, kind##_1_3}};          \
    typedef void (*kind##_chunk_fn)(const E *, const E *, long, const E *, int, int, int, long, float *); \
    static const kind##_chunk_fn kind##_chunks[4][NV] = {                                          \
        {kind##_chunk_8_1, kind##_chunk_8_2, kind##_chunk_8_3},                                    \
        {kind##_chunk_4_1, kind##_chunk_4_2, kind##_chunk_4_3},                                    \
        {kind##_chunk_2_1, kind##_chunk_2_2, kind##_chunk_2_3},                                    \
        {kind##_chunk_1_1, kind##_chunk_1_2, kind##_chunk_1_3}};                                   \
    /* A long K in chunks of up to CHUNK_STEPS steps, every row block against a block's chunk before the  \
     * next chunk: the chunk stays in the L2 cache and a row block's x in L1. Whole, a K of 4096 ran \
     * 11-19% below a K of 1024 at 16 rows (RESULTS.md, "Panels in chunks of K"). The sums are \
     * carried in `part` ([m][NV][16] fp32), bias, activation and output after the last chunk. */  \
    attr static void kind##_chunked(const E *w, const E *x, const E *b, E *y, long n, long k, long m, int act, \
                                    float *part, int blocks) {                                     \
        long panels = n / 16, total = k / XS, count = (total + CHUNK_STEPS - 1) / CHUNK_STEPS;     \
        long chunk = (total + count - 1) / count; /* (chunks of one length: each asks for the next's) */ \
        for (long p = 0; p < panels; p += NV) {                                                    \
            int nv = panels - p < NV ? (int)(panels - p) : NV;                                     \
            memset(part, 0, (size_t)m * NV * 16 * sizeof(float));                                  \
            for (long c = 0; c < total; c += chunk) {                                              \
                long len = total - c < chunk ? total - c : chunk;                                  \
                const E *here = w + p * k * 16 + c * 16 * XS, *next = here + len * 16 * XS;        \
                int ahead = nv; /* the next chunk of these panels, or the next block's first */    \
                if (c + len == total) {                                                            \
                    long left = panels - (p + NV);                                                 \
                    ahead = left <= 0 ? 0 : left < NV ? (int)left : NV;                            \
                    next = w + (ahead ? p + NV : p) * k * 16;                                      \
                }                                                                                  \
                for (long r = 0, j = 0; r < m; j++) {                                              \
                    int mr = block_rows(m - r);                                                    \
                    kind##_chunks[mr == 8 ? 0 : mr == 4 ? 1 : mr == 2 ? 2 : 3][nv - 1](            \
                        here, x + r * k + c * XS * mr, k, next, ahead, (int)j, blocks, len, part + r * NV * 16); \
                    r += mr;                                                                       \
                }                                                                                  \
            }                                                                                      \
            const long col = p * 16;                                                               \
            for (long r = 0; r < m; r++)                                                           \
                for (int v = 0; v < nv; v++) {                                                     \
                    __m512 out = _mm512_loadu_ps(part + (r * NV + v) * 16);                        \
                    out = b ? _mm512_add_ps(out, BIAS(v)) : out;                                   \
                    STORE(r, v, activate(out, act));                                               \
                }                                                                                  \
        }                                                                                          \
    }                                                                                              \
    /* Every row of the interleaved x against the panels: in blocks of NV panels, each against every \
     * row in blocks of 8, 4, 2, 1 rows (K in chunks where it is long and `part` was had). */     \
    attr static void kind##_rows(const E *w, const E *x, const E *b, E *y, long n, long k, long m, int act, \
                                 float *part) {                                                    \
        long panels = n / 16;                                                                      \
        int blocks = 0; /* row blocks: each asks for its share of the next block's panels */       \
        for (long r = 0; r < m; blocks++)                                                          \
            r += block_rows(m - r);                                                                \
        if (part) {                                                                                \
            kind##_chunked(w, x, b, y, n, k, m, act, part, blocks);                                \
            return;                                                                                \
        }                                                                                          \
        for (long p = 0; p < panels; p += NV) {                                                    \
            int nv = panels - p < NV ? (int)(panels - p) : NV;                                     \
            for (long r = 0, j = 0; r < m; j++) {                                                  \
                int mr = block_rows(m - r);                                                        \
                long left = panels - (p + NV); /* the next block's panels: asked for by every row block */ \
                int ahead = left <= 0 ? 0 : left < NV ? (int)left : NV;                            \
                kind##_shapes[mr == 8 ? 0 : mr == 4 ? 1 : mr == 2 ? 2 : 3][nv - 1](                \
                    w + p * k * 16, x + r * k, b, y + r * n, n, k, p * 16, w + (ahead ? p + NV : p) * k * 16, \
                    ahead, act, (int)j, blocks);                                                   \
                r += mr;                                                                           \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    /* One row by ONE_ROW; more ROW_CHUNK rows at a time, each chunk's rows interleaved, then run \
     * against every panel (kind##_rows), so that a chunk's x stays in the caches while the panels \
     * pass. */                                                                                    \
    attr static void kind##_all(const E *w, const E *x, const E *b, E *y, long n, long k, long m, int act) { \
        if (m == 1) { /* (asking ahead only where panel_asks.py measured that the step gains) */  \
            kind##_row(w, x, b, y, n, k, act, row_ahead_bytes);                                    \
            return;                                                                                \
        }                                                                                          \
        const long most = m < ROW_CHUNK ? m : ROW_CHUNK;                                           \
        E *rows = PANELS_ALLOC_ROWS((size_t)most * k * sizeof(E));                                 \
        /* (where the sums' memory cannot be had: K whole; none where the rows run one by one) */ \
        float *part = rows && k / XS > CHUNK_STEPS ? PANELS_ALLOC_SUMS((size_t)most * NV * 16 * sizeof(float)) : NULL; \
        for (long r = 0; r < m; r += most) {                                                       \
            long here = m - r < most ? m - r : most;                                               \
            if (rows) {                                                                            \
                interleave(x + r * k, rows, k / XS, here);                                         \
                kind##_rows(w, rows, b, y + r * n, n, k, here, act, part);                         \
            } else /* (where the interleaved rows' memory cannot be had: a row at a time) */       \
                for (long i = r; i < r + here; i++)                                                \
                    kind##_row(w, x + i * k, b, y + i * n, n, k, act, 0);                          \
        }                                                                                          \
        free(part);                                                                                \
        free(rows);                                                                                \
    }

SHAPES(bf16, AVX512BF16, uint16_t, 2, BF16_X, dot_bf16, BF16_BIAS, BF16_STORE)
SHAPES(f32, AVX512, float, 1, F32_X, fma_f32, F32_BIAS, F32_STORE)
#endif

/* Which kernels run (panels_use): AVX-512's for fp32 and for bf16 (AVX512_BF16), AVX2's (panels_avx2.c). */
static int chosen = 0, wide_f32 = 0, wide_bf16 = 0, avx2 = 0;
int panels_dtypes(void);
int panels_avx2_runs(void);
void panels_avx2_f32(const float *, const float *, const float *, float *, long, long, long, int);
void panels_avx2_bf16(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, long, long, long, int);

/* The widest kernels to run from now on (3: AVX512_BF16, 2: AVX-512, 1: AVX2, 0: none), narrowed to what
 * this CPU runs (rowdot_use calls it with the path it takes); returns panels_dtypes(): 1 fp32, 2 bf16,
 * summed; 0 none. A call panels_dtypes does not name aborts (unrun). */
int panels_use(int level) {
#if defined(__x86_64__) && defined(__GNUC__)
    wide_f32 = level >= 2 && runs_avx512();
    wide_bf16 = level >= 3 && runs_avx512_bf16();
#endif
    avx2 = level >= 1 && panels_avx2_runs();
    chosen = 1;
    return panels_dtypes();
}

int panels_dtypes(void) {
    if (!chosen)
        return panels_use(3);
    return 1 * (wide_f32 || avx2) + 2 * (wide_bf16 || avx2);
}

/* The widest vectors the kernels run (2: AVX-512's, 1: AVX2's, 0: none): fused_step.c's and rotary.c's forms
 * follow it, so that a narrowed path stands in for a narrower CPU in a whole fused step. */
int panels_width(void) {
    if (!chosen)
        panels_use(3);
    return wide_f32 ? 2 : avx2 ? 1 : 0;
}

/* The process's choices, measured on its decode step (panel_asks.py), each returning the previous: how far ahead
 * one-row calls ask for the weight, non-temporal (bytes, a multiple of 64; 0: nothing); where blocks of rows ask
 * for the next block of panels (0: L1, 1: L2). */
long panels_row_ahead(long bytes) {
    long previous = row_ahead_bytes;
    row_ahead_bytes = bytes;
    return previous;
}

int panels_block_asks(int l2) {
    int previous = block_asks_l2;
    block_asks_l2 = l2 != 0;
    return previous;
}

/* A call of a dtype panels_dtypes does not name (a weight laid out before the path was narrowed): no output
 * to leave unwritten. */
static void unrun(const char *dtype) {
    fprintf(stderr, "panels.c: a %s call, but no panels kernel of that dtype runs on this path (panels_use)\n", dtype);
    abort();
}

/* y[m, n] = act(x[m, k] @ w^T + b), w in panels (n a multiple of 16; bf16: k even), b may be NULL;
 * act: 0 none, 1 tanh GELU, 2 relu. Only for the dtypes panels_dtypes names (after panels_use). */
void panels_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, long n, long k, long m,
                 int act) {
    if (!chosen)
        panels_use(3);
#if defined(__x86_64__) && defined(__GNUC__)
    if (wide_bf16) {
        bf16_all(w, x, b, y, n, k, m, act);
        return;
    }
#endif
    if (!avx2)
        unrun("bf16");
    panels_avx2_bf16(w, x, b, y, n, k, m, act);
}

void panels_f32(const float *w, const float *x, const float *b, float *y, long n, long k, long m, int act) {
    if (!chosen)
        panels_use(3);
#if defined(__x86_64__) && defined(__GNUC__)
    if (wide_f32) {
        f32_all(w, x, b, y, n, k, m, act);
        return;
    }
#endif
    if (!avx2)
        unrun("fp32");
    panels_avx2_f32(w, x, b, y, n, k, m, act);
}
