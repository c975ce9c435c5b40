/* twohop_ref.h - the two-hop (node-limited) expert dispatch and combine:
 * its layout and plain C reference, the contract of kernels/twohop.cu.
 * Owns nothing else.
 *
 * Topology: R = nodes * per_node EP ranks; rank r is GPU r % per_node of
 * node r / per_node (DeepEP's convention; a caller with another numbering
 * renumbers first). owner[e] in [0, R) is the rank that runs expert e (the
 * Assignment's expert_owner), so expert e lives on node owner[e] / per_node.
 *
 * Hop 1 (source rank s = (node a, GPU l), over the network): a token t with
 * top-k experts ids[t][k] goes ONCE to every node m holding one of them, to
 * the rank (m, l) with the same GPU index, the relay. The hop-1 send buffer
 * [rows1][d] holds node m's rows in [node_offset[m], node_offset[m + 1]),
 * nodes ascending and tokens ascending inside a node; token_node_slot[t][m]
 * is the row of (t, m), or -1 when t does not go to m. A row sent to the
 * source's own node m = a goes to the source itself and never crosses the
 * network. Each row carries the token's ids and gates for that node: ids
 * whose expert is on another node are -1 with gate 0 (send_ids,
 * send_gates [rows1][k]).
 *   count:   node_tokens[m] = tokens with an expert on node m.
 *   offsets: node_offset[N + 1], the exclusive prefix sum.
 *   rows:    send_token[row] = its token; token_node_slot [n][N]; the
 *            masked send_ids / send_gates (either may be NULL).
 *   pack:    kernels/dispatch.cu dx_dispatch_pack with send_token.
 *
 * Hop 2 (relay (m, l), over NVLink): the relay receives from every node a'
 * the rows rank (a', l) sent to node m, concatenated by a' ascending: nrecv
 * rows with their masked ids. Forwarding them to the node's GPUs is the
 * direct dispatch of kernels/ref.h (dx_kref_dispatch_*) on those rows with
 * owner_local[e] = owner[e] % per_node: masked ids (-1) match no expert, so
 * every forwarded row is a (received row, expert on this node) pair; local
 * GPU j gets rows [rank_offset[j], rank_offset[j + 1]), experts ascending,
 * received rows ascending inside an expert. dx_kref_twohop_forward does
 * this and sets the slots of masked entries to -1.
 *
 * Combine, the reverse path, all fp32, no fused multiply-add, in a fixed
 * order (so it is bitwise reproducible run to run):
 *   at the relay:  partial[row][i] = sum over j ascending with
 *                  recv_slot[row][j] >= 0 of (gates[row][j] *
 *                  y[recv_slot[row][j]][i]), from 0: each product rounded,
 *                  then added; a row with no slot is 0.
 *   back to the source (network), into the hop-1 layout [rows1][d];
 *   at the source: out[t][i] = base[t][i] (0 without base) + sum over
 *                  nodes m ascending with token_node_slot[t][m] >= 0 of
 *                  partial[token_node_slot[t][m]][i].
 * Against direct combine (dx_kref_combine: base + products in k order)
 * the products are the same roundings but the additions are grouped by
 * node, so the two agree within |two-hop - direct| <= 2 * k * 2^-24 *
 * (|base| + sum |g * y|) per element (two recursive sums of k + 1 terms),
 * and bitwise when every token's experts lie on one node and there is no
 * base (then both add the same products in the same k order from 0). */
#ifndef DX_KREF_TWOHOP_H
#define DX_KREF_TWOHOP_H

#include <stddef.h>

#define DX_TWOHOP_MAX_NODES 1024 /* a token row holds this many node slots at most */

struct dx_twohop_topo {
    int nodes;    /* N */
    int per_node; /* GPUs per node */
};

/* 0, or -EINVAL when nodes or per_node is out of 1..DX_TWOHOP_MAX_NODES /
 * 1..1024 or an owner is outside [0, nodes * per_node). */
int dx_kref_twohop_check(const struct dx_twohop_topo *topo, const int *owner, int experts);

/* The node that runs expert e. */
static inline int dx_twohop_node(const struct dx_twohop_topo *topo, const int *owner, int e)
{
    return owner[e] / topo->per_node;
}

/* dx_twohop_count: node_tokens [N] from ids [n][k] (overwritten). 0 or
 * -EINVAL (an id outside [0, experts), a bad topology). */
int dx_kref_twohop_count(const struct dx_twohop_topo *topo, const int *owner, int experts,
                         const int *ids, int n, int k, int *node_tokens);

/* dx_twohop_offsets: node_offset [N + 1]; returns rows1 (node_offset[N]). */
int dx_kref_twohop_offsets(const int *node_tokens, int nodes, int *node_offset);

/* dx_twohop_rows: send_token [rows1], token_node_slot [n][N], and, when not
 * NULL, send_ids / send_gates [rows1][k] (gates may be NULL when send_gates
 * is). 0 or -EINVAL. */
int dx_kref_twohop_rows(const struct dx_twohop_topo *topo, const int *owner, int experts,
                        const int *ids, const float *gates, int n, int k, const int *node_offset,
                        int *send_token, int *token_node_slot, int *send_ids, float *send_gates);

/* Hop 2 at relay node `node`: recv_ids [nrecv][k] (masked), recv_gates
 * (may be NULL with fwd_gate NULL) -> local_rows [per_node], local_offset
 * [per_node + 1], expert_slot [E], fwd_row [rows2] (the received row of
 * each forwarded row), fwd_gate [rows2] (or NULL), recv_slot [nrecv][k]
 * (forwarded row, -1 for masked entries). rows2 = local_offset[per_node].
 * 0, -EINVAL (an unmasked id on another node), or -ENOMEM. */
int dx_kref_twohop_forward(const struct dx_twohop_topo *topo, const int *owner, int experts,
                           int node, const int *recv_ids, const float *recv_gates, int nrecv, int k,
                           int *local_rows, int *local_offset, int *expert_slot, int *fwd_row,
                           float *fwd_gate, int *recv_slot);

/* The relay's reduction: partial [nrecv][d] from the experts' outputs
 * y [rows2][d], recv_gates and recv_slot [nrecv][k]. */
void dx_kref_twohop_relay_combine(const float *y, int d, const float *recv_gates,
                                  const int *recv_slot, int nrecv, int k, float *partial);

/* The source's sum: out [n][d] from partial [rows1][d] (hop-1 layout),
 * token_node_slot [n][N] and base [n][d] (or NULL). */
void dx_kref_twohop_combine(const float *partial, int d, const int *token_node_slot, int n,
                            int nodes, const float *base, float *out);

#endif
