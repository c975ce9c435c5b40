/* main.c - duplex-worker: flags and config, then the agent loop. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/opts.h"
#include "common/version.h"
#include "proto/envelope.h"
#include "worker/agent.h"
#include "worker/dataplane.h"

#define DEFAULT_COORDINATOR "tcp://127.0.0.1:7700"

static char *opt_config, *opt_coordinator, *opt_backend, *opt_id, *opt_host, *opt_node,
    *opt_data_listen, *opt_log_level;
static int opt_gpu;

static const struct dx_opt options[] = {
    {"config", DX_OPT_STRING, &opt_config, NULL, 0, 0, 0, "FILE",
     "JSON file of option names to values (flags win)"},
    {"coordinator", DX_OPT_STRING, &opt_coordinator, NULL, 0, 0, 0, "ADDR",
     "duplexd endpoint (default $DUPLEX_COORDINATOR, then " DEFAULT_COORDINATOR ")"},
    {"backend", DX_OPT_STRING, &opt_backend, "cpu", 0, 0, 0, "NAME", "sim, cpu or cuda"},
    {"id", DX_OPT_STRING, &opt_id, NULL, 0, 0, 0, "ID",
     "worker id, unique in the cluster (default HOST-gpuN)"},
    {"host", DX_OPT_STRING, &opt_host, NULL, 0, 0, 0, "NAME", "host name (default: this host)"},
    {"node", DX_OPT_STRING, &opt_node, NULL, 0, 0, 0, "NAME",
     "node / NVLink domain used by placement (default: the host name)"},
    {"gpu", DX_OPT_INT, &opt_gpu, NULL, 0, 0, 1023, "N", "local GPU index"},
    {"data-listen", DX_OPT_STRING, &opt_data_listen, WK_DATA_LISTEN_DEFAULT, 0, 0, 0, "ADDR",
     "data-plane endpoint to bind (PULL); with 0.0.0.0 or * the --host name is advertised"},
    {"log-level", DX_OPT_STRING, &opt_log_level, "info", 0, 0, 0, "LEVEL",
     "debug, info, warn or error"},
    {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
};

static const struct dx_cli cli = {
    .prog = "duplex-worker",
    .synopsis = "duplex-worker [options]\n\nThe duplex worker daemon, one per GPU.",
    .version = DX_VERSION " (protocol " DX_STRINGIFY(DX_PROTOCOL_VERSION) ")",
    .log_level = &opt_log_level,
};

int main(int argc, char **argv)
{
    struct wk_agent_config cfg;
    wk_agent_t *agent = NULL;
    char hostname[HOST_NAME_MAX + 1];
    char default_id[HOST_NAME_MAX + 32];
    const char *coordinator;
    char err[512];
    int status;

    dx_log_init("duplex-worker", DX_LOG_INFO);
    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = EXIT_FAILURE;
    if (gethostname(hostname, sizeof(hostname)) < 0)
        snprintf(hostname, sizeof(hostname), "localhost");
    hostname[sizeof(hostname) - 1] = '\0';
    snprintf(default_id, sizeof(default_id), "%s-gpu%d", opt_host ? opt_host : hostname, opt_gpu);
    coordinator = opt_coordinator ? opt_coordinator : getenv("DUPLEX_COORDINATOR");

    cfg = (struct wk_agent_config){
        .coordinator = coordinator && coordinator[0] ? coordinator : DEFAULT_COORDINATOR,
        .id = opt_id ? opt_id : default_id,
        .host = opt_host ? opt_host : hostname,
        .node = opt_node ? opt_node : (opt_host ? opt_host : hostname),
        .gpu = opt_gpu,
        .backend = opt_backend,
        .data_listen = opt_data_listen,
    };
    if (dx_worker_id_check(cfg.id, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplex-worker: --id: %s\n", err);
        goto out;
    }
    if (wk_agent_create(&cfg, &agent, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplex-worker: %s\n", err);
        goto out;
    }
    status = wk_agent_run(agent);
    wk_agent_destroy(agent);
out:
    dx_opts_free(options);
    return status;
}
