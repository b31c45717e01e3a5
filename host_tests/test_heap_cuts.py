"""What the heap cuts of issue 12 item 3 rely on (pilehost/chipheap.py, `make bench WHAT=heap32`):
the settings kept for the run hold nothing of config.py, so dropping it frees it; the buffers
wiring.py makes for the link are the link's (test_link_buffers.py); the heap probe's breakdown runs."""
import ast
import glob
import json
import os
import re
import types

import pytest

import config
from pilehost import FIRMWARE, ROOT, chipbuild, chipheap, unix_port


def _sections(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen or not isinstance(obj, config._Section):
        return seen
    seen.add(id(obj))
    yield obj
    for value in vars(obj).values():
        yield from _sections(value, seen)


def _config_functions_reachable(obj):
    """Functions defined in config.py reachable from the settings: each would keep config.py's
    globals (its schemas and every function) alive on a MicroPython heap."""
    found = []
    for section in _sections(obj):
        for holder in (vars(type(section)), vars(section)):
            for name, value in holder.items():
                fn = getattr(value, "__func__", value)
                if isinstance(fn, types.FunctionType) and fn.__globals__ is vars(config):
                    found.append(name)
    return found


@pytest.mark.parametrize("board_path", sorted(glob.glob(os.path.join(ROOT, "boards", "*.json"))))
def test_the_settings_hold_nothing_of_config_py(board_path):
    with open(board_path) as f:
        board = config.parse_board(json.load(f))
    with open(os.path.join(ROOT, "config.example.json")) as f:
        conf = config.parse_config(json.load(f))
    assert _config_functions_reachable(board) == []
    assert _config_functions_reachable(conf) == []
    assert conf.meter.type and board.pins.contactor is not None  # still the values


def test_the_checker_sees_a_method_on_a_section():
    section = config.Section({"a": 1})
    assert _config_functions_reachable(section) == []
    section.check = config._is_int  # a config.py function reachable from the settings
    assert _config_functions_reachable(section) == ["check"]


def _consts(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "const"):
            out[node.targets[0].id] = node.value.args[0].value
    return out


def test_the_buffers_made_at_the_settings_are_the_link_s():
    setup = _consts(os.path.join(FIRMWARE, "link_setup.py"))
    wiring = _consts(os.path.join(FIRMWARE, "wiring.py"))
    assert (wiring["_LINK_OUT_B"], wiring["_LINK_IN_B"]) == (setup["_OUT_SIZE"], setup["_IN_SIZE"])
    assert setup["_IN_SIZE"] == _consts(os.path.join(FIRMWARE, "mqtt_conn.py"))["_IN_SIZE"]
    journal = _consts(os.path.join(FIRMWARE, "journal.py"))
    assert chipheap.LINK_BIGGEST_B == journal["_PAYLOAD_LIMIT"]  # a record copied out to publish


def test_the_breakdown_measures_a_module_and_what_it_brings():
    program = unix_port.unix32_binary() or unix_port.micropython_binary()
    path = unix_port.micropypath()
    alone = chipheap._probe(program, path, "session_store")
    assert {"session_store", "durable"} <= set(alone["loaded"])
    own = chipheap._probe(program, path, "session_store", ["durable"])
    assert own["loaded"] == ["session_store"]
    assert 0 < own["live"] < alone["live"]
    lines = chipheap.breakdown_lines({"a": {"own": 100, "garbage": 10, "peak": 120},
                                      "b": {"own": 300, "garbage": 0, "peak": None}}, ["a"])
    assert "* a" in lines[1] and "  b" in lines[2] and "100 B" in lines[-1]


def test_the_stock_image_runs_its_own_umqtt_simple_out_of_the_heap(stock_image, tmp_path):
    """On a stock ESP32 image sys.path is '', '.frozen', '/lib': the image's frozen umqtt.simple
    shadows the copy `make flash` puts in lib/, and its bytecode is not on the heap. The stand-in
    image (`make bench WHAT=heap32`) must behave the same, or the .mpy figure counts it twice."""
    import subprocess

    program, path = stock_image
    assert path.split(":").index(".frozen") < path.split(":").index(os.path.join(unix_port.UNIX_BUILD, "lib"))
    script = tmp_path / "probe.py"
    script.write_text("import gc, sys\ngc.collect()\nbefore = gc.mem_alloc()\nfrom umqtt import simple\n"
                      "gc.collect()\nprint(simple.__file__, gc.mem_alloc() - before)\n")
    out = {}
    for label, env_path in (("stock", path), ("lib", unix_port.micropypath())):
        r = subprocess.run([program, str(script)], env=dict(os.environ, MICROPYPATH=env_path),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        where, live = r.stdout.split()
        out[label] = (where, int(live))
    assert out["stock"][0] == "umqtt/simple.py"  # a frozen module's name, no file behind it
    assert out["lib"][0].endswith(".mpy")
    assert out["stock"][1] + 2048 < out["lib"][1]  # ~3.4 KiB of bytecode and qstrs stay in flash


# The heap's qstr pools double from 20 entries on any image (py/qstr.c qstr_add; pilehost/
# chipbuild.py): 1,260 dynamic qstrs fill six, the 1,261st allocates a seventh of 1,280 entries
# (~9 KiB at once). A qstr stays for good: a module dropped after the boot (config.py, wiring.py)
# keeps its names interned. Room kept below the cliff for what a pile interns besides its
# modules (its own boot, the network stack); the chip's figure is not known here.
QSTR_POOLS_FULL_AT = 20 * (2 ** 6 - 1)
QSTR_ROOM = 50
BENCH_CONF = {"pile_id": "p", "meter": {"type": "ddsu666"}, "mqtt": {"host": "h"}}  # heap32's
FIELD_CONF = dict(BENCH_CONF, mqtt={"host": "h", "secret": "s"}, wifi={}, ntp={})


def _qstrs_after_boot_imports(stock_image, tmp_path, conf):
    """(pools, qstrs) on the stock image after what a boot with this config.json imports
    (release_boot.boot_imports, MAIN_IMPORTS, wiring) and umqtt.simple."""
    import subprocess

    import release_boot

    names = list(release_boot.MAIN_IMPORTS) + ["wiring"]
    for group in release_boot.boot_imports(conf):
        names += list(group)
    program, path = stock_image
    unix_port.link_files(str(tmp_path), chipbuild.flash_files(program))  # the pile's flash root
    script = ("import micropython\nfor n in %r:\n    __import__(n)\n"
              "import umqtt.simple\nmicropython.qstr_info()\n" % names)
    r = subprocess.run([program, "-c", script], env=dict(os.environ, MICROPYPATH=path),
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    return tuple(int(x) for x in re.search(r"n_pool=(\d+), n_qstr=(\d+)", r.stdout).groups())


def test_the_bench_configuration_s_qstrs_stay_inside_six_pools(stock_image, tmp_path):
    """heap32's pile (DDSU666, the link, no secret, Wi-Fi or NTP section): below the cliff."""
    n_pool, n_qstr = _qstrs_after_boot_imports(stock_image, tmp_path, BENCH_CONF)
    assert n_qstr + QSTR_ROOM <= QSTR_POOLS_FULL_AT and n_pool <= 6, (n_pool, n_qstr)


def test_a_field_pile_s_qstrs_stay_inside_six_pools(stock_image, tmp_path):
    """A field pile (Wi-Fi, NTP, a command secret) interned ~1,281 qstrs, a seventh pool (~9 KiB
    more than heap32's configuration shows); module constants no other module reads made private
    `_NAME = const(...)` (inlined, neither a global nor interned) brought it to ~1,197 (2026-12-06)."""
    n_pool, n_qstr = _qstrs_after_boot_imports(stock_image, tmp_path, FIELD_CONF)
    assert n_qstr + QSTR_ROOM <= QSTR_POOLS_FULL_AT and n_pool <= 6, (n_pool, n_qstr)
