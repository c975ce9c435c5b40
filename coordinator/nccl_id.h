/* nccl_id.h - the NCCL unique ids duplexd hands to cuda jobs.
 *
 * Every attempt of a job on the cuda backend gets a fresh id in each rank's
 * Assignment (nccl_id); the ranks build one communicator from it. duplexd
 * makes the id itself with ncclGetUniqueId, which needs no GPU: it starts
 * NCCL's bootstrap root (a thread and a listening socket) in duplexd and
 * returns 128 bytes holding its address, which the workers must reach
 * (NCCL_SOCKET_IFNAME picks the interface). NCCL is opened with dlopen on
 * the first id, so duplexd neither links nor needs it for other backends.
 */
#ifndef COORD_NCCL_ID_H
#define COORD_NCCL_ID_H

#include <stddef.h>

#define COORD_NCCL_ID_BYTES 128
#define COORD_NCCL_LIB_DEFAULT "libnccl.so.2"
/* the environment variable that names the library when none is given */
#define COORD_NCCL_LIB_ENV "DUPLEX_NCCL_LIB"

typedef struct coord_nccl coord_nccl_t;

/* library: a path or a name for the dynamic loader; NULL takes
 * $DUPLEX_NCCL_LIB when set and not empty, else COORD_NCCL_LIB_DEFAULT.
 * Opens nothing yet. 0 or -ENOMEM. */
int coord_nccl_create(const char *library, coord_nccl_t **out);
/* dlcloses the library; NULL is ignored */
void coord_nccl_destroy(coord_nccl_t *n);

/* A new unique id (opening the library on first use). 0, or -ENOENT when
 * the library or its ncclGetUniqueId cannot be loaded (err names the
 * library and dlerror()), or when NCCL fails -EINVAL (invalid argument or
 * usage), -EREMOTEIO (remote error), -EINPROGRESS, else -EIO (err has
 * NCCL's error string and number). A library that failed to open is tried
 * again on the next call. */
int coord_nccl_unique_id(coord_nccl_t *n, unsigned char out[COORD_NCCL_ID_BYTES], char *err,
                         size_t errlen);

#endif
