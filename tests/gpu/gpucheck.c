/* gpucheck.c - duplex-gpucheck: runs every CUDA kernel embedded in
 * libdxkernels.a on a GPU against its CPU reference on fresh random data,
 * the libraries the cuda backend uses (cuBLASLt, NCCL) and the IPC transport
 * between two processes, and times them against a device-to-device copy.
 * This file owns the run: options, the harness of gpucheck.h (buffers,
 * launches, comparisons) and the table printed last; the checks live in
 * check_*.c. Exit 0 when every check passes, 1 when one fails, 2 when the
 * GPU stack cannot be used. */
#include "tests/gpu/gpucheck.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_SEED 20261128u
#define DEFAULT_ITERS 20

/* --- random numbers (splitmix64) ----------------------------------------- */

uint64_t gc_u64(struct gc *g)
{
    uint64_t z = (g->rng += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [lo, hi) */
float gc_uniform(struct gc *g, float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(gc_u64(g) >> 40) / (double)(1ull << 24));
}

void gc_fill(struct gc *g, float *v, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        v[i] = gc_uniform(g, lo, hi);
}

/* --- buffers ------------------------------------------------------------- */

void ck_fail(struct ck *k, const char *what)
{
    if (k->rc == 0) {
        k->rc = -EIO;
        snprintf(k->err, sizeof(k->err), "%s", what);
    }
}

void *ck_host(struct ck *k, size_t bytes)
{
    void *p;

    if (k->rc < 0)
        return NULL;
    if (k->nh == GC_MAX_BUFS || !(p = malloc(bytes ? bytes : 1))) {
        ck_fail(k, "out of host memory");
        return NULL;
    }
    memset(p, GC_POISON, bytes);
    k->h[k->nh++] = p;
    return p;
}

/* device buffer of bytes, poisoned; from src when src is not NULL */
wk_cuda_ptr ck_dev(struct ck *k, size_t bytes, const void *src)
{
    wk_cuda_ptr p = 0;

    if (k->rc < 0)
        return 0;
    if (k->nd == GC_MAX_BUFS) {
        ck_fail(k, "too many device buffers");
        return 0;
    }
    if (wk_cuda_alloc(k->g->c, bytes, &p) < 0) {
        ck_fail(k, wk_cuda_error(k->g->c));
        return 0;
    }
    k->d[k->nd++] = p;
    if ((src ? wk_cuda_upload(k->g->c, p, src, bytes)
             : wk_cuda_memset(k->g->c, p, GC_POISON, bytes)) < 0)
        ck_fail(k, wk_cuda_error(k->g->c));
    return p;
}

void ck_download(struct ck *k, void *dst, wk_cuda_ptr src, size_t bytes)
{
    if (k->rc == 0 && wk_cuda_download(k->g->c, dst, src, bytes) < 0)
        ck_fail(k, wk_cuda_error(k->g->c));
}

void ck_done(struct ck *k)
{
    for (int i = 0; i < k->nd; i++)
        wk_cuda_free(k->g->c, k->d[i]);
    for (int i = 0; i < k->nh; i++)
        free(k->h[i]);
    k->nd = k->nh = 0;
}

/* Launches fn iters times between two events; ms per launch. */
double ck_launch(struct ck *k, wk_cuda_function_t fn, unsigned grid, unsigned shmem, void **args,
                 int iters)
{
    struct gc *g = k->g;
    wk_cuda_event start = NULL, end = NULL;
    const unsigned gr[3] = {grid, 1, 1}, bl[3] = {GC_BLOCK, 1, 1};
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
unsigned gc_warp_grid(const struct gc *g, size_t items)
{
    size_t per = GC_BLOCK / 32, blocks = (items + per - 1) / per, cap = (size_t)g->sms * 8;

    if (blocks < 1)
        blocks = 1;
    return (unsigned)(blocks < cap ? blocks : cap);
}

/* --- comparison and the table --------------------------------------------- */

void gc_add_row(struct gc *g, const char *check, const char *shape, const char *result, double ms,
                double gbs)
{
    struct gc_row *r;

    if (g->nrows == GC_MAX_ROWS)
        return;
    r = &g->rows[g->nrows++];
    snprintf(r->check, sizeof(r->check), "%s", check);
    snprintf(r->shape, sizeof(r->shape), "%s", shape);
    snprintf(r->result, sizeof(r->result), "%s", result);
    r->ms = ms;
    r->gbs = gbs;
}

/* Bitwise comparison of n elements of 4 bytes (floats when is_float) or 1
 * byte; appends "differ" details to res. 1 when equal. */
int ck_compare(struct ck *k, const char *name, const void *got, const void *want, size_t n,
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
int ck_compare_rel(struct ck *k, const char *name, const float *got, const float *want, size_t n,
                   double bound, char *res, size_t reslen)
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
void ck_finish(struct ck *k, const char *check, const char *shape, int ok, const char *why,
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
    gc_add_row(k->g, check, shape, res, ok ? ms : -1.0, ok ? gbs : -1.0);
}

double gc_gbs(double bytes, double ms)
{
    return ms > 0.0 ? bytes / (ms * 1e6) : -1.0;
}

unsigned gc_row_grid(const struct gc *g, int rows)
{
    size_t cap = (size_t)g->sms * 16, r = rows > 0 ? (size_t)rows : 1;

    return (unsigned)(r < cap ? r : cap);
}

/* blocks for one thread per element (grid-stride) */
unsigned gc_elem_grid(const struct gc *g, size_t items)
{
    size_t blocks = (items + GC_BLOCK - 1) / GC_BLOCK, cap = (size_t)g->sms * 16;

    if (blocks < 1)
        blocks = 1;
    return (unsigned)(blocks < cap ? blocks : cap);
}

/* Re-launches an idempotent kernel iters times for its time, once it passed. */
double ck_retime(struct ck *k, int ok, wk_cuda_function_t fn, unsigned grid, void **args, double ms)
{
    return ok ? ck_launch(k, fn, grid, 0, args, k->g->iters) : ms;
}

/* --- modules ---------------------------------------------------------------- */

int gc_module(struct gc *g, const char *name, const unsigned char *cubin, size_t cubin_len,
              const unsigned char *ptx, wk_cuda_module *mod)
{
    *mod = NULL;
    if (g->nmods == GC_MAX_MODULES) {
        fprintf(stderr, "duplex-gpucheck: too many modules\n");
        return -EIO;
    }
    if (cubin_len && wk_cuda_module_load(g->c, cubin, mod) == 0) {
        printf("  %-11s cubin (%zu bytes)\n", name, cubin_len);
    } else {
        fprintf(stderr, "duplex-gpucheck: warning: %s cubin does not load (%s); JIT from PTX\n",
                name, wk_cuda_error(g->c));
        if (wk_cuda_module_load(g->c, ptx, mod) < 0) {
            fprintf(stderr, "duplex-gpucheck: %s PTX does not load either: %s\n", name,
                    wk_cuda_error(g->c));
            return -EIO;
        }
        printf("  %-11s PTX (JIT)\n", name);
    }
    g->mods[g->nmods++] = *mod;
    return 0;
}

int gc_functions(struct gc *g, wk_cuda_module mod, const char *const *names,
                 wk_cuda_function_t *const *fns, int n)
{
    for (int i = 0; i < n; i++) {
        if (wk_cuda_function(g->c, mod, names[i], fns[i]) < 0) {
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
        const struct gc_row *r = &g->rows[i];
        char ms[16] = "-", gbs[16] = "-", pct[16] = "-";

        if (r->ms >= 0.0)
            snprintf(ms, sizeof(ms), "%.4f", r->ms);
        if (r->gbs >= 0.0)
            snprintf(gbs, sizeof(gbs), "%.1f", r->gbs);
        if (r->gbs >= 0.0 && g->copy_gbs > 0.0)
            snprintf(pct, sizeof(pct), "%.0f%%", 100.0 * r->gbs / g->copy_gbs);
        printf("%-19s %-40s %-16s %9s %8s %6s\n", r->check, r->shape, r->result, ms, gbs, pct);
    }
    printf("\n%d check%s failed. A PASS shows its largest error / its bound (relative to\n"
           "|want| floored at the array's RMS; each file's header derives its bounds), or\n"
           "\"err 0\": bitwise (int32, e4m3 codes, the kernels that keep the reference's order:\n"
           "dispatch, fp8, train, two-hop, conversions, NCCL). Elementwise 1e-5 (rmsnorm dg\n"
           "1e-4, swiglu 1e-6, MoE sigmoid 5 2^-23); attention P 2e-5, ctx/dq/dk/dv 2e-4; GEMM "
           "fp32 8u sqrt(k)+4u,\n"
           "bf16 + u k/4 (u = 2^-24).\n",
           g->failed, g->failed == 1 ? "" : "s");
}

static void usage(FILE *f)
{
    fprintf(f, "usage: duplex-gpucheck [--seed N] [--iters N] [--small] [--device N]\n"
               "                       [--cuda-lib PATH] [--nccl-lib PATH] [--cublaslt-lib PATH]\n"
               "Checks every CUDA kernel against its CPU reference, cuBLASLt and NCCL as the\n"
               "cuda backend calls them and the IPC transport between two processes, and\n"
               "times them against a device-to-device copy.\n"
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
        {"nccl-lib", required_argument, NULL, 'n'},
        {"cublaslt-lib", required_argument, NULL, 'b'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct wk_cuda_paths paths = {0};
    static struct gc g;
    uint64_t seed = DEFAULT_SEED;
    int opt, major = 0, minor = 0, sms = 0, rc = 2;
    char err[1024];

    if (argc > 1 && strcmp(argv[1], "--transport-peer") == 0)
        return gc_transport_peer(argc, argv);
    setvbuf(stdout, NULL, _IOLBF, 0); /* in order with stderr through a pipe */
    g.iters = DEFAULT_ITERS;
    g.self = argv[0];
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
            g.small = 1;
            break;
        case 'd':
            g.device = atoi(optarg);
            break;
        case 'c':
            paths.cuda = optarg;
            break;
        case 'n':
            paths.nccl = optarg;
            break;
        case 'b':
            paths.cublaslt = optarg;
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
    g.cuda_lib = paths.cuda;
    printf("duplex-gpucheck: seed %" PRIu64 " (--seed to repeat)\n", seed);
    if (wk_cuda_open(&paths, &g.c, err, sizeof(err)) == 0) {
        g.full = 1;
    } else {
        /* the kernels need the driver only: check them, fail the rest */
        fprintf(stderr, "duplex-gpucheck: %s\n", err);
        paths.driver_only = 1;
        if (wk_cuda_open(&paths, &g.c, err, sizeof(err)) < 0) {
            fprintf(stderr, "duplex-gpucheck: %s\n", err);
            return 2;
        }
        fprintf(stderr, "duplex-gpucheck: checking the kernels only\n");
    }
    if (wk_cuda_context(g.c, g.device) < 0 || wk_cuda_device_info(g.c, &major, &minor, &sms) < 0) {
        fprintf(stderr, "duplex-gpucheck: %s\n", wk_cuda_error(g.c));
        goto out;
    }
    g.sms = sms > 0 ? (unsigned)sms : 1;
    printf("duplex-gpucheck: %s; device %d: sm_%d%d, %d SMs\n", wk_cuda_describe(g.c), g.device,
           major, minor, sms);
    gc_time_copy(&g);
    gc_check_kernels(&g);
    gc_check_attention(&g);
    gc_check_train_kernels(&g);
    gc_check_moe(&g);
    gc_check_twohop(&g);
    gc_check_gemm(&g);
    gc_check_nccl(&g);
    gc_check_transport(&g);
    print_table(&g);
    rc = g.failed ? 1 : 0;
out:
    for (int i = 0; i < g.nmods; i++)
        wk_cuda_module_unload(g.c, g.mods[i]);
    wk_cuda_close(g.c);
    return rc;
}
