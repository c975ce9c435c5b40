/* dlayer.c - the model's dense layers on the GPU (dlayer.h): launch
 * geometry of each kernel (kernels/ *.cu give the contracts) and the GEMMs
 * between them. Owns no memory. */
#include "worker/cuda/model/dlayer.h"

#include <errno.h>
#include <stdio.h>

#define BLOCK 256        /* threads of a row or element launch */
#define ATTN_THREADS 256 /* kernels/attention.cu: exactly */
#define ATTN_TILE 32     /* rows per attention block */
#define ATTN_MAX_DH 128  /* kernels/attention.cu: DX_ATTN_MAX_DH */

static unsigned cap_grid(const wk_gpu_t *g, size_t blocks)
{
    size_t cap = (size_t)wk_gpu_sms(g) * 16;

    if (blocks < 1)
        blocks = 1;
    return (unsigned)(blocks < cap ? blocks : cap);
}

/* blocks for one thread per element (grid-stride) */
static unsigned elem_grid(const wk_gpu_t *g, size_t items)
{
    return cap_grid(g, (items + BLOCK - 1) / BLOCK);
}

/* --- RMSNorm ---------------------------------------------------------------- */

int wk_dl_rmsnorm_fwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, float eps, wk_cuda_ptr x,
                      wk_cuda_ptr gain, wk_cuda_ptr y, wk_cuda_ptr rstd)
{
    void *args[] = {&x, &gain, &n, &d, &eps, &y, &rstd};

    return wk_gpu_launch(g, WK_K_RMSNORM_FWD, s, cap_grid(g, (size_t)n), BLOCK, 0, args);
}

size_t wk_dl_rmsnorm_scratch(int n, int d)
{
    return (size_t)((n + WK_DL_NORM_ROWS - 1) / WK_DL_NORM_ROWS) * (size_t)d * sizeof(float);
}

int wk_dl_rmsnorm_bwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, wk_cuda_ptr x, wk_cuda_ptr gain,
                      wk_cuda_ptr dy, wk_cuda_ptr rstd, wk_cuda_ptr dx, wk_cuda_ptr dgain,
                      wk_cuda_ptr part)
{
    int per = WK_DL_NORM_ROWS, parts = (n + WK_DL_NORM_ROWS - 1) / WK_DL_NORM_ROWS, rc;
    void *args[] = {&x, &gain, &dy, &rstd, &n, &d, &per, &dx, &part};
    void *dg_args[] = {&part, &parts, &d, &dgain};

    /* the grid is exactly one block per WK_DL_NORM_ROWS rows (the kernel's
     * contract: block b owns rows b * per ..) */
    if ((rc = wk_gpu_launch(g, WK_K_RMSNORM_BWD, s, (unsigned)parts, BLOCK, 0, args)) < 0)
        return rc;
    return wk_gpu_launch(g, WK_K_RMSNORM_DG, s, elem_grid(g, (size_t)d), BLOCK, 0, dg_args);
}

/* --- attention ---------------------------------------------------------------- */

static int attn_check(const struct wk_dl_attn_shape *a)
{
    if (a->batch < 1 || a->seq < 1 || a->heads < 1 || a->d % a->heads != 0 ||
        a->d / a->heads > ATTN_MAX_DH)
        return -EINVAL;
    return 0;
}

/* the attention kernels' dynamic shared memory, in bytes (attention.cu) */
static unsigned attn_shared(const struct wk_dl_attn_shape *a, enum wk_gpu_kernel k)
{
    unsigned stride = (unsigned)(a->d / a->heads) | 1u, f = 2 * ATTN_TILE * stride;

    if (k == WK_K_ATTN_BWD_DQ)
        f = 3 * ATTN_TILE * stride;
    else if (k == WK_K_ATTN_BWD_DKDV)
        f = 3 * ATTN_TILE * stride + 32 * 33 + 32;
    return f * (unsigned)sizeof(float);
}

static int attn_launch(wk_gpu_t *g, wk_cuda_stream s, const struct wk_dl_attn_shape *a,
                       enum wk_gpu_kernel k, void **args)
{
    unsigned blocks = (unsigned)(a->batch * a->heads * ((a->seq + ATTN_TILE - 1) / ATTN_TILE));
    unsigned shmem = attn_shared(a, k);

    return wk_gpu_launch(g, k, s, blocks, ATTN_THREADS, shmem, args);
}

int wk_dl_attn_fwd(wk_gpu_t *g, wk_cuda_stream s, const struct wk_dl_attn_shape *a, wk_cuda_ptr x,
                   const wk_cuda_ptr w[4], const struct wk_dl_attn_buf *b, wk_cuda_ptr y)
{
    int n = a->batch * a->seq, d = a->d, rc;
    int batch = a->batch, seq = a->seq, heads = a->heads;
    wk_cuda_ptr q = b->q, k = b->k, v = b->v, p = b->p, ctx = b->ctx;
    void *args[] = {&q, &k, &v, &batch, &seq, &d, &heads, &p, &ctx};

    if (attn_check(a) < 0)
        return -EINVAL;
    if ((rc = wk_gpu_xwt(g, s, x, w[0], q, n, d, d, 0.0f)) < 0 ||
        (rc = wk_gpu_xwt(g, s, x, w[1], k, n, d, d, 0.0f)) < 0 ||
        (rc = wk_gpu_xwt(g, s, x, w[2], v, n, d, d, 0.0f)) < 0)
        return rc;
    if ((rc = attn_launch(g, s, a, WK_K_ATTN_FWD, args)) < 0)
        return rc;
    return wk_gpu_xwt(g, s, ctx, w[3], y, n, d, d, 0.0f);
}

int wk_dl_attn_bwd_input(wk_gpu_t *g, wk_cuda_stream s, const struct wk_dl_attn_shape *a,
                         const wk_cuda_ptr w[4], wk_cuda_ptr dy, const struct wk_dl_attn_buf *b,
                         wk_cuda_ptr dx)
{
    int n = a->batch * a->seq, d = a->d, rc;
    int batch = a->batch, seq = a->seq, heads = a->heads;
    wk_cuda_ptr q = b->q, k = b->k, v = b->v, p = b->p, rowdot = b->rowdot;
    wk_cuda_ptr dctx = b->dctx, dq = b->dq, dk = b->dk, dv = b->dv;
    void *dq_args[] = {&k, &v, &p, &dctx, &batch, &seq, &d, &heads, &dq, &rowdot};
    void *dkdv_args[] = {&q, &v, &p, &dctx, &rowdot, &batch, &seq, &d, &heads, &dk, &dv};

    if (attn_check(a) < 0)
        return -EINVAL;
    /* as wk_attn_backward_input: dctx = dy Wo, the core, dx = dq Wq + dk Wk + dv Wv */
    if ((rc = wk_gpu_dyw(g, s, dy, w[3], dctx, n, d, d, 0.0f)) < 0)
        return rc;
    if ((rc = attn_launch(g, s, a, WK_K_ATTN_BWD_DQ, dq_args)) < 0 ||
        (rc = attn_launch(g, s, a, WK_K_ATTN_BWD_DKDV, dkdv_args)) < 0)
        return rc;
    if ((rc = wk_gpu_dyw(g, s, dq, w[0], dx, n, d, d, 0.0f)) < 0 ||
        (rc = wk_gpu_dyw(g, s, dk, w[1], dx, n, d, d, 1.0f)) < 0 ||
        (rc = wk_gpu_dyw(g, s, dv, w[2], dx, n, d, d, 1.0f)) < 0)
        return rc;
    return 0;
}

int wk_dl_attn_bwd_weight(wk_gpu_t *g, wk_cuda_stream s, const struct wk_dl_attn_shape *a,
                          wk_cuda_ptr x, wk_cuda_ptr dy, const struct wk_dl_attn_buf *b,
                          const wk_cuda_ptr dw[4])
{
    int n = a->batch * a->seq, d = a->d, rc;

    if (attn_check(a) < 0)
        return -EINVAL;
    if ((rc = wk_gpu_dytx(g, s, dy, b->ctx, dw[3], n, d, d)) < 0 ||
        (rc = wk_gpu_dytx(g, s, b->dq, x, dw[0], n, d, d)) < 0 ||
        (rc = wk_gpu_dytx(g, s, b->dk, x, dw[1], n, d, d)) < 0 ||
        (rc = wk_gpu_dytx(g, s, b->dv, x, dw[2], n, d, d)) < 0)
        return rc;
    return 0;
}

/* --- embedding and head --------------------------------------------------------- */

int wk_dl_embed_fwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr w,
                    wk_cuda_ptr tokens, wk_cuda_ptr y)
{
    void *args[] = {&w, &tokens, &n, &d, &vocab, &y};

    /* warps stride over rows: one warp per row, 8 per block */
    return wk_gpu_launch(g, WK_K_EMBED_FWD, s, cap_grid(g, ((size_t)n + 7) / 8), BLOCK, 0, args);
}

int wk_dl_embed_bwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr tokens,
                    wk_cuda_ptr dy, wk_cuda_ptr chain, wk_cuda_ptr dw)
{
    void *args[] = {&tokens, &dy, &n, &d, &vocab, &chain, &dw};

    return wk_gpu_launch(g, WK_K_EMBED_BWD, s, cap_grid(g, ((size_t)n + 7) / 8), BLOCK, 0, args);
}

int wk_dl_head_fwd(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr x,
                   wk_cuda_ptr w, wk_cuda_ptr targets, wk_cuda_ptr logits, wk_cuda_ptr probs,
                   wk_cuda_ptr loss)
{
    void *args[] = {&logits, &targets, &n, &vocab, &probs, &loss};
    int rc;

    if ((rc = wk_cublas_xwt(wk_gpu_cublas(g), s, WK_CUBLAS_F32, x, w, logits, n, d, vocab, 0.0f,
                            0)) < 0)
        return wk_gpu_gemm_result(g, rc);
    return wk_gpu_launch(g, WK_K_XENT_FWD, s, cap_grid(g, (size_t)n), BLOCK, 0, args);
}

int wk_dl_head_bwd_input(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr w,
                         wk_cuda_ptr probs, wk_cuda_ptr targets, wk_cuda_ptr dlogits,
                         wk_cuda_ptr dx)
{
    void *args[] = {&probs, &targets, &n, &vocab, &dlogits};
    int rc;

    if ((rc = wk_gpu_launch(g, WK_K_XENT_BWD, s, cap_grid(g, (size_t)n), BLOCK, 0, args)) < 0)
        return rc;
    return wk_gpu_gemm_result(
        g, wk_cublas_dyw(wk_gpu_cublas(g), s, WK_CUBLAS_F32, dlogits, w, dx, n, d, vocab, 0.0f, 0));
}

int wk_dl_head_bwd_weight(wk_gpu_t *g, wk_cuda_stream s, int n, int d, int vocab, wk_cuda_ptr x,
                          wk_cuda_ptr dlogits, wk_cuda_ptr dw)
{
    return wk_gpu_gemm_result(
        g, wk_cublas_dytx(wk_gpu_cublas(g), s, WK_CUBLAS_F32, dlogits, x, dw, n, d, vocab, 0));
}

int wk_dl_add(wk_gpu_t *g, wk_cuda_stream s, long long count, wk_cuda_ptr a, wk_cuda_ptr b,
              wk_cuda_ptr out)
{
    void *args[] = {&a, &b, &count, &out};

    return wk_gpu_launch(g, WK_K_ADD, s, elem_grid(g, (size_t)count), BLOCK, 0, args);
}
