/* test_cert.c - CURVE certificates (proto/cert.h): generate, save, load,
 * the untrusting parser, the client's key choice (flags or environment),
 * and a real CURVE exchange through duplexd's ZAP handler. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>
#include <zmq.h>

#include "proto/authz.h"
#include "coordinator/zap.h"
#include "proto/cert.h"

/* ---- helpers -------------------------------------------------------------- */

static char tmpdir[64];

static void make_tmpdir(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/dx_cert_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static void remove_tmpdir(void)
{
    DIR *d = opendir(tmpdir);
    struct dirent *e;
    char path[512];

    if (!d)
        return;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", tmpdir, e->d_name);
        if (rmdir(path) < 0)
            unlink(path);
    }
    closedir(d);
    rmdir(tmpdir);
}

/* tmpdir/name in a static buffer (four in rotation). */
static const char *tpath(const char *name)
{
    static char bufs[4][512];
    static int next;
    char *b = bufs[next++ % 4];

    snprintf(b, sizeof(bufs[0]), "%s/%s", tmpdir, name);
    return b;
}

static int count_files(void)
{
    DIR *d = opendir(tmpdir);
    struct dirent *e;
    int n = 0;

    cr_assert_not_null(d);
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

static void write_file(const char *path, const char *data, size_t len, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);

    cr_assert_geq(fd, 0, "open %s: %s", path, strerror(errno));
    cr_assert_eq(write(fd, data, len), (ssize_t)len);
    close(fd);
    cr_assert_eq(chmod(path, mode), 0);
}

/* The whole file at path, NUL-terminated, in a static buffer. */
static const char *read_text(const char *path)
{
    static char buf[DX_CERT_FILE_MAX + 1];
    FILE *f = fopen(path, "r");
    size_t n;

    cr_assert_not_null(f, "fopen %s", path);
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

struct keypair {
    char pub[DX_CERT_KEY_LEN + 1];
    char sec[DX_CERT_KEY_LEN + 1];
};

static struct keypair new_keypair(void)
{
    struct keypair k;

    cr_assert_eq(zmq_curve_keypair(k.pub, k.sec), 0);
    return k;
}

/* A keypair whose public key can be written unquoted: a bare ZPL value
 * ends at a '#' (a comment), which is in Z85's alphabet. */
static struct keypair bare_keypair(void)
{
    struct keypair k;

    do
        k = new_keypair();
    while (strchr(k.pub, '#'));
    return k;
}

/* A czmq-style secret certificate text of k. */
static const char *secret_text(const struct keypair *k)
{
    static char buf[1024];

    snprintf(buf, sizeof(buf),
             "#   ZeroMQ CURVE **Secret** Certificate\n"
             "metadata\n"
             "    name = \"n1\"\n"
             "    role = \"worker\"\n"
             "curve\n"
             "    public-key = \"%s\"\n"
             "    secret-key = \"%s\"\n",
             k->pub, k->sec);
    return buf;
}

static void parse_ok(const char *text, struct dx_cert *out)
{
    char err[256] = "";
    int rc = dx_cert_parse(text, strlen(text), out, err, sizeof(err));

    cr_assert_eq(rc, 0, "parse failed: %s\n--- text:\n%s", err, text);
}

/* Parses text (len bytes) and expects -EINVAL with an error containing word
 * (and a second word when not NULL); out must stay untouched. */
static void parse_fails_n(const char *text, size_t len, const char *word, const char *word2)
{
    struct dx_cert c;
    char err[256] = "";
    unsigned char *p = (unsigned char *)&c;
    int rc;

    memset(&c, 0x5a, sizeof(c));
    rc = dx_cert_parse(text, len, &c, err, sizeof(err));
    cr_assert_eq(rc, -EINVAL, "expected -EINVAL (%s), got %d\n--- text:\n%.*s", word, rc,
                 (int)(len > 2000 ? 2000 : len), text);
    cr_assert_not_null(strstr(err, word), "error \"%s\" does not mention \"%s\"", err, word);
    if (word2)
        cr_assert_not_null(strstr(err, word2), "error \"%s\" does not mention \"%s\"", err, word2);
    for (size_t i = 0; i < sizeof(c); i++)
        cr_assert_eq(p[i], 0x5a, "a refused certificate must leave out untouched");
}

static void parse_fails(const char *text, const char *word, const char *word2)
{
    parse_fails_n(text, strlen(text), word, word2);
}

/* A certificate text with one public-key line whose value is val. */
static const char *with_public(const char *val)
{
    static char buf[512];

    snprintf(buf, sizeof(buf), "curve\n    public-key = \"%s\"\n", val);
    return buf;
}

/* ---- generate, save, load ------------------------------------------------ */

Test(cert, generate_makes_a_valid_keypair)
{
    struct dx_cert c;
    char derived[DX_CERT_KEY_LEN + 1];
    char longname[DX_CERT_META_MAX + 2];

    cr_assert_eq(dx_cert_generate("gpu-node3", "worker", &c), 0);
    cr_assert(dx_cert_key_valid(c.public_key));
    cr_assert(dx_cert_key_valid(c.secret_key));
    cr_assert_eq(zmq_curve_public(derived, c.secret_key), 0);
    cr_assert_str_eq(derived, c.public_key);
    cr_assert_str_eq(c.name, "gpu-node3");
    cr_assert_str_eq(c.role, "worker");

    memset(longname, 'x', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    cr_assert_eq(dx_cert_generate(longname, "worker", &c), -ENAMETOOLONG);
    cr_assert_eq(dx_cert_generate("n", longname, &c), -ENAMETOOLONG);
    longname[DX_CERT_META_MAX] = '\0'; /* exactly 64: fits */
    cr_assert_eq(dx_cert_generate(longname, "operator", &c), 0);
    cr_assert_str_eq(c.name, longname);
}

Test(cert, save_load_round_trip, .init = make_tmpdir, .fini = remove_tmpdir)
{
    struct dx_cert c, sec, pub;
    char err[512] = "";

    cr_assert_eq(dx_cert_generate("gpu-node3", "worker", &c), 0);
    cr_assert_eq(dx_cert_save(&c, tpath("n.key"), tpath("n.key_secret"), err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(count_files(), 2, "no temporary files are left behind");

    cr_assert_eq(dx_cert_load(tpath("n.key_secret"), true, &sec, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(sec.public_key, c.public_key);
    cr_assert_str_eq(sec.secret_key, c.secret_key);
    cr_assert_str_eq(sec.name, "gpu-node3");
    cr_assert_str_eq(sec.role, "worker");

    cr_assert_eq(dx_cert_load(tpath("n.key"), false, &pub, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(pub.public_key, c.public_key);
    cr_assert_str_eq(pub.secret_key, "");
    cr_assert_str_eq(pub.name, "gpu-node3");
    cr_assert_str_eq(pub.role, "worker");

    /* a secret certificate also serves where a public one is wanted */
    cr_assert_eq(dx_cert_load(tpath("n.key_secret"), false, &pub, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(pub.secret_key, c.secret_key);
}

Test(cert, public_file_has_no_secret, .init = make_tmpdir, .fini = remove_tmpdir)
{
    struct dx_cert c, out;
    char err[512] = "";
    const char *text;

    cr_assert_eq(dx_cert_generate("alice", "operator", &c), 0);
    cr_assert_eq(dx_cert_save(&c, tpath("a.key"), tpath("a.key_secret"), err, sizeof(err)), 0, "%s",
                 err);
    text = read_text(tpath("a.key"));
    cr_assert_not_null(strstr(text, c.public_key));
    cr_assert_null(strstr(text, c.secret_key), "the public file holds the secret key");
    cr_assert_null(strstr(text, "secret-key"));
    text = read_text(tpath("a.key_secret"));
    cr_assert_not_null(strstr(text, c.secret_key));
    cr_assert_not_null(strstr(text, c.public_key));

    /* the public certificate where a secret one is needed (even at 0600) */
    cr_assert_eq(chmod(tpath("a.key"), 0600), 0);
    cr_assert_eq(dx_cert_load(tpath("a.key"), true, &out, err, sizeof(err)), -EINVAL);
    cr_assert_not_null(strstr(err, "public certificate"), "%s", err);
}

Test(cert, public_only_save, .init = make_tmpdir, .fini = remove_tmpdir)
{
    struct dx_cert c, pub;
    char err[512] = "";

    cr_assert_eq(dx_cert_generate("grafana", "reader", &c), 0);
    cr_assert_eq(dx_cert_save(&c, tpath("g.key"), NULL, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(count_files(), 1);
    cr_assert_eq(dx_cert_load(tpath("g.key"), false, &pub, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(pub.public_key, c.public_key);

    /* a public certificate has no secret to write */
    cr_assert_eq(dx_cert_save(&pub, tpath("p.key"), tpath("p.key_secret"), err, sizeof(err)),
                 -EINVAL);
    cr_assert_not_null(strstr(err, "no secret key"), "%s", err);
    cr_assert_eq(count_files(), 1);
}

Test(cert, secret_file_mode, .init = make_tmpdir, .fini = remove_tmpdir)
{
    struct dx_cert c, out;
    char err[512] = "";
    struct stat st;

    cr_assert_eq(dx_cert_generate("n", "worker", &c), 0);
    cr_assert_eq(dx_cert_save(&c, tpath("n.key"), tpath("n.key_secret"), err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(stat(tpath("n.key_secret"), &st), 0);
    cr_assert_eq(st.st_mode & 07777, 0600, "secret mode %o", (unsigned)(st.st_mode & 07777));
    cr_assert_eq(stat(tpath("n.key"), &st), 0);
    cr_assert_eq(st.st_mode & 0600, 0600);

    cr_assert_eq(chmod(tpath("n.key_secret"), 0644), 0);
    memset(&out, 0x5a, sizeof(out));
    cr_assert_eq(dx_cert_load(tpath("n.key_secret"), true, &out, err, sizeof(err)), -EPERM);
    cr_assert_not_null(strstr(err, "chmod 600"), "%s", err);
    cr_assert_not_null(strstr(err, tpath("n.key_secret")), "%s", err);
    cr_assert_not_null(strstr(err, "644"), "%s", err);
    /* unread when refused, so nothing leaks into out */
    cr_assert_eq(((unsigned char *)&out)[0], 0x5a);

    cr_assert_eq(chmod(tpath("n.key_secret"), 0640), 0);
    cr_assert_eq(dx_cert_load(tpath("n.key_secret"), true, &out, err, sizeof(err)), -EPERM);
    cr_assert_eq(chmod(tpath("n.key_secret"), 0604), 0);
    cr_assert_eq(dx_cert_load(tpath("n.key_secret"), true, &out, err, sizeof(err)), -EPERM);
    /* a public use of it does not care */
    cr_assert_eq(dx_cert_load(tpath("n.key_secret"), false, &out, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(chmod(tpath("n.key_secret"), 0400), 0);
    cr_assert_eq(dx_cert_load(tpath("n.key_secret"), true, &out, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(out.secret_key, c.secret_key);
}

Test(cert, save_never_overwrites, .init = make_tmpdir, .fini = remove_tmpdir)
{
    struct dx_cert a, b, out;
    char err[512] = "";

    cr_assert_eq(dx_cert_generate("a", "worker", &a), 0);
    cr_assert_eq(dx_cert_generate("b", "worker", &b), 0);
    cr_assert_eq(dx_cert_save(&a, tpath("k.key"), tpath("k.key_secret"), err, sizeof(err)), 0, "%s",
                 err);

    /* both exist */
    cr_assert_eq(dx_cert_save(&b, tpath("k.key"), tpath("k.key_secret"), err, sizeof(err)),
                 -EEXIST);
    cr_assert_not_null(strstr(err, "exists"), "%s", err);
    /* only the public one exists: the new secret file is not left behind */
    cr_assert_eq(dx_cert_save(&b, tpath("k.key"), tpath("other.key_secret"), err, sizeof(err)),
                 -EEXIST);
    cr_assert_eq(access(tpath("other.key_secret"), F_OK), -1);
    /* public-only save onto an existing file */
    cr_assert_eq(dx_cert_save(&b, tpath("k.key_secret"), NULL, err, sizeof(err)), -EEXIST);
    cr_assert_eq(count_files(), 2, "nothing new, no temporary files");

    cr_assert_eq(dx_cert_load(tpath("k.key_secret"), true, &out, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(out.secret_key, a.secret_key, "the first keys are kept");
    cr_assert_eq(dx_cert_load(tpath("k.key"), false, &out, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(out.public_key, a.public_key);
}

Test(cert, save_into_missing_directory, .init = make_tmpdir, .fini = remove_tmpdir)
{
    struct dx_cert c;
    char err[512] = "";

    cr_assert_eq(dx_cert_generate("a", "worker", &c), 0);
    cr_assert_eq(dx_cert_save(&c, tpath("no/k.key"), tpath("no/k.key_secret"), err, sizeof(err)),
                 -ENOENT);
    cr_assert_not_null(strstr(err, "cannot write"), "%s", err);
}

Test(cert, load_errors, .init = make_tmpdir, .fini = remove_tmpdir)
{
    struct dx_cert out;
    char err[512] = "", *big;
    struct keypair k = new_keypair();

    cr_assert_eq(dx_cert_load(tpath("missing.key"), false, &out, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "missing.key"), "%s", err);

    cr_assert_eq(mkdir(tpath("dir.key"), 0700), 0);
    cr_assert_eq(dx_cert_load(tpath("dir.key"), false, &out, err, sizeof(err)), -EINVAL);
    cr_assert_not_null(strstr(err, "not a regular file"), "%s", err);

    write_file(tpath("junk.key"), "hello\n", 6, 0600);
    cr_assert_eq(dx_cert_load(tpath("junk.key"), false, &out, err, sizeof(err)), -EINVAL);
    cr_assert_not_null(strstr(err, "junk.key"), "%s", err);
    cr_assert_not_null(strstr(err, "not a CURVE certificate"), "%s", err);

    big = malloc(DX_CERT_FILE_MAX + 2);
    cr_assert_not_null(big);
    memset(big, '\n', DX_CERT_FILE_MAX + 1);
    write_file(tpath("big.key"), big, DX_CERT_FILE_MAX + 1, 0600);
    cr_assert_eq(dx_cert_load(tpath("big.key"), false, &out, err, sizeof(err)), -EFBIG);

    /* exactly the limit: a valid certificate padded with blank lines */
    snprintf(big, DX_CERT_FILE_MAX + 2, "%s", secret_text(&k));
    memset(big + strlen(big), '\n', DX_CERT_FILE_MAX - strlen(big));
    write_file(tpath("limit.key"), big, DX_CERT_FILE_MAX, 0600);
    cr_assert_eq(dx_cert_load(tpath("limit.key"), true, &out, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(out.public_key, k.pub);
    free(big);
}

/* ---- the parser ---------------------------------------------------------- */

Test(cert, key_valid)
{
    struct keypair k = new_keypair();
    char key[DX_CERT_KEY_LEN + 2];

    cr_assert(dx_cert_key_valid(k.pub));
    cr_assert(dx_cert_key_valid(k.sec));
    cr_assert_not(dx_cert_key_valid(NULL));
    cr_assert_not(dx_cert_key_valid(""));

    snprintf(key, sizeof(key), "%.39s", k.pub);
    cr_assert_not(dx_cert_key_valid(key), "39 characters");
    snprintf(key, sizeof(key), "%s0", k.pub);
    cr_assert_not(dx_cert_key_valid(key), "41 characters");

    const char bad_chars[] = {'~', ',', ';', '"', '\'', '\\', '_', '`', '|', ' ', '\t', '\x80'};
    for (size_t i = 0; i < sizeof(bad_chars); i++) {
        snprintf(key, sizeof(key), "%s", k.pub);
        key[17] = bad_chars[i];
        cr_assert_not(dx_cert_key_valid(key), "character 0x%02x", (unsigned char)bad_chars[i]);
    }
    /* 40 characters of the alphabet whose first group exceeds 32 bits */
    snprintf(key, sizeof(key), "%s", k.pub);
    key[0] = '#';
    cr_assert_not(dx_cert_key_valid(key), "a group over 2^32 does not decode");
    memset(key, '0', DX_CERT_KEY_LEN);
    key[DX_CERT_KEY_LEN] = '\0';
    cr_assert(dx_cert_key_valid(key), "all zeros decode");
}

Test(cert, parse_secret_and_public)
{
    struct keypair k = new_keypair();
    struct dx_cert c;

    parse_ok(secret_text(&k), &c);
    cr_assert_str_eq(c.public_key, k.pub);
    cr_assert_str_eq(c.secret_key, k.sec);
    cr_assert_str_eq(c.name, "n1");
    cr_assert_str_eq(c.role, "worker");

    parse_ok(with_public(k.pub), &c);
    cr_assert_str_eq(c.public_key, k.pub);
    cr_assert_str_eq(c.secret_key, "");
    cr_assert_str_eq(c.name, "");
    cr_assert_str_eq(c.role, "");
}

Test(cert, parse_accepts_czmq_style)
{
    struct keypair k = bare_keypair();
    struct dx_cert c;
    char text[2048];

    /* as czmq's zcert_save_secret writes it, with extra metadata */
    snprintf(text, sizeof(text),
             "#   ****  Generated on 2024-01-02 03:04:05 by CZMQ  ****\n"
             "#   ZeroMQ CURVE **Secret** Certificate\n"
             "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"
             "\n"
             "metadata\n"
             "    email = \"steve@example.com\"\n"
             "    organization = \"Example Inc.\"\n"
             "    name = \"Steve Jobs\"\n"
             "    created-by = \"CZMQ zcert\"\n"
             "curve\n"
             "    public-key = \"%s\"\n"
             "    secret-key = \"%s\"\n",
             k.pub, k.sec);
    parse_ok(text, &c);
    cr_assert_str_eq(c.public_key, k.pub);
    cr_assert_str_eq(c.secret_key, k.sec);
    cr_assert_str_eq(c.name, "Steve Jobs");
    cr_assert_str_eq(c.role, "");

    /* comments everywhere, empty metadata, other sections, bare values,
     * a comment after a value, nested properties, no final newline */
    snprintf(text, sizeof(text),
             "# a comment\n"
             "    # an indented comment\n"
             "metadata\n"
             "curve\n"
             "    public-key = %s   # the key\n"
             "    #   comment inside a section\n"
             "other\n"
             "    thing = \"x\"\n"
             "        nested = \"y\"\n"
             "metadata\n"
             "    role=operator\n"
             "    name = \"a#b\"",
             k.pub);
    parse_ok(text, &c);
    cr_assert_str_eq(c.public_key, k.pub);
    cr_assert_str_eq(c.role, "operator");
    cr_assert_str_eq(c.name, "a#b");
}

Test(cert, parse_accepts_crlf)
{
    struct keypair k = new_keypair();
    struct dx_cert c;
    char text[1024];

    snprintf(text, sizeof(text),
             "#   ZeroMQ CURVE **Secret** Certificate\r\n"
             "\r\n"
             "metadata\r\n"
             "    name = \"crlf\"\r\n"
             "curve\r\n"
             "    public-key = \"%s\"\r\n"
             "    secret-key = \"%s\"\r\n",
             k.pub, k.sec);
    parse_ok(text, &c);
    cr_assert_str_eq(c.public_key, k.pub);
    cr_assert_str_eq(c.secret_key, k.sec);
    cr_assert_str_eq(c.name, "crlf");
}

Test(cert, parse_not_nul_terminated)
{
    struct keypair k = new_keypair();
    struct dx_cert c;
    char err[256];
    char text[512];
    size_t len;

    snprintf(text, sizeof(text), "%s", with_public(k.pub));
    len = strlen(text);
    memcpy(text + len, "garbage\x01", 9); /* past len: must not be read */
    cr_assert_eq(dx_cert_parse(text, len, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(c.public_key, k.pub);
    /* cut inside the closing quote */
    cr_assert_eq(dx_cert_parse(text, len - 2, &c, err, sizeof(err)), -EINVAL);
    cr_assert_not_null(strstr(err, "unterminated"), "%s", err);
}

Test(cert, parse_refuses_bad_z85)
{
    struct keypair k = new_keypair();
    char key[64];

    snprintf(key, sizeof(key), "%.39s", k.pub);
    parse_fails(with_public(key), "not a Z85 key", "line 2");
    snprintf(key, sizeof(key), "%s0", k.pub);
    parse_fails(with_public(key), "not a Z85 key", NULL);
    snprintf(key, sizeof(key), "%s%s", k.pub, k.pub);
    parse_fails(with_public(key), "not a Z85 key", NULL);
    parse_fails(with_public(""), "not a Z85 key", NULL);

    const char bad_chars[] = {'~', ',', ';', '\'', '\\', '_', '`', '|'};
    for (size_t i = 0; i < sizeof(bad_chars); i++) {
        snprintf(key, sizeof(key), "%s", k.pub);
        key[20] = bad_chars[i];
        parse_fails(with_public(key), "not a Z85 key", NULL);
    }
    snprintf(key, sizeof(key), "%s", k.pub);
    key[5] = '#'; /* in the alphabet, but the group overflows */
    parse_fails(with_public(key), "not a Z85 key", NULL);

    /* a bad secret-key too */
    char text[512];
    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\"\n    secret-key = \"%.39s~\"\n",
             k.pub, k.sec);
    parse_fails(text, "secret-key is not a Z85 key", "line 3");
}

Test(cert, parse_refuses_mismatched_secret)
{
    struct keypair a = new_keypair(), b = new_keypair();
    char text[512];

    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\"\n    secret-key = \"%s\"\n", a.pub,
             b.sec);
    parse_fails(text, "does not belong", NULL);
    /* a secret key given as the public one */
    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\"\n    secret-key = \"%s\"\n", a.sec,
             a.sec);
    parse_fails(text, "does not belong", NULL);
}

Test(cert, parse_refuses_missing_public)
{
    struct keypair k = new_keypair();
    char text[512];

    parse_fails("", "no curve public-key", NULL);
    parse_fails("# only a comment\n", "no curve public-key", NULL);
    parse_fails("metadata\n    name = \"x\"\ncurve\n", "no curve public-key", NULL);
    snprintf(text, sizeof(text), "curve\n    secret-key = \"%s\"\n", k.sec);
    parse_fails(text, "no curve public-key", NULL);
    /* the key in the wrong section does not count */
    snprintf(text, sizeof(text), "metadata\n    public-key = \"%s\"\n", k.pub);
    parse_fails(text, "no curve public-key", NULL);
    /* nested deeper than the properties */
    snprintf(text, sizeof(text), "curve\n        public-key = \"%s\"\n", k.pub);
    parse_fails(text, "no curve public-key", NULL);
}

Test(cert, parse_refuses_duplicate_keys)
{
    struct keypair a = new_keypair(), b = new_keypair();
    char text[512];

    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\"\n    public-key = \"%s\"\n", a.pub,
             b.pub);
    parse_fails(text, "a second public-key", "line 3");
    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\"\ncurve\n    public-key = \"%s\"\n",
             a.pub, a.pub);
    parse_fails(text, "a second public-key", "line 4");
}

Test(cert, parse_refuses_control_characters)
{
    struct keypair k = new_keypair();
    char text[512];
    size_t len;

    parse_fails("metadata\n    name = \"a\x01\"\n", "control character 0x01", "line 2");
    parse_fails("metadata\n\tname = \"a\"\n", "control character 0x09", "line 2");
    parse_fails("metadata\n    name = \"a\x7f\"\n", "control character 0x7f", NULL);
    parse_fails("# comment\x1b[31m\n", "control character 0x1b", "line 1");
    parse_fails("metadata\r\r\n", "control character 0x0d", "line 1");
    parse_fails("metadata\rcurve\n", "control character 0x0d", NULL);

    /* a NUL inside the text (the length counts it) */
    snprintf(text, sizeof(text), "%s", with_public(k.pub));
    len = strlen(text);
    text[3] = '\0';
    parse_fails_n(text, len, "control character 0x00", "line 1");
}

Test(cert, parse_refuses_bad_indentation)
{
    struct keypair k = new_keypair();
    char text[512];

    snprintf(text, sizeof(text), "curve\n  public-key = \"%s\"\n", k.pub);
    parse_fails(text, "indentation of 2 spaces", "line 2");
    snprintf(text, sizeof(text), "curve\n     public-key = \"%s\"\n", k.pub);
    parse_fails(text, "indentation of 5 spaces", NULL);
    snprintf(text, sizeof(text), "curve\n      public-key = \"%s\"\n", k.pub);
    parse_fails(text, "indentation of 6 spaces", NULL);
    snprintf(text, sizeof(text), "    public-key = \"%s\"\n", k.pub);
    parse_fails(text, "outside any section", "line 1");
    parse_fails(" curve\n", "indentation of 1 spaces", NULL);
}

Test(cert, parse_refuses_bad_lines)
{
    struct keypair k = new_keypair();
    char text[512];

    parse_fails("curve:\n", "expected a section name", "line 1");
    parse_fails("curve \n", "expected a section name", NULL);
    parse_fails("two words\n", "expected a section name", NULL);
    parse_fails("\"curve\"\n", "expected a section name", NULL);
    parse_fails("curve\n    = \"x\"\n", "expected a property name", "line 2");
    parse_fails("curve\n    public-key \"x\"\n", "expected \"public-key = value\"", NULL);
    parse_fails("curve\n    public-key\n", "expected \"public-key = value\"", NULL);
    snprintf(text, sizeof(text), "curve\n    public-key : \"%s\"\n", k.pub);
    parse_fails(text, "expected \"public-key = value\"", NULL);
}

Test(cert, parse_refuses_unterminated_quotes)
{
    struct keypair k = new_keypair();
    char text[512];

    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\n", k.pub);
    parse_fails(text, "unterminated quoted value", "line 2");
    parse_fails("metadata\n    name = \"\n", "unterminated quoted value", NULL);
    /* the quote does not run on into the next line */
    snprintf(text, sizeof(text), "metadata\n    name = \"x\ncurve\n    public-key = \"%s\"\n",
             k.pub);
    parse_fails(text, "unterminated quoted value", "line 2");
}

Test(cert, parse_refuses_text_after_value)
{
    struct keypair k = bare_keypair();
    char text[512];

    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\" x\n", k.pub);
    parse_fails(text, "text after the value", "line 2");
    snprintf(text, sizeof(text), "curve\n    public-key = \"%s\"\"\"\n", k.pub);
    parse_fails(text, "text after the value", NULL);
    snprintf(text, sizeof(text), "curve\n    public-key = %s x\n", k.pub);
    parse_fails(text, "text after the value", NULL);
    parse_fails("metadata\n    name = two words\n", "text after the value", NULL);
    parse_fails("metadata\n    name = \"a\" \"b\"\n", "text after the value", NULL);
}

Test(cert, parse_refuses_long_values)
{
    char text[512], val[DX_CERT_META_MAX + 2];

    memset(val, 'v', sizeof(val) - 1);
    val[sizeof(val) - 1] = '\0';
    snprintf(text, sizeof(text), "metadata\n    name = \"%s\"\n", val);
    parse_fails(text, "name longer than 64 characters", "line 2");
    /* a long property that is not kept (zcert's email) is read past */
    {
        char email[200], doc[1024];
        struct keypair k2 = new_keypair();
        struct dx_cert c2;

        memset(email, 'e', sizeof(email) - 1);
        email[sizeof(email) - 1] = '\0';
        snprintf(doc, sizeof(doc), "metadata\n    email = \"%s\"\ncurve\n    public-key = \"%s\"\n",
                 email, k2.pub);
        parse_ok(doc, &c2);
    }
    /* exactly 64 is kept */
    struct keypair k = new_keypair();
    struct dx_cert c;
    val[DX_CERT_META_MAX] = '\0';
    snprintf(text, sizeof(text), "metadata\n    name = \"%s\"\ncurve\n    public-key = \"%s\"\n",
             val, k.pub);
    parse_ok(text, &c);
    cr_assert_str_eq(c.name, val);
}

Test(cert, parse_refuses_oversize)
{
    struct keypair k = new_keypair();
    size_t n = DX_CERT_FILE_MAX + 1;
    char *text = malloc(n + 1);
    struct dx_cert c;
    char err[256];

    cr_assert_not_null(text);
    snprintf(text, n + 1, "%s", with_public(k.pub));
    memset(text + strlen(text), '\n', n - strlen(text));
    text[n] = '\0';
    parse_fails_n(text, n, "larger than 16384 bytes", NULL);
    /* one byte less: the same text is accepted */
    cr_assert_eq(dx_cert_parse(text, n - 1, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(c.public_key, k.pub);
    /* many lines: the line numbers keep counting */
    memset(text, '\n', n);
    memcpy(text + DX_CERT_FILE_MAX - 10, "x y\n", 4);
    parse_fails_n(text, DX_CERT_FILE_MAX, "line 16375", NULL);
    free(text);
}

/* ---- the client's keys --------------------------------------------------- */

static void client_init(void)
{
    make_tmpdir();
    unsetenv(DX_CERT_KEY_ENV);
    unsetenv(DX_CERT_SERVER_KEY_ENV);
}

/* Saves a client (c.key, c.key_secret) and a server (s.key, s.key_secret). */
static void save_pair(struct dx_cert *client, struct dx_cert *server)
{
    char err[512] = "";

    cr_assert_eq(dx_cert_generate("c", "worker", client), 0);
    cr_assert_eq(dx_cert_generate("duplexd", "server", server), 0);
    cr_assert_eq(dx_cert_save(client, tpath("c.key"), tpath("c.key_secret"), err, sizeof(err)), 0);
    cr_assert_eq(dx_cert_save(server, tpath("s.key"), tpath("s.key_secret"), err, sizeof(err)), 0);
}

Test(cert, load_client_neither_given, .init = client_init, .fini = remove_tmpdir)
{
    struct dx_cert own;
    char server_key[DX_CERT_KEY_LEN + 1], err[512] = "";

    cr_assert_eq(dx_cert_load_client(NULL, NULL, true, &own, server_key, err, sizeof(err)), 0);
    cr_assert_eq(dx_cert_load_client(NULL, NULL, false, &own, server_key, err, sizeof(err)),
                 -EACCES);
    cr_assert_not_null(strstr(err, "--key"), "%s", err);
    cr_assert_not_null(strstr(err, "--server-key"), "%s", err);
    cr_assert_not_null(strstr(err, "--insecure"), "%s", err);
    cr_assert_not_null(strstr(err, DX_CERT_KEY_ENV), "%s", err);

    /* empty environment variables count as unset */
    setenv(DX_CERT_KEY_ENV, "", 1);
    setenv(DX_CERT_SERVER_KEY_ENV, "", 1);
    cr_assert_eq(dx_cert_load_client(NULL, NULL, true, &own, server_key, err, sizeof(err)), 0);
    cr_assert_eq(dx_cert_load_client(NULL, NULL, false, &own, server_key, err, sizeof(err)),
                 -EACCES);
}

Test(cert, load_client_only_one_given, .init = client_init, .fini = remove_tmpdir)
{
    struct dx_cert client, server, own;
    char server_key[DX_CERT_KEY_LEN + 1], err[512] = "";

    save_pair(&client, &server);
    for (int insecure = 0; insecure < 2; insecure++) {
        cr_assert_eq(dx_cert_load_client(tpath("c.key_secret"), NULL, insecure, &own, server_key,
                                         err, sizeof(err)),
                     -EINVAL);
        cr_assert_not_null(strstr(err, "--key given without --server-key"), "%s", err);
        cr_assert_eq(
            dx_cert_load_client(NULL, tpath("s.key"), insecure, &own, server_key, err, sizeof(err)),
            -EINVAL);
        cr_assert_not_null(strstr(err, "--server-key given without --key"), "%s", err);
    }
    /* one from a flag, none for the other even in the environment */
    setenv(DX_CERT_SERVER_KEY_ENV, "", 1);
    cr_assert_eq(
        dx_cert_load_client(tpath("c.key_secret"), NULL, false, &own, server_key, err, sizeof(err)),
        -EINVAL);
    /* only one in the environment */
    setenv(DX_CERT_KEY_ENV, tpath("c.key_secret"), 1);
    cr_assert_eq(dx_cert_load_client(NULL, NULL, true, &own, server_key, err, sizeof(err)),
                 -EINVAL);
}

Test(cert, load_client_from_flags, .init = client_init, .fini = remove_tmpdir)
{
    struct dx_cert client, server, own;
    char server_key[DX_CERT_KEY_LEN + 1], err[512] = "";

    save_pair(&client, &server);
    cr_assert_eq(dx_cert_load_client(tpath("c.key_secret"), tpath("s.key"), false, &own, server_key,
                                     err, sizeof(err)),
                 1, "%s", err);
    cr_assert_str_eq(own.public_key, client.public_key);
    cr_assert_str_eq(own.secret_key, client.secret_key);
    cr_assert_str_eq(server_key, server.public_key);

    /* flags win over the environment */
    setenv(DX_CERT_KEY_ENV, tpath("nonexistent"), 1);
    setenv(DX_CERT_SERVER_KEY_ENV, tpath("nonexistent"), 1);
    memset(&own, 0, sizeof(own));
    cr_assert_eq(dx_cert_load_client(tpath("c.key_secret"), tpath("s.key"), true, &own, server_key,
                                     err, sizeof(err)),
                 1, "%s", err);
    cr_assert_str_eq(own.secret_key, client.secret_key);

    /* the client's own key must be a secret one, not readable by others */
    cr_assert_lt(dx_cert_load_client(tpath("c.key"), tpath("s.key"), false, &own, server_key, err,
                                     sizeof(err)),
                 0);
    cr_assert_eq(chmod(tpath("c.key_secret"), 0644), 0);
    cr_assert_eq(dx_cert_load_client(tpath("c.key_secret"), tpath("s.key"), false, &own, server_key,
                                     err, sizeof(err)),
                 -EPERM);
    cr_assert_not_null(strstr(err, "chmod 600"), "%s", err);
    cr_assert_eq(chmod(tpath("c.key_secret"), 0600), 0);
    cr_assert_eq(dx_cert_load_client(tpath("c.key_secret"), tpath("nonexistent"), false, &own,
                                     server_key, err, sizeof(err)),
                 -ENOENT);
    cr_assert_not_null(strstr(err, "nonexistent"), "%s", err);
}

Test(cert, load_client_from_environment, .init = client_init, .fini = remove_tmpdir)
{
    struct dx_cert client, server, own;
    char server_key[DX_CERT_KEY_LEN + 1], err[512] = "";

    save_pair(&client, &server);
    setenv(DX_CERT_KEY_ENV, tpath("c.key_secret"), 1);
    setenv(DX_CERT_SERVER_KEY_ENV, tpath("s.key"), 1);
    for (int insecure = 0; insecure < 2; insecure++) {
        memset(&own, 0, sizeof(own));
        memset(server_key, 0, sizeof(server_key));
        cr_assert_eq(dx_cert_load_client(NULL, NULL, insecure, &own, server_key, err, sizeof(err)),
                     1, "%s", err);
        cr_assert_str_eq(own.public_key, client.public_key);
        cr_assert_str_eq(own.secret_key, client.secret_key);
        cr_assert_str_eq(server_key, server.public_key);
    }
    /* one flag, the other from the environment */
    cr_assert_eq(
        dx_cert_load_client(NULL, tpath("s.key_secret"), false, &own, server_key, err, sizeof(err)),
        1, "%s", err);
    cr_assert_str_eq(server_key, server.public_key);
    cr_assert_str_eq(own.secret_key, client.secret_key);
}

/* ---- socket options ------------------------------------------------------ */

Test(cert, apply_refuses_public_only)
{
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    struct dx_cert own, pub;
    struct keypair server = new_keypair();

    cr_assert_eq(dx_cert_generate("x", "worker", &own), 0);
    pub = own;
    pub.secret_key[0] = '\0';
    cr_assert_eq(dx_cert_apply_client(s, &pub, server.pub), -EINVAL);
    cr_assert_eq(dx_cert_apply_client(s, &own, "not a key"), -EINVAL);
    cr_assert_eq(dx_cert_apply_client(s, &own, NULL), -EINVAL);
    cr_assert_eq(dx_cert_apply_server(s, &pub), -EINVAL);
    cr_assert_eq(dx_cert_apply_client(s, &own, server.pub), 0);
    zmq_close(s);
    zmq_ctx_term(ctx);
}

/* ---- a real CURVE exchange ------------------------------------------------ */

/* A ROUTER with duplexd's server options, the ZAP handler (coord_zap)
 * served from a libuv loop run by the test thread, and an allow-list
 * naming the "good" client only. */
struct curve {
    void *ctx;
    uv_loop_t loop;
    dx_authz_t *authz;
    coord_zap_t *zap;
    void *router;
    char endpoint[256];
    struct dx_cert server, good, bad;
};

static struct curve cv;

static void curve_setup(void)
{
    char err[512] = "", list[256];
    size_t len = sizeof(cv.endpoint);
    int linger = 0;

    memset(&cv, 0, sizeof(cv));
    cr_assert_not_null(cv.ctx = zmq_ctx_new());
    cr_assert_eq(dx_cert_generate("duplexd", "server", &cv.server), 0);
    cr_assert_eq(dx_cert_generate("good", "worker", &cv.good), 0);
    cr_assert_eq(dx_cert_generate("bad", "worker", &cv.bad), 0);
    snprintf(list, sizeof(list), "%s operator good\n", cv.good.public_key);
    cr_assert_eq(dx_authz_parse(list, strlen(list), "test", &cv.authz, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(uv_loop_init(&cv.loop), 0);
    cr_assert_eq(coord_zap_create(&cv.loop, cv.ctx, cv.authz, &cv.zap, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_not_null(cv.router = zmq_socket(cv.ctx, ZMQ_ROUTER));
    cr_assert_eq(zmq_setsockopt(cv.router, ZMQ_LINGER, &linger, sizeof(linger)), 0);
    cr_assert_eq(dx_cert_apply_server(cv.router, &cv.server), 0);
    cr_assert_eq(zmq_bind(cv.router, "tcp://127.0.0.1:*"), 0);
    cr_assert_eq(zmq_getsockopt(cv.router, ZMQ_LAST_ENDPOINT, cv.endpoint, &len), 0);
}

static void curve_teardown(void)
{
    if (cv.router)
        zmq_close(cv.router);
    coord_zap_destroy(cv.zap);
    uv_run(&cv.loop, UV_RUN_DEFAULT); /* lets the watcher's handles close */
    uv_loop_close(&cv.loop);
    dx_authz_destroy(cv.authz);
    zmq_ctx_term(cv.ctx);
}

static void *curve_client(const struct dx_cert *own, const char *server_key, const char *payload)
{
    void *s = zmq_socket(cv.ctx, ZMQ_DEALER);
    int linger = 0;

    cr_assert_not_null(s);
    cr_assert_eq(zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger)), 0);
    cr_assert_eq(dx_cert_apply_client(s, own, server_key), 0);
    cr_assert_eq(zmq_connect(s, cv.endpoint), 0);
    cr_assert_eq(zmq_send(s, payload, strlen(payload), 0), (int)strlen(payload));
    return s;
}

struct delivery {
    char payload[64];
    char user_id[64];
};

/* Runs the loop (serving ZAP) and polls the ROUTER for up to ms. Returns
 * 1 with the first message's payload and User-Id, or 0. When until_refused
 * is set, returns 0 as soon as the ZAP handler has refused a connection. */
static int curve_pump(int ms, struct delivery *d, bool until_refused)
{
    for (int waited = 0; waited < ms; waited += 5) {
        zmq_pollitem_t it = {cv.router, 0, ZMQ_POLLIN, 0};
        struct coord_zap_stats st;

        uv_run(&cv.loop, UV_RUN_NOWAIT);
        coord_zap_stats(cv.zap, &st);
        if (until_refused && st.refused > 0)
            return 0;
        cr_assert_geq(zmq_poll(&it, 1, 5), 0);
        if (it.revents & ZMQ_POLLIN) {
            zmq_msg_t rid, body;
            const char *uid;

            zmq_msg_init(&rid);
            zmq_msg_init(&body);
            cr_assert_geq(zmq_msg_recv(&rid, cv.router, 0), 0);
            cr_assert(zmq_msg_more(&rid));
            cr_assert_geq(zmq_msg_recv(&body, cv.router, 0), 0);
            cr_assert_not(zmq_msg_more(&body));
            snprintf(d->payload, sizeof(d->payload), "%.*s", (int)zmq_msg_size(&body),
                     (const char *)zmq_msg_data(&body));
            uid = zmq_msg_gets(&body, "User-Id");
            snprintf(d->user_id, sizeof(d->user_id), "%s", uid ? uid : "(none)");
            zmq_msg_close(&rid);
            zmq_msg_close(&body);
            return 1;
        }
    }
    return 0;
}

Test(cert, curve_allowed_key_delivers_with_user_id, .init = curve_setup, .fini = curve_teardown)
{
    struct delivery d;
    struct coord_zap_stats st;
    void *c = curve_client(&cv.good, cv.server.public_key, "hello");

    cr_assert_eq(curve_pump(10000, &d, false), 1, "the allowed client's message did not arrive");
    cr_assert_str_eq(d.payload, "hello");
    cr_assert_str_eq(d.user_id, cv.good.public_key, "User-Id is the client's public key");
    coord_zap_stats(cv.zap, &st);
    cr_assert_eq(st.accepted, 1);
    cr_assert_eq(st.refused, 0);
    zmq_close(c);
}

Test(cert, curve_unknown_key_delivers_nothing, .init = curve_setup, .fini = curve_teardown)
{
    struct delivery d;
    struct coord_zap_stats st;
    void *bad = curve_client(&cv.bad, cv.server.public_key, "intruder");
    void *good;

    cr_assert_eq(curve_pump(10000, &d, true), 0, "a refused client delivered \"%s\"", d.payload);
    coord_zap_stats(cv.zap, &st);
    cr_assert_geq(st.refused, 1, "the ZAP handler was never asked");
    cr_assert_eq(st.accepted, 0);
    cr_assert_eq(st.malformed, 0);
    cr_assert_eq(curve_pump(500, &d, false), 0, "a refused client delivered \"%s\"", d.payload);

    /* the server still serves allowed clients, and only theirs */
    good = curve_client(&cv.good, cv.server.public_key, "hello");
    cr_assert_eq(curve_pump(10000, &d, false), 1);
    cr_assert_str_eq(d.payload, "hello");
    cr_assert_str_eq(d.user_id, cv.good.public_key);
    cr_assert_eq(curve_pump(300, &d, false), 0, "a second message \"%s\" arrived", d.payload);
    zmq_close(bad);
    zmq_close(good);
}

Test(cert, curve_wrong_server_key_delivers_nothing, .init = curve_setup, .fini = curve_teardown)
{
    struct delivery d;
    struct coord_zap_stats st;
    struct keypair other = new_keypair();
    void *c = curve_client(&cv.good, other.pub, "hello");

    cr_assert_eq(curve_pump(1000, &d, false), 0, "delivered \"%s\" to the wrong server", d.payload);
    coord_zap_stats(cv.zap, &st);
    cr_assert_eq(st.accepted, 0);
    zmq_close(c);
}

Test(cert, curve_plain_client_delivers_nothing, .init = curve_setup, .fini = curve_teardown)
{
    struct delivery d;
    void *s = zmq_socket(cv.ctx, ZMQ_DEALER);
    int linger = 0;

    cr_assert_eq(zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger)), 0);
    cr_assert_eq(zmq_connect(s, cv.endpoint), 0);
    cr_assert_eq(zmq_send(s, "clear", 5, 0), 5);
    cr_assert_eq(curve_pump(1000, &d, false), 0, "a client without CURVE delivered \"%s\"",
                 d.payload);
    zmq_close(s);
}

Test(cert, curve_allow_list_swap, .init = curve_setup, .fini = curve_teardown)
{
    struct delivery d;
    dx_authz_t *next = NULL;
    char err[256], list[256];
    void *c;

    /* the new list names the other key: the old one is refused from now on */
    snprintf(list, sizeof(list), "%s reader bad\n", cv.bad.public_key);
    cr_assert_eq(dx_authz_parse(list, strlen(list), "next", &next, err, sizeof(err)), 0);
    coord_zap_set_authz(cv.zap, next);
    dx_authz_destroy(cv.authz);
    cv.authz = next;

    c = curve_client(&cv.good, cv.server.public_key, "old");
    cr_assert_eq(curve_pump(10000, &d, true), 0);
    zmq_close(c);
    c = curve_client(&cv.bad, cv.server.public_key, "new");
    cr_assert_eq(curve_pump(10000, &d, false), 1);
    cr_assert_str_eq(d.payload, "new");
    cr_assert_str_eq(d.user_id, cv.bad.public_key);
    zmq_close(c);
}
