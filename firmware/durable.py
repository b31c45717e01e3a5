"""Flash writes that survive a power cut: closed (and fsynced) before a rename makes them live.

LittleFS commits a file on close and renames atomically; a host needs `os.fsync`, a port
without it gets `os.sync()` (docs/durability.md).
"""
import os

from micropython import const

_ENOENT = const(2)  # errno.ENOENT, the same on LittleFS (MicroPython) and POSIX

_fsync = getattr(os, "fsync", None)
_sync = getattr(os, "sync", None)
written = 0  # commits through here since boot: flash_gate.FlashGate.spent compares it per iteration


def close(f):
    """Flush and close `f` so its bytes are on flash (an unclosed file may lose its tail)."""
    global written
    written += 1
    f.flush()
    if _fsync is not None:
        _fsync(f.fileno())
    f.close()
    if _fsync is None and _sync is not None:
        _sync()


def replace(tmp, path):
    """Rename the closed `tmp` over `path`: a reader finds the old file or the new, never half."""
    global written
    written += 1
    os.rename(tmp, path)
    if _fsync is None and _sync is not None:
        _sync()


def write_atomic(path, data):
    """Write `data` to `path` so that a power cut leaves the old content or the new."""
    tmp = path + ".tmp"
    f = open(tmp, "wb")
    try:
        f.write(data)
        f.flush()
        if _fsync is not None:
            _fsync(f.fileno())
    finally:
        f.close()  # LittleFS commits the file here
    replace(tmp, path)


def remove(path, strict=False):
    """Remove `path` if it is there. strict: an error other than "no such file" is raised (the
    file is still there, and the caller must know)."""
    try:
        os.remove(path)
    except OSError as e:
        if strict and e.args[0] != _ENOENT:
            raise
