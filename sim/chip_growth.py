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

_RX_SIZE = 4096  # the link's out-buffer is 2,048 B: a write is never larger

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


class Broker(chip_net.Broker):
    """chip_net's broker without its heap traffic: on a pile the bytes the link writes go to
    lwIP, outside MicroPython's heap, but chip_net copies each packet (bytes(), rx +=) in the heap
    being measured, ~500 B for a record, enough to fail in a fragmented 56 KiB heap. Here the
    pile's bytes land in a buffer made once, packets are parsed in place, and what the pile
    publishes is counted, not kept. CONNACK, SUBACK, PUBACK, PINGRESP back, as chip_net's."""

    def __init__(self, topics):
        super().__init__([])
        self.buf = bytearray(_RX_SIZE)
        self.mv = memoryview(self.buf)
        self.n = 0
        self.started_topic, self.ended_topic = topics
        self.started = self.ended = self.connects = 0
        self.events = self  # chip_net.socket.readinto appends "received n B": dropped

    def append(self, event):
        pass

    def write(self, data):
        k = len(data)
        self.mv[self.n:self.n + k] = data
        self.n += k
        buf = self.buf
        while self.n >= 2:
            length = shift = 0
            i = 1
            while True:
                if i >= self.n:
                    return k
                b = buf[i]
                length |= (b & 0x7F) << shift
                i += 1
                if not b & 0x80:
                    break
                shift += 7
            end = i + length
            if self.n < end:
                return k
            self._packet(buf[0], i, end)
            self.mv[0:self.n - end] = self.mv[end:self.n]
            self.n -= end
        return k

    def _packet(self, op, i, end):
        buf = self.buf
        kind = op & 0xF0
        if kind == 0x10:
            self.tx += b"\x20\x02\x00\x00"
            self.connects += 1
        elif kind == 0x80:
            pos, codes = i + 2, 0
            while pos + 2 <= end:
                pos += 2 + (buf[pos] << 8 | buf[pos + 1]) + 1
                codes += 1
            self.tx += bytes((0x90, 2 + codes, buf[i], buf[i + 1])) + b"\x01" * codes
        elif kind == 0x30:
            n = buf[i] << 8 | buf[i + 1]
            if _same(buf, i + 2, n, self.ended_topic):
                self.ended += 1
            elif _same(buf, i + 2, n, self.started_topic):
                self.started += 1
            if (op >> 1) & 3:
                self.tx += bytes((0x40, 2, buf[i + 2 + n], buf[i + 3 + n]))
        elif kind == 0xC0:
            self.tx += b"\xd0\x00"


def _same(buf, at, n, want):
    if n != len(want):
        return False
    for j in range(n):
        if buf[at + j] != want[j]:
            return False
    return True


def _write(sock, data):
    return chip_net.BROKER.write(data)


chip_net.socket.write = _write
chip_net.socket.send = _write


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

    def ready(self, sim):
        pass

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
        broker = chip_net.BROKER
        print("GROWTH %d %d %d %d %d %d %d" % (k + 1, live, block, gc.mem_free(), broker.started,
                                               broker.ended, broker.connects))


def start():
    with open("growth.json") as f:
        plan = json.load(f)
    with open("config.json") as f:
        root = "evse/v1/%s/session/" % json.load(f)["pile_id"]
    chip_net.BROKER = Broker(((root + "started").encode(), (root + "ended").encode()))
    del root
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
