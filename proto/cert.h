/* cert.h - CURVE certificates: ZeroMQ's Z85 certificate files (the format
 * czmq's zcert writes and flux keygen uses), and the socket options that
 * make a ZeroMQ socket a CURVE client or server with them.
 *
 * A certificate is a small ZPL text:
 *
 *     #   ZeroMQ CURVE **Secret** Certificate
 *     metadata
 *         name = "gpu-node3"
 *         role = "worker"
 *     curve
 *         public-key = "<40 Z85 characters>"
 *         secret-key = "<40 Z85 characters>"
 *
 * The public certificate (NAME.key) has no secret-key line; the secret one
 * (NAME.key_secret) is written with mode 0600. Reading is untrusting: the
 * file is bounded, every line must be a comment, a section name or an
 * indented `name = value`, keys must be 40 Z85 characters that decode, and
 * a secret key must give the public key written beside it.
 */
#ifndef DX_CERT_H
#define DX_CERT_H

#include <stdbool.h>
#include <stddef.h>

/* A Z85 key's text length (32 bytes of key), without the NUL. */
#define DX_CERT_KEY_LEN 40
/* The longest metadata value kept (name, role). */
#define DX_CERT_META_MAX 64
/* Certificates larger than this are refused unread. */
#define DX_CERT_FILE_MAX 16384
/* duplexd's ZAP domain: the servers of duplex set it. */
#define DX_CERT_ZAP_DOMAIN "duplex"

struct dx_cert {
    char public_key[DX_CERT_KEY_LEN + 1];
    char secret_key[DX_CERT_KEY_LEN + 1]; /* "" in a public certificate */
    char name[DX_CERT_META_MAX + 1];      /* metadata; "" when absent */
    char role[DX_CERT_META_MAX + 1];
};

/* True when key is 40 Z85 characters that decode to 32 bytes. */
bool dx_cert_key_valid(const char *key);

/* Parses a certificate's text (len bytes, need not be NUL-terminated).
 * Returns 0, or -EINVAL with the reason (and line) in err. */
int dx_cert_parse(const char *text, size_t len, struct dx_cert *out, char *err, size_t errlen);

/* Reads and parses the certificate at path. need_secret: a secret key must
 * be in it (and the file must not be readable by group or others).
 * Returns 0 or -errno with the reason, naming path, in err. */
int dx_cert_load(const char *path, bool need_secret, struct dx_cert *out, char *err, size_t errlen);

/* Environment variables naming a client's keys when no flag does. */
#define DX_CERT_KEY_ENV "DUPLEX_KEY"
#define DX_CERT_SERVER_KEY_ENV "DUPLEX_SERVER_KEY"

/* The keys a client of duplexd (worker, duplexctl) talks with: its secret
 * certificate (key_path, else $DUPLEX_KEY) and duplexd's public certificate
 * (server_path, else $DUPLEX_SERVER_KEY), whose key goes to server_key.
 * Returns 1 with both loaded; 0 when neither is given and insecure is set
 * (talk in clear); else -errno with err saying what is missing. */
int dx_cert_load_client(const char *key_path, const char *server_path, bool insecure,
                        struct dx_cert *own, char server_key[DX_CERT_KEY_LEN + 1], char *err,
                        size_t errlen);

/* Makes a new keypair with the given name and role. Returns 0 or -errno. */
int dx_cert_generate(const char *name, const char *role, struct dx_cert *out);

/* Writes the public certificate to public_path and, when secret_path is not
 * NULL, the secret one there with mode 0600 (each to a temporary file,
 * then renamed). Existing files are not replaced. Returns 0 or -errno with
 * the reason in err. */
int dx_cert_save(const struct dx_cert *c, const char *public_path, const char *secret_path,
                 char *err, size_t errlen);

/* Makes sock a CURVE client presenting own (which must hold its secret
 * key) to the server whose public key is server_key. Returns 0 or -errno. */
int dx_cert_apply_client(void *sock, const struct dx_cert *own, const char *server_key);

/* Makes sock a CURVE server with own's keys whose clients are checked by
 * the ZAP handler of its context (domain DX_CERT_ZAP_DOMAIN). Call before
 * bind. Returns 0 or -errno. */
int dx_cert_apply_server(void *sock, const struct dx_cert *own);

#endif
