/* Host unit tests for the firmware reference: `make test` or `./test_fw ../vectors/frames.json`.
 * Checks the shared vectors byte for byte, then drives the watchdog state machine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fw_core.h"

static int failures, checks;
#define CHECK(cond, ...)                                                              \
    do {                                                                              \
        checks++;                                                                     \
        if (!(cond)) { failures++; printf("FAIL %s:%d: ", __FILE__, __LINE__);       \
                       printf(__VA_ARGS__); printf("\n"); }                          \
    } while (0)

/* ---- minimal reader for frames.json: one object per line, known keys ---------------------- */

static long json_int(const char *obj, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(obj, pat);
    return p ? strtol(p + strlen(pat), NULL, 10) : -1;
}

static size_t json_hex(const char *obj, const char *key, uint8_t *out, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": \"", key);
    const char *p = strstr(obj, pat);
    if (!p) return (size_t)-1;
    p += strlen(pat);
    size_t n = 0;
    while (p[0] != '"' && p[1] && n < cap) {
        unsigned v;
        if (sscanf(p, "%2x", &v) != 1) return (size_t)-1;
        out[n++] = (uint8_t)v;
        p += 2;
    }
    return n;
}

static void test_vectors(const char *path) {
    static char text[1 << 20];
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    if (!f) return;
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;

    static uint8_t payload[FW_MAX_PAYLOAD], frame[FW_MAX_ENCODED + 8], out[FW_MAX_ENCODED + 8], raw[FW_MAX_RAW];
    int frames = 0, rejects = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (strstr(line, "\"crc32c_check\"")) {
            CHECK(strstr(line, "\"crc\": \"e3069283\"") != NULL, "vector file check value is not e3069283");
            continue;
        }
        if (strncmp(line, "{\"name\"", 7) != 0) continue;
        if (strstr(line, "\"block\"")) { /* a reject vector */
            size_t n = json_hex(line, "block", frame, sizeof frame);
            uint8_t v, t; uint16_t s; size_t pl;
            int st = fw_frame_decode(frame, n, raw, &v, &t, &s, &pl);
            CHECK(st == json_int(line, "status"), "reject vector %.40s: status %d", line, st);
            rejects++;
            continue;
        }
        size_t plen = json_hex(line, "payload", payload, sizeof payload);
        size_t flen = json_hex(line, "frame", frame, sizeof frame);
        size_t n = fw_frame_encode((uint8_t)json_int(line, "version"), (uint8_t)json_int(line, "type"),
                                   (uint16_t)json_int(line, "seq"), payload, plen, out, sizeof out);
        CHECK(n == flen && memcmp(out, frame, n) == 0, "encode differs for %.40s", line);
        uint8_t v, t; uint16_t s; size_t pl;
        int st = fw_frame_decode(frame, flen - 1, raw, &v, &t, &s, &pl);
        CHECK(st == FW_DECODE_OK && v == json_int(line, "version") && t == json_int(line, "type") &&
              s == json_int(line, "seq") && pl == plen && memcmp(raw + FW_HEADER_LEN, payload, pl) == 0,
              "decode differs for %.40s (status %d)", line, st);
        frames++;
    }
    CHECK(frames >= 10 && rejects >= 3, "too few vectors read: %d frames, %d rejects", frames, rejects);
}

/* ---- state machine ------------------------------------------------------------------------ */

static fw_t fw; /* static, as on the target */
static uint16_t host_seq;

static void host_send(uint8_t type, const uint8_t *payload, size_t len, uint64_t now) {
    uint8_t buf[FW_MAX_ENCODED];
    size_t n = fw_frame_encode(FW_PROTO_MAJOR, type, host_seq++, payload, len, buf, sizeof buf);
    fw_rx_bytes(&fw, buf, n, now);
}

/* Decodes everything the firmware sent; returns how many frames had type `type` (last one in *payload). */
static int count_tx(uint8_t type, uint8_t *payload) {
    static uint8_t tx[FW_TX_BUF], raw[FW_MAX_RAW];
    size_t n = fw_tx_take(&fw, tx, sizeof tx), start = 0;
    int count = 0;
    for (size_t i = 0; i < n; i++) {
        if (tx[i] != 0) continue;
        uint8_t v, t; uint16_t s; size_t pl;
        if (fw_frame_decode(tx + start, i - start, raw, &v, &t, &s, &pl) == FW_DECODE_OK && t == type) {
            count++;
            if (payload) memcpy(payload, raw + FW_HEADER_LEN, pl);
        }
        start = i + 1;
    }
    return count;
}

static int has_event(uint8_t kind) {
    uint64_t t; uint8_t k, a; uint16_t f;
    int found = 0;
    while (fw_pop_event(&fw, &t, &k, &a, &f)) found |= (k == kind);
    return found;
}

static uint64_t boot_entropy = 0x0123456789ABCDEFu; /* what the port's RNG gave at this "boot" */

/* A firmware that just booted (no session yet). */
static void boot(void) {
    fw_init(&fw, 2, 100, 200, 0, 3, 0x010000);
    fw_set_joint(&fw, 0, "a", -1000000, 1000000, 2000000, 5000, 500000, 20000);
    fw_set_joint(&fw, 1, "b", -1000000, 1000000, 2000000, 5000, 500000, 20000);
    fw_seed_sessions(&fw, boot_entropy++);
    host_seq = 0;
}

static uint8_t session[4]; /* the live session's nonce, as the host read it from SESSION */

/* HELLO; keeps the announced session in `session`; returns how many CAPABILITIES answered it. */
static int hello_session(uint64_t now) {
    static uint8_t tx[FW_TX_BUF], raw[FW_MAX_RAW];
    uint8_t hello[4] = {FW_PROTO_MAJOR, FW_PROTO_MINOR, 0, 0};
    host_send(FW_MSG_HELLO, hello, 4, now);
    size_t n = fw_tx_take(&fw, tx, sizeof tx), start = 0;
    int caps = 0;
    memset(session, 0, sizeof session);
    for (size_t i = 0; i < n; i++) {
        if (tx[i] != 0) continue;
        uint8_t v, t; uint16_t s; size_t pl;
        if (fw_frame_decode(tx + start, i - start, raw, &v, &t, &s, &pl) == FW_DECODE_OK) {
            caps += t == FW_MSG_CAPABILITIES;
            if (t == FW_MSG_SESSION && pl == 8) memcpy(session, raw + FW_HEADER_LEN, 4);
        }
        start = i + 1;
    }
    return caps;
}

static void setup(void) {
    boot();
    CHECK(hello_session(0) == 1, "HELLO not answered with CAPABILITIES");
    CHECK(fw_get_u32(session) == fw_session(&fw) && fw_session(&fw) != 0, "HELLO announced no session");
}

/* The operator's half of arming, in the live session. */
static void send_arm(uint64_t now) { host_send(FW_MSG_ARM, session, 4, now); }
static void send_clear(uint64_t now) { host_send(FW_MSG_CLEAR_FAULTS, session, 4, now); }

static void setpoint(int32_t p0, int32_t p1, uint64_t now) {
    uint8_t sp[4 + 40] = {2, 0, 0, 0};
    fw_put_u32(sp + 4, (uint32_t)p0);
    fw_put_u32(sp + 24, (uint32_t)p1);
    host_send(FW_MSG_SETPOINT, sp, sizeof sp, now);
}

static void test_watchdog(void) {
    setup();
    uint8_t ack[4];
    setpoint(0, 0, 1000);
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_NOT_ARMED, "setpoint before ARM must be refused");
    send_arm(2000);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED && has_event(FW_EV_ARMED), "ARM did not arm");
    setpoint(5000000, -300000, 3000);
    int32_t cmd[10];
    CHECK(fw_get_commands(&fw, cmd) == 1 && cmd[0] == 1000000 && cmd[5] == -300000, "setpoint not clamped/applied");
    CHECK(fw_faults(&fw) & FW_FAULT_SETPOINT_CLAMPED, "clamping not flagged");

    fw_tick(&fw, 3000 + 100000); /* exactly the timeout: still armed */
    CHECK(fw_mode(&fw) == FW_MODE_ARMED, "tripped before the timeout elapsed");
    int32_t meas[6] = {100000, 1000000, 0, 0, -1000000, 0};
    fw_set_measured(&fw, meas);
    fw_tick(&fw, 3000 + 100001);
    CHECK(fw_mode(&fw) == FW_MODE_STOPPING && has_event(FW_EV_HEARTBEAT_TIMEOUT), "no cat-1 stop on heartbeat loss");
    fw_tick(&fw, 3000 + 100001 + 100000); /* half-way through the ramp: half the speed */
    fw_get_commands(&fw, cmd);
    CHECK(cmd[1] == 500000 && cmd[6] == -500000, "ramp velocity %d/%d, expected +-500000", cmd[1], cmd[6]);
    CHECK(cmd[0] == 100000 + 75000, "ramp position %d, expected 175000", cmd[0]);
    send_arm(3000 + 150000);
    CHECK(count_tx(FW_MSG_NACK, ack) >= 1 && ack[3] == FW_NACK_BUSY, "ARM during the ramp must be refused");
    fw_tick(&fw, 3000 + 100001 + 200000);
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED && fw_get_commands(&fw, cmd) == 0 && has_event(FW_EV_TORQUE_OFF),
          "torque not off after the ramp");
    fw_tick(&fw, 10000000);
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED, "re-armed without an explicit ARM");
    setpoint(0, 0, 10000001);
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_NOT_ARMED, "setpoint applied while tripped");
    send_arm(10000002);
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_FAULTS_LATCHED && fw_mode(&fw) == FW_MODE_TRIPPED,
          "ARM must not clear latched faults");
    send_clear(10000003);
    CHECK(fw_mode(&fw) == FW_MODE_DISARMED && fw_faults(&fw) == 0, "CLEAR_FAULTS did not clear the trip");
    send_arm(10000004);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED, "ARM after CLEAR_FAULTS did not arm");
}

static void test_link_errors_cat0(void) {
    setup();
    send_arm(0);
    has_event(0);
    uint8_t garbage[] = {0x05, 0x11, 0x22, 0x33, 0x44, 0x00};
    fw_rx_bytes(&fw, garbage, sizeof garbage, 10);
    fw_rx_bytes(&fw, garbage, sizeof garbage, 20);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED, "tripped before the link-error limit");
    fw_rx_bytes(&fw, garbage, sizeof garbage, 30);
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED && (fw_faults(&fw) & FW_FAULT_LINK_ERRORS), "no cat-0 on link errors");
    CHECK(has_event(FW_EV_STOP_CAT0), "no stop_cat0 event");
    CHECK(count_tx(FW_MSG_FAULT, NULL) == 1, "no FAULT report sent");
    CHECK(fw_stat(&fw, FW_STAT_RX_CRC_ERRORS) + fw_stat(&fw, FW_STAT_RX_FRAMING_ERRORS) == 3, "errors not counted");
}

static void test_duplicates_and_stop(void) {
    setup();
    send_arm(0);
    uint8_t buf[FW_MAX_ENCODED], hb[4] = {1, 0, 0, 0};
    size_t n = fw_frame_encode(FW_PROTO_MAJOR, FW_MSG_HEARTBEAT, host_seq++, hb, 4, buf, sizeof buf);
    count_tx(0, NULL);
    fw_rx_bytes(&fw, buf, n, 10);
    fw_rx_bytes(&fw, buf, n, 20);
    CHECK(count_tx(FW_MSG_ACK, NULL) == 1 && fw_stat(&fw, FW_STAT_RX_DUPLICATES) == 1, "duplicate applied twice");
    uint8_t stop[4] = {0, 0, 0, 0};
    host_send(FW_MSG_STOP, stop, 4, 30);
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED && (fw_faults(&fw) & FW_FAULT_HOST_STOP_CAT0), "STOP 0 not immediate");
    uint8_t bad_version_frame[FW_MAX_ENCODED];
    n = fw_frame_encode(FW_PROTO_MAJOR + 1, FW_MSG_ARM, host_seq++, session, 4, bad_version_frame, sizeof buf);
    fw_rx_bytes(&fw, bad_version_frame, n, 40);
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED, "a frame of another protocol version was applied");
}

/* ---- issue 23: a replayed session start must not re-arm ------------------------------------------
 * A node on the bus captured one session's HELLO, CLEAR_FAULTS and ARM and writes them again, byte for
 * byte, after a category-0 STOP. Control: a live session that uses what the firmware announced arms. */

#define MSG_SESSION 0x0Fu /* the firmware's session announcement (by number: the test also builds against 1.1) */

/* The session the firmware announced in its pending output (4 bytes into nonce; 0 if none was announced). */
static size_t announced_session(uint8_t nonce[4]) {
    static uint8_t tx[FW_TX_BUF], raw[FW_MAX_RAW];
    size_t n = fw_tx_take(&fw, tx, sizeof tx), start = 0, got = 0;
    for (size_t i = 0; i < n; i++) {
        if (tx[i] != 0) continue;
        uint8_t v, t; uint16_t s; size_t pl;
        if (fw_frame_decode(tx + start, i - start, raw, &v, &t, &s, &pl) == FW_DECODE_OK && t == MSG_SESSION && pl >= 4) {
            memcpy(nonce, raw + FW_HEADER_LEN, 4);
            got = 4;
        }
        start = i + 1;
    }
    return got;
}

/* One host frame, encoded into `out` (kept for a replay) and received by the firmware. */
static size_t host_frame(uint8_t *out, uint8_t type, const uint8_t *payload, size_t len, uint64_t now) {
    size_t n = fw_frame_encode(FW_PROTO_MAJOR, type, host_seq++, payload, len, out, FW_MAX_ENCODED);
    fw_rx_bytes(&fw, out, n, now);
    return n;
}

static void test_replayed_session_does_not_rearm(void) {
    static uint8_t hello_f[FW_MAX_ENCODED], clear_f[FW_MAX_ENCODED], arm_f[FW_MAX_ENCODED], live[FW_MAX_ENCODED];
    uint8_t hello[4] = {FW_PROTO_MAJOR, FW_PROTO_MINOR, 0, 0}, stop[4] = {0, 0, 0, 0}, nonce[4] = {0}, nonce2[4] = {0};
    boot();
    size_t nh = host_frame(hello_f, FW_MSG_HELLO, hello, 4, 1000);
    size_t len = announced_session(nonce);
    size_t nc = host_frame(clear_f, FW_MSG_CLEAR_FAULTS, nonce, len, 2000);
    size_t na = host_frame(arm_f, FW_MSG_ARM, nonce, len, 3000);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED, "session 1 did not arm");
    host_send(FW_MSG_STOP, stop, 4, 4000);
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED && (fw_faults(&fw) & FW_FAULT_HOST_STOP_CAT0), "STOP 0 did not trip");
    has_event(0);

    fw_rx_bytes(&fw, hello_f, nh, 5000); /* the capture, byte for byte */
    fw_rx_bytes(&fw, clear_f, nc, 5001);
    fw_rx_bytes(&fw, arm_f, na, 5002);
    int32_t cmd[10];
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED && (fw_faults(&fw) & FW_FAULT_HOST_STOP_CAT0) && !has_event(FW_EV_ARMED) &&
              fw_get_commands(&fw, cmd) == 0,
          "a replayed HELLO + CLEAR_FAULTS + ARM re-armed a tripped firmware (mode %u, faults 0x%04x)",
          (unsigned)fw_mode(&fw), (unsigned)fw_faults(&fw));

    /* control: a live session (a new host process) uses the session the firmware announces to it */
    host_seq = 0x4000;
    host_frame(live, FW_MSG_HELLO, hello, 4, 6000);
    size_t len2 = announced_session(nonce2);
    CHECK(len2 == len && (len == 0 || memcmp(nonce, nonce2, 4) != 0), "two sessions were announced the same nonce");
    host_frame(live, FW_MSG_CLEAR_FAULTS, nonce2, len2, 6001);
    host_frame(live, FW_MSG_ARM, nonce2, len2, 6002);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED && fw_faults(&fw) == 0, "the live session's CLEAR_FAULTS + ARM did not arm");
}

/* 1.2: what binds CLEAR_FAULTS and ARM to a session, one property at a time. */
static void test_session_binding(void) {
    uint8_t ack[4], payload[8];
    setup();
    uint8_t live[4];
    memcpy(live, session, 4);
    host_send(FW_MSG_ARM, NULL, 0, 10); /* the 1.1 form, without a session */
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[2] == FW_MSG_ARM && ack[3] == FW_NACK_BAD_SESSION &&
              fw_mode(&fw) == FW_MODE_DISARMED && has_event(FW_EV_BAD_SESSION),
          "ARM without a session must be refused BAD_SESSION");
    uint8_t wrong[4] = {(uint8_t)(live[0] ^ 1u), live[1], live[2], live[3]};
    host_send(FW_MSG_ARM, wrong, 4, 20);
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_BAD_SESSION && fw_mode(&fw) == FW_MODE_DISARMED,
          "ARM with another session's nonce must be refused");
    host_send(FW_MSG_ARM, live, 3, 30);
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_BAD_LENGTH, "a 3-byte ARM is a bad length");
    CHECK(fw_stat(&fw, FW_STAT_RX_BAD_SESSION) == 2, "bad-session frames not counted");

    /* a new session: the old nonce, even in a fresh frame inside the new window, no longer arms or clears */
    uint8_t stop[4] = {0, 0, 0, 0};
    send_arm(40);
    host_send(FW_MSG_STOP, stop, 4, 50);
    CHECK(hello_session(60) == 1 && memcmp(session, live, 4) != 0, "a new HELLO must announce a new nonce");
    host_send(FW_MSG_CLEAR_FAULTS, live, 4, 70);
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_BAD_SESSION && (fw_faults(&fw) & FW_FAULT_HOST_STOP_CAT0),
          "CLEAR_FAULTS with the previous session's nonce must not clear");
    send_clear(80);
    send_arm(90);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED, "the live session's CLEAR_FAULTS + ARM must arm");

    /* only a well-formed HELLO reopens the window (and it draws a new nonce): a 5-byte HELLO numbered to
     * re-admit the live session's captured CLEAR_FAULTS and ARM lets neither through */
    uint8_t stop0[4] = {0, 0, 0, 0}, bad_hello[5] = {FW_PROTO_MAJOR, FW_PROTO_MINOR, 0, 0, 0};
    static uint8_t cap_clear[FW_MAX_ENCODED], cap_arm[FW_MAX_ENCODED], junk[FW_MAX_ENCODED];
    uint16_t clear_seq = host_seq;
    size_t ncl = host_frame(cap_clear, FW_MSG_CLEAR_FAULTS, session, 4, 91);
    size_t nar = host_frame(cap_arm, FW_MSG_ARM, session, 4, 92);
    host_send(FW_MSG_STOP, stop0, 4, 93);
    count_tx(0, NULL);
    size_t nb = fw_frame_encode(FW_PROTO_MAJOR, FW_MSG_HELLO, (uint16_t)(clear_seq - 1u), bad_hello, 5, junk, sizeof junk);
    fw_rx_bytes(&fw, junk, nb, 94);
    fw_rx_bytes(&fw, cap_clear, ncl, 95);
    fw_rx_bytes(&fw, cap_arm, nar, 96);
    CHECK(fw_mode(&fw) == FW_MODE_TRIPPED && (fw_faults(&fw) & FW_FAULT_HOST_STOP_CAT0),
          "a malformed HELLO reopened the window for the live session's captured CLEAR_FAULTS/ARM");

    /* a session arms only within FW_SESSION_ARM_SPAN sequence numbers of its HELLO: the u16 window can
     * never come round onto its own captured frames while it still arms */
    CHECK(hello_session(97) == 1, "HELLO");
    uint8_t ka[4] = {0, 0, 0, 0};
    for (uint32_t i = 0; i < FW_SESSION_ARM_SPAN - 2u; i++) {
        host_send(FW_MSG_KEEPALIVE, ka, 4, 98);
        if (i % 64u == 0u) count_tx(0, NULL);
    }
    count_tx(0, NULL);
    send_clear(99); /* FW_SESSION_ARM_SPAN - 1 after the HELLO: still this session */
    CHECK(count_tx(FW_MSG_ACK, NULL) == 1 && fw_mode(&fw) == FW_MODE_DISARMED, "CLEAR_FAULTS inside the span refused");
    send_arm(100); /* FW_SESSION_ARM_SPAN after it: the session no longer arms */
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_BAD_SESSION && fw_mode(&fw) == FW_MODE_DISARMED,
          "ARM past the session's span must be refused BAD_SESSION");
    CHECK(hello_session(101) == 1, "HELLO");
    send_arm(102);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED, "a new session must arm again");
    host_send(FW_MSG_DISARM, NULL, 0, 103);

    /* SESSION's layout: nonce, the HELLO's seq, reserved 0; only to hosts announcing minor >= 2 */
    uint8_t hello[4] = {FW_PROTO_MAJOR, 2, 0, 0};
    count_tx(0, NULL);
    uint16_t hello_seq = host_seq;
    host_send(FW_MSG_HELLO, hello, 4, 104);
    CHECK(count_tx(FW_MSG_SESSION, payload) == 1 && fw_get_u32(payload) == fw_session(&fw) &&
              fw_get_u16(payload + 4) == hello_seq && fw_get_u16(payload + 6) == 0,
          "SESSION layout: nonce, hello_seq, reserved");
    hello[1] = 1;
    host_send(FW_MSG_HELLO, hello, 4, 105);
    CHECK(count_tx(FW_MSG_SESSION, NULL) == 0, "a 1.1 host got a SESSION frame it cannot parse");

    /* nonces: all distinct within a boot (a bijection of the counter), and a new boot gives new ones */
    static uint32_t seen[2000];
    for (int boot_no = 0; boot_no < 2; boot_no++) {
        boot();
        for (int i = 0; i < 1000; i++) {
            host_send(FW_MSG_HELLO, hello, 4, (uint64_t)i);
            seen[boot_no * 1000 + i] = fw_session(&fw);
        }
        count_tx(0, NULL); /* drain */
    }
    int repeats = 0;
    for (int i = 0; i < 2000; i++)
        for (int j = i + 1; j < 2000; j++) repeats += seen[i] == seen[j] || seen[i] == 0u;
    CHECK(repeats == 0, "%d session nonces repeated within or across two boots", repeats);

    /* fail closed: a port that never seeds gets no armable session */
    fw_init(&fw, 2, 100, 200, 0, 3, 0x010000);
    fw_set_joint(&fw, 0, "a", -1000000, 1000000, 2000000, 5000, 500000, 20000);
    fw_set_joint(&fw, 1, "b", -1000000, 1000000, 2000000, 5000, 500000, 20000);
    CHECK(hello_session(0) == 1 && fw_session(&fw) == 0 && fw_get_u32(session) == 0, "unseeded: session must be 0");
    send_arm(1);
    CHECK(count_tx(FW_MSG_NACK, ack) == 1 && ack[3] == FW_NACK_BAD_SESSION && fw_mode(&fw) == FW_MODE_DISARMED,
          "an unseeded firmware must not arm, not even with nonce 0");
}

static void test_crc_table(void) {
    /* the static const table must be the bit-by-bit CRC: recompute every single-byte CRC */
    for (uint32_t b = 0; b < 256u; b++) {
        uint32_t c = b ^ 0xFFFFFFFFu;
        for (int k = 0; k < 8; k++) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        uint8_t byte = (uint8_t)b;
        CHECK(fw_crc32c(&byte, 1, 0) == (c ^ 0xFFFFFFFFu), "CRC table entry %u", (unsigned)b);
    }
}

static void test_time_backstep(void) {
    setup();
    send_arm(5000000);
    fw_tick(&fw, 1000000); /* the time source jumped back 4 s: no elapsed time, counted */
    CHECK(fw_mode(&fw) == FW_MODE_ARMED && fw_stat(&fw, FW_STAT_TIME_BACKSTEPS) == 1, "time backstep mishandled");
    fw_tick(&fw, 1000000 + 100000);
    CHECK(fw_mode(&fw) == FW_MODE_ARMED, "tripped before the timeout on the new time base");
    fw_tick(&fw, 1000000 + 100001);
    CHECK(fw_mode(&fw) == FW_MODE_STOPPING, "watchdog lost after a time backstep");
}

/* ---- the interrupt injector ----------------------------------------------------------------------
 * A stream of host frames goes through fw_rx_bytes (the RX interrupt). At every point where an
 * interrupt could fire (FW_PREEMPT_POINT, outside a critical section: every byte boundary, between
 * decoding and applying a frame, inside send() when critical sections are compiled out), one run
 * injects a timer interrupt (fw_tick) there. Every run must produce the same applied commands, the same
 * ACK/NACK frames in the same order, and only intact frames, as the run without an injection. */

static int crit_depth, crit_nested;
static long preempt_count, preempt_target = -1;
static int in_isr, injected;
static uint64_t isr_now;

void fw_test_enter_critical(void) { if (crit_depth) crit_nested++; crit_depth++; }
void fw_test_exit_critical(void) { crit_depth--; }
void fw_test_preempt(const void *p) {
    if (p != &fw || crit_depth > 0 || in_isr) return; /* interrupts masked, or inside the injected one */
    if (preempt_count++ != preempt_target) return;
    in_isr = 1;
    fw_tick(&fw, isr_now);
    in_isr = 0;
    injected++;
}

typedef struct {
    int frames, bad, states, others, seq_breaks;
    uint8_t other_sig[64][6]; /* type, acked seq, acked type, code of each non-STATE frame */
    int32_t cmd[10];
    uint8_t mode;
} run_result_t;

static size_t build_stream(uint8_t *out, size_t cap, uint16_t seq) {
    size_t n = 0;
    uint8_t hb[4] = {1, 0, 0, 0}, sp[4 + 40] = {2, 0, 0, 0};
    for (int i = 0; i < 6; i++) {
        fw_put_u32(sp + 4, (uint32_t)(1000 * (i + 1)));
        fw_put_u32(sp + 24, (uint32_t)(-2000 * (i + 1)));
        n += fw_frame_encode(FW_PROTO_MAJOR, FW_MSG_SETPOINT, seq++, sp, sizeof sp, out + n, cap - n);
        n += fw_frame_encode(FW_PROTO_MAJOR, i % 2 ? FW_MSG_HEARTBEAT : FW_MSG_KEEPALIVE, seq++, hb, 4, out + n, cap - n);
    }
    return n;
}

static run_result_t injector_run(long target) {
    static uint8_t stream[2048], tx[FW_TX_BUF], raw[FW_MAX_RAW];
    run_result_t r;
    memset(&r, 0, sizeof r);
    fw_init(&fw, 2, 100, 200, 1000000, 3, 0x010000); /* STATE every 1 us: each injected tick sends one */
    fw_set_joint(&fw, 0, "a", -1000000, 1000000, 2000000, 5000, 500000, 20000);
    fw_set_joint(&fw, 1, "b", -1000000, 1000000, 2000000, 5000, 500000, 20000);
    fw_seed_sessions(&fw, 42u);
    host_seq = 0;
    preempt_target = -1;
    hello_session(0);
    send_arm(0);
    fw_tx_take(&fw, tx, sizeof tx);
    size_t n = build_stream(stream, sizeof stream, host_seq);
    preempt_count = 0;
    preempt_target = target;
    injected = 0;
    isr_now = 5010; /* the timer read 10 us after the RX interrupt's reading: a STATE is due */
    fw_rx_bytes(&fw, stream, n, 5000);
    preempt_target = -1;
    size_t m = fw_tx_take(&fw, tx, sizeof tx), start = 0;
    int have_seq = 0;
    uint16_t last_seq = 0;
    for (size_t i = 0; i < m; i++) {
        if (tx[i] != 0) continue;
        uint8_t v, t; uint16_t s; size_t pl;
        int st = fw_frame_decode(tx + start, i - start, raw, &v, &t, &s, &pl);
        if (st == FW_DECODE_OK) { /* the firmware numbers its frames consecutively: a gap is a lost frame */
            if (have_seq && s != (uint16_t)(last_seq + 1u)) r.seq_breaks++;
            have_seq = 1;
            last_seq = s;
        }
        if (st != FW_DECODE_OK) r.bad++;
        else if (t == FW_MSG_STATE) r.states++;
        else if (r.others < 64) {
            uint8_t *sig = r.other_sig[r.others++];
            sig[0] = t; sig[1] = raw[4]; sig[2] = raw[5]; sig[3] = raw[6]; sig[4] = raw[7]; sig[5] = 0;
        }
        r.frames++;
        start = i + 1;
    }
    fw_get_commands(&fw, r.cmd);
    r.mode = fw_mode(&fw);
    return r;
}

static int test_interrupt_injector(int quiet) {
    run_result_t ref = injector_run(-1);
    long points = preempt_count;
    CHECK(points > 300, "too few preemption points: %ld", points);
    CHECK(ref.bad == 0 && ref.seq_breaks == 0 && ref.states == 6 && ref.others == 6 && ref.mode == FW_MODE_ARMED,
          "reference run: %d bad, %d states, %d others", ref.bad, ref.states, ref.others);
    int broken = 0;
    for (long k = 0; k < points; k++) {
        run_result_t r = injector_run(k);
        int ok = injected == 1 && r.bad == 0 && r.seq_breaks == 0 && r.states == ref.states + 1 &&
                 r.others == ref.others && memcmp(r.other_sig, ref.other_sig, sizeof r.other_sig) == 0 &&
                 memcmp(r.cmd, ref.cmd, sizeof r.cmd) == 0 && r.mode == ref.mode &&
                 fw_stat(&fw, FW_STAT_RX_FRAMES) == 14 && fw_stat(&fw, FW_STAT_RX_CRC_ERRORS) == 0 &&
                 fw_stat(&fw, FW_STAT_RX_STALE) == 0;
        if (!ok) {
            broken++;
            if (!quiet && broken <= 3)
                printf("injector: interrupt at point %ld: injected %d, %d bad frames, %d states, %d others\n", k,
                       injected, r.bad, r.states, r.others);
        }
    }
    CHECK(crit_nested == 0, "critical sections nested %d times", crit_nested);
    printf("injector: %ld preemption points, %d runs with a corrupted, lost or misapplied frame\n", points, broken);
    return broken;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--injector-only") == 0) { /* the negative control */
        int broken = test_interrupt_injector(1);
        return broken ? 3 : 0;
    }
    uint8_t check[] = "123456789";
    CHECK(fw_crc32c(check, 9, 0) == 0xE3069283u, "CRC-32C check value");
    test_crc_table();
    test_vectors(argc > 1 ? argv[1] : "../vectors/frames.json");
    test_watchdog();
    test_link_errors_cat0();
    test_duplicates_and_stop();
    test_time_backstep();
    test_replayed_session_does_not_rearm();
    test_session_binding();
    CHECK(test_interrupt_injector(0) == 0, "the interrupt injector found broken runs");
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
