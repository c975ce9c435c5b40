/* test_envelope.c - envelope round trips for every type and every decode rejection. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "proto/envelope.h"

/* ---- helpers -------------------------------------------------------------- */

/* Encodes with dx_env_encode and decodes the result; the decode must succeed. */
static void round_trip(Duplex__MsgType type, uint64_t rid, const ProtobufCMessage *body,
                       struct dx_msg *out)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    struct dx_decode_error err;
    int rc;

    cr_assert_eq(dx_env_encode(type, rid, body, &buf, &len), 0, "encode %s",
                 dx_msg_type_name(type));
    cr_assert_not_null(buf);
    cr_assert_gt(len, 0);
    rc = dx_env_decode(buf, len, out, &err);
    free(buf);
    cr_assert_eq(rc, 0, "decode %s failed: %s %s", dx_msg_type_name(type),
                 dx_error_code_name(err.code), err.text);
    cr_assert_eq(out->type, type);
    cr_assert_eq(out->request_id, rid);
    cr_assert_not_null(out->body);
}

/* Packs a raw Envelope (any version, type, body bytes) into a malloc'd buffer. */
static uint8_t *pack_raw(uint32_t version, int type, uint64_t rid, const uint8_t *body,
                         size_t body_len, size_t *len)
{
    Duplex__Envelope env = DUPLEX__ENVELOPE__INIT;
    uint8_t *buf;

    env.version = version;
    env.type = (Duplex__MsgType)type;
    env.request_id = rid;
    env.body.data = (uint8_t *)body;
    env.body.len = body_len;
    *len = duplex__envelope__get_packed_size(&env);
    buf = malloc(*len ? *len : 1);
    cr_assert_not_null(buf);
    cr_assert_eq(duplex__envelope__pack(&env, buf), *len);
    return buf;
}

/* Packs a body message into a raw envelope of this version and the given type. */
static uint8_t *pack_msg(int type, uint64_t rid, const ProtobufCMessage *body, size_t *len)
{
    size_t blen = protobuf_c_message_get_packed_size(body);
    uint8_t *b = malloc(blen ? blen : 1);
    uint8_t *out;

    cr_assert_not_null(b);
    protobuf_c_message_pack(body, b);
    out = pack_raw(DX_PROTOCOL_VERSION, type, rid, b, blen, len);
    free(b);
    return out;
}

/* Decodes buf and expects a rejection with code, whose text contains word. */
static void expect_reject(const uint8_t *buf, size_t len, Duplex__ErrorCode code, const char *word,
                          struct dx_decode_error *err_out)
{
    struct dx_msg msg;
    struct dx_decode_error err;
    int rc;

    memset(&err, 0x5a, sizeof(err));
    err.text[sizeof(err.text) - 1] = '\0';
    rc = dx_env_decode(buf, len, &msg, &err);
    cr_assert_eq(rc, -EPROTO, "expected -EPROTO (%s), got %d", dx_error_code_name(code), rc);
    cr_assert_eq(err.code, code, "expected %s, got %s (%s)", dx_error_code_name(code),
                 dx_error_code_name(err.code), err.text);
    cr_assert_not_null(strstr(err.text, word), "error text \"%s\" does not mention \"%s\"",
                       err.text, word);
    cr_assert_null(msg.body, "a rejected message must leave no body");
    if (err_out)
        *err_out = err;
}

/* A valid Register body, with fields that tests may break. */
static char *good_caps[] = {"fp16", "nvlink", "sm_90"};

static Duplex__Register good_register(void)
{
    Duplex__Register m = DUPLEX__REGISTER__INIT;
    m.worker_id = "node3-gpu5";
    m.host = "node3.example.org";
    m.node = "rack1";
    m.gpu_index = 5;
    m.backend = "cuda";
    m.capabilities = good_caps;
    m.n_capabilities = 3;
    m.pid = 4242;
    return m;
}

/* Encodes a Register via dx_env_encode and expects INVALID mentioning word. */
static void expect_register_invalid(const Duplex__Register *m, const char *word)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    struct dx_decode_error err;

    cr_assert_eq(dx_env_encode(DUPLEX__MSG_TYPE__MSG_REGISTER, 77, &m->base, &buf, &len), 0);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, word, &err);
    cr_assert_eq(err.request_id, 77, "request id of an invalid message is kept");
    cr_assert_not_null(strstr(err.text, "Register"), "text \"%s\" names the type", err.text);
    free(buf);
}

static void expect_register_ok(const Duplex__Register *m)
{
    struct dx_msg msg;
    round_trip(DUPLEX__MSG_TYPE__MSG_REGISTER, 1, &m->base, &msg);
    dx_msg_clear(&msg);
}

/* ---- round trips --------------------------------------------------------- */

Test(envelope, register_round_trip)
{
    Duplex__Register in = good_register();
    struct dx_msg msg;
    const Duplex__Register *out;

    round_trip(DUPLEX__MSG_TYPE__MSG_REGISTER, 0x1122334455667788ULL, &in.base, &msg);
    cr_assert_eq(msg.body->descriptor, &duplex__register__descriptor);
    out = (const Duplex__Register *)msg.body;
    cr_assert_str_eq(out->worker_id, "node3-gpu5");
    cr_assert_str_eq(out->host, "node3.example.org");
    cr_assert_str_eq(out->node, "rack1");
    cr_assert_eq(out->gpu_index, 5);
    cr_assert_str_eq(out->backend, "cuda");
    cr_assert_eq(out->n_capabilities, 3);
    cr_assert_str_eq(out->capabilities[0], "fp16");
    cr_assert_str_eq(out->capabilities[1], "nvlink");
    cr_assert_str_eq(out->capabilities[2], "sm_90");
    cr_assert_eq(out->pid, 4242);
    dx_msg_clear(&msg);
    cr_assert_null(msg.body, "dx_msg_clear resets the message");
    cr_assert_eq(msg.request_id, 0);
}

Test(envelope, register_ack_round_trip)
{
    Duplex__RegisterAck in = DUPLEX__REGISTER_ACK__INIT;
    struct dx_msg msg;
    const Duplex__RegisterAck *out;

    in.session_id = "0123456789abcdef0123456789abcdef";
    in.heartbeat_interval_ms = 1000;
    in.dead_after_ms = 5000;
    round_trip(DUPLEX__MSG_TYPE__MSG_REGISTER_ACK, 2, &in.base, &msg);
    out = (const Duplex__RegisterAck *)msg.body;
    cr_assert_str_eq(out->session_id, in.session_id);
    cr_assert_eq(out->heartbeat_interval_ms, 1000);
    cr_assert_eq(out->dead_after_ms, 5000);
    dx_msg_clear(&msg);
}

Test(envelope, heartbeat_round_trip)
{
    Duplex__Heartbeat in = DUPLEX__HEARTBEAT__INIT;
    struct dx_msg msg;
    const Duplex__Heartbeat *out;

    in.worker_id = "w-1";
    in.session_id = "abc";
    in.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY;
    in.job_id = 99;
    in.step = 123456789012ULL;
    round_trip(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, 3, &in.base, &msg);
    out = (const Duplex__Heartbeat *)msg.body;
    cr_assert_str_eq(out->worker_id, "w-1");
    cr_assert_str_eq(out->session_id, "abc");
    cr_assert_eq(out->activity, DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY);
    cr_assert_eq(out->job_id, 99);
    cr_assert_eq(out->step, 123456789012ULL);
    dx_msg_clear(&msg);
}

Test(envelope, goodbye_round_trip)
{
    Duplex__Goodbye in = DUPLEX__GOODBYE__INIT;
    struct dx_msg msg;
    const Duplex__Goodbye *out;

    in.worker_id = "w.2@x:y_z";
    in.session_id = "s";
    in.reason = "shutting down";
    round_trip(DUPLEX__MSG_TYPE__MSG_GOODBYE, 4, &in.base, &msg);
    out = (const Duplex__Goodbye *)msg.body;
    cr_assert_str_eq(out->worker_id, "w.2@x:y_z");
    cr_assert_str_eq(out->session_id, "s");
    cr_assert_str_eq(out->reason, "shutting down");
    dx_msg_clear(&msg);
}

Test(envelope, error_round_trip)
{
    Duplex__Error in = DUPLEX__ERROR__INIT;
    struct dx_msg msg;
    const Duplex__Error *out;

    in.code = DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED;
    in.text = "who are you?";
    round_trip(DUPLEX__MSG_TYPE__MSG_ERROR, 5, &in.base, &msg);
    out = (const Duplex__Error *)msg.body;
    cr_assert_eq(out->code, DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED);
    cr_assert_str_eq(out->text, "who are you?");
    dx_msg_clear(&msg);
}

Test(envelope, list_workers_empty_body_round_trip)
{
    Duplex__ListWorkers lw = DUPLEX__LIST_WORKERS__INIT;
    struct dx_msg msg;

    /* NULL body means an empty body */
    round_trip(DUPLEX__MSG_TYPE__MSG_LIST_WORKERS, 6, NULL, &msg);
    cr_assert_eq(msg.body->descriptor, &duplex__list_workers__descriptor);
    dx_msg_clear(&msg);
    /* and so does an (empty) ListWorkers message */
    round_trip(DUPLEX__MSG_TYPE__MSG_LIST_WORKERS, 0, &lw.base, &msg);
    cr_assert_eq(msg.body->descriptor, &duplex__list_workers__descriptor);
    dx_msg_clear(&msg);
}

Test(envelope, list_workers_reply_round_trip)
{
    Duplex__WorkerInfo a = DUPLEX__WORKER_INFO__INIT, b = DUPLEX__WORKER_INFO__INIT;
    Duplex__WorkerInfo *ws[2] = {&a, &b};
    Duplex__ListWorkersReply in = DUPLEX__LIST_WORKERS_REPLY__INIT;
    char *caps[] = {"x", "y"};
    struct dx_msg msg;
    const Duplex__ListWorkersReply *out;

    a.worker_id = "a";
    a.host = "h1";
    a.node = "n1";
    a.gpu_index = 0;
    a.backend = "cpu";
    a.state = "alive";
    a.heartbeat_age_ms = 12;
    a.pid = 10;
    a.capabilities = caps;
    a.n_capabilities = 2;
    a.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE;
    b.worker_id = "b";
    b.host = "h2";
    b.node = "n2";
    b.gpu_index = 7;
    b.backend = "cuda";
    b.state = "lost";
    b.heartbeat_age_ms = -1;
    b.pid = 20;
    b.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY;
    b.job_id = 5;
    b.step = 6;
    in.workers = ws;
    in.n_workers = 2;

    round_trip(DUPLEX__MSG_TYPE__MSG_LIST_WORKERS_REPLY, UINT64_MAX, &in.base, &msg);
    out = (const Duplex__ListWorkersReply *)msg.body;
    cr_assert_eq(out->n_workers, 2);
    cr_assert_str_eq(out->workers[0]->worker_id, "a");
    cr_assert_str_eq(out->workers[0]->host, "h1");
    cr_assert_str_eq(out->workers[0]->node, "n1");
    cr_assert_str_eq(out->workers[0]->backend, "cpu");
    cr_assert_str_eq(out->workers[0]->state, "alive");
    cr_assert_eq(out->workers[0]->heartbeat_age_ms, 12);
    cr_assert_eq(out->workers[0]->pid, 10);
    cr_assert_eq(out->workers[0]->n_capabilities, 2);
    cr_assert_str_eq(out->workers[0]->capabilities[1], "y");
    cr_assert_eq(out->workers[0]->activity, DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE);
    cr_assert_str_eq(out->workers[1]->worker_id, "b");
    cr_assert_eq(out->workers[1]->gpu_index, 7);
    cr_assert_str_eq(out->workers[1]->state, "lost");
    cr_assert_eq(out->workers[1]->heartbeat_age_ms, -1);
    cr_assert_eq(out->workers[1]->n_capabilities, 0);
    cr_assert_eq(out->workers[1]->activity, DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY);
    cr_assert_eq(out->workers[1]->job_id, 5);
    cr_assert_eq(out->workers[1]->step, 6);
    dx_msg_clear(&msg);
}

Test(envelope, limits_accepted_at_the_boundary)
{
    Duplex__Register m = good_register();
    char id[DX_MAX_ID_LEN + 1];
    char *caps[DX_MAX_CAPABILITIES];

    memset(id, 'a', DX_MAX_ID_LEN);
    id[DX_MAX_ID_LEN] = '\0';
    m.worker_id = id;
    expect_register_ok(&m);

    m = good_register();
    m.gpu_index = 0;
    expect_register_ok(&m);
    m.gpu_index = 1023;
    expect_register_ok(&m);

    m = good_register();
    for (int i = 0; i < DX_MAX_CAPABILITIES; i++)
        caps[i] = "cap";
    m.capabilities = caps;
    m.n_capabilities = DX_MAX_CAPABILITIES;
    expect_register_ok(&m);

    m = good_register();
    m.node = ""; /* node may be empty */
    m.pid = 0;
    m.backend = "sim";
    expect_register_ok(&m);
    m.backend = "cpu";
    expect_register_ok(&m);
}

/* ---- encode errors and names ----------------------------------------------- */

Test(envelope, encode_rejects_wrong_descriptor)
{
    Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;
    Duplex__Register reg = good_register();
    uint8_t *buf = NULL;
    size_t len = 0;

    cr_assert_eq(dx_env_encode(DUPLEX__MSG_TYPE__MSG_REGISTER, 1, &hb.base, &buf, &len), -EINVAL);
    cr_assert_null(buf);
    cr_assert_eq(dx_env_encode(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, 1, &reg.base, &buf, &len), -EINVAL);
    cr_assert_null(buf);
    cr_assert_eq(dx_env_encode(DUPLEX__MSG_TYPE__MSG_TYPE_UNSPECIFIED, 1, NULL, &buf, &len),
                 -EINVAL);
    cr_assert_eq(dx_env_encode((Duplex__MsgType)200, 1, NULL, &buf, &len), -EINVAL);
    cr_assert_null(buf);
}

Test(envelope, type_names)
{
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_REGISTER), "Register");
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_REGISTER_ACK), "RegisterAck");
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_HEARTBEAT), "Heartbeat");
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_GOODBYE), "Goodbye");
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_ERROR), "Error");
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_LIST_WORKERS), "ListWorkers");
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_LIST_WORKERS_REPLY),
                     "ListWorkersReply");
    cr_assert_str_eq(dx_msg_type_name(DUPLEX__MSG_TYPE__MSG_TYPE_UNSPECIFIED), "unknown");
    cr_assert_str_eq(dx_msg_type_name((Duplex__MsgType)200), "unknown");
}

Test(envelope, error_code_names)
{
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED), "UNSPECIFIED");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_TOO_LARGE), "TOO_LARGE");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_MALFORMED), "MALFORMED");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_BAD_VERSION), "BAD_VERSION");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_UNKNOWN_TYPE), "UNKNOWN_TYPE");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_BAD_BODY), "BAD_BODY");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_INVALID), "INVALID");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_UNEXPECTED), "UNEXPECTED");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED),
                     "NOT_REGISTERED");
    cr_assert_str_eq(dx_error_code_name(DUPLEX__ERROR_CODE__ERROR_SESSION_REPLACED),
                     "SESSION_REPLACED");
    cr_assert_str_eq(dx_error_code_name((Duplex__ErrorCode)999), "UNKNOWN");
}

/* ---- frame-level rejections ------------------------------------------------ */

Test(envelope, empty_frame_is_malformed)
{
    uint8_t byte = 0;
    struct dx_decode_error err;

    expect_reject(&byte, 0, DUPLEX__ERROR_CODE__ERROR_MALFORMED, "empty", &err);
    cr_assert_eq(err.request_id, 0);
}

Test(envelope, oversized_frame_is_too_large)
{
    uint8_t *big = calloc(DX_MAX_MSG_SIZE + 1, 1);
    struct dx_decode_error err;

    cr_assert_not_null(big);
    expect_reject(big, DX_MAX_MSG_SIZE + 1, DUPLEX__ERROR_CODE__ERROR_TOO_LARGE, "limit", &err);
    cr_assert_eq(err.request_id, 0);
    free(big);
}

Test(envelope, garbage_is_malformed)
{
    /* invalid wire type 7 */
    static const uint8_t g1[] = {0x0f, 0x01, 0x02};
    /* an 11-byte varint (longer than any valid one) */
    static const uint8_t g2[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff,
                                 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    /* body field claiming 100 bytes with 3 present */
    static const uint8_t g3[] = {0x08, 0x01, 0x22, 0x64, 'a', 'b', 'c'};
    /* field number 0 */
    static const uint8_t g4[] = {0x00, 0x00};
    const char text[] = "GET / HTTP/1.1\r\nHost: example\r\n\r\n";
    struct dx_decode_error err;

    expect_reject(g1, sizeof(g1), DUPLEX__ERROR_CODE__ERROR_MALFORMED, "not a duplex Envelope",
                  &err);
    cr_assert_eq(err.request_id, 0);
    expect_reject(g2, sizeof(g2), DUPLEX__ERROR_CODE__ERROR_MALFORMED, "Envelope", NULL);
    expect_reject(g3, sizeof(g3), DUPLEX__ERROR_CODE__ERROR_MALFORMED, "Envelope", NULL);
    expect_reject(g4, sizeof(g4), DUPLEX__ERROR_CODE__ERROR_MALFORMED, "Envelope", NULL);
    expect_reject((const uint8_t *)text, strlen(text), DUPLEX__ERROR_CODE__ERROR_MALFORMED,
                  "Envelope", NULL);
}

static size_t varint_len(size_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* Every prefix of a valid frame decodes or fails cleanly (each copied into a
 * buffer of exactly its size so ASan sees any over-read); prefixes that end
 * inside the body field must fail. */
static void truncate_all(Duplex__MsgType type, const ProtobufCMessage *body)
{
    uint8_t *full = NULL;
    size_t len = 0, body_len = protobuf_c_message_get_packed_size(body);
    size_t body_field;

    cr_assert_eq(dx_env_encode(type, 0xabcdef, body, &full, &len), 0);
    /* body (field 4) is packed last: tag, length, bytes */
    body_field = len - body_len - varint_len(body_len) - 1;
    cr_assert_eq(full[body_field], 0x22, "body tag where expected");

    for (size_t n = 0; n < len; n++) {
        uint8_t *p = malloc(n ? n : 1);
        struct dx_msg msg;
        struct dx_decode_error err;
        int rc;

        cr_assert_not_null(p);
        memcpy(p, full, n);
        rc = dx_env_decode(p, n, &msg, &err);
        cr_assert(rc == 0 || rc == -EPROTO, "prefix %zu: rc %d", n, rc);
        if (rc == 0) {
            cr_assert_not_null(msg.body);
            dx_msg_clear(&msg);
        } else {
            cr_assert_null(msg.body);
            cr_assert_neq(err.text[0], '\0', "prefix %zu: no error text", n);
        }
        if (n > body_field)
            cr_assert_eq(rc, -EPROTO, "prefix %zu of %zu ends inside the body but decoded", n, len);
        free(p);
    }
    free(full);
}

Test(envelope, truncated_at_every_length)
{
    Duplex__Register reg = good_register();
    Duplex__ListWorkersReply rep = DUPLEX__LIST_WORKERS_REPLY__INIT;
    Duplex__WorkerInfo wi = DUPLEX__WORKER_INFO__INIT;
    Duplex__WorkerInfo *wis[1] = {&wi};
    Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;

    truncate_all(DUPLEX__MSG_TYPE__MSG_REGISTER, &reg.base);

    hb.worker_id = "w1";
    hb.session_id = "sess";
    hb.step = 1000000;
    truncate_all(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, &hb.base);

    /* no field rules for this type, so only the framing protects it */
    wi.worker_id = "w1";
    wi.host = "h";
    wi.state = "alive";
    wi.step = 77;
    rep.workers = wis;
    rep.n_workers = 1;
    truncate_all(DUPLEX__MSG_TYPE__MSG_LIST_WORKERS_REPLY, &rep.base);
}

Test(envelope, bad_version)
{
    Duplex__Register reg = good_register();
    size_t blen = protobuf_c_message_get_packed_size(&reg.base);
    uint8_t *body = malloc(blen);
    uint32_t versions[] = {0, 1, 99, DX_PROTOCOL_VERSION + 1}; /* 1: before issue 15 */

    cr_assert_not_null(body);
    protobuf_c_message_pack(&reg.base, body);
    for (size_t i = 0; i < sizeof(versions) / sizeof(versions[0]); i++) {
        size_t len;
        uint8_t *buf =
            pack_raw(versions[i], DUPLEX__MSG_TYPE__MSG_REGISTER, 4711 + i, body, blen, &len);
        struct dx_decode_error err;

        expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_BAD_VERSION, "version", &err);
        cr_assert_eq(err.request_id, 4711 + i, "request id kept for version %u", versions[i]);
        free(buf);
    }
    free(body);
}

Test(envelope, unknown_type)
{
    size_t len;
    uint8_t *buf = pack_raw(DX_PROTOCOL_VERSION, 200, 31337, NULL, 0, &len);
    struct dx_decode_error err;

    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_UNKNOWN_TYPE, "type", &err);
    cr_assert_eq(err.request_id, 31337);
    cr_assert_not_null(strstr(err.text, "200"), "text \"%s\" names the type number", err.text);
    free(buf);

    buf = pack_raw(DX_PROTOCOL_VERSION, DUPLEX__MSG_TYPE__MSG_TYPE_UNSPECIFIED, 8, NULL, 0, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_UNKNOWN_TYPE, "type", &err);
    cr_assert_eq(err.request_id, 8);
    free(buf);
}

Test(envelope, body_garbage_is_bad_body)
{
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff};
    /* worker_id (field 1) claims 50 bytes, 2 follow */
    static const uint8_t short_str[] = {0x0a, 0x32, 'a', 'b'};
    size_t len;
    uint8_t *buf =
        pack_raw(DX_PROTOCOL_VERSION, DUPLEX__MSG_TYPE__MSG_REGISTER, 12, junk, sizeof(junk), &len);
    struct dx_decode_error err;

    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_BAD_BODY, "does not decode", &err);
    cr_assert_eq(err.request_id, 12);
    cr_assert_not_null(strstr(err.text, "Register"), "text \"%s\" names the type", err.text);
    free(buf);

    buf = pack_raw(DX_PROTOCOL_VERSION, DUPLEX__MSG_TYPE__MSG_REGISTER, 13, short_str,
                   sizeof(short_str), &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_BAD_BODY, "does not decode", NULL);
    free(buf);

    buf = pack_raw(DX_PROTOCOL_VERSION, DUPLEX__MSG_TYPE__MSG_HEARTBEAT, 14, junk, sizeof(junk),
                   &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_BAD_BODY, "Heartbeat", NULL);
    free(buf);
}

/* ---- field rules ----------------------------------------------------------- */

Test(envelope, register_worker_id_rules)
{
    Duplex__Register m = good_register();
    char long_id[DX_MAX_ID_LEN + 2];

    m.worker_id = "";
    expect_register_invalid(&m, "worker_id");
    m.worker_id = "has space";
    expect_register_invalid(&m, "worker_id");
    m.worker_id = "a/b";
    expect_register_invalid(&m, "worker_id");
    m.worker_id = "../etc";
    expect_register_invalid(&m, "worker_id");
    memset(long_id, 'a', DX_MAX_ID_LEN + 1);
    long_id[DX_MAX_ID_LEN + 1] = '\0';
    m.worker_id = long_id;
    expect_register_invalid(&m, "limit");
    expect_register_invalid(&m, "worker_id");
}

Test(envelope, register_host_rules)
{
    Duplex__Register m = good_register();
    char long_host[DX_MAX_NAME_LEN + 2];

    m.host = "";
    expect_register_invalid(&m, "host");
    m.host = "ho\x01st";
    expect_register_invalid(&m, "non-printable");
    expect_register_invalid(&m, "host");
    m.host = "h\xc3\xa9";
    expect_register_invalid(&m, "host");
    memset(long_host, 'h', DX_MAX_NAME_LEN + 1);
    long_host[DX_MAX_NAME_LEN + 1] = '\0';
    m.host = long_host;
    expect_register_invalid(&m, "host");

    m.host = "bad host";
    expect_register_invalid(&m, "host");
    m.host = "a/b";
    expect_register_invalid(&m, "'/'");

    m = good_register();
    m.node = "no\tde";
    expect_register_invalid(&m, "node");
    m.node = "rack 3";
    expect_register_invalid(&m, "node");
    m.node = "";
    expect_register_ok(&m);
}

Test(envelope, register_gpu_backend_caps_pid_rules)
{
    Duplex__Register m = good_register();
    char *caps[DX_MAX_CAPABILITIES + 1];
    char *bad_cap[] = {"ok", ""};

    m.gpu_index = -1;
    expect_register_invalid(&m, "gpu_index");
    m.gpu_index = 1024;
    expect_register_invalid(&m, "gpu_index");

    m = good_register();
    m.backend = "tpu";
    expect_register_invalid(&m, "backend");
    m.backend = "";
    expect_register_invalid(&m, "backend");

    m = good_register();
    for (int i = 0; i < DX_MAX_CAPABILITIES + 1; i++)
        caps[i] = "c";
    m.capabilities = caps;
    m.n_capabilities = DX_MAX_CAPABILITIES + 1;
    expect_register_invalid(&m, "capabilities");

    m = good_register();
    m.capabilities = bad_cap;
    m.n_capabilities = 2;
    expect_register_invalid(&m, "capability");

    m = good_register();
    m.pid = -1;
    expect_register_invalid(&m, "pid");
}

Test(envelope, register_ack_rules)
{
    Duplex__RegisterAck m = DUPLEX__REGISTER_ACK__INIT;
    struct {
        uint32_t hb, dead;
    } bad[] = {{1000, 1000}, {1000, 999}, {1000, 0}, {0, 5000}};
    size_t len;
    uint8_t *buf;

    m.session_id = "s1";
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct dx_decode_error err;
        m.heartbeat_interval_ms = bad[i].hb;
        m.dead_after_ms = bad[i].dead;
        buf = pack_msg(DUPLEX__MSG_TYPE__MSG_REGISTER_ACK, 9, &m.base, &len);
        expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "dead_after_ms", &err);
        cr_assert_not_null(strstr(err.text, "RegisterAck"));
        cr_assert_eq(err.request_id, 9);
        free(buf);
    }

    m.heartbeat_interval_ms = 1000;
    m.dead_after_ms = 5000;
    m.session_id = "";
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_REGISTER_ACK, 9, &m.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "session_id", NULL);
    free(buf);
}

Test(envelope, heartbeat_and_goodbye_rules)
{
    Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;
    Duplex__Goodbye gb = DUPLEX__GOODBYE__INIT;
    size_t len;
    uint8_t *buf;
    struct dx_decode_error err;

    hb.worker_id = "w1";
    hb.session_id = "";
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, 21, &hb.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "session_id", &err);
    cr_assert_not_null(strstr(err.text, "Heartbeat"));
    cr_assert_eq(err.request_id, 21);
    free(buf);

    hb.worker_id = "w 1";
    hb.session_id = "s";
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, 22, &hb.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "worker_id", NULL);
    free(buf);

    gb.worker_id = "w1";
    gb.session_id = "";
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_GOODBYE, 23, &gb.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "session_id", &err);
    cr_assert_not_null(strstr(err.text, "Goodbye"));
    free(buf);

    gb.session_id = "s";
    gb.reason = "bye\n";
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_GOODBYE, 24, &gb.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "reason", NULL);
    free(buf);
}

/* protobuf-c returns strings NUL-terminated without their length, so an
 * embedded NUL would silently shorten a string: "w1\0/x" would read as
 * "w1". The decoder refuses any body that does not re-encode to its own
 * size. */
Test(envelope, embedded_nul_in_string_is_refused)
{
    /* Register: worker_id (1) = "w1\0/x", host (2) = "h", backend (5) = "cpu" */
    static const uint8_t body[] = {0x0a, 5,   'w',  '1', 0,   '/', 'x', 0x12,
                                   1,    'h', 0x2a, 3,   'c', 'p', 'u'};
    size_t len;
    uint8_t *buf =
        pack_raw(DX_PROTOCOL_VERSION, DUPLEX__MSG_TYPE__MSG_REGISTER, 5, body, sizeof(body), &len);
    struct dx_msg msg;
    struct dx_decode_error err;
    int rc = dx_env_decode(buf, len, &msg, &err);

    free(buf);
    cr_assert_eq(rc, -EPROTO, "worker_id \"w1\\0/x\" was accepted");
    cr_assert_eq(err.code, DUPLEX__ERROR_CODE__ERROR_BAD_BODY, "%s", err.text);
    cr_assert_not_null(strstr(err.text, "NUL"), "%s", err.text);
    cr_assert_eq(err.request_id, 5);
}

/* A StepReport's checkpoint shard needs an absolute directory and a plain
 * file name; its figures must be finite. */
Test(envelope, step_report_checkpoint_and_figures)
{
    Duplex__StepReport m = DUPLEX__STEP_REPORT__INIT;
    struct dx_msg msg;
    struct dx_decode_error err;
    uint8_t *buf;
    size_t len;

    m.job_id = 3;
    m.step = 10;
    m.loss = 2.5;
    m.hidden_comm_ms = 1.0;
    m.checkpoint_dir = "/ck/job-3/step-00000010";
    m.checkpoint_file = "rank-d0-p0-e0.ckpt";
    m.checkpoint_bytes = 4096;
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_STEP_REPORT, 1, &m.base, &len);
    cr_assert_eq(dx_env_decode(buf, len, &msg, &err), 0, "%s", err.text);
    dx_msg_clear(&msg);
    free(buf);

    m.checkpoint_dir = "ck/job-3/step-00000010";
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_STEP_REPORT, 1, &m.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "absolute", NULL);
    free(buf);

    m.checkpoint_dir = "/ck";
    m.checkpoint_file = "../x.ckpt";
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_STEP_REPORT, 1, &m.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "without '/'", NULL);
    free(buf);

    m.checkpoint_file = "";
    m.comm_ms = NAN;
    buf = pack_msg(DUPLEX__MSG_TYPE__MSG_STEP_REPORT, 1, &m.base, &len);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, "not finite", NULL);
    free(buf);
}

/* An Assignment of one rank (pp = ep = dp = 1) whose fields the tests break. */
struct one_rank {
    Duplex__Assignment a;
    Duplex__Peer peer;
    Duplex__Peer *peers[1];
    uint8_t id[DX_NCCL_ID_BYTES + 1];
};

static void one_rank_init(struct one_rank *o)
{
    o->a = (Duplex__Assignment)DUPLEX__ASSIGNMENT__INIT;
    o->peer = (Duplex__Peer)DUPLEX__PEER__INIT;
    o->peer.worker_id = "node0-gpu3";
    o->peer.data_addr = "tcp://10.0.0.1:7000";
    o->peer.node = "node0";
    o->peer.gpu = 3;
    o->peers[0] = &o->peer;
    o->a.job_id = 9;
    o->a.attempt = 1;
    o->a.schedule = "1f1b";
    o->a.pp = o->a.ep = o->a.dp = 1;
    o->a.microbatches = 2;
    o->a.steps = 3;
    o->a.peers = o->peers;
    o->a.n_peers = 1;
    memset(o->id, 0xab, sizeof(o->id));
    o->a.nccl_id.data = o->id;
    o->a.nccl_id.len = DX_NCCL_ID_BYTES;
}

static void expect_assignment_invalid(const struct one_rank *o, const char *word)
{
    uint8_t *buf = NULL;
    size_t len = 0;

    cr_assert_eq(dx_env_encode(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, 5, &o->a.base, &buf, &len), 0);
    expect_reject(buf, len, DUPLEX__ERROR_CODE__ERROR_INVALID, word, NULL);
    free(buf);
}

Test(envelope, assignment_nccl_id_and_peer_placement_rules)
{
    struct one_rank o;
    struct dx_msg msg;
    const Duplex__Assignment *got;

    one_rank_init(&o);
    round_trip(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, 5, &o.a.base, &msg);
    got = (const Duplex__Assignment *)msg.body;
    cr_assert_eq(got->nccl_id.len, DX_NCCL_ID_BYTES);
    cr_assert_arr_eq(got->nccl_id.data, o.id, DX_NCCL_ID_BYTES);
    cr_assert_str_eq(got->peers[0]->node, "node0");
    cr_assert_eq(got->peers[0]->gpu, 3);
    dx_msg_clear(&msg);

    o.a.nccl_id.len = 0; /* no id: a job of another backend */
    round_trip(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, 5, &o.a.base, &msg);
    dx_msg_clear(&msg);

    one_rank_init(&o);
    o.a.nccl_id.len = DX_NCCL_ID_BYTES + 1;
    expect_assignment_invalid(&o, "nccl_id is 129 bytes");
    o.a.nccl_id.len = 16;
    expect_assignment_invalid(&o, "nccl_id is 16 bytes");

    one_rank_init(&o);
    o.peer.gpu = DX_MAX_GPU_INDEX + 1;
    expect_assignment_invalid(&o, "gpu 1024");
    o.peer.gpu = -1;
    expect_assignment_invalid(&o, "gpu -1");

    one_rank_init(&o);
    o.peer.node = "node 0; rm -rf";
    expect_assignment_invalid(&o, "node");
}

/* A job's peers packed once and appended to each rank's Assignment decode
 * exactly as if every Assignment were packed whole. */
Test(envelope, a_packed_tail_merges_into_the_body)
{
    Duplex__Assignment a = DUPLEX__ASSIGNMENT__INIT, only = DUPLEX__ASSIGNMENT__INIT;
    Duplex__Peer p[3], *pp[3];
    const char *ids[3] = {"node0-gpu0", "node0-gpu1", "node1-gpu0"};
    uint8_t *whole = NULL, *tailed = NULL, *tail;
    size_t whole_len = 0, tailed_len = 0, tail_len;
    struct dx_msg msg;
    struct dx_decode_error err;
    const Duplex__Assignment *got;

    for (int i = 0; i < 3; i++) {
        p[i] = (Duplex__Peer)DUPLEX__PEER__INIT;
        p[i].pp = i;
        p[i].worker_id = (char *)ids[i];
        p[i].data_addr = "tcp://10.0.0.1:7000";
        p[i].node = i < 2 ? "node0" : "node1";
        p[i].gpu = i % 2;
        pp[i] = &p[i];
    }
    a.job_id = 9;
    a.attempt = 1;
    a.schedule = "1f1b";
    a.pp = 3;
    a.ep = a.dp = 1;
    a.pp_rank = 1;
    a.microbatches = 3;
    a.steps = 3;
    only.peers = pp;
    only.n_peers = 3;
    cr_assert_eq(duplex__assignment__get_packed_size(&(Duplex__Assignment)DUPLEX__ASSIGNMENT__INIT),
                 0, "an empty Assignment packs to nothing, so `only` packs to its peers alone");
    tail_len = duplex__assignment__get_packed_size(&only);
    tail = malloc(tail_len);
    cr_assert_not_null(tail);
    duplex__assignment__pack(&only, tail);
    cr_assert_eq(dx_env_encode_tail(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, 5, &a.base, tail, tail_len,
                                    &tailed, &tailed_len),
                 0);
    a.peers = pp;
    a.n_peers = 3;
    cr_assert_eq(dx_env_encode(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, 5, &a.base, &whole, &whole_len),
                 0);
    cr_assert_eq(tailed_len, whole_len);
    cr_assert_eq(dx_env_decode(tailed, tailed_len, &msg, &err), 0, "%s", err.text);
    got = (const Duplex__Assignment *)msg.body;
    cr_assert_eq(got->pp_rank, 1);
    cr_assert_eq(got->n_peers, 3);
    for (int i = 0; i < 3; i++) {
        cr_assert_str_eq(got->peers[i]->worker_id, ids[i]);
        cr_assert_eq(got->peers[i]->pp, i);
        cr_assert_eq(got->peers[i]->gpu, i % 2);
    }
    dx_msg_clear(&msg);
    /* a tail without a body is refused */
    cr_assert_eq(dx_env_encode_tail(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, 5, NULL, tail, tail_len,
                                    &tailed, &tailed_len),
                 -EINVAL);
    free(tail);
    free(whole);
    free(tailed);
}
