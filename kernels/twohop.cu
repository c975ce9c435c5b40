/* twohop.cu - the hop-1 layout of the two-hop (node-limited) expert
 * dispatch on the GPU: which tokens go to which node, once each. Contract
 * (arguments, orders) is dx_kref_twohop_* in kernels/twohop_ref.h: rank r
 * is GPU r % per_node of node r / per_node, expert e lives on node
 * owner[e] / per_node; the send buffer holds node m's rows in
 * [node_offset[m], node_offset[m + 1]), tokens ascending. The data moves
 * with dx_dispatch_pack (kernels/dispatch.cu) over send_token; hop 2 at
 * the relay is dx_dispatch_count / offsets / rows on the received, masked
 * ids with owner[e] % per_node.
 *
 * ids must lie in [0, E) (routing's output); the kernels do not check.
 *
 * dx_twohop_count(ids [n][k], n, k, owner [E], per_node, N,
 *   node_tokens [N]) grid N blocks (block m counts node m), blockDim a
 *   multiple of 32 (<= 1024).
 * dx_twohop_offsets(node_tokens, N, node_offset [N + 1]) one block, any
 *   blockDim (thread 0 adds, N is small).
 * dx_twohop_rows(ids, gates [n][k] or NULL, n, k, owner, per_node, N,
 *   node_offset, send_token [rows1], token_node_slot [n][N], send_ids
 *   [rows1][k] or NULL, send_gates [rows1][k] or NULL) grid N blocks,
 *   blockDim a multiple of 32 (<= 1024). Deterministic: a token's row is
 *   node_offset[m] + the tokens before it that go to m (ballot prefix). */
#include <stdint.h>

#include "ptx.cuh"

/* Does token t have an expert on node m? */
static __device__ __forceinline__ bool goes_to(const int *ids, const int *owner, int t, int k,
                                               int per_node, int m)
{
    for (int j = 0; j < k; j++)
        if (__ldg(owner + ld_nc_na_s32(ids + (size_t)t * k + j)) / per_node == m)
            return true;
    return false;
}

extern "C" __global__ void dx_twohop_count(const int *__restrict__ ids, int n, int k,
                                           const int *__restrict__ owner, int per_node, int N,
                                           int *__restrict__ node_tokens)
{
    __shared__ int wsum[32];
    const int m = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int mine = 0;

    if (m >= N)
        return;
    for (int t = threadIdx.x; t < n; t += blockDim.x)
        mine += goes_to(ids, owner, t, k, per_node, m);
    block_sum_s32_store(mine, lane, warp, wsum, node_tokens, m);
}

extern "C" __global__ void dx_twohop_offsets(const int *__restrict__ node_tokens, int N,
                                             int *__restrict__ node_offset)
{
    if (blockIdx.x != 0 || threadIdx.x != 0)
        return;
    int sum = 0;
    node_offset[0] = 0;
    for (int m = 0; m < N; m++) {
        sum += node_tokens[m];
        node_offset[m + 1] = sum;
    }
}

extern "C" __global__ void
dx_twohop_rows(const int *__restrict__ ids, const float *__restrict__ gates, int n, int k,
               const int *__restrict__ owner, int per_node, int N,
               const int *__restrict__ node_offset, int *__restrict__ send_token,
               int *__restrict__ token_node_slot, int *__restrict__ send_ids,
               float *__restrict__ send_gates)
{
    __shared__ int wsum[32];
    __shared__ int base;
    const int m = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;

    if (m >= N)
        return;
    if (threadIdx.x == 0)
        base = node_offset[m];
    __syncthreads();
    /* chunks of blockDim tokens; a ballot prefix keeps tokens ascending */
    for (int t0 = 0; t0 < n; t0 += blockDim.x) {
        const int t = t0 + threadIdx.x;
        const bool go = t < n && goes_to(ids, owner, t, k, per_node, m);
        const struct ballot_rank r = block_ballot_rank(go, lane, warp, warps, wsum);
        if (t < n) {
            const int slot = go ? base + r.wbefore + r.before : -1;
            token_node_slot[(size_t)t * N + m] = slot;
            if (go) {
                send_token[slot] = t;
                for (int j = 0; j < k && (send_ids || send_gates); j++) {
                    const size_t c = (size_t)t * k + j, o = (size_t)slot * k + j;
                    const int e = ld_nc_na_s32(ids + c);
                    const bool here = __ldg(owner + e) / per_node == m;
                    if (send_ids)
                        send_ids[o] = here ? e : -1;
                    if (send_gates)
                        send_gates[o] = here ? __ldg(gates + c) : 0.0f;
                }
            }
        }
        __syncthreads(); /* everyone has read wsum and base */
        if (threadIdx.x == 0)
            base += r.total;
        __syncthreads();
    }
}
