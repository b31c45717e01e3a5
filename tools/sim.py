#!/usr/bin/env python3
"""`make sim`, `make scenarios`: pilehost/sim_cli.py (python tools/sim.py --help)."""
import sys

from pilehost.sim_cli import main

if __name__ == "__main__":
    sys.exit(main())
