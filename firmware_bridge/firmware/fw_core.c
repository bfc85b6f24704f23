#include "fw_core.h"

#include <string.h>

/* Static helpers assume the caller holds the critical section (or is the RX interrupt touching
 * RX-only state); public functions take it. See the interrupt model in fw_core.h. */

size_t fw_sizeof(void) { return sizeof(fw_t); }

static uint32_t sat_mul4(uint32_t v) { return v > 0x3FFFFFFFu ? 0xFFFFFFFFu : v * 4u; }

void fw_init(fw_t *fw, uint8_t n_joints, uint32_t hb_timeout_ms, uint32_t ramp_ms, uint32_t state_rate_hz,
             uint8_t link_err_limit, uint32_t fw_version) {
    memset(fw, 0, sizeof *fw);
    fw->n_joints = n_joints > FW_MAX_JOINTS ? FW_MAX_JOINTS : n_joints;
    fw->proto_major = FW_PROTO_MAJOR;
    fw->proto_minor = FW_PROTO_MINOR;
    fw->hb_timeout_us = (uint64_t)hb_timeout_ms * 1000u; /* 64-bit: no overflow for any u32 of ms */
    /* A category-1 ramp longer than a minute is not a stop; the cap also keeps the ramp's int64 math
     * (r^2 and v0 * r below) far from overflow for any u32 input. */
    fw->ramp_us = (uint64_t)(ramp_ms > FW_MAX_RAMP_MS ? FW_MAX_RAMP_MS : ramp_ms) * 1000u;
    fw->state_period_us = state_rate_hz ? 1000000u / state_rate_hz : 0u;
    fw->link_err_limit = link_err_limit ? link_err_limit : 1u;
    fw->fw_version = fw_version;
    fw->mode = FW_MODE_DISARMED;
    fw->link_loss_cat = 1u;
    fw->link_error_cat = 0u;
    fw->enable_in = 1u; /* no enable input configured: treated as asserted */
    fw->seq_window = FW_DEFAULT_SEQ_WINDOW;
    fw->err_leak_per_s = FW_DEFAULT_ERR_LEAK_PER_S;
}

void fw_set_protocol(fw_t *fw, uint8_t major, uint8_t minor) {
    fw->proto_major = major;
    fw->proto_minor = minor;
}

int fw_set_joint(fw_t *fw, uint8_t j, const char *name, int32_t pos_min, int32_t pos_max, int32_t vel_max,
                 int32_t eff_max, uint32_t kp_default, uint32_t kd_default) {
    if (j >= fw->n_joints || pos_min > pos_max || vel_max < 0 || eff_max < 0) return -1;
    fw_joint_cfg_t *c = &fw->joint[j];
    memset(c, 0, sizeof *c);
    /* The bound first: a name of exactly FW_NAME_LEN bytes (another fw_joint_cfg_t's name, NUL-padded only when
     * shorter) has no terminator, and reading name[FW_NAME_LEN] would be one byte past it. */
    for (size_t i = 0; name && i < FW_NAME_LEN && name[i]; i++) c->name[i] = name[i];
    c->pos_min = pos_min;
    c->pos_max = pos_max;
    c->vel_max = vel_max;
    c->eff_max = eff_max;
    c->kp_default = kp_default;
    c->kd_default = kd_default;
    c->role = FW_ROLE_JOINT;
    c->kp_max = sat_mul4(kp_default);
    c->kd_max = sat_mul4(kd_default);
    return 0;
}

int fw_set_safety(fw_t *fw, uint8_t link_loss_cat, uint8_t link_error_cat, uint8_t enable_required,
                  uint8_t enable_cat, uint16_t seq_window, uint16_t err_leak_per_s) {
    if (link_loss_cat > 1u || link_error_cat > 1u || enable_cat > 1u || seq_window == 0u || seq_window > 0x8000u)
        return -1;
    fw->link_loss_cat = link_loss_cat;
    fw->link_error_cat = link_error_cat;
    fw->enable_required = (uint8_t)(enable_required ? 1u : 0u);
    fw->enable_cat = enable_cat;
    fw->enable_in = (uint8_t)(enable_required ? 0u : 1u); /* required: not asserted until the input says so */
    fw->seq_window = seq_window;
    fw->err_leak_per_s = err_leak_per_s;
    return 0;
}

int fw_set_joint_safety(fw_t *fw, uint8_t j, uint8_t role, int32_t max_pos_err, int32_t max_vel_err,
                        int32_t effort_limit, uint32_t kp_max, uint32_t kd_max) {
    if (j >= fw->n_joints || role > FW_ROLE_GRIPPER || max_pos_err < 0 || max_vel_err < 0 || effort_limit < 0)
        return -1;
    fw_joint_cfg_t *c = &fw->joint[j];
    c->role = role;
    c->max_pos_err = max_pos_err;
    c->max_vel_err = max_vel_err;
    c->effort_limit = effort_limit;
    c->kp_max = kp_max;
    c->kd_max = kd_max;
    return 0;
}

/* ---- sessions (1.2) ------------------------------------------------------------------------ */

/* splitmix64's finaliser: spreads related boot entropy (boot counter n, n + 1) over unrelated keys. */
static uint64_t mix64(uint64_t z) {
    z += UINT64_C(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* lowbias32 (C. Wellons): an invertible 32-bit mixer, so distinct counters give distinct nonces. */
static uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

void fw_seed_sessions(fw_t *fw, uint64_t boot_entropy) {
    uint64_t key = mix64(boot_entropy);
    FW_ENTER_CRITICAL();
    fw->session_key_add = (uint32_t)key;
    fw->session_key_xor = (uint32_t)(key >> 32);
    fw->session_seeded = 1u;
    fw->session = 0u; /* a reseed ends the current session: the host needs a new HELLO */
    FW_EXIT_CRITICAL();
}

uint32_t fw_session(const fw_t *fw) {
    FW_ENTER_CRITICAL();
    uint32_t s = fw->session;
    FW_EXIT_CRITICAL();
    return s;
}

/* The next session's nonce: P(counter) = mix32(counter + k1) ^ k2, a bijection of the per-boot counter, never
 * 0 (0 means "no session"). Unseeded, or once the counter is spent: 0, so nothing can be armed (fail closed). */
static uint32_t next_session(fw_t *fw) {
    if (!fw->session_seeded) return 0u;
    while (fw->session_count != 0xFFFFFFFFu) {
        fw->session_count++;
        uint32_t nonce = mix32(fw->session_count + fw->session_key_add) ^ fw->session_key_xor;
        if (nonce != 0u) return nonce;
    }
    return 0u;
}

/* ---- time -------------------------------------------------------------------------------- */

/* Advances the monotonic clock by the forward step of the time source. A step back (a timer reset,
 * or an interrupt that read the timer before a preempting one) counts as no elapsed time: every
 * "now - then" below is then >= 0 and never underflows into a huge delta. Also leaks the error bucket. */
static void advance(fw_t *fw, uint64_t raw_us);

/* ---- outputs ------------------------------------------------------------------------------ */

static void emit(fw_t *fw, uint8_t kind, uint8_t arg) {
    if (fw->ev_count == FW_EVENT_CAP) { fw->stats[FW_STAT_EVENTS_LOST]++; return; }
    fw_event_t *e = &fw->events[(fw->ev_head + fw->ev_count) % FW_EVENT_CAP];
    e->t_us = fw->clock_us;
    e->kind = kind;
    e->arg = arg;
    e->faults = fw->faults;
    fw->ev_count++;
}

static void advance(fw_t *fw, uint64_t raw_us) {
    uint64_t dt = 0;
    if (raw_us >= fw->raw_last_us) {
        dt = raw_us - fw->raw_last_us;
    } else {
        fw->stats[FW_STAT_TIME_BACKSTEPS]++;
        emit(fw, FW_EV_TIME_BACKSTEP, 0);
    }
    fw->raw_last_us = raw_us;
    fw->clock_us += dt;
    if (fw->err_level) {
        uint64_t leak = (dt > 1000000000u ? 1000000000u : dt) * fw->err_leak_per_s + fw->err_leak_rem;
        uint64_t milli = leak / 1000u; /* us * errors/s / 1000 = milli-errors */
        fw->err_leak_rem = (uint32_t)(leak % 1000u);
        fw->err_level = milli >= fw->err_level ? 0u : fw->err_level - (uint32_t)milli;
    }
}

static void send(fw_t *fw, uint8_t type, size_t len) {
    uint32_t at = fw->tx_len;
    size_t n = fw_frame_encode(fw->proto_major, type, fw->tx_seq, fw->tx_payload, len, fw->tx_buf + at,
                               FW_TX_BUF - at);
    if (n == 0) { fw->stats[FW_STAT_TX_OVERFLOWS]++; return; } /* driver not draining: drop, never block */
    FW_PREEMPT_POINT(fw); /* without the critical section a preempting send would reuse these bytes */
    fw->tx_len = at + (uint32_t)n;
    fw->tx_seq++;
    fw->stats[FW_STAT_TX_FRAMES]++;
}

static void send_ack(fw_t *fw, uint8_t type, uint16_t seq, uint8_t acked_type, uint8_t code) {
    fw_put_u16(fw->tx_payload, seq);
    fw->tx_payload[2] = acked_type;
    fw->tx_payload[3] = code;
    send(fw, type, 4);
}

static uint16_t status_bits(const fw_t *fw) {
    return (uint16_t)((fw->enable_in ? FW_STATUS_ENABLE_INPUT : 0u) | (fw->stop_latched ? FW_STATUS_STOP_LATCHED : 0u) |
                      (fw->enable_required ? FW_STATUS_ENABLE_REQUIRED : 0u));
}

static void send_state(fw_t *fw) {
    uint8_t *p = fw->tx_payload;
    fw_put_u64(p, fw->clock_us);
    fw_put_u16(p + 8, fw->last_setpoint_seq);
    fw_put_u16(p + 10, fw->faults);
    p[12] = fw->mode;
    p[13] = fw->n_joints;
    fw_put_u16(p + 14, status_bits(fw));
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        uint8_t *q = p + 16 + 12u * j;
        fw_put_u32(q, (uint32_t)fw->meas_pos[j]);
        fw_put_u32(q + 4, (uint32_t)fw->meas_vel[j]);
        fw_put_u32(q + 8, (uint32_t)fw->meas_eff[j]);
    }
    send(fw, FW_MSG_STATE, 16u + 12u * fw->n_joints);
    fw->last_state_us = fw->clock_us;
}

static uint16_t ms_u16(uint64_t us) { return us / 1000u > 0xFFFFu ? 0xFFFFu : (uint16_t)(us / 1000u); }

static void send_capabilities(fw_t *fw) {
    uint8_t *p = fw->tx_payload;
    p[0] = fw->proto_major;
    p[1] = fw->proto_minor;
    p[2] = fw->n_joints;
    p[3] = 0;
    fw_put_u32(p + 4, fw->fw_version);
    fw_put_u16(p + 8, ms_u16(fw->hb_timeout_us));
    fw_put_u16(p + 10, (uint16_t)(fw->state_period_us ? 1000000u / fw->state_period_us : 0u));
    fw_put_u16(p + 12, ms_u16(fw->ramp_us));
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

/* 1.1: the safety configuration, sent after CAPABILITIES to hosts that announce minor >= 1
 * (a separate frame: 16 joints of it would not fit in CAPABILITIES' 640-byte payload). */
static void send_safety_config(fw_t *fw) {
    uint8_t *p = fw->tx_payload;
    fw_put_u64(p, fw->clock_us);
    p[8] = fw->link_loss_cat;
    p[9] = fw->link_error_cat;
    p[10] = fw->enable_cat;
    p[11] = (uint8_t)((fw->enable_required ? 1u : 0u) | (fw->enable_in ? 2u : 0u));
    fw_put_u16(p + 12, fw->seq_window);
    fw_put_u16(p + 14, fw->err_leak_per_s);
    p[16] = fw->link_err_limit;
    p[17] = fw->n_joints;
    fw_put_u16(p + 18, 0);
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        uint8_t *q = p + 20 + 24u * j;
        const fw_joint_cfg_t *c = &fw->joint[j];
        q[0] = c->role;
        q[1] = 0;
        fw_put_u16(q + 2, 0);
        fw_put_u32(q + 4, (uint32_t)c->max_pos_err);
        fw_put_u32(q + 8, (uint32_t)c->max_vel_err);
        fw_put_u32(q + 12, (uint32_t)c->effort_limit);
        fw_put_u32(q + 16, c->kp_max);
        fw_put_u32(q + 20, c->kd_max);
    }
    send(fw, FW_MSG_SAFETY_CONFIG, 20u + 24u * fw->n_joints);
}

/* 1.2: the session nonce, after CAPABILITIES and SAFETY_CONFIG, to hosts announcing minor >= 2. hello_seq
 * tells the host this answers its own HELLO, not one another node sent. */
static void send_session(fw_t *fw, uint16_t hello_seq) {
    uint8_t *p = fw->tx_payload;
    fw_put_u32(p, fw->session);
    fw_put_u16(p + 4, hello_seq);
    fw_put_u16(p + 6, 0);
    send(fw, FW_MSG_SESSION, 8);
}

static void send_fault(fw_t *fw, uint16_t code, uint8_t category) {
    uint8_t *p = fw->tx_payload;
    fw_put_u64(p, fw->clock_us);
    fw_put_u16(p + 8, code);
    fw_put_u16(p + 10, fw->faults);
    p[12] = category;
    p[13] = fw->mode;
    fw_put_u16(p + 14, 0);
    send(fw, FW_MSG_FAULT, 16);
}

/* ---- the safety state machine ------------------------------------------------------------- */

static int32_t clamp32(int32_t v, int32_t lo, int32_t hi, int *clamped) {
    if (v < lo) { *clamped = 1; return lo; }
    if (v > hi) { *clamped = 1; return hi; }
    return v;
}

static uint32_t clampu(uint32_t v, uint32_t hi, int *clamped) {
    if (v > hi) { *clamped = 1; return hi; }
    return v;
}

static int64_t abs64(int64_t v) { return v < 0 ? -v : v; }

static void hold_measured(fw_t *fw) {
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        fw_cmd_t *c = &fw->cmd[j];
        int unused = 0;
        c->pos = clamp32(fw->meas_pos[j], fw->joint[j].pos_min, fw->joint[j].pos_max, &unused);
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

/* Torque is off: TRIPPED while any trip bit is latched, else DISARMED. */
static uint8_t resting_mode(const fw_t *fw) {
    return (fw->faults & FW_TRIP_FAULTS) ? FW_MODE_TRIPPED : FW_MODE_DISARMED;
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
    if (fw->mode == FW_MODE_STOPPING) { send_fault(fw, fault, 1); return; } /* the ramp goes on */
    if (fw->mode != FW_MODE_ARMED) { fw->mode = FW_MODE_TRIPPED; send_fault(fw, fault, 255); return; }
    emit(fw, FW_EV_STOP_CAT1, 0);
    fw->mode = FW_MODE_STOPPING;
    fw->ramp_start_us = fw->clock_us;
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        const fw_joint_cfg_t *cfg = &fw->joint[j];
        int32_t v = fw->meas_vel[j], vmax = cfg->vel_max;
        int unused = 0;
        fw->ramp_p0[j] = clamp32(fw->meas_pos[j], cfg->pos_min, cfg->pos_max, &unused);
        fw->ramp_v0[j] = v > vmax ? vmax : (v < -vmax ? -vmax : v);
    }
    send_fault(fw, fault, 1);
}

static void trip(fw_t *fw, uint16_t fault, uint8_t category) {
    if (category == 0u) trip_cat0(fw, fault);
    else trip_cat1(fw, fault);
}

static void ramp_step(fw_t *fw) {
    uint64_t e = fw->clock_us - fw->ramp_start_us; /* monotonic clock: never underflows */
    if (e >= fw->ramp_us) { torque_off(fw, FW_MODE_TRIPPED); send_state(fw); return; }
    int64_t r = (int64_t)fw->ramp_us, el = (int64_t)e;
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        const fw_joint_cfg_t *cfg = &fw->joint[j];
        int64_t v0 = fw->ramp_v0[j];
        int64_t v = v0 * (r - el) / r;
        /* The ramp's bound: a joint faster than the ramp allows (plus half its speed limit for the
         * drive's lag) is not being stopped by it (a falling or runaway axis): escalate to category 0. */
        if (abs64(fw->meas_vel[j]) > abs64(v) + cfg->vel_max / 2) {
            emit(fw, FW_EV_STOP_ESCALATED, j);
            trip_cat0(fw, FW_FAULT_STOP_ESCALATED);
            return;
        }
        fw_cmd_t *c = &fw->cmd[j];
        /* v(t) = v0 (1 - t/T);  p(t) = p0 + v0 * t (2T - t) / 2T. With T <= 60 s every product stays
         * below 2^63: t (2T - t) <= T^2 = 3.6e15, v0 * T/2 <= 2^31 * 3e7. The target is clamped to the
         * joint's limits (a ramp never commands past a hard stop). */
        int64_t travel_us = el * (2 * r - el) / (2 * r);
        int64_t pos = fw->ramp_p0[j] + v0 * travel_us / 1000000;
        c->vel = (int32_t)v;
        c->pos = pos < cfg->pos_min ? cfg->pos_min : (pos > cfg->pos_max ? cfg->pos_max : (int32_t)pos);
        c->eff = 0;
        c->kp = cfg->kp_default;
        c->kd = cfg->kd_default;
    }
}

/* Category 0 on following error (joints) or excess effort (grippers, which are blocked by design). */
static void check_following(fw_t *fw) {
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        const fw_joint_cfg_t *cfg = &fw->joint[j];
        const fw_cmd_t *c = &fw->cmd[j];
        if (cfg->role == FW_ROLE_GRIPPER) {
            if (cfg->effort_limit && abs64(fw->meas_eff[j]) > cfg->effort_limit) {
                emit(fw, FW_EV_EFFORT_LIMIT, j);
                trip_cat0(fw, FW_FAULT_EFFORT_LIMIT);
                return;
            }
            continue;
        }
        if ((cfg->max_pos_err && abs64((int64_t)c->pos - fw->meas_pos[j]) > cfg->max_pos_err) ||
            (cfg->max_vel_err && abs64((int64_t)c->vel - fw->meas_vel[j]) > cfg->max_vel_err)) {
            emit(fw, FW_EV_FOLLOWING_ERROR, j);
            trip_cat0(fw, FW_FAULT_FOLLOWING_ERROR);
            return;
        }
    }
}

/* ---- receive ------------------------------------------------------------------------------ */

/* Leaky bucket: each bad frame adds one error, errors leak at err_leak_per_s. A burst of
 * link_err_limit bad frames, or a sustained bad-frame rate above the leak (alternating bad and good
 * frames included), trips; a good frame does not reset it. */
static void on_link_error(fw_t *fw, int stat) {
    fw->stats[stat]++;
    uint32_t cap = (uint32_t)fw->link_err_limit * 1000u + 1000u;
    fw->err_level = fw->err_level + 1000u > cap ? cap : fw->err_level + 1000u;
    if (fw->err_level > (uint32_t)(fw->link_err_limit - 1u) * 1000u &&
        (fw->mode == FW_MODE_ARMED || fw->mode == FW_MODE_STOPPING)) {
        emit(fw, FW_EV_LINK_ERRORS, (uint8_t)(fw->err_level / 1000u));
        trip(fw, FW_FAULT_LINK_ERRORS, fw->link_error_cat);
    }
}

static void apply_setpoint(fw_t *fw, uint16_t seq, const uint8_t *p, size_t len) {
    if (len < 4 || len != 4u + 20u * p[0]) { send_ack(fw, FW_MSG_NACK, seq, FW_MSG_SETPOINT, FW_NACK_BAD_LENGTH); return; }
    if (p[0] != fw->n_joints) { send_ack(fw, FW_MSG_NACK, seq, FW_MSG_SETPOINT, FW_NACK_BAD_JOINT_COUNT); return; }
    if (fw->mode != FW_MODE_ARMED || fw->stop_latched) {
        send_ack(fw, FW_MSG_NACK, seq, FW_MSG_SETPOINT, FW_NACK_NOT_ARMED);
        return;
    }
    uint8_t flags = p[1];
    int clamped = 0, gains_clamped = 0;
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        const uint8_t *q = p + 4 + 20u * j;
        const fw_joint_cfg_t *cfg = &fw->joint[j];
        fw_cmd_t *c = &fw->cmd[j];
        c->pos = clamp32((int32_t)fw_get_u32(q), cfg->pos_min, cfg->pos_max, &clamped);
        c->vel = (flags & 0x01u) ? clamp32((int32_t)fw_get_u32(q + 4), -cfg->vel_max, cfg->vel_max, &clamped) : 0;
        c->eff = (flags & 0x02u) ? clamp32((int32_t)fw_get_u32(q + 8), -cfg->eff_max, cfg->eff_max, &clamped) : 0;
        c->kp = clampu((flags & 0x04u) ? fw_get_u32(q + 12) : cfg->kp_default, cfg->kp_max, &gains_clamped);
        c->kd = clampu((flags & 0x04u) ? fw_get_u32(q + 16) : cfg->kd_default, cfg->kd_max, &gains_clamped);
    }
    uint16_t f = (uint16_t)(fw->faults & ~(unsigned)FW_STATUS_FAULTS);
    if (clamped) f |= FW_FAULT_SETPOINT_CLAMPED;
    if (gains_clamped) f |= FW_FAULT_GAINS_CLAMPED;
    fw->faults = f;
    fw->last_hb_us = fw->clock_us; /* a valid setpoint proves the host is alive */
    fw->last_setpoint_seq = seq;
    send_state(fw);
}

/* 1.2: CLEAR_FAULTS and ARM carry the current session's nonce. The 1.1 form (no payload) and a nonce of an
 * earlier session (a captured frame written again, even right after a replayed HELLO, which reset the
 * sequence window) are refused: only the host that received this session's SESSION frame can arm. */
static int session_ok(fw_t *fw, uint16_t seq, uint8_t type, const uint8_t *p, size_t len) {
    if (len == 4u && fw->session != 0u && fw_get_u32(p) == fw->session && fw->session_span < FW_SESSION_ARM_SPAN)
        return 1;
    fw->stats[FW_STAT_RX_BAD_SESSION]++;
    emit(fw, FW_EV_BAD_SESSION, type);
    send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_SESSION);
    return 0;
}

enum { SEQ_NEW, SEQ_DUPLICATE, SEQ_STALE };

/* Sequence window: within a session (started by HELLO) a frame is new only if its seq is 1..seq_window
 * ahead of the last accepted one (mod 2^16). Older frames (replays, late copies) and frames too far ahead
 * are stale; frames before any HELLO have no session and are stale too. Only a well-formed HELLO resets the
 * window, and it always draws a new nonce: the window never reopens onto frames of the live session. */
static int check_seq(fw_t *fw, uint8_t type, uint16_t seq, size_t len) {
    if (type == FW_MSG_HELLO && len == 4u) {
        fw->have_session = 1;
        fw->last_rx_seq = seq;
        fw->session_span = 0;
        return SEQ_NEW;
    }
    if (!fw->have_session) return SEQ_STALE;
    uint16_t d = (uint16_t)(seq - fw->last_rx_seq);
    if (d == 0u) return SEQ_DUPLICATE;
    if (d > fw->seq_window) return SEQ_STALE;
    fw->stats[FW_STAT_RX_GAPS] += (uint16_t)(d - 1u);
    fw->last_rx_seq = seq;
    fw->session_span = fw->session_span > 0xFFFFFFFFu - d ? 0xFFFFFFFFu : fw->session_span + d;
    return SEQ_NEW;
}

static void handle_frame(fw_t *fw, uint8_t version, uint8_t type, uint16_t seq, const uint8_t *p, size_t len) {
    fw->stats[FW_STAT_RX_FRAMES]++;
    if (version != fw->proto_major) {
        /* HELLO and CAPABILITIES keep their layout across versions, so a host of any version learns
         * ours and can refuse us cleanly; every other frame of a foreign version is refused. */
        if (type == FW_MSG_HELLO) { send_capabilities(fw); return; }
        fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
        send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_VERSION);
        return;
    }
    int fresh = check_seq(fw, type, seq, len);
    /* A stop always wins: STOP and DISARM only ever remove torque, so they apply even when stale. */
    if (fresh != SEQ_NEW && type != FW_MSG_STOP && type != FW_MSG_DISARM) {
        if (fresh == SEQ_DUPLICATE) { fw->stats[FW_STAT_RX_DUPLICATES]++; return; } /* never applied twice */
        fw->stats[FW_STAT_RX_STALE]++;
        emit(fw, FW_EV_STALE_FRAME, type);
        send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_STALE_SEQ);
        return;
    }

    switch (type) {
    case FW_MSG_HELLO:
        if (len != 4) break;
        fw->host_minor = p[1];
        fw->session = next_session(fw); /* every HELLO, replayed ones too, gets a nonce never used before */
        if (fw->mode == FW_MODE_ARMED || fw->mode == FW_MODE_STOPPING) {
            /* a new session while armed: the host that armed is gone without stopping */
            emit(fw, FW_EV_SESSION_RESET, p[1]);
            trip(fw, FW_FAULT_SESSION_RESET, fw->link_loss_cat);
        }
        emit(fw, FW_EV_HELLO, p[0]);
        send_capabilities(fw);
        if (fw->host_minor >= 1u && fw->proto_minor >= 1u) send_safety_config(fw);
        if (fw->host_minor >= 2u && fw->proto_minor >= 2u) send_session(fw, seq);
        return;
    case FW_MSG_ARM:
        if (len != 0 && len != 4) break;
        if (!session_ok(fw, seq, type, p, len)) return; /* first: a foreign frame learns nothing of our state */
        /* no joints configured (fw_init with 0: a port's mistake): every check below is over joints, so each would
         * hold vacuously; there is nothing to arm */
        if (fw->n_joints == 0u) { send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_JOINT_COUNT); return; }
        if (fw->mode == FW_MODE_STOPPING) { send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BUSY); return; }
        /* arming never clears a fault: that is CLEAR_FAULTS, an explicit operator act */
        if (fw->faults & FW_TRIP_FAULTS) { send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_FAULTS_LATCHED); return; }
        if (fw->enable_required && !fw->enable_in) { send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_ENABLE_OFF); return; }
        hold_measured(fw);
        fw->mode = FW_MODE_ARMED;
        fw->torque_on = 1;
        fw->stop_latched = 0;
        fw->last_hb_us = fw->clock_us;
        emit(fw, FW_EV_ARMED, 0);
        send_ack(fw, FW_MSG_ACK, seq, type, 0);
        return;
    case FW_MSG_DISARM:
        /* only removes torque, so a malformed one (with a payload) disarms too, answered NACK BAD_LENGTH */
        torque_off(fw, FW_MODE_DISARMED);
        fw->mode = resting_mode(fw); /* faults stay latched */
        emit(fw, FW_EV_DISARMED, 0);
        if (len != 0) {
            fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
            send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_LENGTH);
        } else {
            send_ack(fw, FW_MSG_ACK, seq, type, 0);
        }
        return;
    case FW_MSG_CLEAR_FAULTS:
        if (len != 0 && len != 4) break;
        if (!session_ok(fw, seq, type, p, len)) return;
        if (fw->mode == FW_MODE_STOPPING) { send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BUSY); return; }
        fw->faults = (uint16_t)(fw->faults & (fw->mode == FW_MODE_ARMED ? FW_TRIP_FAULTS : 0u));
        if (fw->mode != FW_MODE_ARMED) fw->mode = FW_MODE_DISARMED;
        fw->err_level = 0;
        emit(fw, FW_EV_FAULTS_CLEARED, 0);
        send_ack(fw, FW_MSG_ACK, seq, type, 0);
        return;
    case FW_MSG_SETPOINT:
        apply_setpoint(fw, seq, p, len);
        return;
    case FW_MSG_HEARTBEAT:
        if (len != 4) break;
        if (!fw->stop_latched) fw->last_hb_us = fw->clock_us; /* after a STOP nothing feeds the watchdog */
        send_ack(fw, FW_MSG_ACK, seq, type, 0);
        return;
    case FW_MSG_KEEPALIVE:
        if (len != 4) break;
        send_ack(fw, FW_MSG_ACK, seq, type, 0); /* proves the link, never feeds the motion watchdog */
        return;
    case FW_MSG_STOP: {
        /* A stop always wins, a malformed one too (another length, an unknown category): it is still a request to
         * stop. It gets the category it names when that byte is there and known, else category 0, and a NACK
         * that tells the sender it was malformed; refusing it would leave the motors running. */
        uint8_t cat = (len >= 1u && p[0] <= 1u) ? p[0] : 0u;
        uint8_t bad = len != 4u ? FW_NACK_BAD_LENGTH : (p[0] > 1u ? FW_NACK_BAD_ARGUMENT : 0u);
        if (bad) {
            fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
            send_ack(fw, FW_MSG_NACK, seq, type, bad);
        } else {
            send_ack(fw, FW_MSG_ACK, seq, type, 0);
        }
        fw->stop_latched = 1;
        emit(fw, FW_EV_STOP_RECEIVED, cat);
        trip(fw, cat == 0u ? FW_FAULT_HOST_STOP_CAT0 : FW_FAULT_HOST_STOP_CAT1, cat);
        return;
    }
    default:
        fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
        send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_UNKNOWN_TYPE);
        return;
    }
    fw->stats[FW_STAT_RX_BAD_MESSAGES]++;
    send_ack(fw, FW_MSG_NACK, seq, type, FW_NACK_BAD_LENGTH);
}

void fw_rx_bytes(fw_t *fw, const uint8_t *data, size_t n, uint64_t now_us) {
    for (size_t i = 0; i < n; i++) {
        FW_PREEMPT_POINT(fw);
        uint8_t b = data[i];
        if (b != 0) { /* RX-only state: no critical section */
            if (fw->rx_len < FW_MAX_ENCODED) fw->rx_buf[fw->rx_len++] = b;
            else fw->rx_overflow = 1; /* garbage run: drop until the next delimiter */
            continue;
        }
        uint8_t version = 0, type = 0;
        uint16_t seq = 0;
        size_t len = 0;
        int st = FW_DECODE_FRAMING;
        if (!fw->rx_overflow && fw->rx_len > 0)
            st = fw_frame_decode(fw->rx_buf, fw->rx_len, fw->rx_raw, &version, &type, &seq, &len);
        FW_PREEMPT_POINT(fw);
        if (fw->rx_overflow || fw->rx_len > 0) {
            FW_ENTER_CRITICAL();
            advance(fw, now_us);
            if (st == FW_DECODE_OK) handle_frame(fw, version, type, seq, fw->rx_raw + FW_HEADER_LEN, len);
            else on_link_error(fw, st == FW_DECODE_CRC ? FW_STAT_RX_CRC_ERRORS : FW_STAT_RX_FRAMING_ERRORS);
            FW_EXIT_CRITICAL();
        }
        fw->rx_len = 0;
        fw->rx_overflow = 0;
    }
}

void fw_tick(fw_t *fw, uint64_t now_us) {
    FW_PREEMPT_POINT(fw);
    FW_ENTER_CRITICAL();
    advance(fw, now_us);
    if (fw->mode == FW_MODE_ARMED && fw->clock_us - fw->last_hb_us > fw->hb_timeout_us) {
        emit(fw, FW_EV_HEARTBEAT_TIMEOUT, 0);
        trip(fw, FW_FAULT_HEARTBEAT_TIMEOUT, fw->link_loss_cat);
    }
    if (fw->mode == FW_MODE_ARMED) check_following(fw);
    if (fw->mode == FW_MODE_STOPPING) ramp_step(fw);
    if (fw->state_period_us && fw->clock_us - fw->last_state_us >= fw->state_period_us) send_state(fw);
    FW_EXIT_CRITICAL();
    FW_PREEMPT_POINT(fw);
}

void fw_inject_fault(fw_t *fw, uint8_t category, uint64_t now_us) {
    FW_ENTER_CRITICAL();
    advance(fw, now_us);
    trip(fw, FW_FAULT_INJECTED, (uint8_t)(category ? 1u : 0u));
    FW_EXIT_CRITICAL();
}

void fw_set_enable(fw_t *fw, uint8_t asserted, uint64_t now_us) {
    FW_ENTER_CRITICAL();
    advance(fw, now_us);
    uint8_t level = (uint8_t)(asserted ? 1u : 0u);
    if (level != fw->enable_in) {
        fw->enable_in = level;
        emit(fw, FW_EV_ENABLE, level);
        if (!level && fw->enable_required && (fw->mode == FW_MODE_ARMED || fw->mode == FW_MODE_STOPPING))
            trip(fw, FW_FAULT_ENABLE_LOST, fw->enable_cat);
    }
    FW_EXIT_CRITICAL();
}

void fw_set_measured(fw_t *fw, const int32_t *m) {
    FW_ENTER_CRITICAL();
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        fw->meas_pos[j] = m[3u * j];
        fw->meas_vel[j] = m[3u * j + 1u];
        fw->meas_eff[j] = m[3u * j + 2u];
    }
    FW_EXIT_CRITICAL();
}

int fw_get_commands(const fw_t *fw, int32_t *out) {
    FW_ENTER_CRITICAL();
    for (uint8_t j = 0; j < fw->n_joints; j++) {
        const fw_cmd_t *c = &fw->cmd[j];
        out[5u * j] = c->pos;
        out[5u * j + 1u] = c->vel;
        out[5u * j + 2u] = c->eff;
        out[5u * j + 3u] = (int32_t)c->kp;
        out[5u * j + 4u] = (int32_t)c->kd;
    }
    int on = fw->torque_on;
    FW_EXIT_CRITICAL();
    return on;
}

size_t fw_tx_take(fw_t *fw, uint8_t *out, size_t cap) {
    FW_ENTER_CRITICAL();
    size_t have = fw->tx_len, n = have < cap ? have : cap;
    if (n > 0) {
        memcpy(out, fw->tx_buf, n);
        memmove(fw->tx_buf, fw->tx_buf + n, have - n); /* a ring buffer would avoid the copy; 4 KiB max */
        fw->tx_len = (uint32_t)(have - n);
    }
    FW_EXIT_CRITICAL();
    return n;
}

int fw_pop_event(fw_t *fw, uint64_t *t_us, uint8_t *kind, uint8_t *arg, uint16_t *faults) {
    FW_ENTER_CRITICAL();
    int got = fw->ev_count != 0;
    if (got) {
        const fw_event_t *e = &fw->events[fw->ev_head];
        *t_us = e->t_us;
        *kind = e->kind;
        *arg = e->arg;
        *faults = e->faults;
        fw->ev_head = (uint8_t)((fw->ev_head + 1u) % FW_EVENT_CAP);
        fw->ev_count--;
    }
    FW_EXIT_CRITICAL();
    return got;
}

uint8_t fw_mode(const fw_t *fw) { return fw->mode; }
uint16_t fw_faults(const fw_t *fw) { return fw->faults; }
uint16_t fw_status(const fw_t *fw) {
    FW_ENTER_CRITICAL();
    uint16_t s = status_bits(fw);
    FW_EXIT_CRITICAL();
    return s;
}
uint64_t fw_time_us(const fw_t *fw) {
    FW_ENTER_CRITICAL();
    uint64_t t = fw->clock_us; /* 64-bit: not atomic on a 32-bit core */
    FW_EXIT_CRITICAL();
    return t;
}
uint32_t fw_stat(const fw_t *fw, int which) { return which >= 0 && which < FW_STAT_COUNT ? fw->stats[which] : 0u; }
