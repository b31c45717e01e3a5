"""`make bench WHAT=growth`: does the firmware's heap grow over 1,000 sessions on the chip's
terms (issue 12: no growth over 1,000 sessions; the largest free block after a session stays
above the biggest allocation the link makes)?

One lifetime of whole sessions back to back (plug, charge with the meter read and published,
the car stops, unplug, the records published and acknowledged over MQTT), on the unix port
shaped like the ESP32 (32-bit words, single-precision floats), in sim/chip_growth.py: the chip
model's virtual clock and in-simulator broker, so that a session's 5-15 s of pile time take a
fraction of a second (time moves only by sleeps) and the run is the same run every time. Two
configurations, each in a heap of the firmware's target (pilehost/chipheap.py) plus the
simulator's own live heap:
- the firmware frozen into the chip image (pilehost/chipbuild.py), the production image;
- the firmware as .mpy files on the stock 32-bit binary (what a technician flashes). The .mpy
  firmware misses its 96 KiB target (`WHAT=heap32`), so it runs in MPY_NET_KIB instead.

Every `every` sessions, after a gc.collect() at the end of the control-loop iteration: the live
heap net of the simulator and the largest free block (sim/rom.py largest_free_block, a bytearray
probe). Figures: first/last/max live heap, the slope per 100 sessions after the warm-up
(least squares), the least largest free block against the link's biggest allocation.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

from . import chipbuild, chipheap, chipmodel, machine_info, unix_port

SESSIONS = 1000
QUICK_SESSIONS = 100
EVERY = 10
WARMUP = 10  # sessions before the heap is taken as settled: the slope starts after them
# The .mpy firmware needs ~140 KiB for one session with the link (WHAT=heap32); in 160 KiB a
# record's close ran out of memory at the 20th session (12 s sessions, chip_net's copying broker;
# MemoryError for 392 B with 20 KiB free: a fragmented heap), the pile reset: it runs in 192.
MPY_NET_KIB = 192
# The test's bound (host_tests/test_chipgrowth.py) and the bench's verdict: after the warm-up the
# live heap stays within this of the most it reached during the warm-up. The live heap after a
# session varies by ~300 B with where the status and meter timers (10 s) fall in the session.
GROWTH_BOUND_B = 512
# A session, in ms from its start: plug, the car asks for power, charging, the car stops (C->B),
# unplug, then 1.8 s (the ended record is out 20-520 ms after the unplug, with the first meter
# reading) before the next plug; the probe 300 ms before it. Sessions repeat
# CYCLE: four of 2 s of charging, then one of the chip model's 12 s (a checkpoint at 10 s); the
# meter is read all along, its reading and the status published every 10 s, whatever the session.
SHORT_CHARGE_S = 2
LONG_CHARGE_S = chipmodel.CHARGE_S


def _kind(charge_s):
    stop = 700 + charge_s * 1000
    return [stop + 2300, [[0, "plug"], [700, "request"], [stop, "stop_request"], [stop + 500, "unplug"]]]


CYCLE = [_kind(SHORT_CHARGE_S)] * 4 + [_kind(LONG_CHARGE_S)]
PROBE_BEFORE_MS = 300
FIRST_MS = 2000  # after boot: the link is up
# The pilot burst's ADC read (sim/chip_growth.py): 35 us on the chip; 100 us here, 11 reads a
# 1.1 ms burst instead of 31. The burst allocates nothing; the run takes half the time.
ADC_US = 100
LINK_BIGGEST_B = chipheap.LINK_BIGGEST_B
PREFIX = "GROWTH "


def variants():
    """(label, program, MICROPYPATH, net KiB): frozen first, then .mpy where the 32-bit stock
    binary is on this machine."""
    out = [("frozen", chipbuild.chip_binary(), chipbuild.frozen_micropypath(), chipheap.TARGET_FROZEN_KIB)]
    unix32 = unix_port.unix32_binary()
    if unix32:
        out.append((".mpy", unix32, unix_port.micropypath(), MPY_NET_KIB))
    return out


def plan(sessions, every, leak_b=0):
    return {"sessions": sessions, "every": every, "first_ms": FIRST_MS, "cycle": CYCLE,
            "probe_before_ms": PROBE_BEFORE_MS, "adc_us": ADC_US, "leak_b": leak_b}


class Run:
    """One lifetime's output: samples (session, live, largest block, free, started, ended,
    connects), the resets, the end line."""

    def __init__(self, lines, returncode, heapsize, every):
        self.every = every
        self.lines = lines
        self.returncode = returncode
        self.heapsize = heapsize
        self.samples = []
        self.resets = [x for x in lines if x.startswith("GROWTH-RESET")]
        self.end = None
        self.base = None  # the simulator's live heap (B), the usable heap (B)
        self.errors = [x for x in lines if "MemoryError" in x or "memory allocation failed" in x
                       or "Traceback" in x]
        for line in lines:
            if line.startswith(PREFIX):
                self.samples.append(tuple(int(v) for v in line.split()[1:]))
            elif line.startswith("GROWTH-BASE "):
                self.base = tuple(int(v) for v in line.split()[1:])
            elif line.startswith("GROWTH-END "):
                self.end = line.split()[1:]

    def problems(self, sessions):
        """What went wrong, as sentences; empty when every session completed with its records."""
        out = []
        if self.returncode != 0:
            out.append("exit %d" % self.returncode)
        if self.resets:
            out.append("the pile reset: %s" % self.resets[0])
        out += self.errors[:3]
        if self.end is None or int(self.end[0]) != sessions:
            out.append("%s of %d sessions probed" % (self.end[0] if self.end else "none", sessions))
        for s in self.samples:
            k, _, _, _, started, ended, connects = s
            if started != k or ended != k:
                out.append("after session %d: %d started and %d ended records published (exactly "
                           "one each a session)" % (k, started, ended))
                break
            if connects != 1:
                out.append("after session %d: %d MQTT connects (the link dropped)" % (k, connects))
                break
        return out


def run(program, path, net_kib, sessions, every, sim_b=None, leak_b=0, timeout=7200, progress=None):
    """One lifetime in a heap of net_kib plus the simulator's share (sim_b; measured by a
    one-session run in a large heap when None); progress(line) with each GROWTH line as it comes."""
    if sim_b is None:
        sim_b = simulator_share(program, path)
    heapsize = "%dk" % (net_kib + (sim_b + 1023) // 1024)
    conf = chipmodel.chip_scenario()[0]
    with tempfile.TemporaryDirectory(prefix="pile-growth-") as flash:
        unix_port.prepare_flash(flash, config=conf, steps=[])
        with open(os.path.join(flash, "growth.json"), "w") as f:
            json.dump(plan(sessions, every, leak_b), f)
        proc = subprocess.Popen([program, "-X", "heapsize=" + heapsize, "-m", "chip_growth"], cwd=flash,
                                env=dict(os.environ, MICROPYPATH=path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if progress is not None and line.startswith(PREFIX):
                    progress(line.rstrip("\n"))
            returncode = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Run(lines, returncode, heapsize, every)


def simulator_share(program, path):
    """The simulator's own live heap (B) in this ROM: the first sample's free heap tells it."""
    r = run(program, path, 512, 1, 1, sim_b=0)
    if r.problems(1) or not r.samples:
        raise RuntimeError("one session in 512 KiB fails: %s\n%s" % (r.problems(1), "\n".join(r.lines[-20:])))
    return r.base[0]


def slope_per_100(samples, warmup=WARMUP):
    """Least-squares slope of the live heap (B per 100 sessions) over the samples after warm-up."""
    pts = [(s[0], s[1]) for s in samples if s[0] > warmup]
    if len(pts) < 2:
        return 0.0
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return 100.0 * sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0


def growth_beyond(samples, warmup=WARMUP, bound=GROWTH_BOUND_B):
    """The first sample past the warm-up whose live heap exceeds the warm-up's most plus bound:
    (session, live B, warm-up's most B), or None."""
    early = [s[1] for s in samples if s[0] <= warmup]
    if not early:
        return None
    for s in samples:
        if s[0] > warmup and s[1] > max(early) + bound:
            return s[0], s[1], max(early)
    return None


def figures(run_, warmup=WARMUP):
    """{'first', 'last', 'max', 'settled_min', 'settled_max', 'slope', 'min_block'} over the samples."""
    s = run_.samples
    live = [x[1] for x in s]
    settled = [x[1] for x in s if x[0] > warmup] or live
    return {"first": live[0], "last": live[-1], "max": max(live), "settled_min": min(settled),
            "settled_max": max(settled), "slope": slope_per_100(s, warmup),
            "min_block": min(x[2] for x in s), "min_free": min(x[3] for x in s)}


def report(label, net_kib, sim_b, run_, sessions, seconds):
    f = figures(run_)
    bad = run_.problems(sessions)
    verdict = "; ".join(bad) if bad else "all %d sessions complete, records published once each " \
        "and acknowledged, one MQTT connection" % sessions
    grew = growth_beyond(run_.samples)
    if grew is None:
        growth = "no growth (within %d B of the warm-up's most)" % GROWTH_BOUND_B
    else:
        over = [x for x in run_.samples if x[0] > WARMUP and x[1] > grew[2] + GROWTH_BOUND_B]
        growth = "above the warm-up's most (%d B) + %d B after sessions %d-%d (up to %d B)" % (
            grew[2], GROWTH_BOUND_B, over[0][0], over[-1][0], max(x[1] for x in over))
        growth += ", back within it at the end: no lasting growth" if f["last"] <= grew[2] + GROWTH_BOUND_B \
            else ": GROWTH"
    return ("growth, %-7s %d sessions in %.0f s (heap %s: %d KiB + simulator %d B): %s.\n"
            "  live heap net of the simulator after gc.collect(), every %d sessions: first %d B, last %d B, "
            "max %d B; after session %d: %d..%d B, slope %+.1f B per 100 sessions: %s.\n"
            "  least largest free block %d B (the link's biggest allocation %d B: %s), least free %d B" % (
                label + ",", sessions, seconds, run_.heapsize, net_kib, sim_b, verdict, run_.every,
                f["first"], f["last"], f["max"], WARMUP, f["settled_min"], f["settled_max"], f["slope"],
                growth, f["min_block"], LINK_BIGGEST_B,
                "above" if f["min_block"] > LINK_BIGGEST_B else "NOT above", f["min_free"]))


def lifetime(label, program, path, net_kib, sessions, every):
    """(report line, Run) for one configuration, timed; its samples also go to
    build/chip/growth-<label>.log as they come."""
    t0 = time.monotonic()
    sim_b = simulator_share(program, path)
    log_path = os.path.join(chipbuild.CHIP_DIR, "growth-%s.log" % label.strip("."))
    with open(log_path, "w") as log:
        r = run(program, path, net_kib, sessions, every, sim_b=sim_b,
                progress=lambda line: (log.write(line + "\n"), log.flush()))
    return report(label, net_kib, sim_b, r, sessions, time.monotonic() - t0), r


def default_sessions():
    if "GROWTH_SESSIONS" in os.environ:
        return int(os.environ["GROWTH_SESSIONS"])
    return QUICK_SESSIONS if os.environ.get("QUICK", "") not in ("", "0") else SESSIONS


def main(sessions=None, every=EVERY, out=print):
    """bench.py's growth section: the configurations at once, one process each; the lines also go
    to build/chip/growth.txt."""
    sessions = sessions or default_sessions()
    lines = ["growth: `make bench WHAT=growth` (%d sessions; GROWTH_SESSIONS=n, QUICK=1: %d), %s" % (
        sessions, QUICK_SESSIONS, machine_info.when_and_where(with_platform=True))]
    out(lines[0], flush=True)
    configs = variants()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(configs)) as pool:
        jobs = [pool.submit(lifetime, label, program, path, net_kib, sessions, every)
                for label, program, path, net_kib in configs]
        for job in jobs:
            line, r = job.result()
            out(line, flush=True)
            lines.append(line)
            if r.problems(sessions):
                out("\n".join(r.lines[-30:]))
    os.makedirs(chipbuild.CHIP_DIR, exist_ok=True)
    with open(os.path.join(chipbuild.CHIP_DIR, "growth.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
