/* authz.h - duplexd's allow-list: which CURVE public keys may talk to it,
 * in which role, under which name, and (for workers) as which worker ids.
 *
 * The file (duplexd --authorized FILE) has one key a line:
 *
 *     # comments start with "# " (a key may itself start with '#')
 *     <public key>  worker    gpu-node3  ids=node3-gpu0,node3-gpu1  host=node3
 *     <public key>  operator  alice
 *     <public key>  reader    grafana
 *
 * Fields are separated by blanks. A worker line needs ids= (a comma list of
 * worker ids, each may end in '*' to match a prefix; "*" alone is any id)
 * and/or host= (Register.host must equal it); both, when given, must hold.
 * host= alone allows the ids "HOST-..." (HOST-gpuN is a worker's default).
 * Names are 1..64 characters of [A-Za-z0-9._@-], unique in the file; a key
 * appears once. Any error refuses the whole file, naming the line.
 */
#ifndef DX_AUTHZ_H
#define DX_AUTHZ_H

#include <stdbool.h>
#include <stddef.h>

#include "proto/cert.h"
#include "proto/duplex.pb-c.h"

/* Files larger than this, or with more lines, are refused. */
#define DX_AUTHZ_FILE_MAX (16 * 1024 * 1024)
#define DX_AUTHZ_LINE_MAX 4096

enum coord_role {
    COORD_ROLE_WORKER,
    COORD_ROLE_OPERATOR,
    COORD_ROLE_READER,
};

struct coord_principal {
    char key[DX_CERT_KEY_LEN + 1];
    enum coord_role role;
    char name[DX_CERT_META_MAX + 1];
    char **ids; /* worker: allowed id patterns (may be empty when host is set) */
    size_t n_ids;
    char *host; /* worker: the host it must register from, or NULL */
};

typedef struct dx_authz dx_authz_t;

/* Parses an allow-list's text (len bytes). source names it in errors.
 * Returns 0 or -EINVAL / -ENOMEM with the reason in err. */
int dx_authz_parse(const char *text, size_t len, const char *source, dx_authz_t **out, char *err,
                   size_t errlen);

/* Reads and parses the file at path. Returns 0 or -errno with err. */
int dx_authz_load(const char *path, dx_authz_t **out, char *err, size_t errlen);

void dx_authz_destroy(dx_authz_t *a);

/* The principal of a public key (Z85), or NULL when it is not listed. */
const struct coord_principal *dx_authz_find(const dx_authz_t *a, const char *key);

size_t dx_authz_count(const dx_authz_t *a);

/* Whether s is a key's name as the allow-list takes it: 1-64 characters
 * of A-Z a-z 0-9 . _ @ - (duplexctl keys gen checks --name with it). */
bool dx_authz_name_ok(const char *s);

/* Whether a worker principal may speak for worker_id (registering from
 * host; NULL: a later message, whose host was checked at registration). */
bool dx_authz_worker_may_be(const struct coord_principal *p, const char *worker_id,
                            const char *host);

/* Whether a role may send a message of this type to duplexd. When it may
 * not, *rule names the rule (a static string) for the Error. */
bool dx_authz_may_send(enum coord_role role, Duplex__MsgType type, const char **rule);

const char *coord_role_name(enum coord_role role);

/* Parses "worker", "operator" or "reader". Returns 0 or -EINVAL. */
int coord_role_parse(const char *s, enum coord_role *out);

#endif
