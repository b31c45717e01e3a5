#!/usr/bin/env python3
"""The technician's commands, one per step, through mpremote on the board's USB serial port
(or a virtual board's pty: pilehost/vboard.py). The Makefile targets of the same names call these.

    python tools/technician.py flash PORT [--board ref-esp32] [--source]
    python tools/technician.py provision PORT CONFIG [--board NAME] [--no-reboot]
    python tools/technician.py diag PORT [--json]
    python tools/technician.py clear-fault PORT FAULT
    python tools/technician.py reboot PORT
    python tools/technician.py virtual-board [--dir DIR] [--scenario normal] [--board ref-esp32]
        [--meter ddsu666] [--no-broker]

The code: pilehost/technician.py.
"""
import sys

from pilehost.technician import main

if __name__ == "__main__":
    sys.exit(main())
