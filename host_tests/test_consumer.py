"""The reference consumer (tools/consumer.py) against a real mosquitto on a loopback port, fed by
tools/fake_pile.py: one row per session whatever the replays, shared load, garbage, retained
status and last wills. PostgreSQL cases run when PILE_TEST_POSTGRES_URL is set."""
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pilehost import ROOT, consumer, fake_pile
from pilehost.cloud import schemas
from pilehost.fake_pile import FakePile, Publisher, connect_pile
from pilehost.procs import TIMEOUT, find_tool, wait_for

CONSUMER = os.path.join(ROOT, "tools", "consumer.py")
FAKE_PILE = os.path.join(ROOT, "tools", "fake_pile.py")
SCHEMAS = schemas()
MOSQUITTO_PASSWD = find_tool("mosquitto_passwd")


def uid(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def query(db_url, sql, params=()):
    storage = consumer.open_storage(db_url)
    try:
        return storage.query(sql, params)
    finally:
        storage.close()


@pytest.fixture
def run_consumer(broker):
    """Start in-process consumers (stopped at the end); `stop(c)` stops one early."""
    running = []

    def start(db_url, group=None, client_id=None, storage=None, url=None):
        storage = storage or consumer.open_storage(db_url)
        storage.setup()
        c = consumer.Consumer(url or broker.url(), consumer.Handler(SCHEMAS, storage), group=group,
                              client_id=client_id)
        c.storage = storage
        running.append(c)
        c.start()
        assert c.subscribed.wait(TIMEOUT), "the consumer did not subscribe"
        return c

    def stop(c):
        if c in running:
            running.remove(c)
            c.stop()
            c.storage.close()

    start.stop = stop
    yield start
    for c in list(running):
        stop(c)


@pytest.fixture
def publishers():
    made = []

    def make(publisher):
        made.append(publisher)
        return publisher

    yield make
    for p in made:
        p.close()


def count(c, key):
    return c.handler.stats.snapshot()[0].get(key, 0)


def pick(messages, suffix):
    return [m for m in messages if m.topic.endswith(suffix)]


def fleet_row(c, pile_id):
    rows = [r for r in c.handler.fleet.rows() if r["pile_id"] == pile_id]
    return rows[0] if rows else None


# --- without a broker -----------------------------------------------------------------------------

def test_fake_pile_speaks_the_contract():
    for pile in (FakePile("a-1", boot=3), FakePile("b.2_x", boot=1, clock_synced=False)):
        msgs = [pile.online(True), pile.status()]
        msgs += pile.normal_session(auth_source="remote", auth_id="04A2B7C91F6E80")
        msgs += pile.normal_session(stop_reason="rcd_trip")
        msgs += [pile.fault("welded"), pile.status(), pile.fault("welded", "cleared"),
                 pile.cmd_ack("c-1", "remote_stop", "rejected", "no session"), pile.online(False)]
        for m in msgs:
            pile_id, kind = SCHEMAS.route(m.topic)
            assert pile_id == pile.pile_id
            SCHEMAS.check(kind, m.payload)
            consumer.check_ids(pile_id, m.payload)
            assert (m.qos, m.retain) == (SCHEMAS.validators[kind][1].schema["x-qos"],
                                         SCHEMAS.validators[kind][1].schema["x-retain"])
    ended = pick(msgs, "/session/ended")[0].payload
    assert ended["session_id"] == "b.2_x-1-1" and ended["clock_synced"] is False
    assert ended["energy_wh"] == ended["meter_stop_wh"] - ended["meter_start_wh"] > 0


def test_same_id_other_content_is_a_conflict_kept_aside(db_url):
    storage = consumer.open_storage(db_url)
    storage.setup()
    h = consumer.Handler(SCHEMAS, storage)
    try:
        ended = pick(FakePile("pile-7", boot=3).normal_session(), "/session/ended")[0]
        payload = ended.payload
        assert h.handle(ended.topic, fake_pile.encode(payload)) == "new"
        assert h.handle(ended.topic, fake_pile.encode(payload)) == "duplicate"
        reordered = json.dumps(dict(reversed(list(payload.items()))), indent=2).encode()
        assert h.handle(ended.topic, reordered) == "duplicate"  # same record, other spelling
        other = dict(payload, energy_wh=payload["energy_wh"] + 1)  # a boot counter that went back
        assert h.handle(ended.topic, fake_pile.encode(other)) == "conflict"
        assert storage.query("SELECT energy_wh FROM sessions") == [(payload["energy_wh"],)]
        assert storage.query("SELECT reason FROM rejected") == [("conflict",)]
        assert h.handle("evse/v1/pile-7/cmd", b"not ours") == "ignored"
    finally:
        storage.close()


# --- with mosquitto -------------------------------------------------------------------------------

def test_normal_session_arrives_once(broker, run_consumer, publishers, db_url):
    c = run_consumer(db_url)
    pile = FakePile(uid("normal"), boot=17)
    pub = publishers(connect_pile(broker.url(), pile))
    msgs = pile.normal_session(auth_source="remote", auth_id="04A2B7C91F6E80")
    msgs += [pile.fault("rcd_trip"), pile.fault("rcd_trip", "cleared"), pile.cmd_ack("c-1", "remote_stop")]
    pub.send(msgs)
    wait_for(lambda: count(c, "session_ended_new") == 1 and count(c, "fault_new") == 2
             and count(c, "cmd_ack_stored") == 1, "the session, two faults and an ack")

    ended = pick(msgs, "/session/ended")[0].payload
    cols = ", ".join(consumer.SESSION_ENDED_COLUMNS)
    rows = query(db_url, "SELECT %s FROM sessions" % cols)
    assert len(rows) == 1
    stored = dict(zip(consumer.SESSION_ENDED_COLUMNS, rows[0], strict=True))
    assert stored == {k: ended[k] for k in consumer.SESSION_ENDED_COLUMNS}
    assert stored["session_id"] == "%s-17-1" % pile.pile_id
    assert query(db_url, "SELECT session_id, auth_id FROM session_starts") == [
        (stored["session_id"], "04A2B7C91F6E80")]
    assert sorted(query(db_url, "SELECT event_id, action FROM faults")) == [
        ("%s-17-f1" % pile.pile_id, "raised"), ("%s-17-f2" % pile.pile_id, "cleared")]
    pile_row = query(db_url, "SELECT online, state, pilot, boot FROM piles WHERE pile_id = ?",
                     (pile.pile_id,))
    assert [(bool(o), s, p, b) for o, s, p, b in pile_row] == [(True, "idle", "A", 17)]
    assert count(c, "rejected") == 0 and c.failure is None


def test_replays_are_stored_once_even_across_a_restart(broker, run_consumer, publishers, sqlite_url):
    client_id = uid("consumer")  # a persistent session: the broker keeps what comes while it is away
    c = run_consumer(sqlite_url, client_id=client_id)
    pile = FakePile(uid("replay"))
    pub = publishers(Publisher(broker.url(), pile.pile_id))
    first = pile.normal_session()
    ended = pick(first, "/session/ended")[0]
    pub.send(first + [ended] * 4)  # published 5 times, as after lost PUBACKs
    wait_for(lambda: count(c, "session_ended_new") + count(c, "session_ended_duplicate") == 5, "5 copies")
    assert (count(c, "session_ended_new"), count(c, "session_ended_duplicate")) == (1, 4)
    run_consumer.stop(c)

    second = pile.normal_session()  # while the consumer is stopped: a replay and a new session
    pub.send([ended] + second)
    c = run_consumer(sqlite_url, client_id=client_id)
    wait_for(lambda: count(c, "session_ended_new") + count(c, "session_ended_duplicate") == 2,
             "the queued messages after the restart")
    assert (count(c, "session_ended_new"), count(c, "session_ended_duplicate")) == (1, 1)
    assert sorted(r[0] for r in query(sqlite_url, "SELECT session_id FROM sessions")) == [
        "%s-1-1" % pile.pile_id, "%s-1-2" % pile.pile_id]


def test_storage_failure_leaves_the_message_for_redelivery(broker, run_consumer, publishers, sqlite_url):
    class BrokenDisk(consumer.SqliteStorage):
        def insert_once(self, table, key, row):
            raise consumer.StorageError("disk I/O error (test)")

    client_id = uid("consumer")
    c = run_consumer(sqlite_url, client_id=client_id, storage=BrokenDisk(sqlite_url[len("sqlite:///"):]))
    pile = FakePile(uid("disk"))
    publishers(Publisher(broker.url(), pile.pile_id)).send(pile.normal_session())
    wait_for(lambda: c.failure is not None, "the consumer to give up")
    assert c.exit_code == 4 and "disk I/O error" in c.failure
    run_consumer.stop(c)

    c = run_consumer(sqlite_url, client_id=client_id)  # the same session: unacknowledged, redelivered
    wait_for(lambda: count(c, "session_started_new") == 1 and count(c, "session_ended_new") == 1,
             "the redelivered session")
    assert len(query(sqlite_url, "SELECT session_id FROM sessions")) == 1


def test_a_bug_keeps_the_message_aside_and_goes_on(broker, run_consumer, publishers, sqlite_url, monkeypatch):
    original = consumer.Handler._store

    def buggy(self, pile_id, kind, obj, received_at):
        if kind == "session_started":
            raise KeyError("bug (test)")
        return original(self, pile_id, kind, obj, received_at)

    monkeypatch.setattr(consumer.Handler, "_store", buggy)
    c = run_consumer(sqlite_url)
    pile = FakePile(uid("bug"))
    publishers(Publisher(broker.url(), pile.pile_id)).send(pile.normal_session())
    wait_for(lambda: count(c, "session_ended_new") == 1, "the session after the bug")
    assert c.failure is None
    assert query(sqlite_url, "SELECT topic, reason FROM rejected") == [
        ("evse/v1/%s/session/started" % pile.pile_id, "internal_error")]


def test_group_shares_the_load_and_stores_each_session_once(broker, run_consumer, publishers, db_url):
    group = uid("billing")
    a, b = run_consumer(db_url, group=group), run_consumer(db_url, group=group)
    piles = [FakePile(uid("fleet%d" % i)) for i in range(4)]
    pub = publishers(Publisher(broker.url(), uid("fleet-publisher")))
    msgs, ended = [], []
    for _ in range(10):
        for pile in piles:
            session = pile.normal_session(duration_s=600)  # 1 meter value each
            msgs += session
            ended += pick(session, "/session/ended")
    assert len(ended) == 40
    pub.send(msgs)
    pub.send(ended)  # every record once more, as after reconnects

    def handled(c):
        return count(c, "session_ended_new") + count(c, "session_ended_duplicate")

    wait_for(lambda: handled(a) + handled(b) == 80, "80 session/ended deliveries")
    assert count(a, "session_ended_new") + count(b, "session_ended_new") == 40
    assert handled(a) > 0 and handled(b) > 0, "both instances take a share"
    stored = query(db_url, "SELECT session_id FROM sessions")
    assert sorted(r[0] for r in stored) == sorted(m.payload["session_id"] for m in ended)

    # status and meter reach every instance once, through its own subscription; the copy that also
    # came through the shared one is skipped (statuses retained by earlier tests come on top)
    wait_for(lambda: count(a, "meter_stored") == count(b, "meter_stored") == 40
             and count(a, "status_stored") == count(b, "status_stored") >= 80, "every instance's live view")
    assert count(a, "shared_copy_skipped") + count(b, "shared_copy_skipped") >= 120
    for c in (a, b):
        for pile in piles:
            assert fleet_row(c, pile.pile_id)["state"] == "idle"


def test_garbage_is_counted_and_never_crashes(broker, run_consumer, publishers, sqlite_url, caplog):
    c = run_consumer(sqlite_url)
    pile = FakePile(uid("garbage"))
    pub = publishers(Publisher(broker.url(), pile.pile_id))
    bad = fake_pile.garbage(pile)
    pub.send([m for m, _ in bad])
    pub.send(pile.normal_session())
    wait_for(lambda: count(c, "session_ended_new") == 1, "the good session after the garbage")

    assert c.handler.stats.snapshot()[1] == collections.Counter(reason for _, reason in bad)
    assert c.failure is None and c.client.is_connected()
    rows = query(sqlite_url, "SELECT reason, size, length(payload) FROM rejected")
    assert len(rows) == len(bad)
    assert max(kept for _, _, kept in rows) <= consumer.KEPT_REJECTED
    assert max(size for _, size, _ in rows) > 100_000
    lines = [r.getMessage() for r in caplog.records if r.name == "consumer"]
    assert any("too_large" in line for line in lines)
    assert all(len(line) < 400 and "xxxxxxxx" not in line for line in lines), "a payload was logged"


@pytest.mark.parametrize("group", [None, "monitor"])
def test_retained_status_shows_in_the_table(broker, run_consumer, publishers, sqlite_url, group):
    pile = FakePile(uid("retained"), boot=18)
    pub = publishers(connect_pile(broker.url(), pile))  # online + status, retained
    pub.send([pile.fault("welded")])
    pile.state, pile.pilot = "fault", "F"
    pub.send([pile.status()])

    c = run_consumer(sqlite_url, group=group and uid(group))  # starts after: only the retained ones
    # Retained messages of two topics come in either order (a shared subscription, too).
    wait_for(lambda: (fleet_row(c, pile.pile_id) or {}).get("state") == "fault"
             and fleet_row(c, pile.pile_id).get("online") is True, "the retained status and online")
    row = fleet_row(c, pile.pile_id)
    assert consumer.table_cells(row, row["last_seen"] + 5) == [
        pile.pile_id, "yes", "fault", "F", "0.0", "0", "0", "welded", "5s"]
    table = consumer.render_table(c.handler.fleet.rows())
    assert pile.pile_id in table.split("\n", 1)[1] and table.startswith("pile")
    stored = query(sqlite_url, "SELECT state, faults, online FROM piles WHERE pile_id = ?", (pile.pile_id,))
    assert stored == [("fault", '["welded"]', 1)]


def test_last_will_marks_a_dead_pile_offline(broker, run_consumer, sqlite_url):
    c = run_consumer(sqlite_url)
    pile_id = uid("lwt")
    proc = subprocess.Popen([sys.executable, FAKE_PILE, "--broker", broker.url(), "--pile", pile_id,
                             "--scenario", "live", "--meter-interval", "0.2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (fleet_row(c, pile_id) or {}).get("power_w"), "the live pile charging")
        assert fleet_row(c, pile_id)["online"] is True
        proc.kill()  # a power cut: no DISCONNECT, the broker sends the last will
        proc.wait(TIMEOUT)
        wait_for(lambda: fleet_row(c, pile_id)["online"] is False, "the last will")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stderr.close()
    assert consumer.table_cells(fleet_row(c, pile_id), time.time())[1] == "NO"
    assert query(sqlite_url, "SELECT online FROM piles WHERE pile_id = ?", (pile_id,)) == [(0,)]


def test_command_line_with_a_password(tmp_path, sqlite_url, new_broker):
    if MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto_passwd is not installed (package mosquitto)")
    password_file = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(password_file), "evse", "s3cr:t"], check=True,
                   capture_output=True, timeout=TIMEOUT)
    b = new_broker(tmp_path, password_file=password_file)
    proc = None
    try:
        wrong = subprocess.run([sys.executable, CONSUMER, "--broker", b.url("evse", "nope"),
                                "--db", sqlite_url, "--once-for", "10"],
                               capture_output=True, text=True, timeout=TIMEOUT)
        assert wrong.returncode == 3, wrong.stderr
        assert "refused the connection" in wrong.stderr and "nope" not in wrong.stderr

        proc = subprocess.Popen([sys.executable, CONSUMER, "--broker", b.url("evse", "s3cr:t"),
                                 "--db", sqlite_url, "--monitor", "--once-for", "30", "-v"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err = []
        reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
        reader.start()
        wait_for(lambda: any("subscribed" in line for line in err), "the consumer to subscribe")
        pile = FakePile(uid("auth"))
        pub = connect_pile(b.url("evse", "s3cr:t"), pile)
        pub.send(pile.normal_session())
        pub.close()
        wait_for(lambda: query(sqlite_url, "SELECT count(*) FROM sessions") == [(1,)], "the stored session")
        proc.send_signal(signal.SIGTERM)
        out = proc.stdout.read()
        assert proc.wait(TIMEOUT) == 0
        reader.join(TIMEOUT)
        assert pile.pile_id in out  # --monitor without a terminal: the table once, at the end
        assert "sessions 1 new / 0 duplicate" in "".join(err)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        b.stop()
