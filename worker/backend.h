/* backend.h - the backends a worker can run, in one table: each one's name,
 * the capabilities it registers with, whether its compute ops train the
 * job's model or sleep their modelled cost, whether it runs on a GPU, and
 * the ops of its engine (one job attempt's compute, driven by the runtime's
 * executor walk, worker/runtime.c) and, for one that runs on a GPU, the ops
 * that open and close its device (the worker's control plane, worker/agent.c,
 * calls nothing of worker/cuda/ itself). Looked up by name with
 * wk_backend_find; no other code compares backend names.
 *
 *   sim   worker/sim/     sleeps each op's cost, sends empty messages
 *   cpu   worker/rank/    the rank trainer on the host
 *   cuda  worker/rank/    the rank trainer on its GPU (worker/cuda/; the
 *                         device: worker/cuda/device.h)
 */
#ifndef WK_BACKEND_H
#define WK_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/ckpt.h"
#include "pipeline/schedule.h"
#include "worker/net/dataplane.h"

typedef struct wk_gpu wk_gpu_t;
struct wk_job;
struct wk_rank_step;

/* How an engine moves messages and waits: the runtime's (its abort flag,
 * timeouts and the time accounting). A failing send or recv leaves its
 * reason in the err buffer of the engine call it came from (`to`/`from`
 * name the peer). Each returns 0 or -errno. */
struct wk_engine_io {
    int (*send)(void *arg, const char *addr, const struct wk_net_key *key, const void *buf,
                size_t len, const char *to);
    int (*recv)(void *arg, const struct wk_net_key *key, const char *from, struct wk_net_msg **out);
    int (*sleep)(void *arg, double ms); /* -ECANCELED when the job is aborted */
    void *arg;
};

/* What an engine is built from: valid while create runs (an engine keeps
 * copies of what it needs). */
struct wk_engine_args {
    const struct wk_job *job; /* the Assignment, decoded and checked (worker/job.h) */
    const void *impl;         /* the backend's (struct wk_backend.impl) */
    const dp_sched_t *sched;  /* the job's schedule */
    const char *data_dir;     /* the training text */
    wk_gpu_t *gpu;            /* the GPU of a backend that has one, else NULL */
    int nccl_timeout_ms;      /* > 0 */
    const struct wk_engine_io *io;
};

/* One engine's ops. Calls with err fill it with the reason on failure and
 * return 0 or -errno; -EUCLEAN from create: the checkpoint it was to load
 * is at fault, not the worker. checkpoint is NULL for an engine that keeps
 * no state; abort may be called from any thread. */
struct wk_backend_ops {
    int (*create)(const struct wk_engine_args *args, void **engine, char *err, size_t errlen);
    void (*destroy)(void *engine);
    uint64_t (*start_step)(const void *engine); /* the step it resumes after; 0: fresh */
    size_t (*max_msg)(const void *engine);      /* the largest payload it receives */
    void (*step_begin)(void *engine, uint64_t step);
    int (*compute)(void *engine, const struct dp_op *op, char *err, size_t errlen);
    int (*send)(void *engine, const struct dp_op *op, char *err, size_t errlen);
    int (*recv)(void *engine, const struct dp_op *op, char *err, size_t errlen);
    int (*step_end)(void *engine, struct wk_rank_step *out, char *err, size_t errlen);
    int (*checkpoint)(void *engine, const char *root, uint64_t step, char *dir, size_t dirlen,
                      struct dx_ckpt_shard_info *info, char *err, size_t errlen);
    void (*abort)(void *engine);
};

/* Where a device backend's libraries are (duplex-worker's --cuda-lib,
 * --nccl-lib, --cublaslt-lib); NULL takes the default below, found on the
 * dynamic loader's search path. The names are worker/cuda/driver.h's
 * WK_*_LIB_DEFAULT (tests/unit/test_backend.c checks they agree). */
#define WK_DEVICE_CUDA_LIB_DEFAULT "libcuda.so.1"
#define WK_DEVICE_NCCL_LIB_DEFAULT "libnccl.so.2"
#define WK_DEVICE_CUBLASLT_LIB_DEFAULT "libcublasLt.so"

struct wk_device_libs {
    const char *cuda, *nccl, *cublaslt;
};

/* What a backend's device is opened from. */
struct wk_device_config {
    int gpu; /* which of the host's GPUs (--gpu) */
    struct wk_device_libs libs;
};

/* What open says of the device it opened. */
struct wk_device_info {
    /* its total memory in bytes; 0: the driver could not say, why in
     * memory_error */
    uint64_t memory;
    char memory_error[256];
    /* one line for the log: "driver 13.0, 1 device (NVIDIA H200), NCCL
     * 2.27.3, cuBLASLt 13.0.0; kernels: routing cubin, ..." */
    char describe[1024];
};

/* A backend's device: the worker opens it once, at start, on the agent's
 * thread (the runtime's thread binds it too), lends the handle to each
 * job's engine (struct wk_engine_args.gpu) and closes it on the way out. */
struct wk_backend_device_ops {
    /* Opens the device's libraries and cfg->gpu: 0, or -errno with the
     * reason in err (every missing piece named; cuda: -ENOENT, -ENODEV,
     * -ENOTSUP or -EIO). */
    int (*open)(const struct wk_device_config *cfg, wk_gpu_t **gpu, struct wk_device_info *info,
                char *err, size_t errlen);
    /* NULL, or why the device became unusable for good (cuda: a kernel's
     * fault left its context sticky-failed): the worker must exit after
     * the job and be started again. NULL gpu: NULL. */
    const char *(*lost)(const wk_gpu_t *gpu);
    /* Makes the device current on the calling thread (a job's thread,
     * before its engine runs): 0, or -errno with the reason in err. */
    int (*bind)(wk_gpu_t *gpu, char *err, size_t errlen);
    void (*close)(wk_gpu_t *gpu); /* NULL is ignored */
};

struct wk_backend {
    const char *name;
    const char *const *capabilities; /* NULL-terminated, sent in Register */
    bool trains;                     /* false: compute ops sleep (sim) */
    bool gpu;                        /* the engine runs on the worker's GPU */
    const struct wk_backend_ops *ops;
    /* what ops->create is given as wk_engine_args.impl: the cpu and cuda
     * backends' rank trainer takes its engine (worker/rank/trainer.h) */
    const void *impl;
    /* the device a gpu backend opens (worker/cuda/device.h); NULL without one */
    const struct wk_backend_device_ops *device;
};

/* The backend called name, or NULL for one this build does not know. */
const struct wk_backend *wk_backend_find(const char *name);

/* Every backend of the table, in its order: "sim, cpu or cuda", for help
 * texts and errors (built on the first call; any thread). */
const char *wk_backend_names(void);

#endif
