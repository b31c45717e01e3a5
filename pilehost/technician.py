"""The technician's commands, one per step, through mpremote on the board's USB serial port
(or a virtual board's pty: pilehost/vboard.py). The Makefile targets of the same names call these.

Its command line, with the usage: tools/technician.py.

The first connection interrupts main.py (Ctrl-C): the pile goes to service mode (contactor
open, pilot F, the watchdog fed by a timer) until `reboot`, or by itself after 30 min
(diag.SERVICE_MS). Nothing here soft-resets the board (`resume`): a reset is a reboot.
"""
import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys

from . import ROOT, board_repl, firmware_module, unix_port

FIRMWARE = os.path.join(ROOT, "firmware")
MPY_OUT = os.path.join(ROOT, "build", "mpy")
# Third-party MicroPython code (tools/fetch_deps.py, `make deps`) -> /lib on the board.
DEPS = ("umqtt/simple",)
# Files an earlier `flash` put on the board that nothing runs any more: removed by the next one.
# micropython-logging, shipped until console.py printed its own lines (issue 12).
RETIRED = ("lib/logging/__init__.mpy", "lib/logging/__init__.py")
# The ESP32 runs only these two as source; MicroPython imports x.py before x.mpy, so the other
# form of every module flashed is removed.
SOURCE_ONLY = ("boot", "main")
MPREMOTE_TIMEOUT_S = 120  # a full flash of ~200 KB over 115200 baud takes ~30 s
EXEC_TIMEOUT_S = 30  # a short script; a board that reset under it never answers
# mpremote's raw-REPL entry, each after board_repl.to_repl(): a second only if the board reset
# between the two (nothing has run on it when that entry fails).
RAW_REPL_ATTEMPTS = 2
_NO_RAW_REPL = "could not enter raw repl"


class ToolError(Exception):
    pass


# -- mpremote ------------------------------------------------------------------------------------


def mpremote(port, *args, timeout=MPREMOTE_TIMEOUT_S):
    """mpremote on PORT without a soft reset, the board at its REPL first (board_repl: a Ctrl-C
    that a boot lost is sent again); its output, or ToolError with what it said."""
    cmd = [sys.executable, "-m", "mpremote", "connect", port, "resume"] + list(args)
    tries = 0
    while True:
        tries += 1
        try:
            board_repl.to_repl(port)
        except board_repl.NoRepl as e:
            raise ToolError("%s: %s" % (port, e)) from None
        except (OSError, ValueError) as e:  # serial.SerialException is an OSError
            raise ToolError("cannot open %s: %s" % (port, e)) from None
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ToolError("mpremote on %s: no answer within %d s" % (port, timeout)) from None
        if not r.returncode:
            return r.stdout
        said = " | ".join((r.stderr.strip() or r.stdout.strip()).splitlines()[-3:])
        if _NO_RAW_REPL not in said or tries == RAW_REPL_ATTEMPTS:
            raise ToolError("mpremote on %s failed%s: %s" % (
                port, "" if tries == 1 else " %d times" % tries, said or "exit %d" % r.returncode))


def board_json(port, code):
    """Run `code` on the board; the last line of its output that is a JSON object."""
    out = mpremote(port, "exec", code, timeout=EXEC_TIMEOUT_S)
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ToolError("the board did not answer as expected: %s" % out.strip()[-300:])


# Board side: sha256 of files (None: absent), after making folders and removing files. Runs on
# an ESP32 as on the unix port: hashlib, binascii, os, json only.
_HASH_CODE = """
import os, json, hashlib, binascii
def _sha(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256()
    b = bytearray(1024)
    m = memoryview(b)
    n = f.readinto(b)
    while n:
        h.update(m[:n])
        n = f.readinto(b)
    f.close()
    return binascii.hexlify(h.digest()).decode()
for d in %r:
    try:
        os.mkdir(d)
    except OSError:
        pass
gone = []
for p in %r:
    try:
        os.remove(p)
        gone.append(p)
    except OSError:
        pass
print(json.dumps({'sha': {p: _sha(p) for p in %r}, 'removed': gone}))
"""


def board_hashes(port, paths, mkdirs=(), remove=()):
    return board_json(port, _HASH_CODE % (list(mkdirs), list(remove), list(paths)))


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- flash ---------------------------------------------------------------------------------------


def cross_compile(src, out):
    """src -> out (.mpy for the ESP32, as `make mpy` builds it), unless out is newer."""
    try:
        unix_port.cross_compile(src, out)
    except RuntimeError as e:
        raise ToolError(str(e)) from None


def flash_plan(board, source=False):
    """[(local file, path on the board)], and the other forms of those modules and the retired
    files (RETIRED) to remove."""
    board_file = os.path.join(ROOT, "boards", board + ".json")
    if not os.path.exists(board_file):
        raise ToolError("no board file boards/%s.json (one of: %s)" % (board, ", ".join(
            sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "boards", "*.json"))))))
    modules = []  # (source file, name on the board without extension)
    for path in sorted(glob.glob(os.path.join(FIRMWARE, "*.py"))):
        modules.append((path, os.path.basename(path)[:-3]))
    for dep in DEPS:
        path = os.path.join(ROOT, "lib", dep + ".py")
        if not os.path.exists(path):
            raise ToolError("lib/%s.py missing: run `make deps`" % dep)
        modules.append((path, "lib/" + dep))
    plan, stale = [], []
    for src, name in modules:
        if source or name in SOURCE_ONLY:
            plan.append((src, name + ".py"))
            if name not in SOURCE_ONLY:
                stale.append(name + ".mpy")
        else:
            out = os.path.join(MPY_OUT, name + ".mpy")
            cross_compile(src, out)
            plan.append((out, name + ".mpy"))
            stale.append(name + ".py")
    plan.append((board_file, "board.json"))
    return plan, stale + list(RETIRED)


def flash(port, board, source=False, out=sys.stdout):
    plan, stale = flash_plan(board, source)
    dirs = sorted({os.path.dirname(p) for _, p in plan if "/" in p} | {"lib"}, key=len)
    before = board_hashes(port, [p for _, p in plan], dirs, stale)
    local = {dest: sha256_file(src) for src, dest in plan}
    todo = [(src, dest) for src, dest in plan if before["sha"].get(dest) != local[dest]]
    if todo:
        args = []
        for src, dest in todo:
            args += ["fs", "cp", "-f", src, ":" + dest, "+"]
        mpremote(port, *args[:-1])
    after = board_hashes(port, [p for _, p in plan])["sha"]
    copied = {dest for _, dest in todo}
    bad = [dest for _, dest in plan if after.get(dest) != local[dest]]
    out.write("%-28s %8s  %-9s %s\n" % ("file", "bytes", "", "sha256 on the board"))
    for src, dest in plan:
        out.write("%-28s %8d  %-9s %s\n" % (dest, os.path.getsize(src),
                                            "copied" if dest in copied else "unchanged",
                                            "ok" if dest not in bad else "MISMATCH"))
    for path in before["removed"]:
        out.write("%-28s %8s  %-9s\n" % (path, "", "removed"))
    out.write("%d files: %d copied, %d unchanged, %d removed; %s\n" % (
        len(plan), len(copied), len(plan) - len(copied), len(before["removed"]),
        "every hash matches" if not bad else "%d HASH MISMATCHES" % len(bad)))
    if bad:
        raise ToolError("the board's copy differs from the host's: %s (flash again)" % ", ".join(bad))
    if copied:
        out.write("reboot to run it: make reboot PORT=%s\n" % port)
    return {"copied": sorted(copied), "removed": before["removed"]}


# -- provision -------------------------------------------------------------------------------------

# Never shown: the values of these keys ("section.key").
SECRET_KEYS = ("mqtt.password", "mqtt.secret", "wifi.password")

_READBACK_CODE = """
import json, os
def _has(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
try:
    pid = json.load(open('config.json')).get('pile_id')
except Exception as e:
    pid = 'unreadable: %s' % e
print(json.dumps({'pile_id': pid, 'diag': _has('diag.mpy') or _has('diag.py')}))
"""


def check_config(config_path, board_data=None):
    """The config as the firmware will read it: (raw dict, parsed); ToolError naming the key."""
    config = firmware_module("config")
    name = os.path.basename(config_path)
    try:
        with open(config_path) as f:
            data = json.load(f)
    except OSError as e:
        raise ToolError("%s: cannot read (%s)" % (config_path, e.strerror)) from None
    except ValueError as e:  # position only: the text may hold a secret
        raise ToolError("%s: not valid JSON (line %d column %d)" % (name, e.lineno, e.colno)) from None
    try:
        conf = config.parse_config(data, where=name)
        if board_data is not None:
            config.check_together(config.parse_board(board_data), conf)
    except config.ConfigError as e:
        raise ToolError(str(e)) from None
    return data, conf


def ca_file(config_path, conf):
    """(host path, board path) of mqtt.tls_ca, the host's copy beside the config file; None
    without TLS. ToolError if it is missing or is not a certificate (PEM or DER)."""
    if conf.mqtt is None or conf.mqtt.tls_ca is None:
        return None
    board_path = conf.mqtt.tls_ca.lstrip("/")
    host_path = os.path.join(os.path.dirname(os.path.abspath(config_path)), board_path)
    try:
        with open(host_path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ToolError("mqtt: 'tls_ca': %s: cannot read (%s); put the broker's CA certificate "
                        "beside the config" % (host_path, e.strerror)) from None
    if b"-----BEGIN CERTIFICATE-----" not in head and head[:1] != b"\x30":
        raise ToolError("mqtt: 'tls_ca': %s is not a certificate (PEM or DER)" % host_path)
    return host_path, board_path


def provision(port, config_path, board=None, reboot_after=True, out=sys.stdout):
    board_data = None
    if board is not None:
        with open(os.path.join(ROOT, "boards", board + ".json")) as f:
            board_data = json.load(f)
    data, conf = check_config(config_path, board_data)  # before anything touches the board
    ca_file(config_path, conf)
    if board_data is None:
        board_data = board_json(port, "import json\ntry:\n    print(json.dumps(json.load(open("
                                      "'board.json'))))\nexcept Exception:\n    print('{}')")
        if not board_data:
            raise ToolError("the board has no usable board.json: `make flash` first, or give BOARD=")
        check_config(config_path, board_data)
    ca = ca_file(config_path, conf)
    if ca is not None:  # the broker's CA goes where mqtt.tls_ca says, before the config naming it
        host_path, board_path = ca
        mpremote(port, "fs", "cp", "-f", host_path, ":" + board_path)
        if board_hashes(port, [board_path])["sha"][board_path] != sha256_file(host_path):
            raise ToolError("%s on the board is not what was sent: provision again" % board_path)
        out.write("%s on the board (sha256 ok): the broker's CA\n" % board_path)
    mpremote(port, "fs", "cp", "-f", config_path, ":config.json")
    sha = board_hashes(port, ["config.json"])["sha"]["config.json"]
    back = board_json(port, _READBACK_CODE)
    if sha != sha256_file(config_path) or back["pile_id"] != conf.pile_id:
        raise ToolError("config.json on the board is not what was sent (pile_id %r): provision again"
                        % back["pile_id"])
    secrets = [k for k in SECRET_KEYS if isinstance(data.get(k.split(".")[0]), dict)
               and data[k.split(".")[0]].get(k.split(".")[1]) is not None]
    out.write("config.json on the board (%s, sha256 ok): pile_id %s, board %s%s%s\n" % (
        os.path.basename(config_path), back["pile_id"], board_data.get("name"),
        "" if conf.mqtt is None else ", broker %s:%s" % (conf.mqtt.host, conf.mqtt.port or "default"),
        "" if not secrets else "; %s set (not shown)" % ", ".join(secrets)))
    if reboot_after:
        if not back["diag"]:
            raise ToolError("no diag module on the board: `make flash` first, then `make reboot`")
        reboot(port, out)


# -- diag, clear-fault, reboot -------------------------------------------------------------------


def diag(port):
    return board_json(port, "import diag\ndiag.show()")


def _age(seconds):
    return "?" if seconds is None else "%d s" % seconds


def format_diag(d):
    lines = []

    def row(name, text):
        lines.append("%-11s %s" % (name, text))

    service = d.get("firmware")
    if d.get("service_left_s") is not None:
        service += ": charges again after `make reboot`, or by itself in %d s" % d["service_left_s"]
    row("firmware", "%s, %s" % (d.get("fw"), service))
    row("board", d.get("board"))
    row("pile", "%s, boot %s, up %s" % (d.get("pile_id"), d.get("boot"), _age(d.get("uptime_s"))))
    if d.get("problem"):
        row("PROBLEM", d["problem"])
    if d.get("state") is not None:
        c = d.get("contactor") or {}
        row("charger", "%s, pilot %s%s; contactor %s (feedback %s)" % (
            d["state"], d.get("pilot"), " when service mode began" if d.get("service_left_s") is not None
            else "", c.get("commanded"), c.get("feedback") or "none fitted"))
        row("faults", ", ".join(d.get("faults") or []) or "none")
    for i, text in enumerate(d.get("recent_faults") or []):
        row("recent" if i == 0 else "", text)
    j = d.get("journal") or {}
    row("outbox", "%s records (%s bytes) not yet acknowledged by the broker"
        % (j.get("records"), j.get("bytes")))
    row("heap free", "%s bytes" % d.get("heap_free"))
    m = d.get("meter")
    if m is not None:
        r = m.get("reading")
        row("meter", ("no reading" if r is None else "%s Wh, %s W, %s V, %s A, %s old" % (
            r["energy_wh"], r["power_w"], r["voltage_v"], r["current_a"], _age(r["age_s"])))
            + "; %d errors%s" % (m["errors"], ", last: " + m["last_error"] if m["last_error"] else ""))
    b = d.get("broker")
    if b is not None:
        state = {True: "connected", False: "not connected", None: "?"}[b.get("connected")]
        row("broker", "%s:%s %s%s" % (b.get("host"), b.get("port"), state,
                                      ", last error: " + b["last_error"] if b.get("last_error") else ""))
    return "\n".join(lines) + "\n"


def clear_fault(port, fault):
    charger = firmware_module("charger")
    names = [n for _, n in charger.FAULT_NAMES]
    if fault not in names:
        raise ToolError("unknown fault %r: one of %s" % (fault, ", ".join(names)))
    answer = board_json(port, "import diag\ndiag.clear_fault(%r)" % fault)
    if answer.get("result") != "cleared":
        raise ToolError("%s not cleared: %s" % (fault, answer.get("result")))
    return answer


def reboot(port, out=sys.stdout):
    """diag.reboot(): contactor open, pilot F, then the reset. The board does not answer."""
    mpremote(port, "exec", "--no-follow", "import diag\ndiag.reboot()")
    out.write("rebooting: contactor open, pilot F, then the reset\n")


# -- command line --------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["virtual-board"]:
        from . import vboard

        return vboard.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("flash", help="firmware, umqtt and the board file; only what changed")
    p.add_argument("port")
    p.add_argument("--board", default="ref-esp32", help="boards/NAME.json, as board.json")
    p.add_argument("--source", action="store_true", help=".py instead of cross-compiled .mpy")
    p = sub.add_parser("provision", help="check a config.json on the host, upload it, reboot")
    p.add_argument("port")
    p.add_argument("config")
    p.add_argument("--board", help="check against boards/NAME.json (default: the board's board.json)")
    p.add_argument("--no-reboot", action="store_true")
    p = sub.add_parser("diag", help="what the pile is doing (puts it in service mode)")
    p.add_argument("port")
    p.add_argument("--json", action="store_true", help="diag.show()'s JSON as it is")
    p = sub.add_parser("clear-fault", help="clear a latched fault whose cause is gone")
    p.add_argument("port")
    p.add_argument("fault")
    p = sub.add_parser("reboot", help="contactor open, pilot F, reset: the pile charges again")
    p.add_argument("port")
    sub.add_parser("virtual-board", help="a virtual board on a pty (virtual-board --help)")
    args = parser.parse_args(argv)
    try:
        if args.command == "flash":
            flash(args.port, args.board, args.source)
        elif args.command == "provision":
            provision(args.port, args.config, args.board, not args.no_reboot)
        elif args.command == "diag":
            d = diag(args.port)
            sys.stdout.write(json.dumps(d) + "\n" if args.json else format_diag(d))
        elif args.command == "clear-fault":
            clear_fault(args.port, args.fault)
            print("%s cleared (the pile stays in service mode: make reboot)" % args.fault)
        elif args.command == "reboot":
            reboot(args.port)
    except ToolError as e:
        print("%s: %s" % (args.command, e), file=sys.stderr)
        return 2
    return 0
