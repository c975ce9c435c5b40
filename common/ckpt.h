/* ckpt.h - checkpoint shards (each training rank writes one per checkpoint)
 * and the manifest that lists them (duplexd writes it once every shard is
 * in).
 *
 * Each training rank writes one shard file per checkpoint holding named,
 * typed sections (parameters, optimizer state, data position, RNG state...).
 * A shard is written to PATH.tmp, fsynced, renamed to PATH and the directory
 * fsynced, so PATH is always either the old file or the whole new one.
 *
 * Shard layout (all integers little-endian; the file size is a multiple of 8):
 *
 *   offset  size  field
 *   0       8     magic "DXCKPT\0\0"
 *   8       4     u32 format version (DX_CKPT_VERSION = 1)
 *   12      4     u32 section count n
 *   16      88*n  section table, per section:
 *                   64  name, NUL-terminated and NUL-padded (1..63 bytes)
 *                   4   u32 dtype (enum dx_ckpt_dtype)
 *                   4   u32 reserved, 0
 *                   8   u64 element count
 *                   8   u64 payload offset from the file start, 8-byte aligned
 *   ...           payloads, in table order, each zero-padded to 8 bytes
 *                 (f32 as IEEE-754 binary32, i64 two's complement)
 *   size-8  4     u32 CRC-32C (Castagnoli) of every byte before it
 *   size-4  4     end magic "DXCE"
 *
 * A reader accepts a payload only inside [end of table, size - 8), 8-byte
 * aligned, not overlapping another one, and refuses anything else.
 *
 * The manifest, DIR/MANIFEST.json (written the same atomic way), lists a
 * checkpoint's shards:
 *   {"format": 1, "job": J, "step": S,
 *    "shards": [{"file": "rank-0.ckpt", "bytes": B, "crc32c": C}, ...]}
 * where file is a basename in DIR, bytes the shard's size and crc32c the
 * value stored in its trailer.
 *
 * Functions return 0 or -errno; where they take err, the reason (naming the
 * file) is written there. Content errors are -EBADMSG (torn, corrupt, or not
 * what the manifest says), an unknown format version -EPROTONOSUPPORT. */
#ifndef DX_CKPT_H
#define DX_CKPT_H

#include <stddef.h>
#include <stdint.h>

#define DX_CKPT_VERSION 1
#define DX_CKPT_MANIFEST_FORMAT 1
#define DX_CKPT_MANIFEST "MANIFEST.json"
#define DX_CKPT_NAME_MAX 63 /* bytes in a section name, without the NUL */
#define DX_CKPT_FILE_MAX 256

enum dx_ckpt_dtype {
    DX_CKPT_F32 = 1,
    DX_CKPT_I64 = 2,
    DX_CKPT_BYTES = 3,
};

/* One shard as the manifest records it. */
struct dx_ckpt_shard_info {
    char file[DX_CKPT_FILE_MAX]; /* basename */
    uint64_t bytes;
    uint32_t crc32c;
};

struct dx_ckpt_manifest {
    uint64_t job_id;
    uint64_t step;
    struct dx_ckpt_shard_info *shards;
    size_t n_shards;
};

typedef struct dx_ckpt_writer dx_ckpt_writer_t;
typedef struct dx_ckpt_reader dx_ckpt_reader_t;

/* CRC-32C of len bytes, continuing from crc (0 to start): so
 * dx_ckpt_crc32c(dx_ckpt_crc32c(0, a, n), b, m) is the CRC of a then b. */
uint32_t dx_ckpt_crc32c(uint32_t crc, const void *data, size_t len);

/* --- writing a shard --- */

/* The shard file name of a rank, "rank-dD-pP-eE.ckpt": workers write it,
 * duplexd checks reports against it. */
void dx_ckpt_shard_name(int dp, int pp, int ep, char *buf, size_t len);

int dx_ckpt_writer_create(dx_ckpt_writer_t **out);

/* Adds a section of count elements of type t. data is referenced, not
 * copied: it must stay valid until the last commit (it may be NULL when count
 * is 0). -EINVAL for an empty, too long (> DX_CKPT_NAME_MAX) or repeated
 * name, an unknown type, or NULL data with count > 0. */
int dx_ckpt_writer_add(dx_ckpt_writer_t *w, const char *name, enum dx_ckpt_dtype t,
                       const void *data, size_t count);

/* Writes the sections to path (atomically, see above) and fills info (may be
 * NULL) for the manifest. On failure path is untouched and no PATH.tmp is
 * left. The writer can commit again. */
int dx_ckpt_writer_commit(dx_ckpt_writer_t *w, const char *path, struct dx_ckpt_shard_info *info,
                          char *err, size_t errlen);

void dx_ckpt_writer_destroy(dx_ckpt_writer_t *w);

/* --- reading a shard --- */

/* Reads and verifies the whole shard: magic, version, trailer, CRC, section
 * table; when expect is given, its bytes and crc32c must match the file. */
int dx_ckpt_open(const char *path, const struct dx_ckpt_shard_info *expect, dx_ckpt_reader_t **out,
                 char *err, size_t errlen);

/* The same for a shard already in memory (data is copied), named `name` in
 * messages: for tests and the fuzzer. */
int dx_ckpt_open_buf(const char *name, const void *data, size_t size,
                     const struct dx_ckpt_shard_info *expect, dx_ckpt_reader_t **out, char *err,
                     size_t errlen);

/* The payload of section name, which must hold exactly count elements of
 * type t (8-byte aligned, valid until dx_ckpt_close). -ENOENT when there is
 * no such section, -EINVAL on a type or count mismatch. */
int dx_ckpt_get(const dx_ckpt_reader_t *r, const char *name, enum dx_ckpt_dtype t, size_t count,
                const void **data, char *err, size_t errlen);

void dx_ckpt_close(dx_ckpt_reader_t *r);

/* --- the manifest --- */

/* Writes dir/MANIFEST.json listing n (>= 1) shards with distinct, valid
 * basenames (else -EINVAL). -ERANGE when job_id, step or a size exceed
 * INT64_MAX (JSON integers). */
int dx_ckpt_manifest_write(const char *dir, uint64_t job_id, uint64_t step,
                           const struct dx_ckpt_shard_info *shards, size_t n, char *err,
                           size_t errlen);

/* Reads and checks dir/MANIFEST.json into out (free with
 * dx_ckpt_manifest_clear). -ENOENT when missing, -EBADMSG when malformed,
 * -EPROTONOSUPPORT for an unknown format. Unknown keys are ignored. */
int dx_ckpt_manifest_read(const char *dir, struct dx_ckpt_manifest *out, char *err, size_t errlen);

/* dx_ckpt_manifest_read on JSON text in memory, named `name` in messages. */
int dx_ckpt_manifest_parse(const char *name, const char *json, size_t len,
                           struct dx_ckpt_manifest *out, char *err, size_t errlen);
void dx_ckpt_manifest_clear(struct dx_ckpt_manifest *m);

/* The shard named file, or NULL. */
const struct dx_ckpt_shard_info *dx_ckpt_manifest_find(const struct dx_ckpt_manifest *m,
                                                       const char *file);

/* --- directories --- */

/* "ROOT/job-<id>/step-<step, 8 digits at least>" into buf. -ENAMETOOLONG
 * when it does not fit, -EINVAL for an empty root. */
int dx_ckpt_step_dir(char *buf, size_t len, const char *root, uint64_t job_id, uint64_t step);

/* mkdir -p path (mode 0755). */
int dx_ckpt_mkdirs(const char *path);

#endif
