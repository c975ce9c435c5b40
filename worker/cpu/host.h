/* host.h - the rank trainer's host engine: each chunk computes on its
 * host model (worker/model/), the MoE layers' expert exchange and the
 * step-end sums go over the data plane (worker/rank/trainer.h). The cpu
 * backend is the rank trainer with this engine. */
#ifndef WK_CPU_HOST_H
#define WK_CPU_HOST_H

struct wk_rank_engine;

extern const struct wk_rank_engine wk_cpu_engine;

#endif
