"""Named scenarios for the simulated pile: timed steps for the world, plus config overrides.

Step: (time in ms since power-on, action[, argument]); actions are World.do()'s. Plain data,
read both by the ROM (MicroPython) and by the launcher (CPython).
"""
DEFAULT = "normal"

# Every scenario starts from this config.json, then applies its own "config".
BASE_CONFIG = {"pile_id": "sim-pile-1", "free_vend": True, "standard": "iec", "max_current_a": 32,
               "meter": {"type": "ddsu666"}}

_CHARGE = [(300, "plug"), (1000, "request")]
# What Wi-Fi and NTP add on the unix port, on top of whatever else the run loads (launch.run_scenario
# adds it): the station and the SNTP client (~11 KiB of bytecode and state) and the simulated
# driver (~4 KiB, sim/network.py, past the simulator's allowance), with room for fragmentation.
WIFI_HEAP_EXTRA_KB = 32

SCENARIOS = {
    "normal": {
        "doc": "plug in, charge, car stops requesting (C->B), unplug",
        "steps": _CHARGE + [(3000, "stop_request"), (3500, "unplug"), (7000, "end")],
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
        # The leak comes more than 1 s after the contactor closed (relay.SWITCH_BLANK_MS).
        "steps": _CHARGE + [(2500, "rcd_leak", True), (2800, "rcd_leak", False), (5500, "end")],
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
    "long_session": {
        "doc": "six seconds of charging: enough energy for a DL/T 645 meter's 10 Wh steps",
        # The record closes on the first reading taken after the contactor opened: with DL/T 645
        # (a poll every 2 s, ~1 s per poll) that can be 3 s after the stop, more on a busy host.
        "steps": _CHARGE + [(7000, "stop_request"), (7500, "unplug"), (13000, "end")],
    },
    "meter_silent": {
        "doc": "the meter stops answering while charging: the session stops (meter_failure)",
        "config": {"meter": {"type": "ddsu666", "failure_timeout_s": 2}},
        "steps": _CHARGE + [(3000, "meter_fault", "silent"), (9000, "end")],
    },
    "meter_silent_at_start": {
        "doc": "the meter does not answer when the car asks for power: the contactor waits for "
               "the session's start value, closes once the meter answers, the session bills in full",
        "config": {"meter": {"type": "ddsu666", "failure_timeout_s": 5}},
        "steps": [(0, "meter_fault", "silent")] + _CHARGE + [
            (3000, "meter_fault", None), (6000, "stop_request"), (6500, "unplug"), (9000, "end")],
    },
    "meter_dead_at_start": {
        "doc": "the meter never answers: no power without a start value; after failure_timeout_s "
               "the session stops (meter_failure), nothing was delivered or billed",
        "config": {"meter": {"type": "ddsu666", "failure_timeout_s": 2}},
        "steps": [(0, "meter_fault", "silent")] + _CHARGE + [(6000, "end")],
    },
    "meter_misbehaves": {
        "doc": "bad CRC, wrong address, garbage, a backwards and a jumping register while "
               "charging: each refused and counted, the session goes on and bills right",
        # Each fault lasts 1.2 s, so that at least one 1 s poll meets it.
        "steps": _CHARGE + [(1500, "meter_fault", "bad_crc"), (2700, "meter_fault", None),
                            (3900, "meter_fault", "wrong_address"), (5100, "meter_fault", None),
                            (6300, "meter_fault", "garbage"), (7500, "meter_fault", None),
                            (8700, "meter_fault", "backwards"), (9900, "meter_fault", None),
                            (11100, "meter_fault", "jump"), (12300, "meter_fault", None),
                            (14000, "stop_request"), (14500, "unplug"), (17500, "end")],
    },
    "charging_until_cut": {
        "doc": "charge for a long time (the tests cut the power with kill -9 part-way)",
        "steps": _CHARGE + [(60000, "end")],
    },
    "car_still_there": {
        "doc": "the board boots with a car plugged in and requesting (after a power cut)",
        "steps": [(0, "plug"), (0, "request"), (4000, "end")],
    },
    "broker_outage": {
        "doc": "the normal session, then time for the MQTT link's backoff (1-2-4-8 s) to find the "
               "broker again: the tests keep the broker away until the session has ended",
        "steps": _CHARGE + [(3000, "stop_request"), (3500, "unplug"), (18000, "end")],
    },
    "remote_commands": {
        "doc": "charging with a car that never stops by itself: the tests send remote commands",
        "steps": _CHARGE + [(14000, "end")],
    },
    "wifi_dropout": {
        "doc": "the access point goes away mid-session for 2.5 s, a C->B pause meets the outage: "
               "charging goes on, the station joins again",
        "config": {"wifi": {"ssid": "depot", "password": "sim-passphrase"}},
        "heap_extra_kb": WIFI_HEAP_EXTRA_KB,
        "steps": _CHARGE + [(2000, "wifi_down"), (3500, "stop_request"), (4000, "request"),
                            (4500, "wifi_up"), (6500, "stop_request"), (7000, "unplug"), (8000, "end")],
    },
    "ntp_sync": {
        "doc": "a board whose clock starts at its epoch (2000) joins Wi-Fi and asks an NTP server on "
               "127.0.0.1 (the tests run one and set ntp.port) for the time, mid-session",
        "config": {"wifi": {"ssid": "depot", "password": "sim-passphrase"},
                   "ntp": {"host": "127.0.0.1", "start_jitter_s": 0}},
        "heap_extra_kb": WIFI_HEAP_EXTRA_KB,
        "steps": [(0, "rtc_flat")] + _CHARGE + [(3000, "stop_request"), (3500, "unplug"), (5000, "end")],
    },
    "ota": {
        "doc": "a fleet of virtual piles gets a good release, then one that crashes at boot, in "
               "cohorts: the bad one is rolled back and the rollout halts; what the cloud saw",
        # pilehost/ota_sim.py runs several piles on these steps and stops them when it is over.
        "steps": [(900000, "end")],
    },
    "heal": {
        "doc": "the link breaks three ways while a car charges: the broker stops answering CONNACK "
               "for a few seconds (reconnect), the Wi-Fi routes nothing (Wi-Fi restarts; the reset "
               "held back by the session), a second client takes the pile's id (reported, not "
               "fought); it heals each time and the health messages say so",
        # pilehost/heal_sim.py breaks the link from the host side while these steps run.
        "config": {"wifi": {"ssid": "depot", "password": "sim-passphrase"}},
        "heap_extra_kb": WIFI_HEAP_EXTRA_KB,
        "steps": [(300, "plug"), (1000, "request"), (90000, "stop_request"), (90500, "unplug"),
                  (94000, "end")],
    },
    "broken_config": {
        "doc": "config.json with a bad value: clear error, pilot F, contactor never closes",
        "config": {"max_current_a": "lots"},
        "steps": _CHARGE + [(1500, "end")],
    },
}


def latency_trials(trials=200, meter_fault=None):
    """C->B trials for the benchmark: charge, stop requesting at a varying phase, repeat. A
    meter fault comes after the session's start value (at boot, before 300 ms): without one the
    contactor would never close."""
    steps = [(300, "plug")]
    if meter_fault:
        steps.append((400, "meter_fault", meter_fault))
    t = 500
    for i in range(trials):
        steps.append((t, "request"))
        # 100 ms B->C debounce and 15 ms of contacts closing, then a margin; the varying part
        # moves the stop's phase against the 5 ms control loop.
        t += 250 + (i * 37) % 23
        steps.append((t, "stop_request"))
        # Open within ~35 ms; the next trial after the contactor's minimum open time (relay.py
        # MIN_OPEN_MS, 1 s), else it would not close and the trial would measure nothing.
        t += 1100
    steps.append((t + 200, "end"))
    return {"doc": "benchmark: %d C->B trials%s" % (trials, ", meter " + meter_fault if meter_fault else ""),
            # A silent meter must not stop the trials' sessions: only the latency is measured.
            "config": {"meter": {"type": "ddsu666", "failure_timeout_s": 3600}},
            "steps": steps}


def metered_session(charge_s=30):
    """One session with charge_s seconds of charging, for the benchmark's bytes on the wire."""
    stop = 1000 + charge_s * 1000
    return {"doc": "benchmark: one session, %d s of charging" % charge_s,
            "steps": _CHARGE + [(stop, "stop_request"), (stop + 500, "unplug"), (stop + 4000, "end")]}


def get(name):
    """A scenario by name; 'latency_trials:N[:FAULT]' builds the benchmark's trials,
    'metered_session:S' its session for the bytes on the wire."""
    if name.startswith("latency_trials"):
        parts = name.split(":")
        return latency_trials(int(parts[1]) if len(parts) > 1 else 200, parts[2] if len(parts) > 2 else None)
    if name.startswith("metered_session"):
        parts = name.split(":")
        return metered_session(int(parts[1]) if len(parts) > 1 else 30)
    return SCENARIOS[name]
