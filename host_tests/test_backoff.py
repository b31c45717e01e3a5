"""firmware/backoff.py: the one pause-doubling-with-jitter the Wi-Fi station, the MQTT link and
the SNTP client share (issue 11: it was written three times)."""
from hypothesis import given
from hypothesis import strategies as st

import backoff


@given(lo=st.integers(1, 100000), factor=st.integers(1, 1000), spread=st.booleans(),
       steps=st.integers(1, 40))
def test_pauses_double_from_lo_up_to_hi_each_in_its_second_half(lo, factor, spread, steps):
    hi = lo * factor
    b = backoff.Backoff(lo, hi, spread)
    full = lo
    for _ in range(steps):
        pause = b.next_ms()
        if spread:
            assert full // 2 <= pause <= full
        else:
            assert pause == full
        full = min(full * 2, hi)
    b.reset()
    first = b.next_ms()
    assert first == lo or spread and lo // 2 <= first <= lo


def test_the_three_users_keep_their_limits():
    """Wi-Fi 2 s-5 min with jitter, MQTT 1 s-60 s with jitter, SNTP 60 s up to interval_s plain."""
    import sntp
    import wifi

    station = wifi.Station(None, "depot", "x" * 8)
    assert (station._backoff.lo_ms, station._backoff.hi_ms) == (2000, 300000)
    client = sntp.SntpClient("192.0.2.1", lambda dt: None, interval_s=900)
    assert (client._backoff.lo_ms, client._backoff.hi_ms) == (60000, 900000)
    assert [client._backoff.next_ms() for _ in range(6)] == [60000, 120000, 240000, 480000, 900000, 900000]
