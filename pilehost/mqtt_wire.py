"""MQTT on the wire (mqtt_packets), and a TCP relay on 127.0.0.1 between the pile and the broker,
for the tests, the soak and the bench: it can be taken away (down/up), swallow everything
(hole/mend), count the bytes and look at each MQTT packet on its way (a subclass's `packet()`).
"""
import socket
import threading

from .procs import free_port


def mqtt_packets(buf):
    """The complete MQTT packets at the front of buf, and the bytes left after them: for the
    relays that look into the pile's traffic (MQTT 3.1.1 section 2.2: a fixed header byte, then
    the remaining length in 1-4 bytes of 7 bits)."""
    out = []
    while len(buf) >= 2:
        length = shift = 0
        i = 1
        while True:
            if i >= len(buf) or i > 4:
                return out, buf
            length |= (buf[i] & 0x7F) << shift
            i += 1
            if not buf[i - 1] & 0x80:
                break
            shift += 7
        if len(buf) < i + length:
            break
        out.append(buf[:i + length])
        buf = buf[i + length:]
    return out, buf


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class TcpRelay:
    """up(): listen on `port` and relay each connection to `target_port`; a connection the target
    refuses is closed, as the pile would see a broker that is down. down(): nothing listens and
    the relayed connections are cut. hole(): everything is swallowed, on old and new connections,
    until mend(), which cuts the swallowed connections as a TCP timeout would. bytes_up (pile to
    broker) and bytes_down count what was relayed."""

    def __init__(self, target_port):
        self.target = target_port
        self.port = free_port()
        self.listener = None
        self.black = False
        self.connections = 0
        self.bytes_up = self.bytes_down = 0
        self._conns = []
        self._lock = threading.Lock()
        # Split the traffic into MQTT packets for packet(): only where it is overridden (a
        # subclass may also turn it off, for a TLS connection, say).
        self.inspect = type(self).packet is not TcpRelay.packet

    def packet(self, packet, up, conn):
        """Whether to relay this MQTT packet (pile to broker if `up`); `conn` is a dict kept per
        connection. Called only while `inspect` is set (when the connection began)."""
        return True

    def up(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(8)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                pile, _ = listener.accept()
            except OSError:
                return
            if self.black:
                with self._lock:
                    self._conns.append(pile)
                threading.Thread(target=self._pump, args=(pile, None, True, None), daemon=True).start()
                continue
            try:
                broker = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                pile.close()
                continue
            with self._lock:
                self._conns += [pile, broker]
                self.connections += 1
            conn = {}
            for src, dst, up in ((pile, broker, True), (broker, pile, False)):
                threading.Thread(target=self._pump, args=(src, dst, up, conn), daemon=True).start()

    def _pump(self, src, dst, up, conn):
        inspect = self.inspect
        rest = b""
        try:
            while True:
                data = src.recv(4096)
                if not data:
                    break
                if self.black or dst is None:
                    continue  # swallowed
                if inspect:
                    packets, rest = mqtt_packets(rest + data)
                    data = b"".join(p for p in packets if self.packet(p, up, conn))
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
        except OSError:
            pass
        _shut(src)
        if dst is not None:
            _shut(dst)

    def _cut(self):
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            _shut(s)
            s.close()

    def hole(self):
        self.black = True

    def mend(self):
        self._cut()
        self.black = False

    def down(self):
        if self.listener is not None:
            _shut(self.listener)  # Linux: wakes the blocked accept(); close() alone leaves it listening
            self.listener.close()
            self.listener = None
        self._cut()
