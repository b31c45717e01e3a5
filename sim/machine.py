"""Simulated `machine` module: the ESP32 API the firmware uses, backed by world.WORLD.

On the MicroPython unix port a machine.py on MICROPYPATH replaces the built-in stub. Only what
the ESP32 port offers is here, with its signatures, so code that runs here runs on a pile.
"""
import world


def _w():
    return world.WORLD


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, *, value=None):
        self.id = id
        self.init(mode, pull, value=value)

    def init(self, mode=-1, pull=-1, *, value=None):
        if value is not None:
            _w().pin_write(self.id, value)

    def value(self, x=None):
        if x is None:
            return _w().pin_read(self.id)
        _w().pin_write(self.id, x)
        return None

    __call__ = value

    def on(self):
        _w().pin_write(self.id, 1)

    def off(self):
        _w().pin_write(self.id, 0)

    def irq(self, handler=None, trigger=IRQ_FALLING | IRQ_RISING, *, priority=1, wake=None, hard=False):
        """The handler runs inside the world's next touch, once per edge, with time.ticks_ms()
        reading the edge's time: like a hard IRQ (only the S0 input has edges here)."""
        _w().pin_irq(self, handler, trigger)
        return None


def _pin_id(pin):
    return pin.id if isinstance(pin, Pin) else pin


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_12BIT = 3

    _FULL_SCALE_UV = 3100000  # ESP32 at 11 dB

    def __init__(self, pin, *, atten=None):
        self.id = _pin_id(pin)

    def atten(self, atten):
        pass

    def read_uv(self):
        return _w().adc_uv(self.id)

    def read_u16(self):
        uv = _w().adc_uv(self.id)
        return max(0, min(65535, uv * 65535 // self._FULL_SCALE_UV))


class PWM:
    def __init__(self, dest, *, freq=None, duty_u16=None, duty_ns=None, invert=False):
        self.id = _pin_id(dest)
        self._freq = freq or 5000
        self._duty = duty_u16 if duty_u16 is not None else 0
        _w().pwm_set(self.id, self._freq, self._duty)

    def freq(self, value=None):
        if value is None:
            return self._freq
        self._freq = value
        _w().pwm_set(self.id, value, None)
        return None

    def duty_u16(self, value=None):
        if value is None:
            return self._duty
        self._duty = value
        _w().pwm_set(self.id, None, value)
        return None

    def deinit(self):
        _w().pwm_release(self.id)


class UART:
    def __init__(self, id, baudrate=115200, bits=8, parity=None, stop=1, *, tx=None, rx=None,
                 timeout=0, timeout_char=0, rxbuf=256):
        self.id = id
        self.baudrate = baudrate
        self._channel = _w().uarts.get(id)

    def init(self, *args, **kwargs):
        pass

    def write(self, buf):
        if self._channel is None:
            return len(buf)  # nothing on this bus
        return self._channel.write(bytes(buf), _w().advance())

    def any(self):
        _w().advance()
        return 0 if self._channel is None else len(self._channel.rx)

    def read(self, n=-1):
        _w().advance()
        if self._channel is None or not self._channel.rx:
            return None
        return self._channel.take(n)

    def readinto(self, buf, n=-1):
        data = self.read(len(buf) if n < 0 else n)
        if not data:
            return None
        buf[: len(data)] = data
        return len(data)

    def flush(self):
        pass


class WDT:
    def __init__(self, id=0, timeout=5000):
        if timeout < 1000:
            raise ValueError("ESP32 WDT timeout must be at least 1000 ms")
        _w().wdt_start(timeout)

    def feed(self):
        _w().wdt_feed()


class RTC:
    """The board's clock, which time.time() reads (sim/sim_time.py): the host's clock until the
    firmware sets it (NTP) or a scenario flattens it ("rtc_flat"); world.log records each set."""

    def __init__(self, id=0):
        pass

    def datetime(self, datetimetuple=None):
        if datetimetuple is None:
            return _w().rtc_read()
        _w().rtc_set(datetimetuple)
        return None

    def init(self, datetimetuple):
        _w().rtc_set(datetimetuple)


PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


def reset():
    raise world.SimReset(SOFT_RESET)  # the ESP32: esp_restart() -> ESP_RST_SW -> SOFT_RESET


def soft_reset():
    raise world.SimReset(SOFT_RESET)


def reset_cause():
    return _w().reset_cause


def idle():
    _w().advance()


def unique_id():
    return b"\x24\x0a\xc4\x5e\x1a\x01"


def freq(hz=None):
    return 240000000
