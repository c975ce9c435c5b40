/* ratelimit.c - bounded logging of repeated events (see ratelimit.h). */
#include "common/ratelimit.h"

bool dx_ratelimit_allow(struct dx_ratelimit *rl, int64_t now_ms, uint64_t *suppressed_out)
{
    *suppressed_out = 0;
    if (now_ms - rl->window_start >= rl->window_ms) {
        rl->window_start = now_ms;
        rl->used = 0;
    }
    if (rl->used >= rl->burst) {
        rl->suppressed++;
        return false;
    }
    rl->used++;
    *suppressed_out = rl->suppressed;
    rl->suppressed = 0;
    return true;
}
