/* nccl.h - NCCL for the cuda backend, resolved at run time from the
 * library worker/cuda/driver.c opened (wk_cuda_nccl_library): a communicator per
 * job attempt from the unique id duplexd hands out (Assignment.nccl_id),
 * grouped sends and receives between pipeline neighbours, the fp32 sum
 * all-reduce of mirror stages and data-parallel replicas, sub-communicators
 * by color and key, and an abort for recovery.
 *
 * duplex builds without nccl.h: this file declares the part of NCCL's ABI
 * it uses (the WK_NCCL_ABI_* values, struct wk_nccl_api); the unit test
 * tests/unit/test_nccl_abi.c checks them against <nccl.h> and the
 * installed libnccl.so.2.
 *
 * Calls on a communicator return 0, -EINVAL for bad arguments, -ECANCELED
 * once it was aborted, or -EIO with "ncclAllReduce(4096 fp32, sum): unhandled
 * cuda error (NCCL error 1): <NCCL's last error>" in wk_nccl_error(): the call
 * and NCCL's error string. The device's context must be current on the
 * calling thread (wk_cuda_context). NCCL cannot put two ranks of one
 * communicator on one GPU.
 */
#ifndef WK_NCCL_H
#define WK_NCCL_H

#include <stdatomic.h>
#include <stddef.h>

#include "worker/cuda/driver.h"

/* --- NCCL's ABI, as declared here ------------------------------------- */

#define WK_NCCL_ID_BYTES 128  /* NCCL_UNIQUE_ID_BYTES */
#define WK_NCCL_NO_COLOR (-1) /* NCCL_SPLIT_NOCOLOR */

/* ncclUniqueId: passed by value to ncclCommInitRank */
typedef struct {
    char internal[WK_NCCL_ID_BYTES];
} wk_nccl_abi_id;
/* ncclComm_t */
typedef struct wk_nccl_abi_comm *wk_nccl_abi_comm_t;

/* ncclResult_t (an int-sized enum) */
enum {
    WK_NCCL_ABI_SUCCESS = 0,
    WK_NCCL_ABI_UNHANDLED_CUDA_ERROR = 1,
    WK_NCCL_ABI_SYSTEM_ERROR = 2,
    WK_NCCL_ABI_INTERNAL_ERROR = 3,
    WK_NCCL_ABI_INVALID_ARGUMENT = 4,
    WK_NCCL_ABI_INVALID_USAGE = 5,
    WK_NCCL_ABI_REMOTE_ERROR = 6,
    WK_NCCL_ABI_IN_PROGRESS = 7,
};
/* ncclRedOp_t */
#define WK_NCCL_ABI_SUM 0

/* What a transfer carries: the values are ncclDataType_t's (ncclUint8,
 * ncclFloat32); counts are in elements of the type. */
enum wk_nccl_type {
    WK_NCCL_BYTES = 1,
    WK_NCCL_INT64 = 4,
    WK_NCCL_FP32 = 7,
    WK_NCCL_FP64 = 8,
};

/* ncclConfig_t as NCCL 2.14 declared it (its first version; later ones
 * read a config by its size and version, so every NCCL since takes this
 * one). Unset fields are WK_NCCL_ABI_UNDEF_INT / NULL. */
#define WK_NCCL_ABI_CONFIG_MAGIC 0xcafebeefu
#define WK_NCCL_ABI_CONFIG_VERSION 21400        /* NCCL_VERSION(2, 14, 0) */
#define WK_NCCL_ABI_UNDEF_INT (-2147483647 - 1) /* NCCL_CONFIG_UNDEF_INT (INT_MIN) */
struct wk_nccl_abi_config {
    size_t size;
    unsigned int magic, version;
    int blocking, cga_cluster_size, min_ctas, max_ctas;
    const char *net_name;
};

/* The entry points this module resolves (enums are passed as int, the
 * stream as a CUstream). */
struct wk_nccl_api {
    int (*get_version)(int *version);
    int (*get_unique_id)(wk_nccl_abi_id *id);
    int (*comm_init_rank)(wk_nccl_abi_comm_t *comm, int nranks, wk_nccl_abi_id id, int rank);
    int (*comm_destroy)(wk_nccl_abi_comm_t comm);
    int (*comm_abort)(wk_nccl_abi_comm_t comm);
    int (*comm_get_async_error)(wk_nccl_abi_comm_t comm, int *async_error);
    int (*comm_split)(wk_nccl_abi_comm_t comm, int color, int key, wk_nccl_abi_comm_t *newcomm,
                      void *config);
    int (*comm_count)(wk_nccl_abi_comm_t comm, int *count);
    int (*comm_user_rank)(wk_nccl_abi_comm_t comm, int *rank);
    const char *(*get_error_string)(int result);
    const char *(*get_last_error)(wk_nccl_abi_comm_t comm);
    int (*group_start)(void);
    int (*group_end)(void);
    int (*send)(const void *buf, size_t count, int type, int peer, wk_nccl_abi_comm_t comm,
                wk_cuda_stream stream);
    int (*recv)(void *buf, size_t count, int type, int peer, wk_nccl_abi_comm_t comm,
                wk_cuda_stream stream);
    int (*all_reduce)(const void *sendbuf, void *recvbuf, size_t count, int type, int op,
                      wk_nccl_abi_comm_t comm, wk_cuda_stream stream);
    /* optional (NCCL >= 2.14; NULL before): the non-blocking join */
    int (*comm_init_rank_config)(wk_nccl_abi_comm_t *comm, int nranks, wk_nccl_abi_id id, int rank,
                                 void *config);
};

/* Resolves every entry point from a dlopen handle of libnccl.so.2. 0, or
 * -ENOENT with err naming the first missing symbol and dlerror(). */
int wk_nccl_api_load(void *lib, struct wk_nccl_api *api, char *err, size_t errlen);

/* --- communicators ------------------------------------------------------ */

typedef struct wk_nccl wk_nccl_t;

/* ncclGetUniqueId: a new id (it starts NCCL's bootstrap root in this
 * process; needs no GPU). 0, -ENOENT (NCCL not open) or -EIO. */
int wk_nccl_unique_id(const wk_cuda_t *c, unsigned char out[WK_NCCL_ID_BYTES], char *err,
                      size_t errlen);

/* ncclCommInitRank: joins the communicator of id as rank of nranks; blocks
 * until every rank joined. 0, -EINVAL, -ENOENT (NCCL not open), -ENOMEM or
 * -EIO, with err saying why. */
int wk_nccl_create(wk_cuda_t *c, const unsigned char id[WK_NCCL_ID_BYTES], int nranks, int rank,
                   wk_nccl_t **out, char *err, size_t errlen);
/* The same from entry points already resolved (tests give a fake NCCL). */
int wk_nccl_create_api(const struct wk_nccl_api *api, const unsigned char id[WK_NCCL_ID_BYTES],
                       int nranks, int rank, wk_nccl_t **out, char *err, size_t errlen);

/* How long a rank waits for the others, and when to stop waiting. */
struct wk_nccl_wait {
    int timeout_ms;           /* > 0 */
    const atomic_int *cancel; /* give up once it is nonzero (another thread sets it), or NULL */
};
/* ncclCommInitRankConfig with a non-blocking config: joins the
 * communicator while polling, so a rank that never joins costs the others
 * timeout_ms, not a hang: -ETIMEDOUT ("ncclCommInitRankConfig(rank 1 of 4):
 * not every rank joined within 30 s"), or -ECANCELED once *cancel is set;
 * NCCL's half-made handle is aborted. The communicator and its splits stay
 * non-blocking: a call that must wait for the other ranks (a split, the
 * connection setup of a first send or receive) waits the same way. An
 * NCCL without ncclCommInitRankConfig (before 2.14) joins blocking. */
int wk_nccl_join(wk_cuda_t *c, const unsigned char id[WK_NCCL_ID_BYTES], int nranks, int rank,
                 const struct wk_nccl_wait *wait, wk_nccl_t **out, char *err, size_t errlen);
int wk_nccl_join_api(const struct wk_nccl_api *api, const unsigned char id[WK_NCCL_ID_BYTES],
                     int nranks, int rank, const struct wk_nccl_wait *wait, wk_nccl_t **out,
                     char *err, size_t errlen);
/* ncclCommDestroy (nothing more after wk_nccl_abort); NULL is ignored. */
void wk_nccl_destroy(wk_nccl_t *n);

int wk_nccl_rank(const wk_nccl_t *n);
int wk_nccl_size(const wk_nccl_t *n);
/* The last failed call and NCCL's error ("" when none). */
const char *wk_nccl_error(const wk_nccl_t *n);

/* One send or receive of a grouped exchange. */
struct wk_nccl_transfer {
    int recv; /* 0: send buf to peer; 1: receive into buf from peer */
    int peer; /* rank in the communicator (itself allowed) */
    enum wk_nccl_type type;
    wk_cuda_ptr buf;
    size_t count; /* elements of type; 0 is skipped */
};

/* Checks a list of transfers for a communicator of nranks: -EINVAL with err
 * naming the first bad entry. */
int wk_nccl_transfers_check(const struct wk_nccl_transfer *t, size_t n, int nranks, char *err,
                            size_t errlen);
/* Every transfer of t, in one ncclGroupStart/End on stream: sends and
 * receives between the same two ranks match in list order. Returns once
 * queued; the data moves with the stream. */
int wk_nccl_exchange(wk_nccl_t *n, wk_cuda_stream stream, const struct wk_nccl_transfer *t,
                     size_t count);
/* One group over several communicators: t[i] on comms[i], all on stream.
 * NCCL connects two ranks at their first transfer, and that first call
 * waits for the peer's; doing every channel's first transfer in one call
 * on every rank (at setup) means no schedule can deadlock on connecting.
 * 0 or -errno with the reason in err. */
int wk_nccl_exchange_across(wk_nccl_t *const *comms, wk_cuda_stream stream,
                            const struct wk_nccl_transfer *t, size_t count, char *err,
                            size_t errlen);
/* The sum of count elements of type (FP32, FP64 or INT64) over every rank
 * into recv on stream (send == recv is in place). */
int wk_nccl_allreduce_sum_of(wk_nccl_t *n, wk_cuda_stream stream, wk_cuda_ptr send,
                             wk_cuda_ptr recv, size_t count, enum wk_nccl_type type);
/* Sum of count fp32 over every rank into recv on stream (send == recv is
 * in place). */
int wk_nccl_allreduce_sum(wk_nccl_t *n, wk_cuda_stream stream, wk_cuda_ptr send, wk_cuda_ptr recv,
                          size_t count);
/* ncclCommSplit: every rank calls it; ranks of one color form a
 * communicator, ordered by key (then by rank). color WK_NCCL_NO_COLOR takes
 * part without joining one: *out is NULL. */
int wk_nccl_split(wk_nccl_t *n, int color, int key, wk_nccl_t **out);
/* ncclCommGetAsyncError: 0 while nothing failed (operations may still be
 * in flight), -EIO when a queued operation or a peer failed. Poll it while
 * waiting for the stream; on -EIO, abort. */
int wk_nccl_check(wk_nccl_t *n);
/* ncclCommAbort: stops what is in flight on the communicator and frees it
 * without waiting for the other ranks, so it does not hang on a dead peer;
 * may be called from another thread while one is blocked in a call on the
 * communicator. Later calls return -ECANCELED; wk_nccl_destroy still frees
 * the handle. 0 or -EIO (the communicator is gone either way). */
int wk_nccl_abort(wk_nccl_t *n);

#endif
