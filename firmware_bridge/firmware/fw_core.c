#include "fw_core.h"

#include <string.h>

size_t fw_sizeof(void) { return sizeof(fw_t); }

void fw_init(fw_t *fw, uint8_t n_joints, uint32_t hb_timeout_ms, uint32_t ramp_ms, uint32_t state_rate_hz,
             uint8_t link_err_limit, uint32_t fw_version) {
    memset(fw, 0, sizeof *fw);
    fw->n_joints = n_joints > FW_MAX_JOINTS ? FW_MAX_JOINTS : n_joints;
    fw->proto_major = FW_PROTO_MAJOR;
    fw->proto_minor = FW_PROTO_MINOR;
    fw->hb_timeout_us = hb_timeout_ms * 1000u;
    fw->ramp_us = ramp_ms * 1000u;
    fw->state_period_us = state_rate_hz ? 1000000u / state_rate_hz : 0u;
    fw->link_err_limit = link_err_limit ? link_err_limit : 1u;
    fw->fw_version = fw_version;
    fw->mode = FW_MODE_DISARMED;
}

void fw_set_protocol(fw_t *fw, uint8_t major, uint8_t minor) {
    fw->proto_major = major;
    fw->proto_minor = minor;
}

int fw_set_joint(fw_t *fw, uint8_t j, const char *name, int32_t pos_min, int32_t pos_max, int32_t vel_max,
                 int32_t eff_max, uint32_t kp_default, uint32_t kd_default) {
    if (j >= fw->n_joints || pos_min > pos_max || vel_max < 0 || eff_max < 0) return -1;
    fw_joint_cfg_t *c = &fw->joint[j];
    memset(c->name, 0, FW_NAME_LEN);
    for (size_t i = 0; name && name[i] && i < FW_NAME_LEN; i++) c->name[i] = name[i];
    c->pos_min = pos_min;
    c->pos_max = pos_max;
    c->vel_max = vel_max;
    c->eff_max = eff_max;
    c->kp_default = kp_default;
    c->kd_default = kd_default;
    return 0;
}

/* ---- outputs ---------------------------------------------------------------------------- */

static void emit(fw_t *fw, uint8_t kind, uint8_t arg) {
    if (fw->ev_count == FW_EVENT_CAP) { fw->stats[FW_STAT_EVENTS_LOST]++; return; }
    fw_event_t *e = &fw->events[(fw->ev_head + fw->ev_count) % FW_EVENT_CAP];
    e->t_us = fw->now_us;
    e->kind = kind;
    e->arg = arg;
    e->faults = fw->faults;
    fw->ev_count++;
}

static void send(fw_t *fw, uint8_t type, size_t len) {
    size_t n = fw_frame_encode(fw->proto_major, type, fw->tx_seq, fw->tx_payload, len, fw->tx_buf + fw->tx_len,
                               FW_TX_BUF - fw->tx_len);
    if (n == 0) { fw->stats[FW_STAT_TX_OVERFLOWS]++; return; } /* driver not draining: drop, never block */
    fw->tx_len += (uint32_t)n;
    fw->tx_seq++;
    fw->stats[FW_STAT_TX_FRAMES]++;
}

static void send_ack(fw_t *fw, uint8_t type, uint16_t seq, uint8_t acked_type, uint8_t code) {
    fw_put_u16(fw->tx_payload, seq);
    fw->tx_payload[2] = acked_type;
    fw->tx_payload[3] = code;
    send(fw, type, 4);
}

static void send_state(fw_t *fw) {
    uint8_t *p = fw->tx_payload;
    fw_put_u64(p, fw->now_us);
    fw_put_u16(p + 8, fw->last_setpoint_seq);
    fw_put_u16(p + 10, fw->faults);
    p[12] = fw->mode;
    p[13] = fw->n_joints;
    fw_put_u16(p + 14, 0);
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        uint8_t *q = p + 16 + 12u * j;
        fw_put_u32(q, (uint32_t)fw->meas_pos[j]);
        fw_put_u32(q + 4, (uint32_t)fw->meas_vel[j]);
        fw_put_u32(q + 8, (uint32_t)fw->meas_eff[j]);
    }
    send(fw, FW_MSG_STATE, 16u + 12u * fw->n_joints);
    fw->last_state_us = fw->now_us;
}

static void send_capabilities(fw_t *fw) {
    uint8_t *p = fw->tx_payload;
    p[0] = fw->proto_major;
    p[1] = fw->proto_minor;
    p[2] = fw->n_joints;
    p[3] = 0;
    fw_put_u32(p + 4, fw->fw_version);
    fw_put_u16(p + 8, (uint16_t)(fw->hb_timeout_us / 1000u));
    fw_put_u16(p + 10, (uint16_t)(fw->state_period_us ? 1000000u / fw->state_period_us : 0u));
    fw_put_u16(p + 12, (uint16_t)(fw->ramp_us / 1000u));
    fw_put_u16(p + 14, 0);
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        uint8_t *q = p + 16 + 32u * j;
        const fw_joint_cfg_t *c = &fw->joint[j];
        memcpy(q, c->name, FW_NAME_LEN);
        fw_put_u32(q + 16, (uint32_t)c->pos_min);
        fw_put_u32(q + 20, (uint32_t)c->pos_max);
        fw_put_u32(q + 24, (uint32_t)c->vel_max);
        fw_put_u32(q + 28, (uint32_t)c->eff_max);
    }
    send(fw, FW_MSG_CAPABILITIES, 16u + 32u * fw->n_joints);
}

static void send_fault(fw_t *fw, uint16_t code, uint8_t category) {
    uint8_t *p = fw->tx_payload;
    fw_put_u64(p, fw->now_us);
    fw_put_u16(p + 8, code);
    fw_put_u16(p + 10, fw->faults);
    p[12] = category;
    p[13] = fw->mode;
    fw_put_u16(p + 14, 0);
    send(fw, FW_MSG_FAULT, 16);
}

/* ---- the safety state machine ----------------------------------------------------------- */

static void hold_measured(fw_t *fw) {
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        fw_cmd_t *c = &fw->cmd[j];
        c->pos = fw->meas_pos[j];
        c->vel = 0;
        c->eff = 0;
        c->kp = fw->joint[j].kp_default;
        c->kd = fw->joint[j].kd_default;
    }
}

static void torque_off(fw_t *fw, uint8_t mode) {
    int was_on = fw->torque_on;
    fw->torque_on = 0;
    fw->mode = mode;
    if (was_on) emit(fw, FW_EV_TORQUE_OFF, 0);
}

/* Category 0: remove torque now. */
static void trip_cat0(fw_t *fw, uint16_t fault) {
    fw->faults |= fault;
    emit(fw, FW_EV_STOP_CAT0, 0);
    torque_off(fw, FW_MODE_TRIPPED);
    send_fault(fw, fault, 0);
}

/* Category 1: decelerate every joint linearly to zero velocity over ramp_us, then remove torque. */
static void trip_cat1(fw_t *fw, uint16_t fault) {
    fw->faults |= fault;
    if (fw->mode != FW_MODE_ARMED) { send_fault(fw, fault, 255); return; }
    emit(fw, FW_EV_STOP_CAT1, 0);
    fw->mode = FW_MODE_STOPPING;
    fw->ramp_start_us = fw->now_us;
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        int32_t v = fw->meas_vel[j], vmax = fw->joint[j].vel_max;
        fw->ramp_p0[j] = fw->meas_pos[j];
        fw->ramp_v0[j] = v > vmax ? vmax : (v < -vmax ? -vmax : v);
    }
    send_fault(fw, fault, 1);
}

static void ramp_step(fw_t *fw) {
    uint64_t e = fw->now_us - fw->ramp_start_us;
    if (e >= fw->ramp_us) { torque_off(fw, FW_MODE_TRIPPED); send_state(fw); return; }
    int64_t r = fw->ramp_us, el = (int64_t)e;
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        int64_t v0 = fw->ramp_v0[j];
        fw_cmd_t *c = &fw->cmd[j];
        /* v(t) = v0 (1 - t/T);  p(t) = p0 + v0 t (2T - t) / 2T, split to stay inside int64 */
        c->vel = (int32_t)(v0 * (r - el) / r);
        c->pos = fw->ramp_p0[j] + (int32_t)((v0 * el / 1000000) * (2 * r - el) / (2 * r));
        c->eff = 0;
        c->kp = fw->joint[j].kp_default;
        c->kd = fw->joint[j].kd_default;
    }
}

static int32_t clamp32(int32_t v, int32_t lo, int32_t hi, int *clamped) {
    if (v < lo) { *clamped = 1; return lo; }
    if (v > hi) { *clamped = 1; return hi; }
    return v;
}

/* ---- receive ------------------------------------------------------------------------------ */

static void on_link_error(fw_t *fw, int stat) {
    fw->stats[stat]++;
    if (fw->consecutive_errors < 255u) fw->consecutive_errors++;
    if (fw->consecutive_errors >= fw->link_err_limit &&
        (fw->mode == FW_MODE_ARMED || fw->mode == FW_MODE_STOPPING)) {
        emit(fw, FW_EV_LINK_ERRORS, fw->consecutive_errors);
        trip_cat0(fw, FW_FAULT_LINK_ERRORS);
    }
}

static void apply_setpoint(fw_t *fw, uint16_t seq, const uint8_t *p, size_t len) {
    if (len < 4 || len != 4u + 20u * p[0]) { send_ack(fw, FW_MSG_NACK, seq, FW_MSG_SETPOINT, FW_NACK_BAD_LENGTH); return; }
    if (p[0] != fw->n_joints) { send_ack(fw, FW_MSG_NACK, seq, FW_MSG_SETPOINT, FW_NACK_BAD_JOINT_COUNT); return; }
    if (fw->mode != FW_MODE_ARMED) { send_ack(fw, FW_MSG_NACK, seq, FW_MSG_SETPOINT, FW_NACK_NOT_ARMED); return; }
    uint8_t flags = p[1];
    int clamped = 0;
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        const uint8_t *q = p + 4 + 20u * j;
        const fw_joint_cfg_t *cfg = &fw->joint[j];
        fw_cmd_t *c = &fw->cmd[j];
        c->pos = clamp32((int32_t)fw_get_u32(q), cfg->pos_min, cfg->pos_max, &clamped);
        c->vel = (flags & 0x01u) ? clamp32((int32_t)fw_get_u32(q + 4), -cfg->vel_max, cfg->vel_max, &clamped) : 0;
        c->eff = (flags & 0x02u) ? clamp32((int32_t)fw_get_u32(q + 8), -cfg->eff_max, cfg->eff_max, &clamped) : 0;
        c->kp = (flags & 0x04u) ? fw_get_u32(q + 12) : cfg->kp_default;
        c->kd = (flags & 0x04u) ? fw_get_u32(q + 16) : cfg->kd_default;
    }
    fw->faults = (uint16_t)(clamped ? fw->faults | FW_FAULT_SETPOINT_CLAMPED : fw->faults & ~FW_FAULT_SETPOINT_CLAMPED);
    fw->last_hb_us = fw->now_us; /* a valid setpoint proves the host is alive */
    fw->last_setpoint_seq = seq;
    send_state(fw);
}

static void handle_frame(fw_t *fw, const uint8_t *block, size_t n) {
    uint8_t version, type;
    uint16_t seq;
    size_t len;
    int st = fw_frame_decode(block, n, fw->rx_raw, &version, &type, &seq, &len);
    if (st == FW_DECODE_CRC) { on_link_error(fw, FW_STAT_RX_CRC_ERRORS); return; }
    if (st != FW_DECODE_OK) { on_link_error(fw, FW_STAT_RX_FRAMING_ERRORS); return; }
    fw->consecutive_errors = 0;
    fw->stats[FW_STAT_RX_FRAMES]++;
    const uint8_t *p = fw->rx_raw + FW_HEADER_LEN;
    if (version != fw->proto_major) {
        /* HELLO and CAPABILITIES keep their layout across versions, so a host of any version learns
         * ours and can refuse us cleanly; every other frame of a foreign version is refused. */
        if (type == FW_MSG_HELLO) { send_capabilities(fw); return; }
        fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
        send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_VERSION);
        return;
    }
    if (type == FW_MSG_HELLO) {
        fw->have_rx_seq = 0; /* a (re)connecting host restarts its sequence numbers */
    } else if (fw->have_rx_seq && seq == fw->last_rx_seq) {
        fw->stats[FW_STAT_RX_DUPLICATES]++; /* a repeated frame is never applied twice */
        return;
    } else if (fw->have_rx_seq && seq != (uint16_t)(fw->last_rx_seq + 1u)) {
        fw->stats[FW_STAT_RX_GAPS] += (uint16_t)(seq - fw->last_rx_seq - 1u);
    }
    fw->have_rx_seq = 1;
    fw->last_rx_seq = seq;

    switch (type) {
    case FW_MSG_HELLO:
        if (len != 4) break;
        emit(fw, FW_EV_HELLO, p[0]);
        send_capabilities(fw);
        return;
    case FW_MSG_ARM:
        if (len != 0) break;
        if (fw->mode == FW_MODE_STOPPING) { send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BUSY); return; }
        fw->faults = 0; /* re-arming is the explicit acknowledgement of every latched fault */
        hold_measured(fw);
        fw->mode = FW_MODE_ARMED;
        fw->torque_on = 1;
        fw->last_hb_us = fw->now_us;
        emit(fw, FW_EV_ARMED, 0);
        send_ack(fw, FW_MSG_ACK, seq, type, 0);
        return;
    case FW_MSG_DISARM:
        if (len != 0) break;
        torque_off(fw, FW_MODE_DISARMED);
        fw->faults = 0;
        emit(fw, FW_EV_DISARMED, 0);
        send_ack(fw, FW_MSG_ACK, seq, type, 0);
        return;
    case FW_MSG_SETPOINT:
        apply_setpoint(fw, seq, p, len);
        return;
    case FW_MSG_HEARTBEAT:
        if (len != 4) break;
        fw->last_hb_us = fw->now_us;
        send_ack(fw, FW_MSG_ACK, seq, type, 0);
        return;
    case FW_MSG_STOP:
        if (len != 4) break;
        if (p[0] > 1u) { send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_ARGUMENT); return; }
        send_ack(fw, FW_MSG_ACK, seq, type, 0);
        if (p[0] == 0u) trip_cat0(fw, FW_FAULT_HOST_STOP_CAT0);
        else trip_cat1(fw, FW_FAULT_HOST_STOP_CAT1);
        return;
    default:
        fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
        send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_UNKNOWN_TYPE);
        return;
    }
    fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
    send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_LENGTH);
}

void fw_rx_bytes(fw_t *fw, const uint8_t *data, size_t n, uint64_t now_us) {
    fw->now_us = now_us;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = data[i];
        if (b != 0) {
            if (fw->rx_len < FW_MAX_ENCODED) fw->rx_buf[fw->rx_len++] = b;
            else fw->rx_overflow = 1; /* garbage run: drop until the next delimiter */
            continue;
        }
        if (fw->rx_overflow) on_link_error(fw, FW_STAT_RX_FRAMING_ERRORS);
        else if (fw->rx_len > 0) handle_frame(fw, fw->rx_buf, fw->rx_len);
        fw->rx_len = 0;
        fw->rx_overflow = 0;
    }
}

void fw_tick(fw_t *fw, uint64_t now_us) {
    fw->now_us = now_us;
    if (fw->mode == FW_MODE_ARMED && now_us - fw->last_hb_us > fw->hb_timeout_us) {
        emit(fw, FW_EV_HEARTBEAT_TIMEOUT, 0);
        trip_cat1(fw, FW_FAULT_HEARTBEAT_TIMEOUT);
    }
    if (fw->mode == FW_MODE_STOPPING) ramp_step(fw);
    if (fw->state_period_us && now_us - fw->last_state_us >= fw->state_period_us) send_state(fw);
}

void fw_inject_fault(fw_t *fw, uint8_t category, uint64_t now_us) {
    fw->now_us = now_us;
    if (category == 0u) trip_cat0(fw, FW_FAULT_INJECTED);
    else trip_cat1(fw, FW_FAULT_INJECTED);
}

void fw_set_measured(fw_t *fw, const int32_t *m) {
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        fw->meas_pos[j] = m[3u * j];
        fw->meas_vel[j] = m[3u * j + 1u];
        fw->meas_eff[j] = m[3u * j + 2u];
    }
}

int fw_get_commands(const fw_t *fw, int32_t *out) {
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        const fw_cmd_t *c = &fw->cmd[j];
        out[5u * j] = c->pos;
        out[5u * j + 1u] = c->vel;
        out[5u * j + 2u] = c->eff;
        out[5u * j + 3u] = (int32_t)c->kp;
        out[5u * j + 4u] = (int32_t)c->kd;
    }
    return fw->torque_on;
}

size_t fw_tx_take(fw_t *fw, uint8_t *out, size_t cap) {
    size_t n = fw->tx_len <= cap ? fw->tx_len : 0; /* whole buffer or nothing: frames stay intact */
    if (n == 0) return 0;
    memcpy(out, fw->tx_buf, n);
    fw->tx_len = 0;
    return n;
}

int fw_pop_event(fw_t *fw, uint64_t *t_us, uint8_t *kind, uint8_t *arg, uint16_t *faults) {
    if (fw->ev_count == 0) return 0;
    const fw_event_t *e = &fw->events[fw->ev_head];
    *t_us = e->t_us;
    *kind = e->kind;
    *arg = e->arg;
    *faults = e->faults;
    fw->ev_head = (uint8_t)((fw->ev_head + 1u) % FW_EVENT_CAP);
    fw->ev_count--;
    return 1;
}

uint8_t fw_mode(const fw_t *fw) { return fw->mode; }
uint16_t fw_faults(const fw_t *fw) { return fw->faults; }
uint32_t fw_stat(const fw_t *fw, int which) { return which >= 0 && which < FW_STAT_COUNT ? fw->stats[which] : 0u; }
