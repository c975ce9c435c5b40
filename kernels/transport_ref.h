/* transport_ref.h - the intra-node transport protocol of the cuda backend
 * (kernels/transport.cu) and its CPU reference (kernels/transport_ref.c, on
 * memory shared between processes or threads). Owns the ring layout, the
 * message format and the ordering rules both sides implement.
 *
 * Ring. One region in the RECEIVER's memory (the sender maps it by CUDA IPC):
 *   [0, 128)                       header: magic, channels, slots, slot_bytes
 *   per channel c, at DX_TREF_CTRL_OFF(c), two 128-byte lines:
 *     sender line   (+0):   head  u64, sent u64   written by the sender only
 *     receiver line (+128): tail  u64, recvd u64  written by the receiver only
 *   per channel c, at DX_TREF_DATA_OFF(channels, slots, slot_bytes, c):
 *     slots x slot_bytes bytes; slot i of the stream lives at index
 *     i & (slots - 1). slots is a power of two, slot_bytes a multiple of 16
 *     (every slot is 16-byte aligned: 16-byte vector stores and loads).
 * Counters are u64 and only grow (head, tail count slots; sent, recvd count
 * messages): at 2^64 slots there is no wrap to handle.
 *
 * Message. A 16-byte header { u64 bytes; u64 seq } then the payload, as one
 * byte sequence laid over n = ceil((16 + bytes) / slot_bytes) consecutive
 * slots (a message spans slots; bytes = slot_bytes - 16 exactly fills one).
 * seq is the channel's message number (sent before the send), so the receiver
 * checks seq == recvd. A message needs n <= slots: a larger one is REFUSED
 * with -EMSGSIZE (not streamed), because a message is published whole: the
 * receiver sees it complete after one acquire and never reassembles.
 *
 * Credit. Sender cursor head, receiver cursor tail (tail <= head). The sender
 * may write slots [head, head + n) only when head + n - tail <= slots (i.e.
 * every slot i it writes has i - tail < slots); it writes the header and
 * payload, then publishes head += n (the count of slots published) and sent
 * += 1. The receiver waits for head > tail, reads the header at slot tail,
 * copies the payload, then returns credit: tail += n, recvd += 1.
 *
 * Ordering (the only synchronisation; one sender and one receiver per
 * channel, channels independent):
 *   sender:   acquire-load tail (it orders the receiver's reads of the old
 *             slot contents before our overwrite), write slots (plain),
 *             release-store head.
 *   receiver: acquire-load head (the slots' contents are visible), read
 *             slots (plain), release-store tail (our reads are done before
 *             the sender may overwrite).
 * CPU: C11 atomic_load_explicit(memory_order_acquire) /
 * atomic_store_explicit(memory_order_release) on the u64 counters. GPU (both
 * at system scope: the peer is another GPU over NVLink):
 *   ld.acquire.sys.global.u64 for the polls of head (receiver) and tail
 *   (sender); st.release.sys.global.u64 for the publication of head and the
 *   return of tail. A block writes (reads) a message with all its threads;
 *   bar.sync then one thread's st.release.sys covers the whole block's
 *   accesses (release is cumulative over what the barrier ordered before it),
 *   and one thread's ld.acquire.sys then bar.sync orders the block's later
 *   accesses. No fence.acq_rel.sys is needed on that path; the receiver reads
 *   payload with ld.relaxed.sys (L1 bypassed: a ring slot is rewritten every
 *   lap and a stale L1 line must not be read). sent/recvd are relaxed (each
 *   is written by one side only and read back by that side only).
 *
 * Channels. A message stream is split round-robin BY MESSAGE: message m goes
 * to channel m % channels as that channel's message m / channels. A message
 * (a token row with its metadata) stays in one channel: no chunk reassembly,
 * the receiver restores the order by visiting channels in the same order,
 * and on the GPU one block per channel (one SM each; default 20 channels)
 * works without talking to the other blocks. */
#ifndef DX_TRANSPORT_REF_H
#define DX_TRANSPORT_REF_H

#include <stddef.h>
#include <stdint.h>

#define DX_TREF_MAGIC 0x3170727478647864ull /* "dxdxtrp1" */
#define DX_TREF_LINE 128                    /* counters sit on their own lines */
#define DX_TREF_HDR_BYTES 128               /* ring header */
#define DX_TREF_CTRL_BYTES 256              /* per channel: sender + receiver line */
#define DX_TREF_MSG_HDR 16                  /* message header: bytes, seq */
#define DX_TREF_ALIGN 16                    /* slot alignment, vector width */
#define DX_TREF_DEFAULT_CHANNELS 20         /* one SM per channel */
#define DX_TREF_MAX_CHANNELS 1024

/* byte offsets inside the ring */
#define DX_TREF_CTRL_OFF(c) ((size_t)DX_TREF_HDR_BYTES + (size_t)(c)*DX_TREF_CTRL_BYTES)
#define DX_TREF_HEAD_OFF(c) DX_TREF_CTRL_OFF(c)
#define DX_TREF_SENT_OFF(c) (DX_TREF_CTRL_OFF(c) + 8)
#define DX_TREF_TAIL_OFF(c) (DX_TREF_CTRL_OFF(c) + DX_TREF_LINE)
#define DX_TREF_RECVD_OFF(c) (DX_TREF_CTRL_OFF(c) + DX_TREF_LINE + 8)
#define DX_TREF_DATA_OFF(channels, slots, slot_bytes, c)                                           \
    (DX_TREF_CTRL_OFF(channels) + (size_t)(c) * (size_t)(slots) * (size_t)(slot_bytes))

/* the ring header at offset 0 */
struct dx_tref_hdr {
    uint64_t magic;
    uint32_t channels;
    uint32_t slots;
    uint32_t slot_bytes;
    uint32_t abort; /* nonzero: every waiting transfer on the ring gives up (-ECANCELED) */
};
/* Abort. Either side may set the header's abort word (a relaxed store, by a
 * copy engine or the host, while the kernels run): a side waiting for
 * credit or for a message checks it on every poll and stops with
 * -ECANCELED, so a job whose peer died ends at once instead of when the
 * wait times out. A ring is not used again after an abort. */
#define DX_TREF_ABORT_OFF 20

/* the message header at the start of a message's first slot */
struct dx_tref_msg {
    uint64_t bytes;
    uint64_t seq;
};

/* Slots a message of len bytes takes: ceil((16 + len) / slot_bytes). */
uint64_t dx_tref_msg_slots(uint32_t slot_bytes, uint64_t len);

/* Bytes of a ring, or 0 when the shape is invalid: channels 1..1024, slots a
 * power of two >= 1, slot_bytes a multiple of 16 >= 16. */
size_t dx_tref_ring_size(uint32_t channels, uint32_t slots, uint32_t slot_bytes);

/* Lay a ring out in mem (size bytes, 16-byte aligned, zeroed counters).
 * Done once, by the receiver, before either side runs. 0 or -EINVAL. */
int dx_tref_ring_init(void *mem, size_t size, uint32_t channels, uint32_t slots,
                      uint32_t slot_bytes);

/* Send len bytes (data may be NULL when len is 0) as the channel's next
 * message; waits (spin, then sched_yield) for credit. 0, -EINVAL (bad ring
 * or channel), -EMSGSIZE (more slots than the ring has) or -ECANCELED (the
 * ring was aborted). */
int dx_tref_send(void *ring, uint32_t channel, const void *data, size_t len);

/* Sets the ring's abort word (either side, any thread or process). */
void dx_tref_abort(void *ring);

/* As dx_tref_send but -EAGAIN instead of waiting for credit. */
int dx_tref_try_send(void *ring, uint32_t channel, const void *data, size_t len);

/* Receive the channel's next message into buf (cap bytes), its length in
 * *len; waits for it. 0; -ENOBUFS when bytes > cap (*len = bytes, the message
 * stays); -EPROTO when the header is inconsistent (seq or size); -EINVAL. */
int dx_tref_recv(void *ring, uint32_t channel, void *buf, size_t cap, size_t *len);

/* As dx_tref_recv but -EAGAIN when no message is published. */
int dx_tref_try_recv(void *ring, uint32_t channel, void *buf, size_t cap, size_t *len);

#endif
