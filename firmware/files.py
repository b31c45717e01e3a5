"""The files on the board's flash, named once (docs/durability.md)."""

BOARD_FILE = "board.json"  # the board's pins and calibration (boards/README.md)
CONFIG_FILE = "config.json"  # this pile's settings (docs/technician.md)
BOOT_COUNT_FILE = "boot_count.json"  # session ids: pile-boot-n (docs/telemetry.md)
OUTBOX_FILE = "outbox.jrnl"  # records not yet acknowledged by the broker (journal.py)
SESSION_FILE = "session.json"  # the open session's snapshot (session_store.py)
SETTINGS_FILE = "settings.json"  # availability, current limit, latched faults (docs/commands.md)
CMD_COUNTER_FILE = "cmd_counter.json"  # the last accepted command counter (docs/commands.md)
HEAL_FILE = "heal.json"  # the link's escalation resets, against a reset loop (docs/network.md)
OTA_JOB_FILE = "ota_job.json"  # the update being fetched (ota.py, docs/ota.md)
