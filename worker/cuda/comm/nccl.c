/* nccl.c - NCCL communicators of the cuda backend, through the library
 * worker/cuda/driver.c opened (see nccl.h). */
#include "worker/cuda/comm/nccl.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"

#define NCCL_ERR_LEN 512
#define POLL_MAX_US 10000 /* the longest nap between polls of a waiting call */

struct wk_nccl {
    struct wk_nccl_api api;
    wk_nccl_abi_comm_t comm; /* NULL once aborted; exchanged atomically */
    int nranks, rank;
    int nonblocking; /* joined by wk_nccl_join: calls may return "in progress" */
    struct wk_nccl_wait wait;
    char err[NCCL_ERR_LEN];
};

/* --- resolving ---------------------------------------------------------- */

/* the symbol of each entry point, in struct wk_nccl_api order */
static const struct {
    const char *name;
    size_t offset;
} nccl_symbols[] = {
    {"ncclGetVersion", offsetof(struct wk_nccl_api, get_version)},
    {"ncclGetUniqueId", offsetof(struct wk_nccl_api, get_unique_id)},
    {"ncclCommInitRank", offsetof(struct wk_nccl_api, comm_init_rank)},
    {"ncclCommDestroy", offsetof(struct wk_nccl_api, comm_destroy)},
    {"ncclCommAbort", offsetof(struct wk_nccl_api, comm_abort)},
    {"ncclCommGetAsyncError", offsetof(struct wk_nccl_api, comm_get_async_error)},
    {"ncclCommSplit", offsetof(struct wk_nccl_api, comm_split)},
    {"ncclCommCount", offsetof(struct wk_nccl_api, comm_count)},
    {"ncclCommUserRank", offsetof(struct wk_nccl_api, comm_user_rank)},
    {"ncclGetErrorString", offsetof(struct wk_nccl_api, get_error_string)},
    {"ncclGetLastError", offsetof(struct wk_nccl_api, get_last_error)},
    {"ncclGroupStart", offsetof(struct wk_nccl_api, group_start)},
    {"ncclGroupEnd", offsetof(struct wk_nccl_api, group_end)},
    {"ncclSend", offsetof(struct wk_nccl_api, send)},
    {"ncclRecv", offsetof(struct wk_nccl_api, recv)},
    {"ncclAllReduce", offsetof(struct wk_nccl_api, all_reduce)},
};

int wk_nccl_api_load(void *lib, struct wk_nccl_api *api, char *err, size_t errlen)
{
    memset(api, 0, sizeof(*api));
    if (!lib)
        return dx_errf(err, errlen, -ENOENT, "NCCL is not open (libnccl.so.2 was not loaded)");
    for (size_t i = 0; i < sizeof(nccl_symbols) / sizeof(nccl_symbols[0]); i++) {
        void *sym;

        dlerror();
        sym = dlsym(lib, nccl_symbols[i].name);
        if (!sym) {
            const char *why = dlerror();

            memset(api, 0, sizeof(*api));
            return dx_errf(err, errlen, -ENOENT, "NCCL has no %s: %s", nccl_symbols[i].name,
                           why ? why : "symbol is NULL");
        }
        /* POSIX: a data pointer from dlsym converts to a function pointer */
        memcpy((char *)api + nccl_symbols[i].offset, &sym, sizeof(sym));
    }
    {
        void *sym = dlsym(lib, "ncclCommInitRankConfig"); /* optional */

        memcpy(&api->comm_init_rank_config, &sym, sizeof(sym));
    }
    return 0;
}

/* --- errors --------------------------------------------------------------- */

static const char *type_name(enum wk_nccl_type t)
{
    switch (t) {
    case WK_NCCL_BYTES:
        return "bytes";
    case WK_NCCL_INT64:
        return "int64";
    case WK_NCCL_FP32:
        return "fp32";
    case WK_NCCL_FP64:
        return "fp64";
    }
    return "?";
}

/* "CALL: NCCL's string (NCCL error R): NCCL's last error" into buf */
static void format_nccl_error(const struct wk_nccl_api *api, wk_nccl_abi_comm_t comm, int result,
                              const char *call, char *buf, size_t buflen)
{
    const char *what = api->get_error_string ? api->get_error_string(result) : NULL;
    const char *last = api->get_last_error ? api->get_last_error(comm) : NULL;

    snprintf(buf, buflen, "%s: %s (NCCL error %d)%s%s", call, what ? what : "unknown error", result,
             last && *last ? ": " : "", last && *last ? last : "");
}

/* Records a failed call in n->err; returns -EIO. */
static int nccl_fail(wk_nccl_t *n, wk_nccl_abi_comm_t comm, int result, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int nccl_fail(wk_nccl_t *n, wk_nccl_abi_comm_t comm, int result, const char *fmt, ...)
{
    char call[160];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(call, sizeof(call), fmt, ap);
    va_end(ap);
    format_nccl_error(&n->api, comm, result, call, n->err, sizeof(n->err));
    return -EIO;
}

static int nccl_bad(wk_nccl_t *n, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int nccl_bad(wk_nccl_t *n, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(n->err, sizeof(n->err), fmt, ap);
    va_end(ap);
    return rc;
}

/* The communicator, or NULL (with -ECANCELED in n->err) once aborted. */
static wk_nccl_abi_comm_t live_comm(wk_nccl_t *n, const char *call)
{
    wk_nccl_abi_comm_t comm = __atomic_load_n(&n->comm, __ATOMIC_ACQUIRE);

    if (!comm)
        snprintf(n->err, sizeof(n->err), "%s: the NCCL communicator was aborted", call);
    return comm;
}

static double now_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* The end of a call on a non-blocking communicator: result, or while comm
 * says "in progress" (the other ranks have not all come), polls its async
 * error until it settles, the wait's deadline passes (-ETIMEDOUT) or its
 * cancel flag is raised (-ECANCELED). 0 or -errno with the reason in
 * n->err; on -ETIMEDOUT and -ECANCELED comm is still to be aborted. */
static int settle(wk_nccl_t *n, wk_nccl_abi_comm_t comm, int result, const char *call)
{
    double deadline = now_ms() + n->wait.timeout_ms;
    unsigned nap = 50;
    int state = result;

    if (result != WK_NCCL_ABI_SUCCESS && result != WK_NCCL_ABI_IN_PROGRESS)
        return nccl_fail(n, comm, result, "%s", call);
    if (!n->nonblocking)
        return 0;
    for (;;) {
        int got = n->api.comm_get_async_error(comm, &state);

        if (got != WK_NCCL_ABI_SUCCESS)
            return nccl_fail(n, comm, got, "%s: ncclCommGetAsyncError", call);
        if (state != WK_NCCL_ABI_IN_PROGRESS)
            break;
        if (n->wait.cancel && atomic_load(n->wait.cancel))
            return nccl_bad(n, -ECANCELED, "%s: given up, the job was aborted", call);
        if (now_ms() > deadline)
            return nccl_bad(n, -ETIMEDOUT, "%s: not every rank joined within %g s", call,
                            n->wait.timeout_ms / 1e3);
        usleep(nap);
        nap = nap * 2 > POLL_MAX_US ? POLL_MAX_US : nap * 2;
    }
    return state == WK_NCCL_ABI_SUCCESS ? 0 : nccl_fail(n, comm, state, "%s", call);
}

/* settle for a call on n's own communicator: one that gave up waiting
 * leaves it aborted (its operation may never complete). */
static int settle_or_abort(wk_nccl_t *n, wk_nccl_abi_comm_t comm, int result, const char *call)
{
    int rc = settle(n, comm, result, call);

    if (rc == -ETIMEDOUT || rc == -ECANCELED) {
        char why[NCCL_ERR_LEN];

        snprintf(why, sizeof(why), "%s", n->err);
        wk_nccl_abort(n);
        snprintf(n->err, sizeof(n->err), "%s", why);
    }
    return rc;
}

/* --- ids and communicators ----------------------------------------------- */

int wk_nccl_unique_id(const wk_cuda_t *c, unsigned char out[WK_NCCL_ID_BYTES], char *err,
                      size_t errlen)
{
    struct wk_nccl_api api;
    wk_nccl_abi_id id;
    int rc, result;

    if (!c || !out)
        return dx_errf(err, errlen, -EINVAL,
                       "wk_nccl_unique_id: no CUDA stack or no output buffer");
    if ((rc = wk_nccl_api_load(wk_cuda_nccl_library(c), &api, err, errlen)) < 0)
        return rc;
    memset(&id, 0, sizeof(id));
    if ((result = api.get_unique_id(&id)) != WK_NCCL_ABI_SUCCESS) {
        format_nccl_error(&api, NULL, result, "ncclGetUniqueId", err, errlen);
        return -EIO;
    }
    memcpy(out, id.internal, WK_NCCL_ID_BYTES);
    return 0;
}

/* ncclCommInitRank, or with wait the non-blocking ncclCommInitRankConfig
 * (where NCCL has it) polled by settle. */
static int create(const struct wk_nccl_api *api, const unsigned char id[WK_NCCL_ID_BYTES],
                  int nranks, int rank, const struct wk_nccl_wait *wait, wk_nccl_t **out, char *err,
                  size_t errlen)
{
    wk_nccl_t *n = NULL;
    wk_nccl_abi_id abi_id;
    wk_nccl_abi_comm_t comm = NULL;
    char call[96];
    int result, rc;

    *out = NULL;
    if (!api || !id)
        return dx_errf(err, errlen, -EINVAL,
                       "wk_nccl_create: no NCCL entry points or no NCCL unique id");
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return dx_errf(err, errlen, -EINVAL,
                       "wk_nccl_create: rank %d is outside a communicator of %d ranks", rank,
                       nranks);
    if (wait && wait->timeout_ms <= 0)
        return dx_errf(err, errlen, -EINVAL, "wk_nccl_join: a timeout of %d ms", wait->timeout_ms);
    if (!(n = calloc(1, sizeof(*n))))
        return dx_errf(err, errlen, -ENOMEM, "wk_nccl_create: out of memory");
    n->api = *api;
    n->nranks = nranks;
    n->rank = rank;
    memcpy(abi_id.internal, id, WK_NCCL_ID_BYTES);
    snprintf(call, sizeof(call), "%s(rank %d of %d)",
             wait && api->comm_init_rank_config ? "ncclCommInitRankConfig" : "ncclCommInitRank",
             rank, nranks);
    if (wait && api->comm_init_rank_config) {
        struct wk_nccl_abi_config config = {
            sizeof(config),        WK_NCCL_ABI_CONFIG_MAGIC, WK_NCCL_ABI_CONFIG_VERSION, 0,
            WK_NCCL_ABI_UNDEF_INT, WK_NCCL_ABI_UNDEF_INT,    WK_NCCL_ABI_UNDEF_INT,      NULL};

        n->nonblocking = 1;
        n->wait = *wait;
        result = n->api.comm_init_rank_config(&comm, nranks, abi_id, rank, &config);
        if (result != WK_NCCL_ABI_SUCCESS && result != WK_NCCL_ABI_IN_PROGRESS)
            goto fail;
        if ((rc = settle(n, comm, result, call)) < 0) {
            rc = dx_errf(err, errlen, rc, "%s", n->err);
            goto release;
        }
    } else if ((result = n->api.comm_init_rank(&comm, nranks, abi_id, rank)) !=
               WK_NCCL_ABI_SUCCESS) {
        goto fail;
    }
    n->comm = comm;
    *out = n;
    return 0;
fail:
    format_nccl_error(&n->api, comm, result, call, err, errlen);
    rc = -EIO;
release:
    /* a handle NCCL left behind is freed without waiting for the peers */
    if (comm)
        n->api.comm_abort(comm);
    free(n);
    return rc;
}

int wk_nccl_create(wk_cuda_t *c, const unsigned char id[WK_NCCL_ID_BYTES], int nranks, int rank,
                   wk_nccl_t **out, char *err, size_t errlen)
{
    return wk_nccl_join(c, id, nranks, rank, NULL, out, err, errlen);
}

int wk_nccl_create_api(const struct wk_nccl_api *api, const unsigned char id[WK_NCCL_ID_BYTES],
                       int nranks, int rank, wk_nccl_t **out, char *err, size_t errlen)
{
    return create(api, id, nranks, rank, NULL, out, err, errlen);
}

int wk_nccl_join(wk_cuda_t *c, const unsigned char id[WK_NCCL_ID_BYTES], int nranks, int rank,
                 const struct wk_nccl_wait *wait, wk_nccl_t **out, char *err, size_t errlen)
{
    struct wk_nccl_api api;
    int rc;

    *out = NULL;
    if (!c)
        return dx_errf(err, errlen, -EINVAL, "wk_nccl_create: no CUDA stack");
    if ((rc = wk_nccl_api_load(wk_cuda_nccl_library(c), &api, err, errlen)) < 0)
        return rc;
    return create(&api, id, nranks, rank, wait, out, err, errlen);
}

int wk_nccl_join_api(const struct wk_nccl_api *api, const unsigned char id[WK_NCCL_ID_BYTES],
                     int nranks, int rank, const struct wk_nccl_wait *wait, wk_nccl_t **out,
                     char *err, size_t errlen)
{
    return create(api, id, nranks, rank, wait, out, err, errlen);
}

void wk_nccl_destroy(wk_nccl_t *n)
{
    wk_nccl_abi_comm_t comm;

    if (!n)
        return;
    comm = __atomic_exchange_n(&n->comm, NULL, __ATOMIC_ACQ_REL);
    if (comm)
        n->api.comm_destroy(comm);
    free(n);
}

int wk_nccl_rank(const wk_nccl_t *n)
{
    return n->rank;
}

int wk_nccl_size(const wk_nccl_t *n)
{
    return n->nranks;
}

const char *wk_nccl_error(const wk_nccl_t *n)
{
    return n->err;
}

/* --- operations ------------------------------------------------------------ */

int wk_nccl_transfers_check(const struct wk_nccl_transfer *t, size_t n, int nranks, char *err,
                            size_t errlen)
{
    if (n > 0 && !t)
        return dx_errf(err, errlen, -EINVAL, "%zu transfers but no list", n);
    for (size_t i = 0; i < n; i++) {
        const char *dir = t[i].recv ? "receive from" : "send to";

        if (t[i].recv != 0 && t[i].recv != 1)
            return dx_errf(err, errlen, -EINVAL,
                           "transfer %zu: recv is %d, not 0 (send) or 1 (receive)", i, t[i].recv);
        if (t[i].peer < 0 || t[i].peer >= nranks)
            return dx_errf(err, errlen, -EINVAL,
                           "transfer %zu: %s rank %d of a communicator of %d ranks", i, dir,
                           t[i].peer, nranks);
        if (t[i].type != WK_NCCL_BYTES && t[i].type != WK_NCCL_FP32)
            return dx_errf(err, errlen, -EINVAL,
                           "transfer %zu: %s rank %d: unknown element type %d", i, dir, t[i].peer,
                           (int)t[i].type);
        if (t[i].count > 0 && t[i].buf == 0)
            return dx_errf(err, errlen, -EINVAL,
                           "transfer %zu: %s rank %d: %zu %s with no device buffer", i, dir,
                           t[i].peer, t[i].count, type_name(t[i].type));
    }
    return 0;
}

int wk_nccl_exchange(wk_nccl_t *n, wk_cuda_stream stream, const struct wk_nccl_transfer *t,
                     size_t count)
{
    wk_nccl_abi_comm_t comm;
    int rc = 0, result;

    if ((rc = wk_nccl_transfers_check(t, count, n->nranks, n->err, sizeof(n->err))) < 0)
        return rc;
    if (count == 0)
        return 0;
    if (!(comm = live_comm(n, "ncclGroupStart")))
        return -ECANCELED;
    if ((result = n->api.group_start()) != WK_NCCL_ABI_SUCCESS)
        return nccl_fail(n, comm, result, "ncclGroupStart");
    for (size_t i = 0; i < count && rc == 0; i++) {
        const struct wk_nccl_transfer *x = &t[i];

        if (x->count == 0)
            continue;
        if (x->recv)
            result = n->api.recv((void *)(uintptr_t)x->buf, x->count, (int)x->type, x->peer, comm,
                                 stream);
        else
            result = n->api.send((const void *)(uintptr_t)x->buf, x->count, (int)x->type, x->peer,
                                 comm, stream);
        if (result != WK_NCCL_ABI_SUCCESS && result != WK_NCCL_ABI_IN_PROGRESS)
            rc = nccl_fail(n, comm, result, "%s(%zu %s, %s rank %d; transfer %zu of %zu)",
                           x->recv ? "ncclRecv" : "ncclSend", x->count, type_name(x->type),
                           x->recv ? "from" : "to", x->peer, i, count);
    }
    /* the group is closed even after a failed call, so the next one starts
     * clean; the first error is the one reported */
    result = n->api.group_end();
    if (rc == 0) {
        char call[64];

        snprintf(call, sizeof(call), "ncclGroupEnd(%zu transfers)", count);
        rc = settle_or_abort(n, comm, result, call);
    }
    return rc;
}

int wk_nccl_exchange_across(wk_nccl_t *const *comms, wk_cuda_stream stream,
                            const struct wk_nccl_transfer *t, size_t count, char *err,
                            size_t errlen)
{
    int rc = 0, result;
    size_t i;

    for (i = 0; i < count; i++) {
        if (!comms[i])
            return dx_errf(err, errlen, -EINVAL, "transfer %zu has no communicator", i);
        if ((rc = wk_nccl_transfers_check(&t[i], 1, comms[i]->nranks, err, errlen)) < 0)
            return rc;
        if (!live_comm(comms[i], "ncclGroupStart"))
            return dx_errf(err, errlen, -ECANCELED, "%s", comms[i]->err);
    }
    if (count == 0)
        return 0;
    if ((result = comms[0]->api.group_start()) != WK_NCCL_ABI_SUCCESS) {
        rc = nccl_fail(comms[0], comms[0]->comm, result, "ncclGroupStart");
        return dx_errf(err, errlen, rc, "%s", comms[0]->err);
    }
    for (i = 0; i < count && rc == 0; i++) {
        wk_nccl_t *n = comms[i];
        const struct wk_nccl_transfer *x = &t[i];

        if (x->count == 0)
            continue;
        result = x->recv ? n->api.recv((void *)(uintptr_t)x->buf, x->count, (int)x->type, x->peer,
                                       n->comm, stream)
                         : n->api.send((const void *)(uintptr_t)x->buf, x->count, (int)x->type,
                                       x->peer, n->comm, stream);
        if (result != WK_NCCL_ABI_SUCCESS && result != WK_NCCL_ABI_IN_PROGRESS)
            rc = nccl_fail(n, n->comm, result, "%s(%zu %s, %s rank %d; transfer %zu of %zu)",
                           x->recv ? "ncclRecv" : "ncclSend", x->count, type_name(x->type),
                           x->recv ? "from" : "to", x->peer, i, count);
    }
    result = comms[0]->api.group_end();
    /* each communicator settles (its connections made) */
    for (i = 0; i < count && rc == 0; i++) {
        char call[64];

        snprintf(call, sizeof(call), "ncclGroupEnd(%zu transfers across communicators)", count);
        rc = settle_or_abort(comms[i], comms[i]->comm, result, call);
    }
    if (rc < 0)
        return dx_errf(err, errlen, rc, "%s", comms[i > 0 ? i - 1 : 0]->err);
    return rc;
}

int wk_nccl_allreduce_sum_of(wk_nccl_t *n, wk_cuda_stream stream, wk_cuda_ptr send,
                             wk_cuda_ptr recv, size_t count, enum wk_nccl_type type)
{
    wk_nccl_abi_comm_t comm;
    char call[64];
    int result;

    if (count == 0)
        return 0;
    if (type != WK_NCCL_FP32 && type != WK_NCCL_FP64 && type != WK_NCCL_INT64)
        return nccl_bad(n, -EINVAL, "ncclAllReduce: a sum of %s", type_name(type));
    if (!send || !recv)
        return nccl_bad(n, -EINVAL, "ncclAllReduce(%zu %s, sum): no %s buffer", count,
                        type_name(type), send ? "receive" : "send");
    if (!(comm = live_comm(n, "ncclAllReduce")))
        return -ECANCELED;
    result = n->api.all_reduce((const void *)(uintptr_t)send, (void *)(uintptr_t)recv, count,
                               (int)type, WK_NCCL_ABI_SUM, comm, stream);
    snprintf(call, sizeof(call), "ncclAllReduce(%zu %s, sum)", count, type_name(type));
    return settle_or_abort(n, comm, result, call);
}

int wk_nccl_allreduce_sum(wk_nccl_t *n, wk_cuda_stream stream, wk_cuda_ptr send, wk_cuda_ptr recv,
                          size_t count)
{
    return wk_nccl_allreduce_sum_of(n, stream, send, recv, count, WK_NCCL_FP32);
}

int wk_nccl_split(wk_nccl_t *n, int color, int key, wk_nccl_t **out)
{
    wk_nccl_abi_comm_t comm, child = NULL;
    wk_nccl_t *sub = NULL;
    char call[64];
    int result, rc;

    *out = NULL;
    if (color < 0 && color != WK_NCCL_NO_COLOR)
        return nccl_bad(n, -EINVAL, "ncclCommSplit: color %d is negative (and not NO_COLOR)",
                        color);
    if (!(comm = live_comm(n, "ncclCommSplit")))
        return -ECANCELED;
    if (!(sub = calloc(1, sizeof(*sub))))
        return nccl_bad(n, -ENOMEM, "ncclCommSplit: out of memory");
    /* a NULL config: the child takes the parent's (non-blocking with it) */
    snprintf(call, sizeof(call), "ncclCommSplit(color %d, key %d)", color, key);
    result = n->api.comm_split(comm, color, key, &child, NULL);
    if ((rc = settle(n, child ? child : comm, result, call)) < 0) {
        free(sub);
        if (child)
            n->api.comm_abort(child);
        return rc;
    }
    if (!child) { /* WK_NCCL_NO_COLOR */
        free(sub);
        return 0;
    }
    sub->api = n->api;
    sub->comm = child;
    sub->nonblocking = n->nonblocking;
    sub->wait = n->wait;
    if ((result = n->api.comm_count(child, &sub->nranks)) != WK_NCCL_ABI_SUCCESS ||
        (result = n->api.comm_user_rank(child, &sub->rank)) != WK_NCCL_ABI_SUCCESS) {
        nccl_fail(n, child, result, "ncclCommCount/UserRank of the split (color %d, key %d)", color,
                  key);
        wk_nccl_abort(sub);
        free(sub);
        return -EIO;
    }
    *out = sub;
    return 0;
}

int wk_nccl_check(wk_nccl_t *n)
{
    wk_nccl_abi_comm_t comm;
    int result, async = WK_NCCL_ABI_SUCCESS;

    if (!(comm = live_comm(n, "ncclCommGetAsyncError")))
        return -ECANCELED;
    if ((result = n->api.comm_get_async_error(comm, &async)) != WK_NCCL_ABI_SUCCESS)
        return nccl_fail(n, comm, result, "ncclCommGetAsyncError");
    if (async != WK_NCCL_ABI_SUCCESS && async != WK_NCCL_ABI_IN_PROGRESS)
        return nccl_fail(n, comm, async, "an operation in flight on the communicator");
    return 0;
}

int wk_nccl_abort(wk_nccl_t *n)
{
    wk_nccl_abi_comm_t comm = __atomic_exchange_n(&n->comm, NULL, __ATOMIC_ACQ_REL);
    int result;

    if (!comm)
        return 0; /* aborted or destroyed already */
    if ((result = n->api.comm_abort(comm)) != WK_NCCL_ABI_SUCCESS)
        return nccl_fail(n, NULL, result, "ncclCommAbort");
    return 0;
}
