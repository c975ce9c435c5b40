/* validate.h - checks any schedule (generated, hand-written or corrupted)
 * and reports the first violation in words.
 *
 * Rules, in the order they are checked:
 *   1. every op is well-formed: kinds, ranges, and the work runs on the rank
 *      and chunk that hold its (path, stage);
 *   2. every (path, mb, stage) has exactly one forward, and exactly one
 *      backward: either one B, or one I plus one W (W after its I);
 *   3. W runs the oldest queued weight-gradient job of its rank (FIFO);
 *   4. on each rank the backward of (path, mb, stage) comes after its
 *      forward;
 *   5. every send has its receive and the other way round: for each ordered
 *      pair of ranks the sequence of messages sent equals the sequence
 *      received; a forward of stage s > 0 on another rank than stage s-1 is
 *      preceded on its rank by the receive of that activation, a backward of
 *      stage s < S-1 by the receive of that gradient, and the producer sends
 *      after it computed;
 *   6. executing all ranks with eager sends and blocking receives finishes
 *      (no deadlock): otherwise the ranks that are stuck and what they wait
 *      for are named.
 * It also measures what a rank holds: the peak number of live activations
 * (a forward's activation lives until its B or I; an FB counts its forward
 * before its backward frees) and the parameter copies (model chunks).
 */
#ifndef DP_VALIDATE_H
#define DP_VALIDATE_H

#include <stddef.h>

#include "pipeline/schedule.h"

struct dp_validation {
    int ranks;
    int *peak_activations; /* [ranks], in units of one stage's activation for one micro-batch */
    int max_peak_activations;
    int param_copies; /* model chunks held per rank */
};

/* Returns 0 and fills v (free it with dp_validation_clear), or -EINVAL with
 * the first violation in err ("rank 3, op 17 (B d5 stage 3): ..."), or
 * -ENOMEM. */
int dp_validate(const dp_sched_t *s, struct dp_validation *v, char *err, size_t errlen);

void dp_validation_clear(struct dp_validation *v);

#endif
