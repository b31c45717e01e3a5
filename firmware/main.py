"""Wiring: board.json + config.json -> hardware objects -> the control loop under the watchdog.

The only firmware module that touches `machine`. Any unhandled error opens the contactor,
drives the pilot to F and stops feeding the watchdog, which resets the board.
"""
import gc
import logging
import sys
import time

import machine

VERSION = "0.1.0"

# Without a running watchdog (an error before it started), reboot after this long in the safe state.
_FAILSAFE_REBOOT_MS = 5000
_HOLD_POLL_MS = 100

_boot_ms = time.ticks_ms()


# Sources whose lines say something is wrong; the rest are INFO.
_WARNING_SOURCES = ("config", "fault", "meter", "outbox", "storage")


class _Console(logging.Handler):
    """micropython-logging hands each record here: one line per transition, stamped with the
    control loop's time (seconds since boot), the source as the logger's name."""

    now_ms = 0

    def emit(self, record):
        t = time.ticks_diff(_Console.now_ms, _boot_ms)
        # micropython-lib's logging (mip, manifest.py) hands the text formatted as record.message;
        # PyPI's micropython-logging (make flash) and CPython keep msg and args.
        text = record.message if hasattr(record, "message") else record.msg % record.args
        print("[%4d.%03d] %s: %s" % (t // 1000, t % 1000, record.name, text))


_console = _Console()
_sources = set()  # loggers given the console handler


def report(now_ms, what, text):
    """The modules' report callback: a record on the logger named after the source."""
    global lines_lost
    try:
        if lines_lost:
            _log(now_ms, "main", "%d line(s) lost before this one: the heap was full" % lines_lost)
            lines_lost = 0
        _log(now_ms, what, text)
    except MemoryError:
        # A full or fragmented heap (the collector has already run): the line is lost, not the
        # session. Building it is the commonest allocation, so a MemoryError lands here most
        # often, and an internal error would reset the pile under a charging car for a log
        # line. What the line says (a record, a fault) is kept elsewhere.
        lines_lost += 1
    if what == "fault":  # the last few, for diag.py
        if len(recent_faults) >= 8:
            recent_faults.pop(0)
        recent_faults.append((now_ms, text))


def _log(now_ms, what, text):
    """Loggers get the console handler here: micropython-logging does not propagate to the root."""
    log = logging.getLogger(what)
    if what not in _sources:
        _sources.add(what)
        log.addHandler(_console)
        log.setLevel(logging.INFO)
        log.propagate = False
    _Console.now_ms = now_ms
    log.log(logging.WARNING if what in _WARNING_SOURCES else logging.INFO, "%s", text)


recent_faults = []  # (ticks_ms, text)
lines_lost = 0  # report() lines a full heap kept from being printed, said with the next one
unavailable = None  # why hold_unavailable() holds the pile, for diag.py


def load_settings():
    """(board, config), then the config module is dropped: its tables are not needed again and
    a small heap wants the room back before the control modules load."""
    import config

    board = None
    try:
        board = config.load_board()
        conf = config.load_config()
        config.check_together(board, conf)
    except config.ConfigError as e:
        return board, None, str(e)
    finally:
        del sys.modules["config"]
        gc.collect()
    return board, conf, None


def build(board, conf):
    import charger as ch
    import controller
    import pilot
    import relay
    import session_record
    import session_store

    Pin = machine.Pin
    pins = board.pins
    levels = board.levels
    contactor = relay.Contactor(
        Pin(pins.contactor, Pin.OUT, value=1 - levels.contactor_on),
        None if pins.contactor_feedback is None else Pin(pins.contactor_feedback, Pin.IN),
        levels.contactor_on,
        levels.contactor_feedback_closed,
    )
    steady_plus = 0 if levels.pilot_pwm_inverted else pilot.DUTY_FULL
    pwm = machine.PWM(Pin(pins.pilot_pwm), freq=1000, duty_u16=steady_plus)  # 1 kHz: IEC 61851-1 A.2.2
    output = pilot.PilotOutput(pwm, levels.pilot_pwm_inverted)
    output.steady_plus()
    cal = board.pilot_adc
    sampler = pilot.PilotSampler(
        machine.ADC(Pin(pins.pilot_adc), atten=machine.ADC.ATTN_11DB),
        time.ticks_us, cal.uv_at_minus_12v, cal.uv_at_plus_12v,
    )
    proximity = None
    if pins.pp_adc is not None:
        proximity = pilot.ProximityInput(
            machine.ADC(Pin(pins.pp_adc), atten=machine.ADC.ATTN_11DB),
            board.pp_adc.pullup_ohm, board.pp_adc.supply_uv,
        )
    rcd = relay.ResidualCurrentMonitor(
        Pin(pins.rcd_fault, Pin.IN),
        Pin(pins.rcd_test, Pin.OUT, value=1 - levels.rcd_test_active),
        levels.rcd_fault_active, levels.rcd_test_active,
        conf.rcd_retry_s * 1000, conf.rcd_max_trips,
    )
    charger = ch.Charger(
        int(conf.max_current_a * 1000), int(board.ratings.max_current_a * 1000),
        conf.free_vend, conf.allow_ventilation, report, session_store.SettingsStore(SETTINGS_FILE),
    )
    # What set_availability and set_current_limit last set (docs/commands.md); a bad file: defaults.
    charger.load_settings(time.ticks_ms())
    tethered_ma = int((board.ratings.tethered_cable_a or 0) * 1000)
    records = session_record.Records(charger, contactor, build_meter(board, conf.meter),
                                     build_session_log(conf), conf.meter.failure_timeout_s * 1000,
                                     report)
    io = controller.Io(sampler, output, contactor, rcd, proximity, tethered_ma)
    return controller.Controller(io, charger, conf.standard, report, records)


# Files on the board's flash (docs/durability.md).
BOOT_COUNT_FILE = "boot_count.json"
OUTBOX_FILE = "outbox.jrnl"
SESSION_FILE = "session.json"
SETTINGS_FILE = "settings.json"


def build_session_log(conf):
    """Session records into the flash outbox; none without a pile id to name them by."""
    if conf.pile_id is None:
        report(time.ticks_ms(), "session", "no pile_id in config.json: sessions are not recorded")
        return None
    import journal
    import session_log
    import session_store

    # The boot counter goes up and is written back before any session can start: a power cut
    # can skip a number, never repeat one (session ids stay unique, docs/telemetry.md).
    counter = session_store.CounterStore(BOOT_COUNT_FILE)
    last = counter.load()
    if last is None:
        raise Unavailable("boot counter unreadable (%s): restore it above the cloud's last boot "
                          "for this pile" % counter.error)
    # A flash that takes no write now would fail again after a reset: hold the pile unavailable
    # (no reboot loop), never charge with ids that could repeat or records that cannot be kept.
    try:
        counter.save(last + 1)
    except OSError as e:
        raise Unavailable("boot counter not written to flash (%s): no session could be recorded; "
                          "free or replace the flash" % e) from None
    try:
        outbox = journal.Journal(OUTBOX_FILE)
    except OSError as e:
        raise Unavailable("outbox %s unreadable (%s): no session could be recorded" % (OUTBOX_FILE, e)) \
            from None
    return session_log.SessionLog(
        conf.pile_id, last + 1, outbox, session_store.SessionStore(SESSION_FILE),
        connector=conf.connector, metered=conf.meter.type != "none", checkpoint_s=conf.checkpoint_s,
        report=report)


CMD_COUNTER_FILE = "cmd_counter.json"


def build_link(board, conf, ctl):
    """The MQTT link (docs/telemetry.md), when config.json has an mqtt section and a pile id."""
    mconf = conf.mqtt
    if mconf is None:
        return None
    now = time.ticks_ms()
    if ctl.records.log is None:
        report(now, "mqtt", "no pile_id in config.json: no MQTT link")
        return None
    import mqtt_link

    tls = None if mconf.tls_ca is None else build_tls(mconf.tls_ca, mqtt_link)
    return mqtt_link.MqttLink(mconf, ctl, ctl.records.log, report, build_verifier(mconf),
                              fw=VERSION, board=board.name, reset=machine.reset, boot_ms=_boot_ms,
                              tls=tls)


def build_tls(path, mqtt_link):
    """The broker's CA, read once: a missing or bad file is a config error (pile unavailable)."""
    where = "config.json: mqtt: 'tls_ca'"
    try:
        with open(path, "rb") as f:
            ca = f.read()
    except OSError as e:
        raise Unavailable("%s: cannot read %s (%s)" % (where, path, e)) from None
    try:
        return mqtt_link.tls_context(ca)
    except ValueError as e:
        raise Unavailable("%s: %s is not a usable CA certificate (%s)" % (where, path, e)) from None


def build_verifier(mconf):
    """Remote commands need the key and a readable counter; otherwise they are refused (the
    link then does not subscribe to them). The key is never printed."""
    now = time.ticks_ms()
    if mconf.secret is None:
        report(now, "mqtt", "no secret in config.json: remote commands off")
        return None
    import binascii

    import command_auth
    import session_store

    store = session_store.CounterStore(CMD_COUNTER_FILE)
    last = store.load()
    if last is None:  # docs/commands.md: from 0 again, every captured command would be accepted
        report(now, "mqtt", "command counter unreadable (%s): remote commands refused" % store.error)
        return None
    return command_auth.CommandVerifier(binascii.unhexlify(mconf.secret), last_counter=last,
                                        counter_store=store)


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
        report(time.ticks_ms(), "wifi", "no Wi-Fi driver (%s): no network until reboot" % e)
        return None
    station = wifi.Station(wlan, wconf.ssid, wconf.password, report)
    station.start(time.ticks_ms())  # waits for the driver to start: before the watchdog and the loop
    return station


def build_clock(conf, ctl):
    """NTP time into the RTC, which time.time() reads (docs/network.md): an ntp section. A name
    lookup blocks on the board: only with the contactor open (issue 10, item 19)."""
    nconf = conf.ntp
    if nconf is None:
        return None
    import sntp

    contactor = ctl.contactor
    return sntp.SntpClient(nconf.host, machine.RTC().datetime, report, port=nconf.port,
                           interval_s=nconf.interval_s, start_jitter_s=nconf.start_jitter_s,
                           may_block=lambda: not contactor.closed)


class Unavailable(Exception):
    """The pile cannot charge until a technician fixes something; a reboot would not help."""


_PARITY = {"none": None, "even": 0, "odd": 1}  # machine.UART: 0 even, 1 odd


def build_meter(board, mconf):
    if mconf.type == "none":
        return None
    import meter

    Pin = machine.Pin
    pins = board.pins
    if mconf.type == "s0":
        # use_irq: counted from pin-interrupt edge times, so a stalled loop loses no pulse
        return meter.make_meter("s0", pulse_pin=Pin(pins.s0, Pin.IN), imp_per_kwh=mconf.imp_per_kwh,
                                active_low=mconf.s0_active_low, poll_interval_ms=mconf.poll_interval_ms,
                                use_irq=True)
    # timeout=0: reads never wait; the meter driver polls uart.any() from the control tick.
    uart = machine.UART(pins.meter_uart, baudrate=mconf.baud, bits=8, parity=_PARITY[mconf.parity],
                        stop=1, tx=pins.meter_tx, rx=pins.meter_rx, timeout=0, timeout_char=0)
    de = None if pins.meter_de is None else Pin(pins.meter_de, Pin.OUT, value=0)
    options = {"address": mconf.address, "baud": mconf.baud, "poll_interval_ms": mconf.poll_interval_ms}
    if mconf.timeout_ms is not None:
        options["timeout_ms"] = mconf.timeout_ms
    return meter.make_meter(mconf.type, uart=uart, de=de, **options)


def hold_unavailable(board, reason):
    """Config unusable: no charging until a technician fixes it. Rebooting would not help."""
    global unavailable
    unavailable = reason
    report(time.ticks_ms(), "config", reason)
    report(time.ticks_ms(), "main", "pile unavailable until the configuration is fixed")
    import pilot

    contactor = None
    if board is not None:
        levels = board.levels
        contactor = machine.Pin(board.pins.contactor, machine.Pin.OUT, value=1 - levels.contactor_on)
        minus_12v = pilot.DUTY_FULL if levels.pilot_pwm_inverted else 0
        pwm = machine.PWM(machine.Pin(board.pins.pilot_pwm), freq=1000, duty_u16=minus_12v)
        pilot.PilotOutput(pwm, levels.pilot_pwm_inverted).state_f()
    while True:
        if contactor is not None:
            contactor.value(1 - board.levels.contactor_on)
        machine.idle()
        time.sleep_ms(_HOLD_POLL_MS)


def fail_safe(ctl, exc):
    """Last resort: contactor open and pilot F first, then say why, then let the board reset."""
    if ctl is not None:
        try:
            ctl.safe_off()
        except Exception as e:  # noqa: BLE001 - pins failing too; the watchdog still resets us
            print("fail-safe: could not drive outputs:", repr(e))
    report(time.ticks_ms(), "main", "internal error, contactor open, pilot F, resetting")
    sys.print_exception(exc)
    start = time.ticks_ms()
    while time.ticks_diff(time.ticks_ms(), start) < _FAILSAFE_REBOOT_MS:
        if ctl is not None:
            ctl.contactor.open()  # keep asserting it; the watchdog is no longer fed
        machine.idle()
        time.sleep_ms(_HOLD_POLL_MS)
    machine.reset()


def run():
    ctl = link = wdt = board = conf = None
    try:
        board, conf, problem = load_settings()
        if problem:
            hold_unavailable(board, problem)
        try:
            ctl = build(board, conf)
            link = build_link(board, conf, ctl)
        except Unavailable as e:
            hold_unavailable(board, str(e))
        station = build_wifi(conf)
        clock = build_clock(conf, ctl)
        wdt = machine.WDT(timeout=conf.wdt_timeout_ms)
        report(time.ticks_ms(), "main", "firmware %s, board %s, %s, max %s A%s" % (
            VERSION, board.name, conf.standard, conf.max_current_a,
            ", free vend" if conf.free_vend else ""))
        period = conf.control_period_ms
        while True:
            start = time.ticks_ms()
            ctl.tick(start)
            ctl.records.poll(start)  # the records step: after the tick's power-off decision
            if station is not None:
                station.poll(start)
            if clock is not None:
                clock.poll(start, station is None or station.connected)
            if link is not None:
                link.poll(start)  # one non-blocking step; a hung link would starve the watchdog
            wdt.feed()  # only a loop that completed a tick feeds the watchdog
            spent = time.ticks_diff(time.ticks_ms(), start)
            if spent < period:
                time.sleep_ms(period - spent)
    except KeyboardInterrupt:  # Ctrl-C: mpremote, a technician at the REPL
        if ctl is not None:
            ctl.safe_off()  # first
        import diag

        diag.service_mode(machine, globals(), board, conf, ctl, link, wdt)
    except Exception as e:  # noqa: BLE001 - any error at all must end in the safe state
        fail_safe(ctl, e)
    finally:
        # Also on SystemExit, and after service mode's own safe_off: never leave power on.
        if ctl is not None:
            ctl.safe_off()


if __name__ == "__main__":
    run()
