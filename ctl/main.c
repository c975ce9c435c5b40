/* main.c - duplexctl: global options, then one command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/opts.h"
#include "common/version.h"
#include "ctl/ctl.h"
#include "proto/envelope.h"

struct ctl_command {
    const char *name;
    ctl_command_fn fn;
    const char *summary;
};

static const struct ctl_command commands[] = {
    {"workers", ctl_cmd_workers, "list the cluster's workers [--json]"},
    {"local", ctl_cmd_local, "start (up) or stop (down) a one-machine cluster"},
    {"plan", ctl_cmd_plan, "print a pipeline schedule: timeline, ops, JSON or SVG"},
    {"place", ctl_cmd_place, "run the expert placement (EPLB) on a loads file"},
    {"submit", ctl_cmd_submit, "submit a job spec (--dry-run: show its plan)"},
    {"status", ctl_cmd_status, "jobs, or one job in detail [--json] [--watch]"},
    {"events", ctl_cmd_events, "the event log, of all or of one job [--follow]"},
    {"cancel", ctl_cmd_cancel, "stop a job on every worker"},
    {"drain", ctl_cmd_drain, "take a worker out of placement (its job goes on)"},
    {"undrain", ctl_cmd_undrain, "put a drained worker back"},
    {NULL, NULL, NULL},
};

static char *opt_coordinator;
static int opt_timeout_s;

static const struct dx_opt options[] = {
    {"coordinator", DX_OPT_STRING, &opt_coordinator, NULL, 0, 0, 0, "ADDR",
     "duplexd endpoint (default $DUPLEX_COORDINATOR, then " CTL_DEFAULT_COORDINATOR ")"},
    {"timeout", DX_OPT_INT, &opt_timeout_s, NULL, CTL_DEFAULT_TIMEOUT_S, 1, 3600, "SECONDS",
     "how long to wait for duplexd to answer"},
    {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
};

void ctl_globals_override(struct ctl_globals *g, const char *coordinator, int timeout_s)
{
    if (coordinator)
        snprintf(g->coordinator, sizeof(g->coordinator), "%s", coordinator);
    if (timeout_s > 0)
        g->timeout_s = timeout_s;
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
