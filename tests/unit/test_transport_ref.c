/* test_transport_ref.c - the CPU reference of the intra-node transport
 * (kernels/transport_ref.h): ring shapes, edge sizes (zero length, a slot
 * exactly filled, the whole ring, one byte more: -EMSGSIZE), credit (try
 * variants, a slow receiver never overrun), header checks, and a sender and a
 * receiver PROCESS streaming 64 MiB of pseudo-random messages of varying
 * sizes over 4 channels of a small ring (every byte, the order and the
 * sequence numbers checked), plus a threads variant with one sender and one
 * receiver thread per channel. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kernels/transport_ref.h"

/* --- helpers -------------------------------------------------------------- */

static void *map_shared(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    cr_assert_neq(p, MAP_FAILED);
    return p;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* message m's bytes: a stream seeded by m */
static void fill(unsigned char *buf, size_t len, uint64_t m)
{
    uint64_t s = m * 0x2545f4914f6cdd1dull + 1;
    size_t i = 0;

    for (; i + 8 <= len; i += 8) {
        uint64_t v = splitmix(&s);
        memcpy(buf + i, &v, 8);
    }
    if (i < len) {
        uint64_t v = splitmix(&s);
        memcpy(buf + i, &v, len - i);
    }
}

/* message m's size for a ring of slots x slot_bytes: the edge cases in turn,
 * then uniform in [0, max] */
static size_t msg_size(uint64_t m, uint32_t slots, uint32_t slot_bytes)
{
    size_t max = (size_t)slots * slot_bytes - DX_TREF_MSG_HDR;
    uint64_t s = m ^ 0x5bd1e995ull;

    switch (m % 10) {
    case 0:
        return 0;
    case 1:
        return slot_bytes - DX_TREF_MSG_HDR; /* exactly one slot */
    case 2:
        return slot_bytes - DX_TREF_MSG_HDR + 1; /* one byte into a second */
    case 3:
        return max; /* the whole ring */
    case 4:
        return 3 * (size_t)slot_bytes - DX_TREF_MSG_HDR; /* exactly three slots */
    default:
        return splitmix(&s) % (max + 1);
    }
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t counter(void *ring, size_t off)
{
    return atomic_load_explicit((_Atomic uint64_t *)((unsigned char *)ring + off),
                                memory_order_acquire);
}

/* dx_tref_send / dx_tref_recv with a deadline, so that a failing peer fails
 * the test instead of hanging it (-ETIMEDOUT after DEADLINE_S) */
#define DEADLINE_S 20.0

static double now_s(void);

static int send_dl(void *ring, uint32_t ch, const void *data, size_t len)
{
    double end = now_s() + DEADLINE_S;
    int rc;

    while ((rc = dx_tref_try_send(ring, ch, data, len)) == -EAGAIN) {
        if (now_s() > end)
            return -ETIMEDOUT;
        sched_yield();
    }
    return rc;
}

static int recv_dl(void *ring, uint32_t ch, void *buf, size_t cap, size_t *len)
{
    double end = now_s() + DEADLINE_S;
    int rc;

    while ((rc = dx_tref_try_recv(ring, ch, buf, cap, len)) == -EAGAIN) {
        if (now_s() > end)
            return -ETIMEDOUT;
        sched_yield();
    }
    return rc;
}

/* --- shapes and single-threaded edges --------------------------------------- */

Test(tref, shapes)
{
    cr_assert_eq(dx_tref_ring_size(0, 4, 64), 0);
    cr_assert_eq(dx_tref_ring_size(1, 3, 64), 0);
    cr_assert_eq(dx_tref_ring_size(1, 0, 64), 0);
    cr_assert_eq(dx_tref_ring_size(1, 4, 8), 0);
    cr_assert_eq(dx_tref_ring_size(1, 4, 72), 0);
    cr_assert_eq(dx_tref_ring_size(DX_TREF_MAX_CHANNELS + 1, 4, 64), 0);
    cr_assert_eq(dx_tref_ring_size(2, 4, 64), 128 + 2 * 256 + 2 * 4 * 64);
    cr_assert_eq(DX_TREF_DATA_OFF(2, 4, 64, 1), 128 + 2 * 256 + 4 * 64);
    cr_assert_eq(dx_tref_msg_slots(64, 0), 1);
    cr_assert_eq(dx_tref_msg_slots(64, 48), 1);
    cr_assert_eq(dx_tref_msg_slots(64, 49), 2);
    cr_assert_eq(dx_tref_msg_slots(16, 0), 1);
    cr_assert_eq(dx_tref_msg_slots(16, 1), 2);

    size_t sz = dx_tref_ring_size(2, 4, 64);
    void *mem = aligned_alloc(16, sz);
    cr_assert_eq(dx_tref_ring_init(mem, sz - 1, 2, 4, 64), -EINVAL);
    cr_assert_eq(dx_tref_ring_init((char *)mem + 8, sz, 2, 4, 64), -EINVAL);
    cr_assert_eq(dx_tref_ring_init(mem, sz, 2, 4, 64), 0);
    size_t len;
    char c;
    cr_assert_eq(dx_tref_send(mem, 2, &c, 1), -EINVAL);
    cr_assert_eq(dx_tref_recv(mem, 2, &c, 1, &len), -EINVAL);
    cr_assert_eq(dx_tref_send(mem, 0, NULL, 1), -EINVAL);
    free(mem);
}

Test(tref, edges)
{
    const uint32_t slots = 4, sb = 64;
    size_t sz = dx_tref_ring_size(1, slots, sb), len = 99;
    void *ring = aligned_alloc(16, sz);
    unsigned char in[256], out[256];

    fill(in, sizeof(in), 7);
    cr_assert_eq(dx_tref_ring_init(ring, sz, 1, slots, sb), 0);
    cr_assert_eq(dx_tref_try_recv(ring, 0, out, sizeof(out), &len), -EAGAIN);

    /* zero length, NULL data */
    cr_assert_eq(dx_tref_send(ring, 0, NULL, 0), 0);
    cr_assert_eq(dx_tref_recv(ring, 0, NULL, 0, &len), 0);
    cr_assert_eq(len, 0);

    /* larger than the ring: refused, nothing written */
    cr_assert_eq(dx_tref_send(ring, 0, in, slots * sb - DX_TREF_MSG_HDR + 1), -EMSGSIZE);
    cr_assert_eq(counter(ring, DX_TREF_HEAD_OFF(0)), 1);
    /* the whole ring: fits exactly, then no credit */
    cr_assert_eq(dx_tref_send(ring, 0, in, slots * sb - DX_TREF_MSG_HDR), 0);
    cr_assert_eq(dx_tref_try_send(ring, 0, NULL, 0), -EAGAIN);
    /* too small a buffer: -ENOBUFS with the length, message kept */
    cr_assert_eq(dx_tref_recv(ring, 0, out, 10, &len), -ENOBUFS);
    cr_assert_eq(len, slots * sb - DX_TREF_MSG_HDR);
    cr_assert_eq(dx_tref_recv(ring, 0, out, sizeof(out), &len), 0);
    cr_assert_eq(len, slots * sb - DX_TREF_MSG_HDR);
    cr_assert_arr_eq(out, in, len);
    cr_assert_eq(counter(ring, DX_TREF_TAIL_OFF(0)), 5);

    /* a message that wraps: starts in slot 1 (head 5), spans 3 slots */
    cr_assert_eq(dx_tref_send(ring, 0, in, 2 * sb), 0);
    cr_assert_eq(dx_tref_send(ring, 0, in + 1, sb - DX_TREF_MSG_HDR), 0); /* slot 0 again */
    cr_assert_eq(dx_tref_try_send(ring, 0, NULL, 0), -EAGAIN);
    cr_assert_eq(dx_tref_recv(ring, 0, out, sizeof(out), &len), 0);
    cr_assert_eq(len, 2 * sb);
    cr_assert_arr_eq(out, in, len);
    cr_assert_eq(dx_tref_recv(ring, 0, out, sizeof(out), &len), 0);
    cr_assert_eq(len, sb - DX_TREF_MSG_HDR);
    cr_assert_arr_eq(out, in + 1, len);
    cr_assert_eq(counter(ring, DX_TREF_SENT_OFF(0)), 4);
    cr_assert_eq(counter(ring, DX_TREF_RECVD_OFF(0)), 4);
    cr_assert_eq(counter(ring, DX_TREF_HEAD_OFF(0)), counter(ring, DX_TREF_TAIL_OFF(0)));
    free(ring);
}

/* The abort word: a receiver waiting for a message and a sender waiting
 * for credit both stop with -ECANCELED once either side sets it. */
static void *recv_until_aborted(void *ring)
{
    unsigned char buf[64];
    size_t len = 0;

    return (void *)(intptr_t)dx_tref_recv(ring, 0, buf, sizeof(buf), &len);
}

Test(tref, an_abort_ends_the_waits)
{
    const uint32_t slots = 2, sb = 64;
    size_t sz = dx_tref_ring_size(1, slots, sb);
    void *ring = aligned_alloc(16, sz), *rc = NULL;
    unsigned char in[128] = {0};
    pthread_t t;

    cr_assert_eq(dx_tref_ring_init(ring, sz, 1, slots, sb), 0);
    cr_assert_eq(((struct dx_tref_hdr *)ring)->abort, 0u, "a new ring is not aborted");
    cr_assert_eq(pthread_create(&t, NULL, recv_until_aborted, ring), 0);
    usleep(20000); /* it waits for a message that never comes */
    dx_tref_abort(ring);
    cr_assert_eq(pthread_join(t, &rc), 0);
    cr_assert_eq((int)(intptr_t)rc, -ECANCELED);
    /* a sender without credit gives up too, and nothing more moves */
    cr_assert_eq(dx_tref_try_send(ring, 0, in, slots * sb - DX_TREF_MSG_HDR), 0);
    cr_assert_eq(dx_tref_send(ring, 0, in, 1), -ECANCELED);
    free(ring);
}

Test(tref, bad_header_is_eproto)
{
    size_t sz = dx_tref_ring_size(1, 4, 64), len;
    void *ring = aligned_alloc(16, sz);
    unsigned char buf[64];
    struct dx_tref_msg m;
    unsigned char *slot0;

    cr_assert_eq(dx_tref_ring_init(ring, sz, 1, 4, 64), 0);
    slot0 = (unsigned char *)ring + DX_TREF_DATA_OFF(1, 4, 64, 0);
    cr_assert_eq(dx_tref_send(ring, 0, "abc", 3), 0);
    memcpy(&m, slot0, sizeof(m));
    cr_assert_eq(m.bytes, 3);
    cr_assert_eq(m.seq, 0);
    m.seq = 5; /* wrong sequence number */
    memcpy(slot0, &m, sizeof(m));
    cr_assert_eq(dx_tref_recv(ring, 0, buf, sizeof(buf), &len), -EPROTO);
    m.seq = 0;
    m.bytes = 100; /* more slots than were published */
    memcpy(slot0, &m, sizeof(m));
    cr_assert_eq(dx_tref_recv(ring, 0, buf, sizeof(buf), &len), -EPROTO);
    free(ring);
}

/* --- two processes ------------------------------------------------------------ */

struct stream {
    uint32_t channels, slots, slot_bytes;
    size_t total;      /* stop after this many payload bytes */
    useconds_t nap_us; /* receiver sleeps this long after each message */
    int try_send;      /* sender uses dx_tref_try_send and counts -EAGAIN */
};

/* the side area after the ring: the sender's -EAGAIN count, the receiver's
 * largest observed head - tail */
struct side {
    _Atomic uint64_t eagain;
    uint64_t max_fill;
};

static int run_sender(const struct stream *st, void *ring, struct side *side)
{
    size_t max = (size_t)st->slots * st->slot_bytes, done = 0;
    unsigned char *buf = malloc(max);
    int rc = 0;

    if (!buf)
        return -ENOMEM;
    for (uint64_t m = 0; done < st->total; m++) {
        size_t len = msg_size(m, st->slots, st->slot_bytes);
        uint32_t ch = (uint32_t)(m % st->channels);
        fill(buf, len, m);
        if (st->try_send) {
            while ((rc = dx_tref_try_send(ring, ch, buf, len)) == -EAGAIN)
                atomic_fetch_add(&side->eagain, 1);
        } else {
            rc = dx_tref_send(ring, ch, buf, len);
        }
        if (rc)
            break;
        done += len;
    }
    free(buf);
    return rc;
}

/* receives and checks; returns the message count, -1 on a mismatch */
static long run_receiver(const struct stream *st, void *ring, struct side *side)
{
    size_t max = (size_t)st->slots * st->slot_bytes, done = 0, len;
    unsigned char *got = malloc(max), *want = malloc(max);
    long msgs = 0;

    cr_assert(got && want);
    for (uint64_t m = 0; done < st->total; m++) {
        uint32_t ch = (uint32_t)(m % st->channels);
        size_t exp = msg_size(m, st->slots, st->slot_bytes);
        uint64_t fillv = counter(ring, DX_TREF_HEAD_OFF(ch)) - counter(ring, DX_TREF_TAIL_OFF(ch));
        if (fillv > side->max_fill)
            side->max_fill = fillv;
        cr_assert_leq(fillv, st->slots, "channel %u overrun: head - tail = %lu", ch,
                      (unsigned long)fillv);
        int rc = dx_tref_recv(ring, ch, got, max, &len);
        cr_assert_eq(rc, 0, "message %lu: %s", (unsigned long)m, strerror(-rc));
        cr_assert_eq(len, exp, "message %lu: %zu bytes, want %zu", (unsigned long)m, len, exp);
        fill(want, len, m);
        cr_assert(memcmp(got, want, len) == 0, "message %lu: payload differs", (unsigned long)m);
        cr_assert_eq(counter(ring, DX_TREF_RECVD_OFF(ch)), m / st->channels + 1);
        done += len;
        msgs++;
        if (st->nap_us)
            usleep(st->nap_us);
    }
    free(got);
    free(want);
    return msgs;
}

static long stream_fork(const struct stream *st, struct side **side_out, double *secs)
{
    size_t sz = dx_tref_ring_size(st->channels, st->slots, st->slot_bytes);
    size_t map = sz + sizeof(struct side);
    void *ring = map_shared(map);
    struct side *side = (struct side *)((unsigned char *)ring + sz);
    int status;
    pid_t pid;

    cr_assert_neq(sz, 0);
    cr_assert_eq(dx_tref_ring_init(ring, sz, st->channels, st->slots, st->slot_bytes), 0);
    pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a failed receiver must not leave us spinning */
        _exit(run_sender(st, ring, side) == 0 ? 0 : 1);
    }
    /* the blocking calls on both sides: a hang ends in SIGALRM here (a crash
     * for Criterion) and SIGKILL for the sender */
    alarm(60);
    double t0 = now_s();
    long msgs = run_receiver(st, ring, side);
    *secs = now_s() - t0;
    alarm(0);
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "sender failed");
    for (uint32_t c = 0; c < st->channels; c++) {
        uint64_t want = msgs / st->channels + ((uint64_t)c < (uint64_t)msgs % st->channels);
        cr_assert_eq(counter(ring, DX_TREF_SENT_OFF(c)), want);
        cr_assert_eq(counter(ring, DX_TREF_RECVD_OFF(c)), want);
        cr_assert_eq(counter(ring, DX_TREF_HEAD_OFF(c)), counter(ring, DX_TREF_TAIL_OFF(c)));
    }
    *side_out = malloc(sizeof(**side_out));
    cr_assert(*side_out);
    memcpy(*side_out, side, sizeof(**side_out));
    munmap(ring, map);
    return msgs;
}

Test(tref, processes_stream_64mib)
{
    /* 4 channels x 16 slots x 1 KiB: each channel's 16 KiB ring wraps ~1000 times */
    struct stream st = {4, 16, 1024, (size_t)64 << 20, 0, 0};
    struct side *side;
    double secs;
    long msgs = stream_fork(&st, &side, &secs);

    cr_assert_gt(msgs, 1000);
    cr_assert_leq(side->max_fill, st.slots);
    fprintf(stderr, "transport_ref: processes, %ld messages, %.1f MiB in %.3f s: %.0f MB/s\n", msgs,
            st.total / 1048576.0, secs, st.total / secs / 1e6);
    free(side);
}

Test(tref, slow_receiver_credit)
{
    /* a tiny ring and a sleeping receiver: the sender must wait for credit
     * (try_send says -EAGAIN) and still nothing is lost or overwritten */
    struct stream st = {2, 4, 64, 24 << 10, 50, 1};
    struct side *side;
    double secs;
    long msgs = stream_fork(&st, &side, &secs);

    cr_assert_gt(msgs, 100);
    cr_assert_gt(atomic_load(&side->eagain), 0, "the sender never waited for credit");
    cr_assert_eq(side->max_fill, st.slots, "the ring never filled");
    free(side);
}

/* --- threads: one sender and one receiver thread per channel ----------------------- */

struct tjob {
    void *ring;
    size_t total;
    uint32_t ch, slots, slot_bytes;
    int rc;
};

static void *tsend(void *arg)
{
    struct tjob *j = arg;
    size_t max = (size_t)j->slots * j->slot_bytes, done = 0;
    unsigned char *buf = malloc(max);

    j->rc = buf ? 0 : -ENOMEM;
    for (uint64_t k = 0; j->rc == 0 && done < j->total; k++) {
        uint64_t m = k * 1000003u + j->ch;
        size_t len = msg_size(m, j->slots, j->slot_bytes);
        fill(buf, len, m);
        j->rc = send_dl(j->ring, j->ch, buf, len);
        done += len;
    }
    free(buf);
    return NULL;
}

static void *trecv(void *arg)
{
    struct tjob *j = arg;
    size_t max = (size_t)j->slots * j->slot_bytes, done = 0, len;
    unsigned char *got = malloc(max), *want = malloc(max);

    j->rc = got && want ? 0 : -ENOMEM;
    for (uint64_t k = 0; j->rc == 0 && done < j->total; k++) {
        uint64_t m = k * 1000003u + j->ch;
        j->rc = recv_dl(j->ring, j->ch, got, max, &len);
        if (j->rc == 0 && len != msg_size(m, j->slots, j->slot_bytes))
            j->rc = -EBADMSG;
        if (j->rc == 0) {
            fill(want, len, m);
            if (memcmp(got, want, len) != 0)
                j->rc = -EBADMSG;
        }
        done += len;
    }
    free(got);
    free(want);
    return NULL;
}

Test(tref, threads_channels)
{
    enum { CH = 4 };
    const uint32_t slots = 32, sb = 2048;
    size_t sz = dx_tref_ring_size(CH, slots, sb);
    void *ring = aligned_alloc(64, sz);
    struct tjob snd[CH], rcv[CH];
    pthread_t ts[CH], tr[CH];

    cr_assert_eq(dx_tref_ring_init(ring, sz, CH, slots, sb), 0);
    double t0 = now_s();
    for (uint32_t c = 0; c < CH; c++) {
        snd[c] = (struct tjob){
            .ring = ring, .total = (size_t)8 << 20, .ch = c, .slots = slots, .slot_bytes = sb};
        rcv[c] = snd[c];
        cr_assert_eq(pthread_create(&ts[c], NULL, tsend, &snd[c]), 0);
        cr_assert_eq(pthread_create(&tr[c], NULL, trecv, &rcv[c]), 0);
    }
    for (uint32_t c = 0; c < CH; c++) {
        pthread_join(ts[c], NULL);
        pthread_join(tr[c], NULL);
    }
    double secs = now_s() - t0;
    for (uint32_t c = 0; c < CH; c++) {
        cr_assert_eq(snd[c].rc, 0, "channel %u sender: %d", c, snd[c].rc);
        cr_assert_eq(rcv[c].rc, 0, "channel %u receiver: %d", c, rcv[c].rc);
        cr_assert_eq(counter(ring, DX_TREF_SENT_OFF(c)), counter(ring, DX_TREF_RECVD_OFF(c)));
    }
    fprintf(stderr, "transport_ref: threads, %d channels, %d MiB in %.3f s: %.0f MB/s\n", CH,
            CH * 8, secs, CH * 8.0 * 1048576 / secs / 1e6);
    free(ring);
}
