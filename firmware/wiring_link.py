"""The boot's second phase (issue 12, docs/architecture.md): the MQTT link's parts, the Wi-Fi
station, the NTP clock and the watchdog, built after main.py has dropped wiring.py and dropped in
turn once they are built (main.py then makes the link of its parts). With wiring.py and boot.py
the only modules that import `machine` or `network`.
"""
import gc
import sys
import time

import machine

import console
import files
from version import VERSION


# machine.reset_cause() on the ESP32 (ports/esp32/modmachine.c).
_CAUSES = {1: "power_on", 2: "hard", 3: "wdt", 4: "deepsleep", 5: "soft"}


class Unavailable(Exception):
    """The pile cannot charge until a technician fixes something (as wiring.Unavailable)."""


def link_parts(board, conf, ctl, handover):
    """What makes the MQTT link (docs/telemetry.md), when config.json has an mqtt section and a
    pile id: (mqtt_link.MqttLink, its keyword arguments), all that needs this module or `machine`
    resolved; else (None, None). main.py makes the link after it has dropped this module: its
    bytecode is not on the heap beside link_setup.py's, the boot's peak (issue 12). handover:
    wiring.handover (the link's buffers, OTA's survey), taken over from the settings."""
    mconf = conf.mqtt
    if mconf is None:
        return None, None
    now = time.ticks_ms()
    if ctl.records.log is None:
        console.report(now, "mqtt", "no pile_id in config.json: no MQTT link")
        return None, None
    gc.collect()  # as in build(): on a heap of .mpy bytecode these collections save ~10 KiB
    import link_heal
    import mqtt_link

    gc.collect()
    tls = None if mconf.tls_ca is None else build_tls(mconf.tls_ca)
    updater = None
    if conf.ota is not None:  # over-the-air updates (docs/ota.md): ota.py loaded while it has work
        import ota_lazy

        updater = ota_lazy.Updater(conf.ota.key, board.name, conf.ota.trial_s, VERSION, machine.reset,
                                   surveyed=handover.get("ota"))
    bufs = handover.get("bufs")  # made at the settings (wiring.py); None: made by the link
    handover.clear()
    gc.collect()
    # A reservation on flash only while a close may come: a car plugged in (docs/commands.md).
    # (A bound method: a lambda here would keep this module alive after main drops it.)
    verifier = build_verifier(mconf, ctl.records.gate, ctl.charger.has_session)
    # The broker's host an address or a name for DNS: found now, not at the link's making (the
    # boot's heap peak). netaddr.py stays only for sntp.py (build_clock imports it again).
    had = "netaddr" in sys.modules
    import netaddr

    numeric = netaddr.numeric_host(mconf.host)
    if not had:
        sys.modules.pop("netaddr", None)
    return mqtt_link.MqttLink, {
        "conf": mconf, "ctl": ctl, "log": ctl.records.log, "report": console.report,
        "verifier": verifier, "fw": VERSION, "board": board.name, "reset": machine.reset,
        "boot_ms": console.boot_ms, "tls": tls, "ota": updater,
        "heal_store": link_heal.HealStore(files.HEAL_FILE), "reset_cause": reset_cause(), "bufs": bufs,
        "numeric_host": numeric}


def build_tls(path):
    """The broker's CA, read once: a missing or bad file is a config error (pile unavailable).
    link_tls.py is dropped again after (mqtt_conn.drop_setup): loaded when a handshake runs."""
    where = "config.json: mqtt: 'tls_ca'"
    try:
        with open(path, "rb") as f:
            ca = f.read()
    except OSError as e:
        raise Unavailable("%s: cannot read %s (%s)" % (where, path, e)) from None
    # The code first, outside the ValueError below: a damaged link_tls.mpy raises one too, and
    # is not the CA's fault (main.run's fail_safe, a reset: a trial release is rolled back).
    import link_tls
    from mqtt_conn import drop_setup

    try:
        return link_tls.tls_context(ca)
    except ValueError as e:
        raise Unavailable("%s: %s is not a usable CA certificate (%s)" % (where, path, e)) from None
    finally:
        drop_setup()


def build_verifier(mconf, gate=None, may_close=None):
    """Remote commands need the key and a readable counter; otherwise they are refused (the
    link then does not subscribe to them). The key is never printed."""
    now = time.ticks_ms()
    if mconf.secret is None:
        console.report(now, "mqtt", "no secret in config.json: remote commands off")
        return None
    import binascii

    import command_auth
    import commands
    import session_store

    store = session_store.CounterStore(files.CMD_COUNTER_FILE)
    last = store.load()
    if last is None:  # docs/commands.md: from 0 again, every captured command would be accepted
        console.report(now, "mqtt", "command counter unreadable (%s): remote commands refused" % store.error)
        return None
    verifier = command_auth.CommandVerifier(binascii.unhexlify(mconf.secret), last_counter=last,
                                            counter_store=store, gate=gate, unix_ms=commands.unix_ms,
                                            may_close=may_close)
    problem = verifier.reserve_ahead()  # at boot, open: a session's commands then write nothing
    if problem is not None:
        console.report(now, "storage", "command counter not reserved (%s): written per command" % problem)
    return verifier


def build_wifi(conf):
    """The Wi-Fi station (docs/network.md), when config.json has a wifi section."""
    wconf = conf.wifi
    if wconf is None:
        return None
    import network
    import wifi

    try:
        wlan = network.WLAN(network.STA_IF)
    except OSError as e:  # a radio that will not initialise must not keep the pile from charging
        console.report(time.ticks_ms(), "wifi", "no Wi-Fi driver (%s): no network until reboot" % e)
        return None
    station = wifi.Station(wlan, wconf.ssid, wconf.password, console.report)
    station.start(time.ticks_ms())  # waits for the driver to start: before the watchdog and the loop
    return station


def build_clock(conf, ctl):
    """NTP time into the RTC, which time.time() reads (docs/network.md): an ntp section. A name
    lookup blocks on the board: only with the contactor open (issue 10, item 19)."""
    nconf = conf.ntp
    if nconf is None:
        return None
    import sntp

    return sntp.SntpClient(nconf.host, machine.RTC().datetime, console.report, port=nconf.port,
                           interval_s=nconf.interval_s, start_jitter_s=nconf.start_jitter_s,
                           may_block=sntp.while_open(ctl.contactor))


def watchdog(timeout_ms):
    """The hardware watchdog: once started, an ESP32's cannot be stopped (evse-facts section 6)."""
    return machine.WDT(timeout=timeout_ms)


def reset_cause():
    """machine.reset_cause()'s name in the health message (docs/telemetry.md), "unknown" where
    the port has none. The names here: not in link_setup.py, the boot's heap peak."""
    try:
        return _CAUSES.get(machine.reset_cause(), "unknown")
    except (AttributeError, OSError):
        return "unknown"
