/* test_jobspec.c - job specs: defaults, overrides, and every validation
 * rule with the field it names. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job/jobspec.h"
#include "worker/rank/data.h"

static char err[512];

static int parse(const char *json, const char *const *sets, size_t nsets, struct job_spec *spec)
{
    err[0] = '\0';
    return job_spec_parse(json, strlen(json), sets, nsets, spec, err, sizeof(err));
}

static void expect_error(const char *json, const char *set, const char *field, const char *word)
{
    struct job_spec spec;
    const char *sets[] = {set};

    cr_assert_eq(parse(json, set ? sets : NULL, set ? 1 : 0, &spec), -EINVAL, "accepted %s %s",
                 json, set ? set : "");
    cr_assert_not_null(strstr(err, field), "\"%s\" does not name %s", err, field);
    if (word)
        cr_assert_not_null(strstr(err, word), "\"%s\" does not say %s", err, word);
}

Test(jobspec, empty_spec_gets_every_default)
{
    struct job_spec s;

    cr_assert_eq(parse("{}", NULL, 0, &s), 0, "%s", err);
    cr_assert_str_eq(s.name, "job");
    cr_assert_str_eq(s.backend, "cpu");
    cr_assert_eq(s.model.vocab, 256);
    cr_assert_eq(s.model.layers, 4);
    cr_assert_eq(s.parallel.schedule, DP_SCHED_DUALPIPE);
    cr_assert_eq(s.parallel.pp, 2);
    cr_assert_eq(s.parallel.microbatches, 4);
    cr_assert_eq(s.train.steps, 10);
    cr_assert_float_eq(s.train.lr, 1e-3, 1e-12);
    cr_assert_str_eq(s.checkpoint.dir, "var/checkpoints");
    cr_assert_eq(s.restart.max_restarts, 3);
    cr_assert_float_eq(s.sim.fb, 3.0, 1e-12);
    cr_assert_eq(job_spec_workers(&s), 2);
}

Test(jobspec, values_are_read)
{
    struct job_spec s;
    const char *json = "{\"name\": \"big\", \"backend\": \"sim\", \"priority\": 5,"
                       " \"model\": {\"layers\": 8, \"experts\": 16, \"top_k\": 4},"
                       " \"parallel\": {\"schedule\": \"dualpipev\", \"pp\": 4, \"ep\": 2,"
                       " \"dp\": 3, \"microbatches\": 9}, \"train\": {\"lr\": 0.5}}";

    cr_assert_eq(parse(json, NULL, 0, &s), 0, "%s", err);
    cr_assert_str_eq(s.name, "big");
    cr_assert_str_eq(s.backend, "sim");
    cr_assert_eq(s.priority, 5);
    cr_assert_eq(s.parallel.schedule, DP_SCHED_DUALPIPEV);
    cr_assert_eq(job_spec_workers(&s), 24);
    cr_assert_float_eq(s.train.lr, 0.5, 1e-12);
}

Test(jobspec, set_overrides_any_field)
{
    struct job_spec s;
    const char *sets[] = {"parallel.schedule=dualpipev", "train.steps=5", "name=from-set",
                          "sim.f=\"2\"", "model.layers=8"};

    /* sim.f="2" is a JSON string: wrong type */
    cr_assert_eq(parse("{\"train\": {\"steps\": 99}}", sets, 5, &s), -EINVAL);
    cr_assert_not_null(strstr(err, "sim.f"), "%s", err);
    const char *six[] = {"parallel.schedule=dualpipev", "model.layers=6"};
    cr_assert_eq(parse("{}", six, 2, &s), -EINVAL);
    cr_assert_not_null(strstr(err, "model.layers"), "dualpipev pp 2 has 4 stages: %s", err);
    const char *ok[] = {"parallel.schedule=dualpipev", "train.steps=5", "name=from-set",
                        "model.layers=8"};
    cr_assert_eq(parse("{\"train\": {\"steps\": 99}}", ok, 4, &s), 0, "%s", err);
    cr_assert_eq(s.parallel.schedule, DP_SCHED_DUALPIPEV);
    cr_assert_eq(s.train.steps, 5);
    cr_assert_str_eq(s.name, "from-set");
}

Test(jobspec, bad_json_and_shape)
{
    expect_error("{\"model\": ", NULL, "line 1", NULL);
    expect_error("[1, 2]", NULL, "JSON object", NULL);
    expect_error("{\"model\": 5}", NULL, "model", "object");
    expect_error("{\"a\": 1, \"a\": 2}", NULL, "duplicate", NULL);
}

Test(jobspec, unknown_fields_are_named)
{
    expect_error("{\"modle\": {}}", NULL, "modle", "unknown field");
    expect_error("{\"model\": {\"layer\": 4}}", NULL, "model.layer", "unknown field");
    expect_error("{}", "model.nope=1", "model.nope", "unknown field");
    expect_error("{}", "no-equals-sign", "key.path=value", NULL);
}

Test(jobspec, wrong_types_are_named)
{
    expect_error("{\"model\": {\"layers\": \"4\"}}", NULL, "model.layers", "integer");
    expect_error("{\"model\": {\"layers\": 4.5}}", NULL, "model.layers", "integer");
    expect_error("{\"train\": {\"lr\": \"fast\"}}", NULL, "train.lr", "number");
    expect_error("{\"name\": 7}", NULL, "name", "string");
    expect_error("{\"parallel\": {\"schedule\": 1}}", NULL, "parallel.schedule", "string");
}

Test(jobspec, ranges_and_choices)
{
    expect_error("{\"model\": {\"layers\": 0}}", NULL, "model.layers", "outside");
    expect_error("{\"parallel\": {\"pp\": -1}}", NULL, "parallel.pp", "outside");
    expect_error("{\"train\": {\"lr\": -0.1}}", NULL, "train.lr", "outside");
    expect_error("{\"backend\": \"tpu\"}", NULL, "backend", "sim|cpu|cuda");
    expect_error("{\"parallel\": {\"schedule\": \"gpipe\"}}", NULL, "parallel.schedule",
                 "dualpipev");
    expect_error("{\"name\": \"\"}", NULL, "name", "characters");
}

Test(jobspec, impossible_layouts)
{
    expect_error("{\"model\": {\"d_model\": 10, \"heads\": 4}}", NULL, "model.heads", "divide");
    expect_error("{\"model\": {\"experts\": 4, \"top_k\": 5}}", NULL, "model.top_k", "more");
    expect_error("{\"model\": {\"experts\": 8, \"expert_groups\": 3}}", NULL, "model.expert_groups",
                 "divide");
    expect_error("{\"model\": {\"experts\": 8, \"expert_groups\": 2, \"group_limit\": 3}}", NULL,
                 "model.group_limit", "more");
    expect_error("{\"model\": {\"experts\": 8, \"expert_groups\": 4, \"group_limit\": 1,"
                 " \"top_k\": 3}}",
                 NULL, "model.top_k", "group");
    expect_error("{\"model\": {\"experts\": 8}, \"parallel\": {\"ep\": 3}}", NULL, "parallel.ep",
                 "divide");
    expect_error("{\"model\": {\"layers\": 6}, \"parallel\": {\"pp\": 4, \"microbatches\": 8}}",
                 NULL, "model.layers", "stages");
    expect_error(
        "{\"parallel\": {\"schedule\": \"dualpipe\", \"pp\": 3}, \"model\": {\"layers\": 3}}", NULL,
        "parallel", "even");
    expect_error("{\"parallel\": {\"pp\": 2, \"microbatches\": 3}}", NULL, "parallel", "even");
    expect_error("{\"parallel\": {\"schedule\": \"dualpipev\", \"pp\": 2, \"microbatches\": 3}}",
                 NULL, "parallel", "2 x pipeline size");
    expect_error("{\"sim\": {\"w\": 3, \"b\": 2}}", NULL, "sim.w", "backward");
}

Test(jobspec, schedules_accept_their_own_layouts)
{
    struct job_spec s;

    cr_assert_eq(parse("{\"parallel\": {\"schedule\": \"1f1b\", \"pp\": 3, \"microbatches\": 1},"
                       " \"model\": {\"layers\": 6}}",
                       NULL, 0, &s),
                 0, "%s", err);
    cr_assert_eq(parse("{\"parallel\": {\"schedule\": \"dualpipev\", \"pp\": 3,"
                       " \"microbatches\": 7}, \"model\": {\"layers\": 6}}",
                       NULL, 0, &s),
                 0, "%s", err);
}

Test(jobspec, micro_batches_split_over_ep_and_checkpoint_from_is_absolute)
{
    struct job_spec s;

    expect_error("{\"model\": {\"experts\": 8}, \"parallel\": {\"ep\": 4, \"microbatch_size\": 2}}",
                 NULL, "parallel.microbatch_size", "ep");
    expect_error("{}", "checkpoint.from=var/ck/job-1/step-00000010", "checkpoint.from", "absolute");
    cr_assert_eq(parse("{}", NULL, 0, &s), 0, "%s", err);
    cr_assert_str_eq(s.checkpoint.from, "");
    expect_error("{}", "checkpoint.dir=", "checkpoint.dir", "1 to");
}

/* The stored form: every field given, and it parses back to the same spec,
 * --set overrides included. */
Test(jobspec, to_json_round_trips)
{
    const char *sets[] = {"train.lr=0.0123456789", "parallel.schedule=zb1p", "name=x y",
                          "checkpoint.from=/ck/job-1/step-00000002"};
    struct job_spec a, b;
    char *text;

    cr_assert_eq(parse("{\"sim\": {\"f\": 0.1}}", sets, 4, &a), 0, "%s", err);
    text = job_spec_to_json(&a);
    cr_assert_not_null(text);
    cr_assert_not_null(strstr(text, "\"microbatch_size\":2"), "%s", text);
    cr_assert_eq(parse(text, NULL, 0, &b), 0, "%s: %s", text, err);
    cr_assert_eq(memcmp(&a, &b, sizeof(a)), 0, "%s", text);
    free(text);
}

Test(jobspec, max_nodes_defaults_to_no_limit_and_is_checked)
{
    struct job_spec s;

    cr_assert_eq(parse("{}", NULL, 0, &s), 0, "%s", err);
    cr_assert_eq(s.parallel.max_nodes, 0);
    expect_error("{\"parallel\": {\"max_nodes\": -1}}", NULL, "parallel.max_nodes", "outside");
    expect_error("{\"parallel\": {\"max_nodes\": 5000}}", NULL, "parallel.max_nodes", "outside");
    expect_error("{\"parallel\": {\"max_nodes\": 1.5}}", NULL, "parallel.max_nodes", "integer");
    /* V3: 8 groups, 4 kept, top-8 -> a token reaches 4 nodes: max_nodes 4 */
    cr_assert_eq(parse("{\"model\": {\"experts\": 64, \"expert_groups\": 8, \"group_limit\": 4,"
                       " \"top_k\": 8}, \"parallel\": {\"max_nodes\": 4}}",
                       NULL, 0, &s),
                 0, "%s", err);
    cr_assert_eq(s.parallel.max_nodes, 4);
    expect_error("{\"model\": {\"experts\": 64, \"expert_groups\": 8, \"group_limit\": 4,"
                 " \"top_k\": 8}, \"parallel\": {\"max_nodes\": 3}}",
                 NULL, "parallel.max_nodes", "group_limit");
    /* group_limit above max_nodes is fine when top_k is not */
    cr_assert_eq(parse("{\"model\": {\"experts\": 64, \"expert_groups\": 8, \"group_limit\": 4,"
                       " \"top_k\": 2}, \"parallel\": {\"max_nodes\": 2}}",
                       NULL, 0, &s),
                 0, "%s", err);
    /* top_k above max_nodes is fine when group_limit is not */
    cr_assert_eq(parse("{\"model\": {\"experts\": 64, \"expert_groups\": 8, \"group_limit\": 2,"
                       " \"top_k\": 8}, \"parallel\": {\"max_nodes\": 2}}",
                       NULL, 0, &s),
                 0, "%s", err);
    /* 2 groups both kept, top-2, one node: 2 > 1 */
    expect_error("{\"model\": {\"expert_groups\": 2, \"group_limit\": 2}}", "parallel.max_nodes=1",
                 "parallel.max_nodes", "min(group_limit, top_k)");
    /* one group: whether it spans nodes is the plan's check */
    cr_assert_eq(parse("{}", (const char *[]){"parallel.max_nodes=1"}, 1, &s), 0, "%s", err);
    cr_assert_eq(
        parse("{\"model\": {\"top_k\": 1}}", (const char *[]){"parallel.max_nodes=1"}, 1, &s), 0,
        "%s", err);
    /* and it survives the round trip */
    char *text = job_spec_to_json(&s);
    struct job_spec back;
    cr_assert_not_null(text);
    cr_assert_eq(parse(text, NULL, 0, &back), 0, "%s", err);
    cr_assert_eq(back.parallel.max_nodes, 1);
    free(text);
}

Test(jobspec, the_cuda_backend_takes_expert_parallelism)
{
    struct job_spec s;

    cr_assert_eq(parse("{\"backend\": \"cuda\", \"parallel\": {\"ep\": 2}}", NULL, 0, &s), 0, "%s",
                 err);
    cr_assert_eq(s.parallel.ep, 2);
    cr_assert_str_eq(s.backend, "cuda");
}

Test(jobspec, bf16_precision_is_the_cuda_backends)
{
    expect_error("{\"backend\": \"cpu\", \"train\": {\"precision\": \"bf16\"}}", NULL,
                 "train.precision", "bf16 GEMMs run on the cuda backend only (backend cpu)");
    expect_error("{\"train\": {\"precision\": \"fp16\"}}", NULL, "train.precision", "fp32|bf16");
}

Test(jobspec, cuda_expert_rows_are_whole_16_byte_pieces)
{
    struct job_spec spec;

    expect_error("{\"backend\": \"cuda\", \"model\": {\"d_model\": 30, \"heads\": 2},"
                 " \"parallel\": {\"ep\": 2, \"microbatch_size\": 2}}",
                 NULL, "model.d_model", "30 is not a multiple of 4");
    cr_assert_eq(parse("{\"backend\": \"cpu\", \"model\": {\"d_model\": 30, \"heads\": 2},"
                       " \"parallel\": {\"ep\": 2, \"microbatch_size\": 2}}",
                       NULL, 0, &spec),
                 0, "%s", err);
}

Test(jobspec, dispatch_is_fp32_or_fp8_on_either_backend)
{
    struct job_spec spec;

    cr_assert_eq(parse("{}", NULL, 0, &spec), 0, "%s", err);
    cr_assert_str_eq(spec.train.dispatch, "fp32");
    cr_assert_eq(
        parse("{\"backend\": \"cpu\", \"train\": {\"dispatch\": \"fp8\"}}", NULL, 0, &spec), 0,
        "%s", err);
    cr_assert_str_eq(spec.train.dispatch, "fp8");
    expect_error("{\"train\": {\"dispatch\": \"e5m2\"}}", NULL, "train.dispatch", "fp32|fp8");
}

/* Issue 14: inputs are checked where they are used. The workers train only
 * the datasets they have (worker/rank/data.h's list), so duplexd refuses any
 * other train.dataset at submission, naming the field and the value. */
Test(jobspec, train_dataset_is_one_the_workers_have)
{
    struct job_spec s;

    cr_assert_eq(parse("{\"train\": {\"dataset\": \"licenses\"}}", NULL, 0, &s), 0, "%s", err);
    cr_assert_str_eq(s.train.dataset, "licenses");
    expect_error("{\"train\": {\"dataset\": \"/dev/zero\"}}", NULL, "train.dataset",
                 "\"/dev/zero\"");
    expect_error("{}", "train.dataset=../../etc/shadow", "train.dataset", "../../etc/shadow");
    expect_error("{}", "train.dataset=License", "train.dataset", "licenses");
    /* the value is printed safely: no raw escape reaches the error */
    expect_error("{\"train\": {\"dataset\": \"\\u001b[2Jx\"}}", NULL, "train.dataset", "\\x1b");
    cr_assert_null(strchr(err, '\033'), "%s", err);
}

/* The one list: every name the parser takes is one a worker can open. */
Test(jobspec, every_dataset_accepted_has_its_text_on_the_workers)
{
    char list[] = JOB_SPEC_DATASETS, set[128], *save = NULL;
    struct job_spec s;
    int n = 0;

    for (char *name = strtok_r(list, "|", &save); name; name = strtok_r(NULL, "|", &save), n++) {
        snprintf(set, sizeof(set), "train.dataset=%s", name);
        cr_assert_eq(parse("{}", (const char *[]){set}, 1, &s), 0, "%s: %s", name, err);
        cr_assert_not_null(wk_data_dataset_dir(s.train.dataset), "%s", name);
    }
    cr_assert_gt(n, 0);
    cr_assert_null(wk_data_dataset_dir("/dev/zero"));
    cr_assert_null(wk_data_dataset_dir(""));
    cr_assert_str_eq(wk_data_dataset_dir("licenses"), WK_DATA_DIR_DEFAULT);
}

Test(jobspec, checkpoint_dir_has_no_dot_dot_component)
{
    static const char *const bad[] = {
        "..",      "../x",    "a/../b",   "a/..",   "../../../../outside",
        "/abs/..", "/a/../b", "a//..//b", "./../x", "/srv/duplex/../../etc",
    };
    struct job_spec s;
    char set[128];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(set, sizeof(set), "checkpoint.dir=%s", bad[i]);
        expect_error("{}", set, "checkpoint.dir", "..");
    }
    /* the protocol carries checkpoint paths as printable ASCII */
    expect_error("{\"checkpoint\": {\"dir\": \"caf\\u00e9\"}}", NULL, "checkpoint.dir", "ASCII");
    expect_error("{}", "checkpoint.from=/ck/\xc3\xa9", "checkpoint.from", "ASCII");
    /* dots that are not a whole component are names like any other */
    static const char *const good[] = {"a..b",           "...",  "..x/y",           "x/..y",
                                       "/srv/duplex/ck", "./ck", "var/checkpoints", "a/.b"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        snprintf(set, sizeof(set), "checkpoint.dir=%s", good[i]);
        cr_assert_eq(parse("{}", (const char *[]){set}, 1, &s), 0, "%s: %s", good[i], err);
        cr_assert_str_eq(s.checkpoint.dir, good[i]);
    }
}

Test(jobspec, text_fields_refuse_control_characters)
{
    struct job_spec s;

    expect_error("{\"name\": \"two\\nlines\"}", NULL, "name", "control character");
    expect_error("{\"name\": \"\\u001b[31mred\"}", NULL, "name", "control character");
    cr_assert_null(strchr(err, '\033'), "the error prints the escape raw: %s", err);
    cr_assert_not_null(strstr(err, "\\x1b"), "%s", err);
    expect_error("{\"name\": \"tab\\there\"}", NULL, "name", "control character");
    expect_error("{\"name\": \"del\\u007f\"}", NULL, "name", "control character");
    expect_error("{\"name\": \"c1\\u009b31m\"}", NULL, "name", "control character");
    expect_error("{\"name\": \"cr\\r\"}", NULL, "name", "control character");
    expect_error("{\"checkpoint\": {\"dir\": \"ck\\nx\"}}", NULL, "checkpoint.dir",
                 "control character");
    expect_error("{\"checkpoint\": {\"from\": \"/ck\\u001b\"}}", NULL, "checkpoint.from",
                 "control character");
    /* ordinary names, spaces, punctuation and UTF-8 text are fine */
    static const char *const good[] = {"{\"name\": \"demo\"}", "{\"name\": \"my job #2 (v3)\"}",
                                       "{\"name\": \"caf\\u00e9 \\u65e5\\u672c\"}",
                                       "{\"name\": \"a-b_c.d:e@f\"}"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        cr_assert_eq(parse(good[i], NULL, 0, &s), 0, "%s: %s", good[i], err);
}

Test(jobspec, escape_writes_control_characters_as_hex)
{
    char out[64];

    cr_assert_str_eq(job_spec_escape("plain", out, sizeof(out)), "plain");
    cr_assert_str_eq(job_spec_escape("a\nb\033[2J\x7f", out, sizeof(out)), "a\\x0ab\\x1b[2J\\x7f");
    cr_assert_str_eq(job_spec_escape("\xc2\x9b"
                                     "1m caf\xc3\xa9",
                                     out, sizeof(out)),
                     "\\xc2\\x9b1m caf\xc3\xa9");
    /* too long: cut with "...", never in the middle of an escape */
    cr_assert_str_eq(job_spec_escape("abcdefghij", out, 8), "abcd...");
    cr_assert_str_eq(job_spec_escape("ab\n\n\n", out, 9), "ab...");
    cr_assert_eq(strlen(job_spec_escape("\n\n\n\n\n\n\n\n", out, sizeof(out))), 32);
}

/* A spec stored before a rule existed may fail now; duplexd still shows
 * it, so a failed parse leaves the defaults, never zeros (an ep of 0 once
 * hung duplexd's status of such a job). */
Test(jobspec, a_failed_parse_leaves_a_spec_that_can_be_shown)
{
    struct job_spec s;

    cr_assert_eq(parse("{\"name\": \"a\\nb\", \"parallel\": {\"ep\": 2}}", NULL, 0, &s), -EINVAL);
    cr_assert_eq(s.parallel.ep, 1);
    cr_assert_eq(s.parallel.pp, 2);
    cr_assert_eq(s.parallel.microbatches, 4);
    cr_assert_str_eq(s.train.dataset, "licenses");
    cr_assert_eq(parse("{\"model\": ", NULL, 0, &s), -EINVAL);
    cr_assert_eq(job_spec_workers(&s), 2);
    cr_assert_eq(parse("{\"train\": {\"dataset\": \"/dev/zero\"}}", NULL, 0, &s), -EINVAL);
    cr_assert_eq(s.parallel.ep, 1);
}

Test(jobspec, schedules_over_the_simulation_budget_are_refused)
{
    struct job_spec s;

    /* at the budget: accepted (1f1b: any pp, microbatches >= pp) */
    cr_assert_eq(parse("{\"model\": {\"layers\": 128}, \"parallel\": {\"schedule\": \"1f1b\", "
                       "\"pp\": 128, \"microbatches\": 1024}}",
                       NULL, 0, &s),
                 0, "%s", err);
    cr_assert_eq((long long)s.parallel.pp * s.parallel.microbatches, JOB_SPEC_SIM_BUDGET);
    /* one micro-batch more: refused, with the numbers */
    expect_error("{\"model\": {\"layers\": 128}, \"parallel\": {\"schedule\": \"1f1b\", "
                 "\"pp\": 128, \"microbatches\": 1025}}",
                 NULL, "parallel", "131200");
    expect_error("{\"model\": {\"layers\": 256}, \"parallel\": {\"pp\": 128, \"microbatches\": "
                 "65536}}",
                 NULL, "simulation budget", "8388608");
}
