"""At boot: a meter driver made, its state set (meter.py, modbus_meter.py, dlt645.py and
s0_meter.py have no __init__: their bytecode would stay on the heap for the run).

Only the boot makes the meter (wiring.make_meter, which checks the arguments first), so this runs
once and wiring.py drops it at once, before the link's modules load (issue 12): its bytes are not
on the heap for the run. Each function imports only the driver it makes. What an attribute means
is said where the driver uses it (the class annotations).
"""
from micropython import const

import meter

# meter.py's, the drivers' (a test keeps them one): Rs485Meter's idle state, the bits of a
# character on the wire, the drivers' receive and send buffer sizes.
_IDLE = const(0)
_BITS_PER_CHAR = const(11)
_MODBUS_RX_SIZE = const(29)
_FN_READ_INPUT = const(0x04)
_DLT645_OVERHEAD = const(12)
_DLT645_RX_SIZE = const(28)
_DLT645_TX_SIZE = const(24)

# S0 (facts section 5). A pulse is >= 30 ms (IEC 62053-31). From edge times: 30 ms less 2 ms of
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


def modbus(uart, de, model, baud, address=1, timeout_ms=200, poll_interval_ms=1000):
    """A modbus_meter.ModbusMeter (DDSU666, SDM120, SDM630). model and address: checked by
    wiring.make_meter. timeout_ms: how long the meter may take to start answering; 200 ms is our
    choice (meters answer within tens of ms, sims after 30 ms), not from a datasheet."""
    import modbus_meter

    m = modbus_meter.ModbusMeter()
    m.name = model
    _rs485(m, uart, de, baud, timeout_ms, poll_interval_ms, _MODBUS_RX_SIZE)
    m.address = address
    m._blocks = modbus_meter.MODELS[model]
    m._tx = bytearray(8)
    m.function = _FN_READ_INPUT
    # DDSU666: 0x04 or 0x03, found out on the bus (docs/meters.md); the others: 0x04 only.
    m._function_known = model != "ddsu666"
    m._silent_cycles = 0
    return m


def dlt645(uart, de=None, address=None, baud=2400, timeout_ms=500, poll_interval_ms=1000, wake=4):
    """A dlt645.Dlt645Meter. 2400 baud 8E1 is the common setting (facts section 5). timeout_ms:
    DL/T 645-2007 lets the meter take up to 500 ms to answer (UNCONFIRMED, not in the facts
    file). address: the meter number (12 digits), None: learnt on the bus. wake: FE bytes sent
    before a request."""
    import dlt645 as dlt

    m = dlt.Dlt645Meter()
    _rs485(m, uart, de, baud, timeout_ms, poll_interval_ms, _DLT645_RX_SIZE)
    if not 0 <= wake <= 4:
        raise ValueError("dlt645: wake must be 0..4 FE bytes")
    m.address = None if address is None else dlt.address_bytes(address)
    m._wake = wake
    m._tx = bytearray(_DLT645_TX_SIZE)
    # the two request lengths, as views made once
    m._tx_read = memoryview(m._tx)[:wake + _DLT645_OVERHEAD + 4]
    m._tx_learn = memoryview(m._tx)[:wake + _DLT645_OVERHEAD]
    m._di = None
    return m


def s0(pin, imp_per_kwh=1000, active_low=True, debounce_ms=None, rearm_ms=_REARM_MS,
       stuck_ms=_STUCK_MS, poll_interval_ms=1000, start_wh=0, use_irq=None):
    """An s0_meter.S0Meter on `pin`. use_irq: counted from pin-interrupt edge times (None: if
    the pin has irq()); debounce_ms None: the pulse's minimum as the edges or the polls see it."""
    import s0_meter

    m = s0_meter.S0Meter()
    base(m)
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


def base(m):
    """meter.MeterBase's state, every driver's first: no reading, no error, every counter at 0.
    Returns `m`."""
    m.reading = None
    m.last_error = None
    m.errors = dict.fromkeys(meter.KINDS, 0)
    m.epoch = 0
    m._suspect = None
    m._pending = None
    m._ep_bad = 0
    m._ep_reset()
    return m


def _rs485(m, uart, de, baud, timeout_ms, poll_interval_ms, rx_size):
    """meter.Rs485Meter's state: the bus, idle; DE low (None: the transceiver switches by itself)."""
    base(m)
    m._uart = uart
    m._de = de
    m._baud = baud
    m._timeout_ms = timeout_ms
    m._interval_ms = poll_interval_ms
    # Modbus RTU: frames separated by >= 3.5 character times (facts section 5); also kept on
    # DL/T 645 so a late reply to an abandoned request never merges with the next one.
    m._gap_ms = (35 * _BITS_PER_CHAR * 1000 + 10 * baud - 1) // (10 * baud)
    m._rx = bytearray(rx_size)
    m._chunk = bytearray(rx_size)
    m._n = 0
    m._reply_max = rx_size
    m._state = _IDLE
    m._cycle_at = None
    m._quiet_at = None
    m._t_end = 0
    m._step = 0
    m._e = m._v = m._i = m._p = None
    m._asks_energy = False
    m._e_at = 0
    if de is not None:
        de.value(0)
