/* test_xchg_fake.c - worker/cuda/comm/xchg.c, the expert exchange's transport,
 * between two processes on the fake GPU stack (one fake GPU each, one
 * node, no NCCL): grouped transfers of several sizes and types both ways
 * pair up in list order (one spanning several pieces), a transfer to
 * oneself or from an unaligned address is refused by name, the record
 * limit holds, and an abort ends a receive whose sender never comes, the
 * check naming it. A peer on another node without NCCL is refused. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/unit/fakepair.h"
#include "tests/unit/fakestack.h"
#include "worker/cuda/comm/ipcring.h"
#include "worker/cuda/comm/xchg.h"

#define BIG (WK_IPCRING_LINK_PIECE / 4 * 2 + 36) /* floats: three pieces */

static int rank_main(int rank, int fd, int scenario)
{
    const int same[2] = {1, 1}, peer = 1 - rank;
    struct wk_xchg_config cfg = {.ranks = 2,
                                 .rank = rank,
                                 .same_node = same,
                                 .max_calls = 3,
                                 .send_bytes = fakepair_send,
                                 .recv_bytes = fakepair_recv,
                                 .arg = (void *)(intptr_t)fd};
    struct wk_cuda_paths paths = {
        .cuda = fakestack_path(), .nccl = fakestack_path(), .cublaslt = fakestack_path()};
    static float big[BIG], got[BIG];
    unsigned char small[5] = {1, 2, 3, 4, 5}, sgot[16];
    wk_cuda_ptr dbig, dgot, dsmall, dsgot;
    wk_cuda_t *c = NULL;
    wk_gpu_t *g = NULL;
    wk_xchg_t *x = NULL;
    wk_cuda_stream s;
    char err[512];

    if (wk_cuda_open(&paths, &c, err, sizeof(err)) < 0 ||
        wk_gpu_create(c, rank, 1 << 20, &g, err, sizeof(err)) < 0)
        return 10;
    cfg.gpu = g;
    s = wk_gpu_compute_stream(g);
    if (wk_xchg_create(&cfg, &x, err, sizeof(err)) < 0 ||
        strcmp(wk_xchg_describe(x), "1 by IPC, 0 by NCCL"))
        return 11;
    for (int i = 0; i < BIG; i++)
        big[i] = (float)(rank * 1000000 + i);
    small[0] = (unsigned char)(10 + rank);
    if (wk_cuda_alloc(c, sizeof(big), &dbig) < 0 || wk_cuda_alloc(c, sizeof(big), &dgot) < 0 ||
        wk_cuda_alloc(c, 16, &dsmall) < 0 || wk_cuda_alloc(c, 16, &dsgot) < 0 ||
        wk_cuda_upload(c, dbig, big, sizeof(big)) < 0 ||
        wk_cuda_upload(c, dsmall, small, sizeof(small)) < 0)
        return 12;
    if (scenario == 0) {
        /* the big one, then 5 bytes: sends and receives in list order */
        const struct wk_nccl_transfer t[] = {
            {0, peer, WK_NCCL_FP32, dbig, BIG},
            {1, peer, WK_NCCL_FP32, dgot, BIG},
            {0, peer, WK_NCCL_BYTES, dsmall, 5},
            {1, peer, WK_NCCL_BYTES, dsgot, 5},
        };

        if (wk_xchg_run(x, s, t, 4) < 0 || wk_cuda_stream_sync(c, s) < 0 || wk_xchg_check(x) < 0)
            return 13;
        if (wk_cuda_download(c, got, dgot, sizeof(got)) < 0 ||
            wk_cuda_download(c, sgot, dsgot, 5) < 0)
            return 14;
        for (int i = 0; i < BIG; i++)
            if (got[i] != (float)(peer * 1000000 + i))
                return 15;
        if (sgot[0] != 10 + peer || sgot[4] != 5)
            return 16;
        /* refused before anything moves */
        const struct wk_nccl_transfer self = {0, rank, WK_NCCL_BYTES, dsmall, 5};
        const struct wk_nccl_transfer odd = {0, peer, WK_NCCL_BYTES, dsmall + 4, 5};

        if (wk_xchg_run(x, s, &self, 1) != -EINVAL || !strstr(wk_xchg_error(x), "ep rank") ||
            wk_xchg_run(x, s, &odd, 1) != -EINVAL ||
            !strstr(wk_xchg_error(x), "not 16-byte aligned"))
            return 17;
        /* three calls fit before a check, a fourth does not */
        for (int k = 0; k < 3; k++)
            if (wk_xchg_run(x, s, t + 2, 2) < 0)
                return 18;
        if (wk_xchg_run(x, s, t + 2, 2) != -ENOSPC ||
            !strstr(wk_xchg_error(x), "more than 3 expert exchanges"))
            return 19;
        if (wk_cuda_stream_sync(c, s) < 0 || wk_xchg_check(x) < 0)
            return 20;
    } else if (rank == 1) {
        const struct wk_nccl_transfer t = {1, peer, WK_NCCL_FP32, dgot, BIG};

        if (wk_xchg_run(x, s, &t, 1) < 0)
            return 30;
        usleep(50 * 1000);
        wk_xchg_abort(x);
        if (wk_cuda_stream_sync(c, s) < 0 || wk_xchg_check(x) != -EIO ||
            !strstr(wk_xchg_error(x), "receive from ep rank 0") ||
            !strstr(wk_xchg_error(x), strerror(ECANCELED)))
            return 31;
        if (write(fd, "x", 1) != 1)
            return 32;
    } else {
        char b;

        if (read(fd, &b, 1) != 1)
            return 40;
    }
    wk_xchg_destroy(x);
    wk_cuda_free(c, dbig);
    wk_cuda_free(c, dgot);
    wk_cuda_free(c, dsmall);
    wk_cuda_free(c, dsgot);
    wk_gpu_destroy(g);
    wk_cuda_close(c);
    return 0;
}

Test(xchg_fake, transfers_pair_up_in_list_order_through_ipc, .timeout = 60)
{
    fakepair_run(rank_main, 0);
}

Test(xchg_fake, an_abort_ends_a_receive_and_the_check_names_it, .timeout = 60)
{
    fakepair_run(rank_main, 1);
}

Test(xchg_fake, a_peer_on_another_node_needs_nccl)
{
    struct fakestack_gpu f;
    const int same[3] = {1, 0, 1};
    struct wk_xchg_config cfg = {.ranks = 3,
                                 .rank = 0,
                                 .same_node = same,
                                 .max_calls = 1,
                                 .send_bytes = fakepair_send,
                                 .recv_bytes = fakepair_recv};
    wk_xchg_t *x = NULL;
    char err[256];

    fakestack_gpu_open(&f);
    cfg.gpu = f.g;
    cr_assert_eq(wk_xchg_create(&cfg, &x, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "ep rank 1 runs on another node, and the job has no NCCL");
    cr_assert_null(x);
    fakestack_gpu_close(&f);
}
