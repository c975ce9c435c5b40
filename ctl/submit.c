/* submit.c - `duplexctl submit JOB.json [--set k=v ...] [--dry-run] [--wait]`:
 * sends a job spec to duplexd, which queues it and prints its id (--wait
 * follows it to the end). With --dry-run duplexd validates it, places it on
 * the alive workers and simulates its schedule, and this prints that plan;
 * nothing starts. Spec errors come back naming the field. */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/opts.h"
#include "ctl/client.h"
#include "ctl/ctl.h"

/* Job specs are small; this bounds what is read and sent. */
#define SUBMIT_MAX_SPEC (256 * 1024)

static char *read_spec(const char *path, char *err, size_t errlen)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
    char *buf;
    size_t n;

    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    buf = malloc(SUBMIT_MAX_SPEC + 1);
    n = buf ? fread(buf, 1, SUBMIT_MAX_SPEC + 1, f) : 0;
    if (f != stdin)
        fclose(f);
    if (!buf || n > SUBMIT_MAX_SPEC || n == 0) {
        snprintf(err, errlen, "%s: %s", path,
                 !buf     ? "out of memory"
                 : n == 0 ? "empty file"
                          : "larger than 256 KiB");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

static void print_ints(json_t *arr, char *out, size_t len)
{
    size_t i, used = 0;
    json_t *v;

    out[0] = '\0';
    json_array_foreach (arr, i, v) {
        int n = snprintf(out + used, len - used, "%s%lld", i ? "," : "",
                         (long long)json_integer_value(v));
        if (n < 0 || (size_t)n >= len - used)
            break;
        used += (size_t)n;
    }
}

static int print_plan(const char *text)
{
    json_error_t jerr;
    json_t *plan = json_loads(text, 0, &jerr), *ranks, *sched, *r;
    size_t i;

    if (!plan) {
        fprintf(stderr, "duplexctl submit: duplexd sent a plan that is not JSON: %s\n", jerr.text);
        return -EPROTO;
    }
    ranks = json_object_get(plan, "ranks");
    sched = json_object_get(plan, "schedule");
    printf("dry run: job \"%s\" on %lld %s workers (pp %lld x ep %lld x dp %lld); nothing "
           "started\n\n",
           json_string_value(json_object_get(plan, "name")),
           (long long)json_integer_value(json_object_get(plan, "workers")),
           json_string_value(json_object_get(plan, "backend")),
           (long long)json_integer_value(json_object_get(plan, "pp")),
           (long long)json_integer_value(json_object_get(plan, "ep")),
           (long long)json_integer_value(json_object_get(plan, "dp")));
    printf("%-24s %-16s %4s %3s %3s %3s  %-8s %s\n", "WORKER", "NODE", "GPU", "DP", "PP", "EP",
           "STAGES", "EXPERTS");
    json_array_foreach (ranks, i, r) {
        char stages[64], experts[512];
        print_ints(json_object_get(r, "stages"), stages, sizeof(stages));
        print_ints(json_object_get(r, "experts"), experts, sizeof(experts));
        printf("%-24s %-16s %4lld %3lld %3lld %3lld  %-8s %s\n",
               json_string_value(json_object_get(r, "worker")),
               json_string_value(json_object_get(r, "node")),
               (long long)json_integer_value(json_object_get(r, "gpu")),
               (long long)json_integer_value(json_object_get(r, "dp")),
               (long long)json_integer_value(json_object_get(r, "pp")),
               (long long)json_integer_value(json_object_get(r, "ep")), stages, experts);
    }
    printf("\nschedule %s: pp %lld, %lld micro-batches, %lld stages; simulated makespan %.1f ms, "
           "bubble %.1f ms, peak activations %lld, parameter copies %lld\n",
           json_string_value(json_object_get(sched, "name")),
           (long long)json_integer_value(json_object_get(sched, "pp")),
           (long long)json_integer_value(json_object_get(sched, "microbatches")),
           (long long)json_integer_value(json_object_get(sched, "stages")),
           json_number_value(json_object_get(sched, "makespan_ms")),
           json_number_value(json_object_get(sched, "bubble_ms")),
           (long long)json_integer_value(json_object_get(sched, "peak_activations")),
           (long long)json_integer_value(json_object_get(sched, "param_copies")));
    printf("EP groups spanning nodes: %lld\n",
           (long long)json_integer_value(json_object_get(plan, "split_ep_groups")));
    json_decref(plan);
    return 0;
}

#define WAIT_POLL_US 200000
#define WAIT_EXIT_INTERRUPTED 130 /* 128 + SIGINT, as a shell reports it */

static volatile sig_atomic_t wait_interrupted;

static void wait_on_sigint(int sig)
{
    (void)sig;
    wait_interrupted = 1;
}

/* Ctrl-C stops following, not the job: says so and how to stop it. */
static int wait_stopped(uint64_t id)
{
    fflush(stdout);
    fprintf(stderr,
            "duplexctl submit: stopped waiting; job %" PRIu64
            " keeps running (cancel it with: duplexctl cancel %" PRIu64 ")\n",
            id, id);
    return WAIT_EXIT_INTERRUPTED;
}

/* Follows job id until it ends, printing each change of state or step.
 * Returns the exit status: 0 when it succeeded, 130 after Ctrl-C. */
static int wait_job(struct ctl_globals *g, uint64_t id)
{
    struct sigaction sa = {0};
    char last[512] = "";

    sa.sa_handler = wait_on_sigint; /* no SA_RESTART: a wait in progress ends */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    for (;;) {
        json_t *doc = NULL;
        const char *state;
        char line[512];
        int status = -1;

        if (wait_interrupted)
            return wait_stopped(id);
        if (ctl_job_status(g, id, &doc, "duplexctl submit") < 0)
            return wait_interrupted ? wait_stopped(id) : CTL_EXIT_FAIL;
        state = json_string_value(json_object_get(doc, "state"));
        snprintf(line, sizeof(line), "job %" PRIu64 ": %s, step %lld/%lld (%s)", id,
                 state ? state : "?", (long long)json_integer_value(json_object_get(doc, "step")),
                 (long long)json_integer_value(json_object_get(doc, "steps")),
                 json_string_value(json_object_get(doc, "reason")));
        if (strcmp(line, last) != 0) {
            printf("%s\n", line);
            fflush(stdout);
            snprintf(last, sizeof(last), "%s", line);
        }
        if (state && strcmp(state, "succeeded") == 0)
            status = CTL_EXIT_OK;
        else if (state && (strcmp(state, "failed") == 0 || strcmp(state, "cancelled") == 0))
            status = CTL_EXIT_FAIL;
        if (status >= 0) {
            printf("\n");
            ctl_print_job(doc);
        }
        json_decref(doc);
        if (status >= 0)
            return status;
        usleep(WAIT_POLL_US);
        if (wait_interrupted)
            return wait_stopped(id);
    }
}

int ctl_cmd_submit(struct ctl_globals *g, int argc, char **argv)
{
    struct dx_strv sets = {0};
    char *coordinator = NULL;
    int timeout_s = 0;
    bool dry_run = false, json = false, wait = false;
    const struct dx_opt options[] = {
        {"set", DX_OPT_LIST, &sets, NULL, 0, 0, 0, "KEY.PATH=VALUE",
         "override a field of the spec, e.g. --set parallel.schedule=dualpipev"},
        {"dry-run", DX_OPT_FLAG, &dry_run, NULL, 0, 0, 0, NULL,
         "print the placement and the simulated schedule; start nothing"},
        {"json", DX_OPT_FLAG, &json, NULL, 0, 0, 0, NULL, "print the plan (or job id) as JSON"},
        {"wait", DX_OPT_FLAG, &wait, NULL, 0, 0, 0, NULL,
         "follow the job to its end; exit 1 unless it succeeded (Ctrl-C stops following, "
         "not the job: exit 130)"},
        {"coordinator", DX_OPT_STRING, &coordinator, NULL, 0, 0, 0, "ADDR", "duplexd endpoint"},
        {"timeout", DX_OPT_INT, &timeout_s, NULL, 0, 1, 3600, "SECONDS", CTL_TIMEOUT_HELP},
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    const struct dx_cli cli = {
        .prog = "duplexctl submit",
        .synopsis = "duplexctl submit JOB.json [--set KEY.PATH=VALUE ...] [--dry-run] [--wait] "
                    "[--json]\n\n"
                    "Submits a job spec (docs/JOBSPEC.md; - reads standard input). Example:\n"
                    "  duplexctl submit examples/demo.json --set train.steps=5 --dry-run",
    };
    Duplex__Submit req = DUPLEX__SUBMIT__INIT;
    ctl_client_t *client = NULL;
    struct dx_msg reply = {0};
    const char *path = dx_opts_take_arg(options, &argc, argv);
    char *spec = NULL, err[1024];
    int status;

    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (!path) {
        fprintf(stderr, "duplexctl submit: give the job spec file (see --help)\n");
        goto out;
    }
    ctl_globals_override(g, coordinator, timeout_s);
    status = CTL_EXIT_FAIL;
    if (!(spec = read_spec(path, err, sizeof(err)))) {
        fprintf(stderr, "duplexctl submit: %s\n", err);
        goto out;
    }
    req.spec_json = spec;
    req.sets = sets.v;
    req.n_sets = sets.n;
    req.dry_run = dry_run;
    if (ctl_client_create(g, g->timeout_s * 1000, &client, err, sizeof(err)) < 0 ||
        ctl_client_call(client, DUPLEX__MSG_TYPE__MSG_SUBMIT, &req.base,
                        DUPLEX__MSG_TYPE__MSG_SUBMIT_REPLY, &reply, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplexctl submit: %s\n", err);
        goto out;
    }
    if (!dry_run) {
        uint64_t id = ((const Duplex__SubmitReply *)reply.body)->job_id;
        if (json)
            printf("{\"job_id\": %" PRIu64 "}\n", id);
        else
            printf("job %" PRIu64 " submitted\n", id);
        fflush(stdout);
        status = wait ? wait_job(g, id) : CTL_EXIT_OK;
        goto out;
    }
    {
        const Duplex__SubmitReply *r = (const Duplex__SubmitReply *)reply.body;
        if (json)
            printf("%s\n", r->plan_json);
        else if (print_plan(r->plan_json) < 0)
            goto out;
    }
    status = CTL_EXIT_OK;
out:
    dx_msg_clear(&reply);
    ctl_client_destroy(client);
    free(spec);
    dx_opts_free(options);
    return status;
}
