/* One-row products y[n] = dot(W[n, :], x) + b[n] of a plain row-major [N, K] weight, fp32 or
 * bf16 (fp32 sums, bf16 rounded once at the end, as the libraries' bf16 GEMMs do). One thread.
 *
 * A one-row product reads each weight element once for one multiply-add: it runs at the speed of
 * memory if it keeps enough loads in flight. ROWS weight rows are summed at once, each into its own
 * accumulator, so that ROWS streams are read side by side (rowdot.py says why this exists).
 *
 * Built at first use by rowdot.py with the machine's C compiler. Each path is compiled for its
 * own instruction set (target attributes) and the widest one this CPU runs is taken at load: the
 * paths sum the same products in different orders. On the EPYC Zen 5 each wider path read
 * weights faster than the narrower ones, in fp32 and bf16 (RESULTS.md, "A one-row kernel of our
 * own"). Whether the kernel pays against the libraries' is measured per weight like every kernel
 * (kernels.py).
 */
#include <stdint.h>
#include <string.h>

#define ROWS 8

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* The portable path: any CPU the compiler targets. */
static void f32_scalar(const float *w, const float *x, const float *b, float *y, long n, long k) {
    for (long i = 0; i < n; i++) {
        float s = 0.0f;
        for (long j = 0; j < k; j++)
            s += w[i * k + j] * x[j];
        y[i] = b ? s + b[i] : s;
    }
}

static void bf16_scalar(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, long n, long k) {
    for (long i = 0; i < n; i++) {
        float s = 0.0f;
        for (long j = 0; j < k; j++)
            s += bf16_to_f32(w[i * k + j]) * bf16_to_f32(x[j]);
        y[i] = f32_to_bf16(b ? s + bf16_to_f32(b[i]) : s);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86 1

/* A path's product: blocks of ROWS weight rows (then single rows for the rest) by its rows_fn,
 * each sum finished by OUT (bias added; bf16: rounded once). */
#define BLOCKS(name, rows_fn, attr, E, OUT)                                                           \
    attr static void name(const E *w, const E *x, const E *b, E *y, long n, long k) {                \
        float s[ROWS];                                                                                \
        for (long i = 0; i < n; i += ROWS) {                                                          \
            int r = n - i < ROWS ? (int)(n - i) : ROWS;                                               \
            if (r == ROWS) /* (a constant count: the loops unroll) */                                 \
                rows_fn(w + i * k, x, s, ROWS, k);                                                    \
            else                                                                                      \
                for (int q = 0; q < r; q++)                                                           \
                    rows_fn(w + (i + q) * k, x, s + q, 1, k);                                         \
            for (int q = 0; q < r; q++)                                                               \
                y[i + q] = OUT(s[q], b, i + q);                                                       \
        }                                                                                             \
    }
#define F32_OUT(sum, b, at) ((b) ? (sum) + (b)[at] : (sum))
#define BF16_OUT(sum, b, at) f32_to_bf16((b) ? (sum) + bf16_to_f32((b)[at]) : (sum))

/* Each vector path: a block of R rows (R = ROWS, then single rows for the rest), a vector of
 * the row at a time, the last partial vector masked (AVX-512) or summed one by one (AVX2). */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define AVX2 __attribute__((target("avx2,fma")))

AVX512 static inline __attribute__((always_inline)) void f32_avx512_rows(const float *w, const float *x, float *s, int r, long k) {
    __m512 acc[ROWS];
    long full = k & ~15L;
    __mmask16 tail = (__mmask16)((1u << (k - full)) - 1);
    for (int i = 0; i < r; i++)
        acc[i] = _mm512_setzero_ps();
    for (long j = 0; j < full; j += 16) {
        __m512 xv = _mm512_loadu_ps(x + j);
        for (int i = 0; i < r; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i * k + j), xv, acc[i]);
    }
    if (tail) {
        __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
        for (int i = 0; i < r; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + i * k + full), xv, acc[i]);
    }
    for (int i = 0; i < r; i++)
        s[i] = _mm512_reduce_add_ps(acc[i]);
}

BLOCKS(f32_avx512, f32_avx512_rows, AVX512, float, F32_OUT)

/* bf16 pairs multiplied and summed into fp32 by the CPU's own instruction (AVX512_BF16). */
AVX512BF16 static inline __attribute__((always_inline)) void bf16_dp_rows(const uint16_t *w, const uint16_t *x, float *s, int r, long k) {
    __m512 acc[ROWS];
    long full = k & ~31L;
    __mmask32 tail = (__mmask32)((1ull << (k - full)) - 1);
    for (int i = 0; i < r; i++)
        acc[i] = _mm512_setzero_ps();
    for (long j = 0; j < full; j += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j);
        for (int i = 0; i < r; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(w + i * k + j), xv);
    }
    if (tail) {
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full);
        for (int i = 0; i < r; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + i * k + full), xv);
    }
    for (int i = 0; i < r; i++)
        s[i] = _mm512_reduce_add_ps(acc[i]);
}

/* Without the BF16 instructions a vector of bf16 pairs is read as fp32 twice, with no conversion:
 * each 32-bit lane's high half, the odd element, is an fp32 number once the low half is masked
 * off, and the low half, the even element, once shifted up. The weight's and the row's lanes pair
 * up alike. On the EPYC Zen 5 this read bf16 weights at 41-42 GB/s on AVX-512 and 29-35 on AVX2,
 * where widening each element to fp32 first read at 36-38 and 27-28 (RESULTS.md). */
AVX512 static inline __attribute__((always_inline)) __m512 even512(__m512i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

AVX512 static inline __attribute__((always_inline)) __m512 odd512(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

AVX512 static inline __attribute__((always_inline)) void bf16_avx512_rows(const uint16_t *w, const uint16_t *x, float *s, int r, long k) {
    __m512 acc[ROWS];
    long full = k & ~31L;
    __mmask32 tail = (__mmask32)((1ull << (k - full)) - 1);
    for (int i = 0; i < r; i++)
        acc[i] = _mm512_setzero_ps();
    for (long j = 0; j < full; j += 32) {
        __m512i xv = _mm512_loadu_si512(x + j);
        __m512 xe = even512(xv), xo = odd512(xv);
        for (int i = 0; i < r; i++) {
            __m512i wv = _mm512_loadu_si512(w + i * k + j);
            acc[i] = _mm512_fmadd_ps(odd512(wv), xo, _mm512_fmadd_ps(even512(wv), xe, acc[i]));
        }
    }
    if (tail) {
        __m512i xv = _mm512_maskz_loadu_epi16(tail, x + full);
        __m512 xe = even512(xv), xo = odd512(xv);
        for (int i = 0; i < r; i++) {
            __m512i wv = _mm512_maskz_loadu_epi16(tail, w + i * k + full);
            acc[i] = _mm512_fmadd_ps(odd512(wv), xo, _mm512_fmadd_ps(even512(wv), xe, acc[i]));
        }
    }
    for (int i = 0; i < r; i++)
        s[i] = _mm512_reduce_add_ps(acc[i]);
}


BLOCKS(bf16_avx512bf16, bf16_dp_rows, AVX512BF16, uint16_t, BF16_OUT)
BLOCKS(bf16_avx512, bf16_avx512_rows, AVX512, uint16_t, BF16_OUT)

AVX2 static inline __attribute__((always_inline)) float hsum256(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}

AVX2 static inline __attribute__((always_inline)) void f32_avx2_rows(const float *w, const float *x, float *s, int r, long k) {
    __m256 acc[ROWS];
    long full = k & ~7L;
    for (int i = 0; i < r; i++)
        acc[i] = _mm256_setzero_ps();
    for (long j = 0; j < full; j += 8) {
        __m256 xv = _mm256_loadu_ps(x + j);
        for (int i = 0; i < r; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i * k + j), xv, acc[i]);
    }
    for (int i = 0; i < r; i++) {
        s[i] = hsum256(acc[i]);
        for (long j = full; j < k; j++)
            s[i] += w[i * k + j] * x[j];
    }
}

BLOCKS(f32_avx2, f32_avx2_rows, AVX2, float, F32_OUT)

AVX2 static inline __attribute__((always_inline)) __m256 even256(__m256i v) {  /* as even512 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

AVX2 static inline __attribute__((always_inline)) __m256 odd256(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

AVX2 static inline __attribute__((always_inline)) void bf16_avx2_rows(const uint16_t *w, const uint16_t *x, float *s, int r, long k) {
    __m256 acc[ROWS];
    long full = k & ~15L;
    for (int i = 0; i < r; i++)
        acc[i] = _mm256_setzero_ps();
    for (long j = 0; j < full; j += 16) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + j));
        __m256 xe = even256(xv), xo = odd256(xv);
        for (int i = 0; i < r; i++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + i * k + j));
            acc[i] = _mm256_fmadd_ps(odd256(wv), xo, _mm256_fmadd_ps(even256(wv), xe, acc[i]));
        }
    }
    for (int i = 0; i < r; i++) {
        s[i] = hsum256(acc[i]);
        for (long j = full; j < k; j++)
            s[i] += bf16_to_f32(w[i * k + j]) * bf16_to_f32(x[j]);
    }
}

BLOCKS(bf16_avx2, bf16_avx2_rows, AVX2, uint16_t, BF16_OUT)
#endif

typedef void (*f32_fn)(const float *, const float *, const float *, float *, long, long);
typedef void (*bf16_fn)(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, long, long);

static f32_fn f32_path = f32_scalar;
static bf16_fn bf16_path = bf16_scalar;

int panels_use(int level); /* (panels.c) */

/* rowdot_use's choice, handed on to panels.c: a narrower path stands in for a narrower CPU there too. */
static const char *taking(const char *name) {
    panels_use(!strcmp(name, "avx512bf16") ? 3 : !strcmp(name, "avx512") ? 2 : !strcmp(name, "avx2") ? 1 : 0);
    return name;
}

/* Takes the path named (scalar, avx2, avx512, avx512bf16) if this CPU runs it, or, for NULL, the
 * widest one it runs; returns the name of the path taken, NULL where the CPU lacks the one named. */
const char *rowdot_use(const char *name) {
    int x86 = 0, avx2 = 0, avx512 = 0, bf16 = 0;
#ifdef X86
    x86 = 1;
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
#endif
    if (!name)
        name = bf16 ? "avx512bf16" : avx512 ? "avx512" : avx2 ? "avx2" : "scalar";
    if (!strcmp(name, "scalar")) {
        f32_path = f32_scalar;
        bf16_path = bf16_scalar;
        return taking("scalar");
    }
    (void)x86;
#ifdef X86
    if (!strcmp(name, "avx2") && avx2) {
        f32_path = f32_avx2;
        bf16_path = bf16_avx2;
        return taking("avx2");
    }
    if (!strcmp(name, "avx512") && avx512) {
        f32_path = f32_avx512;
        bf16_path = bf16_avx512;
        return taking("avx512");
    }
    if (!strcmp(name, "avx512bf16") && bf16) {
        f32_path = f32_avx512;
        bf16_path = bf16_avx512bf16;
        return taking("avx512bf16");
    }
#endif
    return NULL;
}

void rowdot_f32(const float *w, const float *x, const float *b, float *y, long n, long k) {
    f32_path(w, x, b, y, n, k);
}

void rowdot_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, long n, long k) {
    bf16_path(w, x, b, y, n, k);
}
