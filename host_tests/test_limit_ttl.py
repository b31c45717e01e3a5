"""Limits that expire (issue 13, docs/commands.md): set_current_limit with a time to live, the
fallback from config.json, what a reboot keeps (never longer than the limit had left), the
command's checks, and the offer changing only through the controller's 5 s rule."""
import hashlib
import hmac
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pilehost.virtual_board import VirtualBoard

import charger as ch
import charger_restore
import command_auth
import commands
import config
import pilot
import session_store

SYNCED = 1_790_000_000  # 2026-09: a clock NTP has set
UNSYNCED = 946_684_800 + 300  # 2000-01-01 + 5 min: the ESP32's clock after a power cut


class Wall:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def make(store=None, wall=None, fallback_ma=6000, ttl_s=900, **kw):
    log = []
    args = dict(max_current_ma=32000, board_max_ma=32000, free_vend=True, allow_ventilation=False)
    args.update(kw)
    c = charger_restore.build(report=lambda now, what, text: log.append((what, text)), settings=store,
                   fallback_ma=fallback_ma, wall=wall, limit_ttl_s=ttl_s, **args)
    c.cable_ma = 32000
    return c, log


# -- the charger: in force, runs out, falls back --------------------------------------------------

def test_a_limit_runs_out_into_the_fallback():
    c, log = make()
    c.set_remote_limit(20000, 1000, 60)
    assert (c.remote_limit_ma, c.limit_source, c.limit_expires_in_ms(1000)) == \
        (20000, ch._LIMIT_REMOTE, 60000)
    c.step(60999, pilot.A, True)
    assert c.remote_limit_ma == 20000 and c.limit_expires_in_ms(60999) == 1
    c.step(61000, pilot.A, True)
    assert (c.remote_limit_ma, c.limit_source) == (6000, ch._LIMIT_FALLBACK)
    assert c.limit_expires_in_ms(61000) is None
    assert ("limit", "remote limit ran out: fallback 6000 mA") in log


def test_zero_does_not_last_for_ever():
    c, _ = make()
    c.step(0, pilot.B, True)
    c.set_remote_limit(0, 0, 30)
    c.step(10, pilot.C, True)
    assert c.offer_ma == 0 and c.state == ch.SUSPENDED_EVSE
    c.step(30000, pilot.C, True)
    assert c.offer_ma == 6000 and c.state == ch.CHARGING


def test_a_new_command_replaces_the_limit_and_its_time():
    c, _ = make()
    c.set_remote_limit(10000, 0, 10)
    c.set_remote_limit(16000, 9000, 10)
    c.step(18999, pilot.A, True)
    assert c.remote_limit_ma == 16000
    c.set_remote_limit(None, 18999)
    c.step(100000, pilot.A, True)
    assert c.remote_limit_ma is None and c.limit_source is None  # removed: nothing to run out


def test_without_a_ttl_the_limit_stays_as_before():
    c, _ = make()
    c.set_remote_limit(10000)
    c.step(10 ** 8, pilot.A, True)
    assert c.remote_limit_ma == 10000 and c.limit_expires_in_ms(0) is None


def test_expiry_survives_the_ticks_wrap():
    c, _ = make()
    start = (1 << 30) - 5000  # 5 s before ticks_ms wraps
    c.set_remote_limit(20000, start, 10)
    c.step(time.ticks_add(start, 9999), pilot.A, True)
    assert c.limit_source == ch._LIMIT_REMOTE
    c.step(time.ticks_add(start, 10000), pilot.A, True)
    assert c.limit_source == ch._LIMIT_FALLBACK


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20000), st.one_of(st.none(), st.integers(0, 80000)),
                          st.one_of(st.none(), st.integers(1, 30))), max_size=12))
def test_a_remote_limit_is_never_in_force_past_its_time(events):
    """Any sequence of commands and ticks: a remote limit given a ttl is in force only until
    then; afterwards the fallback, never the stale value, and never zero."""
    c, _ = make()
    now = 0
    deadline = None
    for gap, amps, ttl in events:
        now += gap
        c.step(now, pilot.A, True)
        if deadline is not None and now >= deadline:
            assert c.limit_source == ch._LIMIT_FALLBACK and c.remote_limit_ma == 6000
        c.set_remote_limit(amps, now, ttl)
        deadline = None if amps is None or ttl is None else now + ttl * 1000
    c.step(now + 31000, pilot.A, True)
    if deadline is not None:
        assert c.limit_source == ch._LIMIT_FALLBACK and c.offer_ma == 6000


# -- across a reboot: never longer than it had left ------------------------------------------------

def reboot(path, wall, now_ms=0, **kw):
    c, log = make(session_store.SettingsStore(str(path)), wall, **kw)
    charger_restore.load_settings(c, now_ms)
    return c, log


def test_a_synced_clock_keeps_what_was_left(tmp_path):
    path = tmp_path / "settings.json"
    wall = Wall(SYNCED)
    c, _ = make(session_store.SettingsStore(str(path)), wall)
    assert c.set_remote_limit(20000, 0, 600) is None
    wall.t += 100  # a watchdog reset: the RTC kept the time
    booted, log = reboot(path, wall, now_ms=7)
    assert booted.remote_limit_ma == 20000 and booted.limit_source == ch._LIMIT_REMOTE
    assert booted.limit_expires_in_ms(7) == 500000
    assert ("settings", "available, remote limit 20000 mA") in log
    assert ("limit", "runs out in 500 s (expiry saved in UTC)") in log


@pytest.mark.parametrize("at_set, at_boot, why", [
    (SYNCED, SYNCED + 600, "ran out while off"),
    (SYNCED, SYNCED + 10 ** 6, "long gone"),
    (SYNCED, UNSYNCED, "power cut: the clock starts at 2000 again"),
    (UNSYNCED, UNSYNCED + 10, "never synced: the expiry was not saved in UTC"),
    (UNSYNCED, SYNCED, "synced since: still no saved expiry"),
    (SYNCED, SYNCED - 3600, "the clock went back: more left than the ttl"),
])
def test_an_expiry_the_pile_cannot_prove_is_the_fallback(tmp_path, at_set, at_boot, why):
    path = tmp_path / "settings.json"
    wall = Wall(at_set)
    c, _ = make(session_store.SettingsStore(str(path)), wall)
    c.set_remote_limit(0, 0, 600)
    wall.t = at_boot
    booted, log = reboot(path, wall)
    assert (booted.remote_limit_ma, booted.limit_source) == (6000, ch._LIMIT_FALLBACK), why
    assert booted.limit_expires_in_ms(0) is None and booted.faults == 0
    assert ("limit", "remote limit ran out or its expiry is not known after the reboot: "
                     "fallback 6000 mA") in log


def test_without_a_wall_clock_no_limit_with_a_ttl_outlives_a_reboot(tmp_path):
    path = tmp_path / "settings.json"
    c, _ = make(session_store.SettingsStore(str(path)))
    c.set_remote_limit(32000, 0, 86400)
    booted, _ = reboot(path, None)
    assert booted.limit_source == ch._LIMIT_FALLBACK


@settings(max_examples=200, deadline=None)
@given(ttl=st.integers(1, 86400), off_s=st.integers(-10 ** 6, 10 ** 6),
       boot_synced=st.booleans())
def test_a_reboot_never_extends_a_limit(tmp_path_factory, ttl, off_s, boot_synced):
    """Whatever the clock says at boot, the limit ends no later than ttl after it was set, by
    the clock it was set by (off_s: how far the wall clock moved while the pile was off)."""
    path = tmp_path_factory.mktemp("s") / "settings.json"
    wall = Wall(SYNCED)
    c, _ = make(session_store.SettingsStore(str(path)), wall)
    c.set_remote_limit(16000, 0, ttl)
    wall.t = SYNCED + off_s if boot_synced else UNSYNCED
    booted, _ = reboot(path, wall)
    left = booted.limit_expires_in_ms(0)
    if booted.limit_source == ch._LIMIT_REMOTE:
        assert 0 <= off_s < ttl and left == (ttl - off_s) * 1000
    else:
        assert left is None and booted.remote_limit_ma == 6000


def test_the_settings_file_stays_inline_with_a_ttl(tmp_path, monkeypatch):
    writes = []
    real = session_store.write_atomic
    monkeypatch.setattr(session_store, "write_atomic", lambda p, d: (writes.append(d), real(p, d)))
    c, _ = make(session_store.SettingsStore(str(tmp_path / "settings.json")), Wall(SYNCED))
    c.set_availability(0, ch.UNAVAILABLE_B1)
    c.set_remote_limit(80000, 0, 86400)
    assert all(len(w) <= 128 for w in writes), writes


@pytest.mark.parametrize("saved", [
    {"availability": "available", "limit_ma": 16000, "ttl": 0, "until": SYNCED + 10},
    {"availability": "available", "limit_ma": 16000, "ttl": "600", "until": SYNCED + 10},
    {"availability": "available", "limit_ma": 16000, "ttl": 600, "until": "soon"},
    {"availability": "available", "limit_ma": 16000, "until": SYNCED + 10},
    {"availability": "available", "limit_ma": 16000, "ttl": 86401, "until": SYNCED + 10},
])
def test_a_garbled_expiry_falls_back(tmp_path, saved):
    path = tmp_path / "settings.json"
    session_store.write_atomic(str(path), session_store._encode(saved))
    booted, log = reboot(path, Wall(SYNCED))
    assert booted.limit_source == ch._LIMIT_FALLBACK and booted.faults == 0
    assert any(what == "settings" and "garbled (ttl)" in text for what, text in log), log


# -- config.json -----------------------------------------------------------------------------------

def test_config_defaults():
    conf = config.parse_config({})
    assert conf.limit_ttl_s == 900 and conf.limit_fallback_a == 6


@pytest.mark.parametrize("data, key", [
    ({"limit_ttl_s": 9}, "limit_ttl_s"),
    ({"limit_ttl_s": 86401}, "limit_ttl_s"),
    ({"limit_ttl_s": 60.5}, "limit_ttl_s"),
    ({"limit_fallback_a": 0}, "limit_fallback_a"),  # zero for ever is what it must prevent
    ({"limit_fallback_a": 5.9}, "limit_fallback_a"),
    ({"limit_fallback_a": 81}, "limit_fallback_a"),
    ({"limit_fallback_a": None}, "limit_fallback_a"),
])
def test_config_checks(data, key):
    with pytest.raises(config.ConfigError) as e:
        config.parse_config(data)
    assert "'%s'" % key in str(e.value)


# -- the command -------------------------------------------------------------------------------------

SECRET = bytes(range(32))


def signed(args, counter):
    body = json.dumps({"v": 1, "id": "c-%d" % counter, "cmd": "set_current_limit",
                       "counter": counter, "args": args})
    sig = hmac.new(SECRET, body.encode(), hashlib.sha256).digest()
    return json.dumps({"body": body, "sig": "".join("%02x" % b for b in sig)}).encode()


@pytest.mark.parametrize("args, checked", [
    ({"amps": 16, "ttl_s": 60}, {"amps": 16, "ttl_s": 60}),
    ({"amps": 0, "ttl_s": 1}, {"amps": 0, "ttl_s": 1}),
    ({"amps": 80, "ttl_s": 86400}, {"amps": 80, "ttl_s": 86400}),
    ({"amps": 16}, {"amps": 16}),
    ({"amps": None}, {"amps": None}),
])
def test_ttl_s_accepted(args, checked):
    v = command_auth.CommandVerifier(SECRET)
    assert v.verify(signed(args, 1)).args == checked


@pytest.mark.parametrize("args", [
    {"amps": 16, "ttl_s": 0}, {"amps": 16, "ttl_s": 86401}, {"amps": 16, "ttl_s": 60.0},
    {"amps": 16, "ttl_s": True}, {"amps": 16, "ttl_s": None}, {"amps": 16, "ttl_s": "60"},
    {"amps": None, "ttl_s": 60}, {"ttl_s": 60}, {"amps": 16, "ttl_s": 60, "x": 1},
])
def test_ttl_s_refused(args):
    v = command_auth.CommandVerifier(SECRET)
    with pytest.raises(command_auth.CommandError) as e:
        v.verify(signed(args, 1))
    assert e.value.code == "bad_argument"
    assert v.last_counter == 0  # a refused command changes nothing


class _Ctl:
    def __init__(self, charger):
        self.charger = charger


def test_the_command_uses_its_ttl_or_the_configured_one():
    c, _ = make(ttl_s=120)
    cmds = commands.Commands(_Ctl(c))
    v = command_auth.CommandVerifier(SECRET)
    assert cmds.apply(1000, v.verify(signed({"amps": 16, "ttl_s": 30}, 1)))[0] == "accepted"
    assert c.limit_expires_in_ms(1000) == 30000
    cmds.apply(2000, v.verify(signed({"amps": 16}, 2)))
    assert c.limit_expires_in_ms(2000) == 120000


# -- on the wired firmware: the offer follows through the controller's rules only ------------------

CHARGE = [(100, "plug"), (600, "request")]


def test_expiry_lowers_the_offer_through_the_5_s_rule(monkeypatch):
    """A fallback below the limit lowers the duty like any remote change: never sooner than 5 s
    after the last change (IEC 61851-1), the contactor staying closed."""
    vb = VirtualBoard(monkeypatch, CHARGE, config={"limit_fallback_a": 10, "limit_ttl_s": 10})
    vb.run_until(3000)
    assert vb.world.coil
    charger = vb.ctl.charger
    charger.set_remote_limit(20000, vb.clock.ticks_ms(), 6)  # goes out 5 s after the first offer
    vb.run_until(8900)
    assert vb.ctl.output.duty == pilot.duty_for_current(20000, pilot.IEC)
    changed = vb.ctl._offer_changed_ms
    vb.run_while(lambda: charger.limit_source == ch._LIMIT_REMOTE, 8000)
    ran_out = vb.now_ms
    assert vb.ctl.output.duty == pilot.duty_for_current(20000, pilot.IEC)
    vb.run_while(lambda: vb.ctl.output.duty != pilot.duty_for_current(10000, pilot.IEC), 6000)
    assert vb.now_ms - ran_out < 5100 and vb.ctl._offer_changed_ms - changed >= 5000
    assert vb.world.coil and charger.state == ch.CHARGING


def test_pilecmd_signs_a_ttl():
    from pilehost import pilecmd

    args = pilecmd.parse_args("set_current_limit", ["amps=16", "ttl_s=120"])
    assert args == {"amps": 16, "ttl_s": 120}
    got = command_auth.CommandVerifier(SECRET).verify(
        pilecmd.sign(SECRET, pilecmd.make_body("set_current_limit", args, 3)))
    assert got.args == {"amps": 16, "ttl_s": 120}
    for bad in (["amps=16", "ttl_s=1.5"], ["amps=16", "ttl_s=-1"], ["ttl_s=60"]):
        with pytest.raises(ValueError):
            pilecmd.parse_args("set_current_limit", bad)


def test_a_fallback_stays_a_fallback_through_later_writes(tmp_path):
    """Booted on the fallback, then another command writes settings.json: the next boot must
    come up on the fallback again, never on no limit (the pile's maximum)."""
    path = tmp_path / "settings.json"
    wall = Wall(SYNCED)
    c, _ = make(session_store.SettingsStore(str(path)), wall)
    c.set_remote_limit(0, 0, 60)
    wall.t = UNSYNCED  # a power cut
    booted, _ = reboot(path, wall)
    assert booted.limit_source == ch._LIMIT_FALLBACK
    booted.set_availability(0, ch.UNAVAILABLE_B1)
    wall.t = SYNCED + 10
    again, _ = reboot(path, wall)
    assert (again.limit_source, again.remote_limit_ma) == (ch._LIMIT_FALLBACK, 6000)
    assert again.availability == ch.UNAVAILABLE_B1


def test_a_cable_read_bad_at_b_to_c_offers_nothing(monkeypatch):
    """Found by test_stateful_pile on this branch (a pre-existing path): the full PP read at
    B->C comes after the charger's step; a bad coding read just then (the periodic re-read saw
    it good) left the state `charging` with no offer, and the controller asked for the duty of
    0 A (None): a TypeError in the control tick. Now nothing is offered and nothing closes."""
    vb = VirtualBoard(monkeypatch, [(100, "plug"), (600, "request")])
    real = vb.ctl._read_cable

    def pp(now_ms, lower_only=False):
        if not lower_only:  # only the read at plug-in and at B->C sees a broken PP contact
            vb.world.car.cable_ohm = 40
        real(now_ms, lower_only)
        vb.world.car.cable_ohm = 220

    monkeypatch.setattr(vb.ctl, "_read_cable", pp)
    vb.run_until(3000)
    assert not vb.world.coil and vb.ctl.charger.offer_ma == 0
    assert vb.ctl.charger.state == ch.SUSPENDED_EVSE and not vb.ctl.output.pwm_on


# -- issue 13's leftover: refreshes are not written; nothing while the contactor is closed ----------

@settings(max_examples=100, deadline=None)
@given(refreshes=st.lists(st.tuples(st.integers(1, 120), st.sampled_from((16000, 10000)),
                                    st.sampled_from((60, 90)), st.booleans()), max_size=12))
def test_a_refresh_writes_only_a_new_value_and_a_reboot_never_extends_it(tmp_path_factory, fake_flash_gate,
                                                                          refreshes):
    """A load manager re-sending its limit (same amps and ttl, every few s, sometimes while the
    contactor is closed): settings.json is written only when amps or ttl change, never while
    closed; after a reboot the limit ends no later than the last command's time to live."""
    path = tmp_path_factory.mktemp("s") / "settings.json"
    wall = Wall(SYNCED)
    gate = fake_flash_gate()
    store = session_store.SettingsStore(str(path), gate)
    writes = []
    real = store._save

    def counted(settings):
        written = real(settings)
        if written:
            writes.append((dict(settings), gate.closed))
        return written

    store._save = counted
    c, _ = make(store, wall)
    last = None
    for dt, amps, ttl, closed in refreshes:
        wall.t += dt
        if gate.closed and not closed:
            assert all(problem is None for problem in gate.open())
        gate.closed = closed
        before = len(writes)
        c.set_remote_limit(amps, 0, ttl)
        changed = last is None or last[:2] != (amps, ttl)
        if not changed or closed:
            assert len(writes) == before  # a refresh, or the contactor closed: nothing now
        last = (amps, ttl, wall.t + ttl)
    gate.open()  # deferred: written at the open, never lost
    assert not any(closed for _, closed in writes)
    if last is not None:
        saved = session_store.SettingsStore(str(path)).load()
        assert (saved["limit_ma"], saved["ttl"]) == last[:2]
        assert saved["until"] <= last[2]  # never later than the last command allows
        booted, _ = reboot(path, wall)
        left = booted.limit_expires_in_ms(0)
        assert left is None or left <= last[1] * 1000
