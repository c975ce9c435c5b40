/* adamw.h - the AdamW optimiser (decoupled weight decay, as in PyTorch) over
 * a list of fp32 parameter tensors: owns each tensor's moments m, v and step
 * count, not the weights or gradients. Deterministic (plain loops, fixed
 * order); the state saves to and loads from plain arrays for checkpoints.
 *
 * Per step t of a tensor (t counts from 1), per element:
 *   w -= lr * wd * w                        (only for tensors with decay)
 *   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 *   w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) */
#ifndef WK_ADAMW_H
#define WK_ADAMW_H

#include <stddef.h>
#include <stdint.h>

#define WK_ADAMW_LR 3e-4f
#define WK_ADAMW_BETA1 0.9f
#define WK_ADAMW_BETA2 0.95f
#define WK_ADAMW_EPS 1e-8f
#define WK_ADAMW_WEIGHT_DECAY 0.1f

struct wk_adamw_config {
    float lr, beta1, beta2, eps, weight_decay;
};

struct wk_adamw_param {
    float *w;       /* the caller's weights, updated in place */
    const float *g; /* the caller's gradients, read by step */
    size_t n;
    int decay;    /* 0 for biases and norm gains */
    int64_t step; /* steps taken by this tensor */
    float *m, *v; /* [n] owned moments */
};

struct wk_adamw {
    struct wk_adamw_config cfg; /* lr may be changed between steps (schedules) */
    int count, alloc;
    struct wk_adamw_param *p;
};

void wk_adamw_config_defaults(struct wk_adamw_config *cfg);
int wk_adamw_init(struct wk_adamw *o, const struct wk_adamw_config *cfg);
void wk_adamw_free(struct wk_adamw *o);

/* Register a tensor (moments 0, step 0); returns its index or -errno. */
int wk_adamw_add(struct wk_adamw *o, float *w, const float *g, size_t n, int decay);

/* One step of every tensor, in registration order. */
int wk_adamw_step(struct wk_adamw *o);

/* The scalars of step t (t >= 1) of one tensor, computed once per tensor
 * per step: the bias corrections bc1 = 1 - b1^t, bc2 = 1 - b2^t (pow in
 * double, rounded to float) and the decay factor 1 - lr * wd (1 without
 * decay). A device kernel takes these as arguments, so that its update is
 * bitwise wk_adamw_update's. */
struct wk_adamw_coeffs {
    float lr, beta1, beta2, eps;
    float bc1, bc2, decay;
};

/* 0, or -EINVAL for an invalid cfg or t < 1. */
int wk_adamw_coeffs(const struct wk_adamw_config *cfg, int64_t t, int decay,
                    struct wk_adamw_coeffs *out);
/* The update of n elements with the scalars k, in index order, in float:
 *   m = b1 m + (1 - b1) g;  v = b2 v + ((1 - b2) g) g
 *   w = w decay - (lr (m / bc1)) / (sqrt(v / bc2) + eps) */
void wk_adamw_update(const struct wk_adamw_coeffs *k, float *w, const float *g, float *m, float *v,
                     size_t n);

/* Plain-array state: m then v of tensor 0, then of tensor 1, ...
 * (2 * sum n floats) and one step count per tensor. */
size_t wk_adamw_state_floats(const struct wk_adamw *o);
int wk_adamw_save(const struct wk_adamw *o, float *state, int64_t *steps);
int wk_adamw_load(struct wk_adamw *o, const float *state, const int64_t *steps);

#endif
