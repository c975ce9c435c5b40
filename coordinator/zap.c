/* zap.c - duplexd's ZAP handler (see zap.h). */
#include "coordinator/zap.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/ratelimit.h"
#include "common/zwatch.h"

/* A ZAP request has 7 frames for CURVE (the credential is the key). */
#define ZAP_MAX_FRAMES 8
#define ZAP_LOG_WINDOW_MS 1000
#define ZAP_LOG_BURST 10

struct coord_zap {
    void *sock;
    dx_zwatch_t *watch;
    const dx_authz_t *authz;
    struct dx_ratelimit log;
    struct coord_zap_stats stats;
};

static bool frame_is(const void *data, size_t size, const char *s)
{
    return size == strlen(s) && memcmp(data, s, size) == 0;
}

static int zap_answer(struct coord_zap_reply *out, const char *status, const char *text,
                      const char *user_id)
{
    snprintf(out->status, sizeof(out->status), "%s", status);
    snprintf(out->text, sizeof(out->text), "%s", text);
    snprintf(out->user_id, sizeof(out->user_id), "%s", user_id);
    return status[0] == '5' ? -EPROTO : 0;
}

int coord_zap_decide(const dx_authz_t *authz, const void *const *frames, const size_t *sizes,
                     size_t n, struct coord_zap_reply *out)
{
    char key[DX_CERT_KEY_LEN + 1];
    const struct coord_principal *p;

    memset(out, 0, sizeof(*out));
    if (n < 6 || !frame_is(frames[0], sizes[0], "1.0"))
        return zap_answer(out, "500", "not a ZAP 1.0 request", "");
    if (!frame_is(frames[2], sizes[2], DX_CERT_ZAP_DOMAIN))
        return zap_answer(out, "400", "unknown ZAP domain", "");
    if (!frame_is(frames[5], sizes[5], "CURVE"))
        return zap_answer(out, "400", "only CURVE is accepted", "");
    if (n != 7 || sizes[6] != 32)
        return zap_answer(out, "500", "a CURVE request carries one 32-byte key", "");
    if (!zmq_z85_encode(key, frames[6], 32))
        return zap_answer(out, "500", "cannot encode the key", "");
    if (!(p = dx_authz_find(authz, key)))
        return zap_answer(out, "400", "key not in duplexd's allow-list", "");
    return zap_answer(out, "200", "OK", p->key);
}

static void zap_log_refusal(coord_zap_t *z, const char *addr, const char *key,
                            const struct coord_zap_reply *r)
{
    uint64_t suppressed;

    if (!dx_ratelimit_allow(&z->log, dx_mono_ms(), &suppressed))
        return;
    if (suppressed)
        dx_warn("(%llu more refused connections not logged)", (unsigned long long)suppressed);
    dx_warn("refused a connection from %s (key %s): %s", addr, key, r->text);
}

static int zap_send(void *sock, const void *data, size_t len, int more)
{
    return zmq_send(sock, data, len, more ? ZMQ_SNDMORE : 0) < 0 ? -errno : 0;
}

/* Receives one request, answers it. Returns 1 when one was served, 0 when
 * none was waiting, -errno on a socket error. */
static int zap_serve_one(coord_zap_t *z)
{
    zmq_msg_t frames[ZAP_MAX_FRAMES];
    const void *data[ZAP_MAX_FRAMES];
    size_t sizes[ZAP_MAX_FRAMES], total = 0, kept = 0;
    struct coord_zap_reply r;
    char addr[64] = "?", key[DX_CERT_KEY_LEN + 1] = "?";
    int more = 1, rc = 1;

    while (more) { /* frames past ZAP_MAX_FRAMES are read and dropped */
        zmq_msg_t extra, *f = kept < ZAP_MAX_FRAMES ? &frames[kept] : &extra;

        zmq_msg_init(f);
        if (zmq_msg_recv(f, z->sock, total == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            rc = errno == EAGAIN && total == 0 ? 0 : -errno;
            zmq_msg_close(f);
            goto out;
        }
        more = zmq_msg_more(f);
        total++;
        if (f == &extra)
            zmq_msg_close(f);
        else
            kept++;
    }
    for (size_t i = 0; i < kept; i++) {
        data[i] = zmq_msg_data(&frames[i]);
        sizes[i] = zmq_msg_size(&frames[i]);
    }
    coord_zap_decide(z->authz, data, sizes, total, &r);
    if (r.status[0] == '2') {
        z->stats.accepted++;
    } else {
        if (r.status[0] == '5')
            z->stats.malformed++;
        z->stats.refused++;
        if (kept > 3)
            snprintf(addr, sizeof(addr), "%.*s", (int)(sizes[3] < 48 ? sizes[3] : 48),
                     (const char *)data[3]);
        if (total == 7 && sizes[6] == 32)
            zmq_z85_encode(key, data[6], 32);
        zap_log_refusal(z, addr, key, &r);
    }
    /* the reply echoes the request id (frame 1) */
    if (zap_send(z->sock, "1.0", 3, 1) < 0 ||
        zap_send(z->sock, kept > 1 ? data[1] : "", kept > 1 ? sizes[1] : 0, 1) < 0 ||
        zap_send(z->sock, r.status, strlen(r.status), 1) < 0 ||
        zap_send(z->sock, r.text, strlen(r.text), 1) < 0 ||
        zap_send(z->sock, r.user_id, strlen(r.user_id), 1) < 0 || zap_send(z->sock, "", 0, 0) < 0)
        dx_warn("ZAP reply not sent: %s", zmq_strerror(errno));
out:
    for (size_t i = 0; i < kept; i++)
        zmq_msg_close(&frames[i]);
    return rc;
}

static void zap_on_readable(dx_zwatch_t *w, int revents, void *arg)
{
    coord_zap_t *z = arg;
    (void)w;
    (void)revents;

    for (int i = 0; i < DX_ZWATCH_BATCH; i++) {
        int rc = zap_serve_one(z);
        if (rc == 0)
            return;
        if (rc < 0) {
            dx_error("ZAP handler: %s", zmq_strerror(-rc));
            return;
        }
    }
}

int coord_zap_create(uv_loop_t *loop, void *zctx, const dx_authz_t *authz, coord_zap_t **out,
                     char *err, size_t errlen)
{
    coord_zap_t *z = calloc(1, sizeof(*z));
    int linger = 0, rc;

    *out = NULL;
    if (!z)
        return -ENOMEM;
    z->authz = authz;
    z->log = (struct dx_ratelimit)DX_RATELIMIT_INIT(ZAP_LOG_WINDOW_MS, ZAP_LOG_BURST);
    if (!(z->sock = zmq_socket(zctx, ZMQ_REP)) ||
        zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_bind(z->sock, COORD_ZAP_ENDPOINT) < 0) {
        rc = -errno;
        rc = dx_errf(err, errlen, rc, "cannot start the ZAP handler on %s: %s", COORD_ZAP_ENDPOINT,
                     zmq_strerror(-rc));
        goto fail;
    }
    if ((rc = dx_zwatch_create(loop, z->sock, ZMQ_POLLIN, zap_on_readable, z, &z->watch)) < 0) {
        rc = dx_errf(err, errlen, rc, "cannot watch the ZAP handler: %s", strerror(-rc));
        goto fail;
    }
    *out = z;
    return 0;
fail:
    coord_zap_destroy(z);
    return rc;
}

void coord_zap_destroy(coord_zap_t *z)
{
    if (!z)
        return;
    dx_zwatch_destroy(z->watch);
    if (z->sock)
        zmq_close(z->sock);
    free(z);
}

void coord_zap_set_authz(coord_zap_t *z, const dx_authz_t *authz)
{
    z->authz = authz;
}

void coord_zap_stats(const coord_zap_t *z, struct coord_zap_stats *out)
{
    *out = z->stats;
}
