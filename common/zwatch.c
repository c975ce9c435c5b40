/* zwatch.c - a ZeroMQ socket in a libuv loop (see zwatch.h). */
#include "common/zwatch.h"

#include <errno.h>
#include <stdlib.h>
#include <zmq.h>

#include "common/log.h"

/* Four handles close asynchronously; the watcher is freed after the last. */
#define ZWATCH_HANDLES 4

struct dx_zwatch {
    uv_prepare_t prepare;
    uv_check_t check;
    uv_idle_t idle;
    uv_poll_t poll;
    void *zsock;
    int events;
    dx_zwatch_cb cb;
    void *arg;
    int open_handles;
    int stopping;
};

static int zwatch_pending(dx_zwatch_t *w)
{
    int zevents = 0;
    size_t len = sizeof(zevents);

    if (zmq_getsockopt(w->zsock, ZMQ_EVENTS, &zevents, &len) < 0) {
        /* ETERM or a closed socket: report it as readable so the owner's
         * recv sees the error and can shut down. */
        dx_debug("zwatch: ZMQ_EVENTS failed: %s", zmq_strerror(errno));
        return w->events;
    }
    return zevents & w->events;
}

static void zwatch_idle_cb(uv_idle_t *h)
{
    (void)h; /* only there to keep the loop from blocking */
}

static void zwatch_poll_cb(uv_poll_t *h, int status, int events)
{
    (void)events;
    if (status < 0)
        dx_warn("zwatch: poll on ZMQ_FD failed: %s", uv_strerror(status));
    (void)h; /* the check handle does the work */
}

static void zwatch_prepare_cb(uv_prepare_t *h)
{
    dx_zwatch_t *w = h->data;

    if (zwatch_pending(w))
        uv_idle_start(&w->idle, zwatch_idle_cb);
    else
        uv_poll_start(&w->poll, UV_READABLE, zwatch_poll_cb);
}

static void zwatch_check_cb(uv_check_t *h)
{
    dx_zwatch_t *w = h->data;
    int revents;

    uv_idle_stop(&w->idle);
    uv_poll_stop(&w->poll);
    revents = zwatch_pending(w);
    if (revents)
        w->cb(w, revents, w->arg);
}

int dx_zwatch_create(uv_loop_t *loop, void *zsock, int events, dx_zwatch_cb cb, void *arg,
                     dx_zwatch_t **out)
{
    dx_zwatch_t *w;
    int fd;
    size_t len = sizeof(fd);
    int rc;

    if (zmq_getsockopt(zsock, ZMQ_FD, &fd, &len) < 0)
        return -errno;
    w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->zsock = zsock;
    w->events = events;
    w->cb = cb;
    w->arg = arg;
    if ((rc = uv_poll_init(loop, &w->poll, fd)) < 0) {
        free(w);
        return rc;
    }
    /* init of these three cannot fail */
    uv_prepare_init(loop, &w->prepare);
    uv_check_init(loop, &w->check);
    uv_idle_init(loop, &w->idle);
    w->prepare.data = w->check.data = w->idle.data = w->poll.data = w;
    w->open_handles = ZWATCH_HANDLES;
    uv_prepare_start(&w->prepare, zwatch_prepare_cb);
    uv_check_start(&w->check, zwatch_check_cb);
    *out = w;
    return 0;
}

static void zwatch_closed(uv_handle_t *h)
{
    dx_zwatch_t *w = h->data;
    if (--w->open_handles == 0)
        free(w);
}

void dx_zwatch_destroy(dx_zwatch_t *w)
{
    if (!w || w->stopping)
        return;
    w->stopping = 1;
    uv_close((uv_handle_t *)&w->prepare, zwatch_closed);
    uv_close((uv_handle_t *)&w->check, zwatch_closed);
    uv_close((uv_handle_t *)&w->idle, zwatch_closed);
    uv_close((uv_handle_t *)&w->poll, zwatch_closed);
}

void *dx_zwatch_socket(dx_zwatch_t *w)
{
    return w->zsock;
}
