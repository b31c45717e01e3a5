"""Simulated RS-485 bus between the pile's UART and one simulated meter."""


class UartChannel:
    """Half-duplex link to one simulated meter (`device.handle(request) -> reply`).

    A frame written while DE is low never reaches the bus; reply bytes that arrive while DE is
    still high are lost, as with a real transceiver whose RE follows DE.
    """

    def __init__(self, world, device, baud=9600, bits_per_char=11):
        self.world = world
        self.device = device
        self.char_us = bits_per_char * 1000000 // baud
        self.rx = bytearray()
        self.pending = []  # (arrival time in us, byte)
        self.frames_lost = 0

    def _de_high(self):
        w = self.world
        return w.pin_de is not None and w.pins.get(w.pin_de, 0) == 1

    def write(self, data, now):
        if self.world.pin_de is not None and not self._de_high():
            self.frames_lost += 1
            self.world.log("rs485", "frame written with DE low: never sent")
            return len(data)
        reply = self.device.handle(data)
        if reply:
            t = now + len(data) * self.char_us + int(getattr(self.device, "reply_delay_ms", 30) * 1000)
            for b in reply:
                t += self.char_us
                self.pending.append((t, b))
        return len(data)

    def deliver(self, now):
        n = 0
        while n < len(self.pending) and self.pending[n][0] <= now:
            n += 1
        if not n:
            return
        if self._de_high():
            self.frames_lost += 1
            self.world.log("rs485", "reply arrived while DE was high: lost")
        else:
            self.rx.extend(bytes(b for _, b in self.pending[:n]))
        del self.pending[:n]

    def take(self, n):
        if n is None or n < 0 or n > len(self.rx):
            n = len(self.rx)
        data = bytes(self.rx[:n])
        self.rx = self.rx[n:]
        return data
