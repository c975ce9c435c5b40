/* validate.c - the schedule validator (see validate.h). Owns the scratch
 * tables of one dp_validate call and the peak-activation array it hands back
 * (freed by dp_validation_clear).
 *
 * The rules are checked one after the other, each over every rank, so the
 * report is the first violation of the first rule broken. Rule 1 needs no
 * memory. Rule 2 sorts one record per compute half by its unit, so a
 * hand-written schedule that names a huge (P, N) but holds few ops costs only
 * what its ops cost. Once rule 2 holds every unit has a forward and a
 * backward, so tables indexed by unit are bounded by the op count; rules 3-6
 * use them and run in O(total ops + P^2).
 */
#include "pipeline/validate.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

#define NONE SIZE_MAX    /* no op index yet */
#define WORK_NAME_MAX 64 /* "path -2147483648 mb -2147483648 stage -2147483648" */
#define OP_NAME_MAX 160  /* "FB F <work> + B <work>", "RECV gradient <work> from rank N" */
#define WHY_MAX 256      /* the reason part of a report */
#define N_PAYLOADS 2     /* activation, gradient */

/* What a compute half does to its unit (rule 2's records). */
enum role {
    ROLE_F,
    ROLE_B,
    ROLE_I,
    ROLE_W,
};

struct rec {
    size_t key; /* the unit */
    size_t at;  /* op index on rank */
    int rank;
    int role;
};

struct ctx {
    const dp_sched_t *s;
    int ranks, stages, paths, mbs;
    size_t units;
    char *err;
    size_t errlen;
    /* Filled once rule 2 holds; indexed by unit, or by message
     * (payload * units + the producer's unit). Indices are op indices on the
     * unit's (or message's own) rank. */
    size_t *fwd_at;   /* the F, or FB, that runs the unit's forward */
    size_t *bwd_at;   /* the B, I, or FB, that runs its backward */
    size_t *send_at;  /* [2 units] */
    size_t *recv_at;  /* [2 units] */
    size_t *send_ord; /* [2 units]: position among its sender's messages to that peer */
    size_t *recv_ord; /* [2 units]: position among its receiver's messages from that peer */
};

/* --- words ------------------------------------------------------------------ */

static const char *payload_name(int payload)
{
    return payload == DP_ACTIVATION ? "activation" : payload == DP_GRADIENT ? "gradient" : "?";
}

/* "d5 stage 3" (path 0 is d, path 1 is u), or the raw fields. */
static void name_work(char *buf, size_t len, const struct dp_work *w)
{
    if (w->path == 0 || w->path == 1)
        snprintf(buf, len, "%c%d stage %d", w->path == 0 ? 'd' : 'u', w->mb, w->stage);
    else
        snprintf(buf, len, "path %d mb %d stage %d", w->path, w->mb, w->stage);
}

static void name_op(char *buf, size_t len, const struct dp_op *op)
{
    char a[WORK_NAME_MAX], b[WORK_NAME_MAX];

    name_work(a, sizeof(a), &op->work);
    switch (op->kind) {
    case DP_OP_F:
    case DP_OP_B:
    case DP_OP_I:
    case DP_OP_W:
        snprintf(buf, len, "%s %s", dp_op_kind_name(op->kind), a);
        break;
    case DP_OP_FB:
        name_work(b, sizeof(b), &op->work2);
        snprintf(buf, len, "FB F %s + B %s", a, b);
        break;
    case DP_OP_SEND:
    case DP_OP_RECV:
        if (op->payload == DP_ACTIVATION || op->payload == DP_GRADIENT)
            snprintf(buf, len, "%s %s %s %s rank %d", dp_op_kind_name(op->kind),
                     payload_name(op->payload), a, op->kind == DP_OP_SEND ? "to" : "from",
                     op->peer);
        else
            snprintf(buf, len, "%s payload %d %s %s rank %d", dp_op_kind_name(op->kind),
                     (int)op->payload, a, op->kind == DP_OP_SEND ? "to" : "from", op->peer);
        break;
    default:
        snprintf(buf, len, "kind %d", (int)op->kind);
        break;
    }
}

static int fail(struct ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct ctx *c, const char *fmt, ...)
{
    va_list ap;

    if (c->err && c->errlen) {
        va_start(ap, fmt);
        vsnprintf(c->err, c->errlen, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

/* Reports "rank R, op K (<op>): <why>". */
static int fail_op(struct ctx *c, int rank, size_t at, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail_op(struct ctx *c, int rank, size_t at, const char *fmt, ...)
{
    char opname[OP_NAME_MAX], why[WHY_MAX];
    const struct dp_op *ops;
    size_t n;
    va_list ap;

    ops = dp_sched_ops(c->s, rank, &n);
    name_op(opname, sizeof(opname), &ops[at]);
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    return fail(c, "rank %d, op %zu (%s): %s", rank, at, opname, why);
}

static int fail_nomem(struct ctx *c)
{
    return dx_errf(c->err, c->errlen, -ENOMEM, "out of memory");
}

/* malloc for count elements, at least one (a shape may have no units). */
static void *table(size_t count, size_t size)
{
    size_t n = count ? count : 1;
    return calloc(n, size);
}

/* --- units and messages -------------------------------------------------- */

/* Units are numbered path-major, then stage, then micro-batch. */
static size_t unit_key(const struct ctx *c, int path, int mb, int stage)
{
    return ((size_t)path * (size_t)c->stages + (size_t)stage) * (size_t)c->mbs + (size_t)mb;
}

static size_t work_key(const struct ctx *c, const struct dp_work *w)
{
    return unit_key(c, w->path, w->mb, w->stage);
}

/* The unit numbered key, and the rank that runs it. */
static struct dp_work unit_work(const struct ctx *c, size_t key, int *rank)
{
    struct dp_work w = {0};

    w.mb = (int)(key % (size_t)c->mbs);
    key /= (size_t)c->mbs;
    w.stage = (int)(key % (size_t)c->stages);
    w.path = (int)(key / (size_t)c->stages);
    dp_sched_locate(c->s, w.path, w.stage, rank, &w.chunk);
    return w;
}

static size_t msg_key(const struct ctx *c, int payload, const struct dp_work *w)
{
    return (size_t)payload * c->units + work_key(c, w);
}

/* The stage at the other end of a message: the consumer of what stage
 * produced. */
static int consumer_stage(int payload, int stage)
{
    return payload == DP_ACTIVATION ? stage + 1 : stage - 1;
}

/* --- rule 1: every op is well-formed --------------------------------------- */

/* Checks that w names a unit that exists; says why not in why. */
static int check_range(const struct ctx *c, const struct dp_work *w, char *why, size_t len)
{
    if (w->path < 0 || w->path >= c->paths)
        return dx_errf(why, len, -EINVAL, "path %d is out of range (%d path%s)", w->path, c->paths,
                       c->paths == 1 ? "" : "s");
    if (w->mb < 0 || w->mb >= c->mbs)
        return dx_errf(why, len, -EINVAL, "micro-batch %d is out of range (%d per path)", w->mb,
                       c->mbs);
    if (w->stage < 0 || w->stage >= c->stages)
        return dx_errf(why, len, -EINVAL, "stage %d is out of range (%d stages)", w->stage,
                       c->stages);
    return 0;
}

/* Checks that w's unit runs on rank, with w's chunk. */
static int check_placed(const struct ctx *c, int rank, const struct dp_work *w, char *why,
                        size_t len)
{
    char name[WORK_NAME_MAX];
    int at_rank, chunk;

    name_work(name, sizeof(name), w);
    if (dp_sched_locate(c->s, w->path, w->stage, &at_rank, &chunk) < 0)
        return dx_errf(why, len, -EINVAL, "%s has no place in the schedule", name);
    if (at_rank != rank)
        return dx_errf(why, len, -EINVAL, "%s belongs to rank %d, not rank %d", name, at_rank,
                       rank);
    if (w->chunk != chunk)
        return dx_errf(why, len, -EINVAL, "%s runs on chunk %d, not chunk %d", name, chunk,
                       w->chunk);
    return 0;
}

static int check_unit(const struct ctx *c, int rank, const struct dp_work *w, char *why, size_t len)
{
    if (check_range(c, w, why, len) < 0)
        return -EINVAL;
    return check_placed(c, rank, w, why, len);
}

/* A SEND (the producer is here) or a RECV (the consumer is here). */
static int check_message(const struct ctx *c, int rank, const struct dp_op *op, char *why,
                         size_t len)
{
    bool send = op->kind == DP_OP_SEND;
    char name[WORK_NAME_MAX];
    int other_stage, here_rank, other_rank, chunk;
    struct dp_work local;

    if (op->payload != DP_ACTIVATION && op->payload != DP_GRADIENT)
        return dx_errf(why, len, -EINVAL, "unknown payload %d", (int)op->payload);
    if (check_range(c, &op->work, why, len) < 0)
        return -EINVAL;
    if (op->peer < 0 || op->peer >= c->ranks)
        return dx_errf(why, len, -EINVAL, "peer %d is out of range (%d ranks)", op->peer, c->ranks);
    name_work(name, sizeof(name), &op->work);
    other_stage = consumer_stage(op->payload, op->work.stage);
    if (other_stage < 0 || other_stage >= c->stages)
        return dx_errf(why, len, -EINVAL, "no stage consumes the %s of %s",
                       payload_name(op->payload), name);
    if (send) {
        if (check_placed(c, rank, &op->work, why, len) < 0)
            return -EINVAL;
        dp_sched_locate(c->s, op->work.path, other_stage, &other_rank, &chunk);
    } else {
        local = op->work;
        local.stage = other_stage;
        dp_sched_locate(c->s, local.path, local.stage, &here_rank, &chunk);
        if (here_rank != rank)
            return dx_errf(why, len, -EINVAL, "the %s of %s is consumed on rank %d, not here",
                           payload_name(op->payload), name, here_rank);
        if (op->work.chunk != chunk)
            return dx_errf(why, len, -EINVAL, "the %s of %s is consumed by chunk %d, not chunk %d",
                           payload_name(op->payload), name, chunk, op->work.chunk);
        dp_sched_locate(c->s, op->work.path, op->work.stage, &other_rank, &chunk);
    }
    if (other_rank == rank)
        return dx_errf(why, len, -EINVAL, "the %s of %s is handed over on this rank, not %s",
                       payload_name(op->payload), name, send ? "sent" : "received");
    if (other_rank != op->peer)
        return dx_errf(why, len, -EINVAL, "the %s of %s %s rank %d, not rank %d",
                       payload_name(op->payload), name, send ? "goes to" : "comes from", other_rank,
                       op->peer);
    return 0;
}

static int check_op(const struct ctx *c, int rank, const struct dp_op *op, char *why, size_t len)
{
    char half[WHY_MAX];

    switch (op->kind) {
    case DP_OP_F:
    case DP_OP_B:
    case DP_OP_I:
    case DP_OP_W:
        return check_unit(c, rank, &op->work, why, len);
    case DP_OP_FB:
        if (check_unit(c, rank, &op->work, half, sizeof(half)) < 0)
            return dx_errf(why, len, -EINVAL, "forward half: %s", half);
        if (check_unit(c, rank, &op->work2, half, sizeof(half)) < 0)
            return dx_errf(why, len, -EINVAL, "backward half: %s", half);
        return 0;
    case DP_OP_SEND:
    case DP_OP_RECV:
        return check_message(c, rank, op, why, len);
    default:
        return dx_errf(why, len, -EINVAL, "unknown op kind %d", (int)op->kind);
    }
}

static int rule_well_formed(struct ctx *c)
{
    char why[WHY_MAX];
    const struct dp_op *ops;
    size_t n;

    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++)
            if (check_op(c, r, &ops[i], why, sizeof(why)) < 0)
                return fail_op(c, r, i, "%s", why);
    }
    return 0;
}

/* --- rule 2: one forward and one backward per unit --------------------------- */

static int rec_cmp(const void *a, const void *b)
{
    const struct rec *x = a, *y = b;

    if (x->key != y->key)
        return x->key < y->key ? -1 : 1;
    if (x->rank != y->rank)
        return x->rank < y->rank ? -1 : 1;
    if (x->at != y->at)
        return x->at < y->at ? -1 : 1;
    return (x->role > y->role) - (x->role < y->role);
}

static int collect_records(struct ctx *c, struct rec **out, size_t *count)
{
    const struct dp_op *ops;
    size_t n, total = 0, k = 0;
    struct rec *recs;

    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++)
            total += ops[i].kind == DP_OP_FB ? 2 : dp_op_is_compute(ops[i].kind) ? 1 : 0;
    }
    recs = table(total, sizeof(*recs));
    if (!recs)
        return -ENOMEM;
    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++) {
            const struct dp_op *op = &ops[i];
            struct rec rec = {.key = work_key(c, &op->work), .at = i, .rank = r};

            switch (op->kind) {
            case DP_OP_F:
                rec.role = ROLE_F;
                break;
            case DP_OP_B:
                rec.role = ROLE_B;
                break;
            case DP_OP_I:
                rec.role = ROLE_I;
                break;
            case DP_OP_W:
                rec.role = ROLE_W;
                break;
            case DP_OP_FB:
                rec.role = ROLE_F;
                recs[k++] = rec;
                rec.key = work_key(c, &op->work2);
                rec.role = ROLE_B;
                break;
            default:
                continue;
            }
            recs[k++] = rec;
        }
    }
    qsort(recs, k, sizeof(*recs), rec_cmp);
    *out = recs;
    *count = k;
    return 0;
}

/* The records of one unit, in op order. */
struct unit_recs {
    const struct rec *f[2], *bwd[2], *w[2]; /* the first two of each */
    const struct rec *b, *i;
    int nf, nbwd, nw;
};

static void tally(struct unit_recs *u, const struct rec *rec)
{
    switch (rec->role) {
    case ROLE_F:
        if (u->nf < 2)
            u->f[u->nf] = rec;
        u->nf++;
        break;
    case ROLE_B:
    case ROLE_I:
        if (u->nbwd < 2)
            u->bwd[u->nbwd] = rec;
        u->nbwd++;
        if (rec->role == ROLE_B)
            u->b = rec;
        else
            u->i = rec;
        break;
    default:
        if (u->nw < 2)
            u->w[u->nw] = rec;
        u->nw++;
        break;
    }
}

static int check_unit_recs(struct ctx *c, size_t key, const struct unit_recs *u)
{
    char name[WORK_NAME_MAX];
    int rank = 0;
    struct dp_work w = unit_work(c, key, &rank);

    name_work(name, sizeof(name), &w);
    if (u->nf == 0 && u->nbwd == 0 && u->nw == 0)
        return fail(c, "rank %d: %s is never run (no forward, no backward)", rank, name);
    if (u->nf == 0) {
        const struct rec *first = u->nbwd ? u->bwd[0] : u->w[0];
        return fail_op(c, first->rank, first->at, "%s has no forward", name);
    }
    if (u->nf > 1)
        return fail_op(c, u->f[1]->rank, u->f[1]->at, "%s has %d forwards (the first at op %zu)",
                       name, u->nf, u->f[0]->at);
    if (u->nbwd == 0)
        return fail_op(c, u->f[0]->rank, u->f[0]->at, "%s has no backward (B or I)", name);
    if (u->nbwd > 1)
        return fail_op(c, u->bwd[1]->rank, u->bwd[1]->at,
                       "%s has %d backwards (the first at op %zu)", name, u->nbwd, u->bwd[0]->at);
    if (u->b && u->nw)
        return fail_op(c, u->w[0]->rank, u->w[0]->at,
                       "%s had a full B (op %zu), so it has no weight-gradient job for W", name,
                       u->b->at);
    if (u->i && u->nw == 0)
        return fail_op(c, u->i->rank, u->i->at,
                       "the weight-gradient job this I queues for %s never runs (no W)", name);
    if (u->nw > 1)
        return fail_op(c, u->w[1]->rank, u->w[1]->at, "%s has %d W (the first at op %zu)", name,
                       u->nw, u->w[0]->at);
    if (u->i && u->w[0]->at < u->i->at)
        return fail_op(c, u->w[0]->rank, u->w[0]->at, "W of %s comes before its I (op %zu)", name,
                       u->i->at);
    return 0;
}

static int rule_one_each(struct ctx *c)
{
    struct rec *recs = NULL;
    size_t nrec = 0, i = 0;
    int rc;

    if ((rc = collect_records(c, &recs, &nrec)) < 0)
        return fail_nomem(c);
    /* Records are sorted by unit; a unit with none ends the walk at once, so
     * it visits at most nrec + 1 units however many the shape declares. */
    for (size_t key = 0; key < c->units; key++) {
        struct unit_recs u = {0};

        for (; i < nrec && recs[i].key == key; i++)
            tally(&u, &recs[i]);
        if ((rc = check_unit_recs(c, key, &u)) < 0)
            goto out;
    }
out:
    free(recs);
    return rc;
}

/* --- tables for rules 3-6 ------------------------------------------------------ */

static int alloc_tables(struct ctx *c)
{
    size_t nmsg = N_PAYLOADS * c->units;
    const struct dp_op *ops;
    size_t n;

    c->fwd_at = table(c->units, sizeof(size_t));
    c->bwd_at = table(c->units, sizeof(size_t));
    c->send_at = table(nmsg, sizeof(size_t));
    c->recv_at = table(nmsg, sizeof(size_t));
    c->send_ord = table(nmsg, sizeof(size_t));
    c->recv_ord = table(nmsg, sizeof(size_t));
    if (!c->fwd_at || !c->bwd_at || !c->send_at || !c->recv_at || !c->send_ord || !c->recv_ord)
        return -ENOMEM;
    for (size_t k = 0; k < nmsg; k++)
        c->send_at[k] = c->recv_at[k] = NONE;
    /* Rule 2 holds: every unit has exactly one forward and one backward. */
    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++) {
            if (ops[i].kind == DP_OP_F || ops[i].kind == DP_OP_FB)
                c->fwd_at[work_key(c, &ops[i].work)] = i;
            if (ops[i].kind == DP_OP_B || ops[i].kind == DP_OP_I)
                c->bwd_at[work_key(c, &ops[i].work)] = i;
            if (ops[i].kind == DP_OP_FB)
                c->bwd_at[work_key(c, &ops[i].work2)] = i;
        }
    }
    return 0;
}

static void free_tables(struct ctx *c)
{
    free(c->fwd_at);
    free(c->bwd_at);
    free(c->send_at);
    free(c->recv_at);
    free(c->send_ord);
    free(c->recv_ord);
}

/* --- rule 3: W pops the oldest queued job -------------------------------------- */

static int rule_w_fifo(struct ctx *c)
{
    char want[WORK_NAME_MAX], got[WORK_NAME_MAX];
    const struct dp_op *ops;
    size_t n, head, tail, *queue;
    int rc = 0;

    /* Rule 2 holds, so a rank queues at most one job per unit. */
    queue = table(c->units, sizeof(*queue));
    if (!queue)
        return fail_nomem(c);
    for (int r = 0; r < c->ranks && rc == 0; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        head = tail = 0;
        for (size_t i = 0; i < n && rc == 0; i++) {
            if (ops[i].kind == DP_OP_I && tail < c->units) {
                queue[tail++] = work_key(c, &ops[i].work);
            } else if (ops[i].kind == DP_OP_W) {
                struct dp_work oldest;
                int at;

                if (head == tail) {
                    rc = fail_op(c, r, i, "W with no queued weight-gradient job");
                    break;
                }
                if (queue[head] != work_key(c, &ops[i].work)) {
                    oldest = unit_work(c, queue[head], &at);
                    name_work(want, sizeof(want), &oldest);
                    name_work(got, sizeof(got), &ops[i].work);
                    rc = fail_op(c, r, i, "W runs %s but the oldest queued job is %s", got, want);
                    break;
                }
                head++;
            }
        }
    }
    free(queue);
    return rc;
}

/* --- rule 4: backward after forward ------------------------------------------- */

static int check_after_forward(struct ctx *c, int rank, size_t at, const struct dp_work *w)
{
    size_t f = c->fwd_at[work_key(c, w)];
    char name[WORK_NAME_MAX];

    if (f < at)
        return 0;
    name_work(name, sizeof(name), w);
    if (f == at)
        return fail_op(c, rank, at, "backward of %s in the same FB as its forward", name);
    return fail_op(c, rank, at, "backward before its forward (op %zu)", f);
}

static int rule_backward_after_forward(struct ctx *c)
{
    const struct dp_op *ops;
    size_t n;
    int rc;

    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++) {
            if (ops[i].kind == DP_OP_B || ops[i].kind == DP_OP_I)
                rc = check_after_forward(c, r, i, &ops[i].work);
            else if (ops[i].kind == DP_OP_FB)
                rc = check_after_forward(c, r, i, &ops[i].work2);
            else
                rc = 0;
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

/* --- rule 5: messages ---------------------------------------------------------- */

/* Notes every send and receive; a message named twice is an error. */
static int index_messages(struct ctx *c)
{
    const struct dp_op *ops;
    size_t n, *sent_to, *recvd_from;
    int rc = 0;

    sent_to = malloc((size_t)c->ranks * sizeof(*sent_to));
    recvd_from = malloc((size_t)c->ranks * sizeof(*recvd_from));
    if (!sent_to || !recvd_from) {
        rc = fail_nomem(c);
        goto out;
    }
    for (int r = 0; r < c->ranks && rc == 0; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        memset(sent_to, 0, (size_t)c->ranks * sizeof(*sent_to));
        memset(recvd_from, 0, (size_t)c->ranks * sizeof(*recvd_from));
        for (size_t i = 0; i < n && rc == 0; i++) {
            const struct dp_op *op = &ops[i];
            size_t m;

            if (op->kind != DP_OP_SEND && op->kind != DP_OP_RECV)
                continue;
            m = msg_key(c, op->payload, &op->work);
            if (op->kind == DP_OP_SEND) {
                if (c->send_at[m] != NONE)
                    rc = fail_op(c, r, i, "sends it a second time (the first at op %zu)",
                                 c->send_at[m]);
                c->send_at[m] = i;
                c->send_ord[m] = sent_to[op->peer]++;
            } else {
                if (c->recv_at[m] != NONE)
                    rc = fail_op(c, r, i, "receives it a second time (the first at op %zu)",
                                 c->recv_at[m]);
                c->recv_at[m] = i;
                c->recv_ord[m] = recvd_from[op->peer]++;
            }
        }
    }
out:
    free(sent_to);
    free(recvd_from);
    return rc;
}

static int check_matched(struct ctx *c)
{
    const struct dp_op *ops;
    size_t n;

    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++) {
            size_t m;

            if (ops[i].kind != DP_OP_SEND && ops[i].kind != DP_OP_RECV)
                continue;
            m = msg_key(c, ops[i].payload, &ops[i].work);
            if (ops[i].kind == DP_OP_SEND && c->recv_at[m] == NONE)
                return fail_op(c, r, i, "rank %d never receives it", ops[i].peer);
            if (ops[i].kind == DP_OP_RECV && c->send_at[m] == NONE)
                return fail_op(c, r, i, "rank %d never sends it", ops[i].peer);
        }
    }
    return 0;
}

/* With every message sent once and received once, a pair's sequences are
 * equal exactly when each message has the same position in both. */
static int check_order(struct ctx *c)
{
    const struct dp_op *ops;
    size_t n;

    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++) {
            size_t m;

            if (ops[i].kind != DP_OP_SEND)
                continue;
            m = msg_key(c, ops[i].payload, &ops[i].work);
            if (c->send_ord[m] != c->recv_ord[m])
                return fail_op(c, r, i,
                               "messages from rank %d to rank %d arrive in a different order "
                               "than sent: this one is sent as message %zu and received as "
                               "message %zu (rank %d, op %zu)",
                               r, ops[i].peer, c->send_ord[m] + 1, c->recv_ord[m] + 1, ops[i].peer,
                               c->recv_at[m]);
        }
    }
    return 0;
}

/* The input of w's forward (payload activation) or backward (gradient)
 * comes from the unit at the neighbouring stage: received before `at` when
 * that unit runs elsewhere, computed before `at` when it runs here. */
static int check_input(struct ctx *c, int rank, size_t at, const struct dp_work *w, int payload)
{
    struct dp_work from = *w;
    char name[WORK_NAME_MAX];
    int from_rank, chunk;
    size_t m, done;

    from.stage = payload == DP_ACTIVATION ? w->stage - 1 : w->stage + 1;
    if (from.stage < 0 || from.stage >= c->stages)
        return 0; /* the path's input or its loss */
    dp_sched_locate(c->s, from.path, from.stage, &from_rank, &chunk);
    name_work(name, sizeof(name), &from);
    if (from_rank == rank) {
        done = payload == DP_ACTIVATION ? c->fwd_at[work_key(c, &from)]
                                        : c->bwd_at[work_key(c, &from)];
        if (done > at)
            return fail_op(c, rank, at,
                           "runs before the %s of %s (op %zu) that hands it its %s on this rank",
                           payload == DP_ACTIVATION ? "forward" : "backward", name, done,
                           payload_name(payload));
        return 0;
    }
    m = msg_key(c, payload, &from);
    if (c->recv_at[m] == NONE)
        return fail_op(c, rank, at, "no receive of %s %s from rank %d before it",
                       payload_name(payload), name, from_rank);
    if (c->recv_at[m] > at)
        return fail_op(c, rank, at, "the receive of %s %s from rank %d comes after it (op %zu)",
                       payload_name(payload), name, from_rank, c->recv_at[m]);
    return 0;
}

static int check_inputs_and_sends(struct ctx *c)
{
    const struct dp_op *ops;
    size_t n, done;
    int rc = 0;

    for (int r = 0; r < c->ranks; r++) {
        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n && rc == 0; i++) {
            const struct dp_op *op = &ops[i];

            switch (op->kind) {
            case DP_OP_F:
                rc = check_input(c, r, i, &op->work, DP_ACTIVATION);
                break;
            case DP_OP_B:
            case DP_OP_I:
                rc = check_input(c, r, i, &op->work, DP_GRADIENT);
                break;
            case DP_OP_FB:
                if ((rc = check_input(c, r, i, &op->work, DP_ACTIVATION)) == 0)
                    rc = check_input(c, r, i, &op->work2, DP_GRADIENT);
                break;
            case DP_OP_SEND:
                done = op->payload == DP_ACTIVATION ? c->fwd_at[work_key(c, &op->work)]
                                                    : c->bwd_at[work_key(c, &op->work)];
                if (done > i)
                    rc = fail_op(c, r, i, "sent before it is computed (op %zu)", done);
                break;
            default:
                break;
            }
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int rule_messages(struct ctx *c)
{
    int rc;

    if ((rc = index_messages(c)) < 0 || (rc = check_matched(c)) < 0 || (rc = check_order(c)) < 0)
        return rc;
    return check_inputs_and_sends(c);
}

/* --- rule 6: no deadlock ---------------------------------------------------------- */

/* Appends to a report, keeping it NUL-terminated when it does not fit. */
struct report {
    char *buf;
    size_t len, used;
};

static void report_add(struct report *rp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void report_add(struct report *rp, const char *fmt, ...)
{
    va_list ap;
    int k;

    if (!rp->buf || rp->used + 1 >= rp->len)
        return;
    va_start(ap, fmt);
    k = vsnprintf(rp->buf + rp->used, rp->len - rp->used, fmt, ap);
    va_end(ap);
    if (k > 0)
        rp->used = rp->used + (size_t)k < rp->len ? rp->used + (size_t)k : rp->len - 1;
}

/* The rank that stuck rank r waits for (the peer of its RECV at pc[r]), or
 * -1 when r is not stuck. */
static int waits_for(const struct ctx *c, const size_t *pc, int r)
{
    size_t n;
    const struct dp_op *ops = dp_sched_ops(c->s, r, &n);

    return pc[r] < n && ops[pc[r]].kind == DP_OP_RECV ? ops[pc[r]].peer : -1;
}

/* Names a cycle of waiting ranks. Every stuck rank waits for a stuck rank
 * (every receive has its send, sends never block), so following the waits
 * from any stuck rank closes a cycle. */
static int report_deadlock(struct ctx *c, const size_t *pc, int stuck)
{
    struct report rp = {.buf = c->err, .len = c->errlen};
    int *seen, r = -1, first;

    seen = calloc((size_t)c->ranks, sizeof(*seen));
    if (!seen)
        return fail_nomem(c);
    for (int k = 0; k < c->ranks && r < 0; k++)
        if (waits_for(c, pc, k) >= 0)
            r = k;
    while (r >= 0 && !seen[r]) { /* walk the wait-for chain until it closes */
        seen[r] = 1;
        r = waits_for(c, pc, r);
    }
    first = r; /* on the cycle; name it from its lowest rank */
    for (int k = r >= 0 ? waits_for(c, pc, r) : -1; k >= 0 && k != r; k = waits_for(c, pc, k))
        if (k < first)
            first = k;
    report_add(&rp, "deadlock:");
    r = first;
    for (int named = 0; r >= 0 && waits_for(c, pc, r) >= 0 && named < c->ranks; named++) {
        char name[WORK_NAME_MAX];
        size_t n;
        const struct dp_op *op = &dp_sched_ops(c->s, r, &n)[pc[r]];

        name_work(name, sizeof(name), &op->work);
        report_add(&rp, "%s rank %d waits at op %zu for %s %s from rank %d", r == first ? "" : ";",
                   r, pc[r], payload_name(op->payload), name, op->peer);
        r = op->peer == first ? -1 : op->peer;
    }
    report_add(&rp, " (%d of %d ranks stuck)", stuck, c->ranks);
    free(seen);
    return -EINVAL;
}

static int rule_no_deadlock(struct ctx *c)
{
    size_t nmsg = N_PAYLOADS * c->units, *pc = NULL, *waits = NULL;
    int *ready = NULL, nready = 0, stuck = 0, rc = 0;
    unsigned char *sent = NULL;
    const struct dp_op *ops;
    size_t n;

    pc = calloc((size_t)c->ranks, sizeof(*pc));
    waits = malloc((size_t)c->ranks * sizeof(*waits));
    ready = malloc((size_t)c->ranks * sizeof(*ready));
    sent = calloc(nmsg ? nmsg : 1, 1);
    if (!pc || !waits || !ready || !sent) {
        rc = fail_nomem(c);
        goto out;
    }
    for (int r = c->ranks - 1; r >= 0; r--) {
        waits[r] = NONE;
        ready[nready++] = r;
    }
    /* Each op runs once and each send wakes at most one rank. */
    while (nready > 0) {
        int r = ready[--nready];

        ops = dp_sched_ops(c->s, r, &n);
        for (; pc[r] < n; pc[r]++) {
            const struct dp_op *op = &ops[pc[r]];
            size_t m;

            if (op->kind != DP_OP_SEND && op->kind != DP_OP_RECV)
                continue;
            m = msg_key(c, op->payload, &op->work);
            if (op->kind == DP_OP_RECV && !sent[m]) {
                waits[r] = m;
                break;
            }
            if (op->kind == DP_OP_SEND) {
                sent[m] = 1;
                if (waits[op->peer] == m) {
                    waits[op->peer] = NONE;
                    ready[nready++] = op->peer;
                }
            }
        }
    }
    for (int r = 0; r < c->ranks; r++) {
        (void)dp_sched_ops(c->s, r, &n);
        stuck += pc[r] < n;
    }
    if (stuck)
        rc = report_deadlock(c, pc, stuck);
out:
    free(pc);
    free(waits);
    free(ready);
    free(sent);
    return rc;
}

/* --- measures ------------------------------------------------------------------------ */

static int measure(struct ctx *c, struct dp_validation *v)
{
    const struct dp_op *ops;
    size_t n;

    v->peak_activations = calloc((size_t)c->ranks, sizeof(int));
    if (!v->peak_activations)
        return fail_nomem(c);
    v->ranks = c->ranks;
    v->param_copies = dp_sched_chunks_per_rank(c->s);
    v->max_peak_activations = 0;
    for (int r = 0; r < c->ranks; r++) {
        int live = 0, peak = 0;

        ops = dp_sched_ops(c->s, r, &n);
        for (size_t i = 0; i < n; i++) {
            switch (ops[i].kind) {
            case DP_OP_F:
                if (++live > peak)
                    peak = live;
                break;
            case DP_OP_B:
            case DP_OP_I:
                live--;
                break;
            case DP_OP_FB:
                if (live + 1 > peak)
                    peak = live + 1;
                break;
            default:
                break;
            }
        }
        v->peak_activations[r] = peak;
        if (peak > v->max_peak_activations)
            v->max_peak_activations = peak;
    }
    return 0;
}

/* --- entry points -------------------------------------------------------------------- */

int dp_validate(const dp_sched_t *s, struct dp_validation *v, char *err, size_t errlen)
{
    struct ctx c = {.s = s, .err = err, .errlen = errlen};
    struct dp_validation out = {0};
    int rc;

    if (err && errlen)
        err[0] = '\0';
    if (v)
        memset(v, 0, sizeof(*v));
    if (!s)
        return fail(&c, "no schedule");
    c.ranks = dp_sched_ranks(s);
    c.stages = dp_sched_stages(s);
    c.paths = dp_sched_paths(s);
    c.mbs = dp_sched_path_microbatches(s);
    c.units = (size_t)c.paths * (size_t)c.stages * (size_t)c.mbs;
    if ((rc = rule_well_formed(&c)) < 0 || (rc = rule_one_each(&c)) < 0)
        return rc;
    if (alloc_tables(&c) < 0) {
        rc = fail_nomem(&c);
        goto out;
    }
    if ((rc = rule_w_fifo(&c)) < 0 || (rc = rule_backward_after_forward(&c)) < 0 ||
        (rc = rule_messages(&c)) < 0 || (rc = rule_no_deadlock(&c)) < 0)
        goto out;
    if (v) {
        if ((rc = measure(&c, &out)) < 0)
            goto out;
        *v = out;
    }
out:
    free_tables(&c);
    return rc;
}

void dp_validation_clear(struct dp_validation *v)
{
    if (!v)
        return;
    free(v->peak_activations);
    memset(v, 0, sizeof(*v));
}
