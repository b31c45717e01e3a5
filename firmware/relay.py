"""Mains contactor with auxiliary-contact feedback, and the residual-current monitor (RDC-DD).

Opening never waits: `Contactor.open()` writes the coil pin and returns. Whether closing is
allowed is decided elsewhere (charger + controller); this module only switches and watches.
"""
import time

from micropython import const

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any

# Feedback must agree with the command within this time, else: welded (commanded open, still
# closed) or failed to close. OpenEVSE waits 1 s for its AC sense; Tinkerforge debounces its
# mirror contact 250 ms (evse-facts section 4).
_FEEDBACK_MISMATCH_MS = const(1000)

WELDED = "welded"
FAILED_TO_CLOSE = "failed_to_close"


class Contactor:
    """Made by wiring.new_contactor (boot code, dropped after it), which opens it."""

    # Set by wiring.new_contactor (annotations only: no code on the board).
    _coil: "Any"  # the coil's Pin
    _feedback: "Any"  # the auxiliary contact's Pin, or None
    _on: int  # the coil's level for closed
    _fb_closed: int  # the feedback's level for closed
    closed: bool  # what we command
    _mismatch_since: "int | None"

    def open(self):
        self._coil.value(1 - self._on)
        self.closed = False

    def close(self):
        self._coil.value(self._on)
        self.closed = True

    def feedback_closed(self):
        """Contacts as the auxiliary contact reports them; None without feedback."""
        if self._feedback is None:
            return None
        return self._feedback.value() == self._fb_closed

    def check(self, now_ms):
        """WELDED or FAILED_TO_CLOSE once feedback has disagreed for _FEEDBACK_MISMATCH_MS."""
        actual = self.feedback_closed()
        if actual is None or actual == self.closed:
            self._mismatch_since = None
            return None
        if self._mismatch_since is None:
            self._mismatch_since = now_ms
        if time.ticks_diff(now_ms, self._mismatch_since) < _FEEDBACK_MISMATCH_MS:
            return None
        return FAILED_TO_CLOSE if self.closed else WELDED


# Residual-current monitor states; the ones no other module reads are const(): not interned.
_UNTESTED = const("untested")
_TESTING = const("testing")  # TEST driven, waiting for FAULT
_RELEASING = const("releasing")  # TEST released, waiting for FAULT to clear
_READY = const("ready")
TRIPPED = "tripped"
TEST_FAILED = "test_failed"
LOCKED_OUT = "locked_out"

# Self-test: FAULT must follow TEST within 500 ms (esp32-evse; Tinkerforge expects ~740 ms at
# most 1.2 s for its module), then clear within 1 s of releasing TEST.
_SELF_TEST_TRIP_MS = const(500)
_SELF_TEST_RELEASE_MS = const(1000)
# Re-closing waits this long after an open (issue 10: a car whose S2 chatters C/B every 250 ms
# got 38 closes in 18 s). Our engineering choice, no standard gives one: IEC 61851-1 Table A.6
# seq. 4 lets the pile take up to 3 s to close after B->C, so 1 s plus the 100 ms B->C debounce
# stays inside it for a car that really asks again; 1 s is also OpenEVSE's relay-check time
# (evse-facts section 4), and it caps a chattering car at about one close a second.
MIN_OPEN_MS = const(1000)

# Residual-current FAULT (docs/safety.md, "RCD timing"). A trip is FAULT active for
# _FAULT_DEBOUNCE_MS, measured in time, not in polls (evse-facts section 3: ~50 ms, a re-read
# rejects spikes): the same at any control period, and a loop stall cannot stretch it. The time
# is integrated: active polls add their interval, inactive ones take it off, so a FAULT that
# chatters (active more than inactive, never 50 ms unbroken) still trips, and a spike does not.
_FAULT_DEBOUNCE_MS = const(50)
# After the contactor switches FAULT may show switching transients (evse-facts section 3 says
# ~1 s). IEC 62955 wants 0.1 s at 200 mA and FAULT does not say how large a leak is, so a leak
# present as the contactor closes must be cut within 0.1 s: 1 s cannot be had. The window is as
# long as the debounce, starts at the first switch of a burst (a switch inside it does not extend
# it) and a FAULT read during it counts from its first reading: a leak present at the close trips
# _FAULT_DEBOUNCE_MS after FAULT is first read, the window adds nothing. Whatever the switching,
# FAULT active for _SWITCH_BLANK_MS + _FAULT_DEBOUNCE_MS trips.
_SWITCH_BLANK_MS = const(50)


class ResidualCurrentMonitor:
    """6 mA DC residual-current module (IEC 62955 RDC-DD) with FAULT output and TEST input.

    A trip is a FAULT read active for _FAULT_DEBOUNCE_MS (_SWITCH_BLANK_MS after a switch, see
    above). After a trip: wait `retry_ms`, self-test again, and lock out
    after `max_trips` (OpenEVSE: 5 min, 6 times). Made by wiring.new_rcd (boot code, dropped
    after it), which sets the state below, untested, TEST released (session_ended()).
    """

    # Set by wiring.new_rcd (annotations only: no code on the board).
    _fault: "Any"  # the FAULT output's Pin
    _test: "Any"  # the TEST input's Pin
    _fault_active: int
    _test_active: int
    retry_ms: int
    max_trips: int
    trips: int
    state: "str | None"
    _since: int
    _fault_ms: int  # FAULT active time, integrated (see _FAULT_DEBOUNCE_MS), while watching
    _fault_poll: "int | None"  # the last poll counted into it; None: FAULT quiet
    _test_on: bool  # TEST driven (TESTING): only once FAULT read inactive
    _switched_ms: "int | None"  # start of the running blanking window; None: none runs

    def _set_test(self, on):
        self._test.value(self._test_active if on else 1 - self._test_active)

    def fault_active(self):
        return self._fault.value() == self._fault_active

    @property
    def ready(self):
        return self.state == _READY

    def start_self_test(self, now_ms):
        """Only with the contactor open. After a trip the retry wait runs out first; a lock-out
        stays until clear_lockout()."""
        if self.state == LOCKED_OUT or self.state == TRIPPED:
            return
        self._begin_test(now_ms)

    def _begin_test(self, now_ms):
        # FAULT already active proves nothing about TEST: drive TEST once it reads inactive.
        self._test_on = not self.fault_active()
        self._set_test(self._test_on)
        self.state = _TESTING
        self._since = now_ms

    def session_ended(self):
        """Car unplugged: the next session starts with a fresh self-test and trip count."""
        if self.state != LOCKED_OUT:
            self._set_test(False)
            self.state = _UNTESTED
            self.trips = 0

    def contactor_switched(self, now_ms):
        """The controller tells each close and open: a window of _SWITCH_BLANK_MS starts, unless
        one runs already (switching never extends it)."""
        if self._switched_ms is None:
            self._switched_ms = now_ms

    def clear_lockout(self):
        if self.state == LOCKED_OUT:
            self.state = _UNTESTED
            self.trips = 0

    def poll(self, now_ms):
        """One step; returns True on the poll that confirms a new trip."""
        state = self.state
        elapsed = time.ticks_diff(now_ms, self._since)
        blanking = False
        if self._switched_ms is not None:
            if time.ticks_diff(now_ms, self._switched_ms) < _SWITCH_BLANK_MS:
                blanking = True
            else:
                self._switched_ms = None  # over (and never compared again across the tick wrap)
        if state != _UNTESTED and state != _READY:
            self._fault_poll = None
        if state == _TESTING:
            if not self._test_on:
                if not self.fault_active():
                    self._test_on = True
                    self._set_test(True)
                    self._since = now_ms
                elif elapsed > _SELF_TEST_TRIP_MS:
                    self.state = TEST_FAILED
                return False
            if self.fault_active():
                self._set_test(False)
                self.state = _RELEASING
                self._since = now_ms
            elif elapsed > _SELF_TEST_TRIP_MS:
                self._set_test(False)
                self.state = TEST_FAILED
            return False
        if state == _RELEASING:
            if not self.fault_active():
                self.state = _READY
            elif elapsed > _SELF_TEST_RELEASE_MS:
                self.state = TEST_FAILED
            return False
        if state == LOCKED_OUT or state == TEST_FAILED:
            return False
        if state == TRIPPED:
            if elapsed >= self.retry_ms and not self.fault_active():
                self._begin_test(now_ms)
            return False
        # UNTESTED or READY: watch for a trip.
        last = self._fault_poll
        step = 0 if last is None else max(0, time.ticks_diff(now_ms, last))
        if not self.fault_active():
            if last is not None:
                self._fault_ms -= step
                self._fault_poll = now_ms if self._fault_ms > 0 else None
            return False
        self._fault_ms = step + (0 if last is None else self._fault_ms)
        self._fault_poll = now_ms
        active = self._fault_ms
        if active < _FAULT_DEBOUNCE_MS or (blanking and active < _SWITCH_BLANK_MS + _FAULT_DEBOUNCE_MS):
            return False
        self._fault_poll = None
        self.trips += 1
        self.state = LOCKED_OUT if self.trips >= self.max_trips else TRIPPED
        self._since = now_ms
        return True
