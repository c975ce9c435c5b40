/* cuda.h - the cuda backend's GPU stack, opened at run time.
 *
 * duplex has no link-time dependency on CUDA: the driver (libcuda.so.1,
 * entry points through cuGetProcAddress), NCCL (libnccl.so.2) and
 * cuBLASLt (libcublasLt.so) are opened with dlopen when a worker starts
 * with --backend cuda, each path overridable. On a machine without them the
 * worker refuses to start with a message naming every piece that is
 * missing; nothing else needs them.
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

#endif
