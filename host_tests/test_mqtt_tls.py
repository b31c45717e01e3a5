"""TLS on the MQTT link (firmware/mqtt_link.py, config.json mqtt.tls_ca; issue 4).

The firmware on the unix port against a mosquitto with a TLS listener, its CA and certificate
made here; the reference consumer reads the same broker on a plain listener. Then the link's TLS
rules on CPython with fakes that behave like MicroPython's mbedTLS socket: a write that would
block is repeated byte for byte, no TLS step while the contactor is closed, the timeouts."""
import datetime
import errno
import ipaddress
import json
import os
import re
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import journal  # firmware/
import journal_scan
import mqtt_conn  # firmware/
import mqtt_link  # firmware/; umqtt.simple: loaded by conftest.py
from pilehost import ROOT, unix_port
from pilehost.broker import Broker, BrokerError
from pilehost.link_rig import HEAP as LINK_HEAP
from pilehost.link_rig import (C_TO_B_LIMIT_MS, PILE, SESSION, Proxy, Watcher, ended_idle, mqtt_config,
                               sessions)
from pilehost.mqtt_wire import mqtt_packets
from pilehost.procs import free_port, wait_for

BROKER_NAME = "broker.test"
# The SSLContext (mbedTLS's config, entropy and CA structures inside it) takes ~5 KiB of the
# MicroPython heap, the CA file and ssl/tls modules a little more; mbedTLS's buffers are outside
# it (libc on the unix port, the ESP-IDF heap on an ESP32). Measured: 8 KiB over the plain link.
HEAP = "%dk" % (int(LINK_HEAP.rstrip("k")) + 24)
QUICK = "ventilation_refused"  # 2.5 s, the contactor never closes: time enough to connect


# -- a CA and the broker's certificate, made here ------------------------------------------------

def _name(text):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert):
    """The broker's: its name and 127.0.0.1, so that a pile with a numeric host checks it too."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(BROKER_NAME)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(BROKER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


class Pki:
    def __init__(self, directory):
        ca_key, ca_cert = make_ca("pile test CA")
        _, other_cert = make_ca("some other CA")
        key, cert = make_server_cert(ca_key, ca_cert)
        self.ca = os.path.join(directory, "ca.pem")
        self.other_ca = os.path.join(directory, "other-ca.pem")
        self.cert = os.path.join(directory, "broker.pem")
        self.key = os.path.join(directory, "broker.key")
        for path, data in ((self.ca, _pem(ca_cert)), (self.other_ca, _pem(other_cert)),
                           (self.cert, _pem(cert)),
                           (self.key, key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))):
            with open(path, "wb") as f:
                f.write(data)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def broker(tmp_path_factory, pki):
    """mosquitto with a TLS listener for the pile (tls_port) and a plain one for the consumer
    (conftest's `store`) and the `watcher`, loopback."""
    try:
        b = Broker(tmp_path_factory.mktemp("mosquitto-tls"), tls=(pki.ca, pki.cert, pki.key))
    except BrokerError as e:
        pytest.fail(str(e), pytrace=False)
    yield b
    b.stop()


def run_pile(scenario, port, flash, ca_file=None, **mqtt):
    """The firmware with TLS on: ca_file goes onto the board's flash as ca.pem."""
    flash = str(flash)
    if ca_file is not None:
        shutil.copy(ca_file, os.path.join(flash, "ca.pem"))
    on_line = mqtt.pop("on_line", None)
    conf = mqtt_config(port, tls_ca="ca.pem", **mqtt)
    r = unix_port.run_scenario(scenario, config=conf, heapsize=HEAP, flash_dir=flash, on_line=on_line)
    assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-30:])
    assert not any("Traceback" in line or "MemoryError" in line for line in r.lines), "\n".join(r.lines)
    assert max(r.result["latencies_ms"] or [0]) < C_TO_B_LIMIT_MS  # IEC 61851-1 Table A.6 seq. 8.1
    return r


def mqtt_lines(r):
    return [text for _, text in r.firmware_events("mqtt")]


def outbox_kinds(flash):
    j = journal_scan.load(str(flash / "outbox.jrnl"))
    return [journal.KIND_NAMES[kind] for _, kind, _ in j.pending()]


# -- the firmware over TLS -----------------------------------------------------------------------

def test_a_session_reaches_the_consumer_over_tls_once(broker, store, watcher, pki, tmp_path):
    r = run_pile("normal", broker.tls_port, tmp_path, pki.ca)
    lines = mqtt_lines(r)
    assert any(t.startswith("TLS handshake done") for t in lines), lines
    assert any(t.startswith("connected to 127.0.0.1:%d" % broker.tls_port) for t in lines), lines
    assert ended_idle(r)
    wait_for(lambda: sessions(store), "the session row")
    assert sessions(store) == [("ev_disconnected",)]
    assert store.handler.stats.snapshot()[0].get("session_ended_new") == 1
    assert not store.handler.storage.query("SELECT reason FROM rejected")
    assert watcher.live("online")[0]["online"] is True
    assert outbox_kinds(tmp_path) == []


def test_the_broker_name_is_checked(broker, pki, tmp_path):
    good = run_pile(QUICK, broker.tls_port, tmp_path, pki.ca, tls_server_name=BROKER_NAME)
    assert any(t.startswith("connected") for t in mqtt_lines(good)), mqtt_lines(good)
    bad = run_pile(QUICK, broker.tls_port, tmp_path, pki.ca, tls_server_name="other.test")
    lines = mqtt_lines(bad)
    assert any(t.startswith("TLS: broker certificate refused") and "CN" in t for t in lines), lines
    assert not any(t.startswith("connected") for t in lines)


def test_another_ca_is_refused_and_the_session_waits_in_flash_for_the_right_one(
        broker, store, watcher, pki, tmp_path):
    r = run_pile("normal", broker.tls_port, tmp_path, pki.other_ca)
    lines = mqtt_lines(r)
    refused = [t for t in lines if t.startswith("TLS: broker certificate refused")]
    assert refused and "not correctly signed by the trusted CA" in refused[0], lines
    assert not any(t.startswith("connected") or t.startswith("TLS handshake done") for t in lines)
    assert ended_idle(r)
    assert outbox_kinds(tmp_path) == ["session_start", "session_end"]
    assert watcher.live() == [] and sessions(store) == []  # not a byte of MQTT got through
    # The right CA on the same flash: the next boot delivers the first boot's session, once.
    again = run_pile("normal", broker.tls_port, tmp_path, pki.ca)
    assert any(t.startswith("connected") for t in mqtt_lines(again)), mqtt_lines(again)
    second = PILE + "-2-1"  # boot 2's first session
    wait_for(lambda: sessions(store) and sessions(store, second), "both session rows")
    assert sessions(store) == [("ev_disconnected",)]
    rows = store.handler.storage.query("SELECT session_id FROM sessions ORDER BY session_id")
    assert rows == [(SESSION,), (second,)]
    assert store.handler.stats.snapshot()[0].get("session_ended_new") == 2
    assert outbox_kinds(tmp_path) == []


def test_a_plain_broker_on_the_tls_port_is_refused(tmp_path, pki, new_broker):
    plain = new_broker(tmp_path / "plain")
    w = Watcher(plain)
    try:
        r = run_pile(QUICK, plain.port, tmp_path, pki.ca)
    finally:
        w.close()
        plain.stop()
    lines = mqtt_lines(r)
    assert any(t.startswith("TLS handshake failed") for t in lines), lines
    assert not any(t.startswith("connected") for t in lines)
    assert w.live() == []  # the pile said nothing in clear


def test_no_tls_while_the_contactor_is_closed(broker, store, pki, tmp_path):
    """The broker appears once the contactor has closed: the pile waits for it to open."""
    proxy = Proxy(broker.tls_port)  # down: nothing listens until the contactor closes

    def on_line(line):
        if line.endswith("] contactor: closed") and proxy.listener is None:
            proxy.up()

    try:
        r = run_pile("long_session", proxy.port, tmp_path, pki.ca, on_line=on_line)
    finally:
        proxy.down()
    contactor = r.firmware_events("contactor")
    closed_at = [t for t, what in contactor if what == "closed"][0]
    opened_at = [t for t, what in contactor if what == "open" and t > closed_at][0]
    events = r.firmware_events("mqtt")
    waits = [t for t, text in events if text == "TLS connection waits for the contactor to open"]
    assert waits and closed_at < waits[0] < opened_at, events
    tls = [t for t, text in events if text.startswith("TLS handshake done")]
    assert tls and tls[0] >= opened_at, (contactor, events)
    wait_for(lambda: sessions(store), "the session row")
    assert sessions(store) == [("ev_disconnected",)]


@pytest.mark.parametrize("content, error", [
    (None, "cannot read ca.pem"),
    (b"not a certificate\n", "ca.pem is not a usable CA certificate"),
])
def test_a_missing_or_bad_ca_file_keeps_the_pile_unavailable(tmp_path, content, error):
    if content is not None:
        (tmp_path / "ca.pem").write_bytes(content)
    r = unix_port.run_scenario("normal", config=mqtt_config(free_port(), tls_ca="ca.pem"),
                            heapsize=HEAP, flash_dir=str(tmp_path))
    assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-30:])
    config = [text for _, text in r.firmware_events("config")]
    assert config and config[0].startswith("config.json: mqtt: 'tls_ca': ") and error in config[0], r.lines
    assert any("pile unavailable" in line for line in r.lines)
    assert "coil ON" not in [text for _, text in r.sim_events("contactor")]
    assert [text for _, text in r.sim_events("pilot")][-1] == "-12 V steady (F)"


def test_longest_poll_while_connecting_over_tls(broker, pki):
    """A figure for the README, not a timed assertion: on an ESP32 it is many times larger."""
    env = dict(os.environ, MICROPYPATH=unix_port.micropypath())
    script = os.path.join(ROOT, "host_tests", "upy_tls_poll.py")
    proc = subprocess.run([unix_port.micropython_binary(), script, str(broker.tls_port), pki.ca], env=env,
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    print(out)
    found = re.search(r"longest poll\(\) (\d+\.\d) ms", out)
    assert proc.returncode == 0 and found, out
    assert float(found.group(1)) > 0


# -- the link's TLS rules, on CPython with fakes -------------------------------------------------

class Record:
    """Attributes from keywords (the link reads config sections and the controller this way)."""

    def __init__(self, **values):
        self.__dict__.update(values)


class RawSocket:
    def __init__(self):
        self.closed = False

    def setblocking(self, flag):
        pass

    def connect(self, addr):
        raise OSError(errno.EINPROGRESS)

    def close(self):
        self.closed = True


class Net:
    """Stands in for the `socket` and `select` modules: TCP connects at once."""
    POLLIN, POLLOUT, POLLERR, POLLHUP = 1, 4, 8, 16

    def __init__(self):
        self.sockets = []

    def getaddrinfo(self, host, port):
        return [(None, None, None, None, (host, port))]

    def socket(self):
        self.sockets.append(RawSocket())
        return self.sockets[-1]

    def poll(self):
        return Poller()


class Poller:
    def register(self, sock, mask):
        self.sock = sock

    modify = register

    def poll(self, timeout):
        if isinstance(self.sock, RawSocket):
            return [(self.sock, Net.POLLOUT)]
        return [(self.sock, Net.POLLIN)] if self.sock.inbox else []


class MbedTls:
    """The TLS socket as MicroPython's mbedTLS stream behaves. write() returns None during the
    handshake (`handshake` calls) or raises `fail`; after it, the n-th write for which
    `blocks(n)` is true would block with its bytes already taken, and the next write that goes
    through reports the length of *its own* buffer (mbedtls_ssl_write wants the same call
    repeated). A broker answers CONNECT, QoS 1 PUBLISH and SUBSCRIBE."""

    def __init__(self, contactor, handshake=3, fail=None, blocks=None):
        self.contactor = contactor
        self.handshake = handshake
        self.fail = fail
        self.blocks = blocks
        self.wire = bytearray()
        self.inbox = bytearray()
        self.held = None
        self.writes = self.blocked = self.steps_while_closed = 0
        self.closed = False
        self._parsed = 0

    def write(self, data):
        if self.contactor.closed and self.handshake:
            self.steps_while_closed += 1
        if self.fail is not None:
            raise self.fail
        if self.handshake:
            self.handshake -= 1
            return None
        self.writes += 1
        if self.blocks is not None and self.blocks(self.writes):
            self.blocked += 1
            if self.held is None:
                self.held = bytes(data)
            return None
        if self.held is not None:
            self.wire += self.held
            self.held = None
        else:
            self.wire += bytes(data)
        self._answer()
        return len(data)

    def readinto(self, buf):
        if not self.inbox:
            return None
        n = min(len(buf), len(self.inbox))
        buf[:n] = self.inbox[:n]
        del self.inbox[:n]
        return n

    def close(self):
        self.closed = True

    def _answer(self):
        packets, _ = mqtt_packets(bytes(self.wire[self._parsed:]))
        for packet in packets:
            self._parsed += len(packet)
            op, body = packet[0], body_of(packet)
            if op == 0x10:
                self.inbox += b"\x20\x02\x00\x00"
            elif op & 0xF0 == 0x30 and op & 6:
                topic_len = body[0] << 8 | body[1]
                self.inbox += b"\x40\x02" + body[2 + topic_len:4 + topic_len]
            elif op == 0x82:
                self.inbox += b"\x90\x03" + body[:2] + b"\x01"


def body_of(packet):
    """A whole MQTT packet's body: after the first byte and the remaining length's 1-4 bytes."""
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[i + 1:]


class Outbox:
    def __init__(self, payloads):
        self.records = {seq: p for seq, p in enumerate(payloads, 1)}
        self.next_seq = len(payloads) + 1
        self.acked = 0

    def pending(self):
        for seq in sorted(self.records):
            yield seq, journal.KIND_SESSION_END, self.records[seq]

    def ack(self, seq):
        del self.records[seq]


class Context:
    """The SSLContext the link is given: each wrap makes an MbedTls."""

    def __init__(self, contactor, **behaviour):
        self.contactor = contactor
        self.behaviour = behaviour
        self.made = []

    def wrap_socket(self, sock, server_hostname=None, do_handshake_on_connect=True):
        assert do_handshake_on_connect is False and server_hostname == "10.0.0.5"
        self.made.append(MbedTls(self.contactor, **self.behaviour))
        return self.made[-1]


class Rig:
    def __init__(self, monkeypatch, payloads=(), **behaviour):
        self.net = Net()
        monkeypatch.setattr(mqtt_link, "socket", self.net)  # getaddrinfo
        monkeypatch.setattr(mqtt_conn, "socket", self.net)
        monkeypatch.setattr(mqtt_conn, "select", self.net)
        self.contactor = Record(closed=False)
        charger = Record(state="idle", pilot="A", faults=0, offer_ma=0, session=None, remote_limit_ma=None,
                         limit_source=None)
        ctl = Record(contactor=self.contactor, charger=charger, output=Record(pwm_on=False),
                     records=Record(meter=None, record=None, log=None, current=lambda: None),
                     guard=lambda now_ms: None)
        self.outbox = Outbox(payloads)
        log = Record(pile_id="pile-7", boot=3, outbox=self.outbox)
        conf = Record(host="10.0.0.5", port=8883, tls_server_name=None, username=None, password=None,
                      keepalive_s=60, status_interval_s=60, meter_interval_s=10, health_interval_s=300,
                      wifi_restart_after_s=300, reset_after_s=1800, reset_min_interval_s=3600,
                      conflict_pause_s=300)
        self.tls = Context(self.contactor, **behaviour)
        self.lines = []
        self.link = mqtt_link.MqttLink(conf, ctl, log, lambda now, what, text: self.lines.append((now, text)),
                                       boot_ms=0, tls=self.tls)
        self.now = 0

    def run(self, ms):
        for _ in range(ms // 5):
            self.link.poll(self.now)
            self.now += 5

    def said(self, start):
        return [(t, text) for t, text in self.lines if text.startswith(start)]


def test_a_tls_write_that_would_block_is_repeated_byte_for_byte(monkeypatch):
    records = [json.dumps({"record": i, "pad": "x" * (50 * i)}).encode() for i in range(1, 6)]
    produced = bytearray()  # every byte umqtt and the link put into the pipe
    pipe_write = mqtt_conn._Pipe.write

    def spy(pipe, data, n=None):
        n = pipe_write(pipe, data, n)
        produced.extend(bytes(memoryview(data)[:n]))
        return n

    monkeypatch.setattr(mqtt_conn._Pipe, "write", spy)
    # Two in a row: the link adds a packet to the pipe between them (one poll).
    rig = Rig(monkeypatch, records, blocks=lambda n: n % 4 in (2, 3))
    rig.run(3000)
    assert rig.link.connected and rig.said("TLS handshake done")
    tls = rig.tls.made[0]
    assert tls.blocked >= 5  # the case under test did happen
    assert bytes(tls.wire) == bytes(produced)
    packets, torn = mqtt_packets(bytes(tls.wire))
    assert torn == b""  # nothing lost or torn: the stream ends on a packet boundary
    assert packets[0][0] == 0x10
    bodies = [(packet[0], body_of(packet)) for packet in packets]
    sent = [body[2 + (body[0] << 8 | body[1]) + 2:] for op, body in bodies
            if op & 0xF0 == 0x30 and b"session/ended" in body[:40]]
    assert sent == records
    assert rig.outbox.records == {}  # every record acknowledged


def test_no_tls_step_while_the_contactor_is_closed(monkeypatch):
    rig = Rig(monkeypatch, handshake=10**6)  # a handshake that never ends
    rig.contactor.closed = True
    rig.run(500)
    assert rig.net.sockets == []  # not even the TCP connection
    assert len(rig.said("TLS connection waits for the contactor to open")) == 1
    rig.contactor.closed = False
    rig.run(100)
    tls = rig.tls.made[0]
    assert tls.handshake < 10**6  # the handshake is under way
    rig.contactor.closed = True
    rig.run(3000)
    assert tls.steps_while_closed == 0
    assert rig.said("TLS handshake given up: the contactor closed")
    assert tls.closed and rig.net.sockets[0].closed
    assert len(rig.net.sockets) == 1 and not rig.link.connected
    assert len(rig.said("TLS connection waits for the contactor to open")) == 2


def test_a_handshake_that_does_not_finish_is_dropped(monkeypatch):
    rig = Rig(monkeypatch, handshake=10**6)
    rig.run(5200)
    dropped = [t for t, text in rig.lines if "within" in text]
    assert [t for t, _ in rig.said("TLS handshake not finished within 5 s")] == dropped
    assert len(dropped) == 1 and 5000 < dropped[0] <= 5100, rig.lines
    assert rig.tls.made[0].closed and rig.net.sockets[0].closed  # the TCP socket too


def test_a_refused_certificate_is_one_clear_line(monkeypatch):
    reasons = ValueError("\nThe certificate is not correctly signed by the trusted CA\n")
    rig = Rig(monkeypatch, fail=reasons)
    rig.run(100)
    assert [text.split(";")[0] for _, text in rig.said("TLS:")] == [
        "TLS: broker certificate refused (The certificate is not correctly signed by the trusted CA)"]
    assert rig.net.sockets[0].closed  # mbedTLS let go of it, the link closes it


_CA_CHECK = """
import sys, link_tls
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        link_tls.tls_context(data)
        print("ok")
    except ValueError as e:
        print("ValueError", e)
"""


def test_tls_context_on_the_unix_port_takes_pem_bundles_and_der(pki, tmp_path):
    """The unix port's mbedTLS parses DER only: the link decodes PEM itself."""
    with open(pki.ca, "rb") as f:
        ca = f.read()
    with open(pki.other_ca, "rb") as f:
        other = f.read()
    cases = {
        "pem": (ca, "ok"), "bundle": (ca + other, "ok"),
        "der": (x509.load_pem_x509_certificate(ca).public_bytes(serialization.Encoding.DER), "ok"),
        "empty": (b"", "ValueError"), "text": (b"hello\n", "ValueError"),
        "cut": (ca[:200], "ValueError"), "no_end": (ca.replace(b"-----END", b"-----FIN"), "ValueError"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    env = dict(os.environ, MICROPYPATH=unix_port.micropypath())
    files = [str(tmp_path / n) for n in cases]
    proc = subprocess.run([unix_port.micropython_binary(), "-c", _CA_CHECK] + files,
                          env=env, capture_output=True, text=True, timeout=60)
    results = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(results) == len(cases), proc.stdout + proc.stderr
    assert [r.split()[0] for r in results] == [want for _, want in cases.values()], results
