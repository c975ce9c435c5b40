/* gpucheck.h - the harness of duplex-gpucheck shared by its check files
 * (tests/gpu/check_*.c): random data, a check's poisoned host and device
 * buffers, launches timed with events, bitwise and bounded comparisons, and
 * the table of results. One struct gc per run; one struct ck per check,
 * whose helpers turn into no-ops after the first CUDA error so the check
 * reports it once. */
#ifndef DX_GPUCHECK_H
#define DX_GPUCHECK_H

#include <stddef.h>
#include <stdint.h>

#include "worker/cuda/driver.h"

/* the kernel images, from libdxkernels.a (kernels/embed.py) */
#define GC_IMAGE(name)                                                                             \
    extern const unsigned char dx_kernel_##name##_cubin[];                                         \
    extern const size_t dx_kernel_##name##_cubin_len;                                              \
    extern const unsigned char dx_kernel_##name##_ptx[];                                           \
    extern const size_t dx_kernel_##name##_ptx_len
/* gc_module(g, NAME-as-string, its image): loads dx_kernel_NAME_{cubin,ptx} */
#define GC_MODULE(g, name, out)                                                                    \
    gc_module((g), #name, dx_kernel_##name##_cubin, dx_kernel_##name##_cubin_len,                  \
              dx_kernel_##name##_ptx, (out))

#define GC_POISON 0xff
#define GC_BLOCK 256 /* threads per block for ck_launch */
#define GC_MAX_ROWS 256
#define GC_MAX_BUFS 24
#define GC_MAX_MODULES 16

struct gc_row {
    char check[24], shape[64], result[96];
    double ms, gbs; /* < 0: not measured */
};

struct gc {
    wk_cuda_t *c;
    int full;             /* NCCL and cuBLASLt are open too (else: driver only) */
    const char *self;     /* argv[0], for checks that start a peer process */
    const char *cuda_lib; /* --cuda-lib, which the peer opens too (NULL: default) */
    int device, small, iters;
    unsigned sms;
    uint64_t rng;
    double copy_gbs; /* the ceiling, from the largest device copy */
    wk_cuda_module mods[GC_MAX_MODULES];
    int nmods;
    struct gc_row rows[GC_MAX_ROWS];
    int nrows, failed;
};

struct ck {
    struct gc *g;
    size_t bad;    /* elements that differ in the row's compares */
    double maxerr; /* the largest error among them (relative for floats) */
    double bound;  /* > 0: the row's compares are bounded (ck_compare_rel) */
    wk_cuda_ptr d[GC_MAX_BUFS];
    void *h[GC_MAX_BUFS];
    int nd, nh, rc;
    char err[256];
};

/* random numbers (splitmix64): 64 bits; uniform in [lo, hi); n of them */
uint64_t gc_u64(struct gc *g);
float gc_uniform(struct gc *g, float lo, float hi);
void gc_fill(struct gc *g, float *v, size_t n, float lo, float hi);

/* Loads a module from its cubin, or from its PTX (JIT) with a warning;
 * unloaded at exit. 0 or -EIO (reported). */
int gc_module(struct gc *g, const char *name, const unsigned char *cubin, size_t cubin_len,
              const unsigned char *ptx, wk_cuda_module *mod);
/* The functions names[i] of mod into fns[i]. 0 or -EIO (reported). */
int gc_functions(struct gc *g, wk_cuda_module mod, const char *const *names,
                 wk_cuda_function_t *const *fns, int n);

/* A check's buffers: host (poisoned), device (poisoned, or from src). */
void ck_fail(struct ck *k, const char *what);
void *ck_host(struct ck *k, size_t bytes);
wk_cuda_ptr ck_dev(struct ck *k, size_t bytes, const void *src);
void ck_download(struct ck *k, void *dst, wk_cuda_ptr src, size_t bytes);
void ck_done(struct ck *k);

/* Launches fn iters times (1-D grid, GC_BLOCK threads) between two events;
 * ms per launch (-1 after an error). */
double ck_launch(struct ck *k, wk_cuda_function_t fn, unsigned grid, unsigned shmem, void **args,
                 int iters);
/* ck_launch for the time of a kernel that passed (ms itself otherwise). */
double ck_retime(struct ck *k, int ok, wk_cuda_function_t fn, unsigned grid, void **args,
                 double ms);
/* grids: one warp per item / one block per row / one thread per element,
 * capped at a few waves of the device */
unsigned gc_warp_grid(const struct gc *g, size_t items);
unsigned gc_row_grid(const struct gc *g, int rows);
unsigned gc_elem_grid(const struct gc *g, size_t items);

/* Bitwise comparison of n elements of elem (4: float when is_float, else
 * int32; 1: bytes); appends "differ" details to res. 1 when equal. */
int ck_compare(struct ck *k, const char *name, const void *got, const void *want, size_t n,
               size_t elem, int is_float, char *res, size_t reslen);
/* Bounded comparison: err = |got - want| / max(|want|, rms(want)) <= bound. */
int ck_compare_rel(struct ck *k, const char *name, const float *got, const float *want, size_t n,
                   double bound, char *res, size_t reslen);
/* Ends a check: its row, PASS / FAIL with the reason (why, or the CUDA
 * error); ms and gbs are shown for a pass. */
void ck_finish(struct ck *k, const char *check, const char *shape, int ok, const char *why,
               double ms, double gbs);
/* A row that is not a comparison (a benchmark, a skipped check). */
void gc_add_row(struct gc *g, const char *check, const char *shape, const char *result, double ms,
                double gbs);
/* bytes over ms in GB/s (-1 when ms <= 0) */
double gc_gbs(double bytes, double ms);

/* The checks, one file each. */
void gc_check_kernels(struct gc *g);   /* check_kernels.c: routing, dispatch, fp8, elementwise */
void gc_time_copy(struct gc *g);       /* check_kernels.c: the copy ceiling */
void gc_check_attention(struct gc *g); /* check_attention.c: causal attention fwd / bwd */
void gc_check_train_kernels(struct gc *g); /* check_train_kernels.c: embedding, AdamW, ... */
void gc_check_moe(struct gc *g);           /* check_moe.c: router sigmoid, gate backward */
void gc_check_twohop(struct gc *g);        /* check_twohop.c: node-limited two-hop dispatch */
void gc_check_gemm(struct gc *g);      /* check_gemm.c: cuBLASLt as worker/cuda/cublas.c calls it */
void gc_check_nccl(struct gc *g);      /* check_nccl.c: NCCL as worker/cuda/comm/nccl.c calls it */
void gc_check_transport(struct gc *g); /* check_transport.c: the IPC transport, two processes */
/* check_transport.c: the overlap benchmark. The transport runs on 20 + 20
 * channels (sender and receiver, one SM each) of one local ring beside
 * compute(arg, stream, reps) on another stream (it enqueues its work, done
 * reps times, and returns 0 or -errno). reps is calibrated so the compute
 * alone takes as long as the transport alone (the hardest case), starting
 * from calibrate_reps; the row passes when both together take at most 1.15
 * x the longer alone. */
void gc_overlap(struct gc *g, const char *what,
                int (*compute)(void *arg, wk_cuda_stream s, int reps), void *arg,
                int calibrate_reps);
/* check_transport.c: the peer process of gc_check_transport (duplex-gpucheck
 * --transport-peer ...); its exit status */
int gc_transport_peer(int argc, char **argv);

#endif
