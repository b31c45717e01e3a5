"""Append-only record journal on flash: what must reach the cloud survives network and power.

The MQTT link appends a record, publishes it with QoS 1 and calls `ack(seq)` on the PUBACK;
after a reconnect it publishes `pending()` again, in order. A power cut at any byte loses at
most the record being appended (its `append` had not returned). Format, full policy and flash
wear: docs/durability.md.

Record (little-endian), CRC-32 (binascii.crc32) over header + payload:
    magic "RJ" | kind u8 | 0 u8 | length u16 | seq u32 | payload | crc32 u32
Kinds 1..14 are the caller's, 0 is reserved, 15 is the journal's own state (next seq, ack
watermark, counters), written at each compaction. The ack watermark lives in `<path>.ack`
(seq u32 | crc32 u32), replaced by temp + rename: 8 bytes stay inline in LittleFS metadata,
~13 times less flash wear than appending an ack record (measured, docs/durability.md).
"""
from micropython import const
import binascii
import os
import struct

import durable

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from flash_gate import FlashGate

KIND_SESSION_END = const(1)
KIND_FAULT = const(2)
KIND_JOURNAL_FAULT = const(3)  # written by the journal: records lost (full) or flash corrupt
KIND_SESSION_START = const(4)
KIND_METER = const(5)
KIND_STATUS = const(6)
_KIND_STATE = const(15)
_KINDS = const(16)
KIND_NAMES = ("reserved", "session_end", "fault", "journal_fault", "session_start", "meter", "status")

_MAGIC = const(0x4A52)  # b"RJ" little-endian
_HDR = const(10)
_OVERHEAD = const(14)  # header + crc
_HDR_FMT = const("<HBBHI")
_STATE_FMT = const("<19I")  # next_seq, acked, corrupt_bytes, dropped[16]
_STATE_LEN = const(76)
_STATE_REC = const(90)
# Largest record payload the reader accepts, whatever max_payload was when it was written.
_PAYLOAD_LIMIT = const(1024)
# Room kept for a journal_fault record: with every counter at 2**32-1 it is ~350 bytes.
_MARKER_RESERVE = const(448)
_U32 = const(0xFFFFFFFF)
_ENOENT = const(2)  # errno values, the same on LittleFS (MicroPython) and POSIX
_EIO = const(5)

# The largest session record every input rule allows is ~810 bytes (a 64-character pile_id twice,
# a 64-character auth_id of '"' escaped to 128, every number at its schema maximum:
# host_tests/test_review_records.py): the outbox takes what the reader does.
DEFAULT_MAX_PAYLOAD = const(1024)

def kind_name(kind):
    return KIND_NAMES[kind] if kind < len(KIND_NAMES) else "kind%d" % kind


class Journal:
    """Records of kinds 1..14 (not KIND_JOURNAL_FAULT) until acknowledged; `max_bytes` bounds
    the file. Opened by journal_scan.load (its defaults, the drop tiers), which sets its state
    and scans the file (_load)."""

    # Set by journal_scan.load (boot code, dropped after it; annotations only: no code on the board).
    _ntiers: int
    _tier: bytearray
    path: str
    _tmp: str
    _ack_path: str
    _ack_tmp: str
    max_bytes: int
    max_payload: int
    _hdr: bytearray
    _crc: bytearray
    _ackbuf: bytearray
    _ackseq: memoryview
    _buf: bytearray
    _mv: memoryview
    _dropped: list
    _corrupt: int
    _next_seq: int
    _acked: int
    _size: int
    _gen: int
    _refuse_silent: bool
    _repair: bool
    _marker_due: bool
    _short: bool
    discarded_bytes: int
    _gate: "FlashGate | None"
    _ack_due: bool

    # -- public ---------------------------------------------------------------------------

    @property
    def next_seq(self):
        return self._next_seq

    @property
    def acked(self):
        return self._acked

    def dropped(self, kind):
        return self._dropped[kind]

    def append(self, kind, payload):
        """Durable on return: seq (int). None if there was no room for it even after dropping
        lower tiers (counted, and reported unless tier 0). OSError from the flash propagates;
        the journal repairs itself."""
        if not 0 < kind < _KIND_STATE or kind == KIND_JOURNAL_FAULT:
            raise ValueError("kind must be 1..14, not KIND_JOURNAL_FAULT")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes")
        n = len(payload)
        if n > self.max_payload:
            raise ValueError("payload longer than max_payload")
        if self._repair:
            self._load()
        if self._refuse_silent and not self._tier[kind]:
            self._dropped[kind] = min(self._dropped[kind] + 1, _U32)  # stored at next rewrite
            return None
        rec = _OVERHEAD + n
        # The reserve keeps room for a journal_fault record: reporting a loss never costs one.
        if self._size + rec > self.max_bytes - _MARKER_RESERVE and not self._rewrite(kind, rec):
            return None
        seq = self._next_seq
        self._append_record(kind, seq, payload, n)
        self._next_seq = seq + 1
        self._size += rec
        return seq

    def ack(self, seq):
        """Acknowledge every record with seq <= `seq` (QoS 1 PUBACKs come in publish order,
        MQTT 3.1.1 section 4.6). Durable on return."""
        if not 0 <= seq < self._next_seq:
            raise ValueError("ack of a seq never appended")
        if seq <= self._acked:
            return
        gate = self._gate
        if gate is not None and gate.held:
            self._acked = seq
            self._refuse_silent = False
            if not self._ack_due:
                self._ack_due = True
                gate.defer(self._flush_ack)
            return
        self._write_ack(seq)

    def _flush_ack(self, now_ms):
        """The flash gate, once the contactor opened: the ack watermark kept in RAM."""
        if not self._ack_due:
            return None
        try:
            self._write_ack(self._acked)
        except OSError as e:
            self._ack_due = False
            return "outbox ack not written (%s): those records may go again" % (e,)
        return None

    def _write_ack(self, seq):
        self._ack_due = False
        buf = self._ackbuf
        struct.pack_into("<I", buf, 0, seq)
        struct.pack_into("<I", buf, 4, binascii.crc32(self._ackseq) & _U32)
        f = open(self._ack_tmp, "wb")
        try:
            f.write(buf)
        finally:
            durable.close(f)
        os.rename(self._ack_tmp, self._ack_path)  # atomic: the old watermark or the new
        self._acked = seq
        self._refuse_silent = False

    def pending(self):
        """Yields (seq, kind, payload) of the unacknowledged records, oldest first, one read at
        a time. Safe to append/ack between steps (the file is reopened for every record)."""
        gen = self._gen
        off = 0
        last = 0
        while True:
            if gen != self._gen:  # rewritten: start again, skip what was already yielded
                gen = self._gen
                off = 0
            if off >= self._size:
                return
            rec = self._read_at(off)
            if rec is None:
                self._repair = True  # went bad since it was scanned
                return
            kind, seq, n = rec
            off += _OVERHEAD + n
            if 0 < kind < _KIND_STATE and seq > self._acked and seq > last:
                last = seq
                yield seq, kind, bytes(self._mv[:n])

    def backlog(self):
        """(records, bytes) not yet acknowledged: the file scanned (diag.py's view, at Ctrl-C)."""
        return self._stats()[:2]

    # -- reading ---------------------------------------------------------------------------

    def _read(self, f):
        """Next record from f: (kind, seq, n) with the payload in self._buf, or None at the end
        of the file or at a damaged record."""
        hdr = self._hdr
        self._short = True  # the file ends inside the record: a torn append
        if f.readinto(hdr) != _HDR:
            return None
        magic, kind, zero, n, seq = struct.unpack_from(_HDR_FMT, hdr, 0)
        self._short = False
        if magic != _MAGIC or zero or kind >= _KINDS or n > _PAYLOAD_LIMIT:
            return None
        if kind == 0 or (kind == _KIND_STATE and n != _STATE_LEN):
            return None
        body = self._mv[:n]
        self._short = True
        if n and f.readinto(body) != n:
            return None
        if f.readinto(self._crc) != 4:
            return None
        self._short = False
        crc = binascii.crc32(body, binascii.crc32(hdr)) & _U32
        if crc != struct.unpack_from("<I", self._crc, 0)[0]:
            return None
        return kind, seq, n

    def _read_at(self, off):
        try:
            f = open(self.path, "rb")
        except OSError:
            return None
        try:
            f.seek(off)
            return self._read(f)
        finally:
            f.close()

    def _records(self, f):
        """The records of an open file, in order, up to the scanned size."""
        end = self._size
        off = 0
        while off < end:
            rec = self._read(f)
            if rec is None:
                # Went bad since the scan: rescan (and report) before anything is rewritten.
                self._repair = True
                raise OSError(_EIO)
            off += _OVERHEAD + rec[2]
            yield rec

    def _load(self):
        """Scan the file; cut a torn or damaged end off by rewriting the good records."""
        durable.remove(self._tmp)  # a rewrite cut short by a power cut; the old file is whole
        durable.remove(self._ack_tmp)
        self._repair = False
        self._gen += 1
        try:
            length = os.stat(self.path)[6]
            f = open(self.path, "rb")
        except OSError as e:
            if e.args[0] != _ENOENT:
                raise  # an unreadable journal is not an empty one
            length = 0
            f = None
        off = 0
        self._short = False
        has_state = damaged = False
        try:
            last_data = 0
            while off < length:
                rec = self._read(f)
                if rec is None:
                    break
                kind, seq, n = rec
                if kind != _KIND_STATE and seq <= last_data:
                    break  # seqs only grow: a valid CRC over nonsense
                last_data = self._note(kind, seq, last_data)
                has_state = has_state or kind == _KIND_STATE
                off += _OVERHEAD + n
            # A power cut can only leave the last record short (on LittleFS not even that:
            # appended data shows after close). A complete record that fails is damage.
            damaged = off < length and not self._short
            if damaged:
                self._resync(f, off + 1, length)
        finally:
            if f is not None:
                f.close()
        self._size = off
        self.discarded_bytes = length - off
        if damaged:
            self._corrupt = min(self._corrupt + self.discarded_bytes, _U32)
            self._marker_due = True
        # A state record in the file keeps its room reserved: a rewrite never has to drop a
        # record to make room for it.
        if self.discarded_bytes or not has_state:
            self._rewrite(0, 0)

    def _note(self, kind, seq, last_data):
        """Seq and counters from a valid record (the one just read into self._buf)."""
        if kind == _KIND_STATE:
            st = struct.unpack_from(_STATE_FMT, self._buf, 0)
            self._next_seq = max(self._next_seq, st[0])
            self._acked = max(self._acked, st[1])
            self._corrupt = max(self._corrupt, st[2])
            for k in range(_KINDS):  # counters only grow; memory may be ahead
                self._dropped[k] = max(self._dropped[k], st[3 + k])
            return last_data
        self._next_seq = max(self._next_seq, seq + 1)
        return seq

    def _resync(self, f, pos, length):
        """Past damage: find the later valid records, only so that seqs and counters never go
        back. They are not returned (they follow a damaged one); the report says so."""
        chunk = bytearray(64)
        while pos + _OVERHEAD <= length:
            f.seek(pos)
            got = f.readinto(chunk)
            i = bytes(chunk[:got]).find(b"RJ")
            if i < 0:
                pos += max(got - 1, 1)
                continue
            f.seek(pos + i)
            rec = self._read(f)
            if rec is None:
                pos += i + 1
            else:
                self._note(rec[0], rec[1], 0)
                pos += i + _OVERHEAD + rec[2]

    def _stats(self):
        """(count, bytes, [bytes per tier], journal_fault bytes) of the unacknowledged records."""
        count = live = marker = 0
        tiers = [0] * self._ntiers
        if self._size:
            f = open(self.path, "rb")
            try:
                for kind, seq, n in self._records(f):
                    if 0 < kind < _KIND_STATE and seq > self._acked:
                        count += 1
                        live += _OVERHEAD + n
                        if kind == KIND_JOURNAL_FAULT:
                            marker += _OVERHEAD + n
                        else:
                            tiers[self._tier[kind]] += _OVERHEAD + n
            finally:
                f.close()
        return count, live, tiers, marker

    # -- writing ---------------------------------------------------------------------------

    def _write_record(self, f, kind, seq, payload, n):
        hdr = self._hdr
        struct.pack_into(_HDR_FMT, hdr, 0, _MAGIC, kind, 0, n, seq)
        crc = binascii.crc32(payload, binascii.crc32(hdr)) & _U32
        struct.pack_into("<I", self._crc, 0, crc)
        f.write(hdr)
        if n:
            f.write(payload)
        f.write(self._crc)

    def _append_record(self, kind, seq, payload, n):
        try:
            f = open(self.path, "ab")
            try:
                self._write_record(f, kind, seq, payload, n)
            finally:
                durable.close(f)
        except OSError:
            self._repair = True  # part of the record may be on flash
            raise

    def _marker_payload(self, dropped, corrupt):
        parts = []
        lost = False
        for kind in range(1, _KIND_STATE):
            if dropped[kind]:
                parts.append('"%s":%d' % (kind_name(kind), dropped[kind]))
                lost = lost or self._tier[kind] > 0
        return ('{"fault":"%s","corrupt_bytes":%d,"dropped":{%s}}' % (
            "journal_overflow" if lost or not corrupt else "journal_corrupt", corrupt,
            ",".join(parts))).encode()

    def _rewrite(self, new_kind, new_len):
        """Copy the unacknowledged records to a new file and rename it over the old one,
        dropping records if `new_len` more bytes would not fit. False if the new record is
        dropped instead (nothing of its tier or below left to make room)."""
        _, live, tiers, marker_live = self._stats()
        # journal_fault records live in the reserve, outside the budget.
        need = live - marker_live + new_len - (self.max_bytes - _STATE_REC - _MARKER_RESERVE)
        dropped = list(self._dropped)
        marker = self._marker_due
        accept = True
        if new_len:
            t = self._tier[new_kind]
            if need > sum(tiers[:t + 1]):  # never push out a record of a higher tier
                accept = False
                dropped[new_kind] = min(dropped[new_kind] + 1, _U32)
                marker = marker or t > 0
                need -= new_len
        targets = [0] * self._ntiers  # bytes to drop per tier, oldest first
        for t in range(self._ntiers):
            if need <= 0:
                break
            # Tier 0: an eighth more than needed, so a full journal is not rewritten per record.
            targets[t] = min(tiers[t], need + (0 if t else self.max_bytes // 8))
            need -= targets[t]
            marker = marker or (t > 0 and targets[t] > 0)
        size = 0
        next_seq = self._next_seq
        src = None
        out = open(self._tmp, "wb")
        try:
            if self._size:
                src = open(self.path, "rb")
            if src is not None:
                freed = [0] * self._ntiers
                for kind, seq, n in self._records(src):
                    if not 0 < kind < _KIND_STATE or seq <= self._acked:
                        continue
                    rec = _OVERHEAD + n
                    if kind == KIND_JOURNAL_FAULT:
                        if marker:
                            continue  # superseded: the new one carries the totals
                    else:
                        t = self._tier[kind]
                        if freed[t] < targets[t]:
                            freed[t] += rec
                            dropped[kind] = min(dropped[kind] + 1, _U32)
                            continue
                    out.write(self._hdr)  # the record as read, CRC included
                    out.write(self._mv[:n])
                    out.write(self._crc)
                    size += rec
            if marker:
                payload = self._marker_payload(dropped, self._corrupt)
                self._write_record(out, KIND_JOURNAL_FAULT, next_seq, payload, len(payload))
                next_seq += 1
                size += _OVERHEAD + len(payload)
            struct.pack_into(_STATE_FMT, self._buf, 0, next_seq, self._acked, self._corrupt,
                             *dropped)
            self._write_record(out, _KIND_STATE, next_seq, self._mv[:_STATE_LEN], _STATE_LEN)
            size += _STATE_REC
        finally:
            if src is not None:
                src.close()
            durable.close(out)
        durable.replace(self._tmp, self.path)  # atomic on LittleFS: old file or new, never half
        self._dropped = dropped
        self._next_seq = next_seq
        self._size = size
        self._gen += 1
        self._marker_due = False
        self._refuse_silent = not accept and not self._tier[new_kind]
        return accept
