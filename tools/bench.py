"""`make bench`: figures, not a test. Runs the firmware on the MicroPython unix port.

- control tick time (median, p99), idle and charging, and how much of it is the pilot burst;
- C->B -> contactor-open latency over many trials (median, p99, max);
- heap: the smallest -X heapsize that completes a full session, the simulator's share of it,
  and the live heap after gc.collect() at the end.
"""
import json
import os
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


def smallest_heap_kb():
    """Bisect the firmware budget (KiB) at which the normal scenario still completes."""
    low, high = 16, 128
    while high - low > 1:
        mid = (low + high) // 2
        r = launch.run_scenario("normal", heapsize="%dk" % mid)
        ok = r.returncode == 0 and r.result and not any("MemoryError" in x for x in r.lines)
        ok = ok and any("-> idle" in t for _, t in r.firmware_events("charger"))
        if ok:
            high = mid
        else:
            low = mid
    return high


def main():
    trials = int(os.environ.get("BENCH_TRIALS", "200"))
    print("Pile firmware benchmark on the MicroPython unix port (%s)" % launch.micropython_binary())
    ticks = tick_times()
    for state in ("idle", "charging"):
        total, burst = ticks[state]
        print("control tick, %-8s median %5d us, p99 %5d us (pilot burst %d us of it, median)" % (
            state, percentile(total, 50), percentile(total, 99), percentile(burst, 50)))

    # A roomy heap: the trials' scripted steps are the simulator's, not the firmware's.
    r = launch.run_scenario("latency_trials:%d" % trials, heapsize="256k", timeout=900)
    if r.result is None:
        raise SystemExit("latency run failed:\n" + "\n".join(r.lines[-20:]))
    lat = r.result["latencies_ms"]
    print("C->B -> contactor open, %d trials: median %.1f ms, p99 %.1f ms, max %.1f ms (limit 100 ms)" % (
        len(lat), percentile(lat, 50), percentile(lat, 99), max(lat)))

    r = launch.run_scenario("normal")
    sim_share = r.result["heap_simulator"]
    live = r.result["heap_after_collect"]
    smallest = smallest_heap_kb()
    print("heap: a full session completes with -X heapsize=%dk: firmware %d KiB + simulator %d KiB "
          "(%d B); live after gc.collect() at the end: %d B, firmware's part %d B" % (
              smallest + launch.SIM_HEAP_ALLOWANCE_KB, smallest, launch.SIM_HEAP_ALLOWANCE_KB,
              sim_share, live, live - sim_share))


if __name__ == "__main__":
    main()
