"""`make bench WHAT=heap32`: the firmware's heap on the chip's terms, on the unix port shaped like
the ESP32 (32-bit words, single-precision floats): loaded as .mpy files (the stock 32-bit
binary, what a technician flashes onto a stock image) and frozen into the image from
manifest.py (the chip build, pilehost/chipbuild.py: bytecode out of the heap, the production
image for an ESP32-WROOM).

Per configuration: the smallest whole heap (-X heapsize) with which the normal session
completes, bisected, minus the simulator's own live heap measured in the same run (net of the
simulator); then a run at the target (issue 12: 56 KiB frozen, 96 KiB as .mpy, with the MQTT
link) plus the simulator's share: does the session complete, and the largest free block after
it (sim/rom.py largest_free_block) against the link's biggest allocation."""
import os

from . import chipbuild, unix_port

TARGET_FROZEN_KIB = 56
TARGET_MPY_KIB = 96
# The link's biggest allocation: its out-buffer, a bytearray(2048) (firmware/mqtt_conn.py
# _OUT_SIZE), made when the link is built; a reconnect reuses it. The largest transient one seen
# is ~1.3 KiB (command_auth, unix_port.MQTT_HEAP's note).
LINK_BIGGEST_B = 2048


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
    out = []
    unix32 = unix_port.unix32_binary()
    if unix32:
        out.append(("32-bit, firmware as .mpy", unix32, None, TARGET_MPY_KIB))
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
                                      heapsize="%dk" % kib, exact_heap=True, program=program, path=path)

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

    def report():
        lines = []
        for label, link, future in jobs:
            line = report_line(label, link, future.result())
            out(line)
            lines.append(line)
        os.makedirs(chipbuild.CHIP_DIR, exist_ok=True)
        with open(os.path.join(chipbuild.CHIP_DIR, "heap32.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return report
