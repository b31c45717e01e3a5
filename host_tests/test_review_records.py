"""Review of the session records: the largest record every input rule allows fits the outbox
(1); a record the outbox refuses never raises out of the records step nor loops at boot (1);
a frame of zeros is not a meter restart (2); the stateful pile's meters start at a realistic
register (3). Each test failed on the firmware before its fix."""
import json
import os
import tempfile
import types

import jsonschema
import pytest
from pilehost.virtual_board import ROOT, VirtualBoard

import charger as ch
import config
import meter
import files
import journal
import journal_scan
import session_restore
import session_store
import wiring
from meters import Dlt645MeterSim, ModbusMeterSim
from pilehost import meter_rig
from session_record import Record

SCHEMAS = os.path.join(ROOT, "docs", "schemas")
T_2026 = 1795000000
# The longest value of each input, by its rule (config.py, command_auth.valid_auth_id, the schemas).
LONG_PILE = "P" * 64  # pile_id: 1..64 of [A-Za-z0-9._-]
QUOTES = '"\\' * 32  # auth_id: 1..64 of '!'..'~'; '"' and '\' double when JSON-escaped
MAX_BOOT = MAX_SEQ = 9999999999  # session_id: <pile_id>-<1..10 digits>-<1..10 digits>
MAX_REGISTER = 999999999999  # meter_*_wh
MAX_I32 = 2147483647  # energy_wh, duration_s, peak_power_w, meter_restarts
LONGEST_METER = "dlt645:999999999999"  # longer than any modbus:<model>@<1..247>


def validate(kind, record):
    with open(os.path.join(SCHEMAS, kind + ".v1.schema.json")) as f:
        jsonschema.validate(record, json.load(f))


def longest_stop_reason():
    with open(os.path.join(SCHEMAS, "session_ended.v1.schema.json")) as f:
        return max(json.load(f)["properties"]["stop_reason"]["enum"], key=len)


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def firmware_log(monkeypatch, tmp_path, pile_id=LONG_PILE, wall=T_2026):
    """The SessionLog as the firmware builds it (wiring.build_session_log), its outbox included."""
    monkeypatch.chdir(tmp_path)
    conf = config.parse_config({"pile_id": pile_id, "free_vend": True})
    log = wiring.build_session_log(conf)
    log._wall = Clock(wall)
    return log


def outbox_records(kind):
    return [json.loads(p) for _, k, p in journal_scan.load(files.OUTBOX_FILE).pending() if k == kind]


def worst_session(auth_id=QUOTES):
    s = Record(ch.Session(0))
    s.auth_source, s.auth_id, s.authorized_ms = "remote", auth_id, 0
    return s


# -- 1a: the worst case fits the outbox the firmware builds -------------------------------------------

def test_1_the_largest_started_and_ended_records_fit_the_firmware_outbox(monkeypatch, tmp_path):
    log = firmware_log(monkeypatch, tmp_path)
    log.boot, log._seq = MAX_BOOT, MAX_SEQ - 1
    s = worst_session()
    s.note_meter(types.SimpleNamespace(energy_wh=MAX_REGISTER, power_w=MAX_I32))
    log.poll(10, s, None)
    assert s.id == "%s-%d-%d" % (LONG_PILE, MAX_BOOT, MAX_SEQ)
    # Every field at its widest: the numbers at the schema's maxima, the longest reason and name.
    s._carried_wh, s.meter_restarts = MAX_I32, MAX_I32
    s.stop_reason, s.meter_final = longest_stop_reason(), False
    s.meter_identity = LONGEST_METER
    log.ended(1000, s)
    (started,) = outbox_records(journal.KIND_SESSION_START)
    (ended,) = outbox_records(journal.KIND_SESSION_END)
    validate("session_started", started)
    assert ended["meter"] == LONGEST_METER and ended["auth_id"] == QUOTES  # nothing dropped
    # The widest duration and times too (ended() takes them from the clocks): built by the same code.
    widest = log._ended_record(
        ended["session_id"], "remote", QUOTES, 253402300799, 253402300799, False, MAX_REGISTER,
        MAX_REGISTER, MAX_I32, MAX_I32, MAX_I32, longest_stop_reason(), MAX_I32, True,
        ("stop_time", "duration_s", "peak_power_w"), LONGEST_METER)
    validate("session_ended", widest)
    size = len(json.dumps(widest).encode())
    print("largest session/ended: %d bytes, outbox max_payload %d" % (size, log.outbox.max_payload))
    assert size <= log.outbox.max_payload


def test_1_the_largest_power_loss_record_fits_the_firmware_outbox(monkeypatch, tmp_path):
    log = firmware_log(monkeypatch, tmp_path)
    log.boot, log._seq = MAX_BOOT, MAX_SEQ - 1
    s = worst_session()
    s.note_meter(types.SimpleNamespace(energy_wh=0, power_w=0))
    log.poll(10, s, None)
    # The snapshot a long session would leave, at its widest (meter restarts included).
    log.store.save({"id": s.id, "t0": T_2026, "as": "remote", "ai": QUOTES, "d": MAX_I32 - 100,
                    "m0": 0, "m1": MAX_REGISTER - 10 ** 6, "pk": 1, "mr": MAX_I32, "mc": MAX_I32 - 10 ** 7,
                    "ms": MAX_REGISTER - 2 * 10 ** 6})
    again = firmware_log(monkeypatch, tmp_path)  # the next boot, on the same flash
    reading = types.SimpleNamespace(energy_wh=MAX_REGISTER - 10 ** 6 + 500, power_w=7000, epoch=0)
    again.poll(0, None, reading)
    (ended,) = outbox_records(journal.KIND_SESSION_END)
    validate("session_ended", ended)
    assert ended["stop_reason"] == "power_loss" and ended["auth_id"] == QUOTES
    assert len(ended["estimated"]) == 3
    print("largest power_loss record: %d bytes" % len(json.dumps(ended)))
    assert session_store.SessionStore(files.SESSION_FILE).load() is None


# -- 1b: a record the outbox refuses as too long ------------------------------------------------------

def small_outbox_log(path, boot=7, max_payload=256):
    reports = []
    log = session_restore.load(
        LONG_PILE, boot,
        journal_scan.load(str(path / "outbox"), max_bytes=8192, max_payload=max_payload),
        session_store.SessionStore(str(path / "session.json")), checkpoint_s=60, wall=Clock(T_2026),
        report=lambda now, what, text: reports.append((what, text)))  # as wiring.build_session_log
    return log, reports


def test_1_a_record_too_long_for_the_outbox_is_logged_whole_and_counted_never_raised(tmp_path):
    log, reports = small_outbox_log(tmp_path)
    s = worst_session()
    s.note_meter(types.SimpleNamespace(energy_wh=1000, power_w=0))
    log.poll(10, s, None)  # the started record is too long as well
    s.note_meter(types.SimpleNamespace(energy_wh=1500, power_w=7000))
    s.stop_reason, s.meter_final = "ev_disconnected", True
    log.ended(5000, s)
    lost = [text for what, text in reports if text.startswith("LOST")]
    assert len(lost) == 2 and log.too_long == 2
    assert json.loads(lost[1].split(": ", 1)[1])["energy_wh"] == 500  # the whole record
    assert log.failed is None  # nothing held for a retry: it would be refused again
    assert session_store.SessionStore(str(tmp_path / "session.json")).load() is None


def test_1_a_power_loss_record_too_long_for_the_outbox_does_not_loop_at_boot(tmp_path):
    log, _ = small_outbox_log(tmp_path)
    s = worst_session()
    s.note_meter(types.SimpleNamespace(energy_wh=1000, power_w=0))
    log.poll(10, s, None)
    assert session_store.SessionStore(str(tmp_path / "session.json")).load() is not None
    for boot in (8, 9):  # a boot loop would raise at each
        again, reports = small_outbox_log(tmp_path, boot)
        reading = types.SimpleNamespace(energy_wh=1200, power_w=0, epoch=0)
        again.poll(0, None, reading)
        lost = [text for what, text in reports if text.startswith("LOST")]
        assert len(lost) == (1 if boot == 8 else 0)
    assert session_store.SessionStore(str(tmp_path / "session.json")).load() is None


def test_1_long_ids_full_of_quotes_and_a_power_cut_on_the_virtual_board(monkeypatch):
    conf = {"pile_id": LONG_PILE, "free_vend": False, "meter": {"type": "ddsu666"}}
    vb = VirtualBoard(monkeypatch, [(100, "plug"), (600, "request")], config=conf)
    vb.run_until(300)
    assert vb.ctl.charger.authorize(vb.now_ms, "remote", QUOTES)
    vb.run_until(20000)
    assert vb.world.coil, "charging"
    (started,) = outbox_records(journal.KIND_SESSION_START)
    assert started["auth_id"] == QUOTES
    flash = os.getcwd()
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)  # the same board again
    again = VirtualBoard(monkeypatch, [], config=conf)  # power back, no car
    again.run_until(15000)  # raises if the records step does
    (ended,) = outbox_records(journal.KIND_SESSION_END)
    validate("session_ended", ended)
    assert ended["stop_reason"] == "power_loss" and ended["auth_id"] == QUOTES
    assert ended["session_id"] == started["session_id"] and ended["pile_id"] == LONG_PILE
    assert not [t for w, t in again.reports if "LOST" in t]


def test_1_the_link_has_room_for_the_largest_outbox_record_when_it_builds_a_publish():
    """mqtt_link publishes only with _ROOM bytes free in the out-buffer: the largest record the
    outbox takes, on the longest topic, must fit there, or the write fails (ENOBUFS) each time."""
    import link_setup
    import mqtt_conn
    import mqtt_link
    import telemetry

    class Owner:
        def conn_report(self, now_ms, text):
            pass

    conn = mqtt_conn.MqttConn(Owner(), LONG_PILE.encode(), 60)
    pipe = conn._pipe
    pipe.tail = len(pipe.buf) - mqtt_link._ROOM  # as full as the link still publishes into
    topics = link_setup.setup_topics(telemetry.Topics(), LONG_PILE)  # as the link makes them
    longest = max(topics.outbox.values(), key=len)
    conn.publish(longest, b"x" * journal.DEFAULT_MAX_PAYLOAD)
    assert pipe.pending() > len(pipe.buf) - mqtt_link._ROOM + journal.DEFAULT_MAX_PAYLOAD


# -- 2: a frame of zeros is not a meter restart --------------------------------------------------------

BAUD = {"ddsu666": 9600, "sdm120": 2400, "dlt645": 2400}
CYCLE_MS = {"ddsu666": 1000, "sdm120": 1000, "dlt645": 2000}
# DL/T 645 counts whole 0.01 kWh: its smallest registers are 10 and 20 Wh.
SMALL = {"ddsu666": (1, 2), "sdm120": (1, 2), "dlt645": (10, 20)}


def rs485_meter(kind, energy_wh):
    world = meter_rig.World(float(energy_wh))
    if kind == "dlt645":
        sim = Dlt645MeterSim(world)
        options = {"address": "000000000001"}
    else:
        sim, options = ModbusMeterSim(world, model=kind), {}
    bus = meter_rig.Bus(meter_rig.Clock(), sim, BAUD[kind])
    m = wiring.make_meter(kind, uart=bus.uart, de=bus.de, baud=BAUD[kind],
                          poll_interval_ms=CYCLE_MS[kind], **options)
    return world, sim, bus, m


def run_metered(m, bus, record, ms, step_ms=5):
    """Poll the meter for ms; each new reading goes to the record, as the records step does."""
    end = bus.clock.t + ms
    while bus.clock.t < end:
        bus.clock.t += step_ms
        m.poll(int(bus.clock.t))
        if m.reading is not None and m.reading is not record.last:
            record.last = m.reading
            record.note_meter(m.reading)


@pytest.mark.parametrize("kind", sorted(BAUD))
@pytest.mark.parametrize("zero_cycles", [1, 2, 5])
def test_2_a_zeros_frame_is_refused_and_never_a_restart(kind, zero_cycles):
    start, stop = SMALL[kind]
    world, sim, bus, m = rs485_meter(kind, start)
    s = Record(ch.Session(0))
    s.last = None
    run_metered(m, bus, s, 3 * CYCLE_MS[kind])
    assert s.meter_start_wh == start
    sim.fault = "zeros"  # energy, voltage, current, power all 0 (sim/meters.py)
    run_metered(m, bus, s, zero_cycles * CYCLE_MS[kind])
    sim.fault = None
    world.energy_wh = float(stop)
    run_metered(m, bus, s, 3 * CYCLE_MS[kind])
    assert s.meter_stop_wh == stop
    assert s.energy_wh == stop - start, "billed %d Wh for %d delivered" % (s.energy_wh, stop - start)
    assert m.epoch == 0 and s.meter_restarts == 0 and m.errors["reboot"] == 0
    assert m.errors["implausible"] >= zero_cycles - 1
    assert m.last_error is None


@pytest.mark.parametrize("kind", sorted(BAUD))
def test_2_a_real_restart_from_0_with_the_voltage_there_is_still_a_restart(kind):
    world, sim, bus, m = rs485_meter(kind, 500000)
    s = Record(ch.Session(0))
    s.last = None
    run_metered(m, bus, s, 3 * CYCLE_MS[kind])
    sim.fault = "reboot"
    for _ in range(4):
        world.energy_wh += 10
        run_metered(m, bus, s, CYCLE_MS[kind])
    assert m.epoch == 1 and s.meter_restarts == 1


def test_2_check_values_refuses_energy_and_voltage_0_but_not_energy_0_alone():
    with pytest.raises(meter.MeterError) as e:
        meter.check_values(meter.Reading(0, 0.0, 0.0, 0.0, 0))
    assert e.value.kind == "implausible" and e.value.kind in meter.KINDS
    meter.check_values(meter.Reading(0, 0.0, 230.0, 0.0, 0))  # a new meter's register
    meter.check_values(meter.Reading(0, 0.0, None, None, 0))  # S0: no voltage
    meter.check_values(meter.Reading(5, 0.0, 0.0, 0.0, 0))
