/* rank.h - the rank trainer of the cpu and cuda backends: this rank's share
 * of real fp32 training, on the host or (with a GPU, worker/cuda/) on the
 * device, driven op by op by the runtime's executor walk (worker/runtime.h).
 *
 * Layout. The job's model is cut into the schedule's stages (layers split
 * evenly; the embedding with stage 0, the head with the last); this rank
 * holds the stages of its pipeline rank (one, or two for DualPipe and
 * DualPipeV), one model chunk each. Its ep_rank-th share of every
 * micro-batch is sequences [ep_rank * B/ep, (ep_rank + 1) * B/ep) of the
 * micro-batch that DP rank dp_rank reads (worker/rank/data.h), so any layout
 * trains on the same global batch as the standalone trainer.
 *
 * Messages (through wk_rank_io, on the data plane):
 *  - pipeline: a SEND carries the forward's output or the backward's input
 *    gradient to the same (dp, ep) ranks at the peer pipeline rank;
 *  - experts: every MoE layer routes its tokens, dispatches the rows of
 *    each expert to the ep rank that owns it (Assignment.expert_owner),
 *    which runs them concatenated in ep-rank order (so in the order one
 *    process would) and sends the outputs back; the backward does the same
 *    with gradients; the owner computes its experts' weight gradients;
 *  - step end: every stage's gradients, expert loads and loss are summed
 *    over all ranks holding that stage (DualPipe's two copies, the ep group
 *    and the DP replicas) at the group's first member, in member order, and
 *    sent back, so every copy takes the same AdamW step bitwise. Routed
 *    experts are summed over the ep group too (non-owners add zeros), which
 *    keeps every rank's copy of every expert equal.
 *
 * Gradients are of the global mean loss: each share's mean loss gradient,
 * summed, divided by dp * microbatches * ep.
 */
#ifndef WK_RANK_H
#define WK_RANK_H

#include <stddef.h>
#include <stdint.h>

#include "common/ckpt.h"
#include "job/jobspec.h"
#include "pipeline/schedule.h"
#include "worker/job.h"
#include "worker/net/dataplane.h"

/* How the backend moves messages: the runtime's waits (abort, timeouts,
 * hidden-communication accounting). `to`/`from` describe the peer for
 * error messages. Each returns 0 or -errno. */
struct wk_rank_io {
    int (*send)(void *arg, const char *addr, const struct wk_net_key *key, const void *buf,
                size_t len, const char *to);
    int (*recv)(void *arg, const struct wk_net_key *key, const char *from, struct wk_net_msg **out);
    void *arg;
};

/* What one step did on this rank. */
struct wk_rank_step {
    int has_loss;            /* this rank holds the head: loss is the job's */
    double loss;             /* the global mean loss of the step */
    uint64_t tokens;         /* tokens of the whole step (every rank's shares) */
    double sync_ms;          /* gradient sums and the optimizer step */
    uint64_t *expert_tokens; /* [n_expert_slots]: rows this rank's experts ran */
    size_t n_expert_slots;
};

/* The longest reason a call gives (longer ones are cut). */
#define WK_RANK_ERR_MAX 512

/* The most expert-parallel ranks one stage may have. */
#define WK_RANK_MAX_EP 64

typedef struct wk_rank wk_rank_t;
struct wk_rank_engine;

/* How long the cuda backend's NCCL calls wait for the other ranks (the
 * join at the first message, the first connection of a channel) before
 * the job fails, unless set otherwise (wk_rank_set_nccl_timeout). */
#define WK_RANK_NCCL_TIMEOUT_MS 300000

/* Builds this rank's chunks from the job (its spec, schedule, ranks and
 * expert slots) and loads its checkpoint if it names one (-EUCLEAN when
 * that fails: missing, torn, or of another layout). It sends to the job's
 * peers that the Assignment names (wk_job.peers; this rank never talks to
 * the others) and keeps copies of what it needs from job. data_dir: the
 * training text (NULL: WK_DATA_DIR_DEFAULT). eng: where the model computes
 * (worker/rank/trainer.h): the host engine (worker/cpu/host.h) or the
 * device engine (worker/cuda/engine.h), which takes the worker's GPU as
 * device (NULL for the host). 0, or -errno with the reason in err. */
void wk_rank_set_nccl_timeout(wk_rank_t *c, int ms); /* ms > 0 */
int wk_rank_create(const struct wk_job *job, const dp_sched_t *sched, const char *data_dir,
                   const struct wk_rank_io *io, const struct wk_rank_engine *eng, void *device,
                   wk_rank_t **out, char *err, size_t errlen);
void wk_rank_destroy(wk_rank_t *c);

/* Before a step's ops: clears gradients and per-step counters. */
void wk_rank_step_begin(wk_rank_t *c, uint64_t step);

/* The executor's callbacks. 0, or -errno with the reason in err. */
int wk_rank_compute(wk_rank_t *c, const struct dp_op *op, char *err, size_t errlen);
int wk_rank_send(wk_rank_t *c, const struct dp_op *op, char *err, size_t errlen);
int wk_rank_recv(wk_rank_t *c, const struct dp_op *op, char *err, size_t errlen);

/* After the ops: sums gradients over each stage's group, takes the
 * optimizer step. out's arrays stay valid until the next call. */
int wk_rank_step_end(wk_rank_t *c, struct wk_rank_step *out, char *err, size_t errlen);

/* Writes this rank's shard of the checkpoint taken after `step`:
 * ROOT/job-J/step-SSSSSSSS/rank-dD-pP-eE.ckpt (common/ckpt.h), written to a
 * temporary file, synced and renamed. Sections: every chunk's model
 * (wk_model_ckpt_add) and "meta" (i64: format 1, step, pp, ep, dp, pp_rank,
 * ep_rank, dp_rank). dir gets the step directory's absolute path, info the
 * shard's file name, size and checksum. 0, or -errno with the reason. */
int wk_rank_checkpoint(wk_rank_t *c, const char *root, uint64_t step, char *dir, size_t dirlen,
                       struct dx_ckpt_shard_info *info, char *err, size_t errlen);

/* Makes the cuda backend's NCCL transfers that wait for peers give up (a
 * job aborted because another rank failed). Any thread; idempotent. */
void wk_rank_abort(wk_rank_t *c);

/* The job spec the assignment carried. */
const struct job_spec *wk_rank_spec(const wk_rank_t *c);

/* The step of the checkpoint the assignment started from (loaded by
 * wk_rank_create after checking the manifest, the shard's size and checksum
 * and its layout), or 0 for a fresh start. */
uint64_t wk_rank_start_step(const wk_rank_t *c);

/* The largest payload this rank receives on the data plane (for
 * wk_net_set_max_msg): a pipeline activation or gradient (B/ep * seq_len
 * * d_model floats), with ep > 1 an expert exchange (experts int32 counts,
 * then up to B/ep * seq_len * top_k rows of d_model floats), a step-end
 * sum of one of its chunks (its gradients, expert loads and loss), or an
 * IPC ring's descriptor, whichever is largest. */
size_t wk_rank_max_msg(const wk_rank_t *c);

#endif
