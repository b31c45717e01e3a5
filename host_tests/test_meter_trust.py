"""Meters that can be trusted (issue 13, docs/meters.md): a reading ages and goes stale, energy
is checked against the integral of power, the meter names itself for the session record, and
a DDSU666 is read whether it answers function 0x03 or 0x04."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from session_record import Record
from wiring import make_meter
from meters import Dlt645MeterSim, ModbusMeterSim
from pilehost.meter_rig import Bus, Clock, run

pytestmark = pytest.mark.usefixtures("no_sleeping")  # conftest.py


class LiveWorld:
    """The car draws `power_w` (a function of the time in ms, or a number); the meter's energy
    register integrates it on the bench's clock, as a real meter does."""

    def __init__(self, clock, power_w=7000.0, energy_wh=1234567.0):
        self.clock = clock
        self.power = power_w
        self._wh = energy_wh
        self._at = clock.t
        self.voltage_v = 230.0
        self.power_register = None  # a broken power register: this value instead

    def _p(self, t):
        return self.power(t) if callable(self.power) else self.power

    @property
    def energy_wh(self):
        t = self.clock.t
        while self._at < t:  # 10 ms steps: a real meter integrates continuously
            step = min(10.0, t - self._at)
            self._wh += self._p(self._at) * step / 3600000
            self._at += step
        return self._wh

    @property
    def power_w(self):
        if self.power_register is not None:
            return self.power_register
        return self._p(self.clock.t)

    @property
    def current_a(self):
        return self.power_w / self.voltage_v


def modbus(model="ddsu666", power_w=7000.0, start=0, **kw):
    clock = Clock(start)
    world = LiveWorld(clock, power_w)
    sim = ModbusMeterSim(world, model)
    bus = Bus(clock, sim)
    m = make_meter(model, uart=bus.uart, de=bus.de, **kw)
    return m, sim, world, clock


def dlt(power_w=7000.0):
    clock = Clock()
    world = LiveWorld(clock, power_w)
    sim = Dlt645MeterSim(world, address=bytes.fromhex("785634120000"))
    bus = Bus(clock, sim, baud=2400)
    m = make_meter("dlt645", uart=bus.uart, de=bus.de, poll_interval_ms=2000)
    return m, sim, world, clock


# -- DDSU666: function 0x04 or 0x03 ------------------------------------------------------------------

@pytest.mark.parametrize("functions, wrong", [
    ((0x04,), "exception"), ((0x03,), "exception"), ((0x03,), "silent"), ((0x04,), "silent"),
    ((0x03, 0x04), "exception"),
])
def test_ddsu666_reads_whichever_function_the_meter_answers(functions, wrong):
    m, sim, _, clock = modbus()
    sim.functions, sim.wrong_function = functions, wrong
    run(m, clock, 8000)
    assert m.reading is not None and m.function in functions
    got = m.reading.taken_ms
    run(m, clock, 5000)
    assert m.reading.taken_ms > got  # and it keeps reading with it
    errors = sum(m.errors.values())
    run(m, clock, 20000)
    assert sum(m.errors.values()) == errors  # found once: no more failed cycles


@settings(max_examples=40, deadline=None)
@given(functions=st.sampled_from([(0x03,), (0x04,)]), wrong=st.sampled_from(["exception", "silent"]),
       outage_ms=st.integers(0, 20000))
def test_ddsu666_keeps_the_function_that_worked(functions, wrong, outage_ms):
    """Once a whole reading came with one function, a silent meter (cable pulled) never makes
    the driver change its mind: it is the same meter when it answers again."""
    m, sim, _, clock = modbus()
    sim.functions, sim.wrong_function = functions, wrong
    run(m, clock, 8000)
    found = m.function
    assert found in functions
    sim.fault = "silent"
    run(m, clock, outage_ms)
    assert m.function == found
    sim.fault = None
    before = m.reading.taken_ms
    run(m, clock, 3000)
    assert m.reading.taken_ms > before


def test_eastron_meters_stay_on_0x04():
    m, sim, _, clock = modbus("sdm120")
    sim.fault = "silent"
    run(m, clock, 10000)
    assert m.function == 0x04 and m.reading is None


# -- a reading ages ------------------------------------------------------------------------------

def test_a_reading_not_refreshed_goes_stale():
    m, sim, _, clock = modbus()
    run(m, clock, 2500)
    assert m.fresh(clock.ticks) is m.reading is not None
    assert m.stale_ms == 3000  # three polls of 1 s
    sim.fault = "silent"
    taken = m.reading.taken_ms
    run(m, clock, taken + 2990 - clock.ticks)
    assert m.fresh(clock.ticks) is not None and m.age_ms(clock.ticks) == clock.ticks - taken
    run(m, clock, 20)
    assert m.fresh(clock.ticks) is None and m.reading is not None  # kept, but not as "now"


def test_stale_follows_the_poll_interval():
    m, _, _, _ = dlt()
    assert m.stale_ms == 6000


# -- energy against power ---------------------------------------------------------------------------

def car(t):
    """A car that ramps, pauses and comes back: power steps and slopes between readings."""
    s = (t // 1000) % 300
    if s < 20:
        return 350.0 * s  # 0 -> 7 kW in 20 s
    if s < 200:
        return 7000.0
    if s < 230:
        return 0.0
    return 3700.0


@pytest.mark.parametrize("make, model", [(modbus, "ddsu666"), (modbus, "sdm120"), (modbus, "sdm630"),
                                         (dlt, None)])
@pytest.mark.parametrize("power", [7000.0, 22000.0, 300.0, car])
def test_no_false_alarm_on_a_healthy_meter(make, model, power):
    m, _, _, clock = make(model, power) if model else make(power)
    run(m, clock, 15 * 60 * 1000, step_ms=20)
    assert m.errors["implausible"] == 0, m.last_error
    assert m.reading is not None


@pytest.mark.parametrize("register, why", [
    (0.0, "power register dead while energy counts"),
    (7.0, "power read in kW, taken as W"),
    (14000.0, "power twice what the energy says (CT ratio set wrong)"),
])
def test_energy_and_power_that_disagree_count_implausible(register, why):
    m, _, world, clock = modbus("sdm120")
    world.power_register = register
    run(m, clock, 10 * 60 * 1000, step_ms=20)
    assert m.errors["implausible"] >= 2, why
    assert "energy and power disagree" in (m.last_error or "") or m.errors["implausible"]


def test_one_bad_window_is_not_yet_an_error():
    m, _, world, clock = modbus("sdm120")
    run(m, clock, 60000, step_ms=20)
    world.power_register = 0.0
    run(m, clock, 56000, step_ms=20)  # 7 kW: one 100 Wh window
    world.power_register = None
    run(m, clock, 5 * 60000, step_ms=20)
    assert m.errors["implausible"] == 0


def test_a_gap_is_not_integrated():
    """A silent meter for 30 s while the car paused: the power on either side says nothing of
    the gap, so the window starts again instead of accusing the meter."""
    m, sim, world, clock = modbus("sdm120")
    run(m, clock, 30000, step_ms=20)
    for _ in range(5):
        sim.fault = "silent"
        world.power = 0.0
        run(m, clock, 30000, step_ms=20)
        world.power = 7000.0
        run(m, clock, 1500, step_ms=20)
        sim.fault = None
        run(m, clock, 60000, step_ms=20)
    assert m.errors["implausible"] == 0


# -- who the meter is --------------------------------------------------------------------------------

def test_identity():
    m, _, _, clock = modbus("sdm630", address=7)
    assert m.identity() == "modbus:sdm630@7"
    d, _, _, clock = dlt()
    assert d.identity() == "dlt645"  # not learnt yet
    run(d, clock, 5000)
    assert d.identity() == "dlt645:000012345678"  # the nameplate number, A5 first


# -- on the wired firmware: status and meter messages, session/ended ------------------------------------

CHARGE = [(100, "plug"), (600, "request")]


def _board(monkeypatch, steps, meter_conf):
    from pilehost.virtual_board import VirtualBoard

    conf = {"pile_id": "pile-7", "meter": meter_conf}
    return VirtualBoard(monkeypatch, CHARGE + list(steps), config=conf)


def test_telemetry_stops_showing_power_once_the_reading_is_stale(monkeypatch):
    import json

    import mqtt_link
    import telemetry
    from pilehost.cloud import schemas

    checker = schemas()
    vb = _board(monkeypatch, [(20000, "meter_fault", "silent")], {"type": "ddsu666"})
    pile = mqtt_link.PileView(vb.ctl)
    vb.run_until(19000)
    now = vb.clock.ticks_ms()
    fresh = pile.fresh_reading(now)
    assert fresh is not None and fresh.power_w > 1000
    status = json.loads(telemetry.status(1790000000, 1, 19, "charging", "C", 32000, fresh.power_w, None,
                                         0, 0, "0.1.0", "ref-esp32", pile.limit(now), pile.meter_age_ms(now)))
    checker.check("status", status)
    assert status["power_w"] > 1000 and status["meter_age_ms"] < 3000
    vb.run_until(20000 + vb.ctl.records.meter.stale_ms + 1500)
    now = vb.clock.ticks_ms()
    assert pile.fresh_reading(now) is None and pile.reading() is not None
    reading = pile.reading()
    msg = json.loads(telemetry.meter(1790000000, "pile-7-1-1", 100, reading, pile.meter_age_ms(now),
                                     pile.fresh_reading(now) is not None))
    checker.check("meter", msg)
    assert msg["power_w"] is None and msg["current_a"] is None and msg["age_ms"] > 3000
    assert msg["meter_wh"] == reading.energy_wh  # the register, with its age


@pytest.mark.parametrize("meter_conf, identity", [
    ({"type": "ddsu666", "address": 3}, "modbus:ddsu666@3"),
    ({"type": "dlt645"}, "dlt645:000000000001"),  # learnt by broadcast: sim's address 01 00..00
    ({"type": "s0"}, "s0"),
])
def test_session_ended_names_its_meter(monkeypatch, meter_conf, identity):
    import json

    import journal

    import journal_scan
    import files
    from pilehost.cloud import schemas

    vb = _board(monkeypatch, [(12000, "stop_request"), (13000, "unplug")], meter_conf)
    vb.run_until(30000)
    ended = [json.loads(p) for _, k, p in journal_scan.load(files.OUTBOX_FILE).pending()
             if k == journal.KIND_SESSION_END]
    assert len(ended) == 1, vb.reports[-20:]
    schemas().check("session_ended", ended[0])
    assert ended[0]["meter"] == identity
    assert len(json.dumps(ended[0])) <= 512  # the outbox's payload limit


def test_the_meter_name_never_makes_a_record_too_large(tmp_path):
    """Long pile and auth ids: the meter goes as null rather than the record overflowing an
    outbox of 512-byte payloads (which the meter name alone must never cause; the firmware's
    outbox takes 1024, where the largest record fits with its meter: test_review_records.py)."""
    import json

    import charger as ch
    import journal
    import journal_scan
    import session_restore
    import session_store

    pile = "p" * 40
    outbox = journal_scan.load(str(tmp_path / "outbox.jrnl"), max_payload=512)
    log = session_restore.load(pile, 3, outbox, session_store.SessionStore(str(tmp_path / "s.json")),
                               wall=lambda: 1790000000)  # as wiring.build_session_log
    s = Record(ch.Session(0))
    s.session.authorized_ms, s.session.auth_source, s.session.auth_id = 0, "remote", "xx"
    s.id, s.start_epoch, s.session.stop_reason = pile + "-3-1", 1790000000, "ev_disconnected"
    s.meter_start_wh, s.meter_stop_wh, s._segment_wh = 1000, 2000, 1000
    s.meter_identity = "dlt645:000012345678"
    log.ended(5000, s)
    ended = [json.loads(p) for _, k, p in outbox.pending() if k == journal.KIND_SESSION_END]
    assert len(ended) == 1 and ended[0]["meter"] is None
    s.id, s.session.auth_id = pile + "-3-2", "x"
    log.ended(6000, s)
    ended = [json.loads(p) for _, k, p in outbox.pending() if k == journal.KIND_SESSION_END]
    assert ended[1]["meter"] == "dlt645:000012345678"
