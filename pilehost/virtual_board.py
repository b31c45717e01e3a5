"""The firmware, wired by wiring.build(), on the simulated world under a virtual clock (CPython).

Every clock read advances time a little (like the ~35 us an ESP32 ADC read takes), so the
pilot sampler's bursts see the PWM waveform; between ticks the clock jumps one control period.
Deterministic and fast: a 6 s timeout takes milliseconds, with no wall-clock luck involved.
"""
import json
import os
import tempfile
import time

import mp_time  # host_tests/shims: on the path under pytest, as firmware/ and sim/ are

from . import ROOT


def board_dict(name="ref-esp32"):
    with open(os.path.join(ROOT, "boards", name + ".json")) as f:
        return json.load(f)


# The firmware's modules that write files (their `open`), with os.rename and os.remove.
FLASH_WRITERS = ("session_store", "journal", "durable", "session_log", "link_heal", "ota")


def watch_flash(monkeypatch, on_write):
    """From now on every write-mode open of the firmware's writer modules, and every os.rename
    and os.remove, calls on_write(kind, path, mode) first (kind "open", "rename" (path: the
    destination) or "remove"; mode None but for open). Import the writer modules before."""
    import builtins
    import sys

    real_open, real_rename, real_remove = builtins.open, os.rename, os.remove

    def _open(path, mode="r", *args, **kwargs):
        if "w" in mode or "a" in mode or "+" in mode:
            on_write("open", path, mode)
        return real_open(path, mode, *args, **kwargs)

    def _rename(a, b):
        on_write("rename", b, None)
        return real_rename(a, b)

    def _remove(path):
        on_write("remove", path, None)
        return real_remove(path)

    for name in FLASH_WRITERS:
        module = sys.modules.get(name)
        if module is not None:
            monkeypatch.setattr(module, "open", _open, raising=False)
    monkeypatch.setattr(os, "rename", _rename)
    monkeypatch.setattr(os, "remove", _remove)


class VirtualClock:
    def __init__(self, start_us=0, read_cost_us=20):
        self.t = start_us
        self.read_cost_us = read_cost_us

    def ticks_us(self):
        self.t += self.read_cost_us
        return self.t & (mp_time.TICKS_PERIOD - 1)

    def ticks_ms(self):
        return (self.t // 1000) & (mp_time.TICKS_PERIOD - 1)


class VirtualBoard:
    def __init__(self, monkeypatch, steps=(), config=None, board=None, start_us=0, period_ms=5):
        import world

        monkeypatch.chdir(tempfile.mkdtemp(prefix="pile-flash-"))  # the board's files go here
        self.clock = VirtualClock(start_us)
        monkeypatch.setattr(time, "ticks_us", self.clock.ticks_us)
        monkeypatch.setattr(time, "ticks_ms", self.clock.ticks_ms)
        self.board_data = board or board_dict()
        self.world = world.World(self.board_data, steps, clock_us=self.clock.ticks_us, echo=False)
        monkeypatch.setattr(world, "WORLD", self.world, raising=False)
        self.reports = []
        import config as config_module
        import console

        monkeypatch.setattr(console, "report", lambda now, what, text: self.reports.append((what, text)))
        conf = {"free_vend": True}
        conf.update(config or {})
        self.world.fit_meter(conf.get("meter", {}))
        self.board = config_module.parse_board(self.board_data)
        self.conf = config_module.parse_config(conf)
        self.period_ms = period_ms
        self.ctl = None
        self.reboot()

    def reboot(self):
        """The firmware built again from the same flash, the world carrying on: a reset (power
        cut or watchdog) as the pile would see it, minus boot.py's first line (the old objects'
        contactor is opened first, as the board's pull-downs would)."""
        import wiring

        if self.ctl is not None:
            self.ctl.contactor.open()
        self.ctl = wiring.build(self.board, self.conf)
        return self.ctl

    def build_link(self):
        """The MQTT link as main.py makes it (config.json's mqtt section), not polled: no network.
        wiring_link.link_parts resolves its parts, the link is made of them (on the pile after
        wiring_link.py is dropped)."""
        import wiring
        import wiring_link

        make, args = wiring_link.link_parts(self.board, self.conf, self.ctl, wiring.handover)
        return None if make is None else make(**args)

    @property
    def now_ms(self):
        return self.world.now // 1000

    def tick(self):
        """One loop iteration's control work, as main.run: the tick, the console, the records step."""
        import console

        now = self.clock.ticks_ms()
        self.ctl.tick(now)
        console.step(self.clock.ticks_ms())  # as main.py: the clock after the tick
        self.ctl.records.poll(now)
        self.clock.t += self.period_ms * 1000

    def run_until(self, t_ms):
        while self.world.advance() < t_ms * 1000:
            self.tick()

    def run_for(self, ms):
        """Advance the world and tick for ms of world time from now."""
        end = self.world.now + ms * 1000
        while self.world.now < end:
            self.world.advance()
            self.tick()

    def run_while(self, condition, limit_ms):
        """Tick until condition() is false; returns the world time in ms when it stopped."""
        end = self.now_ms + limit_ms
        while condition():
            if self.now_ms > end:
                raise AssertionError("still true after %d ms" % limit_ms)
            self.tick()
        return self.now_ms

    def reported(self, what):
        return [text for w, text in self.reports if w == what]


CHARGE = [(100, "plug"), (600, "request")]  # a car plugged at 0.1 s that asks for power at 0.7 s


def charging(monkeypatch, steps=(), **kw):
    """A VirtualBoard whose car has been charging since ~0.7 s, run to 1 s; steps follow CHARGE's."""
    import charger

    vb = VirtualBoard(monkeypatch, CHARGE + list(steps), **kw)
    vb.run_until(1000)
    assert vb.world.coil and vb.ctl.charger.state == charger.CHARGING
    return vb


def count_bursts(monkeypatch, vb):
    """The pilot bursts vb's sampler takes from now on: a list of the clock (us) at each."""
    calls = []
    sampler = vb.ctl.sampler
    orig = sampler.sample

    def sample():
        calls.append(vb.clock.t)
        orig()
    monkeypatch.setattr(sampler, "sample", sample)
    return calls
