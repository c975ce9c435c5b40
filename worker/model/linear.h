/* linear.h - a bias-free dense layer y = x W^T with W[out][in] (see
 * tensor.h), its gradient, and the split of backward into the input part and
 * the weight part used by zero-bubble pipeline schedules (B and W ops).
 *
 * The layer keeps no activations: the caller passes the forward input x again
 * to backward_weight (it must be unchanged since forward).
 * wk_linear_backward is exactly backward_input followed by backward_weight, so
 * the two paths are bitwise equal. */
#ifndef WK_LINEAR_H
#define WK_LINEAR_H

#include <stdint.h>

#include "worker/model/tensor.h"

struct wk_linear {
    int in;
    int out;
    struct wk_mat w;  /* [out][in] */
    struct wk_mat dw; /* [out][in], accumulated by backward, zeroed by init */
};

/* W = normal * std from wk_rng_stream(seed, stream). 0 or -EINVAL/-ENOMEM. */
int wk_linear_init(struct wk_linear *l, int in, int out, uint64_t seed, uint64_t stream, float std);
void wk_linear_free(struct wk_linear *l);
void wk_linear_zero_grad(struct wk_linear *l);

/* y[n][out] = x[n][in] W^T. */
void wk_linear_forward(const struct wk_linear *l, const float *x, float *y, int n);
/* dx[n][in] = dy W, or dx += dy W when accumulate is nonzero. */
void wk_linear_backward_input(const struct wk_linear *l, const float *dy, float *dx, int n,
                              int accumulate);
/* dW += dy^T x, x being the input given to forward. */
void wk_linear_backward_weight(struct wk_linear *l, const float *x, const float *dy, int n);
/* Both of the above (dx is overwritten). */
void wk_linear_backward(struct wk_linear *l, const float *x, const float *dy, float *dx, int n);

#endif
