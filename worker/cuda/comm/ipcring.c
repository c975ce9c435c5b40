/* ipcring.c - the host side of the intra-node transport (worker/cuda/comm/ipcring.h):
 * owns a ring's device allocation (receiver) or IPC mapping (sender), its
 * header, the ring descriptor's wire format and the launches of the transport
 * kernels. The layout is kernels/transport_ref.h's (DX_TREF_*), not redefined
 * here. */
#include "worker/cuda/comm/ipcring.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kernels/transport_ref.h"

struct wk_ipcring {
    wk_cuda_t *c;
    wk_cuda_ptr ring;
    int imported; /* a mapping of another process's ring */
    uint32_t channels, slots, slot_bytes;
    size_t bytes;
};

/* --- the descriptor ------------------------------------------------------ */

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;

    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;

    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

int wk_ipcring_desc_encode(const struct wk_ipcring_desc *d, void *buf, size_t cap)
{
    unsigned char *p = buf;

    if (!d || !buf)
        return -EINVAL;
    if (cap < WK_IPCRING_DESC_BYTES)
        return -ENOBUFS;
    if (dx_tref_ring_size(d->channels, d->slots, d->slot_bytes) != d->ring_bytes ||
        d->ring_bytes == 0)
        return -EINVAL;
    put_u64(p, WK_IPCRING_MAGIC);
    put_u32(p + 8, WK_IPCRING_VERSION);
    put_u32(p + 12, d->channels);
    put_u32(p + 16, d->slots);
    put_u32(p + 20, d->slot_bytes);
    put_u64(p + 24, d->ring_bytes);
    memcpy(p + 32, d->handle.bytes, sizeof(d->handle.bytes));
    return WK_IPCRING_DESC_BYTES;
}

static int decode_error(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int decode_error(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    int used;

    if (!err || errlen == 0)
        return -EPROTO;
    used = snprintf(err, errlen, "ipcring descriptor: ");
    if (used >= 0 && (size_t)used < errlen) {
        va_start(ap, fmt);
        vsnprintf(err + used, errlen - (size_t)used, fmt, ap);
        va_end(ap);
    }
    return -EPROTO;
}

int wk_ipcring_desc_decode(const void *buf, size_t len, struct wk_ipcring_desc *d, char *err,
                           size_t errlen)
{
    const unsigned char *p = buf;
    uint64_t magic, ring_bytes;
    uint32_t version, channels, slots, slot_bytes;
    size_t want;

    if (err && errlen)
        err[0] = '\0';
    if (!d)
        return -EINVAL;
    memset(d, 0, sizeof(*d));
    if (!buf)
        return decode_error(err, errlen, "no buffer");
    if (len != WK_IPCRING_DESC_BYTES)
        return decode_error(err, errlen, "%s: %zu of %d bytes",
                            len < WK_IPCRING_DESC_BYTES ? "truncated" : "trailing bytes", len,
                            WK_IPCRING_DESC_BYTES);
    magic = get_u64(p);
    version = get_u32(p + 8);
    channels = get_u32(p + 12);
    slots = get_u32(p + 16);
    slot_bytes = get_u32(p + 20);
    ring_bytes = get_u64(p + 24);
    if (magic != WK_IPCRING_MAGIC)
        return decode_error(err, errlen, "bad magic 0x%016llx (want 0x%016llx)",
                            (unsigned long long)magic, (unsigned long long)WK_IPCRING_MAGIC);
    if (version != WK_IPCRING_VERSION)
        return decode_error(err, errlen, "unsupported version %u (want %u)", version,
                            WK_IPCRING_VERSION);
    if (channels < 1 || channels > DX_TREF_MAX_CHANNELS)
        return decode_error(err, errlen, "bad channels %u (1..%d)", channels, DX_TREF_MAX_CHANNELS);
    if (slots == 0 || (slots & (slots - 1)) != 0)
        return decode_error(err, errlen, "bad slots %u (a power of two)", slots);
    if (slot_bytes < DX_TREF_ALIGN || slot_bytes % DX_TREF_ALIGN != 0)
        return decode_error(err, errlen, "bad slot_bytes %u (a multiple of %d)", slot_bytes,
                            DX_TREF_ALIGN);
    want = dx_tref_ring_size(channels, slots, slot_bytes);
    if (want == 0)
        return decode_error(err, errlen, "ring of %u x %u x %u bytes does not fit in memory",
                            channels, slots, slot_bytes);
    if (ring_bytes != (uint64_t)want)
        return decode_error(err, errlen, "bad ring_bytes %llu (the shape takes %zu)",
                            (unsigned long long)ring_bytes, want);
    d->channels = channels;
    d->slots = slots;
    d->slot_bytes = slot_bytes;
    d->ring_bytes = ring_bytes;
    memcpy(d->handle.bytes, p + 32, sizeof(d->handle.bytes));
    return 0;
}

/* --- the ring ------------------------------------------------------------ */

static wk_ipcring_t *ring_new(wk_cuda_t *c, uint32_t channels, uint32_t slots, uint32_t slot_bytes,
                              size_t bytes)
{
    wk_ipcring_t *r = calloc(1, sizeof(*r));

    if (!r)
        return NULL;
    r->c = c;
    r->channels = channels;
    r->slots = slots;
    r->slot_bytes = slot_bytes;
    r->bytes = bytes;
    return r;
}

int wk_ipcring_create(wk_cuda_t *c, uint32_t channels, uint32_t slots, uint32_t slot_bytes,
                      wk_ipcring_t **out)
{
    const size_t bytes = dx_tref_ring_size(channels, slots, slot_bytes);
    struct dx_tref_hdr hdr = {0};
    wk_ipcring_t *r = NULL;
    int rc;

    *out = NULL;
    if (!c || bytes == 0)
        return -EINVAL;
    if (!(r = ring_new(c, channels, slots, slot_bytes, bytes)))
        return -ENOMEM;
    if ((rc = wk_cuda_alloc(c, bytes, &r->ring)) < 0)
        goto fail;
    /* counters and slots zero, then the header (magic last: a reader that
     * sees the magic sees the shape; nobody reads it before the export) */
    hdr.magic = DX_TREF_MAGIC;
    hdr.channels = channels;
    hdr.slots = slots;
    hdr.slot_bytes = slot_bytes;
    if ((rc = wk_cuda_memset(c, r->ring, 0, bytes)) < 0 ||
        (rc = wk_cuda_upload(c, r->ring, &hdr, sizeof(hdr))) < 0)
        goto fail;
    *out = r;
    return 0;
fail:
    wk_ipcring_destroy(r);
    return rc;
}

int wk_ipcring_export(wk_ipcring_t *r, struct wk_ipcring_desc *d)
{
    if (!r || !d || r->imported)
        return -EINVAL;
    memset(d, 0, sizeof(*d));
    d->channels = r->channels;
    d->slots = r->slots;
    d->slot_bytes = r->slot_bytes;
    d->ring_bytes = r->bytes;
    return wk_cuda_ipc_export(r->c, r->ring, &d->handle);
}

int wk_ipcring_import(wk_cuda_t *c, const struct wk_ipcring_desc *d, wk_ipcring_t **out)
{
    wk_ipcring_t *r;
    size_t bytes;
    int rc;

    *out = NULL;
    if (!c || !d)
        return -EINVAL;
    bytes = dx_tref_ring_size(d->channels, d->slots, d->slot_bytes);
    if (bytes == 0 || bytes != d->ring_bytes)
        return -EPROTO;
    if (!(r = ring_new(c, d->channels, d->slots, d->slot_bytes, bytes)))
        return -ENOMEM;
    r->imported = 1;
    if ((rc = wk_cuda_ipc_import(c, &d->handle, &r->ring)) < 0) {
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

int wk_ipcring_offer(wk_cuda_t *c, const struct wk_ipcring_channel *ch, int peer, const char *who,
                     wk_ipcring_t **out, char *err, size_t errlen)
{
    unsigned char buf[WK_IPCRING_DESC_BYTES];
    struct wk_ipcring_desc d;
    int rc;

    *out = NULL;
    if ((rc = wk_ipcring_create(c, WK_IPCRING_LINK_CHANNELS, WK_IPCRING_LINK_SLOTS,
                                WK_IPCRING_LINK_SLOT_BYTES, out)) < 0 ||
        (rc = wk_ipcring_export(*out, &d)) < 0)
        return dx_errf(err, errlen, rc, "the IPC ring from %s %d: %s", who, peer, wk_cuda_error(c));
    if ((rc = wk_ipcring_desc_encode(&d, buf, sizeof(buf))) < 0 ||
        (rc = ch->send(ch->arg, peer, buf, (size_t)rc)) < 0)
        return dx_errf(err, errlen, rc, "the IPC ring's descriptor to %s %d: %s", who, peer,
                       strerror(-rc));
    return 0;
}

int wk_ipcring_accept(wk_cuda_t *c, const struct wk_ipcring_channel *ch, int peer, const char *who,
                      wk_ipcring_t **out, char *err, size_t errlen)
{
    unsigned char buf[WK_IPCRING_DESC_BYTES];
    struct wk_ipcring_desc d;
    char why[256];
    size_t len = 0;
    int rc;

    *out = NULL;
    if ((rc = ch->recv(ch->arg, peer, buf, sizeof(buf), &len)) < 0)
        return dx_errf(err, errlen, rc, "the IPC ring's descriptor from %s %d: %s", who, peer,
                       strerror(-rc));
    if ((rc = wk_ipcring_desc_decode(buf, len, &d, why, sizeof(why))) < 0)
        return dx_errf(err, errlen, rc, "%s %d's IPC ring: %s", who, peer, why);
    if ((rc = wk_ipcring_import(c, &d, out)) < 0)
        return dx_errf(err, errlen, rc, "%s %d's IPC ring: %s", who, peer, wk_cuda_error(c));
    return 0;
}

int wk_ipcring_abort(wk_ipcring_t *r, wk_cuda_stream s)
{
    return wk_cuda_memset_on(r->c, s, r->ring + DX_TREF_ABORT_OFF, 1, sizeof(uint32_t));
}

void wk_ipcring_destroy(wk_ipcring_t *r)
{
    if (!r)
        return;
    if (r->imported)
        wk_cuda_ipc_close(r->c, r->ring);
    else
        wk_cuda_free(r->c, r->ring);
    free(r);
}

wk_cuda_ptr wk_ipcring_ptr(const wk_ipcring_t *r)
{
    return r ? r->ring : 0;
}

uint32_t wk_ipcring_channels(const wk_ipcring_t *r)
{
    return r ? r->channels : 0;
}

uint32_t wk_ipcring_slots(const wk_ipcring_t *r)
{
    return r ? r->slots : 0;
}

uint32_t wk_ipcring_slot_bytes(const wk_ipcring_t *r)
{
    return r ? r->slot_bytes : 0;
}

/* --- launches ------------------------------------------------------------- */

static int launch_ok(const wk_ipcring_t *r, wk_cuda_function_t fn, unsigned threads, int nmsg)
{
    return r && fn && threads >= 32 && threads <= WK_IPCRING_MAX_THREADS && threads % 32 == 0 &&
           nmsg >= 0;
}

int wk_ipcring_launch_send(wk_ipcring_t *r, wk_cuda_function_t fn, wk_cuda_stream s,
                           unsigned threads, wk_cuda_ptr src, wk_cuda_ptr msg_off,
                           wk_cuda_ptr msg_len, int nmsg, wk_cuda_ptr err)
{
    if (!launch_ok(r, fn, threads, nmsg) || !err)
        return -EINVAL;
    {
        const unsigned grid[3] = {r->channels, 1, 1}, block[3] = {threads, 1, 1};
        wk_cuda_ptr ring = r->ring;
        uint32_t slots = r->slots, slot_bytes = r->slot_bytes;
        void *args[] = {&ring, &slots, &slot_bytes, &src, &msg_off, &msg_len, &nmsg, &err};

        return wk_cuda_launch_on(r->c, s, fn, grid, block, 0, args);
    }
}

int wk_ipcring_launch_recv(wk_ipcring_t *r, wk_cuda_function_t fn, wk_cuda_stream s,
                           unsigned threads, wk_cuda_ptr dst, wk_cuda_ptr msg_off,
                           wk_cuda_ptr msg_cap, int nmsg, wk_cuda_ptr msg_len, wk_cuda_ptr err)
{
    if (!launch_ok(r, fn, threads, nmsg) || !err)
        return -EINVAL;
    {
        const unsigned grid[3] = {r->channels, 1, 1}, block[3] = {threads, 1, 1};
        wk_cuda_ptr ring = r->ring;
        uint32_t slots = r->slots, slot_bytes = r->slot_bytes;
        void *args[] = {&ring,    &slots, &slot_bytes, &dst, &msg_off,
                        &msg_cap, &nmsg,  &msg_len,    &err};

        return wk_cuda_launch_on(r->c, s, fn, grid, block, 0, args);
    }
}
