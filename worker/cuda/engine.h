/* engine.h - the rank trainer's device engine (worker/rank/trainer.h):
 * each chunk trains on its device twin (worker/cuda/model/dmodel.h) on a
 * lane of its own; with the job's NCCL id the pipeline messages, the
 * step-end sums and the expert exchange go GPU to GPU (NCCL, IPC rings on
 * one node), else through the hosts. Its setup takes the worker's GPU
 * (wk_gpu_t) as the device. The cuda backend is the rank trainer with
 * this engine. */
#ifndef WK_CUDA_ENGINE_H
#define WK_CUDA_ENGINE_H

struct wk_rank_engine;

extern const struct wk_rank_engine wk_cuda_engine;

#endif
