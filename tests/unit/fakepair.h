/* fakepair.h - two ranks of a cuda-backend test as two processes on the
 * fake GPU stack (one fake GPU each), joined by a socketpair that serves
 * as their byte channel (the data plane's part: IPC ring descriptors, a
 * "go on" byte). Header-only, for Criterion tests. */
#ifndef DX_TEST_FAKEPAIR_H
#define DX_TEST_FAKEPAIR_H

#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "worker/cuda/gpu.h"

/* A byte channel's ends over the socketpair fd passed as arg. */
static inline int fakepair_send(void *arg, int peer, const void *buf, size_t len)
{
    (void)peer;
    return write((int)(intptr_t)arg, buf, len) == (ssize_t)len ? 0 : -EIO;
}

static inline int fakepair_recv(void *arg, int peer, void *buf, size_t cap, size_t *len)
{
    ssize_t n = read((int)(intptr_t)arg, buf, cap);

    (void)peer;
    if (n <= 0)
        return -EIO;
    *len = (size_t)n;
    return 0;
}

/* Runs rank_main(rank, fd, scenario) for ranks 0 and 1 in two processes;
 * each returns 0 or the number of the step that failed. */
static inline void fakepair_run(int (*rank_main)(int rank, int fd, int scenario), int scenario)
{
    int sv[2], status;
    pid_t pid[2];

    setenv("FAKECUDA_DEVICES", "2", 1);
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    for (int r = 0; r < 2; r++) {
        pid[r] = fork();
        cr_assert_geq(pid[r], 0);
        if (pid[r] == 0)
            _exit(rank_main(r, sv[r], scenario));
    }
    close(sv[0]);
    close(sv[1]);
    for (int r = 0; r < 2; r++) {
        cr_assert_eq(waitpid(pid[r], &status, 0), pid[r]);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rank %d failed at step %d", r,
                  WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    }
}

#endif
