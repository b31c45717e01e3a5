"""What the heap cuts of issue 12 item 3 rely on (pilehost/chipheap.py, `make bench WHAT=heap32`):
the settings kept for the run hold nothing of config.py, so dropping it frees it; the room
wiring.py holds for the link covers the link's buffers; the heap probe's breakdown runs."""
import ast
import glob
import json
import os
import types

import pytest

import config
from pilehost import FIRMWARE, ROOT, chipheap, unix_port


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


def test_the_room_held_for_the_link_covers_its_buffers():
    conn = _consts(os.path.join(FIRMWARE, "mqtt_conn.py"))
    room = _consts(os.path.join(FIRMWARE, "wiring.py"))["_LINK_ROOM_B"]
    assert room >= conn["_OUT_SIZE"] + conn["_IN_SIZE"]
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
