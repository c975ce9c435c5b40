/* cublas.h - the cuda backend's GEMMs through cuBLASLt, opened at run time.
 *
 * cuBLASLt's entry points are resolved with dlsym from the library that
 * wk_cuda_open loaded (wk_cuda_cublaslt_library); no CUDA header is needed:
 * the few enums, handles and structs used are declared below with the values
 * of cublasLt.h (CUDA 13), which tests/unit/test_cublas_abi.c checks against
 * the real header where it is installed.
 *
 * One GEMM, row-major like the model (worker/model/tensor.h):
 *   C[m][n] = alpha op(A) op(B) + beta C
 * with op(A) [m][k] (A stored [m][k], or [k][m] when trans_a) and op(B)
 * [k][n] (B stored [k][n], or [n][k] when trans_b); lda, ldb, ldc are the
 * row strides in elements. It runs as cuBLASLt's column-major C^T = op(B)^T
 * op(A)^T. WK_CUBLAS_F32 is fp32 throughout with fp32 accumulation
 * (CUBLAS_COMPUTE_32F: no TF32); WK_CUBLAS_BF16 takes bf16 A and B, fp32 C,
 * fp32 accumulation. The matmul descriptor, the layouts and the heuristic's
 * algorithm are cached per distinct operation (shape, strides, transposes,
 * dtype, SM target), so a training step does not rebuild them.
 *
 * A handle is for one thread and the context current on it (the one that
 * was current at wk_cublas_create). Each stream added with
 * wk_cublas_add_stream has a workspace of its own; every other stream
 * shares the first one, so GEMMs on those must run one stream at a time. */
#ifndef WK_CUBLAS_H
#define WK_CUBLAS_H

#include <stddef.h>
#include <stdint.h>

#include "worker/cuda/driver.h"

#define WK_CUBLAS_WORKSPACE_DEFAULT (32u << 20) /* cuBLASLt's advice on Hopper */

enum wk_cublas_dtype {
    WK_CUBLAS_F32 = 0,  /* A, B, C fp32 */
    WK_CUBLAS_BF16 = 1, /* A, B bf16; C fp32 */
};

struct wk_cublas_op {
    int trans_a, trans_b; /* 0 or 1 */
    int m, n, k;          /* > 0 */
    float alpha;
    wk_cuda_ptr a;
    int lda; /* >= (trans_a ? m : k) */
    wk_cuda_ptr b;
    int ldb;    /* >= (trans_b ? k : n) */
    float beta; /* 0: C is not read */
    wk_cuda_ptr c;
    int ldc; /* >= n */
    enum wk_cublas_dtype dtype;
    /* 0: all multiprocessors; else CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET (to
     * run beside kernels that hold the others, the 20-SM transport) */
    int sm_count;
};

typedef struct wk_cublas wk_cublas_t;

/* Resolves cuBLASLt from c (opened without driver_only), creates its handle
 * and allocates workspace_bytes of device workspace (0 takes
 * WK_CUBLAS_WORKSPACE_DEFAULT) in the current context. 0, or -ENOENT (no
 * cuBLASLt, a missing entry point), -ENOMEM or -EIO with err saying what. */
int wk_cublas_create(wk_cuda_t *c, size_t workspace_bytes, wk_cublas_t **out, char *err,
                     size_t errlen);
void wk_cublas_destroy(wk_cublas_t *lt);
/* A workspace of its own for stream s (at most WK_CUBLAS_STREAMS - 1
 * streams; adding one twice is a no-op): GEMMs on s may then run while
 * GEMMs on other streams do. 0, -ENOSPC or -ENOMEM. */
#define WK_CUBLAS_STREAMS 4
int wk_cublas_add_stream(wk_cublas_t *lt, wk_cuda_stream s);

/* Enqueues the GEMM on stream s (NULL: the default stream). 0, -EINVAL
 * (a bad shape, stride or dtype) or -EIO; the reason in wk_cublas_error:
 * "cublasLtMatmul(m=37, n=53, k=29): CUBLAS_STATUS_NOT_SUPPORTED (15)". */
int wk_cublas_gemm(wk_cublas_t *lt, wk_cuda_stream s, const struct wk_cublas_op *op);

/* The last failure ("" when none). */
const char *wk_cublas_error(const wk_cublas_t *lt);
/* Operations in the cache, and how many GEMMs found theirs there. */
int wk_cublas_cached(const wk_cublas_t *lt, unsigned long long *hits);

/* The model's three forms (tensor.h's wk_gemm_*), packed rows (strides =
 * widths), weights W[out][in]; dtype is that of x / dy and W (bf16 or fp32),
 * outputs are fp32:
 *   y[n][out]   = x[n][in] W^T + beta y          (forward)
 *   dx[n][in]   = dy[n][out] W + beta dx         (input gradient)
 *   dW[out][in] += dy[n][out]^T x[n][in]         (weight gradient) */
int wk_cublas_xwt(wk_cublas_t *lt, wk_cuda_stream s, enum wk_cublas_dtype dtype, wk_cuda_ptr x,
                  wk_cuda_ptr w, wk_cuda_ptr y, int n, int in, int out, float beta, int sm_count);
int wk_cublas_dyw(wk_cublas_t *lt, wk_cuda_stream s, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                  wk_cuda_ptr w, wk_cuda_ptr dx, int n, int in, int out, float beta, int sm_count);
int wk_cublas_dytx(wk_cublas_t *lt, wk_cuda_stream s, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                   wk_cuda_ptr x, wk_cuda_ptr dw, int n, int in, int out, int sm_count);

/* Fills op for the forms above (no device call), for a caller that wants
 * to adjust it (sm_count) or check it. */
void wk_cublas_op_xwt(struct wk_cublas_op *op, enum wk_cublas_dtype dtype, wk_cuda_ptr x,
                      wk_cuda_ptr w, wk_cuda_ptr y, int n, int in, int out, float beta);
void wk_cublas_op_dyw(struct wk_cublas_op *op, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                      wk_cuda_ptr w, wk_cuda_ptr dx, int n, int in, int out, float beta);
void wk_cublas_op_dytx(struct wk_cublas_op *op, enum wk_cublas_dtype dtype, wk_cuda_ptr dy,
                       wk_cuda_ptr x, wk_cuda_ptr dw, int n, int in, int out);

/* Checks op's shape, strides and dtype: 0, or -EINVAL with the reason in
 * err ("lda 10 < k 29"). */
int wk_cublas_op_check(const struct wk_cublas_op *op, char *err, size_t errlen);

/* The column-major problem cuBLASLt is given for a row-major op (C^T =
 * op(B)^T op(A)^T): its m, n, k, its A (our B) and B (our A) as stored
 * rows x cols with ld, and their transposes (WK_LT_OP_N / _T). */
struct wk_cublas_colmajor {
    uint64_t m, n, k;
    int trans_a, trans_b;
    uint64_t a_rows, a_cols, b_rows, b_cols, c_rows, c_cols;
    int64_t lda, ldb, ldc;
};
void wk_cublas_colmajor(const struct wk_cublas_op *op, struct wk_cublas_colmajor *cm);

/* "CUBLAS_STATUS_NOT_SUPPORTED" for a cublasStatus_t (the library's own
 * names, kept here for when cublasLtGetStatusName is not there). */
const char *wk_cublas_status_name(int status);

/* --- the cuBLASLt ABI this module declares (CUDA 13 cublasLt.h,
 * cublas_api.h, library_types.h); checked by test_cublas_abi.c ---------- */

#define WK_LT_STATUS_SUCCESS 0 /* CUBLAS_STATUS_SUCCESS */
#define WK_LT_STATUS_NOT_INITIALIZED 1
#define WK_LT_STATUS_ALLOC_FAILED 3
#define WK_LT_STATUS_INVALID_VALUE 7
#define WK_LT_STATUS_ARCH_MISMATCH 8
#define WK_LT_STATUS_MAPPING_ERROR 11
#define WK_LT_STATUS_EXECUTION_FAILED 13
#define WK_LT_STATUS_INTERNAL_ERROR 14
#define WK_LT_STATUS_NOT_SUPPORTED 15
#define WK_LT_STATUS_LICENSE_ERROR 16
#define WK_LT_OP_N 0                       /* CUBLAS_OP_N */
#define WK_LT_OP_T 1                       /* CUBLAS_OP_T */
#define WK_LT_COMPUTE_32F 68               /* CUBLAS_COMPUTE_32F */
#define WK_LT_R_32F 0                      /* CUDA_R_32F */
#define WK_LT_R_16BF 14                    /* CUDA_R_16BF */
#define WK_LT_DESC_TRANSA 3                /* CUBLASLT_MATMUL_DESC_TRANSA */
#define WK_LT_DESC_TRANSB 4                /* CUBLASLT_MATMUL_DESC_TRANSB */
#define WK_LT_DESC_SM_COUNT_TARGET 15      /* CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET */
#define WK_LT_PREF_MAX_WORKSPACE_BYTES 1   /* CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES */
#define WK_LT_PREF_MIN_ALIGNMENT_A_BYTES 5 /* CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES */
#define WK_LT_PREF_MIN_ALIGNMENT_B_BYTES 6
#define WK_LT_PREF_MIN_ALIGNMENT_C_BYTES 7
#define WK_LT_PREF_MIN_ALIGNMENT_D_BYTES 8
#define WK_LT_ALIGNMENT_DEFAULT 256 /* the heuristic's assumption unless told less */

/* cublasLtMatmulAlgo_t */
struct wk_lt_algo {
    uint64_t data[8];
};

/* cublasLtMatmulHeuristicResult_t */
struct wk_lt_heuristic {
    struct wk_lt_algo algo;
    size_t workspace_size;
    int state; /* cublasStatus_t */
    float waves_count;
    int reserved[4];
};

#endif
