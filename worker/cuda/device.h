/* device.h - the cuda backend's device behind the backend table
 * (struct wk_backend_device_ops, worker/backend.h): open wraps
 * wk_cuda_open (the GPU stack, every missing piece named) and
 * wk_gpu_create (the worker's GPU with every kernel loaded), asks the
 * GPU's total memory and describes both for the log; the handle is the
 * wk_gpu_t the engines take, and it owns its wk_cuda_t (close destroys the
 * GPU, then closes the stack). The context is current on the opening
 * thread; the runtime's thread binds it too (wk_cuda_bind). lost is
 * wk_cuda_lost: a kernel's fault left the context sticky-failed. */
#ifndef WK_CUDA_DEVICE_H
#define WK_CUDA_DEVICE_H

struct wk_backend_device_ops;

extern const struct wk_backend_device_ops wk_cuda_device_ops;

#endif
