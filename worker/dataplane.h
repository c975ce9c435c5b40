/* dataplane.h - the worker's data plane: small tagged messages between the
 * ranks of a job (activations and gradients).
 *
 * Each worker binds one ZeroMQ PULL socket (--data-listen) and advertises
 * its endpoint in Register.data_addr; it sends through PUSH sockets that
 * are connected lazily, one per peer address. A message is one frame: a
 * fixed little-endian header naming it (job, attempt, step, payload, path,
 * micro-batch, stage) and an optional byte payload (empty on the sim
 * backend). wk_data_recv waits for the message with a given key; messages
 * that arrive before their turn are kept in a bounded buffer, and messages
 * of an older job or attempt than the current one are dropped.
 *
 * Not thread-safe: one thread at a time uses a wk_data_t (the agent while
 * idle, the runtime thread while a job runs; thread create/join order the
 * hand-over). Only wk_data_addr, fixed at create, may be called from any
 * thread.
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

/* What names a message. payload: enum dp_payload (activation, gradient). */
struct wk_data_key {
    uint64_t job_id;
    uint32_t attempt;
    uint64_t step;
    int32_t payload;
    int32_t path;
    int32_t mb;
    int32_t stage;
};

/* A received message; release with wk_data_msg_free. */
struct wk_data_msg {
    struct wk_data_key key;
    size_t len;
    uint8_t data[]; /* len payload bytes */
};

typedef struct wk_data wk_data_t;

/* Binds the PULL socket on listen (e.g. "tcp://0.0.0.0:*") in zctx. The
 * advertised address is the bound endpoint, with the host part replaced by
 * advertise_host when it bound to every interface (0.0.0.0, *, [::]).
 * Returns 0 or -errno with the reason in err. */
int wk_data_create(void *zctx, const char *listen, const char *advertise_host, wk_data_t **out,
                   char *err, size_t errlen);

/* Closes every socket (each lingers at most WK_DATA_LINGER_MS) and frees
 * the buffer. */
void wk_data_destroy(wk_data_t *d);

/* The endpoint peers send to, e.g. "tcp://node3:40123". */
const char *wk_data_addr(const wk_data_t *d);

/* Starts a job attempt: buffered messages of older jobs or attempts are
 * dropped, as are those that arrive later; messages of this or a newer one
 * are kept. The PUSH sockets of an earlier job are closed. */
void wk_data_begin(wk_data_t *d, uint64_t job_id, uint32_t attempt);

/* Sends one message to the PULL socket at addr (connecting on first use).
 * Waits up to timeout_ms (0: not at all) for room in the peer's queue.
 * Returns 0, -ETIMEDOUT, -EMSGSIZE (payload too large) or -errno. */
int wk_data_send(wk_data_t *d, const char *addr, const struct wk_data_key *key, const void *payload,
                 size_t len, int timeout_ms);

/* Returns the message with this key: from the buffer, or by reading the
 * socket (buffering others) for up to timeout_ms (0: only what is already
 * there). Returns 0 with *out set, -ETIMEDOUT, -ENOBUFS when the buffer is
 * full before the message came, or -errno. */
int wk_data_recv(wk_data_t *d, const struct wk_data_key *key, int timeout_ms,
                 struct wk_data_msg **out);

void wk_data_msg_free(struct wk_data_msg *m);

/* Counters for logs and tests. */
struct wk_data_stats {
    uint64_t sent;
    uint64_t received; /* good frames read off the socket */
    uint64_t dropped;  /* of an older job or attempt */
    uint64_t bad;      /* frames that are not data-plane messages, or duplicates */
    size_t buffered;   /* waiting in the buffer now */
};
void wk_data_stats(const wk_data_t *d, struct wk_data_stats *out);

/* "activation d3 stage 2 of step 5 (job 7, attempt 1)" style name. */
void wk_data_key_name(const struct wk_data_key *key, char *buf, size_t len);

#endif
