/* tensor.c - row-major fp32 matrices and the sgemm wrappers of tensor.h. */
#include "worker/model/tensor.h"

#include <cblas.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "worker/model/rng.h"

int wk_mat_init(struct wk_mat *m, int rows, int cols)
{
    m->data = NULL;
    m->rows = 0;
    m->cols = 0;
    if (rows <= 0 || cols <= 0)
        return -EINVAL;
    m->data = calloc((size_t)rows * (size_t)cols, sizeof(float));
    if (!m->data)
        return -ENOMEM;
    m->rows = rows;
    m->cols = cols;
    return 0;
}

void wk_mat_free(struct wk_mat *m)
{
    free(m->data);
    m->data = NULL;
    m->rows = 0;
    m->cols = 0;
}

size_t wk_mat_size(const struct wk_mat *m)
{
    return (size_t)m->rows * (size_t)m->cols;
}

void wk_mat_zero(struct wk_mat *m)
{
    if (m->data)
        memset(m->data, 0, wk_mat_size(m) * sizeof(float));
}

void wk_mat_fill_normal(struct wk_mat *m, uint64_t seed, uint64_t stream, float std)
{
    struct wk_rng r = wk_rng_stream(seed, stream);
    size_t n = wk_mat_size(m);

    for (size_t i = 0; i < n; i++) {
        if (i % WK_STOP_POLL == WK_STOP_POLL - 1 && wk_stopped())
            return;
        m->data[i] = wk_rng_normal(&r) * std;
    }
}

static _Thread_local const atomic_bool *stop_flag;

void wk_set_stop(const atomic_bool *stop)
{
    stop_flag = stop;
}

bool wk_stopped(void)
{
    return stop_flag && atomic_load(stop_flag);
}

void wk_mat_fill(struct wk_mat *m, float value)
{
    size_t n = wk_mat_size(m);

    for (size_t i = 0; i < n; i++)
        m->data[i] = value;
}

void wk_gemm_xwt(const float *x, const float *w, float *y, int n, int in, int out, float beta)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, beta, y,
                out);
}

void wk_gemm_dyw(const float *dy, const float *w, float *dx, int n, int in, int out, float beta)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in, beta,
                dx, in);
}

void wk_gemm_dytx(const float *dy, const float *x, float *dw, int n, int in, int out)
{
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw,
                in);
}
