"""The control tick: read pilot and RCD -> classify -> debounce -> charger -> outputs.

Every effect on the contactor and the pilot happens in `_apply`, in this order: power off
(never waits), pilot, power on (only after re-checking this very tick's reading).
"""
import time

from micropython import const

import charger as ch
import pilot
import relay

# PWM removed while the car stays in C (C2 -> C1): the car should drop to B; the pile opens
# under load after 6 s at most (IEC 61851-1 Table A.6 seq. 10.2). GB/T 18487.1 gives the car
# 3 s after the pile returns to +12 V (evse-facts section 1).
C1_FORCE_OPEN_MS = {pilot.IEC: 6000, pilot.GBT: 3000}
# At most one change of the offered current per 5 s (IEC 61851-1 Table A.6, evse-facts).
OFFER_CHANGE_MIN_MS = const(5000)
# The first PWM periods after switching it on say nothing about the diode yet.
DIODE_SETTLE_MS = const(5)
# Two bad bursts in a row make a diode fault; one can be a sampling glitch.
DIODE_BAD_BURSTS = const(2)
# A stuck pilot ADC (issue 10 item 2). A 1.1 ms burst spans a whole PWM period, so it holds the
# minus phase; at duty <= 90 % (up to 65 A) the longest piece of it inside a burst is >= 100 us,
# about 3 ESP32 ADC reads of ~35 us (evse-facts section 6). Above 90 % it can fall between two
# reads (96 %: ~40 us): not judged there (pilot.diode_check says None).
MINUS_PHASE_MAX_DUTY = const(58981)  # 90 % of 65535
# Bursts in a row with no minus phase at all that make a pilot fault. One burst can lose it to a
# stall inside the burst (GC, a flash write, an interrupt), the reason DIODE_BAD_BURSTS is 2; two
# such stalls in a row are still conceivable, three are not. 3 bursts at the 5 ms default period
# take 10-15 ms, inside DEBOUNCE_POWER_OFF_MS: a frozen ADC hiding a C->B is caught as fast as a
# real C->B (at the longest period, 20 ms, 60 ms: still inside Table A.6's 100 ms).
NO_MINUS_BURSTS = const(3)
# While plugged, PP (CC) is read again this often: a lower rating goes out at once.
PP_REREAD_MS = const(100)
# A higher rating read while plugged is taken back only once read steadily this long: a flicker
# up is noise, but one bad reading (which took the offer away) must not end the session until
# the car is unplugged. Our choice; the 5 s offer rule still paces the duty going up.
PP_RAISE_MS = const(1000)
# A session's record closes with a meter reading taken at least this long after the contactor
# opened (the contacts part within ~10 ms), so the last watt-hour is in it; without one (meter
# silent), it closes with the last good reading after FINAL_READING_MAX_MS.
METER_SETTLE_MS = const(50)
FINAL_READING_MAX_MS = const(10000)
# After a meter_failure stop the meter had been silent for meter_failure_ms already: wait this
# long (three polls at the default 1 s) for it to answer again before closing on a stale reading.
METER_FAILURE_FINAL_WAIT_MS = const(3000)
# A session's meter start is a reading taken after its plug-in, or at most this old: one or two
# lost replies at the default poll (1 s, DL/T 645 2 s). An older one may predate a meter restart.
START_READING_MAX_AGE_MS = const(5000)


class Controller:
    def __init__(self, sampler, output, contactor, rcd, charger, standard,
                 proximity=None, tethered_cable_ma=0, report=None,
                 meter=None, meter_failure_ms=30000, session_log=None):
        self.sampler = sampler
        self.output = output
        self.contactor = contactor
        self.rcd = rcd
        self.charger = charger
        self.standard = standard
        self.proximity = proximity
        self.tethered_cable_ma = tethered_cable_ma
        self._report = report
        self._c1_force_open_ms = C1_FORCE_OPEN_MS[standard]
        self.debouncer = pilot.PilotDebouncer(pilot.F)
        self.raw = pilot.F
        self._pwm_changed_ms = 0
        self._offer_changed_ms = None
        self._bad_diode_bursts = 0
        self._no_minus_bursts = 0
        self._pwm_settling_ms = None  # when the PWM went on, until DIODE_SETTLE_MS passed
        self.diode_checked = False
        self._last_open_ms = None  # when the contactor last opened, until MIN_OPEN_MS passed
        self._pp_read_ms = 0
        self._pp_higher_ms = None  # since when a higher rating than cable_ma has been read
        self.meter = meter
        self.meter_failure_ms = meter_failure_ms
        self.session_log = session_log
        self._closed_ms = 0
        self._opened_ms = 0
        self.record = None  # the session whose record is open (outlives charger.session on unplug)
        self._meter_error = None

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
            self.sampler.sample()
            self.raw = pilot.classify(self.sampler.plus_mv, self.standard)
            old = self.debouncer.state
            if self.debouncer.update(self.raw, now_ms):
                self._emit(now_ms, "pilot", old + " -> " + self.debouncer.state)
        stable = self.debouncer.state

        if self.rcd.poll(now_ms):
            self._open(now_ms)  # a trip opens at once, before anything else is decided
            self._emit(now_ms, "rcd", "trip %d of %d" % (self.rcd.trips, self.rcd.max_trips))
        self._check_contactor(now_ms)
        self._check_diode(now_ms)

        if charger.plugged and self.proximity is not None and \
                abs(time.ticks_diff(now_ms, self._pp_read_ms)) >= PP_REREAD_MS:
            self._read_cable(now_ms, lower_only=True)

        charger.set_condition(now_ms, ch.FAULT_PILOT_SHORT, stable == pilot.E)
        charger.set_condition(now_ms, ch.FAULT_PILOT_INVALID, stable == pilot.X)
        rcd_state = self.rcd.state
        charger.set_condition(now_ms, ch.FAULT_RCD_TRIP, rcd_state == relay.TRIPPED)
        if rcd_state == relay.TEST_FAILED:
            charger.raise_fault(now_ms, ch.FAULT_RCD_SELF_TEST)
        elif rcd_state == relay.LOCKED_OUT:
            charger.raise_fault(now_ms, ch.FAULT_RCD_LOCKOUT)

        events = charger.step(now_ms, stable, self.rcd.ready and self._meter_start_known())
        if events & ch.EV_CAR_PLUGGED_IN:
            if self.record is not None:  # replugged before the last record got its reading
                self._close_record(now_ms, self.record, force=True)
            self.record = charger.session
            self._read_cable(now_ms)
            self.rcd.start_self_test(now_ms)  # before every session, contactor open (IEC 62955)
        elif events & ch.EV_CAR_REQUESTED_POWER:
            self._read_cable(now_ms)
        if events & ch.EV_CAR_UNPLUGGED:
            self.rcd.session_ended()
            charger.cable_ma = 0
        self._apply(now_ms, stable)
        # Everything below may take its time: the safety work of this tick is done.
        self._meter_and_records(now_ms)
        if charger.settings_due:  # a latched fault raised or cleared: kept across reboots
            problem = charger.save_settings()
            if problem is not None:
                self._emit(now_ms, "storage", "latched faults " + problem)

    def _meter_and_records(self, now_ms):
        session = self.record
        meter = self.meter
        if session is not None and self.contactor.closed:
            session.energized = True
        if meter is not None:
            meter.poll(now_ms)  # a non-blocking step of the meter's own state machine
            if meter.last_error is not self._meter_error:
                self._meter_error = meter.last_error
                if self._meter_error is not None:
                    self._emit(now_ms, "meter", self._meter_error)
            reading = meter.reading
            if session is not None and reading is not None and (
                    session.meter_start_wh is not None or self._current_reading(session, reading, now_ms)):
                session.note_meter(reading)
            since = self._unmetered_since(session, reading)
            if since is not None and time.ticks_diff(now_ms, since) > self.meter_failure_ms:
                self._emit(now_ms, "meter", "no good reading for %d s: %s" % (
                    self.meter_failure_ms // 1000, meter.last_error))
                self.charger.stop_session(now_ms, "meter_failure")
        log = self.session_log
        if log is not None:
            log.poll(now_ms, session, None if meter is None else meter.reading)
            if log.failed is not None:
                self._records_failed(now_ms)
        if session is not None and session.stop_reason is not None and session.ended_ms is None \
                and not self.contactor.closed:
            self._close_record(now_ms, session)

    def _records_failed(self, now_ms):
        """The flash took no record or snapshot (session_log.failed): no session may deliver
        energy it could not bill. Stopped the normal way (the contactor opens as after a remote
        stop); the pile stays up and retries the writes; the reason is in the log."""
        s = self.charger.session
        if s is not None and s.authorized and self.charger.stop_session(now_ms, "internal_error"):
            self._emit(now_ms, "storage", "session stopped: " + self.session_log.failed)

    def _current_reading(self, session, reading, now_ms):
        """May `reading` be the session's meter start? Taken after the plug-in, or at most
        START_READING_MAX_AGE_MS old, and of the meter's current epoch: a reading the meter's
        guard refused to replace for long (a restart it did not see) is never a start."""
        epoch = getattr(self.meter, "epoch", None)
        if epoch is not None and epoch != getattr(reading, "epoch", 0):
            return False
        return time.ticks_diff(reading.taken_ms, session.started_ms) >= 0 or \
            time.ticks_diff(now_ms, reading.taken_ms) <= START_READING_MAX_AGE_MS

    def _meter_start_known(self):
        """The open session's meter start value is known, or no meter is fitted, and the flash
        takes the records: only then may the contactor close. Energy from the close on is billed;
        a first reading taken after the close would miss what flowed before it."""
        if self.session_log is not None and self.session_log.failed is not None:
            return False
        return self.meter is None or self.record is None or self.record.meter_start_wh is not None

    def _unmetered_since(self, session, reading):
        """Since when the open session has lacked the reading it needs; None: it lacks none."""
        if session is None or session.stop_reason is not None:
            return None
        if self.contactor.closed:  # energy flows: a good reading every meter_failure_ms
            since = self._closed_ms
            if reading is not None and time.ticks_diff(reading.taken_ms, since) > 0:
                since = reading.taken_ms
            return since
        if session.authorized and session.meter_start_wh is None:
            return session.authorized_ms  # no current start value: the contactor may not close yet
        return None

    def _close_record(self, now_ms, session, force=False):
        meter = self.meter
        fresh = False
        if meter is not None:
            reading = meter.reading
            fresh = reading is not None and \
                time.ticks_diff(reading.taken_ms, self._opened_ms) >= METER_SETTLE_MS
            if session.stop_reason == "meter_failure":
                # Nothing flowed without a close: no reading to wait for. Else the meter may be back.
                gave_up = not session.energized or \
                    time.ticks_diff(now_ms, self._opened_ms) >= METER_FAILURE_FINAL_WAIT_MS
            else:
                gave_up = time.ticks_diff(now_ms, self._opened_ms) >= FINAL_READING_MAX_MS
            if not (fresh or force or gave_up):
                return
        session.ended_ms = now_ms
        identity = getattr(meter, "identity", None)
        if identity is not None:  # who measured it, for session/ended (DL/T 645: learnt on the bus)
            session.meter_identity = identity()
        # False: closed on the last good reading, without one taken after the contactor opened.
        session.meter_final = meter is None or fresh or (
            session.stop_reason == "meter_failure" and not session.energized)
        self.record = None
        energy = session.energy_wh
        self._emit(now_ms, "session", "ended: %s, %s Wh, %d s%s" % (
            session.stop_reason, "?" if energy is None else energy,
            time.ticks_diff(now_ms, session.started_ms) // 1000,
            "" if session.meter_final else " (last good reading before the stop)"))
        if self.session_log is not None:
            self.session_log.ended(now_ms, session)

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
        out = self.output
        if not out.pwm_on or self.raw == pilot.F:
            return
        if self._pwm_settling_ms is not None:
            if time.ticks_diff(now_ms, self._pwm_settling_ms) < DIODE_SETTLE_MS:
                return
            self._pwm_settling_ms = None  # never compared again across the tick wrap (2^29 ms on)
        seen = pilot.diode_check(self.sampler.minus_mv, self.standard)
        if seen is None and self.raw != pilot.E and out.duty <= MINUS_PHASE_MAX_DUTY:
            self._no_minus_bursts += 1  # the ADC does not follow the PWM (E: both phases ~0 V)
            if self._no_minus_bursts >= NO_MINUS_BURSTS:
                self.charger.raise_fault(now_ms, ch.FAULT_PILOT_STUCK)
            return
        self._no_minus_bursts = 0
        if seen is None or self.raw not in (pilot.B, pilot.C, pilot.D):
            return
        if seen:
            self._bad_diode_bursts = 0
            self.diode_checked = True
            return
        self._bad_diode_bursts += 1
        if self._bad_diode_bursts >= DIODE_BAD_BURSTS:
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
            if time.ticks_diff(now_ms, self._pp_higher_ms) < PP_RAISE_MS:
                return
        self._pp_higher_ms = None
        if amps * 1000 != self.charger.cable_ma:
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
        ):
            contactor.close()
            self._closed_ms = now_ms
            self.rcd.contactor_switched(now_ms)
            self._emit(now_ms, "contactor", "closed")

    def _open(self, now_ms):
        """Open at once; the time is kept for the session's final meter reading."""
        was_closed = self.contactor.closed
        self.contactor.open()
        if was_closed:
            self._opened_ms = now_ms
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
            if last is not None and 0 <= time.ticks_diff(now_ms, last) < OFFER_CHANGE_MIN_MS:
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
