/* test_nccl_id.c - the NCCL unique ids duplexd makes for cuda jobs
 * (coordinator/nccl_id.c), against the installed libnccl.so.2 (skipped when
 * it cannot be loaded) and against libraries that are not there or are not
 * NCCL. The per-attempt ids in Assignments are tested in test_jobs.c. */
#define _GNU_SOURCE /* dladdr */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/nccl_id.h"

static void need_nccl(void)
{
    void *lib = dlopen(COORD_NCCL_LIB_DEFAULT, RTLD_NOW | RTLD_LOCAL);

    if (!lib)
        cr_skip_test("%s cannot be loaded here (%s): set LD_LIBRARY_PATH to NCCL's directory",
                     COORD_NCCL_LIB_DEFAULT, dlerror());
    dlclose(lib);
}

static int all_bytes(const unsigned char *v, size_t n, unsigned char b)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] != b)
            return 0;
    return 1;
}

Test(nccl_id, two_ids_differ_and_fill_128_bytes)
{
    unsigned char a[COORD_NCCL_ID_BYTES + 8], b[COORD_NCCL_ID_BYTES + 8];
    coord_nccl_t *n = NULL;
    char err[512] = "";

    need_nccl();
    cr_assert_eq(COORD_NCCL_ID_BYTES, 128);
    memset(a, 0xa5, sizeof(a));
    memset(b, 0xa5, sizeof(b));
    cr_assert_eq(coord_nccl_create(NULL, &n), 0);
    cr_assert_eq(coord_nccl_unique_id(n, a, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(coord_nccl_unique_id(n, b, err, sizeof(err)), 0, "%s", err);
    cr_assert_neq(memcmp(a, b, COORD_NCCL_ID_BYTES), 0, "two ids are the same");
    cr_assert_not(all_bytes(a, COORD_NCCL_ID_BYTES, 0), "an id of zeros");
    cr_assert_not(all_bytes(a, COORD_NCCL_ID_BYTES, 0xa5), "the id was not written");
    /* exactly 128 bytes: nothing past them is touched */
    cr_assert(all_bytes(a + COORD_NCCL_ID_BYTES, 8, 0xa5));
    cr_assert(all_bytes(b + COORD_NCCL_ID_BYTES, 8, 0xa5));
    coord_nccl_destroy(n);
}

Test(nccl_id, a_path_to_the_library_works_too)
{
    unsigned char id[COORD_NCCL_ID_BYTES];
    coord_nccl_t *n = NULL;
    char err[512] = "", path[4096];
    Dl_info info;
    void *lib, *sym;

    need_nccl();
    lib = dlopen(COORD_NCCL_LIB_DEFAULT, RTLD_NOW | RTLD_LOCAL);
    sym = dlsym(lib, "ncclGetUniqueId");
    cr_assert_not_null(sym);
    cr_assert_neq(dladdr(sym, &info), 0);
    snprintf(path, sizeof(path), "%s", info.dli_fname);
    dlclose(lib);
    cr_assert_eq(path[0], '/', "dladdr gave %s", path);
    cr_assert_eq(coord_nccl_create(path, &n), 0);
    cr_assert_eq(coord_nccl_unique_id(n, id, err, sizeof(err)), 0, "%s", err);
    coord_nccl_destroy(n);
}

Test(nccl_id, a_bogus_path_is_named_in_the_error)
{
    const char *bogus = "/nonexistent/dir/libnccl-not-here.so.2";
    unsigned char id[COORD_NCCL_ID_BYTES];
    coord_nccl_t *n = NULL;
    char err[512] = "";

    memset(id, 0x5a, sizeof(id));
    cr_assert_eq(coord_nccl_create(bogus, &n), 0, "creating opens nothing yet");
    cr_assert_eq(coord_nccl_unique_id(n, id, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "cannot load NCCL from /nonexistent/dir/libnccl-not-here.so.2"),
                       "%s", err);
    cr_assert_not_null(strstr(err, "No such file"), "dlerror() is missing: %s", err);
    cr_assert(all_bytes(id, sizeof(id), 0x5a), "a failed call wrote an id");
    /* and again: the open is retried, the error the same */
    err[0] = '\0';
    cr_assert_eq(coord_nccl_unique_id(n, id, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, bogus), "%s", err);
    coord_nccl_destroy(n);
}

Test(nccl_id, a_library_that_is_not_nccl_is_refused)
{
    unsigned char id[COORD_NCCL_ID_BYTES];
    coord_nccl_t *n = NULL;
    char err[512] = "";

    cr_assert_eq(coord_nccl_create("libm.so.6", &n), 0);
    cr_assert_eq(coord_nccl_unique_id(n, id, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "libm.so.6 has no ncclGetUniqueId"), "%s", err);
    coord_nccl_destroy(n);
}

Test(nccl_id, the_environment_names_the_default_library)
{
    unsigned char id[COORD_NCCL_ID_BYTES];
    coord_nccl_t *n = NULL;
    char err[512] = "";

    cr_assert_eq(setenv(COORD_NCCL_LIB_ENV, "/nonexistent/from-env/libnccl.so.2", 1), 0);
    cr_assert_eq(coord_nccl_create(NULL, &n), 0);
    cr_assert_eq(coord_nccl_unique_id(n, id, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "/nonexistent/from-env/libnccl.so.2"), "%s", err);
    coord_nccl_destroy(n);
    /* a path given wins over the environment */
    cr_assert_eq(coord_nccl_create("/nonexistent/given/libnccl.so.2", &n), 0);
    cr_assert_eq(coord_nccl_unique_id(n, id, err, sizeof(err)), -ENOENT);
    cr_assert_not_null(strstr(err, "/nonexistent/given/libnccl.so.2"), "%s", err);
    coord_nccl_destroy(n);
    unsetenv(COORD_NCCL_LIB_ENV);
    coord_nccl_destroy(NULL);
}
