/* sim.h - the sim backend's engine: each compute op sleeps its modelled
 * cost (the Assignment's cost_*_ms, through the runtime's abort-aware
 * sleep), each send is an empty message to the peer pipeline rank and each
 * receive waits for one; no model, no state, no checkpoints. It measures
 * a schedule and the control plane without training anything. */
#ifndef WK_SIM_H
#define WK_SIM_H

#include "worker/backend.h"

extern const struct wk_backend_ops wk_sim_ops;

#endif
