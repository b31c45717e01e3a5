"""Wi-Fi station (firmware/wifi.py) on CPython against the simulated ESP32 driver (sim/network.py)
on a virtual clock: joining, a lost access point, attempts called off and backed off with
jitter, the password never printed; then the firmware on the unix port losing Wi-Fi mid-session."""

import pytest
from pilehost.virtual_board import VirtualClock, board_dict

import backoff
import config
import network
import wifi
import world

SSID = "depot"
PASSWORD = "sim-passphrase"


class FailingWlan:
    """A driver that refuses: active(True) or connect() raise, as on a board with a broken radio."""

    def __init__(self, fail_active=False):
        self.fail_active = fail_active
        self.connects = 0

    def active(self, flag=None):
        if self.fail_active:
            raise OSError("Wifi Unknown Error 0x0101")
        return True

    def connect(self, ssid, key):
        self.connects += 1
        raise OSError("Wifi Internal Error")

    def isconnected(self):
        return False


class Rig:
    """The station over the simulated driver; virtual time in 100 ms polls."""

    def __init__(self, monkeypatch, password=PASSWORD, start_us=0, wlan=None):
        self.clock = VirtualClock(start_us=start_us, read_cost_us=0)
        self.world = world.World(board_dict(), clock_us=self.clock.ticks_us, echo=False)
        self.world.ap = (SSID, PASSWORD)
        monkeypatch.setattr(world, "WORLD", self.world, raising=False)
        monkeypatch.setattr(network, "_station", None)
        self.wlan = wlan or network.WLAN(network.STA_IF)
        self.lines = []
        self.station = wifi.Station(self.wlan, SSID, password, self.report)
        self.started = self.station.start(self.ms())

    def ms(self):
        return self.clock.ticks_ms()

    def report(self, now_ms, what, text):
        assert what == "wifi"
        self.lines.append((self.world.now // 1000, text))

    def run(self, for_ms, step_ms=100):
        end = self.world.now + for_ms * 1000
        while self.world.now < end:
            self.clock.t += step_ms * 1000
            self.station.poll(self.ms())
            self.world.advance()

    def do(self, action):
        self.world.advance()
        self.world.do(action)

    def texts(self):
        return [text for _, text in self.lines]


def test_joins_and_reports_the_address(monkeypatch):
    rig = Rig(monkeypatch)
    assert rig.started and rig.wlan.active()
    rig.run(500)
    assert not rig.station.connected
    rig.run(500)  # the simulated driver takes 0.7 s to join
    assert rig.station.connected
    assert rig.texts() == ["connecting to 'depot'", "connected to 'depot' as 192.168.4.23"]


def test_a_short_outage_is_bridged_by_the_drivers_own_retries(monkeypatch):
    rig = Rig(monkeypatch)
    rig.run(1000)
    rig.do("wifi_down")
    rig.run(1500)  # lost after the beacon timeout
    assert not rig.station.connected
    rig.run(3000)
    rig.do("wifi_up")
    rig.run(1000)
    assert rig.station.connected
    assert rig.station.attempts == 1 and rig.station.losses == 1  # no new connect() was needed
    assert rig.texts()[2:] == ["lost 'depot', reconnecting",
                               "connected to 'depot' as 192.168.4.23 after 4.2 s without"]


def pauses(rig):
    """The pause after each called-off attempt, in ms, from 'next try in S.D s'."""
    out = []
    for text in rig.texts():
        if "next try in" in text:
            s = text.rsplit("next try in ", 1)[1][:-2]
            out.append(int(float(s) * 1000))
    return out


def test_a_long_outage_calls_attempts_off_and_backs_off_with_jitter(monkeypatch):
    rig = Rig(monkeypatch)
    rig.run(1000)
    rig.do("wifi_down")
    rig.run(22000)  # lost after 1 s, called off 20 s later
    assert len(pauses(rig)) == 1
    assert rig.wlan.status() == network.STAT_IDLE  # disconnect(): the driver rests in the pause
    rig.run(40 * 60 * 1000, step_ms=250)
    found = pauses(rig)
    assert len(found) >= 8
    # 2 s doubling to 5 min; each pause somewhere in the second half (0.1 s resolution)
    for i, pause in enumerate(found):
        full = min(2000 << i, 300000)
        assert full // 2 - 100 <= pause <= full, (i, pause, full)
    assert len(set(found[6:])) > 1  # jitter: the capped pauses differ
    assert all("within 20 s (no AP found)" in text for text in rig.texts() if "next try" in text)
    rig.do("wifi_up")
    rig.run(6 * 60 * 1000)
    assert rig.station.connected
    last = rig.texts()[-1]
    assert last.startswith("connected to 'depot' as 192.168.4.23 after ")
    # back at the first step after a success
    rig.do("wifi_down")
    rig.run(23000)
    assert pauses(rig)[-1] <= 2000


def test_a_wrong_password_is_named_and_never_printed(monkeypatch):
    rig = Rig(monkeypatch, password="wrong-passphrase")
    rig.run(25000)
    assert not rig.station.connected
    assert "no connection to 'depot' within 20 s (wrong password)" in rig.texts()[-1]
    for text in rig.texts():
        assert "passphrase" not in text


def test_ticks_wrap_around_changes_nothing(monkeypatch):
    wrap_us = (1 << 30) * 1000  # ticks_ms wraps here (the ports' period)
    rig = Rig(monkeypatch, start_us=wrap_us - 300000)
    rig.run(1000)
    assert rig.station.connected
    rig.do("wifi_down")
    rig.run(23000)
    assert pauses(rig) and pauses(rig)[0] <= 2000


def test_an_interface_that_will_not_start_leaves_the_pile_without_network(monkeypatch):
    wlan = FailingWlan(fail_active=True)
    rig = Rig(monkeypatch, wlan=wlan)
    assert not rig.started
    rig.run(5000)
    assert wlan.connects == 0 and not rig.station.connected
    assert rig.texts() == ["interface would not start (Wifi Unknown Error 0x0101): no network until reboot"]


def test_connect_raising_is_a_failed_attempt(monkeypatch):
    wlan = FailingWlan()
    rig = Rig(monkeypatch, wlan=wlan)
    rig.run(10000)
    assert wlan.connects >= 3
    assert rig.texts()[0].startswith("connect() failed (Wifi Internal Error); next try in ")


@pytest.mark.parametrize("delay", [1000, 2000, 4000, 60000, 300000])
def test_jitter_stays_in_the_second_half(delay):
    """backoff.jitter: the Wi-Fi's pauses (2 s-5 min) and the MQTT link's (1 s-60 s)."""
    seen = {backoff.jitter(delay) for _ in range(300)}
    assert min(seen) >= delay // 2 and max(seen) <= delay and len(seen) > 10


# -- config ----------------------------------------------------------------------------------------

def test_wifi_config():
    conf = config.parse_config({"wifi": {"ssid": "depot", "password": "x" * 8}})
    assert (conf.wifi.ssid, conf.wifi.password) == ("depot", "x" * 8)
    assert config.parse_config({"wifi": {"ssid": "open-net"}}).wifi.password == ""
    assert config.parse_config({"wifi": {"ssid": "d", "password": "ab" * 32}}).wifi.password == "ab" * 32
    assert config.parse_config({}).wifi is None


@pytest.mark.parametrize("section, key", [
    ({}, "ssid"),
    ({"ssid": ""}, "ssid"),
    ({"ssid": "x" * 33}, "ssid"),
    ({"ssid": "depot", "channel": 6}, "channel"),
    ({"ssid": "depot", "password": "secret1"}, "password"),  # 7 characters
    ({"ssid": "depot", "password": "S3cret!" * 10}, "password"),  # 70
    ({"ssid": "depot", "password": "zz" * 32}, "password"),  # 64, not hex
    ({"ssid": "depot", "password": 12345678}, "password"),
])
def test_bad_wifi_config_names_the_key_never_the_password(section, key):
    with pytest.raises(config.ConfigError) as e:
        config.parse_config({"wifi": section})
    text = str(e.value)
    assert "config.json: wifi" in text and "'%s'" % key in text
    password = section.get("password")
    if isinstance(password, str):
        assert password not in text


def test_wifi_needs_the_pilot_adc_on_adc1():
    board = config.parse_board(board_dict())
    conf = config.parse_config({"wifi": {"ssid": "depot"}})
    config.check_together(board, conf)  # the reference board reads the pilot on GPIO 36 (ADC1)
    data = board_dict()
    data["pins"]["pilot_adc"] = 14  # ADC2 channel 6
    with pytest.raises(config.ConfigError, match="pins.pilot_adc = .* ADC2"):
        config.check_together(config.parse_board(data), conf)
    config.check_together(config.parse_board(data), config.parse_config({}))  # no Wi-Fi: fine


# -- the firmware on the unix port ------------------------------------------------------------------

from pilehost import unix_port  # noqa: E402

C_TO_B_LIMIT_MS = 100  # IEC 61851-1 Table A.6 seq. 8.1

try:
    HAVE_UNIX_PORT = bool(unix_port.micropython_binary())
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    HAVE_UNIX_PORT = False


@pytest.mark.skipif(not HAVE_UNIX_PORT, reason="MicroPython unix port not installed (make venv)")
def test_wifi_drops_mid_session_charging_goes_on_and_the_link_comes_back():
    r = unix_port.run_scenario("wifi_dropout")
    assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-30:])
    assert not any("Traceback" in line or "MemoryError" in line for line in r.lines), "\n".join(r.lines)
    steps = {}
    for t, text in r.sim_events("step"):
        steps.setdefault(text, t)
    coil = [(t, text) for t, text in r.sim_events("contactor") if text.startswith("coil")]
    on_at = [t for t, text in coil if text == "coil ON"]
    # closed before the Wi-Fi went, and nothing opened it until the car paused
    assert on_at[0] < steps["wifi_down"]
    outage = (steps["wifi_down"], steps["stop_request"])
    assert not [t for t, text in coil if text == "coil off" and outage[0] <= t < outage[1]]
    # the pause during the outage and the one after: both opened in time
    lat = r.result["latencies_ms"]
    assert len(lat) == 2 and max(lat) < C_TO_B_LIMIT_MS
    wifi_lines = [text for _, text in r.firmware_events("wifi")]
    assert wifi_lines[0] == "connecting to 'depot'"
    assert wifi_lines[1] == "connected to 'depot' as 192.168.4.23"
    assert wifi_lines[2] == "lost 'depot', reconnecting"
    assert wifi_lines[3].startswith("connected to 'depot' as 192.168.4.23 after ")
    joined = [t for t, text in r.sim_events("wifi") if text.startswith("station joined")]
    assert len(joined) == 2 and steps["wifi_up"] < joined[1] < steps["wifi_up"] + 1500
    assert not any("sim-passphrase" in line for line in r.lines)
    assert r.firmware_events("charger")[-1][1].endswith("-> idle")
