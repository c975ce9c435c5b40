/* fuzz_envelope.c - libFuzzer target for the control-plane decoder: any bytes
 * must decode cleanly or be refused with a code and a text, never crash or
 * leak; whatever decodes must re-encode and decode to the same type.
 *
 * protobuf-c packs unknown fields back verbatim; an overlong tag for field 0
 * once decoded but did not re-decode (found by this fuzzer). The decoder now
 * refuses bodies that do not re-encode to their own size, so the round trip
 * holds for everything it accepts. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/envelope.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

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
    } else {
        abort();
    }
    free(buf);
    dx_msg_clear(&msg);
    return 0;
}
