/* Decode attention for a K/V head shared by few query heads (G <= ATTEND_FEW_MAX), called by attend.c
 * for one sequence and one K/V head. AVX-512; one thread.
 *
 * attend.c puts the G query heads in a vector's 16 lanes: with a G of 4 (the StarCoder2 bench model's
 * grouped heads, at any world size) 12 of every 16 multiply-adds are wasted, with a multi-query model's
 * 16 heads over two ranks (G 8) half of them. Here the lanes run along the head's D elements instead,
 * so every multiply-add is used whatever G is:
 * - scores: for a block of 16 / G keys, each (key, head) pair sums q . k in a vector of its own
 *   (D / 16 multiply-adds), and one transpose-and-add tree (sum_lanes) turns the 16 vectors into the
 *   block's 16 scores, [key][head];
 * - values: each key's value row in D / 16 vectors, multiplied by its G probabilities broadcast, into
 *   G x W vectors of sums (W of the D / 16 at a time, so that they stay in registers).
 * The same arithmetic as attend.c's: scores, softmax and sums fp32; the queries scaled first in fp32,
 * or, on the dot path (AVX512_BF16), bf16 pairs multiplied, the scores scaled in the exponent and the
 * probabilities rounded to bf16 before the value sums. Only the order of the additions differs. A masked
 * key's score is not used and its value row is not read; the next sequence's rows are asked for as the
 * keys are scored (ask_next, attend.c's header says why).
 */
#include <stdint.h>
#include <math.h>

#include "attend_few.h"

static long runs = 0;  /* (sequence, K/V head) pairs run: attend_few_runs */

/* How many (sequence, K/V head) pairs attend_few.c has run in this process: the tests' evidence that
 * each of attend.c's forms (fp32, bf16 widened, bf16 dot) reaches it. */
long attend_few_runs(void) {
    return runs;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include "simd.h"

/* Lane j: the sum of v[j]'s lanes. Four levels each add two halves of every pair of vectors; the
 * result's lane 4L + e holds v[4e + L]'s sum, put back in order by one permutation. */
AVX512 INLINE __m512 sum_lanes(const __m512 *v) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; i++)  /* [a0..7 + a8..15 | b0..7 + b8..15] */
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  /* a quarter of 4 vectors' sums in each 128-bit lane */
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) {
        __m512d a = _mm512_castps_pd(y[2 * i]), b = _mm512_castps_pd(y[2 * i + 1]);
        z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), r);
}

/* The lanes [key i][head g] (i < kb) of keys s.. that are not masked. */
INLINE __mmask16 seen(const uint8_t *valid, long s, int kb, int gn) {
    unsigned m = 0, heads = (1u << gn) - 1u;
    for (int i = 0; i < kb; i++)
        if (!valid || valid[s + i])
            m |= heads << (i * gn);
    return (__mmask16)m;
}

/* The block's 16 (key, head) sums into scores [S][gn] from key s, and into *top where not masked. */
AVX512 INLINE void keep_scores(const __m512 *acc, long s, int gn, int kb, const uint8_t *valid, float *scores,
                               __m512 *top) {
    __m512 r = sum_lanes(acc);
    _mm512_mask_storeu_ps(scores + s * gn, (__mmask16)((1u << (kb * gn)) - 1u), r);
    *top = _mm512_mask_max_ps(*top, seen(valid, s, kb, gn), *top, r);
}

/* scores[s + i][g] = q_g . k_{s+i} for i < kb (fp32: q scaled, at qs [gn][D]; dot: bf16 pairs), and
 * *top, lane-wise, the largest of the unmasked ones. */
AVX512 INLINE void score_f32(const float *qs, const float *k, long s, long d_len, const int gn, const int kb,
                             const uint8_t *valid, float *scores, __m512 *top) {
    __m512 acc[16];
    for (int p = 0; p < 16; p++)
        acc[p] = _mm512_setzero_ps();
    for (long c = 0; c < d_len; c += 16)
        for (int i = 0; i < kb; i++) {
            __m512 kc = _mm512_loadu_ps(k + (s + i) * d_len + c);
            for (int g = 0; g < gn; g++)
                acc[i * gn + g] = _mm512_fmadd_ps(_mm512_loadu_ps(qs + g * d_len + c), kc, acc[i * gn + g]);
        }
    keep_scores(acc, s, gn, kb, valid, scores, top);
}

AVX512BF16 INLINE void score_dot(const uint16_t *q, const uint16_t *k, long s, long d_len, const int gn,
                                 const int kb, const uint8_t *valid, float *scores, __m512 *top) {
    __m512 acc[16];
    for (int p = 0; p < 16; p++)
        acc[p] = _mm512_setzero_ps();
    for (long c = 0; c < d_len; c += 32) {
        __mmask32 cols = d_len - c < 32 ? (__mmask32)0xffff : (__mmask32)0xffffffffu;  /* (D % 16 == 0) */
        for (int i = 0; i < kb; i++) {
            __m512i kc = _mm512_maskz_loadu_epi16(cols, k + (s + i) * d_len + c);
            for (int g = 0; g < gn; g++)
                acc[i * gn + g] = _mm512_dpbf16_ps(
                    acc[i * gn + g], (__m512bh)_mm512_maskz_loadu_epi16(cols, q + g * d_len + c), (__m512bh)kc);
        }
    }
    keep_scores(acc, s, gn, kb, valid, scores, top);
}

/* Every key's scores, 16 / gn keys at a time, the next sequence's rows asked for; returns the top of
 * each head in lanes [i][g] alike (tops of blocks of keys [i][g] folded over i). */
#define SCORES(name, kernel, qtype, ktype, target)                                                                 \
    target INLINE __m512 name(const qtype *q, const ktype *k, long s_len, long d_len, const int gn,             \
                              const uint8_t *valid, float *scores, const char *pk, const char *pv, long row_bytes) { \
        const int kb = 16 / gn;                                                                                    \
        __m512 top = _mm512_set1_ps(-INFINITY);                                                                    \
        long s = 0;                                                                                                \
        for (; s + kb <= s_len; s += kb) {                                                                         \
            kernel(q, k, s, d_len, gn, kb, valid, scores, &top);                                                   \
            if (pk)                                                                                                \
                for (int i = 0; i < kb; i++)                                                                       \
                    ask_next(pk, pv, s + i, row_bytes);                                                            \
        }                                                                                                          \
        for (; s < s_len; s++) {                                                                                   \
            kernel(q, k, s, d_len, gn, 1, valid, scores, &top);                                                    \
            if (pk)                                                                                                \
                ask_next(pk, pv, s, row_bytes);                                                                    \
        }                                                                                                          \
        return fold_heads(top, gn, kb);                                                                            \
    }

/* Lanes [i][g] (i < kb) -> the largest over i, in every lane [i][g] (also the lanes g of one key). */
AVX512 INLINE __m512 fold_heads(__m512 top, int gn, int kb) {
    float lanes[16], heads[ATTEND_FEW_MAX];
    _mm512_storeu_ps(lanes, top);
    for (int g = 0; g < gn; g++) {
        heads[g] = lanes[g];
        for (int i = 1; i < kb; i++)
            heads[g] = fmaxf(heads[g], lanes[i * gn + g]);
    }
    for (int l = 0; l < 16; l++)
        lanes[l] = heads[l % gn];
    return _mm512_loadu_ps(lanes);
}

SCORES(scores_f32, score_f32, float, float, AVX512)
SCORES(scores_dot, score_dot, uint16_t, uint16_t, AVX512BF16)

/* Softmax's numerators in place over [S][gn] (exp(x - top), or on the dot path exp((x - top) * scale)
 * with x * scale - top * scale in one rounding, attend.c's); 0 for a masked key. The reciprocal of
 * their sum over the keys, per head, into inv[g]. */
AVX512 INLINE void numerators(float *scores, const uint8_t *valid, long s_len, int gn, __m512 top, float scale,
                              int dot, float *inv) {
    const int kb = 16 / gn;
    __m512 sum = _mm512_setzero_ps(), scaled_top = _mm512_mul_ps(top, _mm512_set1_ps(scale));
    for (long s = 0; s < s_len; s += kb) {
        int n = s_len - s < kb ? (int)(s_len - s) : kb;
        __mmask16 keep = seen(valid, s, n, gn);
        __m512 x = _mm512_maskz_loadu_ps(keep, scores + s * gn);
        __m512 p = exp_neg(dot ? _mm512_fmsub_ps(x, _mm512_set1_ps(scale), scaled_top) : _mm512_sub_ps(x, top));
        p = _mm512_maskz_mov_ps(keep, p);
        _mm512_mask_storeu_ps(scores + s * gn, (__mmask16)((1u << (n * gn)) - 1u), p);
        sum = _mm512_add_ps(sum, p);
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, sum);
    for (int g = 0; g < gn; g++) {
        float total = 0.0f;
        for (int i = 0; i < kb; i++)
            total += lanes[i * gn + g];
        inv[g] = 1.0f / total;
    }
}

/* out[g][(c + i) * 16 ..] = acc[g * w + i] * inv[g]: the value sums, normalised. */
AVX512 INLINE void store_sums(const __m512 *acc, int gn, int w, long c, long d_len, const float *inv, float *out) {
    for (int g = 0; g < gn; g++)
        for (int i = 0; i < w; i++)
            _mm512_storeu_ps(out + g * d_len + (c + i) * 16, _mm512_mul_ps(acc[g * w + i], _mm512_set1_ps(inv[g])));
}

/* out[g][c * 16 ..] for W chunks of 16 from chunk c: the value rows summed with the probabilities
 * p [S][gn], times inv[g] (fp32); masked keys skipped. */
AVX512 INLINE void values_f32(const float *p, const float *v, const uint8_t *valid, long s_len, long d_len,
                              const int gn, const int w, long c, const float *inv, float *out) {
    __m512 acc[ATTEND_FEW_MAX * 8];
    for (int a = 0; a < gn * w; a++)
        acc[a] = _mm512_setzero_ps();
    for (long s = 0; s < s_len; s++) {
        if (valid && !valid[s])
            continue;
        for (int i = 0; i < w; i++) {
            __m512 vc = _mm512_loadu_ps(v + s * d_len + (c + i) * 16);
            for (int g = 0; g < gn; g++)
                acc[g * w + i] = _mm512_fmadd_ps(_mm512_set1_ps(p[s * gn + g]), vc, acc[g * w + i]);
        }
    }
    store_sums(acc, gn, w, c, d_len, inv, out);
}

/* The dot path's: pairs [ceil(S/2)][gn] of bf16 probabilities (keys 2j and 2j + 1, attend.c's vt's
 * order) against vt [ceil(S/2)][D] words; a pair whose keys are both masked skipped. */
AVX512BF16 INLINE void values_dot(const uint32_t *pairs, const uint32_t *vt, const uint8_t *valid, long s_len,
                                  long d_len, const int gn, const int w, long c, const float *inv, float *out) {
    __m512 acc[ATTEND_FEW_MAX * 8];
    for (int a = 0; a < gn * w; a++)
        acc[a] = _mm512_setzero_ps();
    for (long j = 0; j < (s_len + 1) / 2; j++) {
        if (valid && !valid[2 * j] && (2 * j + 1 >= s_len || !valid[2 * j + 1]))
            continue;
        for (int i = 0; i < w; i++) {
            __m512i vc = _mm512_load_si512(vt + j * d_len + (c + i) * 16);
            for (int g = 0; g < gn; g++)
                acc[g * w + i] = _mm512_dpbf16_ps(
                    acc[g * w + i], (__m512bh)_mm512_set1_epi32((int)pairs[j * gn + g]), (__m512bh)vc);
        }
    }
    store_sums(acc, gn, w, c, d_len, inv, out);
}

/* The value chunks W at a time while W fit, then one at a time: gn x W sums kept in registers. */
#define VALUES(name, each, ptype, vtype, target)                                                                   \
    target INLINE void name(const ptype *p, const vtype *v, const uint8_t *valid, long s_len, long d_len,           \
                            const int gn, const float *inv, float *out) {                                           \
        const int w = gn <= 2 ? 8 : gn <= 4 ? 4 : 2;                                                               \
        long c = 0, chunks = d_len / 16;                                                                           \
        for (; c + w <= chunks; c += w)                                                                            \
            each(p, v, valid, s_len, d_len, gn, w, c, inv, out);                                                   \
        for (; c < chunks; c++)                                                                                    \
            each(p, v, valid, s_len, d_len, gn, 1, c, inv, out);                                                   \
    }
VALUES(all_values_f32, values_f32, float, float, AVX512)
VALUES(all_values_dot, values_dot, uint32_t, uint32_t, AVX512BF16)

/* One head count's whole attention (gn a constant where the switch below calls it). */
AVX512 INLINE void few_f32(const float *q, const int gn, const float *k, const float *v, const uint8_t *valid,
                           long s_len, long d_len, float scale, float *scores, float *qs, float *out,
                           const char *pk, const char *pv, long row_bytes) {
    for (long e = 0; e < gn * d_len; e += 16)
        _mm512_storeu_ps(qs + e, _mm512_mul_ps(_mm512_loadu_ps(q + e), _mm512_set1_ps(scale)));
    __m512 top = scores_f32(qs, k, s_len, d_len, gn, valid, scores, pk, pv, row_bytes);
    float inv[ATTEND_FEW_MAX];
    numerators(scores, valid, s_len, gn, top, 1.0f, 0, inv);
    all_values_f32(scores, v, valid, s_len, d_len, gn, inv, out);
}

AVX512BF16 INLINE void few_dot(const uint16_t *q, const int gn, const uint16_t *k, const uint32_t *vt,
                               const uint8_t *valid, long s_len, long d_len, float scale, float *scores,
                               uint32_t *pairs, float *out, const char *pk, const char *pv, long row_bytes) {
    __m512 top = scores_dot(q, k, s_len, d_len, gn, valid, scores, pk, pv, row_bytes);
    float inv[ATTEND_FEW_MAX];
    numerators(scores, valid, s_len, gn, top, scale, 1, inv);
    __mmask16 heads = (__mmask16)((1u << gn) - 1u);
    for (long j = 0; j < (s_len + 1) / 2; j++) {  /* keys 2j and 2j + 1's probabilities in bf16, side by side */
        __m512 first = _mm512_maskz_loadu_ps(heads, scores + 2 * j * gn);
        __m512 second = _mm512_maskz_loadu_ps(2 * j + 1 < s_len ? heads : 0, scores + (2 * j + 1) * gn);
        __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(first));
        __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(second));
        _mm512_mask_storeu_epi32(pairs + j * gn, heads, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
    all_values_dot(pairs, vt, valid, s_len, d_len, gn, inv, out);
}

/* attend.c's attend_heads / attend_heads_dot for gn <= ATTEND_FEW_MAX query heads (the caller checks):
 * the same arguments, and the same scratch (scores [S][16] fp32; qs [D][16] floats; pairs
 * [ceil(S/2)][16] words), used as [S][gn], [gn][D], [ceil(S/2)][gn]. */
AVX512 void attend_few_f32(const float *q, int gn, const float *k, const float *v, const uint8_t *valid, long s_len,
                           long d_len, float scale, float *scores, float *qs, float *out, const char *pk,
                           const char *pv, long row_bytes) {
    runs++;
#define FEW_F32(n) \
    case n: few_f32(q, n, k, v, valid, s_len, d_len, scale, scores, qs, out, pk, pv, row_bytes); break;
    switch (gn) {  /* (attend_all passes 1 <= gn <= few_max <= ATTEND_FEW_MAX) */
        FEW_F32(1) FEW_F32(2) FEW_F32(3) FEW_F32(4) FEW_F32(5) FEW_F32(6) FEW_F32(7) FEW_F32(8)
    }
}

AVX512BF16 void attend_few_dot(const uint16_t *q, int gn, const uint16_t *k, const uint32_t *vt, const uint8_t *valid,
                               long s_len, long d_len, float scale, float *scores, uint32_t *pairs, float *out,
                               const char *pk, const char *pv, long row_bytes) {
    runs++;
#define FEW_DOT(n) \
    case n: few_dot(q, n, k, vt, valid, s_len, d_len, scale, scores, pairs, out, pk, pv, row_bytes); break;
    switch (gn) {
        FEW_DOT(1) FEW_DOT(2) FEW_DOT(3) FEW_DOT(4) FEW_DOT(5) FEW_DOT(6) FEW_DOT(7) FEW_DOT(8)
    }
}
#endif
