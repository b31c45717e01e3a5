"""The piles' `health` messages stored (pilehost/health_store.py, docs/cloud.md): the latest per pile
in `pile_health`, every one once in `health_history`, by the consumer (one message at a time) and by
ingest (a batch), on SQLite and the real PostgreSQL (conftest's db_url); a store made before these
tables gets them; the operations page's query reads them back (pilehost/ops_queries.py)."""
import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilehost import consumer, health_store, ingest
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
    def __init__(self, url):
        self.url = url
        self.storage = consumer.open_storage(url)
        self.storage.setup()
        self.handler = consumer.Handler(SCHEMAS, self.storage)

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
        self.storage.close()


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


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


def test_ingest_stores_a_batch_of_health_messages_like_the_consumer(db_url):
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
    s = Store(db_url)
    try:
        assert s.latest("p-a")[:2] == (1, 180) and s.latest("p-b")[:2] == (3, 30)
        assert s.history("p-a") == [(1, 60), (1, 120), (1, 180)]
    finally:
        s.close()


uptimes = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 10 ** 6)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uptimes)
def test_ingest_and_the_consumer_agree_on_the_latest_whatever_the_order(tmp_path_factory, seq):
    """The same messages, one at a time or in one batch: the same latest row and history."""
    d = tmp_path_factory.mktemp("h")
    one = Store("sqlite:///%s" % (d / "one.db"))
    for boot, up in seq:
        one.send("p", health(boot, up))
    bs = ingest.BatchStore(SCHEMAS, "sqlite:///%s" % (d / "batch.db"))
    bs.write([ingest.Item(topic("p"), json.dumps(health(b, u)).encode(), i, 1, 0, "t%d" % i, 0.0)
              for i, (b, u) in enumerate(seq)])
    bs.close()
    batch = Store("sqlite:///%s" % (d / "batch.db"))
    try:
        assert batch.latest("p")[:2] == one.latest("p")[:2]
        assert batch.history("p") == one.history("p")
    finally:
        one.close()
        batch.close()


def test_a_store_made_before_the_health_tables_gets_them_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for sql in consumer.TABLES:
        if "pile_health" not in sql and "health_history" not in sql:
            conn.execute(sql)
    conn.execute("INSERT INTO piles (pile_id, last_seen_at) VALUES ('old-pile', '2026-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    s = Store("sqlite:///%s" % path)
    try:
        s.send("old-pile", health())
        assert s.latest("old-pile")[:2] == (1, 60)
        assert s.storage.query("SELECT pile_id FROM piles") == [("old-pile",)]
    finally:
        s.close()


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


def test_the_query_on_a_store_without_the_health_table_says_none(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for sql in consumer.TABLES:
        if "pile_health" not in sql and "health_history" not in sql:
            conn.execute(sql)
    conn.execute("INSERT INTO piles (pile_id, last_seen_at) VALUES ('old-pile', '2026-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    reader = open_reader("sqlite:///%s" % path)
    try:
        assert OpsQueries(reader).pile("old-pile")["reported"] is None
    finally:
        reader.close()


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
