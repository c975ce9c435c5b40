/* train.h - the single-process reference trainer (duplex-worker
 * --standalone): the whole model on one process, no parallelism. Each step
 * runs `microbatches` micro-batches of `microbatch_size` sequences (what DP
 * rank 0 of 1 reads, data.h), averages their gradients, takes an AdamW step
 * and updates the routing biases, then prints one line. */
#ifndef WK_TRAIN_H
#define WK_TRAIN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "worker/model/model.h"

struct wk_train_config {
    struct wk_model_config model;
    uint64_t seed;
    int steps;
    float lr;
    int microbatches, microbatch_size;
    const char *data_dir; /* WK_DATA_DIR_DEFAULT when NULL */
    int json;             /* {"step": s, "loss": x} lines instead of readable ones */
    FILE *out;            /* stdout when NULL */
    const char *save;     /* the trained model's shard (common/ckpt.h) here, or NULL */
};

/* The reference run of a job spec: its model, seed, steps and lr, and its
 * whole global batch (dp x microbatches micro-batches) on one process. */
struct job_spec;
void wk_train_config_from_spec(const struct job_spec *spec, struct wk_train_config *cfg);

/* Trains cfg->steps steps (numbered from 1). 0, or -errno with the reason in
 * err. */
int wk_train_standalone(const struct wk_train_config *cfg, char *err, size_t errlen);

/* Writes nbytes of text continuing `prompt` from the whole model assembled
 * from every shard of checkpoint step directory `dir` (cfg gives the
 * model's shape): each byte drawn from the softmax at `temperature` (0:
 * the most likely byte) with a generator seeded by `seed`, the context the
 * last model.seq_len bytes. 0, or -errno with the reason in err. */
int wk_train_generate(const struct wk_train_config *cfg, const char *dir, const char *prompt,
                      int nbytes, float temperature, uint64_t seed, FILE *out, char *err,
                      size_t errlen);

#endif
