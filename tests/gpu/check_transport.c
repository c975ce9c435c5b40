/* check_transport.c - duplex-gpucheck's checks of the intra-node transport
 * (kernels/transport.cu over a worker/cuda/comm/ipcring.h ring): correctness and
 * throughput between TWO PROCESSES on one GPU through CUDA IPC, and the
 * overlap benchmark of the transport with a compute-bound kernel in one
 * process.
 *
 * Two processes. gc_check_transport forks and execs this program as
 * `duplex-gpucheck --transport-peer FD DEVICE KIND CHANNELS SLOTS SLOT_BYTES
 * THREADS NMSG SEED CUDA_LIB` (CUDA_LIB "-": the default driver; fork before the child touches
 * CUDA, exec so it starts with a fresh CUDA state); the peer (gc_transport_peer) opens the driver
 * itself, is the RECEIVER: it creates the ring, sends its descriptor over the
 * socketpair FD, receives the message stream into a buffer poisoned with
 * 0xff, regenerates every message from the seed and reports the bytes that
 * differ (payload and padding), the lengths that differ and the channels in
 * error: "ok BAD_BYTES BAD_LENGTHS BAD_CHANNELS FIRST_ERROR\n" (or "error
 * WHY\n"). The parent imports the ring, SENDS the same stream (its message
 * sizes and bytes from the seed: zero-byte messages, a slot exactly filled,
 * one byte into a second slot, the whole ring, sub-vector and random sizes),
 * timed with events on its stream, then tells the peer to finish ("q").
 * A peer that hangs is killed after PEER_TIMEOUT_S and the row FAILs "peer
 * timed out" (the parent's own kernel then stops at its own timeout,
 * DX_TRANSPORT_TIMEOUT_CYCLES, about 70 s). The throughput row is payload
 * bytes over the sender's time; without MPS the two processes' kernels are
 * time-sliced, not concurrent, so it measures the IPC path, not the kernel
 * (the overlap benchmark's "transport 1 proc" row does).
 *
 * Overlap. gc_overlap runs sender and receiver on one local ring of
 * OVERLAP_CHANNELS channels (a stream each) and a compute function on a third
 * stream: alone, alone, then together; overlap = together / max(compute
 * alone, transport alone), best of OVERLAP_REPS, PASS when <= OVERLAP_BOUND.
 * The default compute is dx_bench_fma (kernels/bench.cu) on the SMs the
 * transport leaves (sms - 2 x channels, one block each), its length
 * calibrated to the transport's. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kernels/transport_ref.h"
#include "tests/gpu/gpucheck.h"
#include "worker/cuda/comm/ipcring.h"

/* to move into gpucheck.h: the overlap benchmark with any compute (a
 * cuBLASLt GEMM, ...): compute(arg, s) enqueues its work on s, 0 or -errno */

GC_IMAGE(transport);
GC_IMAGE(bench);

#define PEER_TIMEOUT_S 60
#define PEER_QUIT_TIMEOUT_S 120 /* the peer waits this long for "q" */
#define OVERLAP_CHANNELS DX_TREF_DEFAULT_CHANNELS
#define OVERLAP_BOUND 1.15
#define OVERLAP_REPS 3
#define FMA_THREADS 1024 /* DX_BENCH_THREADS */
#define FMA_CALIBRATE_ITERS 4096

enum { PLAN_MIXED = 0, PLAN_LARGE = 1 };

/* A message stream both processes derive from the same numbers. */
struct plan {
    int kind, nmsg;
    uint32_t channels, slots, slot_bytes;
    unsigned threads;
    uint64_t seed;
    uint64_t *off, *len; /* per message, 16-byte aligned offsets */
    size_t bytes;        /* the message buffer */
    uint64_t payload;    /* the sum of the lengths */
};

/* this file's kernels */
static struct {
    int loaded;
    wk_cuda_function_t send, recv, fma;
} tf;

/* --- random streams ------------------------------------------------------ */

static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* message m's bytes: a stream seeded by the run's seed and m */
static void payload(unsigned char *p, uint64_t len, uint64_t seed, uint64_t m)
{
    uint64_t s = seed ^ ((m + 1) * 0x2545f4914f6cdd1dull), i = 0;

    for (; i + 8 <= len; i += 8) {
        uint64_t v = mix(&s);
        memcpy(p + i, &v, 8);
    }
    if (i < len) {
        uint64_t v = mix(&s);
        memcpy(p + i, &v, (size_t)(len - i));
    }
}

/* message m's size: the edge cases at random, then any size that fits */
static uint64_t mixed_size(uint64_t *s, uint32_t slots, uint32_t slot_bytes)
{
    const uint64_t max = (uint64_t)slots * slot_bytes - DX_TREF_MSG_HDR;
    const uint64_t r = mix(s);
    uint64_t len;

    switch (r % 8) {
    case 0:
        return 0;
    case 1:
        return slot_bytes - DX_TREF_MSG_HDR; /* exactly one slot */
    case 2:
        len = (uint64_t)slot_bytes - DX_TREF_MSG_HDR + 1; /* one byte into a second */
        break;
    case 3:
        return max; /* the whole ring */
    case 4:
        return 1 + (r >> 8) % 15; /* inside one vector */
    case 5:
        len = 2 * (uint64_t)slot_bytes + (r >> 8) % slot_bytes; /* several slots */
        break;
    case 6:
        len = (r >> 8) % slot_bytes;
        break;
    default:
        len = (r >> 8) % (max + 1);
        break;
    }
    return len < max ? len : max;
}

static void plan_free(struct plan *p)
{
    free(p->off);
    free(p->len);
    p->off = p->len = NULL;
}

/* Sizes and offsets of p's nmsg messages. 0, -EINVAL or -ENOMEM. */
static int plan_make(struct plan *p)
{
    uint64_t s = p->seed, at = 0;

    p->off = p->len = NULL;
    if (p->nmsg < 1 || dx_tref_ring_size(p->channels, p->slots, p->slot_bytes) == 0)
        return -EINVAL;
    p->off = calloc((size_t)p->nmsg, sizeof(uint64_t));
    p->len = calloc((size_t)p->nmsg, sizeof(uint64_t));
    if (!p->off || !p->len) {
        plan_free(p);
        return -ENOMEM;
    }
    p->payload = 0;
    for (int m = 0; m < p->nmsg; m++) {
        uint64_t len = p->kind == PLAN_LARGE ? (uint64_t)p->slot_bytes - DX_TREF_MSG_HDR
                                             : mixed_size(&s, p->slots, p->slot_bytes);
        p->off[m] = at;
        p->len[m] = len;
        p->payload += len;
        at += (len + 15) & ~(uint64_t)15;
    }
    p->bytes = at ? (size_t)at : 16;
    return 0;
}

/* The buffer as the receiver must leave it: each message's bytes at its
 * offset, the padding to 16 bytes still poisoned. */
static void plan_fill(const struct plan *p, unsigned char *buf)
{
    memset(buf, GC_POISON, p->bytes);
    for (int m = 0; m < p->nmsg; m++)
        payload(buf + p->off[m], p->len[m], p->seed, (uint64_t)m);
}

static size_t count_bad_bytes(const unsigned char *got, const unsigned char *want, size_t n)
{
    size_t bad = 0;

    if (memcmp(got, want, n) == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        bad += got[i] != want[i];
    return bad;
}

/* --- modules --------------------------------------------------------------- */

static int load_kernels(struct gc *g)
{
    wk_cuda_module transport, bench;
    static const char *const transport_names[] = {"dx_transport_send", "dx_transport_recv"};
    static const char *const bench_names[] = {"dx_bench_fma"};
    wk_cuda_function_t *const transport_fns[] = {&tf.send, &tf.recv};
    wk_cuda_function_t *const bench_fns[] = {&tf.fma};

    if (tf.loaded)
        return tf.loaded > 0 ? 0 : -EIO;
    tf.loaded = -1;
    if (GC_MODULE(g, transport, &transport) < 0 || GC_MODULE(g, bench, &bench) < 0 ||
        gc_functions(g, transport, transport_names, transport_fns, 2) < 0 ||
        gc_functions(g, bench, bench_names, bench_fns, 1) < 0)
        return -EIO;
    tf.loaded = 1;
    return 0;
}

/* --- socket i/o with a deadline -------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* 0 when fd is ready for events before deadline, -ETIMEDOUT, -errno */
static int wait_fd(int fd, short events, double deadline)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = events};
        double left = deadline - now_s();
        int rc;

        if (left <= 0.0)
            return -ETIMEDOUT;
        rc = poll(&pfd, 1, (int)(left * 1000.0) + 1);
        if (rc > 0)
            return 0;
        if (rc < 0 && errno != EINTR)
            return -errno;
    }
}

/* 0, -EPIPE at end of file, -ETIMEDOUT, -errno */
static int read_full(int fd, void *buf, size_t len, double deadline)
{
    unsigned char *p = buf;

    while (len > 0) {
        ssize_t n;
        int rc = wait_fd(fd, POLLIN, deadline);

        if (rc < 0)
            return rc;
        n = recv(fd, p, len, 0);
        if (n == 0)
            return -EPIPE;
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len, double deadline)
{
    const unsigned char *p = buf;

    while (len > 0) {
        ssize_t n;
        int rc = wait_fd(fd, POLLOUT, deadline);

        if (rc < 0)
            return rc;
        n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* one line, without its '\n', NUL-terminated; -EMSGSIZE when longer */
static int read_line(int fd, char *buf, size_t cap, double deadline)
{
    for (size_t n = 0; n + 1 < cap; n++) {
        int rc = read_full(fd, buf + n, 1, deadline);

        if (rc < 0)
            return rc;
        if (buf[n] == '\n') {
            buf[n] = '\0';
            return 0;
        }
    }
    return -EMSGSIZE;
}

/* --- the peer's watchdog ---------------------------------------------------- */

/* Kills pid when not stopped within seconds: a kernel that hangs in the
 * parent (sync) cannot keep the peer alive forever, nor the reverse. */
struct watchdog {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    pid_t pid;
    int seconds, stop, fired, running;
};

static void *watchdog_main(void *arg)
{
    struct watchdog *w = arg;
    struct timespec until;

    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += w->seconds;
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        if (pthread_cond_timedwait(&w->cv, &w->mu, &until) == ETIMEDOUT && !w->stop) {
            kill(w->pid, SIGKILL);
            w->fired = 1;
            break;
        }
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static int watchdog_start(struct watchdog *w, pid_t pid, int seconds)
{
    pthread_condattr_t attr;

    memset(w, 0, sizeof(*w));
    w->pid = pid;
    w->seconds = seconds;
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&w->thread, NULL, watchdog_main, w) != 0)
        return -EAGAIN;
    w->running = 1;
    return 0;
}

/* 1 when it fired (the peer was killed) */
static int watchdog_stop(struct watchdog *w)
{
    if (w->running) {
        pthread_mutex_lock(&w->mu);
        w->stop = 1;
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->thread, NULL);
        w->running = 0;
    }
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    return w->fired;
}

/* waitpid until deadline, then SIGKILL; the exit status, or -ETIMEDOUT */
static int reap(pid_t pid, double deadline)
{
    int status;

    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (r < 0 && errno != EINTR)
            return -errno;
        if (now_s() > deadline) {
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            return -ETIMEDOUT;
        }
        usleep(10000);
    }
}

/* --- two processes: the peer (receiver) ------------------------------------- */

/* one decimal or 0x number in [0, max] */
static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    char *end;

    errno = 0;
    *out = strtoull(s, &end, 0);
    return errno || end == s || *end || *out > max || s[0] == '-' ? -EINVAL : 0;
}

static int peer_report(int fd, const char *line)
{
    return write_full(fd, line, strlen(line), now_s() + PEER_TIMEOUT_S);
}

static int peer_fail(int fd, const char *why)
{
    char line[320];
    size_t n;

    fprintf(stderr, "duplex-gpucheck --transport-peer: %s\n", why);
    snprintf(line, sizeof(line) - 1, "error %s", why); /* one line: room for its '\n' */
    for (char *p = line; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    n = strlen(line);
    line[n] = '\n';
    line[n + 1] = '\0';
    if (fd >= 0)
        peer_report(fd, line);
    return 1;
}

/* Receives the plan's stream on a ring it exports; reports what differs. */
static int peer_run(wk_cuda_t *c, int fd, struct plan *p)
{
    struct gc pg = {.c = c};
    struct ck k = {.g = &pg};
    wk_cuda_module mod = NULL;
    wk_cuda_function_t recv_fn = NULL;
    wk_cuda_stream stream = NULL;
    wk_ipcring_t *ring = NULL;
    struct wk_ipcring_desc desc;
    unsigned char wire[WK_IPCRING_DESC_BYTES];
    char line[256], q;
    size_t bad_bytes = 0, bad_lens = 0;
    int bad_channels = 0, first_err = 0, rc = 1;
    const size_t nm = (size_t)p->nmsg;

    if (wk_cuda_module_load(c, dx_kernel_transport_cubin, &mod) < 0 &&
        wk_cuda_module_load(c, dx_kernel_transport_ptx, &mod) < 0) {
        peer_fail(fd, wk_cuda_error(c));
        goto out;
    }
    if (wk_cuda_function(c, mod, "dx_transport_recv", &recv_fn) < 0 ||
        wk_cuda_stream_create(c, &stream) < 0) {
        peer_fail(fd, wk_cuda_error(c));
        goto out;
    }
    if (wk_ipcring_create(c, p->channels, p->slots, p->slot_bytes, &ring) < 0 ||
        wk_ipcring_export(ring, &desc) < 0) {
        peer_fail(fd, wk_cuda_error(c));
        goto out;
    }
    if (wk_ipcring_desc_encode(&desc, wire, sizeof(wire)) != WK_IPCRING_DESC_BYTES ||
        write_full(fd, wire, sizeof(wire), now_s() + PEER_TIMEOUT_S) < 0) {
        peer_fail(-1, "cannot send the ring descriptor");
        goto out;
    }
    {
        unsigned char *want = ck_host(&k, p->bytes), *got = ck_host(&k, p->bytes);
        uint64_t *cap = ck_host(&k, nm * 8), *lens = ck_host(&k, nm * 8);
        int *errs = ck_host(&k, p->channels * sizeof(int));
        wk_cuda_ptr d_dst = ck_dev(&k, p->bytes, NULL), d_off = ck_dev(&k, nm * 8, p->off);
        wk_cuda_ptr d_cap, d_len = ck_dev(&k, nm * 8, NULL);
        wk_cuda_ptr d_err = ck_dev(&k, p->channels * sizeof(int), NULL);

        if (k.rc == 0) {
            plan_fill(p, want);
            memcpy(cap, p->len, nm * 8); /* exact capacities: one byte more is -ENOBUFS */
        }
        d_cap = ck_dev(&k, nm * 8, cap);
        if (k.rc == 0 && (wk_ipcring_launch_recv(ring, recv_fn, stream, p->threads, d_dst, d_off,
                                                 d_cap, p->nmsg, d_len, d_err) < 0 ||
                          wk_cuda_stream_sync(c, stream) < 0))
            ck_fail(&k, wk_cuda_error(c));
        ck_download(&k, got, d_dst, p->bytes);
        ck_download(&k, lens, d_len, nm * 8);
        ck_download(&k, errs, d_err, p->channels * sizeof(int));
        if (k.rc < 0) {
            peer_fail(fd, k.err);
            goto out;
        }
        bad_bytes = count_bad_bytes(got, want, p->bytes);
        for (size_t m = 0; m < nm; m++)
            bad_lens += lens[m] != p->len[m];
        for (uint32_t ch = 0; ch < p->channels; ch++) {
            if (errs[ch] != 0 && !bad_channels++)
                first_err = errs[ch];
        }
    }
    snprintf(line, sizeof(line), "ok %zu %zu %d %d\n", bad_bytes, bad_lens, bad_channels,
             first_err);
    if (peer_report(fd, line) < 0) {
        peer_fail(-1, "cannot send the report");
        goto out;
    }
    /* the sender closes its mapping before the ring may be freed */
    if (read_full(fd, &q, 1, now_s() + PEER_QUIT_TIMEOUT_S) < 0 || q != 'q') {
        peer_fail(-1, "no \"q\" from duplex-gpucheck");
        goto out;
    }
    rc = 0;
out:
    ck_done(&k);
    wk_ipcring_destroy(ring);
    wk_cuda_stream_destroy(c, stream);
    if (mod)
        wk_cuda_module_unload(c, mod);
    return rc;
}

int gc_transport_peer(int argc, char **argv)
{
    struct wk_cuda_paths paths = {.driver_only = 1};
    wk_cuda_t *c = NULL;
    struct plan p = {0};
    uint64_t v[9];
    static const uint64_t max[9] = {1024,
                                    1024,
                                    PLAN_LARGE,
                                    DX_TREF_MAX_CHANNELS,
                                    1u << 30,
                                    1u << 30,
                                    WK_IPCRING_MAX_THREADS,
                                    1u << 24,
                                    UINT64_MAX};
    char err[1024];
    int fd, rc = 2;

    if (argc != 12) {
        fprintf(stderr, "usage: duplex-gpucheck --transport-peer FD DEVICE KIND CHANNELS SLOTS "
                        "SLOT_BYTES THREADS NMSG SEED CUDA_LIB\n");
        return 2;
    }
    if (strcmp(argv[11], "-") != 0)
        paths.cuda = argv[11];
    for (int i = 0; i < 9; i++) {
        if (parse_u64(argv[2 + i], max[i], &v[i]) < 0) {
            fprintf(stderr, "duplex-gpucheck --transport-peer: bad argument %d \"%s\"\n", i + 1,
                    argv[2 + i]);
            return 2;
        }
    }
    fd = (int)v[0];
    p.kind = (int)v[2];
    p.channels = (uint32_t)v[3];
    p.slots = (uint32_t)v[4];
    p.slot_bytes = (uint32_t)v[5];
    p.threads = (unsigned)v[6];
    p.nmsg = (int)v[7];
    p.seed = v[8];
    if (plan_make(&p) < 0)
        return peer_fail(fd, "bad ring shape or message count");
    if (wk_cuda_open(&paths, &c, err, sizeof(err)) < 0) {
        peer_fail(fd, err);
        goto out;
    }
    if (wk_cuda_context(c, (int)v[1]) < 0) {
        peer_fail(fd, wk_cuda_error(c));
        goto out;
    }
    rc = peer_run(c, fd, &p);
out:
    if (c)
        wk_cuda_close(c);
    plan_free(&p);
    close(fd);
    return rc;
}

/* --- two processes: the parent (sender) ------------------------------------- */

/* fork + exec of the peer on the socket child_fd; -errno */
static pid_t spawn_peer(struct gc *g, const struct plan *p, int child_fd, int parent_fd)
{
    char a[9][32];
    char *argv[13];
    const pid_t parent = getpid();
    const int has_slash = strchr(g->self, '/') != NULL;
    pid_t pid;

    snprintf(a[0], sizeof(a[0]), "%d", child_fd);
    snprintf(a[1], sizeof(a[1]), "%d", g->device);
    snprintf(a[2], sizeof(a[2]), "%d", p->kind);
    snprintf(a[3], sizeof(a[3]), "%" PRIu32, p->channels);
    snprintf(a[4], sizeof(a[4]), "%" PRIu32, p->slots);
    snprintf(a[5], sizeof(a[5]), "%" PRIu32, p->slot_bytes);
    snprintf(a[6], sizeof(a[6]), "%u", p->threads);
    snprintf(a[7], sizeof(a[7]), "%d", p->nmsg);
    snprintf(a[8], sizeof(a[8]), "0x%" PRIx64, p->seed);
    argv[0] = (char *)g->self;
    argv[1] = "--transport-peer";
    for (int i = 0; i < 9; i++)
        argv[2 + i] = a[i];
    argv[11] = (char *)(g->cuda_lib ? g->cuda_lib : "-");
    argv[12] = NULL;
    fflush(NULL);
    pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        /* the child: async-signal-safe calls only until exec */
        static const char msg[] = "duplex-gpucheck: cannot exec the transport peer\n";

        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        close(parent_fd);
        if (fcntl(child_fd, F_SETFD, 0) < 0)
            _exit(127);
        if (has_slash)
            execv(argv[0], argv);
        else
            execvp(argv[0], argv);
        execv("/proc/self/exe", argv); /* argv[0] not found: this very program */
        if (write(2, msg, sizeof(msg) - 1) < 0)
            _exit(127);
        _exit(127);
    }
    return pid;
}

/* the sender's side of one run: import, send, time; 0 or -errno (why) */
static int send_stream(struct gc *g, struct ck *k, const struct plan *p, int fd, double deadline,
                       double *ms, char *why, size_t whylen)
{
    unsigned char wire[WK_IPCRING_DESC_BYTES];
    struct wk_ipcring_desc desc;
    wk_ipcring_t *ring = NULL;
    wk_cuda_stream stream = NULL;
    wk_cuda_event start = NULL, end = NULL;
    const size_t nm = (size_t)p->nmsg;
    unsigned char *src = ck_host(k, p->bytes);
    int *errs = ck_host(k, p->channels * sizeof(int));
    wk_cuda_ptr d_src, d_off = ck_dev(k, nm * 8, p->off), d_len = ck_dev(k, nm * 8, p->len);
    wk_cuda_ptr d_err = ck_dev(k, p->channels * sizeof(int), NULL);
    float t = -1.0f;
    int rc;

    if (k->rc == 0)
        plan_fill(p, src);
    d_src = ck_dev(k, p->bytes, src);
    if (k->rc < 0)
        return -EIO;
    if ((rc = read_full(fd, wire, sizeof(wire), deadline)) < 0) {
        snprintf(why, whylen, "no ring descriptor from the peer: %s",
                 rc == -ETIMEDOUT ? "peer timed out"
                 : rc == -EPIPE   ? "it exited"
                                  : strerror(-rc));
        return rc;
    }
    if ((rc = wk_ipcring_desc_decode(wire, sizeof(wire), &desc, why, whylen)) < 0)
        return rc;
    if (desc.channels != p->channels || desc.slots != p->slots ||
        desc.slot_bytes != p->slot_bytes) {
        snprintf(why, whylen, "the peer's ring is %" PRIu32 " x %" PRIu32 " x %" PRIu32,
                 desc.channels, desc.slots, desc.slot_bytes);
        return -EPROTO;
    }
    if (wk_ipcring_import(g->c, &desc, &ring) < 0 || wk_cuda_stream_create(g->c, &stream) < 0 ||
        wk_cuda_event_create(g->c, &start) < 0 || wk_cuda_event_create(g->c, &end) < 0 ||
        wk_cuda_event_record_on(g->c, start, stream) < 0 ||
        wk_ipcring_launch_send(ring, tf.send, stream, p->threads, d_src, d_off, d_len, p->nmsg,
                               d_err) < 0 ||
        wk_cuda_event_record_on(g->c, end, stream) < 0 ||
        wk_cuda_event_elapsed(g->c, start, end, &t) < 0 || wk_cuda_stream_sync(g->c, stream) < 0)
        ck_fail(k, wk_cuda_error(g->c));
    ck_download(k, errs, d_err, p->channels * sizeof(int));
    wk_cuda_event_destroy(g->c, start);
    wk_cuda_event_destroy(g->c, end);
    wk_cuda_stream_destroy(g->c, stream);
    wk_ipcring_destroy(ring); /* before the peer frees the ring */
    if (k->rc < 0)
        return -EIO;
    for (uint32_t ch = 0; ch < p->channels; ch++) {
        if (errs[ch] != 0) {
            snprintf(why, whylen, "sender channel %" PRIu32 ": %s", ch, strerror(-errs[ch]));
            return -EPROTO;
        }
    }
    *ms = t;
    return 0;
}

/* the peer's report line: 0 when every byte, length and channel is right */
static int parse_report(struct ck *k, const char *line, char *why, size_t whylen)
{
    size_t bad_bytes, bad_lens;
    int bad_ch, first;

    if (strncmp(line, "error ", 6) == 0) {
        snprintf(why, whylen, "peer: %s", line + 6);
        return -EIO;
    }
    if (sscanf(line, "ok %zu %zu %d %d", &bad_bytes, &bad_lens, &bad_ch, &first) != 4) {
        snprintf(why, whylen, "peer: unreadable report \"%.60s\"", line);
        return -EPROTO;
    }
    if (bad_bytes || bad_lens || bad_ch) {
        k->bad += bad_bytes + bad_lens;
        snprintf(why, whylen,
                 "receiver: %zu bytes differ, %zu lengths differ, %d channels in error (%s)",
                 bad_bytes, bad_lens, bad_ch, bad_ch ? strerror(-first) : "none");
        return -EPROTO;
    }
    return 0;
}

static void check_ipc(struct gc *g, struct plan *p, const char *check, int timed)
{
    struct ck k = {.g = g};
    struct watchdog wd = {0};
    char shape[64], why[320] = "", line[320];
    double ms = -1.0, deadline;
    int sv[2] = {-1, -1}, ok = 0, fired, rc, status;
    pid_t pid = -1;

    snprintf(shape, sizeof(shape), "%d msg %" PRIu32 " ch %" PRIu32 "x%" PRIu32 " B%s", p->nmsg,
             p->channels, p->slots, p->slot_bytes, p->kind == PLAN_LARGE ? " large" : "");
    if (plan_make(p) < 0) {
        ck_fail(&k, "cannot lay out the message stream");
        goto finish;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        snprintf(why, sizeof(why), "socketpair: %s", strerror(errno));
        goto finish;
    }
    if ((pid = spawn_peer(g, p, sv[1], sv[0])) < 0) {
        snprintf(why, sizeof(why), "fork: %s", strerror((int)-pid));
        goto finish;
    }
    close(sv[1]);
    sv[1] = -1;
    deadline = now_s() + PEER_TIMEOUT_S;
    if (watchdog_start(&wd, pid, PEER_TIMEOUT_S) < 0)
        snprintf(why, sizeof(why), "cannot start the watchdog");
    else if (send_stream(g, &k, p, sv[0], deadline, &ms, why, sizeof(why)) == 0) {
        if ((rc = read_line(sv[0], line, sizeof(line), deadline)) < 0)
            snprintf(why, sizeof(why), "no report from the peer: %s",
                     rc == -ETIMEDOUT ? "peer timed out"
                     : rc == -EPIPE   ? "it exited"
                                      : strerror(-rc));
        else
            ok = parse_report(&k, line, why, sizeof(why)) == 0;
    }
    write_full(sv[0], "q", 1, now_s() + 1.0);
    status = reap(pid, now_s() + (ok ? 10.0 : 1.0));
    fired = watchdog_stop(&wd);
    if (fired) {
        snprintf(why, sizeof(why), "peer timed out (killed after %d s)", PEER_TIMEOUT_S);
        ok = 0;
    } else if (ok && status == -ETIMEDOUT) {
        snprintf(why, sizeof(why), "peer did not exit after its report (killed)");
        ok = 0;
    } else if (ok && status != 0) {
        snprintf(why, sizeof(why), "peer exited with status %d", status);
        ok = 0;
    }
finish:
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    if (!ok && k.rc == 0 && !why[0])
        snprintf(why, sizeof(why), "failed");
    ck_finish(&k, check, shape, ok, why, ms, timed ? gc_gbs((double)p->payload, ms) : -1.0);
    ck_done(&k);
    plan_free(p);
}

/* --- the overlap benchmark -------------------------------------------------- */

/* the default compute: dx_bench_fma on blocks SMs */
struct fma_arg {
    struct gc *g;
    unsigned blocks;
    wk_cuda_ptr out;
};

/* reps: the chains' iterations */
static int fma_compute(void *arg, wk_cuda_stream s, int reps)
{
    struct fma_arg *a = arg;
    const unsigned grid[3] = {a->blocks, 1, 1}, block[3] = {FMA_THREADS, 1, 1};
    float fa = 0.999f, fb = 0.001f;
    void *args[] = {&a->out, &reps, &fa, &fb};

    return wk_cuda_launch_on(a->g->c, s, tf.fma, grid, block, 0, args);
}

struct overlap {
    struct gc *g;
    struct ck *k;
    wk_ipcring_t *ring;
    struct plan *p;
    wk_cuda_stream ss, sr, sc; /* send, receive, compute */
    wk_cuda_event ev[5];
    wk_cuda_ptr src, dst, off, len, cap, rlen, serr, rerr;
    int (*compute)(void *, wk_cuda_stream, int);
    void *arg;
    int reps;      /* the compute's repeat count, calibrated to the transport's time */
    void *host[5]; /* overlap_verify's downloads */
};

/* One timed round on the streams: transport and/or compute; ms of the
 * whole round. */
static double overlap_round(struct overlap *o, int transport, int compute)
{
    wk_cuda_t *c = o->g->c;
    float ms = -1.0f;
    char why[256];
    int rc;

    if (o->k->rc < 0)
        return -1.0;
    if (wk_cuda_event_record_on(c, o->ev[0], o->ss) < 0 ||
        wk_cuda_stream_wait(c, o->sr, o->ev[0]) < 0 || wk_cuda_stream_wait(c, o->sc, o->ev[0]) < 0)
        goto fail;
    if (transport &&
        (wk_ipcring_launch_send(o->ring, tf.send, o->ss, WK_IPCRING_DEFAULT_THREADS, o->src, o->off,
                                o->len, o->p->nmsg, o->serr) < 0 ||
         wk_ipcring_launch_recv(o->ring, tf.recv, o->sr, WK_IPCRING_DEFAULT_THREADS, o->dst, o->off,
                                o->cap, o->p->nmsg, o->rlen, o->rerr) < 0))
        goto fail;
    if (compute && (rc = o->compute(o->arg, o->sc, o->reps)) < 0) {
        snprintf(why, sizeof(why), "the compute function failed: %s",
                 rc == -EIO ? wk_cuda_error(c) : strerror(-rc));
        ck_fail(o->k, why);
        return -1.0;
    }
    if (wk_cuda_event_record_on(c, o->ev[1], o->sr) < 0 ||
        wk_cuda_event_record_on(c, o->ev[2], o->sc) < 0 ||
        wk_cuda_stream_wait(c, o->ss, o->ev[1]) < 0 ||
        wk_cuda_stream_wait(c, o->ss, o->ev[2]) < 0 ||
        wk_cuda_event_record_on(c, o->ev[3], o->ss) < 0 ||
        wk_cuda_event_elapsed(c, o->ev[0], o->ev[3], &ms) < 0 || wk_cuda_stream_sync(c, o->ss) < 0)
        goto fail;
    return ms;
fail:
    ck_fail(o->k, wk_cuda_error(c));
    return -1.0;
}

/* the transport's results after the rounds: every error 0, every length and
 * byte right (the stream is the same each round) */
static int overlap_verify(struct overlap *o, char *why, size_t whylen)
{
    struct ck *k = o->k;
    const struct plan *p = o->p;
    const size_t nm = (size_t)p->nmsg, eb = p->channels * sizeof(int);
    int *serr, *rerr;
    uint64_t *lens;
    unsigned char *got, *want;

    if (!o->host[0]) { /* once: verify runs after the warm-up and at the end */
        o->host[0] = ck_host(k, eb);
        o->host[1] = ck_host(k, eb);
        o->host[2] = ck_host(k, nm * 8);
        o->host[3] = ck_host(k, p->bytes);
        o->host[4] = ck_host(k, p->bytes);
    }
    serr = o->host[0];
    rerr = o->host[1];
    lens = o->host[2];
    got = o->host[3];
    want = o->host[4];

    ck_download(k, serr, o->serr, eb);
    ck_download(k, rerr, o->rerr, eb);
    ck_download(k, lens, o->rlen, nm * 8);
    ck_download(k, got, o->dst, p->bytes);
    ck_download(k, want, o->src, p->bytes);
    if (k->rc < 0)
        return 0;
    for (uint32_t ch = 0; ch < p->channels; ch++) {
        if (serr[ch] || rerr[ch]) {
            snprintf(why, whylen, "transport channel %" PRIu32 ": send %s, receive %s", ch,
                     strerror(-serr[ch]), strerror(-rerr[ch]));
            return 0;
        }
    }
    for (size_t m = 0; m < nm; m++) {
        if (lens[m] != p->len[m]) {
            snprintf(why, whylen, "transport message %zu: %" PRIu64 " bytes, want %" PRIu64, m,
                     lens[m], p->len[m]);
            return 0;
        }
    }
    if (count_bad_bytes(got, want, p->bytes)) {
        snprintf(why, whylen, "transport: %zu bytes differ", count_bad_bytes(got, want, p->bytes));
        return 0;
    }
    return 1;
}

/* the smaller of two times, ignoring a failed (negative) one */
static double best_ms(double a, double b)
{
    return a < 0.0 ? b : b < 0.0 ? a : a < b ? a : b;
}

void gc_overlap(struct gc *g, const char *what, int (*compute)(void *, wk_cuda_stream, int),
                void *arg, int calibrate_reps)
{
    struct ck k = {.g = g};
    struct plan p = {.kind = PLAN_LARGE,
                     .nmsg = g->small ? 2048 : 16384,
                     .channels = OVERLAP_CHANNELS,
                     .slots = 16,
                     .slot_bytes = 32768,
                     .threads = WK_IPCRING_DEFAULT_THREADS,
                     .seed = gc_u64(g)};
    struct overlap o = {
        .g = g, .k = &k, .p = &p, .compute = compute, .arg = arg, .reps = calibrate_reps};
    double alone_t = -1.0, alone_c = -1.0, both = -1.0, ratio = -1.0;
    char why[320] = "", res[96], shape[64];
    int ok = 0;

    snprintf(shape, sizeof(shape), "%.40s + transport %d ch", what, OVERLAP_CHANNELS);
    if (load_kernels(g) < 0 || plan_make(&p) < 0) {
        ck_fail(&k, "the transport kernels or the stream cannot be set up");
        goto finish;
    }
    {
        unsigned char *src = ck_host(&k, p.bytes);

        if (k.rc == 0)
            plan_fill(&p, src);
        o.src = ck_dev(&k, p.bytes, src);
        o.dst = ck_dev(&k, p.bytes, NULL);
        o.off = ck_dev(&k, (size_t)p.nmsg * 8, p.off);
        o.len = ck_dev(&k, (size_t)p.nmsg * 8, p.len);
        o.cap = o.len;
        o.rlen = ck_dev(&k, (size_t)p.nmsg * 8, NULL);
        o.serr = ck_dev(&k, p.channels * sizeof(int), NULL);
        o.rerr = ck_dev(&k, p.channels * sizeof(int), NULL);
    }
    if (k.rc == 0 &&
        (wk_ipcring_create(g->c, p.channels, p.slots, p.slot_bytes, &o.ring) < 0 ||
         wk_cuda_stream_create(g->c, &o.ss) < 0 || wk_cuda_stream_create(g->c, &o.sr) < 0 ||
         wk_cuda_stream_create(g->c, &o.sc) < 0))
        ck_fail(&k, wk_cuda_error(g->c));
    for (int i = 0; i < 5 && k.rc == 0; i++)
        if (wk_cuda_event_create(g->c, &o.ev[i]) < 0)
            ck_fail(&k, wk_cuda_error(g->c));
    /* warm up (and calibrate the default compute to the transport's time) */
    alone_t = overlap_round(&o, 1, 0);
    if (k.rc == 0 && !overlap_verify(&o, why, sizeof(why)))
        alone_t = -1.0;  /* a broken transport: no rounds of 70 s timeouts */
    if (alone_t > 0.0) { /* the compute as long as the transport: the hardest case */
        double per = overlap_round(&o, 0, 1) / calibrate_reps;

        if (per > 0.0) {
            double reps = alone_t / per;
            o.reps = reps < 1.0 ? 1 : reps > 1e8 ? 100000000 : (int)(reps + 0.5);
        }
    }
    if (alone_t > 0.0)
        overlap_round(&o, 0, 1);
    alone_t = alone_c = -1.0;
    for (int r = 0; r < OVERLAP_REPS && k.rc == 0 && !why[0]; r++) {
        alone_t = best_ms(alone_t, overlap_round(&o, 1, 0));
        alone_c = best_ms(alone_c, overlap_round(&o, 0, 1));
        both = best_ms(both, overlap_round(&o, 1, 1));
    }
    if (k.rc == 0 && !why[0] && overlap_verify(&o, why, sizeof(why)) && alone_t > 0.0 &&
        alone_c > 0.0 && both > 0.0) {
        ratio = both / (alone_t > alone_c ? alone_t : alone_c);
        ok = ratio <= OVERLAP_BOUND;
        if (!ok)
            snprintf(why, sizeof(why),
                     "together %.3f ms, alone: compute %.3f ms, transport %.3f ms: x%.2f > %.2f",
                     both, alone_c, alone_t, ratio, OVERLAP_BOUND);
    }
finish:
    for (int i = 0; i < 5; i++)
        wk_cuda_event_destroy(g->c, o.ev[i]);
    wk_cuda_stream_destroy(g->c, o.ss);
    wk_cuda_stream_destroy(g->c, o.sr);
    wk_cuda_stream_destroy(g->c, o.sc);
    wk_ipcring_destroy(o.ring);
    if (k.rc < 0) {
        ck_finish(&k, "overlap", shape, 0, why, -1.0, -1.0);
    } else {
        char tshape[64];

        snprintf(tshape, sizeof(tshape), "%d msg %" PRIu32 " ch %" PRIu32 "x%" PRIu32 " B 1 proc",
                 p.nmsg, p.channels, p.slots, p.slot_bytes);
        gc_add_row(g, "transport local", tshape, "-", alone_t, gc_gbs((double)p.payload, alone_t));
        snprintf(shape, sizeof(shape), "%.24s %.3f ms + transport %.3f ms", what, alone_c, alone_t);
        if (ratio > 0.0)
            snprintf(res, sizeof(res), "%s x%.2f (<= %.2f)", ok ? "PASS" : "FAIL", ratio,
                     OVERLAP_BOUND);
        else
            snprintf(res, sizeof(res), "FAIL");
        if (!ok) {
            g->failed++;
            fprintf(stderr, "duplex-gpucheck: overlap %s: %s\n", what, why);
        }
        gc_add_row(g, "overlap", shape, res, ok ? both : -1.0, -1.0);
    }
    ck_done(&k);
    plan_free(&p);
}

/* --- the checks ----------------------------------------------------------- */

void gc_check_transport(struct gc *g)
{
    struct plan runs[] = {
        {.kind = PLAN_MIXED,
         .nmsg = g->small ? 1000 : 4000,
         .channels = DX_TREF_DEFAULT_CHANNELS,
         .slots = 8,
         .slot_bytes = 1024,
         .threads = 512},
        {.kind = PLAN_MIXED,
         .nmsg = g->small ? 300 : 1000,
         .channels = 1,
         .slots = 4,
         .slot_bytes = 256,
         .threads = 32},
        {.kind = PLAN_LARGE,
         .nmsg = g->small ? 1024 : 8192,
         .channels = DX_TREF_DEFAULT_CHANNELS,
         .slots = 16,
         .slot_bytes = 32768,
         .threads = 512},
    };
    struct fma_arg fa = {.g = g};
    struct ck k = {.g = g};

    if (load_kernels(g) < 0) {
        gc_add_row(g, "transport", "modules", "FAIL (CUDA)", -1.0, -1.0);
        g->failed++;
        return;
    }
    for (size_t i = 0; i < sizeof(runs) / sizeof(runs[0]); i++) {
        runs[i].seed = gc_u64(g);
        check_ipc(g, &runs[i], runs[i].kind == PLAN_LARGE ? "transport ipc GB/s" : "transport ipc",
                  runs[i].kind == PLAN_LARGE);
    }
    if (g->sms < 2 * OVERLAP_CHANNELS + 8) {
        gc_add_row(g, "overlap", "dx_bench_fma", "SKIP (too few SMs)", -1.0, -1.0);
        return;
    }
    fa.blocks = g->sms - 2 * OVERLAP_CHANNELS;
    fa.out = ck_dev(&k, (size_t)fa.blocks * FMA_THREADS * sizeof(float), NULL);
    if (k.rc < 0) {
        ck_finish(&k, "overlap", "dx_bench_fma", 0, k.err, -1.0, -1.0);
        ck_done(&k);
        return;
    }
    gc_overlap(g, "dx_bench_fma", fma_compute, &fa, FMA_CALIBRATE_ITERS);
    ck_done(&k);
}
