/* test_job.c - the Assignment decoded once (worker/job.h): every field is
 * copied (the decoded job outlives the protobuf, which ASan would catch),
 * peers land at their rank index, the spec's three states, and the
 * refusals with the words that name the fault: an unknown schedule, ranks
 * outside the layout, a layout too big for the peer table, a peer named
 * twice; then the peer checks (a missing or address-less rank this one
 * talks to, a keyless peer under CURVE, ranks given to another worker). */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/job.h"

#define ERR_LEN 512
#define KEY_A "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7" /* 40 Z85 characters */

/* An Assignment of a pp 2 1f1b job for pp rank 1, with both pipeline
 * ranks as peers, encoded and decoded by protobuf-c as the agent gets it. */
static Duplex__Assignment *wire_assignment(const char *spec_json, bool keys)
{
    Duplex__Assignment a = DUPLEX__ASSIGNMENT__INIT;
    Duplex__Peer p[2] = {DUPLEX__PEER__INIT, DUPLEX__PEER__INIT}, *pp[2] = {&p[0], &p[1]};
    int32_t stages[1] = {1}, experts[2] = {0, 1}, owner[2] = {0, 0};
    uint8_t id[128], *buf;
    Duplex__Assignment *out;
    size_t len;

    for (int i = 0; i < 128; i++)
        id[i] = (uint8_t)i;
    a.job_id = 7;
    a.attempt = 3;
    a.steps = 5;
    a.schedule = "1f1b";
    a.pp = 2;
    a.ep = 1;
    a.dp = 1;
    a.pp_rank = 1;
    a.microbatches = 4;
    a.cost_f_ms = 1.0;
    a.cost_b_ms = 3.0;
    a.cost_w_ms = 1.0;
    a.cost_fb_ms = 4.0;
    a.stages = stages;
    a.n_stages = 1;
    a.experts = experts;
    a.n_experts = 2;
    a.expert_owner = owner;
    a.n_expert_owner = 2;
    a.checkpoint = "/ck/step-00000002";
    a.spec_json = (char *)spec_json;
    a.nccl_id.data = id;
    a.nccl_id.len = sizeof(id);
    a.shared_gpu = "";
    for (int i = 0; i < 2; i++) {
        p[i].pp = i;
        p[i].worker_id = i ? "w1" : "w0";
        p[i].data_addr = i ? "tcp://10.0.0.2:7000" : "tcp://10.0.0.1:7000";
        p[i].node = i ? "node-b" : "node-a";
        p[i].gpu = i;
        p[i].curve_key = keys ? KEY_A : "";
    }
    a.peers = pp;
    a.n_peers = 2;
    len = duplex__assignment__get_packed_size(&a);
    buf = malloc(len);
    cr_assert_not_null(buf);
    duplex__assignment__pack(&a, buf);
    out = duplex__assignment__unpack(NULL, len, buf);
    free(buf);
    cr_assert_not_null(out);
    return out;
}

static struct wk_job *decode_ok(Duplex__Assignment *a)
{
    struct wk_job *j = NULL;
    char err[ERR_LEN] = "";

    cr_assert_eq(wk_job_decode(a, &j, err, sizeof(err)), 0, "%s", err);
    return j;
}

static void expect_refused(const Duplex__Assignment *a, int want, const char *words)
{
    struct wk_job *j = NULL;
    char err[ERR_LEN] = "";

    cr_assert_eq(wk_job_decode(a, &j, err, sizeof(err)), want, "%s: %s", words, err);
    cr_assert_null(j);
    cr_assert(strstr(err, words), "\"%s\" does not say \"%s\"", err, words);
}

Test(job, every_field_outlives_the_protobuf)
{
    Duplex__Assignment *a = wire_assignment("{\"parallel\": {\"pp\": 2}}", true);
    struct wk_job *j = decode_ok(a);
    const struct wk_job_peer *below;

    duplex__assignment__free_unpacked(a, NULL); /* the job keeps copies */
    cr_assert_eq(j->job_id, 7);
    cr_assert_eq(j->attempt, 3);
    cr_assert_eq(j->steps, 5);
    cr_assert_eq(j->kind, DP_SCHED_1F1B);
    cr_assert_eq(j->nranks, 2);
    cr_assert_eq(j->pp_rank, 1);
    cr_assert_eq(j->microbatches, 4);
    cr_assert(j->cost_ms[DP_OP_I] == 2.0, "I = B - W: %g", j->cost_ms[DP_OP_I]);
    cr_assert(j->cost_ms[DP_OP_FB] == 4.0);
    cr_assert_eq(j->n_stages, 1);
    cr_assert_eq(j->stages[0], 1);
    cr_assert_eq(j->n_experts, 2);
    cr_assert_eq(j->experts[1], 1);
    cr_assert_eq(j->n_expert_owner, 2);
    cr_assert_str_eq(j->checkpoint, "/ck/step-00000002");
    cr_assert_eq(j->n_nccl_id, 128);
    cr_assert_eq(j->nccl_id[127], 127);
    cr_assert_str_eq(j->shared_gpu, "");
    below = wk_job_line(j, 0);
    cr_assert_str_eq(below->worker_id, "w0");
    cr_assert_str_eq(below->data_addr, "tcp://10.0.0.1:7000");
    cr_assert_str_eq(below->node, "node-a");
    cr_assert_str_eq(below->curve_key, KEY_A);
    cr_assert_eq(wk_job_line(j, 1)->gpu, 1);
    cr_assert_str_eq(wk_job_worker(j, 1), "w1");
    cr_assert_str_eq(wk_job_worker(j, 2), "?");
    cr_assert_eq(j->spec_state, WK_JOB_SPEC_OK);
    cr_assert_eq(j->spec.parallel.pp, 2);
    wk_job_destroy(j);
}

Test(job, the_spec_is_absent_bad_or_parsed)
{
    Duplex__Assignment *a = wire_assignment("", false);
    struct wk_job *j = decode_ok(a);

    cr_assert_eq(j->spec_state, WK_JOB_SPEC_NONE);
    wk_job_destroy(j);
    duplex__assignment__free_unpacked(a, NULL);
    a = wire_assignment("{\"model\": {\"layers\": -1}}", false);
    j = decode_ok(a); /* the sim backend needs no spec: the engines that do say why */
    cr_assert_eq(j->spec_state, WK_JOB_SPEC_BAD);
    cr_assert(strstr(j->spec_error, "model.layers"), "%s", j->spec_error);
    wk_job_destroy(j);
    duplex__assignment__free_unpacked(a, NULL);
}

Test(job, bad_layouts_and_peers_are_refused_naming_the_fault)
{
    Duplex__Assignment *a = wire_assignment("", false);

    char *schedule = a->schedule;

    a->schedule = "gpipe";
    expect_refused(a, -EINVAL, "unknown schedule \"gpipe\"");
    a->schedule = schedule;
    a->pp_rank = 2;
    expect_refused(a, -EINVAL, "pp rank 2 of 2");
    a->pp_rank = 1;
    a->ep_rank = 1;
    expect_refused(a, -EINVAL, "ranks ep 1, dp 0 outside the job");
    a->ep_rank = 0;
    /* pp, ep and dp each within the envelope's bound, their product not */
    a->ep = 4096;
    a->dp = 4096;
    expect_refused(a, -EINVAL, "more than 65536 ranks");
    a->pp = a->ep = a->dp = 2147483647; /* an in-process caller's: no overflow on the way */
    expect_refused(a, -EINVAL, "more than 65536 ranks");
    a->pp = 2;
    a->ep = a->dp = 1;
    a->peers[0]->ep = 1;
    expect_refused(a, -EINVAL, "peer w0 has ranks ep 1, dp 0 outside the job");
    a->peers[0]->ep = 0;
    a->peers[0]->pp = 1;
    expect_refused(a, -EINVAL, "two peers for ranks pp 1, ep 0, dp 0 (w0 and w1)");
    a->peers[0]->pp = 0;
    a->steps = 0;
    expect_refused(a, -EINVAL, "0 steps");
    duplex__assignment__free_unpacked(a, NULL);
}

Test(job, the_peers_this_rank_talks_to_are_checked)
{
    Duplex__Assignment *a = wire_assignment("", false);
    struct wk_job *j = decode_ok(a);
    Duplex__Peer *below = a->peers[0];
    char err[ERR_LEN] = "";

    cr_assert_eq(wk_job_check_peers(j, "w1", false, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_job_check_peers(j, "w0", false, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "gives our ranks (pp 1, ep 0, dp 0) to worker w1"), "%s", err);
    cr_assert_eq(wk_job_check_peers(j, NULL, true, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "peer w0 has no CURVE key"), "%s", err);
    wk_job_destroy(j);
    /* the pipeline neighbour without an address, then missing */
    free(a->peers[0]->data_addr);
    a->peers[0]->data_addr = strdup("");
    j = decode_ok(a);
    cr_assert_eq(wk_job_check_peers(j, NULL, false, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "peer w0 (pp 0, ep 0, dp 0) has no data address"), "%s", err);
    wk_job_destroy(j);
    a->n_peers = 1;
    a->peers[0] = a->peers[1];
    j = decode_ok(a);
    cr_assert_eq(wk_job_check_peers(j, NULL, false, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "no peer for ranks pp 0, ep 0, dp 0"), "%s", err);
    wk_job_destroy(j);
    a->n_peers = 2; /* free_unpacked frees both */
    a->peers[0] = below;
    duplex__assignment__free_unpacked(a, NULL);
}
