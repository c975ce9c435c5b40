/* fs.h - small file-system helpers shared by the daemons and duplexctl. */
#ifndef DX_FS_H
#define DX_FS_H

#include <sys/types.h>

/* Creates dir and every missing parent (like mkdir -p). Returns 0 or -errno. */
int dx_mkdir_p(const char *dir, mode_t mode);

/* Creates the directory that will hold path. Returns 0 or -errno. */
int dx_mkdir_parent(const char *path, mode_t mode);

#endif
