"""A link that heals itself (firmware/link_heal.py, docs/network.md): the firmware on the unix port
with the simulated Wi-Fi, a real mosquitto behind a relay that breaks the link three ways (a
broker that never answers CONNACK, a Wi-Fi that associates but routes nothing, a half-open TCP
connection). Each heals without a reset while a session runs, and the ladder's steps are in the
retained `health` message once the pile is back. Without a session the board is reset, never
faster than the rate, across resets. A second client with the pile's id is reported, not fought."""
import json
import time

import paho.mqtt.client as mqtt
import pytest

from pilehost import unix_port
from pilehost.cloud import schemas
from pilehost.heal_rig import BreakableRelay
from pilehost.link_rig import C_TO_B_LIMIT_MS, PILE, mqtt_config, until

SCHEMAS = schemas()
WIFI = {"ssid": "depot", "password": "sim-passphrase"}
# The shortest the config allows: the Wi-Fi step after 10 s without a broker, the reset after 15 s
# (due, but held back while a session is open), the keep-alive 10 s (half-open found after 15 s).
LADDER = {"keepalive_s": 10, "wifi_restart_after_s": 10, "reset_after_s": 15, "reset_min_interval_s": 10,
          "health_interval_s": 10, "conflict_pause_s": 10}

try:
    unix_port.micropython_binary()
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    pytest.skip("MicroPython unix port not installed (make venv)", allow_module_level=True)


def start(scenario_thread, port, steps, lines, flash_dir=None, **ladder):
    """The scenario with the simulated Wi-Fi and LADDER in a thread (conftest's scenario_thread)."""
    config = mqtt_config(port, **dict(LADDER, **ladder))
    config["wifi"] = WIFI
    return scenario_thread("heal", config, steps, heap_extra_kb=unix_port.scenarios.WIFI_HEAP_EXTRA_KB,
                           on_line=lines.append, timeout=180, flash_dir=flash_dir)


def has(lines, text):
    return sum(1 for line in list(lines) if text in line)


def openings(lines, since):
    """(how many times the contactor opened in lines[since:], the firmware's and the simulator's
    lines around the first few: what opened it, what the link was doing), for an assertion's
    message: a failure seen once explains itself. The firmware's lines about an opening follow
    the simulator's (its console writes after the tick's safety work): they are waited for."""
    if not any("sim contactor: coil off" in line for line in list(lines)[since:]):
        return 0, ""
    time.sleep(1)  # the firmware's lines of that tick, and of the next ones
    seen = list(lines)
    at = [i for i in range(since, len(seen)) if "sim contactor: coil off" in seen[i]]
    why = ["-- opening %d of %d (line %d; the outage began after line %d):\n%s" % (
        n + 1, len(at), i, since, "\n".join(seen[max(0, i - 8):i + 10])) for n, i in enumerate(at[:4])]
    if any("sim step: stop_request" in line for line in seen[since:at[0] + 1]):
        why.insert(0, "(the scenario's stop_request came first: the host was too slow for its timeline)")
    return len(at), "\n".join(why)


def finished(box, thread):
    thread.join(120)
    r = box["run"]
    assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-40:])
    assert not any("Traceback" in line or "MemoryError" in line for line in r.lines), "\n".join(r.lines)
    return r


def healths(watcher):
    out = watcher.of("health")
    for h in out:
        SCHEMAS.check("health", h)
    return out


@pytest.mark.parametrize("mode, symptom", [
    ("connack", "no CONNACK within 5 s"),
    ("no_route", "no TCP connection within 5 s"),
    ("half_open", "broker silent for 1.5 x keep-alive"),
])
def test_a_broken_link_heals_without_a_reset_while_a_session_runs(broker, watcher, scenario_thread, mode,
                                                                  symptom):
    relay = BreakableRelay(broker.port)
    relay.up()
    lines = []
    steps = [(300, "plug"), (1000, "request"), (2000, "stop_request"), (2600, "request"),
             (52000, "stop_request"), (52500, "unplug"), (56000, "end")]
    thread, box = start(scenario_thread, relay.port, steps, lines)
    try:
        until(lambda: has(lines, "mqtt: connected") and has(lines, "coil ON"), "charging, connected",
              thread, lines)
        until(lambda: [h for h in watcher.live("health") if h["link"]["connects"] == 1], "the birth health",
              thread, lines)
        until(lambda: has(lines, "coil ON") >= 2, "charging after the pause", thread, lines)
        outage = len(lines)
        relay.break_link(mode)
        # Two Wi-Fi restarts: the second comes 20 s into the outage, when a reset (15 s) is due
        # but held back by the open session.
        until(lambda: has(lines, "mqtt: restarting the Wi-Fi") >= 2, "two Wi-Fi restarts", thread, lines, 60)
        n, around = openings(lines, outage)
        assert n == 0, "charging all along, yet the contactor opened:\n" + around
        relay.heal()
        until(lambda: has(lines, "mqtt: connected") >= 2, "the link back", thread, lines, 40)
        until(lambda: [h for h in watcher.live("health") if h["link"]["connects"] == 2], "health after",
              thread, lines)
    finally:
        r = finished(box, thread)
        relay.close()
    assert r.result["boots"] == 1 and not any("resetting the board" in t for t in r.lines)
    assert any(symptom in t for t in r.lines), "\n".join(r.lines)
    wifi = [t for _, t in r.firmware_events("wifi")]
    assert len([t for t in wifi if t.startswith("restarting the connection to 'depot'")]) >= 2
    assert len([t for _, t in r.sim_events("wifi") if t.startswith("station joined")]) >= 3
    lat = r.result["latencies_ms"]
    assert lat and max(lat) < C_TO_B_LIMIT_MS
    back = [h for h in healths(watcher) if h["link"]["connects"] == 2][0]
    link = back["link"]
    assert link["wifi_restarts"] >= 2 and link["resets"] == 0 and link["reconnects"] >= 2
    assert link["last_step"] == "wifi_restart" and "with the Wi-Fi up" in link["last_reason"]
    assert back["reset_cause"] == "power_on" and back["wifi_rssi"] == -61
    assert back["outbox_records"] >= 0 and back["loop_ms"]["max"] >= back["loop_ms"]["avg"] > 0
    ended = watcher.live("session/ended")
    assert [e["stop_reason"] for e in ended] == ["ev_disconnected"]


def test_without_a_session_the_board_resets_but_never_faster_than_the_rate(broker, watcher, scenario_thread,
                                                                           tmp_path):
    """No broker from power-on, no car: reset after 15 s (10 s of uptime needed), again in the
    next boot only after 20 s of uptime (the count on flash doubles it); back in boot 3: the
    health says so, and the count on flash is cleared with the contactor open."""
    relay = BreakableRelay(broker.port)
    relay.up()
    relay.break_link("connack")
    lines = []
    thread, box = start(scenario_thread, relay.port, [(70000, "end")], lines, flash_dir=str(tmp_path))
    try:
        until(lambda: has(lines, "sim board: boot 3"), "two escalation resets", thread, lines, 90)
        relay.heal()
        until(lambda: [h for h in watcher.live("health") if h["boot"] == 3], "boot 3's health",
              thread, lines, 40)
        until(lambda: has(lines, "mqtt: connected") and [h for h in watcher.live("health")
                                                          if h["boot"] == 3 and h["uptime_s"] >= 10],
              "a later health", thread, lines, 40)
    finally:
        r = finished(box, thread)
        relay.close()
    assert r.result["boots"] == 3
    resets = [(t, text) for t, text in r.firmware_events("mqtt") if text.startswith("resetting the board")]
    assert len(resets) == 2, resets
    # firmware times count from each boot: the first needs 10 s of uptime, the second 20 s
    assert resets[0][0] >= 15000 and "escalation reset 1" in resets[0][1]
    assert resets[1][0] >= 20000 and "escalation reset 2" in resets[1][1]
    h = [h for h in healths(watcher) if h["boot"] == 3][0]
    assert h["reset_cause"] == "soft" and h["link"]["resets"] == 2
    assert h["link"]["last_step"] == "reset" and h["link"]["last_reason"].startswith("no broker for ")
    kept = json.loads((tmp_path / "heal.json").read_text())
    assert kept["resets"] == 2 and kept["streak"] == 0  # back: the next reset needs 10 s again


def test_a_second_client_with_the_same_id_is_reported_not_fought(broker, watcher, scenario_thread):
    """Another client connects as the pile (a cloned config): mosquitto kicks the older connection
    each time the other connects. The pile sees three kicks, says client_id_conflict and stands
    back conflict_pause_s instead of kicking the other off every second; once the other is gone
    it reconnects and, the connection lasting, the conflict ends."""
    lines = []
    steps = [(300, "plug"), (1000, "request"), (60000, "end")]
    thread, box = start(scenario_thread, broker.port, steps, lines)
    clone = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=PILE, protocol=mqtt.MQTTv311)
    clone.reconnect_delay_set(1, 1)
    kicked = []
    clone.on_disconnect = lambda *a: kicked.append(time.monotonic())
    try:
        until(lambda: has(lines, "mqtt: connected"), "connected", thread, lines)
        clone.connect("127.0.0.1", broker.port)
        clone.loop_start()
        until(lambda: has(lines, "client_id_conflict"), "the conflict", thread, lines, 60)
        seen = len(kicked)
        time.sleep(5)  # within the 10 s pause: the clone keeps its connection
        assert len(kicked) == seen
        clone.loop_stop()
        clone.disconnect()
        until(lambda: [h for h in watcher.live("health") if not h["link"]["client_id_conflict"]
                       and h["link"]["connects"] >= 4], "the conflict over", thread, lines, 40)
    finally:
        clone.loop_stop()
        r = finished(box, thread)
    link = [t for ms, t in r.firmware_events("mqtt")]
    said = [ms for ms, t in r.firmware_events("mqtt") if "client_id_conflict" in t]
    after = [ms for ms, t in r.firmware_events("mqtt") if t.startswith("connected") and ms > said[0]]
    assert after and after[0] - said[0] >= 10000, link  # stood back the whole pause
    assert has(r.lines, "restarting the Wi-Fi") == 0 and r.result["boots"] == 1
    flagged = [h for h in healths(watcher) if h["link"]["client_id_conflict"]]
    assert flagged and flagged[0]["link"]["last_reason"] == "client_id_conflict"
