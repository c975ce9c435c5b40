/* test_cublas_abi.c - worker/cublas.[ch] without a GPU.
 *
 * ABI: where the CUDA headers are installed (DX_HAVE_CUDA_HEADERS, set by
 * the Makefile), every cuBLASLt value cublas.h declares is compared with
 * cublasLt.h's, and the structs it declares with sizeof / offsetof. Where
 * the library itself loads, its host-only calls (descriptors, layouts,
 * preferences; no device needed) take the attribute values and sizes
 * cublas.c sets, and its status names match cublas.c's.
 *
 * Mapping: the column-major problem wk_cublas_colmajor hands cuBLASLt,
 * run on the CPU by OpenBLAS in column-major, gives the row-major GEMM
 * (OpenBLAS in row-major), for every transpose, padded strides and the
 * model's three forms (as worker/model/tensor.h's wk_gemm_* compute them);
 * wk_cublas_op_check refuses bad shapes naming the problem. */
#include <cblas.h>
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "worker/cuda/cublas.h"
#include "worker/model/tensor.h"
#include "tests/unit/fakestack.h"

#ifdef DX_HAVE_CUDA_HEADERS
#include <cublasLt.h>

Test(cublas_abi, enum_values)
{
    cr_expect_eq(WK_LT_STATUS_SUCCESS, CUBLAS_STATUS_SUCCESS);
    cr_expect_eq(WK_LT_STATUS_NOT_INITIALIZED, CUBLAS_STATUS_NOT_INITIALIZED);
    cr_expect_eq(WK_LT_STATUS_ALLOC_FAILED, CUBLAS_STATUS_ALLOC_FAILED);
    cr_expect_eq(WK_LT_STATUS_INVALID_VALUE, CUBLAS_STATUS_INVALID_VALUE);
    cr_expect_eq(WK_LT_STATUS_ARCH_MISMATCH, CUBLAS_STATUS_ARCH_MISMATCH);
    cr_expect_eq(WK_LT_STATUS_MAPPING_ERROR, CUBLAS_STATUS_MAPPING_ERROR);
    cr_expect_eq(WK_LT_STATUS_EXECUTION_FAILED, CUBLAS_STATUS_EXECUTION_FAILED);
    cr_expect_eq(WK_LT_STATUS_INTERNAL_ERROR, CUBLAS_STATUS_INTERNAL_ERROR);
    cr_expect_eq(WK_LT_STATUS_NOT_SUPPORTED, CUBLAS_STATUS_NOT_SUPPORTED);
    cr_expect_eq(WK_LT_STATUS_LICENSE_ERROR, CUBLAS_STATUS_LICENSE_ERROR);
    cr_expect_eq(WK_LT_OP_N, CUBLAS_OP_N);
    cr_expect_eq(WK_LT_OP_T, CUBLAS_OP_T);
    cr_expect_eq(WK_LT_COMPUTE_32F, CUBLAS_COMPUTE_32F);
    cr_expect_eq(WK_LT_R_32F, CUDA_R_32F);
    cr_expect_eq(WK_LT_R_16BF, CUDA_R_16BF);
    cr_expect_eq(WK_LT_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSA);
    cr_expect_eq(WK_LT_DESC_TRANSB, CUBLASLT_MATMUL_DESC_TRANSB);
    cr_expect_eq(WK_LT_DESC_SM_COUNT_TARGET, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET);
    cr_expect_eq(WK_LT_PREF_MAX_WORKSPACE_BYTES, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES);
    cr_expect_eq(WK_LT_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES);
    cr_expect_eq(WK_LT_PREF_MIN_ALIGNMENT_B_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES);
    cr_expect_eq(WK_LT_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES);
    cr_expect_eq(WK_LT_PREF_MIN_ALIGNMENT_D_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES);
}

/* cublas.c passes enums as int and the stream as the driver's pointer */
Test(cublas_abi, scalar_sizes)
{
    cr_expect_eq(sizeof(cublasStatus_t), sizeof(int));
    cr_expect_eq(sizeof(cublasComputeType_t), sizeof(int));
    cr_expect_eq(sizeof(cudaDataType), sizeof(int));
    cr_expect_eq(sizeof(cublasLtMatmulDescAttributes_t), sizeof(int));
    cr_expect_eq(sizeof(cublasLtMatmulPreferenceAttributes_t), sizeof(int));
    cr_expect_eq(sizeof(cublasOperation_t), sizeof(int32_t)); /* TRANSA / TRANSB values */
    cr_expect_eq(sizeof(cudaStream_t), sizeof(wk_cuda_stream));
    cr_expect_eq(sizeof(cublasLtHandle_t), sizeof(void *));
}

Test(cublas_abi, struct_layouts)
{
    cr_expect_eq(sizeof(struct wk_lt_algo), sizeof(cublasLtMatmulAlgo_t));
    cr_expect_eq(sizeof(struct wk_lt_heuristic), sizeof(cublasLtMatmulHeuristicResult_t));
    cr_expect_eq(offsetof(struct wk_lt_heuristic, algo),
                 offsetof(cublasLtMatmulHeuristicResult_t, algo));
    cr_expect_eq(offsetof(struct wk_lt_heuristic, workspace_size),
                 offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize));
    cr_expect_eq(offsetof(struct wk_lt_heuristic, state),
                 offsetof(cublasLtMatmulHeuristicResult_t, state));
    cr_expect_eq(offsetof(struct wk_lt_heuristic, waves_count),
                 offsetof(cublasLtMatmulHeuristicResult_t, wavesCount));
    cr_expect_eq(offsetof(struct wk_lt_heuristic, reserved),
                 offsetof(cublasLtMatmulHeuristicResult_t, reserved));
    cr_expect_eq(sizeof(((struct wk_lt_heuristic *)0)->reserved),
                 sizeof(((cublasLtMatmulHeuristicResult_t *)0)->reserved));
}
#endif /* DX_HAVE_CUDA_HEADERS */

/* --- the library's host-only calls, where it loads ------------------------ */

typedef int (*desc_create_fn)(void **d, int compute, int scale);
typedef int (*desc_destroy_fn)(void *d);
typedef int (*set_fn)(void *d, int attr, const void *buf, size_t bytes);
typedef int (*layout_create_fn)(void **l, int type, uint64_t rows, uint64_t cols, int64_t ld);
typedef int (*pref_create_fn)(void **p);
typedef const char *(*status_name_fn)(int status);

static void *open_cublaslt(void)
{
    void *lib = dlopen(WK_CUBLASLT_LIB_DEFAULT, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);

    if (!lib)
        cr_log_warn("%s does not load (%s): library checks skipped", WK_CUBLASLT_LIB_DEFAULT,
                    dlerror());
    return lib;
}

Test(cublas_abi, library_takes_our_attributes)
{
    void *lib = open_cublaslt();
    void *desc = NULL, *layout = NULL, *pref = NULL;
    int32_t trans = WK_LT_OP_T, sms = 112;
    uint64_t ws = WK_CUBLAS_WORKSPACE_DEFAULT;
    uint32_t align = 16;

    if (!lib)
        return;
    desc_create_fn desc_create = (desc_create_fn)dlsym(lib, "cublasLtMatmulDescCreate");
    desc_destroy_fn desc_destroy = (desc_destroy_fn)dlsym(lib, "cublasLtMatmulDescDestroy");
    set_fn desc_set = (set_fn)dlsym(lib, "cublasLtMatmulDescSetAttribute");
    layout_create_fn layout_create = (layout_create_fn)dlsym(lib, "cublasLtMatrixLayoutCreate");
    desc_destroy_fn layout_destroy = (desc_destroy_fn)dlsym(lib, "cublasLtMatrixLayoutDestroy");
    pref_create_fn pref_create = (pref_create_fn)dlsym(lib, "cublasLtMatmulPreferenceCreate");
    desc_destroy_fn pref_destroy = (desc_destroy_fn)dlsym(lib, "cublasLtMatmulPreferenceDestroy");
    set_fn pref_set = (set_fn)dlsym(lib, "cublasLtMatmulPreferenceSetAttribute");

    cr_assert(desc_create && desc_destroy && desc_set && layout_create && layout_destroy &&
              pref_create && pref_destroy && pref_set);
    cr_assert_eq(desc_create(&desc, WK_LT_COMPUTE_32F, WK_LT_R_32F), WK_LT_STATUS_SUCCESS);
    cr_expect_eq(desc_set(desc, WK_LT_DESC_TRANSA, &trans, sizeof(trans)), WK_LT_STATUS_SUCCESS);
    cr_expect_eq(desc_set(desc, WK_LT_DESC_TRANSB, &trans, sizeof(trans)), WK_LT_STATUS_SUCCESS);
    cr_expect_eq(desc_set(desc, WK_LT_DESC_SM_COUNT_TARGET, &sms, sizeof(sms)),
                 WK_LT_STATUS_SUCCESS);
    /* a wrong size is refused: the calls above were checked, not ignored */
    cr_expect_eq(desc_set(desc, WK_LT_DESC_TRANSA, &ws, sizeof(ws)), WK_LT_STATUS_INVALID_VALUE);
    cr_expect_eq(desc_destroy(desc), WK_LT_STATUS_SUCCESS);
    cr_assert_eq(layout_create(&layout, WK_LT_R_16BF, 53, 29, 53), WK_LT_STATUS_SUCCESS);
    cr_expect_eq(layout_destroy(layout), WK_LT_STATUS_SUCCESS);
    cr_assert_eq(pref_create(&pref), WK_LT_STATUS_SUCCESS);
    cr_expect_eq(pref_set(pref, WK_LT_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
                 WK_LT_STATUS_SUCCESS);
    cr_expect_eq(pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_A_BYTES, &align, sizeof(align)),
                 WK_LT_STATUS_SUCCESS);
    cr_expect_eq(pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_B_BYTES, &align, sizeof(align)),
                 WK_LT_STATUS_SUCCESS);
    cr_expect_eq(pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof(align)),
                 WK_LT_STATUS_SUCCESS);
    cr_expect_eq(pref_set(pref, WK_LT_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof(align)),
                 WK_LT_STATUS_SUCCESS);
    cr_expect_eq(pref_set(pref, WK_LT_PREF_MAX_WORKSPACE_BYTES, &align, sizeof(align)),
                 WK_LT_STATUS_INVALID_VALUE);
    cr_expect_eq(pref_destroy(pref), WK_LT_STATUS_SUCCESS);
}

Test(cublas_abi, status_names)
{
    static const int statuses[] = {
        WK_LT_STATUS_SUCCESS,          WK_LT_STATUS_NOT_INITIALIZED, WK_LT_STATUS_ALLOC_FAILED,
        WK_LT_STATUS_INVALID_VALUE,    WK_LT_STATUS_ARCH_MISMATCH,   WK_LT_STATUS_MAPPING_ERROR,
        WK_LT_STATUS_EXECUTION_FAILED, WK_LT_STATUS_INTERNAL_ERROR,  WK_LT_STATUS_NOT_SUPPORTED,
        WK_LT_STATUS_LICENSE_ERROR,
    };
    void *lib = open_cublaslt();
    status_name_fn name = lib ? (status_name_fn)dlsym(lib, "cublasLtGetStatusName") : NULL;

    cr_expect_str_eq(wk_cublas_status_name(15), "CUBLAS_STATUS_NOT_SUPPORTED");
    cr_expect_str_eq(wk_cublas_status_name(99), "CUBLAS_STATUS_UNKNOWN");
    if (!name)
        return;
    for (size_t i = 0; i < sizeof(statuses) / sizeof(statuses[0]); i++)
        cr_expect_str_eq(wk_cublas_status_name(statuses[i]), name(statuses[i]), "status %d",
                         statuses[i]);
}

/* --- wk_cublas_create on the fake driver ---------------------------------- */

/* LeakSanitizer's hook (read only in the ASan build): cuBLASLt 13 keeps 192
 * bytes from a cublasLtCreate that fails for want of a GPU; not ours. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
    return "leak:libcublasLt.so\n";
}

/* $(BUILD)/lib/libfakecuda.so (the fake driver and NCCL), from this test's
 * $(BUILD)/tests/unit/ */
Test(cublas_create, refuses_a_driver_only_stack)
{
    struct wk_cuda_paths paths = {.cuda = fakestack_path(), .driver_only = 1};
    wk_cuda_t *c = NULL;
    wk_cublas_t *lt = (wk_cublas_t *)&paths;
    char err[512];

    cr_assert_eq(wk_cuda_open(&paths, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_cuda_context(c, 0), 0, "%s", wk_cuda_error(c));
    cr_expect_eq(wk_cublas_create(c, 0, &lt, err, sizeof(err)), -ENOENT);
    cr_expect_null(lt);
    cr_expect(strstr(err, "cuBLASLt is not open") != NULL, "%s", err);
    wk_cuda_close(c);
}

/* The real cuBLASLt beside the fake driver: every entry point resolves;
 * cublasLtCreate then finds no GPU (its own runtime looks for the real
 * driver) and says so by name, or, on a machine with one, succeeds. */
Test(cublas_create, resolves_the_real_library_and_names_its_failure)
{
    void *probe = open_cublaslt();
    struct wk_cuda_paths paths = {.cuda = fakestack_path(), .nccl = fakestack_path()};
    wk_cuda_t *c = NULL;
    wk_cublas_t *lt = NULL;
    char err[512] = "";
    int rc;

    if (!probe)
        return;
    cr_assert_eq(wk_cuda_open(&paths, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_cuda_context(c, 0), 0, "%s", wk_cuda_error(c));
    rc = wk_cublas_create(c, 1 << 20, &lt, err, sizeof(err));
    if (rc == 0) {
        cr_log_info("cuBLASLt found a GPU: created");
        cr_expect_str_eq(wk_cublas_error(lt), "");
        cr_expect_eq(wk_cublas_cached(lt, NULL), 0);
        wk_cublas_destroy(lt);
    } else {
        cr_expect_eq(rc, -EIO, "%s", err);
        cr_expect_null(lt);
        cr_expect(strncmp(err, "cublasLtCreate: CUBLAS_STATUS_", 30) == 0, "%s", err);
    }
    wk_cuda_close(c);
}

/* --- the row-major to column-major mapping, on OpenBLAS ------------------- */

static uint64_t rng = 0x1234567;

static float *random_matrix(size_t n)
{
    float *m = malloc(n * sizeof(float));

    cr_assert(m);
    for (size_t i = 0; i < n; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        m[i] = (float)((double)(rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
    }
    return m;
}

/* C = alpha op(A) op(B) + beta C as cuBLASLt would be asked to do it:
 * column-major, with our B as its A. Host arrays stand for the device
 * pointers (the op's a, b, c are ignored). */
static void run_colmajor(const struct wk_cublas_op *op, const float *a, const float *b, float *c)
{
    struct wk_cublas_colmajor cm;

    wk_cublas_colmajor(op, &cm);
    /* the stored layouts are the op's own, before op() */
    cr_assert_eq(cm.trans_a == WK_LT_OP_N ? cm.a_rows : cm.a_cols, cm.m);
    cr_assert_eq(cm.trans_a == WK_LT_OP_N ? cm.a_cols : cm.a_rows, cm.k);
    cr_assert_eq(cm.trans_b == WK_LT_OP_N ? cm.b_rows : cm.b_cols, cm.k);
    cr_assert_eq(cm.trans_b == WK_LT_OP_N ? cm.b_cols : cm.b_rows, cm.n);
    cr_assert_eq(cm.c_rows, cm.m);
    cr_assert_eq(cm.c_cols, cm.n);
    cr_assert((int64_t)cm.a_rows <= cm.lda && (int64_t)cm.b_rows <= cm.ldb &&
              (int64_t)cm.c_rows <= cm.ldc);
    cblas_sgemm(CblasColMajor, cm.trans_a == WK_LT_OP_T ? CblasTrans : CblasNoTrans,
                cm.trans_b == WK_LT_OP_T ? CblasTrans : CblasNoTrans, (int)cm.m, (int)cm.n,
                (int)cm.k, op->alpha, b, (int)cm.lda, a, (int)cm.ldb, op->beta, c, (int)cm.ldc);
}

static void expect_close(const float *got, const float *want, int rows, int cols, int ld)
{
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            const float g = got[(size_t)i * ld + j], w = want[(size_t)i * ld + j];

            cr_assert(fabsf(g - w) <= 1e-5f * (1.0f + fabsf(w)), "[%d][%d] %g, want %g", i, j,
                      (double)g, (double)w);
        }
}

Test(cublas_mapping, every_transpose_with_padded_strides)
{
    const int m = 37, n = 53, k = 29;

    openblas_set_num_threads(1);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            const int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 5, ldc = n + 2;
            const int a_rows = ta ? k : m, b_rows = tb ? n : k;
            float *a = random_matrix((size_t)a_rows * lda),
                  *b = random_matrix((size_t)b_rows * ldb);
            float *c0 = random_matrix((size_t)m * ldc), *c1 = malloc((size_t)m * ldc * 4);
            struct wk_cublas_op op = {.trans_a = ta,
                                      .trans_b = tb,
                                      .m = m,
                                      .n = n,
                                      .k = k,
                                      .alpha = 0.75f,
                                      .a = 1,
                                      .lda = lda,
                                      .b = 1,
                                      .ldb = ldb,
                                      .beta = 0.5f,
                                      .c = 1,
                                      .ldc = ldc,
                                      .dtype = WK_CUBLAS_F32};
            char err[128] = "";

            cr_assert(c1);
            cr_assert_eq(wk_cublas_op_check(&op, err, sizeof(err)), 0, "%s", err);
            memcpy(c1, c0, (size_t)m * ldc * 4);
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
                        tb ? CblasTrans : CblasNoTrans, m, n, k, op.alpha, a, lda, b, ldb, op.beta,
                        c0, ldc);
            run_colmajor(&op, a, b, c1);
            expect_close(c1, c0, m, n, ldc);
            free(a);
            free(b);
            free(c0);
            free(c1);
        }
}

/* The three forms against tensor.h's wk_gemm_* (what the CPU backend runs). */
Test(cublas_mapping, model_forms_match_tensor_gemms)
{
    const int rows = 37, in = 29, out = 53;
    float *x = random_matrix((size_t)rows * in), *w = random_matrix((size_t)out * in);
    float *dy = random_matrix((size_t)rows * out);
    float *y0 = random_matrix((size_t)rows * out), *y1 = malloc((size_t)rows * out * 4);
    float *dx0 = random_matrix((size_t)rows * in), *dx1 = malloc((size_t)rows * in * 4);
    float *dw0 = random_matrix((size_t)out * in), *dw1 = malloc((size_t)out * in * 4);
    struct wk_cublas_op op;
    char err[128] = "";

    openblas_set_num_threads(1);
    cr_assert(y1 && dx1 && dw1);
    memcpy(y1, y0, (size_t)rows * out * 4);
    memcpy(dx1, dx0, (size_t)rows * in * 4);
    memcpy(dw1, dw0, (size_t)out * in * 4);

    wk_gemm_xwt(x, w, y0, rows, in, out, 0.5f);
    wk_cublas_op_xwt(&op, WK_CUBLAS_F32, 1, 1, 1, rows, in, out, 0.5f);
    cr_assert_eq(wk_cublas_op_check(&op, err, sizeof(err)), 0, "%s", err);
    run_colmajor(&op, x, w, y1);
    expect_close(y1, y0, rows, out, out);

    wk_gemm_dyw(dy, w, dx0, rows, in, out, 1.0f);
    wk_cublas_op_dyw(&op, WK_CUBLAS_F32, 1, 1, 1, rows, in, out, 1.0f);
    cr_assert_eq(wk_cublas_op_check(&op, err, sizeof(err)), 0, "%s", err);
    run_colmajor(&op, dy, w, dx1);
    expect_close(dx1, dx0, rows, in, in);

    wk_gemm_dytx(dy, x, dw0, rows, in, out);
    wk_cublas_op_dytx(&op, WK_CUBLAS_BF16, 1, 1, 1, rows, in, out);
    cr_assert_eq(op.dtype, WK_CUBLAS_BF16);
    cr_assert_eq(op.beta, 1.0f, "the weight gradient accumulates");
    cr_assert_eq(wk_cublas_op_check(&op, err, sizeof(err)), 0, "%s", err);
    run_colmajor(&op, dy, x, dw1);
    expect_close(dw1, dw0, out, in, in);
    free(x);
    free(w);
    free(dy);
    free(y0);
    free(y1);
    free(dx0);
    free(dx1);
    free(dw0);
    free(dw1);
}

Test(cublas_mapping, bad_ops_are_refused_by_name)
{
    const struct wk_cublas_op good = {.m = 37,
                                      .n = 53,
                                      .k = 29,
                                      .alpha = 1.0f,
                                      .a = 256,
                                      .lda = 29,
                                      .b = 512,
                                      .ldb = 53,
                                      .c = 768,
                                      .ldc = 53};
    struct wk_cublas_op op;
    char err[128];

    cr_assert_eq(wk_cublas_op_check(&good, err, sizeof(err)), 0);
    op = good;
    op.lda = 10;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect_str_eq(err, "GEMM lda 10 < k 29");
    op = good;
    op.trans_a = 1;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect_str_eq(err, "GEMM lda 29 < m 37");
    op = good;
    op.trans_b = 1; /* B is [n][k]: ldb 53 >= k 29 is enough */
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), 0);
    op.ldb = 20;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect_str_eq(err, "GEMM ldb 20 < k 29");
    op = good;
    op.ldb = 52;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect_str_eq(err, "GEMM ldb 52 < n 53");
    op = good;
    op.ldc = 52;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect_str_eq(err, "GEMM ldc 52 < n 53");
    op = good;
    op.k = 0;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect(strstr(err, "k=0") != NULL, "%s", err);
    op = good;
    op.dtype = (enum wk_cublas_dtype)7;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect(strstr(err, "dtype 7") != NULL, "%s", err);
    op = good;
    op.sm_count = -1;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    op = good;
    op.b = 0;
    cr_expect_eq(wk_cublas_op_check(&op, err, sizeof(err)), -EINVAL);
    cr_expect(strstr(err, "NULL") != NULL, "%s", err);
}
