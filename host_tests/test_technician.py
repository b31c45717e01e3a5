"""The technician's path (tools/technician.py) on a virtual board (pilehost/vboard.py): flash twice,
provision (a bad config first), the firmware's session reaching the reference consumer exactly
once, diag, clear-fault and reboot; all through mpremote on a pty, as on a pile. Also service
mode's watchdog timer (diag.service_mode) on the virtual clock and diag.py on CPython."""
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest

import charger as ch  # firmware/
import machine  # sim/machine.py
import version
import wiring
import vboard_hw
import world
from pilehost import ROOT, vboard
from pilehost.cloud import Store
from pilehost.procs import wait_for
from pilehost.virtual_board import VirtualBoard as ClockedBoard
from pilehost import technician

TOOL = os.path.join(ROOT, "tools", "technician.py")
PILE = "vb-pile-1"
SECRET_HEX = bytes(range(100, 132)).hex()
# One session, then an RCD lock-out (rcd_max_trips 1 in the config): a latched fault to clear.
STEPS = [(300, "plug"), (1000, "request"), (2500, "rcd_leak", True), (2800, "rcd_leak", False),
         (4000, "unplug")]
WDT_S = 2  # config.json's wdt_timeout_ms default
BOOT_S = 20  # a boot and a session on a busy 2-CPU CI host; loopback MQTT is fast


def tech(*args, ok=True):
    r = subprocess.run([sys.executable, TOOL] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=180)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def diag(port):
    return json.loads(tech("diag", port, "--json").stdout)


@pytest.fixture
def board(tmp_path, vboard_tools):
    vb = vboard.VirtualBoard(str(tmp_path / "vb"), meter={"type": "ddsu666"}, steps=STEPS).start()
    yield vb
    vb.stop()


@pytest.fixture
def store(tmp_path, new_broker):
    b = new_broker(tmp_path / "mosquitto")
    s = Store(b.url(), tmp_path / "telemetry.db")
    s.port = b.port
    yield s
    s.stop()


def write_config(path, **changes):
    conf = {"pile_id": PILE, "free_vend": True, "rcd_max_trips": 1, "meter": {"type": "ddsu666"}}
    conf.update(changes)
    path.write_text(json.dumps(conf))
    return path


def test_flash_provision_diag_clear_reboot(board, store, tmp_path):
    port = board.port
    first = tech("flash", port).stdout
    plan, _ = technician.flash_plan("ref-esp32")
    assert "%d files: %d copied, 0 unchanged" % (len(plan), len(plan)) in first, first
    assert "every hash matches" in first and "MISMATCH" not in first
    second = tech("flash", port).stdout
    assert "%d files: 0 copied, %d unchanged" % (len(plan), len(plan)) in second, second
    on_board = technician.board_hashes(port, [dest for _, dest in plan])["sha"]
    assert on_board == {dest: technician.sha256_file(src) for src, dest in plan}
    d = diag(port)  # main.py was not on the flash at power-on: diag reads the files
    assert (d["firmware"], d["fw"], d["board"], d["pile_id"], d["state"]) == (
        "not running", version.VERSION, "ref-esp32", None, None)

    # A bad config: refused on the host, naming the key, the secret never echoed, nothing sent.
    mqtt = {"host": "127.0.0.1", "port": store.port, "secret": SECRET_HEX, "keepalive_s": 10}
    for bad, key in ((write_config(tmp_path / "bad1.json", max_current_a=90, mqtt=mqtt), "max_current_a"),
                     (write_config(tmp_path / "bad2.json", mqtt=dict(mqtt, secret="not-hex-" + SECRET_HEX)),
                      "secret")):
        r = tech("provision", port, bad, ok=False)
        assert r.returncode == 2 and "'%s'" % key in r.stderr, r.stderr
        assert SECRET_HEX not in r.stdout + r.stderr
    assert technician.board_hashes(port, ["config.json"])["sha"]["config.json"] is None
    assert board.boots() == 1

    good = write_config(tmp_path / "pile.json", mqtt=mqtt)
    out = tech("provision", port, good).stdout
    assert "pile_id %s" % PILE in out and "mqtt.secret set (not shown)" in out, out
    assert SECRET_HEX not in out

    # It reboots, runs the car's script and reports the session: stored once, delivered once.
    board.wait_for(vboard.POWER_ON, BOOT_S, count=2)
    session = PILE + "-1-1"
    wait_for(lambda: store.handler.storage.query(
        "SELECT stop_reason FROM sessions WHERE session_id = ?", (session,)), "the session", BOOT_S)
    assert store.handler.storage.query("SELECT stop_reason FROM sessions") == [("rcd_lockout",)]
    stats = store.handler.stats.snapshot()[0]
    assert stats.get("session_ended_new") == 1 and not stats.get("session_ended_duplicate"), stats

    d = diag(port)  # interrupts main.py: service mode
    assert d["firmware"] == "service mode" and 0 < d["service_left_s"] <= 1800
    assert (d["fw"], d["board"], d["pile_id"], d["boot"]) == (version.VERSION, "ref-esp32", PILE, 1)
    assert d["state"] == ch.FAULT and d["pilot"] == "F" and d["faults"] == ["rcd_lockout"]
    assert d["contactor"] == {"commanded": "open", "feedback": "open"}
    assert any("raised rcd_lockout" in line for line in d["recent_faults"]), d["recent_faults"]
    assert d["journal"] == {"records": 0, "bytes": 0}  # every record acknowledged by the broker
    assert d["broker"]["connected"] is True and d["broker"]["port"] == store.port
    assert d["meter"]["reading"]["energy_wh"] > 0 and d["meter"]["errors"] == 0
    assert d["heap_free"] > 0 and SECRET_HEX not in json.dumps(d)
    assert "service mode (Ctrl-C): contactor open, pilot F" in board.console()

    time.sleep(WDT_S + 1)  # a technician's pause: only the service timer feeds the watchdog now
    assert board.boots() == 2
    r = tech("clear-fault", port, "welded", ok=False)
    assert r.returncode == 2 and "not active" in r.stderr
    assert tech("clear-fault", port, "nonsense", ok=False).returncode == 2
    tech("clear-fault", port, "rcd_lockout")
    assert diag(port)["faults"] == []

    tech("reboot", port)
    board.wait_for(vboard.POWER_ON, BOOT_S, count=3)
    board.wait_for("main: firmware", BOOT_S, count=2)
    d = diag(port)
    assert (d["boot"], d["state"], d["faults"], d["firmware"]) == (2, ch.IDLE, [], "service mode")
    assert store.handler.storage.query("SELECT count(*) FROM sessions") == [(1,)]  # no replay


# -- service mode on the virtual clock -------------------------------------------------------------


def test_service_mode_feeds_the_watchdog_then_resets(monkeypatch):
    import diag

    monkeypatch.setattr(diag, "_service", None)
    monkeypatch.setattr(world, "World", vboard_hw.VboardWorld)
    monkeypatch.setattr(machine, "Timer", vboard_hw.Timer, raising=False)
    vb = ClockedBoard(monkeypatch, steps=[(300, "plug"), (1000, "request")])
    vb.run_until(2000)
    assert vb.world.contacts  # charging
    wdt_ms = 2000
    wdt = machine.WDT(timeout=wdt_ms)
    limit_ms = 60000
    vb.ctl.safe_off()  # main.run() on Ctrl-C, then:
    diag.service_mode(None, types.SimpleNamespace(wdt_timeout_ms=wdt_ms), vb.ctl, None, wdt,
                      wiring.service_timer, wiring.reset, limit_ms=limit_ms)
    assert "service mode (Ctrl-C): contactor open, pilot F; reset in 60 s" in vb.reported("main")
    start = vb.now_ms
    with pytest.raises(world.SimReset):
        while True:  # the REPL touching the hardware now and then, 0.1 s apart
            vb.clock.t += 100000
            vb.world.advance()
            assert not vb.world.coil and vb.world.pwm_duty == 0  # open, pilot F throughout
    # Not the watchdog (2 s): the service time's end, through diag.reboot().
    assert vb.now_ms - start >= limit_ms - 200
    assert vb.world.wdt_timeout_us is not None


def test_without_service_mode_the_watchdog_resets(monkeypatch):
    monkeypatch.setattr(world, "World", vboard_hw.VboardWorld)
    vb = ClockedBoard(monkeypatch)
    vb.world.wdt_start(2000)
    with pytest.raises(world.SimReset):
        for _ in range(30):
            vb.clock.t += 100000
            vb.world.advance()


# -- diag.py and the host checks, on CPython -----------------------------------------------------------


def test_diag_reads_the_flash_when_main_never_ran(monkeypatch, tmp_path):
    import gc

    import diag

    monkeypatch.setattr(gc, "mem_free", lambda: 1234, raising=False)  # MicroPython's
    monkeypatch.setattr(diag, "_service", None)  # no Ctrl-C came: main.py never ran
    monkeypatch.chdir(tmp_path)
    (tmp_path / "version.py").write_text('VERSION = "9.8.7"\n')  # what is on this flash
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "version", raising=False)
    shutil.copy(os.path.join(ROOT, "boards", "ref-esp32.json"), tmp_path / "board.json")
    write_config(tmp_path / "config.json", mqtt={"host": "10.0.0.5", "port": 1883, "username": "u",
                                                  "password": "pw-" + SECRET_HEX, "secret": SECRET_HEX})
    d = diag.state()
    assert (d["fw"], d["board"], d["pile_id"], d["firmware"]) == ("9.8.7", "ref-esp32", PILE, "not running")
    assert d["broker"] == {"host": "10.0.0.5", "port": 1883, "connected": None, "last_error": None}
    assert d["journal"] == {"records": 0, "bytes": 0} and d["state"] is None
    assert SECRET_HEX not in json.dumps(d)
    assert not os.path.exists(tmp_path / "outbox.jrnl")  # diag writes nothing


@pytest.mark.parametrize("changes, key", [
    ({"max_current_a": 5}, "max_current_a"),
    ({"meter": {"type": "ddsu666", "adress": 3}}, "adress"),
    ({"mqtt": {"host": "10.0.0.5", "username": "u", "password": 7}}, "password"),
])
def test_check_config_names_the_key(tmp_path, changes, key):
    with pytest.raises(technician.ToolError, match="'%s'" % key):
        technician.check_config(str(write_config(tmp_path / "pile.json", **changes)))


def test_check_config_against_the_board(tmp_path):
    with open(os.path.join(ROOT, "boards", "ref-esp32.json")) as f:
        board = json.load(f)
    board["pins"]["meter_tx"] = None
    with pytest.raises(technician.ToolError, match="meter_tx"):
        technician.check_config(str(write_config(tmp_path / "pile.json")), board)
    (tmp_path / "broken.json").write_text('{"pile_id": "x", "mqtt": {"secret": "%s",}}' % SECRET_HEX)
    with pytest.raises(technician.ToolError) as e:
        technician.check_config(str(tmp_path / "broken.json"))
    assert "not valid JSON" in str(e.value) and SECRET_HEX not in str(e.value)


def test_the_brokers_ca_is_found_beside_the_config_and_checked(tmp_path):
    tls = {"host": "10.0.0.5", "secret": SECRET_HEX, "tls_ca": "ca.pem"}
    path = str(write_config(tmp_path / "pile.json", mqtt=tls))
    _, conf = technician.check_config(path)
    with pytest.raises(technician.ToolError, match="'tls_ca'.*cannot read"):
        technician.ca_file(path, conf)
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(technician.ToolError, match="'tls_ca'.*not a certificate"):
        technician.ca_file(path, conf)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert technician.ca_file(path, conf) == (str(tmp_path / "ca.pem"), "ca.pem")
    _, plain = technician.check_config(str(write_config(tmp_path / "plain.json")))
    assert technician.ca_file(str(tmp_path / "plain.json"), plain) is None
