"""The soak (tools/soak.py, `make soak`) in short: 30 sessions (50 in `make test-long`) of the
firmware on the unix port against mosquitto and the reference consumer, with meter faults, RCD
trips, unplugging under load, remote stops, power cuts (kill -9) and broker restarts and black
holes. The consumer's database must hold exactly the sessions the simulated car performed, once
each, to the Wh. SEED=N replays a run (the seed is in the failure message)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from pilehost import ROOT, broker, procs, unix_port
from pilehost import soak

CI_SEED = 960164343  # passed when the soak was written; every fault kind comes up in it (30 or 50)
# Session-end heap samples in one lifetime may differ by what the collector finds on the stack
# and by the link's state at that moment (measured: up to ~1.5 KiB); a leak of a record or a
# buffer per session would pass that within a few sessions of a 12-session lifetime.
HEAP_NOISE_B = 2048


class FakeCloud:
    """What Soak._compare reads from the cloud: the stored sessions and the consumer's counts."""

    def __init__(self, rows, conflicts=0):
        self.rows = rows
        self.handler = self
        self.storage = self.stats = self
        self.conflicts = conflicts

    def sessions(self):
        return self.rows

    def snapshot(self):
        return [{"session_ended_conflict": self.conflicts}]

    def query(self, sql):
        return []


def lifetime(*sessions, cut_register=None):
    """Output lines of a lifetime: (begin mJ, end mJ or None for a cut, firmware id or None)."""
    lines = []
    for begin, end, sid, *closed_by in sessions:
        # closed_by: the reason of the record's closing (its ended record on flash); "" if it had
        # not closed when the power went. Default: closed with the end, open at a cut.
        reason = closed_by[0] if closed_by else ("ev_disconnected" if end is not None else "")
        lines.append("[   1.000] sim session: begin %d" % begin)
        if sid is not None:
            lines.append('[   0.900] outbox: {"v": 1, "session_id": "%s", "meter_start_wh": 0}' % sid)
        if end is not None:
            lines.append("[   3.000] sim session: end %d" % end)
        if sid is not None and reason:
            lines.append('[   2.000] outbox: {"v": 1, "session_id": "%s", "stop_time": "2026-11-24T02:00Z",'
                         ' "stop_reason": "%s"}' % (sid, reason))
    life = soak.Lifetime(lines, cut_register)
    life.killed = cut_register is not None
    return life


WH = 3600000  # mJ in a Wh


def test_comparison_names_every_kind_of_mismatch():
    s = soak.Soak(1, seed=1)
    s.lifetimes = [lifetime((0, 10 * WH, "p-1-1"), (10 * WH, 25 * WH, "p-1-2"), (25 * WH, 30 * WH, "p-1-3")),
                   lifetime((30 * WH, None, "p-2-1"), cut_register=34 * WH),
                   lifetime((34 * WH, None, None), cut_register=34 * WH),  # cut before its record: 0 Wh
                   # stopped remotely, its record closed, then the cut with the car still plugged in
                   lifetime((34 * WH, None, "p-4-1", "remote"), cut_register=36 * WH),
                   # unplugged, then the cut before the record's closing reading
                   lifetime((36 * WH, 38 * WH, "p-5-1", ""), cut_register=38 * WH)]
    good = {"p-1-1": (10, "ev_disconnected", 0, 10), "p-1-2": (15, "remote", 10, 25),
            "p-1-3": (5, "ev_disconnected", 25, 30), "p-2-1": (4, "power_loss", 30, 34),
            "p-4-1": (2, "remote", 34, 36), "p-5-1": (2, "power_loss", 36, 38)}
    s._compare(FakeCloud(dict(good)))
    assert s.failures == [] and s.unnamed == 1

    bad = dict(good, **{"p-1-2": (14, "remote", 10, 24), "p-2-1": (4, "ev_disconnected", 30, 34),
                        "p-4-1": (2, "power_loss", 34, 36), "p-9-1": (0, "ev_disconnected", 0, 0)})
    del bad["p-1-3"]
    s.failures = []
    s._compare(FakeCloud(bad, conflicts=1))
    text = "\n".join(s.failures)
    assert "p-1-2 (lifetime 1): energy_wh 14 in the database, the meter counted 15" in text
    assert "p-1-3 (lifetime 1, 5 Wh by the meter) is not in the database" in text
    assert "p-2-1 (lifetime 2): stop_reason ev_disconnected, but the world lost power with the record open" \
        in text
    assert "p-4-1 (lifetime 4): stop_reason power_loss, but the world lost power after the record closed" \
        in text
    assert "sessions the car never performed: p-9-1" in text
    assert "1 conflicting session/ended records" in text
    assert len(s.failures) == 6

    s.failures = []  # energy flowed in a session the firmware never named: a failure too
    s.lifetimes = [lifetime((0, None, None), cut_register=3 * WH)]
    s._compare(FakeCloud({}))
    assert len(s.failures) == 1 and "got firmware ids []" in s.failures[0]


def test_shown_wh_is_the_float32_kwh_rounded_as_the_firmware_reads_it():
    assert soak.shown_wh(0) == 0
    assert soak.shown_wh(WH * 1499) == 1499
    assert soak.shown_wh(WH * 1499 + WH // 2) == 1500  # 1499.5 Wh
    assert soak.shown_wh(WH * 1499 + WH // 2 - 1000) == 1499


@pytest.mark.skipif(broker.find_mosquitto() is None, reason="mosquitto is not installed (make broker)")
def test_soak_short(capsys, unix_binary, soak_sessions):
    try:
        unix_port.micropython_binary()
    except FileNotFoundError:
        pytest.skip("MicroPython unix port not installed (make venv)")
    # A fixed seed by default: `make test` must give the same answer twice; `make soak` draws a
    # new seed every run and is where new fault sequences are explored. SOAK_RANDOM=1: a new one.
    seed = int(os.environ["SEED"]) if os.environ.get("SEED") else (
        random.SystemRandom().randrange(1, 2 ** 31) if os.environ.get("SOAK_RANDOM") else CI_SEED)
    run = soak.Soak(soak_sessions, seed)
    ok = run.run()
    figures = "\n".join(run.figures())
    with capsys.disabled():
        print("\n" + figures)
    assert ok, "SEED=%d\n%s\n%s" % (seed, figures, "\n".join(run.failures[:20]))
    performed = sum(len(life.sessions) for life in run.lifetimes)
    assert performed >= soak_sessions and run.stored >= performed - run.unnamed
    for kind in ("power_cut", "broker_black_hole", "broker_restart_kill", "broker_restart_term",
                 "meter_garbage", "meter_silent", "rcd_trip", "remote_stop"):
        assert run.faults[kind] >= 1, "SEED=%d: no %s injected\n%s" % (seed, kind, figures)
    grew = soak.heap_growth(run.lifetimes)
    assert grew < HEAP_NOISE_B, "SEED=%d: heap grew %d B in a lifetime: %r" % (
        seed, grew, [life.heap for life in run.lifetimes])


def mosquittos_under(directory):
    """The pids of mosquitto processes whose config file lies below `directory`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"mosquitto") and any(a.startswith(os.fsencode(directory)) for a in argv):
            pids.append(int(pid))
    return pids


def firmware_running(directory):
    """Whether a MicroPython process runs with its flash folder below `directory`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink("/proc/%s/cwd" % pid)
        except OSError:
            continue
        if cwd.startswith(str(directory)) and pid != str(os.getpid()):
            return True
    return False


@pytest.mark.skipif(broker.find_mosquitto() is None, reason="mosquitto is not installed (make broker)")
def test_sigterm_stops_the_soaks_broker_and_firmware(tmp_path):
    """kill (SIGTERM) ends the soak through its `finally`: mosquitto and the firmware go with it."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "soak.py"), "--sessions", "5",
                             "--seed", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (mosquittos_under(tmp_path) and firmware_running(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        procs.end_process(proc)
    deadline = time.monotonic() + 5
    while mosquittos_under(tmp_path) or firmware_running(tmp_path):
        assert time.monotonic() < deadline, "left running: %r" % mosquittos_under(tmp_path)
        time.sleep(0.1)


def test_a_drain_lifetime_takes_the_car_away_before_the_firmware_sees_it(tmp_path):
    """After a cut with the car plugged in, the soak's drain boots only deliver the outbox: the
    car goes at once (steps due at the same time run in their order on MicroPython too, whose
    sort is not stable), so no session starts that no lifetime would count."""
    try:
        unix_port.micropython_binary()
    except FileNotFoundError:
        pytest.skip("MicroPython unix port not installed (make venv)")
    (tmp_path / soak.STATE_FILE).write_text("%d 1 1" % (7 * WH))  # the car plugged in, asking
    unix_port.scenarios.SCENARIOS["drain_test"] = {"doc": "a drain lifetime", "steps": soak.DRAIN_STEPS}
    r = unix_port.run_scenario("drain_test", config={"pile_id": "p", "meter": {"type": "ddsu666"}},
                            flash_dir=str(tmp_path))
    assert r.returncode == 0 and r.result is not None
    assert [text.split()[0] for _, text in r.sim_events("step")][:2] == ["persist", "unplug"]
    assert not r.firmware_events("session")  # the firmware never saw the car
    assert (tmp_path / soak.STATE_FILE).read_text() == "%d 0 0" % (7 * WH)
