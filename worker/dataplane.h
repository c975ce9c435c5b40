/* dataplane.h - the worker's data plane: small tagged messages between the
 * ranks of a job (activations, gradients, expert-parallel exchanges and
 * gradient all-reduce).
 *
 * Each worker binds one ZeroMQ PULL socket (--data-listen) and advertises
 * its endpoint in Register.data_addr; it sends through PUSH sockets that
 * are connected lazily, one per peer address. A message is one frame: a
 * fixed little-endian header naming it (job, attempt, step, payload, path,
 * micro-batch, stage, layer, source rank) and stamped with its send time,
 * then an optional byte payload (empty on the sim backend).
 *
 * A receiver thread, started by wk_data_create, owns the PULL socket: it
 * reads every frame as soon as it arrives, stamps its arrival time and
 * keeps it in a bounded buffer until wk_data_recv asks for its key, so
 * communication proceeds while the caller computes. Messages of an older
 * job or attempt than the current one are dropped, as are duplicates.
 *
 * Thread safety: wk_data_send from one thread at a time, wk_data_recv from
 * one thread at a time (the two may be different threads, running
 * concurrently); wk_data_begin, wk_data_stats, wk_data_addr and
 * wk_data_set_limits from any thread. wk_data_destroy once nothing else
 * uses the wk_data_t. A hand-over between threads (the agent while idle,
 * the runtime thread while a job runs) is ordered by thread create/join.
 */
#ifndef WK_DATAPLANE_H
#define WK_DATAPLANE_H

#include <stddef.h>
#include <stdint.h>

/* Where the PULL socket binds by default: a free port on loopback. */
#define WK_DATA_LISTEN_DEFAULT "tcp://127.0.0.1:*"
/* The largest payload a message may carry (the frame adds the header). */
#define WK_DATA_MAX_PAYLOAD (64 * 1024 * 1024)
/* Messages kept waiting for their wk_data_recv, and their payload bytes. */
#define WK_DATA_BUFFER_MAX 65536
#define WK_DATA_BUFFER_BYTES (256 * 1024 * 1024)
/* The longest endpoint string. */
#define WK_DATA_ADDR_MAX 256
/* How long a closed socket keeps trying to deliver what it queued. */
#define WK_DATA_LINGER_MS 1000

/* Worker-level payload kinds, beyond enum dp_payload (DP_ACTIVATION,
 * DP_GRADIENT) of pipeline/schedule.h. For these, layer and src (the
 * sending rank) tell apart the messages of one micro-batch and stage. */
enum wk_data_payload {
    WK_DATA_EP_DISPATCH = 16, /* tokens to an expert owner */
    WK_DATA_EP_COMBINE = 17,  /* expert outputs back */
    WK_DATA_EP_GRAD = 18,     /* output gradients to an owner */
    WK_DATA_EP_DXG = 19,      /* input gradients back */
    WK_DATA_SYNC_UP = 20,     /* gradient all-reduce: contribution to the root */
    WK_DATA_SYNC_DOWN = 21,   /* the root's result */
    WK_DATA_LINK_RING = 22,   /* an IPC ring's descriptor, to the neighbour sending into it */
};

/* What names a message: every field is part of the key. payload: enum
 * dp_payload or enum wk_data_payload. Build keys with designated
 * initializers; fields left out are 0. */
struct wk_data_key {
    uint64_t job_id;
    uint32_t attempt;
    uint64_t step;
    int32_t payload;
    int32_t path;
    int32_t mb;
    int32_t stage;
    int32_t layer;
    int32_t src;
};

/* A received message; release with wk_data_msg_free. */
struct wk_data_msg {
    struct wk_data_key key;
    int64_t sent_ns;    /* CLOCK_REALTIME ns at the sender's wk_data_send */
    int64_t arrived_ns; /* CLOCK_REALTIME ns when the receiver thread read it */
    size_t len;
    uint8_t data[]; /* len payload bytes */
};

typedef struct wk_data wk_data_t;

/* Binds the PULL socket on listen (e.g. "tcp://0.0.0.0:*") in zctx and
 * starts the receiver thread. The advertised address is the bound
 * endpoint, with the host part replaced by advertise_host when it bound to
 * every interface (0.0.0.0, *, [::]). Returns 0 or -errno with the reason
 * in err. */
int wk_data_create(void *zctx, const char *listen, const char *advertise_host, wk_data_t **out,
                   char *err, size_t errlen);

/* Stops and joins the receiver thread, closes every socket (each lingers
 * at most WK_DATA_LINGER_MS) and frees the buffer. */
void wk_data_destroy(wk_data_t *d);

/* The endpoint peers send to, e.g. "tcp://node3:40123". */
const char *wk_data_addr(const wk_data_t *d);

/* Starts a job attempt: buffered messages of older jobs or attempts are
 * dropped, as are those that arrive later; messages of this or a newer one
 * are kept. The PUSH sockets of an earlier job are closed (by the next
 * wk_data_send, on the sending thread). Clears the overflow that
 * wk_data_recv reports once every message the full buffer dropped belongs
 * to an older attempt. */
void wk_data_begin(wk_data_t *d, uint64_t job_id, uint32_t attempt);

/* Sends one message to the PULL socket at addr (connecting on first use).
 * Waits up to timeout_ms (0: not at all) for room in the peer's queue.
 * Returns 0, -ETIMEDOUT, -EMSGSIZE (payload too large) or -errno. */
int wk_data_send(wk_data_t *d, const char *addr, const struct wk_data_key *key, const void *payload,
                 size_t len, int timeout_ms);

/* Takes the message with this key from the buffer, waiting up to
 * timeout_ms (0: only what the receiver thread already read) for the
 * receiver thread to bring it. Returns 0 with *out set, -ETIMEDOUT,
 * -ENOBUFS when the buffer overflowed (a message was dropped, so the
 * attempt cannot finish: every later call that does not find its message
 * says so too, until wk_data_begin starts a newer attempt), or -errno (the
 * receiver thread stopped on that error). */
int wk_data_recv(wk_data_t *d, const struct wk_data_key *key, int timeout_ms,
                 struct wk_data_msg **out);

void wk_data_msg_free(struct wk_data_msg *m);

/* Counters for logs and tests. */
struct wk_data_stats {
    uint64_t sent;
    uint64_t received;   /* good frames read off the socket */
    uint64_t dropped;    /* of an older job or attempt */
    uint64_t bad;        /* frames that are not data-plane messages, or duplicates */
    uint64_t overflowed; /* dropped because the buffer was full (or out of memory) */
    size_t buffered;     /* waiting in the buffer now */
};
void wk_data_stats(const wk_data_t *d, struct wk_data_stats *out);

/* For tests: lowers (or raises) the buffer's bounds, by default
 * WK_DATA_BUFFER_MAX messages and WK_DATA_BUFFER_BYTES payload bytes. */
void wk_data_set_limits(wk_data_t *d, size_t max_msgs, size_t max_bytes);

/* "activation d3 stage 2 of step 5 (job 7, attempt 1)" style name; the
 * worker-level payloads name their layer and source rank too. */
void wk_data_key_name(const struct wk_data_key *key, char *buf, size_t len);

#endif
