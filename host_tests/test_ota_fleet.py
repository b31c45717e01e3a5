"""Signed over-the-air updates, the whole chain on real parts (docs/ota.md): virtual piles (the
firmware on the MicroPython unix port, each on its own flash folder) on mosquitto with the shipped
per-pile ACL, releases built with mpy-cross, signed, published as retained chunks, rolled out in
cohorts by pilehost.rollout (pilehost.ota_sim.Fleet; `make sim SCENARIO=ota` shows the same)."""
import time

import pytest

from pilehost import ota_sim, pilecmd, release


@pytest.fixture(scope="module")
def fleet(ota_fleet):
    return ota_fleet(n=3)


@pytest.fixture(scope="module")
def released(fleet):
    """Release 1 rolled out to the whole fleet, once per fleet: the tests below build on it, in
    whatever order the runner (xdist) takes them."""
    fleet.publish(1, "0.2.0")
    return fleet.rollout(1, (34, 100), soak_s=3, say=lambda text: None)


def ota(fleet, pile_id):
    return fleet.watch.snapshot(pile_id)["ota"]


def wait_ack(fleet, pile_id, cmd_id, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        for ack in fleet.watch.snapshot(pile_id)["acks"]:
            if ack["cmd_id"] == cmd_id:
                return ack
        time.sleep(0.3)
    raise AssertionError("no ack for %s" % cmd_id)


def send_update(fleet, pile_id, n, cmd_id):
    """The signed update and its ack; sent again above the floor a `replayed` ack names (a pile
    that rebooted refuses counters up to its reservation: docs/commands.md, "Replays")."""
    body = pilecmd.make_body("update", {"release": n}, time.time_ns() // 1_000_000, cmd_id)
    fleet.watch.send(pile_id, pilecmd.sign(fleet.secrets[pile_id], body))
    ack = wait_ack(fleet, pile_id, cmd_id)
    floor = pilecmd.floor_of(ack["reason"])
    if floor is None:
        return ack
    body = pilecmd.make_body("update", {"release": n}, floor + 1, cmd_id + "-2")
    fleet.watch.send(pile_id, pilecmd.sign(fleet.secrets[pile_id], body))
    return wait_ack(fleet, pile_id, cmd_id + "-2")


def test_a_good_release_rolls_out_to_the_fleet(fleet, released):
    r = released
    assert r.halted is None, r.halted
    assert r.outcome == {p: "good" for p in fleet.ids}
    for p in fleet.ids:
        o = ota(fleet, p)
        assert (o["release"], o["version"], o["state"], o["rolled_back"]) == (1, "0.2.0", "running", None)
        assert fleet.watch.snapshot(p)["faults"] == set()
    piles = fleet.cloud.storage.query("SELECT pile_id FROM piles")
    assert len(piles) == 3
    assert fleet.cloud.storage.query("SELECT topic, reason FROM rejected") == []  # ota messages valid


def test_replayed_and_forged_releases_are_refused_with_a_clear_ack(fleet, released, tmp_path):
    p = fleet.ids[0]
    ack = send_update(fleet, p, 1, "upd-replay")
    assert (ack["result"], ack["reason"]) == ("rejected", "replayed: release 1 is not above 1")
    forger = release.generate_key()
    files = release.build_files("6.6.6", arch=None)
    manifest = release.sign_manifest(forger, 9, "6.6.6", ["ref-esp32"], files)
    b = fleet.cloud.broker
    release.publish("127.0.0.1", b.cloud_port, 9, manifest, files, *ota_sim._cloud_auth(b.cloud_url))
    ack = send_update(fleet, p, 9, "upd-forged")
    assert ack["result"] == "invalid"
    assert ack["reason"] == "bad_signature: the manifest is not signed by the release key"
    assert ota(fleet, p)["release"] == 1


def test_a_release_that_crashes_at_boot_is_rolled_back_on_its_cohort_and_the_rollout_halts(fleet, released,
                                                                                          tmp_path):
    fleet.publish(2, "0.3.0", source=ota_sim.crashing_source(str(tmp_path)))
    before = {p: ota(fleet, p)["release"] for p in fleet.ids}
    # seed 5: a 60 % cohort of the first two piles (the power-cut test below takes the third)
    r = fleet.rollout(2, (60, 100), soak_s=0, say=lambda text: None, seed=5)
    cohort = r.cohorts[0]
    assert cohort == fleet.ids[:2]
    assert r.halted is not None and r.halted.startswith("cohort 1 worse")
    for p in cohort:
        assert r.outcome[p].startswith("rolled back"), r.outcome
        o = ota(fleet, p)
        assert (o["release"], o["version"], o["state"]) == (1, "0.2.0", "running")
        assert o["rolled_back"]["release"] == 2
    (last,) = set(fleet.ids) - set(cohort)
    assert last not in r.outcome  # never asked
    assert ota(fleet, last)["release"] == before[last]
    # each pile of the cohort said on the console why it went back
    for pile in (pile for pile in fleet.piles if pile.pile_id in cohort):
        assert any("release 2 failed its trial, back to 1" in line for line in pile.lines)


def test_a_power_cut_mid_download_resumes_where_it_stopped(fleet):
    """kill -9 of a pile while its download is under way: powered up again on the same flash, it
    resumes the download from what is on flash (not from the start) and ends good."""
    fleet.publish(3, "0.4.0")
    i = 2
    p = fleet.ids[i]
    counter = time.time_ns() // 1_000_000
    seen = len(fleet.watch.snapshot(p)["acks"])
    body = pilecmd.make_body("update", {"release": 3}, counter, "upd-cut")
    fleet.watch.send(p, pilecmd.sign(fleet.secrets[p], body))
    cmd_id = "upd-cut"
    end = time.time() + 5  # a pile that rebooted refuses counters up to its floor: jump (commands.md)
    while time.time() < end:
        floors = [pilecmd.floor_of(a["reason"]) for a in fleet.watch.snapshot(p)["acks"][seen:]
                  if a["cmd_id"] == "upd-cut"]
        if floors and floors[0] is not None:
            cmd_id = "upd-cut-2"
            body = pilecmd.make_body("update", {"release": 3}, floors[0] + 1, cmd_id)
            fleet.watch.send(p, pilecmd.sign(fleet.secrets[p], body))
            break
        if ota(fleet, p)["state"] == "downloading":
            break
        time.sleep(0.1)
    end = time.time() + 120
    while time.time() < end:
        o = ota(fleet, p)
        if o["state"] == "downloading" and (o["progress"] or 0) >= 30:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no progress: %r" % ota(fleet, p))
    fleet.piles[i] = fleet.piles[i].power_cut()
    end = time.time() + 180
    while time.time() < end:
        o = ota(fleet, p)
        if o["release"] == 3 and o["state"] == "running":
            break
        time.sleep(0.5)
    else:
        raise AssertionError("not good after the cut: %r" % ota(fleet, p))
    lines = fleet.piles[i].lines
    assert any("resuming the download of release 3" in line for line in lines), lines[:20]
    assert wait_ack(fleet, p, cmd_id)["result"] == "accepted"  # answered after the cut
