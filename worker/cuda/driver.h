/* driver.h - the cuda backend's GPU stack, opened at run time.
 *
 * duplex has no link-time dependency on CUDA: the driver (libcuda.so.1,
 * entry points through cuGetProcAddress), NCCL (libnccl.so.2) and
 * cuBLASLt (libcublasLt.so) are opened with dlopen when a worker starts
 * with --backend cuda, each path overridable. On a machine without them the
 * worker refuses to start with a message naming every piece that is
 * missing; nothing else needs them.
 *
 * Past the open, a small driver API for tools that run the kernels
 * (tests/gpu/gpucheck.c): the device's primary context, modules from an
 * image (cubin or PTX), functions, device memory, launches and event
 * timing. Those calls return 0 or -EIO (-EINVAL for bad arguments) and
 * leave "cuMemAlloc(1048576 bytes): out of memory (CUDA error 2)" in
 * wk_cuda_error(c): the driver call and the CUDA error string.
 */
#ifndef WK_CUDA_H
#define WK_CUDA_H

#include <stddef.h>

#define WK_CUDA_LIB_DEFAULT "libcuda.so.1"
#define WK_NCCL_LIB_DEFAULT "libnccl.so.2"
#define WK_CUBLASLT_LIB_DEFAULT "libcublasLt.so"

/* Where the libraries are; NULL takes the default (the dynamic loader's
 * search path). */
struct wk_cuda_paths {
    const char *cuda, *nccl, *cublaslt;
    /* open the driver only: NCCL and cuBLASLt are neither opened nor
     * required (a tool that only launches the project's kernels) */
    int driver_only;
};

typedef struct wk_cuda wk_cuda_t;

/* Opens the three libraries, resolves what the backend uses, initialises
 * the driver and counts the devices. Returns 0, or -ENOENT / -ENODEV with
 * err listing each missing piece ("libcuda.so.1 (the NVIDIA driver): ...;
 * no CUDA device"). */
int wk_cuda_open(const struct wk_cuda_paths *paths, wk_cuda_t **out, char *err, size_t errlen);
void wk_cuda_close(wk_cuda_t *c);

/* "driver 13.0, 1 device (NVIDIA H200), NCCL 2.27.3, cuBLASLt 13.0.0". */
const char *wk_cuda_describe(const wk_cuda_t *c);

/* The driver's handles: CUdeviceptr, CUmodule, CUfunction, CUevent. */
typedef unsigned long long wk_cuda_ptr;
typedef struct wk_cuda_module_s *wk_cuda_module;
typedef struct wk_cuda_function_s *wk_cuda_function_t;
typedef struct wk_cuda_event_s *wk_cuda_event;
/* CUstream (cudaStream_t to NCCL and cuBLASLt); NULL is the default stream */
typedef struct wk_cuda_stream_s *wk_cuda_stream;
/* CUipcMemHandle: 64 opaque bytes another process of the node can open */
struct wk_cuda_ipc_handle {
    unsigned char bytes[64];
};

/* The last failed call and its CUDA error string ("" when none). */
const char *wk_cuda_error(const wk_cuda_t *c);
/* NULL, or the first error that left the context unusable (a kernel's
 * fault: illegal address, launch failure, ...): the process must end to
 * get a working GPU again. */
const char *wk_cuda_lost(const wk_cuda_t *c);

/* Makes device's primary context current on the calling thread (retained
 * until wk_cuda_close). Everything below needs it. */
int wk_cuda_context(wk_cuda_t *c, int device);
/* Makes the context wk_cuda_context retained current on the calling thread
 * too (a worker's runtime thread). */
int wk_cuda_bind(wk_cuda_t *c);
/* The current device's compute capability and multiprocessor count. */
int wk_cuda_device_info(wk_cuda_t *c, int *major, int *minor, int *sms);
/* The current device's total memory in bytes (cuDeviceTotalMem: the
 * stable figure, not what is free now, which other processes change). */
int wk_cuda_device_memory(wk_cuda_t *c, size_t *bytes);

/* cuModuleLoadData: image is a cubin or a NUL-terminated PTX text. */
int wk_cuda_module_load(wk_cuda_t *c, const void *image, wk_cuda_module *mod);
void wk_cuda_module_unload(wk_cuda_t *c, wk_cuda_module mod);
int wk_cuda_function(wk_cuda_t *c, wk_cuda_module mod, const char *name, wk_cuda_function_t *fn);

int wk_cuda_alloc(wk_cuda_t *c, size_t bytes, wk_cuda_ptr *p);
void wk_cuda_free(wk_cuda_t *c, wk_cuda_ptr p); /* 0 is ignored */
int wk_cuda_upload(wk_cuda_t *c, wk_cuda_ptr dst, const void *src, size_t bytes);
int wk_cuda_download(wk_cuda_t *c, void *dst, wk_cuda_ptr src, size_t bytes);
int wk_cuda_copy(wk_cuda_t *c, wk_cuda_ptr dst, wk_cuda_ptr src, size_t bytes);
int wk_cuda_memset(wk_cuda_t *c, wk_cuda_ptr dst, unsigned char byte, size_t bytes);

/* cuLaunchKernel on the default stream: grid and block are x, y, z (0 is
 * taken as 1); args points at each argument's value, as the driver wants. */
int wk_cuda_launch(wk_cuda_t *c, wk_cuda_function_t fn, const unsigned grid[3],
                   const unsigned block[3], unsigned shmem, void **args);
/* Waits for everything launched; a kernel's fault shows up here. */
int wk_cuda_sync(wk_cuda_t *c);

int wk_cuda_event_create(wk_cuda_t *c, wk_cuda_event *ev);
void wk_cuda_event_destroy(wk_cuda_t *c, wk_cuda_event ev);
/* Records ev on the default stream. */
int wk_cuda_event_record(wk_cuda_t *c, wk_cuda_event ev);
/* Waits for end, then the milliseconds from start to end. */
int wk_cuda_event_elapsed(wk_cuda_t *c, wk_cuda_event start, wk_cuda_event end, float *ms);

/* The same on a stream (NULL: the default stream). */
int wk_cuda_launch_on(wk_cuda_t *c, wk_cuda_stream stream, wk_cuda_function_t fn,
                      const unsigned grid[3], const unsigned block[3], unsigned shmem, void **args);
int wk_cuda_event_record_on(wk_cuda_t *c, wk_cuda_event ev, wk_cuda_stream stream);

/* Streams: created non-blocking (they do not wait for the default stream).
 * stream_wait makes s wait for ev's work without blocking the host. */
int wk_cuda_stream_create(wk_cuda_t *c, wk_cuda_stream *s);
void wk_cuda_stream_destroy(wk_cuda_t *c, wk_cuda_stream s);
int wk_cuda_stream_sync(wk_cuda_t *c, wk_cuda_stream s);
int wk_cuda_stream_wait(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_event ev);
int wk_cuda_copy_on(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_ptr dst, wk_cuda_ptr src, size_t bytes);
int wk_cuda_memset_on(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_ptr dst, unsigned char byte,
                      size_t bytes);
/* An upload in s's order, from pageable memory: src may be reused as soon
 * as the call returns (the driver stages it), the copy lands in order. */
int wk_cuda_upload_on(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_ptr dst, const void *src,
                      size_t bytes);

/* CUDA IPC: export an allocation's handle (p must be the start of a
 * wk_cuda_alloc), open one from another process (peer access enabled
 * lazily), close what import opened. */
int wk_cuda_ipc_export(wk_cuda_t *c, wk_cuda_ptr p, struct wk_cuda_ipc_handle *h);
int wk_cuda_ipc_import(wk_cuda_t *c, const struct wk_cuda_ipc_handle *h, wk_cuda_ptr *p);
void wk_cuda_ipc_close(wk_cuda_t *c, wk_cuda_ptr p);

/* Lets fn use more than 48 KiB of dynamic shared memory. */
int wk_cuda_function_shared(wk_cuda_t *c, wk_cuda_function_t fn, unsigned bytes);

/* The dlopen handles of NCCL and cuBLASLt (NULL with driver_only), for
 * worker/cuda/comm/nccl.c and worker/gemm.c to resolve their entry points. */
void *wk_cuda_nccl_library(const wk_cuda_t *c);
void *wk_cuda_cublaslt_library(const wk_cuda_t *c);

#endif
