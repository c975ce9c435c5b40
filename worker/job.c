/* job.c - the Assignment decoded once (see job.h). Owns the struct wk_job
 * and every string and array in it: copies, so that the protobuf can be
 * freed as soon as it is decoded. */
#include "worker/job.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "job/plan.h"
#include "worker/net/dataplane.h"

/* A copy of s ("" for NULL) into *out. 0 or -ENOMEM. */
static int copy_text(const char *s, char **out)
{
    return (*out = strdup(s ? s : "")) ? 0 : -ENOMEM;
}

/* A copy of n int32s into *out (NULL for none). 0 or -ENOMEM. */
static int copy_ints(const int32_t *v, size_t n, int32_t **out)
{
    *out = NULL;
    if (n == 0)
        return 0;
    if (!(*out = malloc(n * sizeof(*v))))
        return -ENOMEM;
    memcpy(*out, v, n * sizeof(*v));
    return 0;
}

/* The job's layout as job_plan reads it. */
static void layout_of(const struct wk_job *j, struct job_spec *layout)
{
    memset(layout, 0, sizeof(*layout));
    layout->parallel.schedule = j->kind;
    layout->parallel.pp = j->pp;
    layout->parallel.ep = j->ep;
    layout->parallel.dp = j->dp;
}

int wk_job_index(const struct wk_job *j, int dp, int pp, int ep)
{
    return (dp * j->pp + pp) * j->ep + ep;
}

const struct wk_job_peer *wk_job_line(const struct wk_job *j, int pp)
{
    return &j->peers[wk_job_index(j, j->dp_rank, pp, j->ep_rank)];
}

const char *wk_job_worker(const struct wk_job *j, int at)
{
    return at >= 0 && at < j->nranks && j->peers[at].worker_id ? j->peers[at].worker_id : "?";
}

/* The peers, by rank index: each inside the layout and named once. */
static int decode_peers(struct wk_job *j, const Duplex__Assignment *a, char *err, size_t errlen)
{
    if (!(j->peers = calloc((size_t)j->nranks, sizeof(*j->peers))))
        goto nomem;
    for (size_t i = 0; i < a->n_peers; i++) {
        const Duplex__Peer *p = a->peers[i];
        struct wk_job_peer *to;
        const char *id = p->worker_id ? p->worker_id : "";

        if (p->pp < 0 || p->pp >= j->pp)
            return dx_errf(err, errlen, -EINVAL, "peer %s has pp rank %d of %d", id, p->pp, j->pp);
        if (p->ep < 0 || p->ep >= j->ep || p->dp < 0 || p->dp >= j->dp)
            return dx_errf(err, errlen, -EINVAL, "peer %s has ranks ep %d, dp %d outside the job",
                           id, p->ep, p->dp);
        to = &j->peers[wk_job_index(j, p->dp, p->pp, p->ep)];
        if (to->worker_id)
            return dx_errf(err, errlen, -EINVAL,
                           "two peers for ranks pp %d, ep %d, dp %d (%s and %s)", p->pp, p->ep,
                           p->dp, to->worker_id, id);
        if (copy_text(id, &to->worker_id) < 0 || copy_text(p->data_addr, &to->data_addr) < 0 ||
            copy_text(p->curve_key, &to->curve_key) < 0 || copy_text(p->node, &to->node) < 0)
            goto nomem;
        to->gpu = p->gpu;
    }
    return 0;
nomem:
    return dx_errf(err, errlen, -ENOMEM, "out of memory");
}

/* The spec, when there is one: parsed, or why not. */
static void decode_spec(struct wk_job *j, const char *json)
{
    if (!json || !json[0]) {
        j->spec_state = WK_JOB_SPEC_NONE;
        return;
    }
    j->spec_state = job_spec_parse(json, strlen(json), NULL, 0, &j->spec, j->spec_error,
                                   sizeof(j->spec_error)) < 0
                        ? WK_JOB_SPEC_BAD
                        : WK_JOB_SPEC_OK;
}

int wk_job_decode(const Duplex__Assignment *a, struct wk_job **out, char *err, size_t errlen)
{
    struct wk_job *j = calloc(1, sizeof(*j));
    int rc;

    if (!j)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    j->job_id = a->job_id;
    j->attempt = a->attempt;
    j->steps = a->steps;
    j->pp = a->pp;
    j->ep = a->ep;
    j->dp = a->dp;
    j->pp_rank = a->pp_rank;
    j->ep_rank = a->ep_rank;
    j->dp_rank = a->dp_rank;
    j->microbatches = a->microbatches;
    j->cost_ms[DP_OP_F] = a->cost_f_ms;
    j->cost_ms[DP_OP_B] = a->cost_b_ms;
    j->cost_ms[DP_OP_W] = a->cost_w_ms;
    j->cost_ms[DP_OP_I] = a->cost_b_ms > a->cost_w_ms ? a->cost_b_ms - a->cost_w_ms : 0.0;
    j->cost_ms[DP_OP_FB] = a->cost_fb_ms;
    if (dp_sched_kind_parse(a->schedule, &j->kind) < 0) {
        rc = dx_errf(err, errlen, -EINVAL,
                     "unknown schedule \"%s\" (1f1b, zb1p, dualpipe or dualpipev)",
                     a->schedule ? a->schedule : "");
        goto fail;
    }
    /* the envelope's decoder bounds pp, ep and dp one by one, not their
     * product, which sizes the peer table */
    if (a->pp < 1 || a->ep < 1 || a->dp < 1 || a->pp > WK_JOB_MAX_RANKS ||
        a->ep > WK_JOB_MAX_RANKS / a->pp || a->dp > WK_JOB_MAX_RANKS / (a->pp * a->ep)) {
        rc = dx_errf(err, errlen, -EINVAL, "layout pp %d, ep %d, dp %d: more than %d ranks", a->pp,
                     a->ep, a->dp, WK_JOB_MAX_RANKS);
        goto fail;
    }
    if (a->pp_rank < 0 || a->pp_rank >= a->pp || a->steps == 0) {
        rc = dx_errf(err, errlen, -EINVAL, "pp rank %d of %d, %" PRIu64 " steps", a->pp_rank, a->pp,
                     (uint64_t)a->steps);
        goto fail;
    }
    if (a->ep_rank < 0 || a->ep_rank >= a->ep || a->dp_rank < 0 || a->dp_rank >= a->dp) {
        rc = dx_errf(err, errlen, -EINVAL, "ranks ep %d, dp %d outside the job (ep %d, dp %d)",
                     a->ep_rank, a->dp_rank, a->ep, a->dp);
        goto fail;
    }
    j->nranks = a->pp * a->ep * a->dp;
    if ((rc = decode_peers(j, a, err, errlen)) < 0)
        goto fail;
    if (copy_ints(a->stages, a->n_stages, &j->stages) < 0 ||
        copy_ints(a->experts, a->n_experts, &j->experts) < 0 ||
        copy_ints(a->expert_owner, a->n_expert_owner, &j->expert_owner) < 0 ||
        copy_text(a->checkpoint, &j->checkpoint) < 0 ||
        copy_text(a->shared_gpu, &j->shared_gpu) < 0)
        goto nomem;
    j->n_stages = a->n_stages;
    j->n_experts = a->n_experts;
    j->n_expert_owner = a->n_expert_owner;
    if (a->nccl_id.len) {
        if (!(j->nccl_id = malloc(a->nccl_id.len)))
            goto nomem;
        memcpy(j->nccl_id, a->nccl_id.data, a->nccl_id.len);
        j->n_nccl_id = a->nccl_id.len;
    }
    decode_spec(j, a->spec_json);
    *out = j;
    return 0;
nomem:
    rc = dx_errf(err, errlen, -ENOMEM, "out of memory");
fail:
    wk_job_destroy(j);
    return rc;
}

int wk_job_check_peers(const struct wk_job *j, const char *self_id, bool curve, char *err,
                       size_t errlen)
{
    struct job_spec layout;
    const struct wk_job_peer *self;
    int *near, n, rc = -EINVAL;

    /* with a keypair, the data plane talks CURVE only (without, keys are unused) */
    for (int at = 0; curve && at < j->nranks; at++)
        if (j->peers[at].worker_id && strlen(j->peers[at].curve_key) != WK_NET_KEY_LEN)
            return dx_errf(err, errlen, -EINVAL,
                           "peer %s has no CURVE key, and this worker's data plane uses CURVE",
                           j->peers[at].worker_id);
    layout_of(j, &layout);
    if (!(near = calloc((size_t)job_plan_peers_max(&layout), sizeof(*near))))
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    n = job_plan_peers(&layout, j->dp_rank, j->pp_rank, j->ep_rank, near);
    for (int k = 0; k < n; k++) {
        int at = near[k], pp = (at / j->ep) % j->pp, ep = at % j->ep, dp = at / (j->ep * j->pp);

        if (!j->peers[at].worker_id) {
            rc = dx_errf(err, errlen, -EINVAL, "no peer for ranks pp %d, ep %d, dp %d", pp, ep, dp);
            goto out;
        }
        if (j->peers[at].data_addr[0] == '\0') {
            rc = dx_errf(err, errlen, -EINVAL, "peer %s (pp %d, ep %d, dp %d) has no data address",
                         j->peers[at].worker_id, pp, ep, dp);
            goto out;
        }
    }
    self = wk_job_line(j, j->pp_rank);
    if (self_id && (!self->worker_id || strcmp(self->worker_id, self_id) != 0)) {
        rc = dx_errf(err, errlen, -EINVAL,
                     "the assignment gives our ranks (pp %d, ep %d, dp %d) to worker %s",
                     j->pp_rank, j->ep_rank, j->dp_rank, self->worker_id ? self->worker_id : "?");
        goto out;
    }
    rc = 0;
out:
    free(near);
    return rc;
}

void wk_job_destroy(struct wk_job *j)
{
    if (!j)
        return;
    for (int i = 0; j->peers && i < j->nranks; i++) {
        free(j->peers[i].worker_id);
        free(j->peers[i].data_addr);
        free(j->peers[i].curve_key);
        free(j->peers[i].node);
    }
    free(j->peers);
    free(j->stages);
    free(j->experts);
    free(j->expert_owner);
    free(j->checkpoint);
    free(j->nccl_id);
    free(j->shared_gpu);
    free(j);
}
