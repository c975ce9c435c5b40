/* ctl.h - what duplexctl's commands share: the global options and the
 * signature every command has. */
#ifndef CTL_H
#define CTL_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common/version.h"

#define CTL_DEFAULT_COORDINATOR "tcp://127.0.0.1:7700"
#define CTL_DEFAULT_TIMEOUT_S 3
/* A command's own --timeout help: it has no default of its own (0: the
 * global --timeout, whose default is CTL_DEFAULT_TIMEOUT_S). */
#define CTL_TIMEOUT_HELP                                                                           \
    "how long to wait for duplexd to answer (default: the global --timeout, " DX_STRINGIFY(        \
        CTL_DEFAULT_TIMEOUT_S) ")"

/* Exit statuses. */
#define CTL_EXIT_OK 0
#define CTL_EXIT_FAIL 1  /* the request failed or was refused */
#define CTL_EXIT_USAGE 2 /* bad command line */

/* Where `duplexctl local up` keeps its cluster's keys (under its --dir),
 * and the files in it: duplexctl finds the operator key there by default. */
#define CTL_LOCAL_DEFAULT_DIR "var/local"
#define CTL_LOCAL_KEYS "keys"
#define CTL_LOCAL_SERVER_KEY "duplexd"
#define CTL_LOCAL_OPERATOR_KEY "operator"
#define CTL_LOCAL_WORKER_KEY "workers"
#define CTL_LOCAL_AUTHORIZED "authorized"

struct ctl_globals {
    char coordinator[512]; /* resolved: flag, $DUPLEX_COORDINATOR, default */
    int timeout_s;
    /* CURVE: our secret certificate and duplexd's public one: the flag,
     * else $DUPLEX_KEY / $DUPLEX_SERVER_KEY, else a local cluster's
     * (var/local/keys) when it exists; "" when none */
    char key[1024];
    char server_key[1024];
    bool insecure; /* --insecure: without keys, talk in clear */
};

/* Each command gets argv starting at its own name and returns an exit
 * status. Command options --coordinator and --timeout override globals. */
typedef int (*ctl_command_fn)(struct ctl_globals *g, int argc, char **argv);

int ctl_cmd_workers(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_local(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_plan(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_place(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_submit(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_status(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_events(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_cancel(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_drain(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_undrain(struct ctl_globals *g, int argc, char **argv);
int ctl_cmd_forget(struct ctl_globals *g, int argc, char **argv); /* workers forget */
int ctl_cmd_keys(struct ctl_globals *g, int argc, char **argv);

/* keys.c: DIR/NAME.key and DIR/NAME.key_secret. Returns 0 or -ENAMETOOLONG. */
int ctl_keys_paths(const char *dir, const char *name, char *pub, size_t publen, char *sec,
                   size_t seclen);
/* keys.c: makes and writes a keypair named name with role in dir. */
struct dx_cert;
int ctl_keys_make(const char *dir, const char *name, const char *role, struct dx_cert *out,
                  char *err, size_t errlen);
/* keys.c: the allow-list line of a certificate (ids/host: a worker's). */
int ctl_keys_line(const struct dx_cert *c, const char *ids, const char *host, char *out,
                  size_t outlen);

/* Asks duplexd for the status of job id (0: all jobs) as JSON. Returns 0
 * or -errno (the reason printed to stderr after "prog: "). */
int ctl_job_status(struct ctl_globals *g, uint64_t id, json_t **doc, const char *prog);

/* Prints one job's status (a JobStatusReply for one job) for people. */
void ctl_print_job(json_t *job);

/* Applies a command's own --coordinator / --timeout (NULL / 0 when not
 * given) over the globals. */
void ctl_globals_override(struct ctl_globals *g, const char *coordinator, int timeout_s);

#endif
