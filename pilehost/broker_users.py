#!/usr/bin/env python3
"""One broker identity per pile: mosquitto users, ACL and configuration (docs/cloud-broker.md).

Its command line, with the usage: tools/broker_users.py.

`pile` makes (or renews) the pile's user, named after its pile id, with a new random password in
DIR/piles.passwd, and prints the `mqtt` lines for the pile's config.json. `cloud` makes a user of
the cloud listener (a consumer, the command sender): reads every pile's topics, writes commands.
`conf` writes DIR/mosquitto.conf from broker/mosquitto.conf.template and copies broker/piles.acl.
Passwords are hashed by mosquitto_passwd (Debian package mosquitto); they are printed once, never
stored here. DIR defaults to ./broker-state. mosquitto re-reads password files on SIGHUP.
"""
import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "broker")
PILES_PASSWD, PILES_ACL = "piles.passwd", "piles.acl"
CLOUD_PASSWD, CLOUD_ACL = "cloud.passwd", "cloud.acl"
CONF = "mosquitto.conf"
# docs/schemas/*.json: the pile id is the user name and goes into topics (ACL %u).
PILE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A cloud user: no ':' (the password file's separator), no '+' or '#' (topic wildcards).
CLOUD_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# evse/v1/release/#: the release tool's retained chunks (docs/ota.md); signed, so the right to
# write them is not the power to change a pile's firmware.
CLOUD_RIGHTS = ("topic read evse/v1/#", "topic write evse/v1/+/cmd", "topic write evse/v1/release/#")


def find_passwd():
    for path in (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"):
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("mosquitto_passwd not found (apt-get install mosquitto)")


def new_password():
    return secrets.token_urlsafe(24)  # 192 random bits, URL-safe: no quoting in mqtt:// URLs


def set_password(path, user, password):
    """Add or renew one user in a mosquitto password file (made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    create = [] if os.path.exists(path) else ["-c"]
    # -b takes the password as an argument: run this on the provisioning machine, not a shared one.
    subprocess.run([find_passwd(), "-b", *create, path, user, password], check=True,
                   capture_output=True, timeout=30)


def add_pile(directory, pile_id, password=None):
    """The pile's user (= its pile id) with a new password; returns the password."""
    if not isinstance(pile_id, str) or not PILE_ID_RE.fullmatch(pile_id):
        raise ValueError("pile id must be 1..64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    password = password or new_password()
    set_password(os.path.join(directory, PILES_PASSWD), pile_id, password)
    return password


def add_cloud_user(directory, name, password=None):
    """A cloud listener user: reads evse/v1/#, writes evse/v1/+/cmd and evse/v1/release/#;
    returns the password."""
    if not CLOUD_USER_RE.fullmatch(name):
        raise ValueError("cloud user name must be 1..64 of A-Z a-z 0-9 . _ -")
    password = password or new_password()
    set_password(os.path.join(directory, CLOUD_PASSWD), name, password)
    acl = os.path.join(directory, CLOUD_ACL)
    lines = []
    if os.path.exists(acl):
        with open(acl) as f:
            lines = f.read().splitlines()
    if "user " + name not in lines:
        with open(acl, "a") as f:
            f.write("\n".join(["user " + name, *CLOUD_RIGHTS]) + "\n")
    return password


def _tls(cert, key):
    if cert is None:
        return "# no TLS on this listener"
    return "certfile %s\nkeyfile %s" % (cert, key)


def write_conf(directory, pile_port=8883, cloud_port=8884, pile_bind="0.0.0.0", cloud_bind="127.0.0.1",
               pile_tls=(None, None), cloud_tls=(None, None), persistence=None, extra=""):
    """DIR/mosquitto.conf from the template, broker/piles.acl beside it; returns the path.
    extra: global lines (e.g. `user`), placed before the listeners."""
    os.makedirs(directory, exist_ok=True)
    directory = os.path.abspath(directory)
    shutil.copy(os.path.join(TEMPLATES, PILES_ACL), os.path.join(directory, PILES_ACL))
    acl = os.path.join(directory, CLOUD_ACL)
    if not os.path.exists(acl):
        with open(acl, "w") as f:
            f.write("# cloud listener users, one block each (tools/broker_users.py cloud NAME)\n")
    with open(os.path.join(TEMPLATES, "mosquitto.conf.template")) as f:
        text = f.read()
    values = {
        "PERSISTENCE": ("persistence true\npersistence_location %s" % persistence) if persistence
        else "persistence false",
        "EXTRA": extra.rstrip("\n"),
        "PILE_PORT": str(pile_port), "PILE_BIND": pile_bind, "PILE_TLS": _tls(*pile_tls),
        "PILES_PASSWD": os.path.join(directory, PILES_PASSWD),
        "PILES_ACL": os.path.join(directory, PILES_ACL),
        "CLOUD_PORT": str(cloud_port), "CLOUD_BIND": cloud_bind, "CLOUD_TLS": _tls(*cloud_tls),
        "CLOUD_PASSWD": os.path.join(directory, CLOUD_PASSWD), "CLOUD_ACL": acl,
    }
    for name, value in values.items():
        text = text.replace("@%s@" % name, value)
    path = os.path.join(directory, CONF)
    with open(path, "w") as f:
        f.write(text)
    return path


def config_snippet(pile_id, password, host, port):
    """The mqtt lines of the pile's config.json (firmware/config.py: username, password)."""
    return {"mqtt": {"host": host, "port": port, "username": pile_id, "password": password}}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Per-pile mosquitto users, ACL and configuration.")
    ap.add_argument("--dir", default="broker-state", help="where the password, ACL and conf files go")
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pile", help="make or renew a pile's user; prints its config.json mqtt lines")
    p.add_argument("pile_id")
    p.add_argument("--host", default="broker.example", help="the broker address the pile uses "
                   "(numeric on piles: docs/network.md)")
    p.add_argument("--port", type=int, default=8883)
    c = sub.add_parser("cloud", help="make or renew a cloud user (consumer, command sender)")
    c.add_argument("name")
    k = sub.add_parser("conf", help="write mosquitto.conf")
    k.add_argument("--pile-port", type=int, default=8883)
    k.add_argument("--pile-bind", default="0.0.0.0")
    k.add_argument("--pile-cert")
    k.add_argument("--pile-key")
    k.add_argument("--cloud-port", type=int, default=8884)
    k.add_argument("--cloud-bind", default="127.0.0.1")
    k.add_argument("--cloud-cert")
    k.add_argument("--cloud-key")
    k.add_argument("--persistence", metavar="DIR")
    args = ap.parse_args(argv)
    try:
        if args.what == "pile":
            password = add_pile(args.dir, args.pile_id)
            print(json.dumps(config_snippet(args.pile_id, password, args.host, args.port), indent=2))
            print("# %s: user %s added; send mosquitto SIGHUP to load it" % (PILES_PASSWD, args.pile_id),
                  file=sys.stderr)
        elif args.what == "cloud":
            password = add_cloud_user(args.dir, args.name)
            print("user %s password %s" % (args.name, password))
        else:
            if (args.pile_cert is None) != (args.pile_key is None) or \
                    (args.cloud_cert is None) != (args.cloud_key is None):
                ap.error("a certificate needs its key")
            print(write_conf(args.dir, args.pile_port, args.cloud_port, args.pile_bind, args.cloud_bind,
                             (args.pile_cert, args.pile_key), (args.cloud_cert, args.cloud_key),
                             args.persistence))
    except (ValueError, OSError, subprocess.CalledProcessError) as e:
        print("broker_users: %s" % e, file=sys.stderr)
        return 2
    return 0
