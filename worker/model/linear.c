/* linear.c - the bias-free dense layer of linear.h. */
#include "worker/model/linear.h"

#include <errno.h>

int wk_linear_init(struct wk_linear *l, int in, int out, uint64_t seed, uint64_t stream, float std)
{
    int rc;

    l->in = in;
    l->out = out;
    rc = wk_mat_init(&l->w, out, in);
    if (rc < 0)
        return rc;
    rc = wk_mat_init(&l->dw, out, in);
    if (rc < 0) {
        wk_mat_free(&l->w);
        return rc;
    }
    wk_mat_fill_normal(&l->w, seed, stream, std);
    return 0;
}

void wk_linear_free(struct wk_linear *l)
{
    wk_mat_free(&l->w);
    wk_mat_free(&l->dw);
}

void wk_linear_zero_grad(struct wk_linear *l)
{
    wk_mat_zero(&l->dw);
}

void wk_linear_forward(const struct wk_linear *l, const float *x, float *y, int n)
{
    wk_gemm_xwt(x, l->w.data, y, n, l->in, l->out, 0.0f);
}

void wk_linear_backward_input(const struct wk_linear *l, const float *dy, float *dx, int n,
                              int accumulate)
{
    wk_gemm_dyw(dy, l->w.data, dx, n, l->in, l->out, accumulate ? 1.0f : 0.0f);
}

void wk_linear_backward_weight(struct wk_linear *l, const float *x, const float *dy, int n)
{
    wk_gemm_dytx(dy, x, l->dw.data, n, l->in, l->out);
}

void wk_linear_backward(struct wk_linear *l, const float *x, const float *dy, float *dx, int n)
{
    wk_linear_backward_input(l, dy, dx, n, 0);
    wk_linear_backward_weight(l, x, dy, n);
}
