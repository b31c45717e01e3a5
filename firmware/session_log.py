"""Session records for the cloud (docs/telemetry.md): ids, the outbox, power-loss recovery.

A session record (session_record.py) gets its id `<pile_id>-<boot>-<seq>` once it is
authorised and its meter start is known; its `session/started` record goes into the flash
outbox (journal.py) then, its `session/ended` record when the records step closes it. While
it is open a small snapshot is written every `checkpoint_s` and at each change
(session_store.py); a snapshot found at boot means the power went: the session is closed with
stop_reason "power_loss", its stop time the snapshot's, its meter stop the first checked reading
after boot (the meter kept counting until the cut), before the next session may start.

The MQTT link drains the outbox; nothing here touches the network.
"""
import json
import sys
import time

from micropython import const

import journal

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Callable

    from flash_gate import FlashGate
    from session_store import SessionStore

# Then the contactor (Records.ready) waits this long at most for the link's ack of the power
# cut's record, written while it is still open: an ack that came with it closed would wait in
# RAM (flash_gate.py), and a cut then sends the record again (docs/meters.md, "A session's meter
# start"; docs/durability.md, "The contactor closed"). The next session starts meanwhile.
_RECOVERY_ACK_WAIT_MS = const(5000)
# Extra snapshots for a power cut's record (docs/durability.md, "Write rate"): one when the
# first power is seen, then when the peak has risen by a quarter, not within 10 s of the last.
_PEAK_CHECKPOINT_GAP_MS = const(10000)
# A record the flash refused is kept in RAM and tried again this often; at most this many.
_RETRY_MS = const(10000)
_MAX_UNSENT = const(4)
# Until NTP has set it the ESP32 clock starts at 2000-01-01 at boot: a year before this is not UTC.
_SYNCED_FROM_YEAR = const(2024)


def iso_utc(epoch_s):
    t = time.gmtime(epoch_s)
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (t[0], t[1], t[2], t[3], t[4], t[5])


def clock_synced(epoch_s):
    return time.gmtime(epoch_s)[0] >= _SYNCED_FROM_YEAR


def utf8(text):
    """text's UTF-8 bytes, what a message or record carries (telemetry.py's too), without a copy
    on the board: a MicroPython str has the buffer protocol, its memoryview is those bytes (len()
    in bytes) and keeps the text alive. A CPython str has none (the host's tests)."""
    try:
        return memoryview(text)  # MicroPython: no .encode() copy
    except TypeError:
        return text.encode()


class SessionLog:
    """Opened by session_restore.load (its defaults, the arguments), which sets its state and
    finds the snapshot of a session the power cut, for poll() to close."""

    # Set by session_restore.load (boot code, dropped after it; annotations only: no code on the board).
    pile_id: str
    linked: bool  # an MQTT link drains the outbox: a power cut's record waits for its ack
    _gate: "FlashGate | None"  # with it nothing is written while the contactor is closed
    boot: int
    outbox: "journal.Journal"
    store: "SessionStore"
    connector: int
    metered: bool
    checkpoint_ms: int
    _wall: "Callable[[], int]"
    _report: "Callable[[int, str, str], object] | None"
    _seq: int
    _checkpoint_at: int
    _checkpoint_pk: int  # the peak power in the last snapshot
    _checkpoint_mr: int  # the meter restarts in the last snapshot
    _clear_due: bool  # an ended session's snapshot the flash did not remove yet
    # Flash errors (docs/durability.md, "When the flash fails"): records not yet written,
    # (kind, JSON text, then), oldest first; the snapshot's last error.
    _unsent: list
    _retry_at: int
    _snapshot_error: "str | None"
    too_long: int  # records the outbox refused as too long: lost, logged whole (_too_long)
    _cut: "dict | None"  # a snapshot left by a session the power cut (session_restore.py, at boot)
    _boot_ms: "int | None"
    _recovered_seq: "int | None"  # the power cut's record in the outbox, until acked or waited for
    _recovered_ms: int
    _recover_failed: bool  # session_cut.py did not load: tried again after _RETRY_MS
    # The power cut's record not acknowledged yet, for less than _RECOVERY_ACK_WAIT_MS: no
    # contactor may close (Records.ready). Set by poll().
    unacked_recovery: bool

    def _emit(self, now_ms, what, text):
        if self._report is not None:
            self._report(now_ms, what, text)

    @property
    def failed(self):
        """None, or why the flash did not take a record or the open session's snapshot: the
        records step then lets no session deliver energy (a record could be lost)."""
        if self._unsent:
            return "%d record(s) not written to flash" % len(self._unsent)
        return self._snapshot_error

    # -- every tick ---------------------------------------------------------------------------------

    def poll(self, now_ms, session, reading):
        """session: the open session_record.Record (or None); reading: the meter's last good one."""
        if self._gate is not None and self._gate.held:
            return  # the contactor is closed: no flash write; what is due waits for the open
        retry = time.ticks_diff(now_ms, self._retry_at) >= 0
        if self._unsent and retry:
            self._retry(now_ms)
        if self._cut is not None:
            self._recover(now_ms, reading)
        if self._recovered_seq is not None:
            self.unacked_recovery = self._awaiting_ack(now_ms)
        if self._clear_due and retry and (session is None or session.id is None):
            self._clear(now_ms)  # no other session's snapshot in the file yet: retried
        if session is None or session.ended_ms is not None:
            return
        if session.id is None:
            # Not while a record is held or a cut session not yet closed: their snapshot is the
            # only copy that survives a power cut, and the new one would replace it.
            if session.authorized and (not self.metered or session.meter_start_wh is not None) \
                    and not self._unsent and self._cut is None:
                self._start(now_ms, session)
            return
        since = time.ticks_diff(now_ms, self._checkpoint_at)
        pk = session.peak_power_w
        if since >= self.checkpoint_ms or (pk > 0 and self._checkpoint_pk == 0) or (
                pk > self._checkpoint_pk * 5 // 4 and since >= _PEAK_CHECKPOINT_GAP_MS) or \
                session.meter_restarts != self._checkpoint_mr:  # the segments, at once
            self._checkpoint(now_ms, session)

    def _awaiting_ack(self, now_ms):
        """The power cut's record is in the outbox, not yet acknowledged, for less than
        _RECOVERY_ACK_WAIT_MS: the contactor waits."""
        seq = self._recovered_seq
        if seq is None:
            return False
        if getattr(self.outbox, "acked", seq) < seq and \
                time.ticks_diff(now_ms, self._recovered_ms) < _RECOVERY_ACK_WAIT_MS:
            return True
        self._recovered_seq = None  # never compared again across the tick wrap
        return False

    def _start(self, now_ms, session):
        self._seq += 1
        session.id = "%s-%d-%d" % (self.pile_id, self.boot, self._seq)
        session.start_epoch = self._wall() - time.ticks_diff(now_ms, session.authorized_ms) // 1000
        # The snapshot first: a power cut right after the started record must still end it at boot.
        self._checkpoint(now_ms, session)
        self._append(now_ms, journal.KIND_SESSION_START, json.dumps({
            "v": 1, "session_id": session.id, "pile_id": self.pile_id, "connector": self.connector,
            "auth_source": session.auth_source, "auth_id": session.auth_id,
            "start_time": iso_utc(session.start_epoch), "clock_synced": clock_synced(session.start_epoch),
            "meter_start_wh": session.meter_start_wh or 0,
        }))

    def _checkpoint(self, now_ms, session):
        self._checkpoint_at = now_ms
        if not clock_synced(session.start_epoch):
            wall = self._wall()
            if clock_synced(wall):  # NTP answered since the start: a power cut's record gets real times
                session.start_epoch = wall - time.ticks_diff(now_ms, session.authorized_ms) // 1000
        pk = int(session.peak_power_w)
        self._checkpoint_pk = pk  # also on a failed save: a failing flash is not tried every tick
        self._checkpoint_mr = session.meter_restarts
        snapshot = {
            "id": session.id, "t0": session.start_epoch, "as": session.auth_source,
            "ai": session.auth_id, "d": time.ticks_diff(now_ms, session.authorized_ms) // 1000,
            "m0": session.meter_start_wh or 0, "m1": session.meter_stop_wh or 0, "pk": pk,
        }
        if session.meter_restarts:  # rare: the common snapshot keeps its size (durability.md)
            carried, segment = session.segments()
            snapshot["mr"] = session.meter_restarts
            snapshot["mc"] = carried
            snapshot["ms"] = segment
        try:
            self.store.save(snapshot)
        except OSError as e:
            # Without a snapshot a power cut would lose the session: the records step stops it.
            self._snapshot_error = "session snapshot not written (%s)" % (e,)
            self._emit(now_ms, "storage", self._snapshot_error)
            return
        self._snapshot_error = None
        self._clear_due = False  # the file is this session's now

    def ended(self, now_ms, session):
        """The records step closed the record: no energy can follow."""
        if session.id is None:
            return  # never authorised: nothing was billed, nothing to report
        duration_s = time.ticks_diff(now_ms, session.authorized_ms) // 1000
        stop_epoch = self._wall()
        start_epoch = session.start_epoch
        if clock_synced(stop_epoch) and not clock_synced(start_epoch):
            start_epoch = stop_epoch - duration_s  # synced during the session (telemetry.md)
        meter_start = session.meter_start_wh or 0
        meter_stop = session.meter_stop_wh
        if meter_stop is None:
            meter_stop = meter_start
        energy = session.energy_wh
        record = self._ended_record(
            session.id, session.auth_source, session.auth_id, start_epoch, stop_epoch,
            clock_synced(start_epoch) and clock_synced(stop_epoch), meter_start, meter_stop,
            0 if energy is None else energy, duration_s, session.peak_power_w, session.stop_reason,
            session.meter_restarts, self.metered and session.meter_final is False, (),
            getattr(session, "meter_identity", None))
        # Issue 13's meter name never costs the record: without room in the outbox's payload
        # limit (long pile and auth ids) it goes as null.
        text = json.dumps(record)
        if record["meter"] is not None and not self._fits(text):
            record["meter"] = None
            text = json.dumps(record)
        self._append(now_ms, journal.KIND_SESSION_END, text, self._clear)

    def _ended_record(self, session_id, auth_source, auth_id, start_epoch, stop_epoch, synced,
                      meter_start, meter_stop, energy, duration_s, peak_w, stop_reason,
                      restarts, stale, estimated, meter=None):
        return {
            "v": 1, "session_id": session_id, "pile_id": self.pile_id, "connector": self.connector,
            "auth_source": auth_source, "auth_id": auth_id,
            "start_time": iso_utc(start_epoch), "stop_time": iso_utc(stop_epoch), "clock_synced": synced,
            "meter_start_wh": meter_start, "meter_stop_wh": meter_stop,
            "energy_wh": max(0, energy), "duration_s": max(0, duration_s),
            "peak_power_w": int(peak_w), "stop_reason": stop_reason,
            "meter_restarts": restarts, "meter_stop_stale": stale, "estimated": list(estimated),
            "meter": meter,  # issue 13: who measured it (docs/telemetry.md); None: not known
        }

    def _recover(self, now_ms, reading):
        """The session the power cut (its snapshot, _cut), closed by session_cut.recover:
        boot-time code, loaded only for it (a pile the power did not cut never has it on the
        heap, issue 12), with the contactor open (poll), and dropped once it is closed. An
        import that fails (a fragmented heap's MemoryError, a damaged file, a flash read error's
        OSError: not a reset, which finds the cut again at every boot) leaves the snapshot
        for another try after _RETRY_MS (_retry_at, with the log's other retries), said once: no
        session starts meanwhile (poll), none is lost."""
        if time.ticks_diff(now_ms, self._retry_at) < 0 and self._recover_failed:
            return
        try:
            import session_cut
        except (MemoryError, ImportError, ValueError, SyntaxError, OSError) as e:
            sys.modules.pop("session_cut", None)
            if not self._recover_failed:
                self._emit(now_ms, "session", "the power cut's session waits: its code not loaded (%r)" % (
                    e,))
            self._recover_failed = True
            self._retry_at = time.ticks_add(now_ms, _RETRY_MS)
            return
        self._recover_failed = False
        try:
            session_cut.recover(self, now_ms, reading, self._cut, clock_synced)
        finally:
            if self._cut is None:
                sys.modules.pop("session_cut", None)

    def _clear(self, now_ms=0):
        """The snapshot's clear, after its ended record. A failure is tried again every _RETRY_MS
        (poll): left there, a reboot after the link sent the record would close it again."""
        self._snapshot_error = None
        try:
            self.store.clear()
        except OSError as e:
            if not self._clear_due:
                self._emit(now_ms, "storage", "session snapshot not cleared (%s): retried" % (e,))
            self._clear_due = True
            self._retry_at = time.ticks_add(now_ms, _RETRY_MS)
            return
        self._clear_due = False

    def _append(self, now_ms, kind, text, then=None):
        """A record's JSON text into the outbox (as utf8's bytes: the text is kept, not a copy
        of it, and goes to the report line as it is), then `then()` (the snapshot's clear after
        an ended record), and only then the report line: an error in reporting (a MemoryError in
        a full heap) must not come between the record and the clear, or the next boot would close
        the session again. A flash error keeps the record in RAM for another try (in order,
        behind the others)."""
        if not self._fits(text):
            self._too_long(now_ms, kind, text, then)
            return
        if self._unsent or not self._write(now_ms, kind, text, then):
            self._keep(now_ms, kind, text, then)

    def _fits(self, text):
        """The outbox's payload limit is in bytes (a non-ASCII id takes more than a character).
        An outbox without a max_payload (a test's fake): the journal's."""
        return len(utf8(text)) <= getattr(self.outbox, "max_payload", journal.DEFAULT_MAX_PAYLOAD)

    def _write(self, now_ms, kind, text, then):
        """True if the outbox took the record or dropped it for lack of room (reported); False
        on a flash error."""
        try:
            appended = self.outbox.append(kind, utf8(text)) is not None
        except OSError as e:
            self._emit(now_ms, "storage", "%s record not written to flash (%s)" % (
                journal.kind_name(kind), e))
            return False
        if then is not None:
            then(now_ms)
        if appended:
            self._emit(now_ms, "outbox", text)
        else:
            self._emit(now_ms, "outbox", "full: %s record dropped (reported)" % journal.kind_name(kind))
        return True

    def _too_long(self, now_ms, kind, text, then):
        """A record the outbox refuses whatever its room (journal.Journal.append raises): the
        largest every input rule allows fits (host_tests/test_review_records.py), so this is a
        bug; the record goes whole to the log, counted, never out of the records step. Not held:
        it would be refused again. `then` runs: a snapshot left behind would bring the same
        refused record back at every boot."""
        self.too_long += 1
        self._emit(now_ms, "storage", "LOST (%s record longer than the outbox takes): %s" % (
            journal.kind_name(kind), text))
        if then is not None:
            then(now_ms)

    def _keep(self, now_ms, kind, text, then):
        """Hold an unwritten record for a retry; the whole record goes to the log now, so that
        nothing is lost silently if the power goes before the flash takes it."""
        if len(self._unsent) >= _MAX_UNSENT:
            lost = self._unsent.pop(0)
            self._emit(now_ms, "storage", "LOST (not written, no room to hold it): " + lost[1])
        self._unsent.append((kind, text, then))
        self._retry_at = time.ticks_add(now_ms, _RETRY_MS)
        self._emit(now_ms, "storage", "held for a retry: " + text)

    def _retry(self, now_ms):
        while self._unsent:
            kind, text, then = self._unsent[0]
            if not self._write(now_ms, kind, text, then):
                self._retry_at = time.ticks_add(now_ms, _RETRY_MS)
                return
            self._unsent.pop(0)
        self._emit(now_ms, "storage", "held records written: flash working again")
