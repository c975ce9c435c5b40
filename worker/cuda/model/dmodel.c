/* dmodel.c - a model stage on the GPU (dmodel.h): owns the device copies
 * of the stage's parameters, gradients, AdamW moments, routing biases and
 * expert loads, and each micro-batch's activations; mirrors
 * worker/model/model.c's passes with worker/cuda/model/dlayer.c and worker/cuda/model/dmoe.c. */
#include "worker/cuda/model/dmodel.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/cuda/model/dlayer.h"
#include "worker/cuda/model/dmoe.h"

#define BLOCK 256
#define ERR_MAX 512

struct dparam {
    wk_cuda_ptr w, g, m, v;
    size_t n;
    int decay;
};

struct dlayer_w {
    wk_cuda_ptr norm1, dnorm1, norm2, dnorm2;
    wk_cuda_ptr attn[4], dattn[4]; /* q, k, v, o */
    struct wk_dmoe_w moe, dmoe;    /* dmoe.bias unused */
    wk_cuda_ptr load;              /* [E] int64 */
};

struct wk_dmodel {
    wk_gpu_t *g;
    wk_cuda_t *c;
    wk_cuda_stream s;
    struct wk_model *m;
    int L, d, E;
    struct dparam *p; /* [m->nparams], the host's order */
    struct dlayer_w *layer;
    wk_cuda_ptr embed, dembed, normf, dnormf, head, dhead;
    wk_cuda_ptr loads;           /* [L][E] int64 */
    int bf16;                    /* bf16 GEMMs: the GPU keeps a bf16 copy of each weight */
    const struct wk_dmoe_ep *ep; /* NULL: every expert here */
    char err[ERR_MAX];
};

struct wk_dmodel_cache {
    int batch, seq, rows;
    int32_t *inputs, *targets; /* host staging */
    float *loss_rows;          /* host */
    wk_cuda_ptr d_inputs, d_targets, chain;
    wk_cuda_ptr *act, *mid, *hn1, *dyattn, *rstd1, *rstd2;
    wk_cuda_ptr h, g, g2, t, part, hf, rstdf, logits, probs, dlogits, loss;
    struct wk_dl_attn_buf *attn;
    wk_dmoe_buf_t **moe;
    wk_cuda_ptr *all; /* every allocation above, for release */
    int nall, capall;
};

static int fail(wk_dmodel_t *dm, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(wk_dmodel_t *dm, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(dm->err, sizeof(dm->err), fmt, ap);
    va_end(ap);
    return rc;
}

/* rc of a GPU call: its error into dm's */
static int gpu_rc(wk_dmodel_t *dm, int rc)
{
    if (rc < 0)
        fail(dm, rc, "%s", wk_gpu_error(dm->g)[0] ? wk_gpu_error(dm->g) : wk_cuda_error(dm->c));
    return rc;
}

const char *wk_dmodel_error(const wk_dmodel_t *dm)
{
    return dm->err;
}

static unsigned elem_grid(const wk_dmodel_t *dm, size_t items)
{
    size_t blocks = (items + BLOCK - 1) / BLOCK, cap = (size_t)wk_gpu_sms(dm->g) * 16;

    return (unsigned)(blocks < 1 ? 1 : blocks < cap ? blocks : cap);
}

/* the device tensor of the host parameter whose weights are at w */
static const struct dparam *param_of(const wk_dmodel_t *dm, const float *w)
{
    for (int i = 0; i < dm->m->nparams; i++)
        if (dm->m->params[i].w == w)
            return &dm->p[i];
    return NULL;
}

static int view(wk_dmodel_t *dm, const float *w, wk_cuda_ptr *dw, wk_cuda_ptr *dg)
{
    const struct dparam *p = param_of(dm, w);

    if (!p)
        return fail(dm, -EINVAL, "a layer tensor is not among the model's parameters");
    *dw = p->w;
    if (dg)
        *dg = p->g;
    return 0;
}

static int make_views(wk_dmodel_t *dm)
{
    struct wk_model *m = dm->m;
    int rc;

    if (m->flags & WK_MODEL_HAS_EMBED &&
        (rc = view(dm, m->embed.w.data, &dm->embed, &dm->dembed)) < 0)
        return rc;
    if (m->flags & WK_MODEL_HAS_HEAD &&
        ((rc = view(dm, m->norm_f.g.data, &dm->normf, &dm->dnormf)) < 0 ||
         (rc = view(dm, m->head.proj.w.data, &dm->head, &dm->dhead)) < 0))
        return rc;
    for (int i = 0; i < dm->L; i++) {
        struct wk_model_layer *ly = &m->layer[i];
        struct dlayer_w *l = &dm->layer[i];
        const struct wk_linear *lin[4] = {&ly->attn.wq, &ly->attn.wk, &ly->attn.wv, &ly->attn.wo};
        struct wk_moe *moe = &ly->moe;

        if ((rc = view(dm, ly->norm1.g.data, &l->norm1, &l->dnorm1)) < 0 ||
            (rc = view(dm, ly->norm2.g.data, &l->norm2, &l->dnorm2)) < 0 ||
            (rc = view(dm, moe->router, &l->moe.router, &l->dmoe.router)) < 0 ||
            (rc = view(dm, moe->w1, &l->moe.w1, &l->dmoe.w1)) < 0 ||
            (rc = view(dm, moe->w3, &l->moe.w3, &l->dmoe.w3)) < 0 ||
            (rc = view(dm, moe->w2, &l->moe.w2, &l->dmoe.w2)) < 0)
            return rc;
        if (moe->cfg.shared_experts > 0 &&
            ((rc = view(dm, moe->sw1, &l->moe.sw1, &l->dmoe.sw1)) < 0 ||
             (rc = view(dm, moe->sw3, &l->moe.sw3, &l->dmoe.sw3)) < 0 ||
             (rc = view(dm, moe->sw2, &l->moe.sw2, &l->dmoe.sw2)) < 0))
            return rc;
        for (int j = 0; j < 4; j++)
            if ((rc = view(dm, lin[j]->w.data, &l->attn[j], &l->dattn[j])) < 0)
                return rc;
        l->load = dm->loads + (size_t)i * dm->E * sizeof(int64_t);
    }
    return 0;
}

/* --- parameters ------------------------------------------------------------- */

/* The weights' bf16 copies (bf16 GEMMs) from the weights as they are now. */
static int refresh_bf16(wk_dmodel_t *dm)
{
    int rc;

    for (int i = 0; dm->bf16 && i < dm->m->nparams; i++)
        if ((rc = wk_gpu_bf16_refresh(dm->g, dm->s, dm->p[i].w)) < 0)
            return gpu_rc(dm, rc);
    return 0;
}

static int upload_all(wk_dmodel_t *dm)
{
    struct wk_model *m = dm->m;
    int rc;

    for (int i = 0; i < m->nparams; i++) {
        const struct wk_model_param *hp = &m->params[i];
        const struct wk_adamw_param *op = &m->opt.p[i];
        size_t bytes = hp->n * sizeof(float);

        if ((rc = wk_cuda_upload(dm->c, dm->p[i].w, hp->w, bytes)) < 0 ||
            (rc = wk_cuda_upload(dm->c, dm->p[i].g, hp->g, bytes)) < 0 ||
            (rc = wk_cuda_upload(dm->c, dm->p[i].m, op->m, bytes)) < 0 ||
            (rc = wk_cuda_upload(dm->c, dm->p[i].v, op->v, bytes)) < 0)
            return fail(dm, rc, "uploading %s: %s", hp->name, wk_cuda_error(dm->c));
    }
    for (int i = 0; i < dm->L; i++)
        if ((rc = wk_cuda_upload(dm->c, dm->layer[i].moe.bias, m->layer[i].moe.bias,
                                 (size_t)dm->E * sizeof(float))) < 0)
            return fail(dm, rc, "uploading a routing bias: %s", wk_cuda_error(dm->c));
    if ((rc = wk_cuda_upload(dm->c, dm->loads, m->load, (size_t)dm->L * dm->E * sizeof(int64_t))) <
        0)
        return fail(dm, rc, "uploading the expert loads: %s", wk_cuda_error(dm->c));
    return refresh_bf16(dm);
}

int wk_dmodel_download(wk_dmodel_t *dm)
{
    struct wk_model *m = dm->m;
    int rc;

    if ((rc = wk_cuda_stream_sync(dm->c, dm->s)) < 0)
        return fail(dm, rc, "%s", wk_cuda_error(dm->c));
    for (int i = 0; i < m->nparams; i++) {
        const struct wk_model_param *hp = &m->params[i];
        struct wk_adamw_param *op = &m->opt.p[i];
        size_t bytes = hp->n * sizeof(float);

        if ((rc = wk_cuda_download(dm->c, hp->w, dm->p[i].w, bytes)) < 0 ||
            (rc = wk_cuda_download(dm->c, hp->g, dm->p[i].g, bytes)) < 0 ||
            (rc = wk_cuda_download(dm->c, op->m, dm->p[i].m, bytes)) < 0 ||
            (rc = wk_cuda_download(dm->c, op->v, dm->p[i].v, bytes)) < 0)
            return fail(dm, rc, "downloading %s: %s", hp->name, wk_cuda_error(dm->c));
    }
    for (int i = 0; i < dm->L; i++)
        if ((rc = wk_cuda_download(dm->c, m->layer[i].moe.bias, dm->layer[i].moe.bias,
                                   (size_t)dm->E * sizeof(float))) < 0)
            return fail(dm, rc, "%s", wk_cuda_error(dm->c));
    if ((rc = wk_cuda_download(dm->c, m->load, dm->loads,
                               (size_t)dm->L * dm->E * sizeof(int64_t))) < 0)
        return fail(dm, rc, "%s", wk_cuda_error(dm->c));
    return 0;
}

int wk_dmodel_download_grads(wk_dmodel_t *dm)
{
    struct wk_model *m = dm->m;
    int rc;

    if ((rc = wk_cuda_stream_sync(dm->c, dm->s)) < 0)
        return fail(dm, rc, "%s", wk_cuda_error(dm->c));
    for (int i = 0; i < m->nparams; i++)
        if ((rc = wk_cuda_download(dm->c, m->params[i].g, dm->p[i].g,
                                   m->params[i].n * sizeof(float))) < 0)
            return fail(dm, rc, "downloading %s's gradient: %s", m->params[i].name,
                        wk_cuda_error(dm->c));
    if ((rc = wk_cuda_download(dm->c, m->load, dm->loads,
                               (size_t)dm->L * dm->E * sizeof(int64_t))) < 0)
        return fail(dm, rc, "%s", wk_cuda_error(dm->c));
    return 0;
}

int wk_dmodel_upload_grads(wk_dmodel_t *dm)
{
    struct wk_model *m = dm->m;
    int rc;

    for (int i = 0; i < m->nparams; i++)
        if ((rc = wk_cuda_upload_on(dm->c, dm->s, dm->p[i].g, m->params[i].g,
                                    m->params[i].n * sizeof(float))) < 0)
            return fail(dm, rc, "uploading %s's gradient: %s", m->params[i].name,
                        wk_cuda_error(dm->c));
    if ((rc = wk_cuda_upload_on(dm->c, dm->s, dm->loads, m->load,
                                (size_t)dm->L * dm->E * sizeof(int64_t))) < 0)
        return fail(dm, rc, "%s", wk_cuda_error(dm->c));
    return 0;
}

int wk_dmodel_use_stream(wk_dmodel_t *dm, wk_cuda_stream s)
{
    int rc;

    if (s != dm->s && (rc = wk_cuda_stream_sync(dm->c, dm->s)) < 0)
        return fail(dm, rc, "%s", wk_cuda_error(dm->c));
    dm->s = s;
    return 0;
}

wk_cuda_stream wk_dmodel_stream(const wk_dmodel_t *dm)
{
    return dm->s;
}

void wk_dmodel_set_ep(wk_dmodel_t *dm, const struct wk_dmoe_ep *ep)
{
    dm->ep = ep;
}

int wk_dmodel_grad_buffer(const wk_dmodel_t *dm, int i, wk_cuda_ptr *g, size_t *n)
{
    if (i < 0 || i >= dm->m->nparams)
        return -ERANGE;
    *g = dm->p[i].g;
    *n = dm->p[i].n;
    return 0;
}

wk_cuda_ptr wk_dmodel_loads(const wk_dmodel_t *dm, size_t *n)
{
    *n = (size_t)dm->L * (size_t)dm->E;
    return dm->loads;
}

void wk_dmodel_destroy(wk_dmodel_t *dm)
{
    if (!dm)
        return;
    wk_cuda_stream_sync(dm->c, dm->s);
    if (dm->p)
        for (int i = 0; i < dm->m->nparams; i++) {
            if (dm->bf16)
                wk_gpu_bf16_forget(dm->g, dm->p[i].w);
            wk_cuda_free(dm->c, dm->p[i].w);
            wk_cuda_free(dm->c, dm->p[i].g);
            wk_cuda_free(dm->c, dm->p[i].m);
            wk_cuda_free(dm->c, dm->p[i].v);
        }
    if (dm->layer)
        for (int i = 0; i < dm->L; i++)
            wk_cuda_free(dm->c, dm->layer[i].moe.bias);
    wk_cuda_free(dm->c, dm->loads);
    free(dm->p);
    free(dm->layer);
    free(dm);
}

int wk_dmodel_create(wk_gpu_t *g, struct wk_model *m, wk_dmodel_t **out, char *err, size_t errlen)
{
    wk_dmodel_t *dm;
    int rc = -ENOMEM;

    *out = NULL;
    if (m->opt.count != m->nparams)
        return dx_errf(err, errlen, -EINVAL,
                       "the model has no optimizer (wk_model_optim_init first)");
    if (!(dm = calloc(1, sizeof(*dm))))
        goto oom;
    dm->g = g;
    dm->c = wk_gpu_cuda(g);
    dm->s = wk_gpu_compute_stream(g);
    dm->m = m;
    dm->L = m->last - m->first;
    dm->d = m->cfg.d_model;
    dm->E = m->cfg.experts;
    if (!(dm->p = calloc((size_t)m->nparams, sizeof(*dm->p))) ||
        !(dm->layer = calloc((size_t)(dm->L ? dm->L : 1), sizeof(*dm->layer))))
        goto oom;
    for (int i = 0; i < m->nparams; i++) {
        size_t bytes = m->params[i].n * sizeof(float);

        dm->p[i].n = m->params[i].n;
        dm->p[i].decay = m->params[i].decay;
        if ((rc = wk_cuda_alloc(dm->c, bytes, &dm->p[i].w)) < 0 ||
            (rc = wk_cuda_alloc(dm->c, bytes, &dm->p[i].g)) < 0 ||
            (rc = wk_cuda_alloc(dm->c, bytes, &dm->p[i].m)) < 0 ||
            (rc = wk_cuda_alloc(dm->c, bytes, &dm->p[i].v)) < 0) {
            rc = dx_errf(err, errlen, rc, "%s: %s", m->params[i].name, wk_cuda_error(dm->c));
            goto fail;
        }
    }
    for (int i = 0; i < dm->L; i++)
        if ((rc = wk_cuda_alloc(dm->c, (size_t)dm->E * sizeof(float), &dm->layer[i].moe.bias)) < 0)
            goto cuda_fail;
    if ((rc = wk_cuda_alloc(dm->c, (size_t)(dm->L ? dm->L : 1) * dm->E * sizeof(int64_t),
                            &dm->loads)) < 0)
        goto cuda_fail;
    /* bf16 GEMMs: a persistent copy of every weight, refreshed after each
     * change, instead of a conversion at every GEMM */
    dm->bf16 = wk_gpu_gemm_dtype(g) == WK_CUBLAS_BF16;
    for (int i = 0; dm->bf16 && i < m->nparams; i++)
        if ((rc = wk_gpu_bf16_keep(g, dm->p[i].w, m->params[i].n)) < 0) {
            rc = dx_errf(err, errlen, rc, "%s", wk_gpu_error(g));
            goto fail;
        }
    if ((rc = make_views(dm)) < 0 || (rc = upload_all(dm)) < 0) {
        rc = dx_errf(err, errlen, rc, "%s", dm->err);
        goto fail;
    }
    *out = dm;
    return 0;
cuda_fail:
    rc = dx_errf(err, errlen, rc, "%s", wk_cuda_error(dm->c));
    goto fail;
oom:
    rc = dx_errf(err, errlen, -ENOMEM, "out of memory");
fail:
    wk_dmodel_destroy(dm);
    return rc < 0 ? rc : -ENOMEM;
}

/* --- caches -------------------------------------------------------------------- */

static int cache_alloc(wk_dmodel_t *dm, wk_dmodel_cache_t *c, wk_cuda_ptr *p, size_t bytes)
{
    int rc;

    if (c->nall == c->capall) {
        int cap = c->capall ? 2 * c->capall : 64;
        wk_cuda_ptr *all = realloc(c->all, (size_t)cap * sizeof(*all));

        if (!all)
            return -ENOMEM;
        c->all = all;
        c->capall = cap;
    }
    if ((rc = wk_cuda_alloc(dm->c, bytes ? bytes : 1, p)) < 0)
        return rc;
    c->all[c->nall++] = *p;
    return 0;
}

void wk_dmodel_cache_destroy(wk_dmodel_t *dm, wk_dmodel_cache_t *c)
{
    if (!c)
        return;
    wk_cuda_stream_sync(dm->c, dm->s);
    for (int i = 0; i < c->nall; i++)
        wk_cuda_free(dm->c, c->all[i]);
    if (c->moe)
        for (int i = 0; i < dm->L; i++)
            wk_dmoe_buf_destroy(dm->g, c->moe[i]);
    free(c->all);
    free(c->moe);
    free(c->attn);
    free(c->act);
    free(c->mid);
    free(c->hn1);
    free(c->dyattn);
    free(c->rstd1);
    free(c->rstd2);
    free(c->inputs);
    free(c->targets);
    free(c->loss_rows);
    free(c);
}

int wk_dmodel_cache_create(wk_dmodel_t *dm, int batch, int seq, wk_dmodel_cache_t **out)
{
    const struct wk_model *m = dm->m;
    const int L = dm->L, heads = m->cfg.heads, vocab = m->cfg.vocab;
    wk_dmodel_cache_t *c;
    size_t rows, nd, f = sizeof(float);
    int rc = -ENOMEM;

    *out = NULL;
    if (batch < 1 || seq < 1 || seq > m->cfg.seq_len)
        return fail(dm, -EINVAL, "a micro-batch of %d x %d tokens", batch, seq);
    if (!(c = calloc(1, sizeof(*c))))
        return fail(dm, -ENOMEM, "out of memory");
    c->batch = batch;
    c->seq = seq;
    c->rows = batch * seq;
    rows = (size_t)c->rows;
    nd = rows * (size_t)dm->d * f;
    c->inputs = calloc(rows, sizeof(int32_t));
    c->targets = calloc(rows, sizeof(int32_t));
    c->loss_rows = calloc(rows, sizeof(float));
    c->act = calloc((size_t)L + 1, sizeof(*c->act));
    c->mid = calloc((size_t)L + 1, sizeof(*c->mid));
    c->hn1 = calloc((size_t)L + 1, sizeof(*c->hn1));
    c->dyattn = calloc((size_t)L + 1, sizeof(*c->dyattn));
    c->rstd1 = calloc((size_t)L + 1, sizeof(*c->rstd1));
    c->rstd2 = calloc((size_t)L + 1, sizeof(*c->rstd2));
    c->attn = calloc((size_t)L + 1, sizeof(*c->attn));
    c->moe = calloc((size_t)L + 1, sizeof(*c->moe));
    if (!c->inputs || !c->targets || !c->loss_rows || !c->act || !c->mid || !c->hn1 || !c->dyattn ||
        !c->rstd1 || !c->rstd2 || !c->attn || !c->moe)
        goto fail;
    for (int i = 0; i <= L; i++)
        if ((rc = cache_alloc(dm, c, &c->act[i], nd)) < 0)
            goto fail;
    for (int i = 0; i < L; i++) {
        struct wk_dl_attn_buf *a = &c->attn[i];
        size_t bhs = (size_t)batch * heads * seq;

        if ((rc = cache_alloc(dm, c, &c->mid[i], nd)) < 0 ||
            (rc = cache_alloc(dm, c, &c->hn1[i], nd)) < 0 ||
            (rc = cache_alloc(dm, c, &c->dyattn[i], nd)) < 0 ||
            (rc = cache_alloc(dm, c, &c->rstd1[i], rows * f)) < 0 ||
            (rc = cache_alloc(dm, c, &c->rstd2[i], rows * f)) < 0 ||
            (rc = cache_alloc(dm, c, &a->q, nd)) < 0 || (rc = cache_alloc(dm, c, &a->k, nd)) < 0 ||
            (rc = cache_alloc(dm, c, &a->v, nd)) < 0 ||
            (rc = cache_alloc(dm, c, &a->p, bhs * (size_t)seq * f)) < 0 ||
            (rc = cache_alloc(dm, c, &a->ctx, nd)) < 0 ||
            (rc = cache_alloc(dm, c, &a->rowdot, bhs * f)) < 0 ||
            (rc = cache_alloc(dm, c, &a->dctx, nd)) < 0 ||
            (rc = cache_alloc(dm, c, &a->dq, nd)) < 0 ||
            (rc = cache_alloc(dm, c, &a->dk, nd)) < 0 ||
            (rc = cache_alloc(dm, c, &a->dv, nd)) < 0 ||
            (rc = wk_dmoe_buf_create_ep(dm->g, &m->layer[i].moe.cfg, c->rows, dm->ep, &c->moe[i])) <
                0)
            goto fail;
    }
    if ((rc = cache_alloc(dm, c, &c->h, nd)) < 0 || (rc = cache_alloc(dm, c, &c->g, nd)) < 0 ||
        (rc = cache_alloc(dm, c, &c->g2, nd)) < 0 || (rc = cache_alloc(dm, c, &c->t, nd)) < 0 ||
        (rc = cache_alloc(dm, c, &c->part, wk_dl_rmsnorm_scratch(c->rows, dm->d))) < 0 ||
        (rc = cache_alloc(dm, c, &c->d_inputs, rows * sizeof(int32_t))) < 0 ||
        (rc = cache_alloc(dm, c, &c->d_targets, rows * sizeof(int32_t))) < 0 ||
        (rc = cache_alloc(dm, c, &c->chain, rows * sizeof(int32_t))) < 0)
        goto fail;
    if (m->flags & WK_MODEL_HAS_HEAD &&
        ((rc = cache_alloc(dm, c, &c->hf, nd)) < 0 ||
         (rc = cache_alloc(dm, c, &c->rstdf, rows * f)) < 0 ||
         (rc = cache_alloc(dm, c, &c->logits, rows * (size_t)vocab * f)) < 0 ||
         (rc = cache_alloc(dm, c, &c->probs, rows * (size_t)vocab * f)) < 0 ||
         (rc = cache_alloc(dm, c, &c->dlogits, rows * (size_t)vocab * f)) < 0 ||
         (rc = cache_alloc(dm, c, &c->loss, rows * f)) < 0))
        goto fail;
    *out = c;
    return 0;
fail:
    wk_dmodel_cache_destroy(dm, c);
    return fail(dm, rc < 0 ? rc : -ENOMEM, "cannot allocate a micro-batch's buffers: %s",
                rc == -EIO ? wk_cuda_error(dm->c) : strerror(rc < 0 ? -rc : ENOMEM));
}

/* --- passes ----------------------------------------------------------------------- */

static int add(wk_dmodel_t *dm, const wk_dmodel_cache_t *c, wk_cuda_ptr a, wk_cuda_ptr b,
               wk_cuda_ptr out)
{
    return wk_dl_add(dm->g, dm->s, (long long)c->rows * dm->d, a, b, out);
}

static struct wk_dl_attn_shape attn_shape(const wk_dmodel_t *dm, const wk_dmodel_cache_t *c)
{
    return (struct wk_dl_attn_shape){c->batch, c->seq, dm->d, dm->m->cfg.heads};
}

int wk_dmodel_forward(wk_dmodel_t *dm, wk_dmodel_cache_t *c, const int32_t *tokens,
                      wk_cuda_ptr x_in, wk_cuda_ptr x_out, float *loss)
{
    const struct wk_model *m = dm->m;
    const struct wk_dl_attn_shape as = attn_shape(dm, c);
    const int n = c->rows, d = dm->d, vocab = m->cfg.vocab;
    const size_t nd = (size_t)n * d * sizeof(float);
    int rc;

    if (((m->flags & WK_MODEL_WHOLE) && !tokens) || (!(m->flags & WK_MODEL_HAS_EMBED) && !x_in) ||
        (!(m->flags & WK_MODEL_HAS_HEAD) && !x_out) || ((m->flags & WK_MODEL_HAS_HEAD) && !loss))
        return fail(dm, -EINVAL, "forward: a missing argument");
    if (tokens) {
        for (int b = 0; b < c->batch; b++) {
            const int32_t *t = tokens + (size_t)b * (size_t)(c->seq + 1);

            memcpy(c->inputs + (size_t)b * c->seq, t, (size_t)c->seq * sizeof(int32_t));
            memcpy(c->targets + (size_t)b * c->seq, t + 1, (size_t)c->seq * sizeof(int32_t));
        }
        for (int i = 0; i < n; i++)
            if (c->inputs[i] < 0 || c->inputs[i] >= vocab || c->targets[i] < 0 ||
                c->targets[i] >= vocab)
                return fail(dm, -EINVAL, "token %d of the micro-batch is outside the vocabulary",
                            i);
        /* in the stream's order: the last step's embedding backward may
         * still be reading this micro-batch's tokens */
        if ((rc = wk_cuda_upload_on(dm->c, dm->s, c->d_inputs, c->inputs,
                                    (size_t)n * sizeof(int32_t))) < 0 ||
            (rc = wk_cuda_upload_on(dm->c, dm->s, c->d_targets, c->targets,
                                    (size_t)n * sizeof(int32_t))) < 0)
            return gpu_rc(dm, rc);
    }
    if (m->flags & WK_MODEL_HAS_EMBED)
        rc = wk_dl_embed_fwd(dm->g, dm->s, n, d, vocab, dm->embed, c->d_inputs, c->act[0]);
    else
        rc = wk_cuda_copy_on(dm->c, dm->s, c->act[0], x_in, nd);
    if (rc < 0)
        return gpu_rc(dm, rc);
    for (int i = 0; i < dm->L; i++) {
        const struct dlayer_w *l = &dm->layer[i];
        const struct wk_moe_config *mc = &m->layer[i].moe.cfg;

        if ((rc = wk_dl_rmsnorm_fwd(dm->g, dm->s, n, d, WK_RMSNORM_EPS, c->act[i], l->norm1,
                                    c->hn1[i], c->rstd1[i])) < 0 ||
            (rc = wk_dl_attn_fwd(dm->g, dm->s, &as, c->hn1[i], l->attn, &c->attn[i], c->t)) < 0 ||
            (rc = add(dm, c, c->act[i], c->t, c->mid[i])) < 0 ||
            (rc = wk_dl_rmsnorm_fwd(dm->g, dm->s, n, d, WK_RMSNORM_EPS, c->mid[i], l->norm2, c->h,
                                    c->rstd2[i])) < 0 ||
            (rc = wk_dmoe_forward(dm->g, dm->s, mc, &l->moe, c->moe[i], c->h, n, c->t, l->load)) <
                0 ||
            (rc = add(dm, c, c->mid[i], c->t, c->act[i + 1])) < 0)
            return gpu_rc(dm, rc);
    }
    if (!(m->flags & WK_MODEL_HAS_HEAD))
        return gpu_rc(dm, wk_cuda_copy_on(dm->c, dm->s, x_out, c->act[dm->L], nd));
    if ((rc = wk_dl_rmsnorm_fwd(dm->g, dm->s, n, d, WK_RMSNORM_EPS, c->act[dm->L], dm->normf, c->hf,
                                c->rstdf)) < 0 ||
        (rc = wk_dl_head_fwd(dm->g, dm->s, n, d, vocab, c->hf, dm->head, c->d_targets, c->logits,
                             c->probs, c->loss)) < 0 ||
        (rc = wk_cuda_stream_sync(dm->c, dm->s)) < 0 ||
        (rc = wk_cuda_download(dm->c, c->loss_rows, c->loss, (size_t)n * sizeof(float))) < 0)
        return gpu_rc(dm, rc);
    {
        double total = 0.0; /* head.c: the rows' losses in double, in order */

        for (int i = 0; i < n; i++)
            total += c->loss_rows[i];
        *loss = (float)(total / n);
    }
    return 0;
}

int wk_dmodel_backward_input(wk_dmodel_t *dm, wk_dmodel_cache_t *c, wk_cuda_ptr dy, wk_cuda_ptr dx)
{
    const struct wk_model *m = dm->m;
    const struct wk_dl_attn_shape as = attn_shape(dm, c);
    const int n = c->rows, d = dm->d;
    const size_t nd = (size_t)n * d * sizeof(float);
    int rc;

    if ((!(m->flags & WK_MODEL_HAS_HEAD) && !dy) || (!(m->flags & WK_MODEL_HAS_EMBED) && !dx))
        return fail(dm, -EINVAL, "backward: a missing argument");
    if (m->flags & WK_MODEL_HAS_HEAD) {
        if ((rc = wk_dl_head_bwd_input(dm->g, dm->s, n, d, m->cfg.vocab, dm->head, c->probs,
                                       c->d_targets, c->dlogits, c->h)) < 0 ||
            (rc = wk_dl_rmsnorm_bwd(dm->g, dm->s, n, d, c->act[dm->L], dm->normf, c->h, c->rstdf,
                                    c->g, dm->dnormf, c->part)) < 0)
            return gpu_rc(dm, rc);
    } else if ((rc = wk_cuda_copy_on(dm->c, dm->s, c->g, dy, nd)) < 0) {
        return gpu_rc(dm, rc);
    }
    for (int i = dm->L - 1; i >= 0; i--) {
        const struct dlayer_w *l = &dm->layer[i];
        const struct wk_moe_config *mc = &m->layer[i].moe.cfg;

        /* y = mid + moe(norm2(mid)) */
        if ((rc = wk_dmoe_backward_input(dm->g, dm->s, mc, &l->moe, c->moe[i], c->g, c->h)) < 0 ||
            (rc = wk_dl_rmsnorm_bwd(dm->g, dm->s, n, d, c->mid[i], l->norm2, c->h, c->rstd2[i],
                                    c->t, l->dnorm2, c->part)) < 0 ||
            (rc = add(dm, c, c->g, c->t, c->g2)) < 0)
            return gpu_rc(dm, rc);
        /* mid = x + attn(norm1(x)); the weight half needs attention's dy */
        if ((rc = wk_cuda_copy_on(dm->c, dm->s, c->dyattn[i], c->g2, nd)) < 0 ||
            (rc = wk_dl_attn_bwd_input(dm->g, dm->s, &as, l->attn, c->g2, &c->attn[i], c->h)) < 0 ||
            (rc = wk_dl_rmsnorm_bwd(dm->g, dm->s, n, d, c->act[i], l->norm1, c->h, c->rstd1[i],
                                    c->t, l->dnorm1, c->part)) < 0 ||
            (rc = add(dm, c, c->g2, c->t, c->g)) < 0)
            return gpu_rc(dm, rc);
    }
    if (!(m->flags & WK_MODEL_HAS_EMBED))
        return gpu_rc(dm, wk_cuda_copy_on(dm->c, dm->s, dx, c->g, nd));
    return 0; /* with the embedding, g stays for backward_weight */
}

int wk_dmodel_backward_weight(wk_dmodel_t *dm, wk_dmodel_cache_t *c)
{
    const struct wk_model *m = dm->m;
    const struct wk_dl_attn_shape as = attn_shape(dm, c);
    const int n = c->rows, d = dm->d;
    int rc;

    if (m->flags & WK_MODEL_HAS_HEAD &&
        (rc = wk_dl_head_bwd_weight(dm->g, dm->s, n, d, m->cfg.vocab, c->hf, c->dlogits,
                                    dm->dhead)) < 0)
        return gpu_rc(dm, rc);
    for (int i = dm->L - 1; i >= 0; i--) {
        const struct dlayer_w *l = &dm->layer[i];

        if ((rc = wk_dmoe_backward_weight(dm->g, dm->s, &m->layer[i].moe.cfg, c->moe[i],
                                          &l->dmoe)) < 0 ||
            (rc = wk_dl_attn_bwd_weight(dm->g, dm->s, &as, c->hn1[i], c->dyattn[i], &c->attn[i],
                                        l->dattn)) < 0)
            return gpu_rc(dm, rc);
    }
    if (m->flags & WK_MODEL_HAS_EMBED &&
        (rc = wk_dl_embed_bwd(dm->g, dm->s, n, d, m->cfg.vocab, c->d_inputs, c->g, c->chain,
                              dm->dembed)) < 0)
        return gpu_rc(dm, rc);
    return 0;
}

/* --- the optimizer ------------------------------------------------------------------- */

int wk_dmodel_zero_grad(wk_dmodel_t *dm)
{
    int rc;

    for (int i = 0; i < dm->m->nparams; i++)
        if ((rc = wk_cuda_memset_on(dm->c, dm->s, dm->p[i].g, 0, dm->p[i].n * sizeof(float))) < 0)
            return gpu_rc(dm, rc);
    return 0;
}

int wk_dmodel_scale_grad(wk_dmodel_t *dm, float scale)
{
    int rc;

    for (int i = 0; i < dm->m->nparams; i++) {
        long long count = (long long)dm->p[i].n;
        void *args[] = {&dm->p[i].g, &count, &scale, &dm->p[i].g};

        if ((rc = wk_gpu_launch(dm->g, WK_K_SCALE, dm->s, elem_grid(dm, dm->p[i].n), BLOCK, 0,
                                args)) < 0)
            return gpu_rc(dm, rc);
    }
    return 0;
}

int wk_dmodel_step(wk_dmodel_t *dm)
{
    struct wk_model *m = dm->m;
    float gamma = WK_MOE_BIAS_GAMMA;
    int rc;

    for (int i = 0; i < m->nparams; i++) {
        struct wk_adamw_param *op = &m->opt.p[i];
        struct dparam *p = &dm->p[i];
        struct wk_adamw_coeffs k;
        long long count = (long long)p->n;
        void *args[] = {&p->w,    &p->g,    &p->m,  &p->v,  &count, &k.lr,
                        &k.beta1, &k.beta2, &k.eps, &k.bc1, &k.bc2, &k.decay};

        /* the step count lives on the host, as wk_adamw_step keeps it */
        if ((rc = wk_adamw_coeffs(&m->opt.cfg, op->step + 1, op->decay, &k)) < 0)
            return fail(dm, rc, "AdamW: bad configuration");
        if ((rc = wk_gpu_launch(dm->g, WK_K_ADAMW, dm->s, elem_grid(dm, p->n), BLOCK, 0, args)) < 0)
            return gpu_rc(dm, rc);
        op->step++;
    }
    for (int i = 0; i < dm->L; i++) {
        struct dlayer_w *l = &dm->layer[i];
        void *args[] = {&l->load, &dm->E, &gamma, &l->moe.bias};

        if ((rc = wk_gpu_launch(dm->g, WK_K_MOE_BIAS_UPDATE, dm->s, 1, BLOCK, 0, args)) < 0)
            return gpu_rc(dm, rc);
    }
    if ((rc = wk_cuda_memset_on(dm->c, dm->s, dm->loads, 0,
                                (size_t)dm->L * dm->E * sizeof(int64_t))) < 0)
        return gpu_rc(dm, rc);
    return refresh_bf16(dm);
}
