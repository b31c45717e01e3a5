"""At boot: a session_log.SessionLog opened, its state set, and the session the power cut back
from its snapshot, for the log to close (session_log.py has no __init__: its bytecode would stay
on the heap for the run); session_cut.py closes that session, by the log's poll once the meter
has been read.

Only the boot opens the session log (wiring.build_session_log), so load() runs once and wiring.py
drops this module at once, before the link's modules load (issue 12): its bytes are not on the
heap for the run.
"""
import json
import time

from micropython import const

import journal
import session_log

# Snapshots while a session runs: every 60 s at most (docs/durability.md: a <=128-byte snapshot
# every 60 s costs ~0.12 block erases, decades of wear on a 1 MB partition).
_DEFAULT_CHECKPOINT_S = const(60)
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
