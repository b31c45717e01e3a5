"""Every message the pile publishes and its topic, built here from plain values (docs/telemetry.md,
docs/schemas/), each as its JSON text's bytes (session_log.utf8: a view of the text on the board,
no copy). The session records are built by session_log.py and kept in the outbox."""
import json

import charger as ch
from session_log import clock_synced, iso_utc, utf8

# A meter message goes out only in these states (docs/telemetry.md, `meter`).
RUNNING = (ch.CHARGING, ch.SUSPENDED_EV, ch.SUSPENDED_EVSE)


class Topics:
    """evse/v1/<pile_id>/... as bytes, made once by link_setup.setup_topics (boot code, off the
    heap after the boot). outbox: journal kind -> topic; a kind not there is not published."""

    online: bytes
    status: bytes
    meter: bytes
    ack: bytes
    health: bytes
    cmd: bytes
    ota: bytes
    outbox: dict


def online(is_online, boot):
    return utf8(json.dumps({"v": 1, "online": is_online, "boot": boot}))


def status(wall, boot, uptime_s, state, pilot, offer_ma, power_w, session_id, energy_wh, faults,
           fw, board, limit=None, meter_age_ms=None):
    """power_w: None without a fresh reading; session_id None: no session; faults: the charger's
    mask. limit: (mA, source, ms left or None) of the remote limit in force, or None: none.
    meter_age_ms: the age of the meter's last reading, None without one."""
    return utf8(json.dumps({
        "v": 1, "ts": iso_utc(wall), "clock_synced": clock_synced(wall), "boot": boot,
        "uptime_s": uptime_s, "state": state, "pilot": pilot,
        "offer_a": round(offer_ma / 100) / 10 if offer_ma else 0,
        "power_w": None if power_w is None else max(0, int(power_w)),
        "session_id": session_id, "session_energy_wh": max(0, energy_wh or 0),
        "faults": ch.fault_list(faults), "fw": fw, "board": board,
        "limit_a": None if limit is None else round(limit[0] / 100) / 10,
        "limit_source": None if limit is None else limit[1],
        "limit_expires_s": None if limit is None or limit[2] is None else (limit[2] + 999) // 1000,
        "meter_age_ms": _age(meter_age_ms),
    }))


def meter(wall, session_id, energy_wh, reading, age_ms=None, fresh=True):
    """reading: the meter's last Reading (meter.py); age_ms: how old it is. A stale one (not
    fresh) shows its register and age, never its power, current or voltage as now's."""
    return utf8(json.dumps({
        "v": 1, "session_id": session_id, "ts": iso_utc(wall), "clock_synced": clock_synced(wall),
        "meter_wh": reading.energy_wh, "session_energy_wh": max(0, energy_wh or 0),
        "power_w": max(0, int(reading.power_w or 0)) if fresh else None,
        "current_a": _one_decimal(reading.current_a) if fresh else None,
        "voltage_v": _one_decimal(reading.voltage_v) if fresh else None,
        "age_ms": _age(age_ms),
    }))


def _age(ms):
    # A reading from before a ticks wrap looks younger, never older: meter.py drops it anyway.
    return None if ms is None else min(max(0, ms), 2147483647)


def cmd_ack(wall, cmd_id, cmd, result, reason):
    return utf8(json.dumps({
        "v": 1, "cmd_id": cmd_id, "cmd": cmd, "result": result, "reason": reason,
        "ts": iso_utc(wall), "clock_synced": clock_synced(wall)}))


def ota(wall, boot, release, version, state, target, progress, reason, rolled_back):
    """The over-the-air update's state (docs/ota.md), retained. rolled_back: None or
    {"release": n, "reason": text}."""
    return utf8(json.dumps({
        "v": 1, "ts": iso_utc(wall), "clock_synced": clock_synced(wall), "boot": boot,
        "release": release, "version": version, "state": state, "target": target,
        "progress": progress, "reason": reason, "rolled_back": rolled_back}))


def health(wall, boot, uptime_s, fw, fig):
    """fig: link_heal's figures as a dict, its keys docs/telemetry.md's `health` fields (built
    only when a health message is due)."""
    fig["v"] = 1
    fig["ts"] = iso_utc(wall)
    fig["clock_synced"] = clock_synced(wall)
    fig["boot"] = boot
    fig["uptime_s"] = uptime_s
    fig["fw"] = fw
    return utf8(json.dumps(fig))


def _one_decimal(values):
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        values = (values,)
    return [round(max(0, v) * 10) / 10 for v in values]
