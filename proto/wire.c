/* wire.c - envelopes over ZeroMQ sockets (see wire.h). */
#include "proto/wire.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

bool dx_endpoint_is_local(const char *endpoint)
{
    const char *host;

    if (strncmp(endpoint, "ipc://", 6) == 0 || strncmp(endpoint, "inproc://", 9) == 0)
        return true;
    if (strncmp(endpoint, "tcp://", 6) != 0)
        return false;
    host = endpoint + 6;
    return strncmp(host, "127.", 4) == 0 || strncmp(host, "localhost:", 10) == 0 ||
           strncmp(host, "[::1]:", 6) == 0;
}

int dx_wire_setup(void *sock)
{
    int linger = DX_WIRE_LINGER_MS;
    int64_t maxsize = DX_MAX_MSG_SIZE;

    if (zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxsize, sizeof(maxsize)) < 0)
        return -errno;
    return 0;
}

static int wire_send_frames(void *sock, const uint8_t *rid, size_t rlen, const uint8_t *buf,
                            size_t len)
{
    if (rid && zmq_send(sock, rid, rlen, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return -errno;
    if (zmq_send(sock, buf, len, ZMQ_DONTWAIT) < 0)
        return -errno;
    return 0;
}

int dx_wire_send(void *sock, const uint8_t *rid, size_t rlen, Duplex__MsgType type,
                 uint64_t request_id, const ProtobufCMessage *body)
{
    return dx_wire_send_tail(sock, rid, rlen, type, request_id, body, NULL, 0);
}

int dx_wire_send_tail(void *sock, const uint8_t *rid, size_t rlen, Duplex__MsgType type,
                      uint64_t request_id, const ProtobufCMessage *body, const uint8_t *tail,
                      size_t tail_len)
{
    uint8_t *buf;
    size_t len;
    int rc = dx_env_encode_tail(type, request_id, body, tail, tail_len, &buf, &len);

    if (rc < 0)
        return rc;
    rc = wire_send_frames(sock, rid, rlen, buf, len);
    free(buf);
    return rc;
}

int dx_wire_send_error(void *sock, const uint8_t *rid, size_t rlen, Duplex__ErrorCode code,
                       uint64_t request_id, const char *text)
{
    Duplex__Error e = DUPLEX__ERROR__INIT;

    e.code = code;
    e.text = (char *)text;
    return dx_wire_send(sock, rid, rlen, DUPLEX__MSG_TYPE__MSG_ERROR, request_id, &e.base);
}

int dx_wire_recv(void *sock, struct dx_msg *msg, struct dx_decode_error *err)
{
    zmq_msg_t frame;
    int more = 0, frames = 0, rc;
    size_t more_len = sizeof(more);

    zmq_msg_init(&frame);
    if (zmq_msg_recv(&frame, sock, ZMQ_DONTWAIT) < 0) {
        rc = -errno;
        zmq_msg_close(&frame);
        return rc;
    }
    frames = 1;
    zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &more_len);
    while (more) {
        /* drain the rest of a multi-frame message so the next recv is aligned */
        zmq_msg_t extra;
        zmq_msg_init(&extra);
        if (zmq_msg_recv(&extra, sock, 0) < 0) {
            zmq_msg_close(&extra);
            break;
        }
        frames++;
        more = zmq_msg_more(&extra);
        zmq_msg_close(&extra);
    }
    if (frames != 1) {
        memset(msg, 0, sizeof(*msg));
        err->code = DUPLEX__ERROR_CODE__ERROR_MALFORMED;
        err->request_id = 0;
        snprintf(err->text, sizeof(err->text), "expected 1 frame, got %d", frames);
        rc = -EPROTO;
    } else {
        rc = dx_env_decode(zmq_msg_data(&frame), zmq_msg_size(&frame), msg, err);
    }
    zmq_msg_close(&frame);
    return rc;
}
