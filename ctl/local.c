/* local.c - `duplexctl local up|down`: a one-machine cluster of duplexd and N
 * workers running in the background, with state, logs and pid files under
 * one directory:
 *
 *   DIR/duplex.db           duplexd's database
 *   DIR/logs/duplexd.log    DIR/logs/worker-K.log
 *   DIR/run/duplexd.pid     DIR/run/worker-K.pid
 *
 * The programs are taken from the directory duplexctl itself is in.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/opts.h"
#include "ctl/client.h"
#include "ctl/ctl.h"
#include "proto/cert.h"

#define LOCAL_DEFAULT_DIR CTL_LOCAL_DEFAULT_DIR
#define LOCAL_MAX_WORKERS 256
#define LOCAL_POLL_MS 100
#define LOCAL_STOP_TIMEOUT_MS 5000
#define LOCAL_LOG_TAIL_BYTES 2000

/* ---- pid files and processes -------------------------------------------- */

static void pid_path(const char *dir, const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s/run/%s.pid", dir, name);
}

static pid_t pid_read(const char *path)
{
    FILE *f = fopen(path, "r");
    long pid = 0;

    if (!f)
        return 0;
    if (fscanf(f, "%ld", &pid) != 1 || pid <= 1 || pid > INT_MAX)
        pid = 0;
    fclose(f);
    return (pid_t)pid;
}

static int pid_write(const char *path, pid_t pid)
{
    char tmp[PATH_MAX];
    FILE *f;

    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    f = fopen(tmp, "w");
    if (!f)
        return -errno;
    fprintf(f, "%d\n", (int)pid);
    if (fclose(f) != 0 || rename(tmp, path) < 0)
        return -errno;
    return 0;
}

/* True when pid is a live (not zombie) process running one of our programs;
 * guards against pid files whose pid was reused. */
static bool proc_is_ours(pid_t pid)
{
    char path[64], exe[PATH_MAX], stat[512];
    const char *state;
    FILE *f;
    ssize_t n;

    waitpid(pid, NULL, WNOHANG); /* reap it if it is our exited child */
    if (kill(pid, 0) < 0 && errno != EPERM)
        return false;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    f = fopen(path, "r");
    if (!f)
        return true; /* no /proc: trust the pid file */
    n = (ssize_t)fread(stat, 1, sizeof(stat) - 1, f);
    fclose(f);
    stat[n > 0 ? n : 0] = '\0';
    state = strrchr(stat, ')');
    if (state && (state[2] == 'Z' || state[2] == 'X'))
        return false; /* exited, waiting to be reaped by its parent */
    snprintf(path, sizeof(path), "/proc/%d/exe", (int)pid);
    n = readlink(path, exe, sizeof(exe) - 1);
    if (n < 0)
        return true;
    exe[n] = '\0';
    return strstr(basename(exe), "duplex") != NULL;
}

static bool proc_wait_gone(pid_t pid, int timeout_ms)
{
    int64_t deadline = dx_mono_ms() + timeout_ms;

    while (proc_is_ours(pid)) {
        if (dx_mono_ms() >= deadline)
            return false;
        usleep(LOCAL_POLL_MS * 1000 / 2);
    }
    return true;
}

/* Starts argv[0] detached, output appended to log_path. Returns the pid or
 * -errno. */
static pid_t proc_spawn(char *const argv[], const char *log_path)
{
    pid_t pid = fork();

    if (pid < 0)
        return -errno;
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        int log = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (devnull < 0 || log < 0 || dup2(devnull, STDIN_FILENO) < 0 ||
            dup2(log, STDOUT_FILENO) < 0 || dup2(log, STDERR_FILENO) < 0)
            _exit(127);
        setsid();
        execv(argv[0], argv);
        fprintf(stderr, "duplexctl: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

static void print_log_tail(const char *path)
{
    char buf[LOCAL_LOG_TAIL_BYTES + 1];
    FILE *f = fopen(path, "r");
    size_t n;

    if (!f)
        return;
    if (fseek(f, 0, SEEK_END) == 0 && ftell(f) > LOCAL_LOG_TAIL_BYTES)
        fseek(f, -LOCAL_LOG_TAIL_BYTES, SEEK_END);
    else
        fseek(f, 0, SEEK_SET);
    n = fread(buf, 1, LOCAL_LOG_TAIL_BYTES, f);
    buf[n] = '\0';
    fclose(f);
    fprintf(stderr, "--- end of %s ---\n%s", path, buf);
}

/* ---- down ------------------------------------------------------------------ */

/* Stops the processes of the given pid files together: SIGTERM to all, then
 * SIGKILL to those still running after a deadline. Removes the pid files and
 * returns how many processes were running. */
static int stop_group(const char *dir, char names[][32], int n)
{
    pid_t pids[LOCAL_MAX_WORKERS + 1];
    char path[PATH_MAX];
    int running = 0;

    for (int i = 0; i < n; i++) {
        pid_path(dir, names[i], path, sizeof(path));
        pids[i] = pid_read(path);
        if (pids[i] > 0 && proc_is_ours(pids[i])) {
            kill(pids[i], SIGTERM);
            running++;
        } else {
            pids[i] = 0;
        }
    }
    for (int i = 0; i < n; i++) {
        if (pids[i] > 0 && !proc_wait_gone(pids[i], LOCAL_STOP_TIMEOUT_MS)) {
            fprintf(stderr, "duplexctl: %s (pid %d) did not stop in %d ms; killing it\n", names[i],
                    (int)pids[i], LOCAL_STOP_TIMEOUT_MS);
            kill(pids[i], SIGKILL);
            proc_wait_gone(pids[i], LOCAL_STOP_TIMEOUT_MS);
        }
        pid_path(dir, names[i], path, sizeof(path));
        unlink(path);
    }
    return running;
}

/* Stops the workers first (so they can say goodbye), then duplexd. */
static int local_stop(const char *dir, bool quiet)
{
    static char names[LOCAL_MAX_WORKERS][32];
    char coordinator_name[1][32] = {"duplexd"};
    int workers, coordinator;

    for (int k = 0; k < LOCAL_MAX_WORKERS; k++)
        snprintf(names[k], sizeof(names[k]), "worker-%d", k);
    workers = stop_group(dir, names, LOCAL_MAX_WORKERS);
    coordinator = stop_group(dir, coordinator_name, 1);
    if (quiet)
        return workers + coordinator;
    if (!workers && !coordinator)
        printf("no local cluster running in %s\n", dir);
    else
        printf("stopped %d worker%s%s in %s\n", workers, workers == 1 ? "" : "s",
               coordinator ? " and duplexd" : "", dir);
    return workers + coordinator;
}

/* ---- up -------------------------------------------------------------------- */

struct local_up {
    const char *dir;
    const char *coordinator;
    struct ctl_globals g; /* duplexctl's own link to the cluster: its operator key */
    char keys[PATH_MAX];  /* DIR/keys */
    const char *backend;
    int workers;
    int timeout_s;
    char bindir[PATH_MAX];
    char hostname[HOST_NAME_MAX + 1];
    pid_t coordinator_pid;
};

static int find_bindir(char *out, size_t len)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);

    if (n < 0)
        return -errno;
    self[n] = '\0';
    snprintf(out, len, "%s", dirname(self));
    return 0;
}

/* Counts workers alive in duplexd's answer; -1 when duplexd did not answer. */
static int count_alive(const struct local_up *u, char *err, size_t errlen)
{
    ctl_client_t *client = NULL;
    struct ctl_workers list = {0};
    int alive = -1;

    if (ctl_client_create(&u->g, LOCAL_POLL_MS * 5, &client, err, errlen) == 0 &&
        ctl_workers_fetch(client, 0, &list, err, errlen) == 0) {
        alive = 0;
        for (size_t i = 0; i < list.n; i++)
            alive += strcmp(list.workers[i]->state, "alive") == 0;
    }
    ctl_workers_clear(&list);
    ctl_client_destroy(client);
    return alive;
}

static int spawn_named(const struct local_up *u, const char *name, char *const argv[],
                       pid_t *pid_out)
{
    char log[PATH_MAX], pidfile[PATH_MAX];
    pid_t pid;
    int rc;

    snprintf(log, sizeof(log), "%s/logs/%s.log", u->dir, name);
    pid_path(u->dir, name, pidfile, sizeof(pidfile));
    pid = proc_spawn(argv, log);
    if (pid < 0) {
        fprintf(stderr, "duplexctl: cannot start %s: %s\n", name, strerror((int)-pid));
        return (int)pid;
    }
    if ((rc = pid_write(pidfile, pid)) < 0) {
        fprintf(stderr, "duplexctl: cannot write %s: %s\n", pidfile, strerror(-rc));
        kill(pid, SIGKILL);
        return rc;
    }
    if (pid_out)
        *pid_out = pid;
    return 0;
}

static int start_coordinator(struct local_up *u)
{
    char exe[PATH_MAX], db[PATH_MAX], log[PATH_MAX], err[512], key[PATH_MAX], pub[PATH_MAX],
        authorized[PATH_MAX];
    char *argv[] = {exe,     "--listen", (char *)u->coordinator, "--db",     db,
                    "--key", key,        "--authorized",         authorized, NULL};
    int64_t deadline;

    ctl_keys_paths(u->keys, CTL_LOCAL_SERVER_KEY, pub, sizeof(pub), key, sizeof(key));
    snprintf(authorized, sizeof(authorized), "%s/%s", u->keys, CTL_LOCAL_AUTHORIZED);
    snprintf(exe, sizeof(exe), "%s/duplexd", u->bindir);
    snprintf(db, sizeof(db), "%s/duplex.db", u->dir);
    snprintf(log, sizeof(log), "%s/logs/duplexd.log", u->dir);
    if (spawn_named(u, "duplexd", argv, &u->coordinator_pid) < 0)
        return -1;
    deadline = dx_mono_ms() + (int64_t)u->timeout_s * 1000;
    while (count_alive(u, err, sizeof(err)) < 0) {
        if (!proc_is_ours(u->coordinator_pid)) {
            fprintf(stderr, "duplexctl: duplexd exited during start-up\n");
            print_log_tail(log);
            return -1;
        }
        if (dx_mono_ms() >= deadline) {
            fprintf(stderr, "duplexctl: %s\n", err);
            print_log_tail(log);
            return -1;
        }
    }
    return 0;
}

static int start_workers(struct local_up *u)
{
    char exe[PATH_MAX], gpu[16], name[32], log[PATH_MAX], err[512], key[PATH_MAX], pub[PATH_MAX];
    char *argv[] = {exe,
                    "--coordinator",
                    (char *)u->coordinator,
                    "--backend",
                    (char *)u->backend,
                    "--gpu",
                    gpu,
                    "--node",
                    u->hostname,
                    "--key",
                    key,
                    "--server-key",
                    u->g.server_key,
                    NULL};
    int64_t deadline;
    int alive = 0;

    ctl_keys_paths(u->keys, CTL_LOCAL_WORKER_KEY, pub, sizeof(pub), key, sizeof(key));
    snprintf(exe, sizeof(exe), "%s/duplex-worker", u->bindir);
    for (int k = 0; k < u->workers; k++) {
        snprintf(gpu, sizeof(gpu), "%d", k);
        snprintf(name, sizeof(name), "worker-%d", k);
        if (spawn_named(u, name, argv, NULL) < 0)
            return -1;
    }
    deadline = dx_mono_ms() + (int64_t)u->timeout_s * 1000;
    while ((alive = count_alive(u, err, sizeof(err))) < u->workers) {
        if (dx_mono_ms() >= deadline) {
            fprintf(stderr, "duplexctl: only %d of %d workers alive after %d s; see %s/logs\n",
                    alive < 0 ? 0 : alive, u->workers, u->timeout_s, u->dir);
            snprintf(log, sizeof(log), "%s/logs/worker-0.log", u->dir);
            print_log_tail(log);
            return -1;
        }
        usleep(LOCAL_POLL_MS * 1000);
    }
    return 0;
}

/* The cluster's keys in DIR/keys, made on its first start and kept: duplexd's,
 * one for duplexctl (operator) and one the workers share (any worker id
 * from this host), with the allow-list naming the last two. */
static int local_keys(struct local_up *u)
{
    static const struct {
        const char *name, *role;
    } keys[] = {
        {CTL_LOCAL_SERVER_KEY, "server"},
        {CTL_LOCAL_OPERATOR_KEY, "operator"},
        {CTL_LOCAL_WORKER_KEY, "worker"},
    };
    char pub[PATH_MAX], sec[PATH_MAX], authorized[PATH_MAX], tmp[PATH_MAX + 8], err[512], line[512];
    struct dx_cert cert;
    FILE *f;
    int fd;

    snprintf(u->keys, sizeof(u->keys), "%s/%s", u->dir, CTL_LOCAL_KEYS);
    snprintf(authorized, sizeof(authorized), "%s/%s", u->keys, CTL_LOCAL_AUTHORIZED);
    ctl_keys_paths(u->keys, CTL_LOCAL_OPERATOR_KEY, pub, sizeof(pub), u->g.key, sizeof(u->g.key));
    ctl_keys_paths(u->keys, CTL_LOCAL_SERVER_KEY, u->g.server_key, sizeof(u->g.server_key), sec,
                   sizeof(sec));
    if (access(authorized, R_OK) == 0)
        return 0; /* made by an earlier start: it is renamed in place last */
    snprintf(tmp, sizeof(tmp), "%s.tmp", authorized);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT && dx_mkdir_p(u->keys, 0700) == 0)
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || !(f = fdopen(fd, "w"))) {
        fprintf(stderr, "duplexctl: cannot write %s: %s\n", tmp, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    fprintf(f, "# duplexd's allow-list for the local cluster in %s (duplexctl local up)\n", u->dir);
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        ctl_keys_paths(u->keys, keys[i].name, pub, sizeof(pub), sec, sizeof(sec));
        unlink(pub); /* half-made keys of an interrupted start */
        unlink(sec);
        if (ctl_keys_make(u->keys, keys[i].name, keys[i].role, &cert, err, sizeof(err)) < 0) {
            fprintf(stderr, "duplexctl: %s\n", err);
            fclose(f);
            unlink(tmp);
            return -1;
        }
        if (strcmp(keys[i].role, "server") != 0 &&
            ctl_keys_line(&cert, NULL, strcmp(keys[i].role, "worker") == 0 ? u->hostname : NULL,
                          line, sizeof(line)) == 0)
            fprintf(f, "%s\n", line);
    }
    if (fflush(f) != 0 || fsync(fileno(f)) < 0 || fclose(f) != 0 || rename(tmp, authorized) < 0) {
        fprintf(stderr, "duplexctl: cannot write %s: %s\n", authorized, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

static int local_up(struct local_up *u)
{
    char path[PATH_MAX], sub[PATH_MAX];
    pid_t running;
    int rc;

    pid_path(u->dir, "duplexd", path, sizeof(path));
    running = pid_read(path);
    if (running > 0 && proc_is_ours(running)) {
        fprintf(stderr,
                "duplexctl: a local cluster is already running in %s (duplexd pid %d); "
                "stop it with: duplexctl local down --dir %s\n",
                u->dir, (int)running, u->dir);
        return CTL_EXIT_FAIL;
    }
    local_stop(u->dir, true); /* leftovers of a cluster whose duplexd died */
    if (find_bindir(u->bindir, sizeof(u->bindir)) < 0) {
        fprintf(stderr, "duplexctl: cannot find my own directory: %s\n", strerror(errno));
        return CTL_EXIT_FAIL;
    }
    if (gethostname(u->hostname, sizeof(u->hostname)) < 0)
        snprintf(u->hostname, sizeof(u->hostname), "localhost");
    for (const char *d = "logs"; d; d = strcmp(d, "logs") == 0 ? "run" : NULL) {
        snprintf(sub, sizeof(sub), "%s/%s", u->dir, d);
        if ((rc = dx_mkdir_p(sub, 0755)) < 0) {
            fprintf(stderr, "duplexctl: cannot create %s: %s\n", sub, strerror(-rc));
            return CTL_EXIT_FAIL;
        }
    }
    if (local_keys(u) < 0)
        return CTL_EXIT_FAIL;
    if (start_coordinator(u) < 0 || start_workers(u) < 0) {
        fprintf(stderr, "duplexctl: local cluster did not come up; stopping what started\n");
        local_stop(u->dir, false);
        return CTL_EXIT_FAIL;
    }
    printf("local cluster up: duplexd at %s, %d %s worker%s; logs in %s/logs\n", u->coordinator,
           u->workers, u->backend, u->workers == 1 ? "" : "s", u->dir);
    if (strcmp(u->dir, CTL_LOCAL_DEFAULT_DIR) != 0)
        printf("its keys: export %s=%s %s=%s\n", DX_CERT_KEY_ENV, u->g.key, DX_CERT_SERVER_KEY_ENV,
               u->g.server_key);
    printf("stop it with: duplexctl local down --dir %s\n", u->dir);
    return CTL_EXIT_OK;
}

static void local_usage(FILE *out, const struct dx_opt *options)
{
    dx_opts_usage(out,
                  "duplexctl local up --workers N [--backend sim|cpu] [--dir DIR]\n"
                  "       duplexctl local down [--dir DIR]\n\n"
                  "Starts or stops a one-machine cluster (duplexd and N workers) in the "
                  "background.",
                  options);
}

int ctl_cmd_local(struct ctl_globals *g, int argc, char **argv)
{
    char *coordinator = NULL, *backend = NULL, *dir = NULL;
    int timeout_s = 0, workers = 0;
    const struct dx_opt options[] = {
        {"workers", DX_OPT_INT, &workers, NULL, 2, 1, LOCAL_MAX_WORKERS, "N",
         "workers to start (up)"},
        {"backend", DX_OPT_STRING, &backend, "cpu", 0, 0, 0, "NAME", "sim or cpu (up)"},
        {"dir", DX_OPT_STRING, &dir, LOCAL_DEFAULT_DIR, 0, 0, 0, "DIR",
         "state, logs and pid files"},
        {"coordinator", DX_OPT_STRING, &coordinator, NULL, 0, 0, 0, "ADDR",
         "endpoint duplexd listens on"},
        {"timeout", DX_OPT_INT, &timeout_s, NULL, 0, 1, 3600, "SECONDS",
         "how long to wait for the cluster (default 30)"},
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    const char *action = argc > 1 ? argv[1] : "";
    char err[512];
    int next, rc, status = CTL_EXIT_USAGE;

    if (strcmp(action, "up") != 0 && strcmp(action, "down") != 0) {
        if (strcmp(action, "--help") == 0 || strcmp(action, "-h") == 0) {
            local_usage(stdout, options);
            status = CTL_EXIT_OK;
        } else {
            fprintf(stderr, "duplexctl local: expected \"up\" or \"down\"%s%s\n",
                    action[0] ? ", got " : "", action);
        }
        goto out;
    }
    rc = dx_opts_parse(options, argc - 1, argv + 1, &next, err, sizeof(err));
    if (rc == DX_OPTS_HELP) {
        local_usage(stdout, options);
        status = CTL_EXIT_OK;
        goto out;
    }
    if (rc != DX_OPTS_OK || next < argc - 1) {
        fprintf(stderr, "duplexctl local %s: %s\n", action,
                rc != DX_OPTS_OK ? err : "unexpected argument (see --help)");
        goto out;
    }
    if (strcmp(action, "down") == 0) {
        local_stop(dir, false);
        status = CTL_EXIT_OK;
        goto out;
    }
    if (strcmp(backend, "sim") != 0 && strcmp(backend, "cpu") != 0) {
        fprintf(stderr, "duplexctl local up: --backend must be sim or cpu, got \"%s\"\n", backend);
        goto out;
    }
    ctl_globals_override(g, coordinator, timeout_s);
    {
        struct local_up u = {
            .dir = dir,
            .coordinator = g->coordinator,
            .g = *g,
            .backend = backend,
            .workers = workers,
            .timeout_s = timeout_s ? timeout_s : 30,
        };
        status = local_up(&u);
    }
out:
    dx_opts_free(options);
    return status;
}
