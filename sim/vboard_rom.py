"""The virtual board's ROM (MicroPython unix port): what an ESP32 does at power-on, on a folder
that stands for its flash, then its REPL (the port runs this with -i) for mpremote.

Started by pilehost/vboard.py, cwd = the flash folder, VBOARD_DIR = the board's own folder. The
simulated hardware is built from VBOARD_DIR/hardware.json, not from the flash: the pins are
soldered whatever board.json says. The car's script (hardware.json "steps") plays once, at the
first boot that finds main.py and config.json; later boots find the car where it left it.
boot.py and main.py then run from source in the REPL's globals, as the ESP32 port runs them
(on Ctrl-C main.py hands its objects to diag.py). A reset (machine.reset, the watchdog) ends the process
at once, like a power cut; pilehost/vboard.py starts it again.
"""
import json
import os
import sys

import vboard_hw
import world

# The names here share the REPL's globals with boot.py and main.py: all start with _vb_.


def _vb_exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _vb_power_cut():
    # A reset keeps nothing: the process goes (SIGKILL from a child, the port has no os.kill).
    os.system("kill -9 $PPID")


def _vb_reset():
    world.WORLD.log("board", "reset")
    _vb_power_cut()


def _vb_power_on():
    here = os.getenv("VBOARD_DIR")
    with open(here + "/hardware.json") as f:
        hw = json.load(f)
    played = here + "/played"
    fresh = _vb_exists("main.py") and _vb_exists("config.json") and not _vb_exists(played)
    sim = vboard_hw.VboardWorld(hw["board"], hw["steps"] if fresh else ())
    world.WORLD = sim
    if fresh:
        open(played, "w").close()
    else:  # the script already played: the car, contactor and RCD as it left them
        sim.echo = False
        for step in hw["steps"]:
            sim.do(step[1], step[2] if len(step) > 2 else None)
        sim.echo = True
    sim.fit_meter(hw.get("meter") or {})
    sim.power_cut = _vb_power_cut
    import machine

    machine.Timer = vboard_hw.Timer
    machine.reset = machine.soft_reset = _vb_reset
    try:
        import sim_time  # the firmware's time.time() reads the simulated RTC, as rom.py does

        sys.modules["time"] = sim_time
    except ImportError:
        pass
    sim.log("board", "power-on")


def _vb_run(name):
    """boot.py / main.py as the ESP32 port runs them: an exception ends the file, not the board."""
    if not _vb_exists(name):
        return
    with open(name) as f:
        source = f.read()
    try:
        exec(source, globals())
    except Exception as e:  # noqa: BLE001 - printed as the board prints it, then the REPL
        sys.print_exception(e)
    except KeyboardInterrupt:
        print("KeyboardInterrupt in %s" % name)


_vb_power_on()
_vb_run("boot.py")
_vb_run("main.py")
