/* render.h - a schedule as text for people and programs.
 *
 *   text     a timeline, one row per rank, from a simulation, with the
 *            summary (makespan, bubble, peak activations, parameter copies)
 *   compact  "rank R: " then the compute ops: F<mb><d|u>, B.., I.., W..,
 *            and an overlapped pair as (F<mb><d|u>;B<mb><d|u>); d/u is the
 *            chunk (DualPipe: the direction; DualPipeV: the leg of the V)
 *   json     everything: parameters, costs, every op with all fields and
 *            times, per-rank results and the summary
 *   svg      a picture like the DualPipe README's: a row per rank, a box per
 *            op coloured by kind, micro-batch numbers in the boxes,
 *            overlapped pairs drawn as such
 */
#ifndef DP_RENDER_H
#define DP_RENDER_H

#include <stddef.h>

#include "pipeline/schedule.h"
#include "pipeline/simulate.h"
#include "pipeline/validate.h"

enum dp_render_format {
    DP_RENDER_TEXT,
    DP_RENDER_COMPACT,
    DP_RENDER_JSON,
    DP_RENDER_SVG,
};

/* "text", "compact", "json", "svg"; parse returns 0 or -EINVAL. */
int dp_render_format_parse(const char *name, enum dp_render_format *out);

/* Renders s in the format into a malloc'd, NUL-terminated text (*len
 * without the NUL). v and r are the schedule's validation and simulation at
 * costs c (compact needs none of them and they may be NULL). Returns 0 or
 * -ENOMEM. */
int dp_render(enum dp_render_format format, const dp_sched_t *s, const struct dp_validation *v,
              const struct dp_costs *c, const struct dp_sim_result *r, char **text, size_t *len);

#endif
