"""The virtual board's ROM (MicroPython): build the simulated world, run boot.py then main.py
as an ESP32 does, boot again after a reset, and print the world's record at the end.

Usage (cwd = the board's flash folder, holding board.json, config.json and the scenario's
steps in sim_scenario.json, written by pilehost/unix_port.py):
    micropython -m rom   (rom.mpy, the other modules and firmware/'s boot.py and main.py
                          on MICROPYPATH)
"""
import gc
import json
import sys

import world

_MAX_BOOTS = 20


def _run_boot_files():
    """boot.py then main.py, compiled from source as the board does (streamed from the file, not
    read into one string). Imported, so main.py's `if __name__ == "__main__"` is ours to do."""
    import boot  # noqa: F401  (runs on import)
    gc.collect()
    import main  # the board itself: nothing else imports main (test_firmware_layout.py)

    main.run()


def largest_free_block():
    """The largest bytearray the heap can give now (bytes): what a large allocation would find."""
    low, high = 0, gc.mem_free()
    while low < high:
        mid = (low + high + 1) // 2
        try:
            probe = bytearray(mid)
            del probe
            low = mid
        except MemoryError:
            high = mid - 1
    gc.collect()
    return low


def start(hooks=None):
    """hooks (sim/chip_rom.py, the chip model): hooks.ready(sim) once the simulator is set up,
    hooks.booting(sim) right before each boot's boot.py, hooks.ended(sim) once the scenario is
    over."""
    with open("board.json") as f:
        board = json.load(f)
    with open("sim_scenario.json") as f:
        steps = [tuple(step) for step in json.load(f)["steps"]]
    sim = world.World(board, steps)
    world.WORLD = sim
    with open("config.json") as f:
        conf = json.load(f)
    sim.fit_meter(conf.get("meter", {}))
    sim.fit_wifi(conf.get("wifi"))
    if sim.ap is not None:
        import network  # noqa: F401  (built into an ESP32's image: the simulator's share)
    del steps, board, conf
    import machine  # noqa: F401  (loaded now so that its bytecode counts as the simulator's)
    import sim_time

    sys.modules["time"] = sim_time  # the firmware's time.time() reads the simulated RTC

    if hooks is not None:
        hooks.ready(sim)
    preloaded = set(sys.modules)
    gc.collect()
    sim_heap = gc.mem_alloc()
    sim.heap_base = sim_heap
    while sim.boots < _MAX_BOOTS:
        sim.boots += 1
        sim.log("board", "power-on" if sim.boots == 1 else "boot %d" % sim.boots)
        try:
            gc.collect()
            if hooks is not None:
                hooks.booting(sim)
            _run_boot_files()
            sim.log("board", "main.py returned: board idles at the REPL")
            break
        except world.SimReset as e:
            sim.reset(e.args[0] if e.args else 5)
            for mod in list(sys.modules):
                if mod not in preloaded:
                    del sys.modules[mod]  # a reset starts with fresh modules
        except world.SimEnd:
            break
    result = sim.result()
    result["modules"] = sorted(m for m in sys.modules if m not in preloaded)  # the last boot's
    if hooks is not None:
        hooks.ended(sim)
    gc.collect()
    result["heap_after_collect"] = gc.mem_alloc()
    result["heap_simulator"] = sim_heap
    result["largest_free_block"] = largest_free_block()
    print("SIM-RESULT " + json.dumps(result))


if __name__ == "__main__":  # `micropython -m rom`; sim/chip_rom.py calls start() itself
    start()
