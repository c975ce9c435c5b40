/* test_authz.c - duplexd's allow-list (proto/authz.h): the parser and
 * its refusals, lookups, which worker ids a worker key may take, what each
 * role may send; and the ZAP handler's decision (coordinator/zap.h). */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "proto/authz.h"
#include "coordinator/zap.h"

/* ---- helpers -------------------------------------------------------------- */

#define N_KEYS 4

/* Public keys (and the raw 32 bytes of each) made fresh for every test. */
static char keys[N_KEYS][DX_CERT_KEY_LEN + 1];
static uint8_t raw[N_KEYS][32];

static void make_keys(void)
{
    char secret[DX_CERT_KEY_LEN + 1];

    for (int i = 0; i < N_KEYS; i++) {
        cr_assert_eq(zmq_curve_keypair(keys[i], secret), 0);
        cr_assert_not_null(zmq_z85_decode(raw[i], keys[i]));
    }
}

TestSuite(authz, .init = make_keys);
TestSuite(zap, .init = make_keys);

/* printf into a static buffer (two in rotation), for building list texts. */
static const char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));

static const char *fmt(const char *f, ...)
{
    static char bufs[2][8192];
    static int next;
    char *b = bufs[next++ % 2];
    va_list ap;

    va_start(ap, f);
    vsnprintf(b, sizeof(bufs[0]), f, ap);
    va_end(ap);
    return b;
}

static dx_authz_t *parse_ok(const char *text)
{
    dx_authz_t *a = NULL;
    char err[512] = "";
    int rc = dx_authz_parse(text, strlen(text), "allow", &a, err, sizeof(err));

    cr_assert_eq(rc, 0, "parse failed: %s\n--- text:\n%s", err, text);
    cr_assert_not_null(a);
    return a;
}

/* Expects -EINVAL naming "allow:LINE:" and containing word. */
static void parse_fails_n(const char *text, size_t len, int line, const char *word)
{
    dx_authz_t *a = (dx_authz_t *)0x1;
    char err[512] = "", where[32];
    int rc = dx_authz_parse(text, len, "allow", &a, err, sizeof(err));

    cr_assert_eq(rc, -EINVAL, "expected -EINVAL (%s), got %d\n--- text:\n%.*s", word, rc,
                 (int)(len > 2000 ? 2000 : len), text);
    cr_assert_null(a, "a refused list must not be returned");
    if (line > 0) {
        snprintf(where, sizeof(where), "allow:%d: ", line);
        cr_assert_eq(strncmp(err, where, strlen(where)), 0, "error \"%s\" does not start \"%s\"",
                     err, where);
    }
    cr_assert_not_null(strstr(err, word), "error \"%s\" does not mention \"%s\"", err, word);
}

static void parse_fails(const char *text, int line, const char *word)
{
    parse_fails_n(text, strlen(text), line, word);
}

/* ---- valid lists --------------------------------------------------------- */

Test(authz, one_line_of_each_role)
{
    dx_authz_t *a = parse_ok(fmt("%s  worker    gpu-node3  ids=node3-gpu0,node3-gpu1  host=node3\n"
                                 "%s  operator  alice\n"
                                 "%s  reader    grafana\n"
                                 "%s\tworker\tn4\thost=node4.example.org\n",
                                 keys[0], keys[1], keys[2], keys[3]));
    const struct coord_principal *p;

    cr_assert_eq(dx_authz_count(a), 4);

    cr_assert_not_null(p = dx_authz_find(a, keys[0]));
    cr_assert_str_eq(p->key, keys[0]);
    cr_assert_eq(p->role, COORD_ROLE_WORKER);
    cr_assert_str_eq(p->name, "gpu-node3");
    cr_assert_eq(p->n_ids, 2);
    cr_assert_str_eq(p->ids[0], "node3-gpu0");
    cr_assert_str_eq(p->ids[1], "node3-gpu1");
    cr_assert_str_eq(p->host, "node3");

    cr_assert_not_null(p = dx_authz_find(a, keys[1]));
    cr_assert_eq(p->role, COORD_ROLE_OPERATOR);
    cr_assert_str_eq(p->name, "alice");
    cr_assert_eq(p->n_ids, 0);
    cr_assert_null(p->host);

    cr_assert_not_null(p = dx_authz_find(a, keys[2]));
    cr_assert_eq(p->role, COORD_ROLE_READER);
    cr_assert_str_eq(p->name, "grafana");

    cr_assert_not_null(p = dx_authz_find(a, keys[3]));
    cr_assert_eq(p->role, COORD_ROLE_WORKER);
    cr_assert_eq(p->n_ids, 0);
    cr_assert_str_eq(p->host, "node4.example.org");
    dx_authz_destroy(a);
}

Test(authz, order_of_options_and_names)
{
    char name64[DX_CERT_META_MAX + 1];
    dx_authz_t *a;
    const struct coord_principal *p;

    memset(name64, 'n', DX_CERT_META_MAX);
    name64[DX_CERT_META_MAX] = '\0';
    a = parse_ok(
        fmt("%s worker w.1_x@y-z host=h ids=*\n%s operator %s\n", keys[0], keys[1], name64));
    cr_assert_not_null(p = dx_authz_find(a, keys[0]));
    cr_assert_str_eq(p->name, "w.1_x@y-z");
    cr_assert_str_eq(p->host, "h");
    cr_assert_eq(p->n_ids, 1);
    cr_assert_str_eq(p->ids[0], "*");
    cr_assert_not_null(p = dx_authz_find(a, keys[1]));
    cr_assert_str_eq(p->name, name64);
    dx_authz_destroy(a);
}

Test(authz, empty_and_comment_only_lists)
{
    dx_authz_t *a = parse_ok("");

    cr_assert_eq(dx_authz_count(a), 0);
    cr_assert_null(dx_authz_find(a, keys[0]));
    dx_authz_destroy(a);
    a = parse_ok("# nobody\n\n   \n\t\n");
    cr_assert_eq(dx_authz_count(a), 0);
    dx_authz_destroy(a);
}

Test(authz, comments_blank_lines_and_crlf)
{
    dx_authz_t *a = parse_ok(fmt("# duplexd allow-list\r\n"
                                 "\r\n"
                                 "#\n"
                                 "#\tindented by a tab\n"
                                 "## a heading\n"
                                 "   # an indented comment\n"
                                 "\t\n"
                                 "   %s operator alice   \r\n"
                                 "%s reader bob\r\n"
                                 "# %s operator commented-out\n"
                                 "%s worker w ids=x",
                                 keys[0], keys[1], keys[2], keys[3]));

    cr_assert_eq(dx_authz_count(a), 3);
    cr_assert_str_eq(dx_authz_find(a, keys[0])->name, "alice");
    cr_assert_str_eq(dx_authz_find(a, keys[1])->name, "bob");
    cr_assert_null(dx_authz_find(a, keys[2]), "a commented-out line is not an entry");
    cr_assert_str_eq(dx_authz_find(a, keys[3])->ids[0], "x", "last line without newline");
    dx_authz_destroy(a);

    /* line numbers count CRLF lines */
    parse_fails(fmt("# x\r\n\r\n%s operator alice\r\n%s boss bob\r\n", keys[0], keys[1]), 4,
                "unknown role");
}

Test(authz, a_hash_that_is_not_a_comment)
{
    /* '#' followed by anything but a blank or '#' starts a key, not a
     * comment: such a line is checked (and here refused), not skipped.
     * (A valid Z85 key cannot begin with '#': that group would exceed
     * 32 bits, which libzmq refuses.) */
    char key[DX_CERT_KEY_LEN + 1];

    /* a fixed second character: "##" would start a comment */
    snprintf(key, sizeof(key), "#0%s", keys[0] + 2);
    parse_fails(fmt("# fine\n%s operator alice\n", key), 2, "is not a CURVE public key");
    parse_fails(fmt("# fine\n#x\n"), 2, "expected \"KEY ROLE NAME");
    parse_fails(fmt("#0%s operator alice\n", keys[0]), 1, "is not a CURVE public key");
}

/* ---- refusals ------------------------------------------------------------ */

Test(authz, refuses_unknown_role)
{
    parse_fails(fmt("%s admin alice\n", keys[0]), 1, "unknown role \"admin\"");
    parse_fails(fmt("# x\n%s Operator alice\n", keys[0]), 2, "unknown role");
    parse_fails(fmt("%s workers w ids=a\n", keys[0]), 1, "unknown role");
}

Test(authz, refuses_bad_keys)
{
    char key[DX_CERT_KEY_LEN + 2];

    snprintf(key, sizeof(key), "%.39s", keys[0]);
    parse_fails(fmt("%s operator alice\n", key), 1, "is not a CURVE public key");
    snprintf(key, sizeof(key), "%s0", keys[0]);
    parse_fails(fmt("\n%s operator alice\n", key), 2, "is not a CURVE public key");
    snprintf(key, sizeof(key), "%s", keys[0]);
    key[10] = '~';
    parse_fails(fmt("%s operator alice\n", key), 1, "is not a CURVE public key");
    key[10] = '_';
    parse_fails(fmt("%s operator alice\n", key), 1, "is not a CURVE public key");
    parse_fails("alice operator alice\n", 1, "is not a CURVE public key");
    /* overlong garbage is cut in the message */
    parse_fails(fmt("%s%s operator alice\n", keys[0], keys[1]), 1, "is not a CURVE public key");
}

Test(authz, refuses_duplicate_key)
{
    parse_fails(fmt("%s operator alice\n%s reader bob\n", keys[0], keys[0]), 2,
                "this key already listed (as alice)");
    parse_fails(fmt("%s operator alice\n# c\n%s operator alice\n", keys[1], keys[1]), 3,
                "this key already listed");
}

Test(authz, refuses_duplicate_name)
{
    parse_fails(fmt("%s operator alice\n%s reader alice\n", keys[0], keys[1]), 2,
                "this name already listed (as alice)");
    parse_fails(
        fmt("%s worker w ids=a\n%s reader r\n%s worker w ids=b\n", keys[0], keys[1], keys[2]), 3,
        "this name already listed");
}

Test(authz, refuses_bad_names)
{
    char name65[DX_CERT_META_MAX + 2];

    memset(name65, 'n', DX_CERT_META_MAX + 1);
    name65[DX_CERT_META_MAX + 1] = '\0';
    parse_fails(fmt("%s operator %s\n", keys[0], name65), 1, "bad name");
    parse_fails(fmt("%s operator al/ice\n", keys[0]), 1, "bad name");
    parse_fails(fmt("%s operator al:ice\n", keys[0]), 1, "bad name");
    parse_fails(fmt("%s operator ids=x\n", keys[0]), 1, "bad name");
}

Test(authz, refuses_worker_without_ids_or_host)
{
    parse_fails(fmt("%s worker gpu-node3\n", keys[0]), 1, "needs ids=");
}

Test(authz, refuses_options_on_non_workers)
{
    parse_fails(fmt("%s operator alice ids=a\n", keys[0]), 1, "operator keys take no \"ids=a\"");
    parse_fails(fmt("%s reader bob ids=*\n", keys[0]), 1, "reader keys take no");
    parse_fails(fmt("%s operator alice host=h\n", keys[0]), 1, "operator keys take no \"host=h\"");
}

Test(authz, refuses_bad_ids)
{
    parse_fails(fmt("%s worker w ids=\n", keys[0]), 1, "ids= is empty");
    parse_fails(fmt("%s worker w ids=a,\n", keys[0]), 1, "ends with a comma");
    parse_fails(fmt("%s worker w ids=,a\n", keys[0]), 1, "bad worker id pattern");
    parse_fails(fmt("%s worker w ids=a,,b\n", keys[0]), 1, "bad worker id pattern");
    parse_fails(fmt("%s worker w ids=node*3\n", keys[0]), 1, "bad worker id pattern \"node*3\"");
    parse_fails(fmt("%s worker w ids=*a\n", keys[0]), 1, "'*' only last");
    parse_fails(fmt("%s worker w ids=a,**\n", keys[0]), 1, "bad worker id pattern \"**\"");
    parse_fails(fmt("%s worker w ids=a ids=b\n", keys[0]), 1, "unexpected \"ids=b\"");
    parse_fails(fmt("%s worker w host=a host=b\n", keys[0]), 1, "unexpected \"host=b\"");
    parse_fails(fmt("%s worker w ids=a gpu=0\n", keys[0]), 1, "unexpected \"gpu=0\"");
    parse_fails(fmt("%s worker w host=\n", keys[0]), 1, "bad host=");
    parse_fails(fmt("%s worker w host=node*\n", keys[0]), 1, "bad host=");

    char id[140];
    memset(id, 'i', 129);
    id[129] = '\0';
    parse_fails(fmt("%s worker w ids=%s\n", keys[0], id), 1, "bad worker id pattern");
    id[128] = '\0'; /* 128 is the longest */
    dx_authz_destroy(parse_ok(fmt("%s worker w ids=%s\n", keys[0], id)));
}

Test(authz, refuses_wrong_field_counts)
{
    parse_fails(fmt("%s worker w ids=a host=b x y z w\n", keys[0]), 1, "more than 8 fields");
    parse_fails(fmt("%s operator\n", keys[0]), 1, "expected \"KEY ROLE NAME");
    parse_fails(fmt("%s\n", keys[0]), 1, "expected \"KEY ROLE NAME");
    /* eight fields is within the split limit (then refused for what they say) */
    parse_fails(fmt("%s worker w ids=a host=b x y z\n", keys[0]), 1, "unexpected \"x\"");
}

Test(authz, refuses_bytes_outside_printable_ascii)
{
    size_t len;
    char text[256];

    parse_fails(fmt("%s operator al\xc3\xa9\n", keys[0]), 1, "byte 0xc3 (only printable ASCII)");
    parse_fails(fmt("# caf\xc3\xa9\n"), 1, "byte 0xc3");
    parse_fails(fmt("\n\n%s operator a\x01\n", keys[0]), 3, "byte 0x01");
    parse_fails(fmt("%s operator a\x7f\n", keys[0]), 1, "byte 0x7f");
    parse_fails(fmt("%s operator a\rb\n", keys[0]), 1, "byte 0x0d");
    parse_fails("\xff\n", 1, "byte 0xff");

    /* a NUL does not end the text */
    snprintf(text, sizeof(text), "# x\n%s operator alice\n", keys[0]);
    len = strlen(text);
    text[10] = '\0';
    parse_fails_n(text, len, 2, "byte 0x00");
}

Test(authz, refuses_overlong_lines)
{
    char *text = malloc(DX_AUTHZ_LINE_MAX + 16);
    dx_authz_t *a;
    char err[256];

    cr_assert_not_null(text);
    /* a comment of exactly the longest line is fine, CR not counted */
    text[0] = '#';
    memset(text + 1, ' ', DX_AUTHZ_LINE_MAX - 1);
    memcpy(text + DX_AUTHZ_LINE_MAX, "\r\n", 3);
    cr_assert_eq(dx_authz_parse(text, strlen(text), "allow", &a, err, sizeof(err)), 0, "%s", err);
    dx_authz_destroy(a);
    /* one more character: refused even though it is a comment */
    memcpy(text + DX_AUTHZ_LINE_MAX, " \n", 3);
    parse_fails(text, 1, "line longer than 4096 characters");
    /* the same as the last line without a newline, after a good one */
    memcpy(text, "\n", 1);
    memset(text + 1, ' ', DX_AUTHZ_LINE_MAX + 1);
    text[DX_AUTHZ_LINE_MAX + 2] = '\0';
    parse_fails(text, 2, "line longer than");
    free(text);
}

Test(authz, refuses_oversize_file)
{
    size_t n = DX_AUTHZ_FILE_MAX + 1;
    char *text = malloc(n);
    dx_authz_t *a = (dx_authz_t *)0x1;
    char err[256];

    cr_assert_not_null(text);
    memset(text, '\n', n);
    cr_assert_eq(dx_authz_parse(text, n, "allow", &a, err, sizeof(err)), -EINVAL);
    cr_assert_null(a);
    cr_assert_not_null(strstr(err, "larger than"), "%s", err);
    cr_assert_eq(dx_authz_parse(text, n - 1, "allow", &a, err, sizeof(err)), 0);
    dx_authz_destroy(a);
    free(text);
}

Test(authz, first_error_wins_and_nothing_is_kept)
{
    /* the good lines before an error are dropped with the list */
    parse_fails(fmt("%s operator alice\n%s reader bob\n%s boss carol\n%s admin dave\n", keys[0],
                    keys[1], keys[2], keys[3]),
                3, "unknown role \"boss\"");
}

Test(authz, load_from_file)
{
    char dir[] = "/tmp/dx_authz_XXXXXX", path[64], err[512] = "";
    const char *text = fmt("%s operator alice\n", keys[0]);
    dx_authz_t *a = NULL;
    int fd;

    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/allow", dir);
    cr_assert_eq(dx_authz_load(path, &a, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, path), "%s", err);
    cr_assert_eq(dx_authz_load(dir, &a, err, sizeof(err)), -EINVAL);
    cr_assert_not_null(strstr(err, "not a regular file"), "%s", err);

    fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    cr_assert_eq(write(fd, "bad line\n", 9), 9);
    close(fd);
    cr_assert_eq(dx_authz_load(path, &a, err, sizeof(err)), -EINVAL);
    cr_assert_null(a);
    cr_assert_not_null(strstr(err, fmt("%s:2: ", path)), "the error names file and line: %s", err);

    cr_assert_eq(truncate(path, (off_t)strlen(text)), 0);
    cr_assert_eq(dx_authz_load(path, &a, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(dx_authz_count(a), 1);
    cr_assert_str_eq(dx_authz_find(a, keys[0])->name, "alice");
    dx_authz_destroy(a);
    unlink(path);
    rmdir(dir);
}

/* ---- lookups ------------------------------------------------------------- */

Test(authz, find)
{
    dx_authz_t *a = parse_ok(fmt("%s operator alice\n%s reader bob\n", keys[0], keys[1]));
    char longer[DX_CERT_KEY_LEN + 2];

    cr_assert_eq(dx_authz_count(a), 2);
    cr_assert_str_eq(dx_authz_find(a, keys[0])->name, "alice");
    cr_assert_str_eq(dx_authz_find(a, keys[1])->name, "bob");
    cr_assert_null(dx_authz_find(a, keys[2]));
    cr_assert_null(dx_authz_find(a, NULL));
    cr_assert_null(dx_authz_find(a, ""));
    cr_assert_null(dx_authz_find(NULL, keys[0]));
    cr_assert_eq(dx_authz_count(NULL), 0);
    /* a prefix or an extension of a listed key is not it */
    snprintf(longer, sizeof(longer), "%s", keys[0]);
    longer[DX_CERT_KEY_LEN - 1] = '\0';
    cr_assert_null(dx_authz_find(a, longer));
    snprintf(longer, sizeof(longer), "%sx", keys[0]);
    cr_assert_null(dx_authz_find(a, longer));
    dx_authz_destroy(a);
    dx_authz_destroy(NULL);
}

Test(authz, roles_by_name)
{
    enum coord_role r;

    cr_assert_str_eq(coord_role_name(COORD_ROLE_WORKER), "worker");
    cr_assert_str_eq(coord_role_name(COORD_ROLE_OPERATOR), "operator");
    cr_assert_str_eq(coord_role_name(COORD_ROLE_READER), "reader");
    cr_assert_str_eq(coord_role_name((enum coord_role)42), "?");
    cr_assert_eq(coord_role_parse("reader", &r), 0);
    cr_assert_eq(r, COORD_ROLE_READER);
    cr_assert_eq(coord_role_parse("worker", &r), 0);
    cr_assert_eq(r, COORD_ROLE_WORKER);
    cr_assert_eq(coord_role_parse("Reader", &r), -EINVAL);
    cr_assert_eq(coord_role_parse("", &r), -EINVAL);
}

/* ---- which worker ids ------------------------------------------------------ */

Test(authz, worker_may_be_exact_ids)
{
    dx_authz_t *a = parse_ok(fmt("%s worker w ids=node3-gpu0,node3-gpu1\n", keys[0]));
    const struct coord_principal *p = dx_authz_find(a, keys[0]);

    cr_assert(dx_authz_worker_may_be(p, "node3-gpu0", "node3"));
    cr_assert(dx_authz_worker_may_be(p, "node3-gpu1", NULL), "no host= means any host");
    cr_assert(dx_authz_worker_may_be(p, "node3-gpu1", ""));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu2", "node3"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu", "node3"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu00", "node3"));
    cr_assert_not(dx_authz_worker_may_be(p, "", "node3"));
    cr_assert_not(dx_authz_worker_may_be(p, "NODE3-GPU0", "node3"));
    dx_authz_destroy(a);
}

Test(authz, worker_may_be_prefix_patterns)
{
    dx_authz_t *a = parse_ok(fmt("%s worker w ids=node3-*,spare\n", keys[0]));
    const struct coord_principal *p = dx_authz_find(a, keys[0]);

    cr_assert(dx_authz_worker_may_be(p, "node3-gpu0", NULL));
    cr_assert(dx_authz_worker_may_be(p, "node3-gpu7", "anywhere"));
    cr_assert(dx_authz_worker_may_be(p, "node3-", NULL), "an empty rest matches");
    cr_assert(dx_authz_worker_may_be(p, "spare", NULL));
    cr_assert_not(dx_authz_worker_may_be(p, "spare2", NULL));
    cr_assert_not(dx_authz_worker_may_be(p, "node3", NULL));
    cr_assert_not(dx_authz_worker_may_be(p, "node4-gpu0", NULL));
    cr_assert_not(dx_authz_worker_may_be(p, "xnode3-gpu0", NULL));
    dx_authz_destroy(a);
}

Test(authz, worker_may_be_any_id)
{
    dx_authz_t *a = parse_ok(fmt("%s worker w ids=*\n", keys[0]));
    const struct coord_principal *p = dx_authz_find(a, keys[0]);

    cr_assert(dx_authz_worker_may_be(p, "anything", NULL));
    cr_assert(dx_authz_worker_may_be(p, "", "h"));
    dx_authz_destroy(a);
}

Test(authz, worker_may_be_host_only)
{
    dx_authz_t *a = parse_ok(fmt("%s worker w host=node3\n", keys[0]));
    const struct coord_principal *p = dx_authz_find(a, keys[0]);

    cr_assert(dx_authz_worker_may_be(p, "node3-gpu0", "node3"));
    /* host= alone binds the ids too: the host a worker names is its own say */
    cr_assert_not(dx_authz_worker_may_be(p, "whatever", "node3"), "host= alone: HOST-* ids");
    cr_assert_not(dx_authz_worker_may_be(p, "node4-gpu0", "node3"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3gpu0", "node3"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu0", "node4"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu0", "node3.example.org"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu0", "node"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu0", ""));
    /* later messages (host checked at registration): the ids still bind */
    cr_assert(dx_authz_worker_may_be(p, "node3-gpu0", NULL));
    cr_assert_not(dx_authz_worker_may_be(p, "node4-gpu0", NULL));
    dx_authz_destroy(a);
}

Test(authz, worker_may_be_ids_and_host)
{
    dx_authz_t *a = parse_ok(fmt("%s worker w ids=node3-* host=node3\n", keys[0]));
    const struct coord_principal *p = dx_authz_find(a, keys[0]);

    cr_assert(dx_authz_worker_may_be(p, "node3-gpu0", "node3"));
    cr_assert_not(dx_authz_worker_may_be(p, "node3-gpu0", "node4"), "both must hold");
    cr_assert_not(dx_authz_worker_may_be(p, "node4-gpu0", "node3"), "both must hold");
    cr_assert(dx_authz_worker_may_be(p, "node3-gpu0", NULL), "host checked at registration");
    dx_authz_destroy(a);
}

Test(authz, non_workers_may_be_no_worker)
{
    dx_authz_t *a = parse_ok(fmt("%s operator alice\n%s reader bob\n", keys[0], keys[1]));

    cr_assert_not(dx_authz_worker_may_be(dx_authz_find(a, keys[0]), "alice", NULL));
    cr_assert_not(dx_authz_worker_may_be(dx_authz_find(a, keys[1]), "bob", NULL));
    dx_authz_destroy(a);
}

/* ---- what each role may send ------------------------------------------------ */

struct send_rule {
    Duplex__MsgType type;
    bool worker, operator, reader;
};

static const struct send_rule send_rules[] = {
    {DUPLEX__MSG_TYPE__MSG_REGISTER, true, false, false},
    {DUPLEX__MSG_TYPE__MSG_HEARTBEAT, true, false, false},
    {DUPLEX__MSG_TYPE__MSG_GOODBYE, true, false, false},
    {DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK, true, false, false},
    {DUPLEX__MSG_TYPE__MSG_STEP_REPORT, true, false, false},
    {DUPLEX__MSG_TYPE__MSG_JOB_DONE, true, false, false},
    {DUPLEX__MSG_TYPE__MSG_LIST_WORKERS, false, true, true},
    {DUPLEX__MSG_TYPE__MSG_JOB_STATUS, false, true, true},
    {DUPLEX__MSG_TYPE__MSG_EVENTS, false, true, true},
    {DUPLEX__MSG_TYPE__MSG_SUBMIT, false, true, false},
    {DUPLEX__MSG_TYPE__MSG_CANCEL, false, true, false},
    {DUPLEX__MSG_TYPE__MSG_DRAIN, false, true, false},
    {DUPLEX__MSG_TYPE__MSG_ERROR, true, true, true},
};

Test(authz, may_send_by_role)
{
    static const enum coord_role roles[] = {COORD_ROLE_WORKER, COORD_ROLE_OPERATOR,
                                            COORD_ROLE_READER};

    for (size_t i = 0; i < sizeof(send_rules) / sizeof(send_rules[0]); i++) {
        const struct send_rule *r = &send_rules[i];
        const bool want[] = {r->worker, r->operator, r->reader };

        for (size_t j = 0; j < 3; j++) {
            const char *rule = NULL;
            bool got = dx_authz_may_send(roles[j], r->type, &rule);

            cr_assert_eq(got, want[j], "%s sending type %d: expected %s", coord_role_name(roles[j]),
                         (int)r->type, want[j] ? "allowed" : "refused");
            cr_assert_not_null(rule, "rule is always set");
            if (!got)
                cr_assert_gt(strlen(rule), 0, "a refusal names its rule");
        }
    }
}

Test(authz, may_send_examples)
{
    const char *rule = NULL;

    cr_assert_not(dx_authz_may_send(COORD_ROLE_READER, DUPLEX__MSG_TYPE__MSG_SUBMIT, &rule));
    cr_assert_not_null(strstr(rule, "operator"), "%s", rule);
    cr_assert_not(dx_authz_may_send(COORD_ROLE_READER, DUPLEX__MSG_TYPE__MSG_CANCEL, &rule));
    cr_assert_not(dx_authz_may_send(COORD_ROLE_READER, DUPLEX__MSG_TYPE__MSG_DRAIN, &rule));
    cr_assert_not(dx_authz_may_send(COORD_ROLE_READER, DUPLEX__MSG_TYPE__MSG_REGISTER, &rule));
    cr_assert_not_null(strstr(rule, "worker"), "%s", rule);
    cr_assert_not(dx_authz_may_send(COORD_ROLE_WORKER, DUPLEX__MSG_TYPE__MSG_LIST_WORKERS, &rule));
    cr_assert_not_null(strstr(rule, "reader"), "%s", rule);
    cr_assert_not(dx_authz_may_send(COORD_ROLE_WORKER, DUPLEX__MSG_TYPE__MSG_SUBMIT, &rule));
    cr_assert_not(dx_authz_may_send(COORD_ROLE_OPERATOR, DUPLEX__MSG_TYPE__MSG_REGISTER, &rule));
    cr_assert_not(dx_authz_may_send(COORD_ROLE_OPERATOR, DUPLEX__MSG_TYPE__MSG_STEP_REPORT, &rule));
    cr_assert(dx_authz_may_send(COORD_ROLE_OPERATOR, DUPLEX__MSG_TYPE__MSG_SUBMIT, &rule));
    cr_assert(dx_authz_may_send(COORD_ROLE_READER, DUPLEX__MSG_TYPE__MSG_EVENTS, &rule));
    cr_assert(dx_authz_may_send(COORD_ROLE_WORKER, DUPLEX__MSG_TYPE__MSG_HEARTBEAT, &rule));
}

/* ---- the ZAP decision ---------------------------------------------------- */

/* A ZAP 1.0 request for CURVE with the raw key k (32 bytes, or klen). */
struct zap_req {
    const void *frames[9];
    size_t sizes[9];
    size_t n;
};

static void set_frame(struct zap_req *r, size_t i, const void *data, size_t size)
{
    r->frames[i] = data;
    r->sizes[i] = size;
}

static struct zap_req curve_request(const uint8_t *k, size_t klen)
{
    struct zap_req r;

    memset(&r, 0, sizeof(r));
    set_frame(&r, 0, "1.0", 3);
    set_frame(&r, 1, "42", 2);
    set_frame(&r, 2, "duplex", 6);
    set_frame(&r, 3, "10.0.0.7", 8);
    set_frame(&r, 4, "", 0);
    set_frame(&r, 5, "CURVE", 5);
    set_frame(&r, 6, k, klen);
    r.n = 7;
    return r;
}

static int decide(const dx_authz_t *a, const struct zap_req *r, struct coord_zap_reply *out)
{
    return coord_zap_decide(a, r->frames, r->sizes, r->n, out);
}

static void expect_status(const dx_authz_t *a, const struct zap_req *r, const char *status)
{
    struct coord_zap_reply out;
    int rc;

    memset(&out, 0x5a, sizeof(out));
    rc = decide(a, r, &out);
    cr_assert_str_eq(out.status, status, "status %s (%s), expected %s", out.status, out.text,
                     status);
    cr_assert_eq(rc, status[0] == '5' ? -EPROTO : 0);
    cr_assert_gt(strlen(out.text), 0, "every answer has a text");
    if (status[0] != '2')
        cr_assert_str_eq(out.user_id, "", "no user id on a refusal");
}

static dx_authz_t *zap_list(void)
{
    return parse_ok(fmt("%s worker w ids=*\n%s reader r\n", keys[0], keys[1]));
}

Test(zap, accepted_key_user_id_is_the_key)
{
    dx_authz_t *a = zap_list();
    struct zap_req r = curve_request(raw[0], 32);
    struct coord_zap_reply out;

    cr_assert_eq(decide(a, &r, &out), 0);
    cr_assert_str_eq(out.status, "200");
    cr_assert_str_eq(out.user_id, keys[0]);
    r = curve_request(raw[1], 32);
    cr_assert_eq(decide(a, &r, &out), 0);
    cr_assert_str_eq(out.status, "200");
    cr_assert_str_eq(out.user_id, keys[1]);
    /* the request id and address do not matter */
    set_frame(&r, 1, "", 0);
    set_frame(&r, 3, "", 0);
    expect_status(a, &r, "200");
    dx_authz_destroy(a);
}

Test(zap, unknown_key_is_refused)
{
    dx_authz_t *a = zap_list();
    struct zap_req r = curve_request(raw[2], 32);
    struct coord_zap_reply out;

    expect_status(a, &r, "400");
    cr_assert_eq(decide(a, &r, &out), 0);
    cr_assert_not_null(strstr(out.text, "allow-list"), "%s", out.text);
    /* with no list at all, nobody is let in */
    r = curve_request(raw[0], 32);
    expect_status(NULL, &r, "400");
    dx_authz_destroy(a);
}

Test(zap, other_domains_are_refused)
{
    dx_authz_t *a = zap_list();
    struct zap_req r = curve_request(raw[0], 32);

    set_frame(&r, 2, "", 0);
    expect_status(a, &r, "400");
    set_frame(&r, 2, "global", 6);
    expect_status(a, &r, "400");
    set_frame(&r, 2, "duplex2", 7);
    expect_status(a, &r, "400");
    set_frame(&r, 2, "duple", 5);
    expect_status(a, &r, "400");
    set_frame(&r, 2, "DUPLEX", 6);
    expect_status(a, &r, "400");
    dx_authz_destroy(a);
}

Test(zap, other_mechanisms_are_refused)
{
    dx_authz_t *a = zap_list();
    struct zap_req r = curve_request(raw[0], 32);

    /* NULL: no credentials frame */
    set_frame(&r, 5, "NULL", 4);
    r.n = 6;
    expect_status(a, &r, "400");
    /* PLAIN: user name and password */
    set_frame(&r, 5, "PLAIN", 5);
    set_frame(&r, 6, "admin", 5);
    set_frame(&r, 7, "secret", 6);
    r.n = 8;
    expect_status(a, &r, "400");
    /* PLAIN with a listed key as the user name does not pass either */
    set_frame(&r, 6, keys[0], DX_CERT_KEY_LEN);
    expect_status(a, &r, "400");
    /* GSSAPI, and CURVE's name in other spellings */
    set_frame(&r, 5, "GSSAPI", 6);
    r.n = 7;
    expect_status(a, &r, "400");
    set_frame(&r, 6, raw[0], 32);
    set_frame(&r, 5, "curve", 5);
    expect_status(a, &r, "400");
    set_frame(&r, 5, "CURVE\0", 6);
    expect_status(a, &r, "400");
    dx_authz_destroy(a);
}

Test(zap, malformed_requests)
{
    dx_authz_t *a = zap_list();
    uint8_t key33[33];
    struct zap_req r;

    /* wrong frame counts */
    for (size_t n = 0; n < 6; n++) {
        r = curve_request(raw[0], 32);
        r.n = n;
        expect_status(a, &r, "500");
    }
    r = curve_request(raw[0], 32);
    r.n = 6; /* CURVE without its key */
    expect_status(a, &r, "500");
    r = curve_request(raw[0], 32);
    set_frame(&r, 7, "", 0);
    r.n = 8;
    expect_status(a, &r, "500");
    r.n = 9;
    set_frame(&r, 8, "x", 1);
    expect_status(a, &r, "500");

    /* versions other than 1.0 */
    r = curve_request(raw[0], 32);
    set_frame(&r, 0, "1.1", 3);
    expect_status(a, &r, "500");
    set_frame(&r, 0, "1.0\0", 4);
    expect_status(a, &r, "500");
    set_frame(&r, 0, "", 0);
    expect_status(a, &r, "500");
    set_frame(&r, 0, "2.0", 3);
    expect_status(a, &r, "500");

    /* keys of the wrong size */
    r = curve_request(raw[0], 31);
    expect_status(a, &r, "500");
    memcpy(key33, raw[0], 32);
    key33[32] = 0;
    r = curve_request(key33, 33);
    expect_status(a, &r, "500");
    r = curve_request(raw[0], 0);
    expect_status(a, &r, "500");
    /* the key in Z85 rather than raw */
    r = curve_request((const uint8_t *)keys[0], DX_CERT_KEY_LEN);
    expect_status(a, &r, "500");
    dx_authz_destroy(a);
}
