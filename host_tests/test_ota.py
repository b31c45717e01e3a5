"""Signed over-the-air updates on CPython (docs/ota.md): firmware/ota.py's Updater and
release_boot.py on a flash folder, chunks from a fake broker (pilehost.ota_rig). The real chain
on the unix port and mosquitto is test_ota_fleet.py."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilehost import ota_rig, release
from pilehost.ota_rig import Board, Broker, Reset

CMD = "c-upd-1"


def valid(b):
    """Every ota message and ack the board sent validates against its schema."""
    from pilehost.cloud import schemas

    s = schemas()
    for kind, messages in (("ota", b.ota_messages()), ("cmd_ack", b.acks())):
        for m in messages:
            s.check(kind, m)
    return True


def update(b, broker, n, start=0, limit=5000):
    """The command, then steps until the update is answered (staged or refused) or a reset."""
    result = b.updater.start(start, CMD, n)
    if result != (None, None):
        return result
    ota_rig.run(b, limit, start, until=lambda: any(a["cmd_id"] == CMD for a in b.acks()))
    return None, None


def test_a_good_release_is_staged_switched_tried_and_marked_good(flash, ota):
    broker = Broker()
    manifest, files, items = ota.published(1)
    broker.put(items)
    b = ota.board()
    assert b.boot(broker) == 0
    assert update(b, broker, 1) == (None, None)
    assert b.updater.state == "staged"
    assert b.acks()[-1]["result"] == "accepted"
    for path, data in files:
        assert (flash / "rel/1" / path).read_bytes() == data
    assert b.state()["trial"] is None  # nothing switched yet
    with pytest.raises(Reset):
        ota_rig.run(b, 10)
    assert b.pile.safe_offs == 1  # contactor open, pilot F before the switch
    assert b.state()["trial"] == 1
    assert b.boot(broker) == 1  # the trial
    assert b.updater.state == "trial"
    ota_rig.run(b, 3000)  # 15 s: ticking and reported
    st_ = b.state()
    assert (st_["good"], st_["trial"], st_["floor"]) == (1, None, 1)
    assert b.ota_messages()[-1]["state"] == "running"
    assert valid(b)
    assert b.boot(broker) == 1  # and stays


def test_a_release_that_never_reports_goes_back_by_itself(flash, ota):
    broker = Broker()
    b = ota.switched_to_trial(broker, CMD, trial_s=30)
    b.conn.idle = lambda: False  # never gets its report out
    with pytest.raises(Reset):
        ota_rig.run(b, 10000)
    assert b.boot(broker) == 0
    assert b.state()["rolled"] == {"release": 1, "why": "no report within 30 s"}
    ota_rig.run(b, 2)
    assert b.ota_messages()[-1]["rolled_back"] == {"release": 1, "reason": "no report within 30 s"}


def test_a_release_that_crashes_at_boot_is_rolled_back_by_the_boot(flash, ota):
    broker = Broker()
    b = ota.switched_to_trial(broker, CMD)
    assert b.machine.wdt == 60000  # the trial runs under the boot's watchdog
    # it crashes before reporting: the watchdog resets the board
    assert b.boot(broker, cause=b.machine.WDT_RESET) == 0
    assert b.state()["rolled"] == {"release": 1, "why": "watchdog reset during the trial"}
    assert b.updater.start(0, "c-again", 1)[0] == "rejected"  # never tried again


def test_forged_release_is_refused(flash, ota):
    from cryptography.hazmat.primitives.asymmetric import rsa

    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    broker = Broker()
    broker.put(ota.published(1, signer=forger)[2])
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1)
    ack = b.acks()[-1]
    assert (ack["cmd_id"], ack["result"]) == (CMD, "invalid")
    assert ack["reason"].startswith("bad_signature")
    assert b.ota_messages()[-1]["state"] == "refused"
    assert not (flash / "rel/1/manifest").exists()
    assert b.state()["trial"] is None


def test_a_file_changed_after_signing_is_refused(flash, ota):
    broker = Broker()
    manifest, files, items = ota.published(1)
    evil = dict(items)
    t = "evse/v1/release/1/0/1"
    evil[t] = bytes(len(evil[t]))
    broker.put(evil.items())
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1)
    ack = b.acks()[-1]
    assert ack["result"] == "failed" and "main.mpy does not match" in ack["reason"]
    assert b.state()["trial"] is None


def test_truncated_release_is_refused(flash, ota):
    broker = Broker()
    manifest, files, items = ota.published(1)
    items = [(t, p[:-1] if t == "evse/v1/release/1/0/3" else p) for t, p in items]
    broker.put(items)
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1)
    ack = b.acks()[-1]
    assert ack["result"] == "failed" and ack["reason"].startswith("truncated: main.mpy chunk 3")


def test_a_release_missing_on_the_broker_is_refused_after_retries(flash, ota):
    broker = Broker()
    manifest, files, items = ota.published(1)
    broker.put(t for t in items if t[0] != "evse/v1/release/1/1/0")
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1, limit=20000)
    ack = b.acks()[-1]
    assert ack["result"] == "failed" and "incomplete release" in ack["reason"]


def test_replayed_release_is_refused_at_once(flash, ota):
    broker = Broker()
    broker.put(ota.published(1)[2])
    b = ota.switched_to_trial(broker, CMD, 2, version="0.3.0")
    ota_rig.run(b, 3000)
    assert b.state()["good"] == 2
    for n in (1, 2):
        assert b.updater.start(0, "c-old", n) == (
            "rejected", "replayed: release %d is not above 2" % n)


def test_a_manifest_that_names_another_release_is_refused(flash, ota):
    """A validly signed manifest of release 1 served under release 5's topics (a replay)."""
    broker = Broker()
    manifest, files, items = ota.published(1)
    broker.put((t.replace("/release/1/", "/release/5/"), p) for t, p in items)
    b = ota.board()
    b.boot(broker)
    update(b, broker, 5)
    ack = b.acks()[-1]
    assert ack["result"] == "rejected" and "release 1, not 5" in ack["reason"]


def test_another_boards_release_is_refused(flash, ota):
    broker = Broker()
    broker.put(ota.published(1, boards=("other-board",))[2])
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1)
    assert b.acks()[-1]["reason"] == "release 1 is not for board ref-esp32"


@pytest.mark.parametrize("path", ["../boot.py", "/main.mpy", "a//b.mpy", "manifest", "x.mpy.part",
                                  "CAPS.mpy", "a/b/c/d/e.mpy"])
def test_a_signed_manifest_with_a_bad_path_is_refused(flash, ota, path):
    files = ota_rig.fake_files("0.2.0") + [(path, b"x")]
    body = release.manifest_body(1, "0.2.0", ["ref-esp32"], files)
    broker = Broker()
    broker.put(ota.published(1, files=files, body=body)[2])
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1)
    assert b.acks()[-1]["reason"] == "malformed: a file entry"


@pytest.mark.parametrize("digest", ["A" * 64, "g" * 64, "a" * 63, "a" * 65, "\u00e9" * 32, " " + "a" * 63, 7])
def test_a_signed_manifest_with_a_bad_hash_is_refused(flash, ota, digest):
    body = release.manifest_body(1, "0.2.0", ["ref-esp32"], ota_rig.fake_files("0.2.0"))
    body["files"][1][2] = digest
    broker = Broker()
    broker.put(ota.published(1, body=body)[2])
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1)
    assert b.acks()[-1]["reason"] == "malformed: a file entry"


def test_no_step_while_a_session_is_open(flash, ota):
    broker = Broker()
    broker.put(ota.published(1)[2])
    b = ota.board()
    b.boot(broker)
    b.pile.open_session = object()
    assert b.updater.start(0, CMD, 1) == ("rejected", "not during a session")
    b.pile.open_session = None
    assert b.updater.start(0, CMD, 1) == (None, None)
    ota_rig.run(b, 3)
    b.pile.open_session = object()  # a car came: the download waits, the switch too
    before = len(b.conn.inbox) + len(b.conn.subs)
    ota_rig.run(b, 200)
    assert b.updater.state == "downloading" and len(b.conn.subs) <= before
    b.pile.open_session = None
    ota_rig.run(b, 5000, until=lambda: b.updater.state == "staged")
    b.pile.open_session = object()
    ota_rig.run(b, 200)  # staged, but no switch under a session
    b.pile.open_session = None
    with pytest.raises(Reset):
        ota_rig.run(b, 10)


def _cut_write(monkeypatch, nth, at):
    """Power cut during the nth write to the flash from now on, after `at` of its bytes (a host
    file system may keep a torn tail; LittleFS would keep none): Reset."""
    import builtins

    real_open = builtins.open
    count = [0]

    class Torn:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            count[0] += 1
            if count[0] > nth:
                self.f.write(bytes(data[:min(at, len(data))]))
                self.f.close()
                CUTS.append(os.path.basename(self.f.name))
                raise Reset()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def cutting_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Torn(f) if ("w" in mode or "a" in mode) else f

    monkeypatch.setattr(builtins, "open", cutting_open)
    return lambda: monkeypatch.setattr(builtins, "open", real_open)


CUTS = []  # where the cuts fell (the test below checks the switch is among them)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 14), st.integers(0, 800)), min_size=1, max_size=4),
       good_first=st.booleans())
def test_power_cut_at_any_byte_of_download_or_switch_boots_a_good_release(
        ota, tmp_path_factory, monkeypatch, cuts, good_first):
    """Cut the power in the middle of a write, several times over the download and the switch:
    every boot runs a good release (the old one, or the new one in trial, all of whose files
    match); the download resumes and ends in release 2 good."""
    monkeypatch.chdir(tmp_path_factory.mktemp("flash"))
    broker = Broker()
    manifest1, files1, items1 = ota.published(1, version="0.2.0")
    manifest2, files2, items2 = ota.published(2, version="0.3.0")
    broker.put(items1)
    broker.put(items2)
    b = ota.board()
    b.boot(broker)
    if good_first:  # release 1 good first: the cuts then fall between two releases
        update(b, broker, 1)
        with pytest.raises(Reset):
            ota_rig.run(b, 10)
        b.boot(broker)
        ota_rig.run(b, 3000)
        assert b.state()["good"] == 1
    good = b.state()["good"]
    b.updater.start(0, CMD, 2)
    expected = {good: files1 if good else None, 2: files2}
    for nth, at in cuts + [(None, None)]:
        restore = _cut_write(monkeypatch, nth, at) if nth is not None else (lambda: None)
        try:
            ota_rig.run(b, 6000)
        except Reset:
            pass
        finally:
            restore()
        running = b.boot(broker)
        assert running in (good, 2)
        if running and expected[running] is not None:
            for path, data in expected[running]:
                assert open("rel/%d/%s" % (running, path), "rb").read() == data
        if running == 2:
            break
    # whatever the cuts left: the download resumes (a job on flash) and ends good
    for _ in range(3):
        if b.running == 2:
            break
        try:
            ota_rig.run(b, 8000)
        except Reset:
            pass
        b.boot(broker)
    assert b.running == 2
    ota_rig.run(b, 3000)
    assert b.state()["good"] == 2
    assert valid(b)


def test_the_power_cuts_fell_on_the_switch_too():
    """The test above (same process, run before) cut the release.json write of the switch."""
    if not CUTS:
        pytest.skip("run with the test above")
    assert "release.json.tmp" in CUTS and "main.mpy.part" in CUTS and "manifest.part" in CUTS


@pytest.mark.parametrize("at", range(0, 120, 7))
def test_power_cut_at_each_byte_of_the_switch(flash, ota, monkeypatch, at):
    broker = Broker()
    broker.put(ota.published(1)[2])
    b = ota.board()
    b.boot(broker)
    update(b, broker, 1)
    restore = _cut_write(monkeypatch, 0, at)  # the next write is the switch's release.json.tmp
    with pytest.raises(Reset):
        ota_rig.run(b, 10)
    restore()
    assert CUTS[-1] == "release.json.tmp"
    assert b.boot(broker) == 0  # the old state: the good (factory) release
    with pytest.raises(Reset):  # the job resumes from flash: all verified, staged, switched
        ota_rig.run(b, 5000)
    assert b.boot(broker) == 1


def test_the_verification_costs(flash, ota, capsys):
    """Figures, not a timed test: RSA-2048 verification on CPython (the unix port's are in
    test_ota_fleet.py and docs/ota.md)."""
    import hashlib
    import time

    k = ota.board().key
    manifest = ota.published(1)[0]
    nl = manifest.index(b"\n")
    sig = bytes.fromhex(manifest[:nl].decode())
    digest = hashlib.sha256(manifest[nl + 1:]).digest()
    t0 = time.perf_counter()
    for _ in range(20):
        assert k.verify(sig, digest)
    print("RSA-2048 PKCS#1 v1.5 verify on CPython: %.2f ms" % ((time.perf_counter() - t0) / 20 * 1000))
    assert not k.verify(sig, bytes(32))
    assert json.loads(manifest[nl + 1:])["release"] == 1


def test_a_garbled_state_boots_the_factory_firmware_and_keeps_the_floor(flash, ota):
    broker = Broker()
    b = ota.switched_to_trial(broker, CMD)
    ota_rig.run(b, 3000)
    data = bytearray((flash / "release.json").read_bytes())
    data[-3] ^= 0x01  # a bit flip: never a torn write (temp + rename)
    (flash / "release.json").write_bytes(bytes(data))
    assert b.boot(broker) == 0
    assert b.state()["floor"] == 1  # release 1 cannot be replayed onto it
    assert b.updater.start(0, "c-x", 1)[0] == "rejected"


def test_a_release_that_cannot_even_be_imported_resets_the_board(flash, monkeypatch):
    import sys

    rb = Board(release.public_hex(ota_rig.release_key())).rb
    (flash / "rel" / "3").mkdir(parents=True)
    (flash / "rel" / "3" / "main.py").write_text("raise ImportError('broken release')\n")
    monkeypatch.setattr(sys, "path", ["rel/3"] + sys.path)
    monkeypatch.delitem(sys.modules, "main", raising=False)
    resets = []

    rb.run_main(lambda: resets.append("factory"), lambda: resets.append(1))
    assert resets == [1]
    sys.modules.pop("main", None)


def test_config_takes_only_an_rsa_modulus_as_the_release_key():
    import config

    good = release.public_hex(ota_rig.release_key())
    conf = config.parse_config({"ota": {"key": good}})
    assert (conf.ota.key, conf.ota.trial_s) == (good, 300)
    assert config.parse_config({}).ota is None
    for bad in ("", good[:-2], good + "00", "0" + good[1:], good[:-1] + "g", 1234):
        with pytest.raises(config.ConfigError, match="'key'"):
            config.parse_config({"ota": {"key": bad}})
    with pytest.raises(config.ConfigError, match="trial_s"):
        config.parse_config({"ota": {"key": good, "trial_s": 5}})
    with pytest.raises(config.ConfigError, match="unknown key 'private'"):
        config.parse_config({"ota": {"key": good, "private": "x"}})
