"""`make bench`: figures, not a test. Runs the firmware on the MicroPython unix port.

Its command line, with the usage: tools/bench.py.

- ticks: control tick time (median, p99, max), idle and charging, and the pilot burst's share;
- mpy: the size of each module cross-compiled for the ESP32 (-march=xtensawin, as `make mpy`);
- latency: C->B -> contactor-open latency (median, p99, max) over BENCH_TRIALS trials each
  (1,000; QUICK=1: 100) with a healthy network (mosquitto), the broker black-holed (accepts
  TCP, never answers), the broker unreachable (nothing listens) and the meter silent;
- wire: MQTT bytes each way for one session, through a counting relay, by kind of message;
- heap: the smallest firmware heap that completes a full session, per configuration, and the
  firmware's live heap after gc.collect() at the end; the soak's figures come from `make soak`;
- heap32: the same on the unix port shaped like the ESP32 (32-bit, single-precision floats), the
  firmware as .mpy files and frozen into the image (pilehost/chipheap.py);
- chip: the chip-time model, each path of the loop in ESP32 milliseconds (pilehost/chipmodel.py;
  valgrind's callgrind, deterministic; figures also in build/chip/chip-model.txt);
- ota: a signed update's steps on the same model (pilehost/chipota.py: the RSA-2048 check, the
  chunks, the resume, the switch; build/chip/chip-ota.txt).
- growth: the heap over 1,000 sessions in one lifetime (QUICK=1: 100) on the 32-bit port, frozen
  and as .mpy, on the chip model's virtual clock (pilehost/chipgrowth.py; build/chip/growth.txt).

The simulator runs on the host's clock, so the runs are spread over BENCH_JOBS processes at
once (default 3; the ticks are timed alone first): on a loaded host the tails grow.
"""
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from . import ROOT, chipgrowth, chipheap, chipmodel, chipota, cloud, machine_info, mqtt_wire, procs, unix_port
from .broker import BlackHole

scenarios = unix_port.scenarios

QUICK = os.environ.get("QUICK", "") not in ("", "0")
TRIALS = int(os.environ.get("BENCH_TRIALS", "100" if QUICK else "1000"))
JOBS = int(os.environ.get("BENCH_JOBS", "3"))
CHUNK = 250  # trials per run: ~90 s each, so that the runs share the CPUs evenly
C_TO_B_LIMIT_MS = 100  # IEC 61851-1 Table A.6 seq. 8.1 (evse-facts section 1)
# Room for the trials' scripted steps (the simulator's, not the firmware's) on top of the
# firmware's budget: unix_port.DEFAULT_HEAP without the MQTT link, unix_port.MQTT_HEAP with it.
TRIALS_HEAP = "320k"
TRIALS_MQTT_HEAP = "400k"  # at 320k one run's result (json.dumps) found no 2 KiB block once
BENCH_LOGS = os.path.join(ROOT, "build", "bench")  # runs that went wrong, to look at
_LOG_SEQ = itertools.count(1)
SECTIONS = ("ticks", "mpy", "latency", "wire", "heap", "heap32", "chip", "ota", "growth")


def percentile(values, p):
    """Nearest rank on the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def mqtt_config(port, pile_id, **extra):
    conf = {"host": "127.0.0.1", "port": port, "keepalive_s": 10}
    conf.update(extra)
    return {"pile_id": pile_id, "mqtt": conf}


# -- ticks ---------------------------------------------------------------------------------------

def tick_times(n):
    with tempfile.TemporaryDirectory(prefix="pile-bench-") as flash:
        unix_port.prepare_flash(flash, config=scenarios.BASE_CONFIG)
        out = subprocess.run(
            # 512k: room for the timings
            [unix_port.micropython_binary(), "-X", "heapsize=512k", "-m", "bench_tick", str(n)],
            cwd=flash, env=dict(os.environ, MICROPYPATH=unix_port.micropypath()),
            capture_output=True, text=True, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("BENCH ")][0]
    return json.loads(line[6:])


def bench_ticks():
    n = 500 if QUICK else 2000
    ticks = tick_times(n)
    for state in ("idle", "charging"):
        total, burst = ticks[state]
        print("control tick, %-8s %d ticks: median %5d us, p99 %5d us, max %5d us "
              "(pilot burst %d us of it, median)" % (state, n, percentile(total, 50), percentile(total, 99),
                                                   max(total), percentile(burst, 50)))


# -- mpy -----------------------------------------------------------------------------------------

def bench_mpy():
    """Each module as `make mpy` builds it; boot.py and main.py go on the board as source."""
    sources = sorted(os.path.join("firmware", f) for f in os.listdir(os.path.join(ROOT, "firmware"))
                     if f.endswith(".py"))
    sources.append(os.path.join("lib", "umqtt", "simple.py"))
    sizes = []
    with tempfile.TemporaryDirectory(prefix="pile-mpy-") as out_dir:
        for rel in sources:
            out = os.path.join(out_dir, rel.replace(os.sep, "_") + ".mpy")
            unix_port.cross_compile(os.path.join(ROOT, rel), out)
            sizes.append((rel, os.path.getsize(os.path.join(ROOT, rel)), os.path.getsize(out)))
    for rel, src, mpy in sizes:
        note = " (flashed as source)" if os.path.basename(rel) in ("boot.py", "main.py") else ""
        print("mpy, %-28s %6d B (source %6d B)%s" % (rel[:-3] + ".mpy", mpy, src, note))
    fw = sum(m for r, _, m in sizes if r.startswith("firmware"))
    lib = sum(m for r, _, m in sizes if r.startswith("lib"))
    print("mpy, total: firmware %d B, lib %d B, together %d B" % (fw, lib, fw + lib))


# -- latency -------------------------------------------------------------------------------------

def trial_run(pool, trials, fault, config, heap):
    """Split `trials` into runs of at most CHUNK; the futures give each run's latencies."""
    futures = []
    done = 0
    while done < trials:
        n = min(CHUNK, trials - done)
        conf = dict(config or {})
        if "mqtt" in conf:  # the client id is the pile id: concurrent runs need their own
            conf["pile_id"] = "%s-%d" % (conf["pile_id"], len(futures) + 1)
        name = "latency_trials:%d" % n + (":" + fault if fault else "")
        futures.append(pool.submit(one_trial_run, name, n, conf, heap))
        done += n
    return futures


def one_trial_run(name, n, config, heap):
    """The run's latencies, and what went wrong in it: a reset, or trials in which the contactor
    never closed (no latency to measure); their lines are kept in build/bench/ to look at."""
    r = unix_port.run_scenario(name, heapsize=heap, timeout=900, config=config)
    lat = r.result["latencies_ms"] if r.result else []
    problems = []
    if r.result is None:
        problems.append("no result (exit %s)" % r.returncode)
    elif r.result["boots"] != 1:
        problems.append("%d boots" % r.result["boots"])
    unclosed = []
    start = closed = None
    for i, line in enumerate(r.lines):
        if "] sim step: request" in line:
            start, closed = i, False
        elif "] sim contactor: coil ON" in line:
            closed = True
        elif "] sim step: stop_request" in line and start is not None:
            if not closed:
                unclosed.append((start, i))
            start = None
    if unclosed:
        problems.append("%d trial(s) in which the contactor never closed" % len(unclosed))
    if problems or len(lat) != n:
        os.makedirs(BENCH_LOGS, exist_ok=True)
        path = os.path.join(BENCH_LOGS, "%s-%d.log" % (name.replace(":", "_"), next(_LOG_SEQ)))
        with open(path, "w") as f:
            for a, b in unclosed:
                f.write("---- no close: lines %d-%d\n%s\n" % (a, b, "\n".join(r.lines[a:b + 1])))
            f.write("---- the whole run\n" + "\n".join(r.lines) + "\n")
        problems.append("%d of %d latencies (%s)" % (len(lat), n, os.path.relpath(path, ROOT)))
    return lat, problems


def latency_line(label, lat):
    return ("C->B -> contactor open, %-37s %d trials: median %.1f ms, p99 %.1f ms, max %.1f ms "
            "(limit %d ms)" % (label + ",", len(lat), percentile(lat, 50), percentile(lat, 99), max(lat),
                               C_TO_B_LIMIT_MS))


def bench_latency(pool, broker, hole):
    conditions = (
        ("network healthy (mosquitto)", None, mqtt_config(broker.port, "bench-lat"), TRIALS_MQTT_HEAP),
        ("broker black-holed", None, mqtt_config(hole.port, "bench-hole"), TRIALS_MQTT_HEAP),
        ("broker unreachable", None, mqtt_config(procs.free_port(), "bench-gone"), TRIALS_MQTT_HEAP),
        ("meter silent (no MQTT link)", "silent", None, TRIALS_HEAP),
    )
    runs = [(label, trial_run(pool, TRIALS, fault, config, heap))
            for label, fault, config, heap in conditions]

    def report():
        for label, futures in runs:
            results = [f.result() for f in futures]
            print(latency_line(label, [v for lat, _ in results for v in lat]))
            for _, problems in results:
                if problems:
                    print("  ! one run of %s: %s" % (label, "; ".join(problems)))
    return report


# -- bytes on the wire ---------------------------------------------------------------------------

# MQTT 3.1.1 control packet types (OASIS MQTT 3.1.1 section 2.2.1).
_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = (
    1, 2, 3, 4, 8, 9, 12, 13, 14)
_TOPIC_KIND = {"online": "connect", "status": "status", "session/started": "session records",
               "session/ended": "session records", "meter": "meter", "fault": "fault",
               "cmd/ack": "commands", "cmd": "commands"}
_PACKET_KIND = {_CONNECT: "connect", _CONNACK: "connect", _SUBSCRIBE: "connect", _SUBACK: "connect",
                _DISCONNECT: "connect", _PINGREQ: "keep-alive", _PINGRESP: "keep-alive"}
KINDS = ("connect", "status", "session records", "meter", "fault", "commands", "keep-alive", "other")


class CountingRelay(mqtt_wire.TcpRelay):
    """A relay between the pile and the broker that puts each MQTT packet under a kind (the
    PUBACK under its PUBLISH's kind). TCP/IP headers are not counted."""

    def __init__(self, upstream_port):
        super().__init__(upstream_port)
        self.packets = []  # (direction "up" pile->broker or "down", kind, bytes)

    def packet(self, packet, up, conn):
        """conn maps a QoS 1 PUBLISH's (direction, packet id) to its kind, for the PUBACK."""
        header = 2  # the fixed header byte and the remaining length: 1-4 bytes
        while packet[header - 1] & 0x80:
            header += 1
        direction = "up" if up else "down"
        kind_code = packet[0] >> 4
        kind = _PACKET_KIND.get(kind_code, "other")
        if kind_code == _PUBLISH:
            n = (packet[header] << 8) | packet[header + 1]
            topic = packet[header + 2:header + 2 + n].decode()
            suffix = topic.split("/", 3)[3] if topic.count("/") >= 3 else topic
            kind = _TOPIC_KIND.get(suffix, "other")
            if (packet[0] >> 1) & 3:  # QoS 1: a packet id follows, its PUBACK comes back
                conn[(direction, packet[header + 2 + n:header + 4 + n])] = kind
        elif kind_code == _PUBACK:
            kind = conn.get(("down" if up else "up", packet[2:4]), "other")
        self.packets.append((direction, kind, len(packet)))  # list.append: atomic under the GIL
        return True


def bench_wire(pool, broker):
    """One session with 30 s of charging, the meter every 10 s, the status heartbeat every 60 s
    (docs/telemetry.md), keep-alive 60 s: what goes over the pile's TCP connection."""
    relay = CountingRelay(broker.port)
    relay.up()
    charge_s = 10 if QUICK else 30
    # With a command key the pile subscribes to its commands topic, as a pile in service does.
    config = mqtt_config(relay.port, "bench-wire", keepalive_s=60, meter_interval_s=10, secret="ab" * 16)
    future = pool.submit(unix_port.run_scenario, "metered_session:%d" % charge_s,
                         heapsize=unix_port.MQTT_HEAP, config=config)

    def report():
        r = future.result()
        time.sleep(0.5)  # the relay's last bytes
        relay.down()
        if r.result is None:
            raise RuntimeError("the session for the bytes on the wire failed:\n" + "\n".join(r.lines[-20:]))
        sums = {}
        for direction, kind, size in relay.packets:
            n, b = sums.get((direction, kind), (0, 0))
            sums[(direction, kind)] = (n + 1, b + size)
        up = sum(b for (d, _), (_, b) in sums.items() if d == "up")
        down = sum(b for (d, _), (_, b) in sums.items() if d == "down")
        print("MQTT on the wire, one session (%d s charging, %d TCP connection(s)): pile->broker %d B, "
              "broker->pile %d B, together %d B (MQTT bytes; TCP/IP headers not counted)" % (
                  charge_s, relay.connections, up, down, up + down))
        for kind in KINDS:
            nu, bu = sums.get(("up", kind), (0, 0))
            nd, bd = sums.get(("down", kind), (0, 0))
            if nu or nd:
                print("MQTT on the wire, %-16s pile->broker %2d packets %5d B, broker->pile %2d packets "
                      "%5d B" % (kind + ":", nu, bu, nd, bd))
        # What a longer session adds, from the sizes just measured: the meter every 10 s, the
        # status heartbeat (and its PUBACK) every 60 s, a PINGREQ/PINGRESP every 30 s at most.
        meter_n, meter_b = sums.get(("up", "meter"), (0, 0))
        status_n, status_b = sums.get(("up", "status"), (0, 0))
        ack_n, ack_b = sums.get(("down", "status"), (0, 0))
        if meter_n and status_n and ack_n:
            hour = 360 * meter_b / meter_n + 60 * (status_b / status_n + ack_b / ack_n) + 120 * 4
            print("MQTT on the wire, each further hour of charging adds about %.0f kB (estimate from "
                  "these sizes: meter %d B, status %d B)" % (
                      hour / 1000, meter_b / meter_n, status_b / status_n))
    return report


# -- heap ----------------------------------------------------------------------------------------

def run_ok(r):
    if r.returncode != 0 or not r.result or r.result["boots"] != 1:
        return False
    if any("MemoryError" in x or "memory allocation failed" in x for x in r.lines):
        return False
    return any("-> idle" in t for _, t in r.firmware_events("charger"))


def heap_figures(meter, mqtt_port, records):
    """Bisect the firmware budget (KiB) at which the normal session still completes; then the
    live heap after gc.collect() at the end of a run with the default budget."""
    config = {"meter": {"type": meter}}
    if not records:  # without a pile id no session is recorded: no outbox, no journal
        config["pile_id"] = None
    high = 160
    default = unix_port.DEFAULT_HEAP
    if mqtt_port:
        config.update(mqtt_config(mqtt_port, "bench-heap-" + meter))
        high, default = 320, unix_port.MQTT_HEAP
    low = 16
    step = 4 if QUICK else 1
    while high - low > step:
        mid = (low + high) // 2
        if mqtt_port:  # each run's session id is new to the broker's consumer
            config["pile_id"] = "bench-heap-%s-%d" % (meter, mid)
        if run_ok(unix_port.run_scenario("normal", heapsize="%dk" % mid, config=config)):
            high = mid
        else:
            low = mid
    if mqtt_port:  # not the last bisection step's: the consumer would see a conflicting session
        config["pile_id"] = "bench-heap-%s-default" % meter
    r = unix_port.run_scenario("normal", heapsize=default, config=config)
    if not run_ok(r):
        raise RuntimeError("normal session, meter %s, failed:\n%s" % (meter, "\n".join(r.lines[-20:])))
    return high, r.result["heap_after_collect"] - r.result["heap_simulator"], r.result["heap_simulator"]


def bench_heap(pool, broker):
    configs = [("charging core alone (no pile_id, no meter)", "none", None, False)]
    configs += [("session records, meter %s" % m, m, None, True) for m in ("none", "s0", "ddsu666", "dlt645")]
    configs += [("session records, meter ddsu666, MQTT link", "ddsu666", broker.port, True)]
    soak = None
    if os.path.exists(os.path.join(ROOT, "tools", "soak.py")):  # the soak first: its run is the longest
        soak = pool.submit(soak_run, 10 if QUICK else 40)
    futures = [(label, pool.submit(heap_figures, m, port, records)) for label, m, port, records in configs]

    def report():
        for label, f in futures:
            smallest, live, sim = f.result()
            print("heap, %-44s a full session needs a firmware heap of %3d KiB; live after "
                  "gc.collect() at the end: firmware %d B (simulator %d B beside it)" % (
                      label + ":", smallest, live, sim))
        if soak is None:
            print("heap over a soak (after collection, each session's end): from `make soak` "
                  "(tools/soak.py), not measured here")
            return
        sessions, code, lines = soak.result()
        figures = lines[lines.index("---- soak figures") + 1:] if "---- soak figures" in lines else []
        shown = [x for x in figures if x.startswith(("sessions:", "duration:", "firmware heap"))]
        for line in shown:
            print("heap, soak of %d sessions (tools/soak.py, no power cuts, no broker faults): %s" % (
                sessions, line))
        if code != 0 or len(shown) < 3:
            print("heap, soak: tools/soak.py exited %s; its last lines:\n  %s" % (
                code, "\n  ".join(lines[-10:])))
    return report


def soak_run(sessions):
    """A short quiet soak (tools/soak.py, another engineer's, when present): the firmware's live
    heap after gc.collect() at each session's end, over many sessions in one process."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "soak.py"), "--sessions", str(sessions),
                          "--seed", "1", "--no-kills", "--no-broker-faults"],
                         capture_output=True, text=True, timeout=1800)
    return sessions, out.returncode, (out.stdout + out.stderr).splitlines()


# -- main ----------------------------------------------------------------------------------------

def main(argv):
    asked = argv or list(SECTIONS)
    unknown = [a for a in asked if a not in SECTIONS]
    if unknown:
        raise SystemExit("unknown section %s; choose from %s" % (", ".join(unknown), " ".join(SECTIONS)))
    procs.stop_on_sigterm()
    start = time.monotonic()
    print("Pile firmware benchmark on the MicroPython unix port (%s), %s" % (
        unix_port.micropython_binary(), machine_info.when_and_where()))
    unix_port.micropypath()  # compile the bytecode once, before runs start in parallel
    if "ticks" in asked:  # alone: the other runs would share its CPU
        bench_ticks()
    if "mpy" in asked:
        bench_mpy()
    rest = [s for s in ("latency", "wire", "heap", "heap32") if s in asked]
    if "heap32" in rest:
        chipheap.variants()  # builds the chip image (cached) before runs start in parallel
    if rest:
        run_parallel(rest, start)
    cal = None
    if "chip" in asked:  # callgrind counts instructions: the host's load does not change them
        cal = chipmodel.Calibration(chipmodel.main()["per_pystone"])
    if "ota" in asked:  # the same binary: WHAT=chip's calibration holds
        chipota.main(cal)
    if "growth" in asked:  # counts on the virtual clock: the host's load does not change them
        chipgrowth.main()
    print("bench took %.0f s" % (time.monotonic() - start))


def run_parallel(sections, start):
    with tempfile.TemporaryDirectory(prefix="pile-bench-broker-") as tmp:
        broker = cloud.LocalBroker(tmp, "mosquitto")
        hole = BlackHole()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=JOBS)
        try:
            reports = []
            # The longest first: the latency runs, then the heap bisections fill in around them.
            if "latency" in sections:
                reports.append(("latency", bench_latency(pool, broker, hole)))
            if "wire" in sections:
                reports.append(("wire", bench_wire(pool, broker)))
            if "heap" in sections:
                reports.append(("heap", bench_heap(pool, broker)))
            if "heap32" in sections:
                reports.append(("heap32", chipheap.bench(pool, broker)))
            print("runs on %d processes at once ..." % JOBS, flush=True)
            for name, report in reports:
                report()
                print("(%s done at %.0f s)" % (name, time.monotonic() - start), flush=True)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            hole.close()
            broker.stop()

