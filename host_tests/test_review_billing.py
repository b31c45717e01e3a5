"""Review of the billing side (issue 10 items 8, 10, 18 and the consumer): six faults an earlier
review found. Each test fails on the code before its fix."""
import errno
import json
import os

import jsonschema
import pytest

import charger as ch
import durable
import journal
import journal_scan
import meter
import session_log
import session_restore
import session_store
from session_record import Record

from pilehost import ROOT, consumer

SCHEMAS = os.path.join(ROOT, "docs", "schemas")
PILE = "pile-9"
T_2026 = 1795000000  # a synced clock


def validate(kind, record):
    with open(os.path.join(SCHEMAS, kind + ".v1.schema.json")) as f:
        jsonschema.validate(record, json.load(f))


def make_log(tmp_path, boot=7):
    log = session_restore.load(PILE, boot, journal_scan.load(str(tmp_path / "outbox")),
                               session_store.SessionStore(str(tmp_path / "session.json")),
                               checkpoint_s=60, wall=lambda: T_2026)  # as wiring.build_session_log
    return log


def ended_records(tmp_path):
    return [json.loads(p) for _, k, p in journal_scan.load(str(tmp_path / "outbox")).pending()
            if k == journal.KIND_SESSION_END]


def reading(wh, w=7000, t=0, epoch=0):
    return meter.Reading(wh, w, 230.0, None, t, epoch=epoch)


def running(tmp_path, power_w=7000, start_wh=1000, stop_wh=1500):
    """A session of boot 7 started at 0 and snapshotted at 60 s (start_wh -> stop_wh); the log."""
    log = make_log(tmp_path)
    s = Record(ch.Session(0))
    s.auth_source, s.authorized_ms = "free_vend", 0
    s.note_meter(reading(start_wh, power_w, 0))
    log.poll(0, s, None)
    s.note_meter(reading(stop_wh, power_w, 60000))
    log.poll(60000, s, None)
    return log, s


def failing_once(code):
    calls = []

    def fail(*_args):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(code, os.strerror(code))
        return real(*_args)
    real = os.remove
    return fail


# -- 1: a database made by an older consumer ---------------------------------------------------------

OLD_SESSIONS = consumer.TABLES[0].replace(
    "meter_restarts BIGINT NOT NULL, meter_stop_stale BOOLEAN NOT NULL,", "")


def ended_record(session_id, **over):
    record = {"v": 1, "session_id": session_id, "pile_id": PILE, "connector": 1,
              "auth_source": "free_vend", "auth_id": None, "start_time": "2026-11-18T10:00:00Z",
              "stop_time": "2026-11-18T11:00:00Z", "clock_synced": True, "meter_start_wh": 1000,
              "meter_stop_wh": 8000, "energy_wh": 7000, "duration_s": 3600, "peak_power_w": 7400,
              "stop_reason": "ev_disconnected", "meter_restarts": 0, "meter_stop_stale": False,
              "estimated": [], "meter": None}
    record.update(over)
    return record


def test_1_a_database_of_an_older_consumer_is_migrated_not_refused(db_url):
    """The sessions table as a consumer made it before meter_restarts and meter_stop_stale: the
    new consumer adds the columns (old rows keep their data, the new columns filled from their
    payload) and stores new records with them."""
    assert "meter_restarts" not in OLD_SESSIONS
    old = consumer.open_storage(db_url)
    try:
        old.run(OLD_SESSIONS)
        old.run("INSERT INTO sessions (session_id, pile_id, connector, auth_source, auth_id, start_time, "
                "stop_time, clock_synced, meter_start_wh, meter_stop_wh, energy_wh, duration_s, "
                "peak_power_w, stop_reason, v, payload, received_at) "
                "VALUES (?, ?, 1, 'free_vend', NULL, 's', 's', TRUE, 1, 2, 1, 1, 1, 'remote', 1, ?, 'r')",
                ("%s-1-1" % PILE, PILE, json.dumps(ended_record("x", meter_restarts=2))))
    finally:
        old.close()
    for _ in range(2):  # a second start finds the columns there
        storage = consumer.open_storage(db_url)
        try:
            storage.setup()
            handler = consumer.Handler(consumer.Schemas(), storage)
            record = ended_record("%s-2-1" % PILE, meter_restarts=1, meter_stop_stale=True)
            assert handler.handle("evse/v1/%s/session/ended" % PILE, json.dumps(record).encode()) in (
                consumer.NEW, consumer.DUPLICATE)
            rows = storage.query("SELECT session_id, meter_restarts, meter_stop_stale FROM sessions "
                                 "ORDER BY session_id")
        finally:
            storage.close()
        assert [(r[0], r[1], bool(r[2])) for r in rows] == [
            ("%s-1-1" % PILE, 2, False), ("%s-2-1" % PILE, 1, True)]


# -- 2: a snapshot that cannot be removed ------------------------------------------------------------

def test_2_a_clear_that_fails_raises(tmp_path, monkeypatch):
    store = session_store.SessionStore(str(tmp_path / "session.json"))
    store.save({"id": "x"})
    monkeypatch.setattr(durable.os, "remove", failing_once(errno.EIO))
    with pytest.raises(OSError):
        store.clear()
    monkeypatch.undo()
    assert store.load() == {"id": "x"}
    store.clear()
    store.clear()  # no file: nothing to remove, no error
    assert store.load() is None


def test_2_a_failed_clear_is_retried_so_a_reboot_after_the_ack_reports_nothing_twice(tmp_path, monkeypatch):
    log, s = running(tmp_path)
    s.stop_reason, s.ended_ms = "ev_disconnected", 61000
    monkeypatch.setattr(durable.os, "remove", failing_once(errno.EIO))
    log.ended(61000, s)
    assert log.store.load() is not None  # the clear failed
    log.poll(61000 + session_log._RETRY_MS, None, None)
    monkeypatch.undo()
    # The link sends the ended record and the broker acknowledges it; then the power goes.
    outbox = journal_scan.load(str(tmp_path / "outbox"))
    outbox.ack(max(seq for seq, _, _ in outbox.pending()))
    make_log(tmp_path, boot=8).poll(0, None, reading(1500))
    assert ended_records(tmp_path) == []  # no power_loss copy of the session the cloud has


# -- 3: a held ended record and the next session -----------------------------------------------------

def test_3_a_held_ended_record_survives_the_next_session_and_a_power_cut(tmp_path, monkeypatch):
    """Session A ends while the flash refuses records: its ended record is held in RAM. Session B
    is plugged and authorised; the power goes. A must still be reported (from its snapshot)."""
    log, a = running(tmp_path)
    monkeypatch.setattr(log.outbox, "append", lambda kind, payload: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    a.stop_reason, a.ended_ms = "ev_disconnected", 61000
    log.ended(61000, a)
    assert log.failed is not None
    b = Record(ch.Session(62000))
    b.auth_source, b.authorized_ms = "free_vend", 62000
    b.note_meter(reading(1600, 0, 62000))
    for t in range(62000, 64000, 100):
        log.poll(t, b, None)
    monkeypatch.undo()
    make_log(tmp_path, boot=8).poll(0, None, reading(1600))
    ids = [r["session_id"] for r in ended_records(tmp_path)]
    assert a.id in ids
    assert b.id is None or b.id in ids


def test_3_the_held_record_written_later_does_not_clear_another_session(tmp_path, monkeypatch):
    log, a = running(tmp_path)
    broken = [True]
    real = log.outbox.append

    def append(kind, payload):
        if broken[0]:
            raise OSError(errno.EIO, "I/O error")
        return real(kind, payload)
    monkeypatch.setattr(log.outbox, "append", append)
    a.stop_reason, a.ended_ms = "ev_disconnected", 61000
    log.ended(61000, a)
    b = Record(ch.Session(62000))
    b.auth_source, b.authorized_ms = "free_vend", 62000
    b.note_meter(reading(1600, 7000, 62000))
    log.poll(62000, b, None)
    broken[0] = False
    t = 62000
    while b.id is None and t < 120000:  # once A's record is written, B may start
        t += 100
        log.poll(t, b, None)
    assert b.id is not None
    b.note_meter(reading(1700, 7000, t))
    log.poll(t + 100, b, None)
    # the power goes: B's snapshot must be there
    make_log(tmp_path, boot=8).poll(0, None, reading(1700))
    by_id = {r["session_id"]: r for r in ended_records(tmp_path)}
    assert by_id[a.id]["stop_reason"] == "ev_disconnected"
    assert by_id[b.id]["stop_reason"] == "power_loss"


# -- 4: an implausible reading at boot ---------------------------------------------------------------

@pytest.mark.parametrize("boot_reading", [
    reading(10 ** 9),  # far more than could flow between the last snapshot and the cut
    reading(400),  # below the session's start: a new or reset meter
    reading(1600, epoch=1),  # a restart seen since boot: not the register the snapshot read
])
def test_4_an_implausible_reading_at_boot_is_not_billed(tmp_path, boot_reading):
    running(tmp_path)
    make_log(tmp_path, boot=8).poll(0, None, boot_reading)
    (ended,) = ended_records(tmp_path)
    validate("session_ended", ended)
    assert ended["stop_reason"] == "power_loss"
    assert ended["meter_stop_wh"] == 1500 and ended["energy_wh"] == 500
    assert ended["meter_stop_stale"] is True
    assert {"stop_time", "duration_s"} <= set(ended["estimated"])


def test_4_a_plausible_reading_at_boot_is_billed(tmp_path):
    running(tmp_path)
    make_log(tmp_path, boot=8).poll(0, None, reading(1600))
    (ended,) = ended_records(tmp_path)
    assert ended["meter_stop_wh"] == 1600 and ended["energy_wh"] == 600
    assert ended["meter_stop_stale"] is False


# -- 5: a meter restart and a power cut right after it -----------------------------------------------

def test_5_a_meter_restart_is_snapshotted_at_once(tmp_path):
    """Start at 1000, 1300 at 1 s, the meter restarts from 0 (200 at 3 s); the power goes at 4 s,
    long before the 60 s checkpoint. The boot reading (250) bills both segments: 300 + 250."""
    log = make_log(tmp_path)
    s = Record(ch.Session(0))
    s.auth_source, s.authorized_ms = "free_vend", 0
    s.note_meter(reading(1000, 7000, 0))
    log.poll(0, s, None)
    s.note_meter(reading(1300, 7000, 1000))
    log.poll(1000, s, None)
    s.note_meter(reading(0, 7000, 2000, epoch=1))
    log.poll(2000, s, None)
    s.note_meter(reading(200, 7000, 3000, epoch=1))
    log.poll(3000, s, None)
    make_log(tmp_path, boot=8).poll(0, None, reading(250))
    (ended,) = ended_records(tmp_path)
    validate("session_ended", ended)
    assert ended["energy_wh"] == 300 + 250 and ended["meter_restarts"] == 1
    assert ended["meter_stop_stale"] is False


# -- 6: the duration of a power-cut session ----------------------------------------------------------

def test_6_a_power_cut_record_is_not_stretched_to_days(tmp_path):
    """A trickle (peak 1 W seen) then 500 Wh after the last snapshot: at 1 W that would be 500 h.
    The cut came within one checkpoint interval of the last snapshot: no longer than that."""
    running(tmp_path, power_w=1, start_wh=1000, stop_wh=1001)
    make_log(tmp_path, boot=8).poll(0, None, reading(1501))
    (ended,) = ended_records(tmp_path)
    validate("session_ended", ended)
    assert ended["energy_wh"] == 501
    assert 60 <= ended["duration_s"] <= 60 + 70  # the snapshot's, plus at most one interval and slack
    assert {"stop_time", "duration_s", "peak_power_w"} <= set(ended["estimated"])

