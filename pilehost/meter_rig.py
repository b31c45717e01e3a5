"""The meter drivers' bench on CPython: a fake clock, the simulated meters' world, and the one
RS-485 fake (sim/rs485.py) behind the UART and DE pin objects a driver is given."""
import time

from . import sim_module

TICKS_PERIOD = 1 << 30
rs485 = sim_module("rs485")


class World:
    """What the simulated meters measure; attributes are read at call time."""

    def __init__(self, energy_wh=1234567.0, voltage_v=230.0, current_a=16.0, power_w=3680.0):
        self.energy_wh = energy_wh
        self.voltage_v = voltage_v
        self.current_a = current_a
        self.power_w = power_w


class Clock:
    """Fake time: `t` in ms unwrapped (for the bus), `ticks` wrapped like time.ticks_ms()."""

    def __init__(self, start_ticks=0):
        self.t = 0.0
        self.start = start_ticks

    @property
    def ticks(self):
        return (self.start + int(self.t)) % TICKS_PERIOD


class Bus(rs485.Line):
    """sim/rs485.py's line on the fake clock (ms), with the pile's side as a driver sees it:
    `uart` (machine.UART's write/any/read/readinto; no flush(): calling it fails) and `de` (a
    Pin). Every violation goes to `violations`; `frames` are the requests sent (start, end,
    bytes), `de_log` DE's changes, so that `de_at(t)` is DE's level at any time."""

    def __init__(self, clock, sim, baud=9600, bits=11):
        super().__init__(sim, bits * 1000.0 / baud, 1.0)
        self.clock = clock
        self.sim = sim
        self.char_ms = self.char_time
        self.de_level = 0
        self.de_log = [(0.0, 0)]
        self.violations = []
        self.frames = []
        self.uart = _Uart(self)
        self.de = _De(self)

    def de_at(self, t):
        level = 0
        for when, value in self.de_log:
            if when <= t:
                level = value
        return level

    def violation(self, kind, text):
        self.violations.append(text)

    def sent(self, start, end, data):
        self.frames.append((start, end, data))


class _Uart:
    def __init__(self, bus):
        self.bus = bus

    def write(self, buf):
        return self.bus.write(bytes(buf), self.bus.clock.t)

    def any(self):
        self.bus.deliver(self.bus.clock.t)
        return len(self.bus.rx)

    def readinto(self, buf, nbytes=None):
        bus = self.bus
        bus.deliver(bus.clock.t)
        n = min(len(buf), len(bus.rx), len(buf) if nbytes is None else nbytes)
        if n == 0:
            return None
        buf[:n] = bus.rx[:n]
        del bus.rx[:n]
        return n

    def read(self, n=None):
        self.bus.deliver(self.bus.clock.t)
        n = len(self.bus.rx) if n is None else min(n, len(self.bus.rx))
        return self.bus.take(n) if n else None


class _De:
    def __init__(self, bus):
        self.bus = bus

    def value(self, v=None):
        bus = self.bus
        if v is None:
            return bus.de_level
        now = bus.clock.t
        bus.de_set(v, now)
        bus.de_level = 1 if v else 0
        bus.de_log.append((now, bus.de_level))
        return None


class Pin:
    """A GPIO pin a driver is given (an S0 input, an RCD module's lines): value()."""

    def __init__(self, v=0):
        self.v = v

    def value(self, v=None):
        if v is None:
            return self.v
        self.v = v
        return None


class ScriptedSim:
    """A bus peer that answers each request with the next scripted reply (fuzzing drivers)."""

    reply_delay_ms = 20

    def __init__(self, replies):
        self.replies = list(replies)

    def handle(self, request):
        return self.replies.pop(0) if self.replies else None


def run(meter_, clock, ms, step_ms=5):
    """Call poll() every step_ms for ms of fake time."""
    end = clock.t + ms
    while clock.t < end:
        clock.t += step_ms
        meter_.poll(clock.ticks)


def refuse_sleeping(monkeypatch):
    """poll() must never sleep: any sleep fails the test."""
    def refuse(*_args):
        raise AssertionError("meter code slept")
    for name in ("sleep", "sleep_ms", "sleep_us"):
        if hasattr(time, name):
            monkeypatch.setattr(time, name, refuse)
