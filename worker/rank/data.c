/* data.c - the byte-level training text, memory-mapped file by file, and
 * its deterministic micro-batches (the offset formula is in data.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "worker/rank/data.h"

#include "common/log.h"
#include "worker/model/rng.h"

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
        return dx_errf(err, errlen, -errno, "data directory %s: %s", dir, strerror(errno));
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
        return dx_errf(err, errlen, rc, "data directory %s: out of memory", dir);
    }
    if (n > 1)
        qsort(names, n, sizeof(*names), cmp_names);
    *out = names;
    *count = n;
    return 0;
}

/* Maps dir/name read-only as the next segment of the text (an empty file
 * adds nothing). */
static int map_file(struct wk_data *d, const char *dir, const char *name, char *err, size_t errlen)
{
    struct wk_data_seg *seg = &d->seg[d->nseg];
    char path[4096];
    struct stat st;
    void *map;
    int fd, rc = 0;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return dx_errf(err, errlen, -errno, "%s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0) {
        rc = dx_errf(err, errlen, -errno, "%s: %s", path, strerror(errno));
    } else if (st.st_size > 0) {
        map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            rc = dx_errf(err, errlen, -errno, "%s: cannot map it: %s", path, strerror(errno));
        } else {
            seg->bytes = map;
            seg->len = (size_t)st.st_size;
            seg->start = d->len;
            d->len += seg->len;
            d->nseg++;
        }
    }
    close(fd);
    return rc;
}

const char *wk_data_dataset_dir(const char *name)
{
    return name && strcmp(name, JOB_SPEC_DATASET_BUILTIN) == 0 ? WK_DATA_DIR_DEFAULT : NULL;
}

int wk_data_open(struct wk_data *d, const char *dir, char *err, size_t errlen)
{
    char **names = NULL;
    size_t n = 0;
    int rc = 0;

    memset(d, 0, sizeof(*d));
    if ((rc = list_files(dir, &names, &n, err, errlen)) < 0)
        return rc;
    if (n == 0) {
        free_names(names, n);
        return dx_errf(err, errlen, -ENOENT, "data directory %s has no regular files", dir);
    }
    if (!(d->seg = calloc(n, sizeof(*d->seg)))) {
        free_names(names, n);
        return dx_errf(err, errlen, -ENOMEM, "data directory %s: out of memory", dir);
    }
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = map_file(d, dir, names[i], err, errlen);
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
        return dx_errf(err, errlen, -ENODATA, "data directory %s: %zu bytes are too few to split",
                       dir, len);
    }
    return 0;
}

void wk_data_close(struct wk_data *d)
{
    for (int i = 0; d->seg && i < d->nseg; i++)
        munmap((void *)d->seg[i].bytes, d->seg[i].len);
    free(d->seg);
    memset(d, 0, sizeof(*d));
}

size_t wk_data_split_len(const struct wk_data *d, enum wk_data_split split)
{
    return split == WK_DATA_TRAIN ? d->train_len : d->len - d->train_len;
}

int wk_data_read(const struct wk_data *d, enum wk_data_split split, size_t off, size_t n,
                 uint8_t *out)
{
    size_t at = (split == WK_DATA_TRAIN ? 0 : d->train_len) + off;
    int lo = 0, hi = d->nseg - 1;

    if (off > wk_data_split_len(d, split) || n > wk_data_split_len(d, split) - off)
        return -EINVAL;
    if (n == 0)
        return 0;
    /* the segment holding byte `at`: the last one starting at or before it */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;

        if (d->seg[mid].start <= at)
            lo = mid;
        else
            hi = mid - 1;
    }
    for (int i = lo; n > 0; i++) {
        size_t from = at - d->seg[i].start, take = d->seg[i].len - from;

        take = take < n ? take : n;
        memcpy(out, d->seg[i].bytes + from, take);
        out += take;
        at += take;
        n -= take;
    }
    return 0;
}

static uint64_t mix(uint64_t x)
{
    struct wk_rng r = {x};

    return wk_rng_next(&r);
}

int64_t wk_data_offset(const struct wk_data *d, enum wk_data_split split, uint64_t seed,
                       int64_t step, int64_t i, int seq)
{
    size_t len = wk_data_split_len(d, split);

    if (seq < 1 || len <= (size_t)seq)
        return -EINVAL;
    uint64_t h = mix(mix(mix(seed ^ WK_DATA_SALT) ^ (uint64_t)step) ^ (uint64_t)i);
    return (int64_t)(h % (uint64_t)(len - (size_t)seq));
}

int wk_data_batch(const struct wk_data *d, enum wk_data_split split, uint64_t seed, int64_t step,
                  int rank, int microbatches, int k, int batch, int seq, int32_t *tokens)
{
    uint8_t *window; /* one sequence's seq + 1 bytes, then widened to tokens */
    int rc = 0;

    if (rank < 0 || microbatches < 1 || k < 0 || k >= microbatches || batch < 1 || seq < 1 ||
        !tokens)
        return -EINVAL;
    if (!(window = malloc((size_t)seq + 1)))
        return -ENOMEM;
    for (int b = 0; b < batch && rc == 0; b++) {
        int64_t i = ((int64_t)rank * microbatches + k) * batch + b;
        int64_t off = wk_data_offset(d, split, seed, step, i, seq);
        int32_t *t = tokens + (size_t)b * (size_t)(seq + 1);

        if (off < 0)
            rc = (int)off;
        else if ((rc = wk_data_read(d, split, (size_t)off, (size_t)seq + 1, window)) == 0)
            for (int j = 0; j <= seq; j++)
                t[j] = window[j];
    }
    free(window);
    return rc;
}
