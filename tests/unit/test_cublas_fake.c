/* test_cublas_fake.c - worker/cuda/cublas.c run end to end on libfakecuda.so's
 * cuBLASLt (tests/fake/fakecublaslt.c, cublasLt.h's semantics on the host):
 * the model's three GEMM forms in fp32 and bf16 against the worker's own
 * (worker/model/tensor.h), with beta, a NaN-poisoned output that beta = 0
 * must not read, the prepared-operation cache and pointer alignment, and
 * bf16 inputs converted by the conversion kernel's contract. */
#include <criterion/criterion.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/convert_ref.h"
#include "worker/cuda/cublas.h"
#include "worker/cuda/driver.h"
#include "worker/model/tensor.h"
#include "tests/unit/fakestack.h"

struct fixture {
    wk_cuda_t *c;
    wk_cublas_t *lt;
    wk_cuda_stream s;
};

static void setup(struct fixture *f)
{
    char err[512];

    memset(f, 0, sizeof(*f));
    f->c = fakestack_open();
    cr_assert_eq(wk_cuda_context(f->c, 0), 0);
    cr_assert_eq(wk_cuda_stream_create(f->c, &f->s), 0);
    cr_assert_eq(wk_cublas_create(f->c, 1 << 20, &f->lt, err, sizeof(err)), 0, "%s", err);
}

static void teardown(struct fixture *f)
{
    wk_cublas_destroy(f->lt);
    wk_cuda_stream_destroy(f->c, f->s);
    wk_cuda_close(f->c);
}

static void fill(float *v, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (float)((double)(seed >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
    }
}

static wk_cuda_ptr upload(struct fixture *f, const void *h, size_t bytes)
{
    wk_cuda_ptr p = 0;

    cr_assert_eq(wk_cuda_alloc(f->c, bytes, &p), 0);
    cr_assert_eq(wk_cuda_upload(f->c, p, h, bytes), 0);
    return p;
}

/* |got - want| / max(|want|, rms(want)) <= bound for each of n (the floor
 * at the RMS: a sum that cancels to near 0 has the error of its terms). The
 * fake sums in float in k order, OpenBLAS in its own order: ~k u apart. */
static void expect_close(const float *got, const float *want, size_t n, double bound,
                         const char *what)
{
    double ss = 0.0, rms;

    for (size_t i = 0; i < n; i++)
        ss += (double)want[i] * want[i];
    rms = sqrt(ss / (double)n);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / fmax(fabs((double)want[i]), rms);

        cr_assert(e <= bound && !isnan(got[i]), "%s[%zu] = %.9g, want %.9g (rel %.3g > %.1g)", what,
                  i, (double)got[i], (double)want[i], e, bound);
    }
}

/* The three forms at an odd shape: x [n][in], W [out][in], dy [n][out]. */
static void three_forms(enum wk_cublas_dtype dtype, double bound)
{
    enum { N = 37, IN = 29, OUT = 53 };
    struct fixture f;
    float x[N * IN], w[OUT * IN], dy[N * OUT], y[N * OUT], dx[N * IN], dw[OUT * IN];
    float ry[N * OUT], rdx[N * IN], rdw[OUT * IN], xr[N * IN], wr[OUT * IN], dyr[N * OUT];
    uint16_t xb[N * IN], wb[OUT * IN], dyb[N * OUT];
    wk_cuda_ptr px, pw, pdy, py, pdx, pdw;
    const float nan = NAN;

    setup(&f);
    fill(x, N * IN, 1);
    fill(w, OUT * IN, 2);
    fill(dy, N * OUT, 3);
    fill(dx, N * IN, 4); /* beta = 1 accumulates onto these */
    fill(dw, OUT * IN, 5);
    for (int i = 0; i < N * OUT; i++)
        y[i] = nan; /* beta = 0: never read */
    if (dtype == WK_CUBLAS_BF16) {
        dx_kref_f32_to_bf16_array(x, xb, N * IN);
        dx_kref_f32_to_bf16_array(w, wb, OUT * IN);
        dx_kref_f32_to_bf16_array(dy, dyb, N * OUT);
        dx_kref_bf16_to_f32_array(xb, xr, N * IN);
        dx_kref_bf16_to_f32_array(wb, wr, OUT * IN);
        dx_kref_bf16_to_f32_array(dyb, dyr, N * OUT);
        px = upload(&f, xb, sizeof(xb));
        pw = upload(&f, wb, sizeof(wb));
        pdy = upload(&f, dyb, sizeof(dyb));
    } else {
        memcpy(xr, x, sizeof(x));
        memcpy(wr, w, sizeof(w));
        memcpy(dyr, dy, sizeof(dy));
        px = upload(&f, x, sizeof(x));
        pw = upload(&f, w, sizeof(w));
        pdy = upload(&f, dy, sizeof(dy));
    }
    py = upload(&f, y, sizeof(y));
    pdx = upload(&f, dx, sizeof(dx));
    pdw = upload(&f, dw, sizeof(dw));
    memcpy(rdx, dx, sizeof(dx));
    memcpy(rdw, dw, sizeof(dw));
    wk_gemm_xwt(xr, wr, ry, N, IN, OUT, 0.0f);
    wk_gemm_dyw(dyr, wr, rdx, N, IN, OUT, 1.0f);
    wk_gemm_dytx(dyr, xr, rdw, N, IN, OUT);
    cr_assert_eq(wk_cublas_xwt(f.lt, f.s, dtype, px, pw, py, N, IN, OUT, 0.0f, 0), 0, "%s",
                 wk_cublas_error(f.lt));
    cr_assert_eq(wk_cublas_dyw(f.lt, f.s, dtype, pdy, pw, pdx, N, IN, OUT, 1.0f, 0), 0);
    cr_assert_eq(wk_cublas_dytx(f.lt, f.s, dtype, pdy, px, pdw, N, IN, OUT, 0), 0);
    cr_assert_eq(wk_cuda_stream_sync(f.c, f.s), 0);
    cr_assert_eq(wk_cuda_download(f.c, y, py, sizeof(y)), 0);
    cr_assert_eq(wk_cuda_download(f.c, dx, pdx, sizeof(dx)), 0);
    cr_assert_eq(wk_cuda_download(f.c, dw, pdw, sizeof(dw)), 0);
    expect_close(y, ry, N * OUT, bound, "y = x W^T");
    expect_close(dx, rdx, N * IN, bound, "dx += dy W");
    expect_close(dw, rdw, OUT * IN, bound, "dW += dy^T x");
    teardown(&f);
}

Test(cublas_fake, the_model_forms_in_fp32_match_the_cpu)
{
    three_forms(WK_CUBLAS_F32, 1e-5);
}

Test(cublas_fake, the_model_forms_in_bf16_match_the_cpu_on_rounded_inputs)
{
    three_forms(WK_CUBLAS_BF16, 1e-5);
}

Test(cublas_fake, a_repeated_shape_is_prepared_once)
{
    enum { N = 8, IN = 16, OUT = 12 };
    struct fixture f;
    float x[N * IN] = {0}, w[OUT * IN] = {0}, y[N * OUT];
    wk_cuda_ptr px, pw, py;
    unsigned long long hits = 0;

    setup(&f);
    px = upload(&f, x, sizeof(x));
    pw = upload(&f, w, sizeof(w));
    py = upload(&f, y, sizeof(y));
    for (int i = 0; i < 5; i++)
        cr_assert_eq(wk_cublas_xwt(f.lt, f.s, WK_CUBLAS_F32, px, pw, py, N, IN, OUT, 0.0f, 0), 0);
    cr_assert_eq(wk_cublas_cached(f.lt, &hits), 1);
    cr_assert_eq(hits, 4);
    /* another SM target is another prepared operation */
    cr_assert_eq(wk_cublas_xwt(f.lt, f.s, WK_CUBLAS_F32, px, pw, py, N, IN, OUT, 0.0f, 112), 0);
    cr_assert_eq(wk_cublas_cached(f.lt, &hits), 2);
    /* rows from the middle of a buffer (an expert's share) are 4-byte
     * aligned only: prepared for that, not run with an algorithm that
     * assumed 256 (the fake refuses that as cuBLASLt would) */
    cr_assert_eq(wk_cublas_xwt(f.lt, f.s, WK_CUBLAS_F32, px + 4, pw, py, N - 1, IN, OUT, 0.0f, 0),
                 0, "%s", wk_cublas_error(f.lt));
    cr_assert_eq(wk_cublas_cached(f.lt, &hits), 3);
    cr_assert_eq(wk_cuda_stream_sync(f.c, f.s), 0);
    teardown(&f);
}
