/* device.c - the cuda backend's device ops (see device.h). */
#include "worker/cuda/device.h"

#include <stdint.h>
#include <stdio.h>

#include "common/log.h"
#include "worker/backend.h"
#include "worker/cuda/driver.h"
#include "worker/cuda/gpu.h"

static int wk_cuda_device_open(const struct wk_device_config *cfg, wk_gpu_t **gpu,
                               struct wk_device_info *info, char *err, size_t errlen)
{
    struct wk_cuda_paths paths = {
        .cuda = cfg->libs.cuda, .nccl = cfg->libs.nccl, .cublaslt = cfg->libs.cublaslt};
    wk_cuda_t *c = NULL;
    wk_gpu_t *g = NULL;
    char why[1024];
    int rc;

    *gpu = NULL;
    *info = (struct wk_device_info){0};
    if ((rc = wk_cuda_open(&paths, &c, err, errlen)) < 0)
        return rc;
    if ((rc = wk_gpu_create(c, cfg->gpu, 0, &g, why, sizeof(why))) < 0) {
        dx_errf(err, errlen, rc, "the cuda backend cannot start on GPU %d (%s): %s", cfg->gpu,
                wk_cuda_describe(c), why);
        wk_cuda_close(c);
        return rc;
    }
    if (wk_gpu_memory_bytes(g, &info->memory) < 0) {
        info->memory = 0;
        snprintf(info->memory_error, sizeof(info->memory_error), "%s", wk_gpu_error(g));
    }
    snprintf(info->describe, sizeof(info->describe), "%s; kernels: %s", wk_cuda_describe(c),
             wk_gpu_describe(g));
    *gpu = g;
    return 0;
}

static const char *wk_cuda_device_lost(const wk_gpu_t *gpu)
{
    return gpu ? wk_cuda_lost(wk_gpu_cuda(gpu)) : NULL;
}

static int wk_cuda_device_bind(wk_gpu_t *gpu, char *err, size_t errlen)
{
    wk_cuda_t *c = wk_gpu_cuda(gpu);
    int rc = wk_cuda_bind(c);

    return rc < 0 ? dx_errf(err, errlen, rc, "the GPU's context: %s", wk_cuda_error(c)) : 0;
}

static void wk_cuda_device_close(wk_gpu_t *gpu)
{
    wk_cuda_t *c;

    if (!gpu)
        return;
    c = wk_gpu_cuda(gpu);
    wk_gpu_destroy(gpu);
    wk_cuda_close(c);
}

const struct wk_backend_device_ops wk_cuda_device_ops = {
    .open = wk_cuda_device_open,
    .lost = wk_cuda_device_lost,
    .bind = wk_cuda_device_bind,
    .close = wk_cuda_device_close,
};
