"""`make bench WHAT=ota`: what a signed update costs on the chip, by the chip-time model's method
(pilehost/chipmodel.py: its callgrind run, calibration and flash model, used here, not copied).

The release is real: every firmware and lib/ module compiled for the ESP32 (mpy-cross
-march=xtensawin, pilehost/release.py), its manifest signed with a fresh RSA-2048 key. On the chip
build (firmware frozen), sim/chip_ota.py runs, under callgrind, each slow step of firmware/ota.py
between two cuts: the verification's parts (one `pow` on 2048-bit integers is one C call, it
cannot be sliced), every step of the download (a chunk appended and hashed), the switch, and
the resume after a power cut, which checks the manifest again, then hashes again the part of a
file of ota.MAX_FILE bytes, a few chunks a step (all of it in one step took ~0.95 s on the slow
bound: next to the watchdog's 1 s minimum). Flash writes are timed as the chip model times them
(W25Q32JV under LittleFS's rules).

Each of these steps runs only with the contactor open and no session (ota.Updater.idle():
host_tests/test_ota_session.py checks it with a car arriving at every step); the figures say
how long the pile's loop stops for them: the pilot is not read meanwhile, and the watchdog
(config wdt_timeout_ms, 1,000 ms at least) must not expire.
"""
import json
import os
import random
import tempfile
import time

from . import ROOT, chipbuild, chipmodel, firmware_module, release

BOARD = "ref-esp32"
VERSION = "0.0.0-chip"
HEAP = "512k"
OUT_DIR = chipmodel.OUT_DIR
KEY_FILE = os.path.join(OUT_DIR, "ota-bench-key.pem")  # made once: the same run every time
POW_SAMPLES = 8  # more moduli and signatures for pow alone: its count depends on their bits
POW_SEED = 13


def bench_key():
    if not os.path.exists(KEY_FILE):
        os.makedirs(OUT_DIR, exist_ok=True)
        release.save_key(release.generate_key(), KEY_FILE)
    return release.load_key(KEY_FILE)


def pow_samples(n=POW_SAMPLES, bits=2048):
    """[(modulus hex, s hex)]: odd 2048-bit moduli with the top bit set and an s below each, from
    a fixed seed (pow's work does not depend on the modulus being an RSA key)."""
    rnd = random.Random(POW_SEED)
    out = []
    for _ in range(n):
        m = rnd.getrandbits(bits) | (1 << (bits - 1)) | 1
        out.append(("%x" % m, "%x" % rnd.randrange(1, m)))
    return out


def _ota_constants():
    """CHUNK and MAX_FILE of firmware/ota.py (const() lines), without importing it on CPython."""
    out = {}
    with open(os.path.join(ROOT, "firmware", "ota.py")) as f:
        for line in f:
            for name in ("CHUNK", "MAX_FILE"):
                if line.startswith(name + " = const("):
                    out[name] = int(line.split("const(")[1].split(")")[0])
    return out["CHUNK"], out["MAX_FILE"]


def prepare(folder, key):
    """The flash folders sim/chip_ota.py reads (its docstring); the release's files."""
    chunk, max_file = _ota_constants()
    files = release.build_files(VERSION)
    big = ("big.bin", bytes(range(256)) * (max_file // 256))
    m1 = release.sign_manifest(key, 1, VERSION, [BOARD], files)
    m2 = release.sign_manifest(key, 2, VERSION, [BOARD], files + [big])

    def put(path, data):
        full = os.path.join(folder, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)

    put("a/rel/1/manifest", m1)
    for path, data in files:
        put("a/src/" + path, data)
        put("b/rel/2/" + path, data)
    put("b/rel/2/manifest", m2)
    part = len(big[1]) - len(big[1]) % chunk
    if part == len(big[1]):
        part -= chunk
    put("b/rel/2/" + big[0] + ".part", big[1][:part])
    put("b/src/" + big[0], big[1])
    with open(os.path.join(folder, "ota_run.json"), "w") as f:
        json.dump({"key": release.public_hex(key), "board": BOARD,
                   "big": [len(files), big[0], len(big[1])], "pow": pow_samples()}, f)
    return files, m1


def run(binary, key):
    """[step dict with 'ir'], the release's files, its manifest."""
    with tempfile.TemporaryDirectory(prefix="pile-chipota-") as folder:
        files, manifest = prepare(folder, key)
        out_file = os.path.join(folder, "callgrind.out")
        env = dict(os.environ, MICROPYPATH=chipbuild.frozen_micropypath())
        stdout = chipmodel.callgrind(binary, ["-X", "heapsize=" + HEAP, "-m", "chip_ota"], folder, env,
                                     out_file)
        irs = chipmodel.dump_totals(out_file)
    steps = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("OTA {")]
    if not any(line.startswith("OTA END %d" % len(steps)) for line in stdout.splitlines()):
        raise RuntimeError("the OTA run did not finish:\n" + stdout[-3000:])
    if len(irs) != 2 * len(steps) + 1:  # before each step, the step; the tail
        raise RuntimeError("%d callgrind dumps for %d steps" % (len(irs), len(steps)))
    for i, step in enumerate(steps):
        step["ir"] = irs[2 * i + 1]
    return steps, files, manifest


def _costs(step, cal):
    return chipmodel.costs({"ir": step["ir"], "flash": step["flash"], "meta": step["meta"]}, cal)


def report(steps, files, manifest, cal, took_s, out=print):
    lines = []
    say = lines.append
    total = sum(len(d) for _p, d in files)
    say("ota chip model: %d files, %d B as .mpy (xtensawin), manifest %d B, RSA-2048; "
        "calibration %s; %.0f s" % (len(files), total, len(manifest), cal.per_million(), took_s))
    say("ota, %-58s %9s  %13s  %7s  %6s  %15s" % (
        "step (ESP32 @240 MHz)", "instr.", "CPU fast-slow", "heap B", "er/pg", "total typ/worst"))

    def row(name, c, ir, alloc):
        say("ota, %-58s %9d  %5.1f-%6.1f ms  %7d  %2d/%3d  %6.1f/%7.1f ms" % (
            name[:58], ir, c["cpu"][0], c["cpu"][1], alloc, c["erases"], c["pages"], c["total"][0],
            c["total"][1]))

    figures = {}
    chunks = {"mid": [], "end": [], "rehash": []}
    pows = []
    for s in steps:
        c = _costs(s, cal)
        if s["step"] == "pow sample":
            pows.append(c)
            continue
        if s["step"] == "rehash slice":
            chunks["rehash"].append((c, s))
            continue
        if s["step"].startswith("chunk "):
            kind = s["step"].split()[1]
            chunks[kind].append((c, s))
            if "last" not in s["step"]:
                continue
            name = "the big file's last chunk (file hashed, release staged)"
        else:
            name = s["step"]
        row(name, c, s["ir"], s["alloc"])
        figures[name] = {"ir": s["ir"], "cpu_ms": c["cpu"], "total_ms": c["total"], "alloc": s["alloc"]}
    for kind, label in (("mid", "a chunk inside a file (append, hash)"),
                        ("end", "a chunk that ends a file (+ digest, rename, next file)"),
                        ("rehash", "resume: the big part hashed again, a step")):
        got = chunks[kind]
        if not got:
            continue
        top = max(got, key=lambda cs: cs[0]["total"][1])
        med = sorted(c["total"][0] for c, _s in got)[len(got) // 2]
        row("%s, worst of %d" % (label, len(got)), top[0], top[1]["ir"], top[1]["alloc"])
        say("ota,   median of those %.1f ms (typical flash)" % med)
        figures[label] = {"n": len(got), "median_ms": med, "total_ms": top[0]["total"]}
    if pows:
        cpu = sorted(c["cpu"] for c in pows)
        say("ota, pow(s, 65537, n) over %d more 2048-bit moduli and s: CPU %.0f-%.0f ms (fastest, fast "
            "bound) to %.0f-%.0f ms (slowest)" % (len(pows), cpu[0][0], cpu[0][1], cpu[-1][0], cpu[-1][1]))
        figures["pow samples"] = {"n": len(pows), "cpu_ms": [cpu[0], cpu[-1]]}
    download = [_costs(s, cal) for s in steps if s["step"].startswith("chunk ") and "last" not in s["step"]]
    say("ota, the whole download of release 1 (%d chunk steps, one per loop iteration): CPU %.0f-%.0f ms, "
        "with flash %.1f s typical, %.1f s worst" % (
            len(download), sum(c["cpu"][0] for c in download), sum(c["cpu"][1] for c in download),
            sum(c["total"][0] for c in download) / 1000, sum(c["total"][1] for c in download) / 1000))
    _kind, wdt_default, wdt_min, _max, _choices = firmware_module("config").CONFIG_SCHEMA["wdt_timeout_ms"]
    longest = max(steps, key=lambda s: _costs(s, cal)["total"][0])
    c = _costs(longest, cal)
    say("ota, the longest step: %s: %.0f ms (slow bound, typical flash), %.0f ms with the flash's worst; "
        "the watchdog: %d ms by default, %d at least (config wdt_timeout_ms)" % (
            longest["step"], c["total"][0], c["total"][1], wdt_default, wdt_min))
    figures["longest"] = {"step": longest["step"], "total_ms": c["total"]}
    flashy = max(steps, key=lambda s: _costs(s, cal)["total"][1])
    say("ota, the longest with the flash's worst (data sheet maxima, every erase at once): %s: %.0f ms" % (
        flashy["step"], _costs(flashy, cal)["total"][1]))
    for line in lines:
        out(line)
    return lines, figures


def main(cal=None, out=print):
    """`make bench WHAT=ota`: cal, a chipmodel.Calibration of the same binary (WHAT=chip made one),
    or measured here. Figures also in build/chip/chip-ota.{txt,json}."""
    binary = chipmodel.model_binary(out)
    start = time.monotonic()
    if cal is None:
        cal = chipmodel.Calibration(chipmodel.instructions_per_pystone(binary))
    steps, files, manifest = run(binary, bench_key())
    lines, figures = report(steps, files, manifest, cal, time.monotonic() - start, out=out)
    chipmodel.save_figures("chip-ota", "make bench WHAT=ota", lines,
                           {"figures": figures, "steps": steps, "per_pystone": cal.per_pystone})
    return figures

