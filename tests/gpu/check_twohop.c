/* check_twohop.c - duplex-gpucheck's checks of the two-hop (node-limited)
 * dispatch: the hop-1 layout kernels of kernels/twohop.cu against
 * kernels/twohop_ref.h, the hop-1 data movement through dx_dispatch_pack
 * with the two-hop rows, and hop 2 at a relay through the dispatch kernels
 * (count, offsets, rows) on masked ids against dx_kref_twohop_forward.
 *
 * Bounds: every output is int32 (counts, offsets, rows, slots, masked ids)
 * or a copied fp32 value (gates, packed rows): all bitwise. Outputs whose
 * legitimate values include -1 (token_node_slot, send_ids, recv_slot) are
 * poisoned with 0x7f bytes instead of 0xff, so a skipped write still shows;
 * recv_slot is preset to -1 as the contract of hop 2 asks (dx_dispatch_rows
 * writes only the matched entries), and the check then verifies that every
 * unmatched entry stayed -1 and every matched one was written. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"
#include "kernels/twohop_ref.h"
#include "tests/gpu/gpucheck.h"

GC_IMAGE(twohop);
GC_IMAGE(dispatch);

#define TWOHOP_POISON 0x7f

static struct {
    wk_cuda_function_t count, offsets, rows;               /* twohop.cu */
    wk_cuda_function_t d_count, d_offsets, d_rows, d_pack; /* dispatch.cu */
} tf;

struct twohop_shape {
    int n, experts, groups, limit, top_k, nodes, per_node, d;
    int aligned; /* group g on node g / (G / nodes); else random owners */
    const char *name;
};

static int setup(struct gc *g)
{
    wk_cuda_module twohop, dispatch;
    static const char *const twohop_names[] = {"dx_twohop_count", "dx_twohop_offsets",
                                               "dx_twohop_rows"};
    static const char *const dispatch_names[] = {"dx_dispatch_count", "dx_dispatch_offsets",
                                                 "dx_dispatch_rows", "dx_dispatch_pack"};
    wk_cuda_function_t *const twohop_fns[] = {&tf.count, &tf.offsets, &tf.rows};
    wk_cuda_function_t *const dispatch_fns[] = {&tf.d_count, &tf.d_offsets, &tf.d_rows, &tf.d_pack};

    if (GC_MODULE(g, twohop, &twohop) < 0 || GC_MODULE(g, dispatch, &dispatch) < 0)
        return -EIO;
    if (gc_functions(g, twohop, twohop_names, twohop_fns, 3) < 0 ||
        gc_functions(g, dispatch, dispatch_names, dispatch_fns, 4) < 0)
        return -EIO;
    return 0;
}

/* A device buffer of bytes filled with TWOHOP_POISON. */
static wk_cuda_ptr dev_poison7f(struct ck *k, size_t bytes)
{
    void *h = ck_host(k, bytes);

    if (!h)
        return 0;
    memset(h, TWOHOP_POISON, bytes);
    return ck_dev(k, bytes, h);
}

/* Routing (group-limited, from the reference) and owners for a shape. */
static int make_routing(struct gc *g, struct ck *k, const struct twohop_shape *s, int *ids,
                        float *gates, int *owner)
{
    struct dx_kref_route_cfg cfg = {s->experts, s->groups, s->limit, s->top_k, 2.5f};
    const int E = s->experts, gs = E / s->groups, R = s->nodes * s->per_node;
    float *scores = ck_host(k, (size_t)s->n * E * 4), *bias = ck_host(k, (size_t)E * 4);
    int *counts = ck_host(k, (size_t)E * 4);

    if (k->rc < 0)
        return -ENOMEM;
    gc_fill(g, scores, (size_t)s->n * E, 0.001f, 0.999f);
    gc_fill(g, bias, (size_t)E, -0.05f, 0.05f);
    memset(counts, 0, (size_t)E * 4);
    if (dx_kref_route(&cfg, scores, bias, s->n, ids, gates, counts) < 0)
        return -EINVAL;
    for (int e = 0; e < E; e++)
        owner[e] = s->aligned ? (e / gs) / (s->groups / s->nodes) * s->per_node +
                                    (int)(gc_u64(g) % (uint64_t)s->per_node)
                              : (int)(gc_u64(g) % (uint64_t)R);
    return 0;
}

/* Hop 1: count, offsets, rows (with the masked ids and gates), then the
 * pack of the token rows into the hop-1 send buffer. */
static void check_hop1(struct gc *g, const struct twohop_shape *s)
{
    struct ck k = {.g = g};
    const struct dx_twohop_topo topo = {s->nodes, s->per_node};
    const int n = s->n, E = s->experts, K = s->top_k, N = s->nodes, P = s->per_node, d = s->d;
    const size_t nk = (size_t)n * K, maxrows = (size_t)n * (K < N ? K : N);
    int *ids = ck_host(&k, nk * 4), *owner = ck_host(&k, (size_t)E * 4);
    float *gates = ck_host(&k, nk * 4);
    int *nt = ck_host(&k, (size_t)N * 4), *nt_d = ck_host(&k, (size_t)N * 4);
    int *off = ck_host(&k, (size_t)(N + 1) * 4), *off_d = ck_host(&k, (size_t)(N + 1) * 4);
    int *stok = ck_host(&k, maxrows * 4), *slot = ck_host(&k, (size_t)n * N * 4);
    int *sids = ck_host(&k, maxrows * K * 4);
    float *sg = ck_host(&k, maxrows * K * 4);
    char why[512] = "", shape[96];
    double ms = -1.0;
    int ok, rows = 0;

    snprintf(shape, sizeof(shape), "%s %dx%d", s->name, N, P);
    if (k.rc == 0 && make_routing(g, &k, s, ids, gates, owner) < 0)
        ck_fail(&k, "dx_kref_route rejected the shape");
    if (k.rc == 0 &&
        (dx_kref_twohop_count(&topo, owner, E, ids, n, K, nt) < 0 ||
         (rows = dx_kref_twohop_offsets(nt, N, off)) < 0 ||
         dx_kref_twohop_rows(&topo, owner, E, ids, gates, n, K, off, stok, slot, sids, sg) < 0))
        ck_fail(&k, "a two-hop reference rejected the shape");
    if (k.rc < 0) {
        ck_finish(&k, "twohop_layout", shape, 0, "", -1.0, -1.0);
        ck_done(&k);
        return;
    }
    int *stok_d = ck_host(&k, (size_t)rows * 4 + 4), *slot_d = ck_host(&k, (size_t)n * N * 4);
    int *sids_d = ck_host(&k, (size_t)rows * K * 4 + 4);
    float *sg_d = ck_host(&k, (size_t)rows * K * 4 + 4);
    wk_cuda_ptr d_ids = ck_dev(&k, nk * 4, ids), d_gates = ck_dev(&k, nk * 4, gates);
    wk_cuda_ptr d_owner = ck_dev(&k, (size_t)E * 4, owner);
    wk_cuda_ptr d_nt = ck_dev(&k, (size_t)N * 4, NULL),
                d_off = ck_dev(&k, (size_t)(N + 1) * 4, NULL);
    int nn = n, kk = K, pp = P, NN = N;

    /* count */
    {
        void *args[] = {&d_ids, &nn, &kk, &d_owner, &pp, &NN, &d_nt};
        ms = ck_launch(&k, tf.count, (unsigned)N, 0, args, 1);
        ck_download(&k, nt_d, d_nt, (size_t)N * 4);
        why[0] = '\0';
        ok =
            k.rc == 0 && ck_compare(&k, "node_tokens", nt_d, nt, (size_t)N, 4, 0, why, sizeof(why));
        ms = ck_retime(&k, ok, tf.count, (unsigned)N, args, ms);
        ck_finish(&k, "twohop_count", shape, ok, why, ms, gc_gbs((double)nk * 4, ms));
    }
    /* offsets, from the reference counts */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_nt, nt, (size_t)N * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    {
        void *args[] = {&d_nt, &NN, &d_off};
        ms = ck_launch(&k, tf.offsets, 1, 0, args, 1);
        ck_download(&k, off_d, d_off, (size_t)(N + 1) * 4);
        why[0] = '\0';
        ok = k.rc == 0 &&
             ck_compare(&k, "node_offset", off_d, off, (size_t)N + 1, 4, 0, why, sizeof(why));
        ck_finish(&k, "twohop_offsets", shape, ok, why, ms, -1.0);
    }
    /* rows, from the reference offsets; timed */
    if (k.rc == 0 && wk_cuda_upload(g->c, d_off, off, (size_t)(N + 1) * 4) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    wk_cuda_ptr d_stok = ck_dev(&k, (size_t)rows * 4 + 4, NULL);
    wk_cuda_ptr d_slot = dev_poison7f(&k, (size_t)n * N * 4);
    wk_cuda_ptr d_sids = dev_poison7f(&k, (size_t)rows * K * 4 + 4);
    wk_cuda_ptr d_sg = ck_dev(&k, (size_t)rows * K * 4 + 4, NULL);
    {
        void *args[] = {&d_ids, &d_gates, &nn,     &kk,     &d_owner, &pp,
                        &NN,    &d_off,   &d_stok, &d_slot, &d_sids,  &d_sg};
        ms = ck_launch(&k, tf.rows, (unsigned)N, 0, args, 1);
        ck_download(&k, stok_d, d_stok, (size_t)rows * 4);
        ck_download(&k, slot_d, d_slot, (size_t)n * N * 4);
        ck_download(&k, sids_d, d_sids, (size_t)rows * K * 4);
        ck_download(&k, sg_d, d_sg, (size_t)rows * K * 4);
        why[0] = '\0';
        ok = k.rc == 0;
        if (ok) {
            ok = ck_compare(&k, "send_token", stok_d, stok, (size_t)rows, 4, 0, why, sizeof(why));
            ok &= ck_compare(&k, "token_node_slot", slot_d, slot, (size_t)n * N, 4, 0, why,
                             sizeof(why));
            ok &=
                ck_compare(&k, "send_ids", sids_d, sids, (size_t)rows * K, 4, 0, why, sizeof(why));
            ok &= ck_compare(&k, "send_gates", sg_d, sg, (size_t)rows * K, 4, 1, why, sizeof(why));
        }
        ms = ck_retime(&k, ok, tf.rows, (unsigned)N, args, ms);
        ck_finish(&k, "twohop_rows", shape, ok, why, ms, -1.0);
    }
    /* hop-1 data: dx_dispatch_pack over the two-hop rows */
    {
        const size_t xd = (size_t)n * d, sd = (size_t)rows * d;
        float *x = ck_host(&k, xd * 4), *send = ck_host(&k, sd * 4 + 4);
        float *send_d = ck_host(&k, sd * 4 + 4);
        wk_cuda_ptr d_x = ck_dev(&k, xd * 4, NULL), d_send = ck_dev(&k, sd * 4 + 4, NULL);
        int dd = d, rr = rows;
        void *args[] = {&d_x, &dd, &d_stok, &rr, &d_send};
        unsigned grid = gc_warp_grid(g, (size_t)rows);

        if (k.rc == 0) {
            gc_fill(g, x, xd, -4.0f, 4.0f);
            dx_kref_dispatch_pack(x, d, stok, rows, send);
            if (wk_cuda_upload(g->c, d_x, x, xd * 4) < 0 ||
                wk_cuda_upload(g->c, d_stok, stok, (size_t)rows * 4) < 0)
                ck_fail(&k, wk_cuda_error(g->c));
        }
        ck_launch(&k, tf.d_pack, grid, 0, args, 1);
        ck_download(&k, send_d, d_send, sd * 4);
        why[0] = '\0';
        ok = k.rc == 0 && ck_compare(&k, "send", send_d, send, sd, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, tf.d_pack, grid, args, -1.0);
        snprintf(shape, sizeof(shape), "%s %dx%d %d of %zu rows", s->name, N, P, rows, nk);
        ck_finish(&k, "twohop_pack", shape, ok, why, ms, gc_gbs(2.0 * (double)sd * 4, ms));
    }
    ck_done(&k);
}

/* Hop 2 at the relay of node 0 receiving what node 0's GPUs would get from
 * one source: the hop-1 rows for node 0 with their masked ids. */
static void check_hop2(struct gc *g, const struct twohop_shape *s)
{
    struct ck k = {.g = g};
    const struct dx_twohop_topo topo = {s->nodes, s->per_node};
    const int n = s->n, E = s->experts, K = s->top_k, N = s->nodes, P = s->per_node;
    const size_t nk = (size_t)n * K, maxrows = (size_t)n * (K < N ? K : N);
    int *ids = ck_host(&k, nk * 4), *owner = ck_host(&k, (size_t)E * 4);
    float *gates = ck_host(&k, nk * 4);
    int *nt = ck_host(&k, (size_t)N * 4), *off = ck_host(&k, (size_t)(N + 1) * 4);
    int *stok = ck_host(&k, maxrows * 4), *slot = ck_host(&k, (size_t)n * N * 4);
    int *sids = ck_host(&k, maxrows * K * 4 + 4); /* the relay uploads nrecv * K + 1 */
    float *sg = ck_host(&k, maxrows * K * 4 + 4);
    int *local = ck_host(&k, (size_t)E * 4), *lay = ck_host(&k, (size_t)(2 * P + 1 + E) * 4);
    int *lay_d = ck_host(&k, (size_t)(2 * P + 1 + E) * 4 + 4 * (size_t)(E + 1));
    int *fwd = ck_host(&k, nk * 4 + 4), *fwd_d = ck_host(&k, nk * 4 + 4);
    float *fg = ck_host(&k, nk * 4 + 4), *fg_d = ck_host(&k, nk * 4 + 4);
    int *rslot = ck_host(&k, nk * 4 + 4), *rslot_d = ck_host(&k, nk * 4 + 4);
    char why[512] = "", shape[96];
    double ms = -1.0;
    int ok = 0, nrecv = 0, rows2 = 0;

    snprintf(shape, sizeof(shape), "%s %dx%d relay", s->name, N, P);
    if (k.rc == 0 && make_routing(g, &k, s, ids, gates, owner) < 0)
        ck_fail(&k, "dx_kref_route rejected the shape");
    if (k.rc == 0 &&
        (dx_kref_twohop_count(&topo, owner, E, ids, n, K, nt) < 0 ||
         dx_kref_twohop_offsets(nt, N, off) < 0 ||
         dx_kref_twohop_rows(&topo, owner, E, ids, gates, n, K, off, stok, slot, sids, sg) < 0))
        ck_fail(&k, "a two-hop reference rejected the shape");
    if (k.rc == 0) {
        int *lrows = lay, *loff = lay + P, *eslot = lay + 2 * P + 1;
        nrecv = nt[0]; /* node 0's rows are the first of the send buffer */
        if (dx_kref_twohop_forward(&topo, owner, E, 0, sids, sg, nrecv, K, lrows, loff, eslot, fwd,
                                   fg, rslot) < 0)
            ck_fail(&k, "dx_kref_twohop_forward rejected the relay's rows");
        rows2 = loff[P];
        for (int e = 0; e < E; e++)
            local[e] = owner[e] % P;
    }
    if (k.rc < 0) {
        ck_finish(&k, "twohop_forward", shape, 0, "", -1.0, -1.0);
        ck_done(&k);
        return;
    }
    const size_t rk = (size_t)nrecv * K + 1;
    int *m1 = ck_host(&k, rk * 4);
    wk_cuda_ptr d_ids = ck_dev(&k, rk * 4, sids), d_g = ck_dev(&k, rk * 4, sg);
    wk_cuda_ptr d_local = ck_dev(&k, (size_t)E * 4, local);
    wk_cuda_ptr d_tpe = ck_dev(&k, (size_t)E * 4, NULL);
    wk_cuda_ptr d_lay = ck_dev(&k, (size_t)(2 * E + 2 * P + 2) * 4, NULL);
    wk_cuda_ptr d_fwd = ck_dev(&k, (size_t)rows2 * 4 + 4, NULL);
    wk_cuda_ptr d_fg = ck_dev(&k, (size_t)rows2 * 4 + 4, NULL), d_rslot = 0;
    int nr = nrecv, kk = K, ee = E, pp = P;

    if (k.rc == 0) {
        memset(m1, 0xff, rk * 4); /* the preset -1 of recv_slot */
        d_rslot = ck_dev(&k, rk * 4, m1);
    }
    {
        wk_cuda_ptr d_eoff = d_lay, d_rrows = d_lay + (size_t)(E + 1) * 4;
        wk_cuda_ptr d_roff = d_rrows + (size_t)P * 4, d_eslot = d_roff + (size_t)(P + 1) * 4;
        void *cargs[] = {&d_ids, &nr, &kk, &ee, &d_tpe};
        void *oargs[] = {&d_tpe, &d_local, &ee, &pp, &d_eoff, &d_rrows, &d_roff, &d_eslot};
        void *rargs[] = {&d_ids, &d_g, &nr, &kk, &ee, &d_eslot, &d_fwd, &d_fg, &d_rslot};

        ms = ck_launch(&k, tf.d_count, (unsigned)E, 0, cargs, 1);
        ck_launch(&k, tf.d_offsets, 1, 0, oargs, 1);
        ms += ck_launch(&k, tf.d_rows, (unsigned)E, 0, rargs, 1);
        ck_download(&k, lay_d, d_lay, (size_t)(2 * E + 2 * P + 2) * 4);
        ck_download(&k, fwd_d, d_fwd, (size_t)rows2 * 4);
        ck_download(&k, fg_d, d_fg, (size_t)rows2 * 4);
        ck_download(&k, rslot_d, d_rslot, (size_t)nrecv * K * 4);
        ok = k.rc == 0;
        if (ok) {
            const int *g_rrows = lay_d + E + 1, *g_roff = g_rrows + P, *g_eslot = g_roff + P + 1;
            ok = ck_compare(&k, "local_rows", g_rrows, lay, (size_t)P, 4, 0, why, sizeof(why));
            ok &= ck_compare(&k, "local_offset", g_roff, lay + P, (size_t)P + 1, 4, 0, why,
                             sizeof(why));
            ok &= ck_compare(&k, "expert_slot", g_eslot, lay + 2 * P + 1, (size_t)E, 4, 0, why,
                             sizeof(why));
            ok &= ck_compare(&k, "fwd_row", fwd_d, fwd, (size_t)rows2, 4, 0, why, sizeof(why));
            ok &= ck_compare(&k, "fwd_gate", fg_d, fg, (size_t)rows2, 4, 1, why, sizeof(why));
            ok &= ck_compare(&k, "recv_slot", rslot_d, rslot, (size_t)nrecv * K, 4, 0, why,
                             sizeof(why));
        }
        snprintf(shape, sizeof(shape), "%s %dx%d relay %d rows", s->name, N, P, nrecv);
        ck_finish(&k, "twohop_forward", shape, ok, why, ms, -1.0);
    }
    ck_done(&k);
}

void gc_check_twohop(struct gc *g)
{
    const struct twohop_shape shapes[] = {
        {37, 16, 4, 2, 4, 2, 2, 130, 0, "n=37 E=16 k=4 rand-own"},
        {300, 64, 8, 4, 6, 4, 8, 256, 1, "n=300 E=64 G=8/4 k=6"},
        {1000, 96, 1, 1, 8, 3, 4, 64, 0, "n=1000 E=96 k=8 rand-own"},
        {4096, 256, 8, 4, 8, 8, 8, 7168, 1, "n=4096 E=256 G=8/4 k=8"},
    };
    const int nshapes = (int)(sizeof(shapes) / sizeof(shapes[0]));

    if (setup(g) < 0) {
        gc_add_row(g, "twohop", "-", "FAIL (module)", -1.0, -1.0);
        g->failed++;
        return;
    }
    for (int i = 0; i < nshapes; i++) {
        if (g->small && shapes[i].n > 1024)
            continue;
        printf("  checking two-hop %s\n", shapes[i].name);
        fflush(stdout);
        check_hop1(g, &shapes[i]);
        check_hop2(g, &shapes[i]);
    }
}
