"""Adversarial review of the memory cuts (ota_lazy.py, startup.drop_wiring): an updater that cannot be
imported, a trial it must not leave unwatched, a session, and Ctrl-C after wiring was dropped.

Findings:
- an `update` command whose import of ota.py fails (MemoryError on a fragmented heap, a damaged
  .mpy) raised out of the link's step: main's fail_safe, a reset for every such command. Now
  answered "failed" and the half-imported modules dropped (fixed).
- at the boot, work on flash (a download to resume, files to remove) and ota.py not importable:
  the raise out of the link's build reset the board, and the work was still there at the next
  boot: a reset loop. Now the pile runs with updates refused and says why; a trial release still
  raises (the reset rolls it back, it never runs unwatched) (fixed).
- after an OTA switch the root main.py (run as __main__, in boot.py's globals for the whole run)
  still held `wiring` from its top-level import: the release's drop_wiring freed nothing. The
  root drops its reference before release_boot.run_main (fixed).
- a refused download kept ota.py loaded for the rest of the run, through sessions
  (ota.Updater.quiet() was False while its "refused" state was to be shown): quiet() now allows
  it, and ota_lazy keeps the refusal's target and reason for the message and a reload (fixed).
"""
import json
import sys
import types

import pytest

import ota_lazy
from pilehost import ota_rig, release
from pilehost.ota_rig import BOARD, Broker

CMD = "c-review-1"


def _broken_load(calls):
    def load(*_args):
        calls.append(1)
        sys.modules["ota"] = types.ModuleType("ota")  # half imported when the heap ran out
        raise MemoryError("memory allocation failed, allocating 4096 bytes")

    return load


def _messages(conn):
    """The ota messages conn published, each checked against its schema."""
    from pilehost.cloud import schemas

    out = [json.loads(p) for t, p, _r in conn.out if t.endswith(b"/ota")]
    s = schemas()
    for m in out:
        s.check("ota", m)
    return out


@pytest.fixture
def no_ota(monkeypatch):
    monkeypatch.delitem(sys.modules, "ota", raising=False)
    monkeypatch.delitem(sys.modules, "release_boot", raising=False)


def test_an_update_whose_import_fails_is_answered_not_raised(flash, no_ota):
    calls = []
    u = ota_lazy.Updater("00", BOARD, 60, "0.1.0", lambda: None, load=_broken_load(calls),
                         surveyed=(0, None))
    pile = ota_rig.Pile()
    u.bind(pile, ota_rig.Topics(), 1, None, wall=lambda: 0)
    result, reason = u.start(0, CMD, 1)  # raised MemoryError into mqtt_link: fail_safe, reset
    assert calls and result == "failed" and "MemoryError" in reason
    assert not u.loaded and "ota" not in sys.modules  # the half import is not kept
    conn = ota_rig.Conn(Broker(), [])
    assert u.work(0, conn)
    m = _messages(conn)[-1]
    assert m["state"] == "refused" and "MemoryError" in m["reason"]
    pile.closed = True  # and during a session: refused without trying the import
    assert u.start(5, CMD, 1) == ("rejected", "not during a session") and len(calls) == 1


def test_a_later_update_loads_it_once_memory_is_back(flash, no_ota):
    calls = []
    broken = _broken_load(calls)
    u = ota_lazy.Updater(release.public_hex(ota_rig.release_key()), BOARD, 60, "0.1.0", lambda: None,
                         load=lambda *a: broken(*a) if not calls else ota_lazy._load(*a), surveyed=(0, None))
    u.bind(ota_rig.Pile(), ota_rig.Topics(), 1, None, wall=lambda: 0)
    assert u.start(0, CMD, 1)[0] == "failed"
    assert u.start(5, CMD, 0)[0] == "rejected"  # loaded this time: the real updater's answer
    assert not u.loaded and u.loads == 1


def _on_flash(trial, job):
    import files
    import release_boot

    state = release_boot.fresh()
    state.update(good=0, trial=trial, floor=trial or 0)
    release_boot.StateStore().save(state)
    if trial:
        import os

        os.makedirs("rel/%d" % trial)
        with open("rel/%d/main.mpy" % trial, "wb") as f:
            f.write(b"M")
    if job is not None:
        with open(files.OTA_JOB_FILE, "w") as f:
            json.dump({"release": job, "cmd": "c-1"}, f)
    sys.modules.pop("release_boot", None)


def test_work_on_flash_and_no_ota_at_the_boot_is_no_reset_loop(flash, no_ota):
    _on_flash(trial=None, job=3)  # a download to resume: survey() says load
    assert ota_lazy.survey() is None
    calls, said = [], []
    u = ota_lazy.Updater("00", BOARD, 60, "0.1.0", lambda: None, load=_broken_load(calls), surveyed=None)
    u.bind(ota_rig.Pile(), ota_rig.Topics(), 1, lambda now, what, text: said.append(text), wall=lambda: 0)
    assert calls and not u.loaded and any("updater not loaded" in t for t in said)
    assert "ota" not in sys.modules and "release_boot" not in sys.modules
    conn = ota_rig.Conn(Broker(), [])
    assert u.work(0, conn)
    m = _messages(conn)[-1]
    assert m["state"] == "refused" and m["release"] == 0 and "MemoryError" in m["reason"]


def test_a_trial_whose_updater_cannot_load_is_not_left_unwatched(flash, no_ota, monkeypatch):
    """Nobody would confirm it nor roll it back in this run: raising resets the board, and the
    next boot's release_boot.select() rolls it back (its try was counted)."""
    _on_flash(trial=2, job=None)
    monkeypatch.setattr(sys, "path", ["rel/2"] + sys.path)
    assert ota_lazy.survey() is None
    u = ota_lazy.Updater("00", BOARD, 60, "0.1.0", lambda: None, load=_broken_load([]), surveyed=None)
    with pytest.raises(MemoryError):
        u.bind(ota_rig.Pile(), ota_rig.Topics(), 1, None, wall=lambda: 0)
    assert "ota" not in sys.modules


def _refused_then_replayed(root, lazy):
    """In its own flash folder: update to 1 (nothing published: refused after the stalls), a new
    connection, a session, a replayed command, a new connection. What was sent, and the lazy
    updater's loads and loaded flags at each point."""
    import os

    os.makedirs(root)
    os.chdir(root)
    key = release.public_hex(ota_rig.release_key())
    b = ota_rig.Board(key)
    b.boot(Broker())
    seen = []
    if lazy:
        def load(key_hex, board, trial_s, version_, reset):
            return b.ota.Updater(b.ota.PublicKey(bytes.fromhex(key_hex)), board, trial_s, version_, reset)

        b.updater = ota_lazy.Updater(key, BOARD, 60, "0.1.0", b._reset, load=load, surveyed=(0, None))
        b.updater.bind(b.pile, ota_rig.Topics(), 1, None, wall=lambda: 0)
        b.updater.conn_up()
    assert b.updater.start(0, CMD, 1) == (None, None)
    now = ota_rig.run(b, 30000, until=lambda: any(a["cmd_id"] == CMD for a in b.acks()))
    now = ota_rig.run(b, 50, start_ms=now)
    seen.append(getattr(b.updater, "loaded", True))
    b.updater.conn_up()
    now = ota_rig.run(b, 5, start_ms=now)
    b.pile.closed = True  # a session
    seen.append(b.updater.start(now, "c-2", 2))
    seen.append(getattr(b.updater, "loaded", True))
    b.pile.closed = False
    seen.append(b.updater.start(now, "c-3", 0)[0])  # a replay: the real updater's answer
    b.updater.conn_up()
    ota_rig.run(b, 5, start_ms=now)
    seen.append(getattr(b.updater, "loaded", True))
    seen.append(getattr(b.updater, "loads", None))
    return b.acks(), _messages(b.conn), seen


def test_a_refused_download_does_not_keep_ota_loaded_through_sessions(flash):
    """Once a refusal's answer is out, ota.py is dropped; the `ota` messages (a new connection's
    too) are what an updater always loaded sends; a later command loads it again."""
    real = _refused_then_replayed(flash / "real", lazy=False)
    acks, messages, seen = _refused_then_replayed(flash / "lazy", lazy=True)
    assert real[0][0]["result"] == "failed" and acks == real[0] and messages == real[1]
    assert messages[-1]["state"] == "refused" and messages[-1]["target"] == 1
    assert seen == [False, ("rejected", "not during a session"), False, "rejected", False, 2]


# -- main.drop_wiring after an OTA switch: the root main.py still held wiring ---------------------

_RELEASE_MAIN = '''
import gc
import sys
import weakref

import wiring

FREED = []


def run():  # as main.run after its boot: drop_wiring
    global wiring
    gone = weakref.ref(sys.modules["wiring"])
    wiring = None
    sys.modules.pop("wiring", None)
    gc.collect()
    FREED.append(gone() is None)
'''


def test_a_release_run_frees_wiring_after_its_boot(flash, monkeypatch):
    """On the board the root main.py runs as __main__ (boot.py's globals) and hands a selected
    release to its own main.run() (release_boot.run_main). The root's top-level `import wiring`
    kept the module alive in __main__'s globals for the whole run: after any OTA switch the
    release's drop_wiring freed nothing (~6 KiB of bytecode on the heap)."""
    import os
    import runpy

    from pilehost import FIRMWARE

    os.makedirs("rel/1")
    with open("rel/1/main.py", "w") as f:
        f.write(_RELEASE_MAIN)
    for m in ("main", "wiring", "release_boot"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    monkeypatch.setattr(sys, "path", ["rel/1"] + sys.path)
    g = runpy.run_path(os.path.join(FIRMWARE, "main.py"), run_name="__main__")
    release_main = sys.modules["main"]
    assert release_main.__file__.endswith(os.path.join("rel", "1", "main.py"))
    assert release_main.FREED == [True], "the root main.py's globals keep wiring: %r" % g.get("wiring")


def test_ctrl_c_after_wiring_was_dropped_gets_service_mode_from_a_fresh_import(monkeypatch):
    """main.service() after startup.drop_wiring(): diag's timer and reset come from wiring
    imported again (not None, not the dropped module's): no finding, a guard."""
    import os
    import runpy

    import diag
    import startup
    from pilehost import FIRMWARE

    for m in ("main", "wiring"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    # main.py run as a module of another name (nothing imports main: test_firmware_layout.py);
    # its functions' globals are the module's own.
    ran = runpy.run_path(os.path.join(FIRMWARE, "main.py"), run_name="main_under_test")
    main = types.SimpleNamespace(service=ran["service"])
    assert "wiring" not in ran["service"].__globals__  # main.py holds none (its top-level del)
    old = sys.modules["wiring"]
    startup.drop_wiring()
    assert "wiring" not in sys.modules
    got = {}

    def service_mode(board, conf, ctl, link, wdt, start_timer, reset):
        got.update(start_timer=start_timer, reset=reset, ctl=ctl)

    monkeypatch.setattr(diag, "service_mode", service_mode)
    ctl = types.SimpleNamespace()
    main.service(None, None, ctl, None, None)
    fresh = sys.modules["wiring"]
    assert fresh is not old and got["start_timer"] is fresh.service_timer and got["reset"] is fresh.reset
    assert got["ctl"] is ctl
