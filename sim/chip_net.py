"""`socket` and `select` for the chip model (sim/chip_rom.py puts this module under both names):
an MQTT 3.1.1 broker inside the simulator, answering at once, so that a run with the MQTT link
is the same run every time. It takes the pile's packets (CONNACK, SUBACK, PUBACK, PINGRESP
back), records what the pile published, and delivers the scenario's commands (signed on the
host) at their times. Only what firmware/mqtt_conn.py and mqtt_link.py use."""
import errno

import world

POLLIN = 1
POLLOUT = 4
POLLERR = 8
POLLHUP = 16
AF_INET = 2
SOCK_STREAM = 1

BROKER = None  # the Broker of the run


def _remaining_length(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


class Broker:
    def __init__(self, commands):
        self.rx = b""  # from the pile, not yet a whole packet
        self.tx = b""  # to the pile
        self.commands = sorted(commands)  # [(at ms of the world, topic, payload)]
        self.events = []  # what happened since the iteration began (chip_rom reads and clears)
        self.pid = 1

    def take(self, data):
        # here, not at the top: this module must be `socket` before mqtt_conn is imported
        from mqtt_conn import fixed_header

        self.rx += data
        while True:
            buf = self.rx
            header = fixed_header(buf, len(buf))
            if header is None:
                return
            i, length = header
            if len(buf) < i + length:
                return
            self._packet(buf[0], buf[i:i + length])
            self.rx = buf[i + length:]

    def _packet(self, op, body):
        kind = op & 0xF0
        if kind == 0x10:
            self.tx += b"\x20\x02\x00\x00"
            self.events.append("connect")
        elif kind == 0x80:
            pos, codes = 2, 0
            while pos + 2 <= len(body):
                pos += 2 + (body[pos] << 8 | body[pos + 1]) + 1
                codes += 1
            self.tx += bytes((0x90, 2 + codes)) + body[:2] + b"\x01" * codes
            self.events.append("subscribe")
        elif kind == 0x30:
            n = body[0] << 8 | body[1]
            topic = body[2:2 + n].decode()
            if (op >> 1) & 3:
                self.tx += b"\x40\x02" + body[2 + n:4 + n]
            self.events.append("publish " + "/".join(topic.split("/")[3:]))
        elif kind == 0xC0:
            self.tx += b"\xd0\x00"
            self.events.append("ping")
        elif kind == 0x40:
            self.events.append("puback")

    def due(self, now_ms):
        while self.commands and now_ms >= self.commands[0][0]:
            _, topic, payload = self.commands.pop(0)
            topic = topic.encode()
            body = bytes((len(topic) >> 8, len(topic) & 0xFF)) + topic + bytes(
                (self.pid >> 8, self.pid & 0xFF)) + payload
            self.pid += 1
            self.tx += b"\x32" + _remaining_length(len(body)) + body
            self.events.append("command delivered")


def getaddrinfo(host, port, *args):
    return [(AF_INET, SOCK_STREAM, 0, "", (host, port))]


class socket:
    def __init__(self, *args):
        self.closed = False

    def setblocking(self, flag):
        pass

    def settimeout(self, t):
        pass

    def connect(self, addr):
        raise OSError(errno.EINPROGRESS)

    def write(self, buf):
        data = bytes(buf)
        BROKER.take(data)
        return len(data)

    send = write

    def readinto(self, buf, n=-1):
        tx = BROKER.tx
        if not tx:
            return None
        k = min(len(buf) if n < 0 else n, len(tx))
        buf[:k] = tx[:k]
        BROKER.tx = tx[k:]
        BROKER.events.append("received %d B" % k)
        return k

    def close(self):
        self.closed = True


class poll:
    def __init__(self):
        self._socks = []

    def register(self, sock, mask=POLLIN | POLLOUT):
        self.unregister(sock)
        self._socks.append((sock, mask))

    def modify(self, sock, mask):
        self.register(sock, mask)

    def unregister(self, sock):
        self._socks = [(s, m) for s, m in self._socks if s is not sock]

    def poll(self, timeout=-1):
        BROKER.due(world.WORLD.advance() // 1000)
        out = []
        for sock, mask in self._socks:
            ev = mask & POLLOUT
            if mask & POLLIN and BROKER.tx:
                ev |= POLLIN
            if ev:
                out.append((sock, ev))
        return out
