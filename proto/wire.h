/* wire.h - envelopes over ZeroMQ sockets: the socket options every control
 * socket gets, and sending/receiving one envelope per frame.
 *
 * A DEALER (worker, duplexctl) sends and receives bare envelope frames; the
 * ROUTER in duplexd sees [routing id][envelope] and replies the same way.
 */
#ifndef DX_WIRE_H
#define DX_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/envelope.h"

/* How long a closing socket may keep trying to deliver queued messages. */
#define DX_WIRE_LINGER_MS 500

/* Whether a ZeroMQ endpoint can only be reached from this machine:
 * ipc://, inproc://, or tcp:// on a loopback address or localhost. */
bool dx_endpoint_is_local(const char *endpoint);

/* Sets linger and the frame size limit. Returns 0 or -errno. */
int dx_wire_setup(void *sock);

/* Encodes and sends one envelope without blocking; rid/rlen (may be NULL/0)
 * is the ROUTER's routing-id frame. Returns 0 or -errno (-EAGAIN when the
 * peer's queue is full or, with ZMQ_IMMEDIATE, nobody is connected;
 * -EHOSTUNREACH when a ROUTER's peer is gone). */
int dx_wire_send(void *sock, const uint8_t *rid, size_t rlen, Duplex__MsgType type,
                 uint64_t request_id, const ProtobufCMessage *body);

/* The same with pre-packed fields appended to the body (dx_env_encode_tail). */
int dx_wire_send_tail(void *sock, const uint8_t *rid, size_t rlen, Duplex__MsgType type,
                      uint64_t request_id, const ProtobufCMessage *body, const uint8_t *tail,
                      size_t tail_len);

/* Sends an Error envelope. */
int dx_wire_send_error(void *sock, const uint8_t *rid, size_t rlen, Duplex__ErrorCode code,
                       uint64_t request_id, const char *text);

/* Receives one whole message on a DEALER without blocking and decodes it.
 * Returns 0, -EAGAIN when nothing is waiting, -EPROTO (err filled) for a bad
 * message, or another -errno from ZeroMQ. */
int dx_wire_recv(void *sock, struct dx_msg *msg, struct dx_decode_error *err);

#endif
