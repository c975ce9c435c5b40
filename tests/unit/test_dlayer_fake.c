/* test_dlayer_fake.c - worker/dlayer.c, the model's dense layers on the
 * GPU, against the worker's CPU layers, run on libfakecuda.so (its kernels
 * are the kernels' CPU references, its cuBLASLt computes on the host): each
 * layer's forward and backward (input and weight gradients) on small odd
 * shapes, to a relative bound (|err| <= 1e-5 of max(|want|, rms(want)):
 * the GEMMs sum in another order than OpenBLAS), the embedding bitwise. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/fakestack.h"
#include "worker/dlayer.h"
#include "worker/model/attention.h"
#include "worker/model/embed.h"
#include "worker/model/head.h"
#include "worker/model/rmsnorm.h"

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

static void fx_close(struct fx *f)
{
    for (int i = 0; i < f->nbufs; i++)
        wk_cuda_free(f->c, f->bufs[i]);
    wk_gpu_destroy(f->g);
    wk_cuda_close(f->c);
}

/* a device buffer of bytes, from src or poisoned with NaN bytes */
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

static float *fetch(struct fx *f, wk_cuda_ptr p, size_t n)
{
    float *h = malloc(n * sizeof(float));

    cr_assert_eq(wk_cuda_stream_sync(f->c, f->s), 0, "%s", wk_gpu_error(f->g));
    cr_assert_eq(wk_cuda_download(f->c, h, p, n * sizeof(float)), 0);
    return h;
}

static void randn(float *v, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (float)((double)(seed >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
    }
}

/* got (freed) against want */
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

Test(dlayer_fake, rmsnorm_forward_and_backward)
{
    enum { N = 37, D = 48 };
    struct fx f;
    struct wk_rmsnorm nm;
    struct wk_rmsnorm_cache c;
    float x[N * D], dy[N * D], y[N * D], dx[N * D], dg0[D];
    wk_cuda_ptr dx_, y_, rstd, dxd, gain, dgain, part;

    fx_open(&f);
    cr_assert_eq(wk_rmsnorm_init(&nm, D), 0);
    cr_assert_eq(wk_rmsnorm_cache_init(&c, N), 0);
    randn(x, N * D, 1);
    randn(dy, N * D, 2);
    randn(nm.g.data, D, 3);
    randn(dg0, D, 4);
    memcpy(nm.dg.data, dg0, sizeof(dg0));
    dx_ = dbuf(&f, x, sizeof(x));
    gain = dbuf(&f, nm.g.data, D * sizeof(float));
    dgain = dbuf(&f, dg0, sizeof(dg0));
    y_ = dbuf(&f, NULL, sizeof(y));
    rstd = dbuf(&f, NULL, N * sizeof(float));
    dxd = dbuf(&f, NULL, sizeof(dx));
    part = dbuf(&f, NULL, wk_dl_rmsnorm_scratch(N, D));
    cr_assert_eq(wk_rmsnorm_forward(&nm, &c, x, y, N), 0);
    wk_rmsnorm_backward(&nm, &c, x, dy, dx, N);
    cr_assert_eq(wk_dl_rmsnorm_fwd(f.g, f.s, N, D, WK_RMSNORM_EPS, dx_, gain, y_, rstd), 0);
    cr_assert_eq(wk_dl_rmsnorm_bwd(f.g, f.s, N, D, dx_, gain, dbuf(&f, dy, sizeof(dy)), rstd, dxd,
                                   dgain, part),
                 0, "%s", wk_gpu_error(f.g));
    expect_close(fetch(&f, y_, N * D), y, N * D, "y");
    expect_close(fetch(&f, rstd, N), c.rstd.data, N, "rstd");
    expect_close(fetch(&f, dxd, N * D), dx, N * D, "dx");
    expect_close(fetch(&f, dgain, D), nm.dg.data, D, "dgain");
    wk_rmsnorm_cache_free(&c);
    wk_rmsnorm_free(&nm);
    fx_close(&f);
}

Test(dlayer_fake, attention_forward_input_and_weight_gradients)
{
    enum { B = 2, T = 9, D = 16, H = 2, N = B * T };
    const struct wk_dl_attn_shape shape = {B, T, D, H};
    struct fx f;
    struct wk_attn a;
    struct wk_attn_cache c;
    float x[N * D], dy[N * D], y[N * D], dx[N * D];
    struct wk_dl_attn_buf b;
    wk_cuda_ptr w[4], dw[4], xd, yd, dyd, dxd;
    struct wk_linear *lin[4];

    fx_open(&f);
    cr_assert_eq(wk_attn_init(&a, D, H, 7, 100, 0.3f), 0);
    cr_assert_eq(wk_attn_cache_init(&c, &a, B, T), 0);
    lin[0] = &a.wq, lin[1] = &a.wk, lin[2] = &a.wv, lin[3] = &a.wo;
    randn(x, N * D, 5);
    randn(dy, N * D, 6);
    for (int i = 0; i < 4; i++) {
        w[i] = dbuf(&f, lin[i]->w.data, D * D * sizeof(float));
        dw[i] = dbuf(&f, lin[i]->dw.data, D * D * sizeof(float)); /* zero, as the CPU's */
    }
    b = (struct wk_dl_attn_buf){
        dbuf(&f, NULL, sizeof(x)), dbuf(&f, NULL, sizeof(x)),
        dbuf(&f, NULL, sizeof(x)), dbuf(&f, NULL, (size_t)B * H * T * T * 4),
        dbuf(&f, NULL, sizeof(x)), dbuf(&f, NULL, (size_t)B * H * T * 4),
        dbuf(&f, NULL, sizeof(x)), dbuf(&f, NULL, sizeof(x)),
        dbuf(&f, NULL, sizeof(x)), dbuf(&f, NULL, sizeof(x)),
    };
    xd = dbuf(&f, x, sizeof(x));
    dyd = dbuf(&f, dy, sizeof(dy));
    yd = dbuf(&f, NULL, sizeof(y));
    dxd = dbuf(&f, NULL, sizeof(dx));
    wk_attn_forward(&a, &c, x, y);
    wk_attn_backward_input(&a, &c, dy, dx);
    wk_attn_backward_weight(&a, &c);
    cr_assert_eq(wk_dl_attn_fwd(f.g, f.s, &shape, xd, w, &b, yd), 0, "%s", wk_gpu_error(f.g));
    cr_assert_eq(wk_dl_attn_bwd_input(f.g, f.s, &shape, w, dyd, &b, dxd), 0, "%s",
                 wk_gpu_error(f.g));
    cr_assert_eq(wk_dl_attn_bwd_weight(f.g, f.s, &shape, xd, dyd, &b, dw), 0, "%s",
                 wk_gpu_error(f.g));
    expect_close(fetch(&f, yd, N * D), y, N * D, "y");
    expect_close(fetch(&f, b.p, (size_t)B * H * T * T), c.p.data, (size_t)B * H * T * T, "p");
    expect_close(fetch(&f, dxd, N * D), dx, N * D, "dx");
    expect_close(fetch(&f, dw[0], D * D), a.wq.dw.data, D * D, "dWq");
    expect_close(fetch(&f, dw[1], D * D), a.wk.dw.data, D * D, "dWk");
    expect_close(fetch(&f, dw[2], D * D), a.wv.dw.data, D * D, "dWv");
    expect_close(fetch(&f, dw[3], D * D), a.wo.dw.data, D * D, "dWo");
    wk_attn_cache_free(&c);
    wk_attn_free(&a);
    fx_close(&f);
}

Test(dlayer_fake, embedding_is_bitwise)
{
    enum { V = 11, D = 8, N = 20 };
    struct fx f;
    struct wk_embed e;
    int32_t tok[N];
    float dy[N * D], y[N * D];
    wk_cuda_ptr w, dw, td, yd, dyd, chain;
    float *got;

    fx_open(&f);
    cr_assert_eq(wk_embed_init(&e, V, D, 3, 9, 0.5f), 0);
    for (int i = 0; i < N; i++)
        tok[i] = (i * 7) % 5 + (i % 3 == 0 ? 6 : 0); /* repeats */
    randn(dy, N * D, 8);
    w = dbuf(&f, e.w.data, V * D * sizeof(float));
    dw = dbuf(&f, e.dw.data, V * D * sizeof(float));
    td = dbuf(&f, tok, sizeof(tok));
    dyd = dbuf(&f, dy, sizeof(dy));
    yd = dbuf(&f, NULL, sizeof(y));
    chain = dbuf(&f, NULL, N * sizeof(int32_t));
    cr_assert_eq(wk_embed_forward(&e, tok, y, N), 0);
    cr_assert_eq(wk_embed_backward(&e, tok, dy, N), 0);
    cr_assert_eq(wk_dl_embed_fwd(f.g, f.s, N, D, V, w, td, yd), 0);
    cr_assert_eq(wk_dl_embed_bwd(f.g, f.s, N, D, V, td, dyd, chain, dw), 0);
    got = fetch(&f, yd, N * D);
    cr_assert_arr_eq(got, y, sizeof(y));
    free(got);
    got = fetch(&f, dw, V * D);
    cr_assert_arr_eq(got, e.dw.data, V * D * sizeof(float));
    free(got);
    wk_embed_free(&e);
    fx_close(&f);
}

Test(dlayer_fake, head_loss_and_gradients)
{
    enum { N = 13, D = 8, V = 17 };
    struct fx f;
    struct wk_head hd;
    struct wk_head_cache c;
    float x[N * D], dx[N * D], loss = 0.0f, *rows;
    int32_t t[N];
    wk_cuda_ptr xd, w, dw, td, logits, probs, lossd, dlogits, dxd;
    double sum = 0.0;

    fx_open(&f);
    cr_assert_eq(wk_head_init(&hd, D, V, 4, 11, 0.5f), 0);
    cr_assert_eq(wk_head_cache_init(&c, &hd, N), 0);
    randn(x, N * D, 9);
    for (int i = 0; i < N; i++)
        t[i] = (i * 5 + 3) % V;
    xd = dbuf(&f, x, sizeof(x));
    w = dbuf(&f, hd.proj.w.data, V * D * sizeof(float));
    dw = dbuf(&f, hd.proj.dw.data, V * D * sizeof(float));
    td = dbuf(&f, t, sizeof(t));
    logits = dbuf(&f, NULL, N * V * sizeof(float));
    probs = dbuf(&f, NULL, N * V * sizeof(float));
    lossd = dbuf(&f, NULL, N * sizeof(float));
    dlogits = dbuf(&f, NULL, N * V * sizeof(float));
    dxd = dbuf(&f, NULL, sizeof(dx));
    cr_assert_eq(wk_head_forward(&hd, &c, x, t, N, &loss), 0);
    wk_head_backward_input(&hd, &c, dx);
    wk_head_backward_weight(&hd, &c);
    cr_assert_eq(wk_dl_head_fwd(f.g, f.s, N, D, V, xd, w, td, logits, probs, lossd), 0);
    cr_assert_eq(wk_dl_head_bwd_input(f.g, f.s, N, D, V, w, probs, td, dlogits, dxd), 0);
    cr_assert_eq(wk_dl_head_bwd_weight(f.g, f.s, N, D, V, xd, dlogits, dw), 0);
    rows = fetch(&f, lossd, N);
    for (int i = 0; i < N; i++)
        sum += rows[i];
    free(rows);
    cr_assert(fabs(sum / N - loss) <= BOUND * fabs(loss), "loss %.9g, want %.9g", sum / N,
              (double)loss);
    expect_close(fetch(&f, probs, N * V), c.probs.data, N * V, "probs");
    expect_close(fetch(&f, dxd, N * D), dx, N * D, "dx");
    expect_close(fetch(&f, dw, V * D), hd.proj.dw.data, V * D, "dW");
    wk_head_cache_free(&c);
    wk_head_free(&hd);
    fx_close(&f);
}
