/* loopstat.h - an event loop's own latency: how long each turn kept the
 * loop from polling (a log2 histogram and the maximum), and how late its
 * periodic work ran. duplexd shows these in `status --json`, and its
 * liveness decisions discount the time the loop itself was late. */
#ifndef DX_LOOPSTAT_H
#define DX_LOOPSTAT_H

#include <stdint.h>

/* Bucket i counts turns busy at most dx_loopstat_bucket_us(i); the last
 * bucket counts the rest. */
#define DX_LOOPSTAT_BUCKETS 18
#define DX_LOOPSTAT_FIRST_US 64 /* the first bucket's bound; each doubles */

struct dx_loopstat {
    uint64_t turns;
    uint64_t busy[DX_LOOPSTAT_BUCKETS];
    int64_t busy_us_max;
    int64_t woke_us;     /* when the loop last came back from polling; 0: not yet */
    uint64_t late_count; /* periodic work that ran late (dx_loopstat_late) */
    int64_t late_ms_max;
    int64_t late_ms_total; /* the sum: time the loop could not listen */
};

/* The loop came back from polling (a uv_check callback) at now_us. */
void dx_loopstat_woke(struct dx_loopstat *ls, int64_t now_us);

/* The loop is about to poll again (the end of a uv_prepare callback):
 * counts the turn since it woke. Returns how long it was busy (us). */
int64_t dx_loopstat_sleeps(struct dx_loopstat *ls, int64_t now_us);

/* Periodic work due every period_ms ran gap_ms after its last run. When it
 * is more than allowance_ms late, the lateness is counted and returned
 * (the time the loop could not have heard anyone); else 0. */
int64_t dx_loopstat_late(struct dx_loopstat *ls, int64_t gap_ms, int64_t period_ms,
                         int64_t allowance_ms);

/* The upper bound of bucket i in us, or -1 for the last (unbounded) one. */
int64_t dx_loopstat_bucket_us(int i);

#endif
