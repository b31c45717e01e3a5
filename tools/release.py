#!/usr/bin/env python3
"""Build, sign and publish a firmware release for over-the-air updates (docs/ota.md).

    python tools/release.py keygen release.pem          # once, on the release engineer's machine
    python tools/release.py pubkey release.pem          # config.json's ota.key
    python tools/release.py build --key release.pem --release 7 --version 0.2.0 build/rel7
    python tools/release.py publish build/rel7 --host broker --port 1883

The code is pilehost.release.
"""
import sys

from pilehost import release

if __name__ == "__main__":
    sys.exit(release.main())
