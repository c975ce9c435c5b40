/* jobs.c - duplexctl's job commands: status, events, cancel, drain and
 * undrain. Each asks duplexd one question and prints the answer as a table
 * (or, with --json, as duplexd's JSON). Users' text (job names, reasons,
 * event details, paths) is printed with control characters escaped. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/opts.h"
#include "job/jobspec.h"
#include "ctl/client.h"
#include "ctl/ctl.h"

#define WATCH_INTERVAL_US 1000000
#define WATCH_FINISHED_SHOWN 5 /* status --watch: the newest finished jobs listed */
#define EVENTS_PAGE 1000       /* events per request: duplexd's largest page */
#define TEXT_MAX 1024          /* a text field as printed, escaped */

/* Options every job command takes. */
struct job_cmd {
    char *coordinator;
    int timeout_s;
    bool json;
    bool watch;
};

#define JOB_CMD_OPTIONS(c)                                                                         \
    {"coordinator", DX_OPT_STRING, &(c).coordinator, NULL, 0, 0, 0, "ADDR", "duplexd endpoint"},   \
    {                                                                                              \
        "timeout", DX_OPT_INT, &(c).timeout_s, NULL, 0, 1, 3600, "SECONDS", CTL_TIMEOUT_HELP       \
    }

static int call(struct ctl_globals *g, Duplex__MsgType type, const ProtobufCMessage *body,
                Duplex__MsgType reply_type, struct dx_msg *reply, const char *prog)
{
    ctl_client_t *client = NULL;
    char err[1024];
    int rc;

    rc = ctl_client_create(g, g->timeout_s * 1000, &client, err, sizeof(err));
    if (rc == 0)
        rc = ctl_client_call(client, type, body, reply_type, reply, err, sizeof(err));
    if (rc == 0 && !reply->body) {
        snprintf(err, sizeof(err), "duplexd sent an empty answer");
        rc = -EPROTO;
    }
    if (rc < 0)
        fprintf(stderr, "%s: %s\n", prog, err);
    ctl_client_destroy(client);
    return rc;
}

static void format_time(int64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;

    if (ms <= 0) {
        snprintf(buf, len, "-");
        return;
    }
    localtime_r(&t, &tm);
    strftime(buf, len, "%H:%M:%S", &tm);
}

static const char *str(json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "";
}

/* str() fit for a terminal: duplexd refuses control characters in new job
 * specs, but a job stored before that (or a reason quoting one) may hold
 * some, and printed raw they would drive the terminal. */
static const char *text(json_t *o, const char *key, char *buf, size_t len)
{
    return job_spec_escape(str(o, key), buf, len);
}

static long long num(json_t *o, const char *key)
{
    return (long long)json_integer_value(json_object_get(o, key));
}

static void print_jobs(json_t *doc)
{
    json_t *jobs = json_object_get(doc, "jobs"), *j;
    size_t i;

    if (json_array_size(jobs) == 0) {
        printf("no jobs\n");
        return;
    }
    printf("%5s  %-16s %-12s %-10s %-7s %7s %11s  %-8s  %s\n", "ID", "NAME", "OWNER", "STATE",
           "BACKEND", "WORKERS", "STEP", "STARTED", "REASON");
    json_array_foreach (jobs, i, j) {
        char started[16], step[32], name[TEXT_MAX], reason[TEXT_MAX], owner[TEXT_MAX];
        format_time(num(j, "started_ms"), started, sizeof(started));
        snprintf(step, sizeof(step), "%lld/%lld", num(j, "step"), num(j, "steps"));
        text(j, "owner", owner, sizeof(owner));
        printf("%5lld  %-16.16s %-12.12s %-10s %-7s %7lld %11s  %-8s  %s\n", num(j, "id"),
               text(j, "name", name, sizeof(name)), owner[0] ? owner : "-", str(j, "state"),
               str(j, "backend"), num(j, "workers"), step, started,
               text(j, "reason", reason, sizeof(reason)));
    }
}

static bool job_is_over(const char *state)
{
    return strcmp(state, "succeeded") == 0 || strcmp(state, "failed") == 0 ||
           strcmp(state, "cancelled") == 0;
}

/* Drops from doc's "jobs" the finished ones older than the newest keep
 * finished ones (jobs not finished all stay). Returns how many it dropped. */
static size_t drop_old_finished(json_t *doc, size_t keep)
{
    json_t *jobs = json_object_get(doc, "jobs");
    size_t finished = 0, dropped = 0, i;

    for (i = 0; i < json_array_size(jobs); i++)
        finished += job_is_over(str(json_array_get(jobs, i), "state"));
    for (i = 0; i < json_array_size(jobs) && finished > keep;) {
        if (job_is_over(str(json_array_get(jobs, i), "state"))) {
            json_array_remove(jobs, i);
            finished--;
            dropped++;
        } else {
            i++;
        }
    }
    return dropped;
}

/* One line: step, loss, rate, bubble, hidden communication. */
static void print_progress(json_t *j)
{
    json_t *losses = json_object_get(j, "losses"), *hidden, *last = NULL;
    double step_ms = json_number_value(json_object_get(j, "last_step_ms"));
    double bubble_ms =
        json_number_value(json_object_get(json_object_get(j, "bubble"), "measured_ms"));

    /* the latest step whose loss is in: ranks without the head report none */
    for (size_t i = json_array_size(losses); i > 0 && !last; i--)
        if (json_number_value(json_object_get(json_array_get(losses, i - 1), "loss")) != 0.0)
            last = json_array_get(losses, i - 1);
    printf("job %lld %-9s step %5lld/%lld", num(j, "id"), str(j, "state"), num(j, "step"),
           num(j, "steps"));
    if (last && json_number_value(json_object_get(last, "loss")) != 0.0)
        printf("  loss %.4f", json_number_value(json_object_get(last, "loss")));
    if (step_ms > 0)
        printf("  %.0f %s/s  step %.0f ms  bubble %.0f%%",
               json_number_value(json_object_get(j, "tokens_per_s")),
               strcmp(str(j, "backend"), "sim") == 0 ? "micro-batches" : "tokens", step_ms,
               100.0 * bubble_ms / step_ms);
    if (json_is_number(hidden = json_object_get(j, "hidden_comm_fraction")))
        printf("  comm hidden %.0f%%", 100.0 * json_number_value(hidden));
    printf("\n");
}

void ctl_print_job(json_t *j)
{
    json_t *ranks = json_object_get(j, "ranks"), *losses = json_object_get(j, "losses"), *r;
    json_t *bubble = json_object_get(j, "bubble");
    char name[TEXT_MAX], reason[TEXT_MAX], dir[TEXT_MAX], owner[TEXT_MAX];
    size_t i;

    printf("job %lld \"%s\": %s (%s)\n", num(j, "id"), text(j, "name", name, sizeof(name)),
           str(j, "state"), text(j, "reason", reason, sizeof(reason)));
    if (text(j, "owner", owner, sizeof(owner))[0])
        printf("  owner %s\n", owner);
    printf("  %s, pp %lld x ep %lld x dp %lld, %lld micro-batches, backend %s, attempt %lld\n",
           str(j, "schedule"), num(j, "pp"), num(j, "ep"), num(j, "dp"), num(j, "microbatches"),
           str(j, "backend"), num(j, "attempt"));
    double step_ms = json_number_value(json_object_get(j, "last_step_ms"));
    double bubble_ms = json_number_value(json_object_get(bubble, "measured_ms"));
    json_t *hidden = json_object_get(j, "hidden_comm_fraction");
    json_t *ckpt = json_object_get(j, "checkpoint");
    int sim = strcmp(str(j, "backend"), "sim") == 0;

    printf("  step %lld of %lld; last step %.1f ms, %.1f %s/s\n", num(j, "step"), num(j, "steps"),
           step_ms, json_number_value(json_object_get(j, "tokens_per_s")),
           sim ? "micro-batches" : "tokens");
    if (sim)
        printf("  bubble: measured %.1f ms, simulated %.1f ms (simulated step %.1f ms)\n",
               bubble_ms, json_number_value(json_object_get(bubble, "simulated_ms")),
               json_number_value(json_object_get(bubble, "simulated_step_ms")));
    else
        printf("  bubble: %.1f ms of the %.1f ms step (%.0f%%) not spent computing on the "
               "busiest rank\n",
               bubble_ms, step_ms, step_ms > 0 ? 100.0 * bubble_ms / step_ms : 0.0);
    if (json_is_number(hidden))
        printf("  communication: %.0f%% of %.1f ms data-plane transfer time hidden behind "
               "compute\n",
               100.0 * json_number_value(hidden), json_number_value(json_object_get(j, "comm_ms")));
    if (json_is_object(ckpt))
        printf("  checkpoint: step %lld in %s\n", num(ckpt, "step"),
               text(ckpt, "dir", dir, sizeof(dir)));
    if (json_is_number(json_object_get(j, "expert_imbalance")))
        printf("  expert imbalance: %.3f (busiest GPU's tokens / mean, worst EP group)\n",
               json_number_value(json_object_get(j, "expert_imbalance")));
    else
        printf("  expert imbalance: n/a (no expert loads reported yet)\n");
    if (json_array_size(losses)) {
        json_t *last = json_array_get(losses, json_array_size(losses) - 1);
        double loss = json_number_value(json_object_get(last, "loss"));
        /* the sim executor trains nothing and reports 0 */
        if (loss != 0.0)
            printf("  loss at step %lld: %.4f\n", num(last, "step"), loss);
        else
            printf("  loss: none reported (the sim executor trains no model)\n");
    }
    printf("\n  %-24s %3s %3s %3s %8s  %s\n", "WORKER", "DP", "PP", "EP", "STEP", "STATE");
    json_array_foreach (ranks, i, r) {
        printf("  %-24s %3lld %3lld %3lld %8lld  %s\n", str(r, "worker"), num(r, "dp"),
               num(r, "pp"), num(r, "ep"), num(r, "step"),
               json_is_true(json_object_get(r, "done"))    ? "done"
               : json_is_true(json_object_get(r, "acked")) ? "running"
                                                           : "starting");
    }
}

/* Fetches status (one job or all) into *doc. Returns 0 or -errno. */
int ctl_job_status(struct ctl_globals *g, uint64_t id, json_t **doc, const char *prog)
{
    Duplex__JobStatus req = DUPLEX__JOB_STATUS__INIT;
    struct dx_msg reply = {0};
    json_error_t jerr;
    int rc;

    req.job_id = id;
    rc = call(g, DUPLEX__MSG_TYPE__MSG_JOB_STATUS, &req.base,
              DUPLEX__MSG_TYPE__MSG_JOB_STATUS_REPLY, &reply, prog);
    if (rc < 0 || !reply.body) /* call() never returns 0 without a body */
        return rc < 0 ? rc : -EPROTO;
    *doc = json_loads(((const Duplex__JobStatusReply *)reply.body)->json, 0, &jerr);
    dx_msg_clear(&reply);
    if (!*doc) {
        fprintf(stderr, "%s: duplexd sent bad JSON: %s\n", prog, jerr.text);
        return -EPROTO;
    }
    return 0;
}

/* status --all: every job, those that left duplexd's memory too, asked for
 * page by page (page jobs per request, 0: duplexd's largest) from after
 * on, at most limit of them (0: all), into *doc: {"jobs": [...],
 * "next_after_id": the last id listed when limit cut the list short, else
 * 0}. Returns 0 or -errno (said on stderr). */
static int fetch_all_jobs(struct ctl_globals *g, uint64_t after, unsigned page, unsigned limit,
                          json_t **doc, const char *prog)
{
    ctl_client_t *client = NULL;
    json_t *all = json_array();
    uint64_t next = 0;
    char err[1024] = "out of memory";
    int rc = -ENOMEM;

    *doc = NULL;
    if (!all || (rc = ctl_client_create(g, g->timeout_s * 1000, &client, err, sizeof(err))) < 0)
        goto out;
    for (;;) {
        Duplex__JobStatus req = DUPLEX__JOB_STATUS__INIT;
        struct dx_msg reply = {0};
        json_t *got, *j;
        json_error_t jerr;
        size_t i;

        req.all = true;
        req.after_id = after;
        req.limit = page;
        if (limit && (!page || limit - json_array_size(all) < page))
            req.limit = limit - (unsigned)json_array_size(all);
        if ((rc = ctl_client_call(client, DUPLEX__MSG_TYPE__MSG_JOB_STATUS, &req.base,
                                  DUPLEX__MSG_TYPE__MSG_JOB_STATUS_REPLY, &reply, err,
                                  sizeof(err))) < 0)
            goto out;
        next = ((const Duplex__JobStatusReply *)reply.body)->next_after_id;
        got = json_loads(((const Duplex__JobStatusReply *)reply.body)->json, 0, &jerr);
        dx_msg_clear(&reply);
        if (!got) {
            snprintf(err, sizeof(err), "duplexd sent bad JSON: %s", jerr.text);
            rc = -EPROTO;
            goto out;
        }
        json_array_foreach (json_object_get(got, "jobs"), i, j) {
            if (limit && json_array_size(all) == limit) {
                next = (uint64_t)json_integer_value(
                    json_object_get(json_array_get(all, limit - 1), "id"));
                break;
            }
            json_array_append(all, j);
        }
        json_decref(got);
        if (!next || (limit && json_array_size(all) == limit))
            break;
        /* a next page must start past this one: a duplexd that says
         * otherwise would keep us asking forever */
        if (next <= after) {
            snprintf(err, sizeof(err), "duplexd's job list does not advance (after %" PRIu64 ")",
                     after);
            rc = -EPROTO;
            goto out;
        }
        after = next;
    }
    if (!(*doc = json_pack("{s:O, s:I}", "jobs", all, "next_after_id", (json_int_t)next)))
        rc = -ENOMEM;
out:
    if (rc < 0)
        fprintf(stderr, "%s: %s\n", prog, err);
    json_decref(all);
    ctl_client_destroy(client);
    return rc < 0 ? rc : 0;
}

static int parse_job_id(const char *text, uint64_t *id, const char *prog)
{
    char *end;
    unsigned long long v = strtoull(text, &end, 10);

    if (*text == '\0' || *end != '\0' || v == 0) {
        fprintf(stderr, "%s: \"%s\" is not a job id (a positive number)\n", prog, text);
        return -EINVAL;
    }
    *id = v;
    return 0;
}

int ctl_cmd_status(struct ctl_globals *g, int argc, char **argv)
{
    struct job_cmd c = {0};
    bool all = false;
    int page = 0, limit = 0;
    char *after_text = NULL;
    const struct dx_opt options[] = {
        {"json", DX_OPT_FLAG, &c.json, NULL, 0, 0, 0, NULL, "print duplexd's JSON"},
        {"watch", DX_OPT_FLAG, &c.watch, NULL, 0, 0, 0, NULL,
         "repeat every second; with JOB, until the job ends (exit 1 unless it succeeded); "
         "without, the jobs not finished and the " DX_STRINGIFY(
             WATCH_FINISHED_SHOWN) " newest finished ones"},
        {"all", DX_OPT_FLAG, &all, NULL, 0, 0, 0, NULL,
         "every job by id, also the finished ones that left duplexd's memory (from its database)"},
        {"limit", DX_OPT_INT, &limit, NULL, 0, 1, 1000000000, "N", "with --all: at most N jobs"},
        {"after", DX_OPT_STRING, &after_text, NULL, 0, 0, 0, "ID",
         "with --all: the jobs after job ID (where a --limit list left off)"},
        {"page", DX_OPT_INT, &page, NULL, 0, 1, 500, "N",
         "with --all: jobs per request (default: duplexd's largest page, 500)"},
        JOB_CMD_OPTIONS(c),
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    const struct dx_cli cli = {
        .prog = "duplexctl status",
        .synopsis =
            "duplexctl status [JOB] [--json] [--watch]\n"
            "duplexctl status --all [--limit N] [--after ID] [--page N] [--json]\n\n"
            "Shows the jobs in duplexd's memory (those not finished, and finished ones\n"
            "within --forget-jobs-after-h), or one job in detail: state, step, loss, rate,\n"
            "ranks, bubble measured against simulated; a job that left memory is read\n"
            "from the database. --all lists every job ever submitted, page by page.\n"
            "Example: duplexctl status 3",
    };
    const char *arg = dx_opts_take_arg(options, &argc, argv);
    uint64_t id = 0, after = 0;
    int status;

    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (arg && parse_job_id(arg, &id, cli.prog) < 0)
        goto out;
    if ((limit || after_text || page) && !all) {
        fprintf(stderr, "%s: --limit, --after and --page go with --all\n", cli.prog);
        goto out;
    }
    if (all && id) {
        fprintf(stderr, "%s: --all lists every job; give no JOB with it\n", cli.prog);
        goto out;
    }
    if (after_text && strcmp(after_text, "0") != 0 &&
        parse_job_id(after_text, &after, cli.prog) < 0)
        goto out;
    ctl_globals_override(g, c.coordinator, c.timeout_s);
    status = CTL_EXIT_FAIL;
    for (long long last_step = -1;;) {
        json_t *doc = NULL;
        bool over;

        if ((all ? fetch_all_jobs(g, after, (unsigned)page, (unsigned)limit, &doc, cli.prog)
                 : ctl_job_status(g, id, &doc, cli.prog)) < 0)
            goto out;
        /* watching one job ends with it */
        over = id && c.watch && job_is_over(str(doc, "state"));
        if (c.json) {
            json_dumpf(doc, stdout, JSON_INDENT(2));
            putchar('\n');
        } else if (id && c.watch && !isatty(STDOUT_FILENO) && !over) {
            /* a log, not a screen: one line per step seen */
            if (num(doc, "step") != last_step)
                print_progress(doc);
            last_step = num(doc, "step");
        } else if (id) {
            if (c.watch && isatty(STDOUT_FILENO))
                printf("\033[H\033[2J"); /* redraw in place */
            ctl_print_job(doc);
        } else if (c.watch) {
            size_t dropped = drop_old_finished(doc, WATCH_FINISHED_SHOWN);

            if (isatty(STDOUT_FILENO))
                printf("\033[H\033[2J"); /* redraw in place */
            print_jobs(doc);
            if (dropped)
                printf("(%zu older finished job%s not shown: duplexctl status --all)\n", dropped,
                       dropped == 1 ? "" : "s");
        } else {
            print_jobs(doc);
            if (num(doc, "next_after_id"))
                printf("(more: duplexctl status --all --after %lld)\n", num(doc, "next_after_id"));
        }
        if (over && strcmp(str(doc, "state"), "succeeded") != 0) {
            json_decref(doc);
            goto out;
        }
        json_decref(doc);
        fflush(stdout);
        if (!c.watch || over)
            break;
        usleep(WATCH_INTERVAL_US);
        if (!id && !isatty(STDOUT_FILENO))
            printf("\n");
    }
    status = CTL_EXIT_OK;
out:
    dx_opts_free(options);
    return status;
}

int ctl_cmd_events(struct ctl_globals *g, int argc, char **argv)
{
    struct job_cmd c = {0};
    bool follow = false;
    int limit = 0;
    char *since = NULL;
    const struct dx_opt options[] = {
        {"json", DX_OPT_FLAG, &c.json, NULL, 0, 0, 0, NULL, "print duplexd's JSON"},
        {"follow", DX_OPT_FLAG, &follow, NULL, 0, 0, 0, NULL, "keep printing new events"},
        {"limit", DX_OPT_INT, &limit, NULL, 0, 1, EVENTS_PAGE, "N",
         "only the newest N events (default: every one)"},
        {"since", DX_OPT_STRING, &since, NULL, 0, 0, 0, "ID",
         "only the events after event ID (where an earlier list ended)"},
        JOB_CMD_OPTIONS(c),
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    const struct dx_cli cli = {
        .prog = "duplexctl events",
        .synopsis = "duplexctl events [JOB] [--limit N] [--since ID] [--json] [--follow]\n\n"
                    "The event log: registrations, losses, job transitions with reasons,\n"
                    "oldest first, read from duplexd's database a page at a time.\n"
                    "Example: duplexctl events 3 --limit 20",
    };
    const char *arg = dx_opts_take_arg(options, &argc, argv);
    Duplex__Events req = DUPLEX__EVENTS__INIT;
    int status;

    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (arg && parse_job_id(arg, &req.job_id, cli.prog) < 0)
        goto out;
    ctl_globals_override(g, c.coordinator, c.timeout_s);
    status = CTL_EXIT_FAIL;
    if (since) {
        char *end;
        unsigned long long v = strtoull(since, &end, 10);

        if (!isdigit((unsigned char)since[0]) || *end != '\0') {
            fprintf(stderr, "%s: --since \"%s\" is not an event id (a number)\n", cli.prog, since);
            status = CTL_EXIT_USAGE;
            goto out;
        }
        req.after_id = v;
    }
    if (req.job_id) { /* a job with no events yet lists none; one that never was is an error */
        json_t *job = NULL;

        if (ctl_job_status(g, req.job_id, &job, cli.prog) < 0)
            goto out;
        json_decref(job);
    }
    req.limit = limit ? (uint32_t)limit : EVENTS_PAGE;
    req.last = limit > 0; /* the newest N first; then, following, every new one */
    for (;;) {
        struct dx_msg reply = {0};
        json_t *arr, *e;
        size_t i, n;
        uint64_t page_after = req.after_id;

        if (call(g, DUPLEX__MSG_TYPE__MSG_EVENTS, &req.base, DUPLEX__MSG_TYPE__MSG_EVENTS_REPLY,
                 &reply, cli.prog) < 0 ||
            !reply.body)
            goto out;
        arr = json_loads(((const Duplex__EventsReply *)reply.body)->json, 0, NULL);
        dx_msg_clear(&reply);
        if (!arr) {
            fprintf(stderr, "%s: duplexd sent bad JSON\n", cli.prog);
            goto out;
        }
        json_array_foreach (arr, i, e) {
            char when[16], worker[TEXT_MAX], detail[TEXT_MAX];
            req.after_id = (uint64_t)num(e, "id");
            if (c.json) {
                json_dumpf(e, stdout, JSON_COMPACT);
                putchar('\n');
                continue;
            }
            format_time(num(e, "ts_ms"), when, sizeof(when));
            printf("%6lld %s %-20s", num(e, "id"), when, str(e, "kind"));
            if (num(e, "job_id"))
                printf(" job %lld", num(e, "job_id"));
            if (str(e, "worker_id")[0])
                printf(" worker %s", text(e, "worker_id", worker, sizeof(worker)));
            printf(": %s\n", text(e, "detail", detail, sizeof(detail)));
        }
        n = json_array_size(arr);
        json_decref(arr);
        fflush(stdout);
        if (!req.last && n == req.limit) { /* a full page: there is more */
            if (req.after_id <= page_after) {
                fprintf(stderr,
                        "%s: duplexd's page of events does not advance (after event %llu)\n",
                        cli.prog, (unsigned long long)page_after);
                goto out;
            }
            continue;
        }
        if (!follow)
            break;
        req.last = false;
        req.limit = EVENTS_PAGE;
        usleep(WATCH_INTERVAL_US);
    }
    status = CTL_EXIT_OK;
out:
    dx_opts_free(options);
    return status;
}

static int ok_command(struct ctl_globals *g, int argc, char **argv, const struct dx_cli *cli,
                      Duplex__MsgType type, ProtobufCMessage *body, const char **arg_out,
                      uint64_t *id_out)
{
    struct job_cmd c = {0};
    const struct dx_opt options[] = {
        JOB_CMD_OPTIONS(c),
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    const char *arg = dx_opts_take_arg(options, &argc, argv);
    struct dx_msg reply = {0};
    int status;

    if (!dx_opts_cli(options, cli, argc, argv, NULL, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (!arg) {
        fprintf(stderr, "%s: missing argument (see --help)\n", cli->prog);
        goto out;
    }
    if (id_out && parse_job_id(arg, id_out, cli->prog) < 0)
        goto out;
    *arg_out = arg;
    ctl_globals_override(g, c.coordinator, c.timeout_s);
    status = CTL_EXIT_FAIL;
    if (call(g, type, body, DUPLEX__MSG_TYPE__MSG_OK, &reply, cli->prog) < 0 || !reply.body)
        goto out;
    printf("%s\n", ((const Duplex__Ok *)reply.body)->text);
    dx_msg_clear(&reply);
    status = CTL_EXIT_OK;
out:
    dx_opts_free(options);
    return status;
}

int ctl_cmd_cancel(struct ctl_globals *g, int argc, char **argv)
{
    const struct dx_cli cli = {
        .prog = "duplexctl cancel",
        .synopsis = "duplexctl cancel JOB\n\nStops a job on every worker and frees them.",
    };
    Duplex__Cancel req = DUPLEX__CANCEL__INIT;
    const char *arg = NULL;

    /* the id is parsed into req.job_id before the request goes out */
    return ok_command(g, argc, argv, &cli, DUPLEX__MSG_TYPE__MSG_CANCEL, &req.base, &arg,
                      &req.job_id);
}

static int drain(struct ctl_globals *g, int argc, char **argv, bool undrain)
{
    const struct dx_cli cli = {
        .prog = undrain ? "duplexctl undrain" : "duplexctl drain",
        .synopsis = undrain ? "duplexctl undrain WORKER\n\nPuts a drained worker back into "
                              "placement."
                            : "duplexctl drain WORKER\n\nTakes a worker out of placement; its "
                              "current job goes on.",
    };
    Duplex__Drain req = DUPLEX__DRAIN__INIT;
    const char *arg = "";

    req.undrain = undrain;
    req.worker_id = (char *)arg;
    /* ok_command fills arg before sending; point the request at it */
    return ok_command(g, argc, argv, &cli, DUPLEX__MSG_TYPE__MSG_DRAIN, &req.base,
                      (const char **)&req.worker_id, NULL);
}

int ctl_cmd_drain(struct ctl_globals *g, int argc, char **argv)
{
    return drain(g, argc, argv, false);
}

int ctl_cmd_undrain(struct ctl_globals *g, int argc, char **argv)
{
    return drain(g, argc, argv, true);
}

int ctl_cmd_forget(struct ctl_globals *g, int argc, char **argv)
{
    const struct dx_cli cli = {
        .prog = "duplexctl workers forget",
        .synopsis = "duplexctl workers forget WORKER\n\nDrops the record of a worker that is "
                    "lost or left and runs no job (its events stay). If it comes back, it "
                    "registers as new.",
    };
    Duplex__Forget req = DUPLEX__FORGET__INIT;

    req.worker_id = "";
    return ok_command(g, argc, argv, &cli, DUPLEX__MSG_TYPE__MSG_FORGET, &req.base,
                      (const char **)&req.worker_id, NULL);
}
