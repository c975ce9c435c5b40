/* jobspec.h - the job spec: what a user submits, as JSON, with a default for
 * every field, and the rules that make a spec runnable.
 *
 * Every error names the field (as a dotted path) and the rule it breaks:
 * unknown fields, wrong types, values out of range, and layouts that cannot
 * run (layers that do not split into the schedule's stages, experts that do
 * not split over ep, the schedule's own constraints, a node limit the
 * routing cannot keep). Whether a placement keeps parallel.max_nodes is the
 * plan's check (coordinator/plan.h). Inputs are checked for where they are
 * used: train.dataset is one the workers have (worker/data.h's
 * WK_DATA_DATASETS), checkpoint.dir has no ".." component (each worker
 * also keeps it under its checkpoint root, worker/runtime.h), checkpoint
 * paths are printable ASCII, and no text field holds a control character.
 * Values quoted in errors are escaped (coord_jobspec_escape). The schema is
 * documented in docs/JOBSPEC.md.
 */
#ifndef COORD_JOBSPEC_H
#define COORD_JOBSPEC_H

#include <stddef.h>

#include "pipeline/schedule.h"

#define COORD_JOBSPEC_TEXT 128

struct coord_jobspec {
    char name[COORD_JOBSPEC_TEXT];
    int priority;
    char backend[16]; /* "sim", "cpu" or "cuda" */
    struct {
        int vocab, d_model, layers, heads, experts, top_k, expert_hidden, shared_experts;
        int seq_len, expert_groups, group_limit;
    } model;
    struct {
        enum dp_sched_kind schedule;
        int pp, ep, dp, microbatches, microbatch_size;
        int max_nodes; /* nodes a token's experts may span; 0 = no limit */
    } parallel;
    struct {
        int steps;
        double lr;
        int seed;
        char dataset[COORD_JOBSPEC_TEXT];
        char precision[8]; /* "fp32", or "bf16" (GEMM inputs; cuda backend) */
        char dispatch[8];  /* the expert rows' payload: "fp32", or "fp8" (e4m3) */
    } train;
    struct {
        int every; /* steps; 0 = never */
        char dir[COORD_JOBSPEC_TEXT * 2];
        char from[COORD_JOBSPEC_TEXT * 4]; /* a checkpoint's step directory to start from */
    } checkpoint;
    struct {
        int max_restarts;
        int backoff_ms;
    } restart;
    struct { /* per-op cost of the sim backend, milliseconds */
        double f, b, w, fb;
    } sim;
};

/* Parses and validates a spec. sets (may be NULL) are "dotted.path=value"
 * overrides applied before validation; a value is read as JSON when it
 * parses as JSON, else as a string. Returns 0, or -EINVAL with the field and
 * rule in err; *out then still holds a spec that can be shown (the fields
 * read before the error, the defaults for the rest). */
int coord_jobspec_parse(const char *json, size_t len, const char *const *sets, size_t nsets,
                        struct coord_jobspec *out, char *err, size_t errlen);

/* The spec as compact JSON with every field given (defaults and --set
 * overrides applied), which parses back to the same spec; free() it.
 * NULL when out of memory. */
char *coord_jobspec_to_json(const struct coord_jobspec *spec);

/* s fit for a terminal or a log line: every control character (bytes
 * below 0x20, 0x7f, and the C1 controls U+0080..U+009F) written as \xHH
 * per byte, the rest as it is. Cut, ending in "...", where out (outlen
 * bytes with the NUL) is too short. Returns out. */
char *coord_jobspec_escape(const char *s, char *out, size_t outlen);

/* Workers the job needs: pp x ep x dp. */
int coord_jobspec_workers(const struct coord_jobspec *spec);

#endif
