"""A pilot burst stalled inside (an interrupt storm on the chip, a busy host under the simulator):
a gap between two reads can hide the whole plus phase, and a burst whose reads all fall in the
minus phase reads -12 V: no band, X. After a loop iteration longer than DEBOUNCE_POWER_OFF_MS
the first non-C/D reading leaves C at once (docs/safety.md), so that torn burst opened the
contactor of a car still charging (pilot: C -> X, pilot_invalid) and the session paused for
relay.MIN_OPEN_MS: test_link_heal_unix's half-open flake on a loaded host. A stalled burst
(pilot.BURST_GAP_MAX_US) that reads another state than the stable one is in doubt: the guard
leaves it unjudged, the tick takes another burst at once and judges that one.

The wired firmware on the simulated world under a virtual clock (pilehost.virtual_board)."""
from hypothesis import HealthCheck, given, settings, strategies as st
from pilehost.virtual_board import charging, count_bursts

import charger as ch
import pilot

SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])



def stall_the_next_burst(monkeypatch, vb, phase_us, stall_us, whole=True):
    """The next burst's first ADC read at phase_us of the 1 kHz PWM period, then the CPU taken away
    for stall_us, rounded up to whole periods (whole): the burst ends with that read and the one
    its last stamp takes, then at the same phase. Returns the levels (mV) of the stalled reads."""
    sampler = vb.ctl.sampler
    read = sampler._read
    seen = []

    def first_read():
        # the read's own clock reading (world.advance) costs one read_cost_us
        cost = vb.clock.read_cost_us
        vb.clock.t += (phase_us - cost - vb.clock.t) % vb.world.pwm_period_us
        uv = read()
        seen.append(sampler.to_mv(uv))
        vb.clock.t += _whole_periods(vb, stall_us) if whole else stall_us
        monkeypatch.setattr(sampler, "_read", read)  # the next reads are whole
        return uv
    monkeypatch.setattr(sampler, "_read", first_read)
    return seen


def _whole_periods(vb, us):
    period = vb.world.pwm_period_us
    return -(-us // period) * period


def minus_phase_us(vb):
    """A point in the middle of the PWM's minus phase (the duty offered now)."""
    period = vb.world.pwm_period_us
    high = vb.world.pwm_duty * period // 65535
    return (high + period) // 2


def test_a_stalled_tick_burst_after_a_long_iteration_does_not_open(monkeypatch):
    """The deterministic form of the flake: an iteration of 25 ms (more than the 20 ms of
    DEBOUNCE_POWER_OFF_MS since the last C read), then a tick whose burst stalls after one read
    from the minus phase. The car still draws: the contactor stays closed, no fault."""
    vb = charging(monkeypatch)
    vb.run_for(50)
    vb.clock.t += 25000  # the loop stalled: the next tick comes 30 ms after the last C read
    seen = stall_the_next_burst(monkeypatch, vb, minus_phase_us(vb), 3 * pilot.BURST_US)
    vb.tick()
    assert seen and pilot.classify(seen[0], pilot.IEC) == pilot.X  # the torn burst said X
    assert vb.world.coil, vb.reports[-6:]
    assert vb.ctl.debouncer.state == pilot.C and vb.ctl.charger.faults == 0
    assert vb.ctl.charger.state == ch.CHARGING
    vb.run_for(200)
    assert vb.world.coil and not vb.reported("fault")


def test_a_stalled_tick_burst_still_opens_on_c_to_b(monkeypatch):
    """The car goes C->B during the stall: the burst taken again reads B and the tick opens, as
    it would have with a whole burst (the stall is the only delay)."""
    vb = charging(monkeypatch)
    vb.run_for(50)
    vb.clock.t += 25000
    vb.world.do("stop_request")
    stall_the_next_burst(monkeypatch, vb, minus_phase_us(vb), 3 * pilot.BURST_US)
    vb.tick()
    assert not vb.world.coil


def test_bursts_that_always_stall_are_judged(monkeypatch):
    """An interrupt storm that tears every burst: the tick cannot wait for a whole one. The burst
    taken again is judged whatever it holds; the minus phase it lost, the 20 ms rule and the
    stuck-ADC rule open the contactor (on doubt, open), as before."""
    vb = charging(monkeypatch)
    vb.run_for(50)
    sampler = vb.ctl.sampler
    read = sampler._read
    period = vb.world.pwm_period_us

    def torn():
        vb.clock.t += (minus_phase_us(vb) - vb.clock.read_cost_us - vb.clock.t) % period
        uv = read()
        vb.clock.t += 3 * pilot.BURST_US
        return uv
    monkeypatch.setattr(sampler, "_read", torn)
    vb.run_for(100)
    assert not vb.world.coil


@SLOW
@given(st.integers(0, 999), st.integers(0, 60000), st.integers(pilot.BURST_GAP_MAX_US + 1, 20000))
def test_a_car_in_c_is_never_cut_off_by_one_stalled_burst(monkeypatch, phase_us, gap_us, stall_us):
    """Whatever the phase of the stalled read, the iteration's length before it and the stall's
    length: one torn burst never opens the contactor of a car in C."""
    vb = charging(monkeypatch)
    vb.run_for(50)
    vb.clock.t += gap_us
    stall_the_next_burst(monkeypatch, vb, phase_us, stall_us)
    vb.tick()
    vb.run_for(50)
    assert vb.world.coil and vb.ctl.charger.faults == 0, vb.reports[-6:]


def test_a_whole_burst_is_not_stalled_a_gap_makes_it(monkeypatch):
    """At an ESP32 read's pace (~40 us a read with its clock readings) no burst is stalled; a gap
    of more than BURST_GAP_MAX_US between two reads, anywhere in it, makes it so."""
    vb = charging(monkeypatch)
    sampler = vb.ctl.sampler
    for _ in range(50):
        sampler.sample()
        assert not (sampler.gap_us > pilot.BURST_GAP_MAX_US)
    read = sampler._read
    for at in (1, 5, 20):
        n = []

        def gap_at(at=at, n=n):
            n.append(1)
            if len(n) == at:
                vb.clock.t += pilot.BURST_GAP_MAX_US + 1
            return read()
        monkeypatch.setattr(sampler, "_read", gap_at)
        sampler.sample()
        assert (sampler.gap_us > pilot.BURST_GAP_MAX_US)
        monkeypatch.setattr(sampler, "_read", read)
        sampler.sample()
        assert not (sampler.gap_us > pilot.BURST_GAP_MAX_US)


def test_a_guard_burst_torn_by_a_short_stall_is_not_judged(monkeypatch):
    """A stall of 1.5 ms inside a guard's burst: shorter than GUARD_BURST_MAX_US in all, yet the
    burst holds one minus-phase read. The guard comes 30 ms after the last C read, so an X judged
    would open at once: it is not judged, the car in C keeps charging."""
    vb = charging(monkeypatch)
    vb.run_for(50)
    vb.clock.t += 30000
    vb.world.advance()
    stall_the_next_burst(monkeypatch, vb, minus_phase_us(vb), 1500)
    before = (vb.ctl.debouncer.state, vb.ctl.debouncer._candidate, vb.ctl.debouncer._since)
    vb.ctl.guard(vb.clock.ticks_ms())
    assert vb.world.coil
    assert (vb.ctl.debouncer.state, vb.ctl.debouncer._candidate, vb.ctl.debouncer._since) == before
    vb.run_for(50)
    assert vb.world.coil and vb.ctl.charger.faults == 0


def test_a_stalled_burst_that_reads_the_stable_state_is_taken_as_it_is(monkeypatch):
    """A gap that left the plus phase in the burst (it reads C, the stable state) is no doubt: the
    tick takes no second burst and the read counts as C (the guard asks the same _in_doubt)."""
    vb = charging(monkeypatch)
    vb.run_for(50)
    sampler = vb.ctl.sampler
    plus_phase = vb.world.pwm_duty * vb.world.pwm_period_us // 65535 // 2
    bursts = count_bursts(monkeypatch, vb)
    stall_the_next_burst(monkeypatch, vb, plus_phase, 500, whole=False)
    now = vb.clock.ticks_ms()
    vb.tick()
    assert (sampler.gap_us > pilot.BURST_GAP_MAX_US) and len(bursts) == 1
    assert vb.ctl.debouncer._last_cd == now and vb.world.coil
    assert not vb.ctl._in_doubt()  # the guard's test too (it also skips a burst over GUARD_BURST_MAX_US)


def plus_phase_us(vb):
    return vb.world.pwm_duty * vb.world.pwm_period_us // 65535 // 2


def test_stalled_bursts_that_miss_the_minus_phase_do_not_end_the_session(monkeypatch):
    """The other face of a torn burst: its reads all in the plus phase (C), none in the minus
    phase. Three such ticks in a row were `pilot_stuck` (a frozen ADC), ending the session on a
    busy host; a stalled burst is no evidence of a frozen ADC, the whole ones between them are."""
    import controller

    vb = charging(monkeypatch)
    vb.run_for(50)
    for _ in range(controller._NO_MINUS_BURSTS):  # ~45 ms of them: shorter than NO_MINUS_MAX_MS
        stall_the_next_burst(monkeypatch, vb, plus_phase_us(vb), 3 * pilot.BURST_US)
        vb.tick()
        sampler = vb.ctl.sampler
        assert sampler.gap_us > pilot.BURST_GAP_MAX_US
        assert pilot.diode_check(sampler.minus_mv, pilot.IEC) is None
    vb.run_for(100)
    assert vb.world.coil and vb.ctl.charger.faults == 0 and vb.ctl.charger.state == ch.CHARGING


def test_a_frozen_adc_behind_bursts_that_all_stall_is_still_caught(monkeypatch):
    """The ADC frozen at a C level and every burst stalled (an interrupt storm): no burst is whole,
    yet the fault comes (waits shorter than the minus phase's piece: after NO_MINUS_BURSTS; else
    after NO_MINUS_MAX_MS), the contactor opens."""
    import controller

    vb = charging(monkeypatch, [(1100, "adc_stuck", 5992)])
    vb.run_until(1100)
    sampler = vb.ctl.sampler
    read = sampler._read

    def stalled():
        vb.clock.t += pilot.BURST_GAP_MAX_US + 1
        return read()
    monkeypatch.setattr(sampler, "_read", stalled)
    for _ in range(controller._NO_MINUS_MAX_MS // vb.period_ms + 2):
        vb.tick()
        assert (sampler.gap_us > pilot.BURST_GAP_MAX_US)
    assert vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK and not vb.world.coil


def test_two_torn_bursts_in_a_row_then_a_whole_one(monkeypatch):
    """Torn twice in a row (seen on a busy host: the retry hit the next preemption): the tick takes
    a third burst and judges that; it never takes more than TICK_BURSTS_IN_DOUBT."""
    import controller

    vb = charging(monkeypatch)
    vb.run_for(50)
    sampler = vb.ctl.sampler
    read = sampler._read
    period = vb.world.pwm_period_us
    torn = [0]
    bursts = count_bursts(monkeypatch, vb)

    def tearing():
        if torn[0]:
            torn[0] -= 1
            vb.clock.t += (minus_phase_us(vb) - vb.clock.read_cost_us - vb.clock.t) % period
            uv = read()
            vb.clock.t += _whole_periods(vb, 3 * pilot.BURST_US)
            return uv
        return read()
    monkeypatch.setattr(sampler, "_read", tearing)
    vb.clock.t += 25000
    torn[0] = 2 * (controller._TICK_BURSTS_IN_DOUBT - 1)  # two reads a torn burst: before and after
    vb.tick()
    assert len(bursts) == controller._TICK_BURSTS_IN_DOUBT and vb.world.coil
    assert vb.ctl.debouncer.state == pilot.C and vb.ctl.charger.faults == 0
    del bursts[:]
    vb.clock.t += 25000
    torn[0] = 10
    vb.tick()
    assert len(bursts) == controller._TICK_BURSTS_IN_DOUBT and not vb.world.coil
