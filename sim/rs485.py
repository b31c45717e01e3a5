"""The simulated RS-485 pair between the pile's UART (with its DE pin) and one simulated meter
(`device.handle(request) -> reply`, answering `device.reply_delay_ms` after the request's last
bit). The one bus fake: the simulator's (world.py, on MicroPython) and the meter tests' (CPython).

Bytes take bits/baud each. As with a real transceiver whose RE follows DE, a frame written while
DE is low never reaches the bus and reply bytes that arrive while DE is still high are lost.
`violation(kind, text)` hears of those, of DE lowered while a frame is still on the wire and of
a write over a frame or a reply still on the wire. Times are in the owner's unit: `per_ms` of it
make a millisecond (the world counts us, the meter tests ms).
"""


class Line:
    def __init__(self, device, char_time, per_ms):
        self.device = device
        self.char_time = char_time  # one character on the wire
        self.per_ms = per_ms
        self.rx = bytearray()
        self.pending = []  # (arrival time, byte) of reply bytes still on the wire
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
                self.pending.append((t, b))
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
        while n < len(self.pending) and self.pending[n][0] <= now:
            n += 1
        if not n:
            return
        lost = 0
        for when, b in self.pending[:n]:
            if self.de_at(when) == 1:
                lost += 1
            else:
                self.rx.append(b)
        if lost:
            self.violation("reply_lost", "%d reply byte(s) lost by %s: DE still high" % (lost, self._ms(now)))
        del self.pending[:n]

    def take(self, n):
        if n is None or n < 0 or n > len(self.rx):
            n = len(self.rx)
        data = bytes(self.rx[:n])
        self.rx = self.rx[n:]
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
