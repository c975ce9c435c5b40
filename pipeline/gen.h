/* gen.h - the schedule generators, called by dp_sched_generate once it has
 * checked P and N; each fills an empty schedule of the right shape. */
#ifndef DP_GEN_H
#define DP_GEN_H

#include "pipeline/schedule.h"

/* 1F1B, or with zero_bubble ZB-H1: backwards split into I now and W later,
 * rank r keeping r weight-gradient jobs deferred so that the gradient wave
 * carries only I. */
int dp_gen_1f1b(dp_sched_t *s, int zero_bubble);

/* DualPipe or DualPipeV (by the schedule's kind), in the reference's order. */
int dp_gen_dualpipe(dp_sched_t *s);

#endif
