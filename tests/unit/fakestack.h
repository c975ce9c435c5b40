/* fakestack.h - where the unit tests find libfakecuda.so (tests/fake/: the
 * Driver API, NCCL and cuBLASLt on the host): $(BUILD)/lib/, from the test
 * binary's $(BUILD)/tests/unit/. Header-only, for Criterion tests. */
#ifndef DX_TEST_FAKESTACK_H
#define DX_TEST_FAKESTACK_H

#include <criterion/criterion.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <unistd.h>

static inline const char *fakestack_path(void)
{
    static char path[PATH_MAX];
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);

    cr_assert_gt(n, 0);
    exe[n] = '\0';
    snprintf(path, sizeof(path), "%s/../../lib/libfakecuda.so", dirname(exe));
    cr_assert_eq(access(path, R_OK), 0, "%s is not built (make test-build)", path);
    return path;
}

#endif
