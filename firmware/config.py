"""config.json (this pile) and board.json (this board's pins and calibration), validated.

Every problem raises ConfigError naming the file and key, so a technician can fix it. Unknown
keys are errors too: a misspelt limit must not silently fall back to a default.
"""
import json

from micropython import const

import files
import pilot


class ConfigError(Exception):
    pass


class _Section:
    """Validated values as attributes. No methods: a function would hold this module's globals,
    and the settings, alive for the whole run, would keep all of config.py on the heap after
    wiring.load_settings dropped it."""


def Section(values):
    section = _Section()
    for key, value in values.items():
        setattr(section, key, value)  # MicroPython: __dict__ is read-only
    return section


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check(where, key, value, kind, low=None, high=None, choices=None):
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = _is_int(value)
    elif kind == "number":
        ok = _is_number(value)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "pin":
        ok = value is None or (_is_int(value) and value >= 0)
    elif kind == "pile_id":
        ok = value is None or (isinstance(value, str) and _pile_id_ok(value))
    elif kind == "address":
        ok = value is None or isinstance(value, str) or _is_int(value)
    else:
        raise ConfigError("%s: %s: unknown kind %s" % (where, key, kind))
    if not ok:
        raise ConfigError("%s: '%s' must be %s, not %r" % (where, key, _KIND_TEXT[kind], value))
    if choices is not None and value not in choices:
        raise ConfigError("%s: '%s' must be one of %s, not %r" % (where, key, ", ".join(choices), value))
    if low is not None and value < low or high is not None and value > high:
        raise ConfigError("%s: '%s' = %r is outside %r .. %r" % (where, key, value, low, high))
    return value


_KIND_TEXT = {
    "bool": "true or false",
    "int": "a whole number",
    "number": "a number",
    "str": "a string",
    "pin": "a GPIO number or null",
    "address": "a number (Modbus) or a string of 12 digits (DL/T 645)",
    "pile_id": "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
}


def _pile_id_ok(text):
    if not 1 <= len(text) <= 64 or not text[0].isalpha() and not text[0].isdigit():
        return False
    for c in text:
        if not (c.isalpha() or c.isdigit() or c in "._-") or ord(c) > 127:
            return False
    return True


def _validate(where, data, schema):
    """schema: key -> (kind, default or REQUIRED, low, high, choices)."""
    if not isinstance(data, dict):
        raise ConfigError("%s: must be a JSON object" % where)
    for key in data:
        if key not in schema:
            raise ConfigError("%s: unknown key '%s'" % (where, key))
    values = {}
    for key, (kind, default, low, high, choices) in schema.items():
        if kind == "section":
            continue
        if key in data:
            values[key] = _check(where, key, data[key], kind, low, high, choices)
        elif default is REQUIRED:
            raise ConfigError("%s: missing key '%s'" % (where, key))
        else:
            values[key] = default
    return values


REQUIRED = object()

# config.json: what the operator sets for this pile.
CONFIG_SCHEMA = {
    # The operator's id for this pile (docs/telemetry.md); without one no session is recorded.
    "pile_id": ("pile_id", None, None, None, None),
    "connector": ("int", 1, 1, 8, None),
    # Snapshot of an open session every this many seconds (docs/durability.md: wear).
    "checkpoint_s": ("int", 60, 10, 3600, None),
    "standard": ("str", pilot.IEC, None, None, pilot.STANDARDS),
    # Upper end: 80 A, the top of IEC 61851-1's duty range (GB/T caps at 63 A in pilot.py).
    "max_current_a": ("number", 32, 6, 80, None),
    "free_vend": ("bool", False, None, None, None),
    "allow_ventilation": ("bool", False, None, None, None),
    # OpenEVSE's RCD practice: retry after 5 min, lock out after 6 trips (evse-facts section 3).
    "rcd_retry_s": ("int", 300, 1, 3600, None),
    "rcd_max_trips": ("int", 6, 1, 20, None),
    # ESP32 WDT takes at least 1000 ms (evse-facts section 6).
    "wdt_timeout_ms": ("int", 2000, 1000, 10000, None),
    "control_period_ms": ("int", 5, 1, 20, None),
    # Limits that expire (docs/commands.md): the time to live of a set_current_limit that names
    # none, and what a limit falls back to when it runs out. Never below 6 A, the least offer
    # of IEC 61851-1: a silent cloud cannot hold a pile at zero for ever.
    "limit_ttl_s": ("int", 900, 10, 86400, None),
    "limit_fallback_a": ("number", 6, 6, 80, None),
    "meter": ("section", None, None, None, None),
    "mqtt": ("section", None, None, None, None),
    "wifi": ("section", None, None, None, None),
    "ntp": ("section", None, None, None, None),
    "ota": ("section", None, None, None, None),
}

_METER_TYPES = const(("none", "ddsu666", "sdm120", "sdm630", "dlt645", "s0"))
_RS485_METERS = const(("ddsu666", "sdm120", "sdm630", "dlt645"))
# Factory settings (evse-facts section 5): DDSU666 and SDM630 9600 8N1, SDM120 2400 8N1,
# DL/T 645 2400 8E1.
METER_DEFAULT_BAUD = {"ddsu666": 9600, "sdm120": 2400, "sdm630": 9600, "dlt645": 2400}
METER_DEFAULT_PARITY = {"dlt645": "even"}
METER_SCHEMA = {
    "type": ("str", "none", None, None, _METER_TYPES),
    # Modbus: slave address 1..247; DL/T 645: the 12 nameplate digits, or absent to learn it
    # with the broadcast read-address request (one meter on the bus).
    "address": ("address", None, None, None, None),
    "baud": ("int", None, 1200, 115200, None),
    "parity": ("str", None, None, None, ("none", "even", "odd")),
    "timeout_ms": ("int", None, 20, 2000, None),
    "poll_interval_ms": ("int", None, 200, 60000, None),
    # While charging, no good reading for this long stops the session (meter_failure).
    "failure_timeout_s": ("int", 30, 2, 3600, None),
    "imp_per_kwh": ("int", 1000, 1, 100000, None),  # S0 (IEC 62053-31): 1000 is typical
    "s0_active_low": ("bool", True, None, None, None),
}

# The MQTT link (docs/telemetry.md); on when the section is there. `password` and `secret` are
# checked apart: their values never appear in an error.
MQTT_SCHEMA = {
    # A numeric address never waits; a host name is looked up once at boot, which may block.
    "host": ("str", REQUIRED, None, None, None),
    "port": ("int", None, 1, 65535, None),  # 8883 with TLS, else 1883 (IANA)
    "username": ("str", None, None, None, None),
    # The broker's CA certificate file on the board (PEM or DER), read once at boot: TLS on.
    "tls_ca": ("str", None, None, None, None),
    # The name checked in the broker's certificate, when it is not `host` (a numeric address).
    "tls_server_name": ("str", None, None, None, None),
    "keepalive_s": ("int", 60, 10, 3600, None),
    "status_interval_s": ("int", 60, 10, 86400, None),
    "meter_interval_s": ("int", 10, 10, 3600, None),  # docs/telemetry.md: 10-3600
    # A link that heals itself (docs/network.md): the `health` message, then the ladder.
    "health_interval_s": ("int", 300, 10, 86400, None),
    "wifi_restart_after_s": ("int", 300, 10, 86400, None),
    "reset_after_s": ("int", 1800, 10, 604800, None),
    "reset_min_interval_s": ("int", 3600, 10, 604800, None),
    "conflict_pause_s": ("int", 300, 10, 86400, None),
}
_MQTT_SECRET_KEYS = const(("password", "secret"))
_MIN_SECRET_BYTES = const(16)  # command_auth refuses shorter keys

# Wi-Fi station (docs/network.md); on when the section is there. The password is checked apart:
# its value never appears in an error.
WIFI_SCHEMA = {
    "ssid": ("str", REQUIRED, None, None, None),
}
# NTP time (docs/network.md). RFC 4330 section 10: the resync interval never below 15 minutes;
# the first request after start-up at a random moment, so that a fleet does not ask at once.
NTP_SCHEMA = {
    # A numeric address never waits; a host name is looked up once, which may block.
    "host": ("str", REQUIRED, None, None, None),
    "port": ("int", 123, 1, 65535, None),
    "interval_s": ("int", 3600, 900, 604800, None),
    "start_jitter_s": ("int", 60, 0, 300, None),
}
# Over-the-air updates (docs/ota.md); on when the section is there. `key`: the release key's
# public half, the RSA modulus as hex (e = 65537), from provisioning; never a private key.
OTA_SCHEMA = {
    "key": ("str", REQUIRED, None, None, None),
    # A release on trial must tick, reach the broker and report within this; else it goes back.
    "trial_s": ("int", 300, 30, 3600, None),
}
_OTA_KEY_BITS = const((2048, 3072, 4096))

# ADC2 cannot be read while Wi-Fi is on (evse-facts section 6): the ADC inputs must be on ADC1.
_ADC1_PINS = const((32, 33, 34, 35, 36, 37, 38, 39))

# board.json top level: key -> required?
BOARD_KEYS = {
    "name": True,
    "description": False,
    "pins": True,
    "levels": False,
    "pilot_adc": True,
    "pp_adc": False,
    "ratings": True,
}
PINS_SCHEMA = {
    "pilot_pwm": ("pin", REQUIRED, None, None, None),
    "pilot_adc": ("pin", REQUIRED, None, None, None),
    "contactor": ("pin", REQUIRED, None, None, None),
    "contactor_feedback": ("pin", None, None, None, None),
    "rcd_fault": ("pin", REQUIRED, None, None, None),
    "rcd_test": ("pin", REQUIRED, None, None, None),
    "pp_adc": ("pin", None, None, None, None),
    "meter_tx": ("pin", None, None, None, None),
    "meter_rx": ("pin", None, None, None, None),
    "meter_de": ("pin", None, None, None, None),
    "meter_uart": ("int", 2, 1, 2, None),  # ESP32 UART 1 or 2 (UART 0 is the REPL)
    "s0": ("pin", None, None, None, None),
    "status_led": ("pin", None, None, None, None),
}
LEVELS_SCHEMA = {
    "contactor_on": ("int", 1, 0, 1, None),
    "contactor_feedback_closed": ("int", 0, 0, 1, None),
    "rcd_fault_active": ("int", 1, 0, 1, None),
    "rcd_test_active": ("int", 1, 0, 1, None),
    "pilot_pwm_inverted": ("bool", False, None, None, None),
}
# Two-point calibration of the CP divider, ADC microvolts at -12 V and +12 V on CP. ESP32's ADC
# is linear only within ~150-2450 mV at 11 dB (evse-facts section 6).
PILOT_ADC_SCHEMA = {
    "uv_at_minus_12v": ("int", REQUIRED, 150000, 2450000, None),
    "uv_at_plus_12v": ("int", REQUIRED, 150000, 2450000, None),
}
PP_ADC_SCHEMA = {
    "pullup_ohm": ("int", REQUIRED, 1, 100000, None),
    "supply_uv": ("int", REQUIRED, 1000000, 5000000, None),
}
RATINGS_SCHEMA = {
    "max_current_a": ("number", REQUIRED, 6, 80, None),
    "phases": ("int", 1, 1, 3, None),
    "mains_v": ("int", 230, 100, 400, None),
    # A tethered cable has no PP resistor to read: its rating is part of the board.
    "tethered_cable_a": ("number", None, 6, 80, None),
}


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError("%s: cannot read (%s)" % (path, e)) from None
    except ValueError as e:
        raise ConfigError("%s: not valid JSON (%s)" % (path, e)) from None


def parse_config(data, where=files.CONFIG_FILE):
    conf = Section(_validate(where, data, CONFIG_SCHEMA))
    conf.meter = _parse_meter(where + ": meter", data.get("meter", {}))
    conf.mqtt = None if data.get("mqtt") is None else _parse_mqtt(where + ": mqtt", data["mqtt"])
    conf.wifi = None if data.get("wifi") is None else _parse_wifi(where + ": wifi", data["wifi"])
    conf.ntp = None if data.get("ntp") is None else _parse_ntp(where + ": ntp", data["ntp"])
    conf.ota = None if data.get("ota") is None else _parse_ota(where + ": ota", data["ota"])
    return conf


def _parse_ota(where, data):
    ota = Section(_validate(where, data, OTA_SCHEMA))
    key = ota.key
    if len(key) * 4 not in _OTA_KEY_BITS or not _hex_secret_ok(key) or key[0] in "01234567":
        raise ConfigError("%s: 'key' must be the release key's RSA modulus as hex, 2048, 3072 or "
                          "4096 bits (tools/release.py pubkey prints it)" % where)
    return ota


def _parse_wifi(where, data):
    if not isinstance(data, dict):
        raise ConfigError("%s: must be a JSON object" % where)
    wifi = Section(_validate(where, {k: v for k, v in data.items() if k != "password"}, WIFI_SCHEMA))
    if not 1 <= len(wifi.ssid.encode()) <= 32:  # IEEE 802.11: an SSID is 1-32 octets
        raise ConfigError("%s: 'ssid' must be 1-32 bytes" % where)
    password = data.get("password", "")
    # WPA2-PSK: a passphrase of 8-63 characters or 64 hex digits; "" for an open network.
    if not isinstance(password, str) or not (len(password) == 0 or 8 <= len(password) <= 63 or len(
            password) == 64 and all(c in "0123456789abcdefABCDEF" for c in password)):
        raise ConfigError("%s: 'password' must be a string of 8-63 characters, 64 hex digits, or "
                          "empty for an open network" % where)
    wifi.password = password
    return wifi


def _parse_ntp(where, data):
    ntp = Section(_validate(where, data, NTP_SCHEMA))
    if not ntp.host:
        raise ConfigError("%s: 'host' must not be empty" % where)
    return ntp


def _parse_mqtt(where, data):
    if not isinstance(data, dict):
        raise ConfigError("%s: must be a JSON object" % where)
    plain = {k: v for k, v in data.items() if k not in _MQTT_SECRET_KEYS}
    mqtt = Section(_validate(where, plain, MQTT_SCHEMA))
    if not mqtt.host:
        raise ConfigError("%s: 'host' must not be empty" % where)
    password = data.get("password")
    if password is not None and not isinstance(password, str):
        raise ConfigError("%s: 'password' must be a string" % where)
    if password is not None and mqtt.username is None:
        raise ConfigError("%s: 'password' needs 'username'" % where)
    mqtt.password = password
    secret = data.get("secret")
    if secret is not None and not _hex_secret_ok(secret):
        raise ConfigError("%s: 'secret' must be the command key as hex, at least %d bytes (%d "
                          "hex digits)" % (where, _MIN_SECRET_BYTES, 2 * _MIN_SECRET_BYTES))
    mqtt.secret = secret
    for key in ("tls_ca", "tls_server_name"):
        if getattr(mqtt, key) == "":
            raise ConfigError("%s: '%s' must not be empty" % (where, key))
    if mqtt.tls_server_name is not None and mqtt.tls_ca is None:
        raise ConfigError("%s: 'tls_server_name' needs 'tls_ca'" % where)
    if mqtt.reset_after_s <= mqtt.wifi_restart_after_s:
        raise ConfigError("%s: 'reset_after_s' (%d) must be longer than 'wifi_restart_after_s' "
                          "(%d): the Wi-Fi is restarted before the board is reset"
                          % (where, mqtt.reset_after_s, mqtt.wifi_restart_after_s))
    if mqtt.port is None:
        mqtt.port = 1883 if mqtt.tls_ca is None else 8883
    return mqtt


def _hex_secret_ok(text):
    if not isinstance(text, str) or len(text) % 2 or len(text) < 2 * _MIN_SECRET_BYTES:
        return False
    for c in text:
        if not ("0" <= c <= "9" or "a" <= c <= "f" or "A" <= c <= "F"):
            return False
    return True


def _parse_meter(where, data):
    meter = Section(_validate(where, data, METER_SCHEMA))
    kind = meter.type
    if kind in _RS485_METERS:
        if meter.baud is None:
            meter.baud = METER_DEFAULT_BAUD[kind]
        if meter.parity is None:
            meter.parity = METER_DEFAULT_PARITY.get(kind, "none")
    if meter.poll_interval_ms is None:
        # DL/T 645 at 2400 baud needs ~1 s for its four reads: poll every 2 s, others every 1 s.
        meter.poll_interval_ms = 2000 if kind == "dlt645" else 1000
    address = meter.address
    if kind == "dlt645":
        if address is not None and not (isinstance(address, str) and len(address) == 12
                                         and all("0" <= c <= "9" for c in address)):
            raise ConfigError("%s: 'address' must be the meter's 12 digits, or absent to learn it"
                              % where)
    elif kind in _RS485_METERS:
        if address is None:
            meter.address = 1
        elif not _is_int(address) or not 1 <= address <= 247:
            raise ConfigError("%s: 'address' must be a Modbus address 1 .. 247, not %r" % (where, address))
    return meter


def _sub(where, board, key, schema):
    part = board[key]
    if part is None:
        return None
    if not isinstance(part, dict):
        raise ConfigError("%s: '%s' must be a JSON object" % (where, key))
    return Section(_validate(where + ": " + key, part, schema))


def parse_board(data, where=files.BOARD_FILE):
    if not isinstance(data, dict):
        raise ConfigError("%s: must be a JSON object" % where)
    for key in data:
        if key not in BOARD_KEYS:
            raise ConfigError("%s: unknown key '%s'" % (where, key))
    for key, required in BOARD_KEYS.items():
        if required and key not in data:
            raise ConfigError("%s: missing key '%s'" % (where, key))
    data = dict(data)
    data.setdefault("levels", {})
    data.setdefault("pp_adc", None)
    board = Section({
        "name": _check(where, "name", data["name"], "str"),
        "description": _check(where, "description", data.get("description", ""), "str"),
        "pins": _sub(where, data, "pins", PINS_SCHEMA),
        "levels": _sub(where, data, "levels", LEVELS_SCHEMA),
        "pilot_adc": _sub(where, data, "pilot_adc", PILOT_ADC_SCHEMA),
        "pp_adc": _sub(where, data, "pp_adc", PP_ADC_SCHEMA),
        "ratings": _sub(where, data, "ratings", RATINGS_SCHEMA),
    })
    cal = board.pilot_adc
    if cal.uv_at_plus_12v - cal.uv_at_minus_12v < 500000:
        raise ConfigError("%s: pilot_adc: uv_at_plus_12v must lie at least 0.5 V above "
                          "uv_at_minus_12v" % where)
    if board.pins.pp_adc is None and board.ratings.tethered_cable_a is None:
        raise ConfigError("%s: ratings: 'tethered_cable_a' is needed when pins.pp_adc is null "
                          "(a tethered cable has no PP resistor to read)" % where)
    if board.pins.pp_adc is not None and board.pp_adc is None:
        raise ConfigError("%s: missing key 'pp_adc' (calibration for pins.pp_adc)" % where)
    return board


def check_together(board, conf):
    """What config.json asks of the board must be on it."""
    kind = conf.meter.type
    pins = board.pins
    if kind in _RS485_METERS and (pins.meter_tx is None or pins.meter_rx is None):
        raise ConfigError("config.json: meter: type '%s' needs pins.meter_tx and pins.meter_rx "
                          "in board.json (%s)" % (kind, board.name))
    if kind == "s0" and pins.s0 is None:
        raise ConfigError("config.json: meter: type 's0' needs pins.s0 in board.json (%s)" % board.name)
    if conf.wifi is not None:
        for key in ("pilot_adc", "pp_adc"):
            pin = getattr(pins, key)
            if pin is not None and pin not in _ADC1_PINS:
                raise ConfigError("config.json: wifi: board.json pins.%s = %d is on ADC2, which "
                                  "cannot be read while Wi-Fi is on (%s)" % (key, pin, board.name))


def load_config(path):
    return parse_config(_load_json(path), path)


def load_board(path):
    return parse_board(_load_json(path), path)
