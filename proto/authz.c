/* authz.c - duplexd's allow-list and what each role may send (see authz.h). */
#include "proto/authz.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uthash.h>

#include "common/log.h"

#define AUTHZ_MAX_FIELDS 8
#define AUTHZ_MAX_IDS 4096

struct authz_entry {
    struct coord_principal p;
    UT_hash_handle hh_key;
    UT_hash_handle hh_name;
};

struct dx_authz {
    struct authz_entry *by_key; /* uthash heads */
    struct authz_entry *by_name;
    size_t count;
};

static const char *const role_names[] = {
    [COORD_ROLE_WORKER] = "worker",
    [COORD_ROLE_OPERATOR] = "operator",
    [COORD_ROLE_READER] = "reader",
};

const char *coord_role_name(enum coord_role role)
{
    return (size_t)role < sizeof(role_names) / sizeof(role_names[0]) ? role_names[role] : "?";
}

int coord_role_parse(const char *s, enum coord_role *out)
{
    for (size_t i = 0; i < sizeof(role_names) / sizeof(role_names[0]); i++) {
        if (strcmp(s, role_names[i]) == 0) {
            *out = (enum coord_role)i;
            return 0;
        }
    }
    return -EINVAL;
}

static void entry_free(struct authz_entry *e)
{
    if (!e)
        return;
    for (size_t i = 0; e->p.ids && i < e->p.n_ids; i++)
        free(e->p.ids[i]);
    free(e->p.ids);
    free(e->p.host);
    free(e);
}

void dx_authz_destroy(dx_authz_t *a)
{
    struct authz_entry *e, *tmp;

    if (!a)
        return;
    HASH_ITER (hh_key, a->by_key, e, tmp) {
        HASH_DELETE(hh_key, a->by_key, e);
        HASH_DELETE(hh_name, a->by_name, e);
        entry_free(e);
    }
    free(a);
}

bool dx_authz_name_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > DX_CERT_META_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '@' || c == '-'))
            return false;
    }
    return true;
}

/* A worker id pattern: printable, no blanks or commas, '*' only at the end. */
static bool id_pattern_ok(const char *s, size_t n)
{
    if (n == 0 || n > 128)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c >= 0x7f || (c == '*' && i != n - 1))
            return false;
    }
    return true;
}

static int parse_ids(struct coord_principal *p, const char *list, char *err, size_t errlen)
{
    const char *s = list;

    while (*s) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        char **ids;

        if (!id_pattern_ok(s, n))
            return dx_errf(err, errlen, -EINVAL,
                           "bad worker id pattern \"%.*s\" in ids= (printable, '*' only last)",
                           (int)(n > 64 ? 64 : n), s);
        if (p->n_ids == AUTHZ_MAX_IDS)
            return dx_errf(err, errlen, -EINVAL, "more than %d ids", AUTHZ_MAX_IDS);
        if (!(ids = realloc(p->ids, (p->n_ids + 1) * sizeof(*ids))))
            return -ENOMEM;
        p->ids = ids;
        if (!(p->ids[p->n_ids] = strndup(s, n)))
            return -ENOMEM;
        p->n_ids++;
        s += n;
        if (*s == ',') {
            s++;
            if (!*s)
                return dx_errf(err, errlen, -EINVAL, "ids= ends with a comma");
        }
    }
    if (p->n_ids == 0)
        return dx_errf(err, errlen, -EINVAL, "ids= is empty");
    return 0;
}

/* Splits a line into blank-separated fields (in place). Returns the count,
 * or -1 when there are too many. */
static int split_fields(char *line, char **fields)
{
    int n = 0;

    for (char *s = line;;) {
        while (*s == ' ' || *s == '\t')
            s++;
        if (!*s)
            return n;
        if (n == AUTHZ_MAX_FIELDS)
            return -1;
        fields[n++] = s;
        while (*s && *s != ' ' && *s != '\t')
            s++;
        if (*s)
            *s++ = '\0';
    }
}

static int parse_entry(char *line, struct authz_entry **out, char *err, size_t errlen)
{
    char *f[AUTHZ_MAX_FIELDS];
    struct authz_entry *e;
    int n = split_fields(line, f), rc = 0;

    *out = NULL;
    if (n < 0)
        return dx_errf(err, errlen, -EINVAL, "more than %d fields", AUTHZ_MAX_FIELDS);
    if (n < 3)
        return dx_errf(err, errlen, -EINVAL, "expected \"KEY ROLE NAME [ids=...] [host=...]\"");
    if (!dx_cert_key_valid(f[0]))
        return dx_errf(err, errlen, -EINVAL,
                       "\"%.48s\" is not a CURVE public key (40 Z85 characters)", f[0]);
    if (!(e = calloc(1, sizeof(*e))))
        return -ENOMEM;
    memcpy(e->p.key, f[0], DX_CERT_KEY_LEN + 1);
    if (coord_role_parse(f[1], &e->p.role) < 0) {
        rc = dx_errf(err, errlen, -EINVAL, "unknown role \"%.32s\" (worker, operator or reader)",
                     f[1]);
        goto fail;
    }
    if (!dx_authz_name_ok(f[2])) {
        rc = dx_errf(err, errlen, -EINVAL,
                     "bad name \"%.64s\" (1-64 characters of A-Z a-z 0-9 . _ @ -)", f[2]);
        goto fail;
    }
    snprintf(e->p.name, sizeof(e->p.name), "%s", f[2]);
    for (int i = 3; i < n; i++) {
        if (e->p.role != COORD_ROLE_WORKER) {
            rc = dx_errf(err, errlen, -EINVAL, "%s keys take no \"%.32s\" (only workers do)", f[1],
                         f[i]);
            goto fail;
        }
        if (strncmp(f[i], "ids=", 4) == 0 && !e->p.ids) {
            if ((rc = parse_ids(&e->p, f[i] + 4, err, errlen)) < 0)
                goto fail;
        } else if (strncmp(f[i], "host=", 5) == 0 && !e->p.host) {
            if (!id_pattern_ok(f[i] + 5, strlen(f[i] + 5)) || strchr(f[i] + 5, '*')) {
                rc = dx_errf(err, errlen, -EINVAL, "bad host= \"%.64s\"", f[i] + 5);
                goto fail;
            }
            if (!(e->p.host = strdup(f[i] + 5))) {
                rc = -ENOMEM;
                goto fail;
            }
        } else {
            rc = dx_errf(err, errlen, -EINVAL, "unexpected \"%.32s\" (ids= or host=, once each)",
                         f[i]);
            goto fail;
        }
    }
    if (e->p.role == COORD_ROLE_WORKER && !e->p.ids && !e->p.host) {
        rc = dx_errf(err, errlen, -EINVAL,
                     "a worker key needs ids=ID,... or host=HOST (what it may register as)");
        goto fail;
    }
    *out = e;
    return 0;
fail:
    entry_free(e);
    return rc;
}

static bool is_comment(const char *line)
{
    return line[0] == '\0' || (line[0] == '#' && (line[1] == '\0' || line[1] == ' ' ||
                                                  line[1] == '\t' || line[1] == '#'));
}

int dx_authz_parse(const char *text, size_t len, const char *source, dx_authz_t **out, char *err,
                   size_t errlen)
{
    dx_authz_t *a = calloc(1, sizeof(*a));
    char line[DX_AUTHZ_LINE_MAX + 1], why[256];
    size_t pos = 0;
    int number = 0, rc = 0;

    *out = NULL;
    if (!a)
        return -ENOMEM;
    if (len > DX_AUTHZ_FILE_MAX) {
        rc = dx_errf(err, errlen, -EINVAL, "%s: larger than %d bytes", source, DX_AUTHZ_FILE_MAX);
        goto fail;
    }
    while (pos < len) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len, n = end - pos;
        struct authz_entry *e, *dup;
        char *s;

        number++;
        if (n && text[end - 1] == '\r')
            n--;
        if (n > DX_AUTHZ_LINE_MAX) {
            rc = dx_errf(err, errlen, -EINVAL, "%s:%d: line longer than %d characters", source,
                         number, DX_AUTHZ_LINE_MAX);
            goto fail;
        }
        memcpy(line, text + pos, n);
        line[n] = '\0';
        pos = end + 1;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)line[i];
            if ((c < 0x20 && c != '\t') || c >= 0x7f) {
                rc = dx_errf(err, errlen, -EINVAL, "%s:%d: byte 0x%02x (only printable ASCII)",
                             source, number, c);
                goto fail;
            }
        }
        for (s = line; *s == ' ' || *s == '\t'; s++)
            ;
        if (is_comment(s))
            continue;
        if ((rc = parse_entry(s, &e, why, sizeof(why))) < 0) {
            if (rc == -ENOMEM)
                goto fail;
            rc = dx_errf(err, errlen, rc, "%s:%d: %s", source, number, why);
            goto fail;
        }
        HASH_FIND(hh_key, a->by_key, e->p.key, DX_CERT_KEY_LEN, dup);
        if (!dup)
            HASH_FIND(hh_name, a->by_name, e->p.name, strlen(e->p.name), dup);
        if (dup) {
            rc = dx_errf(err, errlen, -EINVAL, "%s:%d: %s already listed (as %s)", source, number,
                         strcmp(dup->p.key, e->p.key) == 0 ? "this key" : "this name", dup->p.name);
            entry_free(e);
            goto fail;
        }
        /* the analyzer sees a NULL key inside uthash's macro: e is not NULL */
        // NOLINTNEXTLINE(clang-analyzer-core.NullDereference)
        HASH_ADD(hh_key, a->by_key, p.key, DX_CERT_KEY_LEN, e);
        HASH_ADD_KEYPTR(hh_name, a->by_name, e->p.name, strlen(e->p.name), e);
        a->count++;
    }
    *out = a;
    return 0;
fail:
    dx_authz_destroy(a);
    return rc;
}

int dx_authz_load(const char *path, dx_authz_t **out, char *err, size_t errlen)
{
    struct stat st;
    char *text = NULL;
    size_t len = 0;
    ssize_t n = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY), rc;

    *out = NULL;
    if (fd < 0)
        return dx_errf(err, errlen, -errno, "cannot read the allow-list %s: %s", path,
                       strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > DX_AUTHZ_FILE_MAX) {
        close(fd);
        return dx_errf(err, errlen, -EINVAL,
                       "the allow-list %s is not a regular file of at most %d bytes", path,
                       DX_AUTHZ_FILE_MAX);
    }
    if (!(text = malloc((size_t)st.st_size + 1))) {
        close(fd);
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    }
    while (len < (size_t)st.st_size && (n = read(fd, text + len, (size_t)st.st_size - len)) > 0)
        len += (size_t)n;
    rc = n < 0 ? -errno : -EAGAIN; /* why a short read was short: read's errno, or it shrank */
    close(fd);
    if (len != (size_t)st.st_size) { /* a read error, or the file shrank meanwhile */
        free(text);
        return dx_errf(err, errlen, rc, "the allow-list %s changed or failed while read", path);
    }
    rc = dx_authz_parse(text, len, path, out, err, errlen);
    free(text);
    return rc;
}

const struct coord_principal *dx_authz_find(const dx_authz_t *a, const char *key)
{
    struct authz_entry *e = NULL;

    if (!a || !key || strlen(key) != DX_CERT_KEY_LEN)
        return NULL;
    HASH_FIND(hh_key, a->by_key, key, DX_CERT_KEY_LEN, e);
    return e ? &e->p : NULL;
}

size_t dx_authz_count(const dx_authz_t *a)
{
    return a ? a->count : 0;
}

static bool id_matches(const char *pattern, const char *id)
{
    size_t n = strlen(pattern);

    if (n && pattern[n - 1] == '*')
        return strncmp(pattern, id, n - 1) == 0;
    return strcmp(pattern, id) == 0;
}

bool dx_authz_worker_may_be(const struct coord_principal *p, const char *worker_id,
                            const char *host)
{
    bool id_ok = false;
    size_t n;

    if (p->role != COORD_ROLE_WORKER)
        return false;
    for (size_t i = 0; i < p->n_ids && !id_ok; i++)
        id_ok = id_matches(p->ids[i], worker_id);
    /* host= alone: the ids of that host's GPUs (HOST-gpuN is the default
     * id), since Register.host is the worker's own say */
    if (p->n_ids == 0 && p->host) {
        n = strlen(p->host);
        id_ok = strncmp(worker_id, p->host, n) == 0 && worker_id[n] == '-';
    }
    return id_ok && (!p->host || !host || strcmp(p->host, host) == 0);
}

bool dx_authz_may_send(enum coord_role role, Duplex__MsgType type, const char **rule)
{
    switch (type) {
    case DUPLEX__MSG_TYPE__MSG_REGISTER:
    case DUPLEX__MSG_TYPE__MSG_HEARTBEAT:
    case DUPLEX__MSG_TYPE__MSG_GOODBYE:
    case DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK:
    case DUPLEX__MSG_TYPE__MSG_STEP_REPORT:
    case DUPLEX__MSG_TYPE__MSG_JOB_DONE:
        *rule = "only worker keys speak for workers";
        return role == COORD_ROLE_WORKER;
    case DUPLEX__MSG_TYPE__MSG_LIST_WORKERS:
    case DUPLEX__MSG_TYPE__MSG_JOB_STATUS:
    case DUPLEX__MSG_TYPE__MSG_EVENTS:
        *rule = "reading the cluster's state needs an operator or reader key";
        return role == COORD_ROLE_OPERATOR || role == COORD_ROLE_READER;
    case DUPLEX__MSG_TYPE__MSG_SUBMIT:
    case DUPLEX__MSG_TYPE__MSG_CANCEL:
    case DUPLEX__MSG_TYPE__MSG_DRAIN:
    case DUPLEX__MSG_TYPE__MSG_FORGET:
        *rule = "submitting, cancelling, draining and forgetting need an operator key";
        return role == COORD_ROLE_OPERATOR;
    default: /* Error (only logged), and what the dispatcher refuses itself */
        *rule = "";
        return true;
    }
}
