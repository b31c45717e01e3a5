"""Issue 10, items 1-6: the pilot / contactor / RCD safety core against a hostile world.

The wired firmware (wiring.build) on the simulated world under a virtual clock (virtual_board).
Each test names the item it covers; each failed on the firmware before the fix.
"""
import errno
import json
import os
import tempfile

import pytest
from hypothesis import example, given, settings, strategies as st, HealthCheck
from pilehost.meter_rig import Pin
from pilehost.virtual_board import CHARGE, VirtualBoard, board_dict, charging, count_bursts

import charger as ch
import charger_restore
import pilot
import relay
import session_store
import wiring
import world as world_module

# The C plus level of the simulated car (R2 || R3 behind the diode, sim/world.py).
C_LEVEL_MV = 5992
X_LEVEL_MV = 10500  # between B (9.56 V) and A (11.4 V): in no band



class Watch:
    """Ticks the board and keeps, in world us: the start of the last tick whose burst read C or
    D, and every coil change. `worst_ms` is the longest coil-on time after the last C/D tick."""

    def __init__(self, vb):
        self.vb = vb
        self.last_cd_us = None
        self.worst_ms = 0
        self.changes = []  # (world us, on)
        w = vb.world
        orig = w._set_coil

        def set_coil(on):
            orig(on)
            self.changes.append((w.now, on))
        w._set_coil = set_coil

    def tick(self):
        vb = self.vb
        start = vb.world.now
        vb.tick()
        if vb.ctl.raw in (pilot.C, pilot.D):
            self.last_cd_us = start
        elif vb.world.coil and self.last_cd_us is not None:
            self.worst_ms = max(self.worst_ms, (vb.world.now - self.last_cd_us) / 1000)

    def run_until(self, t_ms):
        while self.vb.world.advance() < t_ms * 1000:
            self.tick()

    def closes(self):
        return [t for t, on in self.changes if on]


# The invariant: coil off within DEBOUNCE_POWER_OFF_MS plus one control period of the last C/D
# reading. One period here is the 5 ms sleep plus the tick's own ~1.5 ms of virtual time.
LIMIT_MS = pilot._DEBOUNCE_POWER_OFF_MS + 5 + 2


class EveryOtherBurst:
    """Interference on the pilot line: every other burst's plus phase reads X."""

    def __init__(self, level_mv=X_LEVEL_MV):
        self.level = level_mv
        self.last = -10 ** 9
        self.odd = False

    def __call__(self, now_us, mv):
        if now_us - self.last > 500:  # a new burst (reads within one are ~40 us apart)
            self.odd = not self.odd
        self.last = now_us
        return self.level if self.odd and mv > 0 else mv


# -- item 1: the opening rule is about C/D ----------------------------------------------------------


@pytest.mark.parametrize("action", ["stop_request", "unplug"])
def test_item1_alternating_x_does_not_keep_the_contactor_closed(monkeypatch, action):
    """C->B (or an unplug: A) with every other burst X: no burst reads C for 20 ms: open."""
    vb = charging(monkeypatch)
    watch = Watch(vb)
    watch.run_until(2000)
    vb.world.pilot_interference = EveryOtherBurst()
    vb.world.do(action)
    watch.run_until(2500)
    assert not vb.world.coil
    assert watch.worst_ms <= LIMIT_MS


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=st.lists(st.sampled_from(["B", "X", "A", "E"]), min_size=1, max_size=8))
def test_item1_any_mix_of_non_cd_readings_opens_within_20_ms(monkeypatch, pattern):
    """Whatever the non-C/D readings are, interleaved in any pattern, the coil is off within
    20 ms plus one period of the last C/D reading."""
    levels = {"B": 8900, "X": X_LEVEL_MV, "A": 12000, "E": 0}
    vb = charging(monkeypatch)
    watch = Watch(vb)
    watch.run_until(1500)
    i = [0, -10 ** 9]

    def interference(now_us, mv):
        if now_us - i[1] > 500:
            i[0] += 1
        i[1] = now_us
        return levels[pattern[i[0] % len(pattern)]] if mv > 0 else mv

    vb.world.pilot_interference = interference
    watch.run_until(1700)
    assert not vb.world.coil
    assert watch.worst_ms <= LIMIT_MS


# -- item 2: a stuck pilot ADC ----------------------------------------------------------------------


def test_item2_adc_frozen_at_c_is_a_pilot_fault(monkeypatch):
    vb = charging(monkeypatch, [(2000, "adc_stuck", C_LEVEL_MV), (2500, "unplug")])
    vb.run_until(2000)
    assert vb.world.coil
    off = vb.run_while(lambda: vb.world.coil, 100)
    assert off - 2000 <= pilot._DEBOUNCE_POWER_OFF_MS + 10
    assert vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK
    vb.run_until(4000)
    assert not vb.world.coil and vb.ctl.charger.state == ch.FAULT


def _stall_through_minus(vb, stall_us=None, hide=None):
    """The pilot ADC's reads wrapped: whenever the next read would land in the PWM's minus phase,
    the CPU stalls first (an interrupt storm, a flash write, a busy host) until the next plus phase
    begins (while hide() says so; None: always), or for stall_us(now) us when given. A healthy ADC
    whose bursts see no minus sample only because of where the stalls fall. Returns a list whose
    one item is the world time (ms) of the last read that sampled the minus phase."""
    w, clock = vb.world, vb.clock
    read = vb.ctl.sampler._read
    mid_uv = (w.uv_m12 + w.uv_m12 + w.uv_span) // 2  # 0 V on the ADC's scale
    last_minus_ms = [w.now // 1000]

    def stalled_read():
        nxt = w.advance() + clock.read_cost_us  # where the read's own clock call puts it
        duty = w.pwm_duty
        if duty is not None:
            plus_us = w.pwm_period_us * duty // 65535
            phase = nxt % w.pwm_period_us
            if stall_us is not None:
                clock.t += stall_us(nxt) or 0
            elif phase >= plus_us and (hide is None or hide()):
                clock.t += w.pwm_period_us - phase + 1
        uv = read()
        if uv < mid_uv:
            last_minus_ms[0] = w.now // 1000
        return uv

    vb.ctl.sampler._read = stalled_read
    return last_minus_ms


def _offering(monkeypatch, current_a):
    """Charging with the offer at current_a (the board and the cable rated 63 A)."""
    board = board_dict()
    board["ratings"]["max_current_a"] = 63
    steps = [(100, "plug", 100), (600, "request"), (0, "car_max_a", 63)]  # a 63 A cable (PP 100 ohm)
    vb = VirtualBoard(monkeypatch, steps, board=board, config={"max_current_a": current_a})
    vb.run_until(1000)
    assert vb.world.coil and vb.ctl.charger.state == ch.CHARGING
    assert vb.ctl.output.duty == pilot.duty_for_current(current_a * 1000, pilot.IEC)
    return vb


@pytest.mark.parametrize("current_a", [6, 16, 32, 51, 63])
def test_item2_stalls_that_hide_the_minus_phase_are_no_pilot_fault(monkeypatch, current_a):
    """A stall inside a burst can hide the whole minus phase from a healthy ADC; bursts so stalled
    are not counted (the waits show it), so a charge with runs of such bursts shorter than
    controller._NO_MINUS_MAX_MS goes on. The CI run of 2026-12-06 saw this: the heal scenario's
    session ended `pilot_stuck` on a busy host (three bursts in a row)."""
    import controller

    vb = _offering(monkeypatch, current_a)
    run = 2 * controller._NO_MINUS_BURSTS  # bursts hidden in a row (~35 ms), then one seen
    assert (run + 1) * (vb.period_ms + 1) < controller._NO_MINUS_MAX_MS
    bursts = count_bursts(monkeypatch, vb)
    _stall_through_minus(vb, hide=lambda: len(bursts) % (run + 1) != 0)
    vb.run_until(3000)
    assert vb.world.coil and not vb.ctl.charger.faults


@pytest.mark.parametrize("current_a", [6, 32, 63])
def test_item2_stalls_that_hide_the_minus_phase_for_too_long_open(monkeypatch, current_a):
    """Every burst stalled so that no minus sample comes at all: after controller._NO_MINUS_MAX_MS
    that is a pilot fault all the same (a frozen ADC could hide behind such stalls): the
    contactor opens within Table A.6's 100 ms."""
    import controller

    vb = _offering(monkeypatch, current_a)
    start = vb.now_ms
    _stall_through_minus(vb)
    off = vb.run_while(lambda: vb.world.coil, 200)
    assert vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK
    assert controller._NO_MINUS_MAX_MS - vb.period_ms <= off - start <= 100


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stalls=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3000)), min_size=1, max_size=40),
       current_a=st.sampled_from([6, 10, 16, 32, 45, 51, 63]))
@example(stalls=[(1, 1005)], current_a=32)  # torn X bursts retried: their minus samples count
def test_item2_no_pattern_of_stalls_makes_a_healthy_adc_a_pilot_fault(monkeypatch, stalls, current_a):
    """Any pattern of stalls before the reads (0-3 ms each, at any read): a healthy ADC is a stuck
    one only once no read at all sampled the minus phase for controller._NO_MINUS_MAX_MS."""
    import controller

    vb = _offering(monkeypatch, current_a)
    n = [0]

    def stall_us(now_us):
        n[0] += 1
        on, us = stalls[n[0] % len(stalls)]
        return us if on else 0

    last_minus_ms = _stall_through_minus(vb, stall_us)
    while vb.now_ms < 1300 and not vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK:
        vb.world.advance()
        vb.tick()
    if vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK:
        # the controller counts from its tick's start; the read came up to a period later in it
        assert vb.now_ms - last_minus_ms[0] >= controller._NO_MINUS_MAX_MS - vb.period_ms


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jitter=st.lists(st.integers(0, 40), min_size=1, max_size=20),
       current_a=st.sampled_from([6, 16, 32, 51, 63]))
def test_item2_a_frozen_adc_is_caught_through_short_waits(monkeypatch, jitter, current_a):
    """Waits shorter than the minus phase's piece (a slow read, a short interrupt) do not hide a
    frozen ADC: it is still a pilot fault within the power-off debounce."""
    vb = _offering(monkeypatch, current_a)
    n = [0]

    def stall_us(now_us):
        n[0] += 1
        return jitter[n[0] % len(jitter)]

    _stall_through_minus(vb, stall_us)
    vb.world.pilot_adc_stuck_mv = C_LEVEL_MV
    start = vb.now_ms
    off = vb.run_while(lambda: vb.world.coil, 200)
    assert vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK
    assert off - start <= pilot._DEBOUNCE_POWER_OFF_MS + 10


def test_item2_minus_piece_covers_the_high_duty_limit():
    """At the judged limit (90 % duty) the piece is 100 us: an ESP32 read (~35 us) and the loop's
    own ticks_us leave about two reads in it; at 16 A (26.7 %) it is ~416 us."""
    import controller

    assert pilot.minus_piece_us(controller._MINUS_PHASE_MAX_DUTY) == 100
    assert 410 <= pilot.minus_piece_us(pilot.duty_for_current(16000, pilot.IEC)) <= 420


def test_item2_burst_count_rationale():
    """The count is small enough to stay inside the C->B budget at the slowest control period."""
    import controller

    assert controller._NO_MINUS_BURSTS >= 2  # one burst may lose its minus phase to a stall
    assert controller._NO_MINUS_BURSTS * 5 <= pilot._DEBOUNCE_POWER_OFF_MS


@pytest.mark.parametrize("cable_ohm, tethered_a", [(100, None), (None, 80)])
def test_item2_high_duty_charges_without_a_false_fault(monkeypatch, cable_ohm, tethered_a):
    """63 A (89 % duty, ~108 us minus phase) and 80 A (96.6 %, ~34 us: not judged) charge on."""
    board = board_dict()
    board["ratings"]["max_current_a"] = 80
    if tethered_a:
        board["pins"]["pp_adc"] = None
        del board["pp_adc"]
        board["ratings"]["tethered_cable_a"] = tethered_a
    steps = [(100, "plug", cable_ohm), (600, "request"), (0, "car_max_a", 80)]
    vb = VirtualBoard(monkeypatch, steps, board=board, config={"max_current_a": 80})
    vb.run_until(6000)
    assert vb.world.coil and not vb.ctl.charger.faults


# -- item 3: count from the last C/D reading --------------------------------------------------------


@pytest.mark.parametrize("stall_ms", [25, 80, 200])
def test_item3_first_non_cd_read_after_a_stall_opens_at_once(monkeypatch, stall_ms):
    vb = charging(monkeypatch)
    vb.run_until(2000)
    vb.tick()
    assert vb.ctl.raw == pilot.C and vb.world.coil
    vb.world.do("stop_request")  # the car goes to B during a loop stall
    vb.clock.t += stall_ms * 1000
    vb.tick()  # the first read after the stall: B
    assert not vb.world.coil


# -- item 4: RCD blanking bounded, FAULT debounced in time, re-close rate limited ----------------


def leak_while_contacts_closed(monkeypatch, world):
    """A car with a DC leak: residual current flows only while the contacts are closed."""
    orig = world._rcd_fault
    monkeypatch.setattr(world, "_rcd_fault", lambda now: orig(now) or (world.leaky and world.contacts))
    world.leaky = False


def test_item4_leak_present_as_the_contactor_closes_is_cut_fast(monkeypatch):
    """IEC 62955: 0.1 s at 200 mA. FAULT does not say how large: cut a leak present at the close
    within FAULT_DEBOUNCE_MS plus one period of the contacts closing, well inside 100 ms."""
    vb = VirtualBoard(monkeypatch, CHARGE)
    leak_while_contacts_closed(monkeypatch, vb.world)
    vb.world.leaky = True
    watch = Watch(vb)
    watch.run_until(3000)
    on, off = [t for t, _ in watch.changes[:2]]
    assert watch.changes[0][1] and not watch.changes[1][1]
    # contacts close 15 ms after the coil (sim/world.py), FAULT from then on
    assert (off - on) / 1000 <= world_module.CONTACTS_CLOSE_US / 1000 + relay._FAULT_DEBOUNCE_MS + 8
    assert relay._SWITCH_BLANK_MS <= relay._FAULT_DEBOUNCE_MS  # the window adds nothing to that


def chatter(start_ms, end_ms, every_ms=250):
    steps = []
    t = start_ms
    while t < end_ms:
        steps += [(t, "stop_request"), (t + every_ms, "request")]
        t += 2 * every_ms
    return steps


def test_item4_s2_chatter_with_a_leak_trips(monkeypatch):
    """The review's car: S2 chatters C/B every 250 ms with a DC leak: it must trip, on the first
    close with the leak."""
    vb = charging(monkeypatch, chatter(2000, 20000), config={"rcd_max_trips": 6})
    leak_while_contacts_closed(monkeypatch, vb.world)
    watch = Watch(vb)
    watch.run_until(2300)  # the chatter has begun: the contactor switches every 250 ms
    vb.world.leaky = True
    watch.run_until(20000)
    assert vb.ctl.rcd.trips >= 1 and vb.reported("rcd")
    assert len(watch.closes()) <= 1  # retry after rcd_retry_s (300 s): no second close


@pytest.mark.parametrize("every_ms", [10, 20, 49, 50, 51, 100])
def test_item4_rcd_blanking_is_not_extended_by_switching(every_ms):
    """The contactor switching at any rate: a lasting FAULT still trips within
    SWITCH_BLANK_MS + FAULT_DEBOUNCE_MS of its first reading (plus one 5 ms poll)."""
    fault, test = Pin(0), Pin(0)
    rcd = wiring.new_rcd(fault, test)
    rcd.state = relay._READY
    fault.v = 1
    tripped = None
    for t in range(0, 5000, 5):
        if t % every_ms < 5:
            rcd.contactor_switched(t)
        if rcd.poll(t):
            tripped = t
            break
    assert tripped is not None and tripped <= relay._SWITCH_BLANK_MS + relay._FAULT_DEBOUNCE_MS + 5


def test_item4_reclose_is_rate_limited(monkeypatch):
    vb = charging(monkeypatch, chatter(2000, 12000))
    watch = Watch(vb)
    watch.run_until(12000)
    opens = [t for t, on in watch.changes if not on]
    closes = watch.closes()
    assert len(closes) >= 3  # it still charges between the chatter
    for c in closes:
        before = [o for o in opens if o < c]
        if before:
            assert (c - before[-1]) / 1000 >= relay.MIN_OPEN_MS


@pytest.mark.parametrize("period_ms", [1, 5, 20])
def test_item4_fault_debounce_is_in_time_not_polls(monkeypatch, period_ms):
    """A 30 ms FAULT pulse (a spike) does not trip; a lasting one trips ~50 ms after its start,
    whatever the control period."""
    vb = charging(monkeypatch, [(2000, "rcd_leak", True), (2030, "rcd_leak", False),
                                (3000, "rcd_leak", True)], config={"control_period_ms": period_ms})
    vb.period_ms = period_ms
    vb.run_until(2900)
    assert vb.ctl.rcd.trips == 0 and vb.world.coil
    off = vb.run_while(lambda: vb.world.coil, 200)
    # Up to one period to see FAULT, the debounce, up to one period to confirm (docs/safety.md,
    # "Budget"); one period only held by luck of the tick phase.
    assert relay._FAULT_DEBOUNCE_MS <= off - 3000 <= relay._FAULT_DEBOUNCE_MS + 2 * period_ms + 3
    assert vb.ctl.rcd.trips == 1


# -- item 5: safety decreases of the offer go out at once -----------------------------------------


def offered(vb):
    duty = vb.world.pwm_duty
    return 0 if duty is None else world_module.offered_ma(duty)


def test_item5_lower_cable_rating_before_c_goes_out_at_once(monkeypatch):
    """PP read 220 ohm at plug-in, then 1.5 kohm before C: the 13 A goes out before the close."""
    vb = VirtualBoard(monkeypatch, [(100, "plug", 220), (400, "plug", 1500), (600, "request")])
    while vb.now_ms < 6000:
        vb.tick()
        if vb.world.coil:
            assert offered(vb) <= 13000, vb.now_ms
    assert vb.world.coil


def test_item5_pp_is_re_read_while_charging(monkeypatch):
    vb = charging(monkeypatch, [(2000, "plug", 1500)])
    vb.run_until(2000)
    assert offered(vb) > 13000
    vb.run_until(2000 + 200)
    assert offered(vb) <= 13000


def test_item5_never_closes_on_an_offer_above_the_cable(monkeypatch):
    """Even if the offer could not go out (a bug), the close is refused."""
    vb = VirtualBoard(monkeypatch, [(100, "plug", 220), (400, "plug", 1500), (600, "request")])
    vb.run_until(300)
    assert vb.ctl.output.duty == pilot.duty_for_current(32000, pilot.IEC)
    monkeypatch.setattr(vb.ctl, "_offer", lambda now_ms, duty: None)  # the offer sticks at 32 A
    vb.run_until(3000)
    assert not vb.world.coil


def test_item5_remote_limit_decrease_still_waits_5_s(monkeypatch):
    """Not a safety decrease: IEC 61851-1's one change per 5 s stays."""
    vb = charging(monkeypatch)
    vb.ctl.charger.set_remote_limit(20000)
    vb.run_until(5400)  # 5 s after the first offer
    first = vb.ctl.output.duty
    assert first == pilot.duty_for_current(20000, pilot.IEC)
    vb.ctl.charger.set_remote_limit(16000)
    vb.run_until(6000)
    assert vb.ctl.output.duty == first


# -- item 6: latched faults fail closed ------------------------------------------------------------


def boot_with_settings(monkeypatch, data, steps=CHARGE):
    flash = tempfile.mkdtemp(prefix="pile-flash-")
    if data is not None:
        path = os.path.join(flash, "settings.json")
        if data == "dir":
            os.mkdir(path)  # open() fails with EISDIR: unreadable
        else:
            with open(path, "wb") as f:
                f.write(data)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)
    vb = VirtualBoard(monkeypatch, steps)
    vb.run_until(2000)
    return vb


def good_file(value):
    return session_store._encode(value)


def flipped(data, bit):
    data = bytearray(data)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


WELDED_FILE = good_file({"availability": "available", "limit_ma": None, "latched": ["welded"]})


def assert_latched(vb):
    assert vb.ctl.charger.faults & ch.LATCHED_FAULTS, vb.reports
    assert vb.ctl.output.mode == pilot.MODE_F and not vb.world.coil


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bit=st.integers(0, len(WELDED_FILE) * 8 - 1))
def test_item6_any_flipped_bit_keeps_the_pile_latched(monkeypatch, bit):
    vb = boot_with_settings(monkeypatch, flipped(WELDED_FILE, bit))
    assert_latched(vb)


@pytest.mark.parametrize("data", [b"not json at all", b"0badc0de\n{}", b"", "dir",
                                  good_file({"latched": "welded"}),
                                  good_file({"latched": ["welded", "no_such_fault"]}),
                                  good_file([1, 2])])
def test_item6_garbled_or_unreadable_is_latched(monkeypatch, data):
    vb = boot_with_settings(monkeypatch, data)
    assert_latched(vb)
    assert vb.ctl.charger.faults & ch.FAULT_LATCH_STATE_LOST


def test_item6_a_bad_limit_does_not_discard_the_latched_list(monkeypatch):
    vb = boot_with_settings(monkeypatch, good_file(
        {"availability": "unavailable_b1", "limit_ma": "lots", "latched": ["rcd_lockout"]}))
    assert vb.ctl.charger.faults == ch.FAULT_RCD_LOCKOUT
    assert vb.ctl.charger.availability_wanted == ch.UNAVAILABLE_B1
    assert vb.ctl.charger.remote_limit_ma is None
    assert_latched(vb)


def test_item6_missing_file_means_no_latched_faults(monkeypatch):
    vb = boot_with_settings(monkeypatch, None)
    assert vb.world.coil and not vb.ctl.charger.faults


def test_item6_technician_clears_it_and_it_stays_cleared(monkeypatch):
    vb = boot_with_settings(monkeypatch, b"garbage")
    assert vb.ctl.charger.faults == ch.FAULT_LATCH_STATE_LOST
    assert vb.ctl.clear_fault(vb.clock.ticks_ms(), "latch_state_lost") == "cleared"
    vb.run_until(4000)
    assert vb.world.coil and not vb.ctl.charger.faults
    flash = os.getcwd()
    with open("settings.json", "rb") as f:
        assert json.loads(f.read()[9:])["latched"] == []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)
    vb = VirtualBoard(monkeypatch, CHARGE)
    vb.run_until(2000)
    assert vb.world.coil and not vb.ctl.charger.faults


def test_item6_latch_state_lost_is_kept_across_a_reboot(monkeypatch):
    """The fault is written back: a second reboot (with a now-good file) is still latched."""
    vb = boot_with_settings(monkeypatch, b"garbage")
    flash = os.getcwd()
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)
    vb = VirtualBoard(monkeypatch, CHARGE)
    vb.run_until(2000)
    assert vb.ctl.charger.faults == ch.FAULT_LATCH_STATE_LOST
    assert_latched(vb)


def test_item6_unreadable_is_an_oserror_not_enoent(monkeypatch):
    """A read error other than 'no such file' is unreadable, not first boot."""
    store = session_store.SettingsStore(os.path.join(tempfile.mkdtemp(), "settings.json"))
    real_open = open

    def failing_open(path, mode="r", *a):
        if path == store.path:
            raise OSError(errno.EIO, "I/O error")
        return real_open(path, mode, *a)

    monkeypatch.setattr("builtins.open", failing_open)
    c = charger_restore.build(32000, 32000, True, False, settings=store)
    charger_restore.load_settings(c, 0)
    assert c.faults == ch.FAULT_LATCH_STATE_LOST

