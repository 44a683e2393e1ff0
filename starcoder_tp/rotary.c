/* RoPE's rotation of queries or keys in place (rotary.py), the neox form of
 * starcoder2.apply_rotary: x * cos + rotated * sin, rotated = (-x[D/2:], x[:D/2]), each head's two
 * halves turned against each other. Torch ran it as five passes (the negation, the concatenation,
 * two products, the sum), each into a new tensor; here one pass reads and writes each value once.
 * Each product and the sum are rounded as torch rounds them (fp32; bf16: to bf16 after each, as
 * its elementwise ops do), and the library is built with -ffp-contract=off (no fused multiply-add):
 * the same bits as torch's. Portable C, vectorised by the compiler. fused_step.c rotates its q and k by it too.
 */
#include <stdint.h>
#include <string.h>

static inline float widen(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* to nearest even, NaN kept quiet: as torch's (no branch: vectorised) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* One head's D values turned in place, its halves at lo and lo + half; c, s: its D angles' cos, sin. */
typedef void turn_head(void *lo, const void *c, const void *s, long half);

static void turn_f32(void *head, const void *cos, const void *sin, long half) {
    float *restrict lo = head, *restrict hi = lo + half;
    const float *restrict c = cos, *restrict s = sin;
    for (long e = 0; e < half; e++) {
        const float x1 = lo[e], x2 = hi[e];
        const float a = x1 * c[e], r = -x2 * s[e];
        const float a2 = x2 * c[e + half], r2 = x1 * s[e + half];
        lo[e] = a + r;
        hi[e] = a2 + r2;
    }
}

/* bf16: each value widened, each product and the sum rounded back (inlined into each form below). */
static inline __attribute__((always_inline)) void turn_bf16_in(void *head, const void *cos, const void *sin,
                                                               long half) {
    uint16_t *restrict lo = head, *restrict hi = lo + half;
    const uint16_t *restrict c = cos, *restrict s = sin;
    for (long e = 0; e < half; e++) {
        const float x1 = widen(lo[e]), x2 = widen(hi[e]);
        const float a = widen(to_bf16(x1 * widen(c[e]))), r = widen(to_bf16(-x2 * widen(s[e])));
        const float a2 = widen(to_bf16(x2 * widen(c[e + half]))), r2 = widen(to_bf16(x1 * widen(s[e + half])));
        lo[e] = to_bf16(a + r);
        hi[e] = to_bf16(a2 + r2);
    }
}

static void turn_bf16(void *head, const void *cos, const void *sin, long half) {
    turn_bf16_in(head, cos, sin, half);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include "simd.h"
/* The same loop in AVX2's and AVX-512's vectors: widened and narrowed in the baseline's 16-byte
 * vectors, the bf16 form ran slower than torch's five passes (0.73 against 0.50 ms for a layer's q
 * and k at 512 tokens on the EPYC Zen 4). */
AVX512 static void turn_bf16_avx512(void *head, const void *cos, const void *sin, long half) {
    turn_bf16_in(head, cos, sin, half);
}

__attribute__((target("avx2"))) static void turn_bf16_avx2(void *head, const void *cos, const void *sin, long half) {
    turn_bf16_in(head, cos, sin, half);
}
#endif

/* x: [B][T][H][D] of `size`-byte values, element strides sb, st, sh between batches, tokens and
 * heads (D contiguous); cos, sin: [B][T][D] contiguous. */
static void each_head(char *x, long b, long t, long h, long d, long sb, long st, long sh, const char *cos,
                      const char *sin, long size, turn_head *turn) {
    for (long i = 0; i < b; i++)
        for (long j = 0; j < t; j++) {
            const long angles = (i * t + j) * d * size;
            for (long k = 0; k < h; k++)
                turn(x + (i * sb + j * st + k * sh) * size, cos + angles, sin + angles, d / 2);
        }
}

void rotary_f32(float *x, long b, long t, long h, long d, long sb, long st, long sh,
                const float *cos, const float *sin) {
    each_head((char *)x, b, t, h, d, sb, st, sh, (const char *)cos, (const char *)sin, sizeof *x, turn_f32);
}

/* `wide`: 2 for the AVX-512 form, 1 for AVX2's, 0 for the baseline's (rotary.py: the widest the
 * kernels' path allows); a form this CPU does not run falls to the next. */
void rotary_bf16(uint16_t *x, long b, long t, long h, long d, long sb, long st, long sh,
                 const uint16_t *cos, const uint16_t *sin, int wide) {
    turn_head *turn = turn_bf16;
#if defined(__x86_64__) && defined(__GNUC__)
    if (wide >= 2 && runs_avx512())
        turn = turn_bf16_avx512;
    else if (wide >= 1 && __builtin_cpu_supports("avx2"))
        turn = turn_bf16_avx2;
#endif
    (void)wide;
    each_head((char *)x, b, t, h, d, sb, st, sh, (const char *)cos, (const char *)sin, sizeof *x, turn);
}
