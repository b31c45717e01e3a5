"""`make fleet` in small (pilehost/fleet.py): 50 piles on the asyncio MQTT client against mosquitto,
batch consumers sharing a group, the broker stopped for a compressed hour, a consumer killed
mid-storm; the database must hold every session the piles ended, once, to the Wh. PostgreSQL
when PILE_TEST_POSTGRES_URL is set (a schema of its own), SQLite otherwise. Also the client's
packets against mqtt_wire's parser, and the pile's last will through a real broker."""
import asyncio
import io
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pilehost import fleet, mqtt_async, mqtt_wire
from pilehost.broker import Broker
from pilehost.procs import find_tool

pytestmark = pytest.mark.skipif(find_tool("mosquitto") is None, reason="mosquitto is not installed")


@given(topic=st.text(min_size=1, max_size=300).filter(lambda t: "\x00" not in t),
       payload=st.binary(max_size=20000), qos=st.integers(0, 1), retain=st.booleans(),
       pid=st.integers(1, 65535))
def test_publish_packets_split_as_mqtt_wire_reads_them(topic, payload, qos, retain, pid):
    one = mqtt_async.publish_packet(topic, payload, qos, retain, pid)
    two = mqtt_async.puback_packet(pid)
    packets, rest = mqtt_wire.mqtt_packets(one + two + one[:3])
    assert packets == [one, two] and rest == one[:3]


def test_a_pile_that_vanishes_leaves_its_last_will(tmp_path):
    b = Broker(tmp_path)
    try:
        async def play():
            got = {}
            watcher = mqtt_async.Connection(lambda t, p: got.__setitem__(t, json.loads(p)))
            await watcher.open("127.0.0.1", b.port, "watcher")
            await watcher.subscribe([("evse/v1/+/online", 1)])
            pile = mqtt_async.Connection()
            will = ("evse/v1/fl00001/online", b'{"v":1,"online":false,"boot":3}', 1, True)
            await pile.open("127.0.0.1", b.port, "fl00001", keepalive=60, will=will)
            await pile.publish("evse/v1/fl00001/online", b'{"v":1,"online":true,"boot":3}', 1, True)
            await asyncio.sleep(0.3)
            first = dict(got)
            pile.close()  # no DISCONNECT: the broker publishes the will
            for _ in range(100):
                if got.get("evse/v1/fl00001/online", {}).get("online") is False:
                    break
                await asyncio.sleep(0.05)
            await watcher.disconnect()
            return first, got
        first, last = asyncio.run(play())
        assert first["evse/v1/fl00001/online"]["online"] is True
        assert last["evse/v1/fl00001/online"] == {"v": 1, "online": False, "boot": 3}
    finally:
        b.stop()


@pytest.mark.parametrize("scenario", ["storm", "kill"])
def test_fleet_storm_stores_every_session_once(tmp_path, scenario):
    out = io.StringIO()
    db = os.environ.get("PILE_TEST_POSTGRES_URL") or "sqlite:///" + str(tmp_path / "telemetry.db")
    o = fleet.Options(piles=50, scenario=scenario, consumers=2, compression=600, outage_s=4,
                      backoff_max_s=4, db=db, commands=10, drain_timeout_s=120,
                      directory=str(tmp_path / "run"), out=out)
    r = fleet.run(o)
    print(out.getvalue())
    assert r["connections_held"] == 50
    assert r["sessions_sent"] > 0 and r["storm_sessions"] > 0
    assert r["outbox_records_at_return"] > 0  # the storm had records to replay
    assert r["commands_answered"] == r["commands_sent"] and r["bad_signature_refused"]
    assert (r["missing"], r["extra"], r["wrong_energy"], r["wrong_payload"]) == ([], [], [], [])
    assert r["stored_twice"] == 0 and r["conflicts"] == 0
    assert r["all_acked"]
    assert r.ok()
