/* Collectives between the processes of one tensor-parallel group on one machine, through a
 * shared memory segment that every rank has mapped.
 *
 * Segment layout: one 64-byte line per rank (its sequence number and pid), then two banks of
 * `world` slots of `slot_bytes` each. A call is cut into pieces of at most slot_bytes; for each
 * piece a rank takes the next sequence number s, writes its piece into its slot of bank s & 1,
 * publishes s (a release store) and waits until every rank has published s (acquire loads).
 * An all-reduce then sums the slots in rank order, so every rank computes the same sums bit for
 * bit; an all-gather copies them. Two banks suffice: a rank reaches piece s + 2, which reuses
 * bank s & 1, only after every rank has published s + 1, that is after every rank has finished
 * reading piece s.
 *
 * Waiting spins briefly and then yields the processor, since the group may have more ranks than
 * the machine has free cores; every few milliseconds it checks the clock against the caller's
 * timeout and that the ranks it waits for are still alive. Returns 0, or 1 on timeout and 2
 * when a rank it waits for has died (it reports which in *peer).
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <time.h>

#include "kernels.h"

#define LINE 64

typedef struct {
    volatile int64_t seq;
    int64_t pid;
    char pad[LINE - 2 * sizeof(int64_t)];
} rank_line;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* Wait until every rank has published `seq`; 0, 1 (timeout) or 2 (rank *peer died). */
static int wait_all(rank_line *lines, int world, int64_t seq, double timeout_s, int *peer) {
    double start = -1.0, next_check = 0.0;
    for (int64_t spins = 0;; spins++) {
        int behind = -1;
        for (int r = 0; r < world; r++)
            if (__atomic_load_n(&lines[r].seq, __ATOMIC_ACQUIRE) < seq) {
                behind = r;
                break;
            }
        if (behind < 0) return 0;
        if (spins < 256) {
            cpu_relax();
            continue;
        }
        sched_yield();
        if ((spins & 63) == 0) {
            const double t = now_s();
            if (start < 0.0) start = next_check = t;
            if (t >= next_check) {
                next_check = t + 0.005;
                const pid_t pid = (pid_t)lines[behind].pid;
                if (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) {
                    *peer = behind;
                    return 2;
                }
                if (timeout_s > 0.0 && t - start > timeout_s) {
                    *peer = behind;
                    return 1;
                }
            }
        }
    }
}

void dr_shm_attach(void *segment, int rank, int64_t pid) {
    rank_line *lines = (rank_line *)segment;
    lines[rank].pid = pid;
}

static char *slot(void *segment, int world, int64_t slot_bytes, int64_t seq, int rank) {
    char *banks = (char *)segment + (int64_t)world * LINE;
    return banks + ((seq & 1) * world + rank) * slot_bytes;
}

int dr_shm_all_reduce(void *segment, int rank, int world, int64_t slot_bytes, int64_t *seq,
                      float *x, int64_t n, double timeout_s, int *peer) {
    rank_line *lines = (rank_line *)segment;
    const int64_t per = slot_bytes / (int64_t)sizeof(float);
    for (int64_t at = 0; at < n; at += per) {
        const int64_t m = n - at < per ? n - at : per;
        const int64_t s = ++*seq;
        memcpy(slot(segment, world, slot_bytes, s, rank), x + at, (size_t)m * sizeof(float));
        __atomic_store_n(&lines[rank].seq, s, __ATOMIC_RELEASE);
        const int err = wait_all(lines, world, s, timeout_s, peer);
        if (err) return err;
        const float *first = (const float *)slot(segment, world, slot_bytes, s, 0);
        float *out = x + at;
        for (int64_t i = 0; i < m; i++) out[i] = first[i];
        for (int r = 1; r < world; r++) {
            const float *p = (const float *)slot(segment, world, slot_bytes, s, r);
            for (int64_t i = 0; i < m; i++) out[i] += p[i];
        }
    }
    return 0;
}

int dr_shm_all_gather(void *segment, int rank, int world, int64_t slot_bytes, int64_t *seq,
                      const void *x, int64_t nbytes, void *out, double timeout_s, int *peer) {
    rank_line *lines = (rank_line *)segment;
    const char *src = (const char *)x;
    char *dst = (char *)out;
    for (int64_t at = 0; at < nbytes; at += slot_bytes) {
        const int64_t m = nbytes - at < slot_bytes ? nbytes - at : slot_bytes;
        const int64_t s = ++*seq;
        memcpy(slot(segment, world, slot_bytes, s, rank), src + at, (size_t)m);
        __atomic_store_n(&lines[rank].seq, s, __ATOMIC_RELEASE);
        const int err = wait_all(lines, world, s, timeout_s, peer);
        if (err) return err;
        for (int r = 0; r < world; r++)
            memcpy(dst + r * nbytes + at, slot(segment, world, slot_bytes, s, r), (size_t)m);
    }
    return 0;
}
