/* schedule.h - pipeline schedules as data.
 *
 * A schedule says, for every pipeline rank, the ordered list of ops that rank
 * runs in one training step: forwards (F), full backwards (B), input-gradient
 * backwards (I) whose weight-gradient job is queued, weight-gradient jobs (W,
 * always the oldest queued one), overlapped forward+backward pairs (FB), and
 * the point-to-point sends and receives those imply. The library is pure C:
 * no I/O, no global state; every function works on the schedule it is given.
 *
 * Model. Micro-batches travel along a path through the model's stages
 * 0..S-1. A unit of work is (path, mb, stage); the rank that holds that stage
 * for that path runs it with one of its model chunks.
 *
 *   kind        ranks  stages  chunks/rank  paths  micro-batches per path
 *   1f1b, zb1p  P      P       1            1      N
 *   dualpipe    P      P       2            2      N/2   (path 0 "d" enters at rank 0,
 *                                                        path 1 "u" enters at rank P-1;
 *                                                        rank r holds stages r and P-1-r)
 *   dualpipev   P      2P      2            1      N     (rank r holds stages r and 2P-1-r)
 *
 * Messages. The forward of (path, mb, s) sends its activation to the rank of
 * stage s+1 (unless s is last); the backward (B or I) of (path, mb, s) sends
 * its gradient to the rank of stage s-1 (unless s is first). A message is
 * named by its payload and the producer's (path, mb, stage). When both ends
 * are on one rank (DualPipeV's turn at rank P-1) nothing is sent.
 *
 * Execution semantics used by the validator and the simulator: sends are
 * eager (they never block); a receive blocks until its message was sent.
 * Messages between an ordered pair of ranks arrive in the order sent.
 */
#ifndef DP_SCHEDULE_H
#define DP_SCHEDULE_H

#include <stddef.h>

enum dp_sched_kind {
    DP_SCHED_1F1B,
    DP_SCHED_ZB1P,
    DP_SCHED_DUALPIPE,
    DP_SCHED_DUALPIPEV,
};

enum dp_op_kind {
    DP_OP_F,    /* forward of .work */
    DP_OP_B,    /* full backward of .work (input and weight gradients) */
    DP_OP_I,    /* input-gradient backward of .work; its weight-gradient job is queued */
    DP_OP_W,    /* the oldest queued weight-gradient job; .work names it */
    DP_OP_FB,   /* overlapped: forward of .work and full backward of .work2, together */
    DP_OP_SEND, /* sends .payload named by .work to .peer */
    DP_OP_RECV, /* receives .payload named by .work from .peer (blocks until sent) */
};

enum dp_payload {
    DP_ACTIVATION,
    DP_GRADIENT,
};

/* One unit of model work. For SEND and RECV: the message's producer
 * (path, mb, stage), and chunk is the local chunk that produced (SEND) or
 * will consume (RECV) it. */
struct dp_work {
    int path;  /* 0 or 1 (see the table above) */
    int mb;    /* micro-batch index within its path */
    int stage; /* global stage index */
    int chunk; /* which of this rank's model chunks (0 or 1) */
};

struct dp_op {
    enum dp_op_kind kind;
    struct dp_work work;
    struct dp_work work2;    /* DP_OP_FB: the backward half */
    int peer;                /* DP_OP_SEND, DP_OP_RECV: the other rank */
    enum dp_payload payload; /* DP_OP_SEND, DP_OP_RECV */
};

typedef struct dp_sched dp_sched_t;

/* Limits on what a schedule may be asked for. */
#define DP_MAX_RANKS 1024
#define DP_MAX_MICROBATCHES 65536

/* Builds the schedule `kind` for P ranks and N micro-batches. Returns 0, or
 * -EINVAL with a message saying which rule P or N breaks, or -ENOMEM. */
int dp_sched_generate(enum dp_sched_kind kind, int ranks, int microbatches, dp_sched_t **out,
                      char *err, size_t errlen);

/* Checks that `kind` can be built for P ranks and N micro-batches without
 * building it. Returns 0 or -EINVAL with the rule broken in err. */
int dp_sched_check(enum dp_sched_kind kind, int ranks, int microbatches, char *err, size_t errlen);

/* An empty schedule of that shape, for hand-written schedules. Checks only
 * the limits, not the kind's own rules. Returns NULL on bad sizes or ENOMEM. */
dp_sched_t *dp_sched_create(enum dp_sched_kind kind, int ranks, int microbatches);
void dp_sched_destroy(dp_sched_t *s);

/* Appends one op to a rank's list. Returns 0, -EINVAL (bad rank) or -ENOMEM. */
int dp_sched_append(dp_sched_t *s, int rank, const struct dp_op *op);

/* Appends a compute op (F, B, I, W or FB) with the receives it needs before
 * it and the sends it makes after it. Returns 0 or -errno. */
int dp_sched_append_compute(dp_sched_t *s, int rank, const struct dp_op *op);

/* Appends the SEND or RECV of `payload` that the local compute work implies:
 * for a RECV the work consumes the message (the producer is the previous
 * stage for an activation, the next for a gradient), for a SEND it produced
 * it. Nothing is appended at a path's ends or when the other stage is on the
 * same rank. Returns 0 or -errno. */
int dp_sched_append_message(dp_sched_t *s, int rank, enum dp_op_kind kind, enum dp_payload payload,
                            const struct dp_work *local);

/* Removes the op at index from a rank's list. Returns 0 or -EINVAL. */
int dp_sched_remove(dp_sched_t *s, int rank, size_t index);

/* A rank's ops; *n gets their count. The mutable form lets tests corrupt a
 * schedule; callers must keep the count unchanged. */
const struct dp_op *dp_sched_ops(const dp_sched_t *s, int rank, size_t *n);
struct dp_op *dp_sched_ops_mut(dp_sched_t *s, int rank, size_t *n);

enum dp_sched_kind dp_sched_kind(const dp_sched_t *s);
int dp_sched_ranks(const dp_sched_t *s);
int dp_sched_microbatches(const dp_sched_t *s); /* N, all paths together */
int dp_sched_stages(const dp_sched_t *s);
int dp_sched_paths(const dp_sched_t *s);
int dp_sched_path_microbatches(const dp_sched_t *s); /* per path */
int dp_sched_chunks_per_rank(const dp_sched_t *s);

/* Where (path, stage) runs: its rank and that rank's chunk. Returns 0 or
 * -EINVAL for a path or stage out of range. */
int dp_sched_locate(const dp_sched_t *s, int path, int stage, int *rank, int *chunk);

/* "1f1b", "zb1p", "dualpipe", "dualpipev"; parse returns 0 or -EINVAL. */
const char *dp_sched_kind_name(enum dp_sched_kind kind);
int dp_sched_kind_parse(const char *name, enum dp_sched_kind *out);

/* "F", "B", "I", "W", "FB", "SEND", "RECV". */
const char *dp_op_kind_name(enum dp_op_kind kind);

/* True for F, B, I, W and FB. */
int dp_op_is_compute(enum dp_op_kind kind);

#endif
