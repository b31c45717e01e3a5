"""The unix port's `time` with the simulated board's wall clock: time.time() reads the RTC
(machine.RTC, world.WORLD), as on an ESP32, where NTP sets it. rom.py installs it as
sys.modules["time"] before the firmware loads; the simulator keeps the port's own module."""
import time as _port
from time import *  # noqa: F403 - the ticks, sleeps and the rest are the port's own

import world


def time():
    return world.WORLD.wall_us() // 1000000  # whole seconds, as on the ESP32


def gmtime(secs=None):
    return _port.gmtime(time() if secs is None else secs)


localtime = gmtime  # an ESP32 has no time zone
