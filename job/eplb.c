/* eplb.c - DeepSeek's expert-parallelism load balancer (see eplb.h). */
#include "job/eplb.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

#define EPLB_MAX_DIM (1 << 20)

/* Items visited in order of weight descending; ties keep index order. */
struct weighted {
    float w;
    int index;
};

static int weighted_desc(const void *a, const void *b)
{
    const struct weighted *x = a, *y = b;

    if (x->w != y->w)
        return x->w > y->w ? -1 : 1;
    return x->index - y->index; /* stable: lower index first */
}

/* Packs n items into m packs of exactly n/m items each, greedily: heaviest
 * first, into the lightest pack that is not full (lowest index on ties).
 * scratch holds n weighted + 2m floats/ints. */
static void balanced_packing(const float *w, int n, int m, int *pack, int *rank_in_pack,
                             struct weighted *order, float *pack_w, int *pack_n)
{
    int per_pack = n / m;

    if (per_pack == 1) {
        for (int i = 0; i < n; i++) {
            pack[i] = i;
            rank_in_pack[i] = 0;
        }
        return;
    }
    for (int i = 0; i < n; i++)
        order[i] = (struct weighted){w[i], i};
    qsort(order, (size_t)n, sizeof(*order), weighted_desc);
    for (int k = 0; k < m; k++) {
        pack_w[k] = 0.0f;
        pack_n[k] = 0;
    }
    for (int i = 0; i < n; i++) {
        int item = order[i].index, best = -1;
        for (int k = 0; k < m; k++) {
            if (pack_n[k] < per_pack && (best < 0 || pack_w[k] < pack_w[best]))
                best = k;
        }
        pack[item] = best;
        rank_in_pack[item] = pack_n[best]++;
        pack_w[best] += w[item];
    }
}

/* Gives `num_log` experts `num_phy` slots: slots 0..num_log-1 hold one copy
 * each, every further slot goes to the expert with the highest load per
 * replica (first on ties). */
static void replicate_experts(const float *w, int num_log, int num_phy, int *phy2log, int *rank,
                              int *cnt)
{
    for (int e = 0; e < num_log; e++) {
        phy2log[e] = e;
        rank[e] = 0;
        cnt[e] = 1;
    }
    for (int i = num_log; i < num_phy; i++) {
        int best = 0;
        float best_load = w[0] / (float)cnt[0];
        for (int e = 1; e < num_log; e++) {
            float load = w[e] / (float)cnt[e];
            if (load > best_load) {
                best = e;
                best_load = load;
            }
        }
        phy2log[i] = best;
        rank[i] = cnt[best]++;
    }
}

/* Per-layer scratch space, sized for the largest step. */
struct eplb_scratch {
    float *group_w, *node_w, *slot_w, *pack_w;
    int *gpack, *grank, *log2mlog, *mlog2log;
    int *phy2mlog, *phyrank, *mlogcnt, *spack, *srank, *pphy2phy, *pack_n;
    struct weighted *order;
};

static void scratch_free(struct eplb_scratch *s)
{
    free(s->group_w);
    free(s->node_w);
    free(s->slot_w);
    free(s->pack_w);
    free(s->gpack);
    free(s->grank);
    free(s->log2mlog);
    free(s->mlog2log);
    free(s->phy2mlog);
    free(s->phyrank);
    free(s->mlogcnt);
    free(s->spack);
    free(s->srank);
    free(s->pphy2phy);
    free(s->pack_n);
    free(s->order);
}

static int scratch_alloc(struct eplb_scratch *s, int E, int R, int G)
{
    size_t big = (size_t)(R > E ? R : E) + 1;

    memset(s, 0, sizeof(*s));
    s->group_w = calloc((size_t)G, sizeof(float));
    s->node_w = calloc(big, sizeof(float));
    s->slot_w = calloc(big, sizeof(float));
    s->pack_w = calloc(big, sizeof(float));
    s->gpack = calloc((size_t)G, sizeof(int));
    s->grank = calloc((size_t)G, sizeof(int));
    s->log2mlog = calloc(big, sizeof(int));
    s->mlog2log = calloc(big, sizeof(int));
    s->phy2mlog = calloc(big, sizeof(int));
    s->phyrank = calloc(big, sizeof(int));
    s->mlogcnt = calloc(big, sizeof(int));
    s->spack = calloc(big, sizeof(int));
    s->srank = calloc(big, sizeof(int));
    s->pphy2phy = calloc(big, sizeof(int));
    s->pack_n = calloc(big, sizeof(int));
    s->order = calloc(big, sizeof(*s->order));
    if (!s->group_w || !s->node_w || !s->slot_w || !s->pack_w || !s->gpack || !s->grank ||
        !s->log2mlog || !s->mlog2log || !s->phy2mlog || !s->phyrank || !s->mlogcnt || !s->spack ||
        !s->srank || !s->pphy2phy || !s->pack_n || !s->order) {
        scratch_free(s);
        return -ENOMEM;
    }
    return 0;
}

/* The hierarchical policy for one layer (eplb.py,
 * rebalance_experts_hierarchical): groups -> nodes, replicas inside nodes,
 * slots -> GPUs. */
static void rebalance_layer(const float *w, int E, int R, int G, int nodes, int gpus,
                            struct eplb_scratch *s, int *phy2log, int *phyrank, int *logcnt)
{
    int gs = E / G, gpn = G / nodes, ppg = R / gpus;
    int e_node = E / nodes, r_node = R / nodes, g_node = gpus / nodes;

    /* 1. pack expert groups onto nodes; number experts node by node */
    for (int g = 0; g < G; g++) {
        float sum = 0.0f;
        for (int k = 0; k < gs; k++)
            sum += w[g * gs + k];
        s->group_w[g] = sum;
    }
    balanced_packing(s->group_w, G, nodes, s->gpack, s->grank, s->order, s->pack_w, s->pack_n);
    for (int e = 0; e < E; e++) {
        int g = e / gs;
        s->log2mlog[e] = (s->gpack[g] * gpn + s->grank[g]) * gs + e % gs;
        s->mlog2log[s->log2mlog[e]] = e;
    }
    for (int n = 0; n < nodes; n++) {
        const int *node_log = s->mlog2log + n * e_node;

        /* 2. replicate the node's experts over the node's slots */
        for (int j = 0; j < e_node; j++)
            s->node_w[j] = w[node_log[j]];
        replicate_experts(s->node_w, e_node, r_node, s->phy2mlog, s->phyrank, s->mlogcnt);
        /* 3. pack the node's slots onto its GPUs by load per replica */
        for (int k = 0; k < r_node; k++)
            s->slot_w[k] = s->node_w[s->phy2mlog[k]] / (float)s->mlogcnt[s->phy2mlog[k]];
        balanced_packing(s->slot_w, r_node, g_node, s->spack, s->srank, s->order, s->pack_w,
                         s->pack_n);
        for (int k = 0; k < r_node; k++)
            s->pphy2phy[s->spack[k] * ppg + s->srank[k]] = k;
        for (int pos = 0; pos < r_node; pos++) {
            int k = s->pphy2phy[pos];
            phy2log[n * r_node + pos] = node_log[s->phy2mlog[k]];
            phyrank[n * r_node + pos] = s->phyrank[k];
        }
        for (int j = 0; j < e_node; j++)
            logcnt[node_log[j]] = s->mlogcnt[j];
    }
}

static int check_args(const float *weight, int layers, int experts, int replicas, int groups,
                      int nodes, int gpus, char *err, size_t errlen)
{
    if (layers < 1 || experts < 1 || replicas < 1 || groups < 1 || nodes < 1 || gpus < 1 ||
        layers > EPLB_MAX_DIM || experts > EPLB_MAX_DIM || replicas > EPLB_MAX_DIM ||
        (long)layers * replicas > EPLB_MAX_DIM * 16L)
        return dx_errf(err, errlen, -EINVAL,
                       "layers (%d), experts (%d), replicas (%d), groups (%d), nodes (%d) and gpus "
                       "(%d) must all be positive and not huge",
                       layers, experts, replicas, groups, nodes, gpus);
    if (experts % groups != 0)
        return dx_errf(err, errlen, -EINVAL, "experts (%d) must divide into groups (%d)", experts,
                       groups);
    if (gpus % nodes != 0)
        return dx_errf(err, errlen, -EINVAL, "gpus (%d) must be a multiple of nodes (%d)", gpus,
                       nodes);
    if (replicas % gpus != 0)
        return dx_errf(err, errlen, -EINVAL, "replicas (%d) must be a multiple of gpus (%d)",
                       replicas, gpus);
    if (replicas < experts)
        return dx_errf(err, errlen, -EINVAL,
                       "replicas (%d) must be at least the number of experts (%d)", replicas,
                       experts);
    for (long i = 0; i < (long)layers * experts; i++) {
        if (!isfinite(weight[i]) || weight[i] < 0)
            return dx_errf(err, errlen, -EINVAL,
                           "load of layer %ld expert %ld is %g; loads must be finite and >= 0",
                           i / experts, i % experts, (double)weight[i]);
    }
    return 0;
}

int job_eplb_rebalance(const float *weight, int layers, int experts, int replicas, int groups,
                       int nodes, int gpus, struct job_eplb_plan *out, char *err, size_t errlen)
{
    struct eplb_scratch s;
    int *phyrank = NULL;
    int hierarchical, rc;

    memset(out, 0, sizeof(*out));
    if ((rc = check_args(weight, layers, experts, replicas, groups, nodes, gpus, err, errlen)) < 0)
        return rc;
    hierarchical = groups % nodes == 0;
    if (!hierarchical) { /* the global policy: one group, one node */
        groups = 1;
        nodes = 1;
    }
    if (scratch_alloc(&s, experts, replicas, groups) < 0)
        goto nomem;
    out->phy2log = calloc((size_t)layers * replicas, sizeof(int));
    out->logcnt = calloc((size_t)layers * experts, sizeof(int));
    phyrank = calloc((size_t)layers * replicas, sizeof(int));
    if (!out->phy2log || !out->logcnt || !phyrank)
        goto nomem_scratch;
    for (int l = 0; l < layers; l++)
        rebalance_layer(weight + (size_t)l * experts, experts, replicas, groups, nodes, gpus, &s,
                        out->phy2log + (size_t)l * replicas, phyrank + (size_t)l * replicas,
                        out->logcnt + (size_t)l * experts);
    for (long i = 0; i < (long)layers * experts; i++)
        if (out->logcnt[i] > out->max_count)
            out->max_count = out->logcnt[i];
    out->log2phy = malloc((size_t)layers * experts * (size_t)out->max_count * sizeof(int) + 1);
    if (!out->log2phy)
        goto nomem_scratch;
    memset(out->log2phy, 0xff, (size_t)layers * experts * out->max_count * sizeof(int));
    for (int l = 0; l < layers; l++) {
        for (int p = 0; p < replicas; p++) {
            int e = out->phy2log[(size_t)l * replicas + p];
            int r = phyrank[(size_t)l * replicas + p];
            out->log2phy[((size_t)l * experts + e) * out->max_count + r] = p;
        }
    }
    out->layers = layers;
    out->experts = experts;
    out->replicas = replicas;
    out->gpus = gpus;
    out->hierarchical = hierarchical;
    free(phyrank);
    scratch_free(&s);
    return 0;
nomem_scratch:
    scratch_free(&s);
nomem:
    free(phyrank);
    job_eplb_plan_clear(out);
    return dx_errf(err, errlen, -ENOMEM, "out of memory");
}

void job_eplb_plan_clear(struct job_eplb_plan *p)
{
    free(p->phy2log);
    free(p->log2phy);
    free(p->logcnt);
    memset(p, 0, sizeof(*p));
}

double job_eplb_imbalance(const float *weight, const struct job_eplb_plan *p, int layer)
{
    int per_gpu = p->replicas / p->gpus;
    const float *w = weight + (size_t)layer * p->experts;
    const int *phy2log = p->phy2log + (size_t)layer * p->replicas;
    const int *cnt = p->logcnt + (size_t)layer * p->experts;
    double total = 0.0, max = 0.0;

    for (int g = 0; g < p->gpus; g++) {
        double load = 0.0;
        for (int k = 0; k < per_gpu; k++) {
            int e = phy2log[g * per_gpu + k];
            load += (double)w[e] / cnt[e];
        }
        total += load;
        if (load > max)
            max = load;
    }
    return total > 0.0 ? max / (total / p->gpus) : 1.0;
}
