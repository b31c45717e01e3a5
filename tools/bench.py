#!/usr/bin/env python3
"""`make bench`: figures, not a test. Runs the firmware on the MicroPython unix port.

    python tools/bench.py [ticks] [mpy] [latency] [wire] [heap] [heap32] [chip] [ota] [growth]
                                                                          (default: all)

The code: pilehost/bench.py.
"""
import sys

from pilehost.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
