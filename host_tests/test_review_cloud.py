"""Review of issue 14's cloud side (ingest, ops queries), as an adversary: what the batch consumer
stores for the operations page, and the page's filters at their edges. PostgreSQL cases run when
PILE_TEST_POSTGRES_URL is set."""
import time

import pytest

from pilehost import consumer, ingest
from pilehost.cloud import schemas
from pilehost.fake_pile import FakePile, encode
from pilehost.ops_queries import BadQuery, OpsQueries, open_reader

SCHEMAS = schemas()


def items(messages):
    return [ingest.Item(m.topic, encode(m.payload), i + 1, m.qos, 1, consumer.utc_now(), time.time())
            for i, m in enumerate(messages)]


def test_the_batch_consumer_keeps_the_power_curve_as_the_reference_does(db_url):
    """The operations page draws a session's power curve from meter_samples (docs/ops-page.md);
    at fleet scale the store is written by ingest, so ingest must keep them as consumer.Handler
    does: one row per (session_id, ts), a replay kept once."""
    pile = FakePile("curve-1", boot=3)
    messages = pile.normal_session(duration_s=1800, meter_interval_s=300)
    meters = [m for m in messages if m.topic.endswith("/meter")]
    assert meters, "the fake pile's session sends meter values"
    store = ingest.BatchStore(SCHEMAS, db_url)
    try:
        store.write(items(messages + meters))  # every meter value twice in one batch
        store.write(items(meters))  # and again in the next
        got = store.storage.query("SELECT session_id, ts, power_w FROM meter_samples ORDER BY ts")
        want = sorted({(m.payload["session_id"], m.payload["ts"]) for m in meters})
        assert [(r[0], r[1]) for r in got] == want
    finally:
        store.close()


def over_an_empty_store(url):
    """OpsQueries on a store the consumer has set up at `url`, nothing in it (a fixture's body)."""
    storage = consumer.open_storage(url)
    storage.setup()
    storage.close()
    reader = open_reader(url)
    yield OpsQueries(reader)
    reader.close()


@pytest.fixture
def queries(sqlite_url):
    yield from over_an_empty_store(sqlite_url)


@pytest.mark.parametrize("until", ["9999-12-31"])
def test_the_last_day_of_the_calendar_is_a_bad_query_not_a_crash(queries, until):
    """`until` is inclusive: the day after 9999-12-31 does not exist; the page must answer 400
    (BadQuery), not an OverflowError (500)."""
    try:
        queries.sessions(until=until)
    except BadQuery:
        pass


@pytest.mark.parametrize("offset", [str(2 ** 63), "9" * 30])
def test_a_huge_offset_is_a_bad_query_or_an_empty_page(queries, offset):
    """An offset beyond any database's integer: a BadQuery or an empty page, never a driver error
    taken for the store being down (StoreUnavailable, 503, the connection dropped)."""
    try:
        answer = queries.sessions(offset=offset)
    except BadQuery:
        return
    assert answer["rows"] == []


# -- the column migration (consumer.Storage.migrate) --------------------------------------------------

OLD_SESSIONS = consumer.TABLES[0].replace("meter_restarts BIGINT NOT NULL, ", "")


def test_a_migration_cut_between_add_column_and_its_fill_is_finished_on_the_next_start(tmp_path):
    """SQLite: the consumer is killed after ALTER TABLE ADD COLUMN and before the UPDATE that
    fills the old rows from their payload. The next start sees the column and must not leave the
    old rows at the default (0 restarts where the record says 2): the migration is one transaction."""
    url = "sqlite:///" + str(tmp_path / "old.db")
    old = consumer.open_storage(url)
    payload = '{"meter_restarts":2,"v":1}'
    old.run(OLD_SESSIONS)
    old.run("INSERT INTO sessions (session_id, pile_id, connector, auth_source, auth_id, start_time,"
            " stop_time, clock_synced, meter_start_wh, meter_stop_wh, energy_wh, duration_s, peak_power_w,"
            " stop_reason, meter_stop_stale, v, payload, received_at) VALUES ('p-1-1', 'p', 1,"
            " 'free_vend', NULL, 's', 's', 1, 1, 2, 1, 1, 1, 'remote', 0, 1, ?, 'r')", (payload,))
    old.close()
    storage = consumer.open_storage(url)
    real = storage.run

    def killed_at_update(sql, params=()):
        if sql.startswith("UPDATE"):
            raise consumer.StorageError("killed")  # the process dies here
        return real(sql, params)
    storage.run = killed_at_update
    with pytest.raises(consumer.StorageError):
        storage.setup()
    storage.conn.close()  # what dying does to its connection
    again = consumer.open_storage(url)
    again.setup()
    assert again.query("SELECT session_id, meter_restarts FROM sessions") == [("p-1-1", 2)]
    again.close()


# -- acknowledgements across a reconnect (ingest.BatchConsumer) ---------------------------------------

class AckRecorder:
    """Stands in for paho's client: the first PUBACK sent finds the connection replaced (the
    broker's new connection, whose packet ids start again and name other messages)."""

    def __init__(self, bc):
        self.bc = bc
        self.acked = []

    def ack(self, mid, qos):
        self.acked.append(mid)
        if len(self.acked) == 1:
            flags = type("Flags", (), {"session_present": False})()
            rc = type("Rc", (), {"is_failure": False})()
            self.bc._on_connect(self, None, flags, rc, None)

    def subscribe(self, *_args, **_kwargs):
        return (0, 1)


def test_no_acknowledgement_of_an_old_connection_goes_out_on_a_new_one(tmp_path):
    """Packet ids belong to a connection: once the consumer has reconnected, a PUBACK for a
    message of the old one may acknowledge another message of the new one, before it is stored.
    The batch's acknowledgements stop as soon as the connection changes."""
    bc = ingest.BatchConsumer("mqtt://127.0.0.1:1", store=None)
    bc.generation = 1
    bc.client = AckRecorder(bc)
    batch = [ingest.Item("evse/v1/p/status", b"{}", mid, 1, 1, "r", 0.0) for mid in (1, 2, 3)]
    bc._ack(batch)
    assert bc.client.acked == [1]


# -- memory: Receive Maximum bounds the count of messages held, not their size ------------------------

def test_the_broker_sends_no_message_larger_than_any_record(broker, tmp_path):
    """Receive Maximum holds at most `inflight` messages in this process, but a broker's packets
    may be hundreds of MB (mosquitto's default limit is 256 MB): one hostile or broken pile could
    fill the memory with 1000 of them. MQTT 5 Maximum Packet Size makes the broker drop what is
    beyond any record (consumer.MAX_PAYLOAD) before it is sent."""
    from pilehost.fake_pile import Message, Publisher
    from pilehost.procs import wait_for

    store = ingest.BatchStore(SCHEMAS, "sqlite:///" + str(tmp_path / "t.db"))
    c = ingest.BatchConsumer(broker.url(), store, group="big", batch=10, inflight=20)
    c.start()
    try:
        wait_for(c.subscribed.is_set, "the subscription")
        pile = FakePile("big-1", boot=1)
        huge = Message("evse/v1/big-1/session/ended", b"x" * (4 * consumer.MAX_PAYLOAD), 1, False)
        publisher = Publisher(broker.url(), "big-pub")
        publisher.send([huge, pile.status()])
        publisher.close()
        wait_for(lambda: store.storage.query("SELECT count(*) FROM piles")[0][0] == 1, "the status stored")
        assert store.storage.query("SELECT reason FROM rejected") == []
    finally:
        c.stop()


# -- the page's text filters: a character no pile id holds ----------------------------------------------

@pytest.fixture
def any_queries(db_url):
    yield from over_an_empty_store(db_url)


@pytest.mark.parametrize("text", ["a\x00b", "\x00"])
def test_a_nul_in_a_filter_is_an_answer_not_the_store_down(any_queries, text):
    """?q=%00 or ?id=%00: PostgreSQL's text cannot hold NUL and psycopg refuses the parameter;
    that must not read as "the store cannot be read" (503, the connection dropped): no pile
    matches, or a BadQuery (400)."""
    for ask in (lambda: any_queries.fleet(search=text)["piles"], lambda: any_queries.pile(text),
                lambda: any_queries.sessions(pile=text)["rows"]):
        try:
            assert not ask()
        except BadQuery:
            pass
