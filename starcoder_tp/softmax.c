/* The causal softmax of a block of prefill scores, in place (softmax.py): AVX-512; one thread.
 *
 * causal_blocks (attention.py) scores a block of n query tokens of h heads each against the keys
 * up to the block's last token: [G][n][h][t1] scores, the block's first token at t0, so that row
 * (token i, any head) sees keys 0..t0 + i. Torch ran that as three passes and two more (the scale,
 * the causal mask's -inf on the block's own keys, the softmax, whose bf16 form widens and rounds
 * in each); here each row is read for its maximum, written with e^(x - max) (fp32 sums), then
 * scaled by the sum's reciprocal and the keys it does not see set to 0. bf16 scores are widened as
 * read and the probabilities rounded once.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include "simd.h"

#define LANES 16

AVX512 INLINE __mmask16 first(long count) { /* the first `count` (< 16) lanes */
    return (__mmask16)((1u << count) - 1u);
}

AVX512 INLINE __m512 load_row(const void *row, long j, __mmask16 lanes, int bf16) {
    if (!bf16)
        return _mm512_maskz_loadu_ps(lanes, (const float *)row + j);
    __m256i h = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)row + j);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AVX512 INLINE void store_row(void *row, long j, __mmask16 lanes, __m512 v, int bf16) {
    if (!bf16)
        _mm512_mask_storeu_ps((float *)row + j, lanes, v);
    else
        _mm256_mask_storeu_epi16((uint16_t *)row + j, lanes, _mm512_cvtepi32_epi16(round_bf16(v)));
}

/* One row of t1 scores that sees its first `seen` (1..t1): probabilities in place; `ex` holds
 * t1 floats (the e^x of the seen keys, before the sum is known). */
AVX512 static void softmax_row(void *row, long seen, long t1, float scale, float *ex, int bf16) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (long j = 0; j < seen; j += LANES) {
        __mmask16 lanes = seen - j >= LANES ? (__mmask16)0xffff : first(seen - j);
        top = _mm512_mask_max_ps(top, lanes, top, load_row(row, j, lanes, bf16));
    }
    /* scale > 0: the scaled row's maximum is the scaled maximum. e^x below -87 (exp_neg's range ends
     * there) is 0, as torch's; a NaN among the keys a row sees stays NaN and makes the row NaN, as
     * torch's (a NaN past the row's last key, which torch's -inf mask also turns into a NaN row, is
     * never read here). */
    const __m512 vs = _mm512_set1_ps(scale), shift = _mm512_set1_ps(-scale * _mm512_reduce_max_ps(top));
    const __m512 floor = _mm512_set1_ps(-87.0f);
    __m512 total = _mm512_setzero_ps();
    for (long j = 0; j < seen; j += LANES) {
        __mmask16 lanes = seen - j >= LANES ? (__mmask16)0xffff : first(seen - j);
        __m512 x = _mm512_fmadd_ps(load_row(row, j, lanes, bf16), vs, shift);
        __mmask16 live = _mm512_mask_cmp_ps_mask(lanes, x, floor, _CMP_NLT_UQ);  /* >= -87, or NaN */
        __m512 p = _mm512_maskz_mov_ps(live, exp_neg(_mm512_max_ps(floor, x)));  /* (max: NaN, its second, kept) */
        _mm512_storeu_ps(ex + j, p);
        total = _mm512_add_ps(total, p);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (long j = 0; j < t1; j += LANES) {
        __mmask16 lanes = t1 - j >= LANES ? (__mmask16)0xffff : first(t1 - j);
        __m512 p = j < seen ? _mm512_mul_ps(_mm512_loadu_ps(ex + j), inv) : _mm512_setzero_ps(); /* (ex: 0 past seen) */
        store_row(row, j, lanes, p, bf16);
    }
}

/* scores [groups][n][h][t1], fp32 or bf16 (the uint16_t bits): row (g, i, head) becomes
 * softmax(scale * its first t0 + i + 1 scores), then zeros. Returns 0, or -1 where the scratch
 * row could not be had (nothing written). */
AVX512 static int causal_all(void *scores, long groups, long n, long h, long t1, long t0, float scale, int bf16) {
    float *ex = aligned_alloc(64, (size_t)((t1 + LANES - 1) / LANES * LANES) * sizeof(float));
    if (!ex)
        return -1;
    const long size = bf16 ? 2 : 4;
    for (long g = 0; g < groups; g++)
        for (long i = 0; i < n; i++)
            for (long head = 0; head < h; head++)
                softmax_row((char *)scores + ((g * n + i) * h + head) * t1 * size, t0 + i + 1, t1, scale, ex, bf16);
    free(ex);
    return 0;
}
#endif

/* Whether this CPU runs causal_softmax_f32 / causal_softmax_bf16: AVX-512 (F, BW, VL). */
int causal_softmax_supported(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return runs_avx512();
#else
    return 0;
#endif
}

int causal_softmax_f32(float *scores, long groups, long n, long h, long t1, long t0, float scale) {
#if defined(__x86_64__) && defined(__GNUC__)
    return causal_all(scores, groups, n, h, t1, t0, scale, 0);
#else
    return -1;
#endif
}

int causal_softmax_bf16(uint16_t *scores, long groups, long n, long h, long t1, long t0, float scale) {
#if defined(__x86_64__) && defined(__GNUC__)
    return causal_all(scores, groups, n, h, t1, t0, scale, 1);
#else
    return -1;
#endif
}
