/* admit.h - memory admission: whether a job's ranks fit the memory its
 * backend's workers said they have when they registered
 * (Register.memory_bytes), checked when a job is submitted (a dry run too)
 * so that a job too big for every worker is refused with the numbers
 * instead of growing a worker until the kernel kills it.
 *
 * The need per rank is job_spec_memory's total (job/jobspec.h).
 * The sim backend allocates no model and is never refused. A worker that
 * reported 0 (unknown) counts as fitting. A job is refused when fewer than
 * pp x ep x dp alive workers of its backend fit and at least one alive
 * worker of that backend is too small: a cluster that is only short of
 * workers is left to the capacity rules (the job waits or is refused as
 * before). Workers check again before they allocate (worker/runtime.h).
 */
#ifndef COORD_ADMIT_H
#define COORD_ADMIT_H

#include <stddef.h>
#include <stdint.h>

#include "job/jobspec.h"
#include "coordinator/registry.h"

/* Checks spec against the workers ws[0..n) (any state or backend; only the
 * alive ones of spec's backend count). Returns 0 when it may run, or
 * -ENOSPC with a text in err like "the job needs 34.2 GiB per rank
 * (parameters 12.1, ...); 1 of the 4 alive cpu workers have that much, it
 * needs 4 (pp 2 x ep 1 x dp 2); the largest cpu worker reports 15.6 GiB". */
int coord_admit_check(const struct job_spec *spec, struct coord_worker *const *ws, size_t n,
                      char *err, size_t errlen);

/* The same over every worker of reg (coord_registry_each: no allocation,
 * no sort; one pass). */
int coord_admit_registry(coord_registry_t *reg, const struct job_spec *spec, char *err,
                         size_t errlen);

#endif
