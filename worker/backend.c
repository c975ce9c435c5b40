/* backend.c - the table of backends (see backend.h). */
#include "worker/backend.h"

#include <stddef.h>
#include <string.h>

#include "worker/rank/engine.h"
#include "worker/sim/sim.h"

static const char *const sim_capabilities[] = {"sim", NULL};
static const char *const cpu_capabilities[] = {"fp32", "blas", NULL};
static const char *const cuda_capabilities[] = {"fp32", "cuda", NULL};

static const struct wk_backend backends[] = {
    {"sim", sim_capabilities, false, false, &wk_sim_ops},
    {"cpu", cpu_capabilities, true, false, &wk_rank_ops},
    {"cuda", cuda_capabilities, true, true, &wk_rank_ops},
};

const struct wk_backend *wk_backend_find(const char *name)
{
    for (size_t i = 0; name && i < sizeof(backends) / sizeof(backends[0]); i++)
        if (strcmp(backends[i].name, name) == 0)
            return &backends[i];
    return NULL;
}

const char *wk_backend_names(void)
{
    return "sim, cpu or cuda";
}
