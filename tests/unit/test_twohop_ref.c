/* test_twohop_ref.c - the CPU reference of the two-hop dispatch
 * (kernels/twohop_ref.h): a hand-checked small case, argument checks, and
 * whole simulated clusters (2-4 nodes x 2-8 GPUs, random routings and
 * owners, every rank a source) where the two-hop path is run end to end
 * next to direct dispatch (kernels/ref.h):
 *  - every expert receives exactly the (source rank, token, gate, row)
 *    set that direct dispatch delivers to it;
 *  - rows crossing nodes = sum over tokens of the distinct other nodes
 *    its experts are on (never tokens x experts);
 *  - combine matches direct combine within 2 k 2^-24 (|base| + sum |g y|)
 *    per element, and bitwise when every token uses one node and there is
 *    no base;
 *  - with node-aligned groups and group_limit = max_nodes, routing's
 *    tokens never reach more than max_nodes nodes. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"
#include "kernels/twohop_ref.h"

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int rnd(uint64_t *s, int n)
{
    return (int)(splitmix(s) % (uint64_t)n);
}

static float rndf(uint64_t *s, float lo, float hi)
{
    return lo + (hi - lo) * (float)(splitmix(s) >> 40) * 0x1p-24f;
}

static void *zalloc(size_t n)
{
    void *p = calloc(n ? n : 1, 1);
    cr_assert_not_null(p);
    return p;
}

/* --- hand-checked ----------------------------------------------------------- */

Test(twohop_ref, small_case_by_hand)
{
    /* 2 nodes x 2 GPUs; experts 0, 1 on node 0, experts 2, 3 on node 1 */
    const struct dx_twohop_topo topo = {2, 2};
    const int owner[4] = {0, 1, 2, 3};
    const int ids[6] = {0, 1, 1, 2, 2, 3};
    const float gates[6] = {0.5f, 0.25f, 1.0f, 2.0f, 3.0f, 4.0f};
    int node_tokens[2], node_offset[3], send_token[4], slot[6], send_ids[8];
    float send_gates[8];

    cr_assert_eq(dx_kref_twohop_count(&topo, owner, 4, ids, 3, 2, node_tokens), 0);
    cr_assert_eq(node_tokens[0], 2);
    cr_assert_eq(node_tokens[1], 2);
    cr_assert_eq(dx_kref_twohop_offsets(node_tokens, 2, node_offset), 4);
    cr_assert_eq(node_offset[1], 2);
    cr_assert_eq(dx_kref_twohop_rows(&topo, owner, 4, ids, gates, 3, 2, node_offset, send_token,
                                     slot, send_ids, send_gates),
                 0);
    const int want_token[4] = {0, 1, 1, 2}, want_slot[6] = {0, -1, 1, 2, -1, 3};
    const int want_ids[8] = {0, 1, 1, -1, -1, 2, 2, 3};
    const float want_gates[8] = {0.5f, 0.25f, 1.0f, 0.0f, 0.0f, 2.0f, 3.0f, 4.0f};
    cr_assert_arr_eq(send_token, want_token, sizeof(want_token));
    cr_assert_arr_eq(slot, want_slot, sizeof(want_slot));
    cr_assert_arr_eq(send_ids, want_ids, sizeof(want_ids));
    cr_assert_arr_eq(send_gates, want_gates, sizeof(want_gates));

    /* the relay of node 1 forwards rows 2 and 3: expert 2 to GPU 0 (both
     * rows), expert 3 to GPU 1 */
    int local_rows[2], local_offset[3], expert_slot[4], fwd_row[3], recv_slot[4];
    float fwd_gate[3];
    cr_assert_eq(dx_kref_twohop_forward(&topo, owner, 4, 1, send_ids + 4, send_gates + 4, 2, 2,
                                        local_rows, local_offset, expert_slot, fwd_row, fwd_gate,
                                        recv_slot),
                 0);
    const int want_lr[2] = {2, 1}, want_lo[3] = {0, 2, 3}, want_fr[3] = {0, 1, 1};
    const int want_rs[4] = {-1, 0, 1, 2};
    const float want_fg[3] = {2.0f, 3.0f, 4.0f};
    cr_assert_arr_eq(local_rows, want_lr, sizeof(want_lr));
    cr_assert_arr_eq(local_offset, want_lo, sizeof(want_lo));
    cr_assert_arr_eq(fwd_row, want_fr, sizeof(want_fr));
    cr_assert_arr_eq(recv_slot, want_rs, sizeof(want_rs));
    cr_assert_arr_eq(fwd_gate, want_fg, sizeof(want_fg));
    cr_assert_eq(expert_slot[2], 0);
    cr_assert_eq(expert_slot[3], 2);

    /* combine, d = 1: the relay sums 3 * y0 + 4 * y2 for token 2 */
    const float y[3] = {10.0f, 100.0f, 1000.0f};
    float partial[2];
    dx_kref_twohop_relay_combine(y, 1, send_gates + 4, recv_slot, 2, 2, partial);
    cr_assert_eq(partial[0], 20.0f);
    cr_assert_eq(partial[1], 4300.0f);
    const float all_partial[4] = {7.0f, 8.0f, partial[0], partial[1]}, base[3] = {1, 2, 3};
    float out[3];
    dx_kref_twohop_combine(all_partial, 1, slot, 3, 2, base, out);
    cr_assert_eq(out[0], 8.0f);
    cr_assert_eq(out[1], 30.0f);
    cr_assert_eq(out[2], 4303.0f);
}

Test(twohop_ref, rejects_bad_arguments)
{
    const struct dx_twohop_topo topo = {2, 2}, bad = {0, 2};
    const int owner[4] = {0, 1, 2, 3}, bad_owner[4] = {0, 1, 2, 4};
    const int ids[2] = {0, 4}, masked[2] = {0, 2};
    int nt[2], lr[2], lo[3], es[4], fr[2], rs[2];

    cr_assert_eq(dx_kref_twohop_check(&bad, owner, 4), -EINVAL);
    cr_assert_eq(dx_kref_twohop_check(&topo, bad_owner, 4), -EINVAL);
    cr_assert_eq(dx_kref_twohop_count(&topo, owner, 4, ids, 1, 2, nt), -EINVAL, "id 4 of 4");
    /* expert 2 is on node 1: not something node 0's relay may receive */
    cr_assert_eq(
        dx_kref_twohop_forward(&topo, owner, 4, 0, masked, NULL, 1, 2, lr, lo, es, fr, NULL, rs),
        -EINVAL);
}

/* --- simulated clusters --------------------------------------------------------- */

struct cluster {
    struct dx_twohop_topo topo;
    int R, E, k, d;
    int *owner;
    int n[32];                /* tokens of each source rank */
    int *ids[32];             /* [n][k] ascending, distinct */
    float *gates[32], *x[32]; /* [n][k], [n][d] */
    float *base[32];          /* [n][d] or NULL */
    float *w, *b;             /* expert e's output: y = x * w[e] + b[e] */
};

/* A delivered row, as an expert sees it. */
struct delivered {
    int src, token;
    float gate;
    const float *x;
};

static int by_origin(const void *a, const void *b)
{
    const struct delivered *p = a, *q = b;
    return p->src != q->src ? p->src - q->src : p->token - q->token;
}

static void expert_output(const struct cluster *c, int e, const float *x, float *y)
{
    for (int i = 0; i < c->d; i++)
        y[i] = x[i] * c->w[(size_t)e * c->d + i] + c->b[(size_t)e * c->d + i];
}

/* Random ascending distinct experts for every token; when one_node, all of a
 * token's experts on one node (needs k <= experts per node). */
static void make_cluster(struct cluster *c, uint64_t *s, int nodes, int per_node, int one_node,
                         int with_base)
{
    memset(c, 0, sizeof(*c));
    c->topo = (struct dx_twohop_topo){nodes, per_node};
    c->R = nodes * per_node;
    c->E = c->R * (1 + rnd(s, 3));
    c->k = 1 + rnd(s, c->E < 8 ? c->E : 8);
    c->d = 1 + rnd(s, 6);
    c->owner = zalloc((size_t)c->E * sizeof(int));
    /* every node holds E / nodes experts, in a random order */
    for (int e = 0; e < c->E; e++)
        c->owner[e] = (e % nodes) * per_node + rnd(s, per_node);
    if (one_node && c->k > c->E / nodes)
        c->k = c->E / nodes;
    c->w = zalloc((size_t)c->E * c->d * sizeof(float));
    c->b = zalloc((size_t)c->E * c->d * sizeof(float));
    for (int i = 0; i < c->E * c->d; i++) {
        c->w[i] = rndf(s, -2.0f, 2.0f);
        c->b[i] = rndf(s, -1.0f, 1.0f);
    }
    for (int r = 0; r < c->R; r++) {
        int n = rnd(s, 41);
        char *used = zalloc((size_t)c->E);
        c->n[r] = n;
        c->ids[r] = zalloc((size_t)n * c->k * sizeof(int));
        c->gates[r] = zalloc((size_t)n * c->k * sizeof(float));
        c->x[r] = zalloc((size_t)n * c->d * sizeof(float));
        c->base[r] = with_base ? zalloc((size_t)n * c->d * sizeof(float)) : NULL;
        for (int t = 0; t < n; t++) {
            int node = rnd(s, nodes), got = 0;
            memset(used, 0, (size_t)c->E);
            while (got < c->k) {
                int e = one_node ? node + nodes * rnd(s, c->E / nodes) : rnd(s, c->E);
                if (!used[e]) {
                    used[e] = 1;
                    got++;
                }
            }
            for (int e = 0, j = 0; e < c->E; e++)
                if (used[e])
                    c->ids[r][(size_t)t * c->k + j++] = e;
            for (int j = 0; j < c->k; j++)
                c->gates[r][(size_t)t * c->k + j] = rndf(s, 0.0f, 1.0f);
            for (int i = 0; i < c->d; i++) {
                c->x[r][(size_t)t * c->d + i] = rndf(s, -4.0f, 4.0f);
                if (with_base)
                    c->base[r][(size_t)t * c->d + i] = rndf(s, -1.0f, 1.0f);
            }
        }
        free(used);
    }
}

static void free_cluster(struct cluster *c)
{
    for (int r = 0; r < c->R; r++) {
        free(c->ids[r]);
        free(c->gates[r]);
        free(c->x[r]);
        free(c->base[r]);
    }
    free(c->owner);
    free(c->w);
    free(c->b);
}

/* Direct dispatch of every source: per expert, what it receives; and every
 * source's combine, out[r] [n][d]. */
static void run_direct(const struct cluster *c, struct delivered **got, int *ngot, float **out)
{
    int E = c->E, R = c->R, k = c->k, d = c->d;
    int *tpe = zalloc((size_t)E * sizeof(int)), *eoff = zalloc(((size_t)E + 1) * sizeof(int));
    int *rrows = zalloc((size_t)R * sizeof(int)), *roff = zalloc(((size_t)R + 1) * sizeof(int));
    int *eslot = zalloc((size_t)E * sizeof(int));

    for (int r = 0; r < R; r++) {
        int n = c->n[r], rows = n * k;
        int *stok = zalloc((size_t)rows * sizeof(int)), *tslot = zalloc((size_t)rows * sizeof(int));
        float *sgate = zalloc((size_t)rows * sizeof(float));
        float *send = zalloc((size_t)rows * d * sizeof(float));
        float *y = zalloc((size_t)rows * d * sizeof(float));

        cr_assert_eq(dx_kref_dispatch_count(c->ids[r], n, k, E, tpe), 0);
        cr_assert_eq(dx_kref_dispatch_offsets(tpe, c->owner, E, R, eoff, rrows, roff, eslot), 0);
        cr_assert_eq(
            dx_kref_dispatch_rows(c->ids[r], c->gates[r], n, k, E, eslot, stok, sgate, tslot), 0);
        dx_kref_dispatch_pack(c->x[r], d, stok, rows, send);
        for (int e = 0; e < E; e++)
            for (int row = eslot[e]; row < eslot[e] + tpe[e]; row++) {
                got[e][ngot[e]++] =
                    (struct delivered){r, stok[row], sgate[row], c->x[r] + (size_t)stok[row] * d};
                expert_output(c, e, send + (size_t)row * d, y + (size_t)row * d);
            }
        out[r] = zalloc((size_t)n * d * sizeof(float));
        dx_kref_combine(y, d, c->gates[r], tslot, n, k, c->base[r], out[r]);
        free(stok);
        free(tslot);
        free(sgate);
        free(send);
        free(y);
    }
    free(tpe);
    free(eoff);
    free(rrows);
    free(roff);
    free(eslot);
}

/* One source's hop-1 layout. */
struct hop1 {
    int node_tokens[8], node_offset[9], rows;
    int *send_token, *slot, *send_ids;
    float *send_gates, *send, *back; /* back: partials returned, hop-1 layout */
};

/* One relay's hop 2. */
struct relay {
    int nrecv, rows2, local_rows[8], local_offset[9];
    int *src, *src_row, *ids, *expert_slot, *fwd_row, *recv_slot;
    float *gates, *x, *fwd_gate, *y, *partial;
};

/* The two-hop path end to end; checks the crossing rows on the way. */
/* The cuda backend makes both of the two-hop sums with dx_combine (masked
 * slots add nothing; gates NULL here: all 1, as the source's sum has none):
 * its result must be want's bits. */
static void same_as_dispatch_combine(const float *y, int d, const float *gates, const int *slot,
                                     int n, int k, const float *base, const float *want)
{
    float *ones = zalloc((size_t)n * k * sizeof(float)),
          *got = zalloc((size_t)n * d * sizeof(float));

    for (size_t i = 0; i < (size_t)n * k; i++)
        ones[i] = 1.0f;
    dx_kref_combine(y, d, gates ? gates : ones, slot, n, k, base, got);
    cr_assert(memcmp(got, want, (size_t)n * d * sizeof(float)) == 0,
              "dx_combine differs from the two-hop sum");
    free(ones);
    free(got);
}

static void run_twohop(const struct cluster *c, struct delivered **got, int *ngot, float **out)
{
    const int N = c->topo.nodes, P = c->topo.per_node, R = c->R, E = c->E, k = c->k, d = c->d;
    struct hop1 h[32];
    struct relay rl[32];

    /* hop 1 at every source */
    for (int r = 0; r < R; r++) {
        int n = c->n[r], crossing = 0, want_crossing = 0;
        struct hop1 *p = &h[r];

        cr_assert_eq(dx_kref_twohop_count(&c->topo, c->owner, E, c->ids[r], n, k, p->node_tokens),
                     0);
        p->rows = dx_kref_twohop_offsets(p->node_tokens, N, p->node_offset);
        cr_assert_leq(p->rows, n * k);
        p->send_token = zalloc((size_t)p->rows * sizeof(int));
        p->slot = zalloc((size_t)n * N * sizeof(int));
        p->send_ids = zalloc((size_t)p->rows * k * sizeof(int));
        p->send_gates = zalloc((size_t)p->rows * k * sizeof(float));
        p->send = zalloc((size_t)p->rows * d * sizeof(float));
        p->back = zalloc((size_t)p->rows * d * sizeof(float));
        cr_assert_eq(dx_kref_twohop_rows(&c->topo, c->owner, E, c->ids[r], c->gates[r], n, k,
                                         p->node_offset, p->send_token, p->slot, p->send_ids,
                                         p->send_gates),
                     0);
        dx_kref_dispatch_pack(c->x[r], d, p->send_token, p->rows, p->send);
        /* crossing rows: tokens x distinct other nodes, counted independently */
        for (int t = 0; t < n; t++) {
            char on[8] = {0};
            for (int j = 0; j < k; j++)
                on[c->owner[c->ids[r][(size_t)t * k + j]] / P] = 1;
            for (int m = 0; m < N; m++) {
                want_crossing += on[m] && m != r / P;
                cr_assert_eq(p->slot[(size_t)t * N + m] >= 0, on[m], "token %d node %d", t, m);
            }
        }
        for (int m = 0; m < N; m++)
            crossing += m != r / P ? p->node_tokens[m] : 0;
        cr_assert_eq(crossing, want_crossing);
    }
    /* hop 2 at every relay (m, l): rows from (a, l), a ascending */
    for (int q = 0; q < R; q++) {
        const int m = q / P, l = q % P;
        struct relay *x = &rl[q];
        int at = 0;

        x->nrecv = 0;
        for (int a = 0; a < N; a++)
            x->nrecv += h[a * P + l].node_tokens[m];
        x->src = zalloc((size_t)x->nrecv * sizeof(int));
        x->src_row = zalloc((size_t)x->nrecv * sizeof(int));
        x->ids = zalloc((size_t)x->nrecv * k * sizeof(int));
        x->recv_slot = zalloc((size_t)x->nrecv * k * sizeof(int));
        x->gates = zalloc((size_t)x->nrecv * k * sizeof(float));
        x->x = zalloc((size_t)x->nrecv * d * sizeof(float));
        x->partial = zalloc((size_t)x->nrecv * d * sizeof(float));
        for (int a = 0; a < N; a++) {
            const struct hop1 *p = &h[a * P + l];
            for (int row = p->node_offset[m]; row < p->node_offset[m + 1]; row++, at++) {
                x->src[at] = a * P + l;
                x->src_row[at] = row;
                memcpy(x->ids + (size_t)at * k, p->send_ids + (size_t)row * k, sizeof(int) * k);
                memcpy(x->gates + (size_t)at * k, p->send_gates + (size_t)row * k,
                       sizeof(float) * k);
                memcpy(x->x + (size_t)at * d, p->send + (size_t)row * d, sizeof(float) * d);
            }
        }
        x->expert_slot = zalloc((size_t)E * sizeof(int));
        x->fwd_row = zalloc((size_t)x->nrecv * k * sizeof(int));
        x->fwd_gate = zalloc((size_t)x->nrecv * k * sizeof(float));
        cr_assert_eq(dx_kref_twohop_forward(&c->topo, c->owner, E, m, x->ids, x->gates, x->nrecv, k,
                                            x->local_rows, x->local_offset, x->expert_slot,
                                            x->fwd_row, x->fwd_gate, x->recv_slot),
                     0);
        x->rows2 = x->local_offset[P];
        x->y = zalloc((size_t)x->rows2 * d * sizeof(float));
        /* the node's GPUs compute; each forwarded row lands at GPU j of
         * this node in [local_offset[j], local_offset[j + 1]) */
        for (int r = 0; r < x->nrecv; r++)
            for (int j = 0; j < k; j++) {
                int f = x->recv_slot[(size_t)r * k + j], e = x->ids[(size_t)r * k + j];
                if (f < 0) {
                    cr_assert_eq(e, -1);
                    continue;
                }
                cr_assert_eq(c->owner[e] / P, m, "expert %d forwarded on node %d", e, m);
                cr_assert(f >= x->local_offset[c->owner[e] % P] &&
                          f < x->local_offset[c->owner[e] % P + 1]);
                cr_assert_eq(x->fwd_row[f], r);
                const struct hop1 *p = &h[x->src[r]];
                int t = p->send_token[x->src_row[r]];
                got[e][ngot[e]++] = (struct delivered){x->src[r], t, x->fwd_gate[f],
                                                       c->x[x->src[r]] + (size_t)t * d};
                expert_output(c, e, x->x + (size_t)x->fwd_row[f] * d, x->y + (size_t)f * d);
            }
        dx_kref_twohop_relay_combine(x->y, d, x->gates, x->recv_slot, x->nrecv, k, x->partial);
        same_as_dispatch_combine(x->y, d, x->gates, x->recv_slot, x->nrecv, k, NULL, x->partial);
        for (int r = 0; r < x->nrecv; r++)
            memcpy(h[x->src[r]].back + (size_t)x->src_row[r] * d, x->partial + (size_t)r * d,
                   sizeof(float) * d);
    }
    for (int r = 0; r < R; r++) {
        out[r] = zalloc((size_t)c->n[r] * d * sizeof(float));
        dx_kref_twohop_combine(h[r].back, d, h[r].slot, c->n[r], N, c->base[r], out[r]);
        same_as_dispatch_combine(h[r].back, d, NULL, h[r].slot, c->n[r], N, c->base[r], out[r]);
        free(h[r].send_token);
        free(h[r].slot);
        free(h[r].send_ids);
        free(h[r].send_gates);
        free(h[r].send);
        free(h[r].back);
    }
    for (int q = 0; q < R; q++) {
        struct relay *x = &rl[q];
        free(x->src);
        free(x->src_row);
        free(x->ids);
        free(x->expert_slot);
        free(x->fwd_row);
        free(x->recv_slot);
        free(x->gates);
        free(x->x);
        free(x->fwd_gate);
        free(x->y);
        free(x->partial);
    }
}

/* Both paths on one cluster; bitwise: combine must match exactly. */
static void compare_paths(const struct cluster *c, int bitwise)
{
    const int E = c->E, d = c->d, k = c->k;
    int total = 0, *nd = zalloc((size_t)E * sizeof(int)), *nt = zalloc((size_t)E * sizeof(int));
    struct delivered **dg = zalloc((size_t)E * sizeof(*dg)), **tg = zalloc((size_t)E * sizeof(*tg));
    float *od[32], *ot[32];

    for (int r = 0; r < c->R; r++)
        total += c->n[r] * k;
    for (int e = 0; e < E; e++) {
        dg[e] = zalloc((size_t)total * sizeof(struct delivered));
        tg[e] = zalloc((size_t)total * sizeof(struct delivered));
    }
    run_direct(c, dg, nd, od);
    run_twohop(c, tg, nt, ot);
    for (int e = 0; e < E; e++) {
        cr_assert_eq(nt[e], nd[e], "expert %d: %d rows two-hop, %d direct", e, nt[e], nd[e]);
        qsort(dg[e], (size_t)nd[e], sizeof(struct delivered), by_origin);
        qsort(tg[e], (size_t)nt[e], sizeof(struct delivered), by_origin);
        for (int i = 0; i < nd[e]; i++) {
            cr_assert_eq(tg[e][i].src, dg[e][i].src);
            cr_assert_eq(tg[e][i].token, dg[e][i].token);
            cr_assert_eq(tg[e][i].gate, dg[e][i].gate);
            cr_assert_eq(tg[e][i].x, dg[e][i].x);
        }
    }
    for (int r = 0; r < c->R; r++) {
        for (int t = 0; t < c->n[r]; t++)
            for (int i = 0; i < d; i++) {
                size_t o = (size_t)t * d + i;
                double mag = c->base[r] ? fabs(c->base[r][o]) : 0.0, bound;
                for (int j = 0; j < k; j++) {
                    int e = c->ids[r][(size_t)t * k + j];
                    float y = c->x[r][o] * c->w[(size_t)e * d + i] + c->b[(size_t)e * d + i];
                    mag += fabs((double)(c->gates[r][(size_t)t * k + j] * y));
                }
                bound = 2.0 * k * 0x1p-24 * mag * 1.0001;
                if (bitwise)
                    cr_assert_eq(ot[r][o], od[r][o], "rank %d token %d [%d]: %a vs %a", r, t, i,
                                 ot[r][o], od[r][o]);
                else
                    cr_assert_leq(fabs((double)ot[r][o] - od[r][o]), bound,
                                  "rank %d token %d [%d]: %a vs %a, bound %g", r, t, i, ot[r][o],
                                  od[r][o], bound);
            }
        free(od[r]);
        free(ot[r]);
    }
    for (int e = 0; e < E; e++) {
        free(dg[e]);
        free(tg[e]);
    }
    free(dg);
    free(tg);
    free(nd);
    free(nt);
}

Test(twohop_ref, matches_direct_dispatch_on_random_clusters)
{
    uint64_t s = 42;

    for (int iter = 0; iter < 60; iter++) {
        struct cluster c;
        int nodes = 2 + rnd(&s, 3), per_node = 2 + rnd(&s, 7);

        make_cluster(&c, &s, nodes, per_node, 0, iter % 2);
        compare_paths(&c, 0);
        free_cluster(&c);
    }
}

Test(twohop_ref, one_node_per_token_combines_bitwise)
{
    uint64_t s = 7;

    for (int iter = 0; iter < 30; iter++) {
        struct cluster c;
        int nodes = 2 + rnd(&s, 3), per_node = 2 + rnd(&s, 7);

        make_cluster(&c, &s, nodes, per_node, 1, 0);
        compare_paths(&c, 1);
        free_cluster(&c);
    }
}

/* Routing with node-aligned groups (group g on node g / (G / N)) and
 * group_limit = max_nodes: no token reaches more nodes. */
Test(twohop_ref, node_limited_routing_keeps_max_nodes)
{
    uint64_t s = 99;

    for (int iter = 0; iter < 40; iter++) {
        const int N = 2 + rnd(&s, 3), P = 2 + rnd(&s, 7), R = N * P;
        const int G = N * (1 + rnd(&s, 2)), gs = 2 + rnd(&s, 4), E = G * gs;
        const int limit = 1 + rnd(&s, N), top_k = 1 + rnd(&s, limit * gs < 8 ? limit * gs : 8);
        const int n = 1 + rnd(&s, 200);
        struct dx_kref_route_cfg cfg = {E, G, limit, top_k, 1.0f};
        struct dx_twohop_topo topo = {N, P};
        float *scores = zalloc((size_t)n * E * sizeof(float)), *bias = zalloc((size_t)E * 4);
        int *ids = zalloc((size_t)n * top_k * sizeof(int)), *counts = zalloc((size_t)E * 4);
        float *gates = zalloc((size_t)n * top_k * sizeof(float));
        int *owner = zalloc((size_t)E * 4), nt[8], no[9], rows, crossing = 0;
        int *stok, *slot;

        for (int i = 0; i < n * E; i++)
            scores[i] = rndf(&s, 0.001f, 0.999f);
        /* group g's experts on node g / (G / N), any GPU of it */
        for (int e = 0; e < E; e++)
            owner[e] = (e / gs) / (G / N) * P + rnd(&s, P);
        cr_assert_eq(dx_kref_route(&cfg, scores, bias, n, ids, gates, counts), 0);
        cr_assert_eq(dx_kref_twohop_count(&topo, owner, E, ids, n, top_k, nt), 0);
        rows = dx_kref_twohop_offsets(nt, N, no);
        stok = zalloc((size_t)rows * 4);
        slot = zalloc((size_t)n * N * 4);
        cr_assert_eq(
            dx_kref_twohop_rows(&topo, owner, E, ids, gates, n, top_k, no, stok, slot, NULL, NULL),
            0);
        for (int t = 0; t < n; t++) {
            int reached = 0;
            for (int m = 0; m < N; m++)
                reached += slot[(size_t)t * N + m] >= 0;
            cr_assert_geq(reached, 1);
            cr_assert_leq(reached, limit, "token %d reaches %d nodes, group_limit %d", t, reached,
                          limit);
            crossing += reached - (slot[(size_t)t * N] >= 0); /* source on node 0 */
        }
        cr_assert_leq(rows, n * limit);
        cr_assert_eq(crossing, rows - nt[0]);
        (void)R;
        free(scores);
        free(bias);
        free(ids);
        free(counts);
        free(gates);
        free(owner);
        free(stok);
        free(slot);
    }
}
