"""A session's record and the main loop's records step (docs/telemetry.md, docs/durability.md).

`Record`: what is billed for one session: its id, meter start/stop/peak and segments. The
charger's Session says what the safety state machine decided (authorised, stopped); a Record
reads that and never changes it.

`Records.poll` runs once per loop iteration, after the control tick (never before it: the
tick's power-off decision comes first). It polls the meter, opens a record for each new
session, closes it once the contactor is open with a final reading, and hands both to the
SessionLog (ids, outbox, snapshots, power loss). Its `ready` is the tick's gate for closing
the contactor: the meter start is known and the flash takes records.
"""
import time

from micropython import const

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any, Callable

    from charger import Charger
    from flash_gate import FlashGate
    from relay import Contactor
    from session_log import SessionLog

# A session's record closes with a meter reading taken at least this long after the contactor
# opened (the contacts part within ~10 ms), so the last watt-hour is in it; without one (meter
# silent), it closes with the last good reading after _FINAL_READING_MAX_MS.
_METER_SETTLE_MS = const(50)
_FINAL_READING_MAX_MS = const(10000)
# After a meter_failure stop the meter had been silent for meter_failure_ms already: wait this
# long (three polls at the default 1 s) for it to answer again before closing on a stale reading.
_METER_FAILURE_FINAL_WAIT_MS = const(3000)
# A session's meter start is a reading taken after its plug-in, or at most this old: one or two
# lost replies at the default poll (1 s, DL/T 645 2 s). An older one may predate a meter restart.
_START_READING_MAX_AGE_MS = const(5000)
# A meter's register after a restart at most this far above 0 (the power of meter.py's guard,
# _MAX_POWER_W, over the time since the last reading, plus its slack): it restarted from 0
# and counted all of it in the session.
_RESTART_MAX_POWER_W = const(50000)
_RESTART_SLACK_WH = const(20)


class Record:
    """The record of one charger Session. Closed (`ended_ms`, kept on the session: the charger's
    availability change waits for it) once stopped with the contactor open, with a meter reading
    taken after the opening: no energy can follow. What the session owns (started_ms, auth_source,
    auth_id, authorized_ms, stop_reason, ended_ms) is read through the record and written only
    on the session (one __getattr__: six properties cost ~1.2 KB more heap).

    Energy is the sum of the meter's segments: a meter restart (a reading of a new `epoch`,
    meter.Reading) closes the segment at its last reading and starts a new one at the first
    reading after the restart (docs/telemetry.md, "A meter that restarts")."""

    def __init__(self, session):
        self.session = session  # first: __getattr__ reads it
        self.id = None  # given by session_log once authorised: <pile_id>-<boot>-<seq>
        self.start_epoch = None  # wall-clock start, for the records
        self.meter_start_wh = None  # register at the start (the first segment's start)
        self.meter_stop_wh = None  # register at the last reading (the last segment's end)
        self.meter_final = None  # set when the record closes: was the last reading after the open?
        self.meter_restarts = 0  # meter epochs crossed during the session
        self.energized = False  # the contactor closed at least once for this session
        self.peak_power_w = 0
        self.meter_identity = None  # the meter's identity() for the record, set when it closes
        self._epoch = 0  # the meter epoch of the current segment
        self._segment_wh = None  # register at the start of the current segment
        self._carried_wh = 0  # energy of the segments before the current one
        self._stop_taken_ms = None  # when the last reading was taken
        self._start_checked = True  # False: the start is a first reading no other has followed yet
        # The current epoch began with a rise (a jump the meter's guard confirmed): (carried,
        # segment start, last register, its taken_ms) from before it, for a drop back (note_meter).
        self._rise = None

    def __getattr__(self, name):
        return getattr(self.session, name)

    @property
    def authorized(self):
        return self.authorized_ms is not None

    @property
    def energy_wh(self):
        if self.meter_start_wh is None or self.meter_stop_wh is None:
            return None
        return self._carried_wh + self.meter_stop_wh - self._segment_wh

    def note_meter(self, reading):
        """A good reading while the record is open: the first one is the start value (Records
        hands over only a current one: taken after the plug-in, or recent)."""
        if self.ended_ms is not None:
            return
        wh = reading.energy_wh
        epoch = getattr(reading, "epoch", 0)
        if self.meter_start_wh is None:
            self.meter_start_wh = self._segment_wh = wh
            self._epoch = epoch
            self._start_checked = getattr(reading, "checked", True)
        elif epoch != self._epoch:
            if self._start_checked:
                self._new_epoch(reading, wh, epoch)
            else:
                # The start was a first reading after boot that no later one followed: a glitch
                # (docs/meters.md, "A session's meter start"). Nothing of it is billed, nor is the
                # new register counted from 0: the session starts again at it, the restart counted.
                self.meter_start_wh = self._segment_wh = wh
                self._start_checked = True
                self.meter_restarts += 1
            self._epoch = epoch
        elif not self._start_checked and getattr(reading, "checked", True):
            self._start_checked = True  # a reading the guard published after it followed it
        self.meter_stop_wh = wh
        self._stop_taken_ms = getattr(reading, "taken_ms", None)
        if reading.power_w is not None and reading.power_w > self.peak_power_w:
            self.peak_power_w = reading.power_w

    def _new_epoch(self, reading, wh, epoch):
        """A reading of a new meter epoch (meter.py: a restart, or a jump, its guard confirmed)."""
        rise = self._rise
        self._rise = None
        stop = self.meter_stop_wh
        if rise is not None and rise[3] is not None and rise[2] <= wh < stop and \
                wh - rise[2] <= self._restart_max_wh(reading, rise[3]):
            # Back down to where the register stood before the last epoch's rise, plus no more
            # than it could count since: that rise was a glitch the meter held for two readings
            # (docs/meters.md, "Two cases decided"). The segment before it goes on; nothing of
            # the glitch is billed, nor the register counted from 0.
            self._carried_wh, self._segment_wh = rise[0], rise[1]
        else:
            if wh > stop:  # set with the start
                self._rise = (self._carried_wh, self._segment_wh, stop, self._stop_taken_ms)
            # The meter restarted: what it counted before is kept, the new register is a new
            # baseline: 0 if it restarted from 0 (no more than it could count since the last
            # reading), else the first reading. Only what no reading showed goes unbilled.
            self._carried_wh += stop - self._segment_wh  # type: ignore[operator]  # set with the start
            self._segment_wh = wh if wh > self._restart_max_wh(reading) else 0
        self.meter_restarts += epoch - self._epoch if epoch > self._epoch else 1

    def _restart_max_wh(self, reading, since_ms=None):
        """The most a meter that restarted from 0 can show in `reading` (the most a register
        can count between the last reading, or `since_ms`, and it); -1: not known."""
        taken = getattr(reading, "taken_ms", None)
        if since_ms is None:
            since_ms = self._stop_taken_ms
        if taken is None or since_ms is None:
            return -1
        elapsed = time.ticks_diff(taken, since_ms)
        if elapsed < 0:
            return -1
        return _RESTART_MAX_POWER_W * elapsed // 3600000 + _RESTART_SLACK_WH

    def segments(self):
        """(energy of the closed segments, register at the current segment's start): what a
        snapshot needs to rebuild energy_wh after a power cut."""
        return self._carried_wh, self._segment_wh


class Records:
    """The records step. Made by wiring.new_records (boot code, dropped after it; its defaults,
    the arguments), which sets the state below."""

    # Set by wiring.new_records (annotations only: no code on the board).
    charger: "Charger"  # whose sessions are recorded (and stopped for meter_failure or internal_error)
    gate: "FlashGate | None"  # the writers share it; its deferred writes run here
    contactor: "Contactor"  # read only
    meter: "Any"  # a meter driver, or None: no meter fitted
    log: "SessionLog | None"  # None: no pile id, nothing recorded
    meter_failure_ms: int
    _report: "Callable[[int, str, str], object] | None"
    record: "Record | None"  # the open record (outlives charger.session on unplug)
    _last: "Record | None"  # the newest record, open or closed
    _closed: bool  # the contactor at the last step; the tick switches it
    _closed_ms: int
    _opened_ms: int
    _has_opened: bool  # opened, and no reading taken since: none may be a start
    _open_settled: bool  # _FINAL_READING_MAX_MS passed since the opening: all waits over
    _meter_error: "str | None"

    def _emit(self, now_ms, what, text):
        if self._report is not None:
            self._report(now_ms, what, text)

    @property
    def ready(self):
        """The open session's meter start value is known, or no meter is fitted, and the flash
        takes the records: only then may the contactor close. Energy from the close on is billed;
        a first reading taken after the close would miss what flowed before it. Nor while a power
        cut's record waits for its ack (session_log._RECOVERY_ACK_WAIT_MS): written while open."""
        log = self.log
        if log is not None and (log.failed is not None or getattr(log, "unacked_recovery", False)):
            return False
        record = self.record
        if log is not None and record is not None and record.authorized and record.id is None:
            # Its started record and first snapshot are written before the close: none while
            # the contactor is closed (flash_gate.py).
            return False
        return self.meter is None or self.record is None or self.record.meter_start_wh is not None

    def current(self):
        """The open record, else the record of the charger's session (closed, car still there)."""
        if self.record is not None:
            return self.record
        last = self._last
        if last is not None and last.session is self.charger.session:
            return last
        return None

    def poll(self, now_ms, guard=None):
        """One step, with the `now_ms` of this iteration's tick: a contactor switch seen here
        happened in that tick, at that time. guard: Controller.guard, run between the meter's
        step and the journal's (main.py: no more than one slice of slow work between two pilot
        reads while the contactor is closed)."""
        closed = self.contactor.closed
        if self.gate is not None:
            self.gate.poll(now_ms)  # the writes deferred while closed, at the first open step
        if closed != self._closed:
            self._closed = closed
            if closed:
                self._closed_ms = now_ms
            else:
                self._opened_ms = now_ms
                self._has_opened = True
                self._open_settled = False
        if not self._open_settled and time.ticks_diff(now_ms, self._opened_ms) >= _FINAL_READING_MAX_MS:
            self._open_settled = True  # never compared again across the tick wrap (2^29 ms on)
        session = self.charger.session
        if session is not None and (self._last is None or self._last.session is not session):
            if self.record is not None:  # replugged before the last record got its reading
                self._close(now_ms, self.record, force=True)
            self.record = self._last = Record(session)
        record = self.record
        meter = self.meter
        if record is not None and closed:
            record.energized = True
        if meter is not None:
            meter.poll(now_ms)  # a non-blocking step of the meter's own state machine
            if meter.last_error is not self._meter_error:
                self._meter_error = meter.last_error
                if self._meter_error is not None:
                    self._emit(now_ms, "meter", self._meter_error)
            reading = meter.reading
            if self._has_opened and reading is not None and \
                    time.ticks_diff(reading.taken_ms, self._opened_ms) >= _METER_SETTLE_MS:
                self._has_opened = False  # passed: never compared again across the tick wrap
            if record is not None and reading is not None and (
                    record.meter_start_wh is not None or self._current_reading(record, reading, now_ms)):
                record.note_meter(reading)
            since = self._unmetered_since(record, reading)
            if since is not None and time.ticks_diff(now_ms, since) > self.meter_failure_ms:
                self._emit(now_ms, "meter", "no good reading for %d s: %s" % (
                    self.meter_failure_ms // 1000, meter.last_error))
                self.charger.stop_session(now_ms, "meter_failure")
        log = self.log
        if log is not None:
            if guard is not None and meter is not None:
                guard(time.ticks_ms())
            log.poll(now_ms, record, None if meter is None else meter.reading)
            if log.failed is not None:
                # The flash took no record or snapshot: no session may deliver energy it could
                # not bill. Stopped the normal way (the contactor opens as after a remote stop);
                # the pile stays up and retries the writes.
                s = self.charger.session
                if s is not None and s.authorized and self.charger.stop_session(now_ms, "internal_error"):
                    self._emit(now_ms, "storage", "session stopped: " + log.failed)
        # `closed` as this step saw it, not the contactor now: the guard above may have opened it
        # (C->B in the slice), and this step has not noted that opening (_has_opened): its held
        # reading, taken before the open, would close the record as final. The next step does.
        if record is not None and record.stop_reason is not None and record.ended_ms is None \
                and not closed:
            self._close(now_ms, record)

    def _current_reading(self, record, reading, now_ms):
        """May `reading` be the session's meter start? Taken after the plug-in, or at most
        _START_READING_MAX_AGE_MS old, and of the meter's current epoch: a reading the meter's
        guard refused to replace for long (a restart it did not see) is never a start. Never
        one from before the contactor last opened: what the last session drew after it (a meter
        silent then) would be billed to this one."""
        epoch = getattr(self.meter, "epoch", None)
        if epoch is not None and epoch != getattr(reading, "epoch", 0):
            return False
        if self._has_opened:  # no reading since the last opening yet
            return False
        return time.ticks_diff(reading.taken_ms, record.started_ms) >= 0 or \
            time.ticks_diff(now_ms, reading.taken_ms) <= _START_READING_MAX_AGE_MS

    def _unmetered_since(self, record, reading):
        """Since when the open session has lacked the reading it needs; None: it lacks none."""
        if record is None or record.stop_reason is not None:
            return None
        if self.contactor.closed:  # energy flows: a good reading every meter_failure_ms
            since = self._closed_ms
            if reading is not None and time.ticks_diff(reading.taken_ms, since) > 0:
                since = reading.taken_ms
            return since
        if record.authorized and record.meter_start_wh is None:
            return record.authorized_ms  # no current start value: the contactor may not close yet
        return None

    def _close(self, now_ms, record, force=False):
        meter = self.meter
        fresh = False
        if meter is not None:
            # A reading taken _METER_SETTLE_MS after the last opening (poll's _has_opened): not
            # compared with _opened_ms here, which a long uptime wraps (ticks_diff < 0).
            fresh = meter.reading is not None and not self._has_opened
            if record.stop_reason == "meter_failure":
                # Nothing flowed without a close: no reading to wait for. Else the meter may be back.
                gave_up = not record.energized or self._open_settled or \
                    time.ticks_diff(now_ms, self._opened_ms) >= _METER_FAILURE_FINAL_WAIT_MS
            else:
                gave_up = self._open_settled
            if not (fresh or force or gave_up):
                return
        record.session.ended_ms = now_ms
        identity = getattr(meter, "identity", None)
        if identity is not None:  # who measured it, for session/ended (DL/T 645: learnt on the bus)
            record.meter_identity = identity()
        # False: closed on the last good reading, without one taken after the contactor opened.
        record.meter_final = meter is None or fresh or (
            record.stop_reason == "meter_failure" and not record.energized)
        self.record = None
        energy = record.energy_wh
        self._emit(now_ms, "session", "ended: %s, %s Wh, %d s%s" % (
            record.stop_reason, "?" if energy is None else energy,
            time.ticks_diff(now_ms, record.started_ms) // 1000,
            "" if record.meter_final else " (last good reading before the stop)"))
        if self.log is not None:
            self.log.ended(now_ms, record)
