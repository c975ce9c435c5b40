/* plink.c - the cuda backend's pipeline links (plink.h): owns each link's
 * stream, event, NCCL communicator or IPC ring, the pieces' offsets and
 * lengths, and the per-step error records of the IPC transfers. */
#include "worker/cuda/comm/plink.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/cuda/comm/ipcring.h"

#define ERR_MAX 512

enum { SEND_UP, RECV_UP, SEND_DOWN, RECV_DOWN, NLINKS };

struct link {
    enum wk_plink_kind kind;
    int peer, send; /* the neighbour's pp rank; 1 for a send link */
    wk_nccl_t *comm;
    wk_ipcring_t *ring;
    wk_cuda_stream s;
    wk_cuda_event ev; /* send: the producer's work; receive: the transfer */
    wk_cuda_ptr err;  /* IPC: [max_msgs][channels] int, each transfer's outcome */
    wk_cuda_ptr lens; /* IPC receive: [max_msgs][pieces] u64, the lengths received */
    int used;         /* transfers this step */
};

struct wk_plink {
    struct wk_plink_config cfg;
    wk_cuda_t *c;
    struct link link[NLINKS];
    int pieces;
    wk_cuda_ptr off, len;   /* [pieces] u64: where each piece of a message is, and its bytes */
    wk_cuda_ptr warm;       /* [NLINKS] floats: the NCCL links' first transfers */
    wk_cuda_stream abort_s; /* the IPC rings' abort words are set on it */
    char describe[64];
    char err[ERR_MAX];
};

static int fail(wk_plink_t *l, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(wk_plink_t *l, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(l->err, sizeof(l->err), fmt, ap);
    va_end(ap);
    return rc;
}

static int cuda_fail(wk_plink_t *l, int rc)
{
    return fail(l, rc, "GPU: %s", wk_cuda_error(l->c));
}

static const char *kind_name(enum wk_plink_kind k)
{
    return k == WK_PLINK_IPC ? "IPC" : k == WK_PLINK_NCCL ? "NCCL" : "hosts";
}

/* --- NCCL links ------------------------------------------------------------- */

/* The four splits of the world, the same calls in the same order on every
 * rank: up from even, up from odd, down from even, down from odd pairs
 * (r, r + 1); the sender takes key 0 (rank 0 of the pair), the receiver 1.
 * A pair on one node takes no color: its links are IPC. */
static int nccl_split(wk_plink_t *l)
{
    const int p = l->cfg.pp_rank, P = l->cfg.pp;

    for (int split = 0; split < 4; split++) {
        int down = split >= 2, parity = split & 1, color = WK_NCCL_NO_COLOR, key = 0, role = -1;
        wk_nccl_t *out = NULL;
        int rc;

        if ((p & 1) == parity && p + 1 < P) { /* the pair (p, p + 1) */
            color = l->cfg.color_base + p;
            key = down ? 1 : 0;
            role = down ? RECV_UP : SEND_UP;
        } else if (((p - 1) & 1) == parity && p >= 1) { /* the pair (p - 1, p) */
            color = l->cfg.color_base + p - 1;
            key = down ? 0 : 1;
            role = down ? SEND_DOWN : RECV_DOWN;
        }
        if (role >= 0 && l->link[role].kind != WK_PLINK_NCCL)
            color = WK_NCCL_NO_COLOR;
        if ((rc = wk_nccl_split(l->cfg.world, color, key, &out)) < 0)
            return fail(l, rc, "NCCL: splitting the pipeline links: %s",
                        wk_nccl_error(l->cfg.world));
        if (role >= 0)
            l->link[role].comm = out;
    }
    return 0;
}

/* Every NCCL link's first transfer, in one group on every rank. NCCL
 * connects a pair at its first transfer, and that call waits for the
 * peer's: left to the schedule, two neighbours can each wait in a first
 * send for the other's first receive (the fake NCCL connects the same way,
 * and DualPipe's first step did deadlock there). */
static int nccl_connect(wk_plink_t *l)
{
    wk_nccl_t *comms[NLINKS];
    struct wk_nccl_transfer t[NLINKS];
    wk_cuda_stream s = wk_gpu_comm_stream(l->cfg.gpu);
    char why[ERR_MAX];
    size_t n = 0;
    int rc;

    if ((rc = wk_cuda_alloc(l->c, NLINKS * sizeof(float), &l->warm)) < 0 ||
        (rc = wk_cuda_memset(l->c, l->warm, 0, NLINKS * sizeof(float))) < 0)
        return cuda_fail(l, rc);
    for (int i = 0; i < NLINKS; i++) {
        const struct link *k = &l->link[i];

        if (k->kind != WK_PLINK_NCCL)
            continue;
        comms[n] = k->comm;
        /* a pair's sender is its rank 0, the receiver its rank 1 */
        t[n] = (struct wk_nccl_transfer){!k->send, k->send ? 1 : 0, WK_NCCL_FP32,
                                         l->warm + n * sizeof(float), 1};
        n++;
    }
    if ((rc = wk_nccl_exchange_across(comms, s, t, n, why, sizeof(why))) < 0)
        return fail(l, rc, "NCCL: connecting the pipeline links: %s", why);
    if ((rc = wk_cuda_stream_sync(l->c, s)) < 0)
        return cuda_fail(l, rc);
    return 0;
}

/* --- IPC links -------------------------------------------------------------- */

/* The receive links make their rings and send the descriptors first, then
 * the send links take theirs: no neighbour waits for the other. */
static int ipc_setup(wk_plink_t *l)
{
    const struct wk_ipcring_channel ch = {l->cfg.send_bytes, l->cfg.recv_bytes, l->cfg.arg};
    int rc;

    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < NLINKS; i++) {
            struct link *k = &l->link[i];

            if (k->kind != WK_PLINK_IPC || k->send != pass)
                continue;
            rc = pass ? wk_ipcring_accept(l->c, &ch, k->peer, "pipeline rank", &k->ring, l->err,
                                          sizeof(l->err))
                      : wk_ipcring_offer(l->c, &ch, k->peer, "pipeline rank", &k->ring, l->err,
                                         sizeof(l->err));
            if (rc < 0)
                return rc;
        }
    return 0;
}

/* The pieces of a message and the links' error records. */
static int ipc_tables(wk_plink_t *l)
{
    const size_t bytes = l->cfg.msg_bytes, piece = WK_IPCRING_LINK_PIECE;
    uint64_t *off, *len;
    int rc = 0;

    l->pieces = (int)((bytes + piece - 1) / piece);
    if (l->pieces < 1)
        l->pieces = 1;
    off = calloc((size_t)l->pieces, sizeof(*off));
    len = calloc((size_t)l->pieces, sizeof(*len));
    if (!off || !len) {
        rc = fail(l, -ENOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i < l->pieces; i++) {
        off[i] = (uint64_t)i * piece;
        len[i] = bytes - off[i] < piece ? bytes - off[i] : piece;
    }
    if ((rc = wk_cuda_alloc(l->c, (size_t)l->pieces * 8, &l->off)) < 0 ||
        (rc = wk_cuda_alloc(l->c, (size_t)l->pieces * 8, &l->len)) < 0 ||
        (rc = wk_cuda_upload(l->c, l->off, off, (size_t)l->pieces * 8)) < 0 ||
        (rc = wk_cuda_upload(l->c, l->len, len, (size_t)l->pieces * 8)) < 0) {
        rc = cuda_fail(l, rc);
        goto done;
    }
    for (int i = 0; i < NLINKS; i++) {
        struct link *k = &l->link[i];
        size_t errs = (size_t)l->cfg.max_msgs * WK_IPCRING_LINK_CHANNELS * sizeof(int);

        if (k->kind != WK_PLINK_IPC)
            continue;
        if ((rc = wk_cuda_alloc(l->c, errs, &k->err)) < 0 ||
            (!k->send &&
             (rc = wk_cuda_alloc(l->c, (size_t)l->cfg.max_msgs * l->pieces * 8, &k->lens)) < 0)) {
            rc = cuda_fail(l, rc);
            goto done;
        }
    }
done:
    free(off);
    free(len);
    return rc;
}

/* --- the links -------------------------------------------------------------- */

int wk_plink_create(const struct wk_plink_config *cfg, wk_plink_t **out, char *err, size_t errlen)
{
    wk_plink_t *l;
    int rc = 0, n = 0;

    *out = NULL;
    if (!cfg->gpu || cfg->pp < 1 || cfg->pp_rank < 0 || cfg->pp_rank >= cfg->pp ||
        cfg->msg_bytes == 0 || cfg->max_msgs < 1 || !cfg->send_bytes || !cfg->recv_bytes)
        return dx_errf(err, errlen, -EINVAL, "wk_plink_create: a bad configuration");
    if (!(l = calloc(1, sizeof(*l))))
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    l->cfg = *cfg;
    l->c = wk_gpu_cuda(cfg->gpu);
    for (int i = 0; i < NLINKS; i++) {
        struct link *k = &l->link[i];
        int up = i == SEND_UP || i == RECV_UP;

        k->send = i == SEND_UP || i == SEND_DOWN;
        k->peer = cfg->pp_rank + (up ? 1 : -1);
        k->kind = WK_PLINK_HOST;
        if (k->peer < 0 || k->peer >= cfg->pp)
            continue;
        /* the transport moves 16-byte vectors: other sizes take NCCL */
        k->kind = cfg->same_node[up] && cfg->msg_bytes % 16 == 0 ? WK_PLINK_IPC
                  : cfg->world                                   ? WK_PLINK_NCCL
                                                                 : WK_PLINK_HOST;
    }
    if ((cfg->world && ((rc = nccl_split(l)) < 0 || (rc = nccl_connect(l)) < 0)) ||
        (rc = ipc_tables(l)) < 0 || (rc = ipc_setup(l)) < 0)
        goto fail;
    if ((rc = wk_cuda_stream_create(l->c, &l->abort_s)) < 0) {
        rc = cuda_fail(l, rc);
        goto fail;
    }
    for (int i = 0; i < NLINKS; i++) {
        struct link *k = &l->link[i];

        if (k->kind == WK_PLINK_HOST)
            continue;
        if ((rc = wk_cuda_stream_create(l->c, &k->s)) < 0 ||
            (rc = wk_cuda_event_create(l->c, &k->ev)) < 0) {
            rc = cuda_fail(l, rc);
            goto fail;
        }
    }
    for (int up = 1; up >= 0; up--) {
        const struct link *k = &l->link[up ? SEND_UP : SEND_DOWN];

        if (k->peer >= 0 && k->peer < cfg->pp)
            n += snprintf(l->describe + n, sizeof(l->describe) - (size_t)n, "%s%s %s",
                          n ? ", " : "", kind_name(k->kind), up ? "up" : "down");
    }
    if (!n)
        snprintf(l->describe, sizeof(l->describe), "no neighbours");
    *out = l;
    return 0;
fail:
    dx_errf(err, errlen, rc, "%s", l->err);
    wk_plink_destroy(l);
    return rc;
}

void wk_plink_destroy(wk_plink_t *l)
{
    if (!l)
        return;
    for (int i = 0; i < NLINKS; i++) {
        struct link *k = &l->link[i];

        if (k->s)
            wk_cuda_stream_sync(l->c, k->s);
        wk_nccl_destroy(k->comm);
        wk_ipcring_destroy(k->ring);
        wk_cuda_stream_destroy(l->c, k->s);
        wk_cuda_event_destroy(l->c, k->ev);
        wk_cuda_free(l->c, k->err);
        wk_cuda_free(l->c, k->lens);
    }
    wk_cuda_free(l->c, l->off);
    wk_cuda_free(l->c, l->len);
    wk_cuda_free(l->c, l->warm);
    wk_cuda_stream_destroy(l->c, l->abort_s);
    free(l);
}

const char *wk_plink_error(const wk_plink_t *l)
{
    return l->err;
}

const char *wk_plink_describe(const wk_plink_t *l)
{
    return l->describe;
}

/* The link index to (send) or from peer, or -1 when it is no neighbour. */
static int link_index(const wk_plink_t *l, int peer, int send)
{
    if (peer == l->cfg.pp_rank + 1)
        return send ? SEND_UP : RECV_UP;
    if (peer == l->cfg.pp_rank - 1)
        return send ? SEND_DOWN : RECV_DOWN;
    return -1;
}

static struct link *link_of(wk_plink_t *l, int peer, int send)
{
    int i = link_index(l, peer, send);

    return i < 0 ? NULL : &l->link[i];
}

enum wk_plink_kind wk_plink_kind(const wk_plink_t *l, int peer)
{
    int i = link_index(l, peer, 1);

    return i < 0 ? WK_PLINK_HOST : l->link[i].kind;
}

/* The next error record of an IPC link (-ENOSPC past max_msgs). */
static int ipc_record(wk_plink_t *l, struct link *k, wk_cuda_ptr *err, wk_cuda_ptr *lens)
{
    if (k->used >= l->cfg.max_msgs)
        return fail(l, -ENOSPC, "more than %d messages to pipeline rank %d in one step",
                    l->cfg.max_msgs, k->peer);
    *err = k->err + (size_t)k->used * WK_IPCRING_LINK_CHANNELS * sizeof(int);
    if (lens)
        *lens = k->lens ? k->lens + (size_t)k->used * l->pieces * 8 : 0;
    k->used++;
    return 0;
}

int wk_plink_send(wk_plink_t *l, int peer, wk_cuda_stream producer, wk_cuda_ptr buf)
{
    struct link *k = link_of(l, peer, 1);
    const struct wk_nccl_transfer t = {0, 1, WK_NCCL_FP32, buf, l->cfg.msg_bytes / sizeof(float)};
    wk_cuda_ptr err = 0;
    int rc;

    if (!k || k->kind == WK_PLINK_HOST)
        return fail(l, -EPROTO, "no device link to pipeline rank %d", peer);
    if ((rc = wk_cuda_event_record_on(l->c, k->ev, producer)) < 0 ||
        (rc = wk_cuda_stream_wait(l->c, k->s, k->ev)) < 0)
        return cuda_fail(l, rc);
    if (k->kind == WK_PLINK_NCCL) {
        if ((rc = wk_nccl_exchange(k->comm, k->s, &t, 1)) < 0)
            return fail(l, rc, "NCCL: send to pipeline rank %d: %s", peer, wk_nccl_error(k->comm));
        return 0;
    }
    if ((rc = ipc_record(l, k, &err, NULL)) < 0)
        return rc;
    if ((rc = wk_ipcring_launch_send(k->ring, wk_gpu_function(l->cfg.gpu, WK_K_TRANSPORT_SEND),
                                     k->s, WK_IPCRING_DEFAULT_THREADS, buf, l->off, l->len,
                                     l->pieces, err)) < 0)
        return fail(l, rc, "IPC: send to pipeline rank %d: %s", peer, wk_cuda_error(l->c));
    return 0;
}

int wk_plink_recv(wk_plink_t *l, int peer, wk_cuda_stream consumer, wk_cuda_ptr buf)
{
    struct link *k = link_of(l, peer, 0);
    const struct wk_nccl_transfer t = {1, 0, WK_NCCL_FP32, buf, l->cfg.msg_bytes / sizeof(float)};
    wk_cuda_ptr err = 0, lens = 0;
    int rc;

    if (!k || k->kind == WK_PLINK_HOST)
        return fail(l, -EPROTO, "no device link from pipeline rank %d", peer);
    if (k->kind == WK_PLINK_NCCL) {
        if ((rc = wk_nccl_exchange(k->comm, k->s, &t, 1)) < 0)
            return fail(l, rc, "NCCL: receive from pipeline rank %d: %s", peer,
                        wk_nccl_error(k->comm));
    } else {
        if ((rc = ipc_record(l, k, &err, &lens)) < 0)
            return rc;
        if ((rc = wk_ipcring_launch_recv(k->ring, wk_gpu_function(l->cfg.gpu, WK_K_TRANSPORT_RECV),
                                         k->s, WK_IPCRING_DEFAULT_THREADS, buf, l->off, l->len,
                                         l->pieces, lens, err)) < 0)
            return fail(l, rc, "IPC: receive from pipeline rank %d: %s", peer, wk_cuda_error(l->c));
    }
    if ((rc = wk_cuda_event_record_on(l->c, k->ev, k->s)) < 0 ||
        (rc = wk_cuda_stream_wait(l->c, consumer, k->ev)) < 0)
        return cuda_fail(l, rc);
    return 0;
}

/* Every IPC transfer of link k this step: no channel failed, every piece
 * received whole. */
static int ipc_check(wk_plink_t *l, struct link *k)
{
    size_t nerr = (size_t)k->used * WK_IPCRING_LINK_CHANNELS, nlen = (size_t)k->used * l->pieces;
    int *errs = calloc(nerr + 1, sizeof(int)), rc = 0;
    uint64_t *lens = calloc(nlen + 1, sizeof(uint64_t));
    uint64_t want;

    if (!errs || !lens) {
        rc = fail(l, -ENOMEM, "out of memory");
        goto done;
    }
    if ((rc = wk_cuda_download(l->c, errs, k->err, nerr * sizeof(int))) < 0 ||
        (!k->send && (rc = wk_cuda_download(l->c, lens, k->lens, nlen * 8)) < 0)) {
        rc = cuda_fail(l, rc);
        goto done;
    }
    for (size_t i = 0; i < nerr && rc == 0; i++)
        if (errs[i] != 0)
            rc = fail(l, -EIO, "IPC: %s pipeline rank %d, message %zu of the step, channel %zu: %s",
                      k->send ? "send to" : "receive from", k->peer,
                      i / WK_IPCRING_LINK_CHANNELS + 1, i % WK_IPCRING_LINK_CHANNELS,
                      strerror(errs[i] < 0 ? -errs[i] : errs[i]));
    for (size_t i = 0; !k->send && i < nlen && rc == 0; i++) {
        size_t p = i % (size_t)l->pieces;

        want = l->cfg.msg_bytes - p * WK_IPCRING_LINK_PIECE < WK_IPCRING_LINK_PIECE
                   ? l->cfg.msg_bytes - p * WK_IPCRING_LINK_PIECE
                   : WK_IPCRING_LINK_PIECE;
        if (lens[i] != want)
            rc = fail(l, -EIO,
                      "IPC: receive from pipeline rank %d, message %zu of the step: piece %zu "
                      "has %llu bytes, not %llu",
                      k->peer, i / (size_t)l->pieces + 1, p, (unsigned long long)lens[i],
                      (unsigned long long)want);
    }
done:
    free(errs);
    free(lens);
    return rc;
}

int wk_plink_step_end(wk_plink_t *l)
{
    int rc = 0;

    for (int i = 0; i < NLINKS; i++)
        if (l->link[i].s && (rc = wk_cuda_stream_sync(l->c, l->link[i].s)) < 0)
            return cuda_fail(l, rc);
    for (int i = 0; i < NLINKS && rc == 0; i++) {
        struct link *k = &l->link[i];

        if (k->kind == WK_PLINK_IPC && k->used > 0)
            rc = ipc_check(l, k);
        k->used = 0;
    }
    return rc;
}

void wk_plink_abort(wk_plink_t *l)
{
    int bound = 0;

    if (!l)
        return;
    for (int i = 0; i < NLINKS; i++) {
        struct link *k = &l->link[i];

        if (k->comm)
            wk_nccl_abort(k->comm);
        /* the caller's thread may hold no context yet: the GPU's, to set
         * the ring's abort word while a transfer kernel waits on it */
        if (k->ring && l->abort_s && (bound || (bound = wk_cuda_bind(l->c) == 0)))
            wk_ipcring_abort(k->ring, l->abort_s);
    }
}
