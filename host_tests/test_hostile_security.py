"""Issue 10, items 14, 16, 17 and 19: one auth_id rule on the pile and in the cloud; session ids
matched whole to their pile; one broker identity per pile (mosquitto users, ACL, client id bound
to the user); no host name lookup while the contactor is closed."""
import json
import os
import socket
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import command_auth  # firmware/
import sntp
from pilehost import ROOT, consumer, fake_pile, pilecmd
from pilehost.broker import find_mosquitto
from pilehost.cloud import LocalBroker, schemas
from pilehost.fake_pile import FakePile, Publisher
from pilehost.link_rig import OfflineNet
from pilehost.procs import wait_for

SCHEMAS = schemas()
SECRET = b"k" * 32


# -- item 14: one auth_id rule --------------------------------------------------------------------

def _record(kind, auth_id):
    pile = FakePile("pile-14")
    msgs = pile.normal_session(auth_source="remote", auth_id="x")
    payload = [m for m in msgs if m.topic.endswith("/session/" + kind.split("_")[1])][0].payload
    return dict(payload, auth_id=auth_id)


def schema_accepts(auth_id):
    """What the cloud stores: both session records, checked by the consumer's validator."""
    verdicts = set()
    for kind in ("session_started", "session_ended"):
        try:
            SCHEMAS.check(kind, _record(kind, auth_id))
            verdicts.add(True)
        except consumer.Rejected:
            verdicts.add(False)
    assert len(verdicts) == 1, "the two session schemas disagree on %r" % auth_id
    return verdicts.pop()


def pile_accepts(auth_id):
    """What the pile's remote_start takes (the argument check, as verify() calls it)."""
    verifier = command_auth.CommandVerifier(SECRET)
    return verifier._remote_start({"auth_id": auth_id}) is not None


def pilecmd_accepts(auth_id):
    try:
        pilecmd.parse_args("remote_start", ["auth_id=" + auth_id])
    except ValueError:
        return False
    return True


ODD = st.sampled_from([" ", "!", "~", "\x7f", "\x80", "\n", "\r", "\t", "\x00", "\x1f", "\xa0", "é",
                       "\u2028", "\ufeff", "\U0001F600", "a", "Z", "0", "-", "=", '"', "\\"])
AUTH_IDS = st.one_of(st.text(max_size=70), st.text(alphabet=ODD, max_size=70),
                     st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7f), max_size=70))


def test_item14_the_schemas_state_the_auth_id_rule_once():
    defs = []
    for kind in ("session_started", "session_ended"):
        with open(os.path.join(ROOT, "docs", "schemas", "%s.v1.schema.json" % kind)) as f:
            defs.append(json.load(f)["properties"]["auth_id"])
    assert defs[0] == defs[1]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(AUTH_IDS)
@example("card 1")  # the case: a space
@example("abc\n")  # Python's `$` matches before a final newline; ECMA-262's does not
@example("")
@example("a" * 64)
@example("a" * 65)
@example("04A2B7C91F6E80")
def test_item14_pile_and_cloud_accept_the_same_auth_ids(auth_id):
    cloud = schema_accepts(auth_id)
    assert pile_accepts(auth_id) == cloud, "pile and schema disagree on %r" % auth_id
    assert command_auth.valid_auth_id(auth_id) == cloud
    assert pilecmd_accepts(auth_id) == cloud, "pilecmd and schema disagree on %r" % auth_id


def test_item14_a_signed_remote_start_with_a_space_is_refused():
    verifier = command_auth.CommandVerifier(SECRET)
    body = pilecmd.make_body("remote_start", {"auth_id": "card 1"}, 1)
    with pytest.raises(command_auth.CommandError) as e:
        verifier.verify(pilecmd.sign(SECRET, body))
    assert e.value.code == "bad_argument"
    ok = verifier.verify(pilecmd.sign(SECRET, pilecmd.make_body("remote_start", {"auth_id": "card-1"}, 2)))
    assert ok.args == {"auth_id": "card-1"}


# -- item 16: session ids matched whole ------------------------------------------------------------

@pytest.fixture
def handler(tmp_path):
    storage = consumer.open_storage("sqlite:///" + str(tmp_path / "telemetry.db"))
    storage.setup()
    yield consumer.Handler(SCHEMAS, storage)
    storage.close()


def ended(pile_id, session_id, topic_pile=None):
    payload = [m for m in FakePile(pile_id).normal_session() if m.topic.endswith("/session/ended")][0].payload
    payload = dict(payload, session_id=session_id)
    return "evse/v1/%s/session/ended" % (topic_pile or pile_id), fake_pile.encode(payload)


def test_item16_a_prefix_pile_cannot_take_another_piles_session(handler):
    topic, forged = ended("A", "A-1-5-3")  # pile A sends a record named like pile A-1's
    assert handler.handle(topic, forged) == "rejected"
    assert handler.storage.query("SELECT count(*) FROM sessions") == [(0,)]
    reason, detail = handler.storage.query("SELECT reason, detail FROM rejected")[0]
    assert reason == "pile_mismatch" and "A-1-5-3" in detail and "'A'" in detail
    topic, genuine = ended("A-1", "A-1-5-3")
    assert handler.handle(topic, genuine) == "new"  # not a conflict with the forged one
    assert handler.storage.query("SELECT session_id, pile_id FROM sessions") == [("A-1-5-3", "A-1")]


@pytest.mark.parametrize("topic_pile, pile_id, session_id", [
    ("A", "A", "A-1-5-3"),  # the session id is A-1's
    ("A-1", "A-1", "A-1-5"),  # not <pile>-<boot>-<seq> of A-1 (it is A's 1-5)
    ("A", "A-1", "A-1-5-3"),  # payload and topic disagree
    ("A-1", "A", "A-1-5-3"),
    ("B", "B", "A-1-1"),
])
def test_item16_topic_payload_and_session_id_must_agree(handler, topic_pile, pile_id, session_id):
    topic, payload = ended(pile_id, session_id, topic_pile)
    assert handler.handle(topic, payload) == "rejected"
    assert handler.storage.query("SELECT count(*) FROM sessions") == [(0,)]
    assert handler.storage.query("SELECT reason FROM rejected") == [("pile_mismatch",)]


def test_item16_fault_and_status_ids_are_matched_whole(handler):
    pile = FakePile("A")
    fault = dict(pile.fault("welded").payload, event_id="A-1-5-f3")
    assert handler.handle("evse/v1/A/fault", fake_pile.encode(fault)) == "rejected"
    status = dict(pile.status().payload, session_id="A-1-5-3")
    assert handler.handle("evse/v1/A/status", fake_pile.encode(status)) == "rejected"
    assert handler.storage.query("SELECT count(*) FROM faults") == [(0,)]
    assert handler.storage.query("SELECT count(*) FROM piles") == [(0,)]


PILE_IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,12}\Z")
NUMBERS = st.integers(1, 9999999999).map(str)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(PILE_IDS, PILE_IDS, NUMBERS, NUMBERS)
@example("A", "A-1", "5", "3")
@example("A-1", "A", "1", "5")
def test_item16_a_session_id_belongs_to_exactly_one_pile(topic_pile, owner, boot, seq):
    session_id = "%s-%s-%s" % (owner, boot, seq)
    obj = {"pile_id": topic_pile, "session_id": session_id}
    if owner == topic_pile:
        consumer.check_ids(topic_pile, obj)
    else:
        with pytest.raises(consumer.Rejected) as e:
            consumer.check_ids(topic_pile, obj)
        assert e.value.key == "pile_mismatch"


# -- item 17: one broker identity per pile ----------------------------------------------------------

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@needs_mosquitto
def test_item17_pile_b_can_neither_publish_as_a_nor_take_over_its_connection(tmp_path):
    broker = LocalBroker(str(tmp_path), "mosquitto", piles=("pile-A", "pile-B"))
    made = []
    try:
        assert broker.secure
        a, b = FakePile("pile-A"), FakePile("pile-B")
        pub_a = Publisher(broker.pile_url("pile-A"), "pile-A", will=a.online(False))
        made.append(pub_a)
        disconnects = []
        pub_a.client.on_disconnect = lambda *args: disconnects.append(args)
        # Wrong or no credentials: refused.
        for url in (broker.pile_url("pile-B", "wrong"), "mqtt://127.0.0.1:%d" % broker.port):
            with pytest.raises(ConnectionError):
                made.append(Publisher(url, "pile-X"))
        # B's own credentials on the cloud listener: refused too.
        with pytest.raises(ConnectionError):
            made.append(Publisher("mqtt://pile-B:%s@127.0.0.1:%d" % (broker.passwords["pile-B"],
                                                                     broker.cloud_port), "pile-A"))
        pub_b = Publisher(broker.pile_url("pile-B"), "pile-B")
        made.append(pub_b)
        forged = [m._replace(topic=m.topic.replace("/pile-B/", "/pile-A/"))
                  for m in b.normal_session(auth_source="remote", auth_id="forged")]
        forged.append(fake_pile.message("pile-A", "online", {"v": 1, "online": False, "boot": 1}))
        pub_b.send(forged)
        pub_b.close()
        # B leaves a last will on A's online topic and drops the line: the will is a publish too.
        dropper = Publisher(broker.pile_url("pile-B"), "pile-B", will=a.online(False))
        dropper.client.loop_stop()
        dropper.client.socket().shutdown(socket.SHUT_RDWR)
        dropper.client.socket().close()
        # B connects with A's client id: the broker names it after its user, A stays connected.
        thief = Publisher(broker.pile_url("pile-B"), "pile-A")
        thief.send([m._replace(topic=m.topic.replace("/pile-B/", "/pile-A/")) for m in b.normal_session()])
        thief.close()
        genuine = a.normal_session(auth_source="remote", auth_id="card-A")
        pub_a.send(genuine)
        pub_b = Publisher(broker.pile_url("pile-B"), "pile-B")
        made.append(pub_b)
        own = b.normal_session()
        pub_b.send(own)  # B's own traffic flows
        handler = broker.handler
        wait_for(lambda: len(broker.storage.query("SELECT session_id FROM sessions")) == 2,
                 "A's and B's sessions")
        time.sleep(0.3)
        rows = broker.storage.query("SELECT session_id, pile_id, auth_id FROM sessions ORDER BY session_id")
        assert rows == [("pile-A-1-1", "pile-A", "card-A"), ("pile-B-1-3", "pile-B", None)]
        assert broker.storage.query("SELECT count(*) FROM rejected") == [(0,)]
        assert handler.stats.snapshot()[0].get("session_ended_conflict", 0) == 0
        assert pub_a.client.is_connected() and not disconnects
        # Nothing B sent on A's topics reached the consumer at all.
        assert handler.stats.snapshot()[0]["received"] == len(genuine) + len(own)
        online = broker.storage.query("SELECT online FROM piles WHERE pile_id = 'pile-A'")
        assert online != [(0,)], "B's forged last-will-like message reached the consumer"
    finally:
        for p in made:
            p.close()
        broker.stop()


@needs_mosquitto
def test_item17_the_tool_makes_a_pile_user_the_broker_takes(tmp_path):
    from pilehost import broker_users

    state = str(tmp_path / "broker")
    password = broker_users.add_pile(state, "pile-0042")
    with pytest.raises(ValueError):
        broker_users.add_pile(state, "bad/pile")
    snippet = broker_users.config_snippet("pile-0042", password, "broker.example", 8883)
    assert snippet == {"mqtt": {"host": "broker.example", "port": 8883, "username": "pile-0042",
                                "password": password}}
    with open(os.path.join(state, broker_users.PILES_PASSWD)) as f:
        line = f.read()
    assert line.startswith("pile-0042:$") and password not in line  # a hash, not the password


# -- item 19: no name lookup with the contactor closed ------------------------------------------------

def run(link, start, ms, step=5):
    for now in range(start, start + ms, step):
        link.poll(now)
    return start + ms


@pytest.mark.parametrize("resolves", [True, False])
def test_item19_mqtt_link_looks_up_no_name_while_the_contactor_is_closed(offline_link, resolves):
    net = OfflineNet(resolves)
    link, contactor, lines = offline_link(net)
    now = run(link, 0, 120000)  # two minutes of charging, the broker's name unknown
    assert net.lookups == [] and net.connects == []
    assert lines.count("broker.example: name lookup waits for the contactor to open") == 1
    contactor.closed = False
    now = run(link, now, 10)
    assert net.lookups == ["broker.example"]  # at once, and once
    if not resolves:
        return
    contactor.closed = True  # the cached address serves while charging: no lookup
    run(link, now, 200000)
    assert net.lookups == ["broker.example"] and len(net.connects) >= 3
    assert set(net.connects) == {("192.0.2.7", 1883)}


def test_item19_mqtt_link_connects_to_a_numeric_address_while_charging(offline_link):
    net = OfflineNet()
    link, contactor, lines = offline_link(net, host="192.0.2.9")
    run(link, 0, 100)
    assert len(net.connects) == 1  # a numeric address is no lookup: it never blocks


def sntp_client(net, closed):
    lines = []
    client = sntp.SntpClient("ntp.example", lambda dt: None, lambda t, w, text: lines.append(text),
                             start_jitter_s=0, sock_module=net, may_block=lambda: not closed[0])
    return client, lines


@pytest.mark.parametrize("resolves", [True, False])
def test_item19_sntp_looks_up_no_name_while_the_contactor_is_closed(resolves):
    net = OfflineNet(resolves)
    net.udp = True
    closed = [True]
    client, lines = sntp_client(net, closed)
    for now in range(0, 600000, 50):
        client.poll(now)
    assert net.lookups == [] and client.requests == 0
    assert lines == ["ntp.example: name lookup waits for the contactor to open"]
    closed[0] = False
    client.poll(600000)
    assert net.lookups == ["ntp.example"]
    if not resolves:
        assert client.requests == 1 and "cannot send to ntp.example" in lines[-1]
        return
    closed[0] = True
    for now in range(600050, 600050 + 8 * 3600 * 1000, 1000):  # resyncs while charging: the cache
        client.poll(now)
    assert net.lookups == ["ntp.example"] and client.requests >= 3


UPY32 = "/work/shared/tools/micropython-unix32/micropython"


@pytest.mark.parametrize("binary", [UPY32, os.path.join(ROOT, ".venv", "bin", "micropython")],
                         ids=["unix32", "unix"])
def test_item14_the_board_applies_the_rule_as_cpython_does(binary):
    """The rule on MicroPython itself (its str compares code points as CPython does)."""
    if not os.path.exists(binary):
        pytest.skip("no %s" % binary)
    import subprocess

    samples = ["card 1", "abc\n", "", "a" * 64, "a" * 65, "é", "\x7f", "!~", "04A2B7C91F6E80",
               "\U0001F600", "a\x00", "\t", "x" * 63 + "é"]
    code = "import json, command_auth\nfor s in json.loads(%r): print(int(command_auth.valid_auth_id(s)))" % (
        json.dumps(samples))
    out = subprocess.run([binary, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, MICROPYPATH=os.path.join(ROOT, "firmware")))
    assert out.returncode == 0, out.stderr
    assert [bool(int(x)) for x in out.stdout.split()] == [schema_accepts(s) for s in samples]
