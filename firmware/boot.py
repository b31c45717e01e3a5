# Runs first after every reset: contactor open and pilot at steady +12 V (no PWM), before
# anything else can fail. Reads only board.json; the board's pull-downs hold the coil off until
# this line runs.
import json

import machine

try:
    with open("board.json") as f:
        _board = json.load(f)
    _pins = _board["pins"]
    _levels = _board.get("levels", {})
    machine.Pin(_pins["contactor"], machine.Pin.OUT, value=1 - _levels.get("contactor_on", 1))
    machine.Pin(_pins["pilot_pwm"], machine.Pin.OUT,
                value=0 if _levels.get("pilot_pwm_inverted", False) else 1)
except Exception as e:  # noqa: BLE001 - nothing more can be done before main.py reports it
    print("boot: board.json unusable, outputs left at their reset state:", repr(e))

# Nothing of board.json stays: on the board main.py runs in these globals, for the whole run.
_board = _pins = _levels = None

# Which release runs (docs/ota.md): the good one, a new one on trial, or back after a failed
# trial. Its modules are dropped again, so the release imports its own.
import sys  # noqa: E402

try:
    import release_boot

    release_boot.select(machine)
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
