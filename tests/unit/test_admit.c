/* test_admit.c - memory admission: a spec's memory per rank
 * (job_spec_memory) against what the cpu backend's model really
 * allocates, the refusal of coord_admit_check with the numbers, and
 * Register.memory_bytes through the envelope's checks. */
#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/admit.h"
#include "job/jobspec.h"
#include "proto/envelope.h"
#include "worker/model/model.h"
#include "worker/rank/train.h"

static char err[1024];

static void parse(struct job_spec *s, const char *const *sets, size_t n)
{
    char why[512];

    cr_assert_eq(job_spec_parse("{}", 2, sets, n, s, why, sizeof(why)), 0, "%s", why);
}

/* ---- the estimate against the real allocation ------------------------------ */

static size_t heap_bytes(void)
{
    struct mallinfo2 mi = mallinfo2();

    return mi.uordblks + mi.hblkhd;
}

/* Builds what the cpu backend builds for pipeline rank r of spec (its
 * chunks' models and AdamW state, a cache and worker/rank/rank.c's four buffers and
 * tokens per micro-batch it runs, the step-end sums' buffer), returns the
 * heap bytes that took, and frees it all. ep 1 only. */
static size_t measure_rank(const struct job_spec *s, int r)
{
    struct wk_train_config tc;
    struct wk_adamw_config oc;
    struct wk_model model[2];
    struct wk_model_cache *cache;
    void **bufs;
    int P = s->parallel.pp, M = s->parallel.microbatches, S = P, stage[2] = {r, 0}, n = 1;
    int slots = M, per, nb = 0, nc = 0;
    size_t before, after, maxsync = 0;
    size_t rows = (size_t)s->parallel.microbatch_size * (size_t)s->model.seq_len;

    if (s->parallel.schedule == DP_SCHED_DUALPIPE) {
        stage[1] = P - 1 - r;
        n = 2;
        slots = M / 2;
    } else if (s->parallel.schedule == DP_SCHED_DUALPIPEV) {
        S = 2 * P;
        stage[1] = 2 * P - 1 - r;
        n = 2;
    }
    per = s->model.layers / S;
    wk_train_config_from_spec(s, &tc);
    wk_adamw_config_defaults(&oc);
    cache = calloc((size_t)(n * slots), sizeof(*cache));
    bufs = calloc((size_t)(n * slots * 5 + 1), sizeof(*bufs));
    cr_assert(cache && bufs);
    before = heap_bytes();
    for (int i = 0; i < n; i++) {
        int flags =
            (stage[i] == 0 ? WK_MODEL_HAS_EMBED : 0) | (stage[i] == S - 1 ? WK_MODEL_HAS_HEAD : 0);
        size_t nf = 0;

        cr_assert_eq(wk_model_stage_init(&model[i], &tc.model, 1, stage[i] * per,
                                         stage[i] * per + per, flags),
                     0);
        cr_assert_eq(wk_model_optim_init(&model[i], &oc), 0);
        for (int p = 0; p < wk_model_param_count(&model[i]); p++)
            nf += wk_model_param(&model[i], p)->n;
        nf = nf * sizeof(float) + (size_t)per * (size_t)s->model.experts * 8 + 8;
        maxsync = nf > maxsync ? nf : maxsync;
        for (int k = 0; k < slots; k++) {
            cr_assert_eq(wk_model_cache_init(&cache[nc++], &model[i], s->parallel.microbatch_size,
                                             s->model.seq_len),
                         0);
            for (int b = 0; b < 4; b++)
                cr_assert_not_null(bufs[nb++] = calloc(rows * (size_t)s->model.d_model, 4));
            cr_assert_not_null(bufs[nb++] = calloc((size_t)s->parallel.microbatch_size *
                                                       ((size_t)s->model.seq_len + 1),
                                                   4));
        }
    }
    cr_assert_not_null(bufs[nb++] = malloc(2 * maxsync + 1));
    after = heap_bytes();
    for (int k = 0; k < nc; k++)
        wk_model_cache_free(&cache[k], &model[k / slots]);
    for (int i = 0; i < n; i++)
        wk_model_free(&model[i]);
    for (int b = 0; b < nb; b++)
        free(bufs[b]);
    free(cache);
    free(bufs);
    return after - before;
}

static void expect_upper_bound(const char *const *sets, size_t n)
{
    struct job_spec s;
    struct job_spec_memory m;
    size_t real = 0;

    parse(&s, sets, n);
    job_spec_memory(&s, &m);
    for (int r = 0; r < s.parallel.pp; r++) {
        size_t b = measure_rank(&s, r);
        real = b > real ? b : real;
    }
    if (heap_bytes() == 0 && real == 0)
        cr_skip_test("mallinfo2 counts nothing here (a sanitizer's allocator)");
    cr_assert_eq(m.total, m.params + m.grads + m.optimizer + m.activations);
    cr_assert_geq(m.total, real, "estimate %" PRIu64 " is below the real %zu (%s)", m.total, real,
                  n ? sets[n - 1] : "defaults");
    cr_assert_leq((double)m.total, 2.0 * (double)real,
                  "estimate %" PRIu64 " is over twice the real %zu (%s)", m.total, real,
                  n ? sets[n - 1] : "defaults");
    cr_log_info("%s: estimate %" PRIu64 ", real %zu (%.2fx)", n ? sets[n - 1] : "defaults", m.total,
                real, (double)m.total / (double)real);
}

Test(admit, estimate_bounds_the_real_allocation_dualpipe)
{
    expect_upper_bound(NULL, 0);
}

Test(admit, estimate_bounds_the_real_allocation_1f1b)
{
    const char *sets[] = {"parallel.schedule=1f1b", "parallel.pp=4", "model.vocab=4096"};
    expect_upper_bound(sets, 3);
}

Test(admit, estimate_bounds_the_real_allocation_dualpipev)
{
    const char *sets[] = {"parallel.schedule=dualpipev", "parallel.pp=2", "model.seq_len=128",
                          "model.d_model=128", "model.expert_hidden=256"};
    expect_upper_bound(sets, 5);
}

Test(admit, estimate_bounds_the_real_allocation_one_rank)
{
    const char *sets[] = {"parallel.schedule=zb1p", "parallel.pp=1", "parallel.microbatches=3",
                          "model.shared_experts=0", "model.top_k=4"};
    expect_upper_bound(sets, 5);
}

Test(admit, estimate_grows_with_what_a_rank_holds)
{
    struct job_spec s;
    struct job_spec_memory a, b, c;
    const char *more_mb[] = {"parallel.microbatches=8"};
    const char *ep2[] = {"parallel.ep=2"};

    parse(&s, NULL, 0);
    job_spec_memory(&s, &a);
    parse(&s, more_mb, 1);
    job_spec_memory(&s, &b);
    cr_assert_gt(b.activations, a.activations, "a cache per micro-batch");
    cr_assert_eq(b.params, a.params);
    cr_assert_eq(b.optimizer, 2 * a.params, "AdamW's m and v");
    parse(&s, ep2, 1);
    job_spec_memory(&s, &c);
    cr_assert_eq(c.params, a.params, "every rank keeps every expert");
}

Test(admit, huge_spec_saturates_without_overflow)
{
    struct job_spec s;
    struct job_spec_memory m;
    char text[256];
    const char *sets[] = {"model.vocab=1000000", "model.d_model=65536"};

    parse(&s, sets, 2);
    job_spec_memory(&s, &m);
    /* the embedding alone: 1e6 x 65536 floats = 244 GiB, four times over */
    cr_assert_gt(m.params, 244ULL << 30);
    cr_assert_geq(m.total, m.params);
    job_spec_memory_text(&m, text, sizeof(text));
    cr_assert_not_null(strstr(text, "TiB (parameters"), "%s", text);
}

/* ---- coord_admit_check -------------------------------------------------------- */

static struct coord_worker wk[8];
static struct coord_worker *wp[8];

static void fleet(const char *backend, size_t n, const uint64_t *mem)
{
    memset(wk, 0, sizeof(wk));
    for (size_t i = 0; i < n; i++) {
        wk[i].id = "w";
        wk[i].backend = (char *)backend;
        wk[i].state = COORD_WORKER_ALIVE;
        wk[i].memory_bytes = mem[i];
        wp[i] = &wk[i];
    }
}

static uint64_t need_of(const struct job_spec *s)
{
    struct job_spec_memory m;

    job_spec_memory(s, &m);
    return m.total;
}

Test(admit, refuses_with_the_numbers)
{
    struct job_spec s;
    uint64_t need, mem[4];

    parse(&s, NULL, 0); /* cpu, pp 2 x ep 1 x dp 1 */
    need = need_of(&s);
    mem[0] = need;
    mem[1] = need / 2;
    mem[2] = need / 3;
    fleet("cpu", 3, mem);
    err[0] = '\0';
    cr_assert_eq(coord_admit_check(&s, wp, 3, err, sizeof(err)), -ENOSPC);
    cr_assert_not_null(strstr(err, "per rank"), "%s", err);
    cr_assert_not_null(strstr(err, "parameters"), "%s", err);
    cr_assert_not_null(strstr(err, "optimizer"), "%s", err);
    cr_assert_not_null(strstr(err, "activations"), "%s", err);
    cr_assert_not_null(strstr(err, "1 of the 3 alive cpu workers"), "%s", err);
    cr_assert_not_null(strstr(err, "the largest cpu worker reports"), "%s", err);
    /* two that fit: it runs */
    mem[1] = need + 1;
    fleet("cpu", 3, mem);
    cr_assert_eq(coord_admit_check(&s, wp, 3, err, sizeof(err)), 0, "%s", err);
}

Test(admit, unknown_memory_fits)
{
    struct job_spec s;
    uint64_t mem[2] = {0, 0};

    parse(&s, NULL, 0);
    fleet("cpu", 2, mem);
    cr_assert_eq(coord_admit_check(&s, wp, 2, err, sizeof(err)), 0, "%s", err);
    mem[1] = 1;
    fleet("cpu", 2, mem);
    cr_assert_eq(coord_admit_check(&s, wp, 2, err, sizeof(err)), -ENOSPC);
}

Test(admit, only_alive_workers_of_the_backend_count)
{
    struct job_spec s;
    uint64_t need, mem[4];

    parse(&s, NULL, 0);
    need = need_of(&s);
    mem[0] = mem[1] = need;
    mem[2] = mem[3] = 1;
    fleet("cpu", 4, mem);
    wk[1].state = COORD_WORKER_LOST;
    cr_assert_eq(coord_admit_check(&s, wp, 4, err, sizeof(err)), -ENOSPC);
    wk[1].state = COORD_WORKER_ALIVE;
    wk[0].backend = "cuda";
    cr_assert_eq(coord_admit_check(&s, wp, 4, err, sizeof(err)), -ENOSPC);
    wk[0].backend = "cpu";
    cr_assert_eq(coord_admit_check(&s, wp, 4, err, sizeof(err)), 0, "%s", err);
}

Test(admit, short_of_workers_is_not_a_memory_refusal)
{
    struct job_spec s;
    uint64_t mem[1];

    parse(&s, NULL, 0);
    cr_assert_eq(coord_admit_check(&s, wp, 0, err, sizeof(err)), 0, "no workers: capacity rules");
    mem[0] = need_of(&s);
    fleet("cpu", 1, mem);
    cr_assert_eq(coord_admit_check(&s, wp, 1, err, sizeof(err)), 0, "one that fits, one missing");
}

Test(admit, sim_jobs_are_never_refused)
{
    struct job_spec s;
    const char *sets[] = {"backend=sim", "model.vocab=1000000", "model.d_model=65536"};
    uint64_t mem[2] = {1, 1};

    parse(&s, sets, 3);
    fleet("sim", 2, mem);
    cr_assert_eq(coord_admit_check(&s, wp, 2, err, sizeof(err)), 0, "%s", err);
}

Test(admit, the_issue_spec_is_refused)
{
    struct job_spec s;
    const char *sets[] = {"model.vocab=1000000", "model.d_model=65536"};
    uint64_t mem[2] = {16ULL << 30, 32ULL << 30};

    parse(&s, sets, 2);
    fleet("cpu", 2, mem);
    cr_assert_eq(coord_admit_check(&s, wp, 2, err, sizeof(err)), -ENOSPC);
    cr_assert_not_null(strstr(err, "reports 32.0 GiB"), "%s", err);
}

/* ---- Register.memory_bytes ------------------------------------------------ */

static int decode_register(uint64_t memory, struct dx_decode_error *e)
{
    Duplex__Register m = DUPLEX__REGISTER__INIT;
    struct dx_msg msg;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    m.worker_id = "w0";
    m.host = "h";
    m.node = "n";
    m.backend = "cpu";
    m.memory_bytes = memory;
    cr_assert_eq(dx_env_encode(DUPLEX__MSG_TYPE__MSG_REGISTER, 1, &m.base, &buf, &len), 0);
    rc = dx_env_decode(buf, len, &msg, e);
    if (rc == 0) {
        cr_assert_eq(((const Duplex__Register *)msg.body)->memory_bytes, memory);
        dx_msg_clear(&msg);
    }
    free(buf);
    return rc;
}

Test(admit, register_memory_is_checked)
{
    struct dx_decode_error e;

    cr_assert_eq(decode_register(0, &e), 0, "0: unknown");
    cr_assert_eq(decode_register(64ULL << 30, &e), 0, "%s", e.text);
    cr_assert_eq(decode_register(DX_MAX_MEMORY_BYTES, &e), 0, "%s", e.text);
    cr_assert_eq(decode_register(DX_MAX_MEMORY_BYTES + 1, &e), -EPROTO);
    cr_assert_eq(e.code, DUPLEX__ERROR_CODE__ERROR_INVALID);
    cr_assert_not_null(strstr(e.text, "memory_bytes"), "%s", e.text);
    cr_assert_eq(decode_register(UINT64_MAX, &e), -EPROTO);
}
