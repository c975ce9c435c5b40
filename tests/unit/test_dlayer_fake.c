/* test_dlayer_fake.c - worker/cuda/model/dlayer.c, the model's dense layers on the
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
#include "worker/cuda/model/dlayer.h"
#include "worker/model/attention.h"
#include "worker/model/embed.h"
#include "worker/model/head.h"
#include "worker/model/rmsnorm.h"

#define BOUND 1e-5

static float *fetch(struct fakestack_gpu *f, wk_cuda_ptr p, size_t n)
{
    return fakestack_fetch(f, p, n * sizeof(float));
}

Test(dlayer_fake, rmsnorm_forward_and_backward)
{
    enum { N = 37, D = 48 };
    struct fakestack_gpu f;
    struct wk_rmsnorm nm;
    struct wk_rmsnorm_cache c;
    float x[N * D], dy[N * D], y[N * D], dx[N * D], dg0[D];
    wk_cuda_ptr dx_, y_, rstd, dxd, gain, dgain, part;

    fakestack_gpu_open(&f);
    cr_assert_eq(wk_rmsnorm_init(&nm, D), 0);
    cr_assert_eq(wk_rmsnorm_cache_init(&c, N), 0);
    fakestack_uniform(x, N * D, 1, 1.0f);
    fakestack_uniform(dy, N * D, 2, 1.0f);
    fakestack_uniform(nm.g.data, D, 3, 1.0f);
    fakestack_uniform(dg0, D, 4, 1.0f);
    memcpy(nm.dg.data, dg0, sizeof(dg0));
    dx_ = fakestack_buf(&f, x, sizeof(x));
    gain = fakestack_buf(&f, nm.g.data, D * sizeof(float));
    dgain = fakestack_buf(&f, dg0, sizeof(dg0));
    y_ = fakestack_buf(&f, NULL, sizeof(y));
    rstd = fakestack_buf(&f, NULL, N * sizeof(float));
    dxd = fakestack_buf(&f, NULL, sizeof(dx));
    part = fakestack_buf(&f, NULL, wk_dl_rmsnorm_scratch(N, D));
    cr_assert_eq(wk_rmsnorm_forward(&nm, &c, x, y, N), 0);
    wk_rmsnorm_backward(&nm, &c, x, dy, dx, N);
    cr_assert_eq(wk_dl_rmsnorm_fwd(f.g, f.s, N, D, WK_RMSNORM_EPS, dx_, gain, y_, rstd), 0);
    cr_assert_eq(wk_dl_rmsnorm_bwd(f.g, f.s, N, D, dx_, gain, fakestack_buf(&f, dy, sizeof(dy)),
                                   rstd, dxd, dgain, part),
                 0, "%s", wk_gpu_error(f.g));
    fakestack_expect_close(fetch(&f, y_, N * D), y, N * D, BOUND, "y");
    fakestack_expect_close(fetch(&f, rstd, N), c.rstd.data, N, BOUND, "rstd");
    fakestack_expect_close(fetch(&f, dxd, N * D), dx, N * D, BOUND, "dx");
    fakestack_expect_close(fetch(&f, dgain, D), nm.dg.data, D, BOUND, "dgain");
    wk_rmsnorm_cache_free(&c);
    wk_rmsnorm_free(&nm);
    fakestack_gpu_close(&f);
}

Test(dlayer_fake, attention_forward_input_and_weight_gradients)
{
    enum { B = 2, T = 9, D = 16, H = 2, N = B * T };
    const struct wk_dl_attn_shape shape = {B, T, D, H};
    struct fakestack_gpu f;
    struct wk_attn a;
    struct wk_attn_cache c;
    float x[N * D], dy[N * D], y[N * D], dx[N * D];
    struct wk_dl_attn_buf b;
    wk_cuda_ptr w[4], dw[4], xd, yd, dyd, dxd;
    struct wk_linear *lin[4];

    fakestack_gpu_open(&f);
    cr_assert_eq(wk_attn_init(&a, D, H, 7, 100, 0.3f), 0);
    cr_assert_eq(wk_attn_cache_init(&c, &a, B, T), 0);
    lin[0] = &a.wq, lin[1] = &a.wk, lin[2] = &a.wv, lin[3] = &a.wo;
    fakestack_uniform(x, N * D, 5, 1.0f);
    fakestack_uniform(dy, N * D, 6, 1.0f);
    for (int i = 0; i < 4; i++) {
        w[i] = fakestack_buf(&f, lin[i]->w.data, D * D * sizeof(float));
        dw[i] = fakestack_buf(&f, lin[i]->dw.data, D * D * sizeof(float)); /* zero, as the CPU's */
    }
    b = (struct wk_dl_attn_buf){
        fakestack_buf(&f, NULL, sizeof(x)), fakestack_buf(&f, NULL, sizeof(x)),
        fakestack_buf(&f, NULL, sizeof(x)), fakestack_buf(&f, NULL, (size_t)B * H * T * T * 4),
        fakestack_buf(&f, NULL, sizeof(x)), fakestack_buf(&f, NULL, (size_t)B * H * T * 4),
        fakestack_buf(&f, NULL, sizeof(x)), fakestack_buf(&f, NULL, sizeof(x)),
        fakestack_buf(&f, NULL, sizeof(x)), fakestack_buf(&f, NULL, sizeof(x)),
    };
    xd = fakestack_buf(&f, x, sizeof(x));
    dyd = fakestack_buf(&f, dy, sizeof(dy));
    yd = fakestack_buf(&f, NULL, sizeof(y));
    dxd = fakestack_buf(&f, NULL, sizeof(dx));
    wk_attn_forward(&a, &c, x, y);
    wk_attn_backward_input(&a, &c, dy, dx);
    wk_attn_backward_weight(&a, &c);
    cr_assert_eq(wk_dl_attn_fwd(f.g, f.s, &shape, xd, w, &b, yd), 0, "%s", wk_gpu_error(f.g));
    cr_assert_eq(wk_dl_attn_bwd_input(f.g, f.s, &shape, w, dyd, &b, dxd), 0, "%s",
                 wk_gpu_error(f.g));
    cr_assert_eq(wk_dl_attn_bwd_weight(f.g, f.s, &shape, xd, dyd, &b, dw), 0, "%s",
                 wk_gpu_error(f.g));
    fakestack_expect_close(fetch(&f, yd, N * D), y, N * D, BOUND, "y");
    fakestack_expect_close(fetch(&f, b.p, (size_t)B * H * T * T), c.p.data, (size_t)B * H * T * T,
                           BOUND, "p");
    fakestack_expect_close(fetch(&f, dxd, N * D), dx, N * D, BOUND, "dx");
    fakestack_expect_close(fetch(&f, dw[0], D * D), a.wq.dw.data, D * D, BOUND, "dWq");
    fakestack_expect_close(fetch(&f, dw[1], D * D), a.wk.dw.data, D * D, BOUND, "dWk");
    fakestack_expect_close(fetch(&f, dw[2], D * D), a.wv.dw.data, D * D, BOUND, "dWv");
    fakestack_expect_close(fetch(&f, dw[3], D * D), a.wo.dw.data, D * D, BOUND, "dWo");
    wk_attn_cache_free(&c);
    wk_attn_free(&a);
    fakestack_gpu_close(&f);
}

Test(dlayer_fake, embedding_is_bitwise)
{
    enum { V = 11, D = 8, N = 20 };
    struct fakestack_gpu f;
    struct wk_embed e;
    int32_t tok[N];
    float dy[N * D], y[N * D];
    wk_cuda_ptr w, dw, td, yd, dyd, chain;
    float *got;

    fakestack_gpu_open(&f);
    cr_assert_eq(wk_embed_init(&e, V, D, 3, 9, 0.5f), 0);
    for (int i = 0; i < N; i++)
        tok[i] = (i * 7) % 5 + (i % 3 == 0 ? 6 : 0); /* repeats */
    fakestack_uniform(dy, N * D, 8, 1.0f);
    w = fakestack_buf(&f, e.w.data, V * D * sizeof(float));
    dw = fakestack_buf(&f, e.dw.data, V * D * sizeof(float));
    td = fakestack_buf(&f, tok, sizeof(tok));
    dyd = fakestack_buf(&f, dy, sizeof(dy));
    yd = fakestack_buf(&f, NULL, sizeof(y));
    chain = fakestack_buf(&f, NULL, N * sizeof(int32_t));
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
    fakestack_gpu_close(&f);
}

Test(dlayer_fake, head_loss_and_gradients)
{
    enum { N = 13, D = 8, V = 17 };
    struct fakestack_gpu f;
    struct wk_head hd;
    struct wk_head_cache c;
    float x[N * D], dx[N * D], loss = 0.0f, *rows;
    int32_t t[N];
    wk_cuda_ptr xd, w, dw, td, logits, probs, lossd, dlogits, dxd;
    double sum = 0.0;

    fakestack_gpu_open(&f);
    cr_assert_eq(wk_head_init(&hd, D, V, 4, 11, 0.5f), 0);
    cr_assert_eq(wk_head_cache_init(&c, &hd, N), 0);
    fakestack_uniform(x, N * D, 9, 1.0f);
    for (int i = 0; i < N; i++)
        t[i] = (i * 5 + 3) % V;
    xd = fakestack_buf(&f, x, sizeof(x));
    w = fakestack_buf(&f, hd.proj.w.data, V * D * sizeof(float));
    dw = fakestack_buf(&f, hd.proj.dw.data, V * D * sizeof(float));
    td = fakestack_buf(&f, t, sizeof(t));
    logits = fakestack_buf(&f, NULL, N * V * sizeof(float));
    probs = fakestack_buf(&f, NULL, N * V * sizeof(float));
    lossd = fakestack_buf(&f, NULL, N * sizeof(float));
    dlogits = fakestack_buf(&f, NULL, N * V * sizeof(float));
    dxd = fakestack_buf(&f, NULL, sizeof(dx));
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
    fakestack_expect_close(fetch(&f, probs, N * V), c.probs.data, N * V, BOUND, "probs");
    fakestack_expect_close(fetch(&f, dxd, N * D), dx, N * D, BOUND, "dx");
    fakestack_expect_close(fetch(&f, dw, V * D), hd.proj.dw.data, V * D, BOUND, "dW");
    wk_head_cache_free(&c);
    wk_head_free(&hd);
    fakestack_gpu_close(&f);
}
