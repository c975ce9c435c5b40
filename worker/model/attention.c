/* attention.c - causal multi-head self-attention forward and backward
 * (attention.h): the projections around wk_attn_core_*, the part between
 * them, which is also the CPU reference of the GPU kernels
 * (kernels/attention.cu). Per-head products are strided sgemm calls on the
 * [N][d] buffers; sums that are not GEMMs are taken in double in a fixed
 * order. */
#include "worker/model/attention.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <string.h>

int wk_attn_init(struct wk_attn *a, int d, int heads, uint64_t seed, uint64_t stream, float std)
{
    int rc;

    memset(a, 0, sizeof(*a));
    if (d <= 0 || heads <= 0 || d % heads != 0)
        return -EINVAL;
    a->d = d;
    a->heads = heads;
    a->dh = d / heads;
    rc = wk_linear_init(&a->wq, d, d, seed, stream + WK_ATTN_STREAM_Q, std);
    if (rc < 0)
        goto fail;
    rc = wk_linear_init(&a->wk, d, d, seed, stream + WK_ATTN_STREAM_K, std);
    if (rc < 0)
        goto fail;
    rc = wk_linear_init(&a->wv, d, d, seed, stream + WK_ATTN_STREAM_V, std);
    if (rc < 0)
        goto fail;
    rc = wk_linear_init(&a->wo, d, d, seed, stream + WK_ATTN_STREAM_O, std);
    if (rc < 0)
        goto fail;
    return 0;
fail:
    wk_attn_free(a);
    return rc;
}

void wk_attn_free(struct wk_attn *a)
{
    wk_linear_free(&a->wq);
    wk_linear_free(&a->wk);
    wk_linear_free(&a->wv);
    wk_linear_free(&a->wo);
}

void wk_attn_zero_grad(struct wk_attn *a)
{
    wk_linear_zero_grad(&a->wq);
    wk_linear_zero_grad(&a->wk);
    wk_linear_zero_grad(&a->wv);
    wk_linear_zero_grad(&a->wo);
}

int wk_attn_cache_init(struct wk_attn_cache *c, const struct wk_attn *a, int batch, int seq)
{
    struct wk_mat *tok[] = {&c->x,  &c->q,    &c->k,  &c->v,  &c->ctx,
                            &c->dy, &c->dctx, &c->dq, &c->dk, &c->dv};
    int rc;

    memset(c, 0, sizeof(*c));
    if (batch <= 0 || seq <= 0 || a->d <= 0)
        return -EINVAL;
    c->batch = batch;
    c->seq = seq;
    c->d = a->d;
    c->heads = a->heads;
    for (size_t i = 0; i < sizeof(tok) / sizeof(tok[0]); i++) {
        rc = wk_mat_init(tok[i], batch * seq, a->d);
        if (rc < 0)
            goto fail;
    }
    rc = wk_mat_init(&c->p, batch * a->heads * seq, seq);
    if (rc < 0)
        goto fail;
    rc = wk_mat_init(&c->ds, seq, seq);
    if (rc < 0)
        goto fail;
    return 0;
fail:
    wk_attn_cache_free(c);
    return rc;
}

void wk_attn_cache_free(struct wk_attn_cache *c)
{
    struct wk_mat *all[] = {&c->x,  &c->q,    &c->k,  &c->v,  &c->p,  &c->ctx,
                            &c->dy, &c->dctx, &c->dq, &c->dk, &c->dv, &c->ds};

    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        wk_mat_free(all[i]);
}

/* Row i of s[seq][seq] becomes softmax over keys 0..i; keys after i get 0. */
static void causal_softmax(float *s, int seq)
{
    for (int i = 0; i < seq; i++) {
        float *row = s + (size_t)i * seq;
        float max = row[0];
        double sum = 0.0;

        for (int j = 1; j <= i; j++)
            if (row[j] > max)
                max = row[j];
        for (int j = 0; j <= i; j++) {
            row[j] = expf(row[j] - max);
            sum += row[j];
        }
        const float inv = (float)(1.0 / sum);
        for (int j = 0; j <= i; j++)
            row[j] *= inv;
        for (int j = i + 1; j < seq; j++)
            row[j] = 0.0f;
    }
}

void wk_attn_core_forward(int batch, int seq, int d, int heads, const float *q, const float *k,
                          const float *v, float *p, float *ctx)
{
    const int dh = d / heads;
    const float scale = 1.0f / sqrtf((float)dh);

    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < heads; h++) {
            const size_t off = (size_t)b * seq * d + (size_t)h * dh;
            float *ph = p + ((size_t)b * heads + h) * seq * seq;

            /* S = scale * Q K^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, seq, seq, dh, scale, q + off, d,
                        k + off, d, 0.0f, ph, seq);
            causal_softmax(ph, seq);
            /* ctx = P V */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, seq, dh, seq, 1.0f, ph, seq,
                        v + off, d, 0.0f, ctx + off, d);
        }
    }
}

void wk_attn_core_backward(int batch, int seq, int d, int heads, const float *q, const float *k,
                           const float *v, const float *p, const float *dctx, float *dq, float *dk,
                           float *dv, float *scratch)
{
    const int dh = d / heads;
    const float scale = 1.0f / sqrtf((float)dh);
    float *ds = scratch;

    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < heads; h++) {
            const size_t off = (size_t)b * seq * d + (size_t)h * dh;
            const float *ph = p + ((size_t)b * heads + h) * seq * seq;

            /* dP = dctx V^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, seq, seq, dh, 1.0f, dctx + off, d,
                        v + off, d, 0.0f, ds, seq);
            /* dV = P^T dctx */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, seq, dh, seq, 1.0f, ph, seq,
                        dctx + off, d, 0.0f, dv + off, d);
            /* dS = scale * P * (dP - rowsum(P * dP)); masked entries have P = 0 */
            for (int i = 0; i < seq; i++) {
                const float *pi = ph + (size_t)i * seq;
                float *di = ds + (size_t)i * seq;
                double dot = 0.0;

                for (int j = 0; j <= i; j++)
                    dot += (double)pi[j] * di[j];
                for (int j = 0; j <= i; j++)
                    di[j] = scale * pi[j] * (di[j] - (float)dot);
                for (int j = i + 1; j < seq; j++)
                    di[j] = 0.0f;
            }
            /* dQ = dS K, dK = dS^T Q */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, seq, dh, seq, 1.0f, ds, seq,
                        k + off, d, 0.0f, dq + off, d);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, seq, dh, seq, 1.0f, ds, seq,
                        q + off, d, 0.0f, dk + off, d);
        }
    }
}

void wk_attn_forward(const struct wk_attn *a, struct wk_attn_cache *c, const float *x, float *y)
{
    const int n = c->batch * c->seq;

    memcpy(c->x.data, x, wk_mat_size(&c->x) * sizeof(float));
    wk_linear_forward(&a->wq, x, c->q.data, n);
    wk_linear_forward(&a->wk, x, c->k.data, n);
    wk_linear_forward(&a->wv, x, c->v.data, n);
    wk_attn_core_forward(c->batch, c->seq, a->d, a->heads, c->q.data, c->k.data, c->v.data,
                         c->p.data, c->ctx.data);
    wk_linear_forward(&a->wo, c->ctx.data, y, n);
}

void wk_attn_backward_input(const struct wk_attn *a, struct wk_attn_cache *c, const float *dy,
                            float *dx)
{
    const int n = c->batch * c->seq;

    memcpy(c->dy.data, dy, wk_mat_size(&c->dy) * sizeof(float));
    wk_linear_backward_input(&a->wo, dy, c->dctx.data, n, 0);
    wk_attn_core_backward(c->batch, c->seq, a->d, a->heads, c->q.data, c->k.data, c->v.data,
                          c->p.data, c->dctx.data, c->dq.data, c->dk.data, c->dv.data, c->ds.data);
    wk_linear_backward_input(&a->wq, c->dq.data, dx, n, 0);
    wk_linear_backward_input(&a->wk, c->dk.data, dx, n, 1);
    wk_linear_backward_input(&a->wv, c->dv.data, dx, n, 1);
}

void wk_attn_backward_weight(struct wk_attn *a, const struct wk_attn_cache *c)
{
    const int n = c->batch * c->seq;

    wk_linear_backward_weight(&a->wo, c->ctx.data, c->dy.data, n);
    wk_linear_backward_weight(&a->wq, c->x.data, c->dq.data, n);
    wk_linear_backward_weight(&a->wk, c->x.data, c->dk.data, n);
    wk_linear_backward_weight(&a->wv, c->x.data, c->dv.data, n);
}

void wk_attn_backward(struct wk_attn *a, struct wk_attn_cache *c, const float *dy, float *dx)
{
    wk_attn_backward_input(a, c, dy, dx);
    wk_attn_backward_weight(a, c);
}
