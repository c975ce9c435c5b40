/* ipcring.h - the host side of the cuda backend's intra-node transport: a
 * ring (layout of kernels/transport_ref.h) in the RECEIVER's device memory,
 * exported by CUDA IPC as a small ring descriptor that travels over any byte
 * channel (the data plane; a socketpair in duplex-gpucheck), imported by the
 * sender, and the launches of the two kernels of kernels/transport.cu on it.
 *
 * Receiver: wk_ipcring_create (allocate, lay out the header, zero the
 * counters), wk_ipcring_export + wk_ipcring_desc_encode, send the bytes.
 * Sender: receive the bytes, wk_ipcring_desc_decode (never trusts them),
 * wk_ipcring_import. Both: wk_ipcring_launch_{send,recv} on a stream, one
 * block per channel. The exporter must outlive every importer's use: free
 * the ring only once the sender has closed its mapping.
 *
 * Descriptor wire format (WK_IPCRING_DESC_BYTES, little endian):
 *   [0, 8)    magic   WK_IPCRING_MAGIC
 *   [8, 12)   version WK_IPCRING_VERSION
 *   [12, 16)  channels (1..DX_TREF_MAX_CHANNELS)
 *   [16, 20)  slots    (a power of two)
 *   [20, 24)  slot_bytes (a multiple of 16, >= 16)
 *   [24, 32)  ring bytes (must equal dx_tref_ring_size of the three above)
 *   [32, 96)  the CUipcMemHandle */
#ifndef WK_IPCRING_H
#define WK_IPCRING_H

#include <stddef.h>
#include <stdint.h>

#include "worker/cuda/driver.h"

#define WK_IPCRING_MAGIC 0x676e697263707864ull /* "dxpcring" */
#define WK_IPCRING_VERSION 1u
#define WK_IPCRING_DESC_BYTES 96
/* threads per block of the transport kernels (DX_TRANSPORT_THREADS) */
#define WK_IPCRING_MAX_THREADS 512
#define WK_IPCRING_DEFAULT_THREADS 512

/* The rings of the cuda backend's links (worker/cuda/comm/plink.c, worker/cuda/comm/xchg.c):
 * channels (SMs) a transfer takes, slots per channel, bytes per slot, and
 * the pieces a transfer is cut into (4 slots each, 16-byte aligned). */
#define WK_IPCRING_LINK_CHANNELS 8
#define WK_IPCRING_LINK_SLOTS 16
#define WK_IPCRING_LINK_SLOT_BYTES 16384
#define WK_IPCRING_LINK_PIECE (4 * WK_IPCRING_LINK_SLOT_BYTES - 16)

struct wk_ipcring_desc {
    uint32_t channels, slots, slot_bytes;
    uint64_t ring_bytes;
    struct wk_cuda_ipc_handle handle;
};

typedef struct wk_ipcring wk_ipcring_t;

/* Writes d into buf (cap >= WK_IPCRING_DESC_BYTES). Returns the bytes
 * written, -ENOBUFS when cap is short, -EINVAL when d's shape is invalid. */
int wk_ipcring_desc_encode(const struct wk_ipcring_desc *d, void *buf, size_t cap);

/* Reads a descriptor from len bytes of buf, checking every field. 0, or
 * -EPROTO with err naming the field ("ipcring descriptor: bad magic ...",
 * "... truncated: 40 of 96 bytes"); d is left zeroed on error. */
int wk_ipcring_desc_decode(const void *buf, size_t len, struct wk_ipcring_desc *d, char *err,
                           size_t errlen);

/* Receiver: allocates a ring of channels x slots x slot_bytes on the current
 * device, zeroes it and writes its header. 0, -EINVAL (bad shape) or -EIO /
 * -ENOMEM (wk_cuda_error(c) says why). */
int wk_ipcring_create(wk_cuda_t *c, uint32_t channels, uint32_t slots, uint32_t slot_bytes,
                      wk_ipcring_t **out);

/* Receiver: the descriptor of a created ring. 0 or -EIO; -EINVAL for an
 * imported ring. */
int wk_ipcring_export(wk_ipcring_t *r, struct wk_ipcring_desc *d);

/* Sender: maps the ring a (decoded) descriptor names. 0, -EPROTO when d is
 * not a valid shape, -EIO when the handle does not open. */
int wk_ipcring_import(wk_cuda_t *c, const struct wk_ipcring_desc *d, wk_ipcring_t **out);

/* The byte channel a link's ring descriptor travels over (the data plane
 * in the worker): to and from peer. 0 or -errno. */
struct wk_ipcring_channel {
    int (*send)(void *arg, int peer, const void *buf, size_t len);
    int (*recv)(void *arg, int peer, void *buf, size_t cap, size_t *len);
    void *arg;
};

/* Receiver of a link: makes a ring of the links' shape (WK_IPCRING_LINK_*)
 * and sends its descriptor to peer. Sender: receives peer's descriptor,
 * checks it and maps the ring. Make every offer before any accept and no
 * two ranks wait for each other. 0 or -errno with err saying what
 * ("the IPC ring's descriptor from peer 3: ..."), peer named as `who`. */
int wk_ipcring_offer(wk_cuda_t *c, const struct wk_ipcring_channel *ch, int peer, const char *who,
                     wk_ipcring_t **out, char *err, size_t errlen);
int wk_ipcring_accept(wk_cuda_t *c, const struct wk_ipcring_channel *ch, int peer, const char *who,
                      wk_ipcring_t **out, char *err, size_t errlen);

/* Sets the ring's abort word on stream s (either side; s must not be the
 * one a waiting transfer blocks): its transfers stop with -ECANCELED
 * (transport_ref.h). 0 or -EIO. */
int wk_ipcring_abort(wk_ipcring_t *r, wk_cuda_stream s);

/* Frees a created ring, closes an imported one's mapping. NULL is ignored. */
void wk_ipcring_destroy(wk_ipcring_t *r);

/* The ring's device address (here), channels, slots, slot_bytes. */
wk_cuda_ptr wk_ipcring_ptr(const wk_ipcring_t *r);
uint32_t wk_ipcring_channels(const wk_ipcring_t *r);
uint32_t wk_ipcring_slots(const wk_ipcring_t *r);
uint32_t wk_ipcring_slot_bytes(const wk_ipcring_t *r);

/* Launches dx_transport_send (fn, from the transport module) on stream s:
 * one block of threads per channel (a multiple of 32, <= 512) sends nmsg
 * messages, message m being msg_len[m] bytes at src + msg_off[m] (device
 * arrays of u64; src and every offset 16-byte aligned); err is a device array
 * of channels ints the kernel fills (0 or -errno per channel). 0, -EINVAL or
 * -EIO. */
int wk_ipcring_launch_send(wk_ipcring_t *r, wk_cuda_function_t fn, wk_cuda_stream s,
                           unsigned threads, wk_cuda_ptr src, wk_cuda_ptr msg_off,
                           wk_cuda_ptr msg_len, int nmsg, wk_cuda_ptr err);

/* Launches dx_transport_recv (fn): message m lands at dst + msg_off[m] (at
 * most msg_cap[m] bytes), its length in msg_len[m]. 0, -EINVAL or -EIO. */
int wk_ipcring_launch_recv(wk_ipcring_t *r, wk_cuda_function_t fn, wk_cuda_stream s,
                           unsigned threads, wk_cuda_ptr dst, wk_cuda_ptr msg_off,
                           wk_cuda_ptr msg_cap, int nmsg, wk_cuda_ptr msg_len, wk_cuda_ptr err);

#endif
