#!/usr/bin/env python3
"""A fleet of piles against mosquitto, batch consumers and a database (pilehost/fleet.py):

    python tools/fleet.py [--piles 2000] [--scenario steady|storm|kill|pgrestart|all]
        [--consumers 1,2,4] [--compression 60] [--outage-s S] [--db private|sqlite:///x|postgresql://...]
"""
import sys

from pilehost.fleet import main

if __name__ == "__main__":
    sys.exit(main())
