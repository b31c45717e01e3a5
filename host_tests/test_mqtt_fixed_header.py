"""firmware/mqtt_conn.py fixed_header(): the one reading of an MQTT packet's remaining length,
used by the pile's connection and by the chip model's broker (sim/chip_net.py). Checked against
the host's encoder (pilehost.mqtt_async, MQTT 3.1.1 section 2.2.3)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mqtt_conn
from pilehost.mqtt_async import packet, remaining_length

MAX_REMAINING = 268435455  # four bytes of 7 bits


@given(st.integers(0, MAX_REMAINING), st.binary(max_size=8))
def test_every_length_reads_back_and_what_follows_is_not_read(length, after):
    head = bytes((0x30,)) + remaining_length(length)
    assert mqtt_conn.fixed_header(head + after, len(head) + len(after)) == (len(head), length)


@given(st.binary(max_size=300))
def test_a_packet_reads_back_whole(body):
    data = packet(0x32, body)
    i, length = mqtt_conn.fixed_header(data, len(data))
    assert data[i:i + length] == body and i + length == len(data)


@given(st.integers(0, MAX_REMAINING))
def test_a_header_not_all_in_is_none_never_a_guess(length):
    head = bytes((0x30,)) + remaining_length(length)
    buf = bytearray(head) + bytearray(8)  # what is beyond n is never looked at
    for n in range(len(head)):
        assert mqtt_conn.fixed_header(buf, n) is None


def test_a_fifth_length_byte_is_a_broken_stream():
    with pytest.raises(OSError, match="bad packet length"):
        mqtt_conn.fixed_header(b"\x30\xff\xff\xff\xff\x01", 6)
    assert mqtt_conn.fixed_header(b"\x30\xff\xff\xff", 4) is None  # four: not all in yet
