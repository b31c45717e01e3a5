"""The MQTT link made after wiring_link.py is dropped (issue 12 item 3): its set-up
(link_setup.py, imported by MqttLink.__init__) is the boot's heap peak, and wiring_link.py's
~3 KB of bytecode must not be on the heap beside it, nor startup.py's. startup.build_link returns
the link's class and keyword arguments (wiring_link.link_parts); main.run drops startup.py and
wiring_link.py, collects, then makes the link. Nothing imports main.py: its source is read (as
test_boot_check.py does)."""
import ast
import os

import pytest

from pilehost import FIRMWARE
from pilehost.virtual_board import VirtualBoard


def _main(module="main"):
    with open(os.path.join(FIRMWARE, module + ".py")) as f:
        tree = ast.parse(f.read())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _calls_in_order(node):
    """ast.unparse of every call in `node`, in source order."""
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    return [ast.unparse(c) for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]


def test_no_link_is_made_while_wiring_link_is_loaded():
    """startup.build_link (wiring_link.py's phase) calls no MqttLink and makes nothing of its
    parts; run() makes the link with `make(**args)` only after it popped wiring_link and startup
    from sys.modules and collected, and after build_link's frame is gone (a stale reference in a live frame
    would keep the module; the collector scans the stack)."""
    phase = _calls_in_order(_main("startup")["build_link"])
    assert not any("MqttLink" in c or c.startswith("make(") for c in phase), phase
    run = _calls_in_order(_main()["run"])
    made = [i for i, c in enumerate(run) if c == "make(**args)"]
    assert len(made) == 1, run
    built = run.index("startup.build_link(board, conf, ctl, handover)")
    popped = run.index("sys.modules.pop('wiring_link', None)")
    dropped = run.index("sys.modules.pop('startup', None)")
    collected = [i for i, c in enumerate(run) if c == "gc.collect()" and max(popped, dropped) < i < made[0]]
    assert built < popped < made[0] and built < dropped < made[0] and collected, run


def test_the_link_s_class_comes_with_its_parts(monkeypatch):
    """main.py imports no link module to make it (test_firmware_layout.py's
    test_main_is_the_loop_only): the class is wiring_link.link_parts' first item."""
    import mqtt_link
    import wiring
    import wiring_link

    vb = VirtualBoard(monkeypatch, config={"pile_id": "late-1", "mqtt": {"host": "127.0.0.1", "port": 1}})
    wiring.handover.clear()  # no load_settings: the host tests' boards
    make, args = wiring_link.link_parts(vb.board, vb.conf, vb.ctl, wiring.handover)
    assert make is mqtt_link.MqttLink
    link = make(**args)
    assert link._log is vb.ctl.records.log and link._verifier is None


@pytest.mark.parametrize("conf", [{"pile_id": "late-2"}, {"mqtt": {"host": "127.0.0.1", "port": 1}}])
def test_no_link_no_parts(monkeypatch, conf):
    """No mqtt section, or no pile id: (None, None), and main.run makes no link."""
    import wiring
    import wiring_link

    vb = VirtualBoard(monkeypatch, config=conf)
    assert wiring_link.link_parts(vb.board, vb.conf, vb.ctl, wiring.handover) == (None, None)
    assert vb.build_link() is None
