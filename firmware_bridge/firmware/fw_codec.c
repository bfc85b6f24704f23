#include "fw_codec.h"

/* CRC-32C (Castagnoli), reflected poly 0x82F63B78; check("123456789") = 0xE3069283.
 * The 1 KiB table lives in flash on a microcontroller; computed once here for brevity. */
static uint32_t crc_table[256];
static int crc_table_ready;

static void crc_init(void) {
    for (uint32_t b = 0; b < 256u; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[b] = c;
    }
    crc_table_ready = 1;
}

uint32_t fw_crc32c(const uint8_t *data, size_t len, uint32_t crc) {
    if (!crc_table_ready) crc_init();
    crc = ~crc;
    for (size_t i = 0; i < len; i++) crc = crc_table[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
    return ~crc;
}

/* Streaming COBS encoder: no intermediate raw buffer, so encoding needs no extra RAM. */
typedef struct {
    uint8_t *out;
    size_t cap, o, code_idx;
    uint8_t code;
    int block_open, overflow;
} cobs_enc_t;

static void enc_open(cobs_enc_t *e) {
    if (e->o >= e->cap) { e->overflow = 1; return; }
    e->code_idx = e->o++;
    e->code = 1;
    e->block_open = 1;
}

static void enc_byte(cobs_enc_t *e, uint8_t b) {
    if (!e->block_open) enc_open(e);
    if (e->overflow) return;
    if (b == 0) {
        e->out[e->code_idx] = e->code;
        enc_open(e);
        return;
    }
    if (e->o >= e->cap) { e->overflow = 1; return; }
    e->out[e->o++] = b;
    if (++e->code == 0xFFu) { /* a full 254-byte block: close it, open the next only if data follows */
        e->out[e->code_idx] = e->code;
        e->block_open = 0;
    }
}

static void enc_bytes(cobs_enc_t *e, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) enc_byte(e, p[i]);
}

size_t fw_frame_encode(uint8_t version, uint8_t type, uint16_t seq, const uint8_t *payload, size_t len,
                       uint8_t *out, size_t cap) {
    if (len > FW_MAX_PAYLOAD) return 0;
    uint8_t head[FW_HEADER_LEN] = {version, type, 0, 0};
    fw_put_u16(head + 2, seq);
    uint32_t crc = fw_crc32c(head, sizeof head, 0);
    crc = fw_crc32c(payload, len, crc);
    uint8_t tail[FW_CRC_LEN];
    fw_put_u32(tail, crc);

    cobs_enc_t e = {out, cap, 0, 0, 0, 0, 0};
    enc_open(&e);
    enc_bytes(&e, head, sizeof head);
    enc_bytes(&e, payload, len);
    enc_bytes(&e, tail, sizeof tail);
    if (e.block_open && !e.overflow) e.out[e.code_idx] = e.code;
    if (e.overflow || e.o >= cap) return 0;
    out[e.o++] = 0;
    return e.o;
}

int fw_frame_decode(const uint8_t *block, size_t n, uint8_t *raw, uint8_t *version, uint8_t *type,
                    uint16_t *seq, size_t *payload_len) {
    if (n == 0 || n > FW_MAX_ENCODED) return FW_DECODE_FRAMING;
    size_t i = 0, o = 0;
    while (i < n) {
        uint8_t code = block[i++];
        if (code == 0) return FW_DECODE_FRAMING;
        for (uint8_t k = 1; k < code; k++) {
            if (i >= n || block[i] == 0 || o >= FW_MAX_RAW) return FW_DECODE_FRAMING;
            raw[o++] = block[i++];
        }
        if (code != 0xFFu && i < n) {
            if (o >= FW_MAX_RAW) return FW_DECODE_FRAMING;
            raw[o++] = 0;
        }
    }
    if (o < FW_HEADER_LEN + FW_CRC_LEN) return FW_DECODE_FRAMING;
    size_t body = o - FW_CRC_LEN;
    if (fw_crc32c(raw, body, 0) != fw_get_u32(raw + body)) return FW_DECODE_CRC;
    *version = raw[0];
    *type = raw[1];
    *seq = fw_get_u16(raw + 2);
    *payload_len = body - FW_HEADER_LEN;
    return FW_DECODE_OK;
}
