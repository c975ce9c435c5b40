/* test_ipcring.c - the ring descriptor of the IPC transport
 * (worker/cuda/comm/ipcring.h) on the CPU: encode / decode round trip, the exact wire
 * layout, every field corrupted (-EPROTO naming the field), truncated and
 * over-long buffers, random bytes never accepted as a ring, and the argument
 * checks that need no GPU. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "kernels/transport_ref.h"
#include "worker/cuda/comm/ipcring.h"

static struct wk_ipcring_desc sample(void)
{
    struct wk_ipcring_desc d = {.channels = 20, .slots = 8, .slot_bytes = 1024};

    d.ring_bytes = dx_tref_ring_size(d.channels, d.slots, d.slot_bytes);
    for (int i = 0; i < 64; i++)
        d.handle.bytes[i] = (unsigned char)(i * 37 + 5);
    return d;
}

static void encode(const struct wk_ipcring_desc *d, unsigned char *buf)
{
    cr_assert_eq(wk_ipcring_desc_encode(d, buf, WK_IPCRING_DESC_BYTES), WK_IPCRING_DESC_BYTES);
}

/* decode must fail with -EPROTO, an error naming field, and a zeroed d */
static void expect_reject(const unsigned char *buf, size_t len, const char *field)
{
    struct wk_ipcring_desc d;
    char err[256];
    static const struct wk_ipcring_desc zero;

    memset(&d, 0x5a, sizeof(d));
    cr_assert_eq(wk_ipcring_desc_decode(buf, len, &d, err, sizeof(err)), -EPROTO,
                 "accepted a descriptor with a bad %s", field);
    cr_assert(strstr(err, field) != NULL, "error \"%s\" does not name %s", err, field);
    cr_assert(strncmp(err, "ipcring descriptor: ", 20) == 0, "error \"%s\"", err);
    cr_assert(memcmp(&d, &zero, sizeof(d)) == 0, "descriptor not cleared on error");
}

Test(ipcring, round_trip)
{
    struct wk_ipcring_desc d = sample(), back;
    unsigned char buf[WK_IPCRING_DESC_BYTES + 8];
    char err[256] = "x";

    cr_assert_eq(wk_ipcring_desc_encode(&d, buf, sizeof(buf)), WK_IPCRING_DESC_BYTES);
    cr_assert_eq(wk_ipcring_desc_decode(buf, WK_IPCRING_DESC_BYTES, &back, err, sizeof(err)), 0);
    cr_assert_str_empty(err);
    cr_assert_eq(back.channels, 20);
    cr_assert_eq(back.slots, 8);
    cr_assert_eq(back.slot_bytes, 1024);
    cr_assert_eq(back.ring_bytes, d.ring_bytes);
    cr_assert(memcmp(back.handle.bytes, d.handle.bytes, 64) == 0);
}

Test(ipcring, edge_shapes_round_trip)
{
    const uint32_t shapes[][3] = {
        {1, 1, 16}, {DX_TREF_MAX_CHANNELS, 1, 16}, {1, 1u << 20, 16}, {3, 64, 65536}};

    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        struct wk_ipcring_desc d = {.channels = shapes[i][0],
                                    .slots = shapes[i][1],
                                    .slot_bytes = shapes[i][2]},
                               back;
        unsigned char buf[WK_IPCRING_DESC_BYTES];

        d.ring_bytes = dx_tref_ring_size(d.channels, d.slots, d.slot_bytes);
        encode(&d, buf);
        cr_assert_eq(wk_ipcring_desc_decode(buf, sizeof(buf), &back, NULL, 0), 0, "shape %zu", i);
        cr_assert_eq(back.channels, d.channels);
        cr_assert_eq(back.slots, d.slots);
        cr_assert_eq(back.slot_bytes, d.slot_bytes);
        cr_assert_eq(back.ring_bytes, d.ring_bytes);
    }
}

Test(ipcring, wire_layout_is_little_endian)
{
    struct wk_ipcring_desc d = sample();
    unsigned char buf[WK_IPCRING_DESC_BYTES];

    encode(&d, buf);
    cr_assert_eq(memcmp(buf, "dxpcring", 8), 0, "magic");
    cr_assert_eq(buf[8], WK_IPCRING_VERSION);
    cr_assert_eq(buf[9] | buf[10] | buf[11], 0);
    cr_assert_eq(buf[12], 20);
    cr_assert_eq(buf[16], 8);
    cr_assert_eq(buf[20], 0x00);
    cr_assert_eq(buf[21], 0x04); /* 1024 */
    cr_assert_eq(buf[24] | (uint64_t)buf[25] << 8 | (uint64_t)buf[26] << 16, d.ring_bytes);
    cr_assert(memcmp(buf + 32, d.handle.bytes, 64) == 0);
}

Test(ipcring, every_field_corrupted)
{
    struct wk_ipcring_desc d = sample();
    unsigned char good[WK_IPCRING_DESC_BYTES], buf[WK_IPCRING_DESC_BYTES];

    encode(&d, good);
    /* magic: each byte */
    for (int i = 0; i < 8; i++) {
        memcpy(buf, good, sizeof(buf));
        buf[i] ^= 0x01;
        expect_reject(buf, sizeof(buf), "magic");
    }
    /* version 0, 2, and a high byte */
    {
        const uint32_t versions[] = {0, 2, 0x01000001u};

        for (int i = 0; i < 3; i++) {
            memcpy(buf, good, sizeof(buf));
            for (int b = 0; b < 4; b++)
                buf[8 + b] = (unsigned char)(versions[i] >> (8 * b));
            expect_reject(buf, sizeof(buf), "version");
        }
    }
    /* channels 0 and one past the most */
    memcpy(buf, good, sizeof(buf));
    memset(buf + 12, 0, 4);
    expect_reject(buf, sizeof(buf), "channels");
    memcpy(buf, good, sizeof(buf));
    buf[12] = (DX_TREF_MAX_CHANNELS + 1) & 0xff;
    buf[13] = (DX_TREF_MAX_CHANNELS + 1) >> 8;
    expect_reject(buf, sizeof(buf), "channels");
    memcpy(buf, good, sizeof(buf));
    buf[15] = 0x80;
    expect_reject(buf, sizeof(buf), "channels");
    /* slots: 0, not a power of two */
    memcpy(buf, good, sizeof(buf));
    memset(buf + 16, 0, 4);
    expect_reject(buf, sizeof(buf), "slots");
    memcpy(buf, good, sizeof(buf));
    buf[16] = 12;
    expect_reject(buf, sizeof(buf), "slots");
    /* slot_bytes: 0, 8, not a multiple of 16 */
    {
        const uint32_t bad[] = {0, 8, 1000, 1025, 0xfffffff1u};

        for (int i = 0; i < 5; i++) {
            memcpy(buf, good, sizeof(buf));
            for (int b = 0; b < 4; b++)
                buf[20 + b] = (unsigned char)(bad[i] >> (8 * b));
            expect_reject(buf, sizeof(buf), "slot_bytes");
        }
    }
    /* ring_bytes: one more, one less, 0, a high bit */
    {
        const uint64_t bad[] = {d.ring_bytes + 1, d.ring_bytes - 1, 0, d.ring_bytes | 1ull << 63};

        for (int i = 0; i < 4; i++) {
            memcpy(buf, good, sizeof(buf));
            for (int b = 0; b < 8; b++)
                buf[24 + b] = (unsigned char)(bad[i] >> (8 * b));
            expect_reject(buf, sizeof(buf), "ring_bytes");
        }
    }
    /* a shape consistent with itself but another than the ring's */
    memcpy(buf, good, sizeof(buf));
    buf[16] = 16;
    expect_reject(buf, sizeof(buf), "ring_bytes");
}

Test(ipcring, handle_bytes_are_opaque)
{
    struct wk_ipcring_desc d = sample(), back;
    unsigned char buf[WK_IPCRING_DESC_BYTES];

    memset(d.handle.bytes, 0xff, 64);
    encode(&d, buf);
    cr_assert_eq(wk_ipcring_desc_decode(buf, sizeof(buf), &back, NULL, 0), 0);
    cr_assert(memcmp(back.handle.bytes, d.handle.bytes, 64) == 0);
}

Test(ipcring, truncated_and_long_buffers)
{
    struct wk_ipcring_desc d = sample();
    unsigned char buf[WK_IPCRING_DESC_BYTES + 16];

    memset(buf, 0, sizeof(buf));
    encode(&d, buf);
    for (size_t len = 0; len < WK_IPCRING_DESC_BYTES; len++)
        expect_reject(buf, len, "truncated");
    expect_reject(buf, WK_IPCRING_DESC_BYTES + 1, "trailing bytes");
    expect_reject(buf, sizeof(buf), "trailing bytes");
    expect_reject(NULL, WK_IPCRING_DESC_BYTES, "no buffer");
}

Test(ipcring, error_buffer_is_bounded)
{
    unsigned char buf[WK_IPCRING_DESC_BYTES] = {0};
    struct wk_ipcring_desc d;
    char err[24];

    memset(err, 'x', sizeof(err));
    cr_assert_eq(wk_ipcring_desc_decode(buf, sizeof(buf), &d, err, 8), -EPROTO);
    cr_assert_eq(strlen(err), 7);
    cr_assert_eq(err[8], 'x', "wrote past errlen");
    cr_assert_eq(wk_ipcring_desc_decode(buf, sizeof(buf), &d, NULL, 0), -EPROTO);
    cr_assert_eq(wk_ipcring_desc_decode(buf, sizeof(buf), NULL, NULL, 0), -EINVAL);
}

/* splitmix64 noise, with the magic and version right half of the time: no
 * random descriptor is taken unless every field is consistent */
Test(ipcring, random_bytes_never_accepted_inconsistent)
{
    uint64_t s = 12345;

    for (int iter = 0; iter < 100000; iter++) {
        unsigned char buf[WK_IPCRING_DESC_BYTES];
        struct wk_ipcring_desc d;

        for (size_t i = 0; i < sizeof(buf); i += 8) {
            uint64_t z = (s += 0x9e3779b97f4a7c15ull);
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
            z ^= z >> 31;
            memcpy(buf + i, &z, 8);
        }
        if (iter & 1) {
            memcpy(buf, "dxpcring", 8);
            memset(buf + 8, 0, 4);
            buf[8] = WK_IPCRING_VERSION;
        }
        if (wk_ipcring_desc_decode(buf, sizeof(buf), &d, NULL, 0) == 0) {
            cr_assert_neq(dx_tref_ring_size(d.channels, d.slots, d.slot_bytes), 0);
            cr_assert_eq(dx_tref_ring_size(d.channels, d.slots, d.slot_bytes), d.ring_bytes);
        }
    }
}

Test(ipcring, encode_refuses_bad_shapes_and_short_buffers)
{
    struct wk_ipcring_desc d = sample();
    unsigned char buf[WK_IPCRING_DESC_BYTES];

    cr_assert_eq(wk_ipcring_desc_encode(&d, buf, sizeof(buf) - 1), -ENOBUFS);
    d.slots = 3;
    cr_assert_eq(wk_ipcring_desc_encode(&d, buf, sizeof(buf)), -EINVAL);
    d = sample();
    d.ring_bytes++;
    cr_assert_eq(wk_ipcring_desc_encode(&d, buf, sizeof(buf)), -EINVAL);
    cr_assert_eq(wk_ipcring_desc_encode(NULL, buf, sizeof(buf)), -EINVAL);
}

Test(ipcring, import_and_launch_check_arguments_without_a_gpu)
{
    struct wk_ipcring_desc d = sample();
    wk_ipcring_t *r = (wk_ipcring_t *)0x1;

    /* a shape that does not match its ring_bytes is refused before CUDA */
    d.ring_bytes--;
    cr_assert_eq(wk_ipcring_import((wk_cuda_t *)0x1, &d, &r), -EPROTO);
    cr_assert_null(r);
    r = (wk_ipcring_t *)0x1;
    cr_assert_eq(wk_ipcring_create((wk_cuda_t *)0x1, 20, 6, 1024, &r), -EINVAL);
    cr_assert_null(r);
    cr_assert_eq(wk_ipcring_launch_send(NULL, NULL, NULL, 512, 0, 0, 0, 1, 0), -EINVAL);
    cr_assert_eq(wk_ipcring_launch_recv(NULL, NULL, NULL, 512, 0, 0, 0, 1, 0, 0), -EINVAL);
    cr_assert_eq(wk_ipcring_ptr(NULL), 0);
    cr_assert_eq(wk_ipcring_channels(NULL), 0);
    wk_ipcring_destroy(NULL);
}
