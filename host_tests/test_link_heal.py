"""The link's self-healing decisions (firmware/link_heal.py) on CPython with a virtual clock: the
escalation ladder reconnect -> Wi-Fi restart -> board reset, the reset never with a session open
and never more often than the rate, across resets (the count on flash); a client id conflict told
from a broken link; the health figures. The same on the unix port against real mosquitto:
test_link_heal_unix.py."""
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import config
import link_heal
import link_reset
import telemetry
import wiring_link
from pilehost import ROOT

S = 1000
CONF = dict(wifi_restart_after_s=60, reset_after_s=300, reset_min_interval_s=600, conflict_pause_s=120)


def conf(**over):
    return config.Section(dict(CONF, **over))


def ladder(tmp_path, now_ms=0, **over):
    return link_heal.Ladder(conf(**over), link_heal.HealStore(str(tmp_path / "heal.json")), now_ms)


def test_steps_come_in_order_and_each_is_counted(tmp_path):
    lad = ladder(tmp_path)
    lad.down(1 * S, "cannot connect (refused)")
    assert lad.last_step == "reconnect" and lad.reconnects == 1
    assert lad.due(59 * S, 59 * S, wifi_up=True, session_open=False) is None
    assert lad.due(60 * S, 60 * S, wifi_up=True, session_open=False) == "wifi_restart"
    lad.wifi_restarted(60 * S, "no broker")
    assert lad.due(61 * S, 61 * S, True, False) is None  # one restart per wifi_restart_after_s
    assert lad.due(120 * S, 120 * S, True, False) == "wifi_restart"
    assert lad.due(120 * S, 120 * S, False, False) is None  # no address: the station is at it
    # 300 s down, but this boot has run only 300 s: the rate (600 s of uptime) holds it back.
    assert lad.due(300 * S, 300 * S, True, False) == "wifi_restart"
    assert lad.due(600 * S, 600 * S, True, False) == "reset"
    link_reset.resetting(lad, "no broker for 600 s")
    assert lad.last_step == link_heal.STEP_RESET == "reset" and lad.resets == 1  # link_reset's too
    saved = json.loads((tmp_path / "heal.json").read_text())
    assert saved == {"resets": 1, "streak": 1, "reason": "no broker for 600 s"}


def test_no_reset_while_a_session_is_open(tmp_path):
    lad = ladder(tmp_path)
    for t in range(0, 48 * 3600, 7):
        assert lad.due(t * S, t * S, True, session_open=True) != "reset"
    assert lad.due(48 * 3600 * S, 48 * 3600 * S, True, session_open=False) == "reset"


def test_no_reset_without_a_store_or_while_a_conflict_holds(tmp_path):
    lad = link_heal.Ladder(conf(), None, 0)
    assert lad.due(10 ** 8, 10 ** 8, None, False) is None
    lad = ladder(tmp_path)
    for i in range(3):
        lad.up(i * 2 * S)
        pause = lad.down(i * 2 * S + 500, "connection lost (closed by the broker)")
    assert lad.conflict and pause == 120 * S and lad.last_reason == "client_id_conflict"
    assert lad.due(10 ** 8, 10 ** 8, True, False) is None  # the network works: no step


def test_kicks_must_come_in_a_row_and_a_lasting_connection_ends_the_conflict(tmp_path):
    lad = ladder(tmp_path)
    t = 0
    for why in ("closed by the broker", "closed by the broker", "broker silent for 1.5 x keep-alive",
                "closed by the broker", "closed by the broker"):
        lad.up(t)
        assert lad.down(t + 3 * S, "connection lost (%s)" % why) is None
        t += 5 * S
    assert not lad.conflict and lad.kicks == 2
    lad.up(t)
    assert lad.down(t + 20 * S, "connection lost (closed by the broker)") is None  # it lasted
    for _ in range(3):
        lad.up(t)
        pause = lad.down(t + S, "connection lost (closed by the broker)")
        t += 2 * S
    assert lad.conflict and pause == 120 * S
    assert lad.down(t, "cannot connect (refused)") == 120 * S  # failed attempts wait as long
    lad.up(t)
    lad.settle(t + 9 * S)
    assert lad.conflict
    lad.settle(t + 10 * S)
    assert not lad.conflict and lad.kicks == 0


def test_store_survives_a_reset_and_a_bad_file_keeps_the_rate_slow(tmp_path):
    lad = ladder(tmp_path)
    link_reset.resetting(lad, "why")
    again = ladder(tmp_path)
    assert again.resets == 1 and again.last_step == "reset" and again.last_reason == "why"
    # The streak doubles the uptime the next reset needs.
    assert not again.may_reset(1199 * S) and again.may_reset(1200 * S)
    again.up(5 * S)
    again.flash_due(contactor_closed=True)
    assert json.loads((tmp_path / "heal.json").read_text())["streak"] == 1  # no write while closed
    again.flash_due(contactor_closed=False)
    assert json.loads((tmp_path / "heal.json").read_text())["streak"] == 0
    (tmp_path / "heal.json").write_text("{not json")
    bad = ladder(tmp_path)
    assert not bad.may_reset(1199 * S) and bad.may_reset(1200 * S)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.booleans(), st.sampled_from(["down", "up", "none"])),
                min_size=1, max_size=300))
def test_resets_never_with_a_session_and_never_faster_than_the_rate(tmp_path_factory, steps):
    """A pile whose link comes and goes at random, sessions open at random, across the resets
    the ladder makes: every reset with no session open, each after at least the rate's uptime
    (doubled per reset in a row without a connection), so never two within reset_min_interval_s."""
    path = tmp_path_factory.mktemp("heal")
    rate = CONF["reset_min_interval_s"] * S
    t = boot_at = 0
    lad = ladder(path)
    up = False
    resets = []  # (time, streak before)
    for dt, session_open, event in steps:
        t += dt * S
        if event == "up" and not up:
            lad.up(t)
            up = True
            lad.flash_due(contactor_closed=session_open)
        elif event == "down" and up:
            lad.down(t, "connection lost")
            up = False
        if up:
            continue
        step = lad.due(t, t - boot_at, True, session_open)
        if step == "wifi_restart":
            lad.wifi_restarted(t, "x")
        elif step == "reset":
            assert not session_open
            streak = lad._store.streak
            assert t - boot_at >= rate << min(streak, 5)
            resets.append(t)
            link_reset.resetting(lad, "x")
            boot_at = t
            lad = ladder(path, now_ms=t)
    for a, b in zip(resets, resets[1:], strict=False):
        assert b - a >= rate


class FakeOutbox:
    def __init__(self):
        self.next_seq = 1
        self.acked = 0


def test_outbox_age_follows_the_oldest_unacknowledged_record():
    ob = FakeOutbox()
    ob.next_seq, ob.acked = 4, 1  # two left from before this boot
    age = link_heal.OutboxAge(ob, 1000)
    assert age.figures(6000) == (2, 5)
    ob.acked = 3
    assert age.figures(7000) == (0, None)
    ob.next_seq = 5  # written at 8 s
    age.note(8000)
    assert age.figures(18000) == (1, 10)
    for i in range(20):  # more marks than kept: ages only grow
        ob.next_seq += 1
        age.note(20000 + i * 1000)
    ob.acked = 10
    depth, oldest = age.figures(60000)
    assert depth == ob.next_seq - 1 - 10 and oldest >= 60 - 20 - 6


def test_loop_figures_since_the_last_take():
    lf = link_heal.LoopFigures(1000)
    assert [lf.note(t) for t in (1005, 1010, 1041, 1048)] == [5, 5, 31, 7]  # the link's uptime
    assert lf.take() == (31, 12, 4)
    assert lf.take() == (0, 0, 0)
    first = link_heal.LoopFigures()  # no boot time: the first poll counts nothing
    assert first.note(7) == 0 and first.note(12) == 5 and first.take() == (5, 5, 1)


def test_health_message_matches_its_schema(monkeypatch):
    with open(os.path.join(ROOT, "docs", "schemas", "health.v1.schema.json")) as f:
        v = Draft202012Validator(json.load(f))
    monkeypatch.setattr(wiring_link.machine, "reset_cause", lambda: 3)  # the watchdog's
    fig = {"reset_cause": wiring_link.reset_cause(), "board": "ref-esp32", "heap_free": 1234,
           "heap_largest_free": None, "outbox_records": 0, "outbox_oldest_s": None, "wifi_rssi": None,
           "link": {"connects": 0, "reconnects": 0, "wifi_restarts": 0, "resets": 0, "last_step": None,
                    "last_reason": None, "client_id_conflict": False},
           "meter_errors": {"timeout": 2}, "loop_ms": {"max": 7, "avg": 5}}
    msg = json.loads(telemetry.health(1.7e9, 3, 12, "0.1.0", fig))
    assert [e.message for e in v.iter_errors(msg)] == []
    assert msg["reset_cause"] == "wdt"
    # Every name wiring_link gives is the schema's, and a port without reset_cause says "unknown".
    names = set(v.schema["properties"]["reset_cause"]["enum"])
    for code in (1, 2, 3, 4, 5, 99):
        monkeypatch.setattr(wiring_link.machine, "reset_cause", lambda code=code: code)
        assert wiring_link.reset_cause() in names
    monkeypatch.delattr(wiring_link.machine, "reset_cause")
    assert wiring_link.reset_cause() == "unknown"


@pytest.mark.parametrize("over, text", [
    ({"reset_after_s": 300, "wifi_restart_after_s": 300}, "must be longer than 'wifi_restart_after_s'"),
    ({"reset_after_s": 5}, "'reset_after_s' = 5 is outside"),
    ({"health_interval_s": 9}, "'health_interval_s' = 9 is outside"),
    ({"conflict_pause_s": "60"}, "'conflict_pause_s' must be a whole number"),
])
def test_config_checks_the_ladder(over, text):
    with pytest.raises(config.ConfigError, match=text):
        config.parse_config({"mqtt": dict({"host": "127.0.0.1"}, **over)})


def test_config_defaults():
    m = config.parse_config({"mqtt": {"host": "127.0.0.1"}}).mqtt
    assert (m.health_interval_s, m.wifi_restart_after_s, m.reset_after_s, m.reset_min_interval_s,
            m.conflict_pause_s) == (300, 300, 1800, 3600, 300)


class Record:
    def __init__(self, **values):
        self.__dict__.update(values)


class FakeStation:
    connected = True

    def __init__(self):
        self.restarts = []

    def restart(self, now_ms, why):
        self.restarts.append(now_ms)

    def rssi(self):
        return -70


def test_a_link_held_for_the_contactor_is_not_broken_and_escalates_only_once_it_may_connect(tmp_path):
    """TLS waits for the contactor to open (docs/telemetry.md): hours of a session without a
    connection are no outage; once the contactor opens and the broker still does not answer,
    the ladder climbs, and the reset (with a session gone) comes only at the rate."""
    import mqtt_link
    from pilehost import link_rig
    from pilehost.procs import free_port

    ctl, contactor = link_rig.charging_ctl(safe_off=lambda: setattr(contactor, "closed", False))
    log = Record(pile_id="pile-9", boot=2, outbox=Record(next_seq=1, acked=0, pending=lambda: iter(())))
    conf = config.parse_config({"mqtt": dict({"host": "127.0.0.1", "port": free_port()}, **CONF)}).mqtt
    resets = []
    lines = []
    link = mqtt_link.MqttLink(conf, ctl, log, lambda now, what, text: lines.append(text), boot_ms=0,
                              tls=object(), reset=lambda: resets.append(1),
                              heal_store=link_heal.HealStore(str(tmp_path / "heal.json")))
    station = link.station = FakeStation()
    now = 0
    for now in range(0, 7200 * S, 100):
        link.poll(now)
    assert not station.restarts and not resets
    assert "TLS connection waits for the contactor to open" in lines
    contactor.closed = False
    opened = now
    for now in range(opened, opened + 700 * S, 100):
        link.poll(now)
    assert station.restarts and station.restarts[0] - opened >= 60 * S
    assert resets and link._heal.resets == len(resets)  # a bench reset callable returns: again later
    steps = [t.split(":")[0] for t in lines if t.startswith(("restarting the Wi-Fi", "resetting the board"))]
    assert steps[0] == "restarting the Wi-Fi" and "resetting the board" in steps
