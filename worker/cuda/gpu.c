/* gpu.c - one GPU for the cuda backend (gpu.h): owns the loaded modules,
 * the resolved kernels, the cuBLASLt handle and the two streams. The kernel
 * images come from libdxkernels.a (kernels/embed.py), linked in when the
 * build had nvcc (DX_HAVE_KERNELS). A build without nvcc offers the driver
 * a placeholder image for each module instead: a real driver refuses it,
 * and the error says the build has no kernels; the fake GPU stack
 * (tests/fake/), whose kernels are host functions found by name, takes
 * it, so the tests on the fake stack run in every build. */
#include "worker/cuda/gpu.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

#define ERR_MAX 512
#define WK_GPU_ATTN_SHARED (64 * 1024) /* attention.cu at dh 128: 52.6 KiB */
#define DESCRIBE_MAX 512

/* the modules, in load order */
#define WK_GPU_MODULES(X)                                                                          \
    X(routing)                                                                                     \
    X(dispatch) X(elementwise) X(attention) X(train) X(convert) X(fp8) X(moe) X(twohop) X(transport)

enum gpu_module {
#define MOD_ENUM(m) MOD_##m,
    WK_GPU_MODULES(MOD_ENUM)
#undef MOD_ENUM
        MOD_COUNT
};

struct image {
    const char *name;
    const unsigned char *cubin, *ptx;
    size_t cubin_len;
};

#ifdef DX_HAVE_KERNELS
#define MOD_EXTERN(m)                                                                              \
    extern const unsigned char dx_kernel_##m##_cubin[];                                            \
    extern const size_t dx_kernel_##m##_cubin_len;                                                 \
    extern const unsigned char dx_kernel_##m##_ptx[];
WK_GPU_MODULES(MOD_EXTERN)
#undef MOD_EXTERN
#define MOD_IMAGE(m) {#m, dx_kernel_##m##_cubin, dx_kernel_##m##_ptx, 0},
static struct image images[MOD_COUNT] = {WK_GPU_MODULES(MOD_IMAGE)};
#undef MOD_IMAGE

static void image_lengths(void)
{
#define MOD_LEN(m) images[MOD_##m].cubin_len = dx_kernel_##m##_cubin_len;
    WK_GPU_MODULES(MOD_LEN)
#undef MOD_LEN
}
#else
/* not PTX (no .version) and no cubin: no real driver loads it */
static const unsigned char no_kernels[] = "// duplex was built without nvcc: no kernels\n";
#define MOD_IMAGE(m) {#m, NULL, no_kernels, 0},
static struct image images[MOD_COUNT] = {WK_GPU_MODULES(MOD_IMAGE)};
#undef MOD_IMAGE

static void image_lengths(void)
{
}
#endif
#define NO_KERNELS_TEXT                                                                            \
    "this duplex was built without nvcc, so without its CUDA kernels; rebuild it where the "       \
    "CUDA toolkit is installed"

static const struct {
    enum gpu_module mod;
    const char *name;
} kernels[WK_K_COUNT] = {
#define KERNEL_ROW(e, m, n) [WK_K_##e] = {MOD_##m, n},
    WK_GPU_KERNELS(KERNEL_ROW)
#undef KERNEL_ROW
};

struct wk_gpu {
    wk_cuda_t *c;
    wk_cuda_module mod[MOD_COUNT];
    wk_cuda_function_t fn[WK_K_COUNT];
    wk_cublas_t *lt;
    wk_cuda_stream compute, comm;
    unsigned sms;
    enum wk_cublas_dtype gemm_dtype;
    struct gpu_lane {
        wk_cuda_stream s;       /* lane 0: compute */
        wk_cuda_ptr scratch[2]; /* bf16 GEMM operands */
        size_t scratch_bytes[2];
    } lane[WK_GPU_LANES];
    struct kept { /* a persistent bf16 copy of a weight */
        wk_cuda_ptr w, copy;
        size_t count;
    } * kept;
    int nkept, capkept;
    char describe[DESCRIBE_MAX];
    char error[ERR_MAX];
};

int wk_gpu_have_kernels(void)
{
#ifdef DX_HAVE_KERNELS
    return 1;
#else
    return 0;
#endif
}

/* Loads module m: its cubin, else its PTX through the JIT. */
static int load_module(wk_gpu_t *g, enum gpu_module m, char *err, size_t errlen)
{
    const struct image *im = &images[m];
    size_t used = strlen(g->describe);
    const char *how = "cubin";

    if (im->cubin_len == 0 || wk_cuda_module_load(g->c, im->cubin, &g->mod[m]) < 0) {
        how = "PTX";
        if (wk_cuda_module_load(g->c, im->ptx, &g->mod[m]) < 0) {
            if (!wk_gpu_have_kernels())
                return dx_errf(err, errlen, -ENOTSUP, NO_KERNELS_TEXT " (kernel module %s: %s)",
                               im->name, wk_cuda_error(g->c));
            return dx_errf(err, errlen, -EIO,
                           "kernel module %s: neither its sm_90 cubin nor its PTX loads: %s",
                           im->name, wk_cuda_error(g->c));
        }
    }
    if (!wk_gpu_have_kernels())
        how = "placeholder"; /* a driver that takes any image: the fake */
    snprintf(g->describe + used, sizeof(g->describe) - used, "%s%s %s", used ? ", " : "", im->name,
             how);
    return 0;
}

int wk_gpu_create(wk_cuda_t *c, int device, size_t workspace_bytes, wk_gpu_t **out, char *err,
                  size_t errlen)
{
    wk_gpu_t *g;
    int major = 0, minor = 0, sms = 0, rc;

    *out = NULL;
    if (!(g = calloc(1, sizeof(*g))))
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    g->c = c;
    image_lengths();
    if ((rc = wk_cuda_context(c, device)) < 0 ||
        (rc = wk_cuda_device_info(c, &major, &minor, &sms)) < 0) {
        rc = dx_errf(err, errlen, rc, "GPU %d: %s", device, wk_cuda_error(c));
        goto fail;
    }
    g->sms = sms > 0 ? (unsigned)sms : 1;
    for (int m = 0; m < MOD_COUNT; m++)
        if ((rc = load_module(g, (enum gpu_module)m, err, errlen)) < 0)
            goto fail;
    for (int k = 0; k < WK_K_COUNT; k++) {
        if ((rc = wk_cuda_function(c, g->mod[kernels[k].mod], kernels[k].name, &g->fn[k])) < 0) {
            if (!wk_gpu_have_kernels()) {
                rc = dx_errf(err, errlen, -ENOTSUP, NO_KERNELS_TEXT ": %s", wk_cuda_error(c));
                goto fail;
            }
            rc = dx_errf(err, errlen, rc, "%s", wk_cuda_error(c));
            goto fail;
        }
    }
    /* attention's backward needs more than the default 48 KiB at dh 128 */
    for (int k = WK_K_ATTN_FWD; k <= WK_K_ATTN_BWD_DKDV; k++) {
        if ((rc = wk_cuda_function_shared(c, g->fn[k], WK_GPU_ATTN_SHARED)) < 0) {
            rc = dx_errf(err, errlen, rc, "%s: %s", kernels[k].name, wk_cuda_error(c));
            goto fail;
        }
    }
    if ((rc = wk_cublas_create(c, workspace_bytes, &g->lt, err, errlen)) < 0)
        goto fail;
    if ((rc = wk_cuda_stream_create(c, &g->compute)) < 0 ||
        (rc = wk_cuda_stream_create(c, &g->comm)) < 0) {
        rc = dx_errf(err, errlen, rc, "%s", wk_cuda_error(c));
        goto fail;
    }
    g->lane[0].s = g->compute;
    for (int i = 1; i < WK_GPU_LANES; i++) {
        if ((rc = wk_cuda_stream_create(c, &g->lane[i].s)) < 0) {
            rc = dx_errf(err, errlen, rc, "%s", wk_cuda_error(c));
            goto fail;
        }
        if ((rc = wk_cublas_add_stream(g->lt, g->lane[i].s)) < 0) {
            rc = dx_errf(err, errlen, rc, "%s", wk_cublas_error(g->lt));
            goto fail;
        }
    }
    *out = g;
    return 0;
fail:
    wk_gpu_destroy(g);
    return rc;
}

void wk_gpu_destroy(wk_gpu_t *g)
{
    if (!g)
        return;
    if (g->compute || g->comm) {
        wk_cuda_sync(g->c);
        wk_cuda_stream_destroy(g->c, g->compute);
        wk_cuda_stream_destroy(g->c, g->comm);
    }
    for (int i = 1; i < WK_GPU_LANES; i++)
        wk_cuda_stream_destroy(g->c, g->lane[i].s);
    for (int i = 0; i < g->nkept; i++)
        wk_cuda_free(g->c, g->kept[i].copy);
    free(g->kept);
    wk_cublas_destroy(g->lt);
    for (int i = 0; i < WK_GPU_LANES; i++) {
        wk_cuda_free(g->c, g->lane[i].scratch[0]);
        wk_cuda_free(g->c, g->lane[i].scratch[1]);
    }
    for (int m = 0; m < MOD_COUNT; m++)
        wk_cuda_module_unload(g->c, g->mod[m]);
    free(g);
}

wk_cuda_t *wk_gpu_cuda(const wk_gpu_t *g)
{
    return g->c;
}

wk_cublas_t *wk_gpu_cublas(const wk_gpu_t *g)
{
    return g->lt;
}

wk_cuda_stream wk_gpu_compute_stream(const wk_gpu_t *g)
{
    return g->compute;
}

wk_cuda_stream wk_gpu_lane_stream(const wk_gpu_t *g, int lane)
{
    return lane >= 0 && lane < WK_GPU_LANES ? g->lane[lane].s : g->compute;
}

wk_cuda_stream wk_gpu_comm_stream(const wk_gpu_t *g)
{
    return g->comm;
}

unsigned wk_gpu_sms(const wk_gpu_t *g)
{
    return g->sms;
}

int wk_gpu_memory_bytes(wk_gpu_t *g, uint64_t *bytes)
{
    size_t total = 0;
    int rc = wk_cuda_device_memory(g->c, &total);

    *bytes = rc < 0 ? 0 : (uint64_t)total;
    if (rc < 0)
        return wk_gpu_fail(g, rc, "%s", wk_cuda_error(g->c));
    return 0;
}

const char *wk_gpu_kernel_name(enum wk_gpu_kernel k)
{
    return k >= 0 && k < WK_K_COUNT ? kernels[k].name : "?";
}

const char *wk_gpu_describe(const wk_gpu_t *g)
{
    return g->describe;
}

int wk_gpu_launch(wk_gpu_t *g, enum wk_gpu_kernel k, wk_cuda_stream s, unsigned grid,
                  unsigned block, unsigned shmem, void **args)
{
    const unsigned gr[3] = {grid ? grid : 1, 1, 1}, bl[3] = {block ? block : 1, 1, 1};

    if (k < 0 || k >= WK_K_COUNT) {
        snprintf(g->error, sizeof(g->error), "kernel %d: no such kernel", (int)k);
        return -EINVAL;
    }
    if (wk_cuda_launch_on(g->c, s, g->fn[k], gr, bl, shmem, args) < 0) {
        snprintf(g->error, sizeof(g->error), "%s: %s", kernels[k].name, wk_cuda_error(g->c));
        return -EIO;
    }
    return 0;
}

const char *wk_gpu_error(const wk_gpu_t *g)
{
    return g->error;
}

wk_cuda_function_t wk_gpu_function(const wk_gpu_t *g, enum wk_gpu_kernel k)
{
    return k >= 0 && k < WK_K_COUNT ? g->fn[k] : NULL;
}

int wk_gpu_fail(wk_gpu_t *g, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(g->error, sizeof(g->error), fmt, ap);
    va_end(ap);
    return rc;
}

int wk_gpu_gemm_result(wk_gpu_t *g, int rc)
{
    if (rc < 0)
        snprintf(g->error, sizeof(g->error), "%s", wk_cublas_error(g->lt));
    return rc < 0 ? rc : 0;
}

/* --- the model's GEMMs in the GPU's precision ---------------------------------- */

void wk_gpu_set_gemm_dtype(wk_gpu_t *g, enum wk_cublas_dtype dtype)
{
    g->gemm_dtype = dtype;
}

enum wk_cublas_dtype wk_gpu_gemm_dtype(const wk_gpu_t *g)
{
    return g->gemm_dtype;
}

/* The kept tensor [count] at w, or NULL. */
static struct kept *kept_of(const wk_gpu_t *g, wk_cuda_ptr w)
{
    for (int i = 0; i < g->nkept; i++)
        if (g->kept[i].w == w)
            return &g->kept[i];
    return NULL;
}

int wk_gpu_bf16_keep(wk_gpu_t *g, wk_cuda_ptr w, size_t count)
{
    struct kept *k;
    int rc;

    if (kept_of(g, w))
        return 0;
    if (g->nkept == g->capkept) {
        int cap = g->capkept ? 2 * g->capkept : 32;
        struct kept *more = realloc(g->kept, (size_t)cap * sizeof(*more));

        if (!more)
            return wk_gpu_fail(g, -ENOMEM, "out of memory");
        g->kept = more;
        g->capkept = cap;
    }
    k = &g->kept[g->nkept];
    *k = (struct kept){w, 0, count};
    if ((rc = wk_cuda_alloc(g->c, count * 2 + 16, &k->copy)) < 0)
        return wk_gpu_fail(g, rc, "a bf16 copy of %zu weights: %s", count, wk_cuda_error(g->c));
    g->nkept++;
    return 0;
}

int wk_gpu_bf16_refresh(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr w)
{
    const struct kept *k = kept_of(g, w);
    long long count;
    unsigned blocks;
    wk_cuda_ptr src = w, dst;
    void *args[] = {&src, &dst, &count};

    if (!k)
        return wk_gpu_fail(g, -ENOENT, "no bf16 copy is kept of this tensor");
    count = (long long)k->count;
    dst = k->copy;
    blocks = (unsigned)((count + 255) / 256);
    return wk_gpu_launch(g, WK_K_F32_TO_BF16, s, blocks < g->sms * 16 ? blocks : g->sms * 16, 256,
                         0, args);
}

void wk_gpu_bf16_forget(wk_gpu_t *g, wk_cuda_ptr w)
{
    struct kept *k = kept_of(g, w);

    if (!k)
        return;
    wk_cuda_free(g->c, k->copy);
    *k = g->kept[--g->nkept];
}

/* The kept copy of [src, src + count) when a kept tensor holds it whole. */
static int kept_copy(const wk_gpu_t *g, wk_cuda_ptr src, long long count, wk_cuda_ptr *out)
{
    for (int i = 0; i < g->nkept; i++) {
        const struct kept *k = &g->kept[i];

        if (src >= k->w && src + (size_t)count * 4 <= k->w + k->count * 4) {
            *out = k->copy + (src - k->w) / 2;
            return 1;
        }
    }
    return 0;
}

/* src [count] fp32 as bf16 in scratch buffer i of stream s's lane (the
 * first lane's for other streams), grown when too small: after the lane's
 * work that may still read the old one */
static int to_bf16(wk_gpu_t *g, wk_cuda_stream s, int i, wk_cuda_ptr src, long long count,
                   wk_cuda_ptr *out)
{
    struct gpu_lane *l = &g->lane[0];
    size_t bytes = (size_t)count * 2;
    unsigned blocks = (unsigned)((count + 255) / 256);
    void *args[] = {&src, &l->scratch[i], &count};
    int rc;

    if (kept_copy(g, src, count, out))
        return 0; /* a weight's persistent copy */
    for (int k = 1; k < WK_GPU_LANES; k++)
        if (g->lane[k].s == s)
            l = &g->lane[k];
    if (bytes > l->scratch_bytes[i]) {
        if ((rc = wk_cuda_stream_sync(g->c, l->s)) < 0 ||
            (l->s != s && (rc = wk_cuda_stream_sync(g->c, s)) < 0)) {
            snprintf(g->error, sizeof(g->error), "%s", wk_cuda_error(g->c));
            return rc;
        }
        wk_cuda_free(g->c, l->scratch[i]);
        l->scratch[i] = 0;
        l->scratch_bytes[i] = 0;
        if ((rc = wk_cuda_alloc(g->c, bytes, &l->scratch[i])) < 0) {
            snprintf(g->error, sizeof(g->error), "%s", wk_cuda_error(g->c));
            return rc;
        }
        l->scratch_bytes[i] = bytes;
    }
    args[1] = &l->scratch[i];
    if ((rc = wk_gpu_launch(g, WK_K_F32_TO_BF16, s, blocks < g->sms * 16 ? blocks : g->sms * 16,
                            256, 0, args)) < 0)
        return rc;
    *out = l->scratch[i];
    return 0;
}

int wk_gpu_xwt(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr x, wk_cuda_ptr w, wk_cuda_ptr y, int n,
               int in, int out, float beta)
{
    int rc;

    if (g->gemm_dtype == WK_CUBLAS_BF16 &&
        ((rc = to_bf16(g, s, 0, x, (long long)n * in, &x)) < 0 ||
         (rc = to_bf16(g, s, 1, w, (long long)out * in, &w)) < 0))
        return rc;
    return wk_gpu_gemm_result(g,
                              wk_cublas_xwt(g->lt, s, g->gemm_dtype, x, w, y, n, in, out, beta, 0));
}

int wk_gpu_dyw(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr dy, wk_cuda_ptr w, wk_cuda_ptr dx, int n,
               int in, int out, float beta)
{
    int rc;

    if (g->gemm_dtype == WK_CUBLAS_BF16 &&
        ((rc = to_bf16(g, s, 0, dy, (long long)n * out, &dy)) < 0 ||
         (rc = to_bf16(g, s, 1, w, (long long)out * in, &w)) < 0))
        return rc;
    return wk_gpu_gemm_result(
        g, wk_cublas_dyw(g->lt, s, g->gemm_dtype, dy, w, dx, n, in, out, beta, 0));
}

int wk_gpu_dytx(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr dy, wk_cuda_ptr x, wk_cuda_ptr dw, int n,
                int in, int out)
{
    int rc;

    if (g->gemm_dtype == WK_CUBLAS_BF16 &&
        ((rc = to_bf16(g, s, 0, dy, (long long)n * out, &dy)) < 0 ||
         (rc = to_bf16(g, s, 1, x, (long long)n * in, &x)) < 0))
        return rc;
    return wk_gpu_gemm_result(g, wk_cublas_dytx(g->lt, s, g->gemm_dtype, dy, x, dw, n, in, out, 0));
}
