"""The chip model's OTA run (MicroPython): the signed update's slow steps, each between two
chipmark.mark() calls, where callgrind cuts its counts (pilehost/chipota.py runs this under
callgrind on the chip build and turns the counts into ESP32 milliseconds).

Each measured step prints one `OTA {...}` line, in the order of the cuts: its name, the bytes it
allocated (collections off meanwhile) and what it wrote to flash, counted by sim/chip_flash.py as
for sim/chip_rom.py ([path, mode, bytes, size before]; renames and removes), the file calls' own
C work not counted (on a pile it is LittleFS's, modelled as flash time instead).

cwd: the folder pilehost/chipota.py prepared:
    ota_run.json  {"key": modulus hex, "board": name, "big": [index, path, size],
                   "pow": [[modulus hex, s hex], ...] (pow alone on more numbers)}
    a/rel/1/manifest, a/src/<path>  release 1 (the firmware as .mpy files) and its files
    b/rel/2/...   release 2 (the same files and a big one of ota.MAX_FILE bytes) downloaded up
                  to the big file's last chunk (a power cut there): its part is hashed again,
                  a few chunks a step; b/src/<big file>
Usage: micropython -m chip_ota
"""
import builtins
import gc
import json
import os as _os

import chip_flash
import chipmark

_writes = []  # [path, mode, bytes written, size before]
_meta = []  # ["rename"|"remove", path]
_open = builtins.open  # this run's own files, not counted
chip_flash.install(_writes.append, _meta.append)  # before the firmware's modules import os

import binascii  # noqa: E402
import hashlib  # noqa: E402

import ota  # noqa: E402

_steps = []


def measure(name, fn, *args):
    """fn(*args) alone between two cuts; its line after the second."""
    gc.collect()
    del _writes[:]
    del _meta[:]
    before = gc.mem_alloc()
    chipmark.mark()
    result = fn(*args)
    chipmark.mark()
    line = {"step": name, "alloc": gc.mem_alloc() - before, "flash": list(_writes), "meta": list(_meta)}
    print("OTA " + json.dumps(line))
    _steps.append(line)
    return result


class Pile:
    """The link's PileView: idle, as the update needs it."""

    def contactor_closed(self):
        return False

    def session(self):
        return None

    def session_open(self):
        return False

    def safe_off(self):
        pass


class Topics:
    ota = b"evse/v1/chip/ota"
    ack = b"evse/v1/chip/cmd/ack"


class Conn:
    """The MQTT connection as the Updater uses it: a subscription hands out the chunk."""

    def __init__(self, folder):
        self.folder = folder
        self.want = None

    def subscribe(self, topic):
        self.want = topic

    def unsubscribe(self, topic):
        self.want = None

    def publish(self, topic, payload, retain=False, qos=1):
        pass

    def idle(self):
        return True


def _chunk(folder, files, topic):
    """The payload the broker holds for a chunk topic of release files."""
    part, k = topic.decode().split("/")[-2:]
    path = files[int(part)][0]
    with _open(folder + "/src/" + path, "rb") as f:
        f.seek(int(k) * ota.CHUNK)
        return f.read(ota.CHUNK)


def _until_subscribed(u, conn, now):
    conn.want = None
    for _ in range(8):
        u.work(now, conn)
        if conn.want is not None:
            return
    raise RuntimeError("no chunk asked for: %s %s" % (u.state, u.reason))


def components(run):
    """The verification's parts on release 1's real manifest."""
    with _open("a/rel/1/manifest", "rb") as f:
        data = f.read()
    modulus = binascii.unhexlify(run["key"])
    nl = data.find(b"\n")
    sig = binascii.unhexlify(data[:nl])
    body = data[nl + 1:]
    key = measure("public key from config", ota.PublicKey, modulus)
    s = int.from_bytes(sig, "big")
    measure("pow(s, 65537, n), one C call", pow, s, 65537, key.n)
    for m, x in run["pow"]:
        measure("pow sample", pow, int(x, 16), 65537, int(m, 16))
    digest = measure("SHA-256 of the manifest body", lambda: hashlib.sha256(body).digest())
    if not measure("RSA verify (PublicKey.verify)", key.verify, sig, digest):
        raise RuntimeError("the manifest's signature does not verify")
    measure("JSON of the manifest body", json.loads, body)
    measure("parse_manifest (hex, hash, verify, JSON, checks)", ota.parse_manifest, data, key,
            run["board"], 1)
    chunk = bytes(ota.CHUNK)
    sha = hashlib.sha256()
    measure("SHA-256 of one %d B chunk" % ota.CHUNK, sha.update, chunk)
    big = bytes(65536)
    measure("SHA-256 of 64 KiB", sha.update, big)
    return key


def download(run, key):
    """Release 1, every step the pile takes for it, from the command to the switch."""
    _os.chdir("a")
    u = ota.Updater(key, run["board"], 300, "0.1.0", lambda: None)
    u.bind(Pile(), Topics(), 1)
    conn = Conn(".")
    if u.start(0, "c-chip-1", 1) != (None, None):
        raise RuntimeError("update not started: %s" % u.reason)
    now = 5
    measure("manifest step (read, parse_manifest, room, first file)", u.poll, now)
    files = u._manifest["files"]
    while u.state == "downloading":
        now += 5
        _until_subscribed(u, conn, now)
        topic = conn.want
        index = int(topic.decode().split("/")[-2])
        path, size, _ = files[index]
        last = int(topic.decode().split("/")[-1]) * ota.CHUNK + ota.CHUNK >= size
        measure("chunk %s %d %d" % ("end" if last else "mid", index, size), u.message, now,
                topic, _chunk(".", files, topic))
    if u.state != "staged":
        raise RuntimeError("release 1 not staged: %s" % u.reason)
    for _ in range(4):  # the ota message and the ack go out first
        now += 5
        u.work(now, conn)
    measure("switch (safe_off, release.json, job cleared, reset)", u.poll, now + 5)
    _os.chdir("..")


def resume(run, key):
    """Release 2 after a power cut at the big file's last chunk: the manifest checked again and
    the big file's part hashed again from its start, in one step."""
    _os.chdir("b")
    jobs = ota._JobStore()
    jobs.save({"release": 2, "cmd": "c-chip-2"})
    u = ota.Updater(key, run["board"], 300, "0.1.0", lambda: None)
    u.bind(Pile(), Topics(), 2)
    measure("resume step (read, parse_manifest, room, %d files checked)" % run["big"][0], u.poll, 5)
    now = 5
    while u._rehash is not None:  # the big file's part hashed again, a few chunks a step
        now += 5
        measure("rehash slice", u.poll, now)
    conn = Conn(".")
    _until_subscribed(u, conn, now + 5)
    files = u._manifest["files"]
    measure("chunk end %d %d (the last)" % (run["big"][0], run["big"][2]), u.message, now + 10,
            conn.want, _chunk(".", files, conn.want))
    if u.state != "staged":
        raise RuntimeError("release 2 not staged: %s" % u.reason)
    _os.chdir("..")


def main():
    gc.disable()  # a collection inside a step would be counted as the step's
    with _open("ota_run.json") as f:
        run = json.load(f)
    key = components(run)
    download(run, key)
    resume(run, key)
    print("OTA END %d" % len(_steps))


main()
