"""The firmware on the real MicroPython unix port (pilehost/unix_port.py DEFAULT_HEAP) against the
simulated hardware: each scenario asserts what the contactor and the pilot did."""
import json
import os

import jsonschema
import pytest

from pilehost import ROOT, unix_port

# IEC 61851-1 Table A.6 seq. 8.1: C->B must open the contactor within 100 ms.
C_TO_B_LIMIT_MS = 100

try:
    unix_port.micropython_binary()
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    pytest.skip("MicroPython unix port not installed (make venv)", allow_module_level=True)

# Billing and the records on both binaries, the venv's and the one shaped like the ESP32 (float32
# registers and PWM, ints past 2^30); the control logic and the safety reactions, which the word
# size cannot change, on the venv's in `make test` and on both in `make test-long` (conftest.py).
BOTH = pytest.mark.usefixtures("unix_binary")
LOGIC = pytest.mark.usefixtures("unix_binary_long")

_runs = {}


def run(name, meter=None):
    key = (name, meter, unix_port.micropython_binary())
    if key not in _runs:
        r = unix_port.run_scenario(name, config={"meter": {"type": meter}} if meter else None)
        assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-30:])
        _runs[key] = r
    return _runs[key]


def coil(r):
    """[(ms, True/False)] of the contactor coil as the simulated hardware saw it."""
    return [(t, text == "coil ON") for t, text in r.sim_events("contactor") if text.startswith("coil")]


def step_time(r, action):
    return [t for t, text in r.sim_events("step") if text.split()[0] == action][0]


def pilot_out(r):
    return [text for _, text in r.sim_events("pilot")]


def assert_no_traceback(r):
    assert not any("Traceback" in line for line in r.lines), "\n".join(r.lines)


@BOTH
def test_normal_session():
    r = run("normal")
    assert_no_traceback(r)
    switching = coil(r)
    assert [on for _, on in switching if on] == [True]
    closed_at = [t for t, on in switching if on][0]
    assert step_time(r, "request") < closed_at < step_time(r, "request") + 300
    assert r.result["latencies_ms"] and max(r.result["latencies_ms"]) < C_TO_B_LIMIT_MS
    assert any(text.startswith("PWM 53.3%") for text in pilot_out(r))  # 32 A offered
    assert r.firmware_events("charger")[-1][1].endswith("-> idle")
    assert r.firmware_events("fault") == []
    # closed ~1.1 s to ~3.0 s at 230 V and the 31.99 A the car reads from 53.3 %: ~3.9 Wh
    opened_at = [t for t, on in switching if not on and t > closed_at][0]
    expected_wh = 230 * 31.99 * (opened_at - closed_at) / 3600000
    assert abs(r.result["energy_wh"] - expected_wh) < 0.1


@LOGIC
def test_c_to_b_mid_charge_opens_within_100_ms_every_time():
    r = run("c_to_b_mid_charge")
    assert len(r.result["latencies_ms"]) == 2 + 1  # two pauses and the final unplug
    assert max(r.result["latencies_ms"]) < C_TO_B_LIMIT_MS
    assert len([on for _, on in coil(r) if on]) == 3


@LOGIC
def test_unplug_under_load():
    r = run("unplug_under_load")
    assert max(r.result["latencies_ms"]) < C_TO_B_LIMIT_MS
    assert not coil(r)[-1][1]
    assert ("stopped: ev_disconnected" in text for _, text in r.firmware_events("session"))


@LOGIC
def test_diode_missing_never_closes():
    r = run("diode_missing")
    assert not any(on for _, on in coil(r))
    faults = [text for _, text in r.firmware_events("fault")]
    assert faults == ["raised diode", "cleared diode"]  # cleared when the car leaves


@LOGIC
def test_cp_short_opens_and_recovers():
    r = run("cp_short")
    short = step_time(r, "short_cp")
    opened = [t for t, on in coil(r) if not on and t >= short][0]
    assert opened - short < C_TO_B_LIMIT_MS
    faults = [text for _, text in r.firmware_events("fault")]
    assert faults == ["raised pilot_short", "cleared pilot_short"]
    assert coil(r)[-2][1]  # closed again once the short was gone (last event: the end)


@LOGIC
def test_welded_contactor_latches_f():
    r = run("welded")
    weld = step_time(r, "weld")
    assert not any(on for t, on in coil(r) if t > weld)
    assert [text for _, text in r.firmware_events("fault")] == ["raised welded"]
    before_end = [text for t, text in r.sim_events("pilot") if t < step_time(r, "unplug") + 500]
    assert before_end[-1] == "-12 V steady (F)"
    assert r.firmware_events("charger")[-1][1].endswith("-> fault")


@LOGIC
def test_contactor_fails_to_close():
    r = run("contactor_fails_to_close")
    switching = coil(r)
    assert [on for _, on in switching][:3] == [False, True, False]
    assert 950 <= switching[2][0] - switching[1][0] <= 1200  # 1 s of disagreement
    assert [text for _, text in r.firmware_events("fault")] == ["raised contactor_failed_to_close"]


@LOGIC
def test_rcd_trip_opens_at_once_and_retries():
    r = run("rcd_trip")
    leak = [t for t, text in r.sim_events("step") if text == "rcd_leak True"][0]
    opened = [t for t, on in coil(r) if not on and t >= leak][0]
    # FAULT read for relay._FAULT_DEBOUNCE_MS (50 ms, issue 10 item 4; was: two reads) plus a tick.
    # The debounce counts from the stamp of the tick whose read first saw FAULT, taken before the
    # read; the sim logs the leak at that read: under load the two are a few ms apart on the
    # host (opened 48 ms after the logged leak once in a CI dry run). The lower bound is not the
    # safety one (sooner is safer): it shows a debounce, not a one-read trip.
    assert 45 <= opened - leak < 70
    assert [text for _, text in r.firmware_events("fault")] == ["raised rcd_trip", "cleared rcd_trip"]
    reclosed = [t for t, on in coil(r) if on and t > opened]
    assert reclosed and reclosed[0] - leak >= 1000  # rcd_retry_s = 1 in this scenario


@LOGIC
def test_rcd_self_test_failure_blocks_charging():
    r = run("rcd_self_test_fails")
    assert not any(on for _, on in coil(r))
    assert [text for _, text in r.firmware_events("fault")] == ["raised rcd_self_test"]


@LOGIC
def test_exception_in_the_loop_fails_safe_and_reboots():
    r = run("loop_exception")
    injected = step_time(r, "inject_error")
    wdt = [t for t, text in r.sim_events("wdt")][0]
    switching = coil(r)
    opened = [t for t, on in switching if not on and t >= injected][0]
    assert opened - injected <= 10
    assert not any(on for t, on in switching if injected <= t < wdt)  # stays open until the reset
    assert [text for t, text in r.sim_events("pilot") if injected <= t < wdt][0] == "-12 V steady (F)"
    assert any("RuntimeError: injected fault" in line for line in r.lines)
    assert r.result["boots"] == 2
    assert 1000 <= wdt - injected <= 2600  # the watchdog (2 s) fired, not a lucky exit


@LOGIC
def test_ventilation_refused():
    r = run("ventilation_refused")
    assert not any(on for _, on in coil(r))


@LOGIC
def test_broken_config_is_a_clear_error_and_pilot_f():
    r = run("broken_config")
    assert not any(on for _, on in coil(r))
    errors = [text for _, text in r.firmware_events("config")]
    assert errors and "'max_current_a'" in errors[0]
    assert pilot_out(r)[-1] == "-12 V steady (F)"


# -- meters (the default scenarios run with a DDSU666 on RS-485) ---------------------------------

def session_energy(r):
    """Energy (Wh) of the firmware's session-ended lines: 'ended: reason, N Wh, ...'."""
    return [int(text.split(", ")[1].split()[0]) for _, text in r.firmware_events("session")
            if text.startswith("ended:")]


# What each meter's register can show of the energy delivered: the simulated meters count from
# 0 here, so the session's delta is the register's value at the end.
REGISTER_WH = {
    "ddsu666": lambda wh: wh,  # float32 kWh: exact to the Wh at these values
    "sdm120": lambda wh: wh,
    "sdm630": lambda wh: wh,
    "dlt645": lambda wh: wh // 10 * 10,  # XXXXXX.XX kWh: 10 Wh steps
    "s0": lambda wh: wh // 1,  # 1000 imp/kWh: one pulse per Wh
}


@BOTH
@pytest.mark.parametrize("meter", sorted(REGISTER_WH))
def test_session_energy_equals_the_meters_delta(meter):
    r = run("long_session", meter)
    assert_no_traceback(r)
    delivered = r.result["energy_wh"]
    assert delivered > 11  # six seconds at 7.36 kW
    assert session_energy(r) == [int(REGISTER_WH[meter](delivered))] or \
        abs(session_energy(r)[0] - delivered) < 1 and meter not in ("dlt645", "s0")
    assert [t for t, _ in r.firmware_events("meter")] == []  # a healthy bus gives no errors


@BOTH
def test_silent_meter_stops_the_session():
    r = run("meter_silent")
    stops = [text for _, text in r.firmware_events("session") if text.startswith("stopped")]
    assert stops == ["stopped: meter_failure"]
    silent = [t for t, text in r.sim_events("step") if text.startswith("meter_fault")][0]
    opened = [t for t, on in coil(r) if not on and t > silent][0]
    # failure_timeout_s = 2 from the last good reading (at most one 1 s poll before the
    # silence), then C2->C1: the car drops to B 0.5 s after the PWM goes
    assert 1000 <= opened - silent <= 3200
    ended = [text for _, text in r.firmware_events("session") if text.startswith("ended")]
    assert len(ended) == 1 and ended[0].endswith("(last good reading before the stop)")
    assert ended[0].startswith("ended: meter_failure, ")
    assert session_energy(r)[0] < r.result["energy_wh"]  # what came after the silence is unknown


@BOTH
def test_a_meter_silent_at_the_start_holds_the_contactor_open_until_it_answers():
    r = run("meter_silent_at_start")
    back = [t for t, text in r.sim_events("step") if text == "meter_fault"][0]
    closed = [t for t, on in coil(r) if on]
    assert closed and closed[0] > back  # not while the start value was unknown
    states = [text for _, text in r.firmware_events("charger")]
    # No PWM until the pile may close (docs/safety.md "Not ready"): the car waits in B, then
    # gets the offer and asks (before: PWM at once, the car in C waiting for the meter).
    assert states[:3] == ["idle -> suspended_evse", "suspended_evse -> suspended_ev",
                          "suspended_ev -> charging"]
    assert not [text for _, text in r.firmware_events("session") if "meter_failure" in text]
    assert abs(session_energy(r)[0] - r.result["energy_wh"]) < 1  # billed from the first Wh


@LOGIC
def test_a_meter_dead_at_the_start_never_lets_power_flow():
    r = run("meter_dead_at_start")
    assert not [t for t, on in coil(r) if on] and r.result["energy_wh"] == 0  # never closed
    stops = [text for _, text in r.firmware_events("session") if text.startswith("stopped")]
    assert stops == ["stopped: meter_failure"]


@BOTH
def test_a_misbehaving_bus_is_refused_counted_and_billed_right():
    r = run("meter_misbehaves")
    errors = " | ".join(text for _, text in r.firmware_events("meter"))
    for expected in ("crc", "reply from address 2", "reply function", "went backwards", "jumped"):
        assert expected in errors
    assert abs(session_energy(r)[0] - r.result["energy_wh"]) < 1
    assert not [text for _, text in r.firmware_events("session") if "meter_failure" in text]


# -- session records in the flash outbox, and power cuts ------------------------------------------

def outbox(flash):
    """(kind, record) of every record in a board's flash outbox, read with the firmware's Journal."""
    import journal
    import journal_scan

    return [(journal.kind_name(kind), json.loads(payload))
            for _seq, kind, payload in
            journal_scan.load(os.path.join(flash, "outbox.jrnl")).pending()]


def validate(kind, record):
    with open(os.path.join(ROOT, "docs", "schemas", kind + ".v1.schema.json")) as f:
        jsonschema.validate(record, json.load(f))


@BOTH
def test_a_session_lands_in_the_outbox_once(tmp_path):
    r = unix_port.run_scenario("normal", flash_dir=str(tmp_path))
    assert r.returncode == 0 and r.result is not None
    recs = outbox(str(tmp_path))
    assert [k for k, _ in recs] == ["session_start", "session_end"]
    validate("session_started", recs[0][1])
    validate("session_ended", recs[1][1])
    ended = recs[1][1]
    assert ended["session_id"] == "sim-pile-1-1-1" and ended["stop_reason"] == "ev_disconnected"
    assert ended["energy_wh"] == session_energy(r)[0]


@BOTH
def test_power_cut_mid_session_is_closed_as_power_loss_once(tmp_path):
    flash = str(tmp_path)
    cut = unix_port.run_scenario("charging_until_cut", flash_dir=flash, kill_after_s=3.0)
    assert cut.result is None  # no orderly end: the power went
    assert any("contactor: closed" in line for line in cut.lines)
    before = outbox(flash)
    assert [k for k, _ in before] == ["session_start"]
    assert os.path.exists(os.path.join(flash, "session.json"))  # the snapshot of the open session

    r = unix_port.run_scenario("car_still_there", flash_dir=flash)
    assert r.returncode == 0 and r.result is not None
    recs = outbox(flash)
    ended = [rec for k, rec in recs if k == "session_end"]
    assert len(ended) == 1
    validate("session_ended", ended[0])
    assert ended[0]["session_id"] == "sim-pile-1-1-1" and ended[0]["stop_reason"] == "power_loss"
    started = [rec["session_id"] for k, rec in recs if k == "session_start"]
    assert started == ["sim-pile-1-1-1", "sim-pile-1-2-1"]  # the boot counter went up

    again = unix_port.run_scenario("car_still_there", flash_dir=flash, kill_after_s=1.5)
    assert again.result is None
    ended = [rec["session_id"] for k, rec in outbox(flash) if k == "session_end"]
    assert ended.count("sim-pile-1-1-1") == 1  # reported once, however often it boots
