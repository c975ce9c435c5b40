/* ref.c - the CPU references of the CUDA kernels (see ref.h): routing,
 * dispatch layout / pack / combine, and the e4m3 codec with 1 x 128 tile
 * quantisation. Built with -ffp-contract=off so that no product is fused
 * into an add, as in the kernels. */
#include "kernels/ref.h"

#include <errno.h>
#include <math.h>
#include <string.h>

/* --- routing ------------------------------------------------------------ */

int dx_kref_route_check(const struct dx_kref_route_cfg *cfg)
{
    if (!cfg || cfg->experts <= 0 || cfg->groups <= 0 || cfg->experts % cfg->groups != 0 ||
        cfg->group_limit <= 0 || cfg->group_limit > cfg->groups || cfg->top_k <= 0 ||
        cfg->top_k > cfg->group_limit * (cfg->experts / cfg->groups) ||
        !(cfg->route_scale > 0.0f) || !isfinite(cfg->route_scale))
        return -EINVAL;
    return 0;
}

/* The largest v[i] for i in [0, n) with allowed(i); the lowest index wins a
 * tie. allowed is a byte mask (non-zero: may be taken). -1 when none. */
static int best_of(const float *v, const unsigned char *allowed, int n)
{
    int best = -1;

    for (int i = 0; i < n; i++)
        if (allowed[i] && (best < 0 || v[i] > v[best]))
            best = i;
    return best;
}

/* One token: choice [k] ascending. sb [E], gscore [G], allowed [E],
 * gallowed [G] are scratch. */
static void route_one(const struct dx_kref_route_cfg *cfg, const float *s, const float *bias,
                      int *choice, float *sb, float *gscore, unsigned char *allowed,
                      unsigned char *gallowed)
{
    int E = cfg->experts, G = cfg->groups, gs = E / G, K = cfg->top_k;

    for (int e = 0; e < E; e++)
        sb[e] = s[e] + bias[e];
    for (int g = 0; g < G; g++) {
        const float *v = sb + (size_t)g * gs;
        int top = gs < DX_KREF_GROUP_TOP ? gs : DX_KREF_GROUP_TOP;
        float sum = 0.0f;

        memset(allowed, 1, (size_t)gs);
        for (int t = 0; t < top; t++) {
            int b = best_of(v, allowed, gs);
            if (b < 0) /* cannot happen: top <= gs */
                break;
            sum += v[b];
            allowed[b] = 0;
        }
        gscore[g] = sum;
        gallowed[g] = 1;
    }
    memset(allowed, 0, (size_t)E);
    for (int l = 0; l < cfg->group_limit; l++) {
        int g = best_of(gscore, gallowed, G);
        if (g < 0) /* cannot happen: group_limit <= G */
            break;
        gallowed[g] = 0;
        memset(allowed + (size_t)g * gs, 1, (size_t)gs);
    }
    for (int k = 0; k < K; k++) {
        int b = best_of(sb, allowed, E), j = k;

        if (b < 0) /* cannot happen: top_k <= group_limit * group size */
            break;
        allowed[b] = 0;
        while (j > 0 && choice[j - 1] > b) {
            choice[j] = choice[j - 1];
            j--;
        }
        choice[j] = b;
    }
}

/* Scratch for route_one without allocating: experts and groups are bounded
 * by what a token's stack may hold. */
#define KREF_MAX_EXPERTS 4096

int dx_kref_route(const struct dx_kref_route_cfg *cfg, const float *scores, const float *bias,
                  int n, int *ids, float *gates, int *counts)
{
    /* zeroed: only to let the analyzer see they are defined */
    float sb[KREF_MAX_EXPERTS] = {0}, gscore[KREF_MAX_EXPERTS] = {0};
    unsigned char allowed[KREF_MAX_EXPERTS], gallowed[KREF_MAX_EXPERTS];

    if (dx_kref_route_check(cfg) < 0 || cfg->experts > KREF_MAX_EXPERTS || n < 0 ||
        (n > 0 && (!scores || !bias || !ids || !gates || !counts)))
        return -EINVAL;
    int E = cfg->experts, K = cfg->top_k;
    for (int t = 0; t < n; t++) {
        const float *s = scores + (size_t)t * E;
        int *ch = ids + (size_t)t * K;
        float *gt = gates + (size_t)t * K, sum = 0.0f;

        route_one(cfg, s, bias, ch, sb, gscore, allowed, gallowed);
        for (int k = 0; k < K; k++)
            sum += s[ch[k]];
        for (int k = 0; k < K; k++) {
            gt[k] = cfg->route_scale * s[ch[k]] / sum;
            counts[ch[k]]++;
        }
    }
    return 0;
}

/* --- dispatch ----------------------------------------------------------- */

int dx_kref_dispatch_count(const int *ids, int n, int k, int experts, int *tokens_per_expert)
{
    if (n < 0 || k <= 0 || experts <= 0)
        return -EINVAL;
    memset(tokens_per_expert, 0, sizeof(int) * (size_t)experts);
    for (size_t i = 0; i < (size_t)n * (size_t)k; i++) {
        if (ids[i] >= experts)
            return -EINVAL;
        if (ids[i] >= 0) /* negative: masked (a two-hop relay's rows) */
            tokens_per_expert[ids[i]]++;
    }
    return 0;
}

int dx_kref_dispatch_offsets(const int *tokens_per_expert, const int *owner, int experts, int ranks,
                             int *expert_offset, int *rank_rows, int *rank_offset, int *expert_slot)
{
    if (experts <= 0 || ranks <= 0)
        return -EINVAL;
    for (int e = 0; e < experts; e++)
        if (owner[e] < 0 || owner[e] >= ranks)
            return -EINVAL;
    expert_offset[0] = 0;
    for (int e = 0; e < experts; e++)
        expert_offset[e + 1] = expert_offset[e] + tokens_per_expert[e];
    memset(rank_rows, 0, sizeof(int) * (size_t)ranks);
    for (int e = 0; e < experts; e++)
        rank_rows[owner[e]] += tokens_per_expert[e];
    rank_offset[0] = 0;
    for (int r = 0; r < ranks; r++)
        rank_offset[r + 1] = rank_offset[r] + rank_rows[r];
    for (int e = 0; e < experts; e++) {
        int slot = rank_offset[owner[e]];
        for (int f = 0; f < e; f++)
            if (owner[f] == owner[e])
                slot += tokens_per_expert[f];
        expert_slot[e] = slot;
    }
    return 0;
}

int dx_kref_dispatch_rows(const int *ids, const float *gates, int n, int k, int experts,
                          const int *expert_slot, int *send_token, float *send_gate,
                          int *token_slot)
{
    if (n < 0 || k <= 0 || experts <= 0)
        return -EINVAL;
    /* expert by expert, tokens ascending: the kernel's block e does the same */
    for (int e = 0; e < experts; e++) {
        int next = expert_slot[e];
        for (int t = 0; t < n; t++)
            for (int j = 0; j < k; j++) {
                size_t i = (size_t)t * k + j;
                if (ids[i] != e)
                    continue;
                send_token[next] = t;
                if (send_gate)
                    send_gate[next] = gates[i];
                token_slot[i] = next++;
            }
    }
    return 0;
}

void dx_kref_dispatch_pack(const float *x, int d, const int *send_token, int rows, float *send)
{
    for (int r = 0; r < rows; r++)
        memcpy(send + (size_t)r * d, x + (size_t)send_token[r] * d, sizeof(float) * (size_t)d);
}

void dx_kref_combine(const float *y, int d, const float *gates, const int *token_slot, int n, int k,
                     const float *base, float *out)
{
    for (int t = 0; t < n; t++)
        for (int i = 0; i < d; i++) {
            size_t o = (size_t)t * d + i;
            float acc = base ? base[o] : 0.0f;
            for (int j = 0; j < k; j++) {
                size_t c = (size_t)t * k + j;
                if (token_slot[c] < 0)
                    continue;
                float p = gates[c] * y[(size_t)token_slot[c] * d + i];
                acc += p;
            }
            out[o] = acc;
        }
}

/* --- e4m3 --------------------------------------------------------------- */

uint8_t dx_kref_e4m3_encode(float x)
{
    uint32_t bits;

    memcpy(&bits, &x, sizeof(bits));
    uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    float a = fabsf(x);

    if (isnan(x))
        return DX_KREF_E4M3_NAN;
    if (a >= DX_KREF_E4M3_MAX)
        return (uint8_t)(sign | 0x7e);
    if (a < 0x1p-6f) {
        /* subnormal range: a * 2^9 is exact; round it to an integer, ties to
         * even; 8 is the smallest normal, whose code is also 8 */
        float m = a * 0x1p9f, f = floorf(m), r = m - f;
        uint32_t q = (uint32_t)f;
        if (r > 0.5f || (r == 0.5f && (q & 1)))
            q++;
        return (uint8_t)(sign | q);
    }
    memcpy(&bits, &a, sizeof(bits));
    int exp = (int)(bits >> 23) - 127; /* -6 .. 8 */
    uint32_t man = bits & 0x7fffffu, keep = man >> 20, rest = man & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (keep & 1)))
        keep++;
    if (keep == 8) {
        keep = 0;
        exp++;
    }
    uint32_t code = ((uint32_t)(exp + 7) << 3) | keep;
    if (code > 0x7e) /* cannot happen below 448, kept as a guard */
        code = 0x7e;
    return (uint8_t)(sign | code);
}

float dx_kref_e4m3_decode(uint8_t q)
{
    int e = (q >> 3) & 0xf, m = q & 7;
    float v;

    if ((q & 0x7f) == 0x7f)
        return NAN;
    if (e == 0)
        v = ldexpf((float)m, -9);
    else
        v = ldexpf((float)(8 + m), e - 10);
    return (q & 0x80) ? -v : v;
}

void dx_kref_fp8_quant(const float *x, int rows, int cols, uint8_t *q, float *scales)
{
    int tiles = dx_kref_fp8_tiles(cols);

    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tiles; t++) {
            size_t lo = (size_t)r * cols + (size_t)t * DX_KREF_FP8_TILE;
            int len = cols - t * DX_KREF_FP8_TILE;
            float amax = 0.0f, scale;

            if (len > DX_KREF_FP8_TILE)
                len = DX_KREF_FP8_TILE;
            for (int i = 0; i < len; i++)
                amax = fmaxf(amax, fabsf(x[lo + i]));
            scale = amax > 0.0f ? amax / DX_KREF_E4M3_MAX : 1.0f;
            scales[(size_t)r * tiles + t] = scale;
            for (int i = 0; i < len; i++)
                q[lo + i] = dx_kref_e4m3_encode(x[lo + i] / scale);
        }
}

/* Records go tile by tile: a tile's quantisation depends on it alone, and
 * its scale is copied in and out of the record's bytes (no aliasing). */
void dx_kref_fp8_quant_rec(const float *x, int rows, int cols, uint8_t *rec, int pitch)
{
    const size_t off = dx_kref_fp8_rec_scales(cols);

    for (int r = 0; r < rows; r++)
        for (int t = 0, c = 0; c < cols; t++, c += DX_KREF_FP8_TILE) {
            uint8_t *row = rec + (size_t)r * pitch;
            int width = cols - c < DX_KREF_FP8_TILE ? cols - c : DX_KREF_FP8_TILE;
            float scale;

            dx_kref_fp8_quant(x + (size_t)r * cols + c, 1, width, row + c, &scale);
            memcpy(row + off + sizeof(float) * (size_t)t, &scale, sizeof(float));
        }
}

void dx_kref_fp8_dequant_rec(const uint8_t *rec, int pitch, int rows, int cols, float *x)
{
    const size_t off = dx_kref_fp8_rec_scales(cols);

    for (int r = 0; r < rows; r++)
        for (int t = 0, c = 0; c < cols; t++, c += DX_KREF_FP8_TILE) {
            const uint8_t *row = rec + (size_t)r * pitch;
            int width = cols - c < DX_KREF_FP8_TILE ? cols - c : DX_KREF_FP8_TILE;
            float scale;

            memcpy(&scale, row + off + sizeof(float) * (size_t)t, sizeof(float));
            dx_kref_fp8_dequant(row + c, &scale, 1, width, x + (size_t)r * cols + c);
        }
}

void dx_kref_fp8_dequant(const uint8_t *q, const float *scales, int rows, int cols, float *x)
{
    int tiles = dx_kref_fp8_tiles(cols);

    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            size_t i = (size_t)r * cols + c;
            x[i] = dx_kref_e4m3_decode(q[i]) * scales[(size_t)r * tiles + c / DX_KREF_FP8_TILE];
        }
}
