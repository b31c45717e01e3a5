"""At boot: a Charger made (its state set: charger.py has no __init__, its bytecode would stay on
the heap for the run), then its remote settings and latched faults, back from settings.json.

Only the boot makes it and restores them (wiring.build), so this runs once and wiring.py drops it at once,
before the link's modules load (issue 12): its bytes are not on the heap for the run. What a
setting means, and every decision on it, stays charger.py's; this reads the file and puts the
saved values where the charger keeps them, as the charger's set_* left them before the reboot.
"""
from micropython import const
import time

import charger as ch
import pilot

# docs/commands.md: set_current_limit takes 0-80 A; a saved limit outside that is garbage.
_MAX_REMOTE_LIMIT_MA = const(80000)
_MAX_LIMIT_TTL_S = const(86400)  # config.py / command_auth.py: a day at most
_LIMIT_REMOTE = const("remote")  # charger.py's limit_source of a remote limit (a test keeps them one)


def build(max_current_ma, board_max_ma, free_vend, allow_ventilation, report=None, settings=None,
          fallback_ma=None, wall=None, limit_ttl_s=None):
    """A charger.Charger, idle, nothing restored yet (load_settings). settings: a
    session_store.SettingsStore for the remote settings, or None (RAM only). fallback_ma: what a
    remote limit falls back to when its time to live runs out (config limit_fallback_a); None:
    the limit is removed. wall: time.time, for a limit's expiry across a reboot; None: a limit
    with a time to live never outlives a reboot. limit_ttl_s: the time to live of a
    set_current_limit that names none (config limit_ttl_s); None: such a limit never runs out."""
    c = ch.Charger()
    c.max_current_ma = max_current_ma
    c.board_max_ma = board_max_ma
    c.free_vend = free_vend
    c.allow_ventilation = allow_ventilation
    c._report = report
    c.cable_ma = 0
    c.remote_limit_ma = None
    c.limit_source = None
    c.limit_until_ms = None
    c.fallback_ma = fallback_ma
    c.limit_ttl_s = limit_ttl_s
    c._wall = wall
    c._limit_cmd = (None, None, None)
    c._saved_limit = (None, None, None)
    c.state = ch.IDLE
    c.faults = 0
    c.plugged = False
    c.session = None
    c.pilot = pilot.F
    c.may_close = False
    c.availability = ch.AVAILABLE
    c.availability_wanted = ch.AVAILABLE
    c._settings = settings
    c.settings_due = False
    return c


def load_settings(charger, now_ms):
    """The availability and remote limit the last commands set, and the latched faults. Each
    field on its own: a bad one is reported and takes its default, the others stand. The
    latched faults fail closed (docs/safety.md): no file (first boot) means none; a file that
    is unreadable or garbled, or a latched list that cannot be read, raises
    FAULT_LATCH_STATE_LOST until a technician clears it. The limit is clamped again by
    offer_ma (config, cable, board). True when the file was read whole."""
    store = charger._settings
    if store is None:
        return False
    saved = store.load()
    problem = store.error
    if saved is None:
        if problem is None:
            return False  # no file: first boot
        charger._emit(now_ms, "settings", problem + ": available, no remote limit")
        _latch(charger, now_ms, ch.FAULT_LATCH_STATE_LOST)
        return False
    wanted = saved.get("availability")
    limit = saved.get("limit_ma")
    bad = []
    if wanted not in ch.AVAILABILITIES:
        bad.append("availability")
        wanted = ch.AVAILABLE
    if not (limit is None or (type(limit) is int and 0 <= limit <= _MAX_REMOTE_LIMIT_MA)):
        bad.append("limit_ma")
        limit = None
    left_s = _limit_left_s(charger, limit, saved, bad)
    latched = _latched_bits(saved.get("latched", []))
    if latched & ch.FAULT_LATCH_STATE_LOST:
        bad.append("latched")
    charger.availability = charger.availability_wanted = wanted
    if left_s == 0:
        # Saved again as a limit that ran out (no UTC expiry): a later write (another
        # command, a latched fault) must not turn the fallback into no limit at the next boot.
        charger._limit_cmd = (limit, 1, None)
        charger._emit(now_ms, "settings", wanted)
        charger._fall_back(now_ms, "remote limit ran out or its expiry is not known after the reboot")
    else:
        charger.remote_limit_ma = limit
        charger.limit_source = None if limit is None else _LIMIT_REMOTE
        if left_s is not None:
            charger.limit_until_ms = time.ticks_add(now_ms, left_s * 1000)
            charger._limit_cmd = charger._saved_limit = (limit, saved["ttl"], saved["until"])
        charger._emit(now_ms, "settings", "%s, remote limit %s" % (
            wanted, "none" if limit is None else "%d mA" % limit))
        if left_s is not None:
            charger._emit(now_ms, "limit", "runs out in %d s (expiry saved in UTC)" % left_s)
    if bad:
        charger._emit(now_ms, "settings", "settings garbled (%s): default used" % ", ".join(bad))
    for bit, _name in ch.FAULT_NAMES:
        if latched & bit:  # a reboot does not end a lock-out or a weld: a technician does
            _latch(charger, now_ms, bit)
    return not bad


def _limit_left_s(charger, limit, saved, bad):
    """Seconds left of a saved limit with a time to live, by the rule of docs/commands.md
    ("Limits that expire"): kept only if the expiry was saved in UTC and the clock is set
    now and says it is still ahead, by no more than the time to live; 0: ran out (or not
    known: the time spent off cannot be measured, so it may have). None: a limit without
    one (none, or set by a call that gave no time to live)."""
    ttl = saved.get("ttl")
    if limit is None or (ttl is None and "until" not in saved):
        return None
    until = saved.get("until")
    if not (type(ttl) is int and 0 < ttl <= _MAX_LIMIT_TTL_S) or not (
            until is None or type(until) is int):
        bad.append("ttl")
        return 0
    now = charger._utc()
    if until is None or now is None or not 0 < until - now <= ttl:
        return 0
    return until - now


def _latched_bits(names):
    """The latched faults saved in settings.json. What cannot be read is FAULT_LATCH_STATE_LOST
    (fail closed): a list that is not one, or a name that is not a latched fault's."""
    if not isinstance(names, list):
        return ch.FAULT_LATCH_STATE_LOST
    bits = 0
    for name in names:
        bit = ch.fault_bit(name) if isinstance(name, str) else 0
        bits |= bit if bit & ch.LATCHED_FAULTS else ch.FAULT_LATCH_STATE_LOST
    return bits


def _latch(charger, now_ms, bit):
    charger.faults |= bit
    charger.settings_due = True  # written back at the first tick: a lost state stays latched
    charger._emit(now_ms, "fault", "raised " + ch.fault_name(bit) + (
        " (settings.json unreadable: a technician clears it)" if bit == ch.FAULT_LATCH_STATE_LOST
        else " (kept across the reboot)"))
