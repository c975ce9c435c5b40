/* fs.h - small file-system helpers shared by the daemons and duplexctl. */
#ifndef DX_FS_H
#define DX_FS_H

#include <sys/types.h>

/* Creates dir and every missing parent (like mkdir -p). Returns 0 or -errno. */
int dx_mkdir_p(const char *dir, mode_t mode);

/* Creates the directory that will hold path. Returns 0 or -errno. */
int dx_mkdir_parent(const char *path, mode_t mode);

/* Removes path and, for a directory, everything under it (like rm -r),
 * never following symbolic links. A missing path is no error. Returns 0 or
 * the -errno of the first thing that could not be removed. */
int dx_remove_tree(const char *path);

#endif
