"""session_record.py: the records step the main loop runs after the tick. The tick owns no
record (it reads only Records.ready); the records step owns the meter, the record and its
closing."""
import meter
import pytest
from pilehost.virtual_board import VirtualBoard

import charger_restore
import pilot
from session_record import _METER_SETTLE_MS
from wiring import new_gate
from wiring import new_records


def reading(wh, w=7000, t=0, epoch=0):
    return meter.Reading(wh, w, 230.0, None, t, epoch=epoch)


# -- found by the stateful test (a new seed): the next session's start from before the last one's end

class Contactor:
    closed = False


class SilentMeter:
    """The last good reading stays; poll() adds none (a meter that stopped answering)."""

    def __init__(self):
        self.reading = None
        self.last_error = None
        self.epoch = 0

    def poll(self, now_ms):
        pass


def test_a_start_reading_from_before_the_last_contactor_opening_is_not_taken():
    """Session 1 charges while the meter is silent (its record closes stale); the car is plugged
    again 0.5 s later, within _START_READING_MAX_AGE_MS of the last good reading. That reading
    predates what session 1 drew: taken as session 2's start, session 1's energy would be billed
    to session 2. The start must be a reading taken after the contactor last opened."""
    charger = charger_restore.build(32000, 32000, True, False)
    contactor = Contactor()
    m = SilentMeter()
    records = new_records(charger, contactor, m)
    m.reading = reading(1000, 0, 0)
    charger.step(0, pilot.B, True)
    records.poll(0)
    first = records.record
    assert first.meter_start_wh == 1000
    contactor.closed = True
    records.poll(100)
    charger.step(2000, pilot.A, True)  # unplugged; the meter silent since 0 s
    contactor.closed = False
    records.poll(2000)
    charger.step(2500, pilot.B, True)
    records.poll(2500)
    second = records.record
    assert second is not first and first.ended_ms is not None and first.meter_final is False
    assert second.meter_start_wh is None  # the reading of 0 s is 2.5 s old, but from before the opening
    m.reading = reading(1004, 0, 2000 + _METER_SETTLE_MS)  # the meter is back: session 1 drew 4 Wh
    records.poll(2600)
    assert second.meter_start_wh == 1004


class Exploding:
    """A meter or a log that raises on any use: the tick must not touch it."""

    def __getattr__(self, name):
        raise AssertionError("the tick used the records' %s" % name)


def test_the_tick_touches_neither_the_meter_nor_the_records(monkeypatch):
    """Charging, then the meter and the log replaced by ones that raise on any use: ticks alone
    run on (the contactor opens at the unplug); only the records step uses them."""
    vb = VirtualBoard(monkeypatch, [(100, "plug"), (600, "request"), (4000, "unplug")],
                      config={"pile_id": "p-3", "meter": {"type": "ddsu666"}})
    vb.run_until(3000)
    assert vb.world.coil
    records = vb.ctl.records
    vb.ctl.records = None  # the tick's gate: none
    real = records.meter, records.log
    records.meter = records.log = Exploding()
    while vb.world.advance() < 5000 * 1000:
        now = vb.clock.ticks_ms()
        vb.ctl.tick(now)
        vb.clock.t += vb.period_ms * 1000
    assert not vb.world.coil
    records.meter, records.log = real
    vb.ctl.records = records
    with pytest.raises(AssertionError):
        new_records(vb.ctl.charger, vb.ctl.contactor, Exploding()).poll(0)


# -- issue 12 item 2: the session's first writes come before the contactor closes ------------------

class HeldLog:
    """A SessionLog that cannot start the session yet (a power cut's session still open)."""

    failed = None

    def poll(self, now_ms, record, reading):
        pass


def test_the_contactor_waits_for_the_sessions_id_its_started_record_and_snapshot():
    """Records.ready: an authorised session without its id (started record and first snapshot
    not written) holds the contactor open: they would otherwise be written while it is closed."""
    charger = charger_restore.build(32000, 32000, True, False)
    contactor = Contactor()
    m = SilentMeter()
    records = new_records(charger, contactor, m, HeldLog())
    m.reading = reading(1000, 0, 0)
    charger.step(0, pilot.B, True)
    records.poll(0)
    rec = records.record
    assert rec.authorized and rec.meter_start_wh == 1000 and rec.id is None
    assert not records.ready
    rec.id = "pile-1-1"  # what SessionLog._start gives, with the snapshot and the started record
    assert records.ready


def test_the_gate_runs_the_deferred_writes_in_the_records_step_once_open_after_the_opening_one():
    contactor = Contactor()
    gate = new_gate(contactor)
    ran = []
    contactor.closed = True
    gate.defer(lambda now: ran.append(now))
    records = new_records(charger_restore.build(32000, 32000, True, False), contactor, None, None, gate=gate)
    records.poll(5)
    assert ran == [] and len(gate._due) == 1
    contactor.closed = False
    records.poll(10)  # the iteration that opened it: the session log's (its checkpoint due)
    assert ran == [] and len(gate._due) == 1
    records.poll(15)
    assert ran == [15] and len(gate._due) == 0


# -- found under load (test_scenarios_unix.py's silent meter, the soak's remote stop) -----------

class HeldMeter(SilentMeter):
    """A meter whose last reading stays until the test gives another."""


class EndingLog(HeldLog):
    """A SessionLog that takes the ended record (and starts nothing: the test gives the id)."""

    def ended(self, now_ms, record):
        pass


def test_a_contactor_the_guard_opens_inside_the_step_closes_no_record_as_final():
    """The records step samples the contactor, then runs Controller.guard between the meter's
    step and the journal's: a C->B landing in that slice opens the contactor inside the step. The
    step had not noted the opening, so the held reading, taken before it (up to a poll old, or a
    silent meter's last), closed a stopped session's record at once as final: the silent meter's
    record came without its "last good reading" flag, and a remote stop's last Wh was lost. The
    record closes at a later step, on a reading taken after the open (or flagged)."""
    charger = charger_restore.build(32000, 32000, True, False)
    contactor = Contactor()
    m = HeldMeter()
    records = new_records(charger, contactor, m, EndingLog())
    m.reading = reading(1000, 7000, 0)
    charger.step(0, pilot.B, True)
    records.poll(0)
    rec = records.record
    rec.id = "pile-1-1"
    contactor.closed = True
    records.poll(100)
    m.reading = reading(1004, 7000, 2000)
    records.poll(2000)
    charger.stop_session(2500, "remote")

    def guard(now_ms):
        contactor.closed = False  # C->B in the slice: the guard opens

    records.poll(2500, guard)
    assert rec.ended_ms is None, "closed on a reading taken before the open, as final"
    records.poll(2510)
    assert rec.ended_ms is None  # waits for a reading taken after the open
    m.reading = reading(1005, 0, 2510 + _METER_SETTLE_MS)  # the step that saw the open: 2510 ms
    records.poll(2600)
    assert rec.ended_ms == 2600 and rec.meter_final is True and rec.energy_wh == 5
