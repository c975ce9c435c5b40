/* transport.cu - the intra-node transport of the cuda backend: a sender
 * kernel that writes a message stream into a peer GPU's rings (mapped by CUDA
 * IPC) and a receiver kernel that drains them. The protocol (ring layout,
 * message header, credit, memory ordering, channel split) is the contract of
 * kernels/transport_ref.h, which kernels/transport_ref.c implements on the
 * CPU.
 *
 * dx_transport_send(ring, slots, slot_bytes, src, msg_off [nmsg], msg_len
 *   [nmsg], nmsg, err [channels])
 *   ring is the RECEIVER's region as mapped here; grid = channels blocks (one
 *   per SM: the SMs the transport takes, default 20), blockDim a multiple of
 *   32 up to DX_TRANSPORT_THREADS. Block c sends messages m = c, c + C, ...
 *   (src + msg_off[m], msg_len[m] bytes; src and every msg_off 16-byte
 *   aligned).
 * dx_transport_recv(ring, slots, slot_bytes, dst, msg_off [nmsg], msg_cap
 *   [nmsg], nmsg, msg_len [nmsg], err [channels])
 *   ring is this GPU's own region; same grid. Block c receives messages m =
 *   c, c + C, ... into dst + msg_off[m] (16-byte aligned, msg_cap[m] bytes)
 *   and writes their lengths to msg_len[m].
 * err[c] is 0, or -EMSGSIZE / -EINVAL (sender), -EPROTO / -ENOBUFS
 * (receiver), -ETIMEDOUT (no progress for DX_TRANSPORT_TIMEOUT_CYCLES),
 * -ECANCELED (a side set the ring's abort word while this one waited); the
 * block stops at the first error. The rings' counters persist across
 * launches: a stream may be sent by several launches of the same grid.
 *
 * Data moves in 16-byte vectors: the source with ld.global.nc, the ring with
 * st.global.L1::no_allocate (sender) and ld.relaxed.sys (receiver: a slot is
 * rewritten every lap, its L1 copy must not be reused). Counters: polls with
 * ld.acquire.sys.global.u64, publication and credit with
 * st.release.sys.global.u64, by thread 0 after (before) a block barrier. */
#include <errno.h>
#include <stdint.h>

#include "ptx.cuh"
#include "transport_ref.h"

#define DX_TRANSPORT_THREADS 512
#define DX_TRANSPORT_TIMEOUT_CYCLES (1ull << 37) /* ~70 s at 2 GHz */

static __device__ __forceinline__ uint64_t msg_slots(uint32_t slot_bytes, uint64_t len)
{
    return (DX_TREF_MSG_HDR + len + slot_bytes - 1) / slot_bytes;
}

/* The address of 16-byte unit u of the message that starts at slot first. */
static __device__ __forceinline__ unsigned char *unit_ptr(unsigned char *data, uint32_t slots,
                                                          uint32_t slot_bytes, uint64_t first,
                                                          uint32_t u)
{
    const uint32_t ups = slot_bytes / DX_TREF_ALIGN, s = u / ups, w = u - s * ups;
    return data + (size_t)((first + s) & (slots - 1)) * slot_bytes + (size_t)w * DX_TREF_ALIGN;
}

static __device__ __forceinline__ uint32_t word(uint4 v, int i)
{
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/* Bytes [b, min(b + 16, len)) of p as one vector, zero padded (unrolled:
 * the vector stays in registers). */
static __device__ __forceinline__ uint4 ld_partial(const unsigned char *p, uint64_t b,
                                                   uint64_t len)
{
    uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 16; i++)
        if (b + i < len)
            w[i >> 2] |= (uint32_t)p[b + i] << ((i & 3) * 8);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

/* Store bytes [b, len) (fewer than 16) of the vector v at q + b. */
static __device__ __forceinline__ void st_partial(unsigned char *q, uint64_t b, uint64_t len,
                                                  uint4 v)
{
#pragma unroll
    for (int i = 0; i < 16; i++)
        if (b + i < len)
            q[b + i] = (unsigned char)(word(v, i >> 2) >> ((i & 3) * 8));
}

extern "C" __global__ void __launch_bounds__(DX_TRANSPORT_THREADS, 1)
    dx_transport_send(unsigned char *ring, uint32_t slots, uint32_t slot_bytes,
                      const unsigned char *__restrict__ src, const uint64_t *__restrict__ msg_off,
                      const uint64_t *__restrict__ msg_len, int nmsg, int *err)
{
    __shared__ uint64_t s_head, s_seq;
    __shared__ int s_err;
    const uint32_t C = gridDim.x, c = blockIdx.x;
    uint64_t *head = (uint64_t *)(ring + DX_TREF_HEAD_OFF(c));
    uint64_t *sent = (uint64_t *)(ring + DX_TREF_SENT_OFF(c));
    const uint64_t *tailp = (const uint64_t *)(ring + DX_TREF_TAIL_OFF(c));
    unsigned char *data = ring + DX_TREF_DATA_OFF(C, slots, slot_bytes, c);
    uint64_t tail = 0; /* thread 0's cached credit */

    if (threadIdx.x == 0) {
        s_head = ld_relaxed_sys_u64(head); /* written by this side only */
        s_seq = ld_relaxed_sys_u64(sent);
        s_err = 0;
        tail = ld_acquire_sys_u64(tailp);
    }
    __syncthreads();
    for (int m = c; m < nmsg; m += C) { /* s_err is tested after a barrier */
        const uint64_t len = msg_len[m], n = msg_slots(slot_bytes, len);
        const unsigned char *p = src + msg_off[m];

        if (threadIdx.x == 0) {
            if (n > slots)
                s_err = -EMSGSIZE;
            else if ((uintptr_t)p & 15)
                s_err = -EINVAL;
            const long long t0 = clock64();
            while (s_err == 0 && s_head + n - tail > slots) {
                tail = ld_acquire_sys_u64(tailp);
                if (ld_relaxed_sys_u32(ring + DX_TREF_ABORT_OFF))
                    s_err = -ECANCELED;
                else if ((uint64_t)(clock64() - t0) > DX_TRANSPORT_TIMEOUT_CYCLES)
                    s_err = -ETIMEDOUT;
            }
        }
        __syncthreads();
        if (s_err)
            break;
        const uint64_t first = s_head;
        const uint32_t units = (uint32_t)((DX_TREF_MSG_HDR + len + 15) / 16);
        for (uint32_t u = threadIdx.x; u < units; u += blockDim.x) {
            uint4 v;
            if (u == 0) {
                v = make_uint4((uint32_t)len, (uint32_t)(len >> 32), (uint32_t)s_seq,
                               (uint32_t)(s_seq >> 32));
            } else {
                const uint64_t b = (uint64_t)(u - 1) * 16;
                v = b + 16 <= len ? ld_nc_na_v4_u32(p + b) : ld_partial(p, b, len);
            }
            st_na_v4_u32(unit_ptr(data, slots, slot_bytes, first, u), v);
        }
        __syncthreads(); /* the whole message is written */
        if (threadIdx.x == 0) {
            s_head = first + n;
            s_seq++;
            st_relaxed_sys_u64(sent, s_seq);
            st_release_sys_u64(head, first + n);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        err[c] = s_err;
}

extern "C" __global__ void __launch_bounds__(DX_TRANSPORT_THREADS, 1)
    dx_transport_recv(unsigned char *ring, uint32_t slots, uint32_t slot_bytes,
                      unsigned char *__restrict__ dst, const uint64_t *__restrict__ msg_off,
                      const uint64_t *__restrict__ msg_cap, int nmsg, uint64_t *msg_len, int *err)
{
    __shared__ uint64_t s_tail, s_seq, s_len;
    __shared__ int s_err;
    const uint32_t C = gridDim.x, c = blockIdx.x;
    const uint64_t *headp = (const uint64_t *)(ring + DX_TREF_HEAD_OFF(c));
    uint64_t *tail = (uint64_t *)(ring + DX_TREF_TAIL_OFF(c));
    uint64_t *recvd = (uint64_t *)(ring + DX_TREF_RECVD_OFF(c));
    unsigned char *data = ring + DX_TREF_DATA_OFF(C, slots, slot_bytes, c);
    uint64_t head = 0; /* thread 0's last seen head */

    if (threadIdx.x == 0) {
        s_tail = ld_relaxed_sys_u64(tail); /* written by this side only */
        s_seq = ld_relaxed_sys_u64(recvd);
        s_err = 0;
        head = ld_acquire_sys_u64(headp);
    }
    __syncthreads();
    for (int m = c; m < nmsg; m += C) { /* s_err is tested after a barrier */
        unsigned char *q = dst + msg_off[m];

        if (threadIdx.x == 0) {
            const long long t0 = clock64();
            while (head == s_tail) {
                head = ld_acquire_sys_u64(headp);
                if (head != s_tail)
                    break;
                if (ld_relaxed_sys_u32(ring + DX_TREF_ABORT_OFF)) {
                    s_err = -ECANCELED;
                    break;
                }
                if ((uint64_t)(clock64() - t0) > DX_TRANSPORT_TIMEOUT_CYCLES) {
                    s_err = -ETIMEDOUT;
                    break;
                }
            }
            if (s_err == 0) {
                const uint4 h =
                    ld_relaxed_sys_na_v4_u32(unit_ptr(data, slots, slot_bytes, s_tail, 0));
                const uint64_t bytes = h.x | (uint64_t)h.y << 32;
                const uint64_t seq = h.z | (uint64_t)h.w << 32;
                if (seq != s_seq || msg_slots(slot_bytes, bytes) > head - s_tail)
                    s_err = -EPROTO;
                else if (bytes > msg_cap[m] || ((uintptr_t)q & 15))
                    s_err = bytes > msg_cap[m] ? -ENOBUFS : -EINVAL;
                s_len = bytes;
                msg_len[m] = bytes;
            }
        }
        __syncthreads();
        if (s_err)
            break;
        const uint64_t first = s_tail, len = s_len;
        const uint32_t units = (uint32_t)((DX_TREF_MSG_HDR + len + 15) / 16);
        for (uint32_t u = 1 + threadIdx.x; u < units; u += blockDim.x) {
            const uint4 v = ld_relaxed_sys_na_v4_u32(unit_ptr(data, slots, slot_bytes, first, u));
            const uint64_t b = (uint64_t)(u - 1) * 16;
            if (b + 16 <= len) {
                *(uint4 *)(q + b) = v;
            } else {
                st_partial(q, b, len, v);
            }
        }
        __syncthreads(); /* the whole message is read */
        if (threadIdx.x == 0) {
            s_tail = first + msg_slots(slot_bytes, len);
            s_seq++;
            st_relaxed_sys_u64(recvd, s_seq);
            st_release_sys_u64(tail, s_tail);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        err[c] = s_err;
}
