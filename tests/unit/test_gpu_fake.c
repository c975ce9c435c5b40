/* test_gpu_fake.c - worker/cuda/gpu.c on libfakecuda.so: every kernel of the
 * backend's table resolves from the images built into this program (on the
 * fake, each one's host version), launches on the compute stream run in
 * order, a failed launch names its kernel; a build without nvcc runs on the
 * fake (its placeholder images taken) and, on a driver that needs real
 * images, says it has no kernels instead of failing later. */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "tests/fake/fakecuda.h"
#include "tests/unit/fakestack.h"
#include "worker/cuda/gpu.h"

Test(gpu_fake, every_kernel_resolves_and_launches_run_in_order)
{
    wk_cuda_t *c = fakestack_open();
    wk_gpu_t *g = NULL;
    char err[512];
    wk_cuda_ptr a, b;
    float ha[5] = {1, 2, 3, 4, 5}, hb[5] = {10, 20, 30, 40, 50}, out[5];
    long long n = 5;
    float two = 2.0f;
    int rc = wk_gpu_create(c, 0, 1 << 20, &g, err, sizeof(err));

    cr_assert_eq(rc, 0, "%s", err);
    /* the fake takes any image: a build without nvcc's placeholders too */
    cr_assert(strstr(wk_gpu_describe(g), wk_gpu_have_kernels() ? "routing cubin, dispatch cubin"
                                                               : "routing placeholder, dispatch "
                                                                 "placeholder"),
              "%s", wk_gpu_describe(g));
    cr_assert_eq(wk_gpu_sms(g), 132);
    cr_assert_str_eq(wk_gpu_kernel_name(WK_K_RMSNORM_FWD), "dx_rmsnorm_fwd");
    cr_assert_str_eq(wk_gpu_kernel_name(WK_K_TRANSPORT_RECV), "dx_transport_recv");
    cr_assert_eq(wk_cuda_alloc(c, sizeof(ha), &a), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(hb), &b), 0);
    cr_assert_eq(wk_cuda_upload(c, a, ha, sizeof(ha)), 0);
    cr_assert_eq(wk_cuda_upload(c, b, hb, sizeof(hb)), 0);
    {
        /* b = a + b, then b = 2 b: in order on the compute stream */
        void *add[] = {&a, &b, &n, &b}, *scale[] = {&b, &n, &two, &b};
        wk_cuda_stream s = wk_gpu_compute_stream(g);

        cr_assert_eq(wk_gpu_launch(g, WK_K_ADD, s, 1, 256, 0, add), 0, "%s", wk_gpu_error(g));
        cr_assert_eq(wk_gpu_launch(g, WK_K_SCALE, s, 1, 256, 0, scale), 0);
        cr_assert_eq(wk_cuda_stream_sync(c, s), 0);
    }
    cr_assert_eq(wk_cuda_download(c, out, b, sizeof(out)), 0);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(out[i], 2.0f * (ha[i] + hb[i]));
    /* a block the driver refuses: the message names the kernel */
    cr_assert_eq(wk_gpu_launch(g, WK_K_ADD, wk_gpu_compute_stream(g), 1, 4096, 0, NULL), -EIO);
    cr_assert(strstr(wk_gpu_error(g), "dx_add: cuLaunchKernel"), "%s", wk_gpu_error(g));
    cr_assert_eq(wk_gpu_launch(g, WK_K_COUNT, NULL, 1, 1, 0, NULL), -EINVAL);
    wk_cuda_free(c, a);
    wk_cuda_free(c, b);
    wk_gpu_destroy(g);
    wk_cuda_close(c);
}

/* What a cuda worker reports at registration (Register.memory_bytes): the
 * device's total memory, here the fake's FAKECUDA_MEMORY_BYTES. */
Test(gpu_fake, the_gpu_reports_its_devices_total_memory)
{
    struct fakestack_gpu f;
    uint64_t bytes = 0;

    cr_assert_eq(setenv(FAKECUDA_MEMORY_ENV, "67108864", 1), 0);
    fakestack_gpu_open(&f);
    cr_assert_eq(wk_gpu_memory_bytes(f.g, &bytes), 0, "%s", wk_gpu_error(f.g));
    cr_assert_eq(bytes, 64ull << 20);
    fakestack_gpu_close(&f);
    unsetenv(FAKECUDA_MEMORY_ENV);

    fakestack_gpu_open(&f);
    cr_assert_eq(wk_gpu_memory_bytes(f.g, &bytes), 0, "%s", wk_gpu_error(f.g));
    cr_assert_eq(bytes, FAKECUDA_MEMORY_DEFAULT);
    fakestack_gpu_close(&f);
}

Test(gpu_fake, a_second_gpu_on_one_context_is_refused)
{
    wk_cuda_t *c = fakestack_open();
    wk_gpu_t *g = NULL, *h = NULL;
    char err[512];

    cr_assert_eq(wk_gpu_create(c, 0, 0, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_gpu_create(c, 0, 0, &h, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "already held"), "%s", err);
    cr_assert_null(h);
    wk_gpu_destroy(g);
    wk_cuda_close(c);
}

/* A driver that loads only real images (the fake's FAKECUDA_STRICT_IMAGES,
 * as any NVIDIA driver): a build with nvcc loads its cubins; one without
 * says it was built without nvcc, instead of failing later. */
Test(gpu_fake, a_driver_that_needs_real_images_gets_them_or_a_build_without_nvcc_says_so)
{
    wk_cuda_t *c;
    wk_gpu_t *g = NULL;
    char err[512] = "";
    int rc;

    setenv(FAKECUDA_STRICT_IMAGES_ENV, "1", 1);
    c = fakestack_open();
    rc = wk_gpu_create(c, 0, 0, &g, err, sizeof(err));
    if (wk_gpu_have_kernels()) {
        cr_assert_eq(rc, 0, "%s", err);
        cr_assert(strstr(wk_gpu_describe(g), "routing cubin"), "%s", wk_gpu_describe(g));
    } else {
        cr_assert_eq(rc, -ENOTSUP, "%d: %s", rc, err);
        cr_assert(strstr(err, "built without nvcc, so without its CUDA kernels") &&
                      strstr(err, "(kernel module routing: ") &&
                      strstr(err, "device kernel image is invalid"),
                  "%s", err);
        cr_assert_null(g);
    }
    wk_gpu_destroy(g);
    wk_cuda_close(c);
}

/* bf16 GEMMs take a kept weight's persistent copy: results equal the
 * per-GEMM conversion's, the copy is what the GEMM reads (a change of the
 * fp32 weight shows only after a refresh), and a slice of a kept tensor (an
 * expert of a stacked tensor) maps into the copy. */
Test(gpu_fake, bf16_gemms_read_the_kept_copy_of_a_weight)
{
    enum { N = 3, IN = 8, OUT = 4 };
    struct fakestack_gpu f;
    float x[N * IN], w[2 * OUT * IN], w2[2 * OUT * IN];
    wk_cuda_ptr dx, dw, y1, y2;
    float *a, *b;

    fakestack_gpu_open(&f);
    fakestack_uniform(x, N * IN, 1, 1.0f);
    fakestack_uniform(w, 2 * OUT * IN, 2, 1.0f);
    dx = fakestack_buf(&f, x, sizeof(x));
    dw = fakestack_buf(&f, w, sizeof(w));
    y1 = fakestack_buf(&f, NULL, N * OUT * 4);
    y2 = fakestack_buf(&f, NULL, N * OUT * 4);
    wk_gpu_set_gemm_dtype(f.g, WK_CUBLAS_BF16);
    /* the second expert's slice, converted at the GEMM */
    cr_assert_eq(wk_gpu_xwt(f.g, f.s, dx, dw + OUT * IN * 4, y1, N, IN, OUT, 0.0f), 0, "%s",
                 wk_gpu_error(f.g));
    cr_assert_eq(wk_gpu_bf16_refresh(f.g, f.s, dw), -ENOENT);
    cr_assert_eq(wk_gpu_bf16_keep(f.g, dw, 2 * OUT * IN), 0, "%s", wk_gpu_error(f.g));
    cr_assert_eq(wk_gpu_bf16_refresh(f.g, f.s, dw), 0, "%s", wk_gpu_error(f.g));
    cr_assert_eq(wk_gpu_xwt(f.g, f.s, dx, dw + OUT * IN * 4, y2, N, IN, OUT, 0.0f), 0);
    a = fakestack_fetch(&f, y1, N * OUT * 4);
    b = fakestack_fetch(&f, y2, N * OUT * 4);
    cr_assert_arr_eq(a, b, N * OUT * 4, "the kept copy is the same rounding");
    free(b);
    /* the fp32 weight changes: the GEMM still reads the (stale) copy... */
    for (int i = 0; i < 2 * OUT * IN; i++)
        w2[i] = -w[i];
    cr_assert_eq(wk_cuda_upload(f.c, dw, w2, sizeof(w2)), 0);
    cr_assert_eq(wk_gpu_xwt(f.g, f.s, dx, dw + OUT * IN * 4, y2, N, IN, OUT, 0.0f), 0);
    b = fakestack_fetch(&f, y2, N * OUT * 4);
    cr_assert_arr_eq(a, b, N * OUT * 4, "no conversion at the GEMM");
    free(b);
    /* ...until the owner refreshes it */
    cr_assert_eq(wk_gpu_bf16_refresh(f.g, f.s, dw), 0);
    cr_assert_eq(wk_gpu_xwt(f.g, f.s, dx, dw + OUT * IN * 4, y2, N, IN, OUT, 0.0f), 0);
    b = fakestack_fetch(&f, y2, N * OUT * 4);
    for (int i = 0; i < N * OUT; i++)
        cr_assert_eq(b[i], -a[i], "y[%d]: the refreshed copy is the negated weight", i);
    free(a);
    free(b);
    wk_gpu_bf16_forget(f.g, dw);
    cr_assert_eq(wk_gpu_bf16_refresh(f.g, f.s, dw), -ENOENT);
    fakestack_gpu_close(&f);
}
