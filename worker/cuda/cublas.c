/* cublas.c - row-major GEMMs through cuBLASLt (see cublas.h). Owns the
 * entry points resolved from the library wk_cuda_open loaded, the cuBLASLt
 * handle, the device workspace and the cache of prepared operations (matmul
 * descriptor, layouts, the heuristic's algorithm) per distinct shape. */
#include "worker/cuda/cublas.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

#define ERROR_MAX 256
#define CACHE_SLOTS 64 /* distinct GEMMs of a stage: a few per layer kind */

/* cuBLASLt's functions, as cublasLt.h declares them (handles are opaque
 * pointers, enums are ints, cudaStream_t is the driver's CUstream) */
typedef int lt_status;
typedef void *lt_handle;
typedef void *lt_desc;
typedef void *lt_layout;
typedef void *lt_pref;
typedef lt_status (*lt_create_fn)(lt_handle *h);
typedef lt_status (*lt_destroy_fn)(lt_handle h);
typedef const char *(*lt_status_name_fn)(lt_status status);
typedef lt_status (*lt_desc_create_fn)(lt_desc *d, int compute_type, int scale_type);
typedef lt_status (*lt_desc_destroy_fn)(lt_desc d);
typedef lt_status (*lt_desc_set_fn)(lt_desc d, int attr, const void *buf, size_t bytes);
typedef lt_status (*lt_layout_create_fn)(lt_layout *l, int type, uint64_t rows, uint64_t cols,
                                         int64_t ld);
typedef lt_status (*lt_layout_destroy_fn)(lt_layout l);
typedef lt_status (*lt_pref_create_fn)(lt_pref *p);
typedef lt_status (*lt_pref_destroy_fn)(lt_pref p);
typedef lt_status (*lt_pref_set_fn)(lt_pref p, int attr, const void *buf, size_t bytes);
typedef lt_status (*lt_heuristic_fn)(lt_handle h, lt_desc d, lt_layout a, lt_layout b, lt_layout c,
                                     lt_layout dd, lt_pref p, int requested,
                                     struct wk_lt_heuristic *results, int *returned);
typedef lt_status (*lt_matmul_fn)(lt_handle h, lt_desc d, const void *alpha, const void *a,
                                  lt_layout adesc, const void *b, lt_layout bdesc, const void *beta,
                                  const void *c, lt_layout cdesc, void *dd, lt_layout ddesc,
                                  const struct wk_lt_algo *algo, void *workspace,
                                  size_t workspace_bytes, wk_cuda_stream stream);

/* what makes two GEMMs the same prepared operation (all ints: no padding) */
struct op_key {
    int trans_a, trans_b, m, n, k, lda, ldb, ldc, dtype, sm_count;
    int align_a, align_b, align_c; /* bytes the pointers are aligned to, <= 256 */
};

struct prepared {
    int used;
    struct op_key key;
    lt_desc desc;
    lt_layout a, b, c; /* cuBLASLt's A (our B), B (our A), C = D */
    struct wk_lt_algo algo;
};

struct wk_cublas {
    wk_cuda_t *cuda;
    lt_create_fn create;
    lt_destroy_fn destroy;
    lt_status_name_fn status_name;
    lt_desc_create_fn desc_create;
    lt_desc_destroy_fn desc_destroy;
    lt_desc_set_fn desc_set;
    lt_layout_create_fn layout_create;
    lt_layout_destroy_fn layout_destroy;
    lt_pref_create_fn pref_create;
    lt_pref_destroy_fn pref_destroy;
    lt_pref_set_fn pref_set;
    lt_heuristic_fn heuristic;
    lt_matmul_fn matmul;
    lt_handle handle;
    wk_cuda_ptr workspace; /* streams other than those below */
    size_t workspace_bytes;
    int nstreams;
    wk_cuda_stream stream[WK_CUBLAS_STREAMS - 1];
    wk_cuda_ptr stream_ws[WK_CUBLAS_STREAMS - 1]; /* [i]: stream[i]'s workspace */
    struct prepared cache[CACHE_SLOTS];
    int next_evict;
    unsigned long long hits;
    char error[ERROR_MAX];
};

const char *wk_cublas_status_name(int status)
{
    switch (status) {
    case WK_LT_STATUS_SUCCESS:
        return "CUBLAS_STATUS_SUCCESS";
    case WK_LT_STATUS_NOT_INITIALIZED:
        return "CUBLAS_STATUS_NOT_INITIALIZED";
    case WK_LT_STATUS_ALLOC_FAILED:
        return "CUBLAS_STATUS_ALLOC_FAILED";
    case WK_LT_STATUS_INVALID_VALUE:
        return "CUBLAS_STATUS_INVALID_VALUE";
    case WK_LT_STATUS_ARCH_MISMATCH:
        return "CUBLAS_STATUS_ARCH_MISMATCH";
    case WK_LT_STATUS_MAPPING_ERROR:
        return "CUBLAS_STATUS_MAPPING_ERROR";
    case WK_LT_STATUS_EXECUTION_FAILED:
        return "CUBLAS_STATUS_EXECUTION_FAILED";
    case WK_LT_STATUS_INTERNAL_ERROR:
        return "CUBLAS_STATUS_INTERNAL_ERROR";
    case WK_LT_STATUS_NOT_SUPPORTED:
        return "CUBLAS_STATUS_NOT_SUPPORTED";
    case WK_LT_STATUS_LICENSE_ERROR:
        return "CUBLAS_STATUS_LICENSE_ERROR";
    default:
        return "CUBLAS_STATUS_UNKNOWN";
    }
}

static const char *status_name(const wk_cublas_t *lt, lt_status st)
{
    const char *s = lt->status_name ? lt->status_name(st) : NULL;

    return s && *s ? s : wk_cublas_status_name(st);
}

/* Records "call(m=.., n=.., k=..): CUBLAS_STATUS_... (N)" for a failed st. */
static int check(wk_cublas_t *lt, lt_status st, const struct wk_cublas_op *op, const char *call)
{
    if (st == WK_LT_STATUS_SUCCESS)
        return 0;
    snprintf(lt->error, sizeof(lt->error), "%s(m=%d, n=%d, k=%d): %s (%d)", call, op->m, op->n,
             op->k, status_name(lt, st), st);
    return -EIO;
}

const char *wk_cublas_error(const wk_cublas_t *lt)
{
    return lt->error;
}

int wk_cublas_cached(const wk_cublas_t *lt, unsigned long long *hits)
{
    int n = 0;

    for (int i = 0; i < CACHE_SLOTS; i++)
        n += lt->cache[i].used;
    if (hits)
        *hits = lt->hits;
    return n;
}

/* --- create / destroy ---------------------------------------------------- */

static int resolve(void *lib, const char *name, void **fn, char *err, size_t errlen)
{
    *fn = dlsym(lib, name);
    if (!*fn)
        return dx_errf(err, errlen, -ENOENT, "cuBLASLt has no %s (a cuBLASLt older than CUDA 11?)",
                       name);
    return 0;
}

int wk_cublas_create(wk_cuda_t *c, size_t workspace_bytes, wk_cublas_t **out, char *err,
                     size_t errlen)
{
    void *lib = wk_cuda_cublaslt_library(c);
    wk_cublas_t *lt;
    lt_status st;
    int rc;

    *out = NULL;
    if (!lib)
        return dx_errf(err, errlen, -ENOENT,
                       "cuBLASLt is not open (the GPU stack was opened driver-only)");
    if (!(lt = calloc(1, sizeof(*lt))))
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    lt->cuda = c;
    lt->workspace_bytes = workspace_bytes ? workspace_bytes : WK_CUBLAS_WORKSPACE_DEFAULT;
    {
        const struct {
            const char *name;
            void **fn;
        } syms[] = {
            {"cublasLtCreate", (void **)&lt->create},
            {"cublasLtDestroy", (void **)&lt->destroy},
            {"cublasLtMatmulDescCreate", (void **)&lt->desc_create},
            {"cublasLtMatmulDescDestroy", (void **)&lt->desc_destroy},
            {"cublasLtMatmulDescSetAttribute", (void **)&lt->desc_set},
            {"cublasLtMatrixLayoutCreate", (void **)&lt->layout_create},
            {"cublasLtMatrixLayoutDestroy", (void **)&lt->layout_destroy},
            {"cublasLtMatmulPreferenceCreate", (void **)&lt->pref_create},
            {"cublasLtMatmulPreferenceDestroy", (void **)&lt->pref_destroy},
            {"cublasLtMatmulPreferenceSetAttribute", (void **)&lt->pref_set},
            {"cublasLtMatmulAlgoGetHeuristic", (void **)&lt->heuristic},
            {"cublasLtMatmul", (void **)&lt->matmul},
        };

        for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++)
            if ((rc = resolve(lib, syms[i].name, syms[i].fn, err, errlen)) < 0)
                goto fail;
    }
    /* optional: the library's own status names */
    lt->status_name = (lt_status_name_fn)dlsym(lib, "cublasLtGetStatusName");
    if ((st = lt->create(&lt->handle)) != WK_LT_STATUS_SUCCESS) {
        rc = dx_errf(err, errlen, -EIO, "cublasLtCreate: %s (%d)", status_name(lt, st), st);
        lt->handle = NULL;
        goto fail;
    }
    if ((rc = wk_cuda_alloc(c, lt->workspace_bytes, &lt->workspace)) < 0) {
        dx_errf(err, errlen, rc, "cuBLASLt workspace (%zu bytes): %s", lt->workspace_bytes,
                wk_cuda_error(c));
        lt->workspace = 0;
        goto fail;
    }
    *out = lt;
    return 0;
fail:
    wk_cublas_destroy(lt);
    return rc;
}

static void prepared_release(wk_cublas_t *lt, struct prepared *p)
{
    if (p->a)
        lt->layout_destroy(p->a);
    if (p->b)
        lt->layout_destroy(p->b);
    if (p->c)
        lt->layout_destroy(p->c);
    if (p->desc)
        lt->desc_destroy(p->desc);
    memset(p, 0, sizeof(*p));
}

void wk_cublas_destroy(wk_cublas_t *lt)
{
    if (!lt)
        return;
    for (int i = 0; i < CACHE_SLOTS; i++)
        if (lt->cache[i].used)
            prepared_release(lt, &lt->cache[i]);
    if (lt->workspace)
        wk_cuda_free(lt->cuda, lt->workspace);
    for (int i = 0; i < lt->nstreams; i++)
        wk_cuda_free(lt->cuda, lt->stream_ws[i]);
    if (lt->handle)
        lt->destroy(lt->handle);
    free(lt);
}

/* --- the row-major to column-major mapping -------------------------------- */

int wk_cublas_op_check(const struct wk_cublas_op *op, char *err, size_t errlen)
{
    const int a_cols = op->trans_a ? op->m : op->k, b_cols = op->trans_b ? op->k : op->n;

    if (op->m <= 0 || op->n <= 0 || op->k <= 0)
        return dx_errf(err, errlen, -EINVAL, "GEMM shape m=%d n=%d k=%d: each must be > 0", op->m,
                       op->n, op->k);
    if ((op->trans_a != 0 && op->trans_a != 1) || (op->trans_b != 0 && op->trans_b != 1))
        return dx_errf(err, errlen, -EINVAL, "GEMM trans_a %d / trans_b %d: each must be 0 or 1",
                       op->trans_a, op->trans_b);
    if (op->dtype != WK_CUBLAS_F32 && op->dtype != WK_CUBLAS_BF16)
        return dx_errf(err, errlen, -EINVAL, "GEMM dtype %d: not WK_CUBLAS_F32 or WK_CUBLAS_BF16",
                       (int)op->dtype);
    if (op->lda < a_cols)
        return dx_errf(err, errlen, -EINVAL, "GEMM lda %d < %s %d", op->lda,
                       op->trans_a ? "m" : "k", a_cols);
    if (op->ldb < b_cols)
        return dx_errf(err, errlen, -EINVAL, "GEMM ldb %d < %s %d", op->ldb,
                       op->trans_b ? "k" : "n", b_cols);
    if (op->ldc < op->n)
        return dx_errf(err, errlen, -EINVAL, "GEMM ldc %d < n %d", op->ldc, op->n);
    if (op->sm_count < 0)
        return dx_errf(err, errlen, -EINVAL, "GEMM sm_count %d: must be >= 0", op->sm_count);
    if (!op->a || !op->b || !op->c)
        return dx_errf(err, errlen, -EINVAL, "GEMM with a NULL device pointer (a, b or c)");
    return 0;
}

/* Row-major X[r][c] with stride ld is column-major X^T (c x r, ld). So
 * row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLASLt's
 * A is our B (stored n x k column-major when not transposed: transa = N;
 * stored k x n when trans_b: transa = T), its B is our A (k x m, or m x k
 * when trans_a), its C is n x m. */
void wk_cublas_colmajor(const struct wk_cublas_op *op, struct wk_cublas_colmajor *cm)
{
    cm->m = (uint64_t)op->n;
    cm->n = (uint64_t)op->m;
    cm->k = (uint64_t)op->k;
    cm->trans_a = op->trans_b ? WK_LT_OP_T : WK_LT_OP_N;
    cm->trans_b = op->trans_a ? WK_LT_OP_T : WK_LT_OP_N;
    cm->a_rows = op->trans_b ? (uint64_t)op->k : (uint64_t)op->n;
    cm->a_cols = op->trans_b ? (uint64_t)op->n : (uint64_t)op->k;
    cm->b_rows = op->trans_a ? (uint64_t)op->m : (uint64_t)op->k;
    cm->b_cols = op->trans_a ? (uint64_t)op->k : (uint64_t)op->m;
    cm->c_rows = (uint64_t)op->n;
    cm->c_cols = (uint64_t)op->m;
    cm->lda = op->ldb;
    cm->ldb = op->lda;
    cm->ldc = op->ldc;
}

/* the largest power of two <= 256 that divides p */
static int pointer_alignment(wk_cuda_ptr p)
{
    int a = 1;

    while (a < WK_LT_ALIGNMENT_DEFAULT && (p & (wk_cuda_ptr)(2 * a - 1)) == 0)
        a *= 2;
    return a;
}

static void make_key(const struct wk_cublas_op *op, struct op_key *key)
{
    memset(key, 0, sizeof(*key));
    key->trans_a = op->trans_a;
    key->trans_b = op->trans_b;
    key->m = op->m;
    key->n = op->n;
    key->k = op->k;
    key->lda = op->lda;
    key->ldb = op->ldb;
    key->ldc = op->ldc;
    key->dtype = (int)op->dtype;
    key->sm_count = op->sm_count;
    key->align_a = pointer_alignment(op->a);
    key->align_b = pointer_alignment(op->b);
    key->align_c = pointer_alignment(op->c);
}

/* Builds the descriptor, layouts and algorithm of op into p. */
static int prepare(wk_cublas_t *lt, const struct wk_cublas_op *op, const struct op_key *key,
                   struct prepared *p)
{
    const int ab_type = op->dtype == WK_CUBLAS_BF16 ? WK_LT_R_16BF : WK_LT_R_32F;
    struct wk_cublas_colmajor cm;
    struct wk_lt_heuristic result;
    lt_pref pref = NULL;
    int32_t ta, tb, sms = op->sm_count;
    uint64_t ws = lt->workspace_bytes;
    /* cuBLASLt's A is our B, its B our A */
    uint32_t align_a = (uint32_t)key->align_b, align_b = (uint32_t)key->align_a;
    uint32_t align_c = (uint32_t)key->align_c;
    int returned = 0, rc;

    wk_cublas_colmajor(op, &cm);
    ta = cm.trans_a;
    tb = cm.trans_b;
    memset(p, 0, sizeof(*p));
    p->key = *key;
    if ((rc = check(lt, lt->desc_create(&p->desc, WK_LT_COMPUTE_32F, WK_LT_R_32F), op,
                    "cublasLtMatmulDescCreate")) < 0) {
        p->desc = NULL;
        goto fail;
    }
    if ((rc = check(lt, lt->desc_set(p->desc, WK_LT_DESC_TRANSA, &ta, sizeof(ta)), op,
                    "cublasLtMatmulDescSetAttribute(TRANSA)")) < 0 ||
        (rc = check(lt, lt->desc_set(p->desc, WK_LT_DESC_TRANSB, &tb, sizeof(tb)), op,
                    "cublasLtMatmulDescSetAttribute(TRANSB)")) < 0)
        goto fail;
    if (sms > 0 &&
        (rc = check(lt, lt->desc_set(p->desc, WK_LT_DESC_SM_COUNT_TARGET, &sms, sizeof(sms)), op,
                    "cublasLtMatmulDescSetAttribute(SM_COUNT_TARGET)")) < 0)
        goto fail;
    if ((rc = check(lt, lt->layout_create(&p->a, ab_type, cm.a_rows, cm.a_cols, cm.lda), op,
                    "cublasLtMatrixLayoutCreate(A)")) < 0) {
        p->a = NULL;
        goto fail;
    }
    if ((rc = check(lt, lt->layout_create(&p->b, ab_type, cm.b_rows, cm.b_cols, cm.ldb), op,
                    "cublasLtMatrixLayoutCreate(B)")) < 0) {
        p->b = NULL;
        goto fail;
    }
    if ((rc = check(lt, lt->layout_create(&p->c, WK_LT_R_32F, cm.c_rows, cm.c_cols, cm.ldc), op,
                    "cublasLtMatrixLayoutCreate(C)")) < 0) {
        p->c = NULL;
        goto fail;
    }
    if ((rc = check(lt, lt->pref_create(&pref), op, "cublasLtMatmulPreferenceCreate")) < 0) {
        pref = NULL;
        goto fail;
    }
    if ((rc = check(lt, lt->pref_set(pref, WK_LT_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), op,
                    "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)")) < 0 ||
        (rc = check(lt,
                    lt->pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)),
                    op, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)")) < 0 ||
        (rc = check(lt,
                    lt->pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)),
                    op, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)")) < 0 ||
        (rc = check(lt,
                    lt->pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)),
                    op, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)")) < 0 ||
        (rc = check(lt,
                    lt->pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c)),
                    op, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)")) < 0)
        goto fail;
    memset(&result, 0, sizeof(result));
    if ((rc = check(lt,
                    lt->heuristic(lt->handle, p->desc, p->a, p->b, p->c, p->c, pref, 1, &result,
                                  &returned),
                    op, "cublasLtMatmulAlgoGetHeuristic")) < 0)
        goto fail;
    if (returned < 1 || result.state != WK_LT_STATUS_SUCCESS) {
        snprintf(lt->error, sizeof(lt->error),
                 "cublasLtMatmulAlgoGetHeuristic(m=%d, n=%d, k=%d): no algorithm for this %s GEMM "
                 "(%s)",
                 op->m, op->n, op->k, op->dtype == WK_CUBLAS_BF16 ? "bf16" : "fp32",
                 returned < 1 ? "none returned" : status_name(lt, result.state));
        rc = -EIO;
        goto fail;
    }
    p->algo = result.algo;
    p->used = 1;
    lt->pref_destroy(pref);
    return 0;
fail:
    if (pref)
        lt->pref_destroy(pref);
    prepared_release(lt, p);
    return rc;
}

/* The prepared operation of op, from the cache or built into a free (else
 * the next evicted) slot; NULL on failure (lt->error says why). */
static struct prepared *lookup(wk_cublas_t *lt, const struct wk_cublas_op *op)
{
    struct op_key key;
    struct prepared *slot = NULL;

    make_key(op, &key);
    for (int i = 0; i < CACHE_SLOTS; i++) {
        struct prepared *p = &lt->cache[i];

        if (p->used && memcmp(&p->key, &key, sizeof(key)) == 0) {
            lt->hits++;
            return p;
        }
        if (!p->used && !slot)
            slot = p;
    }
    if (!slot) {
        slot = &lt->cache[lt->next_evict];
        lt->next_evict = (lt->next_evict + 1) % CACHE_SLOTS;
        prepared_release(lt, slot);
    }
    return prepare(lt, op, &key, slot) < 0 ? NULL : slot;
}

int wk_cublas_add_stream(wk_cublas_t *lt, wk_cuda_stream s)
{
    int rc;

    for (int i = 0; i < lt->nstreams; i++)
        if (lt->stream[i] == s)
            return 0;
    if (lt->nstreams == WK_CUBLAS_STREAMS - 1) {
        snprintf(lt->error, sizeof(lt->error), "cuBLASLt: workspaces for %d streams at most",
                 WK_CUBLAS_STREAMS);
        return -ENOSPC;
    }
    if ((rc = wk_cuda_alloc(lt->cuda, lt->workspace_bytes, &lt->stream_ws[lt->nstreams])) < 0) {
        snprintf(lt->error, sizeof(lt->error), "cuBLASLt workspace (%zu bytes): %s",
                 lt->workspace_bytes, wk_cuda_error(lt->cuda));
        return rc;
    }
    lt->stream[lt->nstreams++] = s;
    return 0;
}

static wk_cuda_ptr workspace_of(const wk_cublas_t *lt, wk_cuda_stream s)
{
    for (int i = 0; i < lt->nstreams; i++)
        if (lt->stream[i] == s)
            return lt->stream_ws[i];
    return lt->workspace;
}

int wk_cublas_gemm(wk_cublas_t *lt, wk_cuda_stream s, const struct wk_cublas_op *op)
{
    struct prepared *p;
    int rc;

    if ((rc = wk_cublas_op_check(op, lt->error, sizeof(lt->error))) < 0)
        return rc;
    if (!(p = lookup(lt, op)))
        return -EIO;
    /* C^T = op(B)^T op(A)^T: cuBLASLt's A is our b, its B our a; D = C */
    return check(lt,
                 lt->matmul(lt->handle, p->desc, &op->alpha, (const void *)(uintptr_t)op->b, p->a,
                            (const void *)(uintptr_t)op->a, p->b, &op->beta,
                            (const void *)(uintptr_t)op->c, p->c, (void *)(uintptr_t)op->c, p->c,
                            &p->algo, (void *)(uintptr_t)workspace_of(lt, s), lt->workspace_bytes,
                            s),
                 op, "cublasLtMatmul");
}

/* --- the model's three forms ---------------------------------------------- */

void wk_cublas_op_xwt(struct wk_cublas_op *op, enum wk_cublas_dtype dtype, wk_cuda_ptr x,
                      wk_cuda_ptr w, wk_cuda_ptr y, int n, int in, int out, float beta)
{
    /* y[n][out] = x[n][in] (W[out][in])^T */
    *op = (struct wk_cublas_op){.trans_a = 0,
                                .trans_b = 1,
                                .m = n,
                                .n = out,
                                .k = in,
                                .alpha = 1.0f,
                                .a = x,
                                .lda = in,
                                .b = w,
                                .ldb = in,
                                .beta = beta,
                                .c = y,
                                .ldc = out,
                                .dtype = dtype};
}

void wk_cublas_op_dyw(struct wk_cublas_op *op, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                      wk_cuda_ptr w, wk_cuda_ptr dx, int n, int in, int out, float beta)
{
    /* dx[n][in] = dy[n][out] W[out][in] */
    *op = (struct wk_cublas_op){.trans_a = 0,
                                .trans_b = 0,
                                .m = n,
                                .n = in,
                                .k = out,
                                .alpha = 1.0f,
                                .a = dy,
                                .lda = out,
                                .b = w,
                                .ldb = in,
                                .beta = beta,
                                .c = dx,
                                .ldc = in,
                                .dtype = dtype};
}

void wk_cublas_op_dytx(struct wk_cublas_op *op, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                       wk_cuda_ptr x, wk_cuda_ptr dw, int n, int in, int out)
{
    /* dW[out][in] += (dy[n][out])^T x[n][in] */
    *op = (struct wk_cublas_op){.trans_a = 1,
                                .trans_b = 0,
                                .m = out,
                                .n = in,
                                .k = n,
                                .alpha = 1.0f,
                                .a = dy,
                                .lda = out,
                                .b = x,
                                .ldb = in,
                                .beta = 1.0f,
                                .c = dw,
                                .ldc = in,
                                .dtype = dtype};
}

int wk_cublas_xwt(wk_cublas_t *lt, wk_cuda_stream s, enum wk_cublas_dtype dtype, wk_cuda_ptr x,
                  wk_cuda_ptr w, wk_cuda_ptr y, int n, int in, int out, float beta, int sm_count)
{
    struct wk_cublas_op op;

    wk_cublas_op_xwt(&op, dtype, x, w, y, n, in, out, beta);
    op.sm_count = sm_count;
    return wk_cublas_gemm(lt, s, &op);
}

int wk_cublas_dyw(wk_cublas_t *lt, wk_cuda_stream s, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                  wk_cuda_ptr w, wk_cuda_ptr dx, int n, int in, int out, float beta, int sm_count)
{
    struct wk_cublas_op op;

    wk_cublas_op_dyw(&op, dtype, dy, w, dx, n, in, out, beta);
    op.sm_count = sm_count;
    return wk_cublas_gemm(lt, s, &op);
}

int wk_cublas_dytx(wk_cublas_t *lt, wk_cuda_stream s, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                   wk_cuda_ptr x, wk_cuda_ptr dw, int n, int in, int out, int sm_count)
{
    struct wk_cublas_op op;

    wk_cublas_op_dytx(&op, dtype, dy, x, dw, n, in, out);
    op.sm_count = sm_count;
    return wk_cublas_gemm(lt, s, &op);
}
