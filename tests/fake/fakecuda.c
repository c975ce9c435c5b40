/* fakecuda.c - libfakecuda.so, a stand-in for the NVIDIA driver
 * (libcuda.so.1) on machines without a GPU, so the tests can run the code
 * that drives GPUs (worker/cuda/driver.c and what is built on it) for real.
 *
 * It serves, through cuGetProcAddress, the Driver API entry points that
 * worker/cuda/driver.c resolves, with CUDA's semantics on host memory:
 *  - FAKECUDA_DEVICES devices (default 1: a local cluster's workers each
 *    take their --gpu), all "duplex fake GPU", compute capability 9.0, 132
 *    SMs, sharing the host's memory;
 *  - each device reports FAKECUDA_MEMORY_BYTES of memory (default 80 GiB)
 *    and a process's allocations fail with CUDA_ERROR_OUT_OF_MEMORY past
 *    it, as a full GPU's do;
 *  - device memory is host memory: each allocation a memfd mapped shared,
 *    so CUDA IPC works between processes (a handle names the owner's pid and
 *    fd; the importer maps /proc/PID/fd/FD);
 *  - streams are threads that run their queue in order (launches, copies,
 *    event records, waits for events), so work on two streams really runs
 *    concurrently and only events order it, as on a GPU; the default
 *    stream is one more such queue, and the synchronous copies wait for it;
 *  - FAKECUDA_FAULT_AFTER=N makes the N-th launch fault, as a kernel's
 *    illegal access would on a GPU (the context is lost from then on);
 *  - a kernel is a host function registered under the kernel's name
 *    (tests/fake/fake_kernels.c: the CPU references of kernels/, and
 *    test-only kernels); cuModuleGetFunction of any other name fails with
 *    CUDA_ERROR_NOT_FOUND. Module images are accepted as they are (a build
 *    without nvcc offers placeholders), unless FAKECUDA_STRICT_IMAGES is
 *    set: then only a cubin or PTX text, as a real driver.
 * Errors use CUDA's codes and strings. Not thread-safe beyond what the
 * tests need: one context, calls from any thread. */
#define _GNU_SOURCE
#include "tests/fake/fakecuda.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};

#define FAKE_SMS 132
#define FAKE_MAX_ARGS FAKECUDA_MAX_ARGS
#define FAKE_IPC_MAGIC 0x6370696b61667864ull /* "dxfakipc" */

/* --- allocations ------------------------------------------------------------ */

struct alloc {
    CUdeviceptr base;
    size_t size;
    int fd;
    int imported; /* mapped from another process (cuIpcOpenMemHandle) */
    struct alloc *next;
};

struct ipc_handle { /* the 64 bytes of a CUipcMemHandle */
    uint64_t magic;
    int32_t pid, fd;
    uint64_t size;
    unsigned char pad[40];
};

/* --- streams and events ----------------------------------------------------- */

/* One cuEventRecord: a wait made after it (and before the next record of
 * the event) waits for this record itself, as CUDA's does, even when a
 * later record on another stream completes first. */
struct record {
    int done, refs; /* refs: the record task, the event's last, each wait */
};

struct event {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct record *last; /* the latest record, or NULL */
    int completed;       /* some record completed */
    struct timespec at;  /* when the last record completed */
};

/* under ev->lock */
static void record_unref(struct record *r)
{
    if (r && --r->refs == 0)
        free(r);
}

enum task_kind { TASK_LAUNCH, TASK_COPY, TASK_RECORD, TASK_WAIT, TASK_HOST };

struct task {
    enum task_kind kind;
    const struct fake_kernel *kernel;
    struct fake_grid grid;
    unsigned char *argbuf; /* the launch's argument values, copied */
    void *args[FAKE_MAX_ARGS];
    void *dst;
    const void *src;
    size_t bytes;
    struct event *ev;
    struct record *rec;     /* TASK_RECORD's, or what TASK_WAIT waits for (NULL: nothing) */
    int fault;              /* TASK_LAUNCH: fault instead of running (FAKECUDA_FAULT_AFTER) */
    int (*host)(void *arg); /* TASK_HOST: fake_stream_host's work */
    void *host_arg;
    struct task *next;
};

struct stream {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct task *head, *tail;
    int busy, stop;
    struct stream *next; /* every stream, for cuCtxSynchronize */
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_initialised, g_ctx_retained;
static struct alloc *g_allocs;
static size_t g_allocated; /* bytes of this process's cuMemAlloc allocations */
static struct stream *g_streams, *g_default;
static int g_launch_failed; /* a kernel returned an error: sticky, like a fault */

static double ts_ms(const struct timespec *t)
{
    return (double)t->tv_sec * 1e3 + (double)t->tv_nsec / 1e6;
}

static void run_task(struct task *t)
{
    switch (t->kind) {
    case TASK_LAUNCH:
        if (t->fault || t->kernel->run(&t->grid, t->args) != 0)
            __atomic_store_n(&g_launch_failed, 1, __ATOMIC_SEQ_CST);
        break;
    case TASK_COPY:
        memmove(t->dst, t->src, t->bytes);
        break;
    case TASK_RECORD:
        pthread_mutex_lock(&t->ev->lock);
        clock_gettime(CLOCK_MONOTONIC, &t->ev->at);
        t->rec->done = 1;
        t->ev->completed = 1;
        record_unref(t->rec);
        pthread_cond_broadcast(&t->ev->cond);
        pthread_mutex_unlock(&t->ev->lock);
        break;
    case TASK_HOST:
        if (t->host(t->host_arg) != 0)
            __atomic_store_n(&g_launch_failed, 1, __ATOMIC_SEQ_CST);
        break;
    case TASK_WAIT:
        pthread_mutex_lock(&t->ev->lock);
        while (t->rec && !t->rec->done)
            pthread_cond_wait(&t->ev->cond, &t->ev->lock);
        record_unref(t->rec);
        pthread_mutex_unlock(&t->ev->lock);
        break;
    }
}

static void *stream_main(void *arg)
{
    struct stream *s = arg;

    pthread_mutex_lock(&s->lock);
    for (;;) {
        struct task *t;

        while (!s->head && !s->stop)
            pthread_cond_wait(&s->cond, &s->lock);
        if (!s->head)
            break;
        t = s->head;
        s->busy = 1;
        pthread_mutex_unlock(&s->lock);
        run_task(t);
        free(t->argbuf);
        pthread_mutex_lock(&s->lock);
        s->head = t->next;
        if (!s->head)
            s->tail = NULL;
        s->busy = 0;
        free(t);
        pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static struct stream *stream_new(void)
{
    struct stream *s = calloc(1, sizeof(*s));

    if (!s)
        return NULL;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    if (pthread_create(&s->thread, NULL, stream_main, s) != 0) {
        free(s);
        return NULL;
    }
    pthread_mutex_lock(&g_lock);
    s->next = g_streams;
    g_streams = s;
    pthread_mutex_unlock(&g_lock);
    return s;
}

/* NULL is the default stream, made on first use. */
static struct stream *stream_of(void *handle)
{
    if (handle)
        return handle;
    pthread_mutex_lock(&g_lock);
    if (!g_default) {
        pthread_mutex_unlock(&g_lock);
        struct stream *s = stream_new();
        pthread_mutex_lock(&g_lock);
        if (!g_default)
            g_default = s; /* a second one, from a race, just stays idle */
    }
    pthread_mutex_unlock(&g_lock);
    return g_default;
}

static void stream_push(struct stream *s, struct task *t)
{
    pthread_mutex_lock(&s->lock);
    if (s->tail)
        s->tail->next = t;
    else
        s->head = t;
    s->tail = t;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

static void stream_drain(struct stream *s)
{
    pthread_mutex_lock(&s->lock);
    while (s->head || s->busy)
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

static void drain_all(void)
{
    pthread_mutex_lock(&g_lock);
    struct stream *list = g_streams;
    pthread_mutex_unlock(&g_lock);
    for (struct stream *s = list; s; s = s->next)
        stream_drain(s);
}

/* The synchronous calls: after the default stream's work, as CUDA orders them. */
static void drain_default(void)
{
    pthread_mutex_lock(&g_lock);
    struct stream *s = g_default;
    pthread_mutex_unlock(&g_lock);
    if (s)
        stream_drain(s);
}

static CUresult sticky(void)
{
    return __atomic_load_n(&g_launch_failed, __ATOMIC_SEQ_CST) ? CUDA_ERROR_LAUNCH_FAILED
                                                               : CUDA_SUCCESS;
}

/* --- the entry points -------------------------------------------------------- */

static int device_count(void)
{
    const char *v = getenv("FAKECUDA_DEVICES");
    int n = v ? atoi(v) : 1;

    return n >= 1 && n <= 1024 ? n : 1;
}

static CUresult fk_init(unsigned flags)
{
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    g_initialised = 1;
    return CUDA_SUCCESS;
}

static CUresult fk_driver_get_version(int *v)
{
    *v = 13000;
    return CUDA_SUCCESS;
}

static CUresult fk_device_get_count(int *n)
{
    if (!g_initialised)
        return CUDA_ERROR_NOT_INITIALIZED;
    *n = device_count();
    return CUDA_SUCCESS;
}

static CUresult fk_device_get(int *dev, int ordinal)
{
    if (ordinal < 0 || ordinal >= device_count())
        return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

/* FAKECUDA_MEMORY_BYTES, else FAKECUDA_MEMORY_DEFAULT */
static size_t device_memory(void)
{
    const char *v = getenv(FAKECUDA_MEMORY_ENV);
    char *end = NULL;
    unsigned long long n = v ? strtoull(v, &end, 10) : 0;

    return v && end != v && !*end && n > 0 ? (size_t)n : (size_t)FAKECUDA_MEMORY_DEFAULT;
}

static CUresult fk_device_total_mem(size_t *bytes, int dev)
{
    if (!g_initialised)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!bytes)
        return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= device_count())
        return CUDA_ERROR_INVALID_DEVICE;
    *bytes = device_memory();
    return CUDA_SUCCESS;
}

static CUresult fk_device_get_name(char *name, int len, int dev)
{
    if (dev < 0 || dev >= device_count() || len < 1)
        return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", FAKECUDA_DEVICE_NAME);
    return CUDA_SUCCESS;
}

static CUresult fk_get_error_string(CUresult rc, const char **s)
{
    switch (rc) {
    case CUDA_SUCCESS:
        *s = "no error";
        break;
    case CUDA_ERROR_INVALID_VALUE:
        *s = "invalid argument";
        break;
    case CUDA_ERROR_OUT_OF_MEMORY:
        *s = "out of memory";
        break;
    case CUDA_ERROR_NOT_INITIALIZED:
        *s = "initialization error";
        break;
    case CUDA_ERROR_INVALID_DEVICE:
        *s = "invalid device ordinal";
        break;
    case CUDA_ERROR_INVALID_IMAGE:
        *s = "device kernel image is invalid";
        break;
    case CUDA_ERROR_INVALID_CONTEXT:
        *s = "invalid device context";
        break;
    case CUDA_ERROR_INVALID_HANDLE:
        *s = "invalid resource handle";
        break;
    case CUDA_ERROR_NOT_FOUND:
        *s = "named symbol not found";
        break;
    case CUDA_ERROR_NOT_READY:
        *s = "device not ready";
        break;
    case CUDA_ERROR_LAUNCH_FAILED:
        *s = "unspecified launch failure";
        break;
    default:
        *s = NULL;
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

static CUresult fk_device_get_attribute(int *v, int attr, int dev)
{
    if (dev < 0 || dev >= device_count())
        return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
    case 16: /* multiprocessor count */
        *v = FAKE_SMS;
        return CUDA_SUCCESS;
    case 75: /* compute capability */
        *v = 9;
        return CUDA_SUCCESS;
    case 76:
        *v = 0;
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
}

static int g_device = -1;

int fake_current_device(void)
{
    return g_device;
}

static CUresult fk_primary_ctx_retain(void **ctx, int dev)
{
    if (dev < 0 || dev >= device_count())
        return CUDA_ERROR_INVALID_DEVICE;
    g_device = dev;
    g_ctx_retained++;
    *ctx = &g_ctx_retained;
    return CUDA_SUCCESS;
}

static CUresult fk_primary_ctx_release(int dev)
{
    if (dev < 0 || dev >= device_count() || g_ctx_retained == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    g_ctx_retained--;
    return CUDA_SUCCESS;
}

static CUresult fk_ctx_set_current(void *ctx)
{
    return ctx == &g_ctx_retained ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

static CUresult fk_ctx_synchronize(void)
{
    drain_all();
    return sticky();
}

struct module {
    int unused;
};

static CUresult fk_module_load_data(void **mod, const void *image)
{
    if (!image)
        return CUDA_ERROR_INVALID_VALUE;
    if (getenv(FAKECUDA_STRICT_IMAGES_ENV) && memcmp(image, "\177ELF", 4) != 0 &&
        !strstr(image, ".version"))
        return CUDA_ERROR_INVALID_IMAGE;
    *mod = calloc(1, sizeof(struct module));
    return *mod ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult fk_module_unload(void *mod)
{
    free(mod);
    return CUDA_SUCCESS;
}

static CUresult fk_module_get_function(const struct fake_kernel **fn, void *mod, const char *name)
{
    if (!mod || !name)
        return CUDA_ERROR_INVALID_VALUE;
    *fn = fake_kernel_find(name);
    return *fn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

static struct alloc *find_alloc(CUdeviceptr p, int unlink_it)
{
    struct alloc **pp, *a = NULL;

    pthread_mutex_lock(&g_lock);
    for (pp = &g_allocs; *pp; pp = &(*pp)->next) {
        if ((*pp)->base == p) {
            a = *pp;
            if (unlink_it)
                *pp = a->next;
            break;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return a;
}

static CUresult map_alloc(int fd, size_t size, int imported, CUdeviceptr *p)
{
    struct alloc *a = calloc(1, sizeof(*a));
    void *mem;

    if (!a)
        return CUDA_ERROR_OUT_OF_MEMORY;
    mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        free(a);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    a->base = (CUdeviceptr)(uintptr_t)mem;
    a->size = size;
    a->fd = fd;
    a->imported = imported;
    pthread_mutex_lock(&g_lock);
    a->next = g_allocs;
    g_allocs = a;
    pthread_mutex_unlock(&g_lock);
    *p = a->base;
    return CUDA_SUCCESS;
}

static CUresult fk_mem_alloc(CUdeviceptr *p, size_t bytes)
{
    int fd;
    size_t total;
    CUresult rc;

    if (bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    /* the device's memory: reserved first, given back on failure */
    pthread_mutex_lock(&g_lock);
    total = device_memory();
    rc = g_allocated > total || bytes > total - g_allocated ? CUDA_ERROR_OUT_OF_MEMORY
                                                            : CUDA_SUCCESS;
    if (rc == CUDA_SUCCESS)
        g_allocated += bytes;
    pthread_mutex_unlock(&g_lock);
    if (rc != CUDA_SUCCESS)
        return rc;
    if ((fd = memfd_create("fakecuda", MFD_CLOEXEC)) < 0) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else if (ftruncate(fd, (off_t)bytes) < 0) {
        close(fd);
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else if ((rc = map_alloc(fd, bytes, 0, p)) != CUDA_SUCCESS) {
        close(fd);
    }
    if (rc != CUDA_SUCCESS) {
        pthread_mutex_lock(&g_lock);
        g_allocated -= bytes;
        pthread_mutex_unlock(&g_lock);
    }
    return rc;
}

static void unmap_alloc(struct alloc *a)
{
    if (!a->imported) {
        pthread_mutex_lock(&g_lock);
        g_allocated -= a->size;
        pthread_mutex_unlock(&g_lock);
    }
    munmap((void *)(uintptr_t)a->base, a->size);
    if (a->fd >= 0)
        close(a->fd);
    free(a);
}

/* Frees an allocation (imported: from cuIpcOpenMemHandle, else from
 * cuMemAlloc) after the work queued so far, which may use it. */
static CUresult release(CUdeviceptr p, int imported)
{
    struct alloc *a = find_alloc(p, 0);

    if (!a || a->imported != imported)
        return CUDA_ERROR_INVALID_VALUE;
    drain_all();
    unmap_alloc(find_alloc(p, 1));
    return CUDA_SUCCESS;
}

static CUresult fk_mem_free(CUdeviceptr p)
{
    return release(p, 0);
}

static CUresult fk_memcpy(CUdeviceptr dst, CUdeviceptr src, size_t bytes)
{
    drain_default();
    memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, bytes);
    return sticky();
}

static CUresult fk_memcpy_htod(CUdeviceptr dst, const void *src, size_t bytes)
{
    return fk_memcpy(dst, (CUdeviceptr)(uintptr_t)src, bytes);
}

static CUresult fk_memcpy_dtoh(void *dst, CUdeviceptr src, size_t bytes)
{
    return fk_memcpy((CUdeviceptr)(uintptr_t)dst, src, bytes);
}

static CUresult fk_memset_d8(CUdeviceptr dst, unsigned char v, size_t n)
{
    drain_default();
    memset((void *)(uintptr_t)dst, v, n);
    return sticky();
}

/* FAKECUDA_FAULT_AFTER=N: the N-th launch of the process faults (an
 * illegal address on a GPU), for tests of what follows a kernel fault. */
static int fault_now(void)
{
    static long launches;
    const char *v = getenv("FAKECUDA_FAULT_AFTER");
    long n = v ? atol(v) : 0;

    return n > 0 && __atomic_add_fetch(&launches, 1, __ATOMIC_SEQ_CST) == n;
}

static CUresult fk_launch_kernel(const struct fake_kernel *k, unsigned gx, unsigned gy, unsigned gz,
                                 unsigned bx, unsigned by, unsigned bz, unsigned shmem,
                                 void *stream, void **params, void **extra)
{
    struct task *t;
    size_t total = 0, off = 0;

    if (!k || extra || (k->nargs > 0 && !params) || k->nargs > FAKE_MAX_ARGS || !gx || !gy || !gz ||
        !bx || !by || !bz || (uint64_t)bx * by * bz > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    if (sticky())
        return CUDA_ERROR_LAUNCH_FAILED;
    for (int i = 0; i < k->nargs; i++)
        total += (k->arg_size[i] + 7) & ~(size_t)7;
    if (!(t = calloc(1, sizeof(*t))) || !(t->argbuf = malloc(total ? total : 1))) {
        free(t);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    for (int i = 0; i < k->nargs; i++) { /* the values now, as the driver takes them */
        memcpy(t->argbuf + off, params[i], k->arg_size[i]);
        t->args[i] = t->argbuf + off;
        off += (k->arg_size[i] + 7) & ~(size_t)7;
    }
    t->kind = TASK_LAUNCH;
    t->kernel = k;
    t->fault = fault_now();
    t->grid = (struct fake_grid){{gx, gy, gz}, {bx, by, bz}, shmem};
    stream_push(stream_of(stream), t);
    return CUDA_SUCCESS;
}

static CUresult fk_event_create(struct event **ev, unsigned flags)
{
    (void)flags;
    if (!(*ev = calloc(1, sizeof(**ev))))
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_init(&(*ev)->lock, NULL);
    pthread_cond_init(&(*ev)->cond, NULL);
    return CUDA_SUCCESS;
}

static CUresult fk_event_destroy(struct event *ev)
{
    if (!ev)
        return CUDA_ERROR_INVALID_HANDLE;
    drain_all(); /* a queued record or wait may still name it */
    record_unref(ev->last);
    pthread_mutex_destroy(&ev->lock);
    pthread_cond_destroy(&ev->cond);
    free(ev);
    return CUDA_SUCCESS;
}

static CUresult fk_event_record(struct event *ev, void *stream)
{
    struct task *t;

    if (!ev)
        return CUDA_ERROR_INVALID_HANDLE;
    if (!(t = calloc(1, sizeof(*t))) || !(t->rec = calloc(1, sizeof(*t->rec)))) {
        free(t);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    t->rec->refs = 2; /* the task and the event */
    pthread_mutex_lock(&ev->lock);
    record_unref(ev->last);
    ev->last = t->rec;
    pthread_mutex_unlock(&ev->lock);
    t->kind = TASK_RECORD;
    t->ev = ev;
    stream_push(stream_of(stream), t);
    return CUDA_SUCCESS;
}

static CUresult fk_event_synchronize(struct event *ev)
{
    if (!ev)
        return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&ev->lock);
    while (ev->last && !ev->last->done)
        pthread_cond_wait(&ev->cond, &ev->lock);
    pthread_mutex_unlock(&ev->lock);
    return sticky();
}

static CUresult fk_event_elapsed(float *ms, struct event *a, struct event *b)
{
    CUresult rc = CUDA_SUCCESS;

    if (!a || !b)
        return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&a->lock);
    pthread_mutex_lock(&b->lock);
    if (!a->completed || !b->completed)
        rc = CUDA_ERROR_INVALID_HANDLE; /* never recorded */
    else if (!a->last->done || !b->last->done)
        rc = CUDA_ERROR_NOT_READY;
    else
        *ms = (float)(ts_ms(&b->at) - ts_ms(&a->at));
    pthread_mutex_unlock(&b->lock);
    pthread_mutex_unlock(&a->lock);
    return rc;
}

static CUresult fk_stream_create(struct stream **s, unsigned flags)
{
    (void)flags;
    *s = stream_new();
    return *s ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult fk_stream_destroy(struct stream *s)
{
    struct stream **pp;

    if (!s)
        return CUDA_ERROR_INVALID_HANDLE;
    stream_drain(s);
    pthread_mutex_lock(&g_lock);
    for (pp = &g_streams; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    free(s);
    return CUDA_SUCCESS;
}

static CUresult fk_stream_synchronize(struct stream *s)
{
    stream_drain(stream_of(s));
    return sticky();
}

static CUresult fk_stream_wait_event(struct stream *s, struct event *ev, unsigned flags)
{
    struct task *t;

    if (!ev || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!(t = calloc(1, sizeof(*t))))
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&ev->lock);
    t->rec = ev->last; /* the last record made before this call */
    if (t->rec)
        t->rec->refs++;
    pthread_mutex_unlock(&ev->lock);
    t->kind = TASK_WAIT;
    t->ev = ev;
    stream_push(stream_of(s), t);
    return CUDA_SUCCESS;
}

static CUresult fk_memcpy_dtod_async(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void *s)
{
    struct task *t = calloc(1, sizeof(*t));

    if (!t)
        return CUDA_ERROR_OUT_OF_MEMORY;
    t->kind = TASK_COPY;
    t->dst = (void *)(uintptr_t)dst;
    t->src = (const void *)(uintptr_t)src;
    t->bytes = bytes;
    stream_push(stream_of(s), t);
    return CUDA_SUCCESS;
}

struct memset_job {
    void *dst;
    unsigned char v;
    size_t n;
};

static int run_memset(void *arg)
{
    struct memset_job *j = arg;

    memset(j->dst, j->v, j->n);
    free(j);
    return 0;
}

static CUresult fk_memset_d8_async(CUdeviceptr dst, unsigned char v, size_t n, void *s)
{
    struct memset_job *j = malloc(sizeof(*j));

    if (!j)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *j = (struct memset_job){(void *)(uintptr_t)dst, v, n};
    if (fake_stream_host(s, run_memset, j) < 0) {
        free(j);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    return CUDA_SUCCESS;
}

/* from pageable memory, as the driver does it: src is staged at the call */
static CUresult fk_memcpy_htod_async(CUdeviceptr dst, const void *src, size_t bytes, void *s)
{
    struct task *t = calloc(1, sizeof(*t));
    unsigned char *staged = malloc(bytes ? bytes : 1);

    if (!t || !staged) {
        free(t);
        free(staged);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memcpy(staged, src, bytes);
    t->kind = TASK_COPY;
    t->dst = (void *)(uintptr_t)dst;
    t->src = staged;
    t->bytes = bytes;
    t->argbuf = staged; /* freed with the task */
    stream_push(stream_of(s), t);
    return CUDA_SUCCESS;
}

static CUresult fk_ipc_get_mem_handle(struct ipc_handle *h, CUdeviceptr p)
{
    struct alloc *a = find_alloc(p, 0);

    if (!a || a->imported)
        return CUDA_ERROR_INVALID_VALUE;
    memset(h, 0, sizeof(*h));
    h->magic = FAKE_IPC_MAGIC;
    h->pid = (int32_t)getpid();
    h->fd = a->fd;
    h->size = a->size;
    return CUDA_SUCCESS;
}

static CUresult fk_ipc_open_mem_handle(CUdeviceptr *p, struct ipc_handle h, unsigned flags)
{
    char path[64];
    int fd;
    CUresult rc;

    (void)flags;
    if (h.magic != FAKE_IPC_MAGIC || h.size == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (h.pid == (int32_t)getpid())
        return CUDA_ERROR_INVALID_CONTEXT; /* as CUDA: not in the exporting context */
    snprintf(path, sizeof(path), "/proc/%d/fd/%d", (int)h.pid, (int)h.fd);
    if ((fd = open(path, O_RDWR | O_CLOEXEC)) < 0)
        return CUDA_ERROR_INVALID_HANDLE;
    if ((rc = map_alloc(fd, h.size, 1, p)) != CUDA_SUCCESS)
        close(fd);
    return rc;
}

static CUresult fk_ipc_close_mem_handle(CUdeviceptr p)
{
    return release(p, 1);
}

static CUresult fk_func_set_attribute(const struct fake_kernel *k, int attr, int value)
{
    (void)attr;
    return k && value >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

void fake_sync_all(void)
{
    drain_all();
}

int fake_stream_host(void *stream, int (*fn)(void *arg), void *arg)
{
    struct task *t = calloc(1, sizeof(*t));

    if (!t)
        return -ENOMEM;
    t->kind = TASK_HOST;
    t->host = fn;
    t->host_arg = arg;
    stream_push(stream_of(stream), t);
    return 0;
}

void fake_backoff(unsigned *tries)
{
    enum { YIELDS = 4, FIRST_US = 20, MAX_US = 200 };
    unsigned n = (*tries)++;

    if (n < YIELDS) {
        sched_yield();
    } else {
        unsigned shift = n - YIELDS < 4 ? n - YIELDS : 4;
        unsigned us = FIRST_US << shift < MAX_US ? FIRST_US << shift : MAX_US;
        struct timespec t = {0, (long)us * 1000L};

        nanosleep(&t, NULL);
    }
}

/* --- cuGetProcAddress ---------------------------------------------------------- */

static const struct {
    const char *name;
    void *fn;
} entry_points[] = {
    {"cuInit", (void *)fk_init},
    {"cuDriverGetVersion", (void *)fk_driver_get_version},
    {"cuDeviceGetCount", (void *)fk_device_get_count},
    {"cuDeviceGet", (void *)fk_device_get},
    {"cuDeviceGetName", (void *)fk_device_get_name},
    {"cuDeviceTotalMem", (void *)fk_device_total_mem},
    {"cuGetErrorString", (void *)fk_get_error_string},
    {"cuDeviceGetAttribute", (void *)fk_device_get_attribute},
    {"cuDevicePrimaryCtxRetain", (void *)fk_primary_ctx_retain},
    {"cuDevicePrimaryCtxRelease", (void *)fk_primary_ctx_release},
    {"cuCtxSetCurrent", (void *)fk_ctx_set_current},
    {"cuCtxSynchronize", (void *)fk_ctx_synchronize},
    {"cuModuleLoadData", (void *)fk_module_load_data},
    {"cuModuleUnload", (void *)fk_module_unload},
    {"cuModuleGetFunction", (void *)fk_module_get_function},
    {"cuMemAlloc", (void *)fk_mem_alloc},
    {"cuMemFree", (void *)fk_mem_free},
    {"cuMemcpyHtoD", (void *)fk_memcpy_htod},
    {"cuMemcpyDtoH", (void *)fk_memcpy_dtoh},
    {"cuMemcpyDtoD", (void *)fk_memcpy},
    {"cuMemsetD8", (void *)fk_memset_d8},
    {"cuLaunchKernel", (void *)fk_launch_kernel},
    {"cuEventCreate", (void *)fk_event_create},
    {"cuEventDestroy", (void *)fk_event_destroy},
    {"cuEventRecord", (void *)fk_event_record},
    {"cuEventSynchronize", (void *)fk_event_synchronize},
    {"cuEventElapsedTime", (void *)fk_event_elapsed},
    {"cuStreamCreate", (void *)fk_stream_create},
    {"cuStreamDestroy", (void *)fk_stream_destroy},
    {"cuStreamSynchronize", (void *)fk_stream_synchronize},
    {"cuStreamWaitEvent", (void *)fk_stream_wait_event},
    {"cuMemcpyDtoDAsync", (void *)fk_memcpy_dtod_async},
    {"cuMemsetD8Async", (void *)fk_memset_d8_async},
    {"cuMemcpyHtoDAsync", (void *)fk_memcpy_htod_async},
    {"cuIpcGetMemHandle", (void *)fk_ipc_get_mem_handle},
    {"cuIpcOpenMemHandle", (void *)fk_ipc_open_mem_handle},
    {"cuIpcCloseMemHandle", (void *)fk_ipc_close_mem_handle},
    {"cuFuncSetAttribute", (void *)fk_func_set_attribute},
};

__attribute__((visibility("default"))) CUresult cuGetProcAddress_v2(const char *symbol, void **pfn,
                                                                    int version,
                                                                    unsigned long long flags,
                                                                    int *status)
{
    (void)version;
    (void)flags;
    if (!symbol || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof(entry_points) / sizeof(entry_points[0]); i++) {
        if (strcmp(entry_points[i].name, symbol) == 0) {
            *pfn = entry_points[i].fn;
            if (status)
                *status = 0; /* CU_GET_PROC_ADDRESS_SUCCESS */
            return CUDA_SUCCESS;
        }
    }
    *pfn = NULL;
    if (status)
        *status = 1; /* CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND */
    return CUDA_ERROR_NOT_FOUND;
}
