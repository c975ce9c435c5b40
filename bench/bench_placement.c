/* bench_placement.c - placement of a DeepSeek-V3-shaped job: PP 16 x EP 64 x
 * DP 2 on 256 nodes x 8 GPUs (gang placement), then EPLB for one EP group:
 * 58 MoE layers x 256 experts in 8 groups, 320 slots on 64 GPUs in 8 nodes
 * (one redundant expert per GPU). Best of several runs, milliseconds. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "job/eplb.h"
#include "job/placement.h"

#define NODES 256
#define GPUS_PER_NODE 8
#define LAYERS 58
#define EXPERTS 256
#define GROUPS 8
#define EP 64
#define SLOTS 320
#define RUNS 5

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(void)
{
    static struct coord_slot slots[NODES * GPUS_PER_NODE];
    static char ids[NODES * GPUS_PER_NODE][24], nodes[NODES][16];
    static float w[LAYERS * EXPERTS];
    double best_place = 1e9, best_eplb = 1e9, imbalance = 0;
    char err[256];

    for (int n = 0; n < NODES; n++)
        snprintf(nodes[n], sizeof(nodes[n]), "node%03d", n);
    for (int i = 0; i < NODES * GPUS_PER_NODE; i++) {
        snprintf(ids[i], sizeof(ids[i]), "node%03d-gpu%d", i / GPUS_PER_NODE, i % GPUS_PER_NODE);
        slots[i] = (struct coord_slot){ids[i], nodes[i / GPUS_PER_NODE], i % GPUS_PER_NODE};
    }
    srand(42);
    for (int i = 0; i < LAYERS * EXPERTS; i++)
        w[i] = (float)(100 + rand() % 10000);
    for (int run = 0; run < RUNS; run++) {
        struct job_placement p;
        struct job_eplb_plan plan;
        double t0 = now_ms(), t1, t2;

        if (job_place(slots, NODES * GPUS_PER_NODE, 16, EP, 2, &p, err, sizeof(err)) < 0) {
            fprintf(stderr, "place: %s\n", err);
            return 1;
        }
        t1 = now_ms();
        if (job_eplb_rebalance(w, LAYERS, EXPERTS, SLOTS, GROUPS, EP / GPUS_PER_NODE, EP, &plan,
                               err, sizeof(err)) < 0) {
            fprintf(stderr, "eplb: %s\n", err);
            return 1;
        }
        t2 = now_ms();
        best_place = t1 - t0 < best_place ? t1 - t0 : best_place;
        best_eplb = t2 - t1 < best_eplb ? t2 - t1 : best_eplb;
        imbalance = 0;
        for (int l = 0; l < LAYERS; l++)
            imbalance += job_eplb_imbalance(w, &plan, l) / LAYERS;
        if (run == 0)
            printf("split EP groups: %d\n", p.split_groups);
        job_placement_clear(&p);
        job_eplb_plan_clear(&plan);
    }
    printf("gang placement, 2048 workers (pp 16 x ep 64 x dp 2): %.2f ms\n", best_place);
    printf("EPLB, 58 layers x 256 experts -> 320 slots on 64 GPUs / 8 nodes: %.2f ms "
           "(mean imbalance %.3f)\n",
           best_eplb, imbalance);
    printf("total: %.2f ms (target: under 100 ms)\n", best_place + best_eplb);
    return 0;
}
