/* tensor.h - the model's row-major fp32 matrices and the three GEMMs every
 * dense layer is made of.
 *
 * Weight layout (all layers): a weight mapping `in` features to `out`
 * features is stored as W[out][in], row-major (the PyTorch nn.Linear layout).
 * Activations are [n][features], row-major, one row per token.
 *
 *   forward        y[n][out]   = x[n][in] W^T          wk_gemm_xwt
 *   input grad     dx[n][in]   = dy[n][out] W          wk_gemm_dyw
 *   weight grad    dW[out][in] += dy^T x               wk_gemm_dytx
 *
 * Determinism: everything goes through OpenBLAS cblas_sgemm and nothing here
 * starts threads. Results are bitwise reproducible only if OpenBLAS itself is
 * single-threaded: the runtime (and every test) must call
 * openblas_set_num_threads(1) before the first GEMM. */
#ifndef WK_TENSOR_H
#define WK_TENSOR_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Default initial standard deviation of weights (normal * std). */
#define WK_INIT_STD 0.02f

/* A row-major float matrix that owns its storage. */
struct wk_mat {
    float *data;
    int rows;
    int cols;
};

/* Allocates rows x cols zeroed floats. 0 or -EINVAL / -ENOMEM. */
int wk_mat_init(struct wk_mat *m, int rows, int cols);
void wk_mat_free(struct wk_mat *m);
size_t wk_mat_size(const struct wk_mat *m);
void wk_mat_zero(struct wk_mat *m);
/* Fills with normal(0, 1) * std drawn from wk_rng_stream(seed, stream), in
 * row-major order, so the values depend on (seed, stream, shape) only. */
void wk_mat_fill_normal(struct wk_mat *m, uint64_t seed, uint64_t stream, float std);
void wk_mat_fill(struct wk_mat *m, float value);

/* A stop flag for the calling thread (NULL: none). Long work polls it: the
 * weight fills (every WK_STOP_POLL values, leaving the rest unfilled), the
 * model's initialisation, forward and backward (between layers), which
 * then fail with -ECANCELED. The runtime sets its abort flag here, so that
 * an abort takes effect within one layer's GEMMs, not after a whole stage
 * is built or a whole op run. */
#define WK_STOP_POLL (1u << 20)
void wk_set_stop(const atomic_bool *stop);
bool wk_stopped(void);

/* y[n][out] = x[n][in] W[out][in]^T + beta * y. */
void wk_gemm_xwt(const float *x, const float *w, float *y, int n, int in, int out, float beta);
/* dx[n][in] = dy[n][out] W[out][in] + beta * dx. */
void wk_gemm_dyw(const float *dy, const float *w, float *dx, int n, int in, int out, float beta);
/* dW[out][in] += dy[n][out]^T x[n][in]. */
void wk_gemm_dytx(const float *dy, const float *x, float *dw, int n, int in, int out);

#endif
