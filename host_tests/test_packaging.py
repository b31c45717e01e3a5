"""package.json (mip) and manifest.py (a frozen image) carry every firmware module, at the paths
the firmware expects, with firmware/version.py's VERSION."""
import ast
import glob
import json
import os

import mpremote.mip
import pytest

from pilehost import ROOT
from tools import fetch_deps

FIRMWARE = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "firmware", "*.py")))
# Run by MicroPython from the filesystem at every boot; never frozen (manifest.py says why).
FILES_ON_BOARD = {"boot.py", "main.py"}


def firmware_version():
    with open(os.path.join(ROOT, "firmware", "version.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["VERSION"]:
            return node.value.value
    raise AssertionError("no VERSION in firmware/version.py")


def shipped_libraries():
    """micropython-lib's names of what tools/fetch_deps.py fetches from PyPI."""
    return {name[len("micropython-"):] for name in fetch_deps.DEPS}


@pytest.fixture(scope="module")
def package():
    with open(os.path.join(ROOT, "package.json")) as f:
        return json.load(f)


def test_the_firmware_is_what_is_checked():
    assert {"boot.py", "main.py", "controller.py", "charger.py"} <= set(FIRMWARE)
    assert firmware_version().count(".") == 2


# -- package.json -------------------------------------------------------------------------------

def test_package_json_has_every_module_at_the_board_root(package):
    urls = dict(package["urls"])
    assert len(urls) == len(package["urls"])  # no board path twice
    assert sorted(urls) == FIRMWARE
    for dest, source in urls.items():
        assert source == "firmware/" + dest
        assert os.path.isfile(os.path.join(ROOT, source)), source


def test_package_json_version_and_deps(package):
    assert package["version"] == firmware_version()
    assert {name for name, _version in package["deps"]} == shipped_libraries()
    assert set(package) == {"urls", "deps", "version"}


def board_path(path):
    """mpremote joins target + "/" + path: "//boot.py" with --target /, which the board's
    filesystems (FAT, littlefs) take as /boot.py, leading slashes skipped."""
    return "/" + os.path.normpath(path).lstrip("/")


class FakeBoard:
    """What mpremote's installer talks to: a filesystem that remembers what was written."""

    def __init__(self):
        self.dirs = {"/"}
        self.files = {}

    def fs_exists(self, path):
        return board_path(path) in self.dirs or board_path(path) in self.files

    def fs_mkdir(self, path):
        self.dirs.add(board_path(path))

    def fs_writefile(self, path, data, progress_callback=None):
        self.files[board_path(path)] = data


def test_mpremote_installs_it_where_the_firmware_runs(monkeypatch):
    """`mpremote mip install --target / package.json` (docs/technician.md), through mpremote's
    own installer; the dependencies are recorded instead of fetched from micropython-lib."""
    deps = []
    monkeypatch.setattr(mpremote.mip, "_install_package",
                        lambda transport, name, index, target, version, mpy: deps.append(
                            (name, version, target)))
    board = FakeBoard()
    mpremote.mip._install_json(board, os.path.join(ROOT, "package.json"),
                               mpremote.mip._PACKAGE_INDEX, "/", None, False)
    assert sorted(board.files) == ["/" + name for name in FIRMWARE]
    for name in FIRMWARE:
        with open(os.path.join(ROOT, "firmware", name), "rb") as f:
            assert board.files["/" + name] == f.read()
    assert {name for name, _version, _target in deps} == shipped_libraries()
    assert all(target == "/" for _name, _version, target in deps)


# -- manifest.py --------------------------------------------------------------------------------

def run_manifest():
    """manifest.py under stand-ins for MicroPython's manifest functions, which record the calls."""
    calls = {"metadata": [], "require": [], "module": [], "package": [], "include": [], "freeze": []}

    def recorder(kind):
        return lambda *args, **kwargs: calls[kind].append((args, kwargs))

    path = os.path.join(ROOT, "manifest.py")
    with open(path) as f:
        source = f.read()
    exec(compile(source, path, "exec"), {k: recorder(k) for k in calls})
    return calls


def test_manifest_freezes_every_module_but_boot_and_main():
    calls = run_manifest()
    frozen = []
    for args, kwargs in calls["module"]:
        name = args[0]
        base = kwargs.get("base_path", args[1] if len(args) > 1 else ".")
        assert os.path.isfile(os.path.join(ROOT, base, name)), (base, name)  # relative to manifest.py
        assert os.path.join(ROOT, base) == os.path.join(ROOT, "firmware")
        frozen.append(name)
    assert len(frozen) == len(set(frozen))
    assert sorted(frozen) == sorted(set(FIRMWARE) - FILES_ON_BOARD)
    assert not calls["package"] and not calls["include"] and not calls["freeze"]


def test_manifest_version_and_requirements():
    calls = run_manifest()
    [(args, kwargs)] = calls["metadata"]
    assert kwargs["version"] == firmware_version()
    assert {args[0] for args, _kwargs in calls["require"]} == shipped_libraries()
