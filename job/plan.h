/* plan.h - the plan of a job on the cluster as it is: which worker runs
 * which (dp, pp, ep) rank, the stages and experts each holds, and the
 * schedule's simulated summary at the spec's sim costs. `duplexctl submit
 * --dry-run` shows it; starting a job will follow it. */
#ifndef JOB_PLAN_H
#define JOB_PLAN_H

#include <jansson.h>
#include <stddef.h>

#include "job/eplb.h"
#include "job/jobspec.h"
#include "job/placement.h"
#include "pipeline/simulate.h"

/* Builds the plan of spec on the free slots. Returns 0 with a new JSON
 * object in *out (see docs/PROTOCOL.md, SubmitReply), -ENOSPC when the
 * slots cannot hold the job, -EINVAL, or -ENOMEM; err says why. */
int job_plan_build(const struct job_spec *spec, const struct coord_slot *slots, size_t n,
                   json_t **out, char *err, size_t errlen);

/* The job's schedule simulated at its spec's sim costs (ms). */
struct job_plan_sim {
    struct dp_costs costs;
    double makespan_ms, bubble_ms;
    int peak_activations; /* the most over ranks */
    int stages, param_copies;
};

/* Generates and simulates the spec's schedule. Returns 0 or -errno with
 * err. */
int job_plan_simulate(const struct job_spec *spec, struct job_plan_sim *out, char *err,
                      size_t errlen);

/* The model stages pipeline rank r holds; returns how many (1 or 2). */
int job_plan_stages(const struct job_spec *spec, int r, int stages[2]);

/* The job's ranks are numbered (dp * pp + pp_rank) * ep + ep_rank: the
 * order of Assignment.peers' positions, of job_ranks.idx, and the NCCL
 * rank of the cuda backend. */
int job_plan_rank_index(const struct job_spec *spec, int dp, int pp, int ep);

/* The ranks rank (d, p, e) exchanges data with, itself included, as rank
 * indices in ascending order: its pipeline neighbours (pp ranks p - 1 and
 * p + 1 of its dp and ep ranks: every schedule sends activations and
 * gradients only there), its EP group (every ep rank of its dp and pp
 * ranks), and for each stage it holds the group that sums that stage's
 * gradients (every dp and ep rank of the pipeline ranks holding the
 * stage): its root only (the member of dp rank 0, the lowest holder, ep
 * rank 0), or every member when it is the root. Each rank's Assignment
 * carries these peers only, so a job's Assignments grow as O(ranks), not
 * O(ranks^2). out holds job_plan_peers_max(spec) entries. Returns how
 * many. */
int job_plan_peers(const struct job_spec *spec, int d, int p, int e, int *out);
int job_plan_peers_max(const struct job_spec *spec);

/* The expert placement of one EP group: EPLB over the job's experts (one
 * layer; EP rank e holds slots e*R/ep .. (e+1)*R/ep-1 of plan->phy2log).
 * loads (tokens per expert, may be NULL) are what workers reported so far;
 * with none, every expert counts the same. With parallel.max_nodes set,
 * EPLB's hierarchical policy runs with gcd(expert_groups, ep) "nodes" of
 * consecutive EP ranks, so whole groups stay on one EP rank (or on one run
 * of consecutive ranks when there are fewer groups than ranks) and
 * node-limited routing keeps its promise on any placement that keeps such
 * runs on one node. */
int job_plan_experts(const struct job_spec *spec, const double *loads, struct job_eplb_plan *plan,
                     char *err, size_t errlen);

/* The dispatch rule of the workers (Assignment.expert_owner): expert x is
 * computed by the first EP rank holding one of its replicas (slot / per-rank
 * slots), or x * ep / experts when none does. owner has plan->experts
 * entries. */
void job_plan_expert_owner(const struct job_eplb_plan *plan, int ep, int *owner);

/* Checks parallel.max_nodes on a placement: in every EP group (dp, pp) and
 * for every choice of model.group_limit groups a token may make, the nodes
 * its top_k experts can be sent to (the owners' nodes) number at most
 * max_nodes. Returns 0 (also when max_nodes is 0), -EINVAL naming the EP
 * group, the groups and the nodes of a token that would cross the limit
 * (or, past a search budget, saying the limit could not be proven), or
 * -ENOMEM. */
int job_plan_check_nodes(const struct job_spec *spec, const struct coord_slot *slots,
                         const struct job_placement *place, const struct job_eplb_plan *plan,
                         char *err, size_t errlen);

#endif
