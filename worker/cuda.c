/* cuda.c - opens the GPU stack with dlopen (see cuda.h). Owns the library
 * handles and the driver entry points resolved through cuGetProcAddress;
 * declares the few CUDA types it needs itself, so building needs no CUDA
 * header either. */
#include "worker/cuda.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/* The driver API's types, as its ABI defines them. */
typedef int cu_result; /* CUresult: 0 is CUDA_SUCCESS */
typedef int cu_device; /* CUdevice */
typedef unsigned long long cu_u64;
#define CU_GET_PROC_VERSION 12000 /* the ABI version of the entry points we ask for */

typedef cu_result (*cu_get_proc_address_fn)(const char *symbol, void **pfn, int version,
                                            cu_u64 flags, int *status);
typedef cu_result (*cu_init_fn)(unsigned flags);
typedef cu_result (*cu_driver_get_version_fn)(int *version);
typedef cu_result (*cu_device_get_count_fn)(int *count);
typedef cu_result (*cu_device_get_fn)(cu_device *dev, int ordinal);
typedef cu_result (*cu_device_get_name_fn)(char *name, int len, cu_device dev);
typedef cu_result (*cu_get_error_string_fn)(cu_result error, const char **str);
typedef int (*nccl_get_version_fn)(int *version);
typedef size_t (*cublaslt_get_version_fn)(void);

#define DESCRIBE_MAX 512
#define NAME_MAX_LEN 128

struct wk_cuda {
    void *libcuda, *libnccl, *libcublaslt;
    cu_init_fn init;
    cu_driver_get_version_fn driver_version;
    cu_device_get_count_fn device_count;
    cu_device_get_fn device_get;
    cu_device_get_name_fn device_name;
    cu_get_error_string_fn error_string;
    int driver, devices, nccl;
    size_t cublaslt;
    char describe[DESCRIBE_MAX];
};

/* Appends "; " and a formatted piece to err. */
static void add_problem(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void add_problem(char *err, size_t errlen, const char *fmt, ...)
{
    size_t used = strlen(err);
    va_list ap;

    if (used + 3 >= errlen)
        return;
    if (used)
        used += (size_t)snprintf(err + used, errlen - used, "; ");
    va_start(ap, fmt);
    vsnprintf(err + used, errlen - used, fmt, ap);
    va_end(ap);
}

static void *open_lib(const char *path, const char *what, char *err, size_t errlen)
{
    /* never unloaded: C++ libraries (NCCL, cuBLASLt) keep static allocations
     * that would look leaked once their code is gone */
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);

    if (!h)
        add_problem(err, errlen, "%s (%s) cannot be loaded: %s", path, what, dlerror());
    return h;
}

static const char *cu_error(const wk_cuda_t *c, cu_result rc)
{
    const char *s = NULL;

    if (c->error_string && c->error_string(rc, &s) == 0 && s)
        return s;
    return "unknown CUDA error";
}

/* The driver's entry points, through cuGetProcAddress. */
static int resolve_driver(wk_cuda_t *c, const char *path, char *err, size_t errlen)
{
    cu_get_proc_address_fn get = (cu_get_proc_address_fn)dlsym(c->libcuda, "cuGetProcAddress_v2");
    struct {
        const char *name;
        void **fn;
    } want[] = {
        {"cuInit", (void **)&c->init},
        {"cuDriverGetVersion", (void **)&c->driver_version},
        {"cuDeviceGetCount", (void **)&c->device_count},
        {"cuDeviceGet", (void **)&c->device_get},
        {"cuDeviceGetName", (void **)&c->device_name},
        {"cuGetErrorString", (void **)&c->error_string},
    };

    if (!get)
        get = (cu_get_proc_address_fn)dlsym(c->libcuda, "cuGetProcAddress");
    if (!get) {
        add_problem(err, errlen, "%s has no cuGetProcAddress (a driver older than CUDA 11.3?)",
                    path);
        return -ENOENT;
    }
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        int status = 0;

        if (get(want[i].name, want[i].fn, CU_GET_PROC_VERSION, 0, &status) != 0 || !*want[i].fn) {
            add_problem(err, errlen, "%s does not provide %s", path, want[i].name);
            return -ENOENT;
        }
    }
    return 0;
}

static int open_driver(wk_cuda_t *c, const char *path, char *err, size_t errlen)
{
    cu_result rc;

    if (!(c->libcuda = open_lib(path, "the NVIDIA driver", err, errlen)))
        return -ENOENT;
    if (resolve_driver(c, path, err, errlen) < 0)
        return -ENOENT;
    if ((rc = c->init(0)) != 0) {
        add_problem(err, errlen, "cuInit failed: %s (error %d)", cu_error(c, rc), rc);
        return -ENODEV;
    }
    if (c->driver_version(&c->driver) != 0 || c->device_count(&c->devices) != 0 || c->devices < 1) {
        add_problem(err, errlen, "no CUDA device");
        return -ENODEV;
    }
    return 0;
}

int wk_cuda_open(const struct wk_cuda_paths *paths, wk_cuda_t **out, char *err, size_t errlen)
{
    const char *cuda = paths && paths->cuda ? paths->cuda : WK_CUDA_LIB_DEFAULT;
    const char *nccl = paths && paths->nccl ? paths->nccl : WK_NCCL_LIB_DEFAULT;
    const char *cublaslt = paths && paths->cublaslt ? paths->cublaslt : WK_CUBLASLT_LIB_DEFAULT;
    wk_cuda_t *c;
    int rc = 0;
    char name[NAME_MAX_LEN] = "?";

    *out = NULL;
    if (!err || errlen == 0)
        return -EINVAL;
    err[0] = '\0';
    if (!(c = calloc(1, sizeof(*c)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    /* try every piece, so the message lists all that is missing */
    rc = open_driver(c, cuda, err, errlen);
    if ((c->libnccl = open_lib(nccl, "NCCL", err, errlen))) {
        nccl_get_version_fn v = (nccl_get_version_fn)dlsym(c->libnccl, "ncclGetVersion");
        if (!v || v(&c->nccl) != 0) {
            add_problem(err, errlen, "%s has no working ncclGetVersion", nccl);
            rc = rc ? rc : -ENOENT;
        }
    } else {
        rc = rc ? rc : -ENOENT;
    }
    if ((c->libcublaslt = open_lib(cublaslt, "cuBLASLt", err, errlen))) {
        cublaslt_get_version_fn v =
            (cublaslt_get_version_fn)dlsym(c->libcublaslt, "cublasLtGetVersion");
        if (!v) {
            add_problem(err, errlen, "%s has no cublasLtGetVersion", cublaslt);
            rc = rc ? rc : -ENOENT;
        } else {
            c->cublaslt = v();
        }
    } else {
        rc = rc ? rc : -ENOENT;
    }
    if (rc < 0) {
        char why[1024];

        snprintf(why, sizeof(why), "%s", err);
        snprintf(err, errlen, "the cuda backend cannot start: %s", why);
        wk_cuda_close(c);
        return rc;
    }
    {
        cu_device dev = 0;

        if (c->device_get(&dev, 0) != 0 || c->device_name(name, sizeof(name), dev) != 0)
            snprintf(name, sizeof(name), "?");
    }
    snprintf(c->describe, sizeof(c->describe),
             "driver %d.%d, %d device%s (%s), NCCL %d.%d.%d, cuBLASLt %zu", c->driver / 1000,
             c->driver % 1000 / 10, c->devices, c->devices == 1 ? "" : "s", name, c->nccl / 10000,
             c->nccl / 100 % 100, c->nccl % 100, c->cublaslt);
    *out = c;
    return 0;
}

void wk_cuda_close(wk_cuda_t *c)
{
    if (!c)
        return;
    if (c->libcublaslt)
        dlclose(c->libcublaslt);
    if (c->libnccl)
        dlclose(c->libnccl);
    if (c->libcuda)
        dlclose(c->libcuda);
    free(c);
}

const char *wk_cuda_describe(const wk_cuda_t *c)
{
    return c->describe;
}
