"""The pile's JSON payloads without their .encode() copy (issue 12 item 3): on MicroPython
session_log.utf8 gives a memoryview of the JSON text (a str has the buffer protocol), never a
bytes copy of it. On the unix port (both binaries): every kind of message, non-ASCII text
where the schemas allow it, reaches a real mosquitto through mqtt_conn and umqtt byte for byte as
json.dumps(obj).encode() of the same object, and the reference consumer takes them all; the
session records go through the flash outbox. And the outbox's payload limit is in bytes: a record
whose JSON is short enough in characters but not in UTF-8 bytes drops its meter name, never the
record (MicroPython's json.dumps writes non-ASCII as it is; CPython's escapes it to ASCII)."""
import json
import os
import subprocess
import time

import pytest

import session_log  # firmware/, under CPython
from pilehost import unix_port
from pilehost.link_rig import PILE, ROOT_TOPIC, Watcher
from pilehost.procs import wait_for

try:
    unix_port.micropython_binary()
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    pytest.skip("MicroPython unix port not installed (make venv)", allow_module_level=True)

# What the firmware builds: each object telemetry.py and session_log.py dump, as the old payload
# (json.dumps(obj).encode()), in `made`; the type of each payload utf8 gives, in `views`.
COMMON = """
import binascii, json, os, sys
import session_log, telemetry
import charger as ch
import journal, journal_scan, session_restore, session_store
from session_record import Record

T_2026 = 1795000000
made = []
views = set()
_utf8 = session_log.utf8


class Json:
    def dumps(self, obj):
        made.append(json.dumps(obj).encode())
        return json.dumps(obj)


def utf8(text):
    p = _utf8(text)
    views.add(type(p).__name__)
    return p


session_log.json = telemetry.json = Json()
session_log.utf8 = telemetry.utf8 = utf8


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


class Reading:
    def __init__(self, wh, w=7360):
        self.energy_wh = wh
        self.power_w = w
        self.current_a = [31.94, 32.0, 0.0]
        self.voltage_v = [230.1, 229.94, 231.0]


def hexed(data):
    return binascii.hexlify(data).decode()


def session_log_in(folder, pile_id, max_payload=journal.DEFAULT_MAX_PAYLOAD):
    try:
        os.mkdir(folder)
    except OSError:
        pass
    return session_restore.load(
        pile_id, 1, journal_scan.load(folder + "/outbox", max_payload=max_payload),
        session_store.SessionStore(folder + "/session.json"), checkpoint_s=60, wall=Clock(T_2026))


def a_session(log, auth_id, meter="modbus:sdm630@1"):
    s = Record(ch.Session(0))
    s.auth_source, s.auth_id, s.authorized_ms = "remote", auth_id, 0
    log.poll(0, s, None)
    s.note_meter(Reading(1843210))
    log.poll(10, s, None)
    s.note_meter(Reading(1852911, w=7400))
    s.stop_reason, s.ended_ms = "ev_disconnected", 4892000
    s.meter_identity = meter
    log._wall.t += 4892
    log.ended(4892000, s)
    return s
"""

WIRE = COMMON + """
import socket, time
import link_setup, mqtt_conn

folder, port = sys.argv[1], int(sys.argv[2])
PILE = %r


class Owner:
    up = False
    acks = 0

    def conn_up(self, now_ms):
        self.up = True

    def conn_puback(self, now_ms, pid):
        self.acks += 1

    def conn_may_take(self):
        return True

    def conn_publish(self, now_ms, topic, msg):
        pass

    def conn_too_large(self, now_ms, size):
        pass

    def conn_report(self, now_ms, text):
        print("REPORT", text)


def until(what):
    t0 = time.ticks_ms()
    while not what():
        conn.step(time.ticks_ms())
        if time.ticks_diff(time.ticks_ms(), t0) > 20000:
            raise OSError("timed out")
        time.sleep_ms(2)


def send(topic, payload, retain=False, qos=1):
    acks = owner.acks
    print("EXPECT", topic.decode(), hexed(made[-1]), bytes(payload) == made[-1])
    conn.publish(topic, payload, retain, qos)
    until(lambda: conn.idle() and (qos == 0 or owner.acks > acks))


log = session_log_in(folder, PILE)
s = a_session(log, "card-1")
t = link_setup.setup_topics(telemetry.Topics(), PILE)
will = telemetry.online(False, 1)
print("WILL", hexed(made[-1]), type(will).__name__)
owner = Owner()
conn = mqtt_conn.MqttConn(owner, PILE.encode(), 30, will=(t.online, will))
conn.open(socket.getaddrinfo("127.0.0.1", port)[0][-1], time.ticks_ms())
until(lambda: owner.up)
wall = T_2026 + 5000
send(t.online, telemetry.online(True, 1), retain=True)
send(t.status, telemetry.status(wall, 1, 4900, ch.CHARGING, "C", 16000, 7360.4, s.id, 9701, 0,
                                "0.1.0", "ref-esp32", (10000, "remote", 5000), 300), retain=True)
send(t.meter, telemetry.meter(wall, s.id, 9701, Reading(1852911), 200), qos=0)
send(t.ack, telemetry.cmd_ack(wall, "c-1", "set_limit", "rejected",
                              "über dem Anschlusswert: 63 A > 32 A (€, ✓, 𝄞)"))
send(t.health, telemetry.health(wall, 1, 4900, "0.1.0", {
    "reset_cause": "power_on", "board": "ref-esp32", "heap_free": 21000,
    "heap_largest_free": 9000, "outbox_records": 2, "outbox_oldest_s": 1,
    "wifi_rssi": -61, "link": {"connects": 2, "reconnects": 1, "wifi_restarts": 1, "resets": 0,
                               "last_step": "wifi_restart",
                               "last_reason": "réseau « dépôt » perdu — 5 s sans réponse",
                               "client_id_conflict": False},
    "meter_errors": None, "loop_ms": {"max": 12, "avg": 3}}), retain=True)
records = list(log.outbox.pending())
for i, (seq, kind, payload) in enumerate(records):
    acks = owner.acks
    # The spy saw the started then the ended record: the flash gives back the same bytes.
    print("EXPECT", t.outbox[kind].decode(), hexed(payload), "outbox",
          bytes(payload) == made[i])
    conn.publish(t.outbox[kind], payload)
    until(lambda: conn.idle() and owner.acks > acks)
print("VIEWS", sorted(views))
conn._sock.close()  # gone without a DISCONNECT: the broker sends the will
print("DONE")
"""

LIMIT = COMMON + """
folder = sys.argv[1]
AUTH_ID = "carte-" + "é" * 6
# The ended record as the log makes it with a meter name, measured in a throwaway outbox:
a_session(session_log_in(folder + "/a", "p-1"), AUTH_ID)
ended = made[-1]
chars = len(ended.decode())
# An outbox that takes the record in characters but not in bytes: the meter name must go, the
# record must not (with the meter null it is 13 bytes shorter; the six "é" are 6 bytes more).
views.clear()
log = session_log_in(folder + "/b", "p-1", max_payload=chars)
a_session(log, AUTH_ID)
kinds = [journal.kind_name(k) for _, k, _ in log.outbox.pending()]
last = [bytes(p) for _, _, p in log.outbox.pending()][-1]
print(json.dumps({"chars": chars, "bytes": len(ended), "limit": log.outbox.max_payload,
                  "kinds": kinds, "too_long": log.too_long, "stored": len(last),
                  "record": json.loads(last.decode()),
                  "views": sorted(views)}))
"""


def run_upy(tmp_path, script, *args):
    with open(str(tmp_path / "script.py"), "w", encoding="utf-8") as f:
        f.write(script)
    env = dict(os.environ, MICROPYPATH=unix_port.micropypath())
    argv = [unix_port.micropython_binary(), str(tmp_path / "script.py")] + [str(a) for a in args]
    proc = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, timeout=120)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, out + proc.stderr.decode("utf-8", "replace")
    return out.splitlines()


def test_the_payload_is_the_json_text_s_utf8_bytes_on_cpython():
    obj = {"v": 1, "reason": "réseau « dépôt » 𝄞", "n": [1, 2.5, None, True]}
    payload = session_log.utf8(json.dumps(obj))
    assert isinstance(payload, bytes) and payload == json.dumps(obj).encode()


def test_every_message_reaches_the_broker_and_the_consumer_as_its_json_bytes(tmp_path, broker, store,
                                                                              unix_binary):
    watcher = Watcher(broker)
    try:
        time.sleep(0.2)
        lines = run_upy(tmp_path, WIRE % PILE, tmp_path, broker.port)
        assert lines[-1] == "DONE", "\n".join(lines)
        will_hex, will_type = next(line.split()[1:] for line in lines if line.startswith("WILL"))
        # Every payload a view of its text, not a copy: the point of the change.
        assert will_type == "memoryview" and "VIEWS ['memoryview']" in lines, "\n".join(lines)
        expected = []
        for line in lines:
            if line.startswith("EXPECT"):
                _, topic, hexed = line.split()[:3]
                assert line.split()[3:] in (["True"], ["outbox", "True"]), line
                expected.append((topic[len("evse/v1/%s/" % PILE):], bytes.fromhex(hexed)))
        expected.append(("online", bytes.fromhex(will_hex)))
        assert [t for t, _ in expected] == ["online", "status", "meter", "cmd/ack", "health",
                                            "session/started", "session/ended", "online"]
        wait_for(lambda: sum(not r for _, _, r in list(watcher.messages)) >= len(expected),
                 "every message at the broker")
        assert [(t, p) for t, p, retained in watcher.messages if not retained] == expected
        assert b"\xe2\x82\xac" in expected[3][1] and "€" in json.loads(expected[3][1])["reason"]
        assert json.loads(expected[4][1])["link"]["last_reason"].startswith("réseau « dépôt »")
        taken = {"online_stored": 2, "status_stored": 1, "meter_stored": 1, "cmd_ack_stored": 1,
                 "health_stored": 1, "session_started_new": 1, "session_ended_new": 1}
        wait_for(lambda: store.count("rejected") or all(store.count(k) == n for k, n in taken.items()),
                 "the consumer's every message")
        assert store.count("rejected") == 0, store.query("SELECT topic, detail FROM rejected")
        assert {k: store.count(k) for k in taken} == taken
    finally:
        # The retained ones cleared: the other binary's run starts at a broker without them.
        for kind in ("online", "status", "health"):
            watcher.client.publish(ROOT_TOPIC + kind, b"", qos=1, retain=True).wait_for_publish(10)
        watcher.close()


def test_the_outbox_limit_is_in_bytes_a_non_ascii_auth_id_drops_the_meter_name_not_the_record(
        tmp_path, unix_binary):
    out = json.loads(run_upy(tmp_path, LIMIT, tmp_path)[-1])
    # The case itself: short enough in characters, too long in bytes with the meter name.
    assert out["chars"] == out["limit"] < out["bytes"]
    assert out["kinds"] == ["session_start", "session_end"] and out["too_long"] == 0
    assert out["record"]["meter"] is None and out["record"]["auth_id"] == "carte-" + "é" * 6
    assert out["stored"] <= out["limit"]
    assert out["views"] == ["memoryview"]
