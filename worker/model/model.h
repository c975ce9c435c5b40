/* model.h - the byte-level decoder-only MoE transformer, as a chain of the
 * layers in this directory:
 *
 *   x = embed(tokens)
 *   per layer l:  x = x + attn(rmsnorm(x));  x = x + moe(rmsnorm(x))
 *   loss = cross-entropy(head(rmsnorm(x)), next bytes)
 *
 * A struct wk_model is one pipeline stage: a contiguous range of layers
 * [first, last), plus the embedding when it is the first stage and the final
 * norm and head when it is the last. The whole model is the one stage with
 * everything (wk_model_init). A stage without the embedding takes its input
 * activations [B*T][d] instead of token ids; one without the head returns
 * its output activations and takes their gradient in backward.
 *
 * Initialisation depends only on the seed and each tensor's stream id, never
 * on the stage layout: the seed is first mixed (WK_MODEL_STREAM_SEED), then
 * the embedding uses stream WK_MODEL_STREAM_EMBED, the head
 * WK_MODEL_STREAM_HEAD, and layer l's attention and MoE
 * wk_model_layer_stream(l) + WK_MODEL_STREAM_ATTN / _MOE (the MoE takes
 * 1 + 3 (experts + shared) consecutive ids from there). Weights are
 * N(0, WK_INIT_STD^2), norm gains 1, routing biases 0.
 *
 * Gradients accumulate over micro-batches (wk_model_zero_grad clears them);
 * the MoE expert loads of every forward accumulate too, and wk_model_step
 * (AdamW, then the aux-loss-free bias update from those loads) clears them. */
#ifndef WK_MODEL_H
#define WK_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "worker/model/adamw.h"
#include "worker/model/attention.h"
#include "worker/model/embed.h"
#include "worker/model/head.h"
#include "worker/model/moe.h"
#include "worker/model/rmsnorm.h"
#include "worker/model/tensor.h"

#define WK_MODEL_STREAM_SEED 0xd0b1e5eedULL /* mixes the job seed once */
#define WK_MODEL_STREAM_EMBED 1
#define WK_MODEL_STREAM_HEAD 2
#define WK_MODEL_STREAM_LAYER_STRIDE (1ULL << 24) /* ids reserved per layer */
#define WK_MODEL_STREAM_ATTN 0                    /* + 0..3: q, k, v, o */
#define WK_MODEL_STREAM_MOE 16                    /* + 0 .. 3 (experts + shared) */

/* Stage flags. */
#define WK_MODEL_HAS_EMBED 0x1
#define WK_MODEL_HAS_HEAD 0x2
#define WK_MODEL_WHOLE (WK_MODEL_HAS_EMBED | WK_MODEL_HAS_HEAD)

/* The jobspec's model fields. */
struct wk_model_config {
    int vocab, d_model, layers, heads, experts, top_k, expert_hidden, shared_experts;
    int seq_len, expert_groups, group_limit;
    int fp8_dispatch; /* train.dispatch fp8: struct wk_moe_config's */
};

/* What a tensor is, for tests and reports. */
enum wk_model_kind {
    WK_MODEL_EMBED,
    WK_MODEL_NORM,
    WK_MODEL_ATTN,
    WK_MODEL_ROUTER,
    WK_MODEL_EXPERT,
    WK_MODEL_SHARED,
    WK_MODEL_HEAD,
    WK_MODEL_KINDS
};

/* One trainable tensor: its weights, gradient, size and whether AdamW
 * decays it (not the norm gains). */
struct wk_model_param {
    char name[48]; /* e.g. "layer1.attn.wq", "embed", "final_norm" */
    enum wk_model_kind kind;
    int layer; /* -1 outside the layers */
    float *w, *g;
    size_t n;
    int decay;
};

struct wk_model_layer {
    struct wk_rmsnorm norm1, norm2;
    struct wk_attn attn;
    struct wk_moe moe;
};

struct wk_model {
    struct wk_model_config cfg;
    uint64_t seed; /* the job's seed, as given */
    int first, last, flags;
    struct wk_embed embed;        /* with WK_MODEL_HAS_EMBED */
    struct wk_model_layer *layer; /* [last - first] */
    struct wk_rmsnorm norm_f;     /* with WK_MODEL_HAS_HEAD */
    struct wk_head head;          /* with WK_MODEL_HAS_HEAD */
    int64_t *load;                /* [last - first][experts] expert loads since the last step */
    struct wk_adamw opt;          /* after wk_model_optim_init */
    int nparams;
    struct wk_model_param *params;
};

/* Expert parallelism. With a struct wk_model_ep on a cache, each MoE layer
 * of that micro-batch routes its tokens, then hands the routed experts'
 * work to these callbacks instead of running every expert itself (the
 * shared experts and the combine stay local):
 *   forward:  fill c->y for every plan row (from c->xg);
 *   backward: fill c->dxg for every plan row (from c->dy);
 *   weight:   accumulate the weight gradients of the experts this rank
 *             computes, from what forward and backward kept.
 * layer is the model's global layer index, tag the cache's ep_tag. Each
 * returns 0 or -errno, which stops the pass. */
struct wk_model_ep {
    int (*forward)(void *arg, void *tag, int layer, struct wk_moe *moe, struct wk_moe_ctx *c);
    int (*backward)(void *arg, void *tag, int layer, struct wk_moe *moe, struct wk_moe_ctx *c);
    int (*weight)(void *arg, void *tag, int layer, struct wk_moe *moe, const struct wk_moe_ctx *c);
    void *arg;
};

/* The activations of one micro-batch of `batch` sequences of `seq` tokens,
 * kept from forward for backward (one per micro-batch in flight). */
struct wk_model_cache {
    int batch, seq, rows; /* rows = batch * seq */
    int32_t *inputs;      /* [rows] token ids (with the embedding) */
    int32_t *targets;     /* [rows] next-byte targets (with the head) */
    struct wk_mat *act;   /* [nlayers + 1] layer inputs, then the stage output */
    struct wk_mat *mid;   /* [nlayers] after the attention residual */
    struct wk_rmsnorm_cache *n1, *n2;
    struct wk_attn_cache *attn;
    struct wk_moe_ctx *moe;
    struct wk_rmsnorm_cache nf;
    struct wk_head_cache head;
    struct wk_mat h, g, g2, t;    /* [rows][d] scratch; g keeps the embedding's gradient for W */
    const struct wk_model_ep *ep; /* NULL: every expert runs here (the default) */
    void *ep_tag;                 /* passed to ep's callbacks */
};

/* 0, or -EINVAL with a reason in err for a shape the layers cannot take. */
int wk_model_config_check(const struct wk_model_config *cfg, char *err, size_t errlen);

/* The stage of layers [first, last) with flags WK_MODEL_HAS_*. 0, -EINVAL,
 * -ENOMEM, or -ECANCELED when the thread's stop flag was set (wk_set_stop;
 * forward and backward check it between layers too); nothing is left
 * allocated on error. */
int wk_model_stage_init(struct wk_model *m, const struct wk_model_config *cfg, uint64_t seed,
                        int first, int last, int flags);
/* The whole model: the stage [0, layers) with the embedding and the head. */
int wk_model_init(struct wk_model *m, const struct wk_model_config *cfg, uint64_t seed);
void wk_model_free(struct wk_model *m);

/* The first stream id of layer l. */
uint64_t wk_model_layer_stream(int l);

/* Gradients (not the loads) to 0; g *= scale for every gradient. */
void wk_model_zero_grad(struct wk_model *m);
void wk_model_scale_grad(struct wk_model *m, float scale);
/* Parameters in a fixed order: embed, per layer norm1, wq, wk, wv, wo, norm2,
 * router, w1, w3, w2 (, shared_w1, shared_w3, shared_w2), final_norm, head. */
int wk_model_param_count(const struct wk_model *m);
const struct wk_model_param *wk_model_param(const struct wk_model *m, int i);

int wk_model_cache_init(struct wk_model_cache *c, const struct wk_model *m, int batch, int seq);
void wk_model_cache_free(struct wk_model_cache *c, const struct wk_model *m);

/* Forward of one micro-batch. tokens [batch][seq + 1] (needed with the
 * embedding or the head): sequence b's inputs are tokens[b][0..seq) and its
 * targets tokens[b][1..seq]. x_in [rows][d] is the input without the
 * embedding; x_out [rows][d] gets the output without the head; *loss the
 * mean cross-entropy over the rows with the head. Adds the expert loads.
 * 0 or -EINVAL (a token outside the vocabulary, a missing argument). */
int wk_model_forward(struct wk_model *m, struct wk_model_cache *c, const int32_t *tokens,
                     const float *x_in, float *x_out, float *loss);
/* Backward of the micro-batch c holds: accumulates every gradient (of its
 * mean loss with the head; of sum(dy . output) without). dx [rows][d] gets
 * the input gradient without the embedding. 0 or -EINVAL. */
int wk_model_backward(struct wk_model *m, struct wk_model_cache *c, const float *dy, float *dx);

/* The backward in two halves, for zero-bubble schedules: backward_input
 * gives dx (and the norm gains' gradients, which cost nothing extra) and
 * keeps in c what backward_weight needs for every other weight gradient.
 * Between the two, c must not run another forward. input then weight
 * equals wk_model_backward bitwise. 0 or -EINVAL. */
int wk_model_backward_input(struct wk_model *m, struct wk_model_cache *c, const float *dy,
                            float *dx);
int wk_model_backward_weight(struct wk_model *m, struct wk_model_cache *c);

/* Registers every parameter with a fresh AdamW (decay except norm gains). */
int wk_model_optim_init(struct wk_model *m, const struct wk_adamw_config *cfg);
/* AdamW on every parameter, then each layer's routing bias from the loads
 * accumulated since the last step (WK_MOE_BIAS_GAMMA), then loads to 0. */
int wk_model_step(struct wk_model *m);

/* Checkpoints (common/ckpt.h): every parameter under its name (f32), its
 * AdamW moments as NAME.m and NAME.v, its step count as NAME.t (one i64),
 * and each layer's routing bias as layerL.moe.bias. Names are global, so
 * the stages of one model never collide and a whole model's shard has
 * every stage's sections. add references the model's memory until the
 * writer commits; load takes each section from the first of the shards
 * that has it (so a whole model loads from every stage's shards), checks
 * its type and size and fills the model (0, or -errno with the reason). */
struct dx_ckpt_writer;
struct dx_ckpt_reader;
int wk_model_ckpt_add(struct wk_model *m, struct dx_ckpt_writer *w);
int wk_model_ckpt_load(struct wk_model *m, const struct dx_ckpt_reader *const *shards, int nshards,
                       char *err, size_t errlen);

#endif
