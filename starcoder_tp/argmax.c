/* The greedy pick (argmax.py): for each row of logits, fp32 or bf16, the largest value and the
 * index of its first occurrence, as torch.max(dim=-1) gives them; a NaN counts as the largest,
 * the first NaN's index. AVX-512, one thread. Then, between ranks, their candidates' board filled
 * and read (argmax_board_f32/_bf16, argmax_board_pick: plain C, at the end).
 *
 * Each lane of four vectors (CHAINS) keeps its own maximum and where it was, taking a value only
 * when it is strictly larger (so each lane keeps its first occurrence); the lanes are then reduced
 * to the largest value at the lowest index. torch's max over a vocabulary row runs ~2 elements a
 * nanosecond on the EPYC Zen 5, 0.4-0.5 ms of a batch-16 decode step (RESULTS.md, "The greedy
 * pick of our own").
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include "simd.h"

#define LANES 16

/* The row's first NaN's index, or -1: a second pass only for rows that hold one. */
static long first_nan(const void *row, long n, int bf16) {
    for (long i = 0; i < n; i++) {
        float v;
        if (bf16) {
            union { uint32_t u; float f; } c;
            c.u = (uint32_t)((const uint16_t *)row)[i] << 16;
            v = c.f;
        } else {
            v = ((const float *)row)[i];
        }
        if (isnan(v))
            return i;
    }
    return -1;
}

AVX512 INLINE __m512 load_row(const void *row, long i, __mmask16 m, int bf16) {
    if (bf16)  /* a bf16 is an fp32's high half */
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)row + i);
}

/* CHAINS vectors a step, each into its own lanes' maxima: one chain is a compare and a masked move
 * waiting on the last, ~6 cycles a vector; independent chains overlap (RESULTS.md, "The greedy pick
 * in four chains"). Each lane of each chain keeps its first occurrence, so the lowest index among
 * the lanes holding the maximum is the row's first. */
#define CHAINS 4

AVX512 static void row_max(const void *row, long n, int bf16, float *value, int64_t *index) {
    __m512 best[CHAINS];
    __m512i where[CHAINS], at[CHAINS];
    for (int c = 0; c < CHAINS; c++) {
        best[c] = _mm512_set1_ps(-INFINITY);
        where[c] = _mm512_setzero_si512();
        at[c] = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                 _mm512_set1_epi32(c * LANES));
    }
    const __m512i stride = _mm512_set1_epi32(CHAINS * LANES);
    __mmask16 nan = 0;
    long i = 0;
    for (; i + CHAINS * LANES <= n; i += CHAINS * LANES)
        for (int c = 0; c < CHAINS; c++) {
            __m512 v = load_row(row, i + c * LANES, (__mmask16)0xffff, bf16);
            __mmask16 larger = _mm512_cmp_ps_mask(v, best[c], _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best[c] = _mm512_mask_mov_ps(best[c], larger, v);
            where[c] = _mm512_mask_mov_epi32(where[c], larger, at[c]);
            at[c] = _mm512_add_epi32(at[c], stride);
        }
    for (int c = 0; i < n; i += LANES, c++) {  /* the last vectors, in chains 0, 1, ...: their indices run on */
        __mmask16 m = n - i >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = load_row(row, i, m, bf16);
        __m512i here = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32((int)i));
        __mmask16 larger = _mm512_mask_cmp_ps_mask(m, v, best[c], _CMP_GT_OQ);
        nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        best[c] = _mm512_mask_mov_ps(best[c], larger, v);
        where[c] = _mm512_mask_mov_epi32(where[c], larger, here);
    }
    if (nan) {
        *value = NAN;
        *index = first_nan(row, n, bf16);
        return;
    }
    __m512 top_lanes = best[0];
    for (int c = 1; c < CHAINS; c++)
        top_lanes = _mm512_max_ps(top_lanes, best[c]);
    float top = _mm512_reduce_max_ps(top_lanes);
    /* (every value -inf, or a row of none: index 0, as torch.max) */
    int32_t first = INT32_MAX;
    for (int c = 0; c < CHAINS; c++) {
        __mmask16 tops = _mm512_cmp_ps_mask(best[c], _mm512_set1_ps(top), _CMP_EQ_OQ);
        if (tops) {
            int32_t lowest = _mm512_mask_reduce_min_epi32(tops, where[c]);
            first = lowest < first ? lowest : first;
        }
    }
    *value = top;
    *index = first == INT32_MAX ? 0 : first;
}
#endif

/* rows x [n] logits at x, row r at x + r * stride elements; writes values[rows] (fp32) and
 * index[rows]. Returns 0, or -1 where the build does not run it (argmax.py checks the CPU: attend_supported). */
static int argmax_rows(const void *x, long stride, long rows, long n, int bf16, float *values, int64_t *index) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (n >= (1L << 31))
        return -1;  /* (indices are 32-bit lanes) */
    for (long r = 0; r < rows; r++)
        row_max((const char *)x + r * stride * (bf16 ? 2 : 4), n, bf16, values + r, index + r);
    return 0;
#else
    (void)x; (void)stride; (void)rows; (void)n; (void)bf16; (void)values; (void)index;
    return -1;
#endif
}

int argmax_f32(const float *x, long stride, long rows, long n, float *values, int64_t *index) {
    return argmax_rows(x, stride, rows, n, 0, values, index);
}

int argmax_bf16(const uint16_t *x, long stride, long rows, long n, float *values, int64_t *index) {
    return argmax_rows(x, stride, rows, n, 1, values, index);
}

/* The greedy pick across ranks (argmax.py, pick). Each rank writes its rows' candidates, (maximum, its id + first)
 * as fp32 pairs, in its own row of a [ranks][rows][2] board whose other rows it zeroes; an all-reduce then sums the
 * boards, and x + 0 is x, so every rank's candidates arrive whole (ids exact in fp32: argmax.py checks). One call
 * where torch's ops were a dozen, each paying for the caches the lm_head's weight had just swept. */
static int argmax_board(const void *x, long stride, long rows, long n, int bf16, long rank, long ranks, int64_t first,
                        float *board) {
    memset(board, 0, (size_t)(ranks * rows * 2) * sizeof *board);
    float *mine = board + rank * rows * 2;
    for (long r = 0; r < rows; r++) {
        float value;
        int64_t index;
        if (argmax_rows((const char *)x + r * stride * (bf16 ? 2 : 4), stride, 1, n, bf16, &value, &index))
            return -1;
        mine[2 * r] = value;
        mine[2 * r + 1] = (float)(index + first);
    }
    return 0;
}

int argmax_board_f32(const float *x, long stride, long rows, long n, long rank, long ranks, int64_t first,
                     float *board) {
    return argmax_board(x, stride, rows, n, 0, rank, ranks, first, board);
}

int argmax_board_bf16(const uint16_t *x, long stride, long rows, long n, long rank, long ranks, int64_t first,
                      float *board) {
    return argmax_board(x, stride, rows, n, 1, rank, ranks, first, board);
}

/* ids[r]: the id of the summed board's first rank holding row r's largest value, a NaN the largest (the first
 * NaN): as torch.argmax over the ranks picks it, and the lowest id among equal maxima (the shards are in order). */
void argmax_board_pick(const float *board, long ranks, long rows, int64_t *ids) {
    for (long r = 0; r < rows; r++) {
        long best = 0;
        for (long k = 1; k < ranks; k++) {
            float value = board[(k * rows + r) * 2], top = board[(best * rows + r) * 2];
            if (isnan(top))
                break;
            if (isnan(value) || value > top)
                best = k;
        }
        ids[r] = (int64_t)board[(best * rows + r) * 2 + 1];
    }
}
