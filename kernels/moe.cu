/* moe.cu - the MoE router's kernels besides routing and dispatch: the
 * router's sigmoid and the gate backward (the gate-scaled pack of the
 * output gradient, each choice's gate gradient, the router's pre-sigmoid
 * gradient). The references are the worker's own functions
 * (worker/model/moe.h: wk_moe_sigmoid, wk_moe_gate_scale,
 * wk_moe_gate_backward, which wk_moe_route and wk_moe_backward_prepare
 * call). Layouts are the dispatch kernels' (kernels/ref.h): ids [n][k] the
 * chosen experts ascending (dx_route_topk), token_slot [n][k] the send row
 * of (token, k), send_token / send_gate [rows] the token and gate of a row.
 * Every float operation is a correctly rounded __f*_rn (no FMA) in the
 * reference's order.
 *
 * dx_moe_sigmoid(logits, count, scores)
 *   scores[i] = 1 / (1 + expf(-logits[i])), i < count (long long); in place
 *   allowed. Any grid; threads stride over elements. Not bitwise: CUDA's
 *   expf is within 2 ulp, glibc's within 1; the add and the division are
 *   correctly rounded, so scores are within 5 * 2^-23 relative of the
 *   worker's (the rounding of 1 + e and of 1 / x adds at most one ulp each
 *   to the exps' difference).
 * dx_moe_gate_scale(dout [n][d], d, send_token, send_gate, rows, dy [rows][d])
 *   dy[r][i] = send_gate[r] * dout[send_token[r]][i]: bitwise. Any grid;
 *   warps stride over rows. 16-byte vectors when d % 4 == 0 and both bases
 *   are 16-byte aligned, else 4-byte elements.
 * dx_moe_gate_dot(dout [n][d], d, y [rows][d], token_slot, n, k, dgate [n][k])
 *   dgate[t][j] = sum over i ascending of dout[t][i] * y[token_slot[t][j]][i]
 *   from 0.0f, each product rounded then added: bitwise; 0 where
 *   token_slot[t][j] < 0 (the two-hop relay's masked ids). One thread per
 *   (token, choice) sums its row in i order, as moe.c does (a parallel tree
 *   would round differently); any grid, threads stride over the n * k
 *   pairs. Rows are read through the non-coherent path and L1 (each thread
 *   walks its own row; the lines it touches stay in L1 for its next loads).
 * dx_moe_router_grad(scores [n][E], E, ids, dgate, n, k, route_scale,
 *   dlogit [n][E])
 *   S = sum over j of s_j (s_j = scores[t][ids[t][j]]), dot = sum over j of
 *   dgate[t][j] * s_j, both in j order from 0.0f; dlogit[t][ids[t][j]] =
 *   ((route_scale * (dgate_j / S - dot / (S * S))) * s_j) * (1 - s_j) and
 *   0 for the experts not chosen (the whole row is written): bitwise. Any
 *   grid; warps stride over tokens, every lane computes S and dot itself.
 *
 * Does dx_combine (dispatch.cu) give wk_moe_combine and wk_moe_combine_dx
 * bitwise? Yes, with one signed-zero exception in the forward.
 *   Forward: moe.c sums acc = 0.0f, + each shared expert's output by index,
 *   + gate_k * y_k for k ascending; dx_combine sums base + gates[t][j] *
 *   y[token_slot[t][j]] for j ascending, products rounded then added. With
 *   base = the shared expert's output (more than one: their sum made in
 *   index order, e.g. dx_add(sy0, sy1) then + sy2 ...; none: base NULL) the
 *   additions are the same, except that moe.c's 0.0f + -0.0f is +0.0f: an
 *   element whose shared output is -0.0 and whose gated terms are all -0.0
 *   comes out -0.0 where moe.c has +0.0 (equal as floats).
 *   Backward: moe.c starts from the router GEMM's dx, adds each shared
 *   expert's dx in index order, then each row's dxg for k ascending. With
 *   base = GEMM dx + shared dx (dx_add, in that order) and gates all 1.0f
 *   (1.0f * v is v exactly) dx_combine makes the same sum. (The GEMM
 *   itself is cuBLASLt's, not OpenBLAS's: that input differs, not the sum.)
 *   So no further combine kernel is needed; the backward only needs an
 *   [n][k] array of 1.0f. */
#include <stdint.h>

#include "ptx.cuh"

/* acc + a * b, the product rounded first (no FMA) */
static __device__ __forceinline__ float add_product(float acc, float a, float b)
{
    return __fadd_rn(acc, __fmul_rn(a, b));
}

extern "C" __global__ void dx_moe_sigmoid(const float *logits, long long count, float *scores)
{
    const long long stride = (long long)gridDim.x * blockDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride)
        scores[i] = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-logits[i])));
}

extern "C" __global__ void dx_moe_gate_scale(const float *__restrict__ dout, int d,
                                             const int *__restrict__ send_token,
                                             const float *__restrict__ send_gate, int rows,
                                             float *__restrict__ dy)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const bool vec = (d & 3) == 0 && ((uintptr_t)dout & 15) == 0 && ((uintptr_t)dy & 15) == 0;

    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        const float *src = dout + (size_t)send_token[r] * d;
        const float gate = send_gate[r];
        float *dst = dy + (size_t)r * d;
        if (vec) {
            const float4 *s4 = (const float4 *)src;
            float4 *d4 = (float4 *)dst;
            for (int i = lane; i < d / 4; i += 32) {
                float4 v = ld_nc_l1_v4_f32(s4 + i);
                d4[i] = make_float4(__fmul_rn(gate, v.x), __fmul_rn(gate, v.y),
                                    __fmul_rn(gate, v.z), __fmul_rn(gate, v.w));
            }
        } else {
            for (int i = lane; i < d; i += 32)
                dst[i] = __fmul_rn(gate, ld_nc_l1_f32(src + i));
        }
    }
}

extern "C" __global__ void dx_moe_gate_dot(const float *__restrict__ dout, int d,
                                           const float *__restrict__ y,
                                           const int *__restrict__ token_slot, int n, int k,
                                           float *__restrict__ dgate)
{
    const long long pairs = (long long)n * k, stride = (long long)gridDim.x * blockDim.x;
    const bool vec = (d & 3) == 0 && ((uintptr_t)dout & 15) == 0 && ((uintptr_t)y & 15) == 0;

    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += stride) {
        const float *g = dout + (size_t)(p / k) * d;
        const float *yr = y + (size_t)token_slot[p] * d;
        float acc = 0.0f;
        if (token_slot[p] < 0) {
            /* a masked choice (the two-hop relay's): no row, no gradient */
        } else if (vec) {
            const float4 *g4 = (const float4 *)g, *y4 = (const float4 *)yr;
#pragma unroll 4
            for (int i = 0; i < d / 4; i++) {
                float4 a = ld_nc_l1_v4_f32(g4 + i), b = ld_nc_l1_v4_f32(y4 + i);
                acc = add_product(acc, a.x, b.x);
                acc = add_product(acc, a.y, b.y);
                acc = add_product(acc, a.z, b.z);
                acc = add_product(acc, a.w, b.w);
            }
        } else {
            for (int i = 0; i < d; i++)
                acc = add_product(acc, ld_nc_l1_f32(g + i), ld_nc_l1_f32(yr + i));
        }
        dgate[p] = acc;
    }
}

extern "C" __global__ void dx_moe_router_grad(const float *__restrict__ scores, int E,
                                              const int *__restrict__ ids,
                                              const float *__restrict__ dgate, int n, int k,
                                              float route_scale, float *__restrict__ dlogit)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;

    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < n; t += gridDim.x * warps) {
        const float *s = scores + (size_t)t * E, *dg = dgate + (size_t)t * k;
        const int *ch = ids + (size_t)t * k;
        float sum = 0.0f, dot = 0.0f;

        for (int j = 0; j < k; j++) {
            const float sj = s[ch[j]];
            sum = __fadd_rn(sum, sj);
            dot = add_product(dot, dg[j], sj);
        }
        const float dot_over = __fdiv_rn(dot, __fmul_rn(sum, sum));
        for (int e = lane; e < E; e += 32) {
            float v = 0.0f;
            for (int j = 0; j < k; j++) /* the last choice of e wins, as in moe.c */
                if (ch[j] == e) {
                    const float sj = s[e];
                    const float ds =
                        __fmul_rn(route_scale, __fsub_rn(__fdiv_rn(dg[j], sum), dot_over));
                    v = __fmul_rn(__fmul_rn(ds, sj), __fsub_rn(1.0f, sj));
                }
            dlogit[(size_t)t * E + e] = v;
        }
    }
}
