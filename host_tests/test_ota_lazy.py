"""ota.py loaded only while it has work (firmware/ota_lazy.py, issue 12 item 3): a pile with
updates configured and none offered has neither ota.py nor release_boot.py on its heap; an update
loads them, runs as before (the same ota.Updater, test_ota.py) and drops them once quiet."""
import contextlib
import json
import sys

import pytest

import ota_lazy
from pilehost import ota_rig, release, unix_port
from pilehost.ota_rig import BOARD, Broker, Reset

CMD = "c-lazy-1"


class LazyBoard(ota_rig.Board):
    """ota_rig's board, its updater behind ota_lazy (a fresh ota.Updater at each load)."""

    def boot(self, broker, cause=ota_rig.Machine.PWRON_RESET):
        """As Board.boot; sys.path keeps the selected release while the updater loads (on the
        board it keeps it for the whole run: release_boot.selected() reads it)."""
        self.boots += 1
        self.machine.cause = cause
        self._saved_path = list(sys.path)
        self.running = self.rb.select(self.machine)
        self._release_path = list(sys.path)
        version = self.versions.get(self.running, "0.0.%d" % self.running)

        def load(key_hex, board, trial_s, version_, reset):
            key = self.ota.PublicKey(bytes.fromhex(key_hex))
            return self.ota.Updater(key, board, trial_s, version_, reset)

        with self.release_path():
            surveyed = ota_lazy.survey()  # as wiring.load_settings
        self.updater = ota_lazy.Updater(release.public_hex(ota_rig.release_key()), BOARD, self.trial_s,
                                        version, self._reset, load=load, surveyed=surveyed)
        self.conn = ota_rig.Conn(broker, self.sent)
        self.pile.closed = False
        with self.release_path():
            self.updater.bind(self.pile, ota_rig.Topics(), self.boots,
                              lambda now, what, text: self.reports.append(text), wall=lambda: 0)
        self.updater.conn_up()
        return self.running

    @contextlib.contextmanager
    def release_path(self):
        try:
            sys.path[:] = self._release_path
            yield
        finally:
            sys.path[:] = self._saved_path

    def step(self, now_ms):
        with self.release_path():
            super().step(now_ms)

    def start(self, now_ms, cmd, n):
        with self.release_path():
            return self.updater.start(now_ms, cmd, n)


def _published(n, version="0.2.0"):
    files = ota_rig.fake_files(version)
    manifest = release.sign_manifest(ota_rig.release_key(), n, version, [BOARD], files)
    return release.chunks(n, manifest, files)


def test_no_update_offered_nothing_loaded_and_the_ota_message_as_before(flash):
    b = LazyBoard(release.public_hex(ota_rig.release_key()))
    b.boot(Broker())
    assert not b.updater.loaded and b.updater.loads == 0  # the survey found nothing to do
    ota_rig.run(b, 20)
    real = ota_rig.Board(release.public_hex(ota_rig.release_key()))
    real.boot(Broker())
    ota_rig.run(real, 20)
    assert b.ota_messages() == real.ota_messages() and len(b.ota_messages()) == 1
    b.updater.conn_up()  # a new connection: the message again, still without loading
    ota_rig.run(b, 5)
    assert len(b.ota_messages()) == 2 and not b.updater.loaded


def test_an_update_loads_it_runs_as_before_and_it_is_dropped_once_good(flash):
    broker = Broker()
    broker.put(_published(1))
    b = LazyBoard(release.public_hex(ota_rig.release_key()))
    assert b.boot(broker) == 0 and not b.updater.loaded
    assert b.start(0, CMD, 1) == (None, None)
    assert b.updater.loaded
    ota_rig.run(b, 5000, until=lambda: any(a["cmd_id"] == CMD for a in b.acks()))
    assert b.acks()[-1]["result"] == "accepted"
    with pytest.raises(Reset):
        ota_rig.run(b, 10)
    assert b.pile.safe_offs == 1 and b.state()["trial"] == 1
    assert b.boot(broker) == 1
    assert b.updater.loaded  # a trial is watched
    ota_rig.run(b, 3000)
    s = b.state()
    assert (s["good"], s["trial"], s["floor"]) == (1, None, 1)
    assert not b.updater.loaded  # good, old releases removed: quiet again
    assert b.ota_messages()[-1]["state"] == "running" and b.ota_messages()[-1]["release"] == 1


def test_a_refused_command_leaves_nothing_loaded(flash):
    b = LazyBoard(release.public_hex(ota_rig.release_key()))
    b.boot(Broker())
    result, reason = b.start(0, CMD, 0)  # not above the floor
    assert result == "rejected" and "replayed" in reason
    assert not b.updater.loaded
    loads = b.updater.loads
    b.pile.closed = True
    assert b.start(0, CMD, 5) == ("rejected", "not during a session")
    assert not b.updater.loaded and not b.updater.idle()
    assert b.updater.loads == loads  # not even imported to say no: a session has no room for it


def test_a_session_with_updates_configured_has_no_ota_code_loaded():
    """On the 32-bit binary, as .mpy: OTA configured, no update offered (no broker at all)."""
    from pilehost import procs

    key = release.public_hex(ota_rig.release_key())
    config = {"meter": {"type": "ddsu666"}, "pile_id": "lazy-ota",
              "mqtt": {"host": "127.0.0.1", "port": procs.free_port(), "secret": "5a" * 32},
              "ota": {"key": key}}
    program = unix_port.unix32_binary() or unix_port.micropython_binary()
    r = unix_port.run_scenario("normal", config=config, heapsize="400k", exact_heap=True, program=program)
    assert r.returncode == 0 and r.result and r.result["boots"] == 1, "\n".join(r.lines[-20:])
    assert any("-> idle" in t for _, t in r.firmware_events("charger"))
    loaded = set(r.result["modules"])
    assert "ota_lazy" in loaded and "mqtt_link" in loaded
    assert "ota" not in loaded and "release_boot" not in loaded, sorted(loaded)
    assert not [x for x in r.lines if "Traceback" in x or "internal error" in x]
    json.dumps(r.result)  # a plain result


# -- survey(): the boot's look at the flash, without ota.py ---------------------------------------

def _flash_state(root, running, good, trial, floor, rolled, on_flash, job, garbled):
    import os

    import release_boot

    os.chdir(root)
    if garbled:
        with open(release_boot.STATE_FILE, "w") as f:
            f.write("{not json")
    else:
        state = release_boot.fresh()
        state.update(good=good, trial=trial, floor=floor,
                     rolled=None if rolled is None else {"release": rolled, "why": "no report within 30 s"})
        release_boot.StateStore().save(state)
    for n in on_flash:
        os.makedirs("rel/%d" % n, exist_ok=True)
        with open("rel/%d/main.mpy" % n, "wb") as f:
            f.write(b"M")
    if job is not None:
        import files

        with open(files.OTA_JOB_FILE, "w") as f:
            json.dump({"release": job, "cmd": "c-1"}, f)
    return ["rel/%d" % running] if running else []


def _surveys():
    from hypothesis import strategies as st

    n = st.integers(0, 4)
    return st.fixed_dictionaries({
        "running": n, "good": n, "trial": st.none() | n, "floor": n, "rolled": st.none() | n,
        "on_flash": st.lists(st.integers(1, 4), max_size=3, unique=True),
        "job": st.none() | n, "garbled": st.booleans()})


def test_survey_never_misses_the_work_a_bound_updater_finds():
    """survey() repeats ota.Updater.bind's cases without ota.py: on every flash state it never
    misses work the real updater finds, and where it finds none it gives the same message."""
    import os
    import tempfile

    from hypothesis import HealthCheck, example, given, settings

    import ota

    base = {"running": 0, "good": 0, "trial": None, "floor": 0, "rolled": None, "on_flash": [],
            "job": None, "garbled": False}

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_surveys())
    @example(base)  # a new pile
    @example(dict(base, running=2, good=2, floor=2, on_flash=[2]))  # a good release
    @example(dict(base, good=0, floor=2, rolled=2, on_flash=[2]))  # rolled back, its files left
    @example(dict(base, running=2, good=2, floor=3, on_flash=[2, 3]))  # a refused one's files
    @example(dict(base, running=2, good=2, trial=2, floor=2, on_flash=[2]))  # on trial
    @example(dict(base, job=3, floor=2))  # a download to resume
    def check(case):
        cwd, path = os.getcwd(), list(sys.path)
        with tempfile.TemporaryDirectory() as root:
            try:
                sys.path[:0] = _flash_state(root, **case)
                known = ota_lazy.survey()
                u = ota.Updater(ota.PublicKey(bytes.fromhex(release.public_hex(ota_rig.release_key()))),
                                BOARD, 60, "0.1.0", lambda: None)
                u.bind(ota_rig.Pile(), ota_rig.Topics(), 1, None, wall=lambda: 0)
                # Never "no work" where there is some; the other way round it only loads ota.py
                # for nothing (a job file the updater would not take, say): dropped once bound.
                assert known is None or u.quiet(), (case, known, u.state, u._prune, u._phase)
                if not case["garbled"] and case["job"] is None:  # without those: exactly
                    assert (known is None) == (not u.quiet()), (case, known)
                if known is not None:
                    assert known[0] == u.running
                    lazy = ota_lazy.Updater("00", BOARD, 60, "0.1.0", lambda: None, surveyed=known)
                    lazy.bind(ota_rig.Pile(), ota_rig.Topics(), 1, None, wall=lambda: 0)
                    mine, real = ota_rig.Conn(Broker(), []), ota_rig.Conn(Broker(), [])
                    assert lazy.work(0, mine) and u.work(0, real)
                    assert mine.out == real.out and not lazy.loaded and lazy.loads == 0
            finally:
                os.chdir(cwd)
                sys.path[:] = path

    check()
