/* attention.h - causal multi-head self-attention without biases:
 *
 *   q = x Wq^T, k = x Wk^T, v = x Wv^T          (Wq..Wo are [d][d], tensor.h)
 *   per sequence b and head h (dh = d / heads columns of q, k, v):
 *     P = softmax(q k^T / sqrt(dh)) with key j > query i masked out
 *     ctx = P v
 *   y = ctx Wo^T
 *
 * Tokens are laid out [batch * seq][d], sequence b occupying rows
 * b*seq .. b*seq+seq-1. The cache owns everything backward needs: a copy of
 * x, q, k, v, the probabilities and ctx from forward; the output gradient and
 * dq, dk, dv from backward_input. So for zero-bubble schedules
 * backward_input (the B op: dx only) may be followed later by
 * backward_weight (the W op: dWq, dWk, dWv, dWo from the cache alone), and
 * wk_attn_backward is exactly the two in sequence, bitwise.
 *
 * Parameters come from wk_rng_stream(seed, stream + WK_ATTN_STREAM_*). */
#ifndef WK_ATTENTION_H
#define WK_ATTENTION_H

#include <stdint.h>

#include "worker/model/linear.h"
#include "worker/model/tensor.h"

/* Offsets added to the layer's base stream id for each projection. */
#define WK_ATTN_STREAM_Q 0
#define WK_ATTN_STREAM_K 1
#define WK_ATTN_STREAM_V 2
#define WK_ATTN_STREAM_O 3

struct wk_attn {
    int d;
    int heads;
    int dh; /* d / heads */
    struct wk_linear wq, wk, wv, wo;
};

struct wk_attn_cache {
    int batch;
    int seq;
    int d;
    int heads;
    struct wk_mat x;    /* [batch*seq][d] forward input (copy) */
    struct wk_mat q;    /* [batch*seq][d] */
    struct wk_mat k;    /* [batch*seq][d] */
    struct wk_mat v;    /* [batch*seq][d] */
    struct wk_mat p;    /* [batch*heads*seq][seq] causal probabilities */
    struct wk_mat ctx;  /* [batch*seq][d] attention output before Wo */
    struct wk_mat dy;   /* [batch*seq][d] output gradient (copy, for dWo) */
    struct wk_mat dctx; /* [batch*seq][d] */
    struct wk_mat dq;   /* [batch*seq][d] */
    struct wk_mat dk;   /* [batch*seq][d] */
    struct wk_mat dv;   /* [batch*seq][d] */
    struct wk_mat ds;   /* [seq][seq] scratch */
};

/* The part between the projections, on its own (the layer calls it; the
 * GPU kernels of kernels/attention.cu have exactly this contract and are
 * checked against it). q, k, v, ctx, dctx, dq, dk, dv are [batch*seq][d],
 * head h being columns h*dh .. h*dh+dh-1 (dh = d / heads); p is
 * [batch*heads*seq][seq], row (b*heads + h)*seq + i holding query i's
 * probabilities over keys 0..i and 0 for keys after i.
 *
 * core_forward: p = causal softmax(q k^T / sqrt(dh)) per sequence and head,
 * ctx = p v (both overwritten).
 * core_backward: from p (core_forward's) and dctx, overwrites
 *   dv = p^T dctx,  dS = p * (dctx v^T - rowsum(p * dctx v^T)) / sqrt(dh),
 *   dq = dS k,      dk = dS^T q;
 * scratch holds seq*seq floats. Shapes are the caller's to check: batch,
 * seq, heads positive and d % heads == 0. */
void wk_attn_core_forward(int batch, int seq, int d, int heads, const float *q, const float *k,
                          const float *v, float *p, float *ctx);
void wk_attn_core_backward(int batch, int seq, int d, int heads, const float *q, const float *k,
                           const float *v, const float *p, const float *dctx, float *dq, float *dk,
                           float *dv, float *scratch);

/* 0, -EINVAL (d or heads not positive, d % heads != 0) or -ENOMEM. */
int wk_attn_init(struct wk_attn *a, int d, int heads, uint64_t seed, uint64_t stream, float std);
void wk_attn_free(struct wk_attn *a);
void wk_attn_zero_grad(struct wk_attn *a);

/* A cache for batch sequences of seq tokens. 0, -EINVAL or -ENOMEM. */
int wk_attn_cache_init(struct wk_attn_cache *c, const struct wk_attn *a, int batch, int seq);
void wk_attn_cache_free(struct wk_attn_cache *c);

/* y[batch*seq][d] from x[batch*seq][d]; fills the cache. */
void wk_attn_forward(const struct wk_attn *a, struct wk_attn_cache *c, const float *x, float *y);
/* dx (overwritten) from dy; keeps dy, dq, dk, dv in the cache. */
void wk_attn_backward_input(const struct wk_attn *a, struct wk_attn_cache *c, const float *dy,
                            float *dx);
/* dWq, dWk, dWv, dWo += from what forward and backward_input kept. */
void wk_attn_backward_weight(struct wk_attn *a, const struct wk_attn_cache *c);
/* backward_input then backward_weight. */
void wk_attn_backward(struct wk_attn *a, struct wk_attn_cache *c, const float *dy, float *dx);

#endif
