"""The chip model's ROM (MicroPython): sim/rom.py's run, arranged for counting instructions
(pilehost/chipmodel.py runs it under callgrind on the chip build, pilehost/chipbuild.py).

- time is sim/vclock.py's virtual clock, sockets are sim/chip_net.py's broker: the run is the
  same every time;
- everything the simulated hardware does runs inside chipmark.hw() and is not counted: on a
  pile it is C (GPIO, ADC, UART, lwIP, LittleFS) or not the CPU's work; the pilot burst too
  (PilotSampler.sample): it lasts BURST_US whatever the CPU, the model adds it as time;
- each watchdog feed (once per control-loop iteration, firmware/main.py's run()) prints one
  `CHIP {...}` line of what the iteration did (bursts, meter bytes, flash writes, MQTT packets)
  and then calls chipmark.mark(), where callgrind cuts its counts. Every cut has its line, in
  order: the model pairs them. Other cuts: the ROM's start ("rom"), gc.collect() with the
  simulator alone and at the end with the firmware ("gc"), the scenario's tail ("tail").

Usage (cwd = the flash folder, with chip_commands.json: [[ms, topic, payload], ...]):
    micropython -m chip_rom
"""
import gc
import sys

import heap_hold  # (first: what it holds is the heap's bottom, below the simulator)

# The run's heap as a pile's: the firmware's objects from the bottom, the simulator's long-lived
# ones (its bytecode, the world, the broker: ~48 KB) out of their way at the top. gc_alloc scans
# the allocation table upwards from the first free block for a run of free blocks long enough,
# so a simulator interleaved below the firmware's objects would lengthen the scan of each of the
# firmware's larger allocations (~200 k instructions a meter reply, ~2 ms on the chip's slow
# bound). Held until the simulator is set up (_Hooks.ready), then freed (sim/heap_hold.py).
_SIM_ROOM = 160 * 1024
_below = heap_hold.hold(_SIM_ROOM)

import vclock  # noqa: E402

sys.modules["time"] = vclock  # before anything else imports time

import json  # noqa: E402

import chip_flash  # noqa: E402
import chipmark  # noqa: E402
import world  # noqa: E402

world._host_time = vclock.time
import chip_net  # noqa: E402

sys.modules["socket"] = chip_net
sys.modules["select"] = chip_net
import machine  # noqa: E402
import pilot  # noqa: E402
import relay  # noqa: E402

ADC_READ_US = 35  # one ESP32 ADC read from Python (firmware/pilot.py, evse-facts section 6)

hw = chipmark.hw
_stats = {}


def _clear():
    _stats["bursts"] = 0
    _stats["meter_rx"] = 0
    _stats["flash"] = []  # [path, mode, bytes written, size before]
    _stats["meta"] = []  # ["rename"|"remove", path]
    _stats["collects"] = 0  # the firmware's gc.collect() calls
    _stats["scans"] = 0  # its gc.mem_free() calls
    if chip_net.BROKER is not None:
        chip_net.BROKER.events = []


def _emit(kind, extra):
    w = world.WORLD
    broker = chip_net.BROKER
    if (not extra and _stats["bursts"] <= 1 and not _stats["meter_rx"] and not _stats["flash"]
            and not _stats["meta"] and not _stats["collects"] and not _stats["scans"]
            and not (broker and broker.events)):
        # a plain interval: one short line, built without allocating (the simulator's garbage
        # would make the heap collect more often than the firmware's own does)
        print("CHIP", kind, w.now // 1000, 1 if w.coil else 0, w._car_letter, gc.mem_alloc(),
              _stats["bursts"])
        _stats["bursts"] = 0
        return
    line = {"kind": kind, "t": w.now // 1000 if w is not None else 0}
    if w is not None:
        line["coil"] = w.coil
        line["car"] = w._car_letter
    line["alloc"] = gc.mem_alloc()  # a drop since the last line: a collection ran in between
    line.update(_stats)
    line["net"] = chip_net.BROKER.events if chip_net.BROKER is not None else []
    line.update(extra)
    print("CHIP " + json.dumps(line))
    _clear()


def cut(kind, **extra):
    """Close the interval counted since the last cut, with its line."""
    hw(_emit, kind, extra)
    chipmark.mark()


_excluded = chipmark.excluded  # a native callable: binds self, costs a native call


for _cls, _names in ((machine.Pin, ("value", "on", "off", "irq")),
                     (machine.PWM, ("freq", "duty_u16", "deinit")),
                     (machine.UART, ("write", "any", "readinto", "flush")),
                     (machine.RTC, ("datetime",)),
                     (chip_net.socket, ("setblocking", "connect", "write", "send", "readinto", "close")),
                     (chip_net.poll, ("register", "modify", "unregister", "poll"))):
    for _name in _names:
        setattr(_cls, _name, _excluded(getattr(_cls, _name)))
machine.Pin.__call__ = machine.Pin.value
for _name in ("idle", "reset", "soft_reset", "reset_cause", "unique_id"):
    setattr(machine, _name, _excluded(getattr(machine, _name)))

_adc_read_uv = machine.ADC.read_uv
_adc_read_u16 = machine.ADC.read_u16


def _adc_uv(self):
    vclock.spend(ADC_READ_US)
    return _adc_read_uv(self)


def _adc_u16(self):
    vclock.spend(ADC_READ_US)
    return _adc_read_u16(self)


machine.ADC.read_uv = _excluded(_adc_uv)
machine.ADC.read_u16 = _excluded(_adc_u16)

_uart_read = machine.UART.read


def _uart_read_counted(self, n=-1):
    data = _uart_read(self, n)
    if data:
        _stats["meter_rx"] += len(data)
    return data


machine.UART.read = _excluded(_uart_read_counted)

_sample = pilot.PilotSampler.sample


def _burst(self):
    _stats["bursts"] = 1  # the burst belongs to the interval it opens
    _sample(self)


_burst_x = _excluded(_burst)


def _cut_and_burst(self):
    # A cut at every pilot read (the tick's and Controller.guard's): the interval it closes is
    # the chip time since the previous read, or since the previous cut (the model sums them).
    # Never inside chipmark.hw: callgrind counts again after a dump made there.
    hw(_emit, "burst", {})
    chipmark.mark()
    _burst_x(self)


pilot.PilotSampler.sample = _cut_and_burst

_contactor_open = relay.Contactor.open


_contactor_open_x = _excluded(_contactor_open)


def _open_cut(self):
    """A cut when the contactor opens: the chip time from the deciding read to the coil."""
    was = self.closed
    _contactor_open_x(self)
    if was:
        hw(_emit, "open", {})
        chipmark.mark()


relay.Contactor.open = _open_cut

_contactor_close_x = _excluded(relay.Contactor.close)


def _close_cut(self):
    """A cut when the contactor closes: what came before it in the gap was not time closed."""
    was = self.closed
    _contactor_close_x(self)
    if not was and self.closed:
        hw(_emit, "close", {})
        chipmark.mark()


relay.Contactor.close = _close_cut

_feed = machine.WDT.feed
_first_feed = [False]


def _feed_counted(self):
    _feed(self)
    _emit("boot" if _first_feed[0] else "loop", {})
    _first_feed[0] = False


def _feed_and_cut(self):
    hw(_feed_counted, self)
    chipmark.mark()


machine.WDT.feed = _feed_and_cut


# -- flash: what the firmware writes, for the model's page programs and sector erases ------------

chip_flash.install(lambda rec: _stats["flash"].append(rec), lambda rec: _stats["meta"].append(rec))


# -- gc: the firmware's collections and heap scans, modelled at the chip's heap -------------------

class _Gc:
    """`gc` for the firmware: gc.collect() and gc.mem_free() run uncounted and are counted as
    events instead (the model adds a collection, or a scan, of the chip's heap: this run's heap
    holds the simulator too, and is larger)."""

    def __getattr__(self, name):
        return getattr(gc, name)


def _collect():
    _stats["collects"] += 1
    gc.collect()


def _mem_free():
    _stats["scans"] += 1
    return gc.mem_free()


_Gc.collect = staticmethod(_excluded(_collect))
_Gc.mem_free = staticmethod(_excluded(_mem_free))


# -- the run -------------------------------------------------------------------------------------

class _Hooks:
    def ready(self, sim):
        heap_hold.release(*_below)  # the simulator is set up: the heap below it is the firmware's

    def booting(self, sim):
        if sim.boots == 1:
            gc.collect()
            cut("rom")
            gc.collect()  # nothing to free: marking the live heap, and the sweep over it
            cut("gc", live=gc.mem_alloc(), free=gc.mem_free(), who="simulator")
        else:
            cut("reset")
        sys.modules["gc"] = _Gc()  # for the firmware's imports (rom.py keeps the real one)
        _first_feed[0] = True

    def ended(self, sim):
        gc.collect()
        cut("tail")
        gc.collect()  # as in booting(): the same work for the firmware's live heap added
        cut("gc", live=gc.mem_alloc(), free=gc.mem_free(), who="firmware")


def start():
    with open("chip_commands.json") as f:
        commands = [tuple(c) for c in json.load(f)]
    chip_net.BROKER = chip_net.Broker([(t, topic, payload.encode()) for t, topic, payload in commands])
    _clear()
    import rom

    rom.start(_Hooks())


start()
