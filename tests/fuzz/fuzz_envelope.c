/* fuzz_envelope.c - libFuzzer target for the control-plane decoder: any bytes
 * must decode cleanly or be refused with a code and a text, never crash or
 * leak; whatever decodes must re-encode and decode to the same type.
 *
 * protobuf-c keeps unknown fields and packs them back verbatim, including
 * ones it would refuse to read (field number 0 written as an overlong
 * varint, found by this fuzzer), so the round trip is only required of
 * messages without unknown fields; duplex never re-sends what it received. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/envelope.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool has_unknown_fields(const ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;

    if (m->n_unknown_fields)
        return true;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        const char *base = (const char *)m;

        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            ProtobufCMessage *const *v = *(ProtobufCMessage *const *const *)(base + f->offset);
            for (size_t k = 0; k < n; k++) {
                if (has_unknown_fields(v[k]))
                    return true;
            }
        } else {
            const ProtobufCMessage *sub = *(const ProtobufCMessage *const *)(base + f->offset);
            if (sub && has_unknown_fields(sub))
                return true;
        }
    }
    return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct dx_msg msg, again;
    struct dx_decode_error err;
    uint8_t *buf;
    size_t len;

    if (dx_env_decode(data, size, &msg, &err) < 0) {
        if (err.code == DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED || err.text[0] == '\0')
            abort(); /* every refusal names its reason */
        return 0;
    }
    if (dx_env_encode(msg.type, msg.request_id, msg.body, &buf, &len) < 0)
        abort();
    if (dx_env_decode(buf, len, &again, &err) == 0) {
        if (again.type != msg.type || again.request_id != msg.request_id)
            abort();
        dx_msg_clear(&again);
    } else if (!has_unknown_fields(msg.body)) {
        abort();
    }
    free(buf);
    dx_msg_clear(&msg);
    return 0;
}
