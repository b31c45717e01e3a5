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
