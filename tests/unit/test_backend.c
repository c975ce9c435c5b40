/* test_backend.c - worker/backend.c, the table of backends: wk_backend_names
 * lists every entry, the device ops are the GPU backend's alone, and the
 * cuda device (worker/cuda/device.c) opens on libfakecuda.so, reports the
 * GPU's memory and a line for the log, and fails on a library that is not
 * there or a GPU that is not, saying which. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tests/fake/fakecuda.h"
#include "tests/unit/fakestack.h"
#include "worker/backend.h"
#include "worker/cuda/driver.h"

static const char *const every[] = {"sim", "cpu", "cuda"};
#define N_EVERY (sizeof(every) / sizeof(every[0]))

Test(backend, names_list_every_entry_of_the_table)
{
    const char *names = wk_backend_names();
    char copy[256], *save = NULL;
    size_t n = 0;

    cr_assert_str_eq(names, "sim, cpu or cuda");
    cr_assert_eq(wk_backend_names(), names, "built once");
    /* each name listed is an entry, and each entry is listed */
    snprintf(copy, sizeof(copy), "%s", names);
    for (char *tok = strtok_r(copy, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        if (strcmp(tok, "or") == 0)
            continue;
        cr_assert(wk_backend_find(tok), "\"%s\" listed but not found", tok);
        cr_assert_lt(n, N_EVERY);
        cr_assert_str_eq(tok, every[n], "entry %zu", n);
        n++;
    }
    cr_assert_eq(n, N_EVERY);
    cr_assert_null(wk_backend_find("tpu"));
    cr_assert_null(wk_backend_find(NULL));
}

Test(backend, only_the_gpu_backend_has_device_ops)
{
    for (size_t i = 0; i < N_EVERY; i++) {
        const struct wk_backend *b = wk_backend_find(every[i]);

        cr_assert(b, "%s", every[i]);
        cr_assert_str_eq(b->name, every[i]);
        cr_assert(b->ops, "%s has engine ops", b->name);
        cr_assert_eq(b->gpu, b->device != NULL, "%s: a GPU backend, and only one, has a device",
                     b->name);
    }
    cr_assert_null(wk_backend_find("sim")->device);
    cr_assert_null(wk_backend_find("cpu")->device);
    {
        const struct wk_backend_device_ops *d = wk_backend_find("cuda")->device;

        cr_assert(d && d->open && d->lost && d->bind && d->close);
    }
}

Test(backend, device_library_defaults_are_the_drivers)
{
    cr_assert_str_eq(WK_DEVICE_CUDA_LIB_DEFAULT, WK_CUDA_LIB_DEFAULT);
    cr_assert_str_eq(WK_DEVICE_NCCL_LIB_DEFAULT, WK_NCCL_LIB_DEFAULT);
    cr_assert_str_eq(WK_DEVICE_CUBLASLT_LIB_DEFAULT, WK_CUBLASLT_LIB_DEFAULT);
}

static struct wk_device_config fake_config(int gpu)
{
    const char *fake = fakestack_path();

    return (struct wk_device_config){.gpu = gpu,
                                     .libs = {.cuda = fake, .nccl = fake, .cublaslt = fake}};
}

Test(backend, cuda_device_opens_on_the_fake_stack_and_reports_its_memory)
{
    const struct wk_backend_device_ops *d = wk_backend_find("cuda")->device;
    struct wk_device_config cfg = fake_config(0);
    struct wk_device_info info;
    wk_gpu_t *gpu = NULL;
    char err[512] = "";

    cr_assert_eq(setenv(FAKECUDA_MEMORY_ENV, "536870912", 1), 0);
    cr_assert_eq(d->open(&cfg, &gpu, &info, err, sizeof(err)), 0, "%s", err);
    cr_assert(gpu);
    cr_assert_eq(info.memory, 536870912ull);
    cr_assert_str_empty(info.memory_error);
    cr_assert(strstr(info.describe, FAKECUDA_DEVICE_NAME), "%s", info.describe);
    cr_assert(strstr(info.describe, "; kernels: routing "), "%s", info.describe);
    cr_assert_null(d->lost(gpu), "a fresh context is not lost");
    cr_assert_eq(d->bind(gpu, err, sizeof(err)), 0, "%s", err); /* a job's thread binds it */
    cr_assert_null(d->lost(NULL));
    d->close(gpu);
    d->close(NULL);
}

Test(backend, cuda_device_with_a_missing_library_names_it)
{
    const struct wk_backend_device_ops *d = wk_backend_find("cuda")->device;
    struct wk_device_config cfg = fake_config(0);
    struct wk_device_info info;
    wk_gpu_t *gpu = (wk_gpu_t *)&cfg; /* overwritten with NULL on failure */
    char err[512] = "";
    int rc;

    cfg.libs.cuda = "/nonexistent/libcuda.so";
    rc = d->open(&cfg, &gpu, &info, err, sizeof(err));
    cr_assert_eq(rc, -ENOENT, "%d: %s", rc, err);
    cr_assert_null(gpu);
    cr_assert(strstr(err, "the cuda backend cannot start: "), "%s", err);
    cr_assert(strstr(err, "/nonexistent/libcuda.so (the NVIDIA driver)"), "%s", err);
}

Test(backend, cuda_device_on_a_gpu_that_is_not_there_says_which)
{
    const struct wk_backend_device_ops *d = wk_backend_find("cuda")->device;
    struct wk_device_config cfg = fake_config(3);
    struct wk_device_info info;
    wk_gpu_t *gpu = NULL;
    char err[512] = "";

    cr_assert_lt(d->open(&cfg, &gpu, &info, err, sizeof(err)), 0);
    cr_assert_null(gpu);
    cr_assert(strstr(err, "the cuda backend cannot start on GPU 3 (driver "), "%s", err);
    cr_assert(strstr(err, FAKECUDA_DEVICE_NAME), "%s", err);
}
