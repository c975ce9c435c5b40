/* main.c - duplexctl: global options, then one command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/opts.h"
#include "common/version.h"
#include "ctl/ctl.h"
#include "proto/cert.h"
#include "proto/envelope.h"

struct ctl_command {
    const char *name;
    ctl_command_fn fn;
    const char *summary;
};

static const struct ctl_command commands[] = {
    {"workers", ctl_cmd_workers, "list the cluster's workers [--json]; workers forget WORKER"},
    {"local", ctl_cmd_local, "start (up) or stop (down) a one-machine cluster"},
    {"plan", ctl_cmd_plan, "print a pipeline schedule: timeline, ops, JSON or SVG"},
    {"place", ctl_cmd_place, "run the expert placement (EPLB) on a loads file"},
    {"submit", ctl_cmd_submit, "submit a job spec (--dry-run: show its plan)"},
    {"status", ctl_cmd_status, "jobs, or one job in detail [--json] [--watch]"},
    {"events", ctl_cmd_events, "the event log, of all or of one job [--follow]"},
    {"cancel", ctl_cmd_cancel, "stop a job on every worker"},
    {"keys", ctl_cmd_keys, "make a CURVE keypair for duplexd, a worker or a user (keys gen)"},
    {"drain", ctl_cmd_drain, "take a worker out of placement (its job goes on)"},
    {"undrain", ctl_cmd_undrain, "put a drained worker back"},
    {NULL, NULL, NULL},
};

static char *opt_coordinator, *opt_key, *opt_server_key, *opt_config;
static int opt_timeout_s;
static bool opt_insecure;

static const struct dx_opt options[] = {
    {"coordinator", DX_OPT_STRING, &opt_coordinator, NULL, 0, 0, 0, "ADDR",
     "duplexd endpoint (default $DUPLEX_COORDINATOR, then " CTL_DEFAULT_COORDINATOR ")"},
    {"timeout", DX_OPT_INT, &opt_timeout_s, NULL, CTL_DEFAULT_TIMEOUT_S, 1, 3600, "SECONDS",
     "how long to wait for duplexd to answer"},
    {"key", DX_OPT_STRING, &opt_key, NULL, 0, 0, 0, "FILE",
     "our secret CURVE certificate (default $" DX_CERT_KEY_ENV ", then " CTL_LOCAL_DEFAULT_DIR
     "/" CTL_LOCAL_KEYS "/" CTL_LOCAL_OPERATOR_KEY ".key_secret when it exists)"},
    {"server-key", DX_OPT_STRING, &opt_server_key, NULL, 0, 0, 0, "FILE",
     "duplexd's public certificate (default $" DX_CERT_SERVER_KEY_ENV
     ", then " CTL_LOCAL_DEFAULT_DIR "/" CTL_LOCAL_KEYS "/" CTL_LOCAL_SERVER_KEY
     ".key when it exists)"},
    {"insecure", DX_OPT_FLAG, &opt_insecure, NULL, 0, 0, 0, NULL,
     "without keys, talk to duplexd in clear"},
    {"config", DX_OPT_STRING, &opt_config, NULL, 0, 0, 0, "FILE",
     "a JSON object of these options' names to values (flags win)"},
    {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
};

void ctl_globals_override(struct ctl_globals *g, const char *coordinator, int timeout_s)
{
    if (coordinator)
        snprintf(g->coordinator, sizeof(g->coordinator), "%s", coordinator);
    if (timeout_s > 0)
        g->timeout_s = timeout_s;
}

/* The flag, else the environment, else a local cluster's keys (only when
 * neither the flag nor the environment names any key). */
static void ctl_resolve_keys(struct ctl_globals *g, const char *key, const char *server_key)
{
    const char *env_key = getenv(DX_CERT_KEY_ENV), *env_server = getenv(DX_CERT_SERVER_KEY_ENV);
    char op_pub[1024], op_sec[1024], srv_pub[1024], srv_sec[1024];

    if (!key && env_key && env_key[0])
        key = env_key;
    if (!server_key && env_server && env_server[0])
        server_key = env_server;
    if (!key && !server_key && !g->insecure) {
        ctl_keys_paths(CTL_LOCAL_DEFAULT_DIR "/" CTL_LOCAL_KEYS, CTL_LOCAL_OPERATOR_KEY, op_pub,
                       sizeof(op_pub), op_sec, sizeof(op_sec));
        ctl_keys_paths(CTL_LOCAL_DEFAULT_DIR "/" CTL_LOCAL_KEYS, CTL_LOCAL_SERVER_KEY, srv_pub,
                       sizeof(srv_pub), srv_sec, sizeof(srv_sec));
        if (access(op_sec, R_OK) == 0 && access(srv_pub, R_OK) == 0) {
            key = op_sec;
            server_key = srv_pub;
        }
    }
    snprintf(g->key, sizeof(g->key), "%s", key ? key : "");
    snprintf(g->server_key, sizeof(g->server_key), "%s", server_key ? server_key : "");
}

static void usage(FILE *out)
{
    dx_opts_usage(out,
                  "duplexctl [options] COMMAND [command options]\n\nControls a duplex cluster.",
                  options);
    fprintf(out, "\ncommands:\n");
    for (const struct ctl_command *c = commands; c->name; c++)
        fprintf(out, "  %-26s %s\n", c->name, c->summary);
    fprintf(out, "  %-26s %s\n", "help", "show this help");
    fprintf(out, "\n`duplexctl COMMAND --help` describes a command's options.\n");
}

static const struct dx_cli cli = {
    .prog = "duplexctl",
    .version = DX_VERSION " (protocol " DX_STRINGIFY(DX_PROTOCOL_VERSION) ")",
    .usage = usage,
};

int main(int argc, char **argv)
{
    struct ctl_globals g = {0};
    const char *env;
    int next, status;

    dx_log_init("duplexctl", DX_LOG_WARN);
    if (!dx_opts_cli(options, &cli, argc, argv, &next, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (next >= argc) {
        usage(stderr);
        goto out;
    }
    env = getenv("DUPLEX_COORDINATOR");
    snprintf(g.coordinator, sizeof(g.coordinator), "%s",
             opt_coordinator ? opt_coordinator
             : env && env[0] ? env
                             : CTL_DEFAULT_COORDINATOR);
    g.timeout_s = opt_timeout_s;
    g.insecure = opt_insecure;
    ctl_resolve_keys(&g, opt_key, opt_server_key);

    if (strcmp(argv[next], "help") == 0) {
        usage(stdout);
        status = CTL_EXIT_OK;
        goto out;
    }
    for (const struct ctl_command *c = commands; c->name; c++) {
        if (strcmp(argv[next], c->name) == 0) {
            status = c->fn(&g, argc - next, argv + next);
            goto out;
        }
    }
    fprintf(stderr, "duplexctl: unknown command \"%s\" (see duplexctl help)\n", argv[next]);
out:
    dx_opts_free(options);
    return status;
}
