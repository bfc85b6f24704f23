/* Frame codec shared by the firmware and its host tests: CRC-32C, COBS, frame encode/decode.
 * No malloc, no floats; every buffer is the caller's. See ../PROTOCOL.md. */
#ifndef FW_CODEC_H
#define FW_CODEC_H

#include <stddef.h>
#include <stdint.h>

#define FW_HEADER_LEN 4u
#define FW_CRC_LEN 4u
#define FW_MAX_PAYLOAD 640u
#define FW_MAX_RAW (FW_HEADER_LEN + FW_MAX_PAYLOAD + FW_CRC_LEN)
#define FW_MAX_ENCODED (FW_MAX_RAW + FW_MAX_RAW / 254u + 2u)

enum fw_decode_status {
    FW_DECODE_OK = 0,
    FW_DECODE_FRAMING = 1, /* COBS invalid, too short or too long */
    FW_DECODE_CRC = 2,
};

uint32_t fw_crc32c(const uint8_t *data, size_t len, uint32_t crc);

/* Encodes header + payload + CRC as COBS and appends the 0x00 delimiter.
 * Returns the number of bytes written, or 0 if `cap` is too small or the payload too long. */
size_t fw_frame_encode(uint8_t version, uint8_t type, uint16_t seq, const uint8_t *payload, size_t len,
                       uint8_t *out, size_t cap);

/* Decodes one COBS block (without its delimiter) into `raw` (FW_MAX_RAW bytes) and checks the CRC.
 * On success the payload is raw[FW_HEADER_LEN .. FW_HEADER_LEN + *payload_len). */
int fw_frame_decode(const uint8_t *block, size_t n, uint8_t *raw, uint8_t *version, uint8_t *type,
                    uint16_t *seq, size_t *payload_len);

/* Little-endian field access, alignment-safe. */
static inline void fw_put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void fw_put_u32(uint8_t *p, uint32_t v) { fw_put_u16(p, (uint16_t)v); fw_put_u16(p + 2, (uint16_t)(v >> 16)); }
static inline void fw_put_u64(uint8_t *p, uint64_t v) { fw_put_u32(p, (uint32_t)v); fw_put_u32(p + 4, (uint32_t)(v >> 32)); }
static inline uint16_t fw_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t fw_get_u32(const uint8_t *p) { return (uint32_t)fw_get_u16(p) | ((uint32_t)fw_get_u16(p + 2) << 16); }

#endif
