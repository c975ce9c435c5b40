/* fuzz_authz.c - libFuzzer target for duplexd's allow-list parser
 * (proto/authz.h): any bytes must parse or be refused with a text
 * naming the source and line, never crash or leak. A list that parses
 * answers lookups of a fixed key and of NULL; a principal found has the key
 * asked for, a known role and a name, and a worker one answers whether it
 * may take a few ids. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/authz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A valid Z85 public key, also in the seed corpus. */
static const char fixed_key[] = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";

static const char *const ids[] = {"", "node3-gpu0", "node3-", "x", "*"};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    dx_authz_t *a = (dx_authz_t *)0x1;
    const struct coord_principal *p;
    char err[512];
    int rc;

    err[0] = '\0';
    rc = dx_authz_parse((const char *)data, size, "fuzz", &a, err, sizeof(err));
    if (rc < 0) {
        if (a || (rc != -ENOMEM && strncmp(err, "fuzz:", 5) != 0))
            abort(); /* every refusal names the source (and line), keeps nothing */
        return 0;
    }
    if (!a || dx_authz_find(a, NULL) || dx_authz_find(a, ""))
        abort();
    if ((p = dx_authz_find(a, fixed_key))) {
        if (strcmp(p->key, fixed_key) != 0 || !p->name[0] ||
            strcmp(coord_role_name(p->role), "?") == 0)
            abort();
        if (p->role == COORD_ROLE_WORKER) {
            if (p->n_ids == 0 && !p->host)
                abort();
            for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
                dx_authz_worker_may_be(p, ids[i], NULL);
                dx_authz_worker_may_be(p, ids[i], "node3");
            }
        } else if (p->n_ids || p->host || dx_authz_worker_may_be(p, "x", "node3")) {
            abort();
        }
    }
    dx_authz_destroy(a);
    return 0;
}
