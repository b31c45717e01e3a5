"""A board file -> the technician's wiring table (markdown), as docs/technician.md shows it.

Its command line, with the usage: tools/pin_table.py.

docs/technician.md carries this output for boards/ref-esp32.json between its pin-table markers;
host_tests/test_technician_doc.py checks that the two agree.
"""
import json
import sys

# Each pins.* key of boards/README.md: (direction seen from the ESP32, what it is wired to).
SIGNALS = (
    ("pilot_pwm", "out, PWM 1 kHz", "pilot generator input (CP, ±12 V through R1 1 kΩ)"),
    ("pilot_adc", "in, ADC1", "CP through the divider"),
    ("contactor", "out", "contactor coil driver"),
    ("contactor_feedback", "in", "contactor auxiliary (mirror) contact"),
    ("rcd_fault", "in", "residual-current module FAULT output"),
    ("rcd_test", "out", "residual-current module TEST input"),
    ("pp_adc", "in, ADC1", "PP (IEC 62196) or CC (GB/T 20234.2) to PE"),
    ("meter_tx", "out, UART %(uart)d TX", "RS-485 transceiver DI"),
    ("meter_rx", "in, UART %(uart)d RX", "RS-485 transceiver RO"),
    ("meter_de", "out", "RS-485 transceiver DE and /RE"),
    ("s0", "in", "meter's S0 pulse output"),
    ("status_led", "out", "status LED"),
)
# Not GPIOs: shown with the pins they belong to.
SETTINGS = ("meter_uart",)

# ESP32 datasheet (Espressif), "Strapping Pins" and "GPIO": what the pin itself imposes.
INPUT_ONLY = range(34, 40)  # no output driver, no internal pull-up or pull-down
STRAPPING = (0, 2, 5, 12, 15)  # read at reset: their level selects the boot mode / flash voltage
FLASH_PINS = range(6, 12)  # wired to the module's SPI flash


def _level(level, what):
    return "%d = %s" % (level, what)


def _setting(key, board):
    """The level or calibration that goes with a pin, from the board file."""
    pins = board["pins"]
    levels = board.get("levels", {})
    present = pins.get(key) is not None
    if key == "pilot_pwm":
        inverted = levels.get("pilot_pwm_inverted", False)
        return "1 = −12 V (inverted generator)" if inverted else "1 = +12 V"
    if key == "pilot_adc":
        cal = board["pilot_adc"]
        return "−12 V reads %d mV, +12 V reads %d mV" % (
            cal["uv_at_minus_12v"] // 1000, cal["uv_at_plus_12v"] // 1000)
    if key == "contactor":
        return _level(levels.get("contactor_on", 1), "coil on")
    if key == "contactor_feedback":
        if not present:
            return "none: a welded or unclosed contactor cannot be detected"
        return _level(levels.get("contactor_feedback_closed", 0), "contacts closed")
    if key == "rcd_fault":
        return _level(levels.get("rcd_fault_active", 1), "residual current")
    if key == "rcd_test":
        return _level(levels.get("rcd_test_active", 1), "self-test")
    if key == "pp_adc":
        if not present:
            return "none: tethered cable, %s A" % board["ratings"].get("tethered_cable_a")
        pp = board["pp_adc"]
        return "pull-up %d Ω to %.1f V" % (pp["pullup_ohm"], pp["supply_uv"] / 1e6)
    if key == "meter_de":
        return _level(1, "transmit") if present else "none: the transceiver turns around by itself"
    if key in ("meter_tx", "meter_rx") and present:
        return "baud, parity: config.json `meter`"
    if key == "s0" and present:
        return "active level: config.json `meter.s0_active_low`"
    return ""


def _notes(gpio):
    notes = []
    if gpio in INPUT_ONLY:
        notes.append("input only, no internal pull-up")
    if gpio in STRAPPING:
        notes.append("strapping pin: no external pull (sets the boot mode at reset)")
    if gpio in FLASH_PINS:
        notes.append("WIRED TO THE FLASH: do not use")
    return "; ".join(notes)


def table(board):
    """The markdown: a line naming the board and its ratings, then one row per signal."""
    pins = board["pins"]
    unknown = sorted(set(pins) - {k for k, _, _ in SIGNALS} - set(SETTINGS))
    if unknown:
        raise ValueError("pins.%s: not a signal this table knows (tools/pin_table.py)" % unknown[0])
    ratings = board["ratings"]
    lines = [
        "Board `%s`: %s. Ratings: %s A, %s phase%s, %s V." % (
            board["name"], board.get("description", "").rstrip("."), ratings["max_current_a"],
            ratings["phases"], "" if ratings["phases"] == 1 else "s", ratings["mains_v"]),
        "",
        "| GPIO | `pins.` key | direction | wired to | level / setting | ESP32 pin notes |",
        "|---:|---|---|---|---|---|",
    ]
    uart = pins.get("meter_uart", 2)
    for key, direction, wired in SIGNALS:
        gpio = pins.get(key)
        lines.append("| %s | `%s` | %s | %s | %s | %s |" % (
            "—" if gpio is None else gpio, key, direction % {"uart": uart}, wired,
            _setting(key, board), "" if gpio is None else _notes(gpio)))
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) != 1:
        sys.stderr.write("usage: python tools/pin_table.py boards/NAME.json\n")
        return 2
    with open(argv[0]) as f:
        board = json.load(f)
    try:
        sys.stdout.write(table(board))
    except (KeyError, ValueError) as e:
        sys.stderr.write("pin_table: %s: %s\n" % (argv[0], e))
        return 1
    return 0
