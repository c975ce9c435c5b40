/* runtime.h - runs one job assignment in a thread of its own.
 *
 * The runtime generates the job's schedule, takes this worker's pipeline
 * rank's ops and walks them once per step with the executor
 * (pipeline/executor.h). On the sim backend compute ops sleep their
 * modelled cost and SEND and RECV move empty tagged messages over the data
 * plane (worker/net/dataplane.h) to the worker of the same dp and ep rank at
 * the op's pipeline rank. On the cpu backend the ops train the job's model
 * for real (worker/rank/rank.h): activations and gradients in the messages,
 * expert exchanges inside the ops, gradient sums and the optimizer step
 * after the walk. Every receive is timed: the transfer time of each
 * message (sent to arrived) and the part of it this rank spent computing
 * rather than waiting give the step's hidden-communication figures.
 *
 * Reports go to the agent as encoded envelopes (proto/envelope.h) on an
 * inproc PAIR socket (wk_runtime_socket): a StepReport after every step,
 * then exactly one JobDone, after which the thread is about to end and
 * wk_runtime_destroy joins it at once. The agent watches the socket from
 * its loop, so the runtime never blocks it.
 */
#ifndef WK_RUNTIME_H
#define WK_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "proto/duplex.pb-c.h"
#include "worker/net/dataplane.h"
#include "worker/backend.h"

/* A RECV that waits longer than this fails the job. */
#define WK_RUNTIME_RECV_TIMEOUT_MS 30000
/* Waits (compute sleeps, receives) check the abort flag this often. */
#define WK_RUNTIME_SLICE_MS 20

struct wk_runtime_opts {
    int recv_timeout_ms; /* 0: WK_RUNTIME_RECV_TIMEOUT_MS */
    const char
        *backend; /* "cpu" / "cuda" train the model (worker/rank/rank.h); NULL or "sim" sleeps */
    const char *data_dir; /* the cpu backend's training text; NULL: train.dataset's */
    wk_gpu_t *gpu;        /* a GPU backend's device (worker/backend.h), the caller's */
    int nccl_timeout_ms;  /* "cuda": how long NCCL waits for the other ranks; 0: the default */
    /* cpu/cuda: the directory the job's checkpoint.dir must lead under
     * (wk_runtime_checkpoint_dir); NULL: the working directory */
    const char *checkpoint_root;
    /* cpu/cuda: what this worker's jobs may use (--memory-limit), 0: no
     * limit; a job needing more than the lesser of it and MemAvailable is
     * refused before anything is allocated (-EDOM) */
    uint64_t memory_limit;
    /* cuda: the GPU's memory (wk_gpu_memory_bytes), 0: unknown; a job
     * whose rank needs more (all of it lives on the GPU), or more than
     * memory_limit when that is less, is refused the same way */
    uint64_t gpu_memory;
    /* cpu/cuda: build the backend (the model: allocation, initialisation,
     * the checkpoint) on the runtime thread, where an abort stops it, and
     * send an AssignmentAck (request id 0; ok, or the refusal with
     * bad_checkpoint / bad_spec) as the first report; a refused job's
     * thread then ends without a JobDone. 0: built in wk_runtime_create,
     * no AssignmentAck (the sim backend always acks at once with ack). */
    int ack;
};

typedef struct wk_runtime wk_runtime_t;

/* Checks the assignment (known schedule, a schedule that can be built for
 * its pp and micro-batches, a peer for every pipeline rank of this
 * worker's dp and ep ranks, when self_id is given that this worker's own
 * ranks name it, and on the cpu and cuda backends that the job's
 * checkpoint.dir leads under the checkpoint root), then starts the
 * thread. The runtime uses `data` (and its sockets) from its thread until
 * wk_runtime_destroy; the caller must not touch it meanwhile. opts may be
 * NULL. Returns 0, or -EINVAL with the reason in err (fit for
 * AssignmentAck.error), -EUCLEAN when the checkpoint the assignment starts
 * from is missing, torn or does not fit (AssignmentAck.bad_checkpoint),
 * -EDOM when the job's own inputs are at fault, not this worker (its
 * train.dataset or checkpoint.dir: AssignmentAck.bad_spec), or -errno. */
int wk_runtime_create(void *zctx, wk_net_t *data, const Duplex__Assignment *a, const char *self_id,
                      const struct wk_runtime_opts *opts, wk_runtime_t **out, char *err,
                      size_t errlen);

/* Where a job's checkpoint.dir puts checkpoints on this worker: a relative
 * dir is taken from root; then the path, with the symbolic links of the
 * part that exists resolved (realpath; the rest is what mkdir -p would
 * create), must lie under root (resolved the same way), and no component
 * may be "..". out gets that absolute path. 0, or -EINVAL (outside the
 * root, or ".."), -ENAMETOOLONG or -errno (root or dir cannot be
 * resolved), with the reason in err naming checkpoint.dir and the root. */
int wk_runtime_checkpoint_dir(const char *root, const char *dir, char *out, size_t outlen,
                              char *err, size_t errlen);

/* MemAvailable of /proc/meminfo in bytes; 0 when it cannot be read. */
uint64_t wk_runtime_memory_available(void);

/* Stops the job soon (between ops, or within WK_RUNTIME_SLICE_MS of a
 * wait): its JobDone says ok=false with `error` as the reason. The first
 * call's text wins. Thread-safe. */
void wk_runtime_abort(wk_runtime_t *rt, const char *error);

/* The socket the reports arrive on (owned by the runtime). */
void *wk_runtime_socket(wk_runtime_t *rt);

uint64_t wk_runtime_job(const wk_runtime_t *rt);
uint32_t wk_runtime_attempt(const wk_runtime_t *rt);

/* The step being run (1-based; 1 from create on); the last one run once
 * the job ended. */
uint64_t wk_runtime_step(const wk_runtime_t *rt);

/* Aborts the job if it still runs, joins the thread and frees everything.
 * The data plane is the caller's again afterwards. */
void wk_runtime_destroy(wk_runtime_t *rt);

#endif
