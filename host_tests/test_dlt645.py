"""DL/T 645-2007: frame vectors, parser checks and fuzzing, the driver against the simulated
meter (address learning, faults, DE turnaround, energy delta)."""
import pytest
from hypothesis import given, settings, strategies as st

import dlt645
from meter import MeterError
from wiring import make_meter
from meters import Dlt645MeterSim
from pilehost.meter_rig import Bus, Clock, ScriptedSim, World, run

pytestmark = pytest.mark.usefixtures("no_sleeping")  # conftest.py

ADDR = b"\x01\x00\x00\x00\x00\x00"  # nameplate 000000000001


def h(text):
    return bytes.fromhex(text)


def with_cs(text):
    """Frame from 68 .. last data byte (hex), plus CS and 16: the test's own checksum."""
    body = h(text)
    return body + bytes([sum(body) & 0xFF, 0x16])


# ----------------------------------------------------------------------------- vectors
# Requests: the two broadcast frames are the examples published with DL/T 645-2007 tools
# (68 AA..AA 68 13 00 DF 16 and 68 AA..AA 68 11 04 33 33 34 33 AE 16). The checksums of the
# others were summed by hand: e.g. 68+01+68+11+04+33+33+34+33 = 0x1B3 -> B3.

def test_build_read_address_broadcast():
    buf = bytearray(32)
    n = dlt645.build_request(buf, None)
    assert bytes(buf[:n]) == h("FE FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16")


@pytest.mark.parametrize("address, di, frame", [
    (b"\xaa" * 6, dlt645.DI_ENERGY, "68 AA AA AA AA AA AA 68 11 04 33 33 34 33 AE 16"),
    (ADDR, dlt645.DI_ENERGY, "68 01 00 00 00 00 00 68 11 04 33 33 34 33 B3 16"),
    (ADDR, dlt645.DI_VOLTAGE_A, "68 01 00 00 00 00 00 68 11 04 33 34 34 35 B6 16"),
])
def test_build_read(address, di, frame):
    buf = bytearray(32)
    n = dlt645.build_request(buf, address, di, wake=0)
    assert bytes(buf[:n]) == h(frame)
    n = dlt645.build_request(buf, address, di)  # with the wake-up bytes
    assert bytes(buf[:n]) == h("FE FE FE FE " + frame)


def test_address_from_nameplate():
    assert dlt645.address_bytes("000000000001") == ADDR
    assert dlt645.address_bytes("123456789012") == h("12 90 78 56 34 12")
    assert dlt645.address_bytes(ADDR) == ADDR
    for bad in ("12345", "00000000000A", "0000000000001", b"\x01\x02", b"\x0a\0\0\0\0\0"):
        with pytest.raises(ValueError):
            dlt645.address_bytes(bad)


# Replies, checksums summed by hand (and again by with_cs's plain sum):
# energy 1234.56 kWh: BCD 00 12 34 56 -> LSB first 56 34 12 00 -> +33 89 67 45 33.
REPLY_ENERGY = "68 01 00 00 00 00 00 68 91 08 33 33 34 33 89 67 45 33 9F 16"
# phase A voltage 230.0 V: 2300 -> 00 23 -> +33 33 56
REPLY_VOLTAGE = "68 01 00 00 00 00 00 68 91 06 33 34 34 35 33 56 C1 16"
# phase A current -1.500 A: 00 15 00 with the sign bit in the top byte -> 00 15 80 -> 33 48 B3
REPLY_CURRENT = "68 01 00 00 00 00 00 68 91 07 33 34 35 35 33 48 B3 68 16"
# total active power 3.6800 kW: 03 68 00 -> LSB first 00 68 03 -> 33 9B 36
REPLY_POWER = "68 01 00 00 00 00 00 68 91 07 33 33 36 35 33 9B 36 3E 16"
REPLY_ADDRESS = "68 01 00 00 00 00 00 68 93 06 34 33 33 33 33 33 9D 16"
REPLY_ERROR = "68 01 00 00 00 00 00 68 D1 01 35 D8 16"  # error byte 02: no requested data


@pytest.mark.parametrize("frame, di, value", [
    (REPLY_ENERGY, dlt645.DI_ENERGY, 123456),
    ("FE FE FE FE " + REPLY_ENERGY, dlt645.DI_ENERGY, 123456),
    (REPLY_VOLTAGE, dlt645.DI_VOLTAGE_A, 2300),
    (REPLY_CURRENT, dlt645.DI_CURRENT_A, -1500),
    (REPLY_POWER, dlt645.DI_POWER, 36800),
])
def test_parse_read_reply_vectors(frame, di, value):
    data = h(frame)
    assert with_cs(frame.replace("FE FE FE FE ", "")[:-6]) == data.lstrip(b"\xfe")
    assert dlt645.frame_length(data, len(data)) == len(data)
    assert dlt645.parse_reply(data, len(data), ADDR, di) == value


def test_parse_address_reply_vector():
    data = h(REPLY_ADDRESS)
    assert dlt645.parse_reply(data, len(data), None, None) == ADDR


@pytest.mark.parametrize("frame, di, kind, text", [
    (REPLY_ENERGY[:-5] + "9E 16", dlt645.DI_ENERGY, "crc", "checksum 0x9e != 0x9f"),
    ("68 02 00 00 00 00 00 68 91 08 33 33 34 33 89 67 45 33 A0 16", dlt645.DI_ENERGY,
     "wrong_address", "from 000000000002, expected 000000000001"),
    (REPLY_ERROR, dlt645.DI_ENERGY, "exception_reply", "error reply 0xd1, code 0x02"),
    (REPLY_ENERGY, dlt645.DI_VOLTAGE_A, "garbage", "data length 8, expected 6"),
    (REPLY_CURRENT, dlt645.DI_POWER, "garbage", "another DI than 0x02030000"),
    ("68 01 00 00 00 00 00 68 91 08 33 33 34 33 89 67 4F 33 A9 16", dlt645.DI_ENERGY,
     "garbage", "BCD"),  # 4F - 33 = 1C: not a decimal digit
    (REPLY_ENERGY[:-2] + "17", dlt645.DI_ENERGY, "garbage", "not 0x16"),
    (REPLY_ENERGY[:-12], dlt645.DI_ENERGY, "partial", ""),
    ("69" + REPLY_ENERGY[2:], dlt645.DI_ENERGY, "garbage", "not 0x68"),
    (REPLY_ENERGY + " 00", dlt645.DI_ENERGY, "garbage", "header says 20"),
])
def test_parse_read_reply_rejects(frame, di, kind, text):
    data = h(frame)
    with pytest.raises(MeterError) as exc:
        dlt645.parse_reply(data, len(data), ADDR, di)
    assert exc.value.kind == kind
    assert text in str(exc.value), str(exc.value)


# ----------------------------------------------------------------------------- fuzz

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40), st.sampled_from(
    [dlt645.DI_ENERGY, dlt645.DI_VOLTAGE_A, dlt645.DI_CURRENT_A, dlt645.DI_POWER]))
def test_fuzz_parser_raises_only_meter_error(frame, di):
    try:
        value = dlt645.parse_reply(frame, len(frame), ADDR, di)
    except MeterError:
        pass
    else:
        body = frame.lstrip(b"\xfe")
        assert body[-1] == 0x16 and sum(body[:-2]) & 0xFF == body[-2]
        assert body[1:7] == ADDR and body[8] == 0x91
        assert isinstance(value, int)
    try:
        address = dlt645.parse_reply(frame, len(frame), None, None)
    except MeterError:
        pass
    else:
        body = frame.lstrip(b"\xfe")
        assert sum(body[:-2]) & 0xFF == body[-2] and body[8] == 0x93 and address == body[1:7]
    try:
        dlt645.frame_length(frame, len(frame))
    except MeterError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([REPLY_ENERGY, REPLY_VOLTAGE, REPLY_CURRENT, REPLY_POWER]), st.data())
def test_fuzz_any_corrupted_byte_is_caught(frame, data):
    di = {REPLY_ENERGY: dlt645.DI_ENERGY, REPLY_VOLTAGE: dlt645.DI_VOLTAGE_A,
          REPLY_CURRENT: dlt645.DI_CURRENT_A, REPLY_POWER: dlt645.DI_POWER}[frame]
    good = h(frame)
    pos = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[pos] ^= flip
    # one changed byte always breaks the sum, the framing or the header check
    with pytest.raises(MeterError):
        dlt645.parse_reply(bad, len(bad), ADDR, di)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=5))
def test_fuzz_driver_publishes_nothing_from_bad_replies(replies):
    clock = Clock()
    bus = Bus(clock, ScriptedSim(replies), baud=2400)
    m = make_meter("dlt645", uart=bus.uart, de=bus.de, address=ADDR)
    run(m, clock, 6000)
    assert m.reading is None
    assert sum(m.errors.values()) >= 1


# ----------------------------------------------------------------------------- driver + sim

def make(address=ADDR, sim_address=ADDR, world=None, start_ticks=0, **options):
    clock = Clock(start_ticks)
    world = world or World(energy_wh=1234560.0, voltage_v=230.0, current_a=16.0, power_w=3680.0)
    sim = Dlt645MeterSim(world, address=sim_address)
    bus = Bus(clock, sim, baud=2400)
    m = make_meter("dlt645", uart=bus.uart, de=bus.de, address=address, **options)
    return clock, world, sim, bus, m


def test_reads_all_values():
    clock, world, sim, bus, m = make()
    run(m, clock, 1000)
    r = m.reading
    assert r is not None, m.last_error
    assert r.energy_wh == 1234560
    assert r.voltage_v == 230.0 and r.current_a == 16.0 and r.power_w == 3680.0
    assert sum(m.errors.values()) == 0 and bus.violations == []
    # energy last, so the reading's time is the energy request's (issue 10 item 7)
    assert [f[2][4:] for f in bus.frames] == [
        h("68 01 00 00 00 00 00 68 11 04 33 34 34 35 B6 16"),
        with_cs("68 01 00 00 00 00 00 68 11 04 33 34 35 35"),
        with_cs("68 01 00 00 00 00 00 68 11 04 33 33 36 35"),
        h("68 01 00 00 00 00 00 68 11 04 33 33 34 33 B3 16"),
    ]
    assert all(f[2][:4] == b"\xfe" * 4 for f in bus.frames)


def test_negative_current_and_power():
    world = World(energy_wh=10.0, voltage_v=229.9, current_a=-1.5, power_w=-345.6)
    clock, world, sim, bus, m = make(world=world)
    run(m, clock, 1000)
    assert m.reading.current_a == -1.5 and m.reading.power_w == -345.6
    assert m.reading.voltage_v == 229.9


def test_address_learnt_with_broadcast():
    clock, world, sim, bus, m = make(address=None, sim_address=h("78 56 34 12 00 00"))
    assert m.address is None
    run(m, clock, 1500)  # learning + 4 reads at 2400 baud take ~1.2 s
    assert bus.frames[0][2] == h("FE FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16")
    assert m.address == h("78 56 34 12 00 00")
    assert m.reading is not None and m.reading.energy_wh == 1234560
    run(m, clock, 2000)
    assert sum(1 for f in bus.frames if f[2][12] == 0x13) == 1  # learnt once


def test_nameplate_address_option():
    clock, world, sim, bus, m = make(address="000012345678", sim_address=h("78 56 34 12 00 00"))
    run(m, clock, 1000)
    assert m.reading is not None


FAULT_KINDS = {
    "silent": ("timeout", "no reply within 500 ms"),
    "bad_crc": ("crc", "dlt645: checksum 0x"),
    "partial": ("partial", "cut short"),
    "wrong_address": ("wrong_address", "from 000000000010, expected 000000000001"),
    "exception": ("exception_reply", "error reply 0xd1, code 0x01"),
    "backwards": ("backwards", "went backwards"),
    "jump": ("jump", "jumped"),
}
# "reboot" and "zeros" are no longer refused for ever: a register restart confirmed by the next
# reading starts a new epoch (issue 10 item 8, host_tests/test_hostile_meters.py).


@pytest.mark.parametrize("fault", sorted(FAULT_KINDS) + ["garbage"])
def test_fault_gives_error_counter_and_keeps_last_reading(fault):
    clock, world, sim, bus, m = make()
    run(m, clock, 1000)
    good = m.reading
    assert good is not None
    world.energy_wh += 10
    sim.fault = fault
    run(m, clock, 3000)
    if fault == "garbage":
        kinds = [k for k, n in m.errors.items() if n]
        assert kinds and set(kinds) <= {"garbage", "crc", "partial"}, m.errors
        assert m.last_error.startswith("dlt645: ")
    else:
        kind, text = FAULT_KINDS[fault]
        assert m.errors[kind] == 3, m.errors
        assert sum(m.errors.values()) == 3
        assert text in m.last_error, m.last_error
    assert m.reading is good
    sim.fault = None
    run(m, clock, 1000)
    assert m.reading is not good and m.reading.energy_wh == 1234570
    assert m.last_error is None


@pytest.mark.parametrize("step_ms", [1, 5, 10])
def test_de_turnaround(step_ms):
    clock, world, sim, bus, m = make()
    m.poll(clock.ticks)
    assert bus.de_level == 1
    frame_ms = 20 * 11 * 1000 / 2400  # 20 bytes with the wake-up: 91.7 ms
    assert bus.frames[0][1] == pytest.approx(frame_ms)
    while clock.t + step_ms < frame_ms:
        clock.t += step_ms
        m.poll(clock.ticks)
        assert bus.de_level == 1
    run(m, clock, 5000, step_ms=step_ms)
    assert bus.violations == []
    for start, end, _ in bus.frames:
        assert bus.de_at(start) == 1 and bus.de_at(end - 0.01) == 1
        if end + 3 + step_ms <= clock.t:
            assert bus.de_at(end + 3 + step_ms) == 0


def test_energy_delta_matches_sim():
    # DL/T 645 counts whole 0.01 kWh: the delta is to the register's 10 Wh, and the
    # session is chosen so that the world's delta is a whole number of 10 Wh.
    world = World(energy_wh=1234560.0, power_w=7200.0)
    clock, world, sim, bus, m = make(world=world, start_ticks=(1 << 30) - 30000)
    run(m, clock, 1500)
    first = m.reading.energy_wh
    start = world.energy_wh
    t0 = clock.t
    while clock.t < t0 + 150000:  # 150 s at 7.2 kW = 300 Wh
        run(m, clock, 50)
        world.energy_wh = start + (7200 * (clock.t - t0)) // 3600000
    run(m, clock, 2500)
    assert world.energy_wh - start == 300
    assert m.reading.energy_wh - first == 300
    assert sum(m.errors.values()) == 0, m.errors
    assert bus.violations == []
