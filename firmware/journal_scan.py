"""At boot: a journal.Journal opened on its file, its drop tiers and ack watermark read, its
state set (journal.py has no __init__: its bytecode would stay on the heap for the run).

Only the boot opens the outbox (wiring.build_session_log; diag.py in service mode), so this runs
once and wiring.py drops it at once, before the link's modules load (issue 12): its bytes are not
on the heap for the run. The record file itself is scanned by the Journal (it scans again to
repair a failed write); the ack file's format is journal.py's (`Journal._write_ack`).
"""
from micropython import const
import binascii
import struct

import journal

# journal.py's own record kind, its record sizes and limits (a test keeps them one).
_KIND_STATE = const(15)
_KINDS = const(16)
_HDR = const(10)
_OVERHEAD = const(14)
_STATE_REC = const(90)
_PAYLOAD_LIMIT = const(1024)
_MARKER_RESERVE = const(448)

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
    j = journal.Journal()
    _setup(j, path, max_bytes, max_payload, tier, gate, _acked(path + ".ack"))
    j._load()  # the file scanned now
    return j


def _setup(j, path, max_bytes, max_payload, tiers, gate, acked):
    """journal.Journal's state (its __init__'s work, off the heap after the boot). tiers: kind
    -> drop tier; acked: the watermark in `<path>.ack`."""
    if not 0 < max_payload <= _PAYLOAD_LIMIT:
        raise ValueError("max_payload must be 1..%d" % _PAYLOAD_LIMIT)
    if max_bytes < _STATE_REC + _MARKER_RESERVE + 4 * (max_payload + _OVERHEAD):
        raise ValueError("max_bytes too small for max_payload")
    j._ntiers = max(tiers) + 1
    j._tier = tiers
    j.path = path
    j._tmp = path + ".tmp"
    j._ack_path = path + ".ack"
    j._ack_tmp = path + ".ack.tmp"
    j.max_bytes = max_bytes
    j.max_payload = max_payload
    j._hdr = bytearray(_HDR)
    j._crc = bytearray(4)
    j._ackbuf = bytearray(8)
    j._ackseq = memoryview(j._ackbuf)[:4]
    j._buf = bytearray(_PAYLOAD_LIMIT)
    j._mv = memoryview(j._buf)
    j._dropped = [0] * _KINDS
    j._corrupt = 0  # bytes of bad records found on open, cumulative
    # The seq existed: new records must come after it even if the journal was lost.
    j._next_seq = acked + 1
    j._acked = acked  # every seq <= this is acknowledged
    j._size = 0  # bytes of valid records in the file
    j._gen = 0  # bumped when the file is rewritten; pending() iterators follow it
    j._refuse_silent = False  # full without tier-0 records: no rewrite per tier-0 record
    j._repair = False  # a write failed: rescan before the next one
    j._marker_due = False  # corruption found: write a journal_fault record
    j._short = False  # the last _read stopped at the end of the file
    j.discarded_bytes = 0  # cut off the end of the file by the last open
    # flash_gate.FlashGate: with the contactor closed an ack is kept in RAM (the records are
    # not sent again in this boot) and written when it opens; a power cut before that sends
    # them again: at least once, as a lost PUBACK (docs/durability.md).
    j._gate = gate
    j._ack_due = False


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
