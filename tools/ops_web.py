#!/usr/bin/env python3
"""The operations page: a read-only web view of the reference consumer's store (docs/ops-page.md).

    python tools/ops_web.py [--db sqlite:///evse-telemetry.db | postgresql://...]
        [--host 127.0.0.1] [--port 8080] [--refresh SECONDS]

The code: pilehost/ops_web.py.
"""
import sys

from pilehost.ops_web import main

if __name__ == "__main__":
    sys.exit(main())
