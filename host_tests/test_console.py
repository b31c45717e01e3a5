"""console.report: every line the firmware prints goes through `logging` (micropython-logging on the
board), so a technician can add a handler (a file, a socket) without touching the modules."""
import logging
import time

import console


class Catch(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append((record.name, record.levelno, record.msg % record.args))


def test_a_line_is_a_record_on_the_sources_logger_and_printed_with_the_loops_time(capsys):
    now = time.ticks_add(console.boot_ms, 12345)
    console.report(now, "pilot", "B -> C")
    assert capsys.readouterr().out == "[  12.345] pilot: B -> C\n"
    catch = Catch()
    logging.getLogger("meter").addHandler(catch)
    try:
        console.report(now, "meter", "no reply")
        console.report(now, "meter", "100% odd text %s")  # the text is an argument, never a format
    finally:
        logging.getLogger("meter").removeHandler(catch)
    assert catch.records == [("meter", logging.WARNING, "no reply"),
                             ("meter", logging.WARNING, "100% odd text %s")]
    assert capsys.readouterr().out.splitlines() == ["[  12.345] meter: no reply",
                                                    "[  12.345] meter: 100% odd text %s"]


def test_ordinary_transitions_are_info():
    catch = Catch()
    logging.getLogger("charger").addHandler(catch)
    try:
        console.report(console.boot_ms, "charger", "idle -> charging")
    finally:
        logging.getLogger("charger").removeHandler(catch)
    assert catch.records == [("charger", logging.INFO, "idle -> charging")]


def test_a_full_heap_loses_the_line_not_the_pile(capsys, monkeypatch):
    """A MemoryError building a line (the commonest allocation; a soak in a tight heap met it
    there) is not an internal error: the line is lost and said so with the next one."""
    now = time.ticks_add(console.boot_ms, 2000)
    real_emit = console._Console.emit

    def heap_full(self, record):
        raise MemoryError("memory allocation failed, allocating 376 bytes")

    monkeypatch.setattr(console._Console, "emit", heap_full)
    console.report(now, "fault", "raised rcd_trip")  # no exception
    console.report(now, "outbox", "a record")
    monkeypatch.setattr(console._Console, "emit", real_emit)
    assert console.recent_faults[-1] == (now, "raised rcd_trip")  # what diag shows is kept
    console.report(now, "pilot", "C -> B")
    assert capsys.readouterr().out.splitlines() == [
        "[   2.000] main: 2 line(s) lost before this one: the heap was full", "[   2.000] pilot: C -> B"]
    console.report(now, "pilot", "B -> A")
    assert capsys.readouterr().out == "[   2.000] pilot: B -> A\n"


def test_while_the_contactor_is_closed_lines_wait_and_drain_a_bounded_amount(capsys, monkeypatch):
    """Issue 12 item 2: no console burst while closed. A record-length line is written at most
    CLOSED_BYTES_PER_STEP a loop iteration (under the 57 bytes the UART sends in 5 ms), the rest
    at once when the contactor opens, in order, before the next line."""
    class Gate:
        held = True

    monkeypatch.setattr(console, "hold", Gate())
    monkeypatch.setattr(console, "_queue", [])
    monkeypatch.setattr(console, "_queued", 0)
    monkeypatch.setattr(console, "_head", 0)
    now = time.ticks_add(console.boot_ms, 1000)
    console.report(now, "outbox", "r" * 577)
    console.report(now, "contactor", "open")
    assert capsys.readouterr().out == ""
    assert console.CLOSED_BYTES_PER_STEP < 57
    parts = []
    for _ in range(5):
        console.drain(console.CLOSED_BYTES_PER_STEP)
        parts.append(capsys.readouterr().out)
    assert [len(p) for p in parts] == [console.CLOSED_BYTES_PER_STEP] * 5
    Gate.held = False
    console.report(now, "pilot", "C -> B")
    out = "".join(parts) + capsys.readouterr().out
    assert out.splitlines() == ["[   1.000] outbox: " + "r" * 577, "[   1.000] contactor: open",
                                "[   1.000] pilot: C -> B"]
