# Runs first after every reset: contactor open and pilot at steady +12 V (no PWM), before
# anything else can fail. Reads only board.json; the board's pull-downs hold the coil off until
# this line runs.
import json

import machine

_keep_safe = None
try:
    with open("board.json") as f:
        _board = json.load(f)
    _pins = _board["pins"]
    _levels = _board.get("levels", {})

    # Four ints kept (board.json's dicts are dropped below; release_boot.recover() calls this later).
    _coil_pin, _pwm_pin = _pins["contactor"], _pins["pilot_pwm"]
    _coil_off = 1 - _levels.get("contactor_on", 1)
    _pwm_plus = 0 if _levels.get("pilot_pwm_inverted", False) else 1

    def _keep_safe():
        machine.Pin(_coil_pin, machine.Pin.OUT, value=_coil_off)
        machine.Pin(_pwm_pin, machine.Pin.OUT, value=_pwm_plus)

    _keep_safe()
except Exception as e:  # noqa: BLE001 - nothing more can be done before main.py reports it
    print("boot: board.json unusable, outputs left at their reset state:", repr(e))

# Nothing of board.json stays: on the board main.py runs in these globals, for the whole run.
_board = _pins = _levels = None

# Which release runs (docs/ota.md): the good one, a new one on trial, or back after a failed
# trial. Its modules are dropped again, so the release imports its own.
import gc  # noqa: E402
import sys  # noqa: E402

_run = 0
_rb = None  # release_boot kept: select() found failed boots to clear once one imports
_wdt = None
_imports = tuple()  # release_boot.MAIN_IMPORTS
_checks = tuple()  # release_boot.checks(): what main.py imports later in the boot, in groups
try:
    import release_boot

    _run = release_boot.select(machine)
    _wdt = release_boot.trial_wdt
    _imports = release_boot.MAIN_IMPORTS
    _checks = release_boot.checks()
    if release_boot.stuck_seen:
        _rb = release_boot
except Exception as e:  # noqa: BLE001 - the factory firmware at the root runs then
    print("boot: release selection failed, the factory firmware runs:", repr(e))
for _m in ("release_boot", "session_store", "durable"):
    sys.modules.pop(_m, None)
# No reference left either: main.py runs in boot.py's globals on the board, and a module kept
# alive here stays on the heap beside the copy main.py imports.
try:
    del release_boot
except NameError:  # its import failed
    pass
gc.collect()

# What main.py imports, imported here with nothing else on the heap: a module that does not
# import is seen now, and release_boot.recover() runs the previous release or the factory
# firmware instead, or holds the pile safe; at main.py's first line it would stop at the REPL.
# First what main.run() imports later in the boot (there it would reset at every boot, never
# rolled back), imported and dropped again a group at a time: the boot's peak stays its own.
_loaded = set(sys.modules)


def _drop(keep):
    for m in [m for m in sys.modules if m not in keep]:
        del sys.modules[m]
    gc.collect()


_why = _g = None
try:
    for _g in _checks:
        for _m in _g:
            __import__(_m)
        _drop(_loaded)
    for _m in _imports + (("main",) if _run else ()):
        __import__(_m)
except Exception as e:  # noqa: BLE001 - whatever a damaged module raises at import
    _why = "%s: %s" % (_m, repr(e)[:80])
if _why is not None or _rb is not None:
    try:
        if _rb is None:
            for _p in [p for p in sys.path if p.startswith("rel/")]:
                sys.path.remove(_p)  # the root's release_boot, the way back
            _drop(_loaded)  # with the root's imports, not a release's session_store a check left
            import release_boot as _rb
        _run = _rb.recover(_run, _why, _loaded, machine, _keep_safe, _wdt)
    except Exception as e:  # noqa: BLE001 - main.py reports what still fails
        print("boot: recovery failed:", repr(e))
    for _m in ("release_boot", "session_store", "durable"):
        sys.modules.pop(_m, None)
# Nothing of this stays on the heap under main.py (it runs in these globals on the board).
del _loaded, _rb, _wdt, _imports, _checks, _g, _drop, _why, _keep_safe
