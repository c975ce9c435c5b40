/* test_gpu_fake.c - worker/gpu.c on libfakecuda.so: every kernel of the
 * backend's table resolves from the images built into this program (on the
 * fake, each one's host version), launches on the compute stream run in
 * order, a failed launch names its kernel, and a build without nvcc says it
 * has no kernels instead of failing later. */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "tests/unit/fakestack.h"
#include "worker/gpu.h"

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

    if (!wk_gpu_have_kernels()) {
        cr_assert_eq(rc, -ENOTSUP);
        cr_assert(strstr(err, "built without nvcc"), "%s", err);
        wk_cuda_close(c);
        return;
    }
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(wk_gpu_describe(g), "routing cubin, dispatch cubin"), "%s",
              wk_gpu_describe(g));
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

Test(gpu_fake, a_second_gpu_on_one_context_is_refused)
{
    wk_cuda_t *c = fakestack_open();
    wk_gpu_t *g = NULL, *h = NULL;
    char err[512];

    if (!wk_gpu_have_kernels())
        cr_skip_test("built without nvcc");
    cr_assert_eq(wk_gpu_create(c, 0, 0, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_gpu_create(c, 0, 0, &h, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "already held"), "%s", err);
    cr_assert_null(h);
    wk_gpu_destroy(g);
    wk_cuda_close(c);
}
