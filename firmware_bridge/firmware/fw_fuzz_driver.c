/* Hostile-input driver for the firmware reference, built with -fsanitize=address,undefined by
 * tests/firmware_bridge/test_fb_firmware_c_hostile.py (or `make fuzz_driver`).
 *
 * Why a separate process and not the ctypes library: the sanitizer runtimes must be loaded first, and a
 * report must end the run where the bug is (halt_on_error), not take the test process down with it.
 *
 * Commands arrive on stdin, little-endian, one after another:
 *   'I' n_joints:u8 seq_window:u16 link_loss_cat:u8 entropy:u64 pos_min:i32 pos_max:i32 vel_max:i32
 *       eff_max:i32 kp_default:u32 kd_default:u32       fw_init + every joint + fw_set_safety + seed
 *   'R' now_us:u64 len:u32 bytes[len]                    fw_rx_bytes, fed in chunks of at most CHUNK
 *   'G' now_us:u64 len:u32 byte:u8                       fw_rx_bytes of `len` copies of `byte` (a flood
 *                                                        without pushing megabytes through the pipe)
 *   'T' now_us:u64                                       fw_tick
 *   'M' (pos:i32 vel:i32 eff:i32) x n_joints             fw_set_measured
 *   'J' joint:u8 len:u8 name[len]                        fw_set_joint with a name of exactly `len` bytes
 *                                                        and no NUL (a char[16] field copied as is)
 *   'X'                                                  sanitizer control: a heap-buffer-overflow read
 *   'U'                                                  sanitizer control: signed integer overflow
 *   'Q'                                                  exit 0
 * Every command but 'Q' is answered with one record (see reply()): the state the plant would see
 * (torque_on, commands), mode, faults, session, counters, the events, the peak RSS, and every byte
 * the firmware transmitted. Memory stays bounded by construction: fixed buffers, no input is kept. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "fw_core.h"

#define CHUNK 4096u

static fw_t fw; /* statically allocated, as on the microcontroller */
static uint8_t chunk[CHUNK];
static uint8_t out[64u * 1024u];
static size_t out_len;

static void die(const char *why) {
    fprintf(stderr, "fw_fuzz_driver: %s\n", why);
    exit(2);
}

static void read_exact(void *buf, size_t n) {
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t got = read(0, p, n);
        if (got <= 0) die("stdin closed in the middle of a command");
        p += got;
        n -= (size_t)got;
    }
}

static uint8_t rd_u8(void) { uint8_t v; read_exact(&v, 1); return v; }
static uint16_t rd_u16(void) { uint8_t b[2]; read_exact(b, 2); return fw_get_u16(b); }
static uint32_t rd_u32(void) { uint8_t b[4]; read_exact(b, 4); return fw_get_u32(b); }
static uint64_t rd_u64(void) { uint64_t lo = rd_u32(); return lo | ((uint64_t)rd_u32() << 32); }

static void put(const void *p, size_t n) {
    if (out_len + n > sizeof out) die("reply buffer too small");
    memcpy(out + out_len, p, n);
    out_len += n;
}
static void put_u8(uint8_t v) { put(&v, 1); }
static void put_u16(uint16_t v) { uint8_t b[2]; fw_put_u16(b, v); put(b, 2); }
static void put_u32(uint32_t v) { uint8_t b[4]; fw_put_u32(b, v); put(b, 4); }

static void write_all(const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w <= 0) die("stdout closed");
        p += w;
        n -= (size_t)w;
    }
}

/* Reply: len:u32, then torque_on:u8 mode:u8 faults:u16 status:u16 n_joints:u8 stop_latched:u8 session:u32
 * last_rx_seq:u16 have_session:u8 0:u8 session_span:u32 stats:u32[FW_STAT_COUNT] commands:i32[5 n] max_rss_kib:u32
 * n_events:u16 (kind:u8 arg:u8 faults:u16) x n_events tx_len:u32 tx[tx_len] */
static void reply(void) {
    int32_t cmd[5u * FW_MAX_JOINTS];
    out_len = 4;
    int on = fw_get_commands(&fw, cmd);
    put_u8((uint8_t)on);
    put_u8(fw_mode(&fw));
    put_u16(fw_faults(&fw));
    put_u16(fw_status(&fw));
    put_u8(fw.n_joints);
    put_u8(fw.stop_latched);
    put_u32(fw_session(&fw));
    put_u16(fw.last_rx_seq);
    put_u8(fw.have_session);
    put_u8(0);
    put_u32(fw.session_span);
    for (int s = 0; s < FW_STAT_COUNT; s++) put_u32(fw_stat(&fw, s));
    for (unsigned i = 0; i < 5u * fw.n_joints; i++) put_u32((uint32_t)cmd[i]);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    put_u32((uint32_t)ru.ru_maxrss);
    size_t at = out_len;
    put_u16(0);
    uint16_t n_events = 0;
    uint64_t t;
    uint8_t kind, arg;
    uint16_t faults;
    while (fw_pop_event(&fw, &t, &kind, &arg, &faults)) {
        put_u8(kind);
        put_u8(arg);
        put_u16(faults);
        n_events++;
    }
    fw_put_u16(out + at, n_events);
    at = out_len;
    put_u32(0);
    size_t n = fw_tx_take(&fw, out + out_len + 0, sizeof out - out_len);
    out_len += n;
    fw_put_u32(out + at, (uint32_t)n);
    fw_put_u32(out, (uint32_t)(out_len - 4));
    write_all(out, out_len);
}

static void cmd_init(void) {
    uint8_t n = rd_u8();
    uint16_t window = rd_u16();
    uint8_t loss_cat = rd_u8();
    uint64_t entropy = rd_u64();
    int32_t pos_min = (int32_t)rd_u32(), pos_max = (int32_t)rd_u32(), vel_max = (int32_t)rd_u32();
    int32_t eff_max = (int32_t)rd_u32();
    uint32_t kp = rd_u32(), kd = rd_u32();
    fw_init(&fw, n, 100u, 200u, 100u, 4u, 0x010000u);
    for (uint8_t j = 0; j < fw.n_joints; j++)
        if (fw_set_joint(&fw, j, "joint", pos_min, pos_max, vel_max, eff_max, kp, kd) != 0) die("fw_set_joint refused");
    if (fw_set_safety(&fw, loss_cat, 0u, 0u, 0u, window, 10u) != 0) die("fw_set_safety refused");
    fw_seed_sessions(&fw, entropy);
}

static void cmd_rx(void) {
    uint64_t now = rd_u64();
    uint32_t len = rd_u32();
    while (len > 0) {
        uint32_t k = len < CHUNK ? len : CHUNK;
        read_exact(chunk, k);
        fw_rx_bytes(&fw, chunk, k, now);
        len -= k;
    }
}

static void cmd_flood(void) {
    uint64_t now = rd_u64();
    uint32_t len = rd_u32();
    memset(chunk, rd_u8(), sizeof chunk);
    while (len > 0) {
        uint32_t k = len < CHUNK ? len : CHUNK;
        fw_rx_bytes(&fw, chunk, k, now);
        len -= k;
    }
}

static void cmd_measured(void) {
    int32_t m[3u * FW_MAX_JOINTS];
    for (unsigned i = 0; i < 3u * fw.n_joints; i++) m[i] = (int32_t)rd_u32();
    fw_set_measured(&fw, m);
}

static void cmd_joint_name(void) {
    uint8_t j = rd_u8(), len = rd_u8();
    char *name = malloc(len ? len : 1u); /* exactly `len` bytes: the sanitizer sees any read past them */
    if (!name) die("out of memory");
    read_exact(name, len);
    const fw_joint_cfg_t *c = &fw.joint[j < FW_MAX_JOINTS ? j : 0];
    fw_set_joint(&fw, j, len ? name : NULL, c->pos_min, c->pos_max, c->vel_max, c->eff_max, c->kp_default,
                 c->kd_default);
    free(name);
}

/* UBSan's object-size check would catch this read first; the control is for ASan's half. */
__attribute__((no_sanitize("undefined"))) static void control_heap_overflow(void) {
    uint8_t *p = calloc(8, 1), v = 0;
    volatile size_t past_end = 8; /* not a constant: the compiler cannot see the read is out of bounds */
    if (!p) die("out of memory");
    memcpy(&v, p + past_end, 1); /* deliberately one past the end */
    free(p);
    fprintf(stderr, "control read %u\n", v);
}

static void control_signed_overflow(void) {
    volatile int32_t big = 0x7FFFFFFF;
    int32_t r = big + 1; /* deliberately undefined */
    fprintf(stderr, "control sum %d\n", r);
}

int main(void) {
    fw_init(&fw, 1u, 100u, 200u, 100u, 4u, 0x010000u);
    for (;;) {
        uint8_t op;
        ssize_t got = read(0, &op, 1);
        if (got == 0) return 0;
        if (got < 0) die("read failed");
        switch (op) {
        case 'I': cmd_init(); break;
        case 'R': cmd_rx(); break;
        case 'G': cmd_flood(); break;
        case 'T': fw_tick(&fw, rd_u64()); break;
        case 'M': cmd_measured(); break;
        case 'J': cmd_joint_name(); break;
        case 'X': control_heap_overflow(); break;
        case 'U': control_signed_overflow(); break;
        case 'Q': return 0;
        default: die("unknown command");
        }
        reply();
    }
}
