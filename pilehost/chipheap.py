"""`make bench WHAT=heap32`: the firmware's heap on the chip's terms, on the unix port shaped like
the ESP32 (32-bit words, single-precision floats): loaded as .mpy files onto a stock image (what
a technician flashes, in the run's flash folder as in a pile's flash root: pilehost/chipbuild.py's
stock build, the 32-bit configuration with what a stock ESP32 image freezes that the firmware
imports, umqtt.simple, and its flash_files) and frozen into the image from manifest.py (the chip
build, pilehost/chipbuild.py: bytecode out of the heap, the production image for an ESP32-WROOM).

Per configuration: the smallest whole heap (-X heapsize) with which the normal session
completes, bisected, minus the simulator's own live heap measured in the same run (net of the
simulator); then a run at the target (issue 12: 56 KiB frozen, 96 KiB as .mpy, with the MQTT
link) plus the simulator's share: does the session complete, and the largest free block after
it (sim/rom.py largest_free_block) against the link's biggest allocation.

The simulator's share is taken once, at the start (sim/rom.py: gc.mem_alloc() after the world is
built, before boot.py). That is its whole share (2026-12-07, hw-simheap): it makes its
long-lived state up front (the RS-485 line's receive and wire buffers, sim/rs485.py, where the
ESP32's UART driver keeps its ring outside the heap) and allocates nothing at the firmware's
pilot reads, pins, idles and watchdog feeds (test_heap_simulator.py), as a chip's hardware calls
do not. Before, on the 32-bit port, a pilot read made ~230 B of long ints (an LCG's, and the
long-int objects mpy-tool.py freezes a constant tuple's ints beyond +-8191 into) and kept one:
~650 KB of the simulator's garbage in a 7 s session, now ~90 KB (a meter reply's ~0.8 KB, its
log lines, its energy integration's floats); its state grew ~0.4 KB in the run, and held
<= 0.2 KB beyond its start at the failing moments. That garbage had helped the firmware (presumably
the collections it set off left its long-lived objects less scattered): without it the
session completes at ~1 KiB more whole heap, ~0.2-0.7 KiB more net of the simulator (README,
"The simulator's share"). The failing allocations' fragmentation is the firmware's own.

A run at the boundary ends: the scenario's end, and the watchdog's reset, reach the ROM at any
heap (sim/world.py: no step or watchdog after the end, END_GRACE_US, a spare exception), and a
run that does not end within its timeout is killed with unix_port.ScenarioTimeout, never waited
on (a need.py run hung >16 min at 105 KiB when the watchdog's SimReset replaced the end's SimEnd
in main.run()'s `finally`)."""
import json
import os
import subprocess
import tempfile

from . import ROOT, chipbuild, unix_port

TARGET_FROZEN_KIB = 56
TARGET_MPY_KIB = 96
# The link's biggest allocation at run time: a session record copied out of the outbox for its
# publish (firmware/journal.py pending(): at most _PAYLOAD_LIMIT, 1,024 B; ~450 B for a normal
# `session/ended`). Its buffers (the 2,048 B out-buffer, the 1,024 B in-buffer) are made once
# at boot, by wiring.py at the settings (handed over to the link), and reused: the out-buffer is
# compacted in place (no copy), a command is read into the in-buffer. Status, health and acks are
# JSON of a few hundred bytes (test_heap_lazy.py checks the largest against this).
LINK_BIGGEST_B = 1024


def _ok(r):
    if r.returncode != 0 or not r.result or r.result["boots"] != 1:
        return False
    if any("MemoryError" in x or "memory allocation failed" in x or "line(s) lost" in x for x in r.lines):
        return False
    return any("-> idle" in t for _, t in r.firmware_events("charger"))


def _config(mqtt_port, pile_id):
    conf = {"meter": {"type": "ddsu666"}, "pile_id": pile_id}
    if mqtt_port:
        conf["mqtt"] = {"host": "127.0.0.1", "port": mqtt_port, "keepalive_s": 10}
    return conf


def variants():
    """(label, program, MICROPYPATH, target KiB) for the binaries on this machine."""
    out = [("32-bit stock image, firmware as .mpy", chipbuild.stock_binary(),
            chipbuild.stock_micropypath(), TARGET_MPY_KIB)]
    out.append(("32-bit, firmware frozen (manifest.py)", chipbuild.chip_binary(),
                chipbuild.frozen_micropypath(), TARGET_FROZEN_KIB))
    return out


def measure(label, program, path, target_kib, mqtt_port, step_kib=1):
    """{'need_kib', 'sim_b', 'at_target': (ok, largest free block B, live B)}."""
    tag = "".join(c for c in label if c.isalnum())[:20]
    seq = [0]

    def run(kib):
        seq[0] += 1
        return unix_port.run_scenario("normal", config=_config(mqtt_port, "h32-%s-%d" % (tag, seq[0])),
                                      heapsize="%dk" % kib, exact_heap=True, program=program, path=path,
                                      files=chipbuild.flash_files(program))

    big = run(400)
    if not _ok(big):
        raise RuntimeError("%s: the normal session fails even with 400 KiB:\n%s" % (
            label, "\n".join(big.lines[-20:])))
    sim_b = big.result["heap_simulator"]
    low, high = sim_b // 1024, 400
    while high - low > step_kib:
        mid = (low + high) // 2
        if _ok(run(mid)):
            high = mid
        else:
            low = mid
    need_kib = high - sim_b / 1024.0
    target_total = target_kib + (sim_b + 1023) // 1024
    r = run(target_total)
    at_target = (_ok(r), r.result.get("largest_free_block") if r.result else None,
                 (r.result["heap_after_collect"] - sim_b) if r.result else None)
    return {"need_kib": need_kib, "sim_b": sim_b, "whole_kib": high, "at_target": at_target,
            "target_kib": target_kib}


def report_line(label, link, m):
    ok, largest, live = m["at_target"]
    over = m["need_kib"] - m["target_kib"]
    verdict = "met" if over <= 0 else "MISSED by %.1f KiB" % over
    line = ("heap32, %-38s %-9s a full session needs %5.1f KiB net of the simulator (%d KiB whole heap, "
            "simulator %d B)" % (label + ",", link + ":", m["need_kib"], m["whole_kib"], m["sim_b"]))
    if link == "MQTT":
        line += "; target %d KiB: %s; at the target: session %s, largest free block after it %s B " \
                "(link's biggest allocation %d B), live %s B" % (
                    m["target_kib"], verdict, "completes" if ok else "FAILS",
                    "-" if largest is None else largest, LINK_BIGGEST_B, "-" if live is None else live)
    return line


def link_label(port):
    return "MQTT" if port else "no link"


def envelope():
    return os.environ.get("QUICK", "") not in ("", "0")


def bench(pool, broker, out=print):
    """bench.py's heap32 section: the runs go to the pool; the returned report() prints them."""
    step = 4 if envelope() else 1
    jobs = []
    for label, program, path, target in variants():
        for port in (broker.port, None):
            future = pool.submit(measure, label, program, path, target, port, step)
            jobs.append((label, link_label(port), future))

    stock, path = chipbuild.stock_binary(), chipbuild.stock_micropypath()
    modules = pool.submit(session_modules, broker.port, stock, path)
    breakdown = pool.submit(module_breakdown, stock, path)

    def report():
        lines = []
        for line in breakdown_lines(breakdown.result(), modules.result()):
            out(line)
            lines.append(line)
        for label, link, future in jobs:
            line = report_line(label, link, future.result())
            out(line)
            lines.append(line)
        os.makedirs(chipbuild.CHIP_DIR, exist_ok=True)
        with open(os.path.join(chipbuild.CHIP_DIR, "heap32.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return report


# The breakdown: each module imported on the 32-bit binary (sim/heap_probe.py), first alone to
# learn what it brings in, then with those dependencies loaded first: its own live bytes.
_LIB_MODULES = ("umqtt.simple",)


def firmware_modules():
    names = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "firmware"))
                   if n.endswith(".py") and n not in ("boot.py", "main.py"))
    return names + list(_LIB_MODULES)


def _probe(program, path, module, deps=()):
    env = dict(os.environ, MICROPYPATH=path)
    with tempfile.TemporaryDirectory(prefix="heap-probe-") as cwd:
        unix_port.link_files(cwd, chipbuild.flash_files(program))
        r = subprocess.run([program, "-X", "heapsize=400k", "-m", "heap_probe", module, ",".join(deps)],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    for line in r.stdout.splitlines():
        if line.startswith(_PROBE_PREFIX):
            return json.loads(line[len(_PROBE_PREFIX):])
    raise RuntimeError("heap probe of %s failed:\n%s%s" % (module, r.stdout[-2000:], r.stderr[-2000:]))


_PROBE_PREFIX = "HEAP-PROBE "


def module_breakdown(program=None, path=None):
    """{module: {'own', 'with_deps', 'garbage', 'peak', 'loaded'}} on the 32-bit binary, .mpy."""
    program = program or unix_port.unix32_binary()
    path = path or unix_port.micropypath()
    out = {}
    for name in firmware_modules():
        alone = _probe(program, path, name)
        deps = [m for m in alone["loaded"] if m != name and m != name.split(".")[0]]
        own = _probe(program, path, name, deps) if deps else alone
        out[name] = {"own": own["live"], "with_deps": alone["live"], "garbage": own["garbage"],
                     "peak": own["peak"], "loaded": alone["loaded"]}
    return out


def session_modules(mqtt_port, program=None, path=None):
    """The firmware modules a full normal session has loaded at its end (sim/rom.py's result)."""
    program = program or unix_port.unix32_binary()
    r = unix_port.run_scenario("normal", config=_config(mqtt_port, "h32-modules"), heapsize="400k",
                               exact_heap=True, program=program, path=path,
                               files=chipbuild.flash_files(program))
    if not _ok(r):
        raise RuntimeError("the normal session failed:\n" + "\n".join(r.lines[-20:]))
    return r.result["modules"]


def breakdown_lines(breakdown, loaded):
    """The table: one line per module, the session's modules first, largest first."""
    rows = sorted(breakdown.items(), key=lambda kv: (kv[0] not in loaded, -kv[1]["own"]))
    lines = ["heap32 breakdown (32-bit stock image, .mpy): a module's own live bytes after its "
             "import (bytecode, qstrs, module objects; a frozen one's only its module objects), the "
             "garbage and transient peak of that import; * = loaded in a full session with the MQTT "
             "link"]
    total = 0
    for name, b in rows:
        mark = "*" if name in loaded else " "
        if name in loaded:
            total += b["own"]
        lines.append("  %s %-15s own %6d B   garbage %5d B   peak %s B" % (
            mark, name, b["own"], b["garbage"], "-" if b["peak"] is None else "%6d" % b["peak"]))
    lines.append("  the session's modules together: %d B (%.1f KiB)" % (total, total / 1024.0))
    return lines
