# ruff: noqa: F821 - metadata(), require(), module() are given by MicroPython's manifest tool
# Freezes the firmware into a custom MicroPython image: its bytecode then runs from flash instead
# of taking the heap (the README's heap figures; an ESP32-WROOM without PSRAM needs this). In the
# board's manifest, after the port's own:
#
#     include("$(PORT_DIR)/boards/manifest.py")
#     include("/path/to/this/repo/manifest.py")
#
# boot.py and main.py are not frozen: they stay files on the board (`make flash` copies them).
# MicroPython runs a frozen boot.py or main.py instead of the filesystem's, so it could not be
# replaced or removed without flashing a new image: a pile in a reset loop could no longer be
# recovered over USB by deleting main.py. Copy only boot.py, main.py, board.json and config.json
# to a board running this image: a module's .py or .mpy on the filesystem comes first on
# sys.path and would shadow the frozen one.
#
# The version is firmware/version.py's VERSION (host_tests/test_packaging.py checks it).
metadata(description="AC charging pile controller (IEC 61851-1 / GB/T 18487.1)", version="0.1.0")

# From micropython-lib; `make flash` copies PyPI's releases instead (tools/fetch_deps.py).
require("umqtt.simple")

for _name in (
    "backoff",
    "charger",
    "charger_restore",
    "commands",
    "command_auth",
    "config",
    "console",
    "controller",
    "diag",
    "dlt645",
    "dlt645_setup",
    "durable",
    "files",
    "flash_gate",
    "journal",
    "journal_scan",
    "link_heal",
    "link_reset",
    "link_setup",
    "link_tls",
    "meter",
    "meter_setup",
    "modbus_meter",
    "mqtt_conn",
    "mqtt_link",
    "netaddr",
    "ota",
    "ota_lazy",
    "pilot",
    "relay",
    "release_boot",
    "s0_meter",
    "s0_setup",
    "session_cut",
    "session_log",
    "session_record",
    "session_restore",
    "session_store",
    "sntp",
    "startup",
    "telemetry",
    "version",
    "wifi",
    "wiring",
    "wiring_link",
):
    module(_name + ".py", base_path="firmware")
