/* test_zmonitor.c - dx_monitor: events nobody reads for a while (a busy
 * or stopping loop) never stall the monitored socket's connections, and
 * closing the monitor then returns. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

#include "common/zmonitor.h"

/* Over libzmq's default queue of a monitor's events (its PAIR's 1,000
 * plus ours): each connection makes two, accepted and disconnected. */
#define CONNECTIONS 1200

static void *dealer(void *ctx, const char *endpoint)
{
    void *d = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;

    cr_assert_not_null(d);
    cr_assert_eq(zmq_setsockopt(d, ZMQ_LINGER, &linger, sizeof(linger)), 0);
    cr_assert_eq(zmq_connect(d, endpoint), 0, "%s", zmq_strerror(errno));
    cr_assert_eq(zmq_send(d, "hi", 2, 0), 2);
    return d;
}

/* Receives one message (routing id and body) within timeout_ms: 1, or 0. */
static int router_recv(void *router, int timeout_ms)
{
    char buf[64];
    int more = 0;
    size_t len = sizeof(more);

    zmq_setsockopt(router, ZMQ_RCVTIMEO, &timeout_ms, sizeof(timeout_ms));
    if (zmq_recv(router, buf, sizeof(buf), 0) < 0)
        return 0;
    zmq_getsockopt(router, ZMQ_RCVMORE, &more, &len);
    return more && zmq_recv(router, buf, sizeof(buf), 0) >= 0;
}

Test(zmonitor, unread_events_never_stall_the_socket, .timeout = 120)
{
    void *ctx = zmq_ctx_new(), *peers = zmq_ctx_new(), *router, *pair = NULL, *late;
    void **dealers = calloc(CONNECTIONS, sizeof(*dealers));
    char endpoint[64];
    size_t len = sizeof(endpoint);
    int linger = 0;

    cr_assert(ctx && peers && dealers);
    cr_assert_eq(zmq_ctx_set(peers, ZMQ_MAX_SOCKETS, CONNECTIONS + 16), 0);
    router = zmq_socket(ctx, ZMQ_ROUTER);
    cr_assert_eq(zmq_setsockopt(router, ZMQ_LINGER, &linger, sizeof(linger)), 0);
    cr_assert_eq(zmq_bind(router, "tcp://127.0.0.1:*"), 0);
    cr_assert_eq(zmq_getsockopt(router, ZMQ_LAST_ENDPOINT, endpoint, &len), 0);
    cr_assert_eq(dx_monitor_open(ctx, router, "inproc://test-monitor",
                                 ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED, &pair),
                 0);
    /* every connection accepted (its message arrived), then closed; no
     * event read */
    for (int i = 0; i < CONNECTIONS; i++)
        dealers[i] = dealer(peers, endpoint);
    for (int i = 0; i < CONNECTIONS; i++)
        cr_assert(router_recv(router, 10000), "message %d of %d did not arrive", i + 1,
                  CONNECTIONS);
    for (int i = 0; i < CONNECTIONS; i++)
        zmq_close(dealers[i]);
    /* the socket still serves: a new connection's message arrives */
    late = dealer(peers, endpoint);
    cr_assert(router_recv(router, 10000),
              "a new connection's message did not arrive: the I/O thread is stuck on the "
              "monitor's unread events");
    zmq_close(late);
    /* and closing the monitor returns (the test's timeout catches a hang) */
    dx_monitor_close(router, pair);
    zmq_close(router);
    zmq_ctx_term(ctx);
    zmq_ctx_term(peers);
    free(dealers);
}
