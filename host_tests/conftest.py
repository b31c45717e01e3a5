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
import threading
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


# `make test-long` (PILE_TEST_LONG=1): also the runs `make test` leaves out (unix_binary_long).
LONG = os.environ.get("PILE_TEST_LONG") == "1"

# `make test` runs in two parts. The tests that wait on the firmware's real time (the unix port
# against its simulated hardware, mosquitto; ~20-35 % of a core each) are marked `realtime` and
# run on more workers than cores, after the rest, which use the CPU, on two. Together they would
# starve the firmware's loop: under an overloaded machine the scenarios read a torn pilot waveform
# (C -> X) and miss their 100 ms. Named by prefix, a whole file ("test_x.py::") or some of its
# tests (a session of the normal scenario on the unix port: 7 s, ~2 s of CPU); a test not named
# here runs in the CPU part, on two workers, as every test did before.
REALTIME = ("test_soak.py::", "test_scenarios_unix.py::", "test_ota_fleet.py::", "test_link_heal_unix.py::",
            "test_mqtt_link.py::", "test_mqtt_commands.py::", "test_mqtt_tls.py::", "test_technician.py::",
            "test_technician_reboot.py::",
            "test_sim_broker.py::", "test_sntp.py::", "test_wifi.py::", "test_heal_sim.py::",
            "test_ota_withdraw.py::", "test_release_boot_unix.py::", "test_boot_check_unix.py::",
            "test_review_diet4.py::test_a_session_on_the_unix_port_",
            "test_heap_lazy.py::test_a_session_on_the_chip_shaped_port_",
            "test_heap_lazy.py::test_the_boot_only_modules_are_gone_after_the_boot_",
            "test_boot_split.py::test_the_boot_only_modules_are_gone_after_the_boot_",
            "test_link_setup.py::test_a_session_on_the_chip_shaped_port_",
            "test_ota_lazy.py::test_a_session_with_updates_configured_",
            "test_heap_standin.py::test_the_stand_in_s_probe_and_session_",
            "test_deps_shipped.py::test_a_board_flashed_before_")  # make flash on a virtual board
# Within each part the longest start first, in this order (measured with --durations on each part,
# 2026-12-07, a group as one), so that none is left running alone at the end; the rest follow in
# file order. A part's order only matters among its own.
LONGEST_FIRST = (
    "test_soak.py::test_soak_short",  # ~2.5 min each (~4 in make test-long)
    "test_ota_fleet.py::",  # ~3.5 min, one group
    "test_chipmodel.py::test_a_chip_run",  # builds build/chip/ on a fresh clone (~2 min), then callgrind
    "test_ota_withdraw.py::",  # ~2.5 min, one group
    "test_stateful_pile.py::",  # ~2 min, then 2-4 s each
    "test_heal_sim.py::",  # ~1.5-2.5 min
    "test_review_meter_jump.py::test_billed_never_exceeds",  # ~1 min
    "test_link_heal_unix.py::",  # ~1 min each
    "test_pilot_mixed_review.py::test_a_car_read_wrong",
    "test_technician.py::test_flash_provision",
    "test_flash_closed.py::test_no_flash_write",  # ~35 s
    "test_hostile_billing.py::test_item18_flash_errors",
    "test_boot_check.py::test_stage_one",
    "test_chipgrowth.py::test_the_frozen_firmware",  # the chip image's (built by then: its lock)
    "test_release_boot_unix.py::",
    "test_mqtt_link.py::test_fuzzed_commands",
    "test_pilot_mixed.py::test_loop_stalls",
    "test_chipota.py::",
    "test_fleet.py::test_fleet_storm",
    "test_mqtt_commands.py::",
    "test_technician_reboot.py::",
    "test_mqtt_link.py::test_broker_",
    "test_scenarios_unix.py::test_a_misbehaving_bus",
    "test_boot_check_unix.py::test_a_release_damaged",  # ~14 s each
    "test_mqtt_tls.py::",
    "test_scenarios_unix.py::test_session_energy",
    "test_journal.py::test_random_operations",
    "test_meter_trust.py::test_no_false_alarm",
    "test_hostile_meters.py::test_item12_13_selftest",
)
# Tests that must run in one process, in file order: a module fixture that later tests build on
# (the OTA fleet's releases), one test that reads what another left (test_ota.py's cuts), or a
# costly module fixture (the browser, mypy) that each worker would start again.
TOGETHER = {
    "test_ota_fleet.py::": "ota_fleet",
    "test_ota_withdraw.py::": "ota_withdraw",
    "test_ota.py::test_power_cut_at_any_byte": "ota_cuts",
    "test_ota.py::test_the_power_cuts_fell": "ota_cuts",
    "test_ops_web.py::": "ops_web",
    "test_typecheck.py::": "typecheck",
    "test_packaging.py::": "packaging",
    "test_technician_doc.py::": "technician_doc",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "realtime: waits on the firmware's real time (conftest REALTIME)")


def _rank(item):
    name = item.nodeid.rsplit("/", 1)[-1]
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix)), len(LONGEST_FIRST))


@pytest.hookimpl(tryfirst=True)  # before -m selects on `realtime`
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_rank)
    for item in items:
        if item.nodeid.rsplit("/", 1)[-1].startswith(REALTIME):
            item.add_marker(pytest.mark.realtime)


def _together(nodeid):
    """The TOGETHER group of a test, or None."""
    name = nodeid.rsplit("/", 1)[-1]
    return next((group for prefix, group in TOGETHER.items() if name.startswith(prefix)), None)


# xdist's own loadgroup (an xdist_group mark appended to the test's nodeid) does nothing on
# pytest 9: xdist 3.8 sets item._nodeid, which pytest 9 no longer reads, so every test was its
# own unit, the groups' tests spread over the workers (each started the browser and mypy again,
# built the OTA fleet's releases again, and test_ota.py's second cut test skipped). The units
# are made here, from TOGETHER: `--dist loadgroup` schedules each group as one unit, in
# collection order (LONGEST_FIRST), each other test alone.
@pytest.hookimpl(optionalhook=True, tryfirst=True)  # optional: make fuzz runs with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TogetherScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _together(nodeid) or nodeid

    return TogetherScheduling(config, log)


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
def torn_appends(monkeypatch):
    """journal.py's appends ("ab" opens) write 3 bytes, then fail with ENOSPC: a torn record on
    flash. Patched through the test's monkeypatch (its undo() ends it)."""
    import journal

    real_open = open

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(bytes(b)[:3])
            raise OSError(28, "no space")

        def flush(self):
            self.f.flush()

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()

    def failing_open(p, mode="r"):
        f = real_open(p, mode)
        return HalfFile(f) if mode == "ab" else f

    monkeypatch.setattr(journal, "open", failing_open, raising=False)


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

def _use_binary(kind, monkeypatch):
    from pilehost import unix_port

    path = unix_port.binary(kind)
    if path is None:
        pytest.skip("no %s MicroPython unix port on this machine" % kind)
    monkeypatch.setenv("MICROPYTHON", path)
    return kind


@pytest.fixture
def vboard_tools():
    """What a virtual board (pilehost/vboard.py) needs on this machine: socat for its pty (a
    failure: `make test` installs it) and the MicroPython unix port (a skip outside make)."""
    import shutil

    from pilehost import unix_port

    if shutil.which("socat") is None:
        pytest.fail("the virtual board needs socat: `make test` installs it as root "
                    "(apt-get install socat)", pytrace=False)
    try:
        unix_port.micropython_binary()
    except FileNotFoundError:  # pragma: no cover - `make test` installs it
        pytest.skip("MicroPython unix port not installed (make venv)")


@pytest.fixture(params=["stock", "unix32"])
def unix_binary(request, monkeypatch):
    """Each test that takes it runs twice: on the venv's unix port (64-bit, double-precision
    floats) and on the one shaped like the ESP32 (32-bit words, single-precision floats; ints of
    2^30 and more are heap objects), pilehost/unix_port.py binary(). MICROPYTHON names it for
    the runs, in this process and in the tools it starts. For billing and records (float32
    registers, ints past 2^30), and whatever else the word size can change."""
    return _use_binary(request.param, monkeypatch)


@pytest.fixture(params=["stock", "unix32"] if LONG else ["stock"])
def unix_binary_long(request, monkeypatch):
    """unix_binary for what the word size cannot change (the control logic, the safety
    reactions): the venv's binary in `make test`, both in `make test-long`."""
    return _use_binary(request.param, monkeypatch)


@pytest.fixture
def soak_sessions():
    """How many sessions test_soak.py's short soak runs on each binary: 30 in `make test` (every
    fault kind comes up with its fixed seed, a lifetime of 10 sessions among them), 50 in
    `make test-long`; `make soak` runs as many as asked."""
    return 50 if LONG else 30


# -- the OTA bench (pilehost.ota_rig) ---------------------------------------------------------------

@pytest.fixture
def flash(tmp_path, monkeypatch):
    """A board's flash for pilehost.ota_rig: a fresh folder, made the working directory (the
    firmware names its files relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


class OtaBench:
    """Releases signed with ota_rig's release key, and boards that trust it (the `ota` fixture)."""

    def board(self, **kw):
        from pilehost import ota_rig, release

        return ota_rig.Board(release.public_hex(ota_rig.release_key()), **kw)

    def published(self, n, version="0.2.0", files=None, boards=("ref-esp32",), signer=None, body=None):
        """(manifest, files, the broker's retained items) of release n."""
        from pilehost import ota_rig, release

        files = files or ota_rig.fake_files(version)
        manifest = release.sign_manifest(signer or ota_rig.release_key(), n, version, list(boards), files,
                                         body=body)
        return manifest, files, release.chunks(n, manifest, files)

    def switched_to_trial(self, broker, cmd, n=1, version="0.2.0", **kw):
        """A new board (Board(**kw)) that boots, is sent release n (put on `broker` here) by the
        command `cmd`, stages it, resets at the switch and boots into the release's trial."""
        from pilehost import ota_rig

        broker.put(self.published(n, version)[2])
        b = self.board(**kw)
        b.boot(broker)
        b.updater.start(0, cmd, n)
        ota_rig.run(b, 5000, until=lambda: any(a["cmd_id"] == cmd for a in b.acks()))
        assert b.updater.state == "staged", b.updater.reason
        with pytest.raises(ota_rig.Reset):
            ota_rig.run(b, 10)
        assert b.boot(broker) == n and b.updater.state == "trial"
        return b


@pytest.fixture
def ota(flash):
    """OtaBench, on `flash`."""
    return OtaBench()


# -- a scenario on the unix port that the test drives while it runs --------------------------------

@pytest.fixture
def scenario_thread(monkeypatch):
    """start(name, config, steps=None, **options) -> (thread, box): pilehost.unix_port's
    run_scenario(name, config=config, heapsize=link_rig.HEAP, **options) in a thread; box["run"]
    is the SimRun once it ends. steps: a scenario made for this test under `name` (with
    heap_extra_kb=...: its heap beyond the link's)."""
    from pilehost import unix_port
    from pilehost.link_rig import HEAP

    def start(name, config, steps=None, heap_extra_kb=0, **options):
        if steps is not None:
            spec = {"doc": "made by the test", "steps": steps}
            if heap_extra_kb:
                spec["heap_extra_kb"] = heap_extra_kb
            monkeypatch.setitem(unix_port.scenarios.SCENARIOS, name, spec)
        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("run", unix_port.run_scenario(
            name, config=config, heapsize=HEAP, **options)))
        thread.start()
        return thread, box

    return start


def _can_build_chip_images():
    """Skips the test where the MicroPython source or a 32-bit C toolchain is missing."""
    import subprocess

    from pilehost import chipbuild

    if not os.path.exists(chipbuild.SOURCE_TARBALL):
        pytest.skip("no MicroPython source tarball in ../shared/tools")
    probe = subprocess.run(["gcc", "-m32", "-x", "c", "-", "-o", os.devnull], input="int main(){return 0;}",
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip("no 32-bit C toolchain (Debian's gcc-multilib; make chiptools)")


@pytest.fixture(scope="session")
def chip_image():
    """The chip model's image (pilehost/chipbuild.py, cached in build/chip/: 32-bit, single-precision,
    the firmware frozen in); the test is skipped where the source or a 32-bit C toolchain is missing."""
    from pilehost import chipbuild

    _can_build_chip_images()
    return chipbuild.chip_binary(log=lambda text: None)


@pytest.fixture(scope="session")
def stock_image():
    """(binary, MICROPYPATH) of a stock ESP32 image's stand-in (pilehost/chipbuild.py: 32-bit,
    single-precision, umqtt.simple frozen as the port's manifest freezes it), for the firmware as .mpy:
    a run finds it in its cwd, the flash root (unix_port.link_files(cwd, chipbuild.flash_files(binary)))."""
    from pilehost import chipbuild

    _can_build_chip_images()
    return chipbuild.stock_binary(log=lambda text: None), chipbuild.stock_micropypath()


@pytest.fixture(scope="session")
def chip_binary(chip_image):
    """The chip image for a run under callgrind; the test is skipped where valgrind is missing."""
    import shutil

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (make chiptools)")
    return chip_image


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


# -- a fleet of virtual piles for the OTA tests -------------------------------------------------------

@pytest.fixture(scope="module")
def ota_fleet(tmp_path_factory):
    """make(n=3) -> an online pilehost.ota_sim.Fleet of n virtual piles on mosquitto, stopped at the
    module's end. Module-scoped: a module's tests build on each other's releases (conftest TOGETHER)."""
    from pilehost import ota_sim

    fleets = []

    def make(n=3):
        f = ota_sim.Fleet(str(tmp_path_factory.mktemp("fleet")), n=n)
        fleets.append(f)
        assert f.wait_online(), "the piles did not come online"
        return f

    try:
        yield make
    finally:
        for f in fleets:
            f.stop()


# -- a database as the reference consumer keeps it --------------------------------------------------

class ConsumerDb:
    """The reference consumer's database at `url`: `storage` (consumer.open_storage, set up: every
    table) and `handler`, its consumer.Handler with docs/schemas, which stores one message at a
    time as the consumer does."""

    def __init__(self, url):
        from pilehost import consumer
        from pilehost.cloud import schemas

        self.url = url
        self.storage = consumer.open_storage(url)
        self.storage.setup()
        self.handler = consumer.Handler(schemas(), self.storage)
        self.closed = False

    def close(self):
        if not self.closed:
            self.closed = True
            self.storage.close()


@pytest.fixture
def consumer_db():
    """open(url) -> a ConsumerDb on that database (db_url, sqlite_url...); each closed at the test's
    end if the test did not close it."""
    opened = []

    def open_db(url):
        db = ConsumerDb(url)
        opened.append(db)
        return db

    yield open_db
    for db in opened:
        db.close()


# -- the firmware's console and flash gate, for one test ----------------------------------------------

class Hold:
    """console.hold or a store's gate as far as they ask: `held`, set by the test."""

    def __init__(self, held=True):
        self.held = held


@pytest.fixture
def fresh_console(monkeypatch):
    """firmware/console.py as at boot: nothing queued, the UART's FIFO empty, nothing dropped, no
    fault kept; console.hold a Hold, held (lines queue, as while the contactor is closed) until
    the test sets held = False. Returns the Hold."""
    import console

    for name, value in (("_queue", []), ("_queued", 0), ("_head", 0), ("_fifo", 0), ("_fifo_ms", 0),
                        ("lines_dropped", 0), ("recent_faults", [])):
        monkeypatch.setattr(console, name, value)
    hold = Hold()
    monkeypatch.setattr(console, "hold", hold)
    return hold


class ConsoleUart:
    """The console UART at 115,200 baud as console.py models it, on a clock in ms (`clock[0]`,
    a float): a 128-byte FIFO emptied at 11.52 bytes a ms; a write larger than what is free
    blocks until the rest is in, and the clock moves on meanwhile. `blocked`: (ms, held) for
    each write, held being console.hold.held then."""

    BYTES_PER_MS = 11.52

    def __init__(self, clock, hold):
        self.clock = clock
        self.hold = hold
        self.fifo = 0.0
        self.at = clock[0]
        self.blocked = []

    def write(self, s):
        now = self.clock[0]
        self.fifo = max(0.0, self.fifo - (now - self.at) * self.BYTES_PER_MS)
        free = 128 - self.fifo
        wait = max(0.0, (len(s) - free) / self.BYTES_PER_MS)
        self.blocked.append((wait, self.hold.held))
        self.clock[0] = now + wait
        self.fifo = min(128.0, self.fifo + len(s))
        self.at = self.clock[0]

    def held_blocks(self):
        """The ms each write blocked while the contactor was closed (above 0.01 ms)."""
        return [w for w, held in self.blocked if held and w > 0.01]


@pytest.fixture
def console_uart(fresh_console, monkeypatch):
    """start(ms) -> a ConsoleUart as the console's stdout, its clock at ms and time.ticks_ms
    reading it, the console as at boot with hold.held False. Call it at each hypothesis example:
    the fixture is made once for all of them."""
    import console
    import time

    def start(ms):
        console._queue[:] = []
        console._queued = console._head = console._fifo = console._fifo_ms = 0
        console.lines_dropped = 0
        fresh_console.held = False
        uart = ConsoleUart([float(ms)], fresh_console)
        monkeypatch.setattr(console.sys, "stdout", uart)
        monkeypatch.setattr(time, "ticks_ms", lambda: int(uart.clock[0]))
        return uart

    return start


@pytest.fixture
def power_cut_records(tmp_path):
    """cut(name, linked=True) -> (records, log): a session's snapshot written by boot 7's
    SessionLog (real journal and session store under tmp_path/name), then boot 8 (a power cut
    between them) with Records on a steady meter, the contactor open and the car in C asking for
    power since t=100 (records.poll(100) done): the cut's record and the new session's start
    are in the outbox, not yet acknowledged."""
    import charger as ch
    import charger_restore
    import journal_scan
    import meter
    import pilot
    import session_restore
    import session_store
    from session_record import Record
    from wiring import new_records

    class Meter:
        last_error = None
        epoch = 0

        def __init__(self):
            self.reading = meter.Reading(1000, 0.0, 230.0, 0.0, 0)

        def poll(self, now_ms):
            self.reading = meter.Reading(1000, 0.0, 230.0, 0.0, now_ms)

    class Contactor:
        closed = False

    def make_log(boot, where, linked):
        log = session_restore.load(
            "pile-0042", boot, journal_scan.load(str(where / "outbox")),
            session_store.SessionStore(str(where / "session.json")), metered=True,
            checkpoint_s=60, wall=lambda: 1795000000, linked=linked)  # as wiring.build_session_log
        return log

    def cut(name, linked=True):
        where = tmp_path / name
        where.mkdir()
        first = Record(ch.Session(0))
        first.auth_source, first.auth_id, first.authorized_ms = "free_vend", None, 0
        first.note_meter(meter.Reading(1000, 0.0, 230.0, 0.0, 0))
        make_log(7, where, linked).poll(0, first, None)  # a session, its snapshot; then the cut
        booted = make_log(8, where, linked)
        charger = charger_restore.build(32000, 32000, True, False)
        records = new_records(charger, Contactor(), Meter(), booted)
        charger.step(100, pilot.C, True)  # the car there all along, asking for power
        records.poll(100)
        return records, booted

    return cut


def _functions_of(module, roots):
    """Functions defined in `module` reachable from roots: a function holds its module's globals
    and with them every function of it (modules and classes not followed: the modules a
    function's globals name are loaded anyway)."""
    import gc

    own = vars(module)
    seen, found, todo = set(), [], list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType) and obj.__globals__ is own:
            found.append(obj.__qualname__)
            continue
        if obj is own:
            found.append("the module's globals")
            continue
        todo.extend(gc.get_referents(obj))
    return found


@pytest.fixture(scope="session")
def functions_of():
    """functions_of(module, roots) -> the qualified names of `module`'s functions reachable from
    roots (a dropped module must leave none: test_heap_lazy, test_link_setup)."""
    return _functions_of


class FakeFlashGate:
    """flash_gate.FlashGate's interface for a store under test: held while `closed`; defer(flush)
    keeps the write, open() opens and runs the deferred writes (returns their results);
    every_open_step(fn) keeps fn in `steps`."""

    spent = False  # FlashGate's per-iteration write flag: never set here

    def __init__(self):
        self.closed = False
        self.due = []
        self.steps = []

    @property
    def held(self):
        return self.closed

    def spend(self):
        pass

    def defer(self, flush):
        self.due.append(flush)

    def every_open_step(self, fn):
        self.steps.append(fn)

    def open(self):
        self.closed = False
        due, self.due = self.due, []
        return [f(0) for f in due]


@pytest.fixture(scope="session")
def fake_flash_gate():
    """The FakeFlashGate class: a test makes a fresh one per run (a hypothesis example too: no
    state here, so the session scope)."""
    return FakeFlashGate


# -- a worst-case flash part under the virtual board (test_flash_gate_spread, test_review_flashfix)

WORST_FLASH_WRITE_US = 800000  # a block erase and a metadata compaction, 400 ms each (W25Q32JV tSE max)
WORST_FLASH_META_US = 400000  # a metadata compaction


@pytest.fixture
def slow_flash(monkeypatch):
    """slow_flash(vb): from now on every write, rename and remove of the firmware's files stalls
    the virtual board's clock as a worst-case part would; returns the list that gets (virtual
    us, what). Import every writer module before calling it (its `open` is wrapped)."""
    from pilehost.virtual_board import watch_flash

    def install(vb):
        log = []

        def stall(kind, path, _mode):
            log.append((vb.clock.t, path if kind == "open" else kind + " " + path))
            vb.clock.t += WORST_FLASH_WRITE_US if kind == "open" else WORST_FLASH_META_US

        watch_flash(monkeypatch, stall)
        return log

    return install
