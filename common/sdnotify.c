/* sdnotify.c - sd_notify(3) messages and the loop watchdog (see sdnotify.h). */
#include "common/sdnotify.h"

#include <stdio.h>
#include <stdlib.h>
#include <systemd/sd-daemon.h>

#include "common/log.h"

/* sd_notify returns > 0 when sent, 0 when NOTIFY_SOCKET is unset, else
 * -errno; the callers only care about failures. */
static int sd_send(const char *msg)
{
    int rc = sd_notify(0, msg);

    if (rc < 0) {
        dx_debug("sd_notify(%s): %d", msg, rc);
        return rc;
    }
    return 0;
}

int dx_sd_ready(const char *status)
{
    char msg[512];

    if (!status)
        return sd_send("READY=1");
    snprintf(msg, sizeof(msg), "READY=1\nSTATUS=%s", status);
    return sd_send(msg);
}

int dx_sd_status(const char *status)
{
    char msg[512];

    snprintf(msg, sizeof(msg), "STATUS=%s", status);
    return sd_send(msg);
}

int dx_sd_stopping(void)
{
    return sd_send("STOPPING=1");
}

static void watchdog_on_timer(uv_timer_t *timer)
{
    (void)timer;
    sd_send("WATCHDOG=1");
}

int dx_sd_watchdog_start(uv_loop_t *loop, uv_timer_t *timer)
{
    uint64_t usec = 0, period_ms;
    int rc;

    if (!getenv("NOTIFY_SOCKET"))
        return 0;
    /* > 0: enabled for this pid (WATCHDOG_PID unset, or ours); 0: not asked for */
    rc = sd_watchdog_enabled(0, &usec);
    if (rc <= 0)
        return rc;
    period_ms = usec / 2000; /* half the period, in ms */
    if (period_ms == 0)
        period_ms = 1;
    if ((rc = uv_timer_init(loop, timer)) < 0)
        return rc;
    uv_update_time(loop); /* the loop may not have run for a while */
    if ((rc = uv_timer_start(timer, watchdog_on_timer, 0, period_ms)) < 0) {
        uv_close((uv_handle_t *)timer, NULL);
        return rc;
    }
    uv_unref((uv_handle_t *)timer);
    dx_debug("systemd watchdog: pinging every %llu ms", (unsigned long long)period_ms);
    return 1;
}
