"""What the firmware ships besides its own modules is what it runs: umqtt.simple, and no longer
micropython-logging (console.py prints its own lines, issue 12). Every list of it agrees: `make
deps` (tools/fetch_deps.py and the Makefile's stamp), `make flash` (pilehost/technician.py),
the frozen image (manifest.py, as pilehost/chipbuild.py reads it), mip (package.json) and the
heap bench's module list."""
import io
import json
import os
import re


from pilehost import ROOT, chipbuild, chipheap, technician, vboard
from tools import fetch_deps

RUNS = {"umqtt.simple"}  # micropython-lib's names of what the firmware imports from lib/


def test_make_deps_fetches_only_what_runs():
    assert {name[len("micropython-"):] for name in fetch_deps.DEPS} == RUNS


def test_the_makefile_stamp_is_the_last_fetched():
    """`make deps` refetches when its stamp is missing: a stamp fetch_deps never writes would
    refetch at every make, one of a dropped library would never fetch on a fresh machine."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        stamp = re.search(r"^DEPS_STAMP := (\S+)$", f.read(), re.M).group(1)
    name, version = list(fetch_deps.DEPS.items())[-1]
    assert stamp == "lib/.%s-%s" % (name, version)


def test_make_flash_copies_only_what_runs_and_removes_the_retired():
    assert {d.replace("/", ".") for d in technician.DEPS} == RUNS
    for source in (False, True):
        plan, remove = technician.flash_plan("ref-esp32", source=source)
        on_board = [dest for _, dest in plan]
        assert not [p for p in on_board if "logging" in p], on_board
        assert {"lib/logging/__init__.mpy", "lib/logging/__init__.py"} <= set(remove)
        assert not set(remove) & set(on_board)


def test_the_frozen_image_and_mip_carry_only_what_runs():
    frozen_lib = {name for name, base in chipbuild.manifest_modules() if base == os.path.join(ROOT, "lib")}
    assert frozen_lib == {"umqtt/simple.py"}
    with open(os.path.join(ROOT, "package.json")) as f:
        assert {name for name, _version in json.load(f)["deps"]} == RUNS
    assert not [m for m in chipheap.firmware_modules() if "logging" in m]
    assert set(chipheap.firmware_modules()) >= RUNS


def test_a_board_flashed_before_loses_its_logging(tmp_path, vboard_tools):
    """A pile flashed while logging was shipped: the next `make flash` removes the library (on a
    virtual board, through mpremote) and says so in its table."""
    vb = vboard.VirtualBoard(str(tmp_path / "vb"))
    old = os.path.join(vb.flash, "lib", "logging")
    os.makedirs(old)
    for name in ("__init__.mpy", "__init__.py"):
        with open(os.path.join(old, name), "wb") as f:
            f.write(b"# micropython-logging, as an earlier flash left it\n")
    vb.start()
    try:
        out = io.StringIO()
        result = technician.flash(vb.port, "ref-esp32", out=out)
    finally:
        vb.stop()
    assert sorted(result["removed"]) == ["lib/logging/__init__.mpy", "lib/logging/__init__.py"]
    assert "lib/logging/__init__.mpy" in out.getvalue() and "2 removed" in out.getvalue(), out.getvalue()
    assert os.listdir(old) == []
    assert os.path.isfile(os.path.join(vb.flash, "lib", "umqtt", "simple.mpy"))
