"""DL/T 645-2007 master (facts section 5): the Chinese meter protocol on RS-485.

Frame: [FE FE FE FE] 68 A0..A5 68 C L data CS 16; address BCD least significant byte first;
data bytes +0x33 on the wire; CS = sum from the first 68 to the last data byte, mod 256.
"""
from micropython import const

from meter import MeterError, Rs485Meter

_WAKE = const(0xFE)
_START = const(0x68)
_END = const(0x16)
_OFFSET = const(0x33)  # added to every data byte on the wire
_C_READ = const(0x11)
_C_READ_ADDRESS = const(0x13)
_C_REPLY = const(0x80)  # direction bit: slave to master (0x91, 0x93)
_C_ERROR = const(0x40)  # abnormal reply flag (0xD1)
_HEADER = const(10)  # 68 A0..A5 68 C L
_OVERHEAD = const(12)  # header + CS + 16
_MAX_WAKE = const(8)  # FE bytes a reply may start with (meters send 0..4)
_RX_SIZE = const(_MAX_WAKE + _OVERHEAD + 8)  # longest reply read here: DI (4) + 4 data bytes

_BROADCAST = const(0xAA)  # every address byte AA: all meters

# Data identifiers (facts section 5).
DI_ENERGY = const(0x00010000)  # forward active energy total, 4 bytes XXXXXX.XX kWh
DI_VOLTAGE_A = const(0x02010100)  # phase A voltage, 2 bytes XXX.X V
DI_CURRENT_A = const(0x02020100)  # phase A current, 3 bytes XXX.XXX A, sign in top bit
DI_POWER = const(0x02030000)  # total active power, 3 bytes XX.XXXX kW, sign in top bit

# DI -> (value bytes, signed)
_FORMATS = {
    DI_ENERGY: (4, False),
    DI_VOLTAGE_A: (2, False),
    DI_CURRENT_A: (3, True),
    DI_POWER: (3, True),
    None: (6, False),  # read-address reply: the address
}

def address_bytes(address):
    """Wire-order address (A0 first) from 6 bytes, or from the 12 nameplate digits (A5 first)."""
    if isinstance(address, str):
        if len(address) != 12 or not address.isdigit():
            raise ValueError("dlt645: address must be 12 digits")
        digits = address
        address = bytearray(6)
        for k in range(6):  # nameplate "000012345678" -> 78 56 34 12 00 00
            address[k] = int(digits[10 - 2 * k:12 - 2 * k], 16)
    if len(address) != 6 or not _is_bcd(address, 0, 6):
        raise ValueError("dlt645: address must be 6 BCD bytes")
    return bytes(address)


def _is_bcd(buf, start, end):
    while start < end:
        if buf[start] >> 4 > 9 or buf[start] & 0xF > 9:
            return False
        start += 1
    return True


def checksum(buf, start, end):
    """Sum of buf[start:end] mod 256."""
    s = 0
    while start < end:
        s += buf[start]
        start += 1
    return s & 0xFF


def build_request(buf, address, di=None, wake=4):
    """Write `wake` FE bytes and a request into buf; returns its length. With a DI: read it
    (0x11) from `address`; without: the broadcast read-address (0x13 to AA..AA), which only
    works with a single meter on the bus."""
    for k in range(wake):
        buf[k] = _WAKE
    buf[wake] = _START
    for k in range(6):
        buf[wake + 1 + k] = _BROADCAST if di is None else address[k]
    buf[wake + 7] = _START
    buf[wake + 8] = _C_READ_ADDRESS if di is None else _C_READ
    end = wake + _HEADER
    if di is not None:
        for k in range(4):  # DI least significant byte first, each +0x33
            buf[end] = ((di >> (8 * k)) + _OFFSET) & 0xFF
            end += 1
    buf[wake + 9] = end - wake - _HEADER
    buf[end] = checksum(buf, wake, end)
    buf[end + 1] = _END
    return end + 2


def frame_length(buf, n):
    """Total length (with leading FE) of the reply in buf[0:n], 0 if not known yet."""
    pos = 0
    while pos < n and buf[pos] == _WAKE:
        pos += 1
    if pos > _MAX_WAKE:
        raise MeterError("garbage", "dlt645: too many wake-up bytes")
    if pos == n:
        return 0
    if buf[pos] != _START:
        raise MeterError("garbage", "dlt645: frame starts with 0x%02x, not 0x68" % buf[pos])
    if n - pos < _HEADER:
        return 0
    if buf[pos + 7] != _START:
        raise MeterError("garbage", "dlt645: no second 0x68")
    return pos + _OVERHEAD + buf[pos + 9]


def parse_reply(buf, n, address, di):
    """Check buf[0:n] as the reply to build_request(..., address, di). Returns the value as a
    signed integer in the DI's units (0.01 kWh, 0.1 V, 0.001 A, 0.0001 kW), or for di=None
    the meter's address (6 bytes). Raises MeterError only."""
    total = frame_length(buf, n)
    if total == 0 or total != n:
        raise MeterError("partial" if total == 0 or total > n else "garbage",
                         "dlt645: frame of %d bytes, header says %d" % (n, total))
    start = 0
    while buf[start] == _WAKE:
        start += 1
    if buf[n - 1] != _END:
        raise MeterError("garbage", "dlt645: frame ends with 0x%02x, not 0x16" % buf[n - 1])
    cs = checksum(buf, start, n - 2)
    if buf[n - 2] != cs:
        raise MeterError("crc", "dlt645: checksum 0x%02x != 0x%02x" % (buf[n - 2], cs))
    data = start + _HEADER
    length = buf[start + 9]
    for k in range(6):
        if di is not None and buf[start + 1 + k] != address[k]:
            raise MeterError("wrong_address", "dlt645: reply from %s, expected %s" % (
                _nameplate(buf, start + 1), _nameplate(address, 0)))
    control = buf[start + 8]
    asked = _C_READ_ADDRESS if di is None else _C_READ
    if control == asked | _C_REPLY | _C_ERROR:
        # the error byte's meaning per bit is not in the facts file: shown as a number
        raise MeterError("exception_reply", "dlt645: error reply 0x%02x, code 0x%02x" % (
            control, ((buf[data] - _OFFSET) & 0xFF) if length else 0))
    if control != asked | _C_REPLY:
        raise MeterError("garbage", "dlt645: control 0x%02x, expected 0x%02x" % (
            control, asked | _C_REPLY))
    size, signed = _FORMATS[di]
    if di is not None:
        size += 4  # the DI comes first
    if length != size:
        raise MeterError("garbage", "dlt645: data length %d, expected %d" % (length, size))
    raw = bytearray(length)  # data with the 0x33 removed
    for k in range(length):
        raw[k] = (buf[data + k] - _OFFSET) & 0xFF
    if di is None:
        if raw != buf[start + 1:start + 7] or not _is_bcd(raw, 0, 6):
            raise MeterError("garbage", "dlt645: address in the data is not the header's")
        return bytes(raw)
    if raw[0] | raw[1] << 8 | raw[2] << 16 | raw[3] << 24 != di:
        raise MeterError("garbage", "dlt645: reply for another DI than 0x%08x" % di)
    negative = signed and raw[length - 1] & 0x80
    if negative:
        raw[length - 1] &= 0x7F  # sign in the top bit
    if not _is_bcd(raw, 4, length):
        raise MeterError("garbage", "dlt645: value of DI 0x%08x is not BCD" % di)
    value = 0
    for k in range(length - 1, 3, -1):  # most significant byte last
        value = value * 100 + (raw[k] >> 4) * 10 + (raw[k] & 0xF)
    return -value if negative else value


def _nameplate(addr, at):
    """A wire-order address as printed on the meter: A5 first."""
    return "%02x%02x%02x%02x%02x%02x" % (addr[at + 5], addr[at + 4], addr[at + 3],
                                         addr[at + 2], addr[at + 1], addr[at])


class Dlt645Meter(Rs485Meter):
    """DL/T 645-2007 meter, made by dlt645_setup.build; address given, or learnt by broadcast."""

    name = "dlt645"

    # One cycle: phase A voltage, phase A current, total power, total energy. Energy last: the
    # reading is stamped when its request goes out, the freshest the cycle can give.
    _DIS = (DI_VOLTAGE_A, DI_CURRENT_A, DI_POWER, DI_ENERGY)

    # Set by dlt645_setup.build (boot code, dropped after it; annotations only: no code on the board).
    address: "bytes | None"  # learnt on the bus when None
    _wake: int
    _tx: bytearray
    _tx_read: memoryview  # the two request lengths, as views made once
    _tx_learn: memoryview
    _di: "int | None"

    def identity(self):
        """DL/T 645: the address is the meter number on the nameplate (A5 first), its serial;
        "dlt645" alone while it is not learnt."""
        return "dlt645" if self.address is None else "dlt645:" + _nameplate(self.address, 0)

    def _request(self):
        self._reply_max = _RX_SIZE - _MAX_WAKE + 4  # a reply with 4 wake-up bytes
        # no address yet: learn it first, the reads follow in the same cycle
        self._di = None if self.address is None else self._DIS[self._step]
        self._asks_energy = self._di == DI_ENERGY
        build_request(self._tx, self.address, self._di, self._wake)
        return self._tx_learn if self._di is None else self._tx_read

    def _frame_len(self, buf, n):
        return frame_length(buf, n)

    def _take(self, buf, n):
        di = self._di
        value = parse_reply(buf, n, self.address, di)
        if di is None:
            self.address = value
            return False
        if di == DI_ENERGY:
            self._e = value * 10  # 0.01 kWh -> Wh; unsigned format, never negative
        elif di == DI_VOLTAGE_A:
            self._v = value / 10
        elif di == DI_CURRENT_A:
            self._i = value / 1000
        else:
            self._p = value / 10  # 0.0001 kW -> W
        self._step += 1
        return self._step == len(self._DIS)
