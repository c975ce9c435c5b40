/* bench_curve.c - what CURVE costs, measured side by side with clear text in
 * one run:
 *
 *   1. heartbeats/s a real duplexd absorbs from 2,048 simulated workers.
 *      Two duplexd children (BUILD/bin/duplexd, loopback, temporary
 *      databases) run at once: one in clear, one with --key and an
 *      allow-list of 256 worker keys (one per simulated 8-GPU node, ids=
 *      nodeNNNN-*). Each simulated worker is a DEALER socket of this process
 *      that speaks the real protocol: Register, then Heartbeats with the
 *      RegisterAck's session. The load is closed-loop: each connection sends
 *      HB_BATCH heartbeats and then a probe (a heartbeat for an unknown
 *      worker id of its node, which duplexd answers with an Error); when the
 *      probe's answer comes, every heartbeat before it was handled (ZeroMQ
 *      keeps a connection's messages in order) and the connection sends its
 *      next batch. Rounds of HB_ROUND_S seconds alternate between the two
 *      daemons. Per round: heartbeats handled per second, and duplexd's CPU
 *      time per heartbeat (utime + stime of /proc/PID/task/TID/stat), for
 *      its main thread (the event loop: decoding, the registry, SQLite)
 *      and its other threads (ZeroMQ's I/O thread: TCP and CURVE's boxes).
 *
 *   2. the cpu data plane's throughput: two wk_net_t in this process, each
 *      in a ZeroMQ context of its own, in clear and with a CURVE keypair
 *      each (peers allowed, an attempt begun as the runtime does), for the
 *      demo job's message sizes (examples/demo.json: one activation,
 *      [microbatch_size/ep * seq_len][d_model] fp32; the largest step-end
 *      gradient sum of a stage) and 8 MiB. A receiving thread takes the
 *      messages in order; the sender keeps at most DP_WINDOW_BYTES
 *      unreceived. Clear and CURVE alternate, DP_ROUNDS each; the median
 *      round counts. Per round: MB/s, and this process's CPU time per byte
 *      (both ends, all threads). For reference, on one thread: libsodium's
 *      crypto_box_afternm and crypto_box_open_afternm (the box libzmq's
 *      CURVE puts every message in) and memcpy.
 *
 * CURVE's cost is 1 - curve/clear of the throughput. Prints one line per
 * measurement and a summary line per target (at most 30%); numbers go in
 * docs/BENCHMARKS.md.
 *
 * Usage: bench_curve [--duplexd PATH] [--spec FILE]; by default BUILD/bin/duplexd
 * (this program being BUILD/bench/bench_curve) and examples/demo.json (from
 * the current directory, else from the directories above BUILD). About a
 * minute; needs 2 x 2,048 x 2 file descriptors (it raises RLIMIT_NOFILE).
 * The duplexd children, /proc readings and the simulated workers' topology
 * and sockets are bench/simfleet's, shared with bench_fleet.
 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>
#include <zmq.h>

#include "bench/simfleet.h"
#include "common/log.h"
#include "job/jobspec.h"
#include "pipeline/schedule.h"
#include "proto/cert.h"
#include "proto/envelope.h"
#include "proto/wire.h"
#include "worker/net/dataplane.h"
#include "worker/model/model.h"
#include "worker/rank/train.h"

#define SIM_WORKERS 2048
#define SIM_NODES (SIM_WORKERS / SIM_GPUS_PER_NODE)
#define SIM_CONTEXTS 2 /* ZeroMQ contexts (one I/O thread each) per daemon's workers */
#define HB_BATCH 32    /* heartbeats per connection before its probe */
#define HB_ROUNDS 5    /* per daemon, alternating */
#define HB_ROUND_S 3.0
#define HB_WARMUP_S 1.0
#define HB_REPLY_TIMEOUT_S 60.0
#define REGISTER_TIMEOUT_S 180.0 /* SYNs dropped by a full listen queue are retried for minutes */

#define DP_ROUNDS 3
#define DP_ROUND_BYTES (256u * 1024 * 1024) /* moved per round, per size */
#define DP_WINDOW_BYTES (32u * 1024 * 1024) /* sent but not yet received */
#define DP_WINDOW_MSGS 256
#define DP_TIMEOUT_MS 30000
#define BIG_MSG (8u * 1024 * 1024)
#define SODIUM_ROUND_BYTES (256u * 1024 * 1024)

#define TARGET 0.30

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *v, int n)
{
    double s[16];

    memcpy(s, v, (size_t)n * sizeof(*s));
    qsort(s, (size_t)n, sizeof(*s), cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

static const char *verdict(double cost)
{
    return cost <= TARGET ? "met" : "missed";
}

/* --- part 1: duplexd ------------------------------------------------------ */

struct daemon {
    struct sim_daemon d; /* name: "clear" or "curve" */
    bool curve;
    struct dx_cert server;
    struct dx_cert nodes[SIM_NODES]; /* worker keys, one per node */
};

struct sim {
    struct daemon *dm;
    void *ctx[SIM_CONTEXTS];
    void *sock[SIM_WORKERS];
    int epfd;
    char ids[SIM_WORKERS][32];
    char session[SIM_WORKERS][DX_MAX_ID_LEN + 1];
    uint8_t *hb[SIM_WORKERS], *probe[SIM_WORKERS];
    size_t hb_len[SIM_WORKERS], probe_len[SIM_WORKERS];
    bool waiting[SIM_WORKERS]; /* a reply is due on this connection */
    int registered;
    int outstanding;
    bool running; /* send the next batch when a probe is answered */
    uint64_t handled;
};

static void daemon_keys(struct daemon *dm)
{
    char pub[128], sec[128], err[256];
    FILE *f;

    if (dx_cert_generate("duplexd", "server", &dm->server) < 0)
        sim_die("cannot make duplexd's keypair");
    snprintf(pub, sizeof(pub), "%s/duplexd.key", dm->d.dir);
    snprintf(sec, sizeof(sec), "%s/duplexd.key_secret", dm->d.dir);
    if (dx_cert_save(&dm->server, pub, sec, err, sizeof(err)) < 0)
        sim_die("%s", err);
    snprintf(pub, sizeof(pub), "%s/authorized", dm->d.dir);
    if (!(f = fopen(pub, "w")))
        sim_die("%s: %s", pub, strerror(errno));
    for (int n = 0; n < SIM_NODES; n++) {
        char name[32];
        snprintf(name, sizeof(name), "node%04d", n);
        if (dx_cert_generate(name, "worker", &dm->nodes[n]) < 0)
            sim_die("cannot make a worker keypair");
        fprintf(f, "%s worker %s ids=%s-*\n", dm->nodes[n].public_key, name, name);
    }
    if (fclose(f) != 0)
        sim_die("%s: %s", pub, strerror(errno));
}

static void daemon_start(struct daemon *dm, const char *duplexd)
{
    char key[128], authz[128];
    const char *extra[] = {"--dead-after-ms", "600000", /* idle between rounds without being lost */
                           "--key",           key,      "--authorized", authz, NULL};

    sim_daemon_dir(&dm->d, "curve");
    snprintf(key, sizeof(key), "%s/duplexd.key_secret", dm->d.dir);
    snprintf(authz, sizeof(authz), "%s/authorized", dm->d.dir);
    if (dm->curve)
        daemon_keys(dm);
    else
        extra[2] = NULL;
    sim_daemon_start(&dm->d, duplexd, extra);
}

static void sim_send(struct sim *s, int i, const uint8_t *buf, size_t len)
{
    if (zmq_send(s->sock[i], buf, len, ZMQ_DONTWAIT) < 0)
        sim_die("worker %s (%s): send: %s", s->ids[i], s->dm->d.name, zmq_strerror(errno));
}

/* the next batch on connection i: HB_BATCH heartbeats, then the probe */
static void sim_batch(struct sim *s, int i)
{
    for (int k = 0; k < HB_BATCH; k++)
        sim_send(s, i, s->hb[i], s->hb_len[i]);
    sim_send(s, i, s->probe[i], s->probe_len[i]);
    s->waiting[i] = true;
    s->outstanding++;
}

static void sim_reply(struct sim *s, int i, const struct dx_msg *m)
{
    if (!s->waiting[i])
        sim_die("worker %s (%s): unexpected %s", s->ids[i], s->dm->d.name,
                dx_msg_type_name(m->type));
    if (m->type == DUPLEX__MSG_TYPE__MSG_REGISTER_ACK) {
        const Duplex__RegisterAck *a = (const Duplex__RegisterAck *)m->body;
        snprintf(s->session[i], sizeof(s->session[i]), "%s", a->session_id);
        s->registered++;
    } else if (m->type == DUPLEX__MSG_TYPE__MSG_ERROR &&
               ((const Duplex__Error *)m->body)->code == DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED &&
               s->session[i][0]) {
        s->handled += HB_BATCH; /* the probe: every heartbeat before it was handled */
    } else if (m->type == DUPLEX__MSG_TYPE__MSG_ERROR) {
        const Duplex__Error *e = (const Duplex__Error *)m->body;
        sim_die("worker %s (%s): duplexd says %s: %s", s->ids[i], s->dm->d.name,
                dx_error_code_name(e->code), e->text);
    } else {
        sim_die("worker %s (%s): unexpected %s", s->ids[i], s->dm->d.name,
                dx_msg_type_name(m->type));
    }
    s->waiting[i] = false;
    s->outstanding--;
}

/* Reads every reply waiting on connection i, sending the next batch after
 * each answered probe while running. Ends with a receive that found
 * nothing, so that the socket's ZMQ_FD signals the next reply. */
static void sim_drain(struct sim *s, int i)
{
    for (;;) {
        struct dx_msg m;
        struct dx_decode_error err;
        int rc = dx_wire_recv(s->sock[i], &m, &err);

        if (rc == -EAGAIN)
            return;
        if (rc == -EPROTO)
            sim_die("worker %s (%s): bad reply: %s", s->ids[i], s->dm->d.name, err.text);
        if (rc < 0)
            sim_die("worker %s (%s): receive: %s", s->ids[i], s->dm->d.name, zmq_strerror(-rc));
        sim_reply(s, i, &m);
        dx_msg_clear(&m);
        if (s->running)
            sim_batch(s, i);
    }
}

/* Waits for replies until `until` (then stops sending) and none is due,
 * at most timeout_s longer. */
static void sim_run_until(struct sim *s, double until, double timeout_s)
{
    struct epoll_event ev[256];
    double deadline = until + timeout_s;

    while (s->outstanding > 0) {
        double t = sim_now_s();
        int n;

        if (s->running && t >= until)
            s->running = false;
        if (t > deadline)
            sim_die("duplexd (%s): %d replies still due after %.0f s", s->dm->d.name,
                    s->outstanding, timeout_s);
        n = epoll_wait(s->epfd, ev, 256, 50);
        if (n < 0 && errno != EINTR)
            sim_die("epoll_wait: %s", strerror(errno));
        for (int k = 0; k < n; k++)
            sim_drain(s, (int)ev[k].data.u32);
    }
}

static void sim_open(struct sim *s, struct daemon *dm)
{
    memset(s, 0, sizeof(*s));
    s->dm = dm;
    if ((s->epfd = epoll_create1(0)) < 0)
        sim_die("epoll_create1: %s", strerror(errno));
    for (int c = 0; c < SIM_CONTEXTS; c++)
        s->ctx[c] = sim_context(SIM_WORKERS / SIM_CONTEXTS + 16);
    for (int i = 0; i < SIM_WORKERS; i++) {
        sim_worker_id(i, s->ids[i], sizeof(s->ids[i]));
        s->sock[i] = sim_dealer(s->ctx[i % SIM_CONTEXTS], dm->d.endpoint, false,
                                dm->curve ? &dm->nodes[i / SIM_GPUS_PER_NODE] : NULL,
                                dm->server.public_key, s->epfd, (uint32_t)i);
    }
}

static void sim_close(struct sim *s)
{
    for (int i = 0; i < SIM_WORKERS; i++) {
        zmq_close(s->sock[i]);
        free(s->hb[i]);
        free(s->probe[i]);
    }
    for (int c = 0; c < SIM_CONTEXTS; c++)
        zmq_ctx_term(s->ctx[c]);
    close(s->epfd);
}

/* Registers every worker, then encodes its heartbeat and its probe. */
static double sim_register(struct sim *s)
{
    double t0 = sim_now_s();

    for (int i = 0; i < SIM_WORKERS; i++) {
        uint8_t *buf;
        size_t len;

        sim_register_encode(i, "sim", "", 1, &buf, &len);
        sim_send(s, i, buf, len);
        free(buf);
        s->waiting[i] = true;
        s->outstanding++;
        sim_drain(s, i);
    }
    sim_run_until(s, t0, REGISTER_TIMEOUT_S);
    if (s->registered != SIM_WORKERS)
        sim_die("duplexd (%s): %d of %d workers registered", s->dm->d.name, s->registered,
                SIM_WORKERS);
    for (int i = 0; i < SIM_WORKERS; i++) {
        Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;
        char probe_id[32];

        hb.worker_id = s->ids[i];
        hb.session_id = s->session[i];
        hb.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE;
        if (dx_env_encode(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, 2, &hb.base, &s->hb[i], &s->hb_len[i]) <
            0)
            sim_die("cannot encode a Heartbeat");
        /* an id of the same node (the key may speak for it) that nobody registered */
        snprintf(probe_id, sizeof(probe_id), "node%04d-probe", i / SIM_GPUS_PER_NODE);
        hb.worker_id = probe_id;
        hb.session_id = "probe";
        if (dx_env_encode(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, 3, &hb.base, &s->probe[i],
                          &s->probe_len[i]) < 0)
            sim_die("cannot encode a Heartbeat");
    }
    return sim_now_s() - t0;
}

struct hb_round {
    double rate;    /* heartbeats handled per second */
    double main_us; /* duplexd's main thread's CPU time per heartbeat */
    double io_us;   /* its other threads' (ZeroMQ I/O) */
    double busy;    /* its main thread's CPU time / wall time */
    double self_us; /* this process's (the simulated workers') */
};

static struct hb_round sim_round(struct sim *s, double seconds)
{
    struct sim_proc_cpu c0 = sim_proc_cpu(s->dm->d.pid), c1;
    double b0 = sim_self_cpu_s(), t0 = sim_now_s(), dt;
    struct hb_round r;

    s->handled = 0;
    s->running = true;
    for (int i = 0; i < SIM_WORKERS; i++) {
        sim_batch(s, i);
        sim_drain(s, i);
    }
    sim_run_until(s, t0 + seconds, HB_REPLY_TIMEOUT_S);
    dt = sim_now_s() - t0;
    c1 = sim_proc_cpu(s->dm->d.pid);
    r.rate = (double)s->handled / dt;
    r.main_us = (c1.main - c0.main) / (double)s->handled * 1e6;
    r.io_us = (c1.other - c0.other) / (double)s->handled * 1e6;
    r.busy = (c1.main - c0.main) / dt;
    r.self_us = (sim_self_cpu_s() - b0) / (double)s->handled * 1e6;
    return r;
}

static void hb_print(const char *what, const struct hb_round *r)
{
    printf("heartbeats %s: %.0f heartbeats/s; duplexd CPU/heartbeat: main thread %.2f us "
           "(busy %.0f%%), I/O thread %.2f us; simulated workers %.2f us\n",
           what, r->rate, r->main_us, r->busy * 100, r->io_us, r->self_us);
}

static double bench_heartbeats(const char *duplexd)
{
    static struct daemon dms[2];
    static struct sim sims[2];
    struct hb_round rounds[2][HB_ROUNDS], med[2];
    double v[HB_ROUNDS], cost;

    sim_raise_nofile(4 * SIM_WORKERS * 2 + 1024);
    printf("duplexd heartbeats: %d simulated workers (DEALER sockets; with CURVE, %d worker keys, "
           "one per 8-GPU node), batches of %d heartbeats + 1 probe per connection, %d rounds of "
           "%.0f s per daemon, alternating; medians\n",
           SIM_WORKERS, SIM_NODES, HB_BATCH, HB_ROUNDS, HB_ROUND_S);
    for (int d = 0; d < 2; d++) {
        long long o0, o1;
        double reg;

        dms[d].curve = d == 1;
        dms[d].d.name = d ? "curve" : "clear";
        daemon_start(&dms[d], duplexd);
        sim_open(&sims[d], &dms[d]);
        o0 = sim_listen_overflows();
        reg = sim_register(&sims[d]);
        o1 = sim_listen_overflows();
        printf("register %d workers at once (%s): %.2f s (listen queue overflows on this "
               "machine meanwhile: %lld)\n",
               SIM_WORKERS, dms[d].d.name, reg, o0 < 0 || o1 < 0 ? -1 : o1 - o0);
        fflush(stdout);
    }
    for (int d = 0; d < 2; d++) /* warm-up, not counted */
        sim_round(&sims[d], HB_WARMUP_S);
    for (int k = 0; k < HB_ROUNDS; k++)
        for (int d = 0; d < 2; d++) {
            char what[32];

            rounds[d][k] = sim_round(&sims[d], HB_ROUND_S);
            snprintf(what, sizeof(what), "%s round %d", dms[d].d.name, k + 1);
            hb_print(what, &rounds[d][k]);
            fflush(stdout);
        }
    for (int d = 0; d < 2; d++) {
        char what[32];

#define HB_MEDIAN(field)                                                                           \
    do {                                                                                           \
        for (int k = 0; k < HB_ROUNDS; k++)                                                        \
            v[k] = rounds[d][k].field;                                                             \
        med[d].field = median(v, HB_ROUNDS);                                                       \
    } while (0)
        HB_MEDIAN(rate);
        HB_MEDIAN(main_us);
        HB_MEDIAN(io_us);
        HB_MEDIAN(busy);
        HB_MEDIAN(self_us);
#undef HB_MEDIAN
        snprintf(what, sizeof(what), "%s (median)", dms[d].d.name);
        hb_print(what, &med[d]);
    }
    cost = 1 - med[1].rate / med[0].rate;
    printf("heartbeats curve/clear: rate %.3f; duplexd CPU/heartbeat: main thread %.3f, I/O thread "
           "%.3f, both %.3f; simulated workers %.3f\n",
           med[1].rate / med[0].rate, med[1].main_us / med[0].main_us, med[1].io_us / med[0].io_us,
           (med[1].main_us + med[1].io_us) / (med[0].main_us + med[0].io_us),
           med[1].self_us / med[0].self_us);
    for (int d = 0; d < 2; d++) {
        sim_close(&sims[d]);
        sim_daemon_stop(&dms[d].d);
    }
    fflush(stdout);
    return cost;
}

/* --- part 2: the data plane ----------------------------------------------- */

struct endpoint {
    void *zctx;
    wk_net_t *d;
    char pub[WK_NET_KEY_LEN + 1], sec[WK_NET_KEY_LEN + 1];
};

static void endpoint_open(struct endpoint *e, bool curve)
{
    const struct wk_net_keypair keys = {.public_z85 = e->pub, .secret_z85 = e->sec};
    char err[256];

    if (!(e->zctx = zmq_ctx_new()) || zmq_curve_keypair(e->pub, e->sec) < 0)
        sim_die("zmq: %s", zmq_strerror(errno));
    if (wk_net_create(e->zctx, WK_NET_LISTEN_DEFAULT, "127.0.0.1", curve ? &keys : NULL, &e->d, err,
                      sizeof(err)) < 0)
        sim_die("data plane: %s", err);
}

static void endpoint_close(struct endpoint *e)
{
    wk_net_destroy(e->d);
    zmq_ctx_term(e->zctx);
}

struct dp_flow {
    struct endpoint *to;
    uint64_t job;
    uint32_t attempt;
    size_t size, count;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t received;
    int error;
    double t_end;
};

static struct wk_net_key dp_key(const struct dp_flow *f, size_t i)
{
    return (struct wk_net_key){.job_id = f->job,
                               .attempt = f->attempt,
                               .step = 1,
                               .payload = DP_ACTIVATION,
                               .mb = (int32_t)i};
}

static void *dp_receiver(void *arg)
{
    struct dp_flow *f = arg;

    for (size_t i = 0; i < f->count; i++) {
        struct wk_net_key k = dp_key(f, i);
        struct wk_net_msg *m;
        int rc = wk_net_recv(f->to->d, &k, DP_TIMEOUT_MS, &m);

        if (rc == 0 && m->len != f->size)
            rc = -EBADMSG;
        if (rc == 0)
            wk_net_msg_free(m);
        pthread_mutex_lock(&f->mu);
        if (rc < 0)
            f->error = rc;
        else
            f->received = i + 1;
        pthread_cond_signal(&f->cv);
        pthread_mutex_unlock(&f->mu);
        if (rc < 0)
            return NULL;
    }
    f->t_end = sim_now_s();
    return NULL;
}

struct dp_result {
    double mbs;    /* MB/s (1e6 bytes) */
    double cpu_ns; /* this process's CPU time (every thread) per byte */
};

/* Moves count messages of size bytes from `from` to `to` in a new attempt. */
static struct dp_result dp_round(struct endpoint *from, struct endpoint *to, uint32_t attempt,
                                 const uint8_t *payload, size_t size, size_t count)
{
    struct dp_flow f = {.to = to, .job = 1, .attempt = attempt, .size = size, .count = count};
    size_t window = DP_WINDOW_BYTES / size;
    const char *keys[1] = {from->pub};
    char what[256];
    pthread_t th;
    double t0, c0;
    int rc;

    window = window < 1 ? 1 : window > DP_WINDOW_MSGS ? DP_WINDOW_MSGS : window;
    pthread_mutex_init(&f.mu, NULL);
    pthread_cond_init(&f.cv, NULL);
    /* the runtime's order at an attempt */
    wk_net_end(to->d);
    wk_net_end(from->d);
    if ((rc = wk_net_set_max_msg(to->d, size)) < 0 ||
        (rc = wk_net_set_peer_key(from->d, wk_net_addr(to->d), to->pub)) < 0 ||
        (rc = wk_net_allow_peers(to->d, keys, 1)) < 0)
        sim_die("data plane setup: %s", strerror(-rc));
    wk_net_begin(to->d, f.job, attempt);
    wk_net_begin(from->d, f.job, attempt);
    if (pthread_create(&th, NULL, dp_receiver, &f) != 0)
        sim_die("pthread_create");
    c0 = sim_self_cpu_s();
    t0 = sim_now_s();
    for (size_t i = 0; i < count; i++) {
        struct wk_net_key k = dp_key(&f, i);

        pthread_mutex_lock(&f.mu);
        while (!f.error && i - f.received >= window)
            pthread_cond_wait(&f.cv, &f.mu);
        rc = f.error;
        pthread_mutex_unlock(&f.mu);
        if (rc < 0)
            break;
        if ((rc = wk_net_send(from->d, wk_net_addr(to->d), &k, payload, size, DP_TIMEOUT_MS)) < 0)
            sim_die("data plane send of %zu bytes: %s", size, strerror(-rc));
    }
    pthread_join(th, NULL);
    if (f.error) {
        wk_net_failure(to->d, what, sizeof(what));
        sim_die("data plane receive of %zu bytes: %s %s", size, strerror(-f.error), what);
    }
    pthread_mutex_destroy(&f.mu);
    pthread_cond_destroy(&f.cv);
    return (struct dp_result){(double)size * (double)count / (f.t_end - t0) / 1e6,
                              (sim_self_cpu_s() - c0) / ((double)size * (double)count) * 1e9};
}

/* The demo's messages: one activation of a rank's share of a micro-batch,
 * and the largest stage's step-end sum (gradients, expert loads, loss). */
static void demo_sizes(const char *path, size_t *act, size_t *grad, int *grad_stage)
{
    struct job_spec spec;
    struct wk_train_config tc;
    dp_sched_t *sched;
    char err[512], *text;
    FILE *f = fopen(path, "r");
    long len;
    int stages, per;

    if (!f || fseek(f, 0, SEEK_END) < 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) < 0 ||
        !(text = malloc((size_t)len + 1)) || fread(text, 1, (size_t)len, f) != (size_t)len)
        sim_die("%s: cannot read it", path);
    fclose(f);
    if (job_spec_parse(text, (size_t)len, NULL, 0, &spec, err, sizeof(err)) < 0)
        sim_die("%s: %s", path, err);
    free(text);
    wk_train_config_from_spec(&spec, &tc);
    if (dp_sched_generate(spec.parallel.schedule, spec.parallel.pp, spec.parallel.microbatches,
                          &sched, err, sizeof(err)) < 0)
        sim_die("%s: %s", path, err);
    stages = dp_sched_stages(sched);
    dp_sched_destroy(sched);
    per = spec.model.layers / stages;
    /* worker/rank/rank.c: act_size and sync_size */
    *act = (size_t)(spec.parallel.microbatch_size / spec.parallel.ep) * (size_t)spec.model.seq_len *
           (size_t)spec.model.d_model * sizeof(float);
    *grad = 0;
    for (int st = 0; st < stages; st++) {
        struct wk_model m;
        int flags = (st == 0 ? WK_MODEL_HAS_EMBED : 0) | (st == stages - 1 ? WK_MODEL_HAS_HEAD : 0);
        size_t nf = 0, size;

        if (wk_model_stage_init(&m, &tc.model, tc.seed, st * per, (st + 1) * per, flags) < 0)
            sim_die("%s: cannot build stage %d", path, st);
        for (int i = 0; i < wk_model_param_count(&m); i++)
            nf += wk_model_param(&m, i)->n;
        wk_model_free(&m);
        size = nf * sizeof(float) + (size_t)per * (size_t)spec.model.experts * sizeof(int64_t) +
               sizeof(double);
        if (size > *grad) {
            *grad = size;
            *grad_stage = st;
        }
    }
}

/* libsodium's box on one thread: what CURVE does to every message's bytes
 * (libzmq 4.3 calls crypto_box_afternm / crypto_box_open_afternm). Found
 * in the process (libzmq links it); 0 when it is not. */
static void bench_sodium(size_t size, double *seal, double *open, double *copy)
{
    typedef int (*box_fn)(unsigned char *, const unsigned char *, unsigned long long,
                          const unsigned char *, const unsigned char *);
    void *h = dlopen("libsodium.so.23", RTLD_NOW | RTLD_NOLOAD);
    box_fn box, unbox;
    unsigned char nonce[24] = {1}, key[32] = {2};
    unsigned char *m, *c;
    size_t rounds = SODIUM_ROUND_BYTES / size;
    double t0;

    *seal = *open = *copy = 0;
    if (!h && !(h = dlopen("libsodium.so", RTLD_NOW)))
        return;
    box = (box_fn)dlsym(h, "crypto_box_afternm");
    unbox = (box_fn)dlsym(h, "crypto_box_open_afternm");
    m = calloc(size + 32, 1);
    c = calloc(size + 32, 1);
    if (box && unbox && m && c) {
        for (size_t i = 32; i < size + 32; i++)
            m[i] = (unsigned char)(i * 131);
        box(c, m, size + 32, nonce, key); /* warm */
        t0 = sim_now_s();
        for (size_t r = 0; r < rounds; r++)
            box(c, m, size + 32, nonce, key);
        *seal = (double)size * (double)rounds / (sim_now_s() - t0) / 1e6;
        t0 = sim_now_s();
        for (size_t r = 0; r < rounds; r++)
            if (unbox(m, c, size + 32, nonce, key) != 0)
                sim_die("crypto_box_open_afternm refused its own box");
        *open = (double)size * (double)rounds / (sim_now_s() - t0) / 1e6;
        t0 = sim_now_s();
        for (size_t r = 0; r < rounds; r++) {
            memcpy(c, m, size + 32);
            __asm__ __volatile__("" : : "r"(c) : "memory");
        }
        *copy = (double)size * (double)rounds / (sim_now_s() - t0) / 1e6;
    }
    free(m);
    free(c);
    dlclose(h);
}

#define DP_SIZES 3

static void bench_dataplane(const char *spec_path, double cost[DP_SIZES], size_t sizes[DP_SIZES])
{
    const char *names[DP_SIZES] = {"activation", "gradient sum", "8 MiB"};
    struct endpoint ep[2][2]; /* [clear, curve][sender, receiver] */
    double mbs[2][DP_ROUNDS], cpu[2][DP_ROUNDS];
    uint8_t *payload;
    uint32_t attempt = 0;
    int grad_stage = 0;

    demo_sizes(spec_path, &sizes[0], &sizes[1], &grad_stage);
    sizes[2] = BIG_MSG;
    printf("data plane: 2 wk_net_t in one process (a ZeroMQ context each), %s sizes: activation "
           "%zu B, gradient sum %zu B (stage %d, the largest), and 8 MiB; %u MiB per round, at "
           "most %u MiB unreceived; %d rounds each, clear and CURVE alternating; medians; CPU: "
           "this process's (both ends, every thread) per byte moved\n",
           spec_path, sizes[0], sizes[1], grad_stage, DP_ROUND_BYTES >> 20, DP_WINDOW_BYTES >> 20,
           DP_ROUNDS);
    for (int m = 0; m < 2; m++)
        for (int e = 0; e < 2; e++)
            endpoint_open(&ep[m][e], m == 1);
    if (!(payload = malloc(BIG_MSG)))
        sim_die("out of memory");
    for (size_t i = 0; i < BIG_MSG; i++)
        payload[i] = (uint8_t)(i * 2654435761u >> 24);
    for (int s = 0; s < DP_SIZES; s++) {
        size_t count = DP_ROUND_BYTES / sizes[s];
        double med[2], mcpu[2], seal, open, copy;

        count = count < 16 ? 16 : count;
        dp_round(&ep[0][0], &ep[0][1], ++attempt, payload, sizes[s], count / 8); /* warm */
        dp_round(&ep[1][0], &ep[1][1], ++attempt, payload, sizes[s], count / 8);
        for (int k = 0; k < DP_ROUNDS; k++)
            for (int m = 0; m < 2; m++) {
                int mode = k % 2 ? 1 - m : m; /* clear first, then CURVE first, ... */
                struct dp_result r =
                    dp_round(&ep[mode][0], &ep[mode][1], ++attempt, payload, sizes[s], count);
                mbs[mode][k] = r.mbs;
                cpu[mode][k] = r.cpu_ns;
                printf("data plane %s (%zu B) %s round %d: %.0f MB/s, CPU %.2f ns/B (%zu "
                       "messages)\n",
                       names[s], sizes[s], mode ? "curve" : "clear", k + 1, r.mbs, r.cpu_ns, count);
                fflush(stdout);
            }
        for (int m = 0; m < 2; m++) {
            med[m] = median(mbs[m], DP_ROUNDS);
            mcpu[m] = median(cpu[m], DP_ROUNDS);
        }
        cost[s] = 1 - med[1] / med[0];
        printf("data plane %s (%zu B): clear %.0f MB/s %.2f ns/B, curve %.0f MB/s %.2f ns/B; "
               "curve/clear: throughput %.3f, CPU per byte %.3f\n",
               names[s], sizes[s], med[0], mcpu[0], med[1], mcpu[1], med[1] / med[0],
               mcpu[1] / mcpu[0]);
        bench_sodium(sizes[s], &seal, &open, &copy);
        printf("  one thread, %zu B: libsodium crypto_box_afternm %.0f MB/s (%.2f ns/B), "
               "crypto_box_open_afternm %.0f MB/s (%.2f ns/B); memcpy %.0f MB/s (%.2f ns/B)\n",
               sizes[s], seal, 1e3 / seal, open, 1e3 / open, copy, 1e3 / copy);
        fflush(stdout);
    }
    free(payload);
    for (int m = 0; m < 2; m++)
        for (int e = 0; e < 2; e++)
            endpoint_close(&ep[m][e]);
}

/* --- main ------------------------------------------------------------------ */

/* path as given when it exists, else looked for in the directories above
 * this program's (the repository holding BUILD) */
static void find_upwards(const char *dir, const char *path, char *out, size_t len)
{
    char up[PATH_MAX + 64] = "";

    snprintf(out, len, "%s", path);
    for (int i = 0; i < 5 && path[0] != '/' && access(out, R_OK) != 0; i++) {
        strncat(up, "../", sizeof(up) - strlen(up) - 1);
        snprintf(out, len, "%s/%s%s", dir, up, path);
    }
    if (access(out, R_OK) != 0)
        snprintf(out, len, "%s", path);
}

int main(int argc, char **argv)
{
    char dir[PATH_MAX], duplexd[PATH_MAX + 32], spec[2 * PATH_MAX];
    size_t sizes[DP_SIZES];
    double hb_cost, dp_cost[DP_SIZES], t0 = sim_now_s();
    bool dp_met = true;

    sim_exe_dir(dir, sizeof(dir));
    snprintf(duplexd, sizeof(duplexd), "%s/../bin/duplexd", dir);
    find_upwards(dir, "examples/demo.json", spec, sizeof(spec));
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--duplexd") == 0 && i + 1 < argc) {
            snprintf(duplexd, sizeof(duplexd), "%s", argv[++i]);
        } else if (strcmp(argv[i], "--spec") == 0 && i + 1 < argc) {
            snprintf(spec, sizeof(spec), "%s", argv[++i]);
        } else {
            fprintf(stderr, "usage: bench_curve [--duplexd PATH] [--spec FILE]\n");
            return 2;
        }
    }
    if (access(duplexd, X_OK) != 0)
        sim_die("%s: %s (build it first: make BUILD=... BUILD/bin/duplexd)", duplexd,
                strerror(errno));
    dx_log_init("bench", DX_LOG_WARN);
    signal(SIGPIPE, SIG_IGN);

    hb_cost = bench_heartbeats(duplexd);
    bench_dataplane(spec, dp_cost, sizes);

    printf("CURVE cost (1 - curve/clear throughput; target <= %.0f%%), whole run %.0f s:\n",
           TARGET * 100, sim_now_s() - t0);
    printf("CURVE cost: heartbeats %.1f%% (%s)\n", hb_cost * 100, verdict(hb_cost));
    printf("CURVE cost: data plane");
    for (int s = 0; s < DP_SIZES; s++) {
        printf("%s (size %zu) %.1f%%", s ? "," : "", sizes[s], dp_cost[s] * 100);
        dp_met = dp_met && dp_cost[s] <= TARGET;
    }
    printf(" (%s)\n", dp_met ? "met" : "missed");
    return 0;
}
