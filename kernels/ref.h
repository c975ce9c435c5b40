/* ref.h - plain C references of the CUDA kernels in kernels/ (*.cu): the same
 * arguments, layouts, orders and rounding, so that a GPU run can be compared
 * with them (bitwise where the contract says so). Owns nothing else.
 *
 * Routing (kernels/routing.cu, dx_route_topk), the rule of worker/model/moe.h:
 * scores s [n][E] are the router's sigmoid outputs (the sigmoid belongs to the
 * router GEMM's epilogue); the selection uses s + bias; experts form G
 * contiguous groups of E / G; a group scores the sum of its two best (s + b)
 * (its only one when a group has one expert), added as 0 + best + second;
 * the best group_limit groups stay; the top_k experts by (s + b) among them
 * are chosen; ties go to the lower group / expert index. ids [n][top_k] are
 * the chosen experts in ascending order; gates [n][top_k] follow ids and are
 * route_scale * s_k / sum, where sum adds the chosen s in ascending expert
 * order from 0; counts[e] += tokens that chose e (accumulates, the caller
 * zeroes it). All arithmetic is fp32, round to nearest, no fused multiply-add.
 * s and bias must be finite (NaN ordering is not part of the contract).
 *
 * Dispatch (kernels/dispatch.cu). A send row is one (token, chosen expert)
 * pair. owner[e] in [0, R) is the EP rank that runs expert e. The send buffer
 * [rows = n * top_k][d] holds rank r's rows in [rank_offset[r],
 * rank_offset[r + 1]); inside a rank its experts ascend, and inside an expert
 * its tokens ascend. With owner[e] = e / (E / R) (contiguous blocks) this is
 * exactly the order of struct wk_moe_plan.
 *   count:   tokens_per_expert[e] = tokens whose ids contain e. A negative
 *            id is masked: it matches no expert, here and in rows (the
 *            two-hop relay's received rows, kernels/twohop_ref.h).
 *   offsets: expert_offset[E + 1] exclusive prefix sum of tokens_per_expert
 *            (the plan's offsets); rank_rows[R] = rows going to rank r;
 *            rank_offset[R + 1] its exclusive prefix sum; expert_slot[e] =
 *            first send row of expert e = rank_offset[owner[e]] + rows of
 *            experts e' < e with the same owner.
 *   rows:    send_token[row] = the row's token, send_gate[row] = its gate
 *            (send_gate may be NULL), token_slot[t][k] = send row of ids[t][k].
 *   pack:    send[row][:] = x[send_token[row]][:].
 *   combine: out[t][i] = base[t][i] (0 when base is NULL) + sum over k
 *            ascending with token_slot[t][k] >= 0 (a negative slot, the
 *            two-hop relay's masked id, adds nothing) of gates[t][k] *
 *            y[token_slot[t][k]][i], fp32, each
 *            product rounded then added (no FMA), in that order: with base =
 *            the one shared expert's output this is wk_moe_combine's sum.
 *            out must not alias y or base (the kernel reads them through the
 *            non-coherent path).
 *
 * FP8 (kernels/fp8.cu): OCP E4M3 ("e4m3fn": bias 7, no infinities, 0x7f and
 * 0xff are NaN, largest finite 448 = 0x7e, smallest normal 2^-6 = 0x08,
 * smallest subnormal 2^-9 = 0x01). The encoder is PTX's
 * cvt.rn.satfinite.e4m3x2.f32: round to nearest even (subnormals included),
 * magnitudes above 448 (infinities too) saturate to +-448, -0 keeps its sign
 * (0x80), and any NaN becomes 0x7f. Tiles are 1 x 128 along a row (the last
 * tile of a row may be short); scale = amax / 448 with amax the largest |x|
 * of the tile, or 1 when amax is 0; q = e4m3(x / scale); dequantized
 * x' = decode(q) * scale. Inputs must be finite. */
#ifndef DX_KREF_H
#define DX_KREF_H

#include <stddef.h>
#include <stdint.h>

#define DX_KREF_GROUP_TOP 2     /* a group's score sums its best two (s + b) */
#define DX_KREF_FP8_TILE 128    /* elements per quantisation tile */
#define DX_KREF_E4M3_MAX 448.0f /* largest finite e4m3 */
#define DX_KREF_E4M3_NAN 0x7f   /* the NaN the encoder writes */

struct dx_kref_route_cfg {
    int experts;     /* E */
    int groups;      /* G, E % G == 0 */
    int group_limit; /* groups kept per token, 1..G */
    int top_k;       /* 1..group_limit * (E / G) */
    float route_scale;
};

/* 0 or -EINVAL. */
int dx_kref_route_check(const struct dx_kref_route_cfg *cfg);

/* dx_route_topk. scores, bias: [n][E], [E]; ids, gates: [n][top_k];
 * counts: [E], accumulated. 0 or -EINVAL. */
int dx_kref_route(const struct dx_kref_route_cfg *cfg, const float *scores, const float *bias,
                  int n, int *ids, float *gates, int *counts);

/* dx_dispatch_count: tokens_per_expert [E] from ids [n][k] (overwritten). */
int dx_kref_dispatch_count(const int *ids, int n, int k, int experts, int *tokens_per_expert);

/* dx_dispatch_offsets; 0 or -EINVAL (an owner outside [0, ranks)). */
int dx_kref_dispatch_offsets(const int *tokens_per_expert, const int *owner, int experts, int ranks,
                             int *expert_offset, int *rank_rows, int *rank_offset,
                             int *expert_slot);

/* dx_dispatch_rows: send_token [n * k], send_gate [n * k] (or NULL),
 * token_slot [n][k] from ids, gates [n][k] and expert_slot [E]. */
int dx_kref_dispatch_rows(const int *ids, const float *gates, int n, int k, int experts,
                          const int *expert_slot, int *send_token, float *send_gate,
                          int *token_slot);

/* dx_dispatch_pack: send [rows][d] = x [send_token[row]][d]. */
void dx_kref_dispatch_pack(const float *x, int d, const int *send_token, int rows, float *send);

/* dx_combine: out [n][d] from y [rows][d], gates [n][k], token_slot [n][k]
 * and base [n][d] (or NULL). */
void dx_kref_combine(const float *y, int d, const float *gates, const int *token_slot, int n, int k,
                     const float *base, float *out);

/* One value to e4m3 and back (see above). */
uint8_t dx_kref_e4m3_encode(float x);
float dx_kref_e4m3_decode(uint8_t q);

/* dx_fp8_quant_1x128: x [rows][cols] -> q [rows][cols] codes and
 * scales [rows][tiles], tiles = (cols + 127) / 128. */
void dx_kref_fp8_quant(const float *x, int rows, int cols, uint8_t *q, float *scales);
/* dx_fp8_dequant_1x128: the inverse, x [rows][cols] = decode(q) * scale. */
void dx_kref_fp8_dequant(const uint8_t *q, const float *scales, int rows, int cols, float *x);

static inline int dx_kref_fp8_tiles(int cols)
{
    return (cols + DX_KREF_FP8_TILE - 1) / DX_KREF_FP8_TILE;
}

/* The dispatch payload's wire format: a record per row holding its cols
 * codes, then from byte dx_kref_fp8_rec_scales(cols) its tiles fp32
 * scales; records are dx_kref_fp8_rec_pitch(cols) bytes apart, a multiple
 * of 16 (the IPC transport's pieces are 16-byte aligned). */
static inline size_t dx_kref_fp8_rec_scales(int cols)
{
    return ((size_t)cols + 3) & ~(size_t)3;
}

static inline size_t dx_kref_fp8_rec_pitch(int cols)
{
    return (dx_kref_fp8_rec_scales(cols) + 4 * (size_t)dx_kref_fp8_tiles(cols) + 15) & ~(size_t)15;
}

/* dx_fp8_quant_rec / dx_fp8_dequant_rec: the same rounding as
 * dx_kref_fp8_quant / _dequant, on records pitch bytes apart (pitch a
 * multiple of 4, at least dx_kref_fp8_rec_pitch(cols)). */
void dx_kref_fp8_quant_rec(const float *x, int rows, int cols, uint8_t *rec, int pitch);
void dx_kref_fp8_dequant_rec(const uint8_t *rec, int pitch, int rows, int cols, float *x);

#endif
