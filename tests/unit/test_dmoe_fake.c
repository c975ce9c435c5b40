/* test_dmoe_fake.c - worker/cuda/model/dmoe.c, the MoE layer on the GPU, against the
 * worker's CPU layer (worker/model/moe.c) on libfakecuda.so: the routing
 * (the same experts for every token, the same loads), the output, the input
 * gradient and every weight gradient, with one shared expert and with two,
 * to a relative bound of 1e-5 of max(|want|, rms(want)) (the GEMMs sum in
 * another order than OpenBLAS); and with the fp8 dispatch (the experts see
 * the rows as the e4m3 records carry them, on both sides). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/fakestack.h"
#include "worker/cuda/model/dmoe.h"
#include "worker/model/moe.h"

#define BOUND 1e-5

/* The largest |a - b| over n. */
static float max_diff(const float *a, const float *b, size_t n)
{
    float m = 0.0f;

    for (size_t i = 0; i < n; i++)
        m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}

static void moe_parity(int shared, int fp8)
{
    enum { N = 24, D = 16, E = 8, K = 2, H = 12 };
    struct wk_moe_config cfg;
    struct wk_moe m;
    struct wk_moe_ctx c;
    struct fakestack_gpu f;
    wk_dmoe_buf_t *b = NULL;
    struct wk_dmoe_w w, gr;
    float x[N * D], dout[N * D], out[N * D], dx[N * D];
    int64_t load[E] = {0}, zero[E] = {0};
    wk_cuda_ptr xd, outd, doutd, dxd, loadd;
    const size_t es = (size_t)E * H * D * sizeof(float), ss = (size_t)shared * H * D * 4;
    int32_t *ids;
    int64_t *dload;

    fakestack_gpu_open(&f);
    wk_moe_config_defaults(&cfg);
    cfg.d_model = D;
    cfg.experts = E;
    cfg.top_k = K;
    cfg.expert_hidden = H;
    cfg.shared_experts = shared;
    cfg.expert_groups = 4;
    cfg.group_limit = 2;
    cfg.init_std = 0.3f; /* scores far apart: no near-ties for the routing to break */
    cfg.fp8_dispatch = fp8;
    cr_assert_eq(wk_moe_init(&m, &cfg, 42, 7), 0);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, N), 0);
    fakestack_uniform(m.bias, E, 3, 0.05f);
    fakestack_uniform(x, N * D, 1, 1.0f);
    fakestack_uniform(dout, N * D, 2, 1.0f);
    w = (struct wk_dmoe_w){fakestack_buf(&f, m.router, E * D * 4),
                           fakestack_buf(&f, m.bias, E * 4),
                           fakestack_buf(&f, m.w1, es),
                           fakestack_buf(&f, m.w3, es),
                           fakestack_buf(&f, m.w2, es),
                           shared ? fakestack_buf(&f, m.sw1, ss) : 0,
                           shared ? fakestack_buf(&f, m.sw3, ss) : 0,
                           shared ? fakestack_buf(&f, m.sw2, ss) : 0};
    gr = (struct wk_dmoe_w){fakestack_buf(&f, m.g_router, E * D * 4),
                            0,
                            fakestack_buf(&f, m.g_w1, es),
                            fakestack_buf(&f, m.g_w3, es),
                            fakestack_buf(&f, m.g_w2, es),
                            shared ? fakestack_buf(&f, m.g_sw1, ss) : 0,
                            shared ? fakestack_buf(&f, m.g_sw3, ss) : 0,
                            shared ? fakestack_buf(&f, m.g_sw2, ss) : 0};
    xd = fakestack_buf(&f, x, sizeof(x));
    doutd = fakestack_buf(&f, dout, sizeof(dout));
    outd = fakestack_buf(&f, NULL, sizeof(out));
    dxd = fakestack_buf(&f, NULL, sizeof(dx));
    loadd = fakestack_buf(&f, zero, sizeof(zero));
    cr_assert_eq(wk_dmoe_buf_create(f.g, &cfg, N, &b), 0);

    cr_assert_eq(wk_moe_forward(&m, &c, x, N, out), 0);
    wk_moe_add_load(&m, &c, load);
    cr_assert_eq(wk_moe_backward_input(&m, &c, dout, dx), 0);
    cr_assert_eq(wk_moe_backward_weight(&m, &c), 0);

    cr_assert_eq(wk_dmoe_forward(f.g, f.s, &cfg, &w, b, xd, N, outd, loadd), 0, "%s",
                 wk_gpu_error(f.g));
    cr_assert_eq(wk_dmoe_backward_input(f.g, f.s, &cfg, &w, b, doutd, dxd), 0, "%s",
                 wk_gpu_error(f.g));
    cr_assert_eq(wk_dmoe_backward_weight(f.g, f.s, &cfg, b, &gr), 0, "%s", wk_gpu_error(f.g));

    ids = fakestack_fetch(&f, wk_dmoe_buf_ids(b), N * K * sizeof(int32_t));
    cr_assert_arr_eq(ids, c.choice, N * K * sizeof(int32_t), "the routing differs");
    free(ids);
    cr_assert_arr_eq(wk_dmoe_buf_offsets(b), c.plan.offset, (E + 1) * sizeof(int));
    dload = fakestack_fetch(&f, loadd, sizeof(load));
    cr_assert_arr_eq(dload, load, sizeof(load));
    free(dload);
    fakestack_expect_close(fakestack_fetch(&f, outd, sizeof(out)), out, N * D, BOUND, "out");
    fakestack_expect_close(fakestack_fetch(&f, dxd, sizeof(dx)), dx, N * D, BOUND, "dx");
    fakestack_expect_close(fakestack_fetch(&f, gr.router, E * D * 4), m.g_router, E * D, BOUND,
                           "g_router");
    fakestack_expect_close(fakestack_fetch(&f, gr.w1, es), m.g_w1, es / 4, BOUND, "g_w1");
    fakestack_expect_close(fakestack_fetch(&f, gr.w3, es), m.g_w3, es / 4, BOUND, "g_w3");
    fakestack_expect_close(fakestack_fetch(&f, gr.w2, es), m.g_w2, es / 4, BOUND, "g_w2");
    if (shared) {
        fakestack_expect_close(fakestack_fetch(&f, gr.sw1, ss), m.g_sw1, ss / 4, BOUND, "g_sw1");
        fakestack_expect_close(fakestack_fetch(&f, gr.sw3, ss), m.g_sw3, ss / 4, BOUND, "g_sw3");
        fakestack_expect_close(fakestack_fetch(&f, gr.sw2, ss), m.g_sw2, ss / 4, BOUND, "g_sw2");
    }
    if (fp8) { /* the rounding did something, and no more than e4m3's */
        float plain[N * D], diff;
        struct wk_moe_ctx c32;

        m.cfg.fp8_dispatch = 0;
        cr_assert_eq(wk_moe_ctx_init(&c32, &m.cfg, N), 0);
        cr_assert_eq(wk_moe_forward(&m, &c32, x, N, plain), 0);
        diff = max_diff(plain, out, N * D);
        cr_assert(diff > 0.0f && diff < 0.1f, "fp8 moved the output by %g", (double)diff);
        wk_moe_ctx_free(&c32);
    }
    wk_dmoe_buf_destroy(f.g, b);
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
    fakestack_gpu_close(&f);
}

Test(dmoe_fake, one_shared_expert)
{
    moe_parity(1, 0);
}

Test(dmoe_fake, two_shared_experts)
{
    moe_parity(2, 0);
}

Test(dmoe_fake, no_shared_expert)
{
    moe_parity(0, 0);
}

Test(dmoe_fake, fp8_dispatch_rounds_the_rows_as_the_cpu_layer_does)
{
    moe_parity(1, 1);
}
