/* job.h - one job attempt as this worker runs it: the Assignment
 * (proto/duplex.proto) decoded once into a plain struct and checked, so
 * that nothing past the agent reads protobuf. The runtime decodes it;
 * backends' engines read it while they are built (worker/backend.h) and
 * keep copies of what they need. */
#ifndef WK_JOB_H
#define WK_JOB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "job/jobspec.h"
#include "pipeline/schedule.h"
#include "proto/duplex.pb-c.h"

/* The most ranks a job may have (pp * ep * dp): one worker each, far more
 * than a fleet has. */
#define WK_JOB_MAX_RANKS 65536

/* The longest reason wk_job_decode gives for a spec that does not parse. */
#define WK_JOB_SPEC_ERR_MAX 256

/* One rank of the job as the Assignment names it. */
struct wk_job_peer {
    char *worker_id; /* NULL: the Assignment names no worker for this rank */
    char *data_addr; /* its data plane ("" when the Assignment gives none) */
    char *curve_key; /* its data plane's CURVE key ("" in clear) */
    char *node;      /* its worker's node ("" unknown) */
    int gpu;         /* its worker's GPU index on that node */
};

/* Whether the Assignment carries a job spec, and whether it parsed. */
enum wk_job_spec_state {
    WK_JOB_SPEC_NONE, /* no spec_json, or an empty one */
    WK_JOB_SPEC_BAD,  /* it does not parse: spec_error says why */
    WK_JOB_SPEC_OK,
};

struct wk_job {
    uint64_t job_id;
    uint32_t attempt;
    uint64_t steps;
    enum dp_sched_kind kind;
    int pp, ep, dp;                 /* the layout */
    int pp_rank, ep_rank, dp_rank;  /* this rank's place in it */
    int microbatches;               /* per step */
    int nranks;                     /* pp * ep * dp */
    double cost_ms[DP_OP_RECV + 1]; /* sim: each compute op kind's modelled cost */
    struct wk_job_peer *peers;      /* [nranks] by rank index (wk_job_index) */
    int32_t *stages;                /* the stages this rank runs */
    size_t n_stages;
    int32_t *experts; /* the expert of each of this rank's expert slots */
    size_t n_experts;
    int32_t *expert_owner; /* [n_expert_owner]: each expert's ep rank (0: default) */
    size_t n_expert_owner;
    char *checkpoint; /* the step directory to start from ("": fresh) */
    uint8_t *nccl_id; /* cuda: the attempt's NCCL unique id (n_nccl_id bytes) */
    size_t n_nccl_id;
    char *shared_gpu; /* cuda: why two ranks share a GPU ("": none do) */
    enum wk_job_spec_state spec_state;
    char spec_error[WK_JOB_SPEC_ERR_MAX]; /* WK_JOB_SPEC_BAD: why */
    struct job_spec spec;                 /* WK_JOB_SPEC_OK: the whole spec, every field given */
};

/* Decodes a into *out: the schedule known, the ranks inside the layout,
 * each peer inside it and named once. The job spec is parsed when there
 * is one; a spec that does not parse is kept as spec_error for the
 * backends that need it (the sim backend does not). 0, or -errno with the
 * reason in err. */
int wk_job_decode(const Duplex__Assignment *a, struct wk_job **out, char *err, size_t errlen);
void wk_job_destroy(struct wk_job *j);

/* The rank index of (dp, pp, ep): (dp * pp_count + pp) * ep_count + ep,
 * as job_plan_rank_index numbers them. */
int wk_job_index(const struct wk_job *j, int dp, int pp, int ep);

/* The pipeline rank pp of this rank's dp and ep ranks. */
const struct wk_job_peer *wk_job_line(const struct wk_job *j, int pp);

/* The worker the Assignment gives rank index at, or "?" (for messages). */
const char *wk_job_worker(const struct wk_job *j, int at);

/* Checks that every rank this one exchanges data with (job_plan_peers) is
 * named, with a data address, and with a CURVE key when curve; and, with
 * self_id, that the Assignment gives this rank to self_id. 0, or -EINVAL
 * with the reason in err. */
int wk_job_check_peers(const struct wk_job *j, const char *self_id, bool curve, char *err,
                       size_t errlen);

#endif
