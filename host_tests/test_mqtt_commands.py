"""Remote commands end to end: the firmware on the unix port with the simulated hardware, a real
mosquitto, commands signed as the cloud signs them (tools/pilecmd.py). set_availability takes
the pile out of service (pilot F or steady +12 V) once the running session has ended and back;
set_availability and set_current_limit survive a restart on the same flash (docs/commands.md)."""
import os
import threading
import time

import pytest

from pilehost import pilecmd, unix_port
from pilehost.cloud import schemas
from pilehost.link_rig import C_TO_B_LIMIT_MS, HEAP, mqtt_config, signed
from pilehost.procs import TIMEOUT

SCHEMAS = schemas()

SCHEDULED = "scheduled: takes effect when the running session has ended"  # charger.SCHEDULED


@pytest.fixture
def broker(tmp_path, new_broker):
    """One per test: no retained status of an earlier test's pile (conftest's `watcher` uses it)."""
    return new_broker(tmp_path / "mosquitto")


class Pile:
    """The firmware running a scenario of its own in a thread, on a flash folder that outlives it."""

    def __init__(self, monkeypatch, name, steps, port, flash):
        flash.mkdir(exist_ok=True)
        monkeypatch.setitem(unix_port.scenarios.SCENARIOS, name,
                            {"doc": "test_mqtt_commands", "steps": steps})
        self.lines = []
        self.run = None
        self.thread = threading.Thread(target=self._run, args=(name, port, str(flash)))
        self.thread.start()

    def _run(self, name, port, flash):
        self.run = unix_port.run_scenario(name, config=mqtt_config(port), heapsize=HEAP, flash_dir=flash,
                                          on_line=self.lines.append)

    def wait(self, predicate, what, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not self.thread.is_alive():
                break
            time.sleep(0.02)
        pytest.fail("waiting for %s; the pile said:\n%s" % (what, "\n".join(self.lines[-40:])))

    def join(self):
        self.thread.join(60)
        r = self.run
        assert r is not None and r.returncode == 0 and r.result is not None, "\n".join(self.lines[-30:])
        assert not any("Traceback" in line or "MemoryError" in line for line in r.lines), "\n".join(r.lines)
        return r


def statuses(w, boot):
    return [s for s in w.of("status") if s["boot"] == boot]


def status_is(w, boot, **fields):
    s = statuses(w, boot)
    return bool(s) and all(s[-1][k] == v for k, v in fields.items())


def acked(w, cmd_id):
    return [a for a in w.of("cmd/ack") if a["cmd_id"] == cmd_id]


def command(pile, w, cmd, args, counter, cmd_id):
    w.publish(signed(cmd, args, counter, cmd_id))
    pile.wait(lambda: acked(w, cmd_id), "the ack of " + cmd_id)
    ack = acked(w, cmd_id)[0]
    SCHEMAS.check("cmd_ack", ack)
    return ack["result"], ack["reason"]


def subscribed(pile, w):
    """Clean session: a command sent before the pile has subscribed is lost. request_status until
    one is answered; returns a counter above every one used (milliseconds, as pilecmd does),
    and above the floor a `replayed` answer names (after a reboot: docs/commands.md, "Replays")."""
    counter = int(time.time() * 1000)
    hello = "hello-%d-" % counter
    for i in range(50):
        w.publish(signed("request_status", {}, counter + i, hello + str(i)))
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            answers = [a for a in w.of("cmd/ack") if a["cmd_id"].startswith(hello)]
            if answers:
                floor = pilecmd.floor_of(answers[0]["reason"])
                return counter + 100 if floor is None else max(counter, floor) + 100
            time.sleep(0.02)
    pytest.fail("the pile never answered a command:\n" + "\n".join(pile.lines[-40:]))


def test_unavailable_f_after_the_running_session_then_available_again(monkeypatch, broker, watcher, tmp_path,
                                                                      unix_binary):
    steps = [(300, "plug"), (1000, "request"), (16000, "end")]
    pile = Pile(monkeypatch, "availability_f", steps, broker.port, tmp_path / "flash")
    try:
        pile.wait(lambda: status_is(watcher, 1, state="charging"), "charging")
        counter = subscribed(pile, watcher)
        # OCPP 1.6 ChangeAvailability: a running session goes on, the change waits for its end.
        assert command(pile, watcher, "set_availability", {"state": "unavailable_f"}, counter + 1,
                       "off-1") == ("accepted", SCHEDULED)
        time.sleep(0.5)
        assert status_is(watcher, 1, state="charging")
        assert command(pile, watcher, "remote_stop", {}, counter + 2, "stop-1") == ("accepted", None)
        pile.wait(lambda: status_is(watcher, 1, state="unavailable", pilot="F"), "out of service, pilot F")
        out = statuses(watcher, 1)[-1]
        assert (out["offer_a"], out["session_id"], out["faults"]) == (0, None, [])
        assert command(pile, watcher, "set_availability", {"state": "available"}, counter + 3,
                       "on-1") == ("accepted", None)
        pile.wait(lambda: status_is(watcher, 1, state="charging"), "charging again")
    finally:
        r = pile.join()
    for s in watcher.of("status"):
        SCHEMAS.check("status", s)
    ended = watcher.of("session/ended")
    assert [e["stop_reason"] for e in ended] == ["remote"]
    assert len(watcher.of("session/started")) == 2  # the car still plugged in: a new session
    # The hardware: the contactor opened, then -12 V, then an offer again and a close.
    events = sorted([(t, text) for t, text in r.sim_events("contactor") if text.startswith("coil")]
                    + [(t, "pilot " + text) for t, text in r.sim_events("pilot")])
    kinds = [text for _, text in events]
    f_at = kinds.index("pilot -12 V steady (F)")
    assert [k for k in kinds[:f_at] if k.startswith("coil")][-2:] == ["coil ON", "coil off"], kinds
    assert kinds[f_at + 1] == "pilot +12 V steady" and kinds[f_at + 2].startswith("pilot PWM"), kinds
    assert "coil ON" in kinds[f_at:], kinds
    assert max(r.result["latencies_ms"]) < C_TO_B_LIMIT_MS


def test_current_limit_and_availability_survive_a_restart(monkeypatch, broker, watcher, tmp_path,
                                                          unix_binary):
    flash = tmp_path / "flash"
    pile = Pile(monkeypatch, "settings_set", [(7000, "end")], broker.port, flash)
    try:
        pile.wait(lambda: statuses(watcher, 1), "the first status")
        counter = subscribed(pile, watcher)
        assert command(pile, watcher, "set_current_limit", {"amps": 10}, counter + 1,
                       "limit-1") == ("accepted", None)
        assert command(pile, watcher, "set_availability", {"state": "unavailable_b1"}, counter + 2,
                       "off-1") == ("accepted", None)
        pile.wait(lambda: status_is(watcher, 1, state="unavailable", pilot="A"), "out of service")
    finally:
        pile.join()
    assert os.path.exists(flash / "settings.json")

    # The same board boots again, a car arrives: out of service (+12 V, no offer) until told.
    steps = [(300, "plug"), (1000, "request"), (12000, "end")]
    pile = Pile(monkeypatch, "settings_kept", steps, broker.port, flash)
    try:
        pile.wait(lambda: status_is(watcher, 2, state="unavailable", pilot="B"), "out of service at boot")
        time.sleep(1.0)  # the car wants power since 1 s: still nothing offered
        assert status_is(watcher, 2, state="unavailable", pilot="B", offer_a=0)
        counter = subscribed(pile, watcher)
        assert command(pile, watcher, "set_availability", {"state": "available"}, counter + 1,
                       "on-1") == ("accepted", None)
        pile.wait(lambda: status_is(watcher, 2, state="charging"), "charging")
        assert statuses(watcher, 2)[-1]["offer_a"] == 10.0  # the remote limit kept
    finally:
        r = pile.join()
    assert [text for _, text in r.firmware_events("settings")] == ["unavailable_b1, remote limit 10000 mA"]
    offers = [text for _, text in r.sim_events("pilot") if text.startswith("PWM")]
    assert offers and all(text.startswith("PWM 16.6%") for text in offers), offers  # 10 A / 0.6 A per %
