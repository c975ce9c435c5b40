/* schedule.c - the schedule container, its topology and implied messages
 * (see schedule.h). The generators live in gen_1f1b.c and gen_dualpipe.c. */
#include "pipeline/schedule.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "pipeline/gen.h"

struct dp_rank_list {
    struct dp_op *ops;
    size_t n;
    size_t cap;
};

struct dp_sched {
    enum dp_sched_kind kind;
    int ranks;
    int microbatches;
    struct dp_rank_list *lists; /* [ranks] */
};

static const char *const kind_names[] = {
    [DP_SCHED_1F1B] = "1f1b",
    [DP_SCHED_ZB1P] = "zb1p",
    [DP_SCHED_DUALPIPE] = "dualpipe",
    [DP_SCHED_DUALPIPEV] = "dualpipev",
};

static const char *const op_names[] = {
    [DP_OP_F] = "F",   [DP_OP_B] = "B",       [DP_OP_I] = "I",       [DP_OP_W] = "W",
    [DP_OP_FB] = "FB", [DP_OP_SEND] = "SEND", [DP_OP_RECV] = "RECV",
};

const char *dp_sched_kind_name(enum dp_sched_kind kind)
{
    return (unsigned)kind < sizeof(kind_names) / sizeof(kind_names[0]) ? kind_names[kind] : "?";
}

int dp_sched_kind_parse(const char *name, enum dp_sched_kind *out)
{
    for (size_t i = 0; i < sizeof(kind_names) / sizeof(kind_names[0]); i++) {
        if (strcmp(name, kind_names[i]) == 0) {
            *out = (enum dp_sched_kind)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *dp_op_kind_name(enum dp_op_kind kind)
{
    return (unsigned)kind < sizeof(op_names) / sizeof(op_names[0]) ? op_names[kind] : "?";
}

int dp_op_is_compute(enum dp_op_kind kind)
{
    return kind == DP_OP_F || kind == DP_OP_B || kind == DP_OP_I || kind == DP_OP_W ||
           kind == DP_OP_FB;
}

dp_sched_t *dp_sched_create(enum dp_sched_kind kind, int ranks, int microbatches)
{
    dp_sched_t *s;

    if ((unsigned)kind >= sizeof(kind_names) / sizeof(kind_names[0]) || ranks < 1 ||
        ranks > DP_MAX_RANKS || microbatches < 1 || microbatches > DP_MAX_MICROBATCHES)
        return NULL;
    s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->lists = calloc((size_t)ranks, sizeof(*s->lists));
    if (!s->lists) {
        free(s);
        return NULL;
    }
    s->kind = kind;
    s->ranks = ranks;
    s->microbatches = microbatches;
    return s;
}

void dp_sched_destroy(dp_sched_t *s)
{
    if (!s)
        return;
    for (int r = 0; r < s->ranks; r++)
        free(s->lists[r].ops);
    free(s->lists);
    free(s);
}

int dp_sched_append(dp_sched_t *s, int rank, const struct dp_op *op)
{
    struct dp_rank_list *l;

    if (rank < 0 || rank >= s->ranks)
        return -EINVAL;
    l = &s->lists[rank];
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        struct dp_op *ops = realloc(l->ops, cap * sizeof(*ops));
        if (!ops)
            return -ENOMEM;
        l->ops = ops;
        l->cap = cap;
    }
    l->ops[l->n++] = *op;
    return 0;
}

int dp_sched_remove(dp_sched_t *s, int rank, size_t index)
{
    struct dp_rank_list *l;

    if (rank < 0 || rank >= s->ranks || index >= s->lists[rank].n)
        return -EINVAL;
    l = &s->lists[rank];
    memmove(&l->ops[index], &l->ops[index + 1], (l->n - index - 1) * sizeof(*l->ops));
    l->n--;
    return 0;
}

const struct dp_op *dp_sched_ops(const dp_sched_t *s, int rank, size_t *n)
{
    if (rank < 0 || rank >= s->ranks) {
        *n = 0;
        return NULL;
    }
    *n = s->lists[rank].n;
    return s->lists[rank].ops;
}

struct dp_op *dp_sched_ops_mut(dp_sched_t *s, int rank, size_t *n)
{
    return (struct dp_op *)dp_sched_ops(s, rank, n);
}

enum dp_sched_kind dp_sched_kind(const dp_sched_t *s)
{
    return s->kind;
}

int dp_sched_ranks(const dp_sched_t *s)
{
    return s->ranks;
}

int dp_sched_microbatches(const dp_sched_t *s)
{
    return s->microbatches;
}

int dp_sched_stages(const dp_sched_t *s)
{
    return s->kind == DP_SCHED_DUALPIPEV ? 2 * s->ranks : s->ranks;
}

int dp_sched_paths(const dp_sched_t *s)
{
    return s->kind == DP_SCHED_DUALPIPE ? 2 : 1;
}

int dp_sched_path_microbatches(const dp_sched_t *s)
{
    return s->microbatches / dp_sched_paths(s);
}

int dp_sched_chunks_per_rank(const dp_sched_t *s)
{
    return s->kind == DP_SCHED_DUALPIPE || s->kind == DP_SCHED_DUALPIPEV ? 2 : 1;
}

int dp_sched_locate(const dp_sched_t *s, int path, int stage, int *rank, int *chunk)
{
    int P = s->ranks;

    if (path < 0 || path >= dp_sched_paths(s) || stage < 0 || stage >= dp_sched_stages(s))
        return -EINVAL;
    switch (s->kind) {
    case DP_SCHED_DUALPIPE:
        *rank = path == 0 ? stage : P - 1 - stage;
        *chunk = path;
        return 0;
    case DP_SCHED_DUALPIPEV:
        *rank = stage < P ? stage : 2 * P - 1 - stage;
        *chunk = stage < P ? 0 : 1;
        return 0;
    default:
        *rank = stage;
        *chunk = 0;
        return 0;
    }
}

int dp_sched_append_message(dp_sched_t *s, int rank, enum dp_op_kind kind, enum dp_payload payload,
                            const struct dp_work *local)
{
    int fwd = payload == DP_ACTIVATION;
    int producer = kind == DP_OP_SEND ? local->stage : fwd ? local->stage - 1 : local->stage + 1;
    int other = kind == DP_OP_SEND ? (fwd ? local->stage + 1 : local->stage - 1) : producer;
    struct dp_op op = {.kind = kind, .payload = payload, .work = *local};
    int other_rank, other_chunk;

    if (kind != DP_OP_SEND && kind != DP_OP_RECV)
        return -EINVAL;
    if (other < 0 || other >= dp_sched_stages(s))
        return 0; /* the path starts (input) or ends (loss) here */
    if (dp_sched_locate(s, local->path, other, &other_rank, &other_chunk) < 0)
        return -EINVAL;
    if (other_rank == rank)
        return 0; /* handed over locally */
    op.work.stage = producer;
    op.peer = other_rank;
    return dp_sched_append(s, rank, &op);
}

static int append_recv(dp_sched_t *s, int rank, const struct dp_work *w, enum dp_payload payload)
{
    return dp_sched_append_message(s, rank, DP_OP_RECV, payload, w);
}

static int append_send(dp_sched_t *s, int rank, const struct dp_work *w, enum dp_payload payload)
{
    return dp_sched_append_message(s, rank, DP_OP_SEND, payload, w);
}

int dp_sched_append_compute(dp_sched_t *s, int rank, const struct dp_op *op)
{
    int rc = 0;

    switch (op->kind) {
    case DP_OP_F:
        if ((rc = append_recv(s, rank, &op->work, DP_ACTIVATION)) < 0 ||
            (rc = dp_sched_append(s, rank, op)) < 0)
            return rc;
        return append_send(s, rank, &op->work, DP_ACTIVATION);
    case DP_OP_B:
    case DP_OP_I:
        if ((rc = append_recv(s, rank, &op->work, DP_GRADIENT)) < 0 ||
            (rc = dp_sched_append(s, rank, op)) < 0)
            return rc;
        return append_send(s, rank, &op->work, DP_GRADIENT);
    case DP_OP_W:
        return dp_sched_append(s, rank, op);
    case DP_OP_FB:
        if ((rc = append_recv(s, rank, &op->work, DP_ACTIVATION)) < 0 ||
            (rc = append_recv(s, rank, &op->work2, DP_GRADIENT)) < 0 ||
            (rc = dp_sched_append(s, rank, op)) < 0 ||
            (rc = append_send(s, rank, &op->work, DP_ACTIVATION)) < 0)
            return rc;
        return append_send(s, rank, &op->work2, DP_GRADIENT);
    default:
        return -EINVAL;
    }
}

int dp_sched_check(enum dp_sched_kind kind, int ranks, int microbatches, char *err, size_t errlen)
{
    if (ranks < 1 || ranks > DP_MAX_RANKS)
        return dx_errf(err, errlen, -EINVAL, "pipeline size %d is outside 1..%d", ranks,
                       DP_MAX_RANKS);
    if (microbatches < 1 || microbatches > DP_MAX_MICROBATCHES)
        return dx_errf(err, errlen, -EINVAL, "micro-batch count %d is outside 1..%d", microbatches,
                       DP_MAX_MICROBATCHES);
    switch (kind) {
    case DP_SCHED_1F1B:
    case DP_SCHED_ZB1P:
        break;
    case DP_SCHED_DUALPIPE:
        if (ranks % 2 != 0)
            return dx_errf(err, errlen, -EINVAL, "dualpipe needs an even pipeline size, got %d",
                           ranks);
        if (microbatches % 2 != 0 || microbatches < 2 * ranks)
            return dx_errf(err, errlen, -EINVAL,
                           "dualpipe needs an even micro-batch count of at least 2 x pipeline "
                           "size (%d), got %d",
                           2 * ranks, microbatches);
        break;
    case DP_SCHED_DUALPIPEV:
        if (microbatches < 2 * ranks)
            return dx_errf(err, errlen, -EINVAL,
                           "dualpipev needs at least 2 x pipeline size (%d) micro-batches, got %d",
                           2 * ranks, microbatches);
        break;
    default:
        return dx_errf(err, errlen, -EINVAL, "unknown schedule kind %d", (int)kind);
    }
    return 0;
}

int dp_sched_generate(enum dp_sched_kind kind, int ranks, int microbatches, dp_sched_t **out,
                      char *err, size_t errlen)
{
    dp_sched_t *s;
    int rc = dp_sched_check(kind, ranks, microbatches, err, errlen);

    if (rc < 0)
        return rc;
    s = dp_sched_create(kind, ranks, microbatches);
    if (!s)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    if (kind == DP_SCHED_1F1B || kind == DP_SCHED_ZB1P)
        rc = dp_gen_1f1b(s, kind == DP_SCHED_ZB1P);
    else
        rc = dp_gen_dualpipe(s);
    if (rc < 0) {
        rc = dx_errf(err, errlen, rc, "building %s: %s", kind_names[kind], strerror(-rc));
        dp_sched_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}
