/* test_ckpt.c - checkpoint shards and manifests (common/ckpt.h): CRC-32C
 * check value, a round trip of f32/i64/bytes/empty sections, every
 * truncation and every single-byte flip of a small shard refused, manifest
 * mismatches, an unknown version, wrong dtype/count, bad names at add, the
 * atomic commit, and manifest round trip and malformed manifests. Everything
 * lives in a mkdtemp directory under /tmp, removed afterwards. */
#include <criterion/criterion.h>
#include <errno.h>
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fs.h"
#include "common/ckpt.h"

#define ERRLEN 512

static char dir[64];
static char err[ERRLEN];

static void setup(void)
{
    snprintf(dir, sizeof(dir), "/tmp/test_ckpt.XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}

static void teardown(void)
{
    dx_remove_tree(dir);
}

TestSuite(ckpt, .init = setup, .fini = teardown);

static void path_in(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", dir, name);
}

static int exists(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0;
}

static uint8_t *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;

    cr_assert_not_null(f, "open %s", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc(n > 0 ? (size_t)n : 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void spit(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");

    cr_assert_not_null(f, "create %s", path);
    if (len > 0)
        cr_assert_eq(fwrite(buf, 1, len, f), len);
    cr_assert_eq(fclose(f), 0);
}

static const float F32[5] = {1.5f, -2.25f, 0.0f, 3.0e10f, -1.0e-7f};
static const int64_t I64[3] = {INT64_MIN, 42, INT64_MAX};
static const char BYTES[] = "data position: file 3, byte 12345";

/* A small shard with a few sections at path. */
static void write_small(const char *path, struct dx_ckpt_shard_info *info)
{
    dx_ckpt_writer_t *w;

    cr_assert_eq(dx_ckpt_writer_create(&w), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "params", DX_CKPT_F32, F32, 5), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "rng", DX_CKPT_I64, I64, 3), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "data_pos", DX_CKPT_BYTES, BYTES, sizeof(BYTES)), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "empty", DX_CKPT_F32, NULL, 0), 0);
    cr_assert_eq(dx_ckpt_writer_commit(w, path, info, err, sizeof(err)), 0, "%s", err);
    dx_ckpt_writer_destroy(w);
}

/* Opening path must fail with an error naming it. */
static void expect_refused(const char *path, const struct dx_ckpt_shard_info *expect,
                           const char *what)
{
    dx_ckpt_reader_t *r = (dx_ckpt_reader_t *)0x1;
    int rc;

    err[0] = '\0';
    rc = dx_ckpt_open(path, expect, &r, err, sizeof(err));
    cr_assert_lt(rc, 0, "%s: accepted", what);
    cr_assert_null(r, "%s", what);
    cr_assert_not_null(strstr(err, path), "%s: error does not name the file: %s", what, err);
}

Test(ckpt, crc32c_check_value)
{
    cr_assert_eq(dx_ckpt_crc32c(0, "123456789", 9), 0xE3069283u);
    cr_assert_eq(dx_ckpt_crc32c(dx_ckpt_crc32c(0, "1234", 4), "56789", 5), 0xE3069283u);
    cr_assert_eq(dx_ckpt_crc32c(0, "", 0), 0u);
}

Test(ckpt, round_trip)
{
    char path[128];
    struct dx_ckpt_shard_info info;
    dx_ckpt_reader_t *r;
    const void *p;
    uint8_t *raw;
    size_t len;

    path_in(path, sizeof(path), "rank-0.ckpt");
    write_small(path, &info);
    cr_assert_str_eq(info.file, "rank-0.ckpt");
    raw = slurp(path, &len);
    cr_assert_eq(info.bytes, len);
    cr_assert_eq(len % 8, 0);
    cr_assert_eq(memcmp(raw, "DXCKPT\0\0", 8), 0);
    cr_assert_eq(memcmp(raw + len - 4, "DXCE", 4), 0);
    cr_assert_eq(info.crc32c, dx_ckpt_crc32c(0, raw, len - 8));
    cr_assert_eq(raw[len - 8] | raw[len - 7] << 8 | raw[len - 6] << 16 |
                     (uint32_t)raw[len - 5] << 24,
                 info.crc32c);
    free(raw);

    cr_assert_eq(dx_ckpt_open(path, &info, &r, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(dx_ckpt_get(r, "params", DX_CKPT_F32, 5, &p, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(memcmp(p, F32, sizeof(F32)), 0);
    cr_assert_eq((uintptr_t)p % 8, 0);
    cr_assert_eq(dx_ckpt_get(r, "rng", DX_CKPT_I64, 3, &p, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(memcmp(p, I64, sizeof(I64)), 0);
    cr_assert_eq((uintptr_t)p % 8, 0);
    cr_assert_eq(dx_ckpt_get(r, "data_pos", DX_CKPT_BYTES, sizeof(BYTES), &p, err, sizeof(err)), 0,
                 "%s", err);
    cr_assert_str_eq(p, BYTES);
    cr_assert_eq(dx_ckpt_get(r, "empty", DX_CKPT_F32, 0, &p, err, sizeof(err)), 0, "%s", err);
    dx_ckpt_close(r);

    /* No sections at all is a valid shard too. */
    {
        dx_ckpt_writer_t *w;

        path_in(path, sizeof(path), "none.ckpt");
        cr_assert_eq(dx_ckpt_writer_create(&w), 0);
        cr_assert_eq(dx_ckpt_writer_commit(w, path, &info, err, sizeof(err)), 0, "%s", err);
        dx_ckpt_writer_destroy(w);
        cr_assert_eq(info.bytes, 24);
        cr_assert_eq(dx_ckpt_open(path, &info, &r, err, sizeof(err)), 0, "%s", err);
        cr_assert_eq(dx_ckpt_get(r, "params", DX_CKPT_F32, 5, &p, err, sizeof(err)), -ENOENT);
        dx_ckpt_close(r);
    }
}

Test(ckpt, every_truncation_refused)
{
    char path[128], cut[128];
    struct dx_ckpt_shard_info info;
    uint8_t *raw;
    size_t len;

    path_in(path, sizeof(path), "rank-0.ckpt");
    path_in(cut, sizeof(cut), "cut.ckpt");
    write_small(path, &info);
    raw = slurp(path, &len);
    for (size_t n = 0; n < len; n++) {
        char what[64];

        snprintf(what, sizeof(what), "truncated to %zu", n);
        spit(cut, raw, n);
        expect_refused(cut, NULL, what);
        expect_refused(cut, &info, what);
        cr_assert_not_null(strstr(err, "manifest says"), "%s", err);
    }
    free(raw);
    /* A missing file is refused too. */
    path_in(cut, sizeof(cut), "missing.ckpt");
    expect_refused(cut, NULL, "missing");
}

Test(ckpt, every_byte_flip_refused)
{
    char path[128], bad[128];
    uint8_t *raw;
    size_t len;

    path_in(path, sizeof(path), "rank-0.ckpt");
    path_in(bad, sizeof(bad), "bad.ckpt");
    write_small(path, NULL);
    raw = slurp(path, &len);
    for (size_t i = 0; i < len; i++) {
        static const uint8_t flips[] = {0x01, 0x80, 0xff};

        for (size_t k = 0; k < sizeof(flips); k++) {
            char what[64];

            snprintf(what, sizeof(what), "byte %zu ^ 0x%02x", i, flips[k]);
            raw[i] ^= flips[k];
            spit(bad, raw, len);
            raw[i] ^= flips[k];
            expect_refused(bad, NULL, what);
        }
    }
    /* An appended byte is refused too. */
    {
        uint8_t *longer = malloc(len + 8);

        cr_assert_not_null(longer);
        memcpy(longer, raw, len);
        memset(longer + len, 0, 8);
        spit(bad, longer, len + 1);
        expect_refused(bad, NULL, "one byte appended");
        spit(bad, longer, len + 8);
        expect_refused(bad, NULL, "eight bytes appended");
        free(longer);
    }
    free(raw);
}

/* Rewrites the file with its CRC recomputed (to test the checks behind it). */
static void reseal(uint8_t *raw, size_t len)
{
    uint32_t crc = dx_ckpt_crc32c(0, raw, len - 8);

    for (int i = 0; i < 4; i++)
        raw[len - 8 + i] = (uint8_t)(crc >> (8 * i));
}

Test(ckpt, structure_checked_behind_crc)
{
    char path[128], bad[128];
    uint8_t *raw;
    size_t len;

    path_in(path, sizeof(path), "rank-0.ckpt");
    path_in(bad, sizeof(bad), "bad.ckpt");
    write_small(path, NULL);
    raw = slurp(path, &len);

    /* Section 1's offset pointing into section 0 (overlap). */
    {
        uint8_t *copy = malloc(len);

        memcpy(copy, raw, len);
        memcpy(copy + 16 + 88 + 80, copy + 16 + 80, 8);
        reseal(copy, len);
        spit(bad, copy, len);
        expect_refused(bad, NULL, "overlap");
        cr_assert_not_null(strstr(err, "overlap"), "%s", err);

        /* A huge count (count * size overflows). */
        memcpy(copy, raw, len);
        memset(copy + 16 + 72, 0xff, 8);
        reseal(copy, len);
        spit(bad, copy, len);
        expect_refused(bad, NULL, "huge count");

        /* A section count larger than the file. */
        memcpy(copy, raw, len);
        memset(copy + 12, 0xff, 4);
        reseal(copy, len);
        spit(bad, copy, len);
        expect_refused(bad, NULL, "huge section count");

        /* Two sections with the same name. */
        memcpy(copy, raw, len);
        memcpy(copy + 16 + 88, copy + 16, 64);
        reseal(copy, len);
        spit(bad, copy, len);
        expect_refused(bad, NULL, "duplicate name");
        cr_assert_not_null(strstr(err, "twice"), "%s", err);

        /* Unknown dtype. */
        memcpy(copy, raw, len);
        copy[16 + 64] = 9;
        reseal(copy, len);
        spit(bad, copy, len);
        expect_refused(bad, NULL, "unknown dtype");
        free(copy);
    }
    free(raw);
}

Test(ckpt, expected_mismatch_refused)
{
    char path[128];
    struct dx_ckpt_shard_info info, other;

    path_in(path, sizeof(path), "rank-0.ckpt");
    write_small(path, &info);
    other = info;
    other.bytes += 8;
    expect_refused(path, &other, "bytes mismatch");
    cr_assert_not_null(strstr(err, "manifest says"), "%s", err);
    other = info;
    other.crc32c ^= 1;
    expect_refused(path, &other, "crc mismatch");
    cr_assert_not_null(strstr(err, "manifest says"), "%s", err);
}

Test(ckpt, unknown_version_refused)
{
    char path[128];
    dx_ckpt_reader_t *r;
    uint8_t *raw;
    size_t len;

    path_in(path, sizeof(path), "rank-0.ckpt");
    write_small(path, NULL);
    raw = slurp(path, &len);
    raw[8] = 2;
    reseal(raw, len);
    spit(path, raw, len);
    free(raw);
    cr_assert_eq(dx_ckpt_open(path, NULL, &r, err, sizeof(err)), -EPROTONOSUPPORT, "%s", err);
    cr_assert_not_null(strstr(err, "unsupported checkpoint format version 2 (this build reads 1)"),
                       "%s", err);
    cr_assert_not_null(strstr(err, path), "%s", err);
}

Test(ckpt, wrong_dtype_or_count_refused)
{
    char path[128];
    dx_ckpt_reader_t *r;
    const void *p = (const void *)0x1;

    path_in(path, sizeof(path), "rank-0.ckpt");
    write_small(path, NULL);
    cr_assert_eq(dx_ckpt_open(path, NULL, &r, err, sizeof(err)), 0, "%s", err);

    cr_assert_eq(dx_ckpt_get(r, "params", DX_CKPT_I64, 5, &p, err, sizeof(err)), -EINVAL);
    cr_assert_null(p);
    cr_assert_not_null(strstr(err, "section params is f32, expected i64"), "%s", err);
    cr_assert_not_null(strstr(err, path), "%s", err);

    cr_assert_eq(dx_ckpt_get(r, "params", DX_CKPT_F32, 6, &p, err, sizeof(err)), -EINVAL);
    cr_assert_not_null(strstr(err, "section params has 5 f32, expected 6"), "%s", err);
    cr_assert_not_null(strstr(err, path), "%s", err);

    cr_assert_eq(dx_ckpt_get(r, "momentum", DX_CKPT_F32, 5, &p, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "has no section momentum"), "%s", err);
    cr_assert_not_null(strstr(err, path), "%s", err);
    dx_ckpt_close(r);
}

Test(ckpt, bad_names_refused_at_add)
{
    dx_ckpt_writer_t *w;
    char name[80];
    float x = 1.0f;

    cr_assert_eq(dx_ckpt_writer_create(&w), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "a", DX_CKPT_F32, &x, 1), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "a", DX_CKPT_F32, &x, 1), -EINVAL);
    cr_assert_eq(dx_ckpt_writer_add(w, "a", DX_CKPT_I64, &x, 0), -EINVAL);
    cr_assert_eq(dx_ckpt_writer_add(w, "", DX_CKPT_F32, &x, 1), -EINVAL);
    memset(name, 'n', sizeof(name));
    name[64] = '\0';
    cr_assert_eq(dx_ckpt_writer_add(w, name, DX_CKPT_F32, &x, 1), -EINVAL);
    name[63] = '\0';
    cr_assert_eq(dx_ckpt_writer_add(w, name, DX_CKPT_F32, &x, 1), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "b", (enum dx_ckpt_dtype)7, &x, 1), -EINVAL);
    cr_assert_eq(dx_ckpt_writer_add(w, "c", DX_CKPT_F32, NULL, 1), -EINVAL);
    cr_assert_eq(dx_ckpt_writer_add(w, "c", DX_CKPT_F32, NULL, 0), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "d", DX_CKPT_I64, &x, SIZE_MAX / 4), -EINVAL);
    dx_ckpt_writer_destroy(w);
}

Test(ckpt, commit_is_atomic)
{
    char path[128], tmp[160], blocker[160];
    struct dx_ckpt_shard_info info1, info2;
    dx_ckpt_writer_t *w;
    dx_ckpt_reader_t *r;
    const void *p;
    int64_t v = 7;

    path_in(path, sizeof(path), "rank-0.ckpt");
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    /* A stale .tmp from a crashed writer is replaced and does not survive. */
    spit(tmp, "junk", 4);
    write_small(path, &info1);
    cr_assert(!exists(tmp));

    /* A second commit to the same path replaces the older file. */
    cr_assert_eq(dx_ckpt_writer_create(&w), 0);
    cr_assert_eq(dx_ckpt_writer_add(w, "step", DX_CKPT_I64, &v, 1), 0);
    cr_assert_eq(dx_ckpt_writer_commit(w, path, &info2, err, sizeof(err)), 0, "%s", err);
    cr_assert(!exists(tmp));
    cr_assert_neq(info1.bytes, info2.bytes);
    expect_refused(path, &info1, "old info against new file");
    cr_assert_eq(dx_ckpt_open(path, &info2, &r, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(dx_ckpt_get(r, "step", DX_CKPT_I64, 1, &p, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(*(const int64_t *)p, 7);
    cr_assert_eq(dx_ckpt_get(r, "params", DX_CKPT_F32, 5, &p, err, sizeof(err)), -ENOENT);
    dx_ckpt_close(r);

    /* A failed commit (PATH.tmp cannot be created) leaves the old file. */
    cr_assert_eq(mkdir(tmp, 0755), 0);
    snprintf(blocker, sizeof(blocker), "%s/x", tmp);
    spit(blocker, "x", 1);
    v = 8;
    cr_assert_lt(dx_ckpt_writer_commit(w, path, NULL, err, sizeof(err)), 0);
    cr_assert_not_null(strstr(err, tmp), "%s", err);
    cr_assert_eq(dx_ckpt_open(path, &info2, &r, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(dx_ckpt_get(r, "step", DX_CKPT_I64, 1, &p, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(*(const int64_t *)p, 7);
    dx_ckpt_close(r);

    /* Into a directory that does not exist: refused, nothing created. */
    path_in(path, sizeof(path), "nodir/rank-0.ckpt");
    cr_assert_eq(dx_ckpt_writer_commit(w, path, NULL, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, path), "%s", err);
    dx_ckpt_writer_destroy(w);
}

Test(ckpt, step_dir_and_mkdirs)
{
    char buf[256], path[300];
    struct dx_ckpt_shard_info info;
    struct stat st;

    cr_assert_eq(dx_ckpt_step_dir(buf, sizeof(buf), "/ckpt", 7, 42), 0);
    cr_assert_str_eq(buf, "/ckpt/job-7/step-00000042");
    cr_assert_eq(dx_ckpt_step_dir(buf, sizeof(buf), "/ckpt/", 7, 123456789), 0);
    cr_assert_str_eq(buf, "/ckpt/job-7/step-123456789");
    cr_assert_eq(dx_ckpt_step_dir(buf, sizeof(buf), "/", 1, 0), 0);
    cr_assert_str_eq(buf, "/job-1/step-00000000");
    cr_assert_eq(dx_ckpt_step_dir(buf, 10, "/ckpt", 7, 42), -ENAMETOOLONG);

    cr_assert_eq(dx_ckpt_step_dir(buf, sizeof(buf), dir, 3, 100), 0);
    cr_assert_eq(dx_ckpt_mkdirs(buf), 0);
    cr_assert_eq(dx_ckpt_mkdirs(buf), 0);
    cr_assert_eq(stat(buf, &st), 0);
    cr_assert(S_ISDIR(st.st_mode));
    snprintf(path, sizeof(path), "%s/rank-0.ckpt", buf);
    write_small(path, &info);
}

static void write_manifest_text(const char *text)
{
    char path[128];

    path_in(path, sizeof(path), "MANIFEST.json");
    spit(path, text, strlen(text));
}

static void expect_manifest_refused(int want, const char *needle)
{
    struct dx_ckpt_manifest m;
    int rc;

    err[0] = '\0';
    rc = dx_ckpt_manifest_read(dir, &m, err, sizeof(err));
    cr_assert_eq(rc, want, "rc %d, want %d: %s", rc, want, err);
    cr_assert_eq(m.n_shards, 0);
    cr_assert_null(m.shards);
    cr_assert_not_null(strstr(err, "MANIFEST.json"), "%s", err);
    cr_assert_not_null(strstr(err, needle), "want \"%s\" in: %s", needle, err);
}

Test(ckpt, manifest_round_trip)
{
    char path[128], tmp[160], sdir[256], shard[300];
    struct dx_ckpt_shard_info infos[2];
    struct dx_ckpt_manifest m;
    const struct dx_ckpt_shard_info *f;
    dx_ckpt_reader_t *r;

    path_in(path, sizeof(path), "rank-0.ckpt");
    write_small(path, &infos[0]);
    path_in(path, sizeof(path), "rank-1.ckpt");
    write_small(path, &infos[1]);
    cr_assert_eq(dx_ckpt_manifest_write(dir, 12, 3000, infos, 2, err, sizeof(err)), 0, "%s", err);
    path_in(tmp, sizeof(tmp), "MANIFEST.json.tmp");
    cr_assert(!exists(tmp));

    cr_assert_eq(dx_ckpt_manifest_read(dir, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(m.job_id, 12);
    cr_assert_eq(m.step, 3000);
    cr_assert_eq(m.n_shards, 2);
    for (int i = 0; i < 2; i++) {
        cr_assert_str_eq(m.shards[i].file, infos[i].file);
        cr_assert_eq(m.shards[i].bytes, infos[i].bytes);
        cr_assert_eq(m.shards[i].crc32c, infos[i].crc32c);
    }
    f = dx_ckpt_manifest_find(&m, "rank-1.ckpt");
    cr_assert_not_null(f);
    cr_assert_eq(f, &m.shards[1]);
    cr_assert_null(dx_ckpt_manifest_find(&m, "rank-2.ckpt"));
    cr_assert_eq(dx_ckpt_open(path, f, &r, err, sizeof(err)), 0, "%s", err);
    dx_ckpt_close(r);
    dx_ckpt_manifest_clear(&m);
    cr_assert_null(m.shards);

    /* Rewriting replaces it. */
    cr_assert_eq(dx_ckpt_manifest_write(dir, 12, 3001, infos, 1, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(dx_ckpt_manifest_read(dir, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(m.step, 3001);
    cr_assert_eq(m.n_shards, 1);
    dx_ckpt_manifest_clear(&m);

    /* In a step directory. */
    cr_assert_eq(dx_ckpt_step_dir(sdir, sizeof(sdir), dir, 12, 3001), 0);
    cr_assert_eq(dx_ckpt_mkdirs(sdir), 0);
    snprintf(shard, sizeof(shard), "%s/rank-0.ckpt", sdir);
    write_small(shard, &infos[0]);
    cr_assert_eq(dx_ckpt_manifest_write(sdir, 12, 3001, infos, 1, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(dx_ckpt_manifest_read(sdir, &m, err, sizeof(err)), 0, "%s", err);
    dx_ckpt_manifest_clear(&m);

    /* Refused at write: no shards, a repeated or bad name. */
    cr_assert_eq(dx_ckpt_manifest_write(dir, 1, 1, infos, 0, err, sizeof(err)), -EINVAL);
    infos[1] = infos[0];
    cr_assert_eq(dx_ckpt_manifest_write(dir, 1, 1, infos, 2, err, sizeof(err)), -EINVAL);
    snprintf(infos[1].file, sizeof(infos[1].file), "../x");
    cr_assert_eq(dx_ckpt_manifest_write(dir, 1, 1, infos, 2, err, sizeof(err)), -EINVAL);
    cr_assert_eq(dx_ckpt_manifest_write(dir, UINT64_MAX, 1, infos, 1, err, sizeof(err)), -ERANGE);
}

Test(ckpt, malformed_manifests_refused)
{
    expect_manifest_refused(-ENOENT, "No such file");
    write_manifest_text("{\"format\": 1, \"job\": 1,");
    expect_manifest_refused(-EBADMSG, "bad JSON");
    write_manifest_text("[1, 2]");
    expect_manifest_refused(-EBADMSG, "not a JSON object");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2}");
    expect_manifest_refused(-EBADMSG, "no \"shards\"");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": {}}");
    expect_manifest_refused(-EBADMSG, "\"shards\" must be an array");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": []}");
    expect_manifest_refused(-EBADMSG, "no shards");
    write_manifest_text("{\"format\": 2, \"job\": 1, \"step\": 2, \"shards\": []}");
    expect_manifest_refused(-EPROTONOSUPPORT, "unsupported manifest format 2 (this build reads 1)");
    write_manifest_text("{\"job\": 1, \"step\": 2, \"shards\": []}");
    expect_manifest_refused(-EBADMSG, "no \"format\"");
    write_manifest_text("{\"format\": \"1\", \"job\": 1, \"step\": 2, \"shards\": []}");
    expect_manifest_refused(-EBADMSG, "\"format\"");
    write_manifest_text("{\"format\": 1, \"job\": -1, \"step\": 2, \"shards\": []}");
    expect_manifest_refused(-EBADMSG, "\"job\"");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"shards\": []}");
    expect_manifest_refused(-EBADMSG, "no \"step\"");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": "
                        "[{\"file\": \"a\", \"bytes\": \"24\", \"crc32c\": 1}]}");
    expect_manifest_refused(-EBADMSG, "\"bytes\" in shard 0");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": "
                        "[{\"file\": \"a\", \"bytes\": 24, \"crc32c\": 4294967296}]}");
    expect_manifest_refused(-EBADMSG, "\"crc32c\" in shard 0");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": "
                        "[{\"bytes\": 24, \"crc32c\": 1}]}");
    expect_manifest_refused(-EBADMSG, "\"file\"");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": "
                        "[{\"file\": \"../a\", \"bytes\": 24, \"crc32c\": 1}]}");
    expect_manifest_refused(-EBADMSG, "bad file name");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": "
                        "[{\"file\": \"a\", \"bytes\": 24, \"crc32c\": 1},"
                        " {\"file\": \"a\", \"bytes\": 24, \"crc32c\": 1}]}");
    expect_manifest_refused(-EBADMSG, "twice");
    write_manifest_text("{\"format\": 1, \"job\": 1, \"step\": 2, \"shards\": [7]}");
    expect_manifest_refused(-EBADMSG, "not an object");
}
