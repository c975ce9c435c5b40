/* data.c - the byte-level training text and its deterministic micro-batches
 * (the offset formula is in data.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "worker/data.h"
#include "worker/model/rng.h"

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;

    if (err && errlen > 0) {
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* The regular files of dir, sorted. */
static int list_files(const char *dir, char ***out, size_t *count, char *err, size_t errlen)
{
    DIR *dp = opendir(dir);
    struct dirent *de;
    char **names = NULL;
    size_t n = 0, alloc = 0;
    int rc = 0;

    if (!dp)
        return fail(err, errlen, -errno, "data directory %s: %s", dir, strerror(errno));
    while ((de = readdir(dp))) {
        struct stat st;

        if (de->d_name[0] == '.')
            continue;
        if (fstatat(dirfd(dp), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode))
            continue;
        if (n == alloc) {
            size_t na = alloc ? alloc * 2 : 64;
            char **nn = realloc(names, na * sizeof(*names));

            if (!nn) {
                rc = -ENOMEM;
                break;
            }
            names = nn;
            alloc = na;
        }
        if (!(names[n] = strdup(de->d_name))) {
            rc = -ENOMEM;
            break;
        }
        n++;
    }
    closedir(dp);
    if (rc < 0) {
        free_names(names, n);
        return fail(err, errlen, rc, "data directory %s: out of memory", dir);
    }
    if (n > 1)
        qsort(names, n, sizeof(*names), cmp_names);
    *out = names;
    *count = n;
    return 0;
}

/* Appends the file dir/name to d->text. */
static int read_file(struct wk_data *d, size_t *alloc, const char *dir, const char *name, char *err,
                     size_t errlen)
{
    char path[4096];
    int fd, rc = 0;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return fail(err, errlen, -errno, "%s: %s", path, strerror(errno));
    for (;;) {
        ssize_t got;

        if (*alloc - d->len < 65536) {
            size_t na = *alloc ? *alloc * 2 : 1 << 20;
            uint8_t *nt = realloc(d->text, na);

            if (!nt) {
                rc = fail(err, errlen, -ENOMEM, "%s: out of memory", path);
                break;
            }
            d->text = nt;
            *alloc = na;
        }
        got = read(fd, d->text + d->len, *alloc - d->len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            rc = fail(err, errlen, -errno, "%s: %s", path, strerror(errno));
            break;
        }
        if (got == 0)
            break;
        d->len += (size_t)got;
    }
    close(fd);
    return rc;
}

int wk_data_open(struct wk_data *d, const char *dir, char *err, size_t errlen)
{
    char **names = NULL;
    size_t n = 0, alloc = 0;
    int rc;

    memset(d, 0, sizeof(*d));
    if ((rc = list_files(dir, &names, &n, err, errlen)) < 0)
        return rc;
    if (n == 0) {
        free_names(names, n);
        return fail(err, errlen, -ENOENT, "data directory %s has no regular files", dir);
    }
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = read_file(d, &alloc, dir, names[i], err, errlen);
    free_names(names, n);
    if (rc < 0) {
        wk_data_close(d);
        return rc;
    }
    d->files = (int)n;
    d->train_len =
        d->len / 100 * WK_DATA_TRAIN_PERCENT + d->len % 100 * WK_DATA_TRAIN_PERCENT / 100;
    if (d->train_len == 0 || d->train_len == d->len) {
        size_t len = d->len;

        wk_data_close(d);
        return fail(err, errlen, -ENODATA, "data directory %s: %zu bytes are too few to split", dir,
                    len);
    }
    return 0;
}

void wk_data_close(struct wk_data *d)
{
    free(d->text);
    memset(d, 0, sizeof(*d));
}

const uint8_t *wk_data_split(const struct wk_data *d, enum wk_data_split split, size_t *len)
{
    if (split == WK_DATA_TRAIN) {
        *len = d->train_len;
        return d->text;
    }
    *len = d->len - d->train_len;
    return d->text + d->train_len;
}

static uint64_t mix(uint64_t x)
{
    struct wk_rng r = {x};

    return wk_rng_next(&r);
}

int64_t wk_data_offset(const struct wk_data *d, enum wk_data_split split, uint64_t seed,
                       int64_t step, int64_t i, int seq)
{
    size_t len;

    wk_data_split(d, split, &len);
    if (seq < 1 || len <= (size_t)seq)
        return -EINVAL;
    uint64_t h = mix(mix(mix(seed ^ WK_DATA_SALT) ^ (uint64_t)step) ^ (uint64_t)i);
    return (int64_t)(h % (uint64_t)(len - (size_t)seq));
}

int wk_data_batch(const struct wk_data *d, enum wk_data_split split, uint64_t seed, int64_t step,
                  int rank, int microbatches, int k, int batch, int seq, int32_t *tokens)
{
    size_t len;
    const uint8_t *text = wk_data_split(d, split, &len);

    if (rank < 0 || microbatches < 1 || k < 0 || k >= microbatches || batch < 1 || !tokens)
        return -EINVAL;
    for (int b = 0; b < batch; b++) {
        int64_t i = ((int64_t)rank * microbatches + k) * batch + b;
        int64_t off = wk_data_offset(d, split, seed, step, i, seq);
        int32_t *t = tokens + (size_t)b * (size_t)(seq + 1);

        if (off < 0)
            return (int)off;
        for (int j = 0; j <= seq; j++)
            t[j] = text[off + j];
    }
    return 0;
}
