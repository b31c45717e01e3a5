"""The piles' `health` messages stored (pilehost/health_store.py, docs/cloud.md): the latest per pile
in `pile_health`, every one once in `health_history`, by the consumer (one message at a time) and by
ingest (a batch), on SQLite and the real PostgreSQL (conftest's db_url); a store made before these
tables gets them; the operations page's query reads them back (pilehost/ops_queries.py)."""
import json
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilehost import consumer, health_store, ingest, procs
from pilehost.cloud import schemas
from pilehost.ops_queries import OpsQueries, open_reader

SCHEMAS = schemas()


def health(boot=1, uptime_s=60, **kw):
    """A health.v1 message as a pile sends it (firmware/telemetry.py), valid against the schema."""
    h = {"v": 1, "ts": "2026-12-06T06:00:00Z", "clock_synced": True, "boot": boot, "uptime_s": uptime_s,
         "reset_cause": "power_on", "fw": "0.2.0", "board": "ref-esp32", "heap_free": 61000,
         "heap_largest_free": 30000, "outbox_records": 0, "outbox_oldest_s": None, "wifi_rssi": -61,
         "link": {"connects": 1, "reconnects": 0, "wifi_restarts": 0, "resets": 0, "last_step": None,
                  "last_reason": None, "client_id_conflict": False},
         "meter_errors": None, "loop_ms": {"max": 12, "avg": 5}}
    link = kw.pop("link", {})
    h.update(kw)
    h["link"].update(link)
    SCHEMAS.check("health", h)
    return h


def topic(pile_id):
    return "evse/v1/%s/health" % pile_id


class Store:
    """The health rows of a database the consumer keeps (db: conftest's ConsumerDb)."""

    def __init__(self, db):
        self.db = db
        self.url = db.url
        self.storage = db.storage
        self.handler = db.handler

    def send(self, pile_id, h):
        return self.handler.handle(topic(pile_id), json.dumps(h).encode())

    def latest(self, pile_id):
        rows = self.storage.query("SELECT boot, uptime_s, reconnects, wifi_restarts, last_step, payload"
                                  " FROM pile_health WHERE pile_id = ?", (pile_id,))
        return rows[0] if rows else None

    def history(self, pile_id):
        return self.storage.query("SELECT boot, uptime_s FROM health_history WHERE pile_id = ?"
                                  " ORDER BY boot, uptime_s", (pile_id,))

    def close(self):
        self.db.close()


@pytest.fixture
def store(db_url, consumer_db):
    return Store(consumer_db(db_url))


@pytest.fixture
def store_before_health(tmp_path):
    """sqlite:/// URL of a store made by a consumer older than the health tables, one pile in it."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for sql in consumer.TABLES:
        if "pile_health" not in sql and "health_history" not in sql:
            conn.execute(sql)
    conn.execute("INSERT INTO piles (pile_id, last_seen_at) VALUES ('old-pile', '2026-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    return "sqlite:///%s" % path


def test_the_consumer_keeps_the_latest_health_per_pile_and_every_one_once(store):
    assert store.send("pile-1", health(1, 60)) == "stored"
    h2 = health(1, 120, link={"reconnects": 3, "wifi_restarts": 1, "last_step": "wifi_restart",
                              "last_reason": "no CONNACK within 5 s, with the Wi-Fi up"},
                meter_errors={"crc": 2, "timeout": 1})
    assert store.send("pile-1", h2) == "stored"
    store.send("pile-1", h2)  # the retained copy again (a new subscription): one row
    store.send("pile-1", health(1, 90))  # a late redelivery of an older one: not the latest
    store.send("pile-2", health(4, 10, reset_cause="wdt"))
    boot, up, reconnects, restarts, step, payload = store.latest("pile-1")
    assert (boot, up, reconnects, restarts, step) == (1, 120, 3, 1, "wifi_restart")
    assert json.loads(payload) == h2
    assert store.history("pile-1") == [(1, 60), (1, 90), (1, 120)]
    assert store.latest("pile-2")[:2] == (4, 10)
    # a new boot replaces the latest even with a smaller uptime (and a smaller boot: a new board)
    store.send("pile-1", health(2, 5))
    assert store.latest("pile-1")[:2] == (2, 5)
    store.send("pile-1", health(1, 300))
    assert store.latest("pile-1")[:2] == (1, 300)
    assert store.storage.query("SELECT COUNT(*) FROM rejected") == [(0,)]


def test_an_invalid_health_message_is_rejected_not_stored(store):
    bad = health()
    bad["heap_free"] = -1
    assert store.handler.handle(topic("pile-1"), json.dumps(bad).encode()) == "rejected"
    assert store.latest("pile-1") is None and store.history("pile-1") == []


def test_ingest_stores_a_batch_of_health_messages_like_the_consumer(db_url, consumer_db):
    bs = ingest.BatchStore(SCHEMAS, db_url)
    items = []
    for i, (pile_id, h) in enumerate([("p-a", health(1, 60)), ("p-b", health(3, 30)), ("p-a", health(1, 180)),
                                      ("p-a", health(1, 120)), ("p-a", health(1, 180))]):
        items.append(ingest.Item(topic(pile_id), json.dumps(h).encode(), i, 1, 0,
                                 "2026-12-06T06:00:0%dZ" % i, 0.0))
    try:
        outcomes = bs.write(items)
        assert {o[:2] for o in outcomes.values()} == {("health", "stored")}
        bs.write(items[:2])  # a redelivered batch: nothing new
    finally:
        bs.close()
    s = Store(consumer_db(db_url))
    assert s.latest("p-a")[:2] == (1, 180) and s.latest("p-b")[:2] == (3, 30)
    assert s.history("p-a") == [(1, 60), (1, 120), (1, 180)]


uptimes = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 10 ** 6)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uptimes)
def test_ingest_and_the_consumer_agree_on_the_latest_whatever_the_order(tmp_path_factory, consumer_db, seq):
    """The same messages, one at a time or in one batch: the same latest row and history."""
    d = tmp_path_factory.mktemp("h")
    one = Store(consumer_db("sqlite:///%s" % (d / "one.db")))
    for boot, up in seq:
        one.send("p", health(boot, up))
    bs = ingest.BatchStore(SCHEMAS, "sqlite:///%s" % (d / "batch.db"))
    bs.write([ingest.Item(topic("p"), json.dumps(health(b, u)).encode(), i, 1, 0, "t%d" % i, 0.0)
              for i, (b, u) in enumerate(seq)])
    bs.close()
    batch = Store(consumer_db("sqlite:///%s" % (d / "batch.db")))
    try:
        assert batch.latest("p")[:2] == one.latest("p")[:2]
        assert batch.history("p") == one.history("p")
    finally:
        one.close()
        batch.close()


def test_a_store_made_before_the_health_tables_gets_them_and_keeps_its_rows(store_before_health, consumer_db):
    s = Store(consumer_db(store_before_health))
    s.send("old-pile", health())
    assert s.latest("old-pile")[:2] == (1, 60)
    assert s.storage.query("SELECT pile_id FROM piles") == [("old-pile",)]


def test_the_operations_page_query_reads_the_latest_health(store):
    store.handler.handle("evse/v1/pile-9/online", json.dumps({"v": 1, "online": True, "boot": 2}).encode())
    reader = open_reader(store.url)
    try:
        q = OpsQueries(reader)
        assert q.pile("pile-9")["reported"] is None
        store.send("pile-9", health(2, 600, heap_free=42000, wifi_rssi=None, reset_cause="soft",
                                    link={"connects": 4, "client_id_conflict": True,
                                          "last_reason": "client_id_conflict", "last_step": "reconnect"},
                                    meter_errors={"timeout": 7}))
        r = q.pile("pile-9")["reported"]
        assert (r["boot"], r["uptime_s"], r["heap_free"], r["wifi_rssi"], r["reset_cause"]) == (
            2, 600, 42000, None, "soft")
        assert r["client_id_conflict"] is True and r["clock_synced"] is True
        assert r["connects"] == 4 and r["last_reason"] == "client_id_conflict"
        assert r["meter_errors"] == {"timeout": 7}
        json.dumps(r)  # ready for the page
    finally:
        reader.close()


def test_the_query_on_a_store_without_the_health_table_says_none(store_before_health):
    reader = open_reader(store_before_health)
    try:
        assert OpsQueries(reader).pile("old-pile")["reported"] is None
    finally:
        reader.close()


# -- retention: health_store.Pruner, the consumer's and ingest's --health-days ----------------------

DAY_S = 86400
NOW = 1_796_000_000  # 2026-11-30, a fixed "now" for the pruner's clock


def put_at(store, pile_id, uptime_s, t):
    """A health row of pile_id received at unix time t."""
    h = health(1, uptime_s)
    health_store.put(store.storage, pile_id, h, json.dumps(h), health_store.received_text(t))


def kept(store):
    return sorted(store.storage.query("SELECT pile_id, uptime_s FROM health_history"))


def test_received_text_is_the_consumers_format():
    now = consumer.utc_now()
    assert len(health_store.received_text(NOW)) == len(now) and now.endswith("Z")
    assert health_store.received_text(0) == "1970-01-01T00:00:00.000Z"


def test_the_pruner_deletes_what_is_older_than_its_days_a_batch_at_a_time(store):
    for i, age_s in enumerate([40 * DAY_S, 31 * DAY_S, 30 * DAY_S + 1, 30 * DAY_S, 29 * DAY_S, 0]):
        put_at(store, "p", i, NOW - age_s)
    store.send("p", health(1, 99))  # the latest row, received now
    t = [NOW]
    pruner = health_store.Pruner(days=30, batch=2, every_s=60, clock=lambda: t[0])
    assert pruner.step(store.storage) == 2  # a full batch: the next one is due at once
    assert pruner.step(store.storage) == 1
    assert pruner.step(store.storage) == 0  # not due for every_s
    assert kept(store) == [("p", 3), ("p", 4), ("p", 5), ("p", 99)]  # 30 days to the ms is kept
    t[0] += 59
    put_at(store, "p", 6, NOW - 50 * DAY_S)
    assert pruner.step(store.storage) == 0  # still not due
    t[0] += 1
    assert pruner.step(store.storage) == 2  # the late old row and the one now 30 days + 60 s old
    assert kept(store) == [("p", 4), ("p", 5), ("p", 99)] and pruner.deleted == 5
    assert store.latest("p")[:2] == (1, 99)  # pile_health is the latest per pile: never pruned


def test_no_retention_keeps_every_row(store):
    put_at(store, "p", 1, 0)
    pruner = health_store.Pruner(days=0, clock=lambda: NOW)
    assert pruner.step(store.storage) == 0 and kept(store) == [("p", 1)]


rows_aged = st.lists(st.tuples(st.sampled_from(["p-a", "p-b", "p-c"]), st.integers(0, 60 * DAY_S)),
                     max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_aged, days=st.integers(1, 45), batch=st.integers(1, 8))
def test_pruning_until_done_leaves_exactly_the_rows_within_the_retention(store, rows, days, batch):
    """Whatever the rows' ages, the days and the batch: no step deletes more than a batch, and the
    steps due at once leave exactly the rows received within `days`."""
    store.storage.run("DELETE FROM health_history")
    for uptime_s, (pile_id, age_s) in enumerate(rows):
        put_at(store, pile_id, uptime_s, NOW - age_s)
    pruner = health_store.Pruner(days=days, batch=batch, clock=lambda: NOW)
    steps = [pruner.step(store.storage)]
    while steps[-1] == batch:
        steps.append(pruner.step(store.storage))
    assert max(steps) <= batch
    assert kept(store) == sorted((p, u) for u, (p, age) in enumerate(rows) if age <= days * DAY_S)
    assert pruner.step(store.storage) == 0  # the next is every_s away


def test_pruning_finds_the_old_rows_through_the_index_not_a_scan(sqlite_url, consumer_db):
    """At 5.8 million rows a day a prune that scans health_history would hold the database."""
    s = Store(consumer_db(sqlite_url))
    sub = health_store.PRUNE_SQL.split(" IN (", 1)[1][:-1]
    plan = " ".join(str(row) for row in s.storage.query("EXPLAIN QUERY PLAN " + sub, ("x", 1)))
    assert "health_history_by_received" in plan, plan


def test_a_failing_prune_is_logged_and_storing_goes_on(caplog):
    class Down:
        def run(self, sql, params=()):
            raise consumer.StorageError("OperationalError: the database is restarting")

    pruner = health_store.Pruner(days=30, every_s=60, clock=lambda: NOW)
    consumer.prune(pruner, Down())
    assert "health_history not pruned" in caplog.text
    assert pruner.next_at == NOW + 60


@pytest.mark.parametrize("module", [consumer, ingest])
def test_health_days_on_the_command_line(module, capsys):
    base = ["--broker", "mqtt://127.0.0.1:1883"]
    assert module.parse_args(base).health_days == health_store.RETENTION_DAYS == 30
    assert module.parse_args(base + ["--health-days", "7"]).health_days == 7
    assert module.parse_args(base + ["--health-days", "0"]).health_days == 0
    for bad in ("-1", "seven"):
        with pytest.raises(SystemExit):
            module.parse_args(base + ["--health-days", bad])


def test_ingest_prunes_between_its_batches(db_url, consumer_db):
    """BatchConsumer's writer runs the pruner's steps while no batch comes (no broker needed)."""
    s = Store(consumer_db(db_url))
    for i in range(5):
        put_at(s, "p", i, NOW - (40 - i) * DAY_S)
    put_at(s, "p", 9, NOW)
    pruner = health_store.Pruner(days=30, batch=2, clock=lambda: NOW)
    c = ingest.BatchConsumer("mqtt://127.0.0.1:1", ingest.BatchStore(SCHEMAS, db_url), pruner=pruner)
    c.writer.start()
    try:
        procs.wait_for(lambda: pruner.deleted == 5, "the writer's prunes")
    finally:
        c.stopping.set()
        c.writer.join(10)
        c.store.close()
    assert kept(s) == [("p", 9)]


def test_the_consumer_prunes_as_it_runs(broker, sqlite_url, consumer_db, monkeypatch):
    """tools/consumer.py's loop: a store with rows older than --health-days loses them."""
    monkeypatch.setattr(consumer.signal, "signal", lambda *a: None)  # the test process's own stay
    s = Store(consumer_db(sqlite_url))
    now = time.time()
    put_at(s, "p", 1, now - 8 * DAY_S)
    put_at(s, "p", 2, now - 6 * DAY_S)
    assert consumer.main(["--broker", broker.url(), "--db", sqlite_url, "--once-for", "1",
                          "--health-days", "7"]) == 0
    assert kept(s) == [("p", 2)]


def test_the_columns_and_the_parameters_line_up():
    assert len(health_store.params("p", health(), "{}", "t")) == len(health_store.COLUMNS)


def test_the_shipped_pile_acl_lets_a_pile_write_every_message_it_sends():
    """broker/piles.acl lacked `health`: mosquitto dropped every health message of a pile on the
    shipped configuration (`make sim SCENARIO=heal` showed none). Every schema's topic is in it."""
    import glob
    import os

    from pilehost import ROOT

    with open(os.path.join(ROOT, "broker", "piles.acl"), encoding="utf-8") as f:
        allowed = {line.split()[-1] for line in f if line.startswith("pattern write ")}
    for path in glob.glob(os.path.join(ROOT, "docs", "schemas", "*.schema.json")):
        with open(path, encoding="utf-8") as f:
            t = json.load(f)["x-topic"]
        assert t.replace("{pile_id}", "%u") in allowed, (path, t)
