/* xchg.h - the transport of the cuda backend's expert exchange: grouped
 * sends and receives among the ep ranks of one (dp, pp) slice, with the
 * contract of wk_nccl_exchange (transfers between two ranks pair up in
 * list order), each one carried by CUDA IPC when the peer runs on this
 * node and by NCCL otherwise.
 *
 * IPC: a ring per ordered pair of same-node ranks, in the receiver's
 * memory (worker/cuda/comm/ipcring.h; descriptors through the caller's byte channel
 * at creation); per peer a send stream and a receive stream, so that both
 * directions move at once. A call cuts each transfer into pieces of at
 * most WK_IPCRING_LINK_PIECE bytes and launches one transport kernel per
 * peer and direction on the pieces' absolute addresses (so every buffer
 * must be 16-byte aligned); the caller's stream waits for them by events.
 * Each kernel's per-channel outcome lands in a record that wk_xchg_check
 * reads back (call it when the streams' work is done, e.g. at the step's
 * end). Without NCCL every peer must be on this node. 0 or -errno; the
 * reason in err or wk_xchg_error. */
#ifndef WK_XCHG_H
#define WK_XCHG_H

#include <stddef.h>

#include "worker/cuda/gpu.h"
#include "worker/cuda/comm/nccl.h"

typedef struct wk_xchg wk_xchg_t;

struct wk_xchg_config {
    wk_gpu_t *gpu;
    int ranks, rank;      /* the ep ranks, this one */
    const int *same_node; /* [ranks]: rank r runs on this node */
    wk_nccl_t *comm;      /* the ep ranks' communicator, or NULL */
    int max_calls;        /* calls between two wk_xchg_check, at most */
    /* the rings' descriptors, to and from peer (ep rank) */
    int (*send_bytes)(void *arg, int peer, const void *buf, size_t len);
    int (*recv_bytes)(void *arg, int peer, void *buf, size_t cap, size_t *len);
    void *arg;
};

/* Collective over the same-node ranks (their rings). */
int wk_xchg_create(const struct wk_xchg_config *cfg, wk_xchg_t **out, char *err, size_t errlen);
void wk_xchg_destroy(wk_xchg_t *x);
const char *wk_xchg_error(const wk_xchg_t *x);
/* "2 by IPC, 1 by NCCL" */
const char *wk_xchg_describe(const wk_xchg_t *x);

/* Every transfer of t (none to this rank itself) on stream s's order:
 * returns once queued. */
int wk_xchg_run(wk_xchg_t *x, wk_cuda_stream s, const struct wk_nccl_transfer *t, size_t n);
/* Every IPC transfer since the last check succeeded (the streams' work
 * must be done): -EIO naming the first that did not. Resets the records. */
int wk_xchg_check(wk_xchg_t *x);
/* IPC transfers that wait give up: the rings' abort words are set (the
 * caller aborts its NCCL communicator). Another thread may call it. */
void wk_xchg_abort(wk_xchg_t *x);

#endif
