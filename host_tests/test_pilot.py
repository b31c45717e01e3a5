"""Pilot: bands, debounce, duty <-> current, cable coding, the sampler on the simulated line."""
import pytest
import world
from hypothesis import given
from hypothesis import strategies as st
from pilehost.virtual_board import VirtualClock, board_dict

import pilot
import wiring


# Plus levels from evse-facts section 1, written out by hand.
@pytest.mark.parametrize("mv, iec, gbt", [
    (12000, "A", "A"), (11400, "A", "A"), (11300, "X", "A"), (12700, "X", "A"), (12900, "X", "X"),
    (9000, "B", "B"), (8360, "B", "B"), (8000, "X", "B"), (9700, "X", "B"), (9900, "X", "X"),
    (6000, "C", "C"), (5480, "C", "C"), (5300, "X", "C"), (6600, "X", "C"),
    (3000, "D", "X"), (2620, "D", "X"),
    (0, "E", "E"), (1400, "E", "E"), (-1400, "E", "E"), (2000, "X", "X"),
    (-12000, "X", "X"), (10300, "X", "X"),
])
def test_classify_bands(mv, iec, gbt):
    assert pilot.classify(mv, pilot.IEC) == iec
    assert pilot.classify(mv, pilot.GBT) == gbt


def test_diode_check():
    assert pilot.diode_check(-12000, pilot.IEC) is True
    assert pilot.diode_check(-11400, pilot.IEC) is True
    assert pilot.diode_check(-11300, pilot.IEC) is False
    assert pilot.diode_check(-8790, pilot.IEC) is False  # no diode: -12 V * 2740 / 3740
    assert pilot.diode_check(-2360, pilot.IEC) is False  # no diode in D
    assert pilot.diode_check(-11300, pilot.GBT) is True
    assert pilot.diode_check(5990, pilot.IEC) is None  # no minus sample in the burst


def test_debounce_c_to_b_is_short_b_to_c_is_long():
    d = pilot.PilotDebouncer(pilot.B)
    assert not d.update(pilot.C, 1000)
    assert not d.update(pilot.C, 1099)
    assert d.update(pilot.C, 1100) and d.state == pilot.C
    assert not d.update(pilot.C, 1990)  # the last C reading: the 20 ms count from it (issue 10)
    assert not d.update(pilot.B, 2000)
    assert not d.update(pilot.B, 2009)
    assert d.update(pilot.B, 2010) and d.state == pilot.B


def test_debounce_restarts_on_interruption():
    d = pilot.PilotDebouncer(pilot.C)
    d.update(pilot.B, 0)
    # Two C readings more than before the window rule (test_pilot_mixed.py): on B, C, B, B alone
    # its 29 ms window, mostly B, would leave at 29; here the 20 ms rule is the one tested.
    d.update(pilot.C, 5)
    d.update(pilot.C, 8)
    d.update(pilot.C, 10)  # a reading back to C restarts the count, from that reading
    assert not d.update(pilot.B, 15)
    assert not d.update(pilot.B, 29)
    assert d.update(pilot.B, 30)


def test_debounce_across_tick_wrap():
    start = (1 << 30) - 10
    d = pilot.PilotDebouncer(pilot.C)
    d.update(pilot.B, start)
    assert not d.update(pilot.B, 5)  # 15 ms after, past the wrap
    assert d.update(pilot.B, 10)


# duty_u16 = floor(D * 65535), D from IEC 61851-1 Table A.8 worked by hand.
@pytest.mark.parametrize("ma, iec, gbt", [
    (5999, None, None),
    (6000, 6553, 6553),  # 10 %
    (16000, 17476, 17476),  # 26.67 %
    (32000, 34952, 34952),  # 53.33 %
    (51000, 55704, 55704),  # 85 %
    (52000, 55704, 55704),  # 51-52.5 A gap: clamped to 51 A
    (63000, 58457, 58457),  # 89.2 %
    (80000, 62913, 58457),  # 96 %; GB/T caps at 63 A
    (90000, 62913, 58457),
])
def test_duty_for_current(ma, iec, gbt):
    assert pilot.duty_for_current(ma, pilot.IEC) == iec
    assert pilot.duty_for_current(ma, pilot.GBT) == gbt


@given(st.integers(min_value=6000, max_value=80000))
def test_car_never_reads_more_than_offered(ma):
    # The simulated car's reading of the duty is its own implementation of Table A.8.
    read = world.offered_ma(pilot.duty_for_current(ma, pilot.IEC))
    assert read <= ma
    expected = 51000 if 51000 <= ma <= 52500 else ma
    assert read >= expected - 100


@pytest.mark.parametrize("ohms, iec, gbt", [
    (None, 0, 0), (1500, 13, 10), (680, 20, 16), (220, 32, 32), (100, 63, 63),
    (50, 0, 0), (350, 0, 0), (3000, 0, 0),
])
def test_cable_rating(ohms, iec, gbt):
    assert pilot.cable_rating_a(ohms, pilot.IEC) == iec
    assert pilot.cable_rating_a(ohms, pilot.GBT) == gbt


class FakeAdc:
    def __init__(self, uv):
        self.uv = uv

    def read_uv(self):
        return self.uv


def test_proximity_resistance():
    # 220 ohm to PE under 1 k pull-up to 3.3 V: 3.3 * 220 / 1220 = 0.595 V
    assert wiring.new_proximity(FakeAdc(595081), 1000, 3300000).ohms() in (219, 220)
    assert wiring.new_proximity(FakeAdc(3300000), 1000, 3300000).ohms() is None


class FakePwm:
    def __init__(self):
        self.duty = None

    def duty_u16(self, d):
        self.duty = d


def test_output_inverted_board():
    pwm = FakePwm()
    out = wiring.new_output(pwm, inverted=True)
    out.steady_plus()
    assert pwm.duty == 0
    out.state_f()
    assert pwm.duty == 65535
    out.offer(6553)
    assert pwm.duty == 65535 - 6553 and out.pwm_on


@pytest.mark.parametrize("car_state, duty", [
    ("B", 6553), ("C", 6553), ("D", 6553), ("C", 34952), ("C", 62913), ("B", 62913),
])
def test_sampler_reads_plus_and_minus_through_the_pwm(car_state, duty):
    """The burst finds the plus level even at 10 % duty (100 us of plus per period)."""
    board = board_dict()
    clock = VirtualClock(read_cost_us=18)  # two clock reads per sample: ~36 us, an ESP32 ADC read
    w = world.World(board, clock_us=clock.ticks_us, echo=False)
    w.car.plugged = True
    w.car.s2 = car_state in "CD"
    w.car.ventilation = car_state == "D"
    w.pwm_duty = duty
    cal = board["pilot_adc"]

    class Adc:
        def read_uv(self):
            return w.adc_uv(board["pins"]["pilot_adc"])

    sampler = wiring.new_sampler(Adc(), clock.ticks_us, cal["uv_at_minus_12v"], cal["uv_at_plus_12v"])
    seen = []
    for _ in range(20):
        sampler.sample()
        assert pilot.classify(sampler.plus_mv, pilot.IEC) == car_state
        seen.append(pilot.diode_check(sampler.minus_mv, pilot.IEC))
    assert False not in seen and True in seen
    w.car.diode = False
    seen = []
    for _ in range(20):
        sampler.sample()
        seen.append(pilot.diode_check(sampler.minus_mv, pilot.IEC))
    assert True not in seen and False in seen
