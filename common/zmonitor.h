/* zmonitor.h - a ZeroMQ socket's monitor (zmq_socket_monitor): the PAIR
 * socket its events arrive on, reading one event, and naming it. Used to
 * see connections close (duplexd) and CURVE handshakes fail (workers,
 * duplexctl), which ZeroMQ otherwise keeps to itself. */
#ifndef DX_ZMONITOR_H
#define DX_ZMONITOR_H

#include <stdint.h>
#include <zmq.h>

/* Monitors sock for the ZMQ_EVENT_* bits in events, delivered on a PAIR
 * socket connected to endpoint (an inproc:// name unique in zctx).
 * Returns 0 with *pair, or -errno. */
int dx_monitor_open(void *zctx, void *sock, const char *endpoint, int events, void **pair);

/* Stops monitoring sock and closes pair (either may be NULL). */
void dx_monitor_close(void *sock, void *pair);

/* Reads one event without blocking. Returns 1 with *event and *value (the
 * fd, errno or ZAP status it carries), 0 when none is waiting, or -errno. */
int dx_monitor_recv(void *pair, uint16_t *event, uint32_t *value);

/* "handshake refused by duplexd's ZAP handler (400)" style text. */
const char *dx_monitor_event_name(uint16_t event, uint32_t value);

/* The events that say a handshake failed. */
#define DX_MONITOR_HANDSHAKE_FAILED                                                                \
    (ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |                  \
     ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)

#endif
