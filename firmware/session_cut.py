"""The session a power cut, closed at boot by the log's poll (session_log.SessionLog._recover)
once the meter has been read, with the contactor open: boot-time code, loaded only by a boot
that found a cut session (session_restore.load) and dropped once it is closed, so a pile the
power did not cut never has it on the heap (issue 12). It imports no session_log: the log hands
itself and its clock check in (the firmware's imports go one way, test_firmware_layout.py).
"""
import json
import time

from micropython import const

import journal

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


def recover(log, now_ms, reading, cut, clock_synced):
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
        if clock_synced(wall) and clock_synced(snap) and wall >= snap:
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
            clock_synced(start), cut["m0"], meter_stop, energy, duration, pk, "power_loss",
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
