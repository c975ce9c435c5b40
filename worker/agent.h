/* agent.h - the worker's control plane: registration with duplexd,
 * heartbeats, re-registration when duplexd restarts, job assignments and
 * aborts, and a clean goodbye.
 *
 * The agent owns a libuv loop, a DEALER socket connected to duplexd and the
 * worker's data plane (worker/net/dataplane.h), whose address it registers. It
 * never blocks on compute: an assignment runs in a runtime thread
 * (worker/runtime.h) whose reports the agent forwards to duplexd.
 */
#ifndef WK_AGENT_H
#define WK_AGENT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "proto/cert.h"
#include "worker/backend.h"

struct wk_agent_config {
    const char *coordinator; /* duplexd's ZeroMQ endpoint */
    const char *id;          /* worker id, unique in the cluster */
    const char *host;
    const char *node; /* node / NVLink domain for placement */
    int gpu;
    const char *backend;        /* "sim", "cpu" or "cuda" (wk_backend_names) */
    const char *data_listen;    /* data-plane bind endpoint; NULL: WK_NET_LISTEN_DEFAULT */
    struct wk_device_libs libs; /* a GPU backend's libraries (worker/backend.h) */
    int nccl_timeout_ms;        /* backend cuda: NCCL's wait for the other ranks; 0: default */
    /* where jobs' checkpoint.dir must lead (worker/runtime.h); NULL: the cwd */
    const char *checkpoint_root;
    /* what this worker's jobs may use, in bytes (--memory-limit); 0: on cpu
     * and sim MemAvailable, on cuda the GPU's total memory. Sent in
     * Register.memory_bytes (for duplexd's admission, coordinator/admit.h)
     * and checked before a job's model is allocated (worker/runtime.h) */
    uint64_t memory_limit;
    /* CURVE: this worker's secret certificate and duplexd's public key (Z85);
     * both NULL: talk in clear (--insecure). The data plane uses the same
     * keypair, and accepts only the current assignment's peers. */
    const struct dx_cert *key;
    const char *server_key;
};

typedef struct wk_agent wk_agent_t;

/* Reports kept for duplexd until it acknowledges them (a few hours of
 * steps of one job); past this the oldest are dropped. */
#define WK_AGENT_OUTBOX_MAX 65536

/* Exit statuses of wk_agent_run beyond 0 (stopped by a signal). */
#define WK_EXIT_REFUSED 4  /* duplexd refused the registration itself */
#define WK_EXIT_GPU_LOST 5 /* a kernel fault left the GPU's context unusable */

int wk_agent_create(const struct wk_agent_config *cfg, wk_agent_t **out, char *err, size_t errlen);

/* Serves until SIGTERM/SIGINT (returns 0; a running job is aborted and
 * reported failed with "worker stopping" first), until duplexd refuses the
 * registration (WK_EXIT_REFUSED), or, on the cuda backend, after a job whose
 * kernel fault left the GPU's context unusable (WK_EXIT_GPU_LOST: its
 * JobDone and a Goodbye are sent first; the service manager restarts the
 * worker with a fresh context). */
int wk_agent_run(wk_agent_t *a);

void wk_agent_destroy(wk_agent_t *a);

/* The agent's event loop (e.g. for a systemd watchdog timer). */
uv_loop_t *wk_agent_loop(wk_agent_t *a);

/* The data-plane endpoint sent in Register.data_addr. */
const char *wk_agent_data_addr(const wk_agent_t *a);

#endif
