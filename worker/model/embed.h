/* embed.h - the token embedding: a table W[vocab][d]; forward gathers the
 * rows of the token ids, backward scatter-adds the output gradient into dW.
 * Token ids are int32 in [0, vocab). */
#ifndef WK_EMBED_H
#define WK_EMBED_H

#include <stdint.h>

#include "worker/model/tensor.h"

struct wk_embed {
    int vocab;
    int d;
    struct wk_mat w;  /* [vocab][d] */
    struct wk_mat dw; /* [vocab][d] */
};

int wk_embed_init(struct wk_embed *e, int vocab, int d, uint64_t seed, uint64_t stream, float std);
void wk_embed_free(struct wk_embed *e);
void wk_embed_zero_grad(struct wk_embed *e);
/* y[n][d] = W[tokens[i]]. 0, or -EINVAL if a token is out of range (y is
 * then unspecified). */
int wk_embed_forward(const struct wk_embed *e, const int32_t *tokens, float *y, int n);
/* dW[tokens[i]] += dy[i], in token order. 0 or -EINVAL (dW untouched). */
int wk_embed_backward(struct wk_embed *e, const int32_t *tokens, const float *dy, int n);

#endif
