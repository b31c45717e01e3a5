"""Signed over-the-air updates, the running release's side (docs/ota.md).

A signed `update` command names a release. Its manifest (signed offline with the release key:
RSA-2048, PKCS#1 v1.5 over SHA-256, checked here against the public key from config.json) and
its files come over the MQTT link as retained chunks, one subscription at a time. Every file is
written beside the running ones, under rel/<n>/, and hashed as it comes; once each matches the
manifest, one atomic write of release.json (release_boot.py) selects it for the next boot, in
trial. The trial is watched here too: ticking and reported -> good; not within trial_s -> back.

Nothing here runs while a session is open or the contactor is closed: no signature check, no
download step, no switch. Progress is on flash (the files themselves), so a reconnect or a power
cut resumes where it stopped.
"""
from micropython import const
import binascii
import hashlib
import json
import os
import time

import files
import release_boot
import telemetry
from command_auth import equal_ct

CHUNK = const(768)  # bytes of a chunk: a PUBLISH of it fits mqtt_conn's 1 KiB in-buffer
MANIFEST_MAX = const(8192)
MAX_FILES = const(64)
MAX_FILE = const(262144)
_STALL_MS = const(20000)  # no chunk for this long while connected: subscribe again
_STALLS = const(3)  # ... this many times: the release is incomplete on the broker
_TRIAL_MIN_MS = const(10000)  # a trial release ticks this long before it may call itself good
_PROGRESS_STEP = const(10)  # % between two ota messages while downloading
# Chunks of a part hashed again per loop step after a power cut: ~11 ms of the chip's time on the
# slow bound (`make bench WHAT=ota`); a whole part of MAX_FILE bytes in one step took ~0.95 s,
# next to the watchdog's 1 s minimum (config wdt_timeout_ms): a reset loop at every resume.
_REHASH_CHUNKS = const(8)
# Flash a release leaves free for the rest (the session journal, settings, the outbox).
_FLASH_RESERVE = const(65536)
JOB_FILE = files.OTA_JOB_FILE
MANIFEST = "manifest"

# RFC 8017 section 9.2, note 1: the DER DigestInfo of SHA-256, before the 32-byte hash.
_DIGEST_INFO = b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20"
_E = const(65537)

# Phases of a download.
IDLE = const(0)
MANIFEST_PHASE = const(1)
FILES = const(2)
STAGED = const(3)

_ENOENT = const(2)
_EEXIST = const(17)


class PublicKey:
    """The release key's public half: the RSA modulus (config.json ota.key, hex), e = 65537."""

    def __init__(self, modulus):
        self.k = len(modulus)
        self.n = int.from_bytes(modulus, "big")

    def verify(self, sig, digest):
        """RSASSA-PKCS1-v1_5 verification (RFC 8017 section 8.2.2) of a SHA-256 digest."""
        k = self.k
        if len(sig) != k:
            return False
        s = int.from_bytes(sig, "big")
        if s >= self.n:
            return False
        em = pow(s, _E, self.n).to_bytes(k, "big")
        want = b"\x00\x01" + b"\xff" * (k - 3 - len(_DIGEST_INFO) - 32) + b"\x00" + _DIGEST_INFO + digest
        return equal_ct(em, want)


class OtaError(Exception):
    """result: the cmd/ack result (invalid, rejected, failed); text: why, for the ack and the log."""

    def __init__(self, result, text):
        super().__init__(result, text)
        self.result = result
        self.text = text


def topic(release, part, k):
    """evse/v1/release/<n>/m/<k> (the manifest) or .../<file index>/<k> (a file)."""
    return ("evse/v1/release/%d/%s/%d" % (release, part, k)).encode()


def _path_ok(p):
    if type(p) is not str or not 0 < len(p) <= 64 or p[0] == "/" or p.count("/") > 3:
        return False
    for c in p:
        if not ("a" <= c <= "z" or "0" <= c <= "9" or c in "_./-"):
            return False
    for part in p.split("/"):
        if part in ("", ".", "..") or part.endswith(".part"):
            return False
    return p != MANIFEST


def _hex64(s):
    """A SHA-256 in lower-case hex. In C (unhexlify): a character loop in Python took ~2 ms of
    the chip's time a file, in the step that checks the signature (`make bench WHAT=ota`)."""
    if type(s) is not str or len(s) != 64 or s.lower() != s:
        return False
    try:
        binascii.unhexlify(s)
    except ValueError:
        return False
    return True


def parse_manifest(data, key, board, release):
    """The manifest as transferred (the signature in hex on the first line, then the body's JSON
    text, which is what is signed) -> its body, checked; OtaError otherwise."""
    nl = data.find(b"\n")
    if nl != 2 * key.k:
        raise OtaError("invalid", "bad_signature: the manifest has no signature line")
    try:
        sig = binascii.unhexlify(data[:nl])
    except ValueError:
        raise OtaError("invalid", "bad_signature: the manifest's signature is not hex") from None
    body = data[nl + 1:]
    if not key.verify(sig, hashlib.sha256(body).digest()):
        raise OtaError("invalid", "bad_signature: the manifest is not signed by the release key")
    try:  # authentic from here: a bad value is the release engineer's mistake
        m = json.loads(body)
    except (ValueError, MemoryError):
        raise OtaError("invalid", "malformed: the manifest is not JSON") from None
    if type(m) is not dict or m.get("v") != 1:
        raise OtaError("invalid", "malformed: unsupported manifest version")
    version = m.get("version")
    boards = m.get("boards")
    files = m.get("files")
    if m.get("release") != release:
        raise OtaError("rejected", "the manifest is of release %r, not %d" % (m.get("release"), release))
    if type(version) is not str or not 0 < len(version) <= 32:
        raise OtaError("invalid", "malformed: version")
    if m.get("chunk") != CHUNK:  # the chunks on the broker are cut at this size
        raise OtaError("invalid", "malformed: chunk size is not %d" % CHUNK)
    if type(boards) is not list or board not in boards:
        raise OtaError("rejected", "release %d is not for board %s" % (release, board))
    if type(files) is not list or not 0 < len(files) <= MAX_FILES:
        raise OtaError("invalid", "malformed: files")
    seen = set()
    for f in files:
        if type(f) is not list or len(f) != 3 or not _path_ok(f[0]) or f[0] in seen \
                or type(f[1]) is not int or not 0 <= f[1] <= MAX_FILE or not _hex64(f[2]):
            raise OtaError("invalid", "malformed: a file entry")
        seen.add(f[0])
    if release_boot.ENTRY not in seen:
        raise OtaError("invalid", "malformed: no %s" % release_boot.ENTRY)
    return m


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return None


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _makedirs(path):
    """Every directory of path (a file's), on LittleFS as on a host."""
    d = ""
    for part in path.split("/")[:-1]:
        d = part if not d else d + "/" + part
        try:
            os.mkdir(d)
        except OSError as e:
            if e.args[0] != _EEXIST:
                raise


def _tree(d, out):
    """Files then directories under d, deepest first (for removal one at a time)."""
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        p = d + "/" + name
        if os.stat(p)[0] & 0x4000:
            _tree(p, out)
        else:
            out.append(p)
    out.append(d)


class Updater:
    """key: PublicKey; board: board.json's name; trial_s: how long a trial release has to report
    (config.json ota.trial_s); version: the running firmware's; reset: machine.reset.
    The MQTT link binds it (bind()) and gives it its step (poll, work, message, conn_up)."""

    def __init__(self, key, board, trial_s, version, reset, store=None, job_store=None):
        self.key = key
        self.board = board
        self.trial_ms = trial_s * 1000
        self.version = version
        self._reset = reset
        self._store = store or release_boot.StateStore()
        self._jobs = job_store or _JobStore()
        self._pile = self._topics = self._report = None
        self._boot = 0
        self._wall = time.time
        self.running = release_boot.selected()
        self._start_ms = None
        self._phase = IDLE
        self._release = 0  # being downloaded
        self._cmd = None  # the update command's id, answered when the download ends
        self._manifest = {}
        self._file = 0  # index into the manifest's files
        self._off = 0
        self._sha = None
        self._sub = None  # the chunk topic subscribed to, bytes
        self._got = False  # ... and its chunk has come
        self._again = False  # ... came with the pile busy, not written: subscribe again
        self._since = 0  # when the subscription was made (stall)
        self._stalls = 0
        self._total = self._done = 0  # bytes of the files
        self._shown = -1  # progress last published, %
        self._ack = None  # (cmd id, result, reason) waiting to go out
        self._due = True  # an ota message to publish
        self._prune = []  # paths to remove, one per step
        self.state = "running"
        self.reason = None
        self._trial = None  # the release on trial, when it is this one
        self._passed = False  # ... ticked and reported: marked good once the contactor is open
        self._rolled = None
        self._fatal = None
        self._verify = None  # (path, fresh): a whole manifest waiting for an idle pile
        self._rehash = None  # bytes of the current file's part hashed again so far (a resume)

    def _say(self, now_ms, text):
        if self._report is not None:
            self._report(now_ms, "ota", text)

    def bind(self, pile, topics, boot, report=None, wall=time.time):
        """From the link: its PileView (idle check, safe_off), its topics, the boot number."""
        self._pile = pile
        self._topics = topics
        self._boot = boot
        self._report = report
        self._wall = wall
        now = time.ticks_ms()
        state = self._store.load()
        if state is None:
            self._fatal = self._store.error
            self.state = "refused"
            self.reason = "release state unreadable (%s): updates off" % self._store.error
            return
        self._rolled = state["rolled"]
        if state["trial"] is not None and state["trial"] == self.running:
            self._trial = self.running
            self.state = "trial"
            self._say(now, "release %d (%s) on trial: it has %d s to report"
                      % (self.running, self.version, self.trial_ms // 1000))
        elif self._rolled is not None:
            self._say(now, "release %s was rolled back: %s" % (self._rolled.get("release"),
                                                                self._rolled.get("why")))
        job = self._jobs.load()
        if job is not None:
            if job["release"] > state["floor"] and self._trial is None:
                self._begin(now, job["release"], job["cmd"])
                self._say(now, "resuming the download of release %d" % self._release)
            else:
                self._jobs.clear()
        if self._phase == IDLE:
            # A rolled back release, or one never switched to (refused, given up): nothing will
            # use its files. Any other one stays for a recovery by hand (docs/ota.md).
            gone = None if self._rolled is None else self._rolled.get("release")
            for n in release_boot.releases_on_flash():
                if n not in (state["good"], state["trial"], self.running) \
                        and (n > state["floor"] or n == gone):
                    _tree(release_boot.rel_path(n), self._prune)

    def idle(self):
        """Contactor open and no session at all: not one charging, nor one waiting for its
        authorisation (a record without an id yet), nor an ended one with the car still there."""
        p = self._pile
        return p is not None and not p.contactor_closed() and not p.session_open()

    # -- the command -------------------------------------------------------------------------------

    def start(self, now_ms, cmd_id, release):
        """The `update` command: (result, reason) for its ack now, or (None, None): answered
        when the download has ended (verified and staged, or refused)."""
        if self._fatal is not None:
            return "failed", self.reason
        if not self.idle():
            return "rejected", "not during a session"
        if self._trial is not None:
            return "rejected", "release %d is still on trial" % self._trial
        state = self._store.load()
        if state is None:
            return "failed", "release state unreadable"
        if release <= state["floor"] or release == self.running:
            return "rejected", "replayed: release %d is not above %d" % (
                release, max(state["floor"], self.running))
        if self._phase != IDLE and self._release == release:
            return "accepted", "release %d: already under way" % release
        try:
            self._jobs.save({"release": release, "cmd": cmd_id})
        except OSError as e:
            return "failed", "not saved to flash (%s)" % e
        self._begin(now_ms, release, cmd_id)
        self._say(now_ms, "update to release %d: downloading" % release)
        return None, None

    def _begin(self, now_ms, release, cmd_id):
        self._release = release
        self._cmd = cmd_id
        self._phase = MANIFEST_PHASE
        self._manifest = {}
        self._file = self._off = self._done = self._total = 0
        self._sha = None
        self._rehash = None
        self._stalls = 0
        self._shown = -1
        self.state = "downloading"
        self.reason = None
        self._due = True
        d = release_boot.rel_path(release)  # a refused try of this one: its removal stops here
        self._prune = [p for p in self._prune if p != d and not p.startswith(d + "/")]
        # Releases other than the good one and this one go; never the one running.
        state = self._store.load() or release_boot.fresh()
        keep = (state["good"], release, self.running)
        for n in release_boot.releases_on_flash():
            if n not in keep:
                _tree(release_boot.rel_path(n), self._prune)
        self._open_manifest(now_ms)

    def _dir(self):
        return release_boot.rel_path(self._release)

    # -- the link's calls ----------------------------------------------------------------------------

    def conn_up(self):
        """A new connection (clean session): the subscription is gone; say where we are."""
        self._sub = None
        self._got = False
        self._again = False
        self._due = True

    def poll(self, now_ms):
        """Every loop: the trial's clock, a pending removal, a stalled download."""
        if self._start_ms is None:
            self._start_ms = now_ms
        if self._prune and self.idle():
            p = self._prune.pop(0)
            try:
                os.remove(p)
            except OSError:
                try:
                    os.rmdir(p)
                except OSError:
                    pass
        if self._trial is not None and self._passed and not self._pile.contactor_closed():
            self._good(now_ms)  # release.json: a flash write, never with the contactor closed
        if self._trial is not None and not self._passed \
                and time.ticks_diff(now_ms, self._start_ms) > self.trial_ms and self.idle():
            self._back(now_ms, "no report within %d s" % (self.trial_ms // 1000))
        if self._verify is not None and self.idle():
            path, fresh = self._verify
            self._verify = None
            try:
                self._load_manifest(now_ms, path, fresh)
            except OtaError as e:
                self._refuse(now_ms, e)
            except (OSError, MemoryError) as e:
                self._refuse(now_ms, OtaError("failed", "manifest unreadable (%r)" % e))
        elif self._rehash is not None and self._phase == FILES and self.idle():  # not in the same step
            try:
                self._rehash_step(now_ms)
            except OtaError as e:
                self._refuse(now_ms, e)
            except (OSError, MemoryError) as e:
                self._refuse(now_ms, OtaError("failed", "flash read failed (%r)" % e))
        if self._phase == STAGED and self._ack is None and not self._due and self.idle():
            self._switch(now_ms)

    def work(self, now_ms, conn):
        """One thing to send, when the link has room; True if it sent something."""
        t = self._topics
        if self._due:
            self._due = False
            conn.publish(t.ota, self._message(), retain=True)
            return True
        if self._ack is not None:
            cmd_id, result, reason = self._ack
            self._ack = None
            conn.publish(t.ack, telemetry.cmd_ack(self._wall(), cmd_id, "update", result, reason))
            return True
        if self._trial is not None:
            if not self._passed and conn.idle() \
                    and time.ticks_diff(now_ms, self._start_ms) >= _TRIAL_MIN_MS:
                self._passed = True  # written to flash by poll(), with the contactor open
            return False
        want = self._want()
        if self._sub is not None and (self._sub != want or self._again):
            # done with it, refused, staged, or its chunk came during a session (not written)
            conn.unsubscribe(self._sub)
            self._sub = None
            self._again = False
            return True
        if want is None:
            return False
        if not self.idle():
            self._since = now_ms  # a session is no stall
            return False
        if self._sub is None:
            conn.subscribe(want)
            self._sub = want
            self._got = False
            self._since = now_ms
            return True
        if self._sub is not None and not self._got \
                and time.ticks_diff(now_ms, self._since) > _STALL_MS:
            self._stalls += 1
            if self._stalls >= _STALLS:
                self._refuse(now_ms, OtaError("failed", "incomplete release: %s not published"
                                              % self._sub.decode()))
                return False
            conn.unsubscribe(self._sub)  # and again, at the next step
            self._sub = None
            return True
        return False

    def _want(self):
        """The chunk topic the download needs next, or None."""
        if self._verify is not None or self._rehash is not None:
            return None
        if self._phase == MANIFEST_PHASE:
            return topic(self._release, "m", self._off // CHUNK)
        if self._phase == FILES:
            return topic(self._release, str(self._file), self._off // CHUNK)
        return None

    def message(self, now_ms, topic_, payload):
        """A PUBLISH on a topic other than the pile's own: a chunk, if it is the one asked for."""
        if self._sub is None or topic_ != self._sub or self._got:
            return
        self._got = True
        if not self.idle():
            # Subscribed while idle, delivered after the contactor closed: no flash write, no
            # hash in a loop that must open the contactor in time. Asked for again when idle.
            self._again = True
            return
        self._stalls = 0
        try:
            if self._phase == MANIFEST_PHASE:
                self._manifest_chunk(now_ms, payload)
            elif self._phase == FILES:
                self._file_chunk(now_ms, payload)
        except OtaError as e:
            self._refuse(now_ms, e)
        except OSError as e:
            self._refuse(now_ms, OtaError("failed", "flash write failed (%s)" % e))
        except MemoryError:
            self._refuse(now_ms, OtaError("failed", "out of memory"))

    # -- the manifest ----------------------------------------------------------------------------------

    def _open_manifest(self, now_ms):
        """Resume: a verified manifest on flash, or a part of one."""
        d = self._dir()
        self._verify = None
        if _size(d + "/" + MANIFEST) is not None:
            self._verify = (d + "/" + MANIFEST, False)
            return
        part = d + "/" + MANIFEST + ".part"
        n = _size(part) or 0
        if n % CHUNK:
            _remove(part)
            n = 0
        self._off = n

    def _manifest_chunk(self, now_ms, payload):
        d = self._dir()
        part = d + "/" + MANIFEST + ".part"
        if self._off + len(payload) > MANIFEST_MAX:
            raise OtaError("invalid", "malformed: the manifest is over %d bytes" % MANIFEST_MAX)
        _makedirs(part)
        _append(part, payload)
        self._off += len(payload)
        if len(payload) < CHUNK:  # the last one (the tool pads a manifest to never fill one)
            self._verify = (part, True)

    def _load_manifest(self, now_ms, path, fresh_part):
        """The signature check: only with no session open (docs/ota.md: what it costs)."""
        with open(path, "rb") as f:
            data = f.read(MANIFEST_MAX + 1)
        t0 = time.ticks_ms()
        try:
            m = parse_manifest(data, self.key, self.board, self._release)
        except OtaError:
            _remove(path)
            raise
        if fresh_part:
            os.rename(path, self._dir() + "/" + MANIFEST)
            self._say(now_ms, "release %d (%s): manifest signature good (%d ms), %d files" % (
                self._release, m["version"], time.ticks_diff(time.ticks_ms(), t0), len(m["files"])))
        self._manifest = m
        self._total = 0
        for f in m["files"]:
            self._total += f[1]
        self._room(m)
        self._phase = FILES
        self._file = 0
        self._done = 0
        self._next_file(now_ms)
        if self._phase == FILES:  # resumed: what is on flash already counts
            self._shown = self._done * 100 // max(1, self._total) // _PROGRESS_STEP * _PROGRESS_STEP
            self._due = True

    def _room(self, m):
        """Refused before a byte of it is written if the files still to come do not fit with
        _FLASH_RESERVE to spare (a port without statvfs: not checked)."""
        statvfs = getattr(os, "statvfs", None)
        if statvfs is None:
            return
        d = self._dir()
        need = 0
        for path, size, _ in m["files"]:
            if _size(d + "/" + path) != size:
                need += size - (_size(d + "/" + path + ".part") or 0)
        st = statvfs(".")
        free = st[1] * st[4]  # f_frsize * f_bavail
        if need + _FLASH_RESERVE > free:
            raise OtaError("failed", "does not fit the flash: %d bytes to come, %d free" % (
                need, free))

    # -- the files -------------------------------------------------------------------------------------

    def _next_file(self, now_ms):
        """From self._file on: skip the files already verified, open the next one (resuming its
        part), or stage the release when none is left."""
        files = self._manifest["files"]
        d = self._dir()
        while self._file < len(files):
            path, size, digest = files[self._file]
            full = d + "/" + path
            if _size(full) == size:  # renamed only once it matched
                self._done += size
                self._file += 1
                continue
            part = full + ".part"
            have = _size(part) or 0
            if have % CHUNK and have != size or have > size:
                _remove(part)
                have = 0
            self._sha = hashlib.sha256()
            self._off = have
            if have:  # hashed again from its start by poll(), a few chunks a step
                self._rehash = 0
                return
            if not size:
                self._finish_file(now_ms)
                continue
            return
        self._staged(now_ms)

    def _rehash_step(self, now_ms):
        """_REHASH_CHUNKS more of the part a power cut left (MicroPython cannot save a hash's
        state); once all of it: on to its next chunk, or the file is whole."""
        path, size, _ = self._manifest["files"][self._file]
        buf = bytearray(CHUNK)
        pos = self._rehash or 0  # set whenever this step runs
        with open(self._dir() + "/" + path + ".part", "rb") as f:
            f.seek(pos)
            for _ in range(_REHASH_CHUNKS):
                left = self._off - pos
                if not left:
                    break
                n = f.readinto(buf)
                if not n:  # shorter than it was: go on from where it ends
                    self._off = pos
                    break
                n = min(n, left)
                self._sha.update(buf if n == CHUNK else buf[:n])
                pos += n
        self._rehash = pos
        if pos < self._off:
            return
        self._rehash = None
        if self._off == size:
            self._finish_file(now_ms)
            if self._phase == FILES:
                self._next_file(now_ms)

    def _file_chunk(self, now_ms, payload):
        path, size, _ = self._manifest["files"][self._file]
        expect = min(CHUNK, size - self._off)
        if len(payload) != expect:
            raise OtaError("failed", "truncated: %s chunk %d is %d bytes, not %d" % (
                path, self._off // CHUNK, len(payload), expect))
        part = self._dir() + "/" + path + ".part"
        _makedirs(part)
        _append(part, payload)
        self._sha.update(payload)
        self._off += len(payload)
        self._done += len(payload)
        if self._off == size:
            self._finish_file(now_ms)
            if self._phase == FILES:
                self._next_file(now_ms)
        pct = self._done * 100 // max(1, self._total)
        if pct >= self._shown + _PROGRESS_STEP:
            self._shown = pct
            self._due = True

    def _finish_file(self, now_ms):
        path, size, digest = self._manifest["files"][self._file]
        full = self._dir() + "/" + path
        if size == 0:
            _makedirs(full)
            open(full + ".part", "wb").close()
        got = binascii.hexlify(self._sha.digest()).decode()
        self._sha = None
        if got != digest:
            _remove(full + ".part")
            raise OtaError("failed", "%s does not match the manifest's SHA-256" % path)
        os.rename(full + ".part", full)
        self._file += 1

    def _staged(self, now_ms):
        self._phase = STAGED
        self.state = "staged"
        self._due = True
        self._shown = 100
        text = "release %d (%s) verified: switching when no session is open" % (
            self._release, self._manifest["version"])
        self._say(now_ms, text)
        if self._cmd is not None:
            self._ack = (self._cmd, "accepted", text)

    def _refuse(self, now_ms, e):
        self._say(now_ms, "release %d refused: %s" % (self._release, e.text))
        if self._cmd is not None:
            self._ack = (self._cmd, e.result, e.text)
        self._phase = IDLE
        self._manifest = {}
        self._sha = None
        self._rehash = None
        self.state = "refused"
        self.reason = e.text
        self._due = True
        self._jobs.clear()
        # Its files go (one per idle step): the journal shares the flash, nothing else would.
        state = self._store.load() or release_boot.fresh()
        if self._release not in (state["good"], state["trial"], self.running):
            _tree(release_boot.rel_path(self._release), self._prune)

    # -- the switch and the trial ------------------------------------------------------------------

    def _switch(self, now_ms):
        """Contactor open and pilot F, then one atomic write selects the release, then the reset."""
        state = self._store.load()
        self._pile.safe_off()
        self._say(now_ms, "switching to release %d: contactor open, pilot F, rebooting" % self._release)
        if state is not None:
            state["trial"] = self._release
            state["tries"] = 0
            state["floor"] = max(state["floor"], self._release)
            state["rolled"] = None
            try:
                self._store.save(state)
            except OSError as e:
                self._say(now_ms, "switch not written (%s): the running release stays" % e)
        self._jobs.clear()
        self._reset()

    def _good(self, now_ms):
        state = self._store.load()
        t = self._trial
        self._trial = None
        if state is None or state["trial"] != t:
            return
        state["good"] = t
        state["trial"] = None
        state["tries"] = 0
        state["rolled"] = None
        try:
            self._store.save(state)
        except OSError as e:
            self._say(now_ms, "good state not written (%s): the next boot rolls back" % e)
            return
        self._rolled = None
        self.state = "running"
        self._due = True
        self._say(now_ms, "release %d (%s) is good" % (t, self.version))
        for n in release_boot.releases_on_flash():
            if n != t:
                _tree(release_boot.rel_path(n), self._prune)

    def _back(self, now_ms, why):
        """A trial that did not make it: the state says why, then the reset boots the good one."""
        state = self._store.load()
        t = self._trial
        self._trial = None
        self._say(now_ms, "release %s: %s, rolling back" % (t, why))
        if state is not None and state["trial"] == t:
            state["trial"] = None
            state["tries"] = 0
            state["rolled"] = {"release": t, "why": why}
            try:
                self._store.save(state)
            except OSError:
                pass  # the boot counts the trial as failed anyway
        self._pile.safe_off()
        self._reset()

    def _message(self):
        return telemetry.ota(
            self._wall(), self._boot, self.running, self.version, self.state,
            self._release if self._phase != IDLE or self.state == "refused" else None,
            self._shown if self._phase in (FILES, STAGED) else None, self.reason, self.rolled())

    def rolled(self):
        """The `ota` message's rolled_back: the release the last trial rolled back, or None."""
        r = self._rolled
        return None if r is None else {"release": r.get("release"), "reason": r.get("why")}

    def quiet(self):
        """Nothing under way: no download, trial, removal, answer or subscription, no unreadable
        state; only an `update` command can start work (ota_lazy.py may drop this module). The
        `ota` message a new connection owes, and a refused download's (state, target, reason),
        are the caller's to keep."""
        return (self._phase == IDLE and self._trial is None and not self._prune and self._ack is None
                and self._fatal is None and self._verify is None and self._rehash is None
                and self._sub is None and self.state in ("running", "refused"))


def _append(path, data):
    """One chunk at the end of the file, closed at once (LittleFS commits on close)."""
    with open(path, "ab") as f:
        f.write(data)


class _JobStore:
    """ota_job.json: the download under way ({"release": n, "cmd": id}), resumed after a reset."""

    def __init__(self, path=JOB_FILE):
        import session_store

        self._s = session_store.SettingsStore(path)

    def load(self):
        job = self._s.load()
        if job is None or type(job.get("release")) is not int or job["release"] < 1:
            return None
        cmd = job.get("cmd")
        return {"release": job["release"], "cmd": cmd if type(cmd) is str else None}

    def save(self, job):
        self._s.save(job)

    def clear(self):
        self._s.clear()


def build(oconf, board_name, version, reset):
    """main.py: the Updater from config.json's ota section."""
    return Updater(PublicKey(binascii.unhexlify(oconf.key)), board_name, oconf.trial_s, version, reset)
