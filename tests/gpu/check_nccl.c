/* check_nccl.c - NCCL as worker/cuda/comm/nccl.c calls it, on one GPU (NCCL puts one
 * rank per device, so every communicator here has one rank): a unique id, a
 * communicator from it, the fp32 sum all-reduce (out of place and in place:
 * with one rank the result is the input, bitwise), a grouped send and
 * receive to self of fp32 and of an odd number of bytes (a copy, bitwise),
 * a split (one color, and NO_COLOR), an abort that returns and leaves the
 * communicator refusing work, and the destroy. Rows carry the times. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "tests/gpu/gpucheck.h"
#include "worker/cuda/comm/nccl.h"

#define NCCL_ELEMS (16u << 20)       /* 64 MiB of fp32 */
#define NCCL_ELEMS_SMALL (64u << 10) /* --small */
#define NCCL_ODD_BYTES 1000003u      /* not a multiple of anything NCCL likes */

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* A row that is not a comparison: PASS, or FAIL with why on stderr. */
static void nccl_row(struct gc *g, const char *check, const char *shape, int ok, const char *why,
                     double ms)
{
    char res[96];

    if (ok) {
        gc_add_row(g, check, shape, "PASS", ms, -1.0);
        return;
    }
    snprintf(res, sizeof(res), "FAIL %.80s", why);
    fprintf(stderr, "duplex-gpucheck: %s %s: %s\n", check, shape, why);
    gc_add_row(g, check, shape, res, -1.0, -1.0);
    g->failed++;
}

/* Records start, runs op iters times on stream, records end: ms per op
 * (-1 after an error, reported in k). op returns 0 or -errno. */
struct nccl_op {
    wk_nccl_t *n;
    wk_cuda_stream stream;
    int (*run)(const struct nccl_op *op);
    wk_cuda_ptr a, b;
    size_t count;
    const struct wk_nccl_transfer *t;
    size_t nt;
};

static int run_allreduce(const struct nccl_op *op)
{
    return wk_nccl_allreduce_sum(op->n, op->stream, op->a, op->b, op->count);
}

static int run_exchange(const struct nccl_op *op)
{
    return wk_nccl_exchange(op->n, op->stream, op->t, op->nt);
}

static double nccl_timed(struct ck *k, const struct nccl_op *op, int iters)
{
    wk_cuda_t *c = k->g->c;
    wk_cuda_event start = NULL, end = NULL;
    float ms = -1.0f;

    if (k->rc < 0)
        return -1.0;
    if (wk_cuda_event_create(c, &start) < 0 || wk_cuda_event_create(c, &end) < 0 ||
        wk_cuda_event_record_on(c, start, op->stream) < 0) {
        ck_fail(k, wk_cuda_error(c));
        goto out;
    }
    for (int i = 0; i < iters; i++)
        if (op->run(op) < 0) {
            ck_fail(k, wk_nccl_error(op->n));
            goto out;
        }
    if (wk_cuda_event_record_on(c, end, op->stream) < 0 ||
        wk_cuda_event_elapsed(c, start, end, &ms) < 0 || wk_cuda_stream_sync(c, op->stream) < 0) {
        ck_fail(k, wk_cuda_error(c));
        ms = -1.0f;
        goto out;
    }
    if (wk_nccl_check(op->n) < 0) {
        ck_fail(k, wk_nccl_error(op->n));
        ms = -1.0f;
    }
out:
    if (start)
        wk_cuda_event_destroy(c, start);
    if (end)
        wk_cuda_event_destroy(c, end);
    return ms >= 0.0f ? (double)ms / iters : -1.0;
}

/* the poisoning memsets run on the default stream, which the check's
 * non-blocking stream does not wait for */
static void settle(struct ck *k)
{
    if (k->rc == 0 && wk_cuda_sync(k->g->c) < 0)
        ck_fail(k, wk_cuda_error(k->g->c));
}

static void check_allreduce(struct gc *g, wk_nccl_t *n, wk_cuda_stream stream, size_t count,
                            int in_place, const char *which)
{
    struct ck k = {.g = g};
    float *x = ck_host(&k, count * 4), *got = ck_host(&k, count * 4);
    wk_cuda_ptr d_in, d_out;
    struct nccl_op op = {.n = n, .stream = stream, .run = run_allreduce, .count = count};
    char shape[64], why[512] = "";
    double ms = -1.0;
    int ok = 0;

    if (k.rc == 0)
        gc_fill(g, x, count, -1.0f, 1.0f);
    d_in = ck_dev(&k, count * 4, x);
    d_out = in_place ? d_in : ck_dev(&k, count * 4, NULL);
    settle(&k);
    op.a = d_in;
    op.b = d_out;
    nccl_timed(&k, &op, 1); /* the first call sets NCCL up: checked, not timed */
    ck_download(&k, got, d_out, count * 4);
    if (k.rc == 0)
        ok = ck_compare(&k, "sum", got, x, count, 4, 1, why, sizeof(why));
    /* one rank: the sum is the input, so repeating it in place is idempotent */
    if (ok)
        ms = nccl_timed(&k, &op, g->iters);
    snprintf(shape, sizeof(shape), "%zu fp32, %s%s", count, which, in_place ? ", in place" : "");
    ck_finish(&k, in_place ? "nccl_allreduce_ip" : "nccl_allreduce", shape, ok, why, ms,
              gc_gbs(2.0 * (double)count * 4, ms));
    ck_done(&k);
}

static void check_exchange(struct gc *g, wk_nccl_t *n, wk_cuda_stream stream, size_t count)
{
    struct ck k = {.g = g};
    float *x = ck_host(&k, count * 4), *got = ck_host(&k, count * 4);
    unsigned char *bytes = ck_host(&k, NCCL_ODD_BYTES), *got_bytes = ck_host(&k, NCCL_ODD_BYTES);
    wk_cuda_ptr d_src, d_dst, d_bsrc, d_bdst;
    struct wk_nccl_transfer t[4];
    struct nccl_op op = {.n = n, .stream = stream, .run = run_exchange, .t = t, .nt = 4};
    char shape[64], why[512] = "";
    double ms = -1.0;
    int ok = 0;

    if (k.rc == 0) {
        gc_fill(g, x, count, -1.0f, 1.0f);
        for (size_t i = 0; i < NCCL_ODD_BYTES; i++)
            bytes[i] = (unsigned char)gc_u64(g);
    }
    d_src = ck_dev(&k, count * 4, x);
    d_dst = ck_dev(&k, count * 4, NULL);
    d_bsrc = ck_dev(&k, NCCL_ODD_BYTES, bytes);
    d_bdst = ck_dev(&k, NCCL_ODD_BYTES, NULL);
    settle(&k);
    /* receives listed before the sends: one group, so the order is free */
    t[0] = (struct wk_nccl_transfer){1, 0, WK_NCCL_FP32, d_dst, count};
    t[1] = (struct wk_nccl_transfer){1, 0, WK_NCCL_BYTES, d_bdst, NCCL_ODD_BYTES};
    t[2] = (struct wk_nccl_transfer){0, 0, WK_NCCL_FP32, d_src, count};
    t[3] = (struct wk_nccl_transfer){0, 0, WK_NCCL_BYTES, d_bsrc, NCCL_ODD_BYTES};
    nccl_timed(&k, &op, 1);
    ck_download(&k, got, d_dst, count * 4);
    ck_download(&k, got_bytes, d_bdst, NCCL_ODD_BYTES);
    if (k.rc == 0) {
        ok = ck_compare(&k, "fp32", got, x, count, 4, 1, why, sizeof(why));
        ok &= ck_compare(&k, "bytes", got_bytes, bytes, NCCL_ODD_BYTES, 1, 0, why, sizeof(why));
    }
    if (ok)
        ms = nccl_timed(&k, &op, g->iters);
    snprintf(shape, sizeof(shape), "%zu fp32 + %u B, 0->0", count, NCCL_ODD_BYTES);
    ck_finish(&k, "nccl_sendrecv", shape, ok, why, ms,
              gc_gbs(2.0 * ((double)count * 4 + NCCL_ODD_BYTES), ms));
    ck_done(&k);
}

/* a split of the one rank with color 0 works like its parent; NO_COLOR
 * gives no communicator */
static void check_split(struct gc *g, wk_nccl_t *n, wk_cuda_stream stream)
{
    wk_nccl_t *sub = NULL, *none = (wk_nccl_t *)n;
    char why[512] = "";
    double t0 = now_ms(), ms;
    int ok = 0;

    if (wk_nccl_split(n, 0, 0, &sub) < 0) {
        snprintf(why, sizeof(why), "%s", wk_nccl_error(n));
    } else if (wk_nccl_size(sub) != 1 || wk_nccl_rank(sub) != 0) {
        snprintf(why, sizeof(why), "the split has rank %d of %d, not 0 of 1", wk_nccl_rank(sub),
                 wk_nccl_size(sub));
    } else if (wk_nccl_split(n, WK_NCCL_NO_COLOR, 0, &none) < 0) {
        snprintf(why, sizeof(why), "NO_COLOR: %s", wk_nccl_error(n));
    } else if (none) {
        snprintf(why, sizeof(why), "NO_COLOR gave a communicator");
        wk_nccl_destroy(none);
    } else {
        ok = 1;
    }
    ms = now_ms() - t0;
    nccl_row(g, "nccl_split", "color 0 key 0; NO_COLOR", ok, why, ms);
    if (ok)
        check_allreduce(g, sub, stream, 4099, 0, "the split"); /* the child works too */
    t0 = now_ms();
    wk_nccl_destroy(sub);
    if (ok)
        nccl_row(g, "nccl_destroy", "the split", 1, "", now_ms() - t0);
}

/* abort: returns (no peer to wait for), and the communicator refuses work */
static void check_abort(struct gc *g, wk_cuda_stream stream)
{
    unsigned char id[WK_NCCL_ID_BYTES];
    wk_nccl_t *n = NULL;
    char why[512] = "";
    double t0, ms = -1.0;
    int ok = 0, rc;

    if (wk_nccl_unique_id(g->c, id, why, sizeof(why)) < 0 ||
        wk_nccl_create(g->c, id, 1, 0, &n, why, sizeof(why)) < 0) {
        nccl_row(g, "nccl_abort", "1 rank", 0, why, -1.0);
        return;
    }
    t0 = now_ms();
    if (wk_nccl_abort(n) < 0) {
        snprintf(why, sizeof(why), "%s", wk_nccl_error(n));
    } else {
        ms = now_ms() - t0;
        if ((rc = wk_nccl_allreduce_sum(n, stream, 1, 1, 1)) != -ECANCELED)
            snprintf(why, sizeof(why), "an all-reduce after the abort returned %d, not -ECANCELED",
                     rc);
        else if ((rc = wk_nccl_abort(n)) != 0)
            snprintf(why, sizeof(why), "a second abort returned %d", rc);
        else
            ok = 1;
    }
    wk_nccl_destroy(n);
    nccl_row(g, "nccl_abort", "1 rank", ok, why, ms);
}

void gc_check_nccl(struct gc *g)
{
    unsigned char id[WK_NCCL_ID_BYTES];
    size_t count = g->small ? NCCL_ELEMS_SMALL : NCCL_ELEMS;
    wk_cuda_stream stream = NULL;
    wk_nccl_t *n = NULL;
    char why[512] = "";
    double t0, ms;
    int zeros = 0;

    if (!g->full) {
        nccl_row(g, "nccl", "", 0, "NCCL not available", -1.0);
        return;
    }
    t0 = now_ms();
    if (wk_nccl_unique_id(g->c, id, why, sizeof(why)) < 0) {
        nccl_row(g, "nccl_id", "ncclGetUniqueId", 0, why, -1.0);
        return;
    }
    ms = now_ms() - t0;
    for (int i = 0; i < WK_NCCL_ID_BYTES; i++)
        zeros += id[i] == 0;
    nccl_row(g, "nccl_id", "ncclGetUniqueId, 128 B", zeros < WK_NCCL_ID_BYTES, "an id of zeros",
             ms);
    if (wk_cuda_stream_create(g->c, &stream) < 0) {
        nccl_row(g, "nccl_init", "a stream", 0, wk_cuda_error(g->c), -1.0);
        return;
    }
    t0 = now_ms();
    if (wk_nccl_create(g->c, id, 1, 0, &n, why, sizeof(why)) < 0) {
        nccl_row(g, "nccl_init", "1 rank", 0, why, -1.0);
        goto out;
    }
    nccl_row(g, "nccl_init", "1 rank", 1, "", now_ms() - t0);
    check_allreduce(g, n, stream, count, 0, "1 rank");
    check_allreduce(g, n, stream, count, 1, "1 rank");
    check_exchange(g, n, stream, count);
    check_split(g, n, stream);
    t0 = now_ms();
    wk_nccl_destroy(n);
    nccl_row(g, "nccl_destroy", "1 rank", 1, "", now_ms() - t0);
    check_abort(g, stream);
out:
    wk_cuda_stream_destroy(g->c, stream);
}
