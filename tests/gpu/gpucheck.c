/* gpucheck.c - duplex-gpucheck: runs every CUDA kernel embedded in
 * libdxkernels.a on a GPU and compares it with its CPU reference
 * (kernels/ref.h) on fresh random data, then times pack and combine against
 * a device-to-device copy. Owns nothing but its own run; prints a table
 * last. Exit 0 when every check passes, 1 when one fails, 2 when the GPU
 * stack or a kernel image cannot be used.
 *
 * Bounds (per dtype): int32 ids / counts / offsets / slots exact; fp32
 * gates, pack, combine and dequantized values bitwise (the kernels round
 * every operation like the references: no FMA); e4m3 codes and fp32 scales
 * bitwise. Outputs are poisoned with 0xff bytes on the device and on the host
 * first, so an element a kernel skips shows up as a difference.
 *
 * The elementwise kernels (kernels/elementwise.cu) are checked against the
 * worker's own layers to a relative bound instead: err = |got - want| /
 * max(|want|, rms(want)) (the floor at the array's RMS measures an element
 * that a sum or a difference cancels to near 0 against the array's scale,
 * which is what its absolute error follows). Their row sums are a float
 * shuffle tree where the worker sums in double in order (relative error of
 * a float sum of d <= 32000 positive terms, about 125 per thread then a
 * 256-way tree: <= (125 + 8) * 2^-24 = 8e-6 worst case, ~1e-6 in practice),
 * and their expf / logf are CUDA's (<= 2 ulp) against glibc's: 1e-5 for
 * RMSNorm (y, rstd, dx; dg 1e-4: the worker sums it in float, see
 * check_rmsnorm) and softmax (probs, per-row and mean loss);
 * SwiGLU has no sums, only expf and a handful of correctly rounded
 * operations (~4 ulp = 2.4e-7 at worst): 1e-6. Softmax backward from the
 * reference probabilities is bitwise (the same two roundings). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"
#include "worker/cuda.h"
#include "worker/model/rmsnorm.h"

/* the kernel images, from libdxkernels.a (kernels/embed.py) */
#define IMAGE(name)                                                                                \
    extern const unsigned char dx_kernel_##name##_cubin[];                                         \
    extern const size_t dx_kernel_##name##_cubin_len;                                              \
    extern const unsigned char dx_kernel_##name##_ptx[];                                           \
    extern const size_t dx_kernel_##name##_ptx_len
IMAGE(routing);
IMAGE(dispatch);
IMAGE(fp8);
IMAGE(elementwise);

#define POISON 0xff
#define BLOCK 256 /* threads per block for every launch */
#define MAX_ROWS 64
#define MAX_BUFS 24
#define DEFAULT_SEED 20261128u
#define DEFAULT_ITERS 20

struct row {
    char check[24], shape[64], result[96];
    double ms, gbs; /* < 0: not measured */
};

struct gc {
    wk_cuda_t *c;
    wk_cuda_module mod[4];
    wk_cuda_function_t route, count, offsets, rows, pack, combine, quant, dequant, copy;
    wk_cuda_function_t rms_fwd, rms_bwd, rms_dg, swi_fwd, swi_bwd, sx_fwd, sx_bwd;
    unsigned sms;
    int iters;
    uint64_t rng;
    double copy_gbs; /* the ceiling, from the largest copy */
    struct row rows_[MAX_ROWS];
    int nrows, failed;
};

/* One check's device and host buffers, freed together; after the first
 * CUDA error every helper is a no-op and the check reports it. */
struct ck {
    struct gc *g;
    size_t bad;    /* elements that differ in the row's compares */
    double maxerr; /* the largest error among them (relative for floats) */
    double bound;  /* > 0: the row's compares are bounded (compare_rel) */
    wk_cuda_ptr d[MAX_BUFS];
    void *h[MAX_BUFS];
    int nd, nh, rc;
    char err[256];
};

/* --- random numbers (splitmix64) ----------------------------------------- */

static uint64_t next_u64(struct gc *g)
{
    uint64_t z = (g->rng += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [lo, hi) */
static float uniform(struct gc *g, float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(next_u64(g) >> 40) / (double)(1ull << 24));
}

static void fill(struct gc *g, float *v, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        v[i] = uniform(g, lo, hi);
}

/* --- buffers ------------------------------------------------------------- */

static void ck_fail(struct ck *k, const char *what)
{
    if (k->rc == 0) {
        k->rc = -EIO;
        snprintf(k->err, sizeof(k->err), "%s", what);
    }
}

static void *host(struct ck *k, size_t bytes)
{
    void *p;

    if (k->rc < 0)
        return NULL;
    if (k->nh == MAX_BUFS || !(p = malloc(bytes ? bytes : 1))) {
        ck_fail(k, "out of host memory");
        return NULL;
    }
    memset(p, POISON, bytes);
    k->h[k->nh++] = p;
    return p;
}

/* device buffer of bytes, poisoned; from src when src is not NULL */
static wk_cuda_ptr dev(struct ck *k, size_t bytes, const void *src)
{
    wk_cuda_ptr p = 0;

    if (k->rc < 0)
        return 0;
    if (k->nd == MAX_BUFS) {
        ck_fail(k, "too many device buffers");
        return 0;
    }
    if (wk_cuda_alloc(k->g->c, bytes, &p) < 0) {
        ck_fail(k, wk_cuda_error(k->g->c));
        return 0;
    }
    k->d[k->nd++] = p;
    if ((src ? wk_cuda_upload(k->g->c, p, src, bytes) : wk_cuda_memset(k->g->c, p, POISON, bytes)) <
        0)
        ck_fail(k, wk_cuda_error(k->g->c));
    return p;
}

static void download(struct ck *k, void *dst, wk_cuda_ptr src, size_t bytes)
{
    if (k->rc == 0 && wk_cuda_download(k->g->c, dst, src, bytes) < 0)
        ck_fail(k, wk_cuda_error(k->g->c));
}

static void ck_done(struct ck *k)
{
    for (int i = 0; i < k->nd; i++)
        wk_cuda_free(k->g->c, k->d[i]);
    for (int i = 0; i < k->nh; i++)
        free(k->h[i]);
    k->nd = k->nh = 0;
}

/* Launches fn iters times between two events; ms per launch. */
static double launch(struct ck *k, wk_cuda_function_t fn, unsigned grid, unsigned shmem,
                     void **args, int iters)
{
    struct gc *g = k->g;
    wk_cuda_event start = NULL, end = NULL;
    const unsigned gr[3] = {grid, 1, 1}, bl[3] = {BLOCK, 1, 1};
    float ms = -1.0f;

    if (k->rc < 0)
        return -1.0;
    if (wk_cuda_event_create(g->c, &start) < 0 || wk_cuda_event_create(g->c, &end) < 0 ||
        wk_cuda_event_record(g->c, start) < 0)
        goto fail;
    for (int i = 0; i < iters; i++)
        if (wk_cuda_launch(g->c, fn, gr, bl, shmem, args) < 0)
            goto fail;
    if (wk_cuda_event_record(g->c, end) < 0 || wk_cuda_event_elapsed(g->c, start, end, &ms) < 0 ||
        wk_cuda_sync(g->c) < 0)
        goto fail;
    wk_cuda_event_destroy(g->c, start);
    wk_cuda_event_destroy(g->c, end);
    return (double)ms / iters;
fail:
    ck_fail(k, wk_cuda_error(g->c));
    wk_cuda_event_destroy(g->c, start);
    wk_cuda_event_destroy(g->c, end);
    return -1.0;
}

/* blocks for one warp per item, at most 8 waves of the device */
static unsigned warp_grid(const struct gc *g, size_t items)
{
    size_t per = BLOCK / 32, blocks = (items + per - 1) / per, cap = (size_t)g->sms * 8;

    if (blocks < 1)
        blocks = 1;
    return (unsigned)(blocks < cap ? blocks : cap);
}

/* --- comparison and the table --------------------------------------------- */

static void add_row(struct gc *g, const char *check, const char *shape, const char *result,
                    double ms, double gbs)
{
    struct row *r;

    if (g->nrows == MAX_ROWS)
        return;
    r = &g->rows_[g->nrows++];
    snprintf(r->check, sizeof(r->check), "%s", check);
    snprintf(r->shape, sizeof(r->shape), "%s", shape);
    snprintf(r->result, sizeof(r->result), "%s", result);
    r->ms = ms;
    r->gbs = gbs;
}

/* Bitwise comparison of n elements of 4 bytes (floats when is_float) or 1
 * byte; appends "differ" details to res. 1 when equal. */
static int compare(struct ck *k, const char *name, const void *got, const void *want, size_t n,
                   size_t elem, int is_float, char *res, size_t reslen)
{
    size_t bad = 0, first = 0;
    double maxerr = 0.0;
    size_t used = strlen(res);

    for (size_t i = 0; i < n; i++) {
        const unsigned char *a = (const unsigned char *)got + i * elem;
        const unsigned char *b = (const unsigned char *)want + i * elem;
        double e;

        if (memcmp(a, b, elem) == 0)
            continue;
        if (!bad++)
            first = i;
        if (is_float) {
            float fa, fb;
            memcpy(&fa, a, 4);
            memcpy(&fb, b, 4);
            e = fabs((double)fa - (double)fb) / fmax(fabs((double)fb), 1e-30);
            if (isnan(e) || isnan(fa))
                e = INFINITY;
        } else if (elem == 4) {
            int32_t ia, ib;
            memcpy(&ia, a, 4);
            memcpy(&ib, b, 4);
            e = fabs((double)ia - (double)ib);
        } else {
            e = fabs((double)*a - (double)*b);
        }
        if (e > maxerr)
            maxerr = e;
    }
    if (!bad)
        return 1;
    k->bad += bad;
    if (maxerr > k->maxerr)
        k->maxerr = maxerr;
    if (used + 2 < reslen)
        snprintf(res + used, reslen - used, "%s%s %zu/%zu differ from [%zu], max %s %.3g",
                 used ? "; " : "", name, bad, n, first, is_float ? "rel" : "abs", maxerr);
    return 0;
}

/* Bounded comparison of n floats: err = |got - want| / max(|want|,
 * rms(want)) (NaN: infinite) against bound, which the row keeps; the
 * largest err goes to k->maxerr whether or not it passes. 1 when all are
 * within. */
static int compare_rel(struct ck *k, const char *name, const float *got, const float *want,
                       size_t n, double bound, char *res, size_t reslen)
{
    size_t bad = 0, first = 0, used = strlen(res);
    double maxerr = 0.0, ss = 0.0, floor_;

    for (size_t i = 0; i < n; i++)
        ss += (double)want[i] * want[i];
    floor_ = fmax(sqrt(ss / (double)(n ? n : 1)), 1e-30);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - (double)want[i]) / fmax(fabs((double)want[i]), floor_);

        if (isnan(e) || isnan(got[i]))
            e = INFINITY;
        if (e > maxerr)
            maxerr = e;
        if (e > bound && !bad++)
            first = i;
    }
    k->bound = bound;
    if (maxerr > k->maxerr)
        k->maxerr = maxerr;
    if (!bad)
        return 1;
    k->bad += bad;
    if (used + 2 < reslen)
        snprintf(res + used, reslen - used, "%s%s %zu/%zu over %.0e from [%zu], max rel %.3g",
                 used ? "; " : "", name, bad, n, bound, first, maxerr);
    return 0;
}

/* Ends a check: its row, PASS / FAIL with the reason. */
static void finish(struct ck *k, const char *check, const char *shape, int ok, const char *why,
                   double ms, double gbs)
{
    char res[96];

    if (k->rc < 0) {
        snprintf(res, sizeof(res), "FAIL (CUDA)");
        fprintf(stderr, "duplex-gpucheck: %s %s: %s\n", check, shape, k->err);
        ok = 0;
    } else if (ok && k->bound > 0.0) {
        snprintf(res, sizeof(res), "PASS %.1e/%.0e", k->maxerr, k->bound);
    } else if (ok) {
        snprintf(res, sizeof(res), "PASS err 0");
    } else {
        snprintf(res, sizeof(res), "FAIL %zu, err %.2g", k->bad, k->maxerr);
        fprintf(stderr, "duplex-gpucheck: %s %s: %s\n", check, shape, why);
    }
    if (!ok)
        k->g->failed++;
    k->bad = 0;
    k->maxerr = 0.0;
    k->bound = 0.0;
    add_row(k->g, check, shape, res, ok ? ms : -1.0, ok ? gbs : -1.0);
}

static double gbs_of(double bytes, double ms)
{
    return ms > 0.0 ? bytes / (ms * 1e6) : -1.0;
}

/* --- routing ------------------------------------------------------------- */

struct route_shape {
    int n, experts, groups, limit, top_k, ranks, d;
    int ties; /* scores from a few values, so ties decide */
    const char *name;
};

/* scores in (0, 1) (sigmoid outputs), bias small */
static void route_inputs(struct gc *g, const struct route_shape *s, float *scores, float *bias)
{
    size_t all = (size_t)s->n * s->experts;

    if (s->ties) {
        for (size_t i = 0; i < all; i++)
            scores[i] = 0.125f * (float)(1 + next_u64(g) % 7);
        for (int e = 0; e < s->experts; e++)
            bias[e] = 0.0f;
    } else {
        fill(g, scores, all, 0.001f, 0.999f);
        fill(g, bias, (size_t)s->experts, -0.05f, 0.05f);
    }
}

static void check_route(struct gc *g, const struct route_shape *s)
{
    struct ck k = {.g = g};
    struct dx_kref_route_cfg cfg = {s->experts, s->groups, s->limit, s->top_k, 2.5f};
    size_t nk = (size_t)s->n * s->top_k, all = (size_t)s->n * s->experts;
    float *scores = host(&k, all * 4), *bias = host(&k, (size_t)s->experts * 4);
    int *ids = host(&k, nk * 4), *ids_d = host(&k, nk * 4);
    float *gates = host(&k, nk * 4), *gates_d = host(&k, nk * 4);
    int *counts = host(&k, (size_t)s->experts * 4), *counts_d = host(&k, (size_t)s->experts * 4);
    char why[512] = "";
    int ok = 0;
    double ms = -1.0;

    if (k.rc == 0) {
        route_inputs(g, s, scores, bias);
        memset(counts, 0, (size_t)s->experts * 4);
        if (dx_kref_route(&cfg, scores, bias, s->n, ids, gates, counts) < 0)
            ck_fail(&k, "dx_kref_route rejected the shape");
    }
    {
        wk_cuda_ptr d_s = dev(&k, all * 4, scores), d_b = dev(&k, (size_t)s->experts * 4, bias);
        wk_cuda_ptr d_ids = dev(&k, nk * 4, NULL), d_g = dev(&k, nk * 4, NULL);
        wk_cuda_ptr d_c = dev(&k, (size_t)s->experts * 4, NULL);
        int n = s->n, E = s->experts, G = s->groups, lim = s->limit, tk = s->top_k;
        float scale = cfg.route_scale;
        void *args[] = {&d_s, &d_b, &n, &E, &G, &lim, &tk, &scale, &d_ids, &d_g, &d_c};
        unsigned shmem = (BLOCK / 32) * (unsigned)(E + G) * 8;

        if (k.rc == 0 && wk_cuda_memset(g->c, d_c, 0, (size_t)E * 4) < 0)
            ck_fail(&k, wk_cuda_error(g->c));
        ms = launch(&k, g->route, warp_grid(g, (size_t)n), shmem, args, 1);
        download(&k, ids_d, d_ids, nk * 4);
        download(&k, gates_d, d_g, nk * 4);
        download(&k, counts_d, d_c, (size_t)E * 4);
    }
    if (k.rc == 0) {
        ok = compare(&k, "ids", ids_d, ids, nk, 4, 0, why, sizeof(why));
        ok &= compare(&k, "gates", gates_d, gates, nk, 4, 1, why, sizeof(why));
        ok &= compare(&k, "counts", counts_d, counts, (size_t)s->experts, 4, 0, why, sizeof(why));
    }
    finish(&k, "route_topk", s->name, ok, why, ms, -1.0);
    ck_done(&k);
}

/* --- dispatch: count, offsets, rows, pack, combine ------------------------- */

static void check_dispatch(struct gc *g, const struct route_shape *s, int random_owner)
{
    struct ck k = {.g = g};
    struct dx_kref_route_cfg cfg = {s->experts, s->groups, s->limit, s->top_k, 2.5f};
    const int n = s->n, E = s->experts, R = s->ranks, K = s->top_k, d = s->d;
    const int rows = n * K;
    const size_t nk = (size_t)rows, xd = (size_t)n * d, sd = (size_t)rows * d;
    float *scores = host(&k, (size_t)n * E * 4), *bias = host(&k, (size_t)E * 4);
    int *ids = host(&k, nk * 4), *owner = host(&k, (size_t)E * 4);
    float *gates = host(&k, nk * 4);
    int *tpe = host(&k, (size_t)E * 4), *tpe_d = host(&k, (size_t)E * 4);
    int *lay = host(&k, (size_t)(2 * E + 2 * R + 2) * 4);
    int *lay_d = host(&k, (size_t)(2 * E + 2 * R + 2) * 4);
    int *stok = host(&k, nk * 4), *stok_d = host(&k, nk * 4), *tslot = host(&k, nk * 4);
    int *tslot_d = host(&k, nk * 4);
    float *sgate = host(&k, nk * 4), *sgate_d = host(&k, nk * 4);
    float *x = host(&k, xd * 4), *send = host(&k, sd * 4), *send_d = host(&k, sd * 4);
    float *base = host(&k, xd * 4), *out = host(&k, xd * 4), *out_d = host(&k, xd * 4);
    float *y = send; /* the experts' outputs: reuses the pack buffer, refilled */
    int *eoff, *rrows, *roff, *eslot;
    char why[512] = "", shape[64];
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s R=%d%s", s->name, R, random_owner ? " rand-own" : "");
    if (k.rc < 0) {
        finish(&k, "dispatch", shape, 0, "", -1.0, -1.0);
        ck_done(&k);
        return;
    }
    eoff = lay;
    rrows = lay + E + 1;
    roff = rrows + R;
    eslot = roff + R + 1;
    route_inputs(g, s, scores, bias);
    memset(tpe, 0, (size_t)E * 4);
    if (dx_kref_route(&cfg, scores, bias, n, ids, gates, tpe) < 0) {
        ck_fail(&k, "dx_kref_route rejected the shape");
        finish(&k, "dispatch", shape, 0, "", -1.0, -1.0);
        ck_done(&k);
        return;
    }
    for (int e = 0; e < E; e++)
        owner[e] = random_owner ? (int)(next_u64(g) % (uint64_t)R) : e / (E / R);
    if (dx_kref_dispatch_count(ids, n, K, E, tpe) < 0 ||
        dx_kref_dispatch_offsets(tpe, owner, E, R, eoff, rrows, roff, eslot) < 0 ||
        dx_kref_dispatch_rows(ids, gates, n, K, E, eslot, stok, sgate, tslot) < 0) {
        ck_fail(&k, "a dispatch reference rejected the shape");
        finish(&k, "dispatch", shape, 0, "", -1.0, -1.0);
        ck_done(&k);
        return;
    }
    fill(g, x, xd, -4.0f, 4.0f);
    dx_kref_dispatch_pack(x, d, stok, rows, send);

    wk_cuda_ptr d_ids = dev(&k, nk * 4, ids), d_gates = dev(&k, nk * 4, gates);
    wk_cuda_ptr d_owner = dev(&k, (size_t)E * 4, owner);
    /* count */
    wk_cuda_ptr d_tpe = dev(&k, (size_t)E * 4, NULL);
    {
        int nn = n, kk = K, ee = E;
        void *args[] = {&d_ids, &nn, &kk, &ee, &d_tpe};
        ms = launch(&k, g->count, (unsigned)E, 0, args, 1);
        download(&k, tpe_d, d_tpe, (size_t)E * 4);
        why[0] = '\0';
        ok = k.rc == 0 &&
             compare(&k, "tokens_per_expert", tpe_d, tpe, (size_t)E, 4, 0, why, sizeof(why));
        finish(&k, "dispatch_count", shape, ok, why, ms, -1.0);
    }
    /* offsets, from the reference counts */
    wk_cuda_ptr d_lay = dev(&k, (size_t)(2 * E + 2 * R + 2) * 4, NULL);
    if (k.rc == 0 && wk_cuda_upload(g->c, d_tpe, tpe, (size_t)E * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    {
        int ee = E, rr = R;
        wk_cuda_ptr d_eoff = d_lay, d_rrows = d_lay + (size_t)(E + 1) * 4;
        wk_cuda_ptr d_roff = d_rrows + (size_t)R * 4, d_eslot = d_roff + (size_t)(R + 1) * 4;
        void *args[] = {&d_tpe, &d_owner, &ee, &rr, &d_eoff, &d_rrows, &d_roff, &d_eslot};
        ms = launch(&k, g->offsets, 1, 0, args, 1);
        download(&k, lay_d, d_lay, (size_t)(2 * E + 2 * R + 2) * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = compare(&k, "expert_offset", lay_d, eoff, (size_t)E + 1, 4, 0, why, sizeof(why));
            ok &= compare(&k, "rank_rows", lay_d + E + 1, rrows, (size_t)R, 4, 0, why, sizeof(why));
            ok &= compare(&k, "rank_offset", lay_d + E + 1 + R, roff, (size_t)R + 1, 4, 0, why,
                          sizeof(why));
            ok &= compare(&k, "expert_slot", lay_d + E + 2 + 2 * R, eslot, (size_t)E, 4, 0, why,
                          sizeof(why));
        }
        finish(&k, "dispatch_offsets", shape, ok, why, ms, -1.0);
    }
    /* rows, from the reference slots */
    wk_cuda_ptr d_eslot = dev(&k, (size_t)E * 4, eslot);
    wk_cuda_ptr d_stok = dev(&k, nk * 4, NULL), d_sgate = dev(&k, nk * 4, NULL);
    wk_cuda_ptr d_tslot = dev(&k, nk * 4, NULL);
    {
        int nn = n, kk = K, ee = E;
        void *args[] = {&d_ids, &d_gates, &nn, &kk, &ee, &d_eslot, &d_stok, &d_sgate, &d_tslot};
        ms = launch(&k, g->rows, (unsigned)E, 0, args, 1);
        download(&k, stok_d, d_stok, nk * 4);
        download(&k, sgate_d, d_sgate, nk * 4);
        download(&k, tslot_d, d_tslot, nk * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = compare(&k, "send_token", stok_d, stok, nk, 4, 0, why, sizeof(why));
            ok &= compare(&k, "send_gate", sgate_d, sgate, nk, 4, 1, why, sizeof(why));
            ok &= compare(&k, "token_slot", tslot_d, tslot, nk, 4, 0, why, sizeof(why));
        }
        finish(&k, "dispatch_rows", shape, ok, why, ms, -1.0);
    }
    /* pack, from the reference rows; then timed */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_stok, stok, nk * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    wk_cuda_ptr d_x = dev(&k, xd * 4, x), d_send = dev(&k, sd * 4, NULL);
    {
        int dd = d, rr = rows;
        void *args[] = {&d_x, &dd, &d_stok, &rr, &d_send};
        unsigned grid = warp_grid(g, (size_t)rows);
        launch(&k, g->pack, grid, 0, args, 1);
        download(&k, send_d, d_send, sd * 4);
        why[0] = '\0';
        ok = k.rc == 0 && compare(&k, "send", send_d, send, sd, 4, 1, why, sizeof(why));
        ms = launch(&k, g->pack, grid, 0, args, g->iters);
        finish(&k, "dispatch_pack", shape, ok, why, ms, gbs_of(2.0 * (double)sd * 4, ms));
    }
    /* combine, with a base and without */
    fill(g, y, sd, -2.0f, 2.0f);
    fill(g, base, xd, -1.0f, 1.0f);
    if (k.rc == 0 && wk_cuda_upload(g->c, d_send, y, sd * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    if (k.rc == 0 && wk_cuda_upload(g->c, d_tslot, tslot, nk * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    wk_cuda_ptr d_base = dev(&k, xd * 4, base), d_out = dev(&k, xd * 4, NULL);
    for (int with_base = 1; with_base >= 0; with_base--) {
        int dd = d, nn = n, kk = K;
        wk_cuda_ptr b = with_base ? d_base : 0;
        void *args[] = {&d_send, &dd, &d_gates, &d_tslot, &nn, &kk, &b, &d_out};
        unsigned grid = warp_grid(g, (size_t)n);
        char cs[80];

        memset(out, POISON, xd * 4);
        dx_kref_combine(y, d, gates, tslot, n, K, with_base ? base : NULL, out);
        if (k.rc == 0 && wk_cuda_memset(g->c, d_out, POISON, xd * 4) < 0)
            ck_fail(&k, wk_cuda_error(g->c));
        launch(&k, g->combine, grid, 0, args, 1);
        download(&k, out_d, d_out, xd * 4);
        why[0] = '\0';
        ok = k.rc == 0 && compare(&k, "out", out_d, out, xd, 4, 1, why, sizeof(why));
        ms = launch(&k, g->combine, grid, 0, args, g->iters);
        snprintf(cs, sizeof(cs), "%s%s", shape, with_base ? " +base" : "");
        finish(&k, "combine", cs, ok, why, ms,
               gbs_of(((double)K + 1.0 + with_base) * (double)xd * 4, ms));
    }
    ck_done(&k);
}

/* --- fp8 --------------------------------------------------------------------- */

static void check_fp8(struct gc *g, int nrows, int cols, const char *name)
{
    struct ck k = {.g = g};
    const int tiles = dx_kref_fp8_tiles(cols);
    const size_t all = (size_t)nrows * cols, ns = (size_t)nrows * tiles;
    float *x = host(&k, all * 4), *sc = host(&k, ns * 4), *sc_d = host(&k, ns * 4);
    uint8_t *q = host(&k, all), *q_d = host(&k, all);
    float *xr = host(&k, all * 4), *xr_d = host(&k, all * 4);
    char why[512] = "", shape[64];
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s %dx%d", name, nrows, cols);
    if (k.rc == 0) {
        /* magnitudes over 24 binades (so subnormals and underflow to 0
         * inside a tile), some tiles all zero (scale 1) */
        for (size_t i = 0; i < all; i++) {
            float m = ldexpf(uniform(g, 1.0f, 2.0f), (int)(next_u64(g) % 24) - 12);
            x[i] = next_u64(g) & 1 ? m : -m;
        }
        for (int r = 0; r < nrows; r += 7)
            memset(x + (size_t)r * cols, 0, (size_t)(cols < 128 ? cols : 128) * 4);
        dx_kref_fp8_quant(x, nrows, cols, q, sc);
        dx_kref_fp8_dequant(q, sc, nrows, cols, xr);
    }
    wk_cuda_ptr d_x = dev(&k, all * 4, x), d_q = dev(&k, all, NULL), d_sc = dev(&k, ns * 4, NULL);
    wk_cuda_ptr d_xr = dev(&k, all * 4, NULL);
    int rr = nrows, cc = cols;
    unsigned grid = warp_grid(g, ns);
    {
        void *args[] = {&d_x, &rr, &cc, &d_q, &d_sc};
        ms = launch(&k, g->quant, grid, 0, args, 1);
        download(&k, q_d, d_q, all);
        download(&k, sc_d, d_sc, ns * 4);
        ok = k.rc == 0;
        if (ok) {
            ok = compare(&k, "codes", q_d, q, all, 1, 0, why, sizeof(why));
            ok &= compare(&k, "scales", sc_d, sc, ns, 4, 1, why, sizeof(why));
        }
        finish(&k, "fp8_quant_1x128", shape, ok, why, ms,
               gbs_of((double)all * 5 + (double)ns * 4, ms));
    }
    /* dequant from the reference codes and scales */
    if (k.rc == 0 &&
        (wk_cuda_upload(g->c, d_q, q, all) < 0 || wk_cuda_upload(g->c, d_sc, sc, ns * 4) < 0))
        ck_fail(&k, wk_cuda_error(g->c));
    {
        void *args[] = {&d_q, &d_sc, &rr, &cc, &d_xr};
        ms = launch(&k, g->dequant, grid, 0, args, 1);
        download(&k, xr_d, d_xr, all * 4);
        why[0] = '\0';
        ok = k.rc == 0 && compare(&k, "x'", xr_d, xr, all, 4, 1, why, sizeof(why));
        finish(&k, "fp8_dequant_1x128", shape, ok, why, ms,
               gbs_of((double)all * 5 + (double)ns * 4, ms));
    }
    ck_done(&k);
}

/* --- elementwise: RMSNorm, SwiGLU, softmax cross-entropy --------------------- */

/* blocks for one block per row (the kernels stride over rows) */
static unsigned row_grid(const struct gc *g, int rows)
{
    size_t cap = (size_t)g->sms * 16, r = rows > 0 ? (size_t)rows : 1;

    return (unsigned)(r < cap ? r : cap);
}

/* blocks for one thread per element (grid-stride) */
static unsigned elem_grid(const struct gc *g, size_t items)
{
    size_t blocks = (items + BLOCK - 1) / BLOCK, cap = (size_t)g->sms * 16;

    if (blocks < 1)
        blocks = 1;
    return (unsigned)(blocks < cap ? blocks : cap);
}

/* Re-launches an idempotent kernel iters times for its time, once it passed. */
static double retime(struct ck *k, int ok, wk_cuda_function_t fn, unsigned grid, void **args,
                     double ms)
{
    return ok ? launch(k, fn, grid, 0, args, k->g->iters) : ms;
}

#define RMS_ROWS_PER_BLOCK 16

/* The reference: the worker's own RMSNorm (worker/model/rmsnorm.c). r[i] is
 * its cache's rstd; dg is added to. Returns 0 or -ENOMEM. */
static int rmsnorm_ref(const float *x, const float *g, const float *dy, int n, int d, float *y,
                       float *r, float *dx, float *dg)
{
    struct wk_rmsnorm nm;
    struct wk_rmsnorm_cache c;
    int rc;

    if ((rc = wk_rmsnorm_init(&nm, d)) < 0)
        return rc;
    if ((rc = wk_rmsnorm_cache_init(&c, n)) < 0) {
        wk_rmsnorm_free(&nm);
        return rc;
    }
    memcpy(nm.g.data, g, (size_t)d * sizeof(float));
    memcpy(nm.dg.data, dg, (size_t)d * sizeof(float));
    if ((rc = wk_rmsnorm_forward(&nm, &c, x, y, n)) == 0) {
        wk_rmsnorm_backward(&nm, &c, x, dy, dx, n);
        memcpy(r, c.rstd.data, (size_t)n * sizeof(float));
        memcpy(dg, nm.dg.data, (size_t)d * sizeof(float));
    }
    wk_rmsnorm_cache_free(&c);
    wk_rmsnorm_free(&nm);
    return rc;
}

/* g random and dg starting random, so the kernels' += shows. */
static void check_rmsnorm(struct gc *g, int n, int d, const char *name)
{
    struct ck k = {.g = g};
    const size_t nd = (size_t)n * d;
    const int parts = (n + RMS_ROWS_PER_BLOCK - 1) / RMS_ROWS_PER_BLOCK;
    float *x = host(&k, nd * 4), *gam = host(&k, (size_t)d * 4), *dy = host(&k, nd * 4);
    float *dg0 = host(&k, (size_t)d * 4), *y = host(&k, nd * 4), *y_d = host(&k, nd * 4);
    float *r = host(&k, (size_t)n * 4), *r_d = host(&k, (size_t)n * 4);
    float *dx = host(&k, nd * 4), *dx_d = host(&k, nd * 4);
    float *dg = host(&k, (size_t)d * 4), *dg_d = host(&k, (size_t)d * 4);
    char why[512] = "", shape[64];
    double ms, ms2;
    int ok;

    snprintf(shape, sizeof(shape), "%s n=%d d=%d", name, n, d);
    if (k.rc == 0) {
        fill(g, x, nd, -3.0f, 3.0f);
        fill(g, gam, (size_t)d, 0.5f, 1.5f);
        fill(g, dy, nd, -1.0f, 1.0f);
        fill(g, dg0, (size_t)d, -1.0f, 1.0f);
        memcpy(dg, dg0, (size_t)d * 4);
        if (rmsnorm_ref(x, gam, dy, n, d, y, r, dx, dg) < 0)
            k.rc = -ENOMEM;
    }
    wk_cuda_ptr d_x = dev(&k, nd * 4, x), d_g = dev(&k, (size_t)d * 4, gam);
    wk_cuda_ptr d_y = dev(&k, nd * 4, NULL), d_r = dev(&k, (size_t)n * 4, NULL);
    int nn = n, dd = d, rpb = RMS_ROWS_PER_BLOCK, pp = parts;
    float eps = WK_RMSNORM_EPS;
    {
        void *args[] = {&d_x, &d_g, &nn, &dd, &eps, &d_y, &d_r};
        ms = launch(&k, g->rms_fwd, row_grid(g, n), 0, args, 1);
        download(&k, y_d, d_y, nd * 4);
        download(&k, r_d, d_r, (size_t)n * 4);
        ok = k.rc == 0;
        if (ok) {
            ok = compare_rel(&k, "y", y_d, y, nd, 1e-5, why, sizeof(why));
            ok &= compare_rel(&k, "rstd", r_d, r, (size_t)n, 1e-5, why, sizeof(why));
        }
        ms = retime(&k, ok, g->rms_fwd, row_grid(g, n), args, ms);
        finish(&k, "rmsnorm_fwd", shape, ok, why, ms, gbs_of(2.0 * (double)nd * 4, ms));
    }
    /* backward from the reference rstd; dg partials per 16-row block, then
     * summed in block order into dg by dx_rmsnorm_dg */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_r, r, (size_t)n * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    wk_cuda_ptr d_dy = dev(&k, nd * 4, dy), d_dx = dev(&k, nd * 4, NULL);
    wk_cuda_ptr d_part = dev(&k, (size_t)parts * d * 4, NULL);
    wk_cuda_ptr d_dg = dev(&k, (size_t)d * 4, dg0);
    {
        void *args[] = {&d_x, &d_g, &d_dy, &d_r, &nn, &dd, &rpb, &d_dx, &d_part};
        void *args2[] = {&d_part, &pp, &dd, &d_dg};
        ms = launch(&k, g->rms_bwd, (unsigned)parts, 0, args, 1);
        ms2 = launch(&k, g->rms_dg, elem_grid(g, (size_t)d), 0, args2, 1);
        download(&k, dx_d, d_dx, nd * 4);
        download(&k, dg_d, d_dg, (size_t)d * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = compare_rel(&k, "dx", dx_d, dx, nd, 1e-5, why, sizeof(why));
            /* the worker's dg is a float += over the n rows in order: a
             * random walk of n half-ulp roundings of the running sum that
             * grows as sqrt(n) (emulated on the CPU at n = 4096, d = 7168:
             * 4.6e-6 from the exact sum, 5.1e-6 from the blocked order);
             * 1e-4 leaves room for larger n, the kernels' blocked sum being
             * the more exact one */
            ok &= compare_rel(&k, "dg", dg_d, dg, (size_t)d, 1e-4, why, sizeof(why));
        }
        ms += ms2;
        finish(&k, "rmsnorm_bwd+dg", shape, ok, why, ms, gbs_of(4.0 * (double)nd * 4, ms));
    }
    ck_done(&k);
}

static float swiglu_sigmoid(float z)
{
    return 1.0f / (1.0f + expf(-z));
}

/* The reference is worker/model/moe.c's elementwise SwiGLU loops
 * (wk_moe_ffn_forward / _backward_input; static there), repeated here in
 * the same order: act = h1 s h3; dh3 = da h1 s, dh1 = da h3 s (1 + h1 (1 - s)). */
static void check_swiglu(struct gc *g, int rows, int hidden, const char *name)
{
    struct ck k = {.g = g};
    const size_t n = (size_t)rows * hidden;
    float *h1 = host(&k, n * 4), *h3 = host(&k, n * 4), *da = host(&k, n * 4);
    float *act = host(&k, n * 4), *act_d = host(&k, n * 4);
    float *dh1 = host(&k, n * 4), *dh1_d = host(&k, n * 4);
    float *dh3 = host(&k, n * 4), *dh3_d = host(&k, n * 4);
    char why[512] = "", shape[64];
    long long cnt = (long long)n;
    unsigned grid = elem_grid(g, n);
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s rows=%d hidden=%d", name, rows, hidden);
    if (k.rc == 0) {
        fill(g, h1, n, -6.0f, 6.0f);
        fill(g, h3, n, -3.0f, 3.0f);
        fill(g, da, n, -1.0f, 1.0f);
        for (size_t i = 0; i < n; i++) {
            float z = h1[i], sg = swiglu_sigmoid(z);
            act[i] = z * sg * h3[i];
            dh3[i] = da[i] * z * sg;
            dh1[i] = da[i] * h3[i] * sg * (1.0f + z * (1.0f - sg));
        }
    }
    wk_cuda_ptr d_h1 = dev(&k, n * 4, h1), d_h3 = dev(&k, n * 4, h3), d_da = dev(&k, n * 4, da);
    wk_cuda_ptr d_act = dev(&k, n * 4, NULL), d_dh1 = dev(&k, n * 4, NULL);
    wk_cuda_ptr d_dh3 = dev(&k, n * 4, NULL);
    {
        void *args[] = {&d_h1, &d_h3, &cnt, &d_act};
        ms = launch(&k, g->swi_fwd, grid, 0, args, 1);
        download(&k, act_d, d_act, n * 4);
        ok = k.rc == 0 && compare_rel(&k, "act", act_d, act, n, 1e-6, why, sizeof(why));
        ms = retime(&k, ok, g->swi_fwd, grid, args, ms);
        finish(&k, "swiglu_fwd", shape, ok, why, ms, gbs_of(3.0 * (double)n * 4, ms));
    }
    {
        void *args[] = {&d_h1, &d_h3, &d_da, &cnt, &d_dh1, &d_dh3};
        ms = launch(&k, g->swi_bwd, grid, 0, args, 1);
        download(&k, dh1_d, d_dh1, n * 4);
        download(&k, dh3_d, d_dh3, n * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = compare_rel(&k, "dh1", dh1_d, dh1, n, 1e-6, why, sizeof(why));
            ok &= compare_rel(&k, "dh3", dh3_d, dh3, n, 1e-6, why, sizeof(why));
        }
        ms = retime(&k, ok, g->swi_bwd, grid, args, ms);
        finish(&k, "swiglu_bwd", shape, ok, why, ms, gbs_of(5.0 * (double)n * 4, ms));
    }
    ck_done(&k);
}

/* worker/model/head.c's softmax cross-entropy from the logits (there it
 * follows the projection inside wk_head_forward), repeated in its order;
 * also keeps each row's loss. The mean loss. */
static float xent_ref(const float *logits, const int32_t *t, int n, int vocab, float *probs,
                      float *loss_rows)
{
    double total = 0.0;

    if (n <= 0 || vocab <= 0)
        return NAN; /* head.c: -EINVAL */
    for (int i = 0; i < n; i++) {
        float *row = probs + (size_t)i * vocab;
        const float *zi = logits + (size_t)i * vocab;

        for (int j = 0; j < vocab; j++)
            row[j] = zi[j];
        float max = zi[0]; /* row[0] */

        for (int j = 1; j < vocab; j++)
            if (row[j] > max)
                max = row[j];
        if (t[i] < 0 || t[i] >= vocab)
            return NAN; /* head.c: -EINVAL */
        const double zt = (double)zi[t[i]] - max;
        row[0] = expf(row[0] - max);
        double sum = row[0];
        for (int j = 1; j < vocab; j++) {
            row[j] = expf(row[j] - max);
            sum += row[j];
        }
        loss_rows[i] = (float)(log(sum) - zt);
        total += log(sum) - zt;
        const float inv = (float)(1.0 / sum);
        for (int j = 0; j < vocab; j++)
            row[j] *= inv;
    }
    return (float)(total / n);
}

/* head.c's wk_head_backward_input before its GEMM: dlogits = (p - onehot) / n */
static void xent_bwd_ref(const float *probs, const int32_t *t, int n, int vocab, float *dl)
{
    const float inv_n = 1.0f / (float)n;

    for (int i = 0; i < n; i++) {
        const float *p = probs + (size_t)i * vocab;
        float *gi = dl + (size_t)i * vocab;

        for (int j = 0; j < vocab; j++)
            gi[j] = p[j] * inv_n;
        gi[t[i]] -= inv_n;
    }
}

static void check_xent(struct gc *g, int n, int vocab, const char *name)
{
    struct ck k = {.g = g};
    const size_t nv = (size_t)n * vocab;
    float *z = host(&k, nv * 4), *p = host(&k, nv * 4), *p_d = host(&k, nv * 4);
    float *l = host(&k, (size_t)n * 4), *l_d = host(&k, (size_t)n * 4);
    float *dl = host(&k, nv * 4), *dl_d = host(&k, nv * 4);
    int32_t *t = host(&k, (size_t)n * 4);
    char why[512] = "", shape[64];
    float mean = 0.0f, mean_d;
    double ms, total = 0.0;
    int ok;

    snprintf(shape, sizeof(shape), "%s n=%d vocab=%d", name, n, vocab);
    if (k.rc == 0) {
        fill(g, z, nv, -8.0f, 8.0f);
        for (int i = 0; i < n; i++)
            t[i] = (int32_t)(next_u64(g) % (uint64_t)vocab);
        mean = xent_ref(z, t, n, vocab, p, l);
        xent_bwd_ref(p, t, n, vocab, dl);
    }
    wk_cuda_ptr d_z = dev(&k, nv * 4, z), d_t = dev(&k, (size_t)n * 4, t);
    wk_cuda_ptr d_p = dev(&k, nv * 4, NULL), d_l = dev(&k, (size_t)n * 4, NULL);
    wk_cuda_ptr d_dl = dev(&k, nv * 4, NULL);
    int nn = n, vv = vocab;
    {
        void *args[] = {&d_z, &d_t, &nn, &vv, &d_p, &d_l};
        ms = launch(&k, g->sx_fwd, row_grid(g, n), 0, args, 1);
        download(&k, p_d, d_p, nv * 4);
        download(&k, l_d, d_l, (size_t)n * 4);
        ok = k.rc == 0;
        if (ok) {
            /* the mean over rows is the host's: head.c's double total / n */
            for (int i = 0; i < n; i++)
                total += l_d[i];
            mean_d = (float)(total / n);
            ok = compare_rel(&k, "probs", p_d, p, nv, 1e-5, why, sizeof(why));
            ok &= compare_rel(&k, "loss_row", l_d, l, (size_t)n, 1e-5, why, sizeof(why));
            ok &= compare_rel(&k, "loss", &mean_d, &mean, 1, 1e-5, why, sizeof(why));
        }
        ms = retime(&k, ok, g->sx_fwd, row_grid(g, n), args, ms);
        finish(&k, "softmax_xent_fwd", shape, ok, why, ms, gbs_of(2.0 * (double)nv * 4, ms));
    }
    /* backward from the reference probabilities: bitwise */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_p, p, nv * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    {
        void *args[] = {&d_p, &d_t, &nn, &vv, &d_dl};
        ms = launch(&k, g->sx_bwd, row_grid(g, n), 0, args, 1);
        download(&k, dl_d, d_dl, nv * 4);
        why[0] = '\0';
        ok = k.rc == 0 && compare(&k, "dlogits", dl_d, dl, nv, 4, 1, why, sizeof(why));
        ms = retime(&k, ok, g->sx_bwd, row_grid(g, n), args, ms);
        finish(&k, "softmax_xent_bwd", shape, ok, why, ms, gbs_of(2.0 * (double)nv * 4, ms));
    }
    ck_done(&k);
}

/* --- the ceiling: a device-to-device copy ----------------------------------- */

static void time_copy(struct gc *g, size_t bytes, const char *shape)
{
    struct ck k = {.g = g};
    wk_cuda_ptr a = dev(&k, bytes, NULL), b = dev(&k, bytes, NULL);
    wk_cuda_event start = NULL, end = NULL;
    float ms = -1.0f;
    double per = -1.0;

    if (k.rc == 0) {
        if (wk_cuda_event_create(g->c, &start) < 0 || wk_cuda_event_create(g->c, &end) < 0 ||
            wk_cuda_copy(g->c, b, a, bytes) < 0 || wk_cuda_event_record(g->c, start) < 0)
            goto fail;
        for (int i = 0; i < g->iters; i++)
            if (wk_cuda_copy(g->c, b, a, bytes) < 0)
                goto fail;
        if (wk_cuda_event_record(g->c, end) < 0 || wk_cuda_event_elapsed(g->c, start, end, &ms) < 0)
            goto fail;
        per = (double)ms / g->iters;
        g->copy_gbs = gbs_of(2.0 * (double)bytes, per);
    }
    goto done;
fail:
    ck_fail(&k, wk_cuda_error(g->c));
done:
    wk_cuda_event_destroy(g->c, start);
    wk_cuda_event_destroy(g->c, end);
    if (k.rc < 0) {
        fprintf(stderr, "duplex-gpucheck: copy %s: %s\n", shape, k.err);
        g->failed++;
    }
    add_row(g, "copy DtoD (ceiling)", shape, k.rc < 0 ? "FAIL" : "-", per,
            k.rc < 0 ? -1.0 : g->copy_gbs);
    ck_done(&k);
}

/* --- setup ------------------------------------------------------------------- */

/* Loads a module from its cubin, or from its PTX (JIT) with a warning. */
static int load(struct gc *g, const char *name, const unsigned char *cubin, size_t cubin_len,
                const unsigned char *ptx, wk_cuda_module *mod)
{
    if (cubin_len && wk_cuda_module_load(g->c, cubin, mod) == 0) {
        printf("  %-9s cubin (%zu bytes)\n", name, cubin_len);
        return 0;
    }
    fprintf(stderr, "duplex-gpucheck: warning: %s cubin does not load (%s); JIT from PTX\n", name,
            wk_cuda_error(g->c));
    if (wk_cuda_module_load(g->c, ptx, mod) < 0) {
        fprintf(stderr, "duplex-gpucheck: %s PTX does not load either: %s\n", name,
                wk_cuda_error(g->c));
        return -EIO;
    }
    printf("  %-9s PTX (JIT)\n", name);
    return 0;
}

static int setup(struct gc *g)
{
    struct {
        wk_cuda_function_t *fn;
        int mod;
        const char *name;
    } fns[] = {
        {&g->route, 0, "dx_route_topk"},         {&g->count, 1, "dx_dispatch_count"},
        {&g->offsets, 1, "dx_dispatch_offsets"}, {&g->rows, 1, "dx_dispatch_rows"},
        {&g->pack, 1, "dx_dispatch_pack"},       {&g->combine, 1, "dx_combine"},
        {&g->quant, 2, "dx_fp8_quant_1x128"},    {&g->dequant, 2, "dx_fp8_dequant_1x128"},
        {&g->rms_fwd, 3, "dx_rmsnorm_fwd"},      {&g->rms_bwd, 3, "dx_rmsnorm_bwd"},
        {&g->rms_dg, 3, "dx_rmsnorm_dg"},        {&g->swi_fwd, 3, "dx_swiglu_fwd"},
        {&g->swi_bwd, 3, "dx_swiglu_bwd"},       {&g->sx_fwd, 3, "dx_softmax_xent_fwd"},
        {&g->sx_bwd, 3, "dx_softmax_xent_bwd"},
    };

    if (load(g, "routing", dx_kernel_routing_cubin, dx_kernel_routing_cubin_len,
             dx_kernel_routing_ptx, &g->mod[0]) < 0 ||
        load(g, "dispatch", dx_kernel_dispatch_cubin, dx_kernel_dispatch_cubin_len,
             dx_kernel_dispatch_ptx, &g->mod[1]) < 0 ||
        load(g, "fp8", dx_kernel_fp8_cubin, dx_kernel_fp8_cubin_len, dx_kernel_fp8_ptx,
             &g->mod[2]) < 0 ||
        load(g, "elementwise", dx_kernel_elementwise_cubin, dx_kernel_elementwise_cubin_len,
             dx_kernel_elementwise_ptx, &g->mod[3]) < 0)
        return -EIO;
    for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
        if (wk_cuda_function(g->c, g->mod[fns[i].mod], fns[i].name, fns[i].fn) < 0) {
            fprintf(stderr, "duplex-gpucheck: %s\n", wk_cuda_error(g->c));
            return -EIO;
        }
    }
    return 0;
}

static void print_table(const struct gc *g)
{
    printf("\n%-19s %-40s %-16s %9s %8s %6s\n", "check", "shape", "result", "time ms", "GB/s",
           "% copy");
    for (int i = 0; i < g->nrows; i++) {
        const struct row *r = &g->rows_[i];
        char ms[16] = "-", gbs[16] = "-", pct[16] = "-";

        if (r->ms >= 0.0)
            snprintf(ms, sizeof(ms), "%.4f", r->ms);
        if (r->gbs >= 0.0)
            snprintf(gbs, sizeof(gbs), "%.1f", r->gbs);
        if (r->gbs >= 0.0 && g->copy_gbs > 0.0)
            snprintf(pct, sizeof(pct), "%.0f%%", 100.0 * r->gbs / g->copy_gbs);
        printf("%-19s %-40s %-16s %9s %8s %6s\n", r->check, r->shape, r->result, ms, gbs, pct);
    }
    printf("\n%d check%s failed; bounds: int32 exact, fp32 bitwise (0 ulp), e4m3 codes exact;\n"
           "elementwise: rel err (|want| floored at its RMS) <= 1e-5 rmsnorm / softmax, 1e-4\n"
           "rmsnorm dg, 1e-6 swiglu, softmax_xent_bwd bitwise\n",
           g->failed, g->failed == 1 ? "" : "s");
}

static void usage(FILE *f)
{
    fprintf(f, "usage: duplex-gpucheck [--seed N] [--iters N] [--small] [--device N]\n"
               "                       [--cuda-lib PATH]\n"
               "Checks every CUDA kernel against its CPU reference, times pack and combine.\n"
               "Exit 0: all pass; 1: a check failed; 2: the GPU stack cannot be used.\n");
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"seed", required_argument, NULL, 's'},
        {"iters", required_argument, NULL, 'i'},
        {"small", no_argument, NULL, 'q'},
        {"device", required_argument, NULL, 'd'},
        {"cuda-lib", required_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct wk_cuda_paths paths = {.driver_only = 1};
    static struct gc g;
    uint64_t seed = DEFAULT_SEED;
    int opt, small = 0, device = 0, major = 0, minor = 0, sms = 0, rc = 2;
    char err[1024];
    const struct route_shape shapes[] = {
        {37, 16, 4, 2, 4, 4, 130, 0, "n=37 E=16 G=4/2 k=4"},
        {64, 16, 4, 2, 4, 4, 64, 1, "n=64 E=16 G=4/2 k=4 ties"},
        {300, 64, 1, 1, 6, 8, 256, 0, "n=300 E=64 G=1 k=6"},
        {4096, 256, 8, 4, 8, 8, 7168, 0, "n=4096 E=256 G=8/4 k=8"},
    };
    const int nshapes = (int)(sizeof(shapes) / sizeof(shapes[0]));

    setvbuf(stdout, NULL, _IOLBF, 0); /* in order with stderr through a pipe */
    g.iters = DEFAULT_ITERS;
    while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (opt) {
        case 's':
            seed = strtoull(optarg, NULL, 0);
            break;
        case 'i':
            g.iters = atoi(optarg);
            if (g.iters < 1)
                g.iters = 1;
            break;
        case 'q':
            small = 1;
            break;
        case 'd':
            device = atoi(optarg);
            break;
        case 'c':
            paths.cuda = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    g.rng = seed;
    printf("duplex-gpucheck: seed %" PRIu64 " (--seed to repeat)\n", seed);
    if (wk_cuda_open(&paths, &g.c, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplex-gpucheck: %s\n", err);
        return 2;
    }
    if (wk_cuda_context(g.c, device) < 0 || wk_cuda_device_info(g.c, &major, &minor, &sms) < 0) {
        fprintf(stderr, "duplex-gpucheck: %s\n", wk_cuda_error(g.c));
        goto out;
    }
    g.sms = sms > 0 ? (unsigned)sms : 1;
    printf("duplex-gpucheck: %s; device %d: sm_%d%d, %d SMs\n", wk_cuda_describe(g.c), device,
           major, minor, sms);
    if (setup(&g) < 0)
        goto out;
    time_copy(&g, (size_t)4096 * 8 * 7168 * 4, "939 MB");
    for (int i = 0; i < nshapes; i++) {
        const struct route_shape *s = &shapes[i];

        if (small && s->n > 1024)
            continue;
        printf("  checking %s\n", s->name);
        fflush(stdout);
        check_route(&g, s);
        check_dispatch(&g, s, i == 0);
    }
    check_fp8(&g, 37, 301, "small");
    check_fp8(&g, 5, 100, "short");
    if (!small)
        check_fp8(&g, 4096, 7168, "V3");
    check_rmsnorm(&g, 37, 130, "small");
    check_swiglu(&g, 37, 130, "small");
    check_xent(&g, 1024, 256, "bytes");
    check_xent(&g, 5, 1000, "short");
    if (!small) {
        check_rmsnorm(&g, 4096, 7168, "V3");
        check_swiglu(&g, 4096, 2048, "V3");
        check_xent(&g, 1024, 32000, "vocab");
    }
    print_table(&g);
    rc = g.failed ? 1 : 0;
out:
    for (int i = 0; i < 4; i++)
        wk_cuda_module_unload(g.c, g.mod[i]);
    wk_cuda_close(g.c);
    return rc;
}
