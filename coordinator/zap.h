/* zap.h - duplexd's ZAP handler (ZeroMQ RFC 27): the CURVE handshake of
 * every connection to duplexd's ROUTER asks it whether the client's public
 * key may connect. It answers from the allow-list (proto/authz.h):
 * a listed key is accepted with the key itself as the connection's
 * User-Id (zmq_msg_gets(msg, "User-Id") on every message), so that each
 * message is checked against the allow-list current when it arrives.
 *
 * The handler is a REP socket on inproc://zeromq.zap.01 in duplexd's
 * context, served from the event loop. It must exist before the CURVE
 * server binds: without a ZAP handler libzmq accepts every key.
 */
#ifndef COORD_ZAP_H
#define COORD_ZAP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "proto/authz.h"

#define COORD_ZAP_ENDPOINT "inproc://zeromq.zap.01"

typedef struct coord_zap coord_zap_t;

/* Binds the handler in zctx and watches it from loop. authz is borrowed
 * (replace it with coord_zap_set_authz). Returns 0 or -errno with err. */
int coord_zap_create(uv_loop_t *loop, void *zctx, const dx_authz_t *authz, coord_zap_t **out,
                     char *err, size_t errlen);

void coord_zap_destroy(coord_zap_t *z);

/* The allow-list that answers from now on (after a SIGHUP reload). */
void coord_zap_set_authz(coord_zap_t *z, const dx_authz_t *authz);

struct coord_zap_stats {
    uint64_t accepted;
    uint64_t refused;
    uint64_t malformed; /* requests that were not ZAP 1.0 */
};
void coord_zap_stats(const coord_zap_t *z, struct coord_zap_stats *out);

/* Answers one request (frames as received) for tests and the loop:
 * fills the reply's status code ("200", "400" or "500"), text and user id.
 * Returns 0, or -EPROTO when the request is malformed (then status 500). */
struct coord_zap_reply {
    char status[4];
    char text[128];
    char user_id[64];
};
int coord_zap_decide(const dx_authz_t *authz, const void *const *frames, const size_t *sizes,
                     size_t n, struct coord_zap_reply *out);

#endif
