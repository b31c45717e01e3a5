"""S0 pulse meter (IEC 62053-31, facts section 5), counted from pin-interrupt edge times.

The pin's IRQ handler (hard on the ESP32: it runs at the edge, allocation-free) only stores
ticks_ms and the level of each edge in a ring; poll() debounces from those edge times, so a
stalled control loop loses no pulse. A pin without irq() (test fakes) is sampled by poll()
instead, each change taking the poll's time. The S0 output counts itself: it has no register
that could restart, so its readings are always epoch 0. docs/meters.md has the reasoning.
"""
from micropython import const
import time

from meter import MeterBase, MeterError, Reading

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any

# The debounce, rearm and stuck times: s0_setup.build's defaults (IEC 62053-31's 30 ms pulse).

# No pulse for an hour: power reads 0 (it is below 1000 / imp_per_kwh W by then), and the
# interval is forgotten long before ticks_diff() wraps.
_FORGET_MS = const(3600000)
# P [W] = 3.6e6 / (imp_per_kWh x dt [s]) = 3.6e9 / (imp_per_kWh x dt [ms]) (facts section 5)
_W_MS_PER_IMP_KWH = 3.6e9
# Edges the ring holds between two polls: a 200 ms stall sees ~14 edges of 30 ms pulses with
# 30 ms pauses (IEC 62053-31's fastest); a power of two, for the index mask.
_RING = const(32)


class S0Meter(MeterBase):
    """Counts S0 pulses on its pin; energy counts from start_wh at construction. Made by
    s0_setup.build (wiring.make_meter, at the boot), whose use_irq: None = if the pin has irq(),
    True = must (the board), False = sample in poll().
    """

    name = "s0"
    checks_power = False  # power comes from the pulse intervals: nothing independent to check

    def identity(self):
        return "s0"  # a pulse output says nothing of the meter

    # Set by s0_setup.build (boot code, dropped after it; annotations only: no code on the board).
    _pin: "Any"  # a machine.Pin (or a test's fake)
    # Opto output between the pin (pulled up) and GND: conducting = pulse = low level.
    _active: int
    imp_per_kwh: int
    _debounce_ms: int
    _rearm_ms: int
    _stuck_ms: int
    _interval_ms: int
    _start_wh: int
    pulses: int
    _level_active: "bool | None"  # unknown until the first edge or poll
    _since: int  # ticks when the present level began
    # Start of an active level that ended before the debounce: if it resumes within
    # rearm_ms the gap was a spike and the pulse goes on from here (else a glitch).
    _bridge: "int | None"
    _armed: bool  # a pulse seen at start-up may be half over: wait for idle first
    _stuck: bool
    _edge_at: "int | None"  # ticks of the last counted pulse's leading edge
    _pulse_ms: int  # interval between the last two counted pulses, 0 = unknown
    _published_at: "int | None"
    # The ring the IRQ handler fills: made once, the handler only stores small ints.
    _ring_t: "list[int]"
    _ring_v: bytearray
    _head: int  # written by the handler only
    _tail: int  # written by poll() only
    _overrun: bool
    _irq: bool

    def _on_edge(self, pin):
        """The pin's IRQ handler: no allocation, no float, no exception (hard IRQ on the ESP32)."""
        head = self._head
        nxt = (head + 1) & (_RING - 1)
        if nxt == self._tail:
            self._overrun = True
            return
        self._ring_t[head] = time.ticks_ms()  # type: ignore[call-overload]  # stub: ticks type
        self._ring_v[head] = pin.value()
        self._head = nxt

    def _drain(self):
        """Apply the edges the handler stored; returns how many."""
        n = 0
        while self._tail != self._head:
            i = self._tail
            self._change(self._ring_v[i] == self._active, self._ring_t[i])
            self._tail = (i + 1) & (_RING - 1)
            n += 1
        return n

    def poll(self, now_ms):
        """One non-blocking step: apply edges (or sample the pin), count, publish at intervals."""
        self._expire(now_ms)
        if self._irq:
            self._drain()
            active = self._pin.value() == self._active
            # An edge in between reading the ring and the pin is applied by the next drain; only
            # a change no edge explains (ring overrun, level before irq() was set) is taken here.
            if not self._drain() and active != self._level_active:
                self._change(active, now_ms, False)
            if self._overrun:
                self._overrun = False
                self._fail(MeterError("garbage", "s0: more than %d edges between two polls" % (
                    _RING - 1)))
            self._settle(now_ms)  # edges are all in: the level has held until now
        else:
            active = self._pin.value() == self._active
            if active == self._level_active:
                self._settle(now_ms)
            else:  # sampled: when it changed since the last poll is unknown
                self._change(active, now_ms, False)
        if self._stuck:
            return  # nothing can be counted: let the reading age, keep last_error
        if self._published_at is None or \
                time.ticks_diff(now_ms, self._published_at) >= self._interval_ms:
            self._published_at = now_ms
            self._publish(Reading(self.energy_wh(), self.power_w(now_ms), None, None, now_ms))

    def _change(self, active, at_ms, held=True):
        """The level became `active` at at_ms; held: the old one lasted until then (an edge)."""
        if active == self._level_active:
            return
        if held:
            self._settle(at_ms)
        bridge = self._bridge
        if bridge is not None:  # active again after a gap in a pulse shorter than the debounce
            self._bridge = None
            if time.ticks_diff(at_ms, self._since) < self._rearm_ms:
                self._level_active = True  # a spike (EMI) inside the pulse: the pulse goes on
                self._since = bridge
                return
            self._glitch()
        if self._level_active and self._armed:  # the active level ended before the debounce:
            self._bridge = self._since  # a glitch, unless it resumes within rearm_ms
        self._level_active = active
        self._since = at_ms
        self._stuck = False

    def _settle(self, at_ms):
        """What the present level, held since self._since, means at at_ms."""
        if self._level_active is None:
            return
        held = time.ticks_diff(at_ms, self._since)
        if self._level_active:
            if self._armed and held >= self._debounce_ms:
                self._count(self._since)
            elif not self._stuck and held >= self._stuck_ms:
                self._stuck = True
                self._fail(MeterError("stuck", "s0: output stuck active for %d ms" % held))
        elif held >= self._rearm_ms:
            self._armed = True
            if self._bridge is not None:  # the pulse did not resume: it was a glitch
                self._bridge = None
                self._glitch()

    def _glitch(self):
        self._fail(MeterError("glitch", "s0: pulse shorter than %d ms ignored" % self._debounce_ms))

    def _count(self, edge_ms):
        self._armed = False
        self.pulses += 1
        if self._edge_at is not None:
            self._pulse_ms = time.ticks_diff(edge_ms, self._edge_at)
        self._edge_at = edge_ms

    def energy_wh(self):
        return self._start_wh + self.pulses * 1000 // self.imp_per_kwh

    def power_w(self, now_ms):
        """From the last pulse interval; falls as time passes without a pulse."""
        if not self._pulse_ms:
            return 0.0
        dt = time.ticks_diff(now_ms, self._edge_at)
        if dt > _FORGET_MS:
            self._pulse_ms = 0
            return 0.0
        if dt < self._pulse_ms:
            dt = self._pulse_ms
        return _W_MS_PER_IMP_KWH / (self.imp_per_kwh * dt)
