/* fake_kernels.c - the kernels libfakecuda.so can run: host functions
 * under the names of the CUDA kernels in kernels/ (each one the CPU
 * reference of that kernel's contract, so code that drives the GPU runs
 * its real sequence of launches on a machine without one), plus a few
 * test-only kernels (dx_fake_*) for the driver layer's own tests. Owns the
 * name -> function table. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "kernels/convert_ref.h"
#include "kernels/ref.h"
#include "kernels/transport_ref.h"
#include "kernels/twohop_ref.h"
#include "tests/fake/fakecuda.h"

/* how long a transport kernel waits for its peer before -ETIMEDOUT */
#define FAKE_TRANSPORT_TIMEOUT_MS 30000

#define ARG(type, i) (*(type *)args[(i)])

static double now_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* --- test-only kernels ------------------------------------------------------ */

/* dx_fake_fill_u32(uint32_t *p, uint64_t n, uint32_t v): p[0..n) = v */
static int fill_u32(const struct fake_grid *g, void **args)
{
    uint32_t *p = ARG(uint32_t *, 0);
    uint64_t n = ARG(uint64_t, 1);
    uint32_t v = ARG(uint32_t, 2);

    (void)g;
    for (uint64_t i = 0; i < n; i++)
        p[i] = v;
    return 0;
}

/* dx_fake_add_u32(uint32_t *dst, const uint32_t *src, uint64_t n): dst += src */
static int add_u32(const struct fake_grid *g, void **args)
{
    uint32_t *dst = ARG(uint32_t *, 0);
    const uint32_t *src = ARG(const uint32_t *, 1);
    uint64_t n = ARG(uint64_t, 2);

    (void)g;
    for (uint64_t i = 0; i < n; i++)
        dst[i] += src[i];
    return 0;
}

/* dx_fake_sleep(uint32_t ms): keeps its stream busy */
static int sleep_ms(const struct fake_grid *g, void **args)
{
    uint32_t ms = ARG(uint32_t, 0);
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};

    (void)g;
    nanosleep(&t, NULL);
    return 0;
}

/* dx_bench_fma(out, iters, a, b) (kernels/bench.cu): compute-bound on the
 * GPU; here it takes time in proportion to iters (1 us each) and writes
 * out[thread] = b / (1 - a), the chains' limit */
static int bench_fma(const struct fake_grid *g, void **args)
{
    float *out = ARG(float *, 0);
    const int iters = ARG(int, 1);
    const float a = ARG(float, 2), b = ARG(float, 3);
    const size_t threads = (size_t)g->grid[0] * g->block[0];
    struct timespec t = {iters / 1000000, (long)(iters % 1000000) * 1000L};

    nanosleep(&t, NULL);
    for (size_t i = 0; i < threads; i++)
        out[i] = b / (1.0f - a);
    return 0;
}

/* dx_fake_fault(): a kernel that faults */
static int fault(const struct fake_grid *g, void **args)
{
    (void)g;
    (void)args;
    return 1;
}

/* --- the intra-node transport (kernels/transport.cu) ------------------------- */

/* dx_transport_send(ring, slots, slot_bytes, src, msg_off, msg_len, nmsg,
 * err): one block per channel; channel c sends messages c, c + C, ... and
 * leaves 0 or -errno in err[c]. Blocks run one after the other here, which
 * the protocol allows: the receiver visits the channels in the same order. */
static int transport_send(const struct fake_grid *g, void **args)
{
    unsigned char *ring = ARG(unsigned char *, 0);
    const unsigned char *src = ARG(const unsigned char *, 3);
    const uint64_t *off = ARG(const uint64_t *, 4), *len = ARG(const uint64_t *, 5);
    int nmsg = ARG(int, 6);
    int *err = ARG(int *, 7);
    const unsigned C = g->grid[0];

    for (unsigned c = 0; c < C; c++) {
        int rc = 0;

        for (int m = (int)c; m < nmsg && rc == 0; m += (int)C) {
            const double deadline = now_ms() + FAKE_TRANSPORT_TIMEOUT_MS;
            unsigned tries = 0;

            /* src may be 0 with absolute offsets (the expert exchange's) */
            const unsigned char *p = (const unsigned char *)((uintptr_t)src + off[m]);

            if ((uintptr_t)p & 15) {
                rc = -EINVAL;
                break;
            }
            while ((rc = dx_tref_try_send(ring, c, p, len[m])) == -EAGAIN) {
                if (now_ms() > deadline) {
                    rc = -ETIMEDOUT;
                    break;
                }
                fake_backoff(&tries); /* a GPU's block spins; here it shares the CPU */
            }
        }
        err[c] = rc;
    }
    return 0;
}

/* dx_transport_recv(ring, slots, slot_bytes, dst, msg_off, msg_cap, nmsg,
 * msg_len, err) */
static int transport_recv(const struct fake_grid *g, void **args)
{
    unsigned char *ring = ARG(unsigned char *, 0);
    unsigned char *dst = ARG(unsigned char *, 3);
    const uint64_t *off = ARG(const uint64_t *, 4), *cap = ARG(const uint64_t *, 5);
    int nmsg = ARG(int, 6);
    uint64_t *out_len = ARG(uint64_t *, 7);
    int *err = ARG(int *, 8);
    const unsigned C = g->grid[0];

    for (unsigned c = 0; c < C; c++) {
        int rc = 0;

        for (int m = (int)c; m < nmsg && rc == 0; m += (int)C) {
            const double deadline = now_ms() + FAKE_TRANSPORT_TIMEOUT_MS;
            unsigned tries = 0;
            size_t got = 0;

            unsigned char *q = (unsigned char *)((uintptr_t)dst + off[m]);

            if ((uintptr_t)q & 15) {
                rc = -EINVAL;
                break;
            }
            while ((rc = dx_tref_try_recv(ring, c, q, cap[m], &got)) == -EAGAIN) {
                if (now_ms() > deadline) {
                    rc = -ETIMEDOUT;
                    break;
                }
                fake_backoff(&tries);
            }
            if (rc == 0 || rc == -ENOBUFS)
                out_len[m] = got;
        }
        err[c] = rc;
    }
    return 0;
}

/* --- routing, dispatch and fp8 (kernels/routing.cu, dispatch.cu, fp8.cu) --- */

/* dx_route_topk(scores, bias, n, E, G, group_limit, top_k, route_scale, ids,
 * gates, counts) */
static int route_topk(const struct fake_grid *g, void **args)
{
    const struct dx_kref_route_cfg cfg = {ARG(int, 3), ARG(int, 4), ARG(int, 5), ARG(int, 6),
                                          ARG(float, 7)};

    (void)g;
    return dx_kref_route(&cfg, ARG(const float *, 0), ARG(const float *, 1), ARG(int, 2),
                         ARG(int *, 8), ARG(float *, 9), ARG(int *, 10)) != 0;
}

/* dx_dispatch_count(ids, n, k, E, tokens_per_expert) */
static int dispatch_count(const struct fake_grid *g, void **args)
{
    (void)g;
    return dx_kref_dispatch_count(ARG(const int *, 0), ARG(int, 1), ARG(int, 2), ARG(int, 3),
                                  ARG(int *, 4)) != 0;
}

/* dx_dispatch_offsets(tokens_per_expert, owner, E, R, expert_offset,
 * rank_rows, rank_offset, expert_slot) */
static int dispatch_offsets(const struct fake_grid *g, void **args)
{
    (void)g;
    return dx_kref_dispatch_offsets(ARG(const int *, 0), ARG(const int *, 1), ARG(int, 2),
                                    ARG(int, 3), ARG(int *, 4), ARG(int *, 5), ARG(int *, 6),
                                    ARG(int *, 7)) != 0;
}

/* dx_dispatch_rows(ids, gates, n, k, E, expert_slot, send_token, send_gate,
 * token_slot) */
static int dispatch_rows(const struct fake_grid *g, void **args)
{
    (void)g;
    return dx_kref_dispatch_rows(ARG(const int *, 0), ARG(const float *, 1), ARG(int, 2),
                                 ARG(int, 3), ARG(int, 4), ARG(const int *, 5), ARG(int *, 6),
                                 ARG(float *, 7), ARG(int *, 8)) != 0;
}

/* dx_dispatch_pack(x, d, send_token, rows, send) */
static int dispatch_pack(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_dispatch_pack(ARG(const float *, 0), ARG(int, 1), ARG(const int *, 2), ARG(int, 3),
                          ARG(float *, 4));
    return 0;
}

/* dx_combine(y, d, gates, token_slot, n, k, base, out) */
static int combine(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_combine(ARG(const float *, 0), ARG(int, 1), ARG(const float *, 2), ARG(const int *, 3),
                    ARG(int, 4), ARG(int, 5), ARG(const float *, 6), ARG(float *, 7));
    return 0;
}

/* dx_fp8_quant_1x128(x, rows, cols, q, scales) */
static int fp8_quant(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_fp8_quant(ARG(const float *, 0), ARG(int, 1), ARG(int, 2), ARG(uint8_t *, 3),
                      ARG(float *, 4));
    return 0;
}

/* dx_fp8_quant_rec(x, rows, cols, rec, pitch) */
static int fp8_quant_rec(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_fp8_quant_rec(ARG(const float *, 0), ARG(int, 1), ARG(int, 2), ARG(uint8_t *, 3),
                          ARG(int, 4));
    return 0;
}

/* dx_fp8_dequant_rec(rec, pitch, rows, cols, x) */
static int fp8_dequant_rec(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_fp8_dequant_rec(ARG(const uint8_t *, 0), ARG(int, 1), ARG(int, 2), ARG(int, 3),
                            ARG(float *, 4));
    return 0;
}

/* dx_fp8_dequant_1x128(q, scales, rows, cols, x) */
static int fp8_dequant(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_fp8_dequant(ARG(const uint8_t *, 0), ARG(const float *, 1), ARG(int, 2), ARG(int, 3),
                        ARG(float *, 4));
    return 0;
}

/* --- elementwise layers (kernels/elementwise.cu): the contracts in its
 * header comment, row sums in index order (the kernels' order differs:
 * results agree to the bounds duplex-gpucheck states) --------------------- */

/* dx_rmsnorm_fwd(x, g, n, d, eps, y, rstd) */
static int rmsnorm_fwd(const struct fake_grid *gr, void **args)
{
    const float *x = ARG(const float *, 0), *g = ARG(const float *, 1);
    const int n = ARG(int, 2), d = ARG(int, 3);
    const float eps = ARG(float, 4);
    float *y = ARG(float *, 5), *rstd = ARG(float *, 6);

    (void)gr;
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * d;
        float ss = 0.0f, r;

        for (int j = 0; j < d; j++)
            ss += xi[j] * xi[j];
        r = (float)(1.0 / sqrt((double)ss / d + (double)eps));
        rstd[i] = r;
        for (int j = 0; j < d; j++)
            y[(size_t)i * d + j] = xi[j] * r * g[j];
    }
    return 0;
}

/* dx_rmsnorm_bwd(x, g, dy, rstd, n, d, rows_per_block, dx, dgpart): block b
 * of the grid owns rows [b * rows_per_block, +rows_per_block) */
static int rmsnorm_bwd(const struct fake_grid *gr, void **args)
{
    const float *x = ARG(const float *, 0), *g = ARG(const float *, 1);
    const float *dy = ARG(const float *, 2), *rstd = ARG(const float *, 3);
    const int n = ARG(int, 4), d = ARG(int, 5), per = ARG(int, 6);
    float *dx = ARG(float *, 7), *dgpart = ARG(float *, 8);

    for (unsigned b = 0; b < gr->grid[0]; b++) {
        float *part = dgpart + (size_t)b * d;
        const int first = (int)b * per, last = first + per < n ? first + per : n;

        for (int j = 0; j < d; j++)
            part[j] = 0.0f;
        for (int i = first; i < last; i++) {
            const float *xi = x + (size_t)i * d, *dyi = dy + (size_t)i * d, r = rstd[i];
            float dot = 0.0f, k;

            for (int j = 0; j < d; j++)
                dot += g[j] * dyi[j] * xi[j];
            k = dot / (float)d * r * r * r;
            for (int j = 0; j < d; j++) {
                dx[(size_t)i * d + j] = r * g[j] * dyi[j] - xi[j] * k;
                part[j] += dyi[j] * xi[j] * r;
            }
        }
    }
    return 0;
}

/* dx_rmsnorm_dg(dgpart, parts, d, dg): dg += the parts, in order */
static int rmsnorm_dg(const struct fake_grid *gr, void **args)
{
    const float *part = ARG(const float *, 0);
    const int parts = ARG(int, 1), d = ARG(int, 2);
    float *dg = ARG(float *, 3);

    (void)gr;
    for (int j = 0; j < d; j++) {
        float s = 0.0f;

        for (int p = 0; p < parts; p++)
            s += part[(size_t)p * d + j];
        dg[j] += s;
    }
    return 0;
}

static float sigmoid(float z)
{
    return 1.0f / (1.0f + expf(-z));
}

/* dx_swiglu_fwd(h1, h3, count, act) */
static int swiglu_fwd(const struct fake_grid *gr, void **args)
{
    const float *h1 = ARG(const float *, 0), *h3 = ARG(const float *, 1);
    const long long count = ARG(long long, 2);
    float *act = ARG(float *, 3);

    (void)gr;
    for (long long i = 0; i < count; i++)
        act[i] = h1[i] * sigmoid(h1[i]) * h3[i];
    return 0;
}

/* dx_swiglu_bwd(h1, h3, dact, count, dh1, dh3) */
static int swiglu_bwd(const struct fake_grid *gr, void **args)
{
    const float *h1 = ARG(const float *, 0), *h3 = ARG(const float *, 1);
    const float *dact = ARG(const float *, 2);
    const long long count = ARG(long long, 3);
    float *dh1 = ARG(float *, 4), *dh3 = ARG(float *, 5);

    (void)gr;
    for (long long i = 0; i < count; i++) {
        const float z = h1[i], sg = sigmoid(z), da = dact[i];

        dh3[i] = da * z * sg;
        dh1[i] = da * h3[i] * sg * (1.0f + z * (1.0f - sg));
    }
    return 0;
}

/* dx_softmax_xent_fwd(logits, targets, n, vocab, probs, loss) */
static int xent_fwd(const struct fake_grid *gr, void **args)
{
    const float *z = ARG(const float *, 0);
    const int32_t *t = ARG(const int32_t *, 1);
    const int n = ARG(int, 2), vocab = ARG(int, 3);
    float *probs = ARG(float *, 4), *loss = ARG(float *, 5);

    (void)gr;
    for (int i = 0; i < n; i++) {
        const float *zi = z + (size_t)i * vocab;
        float *pi = probs + (size_t)i * vocab, m = -INFINITY, s = 0.0f, inv;

        for (int j = 0; j < vocab; j++)
            m = fmaxf(m, zi[j]);
        for (int j = 0; j < vocab; j++)
            s += (pi[j] = expf(zi[j] - m));
        inv = 1.0f / s;
        for (int j = 0; j < vocab; j++)
            pi[j] *= inv;
        loss[i] = t[i] >= 0 && t[i] < vocab ? logf(s) - (zi[t[i]] - m) : NAN;
    }
    return 0;
}

/* dx_softmax_xent_bwd(probs, targets, n, vocab, dlogits) */
static int xent_bwd(const struct fake_grid *gr, void **args)
{
    const float *probs = ARG(const float *, 0);
    const int32_t *t = ARG(const int32_t *, 1);
    const int n = ARG(int, 2), vocab = ARG(int, 3);
    float *dl = ARG(float *, 4);
    const float inv_n = 1.0f / (float)n;

    (void)gr;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < vocab; j++) {
            const float v = probs[(size_t)i * vocab + j] * inv_n;

            dl[(size_t)i * vocab + j] = j == t[i] ? v - inv_n : v;
        }
    return 0;
}

/* --- kernels/train.cu (emulated as the CUDA code does it) -------------------- */

static unsigned warps_of(const struct fake_grid *g)
{
    return g->grid[0] * (g->block[0] / 32);
}

static int embed_fwd(const struct fake_grid *gr, void **args)
{
    const float *w = ARG(const float *, 0);
    const int32_t *t = ARG(const int32_t *, 1);
    int n = ARG(int, 2), d = ARG(int, 3), vocab = ARG(int, 4);
    float *y = ARG(float *, 5);
    (void)gr;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d; j++)
            y[(size_t)i * d + j] = t[i] >= 0 && t[i] < vocab ? w[(size_t)t[i] * d + j] : NAN;
    return 0;
}

static int embed_bwd(const struct fake_grid *gr, void **args)
{
    const int32_t *tok = ARG(const int32_t *, 0);
    const float *dy = ARG(const float *, 1);
    int n = ARG(int, 2), d = ARG(int, 3), vocab = ARG(int, 4);
    int32_t *chain = ARG(int32_t *, 5);
    float *dw = ARG(float *, 6);
    unsigned nw = warps_of(gr);
    /* warps in reverse order: any order must give the same result */
    for (int wid = (int)nw - 1; wid >= 0; wid--)
        for (int i = wid; i < n; i += (int)nw) {
            int t = tok[i], first = 1, prev = i;
            if (t < 0 || t >= vocab)
                continue;
            for (int at = 0; at < i && first; at += 32) {
                int any = 0;
                for (int l = 0; l < 32; l++)
                    any |= at + l < i && tok[at + l] == t;
                first = !any;
            }
            if (!first)
                continue;
            for (int at = i + 1; at < n; at += 32) {
                unsigned hits = 0;
                for (int l = 0; l < 32; l++)
                    if (at + l < n && tok[at + l] == t)
                        hits |= 1u << l;
                while (hits) {
                    int next = at + __builtin_ffs((int)hits) - 1;
                    hits &= hits - 1;
                    chain[prev] = next;
                    prev = next;
                }
            }
            chain[prev] = -1;
            for (int j = 0; j < d; j++) {
                float acc = dw[(size_t)t * d + j];
                for (int p = i; p >= 0; p = chain[p]) {
                    if (p >= n)
                        return 1; /* the GPU would fault */
                    acc = acc + dy[(size_t)p * d + j];
                }
                dw[(size_t)t * d + j] = acc;
            }
        }
    return 0;
}

static int adamw(const struct fake_grid *gr, void **args)
{
    float *w = ARG(float *, 0), *m = ARG(float *, 2), *v = ARG(float *, 3);
    const float *g = ARG(const float *, 1);
    long long n = ARG(long long, 4);
    float lr = ARG(float, 5), b1 = ARG(float, 6), b2 = ARG(float, 7), eps = ARG(float, 8);
    float bc1 = ARG(float, 9), bc2 = ARG(float, 10), decay = ARG(float, 11);
    const float ob1 = 1.0f - b1, ob2 = 1.0f - b2;
    (void)gr;
    for (long long i = 0; i < n; i++) {
        m[i] = b1 * m[i] + ob1 * g[i];
        v[i] = b2 * v[i] + ob2 * g[i] * g[i];
        const float step = lr * (m[i] / bc1) / (sqrtf(v[i] / bc2) + eps);
        w[i] = w[i] * decay - step;
    }
    return 0;
}

static int add(const struct fake_grid *gr, void **args)
{
    const float *a = ARG(const float *, 0), *b = ARG(const float *, 1);
    long long n = ARG(long long, 2);
    float *o = ARG(float *, 3);
    (void)gr;
    for (long long i = 0; i < n; i++)
        o[i] = a[i] + b[i];
    return 0;
}

static int scale(const struct fake_grid *gr, void **args)
{
    const float *x = ARG(const float *, 0);
    long long n = ARG(long long, 1);
    float s = ARG(float, 2), *o = ARG(float *, 3);
    (void)gr;
    for (long long i = 0; i < n; i++)
        o[i] = x[i] * s;
    return 0;
}

static int load_add(const struct fake_grid *gr, void **args)
{
    const int32_t *c = ARG(const int32_t *, 0);
    int E = ARG(int, 1);
    long long *l = ARG(long long *, 2);
    (void)gr;
    for (int e = 0; e < E; e++)
        l[e] += c[e];
    return 0;
}

static int bias_update(const struct fake_grid *gr, void **args)
{
    const long long *l = ARG(const long long *, 0);
    int E = ARG(int, 1);
    float gamma = ARG(float, 2), *b = ARG(float *, 3);
    double sum = 0.0, mean;
    (void)gr;
    for (int e = 0; e < E; e++)
        sum += (double)l[e];
    mean = sum / (double)E;
    for (int e = 0; e < E; e++) {
        double diff = mean - (double)l[e];
        if (diff > 0.0)
            b[e] = b[e] + gamma;
        else if (diff < 0.0)
            b[e] = b[e] - gamma;
    }
    return 0;
}

/* --- kernels/moe.cu (worker/model/moe.c's formulas, in its order) ------------- */

/* dx_moe_sigmoid(logits, count, scores) */
static int moe_sigmoid(const struct fake_grid *gr, void **args)
{
    const float *z = ARG(const float *, 0);
    long long n = ARG(long long, 1);
    float *s = ARG(float *, 2);
    (void)gr;
    for (long long i = 0; i < n; i++)
        s[i] = sigmoid(z[i]);
    return 0;
}

/* dx_moe_gate_scale(dout, d, send_token, send_gate, rows, dy) */
static int moe_gate_scale(const struct fake_grid *gr, void **args)
{
    const float *dout = ARG(const float *, 0), *gate = ARG(const float *, 3);
    int d = ARG(int, 1), rows = ARG(int, 4);
    const int *token = ARG(const int *, 2);
    float *dy = ARG(float *, 5);
    (void)gr;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < d; i++)
            dy[(size_t)r * d + i] = gate[r] * dout[(size_t)token[r] * d + i];
    return 0;
}

/* dx_moe_gate_dot(dout, d, y, token_slot, n, k, dgate) */
static int moe_gate_dot(const struct fake_grid *gr, void **args)
{
    const float *dout = ARG(const float *, 0), *y = ARG(const float *, 2);
    int d = ARG(int, 1), n = ARG(int, 4), k = ARG(int, 5);
    const int *slot = ARG(const int *, 3);
    float *dgate = ARG(float *, 6);
    (void)gr;
    for (size_t p = 0; p < (size_t)n * (size_t)k; p++) {
        const float *g = dout + p / (size_t)k * d, *yr = y + (size_t)slot[p] * d;
        float acc = 0.0f;
        for (int i = 0; i < d && slot[p] >= 0; i++)
            acc += g[i] * yr[i];
        dgate[p] = acc;
    }
    return 0;
}

/* dx_moe_router_grad(scores, E, ids, dgate, n, k, route_scale, dlogit) */
static int moe_router_grad(const struct fake_grid *gr, void **args)
{
    const float *scores = ARG(const float *, 0), *dgate = ARG(const float *, 3);
    int E = ARG(int, 1), n = ARG(int, 4), k = ARG(int, 5);
    const int *ids = ARG(const int *, 2);
    float route_scale = ARG(float, 6), *dlogit = ARG(float *, 7);
    (void)gr;
    for (int t = 0; t < n; t++) {
        const float *s = scores + (size_t)t * E, *dg = dgate + (size_t)t * k;
        const int *ch = ids + (size_t)t * k;
        float sum = 0.0f, dot = 0.0f;
        for (int j = 0; j < k; j++) {
            sum += s[ch[j]];
            dot += dg[j] * s[ch[j]];
        }
        for (int e = 0; e < E; e++)
            dlogit[(size_t)t * E + e] = 0.0f;
        for (int j = 0; j < k; j++) {
            float sj = s[ch[j]], ds = route_scale * (dg[j] / sum - dot / (sum * sum));
            dlogit[(size_t)t * E + ch[j]] = ds * sj * (1.0f - sj);
        }
    }
    return 0;
}

/* --- the two-hop layout (kernels/twohop.cu) ------------------------------------ */

/* The kernels take no expert count (ids are routing's output, in range):
 * the reference's checks get the largest id + 1. */
static int experts_of(const int *ids, int n, int k)
{
    int e = 0;

    for (long i = 0; i < (long)n * k; i++)
        if (ids[i] + 1 > e)
            e = ids[i] + 1;
    return e;
}

/* dx_twohop_count(ids, n, k, owner, per_node, N, node_tokens) */
static int twohop_count(const struct fake_grid *g, void **args)
{
    const int *ids = ARG(const int *, 0);
    const int n = ARG(int, 1), k = ARG(int, 2);
    const struct dx_twohop_topo topo = {ARG(int, 5), ARG(int, 4)};

    (void)g;
    return dx_kref_twohop_count(&topo, ARG(const int *, 3), experts_of(ids, n, k), ids, n, k,
                                ARG(int *, 6)) < 0;
}

/* dx_twohop_offsets(node_tokens, N, node_offset) */
static int twohop_offsets(const struct fake_grid *g, void **args)
{
    (void)g;
    return dx_kref_twohop_offsets(ARG(const int *, 0), ARG(int, 1), ARG(int *, 2)) < 0;
}

/* dx_twohop_rows(ids, gates, n, k, owner, per_node, N, node_offset,
 * send_token, token_node_slot, send_ids, send_gates) */
static int twohop_rows(const struct fake_grid *g, void **args)
{
    const int *ids = ARG(const int *, 0);
    const int n = ARG(int, 2), k = ARG(int, 3);
    const struct dx_twohop_topo topo = {ARG(int, 6), ARG(int, 5)};

    (void)g;
    return dx_kref_twohop_rows(&topo, ARG(const int *, 4), experts_of(ids, n, k), ids,
                               ARG(const float *, 1), n, k, ARG(const int *, 7), ARG(int *, 8),
                               ARG(int *, 9), ARG(int *, 10), ARG(float *, 11)) < 0;
}

/* --- bf16 conversion (kernels/convert.cu) --------------------------------------- */

/* dx_f32_to_bf16(x, y, count) */
static int f32_to_bf16(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_f32_to_bf16_array(ARG(const float *, 0), ARG(uint16_t *, 1), (size_t)ARG(long long, 2));
    return 0;
}

/* dx_bf16_to_f32(x, y, count) */
static int bf16_to_f32(const struct fake_grid *g, void **args)
{
    (void)g;
    dx_kref_bf16_to_f32_array(ARG(const uint16_t *, 0), ARG(float *, 1), (size_t)ARG(long long, 2));
    return 0;
}

/* --- causal attention (kernels/attention.cu): the contract of
 * wk_attn_core_forward / _backward (worker/model/attention.h) in loops --- */

struct attn_shape {
    int batch, seq, d, heads, dh;
    float scale;
};

static struct attn_shape attn_shape(int batch, int seq, int d, int heads)
{
    struct attn_shape a = {batch, seq, d, heads, d / heads, 0.0f};

    a.scale = 1.0f / sqrtf((float)a.dh);
    return a;
}

/* element c of head h of token row (b, i) in a [batch*seq][d] array */
#define AT(x, a, b, i, h, c)                                                                       \
    ((x)[((size_t)(b) * (a).seq + (i)) * (a).d + (size_t)(h) * (a).dh + (c)])
/* P[(b, h, i)][j] */
#define PAT(p, a, b, h, i, j)                                                                      \
    ((p)[(((size_t)(b) * (a).heads + (h)) * (a).seq + (i)) * (a).seq + (j)])

/* dP[i][j] = dctx_i . v_j */
static float attn_dp(const struct attn_shape *a, const float *dctx, const float *v, int b, int h,
                     int i, int j)
{
    float s = 0.0f;

    for (int c = 0; c < a->dh; c++)
        s += AT(dctx, *a, b, i, h, c) * AT(v, *a, b, j, h, c);
    return s;
}

/* dx_attn_fwd(q, k, v, batch, seq, d, heads, p, ctx) */
static int attn_fwd(const struct fake_grid *g, void **args)
{
    const float *q = ARG(const float *, 0), *k = ARG(const float *, 1), *v = ARG(const float *, 2);
    const struct attn_shape a = attn_shape(ARG(int, 3), ARG(int, 4), ARG(int, 5), ARG(int, 6));
    float *p = ARG(float *, 7), *ctx = ARG(float *, 8);

    (void)g;
    for (int b = 0; b < a.batch; b++)
        for (int h = 0; h < a.heads; h++)
            for (int i = 0; i < a.seq; i++) {
                float m = -INFINITY;
                double sum = 0.0;

                for (int j = 0; j < a.seq; j++) {
                    float s = 0.0f;

                    if (j > i) {
                        PAT(p, a, b, h, i, j) = 0.0f;
                        continue;
                    }
                    for (int c = 0; c < a.dh; c++)
                        s += AT(q, a, b, i, h, c) * AT(k, a, b, j, h, c);
                    PAT(p, a, b, h, i, j) = s * a.scale;
                    m = fmaxf(m, s * a.scale);
                }
                for (int j = 0; j <= i; j++)
                    sum += (PAT(p, a, b, h, i, j) = expf(PAT(p, a, b, h, i, j) - m));
                for (int j = 0; j <= i; j++)
                    PAT(p, a, b, h, i, j) = (float)(PAT(p, a, b, h, i, j) / sum);
                for (int c = 0; c < a.dh; c++) {
                    float s = 0.0f;

                    for (int j = 0; j <= i; j++)
                        s += PAT(p, a, b, h, i, j) * AT(v, a, b, j, h, c);
                    AT(ctx, a, b, i, h, c) = s;
                }
            }
    return 0;
}

/* dx_attn_bwd_dq(k, v, p, dctx, batch, seq, d, heads, dq, rowdot):
 * rowdot[(b, h, i)] = sum_j P dP; dq_i = sum_j scale P (dP - rowdot) k_j */
static int attn_bwd_dq(const struct fake_grid *g, void **args)
{
    const float *k = ARG(const float *, 0), *v = ARG(const float *, 1);
    const float *p = ARG(const float *, 2), *dctx = ARG(const float *, 3);
    const struct attn_shape a = attn_shape(ARG(int, 4), ARG(int, 5), ARG(int, 6), ARG(int, 7));
    float *dq = ARG(float *, 8), *rowdot = ARG(float *, 9);

    (void)g;
    for (int b = 0; b < a.batch; b++)
        for (int h = 0; h < a.heads; h++)
            for (int i = 0; i < a.seq; i++) {
                double dot = 0.0;
                float rd;

                for (int j = 0; j <= i; j++)
                    dot += (double)PAT(p, a, b, h, i, j) * attn_dp(&a, dctx, v, b, h, i, j);
                rd = (float)dot;
                rowdot[((size_t)b * a.heads + h) * a.seq + i] = rd;
                for (int c = 0; c < a.dh; c++)
                    AT(dq, a, b, i, h, c) = 0.0f;
                for (int j = 0; j <= i; j++) {
                    float ds =
                        a.scale * PAT(p, a, b, h, i, j) * (attn_dp(&a, dctx, v, b, h, i, j) - rd);

                    for (int c = 0; c < a.dh; c++)
                        AT(dq, a, b, i, h, c) += ds * AT(k, a, b, j, h, c);
                }
            }
    return 0;
}

/* dx_attn_bwd_dkdv(q, v, p, dctx, rowdot, batch, seq, d, heads, dk, dv):
 * dv_j = sum_{i >= j} P[i][j] dctx_i; dk_j = sum_{i >= j} dS[i][j] q_i */
static int attn_bwd_dkdv(const struct fake_grid *g, void **args)
{
    const float *q = ARG(const float *, 0), *v = ARG(const float *, 1);
    const float *p = ARG(const float *, 2), *dctx = ARG(const float *, 3);
    const float *rowdot = ARG(const float *, 4);
    const struct attn_shape a = attn_shape(ARG(int, 5), ARG(int, 6), ARG(int, 7), ARG(int, 8));
    float *dk = ARG(float *, 9), *dv = ARG(float *, 10);

    (void)g;
    for (int b = 0; b < a.batch; b++)
        for (int h = 0; h < a.heads; h++)
            for (int j = 0; j < a.seq; j++) {
                for (int c = 0; c < a.dh; c++)
                    AT(dk, a, b, j, h, c) = AT(dv, a, b, j, h, c) = 0.0f;
                for (int i = j; i < a.seq; i++) {
                    const float pij = PAT(p, a, b, h, i, j);
                    const float rd = rowdot[((size_t)b * a.heads + h) * a.seq + i];
                    const float ds = a.scale * pij * (attn_dp(&a, dctx, v, b, h, i, j) - rd);

                    for (int c = 0; c < a.dh; c++) {
                        AT(dv, a, b, j, h, c) += pij * AT(dctx, a, b, i, h, c);
                        AT(dk, a, b, j, h, c) += ds * AT(q, a, b, i, h, c);
                    }
                }
            }
    return 0;
}

/* --- the table ------------------------------------------------------------------- */

#define P sizeof(void *)
#define U32 sizeof(uint32_t)
#define U64 sizeof(uint64_t)
#define INT sizeof(int)
#define F32 sizeof(float)
#define I64 sizeof(long long)

static const struct fake_kernel kernels[] = {
    {"dx_fake_fill_u32", 3, {P, U64, U32}, fill_u32},
    {"dx_fake_add_u32", 3, {P, P, U64}, add_u32},
    {"dx_fake_sleep", 1, {U32}, sleep_ms},
    {"dx_fake_fault", 0, {0}, fault},
    {"dx_embed_fwd", 6, {P, P, INT, INT, INT, P}, embed_fwd},
    {"dx_embed_bwd", 7, {P, P, INT, INT, INT, P, P}, embed_bwd},
    {"dx_adamw", 12, {P, P, P, P, I64, F32, F32, F32, F32, F32, F32, F32}, adamw},
    {"dx_add", 4, {P, P, I64, P}, add},
    {"dx_scale", 4, {P, I64, F32, P}, scale},
    {"dx_moe_load_add", 3, {P, INT, P}, load_add},
    {"dx_moe_bias_update", 4, {P, INT, F32, P}, bias_update},
    {"dx_moe_sigmoid", 3, {P, I64, P}, moe_sigmoid},
    {"dx_moe_gate_scale", 6, {P, INT, P, P, INT, P}, moe_gate_scale},
    {"dx_moe_gate_dot", 7, {P, INT, P, P, INT, INT, P}, moe_gate_dot},
    {"dx_moe_router_grad", 8, {P, INT, P, P, INT, INT, F32, P}, moe_router_grad},
    {"dx_route_topk", 11, {P, P, INT, INT, INT, INT, INT, F32, P, P, P}, route_topk},
    {"dx_dispatch_count", 5, {P, INT, INT, INT, P}, dispatch_count},
    {"dx_dispatch_offsets", 8, {P, P, INT, INT, P, P, P, P}, dispatch_offsets},
    {"dx_dispatch_rows", 9, {P, P, INT, INT, INT, P, P, P, P}, dispatch_rows},
    {"dx_dispatch_pack", 5, {P, INT, P, INT, P}, dispatch_pack},
    {"dx_combine", 8, {P, INT, P, P, INT, INT, P, P}, combine},
    {"dx_fp8_quant_1x128", 5, {P, INT, INT, P, P}, fp8_quant},
    {"dx_fp8_dequant_1x128", 5, {P, P, INT, INT, P}, fp8_dequant},
    {"dx_fp8_quant_rec", 5, {P, INT, INT, P, INT}, fp8_quant_rec},
    {"dx_fp8_dequant_rec", 5, {P, INT, INT, INT, P}, fp8_dequant_rec},
    {"dx_rmsnorm_fwd", 7, {P, P, INT, INT, F32, P, P}, rmsnorm_fwd},
    {"dx_rmsnorm_bwd", 9, {P, P, P, P, INT, INT, INT, P, P}, rmsnorm_bwd},
    {"dx_rmsnorm_dg", 4, {P, INT, INT, P}, rmsnorm_dg},
    {"dx_swiglu_fwd", 4, {P, P, I64, P}, swiglu_fwd},
    {"dx_swiglu_bwd", 6, {P, P, P, I64, P, P}, swiglu_bwd},
    {"dx_softmax_xent_fwd", 6, {P, P, INT, INT, P, P}, xent_fwd},
    {"dx_softmax_xent_bwd", 5, {P, P, INT, INT, P}, xent_bwd},
    {"dx_twohop_count", 7, {P, INT, INT, P, INT, INT, P}, twohop_count},
    {"dx_twohop_offsets", 3, {P, INT, P}, twohop_offsets},
    {"dx_twohop_rows", 12, {P, P, INT, INT, P, INT, INT, P, P, P, P, P}, twohop_rows},
    {"dx_f32_to_bf16", 3, {P, P, I64}, f32_to_bf16},
    {"dx_bf16_to_f32", 3, {P, P, I64}, bf16_to_f32},
    {"dx_attn_fwd", 9, {P, P, P, INT, INT, INT, INT, P, P}, attn_fwd},
    {"dx_attn_bwd_dq", 10, {P, P, P, P, INT, INT, INT, INT, P, P}, attn_bwd_dq},
    {"dx_attn_bwd_dkdv", 11, {P, P, P, P, P, INT, INT, INT, INT, P, P}, attn_bwd_dkdv},
    {"dx_bench_fma", 4, {P, INT, F32, F32}, bench_fma},
    {"dx_transport_send", 8, {P, U32, U32, P, P, P, INT, P}, transport_send},
    {"dx_transport_recv", 9, {P, U32, U32, P, P, P, INT, P, P}, transport_recv},
};

__attribute__((visibility("default"))) const struct fake_kernel *fakecuda_kernel(int i)
{
    return i >= 0 && (size_t)i < sizeof(kernels) / sizeof(kernels[0]) ? &kernels[i] : NULL;
}

const struct fake_kernel *fake_kernel_find(const char *name)
{
    for (size_t i = 0; i < sizeof(kernels) / sizeof(kernels[0]); i++)
        if (strcmp(kernels[i].name, name) == 0)
            return &kernels[i];
    return NULL;
}
