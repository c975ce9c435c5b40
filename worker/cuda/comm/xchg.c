/* xchg.c - the expert exchange's transport (xchg.h): owns the IPC rings,
 * streams, events, piece lists and outcome records of each same-node peer,
 * and the split of a call between IPC and NCCL. */
#include "worker/cuda/comm/xchg.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/cuda/comm/ipcring.h"

#define ERR_MAX 512
#define CHANNELS WK_IPCRING_LINK_CHANNELS
#define PIECE WK_IPCRING_LINK_PIECE

/* One direction of one same-node peer. */
struct side {
    wk_ipcring_t *ring; /* send: the peer's ring, mapped; receive: ours */
    wk_cuda_stream s;
    wk_cuda_event done;
    wk_cuda_ptr off, len, got; /* [cap] u64: the pieces' addresses, lengths, lengths received */
    int cap;
    wk_cuda_ptr err; /* [max_calls][CHANNELS] int */
    int used;        /* calls since the last check */
};

struct peer {
    int ipc;
    struct side tx, rx;
};

struct wk_xchg {
    struct wk_xchg_config cfg;
    wk_cuda_t *c;
    struct peer *peer;      /* [ranks] */
    wk_cuda_event start;    /* the caller's stream, at a call */
    wk_cuda_stream abort_s; /* the rings' abort words are set on it */
    uint64_t *hoff, *hlen;  /* host staging of one piece list */
    int hcap;
    struct wk_nccl_transfer *remote; /* the NCCL part of a call */
    size_t rcap;
    char describe[64];
    char err[ERR_MAX];
};

static int fail(wk_xchg_t *x, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(wk_xchg_t *x, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(x->err, sizeof(x->err), fmt, ap);
    va_end(ap);
    return rc;
}

static int cuda_fail(wk_xchg_t *x, int rc)
{
    return fail(x, rc, "GPU: %s", wk_cuda_error(x->c));
}

static size_t type_bytes(enum wk_nccl_type t)
{
    return t == WK_NCCL_BYTES ? 1 : t == WK_NCCL_FP32 ? 4 : 8;
}

/* --- setup ------------------------------------------------------------------ */

/* Our rings first, their descriptors out, then the peers' rings: no peer
 * waits for another. */
static int rings(wk_xchg_t *x)
{
    const struct wk_ipcring_channel ch = {x->cfg.send_bytes, x->cfg.recv_bytes, x->cfg.arg};
    int rc;

    for (int pass = 0; pass < 2; pass++)
        for (int p = 0; p < x->cfg.ranks; p++) {
            struct peer *q = &x->peer[p];

            if (!q->ipc)
                continue;
            rc = pass ? wk_ipcring_accept(x->c, &ch, p, "ep rank", &q->tx.ring, x->err,
                                          sizeof(x->err))
                      : wk_ipcring_offer(x->c, &ch, p, "ep rank", &q->rx.ring, x->err,
                                         sizeof(x->err));
            if (rc < 0)
                return rc;
        }
    return 0;
}

static int side_init(wk_xchg_t *x, struct side *d)
{
    int rc;

    if ((rc = wk_cuda_stream_create(x->c, &d->s)) < 0 ||
        (rc = wk_cuda_event_create(x->c, &d->done)) < 0 ||
        (rc = wk_cuda_alloc(x->c, (size_t)x->cfg.max_calls * CHANNELS * sizeof(int), &d->err)) < 0)
        return cuda_fail(x, rc);
    return 0;
}

static void side_free(wk_xchg_t *x, struct side *d)
{
    if (d->s)
        wk_cuda_stream_sync(x->c, d->s);
    wk_ipcring_destroy(d->ring);
    wk_cuda_stream_destroy(x->c, d->s);
    wk_cuda_event_destroy(x->c, d->done);
    wk_cuda_free(x->c, d->off);
    wk_cuda_free(x->c, d->len);
    wk_cuda_free(x->c, d->got);
    wk_cuda_free(x->c, d->err);
}

int wk_xchg_create(const struct wk_xchg_config *cfg, wk_xchg_t **out, char *err, size_t errlen)
{
    wk_xchg_t *x;
    int rc = 0, ipc = 0, remote = 0;

    *out = NULL;
    if (!cfg->gpu || cfg->ranks < 1 || cfg->rank < 0 || cfg->rank >= cfg->ranks ||
        !cfg->same_node || cfg->max_calls < 1 || !cfg->send_bytes || !cfg->recv_bytes)
        return dx_errf(err, errlen, -EINVAL, "wk_xchg_create: a bad configuration");
    if (!(x = calloc(1, sizeof(*x))) || !(x->peer = calloc((size_t)cfg->ranks, sizeof(*x->peer)))) {
        free(x);
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    }
    x->cfg = *cfg;
    x->cfg.same_node = NULL; /* the caller's; read here only */
    x->c = wk_gpu_cuda(cfg->gpu);
    for (int p = 0; p < cfg->ranks; p++) {
        if (p == cfg->rank)
            continue;
        x->peer[p].ipc = cfg->same_node[p] != 0;
        ipc += x->peer[p].ipc;
        remote += !x->peer[p].ipc;
        if (!x->peer[p].ipc && !cfg->comm) {
            rc = fail(x, -EINVAL, "ep rank %d runs on another node, and the job has no NCCL", p);
            goto fail;
        }
    }
    if ((rc = rings(x)) < 0)
        goto fail;
    for (int p = 0; p < cfg->ranks; p++)
        if (x->peer[p].ipc &&
            ((rc = side_init(x, &x->peer[p].tx)) < 0 || (rc = side_init(x, &x->peer[p].rx)) < 0))
            goto fail;
    if ((rc = wk_cuda_event_create(x->c, &x->start)) < 0 ||
        (rc = wk_cuda_stream_create(x->c, &x->abort_s)) < 0) {
        rc = cuda_fail(x, rc);
        goto fail;
    }
    snprintf(x->describe, sizeof(x->describe), "%d by IPC, %d by NCCL", ipc, remote);
    *out = x;
    return 0;
fail:
    dx_errf(err, errlen, rc, "%s", x->err);
    wk_xchg_destroy(x);
    return rc;
}

void wk_xchg_destroy(wk_xchg_t *x)
{
    if (!x)
        return;
    for (int p = 0; p < x->cfg.ranks; p++) {
        side_free(x, &x->peer[p].tx);
        side_free(x, &x->peer[p].rx);
    }
    wk_cuda_event_destroy(x->c, x->start);
    wk_cuda_stream_destroy(x->c, x->abort_s);
    free(x->peer);
    free(x->hoff);
    free(x->hlen);
    free(x->remote);
    free(x);
}

const char *wk_xchg_error(const wk_xchg_t *x)
{
    return x->err;
}

const char *wk_xchg_describe(const wk_xchg_t *x)
{
    return x->describe;
}

/* --- a call ------------------------------------------------------------------ */

/* The pieces of peer p's transfers of one direction, in list order, into
 * the host staging; their count. */
static int pieces(wk_xchg_t *x, const struct wk_nccl_transfer *t, size_t n, int p, int recv)
{
    int k = 0;

    for (size_t i = 0; i < n; i++) {
        const size_t bytes = t[i].count * type_bytes(t[i].type);

        if (t[i].peer != p || t[i].recv != recv || bytes == 0)
            continue;
        if (t[i].buf & 15)
            return fail(x, -EINVAL,
                        "IPC: a transfer %s ep rank %d at an address not 16-byte "
                        "aligned",
                        recv ? "from" : "to", p);
        for (size_t off = 0; off < bytes; off += PIECE) {
            if (k == x->hcap) {
                int cap = x->hcap ? 2 * x->hcap : 64;
                uint64_t *o = realloc(x->hoff, (size_t)cap * 8), *l;

                if (!o)
                    return fail(x, -ENOMEM, "out of memory");
                x->hoff = o;
                if (!(l = realloc(x->hlen, (size_t)cap * 8)))
                    return fail(x, -ENOMEM, "out of memory");
                x->hlen = l;
                x->hcap = cap;
            }
            x->hoff[k] = t[i].buf + off;
            x->hlen[k] = bytes - off < PIECE ? bytes - off : PIECE;
            k++;
        }
    }
    return k;
}

/* One kernel for k staged pieces on side d (after the caller's start). */
static int launch(wk_xchg_t *x, struct side *d, int recv, int p, int k, wk_cuda_stream caller)
{
    wk_cuda_ptr err;
    int rc;

    if (d->used >= x->cfg.max_calls)
        return fail(x, -ENOSPC, "more than %d expert exchanges with ep rank %d before a check",
                    x->cfg.max_calls, p);
    if (k > d->cap) { /* grow the device lists once the side's work is done */
        if ((rc = wk_cuda_stream_sync(x->c, d->s)) < 0)
            return cuda_fail(x, rc);
        wk_cuda_free(x->c, d->off);
        wk_cuda_free(x->c, d->len);
        wk_cuda_free(x->c, d->got);
        d->off = d->len = d->got = 0;
        d->cap = 0;
        if ((rc = wk_cuda_alloc(x->c, (size_t)k * 8, &d->off)) < 0 ||
            (rc = wk_cuda_alloc(x->c, (size_t)k * 8, &d->len)) < 0 ||
            (rc = wk_cuda_alloc(x->c, (size_t)k * 8, &d->got)) < 0)
            return cuda_fail(x, rc);
        d->cap = k;
    }
    err = d->err + (size_t)d->used * CHANNELS * sizeof(int);
    if ((rc = wk_cuda_stream_wait(x->c, d->s, x->start)) < 0 ||
        (rc = wk_cuda_upload_on(x->c, d->s, d->off, x->hoff, (size_t)k * 8)) < 0 ||
        (rc = wk_cuda_upload_on(x->c, d->s, d->len, x->hlen, (size_t)k * 8)) < 0)
        return cuda_fail(x, rc);
    /* the pieces' addresses are absolute: the kernels' base is 0 */
    rc = recv ? wk_ipcring_launch_recv(d->ring, wk_gpu_function(x->cfg.gpu, WK_K_TRANSPORT_RECV),
                                       d->s, WK_IPCRING_DEFAULT_THREADS, 0, d->off, d->len, k,
                                       d->got, err)
              : wk_ipcring_launch_send(d->ring, wk_gpu_function(x->cfg.gpu, WK_K_TRANSPORT_SEND),
                                       d->s, WK_IPCRING_DEFAULT_THREADS, 0, d->off, d->len, k, err);
    if (rc < 0)
        return fail(x, rc, "IPC: %s ep rank %d: %s", recv ? "receive from" : "send to", p,
                    wk_cuda_error(x->c));
    d->used++;
    if ((rc = wk_cuda_event_record_on(x->c, d->done, d->s)) < 0 ||
        (rc = wk_cuda_stream_wait(x->c, caller, d->done)) < 0)
        return cuda_fail(x, rc);
    return 0;
}

int wk_xchg_run(wk_xchg_t *x, wk_cuda_stream s, const struct wk_nccl_transfer *t, size_t n)
{
    size_t m = 0;
    int rc, started = 0;

    for (size_t i = 0; i < n; i++)
        if (t[i].peer < 0 || t[i].peer >= x->cfg.ranks || t[i].peer == x->cfg.rank)
            return fail(x, -EINVAL, "transfer %zu: ep rank %d (this is rank %d of %d)", i,
                        t[i].peer, x->cfg.rank, x->cfg.ranks);
    for (int p = 0; p < x->cfg.ranks; p++) {
        struct peer *q = &x->peer[p];

        if (!q->ipc)
            continue;
        for (int recv = 0; recv < 2; recv++) {
            int k = pieces(x, t, n, p, recv);

            if (k <= 0) {
                if (k < 0)
                    return k;
                continue;
            }
            if (!started && (rc = wk_cuda_event_record_on(x->c, x->start, s)) < 0)
                return cuda_fail(x, rc);
            started = 1;
            if ((rc = launch(x, recv ? &q->rx : &q->tx, recv, p, k, s)) < 0)
                return rc;
        }
    }
    /* the rest by NCCL, in list order */
    if (n > x->rcap) {
        struct wk_nccl_transfer *r = realloc(x->remote, n * sizeof(*r));

        if (!r)
            return fail(x, -ENOMEM, "out of memory");
        x->remote = r;
        x->rcap = n;
    }
    for (size_t i = 0; i < n; i++)
        if (!x->peer[t[i].peer].ipc)
            x->remote[m++] = t[i];
    if (m > 0 && (rc = wk_nccl_exchange(x->cfg.comm, s, x->remote, m)) < 0)
        return fail(x, rc, "NCCL: %s", wk_nccl_error(x->cfg.comm));
    return 0;
}

/* The outcomes of side d's calls since the last check. */
static int side_check(wk_xchg_t *x, struct side *d, int recv, int p)
{
    size_t n = (size_t)d->used * CHANNELS;
    int *errs, rc = 0;

    if (d->used == 0)
        return 0;
    if (!(errs = calloc(n, sizeof(int))))
        return fail(x, -ENOMEM, "out of memory");
    if ((rc = wk_cuda_stream_sync(x->c, d->s)) < 0 ||
        (rc = wk_cuda_download(x->c, errs, d->err, n * sizeof(int))) < 0)
        rc = cuda_fail(x, rc);
    for (size_t i = 0; i < n && rc == 0; i++)
        if (errs[i] != 0)
            rc = fail(x, -EIO,
                      "IPC: %s ep rank %d, exchange %zu since the last check, channel "
                      "%zu: %s",
                      recv ? "receive from" : "send to", p, i / CHANNELS + 1, i % CHANNELS,
                      strerror(errs[i] < 0 ? -errs[i] : errs[i]));
    free(errs);
    d->used = 0;
    return rc;
}

int wk_xchg_check(wk_xchg_t *x)
{
    int rc = 0;

    for (int p = 0; p < x->cfg.ranks && rc == 0; p++)
        if (x->peer[p].ipc && (rc = side_check(x, &x->peer[p].tx, 0, p)) == 0)
            rc = side_check(x, &x->peer[p].rx, 1, p);
    return rc;
}

void wk_xchg_abort(wk_xchg_t *x)
{
    int bound = 0;

    if (!x)
        return;
    for (int p = 0; p < x->cfg.ranks; p++) {
        struct peer *q = &x->peer[p];

        /* the caller's thread may hold no context yet */
        if (!q->ipc || !x->abort_s || !(bound || (bound = wk_cuda_bind(x->c) == 0)))
            continue;
        if (q->tx.ring)
            wk_ipcring_abort(q->tx.ring, x->abort_s);
        if (q->rx.ring)
            wk_ipcring_abort(q->rx.ring, x->abort_s);
    }
}
