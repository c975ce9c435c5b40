/* test_dataplane.c - data-plane endpoints in one process: advertised
 * addresses, out-of-order delivery through the buffer, frames of other
 * attempts dropped (and the early ones of the next kept), timeouts,
 * garbage frames, the buffer's bounds (and each peer's share), the
 * receiver thread reading ahead while the caller is busy, layer and source
 * in the key, concurrent sending and receiving, frames of the old format;
 * and the attacks of issue 14: floods of a foreign job, large frames kept,
 * forged duplicates, oversize frames, and CURVE with the ZAP handler
 * (connections kept across attempts, each frame's key checked against the
 * current list); an attempt's start as the runtime makes it, while a peer
 * already sends; and the port, bound once and never free. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

#include "common/clock.h"
#include "pipeline/schedule.h"
#include "worker/net/dataplane.h"

#define ERR_LEN 512
#define LOOPBACK "tcp://127.0.0.1:*"
#define WAIT_MS 5000 /* for a message that was sent: only slow on failure */
#define SHORT_MS 50  /* for one that never comes */
#define N_MSGS 40
#define N_CONCURRENT 2000
#define NS_PER_MS 1000000LL

struct pair {
    void *zctx;
    wk_net_t *a, *b;
};

static void pair_open(struct pair *p)
{
    char err[ERR_LEN] = "";

    p->zctx = zmq_ctx_new();
    cr_assert_not_null(p->zctx);
    cr_assert_eq(wk_net_create(p->zctx, LOOPBACK, "ignored", NULL, &p->a, err, sizeof(err)), 0,
                 "%s", err);
    cr_assert_eq(wk_net_create(p->zctx, LOOPBACK, "ignored", NULL, &p->b, err, sizeof(err)), 0,
                 "%s", err);
}

static void pair_close(struct pair *p)
{
    wk_net_destroy(p->a);
    wk_net_destroy(p->b);
    zmq_ctx_term(p->zctx);
}

static struct wk_net_key key(uint64_t job, uint32_t attempt, uint64_t step, int mb)
{
    return (struct wk_net_key){.job_id = job,
                               .attempt = attempt,
                               .step = step,
                               .payload = mb % 2 ? DP_GRADIENT : DP_ACTIVATION,
                               .path = mb % 3 == 0,
                               .mb = mb,
                               .stage = mb % 5};
}

static void send_key(wk_net_t *from, wk_net_t *to, struct wk_net_key k)
{
    char text[64];
    int n = snprintf(text, sizeof(text), "mb %d step %llu", k.mb, (unsigned long long)k.step);

    cr_assert_eq(wk_net_send(from, wk_net_addr(to), &k, text, (size_t)n + 1, 0), 0);
}

static void expect(wk_net_t *d, struct wk_net_key k)
{
    struct wk_net_msg *m = NULL;
    char text[64];

    cr_assert_eq(wk_net_recv(d, &k, WAIT_MS, &m), 0, "mb %d step %llu did not come", k.mb,
                 (unsigned long long)k.step);
    snprintf(text, sizeof(text), "mb %d step %llu", k.mb, (unsigned long long)k.step);
    cr_assert_eq(m->len, strlen(text) + 1);
    cr_assert_str_eq((const char *)m->data, text);
    cr_assert_eq(m->key.job_id, k.job_id);
    cr_assert_eq(m->key.attempt, k.attempt);
    cr_assert_eq(m->key.payload, k.payload);
    cr_assert_eq(m->key.path, k.path);
    cr_assert_eq(m->key.stage, k.stage);
    cr_assert_eq(m->key.layer, k.layer);
    cr_assert_eq(m->key.src, k.src);
    wk_net_msg_free(m);
}

static void expect_none(wk_net_t *d, struct wk_net_key k)
{
    struct wk_net_msg *m = NULL;

    cr_assert_eq(wk_net_recv(d, &k, SHORT_MS, &m), -ETIMEDOUT);
    cr_assert_null(m);
}

Test(dataplane, advertised_address)
{
    const struct {
        const char *listen, *host, *prefix;
    } cases[] = {
        {"tcp://127.0.0.1:*", "elsewhere", "tcp://127.0.0.1:"},
        {"tcp://0.0.0.0:*", "node3", "tcp://node3:"},
        {"tcp://*:*", "node3.example.org", "tcp://node3.example.org:"},
    };
    void *zctx = zmq_ctx_new();

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[ERR_LEN] = "";
        wk_net_t *d = NULL;
        const char *addr;

        cr_assert_eq(
            wk_net_create(zctx, cases[i].listen, cases[i].host, NULL, &d, err, sizeof(err)), 0,
            "%s", err);
        addr = wk_net_addr(d);
        cr_assert(strncmp(addr, cases[i].prefix, strlen(cases[i].prefix)) == 0,
                  "%s advertised as %s", cases[i].listen, addr);
        cr_assert_gt(atoi(addr + strlen(cases[i].prefix)), 0, "%s: no port", addr);
        wk_net_destroy(d);
    }
    zmq_ctx_term(zctx);
}

Test(dataplane, bad_listen_address)
{
    void *zctx = zmq_ctx_new();
    char err[ERR_LEN] = "";
    wk_net_t *d = NULL;

    cr_assert_lt(wk_net_create(zctx, "bogus://x", "h", NULL, &d, err, sizeof(err)), 0);
    cr_assert_null(d);
    cr_assert(strstr(err, "bogus://x"), "%s", err);
    zmq_ctx_term(zctx);
}

Test(dataplane, out_of_order_both_ways)
{
    struct pair p;
    struct wk_net_stats st;

    pair_open(&p);
    wk_net_begin(p.a, 7, 1);
    wk_net_begin(p.b, 7, 1);
    for (int i = 0; i < N_MSGS; i++) {
        send_key(p.a, p.b, key(7, 1, 1, i));
        send_key(p.b, p.a, key(7, 1, 2, i));
    }
    for (int i = N_MSGS - 1; i >= 0; i--) /* newest first: the rest wait in the buffer */
        expect(p.b, key(7, 1, 1, i));
    for (int i = 0; i < N_MSGS; i += 2) /* evens, then odds */
        expect(p.a, key(7, 1, 2, i));
    for (int i = 1; i < N_MSGS; i += 2)
        expect(p.a, key(7, 1, 2, i));
    expect_none(p.a, key(7, 1, 2, 0)); /* each message comes once */
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.received, N_MSGS);
    cr_assert_eq(st.sent, N_MSGS);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.dropped + st.bad, 0);
    pair_close(&p);
}

/* Waits until the counter at offset `field` of d's stats reaches want. */
#define wait_stat(d, field, want)                                                                  \
    wait_stat_at(d, offsetof(struct wk_net_stats, field), want, #field)

static void wait_stat_at(wk_net_t *d, size_t off, uint64_t want, const char *name)
{
    struct wk_net_stats st;
    uint64_t v = 0;
    int64_t t0 = dx_mono_ms();

    do {
        wk_net_stats(d, &st);
        memcpy(&v, (const char *)&st + off, sizeof(v));
        if (v >= want)
            return;
        struct timespec ts = {0, NS_PER_MS};
        nanosleep(&ts, NULL);
    } while (dx_mono_ms() - t0 < WAIT_MS);
    cr_assert_geq(v, want, "%s is %llu, not %llu", name, (unsigned long long)v,
                  (unsigned long long)want);
}

Test(dataplane, frames_of_other_attempts_are_dropped)
{
    struct pair p;
    struct wk_net_stats st;

    pair_open(&p);
    wk_net_begin(p.b, 5, 2);
    send_key(p.a, p.b, key(5, 1, 1, 0)); /* older attempt */
    send_key(p.a, p.b, key(4, 9, 1, 1)); /* older job */
    send_key(p.a, p.b, key(6, 1, 1, 2)); /* a job this rank was not given */
    send_key(p.a, p.b, key(5, 3, 1, 4)); /* an attempt this rank was not given */
    send_key(p.a, p.b, key(5, 2, 1, 3)); /* the current one */
    expect(p.b, key(5, 2, 1, 3));
    wait_stat(p.b, received, 5);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.dropped, 4);
    cr_assert_eq(st.buffered, 0);
    expect_none(p.b, key(5, 1, 1, 0));

    /* between attempts, a later one's frames wait for it (a peer started first) */
    wk_net_end(p.b);
    send_key(p.a, p.b, key(5, 2, 1, 5)); /* the attempt that ended */
    send_key(p.a, p.b, key(6, 1, 1, 2));
    wait_stat(p.b, early, 1);
    wk_net_begin(p.b, 6, 1);
    expect(p.b, key(6, 1, 1, 2));
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.dropped, 5);

    /* starting a new attempt empties the buffer of the old one */
    send_key(p.a, p.b, key(6, 1, 3, 10));
    send_key(p.a, p.b, key(6, 1, 3, 11));
    expect(p.b, key(6, 1, 3, 11));
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 1);
    wk_net_begin(p.b, 6, 2);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.buffered_bytes, 0);
    pair_close(&p);
}

Test(dataplane, timeout_and_garbage)
{
    struct pair p;
    struct wk_net_stats st;
    void *raw;
    int64_t t0;

    pair_open(&p);
    wk_net_begin(p.b, 1, 1);
    t0 = dx_mono_ms();
    expect_none(p.b, key(1, 1, 1, 0));
    cr_assert_geq(dx_mono_ms() - t0, SHORT_MS);

    raw = zmq_socket(p.zctx, ZMQ_PUSH);
    cr_assert_eq(zmq_connect(raw, wk_net_addr(p.b)), 0);
    cr_assert_eq(zmq_send(raw, "hello", 5, 0), 5);
    cr_assert_eq(zmq_send(raw, "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", 44, 0), 44);
    send_key(p.a, p.b, key(1, 1, 1, 0));
    expect(p.b, key(1, 1, 1, 0));
    /* the raw socket's frames may come after it (fair queueing) */
    for (t0 = dx_mono_ms(); dx_mono_ms() - t0 < WAIT_MS; expect_none(p.b, key(1, 1, 1, 1))) {
        wk_net_stats(p.b, &st);
        if (st.bad == 2)
            break;
    }
    cr_assert_eq(st.bad, 2);
    cr_assert_eq(st.received, 1);
    zmq_close(raw);

    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &(struct wk_net_key){0}, "",
                             (size_t)WK_NET_MAX_PAYLOAD + 1, 0),
                 -EMSGSIZE);
    pair_close(&p);
}

Test(dataplane, buffer_is_bounded)
{
    struct wk_net_msg *m = NULL;
    struct wk_net_key k0;
    struct pair p;
    int rc;

    pair_open(&p);
    wk_net_begin(p.b, 1, 1);
    for (int i = 0; i <= WK_NET_BUFFER_MAX; i++) {
        struct wk_net_key k = key(1, 1, 1, i);
        cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, NULL, 0, 0), 0);
    }
    /* wait for one that is never sent: everything else fills the buffer */
    rc = wk_net_recv(p.b, &(struct wk_net_key){.job_id = 1, .attempt = 1, .step = 99}, WAIT_MS, &m);
    cr_assert_eq(rc, -ENOBUFS);
    cr_assert_null(m);
    /* what the buffer holds is still there */
    k0 = key(1, 1, 1, 0);
    cr_assert_eq(wk_net_recv(p.b, &k0, 0, &m), 0);
    cr_assert_eq(m->len, 0);
    wk_net_msg_free(m);
    pair_close(&p);
}

static int64_t wall_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 * NS_PER_MS + ts.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * NS_PER_MS};

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Waits until d has read `received` good frames and `bad` bad ones. */
static void wait_counts(wk_net_t *d, uint64_t received, uint64_t bad)
{
    struct wk_net_stats st;
    int64_t t0 = dx_mono_ms();

    do {
        wk_net_stats(d, &st);
        if (st.received >= received && st.bad >= bad)
            break;
        sleep_ms(1);
    } while (dx_mono_ms() - t0 < WAIT_MS);
    cr_assert_eq(st.received, received);
    cr_assert_eq(st.bad, bad);
}

/* The receiver thread reads a message while the caller computes (nobody
 * calls wk_net_recv): its count goes up with no call; then a recv that does
 * not wait returns it from the buffer, stamped as sent after our send began
 * and arrived before our recv did. Ordering only, no durations. */
Test(dataplane, received_while_the_receiver_computes)
{
    struct wk_net_msg *m = NULL;
    struct wk_net_key k = key(3, 1, 1, 4);
    struct pair p;
    int64_t before_send, before_recv;

    pair_open(&p);
    wk_net_begin(p.b, 3, 1);
    before_send = wall_ns();
    send_key(p.a, p.b, k);
    wait_counts(p.b, 1, 0); /* read off the socket: compute, no wk_net_recv */
    before_recv = wall_ns();
    cr_assert_eq(wk_net_recv(p.b, &k, 0, &m), 0, "not read while the receiver computed");
    cr_assert_geq(m->sent_ns, before_send);
    cr_assert_geq(m->arrived_ns, m->sent_ns);
    cr_assert_leq(m->arrived_ns, before_recv, "stamped %lld ns after the recv began",
                  (long long)(m->arrived_ns - before_recv));
    cr_assert_str_eq((const char *)m->data, "mb 4 step 1");
    wk_net_msg_free(m);
    pair_close(&p);
}

Test(dataplane, layer_and_src_are_part_of_the_key)
{
    struct wk_net_key base = {.job_id = 2,
                              .attempt = 1,
                              .step = 7,
                              .payload = WK_NET_EP_DISPATCH,
                              .path = 0,
                              .mb = 1,
                              .stage = 0};
    struct wk_net_key keys[4];
    struct pair p;
    char name[256];

    for (int i = 0; i < 4; i++) {
        keys[i] = base;
        keys[i].layer = i / 2;
        keys[i].src = i % 2;
    }
    pair_open(&p);
    wk_net_begin(p.b, 2, 1);
    for (int i = 0; i < 4; i++) {
        char text[16];
        int n = snprintf(text, sizeof(text), "msg %d", i);

        cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &keys[i], text, (size_t)n + 1, 0), 0);
    }
    for (int i = 3; i >= 0; i--) {
        struct wk_net_msg *m = NULL;
        char text[16];

        snprintf(text, sizeof(text), "msg %d", i);
        cr_assert_eq(wk_net_recv(p.b, &keys[i], WAIT_MS, &m), 0);
        cr_assert_eq(m->key.layer, keys[i].layer);
        cr_assert_eq(m->key.src, keys[i].src);
        cr_assert_str_eq((const char *)m->data, text);
        wk_net_msg_free(m);
    }
    expect_none(p.b, keys[0]);
    pair_close(&p);

    wk_net_key_name(&keys[3], name, sizeof(name));
    cr_assert_str_eq(name, "expert dispatch d1 stage 0 layer 1 from rank 1 of step 7 (job 2, "
                           "attempt 1)");
    base.payload = DP_ACTIVATION;
    wk_net_key_name(&base, name, sizeof(name));
    cr_assert_str_eq(name, "activation d1 stage 0 of step 7 (job 2, attempt 1)");
    for (int pl = WK_NET_EP_DISPATCH; pl <= WK_NET_SYNC_DOWN; pl++) {
        base.payload = pl;
        wk_net_key_name(&base, name, sizeof(name));
        cr_assert(strstr(name, "layer 0 from rank 0") && !strstr(name, "message"), "%s", name);
    }
}

static void shuffle(int *v, int n, unsigned *seed)
{
    for (int i = 0; i < n; i++)
        v[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = rand_r(seed) % (i + 1), t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

static struct wk_net_key concurrent_key(int i)
{
    return (struct wk_net_key){.job_id = 9,
                               .attempt = 1,
                               .step = (uint64_t)(i / 100),
                               .payload = WK_NET_EP_COMBINE + i % 3,
                               .mb = i % 100 / 10,
                               .layer = i % 10,
                               .src = i % 7};
}

struct sender {
    wk_net_t *from;
    const char *to;
    int order[N_CONCURRENT];
    int failed; /* index + 1 of the first send that failed */
    int rc;
};

static void *sender_main(void *arg)
{
    struct sender *s = arg;

    for (int n = 0; n < N_CONCURRENT; n++) {
        int i = s->order[n];
        struct wk_net_key k = concurrent_key(i);

        if ((s->rc = wk_net_send(s->from, s->to, &k, &i, sizeof(i), 0)) < 0) {
            s->failed = n + 1;
            break;
        }
        if (n % 64 == 0)
            sched_yield();
    }
    return NULL;
}

Test(dataplane, concurrent_send_and_receive)
{
    static struct sender s;
    static int want[N_CONCURRENT];
    unsigned seed = 12345;
    struct wk_net_stats st;
    struct pair p;
    pthread_t t;

    pair_open(&p);
    wk_net_begin(p.b, 9, 1);
    wk_net_begin(p.a, 9, 1);
    s.from = p.a;
    s.to = wk_net_addr(p.b);
    shuffle(s.order, N_CONCURRENT, &seed);
    shuffle(want, N_CONCURRENT, &seed);
    cr_assert_eq(pthread_create(&t, NULL, sender_main, &s), 0);
    for (int n = 0; n < N_CONCURRENT; n++) {
        struct wk_net_key k = concurrent_key(want[n]);
        struct wk_net_msg *m = NULL;
        int got;

        cr_assert_eq(wk_net_recv(p.b, &k, WAIT_MS, &m), 0, "message %d (#%d) did not come", want[n],
                     n);
        cr_assert_eq(m->len, sizeof(got));
        memcpy(&got, m->data, sizeof(got));
        cr_assert_eq(got, want[n]);
        wk_net_msg_free(m);
        if (n % 100 == 0)
            wk_net_stats(p.b, &st); /* from the receiving thread, while sends go on */
    }
    pthread_join(t, NULL);
    cr_assert_eq(s.failed, 0, "send #%d failed: %s", s.failed, strerror(-s.rc));
    expect_none(p.b, concurrent_key(0));
    wk_net_stats(p.a, &st);
    cr_assert_eq(st.sent, N_CONCURRENT);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.received, N_CONCURRENT);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.bad + st.dropped + st.overflowed, 0);
    pair_close(&p);
}

Test(dataplane, overflow_is_reported)
{
    struct wk_net_msg *m = NULL;
    struct wk_net_stats st;
    struct wk_net_limits lim;
    uint8_t big[100] = {0};
    char why[512];
    struct pair p;

    pair_open(&p);
    wk_net_get_limits(p.b, &lim);
    lim.msgs = 8;
    lim.bytes = 1000;
    wk_net_set_limits(p.b, &lim);
    wk_net_begin(p.b, 1, 1);
    for (int i = 0; i < 20; i++)
        send_key(p.a, p.b, key(1, 1, 1, i));
    /* wait for one that is never sent: the overflow wakes it */
    cr_assert_eq(
        wk_net_recv(p.b, &(struct wk_net_key){.job_id = 1, .attempt = 1, .step = 99}, WAIT_MS, &m),
        -ENOBUFS);
    cr_assert_null(m);
    wait_counts(p.b, 20, 0);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 8);
    cr_assert_eq(st.overflowed, 12);
    wk_net_failure(p.b, why, sizeof(why));
    cr_assert(strstr(why, "was dropped: the receive buffer was full"), "%s", why);
    /* what the buffer holds is still there; misses keep saying so */
    for (int i = 0; i < 8; i++)
        expect(p.b, key(1, 1, 1, i));
    cr_assert_eq(wk_net_recv(p.b, &(struct wk_net_key){.job_id = 1, .attempt = 1}, 0, &m),
                 -ENOBUFS);
    /* a newer attempt starts clean */
    wk_net_begin(p.b, 1, 2);
    expect_none(p.b, key(1, 2, 1, 0));

    /* the early allowance's byte bound: a message of the next attempt
     * overflows it between attempts, and starting that attempt does not
     * hide it */
    wk_net_end(p.b);
    lim.early_bytes = 150;
    wk_net_set_limits(p.b, &lim);
    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b),
                             &(struct wk_net_key){.job_id = 1, .attempt = 3, .mb = 1}, big,
                             sizeof(big), 0),
                 0);
    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b),
                             &(struct wk_net_key){.job_id = 1, .attempt = 3, .mb = 2}, big,
                             sizeof(big), 0),
                 0);
    wait_counts(p.b, 22, 0);
    wk_net_begin(p.b, 1, 3);
    cr_assert_eq(wk_net_recv(p.b, &(struct wk_net_key){.job_id = 1, .attempt = 3, .mb = 2}, 0, &m),
                 -ENOBUFS);
    cr_assert_eq(wk_net_recv(p.b, &(struct wk_net_key){.job_id = 1, .attempt = 3, .mb = 1}, 0, &m),
                 0);
    cr_assert_eq(m->len, sizeof(big));
    wk_net_msg_free(m);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.overflowed, 13);
    wk_net_failure(p.b, why, sizeof(why));
    cr_assert(strstr(why, "came before the attempt started"), "%s", why);
    pair_close(&p);
}

Test(dataplane, old_format_frames_are_bad)
{
    uint8_t old[4 + 36] = {'D', 'X', 'D', '1'};           /* a whole DXD1 frame */
    uint8_t sized[4 + 44 + 8 + 3] = {'D', 'X', 'D', '1'}; /* DXD1 with the new header's size */
    struct pair p;
    void *raw;

    pair_open(&p);
    wk_net_begin(p.b, 1, 1);
    raw = zmq_socket(p.zctx, ZMQ_PUSH);
    cr_assert_eq(zmq_connect(raw, wk_net_addr(p.b)), 0);
    old[4] = 1;  /* job 1 */
    old[12] = 1; /* attempt 1 */
    sized[4] = 1;
    sized[12] = 1;
    cr_assert_eq(zmq_send(raw, old, sizeof(old), 0), (int)sizeof(old));
    cr_assert_eq(zmq_send(raw, sized, sizeof(sized), 0), (int)sizeof(sized));
    wait_counts(p.b, 0, 2);
    /* the thread keeps serving */
    send_key(p.a, p.b, key(1, 1, 1, 0));
    expect(p.b, key(1, 1, 1, 0));
    send_key(p.a, p.b, key(1, 1, 1, 1));
    expect(p.b, key(1, 1, 1, 1));
    wait_counts(p.b, 2, 2);
    zmq_close(raw);
    pair_close(&p);
}

/* --- issue 14: attacks on the data plane ----------------------------------------- */

#define FLOOD 66000                  /* more than WK_NET_BUFFER_MAX */
#define BIG_FRAME (20 * 1024 * 1024) /* an attacker's large frame */

static void flood_foreign_job(wk_net_t *from, wk_net_t *to, int n)
{
    for (int i = 0; i < n; i++) {
        struct wk_net_key k = {.job_id = UINT64_MAX, .attempt = 1, .step = (uint64_t)i};

        cr_assert_eq(wk_net_send(from, wk_net_addr(to), &k, NULL, 0, 0), 0);
    }
}

/* 65,547 frames with job_id 2^64-1 made a worker fail every later job. */
Test(dataplane, a_flood_of_a_foreign_job_buffers_nothing)
{
    struct wk_net_stats st;
    struct pair p;

    pair_open(&p);
    /* while an attempt runs: every frame is dropped */
    wk_net_begin(p.b, 3, 1);
    flood_foreign_job(p.a, p.b, FLOOD);
    wait_stat(p.b, received, FLOOD);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.dropped, FLOOD);
    cr_assert_eq(st.overflowed + st.peer_overflowed, 0);
    send_key(p.a, p.b, key(3, 1, 1, 0));
    expect(p.b, key(3, 1, 1, 0));

    /* between jobs: at most the early allowance, freed when the next starts */
    wk_net_end(p.b);
    flood_foreign_job(p.a, p.b, FLOOD);
    wait_stat(p.b, received, 2 * FLOOD + 1);
    wk_net_stats(p.b, &st);
    cr_assert_leq(st.buffered, WK_NET_EARLY_PEER_MAX);
    wk_net_begin(p.b, 4, 1);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 0);
    send_key(p.a, p.b, key(4, 1, 1, 0));
    expect(p.b, key(4, 1, 1, 0)); /* the later job works */
    pair_close(&p);
}

/* Three 60 MiB frames kept 180 MB of a worker's memory for good. */
Test(dataplane, large_frames_are_freed_when_the_attempt_ends)
{
    uint8_t *big = calloc(1, BIG_FRAME);
    struct wk_net_stats st;
    struct pair p;

    cr_assert_not_null(big);
    pair_open(&p);
    /* of the current attempt, never asked for */
    wk_net_begin(p.b, 1, 1);
    for (int i = 0; i < 3; i++) {
        struct wk_net_key k = key(1, 1, 50, i);
        cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, big, BIG_FRAME, 0), 0);
    }
    wait_stat(p.b, received, 3);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered_bytes, 3 * (size_t)BIG_FRAME);
    wk_net_end(p.b);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.buffered_bytes, 0);

    /* of a later job, between jobs: one fits the early allowance, until the next begins */
    for (int i = 0; i < 3; i++) {
        struct wk_net_key k = key(1000, 1, 1, i);
        cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, big, BIG_FRAME, 0), 0);
    }
    wait_stat(p.b, received, 6);
    wk_net_stats(p.b, &st);
    cr_assert_leq(st.buffered_bytes, WK_NET_EARLY_PEER_BYTES);
    cr_assert_eq(st.peer_overflowed, 2);
    wk_net_begin(p.b, 2, 1);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered_bytes, 0);
    pair_close(&p);
    free(big);
}

/* The frame a raw PUSH socket sends: what any process on the network can. */
static void raw_send(void *raw, struct wk_net_key k, const void *payload, size_t len)
{
    uint8_t frame[WK_NET_HEADER_BYTES + 256] = {'D', 'X', 'D', '2'};
    uint8_t *p = frame + 4;
    const uint64_t u64[] = {k.job_id, k.step};
    const uint32_t u32[] = {(uint32_t)k.payload, (uint32_t)k.path,  (uint32_t)k.mb,
                            (uint32_t)k.stage,   (uint32_t)k.layer, (uint32_t)k.src};

    cr_assert_leq(len, 256);
    for (int i = 0; i < 8; i++)
        *p++ = (uint8_t)(u64[0] >> (8 * i));
    for (int i = 0; i < 4; i++)
        *p++ = (uint8_t)(k.attempt >> (8 * i));
    for (int i = 0; i < 8; i++)
        *p++ = (uint8_t)(u64[1] >> (8 * i));
    for (size_t j = 0; j < 6; j++)
        for (int i = 0; i < 4; i++)
            *p++ = (uint8_t)(u32[j] >> (8 * i));
    memcpy(frame + WK_NET_HEADER_BYTES, payload, len);
    cr_assert_eq(zmq_send(raw, frame, WK_NET_HEADER_BYTES + len, 0),
                 (int)(WK_NET_HEADER_BYTES + len));
}

/* Zero-filled activations pushed before step 100's real ones arrived first;
 * the real ones were dropped and the job trained on the forgery. */
Test(dataplane, a_forged_frame_before_the_real_one_fails_the_attempt)
{
    const uint8_t zeros[64] = {0};
    struct wk_net_key k = {
        .job_id = 7, .attempt = 1, .step = 100, .payload = DP_ACTIVATION, .mb = 3, .stage = 1};
    struct wk_net_msg *m = NULL;
    struct wk_net_stats st;
    char why[512];
    struct pair p;
    void *raw;

    pair_open(&p);
    wk_net_begin(p.b, 7, 1);
    raw = zmq_socket(p.zctx, ZMQ_PUSH);
    cr_assert_eq(zmq_connect(raw, wk_net_addr(p.b)), 0);
    raw_send(raw, k, zeros, sizeof(zeros));
    wait_stat(p.b, received, 1);
    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, "real", 5, 0), 0);
    wait_stat(p.b, duplicates, 1);
    cr_assert_eq(wk_net_recv(p.b, &k, WAIT_MS, &m), -EEXIST); /* not the forged payload */
    cr_assert_null(m);
    wk_net_failure(p.b, why, sizeof(why));
    cr_assert(strstr(why, "a second activation d3 stage 1 of step 100 (job 7, attempt 1) came "
                          "from peer 127.0.0.1 (the first from peer 127.0.0.1)"),
              "%s", why);
    /* every later receive of the attempt fails too */
    send_key(p.a, p.b, key(7, 1, 100, 4));
    cr_assert_eq(wk_net_recv(p.b, &(struct wk_net_key){0}, 0, &m), -EEXIST);

    /* the next attempt is clean; a forgery received first is caught when
     * the real one comes */
    wk_net_begin(p.b, 7, 2);
    k.attempt = 2;
    raw_send(raw, k, zeros, sizeof(zeros));
    cr_assert_eq(wk_net_recv(p.b, &k, WAIT_MS, &m), 0);
    cr_assert_eq(m->len, sizeof(zeros));
    wk_net_msg_free(m);
    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, "real", 5, 0), 0);
    wait_stat(p.b, duplicates, 2);
    cr_assert_eq(
        wk_net_recv(p.b, &(struct wk_net_key){.job_id = 7, .attempt = 2, .step = 101}, WAIT_MS, &m),
        -EEXIST);
    wk_net_failure(p.b, why, sizeof(why));
    cr_assert(strstr(why, "after this rank received the first"), "%s", why);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.duplicates, 2);
    zmq_close(raw);
    pair_close(&p);
}

Test(dataplane, frames_over_the_largest_message_are_refused)
{
    uint8_t buf[300] = {0};
    struct wk_net_key k = key(2, 1, 1, 0);
    struct wk_net_msg *m = NULL;
    struct wk_net_stats st;
    struct pair p;

    pair_open(&p);
    cr_assert_eq(wk_net_set_max_msg(p.b, 200), 0);
    wk_net_begin(p.b, 2, 1);
    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, buf, 201, 0), 0);
    wait_stat(p.b, oversize, 1);
    k.mb = 1;
    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, buf, 200, 0), 0);
    cr_assert_eq(wk_net_recv(p.b, &k, WAIT_MS, &m), 0);
    cr_assert_eq(m->len, 200);
    wk_net_msg_free(m);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered_bytes, 0);
    /* wk_net_end forgets the limit */
    wk_net_end(p.b);
    wk_net_begin(p.b, 3, 1);
    k = key(3, 1, 1, 0);
    cr_assert_eq(wk_net_send(p.a, wk_net_addr(p.b), &k, buf, sizeof(buf), 0), 0);
    cr_assert_eq(wk_net_recv(p.b, &k, WAIT_MS, &m), 0);
    wk_net_msg_free(m);
    pair_close(&p);
}

/* A flooding peer fills its own share only: another peer still gets in. */
Test(dataplane, each_peer_has_a_share_of_the_buffer)
{
    struct wk_net_limits lim;
    struct wk_net_msg *m = NULL;
    struct wk_net_stats st;
    struct wk_net_key k9;
    char other[WK_NET_ADDR_MAX], why[512];
    struct pair p;

    pair_open(&p);
    wk_net_get_limits(p.b, &lim);
    lim.peer_msgs = 4;
    wk_net_set_limits(p.b, &lim);
    wk_net_begin(p.b, 1, 1);
    for (int i = 0; i < 10; i++)
        send_key(p.a, p.b, key(1, 1, 1, i));
    wait_stat(p.b, peer_overflowed, 6);
    /* from another address (127.0.0.2 is loopback too) */
    snprintf(other, sizeof(other), "tcp://127.0.0.2:0;%s", wk_net_addr(p.b) + strlen("tcp://"));
    cr_assert_eq(wk_net_send(p.a, other, &(struct wk_net_key){.job_id = 1, .attempt = 1, .step = 2},
                             "x", 2, 0),
                 0);
    wait_stat(p.b, received, 11); /* a miss says -ENOBUFS at once now */
    cr_assert_eq(
        wk_net_recv(p.b, &(struct wk_net_key){.job_id = 1, .attempt = 1, .step = 2}, WAIT_MS, &m),
        0);
    wk_net_msg_free(m);
    expect(p.b, key(1, 1, 1, 0));
    k9 = key(1, 1, 1, 9);
    cr_assert_eq(wk_net_recv(p.b, &k9, 0, &m), -ENOBUFS);
    wk_net_failure(p.b, why, sizeof(why));
    cr_assert(strstr(why, "from peer 127.0.0.1 was dropped: that peer's share"), "%s", why);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 3);
    wk_net_end(p.b);
    wk_net_stats(p.b, &st);
    cr_assert_eq(st.buffered, 0);
    pair_close(&p);
}

/* --- CURVE: each keyed endpoint in a context of its own (one ZAP handler each) --- */

struct keyed {
    void *zctx;
    wk_net_t *d;
    char pub[WK_NET_KEY_LEN + 1], sec[WK_NET_KEY_LEN + 1];
};

/* hold_ms: how long its ZAP handler holds a connection (0: the default). */
static void keyed_open_hold(struct keyed *k, bool curve, int hold_ms)
{
    const struct wk_net_keypair keys = {
        .public_z85 = k->pub, .secret_z85 = k->sec, .zap_hold_ms = hold_ms};
    char err[ERR_LEN] = "";

    k->zctx = zmq_ctx_new();
    cr_assert_not_null(k->zctx);
    cr_assert_eq(zmq_curve_keypair(k->pub, k->sec), 0);
    cr_assert_eq(
        wk_net_create(k->zctx, LOOPBACK, "h", curve ? &keys : NULL, &k->d, err, sizeof(err)), 0,
        "%s", err);
    cr_assert_eq(wk_net_curve(k->d), curve);
}

static void keyed_open(struct keyed *k, bool curve)
{
    keyed_open_hold(k, curve, 0);
}

static void keyed_close(struct keyed *k)
{
    wk_net_destroy(k->d);
    zmq_ctx_term(k->zctx);
}

/* from sends k to `to`, presenting to's key. */
static void keyed_send(struct keyed *from, struct keyed *to, struct wk_net_key k)
{
    char text[64];
    int n = snprintf(text, sizeof(text), "mb %d step %llu", k.mb, (unsigned long long)k.step);

    cr_assert_eq(wk_net_set_peer_key(from->d, wk_net_addr(to->d), to->pub), 0);
    cr_assert_eq(wk_net_send(from->d, wk_net_addr(to->d), &k, text, (size_t)n + 1, 0), 0);
}

static void allow(struct keyed *k, struct keyed *const *peers, size_t n)
{
    const char *keys[8];

    for (size_t i = 0; i < n; i++)
        keys[i] = peers[i]->pub;
    cr_assert_eq(wk_net_allow_peers(k->d, keys, n), 0);
}

Test(dataplane, curve_admits_the_listed_peers_only)
{
    struct keyed b, a, stranger, clear;
    struct wk_net_stats st;

    keyed_open(&b, true);
    keyed_open(&a, true);
    keyed_open(&stranger, true);
    keyed_open(&clear, false);
    allow(&b, (struct keyed *[]){&a}, 1);
    wk_net_begin(b.d, 1, 1);
    keyed_send(&a, &b, key(1, 1, 1, 0));
    expect(b.d, key(1, 1, 1, 0));
    /* a key that is not listed, and a peer in clear: nothing comes */
    keyed_send(&stranger, &b, key(1, 1, 1, 1));
    send_key(clear.d, b.d, key(1, 1, 1, 2));
    wait_stat(b.d, refused, 1);
    wait_stat(b.d, handshake_failed, 1);
    expect_none(b.d, key(1, 1, 1, 1));
    expect_none(b.d, key(1, 1, 1, 2));
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.received, 1);
    /* the sending side needs the peer's key */
    cr_assert_eq(wk_net_send(a.d, wk_net_addr(clear.d), &(struct wk_net_key){0}, NULL, 0, 0),
                 -ENOKEY);
    keyed_close(&clear);
    keyed_close(&stranger);
    keyed_close(&a);
    keyed_close(&b);
}

Test(dataplane, a_new_peer_list_refuses_the_old_peers)
{
    struct keyed b, a, c;
    struct wk_net_stats st;

    keyed_open(&b, true);
    keyed_open(&a, true);
    keyed_open(&c, true);
    allow(&b, (struct keyed *[]){&a, &c}, 2);
    wk_net_begin(b.d, 1, 1);
    keyed_send(&a, &b, key(1, 1, 1, 0));
    keyed_send(&c, &b, key(1, 1, 1, 1));
    expect(b.d, key(1, 1, 1, 0));
    expect(b.d, key(1, 1, 1, 1));
    /* c is no peer any more: its open connection is not listened to ... */
    allow(&b, (struct keyed *[]){&a}, 1);
    keyed_send(&c, &b, key(1, 1, 1, 2));
    wait_stat(b.d, unallowed, 1);
    expect_none(b.d, key(1, 1, 1, 2));
    /* ... and a new one is refused */
    wk_net_end(c.d); /* closes its sockets */
    keyed_send(&c, &b, key(1, 1, 1, 3));
    wait_stat(b.d, refused, 1);
    expect_none(b.d, key(1, 1, 1, 3));
    keyed_send(&a, &b, key(1, 1, 1, 4));
    expect(b.d, key(1, 1, 1, 4));
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.buffered, 0);
    keyed_close(&c);
    keyed_close(&a);
    keyed_close(&b);
}

/* A peer that starts the attempt before this rank waits at the ZAP handler
 * (its frames stay in its queue) and gets in when the list comes; its
 * connection stays open after the attempt's end, and what it sends for the
 * next attempt before this rank lists it again is kept early and taken
 * (checked against the new list) when this rank begins. */
Test(dataplane, a_peer_that_starts_first_is_held_until_listed)
{
    struct keyed b, a;
    struct wk_net_stats st;

    keyed_open(&b, true);
    keyed_open(&a, true);
    keyed_send(&a, &b, key(1, 1, 1, 0)); /* b has no list yet */
    wait_stat(b.d, held, 1);             /* a's handshake waits at the ZAP handler */
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.received, 0);
    cr_assert_eq(st.refused, 0);
    allow(&b, (struct keyed *[]){&a}, 1);
    wk_net_begin(b.d, 1, 1);
    expect(b.d, key(1, 1, 1, 0));

    /* a's connection stays open (nothing binds the PULL socket again) */
    wk_net_end(b.d);
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.buffered, 0);
    keyed_send(&a, &b, key(1, 2, 1, 0));
    wait_stat(b.d, early, st.early + 1); /* on the open connection, no list yet: kept early */
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.received, 2);
    cr_assert_eq(st.held, 1); /* not connected again, so not held again */
    cr_assert_eq(st.disconnected, 0);
    allow(&b, (struct keyed *[]){&a}, 1);
    wk_net_begin(b.d, 1, 2);
    expect(b.d, key(1, 2, 1, 0));
    keyed_close(&a);
    keyed_close(&b);
}

/* A connection held too long is closed by libzmq (the hold time is the
 * handshake interval): the peer connects again, is held again, and gets
 * in once listed, its frame intact. */
Test(dataplane, a_held_peer_connects_again)
{
    struct wk_net_limits lim;
    struct wk_net_stats st;
    struct keyed b, a;

    keyed_open_hold(&b, true, 200);
    keyed_open(&a, true);
    wk_net_get_limits(b.d, &lim);
    cr_assert_eq(lim.zap_hold_ms, 200);
    lim.zap_hold_ms = 1; /* fixed at the bind: set_limits leaves it */
    wk_net_set_limits(b.d, &lim);
    wk_net_get_limits(b.d, &lim);
    cr_assert_eq(lim.zap_hold_ms, 200);
    keyed_send(&a, &b, key(1, 1, 1, 0));
    wait_stat(b.d, held, 3); /* held, timed out, held again, ... */
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.received, 0);
    cr_assert_eq(st.refused, 0);
    cr_assert_geq(st.handshake_failed, 2);
    allow(&b, (struct keyed *[]){&a}, 1);
    wk_net_begin(b.d, 1, 1);
    expect(b.d, key(1, 1, 1, 0));
    keyed_close(&a);
    keyed_close(&b);
}

/* With CURVE, the listener's ZMQ_MAXMSGSIZE is fixed at its only bind (the
 * largest payload any attempt may carry): a frame over the attempt's
 * largest message, which only a listed peer can send, reaches the receiver
 * thread, which refuses it and frees it at once; the connection stays, and
 * the peer's next frame comes on it. */
Test(dataplane, curve_frames_over_the_largest_message_are_refused_by_the_receiver)
{
    uint8_t buf[8192] = {0}; /* over the attempt's 1000 bytes */
    struct keyed b, a;
    struct wk_net_stats st;
    struct wk_net_key k = key(1, 1, 1, 0);
    struct wk_net_msg *m = NULL;

    keyed_open(&b, true);
    keyed_open(&a, true);
    cr_assert_eq(wk_net_set_max_msg(b.d, 1000), 0);
    allow(&b, (struct keyed *[]){&a}, 1);
    wk_net_begin(b.d, 1, 1);
    cr_assert_eq(wk_net_set_peer_key(a.d, wk_net_addr(b.d), b.pub), 0);
    cr_assert_eq(wk_net_send(a.d, wk_net_addr(b.d), &k, buf, sizeof(buf), 0), 0);
    wait_stat(b.d, oversize, 1);
    cr_assert_eq(wk_net_recv(b.d, &k, 0, &m), -ETIMEDOUT);
    cr_assert_null(m);
    /* the same connection, the next frame: it comes */
    k.mb = 1;
    cr_assert_eq(wk_net_send(a.d, wk_net_addr(b.d), &k, buf, 1000, 0), 0);
    cr_assert_eq(wk_net_recv(b.d, &k, WAIT_MS, &m), 0);
    cr_assert_eq(m->len, 1000);
    wk_net_msg_free(m);
    k.mb = 0;
    cr_assert_eq(wk_net_recv(b.d, &k, 0, &m), -ETIMEDOUT); /* never delivered */
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.received, 2);
    cr_assert_eq(st.oversize, 1);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.disconnected, 0);
    cr_assert_eq(st.handshake_failed, 0);
    keyed_close(&a);
    keyed_close(&b);
}

Test(dataplane, curve_keys_are_checked)
{
    struct keyed k, other;
    char err[ERR_LEN] = "", pub2[WK_NET_KEY_LEN + 1], sec2[WK_NET_KEY_LEN + 1];
    wk_net_t *second = NULL;
    const char *bad[] = {"not a key"};
    void *zctx = zmq_ctx_new();

    keyed_open(&k, true);
    cr_assert_eq(zmq_curve_keypair(pub2, sec2), 0);
    cr_assert_eq(wk_net_create(zctx, LOOPBACK, "h",
                               &(struct wk_net_keypair){.public_z85 = "short", .secret_z85 = sec2},
                               &second, err, sizeof(err)),
                 -EINVAL);
    cr_assert(strstr(err, "40 Z85 characters"), "%s", err);
    cr_assert_null(second);
    cr_assert_eq(wk_net_create(zctx, LOOPBACK, "h",
                               &(struct wk_net_keypair){.public_z85 = k.pub, .secret_z85 = sec2},
                               &second, err, sizeof(err)),
                 -EINVAL);
    cr_assert(strstr(err, "not the secret key's"), "%s", err);
    cr_assert_null(second);
    cr_assert_eq(wk_net_allow_peers(k.d, bad, 1), -EINVAL);
    cr_assert_eq(wk_net_set_peer_key(k.d, "tcp://127.0.0.1:1", "bad"), -EINVAL);
    /* one ZAP handler per context */
    cr_assert_eq(wk_net_create(k.zctx, LOOPBACK, "h",
                               &(struct wk_net_keypair){.public_z85 = pub2, .secret_z85 = sec2},
                               &second, err, sizeof(err)),
                 -EADDRINUSE);
    cr_assert(strstr(err, "another ZAP handler"), "%s", err);
    cr_assert_null(second);
    /* in clear, no handler: a second one in that context is fine */
    cr_assert_eq(wk_net_create(k.zctx, LOOPBACK, "h", NULL, &second, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_not(wk_net_curve(second));
    wk_net_destroy(second);
    zmq_ctx_term(zctx);
    /* a keyed data plane still serves after an attempt ends with nothing admitted */
    keyed_open(&other, true);
    allow(&k, (struct keyed *[]){&other}, 1);
    wk_net_begin(k.d, 5, 1);
    wk_net_end(k.d);
    allow(&k, (struct keyed *[]){&other}, 1);
    wk_net_begin(k.d, 5, 2);
    keyed_send(&other, &k, key(5, 2, 1, 0));
    expect(k.d, key(5, 2, 1, 0));
    keyed_close(&other);
    keyed_close(&k);
}

/* --- an attempt's start, while a peer already sends ------------------------------ */

/* An attempt's start as the runtime makes it (data_start): the largest
 * message, the peer's key (to send to it, and to admit it), then begin;
 * with early_msgs, once that many frames came before it (early ones). */
static void attempt_start(struct keyed *self, struct keyed *peer, uint64_t job, size_t max_msg,
                          uint64_t early_msgs)
{
    const char *keys[] = {peer->pub};
    struct wk_net_stats st;

    wk_net_stats(self->d, &st);
    cr_assert_eq(wk_net_set_max_msg(self->d, max_msg), 0);
    cr_assert_eq(wk_net_set_peer_key(self->d, wk_net_addr(peer->d), peer->pub), 0);
    cr_assert_eq(wk_net_allow_peers(self->d, keys, 1), 0);
    if (early_msgs)
        wait_stat(self->d, early, st.early + early_msgs);
    wk_net_begin(self->d, job, 1);
}

#define RACE_TRIES 20
#define RACE_STEP_US 100 /* b starts i * RACE_STEP_US after a sent */
#define RACE_MSGS 3

/* A peer that began first sends at once, while this rank is still in
 * wk_net_set_max_msg, wk_net_allow_peers or wk_net_begin (its connection,
 * open since the attempt before, or new and held): every frame of the
 * attempt comes, those before this rank's wk_net_begin too. */
Test(dataplane, a_peer_that_sends_while_this_rank_starts_its_attempt_loses_nothing)
{
    struct keyed a, b;
    struct timespec ts;
    struct wk_net_stats st;

    keyed_open(&a, true);
    keyed_open(&b, true);
    for (int i = 0; i < RACE_TRIES; i++) {
        uint64_t job = (uint64_t)i + 1;
        size_t max_msg = i % 2 ? 2000 : 3000;

        attempt_start(&a, &b, job, max_msg, 0);
        for (int mb = 0; mb < RACE_MSGS; mb++)
            send_key(a.d, b.d, key(job, 1, 1, mb));
        ts = (struct timespec){0, (long)i * RACE_STEP_US * 1000};
        nanosleep(&ts, NULL);
        /* every other try, b begins once a's frames came (kept early) */
        attempt_start(&b, &a, job, max_msg, i % 2 ? RACE_MSGS : 0);
        send_key(b.d, a.d, key(job, 1, 2, 0));
        for (int mb = 0; mb < RACE_MSGS; mb++)
            expect(b.d, key(job, 1, 1, mb));
        expect(a.d, key(job, 1, 2, 0));
        wk_net_end(a.d);
        wk_net_end(b.d);
    }
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.binds, 1);
    cr_assert_eq(st.unallowed, 0);
    cr_assert_eq(st.oversize, 0);
    keyed_close(&a);
    keyed_close(&b);
}

/* --- the port is never let go ------------------------------------------------------ */

/* Tries to bind another socket on the data plane's endpoint, in a loop,
 * until stop: any bind that succeeds means the port was free. */
struct prober {
    void *zctx, *sock;
    const char *ep;
    atomic_bool stop;
    atomic_ulong tries, bound, other;
    pthread_t thread;
};

/* One try: true when the endpoint was free (and is free again). */
static bool probe_once(void *sock, const char *ep, bool *other)
{
    *other = false;
    if (zmq_bind(sock, ep) == 0) {
        zmq_unbind(sock, ep);
        return true;
    }
    *other = errno != EADDRINUSE;
    return false;
}

static void *prober_run(void *arg)
{
    struct prober *pr = arg;
    bool other;

    while (!atomic_load(&pr->stop)) {
        atomic_fetch_add(&pr->tries, 1);
        if (probe_once(pr->sock, pr->ep, &other))
            atomic_fetch_add(&pr->bound, 1);
        else if (other)
            atomic_fetch_add(&pr->other, 1);
    }
    return NULL;
}

/* After each call the endpoint must still be taken; so must it be all
 * along (the prober thread). */
static void still_ours(void *sock, const char *ep, const char *after)
{
    bool other;

    cr_assert_not(probe_once(sock, ep, &other), "%s is free after %s", ep, after);
    cr_assert_not(other, "binding %s failed after %s: %s", ep, after, zmq_strerror(errno));
}

/* The data plane's port was lost (an ephemeral one, taken by another
 * process while it was bound again): now it binds once, and through
 * attempts with their largest messages, peer lists and connections the
 * port is never free. */
Test(dataplane, the_data_plane_never_lets_go_of_its_port)
{
    struct keyed a, b;
    struct prober pr = {0};
    struct wk_net_stats st;
    void *sock;
    int linger = 0;

    keyed_open(&a, true);
    keyed_open(&b, true);
    pr.ep = wk_net_addr(b.d);
    cr_assert_not_null(pr.zctx = zmq_ctx_new());
    cr_assert_not_null(pr.sock = zmq_socket(pr.zctx, ZMQ_PULL));
    cr_assert_not_null(sock = zmq_socket(pr.zctx, ZMQ_PULL));
    zmq_setsockopt(pr.sock, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger));
    still_ours(sock, pr.ep, "create");
    cr_assert_eq(pthread_create(&pr.thread, NULL, prober_run, &pr), 0);
    for (int i = 0; i < 6; i++) {
        uint32_t attempt = (uint32_t)i + 1;
        const char *keys[] = {a.pub};

        cr_assert_eq(wk_net_set_max_msg(b.d, 1000 + (size_t)i * 1000), 0);
        still_ours(sock, pr.ep, "wk_net_set_max_msg");
        cr_assert_eq(wk_net_allow_peers(b.d, keys, 1), 0);
        still_ours(sock, pr.ep, "wk_net_allow_peers");
        if (i % 2)
            keyed_send(&a, &b, key(1, attempt, 1, 0)); /* kept early */
        wk_net_begin(b.d, 1, attempt);
        still_ours(sock, pr.ep, "wk_net_begin");
        if (!(i % 2))
            keyed_send(&a, &b, key(1, attempt, 1, 0));
        expect(b.d, key(1, attempt, 1, 0)); /* a connection admitted */
        wk_net_end(b.d);
        still_ours(sock, pr.ep, "wk_net_end");
    }
    atomic_store(&pr.stop, true);
    pthread_join(pr.thread, NULL);
    cr_assert_gt(atomic_load(&pr.tries), 0);
    cr_assert_eq(atomic_load(&pr.bound), 0, "another socket bound %s %lu times of %lu", pr.ep,
                 atomic_load(&pr.bound), atomic_load(&pr.tries));
    cr_assert_eq(atomic_load(&pr.other), 0);
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.binds, 1);
    cr_assert_eq(st.disconnected, 0); /* a's connection lasted all along */
    zmq_close(sock);
    zmq_close(pr.sock);
    zmq_ctx_term(pr.zctx);
    keyed_close(&a);
    keyed_close(&b);
}

/* --- a peer of the last attempt, dropped from the list ----------------------------- */

/* Connections stay open across attempts: c, a peer of attempt 1 only,
 * still has its connection, and is not heard on it in attempt 2 (its
 * frame refused as it arrives) or 3 (its frame, sent between attempts
 * with no list set, kept early and refused when b begins). */
Test(dataplane, a_peer_of_the_last_attempt_is_not_heard_on_its_open_connection)
{
    struct keyed b, a, c;
    struct wk_net_stats st;

    keyed_open(&b, true);
    keyed_open(&a, true);
    keyed_open(&c, true);
    allow(&b, (struct keyed *[]){&a, &c}, 2);
    wk_net_begin(b.d, 1, 1);
    keyed_send(&a, &b, key(1, 1, 1, 0));
    keyed_send(&c, &b, key(1, 1, 1, 1));
    expect(b.d, key(1, 1, 1, 0));
    expect(b.d, key(1, 1, 1, 1));
    wk_net_end(b.d);

    /* attempt 2 without c: its frame, on its open connection, is refused */
    allow(&b, (struct keyed *[]){&a}, 1);
    wk_net_begin(b.d, 1, 2);
    keyed_send(&c, &b, key(1, 2, 1, 0));
    wait_stat(b.d, unallowed, 1);
    keyed_send(&a, &b, key(1, 2, 1, 1));
    expect(b.d, key(1, 2, 1, 1));
    expect_none(b.d, key(1, 2, 1, 0));
    wk_net_end(b.d);

    /* between attempts, no list: both are kept early; b's begin takes a's */
    keyed_send(&c, &b, key(1, 3, 1, 0));
    keyed_send(&a, &b, key(1, 3, 1, 1));
    wait_stat(b.d, early, 2);
    allow(&b, (struct keyed *[]){&a}, 1);
    wk_net_begin(b.d, 1, 3);
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.unallowed, 2);
    expect(b.d, key(1, 3, 1, 1));
    expect_none(b.d, key(1, 3, 1, 0));
    wk_net_stats(b.d, &st);
    cr_assert_eq(st.refused, 0); /* c never connected again: its old connection was used */
    cr_assert_eq(st.disconnected, 0);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.binds, 1);
    keyed_close(&c);
    keyed_close(&a);
    keyed_close(&b);
}
