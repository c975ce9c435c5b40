/* dmoe.h - the MoE layer on the GPU for the cuda backend: the contract of
 * worker/model/moe.h (wk_moe_forward, _backward_input, _backward_weight)
 * on device buffers. One stream, fp32 (bf16 GEMMs as wk_gpu's precision).
 *
 * Expert parallelism (struct wk_dmoe_ep, ranks > 1): every rank routes its
 * own tokens and packs them per expert; the rows of an expert another
 * rank owns go there (worker/cuda/comm/xchg.h: by IPC on this node, NCCL beyond; one
 * grouped exchange per direction, a transfer per (peer, expert) block),
 * the owner runs the expert on the rows of every source concatenated per
 * expert in source order (the cpu
 * backend's order), and the outputs come back the same way before the
 * combine; the backward moves the rows' gradients likewise. Each rank
 * first sends its per-expert counts to every peer: a second exchange, and
 * the host reads them with the offsets (one synchronisation per forward).
 *
 * Two hops (ep->nodes > 1, DeepSeek-V3's dispatch; kernels/twohop_ref.h):
 * a token crosses to each node holding one of its experts once, to the
 * rank with this rank's local index there (the relay; NCCL), with its ids
 * masked to that node's experts and their gates. The relay lays the rows
 * it received out per expert (dx_dispatch_* on the masked ids) and sends
 * them to the node's ranks as above (IPC), which run the experts on
 * [expert][relay] rows. Outputs come back to the relay, which sums each
 * row's gated outputs (fp32, k order) and returns one row per (token,
 * node); the source adds those per node in node order. The backward sends
 * each token's output gradient to the same relays, which scale it by the
 * gates, compute the gate gradients against the outputs they kept, and
 * return the summed input gradients and the gate gradients. Two
 * synchronisations per forward (each hop's counts). The sums group by
 * node, so results differ from the direct path in the last bits.
 *
 * With cfg->fp8_dispatch the rows travel to the experts as e4m3 records
 * (dx_fp8_quant_rec; kernels/ref.h's layout), quantised once by the sender
 * (with two hops before hop 1), and the expert side decodes them: the
 * experts see the rows worker/model/moe.c rounds the same way.
 *
 * Forward: router GEMM, sigmoid, group-limited top-k with the routing bias
 * (kernels/routing.cu; its expert counts also go into the step's int64
 * loads), the dispatch layout and pack (kernels/dispatch.cu), each expert's
 * SwiGLU FFN as three cuBLASLt GEMMs on its rows, the shared experts on
 * every token, and the gated combine. The per-expert GEMMs need the row
 * counts on the host: the forward downloads the expert offsets (E + 1
 * ints) once, a synchronisation of the stream, and keeps them for the
 * backward. Backward: the gate-scaled rows, the gate and router gradients
 * (kernels/moe.cu), the FFNs' input gradients, and dx = router GEMM +
 * shared + the rows' gradients combined with unit gates; the weight half
 * accumulates every weight gradient from what the two kept. */
#ifndef WK_DMOE_H
#define WK_DMOE_H

#include <stdint.h>

#include "worker/cuda/gpu.h"
#include "worker/model/moe.h"
#include "worker/cuda/comm/xchg.h"

/* Where the experts run. xchg is read at each call (it may be made after
 * the buffers): its ranks are the ep ranks, every one running the same
 * layers in the same order. */
struct wk_dmoe_ep {
    int ranks, rank;
    const int *owner;  /* [experts]: the ep rank running each expert */
    wk_xchg_t *xchg;   /* the exchange among the ep ranks (ranks > 1) */
    int64_t *rows_run; /* [experts] on the host: += the rows this rank's
                        * experts ran in each forward, or NULL */
    /* Two hops (nodes > 1), else direct: the ep ranks are nodes x per_node,
     * hop_rank[r] = node * per_node + local index of ep rank r (a
     * permutation of [0, ranks)). */
    int nodes, per_node;
    const int *hop_rank;
};

/* The layer's weights (or their gradients) on the device, laid out as
 * struct wk_moe's: router [E][d], bias [E], w1 and w3 [E][H][d], w2
 * [E][d][H], sw1 and sw3 [S][H][d], sw2 [S][d][H]. */
struct wk_dmoe_w {
    wk_cuda_ptr router, bias, w1, w3, w2, sw1, sw3, sw2;
};

typedef struct wk_dmoe_buf wk_dmoe_buf_t;

/* One micro-batch's buffers for up to cap tokens (struct wk_moe_ctx's),
 * every expert here. */
int wk_dmoe_buf_create(wk_gpu_t *g, const struct wk_moe_config *cfg, int cap, wk_dmoe_buf_t **out);
/* The same with the experts placed by ep (NULL or ranks 1: all here; ep
 * must outlive the buffers). The expert side holds up to ranks * cap *
 * top_k rows: every source's tokens could pick this rank's experts. */
int wk_dmoe_buf_create_ep(wk_gpu_t *g, const struct wk_moe_config *cfg, int cap,
                          const struct wk_dmoe_ep *ep, wk_dmoe_buf_t **out);
void wk_dmoe_buf_destroy(wk_gpu_t *g, wk_dmoe_buf_t *b);

/* out [n][d] from x [n][d]; load [E] (int64) += the tokens each expert took.
 * Synchronises the stream once (the expert offsets). */
int wk_dmoe_forward(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                    const struct wk_dmoe_w *w, wk_dmoe_buf_t *b, wk_cuda_ptr x, int n,
                    wk_cuda_ptr out, wk_cuda_ptr load);
/* dx [n][d] (overwritten) from dout [n][d] of the forward b holds. */
int wk_dmoe_backward_input(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                           const struct wk_dmoe_w *w, wk_dmoe_buf_t *b, wk_cuda_ptr dout,
                           wk_cuda_ptr dx);
/* grad += every weight gradient (not the bias: it has none). */
int wk_dmoe_backward_weight(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                            const struct wk_dmoe_buf *b, const struct wk_dmoe_w *grad);

/* The forward's routing, for tests: ids [n][k] (int32) and the expert
 * offsets [E + 1] on the host (valid after wk_dmoe_forward). */
wk_cuda_ptr wk_dmoe_buf_ids(const wk_dmoe_buf_t *b);
const int *wk_dmoe_buf_offsets(const wk_dmoe_buf_t *b);

#endif
