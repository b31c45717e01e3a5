#!/usr/bin/env python3
"""Staged rollout of a published release (docs/ota.md): cohorts gated on their health, halted
automatically when a cohort gets worse.

    python tools/rollout.py --broker mqtt://evse-cloud:PASS@broker:1883 --release 7 \
        --piles piles.json --cohorts 1,10,100

The code is pilehost.rollout.
"""
import sys

from pilehost import rollout

if __name__ == "__main__":
    sys.exit(rollout.main())
