"""The over-the-air update's bench on CPython (host_tests/test_ota*.py): firmware/ota.py's
Updater and release_boot.py on a flash folder, a connection that hands out retained chunks as
the broker does, a pile that is idle or charging, and the boot that selects a release.

A reset (the Updater's machine.reset, or a test's power cut) is the exception Reset; boot()
then builds everything again from the same flash folder, as a board would.
"""
import contextlib
import json
import os
import sys

from . import firmware_module, release

PILE = "ota-pile-1"
BOARD = "ref-esp32"

_KEY = []


def release_key():
    """One 2048-bit release key per test run (making one takes a while)."""
    if not _KEY:
        _KEY.append(release.generate_key())
    return _KEY[0]


def fake_files(version, sizes=(3000, 768, 0, 1500)):
    """A release's files without compiling anything: main.mpy and a few others of these sizes."""
    names = ["main.mpy", "charger.mpy", "empty.mpy", "lib/umqtt/simple.mpy", "x%d.mpy"]
    out = []
    for i, size in enumerate(sizes):
        name = names[i] if i < 4 else names[4] % i
        seed = ("%s/%s/" % (version, name)).encode()
        data = (seed * (size // len(seed) + 1))[:size]
        out.append((name, data))
    return out


class Reset(BaseException):
    """The board resets (machine.reset(), or a power cut)."""


class Machine:
    """What release_boot.select() asks of `machine`."""
    PWRON_RESET, HARD_RESET, WDT_RESET, SOFT_RESET = 1, 2, 3, 5

    def __init__(self):
        self.cause = self.PWRON_RESET
        self.wdt = None

    def reset_cause(self):
        return self.cause

    def WDT(self, timeout):  # noqa: N802 - machine.WDT
        self.wdt = timeout


class Broker:
    """Retained messages by topic (str)."""

    def __init__(self):
        self.retained = {}

    def put(self, items):
        for t, p in items:
            if p:
                self.retained[t] = p
            else:
                self.retained.pop(t, None)


class Conn:
    """mqtt_conn.MqttConn as ota.Updater uses it: a subscription delivers the retained message."""

    def __init__(self, broker, out=None):
        self.broker = broker
        self.subs = set()
        self.inbox = []  # (topic bytes, payload) to deliver
        self.out = [] if out is None else out  # (topic, payload, retain)

    def subscribe(self, topic):
        self.subs.add(topic)
        payload = self.broker.retained.get(topic.decode())
        if payload is not None:
            self.inbox.append((topic, payload))

    def unsubscribe(self, topic):
        self.subs.discard(topic)

    def publish(self, topic, payload, retain=False, qos=1):
        self.out.append((topic, payload, retain))

    def idle(self):
        return True


class Pile:
    """The link's PileView, as far as the updater reads it."""

    def __init__(self):
        self.closed = False
        self.open_session = None
        self.safe_offs = 0

    def contactor_closed(self):
        return self.closed

    def session(self):
        return self.open_session

    def session_open(self):
        return self.closed or self.open_session is not None

    def safe_off(self):
        self.safe_offs += 1
        self.closed = False


class Topics:
    def __init__(self, pile_id=PILE):
        root = "evse/v1/%s/" % pile_id
        self.ota = (root + "ota").encode()
        self.ack = (root + "cmd/ack").encode()


@contextlib.contextmanager
def _own_sys_path():
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved


class Board:
    """A pile's flash folder (cwd: the caller chdirs there) and its updater, booted with boot()."""

    def __init__(self, key_hex, trial_s=60, version="0.1.0"):
        self.ota = firmware_module("ota")
        self.rb = firmware_module("release_boot")
        self.key = self.ota.PublicKey(bytes.fromhex(key_hex))
        self.trial_s = trial_s
        self.versions = {0: version}  # release -> the version its main would report
        self.machine = Machine()
        self.pile = Pile()
        self.reports = []
        self.boots = 0
        self.updater = None
        self.running = None
        self.sent = []  # everything published, over all boots

    def boot(self, broker, cause=Machine.PWRON_RESET):
        """Stage one, then the running release's updater bound to a fresh connection."""
        self.boots += 1
        self.machine.cause = cause
        with _own_sys_path():
            self.running = self.rb.select(self.machine)
            version = self.versions.get(self.running, "0.0.%d" % self.running)
            self.updater = self.ota.Updater(self.key, BOARD, self.trial_s, version, self._reset)
        self.conn = Conn(broker, self.sent)
        self.pile.closed = False
        self.updater.bind(self.pile, Topics(), self.boots,
                          lambda now, what, text: self.reports.append(text), wall=lambda: 0)
        self.updater.conn_up()
        return self.running

    def _reset(self):
        raise Reset()

    def step(self, now_ms):
        """One loop: poll, one thing sent, one chunk delivered."""
        link_step(self.updater, self.conn, now_ms)

    def acks(self):
        return acks(self.conn)

    def ota_messages(self):
        return [json.loads(p) for t, p, _r in self.conn.out if t.endswith(b"/ota")]

    def state(self):
        return self.rb.StateStore().load()


def link_step(updater, conn, now_ms):
    """The updater's part of one link step (mqtt_link): poll, one thing sent, one message of
    conn's inbox delivered."""
    updater.poll(now_ms)
    updater.work(now_ms, conn)
    if conn.inbox:
        t, p = conn.inbox.pop(0)
        updater.message(now_ms, t, p)


def acks(conn):
    """The command acks conn published, oldest first."""
    return [json.loads(p) for t, p, _r in conn.out if t.endswith(b"cmd/ack")]


def run(board, steps=2000, start_ms=0, period_ms=5, until=None):
    """Steps the board; returns the time reached. A Reset propagates."""
    now = start_ms
    for _ in range(steps):
        board.step(now)
        now += period_ms
        if until is not None and until():
            break
    return now


def files_on_flash(root="."):
    out = {}
    for d, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.relpath(os.path.join(d, name), root)
            with open(os.path.join(d, name), "rb") as f:
                out[p] = f.read()
    return out
