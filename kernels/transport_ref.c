/* transport_ref.c - CPU reference of the intra-node transport
 * (kernels/transport_ref.h): the ring protocol of kernels/transport.cu on
 * memory shared between processes or threads, with C11 acquire loads and
 * release stores on the 64-bit counters. Owns no memory: every cursor lives
 * in the ring, so either side may be another process with the region mapped
 * at another address. */
#include "kernels/transport_ref.h"

#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#define SPINS_BEFORE_YIELD 256

static _Atomic uint64_t *ctr(void *ring, size_t off)
{
    return (_Atomic uint64_t *)((unsigned char *)ring + off);
}

static unsigned char *slot_ptr(const struct dx_tref_hdr *h, void *ring, uint32_t c, uint64_t i)
{
    size_t data = DX_TREF_DATA_OFF(h->channels, h->slots, h->slot_bytes, c);

    return (unsigned char *)ring + data + (size_t)(i & (h->slots - 1)) * h->slot_bytes;
}

uint64_t dx_tref_msg_slots(uint32_t slot_bytes, uint64_t len)
{
    if (slot_bytes == 0 || len > UINT64_MAX - DX_TREF_MSG_HDR - slot_bytes)
        return UINT64_MAX;
    return (DX_TREF_MSG_HDR + len + slot_bytes - 1) / slot_bytes;
}

static bool shape_ok(uint32_t channels, uint32_t slots, uint32_t slot_bytes)
{
    return channels >= 1 && channels <= DX_TREF_MAX_CHANNELS && slots >= 1 &&
           (slots & (slots - 1)) == 0 && slot_bytes >= DX_TREF_ALIGN &&
           slot_bytes % DX_TREF_ALIGN == 0;
}

size_t dx_tref_ring_size(uint32_t channels, uint32_t slots, uint32_t slot_bytes)
{
    if (!shape_ok(channels, slots, slot_bytes))
        return 0;
    /* channels <= 1024, slots, slot_bytes < 2^32: the product fits 2^74 only
     * on paper; check it */
    uint64_t per = (uint64_t)slots * slot_bytes;
    if (per > (SIZE_MAX - DX_TREF_CTRL_OFF(channels)) / channels)
        return 0;
    return DX_TREF_CTRL_OFF(channels) + (size_t)per * channels;
}

int dx_tref_ring_init(void *mem, size_t size, uint32_t channels, uint32_t slots,
                      uint32_t slot_bytes)
{
    size_t need = dx_tref_ring_size(channels, slots, slot_bytes);
    struct dx_tref_hdr *h = mem;

    if (!mem || need == 0 || size < need || (uintptr_t)mem % DX_TREF_ALIGN)
        return -EINVAL;
    memset(mem, 0, DX_TREF_CTRL_OFF(channels));
    h->channels = channels;
    h->slots = slots;
    h->slot_bytes = slot_bytes;
    atomic_thread_fence(memory_order_release);
    h->magic = DX_TREF_MAGIC;
    return 0;
}

static const struct dx_tref_hdr *ring_hdr(void *ring, uint32_t channel)
{
    const struct dx_tref_hdr *h = ring;

    if (!h || h->magic != DX_TREF_MAGIC || channel >= h->channels)
        return NULL;
    return h;
}

/* Copy n bytes of a message's byte sequence, from message offset off, out of
 * (into) the slots from slot i on: the sequence is contiguous inside the
 * channel's data area except where it wraps from the last slot to the first. */
static void copy_slots(const struct dx_tref_hdr *h, void *ring, uint32_t c, uint64_t i, size_t off,
                       unsigned char *mem, size_t n, bool to_ring)
{
    size_t area = (size_t)h->slots * h->slot_bytes;
    unsigned char *base = slot_ptr(h, ring, c, 0);
    size_t pos = (size_t)(i & (h->slots - 1)) * h->slot_bytes + off;

    while (n > 0) {
        pos %= area;
        size_t run = area - pos < n ? area - pos : n;
        if (to_ring)
            memcpy(base + pos, mem, run);
        else
            memcpy(mem, base + pos, run);
        mem += run;
        pos += run;
        n -= run;
    }
}

/* The ring's abort word is set (a relaxed load: the word says nothing of
 * the slots). */
static bool aborted(void *ring)
{
    return atomic_load_explicit((_Atomic uint32_t *)((unsigned char *)ring + DX_TREF_ABORT_OFF),
                                memory_order_relaxed) != 0;
}

/* Sets the ring's abort word. */
void dx_tref_abort(void *ring)
{
    atomic_store_explicit((_Atomic uint32_t *)((unsigned char *)ring + DX_TREF_ABORT_OFF), 1,
                          memory_order_relaxed);
}

static int send_msg(void *ring, uint32_t channel, const void *data, size_t len, bool wait)
{
    const struct dx_tref_hdr *h = ring_hdr(ring, channel);
    _Atomic uint64_t *head, *tail, *sent;
    uint64_t n, hd, tl;
    struct dx_tref_msg m;
    unsigned spins = 0;

    if (!h || (len > 0 && !data))
        return -EINVAL;
    n = dx_tref_msg_slots(h->slot_bytes, len);
    if (n > h->slots)
        return -EMSGSIZE;
    head = ctr(ring, DX_TREF_HEAD_OFF(channel));
    sent = ctr(ring, DX_TREF_SENT_OFF(channel));
    tail = ctr(ring, DX_TREF_TAIL_OFF(channel));
    hd = atomic_load_explicit(head, memory_order_relaxed); /* ours */
    for (;;) {
        tl = atomic_load_explicit(tail, memory_order_acquire);
        if (hd + n - tl <= h->slots)
            break;
        if (aborted(ring))
            return -ECANCELED;
        if (!wait)
            return -EAGAIN;
        if (++spins >= SPINS_BEFORE_YIELD) {
            spins = 0;
            sched_yield();
        }
    }
    m.bytes = len;
    m.seq = atomic_load_explicit(sent, memory_order_relaxed);
    copy_slots(h, ring, channel, hd, 0, (unsigned char *)&m, sizeof(m), true);
    if (len > 0)
        copy_slots(h, ring, channel, hd, DX_TREF_MSG_HDR, (unsigned char *)data, len, true);
    atomic_store_explicit(sent, m.seq + 1, memory_order_relaxed);
    atomic_store_explicit(head, hd + n, memory_order_release);
    return 0;
}

int dx_tref_send(void *ring, uint32_t channel, const void *data, size_t len)
{
    return send_msg(ring, channel, data, len, true);
}

int dx_tref_try_send(void *ring, uint32_t channel, const void *data, size_t len)
{
    return send_msg(ring, channel, data, len, false);
}

static int recv_msg(void *ring, uint32_t channel, void *buf, size_t cap, size_t *len, bool wait)
{
    const struct dx_tref_hdr *h = ring_hdr(ring, channel);
    _Atomic uint64_t *head, *tail, *recvd;
    uint64_t hd, tl, n, seq;
    struct dx_tref_msg m;
    unsigned spins = 0;

    if (!h || !len || (cap > 0 && !buf))
        return -EINVAL;
    head = ctr(ring, DX_TREF_HEAD_OFF(channel));
    tail = ctr(ring, DX_TREF_TAIL_OFF(channel));
    recvd = ctr(ring, DX_TREF_RECVD_OFF(channel));
    tl = atomic_load_explicit(tail, memory_order_relaxed); /* ours */
    for (;;) {
        hd = atomic_load_explicit(head, memory_order_acquire);
        if (hd != tl)
            break;
        if (aborted(ring))
            return -ECANCELED;
        if (!wait)
            return -EAGAIN;
        if (++spins >= SPINS_BEFORE_YIELD) {
            spins = 0;
            sched_yield();
        }
    }
    copy_slots(h, ring, channel, tl, 0, (unsigned char *)&m, sizeof(m), false);
    seq = atomic_load_explicit(recvd, memory_order_relaxed);
    n = dx_tref_msg_slots(h->slot_bytes, m.bytes);
    if (m.seq != seq || n > hd - tl)
        return -EPROTO;
    *len = m.bytes;
    if (m.bytes > cap)
        return -ENOBUFS;
    if (m.bytes > 0)
        copy_slots(h, ring, channel, tl, DX_TREF_MSG_HDR, buf, m.bytes, false);
    atomic_store_explicit(recvd, seq + 1, memory_order_relaxed);
    atomic_store_explicit(tail, tl + n, memory_order_release);
    return 0;
}

int dx_tref_recv(void *ring, uint32_t channel, void *buf, size_t cap, size_t *len)
{
    return recv_msg(ring, channel, buf, cap, len, true);
}

int dx_tref_try_recv(void *ring, uint32_t channel, void *buf, size_t cap, size_t *len)
{
    return recv_msg(ring, channel, buf, cap, len, false);
}
