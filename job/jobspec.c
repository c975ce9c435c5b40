/* jobspec.c - parsing and validating job specs (see jobspec.h), and
 * printing the values users give safely (job_spec_escape). */
#include "job/jobspec.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

#define JOBSPEC_MAX_SETS 64
#define JOBSPEC_MAX_PATH 128
#define BIG 1000000
/* a value quoted in an error, escaped (job_spec_escape) and cut */
#define JOBSPEC_QUOTE 64

enum field_type {
    FT_INT,
    FT_DOUBLE,
    FT_STRING,
    FT_SCHEDULE,
};

struct field {
    const char *path; /* dotted, e.g. "model.layers" */
    enum field_type type;
    size_t offset;
    size_t size;         /* FT_STRING: buffer size */
    double dflt;         /* FT_INT, FT_DOUBLE */
    const char *dflt_s;  /* FT_STRING, FT_SCHEDULE */
    double min, max;     /* FT_INT, FT_DOUBLE */
    const char *choices; /* FT_STRING: "a|b|c", or NULL for free text */
};

#define OFF(member) offsetof(struct job_spec, member)
#define STR(member) OFF(member), sizeof(((struct job_spec *)0)->member)

static const struct field fields[] = {
    {"name", FT_STRING, STR(name), 0, "job", 0, 0, NULL},
    {"priority", FT_INT, OFF(priority), 0, 0, NULL, -1000, 1000, NULL},
    {"backend", FT_STRING, STR(backend), 0, "cpu", 0, 0, "sim|cpu|cuda"},
    {"model.vocab", FT_INT, OFF(model.vocab), 0, 256, NULL, 2, BIG, NULL},
    {"model.d_model", FT_INT, OFF(model.d_model), 0, 64, NULL, 1, 65536, NULL},
    {"model.layers", FT_INT, OFF(model.layers), 0, 4, NULL, 1, 4096, NULL},
    {"model.heads", FT_INT, OFF(model.heads), 0, 4, NULL, 1, 1024, NULL},
    {"model.experts", FT_INT, OFF(model.experts), 0, 8, NULL, 1, 65536, NULL},
    {"model.top_k", FT_INT, OFF(model.top_k), 0, 2, NULL, 1, 1024, NULL},
    {"model.expert_hidden", FT_INT, OFF(model.expert_hidden), 0, 128, NULL, 1, BIG, NULL},
    {"model.shared_experts", FT_INT, OFF(model.shared_experts), 0, 1, NULL, 0, 64, NULL},
    {"model.seq_len", FT_INT, OFF(model.seq_len), 0, 64, NULL, 1, BIG, NULL},
    {"model.expert_groups", FT_INT, OFF(model.expert_groups), 0, 1, NULL, 1, 65536, NULL},
    {"model.group_limit", FT_INT, OFF(model.group_limit), 0, 1, NULL, 1, 65536, NULL},
    {"parallel.schedule", FT_SCHEDULE, OFF(parallel.schedule), 0, 0, "dualpipe", 0, 0, NULL},
    {"parallel.pp", FT_INT, OFF(parallel.pp), 0, 2, NULL, 1, DP_MAX_RANKS, NULL},
    {"parallel.ep", FT_INT, OFF(parallel.ep), 0, 1, NULL, 1, 4096, NULL},
    {"parallel.dp", FT_INT, OFF(parallel.dp), 0, 1, NULL, 1, 4096, NULL},
    {"parallel.microbatches", FT_INT, OFF(parallel.microbatches), 0, 4, NULL, 1,
     DP_MAX_MICROBATCHES, NULL},
    {"parallel.microbatch_size", FT_INT, OFF(parallel.microbatch_size), 0, 2, NULL, 1, BIG, NULL},
    {"parallel.max_nodes", FT_INT, OFF(parallel.max_nodes), 0, 0, NULL, 0, 4096, NULL},
    {"train.steps", FT_INT, OFF(train.steps), 0, 10, NULL, 1, 100000000, NULL},
    {"train.lr", FT_DOUBLE, OFF(train.lr), 0, 1e-3, NULL, 0, 10, NULL},
    {"train.seed", FT_INT, OFF(train.seed), 0, 1, NULL, 0, 2147483647, NULL},
    {"train.dataset", FT_STRING, STR(train.dataset), 0, JOB_SPEC_DATASET_BUILTIN, 0, 0,
     JOB_SPEC_DATASETS},
    {"train.precision", FT_STRING, STR(train.precision), 0, "fp32", 0, 0, "fp32|bf16"},
    {"train.dispatch", FT_STRING, STR(train.dispatch), 0, "fp32", 0, 0, "fp32|fp8"},
    {"checkpoint.every", FT_INT, OFF(checkpoint.every), 0, 5, NULL, 0, 100000000, NULL},
    {"checkpoint.dir", FT_STRING, STR(checkpoint.dir), 0, "var/checkpoints", 0, 0, NULL},
    {"checkpoint.from", FT_STRING, STR(checkpoint.from), 0, "", 0, 0, NULL},
    {"restart.max_restarts", FT_INT, OFF(restart.max_restarts), 0, 3, NULL, 0, 1000, NULL},
    {"restart.backoff_ms", FT_INT, OFF(restart.backoff_ms), 0, 1000, NULL, 0, 3600000, NULL},
    {"sim.f", FT_DOUBLE, OFF(sim.f), 0, 1, NULL, 0, 60000, NULL},
    {"sim.b", FT_DOUBLE, OFF(sim.b), 0, 2, NULL, 0, 60000, NULL},
    {"sim.w", FT_DOUBLE, OFF(sim.w), 0, 1, NULL, 0, 60000, NULL},
    {"sim.fb", FT_DOUBLE, OFF(sim.fb), 0, 3, NULL, 0, 60000, NULL},
};

#define NFIELDS (sizeof(fields) / sizeof(fields[0]))

static const struct field *field_find(const char *path)
{
    for (size_t i = 0; i < NFIELDS; i++)
        if (strcmp(fields[i].path, path) == 0)
            return &fields[i];
    return NULL;
}

/* True when some field lives under "prefix." (a section). */
static int is_section(const char *prefix)
{
    size_t n = strlen(prefix);
    for (size_t i = 0; i < NFIELDS; i++)
        if (strncmp(fields[i].path, prefix, n) == 0 && fields[i].path[n] == '.')
            return 1;
    return 0;
}

/* Rejects keys the schema does not have, anywhere in the tree. */
static int check_known(json_t *obj, const char *prefix, char *err, size_t errlen)
{
    const char *key;
    json_t *v;

    json_object_foreach (obj, key, v) {
        char path[JOBSPEC_MAX_PATH];
        snprintf(path, sizeof(path), "%s%s%s", prefix, prefix[0] ? "." : "", key);
        if (is_section(path)) {
            if (!json_is_object(v))
                return dx_errf(err, errlen, -EINVAL, "%s: expected an object", path);
            if (check_known(v, path, err, errlen) < 0)
                return -EINVAL;
        } else if (!field_find(path)) {
            return dx_errf(err, errlen, -EINVAL, "%s: unknown field", path);
        }
    }
    return 0;
}

/* The value at a dotted path, or NULL. */
static json_t *lookup(json_t *root, const char *path)
{
    char buf[JOBSPEC_MAX_PATH], *save = NULL, *tok;
    json_t *v = root;

    snprintf(buf, sizeof(buf), "%s", path);
    for (tok = strtok_r(buf, ".", &save); tok && v; tok = strtok_r(NULL, ".", &save))
        v = json_is_object(v) ? json_object_get(v, tok) : NULL;
    return v;
}

/* Applies "a.b.c=value", creating objects on the way. */
static int apply_set(json_t *root, const char *set, char *err, size_t errlen)
{
    char path[JOBSPEC_MAX_PATH], *dot, *key;
    const char *eq = strchr(set, '=');
    json_t *obj = root, *value;

    if (!eq || eq == set || (size_t)(eq - set) >= sizeof(path))
        return dx_errf(err, errlen, -EINVAL, "--set \"%s\": expected key.path=value", set);
    memcpy(path, set, (size_t)(eq - set));
    path[eq - set] = '\0';
    if (!field_find(path))
        return dx_errf(err, errlen, -EINVAL, "--set %s: unknown field", path);
    value = json_loads(eq + 1, JSON_DECODE_ANY, NULL);
    if (!value)
        value = json_string(eq + 1);
    key = path;
    while ((dot = strchr(key, '.'))) {
        json_t *next;
        *dot = '\0';
        next = json_object_get(obj, key);
        if (!json_is_object(next)) {
            next = json_object();
            json_object_set_new(obj, key, next);
        }
        obj = next;
        key = dot + 1;
    }
    if (!value || json_object_set_new(obj, key, value) < 0)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    return 0;
}

static int in_choices(const char *choices, const char *s)
{
    size_t n = strlen(s);
    for (const char *p = choices; p; p = strchr(p, '|') ? strchr(p, '|') + 1 : NULL)
        if (strncmp(p, s, n) == 0 && (p[n] == '|' || p[n] == '\0') && n > 0)
            return 1;
    return 0;
}

/* The length of the control character at p, or 0: C0 controls and DEL
 * (one byte), or a C1 control, U+0080..U+009F (0xc2 0x80..0x9f in UTF-8):
 * what a terminal may act on rather than print. */
static size_t control_len(const unsigned char *p)
{
    if (p[0] < 0x20 || p[0] == 0x7f)
        return 1;
    if (p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f)
        return 2;
    return 0;
}

/* The first control character of s, or NULL. */
static const char *find_control(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (control_len(p))
            return (const char *)p;
    return NULL;
}

/* The next piece of p as printed into piece: a control character as \xHH
 * per byte, else one byte or one whole UTF-8 sequence as it is. Returns
 * the bytes of p it took; *plen gets the piece's length. */
static size_t escape_piece(const unsigned char *p, char piece[9], size_t *plen)
{
    size_t n = control_len(p);

    if (n) {
        for (size_t i = 0; i < n; i++)
            snprintf(piece + 4 * i, 5, "\\x%02x", p[i]);
        *plen = 4 * n;
        return n;
    }
    n = 1;
    if (p[0] >= 0xc0) /* a UTF-8 lead byte: keep its continuation bytes with it */
        while (n < 4 && (p[n] & 0xc0) == 0x80)
            n++;
    memcpy(piece, p, n);
    *plen = n;
    return n;
}

char *job_spec_escape(const char *s, char *out, size_t outlen)
{
    static const char cut[] = "...";
    const unsigned char *p = (const unsigned char *)s;
    size_t total = 0, o = 0, plen, n;
    char piece[9];

    if (outlen == 0)
        return out;
    for (const unsigned char *q = p; *q; q += n, total += plen)
        n = escape_piece(q, piece, &plen);
    while (*p) {
        n = escape_piece(p, piece, &plen);
        /* all of it fits, or this piece and the "..." that says it was cut */
        if (total >= outlen && o + plen + sizeof(cut) > outlen) {
            if (o + sizeof(cut) <= outlen) {
                memcpy(out + o, cut, sizeof(cut) - 1);
                o += sizeof(cut) - 1;
            }
            break;
        }
        memcpy(out + o, piece, plen);
        o += plen;
        p += n;
    }
    out[o] = '\0';
    return out;
}

static int load_field(const struct field *f, json_t *v, struct job_spec *spec, char *err,
                      size_t errlen)
{
    char *base = (char *)spec + f->offset;
    char quoted[JOBSPEC_QUOTE];
    const char *s, *bad;

    switch (f->type) {
    case FT_INT:
        if (v && !json_is_integer(v))
            return dx_errf(err, errlen, -EINVAL, "%s: expected an integer", f->path);
        if (v && (json_integer_value(v) < f->min || json_integer_value(v) > f->max))
            return dx_errf(err, errlen, -EINVAL, "%s: %lld is outside %.0f..%.0f", f->path,
                           (long long)json_integer_value(v), f->min, f->max);
        {
            int value = v ? (int)json_integer_value(v) : (int)f->dflt;
            memcpy(base, &value, sizeof(value)); /* base is the int at f->offset */
        }
        return 0;
    case FT_DOUBLE:
        if (v && !json_is_number(v))
            return dx_errf(err, errlen, -EINVAL, "%s: expected a number", f->path);
        if (v && (!isfinite(json_number_value(v)) || json_number_value(v) < f->min ||
                  json_number_value(v) > f->max))
            return dx_errf(err, errlen, -EINVAL, "%s: %g is outside %g..%g", f->path,
                           json_number_value(v), f->min, f->max);
        {
            double value = v ? json_number_value(v) : f->dflt;
            memcpy(base, &value, sizeof(value)); /* base is the double at f->offset */
        }
        return 0;
    case FT_STRING:
    case FT_SCHEDULE:
        if (v && !json_is_string(v))
            return dx_errf(err, errlen, -EINVAL, "%s: expected a string", f->path);
        s = v ? json_string_value(v) : f->dflt_s;
        if (f->type == FT_SCHEDULE) {
            if (dp_sched_kind_parse(s, (enum dp_sched_kind *)base) < 0)
                return dx_errf(err, errlen, -EINVAL,
                               "%s: \"%s\" is not one of 1f1b, zb1p, dualpipe, dualpipev", f->path,
                               job_spec_escape(s, quoted, sizeof(quoted)));
            return 0;
        }
        /* a field whose default is empty may be empty */
        if ((s[0] == '\0' && f->dflt_s[0] != '\0') || strlen(s) >= f->size)
            return dx_errf(err, errlen, -EINVAL, "%s: must be %d to %zu characters", f->path,
                           f->dflt_s[0] != '\0', f->size - 1);
        /* text is shown in status, logs and errors: no control characters */
        if ((bad = find_control(s)))
            return dx_errf(err, errlen, -EINVAL,
                           "%s: \"%s\" has a control character (byte %zu); text fields may hold "
                           "none",
                           f->path, job_spec_escape(s, quoted, sizeof(quoted)), (size_t)(bad - s));
        if (f->choices && !in_choices(f->choices, s))
            return dx_errf(err, errlen, -EINVAL, "%s: \"%s\" is not one of %s", f->path,
                           job_spec_escape(s, quoted, sizeof(quoted)), f->choices);
        memcpy(base, s, strlen(s) + 1);
        return 0;
    }
    return -EINVAL;
}

/* Node-limited routing. A token picks group_limit groups, then top_k
 * experts among them, so its experts lie on at most min(group_limit, top_k)
 * whole groups' worth of nodes. When every group lives on one node (the
 * plan packs groups onto GPUs for that) a token reaches at most
 * min(group_limit, top_k) nodes, and that is also what it reaches in the
 * worst case once the EP group spans that many nodes: so the limit holds
 * whatever the placement only when min(group_limit, top_k) <= max_nodes.
 * group_limit > max_nodes alone is fine when top_k <= max_nodes. Whether
 * the actual placement keeps the limit (groups split over nodes) is
 * checked by the plan. */
static int check_max_nodes(const struct job_spec *s, char *err, size_t errlen)
{
    int M = s->parallel.max_nodes, L = s->model.group_limit, K = s->model.top_k;
    int reach = L < K ? L : K;

    if (M == 0 || reach <= M)
        return 0;
    return dx_errf(
        err, errlen, -EINVAL,
        "parallel.max_nodes: a token may use %d groups (model.group_limit) and %d experts "
        "(model.top_k), so with one group per node it reaches %d nodes, more than %d; "
        "node-limited routing needs min(group_limit, top_k) <= max_nodes",
        L, K, reach, M);
}

/* True when path has a ".." component. */
static int has_dot_dot(const char *path)
{
    for (const char *p = path; *p; p += strcspn(p, "/")) {
        p += strspn(p, "/");
        if (p[0] == '.' && p[1] == '.' && (p[2] == '/' || p[2] == '\0'))
            return 1;
    }
    return 0;
}

/* The checkpoint paths: no way up out of where the workers put them (each
 * worker also keeps checkpoint.dir under its --checkpoint-root,
 * worker/runtime.h), and printable ASCII, which is what the protocol
 * carries paths as (proto/envelope.c). */
static int check_paths(const struct job_spec *s, char *err, size_t errlen)
{
    const struct {
        const char *field, *value;
    } paths[] = {{"checkpoint.dir", s->checkpoint.dir}, {"checkpoint.from", s->checkpoint.from}};
    char quoted[JOBSPEC_QUOTE];

    if (has_dot_dot(s->checkpoint.dir))
        return dx_errf(err, errlen, -EINVAL,
                       "checkpoint.dir: \"%s\" has a \"..\" component; checkpoint directories "
                       "may not climb out of the workers' checkpoint root",
                       job_spec_escape(s->checkpoint.dir, quoted, sizeof(quoted)));
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        for (const unsigned char *p = (const unsigned char *)paths[i].value; *p; p++)
            if (*p > 0x7e)
                return dx_errf(err, errlen, -EINVAL,
                               "%s: \"%s\" has byte 0x%02x at %zu; checkpoint paths are printable "
                               "ASCII",
                               paths[i].field,
                               job_spec_escape(paths[i].value, quoted, sizeof(quoted)), *p,
                               (size_t)(p - (const unsigned char *)paths[i].value));
    return 0;
}

/* Rules that tie fields together. */
static int check_layout(const struct job_spec *s, char *err, size_t errlen)
{
    int stages = s->parallel.schedule == DP_SCHED_DUALPIPEV ? 2 * s->parallel.pp : s->parallel.pp;
    char why[256];
    int rc;

    if (s->model.d_model % s->model.heads != 0)
        return dx_errf(err, errlen, -EINVAL, "model.heads: %d does not divide model.d_model (%d)",
                       s->model.heads, s->model.d_model);
    if (s->model.top_k > s->model.experts)
        return dx_errf(err, errlen, -EINVAL, "model.top_k: %d is more than model.experts (%d)",
                       s->model.top_k, s->model.experts);
    if (s->model.experts % s->model.expert_groups != 0)
        return dx_errf(err, errlen, -EINVAL,
                       "model.expert_groups: %d does not divide model.experts (%d)",
                       s->model.expert_groups, s->model.experts);
    if (s->model.group_limit > s->model.expert_groups)
        return dx_errf(err, errlen, -EINVAL,
                       "model.group_limit: %d is more than model.expert_groups (%d)",
                       s->model.group_limit, s->model.expert_groups);
    if (s->model.top_k > s->model.group_limit * (s->model.experts / s->model.expert_groups))
        return dx_errf(err, errlen, -EINVAL,
                       "model.top_k: %d experts cannot be chosen from %d group(s) of %d experts",
                       s->model.top_k, s->model.group_limit,
                       s->model.experts / s->model.expert_groups);
    if (s->model.experts % s->parallel.ep != 0)
        return dx_errf(err, errlen, -EINVAL, "parallel.ep: %d does not divide model.experts (%d)",
                       s->parallel.ep, s->model.experts);
    if ((rc = check_max_nodes(s, err, errlen)) < 0)
        return rc;
    if (strcmp(s->train.precision, "bf16") == 0 && strcmp(s->backend, "cuda") != 0)
        return dx_errf(err, errlen, -EINVAL,
                       "train.precision: bf16 GEMMs run on the cuda backend only (backend %s)",
                       s->backend);
    if (strcmp(s->backend, "cuda") == 0 && s->parallel.ep > 1 && s->model.d_model % 4 != 0)
        return dx_errf(err, errlen, -EINVAL,
                       "model.d_model: %d is not a multiple of 4, which the cuda backend's expert "
                       "exchange needs with parallel.ep %d (its transport moves 16-byte pieces, "
                       "a row's blocks must start on them)",
                       s->model.d_model, s->parallel.ep);
    if (s->checkpoint.from[0] && s->checkpoint.from[0] != '/')
        return dx_errf(err, errlen, -EINVAL,
                       "checkpoint.from: \"%s\" is not an absolute path (give a step directory as "
                       "duplexctl status shows it)",
                       s->checkpoint.from);
    if (s->parallel.microbatch_size % s->parallel.ep != 0)
        return dx_errf(err, errlen, -EINVAL,
                       "parallel.microbatch_size: %d sequences do not split evenly over the %d "
                       "expert-parallel ranks (parallel.ep), which share each micro-batch",
                       s->parallel.microbatch_size, s->parallel.ep);
    if (s->model.layers % stages != 0)
        return dx_errf(err, errlen, -EINVAL,
                       "model.layers: %d layers do not split evenly into the %d stages of %s with "
                       "pp %d",
                       s->model.layers, stages, dp_sched_kind_name(s->parallel.schedule),
                       s->parallel.pp);
    if (dp_sched_check(s->parallel.schedule, s->parallel.pp, s->parallel.microbatches, why,
                       sizeof(why)) < 0)
        return dx_errf(err, errlen, -EINVAL,
                       "parallel: %s (parallel.pp %d, parallel.microbatches %d)", why,
                       s->parallel.pp, s->parallel.microbatches);
    if ((int64_t)s->parallel.pp * s->parallel.microbatches > JOB_SPEC_SIM_BUDGET)
        return dx_errf(err, errlen, -EINVAL,
                       "parallel: pp %d x microbatches %d = %lld is over duplexd's simulation "
                       "budget of %d (it simulates every job's schedule before placing it); use "
                       "fewer micro-batches per step",
                       s->parallel.pp, s->parallel.microbatches,
                       (long long)s->parallel.pp * s->parallel.microbatches, JOB_SPEC_SIM_BUDGET);
    if (s->sim.w > s->sim.b)
        return dx_errf(err, errlen, -EINVAL, "sim.w: %g is more than sim.b (%g), a full backward",
                       s->sim.w, s->sim.b);
    return 0;
}

int job_spec_parse(const char *json, size_t len, const char *const *sets, size_t nsets,
                   struct job_spec *out, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    int rc = -EINVAL;

    /* every field's default first: a spec that fails still leaves a usable
     * *out (what was read before the error, defaults for the rest) */
    memset(out, 0, sizeof(*out));
    for (size_t i = 0; i < NFIELDS; i++)
        load_field(&fields[i], NULL, out, err, errlen);
    if (!root)
        return dx_errf(err, errlen, -EINVAL, "line %d, column %d: %s", jerr.line, jerr.column,
                       jerr.text);
    if (!json_is_object(root)) {
        rc = dx_errf(err, errlen, -EINVAL, "a job spec is a JSON object");
        goto out;
    }
    if (nsets > JOBSPEC_MAX_SETS) {
        rc = dx_errf(err, errlen, -EINVAL, "at most %d --set overrides", JOBSPEC_MAX_SETS);
        goto out;
    }
    for (size_t i = 0; i < nsets; i++)
        if ((rc = apply_set(root, sets[i], err, errlen)) < 0)
            goto out;
    if ((rc = check_known(root, "", err, errlen)) < 0)
        goto out;
    for (size_t i = 0; i < NFIELDS; i++)
        if ((rc = load_field(&fields[i], lookup(root, fields[i].path), out, err, errlen)) < 0)
            goto out;
    if ((rc = check_paths(out, err, errlen)) < 0)
        goto out;
    rc = check_layout(out, err, errlen);
out:
    json_decref(root);
    return rc;
}

/* Sets the value at a dotted path, creating the sections on the way. */
static int set_path(json_t *root, const char *path, json_t *value)
{
    char buf[JOBSPEC_MAX_PATH], *dot, *key = buf;
    json_t *obj = root;

    snprintf(buf, sizeof(buf), "%s", path);
    while ((dot = strchr(key, '.'))) {
        json_t *next;

        *dot = '\0';
        next = json_object_get(obj, key);
        if (!next) {
            next = json_object();
            if (json_object_set_new(obj, key, next) < 0)
                goto fail;
        }
        obj = next;
        key = dot + 1;
    }
    return json_object_set_new(obj, key, value) < 0 ? -ENOMEM : 0;
fail:
    json_decref(value);
    return -ENOMEM;
}

char *job_spec_to_json(const struct job_spec *spec)
{
    json_t *root = json_object();
    char *text = NULL;

    if (!root)
        return NULL;
    for (size_t i = 0; i < NFIELDS; i++) {
        const struct field *f = &fields[i];
        const char *base = (const char *)spec + f->offset;
        json_t *v = NULL;
        int iv;
        double dv;

        switch (f->type) {
        case FT_INT:
            memcpy(&iv, base, sizeof(iv));
            v = json_integer(iv);
            break;
        case FT_DOUBLE:
            memcpy(&dv, base, sizeof(dv));
            v = json_real(dv);
            break;
        case FT_STRING:
            v = json_string(base);
            break;
        case FT_SCHEDULE:
            v = json_string(dp_sched_kind_name(spec->parallel.schedule));
            break;
        }
        if (!v || set_path(root, f->path, v) < 0)
            goto out;
    }
    text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
out:
    json_decref(root);
    return text;
}

int job_spec_workers(const struct job_spec *spec)
{
    return spec->parallel.pp * spec->parallel.ep * spec->parallel.dp;
}

/* --- memory per rank (job_spec_memory) ----------------------------------
 * Counted in doubles (the products of the largest specs pass 2^64) and
 * rounded up into bytes at the end; each term names the allocation in
 * worker/model/ or worker/rank/rank.c it stands for. */

#define F32 4.0 /* bytes of a float, an int32 */
#define I64 8.0
/* the allocator's rounding and headers: up to a page per allocation (the
 * large ones are mmap'd whole pages) */
#define ALLOC_SLACK 4096.0

struct mem_terms {
    double params, grads, optimizer, activations;
};

/* One stage of `layers` layers (with the embedding / the head) on a rank,
 * run for `slots` micro-batches: weights, gradients, AdamW moments, and
 * one cache per micro-batch. *sync gets the step-end buffer's bytes. */
static void stage_memory(const struct job_spec *s, double layers, int embed, int head, double slots,
                         struct mem_terms *t, double *sync)
{
    double d = s->model.d_model, V = s->model.vocab, E = s->model.experts;
    double H = s->model.expert_hidden, K = s->model.top_k, Sh = s->model.shared_experts;
    double G = s->model.expert_groups, h = s->model.heads, T = s->model.seq_len;
    double B = s->parallel.microbatch_size, ep = s->parallel.ep;
    double Bl = B / ep, R = Bl * T, rows = R * K, sn = Sh * R + 1;
    /* per layer: norm1, norm2; wq, wk, wv, wo; router, routed and shared
     * experts' w1, w3, w2; the routing bias */
    double layer_w = 2 * d + 4 * d * d + E * d + 3 * E * H * d + 3 * Sh * H * d + E;
    double w = layers * layer_w + (embed ? V * d : 0) + (head ? d + V * d : 0);
    double moe_ctx, attn, slot;

    /* per layer 11 tensors (+1 bias, + loads), 3 with the embedding or head;
     * each has its weights, gradient and two moments */
    double tensors = layers * 12 + 3 + (embed ? 1 : 0) + (head ? 2 : 0);

    t->params += w * F32 + tensors * ALLOC_SLACK;
    t->grads +=
        w * F32 + layers * E * I64 + tensors * ALLOC_SLACK; /* a gradient per weight; loads */
    t->optimizer += 2 * (w * F32 + tensors * ALLOC_SLACK);  /* AdamW m and v */
    *sync = w * F32 + layers * E * I64 + I64;

    /* wk_moe_ctx_init with cap R: x, dout; score, dlogit; xg, y, dy, dxg;
     * h1, h3, act, dh1, dh3; the shared experts' five [hidden] and two [d]
     * rows; the plan's ints and the routing scratch */
    moe_ctx = (2 * R * d + 2 * R * E + 4 * rows * d + 5 * rows * H + 5 * sn * H + 2 * sn * d +
               4 * rows + 2 * E + 1 + 2 * (E + G)) *
              F32;
    /* wk_attn_cache_init: ten [R][d], the probabilities [Bl * heads * T][T], [T][T] */
    attn = (10 * R * d + Bl * h * T * T + T * T) * F32;
    /* wk_model_cache_init: inputs, targets; act[L + 1]; per layer mid, two
     * rms caches, attention, MoE; h, g, g2, t; with the head the final
     * norm's cache and the head's x, probs, dlogits, targets */
    slot = (2 * R + (layers + 1) * R * d + 4 * R * d) * F32 +
           layers * ((R * d + 2 * R) * F32 + attn + moe_ctx) +
           (head ? (R + R * d + 2 * R * V + R) * F32 : 0);
    /* the rank trainer's slot (worker/rank/rank.c): x_in, x_out, dy, dx, tokens */
    slot += (4 * R * d + Bl * (T + 1)) * F32;
    /* its allocations: 6 per layer for the layer and its norms, 12 for the
     * attention, 30 for the MoE; 20 more with the head, buffers, scratch */
    slot += (layers * 48 + 20) * ALLOC_SLACK;
    /* with ep > 1 the owner side of each MoE layer (ep_layer_init): rows of
     * the whole micro-batch */
    if (s->parallel.ep > 1)
        slot += layers * (((4 * d + 5 * H) * B * T * K + ep * E + E + 1) * F32 + 11 * ALLOC_SLACK);
    t->activations += slots * slot;
}

/* Rank r's stages (one chunk, or two for DualPipe / DualPipeV) */
static void rank_memory(const struct job_spec *s, int r, struct mem_terms *t)
{
    int P = s->parallel.pp, M = s->parallel.microbatches, S = P, stage[2], n = 1;
    double slots = M, sync[2] = {0, 0};

    switch (s->parallel.schedule) {
    case DP_SCHED_DUALPIPE: /* path c runs chunk c: stage r, then P-1-r */
        stage[0] = r;
        stage[1] = P - 1 - r;
        n = 2;
        slots = M / 2.0;
        break;
    case DP_SCHED_DUALPIPEV: /* one path through stages r and 2P-1-r */
        S = 2 * P;
        stage[0] = r;
        stage[1] = 2 * P - 1 - r;
        n = 2;
        break;
    default:
        stage[0] = r;
        break;
    }
    memset(t, 0, sizeof(*t));
    for (int i = 0; i < n; i++)
        stage_memory(s, (double)s->model.layers / S, stage[i] == 0, stage[i] == S - 1, ceil(slots),
                     t, &sync[i]);
    t->grads += 2 * (sync[0] > sync[1] ? sync[0] : sync[1]); /* the step-end sums' buffer */
}

static uint64_t mem_bytes(double v)
{
    return v >= 18446744073709549568.0 ? UINT64_MAX : (uint64_t)ceil(v);
}

void job_spec_memory(const struct job_spec *spec, struct job_spec_memory *out)
{
    struct mem_terms best = {0}, t;
    int P = spec->parallel.pp > 0 ? spec->parallel.pp : 1;

    /* the middle ranks hold no embedding and no head: rank 0 or P-1 needs most */
    for (int r = 0; r < P; r += (P > 1 ? P - 1 : 1)) {
        rank_memory(spec, r, &t);
        if (t.params + t.grads + t.optimizer + t.activations >
            best.params + best.grads + best.optimizer + best.activations)
            best = t;
    }
    out->params = mem_bytes(best.params);
    out->grads = mem_bytes(best.grads);
    out->optimizer = mem_bytes(best.optimizer);
    out->activations = mem_bytes(best.activations);
    out->total = mem_bytes(best.params + best.grads + best.optimizer + best.activations);
}

/* The unit that shows v with a few digits: KiB, MiB, GiB or TiB. */
static const char *mem_unit(uint64_t v, double *scale)
{
    static const char *const names[] = {"KiB", "MiB", "GiB", "TiB"};
    int u = 0;

    *scale = 1024.0;
    while (u < 3 && (double)v >= *scale * 1024.0) {
        *scale *= 1024.0;
        u++;
    }
    return names[u];
}

char *job_spec_bytes_text(uint64_t bytes, char *buf, size_t len)
{
    double scale;
    const char *unit = mem_unit(bytes, &scale);

    snprintf(buf, len, "%.1f %s", (double)bytes / scale, unit);
    return buf;
}

char *job_spec_memory_text(const struct job_spec_memory *m, char *buf, size_t len)
{
    double k;
    const char *unit = mem_unit(m->total, &k);

    snprintf(buf, len,
             "%.1f %s (parameters %.1f, gradients %.1f, optimizer %.1f, activations %.1f)",
             (double)m->total / k, unit, (double)m->params / k, (double)m->grads / k,
             (double)m->optimizer / k, (double)m->activations / k);
    return buf;
}
