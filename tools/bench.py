"""`make bench`: figures, not a test. Runs the firmware on the MicroPython unix port.

- control tick time (median, p99), idle and charging, and how much of it is the pilot burst;
- C->B -> contactor-open latency over many trials (median, p99, max);
- the same latency with a meter that never answers, and with the MQTT link's broker
  black-holed (accepts TCP, never answers) or unreachable (nothing listens);
- heap per meter type: the smallest firmware heap that completes a full session, and the
  firmware's live heap after gc.collect() at the end.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "sim"))
import launch  # noqa: E402
import scenarios  # noqa: E402


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def tick_times(n=2000):
    with tempfile.TemporaryDirectory(prefix="pile-bench-") as flash:
        launch.prepare_flash(flash, config=scenarios.BASE_CONFIG)
        out = subprocess.run(
            [launch.micropython_binary(), "-X", "heapsize=512k", "-m", "bench_tick",  # room for the timings
             str(n)], cwd=flash, env=dict(os.environ, MICROPYPATH=launch.micropypath()),
            capture_output=True, text=True, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("BENCH ")][0]
    return json.loads(line[6:])


def smallest_heap_kb(meter):
    """Bisect the firmware budget (KiB) at which the normal scenario still completes."""
    low, high = 16, 160
    while high - low > 1:
        mid = (low + high) // 2
        r = launch.run_scenario("normal", heapsize="%dk" % mid, config={"meter": {"type": meter}})
        ok = r.returncode == 0 and r.result and not any("MemoryError" in x for x in r.lines)
        ok = ok and any("-> idle" in t for _, t in r.firmware_events("charger"))
        if ok:
            high = mid
        else:
            low = mid
    return high


def unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mqtt_config(port):
    return {"mqtt": {"host": "127.0.0.1", "port": port, "keepalive_s": 10}}


def main():
    trials = int(os.environ.get("BENCH_TRIALS", "200"))
    print("Pile firmware benchmark on the MicroPython unix port (%s)" % launch.micropython_binary())
    ticks = tick_times()
    for state in ("idle", "charging"):
        total, burst = ticks[state]
        print("control tick, %-8s median %5d us, p99 %5d us (pilot burst %d us of it, median)" % (
            state, percentile(total, 50), percentile(total, 99), percentile(burst, 50)))

    hole = launch.BlackHole()
    try:
        for fault, label, config in ((None, "DDSU666 meter healthy", None), ("silent", "meter silent", None),
                                     (None, "broker black-holed", mqtt_config(hole.port)),
                                     (None, "broker unreachable", mqtt_config(unused_port()))):
            # A roomy heap: the trials' scripted steps are the simulator's, not the firmware's.
            name = "latency_trials:%d" % trials + (":" + fault if fault else "")
            r = launch.run_scenario(name, heapsize="256k", timeout=900, config=config)
            if r.result is None:
                raise SystemExit("latency run failed:\n" + "\n".join(r.lines[-20:]))
            lat = r.result["latencies_ms"]
            print("C->B -> contactor open, %d trials, %-21s median %.1f ms, p99 %.1f ms, max %.1f ms "
                  "(limit 100 ms)" % (len(lat), label + ":", percentile(lat, 50), percentile(lat, 99),
                                      max(lat)))
    finally:
        hole.close()

    for meter in ("none", "ddsu666", "dlt645", "s0"):
        r = launch.run_scenario("normal", config={"meter": {"type": meter}})
        sim_share = r.result["heap_simulator"]
        live = r.result["heap_after_collect"]
        print("heap, meter %-7s a full session needs a firmware heap of %d KiB; live after "
              "gc.collect() at the end: firmware %d B (simulator %d B beside it)" % (
                  meter + ":", smallest_heap_kb(meter), live - sim_share, sim_share))


if __name__ == "__main__":
    main()
