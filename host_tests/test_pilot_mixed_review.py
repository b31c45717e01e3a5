"""Adversarial review of the window rule (hw-cdmix): PilotDebouncer's second way out of C/D.

The reference is the old debouncer, copied from main's firmware/pilot.py (the 20 ms rule alone),
run side by side with pilot.PilotDebouncer on the same reads, ticks wrapped at 2^30 as on the
port (the shim's time.ticks_diff). Strict xfails are findings: each says what broke.
"""
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pilot

TICKS = 1 << 30
A, B, C, D, E, F, X = pilot.A, pilot.B, pilot.C, pilot.D, pilot.E, pilot.F, pilot.X
CD = (C, D)
ANY = (A, B, C, D, E, F, X)
NON_CD = (A, B, E, X)


class OldDebouncer:
    """main's PilotDebouncer (before hw-cdmix), verbatim but for the module's names."""

    def __init__(self, initial=F):
        self.reset(initial)

    def reset(self, state):
        self.state = state
        self._candidate = state
        self._since = 0
        self._last_cd = None

    def update(self, raw, now_ms):
        drawing = raw == C or raw == D
        if drawing:
            self._last_cd = now_ms
        if raw != self._candidate:
            self._candidate = raw
            self._since = now_ms
        if raw == self.state:
            return False
        if self.state == C or self.state == D:
            if drawing:
                if time.ticks_diff(now_ms, self._since) < 100:
                    return False
            else:
                last = self._since if self._last_cd is None else self._last_cd
                if time.ticks_diff(now_ms, last) < 20:
                    return False
            self.state = raw
            return True
        if time.ticks_diff(now_ms, self._since) >= pilot.debounce_ms(self.state, raw):
            self.state = raw
            return True
        return False


def both(start=B, base=0):
    """New and old debouncers, both in C entered at base (C read for 100 ms from B)."""
    pair = (pilot.PilotDebouncer(start), OldDebouncer(start))
    for d in pair:
        d.update(C, (base - 100) % TICKS)
        d.update(C, base % TICKS)
        assert d.state == C
    return pair


def leave_times(reads, base=0):
    """(new, old): the t at which each left C/D, None if never."""
    new, old = both(base=base)
    out = [None, None]
    for t, raw in reads:
        for i, d in enumerate((new, old)):
            d.update(raw, (base + t) % TICKS)
            if out[i] is None and d.state not in CD:
                out[i] = t
    return tuple(out)


def periodic(pattern, spacing, u, pre=(C,), end=400, start=0.0):
    """pre cycled until the unplug at u, then pattern cycled; reads every spacing ms (whole ms)."""
    reads, t, i, k = [], start, 0, 0
    while t < u + end:
        t += spacing
        i += 1
        if t < u:
            raw = pre[i % len(pre)]
        else:
            raw = pattern[k % len(pattern)]
            k += 1
        reads.append((int(t), raw))
    return reads


BASE = st.one_of(st.integers(0, TICKS - 1), st.integers(TICKS - 2000, TICKS - 1),
                 st.integers((TICKS >> 1) - 2000, (TICKS >> 1) + 2000))


# -- attack 1: never later than the 20 ms rule, and never holds power the old rule would not -----

@settings(max_examples=600)
@given(base=BASE, start=st.sampled_from(ANY),
       steps=st.lists(st.tuples(st.sampled_from(ANY), st.integers(0, 300),
                                st.sampled_from((None, None, None, None, None, None, C, B, F))),
                      min_size=1, max_size=250))
def test_the_new_debouncer_is_never_in_c_d_where_the_old_is_not(base, start, steps):
    """Any start state, any reads (E, F, X too), gaps 0-300 ms, resets to any state on the way:
    whenever the new debouncer holds C/D (power may stay on), the old one does too."""
    new, old = pilot.PilotDebouncer(start), OldDebouncer(start)
    t = base
    for raw, gap, reset_to in steps:
        t = (t + gap) % TICKS
        if reset_to is not None:
            new.reset(reset_to)
            old.reset(reset_to)
        new.update(raw, t)
        old.update(raw, t)
        assert new.state not in CD or old.state in CD, (new.state, old.state)
        if new.state in CD:
            assert new.state == old.state  # C <-> D timing unchanged


# -- attack 2: nuisance trips: C/D on at least every other burst, any stalls ---------------------

@st.composite
def every_other(draw):
    """A car in C/D: bursts read non-C/D never two in a row; gaps 1.5-20 ms with stalls."""
    reads, t, prev_non = [], 0.0, True
    for _ in range(draw(st.integers(1, 300))):
        t += draw(st.one_of(st.floats(1.5, 20.0), st.floats(1.5, 20.0), st.floats(20.0, 400.0)))
        non = (not prev_non) and draw(st.booleans())
        raw = draw(st.sampled_from(NON_CD)) if non else draw(st.sampled_from((C, C, C, D)))
        prev_non = non
        reads.append((int(t), raw))
    return reads


@settings(max_examples=600)
@given(base=BASE, reads=every_other())
def test_a_car_read_wrong_at_most_every_other_burst_trips_no_sooner_than_the_20_ms_rule(base, reads):
    new, old = leave_times(reads, base)
    assert new == old  # the window rule adds no trip (a stall then a wrong read: both rules trip)


def test_the_share_tolerated_is_a_pattern_not_a_ratio():
    """Half the bursts wrong, in pairs (C,X,X,C cycled) at 1.5 ms: the window rule trips 22 ms
    after it starts, the 20 ms rule never did; at another phase (C,C,X,X) it does not. One in
    three or in five wrong in pairs (C,C,C,X,X / C,C,C,C,X,X) did not trip at any phase tried.
    It is the pattern (never two in a row) that the docs promise, not a share; "other mixes as
    the windows fall" is true, and 50 % in pairs can open."""
    assert leave_times(periodic((C, X, X, C), 1.5, 200, end=2000)) == (222, None)
    assert leave_times(periodic((C, C, X, X), 1.5, 200, end=2000)) == (None, None)
    for pat in ((C, C, C, X, X), (C, C, C, C, X, X)):
        for ph in range(len(pat)):
            for spacing in (1.5, 3.0, 5.0, 7.0, 9.0):
                reads = periodic(pat[ph:] + pat[:ph], spacing, 200, end=2000)
                assert leave_times(reads) == (None, None), (pat, ph, spacing)


def test_random_interference_share_figures(capsys):
    """Figures, not a gate: a car in steady C at 1.5 and 9 ms spacing whose bursts each read X with
    probability p (independent), how many of 200 ten-second runs the new rule trips (the old
    one trips only on 20 ms without C/D)."""
    import random
    rnd = random.Random(12)
    for spacing in (1.5, 9.0):
        for p in (0.1, 0.2, 0.3, 0.4):
            trips = [0, 0]
            for _ in range(200):
                reads, t = [], 0.0
                while t < 10000:
                    t += spacing
                    reads.append((int(t), X if rnd.random() < p else C))
                new, old = leave_times(reads)
                trips[0] += new is not None
                trips[1] += old is not None
            with capsys.disabled():
                print(f"\nspacing {spacing} ms, p={p}: new trips {trips[0]}/200, old {trips[1]}/200")


# -- attack 3: a car gone, reads mostly non-C/D, still in C/D after 100 ms -----------------------

@pytest.mark.xfail(strict=True, reason="BROKE: 5 of 9 bursts non-C/D (D,A,D,A,D,A,D,A,A) at 19 ms "
                   "spacing stays in C/D ~190 ms after the unplug; the window (20 ms) holds 1-2 reads "
                   "and the old 20 ms rule is no sooner (outside the A,A,D requirement)")
def test_mostly_non_c_d_at_slow_spacing_leaves_within_100_ms():
    pattern = (D, A, D, A, D, A, D, A, A)
    worst = 0
    for pre in range(0, 20, 3):
        for ph in range(9):
            u = 200 + pre
            reads = periodic(pattern[ph:] + pattern[:ph], 19.0, u)
            new, old = leave_times(reads)
            assert new is not None and old is not None and new <= old
            worst = max(worst, new - u)
    assert worst <= 100, worst


def test_mostly_non_c_d_at_the_chip_s_pace_leaves_within_100_ms():
    """At the ESP32's ~9 ms between reads while closed (chip model) and faster, every pattern of up
    to 7 bursts with a non-C/D majority leaves within 100 ms (worst found: 80 ms)."""
    import itertools
    for n in range(3, 8):
        for pat in itertools.product((A, D), repeat=n):
            if 2 * sum(r == A for r in pat) <= n:
                continue
            for spacing in (1.5, 3.0, 5.0, 7.0, 9.0):
                for pre in range(0, 20, 4):
                    u = 200 + pre
                    new, _ = leave_times(periodic(pat, spacing, u))
                    assert new is not None and new - u <= 100, (pat, spacing, pre, new)


# -- attack 4: edges -------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [TICKS - 5, TICKS - 15, (TICKS >> 1) - 10, 0])
def test_a_a_d_across_the_wrap_leaves_as_far_from_it(base):
    reads = periodic((A, A, D), 6.0, 50, start=0.0)
    assert leave_times(reads, base) == leave_times(reads, 1000)


def test_reset_to_c_at_boot_tick_0_then_a_a_d():
    """reset(C) sets the window at tick 0: at boot (ticks_ms near 0) it looks freshly opened."""
    new, old = pilot.PilotDebouncer(B), OldDebouncer(B)
    for d in (new, old):
        d.reset(C)
    t = 0
    lv = [None, None]
    for i in range(60):
        t += 6
        raw = (A, A, D)[i % 3]
        for j, d in enumerate((new, old)):
            d.update(raw, t)
            if lv[j] is None and d.state not in CD:
                lv[j] = t
    # the first A reads 20 ms after reset's _since=0: both leave at once (old rule)
    assert lv[0] is not None and lv[0] <= 100 and lv[0] <= (lv[1] or 10**9)


def test_c_to_d_mid_window_keeps_the_window():
    reads = [(t, C) for t in range(2, 40, 2)] + [(t, D) for t in range(40, 200, 2)]
    reads += periodic((A, A, D), 6.0, 200, end=200, start=198.0)
    new, old = leave_times(reads)
    assert new is not None and new - 200 <= 100 and (old is None or new <= old)


def test_a_single_read_after_a_long_stall_in_a_mixed_window():
    """C,X,C,X then a 300 ms stall then C: the stale window closes on the next X (balance 0) and
    opens a new one; no trip on a lone X either side of the stall."""
    reads = [(t, (C, X)[(t // 2) % 2]) for t in range(2, 40, 2)] + [(340, C), (342, X), (344, C),
                                                                     (346, X), (348, C)]
    assert leave_times(reads) == (None, None)


@pytest.mark.xfail(strict=True, reason="BROKE (mild): under E/B/C mixed reads (a CP short amid "
                   "interference) the window rule leaves C/D for B at its window's close where the 20 ms "
                   "rule left for E; B->E then needs 20 ms of E uninterrupted, so the stable state shows "
                   "B, not the fault (the old rule's landing is as arbitrary: it could land on B too)")
def test_leaving_under_a_fault_lands_on_the_fault_as_the_old_rule_does():
    tail = ("EECBEEBBCEEBEEBEEEBBEECBECEEBBECBCCEBBCBBBCEEBBBEECBBECEEEBEEECBCBBBBBBCEBEEBBBC")
    reads = [(t, C) for t in range(2, 100, 2)]
    reads += [(100 + 3 * (i + 1), raw) for i, raw in enumerate(tail)]
    new, old = both()
    for t, raw in reads:
        new.update(raw, t)
        old.update(raw, t)
    assert old.state == E
    assert new.state == E, new.state
