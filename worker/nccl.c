/* nccl.c - NCCL communicators of the cuda backend, through the library
 * worker/cuda.c opened (see nccl.h). */
#include "worker/nccl.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NCCL_ERR_LEN 512

struct wk_nccl {
    struct wk_nccl_api api;
    wk_nccl_abi_comm_t comm; /* NULL once aborted; exchanged atomically */
    int nranks, rank;
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
    if (!lib) {
        snprintf(err, errlen, "NCCL is not open (libnccl.so.2 was not loaded)");
        return -ENOENT;
    }
    for (size_t i = 0; i < sizeof(nccl_symbols) / sizeof(nccl_symbols[0]); i++) {
        void *sym;

        dlerror();
        sym = dlsym(lib, nccl_symbols[i].name);
        if (!sym) {
            const char *why = dlerror();
            snprintf(err, errlen, "NCCL has no %s: %s", nccl_symbols[i].name,
                     why ? why : "symbol is NULL");
            memset(api, 0, sizeof(*api));
            return -ENOENT;
        }
        /* POSIX: a data pointer from dlsym converts to a function pointer */
        memcpy((char *)api + nccl_symbols[i].offset, &sym, sizeof(sym));
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

/* --- ids and communicators ----------------------------------------------- */

int wk_nccl_unique_id(const wk_cuda_t *c, unsigned char out[WK_NCCL_ID_BYTES], char *err,
                      size_t errlen)
{
    struct wk_nccl_api api;
    wk_nccl_abi_id id;
    int rc, result;

    if (!c || !out) {
        snprintf(err, errlen, "wk_nccl_unique_id: no CUDA stack or no output buffer");
        return -EINVAL;
    }
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

int wk_nccl_create(wk_cuda_t *c, const unsigned char id[WK_NCCL_ID_BYTES], int nranks, int rank,
                   wk_nccl_t **out, char *err, size_t errlen)
{
    struct wk_nccl_api api;
    int rc;

    *out = NULL;
    if (!c) {
        snprintf(err, errlen, "wk_nccl_create: no CUDA stack");
        return -EINVAL;
    }
    if ((rc = wk_nccl_api_load(wk_cuda_nccl_library(c), &api, err, errlen)) < 0)
        return rc;
    return wk_nccl_create_api(&api, id, nranks, rank, out, err, errlen);
}

int wk_nccl_create_api(const struct wk_nccl_api *api, const unsigned char id[WK_NCCL_ID_BYTES],
                       int nranks, int rank, wk_nccl_t **out, char *err, size_t errlen)
{
    wk_nccl_t *n = NULL;
    wk_nccl_abi_id abi_id;
    wk_nccl_abi_comm_t comm = NULL;
    char call[96];
    int result;

    *out = NULL;
    if (!api || !id) {
        snprintf(err, errlen, "wk_nccl_create: no NCCL entry points or no NCCL unique id");
        return -EINVAL;
    }
    if (nranks < 1 || rank < 0 || rank >= nranks) {
        snprintf(err, errlen, "wk_nccl_create: rank %d is outside a communicator of %d ranks", rank,
                 nranks);
        return -EINVAL;
    }
    if (!(n = calloc(1, sizeof(*n)))) {
        snprintf(err, errlen, "wk_nccl_create: out of memory");
        return -ENOMEM;
    }
    n->api = *api;
    memcpy(abi_id.internal, id, WK_NCCL_ID_BYTES);
    if ((result = n->api.comm_init_rank(&comm, nranks, abi_id, rank)) != WK_NCCL_ABI_SUCCESS)
        goto fail;
    n->comm = comm;
    n->nranks = nranks;
    n->rank = rank;
    *out = n;
    return 0;
fail:
    snprintf(call, sizeof(call), "ncclCommInitRank(rank %d of %d)", rank, nranks);
    format_nccl_error(&n->api, comm, result, call, err, errlen);
    /* a handle NCCL left behind is freed without waiting for the peers */
    if (comm)
        n->api.comm_abort(comm);
    free(n);
    return -EIO;
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
    if (n > 0 && !t) {
        snprintf(err, errlen, "%zu transfers but no list", n);
        return -EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        const char *dir = t[i].recv ? "receive from" : "send to";

        if (t[i].recv != 0 && t[i].recv != 1) {
            snprintf(err, errlen, "transfer %zu: recv is %d, not 0 (send) or 1 (receive)", i,
                     t[i].recv);
            return -EINVAL;
        }
        if (t[i].peer < 0 || t[i].peer >= nranks) {
            snprintf(err, errlen, "transfer %zu: %s rank %d of a communicator of %d ranks", i, dir,
                     t[i].peer, nranks);
            return -EINVAL;
        }
        if (t[i].type != WK_NCCL_BYTES && t[i].type != WK_NCCL_FP32) {
            snprintf(err, errlen, "transfer %zu: %s rank %d: unknown element type %d", i, dir,
                     t[i].peer, (int)t[i].type);
            return -EINVAL;
        }
        if (t[i].count > 0 && t[i].buf == 0) {
            snprintf(err, errlen, "transfer %zu: %s rank %d: %zu %s with no device buffer", i, dir,
                     t[i].peer, t[i].count, type_name(t[i].type));
            return -EINVAL;
        }
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
        if (result != WK_NCCL_ABI_SUCCESS)
            rc = nccl_fail(n, comm, result, "%s(%zu %s, %s rank %d; transfer %zu of %zu)",
                           x->recv ? "ncclRecv" : "ncclSend", x->count, type_name(x->type),
                           x->recv ? "from" : "to", x->peer, i, count);
    }
    /* the group is closed even after a failed call, so the next one starts
     * clean; the first error is the one reported */
    if ((result = n->api.group_end()) != WK_NCCL_ABI_SUCCESS && rc == 0)
        rc = nccl_fail(n, comm, result, "ncclGroupEnd(%zu transfers)", count);
    return rc;
}

int wk_nccl_allreduce_sum_of(wk_nccl_t *n, wk_cuda_stream stream, wk_cuda_ptr send,
                             wk_cuda_ptr recv, size_t count, enum wk_nccl_type type)
{
    wk_nccl_abi_comm_t comm;
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
    if (result != WK_NCCL_ABI_SUCCESS)
        return nccl_fail(n, comm, result, "ncclAllReduce(%zu %s, sum)", count, type_name(type));
    return 0;
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
    int result;

    *out = NULL;
    if (color < 0 && color != WK_NCCL_NO_COLOR)
        return nccl_bad(n, -EINVAL, "ncclCommSplit: color %d is negative (and not NO_COLOR)",
                        color);
    if (!(comm = live_comm(n, "ncclCommSplit")))
        return -ECANCELED;
    if (!(sub = calloc(1, sizeof(*sub))))
        return nccl_bad(n, -ENOMEM, "ncclCommSplit: out of memory");
    /* a NULL config: the child takes the parent's */
    result = n->api.comm_split(comm, color, key, &child, NULL);
    if (result != WK_NCCL_ABI_SUCCESS) {
        free(sub);
        if (child)
            n->api.comm_abort(child);
        return nccl_fail(n, comm, result, "ncclCommSplit(color %d, key %d)", color, key);
    }
    if (!child) { /* WK_NCCL_NO_COLOR */
        free(sub);
        return 0;
    }
    sub->api = n->api;
    sub->comm = child;
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
