/* placement.c - gang placement of a job's ranks by topology (see
 * placement.h). */
#include "job/placement.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

struct node_free {
    const char *name;
    int *slots; /* free slot indices on this node, by GPU index */
    int n;      /* free left */
    int next;   /* next unused position in slots */
};

/* A free slot and where it came from, for sorting by topology. */
struct sorted_slot {
    const struct coord_slot *s;
    int index;
};

static int slot_cmp(const void *a, const void *b)
{
    const struct coord_slot *x = ((const struct sorted_slot *)a)->s;
    const struct coord_slot *y = ((const struct sorted_slot *)b)->s;
    int c = strcmp(x->node, y->node);
    if (c)
        return c;
    if (x->gpu != y->gpu)
        return x->gpu < y->gpu ? -1 : 1;
    return strcmp(x->worker_id, y->worker_id);
}

/* Takes count slots from node k into out. */
static void take(struct node_free *k, int count, int *out)
{
    for (int i = 0; i < count; i++)
        out[i] = k->slots[k->next++];
    k->n -= count;
}

int job_place(const struct coord_slot *slots, size_t n, int pp, int ep, int dp,
              struct job_placement *out, char *err, size_t errlen)
{
    struct node_free *nodes = NULL;
    struct sorted_slot *sorted = NULL;
    int *order = NULL;
    size_t need, nnodes = 0;
    int cursor = 0, rc = -ENOMEM;

    memset(out, 0, sizeof(*out));
    if (pp < 1 || ep < 1 || dp < 1 || (long)pp * ep * dp > 1 << 20)
        return dx_errf(err, errlen, -EINVAL, "pp %d x ep %d x dp %d is not a gang size", pp, ep,
                       dp);
    need = (size_t)pp * ep * dp;
    if (n < need)
        return dx_errf(err, errlen, -ENOSPC, "needs %zu workers, %zu are free (%zu missing)", need,
                       n, need - n);
    order = malloc(n * sizeof(int));
    sorted = malloc(n * sizeof(*sorted));
    nodes = calloc(n, sizeof(*nodes));
    out->slot = malloc(need * sizeof(int));
    if (!order || !sorted || !nodes || !out->slot)
        goto fail;
    /* group free slots by node, nodes in name order, GPUs in index order */
    for (size_t i = 0; i < n; i++)
        sorted[i] = (struct sorted_slot){&slots[i], (int)i};
    qsort(sorted, n, sizeof(*sorted), slot_cmp);
    for (size_t i = 0; i < n; i++)
        order[i] = sorted[i].index;
    for (size_t i = 0; i < n; i++) {
        if (nnodes == 0 || strcmp(nodes[nnodes - 1].name, slots[order[i]].node) != 0) {
            nodes[nnodes].name = slots[order[i]].node;
            nodes[nnodes].slots = &order[i];
            nnodes++;
        }
        nodes[nnodes - 1].n++;
    }
    out->pp = pp;
    out->ep = ep;
    out->dp = dp;
    for (int d = 0; d < dp; d++) {
        for (int s = 0; s < pp; s++) {
            int *group = out->slot + ((size_t)d * pp + s) * ep;
            int k = -1;

            /* the cursor node if it has room, else the next one that does */
            for (size_t j = 0; j < nnodes && k < 0; j++) {
                int c = (int)((cursor + j) % nnodes);
                if (nodes[c].n >= ep)
                    k = c;
            }
            if (k >= 0) {
                take(&nodes[k], ep, group);
                cursor = k;
                continue;
            }
            /* no node has room: spread the group over nodes in order */
            out->split_groups++;
            for (int got = 0; got < ep;) {
                while (nodes[cursor].n == 0)
                    cursor = (int)((cursor + 1) % nnodes);
                int t = nodes[cursor].n < ep - got ? nodes[cursor].n : ep - got;
                take(&nodes[cursor], t, group + got);
                got += t;
            }
        }
    }
    free(nodes);
    free(sorted);
    free(order);
    return 0;
fail:
    free(order);
    free(sorted);
    free(nodes);
    job_placement_clear(out);
    return dx_errf(err, errlen, rc, "out of memory");
}

void job_placement_clear(struct job_placement *p)
{
    free(p->slot);
    memset(p, 0, sizeof(*p));
}
