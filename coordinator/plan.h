/* plan.h - the plan of a job on the cluster as it is: which worker runs
 * which (dp, pp, ep) rank, the stages and experts each holds, and the
 * schedule's simulated summary at the spec's sim costs. `duplexctl submit
 * --dry-run` shows it; starting a job will follow it. */
#ifndef COORD_PLAN_H
#define COORD_PLAN_H

#include <jansson.h>
#include <stddef.h>

#include "coordinator/eplb.h"
#include "coordinator/jobspec.h"
#include "coordinator/placement.h"
#include "pipeline/simulate.h"

/* Builds the plan of spec on the free slots. Returns 0 with a new JSON
 * object in *out (see docs/PROTOCOL.md, SubmitReply), -ENOSPC when the
 * slots cannot hold the job, -EINVAL, or -ENOMEM; err says why. */
int coord_plan_build(const struct coord_jobspec *spec, const struct coord_slot *slots, size_t n,
                     json_t **out, char *err, size_t errlen);

/* The job's schedule simulated at its spec's sim costs (ms). */
struct coord_plan_sim {
    struct dp_costs costs;
    double makespan_ms, bubble_ms;
    int peak_activations; /* the most over ranks */
    int stages, param_copies;
};

/* Generates and simulates the spec's schedule. Returns 0 or -errno with
 * err. */
int coord_plan_simulate(const struct coord_jobspec *spec, struct coord_plan_sim *out, char *err,
                        size_t errlen);

/* The model stages pipeline rank r holds; returns how many (1 or 2). */
int coord_plan_stages(const struct coord_jobspec *spec, int r, int stages[2]);

/* The expert placement of one EP group: EPLB over the job's experts (one
 * layer; EP rank e holds slots e*R/ep .. (e+1)*R/ep-1 of plan->phy2log).
 * loads (tokens per expert, may be NULL) are what workers reported so far;
 * with none, every expert counts the same. */
int coord_plan_experts(const struct coord_jobspec *spec, const double *loads,
                       struct coord_eplb_plan *plan, char *err, size_t errlen);

#endif
