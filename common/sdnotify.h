/* sdnotify.h - telling systemd how a daemon is doing (Type=notify): READY=1
 * once serving, STATUS= lines, STOPPING=1 on the way out, and WATCHDOG=1
 * pings from a libuv timer so that a hung event loop gets killed and
 * restarted (WatchdogSec=). Everything is a no-op outside systemd, i.e. when
 * NOTIFY_SOCKET is not set. */
#ifndef DX_SDNOTIFY_H
#define DX_SDNOTIFY_H

#include <uv.h>

/* Sends READY=1 (with STATUS=status when status is not NULL). Returns 0
 * (also when not under systemd) or -errno. */
int dx_sd_ready(const char *status);

/* Sends STATUS=status. Returns 0 or -errno. */
int dx_sd_status(const char *status);

/* Sends STOPPING=1. Returns 0 or -errno. */
int dx_sd_stopping(void);

/* When systemd asks for watchdog pings (NOTIFY_SOCKET, WATCHDOG_USEC and, if
 * set, WATCHDOG_PID naming this process), initialises timer on loop and
 * sends WATCHDOG=1 every half period from it; the timer is unreferenced, so
 * it never keeps the loop alive, and it is closed with the loop's other
 * handles. Otherwise leaves timer alone. Returns 1 when pinging, 0 when no
 * watchdog was asked for, or -errno. */
int dx_sd_watchdog_start(uv_loop_t *loop, uv_timer_t *timer);

#endif
