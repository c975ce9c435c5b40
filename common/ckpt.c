/* ckpt.c - checkpoint shards and their manifest (format in ckpt.h): the
 * CRC-32C, the shard writer (atomic commit), the verifying reader, the
 * MANIFEST.json writer and reader, and the step directory helpers. */
#include "common/ckpt.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fs.h"
#include "common/log.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ckpt.c writes payloads in host order and needs a little-endian host"
#endif

#define MAGIC_LEN 8
#define HEADER_LEN 16
#define ENTRY_LEN 88
#define NAME_LEN 64
#define TRAILER_LEN 8
#define ALIGN 8
#define MIN_SHARD (HEADER_LEN + TRAILER_LEN)
#define TMP_SUFFIX ".tmp"

static const uint8_t magic[MAGIC_LEN] = {'D', 'X', 'C', 'K', 'P', 'T', 0, 0};
static const uint8_t end_magic[4] = {'D', 'X', 'C', 'E'};

/* --- CRC-32C ------------------------------------------------------------- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;

        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1; /* reflected 0x1EDC6F41 */
        crc_table[i] = c;
    }
}

uint32_t dx_ckpt_crc32c(uint32_t crc, const void *data, size_t len)
{
    const uint8_t *p = data;

    pthread_once(&crc_once, crc_init);
    crc = ~crc;
    while (len--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* --- little helpers -------------------------------------------------------- */

static size_t dtype_size(uint32_t t)
{
    switch (t) {
    case DX_CKPT_F32:
        return 4;
    case DX_CKPT_I64:
        return 8;
    case DX_CKPT_BYTES:
        return 1;
    default:
        return 0;
    }
}

static const char *dtype_name(uint32_t t)
{
    switch (t) {
    case DX_CKPT_F32:
        return "f32";
    case DX_CKPT_I64:
        return "i64";
    case DX_CKPT_BYTES:
        return "bytes";
    default:
        return "?";
    }
}

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;

    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;

    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t align_up(uint64_t v)
{
    return (v + ALIGN - 1) & ~(uint64_t)(ALIGN - 1);
}

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');

    return slash ? slash + 1 : path;
}

/* A shard basename as the manifest may hold it: non-empty, fits, no '/',
 * not "." or "..". */
static bool valid_file_name(const char *f)
{
    size_t len = strlen(f);

    return len > 0 && len < DX_CKPT_FILE_MAX && !strchr(f, '/') && strcmp(f, ".") != 0 &&
           strcmp(f, "..") != 0;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = write(fd, p, len);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* fsyncs the directory holding path. */
static int sync_parent(const char *path)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    int fd, rc = 0;

    if (!slash) {
        strcpy(dir, ".");
    } else if (slash == path) {
        strcpy(dir, "/");
    } else {
        size_t len = (size_t)(slash - path);

        if (len >= sizeof(dir))
            return -ENAMETOOLONG;
        memcpy(dir, path, len);
        dir[len] = '\0';
    }
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0 && errno != EINVAL) /* some file systems refuse directory fsync */
        rc = -errno;
    close(fd);
    return rc;
}

/* Renames tmp over path and fsyncs the directory. */
static int publish(const char *tmp, const char *path, char *err, size_t errlen)
{
    int rc;

    if (rename(tmp, path) < 0) {
        rc = -errno;
        unlink(tmp);
        return dx_errf(err, errlen, rc, "renaming %s to %s: %s", tmp, path, strerror(-rc));
    }
    rc = sync_parent(path);
    if (rc < 0)
        return dx_errf(err, errlen, rc, "syncing the directory of %s: %s", path, strerror(-rc));
    return 0;
}

/* --- writer ---------------------------------------------------------------- */

struct section {
    char name[NAME_LEN];
    uint32_t dtype;
    const void *data;
    uint64_t count;
};

struct dx_ckpt_writer {
    struct section *secs;
    size_t n, alloc;
};

void dx_ckpt_shard_name(int dp, int pp, int ep, char *buf, size_t len)
{
    snprintf(buf, len, "rank-d%d-p%d-e%d.ckpt", dp, pp, ep);
}

int dx_ckpt_writer_create(dx_ckpt_writer_t **out)
{
    dx_ckpt_writer_t *w = calloc(1, sizeof(*w));

    if (!w)
        return -ENOMEM;
    *out = w;
    return 0;
}

void dx_ckpt_writer_destroy(dx_ckpt_writer_t *w)
{
    if (!w)
        return;
    free(w->secs);
    free(w);
}

int dx_ckpt_writer_add(dx_ckpt_writer_t *w, const char *name, enum dx_ckpt_dtype t,
                       const void *data, size_t count)
{
    size_t len, es = dtype_size((uint32_t)t);
    struct section *s;

    if (!w || !name || es == 0 || (!data && count > 0) || count > SIZE_MAX / es ||
        (uint64_t)count > (UINT64_MAX >> 4) / es)
        return -EINVAL;
    len = strlen(name);
    if (len == 0 || len > DX_CKPT_NAME_MAX)
        return -EINVAL;
    for (size_t i = 0; i < w->n; i++)
        if (strcmp(w->secs[i].name, name) == 0)
            return -EINVAL;
    if (w->n == w->alloc) {
        size_t na = w->alloc ? w->alloc * 2 : 8;
        struct section *ns = realloc(w->secs, na * sizeof(*ns));

        if (!ns)
            return -ENOMEM;
        w->secs = ns;
        w->alloc = na;
    }
    s = &w->secs[w->n++];
    memset(s->name, 0, sizeof(s->name));
    memcpy(s->name, name, len);
    s->dtype = (uint32_t)t;
    s->data = data;
    s->count = count;
    return 0;
}

/* Writes buf to fd and folds it into *crc. */
static int emit(int fd, const void *buf, size_t len, uint32_t *crc)
{
    *crc = dx_ckpt_crc32c(*crc, buf, len);
    return write_all(fd, buf, len);
}

static int write_shard(const dx_ckpt_writer_t *w, int fd, uint64_t *bytes, uint32_t *crc_out)
{
    static const uint8_t zeros[ALIGN];
    size_t table_len = HEADER_LEN + (size_t)ENTRY_LEN * w->n;
    uint8_t *head = calloc(1, table_len);
    uint8_t trailer[TRAILER_LEN];
    uint64_t pos = table_len;
    uint32_t crc = 0;
    int rc;

    if (!head)
        return -ENOMEM;
    memcpy(head, magic, MAGIC_LEN);
    put_u32(head + 8, DX_CKPT_VERSION);
    put_u32(head + 12, (uint32_t)w->n);
    for (size_t i = 0; i < w->n; i++) {
        const struct section *s = &w->secs[i];
        uint8_t *e = head + HEADER_LEN + ENTRY_LEN * i;

        memcpy(e, s->name, NAME_LEN);
        put_u32(e + 64, s->dtype);
        put_u32(e + 68, 0);
        put_u64(e + 72, s->count);
        put_u64(e + 80, pos);
        pos = align_up(pos + s->count * dtype_size(s->dtype));
    }
    rc = emit(fd, head, table_len, &crc);
    free(head);
    pos = table_len;
    for (size_t i = 0; rc == 0 && i < w->n; i++) {
        const struct section *s = &w->secs[i];
        uint64_t len = s->count * dtype_size(s->dtype);

        if (len > 0)
            rc = emit(fd, s->data, (size_t)len, &crc);
        if (rc == 0 && align_up(pos + len) != pos + len)
            rc = emit(fd, zeros, (size_t)(align_up(pos + len) - (pos + len)), &crc);
        pos = align_up(pos + len);
    }
    if (rc < 0)
        return rc;
    put_u32(trailer, crc);
    memcpy(trailer + 4, end_magic, 4);
    rc = write_all(fd, trailer, sizeof(trailer));
    if (rc < 0)
        return rc;
    *bytes = pos + TRAILER_LEN;
    *crc_out = crc;
    return 0;
}

int dx_ckpt_writer_commit(dx_ckpt_writer_t *w, const char *path, struct dx_ckpt_shard_info *info,
                          char *err, size_t errlen)
{
    char tmp[PATH_MAX];
    uint64_t bytes = 0;
    uint32_t crc = 0;
    int fd, rc;

    if (!w || !path)
        return dx_errf(err, errlen, -EINVAL, "checkpoint commit: no writer or path");
    if (strlen(base_name(path)) >= DX_CKPT_FILE_MAX || !valid_file_name(base_name(path)))
        return dx_errf(err, errlen, -EINVAL, "checkpoint shard %s: bad file name", path);
    if (w->n > UINT32_MAX)
        return dx_errf(err, errlen, -EINVAL, "checkpoint shard %s: too many sections", path);
    if (snprintf(tmp, sizeof(tmp), "%s%s", path, TMP_SUFFIX) >= (int)sizeof(tmp))
        return dx_errf(err, errlen, -ENAMETOOLONG, "checkpoint shard %s: path too long", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return dx_errf(err, errlen, -errno, "creating %s: %s", tmp, strerror(errno));
    rc = write_shard(w, fd, &bytes, &crc);
    if (rc < 0) {
        dx_errf(err, errlen, rc, "writing %s: %s", tmp, strerror(-rc));
        goto fail;
    }
    if (fsync(fd) < 0) {
        rc = dx_errf(err, errlen, -errno, "syncing %s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (close(fd) < 0) {
        fd = -1;
        rc = dx_errf(err, errlen, -errno, "closing %s: %s", tmp, strerror(errno));
        goto fail;
    }
    rc = publish(tmp, path, err, errlen);
    if (rc < 0)
        return rc;
    if (info) {
        memset(info, 0, sizeof(*info));
        snprintf(info->file, sizeof(info->file), "%s", base_name(path));
        info->bytes = bytes;
        info->crc32c = crc;
    }
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return rc;
}

/* --- reader ---------------------------------------------------------------- */

struct rsection {
    const char *name; /* into buf */
    uint32_t dtype;
    uint64_t count, offset, len;
};

struct dx_ckpt_reader {
    char *path;
    uint8_t *buf;
    size_t size;
    struct rsection *secs; /* sorted by name */
    size_t n;
};

void dx_ckpt_close(dx_ckpt_reader_t *r)
{
    if (!r)
        return;
    free(r->secs);
    free(r->buf);
    free(r->path);
    free(r);
}

static int read_file(const char *path, uint8_t **out, size_t *size, char *err, size_t errlen)
{
    struct stat st;
    uint8_t *buf = NULL;
    size_t done = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC), rc;

    if (fd < 0)
        return dx_errf(err, errlen, -errno, "checkpoint shard %s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0) {
        rc = dx_errf(err, errlen, -errno, "checkpoint shard %s: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = dx_errf(err, errlen, -EINVAL, "checkpoint shard %s: not a regular file", path);
        goto fail;
    }
    if ((uint64_t)st.st_size > SIZE_MAX - 1) {
        rc = dx_errf(err, errlen, -EFBIG, "checkpoint shard %s: too big to load", path);
        goto fail;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        rc = dx_errf(err, errlen, -ENOMEM, "checkpoint shard %s: out of memory (%lld bytes)", path,
                     (long long)st.st_size);
        goto fail;
    }
    /* Read one byte more than stat said, to notice a file that grew. */
    while (done < (size_t)st.st_size + 1) {
        ssize_t n = read(fd, buf + done, (size_t)st.st_size + 1 - done);

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = dx_errf(err, errlen, -errno, "checkpoint shard %s: %s", path, strerror(errno));
            goto fail;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    if (done != (size_t)st.st_size) {
        rc = dx_errf(err, errlen, -EAGAIN, "checkpoint shard %s: changed while being read", path);
        goto fail;
    }
    close(fd);
    *out = buf;
    *size = done;
    return 0;
fail:
    free(buf);
    close(fd);
    return rc;
}

static int cmp_offset(const void *a, const void *b)
{
    const struct rsection *x = a, *y = b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const struct rsection *)a)->name, ((const struct rsection *)b)->name);
}

/* Checks the section table of a shard whose trailer and CRC are good. */
static int parse_table(dx_ckpt_reader_t *r, char *err, size_t errlen)
{
    const char *path = r->path;
    uint64_t n = get_u32(r->buf + 12), data_end = r->size - TRAILER_LEN, table_end;

    if (n > (data_end - HEADER_LEN) / ENTRY_LEN)
        return dx_errf(err, errlen, -EBADMSG,
                       "checkpoint shard %s: %" PRIu64 " sections do not fit in %zu bytes", path, n,
                       r->size);
    table_end = HEADER_LEN + n * ENTRY_LEN;
    r->secs = calloc(n ? n : 1, sizeof(*r->secs));
    if (!r->secs)
        return dx_errf(err, errlen, -ENOMEM, "checkpoint shard %s: out of memory", path);
    r->n = n;
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *e = r->buf + HEADER_LEN + ENTRY_LEN * i;
        struct rsection *s = &r->secs[i];
        size_t nlen = strnlen((const char *)e, NAME_LEN), es;

        if (nlen == 0 || nlen == NAME_LEN)
            return dx_errf(err, errlen, -EBADMSG,
                           "checkpoint shard %s: section %" PRIu64
                           " has an empty or unterminated name",
                           path, i);
        for (size_t k = nlen; k < NAME_LEN; k++)
            if (e[k] != 0)
                return dx_errf(
                    err, errlen, -EBADMSG,
                    "checkpoint shard %s: section %" PRIu64 " has garbage after its name", path, i);
        s->name = (const char *)e;
        s->dtype = get_u32(e + 64);
        s->count = get_u64(e + 72);
        s->offset = get_u64(e + 80);
        es = dtype_size(s->dtype);
        if (es == 0)
            return dx_errf(err, errlen, -EBADMSG,
                           "checkpoint shard %s: section %s has unknown type %" PRIu32, path,
                           s->name, s->dtype);
        if (get_u32(e + 68) != 0)
            return dx_errf(err, errlen, -EBADMSG,
                           "checkpoint shard %s: section %s has a non-zero reserved field", path,
                           s->name);
        if (s->offset % ALIGN != 0 || s->offset < table_end || s->offset > data_end)
            return dx_errf(err, errlen, -EBADMSG,
                           "checkpoint shard %s: section %s has a bad offset %" PRIu64, path,
                           s->name, s->offset);
        if (s->count > (data_end - s->offset) / es)
            return dx_errf(err, errlen, -EBADMSG,
                           "checkpoint shard %s: section %s (%" PRIu64 " %s at %" PRIu64
                           ") runs past the data end %" PRIu64,
                           path, s->name, s->count, dtype_name(s->dtype), s->offset, data_end);
        s->len = s->count * es;
    }
    qsort(r->secs, n, sizeof(*r->secs), cmp_offset);
    for (uint64_t i = 1; i < n; i++) {
        const struct rsection *a = &r->secs[i - 1], *b = &r->secs[i];

        if (a->len > 0 && b->len > 0 && a->offset + a->len > b->offset)
            return dx_errf(err, errlen, -EBADMSG, "checkpoint shard %s: sections %s and %s overlap",
                           path, a->name, b->name);
    }
    qsort(r->secs, n, sizeof(*r->secs), cmp_name);
    for (uint64_t i = 1; i < n; i++)
        if (strcmp(r->secs[i - 1].name, r->secs[i].name) == 0)
            return dx_errf(err, errlen, -EBADMSG, "checkpoint shard %s: section %s appears twice",
                           path, r->secs[i].name);
    return 0;
}

/* Checks r->buf (r->size bytes) as a shard named path; on success *out = r,
 * on failure r is closed. */
static int open_loaded(dx_ckpt_reader_t *r, const char *path,
                       const struct dx_ckpt_shard_info *expect, dx_ckpt_reader_t **out, char *err,
                       size_t errlen)
{
    uint32_t version, stored, crc;
    int rc;

    if (expect && expect->bytes != r->size) {
        rc = dx_errf(err, errlen, -EBADMSG,
                     "checkpoint shard %s is %zu bytes, the manifest says %" PRIu64
                     " (torn or from another checkpoint)",
                     path, r->size, expect->bytes);
        goto fail;
    }
    if (r->size < MIN_SHARD) {
        rc = dx_errf(err, errlen, -EBADMSG,
                     "checkpoint shard %s is %zu bytes, too short for a shard (truncated?)", path,
                     r->size);
        goto fail;
    }
    if (memcmp(r->buf, magic, MAGIC_LEN) != 0) {
        rc = dx_errf(err, errlen, -EBADMSG, "%s is not a checkpoint shard (bad magic)", path);
        goto fail;
    }
    version = get_u32(r->buf + 8);
    if (version != DX_CKPT_VERSION) {
        rc = dx_errf(err, errlen, -EPROTONOSUPPORT,
                     "checkpoint shard %s: unsupported checkpoint format version %" PRIu32
                     " (this build reads %d)",
                     path, version, DX_CKPT_VERSION);
        goto fail;
    }
    if (r->size % ALIGN != 0 || memcmp(r->buf + r->size - 4, end_magic, 4) != 0) {
        rc = dx_errf(err, errlen, -EBADMSG,
                     "checkpoint shard %s (%zu bytes) has no end marker: truncated or torn", path,
                     r->size);
        goto fail;
    }
    stored = get_u32(r->buf + r->size - TRAILER_LEN);
    crc = dx_ckpt_crc32c(0, r->buf, r->size - TRAILER_LEN);
    if (crc != stored) {
        rc = dx_errf(err, errlen, -EBADMSG,
                     "checkpoint shard %s is corrupt: CRC-32C 0x%08" PRIx32
                     ", the trailer says 0x%08" PRIx32,
                     path, crc, stored);
        goto fail;
    }
    if (expect && expect->crc32c != stored) {
        rc = dx_errf(err, errlen, -EBADMSG,
                     "checkpoint shard %s has CRC-32C 0x%08" PRIx32
                     ", the manifest says 0x%08" PRIx32 " (from another checkpoint)",
                     path, stored, expect->crc32c);
        goto fail;
    }
    rc = parse_table(r, err, errlen);
    if (rc < 0)
        goto fail;
    *out = r;
    return 0;
fail:
    dx_ckpt_close(r);
    return rc;
}

static dx_ckpt_reader_t *reader_new(const char *path)
{
    dx_ckpt_reader_t *r = calloc(1, sizeof(*r));

    if (r && !(r->path = strdup(path))) {
        free(r);
        r = NULL;
    }
    return r;
}

int dx_ckpt_open(const char *path, const struct dx_ckpt_shard_info *expect, dx_ckpt_reader_t **out,
                 char *err, size_t errlen)
{
    dx_ckpt_reader_t *r = reader_new(path);
    int rc;

    *out = NULL;
    if (!r)
        return dx_errf(err, errlen, -ENOMEM, "checkpoint shard %s: out of memory", path);
    if ((rc = read_file(path, &r->buf, &r->size, err, errlen)) < 0) {
        dx_ckpt_close(r);
        return rc;
    }
    return open_loaded(r, path, expect, out, err, errlen);
}

int dx_ckpt_open_buf(const char *name, const void *data, size_t size,
                     const struct dx_ckpt_shard_info *expect, dx_ckpt_reader_t **out, char *err,
                     size_t errlen)
{
    dx_ckpt_reader_t *r = reader_new(name);

    *out = NULL;
    if (!r || !(r->buf = malloc(size + 1))) {
        dx_ckpt_close(r);
        return dx_errf(err, errlen, -ENOMEM, "checkpoint shard %s: out of memory", name);
    }
    memcpy(r->buf, data, size);
    r->size = size;
    return open_loaded(r, name, expect, out, err, errlen);
}

int dx_ckpt_get(const dx_ckpt_reader_t *r, const char *name, enum dx_ckpt_dtype t, size_t count,
                const void **data, char *err, size_t errlen)
{
    struct rsection key = {.name = name};
    const struct rsection *s;

    *data = NULL;
    s = r->n ? bsearch(&key, r->secs, r->n, sizeof(*r->secs), cmp_name) : NULL;
    if (!s)
        return dx_errf(err, errlen, -ENOENT, "checkpoint shard %s has no section %s", r->path,
                       name);
    if (s->dtype != (uint32_t)t)
        return dx_errf(err, errlen, -EINVAL, "checkpoint shard %s: section %s is %s, expected %s",
                       r->path, name, dtype_name(s->dtype), dtype_name((uint32_t)t));
    if (s->count != (uint64_t)count)
        return dx_errf(err, errlen, -EINVAL,
                       "checkpoint shard %s: section %s has %" PRIu64 " %s, expected %zu", r->path,
                       name, s->count, dtype_name(s->dtype), count);
    *data = r->buf + s->offset;
    return 0;
}

/* --- manifest -------------------------------------------------------------- */

static int manifest_path(char *buf, size_t len, const char *dir, const char *suffix)
{
    return snprintf(buf, len, "%s/%s%s", dir, DX_CKPT_MANIFEST, suffix) >= (int)len ? -ENAMETOOLONG
                                                                                    : 0;
}

/* Checks the shard list: n >= 1, valid distinct basenames. */
static int check_shards(const char *what, const struct dx_ckpt_shard_info *shards, size_t n,
                        char *err, size_t errlen)
{
    if (n == 0)
        return dx_errf(err, errlen, -EBADMSG, "%s lists no shards", what);
    for (size_t i = 0; i < n; i++) {
        if (!valid_file_name(shards[i].file))
            return dx_errf(err, errlen, -EBADMSG, "%s: shard %zu has a bad file name \"%.*s\"",
                           what, i, DX_CKPT_FILE_MAX - 1, shards[i].file);
        for (size_t j = 0; j < i; j++)
            if (strcmp(shards[i].file, shards[j].file) == 0)
                return dx_errf(err, errlen, -EBADMSG, "%s lists shard %s twice", what,
                               shards[i].file);
    }
    return 0;
}

int dx_ckpt_manifest_write(const char *dir, uint64_t job_id, uint64_t step,
                           const struct dx_ckpt_shard_info *shards, size_t n, char *err,
                           size_t errlen)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    json_t *root = NULL, *arr;
    FILE *f = NULL;
    int rc;

    if (manifest_path(path, sizeof(path), dir, "") < 0 ||
        manifest_path(tmp, sizeof(tmp), dir, TMP_SUFFIX) < 0)
        return dx_errf(err, errlen, -ENAMETOOLONG, "checkpoint manifest in %s: path too long", dir);
    rc = check_shards(path, shards, n, err, errlen);
    if (rc < 0)
        return -EINVAL;
    if (job_id > INT64_MAX || step > INT64_MAX)
        return dx_errf(err, errlen, -ERANGE,
                       "%s: job %" PRIu64 " or step %" PRIu64 " too large for JSON", path, job_id,
                       step);
    for (size_t i = 0; i < n; i++)
        if (shards[i].bytes > INT64_MAX)
            return dx_errf(err, errlen, -ERANGE, "%s: shard %s too large for JSON", path,
                           shards[i].file);
    root = json_pack("{s:i, s:I, s:I, s:[]}", "format", DX_CKPT_MANIFEST_FORMAT, "job",
                     (json_int_t)job_id, "step", (json_int_t)step, "shards");
    arr = root ? json_object_get(root, "shards") : NULL;
    if (!arr) {
        rc = dx_errf(err, errlen, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_pack("{s:s, s:I, s:I}", "file", shards[i].file, "bytes",
                              (json_int_t)shards[i].bytes, "crc32c", (json_int_t)shards[i].crc32c);

        if (!s || json_array_append_new(arr, s) < 0) {
            rc = dx_errf(err, errlen, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
    }
    f = fopen(tmp, "we");
    if (!f) {
        rc = dx_errf(err, errlen, -errno, "creating %s: %s", tmp, strerror(errno));
        goto out;
    }
    if (json_dumpf(root, f, JSON_INDENT(2)) < 0 || fputc('\n', f) == EOF || fflush(f) != 0) {
        rc = dx_errf(err, errlen, errno ? -errno : -EIO, "writing %s: %s", tmp,
                     strerror(errno ? errno : EIO));
        goto out_unlink;
    }
    if (fsync(fileno(f)) < 0) {
        rc = dx_errf(err, errlen, -errno, "syncing %s: %s", tmp, strerror(errno));
        goto out_unlink;
    }
    rc = fclose(f);
    f = NULL;
    if (rc != 0) {
        rc = dx_errf(err, errlen, -errno, "closing %s: %s", tmp, strerror(errno));
        goto out_unlink;
    }
    rc = publish(tmp, path, err, errlen);
    goto out;
out_unlink:
    if (f)
        fclose(f);
    f = NULL;
    unlink(tmp);
out:
    if (f)
        fclose(f);
    json_decref(root);
    return rc;
}

/* A non-negative integer member of obj, at most max. */
static int get_uint(const char *path, const char *where, json_t *obj, const char *key, uint64_t max,
                    uint64_t *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(obj, key);

    if (!v)
        return dx_errf(err, errlen, -EBADMSG, "%s: %s has no \"%s\"", path, where, key);
    if (!json_is_integer(v) || json_integer_value(v) < 0 || (uint64_t)json_integer_value(v) > max)
        return dx_errf(err, errlen, -EBADMSG,
                       "%s: \"%s\" in %s must be an integer from 0 to %" PRIu64, path, key, where,
                       max);
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

static int manifest_parse(const char *path, json_t *root, json_error_t *jerr,
                          struct dx_ckpt_manifest *out, char *err, size_t errlen);

int dx_ckpt_manifest_read(const char *dir, struct dx_ckpt_manifest *out, char *err, size_t errlen)
{
    char path[PATH_MAX];
    json_error_t jerr;

    memset(out, 0, sizeof(*out));
    if (manifest_path(path, sizeof(path), dir, "") < 0)
        return dx_errf(err, errlen, -ENAMETOOLONG, "checkpoint manifest in %s: path too long", dir);
    if (access(path, F_OK) < 0)
        return dx_errf(err, errlen, -errno, "checkpoint manifest %s: %s", path, strerror(errno));
    return manifest_parse(path, json_load_file(path, JSON_REJECT_DUPLICATES, &jerr), &jerr, out,
                          err, errlen);
}

int dx_ckpt_manifest_parse(const char *name, const char *json, size_t len,
                           struct dx_ckpt_manifest *out, char *err, size_t errlen)
{
    json_error_t jerr;

    memset(out, 0, sizeof(*out));
    return manifest_parse(name, json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr), &jerr, out,
                          err, errlen);
}

/* Takes root (NULL when it did not parse, jerr says why). */
static int manifest_parse(const char *path, json_t *root, json_error_t *jerr,
                          struct dx_ckpt_manifest *out, char *err, size_t errlen)
{
    const json_error_t *je = jerr;
    struct dx_ckpt_manifest m = {0};
    uint64_t format = 0;
    json_t *arr;
    int rc;

    if (!root)
        return dx_errf(err, errlen, -EBADMSG,
                       "checkpoint manifest %s: bad JSON at line %d column %d: %s", path, je->line,
                       je->column, je->text);
    if (!json_is_object(root)) {
        rc = dx_errf(err, errlen, -EBADMSG, "checkpoint manifest %s: not a JSON object", path);
        goto fail;
    }
    rc = get_uint(path, "the manifest", root, "format", INT64_MAX, &format, err, errlen);
    if (rc < 0)
        goto fail;
    if (format != DX_CKPT_MANIFEST_FORMAT) {
        rc = dx_errf(err, errlen, -EPROTONOSUPPORT,
                     "checkpoint manifest %s: unsupported manifest format %" PRIu64
                     " (this build reads %d)",
                     path, format, DX_CKPT_MANIFEST_FORMAT);
        goto fail;
    }
    if ((rc = get_uint(path, "the manifest", root, "job", INT64_MAX, &m.job_id, err, errlen)) < 0 ||
        (rc = get_uint(path, "the manifest", root, "step", INT64_MAX, &m.step, err, errlen)) < 0)
        goto fail;
    arr = json_object_get(root, "shards");
    if (!json_is_array(arr)) {
        rc = dx_errf(err, errlen, -EBADMSG, "checkpoint manifest %s: %s", path,
                     arr ? "\"shards\" must be an array" : "no \"shards\"");
        goto fail;
    }
    m.n_shards = json_array_size(arr);
    m.shards = calloc(m.n_shards ? m.n_shards : 1, sizeof(*m.shards));
    if (!m.shards) {
        rc = dx_errf(err, errlen, -ENOMEM, "checkpoint manifest %s: out of memory", path);
        goto fail;
    }
    for (size_t i = 0; i < m.n_shards; i++) {
        json_t *s = json_array_get(arr, i), *file;
        struct dx_ckpt_shard_info *info = &m.shards[i];
        char where[64];
        uint64_t crc = 0;

        snprintf(where, sizeof(where), "shard %zu", i);
        if (!json_is_object(s)) {
            rc = dx_errf(err, errlen, -EBADMSG, "checkpoint manifest %s: %s is not an object", path,
                         where);
            goto fail;
        }
        file = json_object_get(s, "file");
        if (!json_is_string(file) || json_string_length(file) >= DX_CKPT_FILE_MAX) {
            rc = dx_errf(err, errlen, -EBADMSG,
                         "checkpoint manifest %s: %s needs \"file\", a string of under %d bytes",
                         path, where, DX_CKPT_FILE_MAX);
            goto fail;
        }
        snprintf(info->file, sizeof(info->file), "%s", json_string_value(file));
        if ((rc = get_uint(path, where, s, "bytes", INT64_MAX, &info->bytes, err, errlen)) < 0 ||
            (rc = get_uint(path, where, s, "crc32c", UINT32_MAX, &crc, err, errlen)) < 0)
            goto fail;
        info->crc32c = (uint32_t)crc;
    }
    {
        char what[PATH_MAX + 32];

        snprintf(what, sizeof(what), "checkpoint manifest %s", path);
        rc = check_shards(what, m.shards, m.n_shards, err, errlen);
        if (rc < 0)
            goto fail;
    }
    json_decref(root);
    *out = m;
    return 0;
fail:
    json_decref(root);
    dx_ckpt_manifest_clear(&m);
    return rc;
}

void dx_ckpt_manifest_clear(struct dx_ckpt_manifest *m)
{
    if (!m)
        return;
    free(m->shards);
    memset(m, 0, sizeof(*m));
}

const struct dx_ckpt_shard_info *dx_ckpt_manifest_find(const struct dx_ckpt_manifest *m,
                                                       const char *file)
{
    for (size_t i = 0; m && i < m->n_shards; i++)
        if (strcmp(m->shards[i].file, file) == 0)
            return &m->shards[i];
    return NULL;
}

/* --- directories ----------------------------------------------------------- */

int dx_ckpt_step_dir(char *buf, size_t len, const char *root, uint64_t job_id, uint64_t step)
{
    size_t rlen = strlen(root);
    int n;

    if (rlen == 0)
        return -EINVAL;
    while (rlen > 1 && root[rlen - 1] == '/')
        rlen--;
    if (rlen > INT_MAX)
        return -ENAMETOOLONG;
    n = snprintf(buf, len, "%.*s%sjob-%" PRIu64 "/step-%08" PRIu64, (int)rlen, root,
                 rlen == 1 && root[0] == '/' ? "" : "/", job_id, step);
    if (n < 0 || (size_t)n >= len)
        return -ENAMETOOLONG;
    return 0;
}

int dx_ckpt_mkdirs(const char *path)
{
    return dx_mkdir_p(path, 0755);
}
