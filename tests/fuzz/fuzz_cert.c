/* fuzz_cert.c - libFuzzer target for the CURVE certificate reader
 * (proto/cert.h): any bytes must parse or be refused with a text, never
 * crash, overrun or leak, and a refusal leaves the output untouched. What
 * parses holds a valid public key (and a secret key that derives it), and,
 * written back as a certificate, parses to the same fields. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "proto/cert.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool terminated(const char *s, size_t size)
{
    return memchr(s, '\0', size) != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct dx_cert c, again;
    char err[256], text[1024], derived[DX_CERT_KEY_LEN + 1];
    int rc;

    memset(&c, 0x5a, sizeof(c));
    err[0] = '\0';
    rc = dx_cert_parse((const char *)data, size, &c, err, sizeof(err));
    if (rc < 0) {
        const uint8_t *p = (const uint8_t *)&c;
        if (!err[0])
            abort(); /* every refusal names its reason */
        for (size_t i = 0; i < sizeof(c); i++)
            if (p[i] != 0x5a)
                abort(); /* and writes nothing */
        return 0;
    }
    if (!terminated(c.public_key, sizeof(c.public_key)) ||
        !terminated(c.secret_key, sizeof(c.secret_key)) || !terminated(c.name, sizeof(c.name)) ||
        !terminated(c.role, sizeof(c.role)))
        abort();
    if (!dx_cert_key_valid(c.public_key))
        abort();
    if (c.secret_key[0] &&
        (!dx_cert_key_valid(c.secret_key) || zmq_curve_public(derived, c.secret_key) < 0 ||
         strcmp(derived, c.public_key) != 0))
        abort();
    /* quoted values cannot hold a quote: only re-write what can be quoted */
    if (strchr(c.name, '"') || strchr(c.role, '"'))
        return 0;
    snprintf(text, sizeof(text),
             "metadata\n    name = \"%s\"\n    role = \"%s\"\ncurve\n    public-key = \"%s\"\n",
             c.name, c.role, c.public_key);
    if (c.secret_key[0])
        snprintf(text + strlen(text), sizeof(text) - strlen(text), "    secret-key = \"%s\"\n",
                 c.secret_key);
    if (dx_cert_parse(text, strlen(text), &again, err, sizeof(err)) < 0)
        abort();
    if (strcmp(again.public_key, c.public_key) != 0 ||
        strcmp(again.secret_key, c.secret_key) != 0 || strcmp(again.name, c.name) != 0 ||
        strcmp(again.role, c.role) != 0)
        abort();
    return 0;
}
