"""Host test set-up: firmware/ and sim/ on the path, MicroPython shims for CPython, and
umqtt.simple (make deps) loadable, so that CPython tests can import mqtt_link."""
import importlib
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for sub in ("host_tests/shims", "firmware", "sim"):
    path = os.path.join(ROOT, sub)
    if path not in sys.path:
        sys.path.insert(0, path)

import mp_time  # noqa: E402

mp_time.install()


def load_umqtt():
    """umqtt.simple by its path: lib/ on sys.path would hand CPython MicroPython's logging too.
    It imports MicroPython's module names."""
    if "umqtt.simple" in sys.modules:
        return
    for mp_name, name in (("usocket", "socket"), ("ustruct", "struct"), ("ubinascii", "binascii")):
        sys.modules.setdefault(mp_name, importlib.import_module(name))
    package = types.ModuleType("umqtt")
    package.__path__ = []
    path = os.path.join(ROOT, "lib", "umqtt", "simple.py")
    spec = importlib.util.spec_from_file_location("umqtt.simple", path)
    simple = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simple)
    package.simple = simple
    sys.modules["umqtt"], sys.modules["umqtt.simple"] = package, simple


load_umqtt()


# The longest runs first: `make test` runs on two workers, and a 3-minute soak collected last
# would run alone at the end while the other worker idles.
LONGEST_FIRST = ("test_soak.py::test_soak_short",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not item.nodeid.endswith(LONGEST_FIRST))
