/* envelope.c - encode and untrusting decode of control frames (see envelope.h). */
#include "proto/envelope.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/cert.h"

typedef int (*msg_check_fn)(const ProtobufCMessage *body, char *text, size_t len);

struct msg_kind {
    Duplex__MsgType type;
    const char *name;
    const ProtobufCMessageDescriptor *descriptor;
    msg_check_fn check;
};

static int check_register(const ProtobufCMessage *body, char *text, size_t len);
static int check_register_ack(const ProtobufCMessage *body, char *text, size_t len);
static int check_heartbeat(const ProtobufCMessage *body, char *text, size_t len);
static int check_goodbye(const ProtobufCMessage *body, char *text, size_t len);
static int check_submit(const ProtobufCMessage *body, char *text, size_t len);
static int check_assignment(const ProtobufCMessage *body, char *text, size_t len);
static int check_step_report(const ProtobufCMessage *body, char *text, size_t len);
static int check_drain(const ProtobufCMessage *body, char *text, size_t len);
static int check_list_workers(const ProtobufCMessage *body, char *text, size_t len);
static int check_forget(const ProtobufCMessage *body, char *text, size_t len);
static int check_list_workers_reply(const ProtobufCMessage *body, char *text, size_t len);

static const struct msg_kind msg_kinds[] = {
    {DUPLEX__MSG_TYPE__MSG_REGISTER, "Register", &duplex__register__descriptor, check_register},
    {DUPLEX__MSG_TYPE__MSG_REGISTER_ACK, "RegisterAck", &duplex__register_ack__descriptor,
     check_register_ack},
    {DUPLEX__MSG_TYPE__MSG_HEARTBEAT, "Heartbeat", &duplex__heartbeat__descriptor, check_heartbeat},
    {DUPLEX__MSG_TYPE__MSG_GOODBYE, "Goodbye", &duplex__goodbye__descriptor, check_goodbye},
    {DUPLEX__MSG_TYPE__MSG_ERROR, "Error", &duplex__error__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_LIST_WORKERS, "ListWorkers", &duplex__list_workers__descriptor,
     check_list_workers},
    {DUPLEX__MSG_TYPE__MSG_LIST_WORKERS_REPLY, "ListWorkersReply",
     &duplex__list_workers_reply__descriptor, check_list_workers_reply},
    {DUPLEX__MSG_TYPE__MSG_SUBMIT, "Submit", &duplex__submit__descriptor, check_submit},
    {DUPLEX__MSG_TYPE__MSG_SUBMIT_REPLY, "SubmitReply", &duplex__submit_reply__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, "Assignment", &duplex__assignment__descriptor,
     check_assignment},
    {DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK, "AssignmentAck", &duplex__assignment_ack__descriptor,
     NULL},
    {DUPLEX__MSG_TYPE__MSG_STEP_REPORT, "StepReport", &duplex__step_report__descriptor,
     check_step_report},
    {DUPLEX__MSG_TYPE__MSG_JOB_DONE, "JobDone", &duplex__job_done__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_ABORT_JOB, "AbortJob", &duplex__abort_job__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_JOB_STATUS, "JobStatus", &duplex__job_status__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_JOB_STATUS_REPLY, "JobStatusReply",
     &duplex__job_status_reply__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_CANCEL, "Cancel", &duplex__cancel__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_DRAIN, "Drain", &duplex__drain__descriptor, check_drain},
    {DUPLEX__MSG_TYPE__MSG_EVENTS, "Events", &duplex__events__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_EVENTS_REPLY, "EventsReply", &duplex__events_reply__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_OK, "Ok", &duplex__ok__descriptor, NULL},
    {DUPLEX__MSG_TYPE__MSG_FORGET, "Forget", &duplex__forget__descriptor, check_forget},
};

static const struct msg_kind *kind_of(Duplex__MsgType type)
{
    for (size_t i = 0; i < sizeof(msg_kinds) / sizeof(msg_kinds[0]); i++) {
        if (msg_kinds[i].type == type)
            return &msg_kinds[i];
    }
    return NULL;
}

const char *dx_msg_type_name(Duplex__MsgType type)
{
    const struct msg_kind *k = kind_of(type);
    return k ? k->name : "unknown";
}

const char *dx_error_code_name(Duplex__ErrorCode code)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&duplex__error_code__descriptor, (int)code);
    /* names are "ERROR_TOO_LARGE": drop the prefix */
    return v ? v->name + strlen("ERROR_") : "UNKNOWN";
}

/* ---- field rules ------------------------------------------------------- */

static int field_fail(char *text, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int field_fail(char *text, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, len, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

/* Printable ASCII, 1..max characters (0..max when may_be_empty). */
static int check_text(const char *field, const char *s, size_t max, bool may_be_empty, char *text,
                      size_t len)
{
    size_t n = strlen(s);

    if (n == 0 && !may_be_empty)
        return field_fail(text, len, "%s must not be empty", field);
    if (n > max)
        return field_fail(text, len, "%s is %zu bytes long; the limit is %zu", field, n, max);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e)
            return field_fail(text, len, "%s has a non-printable byte 0x%02x at offset %zu", field,
                              c, i);
    }
    return 0;
}

#define NAME_CHARS "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:@-"

/* Names (ids, hosts, nodes, capabilities) appear in files, logs and tables:
 * letters, digits and "._:@-" only. */
static int check_name(const char *field, const char *s, size_t max, bool may_be_empty, char *text,
                      size_t len)
{
    int rc = check_text(field, s, max, may_be_empty, text, len);
    size_t bad;

    if (rc < 0)
        return rc;
    bad = strspn(s, NAME_CHARS);
    if (s[bad] != '\0')
        return field_fail(text, len, "%s \"%s\" has '%c'; use letters, digits and . _ : @ -", field,
                          s, s[bad]);
    return 0;
}

int dx_worker_id_check(const char *id, char *text, size_t len)
{
    return check_name("worker_id", id, DX_MAX_ID_LEN, false, text, len);
}

static int check_register(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__Register *m = (const Duplex__Register *)body;
    int rc;

    if ((rc = dx_worker_id_check(m->worker_id, text, len)) < 0 ||
        (rc = check_name("host", m->host, DX_MAX_NAME_LEN, false, text, len)) < 0 ||
        (rc = check_name("node", m->node, DX_MAX_NAME_LEN, true, text, len)) < 0)
        return rc;
    if (m->gpu_index < 0 || m->gpu_index > DX_MAX_GPU_INDEX)
        return field_fail(text, len, "gpu_index %d is outside 0..%d", m->gpu_index,
                          DX_MAX_GPU_INDEX);
    if (strcmp(m->backend, "sim") != 0 && strcmp(m->backend, "cpu") != 0 &&
        strcmp(m->backend, "cuda") != 0)
        return field_fail(text, len, "backend \"%.64s\" is not one of sim, cpu, cuda", m->backend);
    if (m->n_capabilities > DX_MAX_CAPABILITIES)
        return field_fail(text, len, "%zu capabilities; the limit is %d", m->n_capabilities,
                          DX_MAX_CAPABILITIES);
    for (size_t i = 0; i < m->n_capabilities; i++) {
        if ((rc = check_name("capability", m->capabilities[i], DX_MAX_NAME_LEN, false, text, len)) <
            0)
            return rc;
    }
    if (m->pid < 0)
        return field_fail(text, len, "pid %d is negative", m->pid);
    if ((rc = check_text("data_addr", m->data_addr, DX_MAX_NAME_LEN, true, text, len)) < 0)
        return rc;
    if (m->memory_bytes > DX_MAX_MEMORY_BYTES)
        return field_fail(text, len, "memory_bytes %" PRIu64 " is over %llu (1 PiB)",
                          (uint64_t)m->memory_bytes, (unsigned long long)DX_MAX_MEMORY_BYTES);
    return 0;
}

static int check_register_ack(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__RegisterAck *m = (const Duplex__RegisterAck *)body;
    int rc = check_text("session_id", m->session_id, DX_MAX_ID_LEN, false, text, len);

    if (rc < 0)
        return rc;
    if (m->heartbeat_interval_ms == 0 || m->dead_after_ms <= m->heartbeat_interval_ms)
        return field_fail(text, len,
                          "heartbeat_interval_ms %u must be positive and below dead_after_ms %u",
                          m->heartbeat_interval_ms, m->dead_after_ms);
    return 0;
}

static int check_session(const char *worker_id, const char *session_id, char *text, size_t len)
{
    int rc = dx_worker_id_check(worker_id, text, len);
    if (rc < 0)
        return rc;
    return check_text("session_id", session_id, DX_MAX_ID_LEN, false, text, len);
}

static int check_heartbeat(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__Heartbeat *m = (const Duplex__Heartbeat *)body;
    return check_session(m->worker_id, m->session_id, text, len);
}

static int check_goodbye(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__Goodbye *m = (const Duplex__Goodbye *)body;
    int rc = check_session(m->worker_id, m->session_id, text, len);
    if (rc < 0)
        return rc;
    return check_text("reason", m->reason, DX_MAX_NAME_LEN, true, text, len);
}

static int check_submit(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__Submit *m = (const Duplex__Submit *)body;

    if (m->spec_json[0] == '\0')
        return field_fail(text, len, "spec_json must not be empty");
    if (m->n_sets > DX_MAX_SETS)
        return field_fail(text, len, "%zu sets; the limit is %d", m->n_sets, DX_MAX_SETS);
    for (size_t i = 0; i < m->n_sets; i++) {
        int rc = check_text("set", m->sets[i], DX_MAX_NAME_LEN, false, text, len);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int check_cost(const char *field, double v, char *text, size_t len)
{
    if (!(v >= 0.0 && v <= DX_MAX_COST_MS)) /* also refuses NaN */
        return field_fail(text, len, "%s %g is outside 0..%d ms", field, v, DX_MAX_COST_MS);
    return 0;
}

static int check_assignment(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__Assignment *m = (const Duplex__Assignment *)body;
    size_t ranks;
    int rc;

    if (m->job_id == 0)
        return field_fail(text, len, "job_id must not be 0");
    if (m->pp < 1 || m->ep < 1 || m->dp < 1 || m->pp > DX_MAX_RANKS || m->ep > DX_MAX_RANKS ||
        m->dp > DX_MAX_RANKS)
        return field_fail(text, len, "pp %d, ep %d, dp %d must be 1..%d", m->pp, m->ep, m->dp,
                          DX_MAX_RANKS);
    if (m->pp_rank < 0 || m->pp_rank >= m->pp || m->ep_rank < 0 || m->ep_rank >= m->ep ||
        m->dp_rank < 0 || m->dp_rank >= m->dp)
        return field_fail(text, len, "ranks (pp %d, ep %d, dp %d) outside the job's layout",
                          m->pp_rank, m->ep_rank, m->dp_rank);
    ranks = (size_t)m->pp * (size_t)m->ep * (size_t)m->dp;
    /* the ranks this rank talks to (job_plan_peers), each at most once:
     * the runtime checks which */
    if (m->n_peers < 1 || m->n_peers > ranks)
        return field_fail(text, len, "%zu peers for %zu ranks", m->n_peers, ranks);
    if (m->microbatches < 1 || m->steps < 1)
        return field_fail(text, len, "microbatches %d and steps %llu must be positive",
                          m->microbatches, (unsigned long long)m->steps);
    if ((rc = check_text("schedule", m->schedule, DX_MAX_NAME_LEN, false, text, len)) < 0 ||
        (rc = check_cost("cost_f_ms", m->cost_f_ms, text, len)) < 0 ||
        (rc = check_cost("cost_b_ms", m->cost_b_ms, text, len)) < 0 ||
        (rc = check_cost("cost_w_ms", m->cost_w_ms, text, len)) < 0 ||
        (rc = check_cost("cost_fb_ms", m->cost_fb_ms, text, len)) < 0)
        return rc;
    for (size_t i = 0; i < m->n_peers; i++) {
        const Duplex__Peer *p = m->peers[i];
        if ((rc = dx_worker_id_check(p->worker_id, text, len)) < 0 ||
            (rc = check_text("data_addr", p->data_addr, DX_MAX_NAME_LEN, false, text, len)) < 0 ||
            (rc = check_name("node", p->node, DX_MAX_NAME_LEN, true, text, len)) < 0)
            return rc;
        if (p->gpu < 0 || p->gpu > DX_MAX_GPU_INDEX)
            return field_fail(text, len, "peer %zu has gpu %d, outside 0..%d", i, p->gpu,
                              DX_MAX_GPU_INDEX);
        if (p->curve_key[0] && !dx_cert_key_valid(p->curve_key))
            return field_fail(text, len, "peer %zu's curve_key is not a Z85 CURVE key", i);
        if (p->pp < 0 || p->pp >= m->pp || p->ep < 0 || p->ep >= m->ep || p->dp < 0 ||
            p->dp >= m->dp)
            return field_fail(text, len, "peer %zu has ranks outside the job's layout", i);
    }
    if ((rc = check_text("checkpoint", m->checkpoint, DX_MAX_PATH_LEN, true, text, len)) < 0 ||
        (rc = check_text("shared_gpu", m->shared_gpu, DX_MAX_PATH_LEN, true, text, len)) < 0)
        return rc;
    if (strlen(m->spec_json) > DX_MAX_SPEC_LEN)
        return field_fail(text, len, "spec_json is %zu bytes long; the limit is %d",
                          strlen(m->spec_json), DX_MAX_SPEC_LEN);
    if (m->nccl_id.len != 0 && m->nccl_id.len != DX_NCCL_ID_BYTES)
        return field_fail(text, len, "nccl_id is %zu bytes; an NCCL unique id has %d",
                          m->nccl_id.len, DX_NCCL_ID_BYTES);
    for (size_t i = 0; i < m->n_expert_owner; i++)
        if (m->expert_owner[i] < 0 || m->expert_owner[i] >= m->ep)
            return field_fail(text, len, "expert_owner[%zu] is ep rank %d of %d", i,
                              m->expert_owner[i], m->ep);
    return 0;
}

static int check_step_report(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__StepReport *m = (const Duplex__StepReport *)body;
    const double v[] = {m->loss,    m->step_ms,        m->tokens_per_s, m->compute_ms, m->wait_ms,
                        m->comm_ms, m->hidden_comm_ms, m->sync_ms,      m->f_ms,       m->b_ms,
                        m->i_ms,    m->w_ms,           m->fb_ms};

    int rc;

    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        if (!isfinite(v[i]))
            return field_fail(text, len, "step %llu reports a value that is not finite",
                              (unsigned long long)m->step);
    if ((rc = check_text("checkpoint_dir", m->checkpoint_dir, DX_MAX_PATH_LEN, true, text, len)) <
            0 ||
        (rc = check_text("checkpoint_file", m->checkpoint_file, DX_MAX_NAME_LEN, true, text, len)) <
            0)
        return rc;
    if (m->checkpoint_file[0] && (m->checkpoint_dir[0] != '/' || strchr(m->checkpoint_file, '/')))
        return field_fail(text, len,
                          "a checkpoint shard needs an absolute directory and a "
                          "file name without '/'");
    return 0;
}

static int check_drain(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__Drain *m = (const Duplex__Drain *)body;
    return dx_worker_id_check(m->worker_id, text, len);
}

static int check_forget(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__Forget *m = (const Duplex__Forget *)body;
    return dx_worker_id_check(m->worker_id, text, len);
}

/* A page's bound: "" or a worker id. */
static int check_list_workers(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__ListWorkers *m = (const Duplex__ListWorkers *)body;
    return check_name("after_id", m->after_id, DX_MAX_ID_LEN, true, text, len);
}

static int check_list_workers_reply(const ProtobufCMessage *body, char *text, size_t len)
{
    const Duplex__ListWorkersReply *m = (const Duplex__ListWorkersReply *)body;
    return check_name("next_after_id", m->next_after_id, DX_MAX_ID_LEN, true, text, len);
}

/* ---- encode / decode ----------------------------------------------------- */

int dx_env_encode(Duplex__MsgType type, uint64_t request_id, const ProtobufCMessage *body,
                  uint8_t **buf, size_t *len)
{
    return dx_env_encode_tail(type, request_id, body, NULL, 0, buf, len);
}

int dx_env_encode_tail(Duplex__MsgType type, uint64_t request_id, const ProtobufCMessage *body,
                       const uint8_t *tail, size_t tail_len, uint8_t **buf, size_t *len)
{
    const struct msg_kind *k = kind_of(type);
    Duplex__Envelope env = DUPLEX__ENVELOPE__INIT;
    uint8_t *body_buf = NULL;
    size_t body_len = 0, packed = 0;
    uint8_t *out;
    int rc = -ENOMEM;

    if (!k || (body && body->descriptor != k->descriptor) || (tail_len && !body))
        return -EINVAL;
    if (body) {
        packed = protobuf_c_message_get_packed_size(body);
        body_len = packed + tail_len;
        body_buf = malloc(body_len ? body_len : 1);
        if (!body_buf)
            goto fail;
        protobuf_c_message_pack(body, body_buf);
        if (tail_len)
            memcpy(body_buf + packed, tail, tail_len);
    }
    env.version = DX_PROTOCOL_VERSION;
    env.type = type;
    env.request_id = request_id;
    env.body.data = body_buf;
    env.body.len = body_len;

    *len = duplex__envelope__get_packed_size(&env);
    out = malloc(*len ? *len : 1);
    if (!out)
        goto fail;
    duplex__envelope__pack(&env, out);
    *buf = out;
    rc = 0;
fail:
    free(body_buf);
    return rc;
}

static int decode_fail(struct dx_decode_error *err, Duplex__ErrorCode code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int decode_fail(struct dx_decode_error *err, Duplex__ErrorCode code, const char *fmt, ...)
{
    va_list ap;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->text, sizeof(err->text), fmt, ap);
    va_end(ap);
    return -EPROTO;
}

int dx_env_decode(const uint8_t *buf, size_t len, struct dx_msg *msg, struct dx_decode_error *err)
{
    Duplex__Envelope *env = NULL;
    const struct msg_kind *k;
    char why[200];
    int rc;

    memset(msg, 0, sizeof(*msg));
    err->request_id = 0;
    err->text[0] = '\0';

    if (len == 0)
        return decode_fail(err, DUPLEX__ERROR_CODE__ERROR_MALFORMED, "empty frame");
    if (len > DX_MAX_MSG_SIZE)
        return decode_fail(err, DUPLEX__ERROR_CODE__ERROR_TOO_LARGE,
                           "frame of %zu bytes is over the %d byte limit", len, DX_MAX_MSG_SIZE);
    env = duplex__envelope__unpack(NULL, len, buf);
    if (!env)
        return decode_fail(err, DUPLEX__ERROR_CODE__ERROR_MALFORMED,
                           "%zu bytes that are not a duplex Envelope (garbage or truncated)", len);
    err->request_id = env->request_id;

    if (env->version != DX_PROTOCOL_VERSION) {
        rc = decode_fail(err, DUPLEX__ERROR_CODE__ERROR_BAD_VERSION,
                         "protocol version %u is not spoken here (this side speaks %d)",
                         env->version, DX_PROTOCOL_VERSION);
        goto out;
    }
    k = kind_of(env->type);
    if (!k) {
        rc = decode_fail(err, DUPLEX__ERROR_CODE__ERROR_UNKNOWN_TYPE, "unknown message type %d",
                         (int)env->type);
        goto out;
    }
    msg->body = protobuf_c_message_unpack(k->descriptor, NULL, env->body.len, env->body.data);
    if (!msg->body) {
        rc = decode_fail(err, DUPLEX__ERROR_CODE__ERROR_BAD_BODY,
                         "%s body of %zu bytes does not decode", k->name, env->body.len);
        goto out;
    }
    /* protobuf-c hands strings back NUL-terminated without their length, so
     * "w1\0/x" would read as "w1". Whatever the body holds must pack back to
     * the bytes' own size, which refuses NULs inside strings, and with them
     * encodings protobuf-c never writes (explicit zero defaults, unpacked
     * repeated scalars, repeated fields): every duplex program speaks
     * through protobuf-c. */
    if (protobuf_c_message_get_packed_size(msg->body) != env->body.len) {
        rc = decode_fail(err, DUPLEX__ERROR_CODE__ERROR_BAD_BODY,
                         "%s body of %zu bytes re-encodes to %zu: a string holds a NUL byte, "
                         "or the encoding is not canonical",
                         k->name, env->body.len, protobuf_c_message_get_packed_size(msg->body));
        goto out;
    }
    if (k->check && k->check(msg->body, why, sizeof(why)) < 0) {
        rc = decode_fail(err, DUPLEX__ERROR_CODE__ERROR_INVALID, "%s: %s", k->name, why);
        goto out;
    }
    msg->type = env->type;
    msg->request_id = env->request_id;
    rc = 0;
out:
    if (rc < 0)
        dx_msg_clear(msg);
    duplex__envelope__free_unpacked(env, NULL);
    return rc;
}

void dx_msg_clear(struct dx_msg *msg)
{
    if (msg->body)
        protobuf_c_message_free_unpacked(msg->body, NULL);
    memset(msg, 0, sizeof(*msg));
}
