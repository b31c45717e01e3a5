"""S0 pulse meter: counting by polling, debounce, power from the interval, faults, energy delta,
against the simulated S0 output."""
import pytest

from wiring import make_meter
from meters import S0MeterSim
from pilehost.meter_rig import Clock, World

pytestmark = pytest.mark.usefixtures("no_sleeping")  # conftest.py


class SimPin:
    """The input pin, wired to a simulated S0 output. No irq(): the driver must poll."""

    def __init__(self, clock, sim):
        self.clock = clock
        self.sim = sim
        self.reads = 0

    def value(self):
        self.reads += 1
        return self.sim.level(int(self.clock.t * 1000))


class LevelPin:
    """A pin whose level the test sets by hand."""

    def __init__(self, level=1):
        self.level = level

    def value(self):
        return self.level


def make(imp=1000, pulse_ms=50, power_w=3600.0, energy_wh=5000.0, **options):
    clock = Clock()
    world = World(energy_wh=energy_wh, power_w=power_w)
    sim = S0MeterSim(world, imp_per_kwh=imp, pulse_ms=pulse_ms)
    pin = SimPin(clock, sim)
    m = make_meter("s0", pulse_pin=pin, imp_per_kwh=imp, **options)
    return clock, world, sim, pin, m


def session(clock, world, m, ms, step_ms=5, sim=None):
    """Advance time 1 ms at a time, the world's energy rising at world.power_w, poll() every
    step_ms. With `sim`, the S0 output is also updated every ms, so its pulses start between
    polls, as a real meter's do."""
    e0 = world.energy_wh
    t0 = clock.t
    while clock.t < t0 + ms:
        clock.t += 1
        world.energy_wh = e0 + world.power_w * (clock.t - t0) / 3600000.0  # exact at the end
        if sim is not None:
            sim.level(int(clock.t * 1000))
        if int(clock.t) % step_ms == 0:
            m.poll(clock.ticks)


def feed(m, clock, levels, step_ms=5):
    """Poll with a hand-made pin level sequence."""
    for level in levels:
        m._pin.level = level
        clock.t += step_ms
        m.poll(clock.ticks)


@pytest.mark.parametrize("imp, power_w, seconds, wh", [
    (1000, 7200.0, 60, 120),  # 2 pulses/s
    (800, 7200.0, 60, 120),  # 1.25 Wh per pulse: 96 pulses
    (2000, 7200.0, 60, 120),  # 4 pulses/s, 250 ms apart: 50 ms pulse + pause fit
])
def test_energy_delta_matches_sim_to_the_wh(imp, power_w, seconds, wh):
    clock, world, sim, pin, m = make(imp=imp, power_w=0.0)
    session(clock, world, m, 1000)
    first = m.reading.energy_wh
    start = world.energy_wh
    world.power_w = power_w
    session(clock, world, m, seconds * 1000, sim=sim)
    world.power_w = 0.0
    session(clock, world, m, 2000)  # pulses still owed are sent, then a reading
    assert round(world.energy_wh - start) == wh
    assert m.reading.energy_wh - first == wh
    assert m.pulses == sim.pulses_sent == wh * imp // 1000
    assert sum(m.errors.values()) == 0, m.errors


def test_power_from_pulse_interval():
    clock, world, sim, pin, m = make(imp=1000, power_w=3600.0)  # one pulse per second
    session(clock, world, m, 10000)
    # P = 3.6e6 / (1000 imp/kWh x 1 s) = 3600 W; the edges are seen to 5 ms
    assert m.reading.power_w == pytest.approx(3600.0, rel=0.011)
    world.power_w = 0.0
    session(clock, world, m, 4000)
    low = m.reading.power_w
    assert low < 3600.0 / 3  # falls as no pulse comes
    session(clock, world, m, 4000)
    assert m.reading.power_w < low


def test_power_forgotten_after_an_hour_without_pulses():
    clock, world, sim, pin, m = make(imp=1000, power_w=3600.0)
    session(clock, world, m, 5000)
    world.power_w = 0.0
    session(clock, world, m, 1000)
    assert m.reading.power_w > 0
    clock.t += 3600000  # an hour later (the pin is polled only now)
    session(clock, world, m, 1000)
    assert m.reading.power_w == 0.0


def test_power_zero_before_two_pulses_and_readings_publish_each_interval():
    clock, world, sim, pin, m = make(power_w=0.0)
    session(clock, world, m, 3000)
    assert m.reading.power_w == 0.0 and m.reading.energy_wh == 0
    assert m.reading.voltage_v is None and m.reading.current_a is None
    assert m.age_ms(clock.ticks) < 1000


def test_polls_the_pin_every_call():
    clock, world, sim, pin, m = make()
    session(clock, world, m, 1000)
    assert pin.reads == 200  # no irq(): SimPin has none
    assert not hasattr(pin, "irq")


@pytest.mark.parametrize("step_ms", [1, 5, 10])
@pytest.mark.parametrize("phase_ms", [0, 3, 7])
def test_30ms_pulses_all_counted_at_any_poll_phase(step_ms, phase_ms):
    # IEC 62053-31 minimum pulse: 30 ms; poll() comes every <= 10 ms.
    clock, world, sim, pin, m = make(imp=1000, pulse_ms=30, power_w=0.0)
    clock.t += phase_ms
    session(clock, world, m, 100, step_ms=step_ms)
    start = world.energy_wh
    world.power_w = 7200.0
    session(clock, world, m, 20000, step_ms=step_ms, sim=sim)
    world.power_w = 0.0
    session(clock, world, m, 1000, step_ms=step_ms, sim=sim)
    assert m.pulses == sim.pulses_sent == int(world.energy_wh) - int(start) == 40
    assert m.errors["glitch"] == 0


def test_short_spikes_are_not_pulses():
    clock = Clock()
    m = make_meter("s0", pulse_pin=LevelPin(1))
    feed(m, clock, [1] * 10)  # idle: armed
    feed(m, clock, [0, 0, 0, 1, 1, 1])  # 10-15 ms low: noise
    assert m.pulses == 0 and m.errors["glitch"] == 1
    assert "shorter than 20 ms" in m.last_error
    feed(m, clock, [0] * 6 + [1] * 4)  # 25+ ms low: a pulse
    assert m.pulses == 1 and m.errors["glitch"] == 1


def test_bounce_inside_a_pulse_counts_once():
    clock = Clock()
    m = make_meter("s0", pulse_pin=LevelPin(1))
    feed(m, clock, [1] * 4)
    feed(m, clock, [0] * 6 + [1] + [0] * 6 + [1] * 4)  # one 5 ms bounce inside a 65 ms pulse
    assert m.pulses == 1


def test_pulse_in_progress_at_start_is_not_counted():
    clock = Clock()
    m = make_meter("s0", pulse_pin=LevelPin(0))
    feed(m, clock, [0] * 8 + [1] * 4)
    assert m.pulses == 0
    feed(m, clock, [0] * 8 + [1] * 4)
    assert m.pulses == 1


def test_active_high_option():
    clock = Clock()
    m = make_meter("s0", pulse_pin=LevelPin(0), active_low=False)
    feed(m, clock, [0] * 4 + [1] * 8 + [0] * 4)
    assert m.pulses == 1


def test_fault_garbage_spikes_rejected():
    clock, world, sim, pin, m = make(imp=1000, power_w=3600.0)
    sim.fault = "garbage"
    start = world.energy_wh
    session(clock, world, m, 30000)
    world.power_w = 0.0
    session(clock, world, m, 1000)
    assert m.pulses == int(world.energy_wh) - int(start) == 30
    assert m.errors["glitch"] > 100


def test_fault_stuck_reported_once_per_episode():
    clock, world, sim, pin, m = make()
    session(clock, world, m, 3000)
    counted = m.pulses
    sim.fault = "stuck"
    session(clock, world, m, 5000)
    assert m.errors["stuck"] == 1
    assert m.last_error.startswith("s0: output stuck active for")
    assert m.age_ms(clock.ticks) >= 4000  # no readings while nothing can be counted
    assert m.pulses <= counted + 1
    sim.fault = None
    session(clock, world, m, 3000)
    assert m.pulses > counted + 1
    assert m.last_error is None and m.age_ms(clock.ticks) < 1000


def test_fault_silent_counts_nothing():
    clock, world, sim, pin, m = make(power_w=3600.0)
    session(clock, world, m, 2000)
    before = m.pulses
    sim.fault = "silent"
    session(clock, world, m, 10000)
    assert m.pulses - before <= 1  # a pulse under way may count; the rest are lost
    assert m.reading.energy_wh == m.energy_wh()
    assert m.reading.power_w < 400
