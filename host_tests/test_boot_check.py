"""Stage one's import check covers what the boot imports later (release_boot.checks(),
docs/ota.md "Stage one"), on CPython: whatever config.json has, every firmware module that
main.run()'s boot (startup.py: build_core, then build_link) imports is imported by stage one
first, kept (MAIN_IMPORTS) or imported and dropped again (checks()), directly or through what
those import at their top. One left out would fail inside run() (fail_safe, a reset) at every
boot of a release damaged after its trial, never rolled back. And no more than the boot imports:
a module imported for nothing leaves its names on the heap. The unix port's side:
test_boot_check_unix.py and test_release_boot_unix.py."""
import ast
import builtins
import json
import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import release_boot
from pilehost import FIRMWARE
from pilehost.source_imports import import_time_imports
from pilehost.virtual_board import VirtualBoard, board_dict

SECRET = "9f" * 32
FIRMWARE_MODULES = {n[:-3] for n in os.listdir(FIRMWARE) if n.endswith(".py")}

METERS = {
    "none": {"type": "none"},
    "ddsu666": {"type": "ddsu666"},
    "sdm120": {"type": "sdm120"},
    "sdm630": {"type": "sdm630"},
    "dlt645": {"type": "dlt645", "address": "000000000001", "baud": 2400, "parity": "even"},
    "s0": {"type": "s0"},
}


def _top_imports(name):
    """The firmware modules `name` imports at its top (run when it is imported)."""
    return import_time_imports(os.path.join(FIRMWARE, name + ".py")) & FIRMWARE_MODULES


def closure(names):
    seen = set()
    todo = [n for n in names if n in FIRMWARE_MODULES]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_top_imports(name) - seen)
    return seen


@st.composite
def configs(draw):
    conf = {"meter": dict(METERS[draw(st.sampled_from(sorted(METERS)))])}
    if draw(st.booleans()):
        conf["pile_id"] = "check-1"
    if draw(st.booleans()):
        mqtt = {"host": "127.0.0.1", "port": 1}
        if draw(st.booleans()):
            mqtt["secret"] = SECRET
        if draw(st.booleans()):
            mqtt["tls_ca"] = "ca.pem"
        conf["mqtt"] = mqtt
    if draw(st.booleans()):
        conf["ota"] = {"key": "c3" * 256}
    if draw(st.booleans()):
        conf["wifi"] = {"ssid": "pile-net", "password": "password1"}
    if draw(st.booleans()):
        conf["ntp"] = {"host": "127.0.0.1", "port": 1}
    return conf


_CA = []


def ca_pem():
    """A self-signed CA (once): the link's TLS context is built at the boot from config's tls_ca."""
    if not _CA:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "check-ca")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, hashes.SHA256()))
        _CA.append(cert.public_bytes(serialization.Encoding.PEM))
    return _CA[0]


def boot_imports(monkeypatch, conf):
    """The firmware modules the boot's two phases import on a virtual board with this
    config.json (every import statement, loaded before or not): main.run's startup.py, its
    build_core's and build_link's calls, then the link made in main.run, in their order (nothing
    imports main.py: test_firmware_layout.py; test_main_py_s_phases_import_only_wiring_and_wiring_link
    keeps the two in step)."""
    vb = VirtualBoard(monkeypatch, config=conf)  # the simulated world, the flash folder as cwd
    vb.world.fit_wifi(conf.get("wifi"))
    with open("board.json", "w") as f:
        json.dump(board_dict(), f)
    with open("config.json", "w") as f:
        json.dump(conf, f)
    with open("ca.pem", "wb") as f:
        f.write(ca_pem())
    seen = set()
    real = builtins.__import__

    def recording(name, *args, **kwargs):
        seen.add(name.split(".")[0])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", recording)
    try:
        import startup  # noqa: F401 - main.run's boot code

        import wiring  # startup.build_core

        board, c, problem = wiring.load_settings()
        assert problem is None, problem
        ctl = wiring.build(board, c)
        import wiring_link  # startup.build_link, after wiring.py is dropped

        make, args = wiring_link.link_parts(board, c, ctl, wiring.handover)
        station = wiring_link.build_wifi(c)
        wiring_link.build_clock(c, ctl)
        wiring_link.watchdog(c.wdt_timeout_ms)
        if make is not None:  # main.run, after wiring_link.py is dropped
            link = make(**args)
            link.station = station
    finally:
        monkeypatch.setattr(builtins, "__import__", real)
    return seen & FIRMWARE_MODULES


def _phase_imports(function, module="startup"):
    with open(os.path.join(FIRMWARE, module + ".py")) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    calls = {n.func.attr for n in ast.walk(node)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    names = {a.name for n in ast.walk(node) if isinstance(n, ast.Import) for a in n.names}
    return names, calls


def test_main_py_s_phases_import_only_wiring_and_wiring_link():
    """What boot_imports() above replays: main.run imports startup.py, whose build_core imports
    wiring.py and calls load_settings and build, and build_link imports wiring_link.py and calls
    its link_parts and build_*; run() itself imports nothing else (the link's class comes with
    its parts)."""
    names, calls = _phase_imports("build_core")
    assert names == {"wiring"} and {"load_settings", "build"} <= calls
    names, calls = _phase_imports("build_link")
    assert names == {"wiring_link"}
    assert {n for n in calls if n.startswith("build_") or n in ("watchdog", "link_parts")} == {
        "link_parts", "build_wifi", "build_clock", "watchdog"}
    names, _ = _phase_imports("run", "main")
    assert names == {"startup"}


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(conf=configs())
@example(conf={"meter": {"type": "ddsu666"}, "pile_id": "check-1", "mqtt": {"host": "127.0.0.1", "port": 1}})
@example(conf={"meter": {"type": "ddsu666"}, "pile_id": "check-1",
               "mqtt": {"host": "127.0.0.1", "port": 1, "secret": SECRET}, "ota": {"key": "c3" * 256},
               "wifi": {"ssid": "pile-net", "password": "password1"},
               "ntp": {"host": "127.0.0.1", "port": 1}})
@example(conf={"meter": {"type": "none"}})
def test_stage_one_imports_everything_the_boot_imports_later_and_nothing_more(monkeypatch, conf):
    with monkeypatch.context() as m:
        imported = boot_imports(m, conf)
        checks = release_boot.checks()  # as boot.py calls it: config.json in the flash folder
    checked = set(m for group in checks for m in group)
    covered = closure(set(release_boot.MAIN_IMPORTS) | checked)
    assert imported <= covered, sorted(imported - covered)
    assert "wiring_link" in checked and "config" in checked
    # Nothing checked that this boot does not import: its names would stay on the heap.
    assert checked - {"release_boot"} <= imported, sorted(checked - imported)
    assert not checked & set(release_boot.MAIN_IMPORTS)  # those stay loaded: imported once


def test_an_unreadable_config_checks_what_the_boot_reads_it_with(tmp_path, monkeypatch):
    """No config.json, or one that is no JSON: the boot stops after config.py (the pile held
    unavailable, no reset), so only it and the hand-over's release_boot are checked."""
    monkeypatch.chdir(tmp_path)
    assert release_boot.checks() == (("release_boot",), ("config",))
    (tmp_path / "config.json").write_text("{not json")
    assert release_boot.checks() == (("release_boot",), ("config",))
    (tmp_path / "config.json").write_text("[1, 2]")
    assert release_boot.checks() == (("release_boot",), ("config",))


@given(conf=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                             st.sampled_from(["pile_id", "meter", "mqtt", "ota", "wifi", "ntp", "type",
                                              "secret", "tls_ca", "host"]), inner, max_size=6),
                         max_leaves=12))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_any_json_in_config_json_gives_groups_of_names(conf):
    """Whatever the file holds (config.py judges it later), the check's list is made, never an
    error out of stage one: a tuple of groups of module names, config.py always among them."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            json.dump(conf, f)
        groups = release_boot.checks(path)
    assert isinstance(groups, tuple) and ("config",) in groups and ("release_boot",) in groups
    for group in groups:
        assert isinstance(group, tuple) and group
        assert all(isinstance(n, str) and n in FIRMWARE_MODULES for n in group), group
    if isinstance(conf, dict):
        assert groups == release_boot.boot_imports(conf)  # not the fallback: no error inside
