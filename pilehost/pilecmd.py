#!/usr/bin/env python3
"""Build and sign a remote command for a pile (docs/commands.md). CPython, stdlib only.

Its command line, with the usage: tools/pilecmd.py.

Prints the MQTT payload on stdout. The secret file holds the pile's key as hex (e.g.
`openssl rand -hex 32 > s.key`). Without --counter the counter is the current Unix time in
milliseconds, which keeps it strictly increasing across cloud restarts.
"""
import argparse
import hashlib
import hmac
import json
import math
import os
import re
import sys
import time

# Argument names and types per command, as the pile checks them (firmware/command_auth.py).
COMMANDS = {
    "remote_start": {"auth_id": "str"},
    "remote_stop": {},
    "set_current_limit": {"amps": "number_or_null", "ttl_s": "optional_int"},
    "set_availability": {"state": "str"},
    "clear_fault": {"fault": "str"},
    "request_status": {},
    "reboot": {},
    "update": {"release": "int"},  # docs/ota.md
}

# The auth_id rule is the session schemas' (the cloud stores what they accept): read, not copied.
SESSION_SCHEMA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                              "schemas", "session_started.v1.schema.json")


def auth_id_pattern():
    with open(SESSION_SCHEMA, encoding="utf-8") as f:
        return json.load(f)["properties"]["auth_id"]["pattern"]


def read_secret(path):
    with open(path, "r", encoding="ascii") as f:
        text = f.read().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ValueError("secret file must hold the key as hex digits") from None
    if len(secret) < 16:
        raise ValueError("secret must be at least 16 bytes (32 hex digits)")
    return secret


def make_body(cmd, args, counter, cmd_id=None, version=1):
    """The body JSON text. No checks: tests use it to build wrong commands too."""
    if cmd_id is None:
        cmd_id = "cmd-%d" % counter
    return json.dumps({"v": version, "id": cmd_id, "cmd": cmd, "counter": counter, "args": args},
                      separators=(",", ":"))


def sign(secret, body):
    """The MQTT payload (bytes) for a body text."""
    sig = hmac.new(secret, body.encode("utf-8"), hashlib.sha256).hexdigest()
    return json.dumps({"body": body, "sig": sig}, separators=(",", ":")).encode("utf-8")


def floor_of(reason):
    """The pile's floor from a `replayed` ack's reason (`replayed: counter not above N`), or
    None. After a reboot that found a reservation on its flash (a car plugged in, a command in
    the last minute) the pile refuses counters up to it (docs/commands.md, "Replays"): send
    again with --floor N, which signs above it."""
    m = re.fullmatch(r"replayed: counter not above (\d+)", reason or "")
    return int(m.group(1)) if m else None


def parse_args(cmd, pairs):
    spec = COMMANDS[cmd]
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in spec:
            raise ValueError("%s takes %s" % (cmd, ", ".join(spec) or "no arguments"))
        if spec[key] in ("int", "optional_int"):
            if not value.isdigit():
                raise ValueError("%s must be a whole number%s" % (
                    key, " of seconds" if key.endswith("_s") else ""))
            args[key] = int(value)
        elif spec[key] == "number_or_null":
            if value in ("null", "none", ""):
                args[key] = None
            else:
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError("%s must be a finite number" % key)
                args[key] = int(number) if number.is_integer() else number
        else:
            if key == "auth_id" and not re.search(auth_id_pattern(), value):
                raise ValueError("auth_id must be 1..64 of ! to ~ (printable ASCII, no space), as "
                                 "docs/schemas/session_started.v1.schema.json says")
            args[key] = value
    missing = [k for k in spec if k not in args and not spec[k].startswith("optional")]
    if missing:
        raise ValueError("%s needs %s" % (cmd, ", ".join(missing)))
    return args


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sign a remote command for a pile.")
    ap.add_argument("--secret-file", required=True, help="the pile's key, hex")
    ap.add_argument("--counter", type=int, help="strictly increasing per pile (default: ms now)")
    ap.add_argument("--floor", type=int, help="a replayed ack's floor: sign above it")
    ap.add_argument("--id", dest="cmd_id", help="command id (default: cmd-<counter>)")
    ap.add_argument("command", choices=sorted(COMMANDS))
    ap.add_argument("args", nargs="*", metavar="key=value")
    opts = ap.parse_args(argv)
    try:
        secret = read_secret(opts.secret_file)
        args = parse_args(opts.command, opts.args)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    counter = opts.counter if opts.counter is not None else time.time_ns() // 1_000_000
    if opts.floor is not None:
        counter = max(counter, opts.floor + 1)
    if not 0 < counter < 2 ** 53:
        ap.error("counter must be 1..2**53-1")
    if opts.cmd_id is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", opts.cmd_id):
        ap.error("id must be 1..64 of A-Z a-z 0-9 . _ : -")
    body = make_body(opts.command, args, counter, opts.cmd_id)
    sys.stdout.write(sign(secret, body).decode("utf-8") + "\n")
    return 0
