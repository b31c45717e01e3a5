"""Broken links for the self-healing link's tests (host_tests/test_link_heal_unix.py): a relay
between the pile and its broker that can stop answering CONNACKs, go half-open, or route nothing
(a TCP connect that is never answered), and come back on the same port."""
import socket

from .mqtt_wire import TcpRelay, _shut


class BreakableRelay(TcpRelay):
    """break_link(mode): "connack" (connections cut; new ones accepted and swallowed: no CONNACK),
    "half_open" (everything swallowed, nothing closed: only the keep-alive can tell), "no_route"
    (connections cut; the port's accept queue full, so a SYN is dropped and a connect never
    completes, as behind a Wi-Fi that associates but routes nothing). heal(): relayed again."""

    def __init__(self, target_port):
        super().__init__(target_port)
        self.mode = None
        self._sink = None  # (listener, the connection that fills its queue)

    def break_link(self, mode):
        self.mode = mode
        if mode == "half_open":
            self.hole()
        elif mode == "connack":
            self.black = True
            self._cut()
        elif mode == "no_route":
            self.down()
            sink = socket.socket()
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sink.bind(("127.0.0.1", self.port))
            sink.listen(0)  # Linux: a queue of one; further SYNs are dropped, never refused
            filler = socket.create_connection(("127.0.0.1", self.port))
            self._sink = (sink, filler)
        else:
            raise ValueError("unknown mode %r" % (mode,))

    def heal(self):
        mode, self.mode = self.mode, None
        if mode == "no_route":
            for s in self._sink:
                _shut(s)
                s.close()
            self._sink = None
            self.up()
        else:
            self.mend()

    def close(self):
        if self._sink is not None:
            for s in self._sink:
                s.close()
            self._sink = None
        self.down()
