/* attend_few.c's entry points, called by attend.c's attend_all for a K/V head of up to ATTEND_FEW_MAX
 * query heads (attend_few_heads lowers that). */
#ifndef STARCODER_TP_ATTEND_FEW_H
#define STARCODER_TP_ATTEND_FEW_H
#include <stdint.h>

#define ATTEND_FEW_MAX 8  /* the most query heads per K/V head attend_few.c takes */

/* One sequence, one K/V head, 1 <= gn <= ATTEND_FEW_MAX query heads: attend.c's attend_heads and
 * attend_heads_dot, with the same arguments and scratch (attend_few.c's header). */
void attend_few_f32(const float *q, int gn, const float *k, const float *v, const uint8_t *valid, long s_len,
                    long d_len, float scale, float *scores, float *qs, float *out, const char *pk, const char *pv,
                    long row_bytes);
void attend_few_dot(const uint16_t *q, int gn, const uint16_t *k, const uint32_t *vt, const uint8_t *valid,
                    long s_len, long d_len, float scale, float *scores, uint32_t *pairs, float *out,
                    const char *pk, const char *pv, long row_bytes);
long attend_few_runs(void);
#endif
