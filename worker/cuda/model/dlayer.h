/* dlayer.h - the model's dense layers on the GPU, for the cuda backend:
 * the same contracts as worker/model/ (rmsnorm.h, attention.h, embed.h,
 * head.h) on device buffers, as sequences of kernel launches (worker/cuda/gpu.h)
 * and cuBLASLt GEMMs on one stream, fp32. Nothing is synchronised: every
 * call only enqueues, and the caller orders streams with events. Each
 * returns 0 or -EIO / -EINVAL with the failing kernel or GEMM named in
 * wk_gpu_error (GEMMs: wk_cublas_error of wk_gpu_cublas).
 *
 * Buffers are the caller's; the shapes in brackets are floats unless said.
 * Weights are [out][in] as in tensor.h. Gradients of weights accumulate
 * (+=), as the CPU layers' do; input gradients are overwritten. */
#ifndef WK_DLAYER_H
#define WK_DLAYER_H

#include "worker/cuda/gpu.h"

/* rows of RMSNorm's backward per block: its dgain partial sums are
 * [ceil(n / WK_DL_NORM_ROWS)][d] (wk_dl_rmsnorm_scratch bytes) */
#define WK_DL_NORM_ROWS 16

/* y [n][d] = x r gain, r = 1 / sqrt(mean(x^2) + eps) kept in rstd [n]. */
int wk_dl_rmsnorm_fwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, float eps, wk_cuda_ptr x,
                      wk_cuda_ptr gain, wk_cuda_ptr y, wk_cuda_ptr rstd);
/* dx [n][d] (overwritten), dgain [d] += ; part: wk_dl_rmsnorm_scratch bytes. */
int wk_dl_rmsnorm_bwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, wk_cuda_ptr x, wk_cuda_ptr gain,
                      wk_cuda_ptr dy, wk_cuda_ptr rstd, wk_cuda_ptr dx, wk_cuda_ptr dgain,
                      wk_cuda_ptr part);
size_t wk_dl_rmsnorm_scratch(int n, int d);

/* Attention's buffers for one micro-batch (kept from forward for backward,
 * as struct wk_attn_cache): q, k, v, ctx, dctx, dq, dk, dv [rows][d], p
 * [batch*heads*seq][seq], rowdot [batch*heads*seq]. */
struct wk_dl_attn_buf {
    wk_cuda_ptr q, k, v, p, ctx, rowdot, dctx, dq, dk, dv;
};

struct wk_dl_attn_shape {
    int batch, seq, d, heads;
};

/* y [rows][d] = attention(x) with weights wq, wk, wv, wo [d][d]. */
int wk_dl_attn_fwd(wk_gpu_t *g, wk_cuda_stream s, const struct wk_dl_attn_shape *a, wk_cuda_ptr x,
                   const wk_cuda_ptr w[4], const struct wk_dl_attn_buf *b, wk_cuda_ptr y);
/* dx [rows][d] (overwritten) from dy; keeps dctx, dq, dk, dv in b. */
int wk_dl_attn_bwd_input(wk_gpu_t *g, wk_cuda_stream s, const struct wk_dl_attn_shape *a,
                         const wk_cuda_ptr w[4], wk_cuda_ptr dy, const struct wk_dl_attn_buf *b,
                         wk_cuda_ptr dx);
/* dw[0..3] (dWq, dWk, dWv, dWo) += from x, dy and what b kept. */
int wk_dl_attn_bwd_weight(wk_gpu_t *g, wk_cuda_stream s, const struct wk_dl_attn_shape *a,
                          wk_cuda_ptr x, wk_cuda_ptr dy, const struct wk_dl_attn_buf *b,
                          const wk_cuda_ptr dw[4]);

/* y [n][d] = w [tokens[i]] (int32 tokens [n]). */
int wk_dl_embed_fwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr w,
                    wk_cuda_ptr tokens, wk_cuda_ptr y);
/* dw [tokens[i]] += dy[i] in i order; chain: n int32 of scratch. */
int wk_dl_embed_bwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr tokens,
                    wk_cuda_ptr dy, wk_cuda_ptr chain, wk_cuda_ptr dw);

/* The head: logits [n][vocab] = x w^T, probs [n][vocab] their softmax,
 * loss [n] each row's cross-entropy against targets [n] (int32); the mean
 * is the host's (sum in double, in order, / n, as head.c). */
int wk_dl_head_fwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr x,
                   wk_cuda_ptr w, wk_cuda_ptr targets, wk_cuda_ptr logits, wk_cuda_ptr probs,
                   wk_cuda_ptr loss);
/* dlogits [n][vocab] = (probs - onehot) / n; dx [n][d] = dlogits w. */
int wk_dl_head_bwd_input(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr w,
                         wk_cuda_ptr probs, wk_cuda_ptr targets, wk_cuda_ptr dlogits,
                         wk_cuda_ptr dx);
/* dw += dlogits^T x. */
int wk_dl_head_bwd_weight(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr x,
                          wk_cuda_ptr dlogits, wk_cuda_ptr dw);

/* out [count] = a + b (out may be a or b: residuals, gradient sums). */
int wk_dl_add(wk_gpu_t *g, wk_cuda_stream s, long long count, wk_cuda_ptr a, wk_cuda_ptr b,
              wk_cuda_ptr out);

#endif
