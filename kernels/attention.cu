/* attention.cu - causal multi-head self-attention between the projections,
 * fp32, forward and backward: the contract of wk_attn_core_forward /
 * wk_attn_core_backward (worker/model/attention.h), which are the CPU
 * references. Layouts: q, k, v, ctx, dctx, dq, dk, dv are [batch*seq][d],
 * sequence b in rows b*seq .. b*seq+seq-1, head h in columns h*dh ..
 * h*dh+dh-1 (dh = d / heads, at most DX_ATTN_MAX_DH); p is
 * [batch*heads*seq][seq], row (b*heads + h)*seq + i holding query i's
 * probabilities over keys 0..i and 0 for keys i+1..seq-1 (written too).
 *
 * Deterministic: no atomics, every sum in a fixed order. Dot products over
 * dh and sums over keys / queries are fmaf chains in index order (the
 * reference's sgemm sums in its own blocked order); the softmax sum and
 * rowsum(p * dP) are taken in double like the reference (per lane in index
 * order, then a warp butterfly), everything else is rounded as the
 * reference writes it (explicit __f*_rn: no contraction). expf is CUDA's
 * (<= 2 ulp) against glibc's. The kernels never write a row or column they
 * do not own, so every launch is idempotent.
 *
 * All three: blockDim.x = DX_ATTN_THREADS (256: 8 warps) exactly, a 1-D
 * grid of batch * heads * tiles blocks exactly, tiles = ceil(seq / 32); a
 * block owns 32 consecutive rows (queries, or keys for dkdv) of one
 * sequence and head, warp w rows w, w+8, w+16, w+24 of them; lane l handles
 * keys (or queries) l, l+32, ... of each row and output columns l, l+32,
 * l+64, l+96 of the head. Shared memory is dynamic, in floats, with
 * stride = dh | 1 (odd: the lanes reading 32 rows at one column hit 32
 * different banks):
 *   dx_attn_fwd        2 * 32 * stride
 *   dx_attn_bwd_dq     3 * 32 * stride
 *   dx_attn_bwd_dkdv   3 * 32 * stride + 32 * 33 + 32
 * times 4 bytes (dh 64: 16.3, 24.4, 28.6 KiB; dh 128: 32.3, 48.4, 52.6 KiB,
 * so wk_cuda_function_shared first for the last two). A launch with another
 * blockDim or dh > DX_ATTN_MAX_DH writes nothing.
 *
 * dx_attn_fwd(q, k, v, batch, seq, d, heads, p, ctx)
 *   p, ctx as wk_attn_core_forward: s_ij = (q_i . k_j) * scale, scale =
 *   1 / sqrtf(dh); m_i = max_j<=i s_ij; e_ij = expf(s_ij - m_i); p_ij =
 *   e_ij * (float)(1 / sum_j e_ij); ctx_i = sum_j<=i p_ij v_j. Three passes
 *   over the block's key tiles: s into p (k tiles in shared memory), e and
 *   p in place (each element read and written by the lane that wrote it),
 *   then ctx (v tiles in shared memory, p_ij broadcast by shuffle).
 * dx_attn_bwd_dq(k, v, p, dctx, batch, seq, d, heads, dq, rowdot)
 *   dP_ij = dctx_i . v_j, rowdot_i = (float)sum_j<=i p_ij dP_ij (kept in
 *   rowdot [batch*heads*seq] for dkdv), dS_ij = (scale * p_ij) * (dP_ij -
 *   rowdot_i), dq_i = sum_j<=i dS_ij k_j. Two passes over key tiles (dP is
 *   recomputed in the second rather than stored).
 * dx_attn_bwd_dkdv(q, v, p, dctx, rowdot, batch, seq, d, heads, dk, dv)
 *   after dx_attn_bwd_dq (rowdot): for key j, dv_j = sum_i>=j p_ij dctx_i,
 *   dk_j = sum_i>=j dS_ij q_i (dS recomputed as in dq), i ascending. One
 *   pass over the query tiles from the block's own; the p tile goes through
 *   shared memory so its rows are read coalesced. */
#include "ptx.cuh"

#define DX_ATTN_TILE 32
#define DX_ATTN_WARPS 8
#define DX_ATTN_THREADS (DX_ATTN_WARPS * 32)
#define DX_ATTN_ROWS (DX_ATTN_TILE / DX_ATTN_WARPS) /* rows per warp: 4 */
#define DX_ATTN_MAX_DH 128
#define DX_ATTN_COLS (DX_ATTN_MAX_DH / 32) /* output columns per lane: 4 */

/* Loads rows row0 .. row0+31 (those < seq; the others become 0) of one
 * head's columns of x [*][d] into tile [32][stride], all threads. */
static __device__ __forceinline__ void attn_load_tile(float *tile, const float *__restrict__ x,
                                                      int row0, int seq, int d, int dh, int stride)
{
    for (int e = threadIdx.x; e < DX_ATTN_TILE * dh; e += blockDim.x) {
        const int r = e / dh, c = e - r * dh;
        tile[r * stride + c] = row0 + r < seq ? x[(size_t)(row0 + r) * d + c] : 0.0f;
    }
}

/* The block's sequence b, head h and tile index from a 1-D grid of
 * batch * heads * tiles blocks; the largest tiles (most work) first. */
static __device__ __forceinline__ void attn_block(int heads, int tiles, int *b, int *h, int *t,
                                                  int reverse)
{
    const int bh = blockIdx.x / tiles, r = blockIdx.x - bh * tiles;

    *b = bh / heads;
    *h = bh - *b * heads;
    *t = reverse ? tiles - 1 - r : r;
}

static __device__ __forceinline__ int attn_bad_launch(int batch, int seq, int d, int heads)
{
    if (blockDim.x != DX_ATTN_THREADS || heads <= 0 || d % heads != 0 ||
        d / heads > DX_ATTN_MAX_DH || batch <= 0 || seq <= 0)
        return 1;
    return blockIdx.x >= (unsigned)(batch * heads * ((seq + DX_ATTN_TILE - 1) / DX_ATTN_TILE));
}

extern "C" __global__ void dx_attn_fwd(const float *__restrict__ q, const float *__restrict__ k,
                                       const float *__restrict__ v, int batch, int seq, int d,
                                       int heads, float *__restrict__ p, float *__restrict__ ctx)
{
    extern __shared__ float attn_sm[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tiles = (seq + DX_ATTN_TILE - 1) / DX_ATTN_TILE;
    int b, h, qt;

    if (attn_bad_launch(batch, seq, d, heads))
        return;
    attn_block(heads, tiles, &b, &h, &qt, 1);

    const int dh = d / heads, stride = dh | 1, i0 = qt * DX_ATTN_TILE;
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)dh)); /* as the CPU */
    const size_t col0 = (size_t)b * seq * d + (size_t)h * dh;   /* row 0, this head */
    float *qs = attn_sm, *kv = attn_sm + DX_ATTN_TILE * stride;
    float *prow[DX_ATTN_ROWS];
    int row[DX_ATTN_ROWS];
    float m[DX_ATTN_ROWS];

#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        row[t] = i0 + warp + DX_ATTN_WARPS * t; /* may be >= seq: skipped */
        prow[t] = p + (((size_t)b * heads + h) * seq + (row[t] < seq ? row[t] : 0)) * seq;
        m[t] = -INFINITY;
    }
    attn_load_tile(qs, q + col0, i0, seq, d, dh, stride);

    /* pass 1: s_ij into p, m_i */
    for (int kt = 0; kt <= qt; kt++) {
        const int j = kt * DX_ATTN_TILE + lane;
        float acc[DX_ATTN_ROWS];

        __syncthreads(); /* qs loaded; kv free */
        attn_load_tile(kv, k + col0, kt * DX_ATTN_TILE, seq, d, dh, stride);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            acc[t] = 0.0f;
        for (int c = 0; c < dh; c++) {
            const float kc = kv[lane * stride + c];
#pragma unroll
            for (int t = 0; t < DX_ATTN_ROWS; t++)
                acc[t] = fmaf(qs[(warp + DX_ATTN_WARPS * t) * stride + c], kc, acc[t]);
        }
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++) {
            if (row[t] < seq && j <= row[t]) {
                const float s = __fmul_rn(acc[t], scale);
                prow[t][j] = s;
                m[t] = fmaxf(m[t], s);
            }
        }
    }

    /* pass 2: e = expf(s - m), the sum in double, p = e * (1 / sum); zeros
     * after the diagonal. Lane l only touches elements it wrote. */
#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        const int i = row[t];
        double sum = 0.0;

        if (i >= seq) /* warp-uniform */
            continue;
        const float mi = warp_max_f32(m[t]);
        for (int j = lane; j <= i; j += 32) {
            const float e = expf(__fsub_rn(prow[t][j], mi));
            prow[t][j] = e;
            sum += (double)e;
        }
        const float inv = (float)(1.0 / warp_sum_f64(sum));
        for (int j = lane; j <= i; j += 32)
            prow[t][j] = __fmul_rn(prow[t][j], inv);
        for (int j = i + 1 + lane; j < seq; j += 32)
            prow[t][j] = 0.0f;
    }

    /* pass 3: ctx_i = sum_j p_ij v_j, j ascending */
    float acc[DX_ATTN_ROWS][DX_ATTN_COLS];
#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++)
#pragma unroll
        for (int cc = 0; cc < DX_ATTN_COLS; cc++)
            acc[t][cc] = 0.0f;
    for (int kt = 0; kt <= qt; kt++) {
        const int j0 = kt * DX_ATTN_TILE, j = j0 + lane;
        float pl[DX_ATTN_ROWS];

        __syncthreads(); /* kv free */
        attn_load_tile(kv, v + col0, j0, seq, d, dh, stride);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            pl[t] = row[t] < seq && j <= row[t] ? prow[t][j] : 0.0f;
        const int jn = min(DX_ATTN_TILE, seq - j0);
        for (int jj = 0; jj < jn; jj++) {
#pragma unroll
            for (int t = 0; t < DX_ATTN_ROWS; t++) {
                const float pj = __shfl_sync(0xffffffffu, pl[t], jj);
                if (j0 + jj > row[t]) /* masked (or a row past seq): warp-uniform */
                    continue;
#pragma unroll
                for (int cc = 0; cc < DX_ATTN_COLS; cc++) {
                    const int c = lane + 32 * cc;
                    if (c < dh)
                        acc[t][cc] = fmaf(pj, kv[jj * stride + c], acc[t][cc]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        if (row[t] >= seq)
            continue;
#pragma unroll
        for (int cc = 0; cc < DX_ATTN_COLS; cc++) {
            const int c = lane + 32 * cc;
            if (c < dh)
                ctx[col0 + (size_t)row[t] * d + c] = acc[t][cc];
        }
    }
}

extern "C" __global__ void dx_attn_bwd_dq(const float *__restrict__ k, const float *__restrict__ v,
                                          const float *__restrict__ p,
                                          const float *__restrict__ dctx, int batch, int seq, int d,
                                          int heads, float *__restrict__ dq,
                                          float *__restrict__ rowdot)
{
    extern __shared__ float attn_sm[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tiles = (seq + DX_ATTN_TILE - 1) / DX_ATTN_TILE;
    int b, h, qt;

    if (attn_bad_launch(batch, seq, d, heads))
        return;
    attn_block(heads, tiles, &b, &h, &qt, 1);

    const int dh = d / heads, stride = dh | 1, i0 = qt * DX_ATTN_TILE;
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)dh)); /* as the CPU */
    const size_t col0 = (size_t)b * seq * d + (size_t)h * dh;
    const size_t bhrow = ((size_t)b * heads + h) * seq;
    float *dcs = attn_sm, *vs = dcs + DX_ATTN_TILE * stride, *ks = vs + DX_ATTN_TILE * stride;
    const float *prow[DX_ATTN_ROWS];
    int row[DX_ATTN_ROWS];
    double dot[DX_ATTN_ROWS];
    float rd[DX_ATTN_ROWS];

#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        row[t] = i0 + warp + DX_ATTN_WARPS * t;
        prow[t] = p + (bhrow + (row[t] < seq ? row[t] : 0)) * seq;
        dot[t] = 0.0;
    }
    attn_load_tile(dcs, dctx + col0, i0, seq, d, dh, stride);

    /* pass 1: rowdot_i = sum_j p_ij dP_ij, in double */
    for (int kt = 0; kt <= qt; kt++) {
        const int j = kt * DX_ATTN_TILE + lane;
        float acc[DX_ATTN_ROWS];

        __syncthreads();
        attn_load_tile(vs, v + col0, kt * DX_ATTN_TILE, seq, d, dh, stride);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            acc[t] = 0.0f;
        for (int c = 0; c < dh; c++) {
            const float vc = vs[lane * stride + c];
#pragma unroll
            for (int t = 0; t < DX_ATTN_ROWS; t++)
                acc[t] = fmaf(dcs[(warp + DX_ATTN_WARPS * t) * stride + c], vc, acc[t]);
        }
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            if (row[t] < seq && j <= row[t])
                dot[t] += (double)prow[t][j] * (double)acc[t];
    }
#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        rd[t] = (float)warp_sum_f64(dot[t]);
        if (lane == 0 && row[t] < seq)
            rowdot[bhrow + row[t]] = rd[t];
    }

    /* pass 2: dS_ij (dP recomputed), dq_i = sum_j dS_ij k_j, j ascending */
    float acc[DX_ATTN_ROWS][DX_ATTN_COLS];
#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++)
#pragma unroll
        for (int cc = 0; cc < DX_ATTN_COLS; cc++)
            acc[t][cc] = 0.0f;
    for (int kt = 0; kt <= qt; kt++) {
        const int j0 = kt * DX_ATTN_TILE, j = j0 + lane;
        float dp[DX_ATTN_ROWS], dsl[DX_ATTN_ROWS];

        __syncthreads();
        attn_load_tile(vs, v + col0, j0, seq, d, dh, stride);
        attn_load_tile(ks, k + col0, j0, seq, d, dh, stride);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            dp[t] = 0.0f;
        for (int c = 0; c < dh; c++) {
            const float vc = vs[lane * stride + c];
#pragma unroll
            for (int t = 0; t < DX_ATTN_ROWS; t++)
                dp[t] = fmaf(dcs[(warp + DX_ATTN_WARPS * t) * stride + c], vc, dp[t]);
        }
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            dsl[t] = row[t] < seq && j <= row[t]
                         ? __fmul_rn(__fmul_rn(scale, prow[t][j]), __fsub_rn(dp[t], rd[t]))
                         : 0.0f;
        const int jn = min(DX_ATTN_TILE, seq - j0);
        for (int jj = 0; jj < jn; jj++) {
#pragma unroll
            for (int t = 0; t < DX_ATTN_ROWS; t++) {
                const float dsj = __shfl_sync(0xffffffffu, dsl[t], jj);
                if (j0 + jj > row[t])
                    continue;
#pragma unroll
                for (int cc = 0; cc < DX_ATTN_COLS; cc++) {
                    const int c = lane + 32 * cc;
                    if (c < dh)
                        acc[t][cc] = fmaf(dsj, ks[jj * stride + c], acc[t][cc]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        if (row[t] >= seq)
            continue;
#pragma unroll
        for (int cc = 0; cc < DX_ATTN_COLS; cc++) {
            const int c = lane + 32 * cc;
            if (c < dh)
                dq[col0 + (size_t)row[t] * d + c] = acc[t][cc];
        }
    }
}

extern "C" __global__ void
dx_attn_bwd_dkdv(const float *__restrict__ q, const float *__restrict__ v,
                 const float *__restrict__ p, const float *__restrict__ dctx,
                 const float *__restrict__ rowdot, int batch, int seq, int d, int heads,
                 float *__restrict__ dk, float *__restrict__ dv)
{
    extern __shared__ float attn_sm[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tiles = (seq + DX_ATTN_TILE - 1) / DX_ATTN_TILE;
    int b, h, kt;

    if (attn_bad_launch(batch, seq, d, heads))
        return;
    /* key tile kt sees query tiles kt .. tiles-1: the first tiles are the
     * largest */
    attn_block(heads, tiles, &b, &h, &kt, 0);

    const int dh = d / heads, stride = dh | 1, j0 = kt * DX_ATTN_TILE;
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)dh)); /* as the CPU */
    const size_t col0 = (size_t)b * seq * d + (size_t)h * dh;
    const size_t bhrow = ((size_t)b * heads + h) * seq;
    float *vs = attn_sm, *dcs = vs + DX_ATTN_TILE * stride, *qs = dcs + DX_ATTN_TILE * stride;
    float *ps = qs + DX_ATTN_TILE * stride; /* [32 queries][33]: p_ij, j of this block */
    float *rds = ps + DX_ATTN_TILE * (DX_ATTN_TILE + 1);
    int key[DX_ATTN_ROWS], r[DX_ATTN_ROWS];
    float accv[DX_ATTN_ROWS][DX_ATTN_COLS], acck[DX_ATTN_ROWS][DX_ATTN_COLS];

#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        r[t] = warp + DX_ATTN_WARPS * t;
        key[t] = j0 + r[t]; /* may be >= seq: skipped */
#pragma unroll
        for (int cc = 0; cc < DX_ATTN_COLS; cc++)
            accv[t][cc] = acck[t][cc] = 0.0f;
    }
    attn_load_tile(vs, v + col0, j0, seq, d, dh, stride);

    for (int qt = kt; qt < tiles; qt++) {
        const int i0 = qt * DX_ATTN_TILE, i = i0 + lane;
        float dp[DX_ATTN_ROWS], dsl[DX_ATTN_ROWS];

        __syncthreads();
        attn_load_tile(dcs, dctx + col0, i0, seq, d, dh, stride);
        attn_load_tile(qs, q + col0, i0, seq, d, dh, stride);
        for (int e = threadIdx.x; e < DX_ATTN_TILE * DX_ATTN_TILE; e += blockDim.x) {
            const int ii = e / DX_ATTN_TILE, jj = e - ii * DX_ATTN_TILE;
            const int qi = i0 + ii, kj = j0 + jj;
            ps[ii * (DX_ATTN_TILE + 1) + jj] =
                qi < seq && kj <= qi ? p[(bhrow + qi) * seq + kj] : 0.0f;
        }
        if (threadIdx.x < DX_ATTN_TILE)
            rds[threadIdx.x] =
                i0 + (int)threadIdx.x < seq ? rowdot[bhrow + i0 + threadIdx.x] : 0.0f;
        __syncthreads();

        /* lane: query i; dP_ij for the warp's keys */
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            dp[t] = 0.0f;
        for (int c = 0; c < dh; c++) {
            const float dc = dcs[lane * stride + c];
#pragma unroll
            for (int t = 0; t < DX_ATTN_ROWS; t++)
                dp[t] = fmaf(dc, vs[r[t] * stride + c], dp[t]);
        }
#pragma unroll
        for (int t = 0; t < DX_ATTN_ROWS; t++)
            dsl[t] = i < seq && key[t] <= i
                         ? __fmul_rn(__fmul_rn(scale, ps[lane * (DX_ATTN_TILE + 1) + r[t]]),
                                     __fsub_rn(dp[t], rds[lane]))
                         : 0.0f;

        /* queries ascending: dv_j += p_ij dctx_i, dk_j += dS_ij q_i */
        const int in = min(DX_ATTN_TILE, seq - i0);
        for (int ii = 0; ii < in; ii++) {
#pragma unroll
            for (int t = 0; t < DX_ATTN_ROWS; t++) {
                const float dsi = __shfl_sync(0xffffffffu, dsl[t], ii);
                const float pi = ps[ii * (DX_ATTN_TILE + 1) + r[t]];
                if (i0 + ii < key[t] || key[t] >= seq) /* masked: warp-uniform */
                    continue;
#pragma unroll
                for (int cc = 0; cc < DX_ATTN_COLS; cc++) {
                    const int c = lane + 32 * cc;
                    if (c < dh) {
                        accv[t][cc] = fmaf(pi, dcs[ii * stride + c], accv[t][cc]);
                        acck[t][cc] = fmaf(dsi, qs[ii * stride + c], acck[t][cc]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < DX_ATTN_ROWS; t++) {
        if (key[t] >= seq)
            continue;
#pragma unroll
        for (int cc = 0; cc < DX_ATTN_COLS; cc++) {
            const int c = lane + 32 * cc;
            if (c < dh) {
                dv[col0 + (size_t)key[t] * d + c] = accv[t][cc];
                dk[col0 + (size_t)key[t] * d + c] = acck[t][cc];
            }
        }
    }
}
