"""Stage one of every boot (docs/ota.md): which release runs, its trial, and the way back.

Factory-installed beside boot.py and never replaced over the air (a release's copy is not run
by boot.py), so a broken release cannot break the way back. boot.py calls select(), which puts
the release to run first on sys.path, drops this module, then imports checks() (dropped again)
and MAIN_IMPORTS itself (one that cannot be imported would reset-loop inside main.run() or stop
main.py at the REPL, without a watchdog); when one fails, or
a count of failed boots is to be cleared, it imports this module again and calls recover(). The
root main.py hands over with run_main().

The state is one small file, release.json, in session_store's format (CRC + JSON, written to a
temp file and renamed: a power cut leaves the old state or the new, never half):

    {"good": g, "trial": t or null, "tries": k, "floor": f, "rolled": null or {"release": t, "why": "..."},
     "stuck": s}

g = 0 is the factory firmware at the root; a release n lives in rel/<n>/ (its lib/ inside).
`floor`: the highest release ever switched to; a manifest at or below it is a replay.
`stuck`: boots in a row in which not even the factory firmware could be imported.
"""
import gc
import json
import os
import sys
import time

from micropython import const

import session_store

STATE_FILE = "release.json"  # not files.py: boot.py loads nothing a release would share
_REL_DIR = const("rel")
_TRIAL_TRIES = const(1)  # boots a trial release gets; the next boot goes back
# A trial boot runs under this watchdog until main.py sets its own: a release that hangs, or
# holds the pile unavailable before its control loop, is reset and then rolled back.
_TRIAL_WDT_MS = const(60000)
ENTRY = "main.mpy"  # a release without it is not a release
# Loaded by boot.py to select the release, dropped again: the release imports its own copies.
_OWN = const(("release_boot", "session_store", "durable"))
# What the root main.py imports before anything can catch an error (host_tests check the list
# against main.py); a release's own main comes last.
MAIN_IMPORTS = ("console", "wiring", "version")
# What main.run() imports later in the boot (wiring.py's and wiring_link.py's imports inside
# functions, by config.json's sections): one that does not import fails inside run() (fail_safe,
# a reset) at every boot, where nothing rolls a good release back. boot.py imports them before
# MAIN_IMPORTS, a group at a time, each group dropped again before the next: the boot's two
# phases never hold them together either, so the heap's peak and what stays on it do not grow.
_METERS = {"ddsu666": "modbus_meter", "sdm120": "modbus_meter", "sdm630": "modbus_meter",
           "dlt645": "dlt645", "s0": "s0_meter"}
# Nothing importable, not even the factory firmware (its flash damaged): held safe this long,
# then a reset, at most _BOOT_RETRIES boots in a row; then held safe until a technician comes.
_BOOT_RETRIES = const(3)
_BOOT_RETRY_MS = const(60000)
_SAY_MS = const(60000)  # the hold repeats why on the console this often


def checks(path=None):
    """boot.py's groups of boot_imports() for the pile's config.json (path: files.py's, the
    selected release's; a damaged files.mpy fails MAIN_IMPORTS' check anyway). Unreadable: the
    hand-over's and config.py only (the boot stops there, the pile held unavailable: no reset)."""
    had = "files" in sys.modules
    try:
        if path is None:
            import files

            path = files.CONFIG_FILE
        with open(path) as f:
            conf = json.load(f)
        return boot_imports(conf)
    except Exception:  # noqa: BLE001 - config.py reports what is wrong with the file
        return (("release_boot",), ("config",))
    finally:
        if not had:
            sys.modules.pop("files", None)  # the release imports it again, after the checks


def boot_imports(conf):
    """The groups main.run()'s boot imports inside functions for this config.json (a dict):
    only those (a module imported for nothing would leave its names on the heap), as wiring.py's
    load_settings, build and wiring_link.py's build_* import them."""
    # The root main.py's hand-over imports the selected release's release_boot (run_main).
    groups = [("release_boot",), ("config",)]  # type: list[tuple[str, ...]]
    linked = type(conf.get("mqtt")) is dict and conf.get("pile_id") is not None
    if conf.get("ota") is not None and conf.get("mqtt") is not None:
        groups.append(("ota_lazy",))  # survey() at the settings, the updater's at the link's build
    core = ["startup", "charger", "charger_restore", "controller", "flash_gate", "pilot", "relay",
            "session_record", "session_store"]
    if conf.get("pile_id") is not None:
        core += ["journal", "journal_scan", "session_log", "session_restore"]
    meter = conf.get("meter")
    kind = meter.get("type") if type(meter) is dict else None
    if type(kind) is str and kind in _METERS:
        core += [_METERS[kind], "meter_setup"]  # the driver, and what makes it (then dropped)
        if kind in ("s0", "dlt645"):  # their own (meter_setup.py makes the Modbus ones)
            core.append(kind + "_setup")
    groups.append(tuple(core))
    link = ["wiring_link"]
    if linked:
        # The last three: the link's build (link_reset: heal.json's read, then dropped again).
        link += ["link_heal", "mqtt_link", "link_setup", "netaddr", "link_reset"]
        mqtt = conf["mqtt"]
        if mqtt.get("tls_ca") is not None:
            link.append("link_tls")
        if mqtt.get("secret") is not None:
            link += ["command_auth", "commands"]
    if conf.get("wifi") is not None:
        link.append("wifi")
    if conf.get("ntp") is not None:
        link.append("sntp")
    groups.append(tuple(link))
    return tuple(groups)


def rel_path(n):
    return "%s/%d" % (_REL_DIR, n)


def fresh():
    return {"good": 0, "trial": None, "tries": 0, "floor": 0, "rolled": None, "stuck": 0}


class StateStore(session_store._Store):
    """release.json: load() -> the state dict (fresh() when there is none), or None if garbled."""

    def __init__(self, path=STATE_FILE):
        super().__init__(path)

    def load(self):
        found, value = self._load("release state")
        if not found:
            return fresh()
        if value is None:
            return None
        state = fresh()
        for key in state:
            if key in value:
                state[key] = value[key]
        if not _state_ok(state):
            self.error = "release state garbled (bad values), ignored"
            return None
        return state

    def save(self, state):
        return self._save(state)


def _is_n(v):
    return type(v) is int and 0 <= v < 0x80000000


def _state_ok(s):
    return _is_n(s["good"]) and _is_n(s["floor"]) and _is_n(s["tries"]) and _is_n(s["stuck"]) and (
        s["trial"] is None or _is_n(s["trial"]) and s["trial"] > 0) and (
        s["rolled"] is None or type(s["rolled"]) is dict)


def present(n):
    """The release's entry module is on flash (cheap; its files were verified before the switch)."""
    try:
        os.stat(rel_path(n) + "/" + ENTRY)
        return True
    except OSError:
        return False


def releases_on_flash():
    try:
        names = os.listdir(_REL_DIR)
    except OSError:
        return []
    return [int(name) for name in names if name.isdigit()]


def _cause_text(machine):
    try:
        cause = machine.reset_cause()
    except Exception:  # noqa: BLE001 - no machine, or a port without it: the trial failed all the same
        return "reset"
    if cause == machine.WDT_RESET:
        return "watchdog reset"
    if cause == machine.PWRON_RESET:
        return "power cut"
    return "crash or reset"


def select(machine=None, store=None):
    """Puts the release to run first on sys.path (its lib/ second); returns its number, 0 for
    the factory firmware. A trial release gets _TRIAL_TRIES boots, counted on flash before it
    runs; after that the good release runs again and the state says why."""
    global trial_wdt, stuck_seen
    _no_release_path()  # a soft reset keeps sys.path
    trial_wdt = None
    store = store or StateStore()
    state = store.load()
    stuck_seen = state is not None and state["stuck"] > 0
    if state is None:
        # Never written half (temp + rename): a bit flip. The factory firmware is good by
        # definition; the floor stays above every release on flash (no replay window).
        print("boot: %s: the factory firmware runs" % store.error)
        state = fresh()
        state["floor"] = max([0] + releases_on_flash())
        try:
            store.save(state)
        except OSError:
            pass
        return 0
    run = state["good"]
    trial = state["trial"]
    if trial is not None:
        if state["tries"] >= _TRIAL_TRIES:
            state["rolled"] = {"release": trial, "why": "%s during the trial" % _cause_text(machine)}
            state["trial"] = None
            state["tries"] = 0
            _save(store, state)
            print("boot: release %d failed its trial, back to %d" % (trial, run))
        else:
            state["tries"] += 1
            # Counted before it runs: if this write fails, the trial does not run at all.
            if _save(store, state) and present(trial):
                run = trial
                if machine is not None:
                    trial_wdt = machine.WDT(timeout=_TRIAL_WDT_MS)
    if run and not present(run):
        print("boot: release %d not on flash: the factory firmware runs" % run)
        run = 0
    _use(run)
    return run


def _use(run):
    """Release run (0: the factory firmware) first on sys.path, its lib/ second."""
    if run:
        sys.path.insert(0, rel_path(run) + "/lib")
        sys.path.insert(0, rel_path(run))


trial_wdt = None  # select()'s watchdog for a trial, fed while recover() holds the pile
stuck_seen = False  # select() found failed boots counted: recover() clears them once one imports


def _no_release_path():
    for p in [p for p in sys.path if p.startswith(_REL_DIR + "/")]:
        sys.path.remove(p)


def recover(run, why, loaded, machine=None, keep_safe=None, wdt=None, store=None,
            retry_ms=_BOOT_RETRY_MS):
    """boot.py's call when release `run` (0: the factory firmware) did not import (why: which
    module and its error; None: it did, and stuck_seen asked for the count to be cleared).
    loaded: sys.modules' names before boot.py's imports; the rest is dropped. The release is
    given up at once (a trial: rolled back; the good one: the factory firmware becomes good),
    and the good release or the factory firmware is imported instead, in this boot, its modules
    kept for main.py. When the factory firmware's fail too: held safe (keep_safe() asserts the
    contactor open and the pilot idle; the trial's watchdog `wdt` fed) retry_ms, then a reset,
    at most _BOOT_RETRIES boots in a row; after that held safe for good, saying why (Ctrl-C: the
    REPL for a technician). Returns the release that runs."""
    for name in _OWN:  # this module and its imports are the root's: the release imports its own
        sys.modules.pop(name, None)
    store = store or StateStore()
    if why is not None:
        _drop(loaded)
    while why is not None and run:
        _give_up(store, run, "failed to import: " + why, trial_too=True)
        state = store.load()
        back = 0 if state is None or state["good"] == run or not present(state["good"]) else state["good"]
        print("boot: release %d does not start (%s): %s runs" % (
            run, why, "release %d" % back if back else "the factory firmware"))
        _no_release_path()
        _use(back)
        run = back
        why = _import_main(run, loaded)
    state = store.load()
    if why is None:
        if state is not None and state["stuck"]:
            state["stuck"] = 0
            _save(store, state)
        return run
    print("boot: the factory firmware does not start: %s" % why)
    if state is not None and state["stuck"] < _BOOT_RETRIES:
        state["stuck"] += 1
        if _save(store, state):  # counted first: no reset that the next boot would not see
            print("boot: held safe, reset in %d s (%d of %d)" % (retry_ms // 1000, state["stuck"],
                                                                 _BOOT_RETRIES))
            _hold(keep_safe, wdt, retry_ms)
            if machine is not None:
                machine.reset()
    print("boot: held safe (contactor open) until a technician comes: %s" % why)
    while True:
        _hold(keep_safe, wdt, _SAY_MS)
        print("boot: held safe: %s" % why)


def _drop(loaded):
    """Every module loaded since `loaded` (sys.modules' names then) is dropped."""
    for name in list(sys.modules):
        if name not in loaded:
            del sys.modules[name]
    gc.collect()


def _import_main(run, loaded):
    """As boot.py: None, or why checks() (imported and dropped, a group at a time), MAIN_IMPORTS
    or a release's main cannot be imported; then what loaded meanwhile is dropped again. (A
    hand-over like run_main's: by name, not an import of this module's.)"""
    name = None
    try:
        for group in checks():
            for name in group:
                __import__(name)
            _drop(loaded)
        for name in MAIN_IMPORTS + (("main",) if run else ()):
            __import__(name)
        return None
    except Exception as e:  # noqa: BLE001 - whatever a damaged module raises at import
        _drop(loaded)
        return why_text(name, e)


def why_text(name, e):
    return "%s: %s" % (name, repr(e)[:80])


def _hold(keep_safe, wdt, ms):
    """ms of the safe state: outputs asserted, the trial's watchdog (if any) fed."""
    start_ms = time.ticks_ms()
    while time.ticks_diff(time.ticks_ms(), start_ms) < ms:
        if keep_safe is not None:
            keep_safe()
        if wdt is not None:
            wdt.feed()
        time.sleep_ms(100)


def _save(store, state):
    try:
        store.save(state)
        return True
    except OSError as e:
        print("boot: release state not written (%s)" % e)
        return False


def selected():
    """The release on sys.path (select() put it there), or 0."""
    for p in sys.path:
        if p.startswith(_REL_DIR + "/") and not p.endswith("/lib"):
            return int(p[len(_REL_DIR) + 1:])
    return 0


def run_main(own_run, reset):
    """The root main.py's last line: the selected release's main.run(), else own_run(). A
    release that cannot even be imported, or whose run() raises, resets the board (then it is
    rolled back), rather than leaving it at the REPL. A good release that fails so (its files
    damaged since its trial) would fail at every boot: the factory firmware is made the good
    one, and the state says why."""
    n = selected()
    if not n:
        own_run()
        return
    try:
        import main  # the release's: its directory is first on sys.path

        main.run()
    except Exception as e:  # noqa: BLE001 - whatever a broken release raises
        print("boot: the release failed:", repr(e))
        try:
            _give_up(StateStore(), n, "failed to start: " + repr(e))
        except Exception as e2:  # noqa: BLE001 - the reset below comes first
            print("boot: release state not updated:", repr(e2))
        reset()


def _give_up(store, n, why, trial_too=False):
    """Release n, the good one, cannot start: back to the factory firmware (a trial is rolled
    back by the next boot anyway, or here with trial_too). The floor stays: n is not taken
    again, n + 1 may be."""
    state = store.load()
    if state is None:
        return
    if trial_too and state["trial"] == n:
        state["trial"] = None
        state["tries"] = 0
    elif state["trial"] is not None or state["good"] != n:
        return
    else:
        state["good"] = 0
    state["rolled"] = {"release": n, "why": why[:100]}
    _save(store, state)
