/* fakenccl.c - NCCL's API in libfakecuda.so (pass it as --nccl-lib too),
 * for the tests: communicators of processes on one machine, on the fake
 * driver's streams.
 *
 * A unique id names a rendezvous: a shared-memory file
 * /dev/shm/dxfakenccl-TOKEN holding one transport ring (kernels/
 * transport_ref.h, the protocol of the real intra-node transport) per
 * ordered pair of ranks. The first rank to arrive creates and lays it out;
 * ncclCommInitRank returns once every rank has mapped it, and the last one
 * to map it unlinks the name. Operations are queued on the caller's stream
 * (fake_stream_host) and run by its thread, so they are ordered with the
 * stream's launches like NCCL's kernels:
 *  - a group (ncclGroupStart .. End, or one call) runs its sends and
 *    receives together, each pair of ranks FIFO in call order, in chunks
 *    that fit the ring, so no order of sends and receives deadlocks;
 *  - all-reduce sends the whole buffer to every other rank and sums the
 *    ranks' buffers in rank order 0, 1, ... on every rank: deterministic and
 *    bitwise the same everywhere (NCCL's ring order differs: results agree
 *    to rounding);
 *  - ncclCommSplit exchanges (color, key) on the parent's rings from the
 *    calling thread (call it with no operation in flight, as at setup);
 *  - as NCCL, two ranks connect at their first send/receive with each
 *    other, and that call waits for the peer's side (ncclGroupEnd blocks,
 *    or says ncclInProgress on a non-blocking communicator);
 *  - ncclCommInitRankConfig with blocking 0 joins on a thread of its own
 *    (ncclInProgress meanwhile); FAKE_NCCL_STALL_ONCE=PATH makes the first
 *    rank to create PATH never join (until aborted).
 * A rank that waits more than FAKE_NCCL_TIMEOUT_MS (or the environment's
 * FAKE_NCCL_TIMEOUT_MS) for a peer fails the
 * operation (ncclSystemError as the communicator's async error, and a fault
 * on the stream); ncclCommAbort makes waiting operations give up at once
 * (the communicator's memory is kept: a thread may still be in a call). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kernels/transport_ref.h"
#include "tests/fake/fakecuda.h"

#define API __attribute__((visibility("default")))

#define FAKE_NCCL_TIMEOUT_MS 60000
#define FAKE_NCCL_SLOTS 16
#define FAKE_NCCL_SLOT_BYTES 16384
#define FAKE_NCCL_MAGIC 0x6c63636e6b616664ull /* "dfakencl" */
#define FAKE_NCCL_HDR_BYTES 4096              /* struct shm_hdr, padded */
#define FAKE_NCCL_MAX_RANKS 256

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
} ncclResult_t;

/* the head of ncclConfig_t, as every NCCL since 2.14 lays it out */
struct fake_config {
    size_t size;
    unsigned int magic, version;
    int blocking;
};

typedef struct {
    char internal[128];
} ncclUniqueId;

/* the id's bytes */
struct fake_id {
    uint64_t magic;
    unsigned char token[16];
    unsigned char unused[104];
};

struct shm_hdr {
    uint64_t magic;
    uint32_t nranks, slots, slot_bytes, pad;
    _Atomic uint32_t ready;              /* the creator laid the rings out */
    _Atomic uint32_t attached;           /* ranks that mapped the file */
    int32_t device[FAKE_NCCL_MAX_RANKS]; /* each rank's fake GPU (NCCL: one rank per GPU) */
};
_Static_assert(sizeof(struct shm_hdr) <= FAKE_NCCL_HDR_BYTES, "the header outgrew its page");

struct comm {
    int rank, nranks;
    unsigned char token[16];
    unsigned char *base;
    size_t map_bytes, ring_bytes;
    atomic_int aborted;
    atomic_int async_err;
    int nonblocking;     /* made with a non-blocking config (or split from such) */
    unsigned char *want; /* [nranks][2]: this rank's first send (1) / receive (0) with a peer */
    unsigned splits;     /* ncclCommSplit calls so far: each child's rendezvous differs */
    char last_error[256];
};

typedef struct comm *ncclComm_t;

enum op_kind { OP_SEND, OP_RECV, OP_ALLREDUCE };

struct op {
    enum op_kind kind;
    struct comm *comm;
    const void *sbuf;
    void *rbuf;
    size_t count, bytes;
    int dtype, redop, peer;
};

struct group {
    struct op *ops;
    int n, cap;
    void *stream;
    int streams; /* 2: ops on more than one stream (refused) */
};

static __thread int tl_depth;
static __thread struct group *tl_group;

/* FAKE_NCCL_TIMEOUT_MS from the environment, for tests of the failure path */
static int timeout_ms(void)
{
    const char *v = getenv("FAKE_NCCL_TIMEOUT_MS");
    int ms = v ? atoi(v) : 0;

    return ms > 0 ? ms : FAKE_NCCL_TIMEOUT_MS;
}

static double now_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static size_t dtype_size(int t)
{
    switch (t) {
    case 0: /* ncclInt8 */
    case 1: /* ncclUint8 */
        return 1;
    case 6: /* ncclFloat16 */
    case 9: /* ncclBfloat16 */
        return 2;
    case 2: /* ncclInt32 */
    case 3: /* ncclUint32 */
    case 7: /* ncclFloat32 */
        return 4;
    case 4: /* ncclInt64 */
    case 5: /* ncclUint64 */
    case 8: /* ncclFloat64 */
        return 8;
    default:
        return 0;
    }
}

static unsigned char *ring_of(const struct comm *c, int src, int dst)
{
    return c->base + FAKE_NCCL_HDR_BYTES + ((size_t)src * c->nranks + dst) * c->ring_bytes;
}

/* --- connections, as NCCL makes them lazily --------------------------------
 * NCCL connects two ranks of a communicator at their first send/receive
 * with each other, and that first call does not return (or, non-blocking,
 * stays "in progress") until the peer made its side: each pair (src, dst)
 * has a flag per side in the shared file, after the rings. */
static _Atomic unsigned char *conn_flag(const struct comm *c, int src, int dst, int sender)
{
    unsigned char *flags =
        c->base + FAKE_NCCL_HDR_BYTES + (size_t)c->nranks * c->nranks * c->ring_bytes;

    return (_Atomic unsigned char *)(flags + ((size_t)src * c->nranks + dst) * 2 + sender);
}

/* This rank's side of its connection with peer (send: this rank sends). */
static void connect_begin(struct comm *c, int peer, int send)
{
    if (peer == c->rank || c->want[peer * 2 + send])
        return;
    c->want[peer * 2 + send] = 1;
    if (send)
        atomic_store(conn_flag(c, c->rank, peer, 1), 1);
    else
        atomic_store(conn_flag(c, peer, c->rank, 0), 1);
}

/* Every connection this rank began has its peer's side too. */
static int connect_done(const struct comm *c)
{
    for (int p = 0; p < c->nranks; p++) {
        if (c->want[p * 2 + 1] && !atomic_load(conn_flag(c, c->rank, p, 0)))
            return 0;
        if (c->want[p * 2] && !atomic_load(conn_flag(c, p, c->rank, 1)))
            return 0;
    }
    return 1;
}

/* --- ids and communicators -------------------------------------------------------- */

API ncclResult_t ncclGetVersion(int *version)
{
    if (!version)
        return ncclInvalidArgument;
    *version = 22700;
    return ncclSuccess;
}

API const char *ncclGetErrorString(ncclResult_t rc)
{
    switch (rc) {
    case ncclSuccess:
        return "no error";
    case ncclUnhandledCudaError:
        return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError:
        return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError:
        return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument:
        return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage:
        return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError:
        return "remote process exited or there was a network error";
    default:
        return "unknown result code";
    }
}

API const char *ncclGetLastError(ncclComm_t comm)
{
    return comm ? comm->last_error : "";
}

API ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
    struct fake_id f = {.magic = FAKE_NCCL_MAGIC};

    if (!id)
        return ncclInvalidArgument;
    if (getrandom(f.token, sizeof(f.token), 0) != (ssize_t)sizeof(f.token))
        return ncclSystemError;
    memcpy(id->internal, &f, sizeof(f));
    return ncclSuccess;
}

static void shm_name(const unsigned char token[16], char *buf, size_t len)
{
    int n = snprintf(buf, len, "/dev/shm/dxfakenccl-");

    for (int i = 0; i < 16 && (size_t)n + 3 < len; i++)
        n += snprintf(buf + n, len - (size_t)n, "%02x", token[i]);
}

/* Maps the rendezvous of token for nranks, creating it when first. */
static ncclResult_t attach(struct comm *c)
{
    char path[96];
    size_t ring = dx_tref_ring_size(1, FAKE_NCCL_SLOTS, FAKE_NCCL_SLOT_BYTES);
    size_t bytes = FAKE_NCCL_HDR_BYTES + (size_t)c->nranks * c->nranks * (ring + 2);
    double deadline = now_ms() + timeout_ms();
    struct shm_hdr *h;
    int fd, creator = 0;
    unsigned tries = 0;
    struct stat st;

    shm_name(c->token, path, sizeof(path));
    if ((fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) >= 0) {
        creator = 1;
        if (ftruncate(fd, (off_t)bytes) < 0) {
            close(fd);
            unlink(path);
            return ncclSystemError;
        }
    } else {
        /* another rank creates it: wait for its full size */
        for (;;) {
            if ((fd = open(path, O_RDWR | O_CLOEXEC)) >= 0 && fstat(fd, &st) == 0 &&
                (size_t)st.st_size == bytes)
                break;
            if (fd >= 0 && fstat(fd, &st) == 0 && (size_t)st.st_size > bytes) {
                close(fd);
                snprintf(c->last_error, sizeof(c->last_error),
                         "the unique id is in use by a communicator of another size");
                return ncclInvalidUsage;
            }
            if (fd >= 0)
                close(fd);
            if (now_ms() > deadline || atomic_load(&c->aborted))
                return ncclSystemError;
            fake_backoff(&tries);
        }
    }
    c->base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (c->base == MAP_FAILED) {
        c->base = NULL;
        return ncclSystemError;
    }
    c->map_bytes = bytes;
    c->ring_bytes = ring;
    h = (struct shm_hdr *)c->base;
    if (creator) {
        for (int s = 0; s < c->nranks; s++)
            for (int d = 0; d < c->nranks; d++)
                dx_tref_ring_init(ring_of(c, s, d), ring, 1, FAKE_NCCL_SLOTS, FAKE_NCCL_SLOT_BYTES);
        h->magic = FAKE_NCCL_MAGIC;
        h->nranks = (uint32_t)c->nranks;
        h->slots = FAKE_NCCL_SLOTS;
        h->slot_bytes = FAKE_NCCL_SLOT_BYTES;
        atomic_store_explicit(&h->ready, 1, memory_order_release);
    }
    tries = 0;
    while (!atomic_load_explicit(&h->ready, memory_order_acquire)) {
        if (now_ms() > deadline || atomic_load(&c->aborted))
            return ncclSystemError;
        fake_backoff(&tries);
    }
    if (h->nranks != (uint32_t)c->nranks) {
        snprintf(c->last_error, sizeof(c->last_error),
                 "rank %d says %d ranks, the communicator has %u", c->rank, c->nranks, h->nranks);
        return ncclInvalidUsage;
    }
    h->device[c->rank] = fake_current_device();
    if (atomic_fetch_add(&h->attached, 1) + 1 == (uint32_t)c->nranks)
        unlink(path); /* everyone has it mapped */
    tries = 0;
    while (atomic_load(&h->attached) < (uint32_t)c->nranks) {
        if (atomic_load(&c->aborted))
            return ncclSystemError;
        if (now_ms() > deadline) {
            snprintf(c->last_error, sizeof(c->last_error), "only %u of %d ranks joined in %d ms",
                     atomic_load(&h->attached), c->nranks, timeout_ms());
            unlink(path); /* the communicator is dead: leave nothing in /dev/shm */
            return ncclSystemError;
        }
        fake_backoff(&tries);
    }
    /* as NCCL: two ranks of a communicator on one GPU is an error */
    for (int r = 0; r < c->nranks; r++)
        if (r != c->rank && h->device[r] >= 0 && h->device[r] == h->device[c->rank]) {
            snprintf(c->last_error, sizeof(c->last_error),
                     "Duplicate GPU detected: rank %d and rank %d both on CUDA device %d",
                     r < c->rank ? r : c->rank, r < c->rank ? c->rank : r, h->device[r]);
            return ncclInvalidUsage;
        }
    return ncclSuccess;
}

static void comm_free(struct comm *c)
{
    if (c && c->base)
        munmap(c->base, c->map_bytes);
    if (c)
        free(c->want);
    free(c);
}

/* A communicator not yet attached to its rendezvous. */
static ncclResult_t comm_new(struct comm **out, int nranks, const unsigned char token[16], int rank)
{
    struct comm *c;

    *out = NULL;
    if (nranks < 1 || nranks > FAKE_NCCL_MAX_RANKS || rank < 0 || rank >= nranks)
        return ncclInvalidArgument;
    if (!(c = calloc(1, sizeof(*c))) || !(c->want = calloc((size_t)nranks * 2, 1))) {
        free(c);
        return ncclSystemError;
    }
    c->rank = rank;
    c->nranks = nranks;
    memcpy(c->token, token, 16);
    *out = c;
    return ncclSuccess;
}

static ncclResult_t comm_init(struct comm **out, int nranks, const unsigned char token[16],
                              int rank)
{
    struct comm *c;
    ncclResult_t rc;

    if ((rc = comm_new(&c, nranks, token, rank)) != ncclSuccess)
        return rc;
    if ((rc = attach(c)) != ncclSuccess) {
        comm_free(c);
        return rc;
    }
    *out = c;
    return ncclSuccess;
}

API ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank);

/* A non-blocking join: attach on a thread of its own; the communicator's
 * async error says ncclInProgress until it ends. FAKE_NCCL_STALL_ONCE=PATH:
 * the first rank (of any process) to create PATH never joins, until it is
 * aborted (a rank that never comes, once). */
static void *join_main(void *arg)
{
    struct comm *c = arg;
    const char *stall = getenv("FAKE_NCCL_STALL_ONCE");
    ncclResult_t rc;
    int fd;

    if (stall && stall[0] && (fd = open(stall, O_CREAT | O_EXCL | O_WRONLY, 0600)) >= 0) {
        close(fd);
        while (!atomic_load(&c->aborted))
            usleep(1000);
        rc = ncclSystemError;
    } else {
        rc = attach(c);
    }
    atomic_store(&c->async_err, rc); /* the last touch: the caller may free c now */
    return NULL;
}

API ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank,
                                        struct fake_config *config)
{
    struct fake_id f;
    struct comm *c;
    ncclResult_t rc;
    pthread_t t;

    if (!comm)
        return ncclInvalidArgument;
    if (config &&
        (config->magic != 0xcafebeefu || config->version < 21400 || config->size < sizeof(*config)))
        return ncclInvalidArgument; /* not made as NCCL_CONFIG_INITIALIZER makes it */
    if (!config || config->blocking != 0)
        return ncclCommInitRank(comm, nranks, id, rank);
    memcpy(&f, id.internal, sizeof(f));
    if (f.magic != FAKE_NCCL_MAGIC)
        return ncclInvalidArgument;
    if ((rc = comm_new(&c, nranks, f.token, rank)) != ncclSuccess)
        return rc;
    c->nonblocking = 1;
    atomic_store(&c->async_err, ncclInProgress);
    if (pthread_create(&t, NULL, join_main, c) != 0) {
        free(c);
        return ncclSystemError;
    }
    pthread_detach(t);
    *comm = c;
    return ncclInProgress;
}

API ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank)
{
    struct fake_id f;

    if (!comm)
        return ncclInvalidArgument;
    memcpy(&f, id.internal, sizeof(f));
    if (f.magic != FAKE_NCCL_MAGIC)
        return ncclInvalidArgument; /* not an id of ncclGetUniqueId */
    return comm_init(comm, nranks, f.token, rank);
}

/* Both wait for the operations queued on the communicator (aborted ones
 * give up at once) before freeing it. */
API ncclResult_t ncclCommDestroy(ncclComm_t comm)
{
    if (!comm)
        return ncclInvalidArgument;
    fake_sync_all();
    comm_free(comm);
    return ncclSuccess;
}

/* Aborted communicators stay allocated (and reachable) until the process
 * ends: another thread may still be inside a call on one, which is why it
 * was aborted; their operations see the flag and end. */
static struct comm *graveyard[FAKE_NCCL_MAX_RANKS];
static atomic_int buried;

API ncclResult_t ncclCommAbort(ncclComm_t comm)
{
    int at;

    if (!comm)
        return ncclInvalidArgument;
    atomic_store(&comm->aborted, 1);
    at = atomic_fetch_add(&buried, 1);
    if (at < FAKE_NCCL_MAX_RANKS)
        graveyard[at] = comm;
    return ncclSuccess;
}

API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *err)
{
    if (!comm || !err)
        return ncclInvalidArgument;
    *err = (ncclResult_t)atomic_load(&comm->async_err);
    if (*err == ncclSuccess && comm->base && !connect_done(comm))
        *err = ncclInProgress; /* a first send/receive waits for its peer */
    return ncclSuccess;
}

API ncclResult_t ncclCommCount(const ncclComm_t comm, int *count)
{
    if (!comm || !count)
        return ncclInvalidArgument;
    *count = comm->nranks;
    return ncclSuccess;
}

API ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank)
{
    if (!comm || !rank)
        return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}

/* --- running a group ------------------------------------------------------------------ */

/* One direction of transfer: bytes of buf to or from a peer, in chunks. */
struct xfer {
    struct comm *comm;
    int send, peer;
    unsigned char *buf;
    size_t bytes, off;
    int done;
};

static ncclResult_t xfer_step(struct xfer *x, int *progressed)
{
    const size_t cap = FAKE_NCCL_SLOTS * FAKE_NCCL_SLOT_BYTES - DX_TREF_MSG_HDR;
    struct comm *c = x->comm;
    size_t len = x->bytes - x->off < cap ? x->bytes - x->off : cap, got = 0;
    int rc;

    if (x->send)
        rc = dx_tref_try_send(ring_of(c, c->rank, x->peer), 0, x->buf + x->off, len);
    else
        rc = dx_tref_try_recv(ring_of(c, x->peer, c->rank), 0, x->buf + x->off, x->bytes - x->off,
                              &got);
    if (rc == -EAGAIN)
        return ncclSuccess;
    if (rc < 0) {
        snprintf(c->last_error, sizeof(c->last_error), "%s rank %d: %s (%zu of %zu bytes)",
                 x->send ? "send to" : "receive from", x->peer, strerror(-rc), x->off, x->bytes);
        return ncclInternalError;
    }
    x->off += x->send ? len : got;
    x->done = x->off == x->bytes;
    *progressed = 1;
    return ncclSuccess;
}

/* Runs the transfers; x[i] may move only once every earlier transfer of
 * its (comm, peer, direction) is done. */
static ncclResult_t run_xfers(struct xfer *x, int n)
{
    double deadline = now_ms() + timeout_ms();
    unsigned tries = 0;
    int left = 0;

    for (int i = 0; i < n; i++) {
        x[i].done = x[i].bytes == 0;
        left += !x[i].done;
    }
    while (left > 0) {
        int progressed = 0;

        for (int i = 0; i < n; i++) {
            int blocked = 0;
            ncclResult_t rc;

            if (x[i].done)
                continue;
            if (atomic_load(&x[i].comm->aborted))
                return ncclRemoteError;
            for (int j = 0; j < i && !blocked; j++)
                blocked = !x[j].done && x[j].comm == x[i].comm && x[j].peer == x[i].peer &&
                          x[j].send == x[i].send;
            if (blocked)
                continue;
            if ((rc = xfer_step(&x[i], &progressed)) != ncclSuccess)
                return rc;
            left -= x[i].done;
        }
        if (progressed) {
            deadline = now_ms() + timeout_ms();
            tries = 0;
        } else if (now_ms() > deadline) {
            for (int i = 0; i < n; i++)
                if (!x[i].done)
                    snprintf(x[i].comm->last_error, sizeof(x[i].comm->last_error),
                             "no progress in %d ms: %s rank %d at %zu of %zu bytes", timeout_ms(),
                             x[i].send ? "send to" : "receive from", x[i].peer, x[i].off,
                             x[i].bytes);
            return ncclSystemError;
        } else {
            fake_backoff(&tries);
        }
    }
    return ncclSuccess;
}

static void reduce(void *acc, const void *v, size_t count, int dtype, int redop)
{
    for (size_t i = 0; i < count; i++) {
        switch (dtype) {
        case 7: { /* float32 */
            float *a = (float *)acc + i, b = ((const float *)v)[i];
            *a = redop == 0 ? *a + b : redop == 2 ? (*a > b ? *a : b) : (*a < b ? *a : b);
            break;
        }
        case 8: { /* float64 */
            double *a = (double *)acc + i, b = ((const double *)v)[i];
            *a = redop == 0 ? *a + b : redop == 2 ? (*a > b ? *a : b) : (*a < b ? *a : b);
            break;
        }
        case 4: { /* int64 */
            int64_t *a = (int64_t *)acc + i, b = ((const int64_t *)v)[i];
            *a = redop == 0 ? *a + b : redop == 2 ? (*a > b ? *a : b) : (*a < b ? *a : b);
            break;
        }
        default: { /* int32 */
            int32_t *a = (int32_t *)acc + i, b = ((const int32_t *)v)[i];
            *a = redop == 0 ? *a + b : redop == 2 ? (*a > b ? *a : b) : (*a < b ? *a : b);
            break;
        }
        }
    }
}

static int group_run(void *arg)
{
    struct group *g = arg;
    struct xfer *x = NULL;
    unsigned char **tmp = NULL;
    int nx = 0, nt = 0, cap = 0;
    ncclResult_t rc = ncclSuccess;

    for (int i = 0; i < g->n; i++)
        cap += g->ops[i].kind == OP_ALLREDUCE ? 2 * g->ops[i].comm->nranks : 1;
    if (!(x = calloc((size_t)cap + 1, sizeof(*x))) ||
        !(tmp = calloc((size_t)cap + 1, sizeof(*tmp)))) {
        rc = ncclSystemError;
        goto done;
    }
    for (int i = 0; i < g->n; i++) {
        struct op *o = &g->ops[i];

        if (o->kind != OP_ALLREDUCE) {
            x[nx++] =
                (struct xfer){o->comm,  o->kind == OP_SEND,
                              o->peer,  o->kind == OP_SEND ? (unsigned char *)o->sbuf : o->rbuf,
                              o->bytes, 0,
                              0};
            continue;
        }
        for (int p = 0; p < o->comm->nranks; p++) {
            if (p == o->comm->rank)
                continue;
            if (!(tmp[nt] = calloc(1, o->bytes ? o->bytes : 1))) {
                rc = ncclSystemError;
                goto done;
            }
            x[nx++] = (struct xfer){o->comm, 1, p, (unsigned char *)o->sbuf, o->bytes, 0, 0};
            x[nx++] = (struct xfer){o->comm, 0, p, tmp[nt++], o->bytes, 0, 0};
        }
    }
    if ((rc = run_xfers(x, nx)) != ncclSuccess)
        goto done;
    /* the all-reduces: every rank sums the ranks' buffers in rank order */
    for (int i = 0, t = 0; i < g->n; i++) {
        struct op *o = &g->ops[i];
        unsigned char *acc;

        if (o->kind != OP_ALLREDUCE)
            continue;
        if (!(acc = calloc(1, o->bytes ? o->bytes : 1))) {
            rc = ncclSystemError;
            goto done;
        }
        for (int p = 0; p < o->comm->nranks; p++) {
            const void *v = p == o->comm->rank ? o->sbuf : tmp[t + (p < o->comm->rank ? p : p - 1)];

            if (!v || t + o->comm->nranks - 1 > nt) {
                free(acc);
                rc = ncclInternalError;
                goto done;
            }
            if (p == 0)
                memcpy(acc, v, o->bytes);
            else
                reduce(acc, v, o->count, o->dtype, o->redop);
        }
        memcpy(o->rbuf, acc, o->bytes);
        free(acc);
        t += o->comm->nranks - 1;
    }
done:
    if (rc != ncclSuccess)
        for (int i = 0; i < g->n; i++)
            atomic_store(&g->ops[i].comm->async_err, (int)rc);
    for (int i = 0; i < nt; i++)
        free(tmp[i]);
    free(tmp);
    free(x);
    free(g->ops);
    free(g);
    /* an abort ends the operations without faulting the stream (as NCCL's
     * kernels exit); other failures fault it, as a kernel would */
    return rc != ncclSuccess && rc != ncclRemoteError;
}

/* --- the group calls ------------------------------------------------------------------- */

API ncclResult_t ncclGroupStart(void)
{
    if (tl_depth++ == 0) {
        if (!(tl_group = calloc(1, sizeof(*tl_group)))) {
            tl_depth--;
            return ncclSystemError;
        }
    }
    return ncclSuccess;
}

/* A group's first sends and receives connect (see connect_begin): on a
 * blocking communicator ncclGroupEnd waits for the peers' sides, on a
 * non-blocking one it says ncclInProgress until they come. Then the group
 * is queued on its stream. */
static ncclResult_t group_connect_and_run(struct group *g)
{
    double deadline = now_ms() + timeout_ms();
    int pending = 0;

    for (int i = 0; i < g->n; i++)
        if (g->ops[i].kind != OP_ALLREDUCE)
            connect_begin(g->ops[i].comm, g->ops[i].peer, g->ops[i].kind == OP_SEND);
    for (int i = 0; i < g->n; i++) {
        struct comm *c = g->ops[i].comm;
        unsigned tries = 0;

        while (!c->nonblocking && !connect_done(c)) {
            if (atomic_load(&c->aborted) || now_ms() > deadline) {
                snprintf(c->last_error, sizeof(c->last_error),
                         "a first send/receive: the peer never made its side");
                free(g->ops);
                free(g);
                return ncclSystemError;
            }
            fake_backoff(&tries);
        }
        pending |= c->nonblocking && !connect_done(c);
    }
    if (fake_stream_host(g->stream, group_run, g) < 0) {
        free(g->ops);
        free(g);
        return ncclSystemError;
    }
    return pending ? ncclInProgress : ncclSuccess;
}

API ncclResult_t ncclGroupEnd(void)
{
    struct group *g;

    if (tl_depth == 0)
        return ncclInvalidUsage;
    if (--tl_depth > 0)
        return ncclSuccess;
    g = tl_group;
    tl_group = NULL;
    if (g->n == 0 || g->streams > 1) {
        ncclResult_t rc = g->n == 0 ? ncclSuccess : ncclInvalidUsage;

        free(g->ops);
        free(g);
        return rc; /* the fake runs a group on one stream only */
    }
    return group_connect_and_run(g);
}

static ncclResult_t add_op(const struct op *o, void *stream)
{
    ncclResult_t rc;
    struct group *g;

    if (!o->comm || (o->count && !o->rbuf && o->kind != OP_SEND) ||
        (o->count && !o->sbuf && o->kind != OP_RECV) || dtype_size(o->dtype) == 0)
        return ncclInvalidArgument;
    if (o->kind != OP_ALLREDUCE && (o->peer < 0 || o->peer >= o->comm->nranks))
        return ncclInvalidArgument;
    if ((rc = ncclGroupStart()) != ncclSuccess)
        return rc;
    g = tl_group;
    if (g->n == g->cap) {
        int cap = g->cap ? 2 * g->cap : 8;
        struct op *ops = realloc(g->ops, (size_t)cap * sizeof(*ops));

        if (!ops) {
            ncclGroupEnd();
            return ncclSystemError;
        }
        g->ops = ops;
        g->cap = cap;
    }
    if (g->n == 0)
        g->stream = stream, g->streams = 1;
    else if (g->stream != stream)
        g->streams = 2;
    g->ops[g->n++] = *o;
    return ncclGroupEnd();
}

API ncclResult_t ncclSend(const void *buf, size_t count, int dtype, int peer, ncclComm_t comm,
                          void *stream)
{
    const struct op o = {OP_SEND, comm, buf, NULL, count, count * dtype_size(dtype),
                         dtype,   0,    peer};

    return add_op(&o, stream);
}

API ncclResult_t ncclRecv(void *buf, size_t count, int dtype, int peer, ncclComm_t comm,
                          void *stream)
{
    const struct op o = {OP_RECV, comm, NULL, buf, count, count * dtype_size(dtype),
                         dtype,   0,    peer};

    return add_op(&o, stream);
}

API ncclResult_t ncclAllReduce(const void *sbuf, void *rbuf, size_t count, int dtype, int redop,
                               ncclComm_t comm, void *stream)
{
    const struct op o = {OP_ALLREDUCE, comm,  sbuf, rbuf, count, count * dtype_size(dtype),
                         dtype,        redop, 0};

    if (redop != 0 && redop != 2 && redop != 3) /* sum, max, min */
        return ncclInvalidArgument;
    if (dtype != 2 && dtype != 4 && dtype != 7 && dtype != 8)
        return ncclInvalidArgument;
    return add_op(&o, stream);
}

/* (color, key) of every rank, on the parent's rings, from this thread. */
API ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm,
                               void *config)
{
    int32_t mine[2] = {color, key}, *all;
    struct xfer *x;
    int nx = 0, n, rank = 0, members = 0;
    unsigned char token[16];
    ncclResult_t rc;

    (void)config;
    if (!comm || !newcomm)
        return ncclInvalidArgument;
    *newcomm = NULL;
    n = comm->nranks;
    all = calloc((size_t)n * 2, sizeof(*all));
    x = calloc((size_t)n * 2, sizeof(*x));
    if (!all || !x) {
        free(all);
        free(x);
        return ncclSystemError;
    }
    memcpy(all + 2 * comm->rank, mine, sizeof(mine));
    for (int p = 0; p < n; p++) {
        if (p == comm->rank)
            continue;
        x[nx++] = (struct xfer){comm, 1, p, (unsigned char *)mine, sizeof(mine), 0, 0};
        x[nx++] = (struct xfer){comm, 0, p, (unsigned char *)(all + 2 * p), sizeof(mine), 0, 0};
    }
    rc = run_xfers(x, nx);
    free(x);
    comm->splits++;                       /* the same count on every rank: they all take part */
    if (rc != ncclSuccess || color < 0) { /* NCCL_SPLIT_NOCOLOR: no new communicator */
        free(all);
        return rc;
    }
    /* members: same color, ordered by (key, old rank) */
    for (int p = 0; p < n; p++) {
        if (all[2 * p] != color)
            continue;
        members++;
        if (all[2 * p + 1] < key || (all[2 * p + 1] == key && p < comm->rank))
            rank++;
    }
    free(all);
    memcpy(token, comm->token, 16);
    for (int i = 0; i < 4;
         i++) { /* the child's rendezvous: the parent's token, the color, the split */
        token[i] ^= (unsigned char)((uint32_t)color >> (8 * i));
        token[4 + i] ^= (unsigned char)(comm->splits >> (8 * i));
    }
    token[15] ^= 0x5a;
    if ((rc = comm_init(newcomm, members, token, rank)) == ncclSuccess)
        (*newcomm)->nonblocking = comm->nonblocking;
    return rc;
}
