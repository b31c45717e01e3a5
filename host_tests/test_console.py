"""console.report: every line the firmware prints, `[  s.mmm] source: text` with the loop's time,
written by console.py itself (no logging library since issue 12: its 4.6 KiB of heap bought
nothing the line shows)."""
import time

import pytest

import console


@pytest.fixture(autouse=True)
def contactor_open(fresh_console):
    """A board built by an earlier test (wiring.build) leaves its flash gate in console.hold,
    perhaps with its contactor closed: these lines are printed with it open."""
    fresh_console.held = False
    return fresh_console


def test_a_line_is_printed_with_the_loops_time_and_the_source(capsys):
    now = time.ticks_add(console.boot_ms, 12345)
    console.report(now, "pilot", "B -> C")
    assert capsys.readouterr().out == "[  12.345] pilot: B -> C\n"
    console.report(now, "meter", "no reply")
    console.report(now, "meter", "100% odd text %s")  # the text is an argument, never a format
    console.report(time.ticks_add(console.boot_ms, 1234567), "charger", "idle -> charging")
    assert capsys.readouterr().out.splitlines() == ["[  12.345] meter: no reply",
                                                    "[  12.345] meter: 100% odd text %s",
                                                    "[1234.567] charger: idle -> charging"]


def test_no_logging_library_is_loaded():
    import ast

    from pilehost import FIRMWARE

    with open(FIRMWARE + "/console.py") as f:
        tree = ast.parse(f.read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "logging" not in imported


def test_a_full_heap_loses_the_line_not_the_pile(capsys, monkeypatch):
    """A MemoryError building a line (the commonest allocation; a soak in a tight heap met it
    there) is not an internal error: the line is lost and said so with the next one."""
    now = time.ticks_add(console.boot_ms, 2000)
    real_write = console._write

    def heap_full(line):
        raise MemoryError("memory allocation failed, allocating 376 bytes")

    monkeypatch.setattr(console, "_write", heap_full)
    console.report(now, "fault", "raised rcd_trip")  # no exception
    console.report(now, "outbox", "a record")
    monkeypatch.setattr(console, "_write", real_write)
    assert console.recent_faults[-1] == (now, "raised rcd_trip")  # what diag shows is kept
    console.report(now, "pilot", "C -> B")
    assert capsys.readouterr().out.splitlines() == [
        "[   2.000] main: 2 line(s) lost before this one: the heap was full", "[   2.000] pilot: C -> B"]
    console.report(now, "pilot", "B -> A")
    assert capsys.readouterr().out == "[   2.000] pilot: B -> A\n"


def test_while_the_contactor_is_closed_lines_wait_and_never_overfill_the_uart(capsys, contactor_open):
    """Issue 12 item 2: no console burst while closed. Each loop iteration writes whole lines
    while they fit in what the UART's 128-byte FIFO has free by then (11.52 bytes a ms at
    115,200 baud); a line longer than the FIFO goes in pieces. The rest comes at once when the
    contactor opens, in order, before the next line."""
    contactor_open.held = True
    now = time.ticks_add(console.boot_ms, 1000)
    console.report(now, "outbox", "r" * 577)
    console.report(now, "contactor", "closed")
    assert capsys.readouterr().out == ""
    parts = []
    fifo = 0  # the test's own UART: 57.6 bytes leave it in a 5 ms period
    for i in range(12):
        console.drain(1000 + 5 * i)
        out = capsys.readouterr().out
        fifo = max(0.0, fifo - 57.6) + len(out) if i else len(out)
        assert fifo <= 128, (i, fifo)
        parts.append(out)
    assert len(parts[0]) == 128  # an empty FIFO takes a piece of the long line
    assert all(len(p) <= 58 for p in parts[1:])
    contactor_open.held = False
    console.report(now, "pilot", "C -> B")
    text = "".join(parts) + capsys.readouterr().out
    assert text.splitlines() == ["[   1.000] outbox: " + "r" * 577, "[   1.000] contactor: closed",
                                 "[   1.000] pilot: C -> B"]
