"""A virtual board for the technician's tools (tools/technician.py): the MicroPython unix port
behind a pty, a folder as its flash, the simulated hardware around it (CPython side).

`tools/technician.py virtual-board` (`make virtual-board`) prints the PORT for `make flash /
provision / diag`, runs until Ctrl-C, and with a broker shows what the reference consumer
stored. DIR holds flash/ (the board's files), hardware.json (its pins, meter and the car's
script, read by sim/vboard_rom.py), console.log (everything the board printed) and dev, the
serial port.

socat makes `dev` and runs `python -m pilehost.vboard --serve DIR` on a pty of its own: raw,
but with ISIG on, so mpremote's Ctrl-C reaches the unix port as SIGINT, a KeyboardInterrupt, as
an ESP32's UART driver raises it. The server starts the unix port again whenever it ends (a
reset) and copies its output to the pty without ever waiting for a reader: with nobody on the
line the bytes are lost, as a UART's are, and the firmware never blocks on print.
"""
import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time

from . import ROOT, cloud, unix_port
from .procs import end_process

scenarios = unix_port.scenarios

ROM = os.path.join(ROOT, "sim", "vboard_rom.py")
# The firmware's budget: the MQTT link's (unix_port.MQTT_HEAP) plus room for mpremote's file
# transfers at the REPL; its bytecode (.mpy from the flash) lives in the heap on the unix port.
HEAP = "256k"
POWER_ON = "sim board: power-on"  # vboard_rom.py's first line at every boot
_START_S = 10.0
_STALL_S = 0.2  # a reader that takes nothing for this long is not there: drop the bytes


def _socat():
    exe = shutil.which("socat")
    if exe is None:
        raise SystemExit("the virtual board needs socat: apt-get install socat (make venv does it as root)")
    return exe


def _check_path(path):
    # socat's address syntax gives ',', ':' and '!' a meaning; EXEC splits at spaces.
    for c in " ,:!'\"\\":
        if c in path:
            raise SystemExit("virtual board: socat cannot take %r in the path %s" % (c, path))
    return path


class VirtualBoard:
    """One virtual board: start() it, give `port` to the tools, stop() it."""

    def __init__(self, directory, board="ref-esp32", meter=None, steps=(), heap=HEAP):
        self.dir = _check_path(os.path.abspath(directory))
        self.flash = os.path.join(self.dir, "flash")
        self.port = os.path.join(self.dir, "dev")
        self.log_path = os.path.join(self.dir, "console.log")
        with open(os.path.join(ROOT, "boards", board + ".json")) as f:
            self.hardware = {"board": json.load(f), "meter": meter or {"type": "ddsu666"},
                             "steps": [list(s) for s in steps if s[1] != "end"], "heap": heap}
        self.proc = None

    def start(self):
        os.makedirs(self.flash, exist_ok=True)
        with open(os.path.join(self.dir, "hardware.json"), "w") as f:
            json.dump(self.hardware, f, indent=1)
        open(self.log_path, "ab").close()
        serve = "%s -m pilehost.vboard --serve %s" % (_check_path(sys.executable), self.dir)
        # The package from this checkout, installed (make venv) or not.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (_check_path(ROOT), os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen(
            [_socat(), "PTY,link=%s,raw,echo=0" % self.port,
             "EXEC:%s,pty,raw,echo=0,isig=1,setsid,ctty" % serve],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "socat.log"), "ab"), env=env)
        try:
            self.wait_for(POWER_ON, _START_S)
        except TimeoutError:
            self.stop()
            raise
        return self

    def console(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def boots(self):
        return self.console().count(POWER_ON)

    def wait_for(self, text, timeout, count=1):
        """Until `text` has appeared `count` times in the console log."""
        deadline = time.monotonic() + timeout
        while self.console().count(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("the virtual board's socat ended:\n" + self.console()[-2000:])
            if time.monotonic() > deadline:
                raise TimeoutError("no %r on the virtual board's console within %.0f s:\n%s"
                                   % (text, timeout, self.console()[-3000:]))
            time.sleep(0.05)

    def stop(self):
        """socat closes the pty: the hang-up ends the server and the unix port with it."""
        if self.proc is None:
            return
        end_process(self.proc)
        self.proc = None
        try:
            with open(os.path.join(self.dir, "serve.pid")) as f:
                pgid = int(f.read())
            os.killpg(pgid, signal.SIGTERM)  # the server's own session, if the hang-up missed it
        except (OSError, ValueError):
            pass


# -- the far end of the pty (socat's child) ---------------------------------------------------------


def _relay(src, tty, log):
    """The board's output to the log and the line; returns at its end (the process ended)."""
    reader = True
    while True:
        data = os.read(src, 4096)
        if not data:
            return
        log.write(data)
        log.flush()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(tty, view):]
                reader = True
            except BlockingIOError:
                if not reader or not select.select([], [tty], [], _STALL_S)[1]:
                    reader = False
                    break  # nobody reads the line: these bytes are gone
            except OSError:
                break  # the pty is gone (socat ended); the hang-up ends us too


def serve(directory):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the line's Ctrl-C is for the board only
    with open(os.path.join(directory, "serve.pid"), "w") as f:
        f.write(str(os.getpgrp()))
    with open(os.path.join(directory, "hardware.json")) as f:
        heap = json.load(f).get("heap", HEAP)
    # Our own description of the pty, non-blocking, not shared with the port's stdin.
    tty = os.open(os.ttyname(0), os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    env = dict(os.environ, VBOARD_DIR=directory,
               # The script's folder (sim/: machine, world) comes first, then the flash as an
               # ESP32 has it: its root, .frozen, lib.
               MICROPYPATH="::.frozen:lib")
    cmd = [unix_port.micropython_binary(), "-X", "heapsize=" + unix_port.heap_option(heap), "-i", ROM]
    log = open(os.path.join(directory, "console.log"), "ab")
    sys.stderr = log  # not onto the line
    line = termios.tcgetattr(0)  # socat's: raw, ISIG on
    while True:
        # A port killed at its REPL leaves the line as the REPL set it (ISIG off): Ctrl-C would
        # no longer interrupt the next boot's main.py.
        termios.tcsetattr(0, termios.TCSANOW, line)
        proc = subprocess.Popen(cmd, cwd=os.path.join(directory, "flash"), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _relay(proc.stdout.fileno(), tty, log)
        proc.wait()
        time.sleep(0.1)  # a board that cannot boot does not spin the CPU


# -- for a human ---------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="the board's folder (default: a new temporary one)")
    parser.add_argument("--scenario", default=scenarios.DEFAULT,
                        help="the car's script, played once the firmware boots provisioned "
                             "(make scenarios)")
    parser.add_argument("--board", default="ref-esp32", help="the board's hardware (boards/NAME.json)")
    parser.add_argument("--meter", help="the meter fitted (default: the scenario's)")
    parser.add_argument("--no-broker", action="store_true", help="no local mosquitto and consumer")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    spec = scenarios.get(args.scenario)
    conf = json.loads(json.dumps(scenarios.BASE_CONFIG))
    conf.update(spec.get("config", {}))
    if args.meter:
        conf["meter"] = {"type": args.meter}
    directory = args.dir or tempfile.mkdtemp(prefix="vboard-")
    broker = None
    if not args.no_broker:
        broker = cloud.LocalBroker(directory)
        conf["mqtt"] = {"host": "127.0.0.1", "port": broker.port}
    config_path = os.path.join(directory, "pile.json")
    with open(config_path, "w") as f:
        json.dump(conf, f, indent=2)
    vb = VirtualBoard(directory, args.board, conf.get("meter"), spec["steps"]).start()
    print("virtual board: PORT=%s" % vb.port)
    print("  flash folder %s, console log %s" % (vb.flash, vb.log_path))
    print("  car's script: %s (%s), once it boots provisioned" % (args.scenario, spec["doc"]))
    print("  a config for it: %s%s" % (config_path, " (the broker above)" if broker else ""))
    print("then, in another terminal:\n  make flash PORT=%s\n  make provision PORT=%s CONFIG=%s\n"
          "  make diag PORT=%s\nCtrl-C here stops it." % (vb.port, vb.port, config_path, vb.port))
    try:
        while vb.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        vb.stop()
        if broker is not None:
            broker.show()
            broker.stop()
    return 0


if __name__ == "__main__":  # socat runs `python -m pilehost.vboard --serve DIR`
    sys.exit(main())
