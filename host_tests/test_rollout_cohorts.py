"""Rollout cohorts (pilehost/rollout.py, docs/ota.md "Rollout"): a seeded random sample spread
over the sites, health judged against a control group of piles not yet updated over the same
window, a record that repeats the rollout, and a withdrawal that stops it. On a behavioural
model of the fleet as the cloud sees it (FakeFleet: a pile asked to update boots once, connects
once and reports the release running); the same on real piles: test_ota_withdraw.py."""
import json
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilehost import rollout

SITES = ("Lyon/depot", "Lyon/gare", "Lille/port", "Nice/plage")


class FakeFleet:
    """FleetWatch's interface over piles in memory. update(pile) -> what the pile does when asked:
    "good" (one boot, one connection, release running), "crash" (rolled back), "reconnect" (good,
    but 3 more connections), "silent" (nothing). noise(pile): a pile not asked reconnects."""

    def __init__(self, ids, behaviour=None):
        self.piles = {p: {"boots": {1}, "connects": 1, "faults": set(), "acks": [],
                          "ota": {"release": 0, "version": "0.1.0", "state": "running", "target": None,
                                  "progress": None, "reason": None, "rolled_back": None}} for p in ids}
        self.behaviour = behaviour or {}
        self.sent = []
        self.lock = threading.Lock()

    def snapshot(self, pile_id):
        with self.lock:
            p = self.piles.setdefault(pile_id, {"boots": set(), "connects": 0, "faults": set(),
                                                "acks": [], "ota": None})
            return {"boots": set(p["boots"]), "connects": p["connects"], "faults": set(p["faults"]),
                    "ota": None if p["ota"] is None else dict(p["ota"]), "acks": list(p["acks"])}

    def send(self, pile_id, payload):
        body = json.loads(payload)
        release = json.loads(body["body"])["args"]["release"]
        with self.lock:
            self.sent.append(pile_id)
            p = self.piles[pile_id]
            how = self.behaviour.get(pile_id, "good")
            if how == "silent":
                return
            p["boots"].add(max(p["boots"]) + 1)
            p["connects"] += 1
            if how == "crash":
                p["boots"].add(max(p["boots"]) + 1)
                p["ota"]["rolled_back"] = {"release": release, "reason": "watchdog reset during the trial"}
                return
            p["ota"].update(release=release, state="running")
            if how == "reconnect":
                p["connects"] += 3

    def noise(self, pile_id, connects=3):
        with self.lock:
            self.piles[pile_id]["connects"] += connects


def _secrets(ids):
    return {p: b"k" * 32 for p in ids}


def _rollout(fleet, ids, percents, **kw):
    kw.setdefault("say", lambda text: None)
    return rollout.Rollout(fleet, _secrets(ids), 7, percents, wait_s=5, soak_s=0, poll_s=0.01, **kw)


# -- the cohorts --------------------------------------------------------------------------------------

piles_and_sites = st.dictionaries(st.from_regex(r"p-[a-z0-9]{1,6}", fullmatch=True), st.sampled_from(SITES),
                                  min_size=1, max_size=120)


@settings(max_examples=200, deadline=None)
@given(piles_and_sites, st.integers(0, 2 ** 32), st.lists(st.floats(0.5, 100), min_size=1, max_size=4))
def test_the_same_seed_gives_the_same_cohorts_and_they_cover_the_fleet_once(sites, seed, percents):
    percents = sorted(percents) + [100]
    order = rollout.plan(list(sites), seed, sites)
    again = rollout.plan(list(reversed(list(sites))), seed, dict(sites))  # listing order does not matter
    assert order == again
    cohorts = rollout.cohorts_of(order, percents)
    flat = [p for c in cohorts for p in c]
    assert sorted(flat) == sorted(sites) and len(set(flat)) == len(flat)
    assert all(cohorts)


def assert_in_proportion(sites, order, size):
    """Each site's piles among the first `size` of the order differ from its share of them by at
    most sigma = 1 - 1/(2m - 2) (m sites), less than one pile (rollout.plan); exact fractions."""
    m = len(set(sites.values()))
    sigma = Fraction(1) - Fraction(1, 2 * m - 2) if m > 1 else Fraction(0)
    first = order[:size]
    for site in set(sites.values()):
        share = Fraction(sum(1 for p in sites if sites[p] == site) * len(first), len(order))
        got = sum(1 for p in first if sites[p] == site)
        assert abs(got - share) <= sigma, (site, got, share)


@settings(max_examples=200, deadline=None)
@given(piles_and_sites, st.integers(0, 2 ** 32), st.integers(1, 120))
def test_every_first_cohort_holds_each_site_in_proportion_within_one_pile(sites, seed, size):
    assert_in_proportion(sites, rollout.plan(list(sites), seed, sites), size)


def test_found_a_small_site_drawn_early_no_longer_leaves_the_big_one_out():
    """Found by the test above on the old plan (each site's k-th of n piles at (k + u)/n, u drawn
    per site): Nice's one pile and one of Lyon/gare's two drew keys below Lille's first (u/9), so
    the first 2 of 15 piles held no Lille pile where Lille's share of them is 1.2."""
    sites = {"p-0": "Lyon/depot", "p-1": "Nice/plage", "p-2": "Lyon/gare", "p-3": "Lyon/depot",
             "p-4": "Lille/port", "p-5": "Lyon/gare", "p-6": "Lille/port", "p-7": "Lille/port",
             "p-8": "Lille/port", "p-9": "Lille/port", "p-a": "Lille/port", "p-b": "Lille/port",
             "p-c": "Lyon/depot", "p-00": "Lille/port", "p-d": "Lille/port"}
    for seed in range(200):
        order = rollout.plan(list(sites), seed, sites)
        for size in range(1, len(sites) + 1):
            assert_in_proportion(sites, order, size)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(0, 2 ** 32))
def test_sites_of_any_sizes_stay_in_proportion_at_every_length(sizes, seed):
    """Many sites of uneven sizes (the case where a per-site draw goes wrong), every prefix."""
    sites = {"p-%d-%d" % (i, k): "site %d" % i for i, n in enumerate(sizes) for k in range(n)}
    order = rollout.plan(list(sites), seed, sites)
    assert sorted(order) == sorted(sites)
    for size in range(1, len(order) + 1):
        assert_in_proportion(sites, order, size)


def test_a_small_first_cohort_is_spread_over_cities_not_the_first_ids():
    ids = ["pile-%04d" % i for i in range(400)]
    sites = {p: SITES[i // 100] for i, p in enumerate(ids)}  # sorted ids: one city after the other
    order = rollout.plan(ids, 42, sites)
    assert sorted({sites[p] for p in order[:4]}) == sorted(SITES)
    assert rollout.cohorts_of(sorted(ids), [1])[0] != rollout.cohorts_of(order, [1])[0]
    assert rollout.plan(ids, 43, sites)[:4] != order[:4]  # another seed, another sample


@settings(max_examples=100, deadline=None)
@given(piles_and_sites, st.integers(0, 2 ** 32), st.integers(0, 130), st.integers(1, 30))
def test_a_control_group_never_holds_an_updated_pile(sites, seed, done, size):
    order = rollout.plan(list(sites), seed, sites)
    updated = set(order[:done])
    control = rollout.control_of(order, updated, size)
    assert not set(control) & updated
    assert len(control) == min(size, len(order) - len(updated))


# -- health against the control -----------------------------------------------------------------------

def test_reconnects_seen_in_the_control_group_too_do_not_halt_the_rollout():
    """A broker outage over the whole fleet: the cohort reconnects, and so does the control."""
    ids = ["p%02d" % i for i in range(20)]
    fleet = FakeFleet(ids, {p: "reconnect" for p in ids})
    r = _rollout(fleet, ids, (10, 100), seed=1)
    control = rollout.control_of(r.order, set(r.cohorts[0]), rollout.CONTROL_MIN)
    real_send = fleet.send

    def send(pile_id, payload):
        real_send(pile_id, payload)
        for p in control:  # the same window: the control reconnects as often
            fleet.noise(p, 1)
    fleet.send = send
    assert not r.run()
    first = r.reports[0]
    assert first["control"] == control and len(control) == rollout.CONTROL_MIN
    assert ["reconnects", 2, 2, 10, 10, False] in first["health"]
    # the last cohort has no control left: compared with its own past, the reconnects halt it
    assert r.reports[1]["control"] == [] and r.halted.startswith("cohort 2 worse")


def test_a_cohort_that_reconnects_more_than_its_control_halts_the_rollout():
    ids = ["p%02d" % i for i in range(20)]
    fleet = FakeFleet(ids, {p: "reconnect" for p in ids})
    r = _rollout(fleet, ids, (10, 100), seed=1)
    assert not r.run()
    assert r.halted.startswith("cohort 1 worse") and "reconnects: 4 connections in 1 boot(s)" in r.halted
    assert set(fleet.sent) == set(r.cohorts[0])  # the second cohort never asked
    assert ["reconnects", 2, 2, 0, 10, True] in r.reports[0]["health"]


def test_the_margin_lets_a_cohort_be_that_much_worse_than_its_control():
    ids = ["p%02d" % i for i in range(40)]
    r0 = _rollout(FakeFleet(ids), ids, (10, 100), seed=5)
    bad = r0.cohorts[0][0]  # 1 of 4 piles of the first cohort reconnects: 25 points worse
    fleet = FakeFleet(ids, {bad: "reconnect"})
    assert not _rollout(fleet, ids, (10, 100), seed=5, margin=0.2).run()
    fleet = FakeFleet(ids, {bad: "reconnect"})
    r = _rollout(fleet, ids, (10, 100), seed=5, margin=0.3)
    assert r.run(), r.halted  # the first cohort passes with its reconnecting pile
    assert r.reports[0]["health"][2] == ["reconnects", 1, 4, 0, 10, False]


def test_hard_failures_halt_whatever_the_control_does():
    ids = ["p%02d" % i for i in range(10)]
    r0 = _rollout(FakeFleet(ids), ids, (20, 100), seed=9)
    crash = r0.cohorts[0][0]
    silent = r0.cohorts[0][1]
    fleet = FakeFleet(ids, {crash: "crash", silent: "silent"})
    r = _rollout(fleet, ids, (20, 100), seed=9)
    assert not r.run()
    assert r.outcome[crash].startswith("rolled back") and r.outcome[silent].startswith("no answer")


def test_the_record_keeps_the_seed_and_the_same_seed_repeats_the_rollout(tmp_path):
    ids = ["p%02d" % i for i in range(30)]
    sites = {p: SITES[i % 4] for i, p in enumerate(ids)}
    said = []
    r = _rollout(FakeFleet(ids), ids, (10, 50, 100), strata=sites, record=str(tmp_path / "r.json"),
                 say=said.append)
    assert r.run()
    assert "seed %d" % r.seed in said[0] and "over 4 sites" in said[0]
    rec = rollout.load_record(str(tmp_path / "r.json"))
    assert (rec["seed"], rec["state"], rec["release"]) == (r.seed, "complete", 7)
    again = _rollout(FakeFleet(ids), ids, (10, 50, 100), strata=sites, seed=rec["seed"])
    assert again.cohorts == rec["cohorts"] == r.cohorts
    assert len(rec["reports"]) == 3 and rec["reports"][0]["control"]


# -- withdrawing -------------------------------------------------------------------------------------

def test_a_withdrawal_through_the_record_stops_the_rollout_during_the_soak(tmp_path):
    """`release.py withdraw` in another process writes the marker; the rollout soaking its first
    cohort sends no further command and says so in its record."""
    ids = ["p%02d" % i for i in range(10)]
    fleet = FakeFleet(ids)
    path = str(tmp_path / "rollout-7.json")
    r = rollout.Rollout(fleet, _secrets(ids), 7, (20, 100), wait_s=5, soak_s=60, poll_s=0.01,
                        say=lambda text: None, record=path)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("ok", r.run()))
    t.start()
    end = time.time() + 10
    while len(r.outcome) < 2 and time.time() < end:
        time.sleep(0.01)
    rollout.mark_withdrawn(path, "bad reports from the field")
    t.join(10)
    assert box == {"ok": False}
    assert r.withdrawn == "bad reports from the field" and r.halted is None
    assert sorted(fleet.sent) == sorted(r.cohorts[0])
    rec = rollout.load_record(path)
    assert rec["state"] == "withdrawn" and rec["withdrawn"] == "bad reports from the field"
    # and it is not started again
    assert rollout.Rollout(fleet, _secrets(ids), 7, (20, 100), wait_s=1, soak_s=0, poll_s=0.01,
                           say=lambda text: None, record=path).run() is False
    assert sorted(fleet.sent) == sorted(r.cohorts[0])


def test_a_withdrawal_between_two_commands_of_a_cohort_sends_no_further_one():
    ids = ["p%02d" % i for i in range(10)]
    fleet = FakeFleet(ids)
    r = _rollout(fleet, ids, (50, 100), seed=3)
    real_send = fleet.send

    def send(pile_id, payload):
        real_send(pile_id, payload)
        if len(fleet.sent) == 2:
            r.withdraw("stop")
    fleet.send = send
    assert not r.run()
    assert len(fleet.sent) == 2 and r.updated == set(fleet.sent)


@pytest.mark.parametrize("ota, says", [
    ({"release": 7, "state": "running", "target": None}, "stays on it"),
    ({"release": 7, "state": "trial", "target": None}, "rolls back by itself"),
    ({"release": 6, "state": "staged", "target": 7}, "switches to it when no session is open"),
    ({"release": 6, "state": "downloading", "target": 7}, "the download fails"),
    ({"release": 6, "state": "running", "target": None}, "runs release 6 (running)"),
])
def test_where_piles_are_says_what_happens_to_each(ota, says):
    fleet = FakeFleet(["a"])
    fleet.piles["a"]["ota"].update(ota)
    (pile, text), = rollout.where_piles_are(fleet, 7, ["a"])
    assert pile == "a" and says in text
