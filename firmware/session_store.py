"""Small state files that must survive a power cut: the open session, the command counter,
the remote settings.

Each is written whole to `<path>.tmp` and renamed over `<path>` (atomic on LittleFS), so a
reader finds the old content or the new, never half. The file is the CRC-32 of the JSON text
as 8 hex digits, a newline, then the JSON text; a garbled file is ignored with `error` set.

Write rate (docs/durability.md): `SessionStore.save` at each state change and every 60 s while
a session runs, not faster; an unchanged snapshot is not written again. Measured on LittleFS as
the ESP32 mounts it (4 KiB blocks): a save costs 1.09 block erases, or 0.12 if the file is at
most 128 bytes (stored inline in the directory). Charging 24 h a day that is ~1,600 erases a
day (~210 inline); spread over the free blocks of a 1 MB partition (128 free) that lasts 2.2
years at 10k cycles, 22 at 100k; 2 MB (384 free): 6.5 / >50 years; inline: 17 / 50+ years.
"""
from micropython import const
import binascii
import json

import durable
from durable import write_atomic

_MAX_BYTES = const(1024)  # a snapshot is ~200 bytes; more is a caller's bug
_ENOENT = const(2)  # errno.ENOENT, the same on LittleFS (MicroPython) and POSIX

def _encode(value):
    text = json.dumps(value, separators=(",", ":")).encode()
    if len(text) > _MAX_BYTES:
        raise ValueError("state too large to store")
    return ("%08x\n" % (binascii.crc32(text) & 0xFFFFFFFF)).encode() + text


def _decode(data):
    """The JSON value in `data`, or raises ValueError with a short reason."""
    if len(data) > 9 + _MAX_BYTES:
        raise ValueError("too long")
    if len(data) < 10 or data[8] != 0x0A:
        raise ValueError("no checksum line")
    text = data[9:]
    if data[:8] != ("%08x" % (binascii.crc32(text) & 0xFFFFFFFF)).encode():
        raise ValueError("bad checksum")
    try:
        return json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None


class _Store:
    def __init__(self, path):
        self.path = path
        self.error = None  # why the last load() found nothing usable; for the log
        self._last = None  # bytes last written or read: an unchanged value is not rewritten

    def _save(self, value):
        data = _encode(value)
        if data == self._last:
            return False
        self._last = None  # an error may come after the new file is in place: not known now
        write_atomic(self.path, data)
        self._last = data
        return True

    def _load(self, what):
        """(found, value): found is False when there is no file; value None if garbled."""
        self.error = None
        try:
            f = open(self.path, "rb")
        except OSError as e:
            if e.args[0] == _ENOENT:
                return False, None
            self.error = "%s unreadable: %s" % (what, e)
            return True, None
        try:
            data = f.read(10 + _MAX_BYTES)
        except OSError as e:
            self.error = "%s unreadable: %s" % (what, e)
            return True, None
        finally:
            f.close()
        try:
            value = _decode(data)
        except ValueError as e:
            self.error = "%s garbled (%s), ignored" % (what, e.args[0] if e.args else "?")
            return True, None
        self._last = data
        return True, value

    def _load_dict(self, what):
        found, value = self._load(what)
        if found and value is not None and not isinstance(value, dict):
            self.error = "%s garbled (not an object), ignored" % what
            value = None
        return value

    def clear(self):
        """Remove the file. No file is fine; any other OSError is raised (the file is still there:
        the caller must try again, a snapshot left behind would close its session twice)."""
        self._last = None
        for p in (self.path + ".tmp", self.path):
            durable.remove(p, strict=True)


class SessionStore(_Store):
    """Snapshot of the open session: save(dict) while it runs, load() at boot, clear() when
    it is reported closed. What goes in the dict is the caller's (session id, start meter
    value, last meter value, state...); it must be JSON and at most _MAX_BYTES."""

    def save(self, snapshot):
        """Atomic. False if it equals the last one written (no flash write)."""
        if not isinstance(snapshot, dict):
            raise TypeError("snapshot must be a dict")
        return self._save(snapshot)

    def load(self):
        """The saved dict, or None (no file, or garbled: then `error` says why)."""
        return self._load_dict("session snapshot")


class CounterStore(_Store):
    """The last accepted command counter (replay protection, docs/commands.md). load() is 0
    when the file does not exist, None when it is garbled: the caller should then refuse
    remote commands (fail closed) and report it, never restart from 0."""

    def save(self, counter):
        if type(counter) is not int or counter < 0:
            raise ValueError("counter must be an int >= 0")
        return self._save(counter)

    def load(self):
        found, value = self._load("command counter")
        if not found:
            return 0
        if value is not None and (type(value) is not int or value < 0):
            self.error = "command counter garbled (not a count), ignored"
            value = None
        return value


class SettingsStore(_Store):
    """What remote commands set and a reboot must keep (docs/commands.md): availability and
    the remote current limit, as a dict the charger fills. Written only when a command changes
    a value, at most once per accepted command: ~60 bytes of JSON, stored inline, ~0.1 block
    erase a write (docs/durability.md). `gate` (flash_gate.FlashGate): with the contactor
    closed, or another write in this iteration (the command's counter), the newest settings wait
    in RAM and are written at the gate's next open poll."""

    def __init__(self, path, gate=None):
        super().__init__(path)
        self._gate = gate
        self._held = None  # settings waiting for the contactor to open
        self._due = False  # the gate has our flush

    def save(self, settings):
        """Atomic. False if unchanged (no flash write). With the contactor closed: True, and
        written when it opens (an OSError then goes to the console, the setting holds until
        the next boot)."""
        gate = self._gate
        if gate is not None and (gate.held or gate.spent):  # closed, or a write this iteration
            data = _encode(settings)  # a ValueError now, not at the open
            if data == self._last:
                self._held = None
                return False
            self._held = settings
            if not self._due:
                self._due = True
                gate.defer(self._flush)
            return True
        self._held = None
        return self._save(settings)

    def _flush(self, now_ms):
        self._due = False
        settings = self._held
        self._held = None
        if settings is None:
            return None
        try:
            self._save(settings)
        except OSError as e:
            return "settings not saved to flash (%s): lost at the next boot" % (e,)
        return None

    def load(self):
        """The saved dict, or None (no file, or garbled: then `error` says why)."""
        return self._load_dict("settings")
