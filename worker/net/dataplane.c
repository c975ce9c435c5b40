/* dataplane.c - tagged messages between workers over PULL/PUSH sockets
 * (see dataplane.h). Owns the PULL socket and the receiver thread that
 * reads it, with the data plane's ZAP handler and the PULL socket's
 * monitor; the PUSH socket per peer address; the buffers of messages that
 * came before their turn (the attempt's, and between attempts the early
 * ones of a later attempt) with each peer's share of them; the attempt's
 * received keys (for duplicates); the CURVE keys and the peer list. */
#include "worker/net/dataplane.h"

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
_Static_assert(HEADER_BYTES == WK_NET_HEADER_BYTES, "WK_NET_HEADER_BYTES is the frame's header");
/* No high-water mark: sends are eager in the schedule model (a send never
 * waits for its receiver), and a step's messages are bounded by its
 * schedule. */
#define DATA_HWM 0
/* Refusals (bad frames, duplicates, ...) logged per window before they are
 * only counted. */
#define BAD_LOG_WINDOW_MS 1000
#define BAD_LOG_BURST 5
#define NS_PER_S 1000000000LL
#define NS_PER_MS 1000000LL
/* How often the receiver thread looks at its stop flag when nothing comes. */
#define STOP_POLL_MS 500
/* Frames read per wake-up before commands and ZAP requests get a turn. */
#define READ_BATCH 1024
/* A peer's name: its CURVE key, or its IP address. */
#define SRC_ID_MAX 64
/* Early frames of attempts that found no room, remembered for wk_net_begin. */
#define EARLY_LOST_MAX 8
/* Keys received, remembered to tell a duplicate: the latest so many. */
#define SEEN_MAX 8192
#define FAILURE_MAX 512
/* ZAP (RFC 27). */
#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define ZAP_FRAMES_MAX 12 /* routing id, delimiter, 7 fields, a credential: more is bad */
#define ZAP_FIELD_MAX 255 /* routing and request ids kept for a held request */
#define ZAP_BATCH 64
#define CURVE_KEY_BYTES 32
/* What CURVE adds to a frame on the wire, where libzmq checks
 * ZMQ_MAXMSGSIZE: "\x07MESSAGE", nonce, MAC and flags are 33 bytes. */
#define CURVE_OVERHEAD 64
#define NOT_PEER_TEXT "not a peer of the current attempt"
/* How long a call waits for the receiver thread to carry out a command. */
#define COMMAND_WAIT_MS 10000
#define MONITOR_EVENTS                                                                             \
    (ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |                               \
     ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)

/* Commands to the receiver thread (one byte, then a sequence number). */
enum { CMD_STOP = 'S', CMD_REVIEW = 'R' };

#define HASH_NONFATAL_OOM 1
#define uthash_nonfatal_oom(e) ((e)->d->oom = true)
#include <uthash.h>

/* A peer sending to us, with its share of the buffers. */
struct src {
    char id[SRC_ID_MAX]; /* CURVE key, IP address, or "" (in-process) */
    size_t msgs, bytes, early_msgs, early_bytes;
    struct wk_net *d;
    UT_hash_handle hh;
};

struct buffered {
    uint8_t hkey[KEY_BYTES]; /* the encoded key */
    struct wk_net_msg *msg;
    struct src *src;
    bool dup;                  /* early: a second frame with this key came too */
    char dup_from[SRC_ID_MAX]; /* from whom */
    struct wk_net *d;
    UT_hash_handle hh;
};

/* A key the attempt received (the latest SEEN_MAX). */
struct seen {
    uint8_t hkey[KEY_BYTES];
    struct wk_net *d;
    UT_hash_handle hh;
};

typedef char curve_key[WK_NET_KEY_LEN + 1];

struct peer_key {
    char *addr;
    curve_key key;
};

/* The sending side's socket to one peer. */
struct peer {
    char *addr;
    curve_key key; /* the server key it was made with ("" in clear) */
    void *push;
};

/* A ZAP request held while no peer list is set. */
struct held {
    uint8_t id[ZAP_FIELD_MAX], req[ZAP_FIELD_MAX];
    size_t id_len, req_len;
    curve_key key;
    int64_t since_ms;
};

/* Fields are grouped by the thread or lock that owns them, not packed. */
struct wk_net { // NOLINT(clang-analyzer-optin.performance.Padding)
    void *zctx;
    char addr[WK_NET_ADDR_MAX]; /* advertised; fixed at create */
    char mon_ep[64];

    /* the sending thread's */
    struct peer *peers;
    size_t n_peers;
    uint64_t peers_job; /* the job the peers were connected for */

    /* the receiver thread's (after create hands them over) */
    void *pull;
    void *ctl_thread; /* PAIR: commands; an empty frame stops the thread */
    void *mon;        /* PAIR: the PULL socket's monitor */
    void *zap;        /* ROUTER on ZAP_ENDPOINT, with a keypair */
    struct held held[WK_NET_ZAP_HELD_MAX];
    size_t n_held;
    struct dx_ratelimit bad_log;

    /* create's and destroy's, and the commands' (under ctl_lock) */
    void *ctl; /* the other end of ctl_thread */
    pthread_mutex_t ctl_lock;
    uint32_t cmd_seq;
    pthread_t thread;
    bool running;
    atomic_bool stop;

    /* under lock */
    pthread_mutex_t lock;
    pthread_cond_t cond;  /* on CLOCK_MONOTONIC: the buffer grew, or the attempt failed */
    struct buffered *buf; /* uthash: the attempt's messages, in arrival order */
    size_t buf_bytes;
    struct buffered *early; /* uthash: between attempts, of a later one */
    size_t early_bytes;
    struct src *srcs;  /* uthash by id: the peers with something buffered */
    struct seen *seen; /* uthash: keys the attempt received, oldest first */
    struct wk_net_limits lim;
    uint64_t job_id; /* the current attempt, or the last one when !active */
    uint32_t attempt;
    bool active;
    size_t max_payload; /* the attempt's largest message */
    bool curve;         /* fixed at create */
    curve_key pub, sec;
    curve_key *allow; /* sorted */
    size_t n_allow;
    struct peer_key *keys;
    size_t n_keys;
    bool overflow; /* the attempt lost a message for want of room */
    bool dup;      /* the attempt saw a duplicate */
    char failure[FAILURE_MAX];
    struct {
        uint64_t job;
        uint32_t attempt;
    } early_lost[EARLY_LOST_MAX];
    size_t n_early_lost;
    int thread_err;   /* -errno the receiver thread failed on, else 0 */
    bool thread_done; /* it stopped */
    bool oom;
    struct wk_net_stats stats;
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

static void encode_key(uint8_t *p, const struct wk_net_key *k)
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

static void decode_key(const uint8_t *p, struct wk_net_key *k)
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
        [WK_NET_EP_DISPATCH - WK_NET_EP_DISPATCH] = "expert dispatch",
        [WK_NET_EP_COMBINE - WK_NET_EP_DISPATCH] = "expert combine",
        [WK_NET_EP_GRAD - WK_NET_EP_DISPATCH] = "expert output gradient",
        [WK_NET_EP_DXG - WK_NET_EP_DISPATCH] = "expert input gradient",
        [WK_NET_SYNC_UP - WK_NET_EP_DISPATCH] = "gradient sync up",
        [WK_NET_SYNC_DOWN - WK_NET_EP_DISPATCH] = "gradient sync down",
        [WK_NET_LINK_RING - WK_NET_EP_DISPATCH] = "IPC ring descriptor",
    };

    *worker_level = false;
    if (payload == DP_ACTIVATION)
        return "activation";
    if (payload == DP_GRADIENT)
        return "gradient";
    if (payload >= WK_NET_EP_DISPATCH && payload <= WK_NET_LINK_RING) {
        *worker_level = true;
        return names[payload - WK_NET_EP_DISPATCH];
    }
    return "message";
}

void wk_net_key_name(const struct wk_net_key *k, char *buf, size_t len)
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

/* "peer 10.0.0.3" / "peer <key>" / "an in-process peer", for messages. */
static const char *src_name(const char *id, char *buf, size_t len)
{
    if (id[0])
        snprintf(buf, len, "peer %s", id);
    else
        snprintf(buf, len, "an in-process peer");
    return buf;
}

/* --- keys -------------------------------------------------------------------- */

static bool key_valid(const char *z85)
{
    uint8_t bin[CURVE_KEY_BYTES];

    return z85 && strlen(z85) == WK_NET_KEY_LEN && zmq_z85_decode(bin, z85) != NULL;
}

static int key_cmp(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Under the lock. */
static bool allowed(const wk_net_t *d, const char *key)
{
    return d->n_allow && bsearch(key, d->allow, d->n_allow, sizeof(*d->allow), key_cmp) != NULL;
}

/* Under the lock: forgets the peers' keys (send side). */
static void forget_keys(wk_net_t *d)
{
    for (size_t i = 0; i < d->n_keys; i++)
        free(d->keys[i].addr);
    free(d->keys);
    d->keys = NULL;
    d->n_keys = 0;
}

/* --- the buffers (under the lock) ------------------------------------------------ */

static struct src *src_find(wk_net_t *d, const char *id)
{
    struct src *s = NULL;

    HASH_FIND_STR(d->srcs, id, s);
    return s;
}

static struct src *src_get(wk_net_t *d, const char *id)
{
    struct src *s = src_find(d, id);

    if (s)
        return s;
    if (!(s = calloc(1, sizeof(*s))))
        return NULL;
    snprintf(s->id, sizeof(s->id), "%s", id);
    s->d = d;
    d->oom = false;
    HASH_ADD_STR(d->srcs, id, s);
    if (d->oom) {
        free(s);
        return NULL;
    }
    return s;
}

/* Frees s once nothing of it is buffered. */
static void src_release(wk_net_t *d, struct src *s)
{
    if (s && !s->msgs && !s->bytes && !s->early_msgs && !s->early_bytes) {
        HASH_DEL(d->srcs, s);
        free(s);
    }
}

/* Takes b out of its buffer and its source's share; frees b, not its msg. */
static struct wk_net_msg *detach(wk_net_t *d, struct buffered *b, bool early)
{
    struct wk_net_msg *m = b->msg;

    if (early) {
        HASH_DEL(d->early, b);
        d->early_bytes -= m->len;
        b->src->early_msgs--;
        b->src->early_bytes -= m->len;
    } else {
        HASH_DEL(d->buf, b);
        d->buf_bytes -= m->len;
        b->src->msgs--;
        b->src->bytes -= m->len;
    }
    src_release(d, b->src);
    free(b);
    return m;
}

static void unbuffer(wk_net_t *d, struct buffered *b, bool early)
{
    wk_net_msg_free(detach(d, b, early));
}

/* Files m (of src id `from`) in the attempt's buffer or the early one.
 * Returns 0 (m is the buffer's now) or -ENOMEM. */
static int keep(wk_net_t *d, struct wk_net_msg *m, const uint8_t *hkey, const char *from,
                bool early)
{
    struct src *s = src_get(d, from);
    struct buffered *b;

    if (!s)
        return -ENOMEM;
    if (!(b = calloc(1, sizeof(*b)))) {
        src_release(d, s);
        return -ENOMEM;
    }
    memcpy(b->hkey, hkey, KEY_BYTES);
    b->msg = m;
    b->src = s;
    b->d = d;
    d->oom = false;
    if (early)
        HASH_ADD(hh, d->early, hkey, KEY_BYTES, b);
    else
        HASH_ADD(hh, d->buf, hkey, KEY_BYTES, b);
    if (d->oom) {
        free(b);
        src_release(d, s);
        return -ENOMEM;
    }
    if (early) {
        d->early_bytes += m->len;
        s->early_msgs++;
        s->early_bytes += m->len;
        d->stats.early++;
    } else {
        d->buf_bytes += m->len;
        s->msgs++;
        s->bytes += m->len;
    }
    return 0;
}

static void free_seen(wk_net_t *d)
{
    struct seen *s = NULL, *tmp = NULL;

    HASH_ITER (hh, d->seen, s, tmp) {
        HASH_DEL(d->seen, s);
        free(s);
    }
}

/* Notes that the attempt received the key hkey: a later frame with it is
 * a duplicate. Keeps the latest SEEN_MAX (a step's messages are far fewer).
 * Out of memory: not noted. */
static void note_seen(wk_net_t *d, const uint8_t *hkey)
{
    struct seen *s = d->seen;

    if (HASH_COUNT(d->seen) >= SEEN_MAX) { /* the oldest goes */
        HASH_DEL(d->seen, s);
        free(s);
    }
    if (!(s = calloc(1, sizeof(*s))))
        return;
    memcpy(s->hkey, hkey, KEY_BYTES);
    s->d = d;
    d->oom = false;
    HASH_ADD(hh, d->seen, hkey, KEY_BYTES, s);
    if (d->oom)
        free(s);
}

static bool was_seen(wk_net_t *d, const uint8_t *hkey)
{
    struct seen *s = NULL;

    HASH_FIND(hh, d->seen, hkey, KEY_BYTES, s);
    return s != NULL;
}

/* Frees the attempt's buffer and what it knows (not the early frames). */
static void clear_attempt(wk_net_t *d)
{
    struct buffered *b = NULL, *tmp = NULL;

    HASH_ITER (hh, d->buf, b, tmp) {
        unbuffer(d, b, false);
    }
    free_seen(d);
    d->overflow = d->dup = false;
    d->failure[0] = '\0';
}

static void clear_early(wk_net_t *d)
{
    struct buffered *b = NULL, *tmp = NULL;

    HASH_ITER (hh, d->early, b, tmp) {
        unbuffer(d, b, true);
        d->stats.dropped++;
    }
    d->n_early_lost = 0;
}

/* The attempt lost a message of key k from `from` for want of room. */
static void lost(wk_net_t *d, const struct wk_net_key *k, const char *from, bool peer_full)
{
    char name[256], who[SRC_ID_MAX + 16];

    if (!d->active) {
        /* an early frame: its attempt, when it starts, must know */
        for (size_t i = 0; i < d->n_early_lost; i++)
            if (d->early_lost[i].job == k->job_id && d->early_lost[i].attempt == k->attempt)
                return;
        if (d->n_early_lost == EARLY_LOST_MAX) /* the oldest goes */
            memmove(d->early_lost, d->early_lost + 1,
                    (EARLY_LOST_MAX - 1) * sizeof(d->early_lost[0]));
        else
            d->n_early_lost++;
        d->early_lost[d->n_early_lost - 1].job = k->job_id;
        d->early_lost[d->n_early_lost - 1].attempt = k->attempt;
        return;
    }
    if (!d->overflow && !d->dup) {
        wk_net_key_name(k, name, sizeof(name));
        snprintf(d->failure, sizeof(d->failure), "the %s from %s was dropped: %s", name,
                 src_name(from, who, sizeof(who)),
                 peer_full ? "that peer's share of the receive buffer was full"
                           : "the receive buffer was full");
    }
    d->overflow = true;
}

/* --- create / destroy ------------------------------------------------------- */

static int socket_setup(void *sock, int64_t maxsize)
{
    int linger = WK_NET_LINGER_MS, hwm = DATA_HWM;

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
static int advertise(wk_net_t *d, const char *bound, const char *host, char *err, size_t errlen)
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
        return dx_errf(err, errlen, -ENAMETOOLONG, "the data-plane address for %s is too long",
                       bound);
    }
    return 0;
}

static void *receiver(void *arg);

static atomic_ulong endpoint_seq;

/* The PAIR sockets that carry commands to the receiver thread, and the
 * one that reads the PULL socket's monitor. */
static int control_setup(wk_net_t *d, char *err, size_t errlen)
{
    char ep[64];
    int linger = 0, rc;

    /* a sequence number, not the address: a closed socket's inproc name
     * lingers in libzmq for a moment, and the next create may get the address */
    unsigned long seq = atomic_fetch_add(&endpoint_seq, 1);

    snprintf(ep, sizeof(ep), "inproc://duplex-data-ctl-%lu", seq);
    d->ctl = zmq_socket(d->zctx, ZMQ_PAIR);
    if (!d->ctl || zmq_setsockopt(d->ctl, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_bind(d->ctl, ep) < 0)
        goto fail;
    d->ctl_thread = zmq_socket(d->zctx, ZMQ_PAIR);
    if (!d->ctl_thread || zmq_setsockopt(d->ctl_thread, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_connect(d->ctl_thread, ep) < 0)
        goto fail;
    snprintf(d->mon_ep, sizeof(d->mon_ep), "inproc://duplex-data-mon-%lu", seq);
    if (zmq_socket_monitor(d->pull, d->mon_ep, MONITOR_EVENTS) < 0)
        goto fail;
    d->mon = zmq_socket(d->zctx, ZMQ_PAIR);
    if (!d->mon || zmq_setsockopt(d->mon, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_connect(d->mon, d->mon_ep) < 0)
        goto fail;
    return 0;
fail:
    rc = -errno;
    return dx_errf(err, errlen, rc, "cannot create the data-plane control sockets: %s",
                   zmq_strerror(-rc));
}

static int sync_init(wk_net_t *d)
{
    pthread_condattr_t attr;
    int rc;

    if ((rc = pthread_condattr_init(&attr)) != 0)
        return -rc;
    if ((rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)) != 0)
        goto out;
    if ((rc = pthread_cond_init(&d->cond, &attr)) != 0)
        goto out;
    if ((rc = pthread_mutex_init(&d->lock, NULL)) != 0) {
        pthread_cond_destroy(&d->cond);
        goto out;
    }
    if ((rc = pthread_mutex_init(&d->ctl_lock, NULL)) != 0) {
        pthread_mutex_destroy(&d->lock);
        pthread_cond_destroy(&d->cond);
    }
out:
    pthread_condattr_destroy(&attr);
    return -rc;
}

static const struct wk_net_limits default_limits = {
    .msgs = WK_NET_BUFFER_MAX,
    .bytes = WK_NET_BUFFER_BYTES,
    .peer_msgs = WK_NET_PEER_MAX,
    .peer_bytes = WK_NET_PEER_BYTES,
    .early_msgs = WK_NET_EARLY_MAX,
    .early_bytes = WK_NET_EARLY_BYTES,
    .early_peer_msgs = WK_NET_EARLY_PEER_MAX,
    .early_peer_bytes = WK_NET_EARLY_PEER_BYTES,
    .zap_hold_ms = WK_NET_ZAP_HOLD_MS,
};

/* A keypair's checks, before anything is made. */
static int keys_check(const struct wk_net_keypair *keys, char *err, size_t errlen)
{
    char derived[WK_NET_KEY_LEN + 1];

    if (!zmq_has("curve"))
        return dx_errf(err, errlen, -ENOTSUP, "this libzmq has no CURVE");
    if (!key_valid(keys->public_z85) || !key_valid(keys->secret_z85))
        return dx_errf(err, errlen, -EINVAL, "a CURVE key must be %d Z85 characters",
                       WK_NET_KEY_LEN);
    if (zmq_curve_public(derived, keys->secret_z85) < 0 || strcmp(derived, keys->public_z85) != 0)
        return dx_errf(err, errlen, -EINVAL, "the CURVE public key is not the secret key's");
    return 0;
}

/* The PULL socket's options, every one set before its only bind (a
 * listener takes them at bind). ZMQ_MAXMSGSIZE is the largest frame any
 * attempt may carry, never an attempt's own largest message: applying
 * that would take binding again, and between zmq_unbind and zmq_bind
 * another process can take the port (the data plane would receive
 * nothing more). A frame over the attempt's size that libzmq lets through
 * can only come from a listed (with CURVE, authenticated) peer, and the
 * receiver thread frees it at once (stats.oversize). */
static int pull_setup(wk_net_t *d)
{
    int64_t maxsize = (int64_t)HEADER_BYTES + (d->curve ? CURVE_OVERHEAD : 0) + WK_NET_MAX_PAYLOAD;
    int one = 1;
    int rc = socket_setup(d->pull, maxsize);

    if (rc < 0)
        return rc;
    if (zmq_setsockopt(d->pull, ZMQ_HANDSHAKE_IVL, &d->lim.zap_hold_ms,
                       sizeof(d->lim.zap_hold_ms)) < 0 ||
        (d->curve && (zmq_setsockopt(d->pull, ZMQ_CURVE_SERVER, &one, sizeof(one)) < 0 ||
                      zmq_setsockopt(d->pull, ZMQ_CURVE_SECRETKEY, d->sec, WK_NET_KEY_LEN) < 0 ||
                      zmq_setsockopt(d->pull, ZMQ_ZAP_DOMAIN, WK_NET_ZAP_DOMAIN,
                                     strlen(WK_NET_ZAP_DOMAIN)) < 0)))
        return -errno;
    return 0;
}

/* The ZAP handler (RFC 27), served by the receiver thread. */
static int zap_open(wk_net_t *d)
{
    int linger = 0, rc;

    if (!(d->zap = zmq_socket(d->zctx, ZMQ_ROUTER)))
        return -errno;
    if (zmq_setsockopt(d->zap, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_bind(d->zap, ZAP_ENDPOINT) < 0) {
        rc = -errno;
        zmq_close(d->zap);
        d->zap = NULL;
        return rc;
    }
    return 0;
}

int wk_net_create(void *zctx, const char *listen, const char *advertise_host,
                  const struct wk_net_keypair *keys, wk_net_t **out, char *err, size_t errlen)
{
    char bound[WK_NET_ADDR_MAX];
    size_t len = sizeof(bound);
    wk_net_t *d;
    int rc;

    if (keys && (rc = keys_check(keys, err, errlen)) < 0)
        return rc;
    d = calloc(1, sizeof(*d));
    if (!d)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    if ((rc = sync_init(d)) < 0) {
        free(d);
        return dx_errf(err, errlen, rc, "cannot create the data-plane lock: %s", strerror(-rc));
    }
    d->zctx = zctx;
    d->lim = default_limits;
    d->max_payload = WK_NET_MAX_PAYLOAD;
    if (keys) {
        d->curve = true;
        memcpy(d->pub, keys->public_z85, sizeof(d->pub));
        memcpy(d->sec, keys->secret_z85, sizeof(d->sec));
        if (keys->zap_hold_ms > 0)
            d->lim.zap_hold_ms = keys->zap_hold_ms;
    }
    d->bad_log = (struct dx_ratelimit)DX_RATELIMIT_INIT(BAD_LOG_WINDOW_MS, BAD_LOG_BURST);
    d->pull = zmq_socket(zctx, ZMQ_PULL);
    rc = d->pull ? pull_setup(d) : -errno;
    if (rc < 0) {
        dx_errf(err, errlen, rc, "cannot create the data-plane socket: %s", zmq_strerror(-rc));
        goto fail;
    }
    if ((rc = control_setup(d, err, errlen)) < 0)
        goto fail;
    /* the handler is there before the first connection asks it */
    if (d->curve && (rc = zap_open(d)) < 0) {
        dx_errf(err, errlen, rc, "cannot bind the data plane's ZAP handler on %s: %s%s",
                ZAP_ENDPOINT, zmq_strerror(-rc),
                rc == -EADDRINUSE ? " (another ZAP handler in this ZeroMQ context)" : "");
        goto fail;
    }
    /* the only bind: the endpoint stays ours until wk_net_destroy */
    if (zmq_bind(d->pull, listen) < 0) {
        rc = -errno;
        dx_errf(err, errlen, rc, "cannot bind the data plane on %s: %s", listen, zmq_strerror(-rc));
        goto fail;
    }
    d->stats.binds++;
    if (zmq_getsockopt(d->pull, ZMQ_LAST_ENDPOINT, bound, &len) < 0) {
        rc = -errno;
        dx_errf(err, errlen, rc, "cannot read the data-plane endpoint: %s", zmq_strerror(-rc));
        goto fail;
    }
    if ((rc = advertise(d, bound, advertise_host, err, errlen)) < 0)
        goto fail;
    if (d->curve)
        dx_info("data plane %s: CURVE server with key %s", d->addr, d->pub);
    /* the thread owns pull, ctl_thread, mon and zap from here (pthread_create orders it) */
    if ((rc = pthread_create(&d->thread, NULL, receiver, d)) != 0) {
        rc = dx_errf(err, errlen, -rc, "cannot start the data-plane receiver: %s", strerror(rc));
        goto fail;
    }
    d->running = true;
    *out = d;
    return 0;
fail:
    wk_net_destroy(d);
    return rc;
}

static void close_peers(wk_net_t *d)
{
    for (size_t i = 0; i < d->n_peers; i++) {
        zmq_close(d->peers[i].push); /* lingers up to WK_NET_LINGER_MS to deliver */
        free(d->peers[i].addr);
    }
    free(d->peers);
    d->peers = NULL;
    d->n_peers = 0;
}

/* Sends a command to the receiver thread and waits for its result. */
static int command(wk_net_t *d, char op)
{
    uint8_t cmd[5], reply[8];
    uint32_t seq, got;
    int32_t result;
    int rc = 0;

    pthread_mutex_lock(&d->lock);
    if (d->thread_done)
        rc = d->thread_err ? d->thread_err : -ESRCH;
    pthread_mutex_unlock(&d->lock);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&d->ctl_lock);
    seq = ++d->cmd_seq;
    cmd[0] = (uint8_t)op;
    put_u32(cmd + 1, seq);
    if (zmq_send(d->ctl, cmd, sizeof(cmd), 0) < 0) {
        rc = -errno;
        goto out;
    }
    for (int64_t until = dx_mono_ms() + COMMAND_WAIT_MS;;) {
        zmq_pollitem_t item = {d->ctl, 0, ZMQ_POLLIN, 0};
        int64_t left = until - dx_mono_ms();

        if (left <= 0) {
            rc = -ETIMEDOUT;
            break;
        }
        if (zmq_poll(&item, 1, (long)left) < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        if (!(item.revents & ZMQ_POLLIN))
            continue;
        if (zmq_recv(d->ctl, reply, sizeof(reply), 0) != (int)sizeof(reply))
            continue; /* not a reply */
        get_u32(reply, &got);
        if (got != seq)
            continue; /* a late reply to a command that timed out */
        get_u32(reply + 4, (uint32_t *)&result);
        rc = result;
        break;
    }
out:
    pthread_mutex_unlock(&d->ctl_lock);
    return rc;
}

void wk_net_destroy(wk_net_t *d)
{
    struct buffered *b = NULL, *tmp = NULL;
    struct src *s = NULL, *stmp = NULL;

    if (!d)
        return;
    if (d->running) {
        /* the frame wakes the thread at once; the flag stops it within
         * STOP_POLL_MS should the frame not go */
        atomic_store(&d->stop, true);
        pthread_mutex_lock(&d->ctl_lock);
        if (zmq_send(d->ctl, "", 0, ZMQ_DONTWAIT) < 0)
            dx_warn("data plane: cannot wake the receiver thread: %s", zmq_strerror(errno));
        pthread_mutex_unlock(&d->ctl_lock);
        pthread_join(d->thread, NULL);
    }
    HASH_ITER (hh, d->buf, b, tmp) {
        unbuffer(d, b, false);
    }
    HASH_ITER (hh, d->early, b, tmp) {
        unbuffer(d, b, true);
    }
    HASH_ITER (hh, d->srcs, s, stmp) { /* none left, unless out of memory mid-way */
        HASH_DEL(d->srcs, s);
        free(s);
    }
    free_seen(d);
    close_peers(d);
    forget_keys(d);
    free(d->allow);
    if (d->pull && d->mon_ep[0])
        zmq_socket_monitor(d->pull, NULL, 0);
    if (d->mon)
        zmq_close(d->mon);
    if (d->zap)
        zmq_close(d->zap);
    if (d->pull)
        zmq_close(d->pull);
    if (d->ctl_thread)
        zmq_close(d->ctl_thread);
    if (d->ctl)
        zmq_close(d->ctl);
    pthread_mutex_destroy(&d->ctl_lock);
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

const char *wk_net_addr(const wk_net_t *d)
{
    return d->addr;
}

void wk_net_msg_free(struct wk_net_msg *m)
{
    free(m);
}

void wk_net_stats(const wk_net_t *d, struct wk_net_stats *out)
{
    wk_net_t *dm = (wk_net_t *)d; /* the lock is not part of the value */

    pthread_mutex_lock(&dm->lock);
    *out = d->stats;
    out->buffered = HASH_COUNT(d->buf) + HASH_COUNT(d->early);
    out->buffered_bytes = d->buf_bytes + d->early_bytes;
    pthread_mutex_unlock(&dm->lock);
}

void wk_net_get_limits(const wk_net_t *d, struct wk_net_limits *out)
{
    wk_net_t *dm = (wk_net_t *)d;

    pthread_mutex_lock(&dm->lock);
    *out = d->lim;
    pthread_mutex_unlock(&dm->lock);
}

void wk_net_set_limits(wk_net_t *d, const struct wk_net_limits *l)
{
    int hold;

    pthread_mutex_lock(&d->lock);
    hold = d->lim.zap_hold_ms; /* the listener's, fixed at its bind */
    d->lim = *l;
    d->lim.zap_hold_ms = hold;
    pthread_mutex_unlock(&d->lock);
}

void wk_net_failure(wk_net_t *d, char *buf, size_t len)
{
    pthread_mutex_lock(&d->lock);
    snprintf(buf, len, "%s", d->failure);
    pthread_mutex_unlock(&d->lock);
}

/* --- keys and limits ------------------------------------------------------------ */

bool wk_net_curve(const wk_net_t *d)
{
    wk_net_t *dm = (wk_net_t *)d;
    bool on;

    pthread_mutex_lock(&dm->lock);
    on = d->curve;
    pthread_mutex_unlock(&dm->lock);
    return on;
}

int wk_net_allow_peers(wk_net_t *d, const char *const *public_z85, size_t n)
{
    curve_key *list = NULL, *old;
    size_t kept = 0;
    bool curve;

    for (size_t i = 0; i < n; i++)
        if (!key_valid(public_z85[i]))
            return -EINVAL;
    if (n && !(list = calloc(n, sizeof(*list))))
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        memcpy(list[i], public_z85[i], sizeof(list[i]));
    if (n)
        qsort(list, n, sizeof(*list), key_cmp);
    for (size_t i = 0; i < n; i++) /* without repeats */
        if (kept == 0 || strcmp(list[kept - 1], list[i]) != 0)
            memmove(list[kept++], list[i], sizeof(list[i]));
    pthread_mutex_lock(&d->lock);
    old = d->allow;
    d->allow = list;
    d->n_allow = kept;
    curve = d->curve;
    pthread_mutex_unlock(&d->lock);
    free(old);
    /* the held connections are admitted or refused now */
    return curve ? command(d, CMD_REVIEW) : 0;
}

int wk_net_set_peer_key(wk_net_t *d, const char *addr, const char *public_z85)
{
    struct peer_key *grown;
    int rc = 0;

    if (!key_valid(public_z85) || strlen(addr) >= WK_NET_ADDR_MAX)
        return -EINVAL;
    pthread_mutex_lock(&d->lock);
    for (size_t i = 0; i < d->n_keys; i++)
        if (strcmp(d->keys[i].addr, addr) == 0) {
            memcpy(d->keys[i].key, public_z85, sizeof(d->keys[i].key));
            goto out;
        }
    if (!(grown = realloc(d->keys, (d->n_keys + 1) * sizeof(*d->keys)))) {
        rc = -ENOMEM;
        goto out;
    }
    d->keys = grown;
    if (!(d->keys[d->n_keys].addr = strdup(addr))) {
        rc = -ENOMEM;
        goto out;
    }
    memcpy(d->keys[d->n_keys++].key, public_z85, sizeof(d->keys[0].key));
out:
    pthread_mutex_unlock(&d->lock);
    return rc;
}

int wk_net_set_max_msg(wk_net_t *d, size_t bytes)
{
    if (bytes > WK_NET_MAX_PAYLOAD)
        bytes = WK_NET_MAX_PAYLOAD;
    /* Only the receiver thread's check after receipt: the listener keeps
     * the ZMQ_MAXMSGSIZE it was bound with (see pull_setup), as binding it
     * again to lower it could lose the port to another process. */
    pthread_mutex_lock(&d->lock);
    d->max_payload = bytes;
    pthread_mutex_unlock(&d->lock);
    return 0;
}

/* --- job attempts ------------------------------------------------------------ */

/* True when (job, attempt) is later than (cur_job, cur_attempt). */
static bool later_than(uint64_t job, uint32_t attempt, uint64_t cur_job, uint32_t cur_attempt)
{
    return job > cur_job || (job == cur_job && attempt > cur_attempt);
}

/* Under the lock, at wk_net_begin: one early frame of the new attempt. */
static void promote(wk_net_t *d, struct buffered *b)
{
    struct src *s = b->src;
    struct wk_net_msg *m = b->msg;
    char name[256], who[SRC_ID_MAX + 16], first[SRC_ID_MAX + 16];
    uint8_t hkey[KEY_BYTES];
    char from[SRC_ID_MAX];
    bool dup = b->dup;

    memcpy(hkey, b->hkey, KEY_BYTES);
    snprintf(from, sizeof(from), "%s", s->id);
    if (dup && !d->dup) {
        wk_net_key_name(&m->key, name, sizeof(name));
        snprintf(d->failure, sizeof(d->failure), "a second %s came from %s (the first from %s)",
                 name, src_name(b->dup_from, who, sizeof(who)),
                 src_name(from, first, sizeof(first)));
        d->dup = true;
    }
    if (m->len > d->max_payload || (d->curve && !allowed(d, from))) {
        if (m->len > d->max_payload)
            d->stats.oversize++;
        else
            d->stats.unallowed++;
        unbuffer(d, b, true);
        return;
    }
    m = detach(d, b, true);
    s = src_find(d, from);
    if (HASH_COUNT(d->buf) >= d->lim.msgs || d->buf_bytes + m->len > d->lim.bytes ||
        (s && (s->msgs >= d->lim.peer_msgs || s->bytes + m->len > d->lim.peer_bytes)) ||
        keep(d, m, hkey, from, false) < 0) {
        d->stats.overflowed++;
        lost(d, &m->key, from, false);
        wk_net_msg_free(m);
    }
}

void wk_net_begin(wk_net_t *d, uint64_t job_id, uint32_t attempt)
{
    struct buffered *b = NULL, *tmp = NULL;

    pthread_mutex_lock(&d->lock);
    clear_attempt(d);
    d->job_id = job_id; /* the next send closes the peers of another job */
    d->attempt = attempt;
    d->active = true;
    HASH_ITER (hh, d->early, b, tmp) {
        if (b->msg->key.job_id == job_id && b->msg->key.attempt == attempt) {
            promote(d, b);
        } else {
            unbuffer(d, b, true);
            d->stats.dropped++;
        }
    }
    for (size_t i = 0; i < d->n_early_lost; i++)
        if (d->early_lost[i].job == job_id && d->early_lost[i].attempt == attempt && !d->overflow) {
            snprintf(d->failure, sizeof(d->failure),
                     "a message of job %llu attempt %u that came before the attempt started "
                     "found no room and was dropped",
                     (unsigned long long)job_id, attempt);
            d->overflow = true;
        }
    d->n_early_lost = 0;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
}

void wk_net_end(wk_net_t *d)
{
    pthread_mutex_lock(&d->lock);
    clear_attempt(d);
    clear_early(d);
    d->active = false; /* job_id and attempt stay: frames up to them are old */
    free(d->allow);
    d->allow = NULL;
    d->n_allow = 0;
    forget_keys(d);
    d->max_payload = WK_NET_MAX_PAYLOAD;
    /* The connections to the PULL socket stay open (closing them would
     * take binding it again, and the port could be lost): a frame that
     * comes on one is checked against the list current when it arrives,
     * or kept early and checked when wk_net_begin takes it. */
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    close_peers(d);
    d->peers_job = 0;
}

/* --- send -------------------------------------------------------------------- */

/* The PUSH socket to addr, made (with CURVE: a client of key) on first use. */
static void *peer_socket(wk_net_t *d, const char *addr, const char *pub, const char *sec,
                         const char *key, int *rc)
{
    struct peer *grown;
    void *push;

    for (size_t i = 0; i < d->n_peers; i++) {
        if (strcmp(d->peers[i].addr, addr) != 0)
            continue;
        if (strcmp(d->peers[i].key, key) == 0)
            return d->peers[i].push;
        /* another key at that address: another worker */
        zmq_close(d->peers[i].push);
        free(d->peers[i].addr);
        d->peers[i] = d->peers[--d->n_peers];
        break;
    }
    if (pub[0] && !key[0]) {
        *rc = -ENOKEY;
        return NULL;
    }
    grown = realloc(d->peers, (d->n_peers + 1) * sizeof(*d->peers));
    if (!grown) {
        *rc = -ENOMEM;
        return NULL;
    }
    d->peers = grown;
    push = zmq_socket(d->zctx, ZMQ_PUSH);
    if (!push || socket_setup(push, (int64_t)HEADER_BYTES + WK_NET_MAX_PAYLOAD) < 0 ||
        (pub[0] && (zmq_setsockopt(push, ZMQ_CURVE_SERVERKEY, key, WK_NET_KEY_LEN) < 0 ||
                    zmq_setsockopt(push, ZMQ_CURVE_PUBLICKEY, pub, WK_NET_KEY_LEN) < 0 ||
                    zmq_setsockopt(push, ZMQ_CURVE_SECRETKEY, sec, WK_NET_KEY_LEN) < 0)) ||
        zmq_connect(push, addr) < 0) {
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
    snprintf(d->peers[d->n_peers].key, sizeof(d->peers[0].key), "%s", key);
    d->peers[d->n_peers++].push = push;
    return push;
}

int wk_net_send(wk_net_t *d, const char *addr, const struct wk_net_key *key, const void *payload,
                size_t len, int timeout_ms)
{
    curve_key pub = "", sec = "", peer_key = "";
    zmq_msg_t frame;
    uint64_t job;
    void *push;
    uint8_t *p;
    int rc = 0;

    if (len > WK_NET_MAX_PAYLOAD)
        return -EMSGSIZE;
    pthread_mutex_lock(&d->lock);
    job = d->job_id;
    if (d->curve) {
        memcpy(pub, d->pub, sizeof(pub));
        memcpy(sec, d->sec, sizeof(sec));
        for (size_t i = 0; i < d->n_keys; i++)
            if (strcmp(d->keys[i].addr, addr) == 0)
                memcpy(peer_key, d->keys[i].key, sizeof(peer_key));
    }
    pthread_mutex_unlock(&d->lock);
    if (job != d->peers_job) {
        close_peers(d); /* a new job has other peers: new keys, new handshakes */
        d->peers_job = job;
    }
    if (!(push = peer_socket(d, addr, pub, sec, peer_key, &rc)))
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

/* --- the receiver thread: frames ------------------------------------------------ */

/* Logs a refusal within the rate limit. Not under the lock. */
static void refusal_log(wk_net_t *d, const char *text)
{
    uint64_t suppressed = 0;

    if (dx_ratelimit_allow(&d->bad_log, dx_mono_ms(), &suppressed))
        dx_warn("data plane: %s%s", text, suppressed ? " (and more not logged)" : "");
}

/* Counts a bad frame and logs it within the rate limit. Not under the lock. */
static void bad_frame(wk_net_t *d, const char *why, size_t size)
{
    char text[256];

    pthread_mutex_lock(&d->lock);
    d->stats.bad++;
    pthread_mutex_unlock(&d->lock);
    snprintf(text, sizeof(text), "dropping a %zu-byte frame: %s", size, why);
    refusal_log(d, text);
}

enum verdict {
    KEEP,       /* the current attempt's */
    KEEP_EARLY, /* between attempts, of a later one */
    STALE,      /* of another attempt */
    OVERSIZE,   /* over the largest message */
    UNALLOWED,  /* its connection's key is not listed */
    DUPLICATE,  /* its key came before */
    PEER_FULL,  /* its peer's share is full */
    FULL,       /* the buffer is full (or no memory) */
};

/* Under the lock: what to do with a frame of key k (hkey encoded), len
 * payload bytes, from the peer `from` (keyed: a CURVE connection's key). */
static enum verdict classify(wk_net_t *d, const struct wk_net_key *k, const uint8_t *hkey,
                             size_t len, const char *from, bool keyed)
{
    struct buffered *b = NULL;
    struct src *s;

    /* Connections stay open across attempts, so the key is checked for
     * every frame against the list current now. Between attempts with no
     * list set (after wk_net_end), a peer that began first may send on its
     * open connection: its frames are kept early, and promote() checks
     * them against the list wk_net_begin finds. */
    if (d->curve && (!keyed || ((d->active || d->n_allow) && !allowed(d, from))))
        return UNALLOWED;
    s = src_find(d, from);
    if (d->active) {
        if (k->job_id != d->job_id || k->attempt != d->attempt)
            return STALE;
        if (len > d->max_payload)
            return OVERSIZE;
        HASH_FIND(hh, d->buf, hkey, KEY_BYTES, b);
        if (b || was_seen(d, hkey))
            return DUPLICATE;
        if (s && (s->msgs >= d->lim.peer_msgs || s->bytes + len > d->lim.peer_bytes))
            return PEER_FULL;
        if (!s && len > d->lim.peer_bytes)
            return PEER_FULL;
        if (HASH_COUNT(d->buf) >= d->lim.msgs || d->buf_bytes + len > d->lim.bytes)
            return FULL;
        return KEEP;
    }
    if (!later_than(k->job_id, k->attempt, d->job_id, d->attempt))
        return STALE;
    if (len > d->max_payload)
        return OVERSIZE;
    HASH_FIND(hh, d->early, hkey, KEY_BYTES, b);
    if (b)
        return DUPLICATE;
    if (s &&
        (s->early_msgs >= d->lim.early_peer_msgs || s->early_bytes + len > d->lim.early_peer_bytes))
        return PEER_FULL;
    if (!s && len > d->lim.early_peer_bytes)
        return PEER_FULL;
    if (HASH_COUNT(d->early) >= d->lim.early_msgs || d->early_bytes + len > d->lim.early_bytes)
        return FULL;
    return KEEP_EARLY;
}

/* Under the lock: counts a refused frame and notes what it means for the
 * attempt; log gets a line to log (outside the lock), loud when the
 * attempt fails on it. */
static void refuse(wk_net_t *d, enum verdict v, const struct wk_net_key *k, const uint8_t *hkey,
                   size_t len, const char *from, char *log, size_t loglen, bool *loud)
{
    char name[256], who[SRC_ID_MAX + 16], first[SRC_ID_MAX + 16];
    struct buffered *b = NULL;

    *loud = false;
    switch (v) {
    case STALE:
        d->stats.dropped++;
        return;
    case OVERSIZE:
        d->stats.oversize++;
        wk_net_key_name(k, name, sizeof(name));
        snprintf(log, loglen, "refusing a %zu-byte %s from %s: over the %zu bytes expected", len,
                 name, src_name(from, who, sizeof(who)), d->max_payload);
        return;
    case UNALLOWED:
        d->stats.unallowed++;
        wk_net_key_name(k, name, sizeof(name));
        snprintf(log, loglen, "refusing a %s from %s: not a peer of the current attempt", name,
                 src_name(from, who, sizeof(who)));
        return;
    case DUPLICATE:
        d->stats.duplicates++;
        wk_net_key_name(k, name, sizeof(name));
        src_name(from, who, sizeof(who));
        if (!d->active) {
            HASH_FIND(hh, d->early, hkey, KEY_BYTES, b);
            if (b && !b->dup) {
                b->dup = true;
                snprintf(b->dup_from, sizeof(b->dup_from), "%s", from);
            }
            snprintf(log, loglen, "a second %s came from %s before its attempt started", name, who);
            return;
        }
        HASH_FIND(hh, d->buf, hkey, KEY_BYTES, b);
        if (b)
            snprintf(log, loglen, "a second %s came from %s (the first from %s)", name, who,
                     src_name(b->src->id, first, sizeof(first)));
        else
            snprintf(log, loglen, "a second %s came from %s after this rank received the first",
                     name, who);
        if (!d->dup) {
            snprintf(d->failure, sizeof(d->failure), "%s", log);
            d->dup = true;
            *loud = true;
        }
        return;
    case PEER_FULL:
        d->stats.peer_overflowed++;
        lost(d, k, from, true);
        wk_net_key_name(k, name, sizeof(name));
        snprintf(log, loglen, "dropping a %s from %s: that peer's share of the buffer is full",
                 name, src_name(from, who, sizeof(who)));
        return;
    case FULL:
        d->stats.overflowed++;
        lost(d, k, from, false);
        wk_net_key_name(k, name, sizeof(name));
        snprintf(log, loglen, "dropping a %s from %s: the receive buffer is full", name,
                 src_name(from, who, sizeof(who)));
        return;
    case KEEP:
    case KEEP_EARLY:
        return;
    }
}

/* Reads one frame off the PULL socket without waiting and files it.
 * Returns 0, -EAGAIN when there was none, or -errno. */
static int read_frame(wk_net_t *d)
{
    struct wk_net_msg *m = NULL;
    struct wk_net_key k;
    uint8_t hkey[KEY_BYTES];
    char from[SRC_ID_MAX], log[FAILURE_MAX] = "";
    const char *uid, *peer;
    zmq_msg_t frame;
    const uint8_t *p;
    enum verdict v;
    uint32_t magic;
    uint64_t sent;
    int64_t arrived;
    size_t size, len;
    bool loud = false;
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
    /* who sent it: the key our ZAP handler admitted, else the address */
    uid = zmq_msg_gets(&frame, "User-Id");
    peer = zmq_msg_gets(&frame, "Peer-Address");
    snprintf(from, sizeof(from), "%s", uid ? uid : peer ? peer : "");
    decode_key(p + 4, &k);
    encode_key(hkey, &k);
    len = size - HEADER_BYTES;

    pthread_mutex_lock(&d->lock);
    v = classify(d, &k, hkey, len, from, uid != NULL);
    if (v != KEEP && v != KEEP_EARLY) {
        d->stats.received++;
        refuse(d, v, &k, hkey, len, from, log, sizeof(log), &loud);
    }
    pthread_mutex_unlock(&d->lock);
    if (v == KEEP || v == KEEP_EARLY) {
        /* copied outside the lock; filed after checking again (an attempt
         * may have begun or ended meanwhile) */
        if ((m = malloc(sizeof(*m) + len))) {
            m->key = k;
            get_u64(p + 4 + KEY_BYTES, &sent);
            m->sent_ns = (int64_t)sent;
            m->arrived_ns = arrived;
            m->len = len;
            if (len)
                memcpy(m->data, p + HEADER_BYTES, len);
        }
        pthread_mutex_lock(&d->lock);
        d->stats.received++;
        v = m ? classify(d, &k, hkey, len, from, uid != NULL) : FULL;
        if ((v == KEEP || v == KEEP_EARLY) && keep(d, m, hkey, from, v == KEEP_EARLY) == 0)
            m = NULL;
        else
            refuse(d, v == KEEP || v == KEEP_EARLY ? FULL : v, &k, hkey, len, from, log,
                   sizeof(log), &loud);
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->lock);
        wk_net_msg_free(m);
    } else if (loud) {
        pthread_mutex_lock(&d->lock);
        pthread_cond_broadcast(&d->cond); /* a waiting wk_net_recv fails now */
        pthread_mutex_unlock(&d->lock);
    }
    zmq_msg_close(&frame);
    if (loud)
        dx_error("data plane: %s: the attempt fails", log);
    else if (log[0])
        refusal_log(d, log);
    return 0;
}

/* Reads the PULL socket's monitor: connections that closed or failed
 * their handshake. */
static void read_monitor(wk_net_t *d)
{
    for (int i = 0; i < READ_BATCH; i++) {
        zmq_msg_t ev;
        uint16_t event = 0;
        int more;

        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, d->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        if (zmq_msg_size(&ev) >= sizeof(event))
            memcpy(&event, zmq_msg_data(&ev), sizeof(event)); /* host order */
        more = zmq_msg_more(&ev);
        while (more) { /* the endpoint */
            zmq_msg_close(&ev);
            zmq_msg_init(&ev);
            if (zmq_msg_recv(&ev, d->mon, 0) < 0)
                break;
            more = zmq_msg_more(&ev);
        }
        zmq_msg_close(&ev);
        pthread_mutex_lock(&d->lock);
        if (event == ZMQ_EVENT_DISCONNECTED)
            d->stats.disconnected++;
        else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL ||
                 event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)
            d->stats.handshake_failed++;
        pthread_mutex_unlock(&d->lock);
    }
}

/* --- the receiver thread: ZAP (RFC 27) and the listener ----------------------------- */

static void zap_reply(wk_net_t *d, const void *id, size_t id_len, const void *req, size_t req_len,
                      const char *status, const char *text, const char *user)
{
    const struct {
        const void *p;
        size_t n;
    } f[] = {{id, id_len},
             {"", 0},
             {"1.0", 3},
             {req, req_len},
             {status, strlen(status)},
             {text, strlen(text)},
             {user, strlen(user)},
             {"", 0}};
    const size_t n = sizeof(f) / sizeof(f[0]);

    for (size_t i = 0; i < n; i++)
        if (zmq_send(d->zap, f[i].p, f[i].n, (i + 1 < n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0) {
            dx_debug("data plane: a ZAP reply was not sent: %s", zmq_strerror(errno));
            return;
        }
}

/* Answers a request for key: 200 admits it (the key is the connection's
 * User-Id), 400 or 500 refuses it (why says why). */
static void zap_answer(wk_net_t *d, const void *id, size_t id_len, const void *req, size_t req_len,
                       const char *key, const char *status, const char *why)
{
    char text[200];

    if (status[0] != '2') {
        pthread_mutex_lock(&d->lock);
        d->stats.refused++;
        pthread_mutex_unlock(&d->lock);
    }
    if (status[0] == '4' || status[0] == '5') {
        snprintf(text, sizeof(text), "refused a connection%s%s: %s", key[0] ? " with key " : "",
                 key, why);
        refusal_log(d, text);
    }
    zap_reply(d, id, id_len, req, req_len, status, status[0] == '2' ? "OK" : why,
              status[0] == '2' ? key : "");
}

/* Decides on the held requests: admitted, or refused (a list is set).
 * One held too long is forgotten: libzmq closed its handshake
 * (ZMQ_HANDSHAKE_IVL is the hold time) and the peer connects again. */
static void zap_review(wk_net_t *d)
{
    char status[WK_NET_ZAP_HELD_MAX][4];
    int64_t now = dx_mono_ms();
    size_t kept = 0;
    bool listed;
    int hold;

    size_t n_held = d->n_held; /* held[] is the receiver thread's own */

    pthread_mutex_lock(&d->lock);
    listed = d->n_allow > 0;
    hold = d->lim.zap_hold_ms;
    for (size_t i = 0; i < n_held; i++)
        snprintf(status[i], sizeof(status[i]), "%s",
                 allowed(d, d->held[i].key)          ? "200"
                 : listed                            ? "400"
                 : now - d->held[i].since_ms >= hold ? "-"
                                                     : "");
    pthread_mutex_unlock(&d->lock);
    for (size_t i = 0; i < n_held; i++) {
        struct held *h = &d->held[i];

        if (status[i][0] == '-')
            continue;
        if (status[i][0])
            zap_answer(d, h->id, h->id_len, h->req, h->req_len, h->key, status[i], NOT_PEER_TEXT);
        else
            d->held[kept++] = *h;
    }
    d->n_held = kept;
}

static bool zap_domain_is(const uint8_t *p, size_t n)
{
    return n == strlen(WK_NET_ZAP_DOMAIN) && memcmp(p, WK_NET_ZAP_DOMAIN, n) == 0;
}

/* Reads and answers (or holds) the ZAP requests waiting. */
static void zap_serve(wk_net_t *d)
{
    for (int r = 0; r < ZAP_BATCH; r++) {
        zmq_msg_t f[ZAP_FRAMES_MAX];
        size_t n = 0, sz[ZAP_FRAMES_MAX];
        const uint8_t *p[ZAP_FRAMES_MAX];
        bool more = true, overlong = false;
        const char *status = NULL, *why = NOT_PEER_TEXT;
        curve_key key = "";

        while (more) {
            zmq_msg_t extra, *m = n < ZAP_FRAMES_MAX ? &f[n] : &extra;

            zmq_msg_init(m);
            if (zmq_msg_recv(m, d->zap, n == 0 && !overlong ? ZMQ_DONTWAIT : 0) < 0) {
                zmq_msg_close(m);
                break;
            }
            more = zmq_msg_more(m);
            if (m == &extra) {
                zmq_msg_close(m);
                overlong = true;
            } else {
                p[n] = zmq_msg_data(m);
                sz[n] = zmq_msg_size(m);
                n++;
            }
        }
        if (n == 0)
            return;
        /* [id][""][version][request id][domain][address][identity][mechanism][credentials] */
        if (overlong || n < 4 || sz[1] != 0 || sz[2] != 3 || memcmp(p[2], "1.0", 3) != 0 ||
            sz[0] > ZAP_FIELD_MAX || sz[3] > ZAP_FIELD_MAX) {
            status = "500";
            why = "not a ZAP 1.0 request";
        } else if (n != 9 || !zap_domain_is(p[4], sz[4]) || sz[7] != 5 ||
                   memcmp(p[7], "CURVE", 5) != 0 || sz[8] != CURVE_KEY_BYTES) {
            status = "400";
            why = "not a CURVE connection to the data plane";
        } else {
            bool ok, listed;

            zmq_z85_encode(key, p[8], CURVE_KEY_BYTES);
            pthread_mutex_lock(&d->lock);
            ok = allowed(d, key);
            listed = d->n_allow > 0;
            pthread_mutex_unlock(&d->lock);
            status = ok ? "200" : listed ? "400" : NULL;
        }
        dx_debug("data plane: ZAP request for key %s: %s", key[0] ? key : "(none)",
                 status ? status : "held");
        if (status) {
            if (n >= 4 && sz[0] <= ZAP_FIELD_MAX && sz[3] <= ZAP_FIELD_MAX)
                zap_answer(d, p[0], sz[0], p[3], sz[3], key, status, why);
        } else {
            /* no list yet: hold it until wk_net_allow_peers (with too
             * many, the oldest is forgotten: its handshake times out) */
            struct held *h;

            if (d->n_held == WK_NET_ZAP_HELD_MAX) {
                memmove(d->held, d->held + 1, (WK_NET_ZAP_HELD_MAX - 1) * sizeof(*h));
                d->n_held--;
            }
            pthread_mutex_lock(&d->lock);
            d->stats.held++;
            pthread_mutex_unlock(&d->lock);
            h = &d->held[d->n_held++];
            memcpy(h->id, p[0], sz[0]);
            h->id_len = sz[0];
            memcpy(h->req, p[3], sz[3]);
            h->req_len = sz[3];
            memcpy(h->key, key, sizeof(h->key));
            h->since_ms = dx_mono_ms();
        }
        for (size_t i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
    }
}

/* CMD_REVIEW: decides on the held ZAP requests (a new peer list). */
static int review(wk_net_t *d)
{
    if (d->zap)
        zap_review(d);
    return 0;
}

/* Carries out one command. Returns 1 on CMD_STOP, else 0 or -errno. */
static int serve_command(wk_net_t *d)
{
    uint8_t cmd[8], reply[8];
    int32_t result;
    int n = zmq_recv(d->ctl_thread, cmd, sizeof(cmd), ZMQ_DONTWAIT);

    if (n < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : -errno;
    if (n == 0 || cmd[0] == CMD_STOP)
        return 1;
    if (n != 5)
        return 0;
    result = cmd[0] == CMD_REVIEW ? review(d) : -EINVAL;
    memcpy(reply, cmd + 1, 4); /* the sequence number */
    put_u32(reply + 4, (uint32_t)result);
    if (zmq_send(d->ctl_thread, reply, sizeof(reply), ZMQ_DONTWAIT) < 0)
        dx_warn("data plane: a command's result was not sent: %s", zmq_strerror(errno));
    return 0;
}

/* Records the error the thread stops on, for wk_net_recv to report. */
static void *receiver_failed(wk_net_t *d, int rc)
{
    dx_error("data plane: the receiver stopped: %s", zmq_strerror(-rc));
    pthread_mutex_lock(&d->lock);
    d->thread_err = rc;
    d->thread_done = true;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

static void *receiver(void *arg)
{
    wk_net_t *d = arg;
    int rc;

    while (!atomic_load(&d->stop)) {
        zmq_pollitem_t items[4] = {{d->pull, 0, ZMQ_POLLIN, 0},
                                   {d->ctl_thread, 0, ZMQ_POLLIN, 0},
                                   {d->mon, 0, ZMQ_POLLIN, 0},
                                   {d->zap, 0, ZMQ_POLLIN, 0}};
        long wait = STOP_POLL_MS;

        if (d->n_held) { /* wake for the oldest held request's deadline */
            int64_t left;

            pthread_mutex_lock(&d->lock);
            left = d->held[0].since_ms + d->lim.zap_hold_ms - dx_mono_ms();
            pthread_mutex_unlock(&d->lock);
            wait = left < 1 ? 1 : left < wait ? (long)left : wait;
        }
        if (zmq_poll(items, d->zap ? 4 : 3, wait) < 0) {
            if (errno == EINTR)
                continue;
            return errno == ETERM ? NULL : receiver_failed(d, -errno);
        }
        if (items[1].revents & ZMQ_POLLIN) {
            if ((rc = serve_command(d)) == 1)
                return NULL; /* destroy: whatever is still queued is dropped */
            if (rc < 0)
                return rc == -ETERM ? NULL : receiver_failed(d, rc);
        }
        if (items[2].revents & ZMQ_POLLIN)
            read_monitor(d);
        if (d->zap && (items[3].revents & ZMQ_POLLIN))
            zap_serve(d);
        if (d->n_held)
            zap_review(d);
        if (!(items[0].revents & ZMQ_POLLIN))
            continue;
        for (int i = 0; i < READ_BATCH && (rc = read_frame(d)) == 0; i++)
            ;
        if (rc == -ETERM)
            return NULL;
        if (rc < 0 && rc != -EAGAIN && rc != -EINTR)
            return receiver_failed(d, rc);
    }
    return NULL;
}

/* --- receive ----------------------------------------------------------------- */

int wk_net_recv(wk_net_t *d, const struct wk_net_key *key, int timeout_ms, struct wk_net_msg **out)
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
        if (d->dup) { /* one of the attempt's messages may be forged */
            rc = -EEXIST;
            break;
        }
        HASH_FIND(hh, d->buf, hkey, KEY_BYTES, b);
        if (b) {
            *out = detach(d, b, false);
            note_seen(d, hkey);
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
