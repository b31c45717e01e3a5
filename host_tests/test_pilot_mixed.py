"""PilotDebouncer's second way out of C/D: a window in which the bursts read mostly non-C/D.

The 20 ms rule (no C/D for _DEBOUNCE_POWER_OFF_MS, counted from the last C/D read) never fires
on a tethered pile whose car was unplugged under interference that reads D on every third burst:
A, A, D, A, A, D ... (host_tests/test_stateful_pile.py's found sequence). The window rule opens
that within IEC 61851-1's 100 ms (Table A.6 seq. 8.1, evse-facts section 1) and never trips a car
in C whose bursts read something else at most every other time. Each property is checked
against a model written here from the rule as docs/safety.md states it, not from pilot.py.
"""
import math
import os
import subprocess

from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pilot

TICKS = 1 << 30  # ticks_ms wraps here on the ESP32 (and the shim's time.ticks_diff)
CD = (pilot.C, pilot.D)
NON_CD = (pilot.A, pilot.B, pilot.E, pilot.X)
OFF_MS = 20  # the 20 ms rule, as docs/safety.md states it
WINDOW_MS = 20  # the window, as docs/safety.md states it
C_TO_B_MS = 100  # IEC 61851-1 Table A.6 seq. 8.1

BASE = st.one_of(st.integers(0, TICKS - 1), st.integers(TICKS - 3000, TICKS - 1),
                 st.integers((TICKS >> 1) - 3000, (TICKS >> 1) + 3000))


def charging(base):
    """A debouncer that entered C at base + 100 (B, then C read for 100 ms): that read is t=0."""
    d = pilot.PilotDebouncer(pilot.B)
    d.update(pilot.C, (base - 100) % TICKS)
    assert d.update(pilot.C, base % TICKS) and d.state == pilot.C
    return d


def leave(d, base, reads):
    """Feed (t, raw) reads, t in ms after the entry (unwrapped); the t at which the stable state
    left C/D, None if it never did."""
    for t, raw in reads:
        d.update(raw, (base + t) % TICKS)
        if d.state not in CD:
            assert raw not in CD and d.state == raw  # it leaves for the state just read
            return t
    return None


def old_leave(reads):
    """The 20 ms rule alone: the first non-C/D read 20 ms or more after the last C/D read (the
    entry's, t=0, at first)."""
    last_cd = 0
    for t, raw in reads:
        if raw in CD:
            last_cd = t
        elif t - last_cd >= OFF_MS:
            return t
    return None


def rule_leave(reads):
    """The rule as docs/safety.md states it, with lists: the 20 ms rule; else windows, the first
    opening at the entry (its C read counted), each later one right after the read that closed
    the one before. A window closes at the first non-C/D read WINDOW_MS or more after it opened:
    more non-C/D reads than C/D in it leave, else the next window opens."""
    last_cd = 0
    opened, window = 0, [pilot.C]
    for t, raw in reads:
        if raw in CD:
            last_cd = t
            window.append(raw)
            continue
        if t - last_cd >= OFF_MS:
            return t
        window.append(raw)
        if t - opened >= WINDOW_MS:
            non = sum(1 for r in window if r not in CD)
            if non > len(window) - non:
                return t
            opened, window = t, []
    return None


def timeline(gaps, start=0):
    t = start
    out = []
    for g in gaps:
        t += g
        out.append(t)
    return out


def test_the_constants_are_the_documented_ones():
    assert pilot._DEBOUNCE_POWER_OFF_MS == OFF_MS
    assert pilot._MIX_WINDOW_MS == WINDOW_MS
    # A burst spans more than the 1 ms period: a window holds fewer reads than the floor before it
    # has lasted its length, so the floor decides nothing; it keeps the count a small int.
    assert pilot._MIX_FLOOR <= -WINDOW_MS and pilot.BURST_US > 1000


# -- requirement 1: a car gone under interference that reads C/D on one burst in three -------------

def unplugged(pre_ms, spacing, phase, offset, pre, post, jitter=None):
    """Reads every `spacing` ms (or per-read gaps from jitter): the car in C for pre_ms with
    `pre` cycled over the bursts, unplugged at u (offset into a spacing), then `post` cycled
    from `phase`. Returns (reads, u)."""
    reads = []
    t = 0.0
    i = 0
    # the unplug on a whole ms, as the reads' stamps: a read stamped at u or later came after it
    # (at pre_ms + offset itself, a read in the same ms after it was stamped before it)
    u = math.ceil(pre_ms + offset)
    k = phase
    while t < u + 400:
        t += spacing if jitter is None else jitter[i % len(jitter)]
        i += 1
        if t < u:
            raw = pre[i % len(pre)]
        else:
            raw = post[k % len(post)]
            k += 1
        reads.append((int(t), raw))  # ticks_ms: whole ms
    return reads, u


@given(pre_ms=st.integers(0, 3000), spacing=st.floats(1.5, 20.0), offset=st.floats(0, 1))
def test_a_read_stamped_at_the_unplug_or_later_came_after_it(pre_ms, spacing, offset):
    """The found flake (pre_ms 217, spacing 1.816, offset 0.5): the unplug at 217.908 ms, the
    next read at 217.92 stamped 217 looked earlier than the unplug it followed."""
    reads, u = unplugged(pre_ms, spacing, 0, offset * spacing, (pilot.C,), (pilot.A,))
    assert all((raw == pilot.A) == (t >= u) for t, raw in reads)


PRE = st.sampled_from(((pilot.C,), (pilot.A, pilot.D, pilot.C), (pilot.C, pilot.X),
                       (pilot.C, pilot.B, pilot.C), (pilot.D, pilot.C, pilot.A, pilot.C)))


@st.composite
def gone(draw):
    """Two non-C/D reads and one C/D in each three bursts after the unplug (A, A, D: the found
    sequence; any non-C/D state, C or D)."""
    non = draw(st.lists(st.sampled_from(NON_CD), min_size=2, max_size=2))
    return tuple(non) + (draw(st.sampled_from(CD)),)


@settings(max_examples=400)
@given(base=BASE, pre_ms=st.integers(0, 3000), spacing=st.floats(1.5, 20.0), phase=st.integers(0, 2),
       offset=st.floats(0, 1), pre=PRE, post=gone())
def test_a_car_gone_under_interference_reading_c_d_one_burst_in_three_leaves_within_100_ms(
        base, pre_ms, spacing, phase, offset, pre, post):
    reads, u = unplugged(pre_ms, spacing, phase, offset * spacing, pre, post)
    assume(old_leave([r for r in reads if r[0] < u]) is None)  # at 20 ms apart C,X opens anyway
    t = leave(charging(base), base, reads)
    assert t is not None and t >= u, "left while the car still charged" if t is not None else "never left"
    assert t - u <= C_TO_B_MS, "left %.1f ms after the unplug (spacing %.2f ms)" % (t - u, spacing)


@settings(max_examples=300)
@given(base=BASE, pre_ms=st.integers(0, 2000), jitter=st.lists(st.floats(1.5, 20.0), min_size=1, max_size=12),
       phase=st.integers(0, 2), pre=PRE, post=gone())
def test_the_same_with_uneven_burst_spacing(base, pre_ms, jitter, phase, pre, post):
    """Bursts from the tick and from the guard between slices of slow work: gaps of 1.5-20 ms
    in any order."""
    reads, u = unplugged(pre_ms, None, phase, 0.5, pre, post, jitter=jitter)
    assume(old_leave([r for r in reads if r[0] < u]) is None)
    t = leave(charging(base), base, reads)
    assert t is not None and u <= t <= u + C_TO_B_MS, (t, u)


@settings(max_examples=300)
@given(base=BASE, spacing=st.floats(1.5, 20.0), phase=st.integers(0, 2), post=gone(),
       stall_at=st.integers(0, 30), stall=st.integers(0, 500))
def test_a_loop_stall_after_the_unplug_delays_the_leave_by_no_more_than_itself(
        base, spacing, phase, post, stall_at, stall):
    """A loop stall (no bursts for `stall` ms) at any read after the unplug: the window it ends
    holds few reads; the leave comes no later than 100 ms after the unplug plus the stall."""
    reads, u = unplugged(500, spacing, phase, 0.5, (pilot.C,), post)
    after = [i for i, (t, _) in enumerate(reads) if t >= u]
    cut = after[min(stall_at, len(after) - 1)]
    reads = reads[:cut] + [(t + stall, raw) for t, raw in reads[cut:]]
    t = leave(charging(base), base, reads)
    assert t is not None and u <= t <= u + C_TO_B_MS + stall, (t, u)


@given(base=BASE, phase=st.integers(0, 2), spacing=st.floats(1.5, 20.0))
def test_a_reset_to_c_at_any_tick_then_a_car_gone_leaves_within_100_ms(base, phase, spacing):
    """reset(C) has no time: its window counts as closed (ticks_diff from 0 may be negative, as
    for a window opened 2^29 ms or more ago), so the first window from a read is the next."""
    d = pilot.PilotDebouncer(pilot.C)
    reads, u = unplugged(0, spacing, phase, 0, (pilot.C,), (pilot.A, pilot.A, pilot.D))
    t = leave(d, base, reads)
    assert t is not None and t - u <= C_TO_B_MS


# -- requirement 2: a car in C whose bursts read something else at most every other time ---------

@st.composite
def alternating(draw, stalls):
    """A car in steady C or D: no two non-C/D reads in a row (C,X,C,X; C,B,C,B; C,C,X,C,A ...),
    any phase; gaps under the 20 ms rule's reach, or loop stalls of any length when `stalls`."""
    n = draw(st.integers(1, 300))
    raws = []
    for _ in range(n):
        if raws and raws[-1] not in CD:
            raws.append(draw(st.sampled_from(CD)))
        else:
            raws.append(draw(st.sampled_from(CD + NON_CD)))
    gap = st.integers(0, OFF_MS - 1)
    if stalls:
        gap = st.one_of(gap, gap, gap, st.integers(0, 600))
    gaps = draw(st.lists(gap, min_size=n, max_size=n))
    return list(zip(timeline(gaps), raws, strict=True))


@settings(max_examples=400)
@given(base=BASE, reads=alternating(stalls=False))
def test_a_car_in_c_read_otherwise_at_most_every_other_burst_keeps_charging(base, reads):
    assert leave(charging(base), base, reads) is None


@settings(max_examples=400)
@given(base=BASE, reads=alternating(stalls=True))
def test_loop_stalls_add_no_trip_to_the_20_ms_rule_on_such_a_car(base, reads):
    """With stalls the 20 ms rule may open (a stall between a C and the next X): it opens
    exactly there and nowhere else; a window of one or two reads decides nothing of its own."""
    assert leave(charging(base), base, reads) == old_leave(reads)


def test_steady_c_for_long_keeps_the_count_a_small_int_and_still_leaves():
    """200,000 C reads (~5 min at the 1.5 ms guard's pace, no window closed in all that time):
    the count stays at its floor, and a car gone with A, A, D leaves as fast as ever."""
    d = charging(0)
    t = 0
    for _ in range(200000):
        t += 1.5
        d.update(pilot.C, int(t) % TICKS)
    assert d.state == pilot.C and pilot._MIX_FLOOR <= d._balance < 0
    u = t
    reads = []
    for k in range(60):
        t += 6.2
        reads.append((int(t), (pilot.A, pilot.A, pilot.D)[k % 3]))
    left = leave(d, 0, reads)
    assert left is not None and left - u <= 2 * WINDOW_MS + 4 * 6.2


# -- never later than the 20 ms rule; the rule exactly as documented -------------------------------

RAW = st.sampled_from(CD + NON_CD)


@settings(max_examples=500)
@given(base=BASE, raws=st.lists(RAW, min_size=1, max_size=200),
       gaps=st.lists(st.one_of(st.integers(0, 25), st.integers(0, 300)), min_size=200, max_size=200))
def test_never_later_than_the_20_ms_rule(base, raws, gaps):
    reads = list(zip(timeline(gaps), raws, strict=False))
    new = leave(charging(base), base, reads)
    old = old_leave(reads)
    if old is not None:
        assert new is not None and new <= old


@settings(max_examples=500)
@given(base=BASE, raws=st.lists(RAW, min_size=1, max_size=200),
       gaps=st.lists(st.one_of(st.integers(1, 12), st.integers(1, 40)), min_size=200, max_size=200))
def test_the_rule_is_the_documented_one(base, raws, gaps):
    """Reads at least 1 ms apart, as bursts of 1.1 ms are: the same leave as the list model."""
    reads = list(zip(timeline(gaps), raws, strict=False))
    assert leave(charging(base), base, reads) == rule_leave(reads)


@given(base=BASE, raws=st.lists(RAW, min_size=1, max_size=80),
       gaps=st.lists(st.integers(1, 30), min_size=80, max_size=80))
def test_reset_clears_it(base, raws, gaps):
    """A debouncer reset (to F, as the controller does when it drives -12 V) and brought into C
    again behaves as a new one, whatever it went through."""
    reads = list(zip(timeline(gaps), raws, strict=False))
    used = charging(base)
    leave(used, base, reads)
    used.reset(pilot.F)
    used.update(pilot.B, base % TICKS)
    used.update(pilot.B, (base + 100) % TICKS)
    base2 = base + 300
    used.update(pilot.C, (base2 - 100) % TICKS)
    assert used.update(pilot.C, base2 % TICKS)
    assert leave(used, base2, reads) == leave(charging(base2), base2, reads)


# -- the cases by example ---------------------------------------------------------------------------

def every(spacing, pattern, n, start=0.0):
    return [(int(start + spacing * (k + 1)), pattern[k % len(pattern)]) for k in range(n)]


def test_found_a_a_d_every_6_ms_after_the_unplug():
    """The stateful test's find: ticks ~6.2 ms apart, D on every third: a D every 18.7 ms, never
    20 ms without one. The 20 ms rule never leaves; the window rule does, within 100 ms."""
    reads = every(6.2, (pilot.A, pilot.A, pilot.D), 300)
    assert old_leave(reads) is None
    t = leave(charging(0), 0, reads)
    assert t is not None and t <= C_TO_B_MS


def test_a_a_d_at_the_slowest_pace_the_20_ms_rule_misses():
    """Bursts 10, 9, 10 ms apart: D to the second A after it is 19 ms, the 20 ms rule never
    fires."""
    reads = list(zip(timeline([10, 10, 9] * 100), (pilot.D, pilot.A, pilot.A) * 100, strict=True))
    assert old_leave(reads) is None
    t = leave(charging(0), 0, reads)
    assert t is not None and t <= C_TO_B_MS


def test_c_x_and_c_b_alternating_keep_charging_for_minutes():
    for spacing in (1.5, 5.0, 6.2, 19.0):
        for other in (pilot.X, pilot.B, pilot.A, pilot.E):
            for pattern in ((pilot.C, other), (other, pilot.C), (pilot.D, other)):
                reads = every(spacing, pattern, 20000)
                assert leave(charging(0), 0, reads) is None, (spacing, pattern)


def test_two_non_c_d_reads_in_three_open_whatever_the_car():
    """C, X, X: the pile cannot tell it from a car gone under A, A, D interference: it opens."""
    reads = every(5.0, (pilot.C, pilot.X, pilot.X), 100)
    assert old_leave(reads) is None
    assert leave(charging(0), 0, reads) is not None


def test_a_lone_pair_of_non_c_d_reads_in_steady_c_is_no_trip():
    """C ... C, X, X, C ...: a 3 ms glitch in a long C: the window's C reads outnumber it."""
    reads = every(1.5, (pilot.C,) * 30 + (pilot.X, pilot.X), 3200)
    assert leave(charging(0), 0, reads) is None


def test_a_stall_then_one_non_c_d_read_leaves_as_the_20_ms_rule_does():
    d = charging(0)
    assert not d.update(pilot.C, 5)
    assert d.update(pilot.X, 40) and d.state == pilot.X  # the first read after a 35 ms stall


def test_across_the_tick_wrap():
    base = TICKS - 30
    reads = every(6.2, (pilot.A, pilot.A, pilot.D), 60)
    t = leave(charging(base), base, reads)
    assert t is not None and t <= C_TO_B_MS


# -- on the MicroPython unix ports: no allocation, ticks_diff's own wrap -------------------------------

UPY_SCRIPT = """
import micropython, time, pilot
C, D, A, X = pilot.C, pilot.D, pilot.A, pilot.X
def run(start, spacing10, pattern, n, d):
    t10 = 0
    for k in range(n):
        t10 += spacing10
        if d.update(pattern[k % len(pattern)], time.ticks_add(start, t10 // 10)):
            return t10 // 10
    return -1
start = time.ticks_add(0, -40)  # 40 ms before the wrap
d = pilot.PilotDebouncer(pilot.B)
d.update(C, time.ticks_add(start, -100))
d.update(C, start)
cx = (C, X)
aad = (A, A, D)
micropython.heap_lock()
kept = run(start, 15, cx, 20000, d)  # C, X every 1.5 ms: 30 s
later = time.ticks_add(start, 30000)
left = run(later, 62, aad, 60, d)
micropython.heap_unlock()
print("kept", kept, "left", left, d.state)
"""


def test_on_the_unix_ports_no_allocation_and_the_wrap(unix_binary):
    from pilehost import unix_port

    firmware = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "firmware")
    env = dict(os.environ, MICROPYPATH=firmware)
    proc = subprocess.run([unix_port.micropython_binary(), "-c", UPY_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    words = proc.stdout.split()
    assert words[:2] == ["kept", "-1"] and words[4] == pilot.A, proc.stdout
    assert 0 < int(words[3]) <= C_TO_B_MS, proc.stdout


def test_update_keeps_its_frame_on_the_c_stack():
    """A bytecode function whose state (locals and its deepest value stack) exceeds 11 words has
    its frame taken from the heap at every call and freed after (py/objfun.c,
    VM_MAX_STATE_ON_STACK), ~800 instructions more a call on the 32-bit port; under heap_lock it
    falls back to the C stack, so the test above cannot see it. update runs on every burst."""
    from pilehost import unix_port

    exe = unix_port.binary("stock")  # built with the bytecode printer: -v -v shows each frame
    firmware = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "firmware")
    proc = subprocess.run([exe, "-v", "-v", "-c", "import pilot"], env=dict(os.environ, MICROPYPATH=firmware),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "code block 'update'" in line)
    state = next(line for line in lines[start:] if line.startswith("(N_STATE "))
    exc = next(line for line in lines[start:] if line.startswith("(N_EXC_STACK "))
    assert int(state.split()[1].rstrip(")")) <= 11 and exc == "(N_EXC_STACK 0)", (state, exc)
