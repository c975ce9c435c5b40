/* test_model.c - the whole MoE transformer (worker/model/model) and its
 * training text (worker/data): central differences against backward for
 * random coordinates of every tensor kind, deterministic initialisation,
 * two stages chained equal to the whole model bitwise, a short training run
 * that lowers the loss, and the data split, offsets and errors. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "worker/rank/data.h"
#include "worker/model/model.h"
#include "worker/model/rng.h"

void openblas_set_num_threads(int);

enum {
    B = 2,
    T = 4,
    VOCAB = 16, /* the FD model's vocabulary (tokens below it) */
    COORDS = 4, /* random coordinates checked per tensor */
    TRIES = 40, /* coordinates tried per tensor (some flip the routing) */
};

#define SEED 1234
#define FD_EPS 2e-3f
#define FD_ATOL 5e-4
#define FD_RTOL 3e-2
#define TEST_STD 0.3f /* weights for the FD check: larger than WK_INIT_STD */
#define MIN_GRAD 1e-3 /* each kind must see a gradient at least this large */
#define TRAIN_STEPS 30
#define TRAIN_LR 1e-2f
#define TRAIN_MARGIN 1.0 /* nats the loss must fall over the run */

static void setup(void)
{
    openblas_set_num_threads(1);
}

static struct wk_model_config tiny_cfg(int vocab)
{
    return (struct wk_model_config){.vocab = vocab,
                                    .d_model = 8,
                                    .layers = 2,
                                    .heads = 2,
                                    .experts = 4,
                                    .top_k = 2,
                                    .expert_hidden = 6,
                                    .shared_experts = 1,
                                    .seq_len = T,
                                    .expert_groups = 2,
                                    .group_limit = 2};
}

static void fill_tokens(int32_t *tok, int n, int vocab, uint64_t stream)
{
    struct wk_rng r = wk_rng_stream(SEED + 5, stream);

    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)(wk_rng_next(&r) % (uint64_t)vocab);
}

/* ---- gradients --------------------------------------------------------- */

struct fd {
    struct wk_model m;
    struct wk_model_cache c;
    int32_t tokens[B * (T + 1)];
    int *choice[2]; /* routing of the unperturbed forward, per layer */
};

static double fd_loss(struct fd *f)
{
    float loss = 0.0f;

    cr_assert_eq(wk_model_forward(&f->m, &f->c, f->tokens, NULL, NULL, &loss), 0);
    return loss;
}

static int same_routing(const struct fd *f)
{
    for (int l = 0; l < 2; l++)
        if (memcmp(f->choice[l], f->c.moe[l].choice, sizeof(int) * f->c.rows * 2) != 0)
            return 0;
    return 1;
}

Test(model, finite_differences_every_kind, .init = setup)
{
    static struct fd f;
    struct wk_model_config cfg = tiny_cfg(VOCAB);
    struct wk_rng pick = wk_rng_stream(SEED, 99);
    double max_grad[WK_MODEL_KINDS] = {0};
    int checked[WK_MODEL_KINDS] = {0};

    cr_assert_eq(wk_model_init(&f.m, &cfg, SEED), 0);
    cr_assert_eq(wk_model_cache_init(&f.c, &f.m, B, T), 0);
    /* larger weights than the init, and gains away from 1 */
    for (int i = 0; i < wk_model_param_count(&f.m); i++) {
        const struct wk_model_param *p = wk_model_param(&f.m, i);
        struct wk_rng r = wk_rng_stream(SEED + 1, (uint64_t)i);

        for (size_t j = 0; j < p->n; j++)
            p->w[j] = p->kind == WK_MODEL_NORM ? 1.0f + 0.2f * wk_rng_normal(&r)
                                               : TEST_STD * wk_rng_normal(&r);
    }
    fill_tokens(f.tokens, B * (T + 1), VOCAB, 1);

    wk_model_zero_grad(&f.m);
    fd_loss(&f);
    cr_assert_eq(wk_model_backward(&f.m, &f.c, NULL, NULL), 0);
    for (int l = 0; l < 2; l++) {
        f.choice[l] = malloc(sizeof(int) * f.c.rows * 2);
        memcpy(f.choice[l], f.c.moe[l].choice, sizeof(int) * f.c.rows * 2);
    }

    for (int i = 0; i < wk_model_param_count(&f.m); i++) {
        const struct wk_model_param *p = wk_model_param(&f.m, i);
        int ok = 0;

        for (int t = 0; t < TRIES && ok < COORDS; t++) {
            size_t j = (size_t)(wk_rng_next(&pick) % p->n);

            if (p->kind == WK_MODEL_EMBED) /* a row the batch uses */
                j = (size_t)f.tokens[wk_rng_next(&pick) % (B * T)] * (size_t)cfg.d_model +
                    j % (size_t)cfg.d_model;
            const float save = p->w[j];
            p->w[j] = save + FD_EPS;
            const double lp = fd_loss(&f);
            const int same_p = same_routing(&f);
            p->w[j] = save - FD_EPS;
            const double lm = fd_loss(&f);
            const int same_m = same_routing(&f);
            p->w[j] = save;
            if (!same_p || !same_m)
                continue; /* the choice itself has no gradient */
            const double num = (lp - lm) / (2.0 * FD_EPS), ana = p->g[j];
            cr_assert_leq(fabs(num - ana), FD_ATOL + FD_RTOL * fabs(ana),
                          "%s[%zu]: numeric %g, analytic %g", p->name, j, num, ana);
            max_grad[p->kind] = fmax(max_grad[p->kind], fabs(ana));
            ok++;
        }
        cr_assert_eq(ok, COORDS, "%s: only %d coordinates kept the routing", p->name, ok);
        checked[p->kind]++;
    }
    for (int k = 0; k < WK_MODEL_KINDS; k++) {
        cr_assert_gt(checked[k], 0, "kind %d has no tensor", k);
        cr_assert_gt(max_grad[k], MIN_GRAD, "kind %d: gradients all ~0", k);
    }
    free(f.choice[0]);
    free(f.choice[1]);
    wk_model_cache_free(&f.c, &f.m);
    wk_model_free(&f.m);
}

/* ---- initialisation and stages ----------------------------------------- */

static float loss_of(struct wk_model *m, const int32_t *tokens)
{
    struct wk_model_cache c;
    float loss = 0.0f;

    cr_assert_eq(wk_model_cache_init(&c, m, B, T), 0);
    cr_assert_eq(wk_model_forward(m, &c, tokens, NULL, NULL, &loss), 0);
    wk_model_cache_free(&c, m);
    return loss;
}

static int same_params(const struct wk_model *a, const struct wk_model *b)
{
    if (wk_model_param_count(a) != wk_model_param_count(b))
        return 0;
    for (int i = 0; i < wk_model_param_count(a); i++) {
        const struct wk_model_param *p = wk_model_param(a, i), *q = wk_model_param(b, i);

        if (p->n != q->n || memcmp(p->w, q->w, p->n * sizeof(float)) != 0)
            return 0;
    }
    return 1;
}

Test(model, deterministic_init, .init = setup)
{
    struct wk_model_config cfg = tiny_cfg(256);
    struct wk_model a, b, c;
    int32_t tokens[B * (T + 1)];

    fill_tokens(tokens, B * (T + 1), 256, 2);
    cr_assert_eq(wk_model_init(&a, &cfg, 7), 0);
    cr_assert_eq(wk_model_init(&b, &cfg, 7), 0);
    cr_assert_eq(wk_model_init(&c, &cfg, 8), 0);
    cr_assert(same_params(&a, &b));
    float la = loss_of(&a, tokens), lb = loss_of(&b, tokens), lc = loss_of(&c, tokens);
    cr_assert_eq(memcmp(&la, &lb, sizeof(la)), 0);
    cr_assert(isfinite(la) && fabs(la - log(256.0)) < 0.1, "initial loss %g", la);
    cr_assert_not(same_params(&a, &c));
    cr_assert_neq(la, lc);
    /* no two weight tensors of one model start alike (distinct streams) */
    for (int i = 0; i < wk_model_param_count(&a); i++)
        for (int j = i + 1; j < wk_model_param_count(&a); j++) {
            const struct wk_model_param *p = wk_model_param(&a, i), *q = wk_model_param(&a, j);
            if (p->kind != WK_MODEL_NORM && q->kind != WK_MODEL_NORM)
                cr_assert_neq(p->w[1], q->w[1], "%s and %s", p->name, q->name);
        }
    cr_assert_eq(wk_model_param_count(&a), 1 + 2 * (6 + 7) + 2);
    wk_model_free(&a);
    wk_model_free(&b);
    wk_model_free(&c);
}

/* Stage [0, 1) with the embedding, then [1, 2) with the head: the same
 * parameters, loss and gradients as the whole model, bitwise. */
Test(model, two_stages_equal_whole, .init = setup)
{
    struct wk_model_config cfg = tiny_cfg(256);
    struct wk_model w, s0, s1;
    struct wk_model_cache cw, c0, c1;
    int32_t tokens[B * (T + 1)];
    float x[B * T * 8], dx[B * T * 8], lw = 0.0f, ls = 0.0f;

    fill_tokens(tokens, B * (T + 1), 256, 3);
    cr_assert_eq(wk_model_init(&w, &cfg, SEED), 0);
    cr_assert_eq(wk_model_stage_init(&s0, &cfg, SEED, 0, 1, WK_MODEL_HAS_EMBED), 0);
    cr_assert_eq(wk_model_stage_init(&s1, &cfg, SEED, 1, 2, WK_MODEL_HAS_HEAD), 0);
    cr_assert_eq(wk_model_param_count(&s0) + wk_model_param_count(&s1), wk_model_param_count(&w));
    cr_assert_eq(wk_model_cache_init(&cw, &w, B, T), 0);
    cr_assert_eq(wk_model_cache_init(&c0, &s0, B, T), 0);
    cr_assert_eq(wk_model_cache_init(&c1, &s1, B, T), 0);

    cr_assert_eq(wk_model_forward(&w, &cw, tokens, NULL, NULL, &lw), 0);
    cr_assert_eq(wk_model_backward(&w, &cw, NULL, NULL), 0);
    cr_assert_eq(wk_model_forward(&s0, &c0, tokens, NULL, x, NULL), 0);
    cr_assert_eq(wk_model_forward(&s1, &c1, tokens, x, NULL, &ls), 0);
    cr_assert_eq(wk_model_backward(&s1, &c1, NULL, dx), 0);
    cr_assert_eq(wk_model_backward(&s0, &c0, dx, NULL), 0);
    cr_assert_eq(memcmp(&lw, &ls, sizeof(lw)), 0);
    cr_assert_eq(wk_model_forward(&s0, &c0, NULL, NULL, x, NULL), -EINVAL);

    int n0 = wk_model_param_count(&s0);
    for (int i = 0; i < wk_model_param_count(&w); i++) {
        const struct wk_model_param *p = wk_model_param(&w, i);
        const struct wk_model_param *q =
            i < n0 ? wk_model_param(&s0, i) : wk_model_param(&s1, i - n0);
        cr_assert_str_eq(p->name, q->name);
        cr_assert_eq(memcmp(p->w, q->w, p->n * sizeof(float)), 0, "%s", p->name);
        cr_assert_eq(memcmp(p->g, q->g, p->n * sizeof(float)), 0, "%s grad", p->name);
    }
    wk_model_cache_free(&cw, &w);
    wk_model_cache_free(&c0, &s0);
    wk_model_cache_free(&c1, &s1);
    wk_model_free(&w);
    wk_model_free(&s0);
    wk_model_free(&s1);
}

/* An expert-parallel hook that runs every expert here: the model must not
 * notice it (the same loss and gradients bitwise). */
struct local_ep {
    int forward, backward, weight;
};

static int local_forward(void *arg, void *tag, int layer, struct wk_moe *moe, struct wk_moe_ctx *c)
{
    ((struct local_ep *)arg)->forward++;
    cr_assert_eq(tag, arg);
    cr_assert(layer >= 0 && layer < 2);
    return wk_moe_forward_experts(moe, c, 0, moe->cfg.experts);
}

static int local_backward(void *arg, void *tag, int layer, struct wk_moe *moe, struct wk_moe_ctx *c)
{
    (void)tag;
    (void)layer;
    ((struct local_ep *)arg)->backward++;
    return wk_moe_backward_experts(moe, c, 0, moe->cfg.experts);
}

static int local_weight(void *arg, void *tag, int layer, struct wk_moe *moe,
                        const struct wk_moe_ctx *c)
{
    (void)tag;
    (void)layer;
    ((struct local_ep *)arg)->weight++;
    return wk_moe_backward_weight_experts(moe, c, 0, moe->cfg.experts);
}

static void same_grads(const struct wk_model *a, const struct wk_model *b)
{
    for (int i = 0; i < wk_model_param_count(a); i++) {
        const struct wk_model_param *p = wk_model_param(a, i), *q = wk_model_param(b, i);
        cr_assert_eq(memcmp(p->g, q->g, p->n * sizeof(float)), 0, "%s grad", p->name);
    }
}

/* Zero-bubble halves: I of micro-batch 0, a whole other micro-batch, then
 * W of micro-batch 0 give what full backwards in order give, bitwise; and
 * the same through an expert-parallel hook. */
Test(model, split_backward_and_ep_hook_equal_full, .init = setup)
{
    struct wk_model_config cfg = tiny_cfg(256);
    struct wk_model ref, split, hooked;
    struct wk_model_cache r0, r1, s0, s1, h0;
    int32_t t0[B * (T + 1)], t1[B * (T + 1)];
    float lr = 0.0f, ls = 0.0f, lh = 0.0f;
    struct local_ep counts = {0};
    const struct wk_model_ep ep = {local_forward, local_backward, local_weight, &counts};

    fill_tokens(t0, B * (T + 1), 256, 4);
    fill_tokens(t1, B * (T + 1), 256, 5);
    cr_assert_eq(wk_model_init(&ref, &cfg, SEED), 0);
    cr_assert_eq(wk_model_init(&split, &cfg, SEED), 0);
    cr_assert_eq(wk_model_init(&hooked, &cfg, SEED), 0);
    cr_assert_eq(wk_model_cache_init(&r0, &ref, B, T), 0);
    cr_assert_eq(wk_model_cache_init(&r1, &ref, B, T), 0);
    cr_assert_eq(wk_model_cache_init(&s0, &split, B, T), 0);
    cr_assert_eq(wk_model_cache_init(&s1, &split, B, T), 0);
    cr_assert_eq(wk_model_cache_init(&h0, &hooked, B, T), 0);
    h0.ep = &ep;
    h0.ep_tag = &counts;

    cr_assert_eq(wk_model_forward(&ref, &r0, t0, NULL, NULL, &lr), 0);
    cr_assert_eq(wk_model_backward(&ref, &r0, NULL, NULL), 0);
    cr_assert_eq(wk_model_forward(&ref, &r1, t1, NULL, NULL, &lr), 0);
    cr_assert_eq(wk_model_backward(&ref, &r1, NULL, NULL), 0);

    cr_assert_eq(wk_model_forward(&split, &s0, t0, NULL, NULL, &ls), 0);
    cr_assert_eq(wk_model_backward_input(&split, &s0, NULL, NULL), 0);
    cr_assert_eq(wk_model_forward(&split, &s1, t1, NULL, NULL, &ls), 0);
    cr_assert_eq(wk_model_backward(&split, &s1, NULL, NULL), 0);
    cr_assert_eq(wk_model_backward_weight(&split, &s0), 0);
    cr_assert_eq(memcmp(&lr, &ls, sizeof(lr)), 0);
    same_grads(&ref, &split);

    cr_assert_eq(wk_model_forward(&hooked, &h0, t0, NULL, NULL, &lh), 0);
    cr_assert_eq(wk_model_backward_input(&hooked, &h0, NULL, NULL), 0);
    cr_assert_eq(wk_model_backward_weight(&hooked, &h0), 0);
    cr_assert_eq(wk_model_forward(&hooked, &h0, t1, NULL, NULL, &lh), 0);
    cr_assert_eq(wk_model_backward(&hooked, &h0, NULL, NULL), 0);
    cr_assert_eq(memcmp(&lr, &lh, sizeof(lr)), 0);
    same_grads(&ref, &hooked);
    cr_assert_eq(counts.forward, 2 * cfg.layers);
    cr_assert_eq(counts.backward, 2 * cfg.layers);
    cr_assert_eq(counts.weight, 2 * cfg.layers);

    wk_model_cache_free(&r0, &ref);
    wk_model_cache_free(&r1, &ref);
    wk_model_cache_free(&s0, &split);
    wk_model_cache_free(&s1, &split);
    wk_model_cache_free(&h0, &hooked);
    wk_model_free(&ref);
    wk_model_free(&split);
    wk_model_free(&hooked);
}

Test(model, bad_arguments, .init = setup)
{
    struct wk_model_config cfg = tiny_cfg(256);
    struct wk_model m;
    char err[128] = "";

    cfg.heads = 3;
    cr_assert_eq(wk_model_config_check(&cfg, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "heads"), "%s", err);
    cr_assert_eq(wk_model_init(&m, &cfg, 1), -EINVAL);
    cfg = tiny_cfg(256);
    cr_assert_eq(wk_model_stage_init(&m, &cfg, 1, 1, 3, WK_MODEL_HAS_HEAD), -EINVAL);
    cfg.top_k = 5;
    cr_assert_eq(wk_model_config_check(&cfg, err, sizeof(err)), -EINVAL);
}

/* ---- data and training --------------------------------------------------- */

static const char TEXT[] =
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software and associated documentation files, to deal in the software without "
    "restriction, including without limitation the rights to use, copy, modify, merge, "
    "publish, distribute, sublicense, and sell copies of the software. ";

/* A directory with the text split in two files, a link and a subdirectory. */
static void make_text_dir(char *dir, size_t len)
{
    char path[512];
    FILE *f;

    snprintf(dir, len, "/tmp/duplex_test_model_%d", (int)getpid());
    cr_assert_eq(mkdir(dir, 0700), 0);
    snprintf(path, sizeof(path), "%s/b", dir);
    cr_assert((f = fopen(path, "w")));
    fputs(TEXT + 100, f);
    fclose(f);
    snprintf(path, sizeof(path), "%s/a", dir);
    cr_assert((f = fopen(path, "w")));
    fwrite(TEXT, 1, 100, f);
    fclose(f);
    snprintf(path, sizeof(path), "%s/c", dir);
    cr_assert_eq(symlink("a", path), 0);
    snprintf(path, sizeof(path), "%s/sub", dir);
    cr_assert_eq(mkdir(path, 0700), 0);
}

static void remove_text_dir(const char *dir)
{
    const char *names[] = {"a", "b", "c", "sub"};
    char path[512];

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        if (remove(path) < 0)
            cr_log_warn("remove %s: %s", path, strerror(errno));
    }
    rmdir(dir);
}

Test(data, files_split_and_offsets, .init = setup)
{
    char dir[256], err[256];
    struct wk_data d;
    size_t len;
    int32_t one[2 * 4 * 9], two[2 * 4 * 9];

    make_text_dir(dir, sizeof(dir));
    cr_assert_eq(wk_data_open(&d, dir, err, sizeof(err)), 0, "%s", err);
    remove_text_dir(dir);
    cr_assert_eq(d.files, 2);
    cr_assert_eq(d.len, strlen(TEXT));
    cr_assert_eq(d.train_len, d.len * 9 / 10);
    {
        uint8_t all[sizeof(TEXT)];

        /* the two files read as one text, across their boundary */
        cr_assert_eq(wk_data_read(&d, WK_DATA_TRAIN, 0, d.train_len, all), 0);
        cr_assert_eq(wk_data_read(&d, WK_DATA_VALID, 0, d.len - d.train_len, all + d.train_len), 0);
        cr_assert_eq(memcmp(all, TEXT, d.len), 0);
        cr_assert_eq(wk_data_read(&d, WK_DATA_VALID, 1, d.len - d.train_len, all), -EINVAL);
        for (size_t off = 0; off + 5 <= d.train_len; off++) {
            cr_assert_eq(wk_data_read(&d, WK_DATA_TRAIN, off, 5, all), 0);
            cr_assert_eq(memcmp(all, TEXT + off, 5), 0, "window at %zu", off);
        }
    }
    len = wk_data_split_len(&d, WK_DATA_VALID);
    cr_assert_eq(len, d.len - d.train_len);

    /* one rank with 4 micro-batches of 2 = two ranks with 2 micro-batches */
    for (int k = 0; k < 4; k++)
        cr_assert_eq(wk_data_batch(&d, WK_DATA_TRAIN, 3, 5, 0, 4, k, 2, 8, one + k * 18), 0);
    for (int r = 0; r < 2; r++)
        for (int k = 0; k < 2; k++)
            cr_assert_eq(
                wk_data_batch(&d, WK_DATA_TRAIN, 3, 5, r, 2, k, 2, 8, two + (r * 2 + k) * 18), 0);
    cr_assert_eq(memcmp(one, two, sizeof(one)), 0);
    for (int b = 0; b < 8; b++) {
        int64_t off = wk_data_offset(&d, WK_DATA_TRAIN, 3, 5, b, 8);
        cr_assert(off >= 0 && (size_t)off + 9 <= d.train_len);
        for (int j = 0; j < 9; j++)
            cr_assert_eq(one[b * 9 + j], (int32_t)(uint8_t)TEXT[off + j]);
    }
    /* other steps and seeds read elsewhere */
    cr_assert_neq(wk_data_offset(&d, WK_DATA_TRAIN, 3, 6, 0, 8) +
                      wk_data_offset(&d, WK_DATA_TRAIN, 3, 6, 1, 8),
                  wk_data_offset(&d, WK_DATA_TRAIN, 3, 5, 0, 8) +
                      wk_data_offset(&d, WK_DATA_TRAIN, 3, 5, 1, 8));
    cr_assert_eq(wk_data_offset(&d, WK_DATA_VALID, 3, 5, 0, (int)len), -EINVAL);
    cr_assert_eq(wk_data_batch(&d, WK_DATA_TRAIN, 3, 5, 0, 2, 2, 2, 8, one), -EINVAL);
    wk_data_close(&d);
}

Test(data, missing_or_empty_directory, .init = setup)
{
    char dir[256], err[256] = "";
    struct wk_data d;

    cr_assert_eq(wk_data_open(&d, "/nonexistent/duplex", err, sizeof(err)), -ENOENT);
    cr_assert(strstr(err, "/nonexistent/duplex"), "%s", err);
    snprintf(dir, sizeof(dir), "/tmp/duplex_test_empty_%d", (int)getpid());
    cr_assert_eq(mkdir(dir, 0700), 0);
    cr_assert_eq(wk_data_open(&d, dir, err, sizeof(err)), -ENOENT);
    rmdir(dir);
    cr_assert(strstr(err, "no regular files"), "%s", err);
}

Test(model, training_lowers_the_loss, .init = setup)
{
    struct wk_model_config cfg = tiny_cfg(256);
    struct wk_adamw_config oc;
    struct wk_model m;
    struct wk_model_cache c;
    struct wk_data d;
    char dir[256], err[256];
    int32_t tokens[B * (T + 1)];
    double first = 0.0, last = 0.0;
    enum { M = 2 };

    make_text_dir(dir, sizeof(dir));
    cr_assert_eq(wk_data_open(&d, dir, err, sizeof(err)), 0, "%s", err);
    remove_text_dir(dir);
    cr_assert_eq(wk_model_init(&m, &cfg, SEED), 0);
    wk_adamw_config_defaults(&oc);
    oc.lr = TRAIN_LR;
    cr_assert_eq(wk_model_optim_init(&m, &oc), 0);
    cr_assert_eq(wk_model_cache_init(&c, &m, B, T), 0);
    for (int s = 1; s <= TRAIN_STEPS; s++) {
        double sum = 0.0;

        wk_model_zero_grad(&m);
        for (int k = 0; k < M; k++) {
            float loss;

            cr_assert_eq(wk_data_batch(&d, WK_DATA_TRAIN, SEED, s, 0, M, k, B, T, tokens), 0);
            cr_assert_eq(wk_model_forward(&m, &c, tokens, NULL, NULL, &loss), 0);
            cr_assert_eq(wk_model_backward(&m, &c, NULL, NULL), 0);
            sum += loss;
        }
        wk_model_scale_grad(&m, 1.0f / M);
        cr_assert_eq(wk_model_step(&m), 0);
        cr_assert(isfinite(sum));
        if (s == 1)
            first = sum / M;
        last = sum / M;
    }
    cr_assert_gt(first - last, TRAIN_MARGIN, "loss %g -> %g", first, last);
    /* the routing biases moved (loads were counted and cleared) */
    float bias_abs = 0.0f;
    for (int e = 0; e < cfg.experts; e++)
        bias_abs += fabsf(m.layer[0].moe.bias[e]);
    cr_assert_gt(bias_abs, 0.0f);
    for (int e = 0; e < cfg.experts; e++)
        cr_assert_eq(m.load[e], 0);
    wk_model_cache_free(&c, &m);
    wk_model_free(&m);
    wk_data_close(&d);
}
