/* workers.c - `duplexctl workers`: the cluster's workers as a table or JSON. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/opts.h"
#include "ctl/client.h"
#include "ctl/ctl.h"

static const char *activity_name(Duplex__WorkerActivity a)
{
    switch (a) {
    case DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE:
        return "idle";
    case DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY:
        return "busy";
    default:
        return "unknown";
    }
}

static void format_age(int64_t ms, char *buf, size_t len)
{
    if (ms < 0)
        snprintf(buf, len, "-");
    else if (ms < 10000)
        snprintf(buf, len, "%.1fs", ms / 1000.0);
    else if (ms < 120000)
        snprintf(buf, len, "%llds", (long long)(ms / 1000));
    else if (ms < 7200000)
        snprintf(buf, len, "%lldm", (long long)(ms / 60000));
    else
        snprintf(buf, len, "%lldh", (long long)(ms / 3600000));
}

static void print_table(const struct ctl_workers *r)
{
    if (r->n == 0) {
        printf("no workers registered\n");
        return;
    }
    printf("%-24s %-16s %-16s %4s %-8s %-6s %8s %8s %6s\n", "ID", "HOST", "NODE", "GPU", "BACKEND",
           "STATE", "HB AGE", "PID", "JOB");
    for (size_t i = 0; i < r->n; i++) {
        const Duplex__WorkerInfo *w = r->workers[i];
        char age[16];
        format_age(w->heartbeat_age_ms, age, sizeof(age));
        char job[24];
        if (w->assigned_job)
            snprintf(job, sizeof(job), "%llu", (unsigned long long)w->assigned_job);
        else
            snprintf(job, sizeof(job), "-");
        printf("%-24s %-16s %-16s %4d %-8s %-6s %8s %8d %6s%s%s%s\n", w->worker_id, w->host,
               w->node, w->gpu_index, w->backend, w->state, age, w->pid, job,
               w->drained ? "  drained" : "", w->blocklisted[0] ? "  blocklisted: " : "",
               w->blocklisted);
    }
}

static int print_json(const struct ctl_workers *r)
{
    json_t *root = json_object(), *arr = json_array();
    int rc = -ENOMEM;

    if (!root || !arr || json_object_set(root, "workers", arr) < 0)
        goto out;
    for (size_t i = 0; i < r->n; i++) {
        const Duplex__WorkerInfo *w = r->workers[i];
        json_t *caps = json_array();
        json_t *o;

        for (size_t k = 0; caps && k < w->n_capabilities; k++)
            json_array_append_new(caps, json_string(w->capabilities[k]));
        o = json_pack("{s:s, s:s, s:s, s:i, s:s, s:s, s:I, s:i, s:o, s:s, s:I, s:I, s:b, s:I}",
                      "id", w->worker_id, "host", w->host, "node", w->node, "gpu", w->gpu_index,
                      "backend", w->backend, "state", w->state, "heartbeat_age_ms",
                      (json_int_t)w->heartbeat_age_ms, "pid", w->pid, "capabilities", caps,
                      "activity", activity_name(w->activity), "job", (json_int_t)w->job_id, "step",
                      (json_int_t)w->step, "drained", (int)w->drained, "assigned_job",
                      (json_int_t)w->assigned_job);
        if (o) {
            json_object_set_new(o, "blocklisted",
                                w->blocklisted[0] ? json_string(w->blocklisted) : json_null());
            json_object_set_new(o, "memory_bytes", json_integer((json_int_t)w->memory_bytes));
        }
        if (!o || json_array_append_new(arr, o) < 0)
            goto out;
    }
    if (json_dumpf(root, stdout, JSON_INDENT(2)) < 0)
        goto out;
    putchar('\n');
    rc = 0;
out:
    json_decref(arr);
    json_decref(root);
    return rc;
}

int ctl_cmd_workers(struct ctl_globals *g, int argc, char **argv)
{
    char *coordinator = NULL;
    int timeout_s = 0, page = 0;
    bool json = false;
    const struct dx_opt options[] = {
        {"json", DX_OPT_FLAG, &json, NULL, 0, 0, 0, NULL, "print JSON"},
        {"page", DX_OPT_INT, &page, NULL, 0, 1, 1000, "N",
         "workers per request (default: duplexd's largest page, 1000)"},
        {"coordinator", DX_OPT_STRING, &coordinator, NULL, 0, 0, 0, "ADDR", "duplexd endpoint"},
        {"timeout", DX_OPT_INT, &timeout_s, NULL, 0, 1, 3600, "SECONDS", CTL_TIMEOUT_HELP},
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    ctl_client_t *client = NULL;
    struct ctl_workers list = {0};
    const struct dx_cli cli = {
        .prog = "duplexctl workers",
        .synopsis = "duplexctl workers [--json] [--page N]\n"
                    "duplexctl workers forget WORKER\n\nLists the cluster's workers, ordered by "
                    "id (asked for page by page); `forget` drops a gone worker's record.",
    };
    char err[512];
    int status;

    if (argc > 1 && strcmp(argv[1], "forget") == 0)
        return ctl_cmd_forget(g, argc - 1, argv + 1);
    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    ctl_globals_override(g, coordinator, timeout_s);
    status = CTL_EXIT_FAIL;
    if (ctl_client_create(g, g->timeout_s * 1000, &client, err, sizeof(err)) < 0 ||
        ctl_workers_fetch(client, (unsigned)page, &list, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplexctl: %s\n", err);
        goto out;
    }
    if (json) {
        if (print_json(&list) < 0) {
            fprintf(stderr, "duplexctl: cannot write JSON\n");
            goto out;
        }
    } else {
        print_table(&list);
    }
    status = CTL_EXIT_OK;
out:
    ctl_workers_clear(&list);
    ctl_client_destroy(client);
    dx_opts_free(options);
    return status;
}
