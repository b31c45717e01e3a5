"""firmware/mqtt_conn.py, the protocol layer split out of mqtt_link.py (issue 11): it builds the
CONNECT itself instead of swapping umqtt.simple's module-level `socket` for umqtt's connect().
The bytes must be exactly what umqtt.simple's connect(True) wrote before."""
import itertools

import pytest
from umqtt import simple as umqtt  # loaded by conftest.py

import mqtt_conn


class _Owner:
    def __init__(self):
        self.lines = []

    def conn_report(self, now_ms, text):
        self.lines.append(text)


class _SocketModule:
    """The stand-in the link used to put into umqtt.simple for connect()."""

    def __init__(self, pipe):
        self.pipe = pipe

    def socket(self, *args):
        return self.pipe

    def getaddrinfo(self, *args):
        return [(None, None, None, None, ("192.0.2.1", 1883))]


class _OldPipe(mqtt_conn._Pipe):
    """The pipe as it was, with what umqtt's connect() called on it."""

    def connect(self, addr):
        pass

    def settimeout(self, seconds):
        pass


def umqtt_connect_bytes(client_id, keepalive_s, user, password, will, monkeypatch):
    pipe = _OldPipe(2048)
    client = umqtt.MQTTClient(client_id, "192.0.2.1", 1883, user, password, keepalive=keepalive_s)
    if will is not None:
        client.set_last_will(will[0], will[1], retain=True, qos=1)
    monkeypatch.setattr(umqtt, "socket", _SocketModule(pipe))
    with pytest.raises(OSError):  # the CONNACK is not there: EAGAIN
        client.connect(True)
    return bytes(pipe.mv[pipe.head:pipe.tail])


@pytest.mark.parametrize("client_id,keepalive_s,credentials,will", list(itertools.product(
    [b"pile-1", b"p" * 200], [0, 10, 60, 300, 65535],
    [(None, None), (b"pile-1", b""), (b"u" * 70, b"secret" * 30)],
    [None, (b"evse/v1/pile-1/online", b'{"v": 1, "online": false, "boot": 3}')])))
def test_connect_is_the_bytes_umqtt_wrote(client_id, keepalive_s, credentials, will, monkeypatch):
    user, password = credentials
    want = umqtt_connect_bytes(client_id, keepalive_s, user, password, will, monkeypatch)
    monkeypatch.undo()
    socket_module = umqtt.socket
    conn = mqtt_conn.MqttConn(_Owner(), client_id, keepalive_s, user, password, will)
    conn._connect_packet()
    pipe = conn._pipe
    assert bytes(pipe.mv[pipe.head:pipe.tail]) == want
    assert umqtt.socket is socket_module  # umqtt's module is left alone


def test_umqtt_publishes_subscribes_and_pings_into_the_pipe():
    conn = mqtt_conn.MqttConn(_Owner(), b"pile-1", 60)
    pid = conn.publish(b"t/a", b"{}", retain=True)
    conn.subscribe(b"t/cmd")
    conn._client.ping()
    pipe = conn._pipe
    data = bytes(pipe.mv[pipe.head:pipe.tail])
    assert data.startswith(b"\x33\x09\x00\x03t/a" + bytes((pid >> 8, pid & 255)) + b"{}")
    assert data.endswith(b"\xc0\x00")
    assert b"\x82" in data and b"t/cmd\x01" in data
