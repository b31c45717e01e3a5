#!/usr/bin/env python3
"""Build and sign a remote command for a pile (docs/commands.md). CPython, stdlib only.

    python tools/pilecmd.py --secret-file s.key --counter 5 remote_start auth_id=card-1
    python tools/pilecmd.py --secret-file s.key set_current_limit amps=16

The code: pilehost/pilecmd.py.
"""
import sys

from pilehost.pilecmd import main

if __name__ == "__main__":
    sys.exit(main())
