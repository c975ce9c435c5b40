/* eplb.h - expert placement: DeepSeek's expert-parallelism load balancer
 * (deepseek-ai/EPLB, eplb.py) in C.
 *
 * Given each MoE layer's load per logical expert, it decides how many
 * replicas every expert gets and which GPU slot holds each replica, so that
 * the busiest GPU carries as little as possible:
 *
 *  - hierarchical policy (when the expert groups divide by the nodes): expert
 *    groups are packed onto nodes, replicas are made inside each node, and
 *    the node's slots are packed onto its GPUs;
 *  - global policy otherwise: the same with one group and one node.
 *
 * Arithmetic is float32 like the reference; ties go to the lowest index
 * (stable sort, first argmax, lowest pack), so on inputs without ties the
 * result equals the reference's (replica order inside log2phy aside).
 */
#ifndef JOB_EPLB_H
#define JOB_EPLB_H

#include <stddef.h>

struct job_eplb_plan {
    int layers;
    int experts;   /* logical experts per layer */
    int replicas;  /* physical slots per layer */
    int max_count; /* the most replicas any expert has */
    int gpus;
    int hierarchical; /* 1 when the hierarchical policy was used */
    int *phy2log;     /* [layers][replicas]: logical expert in each slot */
    int *log2phy;     /* [layers][experts][max_count]: slots of each replica, -1 padded */
    int *logcnt;      /* [layers][experts]: replicas per expert */
};

/* weight is [layers][experts] loads (tokens). Slot p lives on GPU
 * p / (replicas / gpus) and node p / (replicas / nodes). Returns 0, or
 * -EINVAL naming the broken rule (experts % groups, gpus % nodes,
 * replicas % gpus, replicas >= experts, sizes, negative or non-finite
 * loads), or -ENOMEM. */
int job_eplb_rebalance(const float *weight, int layers, int experts, int replicas, int groups,
                       int nodes, int gpus, struct job_eplb_plan *out, char *err, size_t errlen);

void job_eplb_plan_clear(struct job_eplb_plan *p);

/* Load imbalance of one layer under the plan: the busiest GPU's load over
 * the mean GPU load (1.0 is perfect), where a slot carries its expert's
 * load divided by the expert's replica count. */
double job_eplb_imbalance(const float *weight, const struct job_eplb_plan *p, int layer);

#endif
