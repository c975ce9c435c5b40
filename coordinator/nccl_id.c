/* nccl_id.c - NCCL unique ids for cuda jobs, from a lazily opened
 * libnccl.so.2 (see nccl_id.h). */
#include "coordinator/nccl_id.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/* ncclUniqueId, ncclResult_t as int (checked against <nccl.h> by
 * tests/unit/test_nccl_abi.c through worker/cuda/comm/nccl.h's same declarations) */
typedef struct {
    char internal[COORD_NCCL_ID_BYTES];
} nccl_id_abi;
typedef int (*get_unique_id_fn)(nccl_id_abi *id);
typedef const char *(*get_error_string_fn)(int result);

struct coord_nccl {
    char *library;
    void *lib;
    get_unique_id_fn get_unique_id;
    get_error_string_fn get_error_string; /* may be NULL */
};

int coord_nccl_create(const char *library, coord_nccl_t **out)
{
    coord_nccl_t *n = calloc(1, sizeof(*n));
    const char *env = getenv(COORD_NCCL_LIB_ENV);

    *out = NULL;
    if (!library)
        library = env && *env ? env : COORD_NCCL_LIB_DEFAULT;
    if (!n || !(n->library = strdup(library))) {
        free(n);
        return -ENOMEM;
    }
    *out = n;
    return 0;
}

void coord_nccl_destroy(coord_nccl_t *n)
{
    if (!n)
        return;
    /* ids handed out keep their bootstrap root threads inside NCCL's
     * code: unloading it under them would crash, so the library stays */
    free(n->library);
    free(n);
}

static int nccl_open(coord_nccl_t *n, char *err, size_t errlen)
{
    void *sym;
    const char *why;
    int rc;

    if (n->lib)
        return 0;
    dlerror();
    if (!(n->lib = dlopen(n->library, RTLD_NOW | RTLD_LOCAL))) {
        why = dlerror();
        return dx_errf(err, errlen, -ENOENT, "cannot load NCCL from %s: %s", n->library,
                       why ? why : "unknown dlopen error");
    }
    dlerror();
    sym = dlsym(n->lib, "ncclGetUniqueId");
    if (!sym) {
        why = dlerror();
        rc = dx_errf(err, errlen, -ENOENT, "%s has no ncclGetUniqueId: %s", n->library,
                     why ? why : "symbol is NULL");
        dlclose(n->lib);
        n->lib = NULL;
        return rc;
    }
    /* POSIX: a data pointer from dlsym converts to a function pointer */
    memcpy(&n->get_unique_id, &sym, sizeof(sym));
    sym = dlsym(n->lib, "ncclGetErrorString");
    memcpy(&n->get_error_string, &sym, sizeof(sym));
    return 0;
}

/* -errno for an ncclResult_t: ncclInvalidArgument and ncclInvalidUsage are
 * -EINVAL, ncclRemoteError -EREMOTEIO, ncclInProgress -EINPROGRESS; a CUDA,
 * system or internal error (1, 2, 3) or one this does not know is -EIO. */
static int nccl_errno(int result)
{
    switch (result) {
    case 4: /* ncclInvalidArgument */
    case 5: /* ncclInvalidUsage */
        return -EINVAL;
    case 6: /* ncclRemoteError */
        return -EREMOTEIO;
    case 7: /* ncclInProgress */
        return -EINPROGRESS;
    default:
        return -EIO;
    }
}

int coord_nccl_unique_id(coord_nccl_t *n, unsigned char out[COORD_NCCL_ID_BYTES], char *err,
                         size_t errlen)
{
    nccl_id_abi id;
    int rc, result;

    if ((rc = nccl_open(n, err, errlen)) < 0)
        return rc;
    memset(&id, 0, sizeof(id));
    if ((result = n->get_unique_id(&id)) != 0) {
        const char *what = n->get_error_string ? n->get_error_string(result) : NULL;
        return dx_errf(err, errlen, nccl_errno(result), "ncclGetUniqueId (%s): %s (NCCL error %d)",
                       n->library, what ? what : "unknown error", result);
    }
    memcpy(out, id.internal, COORD_NCCL_ID_BYTES);
    return 0;
}
