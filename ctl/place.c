/* place.c - `duplexctl place`: runs the expert placement (EPLB) alone on a
 * loads file and prints phy2log, log2phy, logcnt and the per-GPU load
 * imbalance, as a table or JSON. Needs no cluster. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/opts.h"
#include "job/eplb.h"
#include "ctl/ctl.h"

/* Reads {"weight": [[load per expert] per layer]} into a malloc'd
 * [layers][experts] array. Returns 0 or -EINVAL with the problem in err. */
static int read_loads(const char *path, float **out, int *layers, int *experts, char *err,
                      size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr), *weight, *row, *v;
    float *w = NULL;
    size_t l, e;
    int rc;

    if (!root)
        return dx_errf(err, errlen, -EINVAL, "%s:%d:%d: %s", path, jerr.line, jerr.column,
                       jerr.text);
    weight = json_object_get(root, "weight");
    if (!json_is_array(weight) || json_array_size(weight) == 0) {
        rc = dx_errf(err, errlen, -EINVAL,
                     "%s: expected {\"weight\": [[load per expert], ...per layer]}", path);
        goto out;
    }
    *layers = (int)json_array_size(weight);
    row = json_array_get(weight, 0);
    *experts = json_is_array(row) ? (int)json_array_size(row) : 0;
    if (*experts == 0) {
        rc =
            dx_errf(err, errlen, -EINVAL, "%s: weight[0] must be a non-empty array of loads", path);
        goto out;
    }
    w = calloc((size_t)*layers * (size_t)*experts, sizeof(float));
    if (!w) {
        rc = dx_errf(err, errlen, -ENOMEM, "out of memory");
        goto out;
    }
    json_array_foreach (weight, l, row) {
        if (!json_is_array(row) || json_array_size(row) != (size_t)*experts) {
            rc = dx_errf(err, errlen, -EINVAL,
                         "%s: weight[%zu] must be an array of %d loads like weight[0]", path, l,
                         *experts);
            goto out;
        }
        json_array_foreach (row, e, v) {
            if (!json_is_number(v)) {
                rc = dx_errf(err, errlen, -EINVAL, "%s: weight[%zu][%zu] is not a number", path, l,
                             e);
                goto out;
            }
            w[l * (size_t)*experts + e] = (float)json_number_value(v);
        }
    }
    *out = w;
    w = NULL;
    rc = 0;
out:
    free(w);
    json_decref(root);
    return rc;
}

static json_t *int_array(const int *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        json_array_append_new(a, json_integer(v[i]));
    return a;
}

static double gpu_load(const float *w, const struct job_eplb_plan *p, int layer, int gpu)
{
    int per_gpu = p->replicas / p->gpus;
    double load = 0.0;

    for (int k = 0; k < per_gpu; k++) {
        int e = p->phy2log[(size_t)layer * p->replicas + gpu * per_gpu + k];
        load +=
            (double)w[(size_t)layer * p->experts + e] / p->logcnt[(size_t)layer * p->experts + e];
    }
    return load;
}

static int print_json(const float *w, const struct job_eplb_plan *p)
{
    json_t *root = json_object(), *layers = json_array();
    int rc = -ENOMEM;

    if (!root || !layers || json_object_set(root, "layers", layers) < 0)
        goto out;
    json_object_set_new(root, "policy", json_string(p->hierarchical ? "hierarchical" : "global"));
    json_object_set_new(root, "replicas", json_integer(p->replicas));
    json_object_set_new(root, "gpus", json_integer(p->gpus));
    for (int l = 0; l < p->layers; l++) {
        json_t *layer = json_object(), *log2phy = json_array(), *loads = json_array();
        if (!layer || !log2phy || !loads)
            goto out;
        for (int e = 0; e < p->experts; e++)
            json_array_append_new(
                log2phy,
                int_array(p->log2phy + ((size_t)l * p->experts + e) * p->max_count, p->max_count));
        for (int g = 0; g < p->gpus; g++)
            json_array_append_new(loads, json_real(gpu_load(w, p, l, g)));
        json_object_set_new(layer, "phy2log",
                            int_array(p->phy2log + (size_t)l * p->replicas, p->replicas));
        json_object_set_new(layer, "log2phy", log2phy);
        json_object_set_new(layer, "logcnt",
                            int_array(p->logcnt + (size_t)l * p->experts, p->experts));
        json_object_set_new(layer, "gpu_load", loads);
        json_object_set_new(layer, "imbalance", json_real(job_eplb_imbalance(w, p, l)));
        json_array_append_new(layers, layer);
    }
    if (json_dumpf(root, stdout, JSON_INDENT(2)) == 0) {
        putchar('\n');
        rc = 0;
    }
out:
    json_decref(layers);
    json_decref(root);
    return rc;
}

static void print_ints(const char *label, const int *v, int n)
{
    printf("  %-8s", label);
    for (int i = 0; i < n; i++)
        printf(" %d", v[i]);
    putchar('\n');
}

static void print_table(const float *w, const struct job_eplb_plan *p, int groups, int nodes)
{
    int per_gpu = p->replicas / p->gpus;

    if (p->hierarchical)
        printf("policy: hierarchical (%d expert groups packed onto %d nodes)\n", groups, nodes);
    else
        printf("policy: global (%d groups do not divide by %d nodes)\n", groups, nodes);
    printf("%d experts, %d slots on %d GPUs (%d per GPU)\n", p->experts, p->replicas, p->gpus,
           per_gpu);
    for (int l = 0; l < p->layers; l++) {
        printf("layer %d: imbalance %.3f (busiest GPU load / mean GPU load)\n", l,
               job_eplb_imbalance(w, p, l));
        print_ints("phy2log", p->phy2log + (size_t)l * p->replicas, p->replicas);
        print_ints("logcnt", p->logcnt + (size_t)l * p->experts, p->experts);
        printf("  log2phy ");
        for (int e = 0; e < p->experts; e++) {
            const int *slots = p->log2phy + ((size_t)l * p->experts + e) * p->max_count;
            printf(" %d:[", e);
            for (int r = 0; r < p->max_count && slots[r] >= 0; r++)
                printf(r ? ",%d" : "%d", slots[r]);
            putchar(']');
        }
        printf("\n  gpu load");
        for (int g = 0; g < p->gpus; g++)
            printf(" %.1f", gpu_load(w, p, l, g));
        putchar('\n');
    }
}

int ctl_cmd_place(struct ctl_globals *g, int argc, char **argv)
{
    char *loads = NULL;
    int replicas = 0, groups = 1, nodes = 1, gpus = 0;
    bool json = false;
    const struct dx_opt options[] = {
        {"loads", DX_OPT_STRING, &loads, NULL, 0, 0, 0, "FILE",
         "JSON {\"weight\": [[tokens per expert] per layer]}"},
        {"replicas", DX_OPT_INT, &replicas, NULL, 0, 1, 1 << 20, "R",
         "physical expert slots per layer (a multiple of --gpus)"},
        {"groups", DX_OPT_INT, &groups, NULL, 1, 1, 1 << 20, "G", "expert groups"},
        {"nodes", DX_OPT_INT, &nodes, NULL, 1, 1, 1 << 20, "N", "nodes (NVLink domains)"},
        {"gpus", DX_OPT_INT, &gpus, NULL, 0, 1, 1 << 20, "P", "GPUs (a multiple of --nodes)"},
        {"json", DX_OPT_FLAG, &json, NULL, 0, 0, 0, NULL, "print JSON"},
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    const struct dx_cli cli = {
        .prog = "duplexctl place",
        .synopsis = "duplexctl place --loads LOADS.json --replicas R --groups G --nodes N "
                    "--gpus P [--json]\n\n"
                    "Runs the expert placement (DeepSeek's EPLB) alone. Example:\n"
                    "  duplexctl place --loads loads.json --replicas 16 --groups 4 --nodes 2 "
                    "--gpus 8",
    };
    struct job_eplb_plan plan = {0};
    float *w = NULL;
    int layers = 0, experts = 0, status;
    char err[512];

    (void)g;
    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (!loads || !replicas || !gpus) {
        fprintf(stderr,
                "duplexctl place: --loads, --replicas and --gpus are required (see --help)\n");
        goto out;
    }
    if (read_loads(loads, &w, &layers, &experts, err, sizeof(err)) < 0 ||
        job_eplb_rebalance(w, layers, experts, replicas, groups, nodes, gpus, &plan, err,
                           sizeof(err)) < 0) {
        fprintf(stderr, "duplexctl place: %s\n", err);
        goto out;
    }
    status = CTL_EXIT_OK;
    if (json) {
        if (print_json(w, &plan) < 0) {
            fprintf(stderr, "duplexctl place: cannot write JSON\n");
            status = CTL_EXIT_FAIL;
        }
    } else {
        print_table(w, &plan, groups, nodes);
    }
out:
    job_eplb_plan_clear(&plan);
    free(w);
    dx_opts_free(options);
    return status;
}
