"""The batch consumer (pilehost/ingest.py): whatever mix of replays, duplicates inside one batch,
conflicts and garbage, and however the messages are cut into batches, every record is stored
once with its first payload, a conflict is kept in `rejected`, and a batch the database refuses
or loses is not half stored. PostgreSQL cases run when PILE_TEST_POSTGRES_URL is set."""
import queue
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilehost import consumer, ingest
from pilehost.cloud import schemas
from pilehost.fake_pile import FakePile, Publisher, encode, garbage
from pilehost.procs import wait_for

SCHEMAS = schemas()


def items(messages):
    return [ingest.Item(m.topic, encode(m.payload), i + 1, m.qos, 1, consumer.utc_now(), time.time())
            for i, m in enumerate(messages)]


def fleet_messages(piles=3, sessions=2):
    out = []
    for n in range(piles):
        pile = FakePile("pile-%d" % n, boot=n + 1)
        out += [pile.online(True), pile.status()]
        for _ in range(sessions):
            out += pile.normal_session(duration_s=900)
        out.append(pile.fault("rcd_trip"))
    return out


def rows(store, sql):
    return store.storage.query(sql)


MESSAGES = fleet_messages()
RECORDS = [m for m in MESSAGES if m.topic.endswith(("/session/ended", "/session/started", "/fault"))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(len(MESSAGES))),
       replays=st.lists(st.integers(0, len(RECORDS) - 1), max_size=30),
       cuts=st.lists(st.integers(1, 40), min_size=1, max_size=12))
def test_any_batching_of_replays_stores_each_record_once(tmp_path_factory, order, replays, cuts):
    url = "sqlite:///" + str(tmp_path_factory.mktemp("ingest") / "t.db")
    store = ingest.BatchStore(SCHEMAS, url)
    stream = items([MESSAGES[i] for i in order] + [RECORDS[i] for i in replays])
    at = 0
    for cut in cuts * 100:
        if at >= len(stream):
            break
        store.write(stream[at:at + cut])
        at += cut
    ended = [m for m in MESSAGES if m.topic.endswith("/session/ended")]
    stored = dict(rows(store, "SELECT session_id, payload FROM sessions"))
    assert stored == {m.payload["session_id"]: consumer.canonical(m.payload) for m in ended}
    assert len(rows(store, "SELECT * FROM session_starts")) == len(ended)
    assert len(rows(store, "SELECT * FROM faults")) == 3
    assert rows(store, "SELECT count(*) FROM rejected")[0][0] == 0
    counts = store.stats.snapshot()[0]
    assert counts["session_ended_new"] == len(ended)
    assert counts["received"] == len(stream)
    store.close()


def test_conflicts_and_garbage_in_one_batch(db_url):
    store = ingest.BatchStore(SCHEMAS, db_url)
    pile = FakePile("pile-9")
    session = pile.normal_session()
    ended = session[-2]
    other = ended._replace(payload=dict(ended.payload, energy_wh=ended.payload["energy_wh"] + 1))
    bad = [m for m, _ in garbage(FakePile("pile-9"))]
    outcomes = store.write(items(session + [other, ended] + bad))
    kinds = sorted(o[1] for o in outcomes.values() if o[0] == "session_ended")
    assert kinds == ["conflict", "duplicate", "new"]
    assert rows(store, "SELECT energy_wh FROM sessions") == [(ended.payload["energy_wh"],)]
    reasons = [r[0] for r in rows(store, "SELECT reason FROM rejected")]
    assert reasons.count("conflict") == 1
    assert len(reasons) == 1 + len(bad)
    # the conflicting copy in a later batch: same answer
    outcomes = store.write(items([other]))
    assert [o[1] for o in outcomes.values()] == ["conflict"]
    store.close()


def test_a_failing_database_commits_nothing_of_the_batch(tmp_path):
    url = "sqlite:///" + str(tmp_path / "t.db")
    store = ingest.BatchStore(SCHEMAS, url)
    batch = items(fleet_messages(piles=2, sessions=1))
    real = store._insert_once

    def fail_after_first_table(cur, kind, *args):
        real(cur, kind, *args)
        raise consumer.sqlite3.OperationalError("disk I/O error")

    store._insert_once = fail_after_first_table
    with pytest.raises(consumer.StorageError):
        store.write(batch)
    assert rows(store, "SELECT count(*) FROM sessions")[0][0] == 0
    assert rows(store, "SELECT count(*) FROM session_starts")[0][0] == 0
    store._insert_once = real
    store.reopen()
    store.write(batch)
    assert rows(store, "SELECT count(*) FROM sessions")[0][0] == 2
    store.close()


def test_a_row_the_database_refuses_is_rejected_alone(db_url):
    """One message the database refuses (here a constraint of the operator's): the batch is rolled
    back and stored message by message, that one rejected, the others kept."""
    store = ingest.BatchStore(SCHEMAS, db_url)
    if store.postgres:
        store.storage.run("ALTER TABLE sessions ADD CONSTRAINT no_4242 CHECK (energy_wh <> 4242)")
    else:
        store.storage.run("CREATE TRIGGER no_4242 BEFORE INSERT ON sessions WHEN NEW.energy_wh = 4242 "
                          "BEGIN SELECT RAISE(ABORT, 'energy 4242 refused'); END")
    good = FakePile("pile-5").normal_session()
    refused = FakePile("pile-6").normal_session()
    refused[-2] = refused[-2]._replace(payload=dict(refused[-2].payload, energy_wh=4242))
    store.write(items(good + refused))
    assert [r[0] for r in rows(store, "SELECT session_id FROM sessions")] == ["pile-5-1-1"]
    assert len(rows(store, "SELECT * FROM session_starts")) == 2
    assert [r[0] for r in rows(store, "SELECT reason FROM rejected")] == ["storage_refused"]
    store.close()


def test_back_pressure_leaves_the_backlog_in_the_broker(broker, tmp_path):
    """A database that does not answer: the broker sends no more than Receive Maximum (the
    in-flight window) however much waits, even with room in the hand-over queue; once the
    database answers, everything is stored once and acknowledged."""
    store = ingest.BatchStore(SCHEMAS, "sqlite:///" + str(tmp_path / "t.db"))
    answer = threading.Event()
    real_write = store.write

    def stuck_write(batch):
        answer.wait()
        return real_write(batch)

    store.write = stuck_write
    name = uuid.uuid4().hex[:8]
    c = ingest.BatchConsumer(broker.url(), store, group="bp-" + name, client_id="bp-" + name, batch=10,
                             inflight=40)
    c.queue = queue.Queue(maxsize=10_000)  # room: only the broker's flow control can hold back
    delivered = []
    on_message = c._on_message

    def counting(client, userdata, msg):
        delivered.append(msg.topic)
        on_message(client, userdata, msg)

    c.client.on_message = counting
    c.start()
    try:
        wait_for(c.subscribed.is_set, "the subscription")
        records = []
        for n in range(30):
            pile = FakePile("bp%s-%d" % (name, n))
            records += [m for m in pile.normal_session() if m.qos == 1 and "/session/" in m.topic]
        publisher = Publisher(broker.url(), "bp-pub-" + name)
        publisher.send(records)  # the broker has them all (PUBACK)
        publisher.close()
        wait_for(lambda: len(delivered) >= 40, "the broker to fill the window")
        time.sleep(1.0)  # would it send more? (a wait, not a measurement)
        assert len(delivered) <= 40
        answer.set()
        wait_for(lambda: rows(store, "SELECT count(*) FROM sessions")[0][0] == 30, "every session stored")
        wait_for(lambda: len(delivered) >= len(records), "the rest of the backlog")
    finally:
        answer.set()
        c.stop()
    counts = store.stats.snapshot()[0]
    assert counts["session_ended_new"] == 30 and counts["session_started_new"] == 30
