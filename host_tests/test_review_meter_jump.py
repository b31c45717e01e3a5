"""A meter "jump" fault that lasts across a reboot (found by test_stateful_pile.py's fuzz,
session fuzz-1-3-1): the first reading after boot had no history to be judged against, became
the next session's meter start, and when the glitch ended the drop back to the true register
was taken for a meter restart from 0: the session billed ~9 Wh it never delivered.

The rule (docs/meters.md, "A session's meter start"): a start is confirmed by a reading the
guard checked against it (two consistent readings); one the meter's next epoch comes before is
a glitch, never billed, and the new register is the start, not counted from 0. A power cut's
record takes no unchecked boot reading. The virtual board (wiring.build on the
simulated hardware, virtual clock), as test_stateful_pile.py; fakes are local."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pilehost.virtual_board import VirtualBoard, board_dict

import meters

PERIOD_MS = 5
RESOLUTION_WH = 2  # DDSU666 float32 kWh register (0.12 Wh steps at these values) plus rounding


class Pile:
    """One pile with a DDSU666 on the simulated bus, its session records caught at the outbox
    with the world's delivered energy at that moment."""

    def __init__(self, mp, start_wh=1234500):
        config = {"free_vend": True, "pile_id": "jump-1", "standard": "iec",
                  "meter": {"type": "ddsu666", "failure_timeout_s": 5},
                  "mqtt": {"host": "127.0.0.1", "secret": "00" * 32}}
        self.vb = VirtualBoard(mp, config=config, board=board_dict(), period_ms=PERIOD_MS)
        self.world = self.vb.world
        self.world.energy_wh = start_wh
        self.records = []  # (record, world energy when it was appended)
        self._wrap()
        self.run_ms(300)

    def _wrap(self):
        outbox = self.vb.ctl.records.log.outbox
        real = outbox.append

        def append(kind, payload):
            self.records.append((json.loads(bytes(payload)), self.world.energy_wh))
            return real(kind, payload)

        outbox.append = append

    def run_ms(self, ms):
        end = self.world.now + ms * 1000
        while self.world.now < end:
            self.world.advance()
            self.vb.tick()

    def reboot(self):
        self.vb.reboot()
        self._wrap()

    def fault(self, fault):
        self.world.meter.fault = fault

    def plug_and_charge(self, ms):
        w = self.world
        if not w.car.plugged:
            w.car.cable_ohm = 220
            w.do("plug")
        w.do("request")
        self.run_ms(ms)

    def unplug(self, ms=3000):
        self.world.do("unplug")
        self.run_ms(ms)

    def bills(self):
        """(session id, billed, delivered, ended record) for each session that ended."""
        started = {}
        out = []
        for record, energy in self.records:
            sid = record.get("session_id")
            if "stop_reason" not in record:
                started[sid] = energy
            elif sid in started and record.get("stop_reason") != "power_loss":
                out.append((sid, record["energy_wh"], energy - started[sid], record))
        return out


def assert_never_over_billed(pile):
    for sid, billed, delivered, record in pile.bills():
        assert billed is None or billed <= delivered + RESOLUTION_WH, \
            "session %s billed %s Wh of %.1f delivered: %r" % (sid, billed, delivered, record)


def test_jump_across_a_reboot_is_never_a_start_nor_billed(monkeypatch):
    """The fuzz's find, replayed by hand: the register restarted from 0 (a meter reboot), a few
    Wh on it; a jump fault from before a reboot of the pile until after the next plug-in."""
    pile = Pile(monkeypatch)
    pile.plug_and_charge(2000)
    pile.fault("reboot")  # the meter restarts: its register counts on from 0 (and stays so)
    pile.run_ms(6000)
    pile.fault(None)
    pile.unplug()
    assert pile.vb.ctl.records.meter.reading.energy_wh < 40, "the register should be near 0 now"
    pile.fault("jump")
    pile.run_ms(1500)
    pile.reboot()  # the jump lasts across it: the first reading after boot is a glitch
    pile.run_ms(300)
    pile.plug_and_charge(3000)
    pile.fault(None)  # the glitch ends: the register drops back to its true value
    pile.run_ms(4000)
    pile.unplug()
    bills = pile.bills()
    assert len(bills) >= 2
    assert_never_over_billed(pile)
    after = bills[-1][3]  # the session plugged in while the glitch lasted
    assert after["meter_start_wh"] < meters.JUMP_WH, "a glitch became a meter start: %r" % after


GLITCHES = ("jump", "zeros", "backwards", "silent", "garbage", "huge")


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(steps=st.lists(st.tuples(
    st.sampled_from(("charge", "unplug", "reboot", "glitch", "heal", "meter_restart",
                     "reboot_in_glitch")),
    st.sampled_from(GLITCHES), st.integers(5, 5000)), min_size=3, max_size=12))
def test_billed_never_exceeds_delivered_across_reboots_and_glitches(steps):
    """The invariant: whatever glitches the meter shows, however often it restarts from 0 and
    the pile reboots (a glitch lasting across it), no session bills more than the car received
    plus the register's resolution."""
    mp = pytest.MonkeyPatch()
    try:
        pile = Pile(mp)
        for what, glitch, ms in steps:
            if what == "charge":
                pile.plug_and_charge(ms)
            elif what == "unplug":
                pile.unplug(ms)
            elif what == "reboot":
                pile.reboot()
                pile.run_ms(ms)
            elif what == "glitch":
                pile.fault(glitch)
                pile.run_ms(ms)
            elif what == "heal":
                pile.fault(None)
                pile.run_ms(ms)
            elif what == "meter_restart":  # its register counts on from 0 (a few Wh on it soon)
                pile.fault("reboot")
                pile.run_ms(ms)
                pile.fault(None)
            else:  # a glitch from before a reboot of the pile until after it
                pile.fault(glitch if glitch != "backwards" else "jump")  # see the xfail below
                pile.run_ms(1500)
                pile.reboot()
                pile.run_ms(ms)
            assert_never_over_billed(pile)
        pile.fault(None)
        pile.unplug(12000)
        assert_never_over_billed(pile)
    finally:
        mp.undo()


@pytest.mark.xfail(strict=True, reason="left open: a register shown low (stuck at 0) from before "
                   "a reboot until after it reads as two consistent readings; the pile keeps no "
                   "register across a reboot outside a session's snapshot to tell it is low")
def test_backwards_across_a_reboot_is_not_billed(monkeypatch):
    """The invariant's find with "backwards" across a reboot: a register a few Wh above 0 (the
    meter restarted), shown clamped at 0 while the fault lasts; after the pile's reboot 0 and 0
    again are two consistent readings, the start; the true register after it is billed."""
    pile = Pile(monkeypatch)
    pile.plug_and_charge(2000)
    pile.fault("reboot")
    pile.run_ms(3000)
    pile.fault(None)
    pile.unplug()
    pile.fault("backwards")
    pile.run_ms(1500)
    pile.reboot()
    pile.run_ms(300)
    pile.plug_and_charge(3000)
    pile.fault(None)
    pile.run_ms(2000)
    pile.unplug()
    assert_never_over_billed(pile)


class _Session:
    """What a Record reads of the charger's session."""
    ended_ms = None
    started_ms = 0
    authorized_ms = 0


def _reading(wh, t, epoch):
    import meter
    return meter.Reading(wh, 7000.0, 230.0, 32.0, t, epoch=epoch)


@pytest.mark.xfail(strict=True, reason="left open: test_hostile_billing.py's item 8 model bills "
                   "a new epoch's register <= 33 Wh from 0 whatever came before; a drop back "
                   "after a held glitch is that case (coordinator's call, docs/meters.md)")
def test_the_end_of_a_held_glitch_is_not_billed_from_0():
    """A glitch the meter held for two readings (the guard confirms it as a rise, a new epoch),
    then the register back at its true value, 9 Wh (a meter that restarted recently): the drop
    is taken for a restart from 0 and the 9 Wh the register held before the session are billed."""
    from session_record import Record
    record = Record(_Session())
    record.note_meter(_reading(9, 0, 0))
    record.note_meter(_reading(11, 1000, 0))
    record.note_meter(_reading(1000009, 2000, 1))  # the rise, confirmed by the next
    record.note_meter(_reading(1000011, 3000, 1))
    record.note_meter(_reading(15, 4000, 2))  # back: the glitch's end
    record.note_meter(_reading(17, 5000, 2))
    assert record.energy_wh <= 8 + RESOLUTION_WH  # the register counted 9 -> 17


def test_a_power_cut_record_takes_no_unchecked_boot_reading(tmp_path):
    """A power cut's record bills up to the first reading after boot, within what 50 kW could
    count since the snapshot: a glitch at boot inside that bound (here 300 Wh ahead, 70 s x
    50 kW = 972 Wh allowed) was billed. Now it waits for a checked reading: the next one, which
    follows the first, or without one closes stale on the snapshot's register."""
    import charger as ch
    import journal
    import meter
    import session_log
    import session_store
    from session_record import Record

    def make_log(boot):
        return session_log.SessionLog(
            "pile-0042", boot, journal.Journal(str(tmp_path / "outbox")),
            session_store.SessionStore(str(tmp_path / "session.json")), metered=True,
            checkpoint_s=60, wall=lambda: 1795000000)

    def ended():
        out = [json.loads(p) for _s, k, p in journal.Journal(str(tmp_path / "outbox")).pending()
               if journal.kind_name(k) == "session_end"]
        return out[-1] if out else None

    s = Record(ch.Session(0))
    s.auth_source, s.auth_id, s.authorized_ms = "free_vend", None, 0
    s.note_meter(meter.Reading(1000, 7360.0, 230.0, 32.0, 0))
    log = make_log(7)
    log.poll(0, s, None)
    # the power goes; the next boot's first reading is a glitch, unchecked
    log2 = make_log(8)
    first = meter.Reading(1300, 7360.0, 230.0, 32.0, 400)
    first.checked = False
    log2.poll(500, None, first)
    assert ended() is None, "closed on a reading the guard never checked"
    log2.poll(500 + session_log.RECOVERY_WAIT_MS, None, first)
    record = ended()
    assert record["meter_stop_wh"] == 1000 and record["meter_stop_stale"] is True
