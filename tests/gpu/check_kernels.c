/* check_kernels.c - duplex-gpucheck's checks of the routing, dispatch, fp8
 * and elementwise kernels against their CPU references (kernels/ref.h, the
 * worker's layers) on fresh random data, and the device copy that is the
 * bandwidth ceiling of the table.
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
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"
#include "tests/gpu/gpucheck.h"
#include "worker/model/rmsnorm.h"

GC_IMAGE(routing);
GC_IMAGE(dispatch);
GC_IMAGE(fp8);
GC_IMAGE(elementwise);

/* this file's kernels */
static struct {
    wk_cuda_function_t route, count, offsets, rows, pack, combine, quant, dequant, quant_rec,
        dequant_rec;
    wk_cuda_function_t rms_fwd, rms_bwd, rms_dg, swi_fwd, swi_bwd, sx_fwd, sx_bwd;
} kf;

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
            scores[i] = 0.125f * (float)(1 + gc_u64(g) % 7);
        for (int e = 0; e < s->experts; e++)
            bias[e] = 0.0f;
    } else {
        gc_fill(g, scores, all, 0.001f, 0.999f);
        gc_fill(g, bias, (size_t)s->experts, -0.05f, 0.05f);
    }
}

static void check_route(struct gc *g, const struct route_shape *s)
{
    struct ck k = {.g = g};
    struct dx_kref_route_cfg cfg = {s->experts, s->groups, s->limit, s->top_k, 2.5f};
    size_t nk = (size_t)s->n * s->top_k, all = (size_t)s->n * s->experts;
    float *scores = ck_host(&k, all * 4), *bias = ck_host(&k, (size_t)s->experts * 4);
    int *ids = ck_host(&k, nk * 4), *ids_d = ck_host(&k, nk * 4);
    float *gates = ck_host(&k, nk * 4), *gates_d = ck_host(&k, nk * 4);
    int *counts = ck_host(&k, (size_t)s->experts * 4),
        *counts_d = ck_host(&k, (size_t)s->experts * 4);
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
        wk_cuda_ptr d_s = ck_dev(&k, all * 4, scores),
                    d_b = ck_dev(&k, (size_t)s->experts * 4, bias);
        wk_cuda_ptr d_ids = ck_dev(&k, nk * 4, NULL), d_g = ck_dev(&k, nk * 4, NULL);
        wk_cuda_ptr d_c = ck_dev(&k, (size_t)s->experts * 4, NULL);
        int n = s->n, E = s->experts, G = s->groups, lim = s->limit, tk = s->top_k;
        float scale = cfg.route_scale;
        void *args[] = {&d_s, &d_b, &n, &E, &G, &lim, &tk, &scale, &d_ids, &d_g, &d_c};
        unsigned shmem = (GC_BLOCK / 32) * (unsigned)(E + G) * 8;

        if (k.rc == 0 && wk_cuda_memset(g->c, d_c, 0, (size_t)E * 4) < 0)
            ck_fail(&k, wk_cuda_error(g->c));
        ms = ck_launch(&k, kf.route, gc_warp_grid(g, (size_t)n), shmem, args, 1);
        ck_download(&k, ids_d, d_ids, nk * 4);
        ck_download(&k, gates_d, d_g, nk * 4);
        ck_download(&k, counts_d, d_c, (size_t)E * 4);
    }
    if (k.rc == 0) {
        ok = ck_compare(&k, "ids", ids_d, ids, nk, 4, 0, why, sizeof(why));
        ok &= ck_compare(&k, "gates", gates_d, gates, nk, 4, 1, why, sizeof(why));
        ok &=
            ck_compare(&k, "counts", counts_d, counts, (size_t)s->experts, 4, 0, why, sizeof(why));
    }
    ck_finish(&k, "route_topk", s->name, ok, why, ms, -1.0);
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
    float *scores = ck_host(&k, (size_t)n * E * 4), *bias = ck_host(&k, (size_t)E * 4);
    int *ids = ck_host(&k, nk * 4), *owner = ck_host(&k, (size_t)E * 4);
    float *gates = ck_host(&k, nk * 4);
    int *tpe = ck_host(&k, (size_t)E * 4), *tpe_d = ck_host(&k, (size_t)E * 4);
    int *lay = ck_host(&k, (size_t)(2 * E + 2 * R + 2) * 4);
    int *lay_d = ck_host(&k, (size_t)(2 * E + 2 * R + 2) * 4);
    int *stok = ck_host(&k, nk * 4), *stok_d = ck_host(&k, nk * 4), *tslot = ck_host(&k, nk * 4);
    int *tslot_d = ck_host(&k, nk * 4);
    float *sgate = ck_host(&k, nk * 4), *sgate_d = ck_host(&k, nk * 4);
    float *x = ck_host(&k, xd * 4), *send = ck_host(&k, sd * 4), *send_d = ck_host(&k, sd * 4);
    float *base = ck_host(&k, xd * 4), *out = ck_host(&k, xd * 4), *out_d = ck_host(&k, xd * 4);
    float *y = send; /* the experts' outputs: reuses the pack buffer, refilled */
    int *eoff, *rrows, *roff, *eslot;
    char why[512] = "", shape[64];
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s R=%d%s", s->name, R, random_owner ? " rand-own" : "");
    if (k.rc < 0) {
        ck_finish(&k, "dispatch", shape, 0, "", -1.0, -1.0);
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
        ck_finish(&k, "dispatch", shape, 0, "", -1.0, -1.0);
        ck_done(&k);
        return;
    }
    for (int e = 0; e < E; e++)
        owner[e] = random_owner ? (int)(gc_u64(g) % (uint64_t)R) : e / (E / R);
    if (dx_kref_dispatch_count(ids, n, K, E, tpe) < 0 ||
        dx_kref_dispatch_offsets(tpe, owner, E, R, eoff, rrows, roff, eslot) < 0 ||
        dx_kref_dispatch_rows(ids, gates, n, K, E, eslot, stok, sgate, tslot) < 0) {
        ck_fail(&k, "a dispatch reference rejected the shape");
        ck_finish(&k, "dispatch", shape, 0, "", -1.0, -1.0);
        ck_done(&k);
        return;
    }
    gc_fill(g, x, xd, -4.0f, 4.0f);
    dx_kref_dispatch_pack(x, d, stok, rows, send);

    wk_cuda_ptr d_ids = ck_dev(&k, nk * 4, ids), d_gates = ck_dev(&k, nk * 4, gates);
    wk_cuda_ptr d_owner = ck_dev(&k, (size_t)E * 4, owner);
    /* count */
    wk_cuda_ptr d_tpe = ck_dev(&k, (size_t)E * 4, NULL);
    {
        int nn = n, kk = K, ee = E;
        void *args[] = {&d_ids, &nn, &kk, &ee, &d_tpe};
        ms = ck_launch(&k, kf.count, (unsigned)E, 0, args, 1);
        ck_download(&k, tpe_d, d_tpe, (size_t)E * 4);
        why[0] = '\0';
        ok = k.rc == 0 &&
             ck_compare(&k, "tokens_per_expert", tpe_d, tpe, (size_t)E, 4, 0, why, sizeof(why));
        ck_finish(&k, "dispatch_count", shape, ok, why, ms, -1.0);
    }
    /* offsets, from the reference counts */
    wk_cuda_ptr d_lay = ck_dev(&k, (size_t)(2 * E + 2 * R + 2) * 4, NULL);
    if (k.rc == 0 && wk_cuda_upload(g->c, d_tpe, tpe, (size_t)E * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    {
        int ee = E, rr = R;
        wk_cuda_ptr d_eoff = d_lay, d_rrows = d_lay + (size_t)(E + 1) * 4;
        wk_cuda_ptr d_roff = d_rrows + (size_t)R * 4, d_eslot = d_roff + (size_t)(R + 1) * 4;
        void *args[] = {&d_tpe, &d_owner, &ee, &rr, &d_eoff, &d_rrows, &d_roff, &d_eslot};
        ms = ck_launch(&k, kf.offsets, 1, 0, args, 1);
        ck_download(&k, lay_d, d_lay, (size_t)(2 * E + 2 * R + 2) * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok =
                ck_compare(&k, "expert_offset", lay_d, eoff, (size_t)E + 1, 4, 0, why, sizeof(why));
            ok &= ck_compare(&k, "rank_rows", lay_d + E + 1, rrows, (size_t)R, 4, 0, why,
                             sizeof(why));
            ok &= ck_compare(&k, "rank_offset", lay_d + E + 1 + R, roff, (size_t)R + 1, 4, 0, why,
                             sizeof(why));
            ok &= ck_compare(&k, "expert_slot", lay_d + E + 2 + 2 * R, eslot, (size_t)E, 4, 0, why,
                             sizeof(why));
        }
        ck_finish(&k, "dispatch_offsets", shape, ok, why, ms, -1.0);
    }
    /* rows, from the reference slots */
    wk_cuda_ptr d_eslot = ck_dev(&k, (size_t)E * 4, eslot);
    wk_cuda_ptr d_stok = ck_dev(&k, nk * 4, NULL), d_sgate = ck_dev(&k, nk * 4, NULL);
    wk_cuda_ptr d_tslot = ck_dev(&k, nk * 4, NULL);
    {
        int nn = n, kk = K, ee = E;
        void *args[] = {&d_ids, &d_gates, &nn, &kk, &ee, &d_eslot, &d_stok, &d_sgate, &d_tslot};
        ms = ck_launch(&k, kf.rows, (unsigned)E, 0, args, 1);
        ck_download(&k, stok_d, d_stok, nk * 4);
        ck_download(&k, sgate_d, d_sgate, nk * 4);
        ck_download(&k, tslot_d, d_tslot, nk * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = ck_compare(&k, "send_token", stok_d, stok, nk, 4, 0, why, sizeof(why));
            ok &= ck_compare(&k, "send_gate", sgate_d, sgate, nk, 4, 1, why, sizeof(why));
            ok &= ck_compare(&k, "token_slot", tslot_d, tslot, nk, 4, 0, why, sizeof(why));
        }
        ck_finish(&k, "dispatch_rows", shape, ok, why, ms, -1.0);
    }
    /* pack, from the reference rows; then timed */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_stok, stok, nk * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    wk_cuda_ptr d_x = ck_dev(&k, xd * 4, x), d_send = ck_dev(&k, sd * 4, NULL);
    {
        int dd = d, rr = rows;
        void *args[] = {&d_x, &dd, &d_stok, &rr, &d_send};
        unsigned grid = gc_warp_grid(g, (size_t)rows);
        ck_launch(&k, kf.pack, grid, 0, args, 1);
        ck_download(&k, send_d, d_send, sd * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "send", send_d, send, sd, 4, 1, why, sizeof(why));
        ms = ck_launch(&k, kf.pack, grid, 0, args, g->iters);
        ck_finish(&k, "dispatch_pack", shape, ok, why, ms, gc_gbs(2.0 * (double)sd * 4, ms));
    }
    /* combine, with a base, without, and with masked slots (-1: a two-hop
     * relay's choices of another node's experts) */
    gc_fill(g, y, sd, -2.0f, 2.0f);
    gc_fill(g, base, xd, -1.0f, 1.0f);
    if (k.rc == 0 && wk_cuda_upload(g->c, d_send, y, sd * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    if (k.rc == 0 && wk_cuda_upload(g->c, d_tslot, tslot, nk * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    wk_cuda_ptr d_base = ck_dev(&k, xd * 4, base), d_out = ck_dev(&k, xd * 4, NULL);
    for (int variant = 0; variant < 3; variant++) {
        int dd = d, nn = n, kk = K, with_base = variant == 0;
        wk_cuda_ptr b = with_base ? d_base : 0;
        void *args[] = {&d_send, &dd, &d_gates, &d_tslot, &nn, &kk, &b, &d_out};
        unsigned grid = gc_warp_grid(g, (size_t)n);
        char cs[80];

        if (variant == 2) { /* every third choice masked */
            for (size_t c = 0; c < nk; c += 3)
                tslot[c] = -1;
            if (k.rc == 0 && wk_cuda_upload(g->c, d_tslot, tslot, nk * 4) < 0)
                ck_fail(&k, wk_cuda_error(g->c));
        }
        memset(out, GC_POISON, xd * 4);
        dx_kref_combine(y, d, gates, tslot, n, K, with_base ? base : NULL, out);
        if (k.rc == 0 && wk_cuda_memset(g->c, d_out, GC_POISON, xd * 4) < 0)
            ck_fail(&k, wk_cuda_error(g->c));
        ck_launch(&k, kf.combine, grid, 0, args, 1);
        ck_download(&k, out_d, d_out, xd * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "out", out_d, out, xd, 4, 1, why, sizeof(why));
        ms = ck_launch(&k, kf.combine, grid, 0, args, g->iters);
        snprintf(cs, sizeof(cs), "%s%s", shape,
                 variant == 0   ? " +base"
                 : variant == 2 ? " masked"
                                : "");
        ck_finish(&k, "combine", cs, ok, why, ms,
                  gc_gbs(((double)K + 1.0 + with_base) * (double)xd * 4, ms));
    }
    ck_done(&k);
}

/* --- fp8 --------------------------------------------------------------------- */

/* The records (the dispatch payload's wire format) of x: the same codes
 * and scales, padding left alone (poisoned on both sides), and back to xr. */
static void check_fp8_records(struct gc *g, struct ck *k, int nrows, int cols, const float *x,
                              const float *xr, const char *shape)
{
    const size_t pitch = dx_kref_fp8_rec_pitch(cols), bytes = (size_t)nrows * pitch;
    const size_t all = (size_t)nrows * cols;
    uint8_t *rec = ck_host(k, bytes), *rec_d = ck_host(k, bytes);
    float *xr_d = ck_host(k, all * 4);
    wk_cuda_ptr d_x = ck_dev(k, all * 4, x), d_rec = ck_dev(k, bytes, NULL);
    wk_cuda_ptr d_xr = ck_dev(k, all * 4, NULL);
    int rr = nrows, cc = cols, pp = (int)pitch, ok;
    unsigned grid = gc_warp_grid(g, (size_t)nrows * dx_kref_fp8_tiles(cols));
    char why[512] = "";
    double ms;

    if (k->rc == 0) {
        memset(rec, GC_POISON, bytes);
        dx_kref_fp8_quant_rec(x, nrows, cols, rec, (int)pitch);
        if (wk_cuda_memset(g->c, d_rec, GC_POISON, bytes) < 0)
            ck_fail(k, wk_cuda_error(g->c));
    }
    {
        void *args[] = {&d_x, &rr, &cc, &d_rec, &pp};
        ms = ck_launch(k, kf.quant_rec, grid, 0, args, 1);
        ck_download(k, rec_d, d_rec, bytes);
        ok = k->rc == 0 && ck_compare(k, "records", rec_d, rec, bytes, 1, 0, why, sizeof(why));
        ck_finish(k, "fp8_quant_rec", shape, ok, why, ms, gc_gbs((double)all * 4 + bytes, ms));
    }
    if (k->rc == 0 && wk_cuda_upload(g->c, d_rec, rec, bytes) < 0)
        ck_fail(k, wk_cuda_error(g->c));
    {
        void *args[] = {&d_rec, &pp, &rr, &cc, &d_xr};
        ms = ck_launch(k, kf.dequant_rec, grid, 0, args, 1);
        ck_download(k, xr_d, d_xr, all * 4);
        why[0] = '\0';
        ok = k->rc == 0 && ck_compare(k, "x'", xr_d, xr, all, 4, 1, why, sizeof(why));
        ck_finish(k, "fp8_dequant_rec", shape, ok, why, ms, gc_gbs((double)all * 4 + bytes, ms));
    }
}

static void check_fp8(struct gc *g, int nrows, int cols, const char *name)
{
    struct ck k = {.g = g};
    const int tiles = dx_kref_fp8_tiles(cols);
    const size_t all = (size_t)nrows * cols, ns = (size_t)nrows * tiles;
    float *x = ck_host(&k, all * 4), *sc = ck_host(&k, ns * 4), *sc_d = ck_host(&k, ns * 4);
    uint8_t *q = ck_host(&k, all), *q_d = ck_host(&k, all);
    float *xr = ck_host(&k, all * 4), *xr_d = ck_host(&k, all * 4);
    char why[512] = "", shape[64];
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s %dx%d", name, nrows, cols);
    if (k.rc == 0) {
        /* magnitudes over 24 binades (so subnormals and underflow to 0
         * inside a tile), some tiles all zero (scale 1) */
        for (size_t i = 0; i < all; i++) {
            float m = ldexpf(gc_uniform(g, 1.0f, 2.0f), (int)(gc_u64(g) % 24) - 12);
            x[i] = gc_u64(g) & 1 ? m : -m;
        }
        for (int r = 0; r < nrows; r += 7)
            memset(x + (size_t)r * cols, 0, (size_t)(cols < 128 ? cols : 128) * 4);
        dx_kref_fp8_quant(x, nrows, cols, q, sc);
        dx_kref_fp8_dequant(q, sc, nrows, cols, xr);
    }
    wk_cuda_ptr d_x = ck_dev(&k, all * 4, x), d_q = ck_dev(&k, all, NULL),
                d_sc = ck_dev(&k, ns * 4, NULL);
    wk_cuda_ptr d_xr = ck_dev(&k, all * 4, NULL);
    int rr = nrows, cc = cols;
    unsigned grid = gc_warp_grid(g, ns);
    {
        void *args[] = {&d_x, &rr, &cc, &d_q, &d_sc};
        ms = ck_launch(&k, kf.quant, grid, 0, args, 1);
        ck_download(&k, q_d, d_q, all);
        ck_download(&k, sc_d, d_sc, ns * 4);
        ok = k.rc == 0;
        if (ok) {
            ok = ck_compare(&k, "codes", q_d, q, all, 1, 0, why, sizeof(why));
            ok &= ck_compare(&k, "scales", sc_d, sc, ns, 4, 1, why, sizeof(why));
        }
        ck_finish(&k, "fp8_quant_1x128", shape, ok, why, ms,
                  gc_gbs((double)all * 5 + (double)ns * 4, ms));
    }
    /* dequant from the reference codes and scales */
    if (k.rc == 0 &&
        (wk_cuda_upload(g->c, d_q, q, all) < 0 || wk_cuda_upload(g->c, d_sc, sc, ns * 4) < 0))
        ck_fail(&k, wk_cuda_error(g->c));
    {
        void *args[] = {&d_q, &d_sc, &rr, &cc, &d_xr};
        ms = ck_launch(&k, kf.dequant, grid, 0, args, 1);
        ck_download(&k, xr_d, d_xr, all * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "x'", xr_d, xr, all, 4, 1, why, sizeof(why));
        ck_finish(&k, "fp8_dequant_1x128", shape, ok, why, ms,
                  gc_gbs((double)all * 5 + (double)ns * 4, ms));
    }
    check_fp8_records(g, &k, nrows, cols, x, xr, shape);
    ck_done(&k);
}

/* --- elementwise: RMSNorm, SwiGLU, softmax cross-entropy --------------------- */

/* blocks for one block per row (the kernels stride over rows) */
#define RMS_ROWS_PER_GC_BLOCK 16

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
    const int parts = (n + RMS_ROWS_PER_GC_BLOCK - 1) / RMS_ROWS_PER_GC_BLOCK;
    float *x = ck_host(&k, nd * 4), *gam = ck_host(&k, (size_t)d * 4), *dy = ck_host(&k, nd * 4);
    float *dg0 = ck_host(&k, (size_t)d * 4), *y = ck_host(&k, nd * 4), *y_d = ck_host(&k, nd * 4);
    float *r = ck_host(&k, (size_t)n * 4), *r_d = ck_host(&k, (size_t)n * 4);
    float *dx = ck_host(&k, nd * 4), *dx_d = ck_host(&k, nd * 4);
    float *dg = ck_host(&k, (size_t)d * 4), *dg_d = ck_host(&k, (size_t)d * 4);
    char why[512] = "", shape[64];
    double ms, ms2;
    int ok;

    snprintf(shape, sizeof(shape), "%s n=%d d=%d", name, n, d);
    if (k.rc == 0) {
        gc_fill(g, x, nd, -3.0f, 3.0f);
        gc_fill(g, gam, (size_t)d, 0.5f, 1.5f);
        gc_fill(g, dy, nd, -1.0f, 1.0f);
        gc_fill(g, dg0, (size_t)d, -1.0f, 1.0f);
        memcpy(dg, dg0, (size_t)d * 4);
        if (rmsnorm_ref(x, gam, dy, n, d, y, r, dx, dg) < 0)
            k.rc = -ENOMEM;
    }
    wk_cuda_ptr d_x = ck_dev(&k, nd * 4, x), d_g = ck_dev(&k, (size_t)d * 4, gam);
    wk_cuda_ptr d_y = ck_dev(&k, nd * 4, NULL), d_r = ck_dev(&k, (size_t)n * 4, NULL);
    int nn = n, dd = d, rpb = RMS_ROWS_PER_GC_BLOCK, pp = parts;
    float eps = WK_RMSNORM_EPS;
    {
        void *args[] = {&d_x, &d_g, &nn, &dd, &eps, &d_y, &d_r};
        ms = ck_launch(&k, kf.rms_fwd, gc_row_grid(g, n), 0, args, 1);
        ck_download(&k, y_d, d_y, nd * 4);
        ck_download(&k, r_d, d_r, (size_t)n * 4);
        ok = k.rc == 0;
        if (ok) {
            ok = ck_compare_rel(&k, "y", y_d, y, nd, 1e-5, why, sizeof(why));
            ok &= ck_compare_rel(&k, "rstd", r_d, r, (size_t)n, 1e-5, why, sizeof(why));
        }
        ms = ck_retime(&k, ok, kf.rms_fwd, gc_row_grid(g, n), args, ms);
        ck_finish(&k, "rmsnorm_fwd", shape, ok, why, ms, gc_gbs(2.0 * (double)nd * 4, ms));
    }
    /* backward from the reference rstd; dg partials per 16-row block, then
     * summed in block order into dg by dx_rmsnorm_dg */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_r, r, (size_t)n * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    wk_cuda_ptr d_dy = ck_dev(&k, nd * 4, dy), d_dx = ck_dev(&k, nd * 4, NULL);
    wk_cuda_ptr d_part = ck_dev(&k, (size_t)parts * d * 4, NULL);
    wk_cuda_ptr d_dg = ck_dev(&k, (size_t)d * 4, dg0);
    {
        void *args[] = {&d_x, &d_g, &d_dy, &d_r, &nn, &dd, &rpb, &d_dx, &d_part};
        void *args2[] = {&d_part, &pp, &dd, &d_dg};
        ms = ck_launch(&k, kf.rms_bwd, (unsigned)parts, 0, args, 1);
        ms2 = ck_launch(&k, kf.rms_dg, gc_elem_grid(g, (size_t)d), 0, args2, 1);
        ck_download(&k, dx_d, d_dx, nd * 4);
        ck_download(&k, dg_d, d_dg, (size_t)d * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = ck_compare_rel(&k, "dx", dx_d, dx, nd, 1e-5, why, sizeof(why));
            /* the worker's dg is a float += over the n rows in order: a
             * random walk of n half-ulp roundings of the running sum that
             * grows as sqrt(n) (emulated on the CPU at n = 4096, d = 7168:
             * 4.6e-6 from the exact sum, 5.1e-6 from the blocked order);
             * 1e-4 leaves room for larger n, the kernels' blocked sum being
             * the more exact one */
            ok &= ck_compare_rel(&k, "dg", dg_d, dg, (size_t)d, 1e-4, why, sizeof(why));
        }
        ms += ms2;
        ck_finish(&k, "rmsnorm_bwd+dg", shape, ok, why, ms, gc_gbs(4.0 * (double)nd * 4, ms));
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
    float *h1 = ck_host(&k, n * 4), *h3 = ck_host(&k, n * 4), *da = ck_host(&k, n * 4);
    float *act = ck_host(&k, n * 4), *act_d = ck_host(&k, n * 4);
    float *dh1 = ck_host(&k, n * 4), *dh1_d = ck_host(&k, n * 4);
    float *dh3 = ck_host(&k, n * 4), *dh3_d = ck_host(&k, n * 4);
    char why[512] = "", shape[64];
    long long cnt = (long long)n;
    unsigned grid = gc_elem_grid(g, n);
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s rows=%d hidden=%d", name, rows, hidden);
    if (k.rc == 0) {
        gc_fill(g, h1, n, -6.0f, 6.0f);
        gc_fill(g, h3, n, -3.0f, 3.0f);
        gc_fill(g, da, n, -1.0f, 1.0f);
        for (size_t i = 0; i < n; i++) {
            float z = h1[i], sg = swiglu_sigmoid(z);
            act[i] = z * sg * h3[i];
            dh3[i] = da[i] * z * sg;
            dh1[i] = da[i] * h3[i] * sg * (1.0f + z * (1.0f - sg));
        }
    }
    wk_cuda_ptr d_h1 = ck_dev(&k, n * 4, h1), d_h3 = ck_dev(&k, n * 4, h3),
                d_da = ck_dev(&k, n * 4, da);
    wk_cuda_ptr d_act = ck_dev(&k, n * 4, NULL), d_dh1 = ck_dev(&k, n * 4, NULL);
    wk_cuda_ptr d_dh3 = ck_dev(&k, n * 4, NULL);
    {
        void *args[] = {&d_h1, &d_h3, &cnt, &d_act};
        ms = ck_launch(&k, kf.swi_fwd, grid, 0, args, 1);
        ck_download(&k, act_d, d_act, n * 4);
        ok = k.rc == 0 && ck_compare_rel(&k, "act", act_d, act, n, 1e-6, why, sizeof(why));
        ms = ck_retime(&k, ok, kf.swi_fwd, grid, args, ms);
        ck_finish(&k, "swiglu_fwd", shape, ok, why, ms, gc_gbs(3.0 * (double)n * 4, ms));
    }
    {
        void *args[] = {&d_h1, &d_h3, &d_da, &cnt, &d_dh1, &d_dh3};
        ms = ck_launch(&k, kf.swi_bwd, grid, 0, args, 1);
        ck_download(&k, dh1_d, d_dh1, n * 4);
        ck_download(&k, dh3_d, d_dh3, n * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = ck_compare_rel(&k, "dh1", dh1_d, dh1, n, 1e-6, why, sizeof(why));
            ok &= ck_compare_rel(&k, "dh3", dh3_d, dh3, n, 1e-6, why, sizeof(why));
        }
        ms = ck_retime(&k, ok, kf.swi_bwd, grid, args, ms);
        ck_finish(&k, "swiglu_bwd", shape, ok, why, ms, gc_gbs(5.0 * (double)n * 4, ms));
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
    float *z = ck_host(&k, nv * 4), *p = ck_host(&k, nv * 4), *p_d = ck_host(&k, nv * 4);
    float *l = ck_host(&k, (size_t)n * 4), *l_d = ck_host(&k, (size_t)n * 4);
    float *dl = ck_host(&k, nv * 4), *dl_d = ck_host(&k, nv * 4);
    int32_t *t = ck_host(&k, (size_t)n * 4);
    char why[512] = "", shape[64];
    float mean = 0.0f, mean_d;
    double ms, total = 0.0;
    int ok;

    snprintf(shape, sizeof(shape), "%s n=%d vocab=%d", name, n, vocab);
    if (k.rc == 0) {
        gc_fill(g, z, nv, -8.0f, 8.0f);
        for (int i = 0; i < n; i++)
            t[i] = (int32_t)(gc_u64(g) % (uint64_t)vocab);
        mean = xent_ref(z, t, n, vocab, p, l);
        xent_bwd_ref(p, t, n, vocab, dl);
    }
    wk_cuda_ptr d_z = ck_dev(&k, nv * 4, z), d_t = ck_dev(&k, (size_t)n * 4, t);
    wk_cuda_ptr d_p = ck_dev(&k, nv * 4, NULL), d_l = ck_dev(&k, (size_t)n * 4, NULL);
    wk_cuda_ptr d_dl = ck_dev(&k, nv * 4, NULL);
    int nn = n, vv = vocab;
    {
        void *args[] = {&d_z, &d_t, &nn, &vv, &d_p, &d_l};
        ms = ck_launch(&k, kf.sx_fwd, gc_row_grid(g, n), 0, args, 1);
        ck_download(&k, p_d, d_p, nv * 4);
        ck_download(&k, l_d, d_l, (size_t)n * 4);
        ok = k.rc == 0;
        if (ok) {
            /* the mean over rows is the host's: head.c's double total / n */
            for (int i = 0; i < n; i++)
                total += l_d[i];
            mean_d = (float)(total / n);
            ok = ck_compare_rel(&k, "probs", p_d, p, nv, 1e-5, why, sizeof(why));
            ok &= ck_compare_rel(&k, "loss_row", l_d, l, (size_t)n, 1e-5, why, sizeof(why));
            ok &= ck_compare_rel(&k, "loss", &mean_d, &mean, 1, 1e-5, why, sizeof(why));
        }
        ms = ck_retime(&k, ok, kf.sx_fwd, gc_row_grid(g, n), args, ms);
        ck_finish(&k, "softmax_xent_fwd", shape, ok, why, ms, gc_gbs(2.0 * (double)nv * 4, ms));
    }
    /* backward from the reference probabilities: bitwise */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_p, p, nv * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    {
        void *args[] = {&d_p, &d_t, &nn, &vv, &d_dl};
        ms = ck_launch(&k, kf.sx_bwd, gc_row_grid(g, n), 0, args, 1);
        ck_download(&k, dl_d, d_dl, nv * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "dlogits", dl_d, dl, nv, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, kf.sx_bwd, gc_row_grid(g, n), args, ms);
        ck_finish(&k, "softmax_xent_bwd", shape, ok, why, ms, gc_gbs(2.0 * (double)nv * 4, ms));
    }
    ck_done(&k);
}

/* --- the ceiling: a device-to-device copy ----------------------------------- */

static void time_copy(struct gc *g, size_t bytes, const char *shape)
{
    struct ck k = {.g = g};
    wk_cuda_ptr a = ck_dev(&k, bytes, NULL), b = ck_dev(&k, bytes, NULL);
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
        g->copy_gbs = gc_gbs(2.0 * (double)bytes, per);
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
    gc_add_row(g, "copy DtoD (ceiling)", shape, k.rc < 0 ? "FAIL" : "-", per,
               k.rc < 0 ? -1.0 : g->copy_gbs);
    ck_done(&k);
}

void gc_time_copy(struct gc *g)
{
    time_copy(g, (size_t)4096 * 8 * 7168 * 4, "939 MB");
}

static int setup(struct gc *g)
{
    wk_cuda_module route, dispatch, fp8, elementwise;
    static const char *const route_names[] = {"dx_route_topk"};
    static const char *const dispatch_names[] = {"dx_dispatch_count", "dx_dispatch_offsets",
                                                 "dx_dispatch_rows", "dx_dispatch_pack",
                                                 "dx_combine"};
    static const char *const fp8_names[] = {"dx_fp8_quant_1x128", "dx_fp8_dequant_1x128",
                                            "dx_fp8_quant_rec", "dx_fp8_dequant_rec"};
    static const char *const elementwise_names[] = {
        "dx_rmsnorm_fwd", "dx_rmsnorm_bwd",      "dx_rmsnorm_dg",      "dx_swiglu_fwd",
        "dx_swiglu_bwd",  "dx_softmax_xent_fwd", "dx_softmax_xent_bwd"};
    wk_cuda_function_t *const route_fns[] = {&kf.route};
    wk_cuda_function_t *const dispatch_fns[] = {&kf.count, &kf.offsets, &kf.rows, &kf.pack,
                                                &kf.combine};
    wk_cuda_function_t *const fp8_fns[] = {&kf.quant, &kf.dequant, &kf.quant_rec, &kf.dequant_rec};
    wk_cuda_function_t *const elementwise_fns[] = {
        &kf.rms_fwd, &kf.rms_bwd, &kf.rms_dg, &kf.swi_fwd, &kf.swi_bwd, &kf.sx_fwd, &kf.sx_bwd};

    if (GC_MODULE(g, routing, &route) < 0 || GC_MODULE(g, dispatch, &dispatch) < 0 ||
        GC_MODULE(g, fp8, &fp8) < 0 || GC_MODULE(g, elementwise, &elementwise) < 0)
        return -EIO;
    if (gc_functions(g, route, route_names, route_fns, 1) < 0 ||
        gc_functions(g, dispatch, dispatch_names, dispatch_fns, 5) < 0 ||
        gc_functions(g, fp8, fp8_names, fp8_fns, 4) < 0 ||
        gc_functions(g, elementwise, elementwise_names, elementwise_fns, 7) < 0)
        return -EIO;
    return 0;
}

void gc_check_kernels(struct gc *g)
{
    const struct route_shape shapes[] = {
        {37, 16, 4, 2, 4, 4, 130, 0, "n=37 E=16 G=4/2 k=4"},
        {64, 16, 4, 2, 4, 4, 64, 1, "n=64 E=16 G=4/2 k=4 ties"},
        {300, 64, 1, 1, 6, 8, 256, 0, "n=300 E=64 G=1 k=6"},
        {4096, 256, 8, 4, 8, 8, 7168, 0, "n=4096 E=256 G=8/4 k=8"},
    };
    const int nshapes = (int)(sizeof(shapes) / sizeof(shapes[0]));

    if (setup(g) < 0) {
        gc_add_row(g, "kernels", "-", "FAIL (module)", -1.0, -1.0);
        g->failed++;
        return;
    }
    for (int i = 0; i < nshapes; i++) {
        const struct route_shape *s = &shapes[i];

        if (g->small && s->n > 1024)
            continue;
        printf("  checking %s\n", s->name);
        fflush(stdout);
        check_route(g, s);
        check_dispatch(g, s, i == 0);
    }
    check_fp8(g, 37, 301, "small");
    check_fp8(g, 5, 100, "short");
    if (!g->small)
        check_fp8(g, 4096, 7168, "V3");
    check_rmsnorm(g, 37, 130, "small");
    check_swiglu(g, 37, 130, "small");
    check_xent(g, 1024, 256, "bytes");
    check_xent(g, 5, 1000, "short");
    if (!g->small) {
        check_rmsnorm(g, 4096, 7168, "V3");
        check_swiglu(g, 4096, 2048, "V3");
        check_xent(g, 1024, 32000, "vocab");
    }
}
