/* fakecublaslt.c - cuBLASLt's matmul API in libfakecuda.so (pass it as
 * --cublaslt-lib too), for the tests: D = alpha op(A) op(B) + beta C with
 * the descriptors, layouts, preferences and heuristic of cublasLt.h,
 * computed on the host on the fake driver's stream, so a caller's mapping
 * of its matrices onto cuBLASLt's (column-major by default) conventions is
 * checked for real. Supported: fp32 and bf16 A and B, fp32 C and D, fp32
 * compute and scale, host-pointer alpha and beta, CUBLASLT_ORDER_COL or
 * ROW, transposes, one matrix per call (no batches, no epilogues). The
 * heuristic's algorithm assumes the pointer alignments the preference
 * promised (256 bytes when it promised none) and cublasLtMatmul refuses
 * pointers aligned less, as an algorithm picked for aligned data would. Each
 * D(i, j) sums op(A)(i, p) op(B)(p, j) over p ascending in float; with beta
 * 0, C is not read (as cuBLASLt). Anything else is CUBLAS_STATUS_NOT_SUPPORTED. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/fake/fakecuda.h"

#define API __attribute__((visibility("default")))

typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
} cublasStatus_t;

enum {
    CUDA_R_32F = 0,
    CUDA_R_16BF = 14,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    DESC_POINTER_MODE = 2,
    DESC_TRANSA = 3,
    DESC_TRANSB = 4,
    DESC_EPILOGUE = 7,
    DESC_SM_COUNT_TARGET = 15,
    LAYOUT_ORDER = 1,
    LAYOUT_BATCH_COUNT = 5,
    ORDER_COL = 0,
    ORDER_ROW = 1,
    PREF_MAX_WORKSPACE_BYTES = 1,
    PREF_MIN_ALIGNMENT_A_BYTES = 5, /* .. D_BYTES = 8 */
    DEFAULT_ALIGNMENT = 256,        /* what the heuristic assumes when not told */
};

struct handle {
    int unused;
};

struct desc {
    int compute, scale, transa, transb, pointer_mode, epilogue, sm_count;
};

struct layout {
    int type, order;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch;
};

struct pref {
    uint64_t max_workspace;
    uint32_t align[4]; /* the least alignment of A, B, C, D the caller promises */
};

typedef struct {
    uint64_t data[8];
} algo_t;

typedef struct {
    algo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} heuristic_t;

API size_t cublasLtGetVersion(void)
{
    return 130000;
}

API const char *cublasLtGetStatusName(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS:
        return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
        return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
        return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
        return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED:
        return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:
        return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
        return "CUBLAS_STATUS_UNKNOWN";
    }
}

API const char *cublasLtGetStatusString(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS:
        return "success";
    case CUBLAS_STATUS_INVALID_VALUE:
        return "an invalid value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED:
        return "the requested functionality is not supported";
    default:
        return cublasLtGetStatusName(s);
    }
}

API cublasStatus_t cublasLtCreate(struct handle **h)
{
    if (!h)
        return CUBLAS_STATUS_INVALID_VALUE;
    *h = calloc(1, sizeof(**h));
    return *h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

API cublasStatus_t cublasLtDestroy(struct handle *h)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    free(h);
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatmulDescCreate(struct desc **d, int compute, int scale)
{
    if (!d)
        return CUBLAS_STATUS_INVALID_VALUE;
    if ((compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) ||
        scale != CUDA_R_32F)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!(*d = calloc(1, sizeof(**d))))
        return CUBLAS_STATUS_ALLOC_FAILED;
    (*d)->compute = compute;
    (*d)->scale = scale;
    (*d)->epilogue = 1; /* CUBLASLT_EPILOGUE_DEFAULT */
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatmulDescDestroy(struct desc *d)
{
    free(d);
    return CUBLAS_STATUS_SUCCESS;
}

static cublasStatus_t get_i32(const void *buf, size_t size, int *out)
{
    int32_t v;

    if (!buf || size != sizeof(v))
        return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(&v, buf, sizeof(v));
    *out = v;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatmulDescSetAttribute(struct desc *d, int attr, const void *buf,
                                                  size_t size)
{
    if (!d)
        return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case DESC_POINTER_MODE:
        return get_i32(buf, size, &d->pointer_mode);
    case DESC_TRANSA:
        return get_i32(buf, size, &d->transa);
    case DESC_TRANSB:
        return get_i32(buf, size, &d->transb);
    case DESC_EPILOGUE: {
        uint32_t v;
        if (!buf || size != sizeof(v))
            return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&v, buf, sizeof(v));
        d->epilogue = (int)v;
        return CUBLAS_STATUS_SUCCESS;
    }
    case DESC_SM_COUNT_TARGET:
        return get_i32(buf, size, &d->sm_count);
    default:
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

API cublasStatus_t cublasLtMatrixLayoutCreate(struct layout **l, int type, uint64_t rows,
                                              uint64_t cols, int64_t ld)
{
    if (!l)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (type != CUDA_R_32F && type != CUDA_R_16BF)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!(*l = calloc(1, sizeof(**l))))
        return CUBLAS_STATUS_ALLOC_FAILED;
    **l = (struct layout){type, ORDER_COL, rows, cols, ld, 1};
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatrixLayoutDestroy(struct layout *l)
{
    free(l);
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatrixLayoutSetAttribute(struct layout *l, int attr, const void *buf,
                                                    size_t size)
{
    if (!l)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (attr == LAYOUT_ORDER)
        return get_i32(buf, size, &l->order);
    if (attr == LAYOUT_BATCH_COUNT) {
        int b = 0;
        cublasStatus_t s = get_i32(buf, size, &b);

        if (s == CUBLAS_STATUS_SUCCESS && b != 1)
            return CUBLAS_STATUS_NOT_SUPPORTED;
        return s;
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

API cublasStatus_t cublasLtMatmulPreferenceCreate(struct pref **p)
{
    if (!p)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!(*p = calloc(1, sizeof(**p))))
        return CUBLAS_STATUS_ALLOC_FAILED;
    for (int i = 0; i < 4; i++)
        (*p)->align[i] = DEFAULT_ALIGNMENT;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatmulPreferenceDestroy(struct pref *p)
{
    free(p);
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatmulPreferenceSetAttribute(struct pref *p, int attr, const void *buf,
                                                        size_t size)
{
    if (!p || !buf)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (attr == PREF_MAX_WORKSPACE_BYTES) {
        if (size != sizeof(uint64_t))
            return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&p->max_workspace, buf, sizeof(uint64_t));
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr >= PREF_MIN_ALIGNMENT_A_BYTES && attr < PREF_MIN_ALIGNMENT_A_BYTES + 4) {
        if (size != sizeof(uint32_t))
            return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&p->align[attr - PREF_MIN_ALIGNMENT_A_BYTES], buf, sizeof(uint32_t));
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

/* The shapes agree: op(A) m x k, op(B) k x n, C and D m x n, leading
 * dimensions that hold a column (COL) or a row (ROW). */
static cublasStatus_t check_shapes(const struct desc *d, const struct layout *a,
                                   const struct layout *b, const struct layout *c,
                                   const struct layout *dl)
{
    uint64_t m = dl->rows, n = dl->cols;
    uint64_t am = d->transa ? a->cols : a->rows, ak = d->transa ? a->rows : a->cols;
    uint64_t bk = d->transb ? b->cols : b->rows, bn = d->transb ? b->rows : b->cols;
    const struct layout *all[4] = {a, b, c, dl};

    if (d->pointer_mode != 0 || d->epilogue != 1)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (am != m || bn != n || ak != bk || c->rows != m || c->cols != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (c->type != CUDA_R_32F || dl->type != CUDA_R_32F || a->type != b->type)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    for (int i = 0; i < 4; i++) {
        uint64_t need = all[i]->order == ORDER_ROW ? all[i]->cols : all[i]->rows;
        if (all[i]->ld < 0 || (uint64_t)all[i]->ld < need)
            return CUBLAS_STATUS_INVALID_VALUE;
    }
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasLtMatmulAlgoGetHeuristic(struct handle *h, struct desc *d,
                                                  struct layout *a, struct layout *b,
                                                  struct layout *c, struct layout *dl,
                                                  struct pref *p, int requested,
                                                  heuristic_t *results, int *returned)
{
    cublasStatus_t s;

    if (!h || !d || !a || !b || !c || !dl || !p || requested < 1 || !results || !returned)
        return CUBLAS_STATUS_INVALID_VALUE;
    *returned = 0;
    if ((s = check_shapes(d, a, b, c, dl)) != CUBLAS_STATUS_SUCCESS)
        return s;
    memset(&results[0], 0, sizeof(results[0]));
    results[0].algo.data[0] = 0xfa4eull; /* the one algorithm, for these alignments */
    for (int i = 0; i < 4; i++)
        results[0].algo.data[1 + i] = p->align[i] ? p->align[i] : 1;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

/* one matmul, as queued on a stream */
struct job {
    float alpha, beta;
    struct desc d;
    struct layout a, b, c, dl;
    const void *pa, *pb, *pc;
    float *pd;
};

static float element(const struct layout *l, const void *p, uint64_t i, uint64_t j)
{
    uint64_t at = l->order == ORDER_ROW ? i * (uint64_t)l->ld + j : i + j * (uint64_t)l->ld;

    if (l->type == CUDA_R_16BF) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[at] << 16;
        float f;

        memcpy(&f, &bits, sizeof(f));
        return f;
    }
    return ((const float *)p)[at];
}

/* dst row-major [rows][cols] = op(X): X (layout l, at p) or, with trans,
 * its transpose; what element() reads, without its per-element branches */
static void unpack(float *dst, const struct layout *l, const void *p, int trans, uint64_t rows,
                   uint64_t cols)
{
    /* X(i, j) is at i * si + j * sj; op(X)(r, c) at r * sr + c * sc */
    const uint64_t si = l->order == ORDER_ROW ? (uint64_t)l->ld : 1;
    const uint64_t sj = l->order == ORDER_ROW ? 1 : (uint64_t)l->ld;
    const uint64_t sr = trans ? sj : si, sc = trans ? si : sj;

    for (uint64_t r = 0; r < rows; r++) {
        float *d = dst + r * cols;

        if (l->type == CUDA_R_16BF) {
            const uint16_t *x = (const uint16_t *)p + r * sr;

            for (uint64_t c = 0; c < cols; c++) {
                uint32_t bits = (uint32_t)x[c * sc] << 16;

                memcpy(&d[c], &bits, sizeof(float));
            }
        } else {
            const float *x = (const float *)p + r * sr;

            for (uint64_t c = 0; c < cols; c++)
                d[c] = x[c * sc];
        }
    }
}

/* o[0..n) = sum over p ascending of a[p] * b[p][0..n) (b row-major [k][n]),
 * each column's sum in float, in p order. Only run_job's own scratch
 * buffers, sized from these very m, n, k, are read and written here, so
 * the sanitizers' per-access checks find nothing to check; they made this
 * loop, most of a fake GPU's work, several times slower in a sanitizer
 * build. The device memory is read, checked, in run_job. */
__attribute__((no_sanitize_address, no_sanitize_undefined)) static void
gemm_row(float *o, const float *a, const float *b, uint64_t k, uint64_t n)
{
    enum { W = 8 }; /* columns at a time, their sums in registers */
    uint64_t c = 0;

    for (; c + W <= n; c += W) {
        float acc[W] = {0.0f};

        for (uint64_t p = 0; p < k; p++) {
            const float av = a[p], *bp = b + p * n + c;

            for (int i = 0; i < W; i++)
                acc[i] += av * bp[i];
        }
        for (int i = 0; i < W; i++)
            o[c + i] = acc[i];
    }
    for (; c < n; c++) {
        float acc = 0.0f;

        for (uint64_t p = 0; p < k; p++)
            acc += a[p] * b[p * n + c];
        o[c] = acc;
    }
}

static int run_job(void *arg)
{
    struct job *j = arg;
    uint64_t m = j->dl.rows, n = j->dl.cols, k = j->d.transa ? j->a.rows : j->a.cols;
    const int empty = m == 0 || n == 0;
    float *out = malloc((size_t)(m * n > 0 ? m * n : 1) * sizeof(float));
    /* op(A) row-major [m][k] and op(B) row-major [k][n], unpacked to fp32
     * once, so the sums below read contiguous rows; each D(i, j) still
     * adds its k products in p order */
    float *A = malloc((size_t)(!empty && m * k > 0 ? m * k : 1) * sizeof(float));
    float *B = malloc((size_t)(!empty && k * n > 0 ? k * n : 1) * sizeof(float));

    if (!out || !A || !B) {
        free(out);
        free(A);
        free(B);
        free(j);
        return 1;
    }
    if (!empty) {
        unpack(A, &j->a, j->pa, j->d.transa, m, k);
        unpack(B, &j->b, j->pb, j->d.transb, k, n);
    }
    /* into a scratch first: D may alias C */
    for (uint64_t r = 0; r < m; r++) {
        float *o = out + r * n;

        gemm_row(o, A + r * k, B, k, n);
        for (uint64_t c = 0; c < n; c++) {
            float acc = o[c] * j->alpha;

            if (j->beta != 0.0f)
                acc += j->beta * element(&j->c, j->pc, r, c);
            o[c] = acc;
        }
    }
    free(A);
    free(B);
    {
        const uint64_t ld = (uint64_t)j->dl.ld;
        const uint64_t sr = j->dl.order == ORDER_ROW ? ld : 1,
                       sc = j->dl.order == ORDER_ROW ? 1 : ld;

        for (uint64_t r = 0; r < m; r++)
            for (uint64_t c = 0; c < n; c++)
                j->pd[r * sr + c * sc] = out[r * n + c];
    }
    free(out);
    free(j);
    return 0;
}

API cublasStatus_t cublasLtMatmul(struct handle *h, struct desc *d, const void *alpha,
                                  const void *pa, struct layout *a, const void *pb,
                                  struct layout *b, const void *beta, const void *pc,
                                  struct layout *c, void *pd, struct layout *dl, const algo_t *algo,
                                  void *workspace, size_t workspace_bytes, void *stream)
{
    struct job *j;
    cublasStatus_t s;

    (void)algo;
    (void)workspace;
    (void)workspace_bytes;
    if (!h || !d || !alpha || !beta || !a || !b || !c || !dl || !pd || !pa || !pb)
        return CUBLAS_STATUS_INVALID_VALUE;
    if ((s = check_shapes(d, a, b, c, dl)) != CUBLAS_STATUS_SUCCESS)
        return s;
    if (algo) { /* an algorithm chosen for aligned pointers cannot take others */
        const void *ptrs[4] = {pa, pb, pc ? pc : pd, pd};

        for (int i = 0; i < 4; i++)
            if (algo->data[1 + i] && (uintptr_t)ptrs[i] % algo->data[1 + i] != 0)
                return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (!(j = calloc(1, sizeof(*j))))
        return CUBLAS_STATUS_ALLOC_FAILED;
    memcpy(&j->alpha, alpha, sizeof(float));
    memcpy(&j->beta, beta, sizeof(float));
    if (j->beta != 0.0f && !pc) {
        free(j);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    j->d = *d;
    j->a = *a;
    j->b = *b;
    j->c = *c;
    j->dl = *dl;
    j->pa = pa;
    j->pb = pb;
    j->pc = pc;
    j->pd = pd;
    if (fake_stream_host(stream, run_job, j) < 0) {
        free(j);
        return CUBLAS_STATUS_ALLOC_FAILED;
    }
    return CUBLAS_STATUS_SUCCESS;
}
