/* dataplane.c - tagged messages between workers over PULL/PUSH sockets
 * (see dataplane.h). Owns the PULL socket, the PUSH socket per peer address
 * and the buffer of messages that came before their turn. */
#include "worker/dataplane.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/ratelimit.h"
#include "pipeline/schedule.h"

/* Frame layout, little-endian: magic, then the key. */
#define DATA_MAGIC 0x31445844u /* "DXD1" */
#define KEY_BYTES (8 + 4 + 8 + 4 * 4)
#define HEADER_BYTES (4 + KEY_BYTES)
/* No high-water mark: sends are eager in the schedule model (a send never
 * waits for its receiver), and a step's messages are bounded by its
 * schedule. */
#define DATA_HWM 0
/* Bad frames logged per window before they are only counted. */
#define BAD_LOG_WINDOW_MS 1000
#define BAD_LOG_BURST 5

#define HASH_NONFATAL_OOM 1
#define uthash_nonfatal_oom(e) ((e)->d->oom = true)
#include <uthash.h>

struct buffered {
    uint8_t hkey[KEY_BYTES]; /* the encoded key */
    struct wk_data_msg *msg;
    struct wk_data *d;
    UT_hash_handle hh;
};

struct peer {
    char *addr;
    void *push;
};

struct wk_data {
    void *zctx;
    void *pull;
    char addr[WK_DATA_ADDR_MAX];
    struct peer *peers;
    size_t n_peers;
    struct buffered *buf; /* uthash, in arrival order */
    size_t buf_bytes;
    uint64_t job_id;
    uint32_t attempt;
    bool oom;
    struct wk_data_stats stats;
    struct dx_ratelimit bad_log;
};

/* --- encoding ---------------------------------------------------------------- */

static uint8_t *put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        *p++ = (uint8_t)(v >> (8 * i));
    return p;
}

static uint8_t *put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        *p++ = (uint8_t)(v >> (8 * i));
    return p;
}

static const uint8_t *get_u32(const uint8_t *p, uint32_t *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++)
        *v |= (uint32_t)p[i] << (8 * i);
    return p + 4;
}

static const uint8_t *get_u64(const uint8_t *p, uint64_t *v)
{
    *v = 0;
    for (int i = 0; i < 8; i++)
        *v |= (uint64_t)p[i] << (8 * i);
    return p + 8;
}

static void encode_key(uint8_t *p, const struct wk_data_key *k)
{
    p = put_u64(p, k->job_id);
    p = put_u32(p, k->attempt);
    p = put_u64(p, k->step);
    p = put_u32(p, (uint32_t)k->payload);
    p = put_u32(p, (uint32_t)k->path);
    p = put_u32(p, (uint32_t)k->mb);
    put_u32(p, (uint32_t)k->stage);
}

static void decode_key(const uint8_t *p, struct wk_data_key *k)
{
    uint32_t v;

    p = get_u64(p, &k->job_id);
    p = get_u32(p, &k->attempt);
    p = get_u64(p, &k->step);
    p = get_u32(p, &v);
    k->payload = (int32_t)v;
    p = get_u32(p, &v);
    k->path = (int32_t)v;
    p = get_u32(p, &v);
    k->mb = (int32_t)v;
    get_u32(p, &v);
    k->stage = (int32_t)v;
}

void wk_data_key_name(const struct wk_data_key *k, char *buf, size_t len)
{
    const char *what = k->payload == DP_ACTIVATION ? "activation"
                       : k->payload == DP_GRADIENT ? "gradient"
                                                   : "message";

    if (k->path == 0 || k->path == 1)
        snprintf(buf, len, "%s %c%d stage %d of step %llu (job %llu, attempt %u)", what,
                 k->path == 0 ? 'd' : 'u', k->mb, k->stage, (unsigned long long)k->step,
                 (unsigned long long)k->job_id, k->attempt);
    else
        snprintf(buf, len, "%s path %d mb %d stage %d of step %llu (job %llu, attempt %u)", what,
                 k->path, k->mb, k->stage, (unsigned long long)k->step,
                 (unsigned long long)k->job_id, k->attempt);
}

/* --- create / destroy ------------------------------------------------------- */

static int socket_setup(void *sock)
{
    int linger = WK_DATA_LINGER_MS, hwm = DATA_HWM;
    int64_t maxsize = (int64_t)HEADER_BYTES + WK_DATA_MAX_PAYLOAD;

    if (zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxsize, sizeof(maxsize)) < 0 ||
        zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof(hwm)) < 0 ||
        zmq_setsockopt(sock, ZMQ_RCVHWM, &hwm, sizeof(hwm)) < 0)
        return -errno;
    return 0;
}

static bool wildcard_host(const char *h, size_t n)
{
    static const char *const any[] = {"0.0.0.0", "*", "[::]", "::", "[::0]"};

    for (size_t i = 0; i < sizeof(any) / sizeof(any[0]); i++)
        if (strlen(any[i]) == n && strncmp(h, any[i], n) == 0)
            return true;
    return false;
}

/* The address to advertise for the bound endpoint `bound`. */
static int advertise(wk_data_t *d, const char *bound, const char *host, char *err, size_t errlen)
{
    static const char tcp[] = "tcp://";
    const char *h, *colon;
    int n;

    if (strncmp(bound, tcp, sizeof(tcp) - 1) != 0 || !(colon = strrchr(bound, ':')) ||
        colon < bound + sizeof(tcp) - 1) {
        n = snprintf(d->addr, sizeof(d->addr), "%s", bound); /* ipc://, inproc:// */
    } else {
        h = bound + sizeof(tcp) - 1;
        if (!wildcard_host(h, (size_t)(colon - h)))
            n = snprintf(d->addr, sizeof(d->addr), "%s", bound);
        else if (strchr(host, ':'))
            n = snprintf(d->addr, sizeof(d->addr), "%s[%s]%s", tcp, host, colon);
        else
            n = snprintf(d->addr, sizeof(d->addr), "%s%s%s", tcp, host, colon);
    }
    if (n < 0 || (size_t)n >= sizeof(d->addr)) {
        snprintf(err, errlen, "the data-plane address for %s is too long", bound);
        return -ENAMETOOLONG;
    }
    return 0;
}

int wk_data_create(void *zctx, const char *listen, const char *advertise_host, wk_data_t **out,
                   char *err, size_t errlen)
{
    char bound[WK_DATA_ADDR_MAX];
    size_t len = sizeof(bound);
    wk_data_t *d;
    int rc;

    d = calloc(1, sizeof(*d));
    if (!d) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    d->zctx = zctx;
    d->bad_log = (struct dx_ratelimit)DX_RATELIMIT_INIT(BAD_LOG_WINDOW_MS, BAD_LOG_BURST);
    d->pull = zmq_socket(zctx, ZMQ_PULL);
    rc = d->pull ? socket_setup(d->pull) : -errno;
    if (rc < 0) {
        snprintf(err, errlen, "cannot create the data-plane socket: %s", zmq_strerror(-rc));
        goto fail;
    }
    if (zmq_bind(d->pull, listen) < 0) {
        rc = -errno;
        snprintf(err, errlen, "cannot bind the data plane on %s: %s", listen, zmq_strerror(-rc));
        goto fail;
    }
    if (zmq_getsockopt(d->pull, ZMQ_LAST_ENDPOINT, bound, &len) < 0) {
        rc = -errno;
        snprintf(err, errlen, "cannot read the data-plane endpoint: %s", zmq_strerror(-rc));
        goto fail;
    }
    if ((rc = advertise(d, bound, advertise_host, err, errlen)) < 0)
        goto fail;
    *out = d;
    return 0;
fail:
    wk_data_destroy(d);
    return rc;
}

static void close_peers(wk_data_t *d)
{
    for (size_t i = 0; i < d->n_peers; i++) {
        zmq_close(d->peers[i].push); /* lingers up to WK_DATA_LINGER_MS to deliver */
        free(d->peers[i].addr);
    }
    free(d->peers);
    d->peers = NULL;
    d->n_peers = 0;
}

static void unbuffer(wk_data_t *d, struct buffered *b)
{
    HASH_DEL(d->buf, b);
    d->buf_bytes -= b->msg->len;
    wk_data_msg_free(b->msg);
    free(b);
}

void wk_data_destroy(wk_data_t *d)
{
    struct buffered *b = NULL, *tmp = NULL;

    if (!d)
        return;
    HASH_ITER (hh, d->buf, b, tmp) {
        unbuffer(d, b);
    }
    close_peers(d);
    if (d->pull)
        zmq_close(d->pull);
    free(d);
}

const char *wk_data_addr(const wk_data_t *d)
{
    return d->addr;
}

void wk_data_msg_free(struct wk_data_msg *m)
{
    free(m);
}

void wk_data_stats(const wk_data_t *d, struct wk_data_stats *out)
{
    *out = d->stats;
    out->buffered = HASH_COUNT(d->buf);
}

/* --- job attempts ------------------------------------------------------------ */

static bool same_key(const struct wk_data_key *a, const struct wk_data_key *b)
{
    return a->job_id == b->job_id && a->attempt == b->attempt && a->step == b->step &&
           a->payload == b->payload && a->path == b->path && a->mb == b->mb && a->stage == b->stage;
}

static bool older(const wk_data_t *d, const struct wk_data_key *k)
{
    return k->job_id < d->job_id || (k->job_id == d->job_id && k->attempt < d->attempt);
}

void wk_data_begin(wk_data_t *d, uint64_t job_id, uint32_t attempt)
{
    struct buffered *b = NULL, *tmp = NULL;

    if (job_id != d->job_id)
        close_peers(d); /* a new job has other peers */
    d->job_id = job_id;
    d->attempt = attempt;
    HASH_ITER (hh, d->buf, b, tmp) {
        if (older(d, &b->msg->key)) {
            unbuffer(d, b);
            d->stats.dropped++;
        }
    }
}

/* --- send -------------------------------------------------------------------- */

static void *peer_socket(wk_data_t *d, const char *addr, int *rc)
{
    struct peer *grown;
    void *push;

    for (size_t i = 0; i < d->n_peers; i++)
        if (strcmp(d->peers[i].addr, addr) == 0)
            return d->peers[i].push;
    grown = realloc(d->peers, (d->n_peers + 1) * sizeof(*d->peers));
    if (!grown) {
        *rc = -ENOMEM;
        return NULL;
    }
    d->peers = grown;
    push = zmq_socket(d->zctx, ZMQ_PUSH);
    if (!push || socket_setup(push) < 0 || zmq_connect(push, addr) < 0) {
        *rc = -errno;
        if (push)
            zmq_close(push);
        return NULL;
    }
    d->peers[d->n_peers].addr = strdup(addr);
    if (!d->peers[d->n_peers].addr) {
        zmq_close(push);
        *rc = -ENOMEM;
        return NULL;
    }
    d->peers[d->n_peers++].push = push;
    return push;
}

int wk_data_send(wk_data_t *d, const char *addr, const struct wk_data_key *key, const void *payload,
                 size_t len, int timeout_ms)
{
    zmq_msg_t frame;
    void *push;
    uint8_t *p;
    int rc = 0;

    if (len > WK_DATA_MAX_PAYLOAD)
        return -EMSGSIZE;
    if (!(push = peer_socket(d, addr, &rc)))
        return rc;
    if (zmq_msg_init_size(&frame, HEADER_BYTES + len) < 0)
        return -errno;
    p = zmq_msg_data(&frame);
    encode_key(put_u32(p, DATA_MAGIC), key);
    if (len)
        memcpy(p + HEADER_BYTES, payload, len);
    if (timeout_ms > 0) {
        zmq_pollitem_t item = {push, 0, ZMQ_POLLOUT, 0};
        if (zmq_poll(&item, 1, timeout_ms) < 0) {
            rc = -errno;
            goto out;
        }
    }
    if (zmq_msg_send(&frame, push, ZMQ_DONTWAIT) < 0) {
        rc = errno == EAGAIN ? -ETIMEDOUT : -errno;
        goto out;
    }
    d->stats.sent++;
    return 0; /* zmq_msg_send took the frame */
out:
    zmq_msg_close(&frame);
    return rc;
}

/* --- receive ----------------------------------------------------------------- */

static void bad_frame(wk_data_t *d, const char *why, size_t size)
{
    uint64_t suppressed = 0;

    d->stats.bad++;
    if (dx_ratelimit_allow(&d->bad_log, dx_mono_ms(), &suppressed))
        dx_warn("data plane: dropping a %zu-byte frame: %s%s", size, why,
                suppressed ? " (and more not logged)" : "");
}

/* Reads one frame off the socket without waiting. Returns 0 with *out set
 * (NULL when the frame was dropped), -EAGAIN or -errno. */
static int read_frame(wk_data_t *d, struct wk_data_msg **out)
{
    struct wk_data_msg *m;
    zmq_msg_t frame;
    const uint8_t *p;
    uint32_t magic;
    size_t size;
    int rc;

    *out = NULL;
    zmq_msg_init(&frame);
    if (zmq_msg_recv(&frame, d->pull, ZMQ_DONTWAIT) < 0) {
        rc = -errno;
        zmq_msg_close(&frame);
        return rc;
    }
    size = zmq_msg_size(&frame);
    p = zmq_msg_data(&frame);
    if (zmq_msg_more(&frame) || size < HEADER_BYTES || (get_u32(p, &magic), magic != DATA_MAGIC)) {
        /* PUSH peers send single frames; anything else is not ours (a multi-frame
         * message's later frames come as frames of their own and fail the magic) */
        bad_frame(d, "not a data-plane message", size);
        zmq_msg_close(&frame);
        return 0;
    }
    m = malloc(sizeof(*m) + (size - HEADER_BYTES));
    if (!m) {
        zmq_msg_close(&frame);
        return -ENOMEM;
    }
    decode_key(p + 4, &m->key);
    m->len = size - HEADER_BYTES;
    if (m->len)
        memcpy(m->data, p + HEADER_BYTES, m->len);
    zmq_msg_close(&frame);
    d->stats.received++;
    if (older(d, &m->key)) {
        d->stats.dropped++;
        wk_data_msg_free(m);
        return 0;
    }
    *out = m;
    return 0;
}

/* Keeps m for a later wk_data_recv. Returns 0, or -ENOBUFS / -ENOMEM (m is
 * freed then). A second message with the same key is dropped. */
static int buffer_msg(wk_data_t *d, struct wk_data_msg *m)
{
    struct buffered *b;
    uint8_t hkey[KEY_BYTES];

    encode_key(hkey, &m->key);
    HASH_FIND(hh, d->buf, hkey, KEY_BYTES, b);
    if (b) {
        bad_frame(d, "a second message with the same key", HEADER_BYTES + m->len);
        wk_data_msg_free(m);
        return 0;
    }
    if (HASH_COUNT(d->buf) >= WK_DATA_BUFFER_MAX || d->buf_bytes + m->len > WK_DATA_BUFFER_BYTES) {
        wk_data_msg_free(m);
        return -ENOBUFS;
    }
    b = calloc(1, sizeof(*b));
    if (!b) {
        wk_data_msg_free(m);
        return -ENOMEM;
    }
    memcpy(b->hkey, hkey, KEY_BYTES);
    b->msg = m;
    b->d = d;
    d->oom = false;
    HASH_ADD(hh, d->buf, hkey, KEY_BYTES, b);
    if (d->oom) {
        free(b);
        wk_data_msg_free(m);
        return -ENOMEM;
    }
    d->buf_bytes += m->len;
    return 0;
}

int wk_data_recv(wk_data_t *d, const struct wk_data_key *key, int timeout_ms,
                 struct wk_data_msg **out)
{
    uint8_t hkey[KEY_BYTES];
    struct buffered *b;
    int64_t deadline = dx_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    int rc;

    encode_key(hkey, key);
    HASH_FIND(hh, d->buf, hkey, KEY_BYTES, b);
    if (b) {
        *out = b->msg;
        HASH_DEL(d->buf, b);
        d->buf_bytes -= b->msg->len;
        free(b);
        return 0;
    }
    for (;;) {
        zmq_pollitem_t item = {d->pull, 0, ZMQ_POLLIN, 0};
        int64_t left;

        for (;;) { /* everything already there */
            struct wk_data_msg *m;

            if ((rc = read_frame(d, &m)) == -EAGAIN)
                break;
            if (rc < 0)
                return rc;
            if (!m)
                continue;
            if (same_key(&m->key, key)) {
                *out = m;
                return 0;
            }
            if ((rc = buffer_msg(d, m)) < 0)
                return rc;
        }
        left = deadline - dx_mono_ms();
        if (left <= 0)
            return -ETIMEDOUT;
        if (zmq_poll(&item, 1, (long)left) < 0 && errno != EINTR)
            return -errno;
    }
}
