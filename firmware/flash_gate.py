"""No filesystem write while the contactor is closed (docs/durability.md, "The contactor closed").

Any LittleFS write, close, rename or remove commits to a metadata block; now and then that commit
compacts the block: a 4 KiB sector erase, 45 ms typical and 400 ms worst (W25Q32JV tSE), the CPU
stalled meanwhile. While the contactor is closed a stall delays the reaction to C->B or an RCD
trip, so the writers here wait: each asks `held` before it writes and hands what it could not
write to `defer()`; the records step calls `poll()` once per loop iteration, which runs those
writes once the contactor is open, one an iteration, from the second open iteration on (a
contactor that opened stays open at least relay.MIN_OPEN_MS, 200 iterations; a write it does not
finish waits for the next open moment). The console's queue is the console's own (console.step,
from main.py's loop): it only reads `held` here.
"""
from micropython import const

import durable

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any, Callable


class FlashGate:
    """Made by wiring.new_gate (boot code, dropped after it; its defaults, the arguments), which
    sets the state below."""

    # Set by wiring.new_gate (annotations only: no code on the board).
    _contactor: "Any"  # anything with a `closed` attribute (relay.Contactor)
    _report: "Callable[[int, str, str], object] | None"  # the console, for a deferred write that failed
    _due: list  # callables(now_ms) -> None or an error text, oldest first
    _open_steps: list  # the same, called at every poll with the contactor open
    _was_held: bool  # the last poll saw the contactor closed
    # A write ran in this iteration (`spent`: poll() clears it; spend(), a deferred write, or
    # any commit through durable.py since the poll sets it): the settings wait for the next
    # one and a received command is held over (mqtt_link), so that a worst-case part's
    # stalls (~1.2 s a write) do not stack past the 2 s watchdog.
    _spent: bool
    _mark: int  # durable.written at the last poll

    @property
    def spent(self):
        return self._spent or durable.written != self._mark

    @property
    def held(self):
        return self._contactor.closed

    def defer(self, flush):
        """Run `flush(now_ms)` at a poll() with the contactor open, in the order deferred. A writer
        defers once until its flush has run (its own flag: MicroPython's bound methods do not
        compare)."""
        self._due.append(flush)

    def spend(self):
        """A writer is writing now (the command counter): later ones wait for the next iteration."""
        self._spent = True

    def every_open_step(self, fn):
        """Call `fn(now_ms)` at every poll() with the contactor open and nothing deferred left
        (it keeps itself cheap)."""
        self._open_steps.append(fn)

    def poll(self, now_ms):
        """Once per loop iteration (the records step, first). With the contactor open: the oldest
        deferred write, one an iteration, none in the first iteration after a close (the writers'
        own: the session log's checkpoint due while closed); with none left, the open steps.
        Each one's error is reported. One an iteration: on a worst-case flash part a write may
        take ~1.2 s (a block erase and a metadata compaction, 400 ms each), and the writes a
        session defers (checkpoint, command counter, journal ack, settings) would stack past
        the 2 s watchdog in one iteration (host_tests/test_flash_gate_spread.py)."""
        self._spent = False
        self._mark = durable.written
        if self.held:
            self._was_held = True
            return
        if self._was_held:
            self._was_held = False
            return
        due = self._due
        if due:
            self._spent = True
            self._run(now_ms, due.pop(0))
            return
        for fn in self._open_steps:
            self._run(now_ms, fn)

    def _run(self, now_ms, fn):
        problem = fn(now_ms)
        if problem is not None and self._report is not None:
            self._report(now_ms, "storage", problem)
