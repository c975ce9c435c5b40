/* check_train_kernels.c - duplex-gpucheck's checks of kernels/train.cu (the
 * embedding, AdamW, elementwise add / scale and the MoE load and bias
 * kernels) against the worker's own functions on fresh random data:
 * wk_embed_forward / _backward, wk_adamw_coeffs + wk_adamw_update,
 * wk_moe_load_add, wk_moe_bias_step, and model.c's residual add and
 * wk_model_scale_grad's loop (repeated here: static there / needs a model).
 *
 * Bounds: every comparison is bitwise (0 ulp; int32 / int64 exact). The
 * kernels do the references' operations in the references' order with
 * correctly rounded single operations (__f*_rn, __fsqrt_rn: no FMA), the
 * embedding gradient adds each token's row in ascending position like
 * embed.c (no atomics), and the bias update sums the loads in double in
 * expert order like moe.c. Outputs are poisoned (0xff bytes) on the device
 * and the host first; in-place outputs (dW, AdamW's w, m, v, the loads, the
 * bias) start from random values and are compared whole, so a stray write
 * shows up as a difference.
 *
 * Timing rows: bytes moved per launch over the time; AdamW: read w, g, m, v
 * and write w, m, v (28 bytes an element). */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/gpu/gpucheck.h"
#include "worker/model/adamw.h"
#include "worker/model/embed.h"
#include "worker/model/moe.h"

GC_IMAGE(train);

/* this file's kernels */
static struct {
    wk_cuda_function_t embed_fwd, embed_bwd, adamw, add, scale, load_add, bias_update;
} tf;

/* --- embedding ---------------------------------------------------------------- */

/* dx_embed_bwd's chain[] scratch starts as this (not the 0xff poison, -1,
 * which ends a chain): a link the kernel reads without having written it
 * points far outside dy, a fault rather than a silently shorter sum */
#define CHAIN_POISON 0x3fffffff

static wk_cuda_ptr chain_scratch(struct ck *k, int n)
{
    int32_t *h = ck_host(k, (size_t)n * 4);

    for (int i = 0; h && i < n; i++)
        h[i] = CHAIN_POISON;
    return ck_dev(k, (size_t)n * 4, h);
}

/* tokens in [0, vocab), half of them among the first few ids so that ids
 * repeat (long chains in the backward) whatever the vocabulary */
static void embed_tokens(struct gc *g, int32_t *t, int n, int vocab)
{
    const uint64_t hot = vocab < 16 ? (uint64_t)vocab : 16;

    for (int i = 0; i < n; i++) {
        uint64_t r = gc_u64(g);
        t[i] = (int32_t)((r & 1) ? (r >> 1) % hot : (r >> 1) % (uint64_t)vocab);
    }
}

static int distinct_tokens(const int32_t *t, int n, int vocab)
{
    unsigned char *seen = calloc((size_t)vocab, 1);
    int count = 0;

    if (!seen)
        return n;
    for (int i = 0; i < n; i++)
        if (!seen[t[i]]++)
            count++;
    free(seen);
    return count;
}

static void check_embed(struct gc *g, int n, int vocab, int d, const char *name)
{
    struct ck k = {.g = g};
    const size_t table = (size_t)vocab * d, nd = (size_t)n * d;
    float *w = ck_host(&k, table * 4), *dy = ck_host(&k, nd * 4);
    float *y = ck_host(&k, nd * 4), *y_d = ck_host(&k, nd * 4);
    float *dw = ck_host(&k, table * 4), *dw_d = ck_host(&k, table * 4);
    int32_t *tokens = ck_host(&k, (size_t)n * 4);
    struct wk_embed e = {.vocab = vocab, .d = d, .w = {w, vocab, d}, .dw = {dw, vocab, d}};
    char why[512] = "", shape[64];
    unsigned grid = gc_warp_grid(g, (size_t)n);
    int nn = n, dd = d, vv = vocab, used = n, ok;
    double ms;

    snprintf(shape, sizeof(shape), "%s n=%d vocab=%d d=%d", name, n, vocab, d);
    if (k.rc == 0) {
        gc_fill(g, w, table, -1.0f, 1.0f);
        gc_fill(g, dy, nd, -1.0f, 1.0f);
        embed_tokens(g, tokens, n, vocab);
        used = distinct_tokens(tokens, n, vocab);
        if (wk_embed_forward(&e, tokens, y, n) < 0)
            ck_fail(&k, "wk_embed_forward rejected the tokens");
    }
    wk_cuda_ptr d_w = ck_dev(&k, table * 4, w), d_t = ck_dev(&k, (size_t)n * 4, tokens);
    wk_cuda_ptr d_y = ck_dev(&k, nd * 4, NULL);
    {
        void *args[] = {&d_w, &d_t, &nn, &dd, &vv, &d_y};
        ms = ck_launch(&k, tf.embed_fwd, grid, 0, args, 1);
        ck_download(&k, y_d, d_y, nd * 4);
        ok = k.rc == 0 && ck_compare(&k, "y", y_d, y, nd, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, tf.embed_fwd, grid, args, ms);
        ck_finish(&k, "embed_fwd", shape, ok, why, ms, gc_gbs(2.0 * (double)nd * 4, ms));
    }
    /* backward into a random dW (it accumulates): the table itself */
    if (k.rc == 0) {
        memcpy(dw, w, table * 4);
        if (wk_embed_backward(&e, tokens, dy, n) < 0)
            ck_fail(&k, "wk_embed_backward rejected the tokens");
    }
    wk_cuda_ptr d_dy = ck_dev(&k, nd * 4, dy), d_chain = chain_scratch(&k, n);
    {
        void *args[] = {&d_t, &d_dy, &nn, &dd, &vv, &d_chain, &d_w};
        ms = ck_launch(&k, tf.embed_bwd, grid, 0, args, 1);
        ck_download(&k, dw_d, d_w, table * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "dw", dw_d, dw, table, 4, 1, why, sizeof(why));
        /* relaunches keep adding into d_w: only their time is kept */
        ms = ck_retime(&k, ok, tf.embed_bwd, grid, args, ms);
        snprintf(shape, sizeof(shape), "%s n=%d (%d ids) d=%d", name, n, used, d);
        ck_finish(&k, "embed_bwd", shape, ok, why, ms,
                  gc_gbs(((double)nd + 2.0 * used * d) * 4, ms));
    }
    ck_done(&k);
}

static int same_bits(float a, float b)
{
    uint32_t x, y;

    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y;
}

/* Tokens outside [0, vocab): the forward writes NaN rows for them (the CPU
 * refuses the batch), the backward skips them: dW is the reference's over
 * the valid positions, in their order. d = 6: the 4-byte path. */
static void check_embed_bad_tokens(struct gc *g)
{
    enum { N = 7, VOCAB = 5, D = 6 };
    const int32_t tokens[N] = {3, -1, 3, VOCAB, 0, 3, 1 << 30};
    struct ck k = {.g = g};
    float *w = ck_host(&k, VOCAB * D * 4), *dy = ck_host(&k, N * D * 4);
    float *y_d = ck_host(&k, N * D * 4), *dw = ck_host(&k, VOCAB * D * 4);
    float *dw_d = ck_host(&k, VOCAB * D * 4), *dy_ok = ck_host(&k, N * D * 4);
    int32_t *t_ok = ck_host(&k, N * 4);
    struct wk_embed e = {.vocab = VOCAB, .d = D, .w = {w, VOCAB, D}, .dw = {dw, VOCAB, D}};
    char why[512] = "";
    int nn = N, dd = D, vv = VOCAB, valid = 0, ok = 0;

    if (k.rc == 0) {
        gc_fill(g, w, VOCAB * D, -1.0f, 1.0f);
        gc_fill(g, dy, N * D, -1.0f, 1.0f);
        memcpy(dw, w, VOCAB * D * 4);
        for (int i = 0; i < N; i++) {
            if (tokens[i] < 0 || tokens[i] >= VOCAB)
                continue;
            t_ok[valid] = tokens[i];
            memcpy(dy_ok + (size_t)valid * D, dy + (size_t)i * D, D * 4);
            valid++;
        }
        if (wk_embed_backward(&e, t_ok, dy_ok, valid) < 0)
            ck_fail(&k, "wk_embed_backward rejected the valid tokens");
    }
    wk_cuda_ptr d_w = ck_dev(&k, VOCAB * D * 4, w), d_t = ck_dev(&k, N * 4, tokens);
    wk_cuda_ptr d_y = ck_dev(&k, N * D * 4, NULL), d_dy = ck_dev(&k, N * D * 4, dy);
    wk_cuda_ptr d_chain = chain_scratch(&k, N);
    {
        void *fwd[] = {&d_w, &d_t, &nn, &dd, &vv, &d_y};
        void *bwd[] = {&d_t, &d_dy, &nn, &dd, &vv, &d_chain, &d_w};
        ck_launch(&k, tf.embed_fwd, 1, 0, fwd, 1);
        ck_download(&k, y_d, d_y, N * D * 4);
        ck_launch(&k, tf.embed_bwd, 1, 0, bwd, 1);
        ck_download(&k, dw_d, d_w, VOCAB * D * 4);
    }
    if (k.rc == 0) {
        size_t wrong = 0;

        for (int i = 0; i < N; i++) {
            const int bad = tokens[i] < 0 || tokens[i] >= VOCAB;

            for (int j = 0; j < D; j++) {
                const float got = y_d[i * D + j];
                if (bad ? !isnan(got) : !same_bits(got, w[tokens[i] * D + j]))
                    wrong++;
            }
        }
        if (wrong)
            snprintf(why, sizeof(why), "y %zu/%d not the row (or NaN for a bad token)", wrong,
                     N * D);
        k.bad += wrong;
        ok = !wrong;
        ok &= ck_compare(&k, "dw", dw_d, dw, VOCAB * D, 4, 1, why, sizeof(why));
    }
    ck_finish(&k, "embed bad ids", "n=7 (3 out of range) vocab=5 d=6", ok, why, -1.0, -1.0);
    ck_done(&k);
}

/* --- AdamW ----------------------------------------------------------------- */

/* offset: elements the device pointers are moved by (1: 4-byte aligned
 * only, the kernel's 4-byte path) */
static void check_adamw(struct gc *g, size_t count, int64_t step, int decay, size_t offset,
                        const char *name)
{
    struct ck k = {.g = g};
    const size_t all = count + offset, bytes = all * 4;
    float *w = ck_host(&k, bytes), *gr = ck_host(&k, bytes), *m = ck_host(&k, bytes);
    float *v = ck_host(&k, bytes), *w_d = ck_host(&k, bytes), *m_d = ck_host(&k, bytes);
    float *v_d = ck_host(&k, bytes);
    struct wk_adamw_config cfg;
    struct wk_adamw_coeffs co = {0};
    char why[512] = "", shape[64];
    long long cnt = (long long)count;
    unsigned grid = gc_elem_grid(g, (count + 3) / 4);
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s n=%zu t=%lld%s%s", name, count, (long long)step,
             decay ? " decay" : "", offset ? " unaligned" : "");
    wk_adamw_config_defaults(&cfg);
    cfg.lr = 1e-3f;
    if (k.rc == 0 && wk_adamw_coeffs(&cfg, step, decay, &co) < 0)
        ck_fail(&k, "wk_adamw_coeffs rejected the step");
    if (k.rc == 0) {
        gc_fill(g, w, all, -1.0f, 1.0f);
        gc_fill(g, gr, all, -0.01f, 0.01f);
        if (step == 1) {
            memset(m, 0, bytes);
            memset(v, 0, bytes);
        } else {
            gc_fill(g, m, all, -0.01f, 0.01f);
            gc_fill(g, v, all, 0.0f, 1e-4f);
        }
        /* gradients that are 0, tiny (g^2 underflows: subnormal v) or
         * large, and moments that are subnormal */
        for (size_t i = 0; i < all; i += 97) {
            uint64_t r = gc_u64(g);
            gr[i] = (r & 3) == 0 ? 0.0f : (r & 3) == 1 ? 3e-23f : (r & 3) == 2 ? 1e3f : -2e-20f;
            if (step > 1 && (r & 4))
                v[i] = 1e-40f;
        }
    }
    wk_cuda_ptr d_w = ck_dev(&k, bytes, w), d_g = ck_dev(&k, bytes, gr);
    wk_cuda_ptr d_m = ck_dev(&k, bytes, m), d_v = ck_dev(&k, bytes, v);
    /* the host arrays become the reference (the device has the inputs) */
    if (k.rc == 0)
        wk_adamw_update(&co, w + offset, gr + offset, m + offset, v + offset, count);
    {
        wk_cuda_ptr pw = d_w + offset * 4, pg = d_g + offset * 4, pm = d_m + offset * 4;
        wk_cuda_ptr pv = d_v + offset * 4;
        void *args[] = {&pw,       &pg,       &pm,     &pv,     &cnt,    &co.lr,
                        &co.beta1, &co.beta2, &co.eps, &co.bc1, &co.bc2, &co.decay};
        ms = ck_launch(&k, tf.adamw, grid, 0, args, 1);
        ck_download(&k, w_d, d_w, bytes);
        ck_download(&k, m_d, d_m, bytes);
        ck_download(&k, v_d, d_v, bytes);
        ok = k.rc == 0;
        if (ok) {
            ok = ck_compare(&k, "w", w_d, w, all, 4, 1, why, sizeof(why));
            ok &= ck_compare(&k, "m", m_d, m, all, 4, 1, why, sizeof(why));
            ok &= ck_compare(&k, "v", v_d, v, all, 4, 1, why, sizeof(why));
        }
        /* relaunches step the state on: only their time is kept */
        ms = ck_retime(&k, ok, tf.adamw, grid, args, ms);
        ck_finish(&k, "adamw", shape, ok, why, ms, gc_gbs(28.0 * (double)count, ms));
    }
    ck_done(&k);
}

/* --- elementwise add and scale ------------------------------------------------ */

/* model.c's residual add (static there): y = a + b */
static void add_ref(float *y, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

/* wk_model_scale_grad's loop: g *= scale */
static void scale_ref(float *x, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] *= scale;
}

static void check_add_scale(struct gc *g, size_t count, const char *name)
{
    struct ck k = {.g = g};
    const size_t bytes = count * 4;
    float *a = ck_host(&k, bytes), *b = ck_host(&k, bytes), *y = ck_host(&k, bytes);
    float *y_d = ck_host(&k, bytes);
    /* worker/rank/rank.c's gradient scale at dp = 2, M = 8, ep = 3 */
    float s = 1.0f / (float)((double)2 * 8 * 3);
    char why[512] = "", shape[64];
    long long cnt = (long long)count;
    unsigned grid = gc_elem_grid(g, (count + 3) / 4);
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s n=%zu", name, count);
    if (k.rc == 0) {
        gc_fill(g, a, count, -4.0f, 4.0f);
        gc_fill(g, b, count, -4.0f, 4.0f);
        add_ref(y, a, b, count);
    }
    wk_cuda_ptr d_a = ck_dev(&k, bytes, a), d_b = ck_dev(&k, bytes, b);
    wk_cuda_ptr d_y = ck_dev(&k, bytes, NULL);
    {
        void *args[] = {&d_a, &d_b, &cnt, &d_y};
        ms = ck_launch(&k, tf.add, grid, 0, args, 1);
        ck_download(&k, y_d, d_y, bytes);
        ok = k.rc == 0 && ck_compare(&k, "out", y_d, y, count, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, tf.add, grid, args, ms);
        ck_finish(&k, "add (residual)", shape, ok, why, ms, gc_gbs(3.0 * (double)bytes, ms));
    }
    /* the gradient sum a += b in place, a moved by one element: the 4-byte
     * path (worker/rank/rank.c's fa += fb) */
    {
        wk_cuda_ptr pa = d_a + 4, pb = d_b + 4;
        long long c1 = cnt - 1;
        void *args[] = {&pa, &pb, &c1, &pa};
        char s1[64];

        ms = ck_launch(&k, tf.add, grid, 0, args, 1);
        ck_download(&k, y_d, d_a, bytes);
        y[0] = a[0];
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "a", y_d, y, count, 4, 1, why, sizeof(why));
        snprintf(s1, sizeof(s1), "%s n=%zu unaligned", name, count - 1);
        ck_finish(&k, "add in place", s1, ok, why, ms, gc_gbs(3.0 * (double)(bytes - 4), ms));
    }
    /* scale in place: d_a now holds y */
    if (k.rc == 0)
        scale_ref(y, count, s);
    {
        void *args[] = {&d_a, &cnt, &s, &d_a};
        ms = ck_launch(&k, tf.scale, grid, 0, args, 1);
        ck_download(&k, y_d, d_a, bytes);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "g", y_d, y, count, 4, 1, why, sizeof(why));
        /* time it out of place, idempotent */
        void *args2[] = {&d_b, &cnt, &s, &d_y};
        ms = ck_retime(&k, ok, tf.scale, grid, args2, ms);
        ck_finish(&k, "scale (1/48)", shape, ok, why, ms, gc_gbs(2.0 * (double)bytes, ms));
    }
    ck_done(&k);
}

/* --- MoE: load counts and the routing-bias update ------------------------------ */

static void check_moe_load(struct gc *g, int E)
{
    struct ck k = {.g = g};
    int32_t *count = ck_host(&k, (size_t)E * 4);
    int64_t *load = ck_host(&k, (size_t)E * 8), *load_d = ck_host(&k, (size_t)E * 8);
    char why[512] = "", shape[64];
    int ee = E, ok;
    double ms;

    snprintf(shape, sizeof(shape), "E=%d", E);
    if (k.rc == 0)
        for (int e = 0; e < E; e++) {
            count[e] = (int32_t)(gc_u64(g) % 70000);
            load[e] = (int64_t)(gc_u64(g) >> 24); /* beyond 32 bits */
        }
    wk_cuda_ptr d_c = ck_dev(&k, (size_t)E * 4, count), d_l = ck_dev(&k, (size_t)E * 8, load);
    if (k.rc == 0)
        wk_moe_load_add(load, count, E);
    {
        void *args[] = {&d_c, &ee, &d_l};
        ms = ck_launch(&k, tf.load_add, gc_elem_grid(g, (size_t)E), 0, args, 1);
        ck_download(&k, load_d, d_l, (size_t)E * 8);
        ok = k.rc == 0 && ck_compare(&k, "load (int64 halves)", load_d, load, 2 * (size_t)E, 4, 0,
                                     why, sizeof(why));
        ck_finish(&k, "moe_load_add", shape, ok, why, ms, -1.0);
    }
    ck_done(&k);
}

/* loads around their mean, some equal to it when it is an integer (no
 * change: the sign rule's third case) */
static void check_moe_bias(struct gc *g, int E, int integer_mean)
{
    struct ck k = {.g = g};
    int64_t *load = ck_host(&k, (size_t)E * 8);
    float *bias = ck_host(&k, (size_t)E * 4), *bias_d = ck_host(&k, (size_t)E * 4);
    float gamma = WK_MOE_BIAS_GAMMA;
    char why[512] = "", shape[64];
    int ee = E, ok;
    double ms;

    snprintf(shape, sizeof(shape), "E=%d %s", E, integer_mean ? "mean = some loads" : "random");
    if (k.rc == 0) {
        for (int e = 0; e < E; e++)
            load[e] = integer_mean ? 1000 : (int64_t)(gc_u64(g) % 5000);
        /* pairs +x / -x keep the mean at 1000 */
        for (int e = 0; integer_mean && e + 1 < E; e += 4) {
            int64_t x = (int64_t)(gc_u64(g) % 900);
            load[e] += x;
            load[e + 1] -= x;
        }
        gc_fill(g, bias, (size_t)E, -0.05f, 0.05f);
    }
    wk_cuda_ptr d_l = ck_dev(&k, (size_t)E * 8, load), d_b = ck_dev(&k, (size_t)E * 4, bias);
    if (k.rc == 0 && wk_moe_bias_step(bias, load, E, gamma) < 0)
        ck_fail(&k, "wk_moe_bias_step rejected the loads");
    {
        void *args[] = {&d_l, &ee, &gamma, &d_b};
        ms = ck_launch(&k, tf.bias_update, 1, 0, args, 1);
        ck_download(&k, bias_d, d_b, (size_t)E * 4);
        ok = k.rc == 0 && ck_compare(&k, "bias", bias_d, bias, (size_t)E, 4, 1, why, sizeof(why));
        ck_finish(&k, "moe_bias_update", shape, ok, why, ms, -1.0);
    }
    ck_done(&k);
}

static int setup(struct gc *g)
{
    wk_cuda_module train;
    static const char *const names[] = {
        "dx_embed_fwd", "dx_embed_bwd",    "dx_adamw",          "dx_add",
        "dx_scale",     "dx_moe_load_add", "dx_moe_bias_update"};
    wk_cuda_function_t *const fns[] = {&tf.embed_fwd, &tf.embed_bwd, &tf.adamw,      &tf.add,
                                       &tf.scale,     &tf.load_add,  &tf.bias_update};

    if (GC_MODULE(g, train, &train) < 0)
        return -EIO;
    return gc_functions(g, train, names, fns, (int)(sizeof(names) / sizeof(names[0])));
}

void gc_check_train_kernels(struct gc *g)
{
    if (setup(g) < 0) {
        gc_add_row(g, "train kernels", "-", "FAIL (module)", -1.0, -1.0);
        g->failed++;
        return;
    }
    printf("  checking the training kernels\n");
    fflush(stdout);
    check_embed(g, 37, 11, 130, "small");
    check_embed(g, 300, 50, 256, "repeats");
    check_embed_bad_tokens(g);
    check_adamw(g, 1000003, 1, 1, 0, "small");
    check_adamw(g, 100001, 1000, 0, 1, "small");
    check_add_scale(g, g->small ? 1000003 : 16777219, g->small ? "small" : "16M");
    check_moe_load(g, 256);
    check_moe_bias(g, 256, 0);
    check_moe_bias(g, 64, 1);
    if (!g->small) {
        check_embed(g, 4096, 8192, 7168, "V3");
        check_adamw(g, (size_t)64 << 20, 1000, 1, 0, "64M");
    }
}
