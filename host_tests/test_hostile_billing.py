"""Issue 10, billing side: a meter that restarts (item 8), a meter_failure stop that waits for
the meter (item 9), power-loss records with bounds flagged (item 10), flash write errors
(item 18). Each test names its item; each fails on the firmware before these changes."""
import errno
import json
import os
import tempfile

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from pilehost.virtual_board import ROOT, VirtualBoard

import charger as ch
import journal
import journal_scan
import console
import files
import wiring
import meter
import session_restore
import session_store
from session_record import Record

from pilehost import consumer

SCHEMAS = os.path.join(ROOT, "docs", "schemas")
CHARGE = [(100, "plug"), (600, "request")]
PILE = "pile-7"


def validate(kind, record):
    with open(os.path.join(SCHEMAS, kind + ".v1.schema.json")) as f:
        jsonschema.validate(record, json.load(f))


class FakeMeter:
    """A register meter on the simulated world, polled every interval_ms. restart(wh): its
    register starts again at wh, the readings after it carry the next epoch (as the meters
    driver publishes them). silent: no new reading (the last good one stays)."""

    def __init__(self, world, register_wh=1234500, interval_ms=1000):
        self.world = world
        self.reading = None
        self.last_error = None
        self.silent = False
        self._interval = interval_ms
        self._base = register_wh
        self._at = world.energy_wh
        self._epoch = 0
        self._last = None

    def register(self):
        return self._base + int(self.world.energy_wh - self._at)

    def restart(self, wh=0):
        self._base, self._at = wh, self.world.energy_wh
        self._epoch += 1

    def poll(self, now_ms):
        if self.silent:
            self.last_error = "meter: no reply within 200 ms"
            return
        if self._last is not None and now_ms - self._last < self._interval:
            return
        self._last = now_ms
        self.reading = meter.Reading(self.register(), self.world.power_w, 230.0, None, now_ms,
                                     epoch=self._epoch)
        self.last_error = None


def board(monkeypatch, steps, failure_s=30, register_wh=1234500, charge=True, **kw):
    conf = {"pile_id": PILE, "meter": {"type": "ddsu666", "failure_timeout_s": failure_s}}
    vb = VirtualBoard(monkeypatch, (CHARGE if charge else []) + list(steps), config=conf, **kw)
    vb.ctl.records.meter = FakeMeter(vb.world, register_wh)
    return vb


def outbox(kind=journal.KIND_SESSION_END):
    """The records of that kind in the board's flash outbox (cwd: the board's flash)."""
    return [json.loads(p) for _, k, p in journal_scan.load(files.OUTBOX_FILE).pending() if k == kind]


def consumer_takes(record):
    storage = consumer.open_storage("sqlite:///" + os.path.join(tempfile.mkdtemp(), "c.db"))
    storage.setup()
    try:
        h = consumer.Handler(consumer.Schemas(), storage)
        topic = "evse/v1/%s/session/ended" % record["pile_id"]
        return h.handle(topic, json.dumps(record).encode())
    finally:
        storage.close()


# -- item 8: a meter that restarts -----------------------------------------------------------------

@given(st.lists(st.tuples(st.one_of(st.integers(0, 40), st.integers(0, 10 ** 9)),
                          st.lists(st.integers(0, 5000), min_size=1, max_size=6)), min_size=1, max_size=5))
@example([(9, [2]), (10 ** 6, [2]), (15, [2])])  # a held glitch, then back: 9 -> 17 billed
@example([(20, [2]), (10 ** 6, [2]), (5, [2])])  # a rise, then a real restart from 0 (below 22)
@settings(max_examples=200, deadline=None)
def test_item8_energy_is_the_sum_of_the_epochs_deltas(segments):
    """Each segment: the register where the meter (re)started, then increments; a new segment is
    a new epoch. Every Wh between two readings of one epoch is billed, none is counted twice; a
    register that restarted from 0 (no more than 50 kW could add in the 1 s since the last
    reading, plus 20 Wh of slack: 33 Wh) is billed from 0. Except the end of a held glitch
    (docs/meters.md, "Two cases decided"): an epoch that began with a rise, then a drop to
    at or above the register before the rise, within what 50 kW could add since it (plus 20 Wh):
    the segment before the rise goes on, the glitch's epoch is not billed."""
    s = Record(ch.Session(0))
    expected = 0
    t = 0
    last = last_t = rise = None
    for epoch, (start, steps) in enumerate(segments):
        wh = start
        if epoch:
            t += 1000
            if rise is not None and rise[1] <= start < last and \
                    start - rise[1] <= 50000 * (t - rise[2]) // 3600000 + 20:
                expected = rise[0] + start - rise[1]
                rise = None
            else:
                rise = (expected, last, last_t) if start > last else None
                expected += start if start <= 33 else 0
        s.note_meter(meter.Reading(wh, 7000, None, None, t, epoch=epoch))
        for step in steps:
            wh += step
            expected += step
            t += 1000
            s.note_meter(meter.Reading(wh, 7000, None, None, t, epoch=epoch))
        last, last_t = wh, t
    assert s.energy_wh == expected
    assert s.meter_restarts == len(segments) - 1
    assert s.meter_start_wh == segments[0][0] and s.meter_stop_wh == wh


def test_item8_a_meter_restart_mid_session_is_carried_across_and_billed(monkeypatch):
    """The register stood at 1234.5 kWh, the meter restarts at 5 s from 0: the session goes on
    and bills what the meter counted on both sides (all but the one poll across the restart)."""
    vb = board(monkeypatch, [(10600, "stop_request"), (11000, "unplug")])
    vb.run_until(5000)
    assert vb.world.coil
    vb.ctl.records.meter.restart(0)
    vb.run_until(15000)
    (ended,) = outbox()
    validate("session_ended", ended)
    delivered = vb.world.energy_wh
    # What the old register counted after its last reading went with the restart (<= one 1 s
    # poll at 7.4 kW), plus the register's rounding at both ends; the new one is billed from 0.
    lost = 7400 / 3600 + 2
    assert delivered - lost <= ended["energy_wh"] <= delivered
    assert ended["meter_restarts"] == 1 and ended["meter_start_wh"] >= 1234500
    assert ended["meter_stop_wh"] < 100 and ended["stop_reason"] == "ev_disconnected"
    assert consumer_takes(ended) == "new"


def test_item8_a_reading_from_long_before_the_plug_in_is_not_a_start(monkeypatch):
    """Plug-in at 20 s; the meter's last good reading is from ~0 s (a restarted meter whose
    readings its guard refuses since): no close, meter_failure, nothing delivered or billed."""
    vb = board(monkeypatch, [(20000, "plug"), (20500, "request")], failure_s=2, charge=False)
    vb.run_until(1000)
    vb.ctl.records.meter.silent = True  # its last reading stays the one taken at ~0 s
    vb.run_until(30000)
    assert not vb.world.coil and vb.world.energy_wh == 0
    session = vb.ctl.charger.session
    assert session is not None and session.stop_reason == "meter_failure"
    assert vb.ctl.records.current().meter_start_wh is None


def test_item8_a_power_cut_after_a_restart_sums_the_epochs(tmp_path):
    """The snapshot keeps the segments: a power_loss record after a restart bills both."""
    # As wiring.build_session_log:
    log = session_restore.load(PILE, 3, journal_scan.load(str(tmp_path / "outbox")),
                               session_store.SessionStore(str(tmp_path / "session.json")))
    s = Record(ch.Session(0))
    s.auth_source, s.authorized_ms = "free_vend", 0
    s.note_meter(meter.Reading(1000, 7000, None, None, 0))
    log.poll(0, s, None)
    s.note_meter(meter.Reading(1300, 7000, None, None, 1000))
    s.note_meter(meter.Reading(0, 7000, None, None, 2000, epoch=1))
    s.note_meter(meter.Reading(200, 7000, None, None, 3000, epoch=1))
    log.poll(61000, s, None)
    # As wiring.build_session_log:
    booted = session_restore.load(PILE, 4, journal_scan.load(str(tmp_path / "outbox")),
                                  session_store.SessionStore(str(tmp_path / "session.json")))
    booted.poll(0, None, meter.Reading(250, 0, None, None, 0))
    ended = [json.loads(p) for _, k, p in booted.outbox.pending() if k == journal.KIND_SESSION_END][0]
    validate("session_ended", ended)
    assert ended["energy_wh"] == 300 + 250 and ended["meter_restarts"] == 1


# -- item 9: a meter_failure stop waits for the meter ----------------------------------------------

def test_item9_meter_failure_bills_the_reading_the_meter_gives_after_the_open(monkeypatch):
    """Silent from 3 s: stopped (meter_failure) after 2 s, the contactor opens; the meter answers
    0.4 s after the open. The record bills what it counted through the silence."""
    vb = board(monkeypatch, [], failure_s=2)
    vb.run_until(3000)
    vb.ctl.records.meter.silent = True
    vb.run_while(lambda: not vb.world.coil or vb.ctl.charger.session.stop_reason is None, 5000)
    vb.run_while(lambda: vb.world.coil, 7000)
    opened = vb.now_ms
    vb.run_until(opened + 400)
    assert not outbox()  # still waiting for the meter
    vb.ctl.records.meter.silent = False
    vb.run_until(opened + 1000)
    (ended,) = outbox()
    validate("session_ended", ended)
    assert ended["stop_reason"] == "meter_failure" and ended["meter_stop_stale"] is False
    assert vb.world.energy_wh - 1 <= ended["energy_wh"] <= vb.world.energy_wh


def test_item9_a_meter_that_stays_silent_closes_the_record_stale_within_the_bound(monkeypatch):
    vb = board(monkeypatch, [], failure_s=2)
    vb.run_until(3000)
    vb.ctl.records.meter.silent = True
    vb.run_while(lambda: vb.ctl.charger.session.stop_reason is None, 5000)
    vb.run_while(lambda: vb.world.coil, 7000)
    opened = vb.now_ms
    closed = vb.run_while(lambda: not outbox(), 5000)
    from session_record import _METER_FAILURE_FINAL_WAIT_MS
    assert closed - opened <= _METER_FAILURE_FINAL_WAIT_MS + 50
    (ended,) = outbox()
    validate("session_ended", ended)
    assert ended["meter_stop_stale"] is True and ended["energy_wh"] < vb.world.energy_wh
    assert consumer_takes(ended) == "new"


# -- item 10: power-loss records -------------------------------------------------------------------

def test_item10_a_power_cut_after_10_s_at_7_kw_gives_bounds_and_flags_them(monkeypatch):
    vb = board(monkeypatch, [])
    vb.run_until(10000)  # ~9.4 s of charging at 7.4 kW, then the power goes
    assert vb.world.coil
    register = vb.ctl.records.meter.register()
    flash = os.getcwd()
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)  # the same board again
    again = board(monkeypatch, [], register_wh=register)  # no car: it went with the power
    again.run_until(3000)
    (ended,) = outbox()
    validate("session_ended", ended)
    assert ended["stop_reason"] == "power_loss" and ended["meter_stop_wh"] == register
    # No snapshot while the contactor is closed (issue 12, docs/durability.md): the last one is
    # the start's, before any power. The energy is the register's, exact; the duration is a
    # lower bound (the energy at 50 kW) and the peak what the snapshot saw, both flagged.
    energy = ended["energy_wh"]
    assert energy > 0
    assert energy * 3600 // 50000 <= ended["duration_s"] <= 11
    assert ended["peak_power_w"] <= 7400
    assert set(ended["estimated"]) >= {"stop_time", "duration_s", "peak_power_w"}
    assert ended["meter_stop_stale"] is False


def test_item10_records_not_cut_by_a_power_loss_flag_nothing(monkeypatch):
    vb = board(monkeypatch, [(5000, "stop_request"), (5500, "unplug")])
    vb.run_until(8000)
    (ended,) = outbox()
    assert ended["estimated"] == [] and ended["meter_stop_stale"] is False


def test_item10_the_extra_snapshots_stay_few(monkeypatch):
    """First power, a quarter more peak (10 s apart), every 60 s: a 5-minute session writes its
    snapshot at most 5 + 3 times, never per tick; and none while the contactor is closed (issue
    12): the start's before the close, the one due when it opens."""
    vb = board(monkeypatch, [(300000, "stop_request"), (300500, "unplug")])
    store = vb.ctl.records.log.store
    writes = []
    real = store.save
    monkeypatch.setattr(store, "save", lambda snap: writes.append((snap, vb.ctl.contactor.closed))
                        or real(snap))
    vb.run_until(305000)
    assert 2 <= len(writes) <= 8
    assert not any(closed for _, closed in writes)
    assert writes[-1][0]["pk"] > 7000  # the checkpoint at the open has the session's peak


# -- item 18: flash write errors -------------------------------------------------------------------

def failing(calls, errno_):
    """Wrap a store/journal method: the calls whose index is in `calls` raise OSError(errno_)."""
    count = [0]

    def wrap(real):
        def call(*args):
            count[0] += 1
            if count[0] - 1 in calls:
                raise OSError(errno_, os.strerror(errno_))
            return real(*args)
        return call
    return wrap


def reported_lost(vb, session_id):
    return any(w == "storage" and session_id in text for w, text in vb.reports)


@given(save_fail=st.sets(st.integers(0, 8), max_size=4), append_fail=st.sets(st.integers(0, 6), max_size=4),
       clear_fail=st.booleans(), settings_fail=st.booleans(), code=st.sampled_from([errno.ENOSPC, errno.EIO]),
       stop_at=st.integers(3000, 70000))
@settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "30")), deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],  # a failure is shown as found: shrinking is slow here
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_item18_flash_errors_never_escape_the_tick_nor_lose_a_session(
        monkeypatch, save_fail, append_fail, clear_fail, settings_fail, code, stop_at):
    with monkeypatch.context() as mp:
        vb = board(mp, [(stop_at, "stop_request"), (stop_at + 500, "unplug"),
                        (stop_at + 3000, "plug"), (stop_at + 3500, "request"),
                        (stop_at + 8000, "stop_request"), (stop_at + 8500, "unplug")], period_ms=10)
        log = vb.ctl.records.log
        mp.setattr(log.store, "save", failing(save_fail, code)(log.store.save))
        mp.setattr(log.outbox, "append", failing(append_fail, code)(log.outbox.append))
        if clear_fail:
            mp.setattr(log.store, "clear", failing({0}, code)(log.store.clear))
        settings_store = vb.ctl.charger._settings
        if settings_fail:
            mp.setattr(settings_store, "save", failing(set(range(100)), code)(settings_store.save))
        ids = set()
        c_seen = None
        failed_at = None
        while vb.now_ms < stop_at + 25000:
            vb.tick()  # an exception here fails the test: none may escape the tick
            s = vb.ctl.records.current()
            if s is not None and s.id is not None:
                ids.add(s.id)
            if vb.world.coil and getattr(log, "failed", None) is not None and failed_at is None:
                failed_at = vb.now_ms
            if vb.world.coil and failed_at is not None:
                # a storage stop opens the normal way: C2->C1, the car drops to B (0.5 s), at
                # most the IEC 61851-1 6 s
                assert vb.now_ms - failed_at <= 6100
            if not vb.world.coil:
                failed_at = None
            pilot_c = vb.ctl.debouncer.state == "C"
            if pilot_c:
                c_seen = vb.now_ms
            elif vb.world.coil and c_seen is not None:
                assert vb.now_ms - c_seen <= 100  # C->B opens within 100 ms (IEC 61851-1 A.6)
            if vb.now_ms == stop_at + 1000 and settings_fail:
                assert vb.ctl.charger.set_remote_limit(16000) is not None  # told, not raised
        assert not vb.world.coil
        ended = {r["session_id"] for r in outbox()}
        started = {r["session_id"] for r in outbox(journal.KIND_SESSION_START)}
    assert ids
    for sid in ids:
        assert sid in ended or reported_lost(vb, sid), sid
        assert sid in started or reported_lost(vb, sid), sid


def test_item18_enospc_at_a_checkpoint_stops_the_session_and_the_pile_stays_up(monkeypatch):
    """The checkpoint at 61 s hits a full flash: no exception, the session stops the normal way
    (internal_error), its record is written, the next session charges once the flash works.
    (The car pauses at 61 s: no checkpoint is written while the contactor is closed, issue 12;
    the one due is written when it opens.)"""
    vb = board(monkeypatch, [(61000, "stop_request"), (80000, "unplug"), (82000, "plug"),
                             (82500, "request")])
    log = vb.ctl.records.log
    real = log.store.save
    full = [True]

    def save(snapshot):
        if full[0] and snapshot["d"] >= 60:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(snapshot)
    monkeypatch.setattr(log.store, "save", save)
    vb.run_until(61000)
    vb.run_while(lambda: vb.world.coil, 6500)
    assert vb.ctl.charger.session.stop_reason == "internal_error"
    assert any(w == "storage" and "No space left" in t for w, t in vb.reports)
    vb.run_until(80000)
    (ended,) = outbox()
    assert ended["stop_reason"] == "internal_error"
    validate("session_ended", ended)
    full[0] = False
    vb.run_until(84000)
    assert vb.world.coil and vb.ctl.charger.state == ch.CHARGING


def test_item18_a_journal_that_refuses_records_holds_them_and_writes_them_later(monkeypatch):
    vb = board(monkeypatch, [(5000, "stop_request"), (5500, "unplug")])
    log = vb.ctl.records.log
    real = log.outbox.append
    broken = [True]

    def append(kind, payload):
        if broken[0]:
            raise OSError(errno.EIO, "I/O error")
        return real(kind, payload)
    monkeypatch.setattr(log.outbox, "append", append)
    vb.run_until(8000)
    assert not vb.world.coil and outbox() == []
    held = [t for w, t in vb.reports if w == "storage" and t.startswith("held for a retry: ")]
    assert any('"stop_reason": "internal_error"' in t or '"stop_reason"' in t for t in held)
    broken[0] = False
    vb.run_until(20000)
    assert len(outbox()) == 1 and len(outbox(journal.KIND_SESSION_START)) == 1
    assert log.failed is None


def test_item18_a_boot_counter_that_cannot_be_written_holds_the_pile_unavailable(monkeypatch, tmp_path):
    """Today the OSError reaches fail_safe, which resets the board: the same write fails at every
    boot, a reboot loop. It is a reason to hold the pile unavailable (no reset) instead."""
    import config

    monkeypatch.chdir(tmp_path)

    def full(self, value):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(session_store.CounterStore, "save", full)
    monkeypatch.setattr(console, "report", lambda *a: None)
    conf = config.parse_config({"pile_id": PILE, "free_vend": True})
    with pytest.raises(wiring.Unavailable, match="boot counter not written"):
        wiring.build_session_log(conf)
