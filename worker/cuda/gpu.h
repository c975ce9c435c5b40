/* gpu.h - one GPU as the cuda backend uses it: its context, every kernel
 * of kernels/ loaded from the images built into this program (the sm_90
 * cubin, the PTX through the driver's JIT elsewhere), the cuBLASLt handle
 * and two streams, compute and communication, that only events order.
 *
 * A build without nvcc has no kernel images: wk_gpu_create then fails with
 * -ENOTSUP saying so. Launches take the kernel by its enum (WK_K_*, one per
 * kernel the backend runs, named as in kernels/ *.cu) and report failures
 * as "dx_rmsnorm_fwd: cuLaunchKernel(...): ..." in wk_gpu_error. */
#ifndef WK_GPU_H
#define WK_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "worker/cuda/cublas.h"
#include "worker/cuda/driver.h"

/* X(enum suffix, module, function name): every kernel the backend launches */
#define WK_GPU_KERNELS(X)                                                                          \
    X(ROUTE_TOPK, routing, "dx_route_topk")                                                        \
    X(DISPATCH_COUNT, dispatch, "dx_dispatch_count")                                               \
    X(DISPATCH_OFFSETS, dispatch, "dx_dispatch_offsets")                                           \
    X(DISPATCH_ROWS, dispatch, "dx_dispatch_rows")                                                 \
    X(DISPATCH_PACK, dispatch, "dx_dispatch_pack")                                                 \
    X(COMBINE, dispatch, "dx_combine")                                                             \
    X(RMSNORM_FWD, elementwise, "dx_rmsnorm_fwd")                                                  \
    X(RMSNORM_BWD, elementwise, "dx_rmsnorm_bwd")                                                  \
    X(RMSNORM_DG, elementwise, "dx_rmsnorm_dg")                                                    \
    X(SWIGLU_FWD, elementwise, "dx_swiglu_fwd")                                                    \
    X(SWIGLU_BWD, elementwise, "dx_swiglu_bwd")                                                    \
    X(XENT_FWD, elementwise, "dx_softmax_xent_fwd")                                                \
    X(XENT_BWD, elementwise, "dx_softmax_xent_bwd")                                                \
    X(ATTN_FWD, attention, "dx_attn_fwd")                                                          \
    X(ATTN_BWD_DQ, attention, "dx_attn_bwd_dq")                                                    \
    X(ATTN_BWD_DKDV, attention, "dx_attn_bwd_dkdv")                                                \
    X(EMBED_FWD, train, "dx_embed_fwd")                                                            \
    X(EMBED_BWD, train, "dx_embed_bwd")                                                            \
    X(ADAMW, train, "dx_adamw")                                                                    \
    X(ADD, train, "dx_add")                                                                        \
    X(SCALE, train, "dx_scale")                                                                    \
    X(MOE_LOAD_ADD, train, "dx_moe_load_add")                                                      \
    X(MOE_BIAS_UPDATE, train, "dx_moe_bias_update")                                                \
    X(F32_TO_BF16, convert, "dx_f32_to_bf16")                                                      \
    X(BF16_TO_F32, convert, "dx_bf16_to_f32")                                                      \
    X(FP8_QUANT, fp8, "dx_fp8_quant_1x128")                                                        \
    X(FP8_DEQUANT, fp8, "dx_fp8_dequant_1x128")                                                    \
    X(FP8_QUANT_REC, fp8, "dx_fp8_quant_rec")                                                      \
    X(FP8_DEQUANT_REC, fp8, "dx_fp8_dequant_rec")                                                  \
    X(MOE_SIGMOID, moe, "dx_moe_sigmoid")                                                          \
    X(MOE_GATE_SCALE, moe, "dx_moe_gate_scale")                                                    \
    X(MOE_GATE_DOT, moe, "dx_moe_gate_dot")                                                        \
    X(MOE_ROUTER_GRAD, moe, "dx_moe_router_grad")                                                  \
    X(TWOHOP_COUNT, twohop, "dx_twohop_count")                                                     \
    X(TWOHOP_OFFSETS, twohop, "dx_twohop_offsets")                                                 \
    X(TWOHOP_ROWS, twohop, "dx_twohop_rows")                                                       \
    X(TRANSPORT_SEND, transport, "dx_transport_send")                                              \
    X(TRANSPORT_RECV, transport, "dx_transport_recv")

enum wk_gpu_kernel {
#define WK_GPU_ENUM(e, mod, name) WK_K_##e,
    WK_GPU_KERNELS(WK_GPU_ENUM)
#undef WK_GPU_ENUM
        WK_K_COUNT
};

typedef struct wk_gpu wk_gpu_t;

/* Makes device's primary context current on the calling thread (c must
 * hold none yet), loads every module, resolves every kernel, creates the
 * cuBLASLt handle (workspace_bytes, 0: its default) and the two streams.
 * c stays the caller's and must outlive the gpu. 0, -ENOTSUP (no kernel
 * images in this build, and a driver that needs them: any real one; the
 * fake stack's takes the placeholders), -ENOENT (cuBLASLt not opened) or
 * -EIO, with the reason in err. */
int wk_gpu_create(wk_cuda_t *c, int device, size_t workspace_bytes, wk_gpu_t **out, char *err,
                  size_t errlen);
void wk_gpu_destroy(wk_gpu_t *g);

/* 1 when this program was built with its CUDA kernels (nvcc was found);
 * 0: its modules are placeholders (wk_gpu_describe: "NAME placeholder"). */
int wk_gpu_have_kernels(void);

wk_cuda_t *wk_gpu_cuda(const wk_gpu_t *g);
wk_cublas_t *wk_gpu_cublas(const wk_gpu_t *g);
wk_cuda_stream wk_gpu_compute_stream(const wk_gpu_t *g);
wk_cuda_stream wk_gpu_comm_stream(const wk_gpu_t *g);
/* Compute lanes: streams that may run the model at the same time (lane 0
 * is the compute stream), each with its own bf16 scratch and cuBLASLt
 * workspace, so two model chunks can overlap (an FB pair's forward and
 * backward). Only events order them. */
#define WK_GPU_LANES 2
wk_cuda_stream wk_gpu_lane_stream(const wk_gpu_t *g, int lane);
/* multiprocessors of the device */
unsigned wk_gpu_sms(const wk_gpu_t *g);
/* The device's total memory in bytes (cuDeviceTotalMem), into *bytes:
 * what a cuda worker reports at registration. 0, or -EIO with the
 * driver's error in wk_gpu_error (*bytes is then 0). */
int wk_gpu_memory_bytes(wk_gpu_t *g, uint64_t *bytes);
/* "dx_rmsnorm_fwd" */
const char *wk_gpu_kernel_name(enum wk_gpu_kernel k);
/* how each module was loaded: "routing cubin, dispatch cubin, ..., fp8 PTX" */
const char *wk_gpu_describe(const wk_gpu_t *g);

/* Launches kernel k on stream s (1-D grid and block). 0 or -EIO with the
 * kernel's name and the driver's error in wk_gpu_error. */
int wk_gpu_launch(wk_gpu_t *g, enum wk_gpu_kernel k, wk_cuda_stream s, unsigned grid,
                  unsigned block, unsigned shmem, void **args);
const char *wk_gpu_error(const wk_gpu_t *g);
/* Kernel k's function, for launchers that take one (worker/cuda/comm/ipcring.h). */
wk_cuda_function_t wk_gpu_function(const wk_gpu_t *g, enum wk_gpu_kernel k);
/* rc, with the reason (printf-style) as wk_gpu_error: for the layers'
 * failures outside a kernel or a GEMM (an NCCL exchange, a bad size). */
int wk_gpu_fail(wk_gpu_t *g, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* rc of a cuBLASLt call: when negative, its error becomes wk_gpu_error. */
int wk_gpu_gemm_result(wk_gpu_t *g, int rc);

/* The model's linear GEMMs (attention's projections, the experts' FFNs:
 * what DeepSeek-V3 runs in low precision; the router and the head stay
 * fp32) in the three forms of tensor.h, in the GPU's GEMM precision:
 * WK_CUBLAS_F32 (the default), or WK_CUBLAS_BF16: both operands rounded to
 * bfloat16 (kernels/convert.cu, into scratch buffers of the GPU) for the
 * GEMM, which accumulates and writes fp32; weights stay fp32 (the master
 * copy). 0 or -errno with the reason in wk_gpu_error. */
void wk_gpu_set_gemm_dtype(wk_gpu_t *g, enum wk_cublas_dtype dtype);
enum wk_cublas_dtype wk_gpu_gemm_dtype(const wk_gpu_t *g);
int wk_gpu_xwt(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr x, wk_cuda_ptr w, wk_cuda_ptr y, int n,
               int in, int out, float beta);
int wk_gpu_dyw(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr dy, wk_cuda_ptr w, wk_cuda_ptr dx, int n,
               int in, int out, float beta);
int wk_gpu_dytx(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr dy, wk_cuda_ptr x, wk_cuda_ptr dw, int n,
                int in, int out);

/* Persistent bf16 copies of weights, for the bf16 GEMMs above: an operand
 * that lies inside a kept tensor is taken from its copy instead of being
 * converted at every GEMM (the same rounding, so the same results). The
 * owner refreshes a copy whenever its weight changes (after the optimizer
 * step, after an upload), on the stream its GEMMs run on; a stale copy is
 * the owner's bug. keep: 0, -ENOMEM/-EIO; refresh: 0 or -errno (-ENOENT
 * when w is not kept); forget frees it. */
int wk_gpu_bf16_keep(wk_gpu_t *g, wk_cuda_ptr w, size_t count);
int wk_gpu_bf16_refresh(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr w);
void wk_gpu_bf16_forget(wk_gpu_t *g, wk_cuda_ptr w);

#endif
