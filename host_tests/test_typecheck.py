"""tools/typecheck.py (`make check`): code the ESP32 cannot run fails the check, code it can run
passes. Each case is a small module checked exactly as firmware/ is."""
import os

import pytest

from pilehost import typecheck

# Each fails for the reason given: (source, what mypy must say).
NOT_ON_ESP32 = {
    # CPython-only APIs: MicroPython's time has ticks_ms(), its os has no os.path.
    "cpython_time": ("import time\nt = time.monotonic_ns()\n", 'no attribute "monotonic_ns"'),
    "cpython_os_path": ("import os\np = os.path.join('a', 'b')\n", 'no attribute "path"'),
    "cpython_module": ("import threading\n", 'module named "threading"'),
    "cpython_json_indent": ("import json\ns = json.dumps({}, indent=2)\n", '"indent"'),
    # Other ports' APIs: the STM32 ADC's read_timed(), the RP2040's rp2 module.
    "stm32_adc": ("import machine\nmachine.ADC(machine.Pin(36)).read_timed(bytearray(4), 10)\n",
                  'no attribute "read_timed"'),
    "rp2_module": ("import rp2\n", 'module named "rp2"'),
    # The ESP32's watchdog cannot be stopped once started (MicroPython esp32 quickref).
    "wdt_deinit": ("import machine\nmachine.WDT(timeout=2000).deinit()\n", 'no attribute "deinit"'),
    "pwm_keyword": ("import machine\nmachine.PWM(machine.Pin(25), frequency=1000)\n", '"frequency"'),
    # A `# type: ignore` whose reason is gone must go too.
    "stale_ignore": ("import machine\nmachine.Pin(2).value(1)  # type: ignore[attr-defined]\n",
                     'Unused "type: ignore"'),
}

# What the firmware does on the board (wiring.py, meter.py, mqtt_link.py), written the same way.
ESP32_OK = """\
import json
import select
import socket
import time

import machine
import network
from micropython import const
from umqtt import simple

_PERIOD_MS = const(5)

pin = machine.Pin(26, machine.Pin.OUT, value=0)
pin.value(1)
pwm = machine.PWM(machine.Pin(25), freq=1000, duty_u16=65535)
pwm.duty_u16(32768)
adc = machine.ADC(machine.Pin(36), atten=machine.ADC.ATTN_11DB)
uv = adc.read_uv()
uart = machine.UART(2, baudrate=9600, bits=8, parity=None, stop=1, tx=17, rx=16, timeout=0,
                    timeout_char=0)
n = uart.any()
wdt = machine.WDT(timeout=2000)
wdt.feed()
start = time.ticks_ms()
deadline = time.ticks_add(start, 500)
late = time.ticks_diff(time.ticks_ms(), deadline) > 0
time.sleep_ms(_PERIOD_MS)
wlan = network.WLAN(network.STA_IF)
wlan.active(True)
wlan.config(reconnects=3)
addr = socket.getaddrinfo("192.0.2.1", 1883)[0][-1]
sock = socket.socket()
sock.setblocking(False)
poller = select.poll()
poller.register(sock, select.POLLOUT)
text = json.dumps({"v": 1}, separators=(",", ":"))
client = simple.MQTTClient(b"pile-1", "192.0.2.1")
print("%s" % text)
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One mypy cache for this module's checks (the stubs are parsed once); each case has its
    own file name, so no result is taken from another case."""
    return str(tmp_path_factory.mktemp("mypy-cache"))


def check(tmp_path, cache, name, source):
    path = tmp_path / (name + ".py")
    path.write_text(source)
    return typecheck.run([str(path)], cache_dir=cache)


@pytest.mark.parametrize("name", sorted(NOT_ON_ESP32))
def test_an_api_the_esp32_lacks_fails(tmp_path, cache, name):
    source, reason = NOT_ON_ESP32[name]
    status, report = check(tmp_path, cache, name, source)
    assert status == 1, report
    assert reason in report, report


def test_what_the_firmware_uses_passes(tmp_path, cache):
    status, report = check(tmp_path, cache, "esp32_ok", ESP32_OK)
    assert status == 0, report
    assert "Success" in report


def test_typeshed_is_the_esp32_stubs():
    """time, machine and socket come from the ESP32 stubs; the libraries in lib/ are not taken
    from the stubs but read from their source."""
    stdlib = os.path.join(typecheck.typeshed(), "stdlib")
    with open(os.path.join(stdlib, "time.pyi")) as f:
        assert "ticks_ms" in f.read()
    assert os.path.isfile(os.path.join(stdlib, "machine.pyi"))
    with open(os.path.join(stdlib, "VERSIONS")) as f:
        listed = {line.split(":")[0].strip() for line in f if ":" in line and line[0] != "#"}
    assert {"machine", "network", "micropython", "esp32"} <= listed
    shipped = typecheck._shipped()
    assert "umqtt" in shipped  # make deps
    for name in shipped:
        assert name not in listed
        assert not os.path.exists(os.path.join(stdlib, name))
