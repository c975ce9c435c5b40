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
 * A receiver thread, started by wk_net_create, owns the PULL socket: it
 * reads every frame as soon as it arrives, stamps its arrival time and
 * keeps it in a bounded buffer until wk_net_recv asks for its key, so
 * communication proceeds while the caller computes.
 *
 * Attempts. wk_net_begin starts a job attempt and wk_net_end ends it;
 * between the two the attempt is current. Only frames of the current
 * attempt are buffered; every other frame is dropped and counted. Between
 * attempts (after wk_net_end, or before the first wk_net_begin) frames
 * of a later attempt than the last one are kept in a small early
 * allowance (a peer may start the attempt just before this rank does):
 * wk_net_begin takes those of its attempt and frees the rest. Both ends
 * free every message still buffered, so nothing outlives an attempt.
 *
 * Trust. Frames are checked before they are kept:
 *  - size: frames over the attempt's largest message (wk_net_set_max_msg)
 *    are refused by the receiver thread before it copies them (libzmq
 *    allocated them and frees them at once). libzmq itself refuses only
 *    frames over WK_NET_MAX_PAYLOAD (ZMQ_MAXMSGSIZE, set once at the only
 *    bind: a listener takes its options at bind, and binding again could
 *    lose the port to another process); with CURVE a frame over the
 *    attempt's size can only come from a listed (authenticated) peer;
 *  - bounds: the buffer holds at most wk_net_limits' messages and bytes,
 *    and each peer at most its share of them (a peer: the CURVE key of the
 *    connection, or in clear the peer's IP address). A frame that finds
 *    no room is dropped and the attempt fails (-ENOBUFS);
 *  - duplicates: a second frame with the key of a buffered or already
 *    received message, or of a step before the last one received, means
 *    one of the copies is not from the real sender: the attempt fails
 *    (-EEXIST; wk_net_failure names the key and both sources) instead of
 *    training on whichever came first;
 *  - keys (wk_net_create's keypair): the PULL socket is a CURVE server
 *    from its only bind, and the data plane's ZAP handler (RFC 27) admits
 *    only the keys wk_net_allow_peers lists. Connections whose key is not
 *    listed are refused while a list is set, and held while it is empty
 *    (see WK_NET_ZAP_HOLD_MS), so a peer that connects before this rank
 *    lists it waits with its frames in its own queue. Admission is per
 *    connection and connections stay open across attempts (the PULL
 *    socket is never bound again: that could lose the port), so every
 *    frame's key is checked against the list current when it arrives
 *    (while an attempt runs, or while a list is set), and an early frame
 *    that came on an open connection between attempts with no list set
 *    is checked when wk_net_begin takes it.
 * Without a keypair the data plane runs in clear, with the same checks
 * except the keys.
 *
 * Calls at an attempt (the runtime's order): wk_net_set_max_msg,
 * wk_net_set_peer_key for each peer, wk_net_allow_peers, wk_net_begin;
 * the sends and receives; wk_net_end (before the JobDone: no frame of a
 * later attempt can be on the way then).
 *
 * Thread safety: wk_net_send from one thread at a time, wk_net_recv from
 * one thread at a time (the two may be different threads, running
 * concurrently); wk_net_end from the sending thread, or while no send
 * runs; the other calls from any thread. wk_net_destroy once nothing else
 * uses the wk_net_t. A hand-over between threads (the agent while idle,
 * the runtime thread while a job runs) is ordered by thread create/join.
 * The data plane binds the ZAP endpoint of its ZeroMQ context when it has
 * a keypair: nothing else in that context may (the worker's agent is only
 * a CURVE client), and a second keyed data plane needs a context of its
 * own.
 */
#ifndef WK_NET_H
#define WK_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Where the PULL socket binds by default: a free port on loopback. */
#define WK_NET_LISTEN_DEFAULT "tcp://127.0.0.1:*"
/* The largest payload a message may carry (the frame adds the header). */
#define WK_NET_MAX_PAYLOAD (64 * 1024 * 1024)
/* The frame's header: what a message's payload adds on the wire. */
#define WK_NET_HEADER_BYTES 56
/* The attempt's buffer: messages and payload bytes, and one peer's share. */
#define WK_NET_BUFFER_MAX 65536
#define WK_NET_BUFFER_BYTES (256 * 1024 * 1024)
#define WK_NET_PEER_MAX (WK_NET_BUFFER_MAX / 2)
#define WK_NET_PEER_BYTES (WK_NET_BUFFER_BYTES / 2)
/* Between attempts: the early allowance for a later one, and a peer's share. */
#define WK_NET_EARLY_MAX 1024
#define WK_NET_EARLY_BYTES (64 * 1024 * 1024)
#define WK_NET_EARLY_PEER_MAX 256
#define WK_NET_EARLY_PEER_BYTES (32 * 1024 * 1024)
/* The longest endpoint string. */
#define WK_NET_ADDR_MAX 256
/* How long a closed socket keeps trying to deliver what it queued. */
#define WK_NET_LINGER_MS 1000
/* A CURVE key in Z85 (32 bytes), without the NUL. */
#define WK_NET_KEY_LEN 40
/* The ZAP domain of the data plane's CURVE server. */
#define WK_NET_ZAP_DOMAIN "duplex-data"
/* How long the ZAP handler holds a connection while no peer list is set,
 * and how many it holds at once (the oldest is forgotten when one more
 * comes). It is the PULL socket's ZMQ_HANDSHAKE_IVL: libzmq closes a
 * connection held that long, and the peer connects again (its frames wait
 * in its queue) and is held again. */
#define WK_NET_ZAP_HOLD_MS 10000
#define WK_NET_ZAP_HELD_MAX 64

/* Worker-level payload kinds, beyond enum dp_payload (DP_ACTIVATION,
 * DP_GRADIENT) of pipeline/schedule.h. For these, layer and src (the
 * sending rank) tell apart the messages of one micro-batch and stage. */
enum wk_net_payload {
    WK_NET_EP_DISPATCH = 16, /* tokens to an expert owner */
    WK_NET_EP_COMBINE = 17,  /* expert outputs back */
    WK_NET_EP_GRAD = 18,     /* output gradients to an owner */
    WK_NET_EP_DXG = 19,      /* input gradients back */
    WK_NET_SYNC_UP = 20,     /* gradient all-reduce: contribution to the root */
    WK_NET_SYNC_DOWN = 21,   /* the root's result */
    WK_NET_LINK_RING = 22,   /* an IPC ring's descriptor, to the neighbour sending into it */
};

/* What names a message: every field is part of the key. payload: enum
 * dp_payload or enum wk_net_payload. Build keys with designated
 * initializers; fields left out are 0. Step 0 is for messages outside the
 * steps (the IPC rings' descriptors); the steps count from 1. */
struct wk_net_key {
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

/* A received message; release with wk_net_msg_free. */
struct wk_net_msg {
    struct wk_net_key key;
    int64_t sent_ns;    /* CLOCK_REALTIME ns at the sender's wk_net_send */
    int64_t arrived_ns; /* CLOCK_REALTIME ns when the receiver thread read it */
    size_t len;
    uint8_t data[]; /* len payload bytes */
};

typedef struct wk_net wk_net_t;

/* The worker's CURVE keypair (Z85, as zmq_curve_keypair makes them). */
struct wk_net_keypair {
    const char *public_z85;
    const char *secret_z85;
    int zap_hold_ms; /* 0: WK_NET_ZAP_HOLD_MS (tests lower it) */
};

/* Binds the PULL socket on listen (e.g. "tcp://0.0.0.0:*") in zctx and
 * starts the receiver thread. The advertised address is the bound
 * endpoint, with the host part replaced by advertise_host when it bound to
 * every interface (0.0.0.0, *, [::]). The PULL socket is bound once, for
 * the data plane's life: binding again would free the port for a moment,
 * and another process may take it.
 *
 * With keys (NULL: clear), the PULL socket is a CURVE server from that
 * bind, behind the data plane's ZAP handler (bound on
 * inproc://zeromq.zap.01 in zctx), which admits no one until
 * wk_net_allow_peers; the PUSH sockets are CURVE clients presenting the
 * keypair. Returns 0 or -errno with the reason in err: -EINVAL (a key is
 * not 40 Z85 characters, or the public key is not the secret key's),
 * -ENOTSUP (libzmq without CURVE), -EADDRINUSE (another ZAP handler in
 * the context, or the endpoint is taken) or another -errno. */
int wk_net_create(void *zctx, const char *listen, const char *advertise_host,
                  const struct wk_net_keypair *keys, wk_net_t **out, char *err, size_t errlen);

/* Stops and joins the receiver thread, closes every socket (each lingers
 * at most WK_NET_LINGER_MS) and frees the buffer. */
void wk_net_destroy(wk_net_t *d);

/* The endpoint peers send to, e.g. "tcp://node3:40123". */
const char *wk_net_addr(const wk_net_t *d);

/* True when wk_net_create was given a keypair. */
bool wk_net_curve(const wk_net_t *d);

/* The keys (Z85) whose connections the ZAP handler admits from now on,
 * replacing the list: the current assignment's peers. An empty list (as
 * wk_net_end leaves it) admits no one and holds new connections (frames
 * of a later attempt on connections still open are kept early, and
 * checked at wk_net_begin); a set one refuses every other key, and frames
 * from connections made with an unlisted key are dropped from now on
 * (and at wk_net_begin, the early ones). Without a keypair the list is
 * kept but unused. Returns 0, -EINVAL (a key is not valid: none is taken)
 * or -ENOMEM. */
int wk_net_allow_peers(wk_net_t *d, const char *const *public_z85, size_t n);

/* The CURVE public key (Z85) of the worker at addr, for wk_net_send's
 * PUSH socket to it; kept until wk_net_end. Unused without a keypair.
 * Returns 0, -EINVAL (not a valid key, or addr too long) or -ENOMEM. */
int wk_net_set_peer_key(wk_net_t *d, const char *addr, const char *public_z85);

/* The largest payload the coming attempt's messages have (clamped to
 * WK_NET_MAX_PAYLOAD); the receiver thread refuses larger frames after
 * receipt (counted as oversize; see Trust above) until wk_net_end. The
 * listener's ZMQ_MAXMSGSIZE stays what it was bound with. Returns 0. */
int wk_net_set_max_msg(wk_net_t *d, size_t bytes);

/* Starts a job attempt: ends the previous one if wk_net_end did not, and
 * takes the early frames of this attempt (see Attempts above; an early
 * frame of it that found no room makes wk_net_recv report -ENOBUFS). The
 * PUSH sockets of an earlier job are closed (by the next wk_net_send, on
 * the sending thread). */
void wk_net_begin(wk_net_t *d, uint64_t job_id, uint32_t attempt);

/* Ends the current attempt: frees every buffered message (buffered bytes
 * go back to 0), forgets the peer list and keys and the largest message,
 * closes the PUSH sockets (each lingering to deliver what it queued). The
 * connections to the PULL socket stay open: a frame that comes on one is
 * checked against the peer list current when it arrives (or, kept early,
 * when wk_net_begin takes it). Call it from the sending thread, or while
 * no send runs, before saying the attempt ended. */
void wk_net_end(wk_net_t *d);

/* Sends one message to the PULL socket at addr (connecting on first use;
 * with CURVE, as a client of the key wk_net_set_peer_key gave for addr).
 * Waits up to timeout_ms (0: not at all) for room in the peer's queue.
 * Returns 0, -ETIMEDOUT, -EMSGSIZE (payload too large), -ENOKEY (CURVE
 * and no key for addr) or -errno. */
int wk_net_send(wk_net_t *d, const char *addr, const struct wk_net_key *key, const void *payload,
                size_t len, int timeout_ms);

/* Takes the message with this key from the buffer, waiting up to
 * timeout_ms (0: only what the receiver thread already read) for the
 * receiver thread to bring it. Returns 0 with *out set, -ETIMEDOUT,
 * -EEXIST when a duplicate of one of the attempt's messages arrived (every
 * later call says so too, until the next attempt), -ENOBUFS when a message
 * of the attempt was dropped for want of room (every later call that does
 * not find its message says so too), or -errno (the receiver thread
 * stopped on that error). wk_net_failure says why for -EEXIST and
 * -ENOBUFS. */
int wk_net_recv(wk_net_t *d, const struct wk_net_key *key, int timeout_ms, struct wk_net_msg **out);

/* Why the current attempt's receives fail (-EEXIST, -ENOBUFS), naming the
 * message and its sources, e.g. "a second activation d0 stage 1 of step 5
 * (job 7, attempt 1) came from 10.0.0.4 (the first from 10.0.0.3)"; "" when
 * they do not. */
void wk_net_failure(wk_net_t *d, char *buf, size_t len);

void wk_net_msg_free(struct wk_net_msg *m);

/* Counters for logs and tests: frames, then refusals by kind. */
struct wk_net_stats {
    uint64_t sent;
    uint64_t received;         /* data-plane frames read off the socket (of any attempt) */
    uint64_t early;            /* of them, kept between attempts for a later one */
    uint64_t dropped;          /* not of the current attempt (or, early, not of the next) */
    uint64_t bad;              /* frames that are not data-plane messages */
    uint64_t duplicates;       /* a second frame with a message's key: the attempt fails */
    uint64_t oversize;         /* over the attempt's largest message (seen by the receiver) */
    uint64_t overflowed;       /* the buffer (or the early allowance) was full, or out of memory */
    uint64_t peer_overflowed;  /* the sending peer's share of it was full */
    uint64_t unallowed;        /* from a connection whose CURVE key is not listed (any more) */
    uint64_t refused;          /* connections the ZAP handler refused (400, 500) */
    uint64_t held;             /* connections it held, while no peer list was set */
    uint64_t handshake_failed; /* connections whose handshake failed (clear to CURVE, bad key) */
    uint64_t disconnected;     /* connections closed (by the peer, or by libzmq: a frame
                                * over ZMQ_MAXMSGSIZE, a handshake that failed) */
    uint64_t binds;            /* zmq_bind calls on the PULL socket: 1 for its life */
    size_t buffered;           /* messages waiting now (the attempt's and early ones) */
    size_t buffered_bytes;     /* their payload bytes */
};
void wk_net_stats(const wk_net_t *d, struct wk_net_stats *out);

/* The buffer's bounds, and how long the ZAP handler holds a connection
 * (the defaults are the WK_NET_* limits above). */
struct wk_net_limits {
    size_t msgs, bytes;                       /* the attempt's messages */
    size_t peer_msgs, peer_bytes;             /* of them, from one peer */
    size_t early_msgs, early_bytes;           /* between attempts, of a later one */
    size_t early_peer_msgs, early_peer_bytes; /* of them, from one peer */
    int zap_hold_ms; /* the keypair's (WK_NET_ZAP_HOLD_MS): fixed at the bind */
};
void wk_net_get_limits(const wk_net_t *d, struct wk_net_limits *out);
/* For tests: lowers (or raises) them; zap_hold_ms is left as it is. */
void wk_net_set_limits(wk_net_t *d, const struct wk_net_limits *l);

/* "activation d3 stage 2 of step 5 (job 7, attempt 1)" style name; the
 * worker-level payloads name their layer and source rank too. */
void wk_net_key_name(const struct wk_net_key *key, char *buf, size_t len);

#endif
