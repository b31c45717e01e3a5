"""The link's two buffers (issue 12 item 3): wiring.py makes them at the settings, while the heap
is still whole, and hands them over to the link phase, whose connection reads and writes in them;
a config without an mqtt section makes none. (They were a 4 KiB room held from the settings and
let go just before the link made its own: 1 KiB more, held while the link's modules import, the
boot's peak.)"""
import ast
import json
import os

import pytest

from pilehost import FIRMWARE
from pilehost.virtual_board import VirtualBoard, board_dict


def _consts(name):
    with open(os.path.join(FIRMWARE, name)) as f:
        tree = ast.parse(f.read())
    return {node.targets[0].id: node.value.args[0].value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "const"}


def test_the_sizes_made_at_the_settings_are_the_connection_s():
    wiring, setup, conn = _consts("wiring.py"), _consts("link_setup.py"), _consts("mqtt_conn.py")
    assert wiring["_LINK_OUT_B"] == setup["_OUT_SIZE"] == 2048
    assert wiring["_LINK_IN_B"] == setup["_IN_SIZE"] == conn["_IN_SIZE"] == 1024


def _settings(monkeypatch, conf):
    """wiring.load_settings() on a virtual board's flash holding this config.json, as
    main.build_core runs it."""
    vb = VirtualBoard(monkeypatch, config=conf)
    with open("board.json", "w") as f:
        json.dump(board_dict(), f)
    with open("config.json", "w") as f:
        json.dump(dict(conf, free_vend=True), f)
    import wiring

    board, c, problem = wiring.load_settings()
    assert problem is None, problem
    return vb, wiring, board, c


@pytest.mark.parametrize("conf", [
    {}, {"pile_id": "buf-1"}, {"pile_id": "buf-1", "meter": {"type": "ddsu666"}}])
def test_a_config_without_mqtt_makes_no_buffer(monkeypatch, conf):
    _, wiring, _, _ = _settings(monkeypatch, conf)
    assert "bufs" not in wiring.handover


def test_the_link_reads_and_writes_in_the_buffers_made_at_the_settings(monkeypatch):
    _, wiring, board, c = _settings(monkeypatch, {
        "pile_id": "buf-1", "mqtt": {"host": "127.0.0.1", "port": 1}})
    out, into = wiring.handover["bufs"]
    assert (len(out), len(into)) == (2048, 1024)
    ctl = wiring.build(board, c)
    import wiring_link

    make, args = wiring_link.link_parts(board, c, ctl, wiring.handover)  # as main.run, then
    link = make(**args)  # made with wiring_link.py dropped
    assert link._conn._pipe.buf is out and link._conn._in is into
    assert wiring.handover == {}  # nothing else holds them: the connection's alone


def test_a_link_built_without_them_makes_its_own(monkeypatch):
    vb = VirtualBoard(monkeypatch, config={"pile_id": "buf-2", "mqtt": {"host": "127.0.0.1", "port": 1}})
    import wiring

    wiring.handover.clear()  # no load_settings: the host tests' boards
    link = vb.build_link()
    assert (len(link._conn._pipe.buf), len(link._conn._in)) == (2048, 1024)
