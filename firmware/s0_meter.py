"""S0 pulse meter (IEC 62053-31, facts section 5), read by polling the pin every control tick.

Polled, not IRQ-driven: the pulses are >= 30 ms and poll() runs every <= 10 ms, so each pulse
is seen several times, and debouncing happens in one place with no ISR state to share.
"""
from micropython import const
import time

from meter import MeterBase, MeterError, Reading, DEFAULT_MAX_POWER_W, DEFAULT_JUMP_SLACK_WH

# A pulse is >= 30 ms (IEC 62053-31, facts section 5). With poll() <= 10 ms apart the first
# and last samples of a 30 ms pulse are >= 20 ms apart, so 20 ms of active level counts.
_DEBOUNCE_MS = const(20)
# Inactive this long before the next pulse may count: a bounce inside a pulse is not a pulse.
_REARM_MS = const(10)
# Active longer than this is a stuck output, not a pulse. Engineering choice: S0 pulses are
# tens of ms (30 ms minimum above); 1 s is far beyond any pulse width.
_STUCK_MS = const(1000)
# No pulse for an hour: power reads 0 (it is below 1000 / imp_per_kwh W by then), and the
# interval is forgotten long before ticks_diff() wraps.
_FORGET_MS = const(3600000)
# P [W] = 3.6e6 / (imp_per_kWh x dt [s]) = 3.6e9 / (imp_per_kWh x dt [ms]) (facts section 5)
_W_MS_PER_IMP_KWH = 3.6e9


class S0Meter(MeterBase):
    """Counts S0 pulses on `pin` (pin.value()); energy counts from start_wh at construction."""

    name = "s0"

    def __init__(self, pin, imp_per_kwh=1000, active_low=True, debounce_ms=_DEBOUNCE_MS,
                 rearm_ms=_REARM_MS, stuck_ms=_STUCK_MS, poll_interval_ms=1000, start_wh=0,
                 max_power_w=DEFAULT_MAX_POWER_W, jump_slack_wh=DEFAULT_JUMP_SLACK_WH):
        super().__init__(max_power_w, jump_slack_wh)
        if imp_per_kwh <= 0:
            raise ValueError("s0: imp_per_kwh must be > 0")
        self._pin = pin
        # Opto output between the pin (pulled up) and GND: conducting = pulse = low level.
        self._active = 0 if active_low else 1
        self.imp_per_kwh = imp_per_kwh
        self._debounce_ms = debounce_ms
        self._rearm_ms = rearm_ms
        self._stuck_ms = stuck_ms
        self._interval_ms = poll_interval_ms
        self._start_wh = start_wh
        self.pulses = 0
        self._level_active = None  # unknown until the first poll
        self._since = 0  # ticks when the present level was first seen
        self._armed = False  # a pulse seen at start-up may be half over: wait for idle first
        self._stuck = False
        self._edge_at = None  # ticks of the last counted pulse's leading edge
        self._pulse_ms = 0  # interval between the last two counted pulses, 0 = unknown
        self._published_at = None

    def poll(self, now_ms):
        """One non-blocking step: sample the pin, count a debounced pulse, publish at intervals."""
        self._expire(now_ms)
        active = self._pin.value() == self._active
        if active != self._level_active:
            was_active = self._level_active
            self._level_active = active
            self._since = now_ms
            if was_active and not active and self._armed:
                self._fail(MeterError("glitch", "s0: pulse shorter than %d ms ignored" % (
                    self._debounce_ms)))
            self._stuck = False
        else:
            held = time.ticks_diff(now_ms, self._since)
            if active:
                if self._armed and held >= self._debounce_ms:
                    self._count(self._since)
                elif not self._stuck and held >= self._stuck_ms:
                    self._stuck = True
                    self._fail(MeterError("stuck", "s0: output stuck active for %d ms" % held))
            elif not self._armed and held >= self._rearm_ms:
                self._armed = True
        if self._stuck:
            return  # nothing can be counted: let the reading age, keep last_error
        if self._published_at is None or \
                time.ticks_diff(now_ms, self._published_at) >= self._interval_ms:
            self._published_at = now_ms
            self._publish(Reading(self.energy_wh(), self.power_w(now_ms), None, None, now_ms))

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
