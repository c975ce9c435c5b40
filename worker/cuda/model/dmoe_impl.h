/* dmoe_impl.h - the MoE layer's inside, for its two files only: dmoe.c
 * (the buffers, routing, the dispatch layout, the experts, the direct
 * exchange, forward and backward) and dmoe_twohop.c (the exchange in two
 * hops, its struct twohop opaque here). Everything else sees dmoe.h. */
#ifndef WK_DMOE_IMPL_H
#define WK_DMOE_IMPL_H

#include <stddef.h>

#include "worker/cuda/model/dmoe.h"

#define BLOCK 256

/* The ranks that send rows to this rank's experts and take them back: every
 * ep rank, or with two hops the relays of this node. */
struct ep_group {
    int P, me;  /* members, this rank's index */
    int *rank;  /* [P]: each member's ep rank */
    int *owner; /* [E]: the member running each expert, -1 for none */
};

struct twohop; /* dmoe_twohop.c's */

struct wk_dmoe_buf {
    int cap, n;
    int lay_n; /* rows under the dispatch layout: n, or a relay's received */
    /* routing and the dispatch layout */
    wk_cuda_ptr scores, ids, gates, counts, tpe, eoff, rank_rows, rank_off, eslot;
    wk_cuda_ptr send_token, send_gate, token_slot, owner, ones;
    /* the experts' forward */
    wk_cuda_ptr xg, h1, h3, act, y, sh1, sh3, sact, sy, base;
    wk_cuda_ptr x; /* [cap][d] copy of the input (the router's and shared experts' weights) */
    /* backward */
    wk_cuda_ptr dout; /* [cap][d] copy of the output gradient (the shared experts') */
    wk_cuda_ptr dy, dgate, dlogit, dact, dh1, dh3, dxg, sdact, sdh1, sdh3, sdx, tmp;
    int *off; /* [E + 1] expert offsets of the last forward, on the host */
    /* the expert side: the rows this rank's experts run, [expert][source];
     * without expert parallelism the same buffers as the source side */
    const struct wk_dmoe_ep *ep;   /* NULL: every expert here */
    int P;                         /* ep ranks */
    struct ep_group grp;           /* who sends this rank's experts rows */
    struct twohop *th;             /* NULL: direct */
    wk_cuda_ptr xe, ye, dye, dxe;  /* xg, y, dy, dxg's twins */
    wk_cuda_ptr cnt_dev;           /* [P][Epad] int32: rows each source sends each expert */
    size_t pitch;                  /* fp8 dispatch: a record's bytes (else 0) */
    wk_cuda_ptr rec, rec_e;        /* fp8 dispatch: xg's and xe's records */
    int *xoff;                     /* [E + 1] the expert side's offsets (== off without) */
    int *cnt, *at;                 /* [P][E] host: those rows, and where they start */
    struct wk_nccl_transfer *xfer; /* [2 P E]: one exchange's list */
};

/* --- dmoe.c: the launch steps both paths share --------------------------------- */

/* Blocks for items, per_block a block, at most 16 per SM. */
unsigned dmoe_grid_for(const wk_gpu_t *g, size_t items, size_t per_block);
/* The dispatch layout (tpe, eoff, eslot, send_token, send_gate,
 * token_slot) of n rows' choices ids / gates [n][k], every expert on one
 * rank (b->owner); lay_n = n. A masked choice (-1, at a relay) has
 * token_slot -1. */
int dmoe_layout(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg, wk_dmoe_buf_t *b,
                wk_cuda_ptr ids, wk_cuda_ptr gates, int n);
/* dst [rows][w] = src[send_token[row]] for the layout's rows. */
int dmoe_pack(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr src, int w, wk_cuda_ptr token, int rows,
              wk_cuda_ptr dst);
/* out [n][w] = base (or 0) + sum over k ascending of gates[t][k] *
 * y[slot[t][k]] (dx_combine; slots < 0 add nothing). */
int dmoe_combine(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr y, int w, wk_cuda_ptr gates,
                 wk_cuda_ptr slot, int n, int k, wk_cuda_ptr base, wk_cuda_ptr out);
/* fp8 dispatch: rows [rows][d] fp32 to records pitch bytes apart (quant),
 * or back. */
int dmoe_fp8_records(wk_gpu_t *g, wk_cuda_stream s, const wk_dmoe_buf_t *b, int quant,
                     wk_cuda_ptr rows_f32, int rows, int d, wk_cuda_ptr rec);
/* The layout's rows per expert (tpe) to every member of the group, theirs
 * into cnt_dev. */
int dmoe_ep_send_counts(wk_gpu_t *g, wk_cuda_stream s, int E, wk_dmoe_buf_t *b);
/* Every member's counts, from cnt_dev's padded rows to cnt [P][E]. */
int dmoe_ep_download_counts(wk_cuda_t *c, int E, wk_dmoe_buf_t *b);
/* The expert side's layout from the counts on the host: the rows of each
 * expert this rank owns, every member's in member order; the others none.
 * A member sends an expert at most limit rows. */
int dmoe_ep_layout(wk_gpu_t *g, int E, int limit, int K, wk_dmoe_buf_t *b);
/* Moves rows of width w floats between the two sides: to the experts
 * (source side src at off -> expert side dst at at), or back (expert side
 * src -> source side dst). Blocks for this rank's own experts are copies;
 * the others are one transfer per (peer, expert), in expert order on both
 * ends, which is how NCCL pairs them. */
int dmoe_ep_move(wk_gpu_t *g, wk_cuda_stream s, int E, int w, wk_dmoe_buf_t *b, wk_cuda_ptr src,
                 wk_cuda_ptr dst, int to_experts);
/* The layout's packed rows (xg; with fp8 dispatch their records rec) to
 * the expert side xe, after ep_layout. */
int dmoe_rows_to_experts(wk_gpu_t *g, wk_cuda_stream s, int E, int d, wk_dmoe_buf_t *b);

/* --- dmoe_twohop.c: the exchange in two hops ----------------------------------- */

/* Does ep spread the experts over nodes in two hops? (Inline: what it
 * says of a NULL ep stays visible to dmoe.c's callers.) */
static inline int dmoe_twohop_on(const struct wk_dmoe_ep *ep)
{
    return ep && ep->ranks > 1 && ep->hop_rank && ep->nodes > 1;
}
/* Is ep's two-hop topology whole: nodes x per_node ranks, hop_rank a
 * permutation of them? */
int dmoe_twohop_topology_ok(const struct wk_dmoe_ep *ep);
/* The source's and the relay's buffers and tables of two hops. */
int dmoe_twohop_create(wk_gpu_t *g, const struct wk_moe_config *cfg, int cap,
                       const struct wk_dmoe_ep *ep, struct twohop **out);
void dmoe_twohop_destroy(wk_gpu_t *g, struct twohop *h);
/* The forward up to the experts' input: this rank's tokens x [n][d] to
 * the relays, once per node, with their masked choices; as a relay, the
 * rows received laid out per expert (lay_n = the rows received, b->off
 * their expert offsets) and sent to this node's ranks. */
int dmoe_twohop_dispatch(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                         wk_dmoe_buf_t *b, wk_cuda_ptr x, int n);
/* After the experts: their outputs back to the relays, each received row's
 * gated sum (partial) back to its source (back1). */
int dmoe_twohop_return(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                       wk_dmoe_buf_t *b);
/* The backward up to the experts: each token's output gradient dout to its
 * relays, which scale it by the gates into dy (sent on to the experts) and
 * make the gate gradients dgate_r against the outputs they kept. */
int dmoe_twohop_grad_out(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                         wk_dmoe_buf_t *b, wk_cuda_ptr dout);
/* After the experts' backward: their input gradients back to the relays,
 * summed per received row, and with the gate gradients back to the
 * sources; there b->dgate [n][k] = the gate gradients (each from the one
 * node that has the expert; the others add 0). */
int dmoe_twohop_grad_in(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                        wk_dmoe_buf_t *b);
/* out [n][w] = base (or 0) + the relays' sums back1 (w = d_model; after
 * dmoe_twohop_return the outputs, after dmoe_twohop_grad_in the input
 * gradients), node by node. */
int dmoe_twohop_sum(wk_gpu_t *g, wk_cuda_stream s, const wk_dmoe_buf_t *b, int w, int n,
                    wk_cuda_ptr base, wk_cuda_ptr out);

#endif
