/* simfleet.c - what the benches that simulate workers against a real
 * duplexd share (see simfleet.h): the duplexd child and its directory,
 * /proc readings, the fleet's topology and Register, DEALER sockets.
 */
#define _GNU_SOURCE /* nftw, program_invocation_short_name */
#include "bench/simfleet.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "proto/wire.h"
#include "worker/backend.h"

/* the worker agent's reconnect backoff (worker/agent.c) */
#define AGENT_RECONNECT_FIRST_MS 100
#define AGENT_RECONNECT_MAX_MS 2000
#define SIM_MAX_ARGS 32
#define SIM_LOG_TAIL_BYTES 8192

/* the daemons running, for sim_die() to stop them */
static pid_t daemon_pids[SIM_MAX_DAEMONS];

double sim_now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int64_t sim_wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sim_die(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fprintf(stderr, "%s: ", program_invocation_short_name);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    for (int i = 0; i < SIM_MAX_DAEMONS; i++)
        if (daemon_pids[i] > 0)
            kill(daemon_pids[i], SIGKILL);
    exit(1);
}

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;

    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0)
        sim_die("cannot find a free port: %s", strerror(errno));
    port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static bool port_open(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;

    if (fd >= 0)
        close(fd);
    return ok;
}

void sim_daemon_dir(struct sim_daemon *dm, const char *tag)
{
    snprintf(dm->dir, sizeof(dm->dir), "/tmp/duplex-bench-%.16s-XXXXXX", tag);
    if (!mkdtemp(dm->dir))
        sim_die("mkdtemp: %s", strerror(errno));
    dm->pid = 0;
    dm->slot = -1;
}

void sim_daemon_log_tail(const struct sim_daemon *dm)
{
    char path[128], line[512];
    long size;
    FILE *f;

    snprintf(path, sizeof(path), "%s/duplexd.log", dm->dir);
    if (!(f = fopen(path, "r")))
        return;
    fprintf(stderr, "--- %s (the last %d bytes at most):\n", path, SIM_LOG_TAIL_BYTES);
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) > SIM_LOG_TAIL_BYTES &&
        fseek(f, size - SIM_LOG_TAIL_BYTES, SEEK_SET) == 0)
        (void)!fgets(line, sizeof(line), f); /* the rest of a cut line */
    else
        rewind(f);
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fclose(f);
}

static void daemon_exec(const char *duplexd, const char *listen, const char *db, const char *log,
                        const char *const *extra)
{
    const char *argv[SIM_MAX_ARGS];
    int argc = 0, fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (fd >= 0) {
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        close(fd);
    }
    argv[argc++] = duplexd;
    argv[argc++] = "--listen";
    argv[argc++] = listen;
    argv[argc++] = "--db";
    argv[argc++] = db;
    argv[argc++] = "--log-level";
    argv[argc++] = "warn";
    for (int i = 0; extra && extra[i] && argc < SIM_MAX_ARGS - 1; i++)
        argv[argc++] = extra[i];
    argv[argc] = NULL;
    execv(duplexd, (char *const *)argv);
    fprintf(stderr, "exec %s: %s\n", duplexd, strerror(errno));
    _exit(127);
}

void sim_daemon_start(struct sim_daemon *dm, const char *duplexd, const char *const *extra)
{
    char log[128];
    int port = free_port(), slot = 0;
    double t0;

    while (slot < SIM_MAX_DAEMONS && daemon_pids[slot] > 0)
        slot++;
    if (slot == SIM_MAX_DAEMONS)
        sim_die("more than %d daemons at once", SIM_MAX_DAEMONS);
    snprintf(dm->endpoint, sizeof(dm->endpoint), "tcp://127.0.0.1:%d", port);
    snprintf(dm->db, sizeof(dm->db), "%s/duplex.db", dm->dir);
    snprintf(log, sizeof(log), "%s/duplexd.log", dm->dir);
    fflush(NULL);
    dm->pid = fork();
    if (dm->pid < 0)
        sim_die("fork: %s", strerror(errno));
    if (dm->pid == 0)
        daemon_exec(duplexd, dm->endpoint, dm->db, log, extra);
    daemon_pids[slot] = dm->pid;
    dm->slot = slot;
    t0 = sim_now_s();
    while (!port_open(port)) {
        int status;
        if (waitpid(dm->pid, &status, WNOHANG) == dm->pid) {
            daemon_pids[slot] = 0;
            sim_daemon_log_tail(dm);
            sim_die("duplexd (%s) exited before listening", dm->name);
        }
        if (sim_now_s() - t0 > SIM_DAEMON_START_S) {
            sim_daemon_log_tail(dm);
            sim_die("duplexd (%s) does not listen on %s", dm->name, dm->endpoint);
        }
        usleep(20000);
    }
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path) < 0 ? -1 : 0;
}

int sim_daemon_stop(struct sim_daemon *dm)
{
    int status = 0, rc = 0;

    if (dm->pid > 0) {
        double t0 = sim_now_s();

        kill(dm->pid, SIGTERM);
        while (waitpid(dm->pid, &status, WNOHANG) == 0) {
            if (sim_now_s() - t0 > SIM_DAEMON_STOP_S) { /* a loop stuck in one callback */
                fprintf(stderr, "%s: duplexd (%s) still runs %.0f s after SIGTERM; killing it\n",
                        program_invocation_short_name, dm->name, SIM_DAEMON_STOP_S);
                kill(dm->pid, SIGKILL);
                waitpid(dm->pid, &status, 0);
                break;
            }
            usleep(20000);
        }
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "%s: duplexd (%s) ended with wait status %#x\n",
                program_invocation_short_name, dm->name, (unsigned)status);
        sim_daemon_log_tail(dm);
        rc = -ECHILD;
    }
    if (dm->slot >= 0)
        daemon_pids[dm->slot] = 0;
    dm->pid = 0;
    dm->slot = -1;
    if (nftw(dm->dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS) < 0)
        fprintf(stderr, "%s: cannot remove %s: %s\n", program_invocation_short_name, dm->dir,
                strerror(errno));
    return rc;
}

/* utime + stime of /proc/PATH/stat, seconds */
static double stat_cpu_s(const char *path)
{
    char buf[1024], *p;
    unsigned long long ut = 0, st = 0;
    FILE *f;
    size_t n;

    if (!(f = fopen(path, "r")))
        return 0; /* a thread that just ended */
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* after "(comm)": state is field 3, utime 14, stime 15 */
    if (!(p = strrchr(buf, ')')) ||
        sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        sim_die("cannot read %s", path);
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

struct sim_proc_cpu sim_proc_cpu(pid_t pid)
{
    struct sim_proc_cpu c = {0, 0};
    char path[96];
    struct dirent *e;
    DIR *d;

    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    if (!(d = opendir(path)))
        sim_die("%s: %s", path, strerror(errno));
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/proc/%d/task/%.16s/stat", (int)pid, e->d_name);
        if (atoi(e->d_name) == (int)pid)
            c.main += stat_cpu_s(path);
        else
            c.other += stat_cpu_s(path);
    }
    closedir(d);
    return c;
}

long sim_kb_field(const char *file, const char *field)
{
    char line[256];
    size_t flen = strlen(field);
    long kb = -1;
    FILE *f = fopen(file, "r");

    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, field, flen) == 0 && line[flen] == ':')
            kb = atol(line + flen + 1);
    fclose(f);
    return kb;
}

long long sim_listen_overflows(void)
{
    char names[4096], values[4096];
    FILE *f = fopen("/proc/net/netstat", "r");
    long long v = -1;

    while (f && fgets(names, sizeof(names), f) && fgets(values, sizeof(values), f)) {
        char *sn, *sv, *n = strtok_r(names, " \n", &sn), *x = strtok_r(values, " \n", &sv);
        if (!n || strcmp(n, "TcpExt:") != 0)
            continue;
        while ((n = strtok_r(NULL, " \n", &sn)) && (x = strtok_r(NULL, " \n", &sv)))
            if (strcmp(n, "ListenOverflows") == 0)
                v = atoll(x);
    }
    if (f)
        fclose(f);
    return v;
}

double sim_self_cpu_s(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

void sim_raise_nofile(rlim_t want)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        sim_die("getrlimit: %s", strerror(errno));
    if (rl.rlim_cur < want) {
        rl.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur < want)
            sim_die("need %llu file descriptors, the hard limit is %llu", (unsigned long long)want,
                    (unsigned long long)rl.rlim_max);
    }
}

void sim_exe_dir(char *out, size_t len)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    char *slash;

    if (n < 0)
        sim_die("readlink /proc/self/exe: %s", strerror(errno));
    exe[n] = '\0';
    if ((slash = strrchr(exe, '/')))
        *slash = '\0';
    snprintf(out, len, "%s", exe);
}

void sim_worker_id(int i, char *out, size_t len)
{
    snprintf(out, len, "node%04d-gpu%d", i / SIM_GPUS_PER_NODE, i % SIM_GPUS_PER_NODE);
}

void sim_node_name(int i, char *out, size_t len)
{
    snprintf(out, len, "node%04d", i / SIM_GPUS_PER_NODE);
}

void sim_register_encode(int i, const char *backend, const char *data_addr, uint64_t request_id,
                         uint8_t **buf, size_t *len)
{
    Duplex__Register r = DUPLEX__REGISTER__INIT;
    const struct wk_backend *b = wk_backend_find(backend);
    const char *const *caps = b ? b->capabilities : NULL;
    char id[32], node[16];
    size_t ncaps = 0;

    while (caps && caps[ncaps])
        ncaps++;
    sim_worker_id(i, id, sizeof(id));
    sim_node_name(i, node, sizeof(node));
    r.worker_id = id;
    r.host = r.node = node;
    r.gpu_index = i % SIM_GPUS_PER_NODE;
    r.backend = (char *)backend;
    r.capabilities = (char **)caps;
    r.n_capabilities = ncaps;
    r.pid = (int32_t)getpid();
    r.data_addr = (char *)data_addr;
    if (dx_env_encode(DUPLEX__MSG_TYPE__MSG_REGISTER, request_id, &r.base, buf, len) < 0)
        sim_die("cannot encode a Register");
}

void *sim_context(int max_sockets)
{
    void *ctx = zmq_ctx_new();

    if (!ctx || zmq_ctx_set(ctx, ZMQ_MAX_SOCKETS, max_sockets) < 0)
        sim_die("zmq_ctx_new: %s", zmq_strerror(errno));
    return ctx;
}

void *sim_dealer(void *ctx, const char *endpoint, bool like_agent, const struct dx_cert *key,
                 const char *server_key, int epfd, uint32_t tag)
{
    int linger = 0, one = 1, ivl = AGENT_RECONNECT_FIRST_MS, ivl_max = AGENT_RECONNECT_MAX_MS, fd,
        rc;
    size_t fdlen = sizeof(fd);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = tag};
    void *s = zmq_socket(ctx, ZMQ_DEALER);

    if (!s || dx_wire_setup(s) < 0 || zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger)) < 0)
        sim_die("DEALER socket %u: %s", tag, zmq_strerror(errno));
    if (like_agent && (zmq_setsockopt(s, ZMQ_IMMEDIATE, &one, sizeof(one)) < 0 ||
                       zmq_setsockopt(s, ZMQ_RECONNECT_IVL, &ivl, sizeof(ivl)) < 0 ||
                       zmq_setsockopt(s, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof(ivl_max)) < 0))
        sim_die("DEALER socket %u: %s", tag, zmq_strerror(errno));
    if (key && (rc = dx_cert_apply_client(s, key, server_key)) < 0)
        sim_die("DEALER socket %u: CURVE: %s", tag, strerror(-rc));
    if (zmq_connect(s, endpoint) < 0 || zmq_getsockopt(s, ZMQ_FD, &fd, &fdlen) < 0)
        sim_die("DEALER socket %u: %s", tag, zmq_strerror(errno));
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        sim_die("epoll_ctl: %s", strerror(errno));
    return s;
}

void sim_dealer_close(void *sock, int epfd)
{
    int fd;
    size_t fdlen = sizeof(fd);

    if (zmq_getsockopt(sock, ZMQ_FD, &fd, &fdlen) == 0)
        epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    zmq_close(sock);
}
