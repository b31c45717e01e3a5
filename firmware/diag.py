"""Service mode and the technician's view of the pile at the REPL (docs/technician.md); tools/
technician.py runs these through mpremote. Imported only after Ctrl-C or by the technician.

    import diag; diag.show()         one JSON object: what the pile is doing, and why not
    diag.clear_fault("rcd_lockout")  the controller's clear_fault (it checks the cause is gone)
    diag.reboot()                    contactor open, pilot F, then the reset

Reads the console module for the firmware's own account; secrets are never read here.
"""
import gc
import json
import time

import files

# Service mode ends with a reset after this long; the pile then charges again. The ESP32's
# watchdog cannot be stopped (evse-facts section 6), so a timer feeds it meanwhile. 30 min: a
# full flash over the 115200-baud REPL takes about a minute, and a pile a technician forgot in
# service mode is back within half an hour.
SERVICE_MS = 30 * 60 * 1000
# Soft timer callbacks can be late (GC, a flash write): feed at a quarter of the timeout.
_FEED_MS = 250


class _Service:
    """What main.run() had built when Ctrl-C came."""

    def __init__(self, board, conf, ctl, link, wdt, reset, until_ms):
        self.board = board
        self.conf = conf
        self.ctl = ctl
        self.link = link
        self.wdt = wdt
        self.reset = reset
        self.until_ms = until_ms
        self.timer = None


_service = None


def service_mode(board, conf, ctl, link, wdt, start_timer, reset, limit_ms=SERVICE_MS):
    """From main.run() on Ctrl-C, after ctl.safe_off(): the watchdog fed and the contactor held
    open by a timer (start_timer(period_ms, callback), wiring's), until reset() at limit_ms;
    the REPL is the technician's meanwhile."""
    global _service
    import console

    now = time.ticks_ms()
    s = _service = _Service(board, conf, ctl, link, wdt, reset, time.ticks_add(now, limit_ms))
    period = _FEED_MS if conf is None else min(_FEED_MS, conf.wdt_timeout_ms // 4)
    s.timer = start_timer(period, _tick)
    console.report(now, "main", "service mode (Ctrl-C): contactor open, pilot F; reset in %d s"
                   % (limit_ms // 1000))


def _tick(_timer):
    """Service mode's timer callback (soft on an ESP32: it runs at the REPL too)."""
    s = _service
    if s.ctl is not None:
        s.ctl.contactor.open()  # keep asserting it, as main.fail_safe does
    if time.ticks_diff(time.ticks_ms(), s.until_ms) >= 0:
        reboot()
    elif s.wdt is not None:
        s.wdt.feed()


def reboot():
    """Contactor open and pilot F, then the reset."""
    s = _service
    if s is None:  # main.py never ran: nothing was driven but by boot.py
        import wiring  # the firmware's one way to `machine`; builds nothing on import

        wiring.reset()
        return
    if s.ctl is not None:
        s.ctl.safe_off()
    s.reset()


def clear_fault(name):
    """Prints {"fault": name, "result": ...}: "cleared", or why not."""
    ctl = None if _service is None else _service.ctl
    if ctl is None:
        result = "firmware not running"
    else:
        import charger

        if not charger.fault_bit(name):
            result = "unknown fault (one of %s)" % ", ".join(n for _, n in charger.FAULT_NAMES)
        else:
            result = ctl.clear_fault(time.ticks_ms(), name)
    print(json.dumps({"fault": name, "result": result}))


# -- show -------------------------------------------------------------------------------------------


def _json_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _version():
    """The firmware's version (version.py), or None if that module is missing or broken."""
    try:
        import version

        return version.VERSION
    except Exception:  # noqa: BLE001 - ImportError, SyntaxError, a bad .mpy (ValueError): unknown
        return None


def _backlog(outbox):
    """Records (and bytes) in the outbox not yet acknowledged by the broker."""
    if outbox is None:
        try:
            open(files.OUTBOX_FILE).close()
        except OSError:
            return {"records": 0, "bytes": 0}
        import journal_scan

        outbox = journal_scan.load(files.OUTBOX_FILE)
    n, size = outbox.backlog()
    return {"records": n, "bytes": size}


def _meter(ctl, now):
    m = ctl.records.meter
    if m is None:
        return None
    r = m.reading
    out = {"errors": sum(m.errors.values()), "last_error": m.last_error, "reading": None}
    if r is not None:
        out["reading"] = {"energy_wh": r.energy_wh, "power_w": r.power_w, "voltage_v": r.voltage_v,
                          "current_a": r.current_a, "age_s": time.ticks_diff(now, r.taken_ms) // 1000}
    return out


def _since_boot(console, t):
    ms = time.ticks_diff(t, console.boot_ms)
    return "%d.%03d s" % (ms // 1000, ms % 1000)


def state():
    """What show() prints, as a dict."""
    gc.collect()
    heap_free = gc.mem_free()
    s = _service
    fw = board = pile_id = boot = problem = left_s = uptime_s = None
    charger_state = pilot = contactor = faults = journal = meter = broker = None
    recent = []
    if s is not None:
        import console

        now = time.ticks_ms()
        fw = _version()
        left_s = max(0, time.ticks_diff(s.until_ms, now) // 1000)
        uptime_s = time.ticks_diff(now, console.boot_ms) // 1000
        problem = console.unavailable
        recent = [_since_boot(console, t) + ": " + text for t, text in console.recent_faults]
        board = None if s.board is None else s.board.name
        if s.conf is not None:
            pile_id = s.conf.pile_id
            mqtt = s.conf.mqtt
            if mqtt is not None:
                link = s.link
                broker = {"host": mqtt.host, "port": mqtt.port,
                          "connected": None if link is None else link.connected,
                          "last_error": None if link is None else link.last_error}
    ctl = None if s is None else s.ctl
    if ctl is not None:
        import charger

        c = ctl.charger
        feedback = ctl.contactor.feedback_closed()
        charger_state = c.state
        pilot = c.pilot
        contactor = {"commanded": "closed" if ctl.contactor.closed else "open",
                     "feedback": None if feedback is None else ("closed" if feedback else "open")}
        faults = charger.fault_list(c.faults)
        meter = _meter(ctl, time.ticks_ms())
        log = ctl.records.log
        boot = None if log is None else log.boot
        journal = _backlog(None if log is None else log.outbox)
    else:
        # The control objects never came to be: what the files on flash say.
        board_file = _json_file(files.BOARD_FILE) or {}
        conf = _json_file(files.CONFIG_FILE) or {}
        fw = fw or _version()
        board = board or board_file.get("name")
        pile_id = pile_id or conf.get("pile_id")
        import session_store

        boot = session_store.CounterStore(files.BOOT_COUNT_FILE).load()  # the last boot; None: garbled
        journal = _backlog(None)
        mqtt = conf.get("mqtt")
        if broker is None and isinstance(mqtt, dict):
            broker = {"host": mqtt.get("host"), "port": mqtt.get("port"), "connected": None,
                      "last_error": None}
    return {"fw": fw, "board": board, "pile_id": pile_id, "boot": boot,
            "firmware": "not running" if s is None else "service mode", "problem": problem,
            "service_left_s": left_s, "uptime_s": uptime_s, "state": charger_state, "pilot": pilot,
            "contactor": contactor, "faults": faults, "recent_faults": recent, "journal": journal,
            "heap_free": heap_free, "meter": meter, "broker": broker}


def show():
    print(json.dumps(state()))
