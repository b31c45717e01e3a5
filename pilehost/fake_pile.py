"""A pile's telemetry as docs/telemetry.md specifies it, played over MQTT 3.1.1 like the firmware:
normal sessions, replays and duplicates, garbage. Used by host_tests/test_consumer.py, and handy
to commission a consumer without a pile.

Its command line, with the usage: tools/fake_pile.py.

`FakePile` only builds messages (its clock is a counter: no sleeping); `Publisher` sends them.
"""
import argparse
import collections
import datetime
import json
import signal
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt

TOPIC_ROOT = "evse/v1"
UNSYNCED_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)  # the ESP32 port's epoch
SUFFIX = {"status": "status", "online": "online", "session_started": "session/started",
          "session_ended": "session/ended", "meter": "meter", "fault": "fault", "cmd_ack": "cmd/ack"}
QOS = {"meter": 0}  # every other message: QoS 1
RETAINED = ("status", "online")

Message = collections.namedtuple("Message", "topic payload qos retain")  # payload: dict or bytes


def message(pile_id, kind, obj):
    return Message("%s/%s/%s" % (TOPIC_ROOT, pile_id, SUFFIX[kind]), obj, QOS.get(kind, 1), kind in RETAINED)


class FakePile:
    """Counters, clock and meter of one pile; each method returns the message the pile would send."""

    def __init__(self, pile_id="pile-0042", boot=1, clock_synced=True,
                 epoch="2026-11-23T08:00:00Z", board="ref-esp32", fw="0.1.0", meter_wh=1_000_000):
        self.pile_id = pile_id
        self.boot = boot
        self.clock_synced = clock_synced
        self.epoch = datetime.datetime.fromisoformat(epoch.replace("Z", "+00:00"))
        self.board, self.fw = board, fw
        self.uptime_s = 0
        self.meter_wh = meter_wh
        self.session_seq = 0
        self.fault_seq = 0
        self.state, self.pilot, self.offer_a, self.power_w = "idle", "A", 0, 0
        self.faults = []
        # The remote limit in force (status limit_*, docs/commands.md): A, source, s left.
        self.limit_a, self.limit_source, self.limit_expires_s = None, None, None
        self.meter_id = "modbus:ddsu666@1"
        self.session = None  # the session_started payload while one runs
        self.session_start_uptime = 0
        self.peak_power_w = 0

    def now(self):
        base = self.epoch if self.clock_synced else UNSYNCED_EPOCH
        return (base + datetime.timedelta(seconds=self.uptime_s)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def advance(self, seconds):
        """Time passes; the meter counts what the car draws meanwhile."""
        self.uptime_s += seconds
        self.meter_wh += self.power_w * seconds // 3600

    def session_id(self):
        return None if self.session is None else self.session["session_id"]

    def session_energy_wh(self):
        return 0 if self.session is None else self.meter_wh - self.session["meter_start_wh"]

    def online(self, flag=True):
        return message(self.pile_id, "online", {"v": 1, "online": flag, "boot": self.boot})

    def status(self):
        return message(self.pile_id, "status", {
            "v": 1, "ts": self.now(), "clock_synced": self.clock_synced, "boot": self.boot,
            "uptime_s": self.uptime_s, "state": self.state, "pilot": self.pilot, "offer_a": self.offer_a,
            "power_w": self.power_w, "session_id": self.session_id(),
            "session_energy_wh": self.session_energy_wh(), "faults": list(self.faults), "fw": self.fw,
            "board": self.board, "limit_a": self.limit_a, "limit_source": self.limit_source,
            "limit_expires_s": self.limit_expires_s, "meter_age_ms": 400})

    def start_session(self, auth_source="free_vend", auth_id=None, connector=1):
        self.session_seq += 1
        self.session = {
            "v": 1, "session_id": "%s-%d-%d" % (self.pile_id, self.boot, self.session_seq),
            "pile_id": self.pile_id, "connector": connector, "auth_source": auth_source, "auth_id": auth_id,
            "start_time": self.now(), "clock_synced": self.clock_synced, "meter_start_wh": self.meter_wh}
        self.session_start_uptime = self.uptime_s
        self.peak_power_w = 0
        return message(self.pile_id, "session_started", dict(self.session))

    def draw(self, power_w, offer_a=32.0):
        self.state, self.pilot, self.offer_a, self.power_w = "charging", "C", offer_a, power_w
        self.peak_power_w = max(self.peak_power_w, power_w)

    def meter(self):
        current = round(self.power_w / 230.0, 1)
        return message(self.pile_id, "meter", {
            "v": 1, "session_id": self.session_id(), "ts": self.now(), "clock_synced": self.clock_synced,
            "meter_wh": self.meter_wh, "session_energy_wh": self.session_energy_wh(), "power_w": self.power_w,
            "current_a": [current], "voltage_v": [230.0], "age_ms": 400})

    def end_session(self, stop_reason="ev_disconnected"):
        s = self.session
        ended = dict(s, stop_time=self.now(), meter_stop_wh=self.meter_wh, energy_wh=self.session_energy_wh(),
                     duration_s=self.uptime_s - self.session_start_uptime, peak_power_w=self.peak_power_w,
                     stop_reason=stop_reason, meter_restarts=0, meter_stop_stale=False, estimated=[],
                     meter=self.meter_id)
        ended["clock_synced"] = s["clock_synced"] and self.clock_synced
        self.session = None
        self.state, self.pilot, self.offer_a, self.power_w = "idle", "A", 0, 0
        return message(self.pile_id, "session_ended", ended)

    def fault(self, code, action="raised"):
        self.fault_seq += 1
        if action == "raised" and code not in self.faults:
            self.faults.append(code)
        elif action == "cleared" and code in self.faults:
            self.faults.remove(code)
        return message(self.pile_id, "fault", {
            "v": 1, "event_id": "%s-%d-f%d" % (self.pile_id, self.boot, self.fault_seq),
            "pile_id": self.pile_id, "code": code, "action": action, "ts": self.now(),
            "clock_synced": self.clock_synced, "session_id": self.session_id()})

    def cmd_ack(self, cmd_id, cmd, result="accepted", reason=None):
        return message(self.pile_id, "cmd_ack", {"v": 1, "cmd_id": cmd_id, "cmd": cmd, "result": result,
                                                 "reason": reason, "ts": self.now(),
                                                 "clock_synced": self.clock_synced})

    def normal_session(self, power_w=7360, duration_s=1800, meter_interval_s=300, auth_source="free_vend",
                       auth_id=None, stop_reason="ev_disconnected"):
        """Plug-in to unplug: the messages of one session, in the order the pile sends them."""
        out = []
        self.state, self.pilot = ("waiting_for_auth", "B") if auth_source == "remote" else ("idle", "B")
        if auth_source == "remote":
            out.append(self.status())
            self.advance(20)
        out.append(self.start_session(auth_source, auth_id))
        self.draw(power_w)
        out.append(self.status())
        left = duration_s
        while left > 0:
            step = min(meter_interval_s, left)
            self.advance(step)
            left -= step
            if left > 0:
                out.append(self.meter())
        out.append(self.end_session(stop_reason))
        out.append(self.status())
        self.advance(60)
        return out


def garbage(pile):
    """Messages the consumer must reject, each with the reason it counts them under."""
    ended = pile.normal_session(duration_s=600)[-2]
    status = pile.status()
    topic = ended.topic
    missing = dict(ended.payload)
    del missing["energy_wh"]
    meter_topic = "%s/%s/meter" % (TOPIC_ROOT, pile.pile_id)
    other = "%s/%s-other/session/ended" % (TOPIC_ROOT, pile.pile_id)
    return [
        (Message(topic, b"{not json", 1, False), "bad_json"),
        (Message(topic, b"[1, 2, 3]", 1, False), "not_object"),
        (Message(topic, b"\xff\xfe\xfd", 1, False), "not_utf8"),
        (Message(topic, b'{"v": 1, "energy_wh": NaN}', 1, False), "bad_json"),
        (Message(topic, {"online": True}, 1, False), "no_version"),
        (Message(topic, dict(ended.payload, v=99), 1, False), "unsupported_version"),
        (Message(topic, missing, 1, False), "schema"),
        (Message(topic, dict(ended.payload, energy_wh="9701"), 1, False), "schema"),
        (Message(status.topic, dict(status.payload, extra=1), 1, False), "schema"),
        (Message(meter_topic, {"v": 1, "power_w": 3650}, 0, False), "schema"),
        (Message(other, ended.payload, 1, False), "pile_mismatch"),
        (Message("%s/%s/nonsense" % (TOPIC_ROOT, pile.pile_id), {"v": 1}, 1, False), "unknown_topic"),
        (Message(topic, b'{"v": 1, "pad": "' + b"x" * 100_000 + b'"}', 1, False), "too_large"),
    ]


def encode(payload):
    return payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()


class Publisher:
    """One MQTT 3.1.1 connection, as the pile's (clean session, optional last will)."""

    def __init__(self, broker, client_id, will=None, tls_ca=None, timeout=10.0):
        parts = urllib.parse.urlsplit(broker)
        tls = parts.scheme == "mqtts"
        self.timeout = timeout
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=True)
        if parts.username:
            self.client.username_pw_set(urllib.parse.unquote(parts.username),
                                        urllib.parse.unquote(parts.password or ""))
        if tls or tls_ca:
            self.client.tls_set(ca_certs=tls_ca)
        if will is not None:
            self.client.will_set(will.topic, encode(will.payload), qos=will.qos, retain=will.retain)
        self._connected = threading.Event()
        self._refused = None
        self.client.on_connect = self._on_connect
        self.client.connect(parts.hostname, parts.port or (8883 if tls else 1883), keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            self.close()
            raise ConnectionError("broker %s: %s" % (parts.hostname, self._refused or "no CONNACK"))

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = str(reason_code)
        self._connected.set()

    def send(self, messages, pace=0.0):
        """Publish in order; return once the broker has every QoS 1 message (PUBACK)."""
        pending = []
        for m in messages:
            pending.append(self.client.publish(m.topic, encode(m.payload), qos=m.qos, retain=m.retain))
            if pace:
                time.sleep(pace)
        for info in pending:
            info.wait_for_publish(self.timeout)
            if not info.is_published():
                raise TimeoutError("broker did not acknowledge a message within %.0f s" % self.timeout)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def connect_pile(broker, pile, tls_ca=None):
    """A pile's own connection: client id = pile id, last will = offline, then online."""
    publisher = Publisher(broker, pile.pile_id, will=pile.online(False), tls_ca=tls_ca)
    publisher.send([pile.online(True), pile.status()])
    return publisher


def live(publisher, pile, meter_interval, stop):
    """A session in real time until `stop` is set; then the pile ends it and says goodbye."""
    pile.pilot = "B"
    publisher.send([pile.start_session()])  # plugged in, free vend: authorised at once
    pile.draw(7360)
    publisher.send([pile.status()])
    last = time.monotonic()
    while not stop.wait(meter_interval):
        now = time.monotonic()
        pile.advance(int(round(now - last)))
        last = now
        publisher.send([pile.meter(), pile.status()])
    publisher.send([pile.end_session("remote"), pile.status(), pile.online(False)])


def main(argv=None):
    p = argparse.ArgumentParser(description="Play a pile's telemetry (docs/telemetry.md) to a broker.")
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port] or mqtts://...")
    p.add_argument("--tls-ca", help="CA certificate for a TLS broker")
    p.add_argument("--pile", default="pile-0042", help="pile id (default pile-0042)")
    p.add_argument("--boot", type=int, default=1, help="boot counter (default 1)")
    p.add_argument("--scenario", default="normal", choices=("normal", "replay", "garbage", "fleet", "live"))
    p.add_argument("--sessions", type=int, default=1, help="sessions per pile (default 1)")
    p.add_argument("--repeat", type=int, default=5, help="replay: extra copies of each record (default 5)")
    p.add_argument("--piles", type=int, default=10, help="fleet: number of piles (default 10)")
    p.add_argument("--unsynced", action="store_true", help="the pile's clock is not synced")
    p.add_argument("--pace", type=float, default=0.0, help="seconds between messages (default 0)")
    p.add_argument("--meter-interval", type=float, default=5.0, help="live: seconds between meter values")
    args = p.parse_args(argv)

    pile = FakePile(args.pile, boot=args.boot, clock_synced=not args.unsynced)
    if args.scenario == "fleet":
        publisher = Publisher(args.broker, "fake-fleet-%s" % args.pile, tls_ca=args.tls_ca)
        for i in range(args.piles):
            other = FakePile("%s-%02d" % (args.pile, i + 1), boot=args.boot, clock_synced=not args.unsynced)
            msgs = [other.online(True), other.status()]
            for _ in range(args.sessions):
                msgs += other.normal_session()
            publisher.send(msgs, args.pace)
        publisher.close()
        print("fleet: %d piles x %d sessions" % (args.piles, args.sessions))
        return 0

    publisher = connect_pile(args.broker, pile, args.tls_ca)
    if args.scenario == "live":
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("%s charging; Ctrl-C ends the session" % pile.pile_id, flush=True)
        live(publisher, pile, args.meter_interval, stop)
        publisher.close()
        return 0
    msgs = []
    for _ in range(args.sessions):
        msgs += pile.normal_session()
    if args.scenario == "replay":
        records = [m for m in msgs if m.topic.endswith(("/session/started", "/session/ended"))]
        msgs += records * args.repeat
    elif args.scenario == "garbage":
        msgs = [m for m, _ in garbage(pile)] + msgs
    publisher.send(msgs, args.pace)
    publisher.close()
    print("%s: %d messages (%s)" % (pile.pile_id, len(msgs), args.scenario))
    return 0
