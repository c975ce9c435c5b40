/* moe.h - the DeepSeek-V3 mixture-of-experts feed-forward layer on the CPU
 * (fp32, GEMMs through OpenBLAS): the sigmoid router with group-limited top-k
 * and the auxiliary-loss-free balancing bias, SwiGLU routed and shared
 * experts, forward and backward (split into input and weight halves for
 * zero-bubble schedules), and a dispatch plan so that an expert-parallel
 * caller can run only some experts locally and combine in a fixed order.
 *
 * Shapes (row-major): x, out, dx [n][d]; router [experts][d];
 * w1, w3 [experts][hidden][d]; w2 [experts][d][hidden]; the shared experts
 * sw1, sw3 [shared][hidden][d], sw2 [shared][d][hidden].
 *
 * For each token t: s = sigmoid(router x_t); the selection uses s + bias:
 * experts form expert_groups contiguous groups, a group scores the sum of
 * its two best (s + b) (its only one when a group has one expert), the best
 * group_limit groups stay, and the top_k experts by (s + b) among them are
 * chosen (ties: lower group / expert index). Gate g_k = scale * s_k / sum of
 * the chosen s. out_t = sum_shared SwiGLU(x_t) + sum_k g_k SwiGLU_k(x_t),
 * added in that order: shared experts by index, then the chosen experts in
 * ascending expert index. Gradients never flow through the choice itself. */
#ifndef WK_MOE_H
#define WK_MOE_H

#include <stddef.h>
#include <stdint.h>

#define WK_MOE_INIT_STD 0.02f       /* default std of the normal initial weights */
#define WK_MOE_ROUTE_SCALE 1.0f     /* default routed scaling factor */
#define WK_MOE_BIAS_GAMMA 0.001f    /* V3's bias update speed */
#define WK_MOE_GROUP_TOP 2          /* a group's score sums its best two (s + b) */
#define WK_MOE_STREAMS_PER_EXPERT 3 /* rng streams per expert: w1, w3, w2 */

struct wk_moe_config {
    int d_model;
    int experts;        /* routed experts */
    int top_k;          /* routed experts per token */
    int expert_hidden;  /* SwiGLU hidden width, routed and shared alike */
    int shared_experts; /* always-on experts, weight 1 */
    int expert_groups;  /* experts % expert_groups == 0 */
    int group_limit;    /* groups a token may use; top_k <= group_limit * group size */
    float route_scale;  /* V3's routed scaling factor (WK_MOE_ROUTE_SCALE) */
    float init_std;     /* initial weights ~ N(0, init_std^2) (WK_MOE_INIT_STD) */
    int fp8_dispatch;   /* the experts see each dispatched row rounded to e4m3
                         * with a scale per 1x128 tile, as the fp8 wire format
                         * carries it (kernels/ref.h); 0 by default */
};

/* Parameters, their gradients (accumulated by backward, cleared by
 * wk_moe_zero_grad) and the routing bias (not trained by gradient). */
struct wk_moe {
    struct wk_moe_config cfg;
    float *router, *w1, *w3, *w2, *sw1, *sw3, *sw2;
    float *g_router, *g_w1, *g_w3, *g_w2, *g_sw1, *g_sw3, *g_sw2;
    float *bias; /* [experts] */
};

/* One trainable tensor, for registering with an optimizer. */
struct wk_moe_tensor {
    const char *name;
    float *w, *g;
    size_t n;
};
#define WK_MOE_MAX_TENSORS 7

/* The dispatch plan of one step: the rows routed to each expert, grouped by
 * expert and in ascending token order within an expert. Row r carries
 * token[r] with weight gate[r]; expert e owns rows [offset[e], offset[e+1]). */
struct wk_moe_plan {
    int rows;    /* n * top_k */
    int *count;  /* [experts] tokens each expert took this step */
    int *offset; /* [experts + 1] */
    int *token;  /* [rows] */
    float *gate; /* [rows] */
};

/* What one micro-batch keeps between forward and backward; several can be
 * alive at once (pipeline schedules). Sized for at most `cap` tokens. */
struct wk_moe_ctx {
    int cap, n;
    struct wk_moe_plan plan;
    float *x;                /* [cap][d] copy of the input */
    float *score;            /* [cap][experts] sigmoid scores s (without bias) */
    int *choice;             /* [cap][top_k] chosen experts, ascending */
    int *row;                /* [cap][top_k] plan row of each choice */
    float *xg;               /* [rows][d] the input gathered in plan order */
    float *h1, *h3, *act;    /* [rows][hidden] x W1^T, x W3^T, silu(h1) * h3 */
    float *y;                /* [rows][d] unweighted expert outputs */
    float *sh1, *sh3, *sact; /* [shared][cap][hidden] */
    float *sy;               /* [shared][cap][d] */
    /* written by the backward input half, read by the weight half */
    float *dout;        /* [cap][d] copy of the output gradient */
    float *dy;          /* [rows][d] gate * dout of the row's token */
    float *dh1, *dh3;   /* [rows][hidden] */
    float *sdh1, *sdh3; /* [shared][cap][hidden] */
    float *dlogit;      /* [cap][experts] router pre-sigmoid gradient */
    float *dxg;         /* [rows][d] input gradient per plan row */
    float *sdx;         /* [shared][cap][d] the shared experts' input gradients */
    float *work;        /* [experts + groups] routing scratch */
    int *iwork;         /* [experts + groups] routing scratch */
    uint8_t *rec;       /* one row's fp8 record (fp8_dispatch) */
    size_t rec_pitch;
};

/* Defaults for route_scale and init_std; the shape fields are the caller's. */
void wk_moe_config_defaults(struct wk_moe_config *cfg);
int wk_moe_config_check(const struct wk_moe_config *cfg);

/* Allocate and initialise from (seed, stream): router uses stream, expert e's
 * w1, w3, w2 use stream + 1 + 3e + {0,1,2}, shared expert j's use
 * stream + 1 + 3 * experts + 3j + {0,1,2}. Bias and gradients start at 0. */
int wk_moe_init(struct wk_moe *m, const struct wk_moe_config *cfg, uint64_t seed, uint64_t stream);
void wk_moe_free(struct wk_moe *m);
void wk_moe_zero_grad(struct wk_moe *m);
/* Fill out[] with the trainable tensors (not the bias); returns how many. */
int wk_moe_tensors(struct wk_moe *m, struct wk_moe_tensor out[WK_MOE_MAX_TENSORS]);

int wk_moe_ctx_init(struct wk_moe_ctx *c, const struct wk_moe_config *cfg, int cap);
void wk_moe_ctx_free(struct wk_moe_ctx *c);

/* --- forward ------------------------------------------------------------ */

/* Whole forward: route, all experts, shared experts, combine. */
int wk_moe_forward(const struct wk_moe *m, struct wk_moe_ctx *c, const float *x, int n, float *out);

/* The same in steps. route: scores, choice, gates, plan, gathered input.
 * forward_experts: experts [lo, hi) fill their rows of c->y (an
 * expert-parallel caller runs its own experts, or ships c->xg rows away and
 * puts the returned rows in c->y). combine: out from c->sy and c->y. */
int wk_moe_route(const struct wk_moe *m, struct wk_moe_ctx *c, const float *x, int n);
int wk_moe_forward_experts(const struct wk_moe *m, struct wk_moe_ctx *c, int lo, int hi);
int wk_moe_forward_shared(const struct wk_moe *m, struct wk_moe_ctx *c);
int wk_moe_combine(const struct wk_moe *m, const struct wk_moe_ctx *c, float *out);

/* --- backward ----------------------------------------------------------- */

/* Full backward: backward_input then backward_weight (gradients accumulate). */
int wk_moe_backward(struct wk_moe *m, struct wk_moe_ctx *c, const float *dout, float *dx);

/* dx only; keeps in c what backward_weight needs. */
int wk_moe_backward_input(const struct wk_moe *m, struct wk_moe_ctx *c, const float *dout,
                          float *dx);
/* Parameter gradients of every tensor from what backward_input kept. */
int wk_moe_backward_weight(struct wk_moe *m, const struct wk_moe_ctx *c);

/* backward_input in steps, mirroring the forward ones. prepare: c->dy rows,
 * the router gradient; experts: rows of c->dxg (and c->dh1, c->dh3) for
 * experts [lo, hi); backward_shared: the shared experts; combine_dx: dx from
 * the router, shared and per-row parts, in the forward's fixed order. */
int wk_moe_backward_prepare(const struct wk_moe *m, struct wk_moe_ctx *c, const float *dout);
int wk_moe_backward_experts(const struct wk_moe *m, struct wk_moe_ctx *c, int lo, int hi);
int wk_moe_backward_shared(const struct wk_moe *m, struct wk_moe_ctx *c);
int wk_moe_combine_dx(const struct wk_moe *m, const struct wk_moe_ctx *c, float *dx);
/* Weight gradients of the router and the shared experts only. */
int wk_moe_backward_weight_dense(struct wk_moe *m, const struct wk_moe_ctx *c);
/* Weight gradients of routed experts [lo, hi) only. */
int wk_moe_backward_weight_experts(struct wk_moe *m, const struct wk_moe_ctx *c, int lo, int hi);

/* The router's pieces on plain arrays (what the device kernels of
 * kernels/moe.cu reproduce; the layer itself calls them).
 *
 * wk_moe_sigmoid: scores[i] = 1 / (1 + expf(-logits[i])) for i < count (in
 * place when scores == logits).
 * wk_moe_gate_scale: dy[r][:] = gate[r] * dout[token[r]][:] for r < rows,
 * each product rounded once (the backward's gate-scaled pack).
 * wk_moe_gate_backward: for n tokens with score [n][experts], their chosen
 * experts choice [n][top_k] and the row of each choice row [n][top_k] in
 * y [rows][d], given dout [n][d]: dgate[t][k] = dout[t] . y[row[t][k]]
 * (summed in i order from 0.0f), and dlogit [n][experts], the gradient of
 * the router's pre-sigmoid logits: with S = sum over k of s_k = score[t]
 * [choice[t][k]] and dot = sum over k of dgate_k * s_k (both in k order),
 * dlogit[t][choice] = route_scale * (dgate_k / S - dot / (S * S)) * s_k *
 * (1 - s_k), 0 for the other experts. */
void wk_moe_sigmoid(const float *logits, size_t count, float *scores);
void wk_moe_gate_scale(const float *dout, int d, const int *token, const float *gate, int rows,
                       float *dy);
void wk_moe_gate_backward(const float *score, int experts, const int *choice, const int *row, int n,
                          int top_k, const float *dout, const float *y, int d, float route_scale,
                          float *dgate, float *dlogit);

/* --- one SwiGLU expert on gathered rows (what an EP rank runs) ---------- */

/* y[rows][d] = (silu(x w1^T) * (x w3^T)) w2^T; keeps h1, h3, act [rows][hidden]. */
void wk_moe_ffn_forward(const float *w1, const float *w3, const float *w2, int d, int hidden,
                        const float *x, int rows, float *h1, float *h3, float *act, float *y);
/* dx[rows][d] from dy[rows][d]; writes dh1, dh3 [rows][hidden]. */
void wk_moe_ffn_backward_input(const float *w1, const float *w3, const float *w2, int d, int hidden,
                               int rows, const float *h1, const float *h3, const float *dy,
                               float *dh1, float *dh3, float *dx);
/* Accumulate g_w1, g_w3 [hidden][d] and g_w2 [d][hidden]. */
void wk_moe_ffn_backward_weight(int d, int hidden, int rows, const float *x, const float *act,
                                const float *dy, const float *dh1, const float *dh3, float *g_w1,
                                float *g_w3, float *g_w2);

/* --- load balancing ----------------------------------------------------- */

/* load[e] += tokens expert e took in c's step (sum over micro-batches/ranks). */
void wk_moe_add_load(const struct wk_moe *m, const struct wk_moe_ctx *c, int64_t *load);
/* Aux-loss-free update, after the optimizer step:
 * bias[e] += gamma * sign(mean(load) - load[e]). */
int wk_moe_update_bias(struct wk_moe *m, const int64_t *load, float gamma);

/* The two above on plain arrays (what a device kernel reproduces):
 * load[e] += count[e]; and the sign rule on bias[experts], the mean of the
 * loads summed in double in expert order, then divided by experts. The
 * latter: 0, or -EINVAL for no load, experts < 1 or a gamma not finite. */
void wk_moe_load_add(int64_t *load, const int *count, int experts);
int wk_moe_bias_step(float *bias, const int64_t *load, int experts, float gamma);

#endif
