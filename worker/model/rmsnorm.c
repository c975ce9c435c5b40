/* rmsnorm.c - RMSNorm forward and backward (rmsnorm.h). Row sums are taken
 * in double, in feature order, so results do not depend on the batch. */
#include "worker/model/rmsnorm.h"

#include <errno.h>
#include <math.h>

int wk_rmsnorm_init(struct wk_rmsnorm *nm, int d)
{
    int rc;

    nm->d = d;
    rc = wk_mat_init(&nm->g, 1, d);
    if (rc < 0)
        return rc;
    rc = wk_mat_init(&nm->dg, 1, d);
    if (rc < 0) {
        wk_mat_free(&nm->g);
        return rc;
    }
    wk_mat_fill(&nm->g, 1.0f);
    return 0;
}

void wk_rmsnorm_free(struct wk_rmsnorm *nm)
{
    wk_mat_free(&nm->g);
    wk_mat_free(&nm->dg);
}

void wk_rmsnorm_zero_grad(struct wk_rmsnorm *nm)
{
    wk_mat_zero(&nm->dg);
}

int wk_rmsnorm_cache_init(struct wk_rmsnorm_cache *c, int max_rows)
{
    c->rows = max_rows;
    return wk_mat_init(&c->rstd, max_rows, 1);
}

void wk_rmsnorm_cache_free(struct wk_rmsnorm_cache *c)
{
    wk_mat_free(&c->rstd);
    c->rows = 0;
}

int wk_rmsnorm_forward(const struct wk_rmsnorm *nm, struct wk_rmsnorm_cache *c, const float *x,
                       float *y, int n)
{
    const int d = nm->d;

    if (n < 0 || n > c->rows)
        return -EINVAL;
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * d;
        float *yi = y + (size_t)i * d;
        double ss = 0.0;

        for (int j = 0; j < d; j++)
            ss += (double)xi[j] * xi[j];
        float r = (float)(1.0 / sqrt(ss / d + WK_RMSNORM_EPS));
        c->rstd.data[i] = r;
        for (int j = 0; j < d; j++)
            yi[j] = xi[j] * r * nm->g.data[j];
    }
    return 0;
}

/* With u = g * dy: dx = r * u - x * r^3 * mean(u * x); dg += dy * x * r. */
void wk_rmsnorm_backward(struct wk_rmsnorm *nm, const struct wk_rmsnorm_cache *c, const float *x,
                         const float *dy, float *dx, int n)
{
    const int d = nm->d;
    const float *g = nm->g.data;
    float *dg = nm->dg.data;

    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * d;
        const float *dyi = dy + (size_t)i * d;
        float *dxi = dx + (size_t)i * d;
        const float r = c->rstd.data[i];
        double dot = 0.0;

        for (int j = 0; j < d; j++)
            dot += (double)g[j] * dyi[j] * xi[j];
        const float k = (float)(dot / d) * r * r * r;
        for (int j = 0; j < d; j++) {
            dxi[j] = r * g[j] * dyi[j] - xi[j] * k;
            dg[j] += dyi[j] * xi[j] * r;
        }
    }
}
