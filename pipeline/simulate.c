/* simulate.c - the discrete-event simulator and the cost-spec parser (see
 * simulate.h). Owns the message table of one dp_simulate call and the result
 * arrays it hands back (freed by dp_sim_result_clear).
 *
 * Ranks run from a ready stack: each runs its ops in order until it finishes
 * or reaches a receive whose message has not been sent yet; it then waits
 * until a send to it wakes it. Every op is run once and every send wakes at
 * most one rank, so a simulation costs O(total ops). Messages are matched by
 * their full name (payload, producer's path, mb and stage, sender and
 * receiver); equal names are matched first-sent, first-received.
 */
#include "pipeline/simulate.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/log.h"

#define DEFAULT_F 1.0
#define DEFAULT_B 2.0
#define DEFAULT_W 1.0

#define MSG_TABLE_MIN 64  /* slots in the smallest message table */
#define MSG_TABLE_LOAD 2  /* slots per message, at least */
#define STUCK_NAMED_MAX 8 /* ranks named one by one in a deadlock report */
#define SPEC_SHOWN_MAX 32 /* characters of a bad key or value quoted back */

/* --- costs ----------------------------------------------------------------- */

enum cost_key {
    KEY_F,
    KEY_B,
    KEY_I,
    KEY_W,
    KEY_FB,
    KEY_LAT,
    KEY_BW,
    KEY_ACT,
    KEY_GRAD,
    N_COST_KEYS,
};

static const char *const cost_names[N_COST_KEYS] = {
    [KEY_F] = "F",     [KEY_B] = "B",   [KEY_I] = "I",     [KEY_W] = "W",       [KEY_FB] = "FB",
    [KEY_LAT] = "lat", [KEY_BW] = "bw", [KEY_ACT] = "act", [KEY_GRAD] = "grad",
};

void dp_costs_default(struct dp_costs *c)
{
    memset(c, 0, sizeof(*c));
    c->f = DEFAULT_F;
    c->b = DEFAULT_B;
    c->w = DEFAULT_W;
    c->i = DEFAULT_B - DEFAULT_W;
    c->fb = DEFAULT_F + DEFAULT_B;
}

static double *cost_field(struct dp_costs *c, enum cost_key key)
{
    switch (key) {
    case KEY_F:
        return &c->f;
    case KEY_B:
        return &c->b;
    case KEY_I:
        return &c->i;
    case KEY_W:
        return &c->w;
    case KEY_FB:
        return &c->fb;
    case KEY_LAT:
        return &c->latency;
    case KEY_BW:
        return &c->bandwidth;
    case KEY_ACT:
        return &c->act_bytes;
    default:
        return &c->grad_bytes;
    }
}

static bool is_space(char ch)
{
    return ch == ' ' || ch == '\t';
}

/* Trims blanks off [*b, *e). */
static void trim(const char **b, const char **e)
{
    while (*b < *e && is_space(**b))
        (*b)++;
    while (*e > *b && is_space((*e)[-1]))
        (*e)--;
}

static int shown_len(const char *b, const char *e)
{
    return e - b > SPEC_SHOWN_MAX ? SPEC_SHOWN_MAX : (int)(e - b);
}

/* Parses one "key=value" item [b, e) into next; *key gets which key it was. */
static int parse_item(const char *b, const char *e, struct dp_costs *next, enum cost_key *key,
                      char *err, size_t errlen)
{
    const char *eq = memchr(b, '=', (size_t)(e - b));
    const char *kb = b, *ke = eq ? eq : e, *vb, *ve;
    const char *name = NULL;
    char *endp;
    double v;

    trim(&kb, &ke);
    if (kb == ke) {
        if (!eq)
            return dx_errf(err, errlen, -EINVAL,
                           "costs: empty item (two commas, or a comma at an end)");
        return dx_errf(err, errlen, -EINVAL, "costs: item '%.*s' has no key (expected KEY=NUMBER)",
                       shown_len(b, e), b);
    }
    for (int k = 0; k < N_COST_KEYS; k++) {
        if (strlen(cost_names[k]) == (size_t)(ke - kb) &&
            strncasecmp(cost_names[k], kb, (size_t)(ke - kb)) == 0) {
            name = cost_names[k];
            *key = (enum cost_key)k;
        }
    }
    if (!name)
        return dx_errf(err, errlen, -EINVAL,
                       "costs: unknown key '%.*s' (expected F, B, I, W, FB, lat, bw, act or grad)",
                       shown_len(kb, ke), kb);
    if (!eq)
        return dx_errf(err, errlen, -EINVAL, "costs: %s has no value (expected %s=NUMBER)", name,
                       name);
    vb = eq + 1;
    ve = e;
    trim(&vb, &ve);
    if (vb == ve)
        return dx_errf(err, errlen, -EINVAL, "costs: %s has an empty value (expected %s=NUMBER)",
                       name, name);
    v = strtod(vb, &endp);
    if (endp != ve || endp == vb)
        return dx_errf(err, errlen, -EINVAL, "costs: %s value '%.*s' is not a number", name,
                       shown_len(vb, ve), vb);
    if (!isfinite(v))
        return dx_errf(err, errlen, -EINVAL, "costs: %s value '%.*s' is not a finite number", name,
                       shown_len(vb, ve), vb);
    if (v < 0)
        return dx_errf(err, errlen, -EINVAL, "costs: %s value '%.*s' is negative", name,
                       shown_len(vb, ve), vb);
    *cost_field(next, *key) = v;
    return 0;
}

int dp_costs_parse(const char *spec, struct dp_costs *c, char *err, size_t errlen)
{
    struct dp_costs next = *c;
    bool given[N_COST_KEYS] = {false};
    const char *p = spec ? spec : "";
    enum cost_key k = KEY_F;
    int rc;

    while (*p) {
        const char *comma = strchr(p, ',');
        const char *e = comma ? comma : p + strlen(p);

        if ((rc = parse_item(p, e, &next, &k, err, errlen)) < 0)
            return rc;
        given[k] = true;
        p = comma ? comma + 1 : e;
        if (comma && !*p)
            return dx_errf(err, errlen, -EINVAL,
                           "costs: empty item (two commas, or a comma at an end)");
    }
    if (!given[KEY_I]) {
        if (next.w > next.b)
            return dx_errf(err, errlen, -EINVAL,
                           "costs: W (%g) is larger than B (%g), so I = B - W would be negative; "
                           "give I explicitly",
                           next.w, next.b);
        next.i = next.b - next.w;
    }
    if (!given[KEY_FB])
        next.fb = next.f + next.b;
    *c = next;
    return 0;
}

/* Every cost must be a finite, non-negative number. */
static int check_costs(const struct dp_costs *c, char *err, size_t errlen)
{
    struct dp_costs copy = *c;

    for (int k = 0; k < N_COST_KEYS; k++) {
        double v = *cost_field(&copy, (enum cost_key)k);
        if (!isfinite(v) || v < 0)
            return dx_errf(err, errlen, -EINVAL,
                           "simulate: cost %s is %g, not a finite non-negative number",
                           cost_names[k], v);
    }
    return 0;
}

/* --- messages in flight ------------------------------------------------------ */

struct msg_key {
    int payload, path, mb, stage; /* the message's name */
    int from, to;                 /* sender and receiver ranks */
};

struct msg {
    struct msg_key key;
    double arrival;
    bool used;     /* the slot holds a message */
    bool received; /* ... which a receive has taken (kept so probe chains stay whole) */
};

struct msg_table {
    struct msg *slots;
    size_t mask;
};

static int msg_table_init(struct msg_table *t, size_t messages)
{
    size_t cap = MSG_TABLE_MIN;

    while (cap < MSG_TABLE_LOAD * messages)
        cap *= 2;
    t->slots = calloc(cap, sizeof(*t->slots));
    t->mask = cap - 1;
    return t->slots ? 0 : -ENOMEM;
}

static size_t msg_hash(const struct msg_key *k)
{
    const uint64_t mul = 0x9e3779b97f4a7c15ULL;
    uint64_t h = (uint64_t)(unsigned)k->payload;

    h = (h * mul) ^ (uint32_t)k->path;
    h = (h * mul) ^ (uint32_t)k->mb;
    h = (h * mul) ^ (uint32_t)k->stage;
    h = (h * mul) ^ (uint32_t)k->from;
    h = (h * mul) ^ (uint32_t)k->to;
    h *= mul;
    return (size_t)(h ^ (h >> 29));
}

static bool msg_key_eq(const struct msg_key *a, const struct msg_key *b)
{
    return a->payload == b->payload && a->path == b->path && a->mb == b->mb &&
           a->stage == b->stage && a->from == b->from && a->to == b->to;
}

/* The table has room for every send of the schedule, so this cannot fail. */
static void msg_put(struct msg_table *t, const struct msg_key *k, double arrival)
{
    size_t i = msg_hash(k) & t->mask;

    while (t->slots[i].used)
        i = (i + 1) & t->mask;
    t->slots[i] = (struct msg){.key = *k, .arrival = arrival, .used = true};
}

/* The earliest-sent message of that name not yet received, or NULL. */
static struct msg *msg_find(struct msg_table *t, const struct msg_key *k)
{
    for (size_t i = msg_hash(k) & t->mask; t->slots[i].used; i = (i + 1) & t->mask) {
        if (!t->slots[i].received && msg_key_eq(&t->slots[i].key, k))
            return &t->slots[i];
    }
    return NULL;
}

/* --- simulation -------------------------------------------------------------- */

struct rank_state {
    size_t pc;    /* next op */
    double t;     /* when the rank is free */
    int live;     /* live activations */
    bool waiting; /* blocked on the receive at pc */
};

struct sim {
    const dp_sched_t *s;
    const struct dp_costs *c;
    struct dp_sim_result *r;
    struct rank_state *st;
    struct msg_table msgs;
    int *ready; /* stack of ranks to run; a rank is in it at most once */
    int n_ready;
};

static double compute_cost(const struct dp_costs *c, enum dp_op_kind kind)
{
    switch (kind) {
    case DP_OP_F:
        return c->f;
    case DP_OP_B:
        return c->b;
    case DP_OP_I:
        return c->i;
    case DP_OP_W:
        return c->w;
    default:
        return c->fb;
    }
}

static double transfer_time(const struct dp_costs *c, enum dp_payload payload)
{
    double bytes = payload == DP_ACTIVATION ? c->act_bytes : c->grad_bytes;
    return c->latency + (c->bandwidth > 0 ? bytes / c->bandwidth : 0);
}

static struct msg_key key_of(const struct dp_op *op, int from, int to)
{
    return (struct msg_key){.payload = (int)op->payload,
                            .path = op->work.path,
                            .mb = op->work.mb,
                            .stage = op->work.stage,
                            .from = from,
                            .to = to};
}

static void run_compute(struct sim *m, int rank, const struct dp_op *op)
{
    struct rank_state *st = &m->st[rank];
    double cost = compute_cost(m->c, op->kind);

    m->r->start[rank][st->pc] = st->t;
    st->t += cost;
    m->r->end[rank][st->pc] = st->t;
    m->r->busy[rank] += cost;
    if (op->kind == DP_OP_F || op->kind == DP_OP_FB) {
        st->live++;
        if (st->live > m->r->peak_activations[rank])
            m->r->peak_activations[rank] = st->live;
    }
    if (op->kind == DP_OP_B || op->kind == DP_OP_I || op->kind == DP_OP_FB)
        st->live--;
}

/* Runs rank until it finishes or waits on a message not sent yet. */
static void run_rank(struct sim *m, int rank)
{
    struct rank_state *st = &m->st[rank];
    size_t n;
    const struct dp_op *ops = dp_sched_ops(m->s, rank, &n);

    for (; st->pc < n; st->pc++) {
        const struct dp_op *op = &ops[st->pc];
        struct msg_key k;
        struct msg *msg;

        switch (op->kind) {
        case DP_OP_SEND:
            k = key_of(op, rank, op->peer);
            msg_put(&m->msgs, &k, st->t + transfer_time(m->c, op->payload));
            if (m->st[op->peer].waiting) {
                m->st[op->peer].waiting = false;
                m->ready[m->n_ready++] = op->peer;
            }
            break;
        case DP_OP_RECV:
            k = key_of(op, op->peer, rank);
            msg = msg_find(&m->msgs, &k);
            if (!msg) {
                st->waiting = true;
                return;
            }
            msg->received = true;
            if (msg->arrival > st->t)
                st->t = msg->arrival;
            break;
        default:
            run_compute(m, rank, op);
            continue;
        }
        m->r->start[rank][st->pc] = m->r->end[rank][st->pc] = st->t;
    }
}

static void describe_wait(const dp_sched_t *s, int rank, size_t pc, char *buf, size_t len)
{
    size_t n;
    const struct dp_op *op = &dp_sched_ops(s, rank, &n)[pc];
    char path[32] = "";

    if (dp_sched_paths(s) > 1)
        snprintf(path, sizeof(path), "path %d ", op->work.path);
    snprintf(buf, len, "rank %d waits at op %zu for the %s of %smb %d stage %d from rank %d", rank,
             pc, op->payload == DP_ACTIVATION ? "activation" : "gradient", path, op->work.mb,
             op->work.stage, op->peer);
}

/* Names the ranks that did not finish; returns how many there are. */
static int report_stuck(const struct sim *m, char *err, size_t errlen)
{
    int P = dp_sched_ranks(m->s), stuck = 0;
    size_t used = 0;
    char line[160];

    if (errlen == 0)
        err = NULL; /* count only */
    else
        used = (size_t)snprintf(err, errlen, "deadlock:");
    for (int rank = 0; rank < P; rank++) {
        size_t n;
        dp_sched_ops(m->s, rank, &n);
        if (m->st[rank].pc >= n)
            continue;
        if (++stuck > STUCK_NAMED_MAX || !err)
            continue;
        describe_wait(m->s, rank, m->st[rank].pc, line, sizeof(line));
        if (used < errlen)
            used +=
                (size_t)snprintf(err + used, errlen - used, "%s %s", stuck > 1 ? ";" : "", line);
    }
    if (err && stuck > STUCK_NAMED_MAX && used < errlen)
        snprintf(err + used, errlen - used, "; and %d more ranks", stuck - STUCK_NAMED_MAX);
    return stuck;
}

/* Checks what the simulation relies on: known op kinds and peers in range.
 * Counts the sends into *sends. */
static int check_ops(const dp_sched_t *s, size_t *sends, char *err, size_t errlen)
{
    int P = dp_sched_ranks(s);

    *sends = 0;
    for (int rank = 0; rank < P; rank++) {
        size_t n;
        const struct dp_op *ops = dp_sched_ops(s, rank, &n);

        for (size_t i = 0; i < n; i++) {
            bool msg = ops[i].kind == DP_OP_SEND || ops[i].kind == DP_OP_RECV;
            if (!msg && !dp_op_is_compute(ops[i].kind))
                return dx_errf(err, errlen, -EINVAL,
                               "simulate: rank %d, op %zu: unknown op kind %d", rank, i,
                               (int)ops[i].kind);
            if (msg && (ops[i].peer < 0 || ops[i].peer >= P))
                return dx_errf(err, errlen, -EINVAL,
                               "simulate: rank %d, op %zu (%s): peer %d is not a rank", rank, i,
                               dp_op_kind_name(ops[i].kind), ops[i].peer);
            if (ops[i].kind == DP_OP_SEND)
                (*sends)++;
        }
    }
    return 0;
}

static int result_alloc(const dp_sched_t *s, struct dp_sim_result *r)
{
    int P = dp_sched_ranks(s);

    r->ranks = P;
    r->busy = calloc((size_t)P, sizeof(*r->busy));
    r->idle = calloc((size_t)P, sizeof(*r->idle));
    r->peak_activations = calloc((size_t)P, sizeof(*r->peak_activations));
    r->start = calloc((size_t)P, sizeof(*r->start));
    r->end = calloc((size_t)P, sizeof(*r->end));
    if (!r->busy || !r->idle || !r->peak_activations || !r->start || !r->end)
        return -ENOMEM;
    for (int rank = 0; rank < P; rank++) {
        size_t n;
        dp_sched_ops(s, rank, &n);
        /* one extra slot so an empty list still gets an array */
        r->start[rank] = calloc(n + 1, sizeof(**r->start));
        r->end[rank] = calloc(n + 1, sizeof(**r->end));
        if (!r->start[rank] || !r->end[rank])
            return -ENOMEM;
    }
    return 0;
}

int dp_simulate(const dp_sched_t *s, const struct dp_costs *c, struct dp_sim_result *r, char *err,
                size_t errlen)
{
    struct sim m = {.s = s, .c = c, .r = r};
    int P = dp_sched_ranks(s);
    size_t sends;
    int rc;

    memset(r, 0, sizeof(*r));
    if ((rc = check_costs(c, err, errlen)) < 0 || (rc = check_ops(s, &sends, err, errlen)) < 0)
        return rc;
    m.st = calloc((size_t)P, sizeof(*m.st));
    m.ready = calloc((size_t)P, sizeof(*m.ready));
    if (!m.st || !m.ready || msg_table_init(&m.msgs, sends) < 0 || result_alloc(s, r) < 0) {
        rc = dx_errf(err, errlen, -ENOMEM, "simulate: out of memory");
        goto fail;
    }
    for (int rank = P - 1; rank >= 0; rank--)
        m.ready[m.n_ready++] = rank;
    while (m.n_ready > 0)
        run_rank(&m, m.ready[--m.n_ready]);
    if (report_stuck(&m, err, errlen) > 0) {
        rc = -EDEADLK;
        goto fail;
    }
    for (int rank = 0; rank < P; rank++)
        if (m.st[rank].t > r->makespan)
            r->makespan = m.st[rank].t;
    for (int rank = 0; rank < P; rank++) {
        r->idle[rank] = r->makespan - r->busy[rank];
        if (r->idle[rank] > r->bubble)
            r->bubble = r->idle[rank];
    }
    if (errlen > 0)
        err[0] = '\0';
    rc = 0;
fail:
    if (rc < 0)
        dp_sim_result_clear(r);
    free(m.msgs.slots);
    free(m.ready);
    free(m.st);
    return rc;
}

void dp_sim_result_clear(struct dp_sim_result *r)
{
    for (int rank = 0; rank < r->ranks; rank++) {
        if (r->start)
            free(r->start[rank]);
        if (r->end)
            free(r->end[rank]);
    }
    free(r->start);
    free(r->end);
    free(r->busy);
    free(r->idle);
    free(r->peak_activations);
    memset(r, 0, sizeof(*r));
}
