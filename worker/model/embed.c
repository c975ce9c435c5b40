/* embed.c - the token embedding of embed.h. */
#include "worker/model/embed.h"

#include <errno.h>
#include <string.h>

int wk_embed_init(struct wk_embed *e, int vocab, int d, uint64_t seed, uint64_t stream, float std)
{
    int rc;

    e->vocab = vocab;
    e->d = d;
    rc = wk_mat_init(&e->w, vocab, d);
    if (rc < 0)
        return rc;
    rc = wk_mat_init(&e->dw, vocab, d);
    if (rc < 0) {
        wk_mat_free(&e->w);
        return rc;
    }
    wk_mat_fill_normal(&e->w, seed, stream, std);
    return 0;
}

void wk_embed_free(struct wk_embed *e)
{
    wk_mat_free(&e->w);
    wk_mat_free(&e->dw);
}

void wk_embed_zero_grad(struct wk_embed *e)
{
    wk_mat_zero(&e->dw);
}

static int tokens_valid(const struct wk_embed *e, const int32_t *tokens, int n)
{
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= e->vocab)
            return 0;
    return 1;
}

int wk_embed_forward(const struct wk_embed *e, const int32_t *tokens, float *y, int n)
{
    if (n < 0 || !tokens_valid(e, tokens, n))
        return -EINVAL;
    for (int i = 0; i < n; i++)
        memcpy(y + (size_t)i * e->d, e->w.data + (size_t)tokens[i] * e->d, e->d * sizeof(float));
    return 0;
}

int wk_embed_backward(struct wk_embed *e, const int32_t *tokens, const float *dy, int n)
{
    if (n < 0 || !tokens_valid(e, tokens, n))
        return -EINVAL;
    for (int i = 0; i < n; i++) {
        float *row = e->dw.data + (size_t)tokens[i] * e->d;
        const float *g = dy + (size_t)i * e->d;

        for (int j = 0; j < e->d; j++)
            row[j] += g[j];
    }
    return 0;
}
