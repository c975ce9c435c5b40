/* data.h - the training text: every regular file directly under a directory
 * (symbolic links are skipped), sorted by name and concatenated (each file
 * memory-mapped, read through wk_data_read); each byte is a token. The first WK_DATA_TRAIN_PERCENT
 * % of the bytes are the training split, the rest the validation split.
 *
 * Micro-batches are drawn so that any layout of data-parallel ranks sees the
 * same global batch. Step s holds G = dp x microbatches x batch sequences;
 * sequence b of micro-batch k on DP rank r is global sequence
 *     i = (r * microbatches + k) * batch + b
 * and is the window of seq + 1 bytes of the split starting at
 *     off(s, i) = mix(mix(mix(seed ^ WK_DATA_SALT) ^ s) ^ i) mod (len - seq)
 * where len is the split's length and mix(x) is one splitmix64 output from
 * state x (wk_rng_next of {x}, rng.h). So off depends on (seed, s, i) only:
 * dp 1 with 8 micro-batches and dp 2 with 4 each read the same 8 windows. */
#ifndef WK_DATA_H
#define WK_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "job/jobspec.h" /* JOB_SPEC_DATASETS, the names wk_data_dataset_dir maps */

#define WK_DATA_DIR_DEFAULT "/usr/share/common-licenses"

#define WK_DATA_TRAIN_PERCENT 90
#define WK_DATA_SALT 0x5eed7e47ULL

enum wk_data_split {
    WK_DATA_TRAIN,
    WK_DATA_VALID,
};

/* One file of the text, mapped read-only: bytes [start, start + len) of
 * the concatenation. */
struct wk_data_seg {
    const uint8_t *bytes;
    size_t len, start;
};

struct wk_data {
    struct wk_data_seg *seg; /* the files, in name order (empty ones left out) */
    int nseg, files;
    size_t len;       /* of the concatenation */
    size_t train_len; /* bytes [0, train_len) train, [train_len, len) validate */
};

/* The directory holding dataset name's text, or NULL for a name that is
 * not in JOB_SPEC_DATASETS. */
const char *wk_data_dataset_dir(const char *name);

/* Reads the directory. 0, or -errno with the reason in err (a missing or
 * unreadable directory, no regular file, or too little text to split). */
int wk_data_open(struct wk_data *d, const char *dir, char *err, size_t errlen);
void wk_data_close(struct wk_data *d);

/* The split's length, and a copy of its bytes [off, off + n) into out
 * (across file boundaries; -EINVAL past the split's end). */
size_t wk_data_split_len(const struct wk_data *d, enum wk_data_split split);
int wk_data_read(const struct wk_data *d, enum wk_data_split split, size_t off, size_t n,
                 uint8_t *out);

/* The start of global sequence i of step s (the formula above), or -EINVAL
 * when the split is not longer than seq. */
int64_t wk_data_offset(const struct wk_data *d, enum wk_data_split split, uint64_t seed,
                       int64_t step, int64_t i, int seq);

/* tokens[batch][seq + 1] for micro-batch k of step s on DP rank r (each
 * rank running `microbatches` micro-batches). 0 or -EINVAL. */
int wk_data_batch(const struct wk_data *d, enum wk_data_split split, uint64_t seed, int64_t step,
                  int rank, int microbatches, int k, int batch, int seq, int32_t *tokens);

#endif
