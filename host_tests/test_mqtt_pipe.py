"""mqtt_conn._Pipe is what umqtt.simple takes for its socket. It must offer every socket method
the umqtt.simple versions a pile may load call on it: 1.3.4 (PyPI, what `make deps` fetches into
lib/) and 1.8.0 (micropython-lib; frozen into the stock ESP32 image by
ports/esp32/boards/manifest.py, ahead of /lib on sys.path). A missing method is an
AttributeError past `except OSError`: the fail-safe, a reset, again and again. (umqtt's
connect(), which also called settimeout() and connect(), is no longer used: mqtt_conn.py builds
the CONNECT itself; test_mqtt_conn.py checks it is the same bytes.)"""
import os
import subprocess

import pytest

from pilehost import unix_port

# What umqtt.simple's publish(), subscribe(), ping(), wait_msg() and disconnect() call: write a
# packet (in pieces), read the answer (not there yet: EAGAIN), setblocking, close.
SCRIPT = """
import errno
import mqtt_conn
pipe = mqtt_conn._Pipe(64)
pipe.close()
pipe.setblocking(True)
pipe.write(b"\\x10\\x0c\\x00\\x04MQTT", 8)
pipe.write(b"\\x04\\x02")
try:
    pipe.read(4)
    print("read gave bytes")
except OSError as e:
    print("read", "EAGAIN" if e.args[0] == errno.EAGAIN else e.args[0])
print("pending", pipe.pending(), bytes(pipe.mv[pipe.head:pipe.tail]))
"""


def test_the_pipe_takes_every_call_umqtt_simple_makes_on_its_socket(tmp_path):
    try:
        exe = unix_port.micropython_binary()
    except FileNotFoundError:  # pragma: no cover - `make test` installs it
        pytest.skip("MicroPython unix port not installed (make venv)")
    env = dict(os.environ, MICROPYPATH=unix_port.micropypath())
    proc = subprocess.run([exe, "-c", SCRIPT], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["read EAGAIN", "pending 10 b'\\x10\\x0c\\x00\\x04MQTT\\x04\\x02'"]
