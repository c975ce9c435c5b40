/* keys.c - `duplexctl keys gen`: makes a CURVE keypair as ZeroMQ
 * certificates (NAME.key public, NAME.key_secret mode 0600) and prints the
 * allow-list line that lets duplexd accept it. Needs no cluster. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/fs.h"
#include "common/log.h"
#include "common/opts.h"
#include "proto/authz.h"
#include "ctl/ctl.h"
#include "proto/cert.h"

int ctl_keys_paths(const char *dir, const char *name, char *pub, size_t publen, char *sec,
                   size_t seclen)
{
    if (snprintf(pub, publen, "%s/%s.key", dir, name) >= (int)publen ||
        snprintf(sec, seclen, "%s/%s.key_secret", dir, name) >= (int)seclen)
        return -ENAMETOOLONG;
    return 0;
}

/* The allow-list line of a certificate (no newline); servers have none. */
int ctl_keys_line(const struct dx_cert *c, const char *ids, const char *host, char *out,
                  size_t outlen)
{
    int n;

    if (strcmp(c->role, "worker") == 0)
        n = snprintf(out, outlen, "%s worker %s%s%s%s%s", c->public_key, c->name,
                     ids || !host ? " ids=" : "",
                     ids     ? ids
                     : !host ? c->name
                             : "",
                     host ? " host=" : "", host ? host : "");
    else
        n = snprintf(out, outlen, "%s %s %s", c->public_key, c->role, c->name);
    return n < 0 || (size_t)n >= outlen ? -ENAMETOOLONG : 0;
}

int ctl_keys_make(const char *dir, const char *name, const char *role, struct dx_cert *out,
                  char *err, size_t errlen)
{
    char pub[4096], sec[4096];
    int rc;

    if ((rc = ctl_keys_paths(dir, name, pub, sizeof(pub), sec, sizeof(sec))) < 0)
        return dx_errf(err, errlen, rc, "%s: path too long", dir);
    if ((rc = dx_mkdir_p(dir, 0700)) < 0)
        return dx_errf(err, errlen, rc, "cannot create %s: %s", dir, strerror(-rc));
    if ((rc = dx_cert_generate(name, role, out)) < 0)
        return dx_errf(err, errlen, rc, "cannot make a keypair: %s", strerror(-rc));
    return dx_cert_save(out, pub, sec, err, errlen);
}

static int keys_gen(int argc, char **argv)
{
    char *role = NULL, *name = NULL, *dir = NULL, *ids = NULL, *host = NULL;
    const struct dx_opt options[] = {
        {"role", DX_OPT_STRING, &role, NULL, 0, 0, 0, "ROLE",
         "worker, operator, reader, or server (duplexd's own key)"},
        {"name", DX_OPT_STRING, &name, NULL, 0, 0, 0, "NAME",
         "who holds it (A-Z a-z 0-9 . _ @ -): job owners and events show it"},
        {"out", DX_OPT_STRING, &dir, ".", 0, 0, 0, "DIR", "where NAME.key and NAME.key_secret go"},
        {"ids", DX_OPT_STRING, &ids, NULL, 0, 0, 0, "ID,...",
         "worker: the worker ids it may register as ('*' ends a prefix; default NAME)"},
        {"host", DX_OPT_STRING, &host, NULL, 0, 0, 0, "HOST",
         "worker: the host it must register from"},
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    const struct dx_cli cli = {
        .prog = "duplexctl keys gen",
        .synopsis = "duplexctl keys gen --role ROLE --name NAME [--out DIR]\n\n"
                    "Makes a CURVE keypair (DIR/NAME.key, DIR/NAME.key_secret with mode 0600)\n"
                    "and prints the line to add to duplexd's --authorized file.",
    };
    struct dx_cert cert;
    char err[512], line[8192], pub[4096], sec[4096];
    int status;

    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = CTL_EXIT_USAGE;
    if (!role || !name) {
        fprintf(stderr, "duplexctl keys gen: --role and --name are required (see --help)\n");
        goto out;
    }
    if (strcmp(role, "worker") != 0 && strcmp(role, "operator") != 0 &&
        strcmp(role, "reader") != 0 && strcmp(role, "server") != 0) {
        fprintf(stderr,
                "duplexctl keys gen: --role %s: expected worker, operator, reader or server\n",
                role);
        goto out;
    }
    if (!dx_authz_name_ok(name)) {
        fprintf(stderr, "duplexctl keys gen: --name: 1-64 characters of A-Z a-z 0-9 . _ @ -\n");
        goto out;
    }
    if ((ids || host) && strcmp(role, "worker") != 0) {
        fprintf(stderr, "duplexctl keys gen: --ids and --host are for worker keys\n");
        goto out;
    }
    if ((ids && (!ids[0] || strpbrk(ids, " \t\n"))) ||
        (host && (!host[0] || strpbrk(host, " \t\n*")))) {
        fprintf(stderr, "duplexctl keys gen: --ids and --host take no blanks\n");
        goto out;
    }
    status = CTL_EXIT_FAIL;
    if (ctl_keys_make(dir, name, role, &cert, err, sizeof(err)) < 0 ||
        ctl_keys_paths(dir, name, pub, sizeof(pub), sec, sizeof(sec)) < 0) {
        fprintf(stderr, "duplexctl keys gen: %s\n", err);
        goto out;
    }
    fprintf(stderr, "wrote %s and %s (secret: keep it on the machine that uses it)\n", pub, sec);
    if (strcmp(role, "server") == 0) {
        fprintf(stderr, "give duplexd --key %s; give workers and duplexctl --server-key %s\n", sec,
                pub);
    } else {
        ctl_keys_line(&cert, ids, host, line, sizeof(line));
        fprintf(stderr, "add this line to duplexd's --authorized file, then reload it "
                        "(systemctl reload duplexd, or kill -HUP):\n");
        printf("%s\n", line);
    }
    status = CTL_EXIT_OK;
out:
    dx_opts_free(options);
    return status;
}

int ctl_cmd_keys(struct ctl_globals *g, int argc, char **argv)
{
    (void)g;
    if (argc >= 2 && strcmp(argv[1], "gen") == 0)
        return keys_gen(argc - 1, argv + 1);
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        printf("usage: duplexctl keys gen --role ROLE --name NAME [--out DIR]\n\n"
               "Makes CURVE keys for duplexd, its workers and its users (see --help of gen).\n");
        return CTL_EXIT_OK;
    }
    fprintf(stderr, "duplexctl keys: expected \"gen\" (see duplexctl keys gen --help)\n");
    return CTL_EXIT_USAGE;
}
