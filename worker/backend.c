/* backend.c - the table of backends (see backend.h). */
#include "worker/backend.h"

#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "worker/cpu/host.h"
#include "worker/cuda/device.h"
#include "worker/cuda/engine.h"
#include "worker/rank/engine.h"
#include "worker/sim/sim.h"

static const char *const sim_capabilities[] = {"sim", NULL};
static const char *const cpu_capabilities[] = {"fp32", "blas", NULL};
static const char *const cuda_capabilities[] = {"fp32", "cuda", NULL};

static const struct wk_backend backends[] = {
    {
        .name = "sim",
        .capabilities = sim_capabilities,
        .trains = false,
        .gpu = false,
        .ops = &wk_sim_ops,
    },
    {
        .name = "cpu",
        .capabilities = cpu_capabilities,
        .trains = true,
        .gpu = false,
        .ops = &wk_rank_ops,
        .impl = &wk_cpu_engine,
    },
    {
        .name = "cuda",
        .capabilities = cuda_capabilities,
        .trains = true,
        .gpu = true,
        .ops = &wk_rank_ops,
        .impl = &wk_cuda_engine,
        .device = &wk_cuda_device_ops,
    },
};

#define N_BACKENDS (sizeof(backends) / sizeof(backends[0]))

static pthread_once_t names_once = PTHREAD_ONCE_INIT;
static char names[256];

const struct wk_backend *wk_backend_find(const char *name)
{
    for (size_t i = 0; name && i < N_BACKENDS; i++)
        if (strcmp(backends[i].name, name) == 0)
            return &backends[i];
    return NULL;
}

/* "a", "a or b", "a, b or c" */
static void names_build(void)
{
    size_t len = 0;

    for (size_t i = 0; i < N_BACKENDS && len < sizeof(names); i++) {
        const char *sep = i == 0 ? "" : i + 1 == N_BACKENDS ? " or " : ", ";
        int n = snprintf(names + len, sizeof(names) - len, "%s%s", sep, backends[i].name);

        if (n < 0)
            break;
        len += (size_t)n;
    }
}

const char *wk_backend_names(void)
{
    pthread_once(&names_once, names_build);
    return names;
}
