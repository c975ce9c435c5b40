/* plink.h - the cuda backend's pipeline links: how one rank's activations
 * and gradients go to and come from its two pipeline neighbours, GPU to
 * GPU. A link is one direction of one neighbour (send up, receive up, send
 * down, receive down; "up" is the neighbour at pp_rank + 1), with a stream
 * of its own, and of one of three kinds:
 *
 *   IPC  - the neighbour is on this node: a ring in the receiver's device
 *          memory (worker/cuda/comm/ipcring.h), exported by CUDA IPC; its descriptor
 *          goes to the sender through the caller's byte channel (the data
 *          plane); messages move with the transport kernels of
 *          kernels/transport.cu on WK_IPCRING_LINK_CHANNELS SMs, split into
 *          pieces of at most WK_IPCRING_LINK_PIECE bytes;
 *   NCCL - the neighbour is elsewhere and the job has a communicator: a
 *          2-rank communicator per pair and direction, split from it (the
 *          four splits are collective over the whole job);
 *   HOST - neither: the caller moves the message through the hosts.
 *
 * A send waits for its producer's stream (an event) and a receive makes its
 * consumer's stream wait: the host never waits for a message. Each link is
 * FIFO: the k-th send of a link meets the k-th receive of its peer's.
 * wk_plink_create is collective: both neighbours create their links at
 * their first message, and the whole job does when NCCL is used. IPC
 * transfers report errors (a timeout: the transport kernels give up after
 * about a minute without progress, or at once on wk_plink_abort) in device
 * records that
 * wk_plink_step_end reads back. 0 or -errno; the reason in err or
 * wk_plink_error. */
#ifndef WK_PLINK_H
#define WK_PLINK_H

#include <stddef.h>

#include "worker/cuda/gpu.h"
#include "worker/cuda/comm/nccl.h"

enum wk_plink_kind { WK_PLINK_HOST, WK_PLINK_IPC, WK_PLINK_NCCL };

typedef struct wk_plink wk_plink_t;

struct wk_plink_config {
    wk_gpu_t *gpu;
    int pp, pp_rank;
    wk_nccl_t *world; /* the job's communicator, or NULL: no NCCL */
    int color_base;   /* the pair (r, r + 1)'s communicators: color color_base + r */
    int same_node[2]; /* [0]: the neighbour below is on this node, [1]: above */
    size_t msg_bytes; /* every message's size (IPC: a multiple of 16, else NCCL) */
    int max_msgs;     /* messages one link carries in a step, at most */
    /* the IPC rings' descriptors: to the neighbour that sends into our
     * ring, and from the one whose ring we send into */
    int (*send_bytes)(void *arg, int peer, const void *buf, size_t len);
    int (*recv_bytes)(void *arg, int peer, void *buf, size_t cap, size_t *len);
    void *arg;
};

int wk_plink_create(const struct wk_plink_config *cfg, wk_plink_t **out, char *err, size_t errlen);
/* Waits for the links' work, then frees everything. NULL is ignored. */
void wk_plink_destroy(wk_plink_t *l);
const char *wk_plink_error(const wk_plink_t *l);

/* How messages to / from pipeline rank peer (a neighbour) travel. */
enum wk_plink_kind wk_plink_kind(const wk_plink_t *l, int peer);
/* "IPC up, NCCL down" */
const char *wk_plink_describe(const wk_plink_t *l);

/* msg_bytes of buf to peer once producer's work so far is done. */
int wk_plink_send(wk_plink_t *l, int peer, wk_cuda_stream producer, wk_cuda_ptr buf);
/* msg_bytes from peer into buf; consumer's later work waits for it. */
int wk_plink_recv(wk_plink_t *l, int peer, wk_cuda_stream consumer, wk_cuda_ptr buf);

/* The step's transfers done (buffers are reused next step) and every IPC
 * transfer checked: -EIO naming the first failed one. */
int wk_plink_step_end(wk_plink_t *l);

/* Every link gives up what it waits for: NCCL's communicators are
 * aborted, the IPC rings' abort words set (their kernels then stop with
 * -ECANCELED; the peer's too). Another thread may call it. */
void wk_plink_abort(wk_plink_t *l);

#endif
