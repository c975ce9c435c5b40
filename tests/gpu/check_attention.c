/* check_attention.c - duplex-gpucheck's checks of the causal attention
 * kernels (kernels/attention.cu: dx_attn_fwd, dx_attn_bwd_dq,
 * dx_attn_bwd_dkdv) against the worker's own layer, wk_attn_core_forward /
 * wk_attn_core_backward (worker/model/attention.h), on random q, k, v, dctx
 * uniform in [-1, 1). The backward kernels get the reference's p, so each
 * kernel is measured on its own. Outputs are poisoned (0xff) first; every
 * kernel is launched a second time and must give bitwise the same results
 * (no atomics, fixed orders).
 *
 * Bounds: err = |got - want| / max(|want|, rms(want)) (gpucheck.h). Both
 * sides take dot products and sums over keys / queries in float, in
 * different orders (the reference's sgemm blocks them, the kernels chain
 * fmaf in index order); the softmax sum and rowsum(p dP) are double on both
 * sides, so they agree to the last bit but for their inputs.
 *  - p: p_ij = exp(s_ij - m_i) / sum, so its relative error is the absolute
 *    error of s_ij - m_i plus that of log(sum) (about the same, averaged),
 *    plus expf (CUDA <= 2 ulp, glibc <= 1 ulp: 1.8e-7). s = scale * q.k over
 *    dh terms, |q.k| ~ sqrt(dh)/3: rounding error about sqrt(dh/2) u |q.k|
 *    scale ~ 1e-7 per side at dh 64 (u = 2^-24 = 6e-8), so ~5e-7 in all;
 *    the worst case (dh u sum|q k| scale per side, twice) is 3e-5 at dh 64.
 *    Bound 2e-5: ~40x the expected, under the worst case.
 *  - ctx = p v, dv = p^T dctx, dq = dS k, dk = dS^T q: sums of up to seq
 *    terms of both signs, so the result is ~sqrt(n) terms in size and a
 *    float sum's error relative to it is ~sqrt(n/2) u = 1.3e-6 at n = 1024
 *    per side; p's error (ctx only, <= 2e-5 relative per term, random) and
 *    dS's (dP = dctx . v over dh, ~1e-7 relative) average down the same way.
 *    The floor at the array's RMS covers elements a sum cancels to ~0. The
 *    worst case (n u sum|terms| / rms) is ~1e-3 at n = 1024. Bound 2e-4:
 *    ~40-100x the expected, under the worst case.
 * A kernel that skips or misplaces an element is off by O(1) (or NaN from
 * the poison) and fails any of these. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/gpu/gpucheck.h"
#include "worker/model/attention.h"

GC_IMAGE(attention);

/* kernels/attention.cu's launch contract */
#define ATTN_TILE 32
#define ATTN_MAX_DH 128
#define ATTN_DEFAULT_SHARED (48u * 1024u)

#define ATTN_BOUND_P 2e-5
#define ATTN_BOUND_SUM 2e-4

static struct {
    int loaded; /* 1: loaded, -1: failed */
    wk_cuda_function_t fwd, dq, dkdv;
} af;

struct attn_shape {
    int batch, seq, d, heads;
    int timed; /* time every kernel over g->iters launches */
};

/* dynamic shared memory of each kernel, in bytes (attention.cu's header) */
static unsigned attn_stride(int dh)
{
    return (unsigned)(dh | 1);
}

static unsigned attn_shared_fwd(int dh)
{
    return 2u * ATTN_TILE * attn_stride(dh) * 4u;
}

static unsigned attn_shared_dq(int dh)
{
    return 3u * ATTN_TILE * attn_stride(dh) * 4u;
}

static unsigned attn_shared_dkdv(int dh)
{
    return (3u * ATTN_TILE * attn_stride(dh) + ATTN_TILE * (ATTN_TILE + 1) + ATTN_TILE) * 4u;
}

static int attn_load(struct gc *g)
{
    static const char *const names[] = {"dx_attn_fwd", "dx_attn_bwd_dq", "dx_attn_bwd_dkdv"};
    wk_cuda_function_t *const fns[] = {&af.fwd, &af.dq, &af.dkdv};
    wk_cuda_module mod;

    if (af.loaded == 0) {
        af.loaded = -1;
        if (GC_MODULE(g, attention, &mod) == 0 && gc_functions(g, mod, names, fns, 3) == 0)
            af.loaded = 1;
    }
    return af.loaded == 1 ? 0 : -EIO;
}

/* Lets fn use bytes of dynamic shared memory (the default stops at 48 KiB). */
static void attn_allow_shared(struct ck *k, wk_cuda_function_t fn, unsigned bytes)
{
    if (k->rc == 0 && bytes > ATTN_DEFAULT_SHARED &&
        wk_cuda_function_shared(k->g->c, fn, bytes) < 0)
        ck_fail(k, wk_cuda_error(k->g->c));
}

/* Launches fn once more and downloads n floats of out into again; then the
 * bitwise comparison with first (fixed orders: the same bits every run). */
static int attn_rerun_equal(struct ck *k, wk_cuda_function_t fn, unsigned grid, unsigned shmem,
                            void **args, const char *name, wk_cuda_ptr out, const float *first,
                            float *again, size_t n, char *why, size_t whylen)
{
    char label[48];

    ck_launch(k, fn, grid, shmem, args, 1);
    ck_download(k, again, out, n * 4);
    if (k->rc < 0)
        return 0;
    snprintf(label, sizeof(label), "%s rerun", name);
    return ck_compare(k, label, again, first, n, 4, 1, why, whylen);
}

static void check_attn_shape(struct gc *g, const struct attn_shape *s)
{
    struct ck k = {.g = g};
    const int batch = s->batch, seq = s->seq, d = s->d, heads = s->heads, dh = d / heads;
    const int tiles = (seq + ATTN_TILE - 1) / ATTN_TILE;
    const unsigned grid = (unsigned)(batch * heads * tiles);
    const size_t nd = (size_t)batch * seq * d, np = (size_t)batch * heads * seq * seq;
    const size_t nrow = (size_t)batch * heads * seq;
    const unsigned sh_fwd = attn_shared_fwd(dh), sh_dq = attn_shared_dq(dh);
    const unsigned sh_dkdv = attn_shared_dkdv(dh);
    /* the bytes each kernel must move at least: operands read once, outputs
     * written once; p whole for fwd, its lower triangle for backward */
    const double tri = (double)batch * heads * seq * (seq + 1) / 2.0 * 4.0, mat = (double)nd * 4.0;
    const double bytes_fwd = 4.0 * mat + (double)np * 4.0;
    const double bytes_dq = 4.0 * mat + tri + (double)nrow * 4.0;
    const double bytes_dkdv = 5.0 * mat + tri + (double)nrow * 4.0;
    float *q, *kk, *v, *dctx, *p_ref, *ctx_ref, *dq_ref, *dk_ref, *dv_ref, *scratch;
    float *p_got, *ctx_got, *dq_got, *dk_got, *dv_got, *again;
    wk_cuda_ptr d_q, d_k, d_v, d_dctx, d_pref, d_p, d_ctx, d_dq, d_dk, d_dv, d_rowdot;
    char shape[64], why[512] = "";
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "b%d s%d d%d h%d (dh %d)", batch, seq, d, heads, dh);
    if (d % heads != 0 || dh > ATTN_MAX_DH) {
        gc_add_row(g, "attn", shape, "SKIP (dh)", -1.0, -1.0);
        return;
    }
    if (attn_load(g) < 0) {
        ck_fail(&k, "the attention module or its functions do not load");
        ck_finish(&k, "attn_fwd", shape, 0, "", -1.0, -1.0);
        return;
    }
    q = ck_host(&k, nd * 4);
    kk = ck_host(&k, nd * 4);
    v = ck_host(&k, nd * 4);
    dctx = ck_host(&k, nd * 4);
    p_ref = ck_host(&k, np * 4);
    ctx_ref = ck_host(&k, nd * 4);
    dq_ref = ck_host(&k, nd * 4);
    dk_ref = ck_host(&k, nd * 4);
    dv_ref = ck_host(&k, nd * 4);
    scratch = ck_host(&k, (size_t)seq * seq * 4);
    p_got = ck_host(&k, np * 4);
    ctx_got = ck_host(&k, nd * 4);
    dq_got = ck_host(&k, nd * 4);
    dk_got = ck_host(&k, nd * 4);
    dv_got = ck_host(&k, nd * 4);
    again = ck_host(&k, (np > nd ? np : nd) * 4);
    if (k.rc == 0) {
        gc_fill(g, q, nd, -1.0f, 1.0f);
        gc_fill(g, kk, nd, -1.0f, 1.0f);
        gc_fill(g, v, nd, -1.0f, 1.0f);
        gc_fill(g, dctx, nd, -1.0f, 1.0f);
        wk_attn_core_forward(batch, seq, d, heads, q, kk, v, p_ref, ctx_ref);
        wk_attn_core_backward(batch, seq, d, heads, q, kk, v, p_ref, dctx, dq_ref, dk_ref, dv_ref,
                              scratch);
    }
    d_q = ck_dev(&k, nd * 4, q);
    d_k = ck_dev(&k, nd * 4, kk);
    d_v = ck_dev(&k, nd * 4, v);
    d_dctx = ck_dev(&k, nd * 4, dctx);
    d_pref = ck_dev(&k, np * 4, p_ref);
    d_p = ck_dev(&k, np * 4, NULL);
    d_ctx = ck_dev(&k, nd * 4, NULL);
    d_dq = ck_dev(&k, nd * 4, NULL);
    d_dk = ck_dev(&k, nd * 4, NULL);
    d_dv = ck_dev(&k, nd * 4, NULL);
    d_rowdot = ck_dev(&k, nrow * 4, NULL);
    attn_allow_shared(&k, af.fwd, sh_fwd);
    attn_allow_shared(&k, af.dq, sh_dq);
    attn_allow_shared(&k, af.dkdv, sh_dkdv);

    /* forward */
    {
        void *args[] = {&d_q,       &d_k,           &d_v, (void *)&batch, (void *)&seq,
                        (void *)&d, (void *)&heads, &d_p, &d_ctx};

        ms = ck_launch(&k, af.fwd, grid, sh_fwd, args, 1);
        ck_download(&k, p_got, d_p, np * 4);
        ck_download(&k, ctx_got, d_ctx, nd * 4);
        /* p and ctx in rows of their own: each row shows its own bound */
        ok = 0;
        if (k.rc == 0) {
            ok = ck_compare_rel(&k, "p", p_got, p_ref, np, ATTN_BOUND_P, why, sizeof(why));
            ok &= attn_rerun_equal(&k, af.fwd, grid, sh_fwd, args, "p", d_p, p_got, again, np, why,
                                   sizeof(why));
        }
        if (ok && s->timed)
            ms = ck_launch(&k, af.fwd, grid, sh_fwd, args, g->iters);
        ck_finish(&k, "attn_fwd p", shape, ok, why, ms, s->timed ? gc_gbs(bytes_fwd, ms) : -1.0);

        why[0] = '\0';
        ok = 0;
        ck_download(&k, again, d_ctx, nd * 4); /* after the reruns */
        if (k.rc == 0) {
            ok = ck_compare_rel(&k, "ctx", ctx_got, ctx_ref, nd, ATTN_BOUND_SUM, why, sizeof(why));
            ok &= ck_compare(&k, "ctx rerun", again, ctx_got, nd, 4, 1, why, sizeof(why));
        }
        ck_finish(&k, "attn_fwd ctx", shape, ok, why, -1.0, -1.0);
    }

    /* backward, from the reference's p: dq (and rowdot) first, then dk, dv */
    {
        void *args_dq[] = {&d_k,         &d_v,       &d_pref,        &d_dctx, (void *)&batch,
                           (void *)&seq, (void *)&d, (void *)&heads, &d_dq,   &d_rowdot};
        void *args_kv[] = {&d_q,           &d_v,           &d_pref,      &d_dctx,
                           &d_rowdot,      (void *)&batch, (void *)&seq, (void *)&d,
                           (void *)&heads, &d_dk,          &d_dv};
        double ms_kv;

        why[0] = '\0';
        ms = ck_launch(&k, af.dq, grid, sh_dq, args_dq, 1);
        ms_kv = ck_launch(&k, af.dkdv, grid, sh_dkdv, args_kv, 1);
        ck_download(&k, dq_got, d_dq, nd * 4);
        ck_download(&k, dk_got, d_dk, nd * 4);
        ck_download(&k, dv_got, d_dv, nd * 4);
        ok = 0;
        if (k.rc == 0) {
            ok = ck_compare_rel(&k, "dq", dq_got, dq_ref, nd, ATTN_BOUND_SUM, why, sizeof(why));
            ok &= attn_rerun_equal(&k, af.dq, grid, sh_dq, args_dq, "dq", d_dq, dq_got, again, nd,
                                   why, sizeof(why));
        }
        if (ok && s->timed)
            ms = ck_launch(&k, af.dq, grid, sh_dq, args_dq, g->iters);
        ck_finish(&k, "attn_bwd_dq", shape, ok, why, ms, s->timed ? gc_gbs(bytes_dq, ms) : -1.0);

        why[0] = '\0';
        ok = 0;
        if (k.rc == 0) {
            ok = ck_compare_rel(&k, "dk", dk_got, dk_ref, nd, ATTN_BOUND_SUM, why, sizeof(why));
            ok &= ck_compare_rel(&k, "dv", dv_got, dv_ref, nd, ATTN_BOUND_SUM, why, sizeof(why));
            ok &= attn_rerun_equal(&k, af.dkdv, grid, sh_dkdv, args_kv, "dk", d_dk, dk_got, again,
                                   nd, why, sizeof(why));
            ck_download(&k, again, d_dv, nd * 4);
            ok &=
                k.rc == 0 && ck_compare(&k, "dv rerun", again, dv_got, nd, 4, 1, why, sizeof(why));
        }
        if (ok && s->timed)
            ms_kv = ck_launch(&k, af.dkdv, grid, sh_dkdv, args_kv, g->iters);
        ck_finish(&k, "attn_bwd_dkdv", shape, ok, why, ms_kv,
                  s->timed ? gc_gbs(bytes_dkdv, ms_kv) : -1.0);
    }
    ck_done(&k);
}

void gc_check_attention(struct gc *g)
{
    static const struct attn_shape shapes[] = {
        {2, 37, 48, 3, 0},   /* odd: a partial tile, dh 16 (half the lanes idle) */
        {2, 256, 256, 4, 0}, /* seq 256, dh 64 */
    };
    static const struct attn_shape timing = {4, 1024, 1024, 16, 1};

    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        check_attn_shape(g, &shapes[i]);
    if (!g->small)
        check_attn_shape(g, &timing);
}
