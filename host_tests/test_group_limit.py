"""The reference group-limit controller (pilehost/group_limit.py, tools/group_limit.py): the sum
of what the piles may offer never exceeds the site limit, whatever state they report, commands
lost or late, the controller gone; shown against simulated piles over a real mosquitto with
signed set_current_limit commands that carry a time to live."""
import json
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilehost import ROOT
from pilehost.group_limit import Controller, Pile, SteeredPile, check_site, plan, targets
from pilehost.procs import TIMEOUT


# -- the decision, as a property ----------------------------------------------------------------------

@st.composite
def group(draw):
    n = draw(st.integers(1, 8))
    piles = []
    for i in range(n):
        max_ma = draw(st.integers(6, 80)) * 1000
        p = Pile("p%d" % i, max_ma, draw(st.integers(6, 16)) * 1000)
        if draw(st.booleans()):  # it has reported
            limit = draw(st.one_of(st.none(), st.integers(0, 80000)))
            held = max_ma if limit is None else min(limit, max_ma)
            offer = draw(st.sampled_from([0, held, draw(st.integers(0, 80000))]))
            p.update({"limit_a": None if limit is None else limit / 1000, "offer_a": offer / 1000,
                      "state": draw(st.sampled_from(["idle", "charging", "suspended_ev", "suspended_evse",
                                                     "finishing", "fault"]))})
        piles.append(p)
    site = draw(st.integers(sum(p.fallback_ma for p in piles) // 1000, 250)) * 1000
    return site, piles


def exposure_after(exposures, commands):
    """What each pile may offer once the commands are out but before any status confirms them:
    a decrease may not have arrived, an increase may be in force at once."""
    sent = {p.pile_id: ma for p, ma in commands}
    return sum(max(e, sent.get(pid, 0)) for pid, e in exposures.items())


@settings(max_examples=500, deadline=None)
@given(group())
def test_a_round_never_makes_the_sum_worse(g):
    site, piles = g
    exposures = {p.pile_id: p.exposure_ma() for p in piles}
    held = {p.pile_id: p.held_ma() for p in piles}
    before = sum(exposures.values())
    commands = plan(site, piles)
    after = exposure_after(exposures, commands)
    assert after <= max(before, site)
    raised = [p for p, ma in commands if ma > held[p.pile_id]]
    if raised:
        assert after <= site  # an increase only ever goes out within the site limit
    for _p, ma in commands:
        assert 0 <= ma <= 80000 and ma % 100 == 0


@settings(max_examples=300, deadline=None)
@given(group())
def test_targets_share_the_site(g):
    site, piles = g
    t = targets(site, piles)
    assert sum(max(t[p.pile_id], p.fallback_ma) for p in piles) <= site
    for p in piles:
        assert min(p.fallback_ma, p.max_ma) <= t[p.pile_id] <= max(p.max_ma, p.fallback_ma)
        if not p.wants:
            assert t[p.pile_id] == min(p.fallback_ma, p.max_ma)


@settings(max_examples=200, deadline=None)
@given(group(), st.lists(st.tuples(st.integers(0, 7), st.booleans(), st.booleans()), max_size=30))
def test_rounds_with_lagging_piles_stay_within_the_site(g, events):
    """Many rounds; each pile applies a command only sometimes (lost, late), its offer follows
    its limit only sometimes (the 5 s rule), a limit runs out to the fallback at any moment.
    Once the sum is within the site limit, it stays there."""
    site, piles = g
    for p in piles:  # start within the site: every pile at its fallback, reported
        p.update({"limit_a": p.fallback_ma / 1000, "offer_a": 0, "state": "charging"})
    held = {p.pile_id: p.fallback_ma for p in piles}
    offer = {p.pile_id: 0 for p in piles}
    for who, arrives, expires in events:
        for q, ma in plan(site, piles):
            if arrives:
                held[q.pile_id] = ma
        p = piles[who % len(piles)]
        if expires:
            held[p.pile_id] = p.fallback_ma
        offer[p.pile_id] = min(held[p.pile_id], p.max_ma) if held[p.pile_id] >= 6000 else 0
        assert sum(max(q.fallback_ma, min(held[q.pile_id], q.max_ma), offer[q.pile_id])
                   for q in piles) <= site
        p.update({"limit_a": held[p.pile_id] / 1000, "offer_a": offer[p.pile_id] / 1000,
                  "state": "charging"})


def test_a_site_below_the_fallbacks_is_refused():
    piles = [Pile("a", 32000, 10000), Pile("b", 32000, 10000)]
    check_site(20000, piles)
    with pytest.raises(ValueError, match="fallback"):
        check_site(19900, piles)


# -- over a real broker, with simulated piles -----------------------------------------------------------

SECRETS = {"site-a": bytes(range(32)), "site-b": bytes(range(1, 33)), "site-c": bytes(range(2, 34))}
SITE_A = 40
TTL_S = 3


def steer(piles, ctl, stop, sums):
    while not stop.is_set():
        for p in piles:
            p.tick()
        sums.append(sum(p.offer_ma for p in piles))
        time.sleep(0.02)


def wait(cond, what, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail("waiting for " + what)


def test_a_group_shares_its_site_and_falls_back_when_the_controller_dies(broker):
    url = "mqtt://127.0.0.1:%d" % broker.port
    # Time compressed: the offer changes at most every 0.5 s (5 s on a pile), limits live 3 s.
    piles = [SteeredPile(url, pid, key, max_a=32, fallback_a=6, offer_gap_s=0.5, follow_s=0.1)
             for pid, key in SECRETS.items()]
    ctl = Controller(url, SITE_A, [Pile(pid, 32000, 6000, key) for pid, key in SECRETS.items()],
                     ttl_s=TTL_S, period_s=0.3, log=lambda _text: None)
    stop, sums = threading.Event(), []
    ticker = threading.Thread(target=steer, args=(piles, ctl, stop, sums))
    ticker.start()
    try:
        piles[0].plug()
        ctl_stop = threading.Event()
        runner = threading.Thread(target=ctl.run, args=(ctl_stop,))
        runner.start()
        # one car: it gets the site less the others' fallbacks, up to its 32 A
        wait(lambda: piles[0].offer_ma == 28000, "pile a at 28 A")
        piles[1].plug()
        wait(lambda: piles[0].offer_ma == 17000 and piles[1].offer_ma == 17000, "a and b at 17 A")
        piles[2].plug()
        wait(lambda: all(p.offer_ma == 13300 for p in piles), "three at 13.3 A")
        piles[0].plug(False)
        wait(lambda: piles[1].offer_ma == 17000 and piles[2].offer_ma == 17000, "b and c back at 17 A")
        assert max(sums) <= SITE_A * 1000, "the offers summed to %d mA" % max(sums)
        assert all(p.limit_source == "remote" for p in piles)
        # The controller dies: every limit runs out into its fallback within the ttl.
        ctl_stop.set()
        runner.join(5)
        ctl.close()
        died = time.monotonic()
        wait(lambda: all(p.limit_source == "fallback" for p in piles), "every pile on its fallback")
        assert time.monotonic() - died < TTL_S + 1.5
        wait(lambda: piles[1].offer_ma == 6000 and piles[2].offer_ma == 6000, "6 A offered")
        assert max(sums) <= SITE_A * 1000
        assert any(amps and ttl == TTL_S for _, _, amps, ttl in ctl.sent)
    finally:
        stop.set()
        ticker.join(5)
        for p in piles:
            p.close()


def test_tool_refuses_a_site_too_small(tmp_path):
    key = tmp_path / "k"
    key.write_text(SECRETS["site-a"].hex())
    group = tmp_path / "g.json"
    group.write_text(json.dumps({"site_limit_a": 10, "piles": [
        {"pile_id": "a", "secret_file": str(key), "fallback_a": 6},
        {"pile_id": "b", "secret_file": str(key), "fallback_a": 6}]}))
    proc = subprocess.run([sys.executable, str(ROOT) + "/tools/group_limit.py", "--broker",
                           "mqtt://127.0.0.1:1", "--group", str(group)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "fallback" in proc.stderr
