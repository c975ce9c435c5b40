/* head.h - the output head: a bias-free projection d -> vocab (a wk_linear,
 * W[vocab][d]) followed by softmax cross-entropy on next-byte targets, mean
 * over the n tokens of the call.
 *
 * The cache owns a copy of x, the targets, the softmax probabilities and,
 * after backward_input, dlogits = (softmax - onehot) / n; backward_weight
 * needs nothing else, and wk_head_backward is exactly backward_input then
 * backward_weight (bitwise). */
#ifndef WK_HEAD_H
#define WK_HEAD_H

#include <stdint.h>

#include "worker/model/linear.h"
#include "worker/model/tensor.h"

struct wk_head {
    int d;
    int vocab;
    struct wk_linear proj; /* in = d, out = vocab */
};

struct wk_head_cache {
    int rows;              /* capacity */
    int n;                 /* tokens of the last forward */
    struct wk_mat x;       /* [rows][d] */
    struct wk_mat probs;   /* [rows][vocab] */
    struct wk_mat dlogits; /* [rows][vocab] */
    int32_t *targets;      /* [rows] */
};

int wk_head_init(struct wk_head *hd, int d, int vocab, uint64_t seed, uint64_t stream, float std);
void wk_head_free(struct wk_head *hd);
void wk_head_zero_grad(struct wk_head *hd);
int wk_head_cache_init(struct wk_head_cache *c, const struct wk_head *hd, int max_rows);
void wk_head_cache_free(struct wk_head_cache *c);

/* *loss = mean over i of -log softmax(x_i W^T)[targets[i]]. 0, or -EINVAL if
 * n is not in 1..rows or a target is outside [0, vocab). */
int wk_head_forward(const struct wk_head *hd, struct wk_head_cache *c, const float *x,
                    const int32_t *targets, int n, float *loss);
/* dx[n][d] (overwritten) = dlogits W; dlogits kept in the cache. */
void wk_head_backward_input(const struct wk_head *hd, struct wk_head_cache *c, float *dx);
/* dW += dlogits^T x. */
void wk_head_backward_weight(struct wk_head *hd, const struct wk_head_cache *c);
void wk_head_backward(struct wk_head *hd, struct wk_head_cache *c, float *dx);

#endif
