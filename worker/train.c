/* train.c - the standalone trainer: data, model, the step loop and its
 * per-step report. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coordinator/jobspec.h"
#include "worker/data.h"
#include "worker/train.h"

#define TRAIN_BYTE_VOCAB 256 /* tokens are bytes */

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

void wk_train_config_from_spec(const struct coord_jobspec *spec, struct wk_train_config *cfg)
{
    *cfg = (struct wk_train_config){
        .model = {spec->model.vocab, spec->model.d_model, spec->model.layers, spec->model.heads,
                  spec->model.experts, spec->model.top_k, spec->model.expert_hidden,
                  spec->model.shared_experts, spec->model.seq_len, spec->model.expert_groups,
                  spec->model.group_limit},
        .seed = (uint64_t)spec->train.seed,
        .steps = spec->train.steps,
        .lr = (float)spec->train.lr,
        .microbatches = spec->parallel.microbatches * spec->parallel.dp,
        .microbatch_size = spec->parallel.microbatch_size,
    };
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
        return fail(err, errlen, -EINVAL, "model.vocab: %d is too small for byte tokens (%d)",
                    cfg->model.vocab, TRAIN_BYTE_VOCAB);
    if (cfg->steps < 0 || cfg->microbatches < 1 || B < 1 || !isfinite(cfg->lr) || cfg->lr < 0)
        return fail(err, errlen, -EINVAL, "steps, micro-batches, micro-batch size or lr invalid");
    if (wk_model_config_check(&cfg->model, why, sizeof(why)) < 0)
        return fail(err, errlen, -EINVAL, "model: %s", why);
    if ((rc = wk_data_open(&data, dir, err, errlen)) < 0)
        return rc;
    if ((rc = wk_model_init(&m, &cfg->model, cfg->seed)) < 0) {
        wk_data_close(&data);
        return fail(err, errlen, rc, "model: %s", strerror(-rc));
    }
    wk_adamw_config_defaults(&oc);
    oc.lr = cfg->lr;
    if ((rc = wk_model_optim_init(&m, &oc)) < 0 || (rc = wk_model_cache_init(&c, &m, B, T)) < 0) {
        wk_model_free(&m);
        wk_data_close(&data);
        return fail(err, errlen, rc, "model: %s", strerror(-rc));
    }
    tokens = calloc((size_t)B * (size_t)(T + 1), sizeof(*tokens));
    if (!tokens)
        rc = fail(err, errlen, -ENOMEM, "out of memory");
    for (int64_t s = 1; rc == 0 && s <= cfg->steps; s++) {
        double t0 = now_s(), loss = 0.0;

        if ((rc = train_step(&m, &c, &data, cfg, s, tokens, &loss)) < 0) {
            rc = fail(err, errlen, rc, "step %" PRId64 ": %s", s, strerror(-rc));
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
            rc = fail(err, errlen, -ERANGE, "step %" PRId64 ": loss is not finite", s);
    }
    free(tokens);
    wk_model_cache_free(&c, &m);
    wk_model_free(&m);
    wk_data_close(&data);
    return rc;
}
