"""pilehost/board_repl.py: the board brought to its REPL before mpremote talks to it, against a
behavioural model of a board on a virtual clock (its ROM, its boot to main.run()'s try, service
mode's entry, the REPLs), and technician.mpremote's bounded retry of the raw-REPL entry."""
import heapq
import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilehost import ROOT, board_repl, technician

BANNER = b"MicroPython 1.29 on 2026-07-05; linux version\r\nType \"help()\" for more information.\r\n"


class Board:
    """A board as its serial line shows it, on a virtual clock (`now`, seconds; a read takes
    board_repl's read time). Before `reset_at` it runs main.run()'s loop. A reset: `rom_s` of
    silence (a Ctrl-C there is lost, or with rom="reset" restarts it: the unix port before its
    handler), the boot's first line, `boot_s` of boot.py and main.py's imports (a Ctrl-C in the
    first half is lost: boot.py ends and main.py runs on; in the second the pile stops at the REPL
    without service mode: `stopped`), then READY and the loop. A Ctrl-C in the loop: service mode's
    entry for `service_s` (a second Ctrl-C there ends it: `broken`), its line, the REPL."""

    def __init__(self, reset_at=None, rom_s=0.1, boot_s=0.3, service_s=0.2, chatter_s=None,
                 rom="lost", state="running", held=False):
        self.now = 0.0
        self.rom_s, self.boot_s, self.service_s, self.chatter_s, self.rom = (
            rom_s, boot_s, service_s, chatter_s, rom)
        self.state = state
        self.held = held  # config unusable: run() holds the pile, no READY (main.hold_unavailable)
        self.out = []  # (time, bytes), unread
        self.events = []
        self.gen = 0  # a reset makes the events scheduled before it stale
        self.boot_started = None
        self.ctrl_c = 0
        self.broken = self.stopped = False
        self.services = 0
        if reset_at is not None:
            self._at(reset_at, "reset")
        if state == "running":
            self._chatter()

    def _at(self, t, kind):
        heapq.heappush(self.events, (t, len(self.events) + 1000 * self.gen, self.gen, kind))

    def _say(self, data):
        self.out.append((self.now, data))

    def _chatter(self):
        if self.chatter_s is not None:
            self._at(self.now + self.chatter_s, "chatter")

    def _run(self):
        while self.events and self.events[0][0] <= self.now:
            t, _, gen, kind = heapq.heappop(self.events)
            if gen != self.gen:
                continue
            saved, self.now = self.now, t
            self._event(kind)
            self.now = saved

    def _event(self, kind):
        if kind == "reset":
            self.gen += 1
            self.state = "rom"
            self._at(self.now + self.rom_s, "power_on")
        elif kind == "power_on":
            self.state = "boot"
            self.boot_started = self.now
            self._say(b"[   0.000] sim board: power-on\n[   0.006] sim contactor: coil off\n")
            self._at(self.now + self.boot_s, "ready")
        elif kind == "ready":
            self.state = "running"
            if self.held:
                self._say(b"[   0.011] main: pile unavailable until the configuration is fixed\n")
            else:
                self._say(b"[   0.011] main: firmware 0.1.0, board ref-esp32, iec, max 32 A\n")
                self._chatter()
        elif kind == "chatter" and self.state == "running":
            self._say(b"[   5.000] meter: 230.0 V 16.0 A\n")
            self._chatter()
        elif kind == "service":
            self.state = "repl"
            self.services += 1
            self._say(b"[   5.100] main: service mode (Ctrl-C): contactor open, pilot F\n" + BANNER + b">>> ")

    # -- the serial line (pyserial's calls that board_repl makes) --

    def read(self, n):
        self.now += board_repl._READ_S
        self._run()
        data = b"".join(d for t, d in self.out if t <= self.now)
        self.out = [(t, d) for t, d in self.out if t > self.now]
        return data

    def reset_input_buffer(self):
        self._run()
        self.out = [(t, d) for t, d in self.out if t > self.now]

    def write(self, data):
        self._run()
        for c in data:
            if c == 3:
                self.ctrl_c += 1
                self._ctrl_c()
            elif c == 2 and self.state in ("repl", "raw"):
                self.state = "repl"
                self._say(b"\r\n" + BANNER + b">>> ")

    def _ctrl_c(self):
        if self.state == "rom" and self.rom == "reset":
            self._at(self.now, "reset")
        elif self.state == "boot":
            if self.now - self.boot_started >= self.boot_s / 2:
                self.stopped = True
                self.gen += 1
                self.state = "repl"
                self._say(b"KeyboardInterrupt in main.py\n" + BANNER + b">>> ")
        elif self.state == "running":
            self.state = "entering"
            self._at(self.now + self.service_s, "service")
        elif self.state == "entering":
            self.broken = True
        elif self.state == "repl":
            self._say(b"\r\n>>> ")


def interrupt(board, **kwargs):
    return board_repl.interrupt(board, clock=lambda: board.now, **kwargs)


def test_a_running_pile_takes_one_ctrl_c_to_service_mode():
    b = Board(chatter_s=0.5)
    said = interrupt(b)
    assert said.endswith(b">>> ") and b.ctrl_c == 1 and b.services == 1 and not b.broken
    assert b.now < board_repl.LISTEN_S + 1  # the listen, then the service mode's entry


def test_a_board_at_its_repl_answers_at_once():
    b = Board(state="repl")
    interrupt(b)
    assert b.ctrl_c == 1 and b.now < board_repl.LISTEN_S + 0.2


def test_a_session_cut_off_in_the_raw_repl_is_left_for_the_friendly_one():
    b = Board(state="raw")  # Ctrl-C there says nothing: Ctrl-B brings the prompt
    assert interrupt(b).endswith(b">>> ") and b.state == "repl" and b.ctrl_c == 1


def test_right_after_a_reset_the_ctrl_c_waits_for_main_run():
    """`make reboot` then `make diag` at once: the boot is heard; its Ctrl-C comes after READY."""
    b = Board(reset_at=0.05, rom_s=0.05, boot_s=1.5)
    interrupt(b)
    assert b.ctrl_c == 1 and b.services == 1 and not b.stopped and not b.broken


def test_a_ctrl_c_lost_in_the_rom_is_sent_again_once_the_boot_is_in_run():
    """The old failure: one Ctrl-C, lost in the boot, and mpremote's Ctrl-A never read."""
    for rom in ("lost", "reset"):
        b = Board(reset_at=0.3, rom_s=1.0, boot_s=0.5, rom=rom)
        interrupt(b)
        assert b.ctrl_c == 2 and b.services == 1 and not b.stopped and not b.broken, rom


def test_a_held_pile_after_a_reset_takes_its_ctrl_c_once_quiet():
    """No READY from a pile held for its config; once its boot is quiet, it is in run()."""
    for reset_at in (0.0, 0.4):  # heard while listening; after the first Ctrl-C (lost in the ROM)
        b = Board(reset_at=reset_at, rom_s=0.5, boot_s=0.5, held=True)
        interrupt(b)
        assert b.services == 1 and not b.stopped and not b.broken and b.ctrl_c <= 2


def test_the_lines_it_waits_for_are_the_firmwares():
    with open(os.path.join(ROOT, "firmware", "main.py")) as f:
        main = f.read()
    with open(os.path.join(ROOT, "firmware", "diag.py")) as f:
        diag = f.read()
    assert 'console.report(time.ticks_ms(), "main", "firmware %s' in main  # in run()'s try
    assert board_repl.READY == b"main: firmware "
    assert 'console.report(now, "main", "service mode (Ctrl-C)' in diag
    assert board_repl.SERVICE == b"main: service mode"
    with open(os.path.join(ROOT, "sim", "vboard_rom.py")) as f:
        assert 'sim.log("board", "power-on")' in f.read() and board_repl.BOOTS[0] == b"sim board: power-on"


@settings(max_examples=300, deadline=None)
@given(reset_at=st.one_of(st.none(), st.floats(0, board_repl.LISTEN_S)),
       rom_s=st.floats(0.001, 2.5), boot_s=st.floats(0.01, 2.5),
       service_s=st.floats(0.01, 1.5), chatter_s=st.one_of(st.none(), st.floats(0.1, 5.0)),
       rom=st.sampled_from(["lost", "reset"]), held=st.booleans())
def test_service_mode_whenever_the_reset_came(reset_at, rom_s, boot_s, service_s, chatter_s, rom, held):
    """Whatever the boot's timing (a boot silent for less than QUIET_S): the prompt through
    service mode, a Ctrl-C never inside the boot (stopped) nor inside service mode's entry
    (broken), at most ATTEMPTS of them."""
    b = Board(reset_at, rom_s, boot_s, service_s, chatter_s, rom, held=held)
    said = interrupt(b)
    assert said.endswith(b">>> ")
    assert b.services == 1 and not b.stopped and not b.broken
    assert b.ctrl_c <= board_repl.ATTEMPTS and b.now <= board_repl.DEADLINE_S


def test_a_silent_board_gives_up_saying_so():
    b = Board(state="dead")
    with pytest.raises(board_repl.NoRepl, match=r"after 3 Ctrl-C in \d+ s \(the board said nothing\)"):
        interrupt(b)
    assert b.ctrl_c == board_repl.ATTEMPTS and b.now <= board_repl.DEADLINE_S


def test_a_board_that_never_reaches_run_gives_up_with_its_last_lines():
    b = Board(reset_at=0.0, rom_s=0.1, boot_s=1000.0)  # boot.py hangs
    with pytest.raises(board_repl.NoRepl, match="said last: .*coil off"):
        interrupt(b)
    assert not b.stopped and b.now <= board_repl.DEADLINE_S + 1


# -- technician.mpremote: the raw-REPL entry, bounded ----------------------------------------------


class Runs:
    """subprocess.run for mpremote: each call answers the next of `answers` (returncode, stderr)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, cmd, **kwargs):
        self.calls += 1
        rc, err = self.answers.pop(0)
        return subprocess.CompletedProcess(cmd, rc, stdout="out\n" if rc == 0 else "", stderr=err)


NO_RAW = "Traceback ... | mpremote.transport.TransportError: could not enter raw repl"


@pytest.fixture
def repl_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(board_repl, "to_repl", lambda port: calls.append(port))
    return calls


def test_mpremote_enters_the_raw_repl_again_once(monkeypatch, repl_calls):
    runs = Runs([(1, NO_RAW), (0, "")])
    monkeypatch.setattr(subprocess, "run", runs)
    assert technician.mpremote("/dev/x", "exec", "1") == "out\n"
    assert runs.calls == 2 and repl_calls == ["/dev/x", "/dev/x"]


def test_mpremote_gives_up_after_its_attempts(monkeypatch, repl_calls):
    runs = Runs([(1, NO_RAW)] * 5)
    monkeypatch.setattr(subprocess, "run", runs)
    with pytest.raises(technician.ToolError, match="failed 2 times: .*could not enter raw repl"):
        technician.mpremote("/dev/x", "exec", "1")
    assert runs.calls == technician.RAW_REPL_ATTEMPTS


def test_mpremote_never_repeats_what_may_have_run(monkeypatch, repl_calls):
    runs = Runs([(1, "mpremote: could not complete raw paste"), (0, "")])
    monkeypatch.setattr(subprocess, "run", runs)
    with pytest.raises(technician.ToolError, match="failed: mpremote: could not complete raw paste"):
        technician.mpremote("/dev/x", "fs", "cp", "a", ":a")
    assert runs.calls == 1


def test_no_repl_is_a_tool_error(monkeypatch):
    def no_repl(port):
        raise board_repl.NoRepl("no REPL prompt after 3 Ctrl-C in 30 s (the board said nothing)")

    monkeypatch.setattr(board_repl, "to_repl", no_repl)
    with pytest.raises(technician.ToolError, match="/dev/x: no REPL prompt after 3 Ctrl-C"):
        technician.mpremote("/dev/x", "exec", "1")
    with pytest.raises(technician.ToolError, match="cannot open /nonexistent"):
        monkeypatch.undo()
        technician.mpremote("/nonexistent/tty", "exec", "1")
