"""Meter common part: Reading, plausibility guard, factory; the unix-port self-test. The meter
tests' fakes (fake clock, RS-485 bus with a sim meter on the far end) are pilehost/meter_rig.py."""
import os
import subprocess

import pytest

import meter
import meter_setup
from meter import MeterError, Reading, check_plausible
from wiring import make_meter

from pilehost import ROOT, unix_port
from pilehost.meter_rig import TICKS_PERIOD, Bus, Clock, Pin

pytestmark = pytest.mark.usefixtures("no_sleeping")  # conftest.py


# ----------------------------------------------------------------------------- Reading

def test_age_uses_ticks_diff_across_wrap():
    m = meter_setup.base(meter.MeterBase())  # the guard alone, as each driver has it
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
    m = meter_setup.base(meter.MeterBase())  # the guard alone, as each driver has it
    assert m._publish(_r(1000, 0))
    assert not m._publish(_r(900, 1000))
    assert m.reading.energy_wh == 1000
    assert m.errors["backwards"] == 1
    assert "1000 -> 900" in m.last_error
    assert m._publish(_r(1001, 2000))
    assert m.last_error is None
    assert m.age_ms(2500) == 500


# ----------------------------------------------------------------------------- factory

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
    s0 = make_meter("s0", pulse_pin=Pin(1), imp_per_kwh=800)
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

def _binary(find):
    try:
        return find()
    except FileNotFoundError:
        return None


def test_selftest_on_micropython_unix_port():
    exe = _binary(unix_port.micropython_binary)
    if exe is None:
        pytest.skip("micropython unix port not found")
    env = dict(os.environ, MICROPYPATH=unix_port.micropypath())  # bytecode, as a board imports
    # 96k: the 64-bit port's pointers are twice the ESP32's; the sim grew S0 edges (issue 10)
    proc = subprocess.run([exe, "-X", "heapsize=96k", "host_tests/upy_meter_selftest.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "upy meter selftest ok" in proc.stdout


@pytest.mark.parametrize("name", ["meter.py", "modbus_meter.py", "dlt645.py", "s0_meter.py"])
def test_firmware_compiles_for_esp32(tmp_path, name):
    exe = _binary(unix_port.mpy_cross_binary)
    if exe is None:
        pytest.skip("mpy-cross not found")
    out = tmp_path / (name[:-3] + ".mpy")
    proc = subprocess.run([exe, "-march=xtensawin", "-o", str(out),
                           os.path.join(ROOT, "firmware", name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
