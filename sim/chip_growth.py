"""The heap-growth ROM (MicroPython): many whole sessions back to back in one lifetime, on the
chip model's virtual clock (sim/vclock.py) with its in-simulator broker (sim/chip_net.py), so
that 1,000 sessions take minutes (pilehost/chipgrowth.py, `make bench WHAT=growth`).

Unlike sim/chip_rom.py nothing is counted and nothing needs chipmark: it runs on the stock
32-bit binary (the firmware as .mpy) and on the chip build (the firmware frozen). The steps are
made on demand (a list of 5,000 would sit in the heap being measured). After the control-loop
iteration that passes each session's probe time (the watchdog feed, a quiet moment), it checks
the records the broker got; every `every` sessions it also collects and prints

    GROWTH <session> <live B net of the simulator> <largest free block B> <free B>
           <session/started published> <session/ended published> <MQTT connects>

Usage (cwd = the flash folder, with growth.json: {"sessions", "every", "first_ms", "cycle":
[[period_ms, [[ms, action], ...]], ...], "probe_before_ms", "adc_us", "leak_b"}):
    micropython -m chip_growth
"""
import sys

import vclock

sys.modules["time"] = vclock  # before anything else imports time
# The clocks start past 2^30 us (18 min): on 32 bits an int from 2^30 on is a heap object, and the
# simulator's microsecond timestamps would otherwise become heap objects mid-run, a step in the
# heap the firmware's is measured net of. The firmware's ticks stay as they were (masked).
_T0_MS = 1073742
vclock._now_us += _T0_MS * 1000

import gc  # noqa: E402
import json  # noqa: E402

import world  # noqa: E402

world._host_time = vclock.time
import chip_net  # noqa: E402

sys.modules["socket"] = chip_net
sys.modules["select"] = chip_net
import machine  # noqa: E402
import rom  # noqa: E402

# One ESP32 ADC read from Python is 35 us (sim/chip_rom.py): a 1.1 ms pilot burst reads 31
# times, each read a trip through the simulated world. The burst allocates nothing: here a read
# takes plan["adc_us"] (pilehost/chipgrowth.py), fewer reads a burst, a faster run.
_adc_us = [35]

_adc_read_uv = machine.ADC.read_uv
_adc_read_u16 = machine.ADC.read_u16


def _adc_uv(self):
    vclock.spend(_adc_us[0])
    return _adc_read_uv(self)


def _adc_u16(self):
    vclock.spend(_adc_us[0])
    return _adc_read_u16(self)


machine.ADC.read_uv = _adc_uv
machine.ADC.read_u16 = _adc_u16


class Tally:
    """The broker's event list, counted instead of kept (a list would grow with the run)."""

    def __init__(self):
        self.started = self.ended = self.connects = 0

    def append(self, event):
        if event == "publish session/ended":
            self.ended += 1
        elif event == "publish session/started":
            self.started += 1
        elif event == "connect":
            self.connects += 1


class Steps:
    """World.steps for `sessions` sessions: step i made when the world asks for it. The sessions
    repeat plan["cycle"]: each kind its length and its steps, [period_ms, [[ms, action], ...]],
    every kind the same number of steps."""

    def __init__(self, plan):
        self.n = plan["sessions"]
        self.first = _T0_MS + plan["first_ms"]
        self.kinds = [(period, [tuple(o) for o in offsets]) for period, offsets in plan["cycle"]]
        self.per = len(self.kinds[0][1])
        self.starts = [0]
        for period, _ in self.kinds:
            self.starts.append(self.starts[-1] + period)
        self.cycle_ms = self.starts.pop()

    def start_ms(self, k):
        """When session k (from 0) begins; k == n: the end."""
        c, j = divmod(k, len(self.kinds))
        return self.first + c * self.cycle_ms + self.starts[j]

    def __len__(self):
        return self.n * self.per + 1

    def __getitem__(self, i):
        k, j = divmod(i, self.per)
        if k >= self.n:
            return (self.start_ms(self.n), "end")
        at, action = self.kinds[k % len(self.kinds)][1][j]
        return (self.start_ms(k) + at, action)


class Growth:
    def __init__(self, plan):
        self.plan = plan
        self.every = plan["every"]
        self.steps = Steps(plan)
        self.session = 0  # the next session to probe
        self.due_us = self._due(0)
        self.base = 0
        self.leaked = []  # the self-test's deliberate leak (leak_b per probe), else empty
        self.max_latency_ms = 0.0

    def booting(self, sim):
        if sim.boots == 1:
            sim.now = _T0_MS * 1000  # the world's clock too (see _T0_MS)
            sim.steps = self.steps
            sim._step = 0
            sim._next_due = sim.steps[0][0] * 1000
            gc.collect()
            self.base = gc.mem_alloc()  # the simulator's live heap: what the firmware's is net of
            print("GROWTH-BASE %d %d" % (self.base, self.base + gc.mem_free()))
        else:
            print("GROWTH-RESET boot %d" % sim.boots)

    def _due(self, k):
        """Session k's probe: before the next session's plug, its records out and acknowledged."""
        return (self.steps.start_ms(k + 1) - self.plan["probe_before_ms"]) * 1000

    def ended(self, sim):
        pass

    def feed(self, sim):
        """After an iteration: the probe when its time has come."""
        if sim.now < self.due_us:
            return
        k = self.session
        self.session += 1
        self.due_us = self._due(self.session)
        # The world's C->B latencies: a list that grows one entry a session (the simulator's).
        for x in sim.latencies_ms:
            if x > self.max_latency_ms:
                self.max_latency_ms = x
        del sim.latencies_ms[:]
        if k and (k + 1) % self.every and k + 1 != self.plan["sessions"]:
            return
        if self.plan.get("leak_b"):
            self.leaked.append(bytearray(self.plan["leak_b"]))
        gc.collect()
        live = gc.mem_alloc() - self.base
        block = rom.largest_free_block()
        tally = chip_net.BROKER.events
        print("GROWTH %d %d %d %d %d %d %d" % (k + 1, live, block, gc.mem_free(), tally.started,
                                               tally.ended, tally.connects))


def start():
    with open("growth.json") as f:
        plan = json.load(f)
    chip_net.BROKER = chip_net.Broker([])
    chip_net.BROKER.events = Tally()
    _adc_us[0] = plan["adc_us"]
    growth = Growth(plan)
    del plan
    feed = machine.WDT.feed

    def feed_probed(self):
        feed(self)
        growth.feed(world.WORLD)

    machine.WDT.feed = feed_probed
    rom.start(growth)
    print("GROWTH-END %d %.1f" % (growth.session, growth.max_latency_ms))


start()
