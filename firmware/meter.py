"""Energy-meter readout, common part: errors, Reading, plausibility guard, RS-485 poller.

Protocols live in modbus_meter.py (Chint DDSU666, Eastron SDM120/SDM630), dlt645.py and
s0_meter.py. Numbers are from docs evse-facts.md section 5 unless a comment says otherwise.
"""
from micropython import const
import time

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any

# Every error kind has a counter in meter.errors.
KINDS = (
    "crc",              # checksum / CRC of a reply wrong
    "timeout",          # no reply at all
    "partial",          # reply started but was cut short
    "garbage",          # bytes that are not a valid reply (bad header, length, BCD, NaN, inf...)
    "wrong_address",    # valid reply, but from another meter
    "exception_reply",  # Modbus exception / DL/T 645 error reply (0xD1)
    "backwards",        # energy register lower than the last good reading
    "jump",             # energy register further ahead than max power x elapsed time allows
    "reboot",           # register restarted: a jump or drop confirmed by the next reading
    "implausible",      # a finite value no pile can show (power above _MAX_POWER_W, 2 kV...)
    "glitch",           # S0: pulse shorter than the debounce time
    "stuck",            # S0: output stuck at the active level
)

# Upper bound for a pile's power: GB/T 20234.2 mode 3 up to 440 V / 63 A three-phase
# (facts section 2) = 3 x 254 V x 63 A = 48 kW.
_MAX_POWER_W = const(50000)
# Register resolution plus rounding: DL/T 645 counts 0.01 kWh = 10 Wh (facts section 5),
# a float32 kWh register steps by up to 16 Wh below 131 MWh.
_JUMP_SLACK_WH = const(20)

# Power above _MAX_POWER_W by more than this fraction is not a pile's: IEC 60038 lets the mains
# run 10 % high (power rises with it at a constant current), plus a class 2 meter's 2 %.
_POWER_MARGIN_DIV = const(8)  # _MAX_POWER_W / 8 = 12.5 %
# Voltage and current: the meter.v1 schema's maximum (docs/schemas); mains is <= 440 V and a
# mode 3 pile <= 63 A (facts section 2), so anything above is not a measurement.
_MAX_V = const(1000)
_MAX_A = const(1000)
# Energy register: the meter.v1 schema's maximum for meter_wh (1 TWh); DL/T 645 tops at 1 GWh.
MAX_WH = 999999999999

# A reading older than this is dropped: ticks_diff() is only right up to 2**29 ms (6.2 days),
# beyond that an old reading would look fresh again. 2**28 ms = 3.1 days.
_MAX_AGE_MS = const(1 << 28)

# A reading not refreshed for this many poll intervals (and at least _STALE_MIN_MS) is stale:
# never shown as the power now (docs/meters.md, "Values that age"). Three: one lost reply is
# common on RS-485, two in a row happen, three mean the meter is not being read.
_STALE_POLLS = const(3)
_STALE_MIN_MS = const(3000)

# Energy against power (docs/meters.md, "Energy against power"): over a window of readings the
# energy register's delta must match the integral of power (trapezoids between readings).
# A window closes once either holds _EP_MIN_WH; it is dropped without a verdict after
# _EP_MAX_MS with less (a pile at rest), or at a gap longer than stale_ms (what the power did
# in a gap is not known). Tolerance: the register's resolution twice (the slack below), plus
# _EP_PCT % of the energy (two measurements, energy and power, each class 2 at worst: IEC
# 62053-21 +-2 %, plus 1 % for the power being read ~0.1 s before the energy in a cycle), plus
# half of each interval's power change x its length (the trapezoid's worst error when power
# moves monotonically between two readings). _EP_BAD_WINDOWS windows in a row outside it
# count one `implausible` error.
_EP_MIN_WH = const(100)
_EP_MAX_MS = const(3600000)
_EP_PCT = const(5)
_EP_BAD_WINDOWS = const(2)

# Bits per character for the wire-time estimates: 1 start + 8 data + parity + 1 stop
# (8E1, DL/T 645) = 11; Modbus RTU also counts 11 (8N2 or 8E1). Too long for 8N1 is safe:
# DE is lowered a little late, and the slave waits >= 3.5 characters before replying.
_BITS_PER_CHAR = const(11)
# After the computed frame time: 1 ms rounding of ticks_ms + 1 ms for the driver to start
# shifting out the first byte after write() returned.
_DE_MARGIN_MS = const(2)


class MeterError(Exception):
    """The only exception the parsers raise. `kind` is one of KINDS, str(err) the message."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class Reading:
    """One complete, checked set of values. voltage_v/current_a are None if the meter has none."""

    def __init__(self, energy_wh, power_w, voltage_v, current_a, taken_ms, epoch=0):
        self.energy_wh = energy_wh  # int, imported active energy, never decreases
        self.power_w = power_w
        self.voltage_v = voltage_v
        self.current_a = current_a
        self.taken_ms = taken_ms  # time.ticks_ms() when the last part was read
        self.epoch = epoch  # meter restarts seen before this reading: a new epoch, a new baseline
        # Checked against another reading by the guard (MeterBase._publish): False for the first
        # one after a boot or a gap, which had nothing to be judged against (docs/meters.md, "A
        # session's meter start"). Made outside a guard (a test's fake): taken as checked.
        self.checked = True

    def __repr__(self):
        return "Reading(%d Wh, %s W, %s V, %s A, at %d)" % (
            self.energy_wh, self.power_w, self.voltage_v, self.current_a, self.taken_ms)


def check_values(new, name="meter"):
    """Raise MeterError unless every value of `new` is a number a pile's meter can show.

    NaN, or energy out of the register's range, is garbage (parsers already refuse a NaN or
    inf on the wire); a number beyond the limits above is implausible, inf included: 3.4e38 kW
    x 1000 is inf on the ESP32 and 3.4e41 on a PC, the same verdict on both. Power is signed,
    bounded both ways: a meter wired backwards or a car's standby can read a little negative;
    it is never billed (energy is) and peak/telemetry clamp it at 0."""
    e = new.energy_wh
    if e < 0 or e > MAX_WH:
        raise MeterError("garbage", "%s: energy %d Wh out of range" % (name, e))
    if e == 0 and new.voltage_v == 0:
        # A meter powered from the line it measures never reads 0 V while it answers: energy
        # and voltage 0 is a meter that has not loaded its registers (docs/meters.md), not a
        # register restarted from 0. Refused, it is never a restart's baseline (over-billing:
        # the true register would be billed from 0 after it).
        raise MeterError("implausible", "%s: energy 0 Wh at 0 V: registers not loaded" % name)
    limit = _MAX_POWER_W + _MAX_POWER_W // _POWER_MARGIN_DIV
    _check_range(new.power_w, -limit, limit, "power", name)
    _check_range(new.voltage_v, 0, _MAX_V, "voltage", name)
    _check_range(new.current_a, -_MAX_A, _MAX_A, "current", name)


def _check_range(x, low, high, what, name):
    if x is None:
        return
    if x != x:  # NaN
        raise MeterError("garbage", "%s: %s is not a number" % (name, what))
    if x < low or x > high:  # never int(x) here: int(inf) raises OverflowError
        raise MeterError("implausible", "%s: %s %s out of %d..%d" % (name, what, x, low, high))


def check_plausible(prev, new, max_power_w=_MAX_POWER_W, slack_wh=_JUMP_SLACK_WH, name="meter"):
    """Raise MeterError if `new` (passed check_values) cannot follow `prev` (the last good
    Reading, or None).

    A lower value is "backwards" (0 too): whether it was a restart, the next reading tells
    (MeterBase._publish)."""
    if prev is None:
        return
    if new.energy_wh < prev.energy_wh:
        raise MeterError("backwards", "%s: energy went backwards %d -> %d Wh" % (
            name, prev.energy_wh, new.energy_wh))
    elapsed_ms = time.ticks_diff(new.taken_ms, prev.taken_ms)
    if elapsed_ms < 0:
        elapsed_ms = 0
    # Wh = W x ms / 3.6e6; integer maths so large elapsed times stay exact.
    allowed_wh = max_power_w * elapsed_ms // 3600000 + slack_wh
    if new.energy_wh - prev.energy_wh > allowed_wh:
        raise MeterError("jump", "%s: energy jumped %d Wh in %d ms (max %d Wh)" % (
            name, new.energy_wh - prev.energy_wh, elapsed_ms, allowed_wh))


class MeterBase:
    """Counters, last good reading and the guard shared by all meter kinds.

    Restarts (docs/meters.md): a reading that goes backwards or jumps is refused and kept as a
    suspect; if the next reading follows the suspect (passes the guard against it), the
    register really restarted (or came back from a restart): counted as "reboot", `epoch`
    goes up, the suspect is published as the new epoch's baseline and the confirming reading
    at the next poll. Energy is only ever a difference within one epoch.

    Each driver names its meter for a session record (docs/telemetry.md, session/ended `meter`)
    with identity(): "<protocol>[:<model>@<address> | :<meter number>]", short: the record must
    stay within the outbox's payload limit (journal.DEFAULT_MAX_PAYLOAD).
    """

    name = "meter"

    # Set by meter_setup.py (boot code, dropped after it; annotations only: no code on the board).
    reading: "Reading | None"
    last_error: "str | None"
    errors: dict  # kind (KINDS) -> count
    epoch: int  # restarts of the meter's register seen (Reading.epoch)
    _suspect: "Reading | None"  # the last refused backwards/jump reading: a restart if confirmed
    _pending: "Reading | None"  # the reading that confirmed a restart, published at the next poll
    _ep_bad: int  # energy-against-power windows in a row outside the tolerance
    _ep_wh: int
    _ep_wms: float
    _ep_ramp_wms: float
    _ep_ms: int

    # Power is measured on its own (False: S0, whose power is derived from the pulses).
    checks_power = True

    def _ep_reset(self):
        self._ep_wh = 0  # register delta over the window
        self._ep_wms = 0.0  # integral of power, W x ms
        self._ep_ramp_wms = 0.0  # trapezoid error budget, W x ms
        self._ep_ms = 0

    def _energy_vs_power(self, prev, new):
        """Add the interval prev -> new to the window; judge the window once it is big enough."""
        if not self.checks_power or prev is None or prev.power_w is None or new.power_w is None \
                or prev.epoch != new.epoch:
            self._ep_reset()
            return
        dt = time.ticks_diff(new.taken_ms, prev.taken_ms)
        if dt <= 0 or dt > self.stale_ms:
            self._ep_reset()
            return
        p0 = prev.power_w if prev.power_w > 0 else 0  # the import register counts no export
        p1 = new.power_w if new.power_w > 0 else 0
        self._ep_wh += new.energy_wh - prev.energy_wh
        self._ep_wms += (p0 + p1) * dt / 2
        self._ep_ramp_wms += abs(p1 - p0) * dt / 2
        self._ep_ms += dt
        integral_wh = self._ep_wms / 3600000
        big = max(self._ep_wh, integral_wh)
        if big < _EP_MIN_WH:
            if self._ep_ms > _EP_MAX_MS:
                self._ep_reset()
            return
        tolerance = 2 * _JUMP_SLACK_WH + big * _EP_PCT / 100 + self._ep_ramp_wms / 3600000
        wh = self._ep_wh
        off = wh - integral_wh
        seconds = self._ep_ms // 1000
        self._ep_reset()
        if -tolerance <= off <= tolerance:
            self._ep_bad = 0
            return
        self._ep_bad += 1
        if self._ep_bad >= _EP_BAD_WINDOWS:
            self._ep_bad = 0
            self._fail(MeterError("implausible", "%s: energy %d Wh in %d s, power says %d Wh "
                                  "(+-%d): energy and power disagree" % (
                                      self.name, wh, seconds, int(integral_wh), int(tolerance))))

    def age_ms(self, now_ms):
        if self.reading is None:
            return None
        return time.ticks_diff(now_ms, self.reading.taken_ms)

    @property
    def stale_ms(self):
        """Older than this, the reading is stale (its values are not what the meter shows now)."""
        return max(_STALE_MIN_MS, _STALE_POLLS * getattr(self, "_interval_ms", 1000))

    def fresh(self, now_ms):
        """The reading, if it is recent enough to be shown as now; else None."""
        r = self.reading
        if r is None or time.ticks_diff(now_ms, r.taken_ms) > self.stale_ms:
            return None
        return r

    def _expire(self, now_ms):
        """First thing of every poll: drop a too old reading, publish a pending one."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            self.reading = pending  # checked against the baseline when the restart was confirmed
            self.last_error = None
        r = self.reading
        if r is not None and time.ticks_diff(now_ms, r.taken_ms) > _MAX_AGE_MS:
            self.reading = None  # and the guard starts afresh with the next reading
            self._suspect = None

    def _fail(self, err):
        self.errors[err.kind] += 1
        self.last_error = str(err)

    def _publish(self, new):
        """Guard, then publish `new`. Returns True if published; the old reading stays if not."""
        new.epoch = self.epoch
        suspect = self._suspect
        self._suspect = None
        try:
            check_values(new, self.name)
            check_plausible(self.reading, new, _MAX_POWER_W, _JUMP_SLACK_WH, self.name)
        except MeterError as err:
            if err.kind == "backwards" or err.kind == "jump":
                if suspect is not None and self._restart(suspect, new):
                    return True
                self._suspect = new
            self._fail(err)
            return False
        prev = self.reading
        new.checked = prev is not None  # the first after a boot or a gap: nothing to follow
        self.reading = new
        self.last_error = None
        self._energy_vs_power(prev, new)
        return True

    def _restart(self, baseline, new):
        """A restart if `new` follows the refused `baseline` (passes the guard against it): then
        a new epoch from `baseline` on, and True."""
        try:
            check_plausible(baseline, new, _MAX_POWER_W, _JUMP_SLACK_WH, self.name)
        except MeterError:
            return False
        self.epoch += 1
        baseline.epoch = new.epoch = self.epoch
        baseline.checked = new.checked = True  # two readings that follow each other
        self._fail(MeterError("reboot", "%s: meter register restarted: %d Wh after %d Wh, "
                              "then %d Wh; new baseline (epoch %d)" % (
                                  self.name, baseline.energy_wh, self.reading.energy_wh,
                                  new.energy_wh, self.epoch)))
        self.reading = baseline
        self._pending = new
        return True


def wire_ms(nbytes, baud):
    """Time for nbytes to leave the wire, rounded up to whole ms."""
    return (nbytes * _BITS_PER_CHAR * 1000 + baud - 1) // baud


# Rs485Meter states
_IDLE = const(0)  # waiting for the next cycle; bus must be silent
_TX = const(1)  # DE high, request on the wire
_RX = const(2)  # DE low, collecting the reply
_GAP = const(3)  # between two requests of a cycle: wait for the inter-frame silence


class Rs485Meter(MeterBase):
    """Non-blocking request/reply poller on a half-duplex RS-485 bus.

    A protocol subclass provides _request() -> the request to send (a buffer made once; it
    also sets self._reply_max, and self._asks_energy True if it reads the energy register),
    _frame_len(buf, n) -> the reply's total length or 0 if not
    known yet, and _take(buf, n) -> True when the cycle's last part is in. _take stores the
    values in _e (Wh), _p (W), _v (V), _i (A) and counts self._step.

    A Reading's taken_ms is when the energy request went out: the meter read its register no
    earlier, so a reading stamped after the contactor opened holds no energy from before.
    """

    # Set by meter_setup.py (boot code, dropped after it; annotations only: no code on the board).
    _uart: "Any"  # a machine.UART (or a test's fake)
    _de: "Any"  # a machine.Pin, or None: transceiver switches direction by itself
    _baud: int
    _timeout_ms: int
    _interval_ms: int
    # Modbus RTU: frames separated by >= 3.5 character times (facts section 5); also kept on
    # DL/T 645 so a late reply to an abandoned request never merges with the next one.
    _gap_ms: int
    _rx: bytearray
    _chunk: bytearray
    _n: int
    _reply_max: int
    _state: int
    _cycle_at: "int | None"  # ticks of the last cycle start
    _quiet_at: "int | None"  # ticks of the last bus activity seen
    _t_end: int  # TX: when the request has left the wire; RX: reply deadline
    _step: int  # part of the cycle
    _e: "int | None"  # the cycle's values so far
    _v: "float | None"
    _i: "float | None"
    _p: "float | None"
    _asks_energy: bool  # set by _request()
    _e_at: int  # ticks when this cycle's energy request went out

    def poll(self, now_ms):
        """One small non-blocking step. Call every control tick."""
        self._expire(now_ms)
        state = self._state
        if state == _TX:
            if time.ticks_diff(now_ms, self._t_end) >= 0:
                if self._de is not None:
                    self._de.value(0)
                self._quiet_at = self._t_end
                self._n = 0
                self._state = _RX
                # The reply gets timeout_ms to start plus its own time on the wire.
                self._t_end = time.ticks_add(  # type: ignore[type-var]  # stub: ticks_ms() results only
                    self._t_end, self._timeout_ms + wire_ms(self._reply_max, self._baud))
            return
        if state == _RX:
            self._receive(now_ms)
            return
        # _IDLE or _GAP: throw away stray bytes and wait until the bus has been silent.
        if self._drain(now_ms):
            return
        if self._quiet_at is not None and time.ticks_diff(now_ms, self._quiet_at) < self._gap_ms:
            return
        if state == _IDLE:
            if self._cycle_at is not None and \
                    time.ticks_diff(now_ms, self._cycle_at) < self._interval_ms:
                return
            self._cycle_at = now_ms
            self._step = 0
            self._e = self._v = self._i = self._p = None
        # Send the cycle's next request.
        frame = self._request()  # type: ignore[attr-defined]  # the protocol subclass's (class doc)
        if self._asks_energy:
            self._e_at = now_ms
        if self._de is not None:
            self._de.value(1)
        self._uart.write(frame)
        # No uart.flush(): it blocks until the last bit left (facts section 5). Lower DE later.
        self._t_end = time.ticks_add(
            now_ms, wire_ms(len(frame), self._baud) + _DE_MARGIN_MS)
        self._state = _TX

    def _drain(self, now_ms):
        uart = self._uart
        n = uart.any()
        if not n:
            return False
        if n > len(self._chunk):
            n = len(self._chunk)
        uart.readinto(self._chunk, n)  # n bytes are there: never waits for the UART timeout
        self._quiet_at = now_ms
        return True

    def _receive(self, now_ms):
        uart = self._uart
        n = uart.any()
        if n:
            self._quiet_at = now_ms
            space = len(self._rx) - self._n
            if n > space:
                self._drain(now_ms)
                self._abort(MeterError("garbage", "%s: reply longer than %d bytes" % (
                    self.name, len(self._rx))))
                return
            got = uart.readinto(self._chunk, n) or 0
            rx = self._rx
            chunk = self._chunk
            pos = self._n
            i = 0
            while i < got:  # copy, not rx[pos:] = ...: a slice would allocate
                rx[pos + i] = chunk[i]
                i += 1
            self._n = pos + got
            try:
                total = self._frame_len(rx, self._n)  # type: ignore[attr-defined]  # as _request
                if total and self._n >= total:
                    if self._take(rx, total):  # type: ignore[attr-defined]
                        self._state = _IDLE
                        self._publish(Reading(self._e, self._p, self._v, self._i, self._e_at))
                    else:
                        self._state = _GAP
                    return
            except MeterError as err:
                self._abort(err)
                return
        if time.ticks_diff(now_ms, self._t_end) >= 0:
            if self._n:
                self._abort(MeterError("partial", "%s: reply cut short, %d bytes then silence" % (
                    self.name, self._n)))
            else:
                self._abort(MeterError("timeout", "%s: no reply within %d ms" % (
                    self.name, self._timeout_ms)))

    def _abort(self, err):
        """A failed part ends the cycle without publishing; retried at the next interval."""
        self._fail(err)
        self._state = _IDLE

