"""The chip model's flash counting (MicroPython), for sim/chip_rom.py and sim/chip_ota.py: an
`open` and an `os` for the firmware that record what it writes to flash, their own C work not
counted (each call is one native call through chipmark.excluded: on a pile that work is
LittleFS's, which the model adds as flash time, pilehost/chipmodel.py flash_ops)."""
import builtins
import os as _os
import sys

import chipmark

_excluded = chipmark.excluded  # a native callable: binds self, costs a native call
_open = builtins.open
_wrote = [None]  # install()'s wrote, kept here rather than on each file (one attribute fewer to allocate)


class _Written:
    """A file open for writing: its bytes counted; at its close, install()'s wrote([path, mode,
    bytes written, size before])."""

    def __init__(self, f, path, mode, before):
        self._f = f
        self._rec = [path, mode, 0, before]

    def write(self, data, *args):
        n = self._f.write(data, *args)
        self._rec[2] += n or 0
        return n

    def flush(self):
        return self._f.flush()

    def fileno(self):
        return self._f.fileno()

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def read(self, *args):
        return self._f.read(*args)

    def close(self):
        if self._rec is not None:
            _wrote[0](self._rec)
            self._rec = None
        return self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


for _name in ("write", "flush", "fileno", "seek", "tell", "read", "close", "__enter__", "__exit__"):
    setattr(_Written, _name, _excluded(getattr(_Written, _name)))


def _size(path):
    try:
        return _os.stat(path)[6]
    except OSError:
        return 0


class _Os:
    """`os` for the firmware: every call one native call; rename and remove counted (LittleFS
    metadata commits)."""

    def __getattr__(self, name):
        attr = getattr(_os, name)
        return _excluded(attr) if callable(attr) else attr


def install(wrote, changed):
    """From now on the firmware's open() and `os` count: wrote([path, mode, bytes written, size
    before]) at each written file's close, changed(["rename"|"remove", path]) at each rename or
    remove. Call it before the firmware's modules import os."""
    _wrote[0] = wrote

    def open_counted(path, mode="r", *args):
        f = _open(path, mode, *args)
        if "w" in mode or "a" in mode or "+" in mode:
            return _Written(f, path, mode, _size(path) if "a" in mode or "+" in mode else 0)
        return f

    def rename(a, b):
        changed(["rename", b])
        return _os.rename(a, b)

    def remove(path):
        changed(["remove", path])
        return _os.remove(path)

    _Os.rename = staticmethod(_excluded(rename))
    _Os.remove = staticmethod(_excluded(remove))
    builtins.open = _excluded(open_counted)
    sys.modules["os"] = _Os()
