"""Control pilot (IEC 61851-1 Annex A; GB/T 18487.1 Annex A uses the same scheme).

Three layers, none of which knows the charger's session logic:
- PilotSampler: burst-samples the CP voltage and keeps the plus and minus levels;
- classify() and PilotDebouncer: plus level -> state A-E (X = no band) -> stable state;
- PilotOutput: the 1 kHz PWM that offers current, steady +12 V, or -12 V (state F).
Plus the duty <-> current rule and the cable coding (PP / CC).
"""
import time

from micropython import const

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any, Callable

IEC = "iec"
GBT = "gbt"
STANDARDS = (IEC, GBT)

# Pilot states (IEC 61851-1 Table A.3). X: a plus level outside every band.
A = "A"  # no vehicle
B = "B"  # vehicle connected, not requesting
C = "C"  # vehicle requests power
D = "D"  # vehicle requests power and ventilation
E = "E"  # CP shorted to PE / no power
F = "F"  # pile unavailable: the pile drives -12 V, nothing can be read
X = "X"

# Plus-level bands in mV, from ../shared/reference/evse-facts.md section 1 (J1772 / IEC 61851-1
# Table A.4 and GB/T 18487.1 Table A.2). GB/T has no state D. The E band (0 V nominal) is our
# choice: no standard band is given, +-1.5 V keeps it clear of D (2.62 V).
_E_BAND = (-1500, 1500, E)
_BANDS = {
    IEC: ((11400, 12600, A), (8360, 9560, B), (5480, 6490, C), (2620, 3250, D), _E_BAND),
    GBT: ((11200, 12800, A), (7800, 9800, B), (5200, 6800, C), _E_BAND),
}
# The minus level while PWM runs must reach -12 V (-12.6 .. -11.4 V); higher means the car's
# diode is missing or shorted (IEC 61851-1 Table A.4). GB/T: its +-0.8 V tolerance, as for A.
_DIODE_BANDS = {IEC: (-12600, -11400), GBT: (-12800, -11200)}


def classify(plus_mv, standard):
    """Pilot state for a plus level in mV, X when it is in no band."""
    for low, high, state in _BANDS[standard]:
        if low <= plus_mv <= high:
            return state
    return X


def diode_check(minus_mv, standard):
    """True: the minus level reached -12 V. False: it stayed higher (diode missing or shorted;
    without the diode the car's resistor pulls it to -8.8 V in B, -2.4 V in D). None: the burst
    caught no minus phase at all - at 96 % duty it lasts only 40 us, about one ADC read."""
    if minus_mv >= 0:
        return None
    low, high = _DIODE_BANDS[standard]
    return low <= minus_mv <= high


# Debounce: a new state must be read without interruption this long before it is accepted.
# Towards more power (B->C) it is long: closing may take up to 3 s (IEC 61851-1 Table A.6
# seq. 4). Towards A, E or X from B it is short (OpenEVSE takes 25 ms for A).
# Leaving C/D is a rule of its own, about C/D only, with two ways out (docs/safety.md, "Opening"):
# - the 20 ms rule: no burst has read C or D for _DEBOUNCE_POWER_OFF_MS, counted from the last
#   C/D reading, whatever was read since (B, A, X, E, interleaved or not). The first non-C/D read
#   after a loop stall longer than that leaves at once;
# - the window rule, which only ever leaves sooner: over a window of at least _MIX_WINDOW_MS,
#   closed by a non-C/D read, more bursts read non-C/D than C/D. A tethered pile (no PP) whose car
#   was unplugged under interference reading D on every third burst (A, A, D, ...: a D every
#   ~19 ms) never goes 20 ms without C/D; this leaves within 2 windows plus 4 bursts (< 100 ms
#   at bursts under 10 ms apart; from 10 ms on the 20 ms rule does). A car in C whose bursts
#   read something else at most every other time (C,X,C,X; C,B,C,B) never has that majority.
# C->B must open the contactor within 100 ms (Table A.6 seq. 8.1); EVerest filters at most 50 ms.
_DEBOUNCE_POWER_OFF_MS = const(20)
_DEBOUNCE_DEFAULT_MS = const(100)
# As long as the 20 ms rule: a window whose reads are all non-C/D then leaves only where that rule
# does, so a window of one or two reads (a loop stall) decides nothing of its own.
_MIX_WINDOW_MS = const(_DEBOUNCE_POWER_OFF_MS)
# C/D reads count down no further: a burst spans more than the 1 ms period, so a window holds
# fewer reads than this before it has lasted its length (the floor changes no decision); it keeps
# the count a small int through weeks of steady C.
_MIX_FLOOR = const(-_MIX_WINDOW_MS)


def debounce_ms(old, new):
    if new in (A, E, X) or (old in (C, D) and new == B):
        return _DEBOUNCE_POWER_OFF_MS
    return _DEBOUNCE_DEFAULT_MS


class PilotDebouncer:
    """Turns raw per-burst states into a stable state, in time (not in sample counts).

    Leaving C/D (the contactor opens on it) has two ways out, either is enough:
    - the 20 ms rule: a non-C/D read _DEBOUNCE_POWER_OFF_MS or more after the last C/D read;
    - the window rule: a window opens as C/D is entered (that read counted in it) and again right
      after each read that closed one. It closes at the first non-C/D read at least
      _MIX_WINDOW_MS after it opened (a ticks_diff outside 0.._MIX_WINDOW_MS counts as that: a
      window opened 2^29 ms ago or more, or by reset() which has no time). More non-C/D reads
      than C/D in it: the stable state leaves for the state just read; else the next one opens.
    Tolerated: any C/D reads with non-C/D ones never two in a row (C,X,C,X; C,B,C,B; at any
    phase and burst spacing; a window then opens before a C/D read, so each non-C/D read in it
    has a C/D read before it); the 20 ms rule still opens on 20 ms with no C/D read.
    Opens: two non-C/D reads in three (A,A,D: a car gone; C,X,X: no pile can tell it from one),
    at most two windows and four bursts after it starts; other mixes (C,C,X,X) as the windows
    fall. The window rule never opens later than the 20 ms rule would.
    """

    def __init__(self, initial=F):
        self.reset(initial)

    def reset(self, state):
        self.state = state
        self._candidate = state
        self._since = self._window_ms = 0
        self._last_cd = None  # when a burst last read C or D; None: none since the reset
        self._balance = -1  # the window's non-C/D reads less its C/D ones; the reset as one C/D

    def update(self, raw, now_ms):
        """Feed one raw state; True when the stable state changed."""
        # Few locals: a frame over 11 words is taken from the heap at every call (py/objfun.c,
        # VM_MAX_STATE_ON_STACK); test_pilot_mixed.py counts them.
        drawing = raw == C or raw == D
        if drawing:
            self._last_cd = now_ms
            if self._balance > _MIX_FLOOR:  # counted in any state: cheaper than asking
                self._balance -= 1
        if raw != self._candidate:
            self._candidate = raw
            self._since = now_ms
        if raw == self.state:
            return False
        if self.state == C or self.state == D:
            if not drawing:
                last = self._since if self._last_cd is None else self._last_cd
                if time.ticks_diff(now_ms, last) < _DEBOUNCE_POWER_OFF_MS:
                    self._balance += 1
                    if 0 <= time.ticks_diff(now_ms, self._window_ms) < _MIX_WINDOW_MS:
                        return False  # the window is still open
                    if self._balance <= 0:  # closed without a non-C/D majority: the next opens
                        self._window_ms = now_ms
                        self._balance = 0
                        return False
            elif time.ticks_diff(now_ms, self._since) < _DEBOUNCE_DEFAULT_MS:
                return False  # C <-> D: the usual debounce
            self.state = raw
            return True
        if time.ticks_diff(now_ms, self._since) >= debounce_ms(self.state, raw):
            self.state = raw
            if drawing:  # C/D entered: the first window opens, this read in it
                self._window_ms = now_ms
                self._balance = -1
            return True
        return False


# A burst spans a little more than one 1 kHz PWM period (1 ms) so that it contains both the plus
# and the minus phase. One ESP32 ADC read takes ~35 us from Python, too slow to phase-lock
# (evse-facts section 6): keep the highest sample (state) and the lowest (diode check).
BURST_US = const(1100)
_PERIOD_US = const(1000)  # the 1 kHz PWM (IEC 61851-1 A.2.2; wiring.py sets it)
# The 100 us a burst spans beyond the period: no wait between two reads may be longer, else the
# CPU was taken away inside the burst (an interrupt storm, a busy host) and the wait can hide a
# whole plus phase (10 % duty: 100 us): the burst is stalled (gap_us over it), it may hold a
# single minus-phase sample and read X (docs/safety.md, "A stalled burst is no reading").
BURST_GAP_MAX_US = const(BURST_US - _PERIOD_US)


class PilotSampler:
    """Reads the CP line through the board's divider; calibration maps ADC uV to CP mV. Made by
    wiring.new_sampler (boot code, dropped after it), which sets the state below."""

    # Set by wiring.new_sampler (annotations only: no code on the board).
    _read: "Callable[[], int]"  # the ADC's read_uv
    _ticks_us: "Callable[[], int]"
    _uv_m12: int  # ADC uV at -12 V on CP
    _uv_span: int  # ADC uV from -12 V to +12 V
    _burst_us: int
    plus_mv: int
    minus_mv: int
    # The longest wait between two stamps of the last burst (a stall inside it). Each read
    # follows its stamp at once, so two reads lie no further apart than the wait between them.
    gap_us: int

    def to_mv(self, uv):
        return (uv - self._uv_m12) * 24000 // self._uv_span - 12000

    def sample(self):
        read = self._read
        ticks_us = self._ticks_us
        ticks_diff = time.ticks_diff
        burst_us = self._burst_us
        start = last = ticks_us()
        high = low = read()
        gap = 0
        while True:
            now = ticks_us()
            uv = read()  # right after its stamp, no branch between: no scheduled callback either
            if uv > high:
                high = uv
            elif uv < low:
                low = uv
            wait = ticks_diff(now, last)
            if wait > gap:
                gap = wait
            if ticks_diff(now, start) >= burst_us:
                break  # its read is kept: the reads span the whole burst
            last = now
        self.plus_mv = self.to_mv(high)
        self.minus_mv = self.to_mv(low)
        self.gap_us = gap


# Duty cycle <-> offered current, evse-facts section 1 (IEC 61851-1 Table A.8, SAE J1772).
# Integer milliamps and duty_u16 so the result is exact on the ESP32's single-precision floats.
MIN_CURRENT_MA = const(6000)
_LOW_RANGE_TOP_MA = const(51000)  # D = I / 0.6 up to 85 %
_GAP_TOP_MA = const(52500)  # 51-52.5 A has no duty of its own: clamp to 51 A (as EVerest)
_MAX_MA = {IEC: 80000, GBT: 63000}  # GB/T 18487.1 caps the high range at 63 A
DUTY_FULL = const(65535)


def minus_piece_us(duty, burst_us=BURST_US):
    """The shortest longest piece of minus phase a burst of burst_us holds at this duty (the
    plus phase's duty_u16), wherever the burst starts: a full period's minus phase (L) cut in two
    at worst, the burst's extra (e) beyond the period added to the second piece: (L + e) / 2.
    PilotSampler's reads span the burst and lie at most gap_us apart: a shorter gap leaves a read
    in that piece. Above 90 % duty it exceeds L (not judged there)."""
    minus = _PERIOD_US * (DUTY_FULL - duty) // DUTY_FULL
    return (minus + burst_us - _PERIOD_US) // 2


def duty_for_current(current_ma, standard):
    """duty_u16 that offers at most current_ma; None below 6 A (nothing can be offered).

    Rounds down so that the car never reads more than the limit.
    """
    if current_ma < MIN_CURRENT_MA:
        return None
    current_ma = min(current_ma, _MAX_MA[standard])
    if current_ma <= _GAP_TOP_MA:
        current_ma = min(current_ma, _LOW_RANGE_TOP_MA)
        return current_ma * DUTY_FULL // 60000  # D [%] = I [A] / 0.6
    return (current_ma + 160000) * DUTY_FULL // 250000  # D [%] = I [A] / 2.5 + 64


# Cable coding. IEC 62196 / IEC 61851-1 Table B.2 PP-PE resistor -> cable rating (evse-facts
# section 2); the tolerance windows around 1.5 k / 680 / 220 / 100 ohm are Table B.2's
# interpretation ranges, UNCONFIRMED against the standard text. GB/T 20234.2 CC (RC) values are
# UNCONFIRMED in evse-facts; the same windows are used. Outside every window: no valid cable.
_CABLE_CODING = {
    IEC: ((80, 140, 63), (164, 308, 32), (400, 936, 20), (1100, 2460, 13)),
    GBT: ((80, 140, 63), (164, 308, 32), (400, 936, 16), (1100, 2460, 10)),
}


def cable_rating_a(ohms, standard):
    """Cable current rating in A from the PP (or CC) resistance, 0 when not a valid coding."""
    if ohms is None:
        return 0
    for low, high, amps in _CABLE_CODING[standard]:
        if low <= ohms <= high:
            return amps
    return 0


class ProximityInput:
    """PP (IEC) or CC (GB/T) resistance to PE, read through the board's pull-up to the supply.
    Made by wiring.new_proximity (boot code, dropped after it)."""

    # Set by wiring.new_proximity (annotations only: no code on the board).
    _adc: "Any"
    _pullup: int  # ohm
    _supply: int  # uV

    def ohms(self):
        """Resistance in ohm, None when open (no plug or no resistor)."""
        uv = 0
        for _ in range(4):
            uv += self._adc.read_uv()
        uv //= 4
        if uv >= self._supply * 98 // 100:
            return None
        return self._pullup * uv // (self._supply - uv)


MODE_PLUS = "+12V"  # steady +12 V: no offer (A, B1, C1)
MODE_F = "F"  # steady -12 V: pile unavailable


class PilotOutput:
    """The pilot generator: one PWM channel. Reports its mode for classification and telemetry.

    Writes nothing until told: the caller picks the first level (boot.py already set +12 V).
    Made by wiring.new_output (boot code, dropped after it).
    """

    # Set by wiring.new_output (annotations only: no code on the board).
    _pwm: "Any"
    _inverted: bool
    mode: "str | None"
    duty: "int | None"  # duty_u16 while offering, else None

    def _write(self, duty):
        self._pwm.duty_u16(DUTY_FULL - duty if self._inverted else duty)

    def steady_plus(self):
        self._write(DUTY_FULL)
        self.mode = MODE_PLUS
        self.duty = None

    def state_f(self):
        self._write(0)
        self.mode = MODE_F
        self.duty = None

    def offer(self, duty):
        self._write(duty)
        self.mode = "PWM"
        self.duty = duty

    @property
    def pwm_on(self):
        return self.duty is not None
