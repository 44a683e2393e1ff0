/* The shared-memory all-reduce of a small tensor (shm_comm.py) in one call: publish this rank's part
 * into its slot, wait for every rank's flag, sum the slots in rank order. A decode step's all-reduces
 * are of one row or a few ([B, E]), twice a layer, and in Python each cost ~20 µs on the EPYC Zen 4
 * (a copy, a flag, the wait, a torch.add: torch's overhead on 4 KiB), of which the exchange itself is
 * ~8 (RESULTS.md, "The small all-reduce in one call").
 *
 * The protocol is shm_comm.py's, value for value: the same slots, flags and sequence numbers, the parts
 * summed as ((p0 + p1) + p2) + ... with each sum rounded to the dtype, as torch.add rounds it, so that a
 * rank calling this and one running the Python path agree bit for bit (a NaN's bits aside: torch's
 * scalar and vector code differ there themselves). This rank's part is read from its own tensor (the
 * values its slot holds). The wait is bounded: after `wait_s` without every flag it returns the first
 * rank still missing, and the caller (which keeps the deadline, and lets Ctrl-C through between calls)
 * calls again with publish = 0. It spins with the CPU's pause hint, and yields the core every
 * YIELD_EVERY_S of waiting (the Python wait: every 64 checks, ~0.1 ms), so that ranks sharing a core
 * still progress without a syscall at every few loads.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, sched_yield under -std=c11 */
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPIN_HINT() _mm_pause()
#else
#define SPIN_HINT() ((void)0)
#endif

#define YIELD_EVERY_S 20e-6

struct shm_view {      /* shm_comm.ShmComm's segment, as this rank sees it (ShmView there) */
    int64_t *flags;     /* rank r's flag at flags[r * flag_stride] */
    char *data;         /* [2][world_size][slot_bytes] */
    long flag_stride, slot_bytes, rank, world_size;
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static long first_missing(const struct shm_view *v, int64_t seq) {
    for (long r = 0; r < v->world_size; r++)
        if (__atomic_load_n(&v->flags[r * v->flag_stride], __ATOMIC_ACQUIRE) < seq)
            return r;
    return -1;
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {  /* to nearest even, NaN kept quiet: simd.h's round_bf16 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                          : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Sum `n` elements of every rank's slot into `buf` (this rank's part, which it holds already). */
static void sum_parts(const struct shm_view *v, const char *slots, void *buf, long n, int bf16) {
    long ws = v->world_size, me = v->rank;
    if (!bf16) {
        float *out = buf;
        const float *p0 = me == 0 ? out : (const float *)slots;
        const float *p1 = me == 1 ? out : (const float *)(slots + v->slot_bytes);
        for (long i = 0; i < n; i++)
            out[i] = p0[i] + p1[i];
        for (long r = 2; r < ws; r++) {
            const float *p = (const float *)(slots + r * v->slot_bytes);
            for (long i = 0; i < n; i++)
                out[i] += p[i];
        }
        return;
    }
    uint16_t *out = buf;
    const uint16_t *p0 = me == 0 ? out : (const uint16_t *)slots;
    const uint16_t *p1 = me == 1 ? out : (const uint16_t *)(slots + v->slot_bytes);
    for (long i = 0; i < n; i++)
        out[i] = to_bf16(from_bf16(p0[i]) + from_bf16(p1[i]));
    for (long r = 2; r < ws; r++) {
        const uint16_t *p = (const uint16_t *)(slots + r * v->slot_bytes);
        for (long i = 0; i < n; i++)
            out[i] = to_bf16(from_bf16(out[i]) + from_bf16(p[i]));
    }
}

/* All-reduce (sum) of `buf`, n float32s or bf16s (n * size <= slot_bytes), as collective `seq`; returns -1
 * when done (buf holds the sum), or the first rank that had not published seq within wait_s. */
long shm_all_reduce_small(const struct shm_view *v, int64_t seq, void *buf, long n, int bf16, int publish,
                          double wait_s) {
    char *slots = v->data + (seq % 2) * v->world_size * v->slot_bytes;
    if (publish) {
        memcpy(slots + v->rank * v->slot_bytes, buf, (size_t)(n * (bf16 ? 2 : 4)));
        __atomic_store_n(&v->flags[v->rank * v->flag_stride], seq, __ATOMIC_RELEASE);  /* after the data */
    }
    long missing = first_missing(v, seq);
    if (missing >= 0) {
        double yielded = now_s(), deadline = yielded + wait_s;
        for (long spins = 1; (missing = first_missing(v, seq)) >= 0; spins++) {
            SPIN_HINT();
            if (spins % 64 == 0) {
                double t = now_s();
                if (t > deadline)
                    return missing;
                if (t - yielded >= YIELD_EVERY_S) {
                    sched_yield();
                    yielded = t;
                }
            }
        }
    }
    sum_parts(v, slots, buf, n, bf16);
    return -1;
}
