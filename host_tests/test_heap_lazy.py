"""Issue 12 item 3, code that leaves the heap once used (pilehost/chipheap.py, `make bench
WHAT=heap32`): main.py drops wiring.py after the boot, and console.py prints without a logging
library. A dropped module is freed only if nothing kept holds one of its functions (a function
holds its module's globals, and with them every other function and its bytecode)."""

import pytest

from pilehost import unix_port
from pilehost.virtual_board import VirtualBoard

SECRET = "9f" * 32


@pytest.fixture
def built(monkeypatch):
    """Every part wiring.py and wiring_link.py build on a board with all sections: records,
    link with commands, NTP; and the link's parts (wiring_link.link_parts), which main.run holds
    while it drops wiring_link.py, then makes the link of."""
    import wiring
    import wiring_link

    vb = VirtualBoard(monkeypatch, config={
        "pile_id": "lazy-1", "meter": {"type": "ddsu666"},
        "mqtt": {"host": "127.0.0.1", "port": 1, "secret": SECRET},
        "ntp": {"host": "127.0.0.1", "port": 1}})
    make, args = wiring_link.link_parts(vb.board, vb.conf, vb.ctl, wiring.handover)
    link = make(**args)
    clock = wiring_link.build_clock(vb.conf, vb.ctl)
    assert link is not None and clock is not None and link._commands is not None
    return wiring, [vb.ctl, link, clock, wiring.idle, wiring.reset, wiring.handover, args]


def test_nothing_built_keeps_a_function_of_wiring(built, functions_of):
    wiring, roots = built
    assert functions_of(wiring, roots) == []


def test_nothing_built_keeps_a_function_of_wiring_link(built, functions_of):
    """main.py drops wiring_link.py too, once the link's parts, the Wi-Fi, the clock and the
    watchdog are built, before it makes the link (issue 12): none of them, nor the link, keeps
    one of its functions."""
    import wiring_link

    _, roots = built
    assert functions_of(wiring_link, roots) == []
    ctl = roots[0]
    ctl.kept = eval("lambda: time", vars(wiring_link))  # the check sees one if there is one
    assert functions_of(wiring_link, roots) == ["<lambda>"]
    del ctl.kept
    args = roots[-1]
    args["reset_cause"] = wiring_link.reset_cause  # in the parts too
    assert functions_of(wiring_link, roots) == ["reset_cause"]


def test_the_check_sees_a_closure_of_wiring(built, functions_of):
    wiring, roots = built
    ctl = roots[0]
    ctl.kept = eval("lambda: idle", vars(wiring))  # as build_clock's may_block lambda was
    assert functions_of(wiring, roots) == ["<lambda>"]


def test_what_moved_out_of_wiring_still_works(monkeypatch):
    import sntp

    class Contactor:
        closed = False

    c = Contactor()
    may_block = sntp.while_open(c)
    assert may_block()
    c.closed = True
    assert not may_block()
    monkeypatch.setattr(sntp.time, "time", lambda: sntp._MIN_UNIX - sntp.epoch_offset() - 1)
    assert sntp.unix_ms() is None  # the clock not set yet
    monkeypatch.setattr(sntp.time, "time", lambda: sntp._MIN_UNIX - sntp.epoch_offset() + 5)
    assert sntp.unix_ms() == (sntp._MIN_UNIX + 5) * 1000
    import commands

    for t in (sntp._MIN_UNIX - 1, sntp._MIN_UNIX, sntp._MIN_UNIX + 86400 * 400, 0, 2**31 - 1):
        monkeypatch.setattr(sntp.time, "time", lambda t=t: t - sntp.epoch_offset())
        assert commands.unix_ms() == sntp.unix_ms(), t  # the verifier's clock, either way


def test_a_session_on_the_chip_shaped_port_runs_without_wiring_or_logging_loaded():
    """On the 32-bit binary, as `.mpy`: the session completes, and at its end neither wiring.py
    (dropped after the boot) nor logging (not used) is loaded, with commands on; the console's
    lines are as before."""
    from pilehost import procs

    program = unix_port.unix32_binary() or unix_port.micropython_binary()
    config = {"meter": {"type": "ddsu666"}, "pile_id": "lazy-2",
              "mqtt": {"host": "127.0.0.1", "port": procs.free_port(), "secret": SECRET}}
    r = unix_port.run_scenario("normal", config=config, heapsize="400k", exact_heap=True, program=program)
    assert r.returncode == 0 and r.result and r.result["boots"] == 1, "\n".join(r.lines[-20:])
    assert any("-> idle" in t for _, t in r.firmware_events("charger"))
    loaded = set(r.result["modules"])
    assert {"main", "console", "charger", "controller"} <= loaded
    assert "wiring" not in loaded and "logging" not in loaded
    assert "wiring_link" not in loaded and "config" not in loaded  # the boot's only
    assert {"command_auth", "commands", "mqtt_link"} <= loaded
    firmware_lines = [x for x in r.lines if x.startswith("[") and "] sim " not in x]
    assert any("] main: firmware " in x for x in firmware_lines)


def test_the_boot_only_modules_are_gone_after_the_boot_in_the_benchs_configuration():
    """The configuration `make bench WHAT=heap32` bisects (a link, no secret), on the 32-bit
    binary as `.mpy`: the boot's two phases (wiring.py, then wiring_link.py) and config.py are
    not loaded at the session's end, and the link and the records are."""
    from pilehost import chipheap, procs

    program = unix_port.unix32_binary() or unix_port.micropython_binary()
    r = unix_port.run_scenario("normal", config=chipheap._config(procs.free_port(), "lazy-3"),
                               heapsize="400k", exact_heap=True, program=program)
    assert r.returncode == 0 and r.result and r.result["boots"] == 1, "\n".join(r.lines[-20:])
    loaded = set(r.result["modules"])
    assert not {"wiring", "wiring_link", "config"} & loaded
    assert {"mqtt_link", "mqtt_conn", "session_log", "journal", "main"} <= loaded
    assert "command_auth" not in loaded  # no secret: never loaded


# -- the link's biggest allocation at run time (issue 12 item 3) ---------------------------------

_PIPE_SCRIPT = """
import gc
import mqtt_conn
p = mqtt_conn._Pipe(2048)
p.write(bytes(range(256)) * 7)
p.head = 1000  # 792 B unsent near the end: the next write must move them to the front
data = bytes(range(200)) * 2
gc.collect()
gc.disable()
before = gc.mem_alloc()
p.write(data)
grew = gc.mem_alloc() - before
gc.enable()
same = bytes(p.mv[:p.pending()]) == (bytes(range(256)) * 7)[1000:] + data
print("PIPE", grew, same)
"""


def test_the_out_buffer_is_compacted_in_place_on_micropython(tmp_path):
    """A copy of the unsent bytes was the link's biggest allocation at run time (up to 2 KiB, in
    a heap cut into smaller holes after many sessions); the move is now in place (memmove)."""
    import os
    import subprocess

    script = tmp_path / "pipe.py"
    script.write_text(_PIPE_SCRIPT)
    program = unix_port.unix32_binary() or unix_port.micropython_binary()
    r = subprocess.run([program, str(script)], env=dict(os.environ, MICROPYPATH=unix_port.micropypath()),
                       capture_output=True, text=True, timeout=60)
    line = [x for x in r.stdout.splitlines() if x.startswith("PIPE ")]
    assert line, r.stdout + r.stderr
    _, grew, same = line[0].split()
    assert same == "True"
    assert int(grew) < 128  # a few memoryview objects; the copy was 792 B


class _Conn:
    def __init__(self):
        self.sizes = {}

    def publish(self, topic, payload, retain=False, qos=1):
        self.sizes[topic] = max(self.sizes.get(topic, 0), len(payload))
        return 1


def test_the_links_messages_are_smaller_than_its_biggest_allocation(built):
    """Status, health and a command's ack, each with its longest texts: JSON built in one piece
    (a string, then its bytes), each below a record's 1,024 B, chipheap.LINK_BIGGEST_B."""
    from pilehost import chipheap

    wiring, roots = built
    link = roots[1]
    conn = link._conn = _Conn()
    heal = link._heal
    heal.last_reason = "x" * 400  # cut to 200 in the message
    heal.last_step = "reset"
    heal.connects = heal.reconnects = heal.wifi_restarts = heal.resets = 2**31
    link._publish_status(1000)
    link._publish_health(2000)
    import commands  # a command's handling and its ack (loaded with a command secret)

    commands.ack(link, "c" * 64, "set_current_limit", "rejected", "r" * 120)
    conn.publish(link._topics.ack, link._acks.pop())
    assert len(conn.sizes) == 3
    assert max(conn.sizes.values()) + 16 < chipheap.LINK_BIGGEST_B, conn.sizes
