/* simfleet.h - what the benches that simulate workers against a real
 * duplexd share (bench_curve, bench_fleet): clocks and dying, a duplexd
 * child on loopback with a temporary directory (database, log, keys), its
 * CPU time per thread and its memory from /proc, the machine's listen-queue
 * overflows, the simulated fleet's topology (8-GPU nodes, worker ids
 * nodeNNNN-gpuK) and its DEALER sockets.
 *
 * Errors here are fatal: sim_die() prints the program's name and the
 * message, kills every duplexd started with sim_daemon_start and exits 1.
 */
#ifndef DX_BENCH_SIMFLEET_H
#define DX_BENCH_SIMFLEET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#include "proto/cert.h"

#define SIM_GPUS_PER_NODE 8
#define SIM_MAX_DAEMONS 4       /* started at once */
#define SIM_DAEMON_START_S 15.0 /* until it listens */
#define SIM_DAEMON_STOP_S 10.0  /* after SIGTERM, then SIGKILL */

/* CLOCK_MONOTONIC in seconds; CLOCK_REALTIME in ms (duplexd's event times). */
double sim_now_s(void);
int64_t sim_wall_ms(void);

void sim_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* A duplexd child. name: for messages; set before sim_daemon_dir. */
struct sim_daemon {
    const char *name;
    pid_t pid;
    int slot; /* in sim_die's list, -1 when not running */
    char dir[64];
    char endpoint[64];
    char db[128];
};

/* Makes the daemon's temporary directory /tmp/duplex-bench-TAG-XXXXXX (for
 * files it needs before it starts, e.g. keys). */
void sim_daemon_dir(struct sim_daemon *dm, const char *tag);

/* Starts BUILD/bin/duplexd (path duplexd) on a free loopback port with
 * its database and log (DIR/duplexd.log, level warn) in dm->dir, the
 * NULL-terminated extra arguments after, and waits until it listens. */
void sim_daemon_start(struct sim_daemon *dm, const char *duplexd, const char *const *extra);

/* Prints the end of the daemon's log to stderr. */
void sim_daemon_log_tail(const struct sim_daemon *dm);

/* SIGTERM, wait (SIGKILL after SIM_DAEMON_STOP_S), and remove its
 * directory. Returns 0 when it exited with status 0, else -ECHILD (the end
 * of its log printed to stderr first). */
int sim_daemon_stop(struct sim_daemon *dm);

/* CPU time of pid in seconds: its main thread (the event loop), and its
 * other threads (ZeroMQ's I/O thread). */
struct sim_proc_cpu {
    double main, other;
};
struct sim_proc_cpu sim_proc_cpu(pid_t pid);

/* A "kB" line of a /proc file: /proc/PID/status ("VmRSS", "VmHWM", ...),
 * /proc/meminfo ("MemAvailable", ...); -1 if none. */
long sim_kb_field(const char *file, const char *field);

/* TcpExtListenOverflows of /proc/net/netstat (the whole machine's): SYNs
 * dropped because a listen queue was full; -1 when unknown. */
long long sim_listen_overflows(void);

/* This process's CPU time (every thread), seconds. */
double sim_self_cpu_s(void);

/* Raises RLIMIT_NOFILE to want (within the hard limit, else dies). */
void sim_raise_nofile(rlim_t want);

/* The directory this program is in (BUILD/bench). */
void sim_exe_dir(char *out, size_t len);

/* The simulated fleet's topology: worker i is GPU i % 8 of node i / 8,
 * id nodeNNNN-gpuK, host and node nodeNNNN. */
void sim_worker_id(int i, char *out, size_t len);
void sim_node_name(int i, char *out, size_t len);

/* Worker i's Register (backend's capabilities, as duplex-worker sends
 * them; this process's pid), encoded with request_id; free() *buf. */
void sim_register_encode(int i, const char *backend, const char *data_addr, uint64_t request_id,
                         uint8_t **buf, size_t *len);

/* A ZeroMQ context for up to max_sockets sockets. */
void *sim_context(int max_sockets);

/* A DEALER connected to endpoint, its ZMQ_FD added to epfd with tag.
 * like_agent: the worker agent's options (ZMQ_IMMEDIATE, reconnect every
 * 100 ms up to 2 s), else sends queue until connected. key/server_key:
 * CURVE client (NULL: clear). Linger 0. */
void *sim_dealer(void *ctx, const char *endpoint, bool like_agent, const struct dx_cert *key,
                 const char *server_key, int epfd, uint32_t tag);

/* Takes the DEALER out of epfd and closes it at once (linger 0): to
 * duplexd, like the death of its process. */
void sim_dealer_close(void *sock, int epfd);

#endif
