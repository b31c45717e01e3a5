"""At boot: the session the power cut, back from its snapshot (session_log.py closes it).

Only the boot looks for it (wiring.build_session_log), so this runs once and wiring.py drops it
at once, before the link's modules load (issue 12): its bytes are not on the heap for the run.
"""
import json

import journal


def load(log):
    """The snapshot left by a session the power cut, for `log` (a session_log.SessionLog just
    built) to close: none if its ended record is already in the outbox. Now, at boot, before the
    link can send anything: once sent and acknowledged the ended record is no longer in the
    outbox, and a power_loss copy would follow it to the cloud."""
    store = log.store
    cut = store.load()
    if store.error:
        log._emit(0, "session", "snapshot ignored: " + store.error)
    if cut is not None and _already_ended(log, cut.get("id")):
        cut = None
        log._clear(0)
    log._cut = cut


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
