"""Host test set-up and the shared fixtures.

pyproject.toml's pytest `pythonpath` puts sim/, firmware/ and host_tests/shims on the path (the
MicroPython side, imported by bare name as on the board) and the checkout's root (pilehost, the
host package, and tools/). Here: the MicroPython shims installed, umqtt.simple (make deps)
loadable so that CPython tests can import mqtt_link, and the fixtures several test files share:
a mosquitto of our own, the reference consumer in-process, a subscriber to the pile's topics."""
import importlib
import importlib.util
import os
import sys
import time
import types
import urllib.parse
import uuid

import mp_time
import pytest

from pilehost import ROOT
from pilehost.broker import Broker, BrokerError
from pilehost.cloud import Store
from pilehost.link_rig import Watcher
from pilehost.meter_rig import refuse_sleeping

mp_time.install()
# The tools the tests start as programs import the package from this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


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


# Files the tests leave for a person to look at (the operations page's screenshots): their paths
# at the end of the run, also from xdist's workers, whose prints are not shown.
TEST_OUTPUT = os.path.join(ROOT, "build", "test-output")
_STARTED = []


def pytest_sessionstart(session):
    _STARTED.append(time.time())


def pytest_terminal_summary(terminalreporter):
    if not _STARTED or not os.path.isdir(TEST_OUTPUT):
        return
    made = sorted(os.path.join(TEST_OUTPUT, name) for name in os.listdir(TEST_OUTPUT)
                  if os.path.getmtime(os.path.join(TEST_OUTPUT, name)) >= _STARTED[0] - 1)
    for path in made:
        terminalreporter.write_line("test output: %s" % path)


# -- the meter drivers' tests ------------------------------------------------------------------------

# These run a subprocess (mpy-cross, micropython), whose timeout wait may sleep in CPython.
_RUN_SUBPROCESSES = ("test_firmware_compiles_for_esp32", "test_selftest_on_micropython_unix_port")


@pytest.fixture
def no_sleeping(monkeypatch, request):
    """poll() must never sleep: any sleep during a meter test fails it (pytestmark of the meter
    test files)."""
    if request.node.originalname not in _RUN_SUBPROCESSES:
        refuse_sleeping(monkeypatch)


# -- brokers, the reference consumer, a subscriber ----------------------------------------------------

@pytest.fixture
def new_broker():
    """new_broker(directory, **options): a pilehost.broker.Broker, stopped after the test; the
    test fails at once, saying why, if mosquitto is not installed or does not start."""
    made = []

    def make(directory, **options):
        os.makedirs(str(directory), exist_ok=True)
        try:
            b = Broker(directory, **options)
        except BrokerError as e:
            pytest.fail(str(e), pytrace=False)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """One mosquitto per test module: loopback, a free port, no persistence, anonymous."""
    try:
        b = Broker(tmp_path_factory.mktemp("mosquitto"))
    except BrokerError as e:
        pytest.fail(str(e), pytrace=False)
    yield b
    b.stop()


@pytest.fixture
def store(broker, tmp_path):
    """The reference consumer, in-process, on `broker`'s plain listener, SQLite in tmp."""
    s = Store(broker.url(), tmp_path / "telemetry.db")
    yield s
    s.stop()


@pytest.fixture
def watcher(broker):
    """Every message the pile (link_rig.PILE) sends through `broker`."""
    w = Watcher(broker)
    time.sleep(0.2)
    yield w
    w.close()


# -- the consumer's databases ---------------------------------------------------------------------------

def with_search_path(url, schema):
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query) + [("options", "-csearch_path=%s" % schema)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@pytest.fixture
def sqlite_url(tmp_path):
    return "sqlite:///" + str(tmp_path / "telemetry.db")  # absolute: sqlite:////tmp/...


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database: SQLite, or a schema of its own in PILE_TEST_POSTGRES_URL's server."""
    if request.param == "sqlite":
        yield "sqlite:///" + str(tmp_path / "telemetry.db")
        return
    url = os.environ.get("PILE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("PILE_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against")
    import psycopg

    schema = "evse_test_" + uuid.uuid4().hex[:8]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA %s" % schema)
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA %s CASCADE" % schema)

# -- the unix port's binaries ----------------------------------------------------------------------

@pytest.fixture(params=["stock", "unix32"])
def unix_binary(request, monkeypatch):
    """Each test that takes it runs twice: on the venv's unix port (64-bit, double-precision
    floats) and on the one shaped like the ESP32 (32-bit words, single-precision floats; ints of
    2^30 and more are heap objects), pilehost/unix_port.py binary(). MICROPYTHON names it for
    the runs, in this process and in the tools it starts."""
    from pilehost import unix_port

    path = unix_port.binary(request.param)
    if path is None:
        pytest.skip("no %s MicroPython unix port on this machine" % request.param)
    monkeypatch.setenv("MICROPYTHON", path)
    return request.param


@pytest.fixture
def chip_binary():
    """The chip model's build (pilehost/chipbuild.py, cached in build/chip/) for a run under
    callgrind; the test is skipped where valgrind, the source or a 32-bit C toolchain is missing."""
    import shutil
    import subprocess

    from pilehost import chipbuild

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (make chiptools)")
    if not os.path.exists(chipbuild.SOURCE_TARBALL):
        pytest.skip("no MicroPython source tarball in ../shared/tools")
    probe = subprocess.run(["gcc", "-m32", "-x", "c", "-", "-o", os.devnull], input="int main(){return 0;}",
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip("no 32-bit C toolchain (Debian's gcc-multilib; make chiptools)")
    return chipbuild.chip_binary(log=lambda text: None)


# -- an MQTT link whose network never answers --------------------------------------------------------

@pytest.fixture
def offline_link(monkeypatch):
    """make(net, host) -> (link, contactor, lines): the firmware's MqttLink on a pile charging with
    its contactor closed, its network `net` (pilehost.link_rig.OfflineNet: lookups recorded, TCP
    never connects); lines: what it reported."""
    import mqtt_conn
    import mqtt_link

    from pilehost.link_rig import Stub, charging_ctl

    def make(net, host="broker.example"):
        monkeypatch.setattr(mqtt_link, "socket", net)  # getaddrinfo
        monkeypatch.setattr(mqtt_conn, "socket", net)
        monkeypatch.setattr(mqtt_conn, "select", net)
        ctl, contactor = charging_ctl()
        outbox = Stub(next_seq=1, acked=0, pending=lambda: iter(()), ack=lambda seq: None)
        log = Stub(pile_id="pile-19", boot=3, outbox=outbox)
        conf = Stub(host=host, port=1883, tls_server_name=None, username=None, password=None,
                    keepalive_s=60, status_interval_s=60, meter_interval_s=10, health_interval_s=300,
                    wifi_restart_after_s=300, reset_after_s=1800, reset_min_interval_s=3600,
                    conflict_pause_s=300)
        lines = []
        link = mqtt_link.MqttLink(conf, ctl, log, lambda now, what, text: lines.append(text), boot_ms=0)
        return link, contactor, lines

    return make
