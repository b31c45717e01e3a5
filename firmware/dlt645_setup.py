"""At boot: a DL/T 645 meter driver made, its state set (dlt645.py has no __init__: its bytecode
would stay on the heap for the run; meter_setup.py sets the common part).

Only the boot makes the meter (wiring.make_meter), so this runs once and wiring.py drops it at
once, with meter_setup.py (issue 12).
"""
from micropython import const

import meter_setup

# dlt645.py's (a test keeps them one): a frame's header, checksum and end; the receive buffer;
# the send buffer (its wake-up bytes, the overhead, a data identifier).
_OVERHEAD = const(12)
_RX_SIZE = const(28)
_TX_SIZE = const(24)


def build(uart, de=None, address=None, baud=2400, timeout_ms=500, poll_interval_ms=1000, wake=4):
    """A dlt645.Dlt645Meter. 2400 baud 8E1 is the common setting (facts section 5). timeout_ms:
    DL/T 645-2007 lets the meter take up to 500 ms to answer (UNCONFIRMED, not in the facts
    file). address: the meter number (12 digits), None: learnt on the bus. wake: FE bytes sent
    before a request."""
    import dlt645  # optional (test_firmware_layout.py): only on this driver's pile

    m = dlt645.Dlt645Meter()
    meter_setup.rs485(m, uart, de, baud, timeout_ms, poll_interval_ms, _RX_SIZE)
    if not 0 <= wake <= 4:
        raise ValueError("dlt645: wake must be 0..4 FE bytes")
    m.address = None if address is None else dlt645.address_bytes(address)
    m._wake = wake
    m._tx = bytearray(_TX_SIZE)
    # the two request lengths, as views made once
    m._tx_read = memoryview(m._tx)[:wake + _OVERHEAD + 4]
    m._tx_learn = memoryview(m._tx)[:wake + _OVERHEAD]
    m._di = None
    return m
