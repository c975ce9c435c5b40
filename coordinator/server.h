/* server.h - duplexd's event loop: the ROUTER socket (a CURVE server with
 * keys), who may send what, the liveness sweep, the per-turn store commit
 * and the signals that stop it or reload its keys. */
#ifndef COORD_SERVER_H
#define COORD_SERVER_H

#include <stddef.h>
#include <uv.h>

struct coord_server_config {
    const char *listen;   /* ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:7700 */
    const char *db;       /* SQLite file */
    int heartbeat_ms;     /* interval told to workers */
    int dead_after_ms;    /* silence after which a worker is lost */
    int spares;           /* free workers per backend kept for recoveries */
    const char *nccl_lib; /* NCCL for cuda jobs' unique ids; NULL: the default */
    int forget_after_h;   /* gone workers (lost, left) are forgotten after; 0: never */
    /* finished jobs leave memory (not the database) this long after they
     * ended (0: at the next sweep), and beyond keep_jobs of them the ones
     * that ended first (coord_jobs_set_retention) */
    int forget_jobs_after_h;
    int keep_jobs;
    /* CURVE: duplexd's secret certificate and the allow-list of the keys
     * that may talk to it (proto/authz.h); both NULL: no keys, every
     * peer is trusted (--insecure) */
    const char *key;
    const char *authorized;
};

typedef struct coord_server coord_server_t;

/* Opens the store, loads the registry and binds the socket. Returns 0 or
 * -errno with a message in err. */
int coord_server_create(const struct coord_server_config *cfg, coord_server_t **out, char *err,
                        size_t errlen);

/* Serves until SIGTERM or SIGINT; SIGHUP rereads the allow-list (a key
 * removed from it is refused from then on and its workers' sessions end).
 * Returns 0. */
int coord_server_run(coord_server_t *s);

void coord_server_destroy(coord_server_t *s);

/* The server's event loop (e.g. for a systemd watchdog timer). */
uv_loop_t *coord_server_loop(coord_server_t *s);

#endif
