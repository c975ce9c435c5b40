/* test_dmoe_fake.c - worker/dmoe.c, the MoE layer on the GPU, against the
 * worker's CPU layer (worker/model/moe.c) on libfakecuda.so: the routing
 * (the same experts for every token, the same loads), the output, the input
 * gradient and every weight gradient, with one shared expert and with two,
 * to a relative bound of 1e-5 of max(|want|, rms(want)) (the GEMMs sum in
 * another order than OpenBLAS). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/fakestack.h"
#include "worker/dmoe.h"
#include "worker/model/moe.h"

#define BOUND 1e-5

struct fx {
    wk_cuda_t *c;
    wk_gpu_t *g;
    wk_cuda_stream s;
    wk_cuda_ptr bufs[64];
    int nbufs;
};

static void fx_open(struct fx *f)
{
    struct wk_cuda_paths paths = {
        .cuda = fakestack_path(), .nccl = fakestack_path(), .cublaslt = fakestack_path()};
    char err[512];

    memset(f, 0, sizeof(*f));
    if (!wk_gpu_have_kernels())
        cr_skip_test("built without nvcc: no kernels");
    cr_assert_eq(wk_cuda_open(&paths, &f->c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_gpu_create(f->c, 0, 1 << 20, &f->g, err, sizeof(err)), 0, "%s", err);
    f->s = wk_gpu_compute_stream(f->g);
}

static wk_cuda_ptr dbuf(struct fx *f, const void *src, size_t bytes)
{
    wk_cuda_ptr p = 0;

    cr_assert_lt(f->nbufs, 64);
    cr_assert_eq(wk_cuda_alloc(f->c, bytes, &p), 0);
    if (src)
        cr_assert_eq(wk_cuda_upload(f->c, p, src, bytes), 0);
    else
        cr_assert_eq(wk_cuda_memset(f->c, p, 0xff, bytes), 0);
    f->bufs[f->nbufs++] = p;
    return p;
}

static void *fetch(struct fx *f, wk_cuda_ptr p, size_t bytes)
{
    void *h = malloc(bytes);

    cr_assert_eq(wk_cuda_stream_sync(f->c, f->s), 0, "%s", wk_gpu_error(f->g));
    cr_assert_eq(wk_cuda_download(f->c, h, p, bytes), 0);
    return h;
}

static void randn(float *v, size_t n, uint64_t seed, float scale)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = ((float)((double)(seed >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f) * scale;
    }
}

static void expect_close(float *got, const float *want, size_t n, const char *what)
{
    double ss = 0.0, rms;

    for (size_t i = 0; i < n; i++)
        ss += (double)want[i] * want[i];
    rms = sqrt(ss / (double)n);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / fmax(fabs((double)want[i]), rms);

        cr_assert(e <= BOUND, "%s[%zu] = %.9g, want %.9g (rel %.3g)", what, i, (double)got[i],
                  (double)want[i], e);
    }
    free(got);
}

static void moe_parity(int shared)
{
    enum { N = 24, D = 16, E = 8, K = 2, H = 12 };
    struct wk_moe_config cfg;
    struct wk_moe m;
    struct wk_moe_ctx c;
    struct fx f;
    wk_dmoe_buf_t *b = NULL;
    struct wk_dmoe_w w, gr;
    float x[N * D], dout[N * D], out[N * D], dx[N * D];
    int64_t load[E] = {0}, zero[E] = {0};
    wk_cuda_ptr xd, outd, doutd, dxd, loadd;
    const size_t es = (size_t)E * H * D * sizeof(float), ss = (size_t)shared * H * D * 4;
    int32_t *ids;
    int64_t *dload;

    fx_open(&f);
    wk_moe_config_defaults(&cfg);
    cfg.d_model = D;
    cfg.experts = E;
    cfg.top_k = K;
    cfg.expert_hidden = H;
    cfg.shared_experts = shared;
    cfg.expert_groups = 4;
    cfg.group_limit = 2;
    cfg.init_std = 0.3f; /* scores far apart: no near-ties for the routing to break */
    cr_assert_eq(wk_moe_init(&m, &cfg, 42, 7), 0);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, N), 0);
    randn(m.bias, E, 3, 0.05f);
    randn(x, N * D, 1, 1.0f);
    randn(dout, N * D, 2, 1.0f);
    w = (struct wk_dmoe_w){dbuf(&f, m.router, E * D * 4),
                           dbuf(&f, m.bias, E * 4),
                           dbuf(&f, m.w1, es),
                           dbuf(&f, m.w3, es),
                           dbuf(&f, m.w2, es),
                           shared ? dbuf(&f, m.sw1, ss) : 0,
                           shared ? dbuf(&f, m.sw3, ss) : 0,
                           shared ? dbuf(&f, m.sw2, ss) : 0};
    gr = (struct wk_dmoe_w){dbuf(&f, m.g_router, E * D * 4),
                            0,
                            dbuf(&f, m.g_w1, es),
                            dbuf(&f, m.g_w3, es),
                            dbuf(&f, m.g_w2, es),
                            shared ? dbuf(&f, m.g_sw1, ss) : 0,
                            shared ? dbuf(&f, m.g_sw3, ss) : 0,
                            shared ? dbuf(&f, m.g_sw2, ss) : 0};
    xd = dbuf(&f, x, sizeof(x));
    doutd = dbuf(&f, dout, sizeof(dout));
    outd = dbuf(&f, NULL, sizeof(out));
    dxd = dbuf(&f, NULL, sizeof(dx));
    loadd = dbuf(&f, zero, sizeof(zero));
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

    ids = fetch(&f, wk_dmoe_buf_ids(b), N * K * sizeof(int32_t));
    cr_assert_arr_eq(ids, c.choice, N * K * sizeof(int32_t), "the routing differs");
    free(ids);
    cr_assert_arr_eq(wk_dmoe_buf_offsets(b), c.plan.offset, (E + 1) * sizeof(int));
    dload = fetch(&f, loadd, sizeof(load));
    cr_assert_arr_eq(dload, load, sizeof(load));
    free(dload);
    expect_close(fetch(&f, outd, sizeof(out)), out, N * D, "out");
    expect_close(fetch(&f, dxd, sizeof(dx)), dx, N * D, "dx");
    expect_close(fetch(&f, gr.router, E * D * 4), m.g_router, E * D, "g_router");
    expect_close(fetch(&f, gr.w1, es), m.g_w1, es / 4, "g_w1");
    expect_close(fetch(&f, gr.w3, es), m.g_w3, es / 4, "g_w3");
    expect_close(fetch(&f, gr.w2, es), m.g_w2, es / 4, "g_w2");
    if (shared) {
        expect_close(fetch(&f, gr.sw1, ss), m.g_sw1, ss / 4, "g_sw1");
        expect_close(fetch(&f, gr.sw3, ss), m.g_sw3, ss / 4, "g_sw3");
        expect_close(fetch(&f, gr.sw2, ss), m.g_sw2, ss / 4, "g_sw2");
    }
    wk_dmoe_buf_destroy(f.g, b);
    for (int i = 0; i < f.nbufs; i++)
        wk_cuda_free(f.c, f.bufs[i]);
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
    wk_gpu_destroy(f.g);
    wk_cuda_close(f.c);
}

Test(dmoe_fake, one_shared_expert)
{
    moe_parity(1);
}

Test(dmoe_fake, two_shared_experts)
{
    moe_parity(2);
}

Test(dmoe_fake, no_shared_expert)
{
    moe_parity(0);
}
