"""The simulator beside the firmware in one heap (`make bench WHAT=heap32`, pilehost/chipheap.py):
the need is measured net of the simulator's live heap at the start, so the simulator must not
allocate where a chip allocates nothing (a pilot read, a pin, the watchdog), and a run at the
heap's boundary must end, by the scenario's end or by a failure, never idle on (sim/world.py,
pilehost/unix_port.py)."""
import os
import subprocess

import pytest
import world
from pilehost import ROOT, unix_port
from pilehost.virtual_board import VirtualClock, board_dict

# Each of the firmware's hardware calls, on the simulator frozen into the stock image as the heap
# bench runs it, with the world's clock standing still (its energy integration, every 10 ms of
# world time, allocates its floats: garbage, not a call's). Bytes allocated over 200 calls each.
_PROBE = """
import gc, json, machine, world
with open(%r) as f:
    board = json.load(f)
w = world.World(board, [(10000, "end")], clock_us=lambda: 0, echo=False)
world.WORLD = w
w.fit_meter({"type": "ddsu666"})
cp = machine.ADC(machine.Pin(w.pin_pilot_adc))
pp = machine.ADC(machine.Pin(w.pin_pp_adc))
coil = machine.Pin(w.pin_coil, machine.Pin.OUT, value=0)
rcd = machine.Pin(w.pin_rcd_fault, machine.Pin.IN)
uart = machine.UART(w.meter_uart, 9600)
wdt = machine.WDT(timeout=5000)
pwm = machine.PWM(machine.Pin(w.pin_pilot_pwm), freq=1000, duty_u16=65535)

def probe(name):
    calls = (cp.read_uv, pp.read_uv, rcd.value, wdt.feed, uart.any, uart.read, machine.idle)
    for call in calls:
        call()
    coil.value(0)
    gc.collect()
    before = gc.mem_alloc()
    for _ in range(200):
        cp.read_uv()
        pp.read_uv()
        rcd.value()
        coil.value(0)
        wdt.feed()
        uart.any()
        uart.read()
        machine.idle()
    print("PROBE", name, gc.mem_alloc() - before)

probe("unplugged")
w.do("plug")
probe("plugged, +12 V")
pwm.duty_u16(32768)
w.do("request")
probe("charging, PWM")
w.do("short_cp", True)
probe("CP shorted")
"""


def test_the_firmware_s_hardware_calls_allocate_nothing_in_the_simulator(stock_image, tmp_path):
    """A pilot read allocated ~230 B on the 32-bit port (an LCG's long ints, the long-int
    constants mpy-tool.py freezes a constant tuple's ints beyond +-8191 into) and kept a long
    int: ~560 KiB of the simulator's garbage in a 7 s session between the firmware's objects,
    where the chip's ADC read allocates nothing."""
    program, path = stock_image
    script = tmp_path / "probe.py"
    script.write_text(_PROBE % os.path.join(ROOT, "boards", "ref-esp32.json"))
    r = subprocess.run([program, "-X", "heapsize=400k", str(script)], env=dict(os.environ, MICROPYPATH=path),
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    figures = {}
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            name, _, n = line[len("PROBE "):].rpartition(" ")
            figures[name] = int(n)
    print(figures)
    assert figures == {"unplugged": 0, "plugged, +12 V": 0, "charging, PWM": 0, "CP shorted": 0}


def _world(steps, wdt_ms=None):
    clock = VirtualClock(read_cost_us=0)
    w = world.World(board_dict(), steps, clock_us=clock.ticks_us, echo=False)
    if wdt_ms is not None:
        w.wdt_start(wdt_ms)
    return w, clock


def test_the_end_reaches_the_rom_when_the_watchdog_bites_in_the_firmware_s_finally():
    """The hang of a need.py run at 105 KiB (issue 12): the firmware in fail_safe() (no feeding),
    the scenario's end and the watchdog's deadline in one 100 ms poll. The end's SimEnd left
    fail_safe(), main.run()'s `finally: ctl.safe_off()` touched a pin, the watchdog bit there and
    its SimReset replaced the SimEnd: the ROM booted again, the end step spent. Every boot that
    failed again reset again (20 boots, 46 s); one that came up would have idled for ever."""
    w, clock = _world([(1000, "end")], wdt_ms=500)
    w.pin_write(w.pin_coil, 1 if w.coil_on_level else 0)
    assert w.coil
    clock.t += 1200000  # the end is due, the watchdog is overdue
    with pytest.raises(world.SimEnd):
        w.advance()
    # the firmware's finally as the SimEnd passes: its outputs still reach the world, no bite
    w.pin_write(w.pin_coil, 0 if w.coil_on_level else 1)
    w.pwm_set(w.pin_pilot_pwm, duty=0)
    assert not w.coil and w.pwm_duty == 0
    clock.t += world.END_GRACE_US + 1
    with pytest.raises(world.SimEnd):  # and a firmware still running after it is ended again
        w.advance()


def test_the_end_step_failing_for_lack_of_heap_still_ends_the_run(monkeypatch):
    """A MemoryError inside the end step (its log line, the exception itself), or one that
    replaces its SimEnd in a `finally` on the way out: the firmware takes it for its own and the
    step is spent. A touch END_GRACE_US later ends the run all the same; no step after it runs."""
    w, clock = _world([(1000, "end"), (1050, "plug")], wdt_ms=500)

    def full_heap(kind, text):
        raise MemoryError("memory allocation failed")

    monkeypatch.setattr(w, "log", full_heap)
    clock.t += 1000000
    with pytest.raises(MemoryError):
        w.advance()
    clock.t += world.END_GRACE_US // 2
    w.pin_read(w.pin_rcd_fault)  # the firmware's fail_safe(): no step, no watchdog now
    assert not w.car.plugged
    clock.t += world.END_GRACE_US
    with pytest.raises(world.SimEnd):
        w.pin_read(w.pin_rcd_fault)
    assert not w.car.plugged


def test_a_log_line_the_heap_has_no_room_for_is_not_the_firmware_s_memory_error(monkeypatch, capsys):
    w, _ = _world([])
    w.echo = True
    printed = []

    def print_on_a_full_heap(text):
        if text != world.LOG_LOST:
            raise MemoryError("memory allocation failed")
        printed.append(text)

    monkeypatch.setattr(world, "print", print_on_a_full_heap, raising=False)
    w.wdt_start(500)
    w.log("car", "pilot state B")  # no exception out of the simulator's own line
    assert printed == [world.LOG_LOST]


def test_the_watchdog_bites_whatever_the_heap(monkeypatch):
    w, clock = _world([], wdt_ms=500)
    spare = w._spare_bite

    class NoRoom(world.SimReset):
        def __init__(self, *args):
            raise MemoryError("memory allocation failed")

    monkeypatch.setattr(world, "SimReset", NoRoom)
    clock.t += 600000
    with pytest.raises(BaseException) as caught:
        w.advance()
    assert caught.value is spare and caught.value.args == (3,)
    assert w.wdt_timeout_us is None


def test_a_run_that_does_not_end_is_killed_and_said_so():
    """run_scenario's timeout bounds the whole run, its output read to the end included: it
    waited on that output for ever when the ROM never ended (a need.py run hung >16 min)."""
    with pytest.raises(unix_port.ScenarioTimeout) as caught:
        unix_port.run_scenario("normal", timeout=1)  # the scenario runs 7 s
    assert "no end after 1 s" in str(caught.value)


def test_the_default_timeout_leaves_every_scenario_its_length_and_more():
    for name, spec in unix_port.scenarios.SCENARIOS.items():
        end_s = max(step[0] for step in spec["steps"]) / 1000
        assert unix_port.default_timeout(name) >= end_s + 60, name
