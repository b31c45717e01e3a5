"""Releases for over-the-air updates (docs/ota.md): the release key, building a release's files,
signing its manifest, publishing it to the broker as retained chunks.

    key = generate_key()                                     # once; kept offline
    files = build_files(version="0.2.0")                    # firmware/ and lib/ as .mpy
    manifest = sign_manifest(key, 7, "0.2.0", ["ref-esp32"], files)
    publish(host, port, 7, manifest, files)                  # evse/v1/release/7/...

The pile checks the manifest with the key's public half (config.json ota.key: public_hex())
and every file against the manifest's SHA-256 (firmware/ota.py).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from . import ROOT, unix_port

CHUNK = 768  # firmware/ota.py CHUNK
MANIFEST_MAX = 8192
# Stage one of the boot: the loader runs the factory copy at the root, never a release's.
_NOT_IN_RELEASE = ("boot.py",)
_VERSION_LINE = re.compile(r'^VERSION = "[^"]*"$', re.M)


# -- the key -----------------------------------------------------------------------------------------

def generate_key(bits=2048):
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def save_key(key, path):
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_key(path):
    from cryptography.hazmat.primitives import serialization

    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def public_hex(key):
    """config.json's ota.key: the modulus as hex (the public exponent is 65537)."""
    pub = key.public_key().public_numbers()
    if pub.e != 65537:
        raise ValueError("the release key's public exponent must be 65537")
    return "%x" % pub.n


def signature(key, data):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


# -- the files ---------------------------------------------------------------------------------------

def build_files(version, source=None, lib=None, arch="xtensawin", out_dir=None):
    """[(path on the board under rel/<n>/, bytes)]: every firmware module and lib/ module as .mpy
    (main.py too: the root main.py hands over to it), with `VERSION = "..."` stamped.
    arch: mpy-cross -march (xtensawin for the ESP32; None: the bytecode the unix port runs)."""
    source = source or os.path.join(ROOT, "firmware")
    lib = lib or os.path.join(ROOT, "lib")
    own = tempfile.mkdtemp(prefix="release-") if out_dir is None else None
    work = out_dir or own
    try:
        stamped = 0
        out = []
        sources = []
        for name in sorted(os.listdir(source)):
            if name.endswith(".py") and name not in _NOT_IN_RELEASE:
                sources.append((os.path.join(source, name), name))
        for d, _dirs, names in sorted(os.walk(lib)):
            for name in sorted(names):
                if name.endswith(".py"):
                    full = os.path.join(d, name)
                    sources.append((full, "lib/" + os.path.relpath(full, lib).replace(os.sep, "/")))
        for src, rel in sources:
            with open(src, encoding="utf-8") as f:
                text = f.read()
            if not rel.startswith("lib/") and _VERSION_LINE.search(text):
                text = _VERSION_LINE.sub('VERSION = "%s"' % version, text)
                stamped += 1
            tmp_src = os.path.join(work, "src", rel)
            os.makedirs(os.path.dirname(tmp_src), exist_ok=True)
            with open(tmp_src, "w", encoding="utf-8") as f:
                f.write(text)
            target = rel[:-3] + ".mpy"
            mpy = os.path.join(work, "mpy", target)
            os.makedirs(os.path.dirname(mpy), exist_ok=True)
            cmd = [unix_port.mpy_cross_binary()] + (["-march=" + arch] if arch else []) + [
                unix_port.SHIP_OPT, "-s", rel, "-o", mpy, tmp_src]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError("mpy-cross %s: %s" % (rel, r.stderr.strip()))
            with open(mpy, "rb") as f:
                out.append((target, f.read()))
        if stamped != 1:
            raise RuntimeError("%d firmware files carry a VERSION line; exactly one must" % stamped)
        return out
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def manifest_body(release, version, boards, files, chunk=CHUNK):
    return {"v": 1, "release": release, "version": version, "boards": list(boards), "chunk": chunk,
            "files": [[path, len(data), hashlib.sha256(data).hexdigest()] for path, data in files]}


def sign_manifest(key, release, version, boards, files, body=None):
    """The manifest as the pile receives it: the signature in hex, a newline, the body's JSON
    text (what is signed), padded with spaces so that it never fills its last chunk exactly."""
    text = json.dumps(body or manifest_body(release, version, boards, files), separators=(",", ":"))
    sig_len = key.key_size // 4 + 1
    while (sig_len + len(text)) % CHUNK == 0:
        text += " "
    data = text.encode()
    manifest = signature(key, data).hex().encode() + b"\n" + data
    if len(manifest) > MANIFEST_MAX:
        raise ValueError("manifest of %d bytes: at most %d" % (len(manifest), MANIFEST_MAX))
    return manifest


def chunks(release, manifest, files):
    """[(topic, payload)]: what publish() puts on the broker, retained."""
    out = [("evse/v1/release/%d/m/%d" % (release, k), manifest[k * CHUNK:(k + 1) * CHUNK])
           for k in range(len(manifest) // CHUNK + 1)]
    for i, (_path, data) in enumerate(files):
        for k in range((len(data) + CHUNK - 1) // CHUNK):
            out.append(("evse/v1/release/%d/%d/%d" % (release, i, k), data[k * CHUNK:(k + 1) * CHUNK]))
    return out


def publish(host, port, release, manifest, files, username=None, password=None, retain=True,
            topics=None):
    """Every chunk to the broker, retained, QoS 1; returns how many. topics: the list of
    (topic, payload) to send instead (tests send a release with a piece missing)."""
    import paho.mqtt.client as mqtt

    from .procs import TIMEOUT

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if username:
        client.username_pw_set(username, password)
    client.connect(host, port)
    client.loop_start()
    try:
        items = topics if topics is not None else chunks(release, manifest, files)
        infos = [client.publish(t, p, qos=1, retain=retain) for t, p in items]
        for info in infos:
            info.wait_for_publish(TIMEOUT)
        return len(infos)
    finally:
        client.loop_stop()
        client.disconnect()


def withdraw(host, port, release, manifest, files, **auth):
    """Clears a release's retained chunks (an empty retained message deletes one)."""
    topics = [(t, b"") for t, _p in chunks(release, manifest, files)]
    return publish(host, port, release, manifest, files, topics=topics, **auth)


def withdraw_release(host, port, manifest, files, record=None, reason="withdrawn by the operator",
                     username=None, password=None, settle_s=2.0, say=print):
    """The `withdraw` command (docs/ota.md, "Withdrawing a release"): stops the release's rollout
    (the marker beside its record: no further `update` goes out), deletes its retained chunks (a
    download under way then fails and the pile keeps its release), and says where each pile is,
    from the retained `ota` messages. The firmware has no command to go back to an earlier
    release: piles already running it stay on it until release n + 1.
    Returns [(pile id, what happens to it)]."""
    import urllib.parse

    from . import rollout

    n = json.loads(manifest.split(b"\n", 1)[1])["release"]
    record = record or "rollout-%d.json" % n
    rollout.mark_withdrawn(record, reason)
    say("release %d withdrawn (%s): its rollout sends no further update (%s.withdrawn)" % (
        n, reason, record))
    count = withdraw(host, port, n, manifest, files, username=username, password=password)
    say("release %d: %d retained chunks deleted" % (n, count))
    piles = None
    if os.path.exists(record):
        piles = sorted({p for c in rollout.load_record(record).get("cohorts", []) for p in c})
    auth = ""
    if username:
        auth = "%s:%s@" % (urllib.parse.quote(username, safe=""), urllib.parse.quote(password or "", safe=""))
    watch = rollout.FleetWatch("mqtt://%s%s:%d" % (auth, host, port))
    try:
        time.sleep(settle_s)  # the retained ota messages
        where = rollout.where_piles_are(watch, n, piles)
    finally:
        watch.close()
    for p, text in where:
        say("  %s: %s" % (p, text))
    return where


# -- the command line (tools/release.py) -------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Build, sign and publish a firmware release (docs/ota.md).")
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("keygen", help="a new release key (PEM, mode 0600); prints its public half")
    k.add_argument("key")
    p = sub.add_parser("pubkey", help="config.json's ota.key for a release key")
    p.add_argument("key")
    b = sub.add_parser("build", help="build and sign a release into a directory")
    b.add_argument("--key", required=True)
    b.add_argument("--release", type=int, required=True, help="above every release before it")
    b.add_argument("--version", required=True)
    b.add_argument("--board", action="append", default=None, help="board.json name (repeatable)")
    b.add_argument("--arch", default="xtensawin", help="mpy-cross -march; 'host' for virtual boards")
    b.add_argument("--source", help="firmware source directory (default firmware/)")
    b.add_argument("out")
    u = sub.add_parser("publish", help="publish a built release to the broker, retained")
    u.add_argument("dir")
    w = sub.add_parser("withdraw", help="stop a release: its rollout, its retained chunks; says "
                                        "where each pile is (docs/ota.md)")
    w.add_argument("dir", help="the release's build directory")
    w.add_argument("--record", help="the rollout's record (default rollout-<release>.json)")
    w.add_argument("--reason", default="withdrawn by the operator")
    for sp in (u, w):
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, default=1883)
        sp.add_argument("--username")
        sp.add_argument("--password-file")
    opts = ap.parse_args(argv)
    password = None
    if getattr(opts, "password_file", None):
        with open(opts.password_file, encoding="utf-8") as f:
            password = f.read().strip()
    if opts.what == "keygen":
        key = generate_key()
        save_key(key, opts.key)
        print(public_hex(key))
    elif opts.what == "pubkey":
        print(public_hex(load_key(opts.key)))
    elif opts.what == "build":
        key = load_key(opts.key)
        files = build_files(opts.version, source=opts.source,
                            arch=None if opts.arch == "host" else opts.arch)
        manifest = sign_manifest(key, opts.release, opts.version, opts.board or ["ref-esp32"], files)
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "manifest"), "wb") as f:
            f.write(manifest)
        for path, data in files:
            target = os.path.join(opts.out, "files", path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
        print("release %d (%s): %d files, %d bytes, manifest %d bytes" % (
            opts.release, opts.version, len(files), sum(len(d) for _p, d in files), len(manifest)))
    elif opts.what == "publish":
        manifest, files = read_built(opts.dir)
        release = json.loads(manifest.split(b"\n", 1)[1])["release"]
        n = publish(opts.host, opts.port, release, manifest, files, opts.username, password)
        print("release %d: %d chunks published, retained" % (release, n))
    elif opts.what == "withdraw":
        manifest, files = read_built(opts.dir)
        withdraw_release(opts.host, opts.port, manifest, files, opts.record, opts.reason,
                         opts.username, password)
    return 0


def read_built(directory):
    """(manifest, files) of a `build` directory, the files in the manifest's order."""
    with open(os.path.join(directory, "manifest"), "rb") as f:
        manifest = f.read()
    body = json.loads(manifest.split(b"\n", 1)[1])
    files = []
    for path, _size, _digest in body["files"]:
        with open(os.path.join(directory, "files", path), "rb") as f:
            files.append((path, f.read()))
    return manifest, files


if __name__ == "__main__":
    sys.exit(main())
