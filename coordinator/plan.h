/* plan.h - the plan of a job on the cluster as it is: which worker runs
 * which (dp, pp, ep) rank, the stages and experts each holds, and the
 * schedule's simulated summary at the spec's sim costs. `duplexctl submit
 * --dry-run` shows it; starting a job will follow it. */
#ifndef COORD_PLAN_H
#define COORD_PLAN_H

#include <jansson.h>
#include <stddef.h>

#include "coordinator/jobspec.h"
#include "coordinator/placement.h"

/* Builds the plan of spec on the free slots. Returns 0 with a new JSON
 * object in *out (see docs/PROTOCOL.md, SubmitReply), -ENOSPC when the
 * slots cannot hold the job, -EINVAL, or -ENOMEM; err says why. */
int coord_plan_build(const struct coord_jobspec *spec, const struct coord_slot *slots, size_t n,
                     json_t **out, char *err, size_t errlen);

#endif
