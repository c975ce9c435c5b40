/* test_plink_fake.c - worker/cuda/comm/plink.c, the cuda backend's pipeline links,
 * between two processes on the fake GPU stack (one fake GPU each): both
 * directions of a same-node pair go through IPC rings (their descriptors
 * over a socketpair), a message of several pieces arrives whole and in
 * order, the step's transfers are checked; an abort ends a receive whose
 * sender never comes at once (not after the transport's timeout) and the
 * step reports it; a link that would carry more messages than it has
 * records for is refused; a pair across nodes without NCCL goes through
 * the hosts. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/unit/fakepair.h"
#include "tests/unit/fakestack.h"
#include "worker/cuda/comm/ipcring.h"
#include "worker/cuda/comm/plink.h"

#define MSG_FLOATS (3 * WK_IPCRING_LINK_PIECE / 4 + 100) /* four pieces, the last partial */
#define MAX_MSGS 4

static double now_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* One rank of a pipeline of two (rank 0 below rank 1). */
static int rank_main(int rank, int fd, int scenario)
{
    struct wk_plink_config cfg = {
        .pp = 2,
        .pp_rank = rank,
        .same_node = {1, 1},
        .msg_bytes = MSG_FLOATS * sizeof(float),
        .max_msgs = MAX_MSGS,
        .send_bytes = fakepair_send,
        .recv_bytes = fakepair_recv,
        .arg = (void *)(intptr_t)fd,
    };
    struct wk_cuda_paths paths = {
        .cuda = fakestack_path(), .nccl = fakestack_path(), .cublaslt = fakestack_path()};
    const int peer = 1 - rank;
    static float h[MSG_FLOATS], got[MSG_FLOATS];
    wk_cuda_t *c = NULL;
    wk_gpu_t *g = NULL;
    wk_plink_t *l = NULL;
    wk_cuda_ptr buf = 0, in = 0;
    wk_cuda_stream s;
    char err[512];
    int rc;

    if (wk_cuda_open(&paths, &c, err, sizeof(err)) < 0 ||
        wk_gpu_create(c, rank, 1 << 20, &g, err, sizeof(err)) < 0)
        return 10;
    s = wk_gpu_compute_stream(g);
    cfg.gpu = g;
    if (wk_plink_create(&cfg, &l, err, sizeof(err)) < 0)
        return 11;
    if (wk_plink_kind(l, peer) != WK_PLINK_IPC ||
        strcmp(wk_plink_describe(l), rank ? "IPC down" : "IPC up"))
        return 12;
    if (wk_cuda_alloc(c, sizeof(h), &buf) < 0 || wk_cuda_alloc(c, sizeof(h), &in) < 0)
        return 13;
    for (int i = 0; i < MSG_FLOATS; i++)
        h[i] = (float)(rank * 100000 + i);
    if (wk_cuda_upload(c, buf, h, sizeof(h)) < 0 || wk_cuda_memset(c, in, 0xff, sizeof(h)) < 0)
        return 14;
    if (scenario == 0) {
        /* both directions at once, twice: FIFO, whole, every byte */
        for (int m = 0; m < 2; m++) {
            if (wk_plink_send(l, peer, s, buf) < 0 || wk_plink_recv(l, peer, s, in) < 0)
                return 15;
            if (wk_plink_step_end(l) < 0 || wk_cuda_stream_sync(c, s) < 0)
                return 16;
            if (wk_cuda_download(c, got, in, sizeof(got)) < 0)
                return 17;
            for (int i = 0; i < MSG_FLOATS; i++)
                if (got[i] != (float)(peer * 100000 + i))
                    return 18;
        }
        /* more messages than records in one step: refused by name */
        for (int m = 0; m < MAX_MSGS; m++)
            if (wk_plink_send(l, peer, s, buf) < 0 || wk_plink_recv(l, peer, s, in) < 0)
                return 19;
        if (wk_plink_send(l, peer, s, buf) != -ENOSPC ||
            !strstr(wk_plink_error(l), "more than 4 messages to pipeline rank"))
            return 20;
        if (wk_plink_step_end(l) < 0)
            return 21;
    } else if (rank == 1) {
        /* a receive whose sender never sends: the abort ends it */
        double t0;

        if (wk_plink_recv(l, peer, s, in) < 0)
            return 30;
        usleep(100 * 1000);
        t0 = now_ms();
        wk_plink_abort(l);
        rc = wk_plink_step_end(l);
        if (rc != -EIO || !strstr(wk_plink_error(l), "receive from pipeline rank 0") ||
            !strstr(wk_plink_error(l), strerror(ECANCELED)))
            return 31;
        if (now_ms() - t0 > 10000) /* the fake transport's own timeout is 30 s */
            return 32;
        if (write(fd, "x", 1) != 1) /* rank 0 may go */
            return 33;
    } else {
        char x;

        if (read(fd, &x, 1) != 1) /* rank 1 is done: nothing was ever sent */
            return 40;
    }
    wk_cuda_free(c, buf);
    wk_cuda_free(c, in);
    wk_plink_destroy(l);
    wk_gpu_destroy(g);
    wk_cuda_close(c);
    return 0;
}

Test(plink_fake, a_same_node_pair_talks_through_ipc_rings, .timeout = 60)
{
    fakepair_run(rank_main, 0);
}

Test(plink_fake, an_abort_ends_a_receive_that_waits_for_a_dead_peer, .timeout = 60)
{
    fakepair_run(rank_main, 1);
}

Test(plink_fake, a_pair_across_nodes_without_nccl_goes_through_the_hosts)
{
    struct fakestack_gpu f;
    struct wk_plink_config cfg = {.pp = 3,
                                  .pp_rank = 1,
                                  .same_node = {0, 0},
                                  .msg_bytes = 64,
                                  .max_msgs = 1,
                                  .send_bytes = fakepair_send,
                                  .recv_bytes = fakepair_recv};
    wk_plink_t *l = NULL;
    char err[256];

    fakestack_gpu_open(&f);
    cfg.gpu = f.g;
    cr_assert_eq(wk_plink_create(&cfg, &l, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_plink_kind(l, 0), WK_PLINK_HOST);
    cr_assert_eq(wk_plink_kind(l, 2), WK_PLINK_HOST);
    cr_assert_eq(wk_plink_kind(l, 5), WK_PLINK_HOST, "not a neighbour");
    cr_assert_str_eq(wk_plink_describe(l), "hosts up, hosts down");
    cr_assert_eq(wk_plink_send(l, 2, f.s, 0), -EPROTO);
    cr_assert_str_eq(wk_plink_error(l), "no device link to pipeline rank 2");
    cr_assert_eq(wk_plink_step_end(l), 0, "%s", wk_plink_error(l));
    wk_plink_destroy(l);
    cfg.max_msgs = 0;
    cr_assert_eq(wk_plink_create(&cfg, &l, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "wk_plink_create: a bad configuration");
    fakestack_gpu_close(&f);
}
