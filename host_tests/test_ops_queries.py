"""The operations page's queries (pilehost/ops_queries.py) against what the reference consumer
stored: SQLite, and PostgreSQL when PILE_TEST_POSTGRES_URL is set (conftest's db_url). The store
is filled through consumer.Handler, the consumer's own path, from tools/fake_pile.py's messages."""
import datetime
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilehost import fake_pile
from pilehost.ops_queries import BadQuery, OpsQueries, StoreUnavailable, open_reader

NOW = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.timezone.utc)


class Filled:
    """A store written by the consumer's Handler (db: conftest's ConsumerDb), and OpsQueries over a
    read-only connection."""

    def __init__(self, db):
        self.db = db
        self.storage = db.storage
        self.handler = db.handler
        self.reader = open_reader(db.url)
        self.q = OpsQueries(self.reader, clock=lambda: NOW)

    def send(self, messages):
        for m in messages:
            assert self.handler.handle(m.topic, fake_pile.encode(m.payload)) != "rejected", m.topic

    def close(self):
        self.reader.close()
        self.db.close()


@pytest.fixture
def filled(db_url, consumer_db):
    f = Filled(consumer_db(db_url))
    yield f
    f.close()


def pile(pile_id, **kw):
    return fake_pile.FakePile(pile_id, epoch=kw.pop("epoch", "2026-11-23T08:00:00Z"), **kw)


def charge(f, p, samples, power_w=7000):
    """A session left running on `p` with `samples` meter values."""
    f.send([p.start_session(), ])
    p.draw(power_w)
    f.send([p.status()])
    for i in range(samples):
        p.advance(60)
        p.power_w = power_w - 100 * i
        f.send([p.meter(), p.status()])


def fleet_ids(f, **kw):
    return [p["pile_id"] for p in f.q.fleet(**kw)["piles"]]


def session_ids(f, **kw):
    return [r["session_id"] for r in f.q.sessions(**kw)["rows"]]


def refused(query, *filters):
    """Each of `filters` is a BadQuery for `query` (the page answers 400)."""
    for bad in filters:
        with pytest.raises(BadQuery):
            query(**bad)


def test_fleet_counts_and_filters(filled):
    f = filled
    piles = [pile(i) for i in ("pile-a_1", "pile-ab1", "pile-b.2", "pile-c")]
    for p in piles:
        f.send([p.online(True), p.status()])
    charge(f, piles[0], 3)
    f.send([piles[1].fault("rcd_trip"), piles[1].status()])
    f.send([piles[2].online(False)])
    f.send(piles[3].normal_session(power_w=3600, duration_s=3600))

    d = f.q.fleet()
    assert [p["pile_id"] for p in d["piles"]] == sorted(p.pile_id for p in piles)
    s = d["summary"]
    assert (s["piles"], s["online"], s["offline"], s["charging"], s["faulted"]) == (4, 3, 1, 1, 1)
    assert s["power_w"] == piles[0].power_w
    assert (s["sessions_today"], s["energy_today_wh"]) == (1, 3600)
    row = {p["pile_id"]: p for p in d["piles"]}
    assert row["pile-ab1"]["faults"] == ["rcd_trip"] and row["pile-b.2"]["online"] is False
    assert row["pile-a_1"]["online"] is True
    assert row["pile-a_1"]["session_energy_wh"] == piles[0].session_energy_wh()

    # LIKE wildcards in the search are literal: '_' matches only '_', '%' only '%' (no id has one)
    assert fleet_ids(f, search="a_1") == ["pile-a_1"]
    assert fleet_ids(f, search="%") == [] and fleet_ids(f, search="\\") == []
    assert fleet_ids(f, state="offline") == ["pile-b.2"]
    assert fleet_ids(f, state="faulted") == ["pile-ab1"]
    assert fleet_ids(f, state="charging") == ["pile-a_1"]
    limited = f.q.fleet(limit="2")
    assert len(limited["piles"]) == 2 and limited["matching"] == 4
    refused(f.q.fleet, {"state": "exploded"}, {"limit": "x"}, {"limit": "0"})


def test_pile_running_session_has_its_power_curve_in_time_order(filled):
    f = filled
    p = pile("pile-0042")
    f.send([p.online(True), p.status()])
    f.send(p.normal_session(power_w=3600, duration_s=600, meter_interval_s=120))
    charge(f, p, 5)
    f.send([p.meter()])  # the same meter value again (a reconnect): one sample

    d = f.q.pile("pile-0042")
    s = d["session"]
    assert s["running"] is True and s["session_id"] == "pile-0042-1-2"
    assert s["energy_wh"] == p.session_energy_wh() and s["auth_source"] == "free_vend"
    ts = [c["ts"] for c in s["curve"]]
    assert ts == sorted(ts) and len(ts) == 5
    assert [c["power_w"] for c in s["curve"]] == [7000, 6900, 6800, 6700, 6600]
    assert s["curve"][-1]["session_energy_wh"] == p.session_energy_wh()
    assert [x["session_id"] for x in d["sessions"]] == ["pile-0042-1-1"]
    assert d["health"]["sessions"] == 1 and d["health"]["rejected"] == 0

    f.send([p.end_session("remote"), p.status()])
    s = f.q.pile("pile-0042")["session"]
    assert s["running"] is False and s["session_id"] == "pile-0042-1-2" and s["stop_reason"] == "remote"
    assert len(s["curve"]) == 5
    assert f.q.pile("never-seen") is None


def test_pile_faults_and_health(filled):
    f = filled
    p = pile("pile-7")
    f.send([p.online(True), p.fault("welded"), p.fault("welded", "cleared"), p.fault("rcd_trip"), p.status()])
    f.handler.handle("evse/v1/pile-7/status", b"{not json")  # counted against this pile's health
    f.handler.handle("evse/v1/pile-77/status", b"{not json")  # another pile's: not counted
    d = f.q.pile("pile-7")
    assert [(x["code"], x["action"]) for x in d["faults"]] == [
        ("rcd_trip", "raised"), ("welded", "cleared"), ("welded", "raised")]
    assert d["health"]["faults_raised"] == 2
    assert d["health"]["rejected"] == 1 and d["health"]["last_rejected"]["reason"] == "bad_json"
    assert d["pile"]["faults"] == ["rcd_trip"]
    assert d["session"] is None


def test_sessions_filters(filled):
    f = filled
    a = pile("pile-a", epoch="2026-11-20T10:00:00Z")
    b = pile("pile-b", epoch="2026-11-22T23:30:00Z")
    f.send(a.normal_session(duration_s=600, stop_reason="ev_disconnected"))
    f.send(a.normal_session(duration_s=600, auth_source="remote", auth_id="TAG-1", stop_reason="remote"))
    f.send(b.normal_session(duration_s=600, stop_reason="rcd_trip"))
    b.advance(3600)  # the next one starts on the 23rd
    f.send(b.normal_session(duration_s=86400, stop_reason="ev_disconnected"))

    assert session_ids(f) == ["pile-b-1-2", "pile-b-1-1", "pile-a-1-2", "pile-a-1-1"]  # newest start first
    assert session_ids(f, pile="pile-a") == ["pile-a-1-2", "pile-a-1-1"]
    assert session_ids(f, stop_reason="rcd_trip") == ["pile-b-1-1"]
    assert session_ids(f, auth_source="remote") == ["pile-a-1-2"]
    assert session_ids(f, since="2026-11-22", until="2026-11-22") == ["pile-b-1-1"]  # until: the whole day
    assert session_ids(f, since="2026-11-23") == ["pile-b-1-2"]
    assert session_ids(f, until="2026-11-20") == ["pile-a-1-2", "pile-a-1-1"]
    page = f.q.sessions(limit=1, offset=1)
    assert [r["session_id"] for r in page["rows"]] == ["pile-b-1-1"] and page["matching"] == 4
    assert f.q.sessions(pile="pile-a")["energy_wh"] == 2 * 2 * (7360 * 300 // 3600)  # 2 x 2 meter steps
    refused(f.q.sessions, {"since": "2026-13-01"}, {"since": "yesterday"}, {"until": "2026-02-30"},
            {"stop_reason": "x' OR '1'='1"}, {"auth_source": "card"}, {"offset": "-1"})


def test_the_reader_cannot_write(filled):
    f = filled
    p = pile("pile-ro")
    f.send([p.online(True), p.status()])
    for sql in ("INSERT INTO piles (pile_id, last_seen_at) VALUES ('x', 'y')", "DELETE FROM piles",
                "DROP TABLE piles", "CREATE TABLE evil (x TEXT)"):
        with pytest.raises(StoreUnavailable):
            f.reader.rows(sql)
    assert fleet_ids(f) == ["pile-ro"]  # the connection is back


def test_a_missing_sqlite_file_is_not_created(tmp_path):
    reader = open_reader("sqlite:///" + str(tmp_path / "nothing.db"))
    with pytest.raises(StoreUnavailable):
        OpsQueries(reader).fleet()
    assert not (tmp_path / "nothing.db").exists()


def test_a_store_without_meter_samples_shows_no_curve(sqlite_url, consumer_db):
    """A store written by a consumer older than pilehost/ops_store.py: the page still works."""
    f = Filled(consumer_db(sqlite_url))
    p = pile("pile-old")
    f.send([p.online(True), p.status()])
    charge(f, p, 2)
    f.storage.run("DROP TABLE meter_samples")
    assert f.q.pile("pile-old")["session"]["curve"] == []
    f.close()


DAYS = [datetime.date(2026, 11, 1) + datetime.timedelta(days=i) for i in range(10)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(starts=st.lists(st.tuples(st.sampled_from(DAYS), st.integers(0, 86399)), min_size=1, max_size=8),
       since=st.sampled_from(DAYS + [None]), until=st.sampled_from(DAYS + [None]))
def test_date_range_is_whole_days_inclusive(tmp_path_factory, consumer_db, starts, since, until):
    """Whatever the start times, `from`..`to` keeps exactly the sessions started on those days."""
    f = Filled(consumer_db("sqlite:///" + str(tmp_path_factory.mktemp("range") / "t.db")))
    try:
        expected = []
        for i, (day, second) in enumerate(starts):
            moment = datetime.datetime.combine(day, datetime.time(), datetime.timezone.utc)
            p = pile("pile-%d" % i, epoch=(moment + datetime.timedelta(seconds=second)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"))
            f.send(p.normal_session(duration_s=60)[:-1])
            if (since is None or day >= since) and (until is None or day <= until):
                expected.append("pile-%d-1-1" % i)
        got = f.q.sessions(since=since.isoformat() if since else "", until=until.isoformat() if until else "")
        assert sorted(r["session_id"] for r in got["rows"]) == sorted(expected)
        assert got["matching"] == len(expected)
    finally:
        f.close()


def test_answers_are_json(filled):
    f = filled
    p = pile("pile-j")
    f.send([p.online(True), p.status()])
    charge(f, p, 1)
    for answer in (f.q.fleet(), f.q.pile("pile-j"), f.q.sessions(), f.q.choices()):
        json.dumps(answer)


def test_counts_stop_at_the_cap(filled, monkeypatch):
    """A filter matching more than COUNT_CAP sessions says so instead of scanning them all."""
    from pilehost import ops_queries

    monkeypatch.setattr(ops_queries, "COUNT_CAP", 2)
    p = pile("pile-cap")
    for _ in range(3):
        filled.send(p.normal_session(duration_s=60))
    d = filled.q.sessions()
    assert (d["matching"], d["capped"], d["energy_wh"], len(d["rows"])) == (2, True, None, 3)
    d = filled.q.sessions(limit=1, offset=2)
    assert d["capped"] and [r["session_id"] for r in d["rows"]] == ["pile-cap-1-1"]
    monkeypatch.setattr(ops_queries, "COUNT_CAP", 3)
    d = filled.q.sessions()
    assert (d["matching"], d["capped"]) == (3, False)
    assert d["energy_wh"] == sum(r["energy_wh"] for r in d["rows"])
