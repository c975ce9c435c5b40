/* fuzz_ckpt.c - libFuzzer target for the checkpoint readers (common/ckpt.h):
 * any bytes must load as a shard (first input byte even) or a manifest (odd)
 * or be refused with a text, never crash or leak. A shard that loads must
 * answer lookups of any name, type and count with 0 or a named refusal. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/ckpt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const names[] = {"meta", "embed", "layer0.attn.wq", "head", "x"};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512];
    int rc;

    if (size < 1)
        return 0;
    err[0] = '\0';
    if (data[0] % 2 == 0) {
        dx_ckpt_reader_t *r = NULL;

        rc = dx_ckpt_open_buf("fuzz.ckpt", data + 1, size - 1, NULL, &r, err, sizeof(err));
        if (rc < 0) {
            if (!err[0] || r)
                abort(); /* every refusal names its reason and leaves nothing */
            return 0;
        }
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
            for (int t = DX_CKPT_F32; t <= DX_CKPT_BYTES; t++)
                for (size_t count = 0; count < 3; count++) {
                    const void *p = NULL;

                    err[0] = '\0';
                    rc = dx_ckpt_get(r, names[i], (enum dx_ckpt_dtype)t, count, &p, err,
                                     sizeof(err));
                    if ((rc < 0 && !err[0]) || (rc == 0 && count && !p))
                        abort();
                }
        dx_ckpt_close(r);
    } else {
        struct dx_ckpt_manifest m;

        rc = dx_ckpt_manifest_parse("fuzz/MANIFEST.json", (const char *)data + 1, size - 1, &m, err,
                                    sizeof(err));
        if (rc < 0) {
            if (!err[0])
                abort();
            return 0;
        }
        if (m.n_shards < 1 || !dx_ckpt_manifest_find(&m, m.shards[0].file))
            abort();
        dx_ckpt_manifest_clear(&m);
    }
    return 0;
}
