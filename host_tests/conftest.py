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


# The longest runs first: `make test` runs on two workers, and a 3-minute soak collected last
# would run alone at the end while the other worker idles.
LONGEST_FIRST = ("test_soak.py::test_soak_short",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not item.nodeid.endswith(LONGEST_FIRST))
