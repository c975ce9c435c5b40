/* test_fake_nccl.c - the fake NCCL of libfakecuda.so, which the tests of the
 * cuda backend's communication stand on: three rank processes make a
 * communicator from one unique id, all-reduce (the rank-order sum, bitwise
 * on every rank), exchange buffers larger than a ring in one group in both
 * directions around a ring of ranks (no deadlock, every byte), split into
 * sub-communicators, and a rank that never joins makes the others fail
 * rather than hang; then worker/cuda/comm/nccl.c (the cuda backend's NCCL layer) run
 * on it by two rank processes: grouped exchange, all-reduce, split. */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/unit/fakestack.h"
#include "worker/cuda/driver.h"
#include "worker/cuda/comm/nccl.h"

typedef struct {
    char internal[128];
} nccl_id;
typedef struct nccl_comm *nccl_comm;

struct nccl {
    int (*get_unique_id)(nccl_id *);
    int (*init_rank)(nccl_comm *, int, nccl_id, int);
    int (*destroy)(nccl_comm);
    int (*group_start)(void);
    int (*group_end)(void);
    int (*send)(const void *, size_t, int, int, nccl_comm, void *);
    int (*recv)(void *, size_t, int, int, nccl_comm, void *);
    int (*all_reduce)(const void *, void *, size_t, int, int, nccl_comm, void *);
    int (*split)(nccl_comm, int, int, nccl_comm *, void *);
    int (*count)(nccl_comm, int *);
    int (*user_rank)(nccl_comm, int *);
};

#define NCCL_FLOAT32 7
#define NCCL_UINT8 1
#define NCCL_SUM 0
#define RANKS 3

static int load(struct nccl *n)
{
    void *h = dlopen(fakestack_path(), RTLD_NOW | RTLD_LOCAL);

    if (!h)
        return -1;
    *(void **)&n->get_unique_id = dlsym(h, "ncclGetUniqueId");
    *(void **)&n->init_rank = dlsym(h, "ncclCommInitRank");
    *(void **)&n->destroy = dlsym(h, "ncclCommDestroy");
    *(void **)&n->group_start = dlsym(h, "ncclGroupStart");
    *(void **)&n->group_end = dlsym(h, "ncclGroupEnd");
    *(void **)&n->send = dlsym(h, "ncclSend");
    *(void **)&n->recv = dlsym(h, "ncclRecv");
    *(void **)&n->all_reduce = dlsym(h, "ncclAllReduce");
    *(void **)&n->split = dlsym(h, "ncclCommSplit");
    *(void **)&n->count = dlsym(h, "ncclCommCount");
    *(void **)&n->user_rank = dlsym(h, "ncclCommUserRank");
    return n->get_unique_id && n->split && n->user_rank ? 0 : -1;
}

static float value(int rank, size_t i)
{
    return (float)(rank + 1) * 0.1f + (float)i * 1e-3f;
}

/* One rank's whole run; 0 when everything it saw was right. */
static int rank_main(const nccl_id *id, int rank)
{
    struct wk_cuda_paths paths = {.cuda = fakestack_path(), .driver_only = 1};
    enum { N = 1000, BIG = 1 << 20 };
    struct nccl n;
    wk_cuda_t *c = NULL;
    wk_cuda_stream s = NULL;
    nccl_comm comm = NULL, sub = NULL;
    wk_cuda_ptr buf, out, tx, rx;
    float h[N];
    unsigned char *big;
    char err[256];
    int next = (rank + 1) % RANKS, prev = (rank + RANKS - 1) % RANKS, cnt = 0, me = -1;

    if (load(&n) < 0 || wk_cuda_open(&paths, &c, err, sizeof(err)) < 0 ||
        wk_cuda_context(c, rank) < 0 || wk_cuda_stream_create(c, &s) < 0)
        return 10; /* one fake GPU per rank, as NCCL wants */
    if (n.init_rank(&comm, RANKS, *id, rank) != 0)
        return 11;
    /* all-reduce: the rank-order float sum, the same bits everywhere */
    for (size_t i = 0; i < N; i++)
        h[i] = value(rank, i);
    if (wk_cuda_alloc(c, sizeof(h), &buf) < 0 || wk_cuda_alloc(c, sizeof(h), &out) < 0 ||
        wk_cuda_upload(c, buf, h, sizeof(h)) < 0)
        return 12;
    if (n.all_reduce((void *)buf, (void *)out, N, NCCL_FLOAT32, NCCL_SUM, comm, s) != 0 ||
        wk_cuda_stream_sync(c, s) < 0 || wk_cuda_download(c, h, out, sizeof(h)) < 0)
        return 13;
    for (size_t i = 0; i < N; i++) {
        float want = value(0, i);

        for (int r = 1; r < RANKS; r++)
            want += value(r, i);
        if (memcmp(&h[i], &want, sizeof(want)) != 0)
            return 14;
    }
    /* one group: 1 MiB to the next rank and from the previous one */
    big = malloc(BIG);
    for (size_t i = 0; i < BIG; i++)
        big[i] = (unsigned char)(i * 7 + (size_t)rank);
    if (wk_cuda_alloc(c, BIG, &tx) < 0 || wk_cuda_alloc(c, BIG, &rx) < 0 ||
        wk_cuda_upload(c, tx, big, BIG) < 0)
        return 15;
    if (n.group_start() != 0 || n.send((void *)tx, BIG, NCCL_UINT8, next, comm, s) != 0 ||
        n.recv((void *)rx, BIG, NCCL_UINT8, prev, comm, s) != 0 || n.group_end() != 0 ||
        wk_cuda_stream_sync(c, s) < 0 || wk_cuda_download(c, big, rx, BIG) < 0)
        return 16;
    for (size_t i = 0; i < BIG; i++)
        if (big[i] != (unsigned char)(i * 7 + (size_t)prev))
            return 17;
    free(big);
    /* split: ranks 0 and 2 (color 0, 2 first by key) and rank 1 alone */
    if (n.split(comm, rank == 1, RANKS - rank, &sub, NULL) != 0 || !sub ||
        n.count(sub, &cnt) != 0 || n.user_rank(sub, &me) != 0)
        return 18;
    if (cnt != (rank == 1 ? 1 : 2) || me != (rank == 0 ? 1 : 0))
        return 19;
    n.destroy(sub);
    n.destroy(comm);
    wk_cuda_stream_destroy(c, s);
    wk_cuda_close(c);
    return 0;
}

Test(fake_nccl, three_ranks_all_reduce_exchange_and_split, .timeout = 60)
{
    struct nccl n;
    nccl_id id;
    pid_t pid[RANKS];

    setenv("FAKECUDA_DEVICES", "4", 1);
    cr_assert_eq(load(&n), 0, "%s", fakestack_path());
    cr_assert_eq(n.get_unique_id(&id), 0);
    for (int r = 0; r < RANKS; r++) {
        pid[r] = fork();
        cr_assert_geq(pid[r], 0);
        if (pid[r] == 0)
            _exit(rank_main(&id, r));
    }
    for (int r = 0; r < RANKS; r++) {
        int status = 0;

        cr_assert_eq(waitpid(pid[r], &status, 0), pid[r]);
        cr_assert(WIFEXITED(status), "rank %d died", r);
        cr_assert_eq(WEXITSTATUS(status), 0, "rank %d failed at step %d", r, WEXITSTATUS(status));
    }
}

/* Ranks 0 and 1 of a 3-rank communicator join; rank 2 never does. */
Test(fake_nccl, a_missing_rank_is_not_waited_for_forever, .timeout = 30)
{
    struct nccl n;
    nccl_id id;
    nccl_comm comm = NULL;

    setenv("FAKE_NCCL_TIMEOUT_MS", "500", 1);
    cr_assert_eq(load(&n), 0);
    cr_assert_eq(n.get_unique_id(&id), 0);
    cr_assert_eq(n.init_rank(&comm, 2, id, 0), 2 /* ncclSystemError */,
                 "a 2-rank communicator with one rank came up");
}

/* --- worker/cuda/comm/nccl.c on the fake, between two processes ----------------------- */

static int fake_rank_main(const unsigned char *id, int rank)
{
    struct wk_cuda_paths paths = {
        .cuda = fakestack_path(), .nccl = fakestack_path(), .cublaslt = fakestack_path()};
    enum { N = 4099 };
    wk_cuda_t *c = NULL;
    wk_cuda_stream s = NULL;
    wk_nccl_t *n = NULL, *alone = NULL;
    wk_cuda_ptr mine, theirs, sum;
    float h[N], got[N];
    char err[512];
    const int peer = 1 - rank;

    if (wk_cuda_open(&paths, &c, err, sizeof(err)) < 0 || wk_cuda_context(c, rank) < 0 ||
        wk_cuda_stream_create(c, &s) < 0)
        return 20;
    if (wk_nccl_create(c, id, 2, rank, &n, err, sizeof(err)) < 0)
        return 21;
    if (wk_nccl_rank(n) != rank || wk_nccl_size(n) != 2)
        return 22;
    for (int i = 0; i < N; i++)
        h[i] = value(rank, (size_t)i);
    if (wk_cuda_alloc(c, sizeof(h), &mine) < 0 || wk_cuda_alloc(c, sizeof(h), &theirs) < 0 ||
        wk_cuda_alloc(c, sizeof(h), &sum) < 0 || wk_cuda_upload(c, mine, h, sizeof(h)) < 0)
        return 23;
    {
        /* both ranks send first in their lists: the group must not deadlock */
        const struct wk_nccl_transfer t[2] = {
            {0, peer, WK_NCCL_FP32, mine, N},
            {1, peer, WK_NCCL_FP32, theirs, N},
        };

        if (wk_nccl_exchange(n, s, t, 2) < 0 || wk_cuda_stream_sync(c, s) < 0 ||
            wk_cuda_download(c, got, theirs, sizeof(got)) < 0)
            return 24;
        for (int i = 0; i < N; i++)
            if (got[i] != value(peer, (size_t)i))
                return 25;
    }
    if (wk_nccl_allreduce_sum(n, s, mine, sum, N) < 0 || wk_cuda_stream_sync(c, s) < 0 ||
        wk_cuda_download(c, got, sum, sizeof(got)) < 0)
        return 26;
    for (int i = 0; i < N; i++) {
        float want = value(0, (size_t)i) + value(1, (size_t)i);

        if (memcmp(&got[i], &want, sizeof(want)) != 0)
            return 27;
    }
    if (wk_nccl_split(n, rank, 0, &alone) < 0 || !alone || wk_nccl_size(alone) != 1 ||
        wk_nccl_check(n) < 0)
        return 28;
    wk_nccl_destroy(alone);
    wk_nccl_destroy(n);
    wk_cuda_stream_destroy(c, s);
    wk_cuda_close(c);
    return 0;
}

Test(fake_nccl, the_workers_nccl_layer_runs_on_it_between_two_processes, .timeout = 60)
{
    setenv("FAKECUDA_DEVICES", "2", 1);
    struct wk_cuda_paths paths = {
        .cuda = fakestack_path(), .nccl = fakestack_path(), .cublaslt = fakestack_path()};
    unsigned char id[WK_NCCL_ID_BYTES];
    wk_cuda_t *c = NULL;
    char err[512];
    pid_t pid[2];

    cr_assert_eq(wk_cuda_open(&paths, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert(strstr(wk_cuda_describe(c), "NCCL 2.27.0"), "%s", wk_cuda_describe(c));
    cr_assert_eq(wk_nccl_unique_id(c, id, err, sizeof(err)), 0, "%s", err);
    for (int r = 0; r < 2; r++) {
        pid[r] = fork();
        cr_assert_geq(pid[r], 0);
        if (pid[r] == 0)
            _exit(fake_rank_main(id, r));
    }
    for (int r = 0; r < 2; r++) {
        int status = 0;

        cr_assert_eq(waitpid(pid[r], &status, 0), pid[r]);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rank %d failed at step %d", r,
                  WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    }
    wk_cuda_close(c);
}
