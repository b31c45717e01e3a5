"""What only the technician's virtual board adds to the simulated hardware (sim/vboard_rom.py
installs it; the scenario runs of sim/rom.py do without it, and their heap with them):

- machine.Timer: ESP32 hardware timers, whose callbacks are soft (scheduled, evse-facts
  section 6). diag.py's service mode feeds the watchdog from one. Here the callbacks that fell
  due run when the firmware, or the REPL, next touches the hardware, before the watchdog is
  judged: periods missed meanwhile are coalesced, as a late scheduler coalesces them.
- power_cut: called when the board resets (the watchdog, machine.reset), instead of sim/rom.py's
  boot loop; the virtual board ends its process there.
"""
import time

import world


class Timer:
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id, **kwargs):
        if not 0 <= id <= 3:
            raise ValueError("ESP32 Timer id must be 0-3")
        self.id = id
        self.period_us = self.due = self.callback = None
        self.periodic = False
        if kwargs:
            self.init(**kwargs)

    def init(self, *, mode=PERIODIC, period=-1, freq=-1, callback=None):
        if period < 0:
            period = 1000 // freq if freq > 0 else 1000
        w = world.WORLD
        now = w.advance()
        self.period_us = period * 1000
        self.periodic = mode == Timer.PERIODIC
        self.callback = callback
        self.due = now + self.period_us
        if self not in w.timers:
            w.timers.append(self)

    def deinit(self):
        if self in world.WORLD.timers:
            world.WORLD.timers.remove(self)


class VboardWorld(world.World):
    def __init__(self, board, steps=(), clock_us=None, echo=True):
        super().__init__(board, steps, clock_us, echo)
        self.timers = []
        self._firing = False
        self.power_cut = None  # None: SimReset, as under sim/rom.py

    def advance(self):
        try:
            if self.timers and not self._firing:
                self._fire_timers()
            return super().advance()
        except world.SimReset:
            self.timers = []
            if self.power_cut is not None:
                self.power_cut()
            raise

    def _fire_timers(self):
        now = self.now + time.ticks_diff(self._clock(), self._last_raw)
        if not any(now >= t.due for t in self.timers):
            return
        self._firing = True
        wdt = self.wdt_timeout_us
        self.wdt_timeout_us = None  # judged after the callbacks, which may feed it
        try:
            for t in list(self.timers):
                if now < t.due:
                    continue
                if t.periodic:
                    t.due = now + t.period_us
                else:
                    self.timers.remove(t)
                if t.callback is not None:
                    t.callback(t)
        finally:
            self._firing = False
            if self.wdt_timeout_us is None:
                self.wdt_timeout_us = wdt
