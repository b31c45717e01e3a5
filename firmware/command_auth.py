"""Remote commands: HMAC-SHA256 check, replay counter, argument validation. No networking.

The MQTT link hands `CommandVerifier.verify()` the raw payload; it returns a `Command` or
raises `CommandError(code, message)`, the only exception it raises for a bad payload, and
changes nothing then. Wire format and codes: docs/commands.md.

    payload = {"body": "<JSON text>", "sig": "<hex HMAC-SHA256 of the body's UTF-8 bytes>"}
    body    = {"v": 1, "id": "<id>", "cmd": "<name>", "counter": <int>, "args": {...}}

Signing the body text as sent means no JSON canonicalisation on either side. Messages never
contain the secret nor echo the payload (they end up in logs).
"""
from micropython import const
import binascii
import hashlib
import json
import time

_BLOCK = const(64)  # SHA-256 block size, RFC 2104 "B"
_MAX_COUNTER = const(9007199254740991)  # 2**53 - 1: exact in every JSON implementation
_MIN_SECRET = const(16)
VERSION = const(1)

_AVAILABILITY = const(("available", "unavailable_f", "unavailable_b1"))
# Faults a technician may clear remotely: the latched ones (charger.LATCHED_FAULTS).
_CLEARABLE_FAULTS = const(("welded", "rcd_lockout", "latch_state_lost"))
_MAX_AMPS = const(80)  # config.py's max_current_a range; the charger clamps further
_MAX_TTL_S = const(86400)  # set_current_limit's time to live: a day at most (charger_restore.py)

_BODY_KEYS = const(("args", "cmd", "counter", "id", "v"))
# The counter on flash is the floor after a reboot (docs/commands.md, "Replays"). While a close may
# come (a car plugged in) or commands keep coming it is a reservation R = counter + RESERVE,
# written with the contactor open: every counter up to R is accepted without a flash write, also
# while closed. Once no close may come and no command came for _QUIET_MS it is released: the last
# accepted counter itself, so that a reboot then moves no floor. 7 days of pilecmd's millisecond
# counters; renewed while open once less than half of it is left.
RESERVE = const(604800000)
_LOOK_MS = const(10000)  # the open step looks at the clock (renewal) and at a release this often
_QUIET_MS = const(60000)  # no command for this long (and no car): the reservation released
_RETRY_MS = const(60000)  # after a failed write
# Commands above the reservation accepted while the contactor is closed (no flash write then):
# those whose replay after a power cut can do no harm but stop a session or send a status.
_SAFE_UNSAVED = const(("remote_stop", "request_status"))


def _pads(key):
    if len(key) > _BLOCK:  # RFC 2104: longer keys are hashed first
        key = hashlib.sha256(key).digest()
    ipad = bytearray(_BLOCK)
    opad = bytearray(_BLOCK)
    for i in range(_BLOCK):
        k = key[i] if i < len(key) else 0
        ipad[i] = k ^ 0x36
        opad[i] = k ^ 0x5C
    return bytes(ipad), bytes(opad)


def _hmac(ipad, opad, msg):
    h = hashlib.sha256(ipad)
    h.update(msg)
    inner = h.digest()
    h = hashlib.sha256(opad)
    h.update(inner)
    return h.digest()


def equal_ct(a, b):
    """Compare two digests in time independent of where they differ."""
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0


def valid_auth_id(s):
    """The auth_id rule of docs/schemas/session_*.v1.schema.json, which states it: 1..64
    characters from '!' to '~' (printable ASCII, no space). A loop, not `re`: MicroPython's is
    limited. What the pile takes, the cloud stores (host_tests/test_hostile_security.py)."""
    if type(s) is not str or not 0 < len(s) <= 64:
        return False
    for c in s:
        if not "!" <= c <= "~":
            return False
    return True


def _is_id(s):
    """[A-Za-z0-9._:-]{1,64}: what cmd/ack can echo (docs/schemas/cmd_ack.v1.schema.json)."""
    if type(s) is not str or not 0 < len(s) <= 64:
        return False
    for c in s:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "._:-"):
            return False
    return True


def _is_name(s):
    """[a-z][a-z0-9_]{0,31}, the cmd/ack pattern for a command name."""
    if type(s) is not str or not 0 < len(s) <= 32 or not "a" <= s[0] <= "z":
        return False
    for c in s:
        if not ("a" <= c <= "z" or "0" <= c <= "9" or c == "_"):
            return False
    return True


def _claims(body):
    """(id, cmd) an unauthenticated body claims, for the error ack; None where unreadable."""
    try:
        d = json.loads(body)
    except (ValueError, RuntimeError, MemoryError):  # MemoryError: see _json
        return None, None
    if type(d) is not dict:
        return None, None
    cmd_id = d.get("id")
    name = d.get("cmd")
    return (cmd_id if _is_id(cmd_id) else None), (name if _is_name(name) else None)


class CommandError(Exception):
    """code: too_large, malformed, bad_signature, replayed, unknown_command, bad_argument,
    storage_error. command_id and cmd, for the error ack, when readable; `authentic` says
    whether they come from a signed body or are only what a bad_signature payload claims."""

    def __init__(self, code, message, command_id=None, cmd=None, authentic=False):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.command_id = command_id
        self.cmd = cmd
        self.authentic = authentic

    def __str__(self):
        return "%s: %s" % (self.code, self.message)


class Command:
    def __init__(self, cmd_id, cmd, counter, args):
        self.id = cmd_id
        self.cmd = cmd
        self.counter = counter
        self.args = args

    def __repr__(self):
        return "Command(%s %s #%d %r)" % (self.id, self.cmd, self.counter, self.args)


class CommandVerifier:
    """`secret` is the pile's key (bytes, >= 16). `last_counter` the floor: what
    CounterStore.load() gives. With `counter_store`, no command above the stored floor is
    returned before a new one is saved, so a reboot cannot reopen a replay window; `gate` (a
    flash_gate.FlashGate): no write while the contactor is closed, a command above the
    reservation then is refused (storage_error) unless it is remote_stop or request_status,
    whose counter is written when the contactor opens. `may_close()`: True while a close may
    come (wiring: a car plugged in): only then is a reservation kept on flash; None: always."""

    def __init__(self, secret, max_bytes=512, last_counter=0, faults=_CLEARABLE_FAULTS,
                 counter_store=None, gate=None, reserve=RESERVE, unix_ms=None, may_close=None):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < _MIN_SECRET:
            raise ValueError("secret must be at least %d bytes" % _MIN_SECRET)
        if not 64 <= max_bytes <= 4096:
            raise ValueError("max_bytes must be 64..4096")
        if type(last_counter) is not int or last_counter < 0:
            raise ValueError("last_counter must be an int >= 0")
        self._ipad, self._opad = _pads(bytes(secret))
        self.max_bytes = max_bytes
        self.last_counter = last_counter
        self.faults = tuple(faults)
        self._store = counter_store
        self._gate = gate
        self.reserve = reserve
        self.reserved = last_counter  # what the flash holds: no counter at or below it after a reboot
        self._due = False  # a counter above `reserved` accepted unsaved (closed): saved at the open
        self.writes = 0  # counter writes (for the bench and the tests)
        # Unix time in ms when the clock is set (NTP), else None: pilecmd's counters follow it,
        # so the reservation does too, renewed while the contactor is open (open_step()).
        self._unix_ms = unix_ms
        self._may_close = may_close
        self._look_at = None  # ticks_ms of the next look; None: at the first open step
        self._fresh = False  # a command accepted since the last open step
        self._quiet_at = None  # ticks_ms from which no command came for _QUIET_MS
        self._retry_at = None  # after a failed write: not again before then
        self._stale = False  # a release failed: the flash may hold more than `reserved`
        if gate is not None and counter_store is not None:
            gate.every_open_step(self.open_step)

    def verify(self, raw):
        """Command, or CommandError. Nothing changes unless a Command is returned."""
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise CommandError("malformed", "payload is not bytes")
        if len(raw) > self.max_bytes:
            raise CommandError("too_large", "payload over %d bytes" % self.max_bytes)
        outer = self._json(bytes(raw))
        if type(outer) is not dict or len(outer) != 2:
            raise CommandError("malformed", "payload must be {body, sig}")
        body = outer.get("body")
        sig = outer.get("sig")
        if type(body) is not str or type(sig) is not str:
            raise CommandError("malformed", "body and sig must be strings")
        try:
            body_bytes = body.encode()
        except ValueError:  # CPython: a lone surrogate escaped in the JSON
            raise CommandError("malformed", "body is not UTF-8") from None
        if len(sig) != 64:
            raise CommandError("bad_signature", "sig must be 64 hex digits", *_claims(body))
        try:
            given = binascii.unhexlify(sig)
        except ValueError:
            raise CommandError("bad_signature", "sig must be 64 hex digits",
                               *_claims(body)) from None
        if not equal_ct(_hmac(self._ipad, self._opad, body_bytes), given):
            raise CommandError("bad_signature", "signature does not match", *_claims(body))
        # Authentic from here on.
        cmd = self._json(body_bytes, True)
        if type(cmd) is not dict:
            raise CommandError("malformed", "body must be an object", authentic=True)
        cmd_id = cmd.get("id")
        if not _is_id(cmd_id):
            raise CommandError("malformed", "id must be 1..64 of A-Z a-z 0-9 . _ : -",
                               authentic=True)
        name = cmd.get("cmd")
        ack = (cmd_id, name if _is_name(name) else None, True)  # for the error ack
        if sorted(cmd) != list(_BODY_KEYS):
            raise CommandError("malformed", "body keys must be v, id, cmd, counter, args", *ack)
        v = cmd["v"]
        if type(v) is not int or v != VERSION:
            raise CommandError("malformed", "unsupported version", *ack)
        counter = cmd["counter"]
        if type(counter) is not int or not 0 < counter <= _MAX_COUNTER:
            raise CommandError("malformed", "counter must be an int 1..2**53-1", *ack)
        if counter <= self.last_counter:
            # The floor, so that a sender whose counter fell behind (the reservation after a
            # reboot) can jump: pilecmd sends again above it.
            raise CommandError("replayed", "counter not above %d" % self.last_counter, *ack)
        args = cmd["args"]
        if type(args) is not dict:
            raise CommandError("malformed", "args must be an object", *ack)
        check = _COMMANDS.get(name) if type(name) is str else None
        if check is None:
            raise CommandError("unknown_command", "no such command", *ack)
        args = check(self, args)
        if args is None:
            raise CommandError("bad_argument", _USAGE[name], *ack)  # type: ignore[index]  # str here
        if self._store is not None:
            self._keep(counter, name, ack)
            self._fresh = True
        self.last_counter = counter
        return Command(cmd_id, name, counter, args)

    def _keep(self, counter, name, ack):
        """Replay protection across a reboot for an accepted `counter` (docs/commands.md)."""
        held = self._gate is not None and self._gate.held
        if counter <= self.reserved:
            if not self._due and counter > self.reserved - self.reserve // 2:
                # Under half of it left: renewed now, or when the contactor opens. Not needed
                # for this command: an error is not its business.
                if held:
                    self._due = True
                    self._gate.defer(self._flush)  # held: a gate
                else:
                    self._save(counter, True)
            return
        if not held:
            if self._save(counter, True) is not None:
                raise CommandError("storage_error", "counter not saved, not executed", *ack)
            return
        if name not in _SAFE_UNSAVED:
            raise CommandError("storage_error", "counter reservation used up while the contactor "
                               "is closed: not executed, send it again after the session", *ack)
        if not self._due:
            self._due = True
            self._gate.defer(self._flush)  # held: a gate

    def _arming(self):
        """A close may come, so the flash should hold a reservation (may_close None: always)."""
        may = self._may_close
        return may is None or may()

    def _ahead(self):
        """The counter a reservation starts from: the last accepted, or the Unix ms if later."""
        u = None if self._unix_ms is None else self._unix_ms()
        return self.last_counter if u is None or u <= self.last_counter else u

    def reserve_ahead(self):
        """At boot, the contactor open: a reservation above the floor (and the clock) if a close
        may come (may_close None: always), so that a session's commands need no flash write.
        Otherwise nothing: the floor stays where it was. None, or the OSError."""
        if self._store is None or not self._arming():
            return None
        ahead = self._ahead()
        if self._reservation(ahead) <= self.reserved:
            return None  # the top of the range: nothing to gain
        return self._save(ahead, True)

    def open_step(self, now_ms):
        """The flash gate, every step with the contactor open. While a close may come: a
        reservation written at once if there is none, renewed once the clock has used half of
        it (looked at every 10 s). When none may and no command came for _QUIET_MS: released,
        the floor brought back to the last accepted counter (a reservation left there would be
        the floor after a reboot, refusing the sender's next counters: docs/commands.md); a
        counter accepted unsaved whose write failed, written as the floor. None, or why it was
        not written."""
        if self._gate.held:
            return None
        retry = self._retry_at
        if retry is not None:
            if time.ticks_diff(now_ms, retry) < 0:
                return None
            self._retry_at = None
        if self._fresh:
            self._fresh = False
            self._quiet_at = time.ticks_add(now_ms, _QUIET_MS)
        quiet = self._quiet_at
        if quiet is not None and time.ticks_diff(now_ms, quiet) >= 0:
            # Passed: dropped at once, as _look_at below while not armed. A stamp kept longer (a
            # car plugged in for days, a pile idle for a week) would be read across the ticks
            # wrap (2**29 ms) as still ahead, the release held back for days
            # (host_tests/test_review_flashfix.py).
            self._quiet_at = quiet = None
        armed = self.reserved > self.last_counter or self._stale
        if armed:
            at = self._look_at
            if at is not None and time.ticks_diff(now_ms, at) < 0:
                return None
            self._look_at = time.ticks_add(now_ms, _LOOK_MS)
        else:
            self._look_at = None  # looked at every step until armed, then every _LOOK_MS
        arm = self._arming()  # not armed: looked at every step (a close may follow a plug-in)
        if arm:
            ahead = self._ahead()
            if armed and ahead <= self.reserved - self.reserve // 2:
                return None
            if self._reservation(ahead) <= self.reserved:
                return None  # the top of the range: nothing to gain
        else:
            # A counter accepted above the flash's (a stop while closed whose write at the open
            # failed): written at once, not left open until the next command.
            unsaved = self.last_counter > self.reserved
            if self._due or not unsaved and (not armed or quiet is not None):
                return None
            ahead = self.last_counter
        e = self._save(ahead, arm)
        if e is None:
            return None
        self._retry_at = time.ticks_add(now_ms, _RETRY_MS)
        return "command counter %s not written (%s)" % ("reservation" if arm else "floor", e)

    def _reservation(self, counter):
        """What a write stores for `counter` while a close may come: RESERVE above it, but at
        the top of the range the counter itself (a write per command, as without a reservation):
        a reservation reaching 2**53 - 1 would leave after a reboot a floor no counter is above,
        every command (update too) refused for good (host_tests/test_review_loop_flash.py)."""
        return counter if counter >= _MAX_COUNTER - self.reserve else counter + self.reserve

    def _save(self, counter, arm):
        """The floor after a reboot at `counter`, a reservation above it if `arm`; None, or
        the error."""
        r = self._reservation(counter) if arm else counter
        if self._gate is not None:
            self._gate.spend()  # the settings a command changes wait for the next iteration
        try:
            self._store.save(r)  # only with a store
        except OSError as e:
            if r < self.reserved:
                # A release: the error may come after the new file is in place (a sync after the
                # rename), the flash holding r or the old reservation. Only up to r is accepted
                # without a write from now on; `_stale`: released again at a later open step
                # (host_tests/test_review_flashfix.py).
                self.reserved = r
                self._stale = True
            return e
        self.writes += 1
        self.reserved = r
        self._stale = False
        self._due = False
        return None

    def _flush(self, now_ms):
        """The flash gate, the contactor open again: the counter saved above the last accepted
        one (an unsaved remote_stop / request_status, or under half of the reservation left)."""
        due = self._due
        self._due = False
        if not due:
            return None
        e = self._save(self.last_counter, True)
        if e is None:
            return None
        # The next command above the reservation tries again before it is accepted.
        return "command counter not saved to flash (%s): a power cut could reopen %d" % (
            e, self.last_counter)

    @staticmethod
    def _json(data, authentic=False):
        try:
            return json.loads(data)
        except (ValueError, RuntimeError):  # RuntimeError: CPython's recursion limit
            raise CommandError("malformed", "not valid JSON", authentic=authentic) from None
        except MemoryError:  # MicroPython: "[[[[..." within 512 bytes takes ~19 KB to parse
            raise CommandError("malformed", "nested too deep to parse", authentic=authentic) from None

    # -- arguments: each returns the checked args dict, or None -----------------------------

    def _remote_start(self, args):
        if list(args) == ["auth_id"] and valid_auth_id(args["auth_id"]):
            return {"auth_id": args["auth_id"]}
        return None

    def _set_current_limit(self, args):
        keys = sorted(args)
        if keys == ["amps"] or keys == ["amps", "ttl_s"]:
            amps = args["amps"]
            if len(keys) == 1:  # no ttl_s: the pile's limit_ttl_s applies; null: no limit
                if amps is None or type(amps) in (int, float) and 0 <= amps <= _MAX_AMPS:
                    return {"amps": amps}
                return None
            ttl = args["ttl_s"]
            # type(): bool is an int on CPython; NaN fails every comparison. A null amps takes
            # no ttl_s: there is no limit to run out.
            if type(amps) in (int, float) and 0 <= amps <= _MAX_AMPS \
                    and type(ttl) is int and 1 <= ttl <= _MAX_TTL_S:
                return {"amps": amps, "ttl_s": ttl}
        return None

    def _set_availability(self, args):
        if list(args) == ["state"] and type(args["state"]) is str \
                and args["state"] in _AVAILABILITY:
            return {"state": args["state"]}
        return None

    def _clear_fault(self, args):
        if list(args) == ["fault"] and type(args["fault"]) is str and args["fault"] in self.faults:
            return {"fault": args["fault"]}
        return None

    def _update(self, args):
        if list(args) == ["release"] and type(args["release"]) is int and 0 < args["release"] < 0x80000000:
            return {"release": args["release"]}
        return None

    def _none(self, args):
        return None if args else {}


_COMMANDS = {
    "remote_start": CommandVerifier._remote_start,
    "remote_stop": CommandVerifier._none,
    "set_current_limit": CommandVerifier._set_current_limit,
    "set_availability": CommandVerifier._set_availability,
    "clear_fault": CommandVerifier._clear_fault,
    "request_status": CommandVerifier._none,
    "reboot": CommandVerifier._none,
    "update": CommandVerifier._update,
}
_USAGE = {
    "remote_start": "needs auth_id: 1..64 of ! to ~ (printable ASCII, no space)",
    "remote_stop": "takes no arguments",
    "set_current_limit": "needs amps: 0..%d or null; ttl_s: 1..%d s, only with amps" % (
        _MAX_AMPS, _MAX_TTL_S),
    "set_availability": "needs state: " + " | ".join(_AVAILABILITY),
    "clear_fault": "needs fault: one of the clearable faults",
    "request_status": "takes no arguments",
    "reboot": "takes no arguments",
    "update": "needs release: 1..2**31-1",
}
