"""Withdrawing a release (docs/ota.md, "Withdrawing a release") on real parts, as
test_ota_fleet.py: virtual piles (the firmware on the MicroPython unix port) on mosquitto with the
per-pile ACL, the release built, published and withdrawn with tools/release.py's command line
(pilehost.release.main), rolled out with a record (pilehost.rollout).

The firmware has no command to go back to an earlier release: the withdrawal stops the rollout,
deletes the release's chunks (a download under way fails, the pile keeps its release), and says
what happens to each pile; a pile already running the release stays on it."""
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from pilehost import ota_sim, pilecmd, release, rollout


@pytest.fixture(scope="module")
def fleet(ota_fleet):
    return ota_fleet(n=3)


@pytest.fixture(scope="module")
def cli(fleet, tmp_path_factory):
    """build/publish/withdraw with tools/release.py's arguments; the cloud user's password file."""
    d = tmp_path_factory.mktemp("cli")
    key = str(d / "release.pem")
    release.save_key(fleet.key, key)
    user, password = ota_sim._cloud_auth(fleet.cloud.broker.cloud_url)
    (d / "cloud.pass").write_text(password + "\n")
    broker = ["--host", "127.0.0.1", "--port", str(fleet.cloud.broker.cloud_port), "--username", user,
              "--password-file", str(d / "cloud.pass")]

    def run(what, *args):
        assert release.main([what, *args, *(broker if what in ("publish", "withdraw") else ())]) == 0

    def build_and_publish(n, version):
        out = str(d / ("rel%d" % n))
        run("build", "--key", key, "--release", str(n), "--version", version, "--arch", "host", out)
        run("publish", out)
        return out
    run.build_and_publish = build_and_publish
    run.dir = d
    return run


def retained_chunks(fleet, n, settle=2.0):
    """The topics under evse/v1/release/<n>/ the broker still keeps."""
    user, password = ota_sim._cloud_auth(fleet.cloud.broker.cloud_url)
    seen = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.on_message = lambda _c, _u, m: seen.append(m.topic) if m.retain and m.payload else None
    c.connect("127.0.0.1", fleet.cloud.broker.cloud_port)
    c.subscribe("evse/v1/release/%d/#" % n, qos=1)
    c.loop_start()
    try:
        time.sleep(settle)
    finally:
        c.loop_stop()
        c.disconnect()
    return seen


def ota(fleet, pile_id):
    return fleet.watch.snapshot(pile_id)["ota"]


def until(cond, what, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError("not within %d s: %s" % (timeout, what))


def test_withdraw_stops_the_rollout_after_its_first_cohort_and_deletes_the_chunks(fleet, cli, capsys):
    out = cli.build_and_publish(1, "0.2.0")
    assert len(retained_chunks(fleet, 1, 1.0)) > 10
    record = str(cli.dir / "rollout-1.json")
    said = []
    r = rollout.Rollout(fleet.watch, fleet.secrets, 1, (1, 100), wait_s=240, soak_s=600, say=said.append,
                        seed=2026, record=record)
    first = r.cohorts[0]
    assert len(first) == 1
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("ok", r.run()))
    t.start()
    try:
        until(lambda: r.outcome.get(first[0]) == "good", "the first cohort good", 240)
        capsys.readouterr()
        cli("withdraw", out, "--record", record, "--reason", "field reports: chargers stop at 80 %")
        printed = capsys.readouterr().out
    finally:
        t.join(30)
    assert box == {"ok": False} and r.withdrawn == "field reports: chargers stop at 80 %"
    assert any("seed 2026" in line for line in said)
    # the cohorts after the first were never asked
    for p in set(fleet.ids) - set(first):
        assert p not in r.outcome and p not in r.updated
        assert not [a for a in fleet.watch.snapshot(p)["acks"] if a["cmd"] == "update"]
        assert ota(fleet, p)["release"] == 0
    # the pile updated stays on the release (no command takes it back) and the tool says so
    o = ota(fleet, first[0])
    assert (o["release"], o["state"], o["rolled_back"]) == (1, "running", None)
    assert "%s: runs release 1 (good): stays on it" % first[0] in printed
    assert "ship release 2 built from the previous source" in printed
    assert "retained chunks deleted" in printed
    assert retained_chunks(fleet, 1) == []
    rec = rollout.load_record(record)
    assert (rec["state"], rec["seed"], rec["cohorts"][0]) == ("withdrawn", 2026, first)
    # the same record cannot start the release again
    assert rollout.main(["--broker", fleet.cloud.broker.cloud_url, "--release", "1", "--piles",
                         str(_piles_json(fleet, cli.dir)), "--record", record]) == 1


def _piles_json(fleet, d):
    import json

    listing = {}
    for i, p in enumerate(fleet.ids):
        path = d / ("%s.secret" % p)
        path.write_text(fleet.secrets[p].hex())
        listing[p] = {"secret": str(path), "city": "city-%d" % (i % 2)}
    (d / "piles.json").write_text(json.dumps(listing))
    return d / "piles.json"


def test_a_download_under_way_fails_when_its_release_is_withdrawn_and_the_pile_keeps_its_own(fleet, cli,
                                                                                         capsys):
    out = cli.build_and_publish(2, "0.3.0")
    p = [p for p in fleet.ids if ota(fleet, p)["release"] == 0][0]
    body = pilecmd.make_body("update", {"release": 2}, time.time_ns() // 1_000_000, "upd-w2")
    fleet.watch.send(p, pilecmd.sign(fleet.secrets[p], body))
    until(lambda: ota(fleet, p)["state"] == "downloading" and (ota(fleet, p)["progress"] or 0) >= 5,
          "the download under way", 120)
    capsys.readouterr()
    cli("withdraw", out, "--record", str(cli.dir / "rollout-2.json"))
    printed = capsys.readouterr().out
    assert "%s: downloading release 2: the chunks are gone, the download fails" % p in printed
    until(lambda: ota(fleet, p)["state"] == "refused", "the download refused", 150)
    o = ota(fleet, p)
    assert o["release"] == 0 and o["reason"].startswith("incomplete release"), o
    ack = [a for a in fleet.watch.snapshot(p)["acks"] if a["cmd_id"] == "upd-w2"]
    assert ack and ack[0]["result"] == "failed"
    pile = [x for x in fleet.piles if x.pile_id == p][0]
    assert not any("switching to release 2" in line for line in pile.lines)
