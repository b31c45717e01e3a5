"""The heap-growth run (pilehost/chipgrowth.py, sim/chip_growth.py; figures: `make bench
WHAT=growth`): its arithmetic and its verdicts on made-up output, that it catches a leak, and a
short lifetime of the frozen firmware in its 56 KiB target that does not grow. Every figure is a
count on the virtual clock: the same on a loaded host."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pilehost import chipbuild, chipgrowth, chipheap

SHORT = 30  # sessions in the test's lifetime (the bench's: 1,000)


def _run(lines, every=1):
    return chipgrowth.Run(lines, 0, "96k", every)


def _sample(k, live, block=4096, started=None, ended=None, connects=1):
    return "GROWTH %d %d %d 9999 %d %d %d" % (k, live, block, k if started is None else started,
                                              k if ended is None else ended, connects)


@given(st.integers(-10000, 10000), st.integers(-500, 500), st.integers(12, 60))
def test_the_slope_of_a_straight_line_is_its_leak_per_session_times_100(base, per_session, n):
    samples = [(k, base + per_session * k, 0, 0, k, k, 1) for k in range(1, n + 1)]
    assert chipgrowth.slope_per_100(samples) == pytest.approx(100 * per_session, abs=1e-6)


@given(st.lists(st.integers(0, chipgrowth.GROWTH_BOUND_B), min_size=12, max_size=40))
def test_noise_within_the_bound_is_no_growth_a_step_past_it_is(noise):
    samples = [(k, 40000 + x, 0, 0, k, k, 1) for k, x in enumerate(noise, 1)]
    assert chipgrowth.growth_beyond(samples) is None  # nothing rose more than the bound above 40000
    top = max(x for k, x in enumerate(noise, 1) if k <= chipgrowth.WARMUP)
    leaked = samples + [(len(samples) + 1, 40000 + top + chipgrowth.GROWTH_BOUND_B + 1, 0, 0, 0, 0, 1)]
    assert chipgrowth.growth_beyond(leaked) is not None


def test_a_record_published_twice_or_missing_a_reset_or_a_reconnect_is_a_problem():
    good = [_sample(k, 40000) for k in (1, 2, 3)] + ["GROWTH-END 3 16.9"]
    assert _run(good).problems(3) == []
    twice = [_sample(1, 40000), _sample(2, 40000, ended=3), "GROWTH-END 2 16.9"]
    assert "2 started and 3 ended" in _run(twice).problems(2)[0]
    missing = [_sample(1, 40000), _sample(2, 40000, started=2, ended=1), "GROWTH-END 2 16.9"]
    assert "1 ended" in _run(missing).problems(2)[0]
    reset = [_sample(1, 40000), "GROWTH-RESET boot 2", "MemoryError: memory allocation failed",
             "GROWTH-END 2 16.9"]
    assert any("reset" in p for p in _run(reset).problems(2))
    dropped = [_sample(1, 40000), _sample(2, 40000, connects=2), "GROWTH-END 2 16.9"]
    assert "MQTT connects" in _run(dropped).problems(2)[0]
    short = [_sample(1, 40000), "GROWTH-END 1 16.9"]
    assert "1 of 2 sessions" in _run(short).problems(2)[0]


@pytest.fixture(scope="module")
def frozen(chip_image):
    """(binary, MICROPYPATH, the simulator's live heap B) of the chip image, firmware frozen."""
    binary = chip_image
    path = chipbuild.frozen_micropypath()
    return binary, path, chipgrowth.simulator_share(binary, path)


def test_a_leak_of_128_bytes_a_session_is_caught(frozen):
    # The adversary: the ROM keeps 128 B more after each session; the verdict must see it.
    binary, path, sim_b = frozen
    r = chipgrowth.run(binary, path, 512, 16, 1, sim_b=sim_b, leak_b=128)
    assert r.problems(16) == []
    assert chipgrowth.growth_beyond(r.samples) is not None
    assert chipgrowth.slope_per_100(r.samples) > 100 * 100


def test_the_frozen_firmware_does_not_grow_over_a_short_lifetime_in_its_target(frozen):
    """30 sessions in 56 KiB (issue 12's frozen target) plus the simulator's share: every session
    completes with its records published once and acknowledged on one MQTT connection, and after
    the first 10 the live heap stays within GROWTH_BOUND_B of the most they reached."""
    binary, path, sim_b = frozen
    r = chipgrowth.run(binary, path, chipheap.TARGET_FROZEN_KIB, SHORT, 1, sim_b=sim_b)
    assert r.problems(SHORT) == [], "\n".join(r.lines[-30:])
    assert [s[0] for s in r.samples] == list(range(1, SHORT + 1))
    assert chipgrowth.growth_beyond(r.samples) is None, r.samples
    live = [s[1] for s in r.samples]
    assert max(live[chipgrowth.WARMUP:]) - min(live[chipgrowth.WARMUP:]) <= chipgrowth.GROWTH_BOUND_B
