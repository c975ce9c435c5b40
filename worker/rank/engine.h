/* engine.h - the cpu and cuda backends' engine: the rank trainer
 * (worker/rank/rank.h) behind the backend ops table (worker/backend.h).
 * The backend's impl is the trainer's engine (host or device); on the
 * cuda backend the engine's args carry the worker's GPU as its device. */
#ifndef WK_RANK_ENGINE_H
#define WK_RANK_ENGINE_H

#include "worker/backend.h"

extern const struct wk_backend_ops wk_rank_ops;

#endif
