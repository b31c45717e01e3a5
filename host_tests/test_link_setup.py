"""Issue 12 item 3: the MQTT link's code that runs only with the contactor open is loaded when it
is needed and dropped after (firmware/link_setup.py: the link's set-up at the boot;
firmware/link_reset.py: heal.json's read at the boot and the board reset; firmware/link_tls.py:
the TLS context and handshake). A .mpy import costs chip time that a
closed contactor's iteration does not have: never is one of them imported while it is closed,
and a session with the link, connected or with its broker away, ends without them loaded."""
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mqtt_conn
import mqtt_link
from pilehost import procs, unix_port
from pilehost.link_rig import FakeBroker, FakeNet, FakeTlsContext, Stub, charging_ctl, link_conf

LAZY = ("link_setup", "link_tls", "link_reset")


class Loads:
    """A meta path finder that sees every real import (a module not in sys.modules) of LAZY, with
    the contactor's state at that moment."""

    def __init__(self, contactor):
        self.contactor = contactor
        self.seen = []

    def find_spec(self, name, path=None, target=None):
        if name in LAZY:
            self.seen.append((name, self.contactor.closed))
        return None  # the normal finders load it

    def while_closed(self):
        return [name for name, closed in self.seen if closed]


def _link(monkeypatch, tls_handshake=None, closed=False):
    """(link, contactor, broker, loads, resets): the firmware's MqttLink built as at the boot
    (contactor open), on fake sockets; loads recorded from then on."""
    broker = FakeBroker()
    net = FakeNet(broker)
    monkeypatch.setattr(mqtt_link, "socket", net)
    monkeypatch.setattr(mqtt_conn, "socket", net)
    monkeypatch.setattr(mqtt_conn, "select", net)
    resets = []
    ctl, contactor = charging_ctl(safe_off=lambda: None)
    contactor.closed = False  # the boot
    outbox = Stub(next_seq=1, acked=0, pending=lambda: iter(()), ack=lambda seq: None)
    log = Stub(pile_id="pile-lazy", boot=2, outbox=outbox)

    class Store:  # link_heal.HealStore, on no flash
        resets = streak = 0
        reason = None

        def save(self):
            pass

    tls = None if tls_handshake is None else FakeTlsContext(broker, tls_handshake)
    loads = Loads(contactor)
    monkeypatch.setattr(sys, "meta_path", [loads] + sys.meta_path)
    link = mqtt_link.MqttLink(link_conf(port=8883 if tls else 1883), ctl, log, lambda now, what, text: None,
                              boot_ms=0, tls=tls, heal_store=Store(), reset=lambda: resets.append(1))
    assert [name for name, _ in loads.seen] in (["link_setup"], [])  # [] if a test left it loaded
    assert not any(m in sys.modules for m in LAZY), "link_setup not dropped once the link is built"
    loads.seen.clear()
    contactor.closed = closed
    return link, contactor, broker, loads, resets, ctl


@pytest.mark.parametrize("tls", [None, 3], ids=["tcp", "tls"])
def test_the_link_is_built_and_connects_with_its_set_up_dropped(monkeypatch, tls):
    link, contactor, broker, loads, _, _ = _link(monkeypatch, tls_handshake=tls)
    for now in range(0, 2000, 5):
        link.poll(now)
    assert link.connected and broker.connects == 1
    assert not any(m in sys.modules for m in LAZY)  # link_tls: dropped when the handshake ended
    assert loads.seen == ([] if tls is None else [("link_tls", False)])


def test_a_plain_link_reconnects_while_closed_without_an_import(monkeypatch):
    """The broker goes and comes back with the contactor closed: TCP, CONNECT, the online
    message again, nothing imported."""
    link, contactor, broker, loads, _, _ = _link(monkeypatch, closed=True)
    now = 0
    for up in (True, False, True, False, True):
        broker.up = up
        for _ in range(3000):
            link.poll(now)
            now += 5
        assert link.connected == up
    assert broker.connects == 3 and loads.seen == []
    assert not any(m in sys.modules for m in LAZY)


def test_a_tls_link_waits_for_the_open_and_imports_only_then(monkeypatch):
    link, contactor, broker, loads, _, _ = _link(monkeypatch, tls_handshake=10**6, closed=True)
    for now in range(0, 3000, 5):
        link.poll(now)
    assert loads.seen == [] and not link.connected
    contactor.closed = False
    for now in range(3000, 3100, 5):
        link.poll(now)
    assert loads.seen == [("link_tls", False)] and "link_tls" in sys.modules  # mid-handshake
    contactor.closed = True
    link.poll(3100)
    assert "link_tls" not in sys.modules  # the handshake given up: dropped with the connection
    for now in range(3105, 60000, 5):
        link.poll(now)
    assert loads.while_closed() == []


def test_the_board_reset_loads_its_code_only_with_no_session_and_drops_it(monkeypatch):
    """The ladder's last rung (link_heal): due only with no session open, so never closed. A
    broker away for two hours with the contactor closed (reset_after_s and the rate passed):
    nothing imported, no reset; opened and idle: link_reset imported, the board reset, the
    module dropped."""
    link, contactor, broker, loads, resets, ctl = _link(monkeypatch, closed=True)
    broker.up = False
    now = 0
    for _ in range(7200 * 1000 // 100):  # reset_after_s 1800, reset_min_interval_s 3600
        link.poll(now)
        now += 100
    assert resets == [] and loads.seen == []
    contactor.closed = False
    ctl.charger.state = "idle"
    for _ in range(200):
        link.poll(now)
        now += 50
    assert resets and loads.seen == [("link_reset", False)] * len(resets)
    assert "link_reset" not in sys.modules and "link_setup" not in sys.modules


@settings(max_examples=40, deadline=None)
@given(tls=st.sampled_from([None, 1, 4]),
       steps=st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(1, 400)), min_size=1, max_size=12))
def test_never_an_import_while_closed_whatever_the_broker_and_the_contactor_do(tls, steps):
    """steps: (contactor closed, broker up, polls of 5 ms). After every poll: no lazy module
    was loaded while closed, link_setup is never left loaded, link_tls only mid-handshake."""
    mp = pytest.MonkeyPatch()
    try:
        link, contactor, broker, loads, _, _ = _link(mp, tls_handshake=tls)
        now = 0
        for closed, up, polls in steps:
            contactor.closed = closed
            broker.up = up
            for _ in range(polls):
                link.poll(now)
                now += 5
                assert loads.while_closed() == []
                assert "link_setup" not in sys.modules
                assert "link_tls" not in sys.modules or link._conn.state == mqtt_conn.TLS
    finally:
        mp.undo()


def test_the_links_set_up_for_netaddr_is_dropped_too(monkeypatch):
    """netaddr.py (numeric_host) is the set-up's: not kept loaded by the link (sntp.py keeps it
    when there is an ntp section)."""
    monkeypatch.delitem(sys.modules, "netaddr", raising=False)
    _link(monkeypatch)
    assert "netaddr" not in sys.modules


@pytest.mark.parametrize("broker_up", [True, False], ids=["connected", "broker_away"])
def test_a_session_on_the_chip_shaped_port_ends_without_the_links_set_up(broker, broker_up):
    """On the 32-bit binary, as .mpy, the normal session with the link to mosquitto or to no
    one: the session completes, and at its end link_setup, link_tls and netaddr are not loaded."""
    program = unix_port.unix32_binary() or unix_port.micropython_binary()
    port = broker.port if broker_up else procs.free_port()
    config = {"meter": {"type": "ddsu666"}, "pile_id": "lazy-link-%d" % broker_up,
              "mqtt": {"host": "127.0.0.1", "port": port, "keepalive_s": 10}}
    r = unix_port.run_scenario("normal", config=config, heapsize="400k", exact_heap=True, program=program)
    assert r.returncode == 0 and r.result and r.result["boots"] == 1, "\n".join(r.lines[-20:])
    assert any("-> idle" in t for _, t in r.firmware_events("charger"))
    loaded = set(r.result["modules"])
    assert {"mqtt_link", "mqtt_conn", "link_heal"} <= loaded
    assert not loaded & {"link_setup", "link_tls", "netaddr"}
    connected = any("connected to" in t for _, t in r.firmware_events("mqtt"))
    assert connected == broker_up


def test_the_command_handling_is_not_loaded_without_commands_and_a_stray_one_is_dropped(monkeypatch):
    """The handling of a command lives in commands.py, loaded only with a command secret. A
    broker that sends to cmd/ without our subscription: dropped (it used to reach a verifier of
    None and reset the pile)."""
    monkeypatch.delitem(sys.modules, "commands", raising=False)
    link, contactor, broker, loads, _, _ = _link(monkeypatch, closed=True)
    for now in range(0, 500, 5):
        link.poll(now)
    assert link.connected
    link.conn_publish(500, link._topics.cmd, b'{"v": 1}')
    for now in range(500, 1000, 5):
        link.poll(now)
    assert link._cmd_in is None and link._acks == [] and link.connected
    assert "commands" not in sys.modules


@pytest.mark.parametrize("tls", [None, 2], ids=["tcp", "tls"])
def test_nothing_the_link_keeps_holds_a_function_of_its_set_up(monkeypatch, tls, functions_of):
    """Dropped from sys.modules is freed only if no object kept holds one of its functions."""
    import link_reset
    import link_setup
    import link_tls

    link, contactor, broker, loads, _, ctl = _link(monkeypatch, tls_handshake=tls)
    for now in range(0, 2000, 5):
        link.poll(now)
    assert link.connected
    assert functions_of(link_setup, [link, ctl]) == []
    assert functions_of(link_tls, [link, ctl]) == []
    assert functions_of(link_reset, [link, ctl]) == []


def test_the_heal_store_is_read_and_its_code_is_not_beside_the_set_up(monkeypatch, tmp_path, functions_of):
    """heal.json is read when wiring_link.py makes the link's parts, before the set-up
    (link_setup.py), the boot's heap peak: link_reset.py (the read and the board reset) is
    dropped again at once, not kept until the link is built. Unreadable: a streak of 1."""
    import link_heal
    import link_reset
    import link_setup

    path = tmp_path / "heal.json"
    path.write_text('{"resets": 4, "streak": 2, "reason": "no broker"}')
    monkeypatch.delitem(sys.modules, "link_reset", raising=False)
    monkeypatch.delitem(sys.modules, "link_setup", raising=False)
    store = link_heal.HealStore(str(path))
    assert (store.resets, store.streak, store.reason) == (4, 2, "no broker")
    assert "link_reset" not in sys.modules and "link_setup" not in sys.modules
    assert functions_of(link_reset, [store]) == [] and functions_of(link_setup, [store]) == []
    path.write_text("{not json")
    assert link_heal.HealStore(str(path)).streak == 1
    seen = []

    def setup_link(*args):
        seen.append("link_reset" in sys.modules)
        return real(*args)

    real = link_setup.setup_link
    monkeypatch.setattr(link_setup, "setup_link", setup_link)
    monkeypatch.setitem(sys.modules, "link_setup", link_setup)
    _link(monkeypatch)
    assert seen == [False]


@pytest.mark.parametrize("host, numeric", [("192.0.2.7", True), ("broker.example", False)])
def test_the_pile_finds_whether_the_broker_is_an_address_before_the_links_peak(monkeypatch, host, numeric):
    """wiring_link.link_parts finds it (netaddr.py loaded and dropped there, in the boot's second
    phase) and hands it over: making the link at the boot's heap peak loads no netaddr.py."""
    import builtins

    from pilehost.virtual_board import VirtualBoard

    vb = VirtualBoard(monkeypatch, config={"pile_id": "addr-1", "meter": {"type": "ddsu666"},
                                           "mqtt": {"host": host, "port": 1}})
    import wiring
    import wiring_link

    monkeypatch.delitem(sys.modules, "netaddr", raising=False)
    make, args = wiring_link.link_parts(vb.board, vb.conf, vb.ctl, wiring.handover)
    assert args["numeric_host"] is numeric and "netaddr" not in sys.modules
    imported = []
    real_import = builtins.__import__

    def spy(name, *a, **kw):
        imported.append(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", spy)
    link = make(**args)
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert link._numeric is numeric
    assert "link_setup" in imported and "netaddr" not in imported
