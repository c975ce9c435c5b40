/* main.c - duplex-worker: flags and config, then the agent loop (or, with
 * --standalone, the single-process reference trainer). */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/opts.h"
#include "common/sdnotify.h"
#include "common/version.h"
#include "job/jobspec.h"
#include "proto/envelope.h"
#include "proto/cert.h"
#include "worker/agent.h"
#include "worker/rank/data.h"
#include "worker/net/dataplane.h"
#include "worker/rank/train.h"

void openblas_set_num_threads(int);

#define DEFAULT_COORDINATOR "tcp://127.0.0.1:7700"
#define SPEC_MAX_BYTES (1 << 20)
#define GENERATE_TEMPERATURE 0.7f

static char *opt_cuda_lib, *opt_nccl_lib, *opt_cublaslt_lib;
static char *opt_config, *opt_coordinator, *opt_backend, *opt_id, *opt_host, *opt_node,
    *opt_data_listen, *opt_log_level, *opt_standalone, *opt_save, *opt_from, *opt_prompt;
static int opt_gpu, opt_steps, opt_generate, opt_nccl_timeout;
static char *opt_checkpoint_root, *opt_key, *opt_server_key, *opt_memory_limit;
static bool opt_json, opt_insecure;

static const struct dx_opt options[] = {
    {"config", DX_OPT_STRING, &opt_config, NULL, 0, 0, 0, "FILE",
     "JSON file of option names to values (flags win)"},
    {"coordinator", DX_OPT_STRING, &opt_coordinator, NULL, 0, 0, 0, "ADDR",
     "duplexd endpoint (default $DUPLEX_COORDINATOR, then " DEFAULT_COORDINATOR ")"},
    {"backend", DX_OPT_STRING, &opt_backend, "cpu", 0, 0, 0, "NAME", "sim, cpu or cuda"},
    {"cuda-lib", DX_OPT_STRING, &opt_cuda_lib, WK_DEVICE_CUDA_LIB_DEFAULT, 0, 0, 0, "PATH",
     "with --backend cuda: the NVIDIA driver library"},
    {"nccl-lib", DX_OPT_STRING, &opt_nccl_lib, WK_DEVICE_NCCL_LIB_DEFAULT, 0, 0, 0, "PATH",
     "with --backend cuda: NCCL"},
    {"cublaslt-lib", DX_OPT_STRING, &opt_cublaslt_lib, WK_DEVICE_CUBLASLT_LIB_DEFAULT, 0, 0, 0,
     "PATH", "with --backend cuda: cuBLASLt"},
    {"nccl-timeout", DX_OPT_INT, &opt_nccl_timeout, NULL, 300, 1, 86400, "SECONDS",
     "with --backend cuda: how long NCCL waits for a job's other ranks before the job fails"},
    {"id", DX_OPT_STRING, &opt_id, NULL, 0, 0, 0, "ID",
     "worker id, unique in the cluster (default HOST-gpuN)"},
    {"host", DX_OPT_STRING, &opt_host, NULL, 0, 0, 0, "NAME", "host name (default: this host)"},
    {"node", DX_OPT_STRING, &opt_node, NULL, 0, 0, 0, "NAME",
     "node / NVLink domain used by placement (default: the host name)"},
    {"gpu", DX_OPT_INT, &opt_gpu, NULL, 0, 0, 1023, "N", "local GPU index"},
    {"data-listen", DX_OPT_STRING, &opt_data_listen, WK_NET_LISTEN_DEFAULT, 0, 0, 0, "ADDR",
     "data-plane endpoint to bind (PULL); with 0.0.0.0 or * the --host name is advertised"},
    {"log-level", DX_OPT_STRING, &opt_log_level, "info", 0, 0, 0, "LEVEL",
     "debug, info, warn or error"},
    {"key", DX_OPT_STRING, &opt_key, NULL, 0, 0, 0, "FILE",
     "this worker's secret CURVE certificate (duplexctl keys gen --role worker; default "
     "$" DX_CERT_KEY_ENV ")"},
    {"server-key", DX_OPT_STRING, &opt_server_key, NULL, 0, 0, 0, "FILE",
     "duplexd's public certificate (default $" DX_CERT_SERVER_KEY_ENV ")"},
    {"insecure", DX_OPT_FLAG, &opt_insecure, NULL, 0, 0, 0, NULL,
     "without keys, talk to duplexd and the other workers in clear (anyone on the network can "
     "impersonate them)"},
    {"checkpoint-root", DX_OPT_STRING, &opt_checkpoint_root, NULL, 0, 0, 0, "DIR",
     "jobs' checkpoints stay under DIR: a relative checkpoint.dir is taken from it, an absolute "
     "one must lie under it, or the job is refused (default: the working directory, which is "
     "the state directory /var/lib/duplex under systemd)"},
    {"memory-limit", DX_OPT_STRING, &opt_memory_limit, NULL, 0, 0, 0, "BYTES",
     "what this worker's jobs may use (a suffix K, M, G or T: powers of 1024), reported to "
     "duplexd and checked before a job's model is allocated (default: cpu and sim "
     "MemAvailable; cuda the GPU's total memory)"},
    {"standalone", DX_OPT_STRING, &opt_standalone, NULL, 0, 0, 0, "JOB.json",
     "train the job's model in this one process (no coordinator), then exit"},
    {"steps", DX_OPT_INT, &opt_steps, NULL, 0, 0, INT_MAX, "N",
     "with --standalone: steps to train; 0 takes the job's train.steps"},
    {"json", DX_OPT_FLAG, &opt_json, NULL, 0, 0, 0, NULL,
     "with --standalone: one {\"step\": s, \"loss\": x} line per step"},
    {"save", DX_OPT_STRING, &opt_save, NULL, 0, 0, 0, "FILE",
     "with --standalone: write the trained model to FILE (a checkpoint shard)"},
    {"generate", DX_OPT_INT, &opt_generate, NULL, 0, 0, 1 << 20, "N",
     "with --standalone and --from: print the prompt and N more bytes from the model"},
    {"from", DX_OPT_STRING, &opt_from, NULL, 0, 0, 0, "DIR",
     "with --generate: a checkpoint's step directory (as duplexctl status shows it)"},
    {"prompt", DX_OPT_STRING, &opt_prompt, "The ", 0, 0, 0, "TEXT",
     "with --generate: the text to continue"},
    {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
};

static const struct dx_cli cli = {
    .prog = "duplex-worker",
    .synopsis = "duplex-worker [options]\n\nThe duplex worker daemon, one per GPU.",
    .version = DX_VERSION " (protocol " DX_STRINGIFY(DX_PROTOCOL_VERSION) ")",
    .log_level = &opt_log_level,
};

/* Reads at most SPEC_MAX_BYTES of path into a malloc'd buffer. */
/* "12345", "512M", "16G": bytes, with a suffix K, M, G, T or P (powers of
 * 1024), 1 to DX_MAX_MEMORY_BYTES. 0 or -EINVAL. */
static int parse_bytes(const char *text, uint64_t *out)
{
    static const char suffixes[] = "KMGTP";
    char *end;
    unsigned long long v;
    const char *p;

    errno = 0;
    if (text[0] < '0' || text[0] > '9')
        return -EINVAL;
    v = strtoull(text, &end, 10);
    if (errno || v == 0)
        return -EINVAL;
    if (*end && (p = strchr(suffixes, *end)) && end[1] == '\0') {
        for (long i = 0; i <= p - suffixes; i++) {
            if (v > DX_MAX_MEMORY_BYTES / 1024)
                return -EINVAL;
            v *= 1024;
        }
    } else if (*end) {
        return -EINVAL;
    }
    if (v > DX_MAX_MEMORY_BYTES)
        return -EINVAL;
    *out = v;
    return 0;
}

static char *read_spec(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf = malloc(SPEC_MAX_BYTES + 1);

    *len = 0;
    if (!f || !buf) {
        if (f)
            fclose(f);
        free(buf);
        return NULL;
    }
    errno = 0;
    *len = fread(buf, 1, SPEC_MAX_BYTES + 1, f);
    if (ferror(f) || *len > SPEC_MAX_BYTES) {
        /* a read error keeps the read's own errno (EISDIR, ...) */
        int e = !ferror(f) ? EFBIG : errno ? errno : EIO;

        fclose(f);
        free(buf);
        errno = e;
        return NULL;
    }
    fclose(f);
    buf[*len] = '\0';
    return buf;
}

/* duplex-worker --standalone JOB.json [--steps N] [--json] */
static int run_standalone(void)
{
    struct job_spec spec;
    struct wk_train_config cfg;
    char err[512];
    size_t len;
    char *json = read_spec(opt_standalone, &len);

    if (!json) {
        fprintf(stderr, "duplex-worker: %s: %s\n", opt_standalone, strerror(errno));
        return EXIT_FAILURE;
    }
    int rc = job_spec_parse(json, len, NULL, 0, &spec, err, sizeof(err));
    free(json);
    if (rc < 0) {
        fprintf(stderr, "duplex-worker: %s: %s\n", opt_standalone, err);
        return EXIT_FAILURE;
    }
    wk_train_config_from_spec(&spec, &cfg);
    /* the parser took only datasets the workers have (worker/rank/data.h) */
    if (!(cfg.data_dir = wk_data_dataset_dir(spec.train.dataset))) {
        fprintf(stderr, "duplex-worker: %s: train.dataset: not one of %s\n", opt_standalone,
                JOB_SPEC_DATASETS);
        return EXIT_FAILURE;
    }
    if (opt_steps > 0)
        cfg.steps = opt_steps;
    cfg.json = opt_json;
    cfg.save = opt_save;
    if (opt_generate > 0 || opt_from) {
        if (!opt_from || opt_generate <= 0) {
            fprintf(stderr, "duplex-worker: --generate N and --from DIR go together\n");
            return EXIT_FAILURE;
        }
        /* a little randomness, fixed by the job's seed: the same text every time */
        if (wk_train_generate(&cfg, opt_from, opt_prompt, opt_generate, GENERATE_TEMPERATURE,
                              cfg.seed, stdout, err, sizeof(err)) < 0) {
            fprintf(stderr, "duplex-worker: %s\n", err);
            return EXIT_FAILURE;
        }
        return EXIT_SUCCESS;
    }
    if (wk_train_standalone(&cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplex-worker: %s\n", err);
        return EXIT_FAILURE;
    }
    return EXIT_SUCCESS;
}

int main(int argc, char **argv)
{
    struct wk_agent_config cfg;
    wk_agent_t *agent = NULL;
    uv_timer_t watchdog;
    char hostname[HOST_NAME_MAX + 1];
    char default_id[HOST_NAME_MAX + 32];
    char checkpoint_root[PATH_MAX];
    struct stat st;
    struct dx_cert key;
    char server_key[DX_CERT_KEY_LEN + 1];
    const char *coordinator;
    char err[512], sd_status[512];
    int status, rc;

    dx_log_init("duplex-worker", DX_LOG_INFO);
    /* one GEMM thread: bitwise reproducible sums, and one worker per core */
    openblas_set_num_threads(1);
    if (!dx_opts_cli(options, &cli, argc, argv, NULL, &status))
        goto out;
    if (opt_standalone) {
        status = run_standalone();
        goto out;
    }
    status = EXIT_FAILURE;
    if (gethostname(hostname, sizeof(hostname)) < 0)
        snprintf(hostname, sizeof(hostname), "localhost");
    hostname[sizeof(hostname) - 1] = '\0';
    snprintf(default_id, sizeof(default_id), "%s-gpu%d", opt_host ? opt_host : hostname, opt_gpu);
    coordinator = opt_coordinator ? opt_coordinator : getenv("DUPLEX_COORDINATOR");
    /* resolved once: the working directory by default, as it is now */
    if (!realpath(opt_checkpoint_root ? opt_checkpoint_root : ".", checkpoint_root) ||
        stat(checkpoint_root, &st) < 0) {
        fprintf(stderr, "duplex-worker: --checkpoint-root %s: %s\n",
                opt_checkpoint_root ? opt_checkpoint_root : "(the working directory)",
                strerror(errno));
        goto out;
    }
    if (!S_ISDIR(st.st_mode)) {
        fprintf(stderr, "duplex-worker: --checkpoint-root %s: not a directory\n", checkpoint_root);
        goto out;
    }

    if ((rc = dx_cert_load_client(opt_key, opt_server_key, opt_insecure, &key, server_key, err,
                                  sizeof(err))) < 0) {
        fprintf(stderr, "duplex-worker: %s\n", err);
        status = DX_OPTS_EXIT_USAGE;
        goto out;
    }
    if (rc == 0)
        dx_warn("--insecure: talking to duplexd and the data-plane peers in clear");
    cfg = (struct wk_agent_config){
        .coordinator = coordinator && coordinator[0] ? coordinator : DEFAULT_COORDINATOR,
        .id = opt_id ? opt_id : default_id,
        .host = opt_host ? opt_host : hostname,
        .node = opt_node ? opt_node : (opt_host ? opt_host : hostname),
        .gpu = opt_gpu,
        .backend = opt_backend,
        .libs = {.cuda = opt_cuda_lib, .nccl = opt_nccl_lib, .cublaslt = opt_cublaslt_lib},
        .nccl_timeout_ms = opt_nccl_timeout * 1000,
        .data_listen = opt_data_listen,
        .checkpoint_root = checkpoint_root,
        .key = rc == 1 ? &key : NULL,
        .server_key = rc == 1 ? server_key : NULL,
    };
    if (opt_memory_limit && parse_bytes(opt_memory_limit, &cfg.memory_limit) < 0) {
        fprintf(stderr,
                "duplex-worker: --memory-limit %s: expected bytes, 1 to 1P, with an optional "
                "K, M, G, T or P suffix\n",
                opt_memory_limit);
        goto out;
    }
    if (dx_worker_id_check(cfg.id, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplex-worker: --id: %s\n", err);
        goto out;
    }
    if (wk_agent_create(&cfg, &agent, err, sizeof(err)) < 0) {
        fprintf(stderr, "duplex-worker: %s\n", err);
        goto out;
    }
    /* set up: tell systemd (Type=notify), and ping its watchdog from the
     * agent's loop so that a hung loop gets restarted */
    if (dx_sd_watchdog_start(wk_agent_loop(agent), &watchdog) < 0)
        dx_warn("cannot start the systemd watchdog timer");
    snprintf(sd_status, sizeof(sd_status), "worker %s, coordinator %s", cfg.id, cfg.coordinator);
    dx_sd_ready(sd_status);
    status = wk_agent_run(agent);
    dx_sd_stopping();
    wk_agent_destroy(agent); /* closes the watchdog timer with the loop */
out:
    dx_opts_free(options);
    return status;
}
