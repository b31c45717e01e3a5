"""Charger state machine: stable pilot states -> events -> session states.

Layered as EVerest's EvseManager: this module knows nothing of pins or PWM. Each tick it gets
the stable pilot state and says what it wants: the pilot mode (offer / steady +12 V / F) and
the power (on / hold / off). The controller turns that into hardware, re-checking before it
ever closes the contactor.

Out of service (`set_availability`, docs/commands.md) follows OCPP 1.6 ChangeAvailability: with
a session running the change is scheduled and takes effect once the session's record is closed
(contactor open, final meter reading taken); the remote settings go to flash through the
injected store, only when a command changes them.
"""

from micropython import const
import time

import pilot

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Callable

    from session_store import SettingsStore

# Session states.
IDLE = "idle"
WAITING_FOR_AUTH = "waiting_for_auth"
CHARGING = "charging"
SUSPENDED_EV = "suspended_ev"  # offered, car does not request (B2)
SUSPENDED_EVSE = "suspended_evse"  # authorised, but the pile offers nothing or may not close yet
FINISHING = "finishing"  # session stopped, waiting for the car to be unplugged
FAULT = "fault"
UNAVAILABLE = "unavailable"  # out of service (set_availability): no session, contactor open

# Availability (docs/commands.md set_availability): in service, or out of service with the
# pilot at F (-12 V) or at a steady +12 V without PWM (x1, "EVSE not ready").
AVAILABLE = "available"
UNAVAILABLE_F = "unavailable_f"
UNAVAILABLE_B1 = "unavailable_b1"
AVAILABILITIES = (AVAILABLE, UNAVAILABLE_F, UNAVAILABLE_B1)
# Limits that expire (docs/commands.md): what is in force, remote_limit_ma's source.
_LIMIT_REMOTE = const("remote")  # a set_current_limit, until its time to live runs out
_LIMIT_FALLBACK = const("fallback")  # config.json limit_fallback_a: a limit ran out or could not be kept
# Until NTP has set it the ESP32 clock starts at 2000-01-01 at boot: a year before this is not
# UTC (session_log.clock_synced, the same rule).
_SYNCED_FROM_YEAR = const(2024)
SCHEDULED = "scheduled: takes effect when the running session has ended"

# Pilot events (bit mask returned by step()), EVerest's CarPluggedIn, CarRequestedPower,
# CarRequestedStopPower, CarUnplugged and PilotError.
EV_CAR_PLUGGED_IN = const(1)
EV_CAR_REQUESTED_POWER = const(2)
_EV_CAR_REQUESTED_STOP_POWER = const(4)
EV_CAR_UNPLUGGED = const(8)
_EV_PILOT_ERROR = const(16)

# Faults: one bit each, so "any fault" is one test (OpenEVSE keeps its errors in one range).
FAULT_PILOT_SHORT = const(1)  # state E
FAULT_PILOT_INVALID = const(2)  # plus level in no band
FAULT_DIODE = const(4)
FAULT_RCD_TRIP = const(8)
FAULT_RCD_SELF_TEST = const(16)
FAULT_CONTACTOR_FAILED_TO_CLOSE = const(32)
FAULT_WELDED = const(64)
FAULT_RCD_LOCKOUT = const(128)
FAULT_PILOT_STUCK = const(256)  # PWM on, yet bursts in a row saw no minus phase: ADC frozen
FAULT_LATCH_STATE_LOST = const(512)  # settings.json's latched faults unreadable: assume latched
FAULT_NAMES = (
    (FAULT_PILOT_SHORT, "pilot_short"),
    (FAULT_PILOT_INVALID, "pilot_invalid"),
    (FAULT_DIODE, "diode"),
    (FAULT_RCD_TRIP, "rcd_trip"),
    (FAULT_RCD_SELF_TEST, "rcd_self_test"),
    (FAULT_CONTACTOR_FAILED_TO_CLOSE, "contactor_failed_to_close"),
    (FAULT_WELDED, "welded"),
    (FAULT_RCD_LOCKOUT, "rcd_lockout"),
    (FAULT_PILOT_STUCK, "pilot_stuck"),
    (FAULT_LATCH_STATE_LOST, "latch_state_lost"),
)
# Set and cleared by the controller from what it reads, tick by tick.
_CONDITION_FAULTS = const(FAULT_PILOT_SHORT | FAULT_PILOT_INVALID | FAULT_RCD_TRIP)
# Stay until the car is unplugged: the next car starts clean.
_UNPLUG_CLEARED_FAULTS = const(FAULT_DIODE | FAULT_RCD_SELF_TEST | FAULT_CONTACTOR_FAILED_TO_CLOSE
                              | FAULT_PILOT_STUCK)
# Stay until a technician clears them; the pilot shows F meanwhile (evse-facts section 4).
LATCHED_FAULTS = const(FAULT_WELDED | FAULT_RCD_LOCKOUT | FAULT_LATCH_STATE_LOST)


def fault_name(bit):
    for b, name in FAULT_NAMES:
        if b == bit:
            return name
    return "fault_%d" % bit


def fault_bit(name):
    for b, n in FAULT_NAMES:
        if n == name:
            return b
    return 0


def fault_list(mask):
    return [name for bit, name in FAULT_NAMES if mask & bit]


# What the charger asks of the contactor.
POWER_OFF = "off"  # open now
POWER_HOLD = "hold"  # never close; stay closed only while the car still draws after C2->C1
POWER_ON = "on"  # may close (the controller re-checks the pilot first)

MODE_OFFER = "offer"


class Session:
    """One plug-in to unplug, as the safety state machine sees it: authorised by whom, stopped
    why. What is billed is its record's (session_record.Record), which sets `ended_ms` once it
    is closed: the contactor open, a final meter reading taken, no energy can follow."""

    def __init__(self, now_ms):
        self.started_ms = now_ms
        self.auth_source = None
        self.auth_id = None
        self.authorized_ms = None
        self.stop_reason = None
        self.stopped_ms = None
        self.ended_ms = None

    @property
    def authorized(self):
        return self.authorized_ms is not None


class Charger:
    """Made by charger_restore.build (its arguments, its state), which also restores the remote
    settings and latched faults at boot (charger_restore.load_settings)."""

    # Set by charger_restore.build (boot code, dropped after it; annotations only: no code on the board).
    max_current_ma: int
    board_max_ma: int
    free_vend: bool
    allow_ventilation: bool
    _report: "Callable[[int, str, str], object] | None"
    cable_ma: int
    remote_limit_ma: "int | None"  # the remote limit in force (None: none)
    limit_source: "str | None"  # None, _LIMIT_REMOTE or _LIMIT_FALLBACK
    limit_until_ms: "int | None"  # ticks_ms when a remote limit runs out; None: it does not
    fallback_ma: "int | None"
    limit_ttl_s: "int | None"
    _wall: "Callable[[], int] | None"
    # The last set_current_limit as saved: (mA, time to live s or None, UTC expiry or None).
    _limit_cmd: tuple
    _saved_limit: tuple  # as settings.json holds it
    state: str
    faults: int
    plugged: bool
    session: "Session | None"
    pilot: str
    # The controller's close gate at the last step (RCD self-tested, Records.ready): no PWM
    # without it, so a car that goes to C finds a pile that closes at once (B -> C: 3 s).
    may_close: bool
    availability: str  # in effect
    availability_wanted: str  # asked for; differs while a change is scheduled
    _settings: "SettingsStore | None"
    settings_due: bool  # a latched fault changed: save after the tick's safety work

    def _emit(self, now_ms, what, text):
        if self._report is not None:
            self._report(now_ms, what, text)

    # -- inputs from the outside (remote commands, configuration) --------------------------------

    def authorize(self, now_ms, source, auth_id=None):
        """Authorise the plugged-in car's session; False when there is nothing to authorise."""
        s = self.session
        if s is None or s.authorized or s.stop_reason is not None or self.faults & LATCHED_FAULTS \
                or self.availability_wanted != AVAILABLE:
            return False
        s.auth_source = source
        s.auth_id = auth_id
        s.authorized_ms = now_ms
        self._emit(now_ms, "session", "authorised by " + source)
        return True

    def remote_stop(self, now_ms):
        return self.stop_session(now_ms, "remote")

    def stop_session(self, now_ms, reason):
        s = self.session
        if s is None or s.stop_reason is not None:
            return False
        s.stop_reason = reason
        s.stopped_ms = now_ms
        self._emit(now_ms, "session", "stopped: " + reason)
        return True

    def set_remote_limit(self, current_ma, now_ms=None, ttl_s=None):
        """None: no remote limit. ttl_s: it runs out that long after now_ms, then fallback_ma is
        in force (docs/commands.md, "Limits that expire"); None: it never runs out. Returns
        None, or a note for the caller if it was not saved."""
        self.remote_limit_ma = current_ma
        self.limit_source = None if current_ma is None else _LIMIT_REMOTE
        expiry = None
        if current_ma is None or ttl_s is None:
            self.limit_until_ms = None
            ttl_s = None
        else:
            self.limit_until_ms = time.ticks_add(now_ms, ttl_s * 1000)
            wall = self._utc()
            if wall is not None:
                expiry = wall + ttl_s
        self._limit_cmd = (current_ma, ttl_s, expiry)
        return self._save()

    def _utc(self):
        """The wall clock in UTC seconds if it is set (NTP), else None."""
        if self._wall is None:
            return None
        now = int(self._wall())
        return now if time.gmtime(now)[0] >= _SYNCED_FROM_YEAR else None

    def limit_expires_in_ms(self, now_ms):
        """Time left of the remote limit in force; None: it does not run out."""
        if self.limit_until_ms is None:
            return None
        return max(0, time.ticks_diff(self.limit_until_ms, now_ms))

    def _expire_limit(self, now_ms):
        """A remote limit whose time ran out: the fallback is in force (no flash write: at boot
        the saved limit has run out too). Lowering the offer goes through the controller's
        rules like any other change (IEC 61851-1: one change per 5 s)."""
        until = self.limit_until_ms
        if until is None or time.ticks_diff(now_ms, until) < 0:
            return
        self._fall_back(now_ms, "remote limit ran out")

    def _fall_back(self, now_ms, why):
        self.limit_until_ms = None
        self.remote_limit_ma = self.fallback_ma
        self.limit_source = None if self.fallback_ma is None else _LIMIT_FALLBACK
        self._emit(now_ms, "limit", "%s: %s" % (why, "no remote limit" if self.fallback_ma is None
                                                else "fallback %d mA" % self.fallback_ma))

    def set_availability(self, now_ms, wanted):
        """In or out of service (AVAILABILITIES). Returns None when in effect now, else a note
        for the caller: scheduled after the running session, or not saved to flash."""
        if wanted not in AVAILABILITIES:
            raise ValueError("unknown availability")
        before = self.availability_wanted
        self.availability_wanted = wanted
        note = None
        if wanted == self.availability:
            if before != wanted:
                self._emit(now_ms, "availability", "scheduled change cancelled")
        elif self._running():
            note = SCHEDULED
            self._emit(now_ms, "availability", wanted + " " + SCHEDULED)
        else:
            self._enter(now_ms, wanted)
        saved = self._save()
        if saved is not None:
            note = saved if note is None else note + "; " + saved
        return note

    def _running(self):
        """OCPP 1.6 ChangeAvailability waits for a transaction in progress: here an authorised
        session whose record the controller has not closed (contactor open, final reading)."""
        s = self.session
        return s is not None and s.authorized and s.ended_ms is None

    def _enter(self, now_ms, availability):
        self.availability = availability
        self._emit(now_ms, "availability", availability)
        s = self.session
        if availability == AVAILABLE or s is None:
            return  # a car still plugged in gets a new session in step(), as after a boot
        if s.stop_reason is None:
            # Never authorised, so no record goes out; "remote" all the same: the operator's.
            self.stop_session(now_ms, "remote")
        self.session = None

    def _save(self):
        """Flash, only if a value changed (the store skips an unchanged file). On an OSError the
        setting holds until the next boot; the caller is told."""
        if self._settings is None:
            return None
        try:
            ma, ttl, until = self._limit_cmd
            saved = self._saved_limit
            # A refresh that only moves the expiry later (a load manager re-sending its limit)
            # is not written (issue 13): after a reboot the limit runs out at the saved, earlier
            # expiry, never later than its time to live (docs/commands.md).
            if ttl is not None and saved[0] == ma and saved[1] == ttl and saved[2] is not None \
                    and until is not None and until >= saved[2]:
                until = saved[2]
            settings = {"availability": self.availability_wanted, "limit_ma": ma,
                        "latched": fault_list(self.faults & LATCHED_FAULTS)}
            if ttl is not None:  # short keys: the file stays inline (<= 128 B)
                settings["ttl"] = ttl
                settings["until"] = until
            self._settings.save(settings)  # with the contactor closed: when it opens
            self._saved_limit = (ma, ttl, until)
        except OSError as e:
            return "not saved to flash (%s): lost at the next boot" % str(e)[:60]
        return None

    @property
    def safety_ma(self):
        """What the installation may carry: min(configured maximum, cable, board). A decrease
        of it goes out at once, never behind the 5 s offer-change rule."""
        return min(self.max_current_ma, self.cable_ma, self.board_max_ma)

    @property
    def offer_ma(self):
        """IEC 61851-1: min(configured maximum, cable, board, remote limit); 0 if below 6 A."""
        ma = self.safety_ma
        if self.remote_limit_ma is not None:
            ma = min(ma, self.remote_limit_ma)
        return ma if ma >= pilot.MIN_CURRENT_MA else 0

    # -- faults -------------------------------------------------------------------------------------

    def raise_fault(self, now_ms, bit):
        if self.faults & bit:
            return
        self.faults |= bit
        self._emit(now_ms, "fault", "raised " + fault_name(bit))
        if bit & LATCHED_FAULTS:
            self.settings_due = True
        if bit & (_UNPLUG_CLEARED_FAULTS | LATCHED_FAULTS):
            self.stop_session(now_ms, fault_name(bit))

    def set_condition(self, now_ms, bit, active):
        if active:
            self.raise_fault(now_ms, bit)
        elif self.faults & bit:
            self._clear(now_ms, bit)

    def _clear(self, now_ms, bits):
        bits &= self.faults
        if bits:
            self.faults &= ~bits
            for bit, name in FAULT_NAMES:
                if bits & bit:
                    self._emit(now_ms, "fault", "cleared " + name)

    def clear_latched(self, now_ms, bit):
        """A technician's clear. The controller checks the cause is gone before calling this."""
        if not self.faults & bit & LATCHED_FAULTS:
            return False
        self._clear(now_ms, bit)
        self.settings_due = True
        return True

    def save_settings(self):
        """The controller calls it after the tick's safety work: a flash write never comes
        between a fault and the contactor opening. None, or why it could not be saved."""
        self.settings_due = False
        return self._save()

    # -- the tick -----------------------------------------------------------------------------------

    def step(self, now_ms, stable, may_close):
        """Consume the stable pilot state; returns the pilot events (EV_* bits) it acted on.
        CarPluggedIn means a session began for the car: at plug-in, or when the pile comes back
        into service with a car there (never while out of service). may_close: the controller's
        own conditions (RCD self-tested, the session's meter start known); else SUSPENDED_EVSE,
        with no PWM (B1/C1, "EVSE not ready") and the contactor opened at once."""
        self._expire_limit(now_ms)
        old = self.pilot
        self.pilot = stable
        events = 0
        if stable != old:
            if stable in (pilot.B, pilot.C, pilot.D) and not self.plugged:
                events |= EV_CAR_PLUGGED_IN
            if stable in (pilot.C, pilot.D) and old not in (pilot.C, pilot.D):
                events |= EV_CAR_REQUESTED_POWER
            if old in (pilot.C, pilot.D) and stable == pilot.B:
                events |= _EV_CAR_REQUESTED_STOP_POWER
            if stable == pilot.A and self.plugged:
                events |= EV_CAR_UNPLUGGED
            if stable in (pilot.E, pilot.X):
                events |= _EV_PILOT_ERROR
        if events & EV_CAR_PLUGGED_IN:
            self.plugged = True
            events &= ~EV_CAR_PLUGGED_IN  # reported below, when its session begins
        if events & EV_CAR_UNPLUGGED:
            self.plugged = False
            self.stop_session(now_ms, "ev_disconnected")
            self.session = None
            self._clear(now_ms, _UNPLUG_CLEARED_FAULTS)
        if self.availability_wanted != self.availability and not self._running():
            self._enter(now_ms, self.availability_wanted)
        # At F the car cannot be seen: `plugged` keeps the last reading until the pilot is read
        # again. A fault that only an unplug clears holds the next session back until then.
        if self.plugged and self.session is None and self.availability == AVAILABLE \
                and stable in (pilot.B, pilot.C, pilot.D) and not self.faults & _UNPLUG_CLEARED_FAULTS:
            events |= EV_CAR_PLUGGED_IN
            self.session = Session(now_ms)
            self._emit(now_ms, "session", "started")
            if self.free_vend:
                self.authorize(now_ms, "free_vend")
        # A session's first step: its RCD self-test and its record begin after it (controller,
        # records step), the gate the controller read was the last session's.
        self.may_close = may_close and not events & EV_CAR_PLUGGED_IN
        self._set_state(now_ms, self._derive(stable, self.may_close))
        return events

    def _derive(self, stable, may_close):
        if self.faults:
            return FAULT
        if self.availability != AVAILABLE:
            return UNAVAILABLE
        s = self.session
        if not self.plugged or s is None:
            return IDLE
        if not s.authorized:
            return WAITING_FOR_AUTH
        if s.stop_reason is not None:
            return FINISHING
        if self.offer_ma == 0 or not may_close:
            return SUSPENDED_EVSE
        if stable == pilot.C or (stable == pilot.D and self.allow_ventilation):
            return CHARGING
        if stable == pilot.D:
            return SUSPENDED_EVSE  # IEC 61851-1: no charging in D without ventilation
        return SUSPENDED_EV

    def _set_state(self, now_ms, new):
        if new != self.state:
            self._emit(now_ms, "charger", self.state + " -> " + new)
            self.state = new

    # -- what the charger wants ------------------------------------------------------------------

    def has_session(self):
        """A car's session is open (plugged in, whatever its state): command_auth's may_close."""
        return self.session is not None

    @property
    def pilot_mode(self):
        """MODE_F, MODE_OFFER or MODE_PLUS (pilot module's names for steady levels)."""
        if self.faults & LATCHED_FAULTS or self.availability == UNAVAILABLE_F:
            return pilot.MODE_F
        # Nothing to offer (below 6 A: an invalid cable read while charging, a limit): no PWM,
        # never a PWM of no duty (the controller's tick raised TypeError then). Nor while the
        # pile may not close yet (may_close): a car would go to C and wait past the 3 s that
        # B -> C allows (evse-facts section 1); at +12 V it waits in B, the close follows the PWM.
        if self.state in (CHARGING, SUSPENDED_EV, SUSPENDED_EVSE) and self.offer_ma and self.may_close:
            return MODE_OFFER
        return pilot.MODE_PLUS

    @property
    def power(self):
        if self.state == CHARGING:
            return POWER_ON
        if self.state in (FAULT, IDLE, UNAVAILABLE) or (self.state == SUSPENDED_EVSE and not self.may_close):
            # The close gate dropped (the flash failed, ...): open now, as ever. The C2 -> C1
            # grace is for an offer withdrawn, not for a pile that may not deliver energy.
            return POWER_OFF
        return POWER_HOLD
