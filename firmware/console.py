"""The console: report(), the modules' one callback, printed as `[  s.mmm] source: text` with the
control loop's time (no logging library: micropython-logging took 4.6 KiB of a stock image's heap
and added nothing the line shows, issue 12); the lines a full heap lost, the last faults and why
the pile is held unavailable, for diag.py.

While the contactor is closed (`hold`, set by wiring: the flash gate) a line is not printed at
once: the UART blocks once its 128-byte FIFO is full (86.8 us a byte at 115,200 baud), and a
577-byte record line would stall the loop ~40 ms. Lines wait in a bounded queue and `step(now_ms)`
(once per loop iteration, from main.py's loop) writes whole lines while they fit in what the FIFO
has free by then (it empties 11.5 bytes a ms): a write never blocks. A line longer than the FIFO
goes in FIFO-sized pieces. With the contactor open the queue is written whole, then each line at
once (docs/durability.md).
"""
import sys
import time

from micropython import const

boot_ms = time.ticks_ms()  # the console's time 0; the firmware loads this module first

recent_faults = []  # (ticks_ms, text), the last 8
lines_lost = 0  # report() lines a full heap kept from being printed, said with the next one
unavailable = None  # why the pile is held unavailable (startup.hold_unavailable)

_UART_FIFO = const(128)  # bytes the ESP32's UART takes without blocking
_UART_B_PER_100MS = const(1152)  # 115,200 baud, 10 bits a byte: 11.52 bytes a ms
_ITERATION_MS = const(1000)  # longer than any loop iteration: a FIFO stamp further ahead is stale
_QUEUE_MAX_BYTES = const(2048)  # the longest line (a record, ~1 KiB) fits, with some more
hold = None  # an object with `held` (flash_gate.FlashGate): queue while it is True
_queue = []  # lines (str, each with its newline) not yet written, oldest first
_queued = 0  # their bytes
_head = 0  # bytes of _queue[0] already written
_fifo = 0  # bytes the UART's FIFO may still hold (an upper bound), as of _fifo_ms
_fifo_ms = time.ticks_ms()  # a stamp for _fifo (0 until a write)
lines_dropped = 0  # lines the full queue refused while closed, said when it opens


def _held():
    return hold is not None and hold.held


def _write(line):
    """A line, queued while the contactor is closed, else after what is queued."""
    global _queued, lines_dropped, _fifo, _fifo_ms
    if _held():
        n = len(line)
        if _queued + n > _QUEUE_MAX_BYTES:
            lines_dropped += 1
            return
        _queue.append(line)
        _queued += n
        return
    if _queue or lines_dropped:
        drain()
    sys.stdout.write(line)
    # Open: it may block, and it leaves the FIFO full at the write's end (the clock now, a ms
    # on for the part of one ticks_ms drops), not at the report's now_ms: that is an iteration's
    # start, and a close may come in the next one (host_tests/test_review_loop_flash.py).
    _fifo = _UART_FIFO
    _fifo_ms = time.ticks_add(time.ticks_ms(), 1)


def _free(now_ms):
    """What the FIFO has free at now_ms (it empties at the baud rate)."""
    global _fifo, _fifo_ms
    if _fifo:
        since = time.ticks_diff(now_ms, _fifo_ms)
        if -_ITERATION_MS < since < 0:
            return _UART_FIFO - _fifo  # filled after now_ms (later in this iteration): as it was
        gone = since * _UART_B_PER_100MS // 100
        _fifo = 0 if gone >= _fifo or since < 0 else _fifo - gone
    _fifo_ms = now_ms
    return _UART_FIFO - _fifo


def step(now_ms):
    """Once per loop iteration (main.py): what is queued, all of it with the contactor open,
    within what the UART's FIFO takes at now_ms while it is closed. now_ms is the clock at this
    call, not the iteration's start: a tick that took longer in one iteration than in the next
    would have the next step count the FIFO emptied for the difference and write into bytes
    still in it, blocking with the contactor closed (host_tests/test_review_flashfix.py)."""
    if _queue or lines_dropped:
        drain(now_ms if _held() else None)


def drain(now_ms=None):
    """Write what is queued: all of it (now_ms None: the contactor open), or what fits in the
    UART's FIFO without blocking at now_ms (closed). Once per loop iteration."""
    global _queued, _head, lines_dropped, _fifo, _fifo_ms
    if lines_dropped and now_ms is None:
        note = "console: %d line(s) dropped while the contactor was closed\n" % lines_dropped
        lines_dropped = 0
        _queue.append(note)
        _queued += len(note)
    if not _queue:
        return
    budget = None if now_ms is None else _free(now_ms)
    if budget:
        # What is written now fills the FIFO as of now_ms and a ms on (the part of one ticks_ms
        # drops): the next step counts what left it from then on, never a write's fraction of
        # a ms more (host_tests/test_review_flashfix.py).
        _fifo_ms = time.ticks_add(now_ms, 1)  # budget: now_ms given
    while _queue:
        line = _queue[0]
        rest = len(line) - _head
        if budget is not None and rest > budget:
            # Only a line the FIFO could never take whole goes in pieces, of what is free.
            if len(line) > _UART_FIFO and budget > 0:
                sys.stdout.write(line[_head:_head + budget])
                _head += budget
                _fifo += budget
            return
        sys.stdout.write(line[_head:] if _head else line)
        _queue.pop(0)
        _queued -= len(line)
        _head = 0
        if budget is not None:
            budget -= rest
            _fifo += rest


def _line(now_ms, what, text):
    """One line, stamped with the loop's time (seconds since boot); text is never a format."""
    t = time.ticks_diff(now_ms, boot_ms)
    _write("[%4d.%03d] %s: %s\n" % (t // 1000, t % 1000, what, text))


def report(now_ms, what, text):
    """The modules' report callback: one line from `what` (the source: pilot, charger, ...)."""
    global lines_lost
    try:
        if lines_lost:
            _line(now_ms, "main", "%d line(s) lost before this one: the heap was full" % lines_lost)
            lines_lost = 0
        _line(now_ms, what, text)
    except MemoryError:
        # A full or fragmented heap: the line is lost, not the session (docs/architecture.md).
        lines_lost += 1
    if what == "fault":
        if len(recent_faults) >= 8:
            recent_faults.pop(0)
        recent_faults.append((now_ms, text))

