/* head.c - output projection and softmax cross-entropy (head.h). */
#include "worker/model/head.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int wk_head_init(struct wk_head *hd, int d, int vocab, uint64_t seed, uint64_t stream, float std)
{
    hd->d = d;
    hd->vocab = vocab;
    return wk_linear_init(&hd->proj, d, vocab, seed, stream, std);
}

void wk_head_free(struct wk_head *hd)
{
    wk_linear_free(&hd->proj);
}

void wk_head_zero_grad(struct wk_head *hd)
{
    wk_linear_zero_grad(&hd->proj);
}

int wk_head_cache_init(struct wk_head_cache *c, const struct wk_head *hd, int max_rows)
{
    int rc;

    memset(c, 0, sizeof(*c));
    if (max_rows <= 0)
        return -EINVAL;
    c->rows = max_rows;
    rc = wk_mat_init(&c->x, max_rows, hd->d);
    if (rc < 0)
        goto fail;
    rc = wk_mat_init(&c->probs, max_rows, hd->vocab);
    if (rc < 0)
        goto fail;
    rc = wk_mat_init(&c->dlogits, max_rows, hd->vocab);
    if (rc < 0)
        goto fail;
    c->targets = calloc((size_t)max_rows, sizeof(*c->targets));
    if (!c->targets) {
        rc = -ENOMEM;
        goto fail;
    }
    return 0;
fail:
    wk_head_cache_free(c);
    return rc;
}

void wk_head_cache_free(struct wk_head_cache *c)
{
    wk_mat_free(&c->x);
    wk_mat_free(&c->probs);
    wk_mat_free(&c->dlogits);
    free(c->targets);
    c->targets = NULL;
    c->rows = 0;
    c->n = 0;
}

int wk_head_forward(const struct wk_head *hd, struct wk_head_cache *c, const float *x,
                    const int32_t *targets, int n, float *loss)
{
    const int vocab = hd->vocab;
    double total = 0.0;

    if (n <= 0 || n > c->rows)
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (targets[i] < 0 || targets[i] >= vocab)
            return -EINVAL;
    c->n = n;
    memcpy(c->x.data, x, (size_t)n * hd->d * sizeof(float));
    memcpy(c->targets, targets, (size_t)n * sizeof(*targets));
    wk_linear_forward(&hd->proj, x, c->probs.data, n);
    for (int i = 0; i < n; i++) {
        float *row = c->probs.data + (size_t)i * vocab;
        float max = row[0];

        for (int j = 1; j < vocab; j++)
            if (row[j] > max)
                max = row[j];
        /* loss_i = log(sum exp(z - max)) - (z_t - max) */
        const double zt = (double)row[targets[i]] - max;
        row[0] = expf(row[0] - max);
        double sum = row[0];
        for (int j = 1; j < vocab; j++) {
            row[j] = expf(row[j] - max);
            sum += row[j];
        }
        total += log(sum) - zt;
        const float inv = (float)(1.0 / sum);
        for (int j = 0; j < vocab; j++)
            row[j] *= inv;
    }
    *loss = (float)(total / n);
    return 0;
}

void wk_head_backward_input(const struct wk_head *hd, struct wk_head_cache *c, float *dx)
{
    const int vocab = hd->vocab, n = c->n;
    const float inv_n = 1.0f / (float)n;

    for (int i = 0; i < n; i++) {
        const float *p = c->probs.data + (size_t)i * vocab;
        float *g = c->dlogits.data + (size_t)i * vocab;

        for (int j = 0; j < vocab; j++)
            g[j] = p[j] * inv_n;
        g[c->targets[i]] -= inv_n;
    }
    wk_linear_backward_input(&hd->proj, c->dlogits.data, dx, n, 0);
}

void wk_head_backward_weight(struct wk_head *hd, const struct wk_head_cache *c)
{
    wk_linear_backward_weight(&hd->proj, c->x.data, c->dlogits.data, c->n);
}

void wk_head_backward(struct wk_head *hd, struct wk_head_cache *c, float *dx)
{
    wk_head_backward_input(hd, c, dx);
    wk_head_backward_weight(hd, c);
}
