"""Benchmark (MicroPython): time the control tick of the real firmware on the simulated hardware.

Run by tools/bench.py as `micropython -m bench_tick N` in a prepared flash folder. Prints one
JSON line: tick times in us (the tick and the records step after it, meter polling included)
while idle and while charging, and the pilot burst's share.
"""
import json
import sys
import time

import world


def _step(ctl):
    """The loop's control work, as main.run does it: the tick, then the records step."""
    now = time.ticks_ms()
    ctl.tick(now)
    ctl.records.poll(now)


def _measure(ctl, sampler, n):
    ticks = []
    bursts = []
    sample = sampler.sample

    def timed_sample():
        t0 = time.ticks_us()
        sample()
        bursts.append(time.ticks_diff(time.ticks_us(), t0))

    sampler.sample = timed_sample
    for _ in range(n):
        t0 = time.ticks_us()
        _step(ctl)
        ticks.append(time.ticks_diff(time.ticks_us(), t0))
        time.sleep_ms(2)
    sampler.sample = sample
    return ticks, bursts


def start(n):
    with open("board.json") as f:
        board = json.load(f)
    sim = world.World(board, [(0, "plug"), (200, "request")], echo=False)
    world.WORLD = sim
    with open("config.json") as f:
        sim.fit_meter(json.load(f).get("meter", {}))
    import console
    import wiring

    board_s, conf, problem = wiring.load_settings()
    if problem:
        raise SystemExit(problem)
    console.report = lambda now, what, text: None
    ctl = wiring.build(board_s, conf)
    out = {}
    while ctl.charger.state != "charging":
        _step(ctl)
        time.sleep_ms(2)
    out["charging"] = _measure(ctl, ctl.sampler, n)
    sim.do("unplug")
    while ctl.charger.state != "idle":
        _step(ctl)
    out["idle"] = _measure(ctl, ctl.sampler, n)
    # Streamed: one 48 KB string at 2000 ticks may find no room in a fragmented heap.
    sys.stdout.write("BENCH ")
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


start(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
