"""A virtual clock for the chip model (sim/chip_rom.py installs it as `time` before anything
else loads): time moves only when the firmware sleeps, when the simulated hardware says an
operation takes time (an ADC read, chip_rom.ADC_READ_US), and by 1 us per clock read (so that a
loop waiting on the clock ends). Nothing here reads the host's clock: a run is the same run
every time, whatever the host's speed or load (callgrind slows it ~50 times)."""
import time as _port

ticks_diff = _port.ticks_diff
ticks_add = _port.ticks_add
gmtime = _port.gmtime
localtime = _port.gmtime  # an ESP32 has no time zone
mktime = _port.mktime

EPOCH_S = 1767225600  # 2026-01-01T00:00:00Z: the wall clock's start, the same every run
_MASK = 0x3FFFFFFF  # MicroPython's ticks period, 2^30
_now_us = 1000000


def spend(us):
    """The simulated hardware took this long."""
    global _now_us
    _now_us += us


def ticks_us():
    global _now_us
    _now_us += 1
    return _now_us & _MASK


def ticks_ms():
    global _now_us
    _now_us += 1
    return (_now_us // 1000) & _MASK


ticks_cpu = ticks_us


def sleep_ms(ms):
    global _now_us
    if ms > 0:
        _now_us += ms * 1000


def sleep_us(us):
    global _now_us
    if us > 0:
        _now_us += us


def sleep(s):
    sleep_us(int(s * 1000000))


def time():
    return EPOCH_S + _now_us // 1000000


def time_ns():
    return (EPOCH_S * 1000000 + _now_us) * 1000
