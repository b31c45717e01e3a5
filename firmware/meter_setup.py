"""At boot: a Modbus meter driver made, its state set, and every driver's common state (base,
rs485: meter.py, modbus_meter.py, dlt645.py and s0_meter.py have no __init__, their bytecode
would stay on the heap for the run). dlt645_setup.py and s0_setup.py make those drivers: each
module's names are interned when it loads, for good, so one pile loads only its driver's.

Only the boot makes the meter (wiring.make_meter, which checks the arguments first), so this runs
once and wiring.py drops it at once, before the link's modules load (issue 12): its bytes are not
on the heap for the run. What an attribute means is said where the driver uses it (the class
annotations).
"""
from micropython import const

import meter

# meter.py's and modbus_meter.py's (a test keeps them one): Rs485Meter's idle state, the bits of
# a character on the wire, the Modbus receive buffer, its first function code.
_IDLE = const(0)
_BITS_PER_CHAR = const(11)
_MODBUS_RX_SIZE = const(29)
_FN_READ_INPUT = const(0x04)


def modbus(uart, de, model, baud, address=1, timeout_ms=200, poll_interval_ms=1000):
    """A modbus_meter.ModbusMeter (DDSU666, SDM120, SDM630). model and address: checked by
    wiring.make_meter. timeout_ms: how long the meter may take to start answering; 200 ms is our
    choice (meters answer within tens of ms, sims after 30 ms), not from a datasheet."""
    import modbus_meter

    m = modbus_meter.ModbusMeter()
    m.name = model
    rs485(m, uart, de, baud, timeout_ms, poll_interval_ms, _MODBUS_RX_SIZE)
    m.address = address
    m._blocks = modbus_meter.MODELS[model]
    m._tx = bytearray(8)
    m.function = _FN_READ_INPUT
    # DDSU666: 0x04 or 0x03, found out on the bus (docs/meters.md); the others: 0x04 only.
    m._function_known = model != "ddsu666"
    m._silent_cycles = 0
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


def rs485(m, uart, de, baud, timeout_ms, poll_interval_ms, rx_size):
    """meter.Rs485Meter's state (`m` a driver of it): the bus, idle; DE low (None: the
    transceiver switches by itself)."""
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
