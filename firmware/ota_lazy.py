"""Over-the-air updates loaded only while they have work (issue 12 item 3, docs/ota.md).

ota.py (~12.5 KiB of a stock image's heap as .mpy) and release_boot.py (~3.4 KiB) are imported
only when there is work: survey() looks at the flash at the boot, before the control modules
load; with a trial to watch, a download to resume or a release to remove, bind() loads them.
Once the updater is quiet (ota.Updater.quiet: nothing under way) both are dropped and only the
`ota` message's fields are kept (a refused download's too); an `update` command imports them
again. An update runs only with no session open, so a session never has them on the heap.

The same calls as ota.Updater (mqtt_link.py and commands.py cannot tell them apart).
"""
import gc
import sys
import time

import telemetry


def survey():
    """At the boot, before the control modules load (wiring.load_settings): None when the
    updater has work from the start (a trial to watch, a download to resume or forget, a release
    to remove, an unreadable release.json: ota.Updater.bind's cases), else (running release,
    rolled back) for the `ota` message; then bind() needs no ota.py at all. Reads only the flash."""
    import os

    import files

    had = "release_boot" in sys.modules
    import release_boot as rb

    try:
        running = rb.selected()
        state = rb.StateStore().load()
        if state is None or (state["trial"] is not None and state["trial"] == running):
            return None
        try:
            os.stat(files.OTA_JOB_FILE)
            return None
        except OSError:
            pass
        rolled = state["rolled"]
        gone = None if rolled is None else rolled.get("release")
        for n in rb.releases_on_flash():
            if n not in (state["good"], state["trial"], running) and (n > state["floor"] or n == gone):
                return None
        return running, rolled
    finally:
        if not had:
            sys.modules.pop("release_boot", None)


def _load(key_hex, board, trial_s, version, reset):
    import binascii

    import ota

    return ota.Updater(ota.PublicKey(binascii.unhexlify(key_hex)), board, trial_s, version, reset)


class Updater:
    """key_hex: config.json's ota.key; the rest as ota.Updater. load: makes the real updater
    (tests give their own)."""

    def __init__(self, key_hex, board, trial_s, version, reset, load=_load, surveyed=None):
        self._args = (key_hex, board, trial_s, version, reset)
        self._load_fn = load
        self._u = None
        self._bind = (None,) * 5  # type: tuple  # bind()'s arguments, for each load
        self._due = False  # the `ota` message to publish while dropped
        self._fields = ()  # type: tuple  # (running, version, rolled) for it, once known
        self._surveyed = surveyed  # survey()'s answer at the boot: None, load at bind
        self._failed = None  # why ota.py could not be loaded (the `ota` message's refusal), or None
        self._refused = None  # (target, reason) of a refused download, shown until the next start
        self.loads = 0  # times ota.py was imported (the tests read it)

    def _load(self):
        had = set(sys.modules)
        try:
            return self._loaded(had)
        except Exception:  # noqa: BLE001 - a half-done import (MemoryError, a damaged .mpy) goes
            for m in ("ota", "release_boot"):
                if m not in had:
                    sys.modules.pop(m, None)
            self._u = None
            gc.collect()
            raise

    def _loaded(self, had):
        u = self._load_fn(*self._args)
        pile, topics, boot, report, wall = self._bind
        again = bool(self._fields)
        u.bind(pile, topics, boot, None if again else report, wall)  # its boot lines said once
        u._report = report
        if again:
            u._due = self._due  # a new connection's message not sent yet: still owed, else not
            if self._refused is not None:  # its message as before the drop
                u.state = "refused"
                u._release, u.reason = self._refused
        self._u = u
        self._brought = [m for m in ("ota", "release_boot") if m not in had]
        self._failed = None
        self.loads += 1
        return u

    def _settle(self, collect=False):
        """Drops the real updater and its modules once it is quiet; main.py's next collection
        frees them (collect: at once, at the boot)."""
        u = self._u
        if u is None or not u.quiet():
            return
        self._fields = (u.running, u.version, u.rolled())
        self._refused = (u._release, u.reason) if u.state == "refused" else None
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
        known, self._surveyed = self._surveyed, None
        if known is None:
            try:
                self._load()
            except Exception as e:  # noqa: BLE001 - see _unloadable
                self._unloadable(e, report)
                return
            self._settle(True)
            return
        running, rolled = known
        shown = None
        if rolled is not None:  # as ota.Updater.rolled() shows it, and bind() says it
            shown = {"release": rolled.get("release"), "reason": rolled.get("why")}
            if report is not None:
                report(time.ticks_ms(), "ota", "release %s was rolled back: %s" % (shown["release"],
                                                                                  shown["reason"]))
        self._fields = (running, self._args[3], shown)
        self._due = True  # as a new ota.Updater: its message owed

    def idle(self):
        if self._u is not None:
            return self._u.idle()
        p = self._bind[0]
        return p is not None and not p.contactor_closed() and not p.session_open()

    def _unloadable(self, e, report):
        """ota.py not loaded at the boot with work on flash (a MemoryError, a damaged .mpy):
        raising here would reset the board at every boot (the work stays on flash). A trial
        release must not run unwatched: then it raises all the same, and the reset rolls it
        back (release_boot.select). Else the pile charges, updates refused, the message says
        why; an `update` command tries the import again."""
        had = "release_boot" in sys.modules
        import release_boot as rb

        try:
            running = rb.selected()
            state = rb.StateStore().load()
        finally:
            if not had:
                sys.modules.pop("release_boot", None)
        if state is not None and state["trial"] is not None and state["trial"] == running:
            raise e
        rolled = None if state is None else state["rolled"]
        self._failed = "updater not loaded (%s)" % repr(e)[:60]
        if report is not None:
            report(time.ticks_ms(), "ota", self._failed)
        self._fields = (running, self._args[3], None if rolled is None else {
            "release": rolled.get("release"), "reason": rolled.get("why")})
        self._due = True

    def start(self, now_ms, cmd_id, release):
        if self._u is None and not self.idle():  # ota.Updater.start's answer, without the import
            return "rejected", "not during a session"
        if self._u is None:
            try:
                self._load()
            except Exception as e:  # noqa: BLE001 - unhandled, it would open the contactor and reset
                self._failed = "updater not loaded (%s)" % repr(e)[:60]
                self._due = True
                return "failed", self._failed
        u = self._u
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
        failed, refused = self._failed, self._refused
        if failed is not None:
            state, target, reason = "refused", None, failed
        elif refused is not None:
            state, (target, reason) = "refused", refused
        else:
            state, target, reason = "running", None, None
        conn.publish(topics.ota, telemetry.ota(wall(), boot, running, version, state, target, None,
                                               reason, rolled), retain=True)
        return True

    def message(self, now_ms, topic_, payload):
        if self._u is not None:
            self._u.message(now_ms, topic_, payload)
