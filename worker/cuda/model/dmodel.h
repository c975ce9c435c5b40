/* dmodel.h - a model stage on the GPU: the device twin of a struct
 * wk_model (worker/model/model.h), for the cuda backend. The host model
 * stays the source of shapes, names, initialisation and checkpoints: the
 * twin uploads its weights, AdamW moments, step counts and routing biases,
 * trains on the device, and downloads them back into it on request, so a
 * checkpoint of either backend loads in the other.
 *
 * Per micro-batch (struct wk_dmodel_cache) the same passes as the host
 * model on device buffers, fp32, all on the GPU's compute stream:
 * forward (embedding or x_in; per layer x + attn(norm1(x)), then + moe(
 * norm2(.)); the head's loss), backward_input (dx, norm gains) and
 * backward_weight (every other gradient), then zero_grad / scale_grad /
 * step (AdamW per tensor with the host's scalars, the routing-bias update
 * from the step's expert loads). Calls enqueue; those that return host
 * values (the loss) synchronise. The MoE layers run their experts here or,
 * with wk_dmodel_set_ep, on the ep ranks (dmoe.h). 0 or -errno with the
 * reason in wk_dmodel_error. */
#ifndef WK_DMODEL_H
#define WK_DMODEL_H

#include <stdint.h>

#include "worker/cuda/model/dmoe.h"
#include "worker/cuda/gpu.h"
#include "worker/model/model.h"

typedef struct wk_dmodel wk_dmodel_t;
typedef struct wk_dmodel_cache wk_dmodel_cache_t;

/* The twin of m (initialised, with wk_model_optim_init done; m must
 * outlive the twin). Uploads everything. */
int wk_dmodel_create(wk_gpu_t *g, struct wk_model *m, wk_dmodel_t **out, char *err, size_t errlen);
void wk_dmodel_destroy(wk_dmodel_t *dm);
const char *wk_dmodel_error(const wk_dmodel_t *dm);

/* The stream every call of dm enqueues on (the GPU's compute stream until
 * set; switching waits for the old one's work). */
int wk_dmodel_use_stream(wk_dmodel_t *dm, wk_cuda_stream s);
wk_cuda_stream wk_dmodel_stream(const wk_dmodel_t *dm);
/* Expert parallelism for the caches made after (ep outlives them; NULL:
 * every expert here, the default). */
void wk_dmodel_set_ep(wk_dmodel_t *dm, const struct wk_dmoe_ep *ep);
int wk_dmodel_cache_create(wk_dmodel_t *dm, int batch, int seq, wk_dmodel_cache_t **out);
void wk_dmodel_cache_destroy(wk_dmodel_t *dm, wk_dmodel_cache_t *c);

/* tokens [batch][seq + 1] on the host (with the embedding or the head);
 * x_in / x_out [rows][d] device buffers (without them); *loss the mean
 * cross-entropy (with the head: synchronises). */
int wk_dmodel_forward(wk_dmodel_t *dm, wk_dmodel_cache_t *c, const int32_t *tokens,
                      wk_cuda_ptr x_in, wk_cuda_ptr x_out, float *loss);
/* dy [rows][d] without the head; dx [rows][d] without the embedding. */
int wk_dmodel_backward_input(wk_dmodel_t *dm, wk_dmodel_cache_t *c, wk_cuda_ptr dy, wk_cuda_ptr dx);
int wk_dmodel_backward_weight(wk_dmodel_t *dm, wk_dmodel_cache_t *c);

int wk_dmodel_zero_grad(wk_dmodel_t *dm);
int wk_dmodel_scale_grad(wk_dmodel_t *dm, float scale);
/* AdamW on every tensor, the routing biases from the loads, loads to 0. */
int wk_dmodel_step(wk_dmodel_t *dm);

/* Weights, gradients, moments, step counts, biases and loads back into
 * the host model (synchronises). */
int wk_dmodel_download(wk_dmodel_t *dm);
/* Only the gradients and the expert loads, to the host (synchronises) and
 * back (for the step-end sums the host makes over a stage's ranks). */
int wk_dmodel_download_grads(wk_dmodel_t *dm);
int wk_dmodel_upload_grads(wk_dmodel_t *dm);
/* The device buffers the step-end sums run over in place: tensor i's
 * gradient (n fp32, the host model's order; -ERANGE past the last) and
 * the expert loads (n int64, [layers][experts]). */
int wk_dmodel_grad_buffer(const wk_dmodel_t *dm, int i, wk_cuda_ptr *g, size_t *n);
wk_cuda_ptr wk_dmodel_loads(const wk_dmodel_t *dm, size_t *n);

#endif
