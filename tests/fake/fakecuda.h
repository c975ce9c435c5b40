/* fakecuda.h - the kernels of libfakecuda.so (tests/fake/fakecuda.c): a
 * kernel is a host function registered under the CUDA kernel's name, run by
 * the fake's stream threads with the launch's grid and its argument values
 * (args[i] points at argument i, as cuLaunchKernel's params). */
#ifndef DX_FAKECUDA_H
#define DX_FAKECUDA_H

#include <stddef.h>

#define FAKECUDA_DEVICE_NAME "duplex fake GPU"
/* Each device's memory (cuDeviceTotalMem), in bytes: FAKECUDA_MEMORY_BYTES
 * in the environment, else 80 GiB. A process's cuMemAlloc fails with
 * CUDA_ERROR_OUT_OF_MEMORY past it (what cuIpcOpenMemHandle maps is the
 * exporter's and does not count). */
#define FAKECUDA_MEMORY_ENV "FAKECUDA_MEMORY_BYTES"
#define FAKECUDA_MEMORY_DEFAULT (80ull << 30)
/* Set (to anything): cuModuleLoadData takes only what a real driver might,
 * a cubin (an ELF image) or PTX text (with a .version directive), and
 * fails with CUDA_ERROR_INVALID_IMAGE on anything else (a build without
 * nvcc's placeholders). Unset, module images are accepted as they are. */
#define FAKECUDA_STRICT_IMAGES_ENV "FAKECUDA_STRICT_IMAGES"
#define FAKECUDA_MAX_ARGS 24

struct fake_grid {
    unsigned grid[3], block[3];
    unsigned shmem;
};

struct fake_kernel {
    const char *name;
    int nargs;
    size_t arg_size[FAKECUDA_MAX_ARGS]; /* bytes of each argument's value */
    /* 0, or nonzero for a fault: the context's later calls then fail with
     * CUDA_ERROR_LAUNCH_FAILED, as after a kernel fault on a GPU */
    int (*run)(const struct fake_grid *g, void **args);
};

/* The kernel registered under name, or NULL (tests/fake/fake_kernels.c). */
const struct fake_kernel *fake_kernel_find(const char *name);
/* The i-th registered kernel, or NULL past the last: exported, so a test can
 * check every argument list against the kernels' PTX. */
const struct fake_kernel *fakecuda_kernel(int i);

/* Queues fn(arg) on a stream of the fake driver (NULL: the default stream),
 * in order with its launches; a nonzero return is a fault, as for a kernel
 * (tests/fake/fakenccl.c runs its communication this way). 0 or -ENOMEM. */
int fake_stream_host(void *stream, int (*fn)(void *arg), void *arg);
/* Waits for every stream's queued work (what cuCtxSynchronize does). */
void fake_sync_all(void);
/* The device whose primary context this process retained last, or -1. */
int fake_current_device(void);
/* One round of a wait for another thread or process (a ring's credit, a
 * peer's rendezvous): *tries counts the rounds of this wait (start it at 0).
 * A GPU's spinning block costs only its own SM; here a spinning thread
 * takes a CPU from the very process it waits for (the tests run several
 * workers on two cores), so after a few sched_yield()s it sleeps, 20 us at
 * first, doubling up to 200 us. The wait's result is the same, only its
 * CPU cost differs. */
void fake_backoff(unsigned *tries);

#endif
