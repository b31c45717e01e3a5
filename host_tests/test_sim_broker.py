"""`make sim` talks MQTT to a local broker by default (tools/sim.py): mosquitto when installed,
else amqtt, the pure-Python broker pinned in requirements-dev.txt (a fresh machine without root
has no mosquitto), and prints what the reference consumer received."""
import os
import subprocess
import sys

import pytest

from pilehost import ROOT, broker, unix_port

try:
    unix_port.micropython_binary()
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    pytest.skip("MicroPython unix port not installed (make venv)", allow_module_level=True)

RECEIVED = "---- what the consumer received:"


def sim(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sim.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


def received(out):
    """The consumer's report at the end: {"sessions:": "...", ...}."""
    report = out.split(RECEIVED, 1)[1].splitlines()
    return dict(line.split(None, 1) for line in report if line and not line.startswith(("----", "received ")))


def test_the_broker_is_mosquitto_when_installed_else_amqtt():
    assert broker.broker_kind("auto", "/usr/sbin/mosquitto") == "mosquitto"
    assert broker.broker_kind("auto", None) == "amqtt"  # a fresh machine, no root to install it
    assert broker.broker_kind("amqtt", "/usr/sbin/mosquitto") == "amqtt"
    with pytest.raises(SystemExit, match="apt-get install mosquitto"):
        broker.broker_kind("mosquitto", None)


@pytest.mark.parametrize("asked", ["auto", "amqtt"])
def test_sim_session_reaches_the_consumer_through_the_broker(asked):
    out = sim("normal", *(["--broker", asked] if asked != "auto" else []))
    kind = broker.broker_kind(asked, broker.find_mosquitto())
    assert ("broker: %s" % kind) in out
    assert "mqtt: connected to 127.0.0.1:" in out
    got = received(out)
    assert got["sessions:"].startswith("sim-pile-1-1-1, ev_disconnected, ")
    assert got["session_starts:"] == "sim-pile-1-1-1, free_vend"
    assert got["piles:"].startswith("sim-pile-1, ") and ", idle, A, " in got["piles:"]
    assert got["rejected:"] == "none"
    counts = dict(item.rsplit(" ", 1) for item in got["messages:"].split(", "))
    assert (counts["session/started"], counts["session/ended"]) == ("1", "1")
    assert int(counts["status"]) >= 3 and counts["online"] == "2"  # online, then the last will
    assert "sessions 1 new / 0 duplicate" in out


def test_sim_without_a_broker():
    out = sim("diode_missing", "--no-broker")
    assert "broker:" not in out and RECEIVED not in out
    assert not [line for line in out.splitlines() if "] mqtt: " in line]
    assert "1 boot(s)" in out


@pytest.mark.parametrize("broker, flags", [("", ""), ("BROKER=none", "--no-broker"),
                                           ("BROKER=amqtt", "--broker amqtt"), ("BROKER=1", "")])
def test_make_sim_broker_variable(broker, flags):
    r = subprocess.run(["make", "-n", "sim", "SCENARIO=normal"] + ([broker] if broker else []), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = [t for t in r.stdout.splitlines() if "tools/sim.py" in t][-1]
    assert line.split("tools/sim.py", 1)[1].split() == ["normal"] + flags.split()
