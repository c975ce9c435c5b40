/* fs.c - small file-system helpers (see fs.h). */
#define _XOPEN_SOURCE 700 /* nftw */
#include "common/fs.h"

#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int dx_mkdir_p(const char *dir, mode_t mode)
{
    char buf[PATH_MAX];
    size_t len = strlen(dir);

    if (len == 0)
        return 0;
    if (len >= sizeof(buf))
        return -ENAMETOOLONG;
    memcpy(buf, dir, len + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, mode) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

int dx_mkdir_parent(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    char *slash;

    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
        return -ENAMETOOLONG;
    slash = strrchr(buf, '/');
    if (!slash || slash == buf)
        return 0;
    *slash = '\0';
    return dx_mkdir_p(buf, mode);
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    return (flag == FTW_DP ? rmdir(path) : unlink(path)) < 0 ? -errno : 0;
}

int dx_remove_tree(const char *path)
{
    struct stat st;
    int rc;

    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : -errno;
    rc = nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS);
    return rc < 0 ? -errno : rc;
}
