#!/usr/bin/env python3
"""A board file -> the technician's wiring table (markdown), as docs/technician.md shows it.

    python tools/pin_table.py boards/ref-esp32.json

The code: pilehost/pin_table.py.
"""
import sys

from pilehost.pin_table import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
