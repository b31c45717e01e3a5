"""Adversarial review of the boot in two phases and the link's lazy code (issue 12 item 3:
main.py build_core/build_link, wiring_link.py, link_setup.py, link_tls.py). Each test is a way
the change could break a rule: a lazy module's import failing (a fragmented heap's MemoryError,
a damaged .mpy's ValueError) where the firmware used to have the code at hand."""
import json
import sys

import pytest

import mqtt_conn
import mqtt_link
import release_boot
import wiring_link
from pilehost.link_rig import FakeBroker, FakeNet, FakeTlsContext, Stub, charging_ctl, link_conf

LAZY = ("link_setup", "link_tls", "link_reset")


class Failing:
    """A meta path finder: an import of `name` (not in sys.modules) raises `error` while armed."""

    def __init__(self, name, error):
        self.name = name
        self.error = error
        self.armed = True
        self.tries = 0

    def find_spec(self, name, path=None, target=None):
        if name == self.name and self.armed:
            self.tries += 1
            raise self.error
        return None


def _link(monkeypatch, tls=True):
    """(link, ctl, net, texts, resets): MqttLink as built at the boot, contactor open."""
    net = FakeNet(FakeBroker())
    monkeypatch.setattr(mqtt_link, "socket", net)
    monkeypatch.setattr(mqtt_conn, "socket", net)
    monkeypatch.setattr(mqtt_conn, "select", net)
    for name in LAZY:
        monkeypatch.delitem(sys.modules, name, raising=False)
    offs = []
    ctl, contactor = charging_ctl(safe_off=lambda: offs.append(1))
    contactor.closed = False
    outbox = Stub(next_seq=1, acked=0, pending=lambda: iter(()), ack=lambda seq: None)
    log = Stub(pile_id="pile-review", boot=2, outbox=outbox)

    class Store:
        resets = streak = 0
        reason = None

        def save(self):
            pass

    texts = []
    resets = []
    link = mqtt_link.MqttLink(link_conf(port=8883 if tls else 1883), ctl, log,
                              lambda now, what, text: texts.append(text), boot_ms=0,
                              tls=FakeTlsContext(net.broker) if tls else None, heal_store=Store(),
                              reset=lambda: resets.append(1))
    return link, ctl, net, texts, resets


@pytest.mark.parametrize("error", [MemoryError(), ValueError("incompatible .mpy file")],
                         ids=["memory", "damaged"])
def test_a_tls_reconnect_whose_code_cannot_load_is_retried_not_a_board_reset(monkeypatch, error):
    """A session suspended (contactor open, a session open: the ladder would never reset the
    board now), the broker away and back: the handshake's code, link_tls.py, does not load (a
    fragmented heap, a damaged file). Before link_tls.py existed start_tls had its code at
    hand and an OSError there was a dropped attempt; the import's error went up through
    main.run() to fail_safe: a board reset in the middle of a session. It must be a failed
    attempt, retried with the backoff, and the link must come up once the code loads."""
    link, ctl, net, texts, resets = _link(monkeypatch)
    ctl.charger.state = "suspended_ev"
    ctl.charger.session = object()  # a session open with the contactor open
    failing = Failing("link_tls", error)
    monkeypatch.setattr(sys, "meta_path", [failing] + sys.meta_path)
    now = 0
    for _ in range(400):
        link.poll(now)  # must not raise: main.run() would fail_safe and reset the board
        now += 5
    assert failing.tries >= 1 and not link.connected
    assert link.last_error is not None and "TLS" in link.last_error
    assert resets == []
    failing.armed = False
    for _ in range(20000):
        link.poll(now)
        now += 5
        if link.connected:
            break
    assert link.connected
    assert not any(m in sys.modules for m in LAZY)


@pytest.mark.parametrize("error", [MemoryError(), ValueError("incompatible .mpy file"), OSError(5)],
                         ids=["memory", "damaged", "flash read error"])
def test_the_reset_rung_whose_code_cannot_load_gives_up_as_when_heal_json_fails(monkeypatch, error):
    """The ladder's last rung, now in link_reset.py: its import failing went up to fail_safe,
    a reset that heal.json never counted (the reset rate's doubling lost), reported as an
    internal error. It must give up as when heal.json cannot be written: no exception, no
    reset, tried again after a whole reset_after_s."""
    link, ctl, net, texts, resets = _link(monkeypatch, tls=False)
    ctl.contactor.closed = False
    ctl.charger.state = "idle"
    net.broker.up = False
    failing = Failing("link_reset", error)
    monkeypatch.setattr(sys, "meta_path", [failing] + sys.meta_path)
    now = 0
    for _ in range(3700 * 10):  # reset_after_s 1800, reset_min_interval_s 3600
        link.poll(now)
        now += 100
    assert failing.tries >= 1 and resets == []
    assert any("board reset given up" in t for t in texts)
    assert failing.tries <= 2  # once per reset_after_s, not at every step
    failing.armed = False
    for _ in range(1900 * 10):
        link.poll(now)
        now += 100
    assert resets  # the code loads again: the rung works
    assert "link_reset" not in sys.modules


def test_a_damaged_link_tls_is_not_reported_as_a_bad_ca_certificate(monkeypatch, tmp_path):
    """wiring_link.build_tls turned every ValueError into 'not a usable CA certificate' and held
    the pile unavailable for good: a damaged link_tls.mpy (ValueError: incompatible .mpy file)
    sent a technician to replace a good CA, and on the good release no reset or rollback
    ever came. The damaged code must surface as itself (main.run's fail_safe)."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    monkeypatch.delitem(sys.modules, "link_tls", raising=False)
    failing = Failing("link_tls", ValueError("incompatible .mpy file"))
    monkeypatch.setattr(sys, "meta_path", [failing] + sys.meta_path)
    with pytest.raises(Exception) as caught:
        wiring_link.build_tls(str(ca))
    assert not isinstance(caught.value, wiring_link.Unavailable), str(caught.value)
    assert failing.tries == 1


def test_a_bad_ca_file_is_still_a_config_error(monkeypatch, tmp_path):
    """The fix above keeps the config error: a CA that does not parse holds the pile."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n")  # no END line
    monkeypatch.delitem(sys.modules, "link_tls", raising=False)
    with pytest.raises(wiring_link.Unavailable):
        wiring_link.build_tls(str(ca))
    assert "link_tls" not in sys.modules


@pytest.mark.parametrize("conf", [
    {},
    {"pile_id": "p-1", "meter": {"type": "ddsu666"}, "mqtt": {"host": "10.0.0.5"}},
    {"pile_id": "p-1", "meter": {"type": "s0"},
     "mqtt": {"host": "h", "secret": "9f" * 32, "tls_ca": "ca.pem"}, "ota": {"key": "c3" * 256},
     "wifi": {"ssid": "s"}, "ntp": {"host": "h"}},
], ids=["bare", "link", "everything"])
def test_the_boots_import_check_sees_a_damaged_wiring_link(monkeypatch, tmp_path, conf):
    """boot.py's check, as it runs (release_boot._import_main's loop, as boot.py's), with
    wiring_link damaged: main.run() imports it on every pile, after wiring.py is dropped, so it
    is not in MAIN_IMPORTS (kept loaded beside wiring.py: the peak the split removes) but among
    the modules the check imports and drops again, whatever config.json has. Before, a good
    release whose wiring_link.mpy was damaged since its trial failed inside run() (fail_safe ->
    reset) at every boot and was never rolled back."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    monkeypatch.delitem(sys.modules, "wiring_link", raising=False)
    failing = Failing("wiring_link", ValueError("incompatible .mpy file"))
    monkeypatch.setattr(sys, "meta_path", [failing] + sys.meta_path)
    why = release_boot._import_main(0, set(sys.modules))
    assert why is not None and why.startswith("wiring_link: ValueError("), why
    assert failing.tries == 1
    assert "wiring_link" not in sys.modules
    failing.armed = False  # sound again: the check passes and leaves it dropped
    assert release_boot._import_main(0, set(sys.modules) - {"wiring_link"}) is None
    assert "wiring_link" not in sys.modules
