"""Modbus RTU master for Chint DDSU666 and Eastron SDM120 / SDM630 (facts section 5).

Function 0x04 (read input registers; DDSU666: 0x04 or 0x03, whichever the meter answers),
IEEE-754 float32 big-endian, two registers per value.
The UART (baud, parity) is built by the wiring code; `baud` here only times the wire.
"""
from micropython import const
import struct

from meter import MeterError, Rs485Meter, MAX_WH

_FN_READ_INPUT = const(0x04)
_FN_READ_HOLDING = const(0x03)  # DDSU666: some answer only this one on the same map
# DDSU666 answers function 0x04 or 0x03, depending on the unit (installers report both; Tasmota
# reads 0x04, other tools 0x03). Until one gave a whole reading, the other is tried after an
# "illegal function" exception or after this many cycles in a row without a reply.
_SWITCH_AFTER_TIMEOUTS = const(2)
_EX_WRONG_SPACE = const((1, 2))  # exception codes: illegal function, illegal data address
_EXCEPTION_FLAG = const(0x80)  # exception reply: function code | 0x80, then the code
_MAX_FLOATS = const(6)  # largest block read below (SDM630 V1..V3, I1..I3)
_RX_SIZE = const(5 + 4 * _MAX_FLOATS)  # address, function, byte count, data, CRC (2)
# Largest float32 exponent (biased) of an energy register: 2**30 kWh > MAX_WH; above: garbage.
_MAX_EXP = const(127 + 30)

# Exception codes of the Modbus application protocol spec (only used in messages).
_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server busy",
}

# What each float of a block holds.
_SKIP = const(0)
_V = const(1)  # volts
_I = const(2)  # amps; several in one block: the highest phase current is kept
_P_W = const(3)  # watts
_P_KW = const(4)  # kilowatts (DDSU666)
_E_KWH = const(5)  # import active energy, kWh

# model -> blocks of (first register, what each float holds); addresses from facts section 5.
MODELS = {
    # Chint DDSU666: V 0x2000, I 0x2002, P 0x2004 in kW, import energy 0x4000 kWh.
    "ddsu666": ((0x2000, (_V, _I, _P_KW)), (0x4000, (_E_KWH,))),
    # Eastron SDM120: V 0x0000, I 0x0006, P 0x000C, import 0x0048. The registers in between
    # are not in the SDM120 map, so each value is read on its own (as Tasmota does).
    "sdm120": ((0x0000, (_V,)), (0x0006, (_I,)), (0x000C, (_P_W,)), (0x0048, (_E_KWH,))),
    # Eastron SDM630: V L1..L3 0x0000..0x0004, I L1..L3 0x0006..0x000A, total P 0x0034,
    # import 0x0048. Reading voltage is L1, current the highest phase.
    "sdm630": ((0x0000, (_V, _SKIP, _SKIP, _I, _I, _I)), (0x0034, (_P_W,)),
               (0x0048, (_E_KWH,))),
}


def crc16(buf, n):
    """CRC-16/MODBUS of buf[0:n]: reflected poly 0xA001, init 0xFFFF."""
    crc = 0xFFFF
    i = 0
    while i < n:
        crc ^= buf[i]
        bit = 0
        while bit < 8:
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
            bit += 1
        i += 1
    return crc


def build_request(buf, address, register, count, function):
    """Write a read request into buf[0:8]; returns 8."""
    buf[0] = address
    buf[1] = function
    buf[2] = register >> 8
    buf[3] = register & 0xFF
    buf[4] = count >> 8
    buf[5] = count & 0xFF
    crc = crc16(buf, 6)
    buf[6] = crc & 0xFF  # CRC goes low byte first
    buf[7] = crc >> 8
    return 8


def reply_length(buf, n, registers, function):
    """Total length of the reply in buf[0:n], 0 if not known yet. Raises MeterError."""
    if n < 2:
        return 0
    fn = buf[1]
    if fn == function | _EXCEPTION_FLAG:
        return 5
    if fn != function:
        raise MeterError("garbage", "modbus: reply function 0x%02x, expected 0x%02x" % (
            fn, function))
    if n < 3:
        return 0
    if buf[2] != 2 * registers:
        raise MeterError("garbage", "modbus: reply byte count %d, expected %d" % (
            buf[2], 2 * registers))
    return 5 + buf[2]


def check_reply(buf, n, address, registers, function):
    """Raise MeterError unless buf[0:n] is a good reply from `address` with `registers` regs."""
    if n < 5:
        raise MeterError("partial", "modbus: reply of %d bytes is too short" % n)
    if buf[1] == function and n < 5 + buf[2]:
        raise MeterError("partial", "modbus: reply of %d bytes, header says %d" % (n, 5 + buf[2]))
    got = buf[n - 2] | (buf[n - 1] << 8)
    crc = crc16(buf, n - 2)
    if got != crc:
        raise MeterError("crc", "modbus: crc 0x%04x != 0x%04x" % (got, crc))
    if buf[0] != address:
        raise MeterError("wrong_address", "modbus: reply from address %d, expected %d" % (
            buf[0], address))
    if buf[1] == function | _EXCEPTION_FLAG and n == 5:
        code = buf[2]
        raise MeterError("exception_reply", "modbus: exception 0x%02x (%s) from address %d" % (
            code, _EXCEPTION_NAMES.get(code, "unknown"), address))
    if buf[1] != function:
        raise MeterError("garbage", "modbus: reply function 0x%02x, expected 0x%02x" % (
            buf[1], function))
    if buf[2] != 2 * registers or n != 5 + 2 * registers:
        raise MeterError("garbage", "modbus: reply of %d bytes, byte count %d, expected %d" % (
            n, buf[2], 2 * registers))


def float_at(buf, index):
    """The index-th float32 (big-endian) of a checked reply. Raises MeterError if not finite."""
    value = struct.unpack_from(">f", buf, 3 + 4 * index)[0]
    if value - value != 0:  # NaN or infinity: a meter never means that
        raise MeterError("garbage", "modbus: value %d is not a number" % index)
    return value


def kwh_to_wh(buf, at):
    """The float32 (big-endian) kWh at buf[at:at+4] as whole Wh, rounded half up, from its bits
    with integer arithmetic: the same on the ESP32 (single-precision floats) as on a PC.
    Raises MeterError: not finite, negative or beyond meter.MAX_WH is garbage."""
    b0 = buf[at]
    b1 = buf[at + 1]
    exp = (b0 & 0x7F) << 1 | b1 >> 7
    mant = (b1 & 0x7F) << 16 | buf[at + 2] << 8 | buf[at + 3]
    if exp == 0xFF:
        raise MeterError("garbage", "modbus: energy is not a number")
    if b0 & 0x80 and (exp or mant):
        raise MeterError("garbage", "modbus: negative energy")
    if exp == 0:
        return 0  # zero or subnormal: below 1e-38 kWh
    if exp > _MAX_EXP:
        raise MeterError("garbage", "modbus: energy register beyond %d Wh" % MAX_WH)
    # value = (2**23 + mant) x 2**(exp - 150) kWh; Wh = value x 1000, + 1/2, floored.
    # Ints above 2**30 are heap objects on the ESP32: fine once a second, not in a loop.
    mant = (mant | 0x800000) * 1000
    shift = exp - 150
    if shift >= 0:
        wh = mant << shift
    elif shift < -35:
        return 0  # mant < 2**34: value x 1000 < 1/2
    else:
        wh = (mant + (1 << (-shift - 1))) >> -shift
    if wh > MAX_WH:
        raise MeterError("garbage", "modbus: energy register beyond %d Wh" % MAX_WH)
    return wh


class ModbusMeter(Rs485Meter):
    """DDSU666 / SDM120 / SDM630 on Modbus RTU, polled by poll(now_ms); made by meter_setup.modbus."""

    # Set by meter_setup.modbus (boot code, dropped after it; annotations only: no code on the board).
    address: int
    _blocks: tuple
    _tx: bytearray
    function: int  # what the meter is asked with
    # DDSU666: 0x04 or 0x03, found out on the bus (docs/meters.md); the others: 0x04 only.
    _function_known: bool
    _silent_cycles: int

    def identity(self):
        """The model and slave address: the Modbus models read here give no serial number."""
        return "modbus:%s@%d" % (self.name, self.address)

    def _request(self):
        register, fields = self._blocks[self._step]
        build_request(self._tx, self.address, register, 2 * len(fields), self.function)
        self._reply_max = 5 + 4 * len(fields)
        self._asks_energy = _E_KWH in fields
        return self._tx

    def _frame_len(self, buf, n):
        return reply_length(buf, n, 2 * len(self._blocks[self._step][1]), self.function)

    def _fail(self, err):
        super()._fail(err)
        if self._function_known:
            return
        if err.kind == "timeout":
            self._silent_cycles += 1
            switch = self._silent_cycles >= _SWITCH_AFTER_TIMEOUTS
        else:
            # Illegal function, or illegal data address: this map is not in that register space.
            switch = err.kind == "exception_reply" and self._rx[2] in _EX_WRONG_SPACE
        if switch:
            self._silent_cycles = 0
            self.function = _FN_READ_HOLDING if self.function == _FN_READ_INPUT else _FN_READ_INPUT

    def _publish(self, new):
        self._function_known = True  # a whole reading: this function it is, for good
        self._silent_cycles = 0
        return super()._publish(new)

    def _take(self, buf, n):
        fields = self._blocks[self._step][1]
        check_reply(buf, n, self.address, 2 * len(fields), self.function)
        i = 0
        while i < len(fields):
            what = fields[i]
            if what != _SKIP:
                x = float_at(buf, i)
                if what == _V:
                    self._v = x
                elif what == _I:
                    if self._i is None or x > self._i:
                        self._i = x
                elif what == _P_W:
                    self._p = x
                elif what == _P_KW:
                    self._p = x * 1000  # may overflow to inf on the ESP32: check_values() says garbage
                elif what == _E_KWH:
                    self._e = kwh_to_wh(buf, 3 + 4 * i)
            i += 1
        self._step += 1
        return self._step == len(self._blocks)
