/* What panels.c and the attention's C share: the AVX-512 function attributes, bf16 rounding, e^x and
 * the next sequence's cache rows asked for.
 * Included where __x86_64__ and GCC-compatible compilers are. */
#ifndef STARCODER_TP_SIMD_H
#define STARCODER_TP_SIMD_H
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))

/* Whether this CPU runs what the AVX512 attribute allows (F, BW, VL): the *_supported functions'. */
static inline int runs_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* Whether this CPU runs what the AVX512BF16 attribute allows besides. */
static inline int runs_avx512_bf16(void) {
    return runs_avx512() && __builtin_cpu_supports("avx512bf16");
}

AVX512 INLINE __m512i round_bf16(__m512 v) {  /* to nearest even, NaN kept quiet: in each lane's low half */
    __m512i u = _mm512_castps_si512(v);
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* e^x for |x| <= ~87 (attend.c's softmax calls it for x <= 0, panels.c's GELU on [-80, 80]): Cody-Waite
 * reduction, Cephes' expf polynomial (within 2 ulp), 2^n by scalef. */
AVX512 INLINE __m512 exp_neg(__m512 x) {
    static const float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 q = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 6; i++)
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(_mm512_fmadd_ps(q, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f))), n);
}

/* Key s's rows of the next sequence's keys and values (row_bytes each, at pk and pv), asked for. */
AVX512 INLINE void ask_next(const char *pk, const char *pv, long s, long row_bytes) {
    for (long line = 0; line < row_bytes; line += 64) {
        _mm_prefetch(pk + s * row_bytes + line, _MM_HINT_T0);
        _mm_prefetch(pv + s * row_bytes + line, _MM_HINT_T0);
    }
}

#endif
