/* main.c - duplexd: flags and config, then the server loop, and the exit
 * status: COORD_STORE_EXIT_FAILED when the database failed (fail-stop, see
 * coordinator/store.h), for systemd to restart duplexd from it. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/opts.h"
#include "common/sdnotify.h"
#include "common/version.h"
#include "coordinator/nccl_id.h"
#include "coordinator/server.h"
#include "coordinator/store.h"
#include "proto/envelope.h"
#include "proto/wire.h"

#define DEFAULT_LISTEN "tcp://127.0.0.1:7700"
#define DEFAULT_DB "var/duplex.db"
#define DEFAULT_HEARTBEAT_MS 500
#define DEFAULT_DEAD_AFTER_MS 2000
#define DEFAULT_FORGET_AFTER_H 168 /* a week */
#define DEFAULT_FORGET_JOBS_AFTER_H 24
#define DEFAULT_KEEP_JOBS 1000

static char *opt_config, *opt_listen, *opt_db, *opt_log_level, *opt_nccl_lib, *opt_key,
    *opt_authorized;
static int opt_heartbeat_ms, opt_dead_after_ms, opt_spares, opt_forget_after_h;
static int opt_forget_jobs_after_h, opt_keep_jobs;
static bool opt_insecure;

static const struct dx_opt options[] = {
    {"config", DX_OPT_STRING, &opt_config, NULL, 0, 0, 0, "FILE",
     "JSON file of option names to values (flags win)"},
    {"listen", DX_OPT_STRING, &opt_listen, DEFAULT_LISTEN, 0, 0, 0, "ADDR",
     "ZeroMQ endpoint to bind"},
    {"db", DX_OPT_STRING, &opt_db, DEFAULT_DB, 0, 0, 0, "PATH", "SQLite database file"},
    {"heartbeat-ms", DX_OPT_INT, &opt_heartbeat_ms, NULL, DEFAULT_HEARTBEAT_MS, 10, 60000, "MS",
     "heartbeat interval told to workers"},
    {"dead-after-ms", DX_OPT_INT, &opt_dead_after_ms, NULL, DEFAULT_DEAD_AFTER_MS, 20, 600000, "MS",
     "declare a worker lost after this long without a heartbeat"},
    {"spares", DX_OPT_INT, &opt_spares, NULL, 0, 0, 4096, "K",
     "free workers per backend that new jobs leave unused, for recoveries"},
    {"forget-after-h", DX_OPT_INT, &opt_forget_after_h, NULL, DEFAULT_FORGET_AFTER_H, 0, 87600,
     "HOURS", "forget workers lost or left this long (their events stay); 0: never"},
    {"forget-jobs-after-h", DX_OPT_INT, &opt_forget_jobs_after_h, NULL, DEFAULT_FORGET_JOBS_AFTER_H,
     0, 87600, "HOURS",
     "finished jobs leave memory this long after they ended (they stay in the database: "
     "status JOB, status --all); 0: at once"},
    {"keep-jobs", DX_OPT_INT, &opt_keep_jobs, NULL, DEFAULT_KEEP_JOBS, 0, 1000000, "N",
     "finished jobs kept in memory at most (the ones that ended first leave)"},
    {"nccl-lib", DX_OPT_STRING, &opt_nccl_lib, NULL, 0, 0, 0, "PATH",
     "NCCL library for the unique ids of cuda jobs (default $" COORD_NCCL_LIB_ENV
     ", else " COORD_NCCL_LIB_DEFAULT ")"},
    {"key", DX_OPT_STRING, &opt_key, NULL, 0, 0, 0, "FILE",
     "duplexd's secret CURVE certificate (duplexctl keys gen --role server); with --authorized"},
    {"authorized", DX_OPT_STRING, &opt_authorized, NULL, 0, 0, 0, "FILE",
     "allow-list: one \"KEY ROLE NAME [ids=..] [host=..]\" line per key that may connect "
     "(reread on SIGHUP)"},
    {"insecure", DX_OPT_FLAG, &opt_insecure, NULL, 0, 0, 0, NULL,
     "serve without keys on a non-loopback address: anyone who reaches the port controls the "
     "cluster"},
    {"log-level", DX_OPT_STRING, &opt_log_level, "info", 0, 0, 0, "LEVEL",
     "debug, info, warn or error"},
    {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
};

static const struct dx_cli cli = {
    .prog = "duplexd",
    .synopsis = "duplexd [options]\n\nThe duplex coordinator daemon.",
    .version = DX_VERSION " (protocol " DX_STRINGIFY(DX_PROTOCOL_VERSION) ")",
    .log_level = &opt_log_level,
};

int main(int argc, char **argv)
{
    struct coord_server_config cfg;
    coord_server_t *server = NULL;
    uv_timer_t watchdog;
    char err[512], sd_status[512];
    int status;

    dx_log_init("duplexd", DX_LOG_INFO);
    /* A write past the file size limit (RLIMIT_FSIZE, e.g. a quota or a
     * limit set by the supervisor) would kill duplexd with SIGXFSZ, leaving
     * no word of why; ignored, the write fails with EFBIG instead, and the
     * store fails stop with that cause in the log. */
    signal(SIGXFSZ, SIG_IGN);
    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    status = EXIT_FAILURE;
    if (opt_dead_after_ms <= opt_heartbeat_ms) {
        fprintf(stderr, "duplexd: --dead-after-ms (%d) must be longer than --heartbeat-ms (%d)\n",
                opt_dead_after_ms, opt_heartbeat_ms);
        status = DX_OPTS_EXIT_USAGE;
        goto out;
    }

    if (!opt_key && !opt_authorized && !dx_endpoint_is_local(opt_listen) && !opt_insecure) {
        fprintf(stderr,
                "duplexd: refusing to listen on %s without keys: anyone who reaches it could "
                "drain workers, forge reports and cancel jobs. Give --key and --authorized "
                "(see duplexctl keys gen), or --insecure to serve in clear anyway\n",
                opt_listen);
        status = DX_OPTS_EXIT_USAGE;
        goto out;
    }
    if (!opt_key && !opt_authorized)
        dx_warn("no keys (--key, --authorized): every peer that reaches %s is trusted", opt_listen);
    cfg = (struct coord_server_config){
        .listen = opt_listen,
        .db = opt_db,
        .heartbeat_ms = opt_heartbeat_ms,
        .dead_after_ms = opt_dead_after_ms,
        .spares = opt_spares,
        .forget_after_h = opt_forget_after_h,
        .forget_jobs_after_h = opt_forget_jobs_after_h,
        .keep_jobs = opt_keep_jobs,
        .nccl_lib = opt_nccl_lib,
        .key = opt_key,
        .authorized = opt_authorized,
    };
    if (coord_server_create(&cfg, &server, err, sizeof(err)) < 0) {
        dx_error("%s", err);
        if (coord_store_any_failed())
            status = COORD_STORE_EXIT_FAILED;
        goto out;
    }
    /* serving from here on: tell systemd (Type=notify), and ping its
     * watchdog from the loop so that a hung loop gets restarted */
    if (dx_sd_watchdog_start(coord_server_loop(server), &watchdog) < 0)
        dx_warn("cannot start the systemd watchdog timer");
    snprintf(sd_status, sizeof(sd_status), "listening on %s", opt_listen);
    dx_sd_ready(sd_status);
    coord_server_run(server);
    dx_sd_stopping();
    coord_server_destroy(server); /* closes the watchdog timer with the loop */
    status = EXIT_SUCCESS;
    if (coord_store_any_failed()) {
        /* what is committed is all there is; a new duplexd goes on from it */
        dx_error("exiting with status %d: the database failed (see above); a restart goes on "
                 "from what it holds",
                 COORD_STORE_EXIT_FAILED);
        status = COORD_STORE_EXIT_FAILED;
    }
out:
    dx_opts_free(options);
    return status;
}
