"""The host side of this project's firmware protocol: `Link`, the `Controller` backend for serial:// and can://.

Nothing here runs in the background: `poll()` reads and decodes what arrived; commands write
immediately. Bad frames are counted and dropped, never applied; so are frames whose sequence number
is not newer than the last one (a replay or a late copy). When the port disappears the link reports
`connected == False`, and the next call re-opens it after an exponential backoff.

Arming is an operator act: the firmware keeps faults latched until `clear_faults()`, and `arm()` is
refused meanwhile. Both carry the nonce of the session the firmware announced in answer to this link's
`hello()` (protocol 1.2), so frames captured from another session, written again, arm nothing. `stop()` is resent until the firmware acknowledges it. `send_*()` are the
non-blocking forms for a control loop (answers are matched by `poll()`; read them with `ack_result`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections import OrderedDict, deque
from dataclasses import replace

import can
import numpy as np
import serial

from firmware_bridge import framing
from firmware_bridge.controller import ArrayLike, Controller, JointState
from firmware_bridge.errors import (
    DisarmFailedError,
    FrameError,
    IncompatibleProtocolError,
    LinkDownError,
    LinkTimeoutError,
    NackError,
)
from firmware_bridge.protocol import (
    MIN_FIRMWARE_MINOR,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    SESSION_ARM_SPAN,
    Ack,
    Arm,
    Capabilities,
    ClearFaults,
    Disarm,
    Fault,
    FaultReport,
    Heartbeat,
    Hello,
    Keepalive,
    Message,
    MsgType,
    Nack,
    NackCode,
    SafetyConfig,
    Session,
    Setpoint,
    State,
    Stop,
)
from firmware_bridge.transport import Transport

HOST_REQUESTED_STOPS = (Fault.HOST_STOP_CAT0, Fault.HOST_STOP_CAT1)

log = logging.getLogger(__name__)
_TRANSPORT_ERRORS = (serial.SerialException, OSError, can.CanError)

# A session arms only within SESSION_ARM_SPAN sequence numbers of its HELLO; needs_hello turns True this many
# frames earlier, so that an operator's arm (CLEAR_FAULTS, resends, ARM) fits in the session it starts in.
SESSION_RENEW_MARGIN = 4096
ACK_MEMORY = 1024  # answers kept for ack_result()
# How far (in firmware sequence numbers) a frame may arrive behind the newest one of another stream: an urgent CAN
# FAULT overtakes what sits in the controller's TX queue (its 4 KiB buffer holds fewer than 300 frames).
REORDER_LIMIT = 512
# How much faster than this host's clock the firmware's clock may run, for judging a STATE's firmware time "from the
# future" (not our controller's). 5%, far above the crystal tolerance the clock estimate assumes (FirmwareClock): a
# port clocked from its MCU's internal RC oscillator (+-1% trimmed, a few % over temperature) must never have its own
# STATEs refused (that would stop the robot); a frame of another boot or controller is minutes to days ahead.
FIRMWARE_CLOCK_FAST = 0.05
FIRMWARE_TIME_SLACK_US = 500_000  # and this much on top (rounding, a firmware timer's granularity, a slow HELLO)


class FirmwareClock:
    """Maps firmware time (STATE.time_us, SAFETY_CONFIG.time_us) onto this host's time.monotonic().

    Every frame gives arrival - firmware_time = offset + delay, delay >= 0; the estimate is the lower
    envelope of those samples, allowed to rise by at most `drift` (200 ppm, crystal tolerance) so slow
    clock drift is followed while a frame that sat in a buffer cannot pull the estimate up: its age then
    shows. Reset on HELLO (a restarted firmware starts its clock again). If firmware time jumped back
    without a HELLO, its states would look old: stale, the safe direction.
    """

    def __init__(self, drift: float = 200e-6) -> None:
        self.drift = drift
        self.reset()

    def reset(self) -> None:
        self.offset_s: float | None = None  # host monotonic - firmware time, seconds
        self.samples = 0
        self._last_arrival = 0.0

    def observe(self, firmware_time_s: float, arrival: float) -> float:
        """Record one frame; returns its firmware time mapped onto the host clock."""
        sample = arrival - firmware_time_s
        if self.offset_s is None:
            self.offset_s = sample
        else:
            allowed = self.offset_s + self.drift * max(0.0, arrival - self._last_arrival)
            self.offset_s = min(sample, allowed)
        self._last_arrival = arrival
        self.samples += 1
        return firmware_time_s + self.offset_s

    def to_host(self, firmware_time_s: float) -> float:
        return math.nan if self.offset_s is None else firmware_time_s + self.offset_s


class Link(Controller):
    """This project's firmware protocol to one motor controller (a `Controller` backend). Subclasses only
    choose the transport and parse their URL scheme."""

    def __init__(self, transport: Transport, *, backoff: float = 0.05, max_backoff: float = 2.0,
                 inbox_size: int = 1024) -> None:
        super().__init__()
        self.transport = transport
        self.firmware_clock = FirmwareClock()
        # A random first sequence number: frames of an earlier host process are then (almost surely)
        # outside the firmware's window for this session, so a late copy of one is never applied.
        self._seq = secrets.randbelow(0x10000)
        # The host window, per received stream (a CAN ID; a serial port has one). CAN keeps the order within an ID
        # only: the firmware's urgent FAULT n+1 overtakes its queued ACK n in arbitration, and one window over both
        # IDs would drop that ACK as stale (no STOP confirmed). `_newest_rx_seq` (all streams) counts the gaps.
        self._last_rx_seq: dict[int, int] = {}
        self._newest_rx_seq: int | None = None
        self._hello_pending = False
        # 1.2: `_session` (Controller) is the firmware's nonce for this link's session (None: no session, call
        # hello()); `_awaiting_session` the sequence number of the HELLO whose SESSION answer hello() waits for.
        self._awaiting_session: int | None = None
        self._sent_since_hello = 0  # frames sent after the HELLO that started the session
        self._acks: OrderedDict[int, Ack] = OrderedDict()
        self._stale_run = 0
        self._wrong_joint_frames = 0  # STATE / SAFETY_CONFIG frames dropped for a joint count other than caps'
        # Our controller's firmware time, which STATE frames of another controller or a replay do not follow (see
        # _state_time): no STATE of ours is older than the newest one taken (STATE.time_us never goes back), and none
        # is further ahead of the SAFETY_CONFIG answering hello() than host time since the HELLO went out allows.
        self._state_time_floor_us: int | None = None
        self._time_anchor: tuple[int, float] | None = None  # (that SAFETY_CONFIG's time_us, when the HELLO went out)
        self._hello_sent = 0.0
        self._hello_safety: tuple[int, int] | None = None  # (seq, time_us) of the last SAFETY_CONFIG in hello()
        self._future_states = 0  # STATE frames dropped for a firmware time our controller cannot have reached
        self._bad_capabilities = ""  # why the last malformed CAPABILITIES during hello() was dropped
        self._decoders: dict[int, framing.StreamDecoder] = {}
        self._sent_at: OrderedDict[int, float] = OrderedDict()
        self._inbox: deque[Message] = deque(maxlen=inbox_size)
        self._backoff0, self._max_backoff = backoff, max_backoff
        self._backoff, self._retry_at = backoff, 0.0
        self._last_error = ""
        self._heartbeats = 0
        self._keepalives = 0

    # ---- lifecycle ----
    def open(self) -> Link:
        if not self._opened:
            self.transport.open()
            self._opened = self._connected = True
            log.info("link open on %s", self.transport.description)
        return self

    def close(self) -> None:
        """Idempotent. Does not disarm: call disarm() or stop() first if the motors are powered."""
        if self._opened:
            self._opened = self._connected = False
            self.transport.close()
            log.info("link closed on %s", self.transport.description)

    def __del__(self) -> None:
        if getattr(self, "_opened", False):
            warnings.warn(f"{type(self).__name__} on {self.transport.description} was not closed; call close()",
                          ResourceWarning, stacklevel=2)
            self.close()

    @property
    def session(self) -> int | None:
        """The firmware's nonce for this link's session (protocol 1.2), carried by CLEAR_FAULTS and ARM; None
        before hello(), after a reconnect, and once the firmware started another session (a HELLO from another
        node or a replayed one: its SESSION frame, or a NACK BAD_SESSION, shows it)."""
        return self._session

    @property
    def needs_hello(self) -> bool:
        """True when arming needs a hello() first: no live session (see `session`), or this one is close to the
        end of the sequence span within which the firmware lets a session arm (SESSION_ARM_SPAN)."""
        return self._session is None or self._sent_since_hello >= SESSION_ARM_SPAN - SESSION_RENEW_MARGIN

    # ---- commands ----
    def hello(self, timeout: float = 1.0) -> Capabilities:
        """Start a session: ask the firmware what it is (CAPABILITIES, then its SAFETY_CONFIG and the
        session nonce, SESSION) and refuse a protocol this host cannot speak. Resets sequence tracking and the
        firmware clock estimate. If the firmware was armed, a HELLO stops it (the firmware treats it as a new
        host). The returned Capabilities carry `.safety` and `.session`."""
        self._hello_pending = True
        self._session = None
        self.firmware_clock.reset()
        self._state_time_floor_us = self._time_anchor = self._hello_safety = None  # its clock may have restarted
        self._bad_capabilities = ""
        try:
            self._hello_sent = time.monotonic()  # before the HELLO: the firmware's answer is stamped after it
            seq = self._awaiting_session = self._send(Hello(), expect_reply=False)
            self._sent_since_hello = 0
            deadline = time.monotonic() + timeout
            caps: Capabilities | None = None
            while True:
                for msg in self._poll_once(max(0.0, deadline - time.monotonic()), keep=False):
                    if isinstance(msg, Capabilities):
                        caps = self._accept_capabilities(msg)
                        self._hello_pending = False
                    elif isinstance(msg, SafetyConfig) and caps is not None:
                        self._check_safety_joint_count(caps, msg)
                        caps = replace(caps, safety=msg)
                    elif isinstance(msg, Session) and caps is not None and msg.hello_seq == seq:
                        if msg.session == 0:
                            raise IncompatibleProtocolError(
                                f"firmware on {self.transport.description} announced no session (nonce 0): its port "
                                "does not seed session nonces (fw_seed_sessions), so it can never be armed; fix the "
                                "firmware port (see PROTOCOL.md, Sessions)")
                        caps = self.capabilities = replace(caps, session=msg.session)
                        return caps
                    elif isinstance(msg, Nack) and msg.acked_seq == seq:
                        raise IncompatibleProtocolError(
                            f"firmware on {self.transport.description} refused HELLO ({msg.reason}); it does not "
                            f"speak protocol {PROTOCOL_MAJOR}.x: update the firmware or use a matching host version")
                if time.monotonic() >= deadline:
                    if caps is None and self._bad_capabilities:  # it answered, with a frame no firmware should send
                        raise IncompatibleProtocolError(
                            f"firmware on {self.transport.description} answered HELLO with a malformed CAPABILITIES "
                            f"({self._bad_capabilities}), dropped: its joint table and the frame disagree. Fix the "
                            "firmware (PROTOCOL.md, CAPABILITIES: 16 + 32 bytes per joint, at most 16 joints)")
                    what = ("HELLO" if caps is None else "SAFETY_CONFIG after CAPABILITIES" if caps.safety is None
                            else "SESSION after SAFETY_CONFIG")
                    raise LinkTimeoutError(self._no_answer(what, timeout))
        except BaseException:
            # poll() takes the nonce from the SESSION frame as soon as it is decoded, possibly in the same read as
            # the CAPABILITIES or SAFETY_CONFIG refused above: a refused (or unfinished) hello holds no session,
            # or arm() would still work with it.
            self._session = None
            raise
        finally:
            self._hello_pending = False
            self._awaiting_session = None

    def arm(self, timeout: float = 0.5) -> None:
        """Arm (an operator act): the firmware holds its measured position with torque on.

        Refused (NackError, `.code`) while faults are latched (NackCode.FAULTS_LATCHED: call
        clear_faults() first, as part of the operator's arm), without the enable input (ENABLE_OFF),
        during a category-1 ramp (BUSY), or outside this link's session (BAD_SESSION: another HELLO
        started a new one; call hello() again). Arming never clears a fault by itself."""
        self._await_ack(self.send_arm(), MsgType.ARM, timeout)

    def clear_faults(self, timeout: float = 0.5) -> None:
        """Clear the firmware's latched faults (TRIPPED -> DISARMED; torque stays off). NackError BUSY
        during a category-1 ramp. Only an operator (or a bench tool acting for one) should call this."""
        self._await_ack(self.send_clear_faults(), MsgType.CLEAR_FAULTS, timeout)

    def disarm(self, timeout: float = 0.2, retries: int = 3) -> None:
        """Torque off, confirmed: DISARM is resent until ACKed. Raises DisarmFailedError (no answer after
        `retries` attempts) or LinkDownError; the caller must treat the firmware as possibly armed and
        stop feeding its watchdog, so that it stops on its own."""
        for attempt in range(1, max(1, retries) + 1):
            try:
                self._await_ack(self.send_disarm(), MsgType.DISARM, timeout)
                return
            except LinkTimeoutError:
                log.warning("DISARM not acknowledged by %s (attempt %d of %d)", self.transport.description,
                            attempt, retries)
        raise DisarmFailedError(
            f"the firmware on {self.transport.description} did not acknowledge DISARM after {retries} attempts "
            f"of {timeout:g} s: it may still be armed. Send no HEARTBEAT or SETPOINT so its watchdog stops it, "
            "and check the link")

    def stop(self, category: int, reason: int = 0, timeout: float = 0.05, retries: int = 5) -> bool:
        """Safety stop, acknowledged: 0 = torque off now, 1 = controlled ramp then torque off.

        The first STOP goes out (urgent) before any wait; it is resent every `timeout` s until the
        firmware ACKs one (True) or `retries` attempts went unanswered or the link is down (False, logged
        as an error). Never raises for a lost link: a stop path must not throw."""
        if category not in (0, 1):
            raise ValueError(f"stop category must be 0 or 1, got {category}")
        sent: set[int] = set()
        for _ in range(max(1, retries)):
            try:
                sent.add(self.send_stop(category, reason))
            except LinkDownError as exc:
                log.error("STOP (category %d) could not be sent: %s", category, exc)
                break
            deadline = time.monotonic() + timeout
            while True:
                if any(self.ack_result(s) is True for s in sent):  # a late ACK of an earlier copy counts too
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected:
                    break
                self._poll_once(left, keep=True)
        self.stats.stops_unacknowledged += 1
        log.error("STOP (category %d) not acknowledged by the firmware on %s after %d frame(s); its watchdog is "
                  "the backstop: send it nothing that feeds it", category, self.transport.description, len(sent))
        return False

    # ---- non-blocking commands (one frame, no wait; poll() matches the answers) ----
    def send_arm(self) -> int:
        """ARM in this link's session (nonce 0 without one: the firmware refuses it BAD_SESSION)."""
        return self._send(Arm(self._session or 0))

    def send_disarm(self) -> int:
        return self._send(Disarm())

    def send_clear_faults(self) -> int:
        return self._send(ClearFaults(self._session or 0))

    def send_stop(self, category: int, reason: int = 0) -> int:
        """One urgent STOP frame (on CAN it overtakes queued setpoints); returns its sequence number."""
        if category not in (0, 1):
            raise ValueError(f"stop category must be 0 or 1, got {category}")
        return self._send(Stop(category, reason), urgent=True)

    def ack_result(self, seq: int) -> bool | NackError | None:
        """The firmware's answer to frame `seq`: None (none yet, or older than the last 1024 answers),
        True (ACK), or a NackError (returned, not raised) whose `.code` is a NackCode."""
        ans = self._acks.get(seq)
        if ans is None:
            return None
        if isinstance(ans, Nack):
            try:
                what: object = MsgType(ans.acked_type)
            except ValueError:
                what = f"message type 0x{ans.acked_type:02x}"
            return NackError(self._nack_message(what, ans), ans.code)
        return True

    def keepalive(self) -> int:
        """Prove the link is alive without feeding the firmware's motion watchdog (for a disarmed or stopped
        firmware). ACKed; returns the frame's sequence number."""
        self._keepalives += 1
        return self._send(Keepalive(self._keepalives))

    def send_setpoints(self, positions: ArrayLike, velocities: ArrayLike | None = None,
                       efforts: ArrayLike | None = None, kp: ArrayLike | None = None,
                       kd: ArrayLike | None = None) -> Setpoint:
        """Write one setpoint (SI units); returns the message sent. The firmware clamps to its limits."""
        sp = Setpoint(*(None if a is None else np.asarray(a, dtype=np.float64)
                        for a in (positions, velocities, efforts, kp, kd)))  # type: ignore[arg-type]
        n = len(sp.positions)
        if self.capabilities is not None and n != self.capabilities.joint_count:
            raise ValueError(f"{n} positions for a controller with {self.capabilities.joint_count} joints")
        for name, arr in (("velocities", sp.velocities), ("efforts", sp.efforts), ("kp", sp.kp), ("kd", sp.kd)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} entries, positions has {n}")
        self._send(sp)
        return sp

    def heartbeat(self) -> int:
        """Feed the firmware's motion watchdog (setpoints do too); only while armed and moving. After a
        stop the firmware ignores it; use keepalive() instead. Returns the frame's sequence number."""
        self._heartbeats += 1
        return self._send(Heartbeat(self._heartbeats))

    def poll(self, timeout: float = 0.0) -> list[Message]:
        """Messages decoded since the last call, waiting up to `timeout` s for the first one.

        Never raises for a lost port: returns [] and leaves `connected` False until a reconnect works."""
        if self._inbox:
            out = list(self._inbox)
            self._inbox.clear()
            return out + self._poll_once(0.0, keep=False)
        return self._poll_once(timeout, keep=False)

    # ---- internals ----
    def _accept_capabilities(self, caps: Capabilities) -> Capabilities:
        if caps.protocol_major != PROTOCOL_MAJOR or caps.protocol_minor < MIN_FIRMWARE_MINOR:
            raise IncompatibleProtocolError(
                f"firmware on {self.transport.description} speaks protocol {caps.protocol_major}."
                f"{caps.protocol_minor}, this host needs {PROTOCOL_MAJOR}.{MIN_FIRMWARE_MINOR} or a newer "
                f"{PROTOCOL_MAJOR}.x (1.0 firmware clears latched faults on ARM; 1.1 firmware re-arms on a replayed "
                "session start): flash a matching firmware or install a matching edge-vla")
        if caps.joint_count == 0:  # every safety check is over joints: over none, each would hold vacuously
            raise IncompatibleProtocolError(
                f"firmware on {self.transport.description}: the controller declares 0 joints, so there is nothing to "
                "drive and nothing its safety limits could check; refused before any motion. Fix the firmware's joint "
                "table (the joint count its port passes to fw_init)")
        self.capabilities = caps
        log.info("firmware %s, protocol %d.%d, %d joints (%s)", ".".join(map(str, caps.firmware_version)),
                 caps.protocol_major, caps.protocol_minor, caps.joint_count, ", ".join(caps.joint_names))
        return caps

    def _check_safety_joint_count(self, caps: Capabilities, safety: SafetyConfig) -> None:
        """SAFETY_CONFIG has one row of limits (following error, effort limit, gain caps) per joint CAPABILITIES
        announced. Another count means joints without the limits this host was told they have (a firmware built
        with another arm's table, or a second controller answering on this port/node): no session is taken, so
        nothing can arm, and the refused controller is not described by `capabilities`."""
        if len(safety.joints) == caps.joint_count:
            return
        self.capabilities = None
        raise IncompatibleProtocolError(
            f"firmware on {self.transport.description} announced {caps.joint_count} joints in CAPABILITIES but sent a "
            f"SAFETY_CONFIG for {len(safety.joints)} joints: its safety limits do not describe its joints; refused "
            "before any motion. Fix the firmware's joint/safety tables (one row per joint), and check that only one "
            "controller answers on this port/node")

    def _no_answer(self, what: str, timeout: float) -> str:
        return (f"no answer to {what} from the firmware on {self.transport.description} within {timeout:g} s: check "
                "that the controller is powered and running this protocol, and that the baud rate / CAN bitrate "
                "and node id match")

    def _send(self, msg: Message, urgent: bool = False, expect_reply: bool = True) -> int:
        self._ensure_connected()
        seq = self._seq
        self._seq = (self._seq + 1) & 0xFFFF
        # The u16 sequence number comes round every 65536 frames. An answer kept from the previous wrap (a
        # KEEPALIVE's ACK before a long run of SETPOINTs, which are answered by STATE) would otherwise answer
        # this frame: a lost STOP would read as confirmed. Forget it before the frame goes out.
        self._acks.pop(seq, None)
        self._sent_at.pop(seq, None)
        frame = framing.encode(msg, seq)
        try:
            self.transport.write(frame, urgent)
        except _TRANSPORT_ERRORS as exc:
            self._lost(exc)
            raise LinkDownError(self._down_message()) from exc
        self.stats.frames_sent += 1
        self._sent_since_hello += 1
        if expect_reply:
            self._sent_at[seq] = time.monotonic()
            if len(self._sent_at) > 1024:
                self._sent_at.popitem(last=False)
        return seq

    def _nack_message(self, what: object, nack: Nack) -> str:
        name = getattr(what, "name", what)
        hint = {
            NackCode.FAULTS_LATCHED: "faults are latched; an operator must clear them first (clear_faults(), "
                                     "then arm())",
            NackCode.ENABLE_OFF: "the hardware enable input is not asserted; close the enable circuit first",
            NackCode.STALE_SEQ: "the firmware considers this frame stale (no session, or a sequence number "
                                "outside its window); call hello() to start a new session",
            NackCode.BUSY: "a category-1 stop ramp is in progress; wait for it to end",
            NackCode.BAD_SESSION: "the frame did not carry the firmware's current session: another HELLO (a "
                                  "restarted host, another node on the bus, or a replayed one) started a new "
                                  "session; call hello(), then clear_faults() and arm()",
            NackCode.NOT_ARMED: "the firmware is not armed (or a stop is latched)",
        }.get(nack.code, "")  # type: ignore[call-overload]
        return (f"firmware on {self.transport.description} refused {name}: {nack.reason}"
                + (f" ({hint})" if hint else ""))

    def _await_ack(self, seq: int, msg_type: MsgType, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._poll_once(max(0.0, deadline - time.monotonic()), keep=True):
                if isinstance(msg, Ack) and msg.acked_seq == seq:
                    if isinstance(msg, Nack):
                        raise NackError(self._nack_message(msg_type, msg), msg.code)
                    return
            if time.monotonic() >= deadline:
                raise LinkTimeoutError(self._no_answer(msg_type.name, timeout))
            if not self._connected:
                raise LinkDownError(self._down_message())

    def _poll_once(self, timeout: float, keep: bool) -> list[Message]:
        if not self._connected:
            try:
                self._ensure_connected()
            except LinkDownError:
                return []
        try:
            chunks = self.transport.read(max(0.0, timeout))
        except _TRANSPORT_ERRORS as exc:
            self._lost(exc)
            return []
        finally:
            self._copy_transport_counters()
        now = time.monotonic()
        out: list[Message] = []
        for stream, data in chunks:
            self.stats.bytes_received += len(data)
            decoder = self._decoders.setdefault(stream, framing.StreamDecoder())
            for block in decoder.feed(data):
                msg = self._decode(block, now, stream)
                if msg is not None:
                    out.append(msg)
        if keep:
            self._inbox.extend(out)
        return out

    def _copy_transport_counters(self) -> None:
        """What the transport dropped before decoding (CAN: frames not ours, reads cut at the frame budget) goes
        into `stats`, which the run summary and telemetry read; the transport keeps the running counts."""
        self.stats.ignored_frames.update(self.transport.ignored_frames)
        self.stats.reads_at_budget = self.transport.reads_at_budget

    def _decode(self, block: bytes, now: float, stream: int = 0) -> Message | None:
        raw_type: int | None = None
        try:
            raw = framing.decode_raw(block)
            raw_type = raw.type
            if raw.version != PROTOCOL_MAJOR and raw.type == MsgType.CAPABILITIES and len(raw.payload) >= 2:
                foreign = (f"firmware on {self.transport.description} speaks protocol {raw.payload[0]}.{raw.payload[1]}, "
                           f"this host speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")
                if self._hello_pending:  # the answer to our HELLO: this is the firmware we talk to
                    raise IncompatibleProtocolError(f"{foreign}: flash a matching firmware or install a matching "
                                                    "edge-vla")
                # Outside hello() it answers nothing of ours (noise, a second controller on the port): dropped like
                # any malformed frame. Raising here would throw out of poll() and stop(), and a stop must not throw.
                log.warning("dropped a CAPABILITIES frame outside hello(): %s; is a second controller on this "
                            "port/node?", foreign)
                raise FrameError("bad_field", "CAPABILITIES of another protocol outside hello()")
            msg = framing.decode_message(raw)
            self._check_joint_count(msg)
        except FrameError as exc:
            kind = {"crc": "crc_errors", "framing": "framing_errors"}.get(exc.kind, "bad_messages")
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
            log.debug("dropped frame from %s: %s", self.transport.description, exc)
            if self._hello_pending and raw_type == MsgType.CAPABILITIES:
                self._bad_capabilities = str(exc)
            return None
        if self._hello_pending and isinstance(msg, Capabilities):  # a new session: every stream starts again
            self._last_rx_seq.clear()
            self._newest_rx_seq = None
        verdict = self._state_time(msg, now) if isinstance(msg, State) else "new"
        if verdict == "future":
            self.stats.bad_messages += 1
            return None
        if verdict == "new":
            verdict = self._window(raw.seq, stream)
        if verdict == "duplicate":
            self.stats.duplicates += 1
            return None
        if verdict in ("stale", "old"):
            self.stats.stale += 1
            self._stale_run += 1
            if self._stale_run == 64:
                log.warning("64 frames in a row from %s had old sequence numbers: did the firmware restart? "
                            "call hello() to start a new session", self.transport.description)
            return None
        self._count_drops(raw.seq)
        self._stale_run = 0
        self._last_rx_seq[stream] = raw.seq
        self.stats.frames_received += 1
        self._on_message(msg, now, raw.seq)
        return msg

    def _window(self, seq: int, stream: int) -> str:
        """'new', 'duplicate' or 'stale' (serial-number arithmetic, RFC 1982). A frame must be newer than the last
        one on its stream, and at most REORDER_LIMIT behind the newest of all streams: another stream may overtake
        a few queued frames, but an old frame written again on a quiet stream is still refused."""
        last = self._last_rx_seq.get(stream)
        if last is not None:
            gap = (seq - last) & 0xFFFF
            if gap == 0:
                return "duplicate"
            if gap >= 0x8000:  # older than the last accepted frame of this stream
                return "stale"
        if self._newest_rx_seq is not None:
            behind = (self._newest_rx_seq - seq) & 0xFFFF
            if behind == 0 and last is None:
                return "duplicate"  # the same number on another stream
            if REORDER_LIMIT < behind < 0x8000:
                return "stale"
        return "new"

    def _state_time(self, msg: State, now: float) -> str:
        """'new', 'old' or 'future': whether a STATE's firmware time is one our controller can have sent, judged
        before its sequence number enters the window and its time the clock estimate. A STATE carries no session, so
        this is what tells a STATE of another controller (a second one on the port/node) or a replay (of an earlier
        session, numbered "ahead" once the firmware's u16 numbering came round) from ours: taken, one numbered ahead
        made all our later frames stale (`latest_state` froze), and one from the future pulled the clock estimate.
        'old': older than a STATE already taken (counted as stale, like a replay by number). 'future': further ahead
        of hello()'s SAFETY_CONFIG than host time since the HELLO allows (counted in bad_messages)."""
        t_us = msg.firmware_time_us
        if self._state_time_floor_us is not None and t_us < self._state_time_floor_us:
            return "old"
        if self._time_anchor is not None:
            anchor_us, hello_sent = self._time_anchor
            ahead_s = (t_us - anchor_us - FIRMWARE_TIME_SLACK_US) / 1e6 - (now - hello_sent) * (1 + FIRMWARE_CLOCK_FAST)
            if ahead_s > 0:
                self._future_states += 1
                level = logging.WARNING if self._future_states % 1000 == 1 else logging.DEBUG
                log.log(level, "dropped a STATE from %s whose firmware time is %.3f s ahead of what the controller "
                        "answering hello() can have reached (%d such frames so far): a frame of another controller "
                        "or of another boot; check that only one controller answers on this port/node",
                        self.transport.description, ahead_s, self._future_states)
                return "future"
        return "new"

    def _count_drops(self, seq: int) -> None:
        """Gaps in the firmware's numbering over all streams: a frame that overtook others (an urgent CAN FAULT)
        counts its gap as drops, and each overtaken frame that then arrives takes one back."""
        if self._newest_rx_seq is None:
            self._newest_rx_seq = seq
            return
        gap = (seq - self._newest_rx_seq) & 0xFFFF
        if 0 < gap < 0x8000:
            self.stats.drops += gap - 1
            self._newest_rx_seq = seq
        elif gap and self.stats.drops > 0:
            self.stats.drops -= 1

    def _check_joint_count(self, msg: Message) -> None:
        """A STATE must describe the joints the controller announced: numpy would broadcast one joint's values
        over all of them (and the loop's shared state does), so a CRC-valid STATE with another count (a faulty or
        foreign controller) is dropped like a malformed frame, never becomes `latest_state`.

        So is a SAFETY_CONFIG of another count outside hello() (hello() refuses the session for one, in its own
        words). It never replaces `capabilities.safety`, but taken as our controller's frame its sequence number
        would enter the window (one numbered ahead of ours made all our later frames "stale": `latest_state`
        froze) and its firmware time the clock estimate (another firmware's uptime made our STATEs look that old)."""
        caps = self.capabilities
        if caps is None:
            return
        if isinstance(msg, State):
            what, joints = "STATE", len(msg.positions)
        elif isinstance(msg, SafetyConfig) and self._awaiting_session is None:
            what, joints = "SAFETY_CONFIG", len(msg.joints)
        else:
            return
        if joints == caps.joint_count:
            return
        self._wrong_joint_frames += 1
        # the first and then every 1000th: a controller streaming them at 100 Hz must not flood the log
        level = logging.WARNING if self._wrong_joint_frames % 1000 == 1 else logging.DEBUG
        log.log(level, "dropped a %s for %d joints from %s (%d such frames so far): the controller announced %d at "
                "hello(); check that only one controller answers on this port/node", what, joints,
                self.transport.description, self._wrong_joint_frames, caps.joint_count)
        raise FrameError("bad_field", f"{what} for {joints} joints, controller has {caps.joint_count}")

    def _on_message(self, msg: Message, now: float, seq: int) -> None:
        if isinstance(msg, State):
            self._state_time_floor_us = msg.firmware_time_us  # not older than the floor: _state_time checked it
            fw_t = msg.firmware_time_us / 1e6
            self._latest = JointState(msg.positions, msg.velocities, msg.efforts, msg.fault_bits, msg.mode, fw_t,
                                      now, msg.ack_seq, self.firmware_clock.observe(fw_t, now), msg.status, seq)
            self._rtt(msg.ack_seq, now)
        elif isinstance(msg, SafetyConfig):
            self.firmware_clock.observe(msg.firmware_time_us / 1e6, now)
            if self._awaiting_session is not None:
                self._hello_safety = (seq, msg.firmware_time_us)
        elif isinstance(msg, Session):
            if self._awaiting_session is not None and msg.hello_seq == self._awaiting_session:
                self._session = msg.session or None
                # The SAFETY_CONFIG numbered just before it answers the same HELLO (the firmware sends CAPABILITIES,
                # SAFETY_CONFIG and SESSION back to back), so it was stamped after the HELLO went out: our
                # controller's STATEs are judged from it (_state_time). An older one (another node's HELLO) is not.
                if self._hello_safety is not None and (seq - self._hello_safety[0]) & 0xFFFF == 1:
                    self._state_time_floor_us = self._hello_safety[1]
                    self._time_anchor = (self._hello_safety[1], self._hello_sent)
            elif self._session is not None:  # the answer to someone else's HELLO: that session replaced ours
                self._session = None
                log.warning("the firmware on %s started a session for a HELLO this host did not send (another node on "
                            "the bus, a replayed frame, or a second process on the port): this link's session ended; "
                            "arming needs hello() again", self.transport.description)
        elif isinstance(msg, Ack):  # Nack included
            if isinstance(msg, Nack) and msg.code == NackCode.BAD_SESSION:
                self._session = None
            self._acks[msg.acked_seq] = msg
            if len(self._acks) > ACK_MEMORY:
                self._acks.popitem(last=False)
            self._rtt(msg.acked_seq, now)
        elif isinstance(msg, FaultReport):
            self.faults.append(msg)
            self.fault_count += 1
            # A HOST_STOP_* report is the firmware confirming a stop the host asked for: a planned event, not
            # a fault the operator must look into, so it does not log as a warning.
            level = logging.INFO if msg.fault_code in HOST_REQUESTED_STOPS else logging.WARNING
            log.log(level, "firmware fault on %s: %s (stop category %s, mode %s)", self.transport.description,
                    msg.fault_code.name, msg.stop_category, msg.mode.name)

    def _rtt(self, seq: int, now: float) -> None:
        sent = self._sent_at.pop(seq, None)
        if sent is not None:
            self.stats.rtts.append(now - sent)

    def _lost(self, exc: BaseException) -> None:
        if self._connected:
            log.warning("lost %s: %s", self.transport.description, exc)
        self._connected = False
        self._last_error = str(exc)
        self.transport.close()
        self._retry_at = time.monotonic() + self._backoff

    def _down_message(self) -> str:
        wait = max(0.0, self._retry_at - time.monotonic())
        return (f"{self.transport.description} is down ({self._last_error or 'not open'}); next reconnect attempt in "
                f"{wait:.2f} s. Check the cable, the controller's power, and that the device node still exists; "
                "after reconnecting, call hello(); the firmware will have tripped, and re-arming is an operator "
                "act (clear_faults(), then arm())")

    def _ensure_connected(self) -> None:
        if self._connected:
            return
        if not self._opened:
            raise LinkDownError(f"link on {self.transport.description} is not open: call open() or use `with`")
        if time.monotonic() < self._retry_at:
            raise LinkDownError(self._down_message())
        try:
            self.transport.open()
        except LinkDownError as exc:
            self._last_error = str(exc).split(". Check")[0]
            self._backoff = min(self._backoff * 2, self._max_backoff)
            self._retry_at = time.monotonic() + self._backoff
            raise LinkDownError(self._down_message()) from exc
        self._connected = True
        self._backoff = self._backoff0
        self._last_rx_seq.clear()
        self._newest_rx_seq = None
        self._state_time_floor_us = self._time_anchor = None
        self._session = None  # the firmware may have rebooted: a new HELLO (and its session) first
        for d in self._decoders.values():
            d.reset()
        self.stats.reconnects += 1
        log.warning("reconnected %s; the firmware needs hello() and an operator's arm", self.transport.description)


def open_link(url: str, **kw: object) -> Controller:
    """Kept for callers of firmware_bridge.link.open_link: the scheme registry's `open_link` (firmware_bridge.schemes),
    imported lazily so this module imports none of its backends."""
    from firmware_bridge.schemes import open_link as open_from_registry

    return open_from_registry(url, **kw)
