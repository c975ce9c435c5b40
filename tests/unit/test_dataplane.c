/* test_dataplane.c - two data-plane endpoints in one process: advertised
 * addresses, out-of-order delivery through the buffer, old jobs dropped,
 * timeouts, garbage frames and the buffer bound. */
#include <criterion/criterion.h>
#include <errno.h>
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
