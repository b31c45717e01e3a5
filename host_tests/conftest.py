"""Host test set-up: firmware/ and sim/ on the path, MicroPython shims for CPython."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for sub in ("host_tests/shims", "firmware", "sim"):
    path = os.path.join(ROOT, sub)
    if path not in sys.path:
        sys.path.insert(0, path)

import mp_time  # noqa: E402

mp_time.install()
