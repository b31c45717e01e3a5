"""`make fleet`: N piles (up to 20,000) on real MQTT connections in one asyncio process, against a
real mosquitto, 1-4 batch consumers (pilehost/ingest.py) sharing the load, and PostgreSQL (or
SQLite); each scenario ends with the database checked against what the piles sent: every
session exactly once, to the Wh, no conflict. Figures are printed; nothing here is timed.

Its command line, with the usage: tools/fleet.py. docs/cloud.md reads the figures.

The piles behave as docs/telemetry.md and docs/commands.md say the firmware does (the firmware is
not imported: its rules are re-stated here from the docs):
- client id = pile id, clean session, keep-alive 60 s, last will `online: false` (retained);
  after CONNACK: `online: true`, `status` (both retained), subscribe to `.../cmd`, replay the
  outbox oldest first, then live messages;
- `session/started`, `session/ended` (and faults) go to the outbox first and leave it on their
  PUBACK, one at a time in order; a lost connection leaves them for the next one;
- `meter` QoS 0 while charging, only when connected; `status` on every change and as heartbeat;
- reconnect after a pause from 1 s doubling to `backoff_max_s` (firmware: 60 s) in its second
  half (firmware/backoff.py's jitter);
- signed commands (HMAC-SHA256 of the body, counter above the last accepted) answered on
  `.../cmd/ack`; `request_status` publishes a status.

The daily profile (PROFILE): share of a day's sessions starting in each hour, peaks at 8-9 h and
17-19 h; 25 million sessions a year over 20,000 piles (3.4 a pile a day); durations log-normal
around 40 min (5 min .. 8 h), power 3.7/7.4/11/22 kW. Time is compressed for the sessions only
(`compression`: 60 plays an hour in a minute); meter values (every `meter_interval_s`, firmware
default 10 s) and heartbeats (60 s) keep wall-clock rates, the real steady load of a fleet.
"""
import argparse
import asyncio
import collections
import contextlib
import datetime
import hashlib
import hmac
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

from . import ROOT, consumer, machine_info, pilecmd, procs
from .broker import Broker, BrokerError
from .mqtt_async import Connection, MqttError
from .procs import end_process, free_port, wait_for

TOPIC_ROOT = "evse/v1"
# Share of the day's sessions starting in each hour (sums to 1): morning and evening peaks.
PROFILE = (0.010, 0.006, 0.004, 0.004, 0.006, 0.015, 0.035, 0.060, 0.075, 0.065, 0.050, 0.045,
           0.045, 0.045, 0.045, 0.050, 0.060, 0.080, 0.085, 0.070, 0.055, 0.040, 0.030, 0.020)
BUSIEST_HOUR = max(range(24), key=PROFILE.__getitem__)
SESSIONS_PER_YEAR, FLEET_PILES = 25_000_000, 20_000  # the operator's fleet (issue 14)
SESSIONS_PER_PILE_DAY = SESSIONS_PER_YEAR / 365 / FLEET_PILES
POWERS_W = ((3680, 0.2), (7360, 0.5), (11040, 0.2), (22080, 0.1))
DURATION_MEDIAN_S, DURATION_SIGMA, DURATION_MIN_S, DURATION_MAX_S = 2400, 0.7, 300, 8 * 3600
KEEPALIVE_S = 60
STATUS_INTERVAL_S = 60  # config.json status_interval_s default
METER_INTERVAL_S = 10  # config.json meter_interval_s default
SOURCES = 50  # loopback source addresses 127.0.0.1..50: 20,000 connections need more than one's ports
FD_SPARE = 100  # files besides the piles' sockets: the consumers' connections, logs, the database
QUIET_S = 30  # nothing more committed for this long while nothing is on its way: the rest is lost
SCENARIOS = ("steady", "storm", "kill", "pgrestart")
EPOCH = datetime.datetime(2026, 11, 23, BUSIEST_HOUR, tzinfo=datetime.timezone.utc)


def session_rate(piles):
    """Sessions per simulated second over the fleet at the busiest hour."""
    return piles * SESSIONS_PER_PILE_DAY * PROFILE[BUSIEST_HOUR] / 3600


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def pile_secret(pile_id):
    return hashlib.sha256(b"fleet-secret:" + pile_id.encode()).digest()


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)]


# -- one pile -----------------------------------------------------------------------------------------

class Pile:
    """A pile's counters, meter, outbox and connection (docs/telemetry.md, "The pile's connection")."""

    def __init__(self, fleet, index):
        self.fleet = fleet
        self.pile_id = "fl%05d" % index
        self.source = "127.0.0.%d" % (1 + index % SOURCES)
        self.secret = pile_secret(self.pile_id)
        self.boot = 1
        self.seq = 0
        self.meter_wh = fleet.rng.randrange(10_000, 5_000_000)
        self.session = None  # the session_started payload (dict) while one runs
        self.power_w = 0
        self.started_at = 0.0  # fleet sim time
        self.outbox = collections.deque()  # (session_id or None, topic, payload bytes)
        self.outbox_event = asyncio.Event()
        self.conn = None
        self.last_counter = 0
        self.t0 = time.monotonic()
        self.prefix = "%s/%s/" % (TOPIC_ROOT, self.pile_id)

    # --- messages (the contract's, built from the pile's values)

    def now(self):
        return iso(EPOCH + datetime.timedelta(seconds=int(self.fleet.sim_time())))

    def uptime(self):
        return int(time.monotonic() - self.t0)

    def status_payload(self):
        charging = self.session is not None
        energy = self.meter_wh - self.session["meter_start_wh"] if charging else 0
        return json.dumps({
            "v": 1, "ts": self.now(), "clock_synced": True, "boot": self.boot, "uptime_s": self.uptime(),
            "state": "charging" if charging else "idle", "pilot": "C" if charging else "A",
            "offer_a": 32.0 if charging else 0, "power_w": self.power_w,
            "session_id": self.session["session_id"] if charging else None,
            "session_energy_wh": energy, "faults": [], "fw": "0.1.0", "board": "ref-esp32",
            "limit_a": None, "limit_source": None, "limit_expires_s": None,
            "meter_age_ms": 0 if charging else None},
            separators=(",", ":")).encode()

    def online_payload(self, flag):
        return json.dumps({"v": 1, "online": flag, "boot": self.boot}, separators=(",", ":")).encode()

    def start_session(self, power_w):
        self.seq += 1
        self.session = {
            "v": 1, "session_id": "%s-%d-%d" % (self.pile_id, self.boot, self.seq), "pile_id": self.pile_id,
            "connector": 1, "auth_source": "free_vend", "auth_id": None, "start_time": self.now(),
            "clock_synced": True, "meter_start_wh": self.meter_wh}
        self.power_w = power_w
        self.started_at = self.fleet.sim_time()
        self.record("session/started", self.session, None)
        self.live_status()

    def charge(self, sim_seconds):
        self.meter_wh += int(self.power_w * sim_seconds / 3600)

    def end_session(self):
        s = self.session
        duration = max(1, int(self.fleet.sim_time() - self.started_at))
        ended = dict(s, stop_time=self.now(), meter_stop_wh=self.meter_wh,
                     energy_wh=self.meter_wh - s["meter_start_wh"], duration_s=duration,
                     peak_power_w=self.power_w, stop_reason="ev_disconnected", meter_restarts=0,
                     meter_stop_stale=False, estimated=[], meter="modbus:ddsu666@1")
        self.session, self.power_w = None, 0
        self.fleet.ledger[ended["session_id"]] = (ended["energy_wh"], consumer.canonical(ended))
        self.record("session/ended", ended, ended["session_id"])
        self.live_status()

    def record(self, suffix, obj, ended_id):
        """Into the outbox first (flash on a pile), sent from there."""
        self.outbox.append((ended_id, self.prefix + suffix, json.dumps(obj, separators=(",", ":")).encode()))
        self.fleet.stats["records"] += 1
        self.outbox_event.set()

    def live_status(self):
        if self.conn is not None:
            with contextlib.suppress(MqttError):
                self.fleet.send(self.conn, self.prefix + "status", self.status_payload(), 1, True)

    def meter(self):
        if self.conn is None or self.session is None:
            return
        s = self.session
        payload = json.dumps({
            "v": 1, "session_id": s["session_id"], "ts": self.now(), "clock_synced": True,
            "meter_wh": self.meter_wh, "session_energy_wh": self.meter_wh - s["meter_start_wh"],
            "power_w": self.power_w, "current_a": [round(self.power_w / 230.0, 1)], "voltage_v": [230.0],
            "age_ms": 0},
            separators=(",", ":")).encode()
        with contextlib.suppress(MqttError):
            self.fleet.send(self.conn, self.prefix + "meter", payload, 0, False)

    # --- commands (docs/commands.md, checks in order)

    def on_message(self, topic, payload):
        if not topic.endswith("/cmd"):
            return
        cmd_id = cmd = None
        result, reason = "invalid", None
        try:
            if len(payload) > 512:
                return  # too_large: log only
            outer = json.loads(payload)
            if not isinstance(outer, dict) or set(outer) != {"body", "sig"}:
                return  # malformed: log only
            body_text, sig = outer["body"], outer["sig"]
            body = json.loads(body_text)
            cmd_id, cmd = body.get("id"), body.get("cmd")
            good = hmac.new(self.secret, body_text.encode(), hashlib.sha256).hexdigest()
            if not (isinstance(sig, str) and len(sig) == 64 and hmac.compare_digest(good, sig.lower())):
                reason = "bad_signature: the signature does not match"
            elif set(body) != {"v", "id", "cmd", "counter", "args"} or body["v"] != 1:
                reason = "malformed: not a v1 command body"
            elif not body["counter"] > self.last_counter:
                reason = "replayed: counter not above %d" % self.last_counter
            elif cmd != "request_status":
                result, reason = "unknown_command", "unknown_command: not played by the fleet"
            else:
                self.last_counter = body["counter"]
                result = "accepted"
        except (ValueError, TypeError, AttributeError):
            return
        if not (isinstance(cmd_id, str) and isinstance(cmd, str)):
            return
        ack = json.dumps({"v": 1, "cmd_id": cmd_id, "cmd": cmd, "result": result, "reason": reason,
                          "ts": self.now(), "clock_synced": True}, separators=(",", ":")).encode()
        with contextlib.suppress(MqttError):
            self.fleet.send(self.conn, self.prefix + "cmd/ack", ack, 1, False)
            if result == "accepted":
                self.live_status()

    # --- the connection

    async def run(self):
        """Connect, birth, replay, live; on any loss back off and again. Ends when the fleet stops
        and the outbox is empty."""
        f = self.fleet
        pause = 1.0
        while not (f.stopping and not self.outbox):
            conn = Connection(self.on_message)
            try:
                if not f.network_up:
                    raise MqttError("no route to the broker")
                async with f.connecting:
                    await conn.open(f.host, f.port, self.pile_id, KEEPALIVE_S, timeout=30,
                                    will=(self.prefix + "online", self.online_payload(False), 1, True),
                                    local_addr=(self.source, 0))
                f.stats["connects"] += 1
                pause = 1.0
                self.conn = conn
                f.connected += 1
                try:
                    await conn.publish(self.prefix + "online", self.online_payload(True), 1, True)
                    await conn.publish(self.prefix + "status", self.status_payload(), 1, True)
                    await conn.subscribe([(self.prefix + "cmd", 1)])
                    await self.drain(conn)
                finally:
                    self.conn = None
                    f.connected -= 1
            except MqttError:
                f.stats["connection_lost"] += 1
            conn.close()
            if f.stopping and not self.outbox:
                return
            half = min(pause, f.backoff_max_s) / 2
            await asyncio.sleep(half + f.rng.random() * half)
            pause = min(pause * 2, f.backoff_max_s)

    async def drain(self, conn):
        """The outbox, oldest first, each record until its PUBACK; then wait for more."""
        f = self.fleet
        while True:
            while self.outbox:
                ended_id, topic, payload = self.outbox[0]
                if ended_id is not None and ended_id not in f.first_sent:
                    f.first_sent[ended_id] = time.time()
                await conn.publish(topic, payload, 1, False, timeout=60)
                f.stats["msgs"] += 1
                self.outbox.popleft()
                f.stats["records_acked"] += 1
            if f.stopping:
                await conn.disconnect()
                return
            self.outbox_event.clear()
            closed = asyncio.ensure_future(conn.closed.wait())
            more = asyncio.ensure_future(self.outbox_event.wait())
            stop = asyncio.ensure_future(f.stop_event.wait())
            await asyncio.wait((closed, more, stop), return_when=asyncio.FIRST_COMPLETED)
            for fut in (closed, more, stop):
                fut.cancel()
            if conn.closed.is_set():
                raise MqttError("connection lost")


# -- the fleet ----------------------------------------------------------------------------------------

class Fleet:
    """All piles in this process, their shared clock and what they sent (`ledger`)."""

    def __init__(self, n, host, port, compression, backoff_max_s=60.0, seed=1,
                 meter_interval_s=METER_INTERVAL_S):
        self.rng = random.Random(seed)
        self.host, self.port = host, port
        self.compression = compression
        self.backoff_max_s = backoff_max_s
        self.meter_interval_s = meter_interval_s
        self.ledger = {}  # session_id -> (energy_wh, canonical payload) of every session/ended built
        self.first_sent = {}  # session_id -> time.time() when its ended record first went out
        self.stats = collections.Counter()
        self.connected = 0
        self.stopping = False
        self.network_up = True  # the piles' way to the broker (their uplinks, the load balancer)
        self.arrivals = True
        self.stop_event = asyncio.Event()
        self.connecting = asyncio.Semaphore(200)  # connections being opened at once (SYN backlog)
        self.t_start = time.monotonic()
        self.piles = [Pile(self, i) for i in range(n)]
        self.tasks = []
        self.sessions = []  # session_life tasks
        self.unplug = asyncio.Event()  # the end of the scenario: every car leaves now

    def sim_time(self):
        """Simulated seconds since the start of the busiest hour."""
        return (time.monotonic() - self.t_start) * self.compression

    def send(self, conn, topic, payload, qos, retain):
        if qos:
            conn.publish_forget(topic, payload, retain)
        else:
            conn.publish_now(topic, payload, retain)
        self.stats["msgs"] += 1

    def session_rate(self):
        return session_rate(len(self.piles))

    def draw_duration(self):
        d = self.rng.lognormvariate(math.log(DURATION_MEDIAN_S), DURATION_SIGMA)
        return min(DURATION_MAX_S, max(DURATION_MIN_S, d))

    def draw_power(self):
        return self.rng.choices([p for p, _ in POWERS_W], [w for _, w in POWERS_W])[0]

    async def arrivals_loop(self):
        """Poisson arrivals at the busiest hour's rate on a free pile; each session ends after
        its drawn duration (simulated)."""
        rate = self.session_rate() * self.compression  # per wall second
        while self.arrivals:
            await asyncio.sleep(self.rng.expovariate(rate))
            if not self.arrivals:
                return
            for _ in range(20):
                pile = self.rng.choice(self.piles)
                if pile.session is None:
                    pile.start_session(self.draw_power())
                    self.stats["sessions"] += 1
                    self.sessions.append(asyncio.ensure_future(self.session_life(pile, self.draw_duration())))
                    break

    async def session_life(self, pile, duration_s):
        end = time.monotonic() + duration_s / self.compression
        last = time.monotonic()
        while not self.unplug.is_set() and time.monotonic() < end:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.unplug.wait(),
                                       min(self.meter_interval_s, max(0.0, end - time.monotonic())))
            now = time.monotonic()
            pile.charge((now - last) * self.compression)
            last = now
            if now < end:
                pile.meter()
        pile.charge((time.monotonic() - last) * self.compression)
        pile.end_session()

    async def heartbeat_loop(self):
        """Status every STATUS_INTERVAL_S per pile (spread), PINGREQ where nothing went out."""
        loop = asyncio.get_running_loop()
        step = 1.0
        while not self.stopping:
            await asyncio.sleep(step)
            now = loop.time()
            n = max(1, int(len(self.piles) * step / STATUS_INTERVAL_S))
            for pile in self.rng.sample(self.piles, min(n, len(self.piles))):
                pile.live_status()
            for pile in self.piles:
                c = pile.conn
                if c is not None and now - c.last_out > KEEPALIVE_S / 2:
                    with contextlib.suppress(MqttError):
                        c.ping()

    def start(self):
        for p in self.piles:
            self.tasks.append(asyncio.ensure_future(p.run()))
        self.tasks.append(asyncio.ensure_future(self.heartbeat_loop()))

    def start_arrivals(self):
        self.arrivals = True
        self.tasks.append(asyncio.ensure_future(self.arrivals_loop()))

    def outboxes(self):
        return sum(len(p.outbox) for p in self.piles)

    async def stop(self, timeout):
        """Cars go (running sessions end), outboxes drain, piles say goodbye."""
        self.arrivals = False
        self.unplug.set()
        if self.sessions:
            await asyncio.wait(self.sessions)
        self.stopping = True
        self.stop_event.set()
        for p in self.piles:
            p.outbox_event.set()
        done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        return len(pending) == 0


class Commander:
    """The cloud's command sender: signed request_status to piles, a bad signature to one; counts
    the acks (docs/commands.md)."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.sent = {}  # cmd_id -> pile_id
        self.acks = collections.Counter()  # (cmd_id, result) -> n
        self.bad_id = None

    def on_message(self, topic, payload):
        obj = json.loads(payload)
        self.acks[(obj["cmd_id"], obj["result"])] += 1

    async def run(self, count, interval):
        conn = Connection(self.on_message)
        await conn.open(self.fleet.host, self.fleet.port, "fleet-commander-%d" % os.getpid())
        await conn.subscribe([(TOPIC_ROOT + "/+/cmd/ack", 1)])
        counter = int(time.time() * 1000)
        for i in range(count):
            online = [p for p in self.fleet.piles if p.conn is not None]
            pile = self.fleet.rng.choice(online or self.fleet.piles)
            counter += 1
            cmd_id = "fleet-%d" % i
            secret = pile.secret if i else b"\x00" * 32  # the first one signed with the wrong key
            body = pilecmd.make_body("request_status", {}, counter, cmd_id)
            await conn.publish(pile.prefix + "cmd", pilecmd.sign(secret, body), 1)
            if i:
                self.sent[cmd_id] = pile.pile_id
            else:
                self.bad_id = cmd_id
            await asyncio.sleep(interval)
        await asyncio.sleep(2)
        await conn.disconnect()

    def answered(self):
        return sum(1 for cmd_id in self.sent if self.acks[(cmd_id, "accepted")] >= 1)

    def bad_refused(self):
        return self.acks[(self.bad_id, "invalid")] >= 1 and not self.acks[(self.bad_id, "accepted")]


# -- the cloud: broker, database, consumers --------------------------------------------------------------

def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class FleetBroker(Broker):
    """mosquitto set for a fleet: no connection limit, a high fd limit, unlimited queues for the
    consumers (mosquitto's default of 1,000 queued messages per client DROPS acknowledged QoS 1
    messages in a storm), persistence saved on a clean stop; down() and up() for the storm."""

    def _configure(self, password_file, tls):
        self.store = os.path.join(self.directory, "persist")
        os.makedirs(self.store, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.chown(self.store, "mosquitto", "mosquitto")  # as root mosquitto drops to that user
        conf = os.path.join(self.directory, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write("persistence true\npersistence_location %s/\nautosave_interval 0\n" % self.store)
            f.write("allow_anonymous true\nmax_connections -1\nmax_queued_messages 0\nmax_queued_bytes 0\n"
                    "max_inflight_messages 0\nset_tcp_nodelay true\n")
            f.write("listener %d 127.0.0.1\nmax_connections -1\n" % self.port)
        return [self.binary, "-c", conf]

    def _start(self):
        def limits():
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limits)

    def down(self):
        """A clean stop (SIGTERM): mosquitto writes its persistence file, consumers' queues included."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)

    def up(self):
        self._start()
        if not self._ready(120):
            raise BrokerError("mosquitto did not come back on port %d" % self.port)


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb as the `postgres` user, loopback, a free port), so
    that it can be restarted mid-storm without touching anyone else's."""

    def __init__(self, directory):
        bins = sorted(d for d in os.listdir("/usr/lib/postgresql") if d.isdigit()) if os.path.isdir(
            "/usr/lib/postgresql") else []
        if os.getuid() != 0 or not bins:
            raise RuntimeError("a private PostgreSQL needs root and Debian's postgresql package")
        self.bin = "/usr/lib/postgresql/%s/bin/" % bins[-1]
        self.dir = os.path.join(directory, "pg")
        os.makedirs(self.dir)
        shutil.chown(directory, "postgres")
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self._as_postgres([self.bin + "initdb", "-D", self.dir, "-U", "postgres", "--auth=trust",
                           "-E", "UTF8"])
        self.url = "postgresql://postgres@127.0.0.1:%d/postgres" % self.port
        self.start()

    def _as_postgres(self, cmd):
        out = subprocess.run(cmd, user="postgres", capture_output=True, text=True, cwd=self.dir)
        if out.returncode:
            raise RuntimeError("%s: %s" % (os.path.basename(cmd[0]), out.stderr.strip()[-500:]))

    def start(self):
        self._as_postgres([self.bin + "pg_ctl", "-D", self.dir, "-l", os.path.join(self.dir, "log"), "-w",
                           "-o", "-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=50"
                           % (self.port, self.dir), "start"])

    def stop(self, mode="fast"):
        with contextlib.suppress(RuntimeError):
            self._as_postgres([self.bin + "pg_ctl", "-D", self.dir, "-m", mode, "-w", "stop"])

    def pids(self):
        try:
            with open(os.path.join(self.dir, "postmaster.pid")) as f:
                return [int(f.readline())]
        except (OSError, ValueError):
            return []


def with_search_path(url, schema):
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query) + [("options", "-csearch_path=%s" % schema)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class Consumers:
    """The batch consumers (tools/ingest.py), each a process with a stable client id in one group."""

    def __init__(self, directory, broker_url, db_url, n, group="fleet"):
        self.directory, self.broker_url, self.db_url, self.group = directory, broker_url, db_url, group
        self.procs = [None] * n
        self.logs = [os.path.join(directory, "ingest-%d.log" % i) for i in range(n)]
        self.commit_log = os.path.join(directory, "commits.log")
        for i in range(n):
            self.start(i)

    def start(self, i):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "ingest.py"), "--broker", self.broker_url,
               "--db", self.db_url, "--group", self.group, "--client-id", "fleet-ingest-%d" % i,
               "--commit-log", self.commit_log, "-v"]
        with open(self.logs[i], "ab") as log:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def subscriptions(self):
        """How many times each instance has subscribed so far (its log's lines)."""
        out = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                out.append(f.read().count("subscribed to "))
        return out

    def wait_subscribed(self, before, timeout=120):
        wait_for(lambda: all(a > b for a, b in zip(self.subscriptions(), before, strict=True)),
                 "the consumers to subscribe again", timeout)

    def kill(self, i):
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def wait_connected(self, timeout=60):
        def ready():
            for path in self.logs:
                with open(path, errors="replace") as f:
                    if "connected to" not in f.read():
                        return False
            return True
        wait_for(ready, "the consumers to connect", timeout)

    def stop(self):
        for p in self.procs:
            if p is not None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            end_process(p, 60)

    def summaries(self):
        out = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                out += [line.strip() for line in f if line.startswith("ingest: ")]
        return out

    def commits(self):
        out = {}
        with contextlib.suppress(OSError), open(self.commit_log) as f:
            for line in f:
                at, _, sid = line.strip().partition(" ")
                out.setdefault(sid, float(at))
        return out


class Resources:
    """CPU seconds and peak memory of processes, sampled every second (psutil)."""

    def __init__(self):
        import psutil
        self.psutil = psutil
        self.groups = {}  # name -> callable giving root pids
        self.cpu = collections.Counter()
        self.rss = collections.Counter()
        self.base = {}  # (pid, create time) -> CPU seconds when first seen
        self.used = {}  # (pid, create time) -> (group, CPU seconds since)
        self.started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def watch(self, name, pids):
        self.groups[name] = pids

    def _procs(self, root_pids):
        out = []
        for pid in root_pids():
            with contextlib.suppress(self.psutil.Error):
                p = self.psutil.Process(pid)
                out += [p] + p.children(recursive=True)
        return out

    def sample(self):
        for name, pids in self.groups.items():
            rss = 0
            for p in self._procs(pids):
                with contextlib.suppress(self.psutil.Error):
                    t = p.cpu_times()
                    total = t.user + t.system
                    key = (p.pid, p.create_time())
                    if key not in self.base:  # there at the start: from now on; started since: all of it
                        self.base[key] = total if not self.started else 0.0
                    self.used[key] = (name, total - self.base[key])
                    rss += p.memory_info().rss
            self.rss[name] = max(self.rss[name], rss)
        self.cpu = collections.Counter()
        for name, used in self.used.values():
            self.cpu[name] += used

    def start(self):
        self.sample()
        self.rss.clear()
        self.started = True
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(1.0):
            self.sample()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()


# -- a scenario ---------------------------------------------------------------------------------------------

class Options:
    def __init__(self, **kw):
        self.piles = kw.get("piles", 2000)
        self.scenario = kw.get("scenario", "storm")
        self.consumers = kw.get("consumers", 1)
        self.compression = kw.get("compression", 60.0)
        self.hour_s = kw.get("hour_s") or 3600 / self.compression  # wall seconds of one simulated hour
        self.outage_s = kw.get("outage_s") or self.hour_s
        self.backoff_max_s = kw.get("backoff_max_s", 60.0)
        self.db = kw.get("db")  # None: a private PostgreSQL if we can, else SQLite
        self.commands = kw.get("commands", 20)
        self.seed = kw.get("seed", 1)
        self.drain_timeout_s = kw.get("drain_timeout_s", 900.0)
        self.directory = kw.get("directory")
        self.out = kw.get("out", sys.stdout)
        self.gate = kw.get("gate", True)


class Result(dict):
    """The figures and the check; ok() when the database matched what the piles sent."""

    def ok(self):
        return not self["missing"] and not self["extra"] and not self["wrong_energy"] and \
            not self["conflicts"] and not self["wrong_payload"] and self["all_acked"]


def check_database(db_url, ledger):
    storage = consumer.open_storage(db_url)
    try:
        rows = storage.query("SELECT session_id, energy_wh, payload FROM sessions")
        conflicts = storage.query("SELECT count(*) FROM rejected WHERE reason = 'conflict'")[0][0]
        rejected = storage.query("SELECT count(*) FROM rejected")[0][0]
        starts = storage.query("SELECT count(*) FROM session_starts")[0][0]
    finally:
        storage.close()
    stored = {}
    dup = 0
    for sid, wh, payload in rows:
        if sid in stored:
            dup += 1
        stored[sid] = (wh, payload)
    return {
        "sessions_sent": len(ledger), "sessions_stored": len(rows), "stored_twice": dup,
        "missing": sorted(set(ledger) - set(stored))[:10], "extra": sorted(set(stored) - set(ledger))[:10],
        "wrong_energy": [s for s in ledger if s in stored and stored[s][0] != ledger[s][0]][:10],
        "wrong_payload": [s for s in ledger if s in stored and stored[s][1] != ledger[s][1]][:10],
        "conflicts": conflicts, "rejected": rejected, "starts_stored": starts,
    }


def db_count(db_url):
    try:
        storage = consumer.open_storage(db_url)
    except Exception:
        return -1
    try:
        return storage.query("SELECT count(*) FROM sessions")[0][0]
    except Exception:
        return -1
    finally:
        with contextlib.suppress(Exception):
            storage.close()


def say(o, text):
    print(text, file=o.out, flush=True)


async def run_async(o, broker, pg, consumers, db_url, res, result):
    fleet = Fleet(o.piles, "127.0.0.1", broker.port, o.compression, o.backoff_max_s, o.seed)
    self_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    fleet.start()
    while fleet.stats["connects"] < o.piles and time.monotonic() - t0 < 600:
        await asyncio.sleep(0.2)
    connect_s = time.monotonic() - t0
    result["connections_held"] = fleet.connected
    result["connect_s"] = round(connect_s, 1)
    say(o, "fleet: %d piles connected in %.1f s (%d held)" % (o.piles, connect_s, fleet.connected))
    res.start()
    fleet.start_arrivals()
    t_busy = time.monotonic()
    msgs0 = fleet.stats["msgs"]
    commander = Commander(fleet)
    cmd_task = asyncio.ensure_future(commander.run(o.commands, min(0.5, o.hour_s / 4 / max(1, o.commands))))
    steady_s = o.hour_s if o.scenario == "steady" else o.hour_s / 4
    await asyncio.sleep(steady_s)
    await cmd_task
    result["msgs_in_per_s"] = round((fleet.stats["msgs"] - msgs0) / (time.monotonic() - t_busy), 1)
    result["commands_sent"], result["commands_answered"] = len(commander.sent), commander.answered()
    result["bad_signature_refused"] = commander.bad_refused()
    say(o, "steady: %.0f s, %s messages/s in (%d sessions started), commands %d/%d answered, bad "
        "signature refused: %s" % (steady_s, result["msgs_in_per_s"], fleet.stats["sessions"],
                                   result["commands_answered"], result["commands_sent"],
                                   result["bad_signature_refused"]))
    steady_ids = set(fleet.ledger)
    loop = asyncio.get_running_loop()
    if o.scenario != "steady":
        say(o, "storm: the piles lose the broker for %.0f s (one hour at x%.0f); mosquitto is stopped and "
            "started again meanwhile; sessions go on into the outboxes" % (o.outage_s, o.compression))
        fleet.network_up = False
        subscribed = consumers.subscriptions()
        await loop.run_in_executor(None, broker.down)
        await asyncio.sleep(o.outage_s / 2)
        await loop.run_in_executor(None, broker.up)
        if o.gate:
            # mosquitto keeps persistent sessions over a restart but not their shared subscriptions
            # (2.0.11, measured: docs/cloud.md): the piles come back only once the group is there.
            await loop.run_in_executor(None, consumers.wait_subscribed, subscribed)
        await asyncio.sleep(max(0.0, o.outage_s / 2))
        held = fleet.outboxes()
        result["outbox_records_at_return"] = held
        storm_ids = set(fleet.ledger) - steady_ids
        t_up = time.monotonic()
        fleet.network_up = True
        say(o, "storm: the piles reach the broker again, %d records waiting in %d outboxes" % (
            held, sum(1 for p in fleet.piles if p.outbox)))
        if o.scenario == "kill":
            await asyncio.sleep(2)
            say(o, "storm: consumer 0 killed (SIGKILL); restarted 5 s later with its client id")
            await loop.run_in_executor(None, consumers.kill, 0)
            await asyncio.sleep(5)
            consumers.start(0)
        elif o.scenario == "pgrestart":
            await asyncio.sleep(2)
            say(o, "storm: PostgreSQL stopped (immediate: a crash), started again 5 s later")
            await loop.run_in_executor(None, pg.stop, "immediate")
            await asyncio.sleep(5)
            await loop.run_in_executor(None, pg.start)
        shown = time.monotonic()
        while fleet.outboxes() and time.monotonic() - t_up < o.drain_timeout_s:
            await asyncio.sleep(0.2)
            if time.monotonic() - shown > 10:
                shown = time.monotonic()
                say(o, "storm: %d records in %d outboxes, %d piles connected" % (
                    fleet.outboxes(), sum(1 for p in fleet.piles if p.outbox), fleet.connected))
        result["storm_outboxes_empty_s"] = round(time.monotonic() - t_up, 1)
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() - t_up < o.drain_timeout_s:
            commits = consumers.commits()
            waiting = sum(1 for s in storm_ids if s in fleet.first_sent and s not in commits)
            if not waiting:
                break
            if waiting != last:
                last, quiet_since = waiting, time.monotonic()
            elif time.monotonic() - quiet_since > QUIET_S:
                say(o, "storm: nothing committed for %.0f s with the outboxes empty: records lost" % QUIET_S)
                break
            await asyncio.sleep(0.5)
        result["storm_drain_s"] = round(time.monotonic() - t_up, 1)
        say(o, "storm: outboxes empty after %.1f s, the storm's sessions committed after %.1f s" % (
            result["storm_outboxes_empty_s"], result["storm_drain_s"]))
        result["storm_sessions"] = len(storm_ids)
    ok = await fleet.stop(o.drain_timeout_s)
    result["all_acked"] = ok and fleet.outboxes() == 0
    result["generator_cpu_s"] = round(sum(getattr(resource.getrusage(resource.RUSAGE_SELF), k) -
                                          getattr(self_cpu0, k) for k in ("ru_utime", "ru_stime")), 1)
    result["generator_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["records_sent"] = fleet.stats["records"]
    result["connection_losses"] = fleet.stats["connection_lost"]
    return fleet


def run(o):
    """One scenario with o.consumers instances; returns a Result."""
    own = o.directory is None
    directory = o.directory or tempfile.mkdtemp(prefix="fleet-")
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)  # the private PostgreSQL runs as `postgres`
    limit = raise_fd_limit()
    if o.piles + FD_SPARE > limit:
        # this process holds a socket per pile, and so does mosquitto (which gets the same limit)
        raise SystemExit("fleet: %d piles need %d open files here and in mosquitto; the limit is %d "
                         "(ulimit -Hn; raising it needs CAP_SYS_RESOURCE): at most %d piles on this host"
                         % (o.piles, o.piles + FD_SPARE, limit, limit - FD_SPARE))
    result = Result(piles=o.piles, scenario=o.scenario, consumers=o.consumers, compression=o.compression)
    pg = broker = consumers = None
    schema = None
    try:
        if o.db is None or o.db == "private":
            try:
                pg = PrivatePostgres(os.path.join(directory, "pgroot"))
                db_url = pg.url
            except RuntimeError as e:
                if o.scenario == "pgrestart":
                    raise
                say(o, "fleet: no private PostgreSQL (%s): SQLite" % e)
                db_url = "sqlite:///" + os.path.join(directory, "telemetry.db")
        elif o.db.startswith("postgres"):
            if o.scenario == "pgrestart":
                raise SystemExit("pgrestart restarts the database: it needs a private PostgreSQL "
                                 "(--db private)")
            import psycopg
            schema = "fleet_%d_%s" % (os.getpid(), os.urandom(3).hex())
            with psycopg.connect(o.db, autocommit=True) as conn:
                conn.execute("CREATE SCHEMA %s" % schema)
            db_url = with_search_path(o.db, schema)
        else:
            db_url = o.db
        result["database"] = "PostgreSQL (private)" if pg else db_url.split(":")[0]
        consumer.open_storage(db_url).setup()
        broker = FleetBroker(os.path.join(directory, "broker"))
        consumers = Consumers(directory, broker.url(), db_url, o.consumers)
        consumers.wait_connected()
        res = Resources()
        res.watch("broker", lambda: [broker.proc.pid])
        res.watch("consumers", lambda: [p.pid for p in consumers.procs if p is not None])
        res.watch("database", pg.pids if pg else (lambda: []))
        say(o, "fleet: %d piles, scenario %s, %d consumer(s), database %s, busiest hour %02d:00 "
            "(%.2f sessions/s), time x%.0f" % (o.piles, o.scenario, o.consumers, result["database"],
                                                BUSIEST_HOUR, session_rate(o.piles), o.compression))
        fleet = asyncio.run(run_async(o, broker, pg, consumers, db_url, res, result))
        deadline = time.monotonic() + o.drain_timeout_s
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = db_count(db_url)
            if n >= len(fleet.ledger):
                break
            if n != last:
                last, quiet_since = n, time.monotonic()
            elif time.monotonic() - quiet_since > QUIET_S:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # anything stored twice would show now
        res.stop()
        consumers.stop()
        result.update(check_database(db_url, fleet.ledger))
        commits = consumers.commits()
        delays = [commits[s] - fleet.first_sent[s] for s in fleet.ledger
                  if s in commits and s in fleet.first_sent]
        result["delay_median_s"] = round(statistics.median(delays), 3) if delays else None
        result["delay_p99_s"] = round(percentile(delays, 0.99), 3) if delays else None
        result["delay_max_s"] = round(max(delays), 3) if delays else None
        times = sorted(commits.values())
        span = times[-1] - times[0] if len(times) > 1 else 0
        result["stored_per_s"] = round(len(times) / span, 1) if span > 0 else 0
        result["cpu_s"] = {k: round(v, 1) for k, v in res.cpu.items()}
        result["rss_mb"] = {k: round(v / 2**20) for k, v in res.rss.items()}
        result["consumer_summaries"] = consumers.summaries()
        report(o, result)
        return result
    finally:
        if consumers:
            consumers.stop()
        if broker:
            broker.stop()
        if pg:
            pg.stop()
        if schema:
            import psycopg
            with contextlib.suppress(Exception), psycopg.connect(o.db, autocommit=True) as conn:
                conn.execute("DROP SCHEMA %s CASCADE" % schema)
        if own:
            shutil.rmtree(directory, ignore_errors=True)


def report(o, r):
    say(o, "---- %s, %d piles, %d consumer(s), %s" % (r["scenario"], r["piles"], r["consumers"],
                                                      r["database"]))
    say(o, "connections held %d (connected in %s s); messages in %s/s; session records committed %s/s"
        % (r["connections_held"], r["connect_s"], r["msgs_in_per_s"], r["stored_per_s"]))
    say(o, "pile publish -> row committed: median %s s, p99 %s s, max %s s (session/ended records)"
        % (r["delay_median_s"], r["delay_p99_s"], r["delay_max_s"]))
    if "storm_drain_s" in r:
        say(o, "storm: %d records waiting at the broker's return, drained in %s s (outboxes empty in %s s)"
            % (r["outbox_records_at_return"], r["storm_drain_s"], r["storm_outboxes_empty_s"]))
    say(o, "CPU s: " + ", ".join("%s %.1f" % kv for kv in sorted(r["cpu_s"].items())) +
        ", the generator itself %.1f; peak memory MB: " % r["generator_cpu_s"] +
        ", ".join("%s %d" % kv for kv in sorted(r["rss_mb"].items())) +
        ", generator %d" % r["generator_rss_mb"])
    for line in r["consumer_summaries"]:
        say(o, "  " + line)
    say(o, "check: %d sessions sent, %d stored, %d missing, %d extra, %d stored twice, %d wrong energy, "
        "%d wrong payload, %d conflicts, every record acknowledged: %s -> %s" % (
            r["sessions_sent"], r["sessions_stored"], len(r["missing"]), len(r["extra"]), r["stored_twice"],
            len(r["wrong_energy"]), len(r["wrong_payload"]), r["conflicts"], r["all_acked"],
            "PASS" if r.ok() else "FAIL"))


def parse_args(argv):
    p = argparse.ArgumentParser(description="Play a fleet of piles against mosquitto, batch consumers and a "
                                "database; check every session stored once (docs/cloud.md).")
    p.add_argument("--piles", type=int, default=2000)
    p.add_argument("--scenario", choices=SCENARIOS + ("all",), default="storm")
    p.add_argument("--consumers", default="1", help="instances, or a list to compare: 1,2,4")
    p.add_argument("--compression", type=float, default=60.0, help="simulated seconds per wall second (60)")
    p.add_argument("--outage-s", type=float, help="wall seconds the broker is down (default: one hour)")
    p.add_argument("--backoff-max-s", type=float, default=60.0,
                   help="the piles' longest reconnect pause (60, the firmware's)")
    p.add_argument("--db", help="private (default: a PostgreSQL of our own, else SQLite), sqlite:///path, "
                   "postgresql://... (a schema of its own is made and dropped)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-gate", action="store_true", help="let the piles back before the consumers have "
                   "subscribed again after the broker's restart (shows what mosquitto then loses)")
    p.add_argument("--dir", help="work in this directory and keep it (logs, database); "
                   "default: a temporary one, removed")
    p.add_argument("--json", help="append each result as a JSON line to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    procs.stop_on_sigterm()
    counts = [int(x) for x in args.consumers.replace(" ", ",").split(",") if x]
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = []
    failed = False
    for scenario in scenarios:
        for n in counts:
            o = Options(piles=args.piles, scenario=scenario, consumers=n, compression=args.compression,
                        outage_s=args.outage_s, backoff_max_s=args.backoff_max_s, db=args.db, seed=args.seed,
                        gate=not args.no_gate,
                        directory=args.dir and os.path.join(args.dir, "%s-%d" % (scenario, n)))
            r = run(o)
            results.append(r)
            failed |= not r.ok()
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if len(results) > 1:
        print("\n%-10s %5s %6s %9s %9s %8s %8s %8s %8s %8s %8s %8s %s" % (
            "scenario", "cons", "piles", "msg in/s", "stored/s", "med s", "p99 s", "max s", "drain s",
            "broker", "consum", "db cpu", "check"))
        for r in results:
            print("%-10s %5d %6d %9s %9s %8s %8s %8s %8s %8s %8s %8s %s" % (
                r["scenario"], r["consumers"], r["piles"], r["msgs_in_per_s"], r["stored_per_s"],
                r["delay_median_s"], r["delay_p99_s"], r["delay_max_s"], r.get("storm_drain_s", "-"),
                r["cpu_s"].get("broker"), r["cpu_s"].get("consumers"), r["cpu_s"].get("database"),
                "PASS" if r.ok() else "FAIL"))
    print("machine: %s (other work on it counts too)" % machine_info.machine())
    return 1 if failed else 0

