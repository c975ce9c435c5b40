/* test_dmodel_fake.c - worker/cuda/model/dmodel.c, a model on the GPU, trained side by
 * side with the same model on the CPU (worker/model/model.c), on
 * libfakecuda.so: the whole model (embedding, 2 layers of attention and MoE,
 * the head) for 4 steps of 2 micro-batches each with AdamW and the routing
 * bias update: every step's loss within 1e-6 relative, and every parameter
 * and AdamW moment (m and v) downloaded afterwards within 5e-4 of its
 * tensor's rms, every routing bias equal; the same with bf16
 * GEMM inputs within bf16's rounding; then a two-stage
 * split (no head / no embedding) passing activations and gradients between
 * the twins gives the whole model's loss. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/fakestack.h"
#include "worker/cuda/model/dmodel.h"
#include "worker/model/model.h"

enum { BATCH = 2, SEQ = 8, STEPS = 4, MB = 2 };

static const struct wk_model_config cfg = {
    .vocab = 40,
    .d_model = 16,
    .layers = 2,
    .heads = 2,
    .experts = 8,
    .top_k = 2,
    .expert_hidden = 12,
    .shared_experts = 1,
    .seq_len = SEQ,
    .expert_groups = 4,
    .group_limit = 2,
};

static void model(struct wk_model *m, int first, int last, int flags)
{
    struct wk_adamw_config oc;

    wk_adamw_config_defaults(&oc);
    oc.lr = 1e-2f; /* large steps: differences would grow */
    cr_assert_eq(wk_model_stage_init(m, &cfg, 1234, first, last, flags), 0);
    cr_assert_eq(wk_model_optim_init(m, &oc), 0);
}

/* micro-batch mb of step s: BATCH sequences of SEQ + 1 tokens */
static void tokens(int step, int mb, int32_t *t)
{
    uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)(step * 7 + mb + 1);

    for (int i = 0; i < BATCH * (SEQ + 1); i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        t[i] = (int32_t)(x % (uint64_t)cfg.vocab);
    }
}

static double rel(double got, double want, double floor_)
{
    return fabs(got - want) / fmax(fabs(want), floor_);
}

/* Every element within bound of want, relative to the larger of itself and
 * the tensor's rms; returns the largest such difference. */
static double expect_tensor(const float *got, const float *want, size_t n, double bound,
                            const char *what)
{
    double ss = 0.0, rms, worst = 0.0;

    for (size_t i = 0; i < n; i++)
        ss += (double)want[i] * want[i];
    rms = fmax(sqrt(ss / (double)n), 1e-30);
    for (size_t i = 0; i < n; i++) {
        cr_assert(rel(got[i], want[i], rms) <= bound, "%s[%zu] = %.9g, want %.9g", what, i,
                  (double)got[i], (double)want[i]);
        worst = fmax(worst, rel(got[i], want[i], rms));
    }
    return worst;
}

/* STEPS steps of MB micro-batches on the CPU and on the device twin (GEMMs
 * in dtype); every loss within loss_bound relative; returns the largest
 * relative loss difference. Parameters within param_bound and AdamW's
 * moments (m, v) within moment_bound (0: not compared). */
static double train_side_by_side(enum wk_cublas_dtype dtype, double loss_bound, double param_bound,
                                 double moment_bound)
{
    double worst = 0.0, worst_w = 0.0, worst_m = 0.0, worst_v = 0.0;
    struct fakestack_gpu f;
    struct wk_model cpu, gpu;
    struct wk_model_cache cc[MB];
    wk_dmodel_t *dm = NULL;
    wk_dmodel_cache_t *dc[MB];
    int32_t t[BATCH * (SEQ + 1)];
    char err[512];

    fakestack_gpu_open(&f);
    wk_gpu_set_gemm_dtype(f.g, dtype);
    model(&cpu, 0, cfg.layers, WK_MODEL_WHOLE);
    model(&gpu, 0, cfg.layers, WK_MODEL_WHOLE);
    cr_assert_eq(wk_dmodel_create(f.g, &gpu, &dm, err, sizeof(err)), 0, "%s", err);
    for (int i = 0; i < MB; i++) {
        cr_assert_eq(wk_model_cache_init(&cc[i], &cpu, BATCH, SEQ), 0);
        cr_assert_eq(wk_dmodel_cache_create(dm, BATCH, SEQ, &dc[i]), 0, "%s", wk_dmodel_error(dm));
    }
    for (int s = 0; s < STEPS; s++) {
        wk_model_zero_grad(&cpu);
        cr_assert_eq(wk_dmodel_zero_grad(dm), 0);
        /* both micro-batches' forwards, then both backwards (as a pipeline would) */
        for (int i = 0; i < MB; i++) {
            float lc = 0.0f, lg = 0.0f;

            tokens(s, i, t);
            cr_assert_eq(wk_model_forward(&cpu, &cc[i], t, NULL, NULL, &lc), 0);
            cr_assert_eq(wk_dmodel_forward(dm, dc[i], t, 0, 0, &lg), 0, "%s", wk_dmodel_error(dm));
            cr_assert(rel(lg, lc, 1e-30) <= loss_bound,
                      "step %d micro-batch %d: loss %.9g, want %.9g", s, i, (double)lg, (double)lc);
            if (rel(lg, lc, 1e-30) > worst)
                worst = rel(lg, lc, 1e-30);
        }
        for (int i = MB - 1; i >= 0; i--) {
            cr_assert_eq(wk_model_backward(&cpu, &cc[i], NULL, NULL), 0);
            cr_assert_eq(wk_dmodel_backward_input(dm, dc[i], 0, 0), 0, "%s", wk_dmodel_error(dm));
            cr_assert_eq(wk_dmodel_backward_weight(dm, dc[i]), 0, "%s", wk_dmodel_error(dm));
        }
        wk_model_scale_grad(&cpu, 1.0f / MB);
        cr_assert_eq(wk_dmodel_scale_grad(dm, 1.0f / MB), 0);
        cr_assert_eq(wk_model_step(&cpu), 0);
        cr_assert_eq(wk_dmodel_step(dm), 0, "%s", wk_dmodel_error(dm));
    }
    cr_assert_eq(wk_dmodel_download(dm), 0, "%s", wk_dmodel_error(dm));
    for (int i = 0; i < cpu.nparams; i++) {
        const struct wk_model_param *a = wk_model_param(&cpu, i), *b = wk_model_param(&gpu, i);

        cr_assert_str_eq(a->name, b->name);
        /* Adam normalises each update: after 4 steps of lr 1e-2 a rounding
         * difference in a near-zero gradient moves a weight by up to ~lr */
        if (param_bound > 0.0) /* bf16: Adam's normalised steps amplify roundings */
            worst_w = fmax(worst_w, expect_tensor(b->w, a->w, a->n, param_bound, a->name));
        if (moment_bound > 0.0) {
            char what[160];

            cr_assert_eq(gpu.opt.p[i].n, cpu.opt.p[i].n);
            snprintf(what, sizeof(what), "%s's first moment", a->name);
            worst_m = fmax(worst_m,
                           expect_tensor(gpu.opt.p[i].m, cpu.opt.p[i].m, a->n, moment_bound, what));
            snprintf(what, sizeof(what), "%s's second moment", a->name);
            worst_v = fmax(worst_v,
                           expect_tensor(gpu.opt.p[i].v, cpu.opt.p[i].v, a->n, moment_bound, what));
        }
        cr_assert_eq(gpu.opt.p[i].step, cpu.opt.p[i].step);
    }
    cr_log_info("%s: losses within %.3g, weights %.3g, first moments %.3g, second moments %.3g",
                dtype == WK_CUBLAS_F32 ? "fp32" : "bf16", worst, worst_w, worst_m, worst_v);
    for (int l = 0; l < cfg.layers && dtype == WK_CUBLAS_F32; l++) /* bf16: loads may differ */
        cr_assert_arr_eq(gpu.layer[l].moe.bias, cpu.layer[l].moe.bias, cfg.experts * sizeof(float),
                         "layer %d's routing bias", l);
    for (int i = 0; i < MB; i++) {
        wk_model_cache_free(&cc[i], &cpu);
        wk_dmodel_cache_destroy(dm, dc[i]);
    }
    wk_dmodel_destroy(dm);
    wk_model_free(&cpu);
    wk_model_free(&gpu);
    fakestack_gpu_close(&f);
    return worst;
}

Test(dmodel_fake, trains_like_the_cpu_model, .timeout = 120)
{
    /* measured (--verbose prints them): losses within 6.4e-8, weights
     * 4.6e-5, first moments 2.7e-5, second moments 3.3e-5 (relative to
     * each tensor's rms); the bounds are about 10x those */
    train_side_by_side(WK_CUBLAS_F32, 1e-6, 5e-4, 5e-4);
}

/* bf16 GEMM inputs (attention projections and experts): the same training
 * within bf16's rounding (8 bits: ~4e-3 per operand), and visibly not fp32 */
Test(dmodel_fake, trains_in_bf16_within_its_rounding, .timeout = 120)
{
    double worst = train_side_by_side(WK_CUBLAS_BF16, 2e-2, 0.0, 0.0);

    cr_assert_gt(worst, 1e-6, "bf16 losses are as close as fp32's: the GEMMs did not round");
}

/* Stage 0 (embedding + layer 0) and stage 1 (layer 1 + head) as two twins,
 * the activation and its gradient passed between them on the device. */
Test(dmodel_fake, two_stages_give_the_whole_models_loss_and_gradients)
{
    struct fakestack_gpu f;
    struct wk_model whole, s0, s1;
    struct wk_model_cache cw;
    wk_dmodel_t *d0 = NULL, *d1 = NULL;
    wk_dmodel_cache_t *c0, *c1;
    wk_cuda_ptr act, grad;
    int32_t t[BATCH * (SEQ + 1)];
    float lw = 0.0f, l1 = 0.0f;
    char err[512];

    fakestack_gpu_open(&f);
    model(&whole, 0, cfg.layers, WK_MODEL_WHOLE);
    model(&s0, 0, 1, WK_MODEL_HAS_EMBED);
    model(&s1, 1, cfg.layers, WK_MODEL_HAS_HEAD);
    cr_assert_eq(wk_dmodel_create(f.g, &s0, &d0, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_dmodel_create(f.g, &s1, &d1, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_model_cache_init(&cw, &whole, BATCH, SEQ), 0);
    cr_assert_eq(wk_dmodel_cache_create(d0, BATCH, SEQ, &c0), 0);
    cr_assert_eq(wk_dmodel_cache_create(d1, BATCH, SEQ, &c1), 0);
    cr_assert_eq(wk_cuda_alloc(f.c, (size_t)BATCH * SEQ * cfg.d_model * 4, &act), 0);
    cr_assert_eq(wk_cuda_alloc(f.c, (size_t)BATCH * SEQ * cfg.d_model * 4, &grad), 0);
    tokens(0, 0, t);
    wk_model_zero_grad(&whole);
    cr_assert_eq(wk_model_forward(&whole, &cw, t, NULL, NULL, &lw), 0);
    cr_assert_eq(wk_model_backward(&whole, &cw, NULL, NULL), 0);
    cr_assert_eq(wk_dmodel_forward(d0, c0, t, 0, act, NULL), 0, "%s", wk_dmodel_error(d0));
    cr_assert_eq(wk_dmodel_forward(d1, c1, t, act, 0, &l1), 0, "%s", wk_dmodel_error(d1));
    cr_assert(rel(l1, lw, 1e-30) <= 1e-5, "loss %.9g, want %.9g", (double)l1, (double)lw);
    cr_assert_eq(wk_dmodel_backward_input(d1, c1, 0, grad), 0, "%s", wk_dmodel_error(d1));
    cr_assert_eq(wk_dmodel_backward_weight(d1, c1), 0);
    cr_assert_eq(wk_dmodel_backward_input(d0, c0, grad, 0), 0, "%s", wk_dmodel_error(d0));
    cr_assert_eq(wk_dmodel_backward_weight(d0, c0), 0);
    cr_assert_eq(wk_dmodel_download(d0), 0);
    cr_assert_eq(wk_dmodel_download(d1), 0);
    /* every stage tensor's gradient is the whole model's tensor of that name */
    for (int k = 0; k < 2; k++) {
        const struct wk_model *st = k ? &s1 : &s0;

        for (int i = 0; i < st->nparams; i++) {
            const struct wk_model_param *p = wk_model_param(st, i);
            int found = 0;

            for (int j = 0; j < whole.nparams && !found; j++) {
                const struct wk_model_param *q = wk_model_param(&whole, j);

                if (strcmp(p->name, q->name) == 0) {
                    expect_tensor(p->g, q->g, p->n, 1e-4, p->name);
                    found = 1;
                }
            }
            cr_assert(found, "%s is not in the whole model", p->name);
        }
    }
    wk_cuda_free(f.c, act);
    wk_cuda_free(f.c, grad);
    wk_dmodel_cache_destroy(d0, c0);
    wk_dmodel_cache_destroy(d1, c1);
    wk_dmodel_destroy(d0);
    wk_dmodel_destroy(d1);
    wk_model_cache_free(&cw, &whole);
    wk_model_free(&whole);
    wk_model_free(&s0);
    wk_model_free(&s1);
    fakestack_gpu_close(&f);
}
