"""One module's heap on import (pilehost/chipheap.py's breakdown, `make bench WHAT=heap32`).

    micropython -m heap_probe MODULE [DEP,DEP...]

With the simulator's modules loaded as sim/rom.py loads them, the given dependencies are
imported first; then MODULE. Prints one line `HEAP-PROBE {json}`: the modules MODULE's import
brought in, the bytes that stay live after a collection (its bytecode, qstrs and module-level
objects: with no dependencies given, its own plus those of everything it imports), the garbage
the import left behind, and the import's transient peak over the heap in use before it
(micropython.mem_peak: the allocator's high-water mark, in bytes asked for).
"""
import gc
import json
import micropython
import sys

import world  # noqa: F401  (the simulator, as sim/rom.py has it before the firmware boots)
import machine  # noqa: F401
import sim_time

sys.modules["time"] = sim_time


def main(argv):
    name = argv[1]
    deps = [d for d in argv[2].split(",") if d] if len(argv) > 2 else []
    for dep in deps:
        __import__(dep)
    before = set(sys.modules)
    gc.collect()
    base = gc.mem_alloc()
    current = micropython.mem_current()
    peak_before = micropython.mem_peak()
    __import__(name)
    peak = micropython.mem_peak()
    left = gc.mem_alloc()
    gc.collect()
    live = gc.mem_alloc()
    print("HEAP-PROBE " + json.dumps({
        "module": name, "loaded": sorted(m for m in sys.modules if m not in before),
        "live": live - base, "garbage": left - live,
        "peak": (peak - current) if peak > peak_before else None}))


main(sys.argv)
