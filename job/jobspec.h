/* jobspec.h - the job spec: what a user submits, as JSON, with a default for
 * every field, and the rules that make a spec runnable.
 *
 * Every error names the field (as a dotted path) and the rule it breaks:
 * unknown fields, wrong types, values out of range, and layouts that cannot
 * run (layers that do not split into the schedule's stages, experts that do
 * not split over ep, the schedule's own constraints, a node limit the
 * routing cannot keep). Whether a placement keeps parallel.max_nodes is the
 * plan's check (job/plan.h). Inputs are checked for where they are
 * used: train.dataset is one the workers have (JOB_SPEC_DATASETS),
 * checkpoint.dir has no ".." component (each worker
 * also keeps it under its checkpoint root, worker/runtime.h), checkpoint
 * paths are printable ASCII, and no text field holds a control character.
 * Values quoted in errors are escaped (job_spec_escape). The schema is
 * documented in docs/JOBSPEC.md.
 */
#ifndef JOB_SPEC_H
#define JOB_SPEC_H

#include <stddef.h>
#include <stdint.h>

#include "pipeline/schedule.h"

#define JOB_SPEC_TEXT 128
/* The datasets a worker can train on, by the name a job's train.dataset
 * gives them, '|'-separated. This is the one definition: the parser
 * accepts exactly these names, so duplexd, the workers and --standalone
 * (which all parse specs with it) agree, and the worker's
 * wk_data_dataset_dir (worker/rank/data.h) maps each to its text. Until
 * datasets exist the only one is the built-in text. */
#define JOB_SPEC_DATASET_BUILTIN "licenses"
#define JOB_SPEC_DATASETS JOB_SPEC_DATASET_BUILTIN
/* duplexd simulates every job's schedule (at placement, and for each
 * `submit --dry-run`) on libuv's thread pool, off its event loop, in time
 * and memory that grow with pp x microbatches (about 70 ms at this bound on
 * a 2-core VM; pp 128 x 65,536 took 17 s and pp 256 ran out of memory):
 * specs over it are refused before any work. */
#define JOB_SPEC_SIM_BUDGET 131072

struct job_spec {
    char name[JOB_SPEC_TEXT];
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
        char dataset[JOB_SPEC_TEXT];
        char precision[8]; /* "fp32", or "bf16" (GEMM inputs; cuda backend) */
        char dispatch[8];  /* the expert rows' payload: "fp32", or "fp8" (e4m3) */
    } train;
    struct {
        int every; /* steps; 0 = never */
        char dir[JOB_SPEC_TEXT * 2];
        char from[JOB_SPEC_TEXT * 4]; /* a checkpoint's step directory to start from */
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
int job_spec_parse(const char *json, size_t len, const char *const *sets, size_t nsets,
                   struct job_spec *out, char *err, size_t errlen);

/* The spec as compact JSON with every field given (defaults and --set
 * overrides applied), which parses back to the same spec; free() it.
 * NULL when out of memory. */
char *job_spec_to_json(const struct job_spec *spec);

/* s fit for a terminal or a log line: every control character (bytes
 * below 0x20, 0x7f, and the C1 controls U+0080..U+009F) written as \xHH
 * per byte, the rest as it is. Cut, ending in "...", where out (outlen
 * bytes with the NUL) is too short. Returns out. */
char *job_spec_escape(const char *s, char *out, size_t outlen);

/* Workers the job needs: pp x ep x dp. */
int job_spec_workers(const struct job_spec *spec);

/* What one rank of the job allocates on the cpu backend (and, as the model
 * and its caches, on a cuda worker's GPU), in bytes, for the rank that
 * needs the most (the one with the embedding or the head). An upper bound
 * within about 2x of what worker/rank/rank.c and worker/model/ allocate:
 *  - params: the weights of the stages the rank holds (one, or two for
 *    DualPipe and DualPipeV), every expert of their layers (each rank keeps
 *    a copy of every expert; the ep owner computes it);
 *  - grads: a gradient per weight, plus the step-end sums' two buffers of
 *    the largest stage's gradients;
 *  - optimizer: AdamW's two moments per weight;
 *  - activations: the cpu backend keeps one cache per micro-batch it runs
 *    (every micro-batch of a step, per stage it holds; not only the
 *    schedule's peak of live ones): the layer inputs, the attention's
 *    [B/ep x T x d] tensors and [B/ep x heads x T x T] probabilities, the
 *    MoE routing and expert rows (top_k x rows x hidden), the head's two
 *    [rows x vocab] tensors, the pipeline buffers and, with ep > 1, the
 *    owner side's rows of the whole micro-batch.
 * The sim backend allocates none of it (its total is still computed).
 * Sums saturate at UINT64_MAX. */
struct job_spec_memory {
    uint64_t params, grads, optimizer, activations;
    uint64_t total;
};
void job_spec_memory(const struct job_spec *spec, struct job_spec_memory *out);

/* "34.2 GiB (parameters 12.1, gradients 12.1, optimizer 24.2, activations
 * 0.9)" into buf, in the unit (KiB, MiB, GiB, TiB) that suits the total;
 * returns buf. job_spec_bytes_text: "15.6 GiB". */
char *job_spec_memory_text(const struct job_spec_memory *m, char *buf, size_t len);
char *job_spec_bytes_text(uint64_t bytes, char *buf, size_t len);

#endif
