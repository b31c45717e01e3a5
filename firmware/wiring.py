"""Wiring: board.json + config.json -> the firmware's objects (docs/architecture.md).

With boot.py the only module that imports `machine` or `network`: every other module is given
its pins, buses and clocks. main.py asks here for the watchdog, idle, reset and a timer too.
"""
import gc
import sys
import time

import machine
from micropython import const

import console
import files
from version import VERSION


# The link's largest allocations, its out- and in-buffer (mqtt_conn.py's _OUT_SIZE + _IN_SIZE,
# 3 KiB) with room for what is made beside them: held from the settings on (_reserve_link_room).
_LINK_ROOM_B = const(4096)
_link_room = None
_ota_surveyed = None  # ota_lazy.survey() at the settings: None, ota.py loaded when the link binds


class Unavailable(Exception):
    """The pile cannot charge until a technician fixes something; a reboot would not help."""


def load_settings():
    """(board, config), then the config module is dropped: its tables are not needed again and
    a small heap wants the room back before the control modules load."""
    import config

    board = None
    try:
        board = config.load_board(files.BOARD_FILE)
        conf = config.load_config(files.CONFIG_FILE)
        config.check_together(board, conf)
    except config.ConfigError as e:
        return board, None, str(e)
    finally:
        del sys.modules["config"]
        gc.collect()
    global _ota_surveyed
    if conf.ota is not None and conf.mqtt is not None:  # on a heap still empty (ota_lazy.py)
        import ota_lazy

        _ota_surveyed = ota_lazy.survey()
    if conf.mqtt is not None:
        _reserve_link_room(True)
    return board, conf, None


def _reserve_link_room(hold):
    """The link's buffers are made after every control module is loaded, when the heap is cut
    into holes smaller than they are. Held here while the heap is still whole (where config.py
    was), and let go just before the link is built: they find a block (issue 12)."""
    global _link_room
    _link_room = bytearray(_LINK_ROOM_B) if hold else None
    if not hold:
        gc.collect()


def build(board, conf):
    """The safety core on the board's pins, and the controller that ticks it: the one place the
    Controller is built (the virtual board and the bench build it here too)."""
    import charger as ch
    import controller
    import flash_gate
    import pilot
    import relay
    import session_record
    import session_store

    gc.collect()  # each group's import garbage, before the next: its holes are filled, not left
    report = console.report  # looked up now: the virtual board and the bench replace it
    Pin = machine.Pin
    pins = board.pins
    levels = board.levels
    contactor = relay.Contactor(
        Pin(pins.contactor, Pin.OUT, value=1 - levels.contactor_on),
        None if pins.contactor_feedback is None else Pin(pins.contactor_feedback, Pin.IN),
        levels.contactor_on,
        levels.contactor_feedback_closed,
    )
    gate = flash_gate.FlashGate(contactor, report)  # no flash write while closed
    console.hold = gate  # type: ignore[assignment]  # nor a console burst: its queue waits on the same contactor
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
        conf.free_vend, conf.allow_ventilation, report,
        session_store.SettingsStore(files.SETTINGS_FILE, gate),
        fallback_ma=int(conf.limit_fallback_a * 1000), wall=time.time, limit_ttl_s=conf.limit_ttl_s,
    )
    # What set_availability and set_current_limit last set (docs/commands.md); a bad file: defaults.
    charger.load_settings(time.ticks_ms())
    tethered_ma = int((board.ratings.tethered_cable_a or 0) * 1000)
    records = session_record.Records(charger, contactor, build_meter(board, conf.meter),
                                     build_session_log(conf, gate), conf.meter.failure_timeout_s * 1000,
                                     report, gate)
    io = controller.Io(sampler, output, contactor, rcd, proximity, tethered_ma)
    return controller.Controller(io, charger, conf.standard, report, records)


def build_session_log(conf, gate=None):
    """Session records into the flash outbox; none without a pile id to name them by."""
    if conf.pile_id is None:
        console.report(time.ticks_ms(), "session", "no pile_id in config.json: sessions are not recorded")
        return None
    import journal
    import session_log
    import session_store

    gc.collect()
    # The boot counter goes up and is written back before any session can start: a power cut
    # can skip a number, never repeat one (session ids stay unique, docs/telemetry.md).
    counter = session_store.CounterStore(files.BOOT_COUNT_FILE)
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
        outbox = journal.Journal(files.OUTBOX_FILE, gate=gate)
    except OSError as e:
        raise Unavailable("outbox %s unreadable (%s): no session could be recorded"
                          % (files.OUTBOX_FILE, e)) from None
    return session_log.SessionLog(
        conf.pile_id, last + 1, outbox, session_store.SessionStore(files.SESSION_FILE),
        connector=conf.connector, metered=conf.meter.type != "none", checkpoint_s=conf.checkpoint_s,
        report=console.report, gate=gate, linked=conf.mqtt is not None)


def build_link(board, conf, ctl):
    """The MQTT link (docs/telemetry.md), when config.json has an mqtt section and a pile id."""
    mconf = conf.mqtt
    if mconf is None:
        return None
    now = time.ticks_ms()
    if ctl.records.log is None:
        console.report(now, "mqtt", "no pile_id in config.json: no MQTT link")
        return None
    gc.collect()  # as in build(): on a heap of .mpy bytecode these collections save ~10 KiB
    import link_heal
    import mqtt_link

    gc.collect()
    tls = None if mconf.tls_ca is None else build_tls(mconf.tls_ca, mqtt_link)
    updater = None
    if conf.ota is not None:  # over-the-air updates (docs/ota.md): ota.py loaded while it has work
        import ota_lazy

        updater = ota_lazy.Updater(conf.ota.key, board.name, conf.ota.trial_s, VERSION, machine.reset,
                                   surveyed=_ota_surveyed)
    _reserve_link_room(False)
    # A reservation on flash only while a close may come: a car plugged in (docs/commands.md).
    # (A bound method: a lambda here would keep this module alive after main drops it.)
    verifier = build_verifier(mconf, ctl.records.gate, ctl.charger.has_session)
    return mqtt_link.MqttLink(mconf, ctl, ctl.records.log, console.report, verifier,
                              fw=VERSION, board=board.name, reset=machine.reset, boot_ms=console.boot_ms,
                              tls=tls, ota=updater, heal_store=link_heal.HealStore(files.HEAL_FILE),
                              reset_cause=reset_cause())


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


_PARITY = {"none": None, "even": 0, "odd": 1}  # machine.UART: 0 even, 1 odd


def build_meter(board, mconf):
    """The meter on the board's UART (or S0 pin), as config.json's meter section says."""
    if mconf.type == "none":
        return None
    Pin = machine.Pin
    pins = board.pins
    if mconf.type == "s0":
        # use_irq: counted from pin-interrupt edge times, so a stalled loop loses no pulse
        return make_meter("s0", pulse_pin=Pin(pins.s0, Pin.IN), imp_per_kwh=mconf.imp_per_kwh,
                          active_low=mconf.s0_active_low, poll_interval_ms=mconf.poll_interval_ms,
                          use_irq=True)
    # timeout=0: reads never wait; the meter driver polls uart.any() from the control tick.
    uart = machine.UART(pins.meter_uart, baudrate=mconf.baud, bits=8, parity=_PARITY[mconf.parity],
                        stop=1, tx=pins.meter_tx, rx=pins.meter_rx, timeout=0, timeout_char=0)
    de = None if pins.meter_de is None else Pin(pins.meter_de, Pin.OUT, value=0)
    options = {"address": mconf.address, "baud": mconf.baud, "poll_interval_ms": mconf.poll_interval_ms}
    if mconf.timeout_ms is not None:
        options["timeout_ms"] = mconf.timeout_ms
    return make_meter(mconf.type, uart=uart, de=de, **options)


def make_meter(kind, uart=None, de=None, pulse_pin=None, **options):
    """The meter driver for `kind`: ddsu666, sdm120, sdm630, dlt645 or s0."""
    if kind in ("ddsu666", "sdm120", "sdm630"):
        import modbus_meter
        return modbus_meter.ModbusMeter(uart, de, model=kind, **options)
    if kind == "dlt645":
        import dlt645
        return dlt645.Dlt645Meter(uart, de, **options)
    if kind == "s0":
        import s0_meter
        if pulse_pin is None:
            raise ValueError("s0: needs pulse_pin")
        return s0_meter.S0Meter(pulse_pin, **options)
    raise ValueError("unknown meter kind %r" % (kind,))


def hold_outputs(board):
    """Contactor open and pilot F for a pile held unavailable (main.hold_unavailable). Returns
    what asserts the contactor open again, or None without a usable board.json (boot.py's
    levels and the board's pull-downs hold then)."""
    if board is None:
        return None
    import pilot

    levels = board.levels
    off = 1 - levels.contactor_on
    contactor = machine.Pin(board.pins.contactor, machine.Pin.OUT, value=off)
    minus_12v = pilot.DUTY_FULL if levels.pilot_pwm_inverted else 0
    pwm = machine.PWM(machine.Pin(board.pins.pilot_pwm), freq=1000, duty_u16=minus_12v)
    pilot.PilotOutput(pwm, levels.pilot_pwm_inverted).state_f()
    return lambda: contactor.value(off)


def watchdog(timeout_ms):
    """The hardware watchdog: once started, an ESP32's cannot be stopped (evse-facts section 6)."""
    return machine.WDT(timeout=timeout_ms)


def service_timer(period_ms, callback):
    """A periodic timer for service mode (diag.py): soft on an ESP32, so it runs at the REPL."""
    timer = machine.Timer(0)
    timer.init(mode=machine.Timer.PERIODIC, period=period_ms, callback=callback)
    return timer


def reset_cause():
    """machine.reset_cause(), or None where the port has none."""
    try:
        return machine.reset_cause()
    except (AttributeError, OSError):
        return None


# machine's own, not functions of this module: main.py keeps them and drops this module after
# the boot (a function defined here would keep all of it on the heap).
idle = machine.idle
reset = machine.reset
