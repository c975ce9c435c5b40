/* trainer.h - the rank trainer's inside, for its engines only: the host
 * engine (worker/cpu/) and the device engine (worker/cuda/engine.c). The
 * trainer (worker/rank/rank.c) owns the layout, the slots, the op dispatch,
 * the pipeline messages through the hosts, the step-end sums through the
 * hosts and the checkpoints; an engine owns where the model computes (its
 * slots' caches, its links) and fills struct wk_rank_engine. Everything
 * else sees worker/rank/rank.h. */
#ifndef WK_RANK_TRAINER_H
#define WK_RANK_TRAINER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pipeline/schedule.h"
#include "worker/model/model.h"
#include "worker/rank/data.h"
#include "worker/rank/rank.h"

/* "ranks (pp P, ep E, dp D) at ADDR" */
#define WK_RANK_PEER_NAME_MAX 320

/* One (path, micro-batch, stage) this rank runs. */
struct wk_rank_slot {
    int path, mb, stage, chunk;
    int ready;                     /* the engine's part is allocated */
    float *x_in, *x_out, *dy, *dx; /* [rows][d]: received input, output, received dy, dx */
    int32_t *tokens;               /* [Bl][T + 1]: with the embedding or the head */
    void *eng;                     /* the engine's part (its caches, device buffers) */
};

/* One stage this rank holds. */
struct wk_rank_chunk {
    int stage, first, last, flags;
    struct wk_model model; /* the host model: it computes on the host, else it keeps the
                              shapes and the checkpoints */
};

/* Where the model computes. Ops marked optional may be NULL. Each int op
 * returns 0 or -errno with the reason left by wk_rank_fail (or an io's). */
struct wk_rank_engine {
    const char *name; /* the backend's, for errors */
    /* an FB pair runs its backward first (it enqueues without waiting) */
    bool fb_backward_first;
    /* optional: after the chunks are made (and loaded from a checkpoint);
     * device: what the backend opened (worker/backend.h) */
    int (*setup)(wk_rank_t *c, const struct wk_job *job, void *device);
    /* optional: waits for the work in flight and closes the links (before
     * the slots are freed) */
    void (*stop)(wk_rank_t *c);
    /* optional: frees what setup made (after the slots) */
    void (*teardown)(wk_rank_t *c);
    int (*slot_init)(wk_rank_t *c, struct wk_rank_slot *s);
    void (*slot_free)(wk_rank_t *c, struct wk_rank_slot *s); /* s->eng may be NULL */
    /* prev / next: the local neighbour stage's slot of this micro-batch
     * (DualPipeV's turn), else NULL: the input is s->x_in / s->dy */
    int (*forward)(wk_rank_t *c, struct wk_rank_slot *s, const struct wk_rank_slot *prev,
                   float *loss);
    int (*backward)(wk_rank_t *c, struct wk_rank_slot *s, const struct wk_rank_slot *next,
                    enum dp_op_kind kind); /* DP_OP_B, DP_OP_I or DP_OP_W */
    /* optional: a pipeline SEND / RECV of slot s. 1: the engine moved it;
     * 0: the trainer sends the host buffer (which send filled) or receives
     * into it, then calls received */
    int (*send)(wk_rank_t *c, struct wk_rank_slot *s, const struct dp_op *op);
    int (*recv)(wk_rank_t *c, struct wk_rank_slot *s, const struct dp_op *op);
    int (*received)(wk_rank_t *c, struct wk_rank_slot *s, const struct dp_op *op);
    void (*step_begin)(wk_rank_t *c); /* optional */
    /* the sums over every stage's ranks (*loss: the head's loss sum), then
     * gradients times scale and the optimizer step */
    int (*step_end)(wk_rank_t *c, float scale, double *loss, int *has_loss);
    int (*to_host)(wk_rank_t *c); /* optional: the host models take the engine's state */
    void (*abort)(wk_rank_t *c);  /* optional; any thread */
    /* the largest payload it receives, given the trainer's own */
    size_t (*max_msg)(const wk_rank_t *c, size_t trainer_max);
};

struct wk_rank {
    struct job_spec spec;
    struct wk_model_config mcfg;
    const dp_sched_t *sched;
    const struct wk_rank_engine *eng;
    void *eng_state; /* the engine's */
    struct wk_rank_io io;
    uint64_t job_id;
    uint32_t attempt;
    int pp, ep, dp, pp_rank, ep_rank, dp_rank;
    int S, paths, Mp, M, B, Bl, T, d, E, top_k, H;
    char **addr; /* [dp][pp][ep]: the peers' data addresses, NULL: not talked to */
    int *owner;  /* [experts]: ep rank computing each expert */
    int nchunks;
    struct wk_rank_chunk chunk[2];
    struct wk_rank_slot **slots; /* [paths][Mp][S] */
    struct wk_data data;
    int data_open;
    int32_t *batch; /* [B][T + 1] scratch */
    uint64_t step;
    double loss_sum;  /* sum of this rank's share losses */
    int64_t *ex_rows; /* [experts]: rows this rank's experts ran this step */
    int32_t *slot_expert;
    size_t n_slots_ex;
    uint64_t *expert_tokens;
    uint8_t *sync_buf;
    size_t sync_cap;
    uint64_t start_step;       /* the checkpoint's step, or 0 */
    int nccl_timeout_ms;       /* how long a join waits for the other ranks */
    atomic_int aborted;        /* wk_rank_abort was called */
    char err[WK_RANK_ERR_MAX]; /* the failing call's reason (report copies it out) */
    bool io_failed;            /* the call's io failed: its reason is in the caller's err */
};

/* Leaves the reason of a failure (printf-like) and returns rc. */
int wk_rank_fail(wk_rank_t *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Whether this call's failure already has its reason (ours or the io's). */
bool wk_rank_has_reason(const wk_rank_t *c);

/* The io's send and receive, noting a failure (its reason is the io's). */
int wk_rank_send_msg(wk_rank_t *c, const char *addr, const struct wk_net_key *key, const void *buf,
                     size_t len, const char *to);
int wk_rank_recv_msg(wk_rank_t *c, const struct wk_net_key *key, const char *from,
                     struct wk_net_msg **out);

/* The rank index of (dp, pp, ep). */
int wk_rank_index(const wk_rank_t *c, int dp, int pp, int ep);

/* "ranks (pp 1, ep 0, dp 0) at tcp://..." for error messages. */
const char *wk_rank_peer_name(const wk_rank_t *c, int index, char *buf, size_t len);

/* A message key of this attempt and step with payload. */
struct wk_net_key wk_rank_key(const wk_rank_t *c, int payload);

/* Bytes of one activation (or its gradient) of this rank's share. */
size_t wk_rank_act_bytes(const wk_rank_t *c);

/* The ranks holding stage st, as rank indices in member order (by DP
 * rank, then holding pipeline rank, then ep rank); out holds
 * 2 * dp * ep. Returns how many. */
int wk_rank_stage_members(const wk_rank_t *c, int st, int *out);

/* The step-end sums through the hosts (over the data plane): every
 * chunk's host gradients, expert loads and loss summed over its stage's
 * ranks at the first member, in member order, and sent back. */
int wk_rank_host_sums(wk_rank_t *c, double *loss, int *has_loss);

#endif
