/* test_cuda_fake.c - worker/cuda/driver.c, the driver layer of the cuda backend,
 * run for real against libfakecuda.so (tests/fake/: the Driver API on host
 * memory, streams as threads): opening and describing the stack, contexts,
 * memory round trips, launches and their failures, stream ordering by
 * events only, event timing, sticky kernel faults, CUDA IPC between two
 * processes, and the intra-node transport kernels (on the fake: their CPU
 * reference) between two streams; and that every kernel the fake runs
 * takes the argument list of the real kernel's PTX entry. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/transport_ref.h"
#include "tests/fake/fakecuda.h"
#include "worker/cuda/driver.h"
#include "tests/unit/fakestack.h"

/* $(BUILD)/lib/libfakecuda.so, from this test's $(BUILD)/tests/unit/ */
static wk_cuda_t *open_fake(void)
{
    struct wk_cuda_paths paths = {.cuda = fakestack_path(), .driver_only = 1};
    wk_cuda_t *c = NULL;
    char err[512];

    cr_assert_eq(wk_cuda_open(&paths, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_cuda_context(c, 0), 0, "%s", wk_cuda_error(c));
    return c;
}

static wk_cuda_function_t function(wk_cuda_t *c, wk_cuda_module *mod, const char *name)
{
    static const char image[] = "// any image: the fake's kernels are host functions";
    wk_cuda_function_t fn = NULL;

    if (!*mod)
        cr_assert_eq(wk_cuda_module_load(c, image, mod), 0, "%s", wk_cuda_error(c));
    cr_assert_eq(wk_cuda_function(c, *mod, name, &fn), 0, "%s", wk_cuda_error(c));
    return fn;
}

static const unsigned one[3] = {1, 1, 1};

static int fill(wk_cuda_t *c, wk_cuda_stream s, wk_cuda_function_t fn, wk_cuda_ptr p, uint64_t n,
                uint32_t v)
{
    void *args[] = {&p, &n, &v};

    return wk_cuda_launch_on(c, s, fn, one, one, 0, args);
}

Test(cuda_fake, opens_and_describes_the_device)
{
    wk_cuda_t *c = open_fake();
    int major = 0, minor = -1, sms = 0;

    cr_assert(strstr(wk_cuda_describe(c), "driver 13.0, 1 device (duplex fake GPU)"), "%s",
              wk_cuda_describe(c));
    cr_assert_eq(wk_cuda_device_info(c, &major, &minor, &sms), 0);
    cr_assert_eq(major, 9);
    cr_assert_eq(minor, 0);
    cr_assert_eq(sms, 132);
    /* one context per handle, and only devices that exist */
    cr_assert_eq(wk_cuda_context(c, 0), -EINVAL);
    cr_assert(strstr(wk_cuda_error(c), "already held"), "%s", wk_cuda_error(c));
    wk_cuda_close(c);
}

Test(cuda_fake, a_device_that_does_not_exist_is_refused)
{
    struct wk_cuda_paths paths = {.cuda = fakestack_path(), .driver_only = 1};
    wk_cuda_t *c = NULL;
    char err[256];

    cr_assert_eq(wk_cuda_open(&paths, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_cuda_context(c, 3), -EINVAL);
    cr_assert_str_eq(wk_cuda_error(c), "device 3: there are 1");
    wk_cuda_close(c);
}

Test(cuda_fake, memory_round_trips)
{
    wk_cuda_t *c = open_fake();
    wk_cuda_ptr a = 0, b = 0;
    uint32_t in[1000], out[1000];

    for (int i = 0; i < 1000; i++)
        in[i] = (uint32_t)i * 2654435761u;
    cr_assert_eq(wk_cuda_alloc(c, sizeof(in), &a), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(in), &b), 0);
    cr_assert_eq(wk_cuda_upload(c, a, in, sizeof(in)), 0);
    cr_assert_eq(wk_cuda_copy(c, b, a, sizeof(in)), 0);
    cr_assert_eq(wk_cuda_download(c, out, b, sizeof(out)), 0);
    cr_assert_arr_eq(out, in, sizeof(in));
    cr_assert_eq(wk_cuda_memset(c, b, 0xab, 8), 0);
    cr_assert_eq(wk_cuda_download(c, out, b, 12), 0);
    cr_assert_eq(out[0], 0xababababu);
    cr_assert_eq(out[1], 0xababababu);
    cr_assert_eq(out[2], in[2]);
    wk_cuda_free(c, a);
    wk_cuda_free(c, b);
    wk_cuda_free(c, 0); /* ignored */
    wk_cuda_close(c);
}

/* cuDeviceTotalMem: the fake device has FAKECUDA_MEMORY_BYTES (default
 * 80 GiB), and its allocations fail as a full GPU's do beyond that. */
Test(cuda_fake, the_devices_memory_is_reported_and_bounds_its_allocations)
{
    wk_cuda_t *c = open_fake();
    wk_cuda_ptr a = 0, b = 0;
    size_t total = 0;

    cr_assert_eq(wk_cuda_device_memory(c, &total), 0, "%s", wk_cuda_error(c));
    cr_assert_eq(total, FAKECUDA_MEMORY_DEFAULT);
    wk_cuda_close(c);

    cr_assert_eq(setenv(FAKECUDA_MEMORY_ENV, "1048576", 1), 0);
    c = open_fake();
    cr_assert_eq(wk_cuda_device_memory(c, &total), 0, "%s", wk_cuda_error(c));
    cr_assert_eq(total, 1u << 20);
    cr_assert_eq(wk_cuda_alloc(c, 512 << 10, &a), 0, "%s", wk_cuda_error(c));
    cr_assert_eq(wk_cuda_alloc(c, 768 << 10, &b), -EIO);
    cr_assert_eq(b, 0);
    cr_assert_str_eq(wk_cuda_error(c), "cuMemAlloc(786432 bytes): out of memory (CUDA error 2)");
    /* what is freed can be allocated again */
    wk_cuda_free(c, a);
    cr_assert_eq(wk_cuda_alloc(c, 768 << 10, &b), 0, "%s", wk_cuda_error(c));
    cr_assert_eq(wk_cuda_alloc(c, 256 << 10, &a), 0, "%s", wk_cuda_error(c));
    wk_cuda_free(c, a);
    wk_cuda_free(c, b);
    /* no context: nothing to ask */
    wk_cuda_close(c);
    {
        struct wk_cuda_paths paths = {.cuda = fakestack_path(), .driver_only = 1};
        char err[256];

        cr_assert_eq(wk_cuda_open(&paths, &c, err, sizeof(err)), 0, "%s", err);
        cr_assert_eq(wk_cuda_device_memory(c, &total), -EINVAL);
        cr_assert(strstr(wk_cuda_error(c), "no context"), "%s", wk_cuda_error(c));
        wk_cuda_close(c);
    }
    unsetenv(FAKECUDA_MEMORY_ENV);
}

Test(cuda_fake, launches_run_and_an_unknown_kernel_is_named)
{
    wk_cuda_t *c = open_fake();
    wk_cuda_module mod = NULL;
    wk_cuda_function_t fn = function(c, &mod, "dx_fake_fill_u32"), none = NULL;
    wk_cuda_ptr p = 0;
    uint32_t out[64];

    cr_assert_eq(wk_cuda_alloc(c, sizeof(out), &p), 0);
    cr_assert_eq(fill(c, NULL, fn, p, 64, 42), 0, "%s", wk_cuda_error(c));
    cr_assert_eq(wk_cuda_download(c, out, p, sizeof(out)), 0); /* after the default stream */
    for (int i = 0; i < 64; i++)
        cr_assert_eq(out[i], 42u);
    cr_assert_eq(wk_cuda_function(c, mod, "dx_no_such_kernel", &none), -EIO);
    cr_assert_str_eq(wk_cuda_error(c),
                     "cuModuleGetFunction(dx_no_such_kernel): named symbol not found (CUDA error "
                     "500)");
    /* a block of more than 1024 threads is the driver's error, with the shape */
    {
        const unsigned big[3] = {2048, 1, 1};
        uint64_t n = 1;
        uint32_t v = 0;
        void *args[] = {&p, &n, &v};

        cr_assert_eq(wk_cuda_launch(c, fn, one, big, 0, args), -EIO);
        cr_assert(strstr(wk_cuda_error(c), "cuLaunchKernel(grid 1,1,1 block 2048,1,1 shared 0)"),
                  "%s", wk_cuda_error(c));
    }
    wk_cuda_free(c, p);
    wk_cuda_module_unload(c, mod);
    wk_cuda_close(c);
}

/* Stream B adds A's result only because it waits for A's event: A sleeps
 * first, so without the wait B would add zeros. */
Test(cuda_fake, streams_are_ordered_by_events_only)
{
    wk_cuda_t *c = open_fake();
    wk_cuda_module mod = NULL;
    wk_cuda_function_t fillf = function(c, &mod, "dx_fake_fill_u32");
    wk_cuda_function_t add = function(c, &mod, "dx_fake_add_u32");
    wk_cuda_function_t nap = function(c, &mod, "dx_fake_sleep");
    wk_cuda_stream a = NULL, b = NULL;
    wk_cuda_event done = NULL;
    wk_cuda_ptr x = 0, y = 0;
    uint64_t n = 256;
    uint32_t ms = 100, out[256];
    void *nap_args[] = {&ms}, *add_args[] = {&y, &x, &n};

    cr_assert_eq(wk_cuda_stream_create(c, &a), 0);
    cr_assert_eq(wk_cuda_stream_create(c, &b), 0);
    cr_assert_eq(wk_cuda_event_create(c, &done), 0);
    cr_assert_eq(wk_cuda_alloc(c, n * 4, &x), 0);
    cr_assert_eq(wk_cuda_alloc(c, n * 4, &y), 0);
    cr_assert_eq(wk_cuda_memset(c, x, 0, n * 4), 0);
    cr_assert_eq(wk_cuda_memset(c, y, 0, n * 4), 0);
    cr_assert_eq(wk_cuda_launch_on(c, a, nap, one, one, 0, nap_args), 0);
    cr_assert_eq(fill(c, a, fillf, x, n, 7), 0);
    cr_assert_eq(wk_cuda_event_record_on(c, done, a), 0);
    cr_assert_eq(wk_cuda_stream_wait(c, b, done), 0);
    cr_assert_eq(wk_cuda_launch_on(c, b, add, one, one, 0, add_args), 0);
    cr_assert_eq(wk_cuda_stream_sync(c, b), 0);
    cr_assert_eq(wk_cuda_download(c, out, y, sizeof(out)), 0);
    for (uint64_t i = 0; i < n; i++)
        cr_assert_eq(out[i], 7u, "y[%lu] = %u: stream b did not wait for a's event",
                     (unsigned long)i, out[i]);
    wk_cuda_event_destroy(c, done);
    wk_cuda_stream_destroy(c, a);
    wk_cuda_stream_destroy(c, b);
    wk_cuda_free(c, x);
    wk_cuda_free(c, y);
    wk_cuda_module_unload(c, mod);
    wk_cuda_close(c);
}

/* CUDA's rule: a wait is for the event's record made last before the
 * wait, even when a later record, on a faster stream, completes first (the
 * cuda backend records one event on two chunks' streams). */
Test(cuda_fake, a_wait_is_for_the_record_before_it_not_a_later_one)
{
    wk_cuda_t *c = open_fake();
    wk_cuda_module mod = NULL;
    wk_cuda_function_t fillf = function(c, &mod, "dx_fake_fill_u32");
    wk_cuda_function_t add = function(c, &mod, "dx_fake_add_u32");
    wk_cuda_function_t nap = function(c, &mod, "dx_fake_sleep");
    wk_cuda_stream slow = NULL, fast = NULL, waiter = NULL;
    wk_cuda_event ev = NULL;
    wk_cuda_ptr x = 0, y = 0;
    uint64_t n = 64;
    uint32_t ms = 100, out[64];
    void *nap_args[] = {&ms}, *add_args[] = {&y, &x, &n};

    cr_assert_eq(wk_cuda_stream_create(c, &slow), 0);
    cr_assert_eq(wk_cuda_stream_create(c, &fast), 0);
    cr_assert_eq(wk_cuda_stream_create(c, &waiter), 0);
    cr_assert_eq(wk_cuda_event_create(c, &ev), 0);
    cr_assert_eq(wk_cuda_alloc(c, n * 4, &x), 0);
    cr_assert_eq(wk_cuda_alloc(c, n * 4, &y), 0);
    cr_assert_eq(wk_cuda_memset(c, x, 0, n * 4), 0);
    cr_assert_eq(wk_cuda_memset(c, y, 0, n * 4), 0);
    cr_assert_eq(wk_cuda_launch_on(c, slow, nap, one, one, 0, nap_args), 0);
    cr_assert_eq(fill(c, slow, fillf, x, n, 5), 0);
    cr_assert_eq(wk_cuda_event_record_on(c, ev, slow), 0);
    cr_assert_eq(wk_cuda_stream_wait(c, waiter, ev), 0);
    cr_assert_eq(wk_cuda_event_record_on(c, ev, fast), 0); /* completes at once */
    cr_assert_eq(wk_cuda_launch_on(c, waiter, add, one, one, 0, add_args), 0);
    cr_assert_eq(wk_cuda_stream_sync(c, waiter), 0);
    cr_assert_eq(wk_cuda_download(c, out, y, sizeof(out)), 0);
    for (uint64_t i = 0; i < n; i++)
        cr_assert_eq(out[i], 5u, "y[%lu] = %u: the wait took the later record on the fast stream",
                     (unsigned long)i, out[i]);
    wk_cuda_event_destroy(c, ev);
    wk_cuda_stream_destroy(c, slow);
    wk_cuda_stream_destroy(c, fast);
    wk_cuda_stream_destroy(c, waiter);
    wk_cuda_free(c, x);
    wk_cuda_free(c, y);
    wk_cuda_module_unload(c, mod);
    wk_cuda_close(c);
}

Test(cuda_fake, events_time_the_work_between_them)
{
    wk_cuda_t *c = open_fake();
    wk_cuda_module mod = NULL;
    wk_cuda_function_t nap = function(c, &mod, "dx_fake_sleep");
    wk_cuda_event start = NULL, end = NULL;
    uint32_t ms = 30;
    void *args[] = {&ms};
    float elapsed = -1.0f;

    cr_assert_eq(wk_cuda_event_create(c, &start), 0);
    cr_assert_eq(wk_cuda_event_create(c, &end), 0);
    cr_assert_eq(wk_cuda_event_record(c, start), 0);
    cr_assert_eq(wk_cuda_launch(c, nap, one, one, 0, args), 0);
    cr_assert_eq(wk_cuda_event_record(c, end), 0);
    cr_assert_eq(wk_cuda_event_elapsed(c, start, end, &elapsed), 0, "%s", wk_cuda_error(c));
    cr_assert_geq(elapsed, 29.0f, "%.3f ms", (double)elapsed);
    wk_cuda_event_destroy(c, start);
    wk_cuda_event_destroy(c, end);
    wk_cuda_module_unload(c, mod);
    wk_cuda_close(c);
}

Test(cuda_fake, a_kernel_fault_is_reported_and_sticks)
{
    wk_cuda_t *c = open_fake();
    wk_cuda_module mod = NULL;
    wk_cuda_function_t bad = function(c, &mod, "dx_fake_fault");
    wk_cuda_ptr p = 0;
    uint32_t v = 1;

    cr_assert_eq(wk_cuda_alloc(c, 4, &p), 0);
    cr_assert_eq(wk_cuda_launch(c, bad, one, one, 0, NULL), 0); /* launches are asynchronous */
    cr_assert_eq(wk_cuda_sync(c), -EIO);
    cr_assert_str_eq(wk_cuda_error(c),
                     "cuCtxSynchronize: unspecified launch failure (CUDA error 719)");
    cr_assert_eq(wk_cuda_upload(c, p, &v, 4), -EIO); /* the context is lost */
    wk_cuda_free(c, p);
    wk_cuda_module_unload(c, mod);
    wk_cuda_close(c);
}

/* The receiving process maps the exporter's allocation by its IPC handle,
 * reads what the exporter wrote and writes back. */
Test(cuda_fake, ipc_shares_an_allocation_between_processes)
{
    wk_cuda_t *c = open_fake();
    struct wk_cuda_ipc_handle h;
    wk_cuda_ptr p = 0, same = 0;
    uint32_t in[512], out[512];
    pid_t pid;
    int status = 0;

    for (int i = 0; i < 512; i++)
        in[i] = 0x5eed0000u + (uint32_t)i;
    cr_assert_eq(wk_cuda_alloc(c, sizeof(in), &p), 0);
    cr_assert_eq(wk_cuda_upload(c, p, in, sizeof(in)), 0);
    cr_assert_eq(wk_cuda_ipc_export(c, p, &h), 0, "%s", wk_cuda_error(c));
    /* as CUDA: a process does not open its own handles */
    cr_assert_eq(wk_cuda_ipc_import(c, &h, &same), -EIO);
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        wk_cuda_ptr q = 0;
        uint32_t seen[512];
        int ok = wk_cuda_ipc_import(c, &h, &q) == 0 &&
                 wk_cuda_download(c, seen, q, sizeof(seen)) == 0 &&
                 memcmp(seen, in, sizeof(in)) == 0;

        for (int i = 0; i < 512; i++)
            seen[i] = ~seen[i];
        ok = ok && wk_cuda_upload(c, q, seen, sizeof(seen)) == 0;
        wk_cuda_ipc_close(c, q);
        _exit(ok ? 0 : 1);
    }
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the importer saw other bytes");
    cr_assert_eq(wk_cuda_download(c, out, p, sizeof(out)), 0);
    for (int i = 0; i < 512; i++)
        cr_assert_eq(out[i], ~in[i], "[%d]: the importer's write is not seen", i);
    wk_cuda_free(c, p);
    wk_cuda_close(c);
}

/* The transport kernels' launch contract, with the receiver and the sender
 * on two streams of one process and a ring much smaller than the stream. */
Test(cuda_fake, transport_kernels_stream_messages_between_streams)
{
    enum { CH = 4, SLOTS = 4, SLOT = 64, NMSG = 203 };
    wk_cuda_t *c = open_fake();
    wk_cuda_module mod = NULL;
    wk_cuda_function_t send = function(c, &mod, "dx_transport_send");
    wk_cuda_function_t recv = function(c, &mod, "dx_transport_recv");
    wk_cuda_stream ss = NULL, rs = NULL;
    size_t ring_bytes = dx_tref_ring_size(CH, SLOTS, SLOT), total = 0;
    uint64_t off[NMSG], len[NMSG], cap[NMSG], got[NMSG];
    unsigned char *ring = aligned_alloc(16, ring_bytes), *src, *dst;
    wk_cuda_ptr d_ring, d_src, d_dst, d_off, d_len, d_cap, d_got, d_serr, d_rerr;
    int serr[CH], rerr[CH], nmsg = NMSG;
    uint32_t slots = SLOTS, slot_bytes = SLOT;
    const unsigned grid[3] = {CH, 1, 1}, block[3] = {256, 1, 1};

    for (int m = 0; m < NMSG; m++) {
        len[m] = (uint64_t)(m * 37) % (SLOTS * SLOT - 16 + 1); /* 0 .. a full ring */
        off[m] = total;
        cap[m] = len[m];
        total += (len[m] + 15) & ~(uint64_t)15;
    }
    src = malloc(total);
    dst = malloc(total);
    for (size_t i = 0; i < total; i++)
        src[i] = (unsigned char)(i * 131 + 7);
    cr_assert_eq(dx_tref_ring_init(ring, ring_bytes, CH, SLOTS, SLOT), 0);
    cr_assert_eq(wk_cuda_alloc(c, ring_bytes, &d_ring), 0);
    cr_assert_eq(wk_cuda_upload(c, d_ring, ring, ring_bytes), 0);
    cr_assert_eq(wk_cuda_alloc(c, total, &d_src), 0);
    cr_assert_eq(wk_cuda_upload(c, d_src, src, total), 0);
    cr_assert_eq(wk_cuda_alloc(c, total, &d_dst), 0);
    cr_assert_eq(wk_cuda_memset(c, d_dst, 0xff, total), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(off), &d_off), 0);
    cr_assert_eq(wk_cuda_upload(c, d_off, off, sizeof(off)), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(len), &d_len), 0);
    cr_assert_eq(wk_cuda_upload(c, d_len, len, sizeof(len)), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(cap), &d_cap), 0);
    cr_assert_eq(wk_cuda_upload(c, d_cap, cap, sizeof(cap)), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(got), &d_got), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(serr), &d_serr), 0);
    cr_assert_eq(wk_cuda_alloc(c, sizeof(rerr), &d_rerr), 0);
    cr_assert_eq(wk_cuda_stream_create(c, &ss), 0);
    cr_assert_eq(wk_cuda_stream_create(c, &rs), 0);
    {
        void *rargs[] = {&d_ring, &slots, &slot_bytes, &d_dst, &d_off,
                         &d_cap,  &nmsg,  &d_got,      &d_rerr};
        void *sargs[] = {&d_ring, &slots, &slot_bytes, &d_src, &d_off, &d_len, &nmsg, &d_serr};

        cr_assert_eq(wk_cuda_launch_on(c, rs, recv, grid, block, 0, rargs), 0);
        cr_assert_eq(wk_cuda_launch_on(c, ss, send, grid, block, 0, sargs), 0);
    }
    cr_assert_eq(wk_cuda_stream_sync(c, ss), 0);
    cr_assert_eq(wk_cuda_stream_sync(c, rs), 0);
    cr_assert_eq(wk_cuda_download(c, serr, d_serr, sizeof(serr)), 0);
    cr_assert_eq(wk_cuda_download(c, rerr, d_rerr, sizeof(rerr)), 0);
    cr_assert_eq(wk_cuda_download(c, got, d_got, sizeof(got)), 0);
    cr_assert_eq(wk_cuda_download(c, dst, d_dst, total), 0);
    for (int i = 0; i < CH; i++) {
        cr_assert_eq(serr[i], 0, "sender channel %d: %d", i, serr[i]);
        cr_assert_eq(rerr[i], 0, "receiver channel %d: %d", i, rerr[i]);
    }
    for (int m = 0; m < NMSG; m++) {
        cr_assert_eq(got[m], len[m], "message %d: %lu bytes, sent %lu", m, (unsigned long)got[m],
                     (unsigned long)len[m]);
        cr_assert_arr_eq(dst + off[m], src + off[m], len[m], "message %d differs", m);
    }
    wk_cuda_stream_destroy(c, ss);
    wk_cuda_stream_destroy(c, rs);
    wk_cuda_free(c, d_ring);
    wk_cuda_free(c, d_src);
    wk_cuda_free(c, d_dst);
    wk_cuda_free(c, d_off);
    wk_cuda_free(c, d_len);
    wk_cuda_free(c, d_cap);
    wk_cuda_free(c, d_got);
    wk_cuda_free(c, d_serr);
    wk_cuda_free(c, d_rerr);
    wk_cuda_module_unload(c, mod);
    wk_cuda_close(c);
    free(ring);
    free(src);
    free(dst);
}

/* --- the fake's kernels take the real kernels' arguments ----------------------- */

/* The parameter sizes of .entry name in a PTX text; -1 when absent. */
static int ptx_params(const char *ptx, const char *name, size_t *sizes, int max)
{
    char head[160];
    const char *p, *end;
    int n = 0;

    snprintf(head, sizeof(head), ".entry %s(", name);
    if (!(p = strstr(ptx, head)))
        return -1;
    p += strlen(head);
    end = strchr(p, ')');
    cr_assert_not_null(end);
    while ((p = strstr(p, ".param")) && p < end) {
        const char *eol = strchr(p, '\n'), *br;
        char line[256];

        snprintf(line, sizeof(line), "%.*s", (int)(eol ? eol - p : (long)strlen(p)), p);
        cr_assert_lt(n, max);
        if ((br = strchr(line, '['))) /* .align A .b8 name[N]: a struct by value */
            sizes[n] = (size_t)atol(br + 1);
        else if (strstr(line, "64"))
            sizes[n] = 8;
        else if (strstr(line, "32"))
            sizes[n] = 4;
        else if (strstr(line, "16"))
            sizes[n] = 2;
        else
            sizes[n] = 1;
        n++;
        p += 6;
    }
    return n;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    cr_assert_not_null(f, "%s", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    buf = malloc((size_t)n + 1);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

Test(cuda_fake, every_fake_kernel_takes_the_real_kernels_arguments)
{
    char dir[PATH_MAX], exe[PATH_MAX], all[1 << 14] = "", problem[512] = "";
    ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    void *lib = dlopen(fakestack_path(), RTLD_NOW | RTLD_LOCAL);
    const struct fake_kernel *(*kernel)(int);
    char *ptx[64];
    int nptx = 0, checked = 0;
    DIR *d;
    struct dirent *e;

    cr_assert_not_null(lib, "%s", dlerror());
    *(void **)&kernel = dlsym(lib, "fakecuda_kernel");
    cr_assert_not_null(kernel);
    cr_assert_gt(len, 0);
    exe[len] = '\0';
    snprintf(dir, sizeof(dir), "%s/../../kernels", dirname(exe));
    if (!wk_gpu_have_kernels())
        cr_skip_test("built without nvcc: no PTX in %s to compare with", dir);
    cr_assert_not_null(d = opendir(dir), "%s: built with nvcc, its PTX should be there", dir);
    while ((e = readdir(d)) && nptx < 64) {
        char path[PATH_MAX + 256];
        size_t n = strlen(e->d_name);

        if (n < 5 || strcmp(e->d_name + n - 4, ".ptx") != 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        ptx[nptx++] = slurp(path);
    }
    closedir(d);
    for (int i = 0; kernel(i) && !problem[0]; i++) {
        const struct fake_kernel *k = kernel(i);
        size_t sizes[FAKECUDA_MAX_ARGS];
        int n = -1;

        if (strncmp(k->name, "dx_fake_", 8) == 0) /* the fake's own */
            continue;
        for (int f = 0; f < nptx && n < 0; f++)
            n = ptx_params(ptx[f], k->name, sizes, FAKECUDA_MAX_ARGS);
        if (n < 0)
            snprintf(problem, sizeof(problem), "the fake runs %s, which no kernels/*.ptx has",
                     k->name);
        else if (n != k->nargs)
            snprintf(problem, sizeof(problem), "%s: the kernel takes %d arguments, the fake %d",
                     k->name, n, k->nargs);
        for (int a = 0; a < n && a < k->nargs && !problem[0]; a++)
            if (sizes[a] != k->arg_size[a])
                snprintf(problem, sizeof(problem), "%s argument %d: %zu bytes, the fake %zu",
                         k->name, a, sizes[a], k->arg_size[a]);
        checked++;
        strncat(all, k->name, sizeof(all) - strlen(all) - 2);
        strcat(all, " ");
    }
    for (int f = 0; f < nptx; f++)
        free(ptx[f]);
    cr_assert_eq(problem[0], '\0', "%s", problem);
    cr_assert_geq(checked, 10, "checked only: %s", all);
    dlclose(lib);
}
