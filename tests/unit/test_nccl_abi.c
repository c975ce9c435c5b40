/* test_nccl_abi.c - worker/cuda/comm/nccl.c's own declaration of NCCL's ABI against
 * <nccl.h> (where the CUDA headers are installed) and against the installed
 * libnccl.so.2 (every entry point resolves, error strings for the result
 * values, ids), then what worker/cuda/comm/nccl.c checks before it calls NCCL. A GPU
 * is needed by none of it: tests/gpu/check_nccl.c runs the communicator. */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "worker/cuda/comm/nccl.h"

#ifdef DX_HAVE_CUDA_HEADERS
#include <nccl.h>

/* ncclUniqueId is passed by value to ncclCommInitRank: same size and
 * alignment make the same calling convention (a 128-byte aggregate in
 * memory) */
_Static_assert(sizeof(wk_nccl_abi_id) == sizeof(ncclUniqueId), "ncclUniqueId size");
_Static_assert(alignof(wk_nccl_abi_id) == alignof(ncclUniqueId), "ncclUniqueId alignment");
_Static_assert(WK_NCCL_ID_BYTES == NCCL_UNIQUE_ID_BYTES, "NCCL_UNIQUE_ID_BYTES");
_Static_assert(sizeof(wk_nccl_abi_comm_t) == sizeof(ncclComm_t), "ncclComm_t");
/* the enums travel as int */
_Static_assert(sizeof(ncclResult_t) == sizeof(int), "ncclResult_t is int-sized");
_Static_assert(sizeof(ncclDataType_t) == sizeof(int), "ncclDataType_t is int-sized");
_Static_assert(sizeof(ncclRedOp_t) == sizeof(int), "ncclRedOp_t is int-sized");
_Static_assert(sizeof(wk_cuda_stream) == sizeof(cudaStream_t), "cudaStream_t");

Test(nccl_abi, values_match_nccl_h)
{
    cr_assert_eq(WK_NCCL_ABI_SUCCESS, ncclSuccess);
    cr_assert_eq(WK_NCCL_ABI_UNHANDLED_CUDA_ERROR, ncclUnhandledCudaError);
    cr_assert_eq(WK_NCCL_ABI_SYSTEM_ERROR, ncclSystemError);
    cr_assert_eq(WK_NCCL_ABI_INTERNAL_ERROR, ncclInternalError);
    cr_assert_eq(WK_NCCL_ABI_INVALID_ARGUMENT, ncclInvalidArgument);
    cr_assert_eq(WK_NCCL_ABI_INVALID_USAGE, ncclInvalidUsage);
    cr_assert_eq(WK_NCCL_ABI_REMOTE_ERROR, ncclRemoteError);
    cr_assert_eq(WK_NCCL_ABI_IN_PROGRESS, ncclInProgress);
    cr_assert_eq(WK_NCCL_BYTES, ncclUint8);
    cr_assert_eq(WK_NCCL_FP32, ncclFloat32);
    cr_assert_eq(WK_NCCL_FP64, ncclFloat64);
    cr_assert_eq(WK_NCCL_INT64, ncclInt64);
    cr_assert_eq(WK_NCCL_ABI_SUM, ncclSum);
    cr_assert_eq(WK_NCCL_NO_COLOR, NCCL_SPLIT_NOCOLOR);
    cr_assert_eq(sizeof(wk_nccl_abi_id), 128);
    /* the config: ncclConfig_t's head, field by field */
    {
        ncclConfig_t init = NCCL_CONFIG_INITIALIZER;

        cr_assert_eq(init.magic, WK_NCCL_ABI_CONFIG_MAGIC);
        cr_assert_eq(WK_NCCL_ABI_UNDEF_INT, NCCL_CONFIG_UNDEF_INT);
        cr_assert_eq(WK_NCCL_ABI_CONFIG_VERSION, NCCL_VERSION(2, 14, 0));
        cr_assert_geq(init.version, WK_NCCL_ABI_CONFIG_VERSION);
    }
#define SAME_FIELD(ours, theirs)                                                                   \
    cr_assert_eq(offsetof(struct wk_nccl_abi_config, ours), offsetof(ncclConfig_t, theirs), #theirs)
    SAME_FIELD(size, size);
    SAME_FIELD(magic, magic);
    SAME_FIELD(version, version);
    SAME_FIELD(blocking, blocking);
    SAME_FIELD(cga_cluster_size, cgaClusterSize);
    SAME_FIELD(min_ctas, minCTAs);
    SAME_FIELD(max_ctas, maxCTAs);
    SAME_FIELD(net_name, netName);
#undef SAME_FIELD
}

/* Each entry point of struct wk_nccl_api, its parameters written with
 * NCCL's types in the same order (int for an enum, wk_nccl_abi_id for
 * ncclUniqueId, wk_nccl_abi_comm_t for ncclComm_t, wk_cuda_stream for
 * cudaStream_t, void * for ncclConfig_t *): nccl.h must declare exactly
 * that. */
#define SAME_PROTOTYPE(fn, type)                                                                   \
    _Static_assert(__builtin_types_compatible_p(__typeof__(&fn), type), #fn)
SAME_PROTOTYPE(ncclGetVersion, ncclResult_t (*)(int *));
SAME_PROTOTYPE(ncclGetUniqueId, ncclResult_t (*)(ncclUniqueId *));
SAME_PROTOTYPE(ncclCommInitRank, ncclResult_t (*)(ncclComm_t *, int, ncclUniqueId, int));
SAME_PROTOTYPE(ncclCommDestroy, ncclResult_t (*)(ncclComm_t));
SAME_PROTOTYPE(ncclCommAbort, ncclResult_t (*)(ncclComm_t));
SAME_PROTOTYPE(ncclCommGetAsyncError, ncclResult_t (*)(ncclComm_t, ncclResult_t *));
SAME_PROTOTYPE(ncclCommSplit, ncclResult_t (*)(ncclComm_t, int, int, ncclComm_t *, ncclConfig_t *));
SAME_PROTOTYPE(ncclCommCount, ncclResult_t (*)(const ncclComm_t, int *));
SAME_PROTOTYPE(ncclCommUserRank, ncclResult_t (*)(const ncclComm_t, int *));
SAME_PROTOTYPE(ncclGetErrorString, const char *(*)(ncclResult_t));
SAME_PROTOTYPE(ncclGetLastError, const char *(*)(ncclComm_t));
SAME_PROTOTYPE(ncclSend, ncclResult_t (*)(const void *, size_t, ncclDataType_t, int, ncclComm_t,
                                          cudaStream_t));
SAME_PROTOTYPE(ncclRecv,
               ncclResult_t (*)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t));
SAME_PROTOTYPE(ncclAllReduce, ncclResult_t (*)(const void *, void *, size_t, ncclDataType_t,
                                               ncclRedOp_t, ncclComm_t, cudaStream_t));
/* ncclGroupStart/End are declared "()" in nccl.h: any arguments, none used */
SAME_PROTOTYPE(ncclGroupStart, ncclResult_t (*)(void));
SAME_PROTOTYPE(ncclGroupEnd, ncclResult_t (*)(void));
SAME_PROTOTYPE(ncclCommInitRankConfig,
               ncclResult_t (*)(ncclComm_t *, int, ncclUniqueId, int, ncclConfig_t *));

#else
Test(nccl_abi, values_match_nccl_h)
{
    cr_skip_test("the CUDA headers (nccl.h) are not installed: declarations not checked");
}
#endif

/* --- against the installed library ----------------------------------------- */

static void *open_nccl(void)
{
    void *lib = dlopen(WK_NCCL_LIB_DEFAULT, RTLD_NOW | RTLD_LOCAL);

    if (!lib)
        cr_skip_test("%s cannot be loaded here (%s): set LD_LIBRARY_PATH to NCCL's directory",
                     WK_NCCL_LIB_DEFAULT, dlerror());
    return lib;
}

Test(nccl_abi, every_entry_point_resolves)
{
    struct wk_nccl_api api;
    char err[256] = "";
    void *lib = open_nccl();
    int version = 0;

    cr_assert_eq(wk_nccl_api_load(lib, &api, err, sizeof(err)), 0, "%s", err);
    for (size_t i = 0; i < sizeof(api) / sizeof(void (*)(void)); i++) {
        void (*fn)(void);
        memcpy(&fn, (char *)&api + i * sizeof(fn), sizeof(fn));
        cr_assert_not_null(fn, "entry point %zu is NULL", i);
    }
    cr_assert_eq(api.get_version(&version), WK_NCCL_ABI_SUCCESS);
    /* ncclCommSplit came with 2.18 */
    cr_assert_geq(version, 21800, "NCCL %d is too old", version);
#ifdef DX_HAVE_CUDA_HEADERS
    cr_assert_eq(version / 100, NCCL_VERSION_CODE / 100,
                 "libnccl.so.2 is %d, nccl.h is %d: the ABI test checks another version", version,
                 NCCL_VERSION_CODE);
#endif
    dlclose(lib);
}

/* NCCL's own strings for our result values: they mean what we say */
Test(nccl_abi, result_values_name_nccl_errors)
{
    struct wk_nccl_api api;
    char err[256] = "";
    void *lib = open_nccl();

    cr_assert_eq(wk_nccl_api_load(lib, &api, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(api.get_error_string(WK_NCCL_ABI_SUCCESS), "no error");
    cr_assert_not_null(strstr(api.get_error_string(WK_NCCL_ABI_UNHANDLED_CUDA_ERROR), "cuda"));
    cr_assert_not_null(strstr(api.get_error_string(WK_NCCL_ABI_SYSTEM_ERROR), "system error"));
    cr_assert_not_null(strstr(api.get_error_string(WK_NCCL_ABI_INTERNAL_ERROR), "internal"));
    cr_assert_not_null(
        strstr(api.get_error_string(WK_NCCL_ABI_INVALID_ARGUMENT), "invalid argument"));
    cr_assert_not_null(strstr(api.get_error_string(WK_NCCL_ABI_INVALID_USAGE), "invalid usage"));
    cr_assert_not_null(strstr(api.get_error_string(WK_NCCL_ABI_REMOTE_ERROR), "remote"));
    cr_assert_not_null(strstr(api.get_error_string(WK_NCCL_ABI_IN_PROGRESS), "in progress"));
    dlclose(lib);
}

Test(nccl_abi, unique_ids_come_without_a_gpu)
{
    struct wk_nccl_api api;
    wk_nccl_abi_id a, b;
    char err[256] = "";
    void *lib = open_nccl();

    cr_assert_eq(wk_nccl_api_load(lib, &api, err, sizeof(err)), 0, "%s", err);
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    cr_assert_eq(api.get_unique_id(&a), WK_NCCL_ABI_SUCCESS);
    cr_assert_eq(api.get_unique_id(&b), WK_NCCL_ABI_SUCCESS);
    cr_assert_neq(memcmp(&a, &b, sizeof(a)), 0);
    /* arguments NCCL refuses without a GPU: a NULL id pointer */
    cr_assert_neq(api.get_unique_id(NULL), WK_NCCL_ABI_SUCCESS);
    /* the library stays loaded: NCCL's bootstrap root threads run in it */
}

Test(nccl_abi, missing_libraries_and_symbols_are_named)
{
    struct wk_nccl_api api;
    char err[256] = "";
    void *libm = dlopen("libm.so.6", RTLD_NOW | RTLD_LOCAL);

    cr_assert_eq(wk_nccl_api_load(NULL, &api, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "NCCL is not open"), "%s", err);
    cr_assert_not_null(libm);
    cr_assert_eq(wk_nccl_api_load(libm, &api, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "NCCL has no ncclGetVersion"), "%s", err);
    cr_assert_null(api.get_unique_id, "a failed load leaves no entry point");
    dlclose(libm);
}

/* --- what worker/cuda/comm/nccl.c checks itself -------------------------------------- */

Test(nccl_abi, transfers_are_checked_before_nccl_sees_them)
{
    struct wk_nccl_transfer ok[] = {
        {.recv = 0, .peer = 1, .type = WK_NCCL_FP32, .buf = 0x1000, .count = 64},
        {.recv = 1, .peer = 0, .type = WK_NCCL_BYTES, .buf = 0x2000, .count = 7},
        {.recv = 1, .peer = 3, .type = WK_NCCL_FP32, .buf = 0, .count = 0}, /* skipped */
    };
    struct wk_nccl_transfer bad;
    char err[256] = "";

    cr_assert_eq(wk_nccl_transfers_check(ok, 3, 4, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_nccl_transfers_check(NULL, 0, 1, err, sizeof(err)), 0);
    cr_assert_eq(wk_nccl_transfers_check(NULL, 2, 1, err, sizeof(err)), -EINVAL);

    bad = ok[0];
    bad.peer = 4;
    cr_assert_eq(wk_nccl_transfers_check(&bad, 1, 4, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "transfer 0: send to rank 4 of a communicator of 4 ranks");
    bad.peer = -1;
    bad.recv = 1;
    cr_assert_eq(wk_nccl_transfers_check(&bad, 1, 4, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "transfer 0: receive from rank -1 of a communicator of 4 ranks");

    bad = ok[1];
    bad.type = (enum wk_nccl_type)2; /* ncclInt32: not a type the exchange carries */
    cr_assert_eq(wk_nccl_transfers_check(&bad, 1, 4, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "transfer 0: receive from rank 0: unknown element type 2");

    bad = ok[0];
    bad.buf = 0;
    cr_assert_eq(wk_nccl_transfers_check(&bad, 1, 4, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "transfer 0: send to rank 1: 64 fp32 with no device buffer");

    bad = ok[0];
    bad.recv = 2;
    cr_assert_eq(wk_nccl_transfers_check(&bad, 1, 4, err, sizeof(err)), -EINVAL);
    cr_assert_not_null(strstr(err, "recv is 2"), "%s", err);
}

Test(nccl_abi, communicators_need_a_cuda_stack_and_a_rank_inside)
{
    unsigned char id[WK_NCCL_ID_BYTES] = {0};
    wk_nccl_t *n = (wk_nccl_t *)1;
    char err[256] = "";

    cr_assert_eq(wk_nccl_create(NULL, id, 1, 0, &n, err, sizeof(err)), -EINVAL);
    cr_assert_null(n);
    cr_assert_not_null(strstr(err, "no CUDA stack"), "%s", err);
    cr_assert_eq(wk_nccl_unique_id(NULL, id, err, sizeof(err)), -EINVAL);
    wk_nccl_destroy(NULL);
}

/* --- through worker/cuda/driver.c, on the fake driver ------------------------------ */

/* $(BUILD)/lib/libfakecuda.so (tests/fake/: the Driver API on host
 * memory), from this test's $(BUILD)/tests/unit/; NULL when not built */
static const char *fake_driver(void)
{
    static char path[PATH_MAX];
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);

    if (n <= 0)
        return NULL;
    exe[n] = '\0';
    snprintf(path, sizeof(path), "%s/../../lib/libfakecuda.so", dirname(exe));
    return access(path, R_OK) == 0 ? path : NULL;
}

/* The fake driver with the real NCCL: ids come through the library the
 * CUDA stack opened; a communicator cannot (NCCL's own CUDA runtime finds
 * no driver), and the error says which call failed and why. */
Test(nccl_abi, ids_and_communicators_through_the_cuda_stack)
{
    struct wk_cuda_paths paths = {0};
    unsigned char a[WK_NCCL_ID_BYTES], b[WK_NCCL_ID_BYTES];
    wk_cuda_t *c = NULL;
    wk_nccl_t *n = (wk_nccl_t *)1;
    char err[512] = "";
    void *lib = open_nccl();
    int rc;

    dlclose(lib);
    if (!(paths.cuda = fake_driver()))
        cr_skip_test("libfakecuda.so is not built (make test-build)");
    if (wk_cuda_open(&paths, &c, err, sizeof(err)) < 0)
        cr_skip_test("the fake driver with NCCL and cuBLASLt does not open here: %s", err);
    cr_assert_eq(wk_cuda_context(c, 0), 0, "%s", wk_cuda_error(c));
    cr_assert_eq(wk_nccl_unique_id(c, a, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_nccl_unique_id(c, b, err, sizeof(err)), 0, "%s", err);
    cr_assert_neq(memcmp(a, b, sizeof(a)), 0);

    cr_assert_eq(wk_nccl_create(c, a, 2, 2, &n, err, sizeof(err)), -EINVAL);
    cr_assert_null(n);
    cr_assert_str_eq(err, "wk_nccl_create: rank 2 is outside a communicator of 2 ranks");
    rc = wk_nccl_create(c, a, 1, 0, &n, err, sizeof(err));
    if (rc == 0) { /* a driver NCCL found after all: the communicator works */
        cr_assert_eq(wk_nccl_size(n), 1);
        cr_assert_eq(wk_nccl_abort(n), 0, "%s", wk_nccl_error(n));
        cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, 1, 1, 1), -ECANCELED);
        wk_nccl_destroy(n);
    } else {
        cr_assert_eq(rc, -EIO, "%s", err);
        cr_assert_null(n);
        cr_assert_not_null(strstr(err, "ncclCommInitRank(rank 0 of 1): "), "%s", err);
        cr_assert_not_null(strstr(err, "(NCCL error "), "%s", err);
        cr_log_info("without a driver: %s", err);
    }
    wk_cuda_close(c);
}

/* --- worker/cuda/comm/nccl.c's logic on a fake NCCL ------------------------------------
 * Entry points of one-rank communicators on host memory (a wk_cuda_ptr is a
 * host address here): grouped sends and receives to self are matched at
 * ncclGroupEnd and copied, an all-reduce copies, every call is logged, and
 * one call can be made to fail. */

#define FAKE_LOG 32

struct fake_comm {
    int nranks, rank;
    int async;              /* what ncclCommGetAsyncError says */
    int aborted, destroyed; /* calls seen */
    int block_until_abort;  /* ncclAllReduce waits for an abort */
    int polls_left;         /* > 0: ncclCommGetAsyncError says "in progress" this often more */
    int polls;              /* ncclCommGetAsyncError calls seen */
};

static struct {
    char log[FAKE_LOG][64];
    int nlog, in_group;
    const char *fail; /* the entry point that fails, or NULL */
    struct {
        int recv, type, peer;
        void *buf;
        size_t count;
    } pending[8];
    int npending;
    struct fake_comm comms[4];
    int ncomms;
    int join_polls; /* what a non-blocking join's communicator starts with as polls_left */
    char last[128];
} fake;

static void fake_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fake_note(const char *fmt, ...)
{
    va_list ap;

    cr_assert_lt(fake.nlog, FAKE_LOG);
    va_start(ap, fmt);
    vsnprintf(fake.log[fake.nlog++], sizeof(fake.log[0]), fmt, ap);
    va_end(ap);
}

static int fake_failing(const char *call)
{
    if (fake.fail && strcmp(fake.fail, call) == 0) {
        snprintf(fake.last, sizeof(fake.last), "fake: %s was told to fail", call);
        return WK_NCCL_ABI_INVALID_ARGUMENT;
    }
    return WK_NCCL_ABI_SUCCESS;
}

static struct fake_comm *fake_new_comm(int nranks, int rank)
{
    struct fake_comm *fc;

    cr_assert_lt(fake.ncomms, 4);
    fc = &fake.comms[fake.ncomms++];
    memset(fc, 0, sizeof(*fc));
    fc->nranks = nranks;
    fc->rank = rank;
    return fc;
}

static int fake_get_version(int *v)
{
    *v = 22809;
    return 0;
}
static int fake_get_unique_id(wk_nccl_abi_id *id)
{
    memset(id, 7, sizeof(*id));
    return 0;
}
static int fake_init_rank(wk_nccl_abi_comm_t *comm, int nranks, wk_nccl_abi_id id, int rank)
{
    struct fake_comm *fc = fake_new_comm(nranks, rank);

    fake_note("init %d of %d, id %d", rank, nranks, id.internal[127]);
    *comm = (wk_nccl_abi_comm_t)fc;
    return fake_failing("init"); /* a failed init leaves its handle */
}
static int fake_destroy(wk_nccl_abi_comm_t comm)
{
    ((struct fake_comm *)comm)->destroyed++;
    return 0;
}
static int fake_abort(wk_nccl_abi_comm_t comm)
{
    __atomic_add_fetch(&((struct fake_comm *)comm)->aborted, 1, __ATOMIC_SEQ_CST);
    return 0;
}
static int fake_async_error(wk_nccl_abi_comm_t comm, int *async)
{
    struct fake_comm *fc = (struct fake_comm *)comm;

    fc->polls++;
    if (fc->polls_left > 0) {
        fc->polls_left--;
        *async = WK_NCCL_ABI_IN_PROGRESS;
        return 0;
    }
    *async = fc->async;
    return 0;
}
static int fake_init_rank_config(wk_nccl_abi_comm_t *comm, int nranks, wk_nccl_abi_id id, int rank,
                                 void *config)
{
    const struct wk_nccl_abi_config *cf = config;
    struct fake_comm *fc = fake_new_comm(nranks, rank);

    fake_note("cfg %d/%d blocking %d magic %x v%u size %zu", rank, nranks, cf->blocking, cf->magic,
              cf->version, cf->size);
    (void)id;
    fc->polls_left = fake.join_polls;
    *comm = (wk_nccl_abi_comm_t)fc;
    return WK_NCCL_ABI_IN_PROGRESS;
}
static int fake_split(wk_nccl_abi_comm_t comm, int color, int key, wk_nccl_abi_comm_t *out,
                      void *config)
{
    fake_note("split %d %d%s", color, key, config ? " config" : "");
    *out = color == WK_NCCL_NO_COLOR ? NULL : (wk_nccl_abi_comm_t)fake_new_comm(1, 0);
    (void)comm;
    return fake_failing("split");
}
static int fake_count(wk_nccl_abi_comm_t comm, int *count)
{
    *count = ((struct fake_comm *)comm)->nranks;
    return 0;
}
static int fake_user_rank(wk_nccl_abi_comm_t comm, int *rank)
{
    *rank = ((struct fake_comm *)comm)->rank;
    return 0;
}
static const char *fake_error_string(int result)
{
    return result == WK_NCCL_ABI_INVALID_ARGUMENT ? "invalid argument"
           : result == WK_NCCL_ABI_REMOTE_ERROR   ? "remote process exited"
                                                  : "some error";
}
static const char *fake_last_error(wk_nccl_abi_comm_t comm)
{
    (void)comm;
    return fake.last;
}
static int fake_group_start(void)
{
    fake_note("group");
    fake.in_group++;
    return 0;
}
static int fake_group_end(void)
{
    fake_note("end");
    cr_assert_eq(fake.in_group, 1, "ncclGroupEnd without ncclGroupStart");
    fake.in_group = 0;
    /* each receive takes the first send of the same type and count left */
    for (int r = 0; r < fake.npending; r++) {
        if (!fake.pending[r].recv)
            continue;
        for (int s = 0; s < fake.npending; s++) {
            if (fake.pending[s].recv || fake.pending[s].buf == NULL ||
                fake.pending[s].type != fake.pending[r].type ||
                fake.pending[s].count != fake.pending[r].count)
                continue;
            memcpy(fake.pending[r].buf, fake.pending[s].buf,
                   fake.pending[r].count * (fake.pending[r].type == WK_NCCL_FP32 ? 4 : 1));
            fake.pending[s].buf = NULL;
            break;
        }
    }
    fake.npending = 0;
    return fake_failing("end");
}
static int fake_p2p(int recv, const void *buf, size_t count, int type, int peer,
                    wk_nccl_abi_comm_t comm, wk_cuda_stream stream)
{
    int i = fake.npending;

    fake_note("%s %zu %d %d", recv ? "recv" : "send", count, type, peer);
    cr_assert(fake.in_group, "a send or receive outside a group");
    cr_assert_eq(((struct fake_comm *)comm)->aborted, 0);
    (void)stream;
    if (fake_failing(recv ? "recv" : "send"))
        return WK_NCCL_ABI_INVALID_ARGUMENT;
    cr_assert_lt(i, 8);
    fake.pending[i].recv = recv;
    fake.pending[i].type = type;
    fake.pending[i].peer = peer;
    fake.pending[i].buf = (void *)buf;
    fake.pending[i].count = count;
    fake.npending++;
    return 0;
}
static int fake_send(const void *buf, size_t count, int type, int peer, wk_nccl_abi_comm_t comm,
                     wk_cuda_stream stream)
{
    return fake_p2p(0, buf, count, type, peer, comm, stream);
}
static int fake_recv(void *buf, size_t count, int type, int peer, wk_nccl_abi_comm_t comm,
                     wk_cuda_stream stream)
{
    return fake_p2p(1, buf, count, type, peer, comm, stream);
}
static int fake_all_reduce(const void *sendbuf, void *recvbuf, size_t count, int type, int op,
                           wk_nccl_abi_comm_t comm, wk_cuda_stream stream)
{
    struct fake_comm *fc = (struct fake_comm *)comm;

    fake_note("allreduce %zu %d %d", count, type, op);
    (void)stream;
    if (fc->block_until_abort) {
        while (!__atomic_load_n(&fc->aborted, __ATOMIC_SEQ_CST))
            usleep(1000);
        snprintf(fake.last, sizeof(fake.last), "fake: aborted while waiting for a peer");
        return WK_NCCL_ABI_REMOTE_ERROR;
    }
    if (fake_failing("allreduce"))
        return WK_NCCL_ABI_INVALID_ARGUMENT;
    memmove(recvbuf, sendbuf, count * (type == WK_NCCL_FP32 ? 4 : 8));
    return 0;
}

static const struct wk_nccl_api fake_api = {
    fake_get_version,
    fake_get_unique_id,
    fake_init_rank,
    fake_destroy,
    fake_abort,
    fake_async_error,
    fake_split,
    fake_count,
    fake_user_rank,
    fake_error_string,
    fake_last_error,
    fake_group_start,
    fake_group_end,
    fake_send,
    fake_recv,
    fake_all_reduce,
    fake_init_rank_config,
};

static wk_nccl_t *fake_open(void)
{
    unsigned char id[WK_NCCL_ID_BYTES];
    wk_nccl_t *n = NULL;
    char err[256] = "";

    memset(&fake, 0, sizeof(fake));
    memset(id, 0, sizeof(id));
    id[127] = 42;
    cr_assert_eq(wk_nccl_create_api(&fake_api, id, 1, 0, &n, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(fake.log[0], "init 0 of 1, id 42", "the id travels by value");
    cr_assert_eq(wk_nccl_size(n), 1);
    cr_assert_eq(wk_nccl_rank(n), 0);
    cr_assert_str_eq(wk_nccl_error(n), "");
    fake.nlog = 0;
    return n;
}

static wk_cuda_ptr host_ptr(const void *p)
{
    return (wk_cuda_ptr)(uintptr_t)p;
}

Test(nccl_fake, a_grouped_exchange_is_one_group_in_list_order)
{
    wk_nccl_t *n = fake_open();
    float src[64], dst[64];
    unsigned char bsrc[7] = {1, 2, 3, 4, 5, 6, 7}, bdst[7] = {0};
    struct wk_nccl_transfer t[] = {
        {1, 0, WK_NCCL_FP32, host_ptr(dst), 64},
        {1, 0, WK_NCCL_BYTES, host_ptr(bdst), 7},
        {0, 0, WK_NCCL_FP32, 0, 0}, /* empty: skipped */
        {0, 0, WK_NCCL_FP32, host_ptr(src), 64},
        {0, 0, WK_NCCL_BYTES, host_ptr(bsrc), 7},
    };
    const char *want[] = {"group", "recv 64 7 0", "recv 7 1 0", "send 64 7 0", "send 7 1 0", "end"};

    for (int i = 0; i < 64; i++)
        src[i] = (float)i * 0.5f - 3.0f;
    memset(dst, 0xff, sizeof(dst));
    cr_assert_eq(wk_nccl_exchange(n, NULL, t, 5), 0, "%s", wk_nccl_error(n));
    cr_assert_eq(fake.nlog, 6);
    for (int i = 0; i < 6; i++)
        cr_assert_str_eq(fake.log[i], want[i]);
    cr_assert_eq(memcmp(src, dst, sizeof(src)), 0);
    cr_assert_eq(memcmp(bsrc, bdst, sizeof(bsrc)), 0);
    /* nothing to do: NCCL is not called */
    fake.nlog = 0;
    cr_assert_eq(wk_nccl_exchange(n, NULL, t, 0), 0);
    cr_assert_eq(fake.nlog, 0);
    /* a bad entry: refused before NCCL sees any */
    t[1].peer = 1;
    cr_assert_eq(wk_nccl_exchange(n, NULL, t, 5), -EINVAL);
    cr_assert_str_eq(wk_nccl_error(n),
                     "transfer 1: receive from rank 1 of a communicator of 1 ranks");
    cr_assert_eq(fake.nlog, 0);
    wk_nccl_destroy(n);
    cr_assert_eq(fake.comms[0].destroyed, 1);
    cr_assert_eq(fake.comms[0].aborted, 0);
}

Test(nccl_fake, a_failed_send_still_closes_the_group)
{
    wk_nccl_t *n = fake_open();
    float a[4] = {1, 2, 3, 4}, b[4];
    struct wk_nccl_transfer t[] = {
        {1, 0, WK_NCCL_FP32, host_ptr(b), 4},
        {0, 0, WK_NCCL_FP32, host_ptr(a), 4},
    };

    fake.fail = "send";
    cr_assert_eq(wk_nccl_exchange(n, NULL, t, 2), -EIO);
    cr_assert_str_eq(wk_nccl_error(n),
                     "ncclSend(4 fp32, to rank 0; transfer 1 of 2): invalid argument (NCCL error "
                     "4): fake: send was told to fail");
    cr_assert_str_eq(fake.log[fake.nlog - 1], "end", "the group was left open");
    /* a failing ncclGroupEnd is reported too */
    fake.fail = "end";
    fake.nlog = 0;
    cr_assert_eq(wk_nccl_exchange(n, NULL, t, 2), -EIO);
    cr_assert_str_eq(wk_nccl_error(n),
                     "ncclGroupEnd(2 transfers): invalid argument (NCCL error 4): "
                     "fake: end was told to fail");
    wk_nccl_destroy(n);
}

Test(nccl_fake, all_reduce_sums_fp32_and_says_what_failed)
{
    wk_nccl_t *n = fake_open();
    float a[5] = {1, -2, 3.5f, 0, 8}, b[5] = {0};

    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, host_ptr(a), host_ptr(b), 5), 0);
    cr_assert_str_eq(fake.log[0], "allreduce 5 7 0", "fp32 (7), sum (0)");
    cr_assert_eq(memcmp(a, b, sizeof(a)), 0);
    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, host_ptr(a), host_ptr(a), 5), 0, "in place");
    fake.nlog = 0;
    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, 0, 0, 0), 0);
    cr_assert_eq(fake.nlog, 0, "nothing to reduce: NCCL is not called");
    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, host_ptr(a), 0, 5), -EINVAL);
    cr_assert_str_eq(wk_nccl_error(n), "ncclAllReduce(5 fp32, sum): no receive buffer");
    fake.fail = "allreduce";
    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, host_ptr(a), host_ptr(b), 5), -EIO);
    cr_assert_str_eq(wk_nccl_error(n), "ncclAllReduce(5 fp32, sum): invalid argument (NCCL error "
                                       "4): fake: allreduce was told to fail");
    wk_nccl_destroy(n);
}

Test(nccl_fake, all_reduce_passes_int64_and_fp64_and_refuses_bytes)
{
    wk_nccl_t *n = fake_open();
    int64_t loads[3] = {7, -1, INT64_MAX}, lsum[3] = {0};
    double loss = 2.5, lossum = 0;
    unsigned char raw[4] = {0};

    cr_assert_eq(
        wk_nccl_allreduce_sum_of(n, NULL, host_ptr(loads), host_ptr(lsum), 3, WK_NCCL_INT64), 0,
        "%s", wk_nccl_error(n));
    cr_assert_str_eq(fake.log[0], "allreduce 3 4 0", "int64 (4), sum (0)");
    cr_assert_eq(memcmp(loads, lsum, sizeof(loads)), 0);
    cr_assert_eq(
        wk_nccl_allreduce_sum_of(n, NULL, host_ptr(&loss), host_ptr(&lossum), 1, WK_NCCL_FP64), 0);
    cr_assert_str_eq(fake.log[1], "allreduce 1 8 0", "fp64 (8)");
    cr_assert_eq(lossum, 2.5);
    fake.nlog = 0;
    cr_assert_eq(wk_nccl_allreduce_sum_of(n, NULL, host_ptr(raw), host_ptr(raw), 4, WK_NCCL_BYTES),
                 -EINVAL);
    cr_assert_str_eq(wk_nccl_error(n), "ncclAllReduce: a sum of bytes");
    cr_assert_eq(fake.nlog, 0, "refused before NCCL is called");
    wk_nccl_destroy(n);
}

Test(nccl_fake, split_by_color_and_no_color)
{
    wk_nccl_t *n = fake_open(), *sub = NULL, *none = NULL;

    cr_assert_eq(wk_nccl_split(n, 3, 9, &sub), 0, "%s", wk_nccl_error(n));
    cr_assert_str_eq(fake.log[0], "split 3 9", "the parent's config (NULL)");
    cr_assert_not_null(sub);
    cr_assert_eq(wk_nccl_size(sub), 1);
    cr_assert_eq(wk_nccl_rank(sub), 0);
    cr_assert_eq(wk_nccl_split(n, WK_NCCL_NO_COLOR, 0, &none), 0);
    cr_assert_null(none);
    cr_assert_eq(wk_nccl_split(n, -5, 0, &none), -EINVAL);
    cr_assert_not_null(strstr(wk_nccl_error(n), "color -5"), "%s", wk_nccl_error(n));
    fake.fail = "split";
    cr_assert_eq(wk_nccl_split(n, 1, 0, &none), -EIO);
    cr_assert_null(none);
    cr_assert_eq(fake.comms[2].aborted, 1, "the child of a failed split is freed");
    cr_assert_not_null(strstr(wk_nccl_error(n), "ncclCommSplit(color 1, key 0): invalid argument"),
                       "%s", wk_nccl_error(n));
    wk_nccl_destroy(sub);
    cr_assert_eq(fake.comms[1].destroyed, 1);
    wk_nccl_destroy(n);
}

Test(nccl_fake, async_errors_and_abort)
{
    wk_nccl_t *n = fake_open();
    struct wk_nccl_transfer t = {0, 0, WK_NCCL_FP32, 16, 4};
    wk_nccl_t *sub = NULL;

    cr_assert_eq(wk_nccl_check(n), 0);
    fake.comms[0].async = WK_NCCL_ABI_IN_PROGRESS;
    cr_assert_eq(wk_nccl_check(n), 0, "in progress is not an error");
    fake.comms[0].async = WK_NCCL_ABI_REMOTE_ERROR;
    snprintf(fake.last, sizeof(fake.last), "fake: peer 3 is gone");
    cr_assert_eq(wk_nccl_check(n), -EIO);
    cr_assert_str_eq(wk_nccl_error(n), "an operation in flight on the communicator: remote process "
                                       "exited (NCCL error 6): fake: peer 3 is gone");
    cr_assert_eq(wk_nccl_abort(n), 0);
    cr_assert_eq(fake.comms[0].aborted, 1);
    cr_assert_eq(wk_nccl_abort(n), 0, "a second abort does nothing");
    cr_assert_eq(fake.comms[0].aborted, 1);
    fake.nlog = 0;
    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, 16, 16, 4), -ECANCELED);
    cr_assert_str_eq(wk_nccl_error(n), "ncclAllReduce: the NCCL communicator was aborted");
    cr_assert_eq(wk_nccl_exchange(n, NULL, &t, 1), -ECANCELED);
    cr_assert_eq(wk_nccl_split(n, 0, 0, &sub), -ECANCELED);
    cr_assert_eq(wk_nccl_check(n), -ECANCELED);
    cr_assert_eq(fake.nlog, 0, "NCCL saw nothing after the abort");
    wk_nccl_destroy(n);
    cr_assert_eq(fake.comms[0].destroyed, 0, "an aborted communicator is not destroyed again");
}

static void *abort_later(void *arg)
{
    usleep(50 * 1000);
    wk_nccl_abort(arg);
    return NULL;
}

/* recovery: a call blocked on a dead peer returns once another thread
 * aborts the communicator */
Test(nccl_fake, an_abort_from_another_thread_unblocks_a_call, .timeout = 10)
{
    wk_nccl_t *n = fake_open();
    float a[2] = {1, 2};
    pthread_t th;

    fake.comms[0].block_until_abort = 1;
    cr_assert_eq(pthread_create(&th, NULL, abort_later, n), 0);
    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, host_ptr(a), host_ptr(a), 2), -EIO);
    cr_assert_eq(pthread_join(th, NULL), 0);
    cr_assert_eq(fake.comms[0].aborted, 1);
    cr_assert_not_null(strstr(wk_nccl_error(n), "aborted while waiting"), "%s", wk_nccl_error(n));
    cr_assert_eq(wk_nccl_allreduce_sum(n, NULL, host_ptr(a), host_ptr(a), 2), -ECANCELED);
    wk_nccl_destroy(n);
}

Test(nccl_fake, a_failed_init_frees_what_nccl_left)
{
    unsigned char id[WK_NCCL_ID_BYTES] = {0};
    wk_nccl_t *n = (wk_nccl_t *)1;
    char err[256] = "";

    memset(&fake, 0, sizeof(fake));
    fake.fail = "init";
    cr_assert_eq(wk_nccl_create_api(&fake_api, id, 4, 3, &n, err, sizeof(err)), -EIO);
    cr_assert_null(n);
    cr_assert_str_eq(err, "ncclCommInitRank(rank 3 of 4): invalid argument (NCCL error 4): fake: "
                          "init was told to fail");
    cr_assert_eq(fake.comms[0].aborted, 1);
    cr_assert_eq(wk_nccl_create_api(NULL, id, 1, 0, &n, err, sizeof(err)), -EINVAL);
    cr_assert_eq(wk_nccl_create_api(&fake_api, id, 0, 0, &n, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "wk_nccl_create: rank 0 is outside a communicator of 0 ranks");
}

/* --- the non-blocking join ------------------------------------------------ */

Test(nccl_fake, a_join_polls_until_every_rank_joined_and_so_do_its_splits)
{
    const struct wk_nccl_wait wait = {5000, NULL};
    unsigned char id[WK_NCCL_ID_BYTES] = {0};
    wk_nccl_t *n = NULL, *sub = NULL;
    char err[256] = "";

    memset(&fake, 0, sizeof(fake));
    fake.join_polls = 3;
    cr_assert_eq(wk_nccl_join_api(&fake_api, id, 2, 1, &wait, &n, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(fake.log[0], "cfg 1/2 blocking 0 magic cafebeef v21400 size 40");
    cr_assert_eq(fake.comms[0].polls, 4, "three times in progress, then settled");
    cr_assert_eq(fake.comms[0].aborted, 0);
    /* a split of a non-blocking communicator is non-blocking: its child is
     * polled the same way */
    fake.comms[0].polls_left = 0;
    cr_assert_eq(wk_nccl_split(n, 1, 0, &sub), 0, "%s", wk_nccl_error(n));
    cr_assert_not_null(sub);
    cr_assert_geq(fake.comms[1].polls, 1, "the child was polled");
    wk_nccl_destroy(sub);
    wk_nccl_destroy(n);
}

Test(nccl_fake, a_rank_that_never_joins_costs_the_timeout_not_a_hang)
{
    const struct wk_nccl_wait wait = {50, NULL};
    unsigned char id[WK_NCCL_ID_BYTES] = {0};
    wk_nccl_t *n = NULL;
    char err[256] = "";

    memset(&fake, 0, sizeof(fake));
    fake.join_polls = INT_MAX;
    cr_assert_eq(wk_nccl_join_api(&fake_api, id, 4, 2, &wait, &n, err, sizeof(err)), -ETIMEDOUT);
    cr_assert_null(n);
    cr_assert_str_eq(err, "ncclCommInitRankConfig(rank 2 of 4): not every rank joined within "
                          "0.05 s");
    cr_assert_eq(fake.comms[0].aborted, 1, "NCCL's half-made handle is aborted");
}

Test(nccl_fake, an_abort_ends_the_wait_of_a_join)
{
    atomic_int cancel = 1;
    const struct wk_nccl_wait wait = {60000, &cancel};
    unsigned char id[WK_NCCL_ID_BYTES] = {0};
    wk_nccl_t *n = NULL;
    char err[256] = "";

    memset(&fake, 0, sizeof(fake));
    fake.join_polls = INT_MAX;
    cr_assert_eq(wk_nccl_join_api(&fake_api, id, 2, 0, &wait, &n, err, sizeof(err)), -ECANCELED);
    cr_assert_str_eq(err, "ncclCommInitRankConfig(rank 0 of 2): given up, the job was aborted");
    cr_assert_eq(fake.comms[0].aborted, 1);
    cr_assert_eq(wk_nccl_join_api(&fake_api, id, 2, 0, &(struct wk_nccl_wait){0, NULL}, &n, err,
                                  sizeof(err)),
                 -EINVAL);
    cr_assert_str_eq(err, "wk_nccl_join: a timeout of 0 ms");
}

Test(nccl_fake, an_nccl_without_the_config_call_joins_blocking)
{
    struct wk_nccl_api old = fake_api;
    const struct wk_nccl_wait wait = {50, NULL};
    unsigned char id[WK_NCCL_ID_BYTES] = {0};
    wk_nccl_t *n = NULL;
    char err[256] = "";

    memset(&fake, 0, sizeof(fake));
    old.comm_init_rank_config = NULL; /* NCCL before 2.14 */
    cr_assert_eq(wk_nccl_join_api(&old, id, 1, 0, &wait, &n, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(fake.log[0], "init 0 of 1, id 0");
    wk_nccl_destroy(n);
}

Test(nccl_fake, an_exchange_across_communicators_is_one_group)
{
    wk_nccl_t *a = fake_open(), *b = NULL, *comms[2];
    float x = 3.5f, y = 0.0f;
    struct wk_nccl_transfer t[2] = {{0, 0, WK_NCCL_FP32, host_ptr(&x), 1},
                                    {1, 0, WK_NCCL_FP32, host_ptr(&y), 1}};
    char err[256] = "";

    cr_assert_eq(wk_nccl_split(a, 0, 0, &b), 0, "%s", wk_nccl_error(a));
    fake.nlog = 0;
    comms[0] = a;
    comms[1] = b;
    cr_assert_eq(wk_nccl_exchange_across(comms, NULL, t, 2, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(fake.nlog, 4, "group, send, recv, end: one group");
    cr_assert_str_eq(fake.log[0], "group");
    cr_assert_str_eq(fake.log[3], "end");
    cr_assert_eq(y, 3.5f, "the receive got the send (the fake matches them at the group's end)");
    comms[1] = NULL;
    cr_assert_eq(wk_nccl_exchange_across(comms, NULL, t, 2, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "transfer 1 has no communicator");
    wk_nccl_destroy(b);
    wk_nccl_destroy(a);
}
