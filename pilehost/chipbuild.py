"""The unix-port binaries shaped like the ESP32 (32-bit words, single-precision floats), for the
chip model (pilehost/chipmodel.py) and the heap figures (`make bench WHAT=chip`, `WHAT=heap32`).

- the stock one: ../shared/tools/micropython-unix32/micropython (its BUILD.md), or
  $MICROPYTHON32 (pilehost/unix_port.py unix32_binary);
- the chip build, built here from ../shared/tools/micropython-src.tar.gz into build/chip/ once
  and again only when its inputs change: the same configuration as the stock one, plus
  sim/chipmark/ (the model's two C hooks, never in a pile's image) and the firmware frozen in
  from manifest.py (its bytecode out of the heap, as in a production image), with symbols
  (callgrind names the hooks). A build takes about a minute on 2 cores; it needs Debian's
  gcc-multilib (as root it is installed).
"""
import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile

from . import ROOT, unix_port

SHARED_TOOLS = os.path.normpath(os.path.join(ROOT, "..", "shared", "tools"))
if not os.path.isdir(SHARED_TOOLS):  # a worktree under /work/wt/<name>: shared/ is two up
    SHARED_TOOLS = os.path.normpath(os.path.join(ROOT, "..", "..", "shared", "tools"))
SOURCE_TARBALL = os.path.join(SHARED_TOOLS, "micropython-src.tar.gz")
SOURCE_COMMIT = "1c3c201149f37fe8d81246191b3127bb198d6306"  # the tarball's (its README)
CHIP_DIR = os.path.join(ROOT, "build", "chip")
CHIP_BINARY = os.path.join(CHIP_DIR, "micropython-chip")


def frozen_micropypath():
    """MICROPYPATH for the chip build with the firmware frozen: the simulator as bytecode, then
    the frozen modules, then firmware/ for boot.py and main.py only (source, as on a pile)."""
    unix_port.compile_for_unix()
    return ":".join([os.path.join(unix_port.UNIX_BUILD, "sim"), ".frozen", os.path.join(ROOT, "firmware")])


def manifest_modules():
    """(module file, base folder) for each module manifest.py freezes: its module() calls as
    they are, its require()s (micropython-lib's) from lib/ as `make deps` fetched them."""
    frozen = []

    def module(name, base_path="."):
        frozen.append((name, os.path.join(ROOT, base_path)))

    def require(name):
        rel = {"umqtt.simple": "umqtt/simple.py"}[name]
        frozen.append((rel, os.path.join(ROOT, "lib")))

    with open(os.path.join(ROOT, "manifest.py")) as f:
        code = f.read()
    exec(compile(code, "manifest.py", "exec"), {"metadata": lambda **k: None, "require": require,
                                                 "module": module})
    return frozen


def _inputs_digest(frozen):
    h = hashlib.sha256()
    paths = [SOURCE_TARBALL, os.path.join(ROOT, "sim", "chipmark", "chipmark.c"),
             os.path.join(ROOT, "sim", "chipmark", "micropython.mk"), __file__]
    paths += [os.path.join(base, name) for name, base in frozen]
    for p in paths:
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def chip_binary(log=print):
    """build/chip/micropython-chip, built when missing or out of date; its path. One build at a
    time (a lock file: test workers and bench runs ask at once), installed by a rename, so that a
    run of the previous binary is never cut off ("text file busy")."""
    return _locked_build("chip", manifest_modules(), CHIP_BINARY, chipmark=True, log=log)


# What a stock ESP32 image (ports/esp32/boards/manifest.py at SOURCE_COMMIT: asyncio,
# bundle-networking, dht, ds18x20, neopixel, onewire, umqtt.robust, umqtt.simple, upysh) freezes
# that the firmware imports: umqtt.simple. On that image sys.path is '', '.frozen', '/lib' (py/
# runtime.c, the port's _boot.py), so the image's own umqtt.simple is the one a pile runs, its
# bytecode out of the heap; the copy `make flash` puts in /lib is shadowed. The stand-in frozen here
# is lib/'s (`make deps`); the image's is micropython-lib's 1.8.0 (README: the MQTT tests pass
# with both). The simulator's modules are frozen too: a pile has none of them, and as bytecode
# their ~290 qstrs went into the heap's qstr pools ahead of the firmware's. Those pools double
# from 20 entries on any image (py/qstr.c qstr_add: twice the last pool's; the ROM's and
# mpy-tool.py's frozen pool declare 10): 20, 40, ... 640, 1,280, full at 1,260 qstrs in all. The
# simulator's pushed the firmware's ~980 past that into a seventh pool of 1,280 entries (~9 KiB)
# a pile never allocates (test_heap_cuts.py keeps the firmware's under it).
STOCK_FROZEN = (("umqtt/simple.py", os.path.join(ROOT, "lib")),) + tuple(
    (name + ".py", os.path.join(ROOT, "sim"))
    for name in ("rom", "world", "machine", "network", "meters", "rs485", "scenarios", "sim_time"))
STOCK_BINARY = os.path.join(CHIP_DIR, "micropython-stock")


def stock_binary(log=print):
    """build/chip/micropython-stock: the stock 32-bit configuration with STOCK_FROZEN frozen in
    (umqtt.simple, the simulator), a stock ESP32 image as a technician's `.mpy` files meet it
    (`make bench WHAT=heap32`)."""
    return _locked_build("stock", STOCK_FROZEN, STOCK_BINARY, chipmark=False, log=log)


def stock_micropypath():
    """MICROPYPATH for the stock image, after the '' the unix port's sys.path starts with: the
    frozen modules (umqtt, the simulator), then the simulator's other modules (heap_probe.py) and
    lib/ (found only if the image lacks one of them), as an ESP32 orders '', '.frozen', '/lib'.
    The firmware is not on it: a run has it in its flash folder (flash_files)."""
    sim, lib = unix_port.compile_for_unix()[1:]
    return ":".join([".frozen", sim, lib])


def flash_files(program):
    """[(local file, name)] a run of program needs in its flash folder (its cwd, sys.path's ''):
    on the stock image the firmware where a technician's `make flash` puts it on a pile, x.mpy in
    the flash root (unix_port.firmware_files); none on the others (their MICROPYPATH has it). A
    module's __file__, the path it was found at, is interned as a qstr for good
    (py/builtinimport.c do_load): `session_record.mpy` as on a pile, not this checkout's ~50
    characters (~1.1 KiB over a session's modules; host_tests/test_heap_standin.py)."""
    return unix_port.firmware_files() if program == STOCK_BINARY else []


def _locked_build(name, frozen, binary, chipmark, log):
    os.makedirs(CHIP_DIR, exist_ok=True)
    with open(os.path.join(CHIP_DIR, "build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(name, frozen, binary, chipmark, log)


def _build(name, frozen, binary, chipmark, log):
    digest = _inputs_digest(frozen)
    stamp = os.path.join(CHIP_DIR, "inputs.sha" if name == "chip" else "inputs-%s.sha" % name)
    if os.path.exists(binary) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == digest:
                return binary
    src = os.path.join(CHIP_DIR, "micropython")
    if not os.path.isdir(os.path.join(src, "py")):
        os.makedirs(CHIP_DIR, exist_ok=True)
        with tarfile.open(SOURCE_TARBALL) as tar:
            tar.extractall(CHIP_DIR)
    manifest = os.path.join(CHIP_DIR, "manifest_%s.py" % name)
    with open(manifest, "w") as f:
        f.write("# Generated by pilehost/chipbuild.py (%s image).\n" % name)
        for module, base in frozen:
            f.write("module(%r, base_path=%r)\n" % (module, base))
    nolib = os.path.join(CHIP_DIR, "no-mpylib")
    os.makedirs(nolib, exist_ok=True)
    open(os.path.join(nolib, "README.md"), "w").close()
    log("%s build: MicroPython %s, 32-bit, single-precision floats, %s (about a minute) ..." % (
        name, SOURCE_COMMIT[:10], ", ".join(m for m, _ in frozen[:3]) + (" ... frozen" if len(frozen) > 3
                                                                       else " frozen")))
    jobs = "-j2"
    subprocess.run(["make", "-C", os.path.join(src, "mpy-cross"), jobs, "-s"], check=True,
                   stdout=subprocess.DEVNULL)
    prog = os.path.basename(binary)
    args = ["make", "-C", os.path.join(src, "ports", "unix"), jobs, "-s", "VARIANT=standard",
            "BUILD=build-" + name, "CC=gcc -m32", "LDFLAGS_EXTRA=-static", "MICROPY_PY_BTREE=0",
            "MICROPY_PY_FFI=0", "MICROPY_PY_SSL=0", "MICROPY_SSL_AXTLS=0", "MICROPY_SSL_MBEDTLS=0",
            "CFLAGS_EXTRA=-DMICROPY_FLOAT_IMPL=MICROPY_FLOAT_IMPL_FLOAT",
            "FROZEN_MANIFEST=" + manifest, "MPY_LIB_DIR=" + nolib, "PROG=" + prog, "STRIP="]
    if chipmark:
        args.append("USER_C_MODULES=" + os.path.join(ROOT, "sim"))
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    shutil.copy(os.path.join(src, "ports", "unix", "build-" + name, prog), binary + ".new")
    os.replace(binary + ".new", binary)
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    return binary
