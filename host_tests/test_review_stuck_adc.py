"""Adversarial review of the stalled-burst rule of the stuck pilot ADC (commit 9e5a537, docs/safety.md
"A stuck pilot ADC"): PilotSampler.gap_us, pilot.minus_piece_us, controller._check_diode.

Two levels: the sampler alone on a modelled PWM line and clock, where stalls land where
MicroPython can run a scheduled callback (right after a branch opcode, py/vm.c
pending_exception_check: Pin and Timer callbacks on the ESP32 are soft, evse-facts section 6);
and the wired firmware on the virtual board, as test_hostile_safety.py's item2 tests use it.
"""
import dis
import sys

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st
from pilehost.virtual_board import VirtualBoard, board_dict

import charger as ch
import controller
import mp_time
import pilot
import wiring

CAL = board_dict()["pilot_adc"]
PLUS_MV, MINUS_MV = 5992, -12000  # a car in C behind its diode (sim/world.py)
C_LEVEL_MV = 5992
HIGH_DUTIES = (pilot.duty_for_current(63000, pilot.IEC), controller._MINUS_PHASE_MAX_DUTY)


class Line:
    """A 1 kHz PWM on the CP line, a clock whose reads and ADC reads take time, and stalls: after
    every branch opcode the sampler executes, the next stall of `stalls` (a scheduled callback)."""

    def __init__(self, duty, phase_us, stalls, start_us=0, read_us=35, stamp_us=1):
        self.t = start_us
        self.duty, self.phase_us = duty, phase_us
        self.stalls, self.n = stalls, 0
        self.read_us, self.stamp_us = read_us, stamp_us

    def ticks_us(self):
        now = self.t & (mp_time.TICKS_PERIOD - 1)
        self.t += self.stamp_us
        return now

    def read_uv(self):
        plus_us = pilot._PERIOD_US * self.duty // pilot.DUTY_FULL
        mv = PLUS_MV if (self.t + self.phase_us) % pilot._PERIOD_US < plus_us else MINUS_MV
        self.t += self.read_us  # the conversion is at the read's start, its cost after it
        low, high = CAL["uv_at_minus_12v"], CAL["uv_at_plus_12v"]
        return low + (mv + 12000) * (high - low) // 24000

    def stall(self):
        if self.stalls:
            self.t += self.stalls[self.n % len(self.stalls)]
            self.n += 1


def _sample_with_stalls(line):
    """One burst; line.stall() after each branch opcode of PilotSampler.sample (CPython's opcode
    trace; MicroPython's VM checks for pending callbacks at the same places)."""
    sampler = wiring.new_sampler(line, line.ticks_us, CAL["uv_at_minus_12v"], CAL["uv_at_plus_12v"])
    code = pilot.PilotSampler.sample.__code__
    after_jump = [False]

    def local(frame, event, arg):
        if event == "opcode":
            if after_jump[0]:
                line.stall()
            after_jump[0] = "JUMP" in dis.opname[frame.f_code.co_code[frame.f_lasti]]
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code:
            frame.f_trace_opcodes = True
            return local
        return None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        sampler.sample()
    finally:
        sys.settrace(old)
    return sampler


def test_the_stall_model_sees_the_sampler_branch():
    """The model is live: stalls after branches do stretch the burst's waits."""
    quiet = _sample_with_stalls(Line(HIGH_DUTIES[0], 0, []))
    stalled = _sample_with_stalls(Line(HIGH_DUTIES[0], 0, [50]))
    assert stalled.gap_us >= quiet.gap_us + 50


@settings(max_examples=400, deadline=None, phases=(Phase.explicit, Phase.generate, Phase.shrink))
@given(duty=st.one_of(st.sampled_from(HIGH_DUTIES), st.integers(pilot.duty_for_current(6000, pilot.IEC),
                                                                 controller._MINUS_PHASE_MAX_DUTY)),
       phase_us=st.integers(0, 999),
       stalls=st.lists(st.integers(0, 400), min_size=1, max_size=12),
       start_us=st.one_of(st.just(0), st.integers(mp_time.TICKS_PERIOD - 1500, mp_time.TICKS_PERIOD - 1)))
# 90 % duty: a callback of 60 us after a read, the next one between the next stamp and its read
# (on 9e5a537's loop, CPython 3.11: five branches an iteration): waits of 96 us, reads 156 apart.
@example(duty=controller._MINUS_PHASE_MAX_DUTY, phase_us=42, stalls=[0, 0, 0, 0, 60, 60, 0, 0, 0, 0],
         start_us=0)
def test_a_judged_burst_of_a_healthy_adc_holds_the_minus_phase(duty, phase_us, stalls, start_us):
    """The rule's soundness: a healthy ADC's burst that missed the minus phase is never judged
    (gap_us reached minus_piece_us), whatever the scheduled callbacks between its reads, across the
    ticks_us wrap. A read sits between two stamps: if a callback may run between a stamp and its
    read, two reads can lie up to two waits apart while every wait is short, and such a burst was
    judged (9e5a537: a false pilot_stuck)."""
    sampler = _sample_with_stalls(Line(duty, phase_us, stalls, start_us))
    if pilot.diode_check(sampler.minus_mv, pilot.IEC) is None:
        assert sampler.gap_us >= pilot.minus_piece_us(duty)


@settings(max_examples=300, deadline=None)
@given(duty=st.integers(pilot.duty_for_current(6000, pilot.IEC), controller._MINUS_PHASE_MAX_DUTY),
       start_us=st.integers(0, 999))
def test_minus_piece_is_a_piece_every_burst_holds(duty, start_us):
    """The math: wherever a burst of BURST_US starts, its longest piece of minus phase is at least
    minus_piece_us (and never more than the minus phase itself, up to the judged 90 %)."""
    plus_us = pilot._PERIOD_US * duty / pilot.DUTY_FULL
    minus = pilot._PERIOD_US - plus_us
    longest = run = 0.0
    for t10 in range(start_us * 10, (start_us + pilot.BURST_US) * 10):  # 0.1 us steps
        run = run + 0.1 if (t10 / 10) % pilot._PERIOD_US >= plus_us else 0.0
        longest = max(longest, run)
    assert longest >= pilot.minus_piece_us(duty) - 0.2
    assert pilot.minus_piece_us(duty) <= minus + 0.5


# -- the wired firmware on the virtual board ------------------------------------------------------

def _charging_at_63a(monkeypatch, standard=pilot.IEC, inverted=False, start_us=0, read_cost_us=20):
    """Charging at 63 A (89.2 % duty: minus_piece_us 104 us, the highest judged duty a 63 A cable
    gives; GB/T's cap), on a clock whose every read costs read_cost_us."""
    board = board_dict()
    board["ratings"]["max_current_a"] = 63
    board["levels"]["pilot_pwm_inverted"] = inverted
    steps = [(100, "plug", 100), (600, "request"), (0, "car_max_a", 63)]
    vb = VirtualBoard(monkeypatch, steps, board=board, start_us=start_us,
                      config={"max_current_a": 63, "standard": standard})
    vb.clock.read_cost_us = read_cost_us
    vb.run_until(1000)
    assert vb.world.coil and vb.ctl.charger.state == ch.CHARGING
    assert vb.ctl.output.duty == pilot.duty_for_current(63000, standard)
    return vb


def _delay_reads(vb, delay_us):
    """Each pilot ADC read takes delay_us(n) us more before it samples (n: the read's number)."""
    read, clock, n = vb.ctl.sampler._read, vb.clock, [0]

    def slow_read():
        n[0] += 1
        clock.t += delay_us(n[0])
        return read()

    vb.ctl.sampler._read = slow_read


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(standard=st.sampled_from(pilot.STANDARDS), inverted=st.booleans(),
       wrap_in_us=st.integers(0, 3000), jitter=st.lists(st.integers(0, 30), min_size=1, max_size=9))
def test_a_frozen_adc_is_caught_at_high_duty_on_chip_like_reads(monkeypatch, standard, inverted, wrap_in_us,
                                                                 jitter):
    """Item 2's attack on 9e5a537: the threshold at high duty (104 us at 63 A) against reads ~70 us
    apart (an ESP32 read ~35 us, the loop as much: the chip figures in the report), with soft
    callbacks up to 30 us landing anywhere, both standards, an inverted PWM stage, and the
    ticks_us wrap (30 bits) inside the bursts: still a pilot fault within the power-off debounce
    and a period."""
    # ticks_us wraps 6-9 ms after the freeze, before its third burst: inside the detection
    start_us = mp_time.TICKS_PERIOD - 1_006_000 - wrap_in_us
    vb = _charging_at_63a(monkeypatch, standard, inverted, start_us=start_us, read_cost_us=35)
    assert vb.clock.t < mp_time.TICKS_PERIOD
    _delay_reads(vb, lambda n: jitter[n % len(jitter)])
    vb.world.pilot_adc_stuck_mv = C_LEVEL_MV
    start = vb.now_ms
    off = vb.run_while(lambda: vb.world.coil, 200)
    assert vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK
    assert off - start <= pilot._DEBOUNCE_POWER_OFF_MS + vb.period_ms
    assert vb.clock.t >= mp_time.TICKS_PERIOD  # the wrap came inside the run


def test_guard_bursts_neither_count_nor_hide_a_frozen_adc(monkeypatch):
    """Controller.guard's bursts (between slices of slow work, GUARD_BURST_MAX_US) judge the state
    only; they do not touch the stuck count, so the rule is not needed there, and a guard stalled
    through the minus phase between ticks does not delay the tick's count."""
    vb = _charging_at_63a(monkeypatch)
    vb.world.pilot_adc_stuck_mv = C_LEVEL_MV
    stalled = [False]
    _delay_reads(vb, lambda n: 150 if stalled[0] and n % 7 == 0 else 0)
    start = vb.now_ms
    while vb.world.coil:
        assert vb.now_ms - start <= pilot._DEBOUNCE_POWER_OFF_MS + vb.period_ms
        vb.tick()
        counted = vb.ctl._no_minus_bursts
        stalled[0] = True
        for _ in range(3):
            vb.ctl.guard(vb.clock.ticks_ms())
        stalled[0] = False
        assert vb.ctl._no_minus_bursts == counted
    assert vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK


@pytest.mark.parametrize("how", ["slow_reads", "a_stall_every_burst"])
def test_a_frozen_adc_behind_stalled_bursts_is_caught(monkeypatch, how):
    """A frozen ADC whose reads are each slower than the piece (104 us at 63 A: a failing ADC,
    a driver's timeout), or with one stall that long in every burst (an interrupt source at
    ~1 kHz): no burst is counted, yet after controller._NO_MINUS_MAX_MS with no minus sample the
    fault opens the contactor, within Table A.6's 100 ms (it escaped before that cap)."""
    vb = _charging_at_63a(monkeypatch)
    if how == "slow_reads":
        _delay_reads(vb, lambda n: 110)
    else:
        _delay_reads(vb, lambda n: 110 if n % 12 == 0 else 0)
    vb.world.pilot_adc_stuck_mv = C_LEVEL_MV
    start = vb.now_ms
    off = vb.run_while(lambda: vb.world.coil, 200)
    assert vb.ctl.charger.faults & ch.FAULT_PILOT_STUCK
    assert off - start <= 100
