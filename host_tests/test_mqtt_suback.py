"""A SUBACK (MQTT 3.1.1 section 3.9.3): a refused subscription (return code 0x80) is reported by
the connection to its owner (conn_report); a granted one says nothing. Any subscription: the
link's commands, an update's chunks (ota.py)."""
import pytest

import mqtt_conn


class Owner:
    def __init__(self):
        self.lines = []

    def conn_report(self, now_ms, text):
        self.lines.append(text)


@pytest.mark.parametrize("code, said", [
    (0x80, ["broker refused a subscription"]), (0x00, []), (0x01, [])])
def test_a_refused_subscription_is_reported(code, said):
    owner = Owner()
    conn = mqtt_conn.MqttConn(owner, b"pile-1", 60)
    conn.state = mqtt_conn.UP
    packet = bytes((0x90, 3, 0, 7, code))
    conn._in[:len(packet)] = packet
    conn._in_len = len(packet)
    conn._packets(1000)
    assert owner.lines == said
    assert conn._in_len == 0 and conn._last_rx == 1000  # handled: a sign of life
