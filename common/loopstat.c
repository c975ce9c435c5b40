/* loopstat.c - an event loop's own latency (see loopstat.h). */
#include "common/loopstat.h"

int64_t dx_loopstat_bucket_us(int i)
{
    if (i < 0 || i >= DX_LOOPSTAT_BUCKETS - 1)
        return -1;
    return (int64_t)DX_LOOPSTAT_FIRST_US << i;
}

void dx_loopstat_woke(struct dx_loopstat *ls, int64_t now_us)
{
    ls->woke_us = now_us;
}

int64_t dx_loopstat_sleeps(struct dx_loopstat *ls, int64_t now_us)
{
    int64_t busy;
    int i = 0;

    if (!ls->woke_us)
        return 0; /* the first turn: it has not polled yet */
    busy = now_us > ls->woke_us ? now_us - ls->woke_us : 0;
    while (i < DX_LOOPSTAT_BUCKETS - 1 && busy > dx_loopstat_bucket_us(i))
        i++;
    ls->busy[i]++;
    ls->turns++;
    if (busy > ls->busy_us_max)
        ls->busy_us_max = busy;
    return busy;
}

int64_t dx_loopstat_late(struct dx_loopstat *ls, int64_t gap_ms, int64_t period_ms,
                         int64_t allowance_ms)
{
    int64_t late = gap_ms - period_ms;

    if (late <= allowance_ms)
        return 0;
    ls->late_count++;
    ls->late_ms_total += late;
    if (late > ls->late_ms_max)
        ls->late_ms_max = late;
    return late;
}
