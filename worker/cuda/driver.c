/* driver.c - opens the GPU stack with dlopen (see driver.h). Owns the library
 * handles, the driver entry points resolved through cuGetProcAddress and
 * the retained primary context; declares the few CUDA types it needs itself
 * (signatures as the toolkit's cuda.h of CUDA 12/13 declares them), so building needs no
 * CUDA header either. */
#include "worker/cuda/driver.h"

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
typedef void *cu_context; /* CUcontext */
typedef void *cu_stream;  /* CUstream; NULL is the default stream */
#define CU_ATTR_MULTIPROCESSOR_COUNT 16
#define CU_ATTR_CC_MAJOR 75
#define CU_ATTR_CC_MINOR 76
#define CU_EVENT_DEFAULT 0
typedef cu_result (*cu_device_get_attribute_fn)(int *pi, int attrib, cu_device dev);
typedef cu_result (*cu_device_total_mem_fn)(size_t *bytes, cu_device dev); /* _v2 */
typedef cu_result (*cu_primary_ctx_retain_fn)(cu_context *pctx, cu_device dev);
typedef cu_result (*cu_primary_ctx_release_fn)(cu_device dev);
typedef cu_result (*cu_ctx_set_current_fn)(cu_context ctx);
typedef cu_result (*cu_ctx_synchronize_fn)(void);
typedef cu_result (*cu_module_load_data_fn)(wk_cuda_module *mod, const void *image);
typedef cu_result (*cu_module_unload_fn)(wk_cuda_module mod);
typedef cu_result (*cu_module_get_function_fn)(wk_cuda_function_t *fn, wk_cuda_module mod,
                                               const char *name);
typedef cu_result (*cu_mem_alloc_fn)(wk_cuda_ptr *p, size_t bytes);
typedef cu_result (*cu_mem_free_fn)(wk_cuda_ptr p);
typedef cu_result (*cu_memcpy_htod_fn)(wk_cuda_ptr dst, const void *src, size_t bytes);
typedef cu_result (*cu_memcpy_dtoh_fn)(void *dst, wk_cuda_ptr src, size_t bytes);
typedef cu_result (*cu_memcpy_dtod_fn)(wk_cuda_ptr dst, wk_cuda_ptr src, size_t bytes);
typedef cu_result (*cu_memset_d8_fn)(wk_cuda_ptr dst, unsigned char uc, size_t n);
typedef cu_result (*cu_launch_kernel_fn)(wk_cuda_function_t f, unsigned gx, unsigned gy,
                                         unsigned gz, unsigned bx, unsigned by, unsigned bz,
                                         unsigned shmem, cu_stream stream, void **params,
                                         void **extra);
typedef cu_result (*cu_event_create_fn)(wk_cuda_event *ev, unsigned flags);
typedef cu_result (*cu_event_destroy_fn)(wk_cuda_event ev);
typedef cu_result (*cu_event_record_fn)(wk_cuda_event ev, cu_stream stream);
typedef cu_result (*cu_event_synchronize_fn)(wk_cuda_event ev);
typedef cu_result (*cu_event_elapsed_fn)(float *ms, wk_cuda_event start, wk_cuda_event end);
#define CU_STREAM_NON_BLOCKING 0x1
#define CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS 0x1
#define CU_FUNC_ATTR_MAX_DYNAMIC_SHARED 8
typedef cu_result (*cu_stream_create_fn)(wk_cuda_stream *s, unsigned flags);
typedef cu_result (*cu_stream_destroy_fn)(wk_cuda_stream s);
typedef cu_result (*cu_stream_synchronize_fn)(wk_cuda_stream s);
typedef cu_result (*cu_stream_wait_event_fn)(wk_cuda_stream s, wk_cuda_event ev, unsigned flags);
typedef cu_result (*cu_memcpy_dtod_async_fn)(wk_cuda_ptr dst, wk_cuda_ptr src, size_t bytes,
                                             wk_cuda_stream s);
typedef cu_result (*cu_memcpy_htod_async_fn)(wk_cuda_ptr dst, const void *src, size_t bytes,
                                             wk_cuda_stream s);
typedef cu_result (*cu_memset_d8_async_fn)(wk_cuda_ptr dst, unsigned char uc, size_t n,
                                           wk_cuda_stream s);
typedef cu_result (*cu_ipc_get_mem_handle_fn)(struct wk_cuda_ipc_handle *h, wk_cuda_ptr p);
typedef cu_result (*cu_ipc_open_mem_handle_fn)(wk_cuda_ptr *p, struct wk_cuda_ipc_handle h,
                                               unsigned flags);
typedef cu_result (*cu_ipc_close_mem_handle_fn)(wk_cuda_ptr p);
typedef cu_result (*cu_func_set_attribute_fn)(wk_cuda_function_t fn, int attrib, int value);
typedef int (*nccl_get_version_fn)(int *version);
typedef size_t (*cublaslt_get_version_fn)(void);

#define DESCRIBE_MAX 512
#define NAME_MAX_LEN 128
#define ERROR_MAX 512

struct wk_cuda {
    void *libcuda, *libnccl, *libcublaslt;
    cu_init_fn init;
    cu_driver_get_version_fn driver_version;
    cu_device_get_count_fn device_count;
    cu_device_get_fn device_get;
    cu_device_get_name_fn device_name;
    cu_get_error_string_fn error_string;
    cu_device_get_attribute_fn device_attribute;
    cu_device_total_mem_fn device_total_mem;
    cu_primary_ctx_retain_fn ctx_retain;
    cu_primary_ctx_release_fn ctx_release;
    cu_ctx_set_current_fn ctx_set_current;
    cu_ctx_synchronize_fn ctx_synchronize;
    cu_module_load_data_fn module_load_data;
    cu_module_unload_fn module_unload;
    cu_module_get_function_fn module_get_function;
    cu_mem_alloc_fn mem_alloc;
    cu_mem_free_fn mem_free;
    cu_memcpy_htod_fn memcpy_htod;
    cu_memcpy_dtoh_fn memcpy_dtoh;
    cu_memcpy_dtod_fn memcpy_dtod;
    cu_memset_d8_fn memset_d8;
    cu_launch_kernel_fn launch_kernel;
    cu_event_create_fn event_create;
    cu_event_destroy_fn event_destroy;
    cu_event_record_fn event_record;
    cu_event_synchronize_fn event_synchronize;
    cu_event_elapsed_fn event_elapsed;
    cu_stream_create_fn stream_create;
    cu_stream_destroy_fn stream_destroy;
    cu_stream_synchronize_fn stream_synchronize;
    cu_stream_wait_event_fn stream_wait_event;
    cu_memcpy_dtod_async_fn memcpy_dtod_async;
    cu_memset_d8_async_fn memset_d8_async;
    cu_memcpy_htod_async_fn memcpy_htod_async;
    cu_ipc_get_mem_handle_fn ipc_get;
    cu_ipc_open_mem_handle_fn ipc_open;
    cu_ipc_close_mem_handle_fn ipc_close;
    cu_func_set_attribute_fn func_set_attribute;
    int driver, devices, nccl;
    size_t cublaslt;
    int ctx_device; /* the device whose primary context is retained, or -1 */
    int lost;       /* a call reported a fault that leaves the context unusable */
    char lost_error[ERROR_MAX];
    cu_context ctx; /* that context */
    char describe[DESCRIBE_MAX];
    char error[ERROR_MAX];
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
        /* the base names: at CU_GET_PROC_VERSION the driver hands out the
         * versions whose signatures are declared above (cuMemAlloc_v2, ...) */
        {"cuDeviceGetAttribute", (void **)&c->device_attribute},
        {"cuDeviceTotalMem", (void **)&c->device_total_mem},
        {"cuDevicePrimaryCtxRetain", (void **)&c->ctx_retain},
        {"cuDevicePrimaryCtxRelease", (void **)&c->ctx_release},
        {"cuCtxSetCurrent", (void **)&c->ctx_set_current},
        {"cuCtxSynchronize", (void **)&c->ctx_synchronize},
        {"cuModuleLoadData", (void **)&c->module_load_data},
        {"cuModuleUnload", (void **)&c->module_unload},
        {"cuModuleGetFunction", (void **)&c->module_get_function},
        {"cuMemAlloc", (void **)&c->mem_alloc},
        {"cuMemFree", (void **)&c->mem_free},
        {"cuMemcpyHtoD", (void **)&c->memcpy_htod},
        {"cuMemcpyDtoH", (void **)&c->memcpy_dtoh},
        {"cuMemcpyDtoD", (void **)&c->memcpy_dtod},
        {"cuMemsetD8", (void **)&c->memset_d8},
        {"cuLaunchKernel", (void **)&c->launch_kernel},
        {"cuEventCreate", (void **)&c->event_create},
        {"cuEventDestroy", (void **)&c->event_destroy},
        {"cuEventRecord", (void **)&c->event_record},
        {"cuEventSynchronize", (void **)&c->event_synchronize},
        {"cuEventElapsedTime", (void **)&c->event_elapsed},
        {"cuStreamCreate", (void **)&c->stream_create},
        {"cuStreamDestroy", (void **)&c->stream_destroy},
        {"cuStreamSynchronize", (void **)&c->stream_synchronize},
        {"cuStreamWaitEvent", (void **)&c->stream_wait_event},
        {"cuMemcpyDtoDAsync", (void **)&c->memcpy_dtod_async},
        {"cuMemsetD8Async", (void **)&c->memset_d8_async},
        {"cuMemcpyHtoDAsync", (void **)&c->memcpy_htod_async},
        {"cuIpcGetMemHandle", (void **)&c->ipc_get},
        {"cuIpcOpenMemHandle", (void **)&c->ipc_open},
        {"cuIpcCloseMemHandle", (void **)&c->ipc_close},
        {"cuFuncSetAttribute", (void **)&c->func_set_attribute},
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
    if (!(c = calloc(1, sizeof(*c))))
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    c->ctx_device = -1;
    /* try every piece, so the message lists all that is missing */
    rc = open_driver(c, cuda, err, errlen);
    if (paths && paths->driver_only) {
        /* neither NCCL nor cuBLASLt */
    } else if ((c->libnccl = open_lib(nccl, "NCCL", err, errlen))) {
        nccl_get_version_fn v = (nccl_get_version_fn)dlsym(c->libnccl, "ncclGetVersion");
        if (!v || v(&c->nccl) != 0) {
            add_problem(err, errlen, "%s has no working ncclGetVersion", nccl);
            rc = rc ? rc : -ENOENT;
        }
    } else {
        rc = rc ? rc : -ENOENT;
    }
    if (paths && paths->driver_only) {
        /* as above */
    } else if ((c->libcublaslt = open_lib(cublaslt, "cuBLASLt", err, errlen))) {
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
        dx_errf(err, errlen, rc, "the cuda backend cannot start: %s", why);
        wk_cuda_close(c);
        return rc;
    }
    {
        cu_device dev = 0;

        if (c->device_get(&dev, 0) != 0 || c->device_name(name, sizeof(name), dev) != 0)
            snprintf(name, sizeof(name), "?");
    }
    if (paths && paths->driver_only)
        snprintf(c->describe, sizeof(c->describe), "driver %d.%d, %d device%s (%s)",
                 c->driver / 1000, c->driver % 1000 / 10, c->devices, c->devices == 1 ? "" : "s",
                 name);
    else
        snprintf(c->describe, sizeof(c->describe),
                 "driver %d.%d, %d device%s (%s), NCCL %d.%d.%d, cuBLASLt %zu", c->driver / 1000,
                 c->driver % 1000 / 10, c->devices, c->devices == 1 ? "" : "s", name,
                 c->nccl / 10000, c->nccl / 100 % 100, c->nccl % 100, c->cublaslt);
    *out = c;
    return 0;
}

void wk_cuda_close(wk_cuda_t *c)
{
    if (!c)
        return;
    if (c->ctx_device >= 0)
        c->ctx_release(c->ctx_device);
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

/* --- the driver API for tools that run kernels --------------------------- */

/* The errors after which a context cannot be used again (a kernel's
 * fault): every later call fails too, until the process ends. */
static int sticky_error(cu_result rc)
{
    switch (rc) {
    case 700: /* CUDA_ERROR_ILLEGAL_ADDRESS */
    case 714: /* CUDA_ERROR_HARDWARE_STACK_ERROR */
    case 715: /* CUDA_ERROR_ILLEGAL_INSTRUCTION */
    case 716: /* CUDA_ERROR_MISALIGNED_ADDRESS */
    case 717: /* CUDA_ERROR_INVALID_ADDRESS_SPACE */
    case 718: /* CUDA_ERROR_INVALID_PC */
    case 719: /* CUDA_ERROR_LAUNCH_FAILED */
        return 1;
    default:
        return 0;
    }
}

/* Records "call: CUDA error string (CUDA error N)" when rc is not success. */
static int check(wk_cuda_t *c, cu_result rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int check(wk_cuda_t *c, cu_result rc, const char *fmt, ...)
{
    va_list ap;
    int used;

    if (rc == 0)
        return 0;
    va_start(ap, fmt);
    used = vsnprintf(c->error, sizeof(c->error), fmt, ap);
    va_end(ap);
    if (used >= 0 && (size_t)used < sizeof(c->error))
        snprintf(c->error + used, sizeof(c->error) - (size_t)used, ": %s (CUDA error %d)",
                 cu_error(c, rc), rc);
    if (sticky_error(rc) && !c->lost) {
        c->lost = 1;
        snprintf(c->lost_error, sizeof(c->lost_error), "%s", c->error);
    }
    return -EIO;
}

const char *wk_cuda_error(const wk_cuda_t *c)
{
    return c->error;
}

const char *wk_cuda_lost(const wk_cuda_t *c)
{
    return c && c->lost ? c->lost_error : NULL;
}

int wk_cuda_context(wk_cuda_t *c, int device)
{
    cu_device dev = 0;
    cu_context ctx = NULL;
    int rc;

    if (device < 0 || device >= c->devices) {
        snprintf(c->error, sizeof(c->error), "device %d: there are %d", device, c->devices);
        return -EINVAL;
    }
    if (c->ctx_device >= 0) {
        snprintf(c->error, sizeof(c->error), "a context is already held (device %d)",
                 c->ctx_device);
        return -EINVAL;
    }
    if ((rc = check(c, c->device_get(&dev, device), "cuDeviceGet(%d)", device)) < 0)
        return rc;
    if ((rc = check(c, c->ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain(%d)", device)) < 0)
        return rc;
    if ((rc = check(c, c->ctx_set_current(ctx), "cuCtxSetCurrent")) < 0) {
        c->ctx_release(dev);
        return rc;
    }
    c->ctx_device = dev;
    c->ctx = ctx;
    return 0;
}

int wk_cuda_bind(wk_cuda_t *c)
{
    if (c->ctx_device < 0) {
        snprintf(c->error, sizeof(c->error), "no context (wk_cuda_context first)");
        return -EINVAL;
    }
    return check(c, c->ctx_set_current(c->ctx), "cuCtxSetCurrent");
}

int wk_cuda_device_info(wk_cuda_t *c, int *major, int *minor, int *sms)
{
    int rc;

    if (c->ctx_device < 0) {
        snprintf(c->error, sizeof(c->error), "no context (wk_cuda_context first)");
        return -EINVAL;
    }
    if ((rc = check(c, c->device_attribute(major, CU_ATTR_CC_MAJOR, c->ctx_device),
                    "cuDeviceGetAttribute(compute capability major)")) < 0 ||
        (rc = check(c, c->device_attribute(minor, CU_ATTR_CC_MINOR, c->ctx_device),
                    "cuDeviceGetAttribute(compute capability minor)")) < 0 ||
        (rc = check(c, c->device_attribute(sms, CU_ATTR_MULTIPROCESSOR_COUNT, c->ctx_device),
                    "cuDeviceGetAttribute(multiprocessor count)")) < 0)
        return rc;
    return 0;
}

int wk_cuda_device_memory(wk_cuda_t *c, size_t *bytes)
{
    *bytes = 0;
    if (c->ctx_device < 0) {
        snprintf(c->error, sizeof(c->error), "no context (wk_cuda_context first)");
        return -EINVAL;
    }
    return check(c, c->device_total_mem(bytes, c->ctx_device), "cuDeviceTotalMem");
}

int wk_cuda_module_load(wk_cuda_t *c, const void *image, wk_cuda_module *mod)
{
    *mod = NULL;
    return check(c, c->module_load_data(mod, image), "cuModuleLoadData");
}

void wk_cuda_module_unload(wk_cuda_t *c, wk_cuda_module mod)
{
    if (mod)
        c->module_unload(mod);
}

int wk_cuda_function(wk_cuda_t *c, wk_cuda_module mod, const char *name, wk_cuda_function_t *fn)
{
    *fn = NULL;
    return check(c, c->module_get_function(fn, mod, name), "cuModuleGetFunction(%s)", name);
}

int wk_cuda_alloc(wk_cuda_t *c, size_t bytes, wk_cuda_ptr *p)
{
    *p = 0;
    return check(c, c->mem_alloc(p, bytes ? bytes : 1), "cuMemAlloc(%zu bytes)", bytes);
}

void wk_cuda_free(wk_cuda_t *c, wk_cuda_ptr p)
{
    if (p)
        c->mem_free(p);
}

int wk_cuda_upload(wk_cuda_t *c, wk_cuda_ptr dst, const void *src, size_t bytes)
{
    return check(c, c->memcpy_htod(dst, src, bytes), "cuMemcpyHtoD(%zu bytes)", bytes);
}

int wk_cuda_download(wk_cuda_t *c, void *dst, wk_cuda_ptr src, size_t bytes)
{
    return check(c, c->memcpy_dtoh(dst, src, bytes), "cuMemcpyDtoH(%zu bytes)", bytes);
}

int wk_cuda_copy(wk_cuda_t *c, wk_cuda_ptr dst, wk_cuda_ptr src, size_t bytes)
{
    return check(c, c->memcpy_dtod(dst, src, bytes), "cuMemcpyDtoD(%zu bytes)", bytes);
}

int wk_cuda_memset(wk_cuda_t *c, wk_cuda_ptr dst, unsigned char byte, size_t bytes)
{
    return check(c, c->memset_d8(dst, byte, bytes), "cuMemsetD8(0x%02x, %zu bytes)", byte, bytes);
}

int wk_cuda_launch(wk_cuda_t *c, wk_cuda_function_t fn, const unsigned grid[3],
                   const unsigned block[3], unsigned shmem, void **args)
{
    return wk_cuda_launch_on(c, NULL, fn, grid, block, shmem, args);
}

int wk_cuda_launch_on(wk_cuda_t *c, wk_cuda_stream stream, wk_cuda_function_t fn,
                      const unsigned grid[3], const unsigned block[3], unsigned shmem, void **args)
{
    unsigned g[3], b[3];

    for (int i = 0; i < 3; i++) {
        g[i] = grid[i] ? grid[i] : 1;
        b[i] = block[i] ? block[i] : 1;
    }
    return check(
        c, c->launch_kernel(fn, g[0], g[1], g[2], b[0], b[1], b[2], shmem, stream, args, NULL),
        "cuLaunchKernel(grid %u,%u,%u block %u,%u,%u shared %u)", g[0], g[1], g[2], b[0], b[1],
        b[2], shmem);
}

int wk_cuda_sync(wk_cuda_t *c)
{
    return check(c, c->ctx_synchronize(), "cuCtxSynchronize");
}

int wk_cuda_event_create(wk_cuda_t *c, wk_cuda_event *ev)
{
    *ev = NULL;
    return check(c, c->event_create(ev, CU_EVENT_DEFAULT), "cuEventCreate");
}

void wk_cuda_event_destroy(wk_cuda_t *c, wk_cuda_event ev)
{
    if (ev)
        c->event_destroy(ev);
}

int wk_cuda_event_record(wk_cuda_t *c, wk_cuda_event ev)
{
    return wk_cuda_event_record_on(c, ev, NULL);
}

int wk_cuda_event_record_on(wk_cuda_t *c, wk_cuda_event ev, wk_cuda_stream stream)
{
    return check(c, c->event_record(ev, stream), "cuEventRecord");
}

int wk_cuda_event_elapsed(wk_cuda_t *c, wk_cuda_event start, wk_cuda_event end, float *ms)
{
    int rc;

    if ((rc = check(c, c->event_synchronize(end), "cuEventSynchronize")) < 0)
        return rc;
    return check(c, c->event_elapsed(ms, start, end), "cuEventElapsedTime");
}

/* --- streams, IPC, kernel attributes ---------------------------------------- */

int wk_cuda_stream_create(wk_cuda_t *c, wk_cuda_stream *s)
{
    *s = NULL;
    return check(c, c->stream_create(s, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
}

void wk_cuda_stream_destroy(wk_cuda_t *c, wk_cuda_stream s)
{
    if (s)
        c->stream_destroy(s);
}

int wk_cuda_stream_sync(wk_cuda_t *c, wk_cuda_stream s)
{
    return check(c, c->stream_synchronize(s), "cuStreamSynchronize");
}

int wk_cuda_stream_wait(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_event ev)
{
    return check(c, c->stream_wait_event(s, ev, 0), "cuStreamWaitEvent");
}

int wk_cuda_copy_on(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_ptr dst, wk_cuda_ptr src, size_t bytes)
{
    return check(c, c->memcpy_dtod_async(dst, src, bytes, s), "cuMemcpyDtoDAsync(%zu bytes)",
                 bytes);
}

int wk_cuda_upload_on(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_ptr dst, const void *src,
                      size_t bytes)
{
    return check(c, c->memcpy_htod_async(dst, src, bytes, s), "cuMemcpyHtoDAsync(%zu bytes)",
                 bytes);
}

int wk_cuda_memset_on(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_ptr dst, unsigned char byte,
                      size_t bytes)
{
    return check(c, c->memset_d8_async(dst, byte, bytes, s), "cuMemsetD8Async(0x%02x, %zu bytes)",
                 byte, bytes);
}

int wk_cuda_ipc_export(wk_cuda_t *c, wk_cuda_ptr p, struct wk_cuda_ipc_handle *h)
{
    memset(h, 0, sizeof(*h));
    return check(c, c->ipc_get(h, p), "cuIpcGetMemHandle");
}

int wk_cuda_ipc_import(wk_cuda_t *c, const struct wk_cuda_ipc_handle *h, wk_cuda_ptr *p)
{
    *p = 0;
    return check(c, c->ipc_open(p, *h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle");
}

void wk_cuda_ipc_close(wk_cuda_t *c, wk_cuda_ptr p)
{
    if (p)
        c->ipc_close(p);
}

int wk_cuda_function_shared(wk_cuda_t *c, wk_cuda_function_t fn, unsigned bytes)
{
    return check(c, c->func_set_attribute(fn, CU_FUNC_ATTR_MAX_DYNAMIC_SHARED, (int)bytes),
                 "cuFuncSetAttribute(max dynamic shared memory %u bytes)", bytes);
}

void *wk_cuda_nccl_library(const wk_cuda_t *c)
{
    return c->libnccl;
}

void *wk_cuda_cublaslt_library(const wk_cuda_t *c)
{
    return c->libcublaslt;
}
