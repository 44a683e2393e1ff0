/* Decode attention: one new token per sequence against the K/V cache (decode_attention.py).
 * AVX-512; one thread.
 *
 * The G query heads that share a K/V head (G = H / KV: all of them for multi-query attention)
 * are the 16 lanes of a vector, so every step is vertical: the scores of one key for all of them
 * are D multiply-adds of the queries' element d (transposed, scaled) by the key's element d
 * broadcast; their softmax is a maximum and a sum down the keys; the output's element d for all
 * of them sums the probabilities times the value's element d broadcast. No horizontal sums, and
 * each key and value is read once per 16 query heads. SDPA's flash kernel ran the same decode
 * step at 5-7x the time on the EPYC Zen 5 (RESULTS.md, "Decode attention of our own"). Scores,
 * softmax and sums are fp32; bf16 keys and values are widened into a buffer first and the output
 * rounded once, or, on CPUs with AVX512_BF16, multiplied as bf16 pairs (attend_heads_dot). A masked
 * key (padding, the sliding window, slots not written yet) is skipped: its score is not used and
 * its value is never read, whatever the cache holds there.
 *
 * In a model's step the cache comes from memory (the weights' stream evicts it between steps), and
 * one sequence's keys and values are too short a run for the hardware prefetcher: while one
 * sequence's keys are scored, the next sequence's keys and values are asked for, a row of each
 * per key. From memory that took batch-16 steps to 0.50-0.63 of the time in fp32 and 0.69-0.79 in
 * bf16 (RESULTS.md, "Decode attention: the next sequence asked for").
 *
 * A K/V head of 8 query heads or fewer runs attend_few.c's form instead (attend_all), whose lanes run
 * along the head's elements: here they would be half empty or more.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "attend_few.h"

static int few_max = ATTEND_FEW_MAX;  /* up to this many query heads per K/V head: attend_few.c */

#if defined(__x86_64__) && defined(__GNUC__)
#include "simd.h"

#define LANES 16
#define KEYS 4  /* keys scored at once: independent sums that hide the multiply-add's latency */

/* The value sums of elements d0..d0 + 15 (acc[i]: element d0 + i, the heads in its lanes), times
 * inv, into out [gn][D]: a 16 x 16 transpose through memory. */
AVX512 INLINE void store_block(const __m512 *acc, __m512 inv, int gn, long d_len, long d0, float *out) {
    float block[LANES * LANES] __attribute__((aligned(64)));  /* [16 elements of d][16 heads] */
    for (int i = 0; i < LANES; i++)
        _mm512_store_ps(block + i * LANES, _mm512_mul_ps(acc[i], inv));
    for (int g = 0; g < gn; g++)
        for (int i = 0; i < LANES; i++)
            out[g * d_len + d0 + i] = block[i * LANES + g];
}

/* One sequence, one K/V head, up to 16 query heads (gn): q [gn][D] at q (row stride D), keys and
 * values [S][D] fp32 at k, v, valid: NULL or a byte per key (0: masked). Scratch, 64-byte aligned:
 * scores [S][16], qt [D][16] (the queries transposed and scaled). Writes out [gn][D] (row stride D).
 * pk, pv: the next sequence's keys and values (S rows of row_bytes), asked for as keys are scored;
 * NULL: none. */
AVX512 static void attend_heads(const float *q, int gn, const float *k, const float *v, const uint8_t *valid,
                                long s_len, long d_len, float scale, float *scores, float *qt, float *out,
                                const char *pk, const char *pv, long row_bytes) {
    __mmask16 lanes = (__mmask16)((1u << gn) - 1u);
    for (long d = 0; d < d_len; d++) {
        __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32((int)d_len));
        __m512 col = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, _mm512_add_epi32(idx, _mm512_set1_epi32((int)d)),
                                              q, 4);
        _mm512_store_ps(qt + d * LANES, _mm512_mul_ps(col, _mm512_set1_ps(scale)));
    }
    __m512 top = _mm512_set1_ps(-INFINITY);
    long s = 0;
    for (; s + KEYS <= s_len; s += KEYS) {
        __m512 acc[KEYS];
        for (int i = 0; i < KEYS; i++)
            acc[i] = _mm512_setzero_ps();
        for (long d = 0; d < d_len; d++) {
            __m512 qd = _mm512_load_ps(qt + d * LANES);
            for (int i = 0; i < KEYS; i++)
                acc[i] = _mm512_fmadd_ps(qd, _mm512_set1_ps(k[(s + i) * d_len + d]), acc[i]);
        }
        if (pk)
            for (int i = 0; i < KEYS; i++)
                ask_next(pk, pv, s + i, row_bytes);
        for (int i = 0; i < KEYS; i++) {
            _mm512_store_ps(scores + (s + i) * LANES, acc[i]);
            if (!valid || valid[s + i])
                top = _mm512_max_ps(top, acc[i]);
        }
    }
    for (; s < s_len; s++) {
        if (pk)
            ask_next(pk, pv, s, row_bytes);
        __m512 acc = _mm512_setzero_ps();
        for (long d = 0; d < d_len; d++)
            acc = _mm512_fmadd_ps(_mm512_load_ps(qt + d * LANES), _mm512_set1_ps(k[s * d_len + d]), acc);
        _mm512_store_ps(scores + s * LANES, acc);
        if (!valid || valid[s])
            top = _mm512_max_ps(top, acc);
    }
    __m512 total = _mm512_setzero_ps();
    for (s = 0; s < s_len; s++) {
        if (valid && !valid[s])
            continue;
        __m512 p = exp_neg(_mm512_sub_ps(_mm512_load_ps(scores + s * LANES), top));
        _mm512_store_ps(scores + s * LANES, p);
        total = _mm512_add_ps(total, p);
    }
    __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), total);
    for (long d0 = 0; d0 < d_len; d0 += LANES) {
        __m512 acc[LANES];
        for (int i = 0; i < LANES; i++)
            acc[i] = _mm512_setzero_ps();
        for (s = 0; s < s_len; s++) {
            if (valid && !valid[s])
                continue;
            __m512 p = _mm512_load_ps(scores + s * LANES);
            const float *vs = v + s * d_len + d0;
            for (int i = 0; i < LANES; i++)
                acc[i] = _mm512_fmadd_ps(p, _mm512_set1_ps(vs[i]), acc[i]);
        }
        store_block(acc, inv, gn, d_len, d0, out);
    }
}

#define DOT_KEYS 8  /* vdpbf16ps's latency is longer than the FMA's: more independent sums */
typedef uint32_t __attribute__((may_alias)) word;  /* a bf16 pair, read where bf16 elements lie */

/* attend_heads for bf16 on CPUs with AVX512_BF16 (the "dot" path): each vdpbf16ps does two
 * multiply-adds of bf16 pairs into fp32 lanes, so the scores and the sums take half the
 * instructions, and the keys are read as they are, not widened. The scores are scaled in the
 * exponent, exp((s - max) * scale), the queries staying exact. The probabilities go into the
 * value sums rounded to bf16, as SDPA's and transformers' bf16 attention takes them; their sum
 * (the normaliser) is fp32's; scale > 0. q [gn][D], keys [S][D] bf16, vt: the values as
 * interleave_values lays them. Scratch, 64-byte aligned: scores [S][16] fp32, qt [D/2][16] and
 * pairs [ceil(S/2)][16] bf16 pairs. */
AVX512BF16 static void attend_heads_dot(const uint16_t *q, int gn, const uint16_t *k, const uint32_t *vt,
                                        const uint8_t *valid, long s_len, long d_len, float scale, float *scores,
                                        uint32_t *qt, uint32_t *pairs, float *out, const char *pk, const char *pv,
                                        long row_bytes) {
    __mmask16 lanes = (__mmask16)((1u << gn) - 1u);
    long half = d_len / 2, s_pairs = (s_len + 1) / 2;
    const word *kw = (const word *)k;  /* a key's elements 2i, 2i + 1: word i of its row */
    __m512i heads = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                       _mm512_set1_epi32((int)half));
    for (long i = 0; i < half; i++)
        _mm512_store_si512(qt + i * LANES, _mm512_mask_i32gather_epi32(
            _mm512_setzero_si512(), lanes, _mm512_add_epi32(heads, _mm512_set1_epi32((int)i)), q, 4));
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (long s = 0; s < s_len;) {
        int n = s_len - s < DOT_KEYS ? 1 : DOT_KEYS;  /* (the last few keys one at a time) */
        __m512 acc[DOT_KEYS];
        for (int j = 0; j < DOT_KEYS; j++)
            acc[j] = _mm512_setzero_ps();
        if (n == DOT_KEYS)
            for (long i = 0; i < half; i++) {
                __m512bh qi = (__m512bh)_mm512_load_si512(qt + i * LANES);
                for (int j = 0; j < DOT_KEYS; j++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], qi, (__m512bh)_mm512_set1_epi32((int)kw[(s + j) * half + i]));
            }
        else
            for (long i = 0; i < half; i++)
                acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_load_si512(qt + i * LANES),
                                          (__m512bh)_mm512_set1_epi32((int)kw[s * half + i]));
        for (int j = 0; j < n; j++, s++) {
            if (pk)
                ask_next(pk, pv, s, row_bytes);
            _mm512_store_ps(scores + s * LANES, acc[j]);
            if (!valid || valid[s])
                top = _mm512_max_ps(top, acc[j]);
        }
    }
    __m512 total = _mm512_setzero_ps(), scaled_top = _mm512_mul_ps(top, _mm512_set1_ps(scale));
    for (long j = 0; j < s_pairs; j++) {
        __m512i two[2];
        for (int e = 0; e < 2; e++) {
            long at = 2 * j + e;
            __m512 p = _mm512_setzero_ps();
            if (at < s_len && (!valid || valid[at]))
                p = exp_neg(_mm512_fmsub_ps(_mm512_load_ps(scores + at * LANES), _mm512_set1_ps(scale), scaled_top));
            total = _mm512_add_ps(total, p);
            two[e] = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p));
        }
        _mm512_store_si512(pairs + j * LANES, _mm512_or_si512(two[0], _mm512_slli_epi32(two[1], 16)));
    }
    __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), total);
    for (long d0 = 0; d0 < d_len; d0 += LANES) {
        __m512 acc[LANES];
        for (int i = 0; i < LANES; i++)
            acc[i] = _mm512_setzero_ps();
        for (long j = 0; j < s_pairs; j++) {
            if (valid && !valid[2 * j] && (2 * j + 1 >= s_len || !valid[2 * j + 1]))
                continue;
            __m512bh p = (__m512bh)_mm512_load_si512(pairs + j * LANES);
            const uint32_t *vs = vt + j * d_len + d0;
            for (int i = 0; i < LANES; i++)
                acc[i] = _mm512_dpbf16_ps(acc[i], p, (__m512bh)_mm512_set1_epi32((int)vs[i]));
        }
        store_block(acc, inv, gn, d_len, d0, out);
    }
}

/* The values [S][D] bf16 as attend_heads_dot sums them: vt [ceil(S/2)][D] words, word d of row j
 * holding value 2j's element d (low half) and value 2j + 1's (high); zero for a masked key, whose
 * row is never read, and past the last. Once per (sequence, K/V head), for all of its query heads. */
AVX512 static void interleave_values(const uint16_t *v, const uint8_t *valid, long s_len, long d_len, uint32_t *vt) {
    __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                     39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));  /* (columns 16-31 of the 32) */
    for (long j = 0, a = 0, b = 1; a < s_len; j++, a += 2, b += 2)
        for (long c = 0; c < d_len; c += 32) {
            __mmask32 cols = d_len - c < 32 ? (__mmask32)0xffff : (__mmask32)0xffffffffu;  /* (D % 16 == 0) */
            __m512i ra = _mm512_maskz_loadu_epi16((!valid || valid[a]) ? cols : 0, v + a * d_len + c);
            __m512i rb = _mm512_maskz_loadu_epi16(b < s_len && (!valid || valid[b]) ? cols : 0, v + b * d_len + c);
            _mm512_store_si512(vt + j * d_len + c, _mm512_permutex2var_epi16(ra, first, rb));
            if (d_len - c >= 32)
                _mm512_store_si512(vt + j * d_len + c + 16, _mm512_permutex2var_epi16(ra, second, rb));
        }
}

AVX512 static void widen_rows(const uint16_t *src, long rows, long d_len, float *dst) {  /* bf16 -> fp32 */
    for (long i = 0; i < rows * d_len; i += LANES) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
}

/* out [B][H][D] = softmax(q k^T * scale, masked) v for each sequence b and query head h = j G + g;
 * q [B][H][D] with batch stride q_b (heads D apart); keys and values [B][KV][S][D] with batch and
 * head strides kv_b, kv_h (keys D apart); mask: NULL or [B][S] bytes with batch stride mask_b
 * (0: broadcast). bf16: q, keys, values and out in bf16 (the uint16_t bits), by dot products where
 * `dot` and the CPU has them. D % 16 == 0. Returns 0, or -1 where the scratch memory could not be had. */
AVX512 static int attend_all(const void *q, long q_b, const void *k, const void *v, long kv_b, long kv_h,
                             const uint8_t *mask, long mask_b, void *out, long b_len, long kv_len, long g_len,
                             long s_len, long d_len, float scale, int bf16, int dot) {
    dot = bf16 && dot && runs_avx512_bf16();
    long s_pairs = (s_len + 1) / 2;  /* dot: pairs and vt, as words, where the widened keys and values go */
    size_t kv_floats = dot ? (size_t)(s_pairs * (LANES + d_len)) : bf16 ? (size_t)(2 * s_len * d_len) : 0;
    float *scratch = aligned_alloc(64, ((size_t)s_len * LANES + kv_floats + (size_t)(LANES * d_len) * 3) * 4);
    if (!scratch)
        return -1;
    float *scores = scratch, *kf = scores + s_len * LANES, *vf = kf + (bf16 && !dot ? s_len * d_len : 0);
    float *qf = kf + kv_floats, *of = qf + LANES * d_len, *qt = of + LANES * d_len;
    uint32_t *pairs = (uint32_t *)kf, *vt = pairs + s_pairs * LANES;
    for (long b = 0; b < b_len; b++)
        for (long j = 0; j < kv_len; j++) {
            const uint8_t *valid = mask ? mask + b * mask_b : NULL;
            long kv_at = b * kv_b + j * kv_h;
            const float *kr = (const float *)k + kv_at, *vr = (const float *)v + kv_at;
            long next_b = j + 1 < kv_len ? b : b + 1, next_at = next_b * kv_b + (j + 1 < kv_len ? j + 1 : 0) * kv_h;
            long size = bf16 ? 2 : 4;  /* (the next (sequence, K/V head)'s rows: asked for by its first heads) */
            const char *pk = next_b < b_len ? (const char *)k + next_at * size : NULL;
            const char *pv = next_b < b_len ? (const char *)v + next_at * size : NULL;
            if (dot)
                interleave_values((const uint16_t *)v + kv_at, valid, s_len, d_len, vt);
            else if (bf16) {
                widen_rows((const uint16_t *)k + kv_at, s_len, d_len, kf);
                widen_rows((const uint16_t *)v + kv_at, s_len, d_len, vf);
                kr = kf, vr = vf;
            }
            for (long g0 = 0; g0 < g_len; g0 += LANES) {
                int gn = g_len - g0 < LANES ? (int)(g_len - g0) : LANES;
                long head = j * g_len + g0, q_at = b * q_b + head * d_len, out_at = (b * kv_len * g_len + head) * d_len;
                const char *ask = g0 ? NULL : pk;
                int few = gn <= few_max;
                if (!bf16) {
                    (few ? attend_few_f32 : attend_heads)((const float *)q + q_at, gn, kr, vr, valid, s_len, d_len,
                                                          scale, scores, qt, (float *)out + out_at, ask, pv,
                                                          d_len * size);
                    continue;
                }
                if (dot && few)
                    attend_few_dot((const uint16_t *)q + q_at, gn, (const uint16_t *)k + kv_at, vt, valid, s_len, d_len,
                                   scale, scores, pairs, of, ask, pv, d_len * size);
                else if (dot)
                    attend_heads_dot((const uint16_t *)q + q_at, gn, (const uint16_t *)k + kv_at, vt, valid, s_len,
                                     d_len, scale, scores, (uint32_t *)qt, pairs, of, ask, pv, d_len * size);
                else {
                    widen_rows((const uint16_t *)q + q_at, gn, d_len, qf);
                    (few ? attend_few_f32 : attend_heads)(qf, gn, kr, vr, valid, s_len, d_len, scale, scores, qt, of,
                                                          ask, pv, d_len * size);
                }
                for (long i = 0; i < gn * d_len; i += LANES)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + out_at + i),
                                        _mm512_cvtepi32_epi16(round_bf16(_mm512_loadu_ps(of + i))));
            }
        }
    free(scratch);
    return 0;
}
#endif

/* The most query heads per K/V head that attend_few.c runs (0: none; at most ATTEND_FEW_MAX); returns
 * the previous setting. For A/B timing and the tests of both forms. */
int attend_few_heads(int most) {
    int previous = few_max;
    few_max = most < 0 ? 0 : most > ATTEND_FEW_MAX ? ATTEND_FEW_MAX : most;
    return previous;
}

/* Whether this CPU runs attend_f32 / attend_bf16: AVX-512 (F, BW, VL). */
int attend_supported(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return runs_avx512();
#else
    return 0;
#endif
}

int attend_f32(const float *q, long q_b, const float *k, const float *v, long kv_b, long kv_h, const uint8_t *mask,
               long mask_b, float *out, long b_len, long kv_len, long g_len, long s_len, long d_len, float scale) {
#if defined(__x86_64__) && defined(__GNUC__)
    return attend_all(q, q_b, k, v, kv_b, kv_h, mask, mask_b, out, b_len, kv_len, g_len, s_len, d_len, scale, 0, 0);
#else
    return -1;
#endif
}

int attend_bf16(const uint16_t *q, long q_b, const uint16_t *k, const uint16_t *v, long kv_b, long kv_h,
                const uint8_t *mask, long mask_b, uint16_t *out, long b_len, long kv_len, long g_len, long s_len,
                long d_len, float scale, int dot) {
#if defined(__x86_64__) && defined(__GNUC__)
    return attend_all(q, q_b, k, v, kv_b, kv_h, mask, mask_b, out, b_len, kv_len, g_len, s_len, d_len, scale, 1, dot);
#else
    return -1;
#endif
}
