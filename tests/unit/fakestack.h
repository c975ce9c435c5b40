/* fakestack.h - the unit tests' access to libfakecuda.so (tests/fake/: the
 * Driver API, NCCL and cuBLASLt on the host), header-only, for Criterion
 * tests: where the library is ($(BUILD)/lib/, from the test binary's
 * $(BUILD)/tests/unit/), a GPU on it with its compute stream and the
 * device buffers a test makes (freed with it), and the comparisons the
 * device-versus-CPU tests share. */
#ifndef DX_TEST_FAKESTACK_H
#define DX_TEST_FAKESTACK_H

#include <criterion/criterion.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "worker/cuda/gpu.h"

#define FAKESTACK_MAX_BUFS 64

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

/* The whole fake stack: driver, NCCL and cuBLASLt. */
static inline wk_cuda_t *fakestack_open(void)
{
    struct wk_cuda_paths paths = {
        .cuda = fakestack_path(), .nccl = fakestack_path(), .cublaslt = fakestack_path()};
    wk_cuda_t *c = NULL;
    char err[512];

    cr_assert_eq(wk_cuda_open(&paths, &c, err, sizeof(err)), 0, "%s", err);
    return c;
}

struct fakestack_gpu {
    wk_cuda_t *c;
    wk_gpu_t *g;
    wk_cuda_stream s; /* the GPU's compute stream */
    wk_cuda_ptr bufs[FAKESTACK_MAX_BUFS];
    int nbufs;
};

/* GPU 0 of the fake stack, in every build: its kernels are host functions
 * found by name, whatever images the build has. */
static inline void fakestack_gpu_open(struct fakestack_gpu *f)
{
    char err[512];

    memset(f, 0, sizeof(*f));
    f->c = fakestack_open(); /* takes a build without nvcc's placeholder images too */
    cr_assert_eq(wk_gpu_create(f->c, 0, 1 << 20, &f->g, err, sizeof(err)), 0, "%s", err);
    f->s = wk_gpu_compute_stream(f->g);
}

static inline void fakestack_gpu_close(struct fakestack_gpu *f)
{
    for (int i = 0; i < f->nbufs; i++)
        wk_cuda_free(f->c, f->bufs[i]);
    wk_gpu_destroy(f->g);
    wk_cuda_close(f->c);
}

/* A device buffer of bytes, from src, or poisoned with 0xff (NaN floats). */
static inline wk_cuda_ptr fakestack_buf(struct fakestack_gpu *f, const void *src, size_t bytes)
{
    wk_cuda_ptr p = 0;

    cr_assert_lt(f->nbufs, FAKESTACK_MAX_BUFS);
    cr_assert_eq(wk_cuda_alloc(f->c, bytes, &p), 0);
    if (src)
        cr_assert_eq(wk_cuda_upload(f->c, p, src, bytes), 0);
    else
        cr_assert_eq(wk_cuda_memset(f->c, p, 0xff, bytes), 0);
    f->bufs[f->nbufs++] = p;
    return p;
}

/* bytes of p after the compute stream's work, in a malloc'd buffer */
static inline void *fakestack_fetch(struct fakestack_gpu *f, wk_cuda_ptr p, size_t bytes)
{
    void *h = malloc(bytes);

    cr_assert_eq(wk_cuda_stream_sync(f->c, f->s), 0, "%s", wk_gpu_error(f->g));
    cr_assert_eq(wk_cuda_download(f->c, h, p, bytes), 0);
    return h;
}

/* n values uniform in [-scale, scale) from seed */
static inline void fakestack_uniform(float *v, size_t n, uint64_t seed, float scale)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = ((float)((double)(seed >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f) * scale;
    }
}

/* |got - want| / max(|want|, rms(want)) <= bound for each of n (the floor at
 * the RMS: a sum that cancels to near 0 carries the error of its terms);
 * frees got. */
static inline void fakestack_expect_close(float *got, const float *want, size_t n, double bound,
                                          const char *what)
{
    double ss = 0.0, rms;

    for (size_t i = 0; i < n; i++)
        ss += (double)want[i] * want[i];
    rms = fmax(sqrt(ss / (double)(n ? n : 1)), 1e-30);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / fmax(fabs((double)want[i]), rms);

        cr_assert(e <= bound && !isnan(got[i]), "%s[%zu] = %.9g, want %.9g (rel %.3g > %.1g)", what,
                  i, (double)got[i], (double)want[i], e, bound);
    }
    free(got);
}

#endif
