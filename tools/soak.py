#!/usr/bin/env python3
"""`make soak`: many simulated sessions with faults injected, against a real broker and the
reference consumer; at the end the consumer's database must hold exactly the sessions the
simulated car performed, each once, with the simulated meter's energy to the Wh.

    python tools/soak.py [--sessions 1000] [--seed N] [--no-kills] [--no-broker-faults]

The code: pilehost/soak.py.
"""
import sys

from pilehost.soak import main

if __name__ == "__main__":
    sys.exit(main())
