"""The simulated RS-485 pair between the pile's UART (with its DE pin) and one simulated meter
(`device.handle(request) -> reply`, answering `device.reply_delay_ms` after the request's last
bit). The one bus fake: the simulator's (world.py, on MicroPython) and the meter tests' (CPython).

Bytes take bits/baud each. As with a real transceiver whose RE follows DE, a frame written while
DE is low never reaches the bus and reply bytes that arrive while DE is still high are lost.
`violation(kind, text)` hears of those, of DE lowered while a frame is still on the wire and of
a write over a frame or a reply still on the wire. Times are in the owner's unit: `per_ms` of it
make a millisecond (the world counts us, the meter tests ms).
"""


# Room made up front for the bytes received and those still on the wire (the ESP32's UART driver
# keeps a 256-byte ring outside the heap): on MicroPython the buffers are made once, with the
# world, and reused, never grown in the middle of the firmware's heap (a longer reply still fits:
# they grow then). Reply bytes on the wire are a bytearray and a list of small ints, no tuple each.
RX_ROOM = 256
WIRE_ROOM = 64


def _room(buf, n):
    """buf emptied, its room for n items kept (a slice assignment never shrinks it)."""
    buf[0:n] = buf[0:0]
    return buf


class Line:
    def __init__(self, device, char_time, per_ms):
        self.device = device
        self.char_time = char_time  # one character on the wire
        self.per_ms = per_ms
        self.rx = _room(bytearray(RX_ROOM), RX_ROOM)
        self.pending = _room(bytearray(WIRE_ROOM), WIRE_ROOM)  # reply bytes still on the wire ...
        self.pending_at = _room([0] * WIRE_ROOM, WIRE_ROOM)  # ... and when each arrives
        self.tx_end = -1

    def de_at(self, t):
        """DE's level at time t: 1, 0, or None (no DE pin: the transceiver turns by itself)."""
        return None

    def violation(self, kind, text):
        pass

    def _ms(self, t):
        return "%.1f ms" % (t / self.per_ms)

    def write(self, data, now):
        if self.de_at(now) == 0:
            self.violation("de_low", "write at %s with DE low: never sent" % self._ms(now))
            return len(data)
        if now < self.tx_end:
            self.violation("overlap", "write at %s over a frame until %s"
                           % (self._ms(now), self._ms(self.tx_end)))
        if self.pending:
            self.violation("overlap", "write at %s while a reply is coming in" % self._ms(now))
        end = now + len(data) * self.char_time
        self.tx_end = end
        self.sent(now, end, data)
        reply = self.device.handle(data)
        if reply:
            t = end + getattr(self.device, "reply_delay_ms", 30) * self.per_ms
            if isinstance(self.per_ms, int):
                t = int(t)
            for b in reply:
                t += self.char_time
                self.pending.append(b)
                self.pending_at.append(t)
        return len(data)

    def sent(self, start, end, data):
        """A frame went onto the wire."""

    def de_set(self, level, now):
        """The pile set DE (the tests' DE pin reports here)."""
        if not level and now < self.tx_end:
            self.violation("de_lowered", "DE lowered at %s, frame on the wire until %s"
                           % (self._ms(now), self._ms(self.tx_end)))

    def deliver(self, now):
        n = 0
        while n < len(self.pending) and self.pending_at[n] <= now:
            n += 1
        if not n:
            return
        lost = 0
        for k in range(n):
            if self.de_at(self.pending_at[k]) == 1:
                lost += 1
            else:
                self.rx.append(self.pending[k])
        if lost:
            self.violation("reply_lost", "%d reply byte(s) lost by %s: DE still high" % (lost, self._ms(now)))
        self.pending[0:n] = b""
        del self.pending_at[0:n]  # a slice deleted in place: the room stays

    def take(self, n):
        if n is None or n < 0 or n > len(self.rx):
            n = len(self.rx)
        data = bytes(self.rx) if n == len(self.rx) else bytes(self.rx[:n])
        self.rx[0:n] = b""  # in place: no new buffer at each read
        return data


class UartChannel(Line):
    """The world's bus (times in us); DE is the world's pin `pin_de`, if it has one."""

    _LOGGED = {"de_low": "frame written with DE low: never sent",
               "reply_lost": "reply arrived while DE was high: lost"}

    def __init__(self, world, device, baud=9600, bits_per_char=11):
        super().__init__(device, bits_per_char * 1000000 // baud, 1000)
        self.world = world
        self.frames_lost = 0

    def de_at(self, t):
        w = self.world
        if w.pin_de is None:
            return None
        return 1 if w.pins.get(w.pin_de, 0) == 1 else 0

    def violation(self, kind, text):
        said = self._LOGGED.get(kind)
        if said is not None:
            self.frames_lost += 1
            self.world.log("rs485", said)
