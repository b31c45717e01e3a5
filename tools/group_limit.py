#!/usr/bin/env python3
"""Share a site limit among the piles of a group: signed set_current_limit commands with a time
to live (docs/commands.md, "Limits that expire").

    python tools/group_limit.py --broker mqtt://127.0.0.1:1883 --group site-7.json [--rounds N]

The group file: {"site_limit_a": 63, "ttl_s": 60, "period_s": 5, "piles": [{"pile_id":
"pile-0042", "secret_file": "pile-0042.key", "max_a": 32, "fallback_a": 6}, ...]}. The code:
pilehost/group_limit.py.
"""
import sys

from pilehost.group_limit import main

if __name__ == "__main__":
    sys.exit(main())
