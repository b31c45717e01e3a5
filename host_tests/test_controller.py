"""The wired firmware (wiring.build) on the simulated hardware, under a virtual clock."""
import os
import tempfile

import pytest
from pilehost.virtual_board import CHARGE, VirtualBoard, charging

import charger as ch
import pilot




def test_session_charges_and_delivers_energy(monkeypatch):
    vb = charging(monkeypatch, [(4600, "stop_request")])
    vb.run_until(5000)
    assert not vb.world.coil
    # 32 A cable and pile, car reads 31.99 A: 230 V * 32 A * ~4 s
    assert 7.5 < vb.world.energy_wh < 8.5


@pytest.mark.parametrize("standard, limit_ms", [("iec", 6000), ("gbt", 3000)])
def test_c2_to_c1_forces_open_when_the_car_ignores_it(monkeypatch, standard, limit_ms):
    vb = charging(monkeypatch, [(0, "stubborn_car")], config={"standard": standard})
    vb.ctl.charger.remote_stop(vb.clock.ticks_ms())
    vb.tick()
    assert not vb.ctl.output.pwm_on
    removed = vb.now_ms
    opened = vb.run_while(lambda: vb.world.coil, limit_ms + 100)
    assert limit_ms <= opened - removed <= limit_ms + 20
    assert vb.ctl.charger.state == ch.FINISHING


def test_c2_to_c1_opens_as_soon_as_the_car_drops_to_b(monkeypatch):
    vb = charging(monkeypatch)  # the simulated car opens S2 500 ms after the PWM goes
    vb.ctl.charger.remote_stop(vb.clock.ticks_ms())
    vb.tick()
    removed = vb.now_ms
    opened = vb.run_while(lambda: vb.world.coil, 2000)
    assert 500 <= opened - removed < 600


def test_offer_changes_at_most_every_5_s(monkeypatch):
    vb = charging(monkeypatch)
    vb.ctl.charger.set_remote_limit(16000)
    vb.run_until(5000)  # the first offer went out at ~200 ms
    assert vb.ctl.output.duty == pilot.duty_for_current(32000, pilot.IEC)
    vb.run_until(5300)
    first = vb.ctl.output.duty
    assert first == pilot.duty_for_current(16000, pilot.IEC)
    changed = vb.now_ms
    vb.ctl.charger.set_remote_limit(10000)
    vb.run_until(changed + 4900)
    assert vb.ctl.output.duty == first
    vb.run_until(changed + 5100)
    assert vb.ctl.output.duty == pilot.duty_for_current(10000, pilot.IEC)


def test_limit_below_6_a_removes_the_pwm_at_once(monkeypatch):
    vb = charging(monkeypatch)
    vb.ctl.charger.set_remote_limit(5000)
    vb.tick()
    assert not vb.ctl.output.pwm_on and vb.ctl.charger.state == ch.SUSPENDED_EVSE


def test_welded_latches_pilot_f_and_clears_only_when_open(monkeypatch):
    vb = charging(monkeypatch, [(1200, "weld"), (1500, "stop_request"), (3000, "unplug")])
    vb.run_until(4000)
    assert vb.ctl.charger.faults == ch.FAULT_WELDED and vb.ctl.output.mode == pilot.MODE_F
    assert not vb.world.coil
    assert vb.ctl.clear_fault(vb.clock.ticks_ms(), "welded") == "contactor still reads closed"
    vb.world.welded = False  # the technician replaces the contactor
    vb.run_until(4100)
    assert vb.ctl.clear_fault(vb.clock.ticks_ms(), "welded") == "cleared"
    vb.run_until(4400)
    assert vb.ctl.charger.state == ch.IDLE and vb.ctl.output.mode == pilot.MODE_PLUS


def test_welded_at_power_up(monkeypatch):
    vb = VirtualBoard(monkeypatch, [])
    vb.world.contacts = vb.world.welded = True
    vb.run_until(1200)
    assert vb.ctl.charger.faults & ch.FAULT_WELDED and vb.ctl.output.mode == pilot.MODE_F


def test_rcd_locks_out_after_repeated_trips(monkeypatch):
    steps = []
    for i in range(3):  # each 100 ms, longer than relay._FAULT_DEBOUNCE_MS
        steps += [(2500 + i * 3000, "rcd_leak", True), (2600 + i * 3000, "rcd_leak", False)]
    vb = charging(monkeypatch, steps, config={"rcd_retry_s": 1, "rcd_max_trips": 3})
    vb.run_until(4400)
    assert vb.world.coil  # retried after the first trip
    vb.run_until(9500)
    assert vb.ctl.charger.faults & ch.FAULT_RCD_LOCKOUT and vb.ctl.output.mode == pilot.MODE_F
    assert not vb.world.coil
    # A reboot (power cut, watchdog, the reboot command) does not end the lock-out.
    flash = os.getcwd()
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)  # the same board again
    vb = VirtualBoard(monkeypatch, CHARGE)
    vb.run_until(2000)
    assert vb.ctl.charger.faults == ch.FAULT_RCD_LOCKOUT and vb.ctl.output.mode == pilot.MODE_F
    assert not vb.world.coil
    assert vb.ctl.clear_fault(vb.clock.ticks_ms(), "rcd_lockout") == "cleared"
    vb.run_until(4000)  # cleared, and saved so: the car charges
    assert vb.world.coil and not vb.ctl.charger.faults


def test_missing_diode_never_closes(monkeypatch):
    vb = VirtualBoard(monkeypatch, [(0, "remove_diode")] + CHARGE)
    vb.run_until(2000)
    assert not vb.world.coil and vb.ctl.charger.faults == ch.FAULT_DIODE


def test_a_cable_not_recognised_offers_nothing(monkeypatch):
    vb = VirtualBoard(monkeypatch, [(100, "plug", 5000), (600, "request")])
    vb.run_until(1500)
    assert not vb.world.coil and not vb.ctl.output.pwm_on
    assert vb.ctl.charger.state == ch.SUSPENDED_EVSE


def test_13_a_cable_limits_the_offer(monkeypatch):
    vb = VirtualBoard(monkeypatch, [(100, "plug", 1500), (600, "request")])
    vb.run_until(1500)
    assert vb.world.coil and vb.ctl.output.duty == pilot.duty_for_current(13000, pilot.IEC)


def test_runs_across_the_tick_wrap(monkeypatch):
    start = ((1 << 30) - 800) * 1000  # ticks_ms wraps 800 ms after power-on
    vb = VirtualBoard(monkeypatch, CHARGE + [(2000, "stop_request")], start_us=start)
    vb.run_until(1500)
    assert vb.world.coil
    vb.run_until(2100)
    assert not vb.world.coil and vb.world.latencies_ms[0] < 100


def test_tethered_board_uses_its_cable_rating(monkeypatch):
    from pilehost.virtual_board import board_dict

    board = board_dict()
    board["pins"]["pp_adc"] = None
    del board["pp_adc"]
    board["ratings"]["tethered_cable_a"] = 16
    vb = VirtualBoard(monkeypatch, CHARGE, board=board)
    vb.run_until(1500)
    assert vb.world.coil and vb.ctl.output.duty == pilot.duty_for_current(16000, pilot.IEC)


# -- availability (set_availability) and the remote settings on flash ---------------------------

def test_unavailable_f_pilot_f_no_session_then_available_charges(monkeypatch):
    vb = VirtualBoard(monkeypatch, CHARGE)
    vb.run_until(50)
    assert vb.ctl.charger.set_availability(vb.clock.ticks_ms(), ch.UNAVAILABLE_F) is None
    vb.run_until(1500)  # the car plugged in at 100 ms and wants power since 600 ms
    assert vb.ctl.output.mode == pilot.MODE_F and vb.world.pwm_duty == 0  # -12 V on the line
    assert not vb.world.coil and vb.ctl.charger.session is None and vb.ctl.records.record is None
    assert vb.ctl.charger.state == ch.UNAVAILABLE and vb.ctl.charger.pilot == pilot.F
    assert vb.ctl.charger.set_availability(vb.clock.ticks_ms(), ch.AVAILABLE) is None
    vb.run_until(2500)  # the pilot is read again, the car found: a new session, as after a boot
    assert vb.world.coil and vb.ctl.charger.state == ch.CHARGING
    assert vb.ctl.records.record.session is vb.ctl.charger.session


def test_unavailable_b1_while_charging_waits_for_the_session_to_end(monkeypatch):
    vb = charging(monkeypatch, config={"meter": {"type": "ddsu666"}})
    charger = vb.ctl.charger
    session = charger.session
    assert charger.set_availability(vb.clock.ticks_ms(), ch.UNAVAILABLE_B1) == ch.SCHEDULED
    vb.run_until(2000)
    assert vb.world.coil and charger.state == ch.CHARGING
    charger.remote_stop(vb.clock.ticks_ms())
    vb.run_while(lambda: vb.world.coil, 2000)  # C2 -> C1: the car drops to B, then the open
    vb.run_while(lambda: session.ended_ms is None, 3000)  # its final meter reading
    vb.tick()
    assert charger.state == ch.UNAVAILABLE and session.stop_reason == "remote"
    assert vb.ctl.output.mode == pilot.MODE_PLUS and not vb.ctl.output.pwm_on
    vb.run_until(vb.now_ms + 1000)
    assert charger.pilot == pilot.B and charger.session is None and not vb.world.coil
    charger.set_availability(vb.clock.ticks_ms(), ch.AVAILABLE)
    vb.run_until(vb.now_ms + 1000)  # the car still there and wanting: a new session
    assert vb.world.coil and charger.state == ch.CHARGING and charger.session is not session


def test_settings_survive_a_reboot_on_the_same_flash(monkeypatch):
    vb = VirtualBoard(monkeypatch, [])
    flash = os.getcwd()
    vb.ctl.charger.set_remote_limit(10000)
    vb.ctl.charger.set_availability(0, ch.UNAVAILABLE_B1)
    vb.tick()  # one write an iteration (flash_gate.spent): the second lands at the next step
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)  # the same board again
    vb = VirtualBoard(monkeypatch, CHARGE)
    assert ("settings", "unavailable_b1, remote limit 10000 mA") in vb.reports
    vb.run_until(1000)
    assert vb.ctl.charger.state == ch.UNAVAILABLE and not vb.world.coil
    assert vb.ctl.output.mode == pilot.MODE_PLUS and vb.ctl.charger.pilot == pilot.B  # no offer: B1
    vb.ctl.charger.set_availability(vb.clock.ticks_ms(), ch.AVAILABLE)
    vb.run_until(2000)
    assert vb.world.coil and vb.ctl.output.duty == pilot.duty_for_current(10000, pilot.IEC)


def test_a_garbled_settings_file_boots_with_the_defaults_and_latched(monkeypatch):
    """Issue 10 item 6: the latched faults in it cannot be read, so the pile stays latched
    (latch_state_lost) until a technician clears it; availability and limit take the defaults."""
    flash = tempfile.mkdtemp(prefix="pile-flash-")
    with open(os.path.join(flash, "settings.json"), "wb") as f:
        f.write(b"0badc0de\n{\"availability\": \"unavailable_f\"}")
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: flash)
    vb = VirtualBoard(monkeypatch, CHARGE)
    assert any(what == "settings" and "garbled" in text for what, text in vb.reports), vb.reports
    vb.run_until(1500)
    assert not vb.world.coil and vb.ctl.charger.faults == ch.FAULT_LATCH_STATE_LOST
    assert vb.ctl.charger.availability == ch.AVAILABLE and vb.ctl.output.mode == pilot.MODE_F
    assert vb.ctl.clear_fault(vb.clock.ticks_ms(), "latch_state_lost") == "cleared"
    vb.run_until(3000)
    assert vb.world.coil and vb.ctl.charger.state == ch.CHARGING


def test_a_latched_fault_wins_over_unavailable_b1(monkeypatch):
    vb = VirtualBoard(monkeypatch, [])
    vb.world.contacts = vb.world.welded = True
    vb.ctl.charger.set_availability(0, ch.UNAVAILABLE_B1)
    vb.run_until(1200)
    assert vb.ctl.charger.state == ch.FAULT and vb.ctl.output.mode == pilot.MODE_F
    vb.world.welded = False
    vb.run_until(1300)
    assert vb.ctl.clear_fault(vb.clock.ticks_ms(), "welded") == "cleared"
    vb.run_until(1400)
    assert vb.ctl.charger.state == ch.UNAVAILABLE and vb.ctl.output.mode == pilot.MODE_PLUS
