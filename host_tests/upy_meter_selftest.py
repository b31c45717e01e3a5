"""Meter drivers against the simulated meters on the MicroPython unix port.

    MICROPYPATH=<unix_port.micropypath()> micropython -X heapsize=96k host_tests/upy_meter_selftest.py

(64k on a 32-bit build such as /work/shared/tools/micropython-unix32, float32 like the ESP32.
The tests import the modules as bytecode, as a board does: from source, compiling meter.py needs
a block whose room in 64 KiB depends on what the collector finds on the C stack.)

Checks readings, energy deltas, faults, DE timing, that poll() allocates nothing while it waits
or sends, and that many cycles do not grow the heap. Prints "upy meter selftest ok".
"""
import gc
import sys

# Each protocol module loaded into a collected heap and unloaded after its case.
from meters import ModbusMeterSim, Dlt645MeterSim, S0MeterSim
import meter  # noqa: F401  (the drivers' base, loaded while the heap is empty)

T = [0]  # fake time, ms


def check(cond, what):
    if not cond:
        raise SystemExit("FAIL: " + what)


class World:
    energy_wh = 1234560.0
    voltage_v = 230.0
    current_a = 16.0
    power_w = 3680.0


class Wire:
    """Fake UART and DE pin in one. write() only copies the request, so poll() is measured
    alone; tick(), between polls, hands it to the sim once DE is low and lets the reply bytes
    arrive one character time (8E1) apart."""

    def __init__(self, sim, baud):
        self.sim = sim
        self.char_ms = 11000 / baud
        self.tx = bytearray(64)
        self.rx = bytearray(64)
        self.tx_n = self.rx_n = self.rx_pos = self.sent = self.de = self.bad = 0
        self.tx_end = self.reply_at = 0
        self.reply = None

    def write(self, buf):
        self.bad += not self.de  # must transmit with DE high
        self.tx_n = len(buf)
        for i in range(self.tx_n):
            self.tx[i] = buf[i]
        self.sent += 1
        return self.tx_n

    def any(self):
        return self.rx_n - self.rx_pos

    def readinto(self, buf, nbytes):
        n = min(nbytes, self.rx_n - self.rx_pos)
        for i in range(n):
            buf[i] = self.rx[self.rx_pos + i]
        self.rx_pos += n
        if self.rx_pos == self.rx_n:
            self.rx_pos = self.rx_n = 0
        return n

    def value(self, v=None):  # the DE/RE pin
        if v is None:
            return self.de
        self.bad += not v and self.tx_n and T[0] < self.tx_end  # low before the frame left
        self.de = v

    def tick(self, now):
        if self.tx_n and self.reply is None and not self.de:
            self.reply = self.sim.handle(bytes(self.tx[:self.tx_n])) or b""
            self.reply_at = self.tx_end + self.sim.reply_delay_ms
            self.tx_n = 0
        while self.reply and now >= self.reply_at + self.char_ms:
            self.rx[self.rx_n] = self.reply[0]
            self.rx_n += 1
            self.reply = self.reply[1:]
            self.reply_at += self.char_ms
        if self.reply == b"":
            self.reply = None


def run(m, wire, ms, alloc=None):
    """poll() every 5 ms. alloc: [bytes by polls with nothing to read, largest other poll]."""
    end = T[0] + ms
    while T[0] < end:
        T[0] += 5
        wire.tick(T[0])
        sent = wire.sent
        idle = not wire.any()
        before = m.reading
        a = gc.mem_alloc()
        m.poll(T[0])
        used = gc.mem_alloc() - a
        if wire.sent != sent:
            wire.tx_end = T[0] + wire.tx_n * wire.char_ms
        if alloc and used > 0:
            if idle and m.reading is before:
                alloc[0] += used
            else:
                alloc[1] = max(alloc[1], used)


FAULTS = (("silent", "timeout"), ("bad_crc", "crc"), ("partial", "partial"),
          ("wrong_address", "wrong_address"), ("exception", "exception_reply"),
          ("backwards", "backwards"), ("jump", "jump"), ("huge", "implausible"),
          ("garbage", "garbage"))


def driver(kind, wire, **options):
    """What wiring.make_meter builds for `kind` (meter_setup.py, dlt645_setup.py: loaded for the
    case's drivers and dropped after them, as the boot drops them)."""
    if kind == "dlt645":
        return sys.modules["dlt645_setup"].build(wire, wire, **options)
    options.setdefault("baud", 9600)  # wiring.make_meter always gives one
    return sys.modules["meter_setup"].modbus(wire, wire, model=kind, **options)


def rs485_case(kind, sim, baud, **options):
    T[0] = 0
    wire = Wire(sim, baud)
    # one cycle per period: DL/T 645 at 2400 baud needs ~1 s for its four reads
    period = 2000 if kind == "dlt645" else 1000
    m = driver(kind, wire, baud=baud, poll_interval_ms=period, **options)
    run(m, wire, 2 * period)  # DL/T 645 may learn the address first
    run(m, wire, period - T[0] % period)  # from here on, one whole cycle per period
    r = m.reading
    check(r is not None, kind + ": no reading, " + str(m.last_error))
    check(r.energy_wh == 1234560 and abs(r.voltage_v - 230) < 0.01, kind + ": " + repr(r))
    check(abs(r.current_a - 16) < 0.01 and abs(r.power_w - 3680) < 0.1, kind + ": " + repr(r))

    for _ in range(20):  # energy delta, to the Wh
        sim.world.energy_wh += 10
        run(m, wire, period)
    run(m, wire, period)
    check(m.reading.energy_wh - r.energy_wh == 200, kind + ": delta " + repr(m.reading))

    alloc = [0, 0]
    gc.collect()
    heap = gc.mem_alloc()
    for _ in range(20):
        run(m, wire, period, alloc)
    gc.collect()
    heap = gc.mem_alloc() - heap
    check(alloc[0] == 0, kind + ": waiting/sending polls allocated %d bytes" % alloc[0])
    check(alloc[1] < 1024, kind + ": a receiving poll allocated %d bytes" % alloc[1])
    check(heap <= 512, kind + ": heap grew %d bytes in 20 cycles" % heap)

    for fault, err in FAULTS:
        good = m.reading
        count = m.errors[err]
        sim.fault = fault
        run(m, wire, period)
        check(m.errors[err] == count + 1, kind + " " + fault + ": " + repr(m.errors))
        check(m.reading is good and m.last_error, kind + " " + fault + ": reading kept")
        sim.fault = None
        run(m, wire, period)
        check(m.reading is not good and m.last_error is None, kind + " " + fault + ": recovered")
    check(wire.bad == 0, kind + ": DE high/low at the wrong time")

    # issue 10 item 8: the register restarts from 0 and counts on: the first low value is
    # refused, the next confirms it, a new epoch starts and nothing is refused for ever
    sim.fault = "reboot"
    for _ in range(3):
        sim.world.energy_wh += 10
        run(m, wire, period)
    sim.fault = None
    r = m.reading
    check(m.errors["reboot"] == 1 and m.epoch == 1 and r.epoch == 1, kind + " restart: " + repr(
        m.errors))
    check(r.energy_wh == 20 and m.last_error is None, kind + " restart: " + repr(r))


class RawSim(ModbusMeterSim):
    """A DDSU666 with some registers set to raw float32 values."""
    raw = {}

    def registers(self, read_energy=False):
        regs = ModbusMeterSim.registers(self, read_energy)
        for k in self.raw:
            regs[k] = self.raw[k]
        return regs


# issue 10 item 13: float32 kWh bits -> Wh, half up; from fractions.Fraction (test_hostile_meters)
VECTORS = (
    (0x47800000, 65536000), (0x47800001, 65536008), (0x47800002, 65536016),
    (0x47800003, 65536023), (0x47800008, 65536063), (0x47FFFFFF, 131071992),
    (0x47C00000, 98304000), (0x47923456, 74856672), (0x47E54321, 117382258),
    (0x47C923B8, 102983438), (0x47842BBF, 67671492), (0x47B6E5D6, 93643672),
    (0x47BDC494, 97161156), (0x47C9FEE5, 103421789), (0x4781E607, 66508055),
    (0x3F800000, 1000), (0x3A83126F, 1), (0x3A03126F, 1), (0x00000001, 0), (0x80000000, 0),
)


def hostile_case():
    import struct
    # items 11, 12: extreme registers are counted errors, never an exception (OverflowError
    # on a float32 port) nor a published reading
    for reg, kind in ((0x2004, "implausible"), (0x4000, "garbage"), (0x2000, "implausible"),
                      (0x2002, "implausible")):
        T[0] = 0
        sim = RawSim(World(), model="ddsu666")
        sim.raw = {reg: 3.4e38}
        wire = Wire(sim, 9600)
        m = driver("ddsu666", wire)
        run(m, wire, 2000)
        check(m.reading is None and m.errors[kind] == 2, "extreme 0x%04x: %r" % (reg, m.errors))
    # item 13: the same Wh on every port, from the register's bits
    import modbus_meter
    for bits, wh in VECTORS:
        raw = struct.pack(">I", bits)
        got = modbus_meter.kwh_to_wh(raw, 0)
        check(got == wh, "kwh_to_wh(0x%08x) = %d, not %d" % (bits, got, wh))
        if bits >> 23 == 127 + 16:  # and read by the driver
            T[0] = 0
            sim = RawSim(World(), model="ddsu666")
            sim.raw = {0x4000: struct.unpack(">f", raw)[0]}
            wire = Wire(sim, 9600)
            m = driver("ddsu666", wire)
            run(m, wire, 500)
            check(m.reading.energy_wh == wh, "driver 0x%08x: %r" % (bits, m.reading))


def s0_case():
    world = World()
    world.energy_wh = 0.0
    sim = S0MeterSim(world, imp_per_kwh=1000, pulse_ms=50)

    class Pin:
        level = 1

        def value(self):
            return self.level

    pin = Pin()
    m = sys.modules["s0_setup"].build(pin, imp_per_kwh=1000)
    waste = 0
    gc.collect()
    heap = gc.mem_alloc()
    for t in range(5, 62000, 5):  # 60 s at 7.2 kW = 120 Wh = 120 pulses, then 2 s idle
        world.energy_wh = 7200 * min(t, 60000) / 3600000
        pin.level = sim.level(t * 1000)  # the sim outside the measured poll()
        before = m.reading
        a = gc.mem_alloc()
        m.poll(t)
        used = gc.mem_alloc() - a
        if m.reading is before and used > 0:
            waste += used
    gc.collect()
    heap = gc.mem_alloc() - heap
    check(m.pulses == 120 == sim.pulses_sent, "s0: %d pulses" % m.pulses)
    check(m.reading.energy_wh == 120, "s0: " + repr(m.reading))
    check(waste == 0, "s0: polls without a new reading allocated %d bytes" % waste)
    check(heap <= 512, "s0: heap grew %d bytes" % heap)
    check(not m.errors["glitch"] and not m.errors["stuck"], "s0: " + repr(m.errors))


def load(name):
    gc.collect()  # compile into a clean heap, before the case's objects exist
    __import__(name)


def unload(name):
    del sys.modules[name]
    gc.collect()


load("modbus_meter")
load("meter_setup")
for model, baud in (("ddsu666", 9600), ("sdm120", 2400), ("sdm630", 9600)):
    rs485_case(model, ModbusMeterSim(World(), model=model, address=3), baud, address=3)
hostile_case()
unload("modbus_meter")
load("dlt645")
load("dlt645_setup")
rs485_case("dlt645", Dlt645MeterSim(World()), 2400)  # address learnt
rs485_case("dlt645", Dlt645MeterSim(World(), address=b"\x21\x43\x65\x87\x09\x00"), 2400,
           address="000987654321")
unload("dlt645_setup")
unload("dlt645")
load("s0_meter")
load("s0_setup")
s0_case()
unload("s0_setup")
unload("meter_setup")
print("upy meter selftest ok")
