"""What a pile gets is compiled at optimisation level 3 (pilehost/unix_port.py SHIP_OPT: no
line-number tables, ~4 KiB of heap on a stock image, issue 12 item 3): every path that makes a
pile's .mpy uses it, level 3 changes nothing but the lines in this firmware, and a traceback
from a shipped module still names the file and the function."""
import ast
import os
import re
import subprocess

from pilehost import ROOT, release, unix_port


def firmware_sources():
    names = sorted(n for n in os.listdir(os.path.join(ROOT, "firmware")) if n.endswith(".py"))
    return [(n, open(os.path.join(ROOT, "firmware", n), encoding="utf-8").read()) for n in names]


def test_the_firmware_has_no_assert_and_no_debug_flag_so_level_3_only_drops_lines():
    for name, text in firmware_sources():
        tree = ast.parse(text, name)
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        debug = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "__debug__"]
        assert not asserts and not debug, (name, asserts, debug)


def test_make_mpy_the_technicians_flash_and_a_release_compile_alike():
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = f.read()
    assert re.search(r"^MPY_OPT := %s$" % re.escape(unix_port.SHIP_OPT), make, re.M)
    recipe = make.split("\nmpy:", 1)[1].split("\n\n", 1)[0]
    assert recipe.count("mpy-cross") == recipe.count("$(MPY_OPT)") == 2
    files = dict(release.build_files("9.9.9", arch=None))
    level0 = unix_port.compile_for_unix()[0]
    shipped = unix_port.compile_shipped()
    for name in ("backoff", "controller", "mqtt_link"):
        with open(os.path.join(level0, name + ".mpy"), "rb") as f:
            with_lines = f.read()
        with open(os.path.join(shipped, name + ".mpy"), "rb") as f:
            without = f.read()
        assert len(without) < len(with_lines), name
        assert len(files[name + ".mpy"]) < len(with_lines), name  # the release's, stamped


def test_a_shipped_modules_traceback_names_its_file_and_function(tmp_path):
    os.symlink(os.path.join(unix_port.compile_shipped(), "backoff.mpy"), str(tmp_path / "backoff.mpy"))
    code = "import backoff\nbackoff.Backoff(None, 2).next_ms()"  # None * 2 inside next_ms
    r = subprocess.run([unix_port.micropython_binary(), "-c", code],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, MICROPYPATH=""))
    assert r.returncode != 0
    assert 'File "backoff.py", line 1, in next_ms' in r.stderr + r.stdout, r.stderr + r.stdout
