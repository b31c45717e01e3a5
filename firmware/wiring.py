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
    import controller  # noqa: F401 - new_controller's: loaded with the core, before the collection below
    import flash_gate  # noqa: F401 - new_gate's: loaded with the core, before the collection below
    import pilot
    import relay  # noqa: F401 - new_contactor's and new_rcd's, as flash_gate
    import session_record  # noqa: F401 - new_records', as flash_gate
    import session_store

    gc.collect()  # each group's import garbage, before the next: its holes are filled, not left
    report = console.report  # looked up now: the virtual board and the bench replace it
    Pin = machine.Pin
    pins = board.pins
    levels = board.levels
    contactor = new_contactor(
        Pin(pins.contactor, Pin.OUT, value=1 - levels.contactor_on),
        None if pins.contactor_feedback is None else Pin(pins.contactor_feedback, Pin.IN),
        levels.contactor_on,
        levels.contactor_feedback_closed,
    )
    gate = new_gate(contactor, report)  # no flash write while closed
    console.hold = gate  # nor a console burst: its queue waits on the same contactor
    steady_plus = 0 if levels.pilot_pwm_inverted else pilot.DUTY_FULL
    pwm = machine.PWM(Pin(pins.pilot_pwm), freq=1000, duty_u16=steady_plus)  # 1 kHz: IEC 61851-1 A.2.2
    output = new_output(pwm, levels.pilot_pwm_inverted)
    output.steady_plus()
    cal = board.pilot_adc
    sampler = new_sampler(
        machine.ADC(Pin(pins.pilot_adc), atten=machine.ADC.ATTN_11DB),
        time.ticks_us, cal.uv_at_minus_12v, cal.uv_at_plus_12v,
    )
    proximity = None
    if pins.pp_adc is not None:
        proximity = new_proximity(
            machine.ADC(Pin(pins.pp_adc), atten=machine.ADC.ATTN_11DB),
            board.pp_adc.pullup_ohm, board.pp_adc.supply_uv,
        )
    rcd = new_rcd(
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
    records = new_records(charger, contactor, build_meter(board, conf.meter), build_session_log(conf, gate),
                          conf.meter.failure_timeout_s * 1000, report, gate)
    return new_controller(sampler, output, contactor, rcd, proximity, tethered_ma, charger, conf.standard,
                          report, records)


def new_controller(sampler, output, contactor, rcd, proximity, tethered_ma, charger, standard, report=None,
                   records=None):
    """A controller.Controller, nothing seen yet, pilot F. What the tick reads and drives: the
    pilot's sampler and output, the contactor, the RCD monitor, and the cable: a PP input
    (`proximity`, or None), or a tethered cable's rating in mA. charger: the charger.Charger;
    standard: pilot.IEC or pilot.GBT; records: the records step (session_record.Records), or
    None: no such gate (tests of the safety core alone). Boot code (this module is dropped after
    it): controller.py has no __init__."""
    import controller
    import pilot

    c = controller.Controller()
    c.sampler = sampler
    c.output = output
    c.contactor = contactor
    c.rcd = rcd
    c.proximity = proximity
    c.tethered_cable_ma = tethered_ma
    c.charger = charger
    c.standard = standard
    c.records = records
    c._report = report
    # Not a module global: a name fewer interned (a heap qstr for good).
    c._c1_force_open_ms = {pilot.IEC: 6000, pilot.GBT: 3000}[standard]
    c.debouncer = pilot.PilotDebouncer(pilot.F)
    c.raw = pilot.F
    c._pwm_changed_ms = 0
    c._offer_changed_ms = None
    c._bad_diode_bursts = 0
    c._no_minus_bursts = 0
    c._minus_seen_ms = 0
    c._no_minus_run = 0
    c._pwm_settling_ms = None
    c.diode_checked = False
    c._last_open_ms = None
    c._pp_read_ms = 0
    c._pp_higher_ms = None
    return c


# The makers of the objects the boot builds (the classes have no __init__: its bytecode would stay
# on the heap for the run, issue 12). Boot code: this module is dropped after the boot.

def new_contactor(coil, feedback=None, coil_on=1, feedback_closed=0):
    """A relay.Contactor on its coil's Pin (the level `coil_on` closes it), opened; feedback: the
    auxiliary contact's Pin (its level `feedback_closed` when closed), or None."""
    import relay

    c = relay.Contactor()
    c._coil = coil
    c._feedback = feedback
    c._on = coil_on
    c._fb_closed = feedback_closed
    c.closed = False
    c._mismatch_since = None
    c.open()
    return c


def new_rcd(fault, test, fault_active=1, test_active=1, retry_ms=300000, max_trips=6):
    """A relay.ResidualCurrentMonitor on its FAULT and TEST Pins (their active levels), untested,
    TEST released; retry_ms and max_trips: its self-test retry and lock-out."""
    import relay

    r = relay.ResidualCurrentMonitor()
    r._fault = fault
    r._test = test
    r._fault_active = fault_active
    r._test_active = test_active
    r.retry_ms = retry_ms
    r.max_trips = max_trips
    r._since = 0
    r._fault_ms = 0
    r._fault_poll = None
    r._test_on = False
    r._switched_ms = None
    r.state = None
    r.session_ended()  # untested, no trip, TEST released
    return r


def new_sampler(adc, ticks_us, uv_at_minus_12v, uv_at_plus_12v, burst_us=None):
    """A pilot.PilotSampler on the CP line's ADC; the calibration maps ADC uV to CP mV;
    burst_us: None, pilot.BURST_US."""
    import pilot

    s = pilot.PilotSampler()
    s._read = adc.read_uv
    s._ticks_us = ticks_us
    s._uv_m12 = uv_at_minus_12v
    s._uv_span = uv_at_plus_12v - uv_at_minus_12v
    s._burst_us = pilot.BURST_US if burst_us is None else burst_us
    s.plus_mv = 0
    s.minus_mv = 0
    s.gap_us = 0
    return s


def new_proximity(adc, pullup_ohm, supply_uv):
    """A pilot.ProximityInput on the PP (CC) line's ADC, through the board's pull-up."""
    import pilot

    p = pilot.ProximityInput()
    p._adc = adc
    p._pullup = pullup_ohm
    p._supply = supply_uv
    return p


def new_output(pwm, inverted=False):
    """A pilot.PilotOutput on its PWM channel; it writes nothing until told."""
    import pilot

    o = pilot.PilotOutput()
    o._pwm = pwm
    o._inverted = inverted
    o.mode = None
    o.duty = None
    return o


def new_gate(contactor, report=None):
    """A flash_gate.FlashGate, nothing deferred, nothing written. contactor: anything with a
    `closed` attribute (relay.Contactor); report: the console callback, for a deferred write
    that failed. Boot code (this module is dropped after it): flash_gate.py has no __init__."""
    import durable
    import flash_gate

    gate = flash_gate.FlashGate()
    gate._contactor = contactor
    gate._report = report
    gate._due = []
    gate._open_steps = []
    gate._was_held = False
    gate._spent = False
    gate._mark = durable.written
    return gate


def new_records(charger, contactor, meter=None, log=None, meter_failure_ms=30000, report=None, gate=None):
    """A session_record.Records, no record yet, the contactor open. charger: whose sessions are
    recorded; contactor: read only; meter: a meter driver or None (no meter fitted); log: a
    session_log.SessionLog, or None (no pile id: nothing recorded); gate: the
    flash_gate.FlashGate the writers share (its deferred writes run in the records step). Boot
    code (this module is dropped after it): session_record.py's Records has no __init__."""
    import session_record

    records = session_record.Records()
    records.charger = charger
    records.gate = gate
    records.contactor = contactor
    records.meter = meter
    records.log = log
    records.meter_failure_ms = meter_failure_ms
    records._report = report
    records.record = None
    records._last = None
    records._closed = False
    records._closed_ms = 0
    records._opened_ms = 0
    records._has_opened = False
    records._open_settled = False
    records._meter_error = None
    return records


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
    """Contactor open and pilot F for a pile held unavailable (startup.hold_unavailable). Returns
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
    new_output(pwm, levels.pilot_pwm_inverted).state_f()
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
