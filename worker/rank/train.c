/* train.c - the standalone trainer: data, model, the step loop and its
 * per-step report. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/ckpt.h"
#include "common/log.h"
#include "job/jobspec.h"
#include "worker/rank/data.h"
#include "worker/model/rng.h"
#include "worker/rank/train.h"

#define TRAIN_BYTE_VOCAB 256 /* tokens are bytes */

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One step: mean loss of the micro-batches into *loss. */
static int train_step(struct wk_model *m, struct wk_model_cache *c, const struct wk_data *data,
                      const struct wk_train_config *cfg, int64_t step, int32_t *tokens,
                      double *loss)
{
    int M = cfg->microbatches, B = cfg->microbatch_size, T = cfg->model.seq_len, rc;
    double sum = 0.0;

    wk_model_zero_grad(m);
    for (int k = 0; k < M; k++) {
        float l;

        rc = wk_data_batch(data, WK_DATA_TRAIN, cfg->seed, step, 0, M, k, B, T, tokens);
        if (rc < 0)
            return rc;
        if ((rc = wk_model_forward(m, c, tokens, NULL, NULL, &l)) < 0)
            return rc;
        if ((rc = wk_model_backward(m, c, NULL, NULL)) < 0)
            return rc;
        sum += (double)l;
    }
    /* each micro-batch's gradient is of its own mean loss */
    wk_model_scale_grad(m, 1.0f / (float)M);
    if ((rc = wk_model_step(m)) < 0)
        return rc;
    *loss = sum / M;
    return 0;
}

void wk_train_config_from_spec(const struct job_spec *spec, struct wk_train_config *cfg)
{
    *cfg = (struct wk_train_config){
        .model = {spec->model.vocab, spec->model.d_model, spec->model.layers, spec->model.heads,
                  spec->model.experts, spec->model.top_k, spec->model.expert_hidden,
                  spec->model.shared_experts, spec->model.seq_len, spec->model.expert_groups,
                  spec->model.group_limit, strcmp(spec->train.dispatch, "fp8") == 0},
        .seed = (uint64_t)spec->train.seed,
        .steps = spec->train.steps,
        .lr = (float)spec->train.lr,
        .microbatches = spec->parallel.microbatches * spec->parallel.dp,
        .microbatch_size = spec->parallel.microbatch_size,
    };
}

static int save_model(struct wk_model *m, const char *path, char *err, size_t errlen)
{
    struct dx_ckpt_shard_info info;
    dx_ckpt_writer_t *w = NULL;
    int rc = dx_ckpt_writer_create(&w);

    if (rc == 0 && (rc = wk_model_ckpt_add(m, w)) < 0)
        dx_errf(err, errlen, rc, "cannot lay out %s: %s", path, strerror(-rc));
    else if (rc == 0)
        rc = dx_ckpt_writer_commit(w, path, &info, err, errlen);
    else
        dx_errf(err, errlen, rc, "out of memory");
    dx_ckpt_writer_destroy(w);
    return rc;
}

int wk_train_standalone(const struct wk_train_config *cfg, char *err, size_t errlen)
{
    const char *dir = cfg->data_dir ? cfg->data_dir : WK_DATA_DIR_DEFAULT;
    FILE *out = cfg->out ? cfg->out : stdout;
    struct wk_data data;
    struct wk_model m;
    struct wk_model_cache c;
    struct wk_adamw_config oc;
    int32_t *tokens = NULL;
    int B = cfg->microbatch_size, T = cfg->model.seq_len, rc;
    char why[256];

    if (cfg->model.vocab < TRAIN_BYTE_VOCAB)
        return dx_errf(err, errlen, -EINVAL, "model.vocab: %d is too small for byte tokens (%d)",
                       cfg->model.vocab, TRAIN_BYTE_VOCAB);
    if (cfg->steps < 0 || cfg->microbatches < 1 || B < 1 || !isfinite(cfg->lr) || cfg->lr < 0)
        return dx_errf(err, errlen, -EINVAL,
                       "steps, micro-batches, micro-batch size or lr invalid");
    if (wk_model_config_check(&cfg->model, why, sizeof(why)) < 0)
        return dx_errf(err, errlen, -EINVAL, "model: %s", why);
    if ((rc = wk_data_open(&data, dir, err, errlen)) < 0)
        return rc;
    if ((rc = wk_model_init(&m, &cfg->model, cfg->seed)) < 0) {
        wk_data_close(&data);
        return dx_errf(err, errlen, rc, "model: %s", strerror(-rc));
    }
    wk_adamw_config_defaults(&oc);
    oc.lr = cfg->lr;
    if ((rc = wk_model_optim_init(&m, &oc)) < 0 || (rc = wk_model_cache_init(&c, &m, B, T)) < 0) {
        wk_model_free(&m);
        wk_data_close(&data);
        return dx_errf(err, errlen, rc, "model: %s", strerror(-rc));
    }
    tokens = calloc((size_t)B * (size_t)(T + 1), sizeof(*tokens));
    if (!tokens)
        rc = dx_errf(err, errlen, -ENOMEM, "out of memory");
    for (int64_t s = 1; rc == 0 && s <= cfg->steps; s++) {
        double t0 = now_s(), loss = 0.0;

        if ((rc = train_step(&m, &c, &data, cfg, s, tokens, &loss)) < 0) {
            rc = dx_errf(err, errlen, rc, "step %" PRId64 ": %s", s, strerror(-rc));
            break;
        }
        double dt = now_s() - t0;
        double tok = (double)cfg->microbatches * B * T;
        if (cfg->json)
            fprintf(out, "{\"step\": %" PRId64 ", \"loss\": %.17g}\n", s, loss);
        else
            fprintf(out, "step %" PRId64 "/%d  loss %.6f  %.0f tokens/s  (%.3f s)\n", s, cfg->steps,
                    loss, dt > 0 ? tok / dt : 0.0, dt);
        fflush(out);
        if (!isfinite(loss))
            rc = dx_errf(err, errlen, -ERANGE, "step %" PRId64 ": loss is not finite", s);
    }
    if (rc == 0 && cfg->save)
        rc = save_model(&m, cfg->save, err, errlen);
    free(tokens);
    wk_model_cache_free(&c, &m);
    wk_model_free(&m);
    wk_data_close(&data);
    return rc;
}

/* --- text from a checkpoint ------------------------------------------------ */

/* Opens every shard the manifest of dir lists. */
static int open_shards(const char *dir, dx_ckpt_reader_t ***out, int *n, char *err, size_t errlen)
{
    struct dx_ckpt_manifest man = {0};
    dx_ckpt_reader_t **r = NULL;
    char path[4096];
    int rc;

    if ((rc = dx_ckpt_manifest_read(dir, &man, err, errlen)) < 0)
        return rc;
    r = calloc(man.n_shards + 1, sizeof(*r));
    if (!r) {
        rc = dx_errf(err, errlen, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < man.n_shards; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, man.shards[i].file);
        if ((rc = dx_ckpt_open(path, &man.shards[i], &r[i], err, errlen)) < 0)
            goto out;
    }
    *out = r;
    *n = (int)man.n_shards;
    r = NULL;
out:
    for (size_t i = 0; r && i < man.n_shards; i++)
        dx_ckpt_close(r[i]);
    free(r);
    dx_ckpt_manifest_clear(&man);
    return rc;
}

/* A byte from probabilities p[vocab] at temperature t (0: argmax). */
static int draw_byte(const float *p, int vocab, float t, struct wk_rng *rng)
{
    double w[TRAIN_BYTE_VOCAB], sum = 0.0, u;
    int best = 0;

    for (int v = 0; v < TRAIN_BYTE_VOCAB && v < vocab; v++)
        best = p[v] > p[best] ? v : best;
    if (t <= 0.0f)
        return best;
    for (int v = 0; v < TRAIN_BYTE_VOCAB && v < vocab; v++) {
        w[v] = p[v] > 0.0f ? pow((double)p[v], 1.0 / t) : 0.0;
        sum += w[v];
    }
    u = wk_rng_uniform(rng) * sum;
    for (int v = 0; v < TRAIN_BYTE_VOCAB && v < vocab; v++) {
        if (u < w[v])
            return v;
        u -= w[v];
    }
    return best;
}

int wk_train_generate(const struct wk_train_config *cfg, const char *dir, const char *prompt,
                      int nbytes, float temperature, uint64_t seed, FILE *out, char *err,
                      size_t errlen)
{
    int T = cfg->model.seq_len, len = (int)strlen(prompt), rc, nshards = 0;
    dx_ckpt_reader_t **shards = NULL;
    struct wk_rng rng = {seed};
    struct wk_adamw_config oc;
    struct wk_model m;
    unsigned char *text;
    int32_t *tokens;
    char why[256];

    if (err && errlen)
        err[0] = '\0';
    if (len < 1 || nbytes < 0)
        return dx_errf(err, errlen, -EINVAL, "generating needs a prompt of at least one byte");
    if (wk_model_config_check(&cfg->model, why, sizeof(why)) < 0)
        return dx_errf(err, errlen, -EINVAL, "model: %s", why);
    if ((rc = wk_model_init(&m, &cfg->model, cfg->seed)) < 0)
        return dx_errf(err, errlen, rc, "model: %s", strerror(-rc));
    text = malloc((size_t)len + (size_t)nbytes + 1);
    tokens = calloc((size_t)T + 1, sizeof(*tokens));
    if (!text || !tokens) {
        rc = dx_errf(err, errlen, -ENOMEM, "out of memory");
        goto out;
    }
    memcpy(text, prompt, (size_t)len);
    wk_adamw_config_defaults(&oc); /* the optimizer state loads too; unused here */
    if ((rc = wk_model_optim_init(&m, &oc)) < 0)
        dx_errf(err, errlen, rc, "model: %s", strerror(-rc));
    if (rc == 0)
        rc = open_shards(dir, &shards, &nshards, err, errlen);
    if (rc == 0)
        rc = wk_model_ckpt_load(&m, (const dx_ckpt_reader_t *const *)shards, nshards, err, errlen);
    for (int k = 0; rc == 0 && k < nbytes; k++) {
        int n = len < T ? len : T;
        struct wk_model_cache c;
        float loss;

        for (int i = 0; i < n; i++)
            tokens[i] = text[len - n + i];
        tokens[n] = 0; /* the target of the last position: unused */
        if ((rc = wk_model_cache_init(&c, &m, 1, n)) < 0)
            break;
        rc = wk_model_forward(&m, &c, tokens, NULL, NULL, &loss);
        if (rc == 0)
            text[len++] = (unsigned char)draw_byte(c.head.probs.data +
                                                       (size_t)(n - 1) * (size_t)cfg->model.vocab,
                                                   cfg->model.vocab, temperature, &rng);
        wk_model_cache_free(&c, &m);
    }
    if (rc == 0) {
        /* for a terminal: bytes that are not printable ASCII show as '.' */
        for (int i = 0; i < len; i++)
            fputc(text[i] == '\n' || (text[i] >= 0x20 && text[i] < 0x7f) ? text[i] : '.', out);
        fputc('\n', out);
    } else if (err && errlen && !err[0]) {
        dx_errf(err, errlen, rc, "generating failed: %s", strerror(-rc));
    }
out:
    for (int i = 0; shards && i < nshards; i++)
        dx_ckpt_close(shards[i]);
    free(shards);
    free(text);
    free(tokens);
    wk_model_free(&m);
    return rc;
}
