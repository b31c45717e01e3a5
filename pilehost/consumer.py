"""Reference consumer of the piles' telemetry (docs/telemetry.md): validate, store once, show.

Its command line, with the usage: tools/consumer.py.

Layers, each usable alone: `Schemas` (which schema a topic and payload need), `Storage` (one SQL
for SQLite and PostgreSQL; one row per session_id), `Handler` (one message -> checks -> storage
-> live view; knows no MQTT), `Consumer` (the paho client: subscriptions, acknowledgement only
after storage), `render_table` (the monitor).

Exit status: 0 done, 2 usage, 3 the broker refused us (credentials, subscription), 4 storage
failed (messages not yet stored stay unacknowledged: with --client-id the broker redelivers them),
5 no connection within --once-for.
"""
import argparse
import collections
import contextlib
import datetime
import glob
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import health_store, ops_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_DIR = os.path.join(ROOT, "docs", "schemas")
TOPIC_ROOT = "evse/v1"
COMMAND_TOPIC = "cmd"  # commands to the piles (docs/commands.md): not telemetry, not ours
RELEASE_TOPIC = "release"  # evse/v1/release/...: release chunks (docs/ota.md), not a pile id
PILE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_PAYLOAD = 64 * 1024  # far above any v1 message; bigger is garbage, rejected unparsed
KEPT_REJECTED = 8 * 1024  # bytes of a rejected payload kept in the `rejected` table
LOGGED_DETAIL = 160  # characters of a validation message in a log line
PERSISTENT_SESSION_S = 7 * 24 * 3600  # how long the broker keeps a stopped consumer's queue
SUB_SHARED, SUB_FLEET = 1, 2  # MQTT 5 subscription identifiers (--group)
FLEET_VIEW = ("status", "online", "meter")  # every instance of a group gets these
# A pile's row in `piles` from its status or online message (also pilehost.ingest's batches).
STATUS_SQL = """INSERT INTO piles (pile_id, state, pilot, offer_a, power_w, session_id, session_energy_wh,
                   faults, fw, board, boot, uptime_s, status_ts, clock_synced, status_at, last_seen_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (pile_id) DO UPDATE SET state = excluded.state, pilot = excluded.pilot,
                   offer_a = excluded.offer_a, power_w = excluded.power_w,
                   session_id = excluded.session_id, session_energy_wh = excluded.session_energy_wh,
                   faults = excluded.faults, fw = excluded.fw, board = excluded.board,
                   boot = excluded.boot, uptime_s = excluded.uptime_s, status_ts = excluded.status_ts,
                   clock_synced = excluded.clock_synced, status_at = excluded.status_at,
                   last_seen_at = excluded.last_seen_at"""
ONLINE_SQL = """INSERT INTO piles (pile_id, online, online_boot, online_at, last_seen_at)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (pile_id) DO UPDATE SET online = excluded.online,
                   online_boot = excluded.online_boot, online_at = excluded.online_at,
                   last_seen_at = excluded.last_seen_at"""


def pile_params(kind, pile_id, s, at):
    """The parameters of STATUS_SQL ("status") or ONLINE_SQL ("online") for message `s`."""
    if kind == "online":
        return (pile_id, s["online"], s["boot"], at, at)
    return (pile_id, s["state"], s["pilot"], float(s["offer_a"]), s["power_w"], s["session_id"],
            s["session_energy_wh"], json.dumps(s["faults"]), s["fw"], s["board"], s["boot"],
            s["uptime_s"], s["ts"], s["clock_synced"], at, at)


log = logging.getLogger("consumer")


class Rejected(Exception):
    """A message that can never be stored: `key` counts it, `detail` says why."""

    def __init__(self, key, detail=""):
        super().__init__("%s: %s" % (key, detail) if detail else key)
        self.key = key


class StorageError(Exception):
    """The database failed (down, disk full): stop and leave the message unacknowledged."""


class StorageRefused(Exception):
    """The database refused this one message's data: reject it, go on."""


def no_nul(text):
    return text.replace("\x00", "\ufffd")  # PostgreSQL text cannot hold NUL


def short(topic):
    """A topic as logged: topics can be as long as payloads."""
    return topic if len(topic) <= 120 else topic[:120] + "..."


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def canonical(obj):
    """The form stored and compared: a replay of the same record gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- schemas and topics ---------------------------------------------------------------------------

class Schemas:
    """docs/schemas/<kind>.v<N>.schema.json, looked up by the topic's kind and the payload's "v"."""

    def __init__(self, directory=SCHEMA_DIR):
        self.validators = {}  # kind -> {v: validator}
        self.kinds = {}  # topic suffix after <pile_id>/ -> kind
        for path in sorted(glob.glob(os.path.join(directory, "*.schema.json"))):
            match = re.fullmatch(r"([a-z_]+)\.v([1-9][0-9]*)\.schema\.json", os.path.basename(path))
            if not match:
                raise ValueError("%s: schema files are named <kind>.v<N>.schema.json" % path)
            kind, version = match.group(1), int(match.group(2))
            with open(path, encoding="utf-8") as f:
                schema = json.load(f)
            Draft202012Validator.check_schema(schema)
            if schema["properties"]["v"].get("const") != version:
                raise ValueError("%s: properties.v.const must be %d" % (path, version))
            prefix = TOPIC_ROOT + "/{pile_id}/"
            if not schema.get("x-topic", "").startswith(prefix):
                raise ValueError("%s: x-topic must start with %s" % (path, prefix))
            suffix = schema["x-topic"][len(prefix):]
            if self.kinds.setdefault(suffix, kind) != kind:
                raise ValueError("%s: topic %s already belongs to %s" % (path, suffix, self.kinds[suffix]))
            self.validators.setdefault(kind, {})[version] = Draft202012Validator(schema)
        if not self.validators:
            raise ValueError("no schemas in %s" % directory)

    def route(self, topic):
        """(pile_id, kind) of a topic; kind None for the command topic (not telemetry)."""
        parts = topic.split("/", 3)
        if len(parts) < 4 or "/".join(parts[:2]) != TOPIC_ROOT:
            raise Rejected("unknown_topic")
        pile_id, suffix = parts[2], parts[3]
        if pile_id == RELEASE_TOPIC:  # a release's chunks for the piles (docs/ota.md)
            return None, None
        if not PILE_ID_RE.fullmatch(pile_id):
            raise Rejected("bad_pile_id", "not a valid pile id in the topic")
        if suffix == COMMAND_TOPIC:
            return pile_id, None
        if suffix not in self.kinds:
            raise Rejected("unknown_topic")
        return pile_id, self.kinds[suffix]

    def check(self, kind, obj):
        versions = self.validators[kind]
        validator = versions.get(obj["v"])
        if validator is None:
            raise Rejected("unsupported_version",
                           "v=%r, this consumer knows %s" % (obj["v"], sorted(versions)))
        error = best_match(validator.iter_errors(obj))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(top)"
            raise Rejected("schema", "%s: %s" % (where, error.message[:LOGGED_DETAIL]))


def decode(payload):
    """A JSON object with an integer "v", or Rejected. Never parses an oversized payload."""
    if len(payload) > MAX_PAYLOAD:
        raise Rejected("too_large", "%d bytes" % len(payload))
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Rejected("not_utf8") from None
    except (ValueError, RecursionError) as e:
        raise Rejected("bad_json", str(e)[:80]) from None
    if not isinstance(obj, dict):
        raise Rejected("not_object")
    if type(obj.get("v")) is not int:
        raise Rejected("no_version", 'no integer "v"')
    return obj


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


# <boot> and <seq> of a session id <pile_id>-<boot>-<seq> (an event id: <pile_id>-<boot>-f<seq>),
# read from the right: pile ids may hold '-' and digits themselves.
_COUNTER_RE = re.compile(r"[1-9][0-9]{0,9}")


def id_owner(value, event=False):
    """The pile id a session (or fault event) id names, or None if it is not one."""
    if not isinstance(value, str):
        return None
    head, _, seq = value.rpartition("-")
    owner, _, boot = head.rpartition("-")
    if event:
        if not seq.startswith("f"):
            return None
        seq = seq[1:]
    if not (_COUNTER_RE.fullmatch(boot) and _COUNTER_RE.fullmatch(seq) and PILE_ID_RE.fullmatch(owner)):
        return None
    return owner


def check_ids(pile_id, obj):
    """What a schema cannot say: the topic's pile id, the payload's and the one each id names are
    the same, whole (pile A must not store A-1's session A-1-5-3). Rejected with the reason."""
    if "pile_id" in obj and obj["pile_id"] != pile_id:
        raise Rejected("pile_mismatch", "payload pile_id %r, topic pile id %r" % (obj["pile_id"], pile_id))
    for key in ("session_id", "event_id"):
        value = obj.get(key)
        if value is None:
            continue
        owner = id_owner(value, event=key == "event_id")
        if owner != pile_id:
            raise Rejected("pile_mismatch", "%s %r is not <pile_id>-<boot>-<seq> of pile %r" % (
                key, value, pile_id))


# --- storage --------------------------------------------------------------------------------------

# Types valid in both SQLite and PostgreSQL; times as ISO 8601 text (pile times may be unsynced).
TABLES = (
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT PRIMARY KEY, pile_id TEXT NOT NULL, connector BIGINT NOT NULL,
        auth_source TEXT NOT NULL, auth_id TEXT, start_time TEXT NOT NULL, stop_time TEXT NOT NULL,
        clock_synced BOOLEAN NOT NULL, meter_start_wh BIGINT NOT NULL, meter_stop_wh BIGINT NOT NULL,
        energy_wh BIGINT NOT NULL, duration_s BIGINT NOT NULL, peak_power_w BIGINT NOT NULL,
        stop_reason TEXT NOT NULL, meter_restarts BIGINT NOT NULL, meter_stop_stale BOOLEAN NOT NULL,
        v BIGINT NOT NULL, payload TEXT NOT NULL, received_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS session_starts (
        session_id TEXT PRIMARY KEY, pile_id TEXT NOT NULL, connector BIGINT NOT NULL,
        auth_source TEXT NOT NULL, auth_id TEXT, start_time TEXT NOT NULL, clock_synced BOOLEAN NOT NULL,
        meter_start_wh BIGINT NOT NULL, v BIGINT NOT NULL, payload TEXT NOT NULL,
        received_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS faults (
        event_id TEXT PRIMARY KEY, pile_id TEXT NOT NULL, code TEXT NOT NULL, action TEXT NOT NULL,
        ts TEXT NOT NULL, clock_synced BOOLEAN NOT NULL, session_id TEXT, v BIGINT NOT NULL,
        payload TEXT NOT NULL, received_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS piles (
        pile_id TEXT PRIMARY KEY, online BOOLEAN, online_boot BIGINT, online_at TEXT,
        state TEXT, pilot TEXT, offer_a DOUBLE PRECISION, power_w BIGINT, session_id TEXT,
        session_energy_wh BIGINT, faults TEXT, fw TEXT, board TEXT, boot BIGINT, uptime_s BIGINT,
        status_ts TEXT, clock_synced BOOLEAN, status_at TEXT, last_seen_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rejected (
        received_at TEXT NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
        size BIGINT NOT NULL, payload TEXT NOT NULL)""",
    *ops_store.TABLES,  # the operations page's power curves and indexes (pilehost/ops_store.py)
    *health_store.TABLES,  # the piles' health messages, latest and history (pilehost/health_store.py)
)
SESSION_ENDED_COLUMNS = ("session_id", "pile_id", "connector", "auth_source", "auth_id", "start_time",
                         "stop_time", "clock_synced", "meter_start_wh", "meter_stop_wh", "energy_wh",
                         "duration_s", "peak_power_w", "stop_reason", "meter_restarts", "meter_stop_stale",
                         "v")  # `estimated` (a list) only in payload
SESSION_STARTED_COLUMNS = ("session_id", "pile_id", "connector", "auth_source", "auth_id", "start_time",
                           "clock_synced", "meter_start_wh", "v")
FAULT_COLUMNS = ("event_id", "pile_id", "code", "action", "ts", "clock_synced", "session_id", "v")
NEW, DUPLICATE, CONFLICT = "new", "duplicate", "conflict"
# A column a newer consumer added to an older database: NOT NULL needs a default for the old rows
# (then replaced by the value in their payload, where it has one).
_ADDED_DEFAULTS = {"BIGINT": "0", "BOOLEAN": "FALSE", "TEXT": "''", "DOUBLE": "0"}


def table_columns(create):
    """(table, [(column, declaration)]) of one of TABLES; (None, []) for what is not a table (an
    index). Table constraints (PRIMARY KEY (a, b), UNIQUE ...) are not columns."""
    head, body = create.split("(", 1)
    if "CREATE TABLE" not in " ".join(head.split()):
        return None, []
    parts, depth, part = [], 0, ""
    for ch in body.rsplit(")", 1)[0]:  # split at the commas outside parentheses
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += ch
    parts.append(part)
    cols = []
    for part in parts:
        decl = " ".join(part.split())
        name = decl.split(" ", 1)[0]
        if name.upper() not in _CONSTRAINTS:
            cols.append((name, decl))
    return head.split()[-1], cols


_CONSTRAINTS = ("PRIMARY", "UNIQUE", "FOREIGN", "CHECK", "CONSTRAINT")


def added_column(decl):
    """The declaration for ALTER TABLE ... ADD COLUMN: never a key, a default when NOT NULL."""
    decl = decl.replace(" PRIMARY KEY", "")
    if "NOT NULL" in decl:
        decl += " DEFAULT " + _ADDED_DEFAULTS[decl.split()[1]]
    return decl


class Storage:
    """The SQL, written once with `?` placeholders; a backend gives the connection and its errors."""

    placeholder = "?"
    refused_errors = ()  # the database refused this data
    failed_errors = ()  # the database is unusable

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()  # one connection, used by the MQTT thread and by readers

    def run(self, sql, params=()):
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        with self._lock:
            try:
                cur = self.conn.cursor()
                cur.execute(sql, params)
                return cur
            except self.refused_errors as e:
                raise StorageRefused(str(e).strip()) from e
            except self.failed_errors as e:
                raise StorageError("%s: %s" % (type(e).__name__, str(e).strip())) from e

    def query(self, sql, params=()):
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall()

    def setup(self):
        for sql in TABLES:
            self.run(sql)
        self.migrate(self.run, self.columns)

    # A database made by an older consumer: the columns added since (SQLite has no IF NOT EXISTS;
    # a consumer starting at the same time may have added it: "duplicate column" is fine).
    add_column = "ALTER TABLE %s ADD COLUMN %s"

    def columns(self, table):
        return {row[1] for row in self.query("PRAGMA table_info(%s)" % table)}

    def json_value(self, name, sql_type):
        return "json_extract(payload, '$.%s')" % name

    def migrate(self, execute, columns):
        """ADD COLUMN for each column of TABLES the database lacks; in a record's table the old
        rows get the field from their payload where it is there, else the default. No row is
        dropped or rewritten otherwise."""
        for create in TABLES:
            table, cols = table_columns(create)
            if table is None:
                continue
            have = columns(table)
            names = [name for name, _ in cols]
            for name, decl in cols:
                if name in have:
                    continue
                try:
                    execute(self.add_column % (table, added_column(decl)))
                except StorageError as e:
                    if "duplicate column" not in str(e):
                        raise
                if "payload" in have and "v" in names:
                    value = self.json_value(name, decl.split(" ", 1)[1].split(" NOT NULL")[0])
                    execute("UPDATE %s SET %s = %s WHERE %s IS NOT NULL" % (table, name, value, value))

    def insert_once(self, table, key, row):
        """NEW, DUPLICATE (same payload already stored) or CONFLICT (same key, other payload)."""
        cols = list(row)
        cur = self.run("INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (%s) DO NOTHING" % (
            table, ", ".join(cols), ", ".join("?" * len(cols)), key), [row[c] for c in cols])
        if cur.rowcount == 1:
            return NEW
        stored = self.run("SELECT payload FROM %s WHERE %s = ?" % (table, key), (row[key],)).fetchone()
        return DUPLICATE if stored is not None and stored[0] == row["payload"] else CONFLICT

    def put_status(self, pile_id, s, received_at):
        self.run(STATUS_SQL, pile_params("status", pile_id, s, received_at))

    def put_online(self, pile_id, o, received_at):
        self.run(ONLINE_SQL, pile_params("online", pile_id, o, received_at))

    def add_rejected(self, topic, reason, detail, payload, received_at):
        kept = payload[:KEPT_REJECTED].decode("utf-8", "replace")
        self.run("""INSERT INTO rejected (received_at, topic, reason, detail, size, payload)
                    VALUES (?, ?, ?, ?, ?, ?)""",
                 (received_at, no_nul(topic[:1024]), reason, no_nul(detail[:500]), len(payload),
                  no_nul(kept)))

    def close(self):
        with self._lock:
            self.conn.close()


class SqliteStorage(Storage):
    refused_errors = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)
    failed_errors = (sqlite3.Error,)

    def __init__(self, path):
        # autocommit (isolation_level None): every statement stands alone, as with PostgreSQL here
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # several consumers on one file
        conn.execute("PRAGMA busy_timeout=30000")
        super().__init__(conn)

    def setup(self):
        # One transaction (SQLite's DDL is transactional): a consumer killed between an ADD COLUMN
        # and the UPDATE filling it leaves neither, so the next start does both; instances
        # starting together take turns instead of racing on the same ALTER.
        self.run("BEGIN IMMEDIATE")
        try:
            super().setup()
        except BaseException:
            with contextlib.suppress(Exception):
                self.run("ROLLBACK")
            raise
        self.run("COMMIT")


class PostgresStorage(Storage):
    placeholder = "%s"

    def __init__(self, url):
        import psycopg  # only needed for PostgreSQL

        self.refused_errors = (psycopg.DataError, psycopg.IntegrityError)
        self.failed_errors = (psycopg.Error,)
        super().__init__(psycopg.connect(url, autocommit=True, connect_timeout=10))

    def setup(self):
        # Instances starting together: CREATE TABLE IF NOT EXISTS can race in PostgreSQL.
        with self._lock, self.conn.transaction():
            cur = self.conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('evse-telemetry-schema'))")
            for sql in TABLES:
                cur.execute(sql)
            self.migrate(cur.execute, lambda table: {row[0] for row in cur.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                "AND table_schema = current_schema()", (table,)).fetchall()})

    add_column = "ALTER TABLE %s ADD COLUMN IF NOT EXISTS %s"

    def json_value(self, name, sql_type):
        return "CAST(payload::jsonb ->> '%s' AS %s)" % (name, sql_type.replace(" PRIMARY KEY", ""))


def open_storage(url):
    if url.startswith("sqlite:///"):
        return SqliteStorage(url[len("sqlite:///"):])  # sqlite:///rel.db, sqlite:////abs/path.db
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStorage(url)
    raise ValueError("--db: sqlite:///path.db or postgresql://user:pass@host/dbname, not %r" % redact(url))


# --- one message ----------------------------------------------------------------------------------

class Stats:
    """Counters for the monitor and the summary line; written by the MQTT thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = collections.Counter()
        self.rejected = collections.Counter()

    def add(self, key, n=1):
        with self._lock:
            self.counts[key] += n

    def reject(self, reason):
        with self._lock:
            self.counts["rejected"] += 1
            self.rejected[reason] += 1

    def snapshot(self):
        with self._lock:
            return dict(self.counts), dict(self.rejected)


class Fleet:
    """The latest of every pile seen: what the monitor prints (kept in memory, not read back)."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._piles = {}

    def _pile(self, pile_id):
        pile = self._piles.get(pile_id)
        if pile is None:
            pile = self._piles[pile_id] = {
                "pile_id": pile_id, "online": None, "state": None, "pilot": None, "offer_a": None,
                "power_w": None, "session_energy_wh": None, "faults": [], "last_seen": None}
        pile["last_seen"] = self.clock()
        return pile

    def update(self, pile_id, kind, obj):
        with self._lock:
            pile = self._pile(pile_id)
            if kind == "status":
                for key in ("state", "pilot", "offer_a", "power_w", "session_energy_wh", "faults"):
                    pile[key] = obj[key]
            elif kind == "online":
                pile["online"] = obj["online"]
            elif kind == "meter":
                pile["power_w"] = obj["power_w"]
                pile["session_energy_wh"] = obj["session_energy_wh"]

    def rows(self):
        with self._lock:
            return [dict(self._piles[k]) for k in sorted(self._piles)]


class Handler:
    """One message: route, decode, validate, store once, update the live view. No MQTT here.

    Raises StorageError when the database fails: the caller must not acknowledge the message.
    """

    def __init__(self, schemas, storage, fleet=None, stats=None):
        self.schemas = schemas
        self.storage = storage
        self.fleet = fleet if fleet is not None else Fleet()
        self.stats = stats if stats is not None else Stats()

    def handle(self, topic, payload, received_at=None):
        """The outcome: "new", "duplicate", "conflict", "stored", "ignored" or "rejected"."""
        received_at = received_at or utc_now()
        self.stats.add("received")
        try:
            pile_id, kind = self.schemas.route(topic)
            if kind is None:
                self.stats.add("ignored")
                return "ignored"
            obj = decode(payload)
            self.schemas.check(kind, obj)
            check_ids(pile_id, obj)
            outcome = self._store(pile_id, kind, obj, received_at)
        except Rejected as e:
            return self.reject(topic, e.key, str(e), payload, received_at)
        except StorageRefused as e:
            return self.reject(topic, "storage_refused", str(e), payload, received_at)
        self.stats.add("%s_%s" % (kind, outcome))
        if outcome == CONFLICT:
            log.warning("CONFLICT %s: %s already stored with other content; kept the first, this one is in"
                        " the rejected table", short(topic), obj.get("session_id") or obj.get("event_id"))
            self.storage.add_rejected(topic, "conflict", "same id, other content", payload, received_at)
        elif kind in ("session_started", "session_ended", "fault"):
            log.info("%s %s %s", outcome, kind, obj.get("session_id") or obj.get("event_id"))
        elif kind == "cmd_ack":
            log.info("ack %s %s %s: %s %s", pile_id, obj["cmd"], obj["cmd_id"], obj["result"],
                     obj["reason"] or "")
        self.fleet.update(pile_id, kind, obj)
        return outcome

    def _store(self, pile_id, kind, obj, received_at):
        if kind == "session_ended":
            return self._insert("sessions", "session_id", SESSION_ENDED_COLUMNS, obj, received_at)
        if kind == "session_started":
            return self._insert("session_starts", "session_id", SESSION_STARTED_COLUMNS, obj, received_at)
        if kind == "fault":
            return self._insert("faults", "event_id", FAULT_COLUMNS, obj, received_at)
        if kind == "status":
            self.storage.put_status(pile_id, obj, received_at)
        elif kind == "online":
            self.storage.put_online(pile_id, obj, received_at)
        elif kind == "meter":
            ops_store.put(self.storage, pile_id, obj, received_at)
        elif kind == "health":
            health_store.put(self.storage, pile_id, obj, canonical(obj), received_at)
        return "stored"  # acks: live view and log only

    def _insert(self, table, key, columns, obj, received_at):
        row = {c: obj[c] for c in columns}
        row["payload"] = canonical(obj)
        row["received_at"] = received_at
        return self.storage.insert_once(table, key, row)

    def reject(self, topic, reason, detail, payload, received_at):
        """Count, log (topic and size, never the payload) and keep the first bytes for later."""
        self.stats.reject(reason)
        log.warning("rejected %s (%d bytes): %s", short(topic), len(payload), detail[:LOGGED_DETAIL + 80])
        try:
            self.storage.add_rejected(topic, reason, detail, payload, received_at)
        except StorageRefused as e:
            log.warning("rejected table refused %s too: %s", short(topic), e)
        return "rejected"


# --- MQTT -----------------------------------------------------------------------------------------

class BrokerUrl:
    """mqtt://user:pass@host:port or mqtts://... (TLS, port 8883 by default)."""

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("--broker: mqtt://[user:pass@]host[:port] or mqtts://..., not %r" % redact(url))
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        self.password = password if password is not None else os.environ.get("EVSE_MQTT_PASSWORD")
        self.text = redact(url)


def redact(url):
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


class Consumer:
    """The paho client around a Handler. A message is acknowledged only once it is stored (or
    rejected for good), so with a persistent session (--client-id) nothing is lost when the
    consumer or its database stops."""

    def __init__(self, broker, handler, group=None, client_id=None, tls_ca=None, keepalive=30,
                 protocol=mqtt.MQTTv5):
        self.broker = broker if isinstance(broker, BrokerUrl) else BrokerUrl(broker)
        self.handler = handler
        self.group = group
        self.persistent = client_id is not None
        self.client_id = client_id or "evse-consumer-%s-%d-%s" % (socket.gethostname(), os.getpid(),
                                                                 os.urandom(3).hex())
        self.keepalive = keepalive
        self.failure = None  # set when it must stop: the reason, for the exit message
        self.exit_code = 0
        self.subscribed = threading.Event()
        self.connected_once = threading.Event()
        self._pending = set()
        # protocol=mqtt.MQTTv311 for a broker without MQTT 5 (make sim's amqtt): no --group then
        v3 = {} if protocol == mqtt.MQTTv5 else {"clean_session": not self.persistent}
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                      protocol=protocol, manual_ack=True, **v3)
        if self.broker.username is not None:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls or tls_ca:
            c.tls_set(ca_certs=tls_ca)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail

    def start(self):
        props = None
        if self.persistent and self.client.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = PERSISTENT_SESSION_S
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.keepalive,
                                  clean_start=not self.persistent, properties=props)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()

    def _fail(self, code, text):
        if self.failure is None:
            self.failure, self.exit_code = text, code
            log.error("%s", text)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if reason_code.value in (0x86, 0x87, 0x8C):  # bad user name or password, not authorised, bad auth
                self._fail(3, "broker %s refused the connection: %s" % (self.broker.text, reason_code))
            else:
                log.warning("broker %s refused the connection: %s (retrying)", self.broker.text, reason_code)
            return
        self.connected_once.set()
        log.info("connected to %s as %s (%s session%s)", self.broker.text, self.client_id,
                 "persistent" if self.persistent else "clean", ", resumed" if flags.session_present else "")
        if self.group is None:
            subscriptions = [([TOPIC_ROOT + "/#"], None)]
        else:
            subscriptions = [(["$share/%s/%s/#" % (self.group, TOPIC_ROOT)], SUB_SHARED),
                             # every instance's live view wants the whole fleet, and retained
                             # messages must not come through a shared subscription (MQTT 5 4.8.2)
                             ([TOPIC_ROOT + "/+/" + k for k in FLEET_VIEW], SUB_FLEET)]
        self._pending.clear()
        self.subscribed.clear()
        for topics, sub_id in subscriptions:
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            result, mid = client.subscribe([(t, 1) for t in topics],  # QoS 1
                                           properties=props)
            if result == mqtt.MQTT_ERR_SUCCESS:
                self._pending.add(mid)

    def _on_connect_fail(self, client, userdata):
        log.warning("cannot reach %s (retrying)", self.broker.text)

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        refused = [str(rc) for rc in reason_code_list if rc.is_failure]
        if refused:
            self._fail(3, "broker %s refused the subscription: %s" % (self.broker.text, ", ".join(refused)))
            return
        self._pending.discard(mid)
        if not self._pending:
            log.info("subscribed (%s)", "group %s" % self.group if self.group else "all of %s/#" % TOPIC_ROOT)
            self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.subscribed.clear()
        if reason_code.is_failure:
            log.warning("disconnected from %s: %s (reconnecting)", self.broker.text, reason_code)

    def _on_message(self, client, userdata, msg):
        if self.failure is not None:
            return  # stopping: left unacknowledged, the broker redelivers it to this session
        if self._fleet_copy(msg):
            self.handler.stats.add("shared_copy_skipped")
            client.ack(msg.mid, msg.qos)
            return
        try:
            self.handler.handle(msg.topic, msg.payload)
        except StorageError as e:
            self._fail(4, "storage failed on %s: %s; stopping with it unacknowledged" % (short(msg.topic), e))
            return
        except Exception as e:  # a bug here must not lose the message: keep it, then go on
            log.exception("internal error on %s", short(msg.topic))
            try:
                self.handler.reject(msg.topic, "internal_error", repr(e), msg.payload, utc_now())
            except Exception as again:
                self._fail(4, "could not keep %s after an internal error: %r" % (short(msg.topic), again))
                return
        client.ack(msg.mid, msg.qos)

    def _fleet_copy(self, msg):
        """With --group, a status/online/meter message that came through the shared subscription:
        the fleet subscription brings it to this instance too."""
        if self.group is None or msg.topic.rsplit("/", 1)[-1] not in FLEET_VIEW:
            return False
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        if ids is None:
            return False  # the broker sent no identifiers: handle it (storing status twice is harmless)
        ids = ids if isinstance(ids, list) else [ids]
        return SUB_FLEET not in ids


# --- monitor --------------------------------------------------------------------------------------

COLUMNS = (("pile", 16), ("online", 7), ("state", 16), ("pilot", 5), ("offer A", 7), ("power W", 8),
           ("session Wh", 10), ("faults", 24), ("last seen", 9))
_RED, _GREEN, _YELLOW, _RESET = "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[0m"


def age(seconds):
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def table_cells(row, now):
    """The monitor's cells for one pile, as text (what the tests read)."""
    online = {True: "yes", False: "NO", None: "?"}[row["online"]]
    offer = "-" if row["offer_a"] is None else "%.1f" % row["offer_a"]
    return [row["pile_id"], online, row["state"] or "?", row["pilot"] or "?", offer,
            "-" if row["power_w"] is None else str(row["power_w"]),
            "-" if row["session_energy_wh"] is None else str(row["session_energy_wh"]),
            ",".join(row["faults"]) or "-",
            age(None if row["last_seen"] is None else now - row["last_seen"])]


def render_table(rows, now=None, color=False):
    now = time.time() if now is None else now
    cells = [table_cells(row, now) for row in rows]
    widths = [w for _, w in COLUMNS]
    for i in (0, 7):  # pile ids and fault lists: as wide as the longest (ids are at most 64)
        widths[i] = max([widths[i]] + [len(c[i]) for c in cells])

    def line(cells, colors=None):
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            text = cell[:width].rjust(width) if 4 <= i <= 6 else cell[:width].ljust(width)
            if colors and colors[i]:
                text = colors[i] + text + _RESET
            out.append(text)
        return "  ".join(out).rstrip()

    lines = [line([name for name, _ in COLUMNS])]
    for row, row_cells in zip(rows, cells, strict=True):
        colors = None
        if color:
            colors = [None] * len(row_cells)
            colors[1] = {True: _GREEN, False: _RED}.get(row["online"])
            colors[2] = _RED if row["state"] == "fault" else (_GREEN if row["state"] == "charging" else None)
            colors[7] = _RED if row["faults"] else None
            colors[8] = _YELLOW if row["last_seen"] is not None and now - row["last_seen"] > 600 else None
        lines.append(line(row_cells, colors))
    if not rows:
        lines.append("(no pile seen yet)")
    return "\n".join(lines)


def summary(stats):
    counts, rejected = stats.snapshot()
    text = "received %d, sessions %d new / %d duplicate / %d conflict, starts %d new / %d duplicate, " \
           "faults %d new / %d duplicate, rejected %d" % (
               counts.get("received", 0), counts.get("session_ended_new", 0),
               counts.get("session_ended_duplicate", 0), counts.get("session_ended_conflict", 0),
               counts.get("session_started_new", 0), counts.get("session_started_duplicate", 0),
               counts.get("fault_new", 0), counts.get("fault_duplicate", 0), counts.get("rejected", 0))
    if rejected:
        text += " (%s)" % ", ".join("%s %d" % kv for kv in sorted(rejected.items()))
    return text


class RecentLog(logging.Handler):
    """The last few warnings, shown under the monitor's table."""

    def __init__(self, size=6):
        super().__init__(logging.WARNING)
        self.lines = collections.deque(maxlen=size)

    def emit(self, record):
        self.lines.append("%s %s" % (time.strftime("%H:%M:%S"), record.getMessage()[:150]))


# --- command line ---------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Reference consumer of the piles' telemetry (docs/telemetry.md).")
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port] or mqtts://... "
                   "(a user without a password takes it from EVSE_MQTT_PASSWORD)")
    p.add_argument("--tls-ca", help="CA certificate file for a TLS broker (implies TLS)")
    p.add_argument("--db", default="sqlite:///evse-telemetry.db",
                   help="sqlite:///path.db (default sqlite:///evse-telemetry.db) or postgresql://...")
    p.add_argument("--group", help="share the load with the other instances of this group "
                   "($share/NAME/%s/#)" % TOPIC_ROOT)
    p.add_argument("--client-id", help="stable MQTT client id: a persistent session, so the broker keeps "
                   "messages for this instance while it is stopped (use it in production)")
    p.add_argument("--monitor", action="store_true", help="live table of the piles, refreshed every second")
    p.add_argument("--once-for", type=float, metavar="SECONDS", help="stop after this many seconds")
    p.add_argument("--schemas", default=SCHEMA_DIR, help="schema directory (default docs/schemas)")
    p.add_argument("--health-days", type=health_store.retention_days, default=health_store.RETENTION_DAYS,
                   metavar="DAYS", help="keep health_history this many days (default %d; 0: for ever)" %
                   health_store.RETENTION_DAYS)
    p.add_argument("-v", "--verbose", action="store_true", help="log every stored record")
    args = p.parse_args(argv)
    if args.group is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.group):
        p.error("--group: letters, digits, '.', '_' and '-' only")
    return args


def prune(pruner, storage):
    """One bounded step of health_history's retention (health_store.Pruner); a failure is logged
    and tried again later: storing the messages is what must go on."""
    try:
        n = pruner.step(storage)
    except Exception as e:  # StorageError, or a deadlock with another instance's prune
        log.warning("health_history not pruned: %s", str(e).strip()[:200])
        return
    if n:
        log.info("health_history: %d rows older than %d days deleted", n, pruner.days)


def main(argv=None):
    args = parse_args(argv)
    recent = RecentLog()
    tty = args.monitor and sys.stdout.isatty()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if tty:
        logging.getLogger().addHandler(recent)
        if sys.stderr.isatty():  # same screen: the table would wipe the lines; keep them below it
            logging.getLogger().removeHandler(logging.getLogger().handlers[0])
    try:
        broker = BrokerUrl(args.broker)
        schemas = Schemas(args.schemas)
        storage = open_storage(args.db)
        storage.setup()
    except (ValueError, OSError, StorageError, ImportError) as e:
        print("consumer: %s" % e, file=sys.stderr)
        return 2
    except Exception as e:  # psycopg's connection errors and the like
        print("consumer: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 2
    handler = Handler(schemas, storage)
    consumer = Consumer(broker, handler, group=args.group, client_id=args.client_id, tls_ca=args.tls_ca)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    consumer.start()
    deadline = None if args.once_for is None else time.monotonic() + args.once_for
    header = "evse consumer  broker %s  db %s%s" % (broker.text, redact(args.db),
                                                   "  group %s" % args.group if args.group else "")
    pruner = health_store.Pruner(args.health_days)
    while not stop.is_set() and consumer.failure is None:
        prune(pruner, storage)
        if tty:
            link = "connected" if consumer.client.is_connected() else _RED + "NOT CONNECTED" + _RESET
            screen = [header + "  " + link, "", render_table(handler.fleet.rows(), color=True), "",
                      summary(handler.stats)]
            screen += list(recent.lines)
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(screen) + "\n")
            sys.stdout.flush()
        wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if wait <= 0:
            break
        stop.wait(wait)
    consumer.stop()
    storage.close()
    if args.monitor and not tty:
        print(render_table(handler.fleet.rows()))
    print("consumer: %s" % summary(handler.stats), file=sys.stderr)
    if consumer.failure is not None:
        print("consumer: %s" % consumer.failure, file=sys.stderr)
        return consumer.exit_code
    if not consumer.connected_once.is_set():
        print("consumer: never connected to %s" % broker.text, file=sys.stderr)
        return 5
    return 0
