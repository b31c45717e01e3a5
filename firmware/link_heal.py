"""A link that heals itself (docs/network.md, "A link that heals itself"): the connect watchdog
and its escalation ladder, reconnect -> restart the Wi-Fi -> reset the board; a second client
with the same client id told from a broken link; and the figures of the `health` message.

Decisions only: the link (mqtt_link.py) asks what is due and does it. The board reset is allowed
only with no session open and never more often than the rate: the count of escalation resets
that did not bring the link back is kept on flash (files.HEAL_FILE), so a board that cannot
reach its broker does not reset-loop: each such reset doubles the uptime the next one needs."""
import gc
import json
import sys
import time

from micropython import const

import durable

# A connection the broker closes this soon after its CONNACK is "kicked"; this many in a row:
# another client uses our client id (MQTT 3.1.1 section 3.1.4: the broker disconnects the
# existing client with the same id).
_KICK_MS = const(10000)
_KICKS = const(3)
_STREAK_CAP = const(5)  # the rate doubles up to 2**5 times reset_min_interval_s
_MAX_MS = const(0x3FFFFFFF)
_OB_MARKS = const(8)  # OutboxAge's (seq, ms) marks

_STEP_RECONNECT = const("reconnect")
STEP_WIFI = "wifi_restart"
STEP_RESET = "reset"
_CLOSED_BY_BROKER = const("closed by the broker")  # mqtt_conn.py's text when the broker closes


class HealStore:
    """files.HEAL_FILE: {"resets": every escalation reset, "streak": those since the link was
    last up, "reason": why the last one}. Unreadable: a streak of 1, so the rate stays slow."""

    # Set by link_reset.load_heal (annotations only: no code on the board).
    path: str
    resets: int
    streak: int
    reason: "str | None"

    def __init__(self, path):
        import link_reset  # the boot's and the last rung's: not kept for the link's set-up

        try:
            link_reset.load_heal(self, path)
        finally:
            sys.modules.pop("link_reset", None)

    def save(self):
        """A flash write: the caller makes sure the contactor is open."""
        durable.write_atomic(self.path, json.dumps(
            {"resets": self.resets, "streak": self.streak, "reason": self.reason}).encode())


class Ladder:
    """conf: config.json's mqtt section (wifi_restart_after_s, reset_after_s,
    reset_min_interval_s, conflict_pause_s); store: a HealStore or None (then no reset ever);
    now_ms: the link's boot time, when the watchdog starts."""

    # Set by link_setup.setup_ladder (annotations only: no code on the board).
    _wifi_ms: int
    _reset_ms: int
    _rate_ms: int
    conflict_pause_ms: int
    _store: "HealStore | None"
    down_since: int
    _wifi_at: "int | None"
    _up_at: "int | None"
    connects: int
    reconnects: int
    wifi_restarts: int
    resets: int
    last_step: "str | None"
    last_reason: "str | None"
    kicks: int
    conflict: bool
    _clear_streak: bool

    def __init__(self, conf, store, now_ms):
        import link_setup  # the boot's: dropped by the link when it is built

        link_setup.setup_ladder(self, conf, store, now_ms, STEP_RESET)

    # -- what the link tells ---------------------------------------------------------------------

    def up(self, now_ms):
        self.connects += 1
        self._up_at = now_ms
        self._wifi_at = None
        if self._store is not None and self._store.streak:
            self._clear_streak = True

    def down(self, now_ms, why):
        """A connection ended or an attempt failed; returns the pause before the next attempt when
        it is not the backoff's (a client id conflict), else None."""
        up_at = self._up_at
        self._up_at = None
        self.reconnects += 1
        if up_at is not None or self.last_step is None:  # a new outage: its first rung
            self.last_step = _STEP_RECONNECT
            self.last_reason = why
        if up_at is None:
            return self.conflict_pause_ms if self.conflict else None
        self.down_since = now_ms
        if _CLOSED_BY_BROKER in why and time.ticks_diff(now_ms, up_at) < _KICK_MS:
            self.kicks += 1
            if self.kicks >= _KICKS:
                self.conflict = True
                self.last_reason = "client_id_conflict"
                return self.conflict_pause_ms
            return None
        self.kicks = 0
        self.conflict = False
        return None

    def settle(self, now_ms):
        """While up: a connection that lasts ends a suspected conflict."""
        up_at = self._up_at
        if up_at is not None and (self.kicks or self.conflict) \
                and time.ticks_diff(now_ms, up_at) >= _KICK_MS:
            self.kicks = 0
            self.conflict = False

    # -- what is due -----------------------------------------------------------------------------

    def due(self, now_ms, uptime_ms, wifi_up, session_open):
        """While the link is down: STEP_WIFI, STEP_RESET or None. wifi_up: the station has an
        address (None: no Wi-Fi here); session_open: the contactor is closed or a record open."""
        if self.conflict:
            return None  # the network works: another client holds our id
        down = time.ticks_diff(now_ms, self.down_since)
        if down >= self._reset_ms and not session_open and self.may_reset(uptime_ms):
            return STEP_RESET
        if wifi_up and down >= self._wifi_ms and (
                self._wifi_at is None or time.ticks_diff(now_ms, self._wifi_at) >= self._wifi_ms):
            return STEP_WIFI
        return None

    def may_reset(self, uptime_ms):
        """The rate: this boot's uptime is the least time since the last escalation reset."""
        store = self._store
        if store is None:
            return False
        need = self._rate_ms << min(store.streak, _STREAK_CAP)
        return uptime_ms >= min(need, _MAX_MS)

    def wifi_restarted(self, now_ms, why):
        self._wifi_at = now_ms
        self.wifi_restarts += 1
        self.last_step = STEP_WIFI
        self.last_reason = why

    def flash_due(self, contactor_closed):
        """The link is back after escalation resets: the streak goes to 0 on flash, never with
        the contactor closed. OSError is the caller's to report."""
        if not self._clear_streak or contactor_closed:
            return
        self._clear_streak = False
        self._store.streak = 0
        self._store.save()


class LoopFigures:
    """The control loop's period as the link sees it (time between two polls), since the last
    health message: max and mean in ms. last_ms: the last poll's time (the boot's, or None)."""

    def __init__(self, last_ms=None):
        self.max_ms = 0
        self.sum_ms = 0
        self.n = 0
        self.last_ms = last_ms

    def note(self, now_ms):
        """A poll at now_ms: the ms since the one before (the link's uptime), 0 at the first."""
        last = self.last_ms
        self.last_ms = now_ms
        if last is None:
            return 0
        dt_ms = time.ticks_diff(now_ms, last)
        if dt_ms > self.max_ms:
            self.max_ms = dt_ms
        self.sum_ms += dt_ms
        self.n += 1
        return dt_ms

    def take(self):
        out = (self.max_ms, self.sum_ms // self.n if self.n else 0, self.n)
        self.max_ms = self.sum_ms = self.n = 0
        return out


class OutboxAge:
    """When the records still unacknowledged were written, as this boot saw the journal's next
    sequence number move: a few (first seq, ms) marks. A record from an earlier boot counts from
    this boot's start (the least it can be)."""

    def __init__(self, outbox, now_ms):
        self._outbox = outbox
        self._seen = outbox.next_seq
        self._marks = [(0, now_ms)]  # everything before this boot: from now

    def note(self, now_ms):
        seq = self._outbox.next_seq
        if seq != self._seen:
            marks = self._marks
            if len(marks) >= _OB_MARKS:
                marks.pop(1)  # the older time is kept for those records: an age never too small
            marks.append((self._seen, now_ms))
            self._seen = seq

    def figures(self, now_ms):
        """(records not yet acknowledged, age of the oldest in s or None)."""
        ob = self._outbox
        depth = max(0, ob.next_seq - 1 - ob.acked)
        if not depth:
            self._marks = self._marks[-1:]
            return 0, None
        first = ob.acked + 1
        at = self._marks[0][1]
        for seq, ms in self._marks:
            if seq <= first:
                at = ms
        return depth, time.ticks_diff(now_ms, at) // 1000


def heap():
    """(free bytes, largest free block or None): stock MicroPython prints the largest block in
    micropython.mem_info() but returns nothing, so it is None there."""
    free = getattr(gc, "mem_free", None)  # CPython (the host tests) has none: 0
    largest = getattr(gc, "mem_maxfree", None)
    return 0 if free is None else free(), None if largest is None else largest()
