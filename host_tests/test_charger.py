"""The charger state machine on its own: stable pilot states in, states and wishes out."""
import charger as ch
import pilot


def make(free_vend=True, **kw):
    args = dict(max_current_ma=32000, board_max_ma=32000, free_vend=free_vend, allow_ventilation=False)
    args.update(kw)
    log = []
    c = ch.Charger(report=lambda now, what, text: log.append((what, text)), **args)
    c.cable_ma = 32000
    return c, log


def test_free_vend_session():
    c, _ = make()
    assert c.step(0, pilot.A, True) == 0 and c.state == ch.IDLE and c.power == ch.POWER_OFF
    assert c.step(10, pilot.B, True) == ch.EV_CAR_PLUGGED_IN
    assert c.state == ch.SUSPENDED_EV and c.pilot_mode == ch.MODE_OFFER
    assert c.step(20, pilot.C, True) == ch.EV_CAR_REQUESTED_POWER
    assert c.state == ch.CHARGING and c.power == ch.POWER_ON
    assert c.step(30, pilot.B, True) == ch.EV_CAR_REQUESTED_STOP_POWER
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
    assert c.state == ch.SUSPENDED_EVSE and c.pilot_mode == ch.MODE_OFFER and c.power == ch.POWER_HOLD


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
