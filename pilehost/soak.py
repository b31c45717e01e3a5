"""`make soak`: many simulated sessions with faults injected, against a real broker and the
reference consumer; at the end the consumer's database must hold exactly the sessions the
simulated car performed, each once, with the simulated meter's energy to the Wh.

Its command line, with the usage: tools/soak.py.

The firmware runs on the MicroPython unix port (pilehost/unix_port.py) for many sessions per process
("lifetime"); a lifetime ends at its last step or with kill -9 at a random moment (a power cut),
and the next one starts on the same flash folder, where the world (sim/world.py "persist") kept
the meter register and the car. Between the pile and mosquitto sits a TCP relay that can swallow
everything for a while (black hole) or go away while mosquitto is killed and started again.
Faults inside the sessions: meter garbage and silence, RCD trips, C->B pauses, unplugging under
load, signed remote stops (docs/commands.md). Seeded: the seed is printed, --seed replays it.
"""
import argparse
import collections
import json
import os
import random
import signal
import struct
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

from . import broker, cloud, mqtt_wire, pilecmd, procs, unix_port

PILE = "sim-pile-1"
SECRET = bytes(range(32))
STATE_FILE = "sim_state.json"
SCENARIO = "soak_lifetime"
# The firmware's heap budget on the unix port (unix_port.heap_option adds the simulator's 40 KiB;
# the scenario's steps get their own allowance on top): the tests' budget for the MQTT link.
# 176k fails at boot; 184k ran 188 sessions, then a boot found no 1,280-byte block importing
# mqtt_link (a fragmented heap). The bytecode lives in this heap on the unix port; on a pile it
# is frozen into the image (manifest.py; the README's frozen figures).
SOAK_HEAP = unix_port.MQTT_HEAP
CONFIG = {
    # rcd_retry_s 1 (config.py's least): a trip is retried within the session
    "pile_id": PILE, "free_vend": True, "rcd_retry_s": 1,
    # A reading every 500 ms (default 1000): the record's closing reading comes sooner, so each
    # session takes less wall time; DDSU666 at 9600 baud answers in ~30 ms.
    "meter": {"type": "ddsu666", "poll_interval_ms": 500},
    # keepalive 10 s (config.py's least): a black-holed link is noticed within 15 s.
    "mqtt": {"host": "127.0.0.1", "secret": SECRET.hex(), "keepalive_s": 10},
}
STEP_BYTES = 90  # heap per scenario step on the unix port (tuple and list slot; 87 B measured)
WAIT_S = 15.0  # any single wait on the broker or the consumer
# A lifetime that only delivers the outbox. The car goes at once: one left plugged in by the
# last cut would start sessions here that no lifetime counts.
DRAIN_STEPS = [(0, "persist", STATE_FILE), (0, "unplug"), (8000, "end")]


def shown_wh(energy_mj):
    """What the firmware reads from the simulated DDSU666 for a world register: the world's Wh
    as a float32 of kWh (sim/meters.py), back to Wh as firmware/modbus_meter.py rounds it."""
    kwh = struct.unpack(">f", struct.pack(">f", energy_mj / 3600000 / 1000.0))[0]
    return int(kwh * 1000 + 0.5)


# -- the broker, the consumer, the relay ----------------------------------------------------------

class SoakError(Exception):
    pass


def wait(predicate, what, timeout=WAIT_S):
    procs.wait_for(predicate, what, timeout, error=SoakError)


class Cloud:
    """mosquitto, the reference consumer (SQLite) and a command sender, all on the broker itself;
    the pile reaches the broker through the relay."""

    def __init__(self, directory):
        try:
            self.broker = broker.Broker(directory)
            self.store = cloud.Store(self.broker.url(), os.path.join(directory, "telemetry.db"), quiet=True)
        except broker.BrokerError as e:
            raise SoakError(str(e)) from None
        self.storage, self.handler = self.store.storage, self.store.handler
        self.consumer = self.store.consumer
        self.sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.sender.reconnect_delay_set(0.2, 2)
        self.sender.connect("127.0.0.1", self.broker.port)
        self.sender.loop_start()
        self.relay = mqtt_wire.TcpRelay(self.broker.port)
        self.relay.up()
        self._counter = 0

    def remote_stop(self, floor=0):
        """A signed remote_stop; its counter is the time in ms and always goes up (the pile keeps
        the last one in flash across its lifetimes), above `floor`: after a reboot the pile
        refuses counters up to its reservation (docs/commands.md, "Replays"), which a cloud
        learns from the `replayed` answer; the rig reads it from the pile's flash instead."""
        self._counter = max(self._counter + 1, int(time.time() * 1000), floor + 1)
        payload = pilecmd.sign(SECRET, pilecmd.make_body("remote_stop", {}, self._counter))
        self.sender.publish("evse/v1/%s/cmd" % PILE, payload, qos=1)

    def restart_broker(self, how):
        """The pile is kept away until the consumer has subscribed again: the broker keeps no
        sessions (persistence false), so a record acknowledged before would reach no one."""
        self.relay.down()
        try:
            self.broker.restart(how)
        except broker.BrokerError as e:
            raise SoakError(str(e)) from None
        wait(self.consumer.subscribed.is_set, "the consumer to subscribe again", 40)
        self.relay.up()

    def sessions(self):
        return {sid: (energy, reason, start, stop) for sid, energy, reason, start, stop in self.storage.query(
            "SELECT session_id, energy_wh, stop_reason, meter_start_wh, meter_stop_wh FROM sessions")}

    def stop(self):
        self.relay.down()
        self.sender.loop_stop()
        self.sender.disconnect()
        self.store.stop()
        self.broker.stop()


# -- the plan: steps for one lifetime --------------------------------------------------------------

class Planner:
    """Scenario steps (sim/scenarios.py format) for a lifetime of several sessions."""

    def __init__(self, rnd, faults):
        self.rnd = rnd
        self.faults = faults  # Counter of what the plans hold (what was done is counted from the run)

    def lifetime(self, sessions, plugged, wants):
        rnd = self.rnd
        steps = [(0, "persist", STATE_FILE)]
        t = 1200  # boot and the meter's first reading
        for n in range(sessions):
            if n or not plugged:
                steps.append((t, "plug"))
                t += rnd.randint(100, 400)
                wants = False
            if not wants and rnd.random() < 0.95:  # a few never ask for power
                steps.append((t, "request"))
                wants = True
            t = self._charge(steps, t, wants)
            t += rnd.randint(800, 1100)  # the record's closing reading: a poll every 500 ms
            steps.append((t, "heap"))
            t += rnd.randint(50, 300)
        steps.append((t, "end"))
        return steps, t

    def _charge(self, steps, t, wants):
        """Charging with faults in it, then the end of the session; returns the unplug time."""
        rnd = self.rnd
        t += 400  # B->C debounce, RCD self-test, contacts
        for _ in range(rnd.choice((0, 1, 1, 2))):
            kind = rnd.choice(("meter_garbage", "meter_silent", "rcd_trip", "pause"))
            steps.append((t, "cue", kind))
            if kind.startswith("meter_"):
                steps.append((t, "meter_fault", kind[6:]))
                t += rnd.randint(300, 1500)
                steps.append((t, "meter_fault", None))  # healthy again before the stop: the last Wh counted
                t += rnd.randint(100, 400)
            elif kind == "rcd_trip":
                t += 1100  # FAULT is not believed for 1 s after a switch (relay._SWITCH_BLANK_MS)
                steps.append((t, "rcd_leak", True))
                t += rnd.randint(100, 300)
                steps.append((t, "rcd_leak", False))
                t += rnd.randint(1300, 1800)  # rcd_retry_s 1, then the self-test and the close
            else:  # C->B and back
                steps.append((t, "stop_request"))
                t += rnd.randint(100, 500)
                steps.append((t, "request"))
                t += rnd.randint(400, 700)
        t += rnd.randint(300, 1000) if wants else 100
        end = rnd.choice(("stop_then_unplug", "unplug_under_load", "remote_stop"))
        if end == "remote_stop":
            steps.append((t, "cue", "remote_stop"))
            t += rnd.randint(1000, 1500)  # the command's way, C2->C1: the car drops to B
        elif end == "stop_then_unplug":
            steps.append((t, "stop_request"))
            t += rnd.randint(200, 500)
        steps.append((t, "unplug"))
        return t


# -- one lifetime -------------------------------------------------------------------------------

def counter_floor(flash):
    """The command counter reservation on the pile's flash (session_store.CounterStore: a CRC
    line, then the JSON number); 0 if there is none yet."""
    try:
        with open(os.path.join(flash, "cmd_counter.json"), "rb") as f:
            return int(f.read().split(b"\n", 1)[1])
    except (OSError, IndexError, ValueError):
        return 0


def read_state(flash):
    try:
        with open(os.path.join(flash, STATE_FILE)) as f:
            energy, plugged, wants = (int(v) for v in f.read().split())
        return energy, bool(plugged), bool(wants)
    except OSError:
        return 0, False, False


class Lifetime:
    """What one firmware process did, from its output: the world's sessions (begin/end register)
    paired with the session ids the firmware gave them, heap figures, the injected faults."""

    def __init__(self, lines, cut_register):
        # dicts: begin, end (mJ), cut (the power went with the car plugged in), ids (firmware's
        # started records), closed (an ended record of its went to flash in this lifetime: not
        # so if the power went before the record's closing reading, even after the unplug)
        self.sessions = []
        self.heap = []  # live after gc.collect() at each session's end
        self.in_use = []  # in use just before that collection: garbage included
        self.boots = 0
        self.tracebacks = [t for t in lines if "Traceback" in t or "MemoryError" in t]
        current = None
        by_id = {}
        for line in lines:
            if "] sim session: begin " in line:
                current = {"begin": int(line.rsplit(" ", 1)[1]), "end": None, "cut": False, "ids": [],
                           "closed": False}
                self.sessions.append(current)
            elif "] sim session: end " in line:
                current["end"] = int(line.rsplit(" ", 1)[1])
                current = None
            elif "] sim heap: " in line:  # "in use N, live N"
                self.heap.append(int(line.rsplit(" ", 1)[1]))
                self.in_use.append(int(line.split("in use ", 1)[1].split(",")[0]))
            elif "] sim board: " in line and ("power-on" in line or "boot " in line):
                self.boots += 1
            elif "] outbox: {" in line:
                record = json.loads(line.split("] outbox: ", 1)[1])
                sid = record["session_id"]
                if "stop_time" not in record:
                    if current is not None:
                        current["ids"].append(sid)
                        by_id[sid] = current
                elif sid in by_id:
                    by_id[sid]["closed"] = True
        if current is not None:  # the power went with the car plugged in
            current["end"] = cut_register
            current["cut"] = True


def run_lifetime(cloud, flash, steps, heap, kill_after_s, on_cue, timeout):
    # The steps live in the same heap, ~87 B each (measured): on top of the firmware's budget.
    unix_port.scenarios.SCENARIOS[SCENARIO] = {"doc": "soak lifetime", "steps": steps,
                                            "heap_extra_kb": len(steps) * STEP_BYTES // 1024 + 1}
    config = json.loads(json.dumps(CONFIG))
    config["mqtt"]["port"] = cloud.relay.port

    def on_line(line):
        if "] sim step: cue " in line:
            on_cue(line.split("cue ", 1)[1].strip("'\""))

    r = unix_port.run_scenario(SCENARIO, config=config, heapsize=heap, flash_dir=flash,
                            kill_after_s=kill_after_s, on_line=on_line, timeout=timeout)
    return r


def heap_growth(lifetimes):
    """The most any lifetime's heap grew: the least sample of its later sessions minus the least
    of its earlier ones (the least: what the collector could not free, whatever the stack held)."""
    samples = [life.heap for life in lifetimes if len(life.heap) >= 4]
    grew = [min(h[len(h) // 2:]) - min(h[:len(h) // 2]) for h in samples]
    return max(grew) if grew else 0


# -- the soak -----------------------------------------------------------------------------------

class Soak:
    def __init__(self, sessions, seed, kills=True, broker_faults=True, heap=SOAK_HEAP, echo=False,
                 per_life=12):
        self.target = sessions
        self.seed = seed
        self.rnd = random.Random(seed)
        self.kills = kills
        self.broker_faults = broker_faults
        self.heap = heap
        self.echo = echo
        self.per_life = per_life  # sessions in a lifetime: 2 to this many
        self.faults = collections.Counter()
        self.lifetimes = []
        self.failures = []
        self._stop = threading.Event()
        self._flash = None  # the running lifetime's flash folder

    def _cue(self, cloud, kind):
        self.faults[kind] += 1
        if kind == "remote_stop":
            cloud.remote_stop(0 if self._flash is None else counter_floor(self._flash))

    def _broker_faults(self, cloud, rnd):
        """Black holes and restarts at random moments, while the lifetimes run."""
        kinds = ("broker_black_hole", "broker_restart_kill", "broker_restart_term")
        n = 0
        while not self._stop.wait(rnd.uniform(4, 15)):
            kind = kinds[n] if n < len(kinds) else rnd.choice(kinds)  # each kind early on, then at random
            n += 1
            self.faults[kind] += 1
            try:
                if kind == "broker_black_hole":
                    cloud.relay.hole()
                    self._stop.wait(rnd.uniform(1, 8))
                    cloud.relay.mend()
                else:
                    cloud.restart_broker(signal.SIGKILL if kind.endswith("kill") else signal.SIGTERM)
            except SoakError as e:
                self.failures.append("broker fault %s: %s" % (kind, e))
                return

    def run(self):
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="pile-soak-") as tmp:
            flash = os.path.join(tmp, "flash")
            os.mkdir(flash)
            cloud = Cloud(tmp)
            faulter = None
            try:
                if self.broker_faults:
                    faulter = threading.Thread(target=self._broker_faults,
                                               args=(cloud, random.Random(self.rnd.random())), daemon=True)
                    faulter.start()
                performed = 0
                while performed < self.target and not self.failures:
                    performed += self._one_lifetime(cloud, flash, min(self.rnd.randint(2, self.per_life),
                                                                      self.target - performed))
                self._stop.set()
                if faulter is not None:
                    faulter.join(60)
                cloud.relay.mend()
                if cloud.relay.listener is None:
                    cloud.relay.up()
                self._drain(cloud, flash)
                self.duration_s = time.monotonic() - t0
                self._compare(cloud)
                self.bytes = (cloud.relay.bytes_up, cloud.relay.bytes_down)
                self.consumer_stats = cloud.handler.stats.snapshot()[0]
            finally:
                self._stop.set()
                cloud.stop()
        return not self.failures

    def _one_lifetime(self, cloud, flash, sessions):
        self._flash = flash
        energy, plugged, wants = read_state(flash)
        steps, end_ms = Planner(self.rnd, self.faults).lifetime(sessions, plugged, wants)
        kill = None
        cut_yet = any(life.killed for life in self.lifetimes)
        if self.kills and (self.rnd.random() < 0.5 or (len(self.lifetimes) == 1 and not cut_yet)):
            kill = self.rnd.uniform(0.3, end_ms / 1000.0)
        r = run_lifetime(cloud, flash, steps, self.heap, kill, lambda k: self._cue(cloud, k),
                         timeout=end_ms / 1000.0 + 60)
        if self.echo:
            for line in r.lines:
                print(line)
        cut = kill is not None and r.result is None
        if cut:
            self.faults["power_cut"] += 1
        life = Lifetime(r.lines, read_state(flash)[0] if cut else None)
        life.killed = cut
        life.returncode = r.returncode
        self.lifetimes.append(life)
        if life.tracebacks:
            self.failures.append("lifetime %d: %s" % (len(self.lifetimes), "\n".join(r.lines[-40:])))
        elif life.boots > 1:  # nothing here resets the board: the watchdog did, or the firmware
            at = [i for i, line in enumerate(r.lines) if "] sim board: reset" in line][0]
            self.failures.append("lifetime %d: the board reset (%d boots), unasked:\n%s" % (
                len(self.lifetimes), life.boots, "\n".join(r.lines[max(0, at - 40):at + 3])))
        elif not cut and r.result is None:
            self.failures.append("lifetime %d ended without a result (exit %s):\n%s" % (
                len(self.lifetimes), r.returncode, "\n".join(r.lines[-40:])))
        for s in life.sessions:
            if s["end"] is None:
                self.failures.append("lifetime %d: a session without an end" % len(self.lifetimes))
        print("lifetime %d: %d session(s)%s, %d boot(s)" % (
            len(self.lifetimes), len(life.sessions), ", power cut" if cut else "", life.boots), flush=True)
        return len(life.sessions)

    def _expected(self):
        """session id -> (energy Wh, world session), and the world sessions the firmware never
        named (cut before its started record: no energy may have flowed in them)."""
        expected = {}
        unnamed = []
        for n, life in enumerate(self.lifetimes, 1):
            for s in life.sessions:
                if s["end"] is None:
                    continue  # reported with its lifetime
                wh = shown_wh(s["end"]) - shown_wh(s["begin"])
                if len(s["ids"]) != 1:
                    if not s["ids"] and s["cut"] and wh == 0:
                        unnamed.append((n, s))
                        continue
                    self.failures.append("lifetime %d: the world's session %r got firmware ids %r"
                                         % (n, s, s["ids"]))
                    continue
                expected[s["ids"][0]] = (wh, s, n)
        return expected, unnamed

    def _drain(self, cloud, flash):
        """Short lifetimes without sessions, the broker left alone, until the consumer holds every
        expected record: the flash outbox is replayed at each boot."""
        expected, _ = self._expected()
        for _ in range(6):
            have = cloud.sessions()
            if all(sid in have for sid in expected):
                time.sleep(1.0)  # a duplicate still on its way has its chance to arrive
                return
            run_lifetime(cloud, flash, DRAIN_STEPS, self.heap, None, lambda k: None, timeout=60)

    def _compare(self, cloud):
        expected, unnamed = self._expected()
        have = cloud.sessions()
        self.unnamed = len(unnamed)
        for sid, (wh, s, n) in sorted(expected.items()):
            if sid not in have:
                self.failures.append("%s (lifetime %d, %d Wh by the meter) is not in the database"
                                     % (sid, n, wh))
                continue
            energy, reason, start, stop = have[sid]
            if energy != wh:
                self.failures.append("%s (lifetime %d): energy_wh %d in the database, the meter counted %d "
                                     "(register %d -> %d Wh; record %d -> %d, %s)" % (
                                         sid, n, energy, wh, shown_wh(s["begin"]), shown_wh(s["end"]),
                                         start, stop, reason))
            # power_loss exactly when the power went before the record closed: with the car
            # plugged in, or after the unplug but before the record's closing reading.
            cut_open = not s["closed"]
            if cut_open != (reason == "power_loss"):
                world = ("lost power with the record open" if cut_open else
                         "lost power after the record closed" if s["cut"] else "did not lose power")
                self.failures.append("%s (lifetime %d): stop_reason %s, but the world %s" % (
                    sid, n, reason, world))
        extra = sorted(set(have) - set(expected))
        if extra:
            self.failures.append("the database holds sessions the car never performed: %s" % ", ".join(extra))
        stats = cloud.handler.stats.snapshot()[0]
        self.conflicts = stats.get("session_ended_conflict", 0)
        if self.conflicts:
            self.failures.append("%d conflicting session/ended records" % self.conflicts)
        rejected = cloud.storage.query("SELECT topic, reason FROM rejected")
        if rejected:
            self.failures.append("the consumer rejected %d message(s): %s" % (len(rejected), rejected[:5]))
        self.stored = len(have)
        self.energy_wh = sum(v[0] for v in have.values())
        self.empty = sum(1 for v in have.values() if not v[0])

    def figures(self):
        sessions = sum(len(life.sessions) for life in self.lifetimes)
        heap = [h for life in self.lifetimes for h in life.heap]
        unnamed = getattr(self, "unnamed", 0)
        lines = [
            "seed %d (SEED=%d replays it), heap -X heapsize=%s and more (firmware %s + simulator %d KiB "
            "+ %d B per scenario step)" % (self.seed, self.seed, unix_port.heap_option(self.heap), self.heap,
                                          unix_port.SIM_HEAP_ALLOWANCE_KB, STEP_BYTES),
            "sessions: %d performed by the car in %d lifetimes (%d power cuts), %d in the database%s" % (
                sessions, len(self.lifetimes), sum(life.killed for life in self.lifetimes),
                getattr(self, "stored", 0),
                ", %d cut before their record began (0 Wh)" % unnamed if unnamed else ""),
            "faults: " + ", ".join("%s %d" % kv for kv in sorted(self.faults.items())),
            "energy: %d Wh in the database, %d session(s) with none" % (
                getattr(self, "energy_wh", 0), getattr(self, "empty", 0)),
            "duration: %.0f s (%.1f s a session)" % (self.duration_s, self.duration_s / max(1, sessions)),
        ]
        if heap:
            per_life = [life.heap for life in self.lifetimes if life.heap]
            lines.append("firmware heap live after gc.collect() at each session's end: first %d, last %d, "
                         "max %d B; within a lifetime, last minus first: max %+d B" % (
                             heap[0], heap[-1], max(heap), max(h[-1] - h[0] for h in per_life)))
            in_use = [h for life in self.lifetimes for h in life.in_use]
            lines.append("firmware heap in use before those collections (garbage included; no periodic "
                         "collection runs, so it fills the heap before one): median %d, max %d B of %s" % (
                             sorted(in_use)[len(in_use) // 2], max(in_use), self.heap))
            lines.append("heap growth within a lifetime (least of its later half minus least of its "
                         "earlier half): max %+d B" % heap_growth(self.lifetimes))
        if hasattr(self, "bytes"):
            lines.append("MQTT bytes per session (pile side of the relay): %d up, %d down" % (
                self.bytes[0] // max(1, sessions), self.bytes[1] // max(1, sessions)))
        stats = getattr(self, "consumer_stats", {})
        lines.append("consumer: session/ended new %d, duplicate %d, conflict %d" % (
            stats.get("session_ended_new", 0), stats.get("session_ended_duplicate", 0),
            stats.get("session_ended_conflict", 0)))
        return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=int(os.environ.get("SESSIONS") or 1000))
    seed = os.environ.get("SEED")
    parser.add_argument("--seed", type=int, default=int(seed) if seed else None)
    parser.add_argument("--heap", default=SOAK_HEAP,
                        help="the firmware's heap budget (unix_port.heap_option)")
    parser.add_argument("--no-kills", action="store_true")
    parser.add_argument("--no-broker-faults", action="store_true")
    parser.add_argument("--per-life", type=int, default=12, help="most sessions in one lifetime")
    parser.add_argument("--echo", action="store_true", help="print the firmware's lines")
    args = parser.parse_args(argv)
    procs.stop_on_sigterm()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2 ** 31)
    print("soak: %d sessions, seed %d" % (args.sessions, seed), flush=True)
    soak = Soak(args.sessions, seed, kills=not args.no_kills, broker_faults=not args.no_broker_faults,
                heap=args.heap, echo=args.echo, per_life=args.per_life)
    ok = soak.run()
    print("---- soak figures")
    for line in soak.figures():
        print(line)
    if not ok:
        print("---- FAILED: %d mismatch(es)" % len(soak.failures))
        for f in soak.failures[:50]:
            print(f)
        return 1
    print("---- OK: the database holds exactly the sessions the car performed, each once, to the Wh")
    return 0
