"""The stock image's stand-in (pilehost/chipbuild.py, `make bench WHAT=heap32`) loads the firmware
from where a pile keeps it: a module's __file__ is the path it was found at, interned as a qstr
for good (py/builtinimport.c do_load), so found in this checkout's build/unix/firmware/ each of
~35 modules cost ~45 characters more than on a pile (`session_record.mpy`, the flash root)."""
import os
import re
import subprocess

from pilehost import ROOT, chipbuild, chipheap, technician, unix_port

def _firmware_modules():
    return sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "firmware"))
                  if n.endswith(".py") and n not in ("boot.py", "main.py"))


def test_the_stand_in_s_flash_root_holds_what_a_technician_flashes():
    plan, _ = technician.flash_plan("ref-esp32")
    flashed = {dest for _, dest in plan if "/" not in dest and dest != "board.json"}
    assert {name for _, name in unix_port.firmware_files()} == flashed
    for local, name in unix_port.firmware_files():
        assert os.path.basename(local) == name and os.path.exists(local)


def test_only_the_stock_image_keeps_the_firmware_on_its_flash(stock_image):
    program, path = stock_image
    assert chipbuild.flash_files(program) == unix_port.firmware_files()
    assert chipbuild.flash_files(unix_port.unix32_binary()) == []
    assert path.split(":")[0] == ".frozen"  # after the unix port's '': ESP32's '', '.frozen', '/lib'
    assert not any("firmware" in entry for entry in path.split(":"))


def _run(program, path, cwd, code):
    r = subprocess.run([program, "-c", code], env=dict(os.environ, MICROPYPATH=path), cwd=str(cwd),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_the_firmware_s_file_names_are_a_pile_s(stock_image, tmp_path):
    """Each firmware module imported on the stand-in, as chipheap's runs lay out its flash: its
    __file__ is its name in the flash root, and no path of this checkout is interned for it."""
    program, path = stock_image
    unix_port.link_files(str(tmp_path), chipbuild.flash_files(program))
    modules = _firmware_modules()
    out = _run(program, path, tmp_path, (
        "import micropython, sys\n"
        "for n in %r:\n"
        "    try:\n"
        "        __import__(n)\n"
        "    except ImportError:\n"
        "        pass\n"
        "for n in %r:\n"
        "    if n in sys.modules:\n"
        "        print('FILE', n, sys.modules[n].__file__)\n"
        "micropython.qstr_info(1)\n") % (modules, modules))
    files = dict(line.split()[1:] for line in out.splitlines() if line.startswith("FILE "))
    assert len(files) >= len(modules) - 2  # all but a module the unix port cannot import
    assert files == {name: name + ".mpy" for name in files}
    interned = re.findall(r"^Q\((.*)\)$", out, re.M)
    paths = [q for q in interned if q.endswith((".mpy", ".py")) and "/" in q]
    assert paths == []
    assert not any(q.startswith(ROOT) and "firmware" in q for q in interned)


def test_the_stand_in_s_probe_and_session_find_the_firmware_on_the_flash(stock_image):
    """chipheap's probe (own.py's figures) and its scenario runs (need.py's) on the stand-in: the
    firmware is not on MICROPYPATH, only in the flash folder they lay out."""
    program, path = stock_image
    own = chipheap._probe(program, path, "session_record")
    assert "session_record" in own["loaded"] and own["live"] > 0
    loaded = chipheap.session_modules(None, program, path)
    assert {"charger", "session_record", "journal"} <= set(loaded)
