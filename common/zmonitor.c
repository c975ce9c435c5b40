/* zmonitor.c - a ZeroMQ socket's monitor (see zmonitor.h). */
#include "common/zmonitor.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

int dx_monitor_open(void *zctx, void *sock, const char *endpoint, int events, void **pair)
{
    void *p;
    int linger = 0, unbounded = 0;

    *pair = NULL;
    if (zmq_socket_monitor(sock, endpoint, events) < 0)
        return -errno;
    /* No limit on the events queued for us: at the limit libzmq's I/O
     * thread blocks in its send of the next one, holding the monitor's lock,
     * so every connection of sock stalls and dx_monitor_close (which takes
     * that lock) never returns. A few bytes per event, at most a few events
     * per connection. */
    if (!(p = zmq_socket(zctx, ZMQ_PAIR)) ||
        zmq_setsockopt(p, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_setsockopt(p, ZMQ_RCVHWM, &unbounded, sizeof(unbounded)) < 0 ||
        zmq_connect(p, endpoint) < 0) {
        int rc = -errno;
        if (p)
            zmq_close(p);
        zmq_socket_monitor(sock, NULL, 0);
        return rc;
    }
    *pair = p;
    return 0;
}

void dx_monitor_close(void *sock, void *pair)
{
    if (sock && pair)
        zmq_socket_monitor(sock, NULL, 0);
    if (pair)
        zmq_close(pair);
}

int dx_monitor_recv(void *pair, uint16_t *event, uint32_t *value)
{
    zmq_msg_t msg, addr;
    int rc = 1;

    *event = 0;
    *value = 0;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, pair, ZMQ_DONTWAIT) < 0) {
        rc = errno == EAGAIN ? 0 : -errno;
        zmq_msg_close(&msg);
        return rc;
    }
    if (zmq_msg_size(&msg) >= sizeof(*event) + sizeof(*value)) {
        memcpy(event, zmq_msg_data(&msg), sizeof(*event));
        memcpy(value, (const uint8_t *)zmq_msg_data(&msg) + sizeof(*event), sizeof(*value));
    }
    zmq_msg_init(&addr); /* the second frame: the endpoint */
    if (zmq_msg_more(&msg))
        zmq_msg_recv(&addr, pair, 0);
    zmq_msg_close(&addr);
    zmq_msg_close(&msg);
    return rc;
}

const char *dx_monitor_event_name(uint16_t event, uint32_t value)
{
    static __thread char text[96];

    switch (event) {
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
        snprintf(text, sizeof(text), "refused by duplexd's allow-list (ZAP status %u)", value);
        return text;
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "the peer speaks another security mechanism or a wrong key was given";
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "the handshake failed (wrong server key?)";
    case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
        return "handshake succeeded";
    case ZMQ_EVENT_DISCONNECTED:
        return "disconnected";
    default:
        snprintf(text, sizeof(text), "event 0x%x (%u)", event, value);
        return text;
    }
}
