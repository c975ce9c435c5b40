/* twohop_ref.c - the two-hop dispatch layout and combine in plain C, the
 * reference of kernels/twohop.cu (contract in twohop_ref.h). */
#include "kernels/twohop_ref.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"

int dx_kref_twohop_check(const struct dx_twohop_topo *topo, const int *owner, int experts)
{
    if (!topo || topo->nodes < 1 || topo->nodes > DX_TWOHOP_MAX_NODES || topo->per_node < 1 ||
        topo->per_node > 1024 || experts < 1)
        return -EINVAL;
    for (int e = 0; e < experts; e++)
        if (owner[e] < 0 || owner[e] >= topo->nodes * topo->per_node)
            return -EINVAL;
    return 0;
}

/* Does token t (ids row) have an expert on node m? */
static int goes_to(const struct dx_twohop_topo *topo, const int *owner, const int *row, int k,
                   int m)
{
    for (int j = 0; j < k; j++)
        if (dx_twohop_node(topo, owner, row[j]) == m)
            return 1;
    return 0;
}

static int check_ids(const int *ids, int n, int k, int experts)
{
    if (n < 0 || k < 1)
        return -EINVAL;
    for (size_t i = 0; i < (size_t)n * k; i++)
        if (ids[i] < 0 || ids[i] >= experts)
            return -EINVAL;
    return 0;
}

int dx_kref_twohop_count(const struct dx_twohop_topo *topo, const int *owner, int experts,
                         const int *ids, int n, int k, int *node_tokens)
{
    int rc;

    if ((rc = dx_kref_twohop_check(topo, owner, experts)) < 0 ||
        (rc = check_ids(ids, n, k, experts)) < 0)
        return rc;
    for (int m = 0; m < topo->nodes; m++) {
        node_tokens[m] = 0;
        for (int t = 0; t < n; t++)
            node_tokens[m] += goes_to(topo, owner, ids + (size_t)t * k, k, m);
    }
    return 0;
}

int dx_kref_twohop_offsets(const int *node_tokens, int nodes, int *node_offset)
{
    node_offset[0] = 0;
    for (int m = 0; m < nodes; m++)
        node_offset[m + 1] = node_offset[m] + node_tokens[m];
    return node_offset[nodes];
}

int dx_kref_twohop_rows(const struct dx_twohop_topo *topo, const int *owner, int experts,
                        const int *ids, const float *gates, int n, int k, const int *node_offset,
                        int *send_token, int *token_node_slot, int *send_ids, float *send_gates)
{
    int N, rc;

    if ((rc = dx_kref_twohop_check(topo, owner, experts)) < 0 ||
        (rc = check_ids(ids, n, k, experts)) < 0 || (send_gates && !gates))
        return rc < 0 ? rc : -EINVAL;
    N = topo->nodes;
    /* node by node, tokens ascending: the kernel's block m does the same */
    for (int m = 0; m < N; m++) {
        int next = node_offset[m];
        for (int t = 0; t < n; t++) {
            const int *row = ids + (size_t)t * k;
            if (!goes_to(topo, owner, row, k, m)) {
                token_node_slot[(size_t)t * N + m] = -1;
                continue;
            }
            send_token[next] = t;
            token_node_slot[(size_t)t * N + m] = next;
            for (int j = 0; j < k; j++) {
                int here = dx_twohop_node(topo, owner, row[j]) == m;
                size_t o = (size_t)next * k + j;
                if (send_ids)
                    send_ids[o] = here ? row[j] : -1;
                if (send_gates)
                    send_gates[o] = here ? gates[(size_t)t * k + j] : 0.0f;
            }
            next++;
        }
    }
    return 0;
}

int dx_kref_twohop_forward(const struct dx_twohop_topo *topo, const int *owner, int experts,
                           int node, const int *recv_ids, const float *recv_gates, int nrecv, int k,
                           int *local_rows, int *local_offset, int *expert_slot, int *fwd_row,
                           float *fwd_gate, int *recv_slot)
{
    int P, rc = -ENOMEM;
    int *owner_local = NULL, *count = NULL, *expert_offset = NULL;

    if (dx_kref_twohop_check(topo, owner, experts) < 0 || node < 0 || node >= topo->nodes ||
        nrecv < 0 || k < 1 || (fwd_gate && !recv_gates))
        return -EINVAL;
    for (size_t i = 0; i < (size_t)nrecv * k; i++)
        if (recv_ids[i] < -1 || recv_ids[i] >= experts ||
            (recv_ids[i] >= 0 && dx_twohop_node(topo, owner, recv_ids[i]) != node))
            return -EINVAL;
    P = topo->per_node;
    owner_local = malloc((size_t)experts * sizeof(int));
    count = malloc((size_t)experts * sizeof(int));
    expert_offset = malloc(((size_t)experts + 1) * sizeof(int));
    if (!owner_local || !count || !expert_offset)
        goto out;
    for (int e = 0; e < experts; e++)
        owner_local[e] = owner[e] % P;
    memset(count, 0, (size_t)experts * sizeof(int));
    for (size_t i = 0; i < (size_t)nrecv * k; i++) {
        recv_slot[i] = -1;
        count[recv_ids[i] >= 0 ? recv_ids[i] : 0] += recv_ids[i] >= 0;
    }
    /* the direct dispatch of the received rows over the node's GPUs (the
     * count as dx_dispatch_count makes it: masked ids match no expert) */
    if ((rc = dx_kref_dispatch_offsets(count, owner_local, experts, P, expert_offset, local_rows,
                                       local_offset, expert_slot)) < 0 ||
        (rc = dx_kref_dispatch_rows(recv_ids, recv_gates, nrecv, k, experts, expert_slot, fwd_row,
                                    fwd_gate, recv_slot)) < 0)
        goto out;
    rc = 0;
out:
    free(owner_local);
    free(count);
    free(expert_offset);
    return rc;
}

void dx_kref_twohop_relay_combine(const float *y, int d, const float *recv_gates,
                                  const int *recv_slot, int nrecv, int k, float *partial)
{
    for (int r = 0; r < nrecv; r++)
        for (int i = 0; i < d; i++) {
            float acc = 0.0f;
            for (int j = 0; j < k; j++) {
                size_t c = (size_t)r * k + j;
                if (recv_slot[c] < 0)
                    continue;
                float p = recv_gates[c] * y[(size_t)recv_slot[c] * d + i];
                acc += p;
            }
            partial[(size_t)r * d + i] = acc;
        }
}

void dx_kref_twohop_combine(const float *partial, int d, const int *token_node_slot, int n,
                            int nodes, const float *base, float *out)
{
    for (int t = 0; t < n; t++)
        for (int i = 0; i < d; i++) {
            size_t o = (size_t)t * d + i;
            float acc = base ? base[o] : 0.0f;
            for (int m = 0; m < nodes; m++) {
                int slot = token_node_slot[(size_t)t * nodes + m];
                if (slot >= 0)
                    acc += partial[(size_t)slot * d + i];
            }
            out[o] = acc;
        }
}
