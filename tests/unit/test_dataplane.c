/* test_dataplane.c - two data-plane endpoints in one process: advertised
 * addresses, out-of-order delivery through the buffer, old jobs dropped,
 * timeouts, garbage frames, the buffer bound, the receiver thread reading
 * ahead while the caller is busy, layer and source in the key, concurrent
 * sending and receiving, and frames of the old format. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

#include "common/clock.h"
#include "pipeline/schedule.h"
#include "worker/dataplane.h"

#define ERR_LEN 512
#define LOOPBACK "tcp://127.0.0.1:*"
#define WAIT_MS 5000 /* for a message that was sent: only slow on failure */
#define SHORT_MS 50  /* for one that never comes */
#define N_MSGS 40
#define N_CONCURRENT 2000
#define BUSY_MS 300   /* the receiver's "compute" */
#define HIDDEN_MS 150 /* a message read while it computed came well before */
#define PROMPT_MS 50  /* a buffered message is returned at once */
#define NS_PER_MS 1000000LL

struct pair {
    void *zctx;
    wk_data_t *a, *b;
};

static void pair_open(struct pair *p)
{
    char err[ERR_LEN] = "";

    p->zctx = zmq_ctx_new();
    cr_assert_not_null(p->zctx);
    cr_assert_eq(wk_data_create(p->zctx, LOOPBACK, "ignored", &p->a, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(wk_data_create(p->zctx, LOOPBACK, "ignored", &p->b, err, sizeof(err)), 0, "%s",
                 err);
}

static void pair_close(struct pair *p)
{
    wk_data_destroy(p->a);
    wk_data_destroy(p->b);
    zmq_ctx_term(p->zctx);
}

static struct wk_data_key key(uint64_t job, uint32_t attempt, uint64_t step, int mb)
{
    return (struct wk_data_key){.job_id = job,
                                .attempt = attempt,
                                .step = step,
                                .payload = mb % 2 ? DP_GRADIENT : DP_ACTIVATION,
                                .path = mb % 3 == 0,
                                .mb = mb,
                                .stage = mb % 5};
}

static void send_key(wk_data_t *from, wk_data_t *to, struct wk_data_key k)
{
    char text[64];
    int n = snprintf(text, sizeof(text), "mb %d step %llu", k.mb, (unsigned long long)k.step);

    cr_assert_eq(wk_data_send(from, wk_data_addr(to), &k, text, (size_t)n + 1, 0), 0);
}

static void expect(wk_data_t *d, struct wk_data_key k)
{
    struct wk_data_msg *m = NULL;
    char text[64];

    cr_assert_eq(wk_data_recv(d, &k, WAIT_MS, &m), 0, "mb %d step %llu did not come", k.mb,
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
    wk_data_msg_free(m);
}

static void expect_none(wk_data_t *d, struct wk_data_key k)
{
    struct wk_data_msg *m = NULL;

    cr_assert_eq(wk_data_recv(d, &k, SHORT_MS, &m), -ETIMEDOUT);
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
        wk_data_t *d = NULL;
        const char *addr;

        cr_assert_eq(wk_data_create(zctx, cases[i].listen, cases[i].host, &d, err, sizeof(err)), 0,
                     "%s", err);
        addr = wk_data_addr(d);
        cr_assert(strncmp(addr, cases[i].prefix, strlen(cases[i].prefix)) == 0,
                  "%s advertised as %s", cases[i].listen, addr);
        cr_assert_gt(atoi(addr + strlen(cases[i].prefix)), 0, "%s: no port", addr);
        wk_data_destroy(d);
    }
    zmq_ctx_term(zctx);
}

Test(dataplane, bad_listen_address)
{
    void *zctx = zmq_ctx_new();
    char err[ERR_LEN] = "";
    wk_data_t *d = NULL;

    cr_assert_lt(wk_data_create(zctx, "bogus://x", "h", &d, err, sizeof(err)), 0);
    cr_assert_null(d);
    cr_assert(strstr(err, "bogus://x"), "%s", err);
    zmq_ctx_term(zctx);
}

Test(dataplane, out_of_order_both_ways)
{
    struct pair p;
    struct wk_data_stats st;

    pair_open(&p);
    wk_data_begin(p.a, 7, 1);
    wk_data_begin(p.b, 7, 1);
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
    wk_data_stats(p.b, &st);
    cr_assert_eq(st.received, N_MSGS);
    cr_assert_eq(st.sent, N_MSGS);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.dropped + st.bad, 0);
    pair_close(&p);
}

Test(dataplane, older_jobs_and_attempts_are_dropped_newer_kept)
{
    struct pair p;
    struct wk_data_stats st;

    pair_open(&p);
    wk_data_begin(p.b, 5, 2);
    send_key(p.a, p.b, key(5, 1, 1, 0)); /* older attempt */
    send_key(p.a, p.b, key(4, 9, 1, 1)); /* older job */
    send_key(p.a, p.b, key(6, 1, 1, 2)); /* next job, before we started it */
    send_key(p.a, p.b, key(5, 2, 1, 3)); /* the current one */
    expect(p.b, key(5, 2, 1, 3));
    wk_data_stats(p.b, &st);
    cr_assert_eq(st.dropped, 2);
    cr_assert_eq(st.buffered, 1);
    expect_none(p.b, key(5, 1, 1, 0));
    wk_data_begin(p.b, 6, 1);
    expect(p.b, key(6, 1, 1, 2));

    /* starting a new attempt empties the buffer of the old one */
    send_key(p.a, p.b, key(6, 1, 3, 10));
    send_key(p.a, p.b, key(6, 1, 3, 11));
    expect(p.b, key(6, 1, 3, 11));
    wk_data_stats(p.b, &st);
    cr_assert_eq(st.buffered, 1);
    wk_data_begin(p.b, 6, 2);
    wk_data_stats(p.b, &st);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.dropped, 3);
    pair_close(&p);
}

Test(dataplane, timeout_and_garbage)
{
    struct pair p;
    struct wk_data_stats st;
    void *raw;
    int64_t t0;

    pair_open(&p);
    wk_data_begin(p.b, 1, 1);
    t0 = dx_mono_ms();
    expect_none(p.b, key(1, 1, 1, 0));
    cr_assert_geq(dx_mono_ms() - t0, SHORT_MS);

    raw = zmq_socket(p.zctx, ZMQ_PUSH);
    cr_assert_eq(zmq_connect(raw, wk_data_addr(p.b)), 0);
    cr_assert_eq(zmq_send(raw, "hello", 5, 0), 5);
    cr_assert_eq(zmq_send(raw, "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", 44, 0), 44);
    send_key(p.a, p.b, key(1, 1, 1, 0));
    expect(p.b, key(1, 1, 1, 0));
    /* the raw socket's frames may come after it (fair queueing) */
    for (t0 = dx_mono_ms(); dx_mono_ms() - t0 < WAIT_MS; expect_none(p.b, key(1, 1, 1, 1))) {
        wk_data_stats(p.b, &st);
        if (st.bad == 2)
            break;
    }
    cr_assert_eq(st.bad, 2);
    cr_assert_eq(st.received, 1);
    zmq_close(raw);

    cr_assert_eq(wk_data_send(p.a, wk_data_addr(p.b), &(struct wk_data_key){0}, "",
                              (size_t)WK_DATA_MAX_PAYLOAD + 1, 0),
                 -EMSGSIZE);
    pair_close(&p);
}

Test(dataplane, buffer_is_bounded)
{
    struct wk_data_msg *m = NULL;
    struct wk_data_key k0;
    struct pair p;
    int rc;

    pair_open(&p);
    wk_data_begin(p.b, 1, 1);
    for (int i = 0; i <= WK_DATA_BUFFER_MAX; i++) {
        struct wk_data_key k = key(1, 1, 1, i);
        cr_assert_eq(wk_data_send(p.a, wk_data_addr(p.b), &k, NULL, 0, 0), 0);
    }
    /* wait for one that is never sent: everything else fills the buffer */
    rc = wk_data_recv(p.b, &(struct wk_data_key){.job_id = 1, .attempt = 1, .step = 99}, WAIT_MS,
                      &m);
    cr_assert_eq(rc, -ENOBUFS);
    cr_assert_null(m);
    /* what the buffer holds is still there */
    k0 = key(1, 1, 1, 0);
    cr_assert_eq(wk_data_recv(p.b, &k0, 0, &m), 0);
    cr_assert_eq(m->len, 0);
    wk_data_msg_free(m);
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
static void wait_counts(wk_data_t *d, uint64_t received, uint64_t bad)
{
    struct wk_data_stats st;
    int64_t t0 = dx_mono_ms();

    do {
        wk_data_stats(d, &st);
        if (st.received >= received && st.bad >= bad)
            break;
        sleep_ms(1);
    } while (dx_mono_ms() - t0 < WAIT_MS);
    cr_assert_eq(st.received, received);
    cr_assert_eq(st.bad, bad);
}

Test(dataplane, received_while_the_receiver_computes)
{
    struct wk_data_msg *m = NULL;
    struct wk_data_key k = key(3, 1, 1, 4);
    struct pair p;
    int64_t t0, now;

    pair_open(&p);
    wk_data_begin(p.b, 3, 1);
    send_key(p.a, p.b, k);
    sleep_ms(BUSY_MS); /* compute: nobody calls wk_data_recv */
    t0 = dx_mono_ms();
    cr_assert_eq(wk_data_recv(p.b, &k, 0, &m), 0, "not read while the receiver computed");
    cr_assert_lt(dx_mono_ms() - t0, PROMPT_MS);
    now = wall_ns();
    cr_assert_gt(m->sent_ns, 0);
    cr_assert_geq(m->arrived_ns, m->sent_ns);
    cr_assert_lt(m->arrived_ns - m->sent_ns, HIDDEN_MS * NS_PER_MS, "arrived %lld ms after sent",
                 (long long)((m->arrived_ns - m->sent_ns) / NS_PER_MS));
    cr_assert_geq(now - m->arrived_ns, (BUSY_MS - HIDDEN_MS) * NS_PER_MS);
    cr_assert_str_eq((const char *)m->data, "mb 4 step 1");
    wk_data_msg_free(m);
    pair_close(&p);
}

Test(dataplane, layer_and_src_are_part_of_the_key)
{
    struct wk_data_key base = {.job_id = 2,
                               .attempt = 1,
                               .step = 7,
                               .payload = WK_DATA_EP_DISPATCH,
                               .path = 0,
                               .mb = 1,
                               .stage = 0};
    struct wk_data_key keys[4];
    struct pair p;
    char name[256];

    for (int i = 0; i < 4; i++) {
        keys[i] = base;
        keys[i].layer = i / 2;
        keys[i].src = i % 2;
    }
    pair_open(&p);
    wk_data_begin(p.b, 2, 1);
    for (int i = 0; i < 4; i++) {
        char text[16];
        int n = snprintf(text, sizeof(text), "msg %d", i);

        cr_assert_eq(wk_data_send(p.a, wk_data_addr(p.b), &keys[i], text, (size_t)n + 1, 0), 0);
    }
    for (int i = 3; i >= 0; i--) {
        struct wk_data_msg *m = NULL;
        char text[16];

        snprintf(text, sizeof(text), "msg %d", i);
        cr_assert_eq(wk_data_recv(p.b, &keys[i], WAIT_MS, &m), 0);
        cr_assert_eq(m->key.layer, keys[i].layer);
        cr_assert_eq(m->key.src, keys[i].src);
        cr_assert_str_eq((const char *)m->data, text);
        wk_data_msg_free(m);
    }
    expect_none(p.b, keys[0]);
    pair_close(&p);

    wk_data_key_name(&keys[3], name, sizeof(name));
    cr_assert_str_eq(name, "expert dispatch d1 stage 0 layer 1 from rank 1 of step 7 (job 2, "
                           "attempt 1)");
    base.payload = DP_ACTIVATION;
    wk_data_key_name(&base, name, sizeof(name));
    cr_assert_str_eq(name, "activation d1 stage 0 of step 7 (job 2, attempt 1)");
    for (int pl = WK_DATA_EP_DISPATCH; pl <= WK_DATA_SYNC_DOWN; pl++) {
        base.payload = pl;
        wk_data_key_name(&base, name, sizeof(name));
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

static struct wk_data_key concurrent_key(int i)
{
    return (struct wk_data_key){.job_id = 9,
                                .attempt = 1,
                                .step = (uint64_t)(i / 100),
                                .payload = WK_DATA_EP_COMBINE + i % 3,
                                .mb = i % 100 / 10,
                                .layer = i % 10,
                                .src = i % 7};
}

struct sender {
    wk_data_t *from;
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
        struct wk_data_key k = concurrent_key(i);

        if ((s->rc = wk_data_send(s->from, s->to, &k, &i, sizeof(i), 0)) < 0) {
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
    struct wk_data_stats st;
    struct pair p;
    pthread_t t;

    pair_open(&p);
    wk_data_begin(p.b, 9, 1);
    wk_data_begin(p.a, 9, 1);
    s.from = p.a;
    s.to = wk_data_addr(p.b);
    shuffle(s.order, N_CONCURRENT, &seed);
    shuffle(want, N_CONCURRENT, &seed);
    cr_assert_eq(pthread_create(&t, NULL, sender_main, &s), 0);
    for (int n = 0; n < N_CONCURRENT; n++) {
        struct wk_data_key k = concurrent_key(want[n]);
        struct wk_data_msg *m = NULL;
        int got;

        cr_assert_eq(wk_data_recv(p.b, &k, WAIT_MS, &m), 0, "message %d (#%d) did not come",
                     want[n], n);
        cr_assert_eq(m->len, sizeof(got));
        memcpy(&got, m->data, sizeof(got));
        cr_assert_eq(got, want[n]);
        wk_data_msg_free(m);
        if (n % 100 == 0)
            wk_data_stats(p.b, &st); /* from the receiving thread, while sends go on */
    }
    pthread_join(t, NULL);
    cr_assert_eq(s.failed, 0, "send #%d failed: %s", s.failed, strerror(-s.rc));
    expect_none(p.b, concurrent_key(0));
    wk_data_stats(p.a, &st);
    cr_assert_eq(st.sent, N_CONCURRENT);
    wk_data_stats(p.b, &st);
    cr_assert_eq(st.received, N_CONCURRENT);
    cr_assert_eq(st.buffered, 0);
    cr_assert_eq(st.bad + st.dropped + st.overflowed, 0);
    pair_close(&p);
}

Test(dataplane, overflow_is_reported)
{
    struct wk_data_msg *m = NULL;
    struct wk_data_stats st;
    uint8_t big[100] = {0};
    struct pair p;

    pair_open(&p);
    wk_data_set_limits(p.b, 8, 1000);
    wk_data_begin(p.b, 1, 1);
    for (int i = 0; i < 20; i++)
        send_key(p.a, p.b, key(1, 1, 1, i));
    /* wait for one that is never sent: the overflow wakes it */
    cr_assert_eq(wk_data_recv(p.b, &(struct wk_data_key){.job_id = 1, .attempt = 1, .step = 99},
                              WAIT_MS, &m),
                 -ENOBUFS);
    cr_assert_null(m);
    wait_counts(p.b, 20, 0);
    wk_data_stats(p.b, &st);
    cr_assert_eq(st.buffered, 8);
    cr_assert_eq(st.overflowed, 12);
    /* what the buffer holds is still there; misses keep saying so */
    for (int i = 0; i < 8; i++)
        expect(p.b, key(1, 1, 1, i));
    cr_assert_eq(wk_data_recv(p.b, &(struct wk_data_key){.job_id = 1, .attempt = 1}, 0, &m),
                 -ENOBUFS);
    /* a newer attempt starts clean */
    wk_data_begin(p.b, 1, 2);
    expect_none(p.b, key(1, 2, 1, 0));

    /* the byte bound: a message of the next attempt overflows it, and
     * starting that attempt does not hide it */
    wk_data_set_limits(p.b, 8, 150);
    cr_assert_eq(wk_data_send(p.a, wk_data_addr(p.b),
                              &(struct wk_data_key){.job_id = 1, .attempt = 3, .mb = 1}, big,
                              sizeof(big), 0),
                 0);
    cr_assert_eq(wk_data_send(p.a, wk_data_addr(p.b),
                              &(struct wk_data_key){.job_id = 1, .attempt = 3, .mb = 2}, big,
                              sizeof(big), 0),
                 0);
    wait_counts(p.b, 22, 0);
    wk_data_begin(p.b, 1, 3);
    cr_assert_eq(
        wk_data_recv(p.b, &(struct wk_data_key){.job_id = 1, .attempt = 3, .mb = 2}, 0, &m),
        -ENOBUFS);
    cr_assert_eq(
        wk_data_recv(p.b, &(struct wk_data_key){.job_id = 1, .attempt = 3, .mb = 1}, 0, &m), 0);
    cr_assert_eq(m->len, sizeof(big));
    wk_data_msg_free(m);
    wk_data_stats(p.b, &st);
    cr_assert_eq(st.overflowed, 13);
    pair_close(&p);
}

Test(dataplane, old_format_frames_are_bad)
{
    uint8_t old[4 + 36] = {'D', 'X', 'D', '1'};           /* a whole DXD1 frame */
    uint8_t sized[4 + 44 + 8 + 3] = {'D', 'X', 'D', '1'}; /* DXD1 with the new header's size */
    struct pair p;
    void *raw;

    pair_open(&p);
    wk_data_begin(p.b, 1, 1);
    raw = zmq_socket(p.zctx, ZMQ_PUSH);
    cr_assert_eq(zmq_connect(raw, wk_data_addr(p.b)), 0);
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
