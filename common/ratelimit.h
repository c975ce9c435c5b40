/* ratelimit.h - keeps a flood of bad input from flooding the log: allows a
 * number of events per window and counts the rest. */
#ifndef DX_RATELIMIT_H
#define DX_RATELIMIT_H

#include <stdbool.h>
#include <stdint.h>

struct dx_ratelimit {
    int64_t window_ms;
    int burst;
    int64_t window_start;
    int used;
    uint64_t suppressed; /* events dropped since the last allowed one */
};

#define DX_RATELIMIT_INIT(window, n)                                                               \
    {                                                                                              \
        .window_ms = (window), .burst = (n)                                                        \
    }

/* True when the event at now_ms may be logged. When a new window opens,
 * *suppressed_out gets the number dropped in earlier windows (else 0). */
bool dx_ratelimit_allow(struct dx_ratelimit *rl, int64_t now_ms, uint64_t *suppressed_out);

#endif
