"""Named scenarios for the simulated pile: timed steps for the world, plus config overrides.

Step: (time in ms since power-on, action[, argument]); actions are World.do()'s. Plain data,
read both by the ROM (MicroPython) and by the launcher (CPython).
"""
DEFAULT = "normal"

# Every scenario starts from this config.json, then applies its own "config".
BASE_CONFIG = {"free_vend": True, "standard": "iec", "max_current_a": 32}

_CHARGE = [(300, "plug"), (1000, "request")]

SCENARIOS = {
    "normal": {
        "doc": "plug in, charge, car stops requesting (C->B), unplug",
        "steps": _CHARGE + [(3000, "stop_request"), (3500, "unplug"), (4000, "end")],
    },
    "c_to_b_mid_charge": {
        "doc": "car pauses (C->B) mid-charge and resumes twice: contactor open within 100 ms",
        "steps": _CHARGE + [(2000, "stop_request"), (2600, "request"), (3500, "stop_request"),
                            (4000, "request"), (5000, "unplug"), (5500, "end")],
    },
    "unplug_under_load": {
        "doc": "cable pulled while charging (C->A)",
        "steps": _CHARGE + [(2500, "unplug"), (3000, "end")],
    },
    "diode_missing": {
        "doc": "car without the pilot diode: never closes, diode fault until unplugged",
        "steps": [(0, "remove_diode")] + _CHARGE + [(2500, "unplug"), (3000, "end")],
    },
    "cp_short": {
        "doc": "CP shorted to PE while charging (E): open at once, recover when the short goes",
        "steps": _CHARGE + [(2000, "short_cp", True), (2500, "short_cp", False), (4000, "end")],
    },
    "welded": {
        "doc": "contacts weld while charging: latched fault, pilot F, stays after unplug",
        "steps": _CHARGE + [(1800, "weld"), (2000, "stop_request"), (3500, "unplug"), (4500, "end")],
    },
    "contactor_fails_to_close": {
        "doc": "coil energised but the contacts never close: fault, no retry until unplugged",
        "steps": [(0, "dead_coil")] + _CHARGE + [(3500, "end")],
    },
    "rcd_trip": {
        "doc": "6 mA DC residual current while charging: open at once, retry after the wait",
        "config": {"rcd_retry_s": 1},
        "steps": _CHARGE + [(2000, "rcd_leak", True), (2300, "rcd_leak", False), (5000, "end")],
    },
    "rcd_self_test_fails": {
        "doc": "the residual-current module does not answer its TEST input: no charging",
        "steps": [(0, "rcd_broken")] + _CHARGE + [(3000, "end")],
    },
    "loop_exception": {
        "doc": "an exception inside the control loop: contactor open, pilot F, watchdog reset",
        "steps": _CHARGE + [(2000, "inject_error"), (6500, "end")],
    },
    "ventilation_refused": {
        "doc": "car asks for ventilation (D) on a pile without it: no power",
        "steps": [(0, "ventilation", True)] + _CHARGE + [(2500, "end")],
    },
    "broken_config": {
        "doc": "config.json with a bad value: clear error, pilot F, contactor never closes",
        "config": {"max_current_a": "lots"},
        "steps": _CHARGE + [(1500, "end")],
    },
}


def latency_trials(trials=200):
    """C->B trials for the benchmark: charge, stop requesting at a varying phase, repeat."""
    steps = [(300, "plug")]
    t = 500
    for i in range(trials):
        steps.append((t, "request"))
        t += 400 + (i * 37) % 97  # vary the phase against the control loop
        steps.append((t, "stop_request"))
        t += 150
    steps.append((t + 200, "end"))
    return {"doc": "benchmark: %d C->B trials" % trials, "steps": steps}


def get(name):
    if name.startswith("latency_trials"):
        parts = name.split(":")
        return latency_trials(int(parts[1]) if len(parts) > 1 else 200)
    return SCENARIOS[name]
