"""At boot: a session_log.SessionLog opened, its state set, and the session the power cut back
from its snapshot, for the log to close (session_log.py has no __init__: its bytecode would stay
on the heap for the run); then that session closed (recover), by the log's poll once the meter
has been read.

Only the boot opens the session log (wiring.build_session_log), so load() runs once and wiring.py
drops this module at once, before the link's modules load (issue 12): its bytes are not on the
heap for the run. Only a boot that found a cut session imports it again, for recover() (with the
contactor open: SessionLog.poll), and drops it once that session is closed.
"""
import json
import time

from micropython import const

import journal
import session_log

# Snapshots while a session runs: every 60 s at most (docs/durability.md: a <=128-byte snapshot
# every 60 s costs ~0.12 block erases, decades of wear on a 1 MB partition).
_DEFAULT_CHECKPOINT_S = const(60)
# At boot, wait this long for the meter's first checked reading (one the guard judged against
# another: docs/meters.md) before closing a cut session without it.
_RECOVERY_WAIT_MS = const(10000)
# Power no meter may show (meter._MAX_POWER_W, its jump guard): a power cut's duration is
# at least the energy after the last snapshot at this power.
_MAX_POWER_W = const(50000)
# A power cut comes at most one checkpoint interval (plus this, for a late tick and a meter poll)
# after the last snapshot: it bounds both the energy a boot reading may add (at _MAX_POWER_W)
# and the duration a power cut's record may add after the snapshot.
_RECOVERY_SLACK_S = const(10)
# With a flash gate no snapshot is written while the contactor is closed (docs/durability.md):
# a cut may come any time after the last one. A boot reading is then billed up to this long at
# _MAX_POWER_W after it (a week: 8.4 MWh, against a meter swapped while the pile was off).
_CLOSED_MAX_S = const(604800)


def load(pile_id, boot, outbox, store, connector=1, metered=True, checkpoint_s=_DEFAULT_CHECKPOINT_S,
         wall=time.time, report=None, gate=None, linked=True):
    """The session log of boot number `boot`: records into `outbox` (a journal.Journal), the open
    session's snapshot in `store` (a session_store.SessionStore). gate: a flash_gate.FlashGate;
    with it nothing is written while the contactor is closed: checkpoints, retries and clears
    wait for it to open (docs/durability.md). linked: an MQTT link drains the outbox (config.json
    has an mqtt section); without one no ack ever comes, so a power cut's record holds no
    contactor back (unacked_recovery).
    The snapshot left by a session the power cut is found now, at boot, before the link can send
    anything: none if its ended record is already in the outbox (once sent and acknowledged it is
    no longer there, and a power_loss copy would follow it to the cloud)."""
    log = session_log.SessionLog()
    log.pile_id = pile_id
    log.linked = linked
    log._gate = gate
    log.boot = boot
    log.outbox = outbox
    log.store = store
    log.connector = connector
    log.metered = metered
    log.checkpoint_ms = checkpoint_s * 1000
    log._wall = wall
    log._report = report
    log._seq = 0
    log._checkpoint_at = 0
    log._checkpoint_pk = 0
    log._checkpoint_mr = 0
    log._clear_due = False
    log._unsent = []
    log._retry_at = 0
    log._snapshot_error = None
    log.too_long = 0
    log._cut = None
    log._boot_ms = None
    log._recovered_seq = None
    log._recovered_ms = 0
    log._recover_failed = False
    log.unacked_recovery = False
    cut = store.load()
    if store.error:
        log._emit(0, "session", "snapshot ignored: " + store.error)
    if cut is not None and _already_ended(log, cut.get("id")):
        cut = None
        log._clear(0)
    log._cut = cut
    return log


def _already_ended(log, session_id):
    """True if the outbox still holds the session's ended record: ended() appends it, then
    clears the snapshot, and the power may go in between. Not yet sent at boot: it was
    appended in the same tick as the clear, before the link could send it."""
    try:
        for _, kind, payload in log.outbox.pending():
            if kind == journal.KIND_SESSION_END and _session_id(payload) == session_id:
                return True
    except OSError as e:  # unreadable: a power_loss copy (a conflict the cloud shows) beats a loss
        log._emit(0, "storage", "outbox unreadable at boot (%s)" % (e,))
    return False


def _session_id(payload):
    """The session_id of an outbox record (our own JSON); None if it cannot be read."""
    try:
        record = json.loads(payload)
    except ValueError:
        return None
    return record.get("session_id") if isinstance(record, dict) else None


def recover(log, now_ms, reading, cut):
    """SessionLog.poll's, with the contactor open: close the session the power cut (its snapshot
    `cut`, log._cut), once the meter has been read (or it stays silent).
    The cut's time is not known: stop_time and duration_s are the best bound the snapshot
    and the meter give, flagged in `estimated` (docs/telemetry.md)."""
    if log._boot_ms is None:
        log._boot_ms = now_ms
    if reading is not None and not getattr(reading, "checked", True):
        reading = None  # the first after boot, judged against nothing (docs/meters.md)
    if log.metered and reading is None and \
            time.ticks_diff(now_ms, log._boot_ms) < _RECOVERY_WAIT_MS:
        return
    log._cut = None
    try:
        m1 = cut["m1"]
        meter_stop = m1
        stale = log.metered
        # The cut came at most this long after the snapshot: no later reading can be billed
        # for more than it, nor its duration grow by more (a wrong energy is worse than stale).
        after_s = log.checkpoint_ms // 1000 + _RECOVERY_SLACK_S if log._gate is None \
            else _CLOSED_MAX_S
        # A clock set now and at the snapshot (a watchdog reset keeps the RTC, NTP may have
        # answered): the time since the snapshot bounds it better.
        wall = log._wall()
        snap = cut["t0"] + cut["d"]
        if session_log.clock_synced(wall) and session_log.clock_synced(snap) and wall >= snap:
            after_s = min(after_s, wall - snap + _RECOVERY_SLACK_S)
        if reading is not None:
            if getattr(reading, "epoch", 0) == 0 and \
                    m1 <= reading.energy_wh <= m1 + _MAX_POWER_W * after_s // 3600:
                meter_stop = reading.energy_wh  # counted until the cut
                stale = False
            else:
                log._emit(now_ms, "meter", "reading at boot not billed for %s: %r" % (
                    cut.get("id"), reading))
        duration = cut["d"]
        pk = cut["pk"]
        estimated = ["stop_time", "duration_s"]
        after = meter_stop - m1  # Wh after the last snapshot: at least this long at the peak
        if after > 0:
            duration += min(after_s, after * 3600 // (pk if 0 < pk < _MAX_POWER_W else _MAX_POWER_W))
            estimated.append("peak_power_w")  # what the snapshot saw; more may have come after
        energy = cut.get("mc", 0) + meter_stop - cut.get("ms", cut["m0"])
        start = cut["t0"]
        record = log._ended_record(
            cut["id"], cut["as"], cut["ai"], start, start + duration,
            session_log.clock_synced(start), cut["m0"], meter_stop, energy, duration, pk, "power_loss",
            cut.get("mr", 0), stale, estimated)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        log._clear(now_ms)
        log._emit(now_ms, "session", "snapshot unusable, not reported: %r" % (e,))
        return
    seq = getattr(log.outbox, "next_seq", None)
    log._append(now_ms, journal.KIND_SESSION_END, json.dumps(record), log._clear)
    if log.linked and seq is not None and getattr(log.outbox, "next_seq", None) == seq + 1:
        log._recovered_seq = seq
        log._recovered_ms = now_ms
    log._emit(now_ms, "session", "closed %s after a power loss" % cut.get("id"))
