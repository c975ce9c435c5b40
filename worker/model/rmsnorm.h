/* rmsnorm.h - RMSNorm over the feature dimension: y = x / rms(x) * g with
 * rms(x) = sqrt(mean(x^2) + eps), eps = WK_RMSNORM_EPS, g initialised to 1.
 * The cache keeps 1 / rms per row for backward; the caller passes the forward
 * input x again to backward (unchanged since forward). */
#ifndef WK_RMSNORM_H
#define WK_RMSNORM_H

#include "worker/model/tensor.h"

#define WK_RMSNORM_EPS 1e-6f

struct wk_rmsnorm {
    int d;
    struct wk_mat g;  /* [1][d] */
    struct wk_mat dg; /* [1][d] */
};

struct wk_rmsnorm_cache {
    int rows;
    struct wk_mat rstd; /* [rows][1]: 1 / rms of each row of the last forward */
};

int wk_rmsnorm_init(struct wk_rmsnorm *nm, int d);
void wk_rmsnorm_free(struct wk_rmsnorm *nm);
void wk_rmsnorm_zero_grad(struct wk_rmsnorm *nm);
/* A cache for up to max_rows rows. 0 or -EINVAL/-ENOMEM. */
int wk_rmsnorm_cache_init(struct wk_rmsnorm_cache *c, int max_rows);
void wk_rmsnorm_cache_free(struct wk_rmsnorm_cache *c);

/* y[n][d] = rmsnorm(x[n][d]). 0 or -EINVAL when n exceeds the cache. */
int wk_rmsnorm_forward(const struct wk_rmsnorm *nm, struct wk_rmsnorm_cache *c, const float *x,
                       float *y, int n);
/* dx = d loss / dx (overwritten), dg += d loss / dg; n and x as in forward. */
void wk_rmsnorm_backward(struct wk_rmsnorm *nm, const struct wk_rmsnorm_cache *c, const float *x,
                         const float *dy, float *dx, int n);

#endif
