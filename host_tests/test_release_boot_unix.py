"""Stage one of the boot on the real MicroPython unix port (both binaries: conftest unix_binary):
the real boot.py and release_boot.recover() when modules the root main.py imports cannot be
imported (docs/ota.md, "Stage one").

Before, the root main.py imported console, wiring and version itself, first thing: a release
that had passed its trial and was damaged later (a flash error, a file gone), or a factory
firmware whose files were, stopped main.py at the REPL, without a watchdog: safe (boot.py had
opened the contactor) but dead until a technician came. Now stage one imports them: a release
that fails is given up at once, and the previous good release or the factory firmware runs in
the same boot; if even the factory firmware fails, a few resets (counted on flash), then the
pile is held safe, saying why, and never reset-loops.

The flash here: the real release_boot.py, session_store.py and durable.py at the root, and small
stand-ins for console, wiring (which imports charger), version and a release's main, each
either sound or damaged (raises at import, does not compile, or is missing: a release's missing
module is the root's, as on the board's sys.path; a missing main is the release's main.mpy that
is not bytecode); and for what main.run() imports later in the boot (release_boot.checks(): for
this config.json config.py, wiring_link.py and the safety core's modules), which stage one
imports and drops again: config and wiring_link damaged too."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pilehost import FIRMWARE, firmware_module, unix_port
from pilehost.source_imports import import_time_imports

MODULES = ("console", "wiring", "charger", "version", "config", "wiring_link")  # wiring imports charger
CONFIG = {"pile_id": "boot-1", "meter": {"type": "ddsu666"}}  # the flash's config.json
RELEASE_MODULES = MODULES + ("main",)
KINDS = ("raises", "syntax", "missing")
BOOT_RETRIES = 3  # release_boot._BOOT_RETRIES

HARNESS = r'''
import json
import sys

sys.path[:] = [""]  # the board's root first; select() puts a release before it


class Reset(BaseException):
    pass


class Held(BaseException):
    pass


class Clock:
    # time for release_boot: a virtual clock, so that a 60 s hold takes no time
    def __init__(self):
        self.t = 0

    def ticks_ms(self):
        return self.t

    def ticks_diff(self, a, b):
        return a - b

    def sleep_ms(self, ms):
        self.t += ms


class WDT:
    def __init__(self, timeout):
        self.timeout = timeout
        self.fed = 0

    def feed(self):
        self.fed += 1


pins = {}  # "pin value": how many times boot.py drove that output so
driven = [0]


class Pin:
    OUT = 1

    def __init__(self, pin, mode=None, value=None):
        key = "%d %d" % (pin, value)
        pins[key] = pins.get(key, 0) + 1
        driven[0] += 1
        if driven[0] > HOLD_PINS:
            raise Held()


class Machine:
    PWRON_RESET, HARD_RESET, WDT_RESET, SOFT_RESET = 1, 2, 3, 5
    Pin = Pin

    def __init__(self):
        self.wdt = None

    def reset_cause(self):
        return CAUSE

    def WDT(self, timeout):
        self.wdt = WDT(timeout)
        return self.wdt

    def reset(self):
        raise Reset()


machine = Machine()
sys.modules["machine"] = machine
sys.modules["time"] = Clock()
out = {}
try:
    import boot  # the real one: the board's first file

    import console  # then the root main.py's imports: from what stage one loaded
    import version
    import wiring

    import gc

    gc.collect()
    out["alloc"] = gc.mem_alloc()
    out["loaded"] = sorted(sys.modules)
    out["outcome"] = "runs"
    out["run"] = boot._run
    out["origins"] = {"console": console.ORIGIN, "wiring": wiring.ORIGIN, "charger": wiring.CHARGER,
                      "version": version.ORIGIN}
    if boot._run:
        out["origins"]["main"] = sys.modules["main"].ORIGIN
    out["path"] = [p for p in sys.path if p]
except Reset:
    out["outcome"] = "reset"
except Held:
    out["outcome"] = "held"
out["pins"] = [[int(x) for x in k.split()] for k in pins]
out["driven"] = driven[0]
out["fed"] = machine.wdt.fed if machine.wdt else None
out["clock_ms"] = sys.modules["time"].t
print("BOOT " + json.dumps(out))
'''

BOARD = {"pins": {"contactor": 25, "pilot_pwm": 26}, "levels": {"contactor_on": 1}}
SAFE = {(25, 0), (26, 1)}  # contactor open, pilot at steady +12 V
HOLD_PINS = 20000  # outputs driven before the harness calls a hold endless (a 60 s hold: ~1,200)


def _source(place, module, kind):
    if kind == "raises":
        return "raise OSError(5)  # EIO: the flash read failed\n"
    if kind == "syntax":
        return "def (:\n"
    text = "ORIGIN = %r\n" % place
    if module == "wiring":
        text += "import charger\n\nCHARGER = charger.ORIGIN\n"
    return text


def checked():
    """The modules stage one imports and drops again for CONFIG (release_boot.checks())."""
    rb = firmware_module("release_boot")
    return [m for group in rb.boot_imports(CONFIG) for m in group]


def later_only():
    """Checked, and loaded by nothing that stays: gone after the boot."""
    return [m for m in checked() if m not in MODULES[:4] + ("release_boot", "session_store", "durable")]


def make_flash(folder, damage, state):
    """damage: {(place, module): kind}; place '' (the root) or 'rel/<n>'."""
    for name in ("boot", "release_boot", "session_store", "durable", "files"):
        shutil.copy(os.path.join(FIRMWARE, name + ".py"), os.path.join(folder, name + ".py"))
    with open(os.path.join(folder, "board.json"), "w") as f:
        json.dump(BOARD, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    for module in set(later_only()) - set(MODULES):  # sound, at the root; config and wiring_link below
        with open(os.path.join(folder, module + ".py"), "w") as f:
            f.write(_source("root", module, None))
    for place, modules in (("", MODULES), ("rel/2", RELEASE_MODULES), ("rel/3", RELEASE_MODULES)):
        d = os.path.join(folder, place)
        os.makedirs(d, exist_ok=True)
        if place:
            with open(os.path.join(d, "main.mpy"), "wb") as f:  # present(); not bytecode
                f.write(b"not bytecode")
        for module in modules:
            kind = damage.get((place, module))
            if kind == "missing":
                continue
            with open(os.path.join(d, module + ".py"), "w") as f:
                f.write(_source(place or "root", module, kind))
    _state(folder, lambda rb: rb.StateStore().save(state))


def _state(folder, fn):
    rb = firmware_module("release_boot")
    here = os.getcwd()
    os.chdir(folder)
    try:
        return fn(rb)
    finally:
        os.chdir(here)


def boot(folder, cause=1):
    """One boot: boot.py, then the root main.py's imports. Its outcome dict and console."""
    with open(os.path.join(folder, "harness.py"), "w") as f:
        f.write("CAUSE = %d\nHOLD_PINS = %d\n" % (cause, HOLD_PINS) + HARNESS)
    env = dict(os.environ)
    env.pop("MICROPYPATH", None)
    r = subprocess.run([unix_port.micropython_binary(), "-X", "heapsize=256k", "harness.py"], cwd=folder,
                       env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stdout.splitlines() if line.startswith("BOOT ")]
    assert r.returncode == 0 and lines, "the boot stopped at the REPL:\n%s\n%s" % (r.stdout, r.stderr)
    return json.loads(lines[-1][5:]), r.stdout


def resolves(place, module, damage):
    """Where `module` comes from with `place` first on sys.path, and whether it imports."""
    for where in ([place] if place else []) + [""]:
        kind = damage.get((where, module))
        if kind == "missing":
            if module == "main" and where:
                return where, False  # main.mpy is there, and is not bytecode
            continue
        return where, kind is None
    return None, False


def importable(place, damage):
    names = ("console", "wiring", "version") + (("main",) if place else ()) + ("config", "wiring_link")
    for name in names:
        where, ok = resolves(place, name, damage)
        if not ok:
            return False
        if name == "wiring" and not resolves(place, "charger", damage)[1]:
            return False
    return True


def _check_run(out, damage):
    place = "rel/%d" % out["run"] if out["run"] else ""
    assert importable(place, damage), out
    for name, origin in out["origins"].items():
        where, _ok = resolves(place, name, damage)
        assert origin == (where or "root"), (name, origin, out)
    assert not set(later_only()) & set(out["loaded"]), out["loaded"]  # checked, then dropped


PLACES = [("", m) for m in MODULES] + [("rel/%d" % n, m) for n in (2, 3) for m in RELEASE_MODULES]
DAMAGE = st.dictionaries(st.sampled_from(PLACES), st.sampled_from(KINDS), max_size=4)
STATES = st.sampled_from([
    {"good": 0, "floor": 3},
    {"good": 2, "floor": 3},
    {"good": 3, "floor": 3},
    {"good": 2, "trial": 3, "tries": 0, "floor": 3},
    {"good": 0, "trial": 3, "tries": 0, "floor": 3},
])


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=DAMAGE, initial=STATES)
@example(damage={("rel/2", "wiring"): "raises"}, initial={"good": 2, "floor": 3})
@example(damage={("rel/3", "charger"): "syntax"}, initial={"good": 2, "trial": 3, "tries": 0, "floor": 3})
@example(damage={("", "console"): "raises"}, initial={"good": 0, "floor": 3})
@example(damage={("", "wiring"): "missing", ("rel/2", "main"): "missing"}, initial={"good": 2, "floor": 3})
@example(damage={("rel/2", "wiring_link"): "raises"}, initial={"good": 2, "floor": 3})
@example(damage={("rel/3", "config"): "syntax", ("rel/2", "wiring_link"): "raises"},
         initial={"good": 2, "trial": 3, "tries": 0, "floor": 3})
@example(damage={("", "wiring_link"): "raises"}, initial={"good": 0, "floor": 3})
def test_a_module_that_does_not_import_never_leaves_the_pile_dead_or_reset_looping(
        unix_binary, damage, initial):
    """Whichever modules are damaged where, at every boot: the first of (the trial, the good
    release, the factory firmware) that imports runs, in that boot; the ones before it are
    given up on flash, saying why, and not run again; with nothing importable, at most
    BOOT_RETRIES resets in a row, then held safe; never the REPL."""
    state = firmware_module("release_boot").fresh()
    state.update(initial)
    with tempfile.TemporaryDirectory(prefix="pile-boot-") as folder:
        make_flash(folder, damage, state)
        outcomes = []
        cause = 1
        for _ in range(BOOT_RETRIES + 3):
            before = _state(folder, lambda rb: rb.StateStore().load())
            chain = _chain(before)
            expect = next((n for n in chain if importable("rel/%d" % n if n else "", damage)), None)
            out, console = boot(folder, cause)
            outcomes.append(out["outcome"])
            assert set(map(tuple, out["pins"])) <= SAFE, out["pins"]  # the contactor never closes
            after = _state(folder, lambda rb: rb.StateStore().load())
            if expect is not None:
                assert out["outcome"] == "runs" and out["run"] == expect, (expect, out, console)
                _check_run(out, damage)
                assert after["stuck"] == 0
                given_up = chain[:chain.index(expect)]
            else:
                want = "reset" if before["stuck"] < BOOT_RETRIES else "held"
                assert out["outcome"] == want, (out, console)
                given_up = chain[:-1]
            for n in given_up:  # never selected again, and the state says why
                assert n not in (after["good"], after["trial"]), (n, after)
            if given_up:
                assert after["rolled"]["release"] == given_up[-1], after
                assert "failed to import" in after["rolled"]["why"], after
            cause = 5 if out["outcome"] == "reset" else 1  # a reset, or the power goes
        run = max(len(r) for r in "".join("r" if o == "reset" else "." for o in outcomes).split("."))
        assert run <= BOOT_RETRIES, outcomes


def _chain(state):
    """What stage one tries, in order: select()'s choice, then the way back."""
    chain = []
    if state["trial"] is not None and state["tries"] < 1:  # release_boot._TRIAL_TRIES
        chain.append(state["trial"])
    if state["good"]:
        chain.append(state["good"])
    return chain + [0]


def test_a_held_pile_keeps_its_outputs_safe_and_comes_back_once_repaired(unix_binary, tmp_path):
    """Nothing importable: each retry boot holds the outputs safe for 60 s (boot.py's
    keep_safe, re-asserted) before its reset; then held for good; a technician repairs the
    files: the next boot runs and the count starts again."""
    folder = str(tmp_path)
    state = firmware_module("release_boot").fresh()
    make_flash(folder, {("", "wiring"): "raises"}, state)
    for i in range(BOOT_RETRIES):
        out, console = boot(folder)
        assert out["outcome"] == "reset" and out["clock_ms"] >= 60000, (out["outcome"], console)
        assert out["driven"] > 1000 and set(map(tuple, out["pins"])) == SAFE
        assert "held safe, reset in 60 s (%d of %d)" % (i + 1, BOOT_RETRIES) in console
    out, console = boot(folder)
    assert out["outcome"] == "held" and "until a technician comes" in console, console
    assert "wiring" in console and "OSError" in console
    assert set(map(tuple, out["pins"])) == SAFE
    with open(os.path.join(folder, "wiring.py"), "w") as f:
        f.write(_source("root", "wiring", None))
    out, _ = boot(folder)
    assert out["outcome"] == "runs" and out["run"] == 0
    assert _state(folder, lambda rb: rb.StateStore().load())["stuck"] == 0


def test_a_held_trial_boot_feeds_the_trials_watchdog(unix_binary, tmp_path):
    """A trial boots under a 60 s watchdog (select()). When neither it nor the factory firmware
    imports, the hold must feed that watchdog: else it resets the board every 60 s, for ever."""
    folder = str(tmp_path)
    state = firmware_module("release_boot").fresh()
    state.update(good=0, trial=3, tries=0, floor=3)
    make_flash(folder, {("rel/3", "main"): "raises", ("", "console"): "syntax"}, state)
    out, console = boot(folder)
    assert out["outcome"] == "reset" and out["fed"] and out["fed"] >= 500, (out["fed"], console)
    after = _state(folder, lambda rb: rb.StateStore().load())
    assert after["trial"] is None and after["rolled"]["release"] == 3 and after["stuck"] == 1


def test_boot_py_hands_its_keep_safe_to_stage_one():
    """boot.py gives recover() the function that drives the contactor open and the pilot idle,
    and the trial's watchdog: the hold of a pile with nothing to run re-asserts the outputs."""
    with open(os.path.join(FIRMWARE, "boot.py")) as f:
        text = f.read()
    assert "_rb.recover(_run, _why, _loaded, machine, _keep_safe, _wdt)" in text


def test_stage_one_imports_what_the_root_main_py_imports():
    """MAIN_IMPORTS must cover the root main.py's top-level firmware imports: one left out would
    fail in main.py, at the REPL again."""

    rb = firmware_module("release_boot")
    firmware = {os.path.basename(p)[:-3] for p in os.listdir(FIRMWARE) if p.endswith(".py")}
    top = import_time_imports(os.path.join(FIRMWARE, "main.py"))
    assert top & firmware <= set(rb.MAIN_IMPORTS), top & firmware


@pytest.mark.parametrize("gone", ["console", "wiring"])
def test_a_good_release_without_a_module_of_its_own_runs_the_roots(unix_binary, tmp_path, gone):
    """A release's module missing from its directory is found at the root (sys.path order, as on
    the board): the release still runs. A check that this stays so (no false alarm)."""
    folder = str(tmp_path)
    state = firmware_module("release_boot").fresh()
    state.update(good=2, floor=2)
    make_flash(folder, {("rel/2", gone): "missing"}, state)
    out, _ = boot(folder)
    assert out["outcome"] == "runs" and out["run"] == 2 and out["origins"][gone] == "root"


BIG_B = 60000  # a checked module's stand-in that holds this much: seen if it stays on the heap


@pytest.mark.parametrize("module", ["wiring_link", "config", "controller"])
def test_what_the_check_imports_leaves_nothing_on_the_heap(unix_binary, tmp_path, module):
    """Stage one imports what main.run() imports later (wiring_link, config, the safety core)
    and drops it again, a group at a time: no reference to the module is left (boot.py's loop
    variables, the drop, the collector's conservative scan of the stack), so the heap after the
    boot is what MAIN_IMPORTS hold. A stand-in holding 60 KB at module level shows it."""
    sizes = {}
    for big in (False, True):
        folder = str(tmp_path / ("big" if big else "small"))
        os.makedirs(folder)
        state = firmware_module("release_boot").fresh()
        state.update(good=2, floor=2)
        make_flash(folder, {}, state)
        if big:
            for place in ("", "rel/2"):
                path = os.path.join(folder, place, module + ".py")
                if os.path.exists(path):
                    with open(path, "a") as f:
                        f.write("BIG = bytearray(%d)\n" % BIG_B)
        out, console = boot(folder)
        assert out["outcome"] == "runs" and out["run"] == 2, console
        assert module not in out["loaded"]
        sizes[big] = out["alloc"]
    assert sizes[True] - sizes[False] < BIG_B // 10, sizes


def test_the_way_back_imports_the_roots_session_store_not_a_releases(unix_binary, tmp_path):
    """The check imports the release's session_store (the safety core's group), then a module
    after it in the group fails. The way back, the root's release_boot, must not find the
    release's session_store in sys.modules (stage one's code is never the release's)."""
    folder = str(tmp_path)
    state = firmware_module("release_boot").fresh()
    state.update(good=2, floor=2)
    make_flash(folder, {}, state)
    group = next(g for g in firmware_module("release_boot").boot_imports(CONFIG) if "session_store" in g)
    after = group[group.index("session_store") + 1]
    with open(os.path.join(folder, "rel/2/session_store.py"), "w") as f:
        f.write("ORIGIN = 'rel/2'\n\n\nclass _Store:\n    pass\n")  # imports; no _load, _save
    with open(os.path.join(folder, "rel/2", after + ".py"), "w") as f:
        f.write(_source("rel/2", after, "raises"))
    out, console = boot(folder)
    assert out["outcome"] == "runs" and out["run"] == 0, console
    assert "recovery failed" not in console, console
    after_state = _state(folder, lambda rb: rb.StateStore().load())
    assert after_state["good"] == 0 and after_state["rolled"]["release"] == 2, after_state
    assert after_state["rolled"]["why"].startswith("failed to import: %s: OSError" % after), after_state
