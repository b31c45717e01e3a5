"""`make reboot` then at once `make diag`, on the virtual board (pilehost/vboard.py): the diag's
Ctrl-C comes while the board dies and boots again. mpremote's single Ctrl-C was lost there now
and then (in the unix port's start, boot.py or main.py's imports) and its Ctrl-A never read:
"could not enter raw repl". pilehost/board_repl.py waits for the boot to reach main.run() and
sends the Ctrl-C again if it was lost: every diag finds the pile in service mode, one boot on."""
import json
import os
import subprocess
import sys

import pytest

from pilehost import ROOT, vboard

TOOL = os.path.join(ROOT, "tools", "technician.py")
REBOOTS = 4
BOOT_S = 20  # a boot on a busy 2-CPU CI host


def tech(*args):
    r = subprocess.run([sys.executable, TOOL] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def board(tmp_path, vboard_tools):
    vb = vboard.VirtualBoard(str(tmp_path / "vb"), meter={"type": "ddsu666"}).start()
    yield vb
    vb.stop()


def test_diag_right_after_reboot_finds_service_mode(board, tmp_path):
    tech("flash", board.port)
    config = tmp_path / "pile.json"
    config.write_text(json.dumps({"pile_id": "vb-reboot", "free_vend": True, "meter": {"type": "ddsu666"}}))
    tech("provision", board.port, config)  # uploads, then reboots
    boots = []
    for i in range(REBOOTS):
        d = json.loads(tech("diag", board.port, "--json"))  # no wait for the boot
        assert d["firmware"] == "service mode" and d["pile_id"] == "vb-reboot", d
        assert d["contactor"]["commanded"] == "open" and d["pilot"] is not None
        boots.append(d["boot"])
        board.wait_for("main: service mode", BOOT_S, count=i + 1)
        tech("reboot", board.port)
    assert boots == list(range(boots[0], boots[0] + REBOOTS)), boots  # one boot each, no extra reset
    board.wait_for(vboard.POWER_ON, BOOT_S, count=REBOOTS + 2)  # the power-on, provision's, ours
    assert board.boots() == REBOOTS + 2
    assert "KeyboardInterrupt in" not in board.console()  # no Ctrl-C landed in the boot
