/* The shared-memory collectives' publishing copy (shm_comm.py): a rank's chunk into its slot by
 * non-temporal stores, which leave the lines in memory rather than modified in this core's caches.
 * Where the ranks run on cores of their own, the other rank then reads them from memory at its full
 * rate, where a plain copy's lines had to come out of this core's cache (as we read it): a 2 MiB fp32 all-reduce
 * of two ranks took 1.19 ms copied and 0.34 ms streamed on the EPYC Zen 4 VM so; where they share a
 * core, copying was faster (0.24 against 0.39) (shm_comm.Probes times both; RESULTS.md, "The all-reduce's slots written
 * past the cache"). The stores are weakly ordered: the fence makes them visible before the flag the
 * caller stores next. SSE2 only, which every x86-64 CPU has; elsewhere a plain copy (and
 * stream_copy_supported says 0).
 */
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <emmintrin.h>
#include <stdint.h>

int stream_copy_supported(void) { return 1; }

void stream_copy(void *dst, const void *src, long n) {
    char *d = dst;
    const char *s = src;
    long head = (long)((16 - ((uintptr_t)d & 15)) & 15);  /* to the destination's first 16-byte boundary */
    if (head > n)
        head = n;
    memcpy(d, s, (size_t)head);
    long i = head;
    for (; i + 16 <= n; i += 16)
        _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    memcpy(d + i, s + i, (size_t)(n - i));
    _mm_sfence();
}
#else
int stream_copy_supported(void) { return 0; }

void stream_copy(void *dst, const void *src, long n) { memcpy(dst, src, (size_t)n); }
#endif
