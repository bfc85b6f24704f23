/* Firmware reference: protocol handling and the watchdog state machine of a motor controller.
 *
 * Written for a microcontroller: one statically allocated fw_t, fixed buffers, integer math only.
 * fw_rx_bytes() may run in the UART/CAN receive interrupt; fw_tick() runs in the control-loop
 * interrupt. The host emulator (../emulator.py) drives exactly this code through ctypes. */
#ifndef FW_CORE_H
#define FW_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "fw_codec.h"

#define FW_PROTO_MAJOR 1u
#define FW_PROTO_MINOR 0u
#define FW_MAX_JOINTS 16u
#define FW_NAME_LEN 16u
#define FW_TX_BUF 4096u
#define FW_EVENT_CAP 32u

enum fw_msg {
    FW_MSG_HELLO = 0x01, FW_MSG_CAPABILITIES = 0x02, FW_MSG_ARM = 0x03, FW_MSG_DISARM = 0x04,
    FW_MSG_SETPOINT = 0x05, FW_MSG_STATE = 0x06, FW_MSG_HEARTBEAT = 0x07, FW_MSG_STOP = 0x08,
    FW_MSG_FAULT = 0x09, FW_MSG_ACK = 0x0A, FW_MSG_NACK = 0x0B,
};
enum fw_mode { FW_MODE_DISARMED = 0, FW_MODE_ARMED = 1, FW_MODE_STOPPING = 2, FW_MODE_TRIPPED = 3 };
enum fw_fault {
    FW_FAULT_HEARTBEAT_TIMEOUT = 0x0001, FW_FAULT_LINK_ERRORS = 0x0002, FW_FAULT_HOST_STOP_CAT0 = 0x0004,
    FW_FAULT_HOST_STOP_CAT1 = 0x0008, FW_FAULT_INJECTED = 0x0010, FW_FAULT_SETPOINT_CLAMPED = 0x0100,
};
enum fw_nack {
    FW_NACK_NOT_ARMED = 1, FW_NACK_BAD_LENGTH = 2, FW_NACK_BAD_JOINT_COUNT = 3, FW_NACK_BUSY = 4,
    FW_NACK_BAD_VERSION = 5, FW_NACK_BAD_ARGUMENT = 6, FW_NACK_UNKNOWN_TYPE = 7,
};
enum fw_event_kind {
    FW_EV_ARMED = 1, FW_EV_DISARMED = 2, FW_EV_STOP_CAT0 = 3, FW_EV_STOP_CAT1 = 4, FW_EV_TORQUE_OFF = 5,
    FW_EV_HEARTBEAT_TIMEOUT = 6, FW_EV_LINK_ERRORS = 7, FW_EV_HELLO = 8,
};
enum fw_stat {
    FW_STAT_RX_FRAMES, FW_STAT_RX_CRC_ERRORS, FW_STAT_RX_FRAMING_ERRORS, FW_STAT_RX_BAD_MESSAGES,
    FW_STAT_RX_DUPLICATES, FW_STAT_RX_GAPS, FW_STAT_TX_FRAMES, FW_STAT_TX_OVERFLOWS, FW_STAT_EVENTS_LOST,
    FW_STAT_COUNT,
};

typedef struct {
    char name[FW_NAME_LEN];
    int32_t pos_min, pos_max; /* urad */
    int32_t vel_max;          /* urad/s */
    int32_t eff_max;          /* mN*m */
    uint32_t kp_default, kd_default; /* 1e-4 SI */
} fw_joint_cfg_t;

typedef struct {
    int32_t pos, vel, eff; /* urad, urad/s, mN*m */
    uint32_t kp, kd;       /* 1e-4 SI */
} fw_cmd_t;

typedef struct {
    uint64_t t_us;
    uint8_t kind, arg;
    uint16_t faults;
} fw_event_t;

typedef struct {
    /* configuration */
    uint8_t n_joints, proto_major, proto_minor, link_err_limit;
    uint32_t fw_version, hb_timeout_us, ramp_us, state_period_us;
    fw_joint_cfg_t joint[FW_MAX_JOINTS];
    /* state machine */
    uint8_t mode, torque_on, have_rx_seq, consecutive_errors;
    uint16_t faults, tx_seq, last_rx_seq, last_setpoint_seq;
    uint64_t now_us, last_hb_us, last_state_us, ramp_start_us;
    fw_cmd_t cmd[FW_MAX_JOINTS];
    int32_t ramp_p0[FW_MAX_JOINTS], ramp_v0[FW_MAX_JOINTS];
    int32_t meas_pos[FW_MAX_JOINTS], meas_vel[FW_MAX_JOINTS], meas_eff[FW_MAX_JOINTS];
    /* receive: encoded bytes up to the delimiter, and the decoded frame */
    uint8_t rx_buf[FW_MAX_ENCODED];
    uint16_t rx_len;
    uint8_t rx_overflow;
    uint8_t rx_raw[FW_MAX_RAW];
    /* transmit: whole frames appended, drained by the UART/CAN driver */
    uint8_t tx_payload[FW_MAX_PAYLOAD];
    uint8_t tx_buf[FW_TX_BUF];
    uint32_t tx_len;
    fw_event_t events[FW_EVENT_CAP];
    uint8_t ev_head, ev_count;
    uint32_t stats[FW_STAT_COUNT];
} fw_t;

size_t fw_sizeof(void);
void fw_init(fw_t *fw, uint8_t n_joints, uint32_t hb_timeout_ms, uint32_t ramp_ms, uint32_t state_rate_hz,
             uint8_t link_err_limit, uint32_t fw_version);
void fw_set_protocol(fw_t *fw, uint8_t major, uint8_t minor); /* tests: pretend to be another version */
int fw_set_joint(fw_t *fw, uint8_t j, const char *name, int32_t pos_min, int32_t pos_max, int32_t vel_max,
                 int32_t eff_max, uint32_t kp_default, uint32_t kd_default);

void fw_rx_bytes(fw_t *fw, const uint8_t *data, size_t n, uint64_t now_us);
void fw_tick(fw_t *fw, uint64_t now_us);
void fw_inject_fault(fw_t *fw, uint8_t category, uint64_t now_us);

/* measured: n_joints x (pos, vel, eff); commands: n_joints x (pos, vel, eff, kp, kd) as int32.
 * fw_get_commands returns 1 while torque is on. */
void fw_set_measured(fw_t *fw, const int32_t *measured);
int fw_get_commands(const fw_t *fw, int32_t *out);

size_t fw_tx_take(fw_t *fw, uint8_t *out, size_t cap);
int fw_pop_event(fw_t *fw, uint64_t *t_us, uint8_t *kind, uint8_t *arg, uint16_t *faults);
uint8_t fw_mode(const fw_t *fw);
uint16_t fw_faults(const fw_t *fw);
uint32_t fw_stat(const fw_t *fw, int which);

#endif
