"""The control tick: read pilot and RCD -> classify -> debounce -> charger -> outputs. Only that:
the meter and the session records are the records step's (session_record.py), which the main
loop runs after the tick.

Every effect on the contactor and the pilot happens in `_apply`, in this order: power off
(never waits), pilot, power on (only after re-checking this very tick's reading).
"""
import time

from micropython import const

import charger as ch
import pilot
import relay

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any, Callable

# At most one change of the offered current per 5 s (IEC 61851-1 Table A.6, evse-facts).
_OFFER_CHANGE_MIN_MS = const(5000)
# The first PWM periods after switching it on say nothing about the diode yet.
_DIODE_SETTLE_MS = const(5)
# Two bad bursts in a row make a diode fault; one can be a sampling glitch.
_DIODE_BAD_BURSTS = const(2)
# A stuck pilot ADC (issue 10 item 2). A 1.1 ms burst spans a whole PWM period, so it holds the
# minus phase; at duty <= 90 % (up to 65 A) the longest piece of it inside a burst is >= 100 us,
# about 3 ESP32 ADC reads of ~35 us (evse-facts section 6). Above 90 % it can fall between two
# reads (96 %: ~40 us): not judged there (pilot.diode_check says None).
_MINUS_PHASE_MAX_DUTY = const(58981)  # 90 % of 65535
# Bursts in a row with no minus phase at all that make a pilot fault. A burst whose reads left a
# wait as long as the minus phase's shortest piece (pilot.minus_piece_us: a stall inside it, a
# GC, a flash write, an interrupt storm, a busy host) is not judged: its reads may all have
# fallen in the plus phase. Shorter waits can still lose a read or two at the edges, the reason
# _DIODE_BAD_BURSTS is 2; three unstalled bursts in a row with no minus sample are a fault. 3
# bursts at the 5 ms default period take 10-15 ms, inside DEBOUNCE_POWER_OFF_MS: a frozen ADC
# hiding a C->B is caught as fast as a real C->B (at the longest period, 20 ms, 60 ms: still inside
# Table A.6's 100 ms).
_NO_MINUS_BURSTS = const(3)
# However stalled the bursts, _NO_MINUS_BURSTS or more in a row over this long with no minus
# sample at all (PWM on, judged duty, not E) are a pilot fault too: a frozen ADC whose every burst
# is stalled (reads each slower than the piece, an interrupt source near 1 kHz) would otherwise
# never be judged. 60 ms plus one period (20 ms at the longest) stays inside Table A.6's 100 ms
# for a C->B the frozen ADC hides; a shorter run of stalls (a busy moment) is no fault, nor one
# loop stall (the bursts count, not only the time).
_NO_MINUS_MAX_MS = const(60)
# A guard's burst that took longer than this was stalled inside (an interrupt storm; a busy host):
# it may hold a single sample, from the minus phase, and say nothing of the state. Not judged:
# the next read (a guard's or the tick's) comes right after it. One with a wait between two
# reads over pilot.BURST_GAP_MAX_US (the sampler's gap_us) that reads another state than the
# stable one is in doubt; the tick and the guard take such a burst again at once and judge the
# last whatever it holds (the guard: one not longer than this; a guard never judging one missed
# a C->B through all of slow work while every burst stalled a little over 100 us): after an
# iteration longer than DEBOUNCE_POWER_OFF_MS the first non-C/D reading opens, and a torn X cut
# off a car still in C (docs/safety.md, "A stalled burst is no reading").
GUARD_BURST_MAX_US = 2 * pilot.BURST_US
# Bursts a tick takes at most while the last is in doubt: on a busy host two torn in a row were
# still seen (2 runs in 12); the last is judged whatever it holds. 3.3 ms at most, only in doubt.
_TICK_BURSTS_IN_DOUBT = const(3)
# While plugged, PP (CC) is read again this often: a lower rating goes out at once.
_PP_REREAD_MS = const(100)
# A higher rating read while plugged is taken back only once read steadily this long: a flicker
# up is noise, but one bad reading (which took the offer away) must not end the session until
# the car is unplugged. Our choice; the 5 s offer rule still paces the duty going up.
_PP_RAISE_MS = const(1000)


class Controller:
    """The control tick. Made by wiring.new_controller (boot code, dropped after it), which sets
    the state below: nothing seen yet, pilot F."""

    # Set by wiring.new_controller (annotations only: no code on the board).
    # What the tick reads and drives: the pilot's sampler and output, the contactor, the RCD
    # monitor, and the cable: a PP input (`proximity`), or a tethered cable's rating in mA.
    sampler: "pilot.PilotSampler"
    output: "pilot.PilotOutput"
    contactor: "relay.Contactor"
    rcd: "relay.ResidualCurrentMonitor"
    proximity: "pilot.ProximityInput | None"
    tethered_cable_ma: int
    charger: "ch.Charger"
    standard: str  # pilot.IEC or pilot.GBT
    # The records step (session_record.Records), run by the main loop after each tick: the tick
    # only reads its `ready` (no contactor close before the session's meter start is known and
    # the flash takes records). None: no such gate (tests of the safety core alone).
    records: "Any"
    _report: "Callable[[int, str, str], object] | None"
    # PWM removed while the car stays in C (C2 -> C1): the car should drop to B; the pile opens
    # under load after 6 s at most (IEC 61851-1 Table A.6 seq. 10.2). GB/T 18487.1 gives the car
    # 3 s after the pile returns to +12 V (evse-facts section 1).
    _c1_force_open_ms: int
    debouncer: "pilot.PilotDebouncer"
    raw: str
    _pwm_changed_ms: int
    _offer_changed_ms: "int | None"
    _bad_diode_bursts: int
    _no_minus_bursts: int
    _minus_seen_ms: int  # when a burst last saw the minus phase (or could not: E, > 90 %)
    _no_minus_run: int  # bursts since then, stalled ones too
    _pwm_settling_ms: "int | None"  # when the PWM went on, until _DIODE_SETTLE_MS passed
    diode_checked: bool
    _last_open_ms: "int | None"  # when the contactor last opened, until MIN_OPEN_MS passed
    _pp_read_ms: int
    _pp_higher_ms: "int | None"  # since when a higher rating than cable_ma has been read

    def _emit(self, now_ms, what, text):
        if self._report is not None:
            self._report(now_ms, what, text)

    # -- the tick -----------------------------------------------------------------------------------

    def tick(self, now_ms):
        out = self.output
        charger = self.charger
        if out.mode == pilot.MODE_F:
            # Driving -12 V: nothing to read; re-acquire from scratch when F ends.
            self.raw = pilot.F
            self.debouncer.reset(pilot.F)
        else:
            self._read_pilot(now_ms)
        stable = self.debouncer.state
        if self.contactor.closed and stable != pilot.C and stable != pilot.D:
            self._open(now_ms)  # the guard's rule, first: `_apply` would open it too, later

        if self.rcd.poll(now_ms):
            self._open(now_ms)  # a trip opens at once, before anything else is decided
            self._emit(now_ms, "rcd", "trip %d of %d" % (self.rcd.trips, self.rcd.max_trips))
        self._check_contactor(now_ms)
        self._check_diode(now_ms)

        if charger.plugged and self.proximity is not None and \
                abs(time.ticks_diff(now_ms, self._pp_read_ms)) >= _PP_REREAD_MS:
            self._read_cable(now_ms, lower_only=True)

        charger.set_condition(now_ms, ch.FAULT_PILOT_SHORT, stable == pilot.E)
        charger.set_condition(now_ms, ch.FAULT_PILOT_INVALID, stable == pilot.X)
        rcd_state = self.rcd.state
        charger.set_condition(now_ms, ch.FAULT_RCD_TRIP, rcd_state == relay.TRIPPED)
        if rcd_state == relay.TEST_FAILED:
            charger.raise_fault(now_ms, ch.FAULT_RCD_SELF_TEST)
        elif rcd_state == relay.LOCKED_OUT:
            charger.raise_fault(now_ms, ch.FAULT_RCD_LOCKOUT)

        records = self.records
        events = charger.step(now_ms, stable, self.rcd.ready and (records is None or records.ready))
        if events & ch.EV_CAR_PLUGGED_IN:
            self._read_cable(now_ms)
            self.rcd.start_self_test(now_ms)  # before every session, contactor open (IEC 62955)
        elif events & ch.EV_CAR_REQUESTED_POWER:
            self._read_cable(now_ms)
        if events & ch.EV_CAR_UNPLUGGED:
            self.rcd.session_ended()
            charger.cable_ma = 0
        self._apply(now_ms, stable)
        # Everything below may take its time: the safety work of this tick is done.
        if charger.settings_due:  # a latched fault raised or cleared: kept across reboots
            problem = charger.save_settings()
            if problem is not None:
                self._emit(now_ms, "storage", "latched faults " + problem)

    def guard(self, now_ms):
        """The safety half of a tick, between slices of slow work while the contactor is closed
        (main.py, the link, the records step): a pilot burst through the same debouncer, the
        RCD. It only ever opens: power goes on in the tick alone (`_apply`). Contactor open:
        nothing to guard, nothing read (no cost)."""
        if not self.contactor.closed:
            return
        if self.output.mode != pilot.MODE_F:
            # A burst in doubt is taken again as in the tick, the last judged whatever it holds:
            # never judging one left a C->B unread through slow work while every burst stalled.
            n = 0
            while True:
                start = time.ticks_us()
                self.sampler.sample()
                n += 1
                if n >= _TICK_BURSTS_IN_DOUBT or not self._in_doubt():
                    break
            if time.ticks_diff(time.ticks_us(), start) <= GUARD_BURST_MAX_US:
                stable = self._judge(now_ms)
                if stable != pilot.C and stable != pilot.D:
                    self._open(now_ms)  # the car stopped drawing (or E, X): the tick does the rest
        if self.rcd.poll(now_ms):
            self._open(now_ms)
            self._emit(now_ms, "rcd", "trip %d of %d" % (self.rcd.trips, self.rcd.max_trips))

    def _read_pilot(self, now_ms):
        """One burst -> raw state -> the debouncer; the stable state. A burst in doubt is taken
        again, up to _TICK_BURSTS_IN_DOUBT in all: the tick judges the last whatever it holds."""
        sampler = self.sampler
        sampler.sample()
        n = 1
        while n < _TICK_BURSTS_IN_DOUBT and self._in_doubt():
            if sampler.minus_mv < 0:  # a torn X still shows the ADC following the PWM
                self._no_minus_bursts = self._no_minus_run = 0
                self._minus_seen_ms = now_ms
            sampler.sample()
            n += 1
        return self._judge(now_ms)

    def _in_doubt(self):
        """The last burst stalled inside and reads another state than the stable one: it may
        have missed the plus phase (a lone minus-phase sample reads X). Only stalled bursts are
        classified here: a whole one costs nothing more."""
        sampler = self.sampler
        return (sampler.gap_us > pilot.BURST_GAP_MAX_US
                and pilot.classify(sampler.plus_mv, self.standard) != self.debouncer.state)

    def _judge(self, now_ms):
        raw = self.raw = pilot.classify(self.sampler.plus_mv, self.standard)
        debouncer = self.debouncer
        old = debouncer.state
        if debouncer.update(raw, now_ms):
            self._emit(now_ms, "pilot", old + " -> " + debouncer.state)
        return debouncer.state

    def _check_contactor(self, now_ms):
        problem = self.contactor.check(now_ms)
        if problem == relay.WELDED:
            self.charger.raise_fault(now_ms, ch.FAULT_WELDED)
        elif problem == relay.FAILED_TO_CLOSE:
            self._open(now_ms)
            self.charger.raise_fault(now_ms, ch.FAULT_CONTACTOR_FAILED_TO_CLOSE)

    def _check_diode(self, now_ms):
        """IEC 61851-1: the diode is checked before the contactor closes. Judged on every burst
        taken with PWM running on a B/C/D plus level."""
        self.diode_checked = False
        duty = self.output.duty
        if duty is None or self.raw == pilot.F:  # no PWM
            return
        if self._pwm_settling_ms is not None:
            if time.ticks_diff(now_ms, self._pwm_settling_ms) < _DIODE_SETTLE_MS:
                return
            self._pwm_settling_ms = None  # never compared again across the tick wrap (2^29 ms on)
            self._minus_seen_ms = now_ms
            self._no_minus_run = 0
        seen = pilot.diode_check(self.sampler.minus_mv, self.standard)
        if seen is None and self.raw != pilot.E and duty <= _MINUS_PHASE_MAX_DUTY:
            if self.sampler.gap_us < pilot.minus_piece_us(duty):
                self._no_minus_bursts += 1  # the ADC does not follow the PWM (E: both ~0 V)
            # else stalled inside: its reads may all have missed the minus phase, not counted
            self._no_minus_run += 1
            if self._no_minus_bursts >= _NO_MINUS_BURSTS or (
                    self._no_minus_run >= _NO_MINUS_BURSTS
                    and time.ticks_diff(now_ms, self._minus_seen_ms) >= _NO_MINUS_MAX_MS):
                self.charger.raise_fault(now_ms, ch.FAULT_PILOT_STUCK)
            return
        self._no_minus_bursts = self._no_minus_run = 0
        self._minus_seen_ms = now_ms
        if seen is None or self.raw not in (pilot.B, pilot.C, pilot.D):
            return
        if seen:
            self._bad_diode_bursts = 0
            self.diode_checked = True
            return
        self._bad_diode_bursts += 1
        if self._bad_diode_bursts >= _DIODE_BAD_BURSTS:
            self.charger.raise_fault(now_ms, ch.FAULT_DIODE)

    def _read_cable(self, now_ms, lower_only=False):
        """At plug-in and at C: the rating read. In between (lower_only) only a lower one is
        taken: a cable does not get stronger while plugged, a flicker up is noise."""
        if self.proximity is None:
            self.charger.cable_ma = self.tethered_cable_ma
            return
        self._pp_read_ms = now_ms
        ohms = self.proximity.ohms()
        amps = pilot.cable_rating_a(ohms, self.standard)
        higher = amps * 1000 > self.charger.cable_ma
        if lower_only and higher:
            if self._pp_higher_ms is None:
                self._pp_higher_ms = now_ms
            if time.ticks_diff(now_ms, self._pp_higher_ms) < _PP_RAISE_MS:
                return
        self._pp_higher_ms = None
        if amps * 1000 != self.charger.cable_ma:
            if amps and not self.charger.cable_ma and self.rcd.ready and not self.contactor.closed:
                # A cable arrived: a plug-in the pilot may have missed (an ADC frozen at B or C
                # since before the car; no PWM without a cable to show it). Its own self-test.
                self.rcd.start_self_test(now_ms)
            self.charger.cable_ma = amps * 1000
            self._emit(now_ms, "cable", "%s ohm -> %d A" % (ohms, amps) if amps else
                       "not recognised (%s ohm): nothing offered" % ohms)

    # -- effects ------------------------------------------------------------------------------------

    def _apply(self, now_ms, stable):
        charger = self.charger
        out = self.output
        contactor = self.contactor
        power = charger.power
        car_draws = stable == pilot.C or stable == pilot.D

        # 1. Power off first, never waiting for anything.
        if contactor.closed:
            if power == ch.POWER_ON and car_draws:
                keep = True
            elif power == ch.POWER_HOLD and car_draws and charger.pilot_mode != ch.MODE_OFFER \
                    and charger.cable_ma:
                # C2 -> C1: the PWM goes (later in this tick) or went; the car gets its time.
                # Not without a valid cable read: 0 A through it, the plug may be coming out.
                keep = out.pwm_on or time.ticks_diff(now_ms, self._pwm_changed_ms) < self._c1_force_open_ms
            else:
                keep = False
            if not keep:
                self._open(now_ms)

        # 2. The pilot.
        mode = charger.pilot_mode
        duty = None
        if mode == ch.MODE_OFFER:
            duty = pilot.duty_for_current(charger.offer_ma, self.standard)
            if duty is None:
                # The cable read at this tick's plug-in or B->C came after the charger's step and
                # took the offer below 6 A: nothing is offered (the next step says so too).
                mode = pilot.MODE_PLUS
        if mode == pilot.MODE_F:
            if out.mode != pilot.MODE_F:
                out.state_f()
                self._pwm_changed_ms = now_ms
                self._emit(now_ms, "pwm", "F (-12 V)")
        elif mode == ch.MODE_OFFER:
            self._offer(now_ms, duty)
        elif out.mode != pilot.MODE_PLUS:
            out.steady_plus()
            self._pwm_changed_ms = now_ms
            self._emit(now_ms, "pwm", "off (+12 V)")

        # 3. Power on last: only what the state machine allows, re-checked against this tick.
        if self._last_open_ms is not None and \
                time.ticks_diff(now_ms, self._last_open_ms) >= relay.MIN_OPEN_MS:
            self._last_open_ms = None  # never compared again across the tick wrap
        if (
            not contactor.closed
            and power == ch.POWER_ON
            and self.raw == stable
            and car_draws
            and out.pwm_on
            and out.duty <= self._safe_duty()
            and self._last_open_ms is None
            and self.diode_checked
            and self.rcd.ready
            and not charger.faults
            and self._cable_holds(now_ms)
        ):
            contactor.close()
            self.rcd.contactor_switched(now_ms)
            self._emit(now_ms, "contactor", "closed")

    def _cable_holds(self, now_ms):
        """The last check before a close: PP read in this tick, not _PP_REREAD_MS ago. PP open (or
        in no band) with the pilot at C is a plug coming out: PP breaks first, by design."""
        if self.proximity is not None and self._pp_read_ms != now_ms:
            self._read_cable(now_ms, lower_only=True)
        return self.output.duty <= self._safe_duty()

    def _open(self, now_ms):
        """Open at once; the time is kept for the re-close limit (relay.MIN_OPEN_MS)."""
        was_closed = self.contactor.closed
        self.contactor.open()
        if was_closed:
            self._last_open_ms = now_ms
            self.rcd.contactor_switched(now_ms)
            self._emit(now_ms, "contactor", "open")

    def _safe_duty(self):
        """The highest duty the cable, the board and the config allow (0: none)."""
        duty = pilot.duty_for_current(self.charger.safety_ma, self.standard)
        return 0 if duty is None else duty

    def _offer(self, now_ms, duty):
        out = self.output
        if out.duty == duty:
            return
        if out.pwm_on and out.duty <= self._safe_duty():
            # The 5 s rule, except for a decrease the cable, board or config demand: at once.
            last = self._offer_changed_ms
            if last is not None and 0 <= time.ticks_diff(now_ms, last) < _OFFER_CHANGE_MIN_MS:
                return  # the new offer goes out when the 5 s are over
        if not out.pwm_on:
            self._pwm_changed_ms = self._pwm_settling_ms = now_ms
            self._bad_diode_bursts = 0
            self._no_minus_bursts = 0
        out.offer(duty)
        self._offer_changed_ms = now_ms
        self._emit(now_ms, "pwm", "offer %d.%d%% duty" % (duty * 1000 // 65535 // 10,
                                                          duty * 1000 // 65535 % 10))

    # -- commands from outside (remote, technician) -----------------------------------------------

    def clear_fault(self, now_ms, name):
        """Clear a latched fault if its cause is gone. Returns a short result text."""
        bit = ch.fault_bit(name)
        if not bit & self.charger.faults:
            return "not active"
        if not bit & ch.LATCHED_FAULTS:
            return "clears by itself"
        if bit & (ch.FAULT_WELDED | ch.FAULT_LATCH_STATE_LOST) and self.contactor.feedback_closed():
            return "contactor still reads closed"
        if bit == ch.FAULT_RCD_LOCKOUT:
            self.rcd.clear_lockout()
        self.charger.clear_latched(now_ms, bit)
        # Saved now, not after the next tick: in service mode (diag.clear_fault) no tick runs.
        # Never inside a tick's safety work: this is called by the MQTT link or diag.
        problem = self.charger.save_settings()
        if problem is not None:
            return "cleared, but " + problem
        return "cleared"

    def safe_off(self):
        """Contactor open, pilot to F. For the last-resort error path: touches only the pins."""
        self.contactor.open()
        self.output.state_f()
