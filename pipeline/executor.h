/* executor.h - walks one rank's op list of a schedule and calls the
 * backend for each op.
 *
 * The executor owns the order of a step, not the work: compute ops (F, B,
 * I, W, FB) go to compute(), SEND to send(), RECV to recv(), one after
 * another in the rank's list. The first callback that returns an error
 * stops the walk and its value is returned. It also keeps the
 * weight-gradient FIFO honest: every I queues its weight-gradient job, and
 * a W must name the oldest queued job (else -EPROTO, before the W is run).
 * Pure C: no I/O, no threads, no global state.
 */
#ifndef DP_EXECUTOR_H
#define DP_EXECUTOR_H

#include <stddef.h>

#include "pipeline/schedule.h"

/* Each returns 0 to go on, or a negative errno that stops the walk. */
struct dp_exec_callbacks {
    int (*compute)(const struct dp_op *op, void *arg);
    int (*send)(const struct dp_op *op, void *arg);
    int (*recv)(const struct dp_op *op, void *arg);
};

typedef struct dp_exec dp_exec_t;

/* An executor for `rank` of s (which must outlive it). Returns 0, -EINVAL
 * for a rank out of range or a missing callback, or -ENOMEM. */
int dp_exec_create(const dp_sched_t *s, int rank, const struct dp_exec_callbacks *cb, void *arg,
                   dp_exec_t **out);

void dp_exec_destroy(dp_exec_t *e);

/* Runs the rank's ops once (one step). Returns 0 when every op ran, the
 * first callback error, or -EPROTO when a W is not the oldest queued
 * weight-gradient job (or there is none, or the step ends with jobs still
 * queued); then err names the op and the problem. After a failure,
 * dp_exec_failed_op gives the index of the op it stopped at. */
int dp_exec_run(dp_exec_t *e, char *err, size_t errlen);

/* The index of the op the last dp_exec_run stopped at, or the rank's op
 * count when it ran to the end. */
size_t dp_exec_failed_op(const dp_exec_t *e);

#endif
