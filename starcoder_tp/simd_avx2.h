/* What panels_avx2.c and fused_step.c's AVX2 forms share: the AVX2 function attribute and bf16 in
 * 8 lanes (simd.h's forms, which are AVX-512's). Included where __x86_64__ and GCC-compatible
 * compilers are. */
#ifndef STARCODER_TP_SIMD_AVX2_H
#define STARCODER_TP_SIMD_AVX2_H
#include <immintrin.h>
#include <stdint.h>

#define AVX2 __attribute__((target("avx2,fma")))
#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif

/* 8 floats to bf16, to nearest even, NaN kept quiet (simd.h's round_bf16). */
AVX2 INLINE __m128i round8_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
        _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08));
}

AVX2 INLINE __m256 widen8_bf16(const uint16_t *p) {  /* 8 bf16 widened */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Whether this CPU runs what the AVX2 attribute allows. */
static inline int runs_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif
