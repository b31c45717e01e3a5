"""An adversary's review of the loop and flash changes of issue 12 item 2 (firmware/flash_gate.py,
console.py's queue while closed, command_auth.py's reserved counter): each test is an input or
timing that tries to break one rule.

- The counter reservation near the top of its range: a command near 2**53 - 1 (pilecmd takes any
  counter up to it) must not leave, after the next reboot, a floor that no counter is above:
  every command, `update` too, refused for good, only a technician could bring it back.
- A fault line the full console queue drops while closed is still in diag's recent faults, and
  the drop is said once the contactor opens.
- A checkpoint falling due while the contactor is closed is written at the open, also when the
  car goes C->B->C quickly (the contactor may close again only relay.MIN_OPEN_MS later).
"""
import builtins
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pilehost import pilecmd
from pilehost.virtual_board import VirtualBoard

import command_auth as C
import console
import session_store

SECRET = bytes(range(32))
MAX = 2 ** 53 - 1


def signed(name, counter):
    return pilecmd.sign(SECRET, pilecmd.make_body(name, {}, counter))


class OpenGate:
    """A flash gate with the contactor open: nothing deferred."""

    held = False
    spent = False

    def every_open_step(self, fn):
        pass

    def spend(self):
        pass

    def defer(self, fn):  # pragma: no cover - never held
        raise AssertionError("deferred with the contactor open")


def boot(path):
    """The verifier as wiring.build_verifier makes it at boot (reservation written, open)."""
    store = session_store.CounterStore(path)
    v = C.CommandVerifier(SECRET, last_counter=store.load(), counter_store=store, gate=OpenGate())
    assert v.reserve_ahead() is None
    return v


# -- the counter reservation at the top of its range ---------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.integers(MAX - 3 * C.RESERVE, MAX - 1), st.integers(1, MAX - 1)),
       st.integers(1, 4))
def test_a_counter_near_2_53_leaves_a_command_after_any_number_of_reboots(tmp_path_factory, counter, boots):
    path = str(tmp_path_factory.mktemp("c") / "cmd_counter.json")
    v = boot(path)
    assert v.verify(signed("request_status", counter)).counter == counter
    for _ in range(boots):
        v = boot(path)
        # Replay protection kept: the accepted counter is refused after every reboot.
        with pytest.raises(C.CommandError) as info:
            v.verify(signed("request_status", counter))
        assert info.value.code == "replayed"
        floor = pilecmd.floor_of(str(info.value))
        assert floor is not None and floor >= counter
        # What pilecmd --floor signs: one above the floor, if the range has one.
        assert floor < MAX, "floor %d after a command at %d: no command can ever be accepted" % (
            floor, counter)
    assert v.verify(signed("request_status", floor + 1)).counter == floor + 1


def test_the_reservation_still_spares_the_writes_below_the_top(tmp_path_factory):
    """The fix at the top keeps the reservation everywhere else (no write per command)."""
    path = str(tmp_path_factory.mktemp("c") / "cmd_counter.json")
    v = boot(path)
    v.verify(signed("request_status", 10 ** 12))
    writes = v.writes
    for i in range(1, 50):
        v.verify(signed("request_status", 10 ** 12 + i))
    assert v.writes == writes and v.reserved == 10 ** 12 + C.RESERVE


# -- the console queue while closed --------------------------------------------------------------


@given(st.integers(1, 60), st.integers(10, 300))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_fault_dropped_while_closed_stays_in_the_recent_faults_and_is_counted(
        fresh_console, capsys, filler, width):
    console._queue[:] = []
    console._queued = console.lines_dropped = 0
    console.recent_faults[:] = []
    fresh_console.held = True
    capsys.readouterr()
    for i in range(filler):
        console.report(i, "meter", "x" * width)
    console.report(filler, "fault", "pilot_short raised")
    assert console._queued <= console._QUEUE_MAX_BYTES
    assert console.recent_faults[-1] == (filler, "pilot_short raised")  # diag.py sees it
    dropped = console.lines_dropped
    assert capsys.readouterr().out == ""  # nothing printed while closed
    fresh_console.held = False
    console.drain()
    out = capsys.readouterr().out
    if dropped:
        assert "%d line(s) dropped while the contactor was closed" % dropped in out
    else:
        assert "pilot_short raised" in out
    assert console.lines_dropped == 0 and console._queue == []


# -- a checkpoint due while closed, written at the open ------------------------------------------

CONFIG = {"free_vend": True, "pile_id": "review-1", "checkpoint_s": 10,
          "meter": {"type": "ddsu666", "failure_timeout_s": 5}}


def _watch_snapshots(monkeypatch, contactor_of):
    """(ms, closed) of every write of the session snapshot (session.json, or its temp file)."""
    import session_store as ss

    seen = []
    real_open = builtins.open
    real_rename = os.rename

    def _open(path, mode="r", *args, **kwargs):
        if ("w" in mode or "a" in mode) and "session" in str(path):
            seen.append(contactor_of().closed)
        return real_open(path, mode, *args, **kwargs)

    def _rename(a, b):
        if "session" in str(b):
            seen.append(contactor_of().closed)
        return real_rename(a, b)

    monkeypatch.setattr(ss, "open", _open, raising=False)
    monkeypatch.setattr(os, "rename", _rename)
    return seen


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 400))
def test_a_checkpoint_due_while_closed_is_written_at_the_open_even_on_a_quick_bounce(
        monkeypatch, bounce_ms):
    with monkeypatch.context() as mp:
        vb = VirtualBoard(mp, config=dict(CONFIG), period_ms=5)
        vb.world.energy_wh = 1000000
        w = vb.world

        w.do("plug", 220)
        w.do("request")
        vb.run_for(3000)
        assert vb.ctl.contactor.closed
        seen = _watch_snapshots(mp, lambda: vb.ctl.contactor)
        vb.run_for(12000)  # a checkpoint (10 s) falls due while closed
        assert seen == []  # not written while closed
        w.do("stop_request")
        end = w.now + 3000 * 1000
        while vb.ctl.contactor.closed and w.now < end:
            w.advance()
            vb.tick()
        assert not vb.ctl.contactor.closed
        vb.run_for(bounce_ms)
        w.do("request")  # back to C at once: closes again only relay.MIN_OPEN_MS after the open
        while not vb.ctl.contactor.closed and w.now < end + 3000 * 1000:
            w.advance()
            vb.tick()
        assert vb.ctl.contactor.closed
        assert False in seen, "the checkpoint due while closed was not written at the open"
        assert True not in seen


# -- the console's FIFO model after a line printed with the contactor open --------------------------




@given(st.integers(0, 60), st.integers(60, 700), st.integers(0, 15), st.integers(1, 6))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_console_write_blocks_while_closed_after_a_long_line_printed_open(
        fresh_console, console_uart, stale_ms, length, gap_ms, lines):
    """A line printed with the contactor open blocks (allowed then) and leaves the FIFO full at
    the end of the write, which is later than the `now_ms` of the report that printed it (an
    iteration's start: the link, the records step print late in it). The contactor closes in
    the next tick: the queue drained then must fit in what the FIFO really has free."""
    uart = console_uart(1000)
    clock = uart.clock
    report_ms = int(clock[0])
    clock[0] += stale_ms  # the slow work of the iteration before the line
    console.report(report_ms, "session", "r" * length)  # open: may block
    clock[0] += gap_ms
    start = int(clock[0])  # the next iteration: the tick closes the contactor
    fresh_console.held = True
    for i in range(lines):
        console.report(start, "contactor", "closed %d" % i)
    console.step(start)  # main.py's console step, that iteration
    for _ in range(30):  # the following iterations, 5 ms apart
        clock[0] += 5
        console.step(int(clock[0]))
    held_blocks = uart.held_blocks()
    assert held_blocks == [], "a console write blocked %.1f ms with the contactor closed" % max(
        held_blocks)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(("cmd", "reboot", "renew")),
                          st.one_of(st.none(), st.integers(0, 2 * 10 ** 12)),
                          st.integers(1, 3 * C.RESERVE)), max_size=25))
def test_no_accepted_command_is_accepted_again_whatever_the_clock_does(tmp_path_factory, steps):
    """The reservation follows the wall clock when it is set (open_step, reserve_ahead); a clock
    never set, set wrong, or moved backwards between reboots must never let an accepted counter
    in again (the contactor open: every accepted counter is on flash)."""
    path = str(tmp_path_factory.mktemp("c") / "cmd_counter.json")
    unix = [None]

    def boot_clock():
        store = session_store.CounterStore(path)
        v = C.CommandVerifier(SECRET, last_counter=store.load(), counter_store=store,
                              gate=OpenGate(), unix_ms=lambda: unix[0])
        assert v.reserve_ahead() is None
        return v

    v = boot_clock()
    accepted = []
    counter = 1
    now = 0
    for kind, clock, jump in steps:
        unix[0] = clock
        if kind == "reboot":
            v = boot_clock()
        elif kind == "renew":
            now += 20000
            assert v.open_step(now) is None
        else:
            counter = max(counter, v.last_counter) + jump
            if counter > MAX:
                break
            v.verify(signed("request_status", counter))
            accepted.append(counter)
        for old in accepted[-3:]:
            with pytest.raises(C.CommandError) as info:
                v.verify(signed("remote_stop", old))
            assert info.value.code == "replayed"
