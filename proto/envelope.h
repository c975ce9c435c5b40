/* envelope.h - the one frame format of the control plane.
 *
 * Every control message is a single ZeroMQ frame holding a duplex.Envelope
 * (proto/duplex.proto): protocol version, message type, request id and the
 * serialized body. This module encodes envelopes and decodes bytes from the
 * network without trusting them: size limit, version, type, body and the
 * fields' own rules are all checked, and every rejection comes back as an
 * error code and a text that can be sent to the peer or logged.
 */
#ifndef DX_ENVELOPE_H
#define DX_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

#include "proto/duplex.pb-c.h"

/* 2 since issue 15: an Assignment's peers are only the ranks it talks to
 * (a version-1 worker refuses that) and a worker relies on its shared_gpu
 * (a version-1 duplexd sends none). */
#define DX_PROTOCOL_VERSION 2
/* The largest control frame accepted (also set as ZMQ_MAXMSGSIZE). */
#define DX_MAX_MSG_SIZE (4 * 1024 * 1024)
/* Bounds on the strings in control messages. */
#define DX_MAX_ID_LEN 128
#define DX_MAX_NAME_LEN 255
#define DX_MAX_CAPABILITIES 64
#define DX_MAX_SETS 64
#define DX_MAX_RANKS 4096
#define DX_MAX_COST_MS 600000
#define DX_MAX_SPEC_LEN (64 * 1024)      /* a job spec in an Assignment */
#define DX_MAX_PATH_LEN 4096             /* a checkpoint directory */
#define DX_MAX_GPU_INDEX 1023            /* a GPU index on its node */
#define DX_NCCL_ID_BYTES 128             /* Assignment.nccl_id: empty or an ncclUniqueId */
#define DX_MAX_MEMORY_BYTES (1ULL << 50) /* Register.memory_bytes: at most 1 PiB */

/* A decoded message: the body is the protobuf-c message of `type`. */
struct dx_msg {
    Duplex__MsgType type;
    uint64_t request_id;
    ProtobufCMessage *body;
};

/* Why a decode failed: the code for an Error reply and a text naming the
 * problem (the field, the limit, the value). */
struct dx_decode_error {
    Duplex__ErrorCode code;
    uint64_t request_id; /* 0 when the envelope itself could not be read */
    char text[256];
};

/* Serializes body (which must match type; NULL means an empty body) into a
 * malloc'd buffer. Returns 0, -EINVAL for a type/body mismatch or -ENOMEM. */
int dx_env_encode(Duplex__MsgType type, uint64_t request_id, const ProtobufCMessage *body,
                  uint8_t **buf, size_t *len);

/* The same with tail (tail_len bytes, may be NULL/0) appended to the
 * packed body: fields of the body's message type packed once elsewhere
 * (e.g. the peers every Assignment of a job carries), which a decoder
 * merges into the body as if they were packed with it. */
int dx_env_encode_tail(Duplex__MsgType type, uint64_t request_id, const ProtobufCMessage *body,
                       const uint8_t *tail, size_t tail_len, uint8_t **buf, size_t *len);

/* Decodes and checks one frame. Returns 0 and fills msg (release it with
 * dx_msg_clear), or -EPROTO and fills err. */
int dx_env_decode(const uint8_t *buf, size_t len, struct dx_msg *msg, struct dx_decode_error *err);

void dx_msg_clear(struct dx_msg *msg);

/* Worker ids (like host, node and capability names) appear in files, logs
 * and tables: 1..DX_MAX_ID_LEN letters, digits and "._:@-". Returns 0 or
 * -EINVAL with the reason in text. */
int dx_worker_id_check(const char *id, char *text, size_t len);

/* "Register", "Heartbeat", ... or "unknown". */
const char *dx_msg_type_name(Duplex__MsgType type);

/* "TOO_LARGE", "MALFORMED", ... */
const char *dx_error_code_name(Duplex__ErrorCode code);

#endif
