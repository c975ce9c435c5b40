/* test_zwatch.c - zwatch: bursts, same-loop ping-pong, destroy inside callbacks. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <uv.h>
#include <zmq.h>

#include "common/zwatch.h"

/* A run that has not finished by then has a stuck message: fail, don't hang.
 * (Guard timers in the loop rather than Criterion's .timeout: in parallel
 * runs libcriterion 2.4's timeout bookkeeping leaks in the runner process,
 * which LeakSanitizer then reports.) */
#define GUARD_MS 20000

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void close_handle(uv_handle_t *h)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* ---- (a) bursts into a busy receiver ------------------------------------------ */

#define MAX_SENDERS 8

struct payload {
    uint32_t sender;
    uint32_t seq;
};

struct burst {
    void *ctx;
    void *router;
    char endpoint[256];
    int n_senders;
    int per_sender;
    atomic_int abort;

    /* loop thread only */
    dx_zwatch_t *w;
    uv_timer_t done_timer;
    uv_timer_t guard_timer;
    int received;
    uint32_t next_seq[MAX_SENDERS];
    int out_of_order;
    int bad_frames;
    int calls;
    int empty_calls;
    int max_per_call;
    int timed_out;
};

struct sender_arg {
    struct burst *b;
    int index;
    int failed;
};

static void *sender_main(void *p)
{
    struct sender_arg *a = p;
    struct burst *b = a->b;
    void *s = zmq_socket(b->ctx, ZMQ_DEALER);
    int timeout = 100, linger = -1;
    uint32_t seq = 0;

    if (!s || zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout, sizeof(timeout)) < 0 ||
        zmq_connect(s, b->endpoint) < 0) {
        a->failed = 1;
        if (s)
            zmq_close(s);
        return NULL;
    }
    /* bursts of varying size as fast as send allows (it blocks at the HWM),
     * with short pauses between them */
    while (seq < (uint32_t)b->per_sender && !atomic_load(&b->abort)) {
        uint32_t burst = 500 + (seq * 7919u) % 2500;
        for (uint32_t i = 0; i < burst && seq < (uint32_t)b->per_sender; i++) {
            struct payload m = {(uint32_t)a->index, seq};
            if (zmq_send(s, &m, sizeof(m), 0) == (int)sizeof(m)) {
                seq++;
            } else if (errno == EAGAIN || errno == EINTR) {
                if (atomic_load(&b->abort))
                    break;
                i--; /* retry the same message */
            } else {
                a->failed = 1;
                break;
            }
        }
        sleep_us(300);
    }
    if (atomic_load(&b->abort))
        linger = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(s);
    return NULL;
}

static void burst_finish(struct burst *b)
{
    dx_zwatch_destroy(b->w);
    close_handle((uv_handle_t *)&b->done_timer);
    close_handle((uv_handle_t *)&b->guard_timer);
}

static void burst_done_cb(uv_timer_t *t)
{
    burst_finish(t->data);
}

static void burst_cb(dx_zwatch_t *w, int revents, void *arg)
{
    struct burst *b = arg;
    int n = 0;

    (void)w;
    b->calls++;
    if (!(revents & ZMQ_POLLIN))
        b->bad_frames++;
    while (n < DX_ZWATCH_BATCH) {
        zmq_msg_t rid, body;
        int more;
        size_t more_len = sizeof(more);

        zmq_msg_init(&rid);
        if (zmq_msg_recv(&rid, b->router, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&rid);
            break;
        }
        zmq_getsockopt(b->router, ZMQ_RCVMORE, &more, &more_len);
        zmq_msg_close(&rid);
        if (!more) {
            b->bad_frames++;
            continue;
        }
        zmq_msg_init(&body);
        if (zmq_msg_recv(&body, b->router, ZMQ_DONTWAIT) < 0) {
            b->bad_frames++;
            zmq_msg_close(&body);
            break;
        }
        if (zmq_msg_size(&body) != sizeof(struct payload)) {
            b->bad_frames++;
        } else {
            struct payload m;
            memcpy(&m, zmq_msg_data(&body), sizeof(m));
            if (m.sender >= (uint32_t)b->n_senders || m.seq != b->next_seq[m.sender])
                b->out_of_order++;
            else
                b->next_seq[m.sender]++;
        }
        zmq_msg_close(&body);
        n++;
        b->received++;
        /* a busy loop: this turn took a while */
        if (b->received % 500 == 0)
            sleep_us(1000);
    }
    if (n == 0)
        b->empty_calls++;
    if (n > b->max_per_call)
        b->max_per_call = n;
    /* all in: a timer ends the run on the next turn. (No periodic timer: its
     * wake-ups would hide a message left stuck without an fd edge.) */
    if (b->received >= b->n_senders * b->per_sender)
        uv_timer_start(&b->done_timer, burst_done_cb, 0, 0);
}

static void burst_guard_cb(uv_timer_t *t)
{
    struct burst *b = t->data;
    b->timed_out = 1;
    atomic_store(&b->abort, 1);
    burst_finish(b);
}

static void run_burst(const char *bind_to, int n_senders, int per_sender)
{
    struct burst b;
    struct sender_arg args[MAX_SENDERS];
    pthread_t threads[MAX_SENDERS];
    uv_loop_t loop;
    size_t len;
    int total = n_senders * per_sender;

    cr_assert_leq(n_senders, MAX_SENDERS);
    memset(&b, 0, sizeof(b));
    b.n_senders = n_senders;
    b.per_sender = per_sender;
    atomic_init(&b.abort, 0);
    b.ctx = zmq_ctx_new();
    cr_assert_not_null(b.ctx);
    b.router = zmq_socket(b.ctx, ZMQ_ROUTER);
    cr_assert_not_null(b.router);
    cr_assert_eq(zmq_bind(b.router, bind_to), 0, "bind %s: %s", bind_to, zmq_strerror(errno));
    len = sizeof(b.endpoint);
    cr_assert_eq(zmq_getsockopt(b.router, ZMQ_LAST_ENDPOINT, b.endpoint, &len), 0);

    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(dx_zwatch_create(&loop, b.router, ZMQ_POLLIN, burst_cb, &b, &b.w), 0);
    cr_assert_eq(dx_zwatch_socket(b.w), b.router);
    uv_timer_init(&loop, &b.done_timer);
    uv_timer_init(&loop, &b.guard_timer);
    b.done_timer.data = b.guard_timer.data = &b;
    uv_timer_start(&b.guard_timer, burst_guard_cb, GUARD_MS, 0);

    for (int i = 0; i < n_senders; i++) {
        args[i] = (struct sender_arg){&b, i, 0};
        cr_assert_eq(pthread_create(&threads[i], NULL, sender_main, &args[i]), 0);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < n_senders; i++)
        pthread_join(threads[i], NULL);

    int loop_rc = uv_loop_close(&loop);
    int linger = 0;
    zmq_setsockopt(b.router, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(b.router);
    zmq_ctx_term(b.ctx);

    for (int i = 0; i < n_senders; i++)
        cr_assert_eq(args[i].failed, 0, "sender %d failed", i);
    cr_assert_eq(b.timed_out, 0, "stuck: %d of %d messages received after %d ms (%d callbacks)",
                 b.received, total, GUARD_MS, b.calls);
    cr_assert_eq(b.received, total);
    cr_assert_eq(b.out_of_order, 0, "%d messages out of order", b.out_of_order);
    cr_assert_eq(b.bad_frames, 0);
    for (int i = 0; i < n_senders; i++)
        cr_assert_eq(b.next_seq[i], (uint32_t)per_sender, "sender %d", i);
    cr_assert_leq(b.max_per_call, DX_ZWATCH_BATCH);
    cr_assert_eq(loop_rc, 0, "handles left open on the loop");
}

Test(zwatch, burst_tcp_one_sender)
{
    run_burst("tcp://127.0.0.1:*", 1, 20000);
}

Test(zwatch, burst_inproc_four_senders)
{
    run_burst("inproc://zwatch-burst", 4, 5000);
}

/* ---- (b) ping-pong between two watched sockets in one loop ------------------------ */

#define ROUND_TRIPS 10000

struct pingpong {
    void *a, *b;     /* a starts and counts; b echoes */
    int a_is_dealer; /* DEALER a, ROUTER b; else PAIR-PAIR */
    int window;      /* pings in flight */
    int sent;
    dx_zwatch_t *wa, *wb;
    uv_timer_t guard;
    int round_trips;
    int errors;
    int timed_out;
    int finished;
};

static void pp_finish(struct pingpong *p)
{
    if (p->finished)
        return;
    p->finished = 1;
    dx_zwatch_destroy(p->wa);
    dx_zwatch_destroy(p->wb);
    close_handle((uv_handle_t *)&p->guard);
}

static int pp_send_ping(struct pingpong *p, uint32_t n)
{
    return zmq_send(p->a, &n, sizeof(n), ZMQ_DONTWAIT) == (int)sizeof(n) ? 0 : -1;
}

/* a: takes the pong and sends the next ping from inside the callback */
static void pp_a_cb(dx_zwatch_t *w, int revents, void *arg)
{
    struct pingpong *p = arg;
    (void)w;
    (void)revents;
    for (int i = 0; i < DX_ZWATCH_BATCH && !p->finished; i++) {
        uint32_t n;
        int rc = zmq_recv(p->a, &n, sizeof(n), ZMQ_DONTWAIT);
        if (rc < 0)
            break;
        if (rc != (int)sizeof(n) || n != (uint32_t)p->round_trips) {
            p->errors++;
            pp_finish(p);
            return;
        }
        p->round_trips++;
        if (p->round_trips == ROUND_TRIPS) {
            pp_finish(p);
            return;
        }
        if (p->sent < ROUND_TRIPS && pp_send_ping(p, (uint32_t)p->sent++) < 0) {
            p->errors++;
            pp_finish(p);
            return;
        }
    }
}

/* b: echoes each ping from inside the callback */
static void pp_b_cb(dx_zwatch_t *w, int revents, void *arg)
{
    struct pingpong *p = arg;
    (void)w;
    (void)revents;
    for (int i = 0; i < DX_ZWATCH_BATCH && !p->finished; i++) {
        uint8_t rid[256];
        int rlen = 0, rc;
        uint32_t n;

        if (p->a_is_dealer) {
            rlen = zmq_recv(p->b, rid, sizeof(rid), ZMQ_DONTWAIT);
            if (rlen < 0)
                break;
        }
        rc = zmq_recv(p->b, &n, sizeof(n), ZMQ_DONTWAIT);
        if (rc != (int)sizeof(n)) {
            if (rc < 0 && !p->a_is_dealer && errno == EAGAIN)
                break;
            p->errors++;
            pp_finish(p);
            return;
        }
        if ((p->a_is_dealer && zmq_send(p->b, rid, (size_t)rlen, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) ||
            zmq_send(p->b, &n, sizeof(n), ZMQ_DONTWAIT) < 0) {
            p->errors++;
            pp_finish(p);
            return;
        }
    }
}

static void pp_guard_cb(uv_timer_t *t)
{
    struct pingpong *p = t->data;
    p->timed_out = 1;
    pp_finish(p);
}

static void run_pingpong(int dealer_router, int window)
{
    struct pingpong p;
    uv_loop_t loop;
    void *ctx = zmq_ctx_new();
    char endpoint[256];
    size_t len = sizeof(endpoint);
    int linger = 0;

    memset(&p, 0, sizeof(p));
    p.a_is_dealer = dealer_router;
    p.window = window;
    cr_assert_not_null(ctx);
    if (dealer_router) {
        p.b = zmq_socket(ctx, ZMQ_ROUTER);
        p.a = zmq_socket(ctx, ZMQ_DEALER);
        cr_assert_eq(zmq_bind(p.b, "tcp://127.0.0.1:*"), 0);
    } else {
        p.b = zmq_socket(ctx, ZMQ_PAIR);
        p.a = zmq_socket(ctx, ZMQ_PAIR);
        cr_assert_eq(zmq_bind(p.b, "inproc://zwatch-pingpong"), 0);
    }
    cr_assert_eq(zmq_getsockopt(p.b, ZMQ_LAST_ENDPOINT, endpoint, &len), 0);
    cr_assert_eq(zmq_connect(p.a, endpoint), 0);

    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(dx_zwatch_create(&loop, p.a, ZMQ_POLLIN, pp_a_cb, &p, &p.wa), 0);
    cr_assert_eq(dx_zwatch_create(&loop, p.b, ZMQ_POLLIN, pp_b_cb, &p, &p.wb), 0);
    uv_timer_init(&loop, &p.guard);
    p.guard.data = &p;
    uv_timer_start(&p.guard, pp_guard_cb, GUARD_MS, 0);

    /* the first pings; a DEALER queues them until connected */
    while (p.sent < p.window)
        cr_assert_eq(pp_send_ping(&p, (uint32_t)p.sent++), 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    int loop_rc = uv_loop_close(&loop);

    zmq_setsockopt(p.a, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(p.b, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(p.a);
    zmq_close(p.b);
    zmq_ctx_term(ctx);

    cr_assert_eq(p.timed_out, 0, "stuck after %d of %d round trips (%d ms)", p.round_trips,
                 ROUND_TRIPS, GUARD_MS);
    cr_assert_eq(p.errors, 0);
    cr_assert_eq(p.round_trips, ROUND_TRIPS);
    cr_assert_eq(loop_rc, 0, "handles left open on the loop");
}

Test(zwatch, pingpong_pair_inproc_same_loop)
{
    run_pingpong(0, 1);
}

Test(zwatch, pingpong_dealer_router_tcp_same_loop)
{
    run_pingpong(1, 1);
}

/* More pings in flight than a callback takes per call: after a callback
 * returns with messages still queued, the pipe sends no new activation, so
 * the fd gets no edge; only the ZMQ_EVENTS check keeps them moving. */
Test(zwatch, pingpong_pipelined_pair_inproc)
{
    run_pingpong(0, 4 * DX_ZWATCH_BATCH);
}

Test(zwatch, pingpong_pipelined_dealer_router_tcp)
{
    run_pingpong(1, 4 * DX_ZWATCH_BATCH);
}

/* ---- (c) destroy from callbacks ------------------------------------------------ */

struct selfdestroy {
    void *sock;
    dx_zwatch_t *w, *other;
    int calls;
    int got;
    int timed_out;
    uv_timer_t guard;
};

static void sd_guard_cb(uv_timer_t *t)
{
    struct selfdestroy *sd = t->data;
    sd->timed_out = 1;
    uv_stop(t->loop);
}

static void sd_cb(dx_zwatch_t *w, int revents, void *arg)
{
    struct selfdestroy *sd = arg;
    char buf[16];

    (void)revents;
    sd->calls++;
    if (zmq_recv(sd->sock, buf, sizeof(buf), ZMQ_DONTWAIT) >= 0)
        sd->got++;
    /* more messages are still pending; destroy anyway (twice: idempotent) */
    dx_zwatch_destroy(w);
    dx_zwatch_destroy(w);
    if (sd->other) {
        dx_zwatch_destroy(sd->other);
        sd->other = NULL;
    }
}

/* Sets up a PAIR pair over inproc with `pending` messages waiting on *rx. */
static void *make_pair(void *ctx, const char *name, int pending, void **tx_out)
{
    void *rx = zmq_socket(ctx, ZMQ_PAIR);
    void *tx = zmq_socket(ctx, ZMQ_PAIR);

    cr_assert_eq(zmq_bind(rx, name), 0);
    cr_assert_eq(zmq_connect(tx, name), 0);
    for (int i = 0; i < pending; i++)
        cr_assert_eq(zmq_send(tx, "x", 1, 0), 1);
    *tx_out = tx;
    return rx;
}

static void close_all_socks(void *ctx, void **socks, int n)
{
    int linger = 0;
    for (int i = 0; i < n; i++) {
        zmq_setsockopt(socks[i], ZMQ_LINGER, &linger, sizeof(linger));
        zmq_close(socks[i]);
    }
    zmq_ctx_term(ctx);
}

/* Runs the loop with an unref'd guard timer: the loop must end by itself once
 * the watchers are gone; a watcher that keeps it alive trips the guard. */
static int run_until_empty(uv_loop_t *loop, struct selfdestroy *sd)
{
    uv_timer_init(loop, &sd->guard);
    sd->guard.data = sd;
    uv_timer_start(&sd->guard, sd_guard_cb, 5000, 0);
    uv_unref((uv_handle_t *)&sd->guard);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&sd->guard, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    return uv_loop_close(loop);
}

Test(zwatch, destroy_inside_own_callback)
{
    void *ctx = zmq_ctx_new();
    void *tx, *rx = make_pair(ctx, "inproc://zwatch-sd", 3, &tx);
    struct selfdestroy sd = {.sock = rx};
    uv_loop_t loop;
    void *socks[2] = {rx, tx};

    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(dx_zwatch_create(&loop, rx, ZMQ_POLLIN, sd_cb, &sd, &sd.w), 0);
    int rc = run_until_empty(&loop, &sd);
    close_all_socks(ctx, socks, 2);

    cr_assert_eq(sd.timed_out, 0, "the loop did not end after the watcher was destroyed");
    cr_assert_eq(sd.calls, 1, "callback ran %d times after destroy", sd.calls);
    cr_assert_eq(sd.got, 1);
    cr_assert_eq(rc, 0, "handles left open on the loop");
}

Test(zwatch, destroy_other_watcher_from_callback)
{
    void *ctx = zmq_ctx_new();
    void *tx1, *rx1 = make_pair(ctx, "inproc://zwatch-sd1", 2, &tx1);
    void *tx2, *rx2 = make_pair(ctx, "inproc://zwatch-sd2", 2, &tx2);
    struct selfdestroy sd1 = {.sock = rx1}, sd2 = {.sock = rx2};
    uv_loop_t loop;
    void *socks[4] = {rx1, tx1, rx2, tx2};

    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(dx_zwatch_create(&loop, rx1, ZMQ_POLLIN, sd_cb, &sd1, &sd1.w), 0);
    cr_assert_eq(dx_zwatch_create(&loop, rx2, ZMQ_POLLIN, sd_cb, &sd2, &sd2.w), 0);
    /* both are readable in the same turn; whichever runs first destroys both */
    sd1.other = sd2.w;
    sd2.other = sd1.w;
    int rc = run_until_empty(&loop, &sd1);
    close_all_socks(ctx, socks, 4);

    cr_assert_eq(sd1.timed_out, 0);
    cr_assert_eq(sd1.calls + sd2.calls, 1, "calls %d + %d: a destroyed watcher was called",
                 sd1.calls, sd2.calls);
    cr_assert_eq(rc, 0);
}

Test(zwatch, destroy_before_run_and_null)
{
    void *ctx = zmq_ctx_new();
    void *tx, *rx = make_pair(ctx, "inproc://zwatch-early", 1, &tx);
    struct selfdestroy sd = {.sock = rx};
    uv_loop_t loop;
    void *socks[2] = {rx, tx};

    dx_zwatch_destroy(NULL);
    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(dx_zwatch_create(&loop, rx, ZMQ_POLLIN, sd_cb, &sd, &sd.w), 0);
    dx_zwatch_destroy(sd.w);
    int rc = run_until_empty(&loop, &sd);
    close_all_socks(ctx, socks, 2);

    cr_assert_eq(sd.timed_out, 0);
    cr_assert_eq(sd.calls, 0);
    cr_assert_eq(rc, 0);
}

/* ---- POLLOUT ------------------------------------------------------------------- */

struct pollout {
    int calls;
    int revents;
};

static void po_cb(dx_zwatch_t *w, int revents, void *arg)
{
    struct pollout *po = arg;
    po->calls++;
    po->revents = revents;
    dx_zwatch_destroy(w);
}

Test(zwatch, pollout_reported)
{
    void *ctx = zmq_ctx_new();
    void *tx, *rx = make_pair(ctx, "inproc://zwatch-out", 0, &tx);
    struct pollout po = {0};
    struct selfdestroy sd = {0};
    uv_loop_t loop;
    dx_zwatch_t *w;
    void *socks[2] = {rx, tx};

    cr_assert_eq(uv_loop_init(&loop), 0);
    /* nothing to read, room to write: only POLLOUT is reported */
    cr_assert_eq(dx_zwatch_create(&loop, tx, ZMQ_POLLIN | ZMQ_POLLOUT, po_cb, &po, &w), 0);
    int rc = run_until_empty(&loop, &sd);
    close_all_socks(ctx, socks, 2);

    cr_assert_eq(sd.timed_out, 0);
    cr_assert_eq(po.calls, 1);
    cr_assert_eq(po.revents, ZMQ_POLLOUT);
    cr_assert_eq(rc, 0);
}
