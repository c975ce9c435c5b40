/* simulate.h - discrete-event simulation of a schedule with per-op costs.
 *
 * Each rank runs its ops in order. A compute op starts when its rank is free
 * and every message it receives has arrived; a message sent at the end of
 * its producing op arrives latency + bytes / bandwidth later. Sends never
 * block. Results: makespan, per-rank busy and idle time, the bubble (the
 * largest per-rank idle time, which is what the DualPipe README's formulas
 * give), peak live activations, and every op's start and end.
 */
#ifndef DP_SIMULATE_H
#define DP_SIMULATE_H

#include <stddef.h>

#include "pipeline/schedule.h"

struct dp_costs {
    double f;          /* forward of one chunk */
    double b;          /* full backward */
    double i;          /* input-gradient backward; default b - w */
    double w;          /* weight-gradient job */
    double fb;         /* overlapped forward + backward pair ("F&B"); default f + b */
    double latency;    /* per message */
    double bandwidth;  /* bytes per time unit; 0 means messages take no transfer time */
    double act_bytes;  /* size of one activation message */
    double grad_bytes; /* size of one gradient message */
};

/* F=1, B=2, W=1, I=1, FB=3, no communication cost. */
void dp_costs_default(struct dp_costs *c);

/* Parses "F=1,B=2,W=1,FB=2,I=1,lat=0.1,bw=1e9,act=4096,grad=4096" over the
 * current values (keys are case-insensitive; I defaults to B-W and FB to
 * F+B unless given). Returns 0 or -EINVAL with the bad key or value named. */
int dp_costs_parse(const char *spec, struct dp_costs *c, char *err, size_t errlen);

struct dp_sim_result {
    int ranks;
    double makespan;
    double bubble;         /* max over ranks of idle */
    double *busy;          /* [ranks] */
    double *idle;          /* [ranks]: makespan - busy */
    int *peak_activations; /* [ranks] */
    double **start;        /* [ranks][op index]: start time (sends/receives: when done) */
    double **end;          /* [ranks][op index] */
};

/* Simulates s at costs c. Returns 0 and fills r (free it with
 * dp_sim_result_clear), -EDEADLK with the stuck ranks named in err, -EINVAL
 * for a negative or non-finite cost or a malformed op (named in err), or
 * -ENOMEM. */
int dp_simulate(const dp_sched_t *s, const struct dp_costs *c, struct dp_sim_result *r, char *err,
                size_t errlen);

void dp_sim_result_clear(struct dp_sim_result *r);

#endif
