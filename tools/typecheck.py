#!/usr/bin/env python3
"""`make check`'s type check: firmware/ against the ESP32's MicroPython API, so code that calls
something the board does not have (`time.monotonic_ns()`, `import threading`, a `machine.Pin`
method of another port) fails here rather than on a pile.

    python tools/typecheck.py [PATH ...]      (default: firmware/)

The code: pilehost/typecheck.py.
"""
import sys

from pilehost.typecheck import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
