/* plan.c - `duplexctl plan`: generates a pipeline schedule, validates and
 * simulates it, and prints it as a timeline, compact op list, JSON or SVG.
 * Needs no duplexd. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/opts.h"
#include "ctl/ctl.h"
#include "pipeline/render.h"
#include "pipeline/schedule.h"
#include "pipeline/simulate.h"
#include "pipeline/validate.h"

#define PLAN_PROG "duplexctl plan"
#define PLAN_DEFAULT_SCHEDULE "dualpipe"
#define PLAN_DEFAULT_FORMAT "text"
#define PLAN_TMP_SUFFIX ".tmp"

static char *opt_schedule;
static char *opt_costs;
static char *opt_format;
static char *opt_out;
static int opt_pp;
static int opt_microbatches;

static const struct dx_opt options[] = {
    {"schedule", DX_OPT_STRING, &opt_schedule, PLAN_DEFAULT_SCHEDULE, 0, 0, 0, "NAME",
     "1f1b, zb1p, dualpipe or dualpipev"},
    {"pp", DX_OPT_INT, &opt_pp, NULL, 0, 1, DP_MAX_RANKS, "P",
     "pipeline ranks (required; dualpipe: even)"},
    {"microbatches", DX_OPT_INT, &opt_microbatches, NULL, 0, 1, DP_MAX_MICROBATCHES, "N",
     "micro-batches per step (required; dualpipe: even and >= 2P; dualpipev: >= 2P)"},
    {"costs", DX_OPT_STRING, &opt_costs, NULL, 0, 0, 0, "SPEC", "op costs for the simulation"},
    {"format", DX_OPT_STRING, &opt_format, PLAN_DEFAULT_FORMAT, 0, 0, 0, "FORMAT",
     "text, compact, json or svg"},
    {"out", DX_OPT_STRING, &opt_out, NULL, 0, 0, 0, "FILE", "write to FILE instead of stdout"},
    {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: duplexctl plan --pp P --microbatches N [--schedule NAME] [--costs SPEC]\n"
            "                      [--format FORMAT] [--out FILE]\n"
            "\n"
            "Generates one training step's pipeline schedule, checks it (every forward\n"
            "and backward once, sends matched by receives, no deadlock), simulates it\n"
            "with per-op costs and prints it. Needs no duplexd.\n"
            "\n"
            "options:\n"
            "  --schedule NAME            1f1b, zb1p (ZB-H1), dualpipe or dualpipev (default %s)\n"
            "  --pp P                     pipeline ranks, 1..%d (required; dualpipe: even)\n"
            "  --microbatches N           micro-batches per step, 1..%d (required;\n"
            "                             dualpipe: even and >= 2P; dualpipev: >= 2P)\n"
            "  --costs SPEC               op costs over the defaults F=1,B=2,W=1 (I=B-W and\n"
            "                             FB=F+B unless given), comma-separated KEY=VALUE with\n"
            "                             keys F, B, I, W, FB, lat (per message), bw (bytes per\n"
            "                             time unit; 0: no transfer time), act and grad (message\n"
            "                             bytes); keys are case-insensitive\n"
            "  --format FORMAT            text (timeline and summary), compact (one line of\n"
            "                             ops per rank), json (everything, with op times) or\n"
            "                             svg (a picture) (default %s)\n"
            "  --out FILE                 write to FILE (atomically) instead of stdout\n"
            "  --help                     show this help and exit\n"
            "\n"
            "compact notation: F3d, B3d, I3d, W3d and (F3d;B1u) for an overlapped pair:\n"
            "micro-batch 3 on chunk d; d/u is the direction (dualpipe) or the leg of the V\n"
            "(dualpipev); 1f1b and zb1p have only d.\n"
            "\n"
            "examples:\n"
            "  duplexctl plan --schedule dualpipe --pp 8 --microbatches 20 --format compact\n"
            "  duplexctl plan --schedule 1f1b --pp 4 --microbatches 8\n"
            "  duplexctl plan --schedule zb1p --pp 4 --microbatches 8 --costs F=1,B=2,W=1\n"
            "  duplexctl plan --schedule dualpipev --pp 4 --microbatches 10 --costs FB=2.5\n"
            "  duplexctl plan --pp 8 --microbatches 20 --format svg --out dualpipe.svg\n"
            "  duplexctl plan --pp 8 --microbatches 20 --format json | jq .summary\n"
            "\n"
            "exit status: 0 done, 1 internal error or output not written, 2 bad command line\n",
            PLAN_DEFAULT_SCHEDULE, DP_MAX_RANKS, DP_MAX_MICROBATCHES, PLAN_DEFAULT_FORMAT);
}

/* Writes text to path through path.tmp and a rename. Returns 0 or -errno. */
static int write_file(const char *path, const char *text, size_t len)
{
    char tmp[PATH_MAX];
    FILE *f = NULL;
    int rc;

    if (snprintf(tmp, sizeof(tmp), "%s" PLAN_TMP_SUFFIX, path) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    f = fopen(tmp, "w");
    if (!f)
        return -errno;
    if (fwrite(text, 1, len, f) != len || fflush(f) != 0) {
        rc = errno ? -errno : -EIO;
        goto fail;
    }
    rc = fclose(f);
    f = NULL;
    if (rc != 0 || rename(tmp, path) < 0) {
        rc = -errno;
        goto fail;
    }
    return 0;
fail:
    if (f)
        fclose(f);
    unlink(tmp);
    return rc;
}

static int write_stdout(const char *text, size_t len)
{
    if (fwrite(text, 1, len, stdout) != len || fflush(stdout) != 0)
        return errno ? -errno : -EIO;
    return 0;
}

int ctl_cmd_plan(struct ctl_globals *g, int argc, char **argv)
{
    const struct dx_cli cli = {.prog = PLAN_PROG, .usage = usage};
    enum dp_sched_kind kind;
    enum dp_render_format format;
    struct dp_costs costs;
    struct dp_validation v = {0};
    struct dp_sim_result r = {0};
    dp_sched_t *s = NULL;
    char *text = NULL;
    size_t len = 0;
    char err[1024];
    int status, rc;

    (void)g;
    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (dp_sched_kind_parse(opt_schedule, &kind) < 0) {
        fprintf(stderr,
                PLAN_PROG ": unknown schedule \"%s\" (expected 1f1b, zb1p, dualpipe or "
                          "dualpipev)\n",
                opt_schedule);
        goto out;
    }
    if (dp_render_format_parse(opt_format, &format) < 0) {
        fprintf(stderr, PLAN_PROG ": unknown format \"%s\" (expected text, compact, json or svg)\n",
                opt_format);
        goto out;
    }
    if (opt_pp == 0 || opt_microbatches == 0) {
        fprintf(stderr, PLAN_PROG ": --pp and --microbatches are required (see --help)\n");
        goto out;
    }
    dp_costs_default(&costs);
    if (opt_costs && dp_costs_parse(opt_costs, &costs, err, sizeof(err)) < 0) {
        fprintf(stderr, PLAN_PROG ": %s\n", err); /* err names the costs */
        goto out;
    }
    rc = dp_sched_generate(kind, opt_pp, opt_microbatches, &s, err, sizeof(err));
    if (rc == -EINVAL) {
        fprintf(stderr, PLAN_PROG ": %s\n", err);
        goto out;
    }

    status = CTL_EXIT_FAIL;
    if (rc < 0) {
        fprintf(stderr, PLAN_PROG ": %s\n", err);
        goto out;
    }
    if (dp_validate(s, &v, err, sizeof(err)) < 0) {
        fprintf(stderr, PLAN_PROG ": internal error: the generated %s schedule is invalid: %s\n",
                opt_schedule, err);
        goto out;
    }
    if (dp_simulate(s, &costs, &r, err, sizeof(err)) < 0) {
        fprintf(stderr, PLAN_PROG ": internal error: simulating the %s schedule: %s\n",
                opt_schedule, err);
        goto out;
    }
    if ((rc = dp_render(format, s, &v, &costs, &r, &text, &len)) < 0) {
        fprintf(stderr, PLAN_PROG ": rendering %s: %s\n", opt_format, strerror(-rc));
        goto out;
    }
    if (opt_out) {
        if ((rc = write_file(opt_out, text, len)) < 0) {
            fprintf(stderr, PLAN_PROG ": cannot write %s: %s\n", opt_out, strerror(-rc));
            goto out;
        }
    } else if ((rc = write_stdout(text, len)) < 0) {
        fprintf(stderr, PLAN_PROG ": cannot write to stdout: %s\n", strerror(-rc));
        goto out;
    }
    status = CTL_EXIT_OK;
out:
    free(text);
    dp_sim_result_clear(&r);
    dp_validation_clear(&v);
    dp_sched_destroy(s);
    dx_opts_free(options);
    return status;
}
