/* client.h - duplexctl's request/reply link to duplexd: a DEALER socket
 * (a CURVE client with keys), a request id per call, and a deadline on
 * every answer; a refused handshake is said at once rather than timed out. */
#ifndef CTL_CLIENT_H
#define CTL_CLIENT_H

#include <stddef.h>

#include "proto/envelope.h"

typedef struct ctl_client ctl_client_t;

struct ctl_globals;

/* Connects to g->coordinator, with CURVE when g names keys (refused in
 * clear unless g->insecure). Returns 0 or -errno with err. */
int ctl_client_create(const struct ctl_globals *g, int timeout_ms, ctl_client_t **out, char *err,
                      size_t errlen);

/* Sends one request and waits for the reply carrying its request id.
 * Returns 0 with *reply of reply_type (release it with dx_msg_clear),
 * -ETIMEDOUT when duplexd did not answer in time, or -EPROTO when it answered
 * with an Error or something unexpected; err says which. */
int ctl_client_call(ctl_client_t *c, Duplex__MsgType type, const ProtobufCMessage *body,
                    Duplex__MsgType reply_type, struct dx_msg *reply, char *err, size_t errlen);

/* Every worker duplexd knows, fetched page by page (ListWorkers), in id
 * order: workers[0..n) point into the pages' replies. */
struct ctl_workers {
    struct dx_msg *pages;
    size_t n_pages;
    Duplex__WorkerInfo **workers;
    size_t n;
};

/* Fills *out (release it with ctl_workers_clear). page: workers per
 * request (0: duplexd's largest). Returns 0 or -errno with err. */
int ctl_workers_fetch(ctl_client_t *c, unsigned page, struct ctl_workers *out, char *err,
                      size_t errlen);
void ctl_workers_clear(struct ctl_workers *w);

void ctl_client_destroy(ctl_client_t *c);

#endif
