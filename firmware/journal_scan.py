"""At boot: a journal.Journal opened on its file, its drop tiers and ack watermark read.

Only the boot opens the outbox (wiring.build_session_log; diag.py in service mode), so this runs
once and wiring.py drops it at once, before the link's modules load (issue 12): its bytes are not
on the heap for the run. The record file itself is scanned by the Journal (it scans again to
repair a failed write); the ack file's format is journal.py's (`Journal._write_ack`).
"""
from micropython import const
import binascii
import struct

import journal

_KIND_STATE = const(15)  # journal.py's own record kind (a test keeps them one)

_U32 = const(0xFFFFFFFF)
_ENOENT = const(2)  # errno.ENOENT, the same on LittleFS (MicroPython) and POSIX
# docs/telemetry.md: room for at least 200 session/ended records of about 400 bytes.
_DEFAULT_MAX_BYTES = const(98304)
# Dropped first to last when full, oldest first within a tier (docs/telemetry.md, "outbox").
# Tier 0 goes counted only; any other drop is reported by a journal_fault record. Kinds not
# listed belong to the last tier.
DEFAULT_TIERS = ((journal.KIND_METER, journal.KIND_STATUS), (journal.KIND_FAULT,),
                 (journal.KIND_SESSION_START,), (journal.KIND_SESSION_END,))


def load(path, max_bytes=_DEFAULT_MAX_BYTES, max_payload=journal.DEFAULT_MAX_PAYLOAD,
                 tiers=DEFAULT_TIERS, gate=None):
    """The journal at `path`: records of kinds 1..14 (not KIND_JOURNAL_FAULT) until
    acknowledged; `max_bytes` bounds the file. When it is full, records are dropped by `tiers`
    (see DEFAULT_TIERS). OSError if the file or its ack file cannot be read."""
    if len(tiers) < 2:
        raise ValueError("tiers: at least the silent one and a reported one")
    tier = bytearray([len(tiers) - 1] * (_KIND_STATE + 1))  # kind -> tier
    for t, kinds in enumerate(tiers):
        for kind in kinds:
            if not 0 < kind < _KIND_STATE or kind == journal.KIND_JOURNAL_FAULT or (
                    t == 0 and kind in (journal.KIND_SESSION_END, journal.KIND_FAULT)):
                raise ValueError("kind %d cannot be in tier %d" % (kind, t))
            tier[kind] = t
    return journal.Journal(path, max_bytes, max_payload, tier, gate, _acked(path + ".ack"))


def _acked(path):
    """The ack watermark in `<path>.ack` (seq u32 | crc32 u32): 0 if there is none, or if it is
    garbled (the state record's older watermark holds, records come again)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        if e.args[0] != _ENOENT:
            raise
        return 0
    try:
        data = f.read(8)
    finally:
        f.close()
    if len(data) != 8:
        return 0
    seq, crc = struct.unpack_from("<II", data, 0)
    return seq if binascii.crc32(data[:4]) & _U32 == crc else 0
