#!/usr/bin/env python3
"""Reference consumer of the piles' telemetry (docs/telemetry.md): validate, store once, show.

    python tools/consumer.py --broker mqtt://user:pass@host:1883 [--tls-ca ca.pem]
        [--db sqlite:///evse.db | postgresql://...] [--group NAME] [--client-id ID]
        [--monitor] [--once-for SECONDS]

The code: pilehost/consumer.py.
"""
import sys

from pilehost.consumer import main

if __name__ == "__main__":
    sys.exit(main())
