"""The console: report(), the modules' one callback, printed through `logging`; the lines a full
heap lost, the last faults and why the pile is held unavailable, for diag.py."""
import logging
import time

boot_ms = time.ticks_ms()  # the console's time 0; the firmware loads this module first

# Sources whose lines say something is wrong; the rest are INFO.
_WARNING_SOURCES = ("config", "fault", "meter", "outbox", "storage")

recent_faults = []  # (ticks_ms, text), the last 8
lines_lost = 0  # report() lines a full heap kept from being printed, said with the next one
unavailable = None  # why the pile is held unavailable (main.hold_unavailable)


class _Console(logging.Handler):
    """micropython-logging hands each record here: one line per transition, stamped with the
    control loop's time (seconds since boot), the source as the logger's name."""

    now_ms = 0

    def emit(self, record):
        t = time.ticks_diff(_Console.now_ms, boot_ms)
        # micropython-lib's logging (mip, manifest.py) hands the text formatted as record.message;
        # PyPI's micropython-logging (make flash) and CPython keep msg and args.
        text = record.message if hasattr(record, "message") else record.msg % record.args
        print("[%4d.%03d] %s: %s" % (t // 1000, t % 1000, record.name, text))


_console = _Console()
_sources = set()  # loggers given the console handler


def report(now_ms, what, text):
    """The modules' report callback: a record on the logger named after the source."""
    global lines_lost
    try:
        if lines_lost:
            _log(now_ms, "main", "%d line(s) lost before this one: the heap was full" % lines_lost)
            lines_lost = 0
        _log(now_ms, what, text)
    except MemoryError:
        # A full or fragmented heap: the line is lost, not the session (docs/architecture.md).
        lines_lost += 1
    if what == "fault":
        if len(recent_faults) >= 8:
            recent_faults.pop(0)
        recent_faults.append((now_ms, text))


def _log(now_ms, what, text):
    """Loggers get the console handler here: micropython-logging does not propagate to the root."""
    log = logging.getLogger(what)
    if what not in _sources:
        _sources.add(what)
        log.addHandler(_console)
        log.setLevel(logging.INFO)
        log.propagate = False
    _Console.now_ms = now_ms
    log.log(logging.WARNING if what in _WARNING_SOURCES else logging.INFO, "%s", text)
