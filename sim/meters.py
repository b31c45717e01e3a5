"""Behavioural simulated energy meters, shared by the host tests and the simulator.

RS-485 sims: handle(request) -> reply bytes or None, reply_delay_ms for the channel. `world`
has float attributes energy_wh, voltage_v, current_a, power_w, read at call time. Set
`sim.fault` to one of FAULTS (S0: S0_FAULTS), None = healthy.
"""
# No code shared with firmware/ (own CRC, checksum, BCD): a sim that shared the code under
# test would prove nothing. Runs on CPython and the MicroPython unix port.
import struct
import time

FAULTS = ("silent", "garbage", "bad_crc", "partial", "wrong_address", "exception", "reboot",
          "backwards", "jump", "zeros", "huge")
# Register faults: "reboot": the meter restarted, its register counts on from 0 (and stays
# restarted when the fault is cleared); "zeros": every value reads 0 while it lasts, then the
# register is back (a meter answering before it loaded its registers); "backwards": each
# reply BACKWARDS_WH lower than the one before; "jump": each reply JUMP_WH further ahead;
# "huge": power at its format's maximum (float32 3.4e38 W or kW, DL/T 645 79.9999 kW).
# S0 faults: "silent" (output dead, pulses lost), "stuck" (output stuck active),
# "garbage" (5 ms spikes every 100 ms besides the real pulses).
S0_FAULTS = ("silent", "stuck", "garbage")

BACKWARDS_WH = 5  # "backwards": this much lower at each reply (> 0 in short sessions)
HUGE = 3.4e38  # "huge": a float32 just below its maximum (3.4028235e38)
JUMP_WH = 1000000  # "jump": 1 MWh ahead


# plain CPython (no test shims) has no ticks_diff: plain differences there
_diff = getattr(time, "ticks_diff", None) or (lambda a, b: a - b)


class _Rs485Sim:
    """What both RS-485 sims share: the fault switch, a request counter, reply delay, garbage."""

    reply_delay_ms = 30

    def __init__(self, world, seed):
        self.world = world
        self.fault = None
        self.requests = 0  # requests addressed to this meter
        self._seed = seed or 1

    def _garbage(self, most):
        """3..most bytes from xorshift32: the same garbage on CPython and MicroPython."""
        out = bytearray()
        x = self._seed
        while len(out) < 3 + self._seed % (most - 2):
            x ^= (x << 13) & 0xFFFFFFFF
            x ^= x >> 17
            x ^= (x << 5) & 0xFFFFFFFF
            out.append(x & 0xFF)
        self._seed = x
        return bytes(out)


# ---------------------------------------------------------------------------- Modbus RTU

def _crc_table():
    # CRC-16/MODBUS, reflected polynomial 0xA001: one entry per byte value, low byte first
    table = bytearray(512)  # bytes, not a list of ints: 0.5 KiB on a small heap
    for value in range(256):
        crc = value
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table[2 * value] = crc & 0xFF
        table[2 * value + 1] = crc >> 8
    return table


_CRC_TABLE = _crc_table()


def modbus_crc(data):
    crc = 0xFFFF
    for b in data:
        k = 2 * ((crc ^ b) & 0xFF)
        crc = (crc >> 8) ^ (_CRC_TABLE[k] | _CRC_TABLE[k + 1] << 8)
    return crc


def _with_crc(body):
    crc = modbus_crc(body)
    return bytes(body) + bytes([crc & 0xFF, crc >> 8])


class ModbusMeterSim(_Rs485Sim):
    """Chint DDSU666, Eastron SDM120 or SDM630 answering function 0x04 with float32 values."""

    def __init__(self, world, model="ddsu666", address=1, phases=3):
        if model not in ("ddsu666", "sdm120", "sdm630"):
            raise ValueError("unknown model " + str(model))
        super().__init__(world, address * 2654435761 & 0xFFFFFFFF)
        self.model = model
        self.address = address
        self.phases = phases  # SDM630: lines carrying world.current_a
        self.exception_code = 4  # server device failure
        # DDSU666 units answer 0x04, 0x03 or both (installers report each); the others 0x04.
        # A function not in here: exception 1 (illegal function), or no reply if wrong_function
        # is "silent" (some units ignore it).
        self.functions = (0x03, 0x04) if model == "ddsu666" else (0x04,)
        self.wrong_function = "exception"
        self._shown_wh = None  # energy shown by the last healthy reply
        self._zero_wh = None  # "reboot": world energy when the register restarted from 0
        self._off_wh = 0  # "backwards" (< 0) / "jump" (> 0): offset of the next reply

    def _energy_wh(self, read):
        """The register as shown now; read: a reply shows it (the faults move on)."""
        w = self.world
        fault = self.fault
        if fault == "reboot" and self._zero_wh is None:
            self._zero_wh = w.energy_wh
        e_wh = w.energy_wh if self._zero_wh is None else w.energy_wh - self._zero_wh
        if fault == "zeros":
            return 0.0
        if fault == "backwards" and self._shown_wh is not None:
            if read:
                self._off_wh -= BACKWARDS_WH
            return max(0.0, self._shown_wh + self._off_wh)
        if fault == "jump":
            if read:
                self._off_wh += JUMP_WH
            return e_wh + self._off_wh
        if read:
            self._off_wh = 0
            if fault is None:
                self._shown_wh = e_wh
        return e_wh

    def registers(self, read_energy=False):
        """First register of each float32 -> value, as the meter would show it now."""
        w = self.world
        e_wh = self._energy_wh(read_energy)
        if self.fault == "zeros":
            v = i = p = 0.0
        else:
            v, i, p = w.voltage_v, w.current_a, w.power_w
        p_kw = HUGE if self.fault == "huge" else p / 1000.0
        if self.fault == "huge":
            p = HUGE
        kwh = e_wh / 1000.0
        if self.model == "ddsu666":
            # power in kW on this meter
            return {0x2000: v, 0x2002: i, 0x2004: p_kw, 0x4000: kwh, 0x400A: 0.0}
        if self.model == "sdm120":
            return {0x0000: v, 0x0006: i, 0x000C: p, 0x0048: kwh, 0x004A: 0.0, 0x0156: kwh}
        n = self.phases
        regs = {0x0034: p, 0x0048: kwh, 0x004A: 0.0, 0x0156: kwh}
        for line in range(3):
            on = line < n
            regs[0x0000 + 2 * line] = v
            regs[0x0006 + 2 * line] = i if on else 0.0
            regs[0x000C + 2 * line] = p / n if on else 0.0
        return regs

    def _exception(self, function, code):
        return _with_crc(bytes([self.address, function | 0x80, code]))

    def handle(self, request):
        req = bytes(request)
        if len(req) != 8 or modbus_crc(req[:6]) != req[6] | (req[7] << 8):
            return None  # a slave ignores a frame it cannot check
        if req[0] != self.address:
            return None
        self.requests += 1
        fault = self.fault
        if fault == "silent":
            return None
        if fault == "garbage":
            return self._garbage(24)
        function = req[1]
        start = (req[2] << 8) | req[3]
        count = (req[4] << 8) | req[5]
        if fault == "exception":
            return self._exception(function, self.exception_code)
        # DDSU666 answers 0x03 on the same map too (facts section 5); Eastron only 0x04 here.
        if function not in self.functions:
            return None if self.wrong_function == "silent" else self._exception(function, 1)
        if not 1 <= count <= 125:
            return self._exception(function, 3)
        energy_reg = 0x4000 if self.model == "ddsu666" else 0x0048
        regs = self.registers(start <= energy_reg < start + count)
        data = bytearray()
        for reg in range(start, start + count):
            if reg in regs:
                data += struct.pack(">f", regs[reg])[:2]
            elif reg - 1 in regs:
                data += struct.pack(">f", regs[reg - 1])[2:]
            else:
                return self._exception(function, 2)
        address = self.address
        if fault == "wrong_address":
            address = self.address % 247 + 1
        reply = _with_crc(bytes([address, function, 2 * count]) + data)
        if fault == "bad_crc":
            reply = reply[:-1] + bytes([reply[-1] ^ 0x5A])
        elif fault == "partial":
            reply = reply[:len(reply) // 2]
        return reply


# ---------------------------------------------------------------------------- DL/T 645-2007

_DLT_BROADCAST = b"\xaa" * 6


def _dlt_frame(address, control, data, wake):
    body = bytearray(b"\x68" + address + b"\x68")
    body.append(control)
    body.append(len(data))
    for b in data:
        body.append((b + 0x33) & 0xFF)
    return b"\xfe" * wake + body + bytes([sum(body) & 0xFF, 0x16])


def _bcd(value, nbytes, signed=False):
    """Little-endian BCD of abs(value), saturated; sign in the top bit if signed."""
    mag = min(abs(int(value)), (8 if signed else 10) * 10 ** (2 * nbytes - 1) - 1)
    out = bytearray(nbytes)
    for k in range(nbytes):
        out[k] = (mag // 10 % 10) * 16 + mag % 10
        mag //= 100
    if signed and value < 0:
        out[nbytes - 1] |= 0x80
    return bytes(out)


class Dlt645MeterSim(_Rs485Sim):
    """A single-phase DL/T 645-2007 meter: energy, phase A voltage/current, total power."""

    def __init__(self, world, address=b"\x01\x00\x00\x00\x00\x00", wake=4):
        if len(address) != 6:
            raise ValueError("address must be 6 bytes, A0 first")
        super().__init__(world, 645 * 2654435761 & 0xFFFFFFFF)
        self.address = bytes(address)
        self.wake = wake  # FE bytes before each reply, as many meters send
        self.error_code = 0x01  # "exception" fault: error reply with "other error"
        self._shown_units = None  # energy (0.01 kWh) shown by the last healthy reply
        self._zero_wh = None  # "reboot": world energy when the register restarted from 0
        self._off_units = 0  # "backwards" (< 0) / "jump" (> 0): offset of the next reply

    def _value(self, di):
        """DI -> data bytes after the DI, or None for a DI this meter does not have."""
        w = self.world
        fault = self.fault
        if di == 0x00010000 or di == 0x00000000:
            if fault == "reboot" and self._zero_wh is None:
                self._zero_wh = w.energy_wh
            e_wh = w.energy_wh if self._zero_wh is None else w.energy_wh - self._zero_wh
            units = int(e_wh // 10)  # the register counts whole 0.01 kWh
            if fault == "zeros":
                units = 0
            elif fault == "backwards" and self._shown_units is not None:
                self._off_units -= max(1, BACKWARDS_WH // 10)  # whole 0.01 kWh
                units = max(0, self._shown_units + self._off_units)
            elif fault == "jump":
                self._off_units += JUMP_WH // 10
                units += self._off_units
            else:
                self._off_units = 0
                if fault is None:
                    self._shown_units = units
            return _bcd(units, 4)
        if fault == "zeros":
            w_v = w_i = w_p = 0.0
        else:
            w_v, w_i, w_p = w.voltage_v, w.current_a, w.power_w
            if fault == "huge":
                w_p = 1e8  # beyond the 3-byte BCD, which saturates at 79.9999 kW
        if di == 0x02010100:
            return _bcd(round(w_v * 10), 2)  # XXX.X V
        if di == 0x02020100:
            return _bcd(round(w_i * 1000), 3, True)  # XXX.XXX A
        if di == 0x02030000:
            return _bcd(round(w_p * 10), 3, True)  # XX.XXXX kW = 0.1 W steps
        return None

    def handle(self, request):
        req = bytes(request)
        i = 0
        while i < len(req) and req[i] == 0xFE:
            i += 1
        req = req[i:]
        if len(req) < 12 or req[0] != 0x68 or req[7] != 0x68 or req[-1] != 0x16:
            return None
        if len(req) != 12 + req[9] or sum(req[:-2]) & 0xFF != req[-2]:
            return None  # a meter ignores a frame it cannot check
        target = req[1:7]
        if target != self.address and target != _DLT_BROADCAST:
            return None
        self.requests += 1
        fault = self.fault
        if fault == "silent":
            return None
        if fault == "garbage":
            return self._garbage(30)
        control = req[8]
        data = bytearray(req[10:-2])
        for k in range(len(data)):
            data[k] = (data[k] - 0x33) & 0xFF
        address = self.address
        if fault == "wrong_address":
            address = bytes([address[0] ^ 0x11]) + address[1:]
        if control == 0x13 and not data:
            reply = _dlt_frame(address, 0x93, self.address, self.wake)
        elif control == 0x11 and len(data) == 4:
            di = data[0] | (data[1] << 8) | (data[2] << 16) | (data[3] << 24)
            value = None if fault == "exception" else self._value(di)
            if value is None:
                code = self.error_code if fault == "exception" else 0x02  # no requested data
                reply = _dlt_frame(address, 0xD1, bytes([code]), self.wake)
            else:
                reply = _dlt_frame(address, 0x91, data + value, self.wake)
        else:
            reply = _dlt_frame(address, (control | 0xC0) & 0xFF, b"\x01", self.wake)
        if fault == "bad_crc":
            reply = reply[:-2] + bytes([(reply[-2] + 1) & 0xFF, 0x16])
        elif fault == "partial":
            reply = reply[:len(reply) - 5]
        return reply


# ---------------------------------------------------------------------------- S0 pulses

class S0MeterSim:
    """An S0 output (IEC 62053-31): one pulse_ms pulse per 1/imp_per_kwh kWh.

    Pulses the meter owes are sent one after another with pause_ms (default pulse_ms) between,
    like a meter with a pulse buffer. level(now_us) must be called with non-decreasing times;
    it returns the pin level: active_low (pulled-up pin, opto to GND) gives 0 during a pulse.
    """

    def __init__(self, world, imp_per_kwh=1000, pulse_ms=50, active_low=True, pause_ms=None):
        self.world = world
        self.imp_per_kwh = imp_per_kwh
        self.pulse_ms = pulse_ms
        self.pause_ms = pulse_ms if pause_ms is None else pause_ms
        self.active_low = active_low
        self.fault = None
        self.pulses_sent = 0  # pulses that reached the output (not lost to "silent")
        self._sent = self._due()  # energy before the meter was watched gives no pulses
        self._on_since = None
        self._off_since = None  # set while the pause after a pulse runs
        self._t = None  # when level() was last evaluated, and what it gave
        self._shown = None

    def _due(self):
        return int(self.world.energy_wh * self.imp_per_kwh // 1000)

    def changes(self, now_us):
        """[(t_us, level)] of each change of the output since the last evaluation, up to now_us,
        each at the time it happens (a pulse's or pause's end, a garbage spike), for pin
        interrupts. The world's energy is taken as it is now for the whole interval."""
        out = []
        t = self._t
        if t is not None:
            while True:
                nxt = self._next_change(t)
                if nxt is None or nxt >= now_us:
                    break
                t = nxt
                before = self._shown
                if self.level(t) != before:
                    out.append((t, self._shown))
        before = self._shown
        if self.level(now_us) != before and before is not None:
            out.append((now_us, self._shown))
        return out

    def _next_change(self, t):
        if self.fault in ("stuck", "silent"):
            return None  # the output does not move (pulses owed are lost or wait)
        nxt = None
        if self._on_since is not None:
            nxt = self._on_since + self.pulse_ms * 1000
        elif self._off_since is not None:
            nxt = self._off_since + self.pause_ms * 1000
        if self.fault == "garbage" and self._on_since is None:
            ms = t // 1000
            phase = ms % 100
            spike = (ms - phase + (5 if phase < 5 else 100)) * 1000
            if nxt is None or spike < nxt:
                nxt = spike
        return nxt

    def level(self, now_us):
        self._t = now_us
        self._shown = self._level(now_us)
        return self._shown

    def _level(self, now_us):
        on = self._pulse(now_us)
        fault = self.fault
        if fault == "stuck":
            on = True
        elif fault == "silent":
            on = False
        elif fault == "garbage" and not on and (now_us // 1000) % 100 < 5:
            on = True
        if self.active_low:
            return 0 if on else 1
        return 1 if on else 0

    def _pulse(self, now_us):
        if self._on_since is not None:
            if _diff(now_us, self._on_since) < self.pulse_ms * 1000:
                return True
            self._on_since = None
            self._off_since = now_us
        if self._off_since is not None:
            if _diff(now_us, self._off_since) < self.pause_ms * 1000:
                return False
            self._off_since = None
        if self._sent < self._due():
            self._sent += 1
            if self.fault != "silent":
                self.pulses_sent += 1
            self._on_since = now_us
            return True
        return False
