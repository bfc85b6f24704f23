/* Firmware reference: protocol handling and the safety state machine of a motor controller.
 *
 * Written for a microcontroller: one statically allocated fw_t, fixed buffers, integer math only.
 * The host emulator (../emulator.py) drives exactly this code through ctypes.
 *
 * Interrupt model (the code is written as if this were true; see ../PROTOCOL.md "Firmware reference"):
 *   fw_rx_bytes()  runs in the UART/CAN receive interrupt;
 *   fw_tick()      runs in the control-loop timer interrupt, which may preempt the RX interrupt
 *                  and be preempted by it;
 *   fw_tx_take(), fw_pop_event(), fw_set_enable(), fw_set_measured(), fw_get_commands() run from the
 *                  main loop or other interrupts.
 * Everything both interrupts touch is changed only between FW_ENTER_CRITICAL() and FW_EXIT_CRITICAL().
 * A port defines them (e.g. save PRIMASK + __disable_irq() / restore PRIMASK on Cortex-M) in a header
 * named by -DFW_PORT_HEADER="\"port.h\""; they must also be compiler barriers. They are never nested.
 * The host build defines them as no-ops (one thread). test_fw.c defines them, plus FW_PREEMPT_POINT(),
 * to inject a timer interrupt at every point where one could fire, and checks nothing is corrupted.
 * Only the RX interrupt touches rx_buf/rx_len/rx_raw, so frame reassembly and CRC checking run with
 * interrupts enabled; only applying a decoded frame is a critical section. */
#ifndef FW_CORE_H
#define FW_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "fw_codec.h"

#ifdef FW_PORT_HEADER
#include FW_PORT_HEADER
#endif
#ifndef FW_ENTER_CRITICAL
#define FW_ENTER_CRITICAL() ((void)0)
#define FW_EXIT_CRITICAL() ((void)0)
#endif
#ifndef FW_PREEMPT_POINT
#define FW_PREEMPT_POINT(fw) ((void)(fw)) /* test hook: an interrupt may fire here */
#endif

#define FW_PROTO_MAJOR 1u
#define FW_PROTO_MINOR 2u
#define FW_MAX_JOINTS 16u
#define FW_NAME_LEN 16u
#define FW_TX_BUF 4096u
#define FW_EVENT_CAP 32u
#define FW_DEFAULT_SEQ_WINDOW 256u
#define FW_DEFAULT_ERR_LEAK_PER_S 10u
#define FW_MAX_RAMP_MS 60000u /* category-1 ramps are capped at one minute */
/* 1.2: CLEAR_FAULTS and ARM apply only within the first 32768 sequence numbers after the session's HELLO.
 * The u16 window comes round again after 65536; with seq_window <= 32768 no captured frame of the session
 * can then be "new" again while the session still arms. A host says HELLO again before that (Link.needs_hello). */
#define FW_SESSION_ARM_SPAN 0x8000u

enum fw_msg {
    FW_MSG_HELLO = 0x01, FW_MSG_CAPABILITIES = 0x02, FW_MSG_ARM = 0x03, FW_MSG_DISARM = 0x04,
    FW_MSG_SETPOINT = 0x05, FW_MSG_STATE = 0x06, FW_MSG_HEARTBEAT = 0x07, FW_MSG_STOP = 0x08,
    FW_MSG_FAULT = 0x09, FW_MSG_ACK = 0x0A, FW_MSG_NACK = 0x0B,
    /* protocol 1.1 */
    FW_MSG_CLEAR_FAULTS = 0x0C, FW_MSG_KEEPALIVE = 0x0D, FW_MSG_SAFETY_CONFIG = 0x0E,
    /* protocol 1.2 */
    FW_MSG_SESSION = 0x0F,
};
enum fw_mode { FW_MODE_DISARMED = 0, FW_MODE_ARMED = 1, FW_MODE_STOPPING = 2, FW_MODE_TRIPPED = 3 };
enum fw_fault {
    FW_FAULT_HEARTBEAT_TIMEOUT = 0x0001, FW_FAULT_LINK_ERRORS = 0x0002, FW_FAULT_HOST_STOP_CAT0 = 0x0004,
    FW_FAULT_HOST_STOP_CAT1 = 0x0008, FW_FAULT_INJECTED = 0x0010, FW_FAULT_FOLLOWING_ERROR = 0x0020,
    FW_FAULT_EFFORT_LIMIT = 0x0040, FW_FAULT_ENABLE_LOST = 0x0080,
    FW_FAULT_SETPOINT_CLAMPED = 0x0100, FW_FAULT_GAINS_CLAMPED = 0x0200, /* status bits, not trips */
    FW_FAULT_STOP_ESCALATED = 0x0400, FW_FAULT_SESSION_RESET = 0x0800,
};
#define FW_STATUS_FAULTS (FW_FAULT_SETPOINT_CLAMPED | FW_FAULT_GAINS_CLAMPED)
#define FW_TRIP_FAULTS ((uint16_t)(0xFFFFu & ~(unsigned)FW_STATUS_FAULTS))
enum fw_status { FW_STATUS_ENABLE_INPUT = 0x1, FW_STATUS_STOP_LATCHED = 0x2, FW_STATUS_ENABLE_REQUIRED = 0x4 };
enum fw_nack {
    FW_NACK_NOT_ARMED = 1, FW_NACK_BAD_LENGTH = 2, FW_NACK_BAD_JOINT_COUNT = 3, FW_NACK_BUSY = 4,
    FW_NACK_BAD_VERSION = 5, FW_NACK_BAD_ARGUMENT = 6, FW_NACK_UNKNOWN_TYPE = 7,
    FW_NACK_FAULTS_LATCHED = 8, FW_NACK_ENABLE_OFF = 9, FW_NACK_STALE_SEQ = 10,
    FW_NACK_BAD_SESSION = 11, /* 1.2: CLEAR_FAULTS/ARM without the current session's nonce */
};
enum fw_role { FW_ROLE_JOINT = 0, FW_ROLE_GRIPPER = 1 };
enum fw_event_kind {
    FW_EV_ARMED = 1, FW_EV_DISARMED = 2, FW_EV_STOP_CAT0 = 3, FW_EV_STOP_CAT1 = 4, FW_EV_TORQUE_OFF = 5,
    FW_EV_HEARTBEAT_TIMEOUT = 6, FW_EV_LINK_ERRORS = 7, FW_EV_HELLO = 8, FW_EV_FAULTS_CLEARED = 9,
    FW_EV_FOLLOWING_ERROR = 10, FW_EV_EFFORT_LIMIT = 11, FW_EV_ENABLE = 12, FW_EV_TIME_BACKSTEP = 13,
    FW_EV_STALE_FRAME = 14, FW_EV_STOP_ESCALATED = 15, FW_EV_SESSION_RESET = 16, FW_EV_STOP_RECEIVED = 17,
    FW_EV_BAD_SESSION = 18, /* arg: the refused message type */
};
enum fw_stat {
    FW_STAT_RX_FRAMES, FW_STAT_RX_CRC_ERRORS, FW_STAT_RX_FRAMING_ERRORS, FW_STAT_RX_BAD_MESSAGES,
    FW_STAT_RX_DUPLICATES, FW_STAT_RX_GAPS, FW_STAT_TX_FRAMES, FW_STAT_TX_OVERFLOWS, FW_STAT_EVENTS_LOST,
    FW_STAT_RX_STALE, FW_STAT_TIME_BACKSTEPS, FW_STAT_RX_BAD_SESSION,
    FW_STAT_COUNT,
};

typedef struct {
    char name[FW_NAME_LEN];
    int32_t pos_min, pos_max; /* urad */
    int32_t vel_max;          /* urad/s */
    int32_t eff_max;          /* mN*m */
    uint32_t kp_default, kd_default; /* 1e-4 SI */
    /* safety (protocol 1.1): category-0 trips and clamps */
    uint8_t role;             /* fw_role */
    int32_t max_pos_err;      /* urad, |commanded - measured| position; 0 = off; joints only */
    int32_t max_vel_err;      /* urad/s; 0 = off; joints only */
    int32_t effort_limit;     /* mN*m, |measured effort|; 0 = off; grippers only */
    uint32_t kp_max, kd_max;  /* host gains are clamped to these */
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
    /* configuration (written before the interrupts are enabled) */
    uint8_t n_joints, proto_major, proto_minor, link_err_limit;
    uint8_t link_loss_cat, link_error_cat, enable_required, enable_cat;
    uint16_t seq_window, err_leak_per_s;
    uint32_t fw_version;
    uint64_t hb_timeout_us, ramp_us, state_period_us; /* 64-bit: any ms value * 1000 fits */
    fw_joint_cfg_t joint[FW_MAX_JOINTS];
    /* shared by both interrupts: written only inside critical sections; volatile where other
     * contexts read them without one (fw_mode(), fw_faults(), the PWM stage reading torque_on) */
    volatile uint8_t mode, torque_on, enable_in;
    volatile uint16_t faults;
    uint8_t stop_latched, have_session, host_minor;
    /* 1.2 session binding: CLEAR_FAULTS and ARM must carry `session`, the nonce announced (SESSION frame)
     * in answer to the last HELLO. 0 = no session (unseeded, or the counter is spent): nothing arms. */
    uint8_t session_seeded;
    uint32_t session, session_count, session_key_add, session_key_xor;
    uint32_t session_span; /* sequence numbers the window advanced since the session's HELLO (saturating) */
    uint16_t tx_seq, last_rx_seq, last_setpoint_seq;
    uint64_t clock_us;       /* monotonic firmware time: sum of the forward steps of the time source */
    uint64_t raw_last_us;    /* last value of the time source */
    uint64_t last_hb_us, last_state_us, ramp_start_us;
    uint32_t err_level;      /* leaky bucket, milli-errors: +1000 per bad frame, leaks err_leak_per_s/s */
    uint32_t err_leak_rem;
    fw_cmd_t cmd[FW_MAX_JOINTS];
    int32_t ramp_p0[FW_MAX_JOINTS], ramp_v0[FW_MAX_JOINTS];
    int32_t meas_pos[FW_MAX_JOINTS], meas_vel[FW_MAX_JOINTS], meas_eff[FW_MAX_JOINTS];
    /* receive: touched by the RX interrupt only */
    uint8_t rx_buf[FW_MAX_ENCODED];
    uint16_t rx_len;
    uint8_t rx_overflow;
    uint8_t rx_raw[FW_MAX_RAW];
    /* transmit: whole frames appended inside critical sections, drained by fw_tx_take */
    uint8_t tx_payload[FW_MAX_PAYLOAD];
    uint8_t tx_buf[FW_TX_BUF];
    volatile uint32_t tx_len;
    fw_event_t events[FW_EVENT_CAP];
    volatile uint8_t ev_head, ev_count;
    uint32_t stats[FW_STAT_COUNT];
} fw_t;

size_t fw_sizeof(void);
void fw_init(fw_t *fw, uint8_t n_joints, uint32_t hb_timeout_ms, uint32_t ramp_ms, uint32_t state_rate_hz,
             uint8_t link_err_limit, uint32_t fw_version);
void fw_set_protocol(fw_t *fw, uint8_t major, uint8_t minor); /* tests: pretend to be another version */
/* `name`: NULL, a C string, or a char[FW_NAME_LEN] without a terminator; at most FW_NAME_LEN bytes are read. */
int fw_set_joint(fw_t *fw, uint8_t j, const char *name, int32_t pos_min, int32_t pos_max, int32_t vel_max,
                 int32_t eff_max, uint32_t kp_default, uint32_t kd_default);
/* Safety configuration (1.1). Categories are 0 or 1; seq_window 1..32768; returns -1 on a bad value.
 * Defaults after fw_init: link loss 1, link errors 0, no enable input, window 256, leak 10 errors/s. */
int fw_set_safety(fw_t *fw, uint8_t link_loss_cat, uint8_t link_error_cat, uint8_t enable_required,
                  uint8_t enable_cat, uint16_t seq_window, uint16_t err_leak_per_s);
/* Session nonces (1.2). The port calls this once at boot, before enabling the interrupts, with 64 bits that
 * differ at every boot; until it does, HELLO starts no armable session (CLEAR_FAULTS/ARM are NACKed
 * BAD_SESSION): a port that forgets it fails closed. Each HELLO then gets nonce = P_key(counter), a keyed
 * bijection of a per-boot counter: no nonce repeats within one boot (until 2^32 - 1 HELLOs, after which no
 * new session is armable), and a new boot's key makes the old boot's nonces useless.
 * What a real MCU passes: 64 bits from its hardware RNG (STM32 RNG, nRF RNG, RP2040 ROSC, SAM TRNG); without
 * one, a hash of its unique ID and a boot counter kept in flash, incremented and written back BEFORE this
 * call (so a reset during boot cannot reuse a counter value). The host reference: secrets.randbits(64)
 * (firmware.py). Calling it again reseeds and ends the current session. */
void fw_seed_sessions(fw_t *fw, uint64_t boot_entropy);
uint32_t fw_session(const fw_t *fw); /* the current session nonce, 0 if none (tests, diagnostics) */
/* Defaults after fw_set_joint: role joint, no following-error or effort limit, kp/kd max = 4x default. */
int fw_set_joint_safety(fw_t *fw, uint8_t j, uint8_t role, int32_t max_pos_err, int32_t max_vel_err,
                        int32_t effort_limit, uint32_t kp_max, uint32_t kd_max);

void fw_rx_bytes(fw_t *fw, const uint8_t *data, size_t n, uint64_t now_us);
void fw_tick(fw_t *fw, uint64_t now_us);
void fw_inject_fault(fw_t *fw, uint8_t category, uint64_t now_us);
void fw_set_enable(fw_t *fw, uint8_t asserted, uint64_t now_us); /* the hardware enable input changed */

/* measured: n_joints x (pos, vel, eff); commands: n_joints x (pos, vel, eff, kp, kd) as int32.
 * fw_get_commands returns 1 while torque is on. */
void fw_set_measured(fw_t *fw, const int32_t *measured);
int fw_get_commands(const fw_t *fw, int32_t *out);

/* Up to `cap` bytes of pending output (frames may be split across calls; the stream stays intact). */
size_t fw_tx_take(fw_t *fw, uint8_t *out, size_t cap);
int fw_pop_event(fw_t *fw, uint64_t *t_us, uint8_t *kind, uint8_t *arg, uint16_t *faults);
uint8_t fw_mode(const fw_t *fw);
uint16_t fw_faults(const fw_t *fw);
uint16_t fw_status(const fw_t *fw);
uint64_t fw_time_us(const fw_t *fw);
uint32_t fw_stat(const fw_t *fw, int which);

#endif
