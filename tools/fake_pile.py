#!/usr/bin/env python3
"""A pile's telemetry as docs/telemetry.md specifies it, played over MQTT 3.1.1 like the firmware:
normal sessions, replays and duplicates, garbage. Used by host_tests/test_consumer.py, and handy
to commission a consumer without a pile.

    python tools/fake_pile.py --broker mqtt://127.0.0.1:1883 [--pile pile-0042] [--boot 17]
        [--scenario normal|replay|garbage|fleet|live] [--sessions N] [--repeat N] [--piles N]
        [--unsynced] [--pace SECONDS] [--meter-interval SECONDS]

The code: pilehost/fake_pile.py.
"""
import sys

from pilehost.fake_pile import main

if __name__ == "__main__":
    sys.exit(main())
