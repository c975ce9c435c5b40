/* engine.h - the cpu and cuda backends' engine: the rank trainer
 * (worker/rank/rank.h) behind the backend ops table (worker/backend.h).
 * On the cuda backend the engine's args carry the worker's GPU. */
#ifndef WK_RANK_ENGINE_H
#define WK_RANK_ENGINE_H

#include "worker/backend.h"

extern const struct wk_backend_ops wk_rank_ops;

#endif
