"""The wired controller in a hostile world: random sequences, invariants in the standard's terms.

A hypothesis RuleBasedStateMachine drives the firmware (wiring.build on the simulated hardware,
virtual clock) with car states, pilot interference, a frozen or saturated ADC, a missing diode,
RCD leaks and chatter, S2 chatter, cable coding changes, loop stalls, meter faults and extreme
values, flash write errors and remote commands with hostile arguments; on a socket with PP or
a tethered cable (no PP, its rating in the board). After every control tick it checks what
IEC 61851-1 / IEC 62955 ask of the pile, judged from what the world did and what the firmware
read, never from the firmware's own bookkeeping:

- the coil is off within 20 ms + one control period of the last burst that read C or D;
- the coil never goes on without a diode seen on the last burst that had a minus phase, a
  passed RCD self-test since the plug-in, the PWM on and an offer within the cable's rating;
  never while the cable's rating (what PP presents as it closes) is 0 or unknown;
- the coil stays on no longer than one PP re-read (100 ms) after the cable's rating fell to 0,
  and the offered duty never exceeds the cable's rating for longer than that, coil on or off;
- with the PWM on at a duty that leaves a minus phase, a run of bursts without one (a stuck ADC)
  opens the coil;
- a residual-current leak present with the coil on is cut within 100 ms plus one period
  (IEC 62955: 0.1 s for a 200 mA leak; FAULT does not say how large a leak is);
- latched faults never disappear without a technician's clear;
- no exception escapes the tick;
- every session/ended record bills what the car received, to the meter's resolution, unless the
  record itself says its stop reading is stale or estimated; never more.

`make test` runs it with a fixed seed and a bounded number of examples; `make fuzz` runs it
longer with a fresh seed (PILE_FUZZ_EXAMPLES, PILE_FUZZ_STEPS).
"""
import hashlib
import hmac
import json
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pilehost.virtual_board import VirtualBoard, board_dict

import charger as ch
import pilot
import meters
import wiring

EXAMPLES = int(os.environ.get("PILE_FUZZ_EXAMPLES", "25"))
STEPS = int(os.environ.get("PILE_FUZZ_STEPS", "40"))
FIXED_SEED = os.environ.get("PILE_FUZZ_RANDOM") != "1"

PERIOD_MS = 5
# The test's own reading of IEC 61851-1 Table A.4 (evse-facts section 1), independent of pilot.py.
BANDS_MV = (("A", 11400, 12600), ("B", 8360, 9560), ("C", 5480, 6490), ("D", 2620, 3250),
            ("E", -1500, 1500))
DIODE_MV = (-12600, -11400)
# Plus levels a disturbance can put a burst at: one per band, and between bands (X).
LEVELS_MV = (12000, 9000, 6000, 3000, 0, 10500, 7500, 4500, -6000, 14000)
# IEC 62196 PP resistor -> cable rating in A (evse-facts section 2); others: no valid cable.
CABLES = {100: 63, 220: 32, 680: 20, 1500: 13, None: 0, 5000: 0, 40: 0}
# C/D read -> coil off: 20 ms of no C/D (IEC 61851-1 Table A.6 seq. 8.1 asks 100 ms; the
# firmware aims at 20 ms) plus one period, plus the burst itself and the reads around it.
CD_TO_OFF_MS = 20 + PERIOD_MS + 3
# A stuck ADC: bursts in a row with the PWM on and no minus phase before the coil must be off.
NO_MINUS_BURSTS_MAX = 20
# IEC 62955 Table: 0.1 s for 200 mA (the largest leak FAULT may mean), plus one period.
LEAK_TO_OFF_MS = 100 + PERIOD_MS
# A cable read lower while charging lowers the offer this soon: PP is re-read every 100 ms.
PP_TO_OFFER_MS = 100 + 2 * PERIOD_MS
# The car unplugged, whatever the pilot ADC says (frozen at C, say): the pilot reads A, or the
# stuck-ADC rule or the PP read (every 100 ms; no cable: open at once) opens. Without PP
# (tethered) the pilot is the pile's only view of the car (IEC 61851-1 sees it through CP alone
# then): counted from the last burst read as a car's C/D, if later, where C/D came on at least
# every other burst up to it (one of the two bursts before it read C/D too): the plus phase in
# C/D and the minus phase a car shows (the PWM's -12 V, none with the PWM off), under
# interference that leaves C/D at least every other burst, is a car in C to any pile. Where the
# bursts since the unplug read mostly non-C/D (two in a row before each C/D: A, A, D, ...) the
# count is from the unplug: pilot.py's window rule opens on that (test_pilot_mixed.py).
UNPLUG_TO_OFF_MS = 100 + 2 * PERIOD_MS + 5
# A meter fitted for years: a register near 0 made a "backwards" fault stop at 0 in the sim (a
# register looking stuck while energy flows, which no pile could tell from a real one).
START_REGISTER_WH = 1234500
RESOLUTION_WH = 2  # DDSU666 float32 kWh at these registers (0.12 Wh steps), plus rounding at each end
SECRET = bytes(range(32))
SETTINGS = "settings.json"  # on the virtual board's flash (the test runs in its folder)
COMMANDS = ("remote_start", "remote_stop", "set_current_limit", "set_availability", "clear_fault",
            "request_status", "reboot", "start", "")
# Where a disturbance lands: as things are, once the car charges, or once it charges after the
# world was made healthy (a new plug-in, the technician's clears): most sequences would otherwise
# never reach a closed contactor, where the rules matter most.
PREPARE = st.sampled_from(("as_is", "charging", "healed"))
# Argument values a cloud, a bug or an attacker holding the key could send.
ARG_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 64, 2 ** 64), st.floats(width=32),
    st.floats(), st.text(max_size=70), st.sampled_from(ch.AVAILABILITIES + ("welded", "rcd_lockout")),
    st.sampled_from((6, 16, 32, 80, 5.9, 80.01, 1e-9, 3.4e38)), st.lists(st.integers(), max_size=2))


def band(mv):
    for name, low, high in BANDS_MV:
        if low <= mv <= high:
            return name
    return "X"


def offered_a(duty):
    """What a car reads from a duty_u16 (IEC 61851-1 Table A.8), whole amps rounded up."""
    if duty is None or duty <= 0 or duty >= 65535:
        return 0
    d = duty * 100 / 65535
    if d < 8:
        return 0
    if d < 10:
        return 6
    if d <= 85:
        return d * 0.6
    return (d - 64) * 2.5


class Disturbance:
    """What the test does to the pilot ADC on top of the simulated circuit, and what it saw."""

    def __init__(self, world):
        self.world = world
        self._real = world.adc_uv
        world.adc_uv = self.read
        self.mode = None  # None, "levels", "frozen", "saturated"
        self.until_us = 0
        self.levels = ()  # "levels": bursts alternate through these plus levels (mV)
        self.burst_index = 0
        self.frozen_uv = 0
        self.samples = []  # mV of this tick's pilot reads

    def uv(self, mv):
        w = self.world
        return w.uv_m12 + (mv + 12000) * w.uv_span // 24000

    def mv(self, uv):
        w = self.world
        return (uv - w.uv_m12) * 24000 // w.uv_span - 12000

    def new_burst(self):
        self.samples = []
        self.burst_index += 1

    def read(self, pin):
        uv = self._real(pin)
        w = self.world
        if pin != w.pin_pilot_adc:
            return uv
        if self.mode is not None and w.now < self.until_us:
            if self.mode == "frozen":
                uv = self.frozen_uv
            elif self.mode == "saturated":
                uv = 3300000  # the ADC's top, above +12 V after the divider
            elif self.mode == "levels":
                # Interference moves what the burst sees of the plus phase; the minus phase
                # (-12 V or the car's diode-less level) stays what it is.
                level = self.levels[self.burst_index % len(self.levels)]
                if level is not None and self.mv(uv) > -1500:
                    uv = self.uv(level)
        self.samples.append(self.mv(uv))
        return uv


class PileMachine(RuleBasedStateMachine):
    """One pile, one car, one meter (DDSU666 on the simulated RS-485 bus)."""

    def __init__(self):
        super().__init__()
        self.mp = pytest.MonkeyPatch()
        self.vb = None

    def teardown(self):
        self.mp.undo()

    @initialize(standard=st.just("iec"), tethered_a=st.sampled_from((None, None, 13, 20, 32)))
    def boot(self, standard, tethered_a):
        """tethered_a: None, a socket with PP (ref-esp32); else a tethered cable of that rating,
        no PP input: the cable rules then change nothing the pile can read."""
        board = board_dict()
        if tethered_a is not None:
            board["pins"]["pp_adc"] = None
            del board["pp_adc"]
            board["ratings"]["tethered_cable_a"] = tethered_a
        self.tethered_a = tethered_a
        config = {"free_vend": True, "pile_id": "fuzz-1", "standard": standard,
                  "meter": {"type": "ddsu666", "failure_timeout_s": 5},
                  "mqtt": {"host": "127.0.0.1", "secret": SECRET.hex()}}
        self.vb = VirtualBoard(self.mp, config=config, board=board, period_ms=PERIOD_MS)
        w = self.vb.world
        w.energy_wh = START_REGISTER_WH
        self.world = w
        self.ctl = self.vb.ctl
        # The link is built as on the board but never polled: commands reach it as from MQTT.
        self.link = self.vb.build_link()
        self.counter = 0
        self.unplugged_us = 0
        self.dist = Disturbance(w)
        self.last_cd_us = None
        self.car_like_cd_us = None  # the last C/D burst a car could have made (see _after_tick)
        self.cd_before = (True, True)  # did the two bursts before this tick's read C/D (oldest first)
        self.last_minus_ok = None  # did the last burst with a minus phase read -12 V
        self.no_minus_bursts = 0
        self.rcd_test_ok = False  # since the plug-in: TEST asserted while the module was healthy
        self.reads_a_since_us = None  # since when every tick's pilot reads were A
        self._rcd_test_was = False
        self.leak_since_us = None
        self.latched = 0
        self.s2_chatter = None  # (period_us, until_us, next_flip_us)
        self.rcd_chatter = None
        self.meter_fault = None
        self.meter_fault_until = None
        self.flash_fault_until = None
        self.stall_next_us = 0
        self.cable_changed_us = 0
        self.rating_a = 0  # what PP presents (0: no car, no cable, or no valid coding)
        self.delivered_at_start = {}  # session id -> world energy when its started record went out
        self.records = []  # (kind, record, world energy at the append)
        self._wrap_outbox()
        self._wrap_flash()
        self.run_ms(300)

    # -- hooks into the world and the firmware's flash -------------------------------------------

    def _wrap_outbox(self):
        log = self.ctl.records.log
        outbox = log.outbox
        real = outbox.append

        def append(kind, payload):
            record = json.loads(bytes(payload))
            self.records.append((kind, record, self.world.energy_wh))
            return real(kind, payload)

        outbox.append = append

    def _wrap_flash(self):
        import builtins
        import sys

        real_open = builtins.open

        def failing_open(path, mode="r", *args, **kwargs):
            if self.flash_fault_until is not None and self.world.now < self.flash_fault_until \
                    and ("w" in mode or "a" in mode or "+" in mode):
                raise OSError(28, "ENOSPC (injected)")
            return real_open(path, mode, *args, **kwargs)

        for name in ("session_store", "journal", "durable", "session_log"):
            module = sys.modules.get(name)
            if module is not None:
                self.mp.setattr(module, "open", failing_open, raising=False)

    def _prepare(self, how):
        """Where the next disturbance lands (PREPARE): as things are, or once the car charges,
        after the world was made healthy again for "healed"."""
        if how == "as_is":
            return
        w = self.world
        now = self.vb.clock.ticks_ms()
        if how == "healed":
            w.car.diode, w.car.short, w.car.ventilation = True, False, False
            w.rcd_healthy, w.rcd_leak = True, False
            self.rcd_chatter = self.s2_chatter = None
            self.dist.mode = None
            self.meter_fault_until = self.flash_fault_until = None
            w.do("unplug")  # a new plug-in: what an unplug clears, a fresh RCD self-test
            self.run_ms(100)
            self.ctl.charger.set_availability(now, ch.AVAILABLE)
            self.ctl.charger.set_remote_limit(None)
            self._technician_clears()
        if not w.car.plugged:
            w.car.cable_ohm = 220
            self.cable_changed_us = w.now
            w.do("plug")
        w.do("request")
        end = w.now + 4000000  # RCD self-test, meter start, 1 s re-close limit, B->C debounce
        while not w.coil and w.now < end:
            self.tick()

    def _technician_clears(self):
        for bit, name in ch.FAULT_NAMES:
            if bit & ch.LATCHED_FAULTS & self.ctl.charger.faults:
                self.ctl.clear_fault(self.vb.clock.ticks_ms(), name)
        self.latched = self.ctl.charger.faults & ch.LATCHED_FAULTS

    # -- time ------------------------------------------------------------------------------------

    def run_ms(self, ms):
        end = self.world.now + ms * 1000
        while self.world.now < end:
            self.tick()

    def tick(self):
        w = self.world
        vb = self.vb
        if self.stall_next_us:
            vb.clock.t += self.stall_next_us
            self.stall_next_us = 0
        w.advance()
        self._chatter(w.now)
        w.meter.fault = self.meter_fault if self.meter_fault_until is not None and \
            w.now < self.meter_fault_until else None
        self.dist.new_burst()
        was_closed = w.coil
        now = vb.clock.ticks_ms()
        self.ctl.tick(now)  # an exception here fails the test
        self.ctl.records.poll(now)  # the main loop's next step, as main.run
        self._after_tick(was_closed)
        vb.clock.t += PERIOD_MS * 1000

    def _chatter(self, now):
        if self.s2_chatter is not None:
            period, until, flip = self.s2_chatter
            if now >= until:
                self.s2_chatter = None
            elif now >= flip:
                self.world.do("stop_request" if self.world.car.wants else "request")
                self.s2_chatter = (period, until, now + period)
        if self.rcd_chatter is not None:
            period, until, flip = self.rcd_chatter
            if now >= until:
                self.rcd_chatter = None
                self.world.rcd_leak = False
            elif now >= flip:
                self.world.rcd_leak = not self.world.rcd_leak
                self.rcd_chatter = (period, until, now + period)

    # -- the invariants, after every tick --------------------------------------------------------

    def _after_tick(self, was_closed):
        w = self.world
        now = w.now
        samples = self.dist.samples
        if samples and band(max(samples)) == "A":
            if self.reads_a_since_us is None:
                self.reads_a_since_us = now
        else:
            self.reads_a_since_us = None
        if samples:
            plus = max(samples)
            minus = min(samples)
            pwm = w.pwm_duty
            leaves_minus = pwm is not None and 0 < pwm < 65535 * 90 // 100
            cd = band(plus) in ("C", "D")
            if cd:
                self.last_cd_us = now
                if (minus < -1500 or not leaves_minus) and (self.cd_before[0] or self.cd_before[1]):
                    # The minus phase a car's C/D shows (the PWM's, or none with no PWM), and C/D
                    # at least every other burst up to it: a car in C to any pile.
                    self.car_like_cd_us = now
            self.cd_before = (self.cd_before[1], cd)
            if minus < -1500:  # a minus phase was caught
                self.last_minus_ok = DIODE_MV[0] <= minus <= DIODE_MV[1]
                self.no_minus_bursts = 0
            elif leaves_minus:
                self.no_minus_bursts += 1
            else:
                self.no_minus_bursts = 0
        if w.car.plugged:
            self.unplugged_us = None
        elif self.unplugged_us is None:
            self.unplugged_us = now
        if not w.car.plugged:
            self.last_minus_ok = None
            # A new plug-in needs a new self-test, once the pile could see the unplug for the
            # pilot's debounce (pilot._DEBOUNCE_DEFAULT_MS; a shorter gap is no other car): PP
            # open (read every 100 ms while plugged, whatever the pilot ADC says), or without PP
            # (tethered) the pilot read as A. A pilot ADC frozen at B, the PWM off, hides it.
            seen_us = self.unplugged_us if self.tethered_a is None else self.reads_a_since_us
            if seen_us is not None and now - max(seen_us, self.unplugged_us) > (
                    pilot._DEBOUNCE_DEFAULT_MS + 2 * PERIOD_MS) * 1000:
                self.rcd_test_ok = False
        test_on = w.pins.get(w.pin_rcd_test) == w.rcd_test_level
        if test_on and not self._rcd_test_was:
            self.rcd_test_ok = w.rcd_healthy and not w.rcd_leak
        self._rcd_test_was = test_on
        if w.rcd_leak:
            if self.leak_since_us is None:
                self.leak_since_us = now
        else:
            self.leak_since_us = None

        rating = self._rating()
        if rating != self.rating_a:
            self.rating_a = rating
            self.cable_changed_us = now
        coil = w.coil
        t_ms = now // 1000
        if w.pwm_present():
            assert offered_a(w.pwm_duty) <= rating + 0.5 or self._cable_changed_recently(), \
                "offering %.1f A through a %d A cable (t=%d ms)" % (offered_a(w.pwm_duty), rating, t_ms)
        if coil and self.unplugged_us is not None:
            # Without PP (tethered) the pilot is the pile's only view of the car: a burst read as
            # a car's C/D since the unplug with C/D at least every other burst (interference
            # moving the plus phase, the minus phase real) is a car to any pile; from it
            # CD_TO_OFF_MS is the rule. A, A, D ... is not (UNPLUG_TO_OFF_MS).
            seen_us = self.unplugged_us
            if self.tethered_a is not None and self.car_like_cd_us is not None:
                seen_us = max(seen_us, self.car_like_cd_us)
            gone_ms = (now - seen_us) // 1000
            assert gone_ms <= UNPLUG_TO_OFF_MS, "coil on %d ms after the car was unplugged (t=%d ms)" % (
                gone_ms, t_ms)
        if coil:
            since_cd = None if self.last_cd_us is None else (now - self.last_cd_us) // 1000
            assert since_cd is not None and since_cd <= CD_TO_OFF_MS, \
                "coil on %s ms after the last C/D reading (t=%d ms)" % (since_cd, t_ms)
            assert self.no_minus_bursts < NO_MINUS_BURSTS_MAX, \
                "coil on after %d bursts with no minus phase (t=%d ms)" % (self.no_minus_bursts, t_ms)
            if self.leak_since_us is not None:
                leak_ms = (now - self.leak_since_us) // 1000
                assert leak_ms <= LEAK_TO_OFF_MS, "coil on %d ms into a leak (t=%d ms)" % (leak_ms, t_ms)
            assert rating > 0 or self._cable_changed_recently(), \
                "coil on through a cable of no rating (t=%d ms)" % t_ms
        if coil and not was_closed:  # it closed in this tick
            assert w.car.plugged and w.pwm_present(), "closed without PWM (t=%d ms)" % t_ms
            assert self.last_minus_ok is True and w.car.diode, "closed without a diode (t=%d ms)" % t_ms
            assert self.rcd_test_ok, "closed without a passed RCD self-test (t=%d ms)" % t_ms
            assert rating > 0, "closed while the cable's rating is 0 or unknown (t=%d ms)" % t_ms
            assert offered_a(w.pwm_duty) <= rating + 0.5, \
                "closed offering %.1f A through a %d A cable (t=%d ms)" % (
                    offered_a(w.pwm_duty), rating, t_ms)
        latched = self.ctl.charger.faults & ch.LATCHED_FAULTS
        assert latched & self.latched == self.latched, "a latched fault went without a clear"
        self.latched = latched

    def _rating(self):
        """The cable's rating in A as PP presents it now (none without a car), or the tethered
        cable's."""
        w = self.world
        if self.tethered_a is not None:
            return self.tethered_a
        return CABLES.get(w.car.cable_ohm, 0) if w.car.plugged else 0

    def _cable_changed_recently(self):
        return self.world.now - self.cable_changed_us <= PP_TO_OFFER_MS * 1000

    @invariant()
    def sessions_bill_what_was_delivered(self):
        if self.vb is None:
            return
        started = {}
        for _kind, record, energy in self.records:
            sid = record.get("session_id")
            if "stop_reason" not in record:
                started[sid] = energy
                continue
            if sid not in started or record.get("stop_reason") == "power_loss":
                continue
            delivered = energy - started[sid]
            billed = record["energy_wh"]
            assert billed <= delivered + RESOLUTION_WH, \
                "session %s billed %s Wh of %.1f delivered" % (sid, billed, delivered)
            flagged = any(v for k, v in record.items() if "stale" in k or "estimat" in k) or \
                record.get("meter_restarts")
            if not flagged:
                assert billed >= delivered - RESOLUTION_WH, \
                    "session %s billed %s Wh of %.1f delivered, not flagged" % (sid, billed, delivered)

    # -- the car ---------------------------------------------------------------------------------

    @rule(ms=st.integers(1200, 4000))
    def charge(self, ms):
        """The common case, to reach charging often: a 32 A cable plugged in, the car requests."""
        if not self.world.car.plugged:
            self.world.car.cable_ohm = 220
            self.cable_changed_us = self.world.now
            self.world.do("plug")
        self.world.do("request")
        self.run_ms(ms)

    @rule(cable=st.sampled_from(sorted(CABLES, key=str)), ms=st.integers(5, 600))
    def plug(self, cable, ms):
        if not self.world.car.plugged:
            self.world.car.cable_ohm = cable
            self.cable_changed_us = self.world.now
            self.world.do("plug")
        self.run_ms(ms)

    @rule(prepare=PREPARE, ms=st.integers(5, 600))
    def unplug(self, prepare, ms):
        self._prepare(prepare)
        self.world.do("unplug")
        self.run_ms(ms)

    @rule(ms=st.integers(5, 3000))
    def request(self, ms):
        self.world.do("request")
        self.run_ms(ms)

    @rule(prepare=PREPARE, ms=st.integers(5, 600))
    def stop_request(self, prepare, ms):
        self._prepare(prepare)
        self.world.do("stop_request")
        self.run_ms(ms)

    @rule(prepare=PREPARE, on=st.booleans(), ms=st.integers(5, 300))
    def ventilation(self, prepare, on, ms):
        self._prepare(prepare)
        self.world.do("ventilation", on)
        self.run_ms(ms)

    @rule(prepare=PREPARE, present=st.booleans(), ms=st.integers(5, 300))
    def diode(self, prepare, present, ms):
        self._prepare(prepare)
        self.world.car.diode = present
        self.run_ms(ms)

    @rule(prepare=PREPARE, on=st.booleans(), ms=st.integers(5, 300))
    def short_cp(self, prepare, on, ms):
        self._prepare(prepare)
        self.world.do("short_cp", on)
        self.run_ms(ms)

    @rule(prepare=PREPARE, cable=st.sampled_from(sorted(CABLES, key=str)), ms=st.integers(5, 600))
    def cable_coding(self, prepare, cable, ms):
        self._prepare(prepare)
        self.world.car.cable_ohm = cable
        self.cable_changed_us = self.world.now
        self.run_ms(ms)

    @rule(cable=st.sampled_from(sorted(CABLES, key=str)), after_ms=st.integers(850, 1150),
          ms=st.integers(5, 600))
    def cable_coding_at_reclose(self, cable, after_ms, ms):
        """The car stops and asks again while charging; PP changes about when the contactor may
        close again (relay.MIN_OPEN_MS after the open): a plug coming out as it would close."""
        self._prepare("charging")
        w = self.world
        w.do("stop_request")
        end = w.now + 200000
        while w.coil and w.now < end:
            self.tick()
        opened = w.now
        self.run_ms(50)
        w.do("request")
        self.run_ms(max(0, after_ms - (w.now - opened) // 1000))
        w.car.cable_ohm = cable
        self.run_ms(ms)

    @rule(prepare=PREPARE,
          period=st.integers(5, 400), duration=st.integers(50, 20000), ms=st.integers(0, 3000))
    def s2_chatter(self, prepare, period, duration, ms):
        self._prepare(prepare)
        now = self.world.now
        self.s2_chatter = (period * 1000, now + duration * 1000, now)
        self.run_ms(ms)

    # -- the pilot line --------------------------------------------------------------------------

    # A disturbance lasts `duration` ms from now; the rule runs `ms` of it, so that the next
    # rules (the car going to B, an unplug, a stall) can land inside it.

    @rule(prepare=PREPARE,
          levels=st.lists(st.one_of(st.none(), st.sampled_from(LEVELS_MV)), min_size=1, max_size=4),
          duration=st.integers(5, 3000), ms=st.integers(0, 300))
    def interference(self, prepare, levels, duration, ms):
        """Bursts cycle through these plus levels (None: the real one): alternating X, spikes
        into any band, a ground shift."""
        self._prepare(prepare)
        d = self.dist
        d.mode, d.levels, d.until_us = "levels", tuple(levels), self.world.now + duration * 1000
        self.run_ms(ms)

    @rule(prepare=PREPARE,
          level=st.sampled_from(LEVELS_MV), duration=st.integers(5, 5000), ms=st.integers(0, 300))
    def frozen_adc(self, prepare, level, duration, ms):
        self._prepare(prepare)
        d = self.dist
        d.mode, d.frozen_uv, d.until_us = "frozen", d.uv(level), self.world.now + duration * 1000
        self.run_ms(ms)

    @rule(level=st.sampled_from((9000, 6000)), plug_after=st.integers(0, 3000),
          thaw_after=st.integers(0, 3000), cable=st.sampled_from(sorted(CABLES, key=str)),
          ms=st.integers(5, 3000))
    def phantom_plug_in(self, level, plug_after, thaw_after, cable, ms):
        """The pilot ADC frozen at B or C with no car: the pile sees a plug-in nobody made (no PP,
        so no offer, no PWM to show the freeze). The car that comes later, during the freeze,
        gets a self-test of its own; its cable's rating is read for it."""
        w = self.world
        if w.car.plugged:
            w.do("unplug")
            self.run_ms(300)
        d = self.dist
        d.mode, d.frozen_uv, d.until_us = "frozen", d.uv(level), w.now + (plug_after + thaw_after) * 1000
        self.run_ms(plug_after)
        w.car.cable_ohm = cable
        w.do("plug")
        self.run_ms(thaw_after)
        w.do("request")
        self.run_ms(ms)

    @rule(prepare=PREPARE, duration=st.integers(5, 1000), ms=st.integers(0, 300))
    def saturated_adc(self, prepare, duration, ms):
        self._prepare(prepare)
        d = self.dist
        d.mode, d.until_us = "saturated", self.world.now + duration * 1000
        self.run_ms(ms)

    # -- RCD, contactor, loop ----------------------------------------------------------------------

    @rule(prepare=PREPARE, on=st.booleans(), ms=st.integers(0, 1500))
    def rcd_leak(self, prepare, on, ms):
        self._prepare(prepare)
        self.world.rcd_leak = on
        self.run_ms(ms)

    @rule(prepare=PREPARE,
          period=st.integers(5, 300), duration=st.integers(50, 5000), ms=st.integers(0, 2000))
    def rcd_chatter(self, prepare, period, duration, ms):
        self._prepare(prepare)
        now = self.world.now
        self.rcd_chatter = (period * 1000, now + duration * 1000, now)
        self.run_ms(ms)

    @rule(prepare=PREPARE, healthy=st.booleans(), ms=st.integers(5, 600))
    def rcd_module(self, prepare, healthy, ms):
        self._prepare(prepare)
        self.world.rcd_healthy = healthy
        self.run_ms(ms)

    @rule(prepare=PREPARE,
          stall=st.integers(0, 200), during=st.sampled_from((None, "stop_request", "unplug")),
          ms=st.integers(5, 300))
    def loop_stall(self, prepare, stall, during, ms):
        """The loop stalls (a flash erase, a collection); the car may act while it does."""
        self._prepare(prepare)
        self.stall_next_us = stall * 1000
        if during is not None:
            self.world.do(during)
        self.run_ms(ms)

    @rule(ms=st.integers(5, 5000))
    def wait(self, ms):
        self.run_ms(ms)

    # -- meter and flash ---------------------------------------------------------------------------

    @rule(prepare=PREPARE, fault=st.sampled_from(meters.FAULTS),  # "huge": power at float32's largest, 3.4e38
          duration=st.integers(5, 8000), ms=st.integers(0, 3000))
    def meter_fault(self, prepare, fault, duration, ms):
        self._prepare(prepare)
        self.meter_fault = fault
        self.meter_fault_until = self.world.now + duration * 1000
        self.run_ms(ms)

    @rule(prepare=PREPARE, duration=st.integers(5, 3000), ms=st.integers(0, 3000))
    def flash_write_errors(self, prepare, duration, ms):
        self._prepare(prepare)
        self.flash_fault_until = self.world.now + duration * 1000
        self.run_ms(ms)

    # -- commands -----------------------------------------

    @rule(prepare=PREPARE,
          amps=st.one_of(st.none(), st.integers(-10, 200), st.floats(allow_nan=False, width=32)),
          ms=st.integers(5, 600))
    def set_current_limit(self, prepare, amps, ms):
        self._prepare(prepare)
        charger = self.ctl.charger
        if amps is not None and not 0 <= amps <= 80:
            return  # command_auth refuses it (test_command_auth.py)
        charger.set_remote_limit(None if amps is None else int(amps * 1000))
        self.run_ms(ms)

    @rule(prepare=PREPARE, ms=st.integers(5, 600))
    def remote_stop(self, prepare, ms):
        self._prepare(prepare)
        self.ctl.charger.remote_stop(self.vb.clock.ticks_ms())
        self.run_ms(ms)

    @rule(prepare=PREPARE, state=st.sampled_from(ch.AVAILABILITIES), ms=st.integers(5, 600))
    def set_availability(self, prepare, state, ms):
        self._prepare(prepare)
        self.ctl.charger.set_availability(self.vb.clock.ticks_ms(), state)
        self.run_ms(ms)

    @rule(prepare=PREPARE, name=st.sampled_from(COMMANDS),
          args=st.dictionaries(st.sampled_from(("auth_id", "amps", "state", "fault", "x")),
                               ARG_VALUES, max_size=3),
          ms=st.integers(5, 600))
    def signed_command(self, prepare, name, args, ms):
        """Authentic (signed with the pile's key), with any arguments: only the rules stop it."""
        self._prepare(prepare)
        self.counter += 1
        body = json.dumps({"v": 1, "id": "c%d" % self.counter, "cmd": name,
                           "counter": self.counter, "args": args})
        sig = hmac.new(SECRET, body.encode(), hashlib.sha256).hexdigest()
        payload = json.dumps({"body": body, "sig": sig}).encode()
        self.link._commands.received(self.link, self.vb.clock.ticks_ms(), payload)
        if name == "clear_fault":  # a remote clear is a clear: the baseline follows
            self.latched = self.ctl.charger.faults & ch.LATCHED_FAULTS
        self.run_ms(ms)

    @rule(ms=st.integers(5, 600))
    def technician_clears(self, ms):
        """A technician clears what can be cleared; the invariant's baseline follows."""
        self._technician_clears()
        self.run_ms(ms)

    # -- the pile itself ---------------------------------------------------------------------------

    @rule(prepare=PREPARE, garble=st.sampled_from((None, "flip", "truncate")),
          at=st.integers(0, 10 ** 6), ms=st.integers(5, 3000))
    def reboot(self, prepare, garble, at, ms):
        """A reset (power cut, watchdog), perhaps with settings.json garbled on the flash: the
        latched faults survive it, and a garbled file leaves the pile latched (fail closed)."""
        self._prepare(prepare)
        before = self.ctl.charger.faults & ch.LATCHED_FAULTS
        garbled = False
        if garble is not None and os.path.exists(SETTINGS):
            with open(SETTINGS, "rb") as f:
                data = bytearray(f.read())
            if garble == "flip" and data:
                bit = at % (len(data) * 8)
                data[bit // 8] ^= 1 << (bit % 8)  # CRC-32 sees every single-bit error
            else:
                data = data[:at % max(1, len(data))]
            with open(SETTINGS, "wb") as f:
                f.write(data)
            garbled = True
        try:
            self.ctl = self.vb.reboot()
        except wiring.Unavailable:
            # A flash that takes no write at boot: main.hold_unavailable keeps the pile open
            # until a technician replaces it; here the flash heals and the pile boots again.
            assert not self.world.coil, "coil on while the pile boots unavailable"
            self.flash_fault_until = None
            self.ctl = self.vb.reboot()
        self.link = self.vb.build_link()
        self._wrap_outbox()
        self.run_ms(PERIOD_MS)
        faults = self.ctl.charger.faults
        if garbled:
            assert faults & ch.fault_bit("latch_state_lost"), "a garbled settings.json lifted the latch"
        else:
            assert faults & before == before, "a reboot lifted a latched fault"
        self.latched = faults & ch.LATCHED_FAULTS
        self.run_ms(ms)


PileMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, derandomize=FIXED_SEED, deadline=None,
    suppress_health_check=list(HealthCheck), database=None if FIXED_SEED else settings().database)
test_pile_in_a_hostile_world = PileMachine.TestCase


# Sequences the fuzz found with a random seed, replayed as they were shrunk.

def replay(steps, tethered_a=None, then=None):
    """The steps, every invariant judged as in the fuzz; then(state) last, if given."""
    state = PileMachine()
    try:
        state.boot(standard="iec", tethered_a=tethered_a)
        for name, kwargs in steps:
            getattr(PileMachine, name)(state, **kwargs)  # the rule: meter_fault is an attribute too
            state.sessions_bill_what_was_delivered()
        if then is not None:
            then(state)
    finally:
        state.teardown()


def test_found_phantom_plug_in_closed_without_a_self_test_of_its_own():
    """Seed 1000 (`make fuzz`, this file's phantom rule): the ADC frozen at B, no car: a plug-in
    nobody made, self-tested; the car plugged 260 ms later was closed on with that test."""
    replay([("short_cp", dict(ms=5, on=False, prepare="as_is")),
            ("loop_stall", dict(during=None, ms=5, prepare="as_is", stall=0)),
            ("phantom_plug_in", dict(cable=100, level=9000, ms=5, plug_after=260, thaw_after=0)),
            ("charge", dict(ms=1200))])


def test_found_pp_lost_as_it_recloses():
    """The cable_coding_at_reclose rule's find (the report "closed offering 20.0 A through a
    0 A cable"): PP open 10 ms before the re-close; it closed on a PP reading ~90 ms old."""
    replay([("cable_coding_at_reclose", dict(cable=None, after_ms=990, ms=300))])


def test_found_tethered_unplug_under_interference_reading_d():
    """make test's seed under `-n 2` (the report "coil on 118 ms after the car was unplugged"): a
    tethered 32 A cable, no PP; after a remote stop (PWM off, C1: the car may take 6 s) the car
    is unplugged while interference puts every third burst's plus phase in D. The pile reads
    A, A, D, ... with a D every ~19 ms: never 20 ms without C/D. It stayed closed until the 6 s
    of C1; pilot.py's window rule (mostly non-C/D over 20 ms) opens it within the 100 ms of
    IEC 61851-1 Table A.6 seq. 8.1. Replayed to the end: every rule holds."""

    def unplug(state):
        w = state.world
        assert w.coil and w.car.plugged and state.dist.mode == "levels"
        w.do("unplug")
        unplugged = w.now
        while w.coil:
            state.tick()
        assert (w.now - unplugged) // 1000 <= 100, "opened %d ms after the unplug" % (
            (w.now - unplugged) // 1000)
        state.run_ms(288)

    replay([("interference", dict(duration=239, levels=[12000, None], ms=242, prepare="as_is")),
            ("request", dict(ms=5)),
            ("reboot", dict(at=973, garble=None, ms=433, prepare="as_is")),
            ("plug", dict(cable=100, ms=5)),
            ("loop_stall", dict(during=None, ms=222, prepare="as_is", stall=127)),
            ("plug", dict(cable=100, ms=5)),
            ("set_availability", dict(ms=413, prepare="as_is", state="available")),
            ("short_cp", dict(ms=141, on=False, prepare="as_is")),
            ("meter_fault", dict(duration=609, fault="silent", ms=1098, prepare="as_is")),
            ("interference", dict(duration=6, levels=[None], ms=21, prepare="as_is")),
            ("set_availability", dict(ms=5, prepare="as_is", state="available")),
            ("set_availability", dict(ms=578, prepare="as_is", state="unavailable_f")),
            ("loop_stall", dict(during="unplug", ms=144, prepare="charging", stall=80)),
            ("interference", dict(duration=1916, levels=[12000, 3000, None], ms=86, prepare="healed")),
            ("short_cp", dict(ms=128, on=False, prepare="charging")),
            ("remote_stop", dict(ms=265, prepare="charging"))], tethered_a=32, then=unplug)


def unplug_under(levels, stall, tethered_a):
    """A pile charging; interference puts the plus phase of the bursts through `levels` (the
    minus phase the PWM's), the car is unplugged as the loop stalls for `stall` ms; 300 ms run.
    The state, torn down: every invariant judged each tick."""
    state = PileMachine()
    try:
        state.boot(standard="iec", tethered_a=tethered_a)
        state._prepare("charging")
        assert state.world.coil
        PileMachine.interference(state, prepare="as_is", levels=levels, duration=3000, ms=13)
        PileMachine.loop_stall(state, prepare="as_is", stall=stall, during="unplug", ms=300)
    finally:
        state.teardown()
    return state


@pytest.mark.parametrize("levels", ([6000], [6000, None], [None, 3000]))
@pytest.mark.parametrize("stall", (0, 80))
def test_tethered_unplug_the_pile_cannot_see(levels, stall):
    """The oracle's exemption, at its narrowest: a tethered pile charging, interference puts the
    plus phase in C/D on every burst or every other one, the minus phase the PWM's: after the
    unplug the pile reads a car in C/D (C, C, ...; C, A, C, A; A, D, A, D). The other rules
    (C/D -> off, no minus -> off) still judge every tick; with PP the same world opens within
    UNPLUG_TO_OFF_MS."""
    unplug_under(levels, stall, 32)
    assert not unplug_under(levels, stall, None).world.coil


@pytest.mark.parametrize("levels", ([12000, 3000, None], [3000, None, None], [None, 9000, 6000],
                                    [None, None, None, 3000]))
@pytest.mark.parametrize("stall", (0, 80))
def test_tethered_unplug_under_interference_reading_c_d_one_burst_in_three(levels, stall):
    """No exemption where the bursts after the unplug read C/D on one in three (or four): A, A, D
    (the found sequence's), D, A, A, A, B, C, A, A, A, D. A tethered pile opens within
    UNPLUG_TO_OFF_MS as one with PP does (pilot.py's window rule; the oracle judges every tick,
    counting from the unplug, or from the first burst after the stall where it reads C/D with
    C/D just before it)."""
    for tethered_a in (32, None):
        assert not unplug_under(levels, stall, tethered_a).world.coil
