"""Session records for the cloud (docs/telemetry.md): ids, the outbox, power-loss recovery.

A session gets its id `<pile_id>-<boot>-<seq>` once it is authorised and its meter start is
known; its `session/started` record goes into the flash outbox (journal.py) then, its
`session/ended` record when the controller closes it. While it is open a small snapshot is
written every `checkpoint_s` and at each change (session_store.py); a snapshot found at boot
means the power went: the session is closed with stop_reason "power_loss", its stop time the
snapshot's, its meter stop the first reading after boot (the meter kept counting until the cut).

The MQTT link drains the outbox; nothing here touches the network.
"""
import json
import time

from micropython import const

import journal

# Snapshots while a session runs: every 60 s at most (docs/durability.md: a <=128-byte snapshot
# every 60 s costs ~0.12 block erases, decades of wear on a 1 MB partition).
DEFAULT_CHECKPOINT_S = const(60)
# At boot, wait this long for the meter's first reading before closing a cut session without it.
RECOVERY_WAIT_MS = const(10000)
# Until NTP has set it the ESP32 clock starts at 2000-01-01 at boot: a year before this is not UTC.
_SYNCED_FROM_YEAR = const(2024)


def iso_utc(epoch_s):
    t = time.gmtime(epoch_s)
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (t[0], t[1], t[2], t[3], t[4], t[5])


def clock_synced(epoch_s):
    return time.gmtime(epoch_s)[0] >= _SYNCED_FROM_YEAR


class SessionLog:
    def __init__(self, pile_id, boot, outbox, store, connector=1, metered=True,
                 checkpoint_s=DEFAULT_CHECKPOINT_S, wall=time.time, report=None):
        self.pile_id = pile_id
        self.boot = boot
        self.outbox = outbox
        self.store = store
        self.connector = connector
        self.metered = metered
        self.checkpoint_ms = checkpoint_s * 1000
        self._wall = wall
        self._report = report
        self._seq = 0
        self._checkpoint_at = 0
        self._cut = store.load()  # a snapshot left by a session the power cut
        if store.error:
            self._emit(0, "session", "snapshot ignored: " + store.error)
        # Now, at boot, before the link can send anything: once sent and acknowledged the ended
        # record is no longer in the outbox, and a power_loss copy would follow it to the cloud.
        if self._cut is not None and self._already_ended(self._cut.get("id")):
            self._cut = None
            store.clear()
        self._boot_ms = None

    def _emit(self, now_ms, what, text):
        if self._report is not None:
            self._report(now_ms, what, text)

    # -- every tick ---------------------------------------------------------------------------------

    def poll(self, now_ms, session, reading):
        """session: the controller's open record (or None); reading: the meter's last good one."""
        if self._cut is not None:
            self._recover(now_ms, reading)
        if session is None or session.ended_ms is not None:
            return
        if session.id is None:
            if session.authorized and (not self.metered or session.meter_start_wh is not None):
                self._start(now_ms, session)
            return
        if time.ticks_diff(now_ms, self._checkpoint_at) >= self.checkpoint_ms:
            self._checkpoint(now_ms, session)

    def _start(self, now_ms, session):
        self._seq += 1
        session.id = "%s-%d-%d" % (self.pile_id, self.boot, self._seq)
        session.start_epoch = self._wall() - time.ticks_diff(now_ms, session.authorized_ms) // 1000
        # The snapshot first: a power cut right after the started record must still end it at boot.
        self._checkpoint(now_ms, session)
        self._append(now_ms, journal.KIND_SESSION_START, {
            "v": 1, "session_id": session.id, "pile_id": self.pile_id, "connector": self.connector,
            "auth_source": session.auth_source, "auth_id": session.auth_id,
            "start_time": iso_utc(session.start_epoch), "clock_synced": clock_synced(session.start_epoch),
            "meter_start_wh": session.meter_start_wh or 0,
        })

    def _checkpoint(self, now_ms, session):
        self._checkpoint_at = now_ms
        if not clock_synced(session.start_epoch):
            wall = self._wall()
            if clock_synced(wall):  # NTP answered since the start: a power cut's record gets real times
                session.start_epoch = wall - time.ticks_diff(now_ms, session.authorized_ms) // 1000
        self.store.save({
            "id": session.id, "t0": session.start_epoch, "as": session.auth_source,
            "ai": session.auth_id, "d": time.ticks_diff(now_ms, session.authorized_ms) // 1000,
            "m0": session.meter_start_wh or 0, "m1": session.meter_stop_wh or 0,
            "pk": int(session.peak_power_w),
        })

    def ended(self, now_ms, session):
        """The controller closed the record: no energy can follow."""
        if session.id is None:
            return  # never authorised: nothing was billed, nothing to report
        duration_s = time.ticks_diff(now_ms, session.authorized_ms) // 1000
        stop_epoch = self._wall()
        start_epoch = session.start_epoch
        if clock_synced(stop_epoch) and not clock_synced(start_epoch):
            start_epoch = stop_epoch - duration_s  # synced during the session (telemetry.md)
        meter_start = session.meter_start_wh or 0
        meter_stop = session.meter_stop_wh or meter_start
        self._append(now_ms, journal.KIND_SESSION_END, self._ended_record(
            session.id, session.auth_source, session.auth_id, start_epoch, stop_epoch,
            clock_synced(start_epoch) and clock_synced(stop_epoch), meter_start, meter_stop,
            duration_s, session.peak_power_w, session.stop_reason), self.store.clear)

    def _ended_record(self, session_id, auth_source, auth_id, start_epoch, stop_epoch, synced,
                      meter_start, meter_stop, duration_s, peak_w, stop_reason):
        return {
            "v": 1, "session_id": session_id, "pile_id": self.pile_id, "connector": self.connector,
            "auth_source": auth_source, "auth_id": auth_id,
            "start_time": iso_utc(start_epoch), "stop_time": iso_utc(stop_epoch), "clock_synced": synced,
            "meter_start_wh": meter_start, "meter_stop_wh": meter_stop,
            "energy_wh": max(0, meter_stop - meter_start), "duration_s": max(0, duration_s),
            "peak_power_w": int(peak_w), "stop_reason": stop_reason,
        }

    def _recover(self, now_ms, reading):
        """Close the session the power cut, once the meter has been read (or it stays silent)."""
        if self._boot_ms is None:
            self._boot_ms = now_ms
        if self.metered and reading is None and \
                time.ticks_diff(now_ms, self._boot_ms) < RECOVERY_WAIT_MS:
            return
        cut = self._cut
        self._cut = None
        try:
            meter_stop = cut["m1"]
            if reading is not None and reading.energy_wh >= meter_stop:
                meter_stop = reading.energy_wh  # counted until the cut
            start = cut["t0"]
            self._append(now_ms, journal.KIND_SESSION_END, self._ended_record(
                cut["id"], cut["as"], cut["ai"], start, start + cut["d"],
                clock_synced(start), cut["m0"], meter_stop, cut["d"], cut["pk"], "power_loss"),
                self.store.clear)
        except (KeyError, TypeError) as e:
            self.store.clear()
            self._emit(now_ms, "session", "snapshot unusable, not reported: %r" % (e,))
        self._emit(now_ms, "session", "closed %s after a power loss" % cut.get("id"))

    def _already_ended(self, session_id):
        """True if the outbox still holds the session's ended record: ended() appends it, then
        clears the snapshot, and the power may go in between. Not yet sent at boot: it was
        appended in the same tick as the clear, before the link could send it."""
        needle = ('"session_id": "%s"' % session_id).encode()
        for _, kind, payload in self.outbox.pending():
            if kind == journal.KIND_SESSION_END and needle in payload:
                return True
        return False

    def _append(self, now_ms, kind, record, then=None):
        """Into the outbox, then `then()` (the snapshot's clear after an ended record), and only
        then the report line: an error in reporting (a MemoryError in a full heap) must not come
        between the record and the clear, or the next boot would close the session again."""
        payload = json.dumps(record)
        appended = self.outbox.append(kind, payload.encode()) is not None
        if then is not None:
            then()
        if appended:
            self._emit(now_ms, "outbox", payload)
        else:
            self._emit(now_ms, "outbox", "full: %s record dropped (reported)" % journal.kind_name(kind))
