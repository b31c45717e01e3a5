"""Adds MicroPython's ticks API to CPython's `time` module (host tests only).

The period is the one the ports use (2**30), so wrap-around bugs show up on CPython too.
"""
import time

TICKS_PERIOD = 1 << 30
_HALF = TICKS_PERIOD // 2


def ticks_diff(end, start):
    return ((end - start + _HALF) & (TICKS_PERIOD - 1)) - _HALF


def ticks_add(ticks, delta):
    return (ticks + delta) & (TICKS_PERIOD - 1)


def install():
    if hasattr(time, "ticks_diff"):
        return
    time.ticks_diff = ticks_diff
    time.ticks_add = ticks_add
    time.ticks_ms = lambda: (time.monotonic_ns() // 1_000_000) & (TICKS_PERIOD - 1)
    time.ticks_us = lambda: (time.monotonic_ns() // 1_000) & (TICKS_PERIOD - 1)
    time.sleep_ms = lambda ms: time.sleep(ms / 1000)
    time.sleep_us = lambda us: time.sleep(us / 1_000_000)
