/* placement.h - where a job's ranks run: a gang of pp x ep x dp workers
 * taken from the idle ones, placed by topology.
 *
 * Rules, in order of importance:
 *  1. each EP group (the ep workers of one pipeline rank of one DP replica,
 *     which exchange tokens every layer) stays inside one node whenever
 *     some node has room for all of it;
 *  2. consecutive pipeline ranks of a replica go on the same or the next
 *     node (nodes are taken in name order, GPUs in index order), so
 *     pipeline traffic stays local or crosses one hop;
 *  3. DP replicas are placed one after the other, so different replicas
 *     land on different nodes when the cluster has room for that.
 */
#ifndef JOB_PLACEMENT_H
#define JOB_PLACEMENT_H

#include <stddef.h>

struct coord_slot {
    const char *worker_id;
    const char *node;
    int gpu;
};

struct job_placement {
    int pp, ep, dp;
    int *slot;        /* [dp][pp][ep]: index into the slots given to place() */
    int split_groups; /* EP groups that had to span nodes */
};

/* Places a pp x ep x dp gang on `n` free slots (any order). Returns 0,
 * -ENOSPC when there are fewer free slots than the gang needs (err says how
 * many are missing), -EINVAL for bad sizes, or -ENOMEM. */
int job_place(const struct coord_slot *slots, size_t n, int pp, int ep, int dp,
              struct job_placement *out, char *err, size_t errlen);

/* The slot index of (dp, pp, ep) rank. */
static inline int job_placement_at(const struct job_placement *p, int d, int s, int e)
{
    return p->slot[((size_t)d * p->pp + s) * p->ep + e];
}

void job_placement_clear(struct job_placement *p);

#endif
