/* adamw.c - AdamW (see adamw.h): the tensor list, the update and the
 * plain-array state. */
#include "worker/model/adamw.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ADAMW_FIRST_ALLOC 8

void wk_adamw_config_defaults(struct wk_adamw_config *cfg)
{
    cfg->lr = WK_ADAMW_LR;
    cfg->beta1 = WK_ADAMW_BETA1;
    cfg->beta2 = WK_ADAMW_BETA2;
    cfg->eps = WK_ADAMW_EPS;
    cfg->weight_decay = WK_ADAMW_WEIGHT_DECAY;
}

static int config_ok(const struct wk_adamw_config *c)
{
    return c && isfinite(c->lr) && c->lr >= 0.0f && c->beta1 >= 0.0f && c->beta1 < 1.0f &&
           c->beta2 >= 0.0f && c->beta2 < 1.0f && c->eps > 0.0f && isfinite(c->eps) &&
           isfinite(c->weight_decay) && c->weight_decay >= 0.0f;
}

int wk_adamw_init(struct wk_adamw *o, const struct wk_adamw_config *cfg)
{
    memset(o, 0, sizeof(*o));
    if (!config_ok(cfg))
        return -EINVAL;
    o->cfg = *cfg;
    return 0;
}

void wk_adamw_free(struct wk_adamw *o)
{
    for (int i = 0; i < o->count; i++) {
        free(o->p[i].m);
        free(o->p[i].v);
    }
    free(o->p);
    o->p = NULL;
    o->count = o->alloc = 0;
}

int wk_adamw_add(struct wk_adamw *o, float *w, const float *g, size_t n, int decay)
{
    struct wk_adamw_param *p;

    if (!w || !g || n == 0)
        return -EINVAL;
    if (o->count == o->alloc) {
        int alloc = o->alloc ? 2 * o->alloc : ADAMW_FIRST_ALLOC;
        p = realloc(o->p, sizeof(*p) * (size_t)alloc);
        if (!p)
            return -ENOMEM;
        o->p = p;
        o->alloc = alloc;
    }
    p = &o->p[o->count];
    memset(p, 0, sizeof(*p));
    p->m = calloc(n, sizeof(float));
    p->v = calloc(n, sizeof(float));
    if (!p->m || !p->v) {
        free(p->m);
        free(p->v);
        return -ENOMEM;
    }
    p->w = w;
    p->g = g;
    p->n = n;
    p->decay = decay != 0;
    return o->count++;
}

int wk_adamw_coeffs(const struct wk_adamw_config *cfg, int64_t t, int decay,
                    struct wk_adamw_coeffs *out)
{
    if (!config_ok(cfg) || t < 1)
        return -EINVAL;
    out->lr = cfg->lr;
    out->beta1 = cfg->beta1;
    out->beta2 = cfg->beta2;
    out->eps = cfg->eps;
    out->bc1 = (float)(1.0 - pow((double)cfg->beta1, (double)t));
    out->bc2 = (float)(1.0 - pow((double)cfg->beta2, (double)t));
    out->decay = decay ? 1.0f - cfg->lr * cfg->weight_decay : 1.0f;
    return 0;
}

void wk_adamw_update(const struct wk_adamw_coeffs *k, float *w, const float *g, float *m, float *v,
                     size_t n)
{
    const float b1 = k->beta1, b2 = k->beta2, bc1 = k->bc1, bc2 = k->bc2;
    const float decay = k->decay, lr = k->lr, eps = k->eps;

    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * decay - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

int wk_adamw_step(struct wk_adamw *o)
{
    if (!config_ok(&o->cfg))
        return -EINVAL;
    for (int i = 0; i < o->count; i++) {
        struct wk_adamw_param *p = &o->p[i];
        struct wk_adamw_coeffs k;
        int rc = wk_adamw_coeffs(&o->cfg, ++p->step, p->decay, &k);

        if (rc < 0)
            return rc;
        wk_adamw_update(&k, p->w, p->g, p->m, p->v, p->n);
    }
    return 0;
}

size_t wk_adamw_state_floats(const struct wk_adamw *o)
{
    size_t n = 0;

    for (int i = 0; i < o->count; i++)
        n += 2 * o->p[i].n;
    return n;
}

int wk_adamw_save(const struct wk_adamw *o, float *state, int64_t *steps)
{
    if ((!state || !steps) && o->count > 0)
        return -EINVAL;
    for (int i = 0; i < o->count; i++) {
        const struct wk_adamw_param *p = &o->p[i];
        memcpy(state, p->m, sizeof(float) * p->n);
        memcpy(state + p->n, p->v, sizeof(float) * p->n);
        state += 2 * p->n;
        steps[i] = p->step;
    }
    return 0;
}

int wk_adamw_load(struct wk_adamw *o, const float *state, const int64_t *steps)
{
    if ((!state || !steps) && o->count > 0)
        return -EINVAL;
    for (int i = 0; i < o->count; i++)
        if (steps[i] < 0)
            return -EINVAL;
    for (int i = 0; i < o->count; i++) {
        struct wk_adamw_param *p = &o->p[i];
        memcpy(p->m, state, sizeof(float) * p->n);
        memcpy(p->v, state + p->n, sizeof(float) * p->n);
        state += 2 * p->n;
        p->step = steps[i];
    }
    return 0;
}
