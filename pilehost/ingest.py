"""The reference consumer at fleet scale: batches, back-pressure, shared subscriptions, a database
that goes away and comes back (docs/cloud.md).

Its command line, with the usage: tools/ingest.py.

Same tables, same checks and the same "one row per id" rule as pilehost/consumer.py (whose
`Schemas`, `decode`, `check_ids`, column lists and `Storage` it uses); what differs is the flow:

- **one transaction per batch**: up to `batch` messages, multi-row `INSERT ... ON CONFLICT DO
  NOTHING RETURNING <id>` per table (what is not returned was there: a replay, or a conflict when
  the payload differs), the piles' latest status and online collapsed per pile, the meter
  values into `meter_samples` (the operations page's power curves, pilehost/ops_store.py), the
  `health` messages into `health_history` and the latest per pile into `pile_health`
  (pilehost/health_store.py);
- **acknowledged after the commit, never before**: a batch that fails is retried (the database
  reopened with a growing pause) and its messages stay unacknowledged meanwhile; if this process
  dies the broker sends them again (persistent session: `--client-id`) and they are duplicates;
- **back-pressure**: MQTT 5 Receive Maximum = `inflight`: the broker has at most that many
  unacknowledged messages out to this instance, so a slow database slows the broker's sending,
  not this process's memory; the hand-over queue is bounded too (a full queue stops the network
  thread reading the socket, for a broker that ignores Receive Maximum); Maximum Packet Size
  bounds each message, so the memory held is at most `inflight` x MAX_PACKET;
- **shared subscription** `$share/<group>/evse/v1/#` only (no per-instance fleet view: the
  database is the view), so N instances each see 1/N of the traffic.
"""
import argparse
import collections
import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import consumer, health_store, ops_store
from .consumer import (CONFLICT, DUPLICATE, FAULT_COLUMNS, NEW, SESSION_ENDED_COLUMNS,
                       SESSION_STARTED_COLUMNS, TOPIC_ROOT, BrokerUrl, Rejected, StorageError,
                       canonical, check_ids, decode, redact, utc_now)

log = logging.getLogger("ingest")

RECORDS = {  # kind -> (table, key, columns): the records stored once under their id
    "session_ended": ("sessions", "session_id", SESSION_ENDED_COLUMNS),
    "session_started": ("session_starts", "session_id", SESSION_STARTED_COLUMNS),
    "fault": ("faults", "event_id", FAULT_COLUMNS),
}
SQLITE_MAX_PARAMS = 999  # SQLITE_MAX_VARIABLE_NUMBER of older builds
MAX_PACKET = consumer.MAX_PAYLOAD + 4096  # bytes of one PUBLISH at most: payload, topic, header
RETRY_MIN_S, RETRY_MAX_S = 0.5, 15.0  # pause before reopening a failed database (doubles, jitter)

REJECTED_SQL = ("INSERT INTO rejected (received_at, topic, reason, detail, size, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)")

Item = collections.namedtuple("Item", "topic payload mid qos generation received_at arrived")


class Prepared:
    """A batch checked and sorted, before any SQL: what each table gets."""

    def __init__(self):
        self.records = {kind: [] for kind in RECORDS}  # kind -> [(item index, row)]
        self.status = {}  # pile_id -> (payload, received_at): the latest of the batch
        self.online = {}
        self.meters = []  # ops_store.meter_params: the operations page's power curves
        self.health = []  # health_store.params: every health message (its history)
        self.health_latest = {}  # pile_id -> the params of its newest health message in the batch
        self.rejected = []  # (item index, reason, detail)
        self.outcomes = {}  # item index -> (kind, outcome, id or None)


def prepare(schemas, items):
    """Route, decode, validate and check the ids of every message (CPU only, no database)."""
    p = Prepared()
    for i, item in enumerate(items):
        try:
            pile_id, kind = schemas.route(item.topic)
            if kind is None:
                p.outcomes[i] = (None, "ignored", None)
                continue
            obj = decode(item.payload)
            schemas.check(kind, obj)
            check_ids(pile_id, obj)
        except Rejected as e:
            p.rejected.append((i, e.key, str(e)))
            continue
        if kind in RECORDS:
            columns = RECORDS[kind][2]
            row = {c: obj[c] for c in columns}
            row["payload"] = canonical(obj)
            row["received_at"] = item.received_at
            p.records[kind].append((i, row))
        elif kind == "status":
            p.status[pile_id] = (obj, item.received_at)
            p.outcomes[i] = (kind, "stored", None)
        elif kind == "online":
            p.online[pile_id] = (obj, item.received_at)
            p.outcomes[i] = (kind, "stored", None)
        elif kind == "meter":
            p.meters.append(ops_store.meter_params(pile_id, obj, item.received_at))
            p.outcomes[i] = (kind, "stored", None)
        elif kind == "health":
            row = health_store.params(pile_id, obj, canonical(obj), item.received_at)
            p.health.append(row)
            old = p.health_latest.get(pile_id)
            if old is None or health_store.newer(row, old):
                p.health_latest[pile_id] = row
            p.outcomes[i] = (kind, "stored", None)
        else:
            p.outcomes[i] = (kind, "stored", None)  # acks and the like: nothing kept
    return p


class BatchStore:
    """A Storage (consumer.open_storage(url)) written one transaction per batch; reopened when
    the database fails. `write(items)` returns the outcome of each item, or raises StorageError
    (nothing of the batch is committed then)."""

    def __init__(self, schemas, url, stats=None):
        self.schemas = schemas
        self.url = url
        self.stats = stats if stats is not None else consumer.Stats()
        self.storage = None
        self.reopen()

    def reopen(self):
        """A new connection (the old one closed once the new one works)."""
        storage = consumer.open_storage(self.url)
        storage.setup()
        self.close()
        self.storage = storage

    def close(self):
        if self.storage is not None:
            with contextlib.suppress(Exception):
                self.storage.close()
            self.storage = None

    @property
    def postgres(self):
        return isinstance(self.storage, consumer.PostgresStorage)

    @contextlib.contextmanager
    def _transaction(self):
        conn = self.storage.conn
        if self.postgres:
            with conn.transaction():
                yield conn.cursor()
            return
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            with contextlib.suppress(Exception):
                cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def _sql(self, sql):
        return sql if self.storage.placeholder == "?" else sql.replace("?", self.storage.placeholder)

    def write(self, items):
        p = prepare(self.schemas, items)
        s = self.storage
        if s is None:
            raise StorageError("no database connection (reopening failed)")
        try:
            with s._lock, self._transaction() as cur:
                self._write(cur, items, p)
        except s.refused_errors as e:
            # One message's data refused (a value the column cannot hold): the batch is rolled
            # back; each message then goes the one-at-a-time way, which rejects just that one.
            log.warning("batch refused (%s): storing its %d messages one by one", str(e).strip()[:120],
                        len(items))
            return self._one_by_one(items)
        except s.failed_errors as e:
            raise StorageError("%s: %s" % (type(e).__name__, str(e).strip())) from e
        self._count(p)
        return p.outcomes

    def _one_by_one(self, items):
        handler = consumer.Handler(self.schemas, self.storage, stats=self.stats)
        outcomes = {}
        for i, item in enumerate(items):
            outcomes[i] = (None, handler.handle(item.topic, item.payload, item.received_at), None)
        return outcomes

    def _count(self, p):
        add = self.stats.add
        add("received", len(p.outcomes) + len(p.rejected))
        for kind, outcome, _ in p.outcomes.values():
            add("ignored" if kind is None else "%s_%s" % (kind, outcome))
        for _, reason, _ in p.rejected:
            self.stats.reject(reason)

    def _write(self, cur, items, p):
        for kind, rows in p.records.items():
            if rows:
                self._insert_once(cur, kind, rows, items, p)
        # Rows in one order (pile id) in every instance: two batches updating the same piles in
        # opposite orders would deadlock in PostgreSQL (it aborts one; the retry would store it).
        status_sql, online_sql = self._sql(consumer.STATUS_SQL), self._sql(consumer.ONLINE_SQL)
        for pile_id in sorted(set(p.status) | set(p.online)):
            for kind, latest, sql in (("status", p.status, status_sql), ("online", p.online, online_sql)):
                if pile_id in latest:
                    obj, at = latest[pile_id]
                    cur.execute(sql, consumer.pile_params(kind, pile_id, obj, at))
        if p.meters:  # (session_id, ts) order in every instance, as above
            cur.executemany(self._sql(ops_store.METER_SQL), sorted(p.meters, key=lambda m: (m[0], m[1])))
        if p.health:  # key order in every instance, as above; one row per (pile_id, boot, uptime_s)
            cur.executemany(self._sql(health_store.HISTORY_SQL), sorted(p.health, key=lambda h: h[:3]))
            cur.executemany(self._sql(health_store.LATEST_SQL),
                            [p.health_latest[pile_id] for pile_id in sorted(p.health_latest)])
        if p.rejected:
            cur.executemany(self._sql(REJECTED_SQL), [self._rejected_params(items[i], reason, detail)
                                                      for i, reason, detail in p.rejected])

    def _insert_once(self, cur, kind, rows, items, p):
        table, key, _ = RECORDS[kind]
        first = {}  # key -> payload of its first copy in this batch
        unique = []
        for i, row in rows:
            k = row[key]
            if k in first:
                p.outcomes[i] = (kind, DUPLICATE if first[k] == row["payload"] else CONFLICT, k)
            else:
                first[k] = row["payload"]
                unique.append((i, row))
        unique.sort(key=lambda pair: pair[1][key])  # the same lock order in every instance
        cols = list(unique[0][1])
        per_chunk = max(1, SQLITE_MAX_PARAMS // len(cols)) if not self.postgres else 500
        inserted = set()
        for start in range(0, len(unique), per_chunk):
            chunk = unique[start:start + per_chunk]
            values = ", ".join(["(%s)" % ", ".join("?" * len(cols))] * len(chunk))
            cur.execute(self._sql("INSERT INTO %s (%s) VALUES %s ON CONFLICT (%s) DO NOTHING RETURNING %s" % (
                table, ", ".join(cols), values, key, key)), [row[c] for _, row in chunk for c in cols])
            inserted.update(r[0] for r in cur.fetchall())
        there = [row[key] for _, row in unique if row[key] not in inserted]
        stored = {}
        for start in range(0, len(there), SQLITE_MAX_PARAMS):
            chunk = there[start:start + SQLITE_MAX_PARAMS]
            cur.execute(self._sql("SELECT %s, payload FROM %s WHERE %s IN (%s)" % (
                key, table, key, ", ".join("?" * len(chunk)))), chunk)
            stored.update(cur.fetchall())
        conflicts = []
        for i, row in unique:
            k = row[key]
            if k in inserted:
                p.outcomes[i] = (kind, NEW, k)
            else:
                p.outcomes[i] = (kind, DUPLICATE if stored.get(k) == row["payload"] else CONFLICT, k)
        for i, row in rows:
            if p.outcomes[i][1] == CONFLICT:
                log.warning("CONFLICT %s: %s already stored with other content; kept the first, this one is"
                            " in the rejected table", consumer.short(items[i].topic), row[key])
                conflicts.append(self._rejected_params(items[i], "conflict", "same id, other content"))
        if conflicts:
            cur.executemany(self._sql(REJECTED_SQL), conflicts)

    @staticmethod
    def _rejected_params(item, reason, detail):
        kept = item.payload[:consumer.KEPT_REJECTED].decode("utf-8", "replace")
        return (item.received_at, consumer.no_nul(item.topic[:1024]), reason,
                consumer.no_nul(detail[:500]), len(item.payload), consumer.no_nul(kept))

class BatchConsumer:
    """paho (MQTT 5) -> bounded queue -> one writer thread -> BatchStore -> acknowledgements.

    commit_log: a file object; after each commit one line per new session/ended record,
    "<unix time of the commit> <session_id>" (the fleet's delay figures)."""

    def __init__(self, broker, store, group=None, client_id=None, batch=500, inflight=1000,
                 linger_s=0.05, keepalive=30, commit_log=None, pruner=None):
        self.broker = broker if isinstance(broker, BrokerUrl) else BrokerUrl(broker)
        self.store = store
        self.group = group
        self.persistent = client_id is not None
        self.client_id = client_id or "evse-ingest-%d-%s" % (os.getpid(), os.urandom(3).hex())
        self.batch = batch
        self.inflight = inflight
        self.linger_s = linger_s
        self.keepalive = keepalive
        self.commit_log = commit_log
        self.pruner = pruner  # health_store.Pruner: its steps between the batches, in the writer
        self.queue = queue.Queue(maxsize=inflight)
        self.generation = 0  # connections so far: an ack belongs to the connection it came on
        self._ack_lock = threading.RLock()  # the generation's change vs. a batch's acknowledgements
        self.subscribed = threading.Event()
        self.stopping = threading.Event()
        self.failure = None
        self.batches = 0
        self.retries = 0
        self.max_queued = 0
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                      protocol=mqtt.MQTTv5, manual_ack=True)
        if self.broker.username is not None:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            c.tls_set()
        c.max_inflight_messages_set(20)
        c.reconnect_delay_set(1, 8)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self.writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)

    def topic(self):
        return "%s%s/#" % ("$share/%s/" % self.group if self.group else "", TOPIC_ROOT)

    def start(self):
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = self.inflight  # MQTT 5 section 4.9: the broker's in-flight window
        # ... and each of them bounded too (3.1.2.11.4: the broker drops a bigger one unsent):
        # nothing beyond consumer.MAX_PAYLOAD is a record, and a pile's topic is short.
        props.MaximumPacketSize = MAX_PACKET
        if self.persistent:
            props.SessionExpiryInterval = consumer.PERSISTENT_SESSION_S
        self.writer.start()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.keepalive,
                                  clean_start=not self.persistent, properties=props)
        self.client.loop_start()

    def stop(self):
        """Stop reading; the batch being written is finished and acknowledged, the rest is left
        to the broker (this session, or the group)."""
        self.stopping.set()
        self.writer.join(60)
        self.client.disconnect()
        self.client.loop_stop()
        self.store.close()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.broker.text, reason_code)
            if reason_code.value in (0x86, 0x87, 0x8C):
                self.failure = "broker refused: %s" % reason_code
            return
        with self._ack_lock:  # no acknowledgement of the old connection's messages from now on
            self.generation += 1
        log.info("connected to %s as %s%s", self.broker.text, self.client_id,
                 " (session resumed)" if flags.session_present else "")
        client.subscribe([(self.topic(), 1)])

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        refused = [str(rc) for rc in reason_code_list if rc.is_failure]
        if refused:
            self.failure = "broker refused the subscription: %s" % ", ".join(refused)
            log.error("%s", self.failure)
            return
        log.info("subscribed to %s", self.topic())
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.subscribed.clear()
        if reason_code.is_failure and not self.stopping.is_set():
            log.warning("disconnected from %s: %s (reconnecting)", self.broker.text, reason_code)

    def _on_message(self, client, userdata, msg):
        item = Item(msg.topic, msg.payload, msg.mid, msg.qos, self.generation, utc_now(), time.time())
        while not self.stopping.is_set():  # blocks the network thread: it stops reading the socket
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _take(self):
        """Up to `batch` items: waits for the first, then `linger_s` for more."""
        try:
            items = [self.queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.linger_s
        while len(items) < self.batch:
            left = deadline - time.monotonic()
            try:
                items.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        self.max_queued = max(self.max_queued, len(items) + self.queue.qsize())
        return items

    def _write_loop(self):
        pause = RETRY_MIN_S
        while not self.stopping.is_set():
            if self.pruner is not None and self.store.storage is not None:
                consumer.prune(self.pruner, self.store.storage)  # one bounded DELETE at most
            items = self._take()
            if not items:
                continue
            while True:
                try:
                    outcomes = self.store.write(items)
                    break
                except Exception as e:  # StorageError, or a bug: the batch is kept, never acknowledged
                    if not isinstance(e, StorageError):
                        log.exception("batch of %d: internal error", len(items))
                    self.retries += 1
                    log.warning("batch of %d not stored (%s); unacknowledged, retrying in %.1f s",
                                len(items), e, pause)
                    if self.stopping.wait(pause):
                        return  # left unacknowledged: the broker sends them again
                    pause = min(pause * 2, RETRY_MAX_S)
                    try:
                        self.store.reopen()
                    except Exception as again:  # psycopg's OperationalError while it is down
                        log.warning("database still unreachable: %s", str(again).strip()[:160])
            pause = RETRY_MIN_S
            self.batches += 1
            if self.commit_log is not None:
                self._log_commits(outcomes, time.time())
            self._ack(items)

    def _ack(self, items):
        """PUBACK the batch's messages that came on this connection. Packet ids belong to a
        connection: after a reconnect the same id names another message, not yet stored. The
        generation is read for each message and under the lock the reconnect takes, so the new
        connection's subscription (and its messages) waits for this loop."""
        with self._ack_lock:
            for item in items:
                if item.qos and item.generation == self.generation:
                    self.client.ack(item.mid, item.qos)

    def _log_commits(self, outcomes, now):
        lines = []
        for kind, outcome, key in outcomes.values():
            if kind == "session_ended" and outcome == NEW:
                lines.append("%.3f %s\n" % (now, key))
        if lines:
            self.commit_log.write("".join(lines))
            self.commit_log.flush()


def parse_args(argv):
    p = argparse.ArgumentParser(description="The reference consumer for a fleet: batches, back-pressure, "
                                "shared subscriptions (docs/cloud.md).")
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port] (MQTT 5)")
    p.add_argument("--db", default="sqlite:///evse-telemetry.db", help="sqlite:///path.db or postgresql://...")
    p.add_argument("--group", help="share the load: $share/GROUP/%s/#" % TOPIC_ROOT)
    p.add_argument("--client-id", help="stable client id: a persistent session (use it in production: "
                   "what was not acknowledged when this process stopped comes back to it)")
    p.add_argument("--batch", type=int, default=500, help="messages per transaction (default 500)")
    p.add_argument("--inflight", type=int, default=1000, help="MQTT 5 Receive Maximum: unacknowledged "
                   "messages the broker may have out to us, and the queue's bound (default 1000)")
    p.add_argument("--linger-ms", type=float, default=50, help="wait this long to fill a batch (default 50)")
    p.add_argument("--commit-log", help="append '<commit time> <pile_id>' per new session/ended record")
    p.add_argument("--once-for", type=float, metavar="SECONDS", help="stop after this many seconds")
    p.add_argument("--health-days", type=health_store.retention_days, default=health_store.RETENTION_DAYS,
                   metavar="DAYS", help="keep health_history this many days (default %d; 0: for ever)" %
                   health_store.RETENTION_DAYS)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not (1 <= args.batch <= args.inflight):
        p.error("--batch must be 1..--inflight")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s ingest[%(process)d] %(levelname)s %(message)s", stream=sys.stderr)
    log_file = open(args.commit_log, "a", encoding="utf-8") if args.commit_log else None  # noqa: SIM115
    try:
        store = BatchStore(consumer.Schemas(), args.db)
        c = BatchConsumer(args.broker, store, group=args.group, client_id=args.client_id, batch=args.batch,
                          inflight=args.inflight, linger_s=args.linger_ms / 1000, commit_log=log_file,
                          pruner=health_store.Pruner(args.health_days))
    except Exception as e:  # a bad URL, a database that is not there at the start
        print("ingest: %s: %s" % (type(e).__name__, redact(str(e))), file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    c.start()
    stop.wait(args.once_for)
    c.stop()
    print("ingest: %s; %d batches, %d retries, at most %d queued" % (
        consumer.summary(store.stats), c.batches, c.retries, c.max_queued), file=sys.stderr)
    if log_file:
        log_file.close()
    return 3 if c.failure else 0


