"""Over-the-air updates loaded only while they have work (issue 12 item 3, docs/ota.md).

ota.py (~12.5 KiB of a stock image's heap as .mpy) and release_boot.py (~3.4 KiB) are imported
when the link binds the updater: it may resume a download, watch a trial or remove an old
release. Once it is quiet (ota.Updater.quiet: nothing under way) both are dropped and only the
`ota` message's fields are kept; an `update` command imports them again. An update runs only with
no session open, so a session never has them on the heap.

The same calls as ota.Updater (mqtt_link.py and commands.py cannot tell them apart).
"""
import gc
import sys
import time

import telemetry


def _load(key_hex, board, trial_s, version, reset):
    import binascii

    import ota

    return ota.Updater(ota.PublicKey(binascii.unhexlify(key_hex)), board, trial_s, version, reset)


class Updater:
    """key_hex: config.json's ota.key; the rest as ota.Updater. load: makes the real updater
    (tests give their own)."""

    def __init__(self, key_hex, board, trial_s, version, reset, load=_load):
        self._args = (key_hex, board, trial_s, version, reset)
        self._load_fn = load
        self._u = None
        self._bind = None  # bind()'s arguments, for each load
        self._due = False  # the `ota` message to publish while dropped
        self._fields = None  # (running, version, rolled) for it
        self.loads = 0  # times ota.py was imported (the tests read it)

    def _load(self):
        had = set(sys.modules)
        u = self._load_fn(*self._args)
        pile, topics, boot, report, wall = self._bind
        again = self._fields is not None
        u.bind(pile, topics, boot, None if again else report, wall)  # its boot lines said once
        u._report = report
        if again:
            u._due = self._due  # a new connection's message not sent yet: still owed, else not
        self._u = u
        self._brought = [m for m in ("ota", "release_boot") if m not in had]
        self.loads += 1
        return u

    def _settle(self, collect=False):
        """Drops the real updater and its modules once it is quiet; main.py's next collection
        frees them (collect: at once, at the boot)."""
        u = self._u
        if u is None or not u.quiet():
            return
        self._fields = (u.running, u.version, u.rolled())
        self._due = u._due
        self._u = None
        for m in self._brought:
            sys.modules.pop(m, None)
        if collect:
            gc.collect()

    @property
    def loaded(self):
        return self._u is not None

    def bind(self, pile, topics, boot, report=None, wall=time.time):
        self._bind = (pile, topics, boot, report, wall)
        self._load()
        self._settle(True)

    def idle(self):
        if self._u is not None:
            return self._u.idle()
        p = self._bind[0] if self._bind else None
        return p is not None and not p.contactor_closed() and not p.session_open()

    def start(self, now_ms, cmd_id, release):
        if self._u is None and not self.idle():  # ota.Updater.start's answer, without the import
            return "rejected", "not during a session"
        u = self._u or self._load()
        result = u.start(now_ms, cmd_id, release)
        self._settle()  # refused at once: nothing under way
        return result

    def conn_up(self):
        if self._u is not None:
            self._u.conn_up()
        else:
            self._due = True

    def poll(self, now_ms):
        if self._u is not None:
            self._u.poll(now_ms)
            self._settle()

    def work(self, now_ms, conn):
        if self._u is not None:
            return self._u.work(now_ms, conn)
        if not self._due:
            return False
        self._due = False
        running, version, rolled = self._fields
        _pile, topics, boot, _report, wall = self._bind
        conn.publish(topics.ota, telemetry.ota(wall(), boot, running, version, "running", None, None, None,
                                               rolled), retain=True)
        return True

    def message(self, now_ms, topic_, payload):
        if self._u is not None:
            self._u.message(now_ms, topic_, payload)
