"""Issue 12 item 2: the loop on the chip's clock. Controller.guard, the safety check the main
loop, the records step and the link run between slices of slow work while the contactor is
closed: it opens on C->B and on an RCD trip at every slice point, never closes, and costs
nothing with the contactor open. The wired firmware on the simulated world under a virtual
clock (virtual_board), the guard called as the slow paths call it: with no tick in between.
"""
from hypothesis import HealthCheck, given, settings, strategies as st
from pilehost.virtual_board import CHARGE, VirtualBoard, charging, count_bursts

import charger as ch
import pilot
import relay

SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])



def guard(vb, gap_us):
    """A slice of slow work of gap_us, then the guard, as the slow paths call it."""
    vb.clock.t += gap_us
    vb.world.advance()
    vb.ctl.guard(vb.clock.ticks_ms())


def test_the_guard_reads_nothing_and_changes_nothing_with_the_contactor_open(monkeypatch):
    vb = VirtualBoard(monkeypatch, CHARGE)
    vb.run_until(300)  # plugged, B, contactor open
    bursts = count_bursts(monkeypatch, vb)
    state = (vb.ctl.debouncer.state, vb.ctl.debouncer._since, vb.ctl.rcd.state, vb.ctl.raw)
    for _ in range(50):
        guard(vb, 3000)
    assert bursts == [] and not vb.world.coil
    assert (vb.ctl.debouncer.state, vb.ctl.debouncer._since, vb.ctl.rcd.state, vb.ctl.raw) == state


@SLOW
@given(st.lists(st.integers(0, 12000), min_size=1, max_size=40), st.integers(0, 40))
def test_c_to_b_opens_from_the_guard_alone_at_any_slice_point(monkeypatch, gaps_us, ticks_before):
    """The car goes C->B at any point among the slices; no tick runs after it, only the guards:
    the first guard at least DEBOUNCE_POWER_OFF_MS after the last C read opens."""
    vb = charging(monkeypatch)
    for _ in range(ticks_before):
        vb.tick()
    reads = []  # (now_ms, raw) of every read from here on
    orig = vb.ctl._read_pilot

    def read(now_ms):
        stable = orig(now_ms)
        reads.append((now_ms, vb.ctl.raw))
        return stable
    monkeypatch.setattr(vb.ctl, "_read_pilot", read)
    vb.tick()
    assert reads[-1][1] == pilot.C and vb.world.coil
    vb.world.do("stop_request")
    for gap in gaps_us + [25000]:
        last_c_ms = max(t for t, raw in reads if raw in (pilot.C, pilot.D))
        was_closed = vb.world.coil
        guard(vb, gap)
        now, raw = reads[-1]
        if was_closed and raw not in (pilot.C, pilot.D) and now - last_c_ms >= pilot._DEBOUNCE_POWER_OFF_MS:
            assert not vb.world.coil, "the guard at %d ms after the last C read did not open" % (
                now - last_c_ms)
        if not vb.world.coil:
            break
    assert not vb.world.coil  # 25 ms after everything: open
    assert vb.reports.count(("contactor", "open")) == 1
    # The tick that follows does the rest (the charger's state), and closes nothing.
    vb.tick()
    assert not vb.world.coil and vb.ctl.charger.state != ch.CHARGING


@SLOW
@given(st.lists(st.integers(500, 8000), min_size=1, max_size=60), st.integers(0, 30))
def test_an_rcd_trip_opens_from_the_guard_alone(monkeypatch, gaps_us, ticks_before):
    vb = charging(monkeypatch)
    for _ in range(ticks_before):
        vb.tick()
    vb.world.do("rcd_leak", True)
    t0 = vb.clock.t
    calls = 0
    for gap in gaps_us + [5000] * 40:
        guard(vb, gap)
        calls += 1
        if not vb.world.coil:
            break
    assert not vb.world.coil
    # FAULT read steadily for FAULT_DEBOUNCE_MS (polled by the guards): at most one gap more,
    # plus the guards' own bursts (1.1 ms each and the clock reads)
    bursts_ms = calls * 1.2
    assert (vb.clock.t - t0) / 1000 <= relay._FAULT_DEBOUNCE_MS + max(gaps_us + [5000]) / 1000 + bursts_ms
    assert ("rcd", "trip 1 of %d" % vb.ctl.rcd.max_trips) in vb.reports


ACTIONS = st.sampled_from(["tick", "guard", "stop_request", "request", "unplug", "plug", "leak",
                           "no_leak", "short", "stall"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(ACTIONS, st.integers(0, 15000)), min_size=1, max_size=200))
def test_the_guard_never_closes_and_never_keeps_power_the_tick_would_cut(monkeypatch, script):
    """Any mix of ticks, guards, car actions and stalls: a guard never closes the contactor, and
    after a guard the contactor is closed only if the stable pilot state still allows power."""
    vb = charging(monkeypatch)
    for action, gap in script:
        if action == "tick":
            vb.tick()
        elif action == "guard":
            was = vb.world.coil
            guard(vb, gap)
            assert vb.world.coil <= was  # never closes
            if vb.world.coil:
                assert vb.ctl.debouncer.state in (pilot.C, pilot.D)
                assert vb.ctl.rcd.state not in (relay.TRIPPED, relay.LOCKED_OUT)
        elif action == "stall":
            vb.clock.t += gap * 5
        elif action == "leak":
            vb.world.do("rcd_leak", True)
        elif action == "no_leak":
            vb.world.do("rcd_leak", False)
        elif action == "short":
            vb.world.do("short_cp", gap % 2 == 0)
        else:
            vb.world.do(action)


def test_the_extra_reads_leave_the_diode_and_minus_phase_checks_alone(monkeypatch):
    """The guard's bursts are not judged for the diode nor for a missing minus phase (the tick's
    alone are, with its own counters): many guards between ticks raise nothing."""
    vb = charging(monkeypatch)
    for _ in range(200):
        vb.tick()
        for _ in range(5):
            guard(vb, 1500)
    assert vb.world.coil and vb.ctl.charger.faults == 0
    assert vb.ctl._no_minus_bursts == 0 and vb.ctl._bad_diode_bursts == 0


def test_a_stalled_guard_burst_is_not_judged_the_next_one_is(monkeypatch):
    """A burst stalled inside (a single sample, maybe from the minus phase: X) says nothing of the
    state: the guard leaves the debouncer alone; the next, whole, burst opens on C->B."""
    import controller

    vb = charging(monkeypatch)
    vb.tick()
    vb.world.do("stop_request")
    sampler = vb.ctl.sampler
    orig = sampler.sample
    before = (vb.ctl.debouncer.state, vb.ctl.debouncer._candidate, vb.ctl.debouncer._since)

    def stalled():
        orig()
        vb.clock.t += controller.GUARD_BURST_MAX_US + 1000
    monkeypatch.setattr(sampler, "sample", stalled)
    guard(vb, 25000)
    assert vb.world.coil  # not judged: still closed, the debouncer as it was
    assert (vb.ctl.debouncer.state, vb.ctl.debouncer._candidate, vb.ctl.debouncer._since) == before
    monkeypatch.setattr(sampler, "sample", orig)
    guard(vb, 0)
    assert not vb.world.coil
