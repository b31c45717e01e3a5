"""Charger state machine: stable pilot states -> events -> session states.

Layered as EVerest's EvseManager: this module knows nothing of pins or PWM. Each tick it gets
the stable pilot state and says what it wants: the pilot mode (offer / steady +12 V / F) and
the power (on / hold / off). The controller turns that into hardware, re-checking before it
ever closes the contactor.
"""
from micropython import const

import pilot

# Session states.
IDLE = "idle"
WAITING_FOR_AUTH = "waiting_for_auth"
CHARGING = "charging"
SUSPENDED_EV = "suspended_ev"  # offered, car does not request (B2)
SUSPENDED_EVSE = "suspended_evse"  # authorised, but the pile offers nothing or may not close yet
FINISHING = "finishing"  # session stopped, waiting for the car to be unplugged
FAULT = "fault"

# Pilot events (bit mask returned by step()), named as EVerest names them.
EV_CAR_PLUGGED_IN = const(1)
EV_CAR_REQUESTED_POWER = const(2)
EV_CAR_REQUESTED_STOP_POWER = const(4)
EV_CAR_UNPLUGGED = const(8)
EV_PILOT_ERROR = const(16)
EVENT_NAMES = (
    (EV_CAR_PLUGGED_IN, "CarPluggedIn"),
    (EV_CAR_REQUESTED_POWER, "CarRequestedPower"),
    (EV_CAR_REQUESTED_STOP_POWER, "CarRequestedStopPower"),
    (EV_CAR_UNPLUGGED, "CarUnplugged"),
    (EV_PILOT_ERROR, "PilotError"),
)

# Faults: one bit each, so "any fault" is one test (OpenEVSE keeps its errors in one range).
FAULT_PILOT_SHORT = const(1)  # state E
FAULT_PILOT_INVALID = const(2)  # plus level in no band
FAULT_DIODE = const(4)
FAULT_RCD_TRIP = const(8)
FAULT_RCD_SELF_TEST = const(16)
FAULT_CONTACTOR_FAILED_TO_CLOSE = const(32)
FAULT_WELDED = const(64)
FAULT_RCD_LOCKOUT = const(128)
FAULT_NAMES = (
    (FAULT_PILOT_SHORT, "pilot_short"),
    (FAULT_PILOT_INVALID, "pilot_invalid"),
    (FAULT_DIODE, "diode"),
    (FAULT_RCD_TRIP, "rcd_trip"),
    (FAULT_RCD_SELF_TEST, "rcd_self_test"),
    (FAULT_CONTACTOR_FAILED_TO_CLOSE, "contactor_failed_to_close"),
    (FAULT_WELDED, "welded"),
    (FAULT_RCD_LOCKOUT, "rcd_lockout"),
)
# Set and cleared by the controller from what it reads, tick by tick.
CONDITION_FAULTS = const(FAULT_PILOT_SHORT | FAULT_PILOT_INVALID | FAULT_RCD_TRIP)
# Stay until the car is unplugged: the next car starts clean.
UNPLUG_CLEARED_FAULTS = const(FAULT_DIODE | FAULT_RCD_SELF_TEST | FAULT_CONTACTOR_FAILED_TO_CLOSE)
# Stay until a technician clears them; the pilot shows F meanwhile (evse-facts section 4).
LATCHED_FAULTS = const(FAULT_WELDED | FAULT_RCD_LOCKOUT)


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
    """One plug-in to unplug. Its record is closed (`ended_ms`) once it is stopped and the
    contactor is open, with a meter reading taken after the opening: no energy can follow."""

    def __init__(self, now_ms):
        self.id = None  # given by session_log once authorised: <pile_id>-<boot>-<seq>
        self.start_epoch = None  # wall-clock start, for the records
        self.started_ms = now_ms
        self.auth_source = None
        self.auth_id = None
        self.authorized_ms = None
        self.stop_reason = None
        self.stopped_ms = None
        self.ended_ms = None
        self.meter_start_wh = None
        self.meter_stop_wh = None
        self.meter_final = None  # set when the record closes: was the last reading after the open?
        self.peak_power_w = 0

    @property
    def authorized(self):
        return self.authorized_ms is not None

    @property
    def energy_wh(self):
        if self.meter_start_wh is None or self.meter_stop_wh is None:
            return None
        return self.meter_stop_wh - self.meter_start_wh

    def note_meter(self, reading):
        """A good reading while the record is open: the first one is the start value (energy
        cannot flow before the first close, so one taken before plug-in is as good)."""
        if self.ended_ms is not None:
            return
        if self.meter_start_wh is None:
            self.meter_start_wh = reading.energy_wh
        self.meter_stop_wh = reading.energy_wh
        if reading.power_w is not None and reading.power_w > self.peak_power_w:
            self.peak_power_w = reading.power_w


class Charger:
    def __init__(self, max_current_ma, board_max_ma, free_vend, allow_ventilation, report=None):
        self.max_current_ma = max_current_ma
        self.board_max_ma = board_max_ma
        self.free_vend = free_vend
        self.allow_ventilation = allow_ventilation
        self._report = report
        self.cable_ma = 0
        self.remote_limit_ma = None
        self.state = IDLE
        self.faults = 0
        self.plugged = False
        self.session = None
        self.pilot = pilot.F

    def _emit(self, now_ms, what, text):
        if self._report is not None:
            self._report(now_ms, what, text)

    # -- inputs from the outside (remote commands, configuration) --------------------------------

    def authorize(self, now_ms, source, auth_id=None):
        """Authorise the plugged-in car's session; False when there is nothing to authorise."""
        s = self.session
        if s is None or s.authorized or s.stop_reason is not None or self.faults & LATCHED_FAULTS:
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

    def set_remote_limit(self, current_ma):
        self.remote_limit_ma = current_ma

    @property
    def offer_ma(self):
        """IEC 61851-1: min(configured maximum, cable, board, remote limit); 0 if below 6 A."""
        ma = min(self.max_current_ma, self.cable_ma, self.board_max_ma)
        if self.remote_limit_ma is not None:
            ma = min(ma, self.remote_limit_ma)
        return ma if ma >= pilot.MIN_CURRENT_MA else 0

    # -- faults -------------------------------------------------------------------------------------

    def raise_fault(self, now_ms, bit):
        if self.faults & bit:
            return
        self.faults |= bit
        self._emit(now_ms, "fault", "raised " + fault_name(bit))
        if bit & (UNPLUG_CLEARED_FAULTS | LATCHED_FAULTS):
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
        return True

    # -- the tick -----------------------------------------------------------------------------------

    def step(self, now_ms, stable, rcd_ready):
        """Consume the stable pilot state; returns the pilot events (EV_* bits) it raised."""
        old = self.pilot
        self.pilot = stable
        events = 0
        if stable != old:
            if stable in (pilot.B, pilot.C, pilot.D) and not self.plugged:
                events |= EV_CAR_PLUGGED_IN
            if stable in (pilot.C, pilot.D) and old not in (pilot.C, pilot.D):
                events |= EV_CAR_REQUESTED_POWER
            if old in (pilot.C, pilot.D) and stable == pilot.B:
                events |= EV_CAR_REQUESTED_STOP_POWER
            if stable == pilot.A and self.plugged:
                events |= EV_CAR_UNPLUGGED
            if stable in (pilot.E, pilot.X):
                events |= EV_PILOT_ERROR
        if events & EV_CAR_PLUGGED_IN:
            self.plugged = True
            self.session = Session(now_ms)
            self._emit(now_ms, "session", "started")
            if self.free_vend:
                self.authorize(now_ms, "free_vend")
        if events & EV_CAR_UNPLUGGED:
            self.plugged = False
            self.stop_session(now_ms, "ev_disconnected")
            self.session = None
            self._clear(now_ms, UNPLUG_CLEARED_FAULTS)
        self._set_state(now_ms, self._derive(stable, rcd_ready))
        return events

    def _derive(self, stable, rcd_ready):
        if self.faults:
            return FAULT
        if not self.plugged:
            return IDLE
        s = self.session
        if not s.authorized:
            return WAITING_FOR_AUTH
        if s.stop_reason is not None:
            return FINISHING
        if self.offer_ma == 0 or not rcd_ready:
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

    @property
    def pilot_mode(self):
        """MODE_F, MODE_OFFER or MODE_PLUS (pilot module's names for steady levels)."""
        if self.faults & LATCHED_FAULTS:
            return pilot.MODE_F
        if self.state in (CHARGING, SUSPENDED_EV) or (
            self.state == SUSPENDED_EVSE and self.offer_ma
        ):
            return MODE_OFFER
        return pilot.MODE_PLUS

    @property
    def power(self):
        if self.state == CHARGING:
            return POWER_ON
        if self.state in (FAULT, IDLE):
            return POWER_OFF
        return POWER_HOLD
