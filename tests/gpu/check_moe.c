/* check_moe.c - duplex-gpucheck's checks of kernels/moe.cu (the router's
 * sigmoid and the gate backward) against the worker's own functions on fresh
 * random data: wk_moe_sigmoid, wk_moe_gate_scale and wk_moe_gate_backward
 * (worker/model/moe.c, which wk_moe_route and wk_moe_backward_prepare call),
 * on a real routing (dx_kref_route) and dispatch layout (dx_kref_dispatch_*,
 * one rank) so ids, token_slot, send_token and send_gate are what the
 * dispatch kernels give.
 *
 * Bounds: dy, dgate and dlogit are bitwise (0 ulp): the kernels do moe.c's
 * operations in its order with correctly rounded __f*_rn (no FMA), each gate
 * gradient summed by one thread in i order. The sigmoid is bounded: CUDA's
 * expf is within 2 ulp and glibc's within 1 of exp, so the two exps differ by
 * at most 3 ulp (3 * 2^-23 relative); 1 + e and 1 / x are correctly rounded
 * on both sides and rounding is monotone, so each adds at most one ulp to the
 * difference: |got - want| <= 5 * 2^-23 |want| (ck_compare_rel's error is
 * relative to max(|want|, rms), so a result far below the RMS is held to
 * less). The check also prints how many scores are bitwise glibc's.
 *
 * Outputs are poisoned (0xff bytes, a NaN) on the device and the host first;
 * dlogit is compared whole (the zeros of the experts not chosen included).
 * router_grad reads the reference's dgate, so each row checks one kernel.
 *
 * Timing rows, bytes per launch: sigmoid 8 an element; gate_scale reads a
 * dout row and writes a dy row per dispatched row; gate_dot reads every y
 * row and every dout row once (a token's k threads share its dout row
 * through L1); router_grad reads scores and writes dlogit. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"
#include "tests/gpu/gpucheck.h"
#include "worker/model/moe.h"

GC_IMAGE(moe);

/* 5 * 2^-23: see the top of the file */
#define SIGMOID_BOUND (5.0 / 8388608.0)

/* this file's kernels */
static struct {
    wk_cuda_function_t sigmoid, gate_scale, gate_dot, router_grad;
} mf;

/* --- the sigmoid --------------------------------------------------------------- */

static size_t bitwise_equal(const float *a, const float *b, size_t n)
{
    size_t same = 0;

    for (size_t i = 0; i < n; i++) {
        uint32_t x, y;
        memcpy(&x, a + i, 4);
        memcpy(&y, b + i, 4);
        same += x == y;
    }
    return same;
}

static void check_sigmoid(struct gc *g, int n, int E)
{
    /* where glibc's and CUDA's expf overflow, underflow or are exact */
    static const float special[] = {0.0f,  -0.0f,  88.5f,    -88.5f,   88.75f, -88.75f,
                                    90.0f, -90.0f, 104.0f,   -104.0f,  1e-30f, -1e-30f,
                                    16.0f, -16.0f, INFINITY, -INFINITY};
    const size_t nspecial = sizeof(special) / sizeof(special[0]);
    struct ck k = {.g = g};
    const size_t count = (size_t)n * E, bytes = count * 4;
    float *z = ck_host(&k, bytes), *s = ck_host(&k, bytes), *s_d = ck_host(&k, bytes);
    char why[512] = "", shape[64];
    long long cnt = (long long)count;
    unsigned grid = gc_elem_grid(g, count);
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "n=%d E=%d", n, E);
    if (k.rc == 0) {
        gc_fill(g, z, count, -20.0f, 20.0f);
        for (size_t i = 0, j = 0; i < count; i += 61, j++)
            z[i] = special[j % nspecial];
        wk_moe_sigmoid(z, count, s);
    }
    wk_cuda_ptr d_z = ck_dev(&k, bytes, z), d_s = ck_dev(&k, bytes, NULL);
    {
        void *args[] = {&d_z, &cnt, &d_s};
        ms = ck_launch(&k, mf.sigmoid, grid, 0, args, 1);
        ck_download(&k, s_d, d_s, bytes);
        ok = k.rc == 0 &&
             ck_compare_rel(&k, "scores", s_d, s, count, SIGMOID_BOUND, why, sizeof(why));
        if (k.rc == 0)
            printf("  moe_sigmoid %s: %zu of %zu scores bitwise glibc's\n", shape,
                   bitwise_equal(s_d, s, count), count);
        ms = ck_retime(&k, ok, mf.sigmoid, grid, args, ms);
        ck_finish(&k, "moe_sigmoid", shape, ok, why, ms, gc_gbs(8.0 * (double)count, ms));
    }
    /* in place, as wk_moe_route does it: logits become scores */
    {
        void *args[] = {&d_z, &cnt, &d_z};
        ms = ck_launch(&k, mf.sigmoid, grid, 0, args, 1);
        ck_download(&k, s_d, d_z, bytes);
        why[0] = '\0';
        ok = k.rc == 0 &&
             ck_compare_rel(&k, "scores", s_d, s, count, SIGMOID_BOUND, why, sizeof(why));
        snprintf(shape, sizeof(shape), "n=%d E=%d in place", n, E);
        ck_finish(&k, "moe_sigmoid", shape, ok, why, ms, gc_gbs(8.0 * (double)count, ms));
    }
    ck_done(&k);
}

/* --- the gate backward ---------------------------------------------------------- */

struct gate_shape {
    int n, E, G, group_limit, k, d;
    float route_scale;
    const char *name;
};

/* ids [n][k], token_slot [n][k], send_token and send_gate [n * k] for the
 * scores as dx_route_topk (no bias) and the dispatch kernels (one rank)
 * make them. 0, -ENOMEM or -EINVAL. */
static int make_routing(const struct gate_shape *sh, const float *scores, int *ids, int *token_slot,
                        int *send_token, float *send_gate)
{
    const struct dx_kref_route_cfg cfg = {sh->E, sh->G, sh->group_limit, sh->k, sh->route_scale};
    const size_t E = (size_t)sh->E, pairs = (size_t)sh->n * sh->k;
    float *bias = calloc(E, sizeof(float)), *gates = calloc(pairs, sizeof(float));
    int *counts = calloc(E, sizeof(int)), *owner = calloc(E, sizeof(int));
    int *tpe = calloc(E, sizeof(int)), *expert_offset = calloc(E + 1, sizeof(int));
    int *expert_slot = calloc(E, sizeof(int)), rank_rows[1], rank_offset[2];
    int rc = -ENOMEM;

    if (!bias || !gates || !counts || !owner || !tpe || !expert_offset || !expert_slot)
        goto fail;
    rc = dx_kref_route(&cfg, scores, bias, sh->n, ids, gates, counts);
    if (rc == 0)
        rc = dx_kref_dispatch_count(ids, sh->n, sh->k, sh->E, tpe);
    if (rc == 0)
        rc = dx_kref_dispatch_offsets(tpe, owner, sh->E, 1, expert_offset, rank_rows, rank_offset,
                                      expert_slot);
    if (rc == 0)
        rc = dx_kref_dispatch_rows(ids, gates, sh->n, sh->k, sh->E, expert_slot, send_token,
                                   send_gate, token_slot);
fail:
    free(bias);
    free(gates);
    free(counts);
    free(owner);
    free(tpe);
    free(expert_offset);
    free(expert_slot);
    return rc;
}

static void check_gate_bwd(struct gc *g, const struct gate_shape *sh)
{
    struct ck k = {.g = g};
    const int n = sh->n, E = sh->E, K = sh->k, d = sh->d, rows = n * K;
    const size_t nE = (size_t)n * E, pairs = (size_t)rows, nd = (size_t)n * d;
    const size_t rd = (size_t)rows * d;
    float *scores = ck_host(&k, nE * 4), *dout = ck_host(&k, nd * 4), *y = ck_host(&k, rd * 4);
    float *send_gate = ck_host(&k, pairs * 4), *dy = ck_host(&k, rd * 4);
    float *dy_d = ck_host(&k, rd * 4), *dgate = ck_host(&k, pairs * 4);
    float *dgate_d = ck_host(&k, pairs * 4), *dlogit = ck_host(&k, nE * 4);
    float *dlogit_d = ck_host(&k, nE * 4);
    int *ids = ck_host(&k, pairs * 4), *token_slot = ck_host(&k, pairs * 4);
    int *send_token = ck_host(&k, pairs * 4);
    char why[512] = "", shape[64];
    int nn = n, ee = E, kk = K, dd = d, rr = rows, ok;
    float scale = sh->route_scale;
    double ms;

    snprintf(shape, sizeof(shape), "%s n=%d E=%d k=%d d=%d", sh->name, n, E, K, d);
    if (k.rc == 0) {
        gc_fill(g, scores, nE, -4.0f, 4.0f);
        wk_moe_sigmoid(scores, nE, scores);
        if (make_routing(sh, scores, ids, token_slot, send_token, send_gate) < 0)
            ck_fail(&k, "the reference routing / dispatch rejected the shape");
    }
    if (k.rc == 0) {
        gc_fill(g, dout, nd, -1.0f, 1.0f);
        gc_fill(g, y, rd, -1.0f, 1.0f);
        wk_moe_gate_scale(dout, d, send_token, send_gate, rows, dy);
        wk_moe_gate_backward(scores, E, ids, token_slot, n, K, dout, y, d, scale, dgate, dlogit);
    }
    wk_cuda_ptr d_dout = ck_dev(&k, nd * 4, dout), d_y = ck_dev(&k, rd * 4, y);
    wk_cuda_ptr d_st = ck_dev(&k, pairs * 4, send_token), d_sg = ck_dev(&k, pairs * 4, send_gate);
    wk_cuda_ptr d_ts = ck_dev(&k, pairs * 4, token_slot), d_ids = ck_dev(&k, pairs * 4, ids);
    wk_cuda_ptr d_s = ck_dev(&k, nE * 4, scores), d_dg_ref = ck_dev(&k, pairs * 4, dgate);
    wk_cuda_ptr d_dy = ck_dev(&k, rd * 4, NULL), d_dg = ck_dev(&k, pairs * 4, NULL);
    wk_cuda_ptr d_dl = ck_dev(&k, nE * 4, NULL);
    {
        void *args[] = {&d_dout, &dd, &d_st, &d_sg, &rr, &d_dy};
        unsigned grid = gc_warp_grid(g, pairs);
        ms = ck_launch(&k, mf.gate_scale, grid, 0, args, 1);
        ck_download(&k, dy_d, d_dy, rd * 4);
        ok = k.rc == 0 && ck_compare(&k, "dy", dy_d, dy, rd, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, mf.gate_scale, grid, args, ms);
        ck_finish(&k, "moe_gate_scale", shape, ok, why, ms, gc_gbs(2.0 * (double)rd * 4, ms));
    }
    {
        void *args[] = {&d_dout, &dd, &d_y, &d_ts, &nn, &kk, &d_dg};
        unsigned grid = gc_elem_grid(g, pairs);
        ms = ck_launch(&k, mf.gate_dot, grid, 0, args, 1);
        ck_download(&k, dgate_d, d_dg, pairs * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "dgate", dgate_d, dgate, pairs, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, mf.gate_dot, grid, args, ms);
        ck_finish(&k, "moe_gate_dot", shape, ok, why, ms,
                  gc_gbs(((double)rd + (double)nd) * 4, ms));
    }
    {
        void *args[] = {&d_s, &ee, &d_ids, &d_dg_ref, &nn, &kk, &scale, &d_dl};
        unsigned grid = gc_warp_grid(g, (size_t)n);
        ms = ck_launch(&k, mf.router_grad, grid, 0, args, 1);
        ck_download(&k, dlogit_d, d_dl, nE * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "dlogit", dlogit_d, dlogit, nE, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, mf.router_grad, grid, args, ms);
        snprintf(shape, sizeof(shape), "%s n=%d E=%d k=%d scale=%g", sh->name, n, E, K,
                 (double)scale);
        ck_finish(&k, "moe_router_grad", shape, ok, why, ms, gc_gbs(2.0 * (double)nE * 4, ms));
    }
    { /* a two-hop relay's masked choices (slot -1): gradient 0, the rest as before */
        void *args[] = {&d_dout, &dd, &d_y, &d_ts, &nn, &kk, &d_dg};
        unsigned grid = gc_elem_grid(g, pairs);

        for (size_t c = 0; c < pairs; c += 3) {
            token_slot[c] = -1;
            dgate[c] = 0.0f;
        }
        if (k.rc == 0 && wk_cuda_upload(g->c, d_ts, token_slot, pairs * 4) < 0)
            ck_fail(&k, wk_cuda_error(g->c));
        ms = ck_launch(&k, mf.gate_dot, grid, 0, args, 1);
        ck_download(&k, dgate_d, d_dg, pairs * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "dgate", dgate_d, dgate, pairs, 4, 1, why, sizeof(why));
        snprintf(shape, sizeof(shape), "%s n=%d k=%d masked", sh->name, n, K);
        ck_finish(&k, "moe_gate_dot", shape, ok, why, ms, -1.0);
    }
    ck_done(&k);
}

static int setup(struct gc *g)
{
    wk_cuda_module moe;
    static const char *const names[] = {"dx_moe_sigmoid", "dx_moe_gate_scale", "dx_moe_gate_dot",
                                        "dx_moe_router_grad"};
    wk_cuda_function_t *const fns[] = {&mf.sigmoid, &mf.gate_scale, &mf.gate_dot, &mf.router_grad};

    if (GC_MODULE(g, moe, &moe) < 0)
        return -EIO;
    return gc_functions(g, moe, names, fns, (int)(sizeof(names) / sizeof(names[0])));
}

void gc_check_moe(struct gc *g)
{
    /* n, E, G, group_limit, k, d, route_scale, name */
    static const struct gate_shape small = {300, 64, 8, 4, 6, 256, 2.5f, "small"};
    static const struct gate_shape odd = {77, 16, 4, 2, 4, 130, 1.0f, "d%4!=0"};
    static const struct gate_shape v3 = {4096, 256, 8, 4, 8, 7168, 2.5f, "V3"};

    if (setup(g) < 0) {
        gc_add_row(g, "moe kernels", "-", "FAIL (module)", -1.0, -1.0);
        g->failed++;
        return;
    }
    printf("  checking the MoE router kernels\n");
    fflush(stdout);
    check_sigmoid(g, 37, 13);
    check_sigmoid(g, 4096, 256);
    check_gate_bwd(g, &small);
    check_gate_bwd(g, &odd);
    if (!g->small)
        check_gate_bwd(g, &v3);
}
