/* Rows of a weight laid out in panels (panels.py), read without unpacking it: the lookup of a tied
 * embedding whose only copy is the lm_head's panels (embedding.py).
 *
 * Why C: a decode step looks up one row per sequence, right after the lm_head has streamed its whole
 * weight past the caches. By torch's indexing that took a dozen small ops (the shard's mask, the
 * panel and column of each id, the gather, the masked rows zeroed), each paying for the interpreter
 * and dispatch data the stream had just evicted; here it is one call.
 *
 * Words of 4 bytes: an fp32 element, or a bf16 K pair. A row r is word s of column r % 16 of panel
 * r / 16, for s in [0, kw): 64 bytes apart, a cache line each, read in order (a stride the hardware
 * prefetcher follows). Plain C: any CPU the library builds on.
 */
#include <stdint.h>
#include <string.h>

/* out[i] (kw words) = the plain [n, 2 * kw or kw] weight's row index[i] - first where that is in [0, n),
 * else zeros (another shard's id: the all-reduce that follows adds that shard's row). */
void panels_gather_rows(const uint32_t *packed, long n, long kw, const int64_t *index, long count, int64_t first,
                        uint32_t *out) {
    for (long i = 0; i < count; i++, out += kw) {
        int64_t row = index[i] - first;
        if (row < 0 || row >= n) {
            memset(out, 0, (size_t)kw * sizeof *out);
            continue;
        }
        const uint32_t *word = packed + (row / 16) * kw * 16 + row % 16;
        for (long s = 0; s < kw; s++)
            out[s] = word[s * 16];
    }
}
