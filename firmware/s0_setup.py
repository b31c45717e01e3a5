"""At boot: an S0 meter driver made, its state set, its pin's IRQ on (s0_meter.py has no
__init__: its bytecode would stay on the heap for the run; meter_setup.py sets the common part).

Only the boot makes the meter (wiring.make_meter), so this runs once and wiring.py drops it at
once, with meter_setup.py (issue 12).
"""
from micropython import const

import meter_setup

# A pulse (facts section 5) is >= 30 ms (IEC 62053-31). From edge times: 30 ms less 2 ms of
# ticks_ms rounding at the two edges, less 3 ms margin for the interrupt's latency.
_DEBOUNCE_IRQ_MS = const(25)
# Sampled by poll() every <= 10 ms, the first and last samples of a 30 ms pulse are >= 20 ms
# apart, so 20 ms of active level counts.
_DEBOUNCE_POLL_MS = const(20)
# Inactive this long before the next pulse may count: a bounce inside a pulse is not a pulse,
# and a shorter inactive gap inside a pulse (a spike on the line) does not end it.
_REARM_MS = const(10)
# Active longer than this is a stuck output, not a pulse. Engineering choice: S0 pulses are
# tens of ms (30 ms minimum above); 1 s is far beyond any pulse width.
_STUCK_MS = const(1000)
# Edges the ring holds between two polls (s0_meter._RING: a power of two, for the index mask).
_RING = const(32)


def build(pin, imp_per_kwh=1000, active_low=True, debounce_ms=None, rearm_ms=_REARM_MS,
          stuck_ms=_STUCK_MS, poll_interval_ms=1000, start_wh=0, use_irq=None):
    """An s0_meter.S0Meter on `pin`. use_irq: counted from pin-interrupt edge times (None: if
    the pin has irq()); debounce_ms None: the pulse's minimum as the edges or the polls see it."""
    import s0_meter  # optional (test_firmware_layout.py): only on this driver's pile

    m = s0_meter.S0Meter()
    meter_setup.base(m)
    if imp_per_kwh <= 0:
        raise ValueError("s0: imp_per_kwh must be > 0")
    if use_irq is None:
        use_irq = hasattr(pin, "irq")
    m._pin = pin
    # Opto output between the pin (pulled up) and GND: conducting = pulse = low level.
    m._active = 0 if active_low else 1
    m.imp_per_kwh = imp_per_kwh
    if debounce_ms is None:
        debounce_ms = _DEBOUNCE_IRQ_MS if use_irq else _DEBOUNCE_POLL_MS
    m._debounce_ms = debounce_ms
    m._rearm_ms = rearm_ms
    m._stuck_ms = stuck_ms
    m._interval_ms = poll_interval_ms
    m._start_wh = start_wh
    m.pulses = 0
    m._level_active = None
    m._since = 0
    m._bridge = None
    m._armed = False  # a pulse seen at start-up may be half over: wait for idle first
    m._stuck = False
    m._edge_at = None
    m._pulse_ms = 0
    m._published_at = None
    # The ring the IRQ handler fills: made once, the handler only stores small ints.
    m._ring_t = [0] * _RING
    m._ring_v = bytearray(_RING)
    m._head = 0
    m._tail = 0
    m._overrun = False
    m._irq = use_irq
    if use_irq:
        pin.irq(m._on_edge, pin.IRQ_RISING | pin.IRQ_FALLING, hard=True)
    return m
