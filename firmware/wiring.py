"""Wiring: board.json + config.json -> the firmware's objects (docs/architecture.md).

With wiring_link.py and boot.py the only modules that import `machine` or `network`: every
other module is given its pins, buses and clocks. The boot in two phases (issue 12): this module
reads the settings and builds the safety core and the records, then main.py drops it; then
wiring_link.py builds the link's parts, the Wi-Fi, the clock and the watchdog, and is dropped
too, before main.py makes the link, so that the boot's peak is neither module beside every
run-time module. main.py asks here for
idle, reset and a timer too.
"""
import gc
import sys
import time

import machine
from micropython import const

import console
import files


# The link's largest allocations, its out- and in-buffer (link_setup.py's _OUT_SIZE, _IN_SIZE):
# made at the settings (load_settings), while the heap is still whole.
_LINK_OUT_B = const(2048)
_LINK_IN_B = const(1024)
# What the link phase (wiring_link.link_parts) takes over when this module is dropped: "bufs",
# the link's (out-buffer, in-buffer); "ota", ota_lazy.survey() at the settings (None: ota.py
# loaded when the link binds). A plain dict: holding it keeps no function of this module alive.
handover = {}


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
    handover.clear()
    if conf.ota is not None and conf.mqtt is not None:  # on a heap still empty (ota_lazy.py)
        import ota_lazy

        handover["ota"] = ota_lazy.survey()
    if conf.mqtt is not None:
        # Made with the link, after every control module is loaded, the buffers would find the
        # heap cut into holes smaller than they are. Made here while it is still whole (where
        # config.py was), and handed over to the link's connection (issue 12).
        handover["bufs"] = bytearray(_LINK_OUT_B), bytearray(_LINK_IN_B)
    return board, conf, None


def build(board, conf):
    """The safety core on the board's pins, and the controller that ticks it: the one place the
    Controller is built (the virtual board and the bench build it here too)."""
    import charger as ch  # noqa: F401 - charger_restore's: loaded with the core, before the collection below
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
    # The charger made, then what set_availability and set_current_limit last set
    # (docs/commands.md; a bad file: defaults). Boot-only code: dropped at once, before the
    # records' modules load (issue 12).
    import charger_restore

    charger = charger_restore.build(
        int(conf.max_current_a * 1000), int(board.ratings.max_current_a * 1000),
        conf.free_vend, conf.allow_ventilation, report,
        session_store.SettingsStore(files.SETTINGS_FILE, gate),
        fallback_ma=int(conf.limit_fallback_a * 1000), wall=time.time, limit_ttl_s=conf.limit_ttl_s,
    )
    charger_restore.load_settings(charger, time.ticks_ms())
    del charger_restore, sys.modules["charger_restore"]
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
    import session_log  # noqa: F401 - session_restore's: loaded before this collection, as before
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
    import journal_scan  # boot-only code: dropped once the outbox is open (issue 12)

    try:
        outbox = journal_scan.load(files.OUTBOX_FILE, gate=gate)
    except OSError as e:
        raise Unavailable("outbox %s unreadable (%s): no session could be recorded"
                          % (files.OUTBOX_FILE, e)) from None
    finally:
        del journal_scan, sys.modules["journal_scan"]
    # The log opened, and a session the power cut found for it to close. Boot-only code: dropped
    # at once (issue 12).
    import session_restore

    log = session_restore.load(
        conf.pile_id, last + 1, outbox, session_store.SessionStore(files.SESSION_FILE),
        connector=conf.connector, metered=conf.meter.type != "none", checkpoint_s=conf.checkpoint_s,
        report=console.report, gate=gate, linked=conf.mqtt is not None)
    del session_restore, sys.modules["session_restore"]
    return log


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
    """The meter driver for `kind`: ddsu666, sdm120, sdm630, dlt645 or s0. The arguments are
    checked here, at the boot, not by the drivers that stay loaded; meter_setup.py (and
    s0_setup.py or dlt645_setup.py) makes the driver (boot-only code: dropped at once, issue 12)."""
    if kind not in ("ddsu666", "sdm120", "sdm630", "dlt645", "s0"):
        raise ValueError("unknown meter kind %r" % (kind,))
    if kind == "s0":
        if pulse_pin is None:
            raise ValueError("s0: needs pulse_pin")
    elif uart is None:
        raise ValueError("%s: needs a uart" % kind)
    elif kind != "dlt645":
        if "baud" not in options:  # the meter's factory default, as config.py sets it for a pile
            import config
            options["baud"] = config.METER_DEFAULT_BAUD[kind]
        if not 1 <= options.get("address", 1) <= 247:  # Modbus unicast addresses
            raise ValueError("modbus: address %d not in 1..247" % options["address"])
    import meter_setup

    try:
        if kind == "s0":
            import s0_setup

            return s0_setup.build(pulse_pin, **options)
        if kind == "dlt645":
            import dlt645_setup

            return dlt645_setup.build(uart, de, **options)
        return meter_setup.modbus(uart, de, model=kind, **options)
    finally:
        del meter_setup
        for name in ("meter_setup", "s0_setup", "dlt645_setup"):
            sys.modules.pop(name, None)


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


def service_timer(period_ms, callback):
    """A periodic timer for service mode (diag.py): soft on an ESP32, so it runs at the REPL."""
    timer = machine.Timer(0)
    timer.init(mode=machine.Timer.PERIODIC, period=period_ms, callback=callback)
    return timer


# machine's own, not functions of this module: main.py keeps them and drops this module after
# the boot (a function defined here would keep all of it on the heap).
idle = machine.idle
reset = machine.reset
