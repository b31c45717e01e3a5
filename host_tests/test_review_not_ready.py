"""No PWM while the pile may not close yet (B1/C1, "EVSE not ready"; docs/safety.md "Not ready").

The fault: the charger's SUSPENDED_EVSE (the controller's close gate False: RCD self-test not
passed, session_record.Records.ready False: meter start not yet checked, started record not
written, a power cut's record waiting up to session_log._RECOVERY_ACK_WAIT_MS for its ack) still
offered PWM. A car seeing PWM goes to C and may expect the close within 3 s (IEC 61851-1,
evse-facts section 1: "B -> C: contactor may close; must within 3 s"); the gate could hold it
back two meter polls plus 5 s. Here, on the wired firmware (wiring.build on the simulated world):

- whenever the PWM is on with the car in C, the contactor closes within 3 s of that (the PWM
  going away, a fault, a stop or a limit ends the count);
- no tick shows PWM whose charger step was given a False gate;
- a gate that drops mid-session opens the contactor in that very tick and takes the PWM away;
- a pile without an MQTT link never waits for a power cut record's ack (none can come).
"""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pilehost.virtual_board import VirtualBoard

import charger as ch
import charger_restore
import pilot
import world as world_module

B_TO_C_CLOSE_MS = 3000  # evse-facts section 1
PERIOD_MS = 10
MQTT = {"host": "127.0.0.1", "secret": "00" * 32}  # a link configured; never built here: no acks


class Watch:
    """Ticks the wired firmware and checks both invariants at every tick."""

    def __init__(self, vb):
        self.vb = vb
        self.world = vb.world
        self.gate = None  # the close gate the charger's step got in the last tick
        self.c_with_pwm_ms = None  # since when the car has been in C with PWM and no close
        self.longest_wait_ms = 0
        self.closes = []
        self.unacked_seen = False
        self._wrap()

    def _wrap(self):
        charger = self.vb.ctl.charger
        real = charger.step

        def step(now_ms, stable, may_close):
            self.gate = may_close
            return real(now_ms, stable, may_close)

        charger.step = step

    def reboot(self):
        self.vb.reboot()
        self._wrap()

    def tick(self):
        vb, w = self.vb, self.world
        was = w.coil
        w.advance()
        vb.tick()
        now = vb.now_ms
        log = vb.ctl.records.log
        if log is not None and log.unacked_recovery:
            self.unacked_seen = True
        if w.coil and not was:
            self.closes.append(now)
        if w.pwm_present():
            assert self.gate, "PWM offered in a tick whose close gate was False (at %d ms)" % now
        if w.pwm_present() and w.car.letter() in "CD" and not w.coil:
            if self.c_with_pwm_ms is None:
                self.c_with_pwm_ms = now
            waited = now - self.c_with_pwm_ms
            self.longest_wait_ms = max(self.longest_wait_ms, waited)
            assert waited <= B_TO_C_CLOSE_MS, "car in C with PWM for %d ms, contactor open" % waited
        else:
            self.c_with_pwm_ms = None

    def run_ms(self, ms):
        end = self.world.now + ms * 1000
        while self.world.now < end:
            self.tick()


def make(monkeypatch, meter="ddsu666", linked=True, steps=()):
    config = {"free_vend": True, "pile_id": "nr-1", "meter": {"type": meter}}
    if linked:
        config["mqtt"] = MQTT
    return Watch(VirtualBoard(monkeypatch, list(steps), config=config, period_ms=PERIOD_MS))


# -- the charger alone -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from((pilot.A, pilot.B, pilot.C, pilot.D, pilot.E)),
                          st.booleans(), st.sampled_from((None, 5000, 16000)),
                          st.sampled_from(("none", "stop", "unavailable", "available"))),
                min_size=1, max_size=40),
       st.booleans(), st.booleans())
def test_the_charger_offers_nothing_while_the_gate_is_false(seq, free_vend, ventilation):
    """Over any sequence of pilot states, gates, limits, stops and availability changes: MODE_OFFER
    only after a step whose gate was True; a gate False in a session that runs means open now."""
    c = charger_restore.build(32000, 32000, free_vend, ventilation)
    c.cable_ma = 32000
    for i, (stable, gate, limit, what) in enumerate(seq):
        now = i * 100
        if what == "stop":
            c.stop_session(now, "remote")
        elif what == "unavailable":
            c.set_availability(now, ch.UNAVAILABLE_B1)
        elif what == "available":
            c.set_availability(now, ch.AVAILABLE)
        c.set_remote_limit(limit)
        c.authorize(now, "remote", "card")
        events = c.step(now, stable, gate)
        if c.pilot_mode == ch.MODE_OFFER:
            assert gate and not events & ch.EV_CAR_PLUGGED_IN
        if not gate and c.state == ch.SUSPENDED_EVSE:
            assert c.power == ch.POWER_OFF  # never the C1 grace: the pile may not deliver energy
        if c.power == ch.POWER_ON:
            assert gate and c.pilot_mode == ch.MODE_OFFER


def test_d_without_ventilation_keeps_its_pwm_once_ready():
    c = charger_restore.build(32000, 32000, True, False)
    c.cable_ma = 32000
    c.step(0, pilot.B, True)
    c.step(10, pilot.D, True)
    assert c.state == ch.SUSPENDED_EVSE and c.pilot_mode == ch.MODE_OFFER and c.power == ch.POWER_HOLD
    c.step(20, pilot.D, False)
    assert c.pilot_mode == pilot.MODE_PLUS and c.power == ch.POWER_OFF


# -- the wired firmware ------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meter=st.sampled_from(("ddsu666", "sdm120", "dlt645")),
       silent_ms=st.integers(0, 4000),
       rcd_response_ms=st.integers(1, 400),
       plug_ms=st.integers(100, 1000),
       request_after_ms=st.integers(0, 3000),
       cut=st.booleans(), linked=st.booleans())
def test_pwm_with_the_car_in_c_means_a_close_within_3_s(monkeypatch, meter, silent_ms, rcd_response_ms,
                                                        plug_ms, request_after_ms, cut, linked):
    """Meter readings late (the meter silent at first), the RCD answering its TEST late, the car
    asking at once or later, a power cut mid-session (its record then waits for an ack when a
    link is configured): the car never sits in C with PWM and the contactor open past 3 s."""
    monkeypatch.setattr(world_module, "RCD_TEST_RESPONSE_US", rcd_response_ms * 1000)
    steps = [(0, "meter_fault", "silent"), (silent_ms, "meter_fault", None), (plug_ms, "plug", 220),
             (plug_ms + request_after_ms, "request")]
    watch = make(monkeypatch, meter, linked, sorted(steps, key=lambda s: s[0]))
    watch.run_ms(plug_ms + request_after_ms + 8000)
    assert watch.closes, "never closed: the gate never opened"
    if cut:
        watch.reboot()  # the power went: the car is still there, asking
        watch.run_ms(25000)
        assert len(watch.closes) >= 2, "no close after the power cut"
        assert watch.unacked_seen == linked  # only a link brings an ack to wait for
    assert watch.longest_wait_ms <= B_TO_C_CLOSE_MS


def test_a_car_plugged_in_sees_no_pwm_before_the_gate_opens(monkeypatch):
    """The reported case: the meter's start reading late (silent for 3 s). Before the fix the
    PWM came at once, the car went to C and waited for the checked reading."""
    watch = make(monkeypatch, steps=[(0, "meter_fault", "silent"), (100, "plug", 220),
                                     (100, "request"), (3000, "meter_fault", None)])
    watch.run_ms(2900)
    assert not watch.world.pwm_present() and watch.world.car.letter() == "B"
    assert watch.vb.ctl.charger.state == ch.SUSPENDED_EVSE
    watch.run_ms(5000)
    assert watch.closes and watch.longest_wait_ms <= B_TO_C_CLOSE_MS


@pytest.mark.parametrize("drop", ["snapshot", "rcd"])
def test_a_gate_that_drops_mid_session_opens_at_once_and_takes_the_pwm(monkeypatch, drop):
    """The flash failing (SessionLog.failed) with the contactor closed: it opens in that very
    tick, never after the C1 wait a withdrawn offer gets, and the PWM goes."""
    watch = make(monkeypatch, steps=[(100, "plug", 220), (100, "request")])
    watch.run_ms(6000)
    assert watch.world.coil and watch.world.pwm_present()
    ctl = watch.vb.ctl
    if drop == "snapshot":
        ctl.records.log._snapshot_error = "snapshot not written: [Errno 28] ENOSPC"
    else:
        monkeypatch.setattr(type(ctl.rcd), "ready", property(lambda self: False))
    watch.tick()
    assert not watch.world.coil, "the contactor waited after the close gate dropped"
    assert not watch.world.pwm_present()
    assert ctl.charger.state == ch.SUSPENDED_EVSE and ctl.charger.power == ch.POWER_OFF


# -- a power cut's record: no wait without a link ------------------------------------------------


def test_a_pile_without_a_link_is_not_held_by_a_power_cut_record(monkeypatch):
    """No mqtt section in config.json: no link, no ack ever. The power cut's record is written
    with the contactor open all the same (it closes at boot, before the next close); the next
    close does not wait RECOVERY_ACK_WAIT_MS for nothing."""
    for linked in (False, True):
        watch = make(monkeypatch, linked=linked, steps=[(100, "plug", 220), (100, "request")])
        assert watch.vb.ctl.records.log.linked == linked
        watch.run_ms(6000)
        assert watch.world.coil
        watch.reboot()
        log = watch.vb.ctl.records.log
        closed_at = None
        waited = False
        while closed_at is None and watch.world.now < (6000 + 30000) * 1000:
            watch.tick()
            waited |= log.unacked_recovery
            if watch.world.coil:
                closed_at = watch.vb.now_ms
        assert closed_at is not None
        assert any("after a power loss" in t for t in watch.vb.reported("session"))
        assert waited == linked
        if not linked:
            recovered = [t for t in watch.vb.reported("session") if "after a power loss" in t]
            assert recovered and not log.unacked_recovery
        assert watch.longest_wait_ms <= B_TO_C_CLOSE_MS


def test_session_log_without_a_link_never_awaits_an_ack(power_cut_records):
    """SessionLog(linked=False) on a real journal: the power cut's record closes, no ack comes,
    Records.ready at once (with a link: not before the ack or RECOVERY_ACK_WAIT_MS)."""
    import journal
    import session_log

    for linked in (False, True):
        records, booted = power_cut_records(str(linked), linked)
        kinds = [journal.kind_name(k) for _s, k, _p in booted.outbox.pending()]
        assert kinds[-2:] == ["session_end", "session_start"]
        assert booted.outbox.acked < booted.outbox.next_seq - 2  # no ack came
        records.poll(200)
        assert records.ready != linked
        assert booted.unacked_recovery == linked
        records.poll(100 + session_log._RECOVERY_ACK_WAIT_MS)
        assert records.ready
