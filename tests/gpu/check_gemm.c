/* check_gemm.c - duplex-gpucheck's checks of cuBLASLt as worker/cuda/cublas.c
 * calls it (the model's three GEMM forms, fp32 and bf16, plain and with an
 * SM target) against OpenBLAS's cblas_sgemm, and of the fp32 <-> bf16
 * conversion kernels (kernels/convert.cu) against their CPU reference
 * (kernels/convert_ref.c), with the GEMMs' times in TFLOP/s.
 *
 * Forms (worker/model/tensor.h), tokens x in x out:
 *   xwt   y[n][out]   = x[n][in] W^T        (beta 0: y is poisoned, so a
 *                                            GEMM that reads it shows NaN)
 *   dyw   dx[n][in]   = dy[n][out] W + dx   (beta 1, random dx)
 *   dytx  dW[out][in] = dy^T x + dW         (beta 1, random dW)
 * at a small odd shape (37 x 29 x 53) and a V3-like one (4096 x 7168 x
 * 2048: 4096 tokens, hidden 7168, expert FFN 2048), inputs uniform in
 * [-1, 1).
 *
 * Bounds, err = |got - want| / max(|want|, rms(want)) (gpucheck.h), u =
 * 2^-24, k the reduction length:
 *   fp32: 8 u sqrt(k) + 4 u. Both sides sum k fp32 products rounded to
 *     nearest, in different orders; the rounding errors of such a sum are a
 *     random walk of about u sqrt(k) of the result's scale (measured on the
 *     CPU at k = 7168: a sequential fp32 FMA sum is 9e-6 from OpenBLAS over
 *     32k elements, 8 u sqrt(k) = 4.0e-5), 4 u for the beta C term and the
 *     last roundings. TF32 (10-bit mantissa inputs) would be ~1e-3: caught.
 *   bf16: u k / 4 + 8 u sqrt(k) + 4 u, against cblas_sgemm on the inputs
 *     rounded to bf16 by dx_kref_f32_to_bf16 (the products are then exact
 *     in fp32 on both sides). Tensor cores may accumulate with truncation
 *     (round toward zero) after each group of a few products, an error
 *     that drifts one way: u per group of 4 at worst, u k / 4 (an emulation
 *     with groups of 16 gave 2.5e-5 at k = 7168; the bound there is 1.5e-4).
 *     An input not rounded to bf16 would be ~1e-3 off: caught.
 * Conversions are bitwise: random 32-bit patterns (NaNs, infinities,
 * subnormals, ties included) to bf16, every bf16 pattern back to fp32, at
 * 16-byte aligned and at misaligned pointers (the vector and the scalar
 * paths). */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/convert_ref.h"
#include "tests/gpu/gpucheck.h"
#include "worker/cuda/cublas.h"

GC_IMAGE(convert);

#define TRANSPORT_SMS 20 /* the SMs the IPC transport holds beside the GEMMs */
#define ULP 0x1p-24

static struct {
    wk_cuda_function_t to_bf16, to_f32;
} cf;

enum form { FORM_XWT, FORM_DYW, FORM_DYTX };
static const char *const form_names[] = {"xwt", "dyw", "dytx"};

/* --- conversions --------------------------------------------------------- */

/* bf16 patterns widened to int32, so a difference prints as a number */
static void widen(const uint16_t *v, int32_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = v[i];
}

/* the i-th bf16 pattern: an odd multiplier permutes each 2^16 run of i */
static uint16_t bf16_pattern(size_t i)
{
    return (uint16_t)(i * 40503u);
}

/* count elements at element offset `offset` of the buffers (1: misaligned,
 * the kernels' scalar path) */
static void check_convert(struct gc *g, size_t count, size_t offset, const char *name)
{
    struct ck k = {.g = g};
    const size_t all = count + offset;
    float *x = ck_host(&k, all * 4), *back = ck_host(&k, all * 4), *back_d = ck_host(&k, all * 4);
    uint16_t *h = ck_host(&k, all * 2), *h_d = ck_host(&k, all * 2);
    int32_t *wide = ck_host(&k, count * 4), *wide_d = ck_host(&k, count * 4);
    char why[512] = "", shape[64];
    long long cnt = (long long)count;
    const unsigned grid = gc_elem_grid(g, count);
    double ms;
    int ok;

    snprintf(shape, sizeof(shape), "%s count=%zu offset=%zu", name, count, offset);
    if (k.rc == 0) {
        static const uint32_t special[] = {
            0x3f808000u, 0x3f818000u, 0x7f7f8000u, 0x7f7fffffu, 0x00018000u, 0x007fffffu,
            0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffffffffu, 0x80000000u,
        };

        for (size_t i = 0; i < all; i++) {
            uint32_t u = (uint32_t)gc_u64(g);

            if (i - offset < sizeof(special) / sizeof(special[0]))
                u = special[i - offset];
            memcpy(&x[i], &u, 4);
        }
        dx_kref_f32_to_bf16_array(x + offset, h + offset, count);
        /* the way back from every bf16 pattern in turn */
        for (size_t i = 0; i < count; i++)
            back[offset + i] = dx_kref_bf16_to_f32(bf16_pattern(i));
    }
    wk_cuda_ptr d_x = ck_dev(&k, all * 4, x), d_h = ck_dev(&k, all * 2, NULL);
    wk_cuda_ptr d_back = ck_dev(&k, all * 4, NULL);
    wk_cuda_ptr px = d_x + offset * 4, ph = d_h + offset * 2, pback = d_back + offset * 4;
    {
        void *args[] = {&px, &ph, &cnt};

        ms = ck_launch(&k, cf.to_bf16, grid, 0, args, 1);
        ck_download(&k, h_d, d_h, all * 2);
        ok = k.rc == 0;
        if (ok) {
            widen(h_d + offset, wide_d, count);
            widen(h + offset, wide, count);
            ok = ck_compare(&k, "bf16", wide_d, wide, count, 4, 0, why, sizeof(why));
            /* nothing before the offset was written */
            for (size_t i = 0; i < offset; i++)
                if (h_d[i] != 0xffff) {
                    snprintf(why, sizeof(why), "wrote bf16 [%zu] before the start", i);
                    ok = 0;
                }
        }
        ms = ck_retime(&k, ok, cf.to_bf16, grid, args, ms);
        ck_finish(&k, "f32_to_bf16", shape, ok, why, ms, gc_gbs(6.0 * (double)count, ms));
    }
    /* back: every bf16 pattern */
    if (k.rc == 0) {
        for (size_t i = 0; i < count; i++)
            h[offset + i] = bf16_pattern(i);
        if (wk_cuda_upload(g->c, ph, h + offset, count * 2) < 0)
            ck_fail(&k, wk_cuda_error(g->c));
    }
    {
        void *args[] = {&ph, &pback, &cnt};

        ms = ck_launch(&k, cf.to_f32, grid, 0, args, 1);
        ck_download(&k, back_d, d_back, all * 4);
        why[0] = '\0';
        ok = k.rc == 0 &&
             ck_compare(&k, "f32", back_d + offset, back + offset, count, 4, 1, why, sizeof(why));
        ms = ck_retime(&k, ok, cf.to_f32, grid, args, ms);
        ck_finish(&k, "bf16_to_f32", shape, ok, why, ms, gc_gbs(6.0 * (double)count, ms));
    }
    ck_done(&k);
}

/* --- GEMMs ----------------------------------------------------------------- */

/* ms per GEMM of iters back-to-back on the default stream (op prepared
 * already); -1 on error */
static double time_gemm(struct ck *k, wk_cublas_t *lt, const struct wk_cublas_op *op, int iters)
{
    struct gc *g = k->g;
    wk_cuda_event start = NULL, end = NULL;
    float ms = -1.0f;

    if (k->rc < 0)
        return -1.0;
    if (wk_cuda_event_create(g->c, &start) < 0 || wk_cuda_event_create(g->c, &end) < 0 ||
        wk_cuda_event_record(g->c, start) < 0)
        goto fail_cuda;
    for (int i = 0; i < iters; i++)
        if (wk_cublas_gemm(lt, NULL, op) < 0)
            goto fail_cublas;
    if (wk_cuda_event_record(g->c, end) < 0 || wk_cuda_event_elapsed(g->c, start, end, &ms) < 0 ||
        wk_cuda_sync(g->c) < 0)
        goto fail_cuda;
    wk_cuda_event_destroy(g->c, start);
    wk_cuda_event_destroy(g->c, end);
    return (double)ms / iters;
fail_cublas:
    ck_fail(k, wk_cublas_error(lt));
    goto done;
fail_cuda:
    ck_fail(k, wk_cuda_error(g->c));
done:
    wk_cuda_event_destroy(g->c, start);
    wk_cuda_event_destroy(g->c, end);
    return -1.0;
}

static double bound_for(enum wk_cublas_dtype dtype, int k)
{
    const double b = 8.0 * ULP * sqrt((double)k) + 4.0 * ULP;

    return dtype == WK_CUBLAS_BF16 ? b + ULP * k / 4.0 : b;
}

/* op's matrices on the host: a [rows_a][lda], b [rows_b][ldb], c [m][ldc] */
static size_t a_elems(const struct wk_cublas_op *op)
{
    return (size_t)(op->trans_a ? op->k : op->m) * (size_t)op->lda;
}

static size_t b_elems(const struct wk_cublas_op *op)
{
    return (size_t)(op->trans_b ? op->n : op->k) * (size_t)op->ldb;
}

/* Uploads v (fp32) as dtype: fp32 as is, bf16 rounded by the reference;
 * v becomes what the GEMM sees (rounded in place for bf16). */
static wk_cuda_ptr upload_operand(struct ck *k, float *v, size_t n, enum wk_cublas_dtype dtype)
{
    uint16_t *h;

    if (dtype == WK_CUBLAS_F32)
        return ck_dev(k, n * 4, v);
    if (!(h = ck_host(k, n * 2)))
        return 0;
    dx_kref_f32_to_bf16_array(v, h, n);
    dx_kref_bf16_to_f32_array(h, v, n);
    return ck_dev(k, n * 2, h);
}

static void check_gemm(struct gc *g, wk_cublas_t *lt, enum form form, enum wk_cublas_dtype dtype,
                       int tokens, int in, int out, int sm_count, const char *name, int timed)
{
    struct ck k = {.g = g};
    struct wk_cublas_op op;
    const char *dt = dtype == WK_CUBLAS_BF16 ? "bf16" : "fp32";
    char why[512] = "", shape[64], check[24], res[96], target[24] = "";
    float *a, *b, *c0, *want, *got;
    double ms, bound, flops;
    size_t na, nb, nc;
    int ok;

    /* the op's shape first (pointers filled in below) */
    switch (form) {
    case FORM_XWT:
        wk_cublas_op_xwt(&op, dtype, 1, 1, 1, tokens, in, out, 0.0f);
        break;
    case FORM_DYW:
        wk_cublas_op_dyw(&op, dtype, 1, 1, 1, tokens, in, out, 1.0f);
        break;
    default:
        wk_cublas_op_dytx(&op, dtype, 1, 1, 1, tokens, in, out);
        break;
    }
    op.sm_count = sm_count;
    na = a_elems(&op);
    nb = b_elems(&op);
    nc = (size_t)op.m * (size_t)op.ldc;
    bound = bound_for(dtype, op.k);
    flops = 2.0 * op.m * (double)op.n * op.k;
    snprintf(check, sizeof(check), "gemm %s %s", dt, form_names[form]);
    if (sm_count)
        snprintf(target, sizeof(target), " sms=%d", sm_count);
    snprintf(shape, sizeof(shape), "%s %dx%dx%d%s", name, op.m, op.n, op.k, target);
    printf("  checking %s %s\n", check, shape);

    a = ck_host(&k, na * 4);
    b = ck_host(&k, nb * 4);
    c0 = ck_host(&k, nc * 4);
    want = ck_host(&k, nc * 4);
    got = ck_host(&k, nc * 4);
    if (k.rc == 0) {
        gc_fill(g, a, na, -1.0f, 1.0f);
        gc_fill(g, b, nb, -1.0f, 1.0f);
        gc_fill(g, c0, nc, -1.0f, 1.0f);
    }
    op.a = upload_operand(&k, a, na, dtype);
    op.b = upload_operand(&k, b, nb, dtype);
    /* beta 0: C stays poisoned (NaN), which cuBLASLt must not read */
    op.c = ck_dev(&k, nc * 4, op.beta != 0.0f ? c0 : NULL);
    if (k.rc == 0) {
        memcpy(want, c0, nc * 4);
        cblas_sgemm(CblasRowMajor, op.trans_a ? CblasTrans : CblasNoTrans,
                    op.trans_b ? CblasTrans : CblasNoTrans, op.m, op.n, op.k, op.alpha, a, op.lda,
                    b, op.ldb, op.beta, want, op.ldc);
    }
    /* the first call prepares the operation (host work): not timed */
    if (k.rc == 0 && wk_cublas_gemm(lt, NULL, &op) < 0)
        ck_fail(&k, wk_cublas_error(lt));
    if (k.rc == 0 && wk_cuda_sync(g->c) < 0)
        ck_fail(&k, wk_cuda_error(g->c));
    ck_download(&k, got, op.c, nc * 4);
    ok = k.rc == 0 && ck_compare_rel(&k, "C", got, want, nc, bound, why, sizeof(why));
    ck_finish(&k, check, shape, ok, why, -1.0, -1.0);
    if (ok && timed) {
        ms = time_gemm(&k, lt, &op, g->iters);
        if (k.rc == 0) {
            snprintf(res, sizeof(res), "%.1f TFLOP/s", flops / (ms * 1e9));
            snprintf(check, sizeof(check), "gemm %s %s time", dt, form_names[form]);
            gc_add_row(g, check, shape, res, ms, -1.0);
        } else {
            ck_finish(&k, check, shape, 0, "", -1.0, -1.0);
        }
    }
    ck_done(&k);
}

/* --- overlap: a cuBLASLt GEMM beside the transport --------------------------- */

struct gemm_overlap {
    wk_cublas_t *lt;
    struct wk_cublas_op op;
};

/* the GEMM reps times on s, on the SMs the transport leaves */
static int gemm_compute(void *arg, wk_cuda_stream s, int reps)
{
    struct gemm_overlap *o = arg;
    int rc = 0;

    for (int i = 0; i < reps && rc == 0; i++)
        rc = wk_cublas_gemm(o->lt, s, &o->op);
    return rc;
}

/* The overlap target: a bf16 V3 GEMM (x W^T, 4096 x 7168 x 2048;
 * --small: 512 x 1024 x 512) on the SMs the 20 + 20 transport blocks leave,
 * together with the transport, within 1.15 x the longer alone. */
static void overlap_gemm(struct gc *g, wk_cublas_t *lt)
{
    const int n = g->small ? 512 : 4096, in = g->small ? 1024 : 7168, out = g->small ? 512 : 2048;
    struct ck k = {.g = g};
    struct gemm_overlap o = {.lt = lt};
    wk_cuda_ptr x = ck_dev(&k, (size_t)n * in * 2, NULL),
                w = ck_dev(&k, (size_t)out * in * 2, NULL);
    wk_cuda_ptr y = ck_dev(&k, (size_t)n * out * 4, NULL);

    if (k.rc == 0 && (wk_cuda_memset(g->c, x, 0x3c, (size_t)n * in * 2) < 0 ||
                      wk_cuda_memset(g->c, w, 0x3c, (size_t)out * in * 2) < 0))
        ck_fail(&k, wk_cuda_error(g->c)); /* bf16 0x3c3c: ~0.0115, finite */
    if (k.rc < 0) {
        ck_finish(&k, "overlap", "cuBLASLt GEMM", 0, k.err, -1.0, -1.0);
        ck_done(&k);
        return;
    }
    wk_cublas_op_xwt(&o.op, WK_CUBLAS_BF16, x, w, y, n, in, out, 0.0f);
    o.op.sm_count = (int)g->sms - 2 * TRANSPORT_SMS;
    gc_overlap(g, g->small ? "bf16 GEMM 512x1024x512" : "bf16 GEMM 4096x7168x2048", gemm_compute,
               &o, 1);
    ck_done(&k);
}

static void check_gemms(struct gc *g)
{
    static const enum wk_cublas_dtype dtypes[] = {WK_CUBLAS_F32, WK_CUBLAS_BF16};
    wk_cublas_t *lt = NULL;
    char err[512], res[96];

    if (wk_cublas_create(g->c, 0, &lt, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplex-gpucheck: cuBLASLt: %s\n", err);
        snprintf(res, sizeof(res), "FAIL (cuBLASLt: %.70s)", err);
        gc_add_row(g, "gemm", "-", res, -1.0, -1.0);
        g->failed++;
        return;
    }
    for (int d = 0; d < 2; d++)
        for (int f = FORM_XWT; f <= FORM_DYTX; f++)
            check_gemm(g, lt, (enum form)f, dtypes[d], 37, 29, 53, 0, "small", 0);
    if (!g->small) {
        for (int d = 0; d < 2; d++)
            for (int f = FORM_XWT; f <= FORM_DYTX; f++)
                check_gemm(g, lt, (enum form)f, dtypes[d], 4096, 7168, 2048, 0, "V3", 1);
        if (g->sms > TRANSPORT_SMS)
            check_gemm(g, lt, FORM_XWT, WK_CUBLAS_BF16, 4096, 7168, 2048,
                       (int)g->sms - TRANSPORT_SMS, "V3", 1);
    }
    if (g->sms > 2 * TRANSPORT_SMS + 8)
        overlap_gemm(g, lt);
    else
        gc_add_row(g, "overlap", "cuBLASLt GEMM", "SKIP (too few SMs)", -1.0, -1.0);
    {
        unsigned long long hits = 0;
        int cached = wk_cublas_cached(lt, &hits);

        printf("  cuBLASLt: %d operations prepared, %llu GEMMs found theirs cached\n", cached,
               hits);
    }
    wk_cublas_destroy(lt);
}

void gc_check_gemm(struct gc *g)
{
    wk_cuda_module mod;
    static const char *const names[] = {"dx_f32_to_bf16", "dx_bf16_to_f32"};
    wk_cuda_function_t *const fns[] = {&cf.to_bf16, &cf.to_f32};

    if (GC_MODULE(g, convert, &mod) < 0 || gc_functions(g, mod, names, fns, 2) < 0) {
        gc_add_row(g, "convert", "-", "FAIL (module)", -1.0, -1.0);
        g->failed++;
    } else {
        check_convert(g, 1001, 0, "small");
        check_convert(g, 1001, 1, "misaligned");
        if (!g->small)
            check_convert(g, (size_t)4096 * 7168, 0, "V3");
    }
    if (!g->full) {
        fprintf(stderr, "duplex-gpucheck: gemm: cuBLASLt is not available (opened driver-only)\n");
        gc_add_row(g, "gemm", "-", "FAIL (cuBLASLt is not available)", -1.0, -1.0);
        g->failed++;
        return;
    }
    check_gemms(g);
}
