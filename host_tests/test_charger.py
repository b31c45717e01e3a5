"""The charger state machine on its own: stable pilot states in, states and wishes out."""
import pytest

import charger as ch
import charger_restore
import pilot
import session_store


def make(free_vend=True, **kw):
    args = dict(max_current_ma=32000, board_max_ma=32000, free_vend=free_vend, allow_ventilation=False)
    args.update(kw)
    log = []
    c = charger_restore.build(report=lambda now, what, text: log.append((what, text)), **args)
    c.cable_ma = 32000
    return c, log


def test_free_vend_session():
    c, _ = make()
    assert c.step(0, pilot.A, True) == 0 and c.state == ch.IDLE and c.power == ch.POWER_OFF
    assert c.step(10, pilot.B, True) == ch.EV_CAR_PLUGGED_IN
    # Its first step: the RCD self-test and the record begin after it (no PWM yet).
    assert c.state == ch.SUSPENDED_EVSE and c.pilot_mode == pilot.MODE_PLUS
    assert c.step(15, pilot.B, True) == 0
    assert c.state == ch.SUSPENDED_EV and c.pilot_mode == ch.MODE_OFFER
    assert c.step(20, pilot.C, True) == ch.EV_CAR_REQUESTED_POWER
    assert c.state == ch.CHARGING and c.power == ch.POWER_ON
    assert c.step(30, pilot.B, True) == ch._EV_CAR_REQUESTED_STOP_POWER
    assert c.state == ch.SUSPENDED_EV and c.power == ch.POWER_HOLD
    assert c.step(40, pilot.A, True) == ch.EV_CAR_UNPLUGGED
    assert c.state == ch.IDLE and c.session is None


def test_waits_for_authorisation_without_free_vend():
    c, log = make(free_vend=False)
    c.step(0, pilot.B, True)
    c.step(10, pilot.C, True)
    assert c.state == ch.WAITING_FOR_AUTH and c.pilot_mode == pilot.MODE_PLUS
    assert c.power != ch.POWER_ON
    assert c.authorize(20, "remote", "card-1")
    assert not c.authorize(21, "remote", "card-2")  # already authorised
    c.step(30, pilot.C, True)
    assert c.state == ch.CHARGING and c.session.auth_id == "card-1"
    assert ("session", "authorised by remote") in log


def test_nothing_to_authorise_without_a_car():
    c, _ = make(free_vend=False)
    c.step(0, pilot.A, True)
    assert not c.authorize(1, "remote", "x")


def test_remote_stop_finishes_until_unplug():
    c, _ = make()
    c.step(0, pilot.B, True)
    c.step(10, pilot.C, True)
    assert c.remote_stop(20) and not c.remote_stop(21)
    c.step(30, pilot.C, True)
    assert c.state == ch.FINISHING and c.pilot_mode == pilot.MODE_PLUS and c.power == ch.POWER_HOLD
    assert c.session.stop_reason == "remote"
    c.step(40, pilot.A, True)
    assert c.state == ch.IDLE


def test_offer_is_the_smallest_limit_and_below_6_a_nothing():
    c, _ = make(max_current_ma=20000, board_max_ma=16000)
    c.cable_ma = 32000
    assert c.offer_ma == 16000
    c.cable_ma = 13000
    assert c.offer_ma == 13000
    c.set_remote_limit(10000)
    assert c.offer_ma == 10000
    c.set_remote_limit(5000)
    assert c.offer_ma == 0
    c.step(0, pilot.B, True)
    c.step(10, pilot.C, True)
    assert c.state == ch.SUSPENDED_EVSE and c.pilot_mode == pilot.MODE_PLUS


def test_no_close_before_rcd_ready():
    c, _ = make()
    c.step(0, pilot.B, False)
    c.step(10, pilot.C, False)
    # No PWM while the pile may not close (B1/C1, "EVSE not ready"): a car offered PWM goes to C
    # and must see the contactor close within 3 s (test_review_not_ready.py).
    assert c.state == ch.SUSPENDED_EVSE and c.pilot_mode == pilot.MODE_PLUS and c.power == ch.POWER_OFF


def test_ventilation_only_when_allowed():
    c, _ = make()
    c.step(0, pilot.B, True)
    c.step(10, pilot.D, True)
    assert c.state == ch.SUSPENDED_EVSE and c.power != ch.POWER_ON
    c, _ = make(allow_ventilation=True)
    c.step(0, pilot.B, True)
    c.step(10, pilot.D, True)
    assert c.state == ch.CHARGING


def test_fault_classes():
    c, log = make()
    c.step(0, pilot.B, True)
    c.step(10, pilot.C, True)
    # condition fault: comes and goes, the session goes on
    c.set_condition(20, ch.FAULT_PILOT_SHORT, True)
    c.step(20, pilot.E, True)
    assert c.state == ch.FAULT and c.power == ch.POWER_OFF and c.pilot_mode == pilot.MODE_PLUS
    c.set_condition(30, ch.FAULT_PILOT_SHORT, False)
    c.step(130, pilot.C, True)
    assert c.state == ch.CHARGING and c.session.stop_reason is None
    # unplug-cleared: ends the session, clears when the car leaves
    c.raise_fault(140, ch.FAULT_DIODE)
    c.step(150, pilot.C, True)
    assert c.state == ch.FAULT and c.session.stop_reason == "diode"
    c.step(160, pilot.A, True)
    assert c.faults == 0 and c.state == ch.IDLE
    # latched: pilot F, survives unplug, needs the technician
    c.step(170, pilot.B, True)
    c.raise_fault(180, ch.FAULT_WELDED)
    c.step(190, pilot.A, True)
    assert c.state == ch.FAULT and c.pilot_mode == pilot.MODE_F
    assert ch.fault_list(c.faults) == ["welded"]
    assert c.clear_latched(200, ch.FAULT_WELDED)
    c.step(210, pilot.A, True)
    assert c.state == ch.IDLE
    assert ("fault", "raised welded") in log and ("fault", "cleared welded") in log


def test_condition_faults_cannot_be_cleared_by_a_technician():
    c, _ = make()
    c.set_condition(0, ch.FAULT_RCD_TRIP, True)
    assert not c.clear_latched(1, ch.FAULT_RCD_TRIP)
    assert c.faults == ch.FAULT_RCD_TRIP


def test_fault_names_round_trip():
    for bit, name in ch.FAULT_NAMES:
        assert ch.fault_bit(name) == bit and ch.fault_name(bit) == name
    assert ch.fault_bit("nonsense") == 0


# -- availability (docs/commands.md set_availability; OCPP 1.6 ChangeAvailability) ---------------

def charging_session(**kw):
    c, log = make(**kw)
    c.step(0, pilot.B, True)
    c.step(10, pilot.C, True)
    assert c.state == ch.CHARGING
    return c, log


def test_unavailable_f_without_a_car_is_immediate_and_starts_nothing():
    c, log = make()
    c.step(0, pilot.A, True)
    assert c.set_availability(5, ch.UNAVAILABLE_F) is None
    assert c.step(10, pilot.F, True) == 0
    assert c.state == ch.UNAVAILABLE and c.pilot_mode == pilot.MODE_F and c.power == ch.POWER_OFF
    # Whatever the pilot shows, no session starts and nothing can be authorised.
    assert c.step(20, pilot.B, True) == 0  # no CarPluggedIn: no session begins
    c.step(30, pilot.C, True)
    assert c.session is None and not c.authorize(40, "remote", "card-1")
    assert c.state == ch.UNAVAILABLE and c.power == ch.POWER_OFF
    assert ("availability", "unavailable_f") in log


def test_unavailable_b1_shows_plus_12_v_and_a_car_gets_its_session_when_available():
    c, _ = make()
    c.step(0, pilot.A, True)
    assert c.set_availability(5, ch.UNAVAILABLE_B1) is None
    assert c.step(10, pilot.B, True) == 0  # plugged in: seen, but no session
    assert c.step(20, pilot.C, True) == ch.EV_CAR_REQUESTED_POWER
    assert c.state == ch.UNAVAILABLE and c.pilot_mode == pilot.MODE_PLUS and c.power == ch.POWER_OFF
    assert c.plugged and c.session is None
    assert c.set_availability(30, ch.AVAILABLE) is None
    # As after a boot with a car present: a new session, free vend authorises it.
    assert c.step(40, pilot.C, True) == ch.EV_CAR_PLUGGED_IN
    # Its first step offers nothing: the new session's RCD self-test begins after it.
    assert c.session.authorized and c.state == ch.SUSPENDED_EVSE and c.power != ch.POWER_ON
    assert c.pilot_mode == pilot.MODE_PLUS
    assert c.step(50, pilot.C, True) == 0
    assert c.session.authorized and c.state == ch.CHARGING and c.power == ch.POWER_ON


def test_a_car_that_came_and_went_while_unavailable_b1_leaves_the_pile_idle():
    c, _ = make()
    c.set_availability(0, ch.UNAVAILABLE_B1)
    c.step(10, pilot.B, True)
    assert c.plugged and c.session is None
    assert c.step(20, pilot.A, True) == ch.EV_CAR_UNPLUGGED and not c.plugged
    c.set_availability(30, ch.AVAILABLE)
    assert c.step(40, pilot.A, True) == 0 and c.state == ch.IDLE and c.session is None


def test_a_running_session_delays_the_change_until_its_record_closes():
    c, log = charging_session()
    s = c.session
    assert c.set_availability(20, ch.UNAVAILABLE_F) == ch.SCHEDULED
    c.step(30, pilot.C, True)
    assert c.state == ch.CHARGING and c.power == ch.POWER_ON and c.pilot_mode == ch.MODE_OFFER
    assert c.availability == ch.AVAILABLE and c.availability_wanted == ch.UNAVAILABLE_F
    assert c.remote_stop(40)
    c.step(50, pilot.B, True)
    assert c.state == ch.FINISHING  # stopped, but the contactor may still be opening
    s.ended_ms = 60  # the controller closed the record: contactor open, final reading taken
    c.step(70, pilot.B, True)
    assert c.state == ch.UNAVAILABLE and c.session is None and c.pilot_mode == pilot.MODE_F
    assert s.stop_reason == "remote"
    assert ("availability", "unavailable_f " + ch.SCHEDULED) in log


def test_unplug_ends_the_session_and_a_scheduled_change_takes_effect():
    c, _ = charging_session()
    assert c.set_availability(20, ch.UNAVAILABLE_B1) == ch.SCHEDULED
    c.step(30, pilot.A, True)
    assert c.state == ch.UNAVAILABLE and c.session is None and c.pilot_mode == pilot.MODE_PLUS


def test_available_cancels_a_scheduled_change():
    c, log = charging_session()
    c.set_availability(20, ch.UNAVAILABLE_F)
    assert c.set_availability(30, ch.AVAILABLE) is None
    c.remote_stop(40)
    c.session.ended_ms = 50
    c.step(60, pilot.B, True)
    assert c.state == ch.FINISHING and c.availability == ch.AVAILABLE
    assert ("availability", "scheduled change cancelled") in log


def test_a_car_waiting_for_authorisation_has_no_transaction_the_change_is_immediate():
    c, _ = make(free_vend=False)
    c.step(0, pilot.B, True)
    waiting = c.session
    assert c.state == ch.WAITING_FOR_AUTH
    assert c.set_availability(10, ch.UNAVAILABLE_B1) is None
    c.step(20, pilot.B, True)
    assert c.state == ch.UNAVAILABLE and c.session is None and waiting.stop_reason == "remote"
    assert not waiting.authorized  # never authorised: no session record goes out
    assert not c.authorize(30, "remote", "card-1")


def test_latched_faults_win_over_unavailability():
    c, _ = make()
    c.step(0, pilot.A, True)
    c.set_availability(5, ch.UNAVAILABLE_B1)
    c.raise_fault(10, ch.FAULT_WELDED)
    c.step(20, pilot.A, True)
    assert c.state == ch.FAULT and c.pilot_mode == pilot.MODE_F and c.power == ch.POWER_OFF
    assert c.set_availability(30, ch.AVAILABLE) is None  # taken, but the fault stays
    c.step(40, pilot.A, True)
    assert c.state == ch.FAULT and c.pilot_mode == pilot.MODE_F
    c.set_availability(45, ch.UNAVAILABLE_B1)
    assert c.clear_latched(50, ch.FAULT_WELDED)
    c.step(60, pilot.A, True)
    assert c.state == ch.UNAVAILABLE and c.pilot_mode == pilot.MODE_PLUS


def test_a_condition_fault_while_unavailable_f_keeps_the_pilot_at_f():
    c, _ = make()
    c.set_availability(0, ch.UNAVAILABLE_F)
    c.set_condition(10, ch.FAULT_RCD_TRIP, True)
    c.step(10, pilot.F, True)
    assert c.state == ch.FAULT and c.pilot_mode == pilot.MODE_F
    c.set_condition(20, ch.FAULT_RCD_TRIP, False)
    c.step(20, pilot.F, True)
    assert c.state == ch.UNAVAILABLE


def test_a_fault_only_an_unplug_clears_holds_the_next_session_back():
    c, _ = make()
    c.step(0, pilot.B, True)
    c.raise_fault(10, ch.FAULT_DIODE)
    c.session.ended_ms = 20
    c.set_availability(30, ch.UNAVAILABLE_F)
    c.step(40, pilot.F, True)
    assert c.state == ch.FAULT and c.session is None
    c.set_availability(50, ch.AVAILABLE)
    assert c.step(60, pilot.B, True) == 0 and c.session is None and c.state == ch.FAULT
    assert c.step(70, pilot.A, True) == ch.EV_CAR_UNPLUGGED and c.state == ch.IDLE
    assert c.step(80, pilot.B, True) == ch.EV_CAR_PLUGGED_IN and c.session is not None


def test_unknown_availability_is_a_programming_error():
    c, _ = make()
    with pytest.raises(ValueError):
        c.set_availability(0, "unavailable")
    assert c.availability_wanted == ch.AVAILABLE


# -- remote settings on flash -----------------------------------------------------------------

def with_store(path, **kw):
    c, log = make(settings=session_store.SettingsStore(str(path)), **kw)
    return c, log


def test_settings_survive_a_reboot_and_the_limit_is_clamped_again(tmp_path):
    path = tmp_path / "settings.json"
    c, _ = with_store(path)
    assert c.set_remote_limit(40000) is None
    assert c.set_availability(0, ch.UNAVAILABLE_B1) is None
    booted, log = with_store(path, max_current_ma=16000)
    assert charger_restore.load_settings(booted, 0)
    assert booted.availability == booted.availability_wanted == ch.UNAVAILABLE_B1
    assert booted.remote_limit_ma == 40000 and booted.offer_ma == 16000  # config 16 A wins
    assert ("settings", "unavailable_b1, remote limit 40000 mA") in log
    booted.step(0, pilot.A, True)
    assert booted.state == ch.UNAVAILABLE and booted.pilot_mode == pilot.MODE_PLUS


def test_a_scheduled_change_is_what_is_saved(tmp_path):
    path = tmp_path / "settings.json"
    c, _ = charging_session(settings=session_store.SettingsStore(str(path)))
    assert c.set_availability(20, ch.UNAVAILABLE_F) == ch.SCHEDULED
    booted, _ = with_store(path)  # the power goes before the session ends
    charger_restore.load_settings(booted, 0)
    assert booted.availability == ch.UNAVAILABLE_F and booted.remote_limit_ma is None


def test_settings_are_written_only_when_a_command_changes_them(tmp_path, monkeypatch):
    writes = []
    real = session_store.write_atomic
    monkeypatch.setattr(session_store, "write_atomic", lambda p, d: (writes.append(d), real(p, d)))
    c, _ = with_store(tmp_path / "settings.json")
    c.set_remote_limit(16000)
    c.set_remote_limit(16000)
    c.set_availability(0, ch.AVAILABLE)  # already so: nothing changes
    assert len(writes) == 1
    c.set_availability(1, ch.UNAVAILABLE_F)
    c.set_availability(2, ch.UNAVAILABLE_F)
    c.set_remote_limit(None)
    assert len(writes) == 3 and all(len(w) <= 128 for w in writes)  # inline in LittleFS


# Issue 10 item 6 changed these: what cannot be read of the latched faults is latched
# (latch_state_lost, fail closed), and each field is parsed on its own.
@pytest.mark.parametrize("content", [
    b"", b"garbage", b"00000000\n{}", b"\xff" * 40,
    b"%08x\n" % 0 + b'{"availability":"unavailable_f","limit_ma":16000}',  # bad checksum
])
def test_a_garbled_settings_file_is_reported_and_latched(tmp_path, content):
    path = tmp_path / "settings.json"
    path.write_bytes(content)
    c, log = with_store(path)
    assert not charger_restore.load_settings(c, 0)
    assert c.availability == ch.AVAILABLE and c.remote_limit_ma is None
    assert c.faults == ch.FAULT_LATCH_STATE_LOST and c.pilot_mode == pilot.MODE_F
    assert [what for what, _ in log] == ["settings", "fault"]
    assert log[0][1].endswith("ignored: available, no remote limit"), log


@pytest.mark.parametrize("settings, availability, limit", [
    ({"availability": "out", "limit_ma": None}, ch.AVAILABLE, None),
    ({"availability": "unavailable_f", "limit_ma": -1}, ch.UNAVAILABLE_F, None),
    ({"availability": "unavailable_f", "limit_ma": 80001}, ch.UNAVAILABLE_F, None),
    ({"availability": "available", "limit_ma": 6.5}, ch.AVAILABLE, None),
    ({"availability": "available", "limit_ma": True}, ch.AVAILABLE, None),
    ({"limit_ma": 16000}, ch.AVAILABLE, 16000),
])
def test_settings_with_values_out_of_range_take_their_default_alone(tmp_path, settings, availability,
                                                                   limit):
    path = tmp_path / "settings.json"
    session_store.write_atomic(str(path), session_store._encode(settings))
    c, log = with_store(path)
    assert not charger_restore.load_settings(c, 0)
    assert c.availability == availability and c.remote_limit_ma == limit and c.faults == 0
    assert any(what == "settings" and "garbled" in text for what, text in log), log


def test_settings_not_an_object_are_latched(tmp_path):
    path = tmp_path / "settings.json"
    session_store.write_atomic(str(path), session_store._encode([1, 2]))
    c, log = with_store(path)
    assert not charger_restore.load_settings(c, 0)
    assert c.availability == ch.AVAILABLE and c.faults == ch.FAULT_LATCH_STATE_LOST


def test_an_unreadable_settings_file_is_reported_and_latched(tmp_path):
    path = tmp_path / "settings.json"
    path.mkdir()  # opening it fails with an error other than "no such file"
    c, log = with_store(path)
    assert not charger_restore.load_settings(c, 0) and c.availability == ch.AVAILABLE
    assert c.faults == ch.FAULT_LATCH_STATE_LOST
    assert [what for what, _ in log] == ["settings", "fault"]


def test_no_settings_file_means_the_defaults_silently(tmp_path):
    c, log = with_store(tmp_path / "settings.json")
    assert not charger_restore.load_settings(c, 0) and c.availability == ch.AVAILABLE and not log


def test_a_flash_that_fails_leaves_the_setting_in_effect_and_says_so(tmp_path):
    c, _ = with_store(tmp_path / "missing-dir" / "settings.json")
    note = c.set_remote_limit(10000)
    assert note.startswith("not saved to flash") and c.offer_ma == 10000
    c.step(0, pilot.A, True)
    note = c.set_availability(10, ch.UNAVAILABLE_F)
    assert note.startswith("not saved to flash") and c.availability == ch.UNAVAILABLE_F


# -- latched faults on flash: a reboot (power cut, watchdog, `reboot` command) does not clear them

def test_a_latched_fault_is_saved_after_the_tick_and_raised_again_at_boot(tmp_path):
    path = tmp_path / "settings.json"
    c, _ = charging_session(settings=session_store.SettingsStore(str(path)))
    c.raise_fault(30, ch.FAULT_RCD_LOCKOUT)
    assert not path.exists()  # no flash write between the fault and the contactor opening
    assert c.settings_due and c.save_settings() is None and not c.settings_due
    booted, log = with_store(path)
    assert charger_restore.load_settings(booted, 0)
    assert booted.faults == ch.FAULT_RCD_LOCKOUT
    assert ("fault", "raised rcd_lockout (kept across the reboot)") in log
    booted.step(0, pilot.C, True)  # the car is still there and asks for power
    assert booted.state == ch.FAULT and booted.power == ch.POWER_OFF
    assert booted.pilot_mode == pilot.MODE_F
    assert booted.clear_latched(10, ch.FAULT_RCD_LOCKOUT) and booted.save_settings() is None
    again, _ = with_store(path)
    charger_restore.load_settings(again, 0)
    assert again.faults == 0


@pytest.mark.parametrize("latched, faults", [
    ("welded", ch.FAULT_LATCH_STATE_LOST), (["diode"], ch.FAULT_LATCH_STATE_LOST),
    (["welded", "nonsense"], ch.FAULT_WELDED | ch.FAULT_LATCH_STATE_LOST),
    ([3], ch.FAULT_LATCH_STATE_LOST)])
def test_a_garbled_latched_list_is_latched(tmp_path, latched, faults):
    """Issue 10 item 6 (was: the whole file ignored, no latched faults)."""
    path = tmp_path / "settings.json"
    session_store.write_atomic(str(path), session_store._encode(
        {"availability": "unavailable_b1", "limit_ma": None, "latched": latched}))
    c, log = with_store(path)
    assert not charger_restore.load_settings(c, 0) and c.faults == faults
    assert c.availability == ch.UNAVAILABLE_B1  # the other fields stand
    assert any(what == "settings" and "latched" in text for what, text in log), log
