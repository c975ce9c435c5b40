/* cert.c - CURVE certificates (see cert.h). */
#include "proto/cert.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "common/log.h"

/* The longest property value read (zcert's email, organization, ...); only
 * name and role are kept, at most DX_CERT_META_MAX characters. */
#define CERT_VALUE_MAX 255

#define Z85_ALPHABET                                                                               \
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"

bool dx_cert_key_valid(const char *key)
{
    uint8_t bin[32];

    if (!key || strlen(key) != DX_CERT_KEY_LEN || strspn(key, Z85_ALPHABET) != DX_CERT_KEY_LEN)
        return false;
    return zmq_z85_decode(bin, key) != NULL;
}

/* ---- parsing ------------------------------------------------------------- */

enum cert_section { SECTION_NONE, SECTION_METADATA, SECTION_CURVE, SECTION_OTHER };

struct cert_line {
    const char *p; /* the line, without its newline */
    size_t len;
    int number;
};

static bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.' || c == '/';
}

/* Copies a property value (quoted or bare) of line l starting at *pos into
 * out (size outlen). Returns 0 or -EINVAL with err filled. */
static int cert_value(const struct cert_line *l, size_t pos, char *out, size_t outlen, char *err,
                      size_t errlen)
{
    size_t start, end;

    if (pos < l->len && l->p[pos] == '"') {
        start = ++pos;
        while (pos < l->len && l->p[pos] != '"')
            pos++;
        if (pos >= l->len)
            return dx_errf(err, errlen, -EINVAL, "line %d: unterminated quoted value", l->number);
        end = pos++;
    } else {
        start = pos;
        while (pos < l->len && l->p[pos] != ' ' && l->p[pos] != '#')
            pos++;
        end = pos;
    }
    while (pos < l->len && l->p[pos] == ' ')
        pos++;
    if (pos < l->len && l->p[pos] != '#')
        return dx_errf(err, errlen, -EINVAL, "line %d: text after the value", l->number);
    if (end - start >= outlen)
        return dx_errf(err, errlen, -EINVAL, "line %d: value longer than %zu characters", l->number,
                       outlen - 1);
    memcpy(out, l->p + start, end - start);
    out[end - start] = '\0';
    return 0;
}

/* One indented "name = value" line of the current section. */
static int cert_property(struct dx_cert *c, enum cert_section section, const struct cert_line *l,
                         size_t pos, char *err, size_t errlen)
{
    char name[32], value[CERT_VALUE_MAX + 1];
    size_t n = 0;
    int rc;

    while (pos < l->len && is_name_char(l->p[pos]) && n < sizeof(name) - 1)
        name[n++] = l->p[pos++];
    name[n] = '\0';
    if (n == 0)
        return dx_errf(err, errlen, -EINVAL, "line %d: expected a property name", l->number);
    while (pos < l->len && l->p[pos] == ' ')
        pos++;
    if (pos >= l->len || l->p[pos] != '=')
        return dx_errf(err, errlen, -EINVAL, "line %d: expected \"%s = value\"", l->number, name);
    pos++;
    while (pos < l->len && l->p[pos] == ' ')
        pos++;
    if ((rc = cert_value(l, pos, value, sizeof(value), err, errlen)) < 0)
        return rc;
    if (section == SECTION_CURVE &&
        (strcmp(name, "public-key") == 0 || strcmp(name, "secret-key") == 0)) {
        char *dst = name[0] == 'p' ? c->public_key : c->secret_key;
        if (!dx_cert_key_valid(value))
            return dx_errf(err, errlen, -EINVAL,
                           "line %d: %s is not a Z85 key (40 characters of ZeroMQ's Z85 "
                           "alphabet)",
                           l->number, name);
        if (dst[0])
            return dx_errf(err, errlen, -EINVAL, "line %d: a second %s", l->number, name);
        memcpy(dst, value, DX_CERT_KEY_LEN + 1);
    } else if (section == SECTION_METADATA &&
               (strcmp(name, "name") == 0 || strcmp(name, "role") == 0)) {
        if (strlen(value) > DX_CERT_META_MAX)
            return dx_errf(err, errlen, -EINVAL, "line %d: %s longer than %d characters", l->number,
                           name, DX_CERT_META_MAX);
        memcpy(name[0] == 'n' ? c->name : c->role, value, strlen(value) + 1);
    }
    return 0; /* other properties (zcert's email, organization, ...) are kept out */
}

static int cert_parse_line(struct dx_cert *c, enum cert_section *section, const struct cert_line *l,
                           char *err, size_t errlen)
{
    size_t indent = 0;

    for (size_t i = 0; i < l->len; i++) {
        unsigned char ch = (unsigned char)l->p[i];
        if (ch < 0x20 || ch == 0x7f)
            return dx_errf(err, errlen, -EINVAL, "line %d: control character 0x%02x", l->number,
                           ch);
    }
    while (indent < l->len && l->p[indent] == ' ')
        indent++;
    if (indent == l->len || l->p[indent] == '#')
        return 0; /* blank or comment */
    if (indent % 4)
        return dx_errf(err, errlen, -EINVAL,
                       "line %d: indentation of %zu spaces (ZPL indents by 4)", l->number, indent);
    if (indent == 0) {
        size_t n = 0;
        while (n < l->len && is_name_char(l->p[n]))
            n++;
        if (n == 0 || n != l->len)
            return dx_errf(err, errlen, -EINVAL, "line %d: expected a section name", l->number);
        *section = n == 8 && memcmp(l->p, "metadata", 8) == 0 ? SECTION_METADATA
                   : n == 5 && memcmp(l->p, "curve", 5) == 0  ? SECTION_CURVE
                                                              : SECTION_OTHER;
        return 0;
    }
    if (*section == SECTION_NONE)
        return dx_errf(err, errlen, -EINVAL, "line %d: a property outside any section", l->number);
    if (indent > 4)
        return 0; /* nested deeper than the properties we read */
    return cert_property(c, *section, l, indent, err, errlen);
}

int dx_cert_parse(const char *text, size_t len, struct dx_cert *out, char *err, size_t errlen)
{
    enum cert_section section = SECTION_NONE;
    struct dx_cert c;
    char derived[DX_CERT_KEY_LEN + 1];
    struct cert_line l = {text, 0, 0};
    size_t pos = 0;
    int rc;

    memset(&c, 0, sizeof(c));
    if (len > DX_CERT_FILE_MAX)
        return dx_errf(err, errlen, -EINVAL, "larger than %d bytes", DX_CERT_FILE_MAX);
    while (pos < len) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len;

        l.p = text + pos;
        l.len = end - pos;
        l.number++;
        if (l.len && l.p[l.len - 1] == '\r')
            l.len--;
        if ((rc = cert_parse_line(&c, &section, &l, err, errlen)) < 0)
            return rc;
        pos = end + 1;
    }
    if (!c.public_key[0])
        return dx_errf(err, errlen, -EINVAL, "no curve public-key");
    if (c.secret_key[0] &&
        (zmq_curve_public(derived, c.secret_key) < 0 || strcmp(derived, c.public_key) != 0))
        return dx_errf(err, errlen, -EINVAL,
                       "the secret-key does not belong to the public-key beside it");
    *out = c;
    return 0;
}

int dx_cert_load(const char *path, bool need_secret, struct dx_cert *out, char *err, size_t errlen)
{
    char text[DX_CERT_FILE_MAX + 1], why[256];
    struct stat st;
    ssize_t n;
    size_t len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY), rc;

    if (fd < 0)
        return dx_errf(err, errlen, -errno, "cannot read the key %s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return dx_errf(err, errlen, -EINVAL, "the key %s is not a regular file", path);
    }
    if (need_secret && (st.st_mode & 077)) {
        close(fd);
        return dx_errf(err, errlen, -EPERM,
                       "the secret key %s may be read by others (mode %03o): chmod 600 it", path,
                       (unsigned)(st.st_mode & 0777));
    }
    while (len < sizeof(text) && (n = read(fd, text + len, sizeof(text) - len)) > 0)
        len += (size_t)n;
    close(fd);
    if (len > DX_CERT_FILE_MAX)
        return dx_errf(err, errlen, -EFBIG, "the key %s is larger than %d bytes", path,
                       DX_CERT_FILE_MAX);
    if ((rc = dx_cert_parse(text, len, out, why, sizeof(why))) < 0)
        return dx_errf(err, errlen, rc, "the key %s is not a CURVE certificate: %s", path, why);
    if (need_secret && !out->secret_key[0])
        return dx_errf(err, errlen, -EINVAL,
                       "%s is a public certificate; a secret one (NAME.key_secret) is needed",
                       path);
    return 0;
}

int dx_cert_load_client(const char *key_path, const char *server_path, bool insecure,
                        struct dx_cert *own, char server_key[DX_CERT_KEY_LEN + 1], char *err,
                        size_t errlen)
{
    const char *env_key = getenv(DX_CERT_KEY_ENV), *env_server = getenv(DX_CERT_SERVER_KEY_ENV);
    struct dx_cert server;
    int rc;

    if (!key_path && env_key && env_key[0])
        key_path = env_key;
    if (!server_path && env_server && env_server[0])
        server_path = env_server;
    if (!key_path && !server_path) {
        if (insecure)
            return 0;
        return dx_errf(err, errlen, -EACCES,
                       "no key to talk to duplexd with: give --key FILE (or $%s) and "
                       "--server-key FILE (or $%s), made by duplexctl keys gen; or --insecure "
                       "to talk in clear",
                       DX_CERT_KEY_ENV, DX_CERT_SERVER_KEY_ENV);
    }
    if (!key_path || !server_path)
        return dx_errf(err, errlen, -EINVAL, "%s given without %s: CURVE needs both",
                       key_path ? "--key" : "--server-key", key_path ? "--server-key" : "--key");
    if ((rc = dx_cert_load(key_path, true, own, err, errlen)) < 0 ||
        (rc = dx_cert_load(server_path, false, &server, err, errlen)) < 0)
        return rc;
    memcpy(server_key, server.public_key, DX_CERT_KEY_LEN + 1);
    return 1;
}

/* ---- making and writing -------------------------------------------------- */

int dx_cert_generate(const char *name, const char *role, struct dx_cert *out)
{
    memset(out, 0, sizeof(*out));
    if (strlen(name) > DX_CERT_META_MAX || strlen(role) > DX_CERT_META_MAX)
        return -ENAMETOOLONG;
    if (zmq_curve_keypair(out->public_key, out->secret_key) < 0)
        return -errno;
    snprintf(out->name, sizeof(out->name), "%s", name);
    snprintf(out->role, sizeof(out->role), "%s", role);
    return 0;
}

static int cert_write(const struct dx_cert *c, const char *path, bool secret, char *err,
                      size_t errlen)
{
    char tmp[4096], stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    FILE *f;
    int fd, rc = 0;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp%ld", path, (long)getpid()) >= (int)sizeof(tmp))
        return dx_errf(err, errlen, -ENAMETOOLONG, "%s: path too long", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, secret ? 0600 : 0644);
    if (fd < 0 || !(f = fdopen(fd, "w"))) {
        rc = -errno;
        if (fd >= 0) {
            close(fd);
            unlink(tmp);
        }
        return dx_errf(err, errlen, rc, "cannot write %s: %s", tmp, strerror(-rc));
    }
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S UTC", &tm);
    fprintf(f, "#   ****  Generated on %s by duplexctl keys gen  ****\n", stamp);
    fprintf(f, "#   ZeroMQ CURVE %s Certificate\n", secret ? "**Secret**" : "Public");
    if (secret)
        fprintf(f, "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n");
    fprintf(f, "\nmetadata\n    name = \"%s\"\n    role = \"%s\"\n", c->name, c->role);
    fprintf(f, "curve\n    public-key = \"%s\"\n", c->public_key);
    if (secret)
        fprintf(f, "    secret-key = \"%s\"\n", c->secret_key);
    if (fflush(f) != 0 || fsync(fileno(f)) < 0)
        rc = -errno;
    if (fclose(f) != 0 && rc == 0)
        rc = -errno;
    /* link(2) never replaces an existing file */
    if (rc == 0 && link(tmp, path) < 0)
        rc = -errno;
    unlink(tmp);
    if (rc < 0)
        return dx_errf(err, errlen, rc, "cannot write %s: %s", path,
                       rc == -EEXIST ? "it exists (keys are never overwritten)" : strerror(-rc));
    return 0;
}

int dx_cert_save(const struct dx_cert *c, const char *public_path, const char *secret_path,
                 char *err, size_t errlen)
{
    int rc;

    if (secret_path && !c->secret_key[0])
        return dx_errf(err, errlen, -EINVAL, "no secret key to write to %s", secret_path);
    if (secret_path && (rc = cert_write(c, secret_path, true, err, errlen)) < 0)
        return rc;
    if ((rc = cert_write(c, public_path, false, err, errlen)) < 0) {
        if (secret_path)
            unlink(secret_path);
        return rc;
    }
    return 0;
}

/* ---- sockets ------------------------------------------------------------- */

int dx_cert_apply_client(void *sock, const struct dx_cert *own, const char *server_key)
{
    if (!own->secret_key[0] || !dx_cert_key_valid(server_key))
        return -EINVAL;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_key, DX_CERT_KEY_LEN) < 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, own->public_key, DX_CERT_KEY_LEN) < 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, own->secret_key, DX_CERT_KEY_LEN) < 0)
        return -errno;
    return 0;
}

int dx_cert_apply_server(void *sock, const struct dx_cert *own)
{
    int one = 1;

    if (!own->secret_key[0])
        return -EINVAL;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof(one)) < 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, own->secret_key, DX_CERT_KEY_LEN) < 0 ||
        zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, DX_CERT_ZAP_DOMAIN, strlen(DX_CERT_ZAP_DOMAIN)) < 0)
        return -errno;
    return 0;
}
