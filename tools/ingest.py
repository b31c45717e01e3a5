#!/usr/bin/env python3
"""The reference consumer for a fleet: batches, back-pressure, shared subscriptions (pilehost/ingest.py)."""
import sys

from pilehost.ingest import main

if __name__ == "__main__":
    sys.exit(main())
