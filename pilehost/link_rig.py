"""The firmware's MQTT link on the unix port against a broker of our own, shared by the link's
tests: the pile's config, signed commands, a subscriber that sees what the pile sends, and a
relay that holds back one packet of a session/ended exchange."""
import errno
import json
import socket
import threading
import time

import paho.mqtt.client as mqtt

from . import pilecmd, unix_port
from .mqtt_wire import TcpRelay
from .procs import TIMEOUT

C_TO_B_LIMIT_MS = 100  # IEC 61851-1 Table A.6 seq. 8.1
# The firmware with the MQTT link needs more than the default 160 KiB on the unix port, where
# its bytecode lives in the heap (README, figures); `make sim` gives it the same.
HEAP = unix_port.MQTT_HEAP
PILE = "sim-pile-1"
SESSION = PILE + "-1-1"
SECRET = bytes(range(32))
ROOT_TOPIC = "evse/v1/%s/" % PILE


def mqtt_config(port, **extra):
    conf = {"host": "127.0.0.1", "port": port, "secret": SECRET.hex(), "keepalive_s": 10}
    conf.update(extra)
    return {"mqtt": conf}


def signed(cmd, args, counter, cmd_id=None, secret=SECRET):
    return pilecmd.sign(secret, pilecmd.make_body(cmd, args, counter, cmd_id))


def ended_idle(r):
    return r.firmware_events("charger")[-1][1].endswith("-> idle")


def sessions(store, session_id=SESSION):
    """The consumer's stored rows of one session (its stop reason)."""
    return store.handler.storage.query("SELECT stop_reason FROM sessions WHERE session_id = ?", (session_id,))


class Watcher:
    """A plain subscriber: every message the pile sends, in order, with its retain flag."""

    def __init__(self, broker):
        self.messages = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic[len(ROOT_TOPIC):], m.payload, m.retain))
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe(ROOT_TOPIC + "#", 1)
        self.client.loop_start()

    def of(self, kind):
        return [json.loads(p) for t, p, _ in list(self.messages) if t == kind]

    def live(self, kind=None):
        """Only what was published while subscribed: not what an earlier test left retained."""
        return [json.loads(p) for t, p, retained in list(self.messages)
                if not retained and (kind is None or t == kind)]

    def publish(self, payload):
        self.client.publish(ROOT_TOPIC + "cmd", payload, qos=1).wait_for_publish(TIMEOUT)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def published_ended(packet):
    """The packet id of a QoS 1 PUBLISH of a session/ended record, else None."""
    if packet[0] & 0xF0 != 0x30 or packet[0] & 6 != 2:
        return None
    i = 1
    while packet[i] & 0x80:
        i += 1
    i += 1
    n = packet[i] << 8 | packet[i + 1]
    if not packet[i + 2:i + 2 + n].endswith(b"/session/ended"):
        return None
    return packet[i + 2 + n] << 8 | packet[i + 3 + n]


class Proxy(TcpRelay):
    """A relay between the pile and the broker that can be taken away (down/up); the consumer
    stays connected to the broker itself. hold="publish" keeps the pile's first session/ended
    PUBLISH (and what follows it on that connection) from the broker, hold="puback" keeps the
    broker's PUBACK for it from the pile; `held` is set then: the record is in flight, its PUBACK
    not in the pile's hands. After down(), everything goes through."""

    def __init__(self, target_port, hold=None):
        super().__init__(target_port)
        self.hold = hold
        self.inspect = hold is not None  # else bytes pass as they come: TLS too
        self.held = threading.Event()
        self.pid = None

    def packet(self, packet, up, conn):
        if self.held.is_set():
            return not up or self.hold != "publish"  # held: nothing more of the pile's
        if up:
            pid = published_ended(packet)
            if pid is not None:
                self.pid = pid
                if self.hold == "publish":
                    self.held.set()
                    return False
        elif packet[0] == 0x40 and self.pid == (packet[2] << 8 | packet[3]):
            self.held.set()
            return False
        return True

    def down(self):
        super().down()
        self.hold = None
        self.inspect = False


class Stub:
    """An object with the given attributes: a stand-in for one of the firmware's."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def charging_ctl(**extra):
    """(ctl, contactor): what mqtt_link.MqttLink reads of a Controller, for a pile charging with
    its contactor closed, no session record and no meter; `extra`: more attributes of ctl."""
    contactor = Stub(closed=True)
    charger = Stub(state="charging", pilot="C", faults=0, offer_ma=16000, session=None,
                   remote_limit_ma=None, limit_source=None)
    records = Stub(meter=None, record=None, log=None, current=lambda: None)
    ctl = Stub(contactor=contactor, charger=charger, output=Stub(pwm_on=True), records=records,
               guard=lambda now_ms: None, **extra)
    return ctl, contactor


def link_conf(**extra):
    """The mqtt section MqttLink takes, parsed (config.py's names), for a broker at 10.0.0.5."""
    values = dict(host="10.0.0.5", port=1883, tls_server_name=None, username=None, password=None,
                  keepalive_s=60, status_interval_s=60, meter_interval_s=10, health_interval_s=300,
                  wifi_restart_after_s=300, reset_after_s=1800, reset_min_interval_s=3600,
                  conflict_pause_s=300)
    values.update(extra)
    return Stub(**values)


class FakeBroker:
    """The broker behind FakeNet's sockets: answers CONNECT with CONNACK; `up` False: a new
    connection is refused and the open one is closed."""

    def __init__(self):
        self.up = True
        self.connects = 0


class FakeSock:
    """A TCP socket (connects at once while the broker is up) or, wrapped, a TLS one whose
    handshake takes `handshake` writes."""

    def __init__(self, broker, handshake=0):
        self.broker = broker
        self.handshake = handshake
        self.inbox = bytearray()
        self.closed = False
        self.tls = False

    def setblocking(self, flag):
        pass

    def connect(self, addr):
        raise OSError(errno.EINPROGRESS)

    def write(self, data):
        if not self.broker.up:
            raise OSError(errno.ECONNRESET)
        if self.handshake:
            self.handshake -= 1
            return None
        if bytes(data[:1]) == b"\x10":
            self.broker.connects += 1
            self.inbox += b"\x20\x02\x00\x00"
        return len(data)

    def readinto(self, buf):
        if not self.broker.up:
            return 0  # closed by the broker
        if not self.inbox:
            return None
        n = min(len(buf), len(self.inbox))
        buf[:n] = self.inbox[:n]
        del self.inbox[:n]
        return n

    def close(self):
        self.closed = True


class FakeNet:
    """The `socket` and `select` modules for the link, on a FakeBroker."""
    POLLIN, POLLOUT, POLLERR, POLLHUP = 1, 4, 8, 16

    def __init__(self, broker):
        self.broker = broker

    def getaddrinfo(self, host, port, *args):
        return [(None, None, None, None, (host, port))]

    def socket(self, *args):
        return FakeSock(self.broker)

    def poll(self):
        net = self

        class Poller:
            def register(self, sock, mask):
                self.sock = sock

            modify = register

            def poll(self, timeout):
                sock = self.sock
                if not net.broker.up:
                    return [(sock, net.POLLHUP)]
                if not sock.tls and not sock.inbox:
                    return [(sock, net.POLLOUT)]
                return [(sock, net.POLLIN)] if sock.inbox else []

        return Poller()


class FakeTlsContext:
    """The SSLContext: each wrap makes a TLS socket on the broker."""

    def __init__(self, broker, handshake=0):
        self.broker = broker
        self.handshake = handshake

    def wrap_socket(self, sock, server_hostname=None, do_handshake_on_connect=True):
        tls = FakeSock(self.broker, self.handshake)
        tls.tls = True
        return tls


class OfflineNet:
    """The `socket` and `select` modules for the link: lookups recorded, TCP never connects."""
    POLLIN, POLLOUT, POLLERR, POLLHUP = 1, 4, 8, 16
    AF_INET, SOCK_DGRAM = socket.AF_INET, socket.SOCK_DGRAM

    def __init__(self, resolves=True):
        self.lookups = []
        self.connects = []
        self.resolves = resolves
        self.udp = False  # SNTP's connect() on a datagram socket returns at once

    def getaddrinfo(self, host, port, *args):
        self.lookups.append(host)
        if not self.resolves:
            raise OSError(-202)  # the ESP32's EAI_FAIL; on the board this call blocked first
        return [(None, None, None, None, ("192.0.2.7", port))]

    def socket(self, *args):
        net = self
        if self.udp:  # a real one (sntp polls it with select): a datagram to a closed port
            real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

            class Udp:
                def connect(self, addr):
                    net.connects.append(addr)
                    real.connect(("127.0.0.1", 9))

                def __getattr__(self, name):
                    return getattr(real, name)

            return Udp()

        class Sock:
            def setblocking(self, flag):
                pass

            def connect(self, addr):
                net.connects.append(addr)
                if not net.udp:
                    raise OSError(errno.EINPROGRESS)

            def send(self, data):
                return len(data)

            def close(self):
                pass

        return Sock()

    def poll(self):
        return Stub(register=lambda *a: None, modify=lambda *a: None, poll=lambda t: [])


def until(predicate, what, thread, lines, timeout=None, step=0.02):
    """wait_for (pilehost.procs) for a pile running in `thread`: fails with the pile's last `lines`, at once
    if its run has ended."""
    deadline = time.monotonic() + (TIMEOUT if timeout is None else timeout)
    while not predicate():
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("%s waiting for %s; the pile's last lines:\n%s" % (
                "the pile stopped" if not thread.is_alive() else "timed out", what, "\n".join(lines[-40:])))
        time.sleep(step)

