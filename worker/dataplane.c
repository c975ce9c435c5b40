/* dataplane.c - tagged messages between workers over PULL/PUSH sockets
 * (see dataplane.h). Owns the PULL socket and the receiver thread that
 * reads it, the PUSH socket per peer address and the buffer of messages
 * that came before their turn. */
#include "worker/dataplane.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/ratelimit.h"
#include "pipeline/schedule.h"

/* Frame layout, little-endian: magic, the key, then the send time. */
#define DATA_MAGIC 0x32445844u /* "DXD2" */
#define KEY_BYTES (8 + 4 + 8 + 4 * 6)
#define HEADER_BYTES (4 + KEY_BYTES + 8)
/* No high-water mark: sends are eager in the schedule model (a send never
 * waits for its receiver), and a step's messages are bounded by its
 * schedule. */
#define DATA_HWM 0
/* Bad frames logged per window before they are only counted. */
#define BAD_LOG_WINDOW_MS 1000
#define BAD_LOG_BURST 5
#define NS_PER_S 1000000000LL
#define NS_PER_MS 1000000LL
/* How often the receiver thread looks at its stop flag when nothing comes. */
#define STOP_POLL_MS 500

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
    char addr[WK_DATA_ADDR_MAX]; /* fixed at create */

    /* the sending thread's */
    struct peer *peers;
    size_t n_peers;
    uint64_t peers_job; /* the job the peers were connected for */

    /* the receiver thread's (after create hands them over) */
    void *pull;
    void *ctl_thread; /* PAIR: a frame here stops the thread */
    struct dx_ratelimit bad_log;

    /* create's and destroy's */
    void *ctl; /* the other end of ctl_thread */
    pthread_t thread;
    bool running;
    atomic_bool stop;

    /* under lock */
    pthread_mutex_t lock;
    pthread_cond_t cond;  /* on CLOCK_MONOTONIC: the buffer grew or overflowed */
    struct buffered *buf; /* uthash, in arrival order */
    size_t buf_bytes;
    size_t max_msgs, max_bytes;
    uint64_t job_id;
    uint32_t attempt;
    bool overflow;         /* a message was dropped for want of room */
    uint64_t overflow_job; /* the newest job and attempt of those */
    uint32_t overflow_attempt;
    int thread_err; /* -errno the receiver thread stopped on, else 0 */
    bool oom;
    struct wk_data_stats stats;
};

static int64_t wall_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

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
    p = put_u32(p, (uint32_t)k->stage);
    p = put_u32(p, (uint32_t)k->layer);
    put_u32(p, (uint32_t)k->src);
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
    p = get_u32(p, &v);
    k->stage = (int32_t)v;
    p = get_u32(p, &v);
    k->layer = (int32_t)v;
    get_u32(p, &v);
    k->src = (int32_t)v;
}

static const char *payload_name(int32_t payload, bool *worker_level)
{
    static const char *const names[] = {
        [WK_DATA_EP_DISPATCH - WK_DATA_EP_DISPATCH] = "expert dispatch",
        [WK_DATA_EP_COMBINE - WK_DATA_EP_DISPATCH] = "expert combine",
        [WK_DATA_EP_GRAD - WK_DATA_EP_DISPATCH] = "expert output gradient",
        [WK_DATA_EP_DXG - WK_DATA_EP_DISPATCH] = "expert input gradient",
        [WK_DATA_SYNC_UP - WK_DATA_EP_DISPATCH] = "gradient sync up",
        [WK_DATA_SYNC_DOWN - WK_DATA_EP_DISPATCH] = "gradient sync down",
        [WK_DATA_LINK_RING - WK_DATA_EP_DISPATCH] = "IPC ring descriptor",
    };

    *worker_level = false;
    if (payload == DP_ACTIVATION)
        return "activation";
    if (payload == DP_GRADIENT)
        return "gradient";
    if (payload >= WK_DATA_EP_DISPATCH && payload <= WK_DATA_LINK_RING) {
        *worker_level = true;
        return names[payload - WK_DATA_EP_DISPATCH];
    }
    return "message";
}

void wk_data_key_name(const struct wk_data_key *k, char *buf, size_t len)
{
    bool worker_level;
    const char *what = payload_name(k->payload, &worker_level);
    char where[64] = "";

    if (worker_level)
        snprintf(where, sizeof(where), " layer %d from rank %d", k->layer, k->src);
    if (k->path == 0 || k->path == 1)
        snprintf(buf, len, "%s %c%d stage %d%s of step %llu (job %llu, attempt %u)", what,
                 k->path == 0 ? 'd' : 'u', k->mb, k->stage, where, (unsigned long long)k->step,
                 (unsigned long long)k->job_id, k->attempt);
    else
        snprintf(buf, len, "%s path %d mb %d stage %d%s of step %llu (job %llu, attempt %u)", what,
                 k->path, k->mb, k->stage, where, (unsigned long long)k->step,
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

static void *receiver(void *arg);

/* The PAIR sockets that stop the receiver thread. */
static int control_setup(wk_data_t *d, char *err, size_t errlen)
{
    char ep[64];
    int linger = 0, rc;

    snprintf(ep, sizeof(ep), "inproc://duplex-data-ctl-%p", (void *)d);
    d->ctl = zmq_socket(d->zctx, ZMQ_PAIR);
    if (!d->ctl || zmq_setsockopt(d->ctl, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_bind(d->ctl, ep) < 0)
        goto fail;
    d->ctl_thread = zmq_socket(d->zctx, ZMQ_PAIR);
    if (!d->ctl_thread || zmq_setsockopt(d->ctl_thread, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_connect(d->ctl_thread, ep) < 0)
        goto fail;
    return 0;
fail:
    rc = -errno;
    snprintf(err, errlen, "cannot create the data-plane control socket: %s", zmq_strerror(-rc));
    return rc;
}

static int sync_init(wk_data_t *d)
{
    pthread_condattr_t attr;
    int rc;

    if ((rc = pthread_condattr_init(&attr)) != 0)
        return -rc;
    if ((rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)) != 0)
        goto out;
    if ((rc = pthread_cond_init(&d->cond, &attr)) != 0)
        goto out;
    if ((rc = pthread_mutex_init(&d->lock, NULL)) != 0)
        pthread_cond_destroy(&d->cond);
out:
    pthread_condattr_destroy(&attr);
    return -rc;
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
    if ((rc = sync_init(d)) < 0) {
        snprintf(err, errlen, "cannot create the data-plane lock: %s", strerror(-rc));
        free(d);
        return rc;
    }
    d->zctx = zctx;
    d->max_msgs = WK_DATA_BUFFER_MAX;
    d->max_bytes = WK_DATA_BUFFER_BYTES;
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
    if ((rc = control_setup(d, err, errlen)) < 0)
        goto fail;
    /* the thread owns pull and ctl_thread from here (pthread_create orders it) */
    if ((rc = pthread_create(&d->thread, NULL, receiver, d)) != 0) {
        snprintf(err, errlen, "cannot start the data-plane receiver: %s", strerror(rc));
        rc = -rc;
        goto fail;
    }
    d->running = true;
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

/* Under the lock. */
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
    if (d->running) {
        /* the frame wakes the thread at once; the flag stops it within
         * STOP_POLL_MS should the frame not go */
        atomic_store(&d->stop, true);
        if (zmq_send(d->ctl, "", 0, ZMQ_DONTWAIT) < 0)
            dx_warn("data plane: cannot wake the receiver thread: %s", zmq_strerror(errno));
        pthread_join(d->thread, NULL);
    }
    HASH_ITER (hh, d->buf, b, tmp) {
        unbuffer(d, b);
    }
    close_peers(d);
    if (d->pull)
        zmq_close(d->pull);
    if (d->ctl_thread)
        zmq_close(d->ctl_thread);
    if (d->ctl)
        zmq_close(d->ctl);
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->lock);
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
    wk_data_t *dm = (wk_data_t *)d; /* the lock is not part of the value */

    pthread_mutex_lock(&dm->lock);
    *out = d->stats;
    out->buffered = HASH_COUNT(d->buf);
    pthread_mutex_unlock(&dm->lock);
}

void wk_data_set_limits(wk_data_t *d, size_t max_msgs, size_t max_bytes)
{
    pthread_mutex_lock(&d->lock);
    d->max_msgs = max_msgs;
    d->max_bytes = max_bytes;
    pthread_mutex_unlock(&d->lock);
}

/* --- job attempts ------------------------------------------------------------ */

static bool older_than(uint64_t job, uint32_t attempt, uint64_t cur_job, uint32_t cur_attempt)
{
    return job < cur_job || (job == cur_job && attempt < cur_attempt);
}

/* Under the lock. */
static bool older(const wk_data_t *d, const struct wk_data_key *k)
{
    return older_than(k->job_id, k->attempt, d->job_id, d->attempt);
}

void wk_data_begin(wk_data_t *d, uint64_t job_id, uint32_t attempt)
{
    struct buffered *b = NULL, *tmp = NULL;

    pthread_mutex_lock(&d->lock);
    d->job_id = job_id; /* the next send closes the peers of another job */
    d->attempt = attempt;
    HASH_ITER (hh, d->buf, b, tmp) {
        if (older(d, &b->msg->key)) {
            unbuffer(d, b);
            d->stats.dropped++;
        }
    }
    if (d->overflow && older_than(d->overflow_job, d->overflow_attempt, job_id, attempt))
        d->overflow = false;
    pthread_mutex_unlock(&d->lock);
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
    uint64_t job;
    void *push;
    uint8_t *p;
    int rc = 0;

    if (len > WK_DATA_MAX_PAYLOAD)
        return -EMSGSIZE;
    pthread_mutex_lock(&d->lock);
    job = d->job_id;
    pthread_mutex_unlock(&d->lock);
    if (job != d->peers_job) {
        close_peers(d); /* a new job has other peers */
        d->peers_job = job;
    }
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
    put_u64(p + 4 + KEY_BYTES, (uint64_t)wall_ns());
    if (zmq_msg_send(&frame, push, ZMQ_DONTWAIT) < 0) {
        rc = errno == EAGAIN ? -ETIMEDOUT : -errno;
        goto out;
    }
    pthread_mutex_lock(&d->lock);
    d->stats.sent++;
    pthread_mutex_unlock(&d->lock);
    return 0; /* zmq_msg_send took the frame */
out:
    zmq_msg_close(&frame);
    return rc;
}

/* --- the receiver thread ----------------------------------------------------- */

/* Counts a bad frame and logs it within the rate limit. Not under the lock. */
static void bad_frame(wk_data_t *d, const char *why, size_t size)
{
    uint64_t suppressed = 0;

    pthread_mutex_lock(&d->lock);
    d->stats.bad++;
    pthread_mutex_unlock(&d->lock);
    if (dx_ratelimit_allow(&d->bad_log, dx_mono_ms(), &suppressed))
        dx_warn("data plane: dropping a %zu-byte frame: %s%s", size, why,
                suppressed ? " (and more not logged)" : "");
}

/* Under the lock: notes that m (freed by the caller) found no room. */
static void overflowed(wk_data_t *d, const struct wk_data_key *k)
{
    if (!d->overflow || older_than(d->overflow_job, d->overflow_attempt, k->job_id, k->attempt)) {
        d->overflow_job = k->job_id;
        d->overflow_attempt = k->attempt;
    }
    d->overflow = true;
    d->stats.overflowed++;
}

/* Under the lock: keeps m for a later wk_data_recv, or frees it. Returns
 * true when m was a second message with the same key. */
static bool buffer_msg(wk_data_t *d, struct wk_data_msg *m)
{
    struct buffered *b;
    uint8_t hkey[KEY_BYTES];

    encode_key(hkey, &m->key);
    HASH_FIND(hh, d->buf, hkey, KEY_BYTES, b);
    if (b) {
        wk_data_msg_free(m);
        return true;
    }
    if (HASH_COUNT(d->buf) >= d->max_msgs || d->buf_bytes + m->len > d->max_bytes ||
        !(b = calloc(1, sizeof(*b)))) {
        overflowed(d, &m->key);
        wk_data_msg_free(m);
        return false;
    }
    memcpy(b->hkey, hkey, KEY_BYTES);
    b->msg = m;
    b->d = d;
    d->oom = false;
    HASH_ADD(hh, d->buf, hkey, KEY_BYTES, b);
    if (d->oom) {
        overflowed(d, &m->key);
        free(b);
        wk_data_msg_free(m);
        return false;
    }
    d->buf_bytes += m->len;
    return false;
}

/* Reads one frame off the PULL socket without waiting and files it.
 * Returns 0, -EAGAIN when there was none, or -errno. */
static int read_frame(wk_data_t *d)
{
    struct wk_data_msg *m;
    zmq_msg_t frame;
    const uint8_t *p;
    uint32_t magic;
    uint64_t sent;
    int64_t arrived;
    size_t size;
    bool dup;
    int rc;

    zmq_msg_init(&frame);
    if (zmq_msg_recv(&frame, d->pull, ZMQ_DONTWAIT) < 0) {
        rc = -errno;
        zmq_msg_close(&frame);
        return rc;
    }
    arrived = wall_ns();
    size = zmq_msg_size(&frame);
    p = zmq_msg_data(&frame);
    if (zmq_msg_more(&frame) || size < HEADER_BYTES || (get_u32(p, &magic), magic != DATA_MAGIC)) {
        /* PUSH peers send single frames; anything else is not ours (a multi-frame
         * message's later frames come as frames of their own and fail the magic;
         * so do the frames of an older version, "DXD1") */
        zmq_msg_close(&frame);
        bad_frame(d, "not a data-plane message", size);
        return 0;
    }
    m = malloc(sizeof(*m) + (size - HEADER_BYTES));
    if (m) {
        decode_key(p + 4, &m->key);
        get_u64(p + 4 + KEY_BYTES, &sent);
        m->sent_ns = (int64_t)sent;
        m->arrived_ns = arrived;
        m->len = size - HEADER_BYTES;
        if (m->len)
            memcpy(m->data, p + HEADER_BYTES, m->len);
    }
    zmq_msg_close(&frame);

    pthread_mutex_lock(&d->lock);
    if (!m) {
        /* the key is unknown: an overflow of the current attempt */
        overflowed(d, &(struct wk_data_key){.job_id = d->job_id, .attempt = d->attempt});
        dup = false;
    } else if (d->stats.received++, older(d, &m->key)) {
        d->stats.dropped++;
        wk_data_msg_free(m);
        dup = false;
    } else {
        dup = buffer_msg(d, m);
    }
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    if (dup)
        bad_frame(d, "a second message with the same key", size);
    return 0;
}

/* Records the error the thread stops on, for wk_data_recv to report. */
static void *receiver_failed(wk_data_t *d, int rc)
{
    dx_error("data plane: the receiver stopped: %s", zmq_strerror(-rc));
    pthread_mutex_lock(&d->lock);
    d->thread_err = rc;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

static void *receiver(void *arg)
{
    wk_data_t *d = arg;
    int rc;

    while (!atomic_load(&d->stop)) {
        zmq_pollitem_t items[2] = {{d->pull, 0, ZMQ_POLLIN, 0}, {d->ctl_thread, 0, ZMQ_POLLIN, 0}};

        if (zmq_poll(items, 2, STOP_POLL_MS) < 0) {
            if (errno == EINTR)
                continue;
            return errno == ETERM ? NULL : receiver_failed(d, -errno);
        }
        if (items[1].revents & ZMQ_POLLIN)
            return NULL; /* destroy: whatever is still queued is dropped */
        if (!(items[0].revents & ZMQ_POLLIN))
            continue;
        while ((rc = read_frame(d)) == 0)
            ;
        if (rc == -ETERM)
            return NULL;
        if (rc != -EAGAIN && rc != -EINTR)
            return receiver_failed(d, rc);
    }
    return NULL;
}

/* --- receive ----------------------------------------------------------------- */

int wk_data_recv(wk_data_t *d, const struct wk_data_key *key, int timeout_ms,
                 struct wk_data_msg **out)
{
    uint8_t hkey[KEY_BYTES];
    struct buffered *b;
    struct timespec deadline;
    int rc = 0;

    encode_key(hkey, key);
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (timeout_ms > 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * NS_PER_MS;
        if (deadline.tv_nsec >= NS_PER_S) {
            deadline.tv_sec++;
            deadline.tv_nsec -= NS_PER_S;
        }
    }
    pthread_mutex_lock(&d->lock);
    for (;;) {
        HASH_FIND(hh, d->buf, hkey, KEY_BYTES, b);
        if (b) {
            *out = b->msg;
            HASH_DEL(d->buf, b);
            d->buf_bytes -= b->msg->len;
            free(b);
            rc = 0;
            break;
        }
        if (d->overflow) {
            rc = -ENOBUFS;
            break;
        }
        if (d->thread_err) {
            rc = d->thread_err;
            break;
        }
        if (rc == ETIMEDOUT || timeout_ms <= 0) {
            rc = -ETIMEDOUT;
            break;
        }
        rc = pthread_cond_timedwait(&d->cond, &d->lock, &deadline);
        if (rc != 0 && rc != ETIMEDOUT) {
            rc = -rc;
            break;
        }
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}
