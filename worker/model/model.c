/* model.c - the MoE transformer stage: embedding, layers of RMSNorm ->
 * attention -> residual -> RMSNorm -> MoE -> residual, final norm and head,
 * chained forward and backward over one micro-batch at a time. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/model/model.h"

#include "common/ckpt.h"
#include "common/log.h"
#include "worker/model/rng.h"

#define MODEL_MAX_PARAMS_PER_LAYER (6 + WK_MOE_MAX_TENSORS)

static int nlayers(const struct wk_model *m)
{
    return m->last - m->first;
}

static void moe_config(const struct wk_model_config *cfg, struct wk_moe_config *mc)
{
    wk_moe_config_defaults(mc);
    mc->d_model = cfg->d_model;
    mc->experts = cfg->experts;
    mc->top_k = cfg->top_k;
    mc->expert_hidden = cfg->expert_hidden;
    mc->shared_experts = cfg->shared_experts;
    mc->expert_groups = cfg->expert_groups;
    mc->group_limit = cfg->group_limit;
    mc->init_std = WK_INIT_STD;
    mc->fp8_dispatch = cfg->fp8_dispatch;
}

int wk_model_config_check(const struct wk_model_config *cfg, char *err, size_t errlen)
{
    struct wk_moe_config mc;

    if (cfg->vocab < 1 || cfg->d_model < 1 || cfg->layers < 1 || cfg->heads < 1 || cfg->seq_len < 1)
        return dx_errf(err, errlen, -EINVAL,
                       "vocab, d_model, layers, heads and seq_len must be positive");
    if (cfg->d_model % cfg->heads != 0)
        return dx_errf(err, errlen, -EINVAL, "d_model %d is not a multiple of heads %d",
                       cfg->d_model, cfg->heads);
    moe_config(cfg, &mc);
    if (wk_moe_config_check(&mc) < 0)
        return dx_errf(err, errlen, -EINVAL,
                       "the MoE shape (experts %d, top_k %d, groups %d, limit %d, "
                       "hidden %d, shared %d) is not valid",
                       cfg->experts, cfg->top_k, cfg->expert_groups, cfg->group_limit,
                       cfg->expert_hidden, cfg->shared_experts);
    return 0;
}

uint64_t wk_model_layer_stream(int l)
{
    return (uint64_t)(l + 1) * WK_MODEL_STREAM_LAYER_STRIDE;
}

/* A full 64-bit seed for the layers: their streams are seed ^ (id * golden),
 * so a small job seed would leave nearby ids' sequences overlapping. */
static uint64_t mixed_seed(uint64_t seed)
{
    struct wk_rng r = wk_rng_stream(seed, WK_MODEL_STREAM_SEED);

    return wk_rng_next(&r);
}

static void add_param(struct wk_model *m, const char *name, int layer, enum wk_model_kind kind,
                      float *w, float *g, size_t n, int decay)
{
    struct wk_model_param *p = &m->params[m->nparams++];

    if (layer >= 0)
        snprintf(p->name, sizeof(p->name), "layer%d.%s", layer, name);
    else
        snprintf(p->name, sizeof(p->name), "%s", name);
    p->kind = kind;
    p->layer = layer;
    p->w = w;
    p->g = g;
    p->n = n;
    p->decay = decay;
}

static int build_params(struct wk_model *m)
{
    int cap = 3 + nlayers(m) * MODEL_MAX_PARAMS_PER_LAYER;

    m->params = calloc((size_t)cap, sizeof(*m->params));
    if (!m->params)
        return -ENOMEM;
    if (m->flags & WK_MODEL_HAS_EMBED)
        add_param(m, "embed", -1, WK_MODEL_EMBED, m->embed.w.data, m->embed.dw.data,
                  wk_mat_size(&m->embed.w), 1);
    for (int i = 0; i < nlayers(m); i++) {
        struct wk_model_layer *ly = &m->layer[i];
        struct wk_linear *lin[] = {&ly->attn.wq, &ly->attn.wk, &ly->attn.wv, &ly->attn.wo};
        const char *lname[] = {"attn.wq", "attn.wk", "attn.wv", "attn.wo"};
        struct wk_moe_tensor mt[WK_MOE_MAX_TENSORS];
        int l = m->first + i, k = wk_moe_tensors(&ly->moe, mt);
        char name[40];

        add_param(m, "norm1", l, WK_MODEL_NORM, ly->norm1.g.data, ly->norm1.dg.data,
                  wk_mat_size(&ly->norm1.g), 0);
        for (int j = 0; j < 4; j++)
            add_param(m, lname[j], l, WK_MODEL_ATTN, lin[j]->w.data, lin[j]->dw.data,
                      wk_mat_size(&lin[j]->w), 1);
        add_param(m, "norm2", l, WK_MODEL_NORM, ly->norm2.g.data, ly->norm2.dg.data,
                  wk_mat_size(&ly->norm2.g), 0);
        for (int j = 0; j < k; j++) {
            enum wk_model_kind kind = j == 0                                  ? WK_MODEL_ROUTER
                                      : strncmp(mt[j].name, "shared", 6) == 0 ? WK_MODEL_SHARED
                                                                              : WK_MODEL_EXPERT;
            snprintf(name, sizeof(name), "moe.%s", mt[j].name);
            add_param(m, name, l, kind, mt[j].w, mt[j].g, mt[j].n, 1);
        }
    }
    if (m->flags & WK_MODEL_HAS_HEAD) {
        add_param(m, "final_norm", -1, WK_MODEL_NORM, m->norm_f.g.data, m->norm_f.dg.data,
                  wk_mat_size(&m->norm_f.g), 0);
        add_param(m, "head", -1, WK_MODEL_HEAD, m->head.proj.w.data, m->head.proj.dw.data,
                  wk_mat_size(&m->head.proj.w), 1);
    }
    return 0;
}

int wk_model_stage_init(struct wk_model *m, const struct wk_model_config *cfg, uint64_t seed,
                        int first, int last, int flags)
{
    struct wk_moe_config mc;
    uint64_t s;
    int rc, d = cfg->d_model;

    memset(m, 0, sizeof(*m));
    if (wk_model_config_check(cfg, NULL, 0) < 0 || first < 0 || last < first ||
        last > cfg->layers || (flags & ~WK_MODEL_WHOLE))
        return -EINVAL;
    m->cfg = *cfg;
    m->seed = seed;
    m->first = first;
    m->last = last;
    m->flags = flags;
    s = mixed_seed(seed);
    moe_config(cfg, &mc);

    m->layer = calloc((size_t)(last - first) + 1, sizeof(*m->layer));
    m->load = calloc((size_t)(last - first) * (size_t)cfg->experts + 1, sizeof(*m->load));
    if (!m->layer || !m->load) {
        rc = -ENOMEM;
        goto fail;
    }
    if (flags & WK_MODEL_HAS_EMBED) {
        rc = wk_embed_init(&m->embed, cfg->vocab, d, s, WK_MODEL_STREAM_EMBED, WK_INIT_STD);
        if (rc < 0 || (rc = wk_stopped() ? -ECANCELED : 0) < 0)
            goto fail;
    }
    for (int i = 0; i < last - first; i++) {
        struct wk_model_layer *ly = &m->layer[i];
        uint64_t base = wk_model_layer_stream(first + i);

        if ((rc = wk_rmsnorm_init(&ly->norm1, d)) < 0 || (rc = wk_rmsnorm_init(&ly->norm2, d)) < 0)
            goto fail;
        rc = wk_attn_init(&ly->attn, d, cfg->heads, s, base + WK_MODEL_STREAM_ATTN, WK_INIT_STD);
        if (rc < 0)
            goto fail;
        rc = wk_moe_init(&ly->moe, &mc, s, base + WK_MODEL_STREAM_MOE);
        if (rc < 0 || (rc = wk_stopped() ? -ECANCELED : 0) < 0)
            goto fail;
    }
    if (flags & WK_MODEL_HAS_HEAD) {
        if ((rc = wk_rmsnorm_init(&m->norm_f, d)) < 0)
            goto fail;
        rc = wk_head_init(&m->head, d, cfg->vocab, s, WK_MODEL_STREAM_HEAD, WK_INIT_STD);
        if (rc < 0 || (rc = wk_stopped() ? -ECANCELED : 0) < 0)
            goto fail;
    }
    if ((rc = build_params(m)) < 0)
        goto fail;
    return 0;
fail:
    wk_model_free(m);
    return rc;
}

int wk_model_init(struct wk_model *m, const struct wk_model_config *cfg, uint64_t seed)
{
    return wk_model_stage_init(m, cfg, seed, 0, cfg->layers, WK_MODEL_WHOLE);
}

void wk_model_free(struct wk_model *m)
{
    wk_embed_free(&m->embed);
    if (m->layer) {
        for (int i = 0; i < nlayers(m); i++) {
            wk_rmsnorm_free(&m->layer[i].norm1);
            wk_rmsnorm_free(&m->layer[i].norm2);
            wk_attn_free(&m->layer[i].attn);
            wk_moe_free(&m->layer[i].moe);
        }
    }
    wk_rmsnorm_free(&m->norm_f);
    wk_head_free(&m->head);
    wk_adamw_free(&m->opt);
    free(m->layer);
    free(m->load);
    free(m->params);
    memset(m, 0, sizeof(*m));
}

void wk_model_zero_grad(struct wk_model *m)
{
    for (int i = 0; i < m->nparams; i++)
        memset(m->params[i].g, 0, m->params[i].n * sizeof(float));
}

void wk_model_scale_grad(struct wk_model *m, float scale)
{
    for (int i = 0; i < m->nparams; i++) {
        float *g = m->params[i].g;

        for (size_t j = 0; j < m->params[i].n; j++)
            g[j] *= scale;
    }
}

int wk_model_param_count(const struct wk_model *m)
{
    return m->nparams;
}

const struct wk_model_param *wk_model_param(const struct wk_model *m, int i)
{
    return i >= 0 && i < m->nparams ? &m->params[i] : NULL;
}

/* --- cache ---------------------------------------------------------------- */

void wk_model_cache_free(struct wk_model_cache *c, const struct wk_model *m)
{
    int L = nlayers(m);

    free(c->inputs);
    free(c->targets);
    for (int i = 0; c->act && i <= L; i++)
        wk_mat_free(&c->act[i]);
    for (int i = 0; i < L; i++) {
        if (c->mid)
            wk_mat_free(&c->mid[i]);
        if (c->n1)
            wk_rmsnorm_cache_free(&c->n1[i]);
        if (c->n2)
            wk_rmsnorm_cache_free(&c->n2[i]);
        if (c->attn)
            wk_attn_cache_free(&c->attn[i]);
        if (c->moe)
            wk_moe_ctx_free(&c->moe[i]);
    }
    free(c->act);
    free(c->mid);
    free(c->n1);
    free(c->n2);
    free(c->attn);
    free(c->moe);
    wk_rmsnorm_cache_free(&c->nf);
    wk_head_cache_free(&c->head);
    wk_mat_free(&c->h);
    wk_mat_free(&c->g);
    wk_mat_free(&c->g2);
    wk_mat_free(&c->t);
    memset(c, 0, sizeof(*c));
}

int wk_model_cache_init(struct wk_model_cache *c, const struct wk_model *m, int batch, int seq)
{
    int L = nlayers(m), d = m->cfg.d_model, rc = -ENOMEM;
    size_t n = (size_t)L + 1;

    memset(c, 0, sizeof(*c));
    if (batch < 1 || seq < 1 || seq > m->cfg.seq_len || (long)batch * seq > INT32_MAX / d)
        return -EINVAL;
    c->batch = batch;
    c->seq = seq;
    c->rows = batch * seq;
    c->inputs = calloc((size_t)c->rows, sizeof(int32_t));
    c->targets = calloc((size_t)c->rows, sizeof(int32_t));
    c->act = calloc(n, sizeof(*c->act));
    c->mid = calloc(n, sizeof(*c->mid));
    c->n1 = calloc(n, sizeof(*c->n1));
    c->n2 = calloc(n, sizeof(*c->n2));
    c->attn = calloc(n, sizeof(*c->attn));
    c->moe = calloc(n, sizeof(*c->moe));
    if (!c->inputs || !c->targets || !c->act || !c->mid || !c->n1 || !c->n2 || !c->attn || !c->moe)
        goto fail;
    for (int i = 0; i <= L; i++)
        if ((rc = wk_mat_init(&c->act[i], c->rows, d)) < 0)
            goto fail;
    for (int i = 0; i < L; i++) {
        if ((rc = wk_mat_init(&c->mid[i], c->rows, d)) < 0 ||
            (rc = wk_rmsnorm_cache_init(&c->n1[i], c->rows)) < 0 ||
            (rc = wk_rmsnorm_cache_init(&c->n2[i], c->rows)) < 0 ||
            (rc = wk_attn_cache_init(&c->attn[i], &m->layer[i].attn, batch, seq)) < 0 ||
            (rc = wk_moe_ctx_init(&c->moe[i], &m->layer[i].moe.cfg, c->rows)) < 0)
            goto fail;
    }
    if (m->flags & WK_MODEL_HAS_HEAD) {
        if ((rc = wk_rmsnorm_cache_init(&c->nf, c->rows)) < 0 ||
            (rc = wk_head_cache_init(&c->head, &m->head, c->rows)) < 0)
            goto fail;
    }
    if ((rc = wk_mat_init(&c->h, c->rows, d)) < 0 || (rc = wk_mat_init(&c->g, c->rows, d)) < 0 ||
        (rc = wk_mat_init(&c->g2, c->rows, d)) < 0 || (rc = wk_mat_init(&c->t, c->rows, d)) < 0)
        goto fail;
    return 0;
fail:
    wk_model_cache_free(c, m);
    return rc;
}

/* --- forward and backward --------------------------------------------------- */

static void add(float *y, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

/* The routed experts: here, or through c->ep. */
static int moe_forward(struct wk_model *m, struct wk_model_cache *c, int i, const float *x,
                       float *y)
{
    struct wk_moe *moe = &m->layer[i].moe;
    const struct wk_model_ep *ep = c->ep;
    int rc;

    if (!ep)
        return wk_moe_forward(moe, &c->moe[i], x, c->rows, y);
    if ((rc = wk_moe_route(moe, &c->moe[i], x, c->rows)) < 0 ||
        (rc = ep->forward(ep->arg, c->ep_tag, m->first + i, moe, &c->moe[i])) < 0 ||
        (rc = wk_moe_forward_shared(moe, &c->moe[i])) < 0)
        return rc;
    return wk_moe_combine(moe, &c->moe[i], y);
}

static int moe_backward_input(struct wk_model *m, struct wk_model_cache *c, int i, const float *dy,
                              float *dx)
{
    struct wk_moe *moe = &m->layer[i].moe;
    const struct wk_model_ep *ep = c->ep;
    int rc;

    if (!ep)
        return wk_moe_backward_input(moe, &c->moe[i], dy, dx);
    if ((rc = wk_moe_backward_prepare(moe, &c->moe[i], dy)) < 0 ||
        (rc = ep->backward(ep->arg, c->ep_tag, m->first + i, moe, &c->moe[i])) < 0 ||
        (rc = wk_moe_backward_shared(moe, &c->moe[i])) < 0)
        return rc;
    return wk_moe_combine_dx(moe, &c->moe[i], dx);
}

static int moe_backward_weight(struct wk_model *m, struct wk_model_cache *c, int i)
{
    struct wk_moe *moe = &m->layer[i].moe;
    const struct wk_model_ep *ep = c->ep;
    int rc;

    if (!ep)
        return wk_moe_backward_weight(moe, &c->moe[i]);
    if ((rc = wk_moe_backward_weight_dense(moe, &c->moe[i])) < 0)
        return rc;
    return ep->weight(ep->arg, c->ep_tag, m->first + i, moe, &c->moe[i]);
}

int wk_model_forward(struct wk_model *m, struct wk_model_cache *c, const int32_t *tokens,
                     const float *x_in, float *x_out, float *loss)
{
    int L = nlayers(m), rows = c->rows, rc;
    size_t nd = (size_t)rows * (size_t)m->cfg.d_model;

    if (((m->flags & WK_MODEL_WHOLE) && !tokens) || (!(m->flags & WK_MODEL_HAS_EMBED) && !x_in) ||
        (!(m->flags & WK_MODEL_HAS_HEAD) && !x_out) || ((m->flags & WK_MODEL_HAS_HEAD) && !loss))
        return -EINVAL;
    if (tokens) {
        for (int b = 0; b < c->batch; b++) {
            const int32_t *t = tokens + (size_t)b * (size_t)(c->seq + 1);

            memcpy(c->inputs + (size_t)b * c->seq, t, (size_t)c->seq * sizeof(int32_t));
            memcpy(c->targets + (size_t)b * c->seq, t + 1, (size_t)c->seq * sizeof(int32_t));
        }
    }
    if (m->flags & WK_MODEL_HAS_EMBED) {
        if ((rc = wk_embed_forward(&m->embed, c->inputs, c->act[0].data, rows)) < 0)
            return rc;
    } else {
        memcpy(c->act[0].data, x_in, nd * sizeof(float));
    }
    for (int i = 0; i < L; i++) {
        struct wk_model_layer *ly = &m->layer[i];
        float *x = c->act[i].data, *mid = c->mid[i].data, *y = c->act[i + 1].data;

        if (wk_stopped())
            return -ECANCELED;

        if ((rc = wk_rmsnorm_forward(&ly->norm1, &c->n1[i], x, c->h.data, rows)) < 0)
            return rc;
        wk_attn_forward(&ly->attn, &c->attn[i], c->h.data, c->t.data);
        add(mid, x, c->t.data, nd);
        if ((rc = wk_rmsnorm_forward(&ly->norm2, &c->n2[i], mid, c->h.data, rows)) < 0)
            return rc;
        if ((rc = moe_forward(m, c, i, c->h.data, c->t.data)) < 0)
            return rc;
        add(y, mid, c->t.data, nd);
        wk_moe_add_load(&ly->moe, &c->moe[i], m->load + (size_t)i * (size_t)m->cfg.experts);
    }
    if (!(m->flags & WK_MODEL_HAS_HEAD)) {
        memcpy(x_out, c->act[L].data, nd * sizeof(float));
        return 0;
    }
    if ((rc = wk_rmsnorm_forward(&m->norm_f, &c->nf, c->act[L].data, c->h.data, rows)) < 0)
        return rc;
    return wk_head_forward(&m->head, &c->head, c->h.data, c->targets, rows, loss);
}

int wk_model_backward_input(struct wk_model *m, struct wk_model_cache *c, const float *dy,
                            float *dx)
{
    int L = nlayers(m), rows = c->rows, rc;
    size_t nd = (size_t)rows * (size_t)m->cfg.d_model;
    float *g = c->g.data, *g2 = c->g2.data, *t = c->t.data, *h = c->h.data;

    if ((!(m->flags & WK_MODEL_HAS_HEAD) && !dy) || (!(m->flags & WK_MODEL_HAS_EMBED) && !dx))
        return -EINVAL;
    /* g: the gradient of the current layer's output */
    if (m->flags & WK_MODEL_HAS_HEAD) {
        wk_head_backward_input(&m->head, &c->head, h);
        wk_rmsnorm_backward(&m->norm_f, &c->nf, c->act[L].data, h, g, rows);
    } else {
        memcpy(g, dy, nd * sizeof(float));
    }
    for (int i = L - 1; i >= 0; i--) {
        struct wk_model_layer *ly = &m->layer[i];

        if (wk_stopped())
            return -ECANCELED;
        /* y = mid + moe(norm2(mid)) */
        if ((rc = moe_backward_input(m, c, i, g, h)) < 0)
            return rc;
        wk_rmsnorm_backward(&ly->norm2, &c->n2[i], c->mid[i].data, h, t, rows);
        add(g2, g, t, nd);
        /* mid = x + attn(norm1(x)) */
        wk_attn_backward_input(&ly->attn, &c->attn[i], g2, h);
        wk_rmsnorm_backward(&ly->norm1, &c->n1[i], c->act[i].data, h, t, rows);
        add(g, g2, t, nd);
    }
    if (!(m->flags & WK_MODEL_HAS_EMBED))
        memcpy(dx, g, nd * sizeof(float));
    return 0; /* with the embedding, g stays for backward_weight */
}

int wk_model_backward_weight(struct wk_model *m, struct wk_model_cache *c)
{
    int L = nlayers(m), rc;

    if (m->flags & WK_MODEL_HAS_HEAD)
        wk_head_backward_weight(&m->head, &c->head);
    for (int i = L - 1; i >= 0; i--) {
        if (wk_stopped())
            return -ECANCELED;
        if ((rc = moe_backward_weight(m, c, i)) < 0)
            return rc;
        wk_attn_backward_weight(&m->layer[i].attn, &c->attn[i]);
    }
    if (m->flags & WK_MODEL_HAS_EMBED)
        return wk_embed_backward(&m->embed, c->inputs, c->g.data, c->rows);
    return 0;
}

int wk_model_backward(struct wk_model *m, struct wk_model_cache *c, const float *dy, float *dx)
{
    int rc = wk_model_backward_input(m, c, dy, dx);

    return rc == 0 ? wk_model_backward_weight(m, c) : rc;
}

/* --- optimiser ---------------------------------------------------------- */

int wk_model_optim_init(struct wk_model *m, const struct wk_adamw_config *cfg)
{
    int rc;

    wk_adamw_free(&m->opt);
    if ((rc = wk_adamw_init(&m->opt, cfg)) < 0)
        return rc;
    for (int i = 0; i < m->nparams; i++) {
        const struct wk_model_param *p = &m->params[i];

        if ((rc = wk_adamw_add(&m->opt, p->w, p->g, p->n, p->decay)) < 0) {
            wk_adamw_free(&m->opt);
            return rc;
        }
    }
    return 0;
}

int wk_model_step(struct wk_model *m)
{
    int E = m->cfg.experts, rc;

    if (m->opt.count != m->nparams)
        return -EINVAL;
    if ((rc = wk_adamw_step(&m->opt)) < 0)
        return rc;
    for (int i = 0; i < nlayers(m); i++) {
        rc = wk_moe_update_bias(&m->layer[i].moe, m->load + (size_t)i * E, WK_MOE_BIAS_GAMMA);
        if (rc < 0)
            return rc;
    }
    memset(m->load, 0, (size_t)nlayers(m) * (size_t)E * sizeof(*m->load));
    return 0;
}

/* --- checkpoints ------------------------------------------------------------- */

#define CKPT_SUFFIX_MAX 8 /* ".m", ".v", ".t" and the NUL, with room */

static void ckpt_name(char *buf, size_t len, const char *name, const char *suffix)
{
    snprintf(buf, len, "%s%s", name, suffix);
}

int wk_model_ckpt_add(struct wk_model *m, struct dx_ckpt_writer *w)
{
    char name[sizeof(m->params[0].name) + CKPT_SUFFIX_MAX];
    int rc;

    if (m->opt.count != m->nparams)
        return -EINVAL;
    for (int i = 0; i < m->nparams; i++) {
        const struct wk_model_param *p = &m->params[i];
        struct wk_adamw_param *o = &m->opt.p[i];

        if ((rc = dx_ckpt_writer_add(w, p->name, DX_CKPT_F32, p->w, p->n)) < 0)
            return rc;
        ckpt_name(name, sizeof(name), p->name, ".m");
        if ((rc = dx_ckpt_writer_add(w, name, DX_CKPT_F32, o->m, o->n)) < 0)
            return rc;
        ckpt_name(name, sizeof(name), p->name, ".v");
        if ((rc = dx_ckpt_writer_add(w, name, DX_CKPT_F32, o->v, o->n)) < 0)
            return rc;
        ckpt_name(name, sizeof(name), p->name, ".t");
        if ((rc = dx_ckpt_writer_add(w, name, DX_CKPT_I64, &o->step, 1)) < 0)
            return rc;
    }
    for (int i = 0; i < nlayers(m); i++) {
        snprintf(name, sizeof(name), "layer%d.moe.bias", m->first + i);
        rc = dx_ckpt_writer_add(w, name, DX_CKPT_F32, m->layer[i].moe.bias, (size_t)m->cfg.experts);
        if (rc < 0)
            return rc;
    }
    return 0;
}

struct ckpt_src {
    const struct dx_ckpt_reader *const *r;
    int n;
};

/* Copies the section from the first shard that has it. */
static int ckpt_copy(struct ckpt_src r, const char *name, enum dx_ckpt_dtype t, void *dst,
                     size_t count, size_t elem, char *err, size_t errlen)
{
    const void *src = NULL;
    int rc = -ENOENT;

    for (int i = 0; i < r.n && rc == -ENOENT; i++)
        rc = dx_ckpt_get(r.r[i], name, t, count, &src, err, errlen);
    if (rc == 0)
        memcpy(dst, src, count * elem);
    return rc;
}

int wk_model_ckpt_load(struct wk_model *m, const struct dx_ckpt_reader *const *shards, int nshards,
                       char *err, size_t errlen)
{
    const struct ckpt_src r = {shards, nshards};

    char name[sizeof(m->params[0].name) + CKPT_SUFFIX_MAX];
    int rc;

    if (m->opt.count != m->nparams)
        return dx_errf(err, errlen, -EINVAL, "the model has no optimizer to load into");
    for (int i = 0; i < m->nparams; i++) {
        const struct wk_model_param *p = &m->params[i];
        struct wk_adamw_param *o = &m->opt.p[i];

        if ((rc = ckpt_copy(r, p->name, DX_CKPT_F32, p->w, p->n, sizeof(float), err, errlen)) < 0)
            return rc;
        ckpt_name(name, sizeof(name), p->name, ".m");
        if ((rc = ckpt_copy(r, name, DX_CKPT_F32, o->m, o->n, sizeof(float), err, errlen)) < 0)
            return rc;
        ckpt_name(name, sizeof(name), p->name, ".v");
        if ((rc = ckpt_copy(r, name, DX_CKPT_F32, o->v, o->n, sizeof(float), err, errlen)) < 0)
            return rc;
        ckpt_name(name, sizeof(name), p->name, ".t");
        if ((rc = ckpt_copy(r, name, DX_CKPT_I64, &o->step, 1, sizeof(int64_t), err, errlen)) < 0)
            return rc;
    }
    for (int i = 0; i < nlayers(m); i++) {
        snprintf(name, sizeof(name), "layer%d.moe.bias", m->first + i);
        rc = ckpt_copy(r, name, DX_CKPT_F32, m->layer[i].moe.bias, (size_t)m->cfg.experts,
                       sizeof(float), err, errlen);
        if (rc < 0)
            return rc;
    }
    memset(m->load, 0, (size_t)nlayers(m) * (size_t)m->cfg.experts * sizeof(*m->load));
    return 0;
}
