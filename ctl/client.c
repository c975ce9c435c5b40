/* client.c - duplexctl's request/reply link to duplexd (see client.h). */
#include "ctl/client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/zmonitor.h"
#include "ctl/ctl.h"
#include "proto/cert.h"
#include "proto/wire.h"

#define CLIENT_MONITOR "inproc://duplexctl-handshake"

struct ctl_client {
    void *zctx;
    void *dealer;
    void *handshakes; /* the DEALER's monitor: refused handshakes */
    bool secure;      /* CURVE keys given */
    char *coordinator;
    int timeout_ms;
    uint64_t next_request_id;
};

int ctl_client_create(const struct ctl_globals *g, int timeout_ms, ctl_client_t **out, char *err,
                      size_t errlen)
{
    const char *coordinator = g->coordinator;
    ctl_client_t *c = calloc(1, sizeof(*c));
    struct dx_cert own;
    char server_key[DX_CERT_KEY_LEN + 1];
    int linger = 0, secure, rc;

    secure = dx_cert_load_client(g->key[0] ? g->key : NULL, g->server_key[0] ? g->server_key : NULL,
                                 g->insecure, &own, server_key, err, errlen);
    if (secure < 0) {
        free(c);
        return secure;
    }
    if (!c || !(c->coordinator = strdup(coordinator))) {
        free(c);
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    }
    c->timeout_ms = timeout_ms;
    c->secure = secure;
    c->zctx = zmq_ctx_new();
    if (!c->zctx || !(c->dealer = zmq_socket(c->zctx, ZMQ_DEALER)) ||
        dx_wire_setup(c->dealer) < 0 ||
        zmq_setsockopt(c->dealer, ZMQ_LINGER, &linger, sizeof(linger)) < 0) {
        rc = errno ? -errno : -EINVAL;
        rc = dx_errf(err, errlen, rc, "cannot set up a ZeroMQ socket: %s", zmq_strerror(-rc));
        goto fail;
    }
    if ((secure && (rc = dx_cert_apply_client(c->dealer, &own, server_key)) < 0) ||
        (rc = dx_monitor_open(c->zctx, c->dealer, CLIENT_MONITOR, DX_MONITOR_HANDSHAKE_FAILED,
                              &c->handshakes)) < 0) {
        rc = dx_errf(err, errlen, rc, "cannot set up %s: %s",
                     secure ? "CURVE" : "the socket's monitor", zmq_strerror(-rc));
        goto fail;
    }
    if (zmq_connect(c->dealer, coordinator) < 0) {
        rc = errno ? -errno : -EINVAL;
        rc = dx_errf(err, errlen, rc, "cannot connect to %s: %s", coordinator, zmq_strerror(-rc));
        goto fail;
    }
    *out = c;
    return 0;
fail:
    ctl_client_destroy(c);
    return rc;
}

int ctl_client_call(ctl_client_t *c, Duplex__MsgType type, const ProtobufCMessage *body,
                    Duplex__MsgType reply_type, struct dx_msg *reply, char *err, size_t errlen)
{
    uint64_t id = ++c->next_request_id;
    int64_t deadline = dx_mono_ms() + c->timeout_ms;
    int rc;

    /* Without ZMQ_IMMEDIATE the request waits in the queue until connected. */
    if ((rc = dx_wire_send(c->dealer, NULL, 0, type, id, body)) < 0)
        return dx_errf(err, errlen, rc, "cannot send to %s: %s", c->coordinator, strerror(-rc));
    for (;;) {
        zmq_pollitem_t items[2] = {{.socket = c->dealer, .events = ZMQ_POLLIN},
                                   {.socket = c->handshakes, .events = ZMQ_POLLIN}};
        int64_t left = deadline - dx_mono_ms();
        struct dx_decode_error derr;
        uint16_t event;
        uint32_t value;

        if (left <= 0 || zmq_poll(items, c->handshakes ? 2 : 1, (long)left) == 0)
            return dx_errf(err, errlen, -ETIMEDOUT,
                           "no answer from duplexd at %s within %.1f s (is it running%s?)",
                           c->coordinator, c->timeout_ms / 1000.0,
                           c->handshakes ? ", and is --server-key its public key" : "");
        /* a reply waiting wins: a handshake may have failed and a later
         * reconnection succeeded (duplexd restarted meanwhile) */
        if (!(items[0].revents & ZMQ_POLLIN) && c->handshakes &&
            dx_monitor_recv(c->handshakes, &event, &value) > 0) {
            if (c->secure)
                return dx_errf(err, errlen, -EACCES, "duplexd at %s refused our key: %s",
                               c->coordinator, dx_monitor_event_name(event, value));
            return dx_errf(err, errlen, -EACCES,
                           "duplexd at %s speaks CURVE: give --key and --server-key (or $%s and "
                           "$%s)",
                           c->coordinator, DX_CERT_KEY_ENV, DX_CERT_SERVER_KEY_ENV);
        }
        rc = dx_wire_recv(c->dealer, reply, &derr);
        if (rc == -EAGAIN || rc == -EINTR)
            continue;
        if (rc == -EPROTO)
            return dx_errf(err, errlen, rc, "bad answer from %s: %s", c->coordinator, derr.text);
        if (rc < 0)
            return dx_errf(err, errlen, rc, "receive from %s failed: %s", c->coordinator,
                           strerror(-rc));
        if (reply->request_id != id) {
            dx_msg_clear(reply); /* a late answer to an earlier call */
            continue;
        }
        if (reply->type == reply_type)
            return 0;
        if (reply->type == DUPLEX__MSG_TYPE__MSG_ERROR) {
            const Duplex__Error *e = (const Duplex__Error *)reply->body;
            rc = dx_errf(err, errlen, -EPROTO, "duplexd refused the request: %s: %s",
                         dx_error_code_name(e->code), e->text);
        } else {
            rc = dx_errf(err, errlen, -EPROTO, "duplexd answered %s to %s",
                         dx_msg_type_name(reply->type), dx_msg_type_name(type));
        }
        dx_msg_clear(reply);
        return rc;
    }
}

void ctl_client_destroy(ctl_client_t *c)
{
    if (!c)
        return;
    dx_monitor_close(c->dealer, c->handshakes);
    if (c->dealer)
        zmq_close(c->dealer);
    if (c->zctx)
        zmq_ctx_term(c->zctx);
    free(c->coordinator);
    free(c);
}

void ctl_workers_clear(struct ctl_workers *w)
{
    for (size_t i = 0; i < w->n_pages; i++)
        dx_msg_clear(&w->pages[i]);
    free(w->pages);
    free(w->workers);
    memset(w, 0, sizeof(*w));
}

int ctl_workers_fetch(ctl_client_t *c, unsigned page, struct ctl_workers *out, char *err,
                      size_t errlen)
{
    char after[DX_MAX_ID_LEN + 1] = "";
    int rc;

    memset(out, 0, sizeof(*out));
    for (;;) {
        Duplex__ListWorkers req = DUPLEX__LIST_WORKERS__INIT;
        const Duplex__ListWorkersReply *r;
        struct dx_msg *pages;
        Duplex__WorkerInfo **all;

        if (!(pages = realloc(out->pages, (out->n_pages + 1) * sizeof(*pages)))) {
            rc = -ENOMEM;
            goto fail;
        }
        out->pages = pages;
        req.after_id = after;
        req.limit = page;
        if ((rc = ctl_client_call(c, DUPLEX__MSG_TYPE__MSG_LIST_WORKERS, &req.base,
                                  DUPLEX__MSG_TYPE__MSG_LIST_WORKERS_REPLY,
                                  &out->pages[out->n_pages], err, errlen)) < 0)
            goto fail;
        r = (const Duplex__ListWorkersReply *)out->pages[out->n_pages++].body;
        if (!(all = realloc(out->workers, (out->n + r->n_workers + 1) * sizeof(*all)))) {
            rc = -ENOMEM;
            goto fail;
        }
        out->workers = all;
        if (r->n_workers)
            memcpy(all + out->n, r->workers, r->n_workers * sizeof(*all));
        out->n += r->n_workers;
        if (!r->next_after_id[0])
            return 0;
        /* a next page must start past this one: a duplexd that says
         * otherwise would keep us asking forever */
        if (strcmp(r->next_after_id, after) <= 0 || strlen(r->next_after_id) > DX_MAX_ID_LEN) {
            rc = dx_errf(err, errlen, -EPROTO,
                         "duplexd's worker list does not advance (after \"%s\")", after);
            goto fail;
        }
        snprintf(after, sizeof(after), "%s", r->next_after_id);
    }
fail:
    if (rc == -ENOMEM)
        rc = dx_errf(err, errlen, rc, "out of memory listing workers");
    ctl_workers_clear(out);
    return rc;
}
